"""What `Engine(strategy=...)` takes: how the weights are kept across ranks, with that way's
own options in one object (as `dist.strategy`, `dist.fsdp` and `dist.horovod` in YAML).

    distrain.DDP()                       every rank holds all weights; gradients averaged
    distrain.FSDP(blocks=["Block"])      each rank holds a shard of each block (torch.distributed)
    distrain.Horovod(op="adasum")        DDP's layout, with Horovod's options (horovodrun/mpirun)

The launcher decides the backend (torchrun, horovodrun, mpirun, one process); DDP() means
torch's DDP under torchrun and Horovod's allreduce under horovodrun. `blocks`,
`activation_checkpointing` and `compile` are common to all three."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

from distrain.config import Config, FSDPConfig, HorovodConfig
from distrain.errors import ConfigError, MisuseError


@dataclass(kw_only=True)
class Strategy:
    """blocks: the model's repeated blocks, as class names (`["Block"]`), a function of the
    model returning its blocks, or None (the children of each nn.ModuleList, see
    distrain/components/blocks.py), as model.blocks in YAML; FSDP shards per block and
    activation checkpointing recomputes per block. activation_checkpointing: recompute each block's
    activations in backward (less memory, one more forward). compile: torch.compile the
    wrapped model."""

    blocks: list[str] | Callable | None = None
    activation_checkpointing: bool = False
    compile: bool = False
    kind: ClassVar[str] = "ddp"  # the backend's `strategy` this asks for

    def __post_init__(self) -> None:
        """The options of the config sections (dist.fsdp.*, dist.horovod.*) checked as
        their YAML keys are: a misspelt value is a MisuseError, not a silent default."""
        import typing

        from distrain.config.load import _coerce

        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            if f.name == "blocks":
                continue
            value, bound = getattr(self, f.name), f.metadata.get("check")
            try:
                _coerce(value, hints[f.name], f.name)
            except ConfigError as exc:
                raise MisuseError(f"{type(self).__name__}({f.name}=...): {exc}") from None
            if bound is not None and not bound.ok(value):
                raise MisuseError(f"{type(self).__name__}({f.name}=...): expected "
                                  f"{bound.describe(hints[f.name])}, got {value!r}")


@dataclass(kw_only=True)
class DDP(Strategy):
    """Every rank holds all weights; gradients averaged (torch's DDP under torchrun,
    Horovod's allreduce with its defaults under horovodrun or mpirun)."""


@dataclass(kw_only=True)
class FSDP(Strategy, FSDPConfig):
    """Each rank holds a shard of each block's weights, gradients and optimizer state
    (PyTorch's FSDP2 over torch.distributed; under mpirun, torch.distributed bootstrapped
    from MPI). reshard_after_forward, mixed_precision, cpu_offload: as dist.fsdp.*."""

    kind: ClassVar[str] = "fsdp"


@dataclass(kw_only=True)
class Horovod(Strategy, HorovodConfig):
    """DDP's layout with Horovod's options (op, compression, gradient_predivide_factor, as
    dist.horovod.*); for runs under horovodrun or mpirun with Horovod installed (one local
    process: nothing to sync, the options are unused)."""


# Engine keywords of distrain before 2026-12, now inside the strategy or Checkpoints objects.
MOVED = {"blocks": "strategy=distrain.DDP(blocks=...) (or FSDP(...))",
         "activation_checkpointing": "strategy=distrain.DDP(activation_checkpointing=True)",
         "compile": "strategy=distrain.DDP(compile=True)",
         "fsdp": "strategy=distrain.FSDP(reshard_after_forward=..., ...)",
         "horovod": "strategy=distrain.Horovod(op=..., compression=...)",
         "keep_last": "checkpoints=distrain.Checkpoints(keep_last=...)",
         "async_save": "checkpoints=distrain.Checkpoints(async_save=True)",
         "sharded_checkpoints": "checkpoints=distrain.Checkpoints(sharded=...)"}


def refuse_moved(call: str, keywords: dict) -> None:
    """A MisuseError naming where each keyword of `call` went; unknown ones as Python would
    (none: nothing to say)."""
    if not keywords:
        return
    for key in keywords:
        if key not in MOVED:
            raise TypeError(f"{call} got an unexpected keyword argument {key!r}")
    moved = "; ".join(f"{key}= is now {MOVED[key]}" for key in keywords)
    raise MisuseError(f"{call}: {moved}")


def as_strategy(strategy: str | Strategy | None, default: str = "ddp") -> Strategy:
    """"ddp" and "fsdp" as the objects with their defaults (None: `default`, the strategy of
    a backend object the caller set up); an object as given."""
    if isinstance(strategy, Strategy):
        return strategy
    strategy = default if strategy is None else strategy
    if strategy == "ddp":
        return DDP()
    if strategy == "fsdp":
        return FSDP()
    raise MisuseError(f"Engine(strategy=...): expected distrain.DDP(), distrain.FSDP(), "
                      f"distrain.Horovod() or the names 'ddp'/'fsdp', got {strategy!r}")


def check_backend(strategy: Strategy, backend_name: str, backend_strategy: str) -> None:
    """The strategy agrees with the backend the launcher (or the caller) gave: a mismatch is
    a MisuseError naming both (Horovod's options under torchrun would be silently unused)."""
    if isinstance(strategy, Horovod) and backend_name not in ("horovod", "local"):
        raise MisuseError(f"Engine(strategy=distrain.Horovod(...)): this process runs under "
                          f"the {backend_name} backend, not Horovod; launch with horovodrun (or "
                          f"mpirun with Horovod installed), or use strategy=distrain.DDP()")
    if backend_name != "local" and strategy.kind != backend_strategy:
        raise MisuseError(f"Engine(strategy={type(strategy).__name__}(...)): the backend given "
                          f"was set up for {backend_strategy!r}; make them agree")


def config_strategy(cfg: Config, backend_strategy: str) -> Strategy:
    """The config trainer's strategy object for a backend set up for `backend_strategy`
    (Horovod's options live in that backend already)."""
    common = {"blocks": cfg.model.blocks, "compile": cfg.train.compile,
              "activation_checkpointing": cfg.train.activation_checkpointing}
    if backend_strategy == "fsdp":
        return FSDP(**common, **dataclasses.asdict(cfg.dist.fsdp))
    return DDP(**common)
