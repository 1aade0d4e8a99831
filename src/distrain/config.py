"""Typed, strict configuration: defaults < YAML file < command-line `section.key=value`.

Every field has a default and a one-line docstring (read by `field_docs` for the
schema). Mistakes raise `ConfigError` naming the key path, what was given and what
was expected; the CLI prints it and exits with status 2.
"""

from __future__ import annotations

import ast
import copy
import dataclasses
import difflib
import inspect
import textwrap
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A user mistake in the configuration; its message names the key path."""


@dataclass
class RunConfig:
    out_dir: str = "runs/run"
    """Folder for this run's files: metrics.jsonl, config.yaml, checkpoints/."""
    seed: int = 0
    """Seed for weight init, data order and every rank's random streams."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """auto: this rank's local GPU when CUDA is available, else the CPU."""


@dataclass
class SamplerConfig:
    name: str = "none"
    """none (every sample once per epoch, shuffled or not), class_balanced, or
    `package.module:callable(dataset, **args)` returning a torch Sampler."""
    args: dict = field(default_factory=dict)
    """Keyword arguments (class_balanced: replacement, default true)."""


@dataclass
class DataConfig:
    name: str = "digits"
    """Built-in data set (digits) or `package.module:callable` returning (train, val)."""
    args: dict = field(default_factory=dict)
    """Keyword arguments for the data callable."""
    batch_size: int = 32
    """Samples per micro-batch on each process (global batch = world × this × accumulation)."""
    val_batch_size: int = 0
    """Samples per validation batch on each process; 0 means batch_size."""
    shuffle: bool = True
    """Reshuffle the training set every epoch (by run.seed and the epoch number)."""
    num_workers: int = -1
    """DataLoader worker processes per rank; -1: 0 for in-memory arrays, else
    min(4, CPUs per rank); 0 loads in the training process."""
    warn_wait_share: float = 0.2
    """Warn when an epoch spends more than this share of its time waiting for data; 0: never."""
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    """Which samples an epoch visits: drawn once per epoch as a function of (run.seed, epoch),
    the same on every rank, then cut into global batches like the plain order."""
    class_counts: list = field(default_factory=list)
    """Training samples per class for class-aware losses (ldam); empty: counted from targets."""


@dataclass
class ModelConfig:
    name: str = "small_cnn"
    """Built-in model (small_cnn, mlp) or `package.module:callable` returning an nn.Module."""
    args: dict = field(default_factory=dict)
    """Keyword arguments for the model callable."""
    blocks: list = field(default_factory=list)
    """The model's repeated blocks, the units of FSDP sharding and of activation checkpointing:
    class names (e.g. [TransformerBlock]) or one `package.module:fn` taking the model and
    returning its blocks; empty: the children of every nn.ModuleList, else the model's
    top-level children that hold parameters."""


@dataclass
class LossConfig:
    name: str = "cross_entropy"
    """Built-in loss (cross_entropy) or `package.module:callable` returning loss(logits, targets)."""
    args: dict = field(default_factory=dict)
    """Keyword arguments for the loss callable (cross_entropy: label_smoothing, weight)."""


@dataclass
class AugmentConfig:
    mixup_alpha: float = 0.0
    """Mixup's Beta(alpha, alpha) parameter; 0 disables Mixup."""
    cutmix_alpha: float = 0.0
    """CutMix's Beta(alpha, alpha) parameter; 0 disables CutMix."""
    prob: float = 1.0
    """Probability that a micro-batch is mixed at all."""
    switch_prob: float = 0.5
    """With both enabled: probability of CutMix instead of Mixup for a mixed batch."""
    label_smoothing: float = 0.0
    """Smoothing of the mixed label vectors (soft-target losses only)."""


