"""What a user reads: rank 0 prints and writes; the other ranks print only warnings and errors."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from typing import Any

from tqdm import tqdm

from .config import Config, ConfigError, dump_yaml
from .runfiles import CONFIG_FILE, METRICS_FILE, PLOT_FILE, TENSORBOARD_DIR



def _fmt(value: float) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


class RunLog:
    def __init__(self, cfg: Config, is_main: bool) -> None:
        self.is_main = is_main
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

    def write_config(self, cfg: Config) -> None:
        """The resolved config beside the run (after every part was built without error)."""
        if self.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            (self.out_dir / CONFIG_FILE).write_text(dump_yaml(cfg))

    def info(self, message: str) -> None:
        if self.is_main:
            print(message, flush=True)

    def truncate_metrics(self, global_step: int, epochs_done: int | None = None) -> None:
        """On resume keep only the rows the checkpoint contains, so the file stays one curve.
        `epochs_done`: an epoch's row (an int epoch; a mid-epoch validation's is a fraction)
        is kept only if the checkpoint completed that epoch: a checkpoint saved at an epoch's
        last step but before its end (a preemption) has the row's step, and the resumed run
        ends the epoch and writes the row again."""
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

    # -- per epoch
    def start_epoch(self, epoch: int, epochs: int, steps: int, done: int = 0) -> None:
        if self.is_main:
            # disable=None: a bar on a terminal, nothing in a log file.
            self.bar = tqdm(total=steps, initial=done, desc=f"epoch {epoch}/{epochs}",
                            leave=False, disable=None, dynamic_ncols=True, file=sys.stderr)

    def progress(self, steps_done: int, loss: float, lr: float, samples_per_s: float) -> None:
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
        for key, value in record.items():
            if key == "step":
                continue
            values = value if isinstance(value, list) else [value]
            for i, v in enumerate(values):
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    tag = f"{key}/{i}" if isinstance(value, list) else key
                    self.writer.add_scalar(tag, v, step)
        self.writer.flush()  # one row per validation: cheap, and nothing lost if killed

    def write_plot(self) -> None:
        """logging.plot: <out_dir>/curves.png from metrics.jsonl at the end of the run (rank 0).
        A failure to draw is a warning: the trained run stands."""
        if not (self.is_main and self.plot and (self.out_dir / METRICS_FILE).exists()):
            return
        from .plot import plot_runs  # matplotlib: imported only when drawing
        try:
            plot_runs([self.out_dir], self.out_dir / PLOT_FILE)
        except Exception as exc:  # matplotlib missing or failing must not fail the run
            print(f"distrain: warning: could not draw {self.out_dir / PLOT_FILE}: {exc}",
                  file=sys.stderr, flush=True)

    def close(self) -> None:
        """Flush and close TensorBoard's event file (safe to call twice, and on every rank)."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if self.writer is not None:
            self.writer.close()
            self.writer = None

    @staticmethod
    def _parts(record: dict) -> str:
        keys = ["train_loss", "train_acc", "val_loss", "val_acc", "val_balanced_acc",
                "val_macro_f1", "val_ema_acc", "lr"]
        return " | ".join(f"{k} {_fmt(record[k])}" for k in keys if k in record)

