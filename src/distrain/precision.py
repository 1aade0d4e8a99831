"""One owner for mixed precision: autocast, the GradScaler and the order of the update.

    scale → backward (× accumulation) → sync → unscale → clip → step → update

fp16 scales the loss (a GradScaler, on CPU as on CUDA); bf16 autocasts without a
scaler; fp32 does neither. `step()` says whether the optimizer step was taken: an
fp16 overflow skips it, and so do non-finite gradients under fp32/bf16; the caller then
leaves the LR schedule where it was.
"""

from __future__ import annotations

import contextlib
import time
from typing import ContextManager

import torch
from torch import nn

from .backends import Backend

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


class NonFiniteError(RuntimeError):
    """Too many consecutive optimizer steps had non-finite gradients."""


def grads_finite(params: list[torch.Tensor]) -> bool:
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return True
    return bool(torch.isfinite(torch.stack(torch._foreach_norm(grads))).all())


class Precision:
    def __init__(self, mode: str, device: torch.device, check_finite: bool = True) -> None:
        self.mode = mode
        self.check_finite = check_finite  # fp32/bf16: skip steps with NaN/inf gradients
        self.device_type = device.type
        self.scaler = torch.amp.GradScaler(device.type) if mode == "fp16" else None
        self.skipped_steps = 0
        self.sync_wait_s = 0.0  # time spent waiting for the gradient allreduce in step()
        self._model: nn.Module | None = None
        self._param_list: list[torch.Tensor] = []

    def autocast(self) -> ContextManager:
        if self.mode == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=DTYPES[self.mode])

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler else loss).backward()

    def step(self, optimizer: torch.optim.Optimizer, model: nn.Module, backend: Backend,
             clip_grad_norm: float = 0.0, clip_grad_value: float = 0.0) -> bool:
        """Sync, unscale, clip, step and update; True when the optimizer step was taken."""
        waited = time.perf_counter()
        backend.synchronize(optimizer)  # Horovod: finish the allreduce before touching gradients
        self.sync_wait_s += time.perf_counter() - waited
        if self.scaler is not None:
            self.scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
        params = self._params(model)
        finite = None  # known for free when clipping by norm
        if clip_grad_value > 0:
            nn.utils.clip_grad_value_(params, clip_grad_value)
        if clip_grad_norm > 0:
            finite = bool(torch.isfinite(nn.utils.clip_grad_norm_(params, clip_grad_norm)))
        with backend.skip_synchronize(optimizer):  # Horovod: the gradients are already reduced
            if self.scaler is None:
                # The allreduce spread any rank's NaN/inf into every rank's gradients, so every
                # rank takes the same decision here without another collective.
                if finite is None:
                    finite = grads_finite(params) if self.check_finite else True
                if not finite:
                    self.skipped_steps += 1
                    return False
                optimizer.step()
                return True
            scale = self.scaler.get_scale()
            self.scaler.step(optimizer)
            self.scaler.update()
        # The scaler lowers its scale exactly when it found inf/NaN and skipped the step;
        # every rank sees the same reduced gradients, so every rank decides alike.
        taken = self.scaler.get_scale() >= scale
        self.skipped_steps += not taken
        return taken

    def _params(self, model: nn.Module) -> list[torch.Tensor]:
        if self._model is not model:  # iterating model.parameters() per step costs ~50 µs
            self._model, self._param_list = model, list(model.parameters())
        return self._param_list

    @property
    def scale(self) -> float:
        """The loss scale (1.0 without a scaler)."""
        return self.scaler.get_scale() if self.scaler is not None else 1.0

    def state_dict(self) -> dict:
        return {"mode": self.mode, "skipped_steps": self.skipped_steps,
                "scaler": self.scaler.state_dict() if self.scaler else None}

    def load_state_dict(self, state: dict) -> None:
        self.skipped_steps = state.get("skipped_steps", 0)
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
