"""`distrain evaluate` and `distrain predict`: a checkpoint's validation metrics, or its
prediction for every validation sample, without training.

    distrain evaluate --config configs/digits.yaml --checkpoint best [-o metrics.json]
    torchrun --nproc-per-node 2 -m distrain evaluate --config F --checkpoint runs/a/checkpoints/last.pt
    distrain predict --config configs/digits.yaml --checkpoint best -o predictions.csv

The data sets, the model, the loss and the metrics are built from the config as `distrain
train` builds them (loop.build_parts) and validated by the function training reports with
(validation.validate_model): under any launcher, sharded as in training (validate.mode;
always under FSDP), with `val_ema_*` when the checkpoint holds an EMA and validate.sets.

--checkpoint: `best`, `last` or a step checkpoint's name (`step-00000090`) in
<run.out_dir>/checkpoints (run.out_dir after the overrides); a checkpoint's path (a `.pt`
file or a sharded `.dcp` folder); any other folder is a run folder: its best, else its
last. A checkpoint with a completion marker is verified against it before it is read.

Read-only: nothing goes into the run folder and no lock is taken; the only file written is
-o's, by rank 0, atomically.
"""

from __future__ import annotations

import gc
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from distrain.commands.export import find_checkpoint
from distrain.components.blocks import find_blocks
from distrain.components.checkpoint import files as ckpt
from distrain.components.checkpoint import sharded
from distrain.components.data.datasets import (
    to_device,
    val_batch_counts,
    val_indices,
    val_loader,
)
from distrain.components.ema import EMA, ShardedEMA, make_ema
from distrain.components.precision import Precision
from distrain.components.step_fn import pair
from distrain.components.validation import validate_model
from distrain.config import Config
from distrain.distributed import Backend, make_backend
from distrain.errors import ConfigError
from distrain.trainer.parts import Parts, build_parts


@dataclass
class Loaded:
    parts: Parts
    model: nn.Module  # the plain model (under FSDP sharded in place) holding the weights
    ema: EMA | ShardedEMA | None  # the checkpoint's EMA of the weights, if it holds one
    source: dict  # the checkpoint's path, epoch and step


def resolve(choice: str, out_dir: str | Path) -> Path:
    """The checkpoint --checkpoint names (see the module docstring), verified."""
    path = Path(choice)
    if path.is_dir() and path.suffix != sharded.SUFFIX:  # a run folder: its best, else last
        try:
            return find_checkpoint(path)
        except ConfigError as exc:
            raise ConfigError(f"--checkpoint: {exc}".replace("RUN_DIR", "run folder", 1)) \
                from None
    return find_checkpoint(out_dir, choice)


