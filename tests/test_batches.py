"""Batches of any structure in the config trainer: dict batches, a model with keyword inputs
returning a dict, and `train.step`, under real torchrun."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import ROOT, free_port


def rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def weights(out: Path) -> dict:
    return torch.load(Path(out) / "checkpoints" / "last.pt", weights_only=True)["model"]


def _distrain_env() -> dict:
    import os

    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=f"{ROOT / 'examples'}:{ROOT / 'tests'}")
    return env


def test_dict_batches_and_a_step_function_under_torchrun(tmp_path, no_dist_env):
    """examples/dict_batches.py: dict batches, a model returning a dict, train.step with a
    named metric; 2 processes under real torchrun equal 1 process, and the step's `acc` is
    reduced exactly like the loss (the same samples, the same train_acc)."""
    import subprocess
    import sys

    bin_dir = Path(sys.executable).parent
    args = ["train", "--config", str(ROOT / "configs" / "dict_batches.yaml"), "train.epochs=2",
            "logging.plot=false"]
    for name, launch, batch in (("one", [str(bin_dir / "distrain")], 32),
                                ("two", [str(bin_dir / "torchrun"), "--nproc-per-node", "2",
                                         "--master-port", str(free_port()), "-m", "distrain"],
                                 16)):
        done = subprocess.run([*launch, *args, f"run.out_dir={tmp_path / name}",
                               f"data.batch_size={batch}"], capture_output=True, text=True,
                              env=_distrain_env(), timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
    one, two = rows(tmp_path / "one"), rows(tmp_path / "two")
    a, b = weights(tmp_path / "one"), weights(tmp_path / "two")
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5
    for r1, r2 in zip(one, two):
        assert r2["train_acc"] == pytest.approx(r1["train_acc"], abs=1e-9)
        assert r2["val_acc"] == pytest.approx(r1["val_acc"], abs=1e-9)
        assert r2["val_loss"] == pytest.approx(r1["val_loss"], rel=1e-5)
    assert one[-1]["val_acc"] > 0.7 and one[-1]["train_loss"] < one[0]["train_loss"]


def bad_step(model, batch):
    return {"loss": model(batch[0]).sum()}


def test_a_step_function_returning_something_else_is_named(tmp_path, no_dist_env, capsys):
    from distrain.commands.cli import main

    code = main(["train", f"run.out_dir={tmp_path}", "model.name=mlp",
                 "model.args={in_features: 64, hidden: [8], num_classes: 10}",
                 "train.step=test_batches:bad_step", "train.epochs=1", "logging.plot=false"])
    assert code == 2
    err = capsys.readouterr().err
    assert "train.step: test_batches:bad_step returned a dict" in err
