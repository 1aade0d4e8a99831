"""`distrain launch`: the command it runs for each launcher, word for word (--dry-run), and
its mistakes as one line with exit 2. The real runs through it are the README's commands:
./launcher/run (tests/test_e2e.py), the node and host launchers (tests/test_multinode.py),
the Slurm job (tests/test_slurm.py) and the own-loop layouts (tests/test_engine.py)."""

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT

PY = sys.executable
BIN = Path(PY).parent
ROOT_MPI = ["OMPI_ALLOW_RUN_AS_ROOT=1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1"] \
    if os.geteuid() == 0 else []


def launch(*args: str, **env: str) -> subprocess.CompletedProcess:
    # No GPU visible (auto: 2 processes, on a GPU host too), no Slurm allocation.
    clean = {k: v for k, v in os.environ.items()
             if k not in ("OMP_NUM_THREADS", "SLURM_JOB_NODELIST")}
    return subprocess.run([str(BIN / "distrain"), "launch", *args], capture_output=True,
                          text=True, timeout=60, cwd=ROOT,
                          env={**clean, "CUDA_VISIBLE_DEVICES": "", **env})


def dry(*args: str, **env: str) -> list[str]:
    done = launch("--dry-run", *args, **env)
    assert done.returncode == 0, done.stderr
    return shlex.split(done.stdout)


@pytest.mark.quick
def test_torchrun_is_the_default_with_the_workers_exit_status():
    # No GPU here: auto is 2 processes; the job's python and torchrun are this environment's.
    assert dry("train", "--config", "configs/digits.yaml", "train.epochs=2") == [
        "OMP_NUM_THREADS=1", PY, "-m", "distrain.commands.agent_status", str(BIN / "torchrun"),
        "--standalone", "--nproc-per-node", "2", "--max-restarts", "0", "-m", "distrain",
        "train", "--config", "configs/digits.yaml", "train.epochs=2"]
    # A script and its own arguments (options after the job are the job's); a set thread count
    # is left alone.
    assert dry("--nproc", "3", "--max-restarts", "2", "examples/own_loop.py", "--out", "x",
               "--dry-run", OMP_NUM_THREADS="4") == [
        PY, "-m", "distrain.commands.agent_status", str(BIN / "torchrun"), "--standalone",
        "--nproc-per-node", "3", "--max-restarts", "2", "examples/own_loop.py", "--out", "x",
        "--dry-run"]


@pytest.mark.quick
def test_nodes_under_torchrun():
    assert dry("--nnodes", "2", "--nproc", "4", "--rdzv-endpoint", "node0:29500",
               "--rdzv-id", "job7", "train")[5:] == [
        "--nnodes", "2", "--rdzv-backend", "c10d", "--rdzv-endpoint", "node0:29500",
        "--rdzv-id", "job7", "--nproc-per-node", "4", "--max-restarts", "0", "-m", "distrain",
        "train"]


@pytest.mark.quick
@pytest.mark.skipif(not (BIN / "horovodrun").exists() or shutil.which("mpirun") is None,
                    reason="set up with DISTRAIN_HOROVOD=0: no horovodrun, no mpirun")
