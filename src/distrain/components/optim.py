"""Optimizers by name, with the linear learning-rate scaling rule.

On CUDA, adam and adamw use PyTorch's fused kernels (`fused=True`, unless the optimizer's
args say otherwise): one launch per step instead of a Python loop of foreach calls (the
README's GPU section has the measured host time), and they take a NaN/inf skip on the device (`found_inf`), so the host never waits for the check
(precision.py)."""

from __future__ import annotations

import torch
from torch import nn

from distrain.components.registry import build
from distrain.config import Config
from distrain.errors import ConfigError


def sgd(params, lr: float, momentum: float = 0.9, weight_decay: float = 0.0, nesterov: bool = False,
        dampening: float = 0.0, fused: bool | None = None) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay,
                           nesterov=nesterov, dampening=dampening, fused=fused)


def adam(params, lr: float, momentum: float = 0.9, weight_decay: float = 0.0,
         betas: tuple[float, float] | list[float] | None = None, eps: float = 1e-8,
         fused: bool | None = None) -> torch.optim.Optimizer:
    """Adam; `momentum` is beta1 unless `betas` is given."""
    return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay, eps=eps, fused=fused,
                            betas=tuple(betas) if betas else (momentum, 0.999))


def adamw(params, lr: float, momentum: float = 0.9, weight_decay: float = 0.01,
          betas: tuple[float, float] | list[float] | None = None, eps: float = 1e-8,
          fused: bool | None = None) -> torch.optim.Optimizer:
    """AdamW (decoupled weight decay); `momentum` is beta1 unless `betas` is given."""
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, eps=eps, fused=fused,
                             betas=tuple(betas) if betas else (momentum, 0.999))


OPTIMIZERS = {"sgd": sgd, "adam": adam, "adamw": adamw}


def effective_lr(cfg: Config, world_size: int) -> float:
    if cfg.optimizer.scale_lr == "linear":
        return cfg.optimizer.lr * world_size * cfg.train.grad_accum_steps
    return cfg.optimizer.lr


def build_optimizer(cfg: Config, model: nn.Module, world_size: int, fuse: bool = True
                    ) -> torch.optim.Optimizer:
    """`fuse`: allow fused kernels when every parameter is on CUDA (see the module docstring)."""
    oc = cfg.optimizer
    lr = effective_lr(cfg, world_size)
    if oc.name in OPTIMIZERS:
        on_cuda = all(p.device.type == "cuda" for p in model.parameters())
        fused = True if fuse and on_cuda and oc.name in ("adam", "adamw") else None
        args = {"momentum": oc.momentum, "weight_decay": oc.weight_decay, "fused": fused,
                **oc.args}
        if oc.name == "sgd" and args["fused"] and args["momentum"]:
            # torch's fused SGD skips a found_inf step but not its momentum set-up: a skipped
            # first step leaves torch.empty() garbage (~1e38) as the buffer and the weights go
            # NaN (seen with the fp16 LDAM recipe on CUDA and on CPU).
            raise ConfigError("optimizer.args.fused: expected false with sgd and momentum > 0, "
                              "got true: PyTorch's fused SGD corrupts its momentum when a step "
                              "is skipped (NaN/inf, fp16 overflow); leave fused unset")
    else:  # a user optimizer gets lr and its own args; momentum/weight_decay only via args
        args = dict(oc.args)
    return build("optimizer", oc.name, {"lr": lr, **args}, OPTIMIZERS, model.parameters(),
                 positional_names=("params",))
