"""dist.strategy=fsdp (FSDP2) on real gloo process groups: the same weights as one process
and DDP, accumulation without a reduce-scatter per micro-batch, skips agreed over shards,
sharded checkpoints that verify, resume exactly, reshard and convert, and export."""

from __future__ import annotations

import gc
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT, run_distributed, tiny_config, train_body

from distrain.components.checkpoint import files as ckpt
from distrain.components.checkpoint import store
from distrain.components.checkpoint.sharded import model_weights
from distrain.config import load_config
from distrain.errors import ConfigError
from distrain.trainer.run import train

# Clipping bites (the global norm over the shards must be right for the layouts to agree);
# a step checkpoint every 10 steps: 45 steps an epoch, so step 70 is mid-epoch 2; an EMA of
# the weights (FSDP: of each rank's shards) reported as val_ema_*.
BASE = ("train.epochs=2", "scheduler.name=cosine", "optimizer.weight_decay=1e-4",
        "train.clip_grad_norm=0.5", "checkpoint.every_steps=10", "checkpoint.keep_last=3",
        "train.ema_decay=0.9")
FSDP = "dist.strategy=fsdp"
DIST_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One process 1×32; DDP 2×8 × accumulation 2 and FSDP 2×16, both compiled; FSDP 2×8 ×
    accumulation 2 with activation checkpointing and async saves: the same global batches."""
    saved = {k: os.environ.pop(k) for k in DIST_ENV if k in os.environ}
    root = tmp_path_factory.mktemp("fsdp")
    try:
        summaries = {"1x32": train(tiny_config(root / "1x32", *BASE, "data.batch_size=32"))}
        for name, extra in (("ddp2x8x2", ("data.batch_size=8", "train.grad_accum_steps=2",
                                          "train.compile=true")),
                            ("fsdp2x16", ("data.batch_size=16", FSDP, "train.compile=true",
                                          # no collective in a rank-0 region (sharded saves
                                          # included); the audit sees no false divergence
                                          "dist.debug=true", "dist.audit_every_steps=5")),
                            ("fsdp2x8x2", ("data.batch_size=8", "train.grad_accum_steps=2", FSDP,
                                           "train.activation_checkpointing=true",
                                           "checkpoint.async_save=true"))):
            summaries[name] = run_distributed(train_body, 2, root / name, (*BASE, *extra))[0]
    finally:
        os.environ.update(saved)
    return root, summaries


def ema(summary: dict) -> dict:
    """The last validation's metrics, EMA's included."""
    return summary["history"][-1]


def weights(run: Path, name: str = "last") -> dict[str, torch.Tensor]:
    folder = run / "checkpoints"
    if (folder / f"{name}.dcp").is_dir():
        return model_weights(folder / f"{name}.dcp")
    return torch.load(folder / f"{name}.pt", weights_only=True)["model"]


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def test_fsdp_compile_and_checkpointing_give_the_weights_of_one_process(runs):
    root, summaries = runs
    ref = weights(root / "1x32")
    for name in ("ddp2x8x2", "fsdp2x16", "fsdp2x8x2"):
        assert max_diff(ref, weights(root / name)) < 1e-5, name
        for metric in ("val_loss", "val_ema_loss", "val_ema_acc"):
            assert abs(ema(summaries[name])[metric] - ema(summaries["1x32"])[metric]) < 1e-5
    # The EMA is not the weights: its loss is its own (the check above compares two things).
    assert abs(ema(summaries["1x32"])["val_ema_loss"] - summaries["1x32"]["val_loss"]) > 1e-3
    # The last 20 steps (at a small cosine LR) move the weights far more: the check can fail.
    assert max_diff(ref, weights(root / "fsdp2x16", "step-00000070")) > 1e-3


def test_sharded_checkpoints_are_per_rank_verified_and_pruned(runs):
    folder = runs[0] / "fsdp2x16" / "checkpoints"
    steps = sorted(p.name for p in folder.glob("step-*.dcp"))
    assert steps == ["step-00000070.dcp", "step-00000080.dcp", "step-00000090.dcp"]  # keep_last
    assert not [p for p in folder.iterdir() if p.name.startswith(".")], "temporary files left"
    for path in [*map(folder.joinpath, steps), folder / "last.dcp", folder / "best.dcp"]:
        assert ckpt.verify(path) is None, path
        names = sorted(f.name for f in path.iterdir())
        assert names == [".metadata", "__0_0.distcp", "__1_0.distcp", "host.pt"], names
    # Each rank wrote its own half of the weights and optimizer state.
    sizes = [(folder / "last.dcp" / f"__{r}_0.distcp").stat().st_size for r in (0, 1)]
    assert 0.5 < sizes[0] / sizes[1] < 2, sizes
    # last.dcp holds the newest step's files as hard links: no second write.
    newest = folder / "step-00000090.dcp" / "__1_0.distcp"
    assert (folder / "last.dcp" / "__1_0.distcp").stat().st_ino == newest.stat().st_ino
    manifest = json.loads((folder / "step-00000090.dcp.done").read_text())
    assert set(manifest["files"]) == {".metadata", "__0_0.distcp", "__1_0.distcp", "host.pt"}
    # Written in the background (checkpoint.async_save): the same checkpoints, each verified,
    # holding the weights of their own step (not of a later one).
    folder_async = runs[0] / "fsdp2x8x2" / "checkpoints"
    assert sorted(p.name for p in folder_async.glob("step-*.dcp")) == steps
    for step in steps:
        assert ckpt.verify(folder_async / step) is None
        assert max_diff(model_weights(folder / step), model_weights(folder_async / step)) < 1e-5
    assert not [p for p in folder_async.iterdir() if p.name.startswith(".")]


def test_a_damaged_newest_shard_falls_back_to_the_previous_checkpoint(runs, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(runs[0] / "fsdp2x16", run)
    shard = run / "checkpoints" / "step-00000090.dcp" / "__1_0.distcp"
    shard.write_bytes(shard.read_bytes()[:-100])  # rank 1's shard truncated
    warnings: list[str] = []
    chosen = store.resolve_resume("auto", run, warn=warnings.append)
    assert chosen.name == "step-00000080.dcp"
    assert "__1_0.distcp" in warnings[0] and "truncated" in warnings[0]


def crashed_at_step_70(runs, name: str, tmp_path: Path) -> Path:
    """A copy of run `name` as if it had died right after step 70's checkpoint."""
    run = tmp_path / name
    shutil.copytree(runs[0] / name, run)
    folder = run / "checkpoints"
    for path in folder.iterdir():
        if not path.name.startswith("step-00000070"):
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    return run


