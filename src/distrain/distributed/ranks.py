"""The ranks of a run as a user's loop sees them: who am I, and the collectives it may call.

`distrain.Engine` is a `Ranks`. Every method here but the rank vocabulary and `open` is a
collective: every rank calls it at the same point, never under `if eng.is_main`.
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path
from typing import IO, Any, Iterator

import torch

from distrain.distributed.backend import Backend


class Ranks:
    backend: Backend

    # ------------------------------------------------------------------ who am I
    @property
    def rank(self) -> int:
        return self.backend.rank

    @property
    def local_rank(self) -> int:
        """This process's rank on its node (its GPU's index under CUDA)."""
        return self.backend.local_rank

    @property
    def world_size(self) -> int:
        return self.backend.world_size

    @property
    def is_main(self) -> bool:
        """Global rank 0: writes files and makes the run's decisions."""
        return self.backend.is_main

    @property
    def device(self) -> torch.device:
        """This rank's device (its local GPU under CUDA, else the CPU)."""
        return self.backend.device

    # ------------------------------------------------------------------ collectives
    def broadcast(self, obj: Any) -> Any:
        """Rank 0's `obj` on every rank (a decision made once)."""
        return self.backend.broadcast_object(obj)

    def barrier(self) -> None:
        self.backend.barrier()

    def all_reduce(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """`tensor` reduced over every rank (sum, mean, max or min), in place; returns it."""
        return self.backend.all_reduce(tensor, op=op)

    def all_gather(self, obj: Any) -> list:
        """Every rank's `obj` (a tensor, a number, any picklable value), by rank; tensors come
        back on this rank's device."""
        gathered = self.backend.all_gather_object(
            obj.detach().cpu() if isinstance(obj, torch.Tensor) else obj)
        return [g.to(self.device) if isinstance(g, torch.Tensor) else g for g in gathered]

    def any(self, flag: bool) -> bool:
        """True on every rank if any rank's `flag` is (one tiny allreduce)."""
        return bool(self.all_reduce(torch.tensor([float(bool(flag))], device=self.device),
                                    op="max").item())

    @contextlib.contextmanager
    def main_process_first(self) -> Iterator[None]:
        """Rank 0 runs the block first (a download, a cache to build), the others after it
        (reading what it made); every rank enters it."""
        if not self.is_main:
            self.barrier()
        try:
            yield
        finally:
            if self.is_main:
                self.barrier()

    @contextlib.contextmanager
    def open(self, path: str | Path, mode: str = "a", **kwargs: Any) -> Iterator[IO]:
        """`open(path, mode)` on rank 0; on the other ranks a file that discards what is
        written. Not a collective: a results file gets each row once, whoever writes it."""
        if not self.is_main:
            yield io.StringIO() if "b" not in mode else io.BytesIO()
            return
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        with open(path, mode, **kwargs) as f:
            yield f
