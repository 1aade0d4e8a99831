"""Data-set plugins that inject faults, for the fault tests (`data.name=faulty:...`)."""

import os
import signal
from pathlib import Path
from typing import Callable

from torch.utils.data import Dataset

from distrain.data import digits


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
        if (self.fetched == self.after and int(os.environ.get("RANK", "0")) == self.rank
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
