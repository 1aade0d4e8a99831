"""Checkpoints: written by global rank 0 only, atomically, verified when read.

Every save is `step-<global step>.pt`: written to a temporary file in the same folder,
hashed (XXH3-128: integrity, not security) while written, flushed and fsync'ed, renamed into place; then its
completion marker `step-<n>.pt.done` (size and hash) is written, last. Only a file with a
matching marker counts. `last.pt` and `best.pt` are hard links to the newest and the best
step file (copies where links are not supported), with markers of their own, so keeping
them costs no second write; the newest `checkpoint.keep_last` step files are kept.
Resuming (store.py) takes the newest step file that verifies, and says which it skipped.
Under FSDP a checkpoint is a folder every rank writes its shard into (sharded.py),
with the same marker, links, pruning and fallback.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile
import random
import threading
from pathlib import Path
from typing import Any

import numpy as np
import torch
import xxhash

from distrain.errors import CheckpointError, ConfigError

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
GLOBAL_BATCH = "global_batch"  # samples per optimizer step over all ranks (an engine's file)
VERSION = "distrain_version"
EMA = "ema"  # the weights' moving average, when train.ema_decay > 0

HASH = "xxh3_128"  # ~10x faster than SHA-256, so hashing a large checkpoint costs little
LAST = "last.pt"
BEST = "best.pt"
DONE = ".done"  # suffix of the completion marker


bytes_written = 0  # by this process, for the benchmark's "non-main ranks write nothing"


class _HashingWriter:
    def __init__(self, f) -> None:
        self.f, self.hash, self.size = f, xxhash.xxh3_128(), 0

    def write(self, data) -> int:
        self.hash.update(data)
        self.size += len(data)
        return self.f.write(data)

    def flush(self) -> None:
        self.f.flush()


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


def save_atomic(state: dict, path: str | Path) -> dict:
    """Write `state` to `path` so that readers see the old file or the complete new one;
    returns its manifest (size and hash of the bytes written)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file normal permissions
        with os.fdopen(fd, "wb") as f:
            writer = _HashingWriter(f)
            torch.save(state, writer)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    global bytes_written
    bytes_written += writer.size
    return {"bytes": writer.size, HASH: writer.hash.hexdigest()}


def write_marker(path: Path, manifest: dict) -> None:
    """The completion marker, written last (atomically: a marker is whole or absent)."""
    tmp = path.with_name(f".{path.name}{DONE}.tmp")
    tmp.write_text(json.dumps(manifest))
    os.replace(tmp, path.with_name(path.name + DONE))


def hash_file(path: Path) -> dict:
    digest, size = xxhash.xxh3_128(), 0
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
            size += len(block)
    return {"bytes": size, HASH: digest.hexdigest()}


def verify(path: Path) -> str | None:
    """None when `path` (a file, or a sharded checkpoint's folder) matches its completion
    marker, else what is wrong."""
    marker = path.with_name(path.name + DONE)
    if not marker.is_file():
        return "no completion marker (the save did not finish)"
    try:
        manifest = json.loads(marker.read_text())
    except ValueError:
        return "unreadable completion marker"
    if "files" in manifest:  # a sharded checkpoint's folder
        return _verify_folder(path, manifest) if path.is_dir() else "no such folder"
    size = path.stat().st_size if path.is_file() else -1
    if size != manifest["bytes"]:
        return f"{size} bytes on disk, {manifest['bytes']} written (truncated)"
    if HASH not in manifest:
        return f"its marker holds no {HASH} hash (written by another distrain version)"
    if hash_file(path)[HASH] != manifest[HASH]:
        return f"{HASH} mismatch (corrupt)"
    return None


def _verify_folder(path: Path, manifest: dict) -> str | None:
    for name, expected in manifest["files"].items():
        f = path / name
        if not f.is_file():
            return f"{name} is missing"
        found = hash_file(f)
        if HASH not in expected:
            return f"{name}: its marker holds no {HASH} hash (written by another distrain version)"
        if found["bytes"] != expected["bytes"]:
            return f"{name}: {found['bytes']} bytes on disk, {expected['bytes']} written (truncated)"
        if found[HASH] != expected[HASH]:
            return f"{name}: {HASH} mismatch (corrupt)"
    return None


def step_files(folder: Path) -> list[Path]:
    """Step checkpoints (files, and sharded folders `step-*.dcp`), newest first."""
    found = [*folder.glob("step-*.pt"), *(p for p in folder.glob("step-*.dcp") if p.is_dir())]
    return sorted(found, key=lambda p: int(p.stem.split("-")[1]), reverse=True)