@dataclass
class OptimizerConfig:
    name: str = "sgd"
    """Built-in optimizer (sgd, adam, adamw) or `package.module:callable(params, lr=..., **args)`."""
    lr: float = 0.1
    """Base learning rate (before optimizer.scale_lr)."""
    momentum: float = 0.9
    """Momentum for sgd (ignored by adam/adamw)."""
    weight_decay: float = 0.0
    """Weight decay (L2 for sgd/adam, decoupled for adamw)."""
    scale_lr: Literal["none", "linear"] = "none"
    """linear: multiply lr by world_size × grad_accum_steps (the linear scaling rule)."""
    args: dict = field(default_factory=dict)
    """Further keyword arguments for the optimizer (e.g. nesterov, betas)."""


@dataclass
class SchedulerConfig:
    name: str = "none"
    """none, plateau, cosine, step, multistep, or `package.module:callable(optimizer, **args)`."""
    args: dict = field(default_factory=dict)
    """Keyword arguments (plateau: factor, patience, threshold, cooldown, min_lr; cosine: min_lr;
    step: step_size, gamma; multistep: milestones, gamma; epochs for step sizes)."""
    interval: Literal["auto", "step", "epoch"] = "auto"
    """When a user scheduler's step() is called: after every optimizer step, or after every
    epoch (auto: epoch, as torch documents its schedulers; built-ins follow the step count and
    take auto only). A plateau-type scheduler (torch's ReduceLROnPlateau) is stepped with the
    monitored metric after each validation instead, decided on rank 0."""
    warmup_epochs: float = 0.0
    """Linear warm-up length in epochs (fractions allowed), applied before the schedule."""
    warmup_start_factor: float = 0.1
    """Learning-rate multiplier at the first warm-up step."""


@dataclass
class TrainConfig:
    epochs: int = 10
    """Passes over the training set."""
    grad_accum_steps: int = 1
    """Micro-batches per optimizer step; gradients are all-reduced once per step."""
    precision: Literal["fp32", "fp16", "bf16"] = "fp32"
    """fp16: autocast + GradScaler; bf16: autocast without a scaler."""
    clip_grad_norm: float = 0.0
    """Clip the global gradient norm to this value after unscaling; 0 disables."""
    clip_grad_value: float = 0.0
    """Clip every gradient element to [-v, v] after unscaling; 0 disables."""
    ema_decay: float = 0.0
    """Keep an exponential moving average of the weights with this decay (e.g. 0.999); 0: off."""
    early_stop_patience: int = 0
    """Stop after this many validations without improvement of checkpoint.monitor; 0 disables."""
    max_bad_steps: int = 25
    """Stop after this many consecutive skipped steps (NaN/inf loss or gradients); 0: never."""
    skip_nonfinite_steps: bool = True
    """fp32/bf16: check every step's gradients and skip the step on all ranks if any is NaN/inf
    (fp16's GradScaler always does). With fused Adam/AdamW (the default on CUDA) the skip is
    taken on the device and read one step later, at no wait; with other optimizers the host
    waits for the check each step (the README's GPU section has its cost). false: no check
    (and no skip, even when clip_grad_norm computes the norm)."""
    step: str = ""
    """`package.module:fn` taking over one micro-batch: fn(model, batch) inside autocast returns
    its mean loss, or (loss, {name: per-batch mean}) reported as train_<name>/val_<name>;
    batches may then be of any structure (dicts, nested). Empty: batches are (inputs, targets)
    and the loss is loss(model(inputs), targets)."""
    log_every_steps: int = 10
    """Refresh the progress bar every N optimizer steps (reading the loss syncs the device)."""
    activation_checkpointing: bool = False
    """Recompute each block's activations in backward instead of keeping them (model.blocks):
    less memory, about one more forward of compute."""
    compile: bool = False
    """torch.compile the model (one process, DDP and FSDP); the first steps compile."""


