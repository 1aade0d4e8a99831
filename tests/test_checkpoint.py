import os

import pytest
import torch

from conftest import tiny_config
from distrain import checkpoint as ckpt
from distrain.config import ConfigError
from distrain.loop import train


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
    with pytest.raises(ConfigError, match="cannot read checkpoint"):
        train(tiny_config(tmp_path / "run", f"checkpoint.resume={bad}"))
    with pytest.raises(ConfigError, match="checkpoint.resume: expected 'auto', 'none' or an"):
        train(tiny_config(tmp_path / "run", f"checkpoint.resume={tmp_path / 'nope.pt'}"))
    assert bad.read_bytes() == b"not a checkpoint"
