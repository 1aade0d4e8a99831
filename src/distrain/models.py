"""Built-in models. A user model is any `package.module:callable` returning an nn.Module."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class CosineLinear(nn.Module):
    """Logits as cosines between L2-normalised features and class weights (in [-1, 1]); the
    head LDAM was designed for, whose scale `s` then sets the logit range."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        nn.init.kaiming_uniform_(self.weight, a=5 ** 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x, dim=1) @ F.normalize(self.weight, dim=1).t()


def small_cnn(in_channels: int = 1, num_classes: int = 10, width: int = 32,
              batch_norm: bool = False, cosine_head: bool = False) -> nn.Module:
    """Three 3×3 convolutions, one 2×2 pooling, global average pooling, a linear head.
    Sized for small images such as the 8×8 digits; `batch_norm` adds BatchNorm2d layers,
    `cosine_head` replaces the linear head by CosineLinear (for LDAM)."""
    def block(cin: int, cout: int) -> list[nn.Module]:
        layers: list[nn.Module] = [nn.Conv2d(cin, cout, 3, padding=1, bias=not batch_norm)]
        if batch_norm:
            layers.append(nn.BatchNorm2d(cout))
        return layers + [nn.ReLU(inplace=True)]

    return nn.Sequential(
        *block(in_channels, width), *block(width, width), nn.MaxPool2d(2),
        *block(width, 2 * width), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        CosineLinear(2 * width, num_classes) if cosine_head else nn.Linear(2 * width, num_classes))


def mlp(in_features: int = 64, hidden: list[int] | tuple[int, ...] = (128,),
        num_classes: int = 10) -> nn.Module:
    """Flatten, then Linear+ReLU per entry of `hidden`, then a linear head."""
    layers: list[nn.Module] = [nn.Flatten()]
    width = in_features
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU(inplace=True)]
        width = h
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


MODELS = {"small_cnn": small_cnn, "mlp": mlp}
