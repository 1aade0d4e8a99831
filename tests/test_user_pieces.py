"""The config trainer with pieces shaped like users' code: nn.Module losses, torch's own
schedulers by import path (per epoch, per step, plateau on the monitored metric)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import run_distributed, tiny_config, train_body

from distrain.components.scheduling import Schedule
from distrain.config import SchedulerConfig
from distrain.errors import ConfigError
from distrain.trainer.run import train


def rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def weights(out: Path) -> dict:
    return torch.load(Path(out) / "checkpoints" / "last.pt", weights_only=True)["model"]


def test_an_nn_module_loss_trains_and_validates_in_every_layout(tmp_path, no_dist_env):
    """The loss our users write (nn.Module with a buffer, forward(x, target)) crashed at the
    first validation (Module.eval taken for a validation loss). Now: 1 × 32 = 2 × 16."""
    module = ("loss.name=user_code:ldam_module", "loss.args={s: 2.0}")
    one = train_body(tmp_path / "one", (*module, "data.batch_size=32"))
    run_distributed(train_body, 2, tmp_path / "two", (*module, "data.batch_size=16"))
    a, b = weights(tmp_path / "one"), weights(tmp_path / "two")
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5
    assert one["val_acc"] > 0.8 and 0 < one["val_loss"] < 10
    # It is the module's own loss on validation too: the built-in LDAM at the same s and
    # margins reports its scaled cross-entropy (without margins), which is smaller.
    builtin = train_body(tmp_path / "builtin", ("loss.name=ldam", "loss.args={s: 2.0}",
                                                "data.batch_size=32"))
    assert builtin["val_loss"] < one["val_loss"]


def test_torch_loss_module_by_import_path(tmp_path, no_dist_env):
    out = train_body(tmp_path, ("loss.name=torch.nn:CrossEntropyLoss",
                                "loss.args={label_smoothing: 0.1}"))
    assert out["val_acc"] > 0.8


def test_step_lr_counts_epochs_as_torch_documents_it(tmp_path, no_dist_env):
    out = train_body(tmp_path, ("scheduler.name=torch.optim.lr_scheduler:StepLR",
                                "scheduler.args={step_size: 2, gamma: 0.5}", "train.epochs=5"))
    assert [r["lr"] for r in out["history"]] == pytest.approx([0.05, 0.025, 0.025, 0.0125,
                                                                0.0125])


def test_a_step_interval_scheduler_steps_every_optimizer_step(tmp_path, no_dist_env):
    # 1437 samples / 16 = 90 steps an epoch; LinearLR over 45 steps reaches its end mid-epoch 1.
    out = train_body(tmp_path, ("scheduler.name=torch.optim.lr_scheduler:LinearLR",
                                "scheduler.args={start_factor: 1.0, end_factor: 0.1, "
                                "total_iters: 45}", "scheduler.interval=step", "train.epochs=1"))
    assert out["history"][0]["lr"] == pytest.approx(0.005)


def plateau_body(out_dir, overrides):
    """Train; return the LRs this rank saw after each epoch."""
    summary = train(tiny_config(out_dir, *overrides))
    return [r["lr"] for r in summary["history"]]


def test_reduce_lr_on_plateau_gets_the_agreed_metric_on_every_rank(tmp_path, no_dist_env):
    # mode max on val_acc with threshold 1 (never "improves"): the LR halves after every
    # validation past patience 0, decided on rank 0 and adopted by rank 1.
    overrides = ("scheduler.name=torch.optim.lr_scheduler:ReduceLROnPlateau",
                 "scheduler.args={mode: max, factor: 0.5, patience: 0, threshold: 1.0}",
                 "checkpoint.monitor=val_acc", "train.epochs=3", "dist.audit_every_steps=20")
    r0, r1 = run_distributed(plateau_body, 2, str(tmp_path), overrides)
    assert r0 == r1 == pytest.approx([0.05, 0.025, 0.0125])


def test_scheduler_interval_on_a_builtin_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="scheduler.interval: expected auto with the built-in"):
        tiny_config(tmp_path, "scheduler.name=cosine", "scheduler.interval=epoch")


def test_plateau_scheduler_state_carries_its_lr():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    cfg = SchedulerConfig(name="torch.optim.lr_scheduler:ReduceLROnPlateau",
                          args={"factor": 0.5, "patience": 0})
    s = Schedule(opt, cfg, "min", 10, 100)
    for metric in (1.0, 1.0, 1.0):
        s.observe(metric)
    assert s.lr == pytest.approx(0.25)
    other = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    t = Schedule(other, cfg, "min", 10, 100)
    t.load_state_dict(s.state_dict())
    assert t.lr == pytest.approx(0.25)
    s.step(), t.step()  # an optimizer step does not move a plateau scheduler
    assert s.lr == t.lr == pytest.approx(0.25)


def test_ldam_class_counts_from_a_data_set_without_targets(tmp_path, no_dist_env):
    """Class counts come from `targets` when there is one, else from the samples (read once,
    on rank 0): the same run either way."""
    ldam = ("loss.name=ldam", "loss.args={s: 2.0}")
    a = train_body(tmp_path / "a", ("data.name=digits_longtail", *ldam))
    b = train_body(tmp_path / "b", ("data.name=user_code:digits_longtail_without_targets", *ldam))
    assert a["val_loss"] == b["val_loss"] and a["val_acc"] == b["val_acc"]
