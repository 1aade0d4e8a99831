"""dist.strategy=fsdp: PyTorch's FSDP2 (`fully_shard`) over the torch.distributed group.

Each block (model.blocks) and then the root are sharded: every rank keeps 1/world of the
weights, gradients and optimizer state. A block's weights are all-gathered before its
forward (and again before its backward when `reshard_after_forward`), its gradients
reduce-scattered after its backward. distrain keeps its own gradient weighting: the loss is
already divided by the global batch, so the reduce-scatter sums (no averaging pass), as
the DDP hook does (Backend.loss_factor).
"""

from __future__ import annotations

import contextlib
from typing import Callable, ContextManager, Iterator

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import (
    CPUOffloadPolicy,
    FSDPModule,
    MixedPrecisionPolicy,
    OffloadPolicy,
    fully_shard,
)
from torch.distributed.fsdp._fully_shard._fsdp_collectives import DefaultReduceScatter
from torch.distributed.tensor import DTensor

from distrain.config import FSDPConfig
from distrain.distributed.backend import BlocksOf
from distrain.distributed.state_dicts import FROM_RANK0, FULL, by_fqn, by_index
from distrain.distributed.torchrun import TorchrunBackend
from distrain.errors import ConfigError, MisuseError

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


class _CountingReduceScatter(DefaultReduceScatter):
    """FSDP's own reduce-scatter, counted (the accumulation tests and benchmark read it)."""

    def __init__(self, backend: FSDPBackend) -> None:
        super().__init__()
        self.backend = backend

    def __call__(self, *args, **kwargs):
        self.backend.grad_reduce_scatters += 1
        return super().__call__(*args, **kwargs)


