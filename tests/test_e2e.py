"""The commands a user types: real torchrun, the console script, the main job's launcher."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

from conftest import ROOT, free_port

BIN = Path(sys.executable).parent
DIGITS = str(ROOT / "configs" / "digits.yaml")


def clean_env():
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    return env


def torchrun(*args, timeout=300):
    cmd = [str(BIN / "torchrun"), "--nproc-per-node", "2", "--master-port", str(free_port()),
           "-m", "distrain", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=clean_env())


def test_digits_learns_under_torchrun(tmp_path):
    out = torchrun("train", "--config", DIGITS, f"run.out_dir={tmp_path}", "train.epochs=10")
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    for key in ("epoch", "step", "train_loss", "train_acc", "val_loss", "val_acc", "lr",
                "samples_per_s", "epoch_time_s"):
        assert key in rows[0], key
    assert rows[-1]["val_acc"] >= 0.95, rows[-1]
    assert rows[-1]["train_loss"] < rows[0]["train_loss"] / 5
    # Rank 0 alone prints: one summary line per epoch, one closing line.
    assert len(re.findall(r"^epoch +1 \|", out.stdout, re.M)) == 1
    assert out.stdout.count("distrain: done:") == 1
    assert "epochs: 10" in (tmp_path / "config.yaml").read_text()  # the resolved config
    assert (tmp_path / "checkpoints" / "last.pt").is_file()
    assert (tmp_path / "checkpoints" / "best.pt").is_file()


def test_check_reports_the_rank_layout(tmp_path):
    out = torchrun("check", "--config", DIGITS, f"run.out_dir={tmp_path}")
    assert out.returncode == 0, out.stderr[-3000:]
    assert '"backend": "torchrun"' in out.stdout and '"world_size": 2' in out.stdout
    assert "rank 0 local_rank 0" in out.stdout and "rank 1 local_rank 1" in out.stdout
    assert out.stdout.count("# resolved config") == 1
    assert not tmp_path.exists() or not list(tmp_path.iterdir())  # check trains nothing


def test_console_script_and_module_agree(tmp_path):
    a = subprocess.run([str(BIN / "distrain"), "check", "--config", DIGITS, "train.epochs=3"],
                       capture_output=True, text=True, env=clean_env(), timeout=120)
    b = subprocess.run([sys.executable, "-m", "distrain", "check", "--config", DIGITS,
                        "train.epochs=3"], capture_output=True, text=True, env=clean_env(),
                       timeout=120)
    assert a.returncode == b.returncode == 0 and a.stdout == b.stdout
    assert "epochs: 3" in a.stdout and '"backend": "local"' in a.stdout


def test_main_job_launcher(tmp_path):
    """`./launcher/run` exactly as the README shows it (set-up already done: seconds)."""
    out = subprocess.run(["./launcher/run", f"run.out_dir={tmp_path}"], cwd=ROOT,
                         capture_output=True, text=True, timeout=600, env=clean_env())
    assert out.returncode == 0, out.stderr[-3000:]
    acc = float(re.search(r"final validation accuracy: ([0-9.]+)", out.stdout).group(1))
    assert acc >= 0.95
    assert f"run files: {tmp_path}" in out.stdout
    rows = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert round(json.loads(rows[-1])["val_acc"], 4) == acc
