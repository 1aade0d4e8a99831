"""The config's sections: typed dataclasses, one field per key, each with its default, its
documentation, its plain bounds and whether a resume may change it, as field metadata.
Imports nothing of distrain but errors; checks.py and load.py build on it."""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any, Callable, Literal


@dataclass(frozen=True)
class Bound:
    """A plain bound on one value: `ok(value)`, else the error says "expected <expected>"."""

    ok: Callable[[Any], bool]
    words: str  # e.g. ">= 1", "in [0, 1)"
    noun: str = ""  # "a probability"; empty: "an integer" or "a number" by the field's type
    note: str = ""  # e.g. "0 disables clipping"
    expected: str = ""  # the whole expectation, when the generated one would not read well

    def describe(self, tp: Any) -> str:
        if self.expected:
            return self.expected
        noun = self.noun or ("an integer" if tp is int or tp == "int" else "a number")
        return f"{noun} {self.words}" + (f" ({self.note})" if self.note else "")


def at_least(lo: float, note: str = "", *, noun: str = "", expected: str = "") -> Bound:
    return Bound(lambda v: v >= lo, f">= {lo}", noun, note, expected)


def above(lo: float, note: str = "", *, noun: str = "") -> Bound:
    return Bound(lambda v: v > lo, f"> {lo}", noun, note)


def within(lo: float, hi: float, ends: str = "[]", *, noun: str = "", note: str = "") -> Bound:
    """`ends`: "[]", "[)", "(]" or "()": whether each end belongs to the range."""
    def ok(v: float) -> bool:
        return (v >= lo if ends[0] == "[" else v > lo) and (v <= hi if ends[1] == "]" else v < hi)
    return Bound(ok, f"in {ends[0]}{lo}, {hi}{ends[1]}", noun, note)


def setting(default: Any = dataclasses.MISSING, *, factory: Callable[[], Any] | None = None,
            doc: str, check: Bound | None = None, resumable: bool = False) -> Any:
    """A config field: `doc` is its one-line description (the schema and the README's
    reference), `check` its plain bound, `resumable` whether `checkpoint.resume: auto` may
    continue a run saved with another value of it."""
    metadata = {"doc": " ".join(doc.split()), "check": check, "resumable": resumable}
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class RunConfig:
    out_dir: str = setting("runs/run", resumable=True, doc=(
        "Folder for this run's files: metrics.jsonl, config.yaml, checkpoints/."))
    seed: int = setting(0, doc="Seed for weight init, data order and every rank's random streams.")
    device: Literal["auto", "cpu", "cuda"] = setting("auto", resumable=True, doc=(
        "auto: this rank's local GPU when CUDA is available, else the CPU."))


@dataclass
class SamplerConfig:
    name: str = setting("none", doc=(
        "none (every sample once per epoch, shuffled or not), class_balanced, or "
        "`package.module:callable(dataset, **args)` returning a torch Sampler."))
    args: dict = setting(factory=dict, doc=(
        "Keyword arguments (class_balanced: replacement, default true)."))


@dataclass
class DataConfig:
    name: str = setting("digits", doc=(
        "Built-in data set (digits) or `package.module:callable` returning (train, val)."))
    args: dict = setting(factory=dict, doc="Keyword arguments for the data callable.")
    batch_size: int = setting(32, check=at_least(1), resumable=True, doc=(
        "Samples per micro-batch on each process (global batch = world × this × accumulation)."))
    val_batch_size: int = setting(0, check=at_least(0), resumable=True, doc=(
        "Samples per validation batch on each process; 0 means batch_size."))
    shuffle: bool = setting(True, doc=(
        "Reshuffle the training set every epoch (by run.seed and the epoch number)."))
    num_workers: int = setting(-1, check=at_least(-1, expected="an integer >= 0, or -1 (auto)"), resumable=True, doc=(
        "DataLoader worker processes per rank; -1: 0 for in-memory arrays, else min(4, CPUs "
        "per rank); 0 loads in the training process."))
    warn_wait_share: float = setting(0.2, check=within(0, 1), resumable=True, doc=(
        "Warn when an epoch spends more than this share of its time waiting for data; 0: "
        "never."))
    sampler: SamplerConfig = setting(factory=SamplerConfig, doc=(
        "Which samples an epoch visits: drawn once per epoch as a function of (run.seed, "
        "epoch), the same on every rank, then cut into global batches like the plain order."))
    class_counts: list = setting(factory=list, doc=(
        "Training samples per class for class-aware losses (ldam); empty: counted from "
        "targets."))