def test_resume_mid_epoch_is_exact_and_reshards_to_other_layouts(runs, tmp_path, no_dist_env):
    root, summaries = runs
    ref = weights(root / "fsdp2x16")
    # FSDP 2×16 from its own step 70 (mid-epoch 2): bitwise the uninterrupted run.
    run = crashed_at_step_70(runs, "fsdp2x16", tmp_path)
    resumed = run_distributed(train_body, 2, run, (*BASE, "data.batch_size=16", FSDP))[0]
    assert resumed["val_loss"] == summaries["fsdp2x16"]["val_loss"]
    assert ema(resumed)["val_ema_loss"] == ema(summaries["fsdp2x16"])["val_ema_loss"]
    assert max_diff(ref, weights(run)) == 0.0
    # The same sharded checkpoint in one process (resharded to world size 1) and under DDP.
    ema_loss = ema(summaries["fsdp2x16"])["val_ema_loss"]
    one = tmp_path / "one"
    at_70 = f"checkpoint.resume={run / 'checkpoints' / 'step-00000070.dcp'}"
    summary = train(tiny_config(one, *BASE, "data.batch_size=32", at_70))
    assert max_diff(ref, weights(one)) < 1e-5
    assert abs(ema(summary)["val_ema_loss"] - ema_loss) < 1e-5  # the EMA's shards came along
    ddp = tmp_path / "ddp"
    summary = run_distributed(train_body, 2, ddp, (*BASE, "data.batch_size=16", at_70))[0]
    assert max_diff(ref, weights(ddp)) < 1e-5
    assert abs(ema(summary)["val_ema_loss"] - ema_loss) < 1e-5
    # A DDP checkpoint (one file) resumes an FSDP run, its EMA sharded on the way in.
    fsdp = tmp_path / "from_ddp"
    source = root / "ddp2x8x2" / "checkpoints" / "step-00000070.pt"
    summary = run_distributed(train_body, 2, fsdp, (*BASE, "data.batch_size=16", FSDP,
                                                    f"checkpoint.resume={source}"))[0]
    assert max_diff(weights(root / "ddp2x8x2"), weights(fsdp)) < 1e-5
    assert abs(ema(summary)["val_ema_loss"] - ema(summaries["ddp2x8x2"])["val_ema_loss"]) < 1e-5


