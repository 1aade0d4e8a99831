"""The epoch plan at world sizes 1 ... 1024, computed without processes: what every rank of
a large job would compute for itself, checked against world size 1."""

import numpy as np
import pytest

from distrain.components.data.datasets import epoch_order, epoch_plan

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
    """1024 ranks × 4 samples > 2,999: one short global batch, where most ranks hold
    placeholders only and all of them still take the step."""
    ranks = plans(1024, 4, 1)
    assert {len(r) for r in ranks} == {1}
    assert sum(mb.count for r in ranks for mb in r[0].micro) == N
    idle = [r for r in ranks if not any(mb.count for mb in r[0].micro)]
    assert idle == [] or all(len(r[0].micro) == len(ranks[0][0].micro) for r in idle)
    assert sorted(i for r in ranks for mb in r[0].micro if mb.count for i in mb.indices) == \
        list(range(N))
    assert np.array_equal(np.sort(epoch_order(N, 1, 3, True)), np.arange(N))
