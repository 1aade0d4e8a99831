"""Data sets and the global-batch plan that makes training independent of the layout.

Each epoch the training set is permuted by (seed, epoch) and cut into *global*
batches of world_size × batch_size × grad_accum_steps samples. Rank r takes the
r-th slice of every global batch and cuts it into micro-batches. The same samples
therefore meet in the same optimizer step whatever the number of processes, and the
loss of every micro-batch is weighted by (its samples × world_size / global samples)
so each step's gradient is the exact mean over its global batch, short last batch
included.
"""

from __future__ import annotations

import contextlib
import os
import random
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from distrain.components.registry import build, plugin_entry
from distrain.config import DataConfig
from distrain.errors import ConfigError, LabelError


class ArrayDataset(Dataset):
    """In-memory (inputs, targets) pairs; `targets` lets later code count classes cheaply."""

    def __init__(self, inputs: torch.Tensor, targets: torch.Tensor) -> None:
        if len(inputs) != len(targets):
            raise ValueError(f"{len(inputs)} inputs but {len(targets)} targets")
        self.inputs = inputs
        self.targets = targets

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.inputs[index], self.targets[index]

    def __getitems__(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """A whole batch by one indexing (the DataLoader's batched fetch; see `_as_batch`)."""
        index = torch.as_tensor(indices)
        return self.inputs[index], self.targets[index]


def _as_batch(batch):
    """collate_fn for ArrayDataset: __getitems__ already returned the stacked batch."""
    return batch


def synthetic(n: int = 4096, features: int = 64, classes: int = 10, val: int = 512,
              seed: int = 0) -> tuple[ArrayDataset, ArrayDataset]:
    """Gaussian inputs labelled by a fixed random linear teacher: any size, no files (for
    benchmarks and scaling runs)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n + val, features, generator=g)
    y = (x @ torch.randn(features, classes, generator=g)).argmax(1)
    return ArrayDataset(x[:n], y[:n]), ArrayDataset(x[n:], y[n:])


def digits(val_fraction: float = 0.2, seed: int = 0) -> tuple[ArrayDataset, ArrayDataset]:
    """scikit-learn's bundled 8×8 handwritten digits (1797 images, 10 classes, no download),
    scaled to [0, 1] as (1, 8, 8) images, split stratified by `seed` (not by run.seed, so
    the validation set stays put when the run's seed changes)."""
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    arrays = _cached_split(val_fraction, seed)
    x_tr, x_va, y_tr, y_va = (torch.from_numpy(arrays[k]) for k in DIGITS_KEYS)
    return ArrayDataset(x_tr, y_tr), ArrayDataset(x_va, y_va)


DIGITS_KEYS = {"x_tr": np.float32, "x_va": np.float32, "y_tr": np.int64, "y_va": np.int64}


def _cached_split(val_fraction: float, seed: int) -> dict[str, np.ndarray]:
    """The digits split, computed by scikit-learn once per (version, fraction, seed) and kept
    in the user's cache folder: importing sklearn costs every process ~2 s, the file 5 ms.
    A file that does not read back whole (truncated, another format) is made again; a cache
    that cannot be written (a read-only home) only costs the import each time."""
    from importlib.metadata import version

    name = f"digits-v1-sklearn{version('scikit-learn')}-val{val_fraction!r}-seed{seed}.npz"
    try:
        folder = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "distrain"
        with np.load(folder / name) as f:
            arrays = {k: f[k] for k in DIGITS_KEYS}
        if all(arrays[k].dtype == t for k, t in DIGITS_KEYS.items()) and \
                len(arrays["x_tr"]) == len(arrays["y_tr"]) > 0:
            return arrays
    except Exception:  # noqa: BLE001 - any unreadable cache is only a cache miss
        pass
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    x = (bunch.data.astype(np.float32) / 16.0).reshape(-1, 1, 8, 8)
    y = bunch.target.astype(np.int64)
    parts = train_test_split(x, y, test_size=val_fraction, random_state=seed, stratify=y)
    arrays = dict(zip(DIGITS_KEYS, parts))
    with contextlib.suppress(Exception):  # written whole and synced, then renamed: ranks that
        folder.mkdir(parents=True, exist_ok=True)  # start together never read half a file
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{name}.")
        try:
            with os.fdopen(fd, "wb") as f:
                np.savez(f, **arrays)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, folder / name)
        finally:
            with contextlib.suppress(OSError):
                os.unlink(tmp)  # gone already once renamed
    return arrays


def digits_longtail(imbalance_ratio: float = 20.0, val_fraction: float = 0.2, seed: int = 0
                    ) -> tuple[ArrayDataset, ArrayDataset]:
    """The digits with a long-tailed training set: class c keeps n_max · ratio^(-c/9) of its
    training images (chosen by `seed`), so class 0 has `imbalance_ratio` times as many as
    class 9. The validation set stays the balanced digits split."""
    if imbalance_ratio < 1:
        raise ValueError(f"imbalance_ratio must be >= 1, got {imbalance_ratio}")
    train, val = digits(val_fraction, seed)
    targets = train.targets.numpy()
    classes = int(targets.max()) + 1
    n_max = int(np.bincount(targets).min())
    rng = np.random.default_rng(seed)
    keep = []
    for c in range(classes):
        n = max(1, int(round(n_max * imbalance_ratio ** (-c / (classes - 1)))))
        keep.extend(rng.choice(np.flatnonzero(targets == c), n, replace=False).tolist())
    keep = np.sort(np.asarray(keep))
    return ArrayDataset(train.inputs[keep], train.targets[keep]), val


def tokens(n: int = 1024, seq_len: int = 256, vocab_size: int = 50304, val: int = 64,
           branching: int = 4, seed: int = 0) -> tuple[ArrayDataset, ArrayDataset]:
    """Token sequences from a fixed random bigram teacher (each token is followed by one of
    `branching` tokens, uniformly): any size, no files. Inputs are (n, seq_len) ids, targets
    the same shifted by one; a language model's loss can fall from ln(vocab_size) towards
    ln(branching), its token accuracy rise towards 1/branching."""
    g = torch.Generator().manual_seed(seed)
    successors = torch.randint(vocab_size, (vocab_size, branching), generator=g)
    seq = torch.empty(n + val, seq_len + 1, dtype=torch.long)
    seq[:, 0] = torch.randint(vocab_size, (n + val,), generator=g)
    choice = torch.randint(branching, (n + val, seq_len), generator=g)
    for t in range(seq_len):
        seq[:, t + 1] = successors[seq[:, t], choice[:, t]]
    x, y = seq[:, :-1].contiguous(), seq[:, 1:].contiguous()
    return ArrayDataset(x[:n], y[:n]), ArrayDataset(x[n:], y[n:])


DATASETS = {"digits": digits, "digits_longtail": digits_longtail, "synthetic": synthetic,
            "tokens": tokens}


def build_datasets(cfg: DataConfig) -> tuple[Dataset, Dataset]:
    out = build("data", cfg.name, cfg.args, DATASETS)
    if not (isinstance(out, (tuple, list)) and len(out) == 2):
        raise ConfigError(f"data.name: {cfg.name!r} must return (train_dataset, val_dataset), "
                          f"got {type(out).__name__}")
    return out[0], out[1]


def build_val_sets(sets: dict) -> dict[str, Dataset]:
    """validate.sets: {name: {name: package.module:callable, args: {...}}} -> {name: Dataset}."""
    out = {}
    for name, entry in sets.items():
        key = f"validate.sets.{name}"
        path, args = plugin_entry(key, entry, path_alone=False)
        out[name] = build(key, path, args, {})
    return out


def labels(dataset: Dataset) -> torch.Tensor | None:
    """Each sample's integer label: the `targets` attribute (no sample is loaded), else read
    sample by sample, once, from (input, label) pairs or dicts with 'labels'/'label'; None
    when the samples carry no integer label."""
    targets = getattr(dataset, "targets", None)
    if targets is not None:
        targets = torch.as_tensor(targets)
        ok = targets.dim() == 1 and not targets.dtype.is_floating_point
        return targets.long() if ok else None
    out = []
    for i in range(len(dataset)):
        item = dataset[i]
        if isinstance(item, (tuple, list)) and len(item) == 2:
            label = item[1]
        elif isinstance(item, dict):
            label = item.get("labels", item.get("label"))
        else:
            return None
        label = torch.as_tensor(label)
        if label.dim() != 0 or label.dtype.is_floating_point:
            return None
        out.append(int(label))
    return torch.tensor(out, dtype=torch.long)


def class_counts(dataset: Dataset) -> list[int] | None:
    """Samples per class (see `labels`); None when the samples carry no integer label."""
    found = labels(dataset)
    return None if found is None else torch.bincount(found).tolist()


def largest_label(dataset: Dataset) -> int | None:
    """The largest integer label in the data set's `targets` (no sample is loaded), or None."""
    targets = getattr(dataset, "targets", None)
    if targets is None:
        return None
    targets = torch.as_tensor(targets)
    if not targets.numel() or targets.is_floating_point():
        return None
    return int(targets.max())


def check_outputs(model_cfg, logits: torch.Tensor, target: torch.Tensor,
                  known: int | None) -> None:
    """A classifier's outputs must cover the labels: (batch, classes) logits for (batch,)
    labels, or (batch, tokens, classes) for (batch, tokens). `known`: the data set's largest
    label (largest_label); without it this batch's is read from the device (once a run)."""
    if target.is_floating_point() or logits.dim() != target.dim() + 1:
        return
    top = known if known is not None else int(target.max())
    outputs = logits.shape[-1]
    if top < outputs:
        return
    key = "model.args.num_classes" if "num_classes" in model_cfg.args or \
        ":" not in model_cfg.name else "model.name"
    error = ConfigError if known is not None else LabelError  # every rank knows, or this one
    raise error(f"{key}: the model gives {outputs} outputs per sample, but the labels go up to "
                f"{top} ({top + 1} classes); make the model's last layer {top + 1} wide"
                + (f" (model.args.num_classes={top + 1})" if key.endswith("num_classes") else ""))


# --------------------------------------------------------------------------- the plan

@dataclass
class MicroBatch:
    indices: list[int]
    count: int
    """Real samples; 0 marks a placeholder that keeps this rank in the step's allreduce."""


@dataclass
class Step:
    size: int
    """Samples in the whole global batch (all ranks, all micro-batches)."""
    micro: list[MicroBatch]
    """This rank's micro-batches; every rank has the same number in a given step."""


def epoch_order(n: int, epoch: int, seed: int, shuffle: bool) -> np.ndarray:
    if not shuffle:
        return np.arange(n)
    return np.random.default_rng([seed, epoch]).permutation(n)


def seed_streams(seed: int) -> None:
    """Every global random stream of this process from `seed`: torch's (CPU and CUDA),
    NumPy's and Python's `random`, which user code draws from (dropout, np.random.beta for
    Mixup, random.random)."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def seed_for(*parts: int) -> int:
    """A seed derived from several integers (run seed, epoch, rank, ...)."""
    return int(np.random.SeedSequence(list(parts)).generate_state(1)[0])


def split_part(length: int, parts: int, i: int) -> tuple[int, int]:
    """Where `np.array_split(range(length), parts)[i]` starts and ends, in O(1): the first
    `length % parts` pieces are one longer. A rank of 1,024 finds its slice without building
    the other 1,023."""
    size, longer = divmod(length, parts)
    start = i * size + min(i, longer)
    return start, start + size + (i < longer)


def epoch_plan(n: int, epoch: int, *, seed: int, shuffle: bool, world_size: int, rank: int,
               batch_size: int, accum: int, order: np.ndarray | None = None) -> list[Step]:
    """This rank's optimizer steps for one epoch (see the module docstring); `order`, when
    given, is the epoch's sample order (a sampler's, the same on every rank) instead."""
    order = epoch_order(n, epoch, seed, shuffle) if order is None else order
    global_batch = world_size * batch_size * accum
    steps = []
    for start in range(0, n, global_batch):
        chunk = order[start:start + global_batch]
        mine = chunk[slice(*split_part(len(chunk), world_size, rank))]
        largest = -(-len(chunk) // world_size)  # the biggest rank slice sets the micro-step count
        n_micro = -(-largest // batch_size)
        micro = []
        for i in range(n_micro):
            part = mine[slice(*split_part(len(mine), n_micro, i))]
            if len(part):
                micro.append(MicroBatch(part.tolist(), len(part)))
            else:  # Distribution: a rank short of samples still joins the gradient allreduce.
                micro.append(MicroBatch([int(chunk[0])], 0))
        steps.append(Step(len(chunk), micro))
    return steps


class PlanSampler(Sampler[list[int]]):
    """A batch sampler that yields the micro-batches of the current plan, in order."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []

    def set_plan(self, steps: list[Step]) -> None:
        self.batches = [mb.indices for step in steps for mb in step.micro]

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def num_workers(configured: int, dataset: Dataset) -> int:
    """data.num_workers=-1: none for in-memory arrays (slicing beats any worker), else up to 4
    per rank, sharing the CPUs with the node's other ranks."""
    if configured >= 0:
        return configured
    if isinstance(dataset, ArrayDataset):
        return 0
    ranks = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("HOROVOD_LOCAL_SIZE", "1")))
    return max(0, min(4, (os.cpu_count() or 1) // max(1, ranks) - 1))


def batches(loader: DataLoader) -> Iterator:
    """The loader's batches. In-memory arrays without workers are sliced directly: the
    DataLoader's machinery would cost tens of microseconds a batch for nothing. With
    pin_memory (CUDA) the slices are pinned: a copy from pageable memory would make the
    host wait for every kernel queued before it."""
    dataset = loader.dataset
    if isinstance(dataset, ArrayDataset) and loader.num_workers == 0:
        if loader.pin_memory:
            return (tuple(t.pin_memory() for t in dataset.__getitems__(indices))
                    for indices in loader.batch_sampler)
        return (dataset.__getitems__(indices) for indices in loader.batch_sampler)
    return iter(loader)


def batched(dataset: Dataset) -> dict:
    """In-memory arrays are sliced per batch instead of fetched and stacked sample by sample."""
    return {"collate_fn": _as_batch} if isinstance(dataset, ArrayDataset) else {}


def val_indices(n: int, world_size: int, rank: int, sharded: bool) -> list[int]:
    """Sharded: a contiguous, disjoint slice per rank with no padding (sums stay exact)."""
    if not sharded:
        return list(range(n))
    return np.array_split(np.arange(n), world_size)[rank].tolist()


def val_batch_counts(n: int, world_size: int, batch_size: int) -> list[int]:
    """Batches of each rank's validation shard (val_indices, sharded)."""
    return [-(-len(part) // batch_size) for part in np.array_split(np.arange(n), world_size)]


def val_loader(dataset: Dataset, indices: list[int], batch_size: int, cfg: DataConfig,
               pin: bool, pad_to: int = 0) -> DataLoader:
    """Batches of `indices`; with `pad_to`, one-sample batches follow up to that count (under
    FSDP every rank must run as many forwards as the others: their results are dropped)."""
    batches = [indices[i:i + batch_size] for i in range(0, len(indices), batch_size)]
    batches += [[indices[0] if indices else 0]] * max(0, pad_to - len(batches))
    return DataLoader(dataset, batch_sampler=batches, num_workers=num_workers(cfg.num_workers,
                                                                              dataset),
                      pin_memory=pin, **batched(dataset))


def to_device(batch, device: torch.device, non_blocking: bool = True):
    """`batch` with every tensor on `device`, through tuples, lists, dicts and namedtuples;
    anything else is returned as it is."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=non_blocking)
    if isinstance(batch, dict):
        return type(batch)({k: to_device(v, device, non_blocking) for k, v in batch.items()})
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # a namedtuple
        return type(batch)(*(to_device(v, device, non_blocking) for v in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device, non_blocking) for v in batch)
    return batch
