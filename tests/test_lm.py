"""Language models: GPT-2-style decoder, token data, per-token loss and accuracy, validation
without a vocabulary-sized confusion matrix, and the GPU benchmark's arms on the CPU."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import ROOT, run_distributed

from distrain.components.data.datasets import tokens
from distrain.components.models import gpt
from distrain.config import load_config
from distrain.errors import ConfigError
from distrain.trainer.run import train

TINY_LM = ("data.name=tokens", "data.args={n: 256, seq_len: 32, vocab_size: 2048, val: 32}",
           "model.name=gpt",
           "model.args={vocab_size: 2048, block_size: 32, n_layer: 1, n_head: 2, n_embd: 32}",
           "optimizer.name=adamw", "optimizer.lr=3e-3", "train.epochs=2", "data.batch_size=16",
           "train.log_every_steps=1000", "logging.plot=false", "validate.mode=sharded")


def lm_body(out_dir, overrides=()):
    return train(load_config(None, [f"run.out_dir={out_dir}", *TINY_LM, *overrides]))


def test_gpt2_small_has_gpt2_small_size_and_flops():
    model = gpt()  # the defaults: GPT-2 small, vocabulary padded to 50304 (as nanoGPT does)
    total = sum(p.numel() for p in model.parameters())
    assert total - model.pos.weight.numel() == pytest.approx(123.69e6, abs=0.01e6)
    # PaLM's count: 6 per weight + 12 · layers · width · tokens of context (attention).
    assert model.flops_per_token(1024) == 6 * (total - 1024 * 768) + 12 * 12 * 768 * 1024
    x = torch.randint(0, 50304, (1, 8))
    assert gpt(n_layer=1)(x).shape == (1, 8, 50304)


def test_token_teacher_is_a_fixed_bigram_chain():
    train_set, val_set = tokens(n=8, seq_len=16, vocab_size=100, val=2, branching=3)
    assert train_set.inputs.shape == (8, 16) and len(val_set) == 2
    assert torch.equal(train_set.inputs[:, 1:], train_set.targets[:, :-1])  # shifted by one
    successors: dict[int, set[int]] = {}
    for a, b in zip(train_set.inputs.flatten().tolist(), train_set.targets.flatten().tolist()):
        successors.setdefault(a, set()).add(b)
    assert max(len(s) for s in successors.values()) <= 3


def test_gpt_learns_the_tokens_config(tmp_path, no_dist_env):
    cfg = load_config(ROOT / "configs/tokens_gpt.yaml",
                      [f"run.out_dir={tmp_path}", "train.epochs=4", "logging.plot=false"])
    summary = train(cfg)
    first = summary["history"][0]
    # From ln(512) = 6.24 towards the teacher's floor ln(4) = 1.39; chance accuracy is 1/512.
    assert first["train_loss"] > 4.5 and summary["val_loss"] < 2.2
    assert 0.15 < summary["val_acc"] <= 0.3  # token accuracy; the teacher allows at most ~1/4
    assert "val_macro_f1" in first  # 512 classes: the confusion matrix is kept


def test_large_vocabulary_is_layout_independent_without_confusion_matrix(tmp_path, no_dist_env):
    one = lm_body(tmp_path / "1x16", ("data.batch_size=16",))
    two = run_distributed(lm_body, 2, tmp_path / "2x8", ("data.batch_size=8",))
    for a, b in zip(one["history"], two[0]["history"]):
        assert a["val_loss"] == pytest.approx(b["val_loss"], rel=1e-5)
        assert a["val_acc"] == pytest.approx(b["val_acc"], abs=1e-3)
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5)
        assert "val_macro_f1" not in a and "val_recall" not in a  # 2048 > 1024 classes
    assert 0 < one["val_acc"] < 1 and one["val_loss"] < math.log(2048)
    w1 = torch.load(tmp_path / "1x16/checkpoints/last.pt", weights_only=True)["model"]
    w2 = torch.load(tmp_path / "2x8/checkpoints/last.pt", weights_only=True)["model"]
    assert max((w1[k] - w2[k]).abs().max().item() for k in w1) < 2e-5


def test_a_per_class_monitor_without_confusion_matrix_is_refused(tmp_path, no_dist_env):
    """Above MAX_CONFUSION_CLASSES there is no val_macro_f1: monitoring it must not silently
    never mark a best epoch. The CLI exits 2 naming the key."""
    import subprocess
    import sys

    with pytest.raises(ConfigError, match=r"checkpoint.monitor: 'val_macro_f1' is not among "
                       r"this run's validation metrics \(val_loss, val_acc\); .* 1024 classes"):
        lm_body(tmp_path / "api", ("checkpoint.monitor=val_macro_f1", "train.epochs=1"))
    out = subprocess.run([sys.executable, "-m", "distrain", "train", *TINY_LM,
                          f"run.out_dir={tmp_path / 'cli'}", "train.epochs=1",
                          "checkpoint.monitor=val_balanced_acc"], capture_output=True, text=True,
                         timeout=300, cwd=ROOT)
    assert out.returncode == 2 and "checkpoint.monitor: 'val_balanced_acc'" in out.stderr
    assert "Traceback" not in out.stderr


def test_gpu_bench_arms_run_tiny_on_cpu():
    from distrain.tools.bench import gpu_rows, launch

    raw = launch("lm", {"model": {"n_layer": 1, "n_embd": 32, "n_head": 2, "vocab_size": 256},
                        "seq_len": 32, "batch": 4, "steps": 2, "rounds": 2, "device": "cpu"})
    assert raw["device"] == "cpu" and raw["tokens_per_epoch"] == 2 * 4 * 32
    # The plain loop and distrain's step do the same arithmetic: bit-identical on the CPU.
    assert raw["weights_bitwise_equal"] and raw["weights_max_abs_diff"] == 0.0
    for arm in ("distrain", "distrain_unchecked"):
        assert raw["train_loss"][arm] == pytest.approx(raw["train_loss"]["reference"], rel=1e-6)
        assert len(raw["epoch_s"][arm]) == len(raw["epoch_s"]["reference"]) == 2
    names = [r.name for r in gpu_rows(raw, "tokens/s")]
    assert names[0] == "tokens/s" and not any("MFU" in n for n in names)  # no peak on a CPU
