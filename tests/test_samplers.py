"""data.sampler: a class-balanced (or any torch) sampler keeps layouts and resumes exact."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from conftest import run_distributed, train_body

from distrain.components.data.datasets import digits_longtail
from distrain.components.data.samplers import class_balanced, epoch_order

BALANCED = ("data.name=digits_longtail", "data.args={imbalance_ratio: 20}",
            "data.sampler={name: class_balanced}")


def rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def weights(out: Path) -> dict:
    return torch.load(Path(out) / "checkpoints" / "last.pt", weights_only=True)


def test_class_balanced_draws_every_class_about_equally_and_per_epoch():
    train, _ = digits_longtail(20.0)
    counts = torch.bincount(train.targets)
    assert counts.max() / counts.min() >= 19  # the long tail
    sampler = class_balanced(train)
    order = epoch_order(sampler, epoch=0, seed=0)
    drawn = torch.bincount(train.targets[torch.as_tensor(order)], minlength=10)
    assert len(order) == len(train)
    assert drawn.min() / drawn.max() > 0.6  # balanced up to sampling noise
    again = epoch_order(class_balanced(train), epoch=0, seed=0)
    assert (order == again).all()  # a function of (seed, epoch)
    assert not (order == epoch_order(sampler, epoch=1, seed=0)).all()
    without = epoch_order(class_balanced(train, replacement=False), epoch=0, seed=0)
    assert sorted(without.tolist()) == list(range(len(train)))  # each sample once


def test_class_balanced_layouts_agree_and_need_no_targets(tmp_path, no_dist_env):
    one = train_body(tmp_path / "one", (*BALANCED, "data.batch_size=32"))
    run_distributed(train_body, 2, tmp_path / "two", (*BALANCED, "data.batch_size=16"))
    a, b = weights(tmp_path / "one")["model"], weights(tmp_path / "two")["model"]
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5
    # The same run on a data set without `targets`: labels are read sample by sample.
    plain = train_body(tmp_path / "plain", ("data.name=user_code:digits_longtail_without_targets",
                                            "data.sampler={name: class_balanced}",
                                            "data.batch_size=32"))
    c = weights(tmp_path / "plain")["model"]
    assert all(torch.equal(a[k], c[k]) for k in a)
    assert plain["val_loss"] == one["val_loss"]


def test_mid_epoch_resume_with_a_sampler_is_bitwise(tmp_path, no_dist_env):
    common = (*BALANCED, "data.batch_size=32", "checkpoint.every_steps=7")
    train_body(tmp_path / "straight", common)
    train_body(tmp_path / "cut", common)
    folder = tmp_path / "cut" / "checkpoints"
    steps = sorted(folder.glob("step-*.pt"))
    newest = weights(tmp_path / "straight")["global_step"]
    assert steps[-1].name == f"step-{newest:08d}.pt" and len(steps) == 2
    for path in (steps[-1], steps[-1].with_name(steps[-1].name + ".done")):
        path.unlink()  # the newest (epoch-end) checkpoint lost: resume mid-epoch 2
    train_body(tmp_path / "cut", common)
    a, b = weights(tmp_path / "straight"), weights(tmp_path / "cut")
    assert a["global_step"] == b["global_step"]
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    # The resumed epoch's training sums (rank streams, sums so far) match too.
    assert [r["train_loss"] for r in rows(tmp_path / "cut")] == \
        [r["train_loss"] for r in rows(tmp_path / "straight")]


def test_a_torch_sampler_by_import_path(tmp_path, no_dist_env):
    args = ("data.sampler={name: 'torch.utils.data:RandomSampler', args: {replacement: true}}",
            "train.epochs=1")
    a = train_body(tmp_path / "a", args)
    b = train_body(tmp_path / "b", args)
    plain = train_body(tmp_path / "plain", ("train.epochs=1",))
    assert a["history"][0]["train_loss"] == b["history"][0]["train_loss"]
    assert a["history"][0]["train_loss"] != plain["history"][0]["train_loss"]