@dataclass
class ModelConfig:
    name: str = setting("small_cnn", doc=(
        "Built-in model (small_cnn, mlp) or `package.module:callable` returning an nn.Module."))
    args: dict = setting(factory=dict, doc="Keyword arguments for the model callable.")
    blocks: list = setting(factory=list, resumable=True, doc=(
        "The model's repeated blocks, the units of FSDP sharding and of activation "
        "checkpointing: class names (e.g. [TransformerBlock]) or one `package.module:fn` "
        "taking the model and returning its blocks; empty: the children of every "
        "nn.ModuleList, else the model's top-level children that hold parameters."))


@dataclass
class LossConfig:
    name: str = setting("cross_entropy", doc=(
        "Built-in loss (cross_entropy) or `package.module:callable` returning loss(logits, "
        "targets)."))
    args: dict = setting(factory=dict, doc=(
        "Keyword arguments for the loss callable (cross_entropy: label_smoothing, weight)."))


@dataclass
class AugmentConfig:
    mixup_alpha: float = setting(0.0, check=at_least(0), doc=(
        "Mixup's Beta(alpha, alpha) parameter; 0 disables Mixup."))
    cutmix_alpha: float = setting(0.0, check=at_least(0), doc=(
        "CutMix's Beta(alpha, alpha) parameter; 0 disables CutMix."))
    prob: float = setting(1.0, check=within(0, 1, noun="a probability"), doc=(
        "Probability that a micro-batch is mixed at all."))
    switch_prob: float = setting(0.5, check=within(0, 1, noun="a probability"), doc=(
        "With both enabled: probability of CutMix instead of Mixup for a mixed batch."))
    label_smoothing: float = setting(0.0, check=within(0, 1, "[)"), doc=(
        "Smoothing of the mixed label vectors (soft-target losses only)."))


@dataclass
class OptimizerConfig:
    name: str = setting("sgd", doc=(
        "Built-in optimizer (sgd, adam, adamw) or `package.module:callable(params, lr=..., "
        "**args)`."))
    lr: float = setting(0.1, check=above(0), doc="Base learning rate (before optimizer.scale_lr).")
    momentum: float = setting(0.9, check=at_least(0), doc=(
        "Momentum for sgd (ignored by adam/adamw)."))
    weight_decay: float = setting(0.0, check=at_least(0), doc=(
        "Weight decay (L2 for sgd/adam, decoupled for adamw)."))
    scale_lr: Literal["none", "linear"] = setting("none", doc=(
        "linear: multiply lr by world_size × grad_accum_steps (the linear scaling rule)."))
    args: dict = setting(factory=dict, doc=(
        "Further keyword arguments for the optimizer (e.g. nesterov, betas)."))


@dataclass
class SchedulerConfig:
    name: str = setting("none", doc=(
        "none, plateau, cosine, step, multistep, or `package.module:callable(optimizer, "
        "**args)`."))
    args: dict = setting(factory=dict, doc=(
        "Keyword arguments (plateau: factor, patience, threshold, cooldown, min_lr; cosine: "
        "min_lr; step: step_size, gamma; multistep: milestones, gamma; epochs for step sizes)."))
    interval: Literal["auto", "step", "epoch"] = setting("auto", doc=(
        "When a user scheduler's step() is called: after every optimizer step, or after every "
        "epoch (auto: epoch, as torch documents its schedulers; built-ins follow the step "
        "count and take auto only). A plateau-type scheduler (torch's ReduceLROnPlateau) is "
        "stepped with the monitored metric after each validation instead, decided on rank 0."))
    warmup_epochs: float = setting(0.0, check=at_least(0), doc=(
        "Linear warm-up length in epochs (fractions allowed), applied before the schedule."))
    warmup_start_factor: float = setting(0.1, check=within(0, 1, "(]"), doc=(
        "Learning-rate multiplier at the first warm-up step."))