def test_export_writes_one_file_that_loads_strictly_into_the_plain_model(runs, tmp_path):
    from safetensors.torch import load_file

    from distrain.components.models import mlp

    root = runs[0]
    out = tmp_path / "fsdp.safetensors"
    cli = subprocess.run([sys.executable, "-m", "distrain", "export", str(root / "fsdp2x16"),
                          "-o", str(out)], capture_output=True, text=True, timeout=120)
    assert cli.returncode == 0, cli.stderr
    assert "best.dcp" in cli.stdout
    assert out.stat().st_mode & 0o644 == 0o644  # readable by others, as files normally are
    model = mlp(in_features=64, hidden=[32], num_classes=10)
    model.load_state_dict(load_file(out), strict=True)
    assert max_diff(model.state_dict(), weights(root / "fsdp2x16", "best")) == 0.0
    from distrain.commands.export import export
    export(root / "ddp2x8x2", tmp_path / "ddp.safetensors", "last")
    model.load_state_dict(load_file(tmp_path / "ddp.safetensors"), strict=True)
    assert max_diff(model.state_dict(), weights(root / "fsdp2x16")) < 1e-5
    bad = subprocess.run([sys.executable, "-m", "distrain", "export", str(tmp_path / "none"),
                          "-o", str(tmp_path / "x.safetensors")], capture_output=True, text=True)
    assert bad.returncode == 2 and "no checkpoint found" in bad.stderr
    assert "Traceback" not in bad.stderr


# --------------------------------------------------------------------------- the step


def accumulation_body(out_dir):
    from distrain.components.data.datasets import epoch_plan
    from distrain.distributed import make_backend
    from distrain.trainer.loop import Trainer

    cfg = tiny_config(out_dir, "train.grad_accum_steps=2", "data.batch_size=8", FSDP)
    backend = make_backend(cfg)
    backend.setup()
    trainer = Trainer(cfg, backend)
    seen = []  # (reduce-scatters so far, full gradient or None) after each micro-batch
    backward = trainer.precision.backward

    def spy(loss):
        backward(loss)
        grads = [p.grad for p in trainer.model.parameters()]
        full = None if grads[0] is None else torch.cat([g.full_tensor().flatten() for g in grads])
        seen.append((backend.grad_reduce_scatters, full))

    trainer.precision.backward = spy
    plan = epoch_plan(len(trainer.train_set), 0, seed=cfg.run.seed, shuffle=True,
                      world_size=2, rank=backend.rank, batch_size=8, accum=2)
    assert trainer.loader.plan() == plan  # the loader's plan: its first step here
    for batch, mb, step in trainer.loader.micro_batches():
        trainer.train_micro_batch(batch, mb.count, last=mb is step.micro[-1])
        if mb is step.micro[-1]:
            break
    del trainer
    gc.collect()
    backend.teardown()
    return {"seen": seen}


def test_accumulation_reduce_scatters_once_and_gives_the_global_mean(tmp_path, no_dist_env):
    from distrain.components.data.datasets import epoch_plan
    from distrain.distributed import LocalBackend
    from distrain.trainer.loop import Trainer

    r0, r1 = run_distributed(accumulation_body, 2, str(tmp_path))
    (first, g_first), (last, g_last) = r0["seen"]
    assert first == 0, "a reduce-scatter ran on a micro-batch before the last"
    assert last == 2  # one per sharded block (two Linear layers), on the last micro-batch only
    assert g_first is None  # the accumulated gradient is not sharded (not synced) yet
    assert torch.equal(g_last, r1["seen"][1][1])
    # The reduced gradient is the mean over the global batch of 32, as on one process.
    backend = LocalBackend()
    backend.setup()
    ref = Trainer(tiny_config(tmp_path / "ref", "data.batch_size=32"), backend)
    plan = epoch_plan(len(ref.train_set), 0, seed=0, shuffle=True, world_size=1, rank=0,
                      batch_size=32, accum=1)
    x, y = ref.train_set[plan[0].micro[0].indices]
    ref.loss_fn(ref.model(x), y).backward()
    expected = torch.cat([p.grad.flatten() for p in ref.model.parameters()])
    assert (expected - g_last).abs().max().item() < 1e-6


