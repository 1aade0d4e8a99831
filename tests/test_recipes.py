"""Imbalanced-data recipes: losses, Mixup/CutMix, EMA, per-class metrics, the shipped config."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT, free_port, tiny_config
from sklearn.metrics import balanced_accuracy_score, f1_score

from distrain.components.augment import Mixed, Mixer, compute_loss, cutmix_box
from distrain.components.data.datasets import class_counts, digits_longtail
from distrain.components.losses import LDAM, CrossEntropy, Focal, effective_number_weights
from distrain.components.validation import metrics_from
from distrain.config import AugmentConfig
from distrain.errors import ConfigError
from distrain.trainer.run import train


def test_ldam_margins_follow_the_formula():
    counts = [1000, 100, 10]
    loss = LDAM(counts, max_m=0.5, s=30)
    raw = np.array([1 / c ** 0.25 for c in counts])
    assert torch.allclose(loss.margins, torch.tensor(raw * 0.5 / raw.max(), dtype=torch.float32))
    assert loss.margins[2] == pytest.approx(0.5)  # the rarest class gets max_m
    # The loss is CE of s·(logits - margin at the true class).
    logits, y = torch.tensor([[2.0, 1.0, 0.5]]), torch.tensor([1])
    expected = torch.nn.functional.cross_entropy(30 * torch.tensor([[2.0, 1.0 - loss.margins[1], 0.5]]), y)
    assert loss(logits, y).item() == pytest.approx(expected.item(), rel=1e-6)


def test_ldam_drw_weights_start_at_drw_epoch():
    counts = [500, 50, 5]
    loss = LDAM(counts, drw_epoch=2, beta=0.999)
    w = effective_number_weights(counts, 0.999)
    manual = np.array([(1 - 0.999) / (1 - 0.999 ** n) for n in counts])
    assert torch.allclose(w, torch.tensor(manual / manual.sum() * 3, dtype=torch.float32))
    loss.set_epoch(1)
    assert loss.weight is None
    loss.set_epoch(2)
    assert torch.equal(loss.weight, w)


@pytest.mark.parametrize("loss", [CrossEntropy(weight=[1.0, 2.0, 3.0]), LDAM([50, 5, 1]),
                                  Focal(weight=[1.0, 2.0, 3.0])], ids=["ce", "ldam", "focal"])
def test_loss_constants_move_to_the_logits_device_once_and_stay(loss):
    """Class weights and margins are copied to the device on the first call and kept there: a
    copy from pageable host memory on every step makes the host wait for the GPU each step.
    (The meta device stands in for a GPU here.)"""
    meta = torch.device("meta")
    if isinstance(loss, LDAM):
        loss.drw_epoch = 0
        loss.set_epoch(0)
    out = loss(torch.randn(4, 3, device=meta), torch.zeros(4, dtype=torch.long, device=meta))
    kept = [loss.weight, getattr(loss, "margins", loss.weight)]
    assert out.device == meta and all(t.device == meta for t in kept)
    if isinstance(loss, LDAM):  # the next epoch's DRW weights are the moved ones
        loss.set_epoch(1)
        assert loss.weight.device == meta


def test_ldam_under_fp16_autocast_is_float32_and_finite():
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 3)
    loss_fn = LDAM([100, 10, 1], drw_epoch=0)
    loss_fn.set_epoch(0)
    x, y = torch.randn(16, 8), torch.randint(0, 3, (16,))
    with torch.autocast("cpu", dtype=torch.float16):
        logits = model(x)
        loss = loss_fn(logits, y)
    assert logits.dtype == torch.float16 and loss.dtype == torch.float32
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_mixup_combination_equals_the_definition():
    torch.manual_seed(0)
    logits = torch.randn(6, 4)
    mixed = Mixed(torch.tensor([0, 1, 2, 3, 0, 1]), torch.tensor([3, 2, 1, 0, 1, 0]), lam=0.3)
    # A hard-label loss (LDAM) gets lam·L(y_a) + (1 - lam)·L(y_b).
    ldam = LDAM([10, 20, 30, 40])
    expected = 0.3 * ldam(logits, mixed.y_a) + 0.7 * ldam(logits, mixed.y_b)
    assert compute_loss(ldam, logits, mixed).item() == pytest.approx(expected.item(), rel=1e-6)
    # A soft-target loss gets the mixed, smoothed label vectors.
    soft = mixed.soft(4, smoothing=0.1)
    assert torch.allclose(soft.sum(1), torch.ones(6))
    assert soft[0].tolist() == pytest.approx([0.3 * 0.925 + 0.7 * 0.025, 0.025, 0.025,
                                              0.3 * 0.025 + 0.7 * 0.925])
    ce = CrossEntropy()
    expected = -(soft * torch.log_softmax(logits, 1)).sum(1).mean()
    assert compute_loss(ce, logits, mixed, 0.1).item() == pytest.approx(expected.item(), rel=1e-6)
    assert torch.equal(mixed.dominant(), mixed.y_b)  # lam < 0.5: the partner's label dominates


def test_mixer_mixes_inputs_by_lam():
    torch.manual_seed(1)
    x, y = torch.randn(8, 1, 8, 8), torch.arange(8)
    mixed_x, target = Mixer(AugmentConfig(mixup_alpha=0.4))(x, y)
    partner = target.y_b  # labels are indices here, so y_b is the permutation
    assert torch.allclose(mixed_x, target.lam * x + (1 - target.lam) * x[partner])


def test_cutmix_lam_is_the_pasted_area():
    torch.manual_seed(3)
    x = torch.zeros(16, 1, 8, 8)
    x[:, :, :, :] = torch.arange(16, dtype=torch.float32)[:, None, None, None]  # image i is all i
    out, target = Mixer(AugmentConfig(cutmix_alpha=1.0))(x, torch.arange(16))
    for i in range(16):
        kept = (out[i] == i).float().mean().item()
        if target.y_b[i] != i:
            assert kept == pytest.approx(target.lam)
    y0, y1, x0, x1 = cutmix_box(8, 8, 0.75)
    assert (y1 - y0) * (x1 - x0) <= 16


def test_macro_f1_and_balanced_accuracy_match_scikit_learn():
    rng = np.random.default_rng(0)
    y_true = rng.integers(0, 4, 200)
    y_pred = np.where(rng.random(200) < 0.7, y_true, rng.integers(0, 4, 200))
    confusion = torch.zeros(4, 4)
    for t, p in zip(y_true, y_pred):
        confusion[t, p] += 1
    m = metrics_from([50.0, 200, float(confusion.trace()), 200], confusion)
    assert m["macro_f1"] == pytest.approx(f1_score(y_true, y_pred, average="macro"))
    assert m["balanced_acc"] == pytest.approx(balanced_accuracy_score(y_true, y_pred))
    assert m["acc"] == pytest.approx((y_true == y_pred).mean()) and m["loss"] == 0.25
    # By hand, 2 classes: TP/FN/FP counts give F1 = 2TP / (2TP + FP + FN).
    m2 = metrics_from([0.0, 10, 7, 10], torch.tensor([[3.0, 1.0], [2.0, 4.0]]))
    assert m2["macro_f1"] == pytest.approx((6 / 9 + 8 / 11) / 2)
    assert m2["recall"] == pytest.approx([0.75, 4 / 6])
    # The names checkpoint.monitor accepts (config.VAL_METRICS) are the ones validation makes.
    from distrain.config import VAL_METRICS

    assert sorted(m) == sorted([*VAL_METRICS, "recall"])


def test_ema_matches_its_closed_form_and_torch_bitwise(tmp_path, no_dist_env):
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    from distrain.components.ema import EMA

    p = torch.nn.Linear(1, 1, bias=False)
    ema = EMA(p, 0.9)
    values = [1.0, 2.0, 4.0, 8.0]
    for v in values:
        p.weight.data.fill_(v)
        ema.update_parameters(p)
    expected = values[0]  # the first update copies, then ema = 0.9·ema + 0.1·w
    for v in values[1:]:
        expected = 0.9 * expected + 0.1 * v
    assert ema.module.weight.item() == pytest.approx(expected)
    # Against torch's own update, on a model with float and integer (BatchNorm) buffers.
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    ours = EMA(net, 0.7)
    theirs = AveragedModel(net, multi_avg_fn=get_ema_multi_avg_fn(0.7), use_buffers=True)
    for _ in range(5):
        net(torch.randn(8, 3)).sum().backward()
        with torch.no_grad():
            for w in net.parameters():
                w -= 0.1 * w.grad
        ours.update_parameters(net)
        theirs.update_parameters(net)
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(ours.state_dict().values(),
                                                  theirs.state_dict().values()))
    assert int(ours.module[1].num_batches_tracked) == 2  # integer buffer averaged like torch
    # In a run: validated alongside, checkpointed, selectable as the monitor.
    out = train(tiny_config(tmp_path, "train.ema_decay=0.9", "checkpoint.monitor=val_ema_acc"))
    assert "val_ema_acc" in out["history"][-1] and "val_ema_loss" in out["history"][-1]
    state = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=True)
    assert state["ema"]["n_averaged"].item() == out["history"][-1]["step"]


def test_class_counts_come_from_targets_once():
    train_set, _ = digits_longtail(imbalance_ratio=20)
    counts = class_counts(train_set)
    assert counts[0] / counts[-1] >= 10 and sum(counts) == len(train_set)
    with pytest.raises(ConfigError, match="augment.label_smoothing: expected 0 with loss 'ldam'"):
        train(tiny_config("/tmp/unused", "loss.name=ldam", "augment.mixup_alpha=0.2",
                          "augment.label_smoothing=0.1"))


def test_every_steps_validation_and_early_stop_in_evaluations(tmp_path, no_dist_env):
    # mode=max on a falling loss: every evaluation after the first is "no improvement".
    out = train(tiny_config(tmp_path, "train.epochs=5", "validate.every_steps=20",
                            "checkpoint.mode=max", "train.early_stop_patience=3",
                            "loss.name=focal", "train.clip_grad_value=0.5"))
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "train_loss" not in r]
    # 90 steps per epoch: evaluations at steps 20, 40, 60, 80 (1 + patience 3), then stop; the
    # epoch's row reuses the last evaluation rather than validating the same weights again.
    assert [r["step"] for r in evals] == [20, 40, 60, 80]
    assert out["epochs"] == 1 and len(rows) == 5 and rows[-1]["step"] == 80
    assert rows[-1]["val_loss"] == evals[-1]["val_loss"]
    assert all(math.isfinite(r["val_macro_f1"]) for r in evals)


@pytest.mark.parametrize("nproc", [1, 2])
def test_recipe_runs_end_to_end(tmp_path, nproc):
    args = ["--config", str(ROOT / "configs" / "imbalanced_digits.yaml"), f"run.out_dir={tmp_path}",
            "train.epochs=6", "loss.args={max_m: 0.5, s: 30, drw_epoch: 3}"]
    runner = ([str(Path(sys.executable).parent / "torchrun"), "--nproc-per-node", str(nproc),
               "--master-port", str(free_port()), "-m", "distrain", "train"] if nproc > 1
              else [sys.executable, "-m", "distrain", "train"])
    out = subprocess.run(runner + args, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 6 and all(math.isfinite(r["train_loss"]) for r in rows)
    assert rows[-1]["val_balanced_acc"] > 0.6 and len(rows[-1]["val_recall"]) == 10
    best = torch.load(tmp_path / "checkpoints" / "best.pt", weights_only=True)
    assert best["tracker"]["best"] == max(r["val_balanced_acc"] for r in rows)
    assert best["precision"]["scaler"] is not None  # fp16 with a GradScaler