@dataclass
class TrainConfig:
    epochs: int = setting(10, check=at_least(1), resumable=True, doc=(
        "Passes over the training set."))
    grad_accum_steps: int = setting(1, check=at_least(1), resumable=True, doc=(
        "Micro-batches per optimizer step; gradients are all-reduced once per step."))
    precision: Literal["fp32", "fp16", "bf16"] = setting("fp32", doc=(
        "fp16: autocast + GradScaler; bf16: autocast without a scaler."))
    clip_grad_norm: float = setting(0.0, check=at_least(0, "0 disables clipping"), doc=(
        "Clip the global gradient norm to this value after unscaling; 0 disables."))
    clip_grad_value: float = setting(0.0, check=at_least(0, "0 disables clipping"), doc=(
        "Clip every gradient element to [-v, v] after unscaling; 0 disables."))
    ema_decay: float = setting(0.0, check=within(0, 1, "[)", note="0 disables EMA"), doc=(
        "Keep an exponential moving average of the weights with this decay (e.g. 0.999); 0: "
        "off."))
    early_stop_patience: int = setting(0, check=at_least(0, "0 disables early stopping"), resumable=True, doc=(
        "Stop after this many validations without improvement of checkpoint.monitor; 0 "
        "disables."))
    max_bad_steps: int = setting(25, check=at_least(0, "0: never stop"), resumable=True, doc=(
        "Stop after this many consecutive skipped steps (NaN/inf loss or gradients); 0: never."))
    skip_nonfinite_steps: bool = setting(True, resumable=True, doc=(
        "fp32/bf16: check every step's gradients and skip the step on all ranks if any is "
        "NaN/inf (fp16's GradScaler always does). With fused Adam/AdamW (the default on CUDA) "
        "the skip is taken on the device and read one step later, at no wait; with other "
        "optimizers the host waits for the check each step (the README's GPU section has its "
        "cost). false: no check (and no skip, even when clip_grad_norm computes the norm)."))
    step: str = setting("", doc=(
        "`package.module:fn` taking over one micro-batch: fn(model, batch) inside autocast "
        "returns its mean loss, or (loss, {name: per-batch mean}) reported as "
        "train_<name>/val_<name>; batches may then be of any structure (dicts, nested). Empty: "
        "batches are (inputs, targets) and the loss is loss(model(inputs), targets)."))
    log_every_steps: int = setting(10, check=at_least(1), resumable=True, doc=(
        "Refresh the progress bar every N optimizer steps (reading the loss syncs the device)."))
    activation_checkpointing: bool = setting(False, resumable=True, doc=(
        "Recompute each block's activations in backward instead of keeping them "
        "(model.blocks): less memory, about one more forward of compute."))
    compile: bool = setting(False, resumable=True, doc=(
        "torch.compile the model (one process, DDP and FSDP); the first steps compile."))


@dataclass
class ValidateConfig:
    mode: Literal["rank0", "sharded"] = setting("rank0", resumable=True, doc=(
        "rank0: rank 0 evaluates the whole set, the others wait; sharded: every rank a shard, "
        "exact sums (always under dist.strategy=fsdp, whose forward needs every rank)."))
    every_epochs: int = setting(1, check=at_least(1), doc=(
        "Validate every N epochs (and always after the last)."))
    every_steps: int = setting(0, check=at_least(0), doc=(
        "Also validate every N optimizer steps inside an epoch; 0: only at epoch ends."))
    metrics: dict = setting(factory=dict, doc=(
        "Your metrics by name: `package.module:callable` (a function of (outputs, targets) "
        "giving the batch's mean, or a class with update/compute) or {name: ..., args: {...}}; "
        "reported as val_<name>, exact under sharded validation, usable as checkpoint.monitor."))
    sets: dict = setting(factory=dict, doc=(
        "More validation sets by name: {name: package.module:callable, args: {...}} returning "
        "a Dataset; each reports val_<set>_loss, val_<set>_acc, ... like the main one."))


@dataclass
class CheckpointConfig:
    resume: str = setting("auto", resumable=True, doc=(
        "auto: continue from the newest checkpoint in <out_dir>/checkpoints that verifies; "
        "none; or a checkpoint path (a file, or a sharded .dcp folder)."))
    monitor: str = setting("val_loss", doc=(
        "Metric that decides the best checkpoint, early stopping and the plateau scheduler."))
    mode: Literal["auto", "min", "max"] = setting("auto", doc=(
        "Whether lower or higher monitor values are better; auto: min for *loss, else max."))
    save_last: bool = setting(True, resumable=True, doc=(
        "Write checkpoints/last.pt (last.dcp under FSDP) after every epoch."))
    save_best: bool = setting(True, resumable=True, doc=(
        "Write checkpoints/best.pt whenever the monitored metric improves."))
    every_steps: int = setting(0, check=at_least(0), resumable=True, doc=(
        "Also write last.pt every N optimizer steps inside an epoch (resumes mid-epoch "
        "exactly)."))
    allow_changes: bool = setting(False, resumable=True, doc=(
        "Resume even when the global batch or the model differ from the checkpoint's run."))
    keep_last: int = setting(2, check=at_least(1), resumable=True, doc=(
        "Step checkpoints kept (newest first), so a damaged newest one falls back to the "
        "previous."))
    async_save: bool = setting(False, resumable=True, doc=(
        "Copy the state to CPU memory and write it from a background thread (one save in "
        "flight); the loop waits only for the copy (FSDP: every rank its shards, in parallel)."))


