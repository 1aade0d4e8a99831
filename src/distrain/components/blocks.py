"""A model's repeated blocks (model.blocks), and activation checkpointing per block.

A block is the unit FSDP shards and gathers (one all-gather of its weights before its
forward, one reduce-scatter of its gradients after its backward) and the unit whose
activations `train.activation_checkpointing` recomputes in backward instead of keeping.
"""

from __future__ import annotations

import difflib
import functools
from typing import Callable

from torch import nn
from torch.utils.checkpoint import checkpoint

from distrain.components.registry import call_plugin, resolve
from distrain.errors import ConfigError


def find_blocks(model: nn.Module, spec: list[str] | Callable | None = None) -> list[nn.Module]:
    """The blocks of `model`: `spec` is a list of class names, one `package.module:fn`
    (or a callable) taking the model and returning its blocks, or empty for the default:
    the children of every nn.ModuleList, else the top-level children holding parameters."""
    if callable(spec):
        return _checked(list(spec(model)), model, getattr(spec, "__name__", "model.blocks"))
    spec = list(spec or [])
    if len(spec) == 1 and ":" in spec[0]:
        fn = resolve("blocks", spec[0], {}, key="model.blocks")
        found = call_plugin("model.blocks", spec[0], fn, model)
        return _checked(list(found), model, spec[0])
    if spec:
        names = set(spec)
        blocks = [m for m in model.modules() if type(m).__name__ in names and m is not model]
        seen = {type(m).__name__ for m in blocks}
        if names - seen:
            present = sorted({type(m).__name__ for m in model.modules()})
            missing = sorted(names - seen)
            close = difflib.get_close_matches(missing[0], present, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise ConfigError(f"model.blocks: no module of class {', '.join(missing)} in the "
                              f"model; {hint}its classes are {', '.join(present)}")
        return _outermost(blocks)
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList)]
    blocks = [child for lst in lists for child in lst]
    if not blocks:
        blocks = [child for child in model.children() if any(True for _ in child.parameters())]
    return _outermost([b for b in blocks if any(True for _ in b.parameters())])


def _outermost(blocks: list[nn.Module]) -> list[nn.Module]:
    """Drop blocks nested inside other blocks (each parameter belongs to one unit)."""
    inner = {id(sub) for b in blocks for sub in b.modules() if sub is not b}
    return [b for b in blocks if id(b) not in inner]


def _checked(blocks: list, model: nn.Module, where: str) -> list[nn.Module]:
    owned = {id(m) for m in model.modules()}
    for b in blocks:
        if not isinstance(b, nn.Module) or id(b) not in owned or b is model:
            raise ConfigError(f"model.blocks: {where} returned {type(b).__name__}, expected "
                              "submodules of the model (not the model itself)")
    return _outermost(blocks)


def checkpoint_activations(blocks: list[nn.Module]) -> None:
    """Each block's forward keeps only its inputs and recomputes the rest in backward (torch's
    non-reentrant checkpoint; random streams such as dropout's are replayed exactly). The
    module tree and its state dict are unchanged (no wrapper module, no renamed keys)."""
    if not blocks:
        raise ConfigError("train.activation_checkpointing: the model has no blocks to "
                          "recompute (no nn.ModuleList, no child with weights); name them in "
                          "model.blocks (Engine(strategy=distrain.DDP(blocks=...)))")
    for block in blocks:
        if getattr(block, "_distrain_checkpointed", False):
            continue
        forward = block.forward
        block.forward = functools.partial(checkpoint, forward, use_reentrant=False)
        block._distrain_checkpointed = True
