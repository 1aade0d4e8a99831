"""Checkpoints: written by global rank 0 only, atomically, read back exactly.

A save goes to a temporary file in the same folder, is flushed and fsync'ed, then
`os.replace`d over the target, so a crash leaves either the old file or the new one,
never half of one. `best.pt` is a hard link to the same bytes as the `last.pt` just
written (a copy where links are not supported), so keeping it costs no second write.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from .config import ConfigError

# Checkpoint keys.
MODEL = "model"
OPTIMIZER = "optimizer"
PRECISION = "precision"
SCHEDULER = "scheduler"
EPOCH = "epoch"  # epochs completed
GLOBAL_STEP = "global_step"  # optimizer steps taken or skipped
TRACKER = "tracker"  # best metric and early-stopping state
STEP_IN_EPOCH = "step_in_epoch"  # > 0: saved mid-epoch, after this many steps of it
RANKS = "ranks"  # one entry per rank: its random streams and its share of the epoch's sums
CONFIG = "config"
WORLD_SIZE = "world_size"
VERSION = "distrain_version"
EMA = "ema"  # the weights' moving average, when train.ema_decay > 0

LAST = "last.pt"
BEST = "best.pt"


def checkpoint_dir(out_dir: str | Path) -> Path:
    return Path(out_dir) / "checkpoints"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # some platforms cannot open folders
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_atomic(state: dict, path: str | Path) -> None:
    """Write `state` to `path` so that readers see the old file or the complete new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file normal permissions
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def link_atomic(src: str | Path, dst: str | Path) -> None:
    """Make `dst` hold the bytes of `src` (hard link, else copy), replacing it atomically."""
    src, dst = Path(src), Path(dst)
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(dst.parent)


def rng_state() -> dict:
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def resolve_resume(resume: str, out_dir: str | Path) -> Path | None:
    """The checkpoint `checkpoint.resume` points to, or None for a fresh start."""
    if resume == "none":
        return None
    if resume == "auto":
        last = checkpoint_dir(out_dir) / LAST
        return last if last.is_file() else None
    path = Path(resume)
    if not path.is_file():
        raise ConfigError(f"checkpoint.resume: expected 'auto', 'none' or an existing checkpoint "
                          f"file, got {resume!r} (no such file)")
    return path


def load(path: str | Path) -> dict:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a truncated or foreign file
        raise ConfigError(f"checkpoint.resume: cannot read checkpoint {path}: {exc}") from None
    missing = [k for k in (MODEL, OPTIMIZER, EPOCH, GLOBAL_STEP) if k not in state]
    if missing:
        raise ConfigError(f"checkpoint.resume: {path} is not a distrain checkpoint "
                          f"(missing {', '.join(missing)})")
    return state
