"""The multi-node launch scripts (launcher/torchrun-nodes, horovodrun-hosts, mpirun-hosts: thin
callers of `distrain launch`) run for real on this machine, with the nodes as separate agents
or hosts on 127.0.0.1, and their commands for two hosts checked word for word."""

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT, free_port

from distrain.distributed.horovod import horovod_available

BIN = Path(sys.executable).parent
LAUNCHER = ROOT / "launcher"
DIGITS = str(ROOT / "configs" / "digits.yaml")
TINY = ["model.name=mlp", "model.args={in_features: 64, hidden: [32], num_classes: 10}",
        "train.epochs=2", "data.batch_size=16", "train.log_every_steps=1000"]
TIMING = {"samples_per_s", "epoch_time_s", "train_time_s", "data_wait_s", "sync_wait_s",
          "compute_s"}
PY = str(ROOT / ".venv/bin/python")
ROOT_MPI = (["OMPI_ALLOW_RUN_AS_ROOT=1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1"]
            if os.geteuid() == 0 else [])

needs_horovod = pytest.mark.skipif(
    not horovod_available() and os.environ.get("DISTRAIN_HOROVOD") == "0",
    reason="set up with DISTRAIN_HOROVOD=0: no Horovod or MPI")


# A launcher's rank variables (pytest may run under one) and the scripts' own settings.
UNSET = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "NNODES", "NODE_RANK",
         "NPROC_PER_NODE", "RDZV_ENDPOINT", "RDZV_ID", "RDZV_BACKEND", "MAX_RESTARTS", "CONFIG",
         "HOSTS", "HOROVOD_CONTROLLER", "OVERSUBSCRIBE", "DRY_RUN", "OMP_NUM_THREADS")


def env(**variables):
    return {**{k: v for k, v in os.environ.items() if k not in UNSET}, **variables}


def launch(script, out_dir, **variables):
    return subprocess.Popen([str(LAUNCHER / script), *TINY, f"run.out_dir={out_dir}"],
                            env=env(**variables), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def finish(proc, timeout=120):
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
    assert proc.returncode == 0, out[-4000:]
    return out


def metrics(out_dir):
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING}
            for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]


def weights(out_dir):
    return torch.load(Path(out_dir) / "checkpoints" / "last.pt", weights_only=True)["model"]


