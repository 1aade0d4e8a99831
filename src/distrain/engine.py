"""distrain's engine as a library for a hand-written training loop.

    eng = distrain.Engine(precision="fp16", accum=2)
    model, optimizer = eng.setup(model, optimizer)
    loader = eng.loader(train_set, batch_size=16)          # this rank's micro-batches
    for i, (x, y) in enumerate(loader):
        with torch.autocast(eng.device.type, dtype=torch.float16):
            loss = criterion(model(x.to(eng.device)), y.to(eng.device))
        eng.backward(loss)                                  # weighted, scaled, synced once
        if (i + 1) % 2 == 0 or i + 1 == len(loader):
            eng.step(optimizer, clip_grad_norm=5.0)         # sync, unscale, clip, step, update

The same script runs as `python`, under `torchrun`, `horovodrun` and `mpirun`. The loader
cuts each epoch into global batches of world_size × batch_size × accum samples (the same
samples meet in the same step whatever the layout) and `backward` weights each micro-batch
by its share of the global batch, so a step's gradient is the exact mean over the global
batch, short last batch included: the final weights do not depend on the process layout.
See examples/own_loop.py beside examples/plain_loop.py.
"""

from __future__ import annotations

import atexit
import contextlib
import gc
import json
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler

from distrain.components.blocks import checkpoint_activations, find_blocks
from distrain.components.accumulation import Window
from distrain.components.checkpoint import files as ckpt
from distrain.components.checkpoint.checkpointer import Checkpointer
from distrain.components.checkpoint.store import CheckpointStore, Checkpoints, change_since
from distrain.components.data.datasets import seed_streams, to_device
from distrain.components.data.loader import TrainLoader, samples_of, shard_loader
from distrain.components.observe.runlock import lock_folder
from distrain.components.precision import Precision, StepOutcome
from distrain.distributed import Backend, start_backend
from distrain.distributed.audit import audit_replicas
from distrain.distributed.backend import WrappedModel
from distrain.distributed.preemption import PreemptionFlag
from distrain.distributed.ranks import Ranks
from distrain.distributed.state_dicts import refuse_shards
from distrain.distributed.strategy import Strategy, as_strategy, check_backend, refuse_moved
from distrain.distributed.watchdog import Watchdog
from distrain.errors import MisuseError


# What an engine's file holds besides the registered objects' states and the checkpointer's
# own keys ("accum": written, never read, by the engine of distrain 0.1.0 before 2026-12).
OWN_KEYS = {ckpt.GLOBAL_STEP, ckpt.CONFIG, ckpt.GLOBAL_BATCH, ckpt.VERSION, "accum"}