@dataclass
class ValidateConfig:
    mode: Literal["rank0", "sharded"] = "rank0"
    """rank0: rank 0 evaluates the whole set, the others wait; sharded: every rank a shard, exact
    sums (always under dist.strategy=fsdp, whose forward needs every rank)."""
    every_epochs: int = 1
    """Validate every N epochs (and always after the last)."""
    every_steps: int = 0
    """Also validate every N optimizer steps inside an epoch; 0: only at epoch ends."""
    metrics: dict = field(default_factory=dict)
    """Your metrics by name: `package.module:callable` (a function of (outputs, targets) giving
    the batch's mean, or a class with update/compute) or {name: ..., args: {...}}; reported
    as val_<name>, exact under sharded validation, usable as checkpoint.monitor."""
    sets: dict = field(default_factory=dict)
    """More validation sets by name: {name: package.module:callable, args: {...}} returning a
    Dataset; each reports val_<set>_loss, val_<set>_acc, ... like the main one."""


@dataclass
class CheckpointConfig:
    resume: str = "auto"
    """auto: continue from the newest checkpoint in <out_dir>/checkpoints that verifies; none; or
    a checkpoint path (a file, or a sharded .dcp folder)."""
    monitor: str = "val_loss"
    """Metric that decides the best checkpoint, early stopping and the plateau scheduler."""
    mode: Literal["auto", "min", "max"] = "auto"
    """Whether lower or higher monitor values are better; auto: min for *loss, else max."""
    save_last: bool = True
    """Write checkpoints/last.pt (last.dcp under FSDP) after every epoch."""
    save_best: bool = True
    """Write checkpoints/best.pt whenever the monitored metric improves."""
    every_steps: int = 0
    """Also write last.pt every N optimizer steps inside an epoch (resumes mid-epoch exactly)."""
    allow_changes: bool = False
    """Resume even when the global batch or the model differ from the checkpoint's run."""
    keep_last: int = 2
    """Step checkpoints kept (newest first), so a damaged newest one falls back to the previous."""
    async_save: bool = False
    """Copy the state to CPU memory and write it from a background thread (one save in flight);
    the loop waits only for the copy (FSDP: every rank its shards, in parallel)."""


@dataclass
class HorovodConfig:
    compression: Literal["none", "fp16"] = "none"
    """Gradient compression on the wire (fp16 halves the bytes; values are cast back)."""
    op: Literal["average", "adasum"] = "average"
    """Gradient reduction: average (like DDP) or Adasum (not with train.precision=fp16)."""
    gradient_predivide_factor: float = 1.0
    """Divide gradients by this before the sum and by world_size/this after (average only)."""
    commit_every_steps: int = 10
    """Under an elastic horovodrun: commit the training state every N steps (and at each epoch
    end); a lost worker costs at most this many steps."""


@dataclass
class DistConfig:
    timeout_s: float = 600.0
    """Longest a rank may go without progress (a step, a validation, a checkpoint write) before
    every rank dumps its stacks and the run exits 124; also bounds the collectives. Make it
    longer than rank 0's validation and checkpoint writes."""
    audit_every_steps: int = 0
    """Every N optimizer steps the ranks compare step, epoch, LR, loss scale and a parameter
    checksum, and stop on a mismatch; 0: never."""
    debug: bool = False
    """Raise instead of hanging when a collective runs inside a rank-0-only region (rank-0
    validation, checkpoint writes, decisions)."""
    strategy: Literal["ddp", "fsdp"] = "ddp"
    """ddp: every rank keeps all weights, gradients and optimizer state; fsdp: PyTorch's FSDP2
    shards them over the ranks per block (model.blocks) and checkpoints are sharded
    (torchrun or mpirun without Horovod; one process trains unsharded)."""


@dataclass
class FSDPConfig:
    reshard_after_forward: bool = True
    """Free each block's gathered weights after its forward (gathered again in backward):
    less memory, one more all-gather per block."""
    mixed_precision: bool = True
    """With train.precision fp16/bf16: keep the gathered weights in that type for the forward
    and backward, reduce gradients in fp32; false: autocast alone decides."""
    cpu_offload: bool = False
    """Keep the sharded weights, gradients and optimizer state in CPU memory (on a GPU)."""