def test_horovodrun_and_mpirun():
    assert dry("--launcher", "horovodrun", "--nproc", "3", "train", "-c", "f.yaml") == [
        "OMP_NUM_THREADS=1", *ROOT_MPI, str(BIN / "horovodrun"), "-np", "3", "-H",
        "localhost:3", PY, "-m", "distrain", "train", "-c", "f.yaml"]
    assert dry("--launcher", "horovodrun", "--hosts", "a:4,b:2", "--controller", "gloo",
               "examples/own_loop.py") == [
        "OMP_NUM_THREADS=1", *ROOT_MPI, str(BIN / "horovodrun"), "-np", "6", "-H", "a:4,b:2",
        "--gloo", PY, "examples/own_loop.py"]
    # On this host alone: --oversubscribe (ranks share its cores); with hosts or under a
    # Slurm allocation, on request only.
    assert dry("--launcher", "mpirun", "--nproc", "3", "train") == [
        "OMP_NUM_THREADS=1", *ROOT_MPI, "mpirun", "-np", "3", "--bind-to", "none", "--map-by",
        "slot", "--oversubscribe", "-x", "OMP_NUM_THREADS", PY, "-m", "distrain", "train"]
    slurm = dry("--launcher", "mpirun", "--nproc", "8", "train", SLURM_JOB_NODELIST="n[1-2]")
    assert "--oversubscribe" not in slurm
    got = dry("--launcher", "mpirun", "--hosts", "a:4,b:4", "train")
    assert got[got.index("-np") + 1] == "8" and "--oversubscribe" not in got
    assert "-H" in got and got[got.index("-H") + 1] == "a:4,b:4"


@pytest.mark.quick
@pytest.mark.parametrize("args, message", [
    ((), "distrain launch: nothing to run; add a job: train --config F [overrides]"),
    (("--launcher", "deepspeed", "train"),
     "--launcher: expected torchrun, horovodrun, mpirun, got 'deepspeed'"),
    (("--nproc", "0", "train"), "--nproc: expected a number of processes >= 1 or auto, got '0'"),
    (("--launcher", "mpirun", "--max-restarts", "2", "train"),
     "--max-restarts: torchrun only (mpirun does not restart a failed job"),
    (("--hosts", "a:2", "train"), "--hosts, --controller, --oversubscribe: horovodrun and "
     "mpirun only"),
    (("--launcher", "mpirun", "--hosts", "a:2,b", "train"), "--hosts: entry 'b' is not host:slots"),
    (("--nnodes", "2", "train"), "--nnodes: needs --rdzv-endpoint host:port"),
    (("--rdzv-endpoint", "n0:29500", "train"), "--rdzv-endpoint, --node-rank: for a job over "
     "nodes; add --nnodes N"),
    (("missing.py",), "distrain launch: no script 'missing.py'"),
    (("trian", "--config", "f"), "distrain launch: 'trian' is neither a distrain command")])
def test_mistakes_are_one_line_and_exit_2(args, message):
    done = launch(*args)
    assert done.returncode == 2 and not done.stdout
    assert done.stderr.startswith("distrain: config error: ") and message in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and "Traceback" not in done.stderr


def test_a_config_mistake_through_it_exits_2_as_one_process_does(tmp_path):
    """The workers' own status comes back through torchrun (2: a config error), and the
    mistake is said once, not with torchrun's page of traceback."""
    done = launch("--nproc", "2", "train", "--config", "configs/digits.yaml",
                  "train.epochs=zero", f"run.out_dir={tmp_path}")
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr.count("distrain: config error: train.epochs") == 1
    assert "ChildFailedError" not in done.stderr


@pytest.mark.quick
@pytest.mark.parametrize("preempted, status", [(True, 75), (False, 143)])
def test_a_signalled_torchrun_reports_the_workers_outcome(preempted, status):
    """torchrun's own traceback when it got SIGTERM (torch 2.14's wording) is dropped; the
    status is 75 when a worker said it checkpointed for the signal, else 128 + 15."""
    from distrain.commands.agent_status import _Filter

    said = ["distrain: preempted: stopped by signal 15 at step 60; checkpoint written\n"] \
        if preempted else ["epoch 1 | train_loss 0.5\n"]
    torchrun = ["Traceback (most recent call last):\n", '  File "torchrun", line 8\n',
                "    sys.exit(main())\n", "torch.distributed.elastic.multiprocessing.api."
                "SignalException: Process 2697 got signal: 15\n"]
    filt = _Filter()
    shown = [out for line in [*said, *torchrun] for out in filt.feed(line)]
    assert shown == said and filt.status(1) == status
