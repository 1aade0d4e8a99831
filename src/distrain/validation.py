"""Validation that cannot hang and whose numbers do not depend on the layout.

rank0:   rank 0 evaluates the whole set on the unwrapped model (no collective inside),
         the others wait for the broadcast of its metrics.
sharded: each rank evaluates a disjoint slice (no padding); the loss sum and the confusion
         matrix are all-reduced, so the result equals rank0's up to summation order.
Besides loss and accuracy: per-class recall, macro-F1 and balanced accuracy, from the
confusion matrix (rows: true class, columns: predicted class), for up to
MAX_CONFUSION_CLASSES classes. Sequence outputs (N, T, C) count one prediction per token.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import Dataset

from .backends import Backend
from .config import Config
from .data import val_indices, val_loader
from .losses import LossFn, per_token
from .precision import Precision


MAX_CONFUSION_CLASSES = 1024
"""Above this many classes (a language model's vocabulary) no confusion matrix is kept:
validation reports loss and accuracy only."""


@torch.no_grad()
def evaluate(model: nn.Module, loader, loss_fn: LossFn, precision: Precision,
             device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(sums, confusion) over `loader` in float64, so sums are order-robust: sums holds
    [loss × samples, samples, correct predictions, predictions] (a sequence sample makes
    one prediction per token); confusion is (true class × predicted class), or None."""
    was_training = model.training
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64, device=device)
    confusion = None
    for x, y in loader:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with precision.autocast():
            logits = model(x)
        loss = loss_fn(logits, y).double() * len(y)
        logits, labels = per_token(logits, y)
        classes = logits.shape[1]
        predicted = logits.argmax(1)
        # No host round trip per batch on a GPU: Python numbers are added as scalars (a
        # new_tensor would be a copy from pageable memory), and the confusion matrix counts
        # with index_add_ (CUDA's bincount reads the largest value back to size its output).
        sums[0] += loss
        sums[1] += len(y)
        sums[2] += (predicted == labels).sum()
        sums[3] += labels.numel()
        if classes <= MAX_CONFUSION_CLASSES:
            if confusion is None:
                confusion = torch.zeros(classes, classes, dtype=torch.float64, device=device)
            pairs = labels * classes + predicted
            counts = torch.ones_like(pairs, dtype=torch.float64)
            confusion.view(-1).index_add_(0, pairs, counts)  # whole numbers: exact in any order
    model.train(was_training)
    return sums, confusion


def metrics_from(sums: list[float], confusion: torch.Tensor | None) -> dict:
    """loss and acc from `sums` (see evaluate); per-class recall, macro-F1 and balanced
    accuracy when there is a confusion matrix."""
    loss_sum, samples, correct, predictions = sums
    metrics = {"loss": loss_sum / max(samples, 1), "acc": correct / max(predictions, 1)}
    if confusion is None or confusion.numel() == 0:
        return metrics
    confusion = confusion.double().cpu()
    hits = confusion.diag()
    support, predicted = confusion.sum(1), confusion.sum(0)
    recall = torch.where(support > 0, hits / support.clamp(min=1), torch.nan)
    f1 = 2 * hits / (support + predicted).clamp(min=1)  # = 2PR / (P + R)
    seen = (support + predicted) > 0  # like scikit-learn: labels in y_true or y_pred
    return {**metrics, "macro_f1": float(f1[seen].mean()) if seen.any() else 0.0,
            "balanced_acc": float(recall[support > 0].mean()) if (support > 0).any() else 0.0,
            "recall": [None if r != r else float(r) for r in recall.tolist()]}


def validate(cfg: Config, backend: Backend, model: nn.Module, dataset: Dataset, loss_fn: LossFn,
             precision: Precision, prefix: str = "val_") -> dict:
    """Metrics named `<prefix>loss`, `<prefix>acc`, … identical on every rank."""
    raw = backend.unwrap(model)
    sharded = cfg.validate.mode == "sharded"
    batch = cfg.data.val_batch_size or cfg.data.batch_size
    pin = backend.device.type == "cuda"
    if sharded:
        # Distribution: BatchNorm running stats drift apart per rank under DDP; use rank 0's.
        backend.broadcast_module(raw)
        idx = val_indices(len(dataset), backend.world_size, backend.rank, sharded=True)
        sums, confusion = evaluate(raw, val_loader(dataset, idx, batch, cfg.data, pin),
                                   loss_fn, precision, backend.device)
        # Distribution: agree on the class count (a rank may have an empty shard), then sum.
        classes = torch.tensor([0 if confusion is None else confusion.shape[0]],
                               device=backend.device)
        c = int(backend.all_reduce(classes, op="max"))
        packed = torch.zeros(4 + c * c, dtype=torch.float64, device=backend.device)
        packed[:4] = sums
        if confusion is not None:
            packed[4:] = confusion.flatten()
        backend.all_reduce(packed)
        metrics = metrics_from(packed[:4].tolist(), packed[4:].view(c, c) if c else None)
    else:
        metrics = None
        if backend.is_main:
            with backend.main_only("validation, validate.mode=rank0"):
                idx = val_indices(len(dataset), 1, 0, sharded=False)
                sums, confusion = evaluate(raw, val_loader(dataset, idx, batch, cfg.data, pin),
                                           loss_fn, precision, backend.device)
                metrics = metrics_from(sums.tolist(), confusion)
        metrics = backend.broadcast_object(metrics)  # Distribution: the others wait for rank 0
    return {prefix + k: v for k, v in metrics.items()}