@dataclass
class ProfileConfig:
    wait: int = 0
    """Optimizer steps skipped before profiling (torch.profiler.schedule's wait)."""
    warmup: int = 0
    """Steps profiled but discarded after the wait (the profiler's own start-up cost)."""
    active: int = 0
    """Steps recorded into <out_dir>/profile/rank<r>.*.pt.trace.json; 0: no profiler."""
    repeat: int = 1
    """Wait-warmup-active cycles, one trace file per cycle; 0: until the run ends."""
    ranks: list = field(default_factory=lambda: [0])
    """The ranks that profile; each prints its top operators when the run ends."""


@dataclass
class LoggingConfig:
    tensorboard: bool = False
    """Write each metrics.jsonl row's numbers as TensorBoard scalars to <out_dir>/tensorboard."""
    plot: bool = True
    """Draw the learning curves to <out_dir>/curves.png when the run ends (rank 0)."""
    mlflow_uri: str = ""
    """MLflow tracking URI (http://host:port, sqlite:///file.db, or a folder): rank 0 logs the
    config, every metrics.jsonl row, step losses and the run's files there; empty: off."""
    mlflow_experiment: str = "distrain"
    """MLflow experiment the run belongs to (created when missing)."""
    wandb: Literal[False, "offline", "online"] = False
    """Weights & Biases: offline writes <out_dir>/wandb/offline-run-* for a later `wandb sync`;
    online uploads as it trains (needs network and `wandb login`); false (or off): none."""
    wandb_project: str = "distrain"
    """Weights & Biases project of the run."""
    log_best_checkpoint: bool = False
    """Also upload checkpoints/best.pt (best.dcp under FSDP) to the trackers when the run
    finishes (an MLflow artifact, a W&B model artifact)."""
    profile: ProfileConfig = field(default_factory=ProfileConfig)
    """torch.profiler over optimizer steps (schedule: wait, warmup, active; repeat), on the
    listed ranks; traces open in TensorBoard's profiler plugin and Perfetto."""


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    """Where the run writes and how it is seeded."""
    data: DataConfig = field(default_factory=DataConfig)
    """The data set and how it is batched."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """The network."""
    loss: LossConfig = field(default_factory=LossConfig)
    """The training objective."""
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    """Batch-level augmentation on the device (Mixup, CutMix)."""
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    """The optimizer and its learning rate."""
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    """The learning-rate schedule."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """The training loop."""
    validate: ValidateConfig = field(default_factory=ValidateConfig)
    """How and when validation runs."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """What is saved and resumed."""
    horovod: HorovodConfig = field(default_factory=HorovodConfig)
    """Options of the Horovod backend."""
    fsdp: FSDPConfig = field(default_factory=FSDPConfig)
    """Options of dist.strategy=fsdp."""
    dist: DistConfig = field(default_factory=DistConfig)
    """Hang detection and cross-rank checks, for both backends."""
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    """What a run writes besides metrics.jsonl: TensorBoard scalars, a PNG of the curves,
    experiment trackers (MLflow, Weights & Biases), profiler traces."""
    backend: Literal["auto", "local", "torchrun", "horovod"] = "auto"
    """auto: torchrun's, then horovodrun's, then MPI's environment, else one local process."""

    def monitor_mode(self) -> str:
        return metric_mode(self.checkpoint.monitor, self.checkpoint.mode)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def metric_mode(name: str, mode: str = "auto") -> str:
    """Whether lower (min) or higher (max) values of metric `name` are better: `mode` unless
    auto; auto is min for losses (*loss), max for everything else."""
    if mode in ("min", "max"):
        return mode
    return "min" if name.endswith("loss") else "max"


VAL_METRICS = ("loss", "acc", "macro_f1", "balanced_acc")
MONITORABLE = (*(f"val_{m}" for m in VAL_METRICS), *(f"val_ema_{m}" for m in VAL_METRICS),
               "train_loss", "train_acc")