def remove(path: Path) -> None:
    """Delete a checkpoint (file or sharded folder), its marker first."""
    path.with_name(path.name + DONE).unlink(missing_ok=True)
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def save(state: dict, folder: Path, write_last: bool, write_best: bool, keep_last: int) -> None:
    """Write one checkpoint (see the module docstring); CheckpointError if that fails."""
    target = folder / f"step-{state[GLOBAL_STEP]:08d}.pt" if write_last else folder / BEST
    try:
        folder.mkdir(parents=True, exist_ok=True)
        # A process killed while it wrote (SIGKILL, a lost node) left its temporary file
        # (`.step-N.pt.<random>.tmp`, `.last.pt.<pid>.tmp`, `.step-N.pt.done.tmp`), possibly
        # a whole checkpoint's size, which nothing else removes. No save of this run is in
        # flight here: rank 0 writes, and AsyncSaver waits for its previous write first.
        for stale in folder.glob(".*.pt.*tmp"):
            stale.unlink(missing_ok=True)
        manifest = save_atomic(on_cpu(state), target)
        write_marker(target, manifest)
        links = [LAST] * write_last + [BEST] * (write_best and write_last)
        for name in links:
            link_atomic(target, folder / name)
            write_marker(folder / name, manifest)
    except OSError as exc:
        raise CheckpointError(f"cannot write checkpoint {target}: {exc}; the earlier "
                              "checkpoints are untouched") from None
    for old in step_files(folder)[keep_last:]:
        remove(old)


class AsyncSaver:
    """checkpoint.async_save: the loop is blocked only while the state is copied to CPU
    memory; a background thread writes it with `save` (same files, same atomicity). At most
    one save is in flight: the next one, `wait()` and the end of the run wait for it, and a
    failed write is raised there as the CheckpointError it would have been."""

    def __init__(self) -> None:
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._buffers: dict[tuple, torch.Tensor] = {}  # reused: no page faults after the first

    def submit(self, state: dict, *args: Any) -> None:
        self.wait()  # the previous snapshot's buffers are free again
        snapshot = _copy_to_cpu(state, self._buffers)  # training goes on changing the live ones
        self._thread = threading.Thread(target=self._write, args=(snapshot, *args),
                                        name="distrain-checkpoint", daemon=False)
        self._thread.start()

    def _write(self, state: dict, *args: Any) -> None:
        try:
            save(state, *args)
        except BaseException as exc:  # handed to the training thread by wait()
            self._error = exc

    def wait(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise error


def save_verified(obj: Any, path: str | Path) -> None:
    """`torch.save(obj, path)` atomically, with a completion marker (size and hash) written
    last; CheckpointError if that fails (the file there before is untouched)."""
    path = Path(path)
    try:
        write_marker(path, save_atomic(on_cpu(obj), path))
    except OSError as exc:  # disk full, no permission: the old file stays whole
        raise CheckpointError(f"cannot write {path}: {exc}; the file there before is "
                              "untouched") from None


def on_cpu(obj: Any) -> Any:
    """`obj` with every device tensor moved to the CPU (CPU tensors are not copied), so a
    checkpoint written on a GPU loads on a machine without one."""
    if isinstance(obj, torch.Tensor):
        return obj if obj.device.type == "cpu" else obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: on_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(on_cpu(v) for v in obj)
    return obj


def _copy_to_cpu(obj: Any, buffers: dict[tuple, torch.Tensor], path: tuple = ()) -> Any:
    if isinstance(obj, torch.Tensor):
        buffer = buffers.get(path)
        if buffer is None or buffer.shape != obj.shape or buffer.dtype != obj.dtype:
            buffer = buffers[path] = torch.empty(obj.shape, dtype=obj.dtype, device="cpu")
        return buffer.copy_(obj.detach())
    if isinstance(obj, dict):
        return {k: _copy_to_cpu(v, buffers, (*path, k)) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_copy_to_cpu(v, buffers, (*path, i)) for i, v in enumerate(obj))
    return copy.deepcopy(obj)


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
    """This process's random streams: torch's (and CUDA's), NumPy's and Python's."""
    # NumPy's as plain types and a tensor: checkpoints stay loadable with weights_only=True.
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {"torch": torch.get_rng_state(),
                             "numpy": [name, torch.from_numpy(keys.astype(np.int64)), int(pos),
                                       int(has_gauss), float(cached)],
                             "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    """rng_state()'s streams back (a file of distrain 0.1 holds torch's alone)."""
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    if "numpy" in state:
        name, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if "python" in state:
        random.setstate(state["python"])


def _zip_magic(path: str | Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"PK\x03\x04"


def load(path: str | Path, required: tuple[str, ...] = (MODEL, OPTIMIZER, EPOCH, GLOBAL_STEP)
         ) -> dict:
    if Path(path).is_file() and not _zip_magic(path):  # torch.save writes zip files
        raise ConfigError(f"checkpoint.resume: {path} is not a checkpoint (not a file torch.save "
                          "wrote); expected a step-*.pt, last.pt or best.pt file, a sharded "
                          ".dcp folder or a run folder")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a truncated or foreign file
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ConfigError(f"checkpoint.resume: cannot read checkpoint {path}: {first}") from None
    missing = [k for k in required if k not in state]
    if missing:
        raise ConfigError(f"checkpoint.resume: {path} is not a distrain checkpoint "
                          f"(missing {', '.join(missing)})")
    return state
