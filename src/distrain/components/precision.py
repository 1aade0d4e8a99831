"""One owner for mixed precision: autocast, the GradScaler and the order of the update.

    scale → backward (× accumulation) → sync → unscale → clip → step → update

fp16 scales the loss (a GradScaler, on CPU as on CUDA); bf16 autocasts without a
scaler; fp32 does neither. An fp16 overflow skips the optimizer step, and so do non-finite
gradients under fp32/bf16; the caller then leaves the LR schedule and the EMA where they were.

Whether a step was taken is known on the device first. Reading it at once would make the
host wait for backward every step, and the optimizer's and the next forward's launches
would no longer hide behind the GPU's work. So with an optimizer that honours PyTorch's
`found_inf` protocol (fused Adam/AdamW, as GradScaler uses it) the skip happens on the
device, under any precision, and the `StepOutcome` that `step()` returns reads the flag only
when asked, one step later, when the next step's work is already queued.
"""

from __future__ import annotations

import contextlib
import time
from typing import ContextManager

import torch
from torch import nn

from distrain.distributed import Backend

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def nonfinite_flag(params: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """1.0 on the device when any gradient element is NaN/inf, else 0.0; no host sync."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros((), device=device)
    return torch.stack(torch._foreach_norm(grads)).isfinite().all().logical_not().float()


def replicated(flag: torch.Tensor) -> torch.Tensor:
    """A flag computed over sharded gradients (FSDP: a replicated DTensor, already reduced
    over the ranks) as a plain tensor; plain tensors pass through."""
    to_local = getattr(flag, "to_local", None)  # a DTensor's
    return to_local() if to_local is not None else flag


def defers_skip(optimizer: torch.optim.Optimizer) -> bool:
    """True when `optimizer.step()` skips itself on the device given `optimizer.found_inf`
    (PyTorch sets this flag on its fused optimizers for GradScaler)."""
    return bool(getattr(optimizer, "_step_supports_amp_scaling", False))


class DeviceFlag:
    """A 0-dim device tensor copied to the host without waiting; `read()` waits for it only."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.host = torch.zeros((), pin_memory=self.cuda)  # pinned: the copy is asynchronous
        self.event = torch.cuda.Event() if self.cuda else None
        self.pending = False

    def put(self, flag: torch.Tensor) -> None:
        assert not self.pending, "read the previous step's flag before the next step"
        self.host.copy_(flag, non_blocking=True)
        if self.event is not None:
            self.event.record()
        self.pending = True

    def discard(self) -> None:
        self.pending = False

    def read(self) -> float | None:
        if not self.pending:
            return None
        if self.event is not None:
            self.event.synchronize()  # the flag's copy only, not the work queued after it
        self.pending = False
        return float(self.host)


class StepOutcome:
    """Whether one optimizer step was taken: `decided` when known on the host at once; else
    the device decided (a fused optimizer skipped the step by itself) and the first
    `taken()` reads its flag, waiting for that step only, and counts a skip once."""

    def __init__(self, precision: Precision, taken: bool | None) -> None:
        self._precision, self._taken = precision, taken

    @property
    def decided(self) -> bool:
        return self._taken is not None

    def taken(self) -> bool:
        if self._taken is None:
            nonfinite = self._precision.flag.read()  # None: discarded (an elastic rollback)
            self._taken = not nonfinite
            self._precision.skipped_steps += bool(nonfinite)
        return self._taken


class Precision:
    def __init__(self, mode: str, device: torch.device, check_finite: bool = True) -> None:
        self.mode = mode
        self.check_finite = check_finite  # fp32/bf16: skip steps with NaN/inf gradients
        self.device_type = device.type
        self.scaler = torch.amp.GradScaler(device.type) if mode == "fp16" else None
        self.device = device
        self.flag = DeviceFlag(device)  # a skip decided on the device, read one step later
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
             clip_grad_norm: float = 0.0, clip_grad_value: float = 0.0) -> StepOutcome:
        """Sync, unscale, clip, step and update; whether the step was taken (or skipped for
        NaN/inf gradients on every rank alike)."""
        return StepOutcome(self, self._step(optimizer, model, backend, clip_grad_norm,
                                            clip_grad_value))

    def _step(self, optimizer: torch.optim.Optimizer, model: nn.Module, backend: Backend,
              clip_grad_norm: float, clip_grad_value: float) -> bool | None:
        waited = time.perf_counter()
        backend.synchronize(optimizer)  # Horovod: finish the allreduce before touching gradients
        self.sync_wait_s += time.perf_counter() - waited
        if self.scaler is not None:
            self.scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
        params = self._params(model)
        nonfinite = None  # known for free when clipping by norm
        if clip_grad_value > 0:
            nn.utils.clip_grad_value_(params, clip_grad_value)
        if clip_grad_norm > 0:
            # Sharded gradients (FSDP): torch reduces the norm over the ranks: the global norm.
            norm = replicated(nn.utils.clip_grad_norm_(params, clip_grad_norm))
            nonfinite = norm.isfinite().logical_not().float()
        with backend.skip_synchronize(optimizer):  # Horovod: the gradients are already reduced
            if self.scaler is None and not self.check_finite:
                optimizer.step()
                return True
            defer = defers_skip(optimizer)
            if nonfinite is None and (defer or self.scaler is None):
                # The allreduce spread any rank's NaN/inf into every rank's gradients, so every
                # rank takes the same decision here without another collective (FSDP's shards:
                # the norms are reduced over the ranks, the same decision again).
                nonfinite = replicated(nonfinite_flag(params, self.device))
            if defer:
                if self.scaler is not None:
                    # GradScaler hands a fused optimizer its own found_inf and updates its scale
                    # on the device; ours is the same test on the unscaled gradients (unscaling
                    # keeps inf/NaN, and cannot overflow while the scale is >= 1).
                    self.scaler.step(optimizer)
                    self.scaler.update()
                else:
                    optimizer.found_inf = nonfinite  # the fused kernel skips and un-counts it
                    optimizer.step()
                    del optimizer.found_inf  # as GradScaler leaves it
                self.flag.put(nonfinite)
                return None
            if self.scaler is None:
                if bool(nonfinite):
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
        if self._model is not model:  # not a walk over model.parameters() every step
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
