"""Code shaped like our users' code, named in test configs as `user_code:...` (tests/ is on
the path of every test process): an nn.Module loss with a buffer, a data set without a
`targets` attribute, plugins that raise, metrics as functions and as update/compute objects.
(Dict batches, a dict-returning model and a step function: examples/dict_batches.py.)"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

# The LDAM loss of examples/plain_loop.py, an nn.Module as our users' scripts write it.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from plain_loop import LDAMLoss  # noqa: E402


def ldam_module(class_counts, max_m=0.5, s=30.0):
    return LDAMLoss(class_counts, max_m, s)


class NoTargets(torch.utils.data.Dataset):
    """(input, label) pairs behind a plain __getitem__: no `targets` attribute."""

    def __init__(self, inner):
        self.inner = inner

    def __len__(self):
        return len(self.inner)

    def __getitem__(self, i):
        return self.inner[i]


def digits_longtail_without_targets(imbalance_ratio: float = 20.0):
    from distrain.components.data.datasets import digits_longtail

    train, val = digits_longtail(imbalance_ratio)
    return NoTargets(train), NoTargets(val)


def broken_loss(message: str = "no such class weights file"):
    """A loss plugin whose constructor raises."""
    raise FileNotFoundError(message)


class FailsOnRankOne(nn.Module):
    """A loss that raises at its first call on rank 1 only (say, a file missing on one node)."""

    def forward(self, logits, target):
        import os

        if os.environ.get("RANK", os.environ.get("HOROVOD_RANK")) == "1":
            raise KeyError("class 7 has no weight on this node")
        return F.cross_entropy(logits.float(), target)


def fails_on_rank_one():
    return FailsOnRankOne()


def top1(outputs, targets):
    """A function metric: the batch's mean."""
    return (outputs.argmax(1) == targets).float().mean()


class MacroRecall:
    """An object metric (torchmetrics' shape): mean recall over the classes seen."""

    def __init__(self, num_classes: int = 10):
        self.confusion = torch.zeros(num_classes, num_classes, dtype=torch.float64)

    def update(self, outputs, targets):
        c = self.confusion.shape[0]
        pairs = targets * c + outputs.argmax(1)
        self.confusion.view(-1).index_add_(0, pairs, torch.ones(len(pairs), dtype=torch.float64))

    def compute(self):
        support = self.confusion.sum(1)
        return (self.confusion.diag()[support > 0] / support[support > 0]).mean()


def digits_validation_again():
    from distrain.components.data.datasets import digits

    return digits()[1]


class _Pause(torch.autograd.Function):
    """Identity; its backward sleeps 0-3 ms, drawn from the OS (no seeded stream moves)."""

    pace = __import__("random").SystemRandom()

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        import time

        time.sleep(_Pause.pace.uniform(0, 0.003))
        return grad


class UnevenPaceMLP(nn.Module):
    """An MLP whose backward pauses before each layer's gradients, as a busy node's would: the
    gradients become ready at other moments on every rank and in every run."""

    def __init__(self, in_features: int, hidden: list[int], num_classes: int) -> None:
        super().__init__()
        sizes = [in_features, *hidden, num_classes]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes, sizes[1:]))

    def forward(self, x):
        x = x.flatten(1)
        for i, layer in enumerate(self.layers):
            x = layer(_Pause.apply(x))
            x = torch.relu(x) if i < len(self.layers) - 1 else x
        return x


def uneven_pace_mlp(in_features: int = 64, hidden: list[int] = (256, 256), num_classes: int = 10):
    return UnevenPaceMLP(in_features, list(hidden), num_classes)
