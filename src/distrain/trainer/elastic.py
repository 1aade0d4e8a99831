"""Horovod elastic: training survives a worker that is removed, lost or added.

    horovodrun -np 2 --min-np 1 --max-np 2 --host-discovery-script ./hosts.sh \
        --gloo --network-interface lo distrain train --config configs/digits.yaml

Under an elastic horovodrun (HOROVOD_ELASTIC=1) `fit` runs inside `hvd.elastic.run`. The
model, the optimizer and the loop's progress (epoch, step, position in the epoch, LR
schedule, tracker, loss scale, the epoch's training sums) are committed every
`dist.horovod.commit_every_steps` steps and at each epoch end. A removed worker interrupts the
others at their next commit; a lost one fails a collective and everyone rolls back to the
last commit. Then Horovod re-initialises with the new world size and the loop continues.

The rule for a changed world size: the global batch stays the same, so the LR, the schedule
and the sample order do too: accumulation absorbs the change (2 processes × 16 × 1 becomes
1 × 16 × 2). A world size that cannot keep the global batch stops the run with a message.
"""

from __future__ import annotations

import copy
from typing import Any, Protocol

import torch

from distrain.components.checkpoint.files import GLOBAL_STEP
from distrain.components.data.datasets import seed_for, seed_streams
from distrain.components.observe.runlock import RunLock
from distrain.config import Config
from distrain.distributed import Backend
from distrain.distributed.backend import keep_groups
from distrain.errors import ConfigError


class ElasticLoop(Protocol):
    """What Elastic needs of the loop it drives (the config trainer, loop.Trainer)."""

    cfg: Config
    backend: Backend
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    engine: Any
    log: Any
    watchdog: Any
    preemption: Any
    epoch: int
    global_step: int
    accum: int
    plain_optimizer: torch.optim.Optimizer  # as built: the schedule writes its groups
    history: list
    sums: Any  # EpochSums

    checkpoints: Any  # RunCheckpoints: the parts' states, as a checkpoint holds them

    def fit(self) -> dict: ...
    def settle(self) -> None: ...
    def set_accumulation(self, accum: int) -> None: ...


class Elastic:
    """Owns Horovod's elastic state for one training loop."""

    def __init__(self, trainer: ElasticLoop, lock: RunLock | None = None) -> None:
        import horovod.torch as hvd

        self.hvd, self.trainer, self.lock = hvd, trainer, lock
        self.every = trainer.cfg.dist.horovod.commit_every_steps
        self.resets = 0
        # No collective here: a worker that joins mid-run builds this while the others are
        # already training; the first sync inside run() gives it rank 0's committed state.
        self.state = hvd.elastic.TorchState(model=trainer.backend.unwrap(trainer.model),
                                            optimizer=trainer.optimizer,
                                            progress=self.progress(reduce=False))
        self.state.register_reset_callbacks([self.on_reset])

    def run(self) -> dict:
        return self.hvd.elastic.run(self._fit)(self.state)

    def _fit(self, state) -> dict:
        # Entered first, and again after every reset: state holds the last commit (synced from
        # rank 0, or restored after a failure), so every rank continues from the same point.
        t = self.trainer
        joined = state.progress[GLOBAL_STEP] != t.global_step  # a worker added mid-run
        self.load_progress(state.progress)
        if self.resets or joined:
            t.log.truncate_metrics(t.global_step)  # rows written after the commit are redone
            # Each rank's random streams restart from the seed, for the new set of ranks.
            seed_streams(seed_for(t.cfg.run.seed, t.epoch, t.backend.rank, t.global_step))
        return t.fit()

    def maybe_commit(self, step: int, mid_epoch: bool) -> None:
        """dist.horovod.commit_every_steps (an epoch's end commits anyway)."""
        if step % self.every == 0 and mid_epoch:
            self.commit()

    def commit(self) -> None:
        """Save the state; raises HostsUpdatedInterrupt on every rank when workers changed."""
        self.trainer.watchdog.enter("elastic commit", self.trainer.global_step)
        self.trainer.settle()  # the host's state of the last step
        self.state.progress = self.progress()  # a new object: Horovod keeps it by reference
        self.state.commit()

    def progress(self, reduce: bool = True) -> dict:
        """The loop's state besides model and optimizer. The epoch's training sums so far are
        all-reduced (`reduce`: at commits, where every rank is present) for rank 0 to carry."""
        t = self.trainer
        sums = t.backend.all_reduce(t.sums.values.clone()) if reduce else t.sums.values
        return copy.deepcopy({
            **t.checkpoints.host_state(),  # the same parts a checkpoint holds
            "global_batch": t.backend.world_size * t.cfg.data.batch_size * t.accum,
            "world_size": t.backend.world_size, "history": t.history,
            "epoch_sums": sums.tolist()})

    def load_progress(self, p: dict) -> None:
        t = self.trainer
        t.checkpoints.load_host_state(p)
        t.history = copy.deepcopy(p["history"])
        # Rank 0 carries the epoch's sums so far; the all-reduce at the epoch end adds the rest.
        mine = p["epoch_sums"] if t.backend.is_main else [0.0] * len(p["epoch_sums"])
        t.sums.set(mine)
        self.keep_global_batch(p["global_batch"], p["world_size"])

    def keep_global_batch(self, global_batch: int, old_world: int) -> None:
        """The world-size rule: same global batch, so same LR, schedule and sample order."""
        t = self.trainer
        world, batch = t.backend.world_size, t.cfg.data.batch_size
        if global_batch % (world * batch):
            raise ConfigError(
                f"horovod elastic: {world} processes cannot keep the global batch of "
                f"{global_batch} with data.batch_size {batch}; pick --min-np/--max-np so that "
                f"every world size divides {global_batch // batch}")
        t.set_accumulation(global_batch // (world * batch))
        if world != old_world:
            t.log.info(f"distrain: elastic: {old_world} -> {world} processes; global batch "
                       f"{global_batch} kept as {world} × {batch} × accumulation {t.accum}, "
                       "LR unchanged")

    def on_reset(self) -> None:
        """After Horovod re-initialised with the new set of workers (not run by a new worker)."""
        t = self.trainer
        self.resets += 1
        t.backend.refresh()
        t.log.is_main = t.backend.is_main  # rank 0 may now be another process
        if self.lock is not None:  # and it holds the run folder's lock from here on
            self.lock.follow_rank_0(t.backend)
        t.watchdog.rank = t.backend.rank
        t.watchdog.enter("elastic reset", t.global_step)
        t.preemption.reset()
        t.engine.discard_outcome()  # a deferred skip flag: its step was rolled back
        # The restore loaded the optimizer's state, replacing its param-group dicts: give it
        # back the ones the schedule writes (the optimizer as built, before setup).
        keep_groups(t.plain_optimizer.param_groups, t.optimizer)
        for p in t.model.parameters():  # a failed step may have left partial gradients
            p.grad = None
