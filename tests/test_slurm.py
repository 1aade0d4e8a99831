"""launcher/slurm.sbatch: the launch commands it builds from a Slurm allocation (dry runs with
fake SLURM_* variables), and a real job on a one-node Slurm cluster that launcher/slurm-local
installs and starts on this machine (root or sudo, apt; DISTRAIN_SLURM=0 skips that part)."""

import json
import os
import shlex
import shutil
import subprocess
import time

import pytest
import torch
from conftest import ROOT

SBATCH = ROOT / "launcher" / "slurm.sbatch"
SLURM_LOCAL = ROOT / "launcher" / "slurm-local"
# What `sbatch --nodes 2 --ntasks-per-node 2 --cpus-per-task 1` on node01, node02 sets.
TWO_NODES = {"SLURM_JOB_ID": "1234", "SLURM_NNODES": "2", "SLURM_JOB_NODELIST": "node[01-02]",
             "SLURM_NTASKS": "4", "SLURM_NTASKS_PER_NODE": "2", "SLURM_TASKS_PER_NODE": "2(x2)",
             "SLURM_CPUS_ON_NODE": "2", "SLURM_SUBMIT_DIR": str(ROOT)}
TRAIN = ["train", "--config", "configs/digits.yaml", "run.out_dir=runs/slurm-1234",
         "train.epochs=2", "data.args={val_fraction: 0.3}"]


