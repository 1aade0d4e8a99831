import os

import pytest
import torch
from conftest import tiny_config

from distrain.components.checkpoint import files as ckpt
from distrain.errors import ConfigError
from distrain.trainer.run import train


class Unpicklable:
    def __reduce__(self):
        raise RuntimeError("disk full (simulated mid-write)")


def test_failed_save_keeps_the_old_file(tmp_path):
    path = tmp_path / "last.pt"
    ckpt.save_atomic({"x": torch.arange(3)}, path)
    with pytest.raises(RuntimeError, match="disk full"):
        ckpt.save_atomic({"x": torch.zeros(1000), "bad": Unpicklable()}, path)
    assert torch.equal(torch.load(path, weights_only=True)["x"], torch.arange(3))
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temporary left behind
    assert oct(path.stat().st_mode & 0o777) == oct(0o666 & ~_umask())


def test_a_save_clears_the_temporary_files_a_killed_writer_left(tmp_path):
    # What a SIGKILL during a write leaves (found by the chaos run, tests/test_chaos.py).
    left = [".step-00000010.pt.k3x9q1ab.tmp", ".last.pt.4242.tmp", ".step-00000010.pt.done.tmp"]
    for name in left:
        (tmp_path / name).write_bytes(b"partial")
    (tmp_path / ".step-00000010.dcp.tmp").mkdir()  # a sharded save's: checkpoint_sharded's
    ckpt.save({ckpt.GLOBAL_STEP: 20}, tmp_path, write_last=True, write_best=False, keep_last=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        ".step-00000010.dcp.tmp", "last.pt", "last.pt.done", "step-00000020.pt",
        "step-00000020.pt.done"]


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_best_survives_replacing_last(tmp_path):
    ckpt.save_atomic({"v": 1}, tmp_path / "last.pt")
    ckpt.link_atomic(tmp_path / "last.pt", tmp_path / "best.pt")
    ckpt.save_atomic({"v": 2}, tmp_path / "last.pt")
    assert torch.load(tmp_path / "best.pt")["v"] == 1
    assert torch.load(tmp_path / "last.pt")["v"] == 2


def test_run_writes_last_and_best_with_full_state(tmp_path, no_dist_env):
    out = train(tiny_config(tmp_path, "train.epochs=3", "checkpoint.monitor=val_acc"))
    last = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=True)
    best = torch.load(tmp_path / "checkpoints" / "best.pt", weights_only=True)
    for key in (ckpt.MODEL, ckpt.OPTIMIZER, ckpt.PRECISION, ckpt.SCHEDULER, ckpt.EPOCH,
                ckpt.GLOBAL_STEP, ckpt.STEP_IN_EPOCH, ckpt.TRACKER, ckpt.RANKS, ckpt.CONFIG,
                ckpt.WORLD_SIZE):
        assert key in last, key
    assert last[ckpt.EPOCH] == 3 and last[ckpt.WORLD_SIZE] == 1
    assert last[ckpt.CONFIG]["train"]["epochs"] == 3
    assert best[ckpt.EPOCH] == out["best_epoch"]
    assert best[ckpt.TRACKER]["best"] == pytest.approx(out["best"])


def test_corrupt_or_missing_checkpoint_is_a_config_error(tmp_path, no_dist_env):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match="bad.pt is not a checkpoint .not a file torch.save"):
        train(tiny_config(tmp_path / "run", f"checkpoint.resume={bad}"))
    truncated = tmp_path / "truncated.pt"
    torch.save({"model": torch.zeros(1000)}, truncated)
    truncated.write_bytes(truncated.read_bytes()[:2000])
    with pytest.raises(ConfigError, match="cannot read checkpoint .*truncated.pt: "):
        train(tiny_config(tmp_path / "run", f"checkpoint.resume={truncated}"))
    with pytest.raises(ConfigError, match="checkpoint.resume: expected 'auto', 'none' or an"):
        train(tiny_config(tmp_path / "run", f"checkpoint.resume={tmp_path / 'nope.pt'}"))
    assert bad.read_bytes() == b"not a checkpoint"


