"""Data-set plugins that inject faults, for the fault tests (`data.name=faulty:...`)."""

import os
import signal
from pathlib import Path

from torch.utils.data import Dataset

from distrain.data import digits


class KillOnce(Dataset):
    """Digits that SIGKILL their own process at the n-th sample fetched on one rank, once
    (a marker file remembers it), like a node lost mid-epoch."""

    def __init__(self, inner, rank: int, after: int, marker: str) -> None:
        self.inner, self.rank, self.after, self.marker = inner, rank, after, Path(marker)
        self.targets = inner.targets
        self.fetched = 0

    def __len__(self) -> int:
        return len(self.inner)

    def __getitem__(self, index):
        self.fetched += 1
        if (self.fetched == self.after and int(os.environ.get("RANK", "0")) == self.rank
                and not self.marker.exists()):
            self.marker.touch()
            os.kill(os.getpid(), signal.SIGKILL)
        return self.inner[index]


def killing_digits(kill_rank: int, kill_after: int, marker: str):
    train, val = digits()
    return KillOnce(train, kill_rank, kill_after, marker), val


class SignalOnce(Dataset):
    """Digits that send a signal to their launcher (the parent process: torchrun's agent) or to
    themselves at the n-th sample fetched on rank 0, once, like a scheduler preempting the job."""

    def __init__(self, inner, after: int, marker: str, signum: int, to_self: bool) -> None:
        self.inner, self.after, self.marker = inner, after, Path(marker)
        self.signum, self.to_self = signum, to_self
        self.targets = inner.targets
        self.fetched = 0

    def __len__(self) -> int:
        return len(self.inner)

    def __getitem__(self, index):
        self.fetched += 1
        if (self.fetched == self.after and int(os.environ.get("RANK", "0")) == 0
                and not self.marker.exists()):
            self.marker.touch()
            os.kill(os.getpid() if self.to_self else os.getppid(), self.signum)
        return self.inner[index]


def preempting_digits(after: int, marker: str, signum: int = signal.SIGTERM, to_self: bool = False):
    train, val = digits()
    return SignalOnce(train, after, marker, signum, to_self), val