def _check_values(cfg: Config) -> None:
    """Impossible values, each named by its key path."""
    def need(ok: bool, key: str, value: Any, expected: str) -> None:
        if not ok:
            raise ConfigError(f"{key}: expected {expected}, got {value!r}")

    need(cfg.data.batch_size >= 1, "data.batch_size", cfg.data.batch_size, "an integer >= 1")
    need(cfg.data.val_batch_size >= 0, "data.val_batch_size", cfg.data.val_batch_size, "an integer >= 0")
    need(cfg.data.num_workers >= -1, "data.num_workers", cfg.data.num_workers,
         "an integer >= 0, or -1 (auto)")
    need(0 <= cfg.data.warn_wait_share <= 1, "data.warn_wait_share", cfg.data.warn_wait_share,
         "a number in [0, 1]")
    need(cfg.optimizer.lr > 0, "optimizer.lr", cfg.optimizer.lr, "a number > 0")
    need(cfg.optimizer.momentum >= 0, "optimizer.momentum", cfg.optimizer.momentum, "a number >= 0")
    need(cfg.optimizer.weight_decay >= 0, "optimizer.weight_decay", cfg.optimizer.weight_decay,
         "a number >= 0")
    need(cfg.scheduler.warmup_epochs >= 0, "scheduler.warmup_epochs", cfg.scheduler.warmup_epochs,
         "a number >= 0")
    need(cfg.scheduler.interval == "auto" or ":" in cfg.scheduler.name, "scheduler.interval",
         cfg.scheduler.interval, f"auto with the built-in scheduler {cfg.scheduler.name!r} "
         "(built-ins follow the optimizer steps)")
    need(0 < cfg.scheduler.warmup_start_factor <= 1, "scheduler.warmup_start_factor",
         cfg.scheduler.warmup_start_factor, "a number in (0, 1]")
    need(cfg.train.epochs >= 1, "train.epochs", cfg.train.epochs, "an integer >= 1")
    need(cfg.train.grad_accum_steps >= 1, "train.grad_accum_steps", cfg.train.grad_accum_steps,
         "an integer >= 1")
    need(cfg.train.clip_grad_norm >= 0, "train.clip_grad_norm", cfg.train.clip_grad_norm,
         "a number >= 0 (0 disables clipping)")
    need(cfg.train.early_stop_patience >= 0, "train.early_stop_patience",
         cfg.train.early_stop_patience, "an integer >= 0 (0 disables early stopping)")
    need(cfg.train.max_bad_steps >= 0, "train.max_bad_steps", cfg.train.max_bad_steps,
         "an integer >= 0 (0: never stop)")
    need(cfg.train.log_every_steps >= 1, "train.log_every_steps", cfg.train.log_every_steps,
         "an integer >= 1")
    need(cfg.train.clip_grad_value >= 0, "train.clip_grad_value", cfg.train.clip_grad_value,
         "a number >= 0 (0 disables clipping)")
    need(0 <= cfg.train.ema_decay < 1, "train.ema_decay", cfg.train.ema_decay,
         "a number in [0, 1) (0 disables EMA)")
    need(cfg.checkpoint.monitor.startswith("val_ema_") <= (cfg.train.ema_decay > 0),
         "checkpoint.monitor", cfg.checkpoint.monitor, "a non-EMA metric, or train.ema_decay > 0")
    need(cfg.checkpoint.keep_last >= 1, "checkpoint.keep_last", cfg.checkpoint.keep_last,
         "an integer >= 1")
    need(cfg.checkpoint.every_steps >= 0, "checkpoint.every_steps", cfg.checkpoint.every_steps,
         "an integer >= 0")
    need(cfg.validate.every_steps >= 0, "validate.every_steps", cfg.validate.every_steps,
         "an integer >= 0")
    aug = cfg.augment
    need(aug.mixup_alpha >= 0, "augment.mixup_alpha", aug.mixup_alpha, "a number >= 0")
    need(aug.cutmix_alpha >= 0, "augment.cutmix_alpha", aug.cutmix_alpha, "a number >= 0")
    need(0 <= aug.prob <= 1, "augment.prob", aug.prob, "a probability in [0, 1]")
    need(0 <= aug.switch_prob <= 1, "augment.switch_prob", aug.switch_prob,
         "a probability in [0, 1]")
    need(0 <= aug.label_smoothing < 1, "augment.label_smoothing", aug.label_smoothing,
         "a number in [0, 1)")
    need(all(isinstance(c, int) and c >= 0 for c in cfg.data.class_counts), "data.class_counts",
         cfg.data.class_counts, "a list of integers >= 0")
    need(cfg.validate.every_epochs >= 1, "validate.every_epochs", cfg.validate.every_epochs,
         "an integer >= 1")
    need(not (cfg.validate.metrics and cfg.train.step), "validate.metrics", cfg.validate.metrics,
         "none with train.step (metrics see (inputs, targets) batches; return yours from the "
         "step function as logs)")
    # A step function may report metrics of its own (checked at the first validation).
    named = bool(cfg.train.step or cfg.validate.metrics or cfg.validate.sets) and \
        cfg.checkpoint.monitor.startswith(("val_", "train_"))
    need(cfg.checkpoint.monitor in MONITORABLE or named, "checkpoint.monitor",
         cfg.checkpoint.monitor, "one of " + ", ".join(MONITORABLE) +
         " (or val_<name> of a train.step's logs, validate.metrics or validate.sets)")
    need(cfg.horovod.gradient_predivide_factor > 0, "horovod.gradient_predivide_factor",
         cfg.horovod.gradient_predivide_factor, "a number > 0")
    need(cfg.horovod.gradient_predivide_factor == 1.0 or cfg.horovod.op == "average",
         "horovod.gradient_predivide_factor", cfg.horovod.gradient_predivide_factor,
         "1.0 with horovod.op=adasum")
    need(cfg.horovod.commit_every_steps >= 1, "horovod.commit_every_steps",
         cfg.horovod.commit_every_steps, "an integer >= 1")
    need(cfg.dist.timeout_s > 0, "dist.timeout_s", cfg.dist.timeout_s, "a number of seconds > 0")
    need(cfg.dist.audit_every_steps >= 0, "dist.audit_every_steps", cfg.dist.audit_every_steps,
         "an integer >= 0 (0: never)")
    need(cfg.dist.strategy == "ddp" or cfg.backend != "horovod", "dist.strategy",
         cfg.dist.strategy, "ddp with backend=horovod (Horovod replicates the weights; "
         "launch with torchrun or mpirun and backend=auto or torchrun for fsdp)")
    need(isinstance(cfg.model.blocks, list) and all(isinstance(b, str) and b
                                                    for b in cfg.model.blocks),
         "model.blocks", cfg.model.blocks, "a list of module class names or one "
         "'package.module:fn'")
    need(bool(cfg.run.out_dir), "run.out_dir", cfg.run.out_dir, "a folder path")
    prof = cfg.logging.profile
    for key in ("wait", "warmup", "active", "repeat"):
        need(getattr(prof, key) >= 0, f"logging.profile.{key}", getattr(prof, key),
             "an integer >= 0")
    need(all(isinstance(r, int) and not isinstance(r, bool) and r >= 0 for r in prof.ranks),
         "logging.profile.ranks", prof.ranks, "a list of ranks (integers >= 0)")
    for section in ("data", "model", "loss", "optimizer", "scheduler"):
        name = getattr(cfg, section).name
        need(bool(name), f"{section}.name", name, "a built-in name or 'package.module:callable'")


