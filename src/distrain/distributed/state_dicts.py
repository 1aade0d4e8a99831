"""Model and optimizer state in one format whatever the strategy: helpers for the strategies.

A checkpoint file (`.pt`) holds the plain model's state dict and torch's own optimizer
state dict (keyed by parameter index), however the run was distributed. Each strategy's
`Backend.module_state`/`load_module_state` (and the optimizer's) produce and take that
format; FSDP's gather the shards with torch.distributed.checkpoint's state-dict functions
(keyed by parameter name: converted here) and scatter them back from rank 0. A DDP
checkpoint so resumes an FSDP run, and the other way round.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions

FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)
FROM_RANK0 = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)


def _names(optimizer: torch.optim.Optimizer, model: nn.Module) -> list[str]:
    """The parameters' names in the optimizer's order (its state dict's indices)."""
    name_of = {id(p): n for n, p in model.named_parameters()}
    return [name_of[id(p)] for group in optimizer.param_groups for p in group["params"]]


def by_index(state: dict, optimizer: torch.optim.Optimizer, model: nn.Module) -> dict:
    """A state dict keyed by parameter names (torch.distributed.checkpoint's) as torch's own."""
    index = {n: i for i, n in enumerate(_names(optimizer, model))}
    groups = [{**g, "params": [index[n] for n in g["params"]]} for g in state["param_groups"]]
    return {"state": {index[n]: v for n, v in state["state"].items()}, "param_groups": groups}


def by_fqn(state: dict, optimizer: torch.optim.Optimizer, model: nn.Module) -> dict:
    """torch's optimizer state dict (by index) keyed by parameter names instead."""
    names = _names(optimizer, model)
    groups = [{**g, "params": [names[i] for i in g["params"]]} for g in state["param_groups"]]
    return {"state": {names[i]: v for i, v in state["state"].items()}, "param_groups": groups}


def sharded_entry(obj: object, where: str = "") -> str | None:
    """The key path of the first DTensor (one rank's FSDP shard) inside nested dicts, lists
    and tuples, with its local and whole shapes; None when there is none."""
    from torch.distributed.tensor import DTensor

    if isinstance(obj, DTensor):
        return (f"{where or 'the object'} (this rank's {tuple(obj.to_local().shape)} of "
                f"{tuple(obj.shape)})")
    items = obj.items() if isinstance(obj, dict) else \
        enumerate(obj) if isinstance(obj, (list, tuple)) else ()
    for key, value in items:
        if (found := sharded_entry(value, f"{where}[{key!r}]")) is not None:
            return found
    return None


def refuse_shards(obj: object, who: str) -> None:
    """MisuseError where `obj` (something to torch.save on rank 0) holds an FSDP shard."""
    from distrain.errors import MisuseError

    if (shard := sharded_entry(obj)) is not None:
        raise MisuseError(f"{who}: {shard} is an FSDP shard: rank 0 would save its part of "
                          f"the model only; save eng.model_state_dict() instead (every rank "
                          f"calls it: it gathers the shards), or eng.save_checkpoint() for "
                          f"the training state")
