"""What a checkpoint holds and how every rank saves and resumes it: one class for
`distrain.Engine` and the config trainer alike.

    checkpointer.register("scheduler", scheduler)     # anything with state_dict/load_state_dict
    checkpointer.save(own, last=True, best=improved)  # every rank calls it
    state, found = checkpointer.read(path, out_dir, "Engine.load_checkpoint")
    small = checkpointer.restore(found, state)        # every rank: its part of the state

A save gathers every rank's random streams (and what `rank_state` adds, e.g. the trainer's
share of the epoch's sums); rank 0 writes one verified file, or every rank its shard of the
model, the optimizer and any part with `shard_tensors` (the EMA) when the store is sharded.
A resume: rank 0 reads and verifies the file, the model's and optimizer's tensors reach
every rank through the strategy (FSDP: each rank its shards), the rest as one small object.
Under an elastic horovodrun every rank reads instead (set-up runs no collective there).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from distrain.components.checkpoint import files, sharded
from distrain.components.checkpoint.store import CheckpointStore
from distrain.distributed import Backend
from distrain.errors import ConfigError, MisuseError

# The keys a checkpointer writes besides the registered objects' states.
OWN_KEYS = {files.RANKS, files.WORLD_SIZE}


class DictState:
    """A registered dict of plain values: its items saved, and loaded back into it."""

    def __init__(self, values: dict) -> None:
        self.values = values

    def state_dict(self) -> dict:
        return dict(self.values)

    def load_state_dict(self, state: dict) -> None:
        self.values.clear()
        self.values.update(state)


class Checkpointer:
    """The registered objects of one run, saved into and restored from `store`."""

    def __init__(self, backend: Backend, store: CheckpointStore) -> None:
        self.backend, self.store = backend, store
        self.objects: dict[str, Any] = {}  # by checkpoint key
        self.inline: list[Any] = []  # objects whose state's keys lie at the file's top level
        self.model: torch.nn.Module | None = None  # the one the strategy saves (FSDP: gathers)
        self.optimizer: torch.optim.Optimizer | None = None

    def register(self, name: str, obj: Any, inline: bool = False) -> None:
        """Save and resume `obj` under `name` (inline: its state's keys at the top level); a
        dict of plain values is saved as it is and updated in place on load."""
        if isinstance(obj, dict):
            obj = DictState(obj)
        if not (hasattr(obj, "state_dict") and hasattr(obj, "load_state_dict")):
            raise TypeError(f"Engine.register: {name!r} has no state_dict/load_state_dict "
                            "(register an object with both, or a dict of plain values)")
        if inline:
            self.inline.append(obj)
        else:
            self.objects[name] = obj

    def register_training(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer
                          ) -> None:
        """The model and the optimizer, whose states the strategy saves and loads."""
        self.register(files.MODEL, model)
        self.register(files.OPTIMIZER, optimizer)
        self.model, self.optimizer = model, optimizer

    def unregister(self, name: str) -> None:
        self.objects.pop(name, None)

    def clear(self) -> None:
        """Forget every object (the engine's close: DDP holds the process group)."""
        self.objects.clear()
        self.inline.clear()
        self.model = self.optimizer = None

    def _tensors(self, obj: Any) -> bool:  # the states the strategy moves, not pickled whole
        return obj is not None and (obj is self.model or obj is self.optimizer)

    # ------------------------------------------------------------------ save
    def host_state(self) -> dict:
        """Every state but the model's and the optimizer's (no collective, no tensors moved)."""
        state = {name: obj.state_dict() for name, obj in self.objects.items()
                 if not self._tensors(obj)}
        for obj in self.inline:
            state.update(obj.state_dict())
        return state

    def load_host_state(self, state: dict) -> None:
        for name, obj in self.objects.items():
            if not self._tensors(obj) and state.get(name) is not None:
                obj.load_state_dict(state[name])
        for obj in self.inline:
            obj.load_state_dict(state)

    def save(self, own: dict, last: bool = True, best: bool = False,
             path: str | Path | None = None, rank_state: dict | None = None) -> None:
        """Every rank calls it (collective): the registered states, `own` and every rank's
        random streams (with its `rank_state`), into the store's folder as last (and best)
        or into the one file `path`."""
        if not (last or best or path):
            return
        ranks = self.backend.all_gather_object({"rng": files.rng_state(), **(rank_state or {})})
        host = {**self.host_state(), **own, files.RANKS: ranks,
                files.WORLD_SIZE: self.backend.world_size}
        if path is None and self.store.shards:  # every rank writes its shards (collective)
            parts = {name: obj.shard_tensors() for name, obj in self.objects.items()
                     if hasattr(obj, "shard_tensors")}
            self.store.save(lambda: host, last, best, self.model, self.optimizer, parts)
            return
        whole = dict(host)  # the whole model's and optimizer's states (FSDP: gathered)
        for name, obj in self.objects.items():
            if obj is self.model:
                whole[name] = self.backend.module_state(obj)
            elif obj is self.optimizer:
                whole[name] = self.backend.optimizer_state(self.model, obj)
        if path is None:
            self.store.save(lambda: whole, last, best)
        elif self.backend.is_main:
            with self.backend.main_only("Engine.save_checkpoint"):
                files.save_verified(whole, path)

    # ------------------------------------------------------------------ resume
    def read(self, path: str | Path, out_dir: str | Path, key: str,
             required: tuple[str, ...] | None = None) -> tuple[dict | None, Path | None]:
        """Rank 0 verifies and reads `path` ("auto": the store's newest good checkpoint,
        each skipped one named; a .dcp folder: its host state). Returns (state, path) on
        every rank: rank 0's state whole, the others' without the model's and optimizer's
        tensors (None in their place); (None, None) for "auto" with nothing saved.
        `required`: the keys a config run's file must hold (read weights_only); an error
        reading it is every rank's, named after `key`."""
        backend = self.backend
        reads = backend.is_main or backend.elastic
        state, found, problem = None, None, None
        if reads:
            try:
                found = Path(path) if path != "auto" else self.store.resolve("auto", out_dir)
                state = None if found is None else self._load(found, required)
                if found is not None and found.is_dir():  # model and optimizer: in the shards
                    state.update({k: None for k in self.objects if self._is_tensor_key(k)})
            except ConfigError as exc:  # a config run's file: its message names the key
                problem = ("config", str(exc)) if required is not None else \
                    ("file", f"{key}: {str(exc).removeprefix('checkpoint.resume: ')}")
            except Exception as exc:  # none verifies, unreadable: every rank hears of it
                problem = ("file", f"{key}: {str(exc) or type(exc).__name__}")
        if not backend.elastic:  # Distribution: the small state from rank 0
            small = None if state is None else {
                k: None if self._is_tensor_key(k) else v for k, v in state.items()}
            small, found, problem = backend.broadcast_object((small, found, problem))
            state = state if backend.is_main else small
        if problem:
            raise (ConfigError if problem[0] == "config" else FileNotFoundError)(problem[1])
        return state, found

    def _is_tensor_key(self, key: str) -> bool:
        return self._tensors(self.objects.get(key))

    @staticmethod
    def _load(found: Path, required: tuple[str, ...] | None) -> dict:
        if required is not None:  # a config run's checkpoint: plain values, read weights_only
            return sharded.load_host(found, required) if found.is_dir() else \
                files.load(found, (files.MODEL, files.OPTIMIZER, *required))
        problem = files.verify(found) if found.exists() else "no such file"
        if problem:
            raise FileNotFoundError(f"{found}: {problem}")
        return torch.load(found / sharded.HOST if found.is_dir() else found,
                          map_location="cpu", weights_only=False)  # the user's objects

    def refuse(self, change: str | None, error: type[Exception] = MisuseError) -> None:
        """Rank 0's verdict on a resume (why its run differs, or None) on every rank."""
        if not self.backend.elastic:
            change = self.backend.broadcast_object(change)  # Distribution: all refuse alike
        if change:
            raise error(change)

    def restore(self, found: Path, state: dict) -> None:
        """Every rank: the registered objects from `state` as `read` returned it. The model
        and the optimizer through the strategy (FSDP: each rank its part), from rank 0's
        tensors or from the shards of a .dcp folder (every rank reads its part, resharded
        to this layout), with the parts kept in shards (the EMA) beside them."""
        backend = self.backend
        if found.is_dir():
            parts = {name: obj for name, obj in self.objects.items()
                     if hasattr(obj, "shard_tensors") and state.get(name) is not None}
            sharded.load(backend, self.model, self.optimizer, found,
                         {name: obj.shard_tensors() for name, obj in parts.items()})
            for name, obj in parts.items():  # the tensors came in place: their counters
                obj.load_count(state[name])
            state = {k: v for k, v in state.items() if k not in parts}
        elif self.model is not None and self.optimizer is not None:
            model_key = next(k for k, o in self.objects.items() if o is self.model)
            optim_key = next(k for k, o in self.objects.items() if o is self.optimizer)
            # Distribution: rank 0's tensors to every rank (FSDP: each rank its shards).
            backend.load_training_state(self.model, self.optimizer, state.get(model_key),
                                        state.get(optim_key))
        if self.optimizer is not None and self.optimizer.state:
            # It stepped in this run's history: a scheduler's first step after the resume
            # is not "lr_scheduler.step() before optimizer.step()" (torch's warning).
            self.optimizer._opt_called = True
        self.load_host_state(state)

    def unmatched(self, found: Path, state: dict, own: set[str], strict: bool) -> dict:
        """The states of `state` that no registered object takes. strict: MisuseError if
        there is any (None states aside), or a registered object without a state."""
        inline = {k for obj in self.inline for k in obj.state_dict()}
        missing = [name for name in self.objects if name not in state]
        left = {k: v for k, v in state.items() if k not in self.objects
                and k not in own | OWN_KEYS | inline and v is not None}
        if strict and (missing or left):
            said = [f"no state for {', '.join(map(repr, missing))} (registered after the "
                    "save?)"] * bool(missing) + [f"{', '.join(map(repr, left))} in the file, "
                                                 "which nothing registered"] * bool(left)
            raise MisuseError(f"Engine.load_checkpoint: {found}: {'; '.join(said)}; register "
                              "the same objects as the run that saved it before loading, or "
                              "pass strict=False")
        return left

    @staticmethod
    def rank_entry(state: dict, rank: int) -> dict:
        """Rank `rank`'s entry of the saved ranks: {"rng": streams, ...} (an engine file of
        distrain 0.1 holds the streams alone)."""
        entry = state[files.RANKS][rank]
        return entry if "rng" in entry else {"rng": entry}

    def restore_streams(self, state: dict) -> bool:
        """This rank's random streams as saved, when the layout is the same; True if so."""
        if len(state[files.RANKS]) != self.backend.world_size:
            return False
        files.set_rng_state(self.rank_entry(state, self.backend.rank)["rng"])
        return True

