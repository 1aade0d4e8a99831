"""Horovod: `horovodrun -np N` (Gloo or MPI controller) or `mpirun` with Horovod installed.

Horovod's DistributedOptimizer owns the gradient allreduce: it counts backward passes
(`backward_passes_per_step` = grad_accum_steps) and the loop calls `synchronize()`
before unscaling/clipping and steps inside `skip_synchronize()` (Horovod's AMP order).
"""

from __future__ import annotations

import contextlib
import os
from typing import Any, Callable, ContextManager

import torch
from torch import nn

from distrain.config import HorovodConfig
from distrain.distributed.backend import (
    COLLECTIVE_SLACK_S,
    Backend,
    BlocksOf,
    check_op,
    has_sparse_gradients,
)
from distrain.distributed.environment import under_horovodrun
from distrain.errors import ConfigError

INSTALL_HINT = ("Horovod is not installed in this environment; run ./launcher/setup (it builds "
                "Horovod 0.28.1 with PyTorch, Gloo and MPI; needs torch>=2.1,<2.14), or use "
                "dist.backend=torchrun")


def horovod_available() -> bool:
    try:
        import horovod.torch  # noqa: F401
    except ImportError:
        return False
    return True


GROUP_BYTES = 25 << 20  # DDP's bucket size


def gradient_groups(model: nn.Module, cap: int = GROUP_BYTES) -> list[list[torch.Tensor]]:
    """The parameters in fixed groups of up to `cap` bytes, last registered first (about the
    order backward produces their gradients).

    Distribution: Horovod fuses whatever tensors all ranks have ready in a cycle, so the
    place of a gradient in the fused buffer, and with it the order in which a ring allreduce
    sums it, depends on timing: from 3 processes on two identical runs differ (2.8e-7 after
    3 epochs of digits at 3 processes, Gloo). A group is allreduced when all its gradients
    are ready and, with HOROVOD_DISABLE_GROUP_FUSION, fused alone in its own order: the same
    sums at every step of every run."""
    groups: list[list[torch.Tensor]] = [[]]
    size = 0
    for param in reversed([p for p in model.parameters() if p.requires_grad]):
        nbytes = param.numel() * param.element_size()
        if groups[-1] and size + nbytes > cap:
            groups.append([])
            size = 0
        groups[-1].append(param)
        size += nbytes
    return [g for g in groups if g]


def _reduce_short_windows_by_group(optimizer) -> None:
    """A short accumulation window (an epoch's last, fewer than backward_passes_per_step
    passes) reaches synchronize() with no allreduce started; Horovod's synchronize then
    allreduces each missing gradient on its own, fused by timing again. Start those as the
    groups' allreduces first, as the hooks would have."""
    synchronize = optimizer.synchronize

    def grouped_synchronize():
        started = set()  # a group's allreduce is keyed by the group's tuple
        for key, (handle, _) in optimizer._handles.items():
            if isinstance(key, tuple):
                started.update(key)
            elif handle is not None:
                started.add(key)
        waiting = [p for p in optimizer._requires_update if p not in started]
        for group in dict.fromkeys(optimizer._p_to_group[p] for p in waiting):
            for p in group:
                optimizer._handles.pop(p, None)
                if p.grad is None:  # unused in this step: zeros, as Horovod's own path sends
                    p.grad = torch.zeros_like(p)
            optimizer._handles[group] = optimizer._grouped_allreduce_grad_async(group)
            optimizer._group_counts[group] = 0
        synchronize()

    optimizer.synchronize = grouped_synchronize


