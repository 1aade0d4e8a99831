"""Built-in losses: `loss(logits, targets) -> scalar`, always computed in float32.

A loss may carry three optional attributes the loop understands:
  soft_targets  True when it accepts (N, C) probability targets (Mixup passes mixed label
                vectors to those; hard-label losses get lam·loss(y_a) + (1-lam)·loss(y_b));
  set_epoch(e)  called at the start of every epoch (LDAM's deferred re-weighting);
  validation_loss  the loss to report on validation (LDAM: cross-entropy at its scale
                without margins or weights, so val_loss does not jump when re-weighting
                starts); without it, validation uses the training loss itself.
Any callable works, an nn.Module loss included (it is moved to the run's device).
A builder with a `class_counts` parameter receives the training set's class counts.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _weights(weight: Sequence[float] | None) -> torch.Tensor | None:
    return torch.tensor(weight, dtype=torch.float32) if weight is not None else None


def _on(t: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    """`t` on `device`; callers keep the result, since a copy from pageable host memory on
    every call would make the host wait for all the GPU's queued work every step."""
    return t.to(device) if t is not None else None


class CrossEntropy:
    """Mean cross-entropy on hard labels or probability vectors; `weight` is one per class."""

    soft_targets = True

    def __init__(self, label_smoothing: float = 0.0, weight: Sequence[float] | None = None):
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        self.label_smoothing = label_smoothing
        self.weight = _weights(weight)

    def __call__(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        w = self.weight = _on(self.weight, logits.device)
        logits, targets = per_token(logits, targets)
        # float32: fp16 logits overflow in the log-sum-exp.
        return F.cross_entropy(logits.float(), targets, weight=w,
                               label_smoothing=self.label_smoothing)


def per_token(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequence outputs (N, T, C) with (N, T) labels, a language model's layout, as (N·T, C)
    and (N·T,); the mean over tokens is then the mean over samples of equal length."""
    if logits.dim() > 2 and targets.dim() == logits.dim() - 1:
        return logits.reshape(-1, logits.shape[-1]), targets.reshape(-1)
    return logits, targets


def correct_per_sample(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Correct predictions summed over samples; a sequence sample counts the share of its
    tokens predicted right, so accuracy stays in [0, 1]."""
    right = logits.argmax(-1) == labels
    return right.flatten(1).float().mean(1).sum() if right.dim() > 1 else right.sum()


def cross_entropy(label_smoothing: float = 0.0, weight: Sequence[float] | None = None
                  ) -> CrossEntropy:
    """Cross-entropy with optional label smoothing and class weights."""
    return CrossEntropy(label_smoothing, weight)


class SoftTargetCrossEntropy:
    soft_targets = True

    def __call__(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logp = F.log_softmax(logits.float(), dim=1)
        if targets.dim() == 1:  # hard labels are one-hot vectors
            targets = F.one_hot(targets, logits.shape[1])
        return -(targets.float() * logp).sum(dim=1).mean()


def soft_target_cross_entropy() -> SoftTargetCrossEntropy:
    """-(targets · log_softmax(logits)), for label vectors from Mixup/CutMix."""
    return SoftTargetCrossEntropy()


class ScaledCrossEntropy:
    """Cross-entropy of s·logits: LDAM's validation loss (its scale, no margins, no weights)."""

    def __init__(self, s: float) -> None:
        self.s = s

    def __call__(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self.s * logits.float(), targets)


def effective_number_weights(class_counts: Sequence[int], beta: float) -> torch.Tensor:
    """Class-balanced weights (1 - beta) / (1 - beta^n_c), normalised to sum to the class count."""
    counts = np.asarray(class_counts, dtype=np.float64)
    w = (1.0 - beta) / (1.0 - np.power(beta, np.maximum(counts, 1)))
    return torch.tensor(w / w.sum() * len(counts), dtype=torch.float32)


class LDAM:
    """Label-distribution-aware margin loss (Cao et al., 2019) with deferred re-weighting.

    margin_c = C / n_c^(1/4), scaled so the largest is `max_m`; the loss is the
    cross-entropy of s·(logits - margin_y at the true class). From epoch `drw_epoch`
    (0-based; negative: never) classes are weighted by effective number with `beta`."""

    soft_targets = False

    def __init__(self, class_counts: Sequence[int], max_m: float = 0.5, s: float = 30.0,
                 drw_epoch: int = -1, beta: float = 0.9999):
        if not class_counts or min(class_counts) < 1:
            raise ValueError(f"class_counts must be >= 1 for every class, got {list(class_counts)}")
        counts = np.asarray(class_counts, dtype=np.float64)
        margins = 1.0 / np.power(counts, 0.25)
        self.margins = torch.tensor(margins * (max_m / margins.max()), dtype=torch.float32)
        self.s = s
        self.drw_epoch = drw_epoch
        self.drw_weights = effective_number_weights(class_counts, beta)
        self.weight: torch.Tensor | None = None
        self.validation_loss = ScaledCrossEntropy(s)

    def set_epoch(self, epoch: int) -> None:
        self.weight = self.drw_weights if 0 <= self.drw_epoch <= epoch else None

    def __call__(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = logits.float()  # the margins are float32; fp16 logits would mismatch them
        self.margins = _on(self.margins, logits.device)
        adjusted = logits.scatter_add(1, targets[:, None], -self.margins[targets][:, None])
        if self.weight is not None:  # DRW
            self.weight = self.drw_weights = _on(self.drw_weights, logits.device)
        return F.cross_entropy(self.s * adjusted, targets, weight=self.weight)


def ldam(class_counts: Sequence[int], max_m: float = 0.5, s: float = 30.0, drw_epoch: int = -1,
         beta: float = 0.9999) -> LDAM:
    """LDAM (+ DRW from `drw_epoch`); class counts come from the data unless given."""
    return LDAM(class_counts, max_m, s, drw_epoch, beta)


class Focal:
    """Focal loss (Lin et al., 2017): mean of (1 - p_y)^gamma · CE, optional class weights."""

    soft_targets = False

    def __init__(self, gamma: float = 2.0, weight: Sequence[float] | None = None):
        if gamma < 0:
            raise ValueError(f"gamma must be >= 0, got {gamma}")
        self.gamma = gamma
        self.weight = _weights(weight)

    def __call__(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logp = F.log_softmax(logits.float(), dim=1).gather(1, targets[:, None]).squeeze(1)
        loss = -((1.0 - logp.exp()) ** self.gamma) * logp
        if self.weight is not None:
            self.weight = _on(self.weight, logits.device)
            loss = loss * self.weight[targets]
        return loss.mean()


def focal(gamma: float = 2.0, weight: Sequence[float] | None = None) -> Focal:
    """Focal loss for hard labels."""
    return Focal(gamma, weight)


LOSSES = {"cross_entropy": cross_entropy, "soft_target_cross_entropy": soft_target_cross_entropy,
          "ldam": ldam, "focal": focal}


def validation_loss(loss_fn: LossFn) -> LossFn:
    """The loss validation reports: the loss's `validation_loss` attribute, else itself. (Not
    `eval`: every nn.Module has an eval() method, which is no loss.)"""
    return getattr(loss_fn, "validation_loss", None) or loss_fn
