"""distrain.Engine's checkpoints folder (the store the config trainer uses too):
save_checkpoint() without a path keeps the newest `keep_last` step files (or sharded .dcp
folders under FSDP), load_checkpoint() finds the newest one that verifies and falls back
past a damaged one, async saves land before the next read, a strict load names what it
could not restore. A resume ends bitwise equal to the uninterrupted run at 1 and 2
processes, and under FSDP at 3; under DDP at 3 (where a sum of more than two numbers
depends on its order) within float32 rounding only (issue 24). Each case is one spawn: its
phases are fresh Engines, models and optimizers on one process group (test_engine resumes
across real relaunches)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import run_distributed
from test_engine import toy_problem


def phases(root: str, async_save: bool, strategy: str = "ddp") -> list[dict]:
    """An uninterrupted run (a/), a run that dies after step 10 (b/), and its resume from a
    damaged folder, each with a fresh Engine, model and optimizer on one process group."""
    from distrain.distributed import create_backend

    backend = create_backend("auto", strategy=strategy)
    backend.setup()
    try:
        return [body(backend, f"{root}/a", None, False, async_save),
                body(backend, f"{root}/b", 10, False, async_save),
                body(backend, f"{root}/b", None, True, async_save)]
    finally:
        backend.teardown()


def body(backend, out_dir: str, stop_at: int | None, damage: bool, async_save: bool) -> dict:
    """Four epochs of the toy loop with a checkpoint every 3 steps into <out_dir>/checkpoints
    (keep_last=2); stop after step `stop_at` (a crash), or resume with load_checkpoint()
    (`damage`: the newest checkpoint is truncated first, so the one before is used)."""
    import gc

    import distrain
    from distrain.components.checkpoint import files

    eng = distrain.Engine(accum=2, seed=3, out_dir=out_dir, backend=backend,
                          checkpoints=distrain.Checkpoints(keep_last=2, async_save=async_save))
    model, opt, sched, loader = toy_problem(eng)
    folder = Path(out_dir) / "checkpoints"
    damaged = None
    if damage and eng.is_main:
        newest = files.step_files(folder)[0]
        victim = next(newest.glob("__1_*.distcp")) if newest.is_dir() else newest
        victim.write_bytes(victim.read_bytes()[:-64])
        damaged = newest.name
    eng.barrier()
    resumed = eng.load_checkpoint()  # "auto": the newest good one, or None
    crashed = False
    while loader.epoch < 4 and not crashed:
        for i, (x, y) in enumerate(loader):
            eng.backward(torch.nn.functional.cross_entropy(model(x), y))
            if (i + 1) % 2 == 0 or i + 1 == len(loader):
                eng.step(opt)
                if eng.global_step % 3 == 0:
                    eng.save_checkpoint()
                if eng.global_step == stop_at:
                    crashed = True
                    break
        else:
            sched.step()
    weights = torch.cat([(p.full_tensor() if hasattr(p, "full_tensor") else p).detach().flatten()
                         for p in eng.unwrap(model).parameters()])
    out = {"weights": weights, "step": eng.global_step, "lr": opt.param_groups[0]["lr"],
           "resumed": resumed and Path(resumed).name, "damaged": damaged}
    eng.close()  # waits for an async save in flight
    del model, opt, sched, loader, eng
    gc.collect()  # DDP holds the process group: freed before the next phase's
    out["kept"] = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
    return out


def by_phase(results: list[list[dict]]) -> tuple[list[dict], ...]:
    """[rank][phase] -> ([phase 0 of every rank], [phase 1 ...], [phase 2 ...])."""
    return tuple(list(ranks) for ranks in zip(*results))


@pytest.mark.parametrize("world,async_save", [(1, False), (2, True), (3, False), (4, False)])
def test_engine_checkpoints_keep_last_fall_back_and_resume(tmp_path, no_dist_env, world,
                                                           async_save):
    straight, crashed, resumed = by_phase(run_distributed(phases, world, str(tmp_path),
                                                          async_save))
    steps = straight[0]["step"]
    assert crashed[0]["resumed"] is None  # an empty folder: a fresh start
    assert crashed[0]["kept"] == ["last.pt", "last.pt.done", "step-00000006.pt",
                                  "step-00000006.pt.done", "step-00000009.pt",
                                  "step-00000009.pt.done"]  # saved at 3, 6, 9; keep_last=2
    assert resumed[0]["damaged"] == "step-00000009.pt"
    assert resumed[0]["resumed"] == "step-00000006.pt"  # fell back past the damaged one
    for a, b in zip(straight, resumed):
        assert a["step"] == b["step"] == steps and a["lr"] == b["lr"]
        # Bitwise at 3 and 4 processes too: the resumed group's first step reduces its
        # gradients in the uninterrupted group's order (distrain.distributed.torchrun).
        assert torch.equal(a["weights"], b["weights"])
    assert all(torch.equal(straight[0]["weights"], r["weights"]) for r in straight)


# 2 processes: test_fsdp runs the same store; at 4 the shards are written asynchronously.
@pytest.mark.parametrize("world,async_save", [(3, False), (4, True)])
def test_engine_sharded_checkpoints_under_fsdp_resume_bitwise(tmp_path, no_dist_env, world,
                                                              async_save):
    """FSDP: each rank writes its shards into step-N.dcp; a damaged shard falls back."""
    straight, crashed, resumed = by_phase(run_distributed(phases, world, str(tmp_path),
                                                          async_save, "fsdp"))
    assert [n for n in crashed[0]["kept"] if n.endswith(".dcp")] == [
        "last.dcp", "step-00000006.dcp", "step-00000009.dcp"]  # keep_last=2
    assert resumed[0]["damaged"] == "step-00000009.dcp"
    assert resumed[0]["resumed"] == "step-00000006.dcp"
    for a, b in zip(straight, resumed):
        assert a["step"] == b["step"] and a["lr"] == b["lr"]
        assert torch.equal(a["weights"], b["weights"])


def strict_body(out_dir: str) -> list[str]:
    import distrain

    errors = []
    eng = distrain.Engine(out_dir=out_dir, backend="local")
    model, opt, sched, loader = toy_problem(eng)
    eng.register("extra", torch.optim.lr_scheduler.StepLR(opt, step_size=5))
    eng.save_checkpoint()
    eng.close()
    for register_extra in (False, True):
        eng = distrain.Engine(out_dir=out_dir, backend="local")
        model, opt, sched, loader = toy_problem(eng)
        if register_extra:
            eng.register("other", torch.optim.lr_scheduler.StepLR(opt, step_size=5))
        try:
            eng.load_checkpoint()
        except distrain.MisuseError as exc:
            errors.append(str(exc))
        eng.load_checkpoint(strict=False)
        errors.append(sorted(eng.unrestored))
        eng.close()
    return errors


def test_a_strict_load_names_what_it_could_not_restore(tmp_path, no_dist_env):
    [errors] = run_distributed(strict_body, 1, str(tmp_path))
    assert errors[0] == (
        f"Engine.load_checkpoint: {tmp_path}/checkpoints/step-00000000.pt: 'extra' in the file, "
        "which nothing registered; register the same objects as the run that saved it "
        "before loading, or pass strict=False")
    assert errors[1] == ["extra"]
    assert "no state for 'other' (registered after the save?); 'extra' in the file" in errors[2]
    assert errors[3] == ["extra"]


def changes_body(out_dir: str) -> dict:
    """Save with one config and global batch; resume with others, as a user might."""
    import distrain
    from distrain.components.checkpoint import files

    def engine(config, accum=2, batch_size=8):
        eng = distrain.Engine(accum=accum, out_dir=out_dir, backend="local", config=config)
        model, opt, sched, loader = toy_problem(eng)
        eng.loader(loader.dataset, batch_size=batch_size)  # replaces the registered "loader"
        return eng

    out = {}
    eng = engine({"lr": 0.1, "model": {"width": 16}})
    eng.save_checkpoint()
    eng.close()
    for name, args in {"config": ({"lr": 0.2, "model": {"width": 16}},),
                       "global_batch": ({"lr": 0.1, "model": {"width": 16}}, 2, 4),
                       "same_global_batch": ({"lr": 0.1, "model": {"width": 16}}, 4, 4)}.items():
        eng = engine(*args)
        try:
            out[name] = str(eng.load_checkpoint())
        except distrain.MisuseError as exc:
            out[name] = str(exc)
            out[name + "_allowed"] = eng.load_checkpoint(allow_changes=True).name
        eng.close()
    # A file of distrain 0.1.0's engine: an `accum` key, no global batch or config. It loads
    # strictly, and without a global batch to compare nothing is refused.
    path = Path(out_dir) / "old.pt"
    state = torch.load(Path(out_dir) / "checkpoints" / "last.pt", weights_only=False)
    del state[files.GLOBAL_BATCH], state[files.CONFIG]
    files.save_verified({**state, "accum": 2}, path)
    eng = engine({"lr": 0.5}, 1, 3)
    out["old"] = eng.load_checkpoint(path).name
    eng.close()
    return out


def test_a_resume_with_another_config_or_global_batch_is_refused_naming_it(tmp_path,
                                                                          no_dist_env):
    [out] = run_distributed(changes_body, 1, str(tmp_path))
    where = f"{tmp_path}/checkpoints/step-00000000.pt"
    assert out["config"] == (
        f"Engine.load_checkpoint: {where} was saved with lr: 0.1 → 0.2; resume with the same "
        "values, save this run elsewhere (Engine(out_dir=)), or pass allow_changes=True")
    assert out["global_batch"].startswith(
        f"Engine.load_checkpoint: {where} was saved with a global batch of 16 samples, this "
        "run has 8 (1 process × 4 × accum 2)")
    assert out["config_allowed"] == out["global_batch_allowed"] == "step-00000000.pt"
    assert out["same_global_batch"] == where  # 4 × accum 4 = 8 × accum 2: the same steps
    assert out["old"] == "old.pt"


def test_a_marker_without_our_hash_is_a_reason_not_a_traceback(tmp_path):
    """A marker of another distrain version (sha256): resume skips it and says why."""
    import json

    from distrain.components.checkpoint import files

    path = tmp_path / "step-00000005.pt"
    path.write_bytes(b"PK\x03\x04 whatever")
    path.with_name(path.name + files.DONE).write_text(
        json.dumps({"bytes": path.stat().st_size, "sha256": "0" * 64}))
    assert files.verify(path) == ("its marker holds no xxh3_128 hash (written by another "
                                  "distrain version)")


def per_rank_config_body(out_dir: str) -> str:
    """vars(args) often holds a per-rank value (--local_rank): rank 0's config decides for
    every rank, so no rank refuses alone (which would hang the others in the next
    collective)."""
    import distrain

    eng = distrain.Engine(accum=2, out_dir=out_dir, config={"lr": 0.1, "local_rank": -1})
    toy_problem(eng)
    eng.save_checkpoint()
    eng.close()
    eng = distrain.Engine(accum=2, out_dir=out_dir, config={"lr": 0.1, "local_rank": 0})
    toy_problem(eng)
    eng.config["local_rank"] = eng.rank  # differs on rank 1 only
    try:
        return Path(eng.load_checkpoint()).name
    except distrain.MisuseError as exc:
        return str(exc)
    finally:
        eng.close()


def test_rank_0s_config_decides_a_resume_for_every_rank(tmp_path, no_dist_env):
    r0, r1 = run_distributed(per_rank_config_body, 2, str(tmp_path))
    # Rank 0 sees local_rank -1 → 0 and refuses; rank 1 (whose own value differs again)
    # refuses with rank 0's message instead of going on alone.
    assert r0 == r1 and "local_rank: -1 → 0" in r0