@dataclass
class HorovodConfig:
    compression: Literal["none", "fp16"] = setting("none", doc=(
        "Gradient compression on the wire (fp16 halves the bytes; values are cast back)."))
    op: Literal["average", "adasum"] = setting("average", doc=(
        "Gradient reduction: average (like DDP) or Adasum (not with train.precision=fp16)."))
    gradient_predivide_factor: float = setting(1.0, check=above(0), doc=(
        "Divide gradients by this before the sum and by world_size/this after (average only)."))
    commit_every_steps: int = setting(10, check=at_least(1), resumable=True, doc=(
        "Under an elastic horovodrun: commit the training state every N steps (and at each "
        "epoch end); a lost worker costs at most this many steps."))


@dataclass
class FSDPConfig:
    reshard_after_forward: bool = setting(True, resumable=True, doc=(
        "Free each block's gathered weights after its forward (gathered again in backward): "
        "less memory, one more all-gather per block."))
    mixed_precision: bool = setting(True, resumable=True, doc=(
        "With train.precision fp16/bf16: keep the gathered weights in that type for the "
        "forward and backward, reduce gradients in fp32; false: autocast alone decides."))
    cpu_offload: bool = setting(False, resumable=True, doc=(
        "Keep the sharded weights, gradients and optimizer state in CPU memory (on a GPU)."))


@dataclass
class DistConfig:
    backend: Literal["auto", "local", "torchrun", "horovod"] = setting("auto", resumable=True, doc=(
        "auto: torchrun's, then horovodrun's, then MPI's environment, else one local process."))
    timeout_s: float = setting(600.0, check=above(0, noun="a number of seconds"), resumable=True, doc=(
        "Longest a rank may go without progress (a step, a validation, a checkpoint write) "
        "before every rank dumps its stacks and the run exits 124; also bounds the "
        "collectives. Make it longer than rank 0's validation and checkpoint writes."))
    audit_every_steps: int = setting(0, check=at_least(0, "0: never"), resumable=True, doc=(
        "Every N optimizer steps the ranks compare step, epoch, LR, loss scale and a parameter "
        "checksum, and stop on a mismatch; 0: never."))
    debug: bool = setting(False, resumable=True, doc=(
        "Raise instead of hanging when a collective runs inside a rank-0-only region (rank-0 "
        "validation, checkpoint writes, decisions)."))
    strategy: Literal["ddp", "fsdp"] = setting("ddp", resumable=True, doc=(
        "ddp: every rank keeps all weights, gradients and optimizer state; fsdp: PyTorch's "
        "FSDP2 shards them over the ranks per block (model.blocks) and checkpoints are sharded "
        "(torchrun or mpirun without Horovod; one process trains unsharded)."))
    horovod: HorovodConfig = setting(factory=HorovodConfig, doc=(
        "Options of dist.backend=horovod."))
    fsdp: FSDPConfig = setting(factory=FSDPConfig, doc="Options of dist.strategy=fsdp.")


@dataclass
class ProfileConfig:
    wait: int = setting(0, check=at_least(0), resumable=True, doc=(
        "Optimizer steps skipped before profiling (torch.profiler.schedule's wait)."))
    warmup: int = setting(0, check=at_least(0), resumable=True, doc=(
        "Steps profiled but discarded after the wait (the profiler's own start-up cost)."))
    active: int = setting(0, check=at_least(0), resumable=True, doc=(
        "Steps recorded into <out_dir>/profile/rank<r>.*.pt.trace.json; 0: no profiler."))
    repeat: int = setting(1, check=at_least(0), resumable=True, doc=(
        "Wait-warmup-active cycles, one trace file per cycle; 0: until the run ends."))
    ranks: list = setting(factory=lambda: [0], resumable=True, doc=(
        "The ranks that profile; each prints its top operators when the run ends."))


