"""What a config run and `distrain evaluate` build alike from a config: the data sets, the
model (seeded by run.seed: the same initial weights on every rank and layout), the loss and
the step function."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch.utils.data import Dataset

from distrain.components.data.datasets import (
    build_datasets,
    build_val_sets,
    class_counts,
)
from distrain.components.losses import LOSSES
from distrain.components.metrics import UserMetrics
from distrain.components.models import MODELS
from distrain.components.registry import build
from distrain.components.step_fn import StepFn, build_step
from distrain.config import Config
from distrain.distributed import Backend
from distrain.errors import ConfigError


@dataclass
class Parts:
    """What training and `distrain evaluate` build alike from a config."""

    train_set: Dataset
    val_set: Dataset
    val_sets: dict[str, Dataset]  # validate.sets, by name
    user_metrics: UserMetrics
    model: torch.nn.Module  # the plain model on the backend's device, seeded by run.seed
    loss_fn: Callable
    step_fn: StepFn | None  # train.step: takes over a micro-batch when given


def build_parts(cfg: Config, backend: Backend) -> Parts:
    train_set, val_set = build_datasets(cfg.data)
    val_sets = build_val_sets(cfg.validate.sets)
    user_metrics = UserMetrics(cfg.validate.metrics)
    torch.manual_seed(cfg.run.seed)  # identical initial weights on every rank and layout
    raw = build("model", cfg.model.name, cfg.model.args, MODELS).to(backend.device)
    loss_fn = build("loss", cfg.loss.name, cfg.loss.args, LOSSES,
                    provide={"class_counts": lambda: shared_class_counts(cfg, backend, train_set)})
    if isinstance(loss_fn, torch.nn.Module):  # e.g. class weights kept as buffers
        loss_fn.to(backend.device)
    return Parts(train_set, val_set, val_sets, user_metrics, raw, loss_fn,
                 build_step(cfg.train.step))


def shared_class_counts(cfg: Config, backend: Backend, train_set: Dataset) -> list[int]:
    """Class counts for class-aware losses: from the config, else counted once on rank 0
    from the training set's labels (`targets`, else the samples) and broadcast."""
    if cfg.data.class_counts:
        return list(cfg.data.class_counts)
    if backend.elastic:  # set-up runs no collective there: every rank counts
        counts = class_counts(train_set)
    else:
        counts = class_counts(train_set) if backend.is_main else None
        counts = backend.broadcast_object(counts)  # Distribution: one count for all
    if counts is None:
        raise ConfigError(f"data.class_counts: loss {cfg.loss.name!r} needs class counts "
                          "and the training set's samples carry no integer label; give "
                          "data.class_counts=[n_0, n_1, ...]")
    return counts
