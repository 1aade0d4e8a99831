"""Learning curves of one or more runs, drawn from their metrics.jsonl into one PNG.

    distrain plot runs/a                        # runs/a/curves.png
    distrain plot runs/a runs/b -o compare.png  # overlaid, one colour per run

Panels: loss, accuracy, macro-F1 / balanced accuracy (when a run reports them) and the
learning rate, against the epoch. Validations inside an epoch (`validate.every_steps`) sit at
their fractional epoch. Each run's best validation (by the `checkpoint.monitor` and `mode` of
its config.yaml) is starred and annotated.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from distrain.components.observe.runfiles import CONFIG_FILE, METRICS_FILE, PLOT_FILE
from distrain.config import metric_mode
from distrain.errors import PlotError

# (metric key, line style, label) per panel; colours name runs, line styles name series.
PANELS: list[tuple[str, str, list[tuple[str, str, str]]]] = [
    ("Loss", "loss", [("train_loss", "--", "train"), ("val_loss", "-", "validation"),
                      ("val_ema_loss", ":", "validation (EMA)")]),
    ("Accuracy", "accuracy", [("train_acc", "--", "train"), ("val_acc", "-", "validation"),
                              ("val_ema_acc", ":", "validation (EMA)")]),
    ("Validation macro-F1 and balanced accuracy", "score",
     [("val_macro_f1", "-", "macro-F1"), ("val_balanced_acc", "-.", "balanced accuracy"),
      ("val_ema_macro_f1", ":", "macro-F1 (EMA)"),
      ("val_ema_balanced_acc", (0, (1, 3)), "balanced accuracy (EMA)")]),
    ("Learning rate", "learning rate", [("lr", "-", "lr")]),
]
OPTIONAL_PANEL = "Validation macro-F1 and balanced accuracy"  # drawn only when some run has it


@dataclass
class Run:
    name: str
    rows: list[dict]
    monitor: str = "val_loss"
    mode: str = "min"
    best: dict | None = None

    def series(self, key: str) -> tuple[list[float], list[float]]:
        """(epochs, values) of every row holding a number under `key`, by epoch."""
        points = sorted((float(r["epoch"]), float(r[key])) for r in self.rows
                        if isinstance(r.get(key), (int, float)) and "epoch" in r)
        return [p[0] for p in points], [p[1] for p in points]


def load_run(run_dir: str | Path, name: str | None = None) -> Run:
    """A run's rows and its monitored metric; PlotError when there is nothing to plot."""
    folder = Path(run_dir)
    if not folder.is_dir():
        raise PlotError(f"{folder}: no such run folder")
    path = folder / METRICS_FILE
    if not path.is_file():
        raise PlotError(f"{folder}: no {METRICS_FILE} here; is it a run's out_dir "
                        "(run.out_dir) and has the run finished an epoch?")
    lines = path.read_text().splitlines()
    rows = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if number == len(lines):
                break  # the last line of a live run, still being written
            raise PlotError(f"{path}:{number}: not a JSON line: {line[:80]!r}") from None
    if not rows:
        raise PlotError(f"{path}: no rows yet; the run has not finished an epoch")
    monitor, mode = _monitor(folder)
    run = Run(name or folder.resolve().name, rows, monitor, mode)
    run.best = _best(run)
    return run


def _monitor(folder: Path) -> tuple[str, str]:
    """checkpoint.monitor and its direction from the run's config.yaml (val_loss/min without)."""
    monitor, mode = "val_loss", "auto"
    try:
        checkpoint = (yaml.safe_load((folder / CONFIG_FILE).read_text()) or {}).get("checkpoint")
        monitor = checkpoint.get("monitor", monitor)
        mode = checkpoint.get("mode", mode)
    except (OSError, yaml.YAMLError, AttributeError):
        pass
    return monitor, metric_mode(monitor, mode)


def _best(run: Run) -> dict | None:
    """The first row with the best monitored value (later ties are no improvement)."""
    rows = [r for r in run.rows if isinstance(r.get(run.monitor), (int, float))]
    if not rows:
        return None
    sign = 1 if run.mode == "min" else -1
    return min(rows, key=lambda r: sign * r[run.monitor])


def _names(run_dirs: list[Path]) -> list[str]:
    """Folder names, with the parent prepended where two runs share a name."""
    names = [p.resolve().name for p in run_dirs]
    return [f"{p.resolve().parent.name}/{n}" if names.count(n) > 1 else n
            for p, n in zip(run_dirs, names)]


def plot_runs(run_dirs: list[str | Path], out: str | Path | None = None) -> Path:
    """Draw the runs' curves into one PNG (default: <first run>/curves.png); returns its path."""
    dirs = [Path(d) for d in run_dirs]
    if not dirs:
        raise PlotError("no run folder given")
    runs = [load_run(d, n) for d, n in zip(dirs, _names(dirs))]
    out = Path(out) if out is not None else dirs[0] / PLOT_FILE
    figure = draw(runs)
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=110)
    return out


