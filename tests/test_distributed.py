"""Distributed behaviour on real gloo process groups (2 spawned processes, torchrun's env)."""

import contextlib
import gc
import json

import pytest
import torch
from conftest import flat, run_distributed, tiny_config, train_body

from distrain.components.data.datasets import epoch_plan
from distrain.components.validation import validate
from distrain.distributed import LocalBackend, make_backend
from distrain.trainer.loop import Trainer
from distrain.trainer.run import train


def flat_grads(model):
    return torch.cat([p.grad.detach().flatten().clone() for p in model.parameters()])


def accumulation_body(out_dir):
    cfg = tiny_config(out_dir, "train.grad_accum_steps=2", "data.batch_size=8")
    backend = make_backend(cfg)
    backend.setup()
    trainer = Trainer(cfg, backend)
    raw = backend.unwrap(trainer.model)
    seen = []  # (gradient, allreduce calls so far) after each micro-step's backward
    backward = trainer.precision.backward

    def spy(loss):
        backward(loss)
        seen.append((flat_grads(raw), backend.grad_allreduces))  # distrain's DDP hook counts

    trainer.precision.backward = spy
    plan = epoch_plan(len(trainer.train_set), 0, seed=cfg.run.seed, shuffle=True,
                      world_size=2, rank=backend.rank, batch_size=8, accum=2)
    assert trainer.loader.plan() == plan  # the loader's plan: its first step here
    for batch, mb, step in trainer.loader.micro_batches():
        trainer.train_micro_batch(batch, mb.count, last=mb is step.micro[-1])
        if mb is step.micro[-1]:
            break
    weights = torch.cat([p.detach().flatten() for p in raw.parameters()])
    del trainer  # free DDP before its process group goes (see distrain.trainer.run.train)
    gc.collect()
    backend.teardown()
    return {"seen": seen, "weights": weights, "buckets": backend.grad_allreduces}


def test_accumulation_syncs_once_and_gives_the_global_mean(tmp_path, no_dist_env):
    r0, r1 = run_distributed(accumulation_body, 2, str(tmp_path))
    (g0a, c0a), (g0b, c0b) = r0["seen"]
    (g1a, _), (g1b, _) = r1["seen"]
    assert c0a == 0, "an allreduce ran during a no_sync micro-step"
    assert c0b >= 1 and r0["buckets"] == c0b, "exactly one set of allreduces, on the last micro-step"
    assert not torch.allclose(g0a, g1a), "micro-step gradients should be local and differ"
    assert torch.equal(g0b, g1b), "after the step's allreduce every rank holds the same gradient"
    assert torch.equal(r0["weights"], r1["weights"])

    # The synced gradient is the mean over the whole global batch of 32, as on one process.
    cfg = tiny_config(tmp_path / "ref", "data.batch_size=32")
    backend = LocalBackend()
    backend.setup()
    ref = Trainer(cfg, backend)
    plan = epoch_plan(len(ref.train_set), 0, seed=0, shuffle=True, world_size=1, rank=0,
                      batch_size=32, accum=1)
    x, y = ref.train_set[plan[0].micro[0].indices]
    ref.loss_fn(ref.model(x), y).backward()
    diff = (flat_grads(ref.model) - g0b).abs().max().item()
    assert diff < 1e-6, diff


def sync_body(out_dir, precision):
    """One backward through distrain's DDP with each rank's loss × loss_factor / world_size
    (what the loop does), on different data per rank; and the local gradients."""
    cfg = tiny_config(out_dir, f"train.precision={precision}")
    backend = make_backend(cfg)
    backend.setup()
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    local = torch.nn.Linear(4, 3)
    local.load_state_dict(model.state_dict())
    wrapped = backend.wrap_model(model)
    x = torch.randn(8, 4, generator=torch.Generator().manual_seed(backend.rank))
    (wrapped(x).square().mean() * backend.loss_factor() / backend.world_size).backward()
    local(x).square().mean().backward()
    out = {"factor": backend.loss_factor(), "synced": model.weight.grad.clone(),
           "local": local.weight.grad.clone(), "allreduces": backend.grad_allreduces}
    del wrapped
    gc.collect()
    backend.teardown()
    return out


