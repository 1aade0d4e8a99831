"""Built-in models. A user model is any `package.module:callable` returning an nn.Module."""

from __future__ import annotations

from torch import nn


def small_cnn(in_channels: int = 1, num_classes: int = 10, width: int = 32,
              batch_norm: bool = False) -> nn.Module:
    """Three 3×3 convolutions, one 2×2 pooling, global average pooling, a linear head.
    Sized for small images such as the 8×8 digits; `batch_norm` adds BatchNorm2d layers."""
    def block(cin: int, cout: int) -> list[nn.Module]:
        layers: list[nn.Module] = [nn.Conv2d(cin, cout, 3, padding=1, bias=not batch_norm)]
        if batch_norm:
            layers.append(nn.BatchNorm2d(cout))
        return layers + [nn.ReLU(inplace=True)]

    return nn.Sequential(
        *block(in_channels, width), *block(width, width), nn.MaxPool2d(2),
        *block(width, 2 * width), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(2 * width, num_classes))


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