@dataclass
class LoggingConfig:
    tensorboard: bool = setting(False, resumable=True, doc=(
        "Write each metrics.jsonl row's numbers as TensorBoard scalars to "
        "<out_dir>/tensorboard."))
    plot: bool = setting(True, resumable=True, doc=(
        "Draw the learning curves to <out_dir>/curves.png when the run ends (rank 0)."))
    mlflow_uri: str = setting("", resumable=True, doc=(
        "MLflow tracking URI (http://host:port, sqlite:///file.db, or a folder: a database "
        "<folder>/mlflow.db with the artifacts in <folder>/artifacts; a folder that is an "
        "MLflow 2 file store stays one): rank 0 logs the config, "
        "every metrics.jsonl row, step losses and the run's files there, from a background "
        "thread that training never waits for; empty: off."))
    mlflow_experiment: str = setting("distrain", resumable=True, doc=(
        "MLflow experiment the run belongs to (created when missing)."))
    wandb: Literal[False, "offline", "online"] = setting(False, resumable=True, doc=(
        "Weights & Biases: offline writes <out_dir>/wandb/offline-run-* for a later `wandb "
        "sync`; online uploads as it trains (needs network and `wandb login`); false (or off): "
        "none."))
    wandb_project: str = setting("distrain", resumable=True, doc=(
        "Weights & Biases project of the run."))
    tracker_unreachable: Literal["warn", "stop"] = setting("warn", resumable=True, doc=(
        "A tracker that cannot be reached at the start (no answer within "
        "logging.tracker_timeout_s): warn says so in one line and trains on without it; stop "
        "ends the run with exit 2 before training."))
    tracker_timeout_s: float = setting(20.0, check=at_least(1), resumable=True, doc=(
        "Seconds a tracker may take to start, and at the end to send what it still holds "
        "(a server away mid-run gets every point it missed once back; the closing line "
        "counts what it never got)."))
    log_best_checkpoint: bool = setting(False, resumable=True, doc=(
        "Also upload checkpoints/best.pt (best.dcp under FSDP) to the trackers when the run "
        "finishes (an MLflow artifact, a W&B model artifact)."))
    profile: ProfileConfig = setting(factory=ProfileConfig, resumable=True, doc=(
        "torch.profiler over optimizer steps (schedule: wait, warmup, active; repeat), on the "
        "listed ranks; traces open in TensorBoard's profiler plugin and Perfetto."))


@dataclass
class Config:
    run: RunConfig = setting(factory=RunConfig, doc="Where the run writes and how it is seeded.")
    data: DataConfig = setting(factory=DataConfig, doc="The data set and how it is batched.")
    model: ModelConfig = setting(factory=ModelConfig, doc="The network.")
    loss: LossConfig = setting(factory=LossConfig, doc="The training objective.")
    augment: AugmentConfig = setting(factory=AugmentConfig, doc=(
        "Batch-level augmentation on the device (Mixup, CutMix)."))
    optimizer: OptimizerConfig = setting(factory=OptimizerConfig, doc=(
        "The optimizer and its learning rate."))
    scheduler: SchedulerConfig = setting(factory=SchedulerConfig, doc=(
        "The learning-rate schedule."))
    train: TrainConfig = setting(factory=TrainConfig, doc="The training loop.")
    validate: ValidateConfig = setting(factory=ValidateConfig, doc="How and when validation runs.")
    checkpoint: CheckpointConfig = setting(factory=CheckpointConfig, doc=(
        "What is saved and resumed."))
    dist: DistConfig = setting(factory=DistConfig, doc=(
        "How the processes train together: the backend, the strategy (ddp, fsdp) and their "
        "options, hang detection and cross-rank checks."))
    logging: LoggingConfig = setting(factory=LoggingConfig, doc=(
        "What a run writes besides metrics.jsonl: TensorBoard scalars, a PNG of the curves, "
        "experiment trackers (MLflow, Weights & Biases), profiler traces."))

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


def field_docs(cls: type) -> dict[str, str]:
    """{field: its documentation} of a config section."""
    return {f.name: f.metadata["doc"] for f in dataclasses.fields(cls) if "doc" in f.metadata}


def settings(cls: type = None, prefix: str = "") -> typing.Iterator[tuple[str, dataclasses.Field, Any]]:
    """Every leaf key of the config as (`section.key`, its field, its type), sections
    flattened (`logging.profile.wait`)."""
    cls = cls or Config
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            yield from settings(tp, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", f, tp


def resumable_keys() -> frozenset[str]:
    """The leaf `section.key`s a resume may change (field metadata `resumable`); the resume
    rule compares configs leaf by leaf, nested sections included."""
    return frozenset(key for key, f, _ in settings() if f.metadata.get("resumable"))
