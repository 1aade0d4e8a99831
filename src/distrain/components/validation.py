"""Validation that cannot hang and whose numbers do not depend on the layout.

rank0:   rank 0 evaluates the whole set on the unwrapped model (no collective inside),
         the others wait for the broadcast of its metrics.
sharded: each rank evaluates a disjoint slice (no padding); the loss sum and the confusion
         matrix are all-reduced, so the result equals rank0's up to summation order.
Besides loss and accuracy: per-class recall, macro-F1 and balanced accuracy, from the
confusion matrix (rows: true class, columns: predicted class), for up to
MAX_CONFUSION_CLASSES classes. Sequence outputs (N, T, C) count one prediction per token.
With a step function (train.step) validation reports its loss and its logs instead.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import Dataset

from distrain.components.data.datasets import to_device, val_batch_counts, val_indices, val_loader
from distrain.components.losses import LossFn, per_token, validation_loss
from distrain.components.metrics import UserMetrics
from distrain.components.precision import Precision
from distrain.components.step_fn import StepFn, batch_size_of, pair, split_output
from distrain.config import Config
from distrain.distributed import Backend

MAX_CONFUSION_CLASSES = 1024
"""Above this many classes (a language model's vocabulary) no confusion matrix is kept:
validation reports loss and accuracy only."""


def validates_sharded(cfg: Config, backend: Backend) -> bool:
    """Each rank a slice (validate.mode=sharded, or a forward that runs on every rank)."""
    return cfg.validate.mode == "sharded" or backend.forward_is_collective


@torch.no_grad()
def evaluate(model: nn.Module, loader, loss_fn: LossFn, precision: Precision,
             device: torch.device, step_fn: StepFn | None = None, step_name: str = "",
             user: UserMetrics | None = None, counted: int | None = None
             ) -> tuple[torch.Tensor, torch.Tensor | None, dict[str, torch.Tensor]]:
    """(sums, confusion, logs) over `loader` in float64, so sums are order-robust: sums holds
    [loss × samples, samples, correct predictions, predictions] (a sequence sample makes
    one prediction per token); confusion is (true class × predicted class), or None; logs
    the step function's named means × samples. `user` metrics see every batch's outputs.
    `counted`: only the first so many batches count; the rest run for their forward alone."""
    was_training = model.training
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64, device=device)
    confusion, logs = None, {}
    for i, batch in enumerate(loader):
        batch = to_device(batch, device)
        if counted is not None and i >= counted:  # Distribution: FSDP's forward is a collective
            with precision.autocast():
                step_fn(model, batch) if step_fn is not None else model(pair(batch)[0])
            continue
        if step_fn is not None:
            with precision.autocast():
                loss, named = split_output(step_fn(model, batch), step_name)
            n = batch_size_of(batch)
            sums[0] += loss.double() * n
            sums[1] += n
            for k, v in named.items():
                logs[k] = logs.get(k, 0.0) + torch.as_tensor(v, device=device).double() * n
            continue
        x, y = pair(batch)
        with precision.autocast():
            logits = model(x)
        if user:
            user.update(logits, y)
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
    return sums, confusion, logs


def metrics_from(sums: list[float], confusion: torch.Tensor | None,
                 logs: dict[str, float] | None = None) -> dict:
    """loss and acc from `sums` (see evaluate); per-class recall, macro-F1 and balanced
    accuracy when there is a confusion matrix (the names config.VAL_METRICS lists, which
    checkpoint.monitor accepts as val_<name>; tests/test_recipes.py holds them equal). With `logs` (a step function's): the loss
    and the logs' means instead."""
    loss_sum, samples, correct, predictions = sums
    if logs is not None:
        return {"loss": loss_sum / max(samples, 1),
                **{k: v / max(samples, 1) for k, v in logs.items()}}
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
             precision: Precision, prefix: str = "val_", step_fn: StepFn | None = None,
             step_name: str = "", user: UserMetrics | None = None) -> dict:
    """Metrics named `<prefix>loss`, `<prefix>acc`, … identical on every rank."""
    step = {"step_fn": step_fn, "step_name": step_name, "user": user}
    if user:
        user.begin()
    raw = backend.unwrap(model)
    # Distribution: an FSDP forward is a collective (it gathers each block's weights), so
    # every rank must run it: sharded validation.
    sharded = validates_sharded(cfg, backend)
    batch = cfg.data.val_batch_size or cfg.data.batch_size
    pin = backend.device.type == "cuda"
    if sharded:
        # Distribution: BatchNorm running stats drift apart per rank; use rank 0's.
        backend.broadcast_module(raw)
        idx = val_indices(len(dataset), backend.world_size, backend.rank, sharded=True)
        # Distribution: under FSDP every rank runs as many forwards as the rank with most.
        counts = val_batch_counts(len(dataset), backend.world_size, batch)
        pad = max(counts) if backend.forward_is_collective else 0
        sums, confusion, logs = evaluate(raw, val_loader(dataset, idx, batch, cfg.data, pin, pad),
                                         loss_fn, precision, backend.device,
                                         counted=counts[backend.rank], **step)
        names = None
        if step_fn is not None:  # Distribution: a rank with an empty shard has no logs
            names = sorted(set().union(*backend.all_gather_object(sorted(logs))))
            logs = torch.stack([logs.get(k, torch.zeros((), dtype=torch.float64,
                                                        device=backend.device))
                                for k in names]) if names else None
        # Distribution: agree on the class count (a rank may have an empty shard), then sum.
        classes = torch.tensor([0 if confusion is None else confusion.shape[0]],
                               device=backend.device)
        c = int(backend.all_reduce(classes, op="max"))
        n = len(names or [])
        packed = torch.zeros(4 + n + c * c, dtype=torch.float64, device=backend.device)
        packed[:4] = sums
        if n:
            packed[4:4 + n] = logs
        if confusion is not None:
            packed[4 + n:] = confusion.flatten()
        backend.all_reduce(packed)
        named = None if names is None else dict(zip(names, packed[4:4 + n].tolist()))
        metrics = metrics_from(packed[:4].tolist(), packed[4 + n:].view(c, c) if c else None,
                               named)
        if user:  # Distribution: every rank's part, in rank order (the data set's order)
            metrics.update(user.finish(backend.all_gather_object(user.local()), packed[1].item()))
    else:
        metrics = None
        if backend.is_main:
            with backend.main_only("validation, validate.mode=rank0"):
                idx = val_indices(len(dataset), 1, 0, sharded=False)
                loader = val_loader(dataset, idx, batch, cfg.data, pin)
                sums, confusion, logs = evaluate(raw, loader, loss_fn, precision,
                                                 backend.device, **step)
                named = None if step_fn is None else {k: float(v) for k, v in logs.items()}
                metrics = metrics_from(sums.tolist(), confusion, named)
                if user:
                    metrics.update(user.finish([user.local()], sums[1].item()))
        metrics = backend.broadcast_object(metrics)  # Distribution: the others wait for rank 0
    return {prefix + k: v for k, v in metrics.items()}


def validate_model(cfg: Config, backend: Backend, model: nn.Module, val_set: Dataset,
                   val_sets: dict[str, Dataset], loss_fn: LossFn, precision: Precision,
                   step_fn: StepFn | None = None, user: UserMetrics | None = None,
                   ema=None) -> dict:
    """What training reports after an epoch (and `distrain evaluate` of a checkpoint):
    `val_*` of `val_set`, `val_<name>_*` of each of validate.sets, `val_ema_*` of the EMA
    (an `EMA` or a `ShardedEMA`) when given."""
    args = (val_set, validation_loss(loss_fn), precision)
    step = {"step_fn": step_fn, "step_name": cfg.train.step, "user": user}
    metrics = validate(cfg, backend, model, *args, **step)
    for name, dataset in val_sets.items():
        metrics.update(validate(cfg, backend, model, dataset, *args[1:], prefix=f"val_{name}_",
                                **step))
    if ema is not None:
        with ema.weights(backend.unwrap(model)) as averaged:
            metrics.update(validate(cfg, backend, averaged, *args, prefix="val_ema_", **step))
    return metrics


class Validator:
    """A run's validation: what it measures (validate_model over the validation sets, and
    the EMA's weights when kept) and when (`due`: validate.every_epochs, every_steps)."""

    def __init__(self, cfg: Config, backend: Backend, val_set: Dataset,
                 val_sets: dict[str, Dataset], loss_fn: LossFn, precision: Precision,
                 step_fn: StepFn | None, user: UserMetrics | None, ema=None) -> None:
        self.cfg, self.backend = cfg, backend
        self.args = (val_set, val_sets, loss_fn, precision, step_fn, user, ema)
        self.every_epochs, self.every_steps = cfg.validate.every_epochs, \
            cfg.validate.every_steps

    def due(self, step: int, mid_epoch: bool) -> bool:
        """After optimizer step `step`: validate.every_steps, leaving an epoch's last step
        to the epoch's end."""
        return bool(self.every_steps) and step % self.every_steps == 0 and mid_epoch

    def due_at_epoch_end(self, epochs_done: int) -> bool:
        return epochs_done % self.every_epochs == 0 or epochs_done == self.cfg.train.epochs

    def __call__(self, model: nn.Module) -> dict:
        return validate_model(self.cfg, self.backend, model, *self.args)
