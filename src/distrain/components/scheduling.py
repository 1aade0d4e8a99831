"""Learning-rate schedules: lr = schedule(base_lr, step) × warm-up(step) × plateau factor.

Built-ins are stepped after every *successful* optimizer step (an fp16 overflow skip
does not advance them); `plateau` also reacts to the agreed validation metric, which
every rank receives from the same broadcast, so every rank holds the same LR.

A user scheduler (any torch LRScheduler by import path) is stepped per `scheduler.interval`:
after each taken optimizer step, or after each epoch (the default, as torch documents them);
a plateau-type one (its step() needs the metric, like ReduceLROnPlateau) after each
validation with the agreed monitored metric instead.
"""

from __future__ import annotations

import bisect
import inspect
import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from distrain.components.registry import build
from distrain.config import SchedulerConfig
from distrain.errors import ConfigError

ShapeFn = Callable[[float, int, "ScheduleContext"], float]


@dataclass
class ScheduleContext:
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int


def none() -> ShapeFn:
    """Constant learning rate."""
    return lambda base, step, ctx: base


def cosine(min_lr: float = 0.0) -> ShapeFn:
    """Cosine decay from base_lr to min_lr over the steps after warm-up."""
    def shape(base: float, step: int, ctx: ScheduleContext) -> float:
        span = max(1, ctx.total_steps - ctx.warmup_steps)
        progress = min(1.0, max(0, step - ctx.warmup_steps) / span)
        return min_lr + (base - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))
    return shape


