"""Hangs become errors: the watchdog (dist.timeout_s), the rank-0-region check (dist.debug)
and the cross-rank audit (dist.audit_every_steps), with real processes."""

import time

import torch
from conftest import run_distributed, tiny_config
from test_faults import TINY, torchrun

TIMEOUT_S = 8


def test_a_rank_blocked_in_its_data_set_ends_the_run_with_stacks(tmp_path):
    marker = tmp_path / "blocked"
    began = time.monotonic()
    out = torchrun(f"run.out_dir={tmp_path}", *TINY, f"dist.timeout_s={TIMEOUT_S}",
                   "data.name=faulty:blocking_digits",
                   f"data.args={{rank: 1, after: 300, marker: '{marker}'}}")
    ended = time.monotonic()
    assert marker.exists(), "the fault was not injected"
    assert out.returncode != 0
    # The rank that blocked and the rank that waits for it in the allreduce both report.
    assert f"rank 1 made no progress for {TIMEOUT_S} s in loading data (step " in out.stderr
    assert f"rank 0 made no progress for {TIMEOUT_S} s in train step (step " in out.stderr
    rank0, rank1 = (tmp_path / "hang" / f"rank{r}.txt" for r in (0, 1))
    assert "in blocking_digits" in rank1.read_text() or "lambda" in rank1.read_text()
    assert "faulty.py" in rank1.read_text() and "__getitem__" in rank1.read_text()
    # The loop's frame in both (the data wait and the step are both under train_epoch).
    assert "train_epoch" in rank0.read_text() and "train_epoch" in rank1.read_text()
    assert "train_micro_batch" in rank0.read_text()
    # Ended by the watchdog (not by the backstops 30-60 s later): a functional bound.
    blocked_at = marker.stat().st_mtime - time.time() + time.monotonic()
    assert ended - blocked_at < TIMEOUT_S + 20, (ended - blocked_at, ended - began)


def test_debug_mode_catches_a_collective_in_rank0_validation(tmp_path):
    model = ["model.name=faulty:collective_in_eval_mlp", "model.args={}", "train.epochs=1"]
    out = torchrun(f"run.out_dir={tmp_path}", *TINY, *model, "dist.debug=true")
    assert out.returncode != 0
    assert ("dist.debug: torch.distributed.all_reduce() was called inside a rank-0-only region "
            "(validation, validate.mode=rank0)") in out.stderr
    assert "made no progress" not in out.stderr  # raised at once, not found by the watchdog
    # The same model is fine where every rank evaluates.
    ok = torchrun(f"run.out_dir={tmp_path / 'sharded'}", *TINY, *model, "dist.debug=true",
                  "validate.mode=sharded")
    assert ok.returncode == 0, ok.stderr[-3000:]


def audit_body(out_dir, diverge, overrides=()):
    """Train one epoch with the audit on; rank 1 changes `diverge` after step 12."""
    from conftest import one_epoch

    from distrain.errors import DivergenceError

    def patch(trainer, backend):
        step = trainer.train_micro_batch  # one a step: accumulation is 1 here

        def faulty_step(*args):
            loss = step(*args)
            if backend.rank == 1 and trainer.global_step == 12:
                if diverge == "weights":
                    with torch.no_grad():
                        next(trainer.model.parameters()).add_(1e-6)
                elif diverge == "lr":
                    trainer.schedule.base_lrs = [lr * 2 for lr in trainer.schedule.base_lrs]
            return loss

        trainer.train_micro_batch = faulty_step

    cfg = tiny_config(out_dir, "train.epochs=1", "dist.audit_every_steps=5", *overrides)
    return one_epoch(cfg, patch, DivergenceError)


def test_audit_names_diverged_weights(tmp_path, no_dist_env):
    r0, r1 = run_distributed(audit_body, 2, str(tmp_path), "weights")
    assert r0["error"] == r1["error"] and r0["step"] == r1["step"] == 15
    assert r0["error"].startswith("dist.audit_every_steps: the ranks diverged at step 15: "
                                  "parameter checksum: rank 0 ")
    assert "lr:" not in r0["error"] and "step:" not in r0["error"]


def test_audit_is_silent_when_ranks_agree(tmp_path, no_dist_env):
    plain = run_distributed(audit_body, 2, str(tmp_path / "a"), None, ("dist.audit_every_steps=0",))
    audited = run_distributed(audit_body, 2, str(tmp_path / "b"), None)
    assert audited[0]["error"] is None and audited[0]["step"] == 45
    assert torch.equal(audited[0]["weights"], plain[0]["weights"])  # the audit changes nothing


def test_audit_names_a_rank_local_lr_change(tmp_path, no_dist_env):
    r0, _ = run_distributed(audit_body, 2, str(tmp_path), "lr")
    assert "lr: rank 0 0.05, rank 1 0.1" in r0["error"]
