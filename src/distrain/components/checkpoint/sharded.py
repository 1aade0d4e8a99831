"""Sharded checkpoints (dist.strategy=fsdp): one folder per save, every rank writes its shard.

    checkpoints/step-00000120.dcp/      torch.distributed.checkpoint's files:
        __0_0.distcp, __1_0.distcp       each rank's shard of the model and optimizer state
        .metadata                        which bytes of which tensor are where (rank 0)
        host.pt                          the rest (counters, schedule, random streams; rank 0)
    checkpoints/step-00000120.dcp.done  the completion marker: size and hash of every file

distrain's integrity story carries over from single files (files.py): the files are
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
import copy
import os
import shutil
import warnings
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)

from distrain.components.checkpoint import files as ckpt
from distrain.distributed import Backend
from distrain.errors import CheckpointError, ConfigError

SUFFIX = ".dcp"
HOST = "host.pt"  # inside a sharded checkpoint: the state that is not sharded
LAST = "last" + SUFFIX
BEST = "best" + SUFFIX


@dataclass
class _Write:
    """A sharded save whose files are being written into `tmp`."""

    target: Path
    tmp: Path
    host: dict
    links: list[str]
    keep_last: int
    future: Future | None = None  # an async save's upload
    error: str | None = None


def save(backend: Backend, model: nn.Module, optimizer: torch.optim.Optimizer, host: dict,
         folder: Path, write_last: bool, write_best: bool, keep_last: int,
         parts: dict | None = None) -> None:
    """Every rank calls this (collective); `parts`: more sharded tensors by key (the EMA's).
    CheckpointError if the write fails; the earlier checkpoints are untouched."""
    _finish(backend, _begin(backend, model, optimizer, host, folder, write_last, write_best,
                            keep_last, parts))


class AsyncSaver:
    """checkpoint.async_save under FSDP: the loop is blocked while each rank copies its
    shards to CPU memory; torch.distributed.checkpoint writes them in a background thread
    (its collectives on a process group of their own). The next save, `wait()` and the end
    of the run (every rank, at the same points) hash the shards, gather the hashes and
    publish the folder with its marker, exactly as a synchronous save does."""

    def __init__(self, backend: Backend) -> None:
        import torch.distributed as dist

        self.backend = backend
        # Distribution: a collective on every rank (the Trainer builds this on all of them).
        self.group = dist.new_group(backend="gloo") if dist.is_initialized() else None
        self.pending: _Write | None = None

    def submit(self, model: nn.Module, optimizer: torch.optim.Optimizer, host: dict,
               folder: Path, write_last: bool, write_best: bool, keep_last: int,
               parts: dict | None = None) -> None:
        self.wait()
        self.pending = _begin(self.backend, model, optimizer, copy.deepcopy(host), folder,
                              write_last, write_best, keep_last, parts, self.group)

    def wait(self) -> None:
        pending, self.pending = self.pending, None
        if pending is not None:
            _finish(self.backend, pending)


def _begin(backend: Backend, model: nn.Module, optimizer: torch.optim.Optimizer, host: dict,
           folder: Path, write_last: bool, write_best: bool, keep_last: int,
           parts: dict | None, group=None) -> _Write:
    name = f"step-{host[ckpt.GLOBAL_STEP]:08d}{SUFFIX}" if write_last else BEST
    links = [LAST] * write_last + [BEST] * (write_best and write_last)
    write = _Write(folder / name, folder / f".{name}.tmp", host, links, keep_last)
    if backend.is_main:
        with backend.main_only("clearing stale temporary checkpoint folders"):
            folder.mkdir(parents=True, exist_ok=True)
            # Left by a save that died (no save of this run is in flight here): shards of a
            # large model, which would otherwise stay on disk for good.
            for stale in [*folder.glob(f".*{SUFFIX}*.tmp"), *folder.glob(f".*{SUFFIX}.old")]:
                shutil.rmtree(stale, ignore_errors=True)
    backend.barrier()  # Distribution: nobody writes into the folder before it is clean
    msd, osd = get_state_dict(backend.unwrap(model), optimizer)  # this rank's shards, no copy
    state = {ckpt.MODEL: msd, ckpt.OPTIMIZER: osd, **(parts or {})}
    try:
        if group is None:
            dcp.save(state, checkpoint_id=write.tmp)  # collective
        else:  # copies the shards to CPU memory now, writes them in a background thread
            write.future = dcp.async_save(state, checkpoint_id=write.tmp, process_group=group)
    except Exception as exc:  # every rank learns of it in _finish, so no rank hangs
        write.error = f"{type(exc).__name__}: {exc}"
    return write


def _finish(backend: Backend, write: _Write) -> None:
    """Hash this rank's shard; rank 0 publishes once every rank's hash has arrived."""
    files: dict = {}
    try:
        if write.future is not None:
            write.future.result()
        if write.error is None:
            files = {f.name: ckpt.hash_file(f) for f in write.tmp.glob(f"__{backend.rank}_*.distcp")}
            if backend.is_main:
                with backend.main_only("checkpoint host state"):
                    files[".metadata"] = ckpt.hash_file(write.tmp / ".metadata")
                    files[HOST] = ckpt.save_atomic(ckpt.on_cpu(write.host), write.tmp / HOST)
    except Exception as exc:
        write.error = f"{type(exc).__name__}: {exc}"
    everyone = backend.all_gather_object((files, write.error))  # Distribution: all hashed
    errors = [f"rank {r}: {e}" for r, (_, e) in enumerate(everyone) if e]
    target, folder = write.target, write.target.parent
    if errors:
        if backend.is_main:
            shutil.rmtree(write.tmp, ignore_errors=True)
        raise CheckpointError(f"cannot write checkpoint {target}: {'; '.join(errors)}; "
                                   "the earlier checkpoints are untouched")
    if not backend.is_main:
        return
    with backend.main_only("checkpoint publish"):
        manifest = {"files": {k: v for f, _ in everyone for k, v in f.items()}}
        try:
            _publish(write.tmp, target, manifest)
            for link in write.links:
                _link_folder(target, folder / link, manifest)
        except OSError as exc:
            raise CheckpointError(f"cannot write checkpoint {target}: {exc}; the earlier "
                                       "checkpoints are untouched") from None
        for old in ckpt.step_files(folder)[write.keep_last:]:
            if old.suffix == SUFFIX:
                ckpt.remove(old)


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


def load_host(path: Path, required: tuple[str, ...] = (ckpt.EPOCH, ckpt.GLOBAL_STEP)) -> dict:
    """The state of a sharded checkpoint that is not sharded (every rank may read it)."""
    return ckpt.load(path / HOST, required=required)


def load(backend: Backend, model: nn.Module, optimizer: torch.optim.Optimizer | None,
         path: Path, parts: dict | None = None, key: str = "checkpoint.resume") -> None:
    """The weights and optimizer state of the sharded checkpoint `path` into this run's
    model and optimizer (and `parts`' tensors, in place), whatever its strategy and number
    of processes (every rank reads its part; under DDP or one process each rank reads the
    whole state). Without an optimizer (distrain evaluate) the weights alone; `key` names
    the setting in a ConfigError."""
    raw = backend.unwrap(model)
    if optimizer is None:
        state = {ckpt.MODEL: get_model_state_dict(raw)}
    else:
        msd, osd = get_state_dict(raw, optimizer)
        state = {ckpt.MODEL: msd, ckpt.OPTIMIZER: osd}
    state.update(parts or {})
    try:
        with _single_process_is_intended():
            dcp.load(state, checkpoint_id=path)  # Distribution: collective under a group
    except Exception as exc:
        raise ConfigError(f"{key}: cannot read sharded checkpoint {path}: "
                               f"{str(exc).splitlines()[0]}") from None
    if optimizer is None:
        set_model_state_dict(raw, state[ckpt.MODEL])
    else:
        set_state_dict(raw, optimizer, model_state_dict=state[ckpt.MODEL],
                       optim_state_dict=state[ckpt.OPTIMIZER])


def shapes(path: Path, key: str = ckpt.MODEL) -> dict[str, tuple[int, ...]]:
    """The whole shape of each tensor under `key` in the sharded checkpoint `path`, by
    name, from its metadata (no tensor is read)."""
    metadata = dcp.FileSystemReader(str(path)).read_metadata()
    prefix = key + "."
    return {name[len(prefix):]: tuple(meta.size)
            for name, meta in metadata.state_dict_metadata.items()
            if name.startswith(prefix) and hasattr(meta, "size")}


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
