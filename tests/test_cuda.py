"""distrain on a CUDA device. These need a GPU and are skipped without one: CI has none, so
they are NOT part of CI's coverage. Run them where a GPU is, with `./launcher/gpu-check`."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, tiny_config

from distrain.trainer.run import train

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def weights(out_dir):
    return torch.load(out_dir / "checkpoints" / "last.pt", weights_only=True)


def test_fp16_gradscaler_trains_on_cuda_and_checkpoints_its_scale(tmp_path, no_dist_env):
    summary = train(tiny_config(tmp_path, "run.device=cuda", "train.precision=fp16",
                                "train.epochs=5", "train.clip_grad_norm=1.0"))
    assert summary["val_acc"] > 0.9
    state = weights(tmp_path)
    assert state["precision"]["scaler"]["scale"] > 1.0  # a live scaler, not a no-op
    assert state["precision"]["skipped_steps"] <= 3  # only the scale search's first overflows
    assert all(v.device.type == "cpu" for v in state["model"].values())  # loadable anywhere


@pytest.mark.parametrize("async_save", ["false", "true"])
def test_resume_on_cuda_is_bitwise_exact(tmp_path, no_dist_env, async_save):
    # plateau, not cosine: a cosine schedule's length is train.epochs, which the resume raises
    common = ("run.device=cuda", "train.precision=bf16", "optimizer.name=adamw",
              "optimizer.lr=3e-3", "scheduler.name=plateau", "scheduler.args={patience: 0}",
              f"checkpoint.async_save={async_save}")
    train(tiny_config(tmp_path / "straight", *common, "train.epochs=4"))
    train(tiny_config(tmp_path / "resumed", *common, "train.epochs=2"))
    train(tiny_config(tmp_path / "resumed", *common, "train.epochs=4"))
    a, b = weights(tmp_path / "straight"), weights(tmp_path / "resumed")
    assert a["global_step"] == b["global_step"] > 0 and a["scheduler"] == b["scheduler"]
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k


def test_ldam_mixup_fp16_recipe_runs_finite_on_cuda(tmp_path, no_dist_env):
    from distrain.config import load_config

    cfg = load_config(ROOT / "configs/imbalanced_digits.yaml",
                      [f"run.out_dir={tmp_path}", "run.device=cuda", "train.epochs=4",
                       "loss.args={max_m: 0.5, s: 30, drw_epoch: 2}", "logging.plot=false"])
    summary = train(cfg)
    assert all(torch.isfinite(torch.tensor(r["train_loss"])) for r in summary["history"])
    assert summary["history"][-1]["skipped_steps"] <= 5
    assert summary["val_acc"] > 0.3


def torchrun_digits(tmp_path, *overrides: str) -> tuple[int, dict, list[str]]:
    """(processes, environment, command) of a bf16 digits run on up to 2 GPUs."""
    nproc = min(torch.cuda.device_count(), 2)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"),
                                                         os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
           str(nproc), "-m", "distrain", "train", "--config", str(ROOT / "configs/digits.yaml"),
           f"run.out_dir={tmp_path}", "run.device=cuda", "train.precision=bf16",
           "logging.plot=false", *overrides]
    return nproc, env, cmd


def test_torchrun_on_nccl_with_sharded_validation(tmp_path):
    """The NCCL path: process group on the GPU, DDP with device_ids, validation all-reduced."""
    nproc, env, cmd = torchrun_digits(tmp_path, "train.epochs=3", "validate.mode=sharded")
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    state = weights(tmp_path)
    assert state["world_size"] == nproc and state["epoch"] == 3
    assert state["tracker"]["best_epoch"] >= 1
    check = subprocess.run(cmd[:cmd.index("train")] + ["check", "run.device=cuda"],
                           capture_output=True, text=True, env=env, timeout=300)
    assert check.returncode == 0 and "device cuda:0" in check.stdout, check.stderr[-3000:]


def test_language_model_arms_agree_on_cuda(tmp_path):
    from distrain.tools.bench import launch

    raw = launch("lm", {"model": {"n_layer": 2, "n_embd": 128, "n_head": 4, "vocab_size": 4096},
                        "seq_len": 128, "batch": 8, "steps": 4, "rounds": 1})
    assert raw["device"] != "cpu" and raw["peak_memory_bytes"]["distrain"][0] > 0
    # distrain's fused AdamW and the plain loop's foreach AdamW round differently, and Adam
    # amplifies that for tiny gradients: the losses agree, the weights only roughly.
    assert raw["weights_max_abs_diff"] < 2e-2
    for arm in ("distrain", "distrain_unchecked"):
        for a, b in zip(raw["train_loss"][arm], raw["train_loss"]["reference"]):
            assert a == pytest.approx(b, rel=2e-3)


def test_fused_adamw_with_gradscaler_skips_overflowing_steps_on_cuda(tmp_path, no_dist_env):
    """fp16 LDAM (s=30) overflows the scaler's first steps: the fused AdamW must skip them
    and stay finite (fused SGD did not, so SGD is not fused)."""
    from distrain.config import load_config

    cfg = load_config(ROOT / "configs/imbalanced_digits.yaml",
                      [f"run.out_dir={tmp_path}", "run.device=cuda", "train.epochs=3",
                       "optimizer.name=adamw", "optimizer.lr=1e-3", "logging.plot=false"])
    summary = train(cfg)
    state = weights(tmp_path)
    assert state["optimizer"]["param_groups"][0]["fused"] is True
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    assert summary["history"][-1]["skipped_steps"] >= 1  # the scale search did overflow
    assert summary["val_acc"] > 0.3


@pytest.mark.parametrize("recipe", [(), ("loss.name=ldam", "loss.args={drw_epoch: 0}",
                                            "augment.mixup_alpha=0.2")], ids=["ce", "ldam-mixup"])
def test_a_bf16_fused_adamw_step_never_synchronises_with_the_device(tmp_path, no_dist_env,
                                                                     recipe):
    """The NaN/inf skip, the schedule, the EMA, LDAM's margins and weights, Mixup's permutation,
    all without a host wait: with torch's sync debug mode set to "error", a synchronising call
    in a train step raises. A NaN gradient is still skipped, one read later.
    (Written in a session without a GPU: not yet run.)"""
    from conftest import one_epoch

    cfg = tiny_config(tmp_path, "run.device=cuda", "train.precision=bf16", "optimizer.name=adamw",
                      "scheduler.name=cosine", "train.ema_decay=0.9", "train.epochs=1", *recipe)
    steps = [0]

    def patch(trainer, backend):
        assert trainer.optimizer.defaults["fused"]  # the CUDA default for adamw
        inner, clean = trainer.train_micro_batch, trainer.loss_fn  # accum 1: one a step
        if hasattr(clean, "set_epoch"):
            clean.set_epoch(0)  # LDAM's re-weighting on (the wrapper below hides set_epoch)

        def strict(*args):
            steps[0] += 1
            torch.cuda.set_sync_debug_mode("error" if steps[0] > 1 else "default")
            try:
                return inner(*args)
            finally:
                torch.cuda.set_sync_debug_mode("default")

        def loss_fn(logits, y):  # step 7's loss is NaN (not under the sync check: no read)
            return clean(logits, y) * (float("nan") if steps[0] == 7 else 1.0)
        trainer.train_micro_batch, trainer.loss_fn = strict, loss_fn

    out = one_epoch(cfg, patch, RuntimeError)
    assert out["error"] is None and steps[0] > 40
    assert out["skipped"] == 1 and out["schedule"] == out["step"] - 1
    assert torch.isfinite(out["weights"]).all() and torch.isfinite(out["ema"]).all()


def test_validation_batches_never_synchronise_with_the_device():
    """evaluate() keeps its sums and confusion matrix on the device (sync debug mode "error"
    raises on any synchronising call) and counts what a CPU evaluation counts."""
    from distrain.components.losses import CrossEntropy
    from distrain.components.models import mlp
    from distrain.components.precision import Precision
    from distrain.components.validation import evaluate

    torch.manual_seed(0)
    model = mlp(64, [32], 10)
    batches = [(torch.randn(16, 64), torch.randint(10, (16,))) for _ in range(5)]
    cpu = evaluate(model, batches, CrossEntropy(), Precision("fp32", torch.device("cpu")),
                   torch.device("cpu"))
    cuda = torch.device("cuda")
    pinned = [(x.pin_memory(), y.pin_memory()) for x, y in batches]
    model.cuda()
    precision = Precision("fp32", cuda)
    torch.cuda.set_sync_debug_mode("error")
    try:
        sums, confusion, _ = evaluate(model, pinned, CrossEntropy(), precision, cuda)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.equal(confusion.cpu(), cpu[1]) and sums[1:].tolist() == cpu[0][1:].tolist()
    assert sums[0].item() == pytest.approx(cpu[0][0].item(), rel=1e-4)


def test_own_loop_through_the_engine_on_cuda_fp16(tmp_path):
    """examples/own_loop.py (distrain.Engine) on the GPU: fp16 autocast + the engine's
    GradScaler, pinned batches, the sharded exact mean; its weights land on the CPU."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env["PYTHONPATH"] = str(ROOT / "src")
    done = subprocess.run([sys.executable, str(ROOT / "examples" / "own_loop.py"), "--out",
                           str(tmp_path), "--precision", "fp16", "--epochs", "6", "--accum", "2",
                           "--batch-size", "16"], capture_output=True, text=True, env=env,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["val_acc"] > 0.7
    best = torch.load(tmp_path / "best.pt", weights_only=True)
    assert all(t.device.type == "cpu" and torch.isfinite(t).all() for t in best.values())


def test_engine_step_on_cuda_with_fused_adamw_reads_no_flag_until_asked(no_dist_env):
    """Engine.step with fused AdamW on CUDA decides a NaN skip on the device: the outcome is
    undecided until taken() is read, and then counted once."""
    import distrain

    eng = distrain.Engine(precision="bf16", backend="local", device="cuda")
    try:
        model = torch.nn.Linear(8, 4)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
        model, opt = eng.setup(model, opt)
        data = torch.utils.data.TensorDataset(torch.randn(32, 8), torch.randint(0, 4, (32,)))
        outcomes, undecided = [], []
        for x, y in eng.loader(data, batch_size=16):
            x, y = x.to(eng.device), y.to(eng.device)
            loss = torch.nn.functional.cross_entropy(model(x), y)
            eng.backward(loss * (float("nan") if not outcomes else 1.0))
            outcomes.append(eng.step(opt))
            undecided.append(not outcomes[-1].decided)  # before anything reads the flag
        assert undecided == [True, True]
        assert outcomes[0].taken() is False and outcomes[1].taken() is True
        assert eng.skipped_steps == 1
    finally:
        eng.close()


def test_fsdp_on_nccl_with_fused_adamw_compile_and_checkpointing(tmp_path):
    """The FSDP path on CUDA: fully_shard over NCCL, bf16 parameters with fp32 reduction,
    fused AdamW on sharded (DTensor) parameters with its device-side skip, torch.compile and
    activation checkpointing; the sharded checkpoint verifies and exports to one file."""
    _, env, cmd = torchrun_digits(tmp_path, "dist.strategy=fsdp", "optimizer.name=adamw",
                                  "optimizer.lr=3e-3", "train.compile=true",
                                  "train.activation_checkpointing=true", "train.epochs=4",
                                  "checkpoint.every_steps=7")
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    from distrain.components.checkpoint import files as ckpt

    last = tmp_path / "checkpoints" / "last.dcp"
    assert ckpt.verify(last) is None
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["val_acc"] > 0.8, rows[-1]
    out = tmp_path / "model.safetensors"
    export = subprocess.run([sys.executable, "-m", "distrain", "export", str(tmp_path), "-o",
                             str(out)], capture_output=True, text=True, env=env, timeout=300)
    assert export.returncode == 0, export.stderr[-3000:]
    from safetensors.torch import load_file

    from distrain.components.models import small_cnn
    small_cnn(1, 10, 32, batch_norm=True).load_state_dict(load_file(out), strict=True)