class Engine(Ranks):
    """Distribution, mixed precision, accumulation and checkpoints for your own loop.

    precision: fp32, fp16 (autocast + GradScaler) or bf16; accum: micro-batches per step;
    seed: the data order and each rank's streams per epoch (0 if None; given, it also seeds
    torch, NumPy and `random` at once: build the model after it); backend: auto, local,
    torchrun or horovod; strategy: distrain.DDP() (None), FSDP() or Horovod() with their
    options ("ddp"/"fsdp": the defaults); out_dir: the run's folder (hang dumps and
    checkpoints; "." if None), given, rank 0 holds its lock until close (a second run on it:
    RunLocked, naming the holder); checkpoints: distrain.Checkpoints(keep_last=, async_save=,
    sharded=), how save_checkpoint() keeps <out_dir>/checkpoints; config: your settings (a
    dict) saved in each checkpoint, a resume with others is refused; timeout_s: the
    watchdog's limit; debug: a collective inside `on_main` raises."""

    def __init__(self, precision: str = "fp32", accum: int = 1, *, seed: int | None = None,
                 backend: str | Backend = "auto", device: str = "auto",
                 strategy: str | Strategy | None = None, out_dir: str | Path | None = None,
                 checkpoints: Checkpoints | None = None, config: dict | None = None,
                 timeout_s: float = 600.0, debug: bool = False,
                 skip_nonfinite_steps: bool = True, watchdog: Watchdog | None = None,
                 **moved: Any) -> None:
        refuse_moved("Engine(...)", moved)  # keywords of distrain before 2026-12, if any
        if precision not in ("fp32", "fp16", "bf16"):
            raise ValueError(f"precision: expected fp32, fp16 or bf16, got {precision!r}")
        if not (isinstance(accum, int) and accum >= 1):
            raise ValueError(f"accum: expected an integer >= 1, got {accum!r}")
        self.strategy = strategy = as_strategy(strategy, getattr(backend, "strategy", "ddp"))
        checkpoints = CheckpointStore.how(checkpoints)  # a mistake found before any start
        self.accum, self.seed = accum, 0 if seed is None else seed
        if seed is not None:  # a model built after the Engine starts alike on every run
            seed_streams(seed)
        # Saved in checkpoints as JSON values (a Path: its text): weights_only loads read them.
        self.config = None if config is None else json.loads(json.dumps(config, default=str))
        # A backend object (the config trainer's) is set up and torn down by its owner.
        self._owns_backend = not isinstance(backend, Backend)
        if self._owns_backend:
            backend = start_backend(backend, device, timeout_s=timeout_s, debug=debug,
                                    precision=precision, strategy=strategy)
        else:
            check_backend(strategy, backend.name, backend.strategy)
        self.backend: Backend = backend
        # One run per folder (the config trainer's own lock is held by its `train`).
        self.run_lock = lock_folder(out_dir, backend, "Engine(out_dir)") \
            if out_dir is not None and self._owns_backend else None
        out_dir = "." if out_dir is None else out_dir
        self.precision = Precision(precision, self.backend.device, skip_nonfinite_steps)
        self.watchdog = watchdog or Watchdog(timeout_s, self.backend.rank, out_dir).start()
        self._owns_watchdog = watchdog is None
        self.out_dir = Path(out_dir)
        # save_checkpoint() without a path: <out_dir>/checkpoints, verified, the newest kept.
        self.store = CheckpointStore.of(self.backend, ckpt.checkpoint_dir(out_dir), checkpoints)
        self.unrestored: dict[str, Any] = {}  # what the last non-strict load left unused
        self.global_step = 0
        self._raw: nn.Module | None = None
        self._model: nn.Module | None = None  # what the forward runs through (DDP, compiled, raw)
        self._synced: nn.Module | None = None  # what syncs the gradients (DDP, FSDP, raw)
        self._optimizer = self._given_optimizer = None  # as setup returned it, as given
        self.current_loader: TrainLoader | None = None  # the one iterating: steps count there
        self._window = Window()  # the global batch in flight: micro-batches, shares, checks
        self._outcome: StepOutcome | None = None  # the last step's, until it is settled
        self._after_step: Callable[[int, bool], None] | None = None
        self._no_sync = contextlib.ExitStack()
        self._train_loader: TrainLoader | None = None  # the last one made: the global batch
        # What save_checkpoint() saves: everything registered (the model, the optimizer and
        # the loader once made), the loss scale, the step and every rank's random streams.
        self.checkpointer = Checkpointer(self.backend, self.store)
        self.checkpointer.register(ckpt.PRECISION, self.precision)
        self._closed = False
        # SIGTERM/SIGUSR1 (what Slurm sends before it kills a job): every rank stops together.
        self.preemption = PreemptionFlag(self.backend)
        if self._owns_backend:  # leave the process group at exit if the user does not
            atexit.register(self.close)
            self.catch_signals()

    def catch_signals(self) -> None:
        """SIGTERM/SIGUSR1 recorded for `should_stop` until close (unless a Backend was given)."""
        self.preemption.catch()

    # ------------------------------------------------------------------ set-up
    def setup(self, model: nn.Module, optimizer: torch.optim.Optimizer
              ) -> tuple[nn.Module, torch.optim.Optimizer]:
        """Move the model to the device and wrap both for the gradient sync (DDP, FSDP or
        Horovod); every rank starts from rank 0's weights. Use the returned objects from here
        on (under FSDP the optimizer is given the sharded parameters)."""
        if self._raw is not None:
            raise MisuseError("Engine.setup: called twice; one engine trains one model")
        if optimizer.state:
            raise MisuseError("Engine.setup: the optimizer already holds state (it stepped, "
                              "or a state was loaded into it); call setup first, then resume "
                              "with eng.load_checkpoint (its state must match the wrapping)")
        raw = model.to(self.device)
        blocks = self.strategy.blocks
        if self.strategy.activation_checkpointing:  # each block recomputes in backward
            checkpoint_activations(find_blocks(raw, blocks))
        self._raw = raw
        self._model = self._synced = self.backend.setup_module(
            raw, optimizer, blocks=lambda m: find_blocks(m, blocks))
        if self.strategy.compile:
            self._model = torch.compile(self._synced)
        self._optimizer = self.backend.wrap_optimizer(optimizer, self._model, self.accum)
        self._given_optimizer = optimizer
        self.checkpointer.register_training(raw, self._optimizer)  # as "model", "optimizer"
        wrapped = raw if self._model is raw else WrappedModel(raw, self._model)
        return wrapped, self._optimizer

    def loader(self, dataset: Dataset, batch_size: int, shuffle: bool = True,
               num_workers: int = 0, collate_fn: Callable | None = None,
               sampler: Sampler | None = None) -> TrainLoader:
        """This rank's micro-batches of `batch_size` samples; one `for` over it is one epoch.
        `sampler` (any torch Sampler, e.g. class-balanced): its draw decides which samples
        an epoch visits, made per (seed, epoch) and the same on every rank."""
        loader = TrainLoader(self, dataset, batch_size, shuffle, num_workers, collate_fn, sampler)
        self.register("loader", loader)
        self._train_loader = loader
        return loader

    def val_loader(self, dataset: Dataset, batch_size: int, num_workers: int = 0,
                   collate_fn: Callable | None = None) -> DataLoader:
        """A disjoint, unpadded slice of `dataset` per rank (its `samples` attribute counts
        them); average a metric over all ranks with `mean(value, loader)`."""
        return shard_loader(dataset, self.world_size, self.rank, batch_size, num_workers,
                            collate_fn, pin=self.device.type == "cuda")

    def register(self, name: str, obj: Any) -> None:
        """Save and resume `obj` in checkpoints: anything with state_dict/load_state_dict,
        or a dict of plain values (`progress = {"iteration": 0}`), updated in place."""
        self.checkpointer.register(name, obj)

    def autocast(self) -> Any:
        """The autocast context of `Engine(precision=)` (fp16, bf16; fp32: none) for the
        forward and the loss: `with eng.autocast(): loss = criterion(model(x), y)`."""
        return self.precision.autocast()

    def unwrap(self, model: nn.Module) -> nn.Module:
        """The user's own module behind a model `setup` returned."""
        return model.module if isinstance(model, WrappedModel) else self.backend.unwrap(model)

    def to_device(self, batch: Any) -> Any:
        """`batch` (tensors, tuples, lists, dicts, nested) on this rank's device."""
        return to_device(batch, self.device)

    # ------------------------------------------------------------------ the step
    def micro_batch(self, count: int, size: int, last: bool) -> None:
        """The next forward/backward is a micro-batch of `count` samples of a global batch of
        `size`; `last`: the gradients sync on its backward. Engine.loader calls this for you."""
        if self._raw is None:
            raise MisuseError("Engine.loader: a batch before Engine.setup; call `model, "
                              "optimizer = eng.setup(model, optimizer)` before the loop")
        micro = self._window.begin(count, size, last)
        self._no_sync.close()
        if not micro.last:  # Distribution: accumulate locally; the last micro-batch syncs
            self._no_sync.enter_context(self.backend.no_sync(self._synced))
        self.watchdog.enter("train step", self.global_step + 1)

    def epoch_begins(self) -> None:
        """The loader starts an epoch (see PreemptionFlag.epoch_begins)."""
        self.preemption.epoch_begins()

    @property
    def step_due(self) -> bool:
        """The micro-batch in flight is its global batch's last: step after its backward
        (an epoch's last global batch may have fewer than accum micro-batches)."""
        return self._window.step_due

    def backward(self, loss: torch.Tensor) -> None:
        """Backward of one micro-batch's mean loss, weighted by its share of the global batch
        (and scaled under fp16); the gradients are synced once, on the step's last one."""
        share = self._window.share(self.backend.loss_factor())
        self.precision.backward(loss * share if share != 1.0 else loss)
        self._window.backward_ran()

    def step(self, optimizer: torch.optim.Optimizer | None = None, *,
             clip_grad_norm: float = 0.0, clip_grad_value: float = 0.0,
             skip: bool | None = None) -> StepOutcome:
        """Sync, unscale, clip, step, update the scaler, zero the gradients; a step with
        NaN/inf gradients is skipped on every rank. The outcome's `taken()` tells which
        (a fused optimizer on CUDA decides on the device: reading it waits for that step).
        `skip`: this rank's wish to drop the global batch, agreed by one tiny allreduce:
        if any rank wishes so, every rank skips (as skip_step)."""
        if optimizer is not None and optimizer is not self._optimizer:
            raise MisuseError("Engine.step: this is not the optimizer Engine.setup returned")
        self._window.check_step(self.accum)
        if skip is not None and self.backend.all_reduce(  # Distribution: any rank's wish
                torch.tensor([float(bool(skip))], device=self.device), op="max").item():
            self.skip_step()
            return StepOutcome(self.precision, False)
        self._no_sync.close()
        self.watchdog.enter("train step", self.global_step + 1)
        self.settle()  # the device's flag of the last step is read first
        self._outcome = self.precision.step(self._optimizer, self._raw, self.backend,
                                            clip_grad_norm, clip_grad_value)
        if self._given_optimizer is not self._optimizer:  # Horovod's: the scheduler built
            self._given_optimizer._opt_called = True  # on yours sees it stepped (no warning)
        self._end_step()
        outcome = self._outcome
        if outcome.decided:  # known on the host: applied now, nothing to wait for later
            self.settle()
        return outcome

    def skip_step(self) -> None:
        """Drop the global batch in flight instead of stepping (e.g. an epoch's short last
        one, or a batch your loop rejects): its gradients are zeroed, the weights, the
        optimizer and the loss scale stay, and it counts as a skipped step (`after_step`
        hears taken=False). Call it where `step` would go, on every rank alike (a reason
        only some ranks see: `step(skip=...)` agrees it first)."""
        self._window.check_step(self.accum, "Engine.skip_step")
        if not self.backend.can_drop_step():
            raise MisuseError("Engine.skip_step: Horovod's Adasum moves the weights during "
                              "backward, so a global batch cannot be dropped after it; use "
                              "op average or sum (Engine(strategy=distrain.Horovod(op=...)))")
        self._no_sync.close()
        self.settle()
        self.backend.synchronize(self._optimizer)  # Horovod: its allreduces in flight end
        self._end_step()
        self.precision.skipped_steps += 1
        if self._after_step is not None:
            self._after_step(self.global_step, False)

    def _end_step(self) -> None:
        self._optimizer.zero_grad()  # set_to_none by default (Horovod takes no argument)
        self.global_step += 1
        self._window.end()
        if self.current_loader is not None:
            self.current_loader.steps_done += 1

    def after_step(self, fn: Callable[[int, bool], None] | None) -> None:
        """Call `fn(step, taken)` once for every optimizer step when its outcome is known:
        at once where the host decided it, else (a fused optimizer on CUDA decided on the
        device) at the next step, `settle()`, a checkpoint or an audit, so the device never
        waits for the host. What follows a step (an LR schedule, an EMA update) goes there."""
        self._after_step = fn

    def discard_outcome(self) -> None:
        """Forget the step in flight and its undecided outcome (a Horovod elastic rollback)."""
        self.precision.flag.discard()
        self._outcome = None
        self._window.end()

    def settle(self) -> None:
        """Apply the last step's outcome now, once (reading a device's decision waits for
        that step; counts a skip): before anything reads what `after_step` changes."""
        outcome, self._outcome = self._outcome, None
        if outcome is not None:
            taken = outcome.taken()
            if self._after_step is not None:
                self._after_step(self.global_step, taken)

    @property
    def skipped_steps(self) -> int:
        """Optimizer steps skipped for NaN/inf gradients (or an fp16 overflow) so far."""
        self.settle()
        return self.precision.skipped_steps

    # ------------------------------------------------------------------ agreeing
    def mean(self, values: Any, weight: int | DataLoader) -> Any:
        """The mean over all ranks of per-rank means `values` (a number or a tuple of them),
        each rank weighted by `weight` (its sample count, or the val_loader that has it):
        the exact mean over the whole set, bit-identical on every rank."""
        return self.backend.weighted_mean(values, samples_of(weight, "Engine.mean"))

    def on_main(self, fn: Callable, *args: Any, **kwargs: Any) -> Any:
        """`fn(*args, **kwargs)` on rank 0 alone, its result broadcast to every rank (e.g. a
        validation). Models from `setup` are passed unwrapped: no collective runs inside."""
        result, given = None, (*args, *kwargs.values())
        if self.backend.forward_is_collective and any(self._is_ours(a) for a in given):
            raise MisuseError("Engine.on_main: an FSDP model runs on every rank (its forward "
                              "gathers the weights from all of them); evaluate it on every "
                              "rank with val_loader(...) and mean(...)")
        if self.is_main:
            args = tuple(self._unwrapped(a) for a in args)
            kwargs = {k: self._unwrapped(v) for k, v in kwargs.items()}
            self.watchdog.enter("rank 0 only", self.global_step)
            with self.backend.main_only(getattr(fn, "__name__", "Engine.on_main")):
                result = fn(*args, **kwargs)
        return self.backend.broadcast_object(result)  # Distribution: the others wait for it

    def _is_ours(self, obj: Any) -> bool:
        return obj is self._model or obj is self._raw or isinstance(obj, WrappedModel)

    def _unwrapped(self, obj: Any) -> Any:
        return self.unwrap(obj) if self._is_ours(obj) else obj

    def should_stop(self, wait: bool = True) -> int:
        """The preemption signal (SIGTERM, SIGUSR1: what Slurm sends before it kills a job)
        any rank has received, agreed by all ranks, else 0; then save_checkpoint and leave.
        A collective: call it on every rank at the same point. wait=True checks now (one
        small blocking allreduce: fine every N steps); wait=False is for every step: it
        never blocks (a check starts at one call and is read at a later one, about once a
        second), and every rank still gets the same answer at the same step."""
        if wait:
            return self.preemption.agreed_now()  # Distribution: every rank stops together
        return self.preemption.agreed(self.global_step)

    def audit(self, extra: dict[str, float] | None = None, *, key: str = "Engine.audit"
              ) -> None:
        """Raise DivergenceError on every rank unless all ranks hold the same step, LR, loss
        scale and weights, and the same `extra` values (one small allreduce)."""
        self.settle()  # the last step's outcome counts
        lr = self._optimizer.param_groups[0]["lr"] if self._optimizer else 0.0
        audit_replicas(self.backend, self.global_step, {"lr": lr, **(extra or {})},
                       self.precision.scale, self._raw, key)

    # ------------------------------------------------------------------ files
    def save(self, obj: Any, path: str | Path) -> None:
        """`torch.save(obj, path)` on rank 0 alone, atomically, with a completion marker
        (size and hash) written last; the other ranks write nothing. The model's weights:
        `eng.save(eng.model_state_dict(), path)` (FSDP's `model.state_dict()` is refused:
        it holds this rank's shards only)."""
        refuse_shards(obj, "Engine.save")
        if self.is_main:
            with self.backend.main_only("Engine.save"):
                ckpt.save_verified(obj, path)

    def model_state_dict(self) -> dict:
        """The whole model's state dict, as a plain model loads it: under FSDP the shards
        gathered (a collective: every rank calls it; rank 0 gets the tensors, on the CPU);
        elsewhere the model's own."""
        if self._raw is None:
            raise MisuseError("Engine.model_state_dict: no model yet; call eng.setup first")
        return self.backend.module_state(self._raw)

    def save_checkpoint(self, path: str | Path | None = None) -> None:
        """Everything registered, the scaler, the step and every rank's random streams, in one
        verified file; every rank calls it, rank 0 writes. Without `path`: <out_dir>/
        checkpoints/step-N.pt and last.pt, the newest Checkpoints(keep_last=) kept (a damaged
        newest one then falls back to the one before), from a thread with async_save."""
        self._window.check_between_steps("Engine.save_checkpoint")
        self.settle()  # the last step's outcome counts
        self.watchdog.enter("checkpoint", self.global_step)
        self.checkpointer.save(self.own_state(), path=path)  # Distribution: collective

    def own_state(self) -> dict:
        """The engine's keys in a checkpoint besides the registered objects' states."""
        return {ckpt.GLOBAL_STEP: self.global_step, ckpt.GLOBAL_BATCH: self._global_batch(),
                ckpt.CONFIG: self.config}

    def load_checkpoint(self, path: str | Path = "auto", strict: bool = True,
                        allow_changes: bool = False) -> Path | None:
        """Resume from `save_checkpoint`'s file (see Checkpointer.read/restore); the same
        number of processes resumes each rank's random streams too. "auto": the newest good
        step checkpoint in <out_dir>/checkpoints, or None for a fresh start. strict: each
        registered object finds its state and each state its object, else MisuseError
        (strict=False: the rest in `unrestored`). Another global batch or `Engine(config=)`
        is refused (MisuseError naming it) unless allow_changes. Returns the file."""
        self.watchdog.enter("resume", self.global_step)
        self.store.wait()  # a save still in flight is the newest
        checkpointer = self.checkpointer
        state, found = checkpointer.read(path, self.out_dir, "Engine.load_checkpoint")
        if state is None:
            return None  # "auto" and nothing saved yet: a fresh start
        change = None if allow_changes else change_since(
            found, state, self._global_batch(), self.config, self.world_size, self.accum)
        checkpointer.refuse(change)  # Distribution: rank 0's verdict
        self.unrestored = checkpointer.unmatched(found, state, OWN_KEYS, strict)
        checkpointer.restore(found, state)
        self.global_step = state[ckpt.GLOBAL_STEP]
        checkpointer.restore_streams(state)
        if self.is_main:
            print(f"distrain: resumed from {found} at step {self.global_step}", flush=True)
        return found

    def _global_batch(self) -> int | None:  # samples per step, all ranks (None: no loader)
        loader = self._train_loader
        return None if loader is None else loader.batch_size * self.world_size * self.accum

    # ------------------------------------------------------------------ the end
    def close(self, wait_for_saves: bool = True) -> None:
        """Wait for an async save in flight, stop the watchdog and leave the process group
        (also at interpreter exit). wait_for_saves=False after an error: a sharded save's
        end is a collective that a failed rank would never join."""
        if self._closed:
            return
        self._closed = True
        previous = self.preemption.release()
        try:
            if wait_for_saves:
                self.store.wait()  # an async save in flight reaches the disk (or raises)
        finally:
            if self._owns_watchdog:
                self.watchdog.stop()
            self._no_sync.close()
            # Distribution: free DDP (it holds the process group) before the group goes down.
            self._model = self._synced = self._raw = self._optimizer = self._train_loader = None
            self.checkpointer.clear()
            if self.run_lock is not None:
                self.run_lock.release()  # rank 0's, after its last write
            if self._owns_backend:
                gc.collect()
                self.backend.teardown()
        if wait_for_saves:  # a loop that never asked should_stop dies of its signal now
            self._window.warn_unstepped(self.rank)
            self.preemption.die_if_unheeded(previous)
