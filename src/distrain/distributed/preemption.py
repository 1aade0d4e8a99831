"""Preemption: SIGTERM or SIGUSR1 (what schedulers such as Slurm send first) on any rank
stops every rank at the same step, after rank 0 wrote last.pt.

The handler only records the signal. The ranks agree through a tiny allreduce (MAX) of
[signal, steps to the next check], started at one check and read at the next, so no step
waits on it; rank 0 proposes the interval for about one check a second, and since every
rank reads the same reduced value, every rank checks, and stops, at the same step. Each
epoch ends with one blocking check, so a short run cannot miss a signal.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from typing import Callable

import torch

from distrain.distributed import Backend

SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
MAX_INTERVAL = 100  # steps between checks, at most


class PreemptionFlag:
    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self.signalled: int | None = None  # set by the handler (this rank only)
        self.pending: Callable[[], torch.Tensor] | None = None  # the allreduce in flight
        self.next_check = 0  # the same step on every rank
        self.last_check = (time.perf_counter(), 0)
        self.polled = False  # has the loop ever asked (agreed, agreed_now)?
        self.epochs = 0  # begun by this process's loaders
        self.previous: dict = {}  # the handlers `catch` replaced, by signal

    def on_signal(self, signum: int, frame) -> None:
        self.signalled = signum

    def catch(self) -> None:
        """Record SIGTERM/SIGUSR1 instead of dying at once, until `release` (main thread)."""
        if threading.current_thread() is threading.main_thread() and not self.previous:
            self.previous = {sig: signal.signal(sig, self.on_signal) for sig in SIGNALS}

    def release(self) -> dict:
        """The handlers that were there before, back; returns them."""
        previous, self.previous = self.previous, {}
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        return previous

    def agreed(self, step: int) -> int:
        """After optimizer step `step`: the signal every rank agrees to stop for, or 0."""
        self.polled = True
        if step < self.next_check:
            return 0
        agreed, interval = 0, 1
        if self.pending is not None:
            agreed, interval = (int(v) for v in self.pending().tolist())  # Distribution: MAX
        now = time.perf_counter()
        proposal = 0
        if self.backend.is_main:  # about one check a second
            per_step = (now - self.last_check[0]) / max(1, step - self.last_check[1])
            proposal = int(min(MAX_INTERVAL, max(1, 1.0 / max(per_step, 1e-6))))
        self.last_check = (now, step)
        flag = torch.tensor([self.signalled or 0, proposal], device=self.backend.device)
        self.pending = self.backend.all_reduce_async(flag, op="max")
        self.next_check = step + interval
        if agreed:
            self.finish()
            self.signalled = agreed
        return agreed

    def finish(self) -> int:
        """Wait for the allreduce in flight; the signal it carried (agreed by all), or 0."""
        if self.pending is None:
            return 0
        pending, self.pending = self.pending, None
        return int(pending()[0])

    def agreed_now(self) -> int:
        """A blocking check (at an epoch's end; Engine.should_stop): every signal received
        so far is seen by every rank."""
        self.polled = True
        agreed = self.finish() or int(self.backend.all_reduce(  # Distribution
            torch.tensor([self.signalled or 0], device=self.backend.device), op="max"))
        if agreed:
            self.signalled = agreed
        return agreed

    def epoch_begins(self) -> None:
        """An epoch starts: from the second one of this process on (at the first a polling
        loop has not had its chance to ask yet), a loop that never asks dies of a signal
        received before (die_if_unheeded)."""
        if self.epochs:
            self.die_if_unheeded(self.previous)
        self.epochs += 1

    def die_if_unheeded(self, previous: dict) -> None:
        """A signal arrived and the loop has never asked (it does not call
        Engine.should_stop): die of it as the plain loop would have, the handler that was
        there before (`previous`, by signal) restored, rather than train on and exit 0.
        Called where a polling loop would have asked by then: an epoch's start, the end."""
        sig = self.signalled
        if not sig or self.polled or sig not in previous:
            return
        print(f"distrain: rank {self.backend.rank}: {signal.Signals(sig).name} received and "
              "this loop never asked eng.should_stop(), so it stops now as it would without "
              "distrain; poll should_stop (every step with wait=False) to save a checkpoint "
              "first", file=sys.stderr, flush=True)
        signal.signal(sig, previous[sig] if previous[sig] is not None else signal.SIG_DFL)
        os.kill(os.getpid(), sig)

    def reset(self) -> None:
        """Horovod elastic: the allreduce in flight died with the old group; a joining worker
        starts at 0 too, so every rank checks at the next step."""
        self.pending, self.next_check = None, 0