def skip_body():
    """An inf in rank 1's shard of the reduced gradients only: every rank must skip (the
    decision is taken over all shards), under fp16 with and without clipping and fp32."""
    from distrain import Engine, MisuseError
    from distrain.distributed import create_backend

    out = {}
    backend = None
    for precision, clip in (("fp16", 1.0), ("fp16", 0.0), ("fp32", 0.0), ("bf16", 1.0)):
        backend = create_backend("torchrun", precision=precision, strategy="fsdp")
        backend.setup()
        eng = Engine(precision, backend=backend)
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        model, opt = eng.setup(model, torch.optim.SGD(model.parameters(), lr=0.1))
        row = []
        for step in range(2):
            eng.micro_batch(count=8, size=16, last=True)
            x = torch.randn(8, 4, generator=torch.Generator().manual_seed(backend.rank))
            with eng.precision.autocast():
                loss = model(x).float().square().mean()
            eng.backward(loss)
            if step == 0 and backend.rank == 1:
                next(model.parameters()).grad.to_local().view(-1)[0] = float("inf")
            before = [p.full_tensor().clone() for p in model.parameters()]
            scale = eng.precision.scale
            taken = eng.step(opt, clip_grad_norm=clip).taken()
            changed = any(not torch.equal(a, p.full_tensor()) for a, p in
                          zip(before, model.parameters()))
            row.append((taken, changed, eng.precision.scale < scale))
        try:
            eng.on_main(lambda m: m(torch.zeros(1, 4)), model)
            refused = ""
        except MisuseError as exc:
            refused = str(exc)
        out[f"{precision} clip {clip}"] = {"steps": row, "refused": refused,
                                           "sharded": type(next(model.parameters())).__name__}
        del eng, model, opt
        gc.collect()
    backend.teardown()
    return out


def test_a_nonfinite_gradient_in_one_rank_shard_skips_the_step_on_every_rank(no_dist_env):
    r0, r1 = run_distributed(skip_body, 2)
    assert r0 == r1  # the same decisions on both ranks
    for mode, seen in r0.items():
        assert seen["sharded"] == "DTensor"
        (skipped, moved, lowered), (taken, moved_after, _) = seen["steps"]
        assert not skipped and not moved, mode  # rank 0's own shard was finite: still skipped
        assert lowered == mode.startswith("fp16"), mode  # the scaler backed off on every rank
        assert taken and moved_after, mode  # the next step is taken: the check can pass
        assert "FSDP model runs on every rank" in seen["refused"]


# --------------------------------------------------------------------------- config


def test_fsdp_config_mistakes_name_the_key(tmp_path):
    from distrain.distributed import create_backend

    with pytest.raises(ConfigError, match="dist.strategy: expected ddp with dist.backend=horovod"):
        load_config(None, [FSDP, "dist.backend=horovod"])
    with pytest.raises(ConfigError, match="dist.strategy: expected ddp under Horovod"):
        create_backend("horovod", strategy="fsdp")
    with pytest.raises(ConfigError, match="model.blocks: no module of class Nope"):
        from distrain.components.blocks import find_blocks
        find_blocks(torch.nn.Sequential(torch.nn.Linear(2, 2)), ["Nope"])
    cli = subprocess.run([sys.executable, "-m", "distrain", "check", FSDP, "dist.backend=horovod",
                          f"run.out_dir={tmp_path}"], capture_output=True, text=True, cwd=ROOT)
    assert cli.returncode == 2 and "Traceback" not in cli.stderr
    assert cli.stderr.startswith("distrain: config error: dist.strategy")


def engine_resume_body(out_dir: str):
    """distrain.Engine under FSDP in a loop of a user's shape (dropout, momentum, StepLR):
    straight through two epochs, saving at step 7; then a fresh model and optimizer resumed
    from that one consolidated file. Same process group for both."""
    from test_engine import toy_problem

    import distrain
    from distrain.distributed import create_backend

    backend = create_backend("torchrun", strategy="fsdp")
    backend.setup()
    path = Path(out_dir) / "ckpt.pt"
    out = []
    for resume in (False, True):
        eng = distrain.Engine(accum=2, seed=3, backend=backend)
        model, opt, sched, loader = toy_problem(eng)
        if resume:
            eng.load_checkpoint(path)
        while loader.epoch < 2:
            for i, (x, y) in enumerate(loader):
                eng.backward(torch.nn.functional.cross_entropy(model(x), y))
                if (i + 1) % 2 == 0 or i + 1 == len(loader):
                    eng.step(opt)
                    if not resume and eng.global_step == 7:
                        eng.save_checkpoint(path)
            sched.step()
        out.append({"weights": torch.cat([p.full_tensor().flatten() for p in model.parameters()]),
                    "step": eng.global_step, "lr": opt.param_groups[0]["lr"]})
        eng.close()
    backend.teardown()
    return out


