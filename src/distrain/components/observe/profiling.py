"""logging.profile: torch.profiler over optimizer steps, on the ranks listed.

Each profiled rank writes <out_dir>/profile/rank<r>.<time>.pt.trace.json per recorded cycle
(TensorBoard's profiler plugin, chrome://tracing and https://ui.perfetto.dev open it) and
prints its top operators when the run ends. Off (logging.profile.active=0, or a rank not
listed), no profiler exists: the loop's only cost is one `is None` check per step.
"""

from __future__ import annotations

from pathlib import Path

import torch

from distrain.components.observe.runfiles import PROFILE_DIR
from distrain.config import ProfileConfig

TOP_OPERATORS = 10


class StepProfiler:
    def __init__(self, cfg: ProfileConfig, rank: int, out_dir: str | Path, cuda: bool) -> None:
        from torch.profiler import ProfilerActivity, profile, schedule, tensorboard_trace_handler

        self.rank, self.cuda = rank, cuda
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        self.prof = profile(
            activities=activities,
            schedule=schedule(wait=cfg.wait, warmup=cfg.warmup, active=cfg.active,
                              repeat=cfg.repeat),
            on_trace_ready=tensorboard_trace_handler(str(Path(out_dir) / PROFILE_DIR),
                                                     worker_name=f"rank{rank}"))
        self.prof.start()
        self.stopped = False

    @classmethod
    def for_rank(cls, cfg: ProfileConfig, rank: int, out_dir: str | Path,
                 device: torch.device) -> StepProfiler | None:
        """A started profiler when this rank profiles, else None."""
        if not cfg.active or rank not in cfg.ranks:
            return None
        return cls(cfg, rank, out_dir, device.type == "cuda")

    def step(self) -> None:
        """After every optimizer step: advances the schedule."""
        self.prof.step()

    def stop(self, print_table: bool = True) -> None:
        """Stop (a cycle cut short is written as it stands) and print the top operators."""
        if self.stopped:
            return
        self.stopped = True
        self.prof.stop()
        if not print_table:
            return
        events = self.prof.key_averages()
        if not len(events):  # the run ended before the first active step
            return
        sort_by = "self_cuda_time_total" if self.cuda else "self_cpu_time_total"
        print(f"distrain: profile of rank {self.rank} (traces in {PROFILE_DIR}/), top operators "
              f"by {sort_by}:\n{events.table(sort_by=sort_by, row_limit=TOP_OPERATORS)}",
              flush=True)