def _read(path: Path) -> dict:
    """A one-file checkpoint whole, or a sharded one's host state (no tensor of it)."""
    target = path / sharded.HOST if path.is_dir() else path
    try:
        state = torch.load(target, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ConfigError(f"--checkpoint: cannot read {path} as a distrain checkpoint "
                          f"(torch.load: {type(exc).__name__}); expected a .pt file or .dcp "
                          "folder that distrain train wrote") from None
    if not isinstance(state, dict) or ckpt.EPOCH not in state or \
            not (path.is_dir() or ckpt.MODEL in state):
        raise ConfigError(f"--checkpoint: {path} is not a distrain checkpoint (no model "
                          "weights or epoch in it)")
    return state


def _mismatch(expected: dict, found: dict, trained: dict | None) -> str | None:
    """What differs between the model's tensor shapes and the checkpoint's, if anything."""
    problems = [f"{k} is missing" for k in expected if k not in found]
    problems += [f"{k} is not in the model" for k in found if k not in expected]
    problems += [f"{k} is {list(found[k])} there, {list(v)} here"
                 for k, v in expected.items() if k in found and tuple(found[k]) != v]
    if not problems:
        return None
    then = f" (it was trained with model.name {trained['name']!r}, model.args " \
           f"{trained['args']!r})" if trained else ""
    return (f"its weights do not fit the config's model: {'; '.join(problems[:3])}"
            f"{' ...' if len(problems) > 3 else ''}{then}; pass the run's config, or fix "
            "model.name/model.args")


def load(cfg: Config, backend: Backend, choice: str) -> Loaded:
    """Build what training builds from `cfg` and load the checkpoint `choice`'s weights."""
    parts = build_parts(cfg, backend)
    model = parts.model
    # Distribution: sharded where a forward is a collective over the shards (FSDP).
    model = backend.inference_module(model, blocks=lambda m: find_blocks(m, cfg.model.blocks))
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    state, found = {}, None
    if backend.is_main:
        with backend.main_only("reading the checkpoint"):
            try:
                path = resolve(choice, cfg.run.out_dir)
                state = _read(path)
                shapes = sharded.shapes(path) if path.is_dir() else \
                    {k: tuple(v.shape) for k, v in state[ckpt.MODEL].items()}
                problem = _mismatch(expected, shapes, state.get(ckpt.CONFIG, {}).get("model"))
                if problem:
                    raise ConfigError(f"--checkpoint: {path}: {problem}")
                found = {"checkpoint": str(path), "epoch": state[ckpt.EPOCH],
                         "step": state.get(ckpt.GLOBAL_STEP), "ema": bool(state.get(ckpt.EMA))}
            except ConfigError as exc:
                found = {"error": str(exc)}
    found = backend.broadcast_object(found)  # Distribution: every rank refuses alike
    if "error" in found:
        raise ConfigError(found["error"])
    path, decay = Path(found["checkpoint"]), cfg.train.ema_decay or 0.999  # decay: unused here
    ema = make_ema(model, decay) if found.pop("ema") else None
    if path.is_dir():  # every rank reads its part (all of it without FSDP)
        extra = {} if ema is None else {ckpt.EMA: ema.shard_tensors()}
        sharded.load(backend, model, None, path, extra, key="--checkpoint")
    else:
        # Rank 0 read the weights: FSDP scatters them, the others keep them on rank 0 (the
        # validation and predict broadcast them; validate.mode=rank0 needs them there only).
        backend.load_module_state(model, state.get(ckpt.MODEL) if backend.is_main else None)
        averaged = state.get(ckpt.EMA)  # rank 0's; sent to every rank under FSDP only
        if backend.forward_is_collective:
            averaged = backend.broadcast_object(averaged)
        if ema is not None and averaged is not None:
            ema.load_state_dict(averaged)
    return Loaded(parts, model, ema, found)


def _with_backend(cfg: Config, fn, *args):
    backend = make_backend(cfg)
    backend.setup()
    try:
        return fn(cfg, backend, *args)
    finally:
        gc.collect()  # Distribution: FSDP's state goes before the process group does
        backend.teardown()


def evaluate(cfg: Config, checkpoint: str) -> dict:
    """The validation metrics of `checkpoint` (every rank returns them), with its path,
    epoch and step."""
    return _with_backend(cfg, _evaluate, checkpoint)


def _evaluate(cfg: Config, backend: Backend, checkpoint: str) -> dict:
    loaded = load(cfg, backend, checkpoint)
    p = loaded.parts
    metrics = validate_model(cfg, backend, loaded.model, p.val_set, p.val_sets, p.loss_fn,
                             Precision(cfg.train.precision, backend.device), p.step_fn,
                             p.user_metrics, loaded.ema)
    return {**loaded.source, **metrics}


def predict(cfg: Config, checkpoint: str, output: str | Path) -> dict:
    """Write `output`, a CSV row per validation sample in the data set's order:
    index,target,predicted,prob_0,...; returns its path, rows and accuracy (every rank)."""
    if cfg.train.step:
        raise ConfigError(f"train.step: distrain predict needs (inputs, targets) batches and "
                          f"the model's class scores; with a step function ({cfg.train.step!r})"
                          " use distrain evaluate")
    return _with_backend(cfg, _predict, checkpoint, Path(output))


@torch.no_grad()
def _predict(cfg: Config, backend: Backend, checkpoint: str, output: Path) -> dict:
    loaded = load(cfg, backend, checkpoint)
    raw, dataset = backend.unwrap(loaded.model), loaded.parts.val_set
    backend.broadcast_module(raw)  # Distribution: rank 0's weights (FSDP: its buffers)
    raw.eval()
    precision = Precision(cfg.train.precision, backend.device)
    # The shards validation uses: contiguous, disjoint, no padding, so no row repeats.
    idx = val_indices(len(dataset), backend.world_size, backend.rank, sharded=True)
    batch = cfg.data.val_batch_size or cfg.data.batch_size
    mine, problem = [], None
    counts = val_batch_counts(len(dataset), backend.world_size, batch)
    pad = max(counts) if backend.forward_is_collective else 0  # as many forwards on each
    loader = val_loader(dataset, idx, batch, cfg.data, pin=False, pad_to=pad)
    for i, (x, y) in enumerate(map(pair, loader)):
        x, y = to_device(x, backend.device), to_device(y, backend.device)
        with precision.autocast():
            logits = raw(x)  # every batch on every rank: under FSDP a forward is a collective
        if i >= counts[backend.rank]:  # a padding batch: its forward only
            continue
        if logits.dim() != 2 or y.shape != logits.shape[:1] or y.is_floating_point():
            problem = (f"distrain predict needs class scores (batch, classes) and one integer "
                       f"target per sample, got scores {list(logits.shape)} and targets "
                       f"{list(y.shape)} ({y.dtype})")
            continue
        mine.append((y.cpu(), logits.argmax(1).cpu(), torch.softmax(logits.float(), 1).cpu()))
    everyone = backend.all_gather_object((idx, mine, problem))  # Distribution: rank order
    problems = [p for _, _, p in everyone if p]
    if problems:
        raise ConfigError(f"model.name: {problems[0]}")
    rows = []
    for indices, batches, _ in everyone:
        if batches:
            rows += zip(indices, *(torch.cat(t).tolist() for t in zip(*batches)))
    correct = sum(y == p for _, y, p, _ in rows)
    if backend.is_main:
        with backend.main_only("writing the predictions"):
            classes = len(rows[0][3]) if rows else 0
            lines = [",".join(["index", "target", "predicted",
                               *(f"prob_{c}" for c in range(classes))])]
            lines += [",".join([str(i), str(y), str(p), *(f"{q:.9g}" for q in probs)])
                      for i, y, p, probs in sorted(rows)]
            write_atomic(output, "\n".join(lines) + "\n")
    return {"predictions": str(output), "rows": len(rows),
            "acc": correct / max(len(rows), 1), **loaded.source}


def write_atomic(path: str | Path, text: str) -> None:
    """Readers see the old file or the whole new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
