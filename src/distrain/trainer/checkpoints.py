"""The config trainer's checkpoints, written and read by the engine's checkpointer.

What only a config run adds: its parts and progress registered beside the engine's model,
optimizer and loss scale; the config itself in every file and a resume that contradicts it
refused (unless checkpoint.allow_changes); each rank's share of the epoch's sums beside its
random streams (a mid-epoch save); best.pt; and on resume the run log cut back to the
checkpoint.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from distrain import __version__
from distrain.components.checkpoint import files as ckpt
from distrain.components.checkpoint.store import incompatible_change
from distrain.components.data.datasets import seed_for, seed_streams
from distrain.config import Config
from distrain.engine import Engine
from distrain.errors import ConfigError
from distrain.trainer.progress import Progress
from distrain.trainer.sums import EpochSums


class RunCheckpoints:
    """Saves and resumes one config run through `engine.checkpointer`."""

    def __init__(self, cfg: Config, engine: Engine, progress: Progress, sums: EpochSums,
                 log: Any, parts: dict[str, Any]) -> None:
        self.cfg, self.engine, self.progress, self.sums, self.log = cfg, engine, progress, \
            sums, log
        self.checkpointer = engine.checkpointer
        self.checkpointer.unregister("loader")  # its position is the progress's
        for key, part in parts.items():  # scheduler, tracker, EMA
            if part is not None:
                self.checkpointer.register(key, part)
        self.checkpointer.register("progress", progress, inline=True)

    def host_state(self) -> dict:
        """Every part's state and the counters, no tensors moved (Horovod elastic commits it)."""
        return {**self.checkpointer.host_state(), ckpt.GLOBAL_STEP: self.engine.global_step}

    def load_host_state(self, state: dict) -> None:
        self.checkpointer.load_host_state(state)
        self.engine.global_step = state[ckpt.GLOBAL_STEP]

    def save(self, write_last: bool, write_best: bool) -> None:
        """Every rank calls it (collective), never under `if is_main`."""
        self.engine.settle()  # the state of the last step, not of the one before
        write_best = write_best and self.cfg.checkpoint.save_best
        if not (write_last or write_best):
            return
        self.engine.watchdog.enter("checkpoint", self.engine.global_step)
        own = {**self.engine.own_state(), ckpt.CONFIG: self.cfg.to_dict(),
               ckpt.VERSION: __version__}
        # Mid-epoch, each rank's share of the epoch's training sums, beside its streams.
        self.checkpointer.save(own, write_last, write_best,
                               rank_state={"epoch_sums": self.sums.values.tolist()})

    def maybe_save(self, step: int, mid_epoch: bool) -> None:
        """checkpoint.every_steps: last.pt after optimizer step `step` (an epoch's last step
        leaves it to the epoch's end, which saves anyway)."""
        every = self.cfg.checkpoint.every_steps
        if every and step % every == 0 and mid_epoch:
            self.save(write_last=True, write_best=False)

    def wait_for_saves(self) -> None:
        """checkpoint.async_save: the write in flight is on disk (or its error raised)."""
        if self.engine.store.saver is not None:
            self.engine.watchdog.enter("checkpoint", self.engine.global_step)
            self.engine.store.wait()

    def resume(self, path: Path) -> None:
        """Rank 0 reads `path` (a file, or a .dcp folder resharded to this layout), refuses
        a contradicting config on every rank alike, and every rank gets its state."""
        cfg, backend, checkpointer = self.cfg, self.engine.backend, self.checkpointer
        state, found = checkpointer.read(path, cfg.run.out_dir, "checkpoint.resume",
                                         required=(ckpt.EPOCH, ckpt.GLOBAL_STEP))
        change = None if cfg.checkpoint.allow_changes else \
            incompatible_change(state, cfg, backend.world_size)
        checkpointer.refuse(change and (
            f"checkpoint.resume: {path} {change}; to train with the new values give this "
            "run another run.out_dir (or checkpoint.resume=none to replace that run), or "
            "pass checkpoint.allow_changes=true to continue it with them"), ConfigError)
        checkpointer.restore(found, state)
        self.engine.global_step = state[ckpt.GLOBAL_STEP]
        if not checkpointer.restore_streams(state):  # another layout: restart from the seed
            seed_streams(seed_for(cfg.run.seed, self.progress.epoch, backend.rank,
                                  self.engine.global_step))
        self.sums.set(self.epoch_sums(state))
        saved_world = state[ckpt.WORLD_SIZE]
        if saved_world != backend.world_size:
            batch, accum = cfg.data.batch_size, cfg.train.grad_accum_steps
            old = state[ckpt.CONFIG]
            then = saved_world * old["data"]["batch_size"] * old["train"]["grad_accum_steps"]
            now = backend.world_size * batch * accum
            kept = (f"the global batch of {now} is kept ({backend.world_size} × {batch} × accum "
                    f"{accum}), so the same samples meet in the same steps") if then == now \
                else f"the global batch changed from {then} to {now} (allow_changes)"
            self.log.info(f"distrain: the layout changed: the checkpoint was written by "
                          f"{saved_world} processes, resuming on {backend.world_size}; {kept}")
        self.log.truncate_metrics(self.engine.global_step, self.progress.epoch)
        done = self.progress.step_in_epoch
        self.log.info(f"distrain: resumed from {path} at epoch {self.progress.epoch}"
                      f"{f' + {done} steps' if done else ''}, step {self.engine.global_step}")

    def epoch_sums(self, state: dict) -> list[float]:
        """This rank's share of the saved epoch's sums so far: its own on the same layout;
        on another (or elastic, where progress is what syncs) rank 0 carries them all."""
        backend = self.engine.backend
        ranks = [self.checkpointer.rank_entry(state, r) for r in range(len(state[ckpt.RANKS]))]
        if len(ranks) == backend.world_size and not backend.elastic:
            return ranks[backend.rank]["epoch_sums"]
        if backend.is_main:
            return [sum(col) for col in zip(*(r["epoch_sums"] for r in ranks))]
        return [0.0] * len(ranks[0]["epoch_sums"])
