"""The collective contract every backend must meet, as a plain function run on each rank
(tests/test_backends.py runs it in-process, under gloo process groups and under horovodrun)."""

from __future__ import annotations

import sys

import torch

from distrain.distributed import create_backend
from distrain.distributed.backend import OPS


def contract(name: str = "auto") -> dict:
    """Every collective and op with rank-dependent inputs; what this rank got back."""
    b = create_backend(name)
    b.setup()
    try:
        r, w = b.rank, b.world_size
        out: dict = {"rank": r, "world_size": w, "backend": b.name}
        for op in OPS:
            t = torch.tensor([float(r + 1), float(-r)])
            out[op] = b.all_reduce(t.clone(), op).tolist()
            out[f"{op} async"] = b.all_reduce_async(t.clone(), op)().tolist()
        out["broadcast from 0"] = b.broadcast(torch.tensor([float(r)]), 0).tolist()
        out["broadcast from last"] = b.broadcast(torch.tensor([float(r)]), w - 1).tolist()
        out["object from 0"] = b.broadcast_object({"from": r}, 0)
        out["object from last"] = b.broadcast_object({"from": r}, w - 1)
        out["gather"] = b.all_gather_object(r * 10)
        b.barrier()
        module = torch.nn.Linear(2, 2)
        with torch.no_grad():
            module.weight.fill_(float(r))
        b.broadcast_module(module)
        out["module"] = module.weight.sum().item()
        return out
    finally:
        b.teardown()


def expected(w: int) -> dict:
    sums = [w * (w + 1) / 2, -w * (w - 1) / 2]
    values = {"sum": sums, "mean": [sums[0] / w, sums[1] / w], "max": [float(w), 0.0],
              "min": [1.0, -(w - 1.0)]}
    out = {"world_size": w, "broadcast from 0": [0.0], "broadcast from last": [w - 1.0],
           "object from 0": {"from": 0}, "object from last": {"from": w - 1},
           "gather": [10 * r for r in range(w)], "module": 0.0}
    for op, v in values.items():
        out[op] = out[f"{op} async"] = v
    return out


if __name__ == "__main__":  # horovodrun -np 2 python tests/backend_contract.py OUT_PREFIX
    result = contract("horovod")
    torch.save(result, f"{sys.argv[1]}.rank{result['rank']}.pt")
