"""Everything distributed lives here; the training loop talks only to a `Backend`.

A backend owns rank, local rank, world size and device, the process group, the
model/optimizer wrappers and the collectives the loop needs. `LocalBackend` is one
process; `TorchrunBackend` is torch.distributed (gloo on CPU, nccl on GPU) with DDP.
A Horovod backend implements the same methods (`synchronize`/`skip_synchronize`
exist for it: Horovod's optimizer owns the gradient allreduce).
"""

from __future__ import annotations

import contextlib
import os
import platform
import socket
from typing import Any, ContextManager

import torch
import torch.distributed as dist
from torch import nn

from .config import ConfigError

_TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


class Backend:
    """One process: every collective is the identity."""

    name = "local"

    def __init__(self, device: str = "auto") -> None:
        self.rank = 0
        self.local_rank = 0
        self.world_size = 1
        self.local_world_size = 1
        self._device_choice = device
        self.device = torch.device("cpu")

    # -- rank vocabulary
    @property
    def is_main(self) -> bool:
        """Global rank 0: writes files and makes the run's decisions."""
        return self.rank == 0

    @property
    def is_local_main(self) -> bool:
        """Rank 0 of this node: node-local I/O only."""
        return self.local_rank == 0

    # -- lifecycle
    def setup(self) -> None:
        self.device = self._pick_device()

    def teardown(self) -> None:
        pass

    def _pick_device(self) -> torch.device:
        cuda = torch.cuda.is_available()
        if self._device_choice == "cuda" and not cuda:
            raise ConfigError("run.device: expected a visible CUDA device, got 'cuda' but "
                              "torch.cuda.is_available() is False; use run.device=auto or cpu")
        if cuda and self._device_choice != "cpu":
            torch.cuda.set_device(self.local_rank)
            return torch.device("cuda", self.local_rank)
        return torch.device("cpu")

    # -- wrappers
    def wrap_model(self, model: nn.Module) -> nn.Module:
        return model

    def unwrap(self, model: nn.Module) -> nn.Module:
        return model

    def wrap_optimizer(self, optimizer: torch.optim.Optimizer, model: nn.Module,
                       grad_accum_steps: int) -> torch.optim.Optimizer:
        return optimizer

    def no_sync(self, model: nn.Module) -> ContextManager:
        """Inside: backward accumulates locally without an allreduce."""
        return contextlib.nullcontext()

    def synchronize(self, optimizer: torch.optim.Optimizer) -> None:
        """Finish the gradient allreduce before unscale/clip (a no-op where backward did it)."""

    def skip_synchronize(self, optimizer: torch.optim.Optimizer) -> ContextManager:
        """Inside: optimizer.step() must not allreduce again."""
        return contextlib.nullcontext()

    # -- collectives (every rank must call them, never under `if is_main`)
    def all_reduce(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        return tensor

    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
        return tensor

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        return obj

    def all_gather_object(self, obj: Any) -> list:
        return [obj]

    def barrier(self) -> None:
        pass

    def broadcast_module(self, module: nn.Module, src: int = 0) -> None:
        """Make every rank's parameters and buffers equal to rank `src`'s."""
        for tensor in [*module.parameters(), *module.buffers()]:
            self.broadcast(tensor.data, src)

    def describe(self) -> dict:
        return {"backend": self.name, "rank": self.rank, "local_rank": self.local_rank,
                "world_size": self.world_size, "local_world_size": self.local_world_size,
                "host": socket.gethostname(), "device": str(self.device)}


LocalBackend = Backend


class TorchrunBackend(Backend):
    """torch.distributed under torchrun (or any launcher that sets its env:// variables)."""

    name = "torchrun"

    @staticmethod
    def detect(env: dict | None = None) -> bool:
        env = os.environ if env is None else env
        return all(k in env for k in _TORCHRUN_ENV)

    def __init__(self, device: str = "auto") -> None:
        super().__init__(device)
        missing = [k for k in _TORCHRUN_ENV if k not in os.environ]
        if missing:
            raise ConfigError(f"backend: 'torchrun' needs the variables torchrun sets, missing "
                              f"{', '.join(missing)}; launch with `torchrun --nproc-per-node N -m "
                              f"distrain train ...` or use backend=auto")
        self.rank = int(os.environ["RANK"])
        self.world_size = int(os.environ["WORLD_SIZE"])
        self.local_rank = int(os.environ["LOCAL_RANK"])
        self.local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", self.world_size))

    def setup(self) -> None:
        self.device = self._pick_device()
        if not dist.is_initialized():
            # nccl for GPU tensors, gloo for CPU ones.
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")

    def teardown(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()

    def wrap_model(self, model: nn.Module) -> nn.Module:
        ids = [self.local_rank] if self.device.type == "cuda" else None
        # DDP broadcasts rank 0's parameters at construction and all-reduces gradients in backward.
        return nn.parallel.DistributedDataParallel(model, device_ids=ids)

    def unwrap(self, model: nn.Module) -> nn.Module:
        return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model

    def no_sync(self, model: nn.Module) -> ContextManager:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            return model.no_sync()
        return contextlib.nullcontext()

    def all_reduce(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        ops = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}
        if op == "mean":
            dist.all_reduce(tensor, dist.ReduceOp.SUM)
            return tensor.div_(self.world_size)
        dist.all_reduce(tensor, ops[op])
        return tensor

    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
        dist.broadcast(tensor, src)
        return tensor

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        box = [obj]
        dist.broadcast_object_list(box, src)
        return box[0]

    def all_gather_object(self, obj: Any) -> list:
        out: list = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        dist.barrier()

    def describe(self) -> dict:
        info = super().describe()
        info["process_group"] = dist.get_backend() if dist.is_initialized() else None
        info["master"] = f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}"
        return info


BACKENDS: dict[str, type[Backend]] = {"local": LocalBackend, "torchrun": TorchrunBackend}


def make_backend(name: str = "auto", device: str = "auto") -> Backend:
    """The backend named in the config; `auto` detects torchrun's environment."""
    if name == "auto":
        name = "torchrun" if TorchrunBackend.detect() else "local"
    return BACKENDS[name](device)


def versions() -> dict:
    info = {"python": platform.python_version(), "torch": torch.__version__,
            "cuda_available": torch.cuda.is_available(),
            "cuda": torch.version.cuda, "gloo": dist.is_gloo_available(),
            "nccl": dist.is_nccl_available()}
    if torch.cuda.is_available():
        info["gpus"] = torch.cuda.device_count()
    return info