@pytest.mark.parametrize("precision, factor", [("fp32", 1), ("fp16", 2)])
def test_gradient_sync_gives_the_mean(tmp_path, precision, factor, no_dist_env):
    """fp32/bf16: the loss is divided by world_size and the buckets summed (no averaging pass);
    fp16 keeps DDP's divide-then-sum (a divided loss would underflow sooner). Both: the mean."""
    r0, r1 = run_distributed(sync_body, 2, str(tmp_path), precision)
    assert r0["factor"] == r1["factor"] == factor and r0["allreduces"] == 1
    assert not torch.equal(r0["local"], r1["local"])
    mean = (r0["local"] + r1["local"]) / 2
    assert torch.equal(r0["synced"], r1["synced"])
    assert torch.allclose(r0["synced"], mean, rtol=1e-6, atol=1e-7), (r0["synced"] - mean).abs().max()


def restart_body(out_dir, steps, restart_at, accum):
    """SGD on a 3-layer MLP of 2.1 MB (two DDP buckets of about 1 MB once rebuilt) with
    different data on every rank; at `restart_at` the model is saved and a new model and DDP
    are built from it, as a resumed process would. Returns the weights and the comm hook's
    state after each phase."""
    from distrain.distributed.torchrun import _SyncState

    cfg = tiny_config(out_dir)
    backend = make_backend(cfg)
    backend.setup()

    def fresh(state=None):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(512, 512), torch.nn.Tanh(),
                                    torch.nn.Linear(512, 512), torch.nn.Tanh(),
                                    torch.nn.Linear(512, 10))
        if state is not None:
            model.load_state_dict(state)
        return model, backend.wrap_model(model)

    model, wrapped = fresh()
    phases = []
    for step in range(steps):
        if step == restart_at:
            hook_state = next(s for _, s in wrapped._comm_hooks if isinstance(s, _SyncState))
            phases.append({"phase": hook_state.phase, "buckets": len(hook_state.layout)})
            state = {k: v.clone() for k, v in model.state_dict().items()}
            del wrapped
            gc.collect()
            model, wrapped = fresh(state)
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        for micro in range(accum):
            g = torch.Generator().manual_seed(1000 * step + 10 * micro + backend.rank)
            x = torch.randn(16, 512, generator=g) * (1 + backend.rank)
            sync = micro == accum - 1
            with (contextlib.nullcontext() if sync else backend.no_sync(wrapped)):
                (wrapped(x).square().mean() / backend.world_size).backward()
        opt.step()
        opt.zero_grad(set_to_none=False)
    hook_state = next(s for _, s in wrapped._comm_hooks if isinstance(s, _SyncState))
    phases.append({"phase": hook_state.phase, "buckets": len(hook_state.layout)})
    out = {"weights": flat(model), "phases": phases, "allreduces": backend.grad_allreduces}
    del wrapped
    gc.collect()
    backend.teardown()
    return out


@pytest.mark.parametrize("world,accum", [(3, 1), (4, 2)])
def test_a_new_ddp_reduces_its_first_step_as_the_running_one_does(tmp_path, no_dist_env,
                                                                   world, accum):
    """DDP reduces a process's first synced backward in one bucket and then rebuilds its
    buckets; distrain reduces that first step bucket by rebuilt bucket, so a group that
    restarts at step 3 sums every step in the uninterrupted group's order: bitwise equal at
    3 and 4 processes (where the order of a sum matters), two buckets of about 1 MB."""
    straight = run_distributed(restart_body, world, str(tmp_path / "a"), 6, None, accum)
    restarted = run_distributed(restart_body, world, str(tmp_path / "b"), 6, 3, accum)
    for a, b in zip(straight, restarted):
        assert torch.equal(a["weights"], b["weights"]), (a["weights"] - b["weights"]).abs().max()
        # The rebuilt layout was checked against the one the first step used: 2 buckets.
        assert a["phases"] == [{"phase": "steady", "buckets": 2}]
        assert b["phases"] == [{"phase": "steady", "buckets": 2}] * 2
        # One allreduce per bucket per synced step, the first step's included.
        assert a["allreduces"] == 6 * 2
    assert all(torch.equal(straight[0]["weights"], r["weights"]) for r in straight)


def sparse_body(out_dir):
    """A sparse embedding under distrain's DDP: DDP's own first step (no flat buckets)."""
    cfg = tiny_config(out_dir)
    backend = make_backend(cfg)
    backend.setup()
    torch.manual_seed(0)
    emb, lin = torch.nn.Embedding(10, 4, sparse=True), torch.nn.Linear(4, 3)
    wrapped = backend.wrap_model(torch.nn.Sequential(emb, lin))
    for step in range(3):
        wrapped(torch.tensor([[1, 2], [3, 4 + backend.rank]])).square().mean().backward()
    out = {"sparse": emb.weight.grad.is_sparse, "lin": lin.weight.grad.clone(),
           "emb": emb.weight.grad.to_dense()}
    del wrapped
    gc.collect()
    backend.teardown()
    return out


