"""Fault injection with real processes: the result must equal an uninterrupted run."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import free_port

BIN = Path(sys.executable).parent
TINY = ["model.name=mlp", "model.args={in_features: 64, hidden: [32], num_classes: 10}",
        "optimizer.name=adamw", "optimizer.lr=3e-3", "data.batch_size=16", "train.epochs=3",
        "train.log_every_steps=1000", "checkpoint.every_steps=10", "logging.plot=false",
        "data.num_workers=0"]  # the fault plugins count fetches in the training process


def torchrun(*args, restarts=0, launch=False):
    """2 processes under torchrun; `launch`: through `distrain launch` (its exit status)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    cmd = [str(BIN / "torchrun"), "--nproc-per-node", "2", "--max-restarts", str(restarts),
           "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{free_port()}",
           "-m", "distrain", "train", *args]
    if launch:
        cmd = [str(BIN / "distrain"), "launch", "--nproc", "2", "--max-restarts", str(restarts),
               "train", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)


def rows(out_dir):
    out = []
    for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        for key in ("samples_per_s", "epoch_time_s", "train_time_s", "data_wait_s", "sync_wait_s",
                    "compute_s"):
            row.pop(key, None)
        out.append(row)
    return out


def assert_same_run(a, b):
    wa = torch.load(Path(a) / "checkpoints" / "last.pt", weights_only=True)
    wb = torch.load(Path(b) / "checkpoints" / "last.pt", weights_only=True)
    assert wa["global_step"] == wb["global_step"]
    for k in wa["model"]:
        assert torch.equal(wa["model"][k], wb["model"][k]), k
    assert rows(a) == rows(b)


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """The uninterrupted run both fault tests must end equal to."""
    out = tmp_path_factory.mktemp("straight")
    done = torchrun(f"run.out_dir={out}", *TINY)
    assert done.returncode == 0, done.stderr[-3000:]
    return out


def test_killed_worker_is_restarted_by_torchrun_and_resumes_exactly(tmp_path, straight):
    marker = tmp_path / "killed"
    # Rank 1 fetches ~719 samples per epoch: sample 1000 is mid-way through epoch 2, after the
    # step-60 checkpoint (every 10 steps, 45 steps per epoch). torchrun restarts the group once.
    args = (f"run.out_dir={tmp_path / 'faulty'}", *TINY, "data.name=faulty:killing_digits",
            f"data.args={{kill_rank: 1, kill_after: 1000, marker: '{marker}'}}")
    restarted = torchrun(*args, restarts=1)
    assert marker.exists(), "the fault was not injected"
    assert restarted.returncode == 0, restarted.stderr[-3000:]
    assert "failed (exitcode: -9) local_rank: 1" in restarted.stderr  # SIGKILL, then restart
    assert "at epoch 1 + 15 steps, step 60" in restarted.stdout
    assert_same_run(straight, tmp_path / "faulty")


def test_sigterm_to_the_launcher_checkpoints_and_the_relaunch_finishes_exactly(tmp_path, straight):
    marker = tmp_path / "signalled"
    args = (f"run.out_dir={tmp_path / 'preempted'}", *TINY, "checkpoint.every_steps=0",
            "data.name=faulty:preempting_digits", f"data.args={{after: 1000, marker: '{marker}'}}")
    first = torchrun(*args, launch=True)  # torchrun gets the SIGTERM, as from a scheduler
    assert marker.exists() and first.returncode == 75, first.stderr[-3000:]
    assert "distrain: preempted: stopped by signal 15 at step" in first.stderr
    assert "SignalException" not in first.stderr and "Traceback" not in first.stderr
    step = int(first.stderr.split("at step ")[1].split(";")[0])
    # In epoch 2 (its middle, or its end when the next check falls after it): no step checkpoint
    # was configured, so this one is the signal's.
    assert 45 < step <= 90
    saved = torch.load(tmp_path / "preempted" / "checkpoints" / "last.pt", weights_only=True)
    assert saved["global_step"] == step and saved["step_in_epoch"] == step - 45
    second = torchrun(*args)
    assert second.returncode == 0, second.stderr[-3000:]
    assert f"step {step}" in second.stdout
    assert_same_run(straight, tmp_path / "preempted")


