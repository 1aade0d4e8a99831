"""`distrain launch`: one command for every launcher.

    distrain launch train --config configs/digits.yaml           # torchrun, GPUs or 2 CPU procs
    distrain launch --nproc 4 --max-restarts 2 train --config F  # a failed group restarts, resumes
    distrain launch --launcher horovodrun train --config F       # Horovod's allreduce (or mpirun)
    distrain launch --nproc 3 examples/own_loop.py --out runs/x  # your own script, any launcher
    distrain launch --nnodes 2 --rdzv-endpoint node0:29500 train ...   # on each node (torchrun)
    distrain launch --launcher mpirun --hosts node0:4,node1:4 train ...  # from one node
    distrain launch --dry-run ...                                # print the command, run nothing

What it adds to the launcher's own command: one thread per process (OMP_NUM_THREADS=1
unless set), OpenMPI's root switches when run as root, `--oversubscribe` for mpirun on this
host alone, this environment's python and torchrun, and under torchrun the workers' own
exit status (0; 2 a config error; 75 preempted: launch again to resume), not torchrun's 1
and its page of traceback (horovodrun and mpirun report their own). Everything after the options is the job: a distrain command (train, check,
evaluate, predict) or a Python script and its arguments.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

from distrain.errors import ConfigError

LAUNCHERS = ("torchrun", "horovodrun", "mpirun")
COMMANDS = ("train", "check", "evaluate", "predict")
ROOT_SWITCHES = {"OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"}


@dataclass
class Launch:
    """The command to run and the variables it adds to this environment."""

    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)

    def line(self) -> str:
        """One line to copy into a shell."""
        return shlex.join([*(f"{k}={v}" for k, v in self.env.items()), *self.argv])


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="distrain launch", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--launcher", default="torchrun", help="torchrun (default), horovodrun or "
                   "mpirun (Horovod over MPI when installed, else DDP bootstrapped from MPI)")
    p.add_argument("--nproc", default="auto", help="processes (torchrun: per node); auto: one "
                   "per visible GPU, else 2; with --hosts: the sum of their slots")
    p.add_argument("--max-restarts", type=int, default=0, help="torchrun: restart a failed "
                   "group up to K times; it resumes from the newest checkpoint")
    p.add_argument("--hosts", default=None, help="horovodrun, mpirun: host:slots,host:slots "
                   "(ranks started over ssh from here); default: this host")
    p.add_argument("--controller", choices=("gloo", "mpi"), default=None,
                   help="horovodrun's controller (default: its own choice)")
    p.add_argument("--oversubscribe", action="store_true",
                   help="mpirun: allow more ranks than a host has cores (local: automatic)")
    p.add_argument("--nnodes", default=None, help="torchrun: nodes (or MIN:MAX, elastic); "
                   "start the same command on each node")
    p.add_argument("--rdzv-endpoint", default=None, help="torchrun with --nnodes: host:port "
                   "every node reaches (usually node 0's)")
    p.add_argument("--rdzv-id", default="distrain", help="torchrun: the job's rendezvous id")
    p.add_argument("--rdzv-backend", default="c10d", help="torchrun: c10d (default) or static")
    p.add_argument("--node-rank", default=None, help="torchrun: this node's rank (static "
                   "rendezvous; c10d orders the nodes itself)")
    p.add_argument("--dry-run", action="store_true", help="print the command, run nothing")
    p.add_argument("job", nargs=argparse.REMAINDER, metavar="JOB",
                   help="a distrain command (train --config F [overrides]) or a script and "
                        "its arguments")
    return p


def plan(args: argparse.Namespace, python: str = sys.executable,
         gpus: int | None = None, root: bool | None = None) -> Launch:
    """The command for `args` (ConfigError naming the option and the fix on a mistake)."""
    bindir = Path(python).parent
    root = os.geteuid() == 0 if root is None else root
    job = _job(args.job)
    slots = _hosts(args.hosts) if args.hosts else None
    nproc = _nproc(args.nproc, slots, gpus)
    env = {} if "OMP_NUM_THREADS" in os.environ else {"OMP_NUM_THREADS": "1"}
    if args.launcher not in LAUNCHERS:
        raise ConfigError(f"--launcher: expected {', '.join(LAUNCHERS)}, got {args.launcher!r}")
    if args.launcher != "torchrun":
        torchrun_only = [f"--{k.replace('_', '-')}" for k in ("nnodes", "rdzv_endpoint",
                         "node_rank") if getattr(args, k) is not None]
        if args.max_restarts:
            torchrun_only.append("--max-restarts")
        if torchrun_only:
            raise ConfigError(f"{torchrun_only[0]}: torchrun only ({args.launcher} does not "
                              f"restart a failed job or meet at a rendezvous); use "
                              f"--launcher torchrun, or --hosts for {args.launcher}'s nodes")
    if args.launcher == "torchrun":
        if args.hosts or args.controller or args.oversubscribe:
            raise ConfigError("--hosts, --controller, --oversubscribe: horovodrun and mpirun "
                              "only; torchrun starts one agent per node (--nnodes N "
                              "--rdzv-endpoint host:port on each)")
        return Launch(_torchrun(args, bindir, nproc, job, python), env)
    if args.launcher == "horovodrun":
        if args.oversubscribe:
            raise ConfigError("--oversubscribe: mpirun only (horovodrun runs -H's slots)")
        exe = bindir / "horovodrun"
        if not exe.exists():
            raise ConfigError(f"--launcher horovodrun: Horovod is not installed in {bindir.parent}"
                              f"; set up with Horovod (./launcher/setup builds it unless "
                              f"DISTRAIN_HOROVOD=0), or use --launcher torchrun")
        argv = [str(exe), "-np", str(nproc), "-H", args.hosts or f"localhost:{nproc}"]
        argv += [f"--{args.controller}"] if args.controller else []
        return Launch([*argv, *_python_job(job, python)], {**env, **(ROOT_SWITCHES if root else {})})
    if args.controller:
        raise ConfigError("--controller: horovodrun only (mpirun is its own controller)")
    mpirun = shutil.which("mpirun")
    if mpirun is None:
        raise ConfigError("--launcher mpirun: no mpirun on PATH; install OpenMPI (apt-get "
                          "install openmpi-bin) or use --launcher torchrun")
    # --bind-to none: OpenMPI pins each rank to one core by default for small jobs, which
    # starves the data loading threads; --map-by slot fills a host before the next.
    argv = ["mpirun", "-np", str(nproc), "--bind-to", "none", "--map-by", "slot"]
    argv += ["-H", args.hosts] if args.hosts else []
    # On this host alone (no --hosts, no Slurm allocation) any number of ranks may share its
    # cores: OpenMPI counts physical cores in the cgroup's cpuset, which Python cannot see.
    alone = not args.hosts and "SLURM_JOB_NODELIST" not in os.environ
    if args.oversubscribe or alone:
        argv.append("--oversubscribe")
    argv += ["-x", "OMP_NUM_THREADS"]  # the job's python is named by its path: no PATH
    return Launch([*argv, *_python_job(job, python)], {**env, **(ROOT_SWITCHES if root else {})})


def _job(words: list[str]) -> list[str]:
    words = words[1:] if words[:1] == ["--"] else words
    if not words:
        raise ConfigError("distrain launch: nothing to run; add a job: train --config F "
                          "[overrides], or a script and its arguments")
    first = words[0]
    if first.endswith(".py") and not Path(first).is_file():
        raise ConfigError(f"distrain launch: no script {first!r} (from {os.getcwd()})")
    if first in COMMANDS or Path(first).is_file():
        return words
    if first.startswith("-"):
        raise ConfigError(f"distrain launch: unknown option {first!r}; see distrain launch "
                          f"--help")
    raise ConfigError(f"distrain launch: {first!r} is neither a distrain command "
                      f"({', '.join(COMMANDS)}) nor a script file")


def _hosts(text: str) -> list[int]:
    slots = []
    for entry in text.split(","):
        host, _, count = entry.partition(":")
        if not host or not count.isdigit() or int(count) < 1:
            raise ConfigError(f"--hosts: entry {entry!r} is not host:slots (e.g. "
                              f"node0:4,node1:4)")
        slots.append(int(count))
    return slots


def _nproc(text: str, slots: list[int] | None, gpus: int | None) -> int:
    if text == "auto":
        if slots:
            return sum(slots)
        if gpus is None:  # no GPU driver (NVIDIA, ROCm, WSL2): spare torch's import
            gpus = 0
            if any(Path(p).exists() for p in ("/proc/driver/nvidia", "/dev/nvidia0",
                                              "/dev/kfd", "/dev/dxg")):
                import torch

                gpus = torch.cuda.device_count()
        return gpus or 2
    if not text.isdigit() or int(text) < 1:
        raise ConfigError(f"--nproc: expected a number of processes >= 1 or auto, got {text!r}")
    return int(text)


def _torchrun(args, bindir: Path, nproc: int, job: list[str], python: str) -> list[str]:
    argv = [python, "-m", "distrain.commands.agent_status", str(bindir / "torchrun")]
    if args.nnodes is None:
        if args.rdzv_endpoint or args.node_rank is not None:
            raise ConfigError("--rdzv-endpoint, --node-rank: for a job over nodes; add "
                              "--nnodes N (one process per node runs this same command)")
        argv.append("--standalone")
    else:
        if not args.rdzv_endpoint:
            raise ConfigError("--nnodes: needs --rdzv-endpoint host:port, reachable from every "
                              "node (usually node 0's)")
        argv += ["--nnodes", args.nnodes, "--rdzv-backend", args.rdzv_backend,
                 "--rdzv-endpoint", args.rdzv_endpoint, "--rdzv-id", args.rdzv_id]
        argv += ["--node-rank", args.node_rank] if args.node_rank is not None else []
    argv += ["--nproc-per-node", str(nproc), "--max-restarts", str(args.max_restarts)]
    return [*argv, *(["-m", "distrain", *job] if job[0] in COMMANDS else job)]


def _python_job(job: list[str], python: str) -> list[str]:
    return [python, "-m", "distrain", *job] if job[0] in COMMANDS else [python, *job]


def main(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    try:
        launch = plan(args)
    except ConfigError as exc:
        print(f"distrain: config error: {exc}", file=sys.stderr)
        return 2
    if args.dry_run:
        print(launch.line())
        return 0
    sys.stdout.flush()
    os.execve(launch.argv[0] if os.path.isabs(launch.argv[0]) else shutil.which(launch.argv[0]),
              launch.argv, {**os.environ, **launch.env})
    return 0  # not reached
