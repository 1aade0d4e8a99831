"""Checks of a whole config: every field's plain bound (its metadata, sections.py), then the
rules that tie keys together. Each failure is a ConfigError naming the key path."""

from __future__ import annotations

from typing import Any

from distrain.config.sections import Config, settings
from distrain.errors import ConfigError

VAL_METRICS = ("loss", "acc", "macro_f1", "balanced_acc")
MONITORABLE = (*(f"val_{m}" for m in VAL_METRICS), *(f"val_ema_{m}" for m in VAL_METRICS),
               "train_loss", "train_acc")


def _need(ok: bool, key: str, value: Any, expected: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: expected {expected}, got {value!r}")


def _value(cfg: Config, key: str) -> Any:
    value: Any = cfg
    for part in key.split("."):
        value = getattr(value, part)
    return value


def check_values(cfg: Config) -> None:
    """Impossible values, each named by its key path."""
    for key, field, tp in settings():
        bound = field.metadata.get("check")
        if bound is not None:
            value = _value(cfg, key)
            _need(bound.ok(value), key, value, bound.describe(tp))
    check_rules(cfg)


def check_rules(cfg: Config) -> None:
    """The rules between keys, and the values a plain bound cannot describe."""
    _need(cfg.scheduler.interval == "auto" or ":" in cfg.scheduler.name, "scheduler.interval",
          cfg.scheduler.interval, f"auto with the built-in scheduler {cfg.scheduler.name!r} "
          "(built-ins follow the optimizer steps)")
    _need(cfg.checkpoint.monitor.startswith("val_ema_") <= (cfg.train.ema_decay > 0),
          "checkpoint.monitor", cfg.checkpoint.monitor, "a non-EMA metric, or train.ema_decay > 0")
    _need(all(isinstance(c, int) and c >= 0 for c in cfg.data.class_counts), "data.class_counts",
          cfg.data.class_counts, "a list of integers >= 0")
    _need(not (cfg.validate.metrics and cfg.train.step), "validate.metrics", cfg.validate.metrics,
          "none with train.step (metrics see (inputs, targets) batches; return yours from the "
          "step function as logs)")
    # A step function may report metrics of its own (checked at the first validation).
    named = bool(cfg.train.step or cfg.validate.metrics or cfg.validate.sets) and \
        cfg.checkpoint.monitor.startswith(("val_", "train_"))
    _need(cfg.checkpoint.monitor in MONITORABLE or named, "checkpoint.monitor",
          cfg.checkpoint.monitor, "one of " + ", ".join(MONITORABLE) +
          " (or val_<name> of a train.step's logs, validate.metrics or validate.sets)")
    hvd = cfg.dist.horovod
    _need(hvd.gradient_predivide_factor == 1.0 or hvd.op == "average",
          "dist.horovod.gradient_predivide_factor", hvd.gradient_predivide_factor,
          "1.0 with dist.horovod.op=adasum")
    _need(cfg.dist.strategy == "ddp" or cfg.dist.backend != "horovod", "dist.strategy",
          cfg.dist.strategy, "ddp with dist.backend=horovod (Horovod replicates the weights; "
          "launch with torchrun or mpirun and dist.backend=auto or torchrun for fsdp)")
    _need(isinstance(cfg.model.blocks, list) and all(isinstance(b, str) and b
                                                     for b in cfg.model.blocks),
          "model.blocks", cfg.model.blocks, "a list of module class names or one "
          "'package.module:fn'")
    _need(bool(cfg.run.out_dir), "run.out_dir", cfg.run.out_dir, "a folder path")
    ranks = cfg.logging.profile.ranks
    _need(all(isinstance(r, int) and not isinstance(r, bool) and r >= 0 for r in ranks),
          "logging.profile.ranks", ranks, "a list of ranks (integers >= 0)")
    for section in ("data", "model", "loss", "optimizer", "scheduler"):
        name = getattr(cfg, section).name
        _need(bool(name), f"{section}.name", name, "a built-in name or 'package.module:callable'")
