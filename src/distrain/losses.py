"""Built-in losses: `(logits, targets) -> scalar`, computed in float32 whatever autocast chose."""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def cross_entropy(label_smoothing: float = 0.0, weight: Sequence[float] | None = None) -> LossFn:
    """Mean cross-entropy; `weight` is one weight per class (PyTorch's weighted mean)."""
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
    class_weight = torch.tensor(weight, dtype=torch.float32) if weight is not None else None

    def loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        w = class_weight.to(logits.device) if class_weight is not None else None
        # float32: fp16 logits overflow in exp/log-sum-exp.
        return F.cross_entropy(logits.float(), targets, weight=w, label_smoothing=label_smoothing)

    return loss


LOSSES = {"cross_entropy": cross_entropy}
