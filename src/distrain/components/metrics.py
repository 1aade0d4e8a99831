"""validate.metrics: your own validation metrics, exact under sharded validation.

A metric is either
  a function  fn(outputs, targets) -> the batch's mean (a number or 0-dim tensor): weighted
              by the batch's samples and summed over all ranks, like the loss; or
  an object   with update(outputs, targets) and compute() (torchmetrics' shape): every
              rank's outputs and targets are gathered, in the data set's order, and one
              fresh copy is updated once with all of them, so a metric that is no mean of
              per-sample values (F1, AUC) is exact too.
Each is reported as `val_<name>` (and `val_ema_<name>`), usable as `checkpoint.monitor`.
"""

from __future__ import annotations

import copy
import inspect
from typing import Any

import torch

from distrain.components.registry import call_plugin, check_args, plugin_entry, resolve
from distrain.errors import ConfigError


class UserMetrics:
    def __init__(self, spec: dict) -> None:
        self.functions: dict[str, Any] = {}
        self.objects: dict[str, Any] = {}
        for name, entry in spec.items():
            key = f"validate.metrics.{name}"
            path, args = plugin_entry(key, entry)
            fn = resolve("validate.metrics", path, {}, key=key)
            if args or inspect.isclass(fn):  # a factory: its result is the metric
                check_args(key, fn, args)
                made = call_plugin(key, path, fn, **args)
            else:
                made = fn
            if hasattr(made, "update") and hasattr(made, "compute"):
                self.objects[name] = made
            elif callable(made):
                self.functions[name] = made
            else:
                raise ConfigError(f"{key}: {path} gave {type(made).__name__}; expected a function "
                                  "of (outputs, targets) or an object with update/compute")
        self.begin()

    def __bool__(self) -> bool:
        return bool(self.functions or self.objects)

    def begin(self) -> None:
        """Start a validation pass."""
        self._sums = {name: 0.0 for name in self.functions}
        self._outputs: list[torch.Tensor] = []
        self._targets: list[torch.Tensor] = []

    def update(self, outputs: torch.Tensor, targets: torch.Tensor) -> None:
        n = len(targets)
        for name, fn in self.functions.items():
            value = call_plugin(f"validate.metrics.{name}", name, fn, outputs, targets)
            self._sums[name] = self._sums[name] + torch.as_tensor(value).double() * n
        if self.objects:
            self._outputs.append(outputs.detach().float().cpu())
            self._targets.append(targets.detach().cpu())

    def local(self) -> dict:
        """This rank's part (picklable): the functions' sums and the outputs to gather."""
        return {"sums": {k: float(v) for k, v in self._sums.items()},
                "outputs": torch.cat(self._outputs) if self._outputs else None,
                "targets": torch.cat(self._targets) if self._targets else None}

    def finish(self, parts: list[dict], samples: float) -> dict[str, float]:
        """The metrics from every rank's part, in rank order (the data set's order)."""
        out = {name: sum(p["sums"][name] for p in parts) / max(samples, 1)
               for name in self.functions}
        if self.objects:
            outputs = torch.cat([p["outputs"] for p in parts if p["outputs"] is not None])
            targets = torch.cat([p["targets"] for p in parts if p["targets"] is not None])
            for name, metric in self.objects.items():
                fresh = copy.deepcopy(metric)
                key = f"validate.metrics.{name}"
                call_plugin(key, name, fresh.update, outputs, targets)
                out[name] = float(call_plugin(key, name, fresh.compute))
        return out
