"""validate.metrics (functions and update/compute objects) and validate.sets: exact under
sharded validation, the same as rank-0 validation, usable as checkpoint.monitor."""

from __future__ import annotations

import pytest
from conftest import run_distributed, tiny_config, train_body

from distrain.errors import ConfigError

USER = ("validate.metrics={top1: 'user_code:top1', macro_recall: {name: 'user_code:MacroRecall', "
        "args: {num_classes: 10}}}",
        "validate.sets={again: {name: 'user_code:digits_validation_again'}}",
        "checkpoint.monitor=val_macro_recall")


def test_user_metrics_and_sets_are_exact_in_every_mode(tmp_path, no_dist_env):
    one = train_body(tmp_path / "one", (*USER, "data.batch_size=32"))["history"]
    two = run_distributed(train_body, 2, tmp_path / "two",
                          (*USER, "data.batch_size=16", "validate.mode=sharded"))[0]["history"]
    for a, b in zip(one, two):
        # A function metric is a per-batch mean reduced like the loss: top-1 is val_acc.
        assert a["val_top1"] == pytest.approx(a["val_acc"], abs=1e-12)
        assert b["val_top1"] == pytest.approx(b["val_acc"], abs=1e-12)
        # An object metric sees every rank's outputs in order: macro recall is balanced acc.
        assert a["val_macro_recall"] == pytest.approx(a["val_balanced_acc"], abs=1e-12)
        assert b["val_macro_recall"] == pytest.approx(b["val_balanced_acc"], abs=1e-12)
        assert b["val_macro_recall"] == pytest.approx(a["val_macro_recall"], abs=1e-12)
        # The second set is the same data: the same numbers under its own prefix.
        assert a["val_again_loss"] == a["val_loss"] and a["val_again_top1"] == a["val_top1"]
        assert b["val_again_loss"] == pytest.approx(b["val_loss"], rel=1e-12)


def test_a_user_metric_decides_the_best_checkpoint(tmp_path, no_dist_env):
    out = train_body(tmp_path, (*USER, "train.epochs=3"))
    scores = [r["val_macro_recall"] for r in out["history"]]
    assert out["monitor"] == "val_macro_recall" and out["best"] == max(scores)
    assert out["best_epoch"] == scores.index(max(scores)) + 1


def test_a_bad_metric_entry_names_its_key(tmp_path):
    with pytest.raises(ConfigError, match="validate.metrics.top1: cannot import module"):
        from distrain.components.metrics import UserMetrics

        UserMetrics(tiny_config(tmp_path, "validate.metrics={top1: 'nope:f'}").validate.metrics)
    with pytest.raises(ConfigError, match="validate.metrics: expected none with train.step"):
        tiny_config(tmp_path, "validate.metrics={top1: 'user_code:top1'}", "train.step=m:f")
    with pytest.raises(ConfigError, match="checkpoint.monitor: expected one of"):
        tiny_config(tmp_path, "checkpoint.monitor=val_top1")  # no metrics given: a typo
