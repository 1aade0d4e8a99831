"""The epoch's training metrics as sums on the device: loss × samples, correct predictions,
samples, and each step-function log × samples. Added per micro-batch without a device sync,
all-reduced once at the epoch's end; a mid-epoch checkpoint keeps each rank's."""

from __future__ import annotations

import torch

from distrain.components.step_fn import log_values
from distrain.distributed import Backend


class EpochSums:
    """This rank's sums of the current epoch (`values`), and the logs' names (`names`)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.names: list[str] = []  # the step function's logs, summed like the loss
        self.values = self.zeros()

    def zeros(self) -> torch.Tensor:
        return torch.zeros(3 + len(self.names), dtype=torch.float64, device=self.device)

    def reset(self) -> None:
        self.values = self.zeros()

    def set(self, values: list[float]) -> None:
        self.values = torch.tensor(values, dtype=torch.float64, device=self.device)

    def add(self, count: int, loss: torch.Tensor, correct: torch.Tensor | None,
            logs: dict) -> None:
        """One micro-batch of `count` samples (0: a placeholder, counted in nothing)."""
        if logs and not self.names:  # the first call names them (the same on every rank)
            self.names = sorted(logs)
            self.values = torch.cat([self.values[:3], self.values.new_zeros(len(self.names))])
        values = log_values(logs, self.names, self.device) if logs or self.names else None
        if not count:  # a placeholder micro-batch: in the allreduce, not in the metrics
            return
        sums = self.values
        sums[0] += loss.detach().double() * count
        if correct is not None:
            sums[1] += correct.double()
        sums[2] += count  # a scalar argument: no host-to-device copy, no sync
        if values is not None and len(values):
            sums[3:] += values * count

    def totals(self, backend: Backend, accuracy: bool) -> dict[str, float]:
        """The epoch's means over every rank (a collective): train_loss, train_acc (when
        `accuracy`), train_<log>."""
        backend.all_reduce(self.values)  # Distribution: epoch totals over all ranks
        loss_sum, correct, count, *logged = self.values.tolist()
        metrics = {"train_loss": loss_sum / count}
        if accuracy:
            metrics["train_acc"] = correct / count
        metrics.update({f"train_{k}": v / count for k, v in zip(self.names, logged)})
        return metrics
