"""A plugin (user code named in the config) that raises, in its constructor or at its first
call, on every rank or on one: one line naming the key, the plugin's own message and where it
raised, exit 1, under every launcher; never a hang."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, free_port

from distrain.distributed.horovod import horovod_available

BIN = Path(sys.executable).parent
TINY = ["model.name=mlp", "model.args={in_features: 64, hidden: [8], num_classes: 10}",
        "train.epochs=1", "logging.plot=false", "checkpoint.resume=none"]


def env() -> dict:
    out = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    out.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
               OMP_NUM_THREADS="1", PYTHONPATH=f"{ROOT / 'tests'}:{ROOT / 'src'}")
    return out


LAUNCHERS = {
    "python": lambda: [str(BIN / "distrain")],
    "torchrun": lambda: [str(BIN / "torchrun"), "--nproc-per-node", "2", "--master-port",
                         str(free_port()), "-m", "distrain"],
    "horovodrun": lambda: [str(BIN / "horovodrun"), "-np", "2", "-H", "localhost:2", "--gloo",
                           str(BIN / "distrain")],
    "mpirun": lambda: ["mpirun", "-np", "2", "--oversubscribe", str(BIN / "distrain")],
}


def launch(how: str, out: Path, *overrides: str) -> subprocess.CompletedProcess:
    if how in ("horovodrun", "mpirun") and not horovod_available():
        pytest.skip("set up with DISTRAIN_HOROVOD=0")
    return subprocess.run([*LAUNCHERS[how](), "train", f"run.out_dir={out}", *TINY, *overrides],
                          capture_output=True, text=True, timeout=240, env=env())


@pytest.mark.parametrize("how", ["python", "mpirun"])  # torchrun, horovodrun: below
def test_a_plugin_raising_in_its_constructor_is_named(tmp_path, how):
    done = launch(how, tmp_path, "loss.name=user_code:broken_loss")
    assert done.returncode != 0
    lines = [l for l in done.stderr.splitlines() if "distrain: error:" in l]
    assert lines, done.stderr[-2000:]
    assert "loss.name: user_code:broken_loss raised FileNotFoundError: no such class weights " \
           "file (at " in lines[0] and "user_code.py:" in lines[0]
    # torchrun and horovodrun add their own report (a traceback of the launcher itself).
    assert "Traceback" not in done.stderr or how in ("torchrun", "horovodrun")


@pytest.mark.parametrize("how", ["torchrun", "horovodrun"])
def test_a_plugin_raising_on_one_rank_at_its_first_call_ends_the_job(tmp_path, how):
    """Rank 1's loss raises at the first step while rank 0 waits in the gradient allreduce:
    the launcher ends the job (no wait for dist.timeout_s), rank 1's line names the key."""
    done = launch(how, tmp_path, "loss.name=user_code:fails_on_rank_one", "dist.timeout_s=120")
    assert done.returncode != 0
    assert "rank 1: loss.name: user_code:fails_on_rank_one raised KeyError: 'class 7 has no " \
           "weight on this node'" in done.stderr, done.stderr[-3000:]
