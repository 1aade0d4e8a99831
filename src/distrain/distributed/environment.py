"""Which launcher started this process, read from its environment alone (no process group).

The launcher (torchrun, horovodrun, mpirun/srun, none) is kept apart from the strategy that
syncs the gradients (DDP, Horovod): `detect_launcher` says who started us, the backends use
it to choose and to bootstrap (DDP under plain mpirun reads its ranks from MPI).
"""

from __future__ import annotations

import os

TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
HOROVOD_ENV = ("HOROVOD_RANK",)
MPI_RANK_ENV = ("OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK")
RANK_VARIABLES = ("RANK", "HOROVOD_RANK", *MPI_RANK_ENV)


def under_torchrun() -> bool:
    """torchrun's env:// variables are all set (also by a launcher that imitates it)."""
    return all(k in os.environ for k in TORCHRUN_ENV)


def under_horovodrun() -> bool:
    return any(k in os.environ for k in HOROVOD_ENV)


def under_mpi() -> bool:
    return any(k in os.environ for k in MPI_RANK_ENV)


def detect_launcher() -> str:
    """torchrun, horovodrun, mpirun (plain MPI or srun with PMI) or none, in that order."""
    if under_torchrun():
        return "torchrun"
    if under_horovodrun():
        return "horovodrun"
    if under_mpi():
        return "mpirun"
    return "none"


def launcher_rank() -> int:
    """This process's rank as the launcher (torchrun, horovodrun, mpirun) set it, else 0."""
    for key in RANK_VARIABLES:
        if key in os.environ:
            return int(os.environ[key])
    return 0
