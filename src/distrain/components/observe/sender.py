"""A tracker behind a queue: no outside service can stall or kill training.

Each tracker (MLflow, W&B) runs on its own thread. Its start is waited for at most
`start_timeout_s`: a server that does not answer by then leaves the tracker off, said in
one line (or stops the run, logging.tracker_unreachable=stop). Afterwards rank 0 only
queues what metrics.jsonl receives and returns at once; the thread sends in order, and a
call that fails (the server gone) is retried with a growing pause, keeping the points
behind it queued (at most `max_queued`; beyond, the oldest progress points go first), so
a server that comes back receives every point it missed. At the end the thread gets
`flush_timeout_s` to empty the queue and close the run, and the closing line says how many
points it could not send.
"""

from __future__ import annotations

import collections
import re
import sys
import threading
import time
from typing import Any, Callable

from distrain.components.observe.experiment import FAILED, ExperimentTracker

MAX_PAUSE_S = 10.0  # between two tries of a failing call


def _short(exc: BaseException) -> str:
    """One short line: the OS's reason where there is one ([Errno 111] Connection refused)."""
    text = str(exc)
    errno = re.search(r"\[Errno -?\d+\] [^'\")\]]+", text)
    if errno:
        return errno.group(0).strip()
    if "timed out" in text.lower():
        return "timed out"
    line = (text.strip().splitlines() or [type(exc).__name__])[-1]
    return f"{type(exc).__name__}: {line[:160]}"


class Sender:
    """`tracker`'s calls on a background thread; `name` and `where` for the run's lines."""

    def __init__(self, tracker: ExperimentTracker, name: str, where: str,
                 start_timeout_s: float = 20.0, flush_timeout_s: float = 30.0,
                 max_queued: int = 100_000) -> None:
        self.tracker, self.name, self.where = tracker, name, where
        self.start_timeout_s, self.flush_timeout_s = start_timeout_s, flush_timeout_s
        self.max_queued = max_queued
        self.queue: collections.deque = collections.deque()
        self.ready = threading.Condition()
        self.closing_at: float | None = None  # past it, the thread gives up on what is left
        self.sent = self.dropped = self.retries = 0
        self.failing: str | None = None  # the last error while the server is away
        self.thread: threading.Thread | None = None

    def start(self, *args: Any) -> str | None:
        """The tracker's start on the thread, waited for at most start_timeout_s; None once
        it started, else what went wrong (the tracker is then off)."""
        outcome: dict[str, Any] = {}
        started = threading.Event()  # the start returned or raised

        def first() -> None:
            try:
                self.tracker.start(*args)
                result = {"ok": True}
            except BaseException as exc:  # noqa: BLE001 - reported, never raised here
                result = {"error": _short(exc)}
            with self.ready:  # decided under the lock the caller's give-up takes too
                outcome.update(result)
                given_up = self.closing_at is not None
            started.set()
            if result.get("ok") and given_up:
                # The server answered after the run went on without it: end the run it opened
                # (marked FAILED), not leave it RUNNING for ever.
                try:
                    self.tracker.finish(FAILED, False)
                except Exception:  # noqa: BLE001 - nothing more to do for it
                    pass
            elif result.get("ok"):
                self._drain()

        self.thread = threading.Thread(target=first, name=f"distrain-{self.name}", daemon=True)
        self.thread.start()
        started.wait(self.start_timeout_s)
        with self.ready:
            if outcome.get("ok"):
                return None
            # A start still hanging: if it ever returns, it closes its run and sends nothing.
            self.closing_at = time.monotonic()
            self.ready.notify()
        return outcome.get("error") or f"no answer within {self.start_timeout_s:g} s"

    def log_row(self, record: dict) -> None:
        self._put(self.tracker.log_row, dict(record), row=True)

    def log_step(self, step: int, values: dict[str, float]) -> None:
        self._put(self.tracker.log_step, step, dict(values), row=False)

    def _put(self, call: Callable, *args: Any, row: bool) -> None:
        with self.ready:
            if len(self.queue) >= self.max_queued:  # the oldest progress point goes first
                # (never the head: the thread may be sending it)
                steps = [i for i, item in enumerate(self.queue) if i and not item[2]]
                del self.queue[steps[0] if steps else 1]
                self.dropped += 1
            self.queue.append((call, args, row))
            self.ready.notify()

    def _drain(self) -> None:
        """The thread's loop: send each queued call in order, retrying one that fails."""
        pause = 0.5
        while True:
            with self.ready:
                while not self.queue and self.closing_at is None:
                    self.ready.wait()
                if not self.queue:
                    return  # closing, and nothing left
                call, args, _ = self.queue[0]
            try:
                call(*args)
            except Exception as exc:  # the server away: keep the point, try again later
                self.failing, self.retries = _short(exc), self.retries + 1
                until = time.monotonic() + pause
                with self.ready:  # new points (notify) do not cut the pause short
                    while (left := until - time.monotonic()) > 0:
                        deadline = self._deadline()
                        if deadline is not None and until > deadline:
                            return  # the run is ending and the server is still away
                        self.ready.wait(left)
                pause = min(MAX_PAUSE_S, pause * 2)
                continue
            with self.ready:
                self.queue.popleft()
            self.sent, self.failing, pause = self.sent + 1, None, 0.5

    def _deadline(self) -> float | None:
        """Past it the thread gives up: the points get flush_timeout_s after the run's end;
        the finish (files, a best checkpoint to upload) ten times that, once they are sent."""
        if self.closing_at is None:
            return None
        finishing = len(self.queue) == 1 and self.queue[0][0] == self.tracker.finish
        return self.closing_at + (9 * self.flush_timeout_s if finishing else 0.0)

    def finish(self, status: str, checkpoint: bool) -> str | None:
        """Empty the queue (at most flush_timeout_s), then the tracker's finish (at most ten
        times that); a line for the run's end when points were not sent or the run was not
        closed."""
        with self.ready:
            self.queue.append((self.tracker.finish, (status, checkpoint), True))
            self.closing_at = time.monotonic() + self.flush_timeout_s
            self.ready.notify()
        if self.thread is not None:
            self.thread.join(10 * self.flush_timeout_s + 1.0)
        with self.ready:
            left = len(self.queue)
        if not left and not self.dropped:
            return None
        unsent = max(0, left - 1) + self.dropped  # the finish itself is not a point
        why = f" ({self.failing})" if self.failing else ""
        closed = "did not close the run (its files not uploaded)" if left else "closed the run"
        return (f"distrain: warning: {self.name} at {self.where}: {unsent} points not sent "
                f"and {closed}{why}; metrics.jsonl holds every epoch's row")


def warn(line: str) -> None:
    print(line, file=sys.stderr, flush=True)
