"""The exponential moving average of a model's weights (train.ema_decay).

torch's `AveragedModel` keeps the state (and so the checkpoint format: the averaged module
plus an `n_averaged` counter); this subclass only replaces its update, which reads its
counter twice and copies it to the device every step: on a GPU each of those makes the host
wait for all the queued work. Here the counter stays on the host and the update is
sync-free: copy on the first update, then one foreach lerp, as torch's EMA does.

Under FSDP (`ShardedEMA`) each rank averages only its own shards of the weights, and
validation swaps the averaged shards into the model for the time of the evaluation; the
averaged shards go into the sharded checkpoint beside the weights.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn


def _local(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of `t` (a DTensor's shard, sharing its storage), else `t`."""
    return t.to_local() if hasattr(t, "to_local") else t


def _named(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    return [*model.named_parameters(), *model.named_buffers()]


@torch.no_grad()
def _average(mine: list[torch.Tensor], theirs: list[torch.Tensor], first: bool,
             decay: float) -> None:
    if first:
        torch._foreach_copy_(mine, theirs)
        return
    floats = [i for i, a in enumerate(mine) if a.is_floating_point()]
    if floats:
        torch._foreach_lerp_([mine[i] for i in floats], [theirs[i] for i in floats], 1 - decay)
    for a, b in zip(mine, theirs):
        if not a.is_floating_point():  # e.g. BatchNorm's batch count, as torch rounds it
            a.copy_(a * decay + b * (1 - decay))


def make_ema(model: nn.Module, decay: float) -> EMA | ShardedEMA:
    """The EMA that suits `model`'s weights: shard by shard where they are sharded
    (DTensors, as FSDP leaves them), else an averaged copy of the whole model."""
    if any(hasattr(p, "to_local") for p in model.parameters()):
        return ShardedEMA(model, decay)
    return EMA(model, decay)


class EMA(AveragedModel):
    """ema = decay · ema + (1 − decay) · weights, over parameters and buffers alike."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        # device=None keeps n_averaged on the CPU, while the averaged copy sits beside `model`.
        super().__init__(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)
        self.decay = decay

    @torch.no_grad()
    def update_parameters(self, model: nn.Module) -> None:
        mine = [*self.module.parameters(), *self.module.buffers()]
        theirs = [t.detach() for t in (*model.parameters(), *model.buffers())]
        _average(mine, theirs, int(self.n_averaged) == 0, self.decay)  # a host tensor: no sync
        self.n_averaged += 1

    @contextlib.contextmanager
    def weights(self, model: nn.Module) -> Iterator[nn.Module]:
        """The averaged weights as a model to evaluate (here: the averaged copy itself)."""
        yield self.module

    def shard_tensors(self) -> dict[str, torch.Tensor]:
        """What a sharded checkpoint keeps of it beside the weights (read back in place)."""
        return self.module.state_dict()

    def load_count(self, state: dict) -> None:
        """The counter alone (the tensors came in place through shard_tensors)."""
        self.n_averaged.fill_(int(state["n_averaged"]))


class ShardedEMA:
    """The EMA of an FSDP model's weights, shard by shard: each rank keeps 1/world of it."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = decay
        self.tensors = {name: t.detach().clone() for name, t in _named(model)}
        self.n_averaged = 0

    @torch.no_grad()
    def update_parameters(self, model: nn.Module) -> None:
        _average([_local(t) for t in self.tensors.values()],
                 [_local(t.detach()) for _, t in _named(model)], self.n_averaged == 0, self.decay)
        self.n_averaged += 1

    @contextlib.contextmanager
    @torch.no_grad()
    def weights(self, model: nn.Module) -> Iterator[nn.Module]:
        """`model` holding the averaged weights inside (each rank its shards), its own after."""
        live = [_local(t.detach()) for _, t in _named(model)]
        kept = [t.clone() for t in live]
        torch._foreach_copy_(live, [_local(t) for t in self.tensors.values()])
        try:
            yield model
        finally:
            torch._foreach_copy_(live, kept)

    def state_dict(self) -> dict:
        """The counter; the averaged shards are saved beside the weights (shard_tensors)."""
        return {"n_averaged": self.n_averaged}

    def shard_tensors(self) -> dict[str, torch.Tensor]:
        return self.tensors

    def load_count(self, state: dict) -> None:
        self.n_averaged = int(state["n_averaged"])

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        """The counter, and from a one-file checkpoint (an `EMA`'s state: `module.<name>`
        tensors, whole) each rank's shards of the averaged weights."""
        from torch.distributed.tensor import distribute_tensor

        self.n_averaged = int(state["n_averaged"])
        for name, mine in self.tensors.items():
            whole = state.get(f"module.{name}")
            if whole is None:
                continue
            if hasattr(mine, "to_local"):  # every rank holds `whole`: slice it, no collective
                whole = distribute_tensor(whole.to(mine.device), mine.device_mesh,
                                          mine.placements, src_data_rank=None)
            _local(mine).copy_(_local(whole))