def step(step_size: int = 30, gamma: float = 0.1) -> ShapeFn:
    """Multiply by gamma every `step_size` epochs."""
    if step_size < 1:
        raise ValueError(f"step_size must be >= 1 epoch, got {step_size}")
    return lambda base, s, ctx: base * gamma ** ((s // ctx.steps_per_epoch) // step_size)


def multistep(milestones: Sequence[int] = (30, 60, 90), gamma: float = 0.1) -> ShapeFn:
    """Multiply by gamma at each epoch in `milestones`."""
    marks = sorted(milestones)
    return lambda base, s, ctx: base * gamma ** bisect.bisect_right(marks, s // ctx.steps_per_epoch)


@dataclass
class PlateauArgs:
    factor: float = 0.1
    patience: int = 10
    threshold: float = 1e-4
    threshold_mode: str = "rel"
    cooldown: int = 0
    min_lr: float = 0.0


def plateau(factor: float = 0.1, patience: int = 10, threshold: float = 1e-4,
            threshold_mode: str = "rel", cooldown: int = 0, min_lr: float = 0.0) -> PlateauArgs:
    """Multiply by `factor` after `patience` validations without improvement of the monitor."""
    if not 0 < factor < 1:
        raise ValueError(f"factor must be in (0, 1), got {factor}")
    if threshold_mode not in ("rel", "abs"):
        raise ValueError(f"threshold_mode must be 'rel' or 'abs', got {threshold_mode!r}")
    return PlateauArgs(factor, patience, threshold, threshold_mode, cooldown, min_lr)


SCHEDULERS = {"none": none, "cosine": cosine, "step": step, "multistep": multistep,
              "plateau": plateau}


class Schedule:
    """Owns the optimizer's learning rate. `step()` after each optimizer step that was taken,
    `observe(metric)` after each validation (plateau only)."""

    def __init__(self, optimizer: torch.optim.Optimizer, cfg: SchedulerConfig, mode: str,
                 steps_per_epoch: int, total_steps: int) -> None:
        self.optimizer = optimizer
        self.base_lrs = [g["lr"] for g in optimizer.param_groups]
        self.ctx = ScheduleContext(steps_per_epoch, total_steps,
                                   round(cfg.warmup_epochs * steps_per_epoch))
        self.start_factor = cfg.warmup_start_factor
        self.steps = 0
        self.shape: ShapeFn = none()
        self.plateau: torch.optim.lr_scheduler.ReduceLROnPlateau | None = None
        self.custom: torch.optim.lr_scheduler.LRScheduler | None = None
        self.min_lr = 0.0
        self.interval = "step"  # when the custom scheduler steps: step, epoch or validation
        if cfg.name not in SCHEDULERS:
            if cfg.warmup_epochs:
                raise ConfigError("scheduler.warmup_epochs: expected 0 with a custom scheduler "
                                  f"({cfg.name!r} owns its learning rate), got {cfg.warmup_epochs}")
            self.custom = build("scheduler", cfg.name, cfg.args, SCHEDULERS, optimizer,
                                positional_names=("optimizer",))
            self.interval = "epoch" if cfg.interval == "auto" else cfg.interval
            if takes_metric(self.custom):
                self.interval = "validation"
            return
        made = build("scheduler", cfg.name, cfg.args, SCHEDULERS)
        if isinstance(made, PlateauArgs):
            # Reuse torch's plateau logic on a stand-in optimizer whose lr *is* the factor.
            self._factor_holder = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
            self.plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(
                self._factor_holder, mode=mode, factor=made.factor, patience=made.patience,
                threshold=made.threshold, threshold_mode=made.threshold_mode,
                cooldown=made.cooldown)
            self.min_lr = made.min_lr
        else:
            self.shape = made
        self._apply()

    @property
    def plateau_factor(self) -> float:
        return self._factor_holder.param_groups[0]["lr"] if self.plateau is not None else 1.0

    def _warmup(self) -> float:
        w = self.ctx.warmup_steps
        if self.steps >= w:
            return 1.0
        return self.start_factor + (1.0 - self.start_factor) * self.steps / w

    def _apply(self) -> None:
        if self.custom is not None:
            return
        scale = self._warmup() * self.plateau_factor
        for group, base in zip(self.optimizer.param_groups, self.base_lrs):
            group["lr"] = max(self.min_lr, self.shape(base, self.steps, self.ctx) * scale)

    def step(self) -> None:
        """After each optimizer step that was taken."""
        self.steps += 1
        if self.custom is not None and self.interval == "step":
            self.custom.step()
        self._apply()

    def end_epoch(self) -> None:
        """After each epoch's training."""
        if self.custom is not None and self.interval == "epoch":
            self.custom.step()

    def observe(self, metric: float) -> None:
        """Feed the agreed validation metric (identical on every rank) to the plateau rule."""
        if self.plateau is not None:
            self.plateau.step(metric)
            self._apply()
        if self.custom is not None and self.interval == "validation":
            self.custom.step(metric)

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def state_dict(self) -> dict:
        state: dict = {"steps": self.steps}
        if self.plateau is not None:
            state["plateau"] = self.plateau.state_dict()
            state["plateau_factor"] = self.plateau_factor
        if self.custom is not None:
            state["custom"] = self.custom.state_dict()
            # A plateau-type scheduler sets the optimizer's LR itself: ranks adopting rank 0's
            # decision take its LRs too.
            state["lrs"] = [group["lr"] for group in self.optimizer.param_groups]
        return state

    def load_state_dict(self, state: dict) -> None:
        self.steps = state["steps"]
        if self.plateau is not None and "plateau" in state:
            self.plateau.load_state_dict(state["plateau"])
            self._factor_holder.param_groups[0]["lr"] = state["plateau_factor"]
        if self.custom is not None and "custom" in state:
            self.custom.load_state_dict(state["custom"])
            for group, lr in zip(self.optimizer.param_groups, state.get("lrs", [])):
                group["lr"] = lr
        self._apply()


def takes_metric(scheduler) -> bool:
    """A plateau-type scheduler: its step() requires the validation metric."""
    if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
        return True
    try:
        params = list(inspect.signature(scheduler.step).parameters.values())
    except (TypeError, ValueError):
        return False
    return bool(params) and params[0].default is inspect.Parameter.empty and \
        params[0].kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
