"""A complete example of bringing your own model, data set and loss to distrain.

    PYTHONPATH=examples distrain train --config configs/my_project.yaml
    PYTHONPATH=examples torchrun --nproc-per-node 2 -m distrain train --config configs/my_project.yaml

Each function is named in the YAML as `module:function` and called with the YAML's `args`
(checked against its signature, so a misspelled argument is a config error naming the key).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import Dataset


class Rings(Dataset):
    """Points on noisy concentric rings in 2-D; the class is the ring. A `targets` tensor lets
    distrain count classes (for ldam) without loading samples."""

    def __init__(self, n: int, rings: int, noise: float, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.targets = torch.randint(0, rings, (n,), generator=g)
        angle = torch.rand(n, generator=g) * 2 * torch.pi
        radius = 1.0 + self.targets.float() + noise * torch.randn(n, generator=g)
        self.points = torch.stack([radius * angle.cos(), radius * angle.sin()], dim=1)

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.points[i], self.targets[i]


def rings(n_train: int = 4000, n_val: int = 1000, rings: int = 3, noise: float = 0.15):
    """data.name: my_project:rings -> (train, validation)."""
    return Rings(n_train, rings, noise, seed=0), Rings(n_val, rings, noise, seed=1)


def ring_net(hidden: int = 64, classes: int = 3) -> nn.Module:
    """model.name: my_project:ring_net -> an nn.Module (same initial weights on every rank:
    distrain seeds before building it)."""
    return nn.Sequential(nn.Linear(2, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                         nn.Linear(hidden, classes))


def smoothed_ce(smoothing: float = 0.05):
    """loss.name: my_project:smoothed_ce -> loss(logits, targets) returning a scalar."""
    def loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(logits.float(), targets, label_smoothing=smoothing)
    return loss
