"""The config trainer's own state: epochs completed, the position in the current epoch, the
step function's log names and the consecutive skipped steps. Registered with the engine's
checkpointer (its keys sit at the top of a checkpoint, as distrain 0.1 wrote them) and
committed by Horovod elastic beside the other parts."""

from __future__ import annotations

from distrain.components.checkpoint.files import EPOCH, STEP_IN_EPOCH
from distrain.components.data.loader import TrainLoader
from distrain.trainer.sums import EpochSums

LOG_NAMES = "log_names"  # checkpoint key: the names of the step function's logs
BAD_STEPS = "bad_steps"  # checkpoint key: consecutive skipped steps so far


class Progress:
    """How far the run is; the position inside an epoch is the loader's (steps done)."""

    def __init__(self, loader: TrainLoader, sums: EpochSums) -> None:
        self.loader, self.sums = loader, sums
        self.epoch = 0  # epochs completed
        self.bad_steps = 0  # consecutive skipped steps

    @property
    def step_in_epoch(self) -> int:
        """Optimizer steps of the current epoch already taken (> 0: saved mid-epoch)."""
        return self.loader.steps_done

    @step_in_epoch.setter
    def step_in_epoch(self, value: int) -> None:
        self.loader.steps_done = value

    def state_dict(self) -> dict:
        return {EPOCH: self.epoch, STEP_IN_EPOCH: self.step_in_epoch,
                LOG_NAMES: list(self.sums.names), BAD_STEPS: self.bad_steps}

    def load_state_dict(self, state: dict) -> None:
        self.epoch = state[EPOCH]
        self.step_in_epoch = state.get(STEP_IN_EPOCH, 0)
        self.sums.names = list(state.get(LOG_NAMES, []))
        self.bad_steps = state.get(BAD_STEPS, 0)