def draw(runs: list[Run]) -> Any:
    """A matplotlib Figure of the runs (Agg canvas: no display, no global pyplot state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    panels = [p for p in PANELS if p[0] != OPTIONAL_PANEL
              or any(run.series(key)[0] for run in runs for key, _, _ in p[2])]
    colours = [f"C{i % 10}" for i in range(len(runs))]
    grid = (2, 2) if len(panels) == 4 else (1, len(panels))
    figure = Figure(figsize=(13, 8.5) if grid == (2, 2) else (17, 5.5), layout="constrained")
    FigureCanvasAgg(figure)
    names = ", ".join(run.name for run in runs)
    figure.suptitle(f"Learning curves: {names if len(names) < 90 else f'{len(runs)} runs'}",
                    fontsize=15)
    for ax, panel in zip(figure.subplots(*grid, squeeze=False).ravel(), panels):
        _panel(ax, runs, colours, *panel)
    handles = [Line2D([], [], color=c, linewidth=3) for c in colours]
    labels = [run.name + (f"  (best {run.monitor} {_value(run.best[run.monitor])} "
                          f"@ epoch {_epoch(run.best)})" if run.best else "")
              for run in runs]
    handles.append(Line2D([], [], linestyle="", marker="*", markersize=13, color="0.5",
                          markeredgecolor="black"))
    labels.append("best validation (checkpoint.monitor)")
    figure.legend(handles, labels, loc="outside lower center", ncol=min(len(labels), 3),
                  fontsize=10, frameon=False)
    return figure


def _panel(ax: Any, runs: list[Run], colours: list[str], title: str, ylabel: str,
           series: list[tuple[str, Any, str]]) -> None:
    """One panel: each run's series in the run's colour, line styles told apart by a legend."""
    from matplotlib.lines import Line2D
    from matplotlib.ticker import MaxNLocator

    shown: dict[str, Any] = {}  # label -> line style, of the series some run has
    for run, colour in zip(runs, colours):
        for key, style, label in series:
            x, y = run.series(key)
            if x:
                ax.plot(x, y, linestyle=style, color=colour, linewidth=1.8,
                        marker="o" if len(x) < 40 else None, markersize=3.5)
                shown.setdefault(label, style)
    ax.set_title(title, fontsize=13)
    ax.set_xlabel("epoch", fontsize=11)
    ax.set_ylabel(ylabel, fontsize=11)
    ax.tick_params(labelsize=10)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(True, alpha=0.3)
    values = [v for run in runs for key, _, _ in series for v in run.series(key)[1]]
    if ylabel in ("loss", "learning rate") and values and min(values) > 0 \
            and max(values) / min(values) > 30:
        ax.set_yscale("log")  # late epochs (or a decayed LR) stay readable next to the first
    marked = 0
    for run, colour in zip(runs, colours):  # after the scale: each label points inward
        marked += _mark_best(ax, run, colour, series, marked)
    if len(shown) > 1:
        ax.legend([Line2D([], [], color="0.25", linestyle=style) for style in shown.values()],
                  list(shown), fontsize=9, loc="best", title="series", title_fontsize=9)


def _epoch(row: dict) -> str:
    epoch = float(row["epoch"])
    return f"{epoch:g}" if epoch.is_integer() else f"{epoch:.2f}"


def _value(value: float) -> str:
    return f"{value:.4f}" if 1e-3 <= abs(value) < 1e4 else f"{value:.3g}"


def _mark_best(ax: Any, run: Run, colour: str, series: list[tuple[str, str, str]],
               marked: int) -> int:
    """Star the run's best row on the panel that plots its monitored metric; 1 if it did.
    `marked` runs were starred here already: this label goes further out, clear of theirs."""
    if run.best is None or run.monitor not in [key for key, _, _ in series]:
        return 0
    x, y = float(run.best["epoch"]), float(run.best[run.monitor])
    ax.plot([x], [y], linestyle="", marker="*", markersize=16, color=colour,
            markeredgecolor="black", zorder=5)
    # Where the point sits in the panel (0..1 each way), so the label points inward.
    fx, fy = ax.transAxes.inverted().transform(ax.transData.transform((x, y)))
    dy = (26 + 34 * marked) * (-1 if fy > 0.5 else 1)
    ax.annotate(f"best {run.monitor} {_value(y)}\nat epoch {_epoch(run.best)}", (x, y),
                xytext=(-14 if fx > 0.5 else 14, dy), textcoords="offset points",
                ha="right" if fx > 0.5 else "left", va="top" if dy < 0 else "bottom",
                fontsize=9, color=colour, zorder=6,
                bbox={"boxstyle": "round,pad=0.25", "fc": "white", "ec": colour, "alpha": 0.9},
                arrowprops={"arrowstyle": "-", "color": colour, "lw": 0.8})
    return 1
