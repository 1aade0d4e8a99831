"""Sharded checkpoints (dist.strategy=fsdp): one folder per save, every rank writes its shard.

    checkpoints/step-00000120.dcp/      torch.distributed.checkpoint's files:
        __0_0.distcp, __1_0.distcp       each rank's shard of the model and optimizer state
        .metadata                        which bytes of which tensor are where (rank 0)
        host.pt                          the rest (counters, schedule, random streams; rank 0)
    checkpoints/step-00000120.dcp.done  the completion marker: size and hash of every file

distrain's integrity story carries over from single files (checkpoint.py): the files are
written into a temporary folder; each rank hashes its own shard, in parallel; rank 0
renames the folder into place and writes the marker last, once every rank's hash has
arrived, so a folder without a matching marker never counts. `last.dcp` and `best.dcp`
are folders of hard links to a step folder's files, `checkpoint.keep_last` step folders
are kept, resuming skips a newest folder that does not verify. torch.distributed.checkpoint
reshards on load: a run resumes on another number of processes, or under DDP or one
process (every rank then reads the whole state; all ranks need to see the same folder).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import warnings
from pathlib import Path
from typing import Iterator

import torch
import torch.distributed.checkpoint as dcp
import xxhash
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from . import checkpoint as ckpt
from .backends import Backend

SUFFIX = ".dcp"
HOST = "host.pt"  # inside a sharded checkpoint: the state that is not sharded
LAST = "last" + SUFFIX
BEST = "best" + SUFFIX


def _hash_file(path: Path) -> dict:
    digest, size = xxhash.xxh3_128(), 0
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
            size += len(block)
    return {"bytes": size, ckpt.HASH: digest.hexdigest()}


def save(backend: Backend, model: nn.Module, optimizer: torch.optim.Optimizer, host: dict,
         folder: Path, write_last: bool, write_best: bool, keep_last: int,
         parts: dict | None = None) -> None:
    """Every rank calls this (collective); `parts`: more sharded tensors by key (the EMA's).
    CheckpointError if the write fails; the earlier checkpoints are untouched."""
    name = f"step-{host[ckpt.GLOBAL_STEP]:08d}{SUFFIX}" if write_last else BEST
    target, tmp = folder / name, folder / f".{name}.tmp"
    if backend.is_main:
        with backend.main_only("clearing a stale temporary checkpoint folder"):
            folder.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)  # left by a save that died
    backend.barrier()  # Distribution: nobody writes into the folder before it is clean
    msd, osd = get_state_dict(backend.unwrap(model), optimizer)  # this rank's shards, no copy
    try:
        dcp.save({ckpt.MODEL: msd, ckpt.OPTIMIZER: osd, **(parts or {})},
                 checkpoint_id=tmp)  # collective
        files = {f.name: _hash_file(f) for f in tmp.glob(f"__{backend.rank}_*.distcp")}
        if backend.is_main:
            with backend.main_only("checkpoint host state"):
                files[".metadata"] = _hash_file(tmp / ".metadata")
                files[HOST] = ckpt.save_atomic(ckpt.on_cpu(host), tmp / HOST)
        error = None
    except Exception as exc:  # every rank learns of it below, so no rank hangs
        files, error = {}, f"{type(exc).__name__}: {exc}"
    everyone = backend.all_gather_object((files, error))  # Distribution: every shard is hashed
    errors = [f"rank {r}: {e}" for r, (_, e) in enumerate(everyone) if e]
    if errors:
        if backend.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise ckpt.CheckpointError(f"cannot write checkpoint {target}: {'; '.join(errors)}; "
                                   "the earlier checkpoints are untouched")
    if not backend.is_main:
        return
    with backend.main_only("checkpoint publish"):
        manifest = {"files": {k: v for f, _ in everyone for k, v in f.items()}}
        try:
            _publish(tmp, target, manifest)
            links = [LAST] * write_last + [BEST] * (write_best and write_last)
            for link in links:
                _link_folder(target, folder / link, manifest)
        except OSError as exc:
            raise ckpt.CheckpointError(f"cannot write checkpoint {target}: {exc}; the earlier "
                                       "checkpoints are untouched") from None
        for old in ckpt.step_files(folder)[keep_last:]:
            if old.suffix == SUFFIX:
                old.with_name(old.name + ckpt.DONE).unlink(missing_ok=True)
                shutil.rmtree(old, ignore_errors=True)


def _publish(tmp: Path, target: Path, manifest: dict) -> None:
    """`tmp` becomes `target` (a marker first removed, written again last)."""
    target.with_name(target.name + ckpt.DONE).unlink(missing_ok=True)
    if target.exists():  # best.dcp saved again, or a step saved again after a restart
        old = target.with_name(f".{target.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(target, old)
        shutil.rmtree(old, ignore_errors=True)
    os.replace(tmp, target)
    ckpt._fsync_dir(target.parent)
    ckpt.write_marker(target, manifest)


def _link_folder(src: Path, dst: Path, manifest: dict) -> None:
    """`dst` a folder of hard links to `src`'s files (copies where links fail), with its marker."""
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    for f in src.iterdir():
        try:
            os.link(f, tmp / f.name)
        except OSError:
            shutil.copyfile(f, tmp / f.name)
    _publish(tmp, dst, manifest)


def verify(path: Path, manifest: dict) -> str | None:
    """None when every file of the folder `path` matches `manifest`, else what is wrong."""
    for name, expected in manifest["files"].items():
        f = path / name
        if not f.is_file():
            return f"{name} is missing"
        found = _hash_file(f)
        if found["bytes"] != expected["bytes"]:
            return f"{name}: {found['bytes']} bytes on disk, {expected['bytes']} written (truncated)"
        if found[ckpt.HASH] != expected[ckpt.HASH]:
            return f"{name}: {ckpt.HASH} mismatch (corrupt)"
    return None


def load_host(path: Path) -> dict:
    """The state of a sharded checkpoint that is not sharded (every rank may read it)."""
    return ckpt.load(path / HOST, required=(ckpt.EPOCH, ckpt.GLOBAL_STEP))


def load(backend: Backend, model: nn.Module, optimizer: torch.optim.Optimizer, path: Path,
         parts: dict | None = None) -> None:
    """The weights and optimizer state of the sharded checkpoint `path` into this run's
    model and optimizer (and `parts`' tensors, in place), whatever its strategy and number
    of processes (every rank reads its part; under DDP or one process each rank reads the
    whole state)."""
    raw = backend.unwrap(model)
    msd, osd = get_state_dict(raw, optimizer)
    state = {ckpt.MODEL: msd, ckpt.OPTIMIZER: osd, **(parts or {})}
    try:
        with _single_process_is_intended():
            dcp.load(state, checkpoint_id=path)  # Distribution: collective under a group
    except Exception as exc:
        raise ckpt.ConfigError(f"checkpoint.resume: cannot read sharded checkpoint {path}: "
                               f"{str(exc).splitlines()[0]}") from None
    set_state_dict(raw, optimizer, model_state_dict=state[ckpt.MODEL],
                   optim_state_dict=state[ckpt.OPTIMIZER])


def model_weights(path: Path) -> dict[str, torch.Tensor]:
    """The whole model's weights of the sharded checkpoint `path`, read in this one process
    without a model or a process group (distrain export)."""
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict_from_keys

    with _single_process_is_intended():
        state = _load_state_dict_from_keys({ckpt.MODEL}, checkpoint_id=str(path))
    return state[ckpt.MODEL]


@contextlib.contextmanager
def _single_process_is_intended() -> Iterator[None]:
    """Without a process group torch warns that it assumes one process: here it is so."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is .*(unavailable|uninitialized)")
        yield
