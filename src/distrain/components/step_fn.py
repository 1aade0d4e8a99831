"""`train.step`: a user's function for one micro-batch, for batches of any structure.

    def step(model, batch):            # batch: tensors, tuples, lists, dicts, nested
        out = model(**batch)           # e.g. a model returning {"loss", "logits"}
        acc = (out["logits"].argmax(-1) == batch["labels"]).float().mean()
        return out["loss"], {"acc": acc}

It runs inside autocast, in training (on the wrapped model) and in validation (on the plain
model, without gradients). It returns the micro-batch's mean loss, a scalar tensor, or
`(loss, logs)` with `logs` named per-batch means; those are weighted by the batch's samples
and reduced over all ranks exactly like the loss, and reported as `train_<name>` and
`val_<name>` (a `checkpoint.monitor` may name them). Without `train.step` a batch must be
`(inputs, targets)` and the loss is `loss(model(inputs), targets)`.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from distrain.components.registry import resolve
from distrain.errors import ConfigError

StepFn = Callable[[torch.nn.Module, Any], Any]


def build_step(name: str) -> StepFn | None:
    """The callable `train.step` names, or None when it is empty."""
    return resolve("train", name, {}, key="train.step") if name else None


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {tuple(value.shape)}"
    if isinstance(value, dict):
        return f"a dict (keys {', '.join(map(str, value))})"
    return f"a {type(value).__name__}"


def split_output(out: Any, name: str) -> tuple[torch.Tensor, dict[str, Any]]:
    """(loss, logs) from what the step function returned; a ConfigError naming train.step
    when it is neither a scalar tensor nor (scalar tensor, dict)."""
    loss, logs = out if isinstance(out, tuple) and len(out) == 2 else (out, {})
    if not (isinstance(loss, torch.Tensor) and loss.dim() == 0 and isinstance(logs, dict)):
        raise ConfigError(f"train.step: {name} returned {_describe(out)}; expected the "
                          "micro-batch's mean loss (a scalar tensor) or (loss, {name: "
                          "per-batch mean, ...})")
    return loss, logs


def log_values(logs: dict[str, Any], names: list[str], device: torch.device) -> torch.Tensor:
    """The logs as one float64 vector in the order of `names` (every call must return the
    same names: they are summed across ranks position by position)."""
    if sorted(logs) != names:
        raise ConfigError(f"train.step: returned logs {sorted(logs)} after {names}; return "
                          "the same names at every call")
    return torch.stack([torch.as_tensor(logs[k], device=device).detach().double().reshape(())
                        for k in names]) if names else torch.zeros(0, dtype=torch.float64,
                                                                   device=device)


def pair(batch: Any) -> tuple[Any, Any]:
    """(inputs, targets) of a batch, or a ConfigError saying that train.step is needed."""
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return batch[0], batch[1]
    raise ConfigError(f"train.step: the data set's batches are {_describe(batch)}, not "
                      "(inputs, targets); give train.step=package.module:fn, called as "
                      "fn(model, batch) and returning the batch's mean loss (see "
                      "examples/dict_batches.py)")


def batch_size_of(batch: Any) -> int:
    """Samples in a batch: the length of its first tensor."""
    if isinstance(batch, torch.Tensor):
        return len(batch)
    items = batch.values() if isinstance(batch, dict) else batch
    for item in items:
        n = batch_size_of(item) if isinstance(item, (torch.Tensor, dict, list, tuple)) else 0
        if n:
            return n
    return 0
