"""Which launcher started this process, read from its environment alone (no process group)."""

from __future__ import annotations

import os

RANK_VARIABLES = ("RANK", "HOROVOD_RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK")


def launcher_rank() -> int:
    """This process's rank as the launcher (torchrun, horovodrun, mpirun) set it, else 0."""
    for key in RANK_VARIABLES:
        if key in os.environ:
            return int(os.environ[key])
    return 0