def test_sparse_embeddings_keep_ddps_own_first_step(tmp_path, no_dist_env):
    ranks = run_distributed(sparse_body, 3, str(tmp_path))
    assert all(r["sparse"] for r in ranks)
    assert all(torch.equal(ranks[0]["lin"], r["lin"]) and torch.equal(ranks[0]["emb"], r["emb"])
               for r in ranks)
    assert ranks[0]["emb"][5].abs().sum() > 0  # rank 1's row 5 reached every rank


def load_weights(out_dir):
    return torch.load(out_dir / "checkpoints" / "last.pt", weights_only=True)["model"]


def max_diff(a, b):
    return max((a[k] - b[k]).abs().max().item() for k in a)


def test_same_weights_whatever_the_layout(tmp_path, no_dist_env):
    base = ("train.epochs=2", "scheduler.name=cosine", "optimizer.weight_decay=1e-4")
    train(tiny_config(tmp_path / "1x32", *base, "data.batch_size=32"))
    run_distributed(train_body, 2, tmp_path / "2x16", (*base, "data.batch_size=16"))
    run_distributed(train_body, 2, tmp_path / "2x8x2",
                    (*base, "data.batch_size=8", "train.grad_accum_steps=2"))
    run_distributed(train_body, 2, tmp_path / "2x8", (*base, "data.batch_size=8"))
    ref = load_weights(tmp_path / "1x32")
    assert max_diff(ref, load_weights(tmp_path / "2x16")) < 2e-5
    assert max_diff(ref, load_weights(tmp_path / "2x8x2")) < 2e-5
    # A different global batch (16) really gives other weights: the check above can fail.
    assert max_diff(ref, load_weights(tmp_path / "2x8")) > 1e-3


def test_same_weights_at_3_4_and_8_processes(tmp_path, no_dist_env):
    """A global batch of 48 as 1×48, 3×16, 3×8×accum 2, 4×12, 4×6×2 and 8×6: the same
    samples meet in the same steps, so the same weights to float rounding (the sums' order
    differs with the layout); another global batch (4×6 = 24) really differs."""
    base = ("train.epochs=2", "scheduler.name=cosine", "optimizer.weight_decay=1e-4")
    train(tiny_config(tmp_path / "1x48", *base, "data.batch_size=48"))
    ref = load_weights(tmp_path / "1x48")
    layouts = {"3x16": (3, 16, 1), "3x8x2": (3, 8, 2), "4x12": (4, 12, 1), "4x6x2": (4, 6, 2),
               "8x6": (8, 6, 1), "4x6": (4, 6, 1)}
    diffs = {}
    for name, (world, batch, accum) in layouts.items():
        run_distributed(train_body, world, tmp_path / name,
                        (*base, f"data.batch_size={batch}", f"train.grad_accum_steps={accum}"))
        diffs[name] = max_diff(ref, load_weights(tmp_path / name))
    print("largest weight difference from 1×48:", diffs)
    assert all(d < 1e-5 for name, d in diffs.items() if name != "4x6"), diffs
    assert diffs["4x6"] > 1e-3, diffs


def test_a_run_moved_from_4_to_3_to_2_processes_ends_as_one_process_does(tmp_path,
                                                                          no_dist_env):
    """What a requeue on fewer nodes does: epoch 1 on 4 processes (4×12), epoch 2 on 3 (3×16),
    epoch 3 on 2 (2×24), each resuming the last one's checkpoint with the global batch of 48
    kept; the end equals 3 epochs on one process (1×48) to float rounding."""
    # A constant LR: a cosine schedule's length would follow each launch's train.epochs.
    base = ("optimizer.weight_decay=1e-4", "optimizer.name=adamw", "optimizer.lr=3e-3",
            "checkpoint.resume=auto")
    train(tiny_config(tmp_path / "one", *base, "train.epochs=3", "data.batch_size=48"))
    moved = tmp_path / "moved"
    for epochs, world, batch in [(1, 4, 12), (2, 3, 16), (3, 2, 24)]:
        run_distributed(train_body, world, moved,
                        (*base, f"train.epochs={epochs}", f"data.batch_size={batch}"))
    state = torch.load(moved / "checkpoints/last.pt", weights_only=True)
    assert state["epoch"] == 3 and state["world_size"] == 2
    diff = max_diff(load_weights(tmp_path / "one"), state["model"])
    print("4 -> 3 -> 2 processes vs one process, largest weight difference:", diff)
    assert diff < 1e-5, diff