def snapshot(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_truncated_newest_checkpoint_falls_back_to_the_previous(tmp_path, no_dist_env, capsys):
    straight = train(tiny_config(tmp_path / "straight", "train.epochs=4", "optimizer.name=adamw"))
    run = tmp_path / "run"
    train(tiny_config(run, "train.epochs=3", "optimizer.name=adamw"))
    folder = run / "checkpoints"
    steps = [p.name for p in ckpt.step_files(folder)]
    assert steps == ["step-00000270.pt", "step-00000180.pt"]  # keep_last 2, newest first
    newest = folder / steps[0]
    newest.write_bytes(newest.read_bytes()[:1000])  # truncated on disk
    capsys.readouterr()
    resumed = train(tiny_config(run, "train.epochs=4", "optimizer.name=adamw"))
    out = capsys.readouterr().out
    assert f"skipping checkpoint {newest}: 1000 bytes on disk" in out
    assert "resumed from" in out and "at epoch 2, step 180" in out
    a = torch.load(tmp_path / "straight" / "checkpoints" / "last.pt", weights_only=True)
    b = torch.load(folder / "last.pt", weights_only=True)
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert resumed["history"][-1]["val_loss"] == straight["history"][-1]["val_loss"]


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_failed_save_mid_run_is_a_clear_error_and_keeps_earlier_files(tmp_path, monkeypatch,
                                                                      no_dist_env, capsys, mode):
    from distrain.commands.cli import main

    args = ["train", f"run.out_dir={tmp_path}", "model.name=mlp",
            "model.args={in_features: 64, hidden: [16]}",
            f"checkpoint.async_save={mode == 'async'}", "train.epochs=2"]
    assert main(args) == 0
    before = snapshot(tmp_path / "checkpoints")
    real_save = torch.save

    def disk_full(obj, f, *a, **k):
        real_save(obj, f, *a, **k)  # bytes reach the temporary file, then the disk fills up
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    capsys.readouterr()
    assert main([*args[:-1], "train.epochs=3"]) == 1
    err = capsys.readouterr().err
    assert "distrain: error: cannot write checkpoint" in err and "No space left" in err
    assert snapshot(tmp_path / "checkpoints") == before  # byte-identical, no temporary left


def test_resume_refuses_a_changed_config_and_shows_the_difference(tmp_path, no_dist_env):
    train(tiny_config(tmp_path, "train.epochs=1"))
    last = (tmp_path / "checkpoints" / "last.pt").read_bytes()
    with pytest.raises(ConfigError, match=r"global batch of 16 \(1 processes × 16 × accumulation "
                                          r"1\), this run has 32 \(1 × 32 × 1\)"):
        train(tiny_config(tmp_path, "train.epochs=2", "data.batch_size=32"))
    with pytest.raises(ConfigError, match=r"another config \(model.args.hidden: \[32\] → \[64\]\)"):
        train(tiny_config(tmp_path, "train.epochs=2", "model.args.hidden=[64]"))
    # A re-run with another learning rate is not a silent "resume".
    with pytest.raises(ConfigError, match=r"another config \(run.seed: 0 → 3; "
                                          r"optimizer.lr: 0.05 → 0.01\); to train with the new values"):
        train(tiny_config(tmp_path, "train.epochs=2", "optimizer.lr=0.01", "run.seed=3"))
    assert (tmp_path / "checkpoints" / "last.pt").read_bytes() == last  # nothing lost
    # The same global batch in another layout is fine, as are the keys a resume may change
    # (run length, logging, checkpointing, collectives); so is an explicit override.
    assert train(tiny_config(tmp_path, "train.epochs=2", "data.batch_size=8",
                             "train.grad_accum_steps=2", "checkpoint.keep_last=4",
                             "dist.timeout_s=300", "logging.plot=true"))["epochs"] == 2
    assert train(tiny_config(tmp_path, "train.epochs=3", "data.batch_size=32",
                             "checkpoint.allow_changes=true"))["epochs"] == 3


def test_a_fresh_start_replaces_the_folders_earlier_run(tmp_path, no_dist_env, capsys):
    """checkpoint.resume=none in a used folder: the earlier run's checkpoints and curve go
    (else a later resume=auto could pick the earlier run's newer step); resume may name a
    run folder, meaning its newest good checkpoint."""
    first = train(tiny_config(tmp_path / "a", "train.epochs=3"))
    straight = train(tiny_config(tmp_path / "b", "train.epochs=1", "optimizer.lr=0.01"))
    capsys.readouterr()
    again = train(tiny_config(tmp_path / "a", "train.epochs=1", "optimizer.lr=0.01",
                              "checkpoint.resume=none"))
    assert "starting afresh in" in capsys.readouterr().out and first["epochs"] == 3
    assert again["val_loss"] == straight["val_loss"]  # a run of its own, bitwise
    rows = (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()
    assert len(rows) == 1 and sorted(p.name for p in (tmp_path / "a" / "checkpoints").iterdir()
                                     if p.name.startswith("step-")) == \
        ["step-00000090.pt", "step-00000090.pt.done"]
    # Resuming from a run folder: its newest good checkpoint, into a new folder.
    out = train(tiny_config(tmp_path / "c", "train.epochs=2", "optimizer.lr=0.01",
                            f"checkpoint.resume={tmp_path / 'b'}"))
    assert "resumed from" in capsys.readouterr().out and out["epochs"] == 2
    with pytest.raises(ConfigError, match="is a folder but neither a run folder"):
        train(tiny_config(tmp_path / "d", f"checkpoint.resume={tmp_path}"))


def test_async_save_writes_the_same_checkpoints(tmp_path, no_dist_env):
    """The background writer sees the state as it was when submitted, although training has
    changed the live tensors since: the files equal the synchronous run's."""
    from conftest import train_body

    common = ("checkpoint.every_steps=7", "checkpoint.keep_last=3", "optimizer.name=adamw",
              "optimizer.lr=3e-3")
    train_body(tmp_path / "sync", common)
    train_body(tmp_path / "async", (*common, "checkpoint.async_save=true"))
    folders = [tmp_path / run / "checkpoints" for run in ("sync", "async")]
    names = [sorted(p.name for p in folder.glob("*.pt")) for folder in folders]
    assert names[0] == names[1] and len(names[0]) == 5  # 3 step files, last.pt, best.pt
    for name in names[0]:
        a, b = (torch.load(folder / name, weights_only=True) for folder in folders)
        assert a["global_step"] == b["global_step"]
        for key in a["model"]:
            assert torch.equal(a["model"][key], b["model"][key]), (name, key)
        for ia, ib in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
            assert torch.equal(ia["exp_avg"], ib["exp_avg"])
        assert ckpt.verify(folders[1] / name) is None
