"""A per-rank watchdog: a hang becomes stack dumps and an exit, never a silent wait.

The loop marks progress (`watchdog.enter(phase)`) at each step, validation and checkpoint
write. A thread waits until `dist.timeout_s` has passed since the last mark; if nothing
moved, it writes which rank was stuck in which phase, dumps every thread's Python stack
(faulthandler) to stderr and to `<out_dir>/hang/rank<r>.txt`, and ends the process with
EXIT_HUNG. Each rank has its own, so the rank that blocks in its data set and the ranks
that wait for it in a collective all report. faulthandler's own timer, re-armed by the
thread, is the backstop for a hang that holds the GIL (the thread could not run then).
"""

from __future__ import annotations

import faulthandler
import os
import sys
import threading
import time
from pathlib import Path

EXIT_HUNG = 124  # like timeout(1)
BACKSTOP_S = 30.0  # faulthandler's GIL-free timer fires this much later than the watchdog


class Watchdog:
    def __init__(self, timeout_s: float, rank: int, out_dir: str | Path) -> None:
        self.timeout_s, self.rank, self.out_dir = timeout_s, rank, Path(out_dir)
        self.phase, self.step = "setup", -1
        self.marked = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="distrain-watchdog", daemon=True)

    def start(self) -> Watchdog:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        faulthandler.cancel_dump_traceback_later()

    def enter(self, phase: str, step: int = -1) -> None:
        """Progress: the rank is now in `phase` (train step, validation, checkpoint, ...),
        working towards optimizer step `step` when given. Cheap enough for every micro-step."""
        self.phase, self.step, self.marked = phase, step, time.monotonic()

    def _watch(self) -> None:
        while True:
            marked = self.marked
            faulthandler.dump_traceback_later(self.timeout_s + BACKSTOP_S, exit=True,
                                              file=_stderr())
            if self._stop.wait(max(0.0, marked + self.timeout_s - time.monotonic())):
                return
            if self.marked == marked:  # no progress for timeout_s
                self._fire()

    def _fire(self) -> None:
        where = f"{self.phase} (step {self.step})" if self.step >= 0 else self.phase
        message = (f"distrain: error: rank {self.rank} made no progress for {self.timeout_s:g} s "
                   f"in {where}; stopping (dist.timeout_s={self.timeout_s:g}). A rank that "
                   "waits here is usually waiting for another rank: compare the ranks' stacks.")
        print(message, file=sys.stderr, flush=True)
        faulthandler.dump_traceback(file=_stderr(), all_threads=True)
        try:
            folder = self.out_dir / "hang"
            folder.mkdir(parents=True, exist_ok=True)
            with open(folder / f"rank{self.rank}.txt", "w") as f:
                f.write(message + "\n")
                f.flush()
                faulthandler.dump_traceback(file=f, all_threads=True)
            print(f"distrain: rank {self.rank}'s stacks: {folder / f'rank{self.rank}.txt'}",
                  file=sys.stderr, flush=True)
        finally:
            os._exit(EXIT_HUNG)


def _stderr():
    """A stream with a file descriptor, as faulthandler needs (a captured sys.stderr may
    have none)."""
    try:
        sys.stderr.fileno()
        return sys.stderr
    except (AttributeError, OSError, ValueError):
        return sys.__stderr__
