"""Data-set plugins that inject faults, for the fault tests (`data.name=faulty:...`)."""

import os
import signal
from pathlib import Path
from typing import Callable

from torch.utils.data import Dataset

from distrain.components.data.datasets import digits


def launcher_rank() -> int:
    return int(os.environ.get("RANK", os.environ.get("HOROVOD_RANK", "0")))


class FaultOnce(Dataset):
    """Digits that run `fault()` at the n-th sample fetched on one rank, once (a marker file
    remembers it across relaunches)."""

    def __init__(self, inner, rank: int, after: int, marker: str, fault: Callable[[], None]):
        self.inner, self.rank, self.after, self.marker = inner, rank, after, Path(marker)
        self.fault = fault
        self.targets = inner.targets
        self.fetched = 0

    def __len__(self) -> int:
        return len(self.inner)

    def __getitem__(self, index):
        self.fetched += 1
        if (self.fetched == self.after and launcher_rank() == self.rank
                and not self.marker.exists()):
            self.marker.touch()
            self.fault()
        return self.inner[index]


def killing_digits(kill_rank: int, kill_after: int, marker: str):
    """SIGKILL this rank's process: a node lost mid-epoch."""
    train, val = digits()
    return FaultOnce(train, kill_rank, kill_after, marker,
                     lambda: os.kill(os.getpid(), signal.SIGKILL)), val


def preempting_digits(after: int, marker: str, signum: int = signal.SIGTERM, to_self: bool = False):
    """Rank 0 signals its launcher (the parent: torchrun's agent) or itself: a preemption."""
    train, val = digits()
    return FaultOnce(train, 0, after, marker,
                     lambda: os.kill(os.getpid() if to_self else os.getppid(), signum)), val


def blocking_digits(rank: int, after: int, marker: str):
    """This rank blocks forever in its data set: a hung file system or a dead data service."""
    import threading

    train, val = digits()
    return FaultOnce(train, rank, after, marker, lambda: threading.Event().wait()), val


def collective_in_eval_mlp(in_features: int = 64, hidden: tuple = (32,), num_classes: int = 10):
    """An MLP whose eval-mode forward averages its logits over the ranks: fine when every rank
    evaluates, a hang when rank 0 validates alone (validate.mode=rank0)."""
    import torch.distributed as dist
    from torch import nn

    from distrain.components.models import mlp

    class Averaging(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = mlp(in_features, hidden, num_classes)

        def forward(self, x):
            out = self.inner(x)
            if not self.training and dist.is_initialized():
                dist.all_reduce(out)
                out = out / dist.get_world_size()
            return out

    return Averaging()


def marking_digits(after: int, marker: str, pause_s: float = 3.0):
    """Rank 0 creates `marker` at its n-th sample (a host discovery script reads it), then
    pauses long enough for horovodrun's discovery (polled every second) to see it."""
    import time

    train, val = digits()
    return FaultOnce(train, 0, after, marker, lambda: time.sleep(pause_s)), val


def slow_digits(delay_s: float = 0.002):
    """Digits whose every sample costs `delay_s` to load: a data-bound loop."""
    import time

    from torch.utils.data import Dataset as _Dataset

    train, val = digits()

    class Slow(_Dataset):
        targets = train.targets

        def __len__(self) -> int:
            return len(train)

        def __getitem__(self, i):
            time.sleep(delay_s)
            return train[i]

    return Slow(), val
