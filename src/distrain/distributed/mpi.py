"""Bootstrap torch.distributed from MPI, for clusters that start jobs with mpirun or srun."""

from __future__ import annotations

import os
import socket

from distrain.errors import ConfigError


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def mpi_env() -> dict[str, str]:
    """torchrun's variables from the MPI communicator: rank and size from COMM_WORLD, the local
    rank from the shared-memory sub-communicator, rank 0's address and a free port of rank 0's
    broadcast to all (MASTER_ADDR/MASTER_PORT already set by the user win)."""
    try:
        from mpi4py import MPI
    except ImportError:
        raise ConfigError("backend: 'torchrun' under mpirun needs mpi4py "
                          "(pip install mpi4py, or re-run ./launcher/setup)") from None
    world = MPI.COMM_WORLD
    node = world.Split_type(MPI.COMM_TYPE_SHARED)
    master = None
    if world.Get_rank() == 0:
        addr = os.environ.get("MASTER_ADDR") or socket.gethostbyname(socket.gethostname())
        master = (addr, os.environ.get("MASTER_PORT") or str(_free_port()))
    addr, port = world.bcast(master, root=0)
    env = {"RANK": str(world.Get_rank()), "WORLD_SIZE": str(world.Get_size()),
           "LOCAL_RANK": str(node.Get_rank()), "LOCAL_WORLD_SIZE": str(node.Get_size()),
           "MASTER_ADDR": addr, "MASTER_PORT": port}
    node.Free()
    return env
