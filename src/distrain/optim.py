"""Optimizers by name, with the linear learning-rate scaling rule."""

from __future__ import annotations

import torch
from torch import nn

from .config import Config
from .registry import build


def sgd(params, lr: float, momentum: float = 0.9, weight_decay: float = 0.0, nesterov: bool = False,
        dampening: float = 0.0) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay,
                           nesterov=nesterov, dampening=dampening)


def adam(params, lr: float, momentum: float = 0.9, weight_decay: float = 0.0,
         betas: tuple[float, float] | list[float] | None = None, eps: float = 1e-8
         ) -> torch.optim.Optimizer:
    """Adam; `momentum` is beta1 unless `betas` is given."""
    return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay, eps=eps,
                            betas=tuple(betas) if betas else (momentum, 0.999))


def adamw(params, lr: float, momentum: float = 0.9, weight_decay: float = 0.01,
          betas: tuple[float, float] | list[float] | None = None, eps: float = 1e-8
          ) -> torch.optim.Optimizer:
    """AdamW (decoupled weight decay); `momentum` is beta1 unless `betas` is given."""
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, eps=eps,
                             betas=tuple(betas) if betas else (momentum, 0.999))


OPTIMIZERS = {"sgd": sgd, "adam": adam, "adamw": adamw}


def effective_lr(cfg: Config, world_size: int) -> float:
    if cfg.optimizer.scale_lr == "linear":
        return cfg.optimizer.lr * world_size * cfg.train.grad_accum_steps
    return cfg.optimizer.lr


def build_optimizer(cfg: Config, model: nn.Module, world_size: int) -> torch.optim.Optimizer:
    oc = cfg.optimizer
    lr = effective_lr(cfg, world_size)
    if oc.name in OPTIMIZERS:
        args = {"momentum": oc.momentum, "weight_decay": oc.weight_decay, **oc.args}
    else:  # a user optimizer gets lr and its own args; momentum/weight_decay only via args
        args = dict(oc.args)
    return build("optimizer", oc.name, {"lr": lr, **args}, OPTIMIZERS, model.parameters(),
                 positional_names=("params",))
