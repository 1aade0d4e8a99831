"""The plan as a loader: this rank's micro-batches of each epoch's global batches.

Each epoch is cut into global batches of world_size × batch_size × accum samples
(data.epoch_plan; a sampler's draw instead of the plain order when one is given), so the
same samples meet in the same optimizer step whatever the layout. `Engine.loader` makes
one; a `for` over it is one epoch and tells the engine each micro-batch's share.
"""

from __future__ import annotations

import numbers
from typing import Any, Callable, Iterator, Protocol

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from distrain.components.data.datasets import (
    MicroBatch,
    PlanSampler,
    Step,
    batched,
    batches,
    epoch_plan,
    seed_for,
    seed_streams,
    val_indices,
)
from distrain.components.data.samplers import epoch_order as sampler_order
from distrain.errors import MisuseError


class PlanOwner(Protocol):
    """What the loader needs of its engine (distrain.Engine)."""

    seed: int
    accum: int
    global_step: int
    world_size: int
    rank: int
    device: torch.device
    watchdog: Any
    current_loader: Any

    def micro_batch(self, count: int, size: int, last: bool) -> None: ...
    def epoch_begins(self) -> None: ...


class TrainLoader:
    """This rank's micro-batches of each epoch's global batches (see data.epoch_plan); each
    `iter()` is one epoch. Its state (epoch, steps done in it) is part of the checkpoint.
    The config trainer walks the same plan step by step through `steps()`."""

    def __init__(self, engine: PlanOwner, dataset: Dataset, batch_size: int, shuffle: bool = True,
                 num_workers: int = 0, collate_fn: Callable | None = None,
                 sampler: Sampler | None = None) -> None:
        self.engine, self.dataset = engine, dataset
        self.batch_size, self.shuffle, self.order_sampler = batch_size, shuffle, sampler
        self._plan: tuple[tuple, list[Step]] | None = None  # cached per (epoch, layout)
        self.sampler = PlanSampler()
        extra = {"collate_fn": collate_fn} if collate_fn is not None else batched(dataset)
        # Its own generator: a DataLoader draws its workers' base seed at every iter(), from
        # the global stream unless given one, which would shift dropout after a resume.
        self.generator = torch.Generator()
        self.loader = DataLoader(dataset, batch_sampler=self.sampler, num_workers=num_workers,
                                 pin_memory=engine.device.type == "cuda",
                                 persistent_workers=num_workers > 0, generator=self.generator,
                                 **extra)
        self.epoch = 0  # the epoch being iterated (epochs completed, between epochs)
        self.steps_done = 0  # optimizer steps of the current epoch already taken
        self._length: int | None = None  # of the epoch being iterated

    def plan(self) -> list[Step]:
        """This rank's steps of the current epoch, from the first one."""
        e = self.engine
        key = (self.epoch, e.world_size, e.rank, e.accum)
        if self._plan is None or self._plan[0] != key:
            order = None if self.order_sampler is None else \
                sampler_order(self.order_sampler, self.epoch, e.seed)
            n = len(self.dataset) if order is None else len(order)
            self._plan = key, epoch_plan(n, self.epoch, seed=e.seed, shuffle=self.shuffle,
                                         world_size=e.world_size, rank=e.rank,
                                         batch_size=self.batch_size, accum=e.accum, order=order)
        return self._plan[1]

    def __len__(self) -> int:
        """Micro-batches of this epoch (from a mid-epoch resume on) on this rank; the same
        count on every rank, and fixed while the epoch is iterated."""
        if self._length is not None:
            return self._length
        return sum(len(step.micro) for step in self.plan()[self.steps_done:])

    def steps(self) -> Iterator[tuple[Step, Iterator]]:
        """The epoch's remaining steps, each with the iterator its micro-batches come from."""
        e = self.engine
        steps = self.plan()[self.steps_done:]
        if not self.steps_done:
            e.epoch_begins()
            # Each rank's random stream (dropout, Mixup) restarts per epoch from the seed, so a
            # run is reproducible and resumable; a mid-epoch resume restored the stream instead.
            seed_streams(seed_for(e.seed, self.epoch, e.rank))  # torch, NumPy, random
        self.sampler.set_plan(steps)
        self.generator.manual_seed(seed_for(e.seed, self.epoch, e.rank, self.steps_done))
        e.current_loader = self
        source = batches(self.loader)
        for step in steps:
            yield step, source

    def __iter__(self) -> Iterator:
        self._length = len(self)
        for batch, _, _ in self.micro_batches():
            yield batch
        self.epoch, self.steps_done, self._length = self.epoch + 1, 0, None

    def micro_batches(self) -> Iterator[tuple[Any, MicroBatch, Step]]:
        """This rank's micro-batches of the epoch's remaining steps, each with its place in
        the plan; the engine is told of each before it is handed out (its share of the global
        batch, whether it is its step's last: the gradient sync waits for that one)."""
        e = self.engine
        for step, source in self.steps():
            for j, mb in enumerate(step.micro):
                e.watchdog.enter("loading data", e.global_step + 1)
                batch = next(source)
                e.micro_batch(mb.count, step.size, last=j == len(step.micro) - 1)
                yield batch, mb, step

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "steps_done": self.steps_done}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.steps_done = state["epoch"], state["steps_done"]


def shard_loader(dataset: Dataset, world_size: int, rank: int, batch_size: int,
                 num_workers: int = 0, collate_fn: Callable | None = None,
                 pin: bool = False) -> DataLoader:
    """This rank's disjoint, unpadded, contiguous slice of `dataset` in batches (as sharded
    validation takes it); its `samples` attribute counts the slice's samples."""
    indices = val_indices(len(dataset), world_size, rank, sharded=True)
    chunks = [indices[i:i + batch_size] for i in range(0, len(indices), batch_size)]
    extra = {"collate_fn": collate_fn} if collate_fn is not None else {}
    loader = DataLoader(dataset, batch_sampler=chunks, num_workers=num_workers,
                        pin_memory=pin, **extra)
    loader.samples = len(indices)
    return loader


def samples_of(weight: Any, who: str) -> numbers.Real:
    """A rank's sample count from `weight`: a number (NumPy's, a 0-d tensor) or a loader
    from shard_loader (its `samples`); MisuseError naming `who` for anything else."""
    count = getattr(weight, "samples", weight)
    count = count.item() if isinstance(count, torch.Tensor) and count.dim() == 0 else count
    if not isinstance(count, numbers.Real) or isinstance(count, bool):
        raise MisuseError(f"{who}: weight: expected this rank's sample count (an int) or a "
                          f"loader from eng.val_loader (it counts them), got "
                          f"{type(weight).__name__}; for a training metric pass how many "
                          "samples this rank's values cover")
    return count
