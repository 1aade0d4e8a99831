"""The epoch plan at 38 world sizes from 1 to 1024, computed without processes: what every
rank of a large job would compute for itself, checked against world size 1."""

import numpy as np
import pytest

from distrain.components.data.datasets import epoch_order, epoch_plan, split_part

N = 2_999  # not a multiple of any global batch below: every epoch ends short


def plans(world: int, batch: int, accum: int, seed: int = 3, epoch: int = 1):
    return [epoch_plan(N, epoch, seed=seed, shuffle=True, world_size=world, rank=r,
                       batch_size=batch, accum=accum) for r in range(world)]


def check_world(world: int, batch: int, accum: int) -> None:
    ranks = plans(world, batch, accum)
    # World size 1 with the same global batch: one process, the whole batch, same accumulation.
    (single,) = plans(1, world * batch, accum)
    assert {len(r) for r in ranks} == {len(single)}, "every rank has the same number of steps"
    seen = np.zeros(N, dtype=np.int64)
    for s, one in enumerate(single):
        micro_counts = {len(r[s].micro) for r in ranks}
        assert len(micro_counts) == 1, f"world {world} step {s}: micro-batch counts differ"
        real = [i for r in ranks for mb in r[s].micro if mb.count for i in mb.indices]
        placeholders = [mb for r in ranks for mb in r[s].micro if not mb.count]
        assert all(len(mb.indices) == 1 for mb in placeholders)
        # The step's samples are world size 1's, each once (placeholders carry no weight).
        assert sorted(real) == sorted(i for mb in one.micro for i in mb.indices)
        assert sum(mb.count for r in ranks for mb in r[s].micro) == one.size == len(real)
        assert all(r[s].size == one.size for r in ranks)
        assert all(mb.count == len(mb.indices) for r in ranks for mb in r[s].micro if mb.count)
        np.add.at(seen, real, 1)
    assert (seen == 1).all(), f"world {world}: every sample of the epoch exactly once"


WORLDS = [*range(1, 17), 24, 31, 48, 63, 64, 100, 127, 128, 255, 256, 384, 511, 512, 768,
          1000, 1023, 1024]


@pytest.mark.parametrize("batch,accum", [(1, 1), (2, 3)])
def test_every_world_size_up_to_1024_gives_world_size_1s_global_batches(batch, accum):
    for world in WORLDS:
        check_world(world, batch, accum)


def test_a_world_larger_than_the_epoch_still_steps_together():
    """1,024 ranks × 1 sample, an epoch of 1,000: one short global batch, 24 ranks with a
    placeholder only, and all of them still take the step."""
    ranks = [epoch_plan(1000, 1, seed=3, shuffle=True, world_size=1024, rank=r, batch_size=1,
                        accum=1) for r in range(1024)]
    assert {len(r) for r in ranks} == {1} and {len(r[0].micro) for r in ranks} == {1}
    idle = [r for r in ranks if not r[0].micro[0].count]
    assert len(idle) == 24 and all(len(r[0].micro[0].indices) == 1 for r in idle)
    real = sorted(i for r in ranks for mb in r[0].micro if mb.count for i in mb.indices)
    assert real == list(range(1000)) == sorted(epoch_order(1000, 1, 3, True).tolist())


def test_a_ranks_slice_is_numpys_array_split_piece():
    for length in range(0, 70):
        for parts in range(1, 20):
            pieces = np.array_split(np.arange(length), parts)
            for i in range(parts):
                start, end = split_part(length, parts, i)
                assert np.arange(length)[start:end].tolist() == pieces[i].tolist()
