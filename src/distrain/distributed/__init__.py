"""Backends: everything distributed. The loop only ever calls a `Backend`'s methods."""

from __future__ import annotations

import platform
import sys

import torch
import torch.distributed as dist

from distrain.config import Config, FSDPConfig, HorovodConfig
from distrain.distributed.backend import Backend, LocalBackend
from distrain.distributed.environment import detect_launcher
from distrain.distributed.fsdp import FSDPBackend
from distrain.distributed.horovod import HorovodBackend, horovod_available
from distrain.distributed.strategy import FSDP, Horovod, Strategy, check_backend, config_strategy
from distrain.distributed.torchrun import TorchrunBackend
from distrain.errors import ConfigError

__all__ = ["Backend", "LocalBackend", "TorchrunBackend", "FSDPBackend", "HorovodBackend",
           "make_backend", "config_strategy",
           "create_backend", "detect_backend", "versions"]


def detect_backend() -> str:
    """torchrun's variables, then horovodrun's, then plain MPI (Horovod when installed, else
    torch.distributed bootstrapped from MPI), else one local process."""
    launcher = detect_launcher()
    if launcher == "mpirun":
        return "horovod" if horovod_available() else "torchrun"
    return {"torchrun": "torchrun", "horovodrun": "horovod"}.get(launcher, "local")


def make_backend(cfg: Config) -> Backend:
    """The backend the config names (`auto`: detected from the launcher's environment)."""
    dist = cfg.dist
    return create_backend(dist.backend, cfg.run.device, timeout_s=dist.timeout_s,
                          debug=dist.debug, precision=cfg.train.precision,
                          horovod=dist.horovod, strategy=dist.strategy, fsdp=dist.fsdp)


def create_backend(name: str = "auto", device: str = "auto", *, timeout_s: float = 600.0,
                   debug: bool = False, precision: str = "fp32",
                   horovod: HorovodConfig | None = None, strategy: str | Strategy = "ddp",
                   fsdp: FSDPConfig | None = None) -> Backend:
    """A backend by name (`auto`: detected from the launcher's environment), not yet set up.
    strategy: ddp, or fsdp (sharded; torch.distributed only; one process trains unsharded),
    or an Engine strategy object (distrain.DDP/FSDP/Horovod: its options replace
    `horovod`/`fsdp`)."""
    if isinstance(strategy, Strategy):
        chosen = strategy
        horovod = strategy if isinstance(strategy, Horovod) else horovod
        fsdp = strategy if isinstance(strategy, FSDP) else fsdp
        backend = create_backend(name, device, timeout_s=timeout_s, debug=debug,
                                 precision=precision, horovod=horovod, strategy=chosen.kind,
                                 fsdp=fsdp)
        check_backend(chosen, backend.name, backend.strategy)
        return backend
    if name == "auto" and strategy == "fsdp" and detect_launcher() == "mpirun":
        name = "torchrun"  # Distribution: FSDP over torch.distributed bootstrapped from MPI
    name = detect_backend() if name == "auto" else name
    if strategy not in ("ddp", "fsdp"):
        raise ConfigError(f"dist.strategy: expected ddp or fsdp, got {strategy!r}")
    horovod = horovod or HorovodConfig()
    dist_options = {"timeout_s": timeout_s, "debug": debug,
                    # fp16 averages after the sum (see Backend.loss_factor)
                    "sum_grads": precision != "fp16"}
    if name == "torchrun" and strategy == "fsdp":
        return FSDPBackend(device, **dist_options, precision=precision, fsdp=fsdp)
    if name == "torchrun":
        return TorchrunBackend(device, **dist_options)
    if name == "horovod" and strategy == "fsdp":
        raise ConfigError("dist.strategy: expected ddp under Horovod (it replicates the weights), "
                          "got 'fsdp'; launch with torchrun, or mpirun with dist.backend=auto "
                          "or torchrun, for fsdp")
    if name == "horovod":
        if horovod.op == "adasum" and precision == "fp16":
            raise ConfigError("dist.horovod.op: 'adasum' cannot be combined with train.precision=fp16 "
                              "(ranks could disagree on skipping an overflowed step inside "
                              "Adasum's allreduce); use bf16 or fp32")
        return HorovodBackend(device, horovod, **dist_options)
    if name != "local":
        raise ConfigError(f"dist.backend: expected auto, local, torchrun or horovod, got {name!r}")
    return LocalBackend(device, **dist_options)


def start_backend(name: str = "auto", device: str = "auto", *,
                  strategy: str | Strategy = "ddp", **options) -> Backend:
    """create_backend(...), set up (the process group joined), and a warning on rank 0
    where FSDP was asked for and nothing is sharded."""
    backend = create_backend(name, device, strategy=strategy, **options)
    backend.setup()
    kind = strategy.kind if isinstance(strategy, Strategy) else strategy
    if backend.is_main and (warning := unsharded_warning(kind, backend)):
        print(warning, file=sys.stderr, flush=True)
    return backend


def unsharded_warning(strategy: str, backend: Backend) -> str | None:
    """What to tell a user who asked for FSDP where nothing is sharded (one process)."""
    if strategy != "fsdp" or backend.world_size > 1:
        return None
    return ("distrain: warning: dist.strategy=fsdp with one process: there is nothing to "
            "shard (every weight stays on this rank); launch N processes (torchrun "
            "--nproc-per-node N ...) to shard")


def versions() -> dict:
    info = {"python": platform.python_version(), "torch": torch.__version__,
            "cuda_available": torch.cuda.is_available(), "cuda": torch.version.cuda,
            "gloo": dist.is_gloo_available(), "nccl": dist.is_nccl_available()}
    if torch.cuda.is_available():
        info["gpus"] = torch.cuda.device_count()
    try:
        import horovod

        info["horovod"] = horovod.__version__
    except ImportError:
        info["horovod"] = None
    return info