def clean_env(slurm: dict | None = None, **extra: str) -> dict:
    """This environment without any Slurm job or torchrun rank of its own, plus `slurm` and
    `extra`."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "DISTRAIN_", "NPROC_PER_NODE", "RDZV_PORT"))
           and k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update({**(slurm or {}), **extra})
    return env


def dry_run(env: dict, *args: str) -> list[list[str]]:
    out = subprocess.run(["bash", str(SBATCH), *args], capture_output=True, text=True,
                         env={**env, "DISTRAIN_DRY_RUN": "1"}, timeout=60, cwd="/")
    assert out.returncode == 0, out.stderr
    return [shlex.split(line) for line in out.stdout.splitlines()]


def test_torchrun_one_agent_per_node():
    [cmd] = dry_run(clean_env(TWO_NODES), "train.epochs=2", "data.args={val_fraction: 0.3}")
    assert cmd == ["srun", "--nodes=2", "--ntasks=2", "--ntasks-per-node=1", "--cpus-per-task=2",
                   "--kill-on-bad-exit=1", ".venv/bin/distrain", "launch", "--nnodes", "2",
                   "--nproc", "2", "--rdzv-id", "1234", "--rdzv-endpoint", "node01:21234",
                   *TRAIN]


def test_torchrun_gpus_config_port_and_check():
    env = clean_env(TWO_NODES, SLURM_GPUS_ON_NODE="4", SLURM_CPUS_ON_NODE="16",
                    DISTRAIN_CONFIG="configs/imbalanced_digits.yaml", RDZV_PORT="29400",
                    DISTRAIN_CHECK="1")
    check, train = dry_run(env)
    for cmd, sub in ((check, "check"), (train, "train")):
        assert cmd == ["srun", "--nodes=2", "--ntasks=2", "--ntasks-per-node=1",
                       "--cpus-per-task=16", "--kill-on-bad-exit=1", ".venv/bin/distrain",
                       "launch", "--nnodes", "2", "--nproc", "4", "--rdzv-id", "1234",
                       "--rdzv-endpoint", "node01:29400", sub, "--config",
                       "configs/imbalanced_digits.yaml",
                       "run.out_dir=runs/slurm-1234"]
    [cmd] = dry_run({**env, "NPROC_PER_NODE": "3", "DISTRAIN_CHECK": "0"})
    assert cmd[cmd.index("--nproc") + 1] == "3"


def test_horovodrun_hosts_from_the_allocation():
    env = clean_env(TWO_NODES, DISTRAIN_LAUNCHER="horovodrun")
    [cmd] = dry_run(env, "train.epochs=2", "data.args={val_fraction: 0.3}")
    assert cmd == [".venv/bin/distrain", "launch", "--launcher", "horovodrun", "--nproc", "4",
                   "--hosts", "node01:2,node02:2", *TRAIN]


@pytest.mark.parametrize("scontrol", ["scontrol", "without scontrol"])
def test_horovodrun_uneven_node_list(tmp_path, scontrol, request):
    env = clean_env(TWO_NODES, DISTRAIN_LAUNCHER="horovodrun", SLURM_NNODES="5",
                    SLURM_JOB_NODELIST="a1,gpu[001-002,010],b", SLURM_TASKS_PER_NODE="2(x3),1(x2)",
                    SLURM_NTASKS="8")
    if scontrol != "scontrol":  # a machine without Slurm: the script expands the list itself
        for tool in ("bash", "dirname", "id"):
            (tmp_path / tool).symlink_to(shutil.which(tool))
        env["PATH"] = str(tmp_path)
    elif shutil.which("scontrol") is None:
        request.getfixturevalue("slurm_cluster")  # installs it
    [cmd] = dry_run(env)
    assert cmd[cmd.index("--nproc") + 1] == "8"
    assert cmd[cmd.index("--hosts") + 1] == "a1:2,gpu001:2,gpu002:2,gpu010:1,b:1"


@pytest.mark.parametrize("oversubscribe", [False, True])
def test_mpirun(oversubscribe):
    env = clean_env(TWO_NODES, DISTRAIN_LAUNCHER="mpirun",
                    DISTRAIN_OVERSUBSCRIBE="1" if oversubscribe else "0")
    [cmd] = dry_run(env, "train.epochs=2", "data.args={val_fraction: 0.3}")
    assert cmd == [".venv/bin/distrain", "launch", "--launcher", "mpirun", "--nproc", "4",
                   *(["--oversubscribe"] if oversubscribe else []), *TRAIN]


def test_mpi_ranks_started_by_srun_pmix():
    env = clean_env(TWO_NODES, DISTRAIN_LAUNCHER="mpirun", DISTRAIN_MPI_STARTER="srun")
    [cmd] = dry_run(env, "train.epochs=2", "data.args={val_fraction: 0.3}")
    assert cmd == ["srun", "--mpi=pmix", "--ntasks=4", ".venv/bin/distrain", *TRAIN]


def test_mistakes_are_one_clear_line():
    env = clean_env(TWO_NODES, DISTRAIN_LAUNCHER="deepspeed", DISTRAIN_DRY_RUN="1")
    out = subprocess.run(["bash", str(SBATCH)], capture_output=True, text=True, env=env)
    assert out.returncode == 2
    assert "DISTRAIN_LAUNCHER must be torchrun, horovodrun or mpirun, got 'deepspeed'" in out.stderr
    out = subprocess.run(["bash", str(SBATCH)], capture_output=True, text=True, env=clean_env())
    assert out.returncode != 0 and "SLURM_JOB_ID is unset: submit with sbatch" in out.stderr
    # A dry run outside Slurm shows a one-node job on this host, and says what it assumed.
    out = subprocess.run(["bash", str(SBATCH)], capture_output=True, text=True,
                         env=clean_env(DISTRAIN_DRY_RUN="1"))
    assert out.returncode == 0 and "--nproc 2" in out.stdout
    assert "not under Slurm; showing the command for SLURM_JOB_ID=1" in out.stderr


# --- a real Slurm cluster on this machine -----------------------------------------------------

@pytest.fixture(scope="session")
def slurm_cluster():
    """Install (first time only, ~1 min of apt) and start a one-node Slurm cluster; stop it
    afterwards when this session started it."""
    if os.environ.get("DISTRAIN_SLURM") == "0":
        pytest.skip("DISTRAIN_SLURM=0: no local Slurm cluster")
    was_up = subprocess.run([str(SLURM_LOCAL), "status"], capture_output=True).returncode == 0
    out = subprocess.run([str(SLURM_LOCAL)], capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, f"launcher/slurm-local failed:\n{out.stdout}\n{out.stderr}"
    yield
    if not was_up:
        subprocess.run([str(SLURM_LOCAL), "stop"], capture_output=True, timeout=60)


def test_slurm_local_is_idempotent(slurm_cluster):
    start = time.monotonic()
    out = subprocess.run([str(SLURM_LOCAL)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "already running" in out.stdout, out.stderr
    assert time.monotonic() - start < 10


def wait_for(job: str, timeout: float) -> str:
    """The job's final state (sbatch --wait polls with back-off up to 32 s: too slow here)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        out = subprocess.run(["scontrol", "show", "job", "-o", job], capture_output=True, text=True)
        state = next((f.split("=", 1)[1] for f in out.stdout.split() if f.startswith("JobState=")),
                     "UNKNOWN")
        if state not in ("PENDING", "CONFIGURING", "RUNNING", "COMPLETING"):
            return state
        time.sleep(0.5)
    subprocess.run(["scancel", job])
    raise AssertionError(f"Slurm job {job} still {state} after {timeout} s")


def test_sbatch_trains_digits_on_two_ranks(slurm_cluster, tmp_path):
    env = clean_env(NPROC_PER_NODE="2", DISTRAIN_CHECK="1")
    out = subprocess.run(["sbatch", "--parsable", f"--output={tmp_path}/slurm-%j.out",
                          str(SBATCH), "train.epochs=2", f"run.out_dir={tmp_path / 'run'}",
                          "checkpoint.resume=none"],
                         capture_output=True, text=True, env=env, cwd=ROOT, timeout=60)
    assert out.returncode == 0, out.stderr
    job = out.stdout.strip().split(";")[0]
    state = wait_for(job, timeout=120)
    log = (tmp_path / f"slurm-{job}.out").read_text()
    assert state == "COMPLETED", log[-3000:]
    # DISTRAIN_CHECK=1 printed where each rank ran; the checkpoint says the same.
    assert "rank 0 local_rank 0 host" in log and "rank 1 local_rank 1 host" in log, log[-3000:]
    assert "rank 2 " not in log
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows if "val_acc" in r] == [1, 2]
    assert rows[-1]["val_acc"] > 0.7
    last = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=False)
    assert last["world_size"] == 2
