"""`distrain export RUN_DIR -o model.safetensors`: one consolidated weights file of a run.

From a one-file checkpoint (one process, DDP, Horovod) or a sharded one (FSDP, read here
in one process without a process group), best by default; the file loads into the plain
model with `model.load_state_dict(safetensors.torch.load_file(path), strict=True)`.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors.torch import save_file

from distrain import __version__
from distrain.components.checkpoint import files as ckpt
from distrain.components.checkpoint import sharded
from distrain.errors import ConfigError

NAMES = ("best", "last")  # --checkpoint shorthands, found in <RUN_DIR>/checkpoints


def find_checkpoint(run_dir: str | Path, choice: str | None = None) -> Path:
    """The checkpoint `choice` names (a path, best, last or a step file's name in the run's
    checkpoints folder; default best, else last), verified against its marker."""
    folder = ckpt.checkpoint_dir(run_dir)
    if choice and Path(choice).exists():
        candidates = [Path(choice)]
    else:
        stems = [choice] if choice else list(NAMES)
        candidates = [folder / f"{stem}{suffix}" for stem in stems
                      for suffix in ("", ".pt", sharded.SUFFIX)]
    found = next((p for p in candidates if p.exists() and (p.is_file() or p.suffix == ".dcp")),
                 None)
    if found is None:
        what = f"--checkpoint {choice!r}" if choice else f"RUN_DIR {str(run_dir)!r}"
        raise ConfigError(f"{what}: no checkpoint found (looked for "
                          f"{', '.join(str(p) for p in candidates[:4])}...); pass the run's "
                          "folder (run.out_dir) or --checkpoint with a checkpoint path")
    if found.with_name(found.name + ckpt.DONE).is_file() or found.is_dir():
        problem = ckpt.verify(found)
        if problem:
            raise ConfigError(f"--checkpoint: {found}: {problem}")
    return found


def model_weights(path: Path) -> dict[str, torch.Tensor]:
    if path.is_dir():
        return sharded.model_weights(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ConfigError(f"--checkpoint: cannot read {path}: {exc}") from None
    if not isinstance(state, dict) or ckpt.MODEL not in state:
        raise ConfigError(f"--checkpoint: {path} holds no model weights (not a distrain "
                          "checkpoint)")
    return state[ckpt.MODEL]


def export(run_dir: str | Path, output: str | Path, choice: str | None = None) -> Path:
    """Write the chosen checkpoint's weights to `output` (safetensors); returns the source."""
    source = find_checkpoint(run_dir, choice)
    weights, seen = {}, set()
    for name, tensor in model_weights(source).items():
        tensor = tensor.detach().cpu().contiguous()
        # safetensors refuses tensors sharing memory (tied weights): each gets its own copy.
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset())
        weights[name] = tensor.clone() if key in seen else tensor
        seen.add(key)
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(f".{output.name}.tmp")
    save_file(weights, str(tmp), metadata={"source": str(source), "distrain": __version__})
    os.chmod(tmp, 0o666 & ~ckpt._umask())  # safetensors writes 0600; give it normal permissions
    tmp.replace(output)  # a failed export leaves an earlier file whole
    return source