def test_sigusr1_stops_a_single_process_with_the_preempted_status(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent)}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    out = subprocess.run([sys.executable, "-m", "distrain", "train", f"run.out_dir={tmp_path}",
                          *TINY, "data.name=faulty:preempting_digits",
                          f"data.args={{after: 200, marker: '{tmp_path / 'm'}', signum: 10, "
                          "to_self: true}"], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 75, out.stderr[-2000:]
    assert "preempted: stopped by signal 10" in out.stderr and "Traceback" not in out.stderr
    assert torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=True)["step_in_epoch"] > 0


def nan_body(out_dir, nan_calls, overrides=(), eager=False):
    """Rank 1's loss is NaN on the given calls; returns what each rank did. `eager`: read a
    fused optimizer's skip decision on the host at once instead of one step later."""
    from conftest import one_epoch, tiny_config

    from distrain.errors import NonFiniteError

    def patch(trainer, backend):
        if eager:  # PyTorch's found_inf protocol flag, which Precision keys its deferral on
            trainer.optimizer._step_supports_amp_scaling = False
        clean, calls = trainer.loss_fn, [0]

        def loss_fn(logits, y):
            calls[0] += 1
            bad = backend.rank == 1 and calls[0] in nan_calls
            return clean(logits, y) * (float("nan") if bad else 1.0)

        trainer.loss_fn = loss_fn

    return one_epoch(tiny_config(out_dir, "train.epochs=1", *overrides), patch, NonFiniteError)


def test_nan_on_one_rank_is_skipped_by_all(tmp_path, no_dist_env):
    from conftest import run_distributed

    r0, r1 = run_distributed(nan_body, 2, str(tmp_path), {5, 6, 30})
    assert r0["skipped"] == r1["skipped"] == 3 and r0["error"] is None
    assert r0["step"] == r1["step"] == 45 and r0["schedule"] == 42
    assert torch.isfinite(r0["weights"]).all() and torch.equal(r0["weights"], r1["weights"])


# Fused AdamW takes the skip on the device and the host reads it one step later; the
# schedule (warm-up then cosine) and the EMA must still follow the taken steps only.
FUSED = ("optimizer.name=adamw", "optimizer.lr=0.01", "optimizer.args={fused: true}",
         "scheduler.name=cosine", "scheduler.warmup_epochs=0.5", "train.ema_decay=0.9")


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_a_skip_decided_on_the_device_matches_the_host_decision_bitwise(tmp_path, no_dist_env,
                                                                         precision):
    from conftest import run_distributed

    overrides = (*FUSED, f"train.precision={precision}")
    d0, d1 = run_distributed(nan_body, 2, str(tmp_path / "d"), {5, 6, 30}, overrides)
    e0, e1 = run_distributed(nan_body, 2, str(tmp_path / "e"), {5, 6, 30}, overrides, True)
    assert d0["skipped"] == d1["skipped"] == e0["skipped"] == 3 and d0["error"] is None
    assert d0["step"] == 45 and d0["schedule"] == e0["schedule"] == 42
    assert d0["lr"] == d1["lr"] == e0["lr"] < 0.01
    assert torch.isfinite(d0["weights"]).all() and torch.equal(d0["weights"], d1["weights"])
    assert torch.equal(d0["weights"], e0["weights"]) and torch.equal(d0["ema"], e0["ema"])
    assert torch.equal(e0["weights"], e1["weights"])


@pytest.mark.parametrize("overrides", [(), FUSED], ids=["sgd", "fused-adamw"])
def test_too_many_bad_steps_stop_with_step_and_rank(tmp_path, no_dist_env, overrides):
    from conftest import run_distributed

    r0, r1 = run_distributed(nan_body, 2, str(tmp_path), set(range(10, 100)),
                             ("train.max_bad_steps=4", *overrides))
    message = "4 consecutive steps with non-finite gradients, the last at step 13; " \
              "non-finite loss on rank 1"
    assert r0["error"] == r1["error"] == message
