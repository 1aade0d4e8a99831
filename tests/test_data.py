from pathlib import Path

import numpy as np
import pytest
import torch

from distrain.components.data.datasets import digits, epoch_plan


def global_batches(n, world, batch, accum, epoch=0, seed=0):
    """The samples of each optimizer step, over all ranks and micro-batches, as sets."""
    plans = [epoch_plan(n, epoch, seed=seed, shuffle=True, world_size=world, rank=r,
                        batch_size=batch, accum=accum) for r in range(world)]
    steps = len(plans[0])
    assert all(len(p) == steps for p in plans), "ranks disagree on the number of steps"
    out = []
    for s in range(steps):
        assert len({len(p[s].micro) for p in plans}) == 1, "ranks disagree on micro-steps"
        real = [i for p in plans for mb in p[s].micro if mb.count for i in mb.indices]
        assert len(real) == len(set(real)) == plans[0][s].size
        out.append(frozenset(real))
    return out


@pytest.mark.parametrize("n", [1437, 64, 7, 1])
def test_same_global_batches_whatever_the_layout(n):
    reference = global_batches(n, 1, 32, 1)
    assert global_batches(n, 2, 16, 1) == reference
    assert global_batches(n, 2, 8, 2) == reference
    assert global_batches(n, 4, 4, 2) == reference
    assert sorted(i for b in reference for i in b) == list(range(n))  # every sample once


def test_shards_are_disjoint_and_reshuffled_per_epoch():
    n = 100
    a = [epoch_plan(n, 0, seed=1, shuffle=True, world_size=2, rank=r, batch_size=8, accum=1)
         for r in range(2)]
    ranks = [{i for s in p for mb in s.micro if mb.count for i in mb.indices} for p in a]
    assert not ranks[0] & ranks[1] and len(ranks[0] | ranks[1]) == n
    e0 = [i for s in a[0] for mb in s.micro for i in mb.indices]
    e1 = [i for s in epoch_plan(n, 1, seed=1, shuffle=True, world_size=2, rank=0, batch_size=8,
                                accum=1) for mb in s.micro for i in mb.indices]
    assert e0 != e1
    fixed = epoch_plan(n, 3, seed=1, shuffle=False, world_size=1, rank=0, batch_size=8, accum=1)
    assert [i for s in fixed for mb in s.micro for i in mb.indices] == list(range(n))


def test_short_last_window_and_placeholder():
    # 1437 = 22 × 64 + 29: the last global batch is short; with accum 2 it needs one micro-step.
    plan = epoch_plan(1437, 0, seed=0, shuffle=True, world_size=2, rank=0, batch_size=16, accum=2)
    assert [len(s.micro) for s in plan[:-1]] == [2] * 22 and plan[-1].size == 29
    assert len(plan[-1].micro) == 1 and plan[-1].micro[0].count == 15
    # 3 samples over 2 ranks with batch 1: rank 1 has one sample for two micro-steps, so its
    # second micro-step is a zero-weight placeholder that keeps it in the allreduce.
    r1 = epoch_plan(3, 0, seed=0, shuffle=False, world_size=2, rank=1, batch_size=1, accum=4)
    assert [mb.count for mb in r1[0].micro] == [1, 0]


def test_digits_split_is_fixed_by_its_seed():
    tr, va = digits()
    tr2, va2 = digits()
    assert len(tr) + len(va) == 1797 and len(va) == 360
    assert (va.targets == va2.targets).all() and (va.inputs == va2.inputs).all()
    assert np.bincount(va.targets.numpy()).min() >= 35  # stratified: every class present
    _, other = digits(seed=1)
    assert not (other.inputs == va.inputs).all()


def test_the_digits_cache_is_made_once_and_a_broken_file_is_made_again(tmp_path, monkeypatch):
    """The split scikit-learn makes is kept in the cache folder; a truncated or empty file
    (a crash mid-write on another machine sharing the home) is a miss, not an error."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    train, val = digits()
    files = list((tmp_path / "distrain").glob("digits-*.npz"))
    assert len(files) == 1 and not list((tmp_path / "distrain").glob(".*"))  # no temp left
    for broken in (files[0].read_bytes()[:1000], b""):
        files[0].write_bytes(broken)
        again, again_val = digits()
        assert torch.equal(again.inputs, train.inputs) and torch.equal(again_val.targets,
                                                                       val.targets)
        assert files[0].stat().st_size > 1000  # made again
    (tmp_path / "a-file").write_text("")  # a cache folder that cannot be made (even as root)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "a-file"))
    assert torch.equal(digits()[0].inputs, train.inputs)


def test_num_workers_auto():
    from distrain.components.data.datasets import ArrayDataset, num_workers

    arrays = ArrayDataset(torch.zeros(4, 2), torch.zeros(4, dtype=torch.long))
    assert num_workers(-1, arrays) == 0  # slicing in memory beats any worker
    assert num_workers(3, arrays) == 3  # an explicit count is kept
    other = torch.utils.data.TensorDataset(torch.zeros(4))
    assert 0 <= num_workers(-1, other) <= 4


def test_epoch_breakdown_and_data_wait_warning(tmp_path, no_dist_env, capsys, monkeypatch):
    import json

    from conftest import train_body

    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    train_body(tmp_path / "fast", ("train.epochs=1",))
    row = json.loads((tmp_path / "fast" / "metrics.jsonl").read_text())
    assert row["data_wait_s"] >= 0 and row["sync_wait_s"] >= 0
    assert row["data_wait_s"] + row["sync_wait_s"] + row["compute_s"] == \
        pytest.approx(row["train_time_s"])
    capsys.readouterr()
    train_body(tmp_path / "slow", ("train.epochs=1", "data.name=faulty:slow_digits",
                                   "data.num_workers=0"))
    slow = json.loads((tmp_path / "slow" / "metrics.jsonl").read_text())
    assert slow["data_wait_s"] / slow["train_time_s"] > 0.5  # 1437 samples × 2 ms of sleep
    assert "waited for data" in capsys.readouterr().out