def test_engine_checkpoint_under_fsdp_is_one_file_and_resumes_bitwise(tmp_path, no_dist_env):
    r0, r1 = run_distributed(engine_resume_body, 2, str(tmp_path))
    straight, resumed = r0
    assert straight["step"] == resumed["step"] and straight["lr"] == resumed["lr"] == 0.025
    assert torch.equal(straight["weights"], resumed["weights"])
    assert torch.equal(r0[1]["weights"], r1[1]["weights"])
    state = torch.load(tmp_path / "ckpt.pt", weights_only=True)  # one consolidated file
    assert state["model"]["0.weight"].shape == (16, 8)  # whole, not a shard
    assert state["global_step"] == 7 and set(state["optimizer"]["state"]) == {0, 1, 2, 3}


def preempted_body(out_dir, overrides):
    """Train until the preemption signal (rank 0 sends it to itself in epoch 1)."""
    from distrain.errors import Preempted

    try:
        train(tiny_config(out_dir, *overrides))
    except Preempted as exc:
        return str(exc)
    return None


def test_preemption_under_fsdp_saves_shards_and_the_relaunch_finishes_the_run(runs, tmp_path,
                                                                             no_dist_env):
    import sys as _sys

    _sys.path.insert(0, str(Path(__file__).parent))  # the fault plugins (tests/faulty.py)
    run = tmp_path / "run"
    args = (*BASE, "data.batch_size=16", FSDP, "checkpoint.every_steps=0", "data.num_workers=0",
            "data.name=faulty:preempting_digits",
            f"data.args={{after: 200, marker: '{tmp_path / 'signalled'}', to_self: true}}")
    stopped = run_distributed(preempted_body, 2, run, args)
    assert stopped[0] == stopped[1] and stopped[0].startswith("stopped by signal 15 at step")
    step = int(stopped[0].split("at step ")[1])
    # In epoch 1 (the ranks agree on a signal about once a second, at the latest at the
    # epoch's end); no step checkpoints were asked for: this one is the signal's.
    assert 0 < step <= 45
    assert [p.name for p in (run / "checkpoints").glob("step-*.dcp")] == [f"step-{step:08d}.dcp"]
    assert ckpt.verify(run / "checkpoints" / f"step-{step:08d}.dcp") is None
    stale = run / "checkpoints" / ".step-00000999.dcp.tmp"  # as a save killed mid-write leaves
    stale.mkdir()
    (stale / "__0_0.distcp").write_bytes(b"half a shard")
    run_distributed(train_body, 2, run, args)
    assert not stale.exists()
    assert max_diff(weights(runs[0] / "fsdp2x16"), weights(run)) < 1e-6


def first_line_body(out_dir, overrides=()):
    """Test body: the line a config run starts with, on this rank."""
    import gc

    from distrain.distributed import make_backend
    from distrain.trainer.loop import Trainer

    cfg = tiny_config(out_dir, *overrides)
    backend = make_backend(cfg)
    backend.setup()
    try:
        trainer = Trainer(cfg, backend)
        line = trainer.first_line()
        trainer.engine.close(wait_for_saves=False)
        del trainer
        gc.collect()
        return line
    finally:
        backend.teardown()


def test_the_run_says_what_it_shards_and_where_it_validates(tmp_path, no_dist_env, capsys):
    """A newcomer could not tell from a run whether FSDP was on, and one process asked for
    FSDP trained unsharded without a word."""
    lines = run_distributed(first_line_body, 2, tmp_path / "two", (FSDP, "data.batch_size=16"))
    assert lines[0] == lines[1] == (
        "distrain: 2 processes (torch.distributed, FSDP2 over gloo: weights, gradients and "
        "optimizer state sharded per block, 1/2 on each rank), device cpu; global batch 32 = "
        "2 × 16 × accum 1, 45 steps an epoch; validation sharded over the ranks (FSDP's "
        "forward runs on every rank)")
    ddp = run_distributed(first_line_body, 2, tmp_path / "ddp", ("data.batch_size=16",))[0]
    assert "(torch.distributed, DDP over gloo: every rank holds the whole model)" in ddp
    assert ddp.endswith("validation on rank 0")
    train(tiny_config(tmp_path / "one", FSDP, "train.epochs=1"))
    out = capsys.readouterr()
    assert "distrain: 1 process (nothing to sync), device cpu; global batch 16" in out.out
    assert "distrain: warning: dist.strategy=fsdp with one process: there is nothing to " \
           "shard (every weight stays on this rank)" in out.err