# --------------------------------------------------------------------------- parsing

def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string",
            dict: "a mapping", list: "a list"}.get(tp, getattr(tp, "__name__", str(tp)))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp`; ints are accepted where floats are."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
    elif origin in (typing.Union, types.UnionType):
        for option in typing.get_args(tp):
            try:
                return _coerce(value, option, key)
            except ConfigError:
                pass
    elif tp is type(None):
        if value is None:
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads `1e-3` (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is str:
        if isinstance(value, str):
            return value
    elif tp is dict or origin is dict:
        if isinstance(value, dict):
            return dict(value)
        if value is None:  # `loss.args=null` clears the arguments the YAML gave
            return {}
    elif tp is list or origin is list:
        if isinstance(value, list):
            return list(value)
    else:  # pragma: no cover - a programming error in the schema
        raise TypeError(f"unsupported config type {tp!r} at {key}")
    raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")


def _unknown_key(key: str, known: list[str], prefix: str) -> ConfigError:
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    hint = f"; did you mean '{prefix}{close[0]}'?" if close else f"; known keys: {', '.join(known)}"
    shown = f"{prefix}{key}" if key.isidentifier() else repr(f"{prefix}{key}")
    return ConfigError(f"{shown}: unknown key{hint}")


def _merge(obj: Any, updates: dict, prefix: str = "") -> None:
    """Apply a nested mapping to a dataclass instance in place, checking keys and types."""
    if not isinstance(updates, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {updates!r}")
    hints = typing.get_type_hints(type(obj))
    names = [f.name for f in dataclasses.fields(obj)]
    for key, value in updates.items():
        if key not in names:
            raise _unknown_key(str(key), names, prefix)
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            _merge(current, value if value is not None else {}, f"{prefix}{key}.")
        else:
            setattr(obj, key, _coerce(value, hints[key], f"{prefix}{key}"))


def _set_inside_dict(cfg: Config, parts: list[str], value: Any) -> bool:
    """`model.args.width=8`: set one key inside a mapping field, keeping the keys the YAML
    gave (while `model.args={width: 8}` replaces the mapping). False if the path does not
    lead into a mapping field."""
    obj: Any = cfg
    for i, part in enumerate(parts[:-1]):
        if not dataclasses.is_dataclass(obj) or part not in {f.name for f in dataclasses.fields(obj)}:
            return False
        current = getattr(obj, part)
        if isinstance(current, dict):
            updated = copy.deepcopy(current)
            inner = updated
            for key in parts[i + 1:-1]:
                inner = inner.setdefault(key, {})
                if not isinstance(inner, dict):
                    raise ConfigError(f"{'.'.join(parts)}: {key} is not a mapping")
            inner[parts[-1]] = value
            setattr(obj, part, updated)
            return True
        obj = current
    return False


def parse_override(text: str) -> dict:
    """`train.epochs=3` -> {'train': {'epochs': 3}}; the value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"{text!r}: expected an override of the form section.key=value")
    path, raw = text.split("=", 1)
    if not path or any(not part for part in path.split(".")):
        raise ConfigError(f"{text!r}: expected an override of the form section.key=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: cannot parse {raw!r} as YAML ({exc.problem})") from None
    for part in reversed(path.split(".")):
        value = {part: value}
    return value


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Defaults, then the YAML file, then each `section.key=value` override, then value checks."""
    cfg = Config()
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"--config: no such file: {path}")
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}") from None
        except UnicodeDecodeError as exc:
            raise ConfigError(f"{path}: not a UTF-8 text file ({exc.reason} at byte "
                              f"{exc.start})") from None
        _merge(cfg, data)
    for item in overrides:
        path = item.split("=", 1)[0].split(".")
        update = parse_override(item)
        value = update
        for part in path:
            value = value[part]
        if not _set_inside_dict(cfg, path, value):
            _merge(cfg, update)
    _check_values(cfg)
    return cfg


def config_from_dict(data: dict) -> Config:
    """Rebuild a Config from `Config.to_dict()` output (e.g. the copy inside a checkpoint)."""
    cfg = Config()
    _merge(cfg, data)
    _check_values(cfg)
    return cfg


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


def field_docs(cls: type) -> dict[str, str]:
    """The attribute docstrings of a dataclass (the string literal after each field)."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs: dict[str, str] = {}
    for node, nxt in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)):
            docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs
