"""The training loop. The backend owns distribution, Precision owns AMP, Schedule the LR,
Tracker the decisions; what is left here reads top to bottom (trainer/run.py runs it).

    torchrun --nproc-per-node 2 -m distrain train --config configs/digits.yaml
"""

from __future__ import annotations

import sys
import time
from typing import Iterator

import torch

from distrain.components.augment import Mixer, compute_loss, hard_labels
from distrain.components.checkpoint import files as ckpt
from distrain.components.checkpoint.store import Checkpoints
from distrain.components.data.datasets import (
    check_outputs,
    largest_label,
    num_workers,
    to_device,
)
from distrain.components.data.samplers import build_sampler
from distrain.components.ema import make_ema
from distrain.components.losses import correct_per_sample
from distrain.components.observe.experiment import system_info
from distrain.components.observe.log import RunLog
from distrain.components.observe.profiling import StepProfiler
from distrain.components.observe.tracking import Tracker
from distrain.components.optim import build_optimizer
from distrain.components.registry import call_plugin
from distrain.components.scheduling import Schedule
from distrain.components.step_fn import pair, split_output
from distrain.components.validation import MAX_CONFUSION_CLASSES, Validator, validates_sharded
from distrain.config import Config
from distrain.distributed import Backend, config_strategy, unsharded_warning
from distrain.distributed.watchdog import Watchdog
from distrain.engine import Engine
from distrain.errors import ConfigError, NonFiniteError, Preempted
from distrain.trainer.checkpoints import RunCheckpoints
from distrain.trainer.elastic import Elastic
from distrain.trainer.parts import Parts, build_parts
from distrain.trainer.progress import Progress
from distrain.trainer.sums import EpochSums


