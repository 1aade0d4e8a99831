"""Every backend passes the same contract for every collective and reduction op, at world
size 1 and 2: in-process, torch.distributed (gloo) and Horovod under horovodrun (Gloo and
MPI controllers)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from backend_contract import contract, expected
from conftest import ROOT, run_distributed

from distrain.distributed import Backend
from distrain.distributed.horovod import horovod_available


def check(results: list[dict], name: str) -> None:
    for r, got in enumerate(results):
        assert got["rank"] == r and got["backend"] == name
        want = expected(len(results))
        assert {k: got[k] for k in want} == want, f"rank {r}"


def test_an_incomplete_backend_cannot_be_made():
    class Forgetful(Backend):
        def wrap_model(self, model):
            return model

    with pytest.raises(TypeError, match="all_reduce"):
        Forgetful()


def test_local_backend(no_dist_env):
    from distrain.distributed import LocalBackend

    check([contract("local")], "local")
    with pytest.raises(ValueError, match="reduction op: expected one of sum, mean, max, min"):
        LocalBackend().all_reduce(torch.ones(1), "avg")


@pytest.mark.parametrize("world", [1, 2])
def test_torch_distributed_backend(world, no_dist_env):
    check(run_distributed(contract, world, "torchrun"), "torchrun")


@pytest.mark.skipif(not horovod_available(), reason="set up with DISTRAIN_HOROVOD=0")
@pytest.mark.parametrize("controller", ["gloo", "mpi"])
def test_horovod_backend(controller, tmp_path, no_dist_env):
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1", OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(ROOT / "src"), str(ROOT / "tests")]))
    bin_dir = Path(sys.executable).parent
    done = subprocess.run([str(bin_dir / "horovodrun"), "-np", "2", "-H", "localhost:2",
                           f"--{controller}", sys.executable, str(ROOT / "tests" /
                                                                  "backend_contract.py"),
                           str(tmp_path / "out")], capture_output=True, text=True, timeout=300,
                          env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    check([torch.load(tmp_path / f"out.rank{r}.pt") for r in range(2)], "horovod")
