"""What a user reads: rank 0 prints and writes; the other ranks print only warnings and errors."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from typing import Any

from tqdm import tqdm

from distrain.components.observe.experiment import (
    FAILED,
    FINISHED,
    build_trackers,
    require_packages,
    scalars,
)
from distrain.components.observe.sender import Sender, warn
from distrain.components.observe.runfiles import (
    CONFIG_FILE,
    METRICS_FILE,
    PLOT_FILE,
    TENSORBOARD_DIR,
)
from distrain.config import Config, dump_yaml
from distrain.errors import ConfigError


def _fmt(value: float) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


class RunLog:
    def __init__(self, cfg: Config, is_main: bool, system: dict | None = None) -> None:
        self.is_main = is_main
        self.system = system or {}  # versions, backend, world size: the trackers' tags
        self.out_dir = Path(cfg.run.out_dir)
        self.monitor = cfg.checkpoint.monitor
        self.bar: tqdm | None = None
        self.plot = cfg.logging.plot
        self.tensorboard = cfg.logging.tensorboard
        self.writer: Any = None  # TensorBoard's SummaryWriter, made at the first record
        # Checked on every rank, so all of them stop alike before any collective.
        if self.tensorboard and importlib.util.find_spec("tensorboard") is None:
            raise ConfigError("logging.tensorboard: expected false without the tensorboard "
                              "package, got true; pip install tensorboard (or "
                              "'distrain[tensorboard]')")
        require_packages(cfg)  # MLflow, W&B: also on every rank
        self.trackers: list[Sender] = []  # rank 0's, started by start_trackers
        self.resumed = False  # set by truncate_metrics: the trackers reopen their runs
        self.log_checkpoint = cfg.logging.log_best_checkpoint

    def write_config(self, cfg: Config) -> None:
        """The resolved config beside the run (after every part was built without error)."""
        if self.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            (self.out_dir / CONFIG_FILE).write_text(dump_yaml(cfg))

    def start_trackers(self, cfg: Config) -> str | None:
        """logging.mlflow_uri, logging.wandb: open the runs (rank 0; after a resume, the same
        runs as before), each behind a Sender. One that cannot be reached is said in one line
        and left off; with logging.tracker_unreachable=stop the line is returned instead (the
        caller stops every rank with it)."""
        if not self.is_main:
            return None
        timeout = cfg.logging.tracker_timeout_s
        for tracker in build_trackers(cfg):
            sender = Sender(tracker, tracker.name, tracker.where, timeout, timeout)
            problem = sender.start(cfg, self.system, self.resumed)
            if problem is None:
                self.trackers.append(sender)
                continue
            line = (f"{tracker.name} at {tracker.where} cannot be reached ({problem})")
            if cfg.logging.tracker_unreachable == "stop":
                self.close(FAILED)  # the runs already open end as failed
                return (f"logging.tracker_unreachable: {line}; start the server, or pass "
                        "logging.tracker_unreachable=warn to train without it")
            warn(f"distrain: warning: {line}; training on without it (metrics.jsonl holds "
                 "every row; logging.tracker_unreachable=stop stops instead)")
        return None

    def info(self, message: str) -> None:
        if self.is_main:
            print(message, flush=True)

    def truncate_metrics(self, global_step: int, epochs_done: int | None = None) -> None:
        """On resume keep only the rows the checkpoint contains, so the file stays one curve.
        `epochs_done`: an epoch's row (an int epoch; a mid-epoch validation's is a fraction)
        is kept only if the checkpoint completed that epoch: a checkpoint saved at an epoch's
        last step but before its end (a preemption) has the row's step, and the resumed run
        ends the epoch and writes the row again."""
        self.resumed = True
        path = self.out_dir / METRICS_FILE
        if not self.is_main or not path.exists():
            return

        def kept_row(row: dict) -> bool:
            ended_later = (epochs_done is not None and isinstance(row["epoch"], int)
                           and row["epoch"] > epochs_done)
            return row["step"] <= global_step and not ended_later

        kept = [line for line in path.read_text().splitlines()
                if line.strip() and kept_row(json.loads(line))]
        path.write_text("".join(line + "\n" for line in kept))

    def start_fresh(self, checkpoints_removed: int) -> None:
        """A fresh start in a folder an earlier run used (checkpoint.resume=none, or auto
        without a checkpoint to resume): its checkpoints are gone, its curve goes too."""
        path = self.out_dir / METRICS_FILE
        had_rows = path.exists() and path.stat().st_size > 0
        path.unlink(missing_ok=True)
        if checkpoints_removed or had_rows:
            print(f"distrain: warning: starting afresh in {self.out_dir}: removed the earlier "
                  f"run's {checkpoints_removed} step checkpoints"
                  + (f" and {METRICS_FILE}" if had_rows else ""), flush=True)

    # -- per epoch
    def start_epoch(self, epoch: int, epochs: int, steps: int, done: int = 0) -> None:
        if self.is_main:
            # disable=None: a bar on a terminal, nothing in a log file.
            self.bar = tqdm(total=steps, initial=done, desc=f"epoch {epoch}/{epochs}",
                            leave=False, disable=None, dynamic_ncols=True, file=sys.stderr)

    def progress(self, steps_done: int, loss: float, lr: float, samples_per_s: float,
                 step: int = 0) -> None:
        """The bar's numbers; the trackers get them at optimizer step `step` as step/*."""
        for tracker in self.trackers:
            tracker.log_step(step, {"step/loss": loss, "step/lr": lr,
                                    "step/samples_per_s": samples_per_s})
        if self.bar is not None:
            self.bar.set_postfix_str(f"loss {loss:.4f} lr {lr:.3g} {samples_per_s:.0f} samples/s",
                                     refresh=False)
            self.bar.update(steps_done - self.bar.n)

    def end_epoch(self, record: dict, improved: bool) -> None:
        if not self.is_main:
            return
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        with open(self.out_dir / METRICS_FILE, "a") as f:
            f.write(json.dumps(record) + "\n")
        self._scalars(record)
        for tracker in self.trackers:
            tracker.log_row(record)
        mark = " *" if improved else ""
        print(f"epoch {record['epoch']:>3} | " + self._parts(record)
              + f" | {record['samples_per_s']:.0f} samples/s | {record['epoch_time_s']:.1f} s{mark}",
              flush=True)

    def eval_line(self, record: dict, improved: bool) -> None:
        """A validation inside an epoch (validate.every_steps)."""
        if not self.is_main:
            return
        with open(self.out_dir / METRICS_FILE, "a") as f:
            f.write(json.dumps(record) + "\n")
        self._scalars(record)
        for tracker in self.trackers:
            tracker.log_row(record)
        line = f"  eval @ epoch {record['epoch']:.2f} step {record['step']} | " + \
            self._parts(record) + (" *" if improved else "")
        if self.bar is not None:
            self.bar.write(line)
        else:
            print(line, flush=True)

    def _scalars(self, record: dict) -> None:
        """logging.tensorboard: every number of the row at its optimizer step, under the
        same name as in metrics.jsonl (a list such as val_recall as val_recall/<class>)."""
        if not self.tensorboard:
            return
        if self.writer is None:
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(str(self.out_dir / TENSORBOARD_DIR))
        step = int(record["step"])
        for tag, value in scalars(record).items():
            self.writer.add_scalar(tag, value, step)
        self.writer.flush()  # one row per validation: cheap, and nothing lost if killed

    def write_plot(self) -> None:
        """logging.plot: <out_dir>/curves.png from metrics.jsonl at the end of the run (rank 0).
        A failure to draw is a warning: the trained run stands."""
        if not (self.is_main and self.plot and (self.out_dir / METRICS_FILE).exists()):
            return
        from distrain.components.observe.plot import plot_runs  # matplotlib: only when drawing
        try:
            plot_runs([self.out_dir], self.out_dir / PLOT_FILE)
        except Exception as exc:  # matplotlib missing or failing must not fail the run
            print(f"distrain: warning: could not draw {self.out_dir / PLOT_FILE}: {exc}",
                  file=sys.stderr, flush=True)

    def close(self, status: str = FINISHED) -> None:
        """Flush and close TensorBoard's event file; the trackers upload the run's files and
        end their runs with `status` (FINISHED, FAILED, KILLED). Safe to call twice, and on
        every rank; a tracker failing here is a warning, not the run's error."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        trackers, self.trackers = self.trackers, []
        for sender in trackers:  # each gets logging.tracker_timeout_s to send what it holds
            line = sender.finish(status, self.log_checkpoint)
            if line:  # the server gone must not hide how the run ended: a warning
                warn(line)
        if self.writer is not None:
            self.writer.close()
            self.writer = None

    @staticmethod
    def _parts(record: dict) -> str:
        keys = ["train_loss", "train_acc", "val_loss", "val_acc", "val_balanced_acc",
                "val_macro_f1", "val_ema_acc", "lr"]
        return " | ".join(f"{k} {_fmt(record[k])}" for k in keys if k in record)

