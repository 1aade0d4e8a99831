"""The exponential moving average of a model's weights (train.ema_decay).

torch's `AveragedModel` keeps the state (and so the checkpoint format: the averaged module
plus an `n_averaged` counter); this subclass only replaces its update, which reads its
counter twice and copies it to the device every step: on a GPU each of those makes the host
wait for all the queued work. Here the counter stays on the host and the update is
sync-free: copy on the first update, then one foreach lerp, as torch's EMA does.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn


class EMA(AveragedModel):
    """ema = decay · ema + (1 − decay) · weights, over parameters and buffers alike."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        # device=None keeps n_averaged on the CPU, while the averaged copy sits beside `model`.
        super().__init__(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)
        self.decay = decay

    @torch.no_grad()
    def update_parameters(self, model: nn.Module) -> None:
        mine = [*self.module.parameters(), *self.module.buffers()]
        theirs = [t.detach() for t in (*model.parameters(), *model.buffers())]
        if int(self.n_averaged) == 0:  # a host tensor: no device sync
            torch._foreach_copy_(mine, theirs)
        else:
            floats = [i for i, a in enumerate(mine) if a.is_floating_point()]
            if floats:
                torch._foreach_lerp_([mine[i] for i in floats], [theirs[i] for i in floats],
                                     1 - self.decay)
            for a, b in zip(mine, theirs):
                if not a.is_floating_point():  # e.g. BatchNorm's batch count, as torch rounds it
                    a.copy_(a * self.decay + b * (1 - self.decay))
        self.n_averaged += 1
