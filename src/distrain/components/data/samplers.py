"""data.sampler: which samples an epoch visits, as a function of (seed, epoch) only.

A sampler's order is drawn once per epoch, identically on every rank (from a generator
seeded by the run's seed and the epoch), and then cut into global batches like the plain
shuffled order (data.epoch_plan). So the same samples meet in the same optimizer step
whatever the number of processes, and a resume continues the same order. Any torch
`Sampler` works: one with a `generator` attribute (WeightedRandomSampler, RandomSampler)
gets the seeded one; any other is drawn under a seeded global stream, restored afterwards.
"""

from __future__ import annotations

import inspect

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler, WeightedRandomSampler

from distrain.components.data.datasets import labels, seed_for
from distrain.components.registry import build, resolve
from distrain.config import SamplerConfig
from distrain.errors import ConfigError

SAMPLER_STREAM = 0x5A  # keeps the sampler's draws apart from the plain shuffle's


def class_balanced(dataset: Dataset, replacement: bool = True) -> WeightedRandomSampler:
    """Each sample weighted by 1 / (its class's count): every class is drawn equally often
    in expectation (with replacement: the long-tail baseline's re-sampling). Labels come
    from `targets`, else from the samples (data.labels)."""
    found = labels(dataset)
    if found is None:
        raise ConfigError("data.sampler: class_balanced needs each sample's integer label: a "
                          "`targets` attribute on the data set, (input, label) pairs, or dicts "
                          "with 'labels'")
    weights = 1.0 / torch.bincount(found)[found].double()
    return WeightedRandomSampler(weights, num_samples=len(found), replacement=replacement)


SAMPLERS = {"class_balanced": class_balanced}


def build_sampler(cfg: SamplerConfig, dataset: Dataset) -> Sampler | None:
    if cfg.name == "none":
        if cfg.args:
            raise ConfigError(f"data.sampler.args: expected none with data.sampler.name=none, "
                              f"got {cfg.args!r}")
        return None
    # The data set is the first argument, whatever its name (torch calls it data_source).
    params = list(inspect.signature(resolve("data.sampler", cfg.name, SAMPLERS)).parameters)
    return build("data.sampler", cfg.name, cfg.args, SAMPLERS, dataset,
                 positional_names=tuple(params[:1]))


def epoch_order(sampler: Sampler, epoch: int, seed: int) -> np.ndarray:
    """The sampler's indices for `epoch`: a function of (seed, epoch), the same on every rank."""
    generator = torch.Generator().manual_seed(seed_for(seed, epoch, SAMPLER_STREAM))
    if hasattr(sampler, "set_epoch"):
        sampler.set_epoch(epoch)
    if hasattr(sampler, "generator"):
        sampler.generator = generator
        return np.fromiter(iter(sampler), dtype=np.int64)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed_for(seed, epoch, SAMPLER_STREAM))
        return np.fromiter(iter(sampler), dtype=np.int64)
