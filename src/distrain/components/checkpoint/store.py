"""A run's checkpoints folder, for the config trainer and `distrain.Engine` alike.

    checkpoints/step-00000120.pt (.done)   one file per save (rank 0 writes: files.py), or
    checkpoints/step-00000120.dcp (.done)  a folder every rank writes its shard into (sharded.py)
    checkpoints/last.pt, best.pt           links to a step's file (last.dcp, best.dcp: folders)

The store decides how a save is written (one file or shards, now or from a background
thread), keeps `keep_last` step checkpoints, finds the newest one that verifies (falling
back to an older one and saying why), and refuses a resume whose config contradicts the
saved run's unless its keys are `resumable` (the config's field metadata).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from distrain.components.checkpoint import files, sharded
from distrain.config import resumable_keys, settings, upgrade
from distrain.distributed import Backend
from distrain.errors import ConfigError, MisuseError


@dataclass(kw_only=True)
class Checkpoints:
    """How `Engine.save_checkpoint()` without a path keeps <out_dir>/checkpoints (as
    checkpoint.* in YAML): the newest `keep_last` kept; `async_save`: written from a thread
    (the loop waits only for a copy to CPU memory); `sharded`: every rank writes its own
    shards into a .dcp folder (None: where the strategy shards the weights, FSDP)."""

    keep_last: int = 2
    async_save: bool = False
    sharded: bool | None = None


class CheckpointStore:
    """`folder`'s checkpoints, written by `backend`'s ranks: sharded (every rank its shard,
    a collective) when `shards` is true, else one file that rank 0 writes; `async_save`:
    the loop waits only for a copy to CPU memory (at most one save in flight; `wait()`,
    the next save and the end of the run wait for it)."""

    def __init__(self, backend: Backend, folder: str | Path, keep_last: int = 2,
                 async_save: bool = False, shards: bool = False) -> None:
        if not (isinstance(keep_last, int) and keep_last >= 1):
            raise ConfigError(f"checkpoint.keep_last: expected an integer >= 1, got {keep_last!r}")
        self.backend, self.folder, self.keep_last = backend, Path(folder), keep_last
        self.shards = shards
        self.saver = None
        if async_save:
            # Distribution: the sharded saver makes a process group (a collective on every rank).
            self.saver = sharded.AsyncSaver(backend) if shards else files.AsyncSaver()

    @staticmethod
    def how(checkpoints: Checkpoints | None) -> Checkpoints:
        """Engine(checkpoints=...) checked (None: the defaults)."""
        if checkpoints is None:
            return Checkpoints()
        if not isinstance(checkpoints, Checkpoints):
            raise MisuseError(f"Engine(checkpoints=...): expected distrain.Checkpoints("
                              f"keep_last=, async_save=, sharded=), got {checkpoints!r}")
        keep = checkpoints.keep_last
        if not (isinstance(keep, int) and not isinstance(keep, bool) and keep >= 1):
            raise MisuseError(f"Checkpoints(keep_last=...): expected an integer >= 1, got "
                              f"{keep!r}")
        if not isinstance(checkpoints.async_save, bool) or \
                checkpoints.sharded not in (None, True, False):
            raise MisuseError(f"Checkpoints(...): async_save is true or false and sharded "
                              f"None, true or false, got {checkpoints!r}")
        return checkpoints

    @classmethod
    def of(cls, backend: Backend, folder: str | Path, how: Checkpoints) -> CheckpointStore:
        """The store `how` describes (sharded: as the backend's strategy when None)."""
        shards = backend.sharded_checkpoints if how.sharded is None else how.sharded
        return cls(backend, folder, how.keep_last, how.async_save, shards)

    def save(self, state: Callable[[], dict], write_last: bool, write_best: bool,
             model: nn.Module | None = None, optimizer: torch.optim.Optimizer | None = None,
             parts: dict | None = None) -> None:
        """Every rank calls this. One file: `state()` is the whole state (rank 0 alone
        calls it). Shards: `state()` the host state beside the model's and optimizer's
        shards (and `parts`' tensors), written by every rank. CheckpointError if the write
        fails; the earlier checkpoints are untouched."""
        if not (write_last or write_best):
            return
        if self.shards:  # Distribution: every rank writes its shard (collective)
            args = (model, optimizer, state(), self.folder, write_last, write_best, self.keep_last,
                    parts)
            if self.saver is not None:
                self.saver.submit(*args)
            else:
                sharded.save(self.backend, *args)
            return
        if self.backend.is_main:
            with self.backend.main_only("checkpoint write"):
                args = (self.folder, write_last, write_best, self.keep_last)
                if self.saver is not None:
                    self.saver.submit(state(), *args)
                else:
                    files.save(state(), *args)

    def wait(self) -> None:
        """The write in flight (async_save) is on disk, or its error raised."""
        if self.saver is not None:
            self.saver.wait()

    def resolve(self, resume: str, out_dir: str | Path, warn=print) -> Path | None:
        """The checkpoint `resume` (auto, none, a path or a run folder) points to."""
        return resolve_resume(resume, out_dir, warn)

    def clear(self) -> int:
        """Remove the folder's checkpoints (a fresh start); how many step checkpoints."""
        return clear(self.folder)


def resolve_resume(resume: str, out_dir: str | Path, warn=print) -> Path | None:
    """The checkpoint `checkpoint.resume` points to, or None for a fresh start. With `auto`,
    the newest step checkpoint that verifies; each one skipped is reported through `warn`.
    A run folder (or its checkpoints/ folder) means that run's newest good checkpoint."""
    if resume == "none":
        return None
    if resume == "auto":
        return newest_good(files.checkpoint_dir(out_dir), warn, required=False)
    path = Path(resume)
    if path.is_dir() and path.suffix != ".dcp":
        folder = path if path.name == "checkpoints" else files.checkpoint_dir(path)
        if not folder.is_dir():
            raise ConfigError(f"checkpoint.resume: {resume!r} is a folder but neither a run "
                              "folder (with checkpoints/) nor a sharded .dcp checkpoint")
        return newest_good(folder, warn, required=True)
    if not (path.is_file() or path.is_dir()):
        raise ConfigError(f"checkpoint.resume: expected 'auto', 'none' or an existing checkpoint "
                          f"file (or sharded .dcp folder, or run folder), got {resume!r} "
                          "(no such file)")
    if path.with_name(path.name + files.DONE).is_file() and (problem := files.verify(path)):
        raise ConfigError(f"checkpoint.resume: {path}: {problem}")
    return path


def newest_good(folder: Path, warn, required: bool) -> Path | None:
    """The newest step checkpoint of `folder` that verifies; each one skipped is reported
    through `warn`. None when there is none (an error when `required`)."""
    candidates = files.step_files(folder) if folder.is_dir() else []
    for path in candidates:
        problem = files.verify(path)
        if problem is None:
            return path
        warn(f"distrain: warning: skipping checkpoint {path}: {problem}; trying the previous one")
    if candidates:
        raise ConfigError(f"checkpoint.resume: no checkpoint in {folder} verifies; "
                          "use checkpoint.resume=none to start afresh")
    if required:
        raise ConfigError(f"checkpoint.resume: {folder} holds no step checkpoint")
    return None


def clear(folder: Path) -> int:
    """Remove every checkpoint of `folder` (a fresh start in a used run folder); returns how
    many step checkpoints there were."""
    steps = files.step_files(folder) if folder.is_dir() else []
    for path in [*steps, folder / files.LAST, folder / files.BEST, folder / sharded.LAST,
                 folder / sharded.BEST]:
        files.remove(path)
    return len(steps)


def _sections() -> frozenset[str]:
    """Every section's path, nested ones too (`dist`, `dist.horovod`, `logging.profile`)."""
    return frozenset(key.rsplit(".", n)[0] for key, _, _ in settings()
                     for n in range(1, key.count(".") + 1))


def _flat(config: dict, prefix: str = "", sections: frozenset[str] | None = None) -> dict:
    """{section.key: value} down to the leaves (mappings such as model.args compared whole)."""
    sections = _sections() if sections is None else sections
    out = {}
    for key, value in config.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and path in sections:
            out.update(_flat(value, f"{path}.", sections))
        else:
            out[path] = value
    return out


def change_since(found: Path, state: dict, global_batch: int | None, config: dict | None,
                 world: int, accum: int) -> str | None:
    """Why `state`'s run differs from this one (`world` processes, `accum` micro-batches a
    step), or None: another global batch (then the same steps would not see the same
    samples) or another config dict."""
    then = state.get(files.GLOBAL_BATCH)
    layout = (f"{world} process{'es' * (world > 1)} × {(global_batch or 0) // world // accum}"
              f" × accum {accum}")
    said = [] if then is None or global_batch is None or then == global_batch else [
        f"a global batch of {then} samples, this run has {global_batch} ({layout})"]
    if config is not None and state.get(files.CONFIG) is not None:
        said += changes(state[files.CONFIG], config)[:8]
    if not said:
        return None
    return (f"Engine.load_checkpoint: {found} was saved with {'; '.join(said)}; resume with "
            "the same values, save this run elsewhere (Engine(out_dir=)), or pass "
            "allow_changes=True")


def changes(old: dict, new: dict, prefix: str = "") -> list[str]:
    """`key: old → new` for every key of two (nested) dicts whose values differ."""
    out = []
    for key in sorted(set(old) | set(new), key=str):
        a, b = old.get(key, "(unset)"), new.get(key, "(unset)")
        if isinstance(a, dict) and isinstance(b, dict):
            out += changes(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: {a!r} → {b!r}")
    return out


def config_changes(old: dict, new: dict) -> list[str]:
    """`key: old → new` for every key that differs and may not change on resume."""
    # A checkpoint of distrain 0.1 has backend, horovod and fsdp at the top: as under dist now.
    before, after, resumable = _flat(upgrade(old)), _flat(new), resumable_keys()
    changes = []
    for key in after:
        # Keys a resume may change (their field metadata says so): how long the run is, where
        # and how it runs (launcher, devices, the layout of the same global batch,
        # collectives), and what it writes. checkpoint.allow_changes overrides the rest.
        if key not in before or before[key] == after[key] or key in resumable:
            continue
        a, b = before[key], after[key]
        if isinstance(a, dict) and isinstance(b, dict):  # e.g. model.args: name the args
            changes += [f"{key}.{k}: {a.get(k, '(unset)')!r} → {b.get(k, '(unset)')!r}"
                        for k in sorted(set(a) | set(b), key=str) if a.get(k) != b.get(k)]
        else:
            changes.append(f"{key}: {a!r} → {b!r}")
    return changes


def incompatible_change(state: dict, cfg, world_size: int) -> str | None:
    """What in `cfg` contradicts the run saved in `state`: the global batch, or any key
    that may not change on resume (`resumable` in the field's metadata)."""
    old = state[files.CONFIG]
    then = (state[files.WORLD_SIZE], old["data"]["batch_size"], old["train"]["grad_accum_steps"])
    now = (world_size, cfg.data.batch_size, cfg.train.grad_accum_steps)
    if then[0] * then[1] * then[2] != now[0] * now[1] * now[2]:
        return ("was trained with a global batch of {} ({} processes × {} × accumulation {}), "
                "this run has {} ({} × {} × {})".format(
                    then[0] * then[1] * then[2], *then, now[0] * now[1] * now[2], *now))
    changes = config_changes(old, cfg.to_dict())
    if changes:
        shown = "; ".join(changes[:8]) + (f"; and {len(changes) - 8} more" if len(changes) > 8
                                           else "")
        return f"was trained with another config ({shown})"
    return None
