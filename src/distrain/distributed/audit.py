"""dist.audit_every_steps: the ranks compare what must be equal on all of them.

Every rank takes the same steps with the same reduced gradients, so step, epoch, LR, the
loss scale and the weights are identical everywhere; a difference means a bug (a rank-local
LR change, a skipped step on one rank, a non-deterministic kernel, a corrupted broadcast).
One allreduce (MAX over [v, -v]) finds any difference; only then are the values gathered
to name what diverged and each rank's value.
"""

from __future__ import annotations

import torch

from distrain.distributed import Backend
from distrain.errors import DivergenceError


def audit(backend: Backend, fingerprint: dict[str, float], step: int,
          key: str = "dist.audit_every_steps") -> None:
    """Raise DivergenceError on every rank if any entry differs across ranks (`key`: who
    asked, named in the error)."""
    values = torch.tensor(list(fingerprint.values()), dtype=torch.float64, device=backend.device)
    values = torch.nan_to_num(values, nan=float("inf"))  # NaN != NaN would look like divergence
    both = backend.all_reduce(torch.cat([values, -values]), op="max")  # Distribution
    high, low = both[:len(values)], -both[len(values):]
    if bool((high == low).all()):
        return
    ranks = backend.all_gather_object(fingerprint)  # every rank saw the mismatch: all gather
    diverged = [name for name, same in zip(fingerprint, (high == low).tolist()) if not same]
    detail = "; ".join(f"{name}: " + ", ".join(f"rank {r} {row[name]!r}" for r, row in
                                                enumerate(ranks)) for name in diverged)
    raise DivergenceError(f"{key}: the ranks diverged at step {step}: {detail}")


def audit_replicas(backend: Backend, step: int, same: dict[str, float], loss_scale: float,
                   model=None, key: str = "dist.audit_every_steps") -> None:
    """`audit` of what every replica must share: the step, `same` (the LR, ...), the loss
    scale and, where the weights are replicated, their checksum."""
    fingerprint = {"step": step, **same, "loss scale": loss_scale}
    checksum = backend.replica_checksum(model) if model is not None else None
    if checksum is not None:
        fingerprint["parameter checksum"] = checksum
    audit(backend, fingerprint, step, key)
