"""Mixup (Zhang et al., 2018) and CutMix (Yun et al., 2019), per micro-batch on the device.

Written here rather than taken from timm. With torch 2.14.1, timm 1.0.31 and torchvision
0.29.1 install and run (11 MB of wheels), but timm's Mixup (measured 2026-12-02) asserts an
even batch ("Batch size should be even"), which an epoch's short last micro-batch is not in
general; it returns soft targets only, so a hard-label loss (LDAM, focal) cannot take the
paper's lam·loss(y_a) + (1 - lam)·loss(y_b) as it does here; and it pairs each sample with
its mirror in the micro-batch (x.flip(0)) rather than a drawn permutation. Random draws here
use torch's generator, which the loop seeds per (run seed, epoch, rank), so a run is
reproducible and resumable.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from distrain.components.losses import LossFn
from distrain.config import AugmentConfig


@dataclass
class Mixed:
    """Targets of a mixed batch: sample i is lam·(x_i, y_a_i) + (1 - lam)·(x_j, y_b_i)."""

    y_a: torch.Tensor
    y_b: torch.Tensor
    lam: float

    def dominant(self) -> torch.Tensor:
        """The label with the larger share, for train accuracy under mixing."""
        return self.y_a if self.lam >= 0.5 else self.y_b

    def soft(self, num_classes: int, smoothing: float = 0.0) -> torch.Tensor:
        off = smoothing / num_classes
        on = 1.0 - smoothing + off
        a = F.one_hot(self.y_a, num_classes).float() * (on - off) + off
        b = F.one_hot(self.y_b, num_classes).float() * (on - off) + off
        return self.lam * a + (1.0 - self.lam) * b


def compute_loss(loss_fn: LossFn, logits: torch.Tensor, targets: torch.Tensor | Mixed,
                 smoothing: float = 0.0) -> torch.Tensor:
    """The loss of a plain or mixed batch: soft-target losses get the mixed label vectors,
    hard-label losses the paper's lam·loss(y_a) + (1 - lam)·loss(y_b)."""
    if not isinstance(targets, Mixed):
        return loss_fn(logits, targets)
    if getattr(loss_fn, "soft_targets", False):
        return loss_fn(logits, targets.soft(logits.shape[1], smoothing))
    return targets.lam * loss_fn(logits, targets.y_a) + (1.0 - targets.lam) * loss_fn(logits, targets.y_b)


def hard_labels(targets: torch.Tensor | Mixed) -> torch.Tensor:
    return targets.dominant() if isinstance(targets, Mixed) else targets


def cutmix_box(height: int, width: int, lam: float) -> tuple[int, int, int, int]:
    """A box of about (1 - lam) of the image, centred uniformly, clipped to the image."""
    ratio = math.sqrt(1.0 - lam)
    cut_h, cut_w = int(height * ratio), int(width * ratio)
    cy = int(torch.randint(height, (1,)))
    cx = int(torch.randint(width, (1,)))
    y0, y1 = max(cy - cut_h // 2, 0), min(cy + cut_h // 2, height)
    x0, x1 = max(cx - cut_w // 2, 0), min(cx + cut_w // 2, width)
    return y0, y1, x0, x1


class Mixer:
    def __init__(self, cfg: AugmentConfig) -> None:
        self.cfg = cfg
        self.enabled = cfg.mixup_alpha > 0 or cfg.cutmix_alpha > 0

    def _beta(self, alpha: float) -> float:
        return float(torch.distributions.Beta(alpha, alpha).sample())

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | Mixed]:
        cfg = self.cfg
        if not self.enabled or float(torch.rand(())) >= cfg.prob or len(y) < 2:
            return x, y
        use_cutmix = cfg.cutmix_alpha > 0 and (
            cfg.mixup_alpha <= 0 or float(torch.rand(())) < cfg.switch_prob)
        perm = torch.randperm(len(y))  # the CPU generator, seeded per (seed, epoch, rank)
        if x.device.type == "cuda":  # pinned: a pageable copy would wait for the queued work
            perm = perm.pin_memory()
        perm = perm.to(x.device, non_blocking=True)
        if use_cutmix:
            lam = self._beta(cfg.cutmix_alpha)
            y0, y1, x0, x1 = cutmix_box(x.shape[-2], x.shape[-1], lam)
            x = x.clone()
            x[..., y0:y1, x0:x1] = x[perm][..., y0:y1, x0:x1]
            lam = 1.0 - (y1 - y0) * (x1 - x0) / (x.shape[-2] * x.shape[-1])  # the pasted share
        else:
            lam = self._beta(cfg.mixup_alpha)
            x = lam * x + (1.0 - lam) * x[perm]
        return x, Mixed(y, y[perm], lam)
