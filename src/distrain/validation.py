"""Validation that cannot hang and whose numbers do not depend on the layout.

rank0:   rank 0 evaluates the whole set on the unwrapped model (no collective inside),
         the others wait at the broadcast of the result.
sharded: each rank evaluates a disjoint slice (no padding), sums and counts are
         all-reduced, so the result equals rank0's up to summation order.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import Dataset

from .backends import Backend
from .config import Config
from .data import val_indices, val_loader
from .losses import LossFn
from .precision import Precision


@torch.no_grad()
def evaluate(model: nn.Module, loader, loss_fn: LossFn, precision: Precision,
             device: torch.device) -> torch.Tensor:
    """[loss sum, correct, count] over `loader`, in float64 so sums are order-robust."""
    was_training = model.training
    model.eval()
    sums = torch.zeros(3, dtype=torch.float64, device=device)
    for x, y in loader:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with precision.autocast():
            logits = model(x)
        loss = loss_fn(logits, y)
        sums += torch.stack([loss.double() * len(y), (logits.argmax(1) == y).sum().double(),
                             torch.tensor(float(len(y)), dtype=torch.float64, device=device)])
    model.train(was_training)
    return sums


def validate(cfg: Config, backend: Backend, model: nn.Module, dataset: Dataset, loss_fn: LossFn,
             precision: Precision) -> dict[str, float]:
    """val_loss and val_acc, identical on every rank."""
    raw = backend.unwrap(model)
    sharded = cfg.validate.mode == "sharded"
    batch = cfg.data.val_batch_size or cfg.data.batch_size
    pin = backend.device.type == "cuda"
    if sharded:
        # Distribution: BatchNorm running stats drift apart per rank under DDP; use rank 0's.
        backend.broadcast_module(raw)
        idx = val_indices(len(dataset), backend.world_size, backend.rank, sharded=True)
        sums = evaluate(raw, val_loader(dataset, idx, batch, cfg.data, pin), loss_fn, precision,
                        backend.device)
        backend.all_reduce(sums)  # Distribution: exact global sums and counts
    else:
        sums = torch.zeros(3, dtype=torch.float64, device=backend.device)
        if backend.is_main:
            idx = val_indices(len(dataset), 1, 0, sharded=False)
            sums = evaluate(raw, val_loader(dataset, idx, batch, cfg.data, pin), loss_fn,
                            precision, backend.device)
        backend.broadcast(sums, src=0)  # Distribution: the other ranks wait here for rank 0
    loss_sum, correct, count = sums.tolist()
    return {"val_loss": loss_sum / max(count, 1), "val_acc": correct / max(count, 1)}