def test_decisions_agree_across_ranks(tmp_path, no_dist_env):
    # mode=max on a falling loss: every validation after the first is "no improvement", so the
    # plateau rule halves the LR and early stopping fires after 2 bad validations.
    overrides = ("train.epochs=10", "scheduler.name=plateau",
                 "scheduler.args={factor: 0.5, patience: 0}", "scheduler.warmup_epochs=0.5",
                 "checkpoint.mode=max", "train.early_stop_patience=2")
    r0, r1 = run_distributed(train_body, 2, tmp_path, overrides)
    lrs0 = [h["lr"] for h in r0["history"]]
    assert lrs0 == [h["lr"] for h in r1["history"]]
    assert lrs0 == pytest.approx([0.05, 0.025, 0.0125])
    assert r0["epochs"] == r1["epochs"] == 3
    assert [h["val_loss"] for h in r0["history"]] == [h["val_loss"] for h in r1["history"]]


def validation_body(out_dir):
    cfg = tiny_config(out_dir, "model.name=small_cnn",
                      "model.args={width: 8, batch_norm: true}", "train.epochs=1")
    backend = make_backend(cfg)
    backend.setup()
    trainer = Trainer(cfg, backend)
    trainer.train_epoch(0)
    bn = backend.unwrap(trainer.model)[1]
    stats_before = bn.running_mean.clone()
    results = {}
    for mode in ("rank0", "sharded", "rank0"):
        cfg.validate.mode = mode
        results.setdefault(mode, []).append(
            validate(cfg, backend, trainer.model, trainer.val_set, trainer.loss_fn,
                     trainer.precision))
    del trainer
    gc.collect()
    backend.teardown()
    return {"stats": stats_before, "results": results}


def test_validation_modes_agree_with_batchnorm(tmp_path, no_dist_env):
    r0, r1 = run_distributed(validation_body, 2, str(tmp_path), timeout=180)
    # DDP leaves each rank with its own BatchNorm running stats: the modes must not care.
    assert not torch.allclose(r0["stats"], r1["stats"])
    for r in (r0, r1):
        rank0, sharded = r["results"]["rank0"][0], r["results"]["sharded"][0]
        assert sharded["val_acc"] == rank0["val_acc"]
        assert sharded["val_loss"] == pytest.approx(rank0["val_loss"], rel=1e-6)
        assert r["results"]["rank0"][1] == rank0  # sharded validation changed nothing
    assert r0["results"] == r1["results"]


def strip_times(path):
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    for row in rows:
        for key in ("samples_per_s", "epoch_time_s", "train_time_s", "data_wait_s", "sync_wait_s",
                    "compute_s"):
            row.pop(key)
    return rows


@pytest.mark.parametrize("world", [2, 3, 4])
def test_resume_is_exact(tmp_path, no_dist_env, world):
    # Fused AdamW: each step's skip decision is read one step later (precision.py); the
    # checkpoint must still hold the state after its own step, the EMA's included.
    # From 3 processes on, the sums' order matters: the resumed group's first step must reduce
    # its gradients as the uninterrupted group did at that step (DDP's bucket rebuild,
    # distrain.distributed.torchrun._SyncState).
    common = ("scheduler.name=plateau", "scheduler.args={factor: 0.5, patience: 0}",
              "scheduler.warmup_epochs=1", "train.early_stop_patience=5", "optimizer.name=adamw",
              "optimizer.lr=3e-3", "optimizer.args={fused: true}", "train.ema_decay=0.9")
    run_distributed(train_body, world, tmp_path / "straight", (*common, "train.epochs=4"))
    run_distributed(train_body, world, tmp_path / "resumed", (*common, "train.epochs=2"))
    run_distributed(train_body, world, tmp_path / "resumed", (*common, "train.epochs=4"))
    a = torch.load(tmp_path / "straight/checkpoints/last.pt", weights_only=True)
    b = torch.load(tmp_path / "resumed/checkpoints/last.pt", weights_only=True)
    assert a["epoch"] == b["epoch"] == 4 and a["global_step"] == b["global_step"]
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for k, state in a["optimizer"]["state"].items():
        assert torch.equal(state["exp_avg"], b["optimizer"]["state"][k]["exp_avg"])
    assert a["scheduler"] == b["scheduler"] and a["tracker"] == b["tracker"]
    assert a["ema"]["n_averaged"] == a["global_step"] == b["ema"]["n_averaged"]
    assert all(torch.equal(a["ema"][k], b["ema"][k]) for k in a["ema"])
    assert strip_times(tmp_path / "straight/metrics.jsonl") == \
        strip_times(tmp_path / "resumed/metrics.jsonl")
