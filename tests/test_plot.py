"""What a run leaves to look at: `distrain plot` PNGs and TensorBoard scalars, both checked
against the numbers in metrics.jsonl."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import tiny_config

from distrain.commands.cli import main
from distrain.components.observe.log import RunLog
from distrain.components.observe.plot import PLOT_FILE, draw, load_run, plot_runs
from distrain.config import load_config

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """One real 3-epoch run with validations inside epochs and TensorBoard on."""
    from distrain.trainer.run import train

    out = tmp_path_factory.mktemp("run") / "lr05"
    with pytest.MonkeyPatch.context() as mp:  # a plain single process, whatever launched pytest
        for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
            mp.delenv(key, raising=False)
        train(tiny_config(out, "train.epochs=3", "validate.every_steps=30",
                          "logging.tensorboard=true", "logging.plot=false",
                          "checkpoint.save_last=false", "checkpoint.save_best=false"))
    return out


def rows_of(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def read_png(path: Path):
    import matplotlib.image

    assert path.read_bytes()[:8] == PNG_MAGIC
    return matplotlib.image.imread(path)


def test_tensorboard_scalars_equal_the_metrics_file(run_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    rows = rows_of(run_dir)
    # Epoch ends and the evaluations inside epochs (steps 30, 60 of 90 per epoch) alike.
    expected = [(r["step"], r["val_loss"]) for r in rows]
    assert [r["step"] for r in rows] == [30, 60, 90, 120, 150, 180, 210, 240, 270]
    got = [(e.step, e.value) for e in events.Scalars("val_loss")]
    assert [s for s, _ in got] == [s for s, _ in expected]
    assert [v for _, v in got] == pytest.approx([v for _, v in expected], rel=1e-6)  # float32
    ends = [r for r in rows if "train_loss" in r]
    for key in ("train_loss", "train_acc", "samples_per_s"):
        assert [e.value for e in events.Scalars(key)] == pytest.approx([r[key] for r in ends],
                                                                       rel=1e-6)
    assert [e.value for e in events.Scalars("lr")] == pytest.approx([r["lr"] for r in rows])
    tags = set(events.Tags()["scalars"])
    assert {"val_acc", "val_macro_f1", "val_balanced_acc", "epoch", "val_recall/9"} <= tags
    assert "step" not in tags


def test_plot_writes_a_png_of_the_run(run_dir, tmp_path, capsys):
    out = tmp_path / "one.png"
    assert main(["plot", str(run_dir), "-o", str(out)]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    image = read_png(out)
    height, width = image.shape[:2]
    assert width >= 1000 and height >= 700 and 30_000 < out.stat().st_size < 2_000_000
    assert (image[..., :3] < 0.9).mean() > 0.02  # curves, text and axes, not a blank canvas


def test_default_output_is_curves_png_in_the_first_run(run_dir, tmp_path):
    run = tmp_path / "copy"
    shutil.copytree(run_dir, run, ignore=shutil.ignore_patterns("tensorboard"))
    assert main(["plot", str(run)]) == 0
    assert read_png(run / PLOT_FILE).shape[1] >= 1000


def test_runs_overlay_with_one_colour_and_legend_entry_each(run_dir, tmp_path):
    other = tmp_path / "lr01"
    other.mkdir()
    (other / "config.yaml").write_text("checkpoint: {monitor: val_acc, mode: auto}\n")
    rows = rows_of(run_dir)
    for r in rows:
        r["val_acc"] = round(r["val_acc"] * 0.9, 4)
    (other / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    runs = [load_run(run_dir, "lr05"), load_run(other, "lr01")]
    figure = draw(runs)
    legend = [t.get_text() for t in figure.legends[0].get_texts()]
    assert legend[0].startswith("lr05  (best val_loss")
    assert legend[1].startswith("lr01  (best val_acc")
    loss_ax, acc_ax = figure.axes[:2]
    colours = {line.get_color() for line in loss_ax.get_lines() if len(line.get_xdata()) > 1}
    assert colours == {"C0", "C1"}
    # Validation points inside epochs sit at their fractional epoch.
    xs = sorted({float(x) for line in acc_ax.get_lines() for x in line.get_xdata()})
    assert any(0 < x < 1 for x in xs) and 3.0 in xs
    # The best of each run is starred on the panel of its monitored metric.
    best_vl = min(r["val_loss"] for r in rows)
    stars = [(line.get_xdata()[0], line.get_ydata()[0]) for line in loss_ax.get_lines()
             if line.get_marker() == "*"]
    assert stars == [(float(runs[0].best["epoch"]), best_vl)]
    acc_stars = [line.get_ydata()[0] for line in acc_ax.get_lines() if line.get_marker() == "*"]
    assert acc_stars == [max(r["val_acc"] for r in rows)]
    assert any(t.get_text().startswith("best val_acc") for t in acc_ax.texts)
    out = plot_runs([run_dir, other], tmp_path / "both.png")
    assert read_png(out).shape[1] >= 1000


def test_best_follows_the_monitor_and_mode_of_the_runs_config(tmp_path):
    rows = [{"epoch": 0.5, "step": 5, "val_loss": 0.9, "val_macro_f1": 0.6},
            {"epoch": 1, "step": 10, "train_loss": 1.0, "val_loss": 0.5, "val_macro_f1": 0.8},
            {"epoch": 2, "step": 20, "train_loss": 0.5, "val_loss": 0.7, "val_macro_f1": 0.9},
            {"epoch": 3, "step": 30, "train_loss": 0.4, "val_loss": 0.6, "val_macro_f1": 0.9}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert load_run(tmp_path).best["epoch"] == 1  # no config.yaml: val_loss, min
    (tmp_path / "config.yaml").write_text("checkpoint: {monitor: val_macro_f1, mode: auto}\n")
    assert load_run(tmp_path).best["epoch"] == 2  # max; the later tie is no improvement
    (tmp_path / "config.yaml").write_text("checkpoint: {monitor: val_loss, mode: max}\n")
    assert load_run(tmp_path).best["epoch"] == 0.5


def test_a_folder_without_metrics_is_a_clear_error(tmp_path):
    (tmp_path / "empty").mkdir()
    out = subprocess.run([str(Path(sys.executable).parent / "distrain"), "plot",
                          str(tmp_path / "empty")], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 2
    assert out.stderr.startswith("distrain: plot error: ") and "metrics.jsonl" in out.stderr
    assert "Traceback" not in out.stderr and len(out.stderr.splitlines()) == 1
    assert main(["plot", str(tmp_path / "missing")]) == 2


def test_runlog_writes_curves_png_when_asked(run_dir, tmp_path):
    run = tmp_path / "copy"
    shutil.copytree(run_dir, run, ignore=shutil.ignore_patterns("tensorboard"))
    RunLog(load_config(None, [f"run.out_dir={run}", "logging.plot=false"]), True).write_plot()
    assert not (run / PLOT_FILE).exists()
    RunLog(load_config(None, [f"run.out_dir={run}"]), False).write_plot()  # not rank 0
    assert not (run / PLOT_FILE).exists()
    log = RunLog(load_config(None, [f"run.out_dir={run}"]), True)
    log.write_plot()
    log.close()
    assert read_png(run / PLOT_FILE).shape[1] >= 1000
