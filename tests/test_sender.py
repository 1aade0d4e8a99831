"""The background sender behind every tracker (components/observe/sender.py), with a
stand-in tracker whose server can be up or down: it never holds training up."""

from __future__ import annotations

import threading
import time

import pytest

from distrain.components.observe.sender import Sender

pytestmark = pytest.mark.quick


class Tracker:
    name, where = "Fake", "nowhere"

    def __init__(self, up: bool = True, start_s: float = 0.0) -> None:
        self.up, self.start_s, self.got, self.calls, self.finished = up, start_s, [], 0, None

    def start(self, *args) -> None:
        time.sleep(self.start_s)
        if not self.up:
            raise ConnectionError("[Errno 111] Connection refused")

    def log_row(self, record: dict) -> None:
        self.calls += 1
        if not self.up:
            raise ConnectionError("[Errno 111] Connection refused")
        self.got.append(record["step"])

    def log_step(self, step: int, values: dict) -> None:
        self.log_row({"step": step})

    def finish(self, status: str, checkpoint: bool) -> None:
        if not self.up:
            raise ConnectionError("down")
        self.finished = status


def test_a_start_returns_when_the_tracker_has_started_not_at_the_timeout():
    began = time.monotonic()
    assert Sender(Tracker(start_s=0.1), "Fake", "x", start_timeout_s=20).start() is None
    assert time.monotonic() - began < 5
    began = time.monotonic()  # refused: said at once
    assert "Connection refused" in Sender(Tracker(up=False), "Fake", "x", 20).start()
    assert time.monotonic() - began < 5
    late = Tracker(start_s=1)
    assert "no answer within 0.2 s" in Sender(late, "Fake", "x", 0.2).start()
    # The server answers after all: the run it opened is ended (FAILED), not left RUNNING.
    deadline = time.monotonic() + 10
    while late.finished is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert late.finished == "FAILED" and late.got == []


def test_a_server_away_costs_the_loop_nothing_and_gets_every_point_back():
    tracker = Tracker()
    sender = Sender(tracker, "Fake", "x", start_timeout_s=5, flush_timeout_s=10)
    assert sender.start() is None
    tracker.up = False
    began = time.monotonic()
    for step in range(200):
        sender.log_row({"step": step})
    assert time.monotonic() - began < 0.5  # queued, never sent from this thread
    time.sleep(1.5)
    assert tracker.calls < 10  # retried with a growing pause, not hammered
    tracker.up = True
    assert sender.finish("FINISHED", False) is None
    assert tracker.got == list(range(200)) and tracker.finished == "FINISHED"


def test_a_full_queue_drops_the_oldest_progress_points_never_a_row():
    tracker = Tracker()
    sender = Sender(tracker, "Fake", "x", 5, 10, max_queued=5)
    hold = threading.Event()
    real = tracker.log_row
    tracker.log_row = lambda record: (hold.wait(), real(record))
    assert sender.start() is None
    sender.log_row({"step": 0})  # the head, being sent while the queue fills
    time.sleep(0.2)
    for step in range(1, 4):
        sender.log_step(step, {})
    for step in range(4, 8):
        sender.log_row({"step": step})
    hold.set()
    line = sender.finish("FINISHED", False)
    assert tracker.got == [0, 4, 5, 6, 7]  # the progress points went, every row arrived
    assert "3 points not sent and closed the run" in line


def test_a_server_gone_at_the_end_is_one_line_and_no_hang():
    tracker = Tracker()
    sender = Sender(tracker, "Fake", "x", 5, flush_timeout_s=0.5)
    assert sender.start() is None
    tracker.up = False
    for step in range(3):
        sender.log_row({"step": step})
    began = time.monotonic()
    line = sender.finish("FAILED", False)
    assert time.monotonic() - began < 8
    assert line.startswith("distrain: warning: Fake at x: 3 points not sent and did not close "
                           "the run") and "Connection refused" in line
