"""The run's decisions: is this the best result so far, and should training stop.

Rank 0 decides from the agreed metric and broadcasts the decision, so no rank can
disagree even if a user metric were not bit-identical everywhere.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass
class Decision:
    improved: bool
    stop: bool


class Tracker:
    def __init__(self, monitor: str, mode: str, patience: int) -> None:
        self.monitor = monitor
        self.mode = mode
        self.patience = patience
        self.best = math.inf if mode == "min" else -math.inf
        self.best_epoch = -1
        self.bad_evals = 0

    def decide(self, metrics: dict[str, float], epoch: int) -> Decision:
        value = metrics[self.monitor]
        better = value < self.best if self.mode == "min" else value > self.best
        if better:
            self.best, self.best_epoch, self.bad_evals = value, epoch, 0
        else:
            self.bad_evals += 1
        stop = self.patience > 0 and self.bad_evals >= self.patience
        return Decision(improved=better, stop=stop)

    def state_dict(self) -> dict:
        return {"best": self.best, "best_epoch": self.best_epoch, "bad_evals": self.bad_evals}

    def load_state_dict(self, state: dict) -> None:
        self.best = state["best"]
        self.best_epoch = state["best_epoch"]
        self.bad_evals = state["bad_evals"]