class Trainer:
    """The config trainer: components built from a Config, driven through distrain.Engine
    (the same step as a user's own loop); its own state is `progress` (the epoch, the
    position, the counters), which the engine's checkpointer saves beside the parts."""

    def __init__(self, cfg: Config, backend: Backend, watchdog: Watchdog | None = None) -> None:
        self.cfg, self.backend = cfg, backend
        # Marks progress; train() starts its thread (an unstarted one only records the phase).
        self.watchdog = watchdog or Watchdog(cfg.dist.timeout_s, backend.rank, cfg.run.out_dir)
        self.log = RunLog(cfg, backend.is_main, system_info(backend.name, backend.world_size))
        parts = build_parts(cfg, backend)  # data sets, model, loss: as `distrain evaluate` does
        self.use_parts(parts)
        self.build_engine(parts.model)  # the step, the loader, the checkpoints folder
        self.schedule = Schedule(self.plain_optimizer, cfg.scheduler, cfg.monitor_mode(),
                                 self.steps_per_epoch, self.steps_per_epoch * cfg.train.epochs)
        self.tracker = Tracker(cfg.checkpoint.monitor, cfg.monitor_mode(),
                               cfg.train.early_stop_patience)
        self.sums = EpochSums(backend.device)  # the epoch's training metrics so far
        self.progress = Progress(self.loader, self.sums)
        self.checkpoints = RunCheckpoints(cfg, self.engine, self.progress, self.sums, self.log, {
            ckpt.SCHEDULER: self.schedule, ckpt.TRACKER: self.tracker, ckpt.EMA: self.ema})
        self.validator = Validator(cfg, backend, self.val_set, self.val_sets, self.loss_fn,
                                   self.precision, self.step_fn, self.user_metrics, self.ema)
        self.stop_requested = False
        self.step_losses: list[torch.Tensor] = []  # this step's, read only after a skip
        self.losses_of: dict[int, list[torch.Tensor]] = {}  # by step, until its outcome is known
        self.engine.after_step(self.after_step)  # schedule, EMA, skip count: once per step
        self.preemption = self.engine.preemption  # SIGTERM/SIGUSR1: all ranks stop together
        self.elastic: Elastic | None = None  # set by train() under an elastic horovodrun
        self.began = 0.0
        self.data_wait_s = 0.0  # this epoch's time blocked on the data loader
        self.first_step_at = 0.0  # wall-clock time (time.time()) when the first step ended
        self.history: list[dict] = []
        self.profiler: StepProfiler | None = None  # logging.profile, started by train()
        self.open_run_folder()

    def use_parts(self, parts: Parts) -> None:
        cfg = self.cfg
        self.train_set, self.val_set, self.val_sets = parts.train_set, parts.val_set, \
            parts.val_sets
        self.user_metrics, self.loss_fn, self.step_fn = parts.user_metrics, parts.loss_fn, \
            parts.step_fn
        self.outputs_checked = False  # the model's outputs against the labels (first batch)
        self.top_label = largest_label(self.train_set)  # from `targets`: no device read
        self.mixer = Mixer(cfg.augment)
        if self.mixer.enabled and cfg.augment.label_smoothing and \
                not getattr(self.loss_fn, "soft_targets", False):
            raise ConfigError(f"augment.label_smoothing: expected 0 with loss {cfg.loss.name!r}, "
                              f"which takes hard labels only, got {cfg.augment.label_smoothing}")

    def build_engine(self, raw: torch.nn.Module) -> None:
        """The engine a user's own loop uses (distrain.Engine): the gradient sync, the
        micro-batch weighting, AMP, the step and the checkpoints are the same code for both."""
        cfg, backend = self.cfg, self.backend
        optimizer = build_optimizer(cfg, raw, backend.world_size,
                                    fuse=backend.fused_optimizer_ok())
        self.plain_optimizer = optimizer  # as built, before setup: the schedule sets its LR
        self.engine = Engine(cfg.train.precision, cfg.train.grad_accum_steps, seed=cfg.run.seed,
                             backend=backend, strategy=config_strategy(cfg, backend.strategy),
                             out_dir=cfg.run.out_dir, watchdog=self.watchdog,
                             checkpoints=Checkpoints(keep_last=cfg.checkpoint.keep_last,
                                                     async_save=cfg.checkpoint.async_save),
                             skip_nonfinite_steps=cfg.train.skip_nonfinite_steps)
        self.store = self.engine.store  # the run's checkpoints folder: one writer for both
        self.model, self.optimizer = self.engine.setup(raw, optimizer)
        # The EMA of the weights: identical on every rank, since the weights are (FSDP:
        # each rank averages its shards).
        self.ema = make_ema(self.backend.unwrap(self.model), cfg.train.ema_decay) \
            if cfg.train.ema_decay else None
        self.precision = self.engine.precision
        self.loader = self.engine.loader(self.train_set, cfg.data.batch_size, cfg.data.shuffle,
                                         num_workers(cfg.data.num_workers, self.train_set),
                                         sampler=build_sampler(cfg.data.sampler, self.train_set))
        self.sampler = self.loader.sampler
        self.steps_per_epoch = len(self.loader.plan())
        per_step = backend.world_size * cfg.train.grad_accum_steps
        if per_step * cfg.data.batch_size > len(self.train_set):
            raise ConfigError(
                f"data.batch_size: the global batch ({backend.world_size} processes × "
                f"{cfg.data.batch_size} × accumulation {cfg.train.grad_accum_steps} = "
                f"{per_step * cfg.data.batch_size}) is larger than the training set "
                f"({len(self.train_set)} samples), so every epoch would be one step; use at "
                f"most data.batch_size={max(1, len(self.train_set) // per_step)}")

    def open_run_folder(self) -> None:
        """Resume from the checkpoint checkpoint.resume names, or start afresh (removing an
        earlier run's files); then the config beside the run and the trackers' runs."""
        cfg, backend = self.cfg, self.backend
        self.log.info(self.first_line())
        if backend.is_main and (warning := unsharded_warning(cfg.dist.strategy, backend)):
            print(warning, file=sys.stderr, flush=True)
        self.watchdog.enter("resume")
        path = self.store.resolve(cfg.checkpoint.resume, cfg.run.out_dir,
                                  warn=self.log.info if backend.is_main else lambda _: None)
        if path is not None:
            self.checkpoints.resume(path)
        elif backend.is_main:  # one run per folder: an earlier run's files go first
            self.log.start_fresh(self.store.clear())
        self.log.write_config(cfg)
        # Rank 0: MLflow, W&B (the same runs after a resume), each behind a background sender.
        stop = self.log.start_trackers(cfg)
        if not backend.elastic:  # set-up runs no collective there
            stop = backend.broadcast_object(stop)  # Distribution: every rank stops alike
        if stop:
            raise ConfigError(stop)

    def first_line(self) -> str:
        """What the run is: processes and strategy, the global batch, steps an epoch."""
        cfg, backend = self.cfg, self.backend
        n, batch, accum = backend.world_size, cfg.data.batch_size, cfg.train.grad_accum_steps
        sharded = validates_sharded(cfg, backend)
        why = (sharded and cfg.validate.mode != "sharded") * " (FSDP's forward runs on every rank)"
        return (f"distrain: {backend.summary()}; global batch {n * batch * accum} = {n} × "
                f"{batch} × accum {accum}, {self.steps_per_epoch} steps an epoch; validation "
                f"{'sharded over the ranks' if sharded else 'on rank 0'}{why}")

    # ------------------------------------------------------------------ progress
    @property
    def global_step(self) -> int:
        """Optimizer steps taken or skipped (the engine counts them)."""
        return self.engine.global_step

    @global_step.setter
    def global_step(self, value: int) -> None:
        self.engine.global_step = value

    @property
    def epoch(self) -> int:
        """Epochs completed."""
        return self.progress.epoch

    @epoch.setter
    def epoch(self, value: int) -> None:
        self.progress.epoch = value

    @property
    def step_in_epoch(self) -> int:
        """Optimizer steps of the current epoch already taken (the loader's position)."""
        return self.progress.step_in_epoch

    @step_in_epoch.setter
    def step_in_epoch(self, value: int) -> None:
        self.progress.step_in_epoch = value

    @property
    def accum(self) -> int:
        """Micro-batches per optimizer step (Horovod elastic may change it)."""
        return self.engine.accum

    # ------------------------------------------------------------------ the step
    def train_micro_batch(self, batch, count: int, last: bool) -> torch.Tensor:
        """One micro-batch of `count` samples, and after its step's last one the optimizer
        step. The loader told the engine its share of the global batch, so backward weights
        the loss by it and the gradient sync waits for the step's last micro-batch."""
        loss, correct, logs = self.forward(to_device(batch, self.backend.device))
        self.engine.backward(loss)
        self.step_losses.append(loss.detach())
        self.sums.add(count, loss, correct, logs)  # the epoch's metrics, on the device
        if last:
            # The previous step's outcome, if the device decided it, is read inside step(),
            # with this step's work queued behind it: the device never waits for the host.
            self.losses_of = {s: v for s, v in self.losses_of.items() if s >= self.global_step}
            self.losses_of[self.global_step + 1], self.step_losses = self.step_losses, []
            self.engine.step(self.optimizer, clip_grad_norm=self.cfg.train.clip_grad_norm,
                             clip_grad_value=self.cfg.train.clip_grad_value)
        return loss

    def forward(self, batch) -> tuple[torch.Tensor, torch.Tensor | None, dict]:
        """The loss of one micro-batch, its correct predictions and the step function's logs."""
        cfg = self.cfg
        if self.step_fn is not None:
            with self.precision.autocast():
                out = call_plugin("train.step", cfg.train.step, self.step_fn, self.model, batch)
            loss, logs = split_output(out, cfg.train.step)
            return loss, None, logs
        x, target = self.mixer(*pair(batch))  # Mixup/CutMix, or (x, y) unchanged
        with self.precision.autocast():
            logits = self.model(x)
        if not self.outputs_checked:  # once: a CUDA kernel would assert, not explain
            check_outputs(cfg.model, logits, hard_labels(target), self.top_label)
            self.outputs_checked = True
        loss = call_plugin("loss.name", cfg.loss.name, compute_loss, self.loss_fn, logits,
                           target, cfg.augment.label_smoothing)
        return loss, correct_per_sample(logits.detach(), hard_labels(target)), {}

    def settle(self) -> None:
        """Apply the last step's outcome (the schedule, the EMA, the skip counters) before
        anything reads them; the engine holds it (see Engine.after_step)."""
        self.engine.settle()

    def after_step(self, step: int, taken: bool) -> None:
        if taken:  # a skipped step leaves the schedule and the EMA where they were
            self.schedule.step()
            if self.ema is not None:  # the weights of this step: the next update is not queued yet
                self.ema.update_parameters(self.backend.unwrap(self.model))
            self.progress.bad_steps = 0
        else:
            self.on_skipped_step(step, self.losses_of.get(step, []))

    def on_skipped_step(self, step: int, losses: list[torch.Tensor]) -> None:
        """Every rank skipped this step together; stop after train.max_bad_steps in a row."""
        self.progress.bad_steps += 1
        limit = self.cfg.train.max_bad_steps
        if limit and self.progress.bad_steps >= limit:
            # Collective, fine here: every rank skipped the same steps, so all arrive together.
            local = not all(bool(torch.isfinite(loss)) for loss in losses)
            seen = self.backend.all_gather_object(local)
            ranks = [r for r, bad in enumerate(seen) if bad]
            who = (f"non-finite loss on rank {', '.join(map(str, ranks))}" if ranks else
                   "every loss was finite: the gradients overflowed")
            raise NonFiniteError(f"{self.progress.bad_steps} consecutive steps with non-finite "
                                 f"gradients, the last at step {step}; {who}")

    def train_epoch(self, epoch: int) -> dict[str, float]:
        cfg, backend = self.cfg, self.backend
        self.loader.epoch = epoch
        plan = self.loader.plan()
        done = self.step_in_epoch  # > 0 when resuming from a mid-epoch checkpoint
        if not done:
            self.sums.reset()
        if hasattr(self.loss_fn, "set_epoch"):  # e.g. LDAM's deferred re-weighting
            self.loss_fn.set_epoch(epoch)
        self.model.train()
        every = cfg.train.log_every_steps
        start, seen, i = time.perf_counter(), 0, done
        self.data_wait_s, sync_before = 0.0, self.precision.sync_wait_s
        self.log.start_epoch(epoch + 1, cfg.train.epochs, len(plan), done)
        # The loader seeds each rank's random stream per (seed, epoch, rank) at an epoch's start.
        for batch, mb, step in self.timed(self.loader.micro_batches()):
            last = mb is step.micro[-1]
            loss = self.train_micro_batch(batch, mb.count, last)
            if not last:
                continue
            i, seen = i + 1, seen + step.size
            if self.profiler is not None:
                self.profiler.step()
            self.first_step_at = self.first_step_at or time.time()
            if i % every == 0 or i == len(plan):
                self.settle()  # every rank: a skip beyond train.max_bad_steps is a collective
                if backend.is_main:
                    self.log.progress(i, loss.item(), self.schedule.lr,
                                      seen / (time.perf_counter() - start), self.global_step)
            if self.between_steps(mid_epoch=i < len(plan)):  # a validation stopped the run
                break
        self.settle()
        if self.preemption.agreed_now():
            self.stop_for_signal()  # saved at the epoch's last step: a resume ends the epoch
        self.step_in_epoch = 0
        metrics = self.sums.totals(backend, accuracy=self.step_fn is None)  # Distribution
        seconds = time.perf_counter() - start
        sync = self.precision.sync_wait_s - sync_before
        self.warn_if_data_bound(epoch, self.data_wait_s / seconds)
        return {**metrics, "samples_per_s": seen / seconds, "train_time_s": seconds,
                # rank 0's breakdown: waiting for data, waiting for the gradient sync after
                # backward (Horovod; DDP overlaps it with backward), the rest is compute.
                "data_wait_s": self.data_wait_s, "sync_wait_s": sync,
                "compute_s": seconds - self.data_wait_s - sync}

    def between_steps(self, mid_epoch: bool) -> bool:
        """What runs after an optimizer step, each component deciding its own timing (an
        epoch's last step leaves validation, saves and commits to the epoch's end); True
        when a validation stopped the run."""
        step, audit_every = self.global_step, self.cfg.dist.audit_every_steps
        if self.validator.due(step, mid_epoch):
            self.evaluate_mid_epoch()
            if self.stop_requested:
                return True
        if self.preemption.agreed(step):  # agreed asynchronously, a step late
            self.stop_for_signal()
        if audit_every and step % audit_every == 0:
            self.audit()  # Distribution: collective
        self.checkpoints.maybe_save(step, mid_epoch)  # a failure costs <= every_steps steps
        if self.elastic is not None:  # Horovod elastic: a lost worker costs <= every steps
            self.elastic.maybe_commit(step, mid_epoch)
        return False

    def timed(self, items: Iterator) -> Iterator:
        """`items`, the time spent waiting for each added to data_wait_s (no device sync)."""
        while True:
            waited = time.perf_counter()
            item = next(items, None)
            self.data_wait_s += time.perf_counter() - waited
            if item is None:
                return
            yield item

    def warn_if_data_bound(self, epoch: int, share: float) -> None:
        limit = self.cfg.data.warn_wait_share
        if limit and share > limit:
            self.log.info(f"distrain: warning: epoch {epoch + 1} waited for data {share:.0%} of "
                          f"its time (> data.warn_wait_share={limit:g}); raise data.num_workers "
                          f"(now {self.loader.loader.num_workers}) or make __getitem__ cheaper")

    def stop_for_signal(self) -> None:
        """Every rank agreed on a preemption signal: write last.pt and stop."""
        self.checkpoints.save(write_last=True, write_best=False)
        self.checkpoints.wait_for_saves()
        raise Preempted(f"stopped by signal {self.preemption.signalled} at step "
                        f"{self.global_step}")

    # ------------------------------------------------------------------ the loop
    def fit(self) -> dict:
        cfg = self.cfg
        self.began = self.began or time.perf_counter()  # Horovod elastic re-enters fit()
        if self.epoch >= cfg.train.epochs:
            self.log.info(f"distrain: checkpoint already holds {self.epoch} epochs "
                          f"(train.epochs={cfg.train.epochs}); nothing to train")
        while self.epoch < cfg.train.epochs:
            epoch_start = time.perf_counter()
            record = {"epoch": self.epoch + 1, **self.train_epoch(self.epoch)}
            self.schedule.end_epoch()  # a user scheduler with scheduler.interval=epoch
            if self.stop_requested:  # a mid-epoch evaluation stopped it: its metrics stand
                record.update({k: v for k, v in self.history[-1].items() if k.startswith("val_")})
            elif self.validator.due_at_epoch_end(self.epoch + 1):
                record.update(self.validate_all())
            self.epoch += 1
            improved, stop = (False, True) if self.stop_requested else self.decide(record)
            record.update(step=self.global_step, lr=self.schedule.lr,
                          epoch_time_s=time.perf_counter() - epoch_start,
                          skipped_steps=self.precision.skipped_steps)
            # The row first: a process killed between the two then resumes from an earlier
            # checkpoint, which drops the row and writes it again; in the other order it
            # resumed from this epoch's checkpoint and the epoch's row was lost for good.
            self.log.end_epoch(record, improved)
            self.checkpoints.save(write_last=cfg.checkpoint.save_last, write_best=improved)
            self.history.append(record)
            if self.elastic:
                self.elastic.commit()
            if stop:
                self.log.info(f"distrain: early stop after epoch {self.epoch}: no improvement of "
                              f"{cfg.checkpoint.monitor} in {cfg.train.early_stop_patience} "
                              "validations")
                break
        self.checkpoints.wait_for_saves()
        return self.summary(time.perf_counter() - self.began)

    def validate_all(self) -> dict:
        """Validation metrics of the weights, and of their EMA when kept (`val_ema_*`)."""
        self.settle()
        self.watchdog.enter("validation", self.global_step)
        return self.validator(self.model)

    def evaluate_mid_epoch(self) -> None:
        """validate.every_steps: validate, decide, keep the best; early stopping counts these."""
        epoch = self.epoch + self.step_in_epoch / len(self.loader.plan())
        record = {"epoch": round(epoch, 4), "step": self.global_step, **self.validate_all(),
                  "lr": self.schedule.lr}
        improved, stop = self.decide(record)
        self.checkpoints.save(write_last=False, write_best=improved)
        self.log.eval_line(record, improved)
        self.history.append(record)
        self.stop_requested = stop

    def decide(self, record: dict) -> tuple[bool, bool]:
        """Rank 0 decides (best, stop, plateau LR) and every rank adopts its decision."""
        monitor = self.tracker.monitor
        if monitor.startswith("val_") and "val_loss" in record and monitor not in record:
            # Every rank holds the same metrics, so every rank refuses alike.
            found = ", ".join(k for k in record if k.startswith("val_") and k != "val_recall")
            raise ConfigError(f"checkpoint.monitor: {monitor!r} is not among this run's "
                              f"validation metrics ({found}); per-class metrics need a confusion "
                              f"matrix, which is kept up to {MAX_CONFUSION_CLASSES} classes")
        shared = self.engine.on_main(self.decide_on_main, record)  # one decision for all ranks
        if shared is None:  # no validation this epoch
            return False, False
        self.tracker.load_state_dict(shared["tracker"])
        self.schedule.load_state_dict(shared["schedule"])
        return shared["improved"], shared["stop"]

    def decide_on_main(self, record: dict) -> dict | None:
        """Rank 0 alone: best, stop and the plateau LR, from this record's monitored metric."""
        if self.tracker.monitor not in record:
            return None
        decision = self.tracker.decide(record, record["epoch"])
        self.schedule.observe(record[self.tracker.monitor])
        return {"improved": decision.improved, "stop": decision.stop,
                "tracker": self.tracker.state_dict(), "schedule": self.schedule.state_dict()}

    def summary(self, seconds: float) -> dict:
        last = next((r for r in reversed(self.history) if "val_loss" in r), {})
        out = {"epochs": self.epoch, "seconds": seconds, "out_dir": str(self.cfg.run.out_dir),
               "first_step_at": self.first_step_at,
               "best": self.tracker.best, "best_epoch": self.tracker.best_epoch,
               "monitor": self.tracker.monitor, "history": self.history,
               **{k: last[k] for k in ("val_loss", "val_acc") if k in last}}
        final = "".join(f"{k} {out[k]:.4f} " for k in ("val_acc", "val_loss") if k in out)
        final = f"final {final.rstrip()}; " if final else ""
        self.log.info(f"distrain: done: {self.epoch} epochs in {seconds:.1f} s; {final}"
                      f"best {out['monitor']} {out['best']:.4f} at epoch {out['best_epoch']}; "
                      f"run files in {out['out_dir']}")
        return out

    def set_accumulation(self, accum: int) -> None:
        """Micro-batches per optimizer step (Horovod elastic keeps the global batch this way)."""
        self.engine.accum = accum
        self.backend.set_accumulation(self.optimizer, accum)

    def audit(self) -> None:
        """dist.audit_every_steps: every rank holds the same counters, LR, loss scale and
        (unsharded) weights, or every rank raises DivergenceError."""
        self.settle()
        self.engine.audit({"epoch": self.epoch, "step in epoch": self.step_in_epoch,
                           "lr": self.schedule.lr}, key="dist.audit_every_steps")
