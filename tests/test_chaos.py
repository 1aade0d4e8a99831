"""A seeded chaos run under real torchrun at 4 processes: SIGKILLs (one during a checkpoint
write, one soon after a restart) and a SIGTERM, and the run still ends bitwise equal to an
uninterrupted one (from 3 processes on the order of every sum matters: the first step after
each restart must reduce as the uninterrupted run did)."""

import json

import pytest

from distrain.tools.chaos import WALL_CLOCK, chaos, plan

# A small digits MLP whose checkpoint (~13 MB with AdamW's state) takes long enough to write
# (~10 ms) for the supervisor to catch a write in progress; checkpoints every 5 steps, so the
# restarted groups resume mid-epoch (23 steps an epoch at 4 × 16); 3 epochs leave the last fault, a
# write 3 writes into its group, room even when the SIGTERM stops the group late (the ranks
# agree about once a second, which is many steps here).
CHAOS = ["data.name=digits", "model.name=mlp",
         "model.args={in_features: 64, hidden: [1024, 1024], num_classes: 10}",
         "optimizer.name=adamw", "optimizer.lr=1e-3", "data.batch_size=16", "train.epochs=3",
         "train.log_every_steps=1000", "checkpoint.every_steps=5", "logging.plot=false",
         "data.num_workers=0"]
SEED = 2


def test_the_plan_is_seeded_and_has_each_kind_of_fault():
    faults = plan(3, SEED, 2, 5)
    assert [f.describe() for f in faults] == [f.describe() for f in plan(3, SEED, 2, 5)]
    assert [(f.kind, f.moment) for f in faults] == [
        ("kill", "after_steps"), ("kill", "after_restart"), ("term", "after_steps"),
        ("kill", "during_write")]
    assert faults[3].rank == 0  # the writer


def test_chaos_run_ends_bitwise_equal_to_an_uninterrupted_run(tmp_path):
    report = chaos(None, CHAOS, kills=3, seed=SEED, nproc=4, out=tmp_path, timeout=300)
    print(json.dumps(report, indent=1))  # shown on failure: the faults and where they landed
    assert report["torchrun_exit"] == 0, (tmp_path / "chaos.log").read_text()[-3000:]
    after_steps, after_restart, term, during_write = report["faults"]
    groups = report["groups"]

    # Every fault landed at its planned kind of moment, and each cost one restart (of the 4
    # torchrun --max-restarts allowed): 5 worker groups, each of processes new.
    assert all(f["sent_at_s"] is not None for f in report["faults"])
    assert report["restarts"] == report["failed_groups"] == 4 and len(groups) == 5
    assert after_steps["newest_step"] >= groups[0]["start_step"] + after_steps["value"]
    assert after_steps["first_failure"]["exitcode"] == -9
    assert after_restart["sent_at_s"] - groups[1]["started_s"] < 1.5
    assert after_restart["newest_step"] == groups[1]["start_step"]  # no step checkpointed yet
    assert during_write["temp_file"].startswith(".step-")  # seen being written when killed
    assert during_write["temp_file_outlived_writer"]  # so the write was cut short
    assert during_write["first_failure"] == {"rank": 0, "exitcode": -9}
    # SIGTERM to rank 0: every rank stopped at one step S, rank 0 wrote step S (last.pt),
    # torchrun saw exit status 75 and restarted, and the new group resumed from S.
    assert term["first_failure"]["exitcode"] == 75
    assert report["preempted_steps"] == [term["resumed_step"]] == [groups[3]["start_step"]]
    assert term["resumed_step"] >= groups[2]["start_step"] + term["value"]
    assert not report["fault_problems"]

    # The end: weights and metrics bitwise equal, every checkpoint verifies, no temporary file.
    result = report["comparison"]
    assert result["weights_equal"] and result["global_step"] == [69, 69]
    assert result["metrics_equal"] and result["metrics_rows"] == [3, 3]
    assert not set(WALL_CLOCK) & set(result["metrics_fields_compared"])
    assert {"train_loss", "train_acc", "val_loss", "val_acc", "lr", "step"} \
        <= set(result["metrics_fields_compared"])
    assert {"last.pt", "best.pt"} <= set(result["checkpoints_retained"])
    assert result["checkpoints_failing"] == {} and result["temporary_files"] == []
    assert report["ok"]


class Killed(BaseException):
    """Stands for a SIGKILL: nothing catches it."""


@pytest.mark.parametrize("when", ["before", "after"])
def test_a_kill_next_to_an_epochs_checkpoint_loses_no_metrics_row(tmp_path, no_dist_env,
                                                                 monkeypatch, when):
    """Rank 0 dies just before or just after writing an epoch's checkpoint: the resumed run's
    metrics.jsonl still has every epoch's row, as the uninterrupted run's has."""
    from conftest import tiny_config

    from distrain.components.checkpoint import files as ckpt
    from distrain.tools.chaos import rows
    from distrain.trainer.run import train

    overrides = ("checkpoint.every_steps=10", "train.epochs=2")
    train(tiny_config(tmp_path / "straight", *overrides))
    real_save = ckpt.save

    def dying_save(state, *args):
        at_epoch_end = state[ckpt.EPOCH] == 1 and state[ckpt.STEP_IN_EPOCH] == 0
        if at_epoch_end and when == "before":
            raise Killed
        real_save(state, *args)
        if at_epoch_end:
            raise Killed

    monkeypatch.setattr(ckpt, "save", dying_save)
    with pytest.raises(Killed):
        train(tiny_config(tmp_path / "killed", *overrides))
    monkeypatch.setattr(ckpt, "save", real_save)
    train(tiny_config(tmp_path / "killed", *overrides))  # resume: auto
    assert rows(tmp_path / "killed") == rows(tmp_path / "straight")
    assert [r["epoch"] for r in rows(tmp_path / "killed")] == [1, 2]


def test_resume_from_an_epochs_last_step_drops_that_epochs_row(tmp_path):
    """A preemption checkpoint at an epoch's last step (epoch not yet ended) has the step of
    the epoch's row, which a kill during the epoch-end save may have left: the resumed run
    writes that row again, so the old one must go (a chaos run on 3 processes found it)."""
    from conftest import tiny_config

    from distrain.components.observe.log import RunLog

    rows_in = [{"epoch": 0.5, "step": 7}, {"epoch": 1, "step": 15}, {"epoch": 2, "step": 30}]
    metrics = tmp_path / "metrics.jsonl"
    for epochs_done, kept in [(0, rows_in[:1]), (1, rows_in[:2])]:
        metrics.write_text("".join(json.dumps(r) + "\n" for r in rows_in))
        RunLog(tiny_config(tmp_path), is_main=True).truncate_metrics(15, epochs_done)
        assert [json.loads(line) for line in metrics.read_text().splitlines()] == kept
