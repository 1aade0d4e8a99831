"""torch.distributed with DDP: gloo on CPU, nccl on GPU.

The process group is set up from torchrun's variables (RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR, MASTER_PORT) or, under plain `mpirun`/`srun` without them, bootstrapped
from MPI (see `mpi_env`).
"""

from __future__ import annotations

import contextlib
import os
import sys
from datetime import timedelta
from typing import Any, Callable, ContextManager

import torch
import torch.distributed as dist
from torch import nn

from distrain.distributed.backend import (
    COLLECTIVE_SLACK_S,
    Backend,
    BlocksOf,
    WrappedModel,
    check_op,
    has_sparse_gradients,
)
from distrain.distributed.environment import TORCHRUN_ENV, under_mpi, under_torchrun
from distrain.distributed.mpi import mpi_env
from distrain.errors import ConfigError


class TorchrunBackend(Backend):
    """torch.distributed under torchrun (or any launcher that sets its env:// variables)."""

    name = "torchrun"

    @staticmethod
    def detect() -> bool:
        return under_torchrun()

    def __init__(self, device: str = "auto", timeout_s: float = 600.0, debug: bool = False,
                 sum_grads: bool = True) -> None:
        super().__init__(device, timeout_s, debug, sum_grads)
        self.grad_allreduces = 0  # DDP buckets reduced (_allreduce_hook)
        if not self.detect() and under_mpi():
            os.environ.update(mpi_env())  # Distribution: MPI tells us what torchrun would have
        missing = [k for k in TORCHRUN_ENV if k not in os.environ]
        if missing:
            raise ConfigError(f"dist.backend: 'torchrun' needs the variables torchrun sets, missing "
                              f"{', '.join(missing)}; launch with `torchrun --nproc-per-node N -m "
                              f"distrain train ...` or under mpirun, or use dist.backend=auto")
        self.rank = int(os.environ["RANK"])
        self.world_size = int(os.environ["WORLD_SIZE"])
        self.local_rank = int(os.environ["LOCAL_RANK"])
        self.local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", self.world_size))

    groups_made = 0  # by this process: each gets its own store prefix
    rendezvous: tuple | None = None  # (its environment, store, rank, world size)

    def setup(self) -> None:
        self.device = self._pick_device()
        if not dist.is_initialized():
            # nccl for GPU tensors, gloo for CPU ones. The collective timeout is a backstop:
            # distrain's watchdog (dist.timeout_s) fires first, with stacks and a message.
            timeout = timedelta(seconds=self.timeout_s + COLLECTIVE_SLACK_S)
            # One rendezvous per process: a later group (an Engine after a closed one) reuses
            # its store under a new prefix rather than racing a second TCPStore on rank 0's
            # port against the first one's shutdown.
            where = tuple(os.environ.get(k) for k in ("MASTER_ADDR", "MASTER_PORT", "RANK",
                                                      "WORLD_SIZE", "TORCHELASTIC_RUN_ID"))
            if TorchrunBackend.rendezvous is None or TorchrunBackend.rendezvous[0] != where:
                TorchrunBackend.rendezvous = (where, *next(dist.rendezvous("env://",
                                                                          timeout=timeout)))
            _, store, rank, world_size = TorchrunBackend.rendezvous
            # Distribution: torchrun's agent keeps one TCPStore across restarts of the worker
            # group (--max-restarts); without a per-attempt prefix a restarted group reads the
            # dead group's addresses and hangs or is refused in gloo's connectFullMesh.
            # The same for a second group made in one process (an Engine after a closed one):
            # every rank makes its groups in the same order, so the counter agrees.
            attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
            TorchrunBackend.groups_made += 1
            store = dist.PrefixStore(
                f"distrain/attempt{attempt}/group{TorchrunBackend.groups_made}", store)
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo",
                                    store=store, rank=rank, world_size=world_size,
                                    timeout=timeout)
        self.install_guard()

    def teardown(self) -> None:
        self.uninstall_guard()
        if dist.is_initialized():
            dist.destroy_process_group()

    def wrap_model(self, model: nn.Module, blocks: BlocksOf | None = None) -> nn.Module:
        ids = [self.local_rank] if self.device.type == "cuda" else None
        # DDP broadcasts rank 0's parameters at construction and all-reduces gradients in backward.
        # gradient_as_bucket_view: the gradients live in the allreduce buckets, saving a copy of
        # every gradient in and out of them each step.
        ddp = nn.parallel.DistributedDataParallel(model, device_ids=ids,
                                                  gradient_as_bucket_view=True)
        ddp.register_comm_hook(_SyncState(self, ddp), _allreduce_hook)
        return ddp

    def unwrap(self, model: nn.Module) -> nn.Module:
        model = super().unwrap(model)
        return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model

    def no_sync(self, model: nn.Module) -> ContextManager:
        if isinstance(model, WrappedModel):
            model = model.wrapper
        if isinstance(model, nn.parallel.DistributedDataParallel):
            return model.no_sync()
        return contextlib.nullcontext()

    def wrap_optimizer(self, optimizer: torch.optim.Optimizer, model: nn.Module,
                       grad_accum_steps: int) -> torch.optim.Optimizer:
        return optimizer  # DDP syncs in backward; the optimizer steps as it is

    def all_reduce(self, tensor: torch.Tensor, op: str = "sum", name: str | None = None
                   ) -> torch.Tensor:
        return self.all_reduce_async(tensor, op)()

    def all_reduce_async(self, tensor: torch.Tensor, op: str = "sum") -> Callable[[], torch.Tensor]:
        check_op(op)
        # gloo has no AVG: mean is a sum divided afterwards (on every backend alike).
        reduce_op = {"sum": dist.ReduceOp.SUM, "mean": dist.ReduceOp.SUM,
                     "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}[op]
        work = dist.all_reduce(tensor, reduce_op, async_op=True)

        def wait() -> torch.Tensor:
            work.wait()
            return tensor.div_(self.world_size) if op == "mean" else tensor
        return wait

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

    def count_gradient_syncs(self) -> Callable[[], int]:
        return lambda: self.grad_allreduces  # counted by the DDP comm hook

    def sync_text(self) -> str:
        group = dist.get_backend() if dist.is_initialized() else "?"
        return f"torch.distributed, DDP over {group}: every rank holds the whole model"

    def describe(self) -> dict:
        info = super().describe()
        info["process_group"] = dist.get_backend() if dist.is_initialized() else None
        info["master"] = f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}"
        return info