class HorovodBackend(Backend):
    name = "horovod"
    counts_backward_passes = True  # backward_passes_per_step: no sync per micro-batch

    @staticmethod
    def detect() -> bool:
        return under_horovodrun()

    def __init__(self, device: str = "auto", options: HorovodConfig | None = None,
                 timeout_s: float = 600.0, debug: bool = False, sum_grads: bool = True
                 ) -> None:
        super().__init__(device, timeout_s, debug, sum_grads)
        try:
            import horovod.torch as hvd
        except ImportError as exc:
            raise ConfigError(f"backend: 'horovod': {INSTALL_HINT} ({exc})") from None
        self.hvd = hvd
        self.options = options or HorovodConfig()
        # horovodrun sets this for --min-np/--max-np/--host-discovery-script jobs.
        self.elastic = os.environ.get("HOROVOD_ELASTIC") == "1"

    def setup(self) -> None:
        hvd = self.hvd
        # Horovod: its stall check warns at dist.timeout_s and shuts down a little later (a
        # backstop: it fires under the MPI controller only; distrain's watchdog fires for both).
        os.environ.setdefault("HOROVOD_STALL_CHECK_TIME_SECONDS", str(int(self.timeout_s)))
        os.environ.setdefault("HOROVOD_STALL_SHUTDOWN_TIME_SECONDS",
                              str(int(self.timeout_s + COLLECTIVE_SLACK_S)))
        # Distribution: each fixed gradient group (wrap_optimizer) is fused on its own, in its
        # own order, never with whatever else happens to be ready in the same 1 ms cycle.
        # Not under elastic horovodrun: a worker that joins after a reset hung there.
        if not self.elastic:
            os.environ.setdefault("HOROVOD_DISABLE_GROUP_FUSION", "1")
        hvd.init()
        if self.options.op == "adasum" and not hvd.mpi_enabled():
            raise ConfigError("dist.horovod.op: 'adasum' needs Horovod's MPI controller (horovodrun "
                              "--mpi, or mpirun); the Gloo controller has no Adasum")
        self.refresh()
        if self.options.op == "adasum" and self.world_size & (self.world_size - 1):
            raise ConfigError(f"dist.horovod.op: 'adasum' needs a power-of-2 number of "
                              f"processes (Horovod's Adasum), got {self.world_size}; launch "
                              f"{1 << (self.world_size.bit_length() - 1)} or "
                              f"{1 << self.world_size.bit_length()}, or use op average")
        self.device = self._pick_device()  # Horovod: pin the GPU by local rank
        self.install_guard()

    def refresh(self) -> None:
        """Read rank and sizes from Horovod (again after an elastic reset)."""
        hvd = self.hvd
        self.rank, self.world_size = hvd.rank(), hvd.size()
        self.local_rank, self.local_world_size = hvd.local_rank(), hvd.local_size()

    def teardown(self) -> None:
        self.uninstall_guard()
        self.hvd.shutdown()

    def wrap_optimizer(self, optimizer: torch.optim.Optimizer, model: nn.Module,
                       grad_accum_steps: int) -> torch.optim.Optimizer:
        hvd, opts = self.hvd, self.options
        # Horovod: start from rank 0's weights. The optimizer state is broadcast only after a
        # resume: on an empty state hvd.broadcast_optimizer_state takes a zero-gradient step,
        # which weight decay and Adam's step count would notice.
        if not self.elastic:  # elastic: the first state sync broadcasts them
            hvd.broadcast_parameters(model.state_dict(), root_rank=0)
        op = hvd.Adasum if opts.op == "adasum" else hvd.Sum if self.sums_gradients() else hvd.Average
        # Horovod's grouped allreduce has no predivide factor, and a sparse gradient needs
        # its own (sparse) allreduce: both keep Horovod's per-tensor path.
        plain = opts.op == "adasum" or self.elastic or has_sparse_gradients(model) or \
            opts.gradient_predivide_factor != 1.0
        groups = None if plain else gradient_groups(model)
        wrapped = hvd.DistributedOptimizer(
            optimizer, named_parameters=model.named_parameters(),
            backward_passes_per_step=grad_accum_steps,
            compression=hvd.Compression.fp16 if opts.compression == "fp16" else hvd.Compression.none,
            op=op, gradient_predivide_factor=opts.gradient_predivide_factor, groups=groups)
        if groups:
            _reduce_short_windows_by_group(wrapped)
        return wrapped

    def set_accumulation(self, optimizer: torch.optim.Optimizer, accum: int) -> None:
        optimizer.set_backward_passes_per_step(accum)  # Horovod: its hooks count the passes

    def fused_optimizer_ok(self) -> bool:
        # Horovod re-creates the optimizer class around its hooks: fused kernels untested there.
        return False

    def sums_gradients(self) -> bool:
        """Average = sum, then a pass over every gradient scaling it by 1/world_size. Summing
        gradients whose loss was already divided by world_size (loss_factor) skips that pass;
        bitwise the same for power-of-two world sizes. Adasum
        is not a mean, a predivide factor asks for Horovod's own split of the division, and
        fp16 compression would carry gradients divided by world_size in half precision."""
        opts = self.options
        return self.sum_grads and opts.op == "average" and opts.compression == "none" and \
            opts.gradient_predivide_factor == 1.0

    def synchronize(self, optimizer: torch.optim.Optimizer) -> None:
        # Horovod: wait for the allreduce (also the short last window of an epoch, where fewer
        # than backward_passes_per_step passes ran: synchronize() reduces what it has).
        optimizer.synchronize()

    def can_drop_step(self) -> bool:
        return self.options.op != "adasum"  # Adasum's backward already moved the weights

    def skip_synchronize(self, optimizer: torch.optim.Optimizer) -> ContextManager:
        if self.options.op == "adasum":  # Adasum reduces inside step(); there is nothing to skip
            return contextlib.nullcontext()
        return optimizer.skip_synchronize()

    def wrap_model(self, model: nn.Module, blocks: BlocksOf | None = None) -> nn.Module:
        return model  # Horovod: the optimizer's hooks sync the gradients

    def no_sync(self, model: nn.Module) -> ContextManager:
        # Horovod: the optimizer counts backward passes (backward_passes_per_step) instead.
        return contextlib.nullcontext()

    def _op(self, op: str):
        check_op(op)
        hvd = self.hvd
        return {"sum": hvd.Sum, "mean": hvd.Average, "max": hvd.Max, "min": hvd.Min}[op]

    def all_reduce(self, tensor: torch.Tensor, op: str = "sum", name: str | None = None
                   ) -> torch.Tensor:
        return self.hvd.allreduce_(tensor, op=self._op(op), name=name)

    def all_reduce_async(self, tensor: torch.Tensor, op: str = "sum") -> Callable[[], torch.Tensor]:
        hvd = self.hvd
        handle = hvd.allreduce_async_(tensor, op=self._op(op), name="distrain.async")
        return lambda: hvd.synchronize(handle)

    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
        return self.hvd.broadcast_(tensor, root_rank=src)

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        # Horovod: name it explicitly; the default name is the object's type, which differs
        # when non-root ranks pass None, and mismatched names hang the broadcast.
        return self.hvd.broadcast_object(obj, root_rank=src, name="distrain.object")

    def all_gather_object(self, obj: Any) -> list:
        return self.hvd.allgather_object(obj, name="distrain.gather")

    def barrier(self) -> None:
        self.hvd.barrier()

    def broadcast_training_state(self, model: nn.Module, optimizer: torch.optim.Optimizer
                                 ) -> None:
        # Horovod: optimizer state first (non-root ranks initialise theirs with a zero step that
        # may touch the weights), then the parameters, which overwrite any such change.
        self.hvd.broadcast_optimizer_state(optimizer, root_rank=0)
        self.hvd.broadcast_parameters(model.state_dict(), root_rank=0)

    def count_gradient_syncs(self) -> Callable[[], int]:
        """Counts the optimizer hooks' per-tensor allreduce calls from now on."""
        import horovod.torch.optimizer as hopt

        calls = [0]
        original, grouped = hopt.allreduce_async_, hopt.grouped_allreduce_async_

        def counting(*args, **kwargs):
            calls[0] += 1
            return original(*args, **kwargs)

        def counting_grouped(tensors, *args, **kwargs):
            calls[0] += len(tensors)  # per tensor, as the ungrouped hooks count
            return grouped(tensors, *args, **kwargs)

        hopt.allreduce_async_, hopt.grouped_allreduce_async_ = counting, counting_grouped
        return lambda: calls[0]

    def sync_text(self) -> str:
        return f"Horovod, {self.describe()['controller']} controller: every rank holds the " \
               "whole model"

    def describe(self) -> dict:
        info = super().describe()
        info["controller"] = "mpi" if self.hvd.mpi_enabled() and self.hvd.mpi_built() else "gloo"
        return info
