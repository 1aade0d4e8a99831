"""Model and optimizer state in one format whatever the strategy.

A checkpoint file (`.pt`) holds the plain model's state dict and torch's own optimizer
state dict (keyed by parameter index), however the run was distributed. Under FSDP the
weights and the optimizer state are sharded: these functions gather them into that format
(every rank calls them: they are collectives; rank 0 receives the result) and scatter it
back from rank 0. A DDP checkpoint so resumes an FSDP run, and the other way round.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from distrain.distributed import Backend

FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)
FROM_RANK0 = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)


def model_state(backend: Backend, model: nn.Module) -> dict:
    """The whole model's state dict on rank 0 (other ranks: under FSDP an empty dict)."""
    raw = backend.unwrap(model)
    if not backend.shards_state:
        return raw.state_dict()
    return get_model_state_dict(raw, options=FULL)  # Distribution: gathers the shards


def optimizer_state(backend: Backend, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """torch's optimizer state dict (by parameter index) of the whole model, on rank 0."""
    if not backend.shards_state:
        return optimizer.state_dict()
    raw = backend.unwrap(model)
    by_name = get_optimizer_state_dict(raw, optimizer, options=FULL)  # Distribution: gathers
    return by_index(by_name, optimizer, raw) if backend.is_main else {}


def load_model_state(backend: Backend, model: nn.Module, state: dict | None) -> None:
    """Rank 0's whole-model `state` into every rank's model (its shard of it under FSDP)."""
    raw = backend.unwrap(model)
    if backend.shards_state:  # Distribution: rank 0 sends each rank its shards
        set_model_state_dict(raw, state if backend.is_main else {}, options=FROM_RANK0)
    else:
        raw.load_state_dict(state)


def load_optimizer_state(backend: Backend, model: nn.Module, optimizer: torch.optim.Optimizer,
                         state: dict | None) -> None:
    """Rank 0's torch optimizer state dict into every rank's (sharded) optimizer."""
    raw = backend.unwrap(model)
    if backend.shards_state:  # Distribution: rank 0 sends each rank its shards
        by_name = by_fqn(state, optimizer, raw) if backend.is_main else {}
        set_optimizer_state_dict(raw, optimizer, by_name, options=FROM_RANK0)
    else:
        optimizer.load_state_dict(state)


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