class _SyncState:
    """What distrain's DDP comm hook knows: the backend, and the order in which this process's
    first synced backward produced its gradients.

    Distribution: on a process's first synced backward DDP reduces every gradient in one
    bucket; at the next synced forward its Reducer rebuilds the buckets from the order the
    gradients became ready (rank 0's; `Reducer::rebuild_buckets`) and keeps them. A ring
    allreduce sums each element in an order set by its place in its buffer, so a run resumed
    at step k would reduce step k in one bucket where the uninterrupted run used the rebuilt
    ones: different floats from 3 processes on (2 numbers sum alike in any order). So the
    first synced backward reduces its one bucket as the rebuilt buckets will be reduced (the
    same assignment, torch's own function, over the same order, one allreduce each), and the
    next one checks that DDP did rebuild to exactly that layout. Every step of every run then
    sums in the same order, whether or not the process just started."""

    def __init__(self, backend: TorchrunBackend, ddp: nn.parallel.DistributedDataParallel
                 ) -> None:
        self.backend = backend
        self.layout: list[list[torch.Tensor]] = []  # the buckets to be, parameters in order
        self._clock = 0
        self._ready: dict[int, int] = {}  # id(parameter) -> when its gradient was last ready
        config = getattr(ddp, "_bucket_config", None)  # torch >= 2.14
        first = config.first_bucket_bytes_cap if config else dist._DEFAULT_FIRST_BUCKET_BYTES
        self._limits = [first, ddp.bucket_bytes_cap]
        # Sparse gradients get buckets of their own (no flat views); per-bucket caps make
        # torch rebuild by other limits: both keep DDP's own first step.
        self.exact = not getattr(ddp, "bucket_bytes_cap_list", None) and \
            not has_sparse_gradients(ddp.module)
        # "first" -> "check" (the first rebuilt backward) -> "steady"
        self.phase = "first" if self.exact else "steady"
        self._handles = [p.register_post_accumulate_grad_hook(self._stamp)
                         for p in ddp.module.parameters() if p.requires_grad] if self.exact \
            else []

    def _stamp(self, param: torch.Tensor) -> None:
        self._clock += 1
        self._ready[id(param)] = self._clock

    def first_reduce(self, bucket) -> torch.futures.Future:
        """The one bucket of the first synced backward, reduced as the rebuilt buckets will be."""
        params, grads = bucket.parameters(), bucket.gradients()
        order = sorted(range(len(params)), key=lambda i: self._ready.get(id(params[i]), 0))
        reverse = os.environ.get("DDP_SET_LAST_BUCKET_CAP") == "1"  # the Reducer reverses then
        order_t = torch.tensor([*order, int(reverse)], dtype=torch.int64,
                               device=bucket.buffer().device)
        dist.broadcast(order_t, 0)  # the Reducer rebuilds from rank 0's order (and setting)
        *order, reverse = order_t.tolist()
        if reverse:
            order = order[::-1]
        groups, _ = dist._compute_bucket_assignment_by_size(
            [params[i] for i in order], self._limits, [False] * len(order), order)
        for group in groups:
            flat = torch.cat([grads[i].reshape(-1) for i in group])
            if not self.backend.sums_gradients():
                flat.div_(self.backend.world_size)
            dist.all_reduce(flat)
            offset = 0
            for i in group:
                n = grads[i].numel()
                grads[i].view(-1).copy_(flat[offset:offset + n])
                offset += n
            self.layout.append([params[i] for i in group])
        self.backend.grad_allreduces += len(groups) - 1
        fut: torch.futures.Future = torch.futures.Future()
        fut.set_result(bucket.buffer())
        return fut

    def check(self, bucket) -> None:
        """The first rebuilt backward: each bucket is one the first step reduced, in its order."""
        if not self.layout:
            return
        ids = [id(p) for p in bucket.parameters()]
        if not any(ids == [id(p) for p in group] for group in self.layout):
            if self.backend.rank == 0:
                print("distrain: warning: DDP's rebuilt gradient buckets differ from the layout "
                      "distrain reduced the first step with; a resumed run sums its first step "
                      "in another order (bitwise equal to the uninterrupted run at 2 processes "
                      "only)", file=sys.stderr, flush=True)
            self.layout = []  # warned once

    def end_of_backward(self) -> None:
        self.phase = {"first": "check", "check": "steady"}.get(self.phase, "steady")
        for handle in self._handles:
            handle.remove()
        self._handles, self._ready = [], {}


def _allreduce_hook(state: _SyncState, bucket):  # DDP rejects string annotations here
    """DDP's default divides every bucket by world_size and then sums it: a pass over every
    gradient each step. Where distrain divides the loss
    instead (Backend.loss_factor) the bucket is summed as it is; for a power-of-two world the
    floats are the same. Counts the allreduces for the accumulation benchmark and its tests.
    The first synced backward is reduced bucket by rebuilt bucket (see _SyncState)."""
    backend = state.backend
    backend.grad_allreduces += 1
    phase = state.phase
    if phase != "steady":
        if phase == "first":
            fut = state.first_reduce(bucket)
        else:
            state.check(bucket)
        if bucket.is_last():
            state.end_of_backward()
        if phase == "first":
            return fut
    buffer = bucket.buffer()
    if not backend.sums_gradients():  # fp16: the loss is not divided, average as DDP does
        buffer.div_(backend.world_size)
    work = dist.all_reduce(buffer, async_op=True)
    return work.get_future().then(lambda fut: fut.value()[0])
