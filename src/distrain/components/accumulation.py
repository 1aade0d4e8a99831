"""Gradient accumulation: the global batch in flight, micro-batch by micro-batch.

Each micro-batch's loss is weighted by its share of the global batch (its real samples over
the global batch's), so a step's gradient is the exact mean over the global batch whatever
the layout, short last batch included. The window also holds the protocol a loop must keep
(one backward per micro-batch, a step after the global batch's last one and not before) and
says what went wrong, and how to fix it, when a loop breaks it.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

from distrain.errors import MisuseError

STEP_WHEN = ("`if eng.step_due:` (or `(i + 1) % accum == 0 or i + 1 == len(loader)`), or "
             "drop that global batch with eng.skip_step()")


@dataclass
class Micro:
    """The micro-batch the loader handed out last."""

    count: int  # real samples in it (0: a placeholder that keeps this rank in the allreduce)
    size: int  # samples in its whole global batch
    last: bool  # the last micro-batch of its global batch: the gradients sync on it
    backward_done: bool = False


class Window:
    """The global batch in flight on this rank."""

    def __init__(self) -> None:
        self.micro: Micro | None = None
        self.backwards = 0  # in the current global batch

    @property
    def step_due(self) -> bool:
        return self.micro is not None and self.micro.last

    def begin(self, count: int, size: int, last: bool) -> Micro:
        """The next micro-batch; MisuseError if the last one ended its global batch and no
        step followed (its gradients would leak into the next step)."""
        if self.step_due and self.micro.backward_done:
            raise MisuseError(
                "Engine.backward: the last micro-batch of a global batch had its backward but "
                "no eng.step followed, so its gradients would leak into the next step; an "
                "epoch's last global batch may be short (fewer than accum micro-batches): "
                f"step {STEP_WHEN}; accumulating yourself? pass Engine(accum=N) instead, the "
                "engine then weights and syncs each micro-batch")
        self.micro = Micro(count, size, last)
        return self.micro

    def share(self, loss_factor: int) -> float:
        """What this micro-batch's mean loss is multiplied by (see Backend.loss_factor)."""
        micro = self.micro
        if micro is None:
            raise MisuseError("Engine.backward: no micro-batch in flight; take the batches "
                              "from Engine.loader(...) (it tells each batch's share of the "
                              "global batch), and call backward once per batch")
        if micro.backward_done:
            raise MisuseError("Engine.backward: called twice for one micro-batch; add the "
                              "losses and call it once")
        # Each rank's loss × its samples / the global batch's: the synced sum (or mean × world
        # where the sync averages) is then the exact mean over the global batch.
        return micro.count * loss_factor / micro.size

    def backward_ran(self) -> None:
        """The micro-batch's backward returned (not before: one that raised may be retried)."""
        self.micro.backward_done = True
        self.backwards += 1

    def check_step(self, accum: int, who: str = "Engine.step") -> None:
        """MisuseError unless the global batch is complete: every micro-batch had its
        backward, the last one included."""
        micro = self.micro
        if micro is None or not micro.backward_done:
            raise MisuseError(f"{who}: " + (
                "no backward since the last step" if micro is None or not self.backwards else
                "the micro-batch in flight had no backward (earlier ones of its global batch "
                "did)") + "; call Engine.backward(loss) on each micro-batch, then step")
        if not micro.last:
            raise MisuseError(
                f"{who}: called before the last micro-batch of the global batch "
                f"(accum={accum}); step {STEP_WHEN}, as the short last batch of an epoch has "
                "fewer micro-batches")

    def check_between_steps(self, who: str) -> None:
        """MisuseError inside a global batch (micro-batches taken, no step yet)."""
        if self.micro is not None and self.step_due and self.micro.backward_done:
            raise MisuseError(f"{who}: the global batch in flight is complete (its last "
                              f"micro-batch had its backward) but was never stepped (e.g. "
                              f"an epoch's short last global batch, which has fewer "
                              f"micro-batches than accum); step {STEP_WHEN}")
        if self.micro is not None:
            raise MisuseError(f"{who}: inside a global batch (micro-batches taken, no eng.step "
                              "yet); save after a step, e.g. when eng.global_step % N == 0 "
                              "right after eng.step")

    def warn_unstepped(self, rank: int) -> None:
        """At the end of a run: say so if the last global batch was never stepped."""
        if self.step_due and self.micro.backward_done:
            print(f"distrain: warning: rank {rank}: the run's last global batch had its "
                  f"backward but no eng.step (its gradients were dropped); step {STEP_WHEN}",
                  file=sys.stderr, flush=True)

    def end(self) -> None:
        """The step was taken: no global batch in flight."""
        self.micro, self.backwards = None, 0
