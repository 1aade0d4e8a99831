"""The config trainer's checkpoints: what it saves, how rank 0 writes it, how a run resumes.

Rank 0 writes (atomically, verified: components/checkpoint); every rank joins the gather of the
ranks' random streams and epoch sums first. On resume rank 0 reads the file and sends the
rest: tensors through the backend's broadcast, the small state as one object.
"""

from __future__ import annotations

from pathlib import Path


from distrain import __version__
from distrain.components.checkpoint import files as ckpt
from distrain.components.checkpoint import sharded
from distrain.components.checkpoint.store import incompatible_change
from distrain.components.data.datasets import seed_for, seed_streams
from distrain.errors import ConfigError

LOG_NAMES = "log_names"  # checkpoint key: the names of the step function's logs
BAD_STEPS = "bad_steps"  # checkpoint key: consecutive skipped steps so far


class TrainerCheckpoints:
    """The Trainer's checkpointing (a mixin: it reads and sets the trainer's state)."""

    def parts(self) -> dict:
        """The stateful parts besides model and optimizer, by checkpoint key: the one list
        that checkpoints and Horovod elastic save and restore."""
        return {ckpt.PRECISION: self.precision, ckpt.SCHEDULER: self.schedule,
                ckpt.TRACKER: self.tracker, ckpt.EMA: self.ema}

    def host_state(self) -> dict:
        """The parts' states and the loop's counters (no tensors to broadcast)."""
        return {**{k: None if p is None else p.state_dict() for k, p in self.parts().items()},
                ckpt.EPOCH: self.epoch, ckpt.GLOBAL_STEP: self.global_step,
                ckpt.STEP_IN_EPOCH: self.step_in_epoch, LOG_NAMES: list(self.sums.names),
                BAD_STEPS: self.bad_steps}

    def load_host_state(self, state: dict) -> None:
        for key, part in self.parts().items():
            if part is not None and state.get(key) is not None:
                part.load_state_dict(state[key])
        self.epoch, self.global_step = state[ckpt.EPOCH], state[ckpt.GLOBAL_STEP]
        self.step_in_epoch = state.get(ckpt.STEP_IN_EPOCH, 0)
        self.sums.names = list(state.get(LOG_NAMES, []))
        self.bad_steps = state.get(BAD_STEPS, 0)

    def state(self, ranks: list) -> dict:
        return {ckpt.MODEL: self.backend.unwrap(self.model).state_dict(),
                ckpt.OPTIMIZER: self.optimizer.state_dict(), **self.run_state(ranks)}

    def run_state(self, ranks: list) -> dict:
        """Everything but the model and the optimizer."""
        return {**self.host_state(), ckpt.RANKS: ranks, ckpt.CONFIG: self.cfg.to_dict(),
                ckpt.WORLD_SIZE: self.backend.world_size, ckpt.VERSION: __version__}

    def save(self, write_last: bool, write_best: bool) -> None:
        self.settle()  # the state of the last step, not of the one before
        write_best = write_best and self.cfg.checkpoint.save_best
        if not (write_last or write_best):
            return
        self.watchdog.enter("checkpoint", self.global_step)
        # Collective, so every rank, never under `if is_main`: each rank's random stream and,
        # mid-epoch, its share of the epoch's training sums.
        ranks = self.backend.all_gather_object(
            {"rng": ckpt.rng_state(), "epoch_sums": self.sums.values.tolist()})
        if self.store.shards:  # the host state beside every rank's shards
            self.store.save(lambda: self.run_state(ranks), write_last, write_best,
                            self.model, self.optimizer, self.sharded_parts())
        else:
            self.store.save(lambda: self.state(ranks), write_last, write_best)

    def refuse_change(self, path: Path, state: dict) -> None:
        change = incompatible_change(state, self.cfg, self.backend.world_size) \
            if state and not self.cfg.checkpoint.allow_changes else None
        if not self.backend.elastic:
            change = self.backend.broadcast_object(change)  # Distribution: all refuse alike
        if change:
            raise ConfigError(f"checkpoint.resume: {path} {change}; to train with the new "
                              "values give this run another run.out_dir (or "
                              "checkpoint.resume=none to replace that run), or pass "
                              "checkpoint.allow_changes=true to continue it with them")

    def load_file(self, path: Path) -> dict:
        """A one-file checkpoint: rank 0 reads it (other nodes need not see the same disk)
        and sends the rest: tensors through the backend's broadcast (FSDP: each rank its
        shards), the small state as one object. Under an elastic horovodrun every rank reads
        it instead: set-up must run no collective there. Returns the small state."""
        backend = self.backend
        reads = backend.is_main or backend.elastic
        state = ckpt.load(path) if reads else {}
        self.refuse_change(path, state)
        small = {k: v for k, v in state.items() if k not in (ckpt.MODEL, ckpt.OPTIMIZER)}
        # Distribution: rank 0's tensors to every rank (FSDP: each rank its shards).
        backend.load_training_state(self.model, self.optimizer, state.get(ckpt.MODEL),
                                    state.get(ckpt.OPTIMIZER))
        return small if backend.elastic else backend.broadcast_object(small)

    def sharded_parts(self) -> dict:
        """Tensors saved beside the weights in a sharded checkpoint, by key: the EMA's
        shards (FSDP) or its whole weights (a DDP run reading a sharded checkpoint)."""
        return {} if self.ema is None else {ckpt.EMA: self.ema.shard_tensors()}

    def load_sharded(self, path: Path) -> dict:
        """A sharded checkpoint (.dcp folder): every rank reads its part, resharded to this
        run's strategy and number of processes. Returns the small state."""
        small = sharded.load_host(path)  # every rank reads the same small file: no broadcast
        self.refuse_change(path, small)
        parts = self.sharded_parts() if small.get(ckpt.EMA) else {}
        sharded.load(self.backend, self.model, self.optimizer, path, parts)
        if parts:  # the averaged weights came in place: their counter
            self.ema.load_count(small.pop(ckpt.EMA))
        return small

    def wait_for_saves(self) -> None:
        """checkpoint.async_save: the write in flight is on disk (or its error raised)."""
        if self.store.saver is not None:
            self.watchdog.enter("checkpoint", self.global_step)
            self.store.wait()

    def resume(self, path: Path) -> None:
        backend = self.backend
        small = self.load_sharded(path) if path.is_dir() else self.load_file(path)
        self.load_host_state(small)
        ranks = small[ckpt.RANKS]
        if len(ranks) == backend.world_size:
            ckpt.set_rng_state(ranks[backend.rank]["rng"])
        else:  # another layout: each rank's streams restart from the seed
            seed_streams(seed_for(self.cfg.run.seed, self.epoch, backend.rank,
                                       self.global_step))
        if len(ranks) == backend.world_size and not backend.elastic:
            mine = ranks[backend.rank]["epoch_sums"]
        else:  # rank 0 carries the epoch's sums so far (elastic: its progress is what syncs)
            mine = [sum(col) for col in zip(*(r["epoch_sums"] for r in ranks))] \
                if backend.is_main else [0.0] * len(ranks[0]["epoch_sums"])
        self.sums.set(mine)
        if small[ckpt.WORLD_SIZE] != backend.world_size:
            self.log.info(f"distrain: warning: checkpoint was written by {small[ckpt.WORLD_SIZE]} "
                          f"processes, resuming on {backend.world_size}")
        self.log.truncate_metrics(self.global_step, self.epoch)
        where = f" + {self.step_in_epoch} steps" if self.step_in_epoch else ""
        self.log.info(f"distrain: resumed from {path} at epoch {self.epoch}{where}, "
                      f"step {self.global_step}")