@pytest.fixture(scope="module")
def torchrun_run(tmp_path_factory):
    """The reference: one torchrun agent with two processes, the same config."""
    out_dir = tmp_path_factory.mktemp("torchrun")
    cmd = [str(BIN / "torchrun"), "--nproc-per-node", "2", "--master-port", str(free_port()),
           "-m", "distrain", "train", "--config", DIGITS, *TINY, f"run.out_dir={out_dir}"]
    proc = subprocess.run(cmd, env=env(OMP_NUM_THREADS="1"), capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out_dir


def test_two_torchrun_agents_train_like_one(tmp_path, torchrun_run):
    """Two agents started separately, as on two nodes, meet at a c10d rendezvous and end with
    the single agent's weights bit for bit."""
    rdzv = dict(NNODES="2", NPROC_PER_NODE="1", RDZV_ENDPOINT=f"127.0.0.1:{free_port()}",
                RDZV_ID="test-multinode")
    agents = [launch("torchrun-nodes", tmp_path, NODE_RANK=str(r), **rdzv) for r in (0, 1)]
    outputs = [finish(a) for a in agents]
    assert sum(o.count("distrain: done:") for o in outputs) == 1  # one job, one rank 0
    two, one = weights(tmp_path), weights(torchrun_run)
    assert two.keys() == one.keys()
    for k in one:
        assert torch.equal(two[k], one[k]), (k, (two[k] - one[k]).abs().max())
    assert [r["step"] for r in metrics(tmp_path)] == [45, 90]  # global batch 2 × 16
    assert metrics(tmp_path) == metrics(torchrun_run)


@needs_horovod
@pytest.mark.parametrize("script, variables", [
    ("horovodrun-hosts", {"HOSTS": "localhost:2", "HOROVOD_CONTROLLER": "gloo"}),
    ("mpirun-hosts", {"HOSTS": "localhost:2"})])
def test_host_launchers_train_like_torchrun(tmp_path, torchrun_run, script, variables):
    out = finish(launch(script, tmp_path, **variables))
    assert out.count("distrain: done:") == 1
    got, want = metrics(tmp_path), metrics(torchrun_run)
    assert [r.keys() for r in got] == [r.keys() for r in want]
    for a, b in zip(got, want):
        for key in b:
            assert a[key] == pytest.approx(b[key], rel=1e-4), (b["epoch"], key)


def dry_run(script, *args, **variables):
    proc = subprocess.run([str(LAUNCHER / script), *args], capture_output=True, text=True,
                          env=env(DRY_RUN="1", **variables), timeout=30)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_torchrun_nodes_command():
    out = dry_run("torchrun-nodes", "train.epochs=3", "data.args={val_fraction: 0.3}",
                  NNODES="2", NODE_RANK="1", NPROC_PER_NODE="4", RDZV_ENDPOINT="node0:29400",
                  RDZV_ID="job42", MAX_RESTARTS="3")
    assert out == shlex.join([
        "OMP_NUM_THREADS=1", PY, "-m", "distrain.commands.agent_status",
        str(ROOT / ".venv/bin/torchrun"), "--nnodes", "2", "--rdzv-backend", "c10d",
        "--rdzv-endpoint", "node0:29400", "--rdzv-id", "job42", "--node-rank", "1",
        "--nproc-per-node", "4", "--max-restarts", "3", "-m", "distrain", "train", "--config",
        DIGITS, "train.epochs=3", "data.args={val_fraction: 0.3}"]) + "\n"
    # Without NODE_RANK (c10d orders the nodes) and with the defaults.
    out = dry_run("torchrun-nodes", NNODES="2", RDZV_ENDPOINT="node0:29400")
    assert shlex.split(out)[4:] == [
        str(ROOT / ".venv/bin/torchrun"), "--nnodes", "2", "--rdzv-backend", "c10d",
        "--rdzv-endpoint", "node0:29400", "--rdzv-id", "distrain", "--nproc-per-node", "1",
        "--max-restarts", "0", "-m", "distrain", "train", "--config", DIGITS]


@pytest.mark.parametrize("controller", ["", "gloo", "mpi"])
def test_horovodrun_hosts_command(controller):
    out = dry_run("horovodrun-hosts", "train.epochs=3", HOSTS="node0:4,node1:2",
                  HOROVOD_CONTROLLER=controller)
    assert out == shlex.join([
        "OMP_NUM_THREADS=1", *ROOT_MPI, str(ROOT / ".venv/bin/horovodrun"), "-np", "6", "-H",
        "node0:4,node1:2", *([f"--{controller}"] if controller else []),
        PY, "-m", "distrain", "train", "--config", DIGITS, "train.epochs=3"]) + "\n"


@pytest.mark.parametrize("oversubscribe", ["0", "1"])
def test_mpirun_hosts_command(oversubscribe):
    out = dry_run("mpirun-hosts", "train.epochs=3", HOSTS="node0:4,node1:4",
                  OVERSUBSCRIBE=oversubscribe, CONFIG="my.yaml")
    assert out == shlex.join([
        "OMP_NUM_THREADS=1", *ROOT_MPI, "mpirun", "-np", "8", "--bind-to", "none", "--map-by",
        "slot", "-H", "node0:4,node1:4", *(["--oversubscribe"] if oversubscribe == "1" else []),
        "-x", "OMP_NUM_THREADS", PY, "-m", "distrain", "train", "--config", "my.yaml",
        "train.epochs=3"]) + "\n"


@pytest.mark.parametrize("script, variables, message", [
    ("horovodrun-hosts", {"HOSTS": "node0:4,node1"}, "--hosts: entry 'node1' is not host:slots"),
    ("mpirun-hosts", {}, "set HOSTS=host1:slots,host2:slots"),
    ("horovodrun-hosts", {"HOSTS": "a:1", "HOROVOD_CONTROLLER": "nccl"},
     "HOROVOD_CONTROLLER must be gloo or mpi, got 'nccl'"),
    ("torchrun-nodes", {"NNODES": "2"}, "set RDZV_ENDPOINT=host:port")])
def test_launchers_name_a_missing_or_bad_setting(script, variables, message):
    proc = subprocess.run([str(LAUNCHER / script)], capture_output=True, text=True, timeout=30,
                          env=env(DRY_RUN="1", **variables))
    assert proc.returncode != 0 and message in proc.stderr and not proc.stdout
