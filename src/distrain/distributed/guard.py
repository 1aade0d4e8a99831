"""dist.debug: a collective inside a rank-0-only region raises instead of hanging.

Rank 0 alone runs some code (rank-0 validation, checkpoint writes, decisions). A collective
issued there (a metric averaged with `dist.all_reduce`, a SyncBatchNorm forward) waits for
ranks that never join: the classic validation hang. In debug mode the public collectives
of `torch.distributed` and `horovod.torch` are wrapped; inside a region they raise
`CollectiveInMainOnlyRegion` naming the call and the region. Outside debug mode nothing is
wrapped (the watchdog still turns such a hang into an error after dist.timeout_s).
"""

from __future__ import annotations

import contextlib
import functools
import threading
from typing import Iterator

from distrain.errors import CollectiveInMainOnlyRegion

TORCH_COLLECTIVES = ("all_reduce", "broadcast", "all_gather", "all_gather_into_tensor",
                     "all_gather_object", "broadcast_object_list", "reduce", "reduce_scatter",
                     "reduce_scatter_tensor", "gather", "gather_object", "scatter",
                     "scatter_object_list", "all_to_all", "all_to_all_single", "barrier",
                     "monitored_barrier")
HOROVOD_COLLECTIVES = ("allreduce", "allreduce_", "allreduce_async", "allreduce_async_",
                       "grouped_allreduce", "grouped_allreduce_", "allgather", "allgather_async",
                       "allgather_object", "broadcast", "broadcast_", "broadcast_async",
                       "broadcast_async_", "broadcast_object", "alltoall", "reducescatter",
                       "barrier", "join", "broadcast_parameters", "broadcast_optimizer_state")


class MainOnlyGuard:
    def __init__(self) -> None:
        self._local = threading.local()
        self.installed: list[tuple[object, str, object]] = []

    @property
    def region(self) -> str | None:
        return getattr(self._local, "region", None)

    @contextlib.contextmanager
    def main_only(self, region: str) -> Iterator[None]:
        outer, self._local.region = self.region, region
        try:
            yield
        finally:
            self._local.region = outer

    def install(self) -> None:
        import torch.distributed as dist

        self._wrap(dist, "torch.distributed", TORCH_COLLECTIVES)
        try:
            import horovod.torch as hvd
        except ImportError:
            return
        self._wrap(hvd, "horovod.torch", HOROVOD_COLLECTIVES)

    def uninstall(self) -> None:
        for module, name, original in reversed(self.installed):
            setattr(module, name, original)
        self.installed.clear()

    def _wrap(self, module, prefix: str, names: tuple[str, ...]) -> None:
        for name in names:
            original = getattr(module, name, None)
            if original is None:
                continue
            setattr(module, name, self._guarded(original, f"{prefix}.{name}"))
            self.installed.append((module, name, original))

    def _guarded(self, fn, qualname: str):
        @functools.wraps(fn)
        def guarded(*args, **kwargs):
            region = self.region
            if region is not None:
                raise CollectiveInMainOnlyRegion(
                    f"dist.debug: {qualname}() was called inside a rank-0-only region "
                    f"({region}); the other ranks never call it there, so it would hang. "
                    "Move the collective out of that code (validation runs on the unwrapped "
                    "model, on rank 0 alone), or use validate.mode=sharded.")
            return fn(*args, **kwargs)
        return guarded