class FSDPBackend(TorchrunBackend):
    """torch.distributed with FSDP2 instead of DDP."""

    strategy = "fsdp"
    forward_is_collective = True  # each block's forward all-gathers its weights
    sharded_checkpoints = True  # each rank writes (and reads) its own shards

    def __init__(self, device: str = "auto", timeout_s: float = 600.0, debug: bool = False,
                 sum_grads: bool = True, *, precision: str = "fp32",
                 fsdp: FSDPConfig | None = None) -> None:
        super().__init__(device, timeout_s, debug, sum_grads)
        self.options = fsdp or FSDPConfig()
        self.precision = precision
        self.grad_reduce_scatters = 0  # counted by _CountingReduceScatter

    def wrap_model(self, model: nn.Module, blocks: BlocksOf | None = None) -> nn.Module:
        if self.options.cpu_offload and self.device.type != "cuda":
            raise ConfigError("dist.fsdp.cpu_offload: expected false on a CPU device (the weights "
                              "already live in CPU memory), got true")
        # FSDP shards whatever each rank holds: start every rank from rank 0's weights, as
        # DDP's constructor does.
        self.broadcast_module(model)
        options = self.options
        mixed = None
        if options.mixed_precision and self.precision in DTYPES:
            mixed = MixedPrecisionPolicy(param_dtype=DTYPES[self.precision],
                                         reduce_dtype=torch.float32)
        kwargs = {"reshard_after_forward": options.reshard_after_forward,
                  "mp_policy": mixed or MixedPrecisionPolicy(),
                  "offload_policy": CPUOffloadPolicy() if options.cpu_offload else OffloadPolicy()}
        for block in blocks(model) if blocks else []:
            fully_shard(block, **kwargs)
        fully_shard(model, **kwargs)  # the root: whatever no block holds (embeddings, heads)
        factor = 1.0 if self.sums_gradients() else float(self.world_size)
        for unit in _units(model):
            unit.set_custom_reduce_scatter(_CountingReduceScatter(self))
            # gloo has no AVG: plain sums, divided (or not) by distrain's factor.
            unit.set_force_sum_reduction_for_comms(True)
            unit.set_gradient_divide_factor(factor)
        return model

    def setup_module(self, model: nn.Module, optimizer: torch.optim.Optimizer,
                     blocks: BlocksOf | None = None) -> nn.Module:
        names = {id(p): name for name, p in model.named_parameters()}
        wrapped = self.wrap_model(model, blocks)
        _use_parameters(optimizer, names, dict(model.named_parameters()))
        return wrapped

    def inference_module(self, model: nn.Module, blocks: BlocksOf | None = None) -> nn.Module:
        return self.wrap_model(model, blocks)  # a forward is a collective over the shards

    def module_state(self, model: nn.Module) -> dict:
        """Gathers the shards (every rank calls it); rank 0 gets the whole state dict."""
        return get_model_state_dict(self.unwrap(model), options=FULL)

    def optimizer_state(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
        raw = self.unwrap(model)
        by_name = get_optimizer_state_dict(raw, optimizer, options=FULL)  # gathers the shards
        return by_index(by_name, optimizer, raw) if self.is_main else {}

    def load_module_state(self, model: nn.Module, state: dict | None) -> None:
        """Rank 0's `state`: each rank receives its shards (every rank calls it)."""
        set_model_state_dict(self.unwrap(model), state if self.is_main else {},
                             options=FROM_RANK0)

    def load_optimizer_state(self, model: nn.Module, optimizer: torch.optim.Optimizer,
                             state: dict | None) -> None:
        raw = self.unwrap(model)
        by_name = by_fqn(state, optimizer, raw) if self.is_main else {}
        set_optimizer_state_dict(raw, optimizer, by_name, options=FROM_RANK0)

    def load_training_state(self, model: nn.Module, optimizer: torch.optim.Optimizer,
                            model_state: dict | None, optimizer_state: dict | None) -> None:
        self.load_module_state(model, model_state)  # scattered from rank 0: no broadcast after
        self.load_optimizer_state(model, optimizer, optimizer_state)

    def count_gradient_syncs(self) -> Callable[[], int]:
        return lambda: self.grad_reduce_scatters

    def replica_checksum(self, model: nn.Module) -> float | None:
        return None  # each rank holds its own shards

    def broadcast_module(self, module: nn.Module, src: int = 0) -> None:
        """Rank `src`'s replicated tensors (buffers such as BatchNorm's running statistics)
        into every rank's; the shards of sharded parameters stay each rank's own."""
        for tensor in [*module.parameters(), *module.buffers()]:
            if not isinstance(tensor, DTensor):
                self.broadcast(tensor.data, src)

    def unwrap(self, model: nn.Module) -> nn.Module:
        model = super().unwrap(model)
        return getattr(model, "_orig_mod", model)  # compiled: the module itself is sharded

    def no_sync(self, model: nn.Module) -> ContextManager:
        return _no_gradient_sync(self.unwrap(model))

    def broadcast_training_state(self, model: nn.Module, optimizer: torch.optim.Optimizer
                                 ) -> None:
        raise NotImplementedError("sharded state is scattered by load_training_state")

    def sync_text(self) -> str:
        group = dist.get_backend() if dist.is_initialized() else "?"
        return (f"torch.distributed, FSDP2 over {group}: weights, gradients and optimizer "
                f"state sharded per block, 1/{self.world_size} on each rank")

    def describe(self) -> dict:
        return {**super().describe(), "strategy": "fsdp"}


def _use_parameters(optimizer: torch.optim.Optimizer, names: dict[int, str],
                    params: dict[str, nn.Parameter]) -> None:
    """Point `optimizer`'s groups at the parameters that replaced the ones it was built
    with (same names, same order); it has no state yet."""
    for group in optimizer.param_groups:
        try:
            group["params"] = [params[names[id(p)]] for p in group["params"]]
        except KeyError:
            raise MisuseError("Engine.setup: the optimizer holds tensors that are not the "
                              "model's parameters; build it from model.parameters()") from None


def _units(model: nn.Module) -> Iterator[FSDPModule]:
    return (m for m in model.modules() if isinstance(m, FSDPModule))


@contextlib.contextmanager
def _no_gradient_sync(model: nn.Module) -> Iterator[None]:
    """Accumulate unsharded gradients locally: no reduce-scatter until the last micro-batch."""
    units = list(_units(model))
    for unit in units:
        unit.set_requires_gradient_sync(False, recurse=False)
    try:
        yield
    finally:
        for unit in units:
            unit.set_requires_gradient_sync(True, recurse=False)
