"""The traps a newcomer's own loop fell into on distrain.Engine (issue 22), each now either
handled or a clear error. The loop is tests/traps_loop.py, shaped like a user's, launched
as real processes (python, torchrun at 3 processes, horovodrun)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT, free_port

from distrain.distributed.horovod import horovod_available

BIN = Path(sys.executable).parent
LOOP = ROOT / "tests" / "traps_loop.py"


def env() -> dict:
    import os

    out = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    out.update(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT / "src"),
               OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    return out


def launch(how: str, nproc: int, out: Path, *args: str, ok: bool = True):
    prefix = {"python": [str(BIN / "python")],
              "torchrun": [str(BIN / "torchrun"), "--nproc-per-node", str(nproc),
                           "--master-port", str(free_port())],
              "horovodrun": [str(BIN / "horovodrun"), "-np", str(nproc), "-H",
                             f"localhost:{nproc}", "--gloo", str(BIN / "python")],
              "mpirun": ["mpirun", "-np", str(nproc), "--oversubscribe", "-x",
                         "OMP_NUM_THREADS", "-x", "PYTHONPATH", str(BIN / "python")]}[how]
    done = subprocess.run([*prefix, str(LOOP), str(out), *args], capture_output=True,
                          text=True, timeout=300, env=env())
    if ok:
        assert done.returncode == 0, (how, done.stdout[-2000:], done.stderr[-3000:])
    return done


def result(out: Path, mode: str, tag: str, rank: int = 0) -> dict:
    return json.loads((out / f"{mode}.{tag}.rank{rank}.json").read_text())


# The LR after each of 4 epochs, uninterrupted: a plateau on a metric that never improves
# halves it from the second epoch on, StepLR(step_size=1, gamma=0.5) from the first. Where the
# uninterrupted curve is this well known the tests compare with it rather than launch it.
KNOWN_LRS = {"plateau": [0.1, 0.05, 0.025, 0.0125], "steplr": [0.05, 0.025, 0.0125, 0.00625]}


@pytest.mark.skipif(not horovod_available(), reason="Horovod is built by ./launcher/setup")
def test_a_plateau_scheduler_built_before_setup_keeps_steering_the_lr_after_a_resume(tmp_path):
    """Under horovodrun, setup returns a new optimizer object and a load replaced its param
    groups: the scheduler on the user's optimizer silently stopped changing the LR."""
    launch("horovodrun", 2, tmp_path / "b", "plateau", "4", "2")  # crashes after epoch 2
    launch("horovodrun", 2, tmp_path / "b", "plateau", "4")  # resumes from epoch 2
    straight = KNOWN_LRS["plateau"]
    assert result(tmp_path / "b", "plateau", "straight")["lrs"] == straight[:2]
    for rank in (0, 1):
        assert result(tmp_path / "b", "plateau", "resumed", rank)["lrs"] == straight[2:]


@pytest.mark.skipif(not horovod_available(), reason="Horovod is built by ./launcher/setup")
@pytest.mark.parametrize("how,mode", [("horovodrun", "steplr"), ("horovodrun", "onecycle"),
                                      ("mpirun", "plateau")])
def test_schedulers_built_before_or_after_setup_resume_under_horovod(tmp_path, how, mode):
    """StepLR on the user's optimizer (before setup), OneCycleLR on the one setup returned,
    ReduceLROnPlateau under mpirun (Horovod's MPI controller): a resume continues the LR,
    and torch's "lr_scheduler.step() before optimizer.step()" warning stays silent (the
    scheduler watches the optimizer it was built on; Horovod steps another object)."""
    if mode in KNOWN_LRS:
        straight = KNOWN_LRS[mode]
    else:
        launch(how, 2, tmp_path / "a", mode, "4")
        straight = result(tmp_path / "a", mode, "straight")["lrs"]
    first = launch(how, 2, tmp_path / "b", mode, "4", "2")  # crashes after epoch 2
    assert "before `optimizer.step()`" not in first.stderr, first.stderr[-2000:]
    launch(how, 2, tmp_path / "b", mode, "4")  # resumes from epoch 2
    assert len(set(straight)) == 4  # the LR moves every epoch: the check can fail
    assert result(tmp_path / "b", mode, "straight")["lrs"] == straight[:2]
    for rank in (0, 1):
        assert result(tmp_path / "b", mode, "resumed", rank)["lrs"] == straight[2:]


@pytest.mark.parametrize("how,nproc", [("python", 1), ("torchrun", 3)])
def test_numpy_and_python_random_streams_are_seeded_per_rank_and_resumed(tmp_path, how, nproc):
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
    launch(how, nproc, tmp_path / "a", "streams", "3")
    launch(how, nproc, tmp_path / "b", "streams", "3", "8")  # stops after step 8 (saved: 5)
    launch(how, nproc, tmp_path / "b", "streams", "3")  # resumes at step 5
    for rank in range(nproc):
        straight = result(tmp_path / "a", "streams", "straight", rank)["draws"]
        first = result(tmp_path / "b", "streams", "straight", rank)["draws"]
        resumed = result(tmp_path / "b", "streams", "resumed", rank)["draws"]
        assert first == straight[:8]  # the same seed: the same draws, run to run
        assert resumed == straight[5:] and resumed[0][0] == 6  # resumed bitwise after step 5
    firsts = {tuple(result(tmp_path / "a", "streams", "straight", r)["draws"][0][1:])
              for r in range(nproc)}
    assert len(firsts) == nproc  # each rank its own stream


def test_the_short_last_window_of_a_modulo_loop_is_an_error_not_a_leak(tmp_path):
    """150 samples in micro-batches of 8, accum 4: the epoch's last global batch has 3
    micro-batches; a loop stepping on (i + 1) % accum == 0 leaves them unstepped."""
    (tmp_path / "m").mkdir()
    done = launch("python", 1, tmp_path / "m", "modulo", "2", ok=False)
    assert done.returncode == 1
    assert "distrain.errors.MisuseError: Engine.backward: the last micro-batch of a global " \
           "batch had its backward but no eng.step followed" in done.stderr
    assert "`if eng.step_due:`" in done.stderr


def test_a_loop_that_never_polls_dies_of_sigterm_instead_of_training_on(tmp_path):
    (tmp_path / "s").mkdir()
    done = launch("python", 1, tmp_path / "s", "unpolled", "5", ok=False)
    assert done.returncode == -signal.SIGTERM, (done.returncode, done.stderr[-2000:])
    assert "SIGTERM received and this loop never asked eng.should_stop()" in done.stderr
    assert "finished" not in done.stdout  # it did not train on to the end
    assert not list((tmp_path / "s").glob("unpolled.*.json"))


@pytest.mark.parametrize("how,nproc", [("python", 1), ("torchrun", 3), ("horovodrun", 2)])
def test_skip_step_drops_a_global_batch_on_every_rank_alike(tmp_path, how, nproc):
    """Every 4th global batch rejected with eng.skip_step(): the weights stay, the gradients
    go (none leaks into the next step), the step counts as skipped, and the ranks end with
    bitwise equal weights (Horovod: its allreduces in flight are finished, not left)."""
    if how == "horovodrun" and not horovod_available():
        pytest.skip("Horovod is built by ./launcher/setup")
    (tmp_path / "k").mkdir()
    launch(how, nproc, tmp_path / "k", "skip", "2")
    runs = [result(tmp_path / "k", "skip", "straight", rank) for rank in range(nproc)]
    for run in runs:
        assert run["skips"] and all(s["unchanged"] and s["grads_none"] for s in run["skips"])
        assert [s["step"] % 4 for s in run["skips"]] == [3] * len(run["skips"])
        assert run["skipped"] == len(run["skips"])  # counted as skipped steps
        assert run["weights"] == runs[0]["weights"]  # every rank skipped the same steps
    steps = {1: 20, 3: 8, 2: 10}[nproc]  # 2 epochs of 150 samples in global batches of 16n
    assert runs[0]["step"] == steps and len(runs[0]["skips"]) == steps // 4


@pytest.mark.skipif(not horovod_available(), reason="Horovod is built by ./launcher/setup")
def test_horovods_options_reach_horovod_through_the_strategy_object(tmp_path):
    """Engine(strategy=distrain.Horovod(op="adasum")) under mpirun at 4 processes: Adasum
    runs (it needs Horovod's MPI controller), so skip_step is refused naming it, and the
    replicas stay bitwise equal. At 3 (Horovod's Adasum: powers of 2 only) a clear error
    at start instead of a NotImplementedError from inside the first backward."""
    (tmp_path / "h").mkdir()
    three = launch("mpirun", 3, tmp_path / "h", "adasum", "1", ok=False)
    assert three.returncode != 0 and "ConfigError: dist.horovod.op: 'adasum' needs a " \
        "power-of-2 number of processes (Horovod's Adasum), got 3; launch 2 or 4" in three.stderr
    launch("mpirun", 4, tmp_path / "h", "adasum", "1")
    runs = [result(tmp_path / "h", "adasum", "straight", rank) for rank in range(4)]
    for run in runs:  # 150 samples in global batches of 4 x 8 x 2: 3 steps, the 3rd due
        assert run["step"] == 3 and [s["step"] for s in run["skips"]] == [2]
        assert "Engine.skip_step: Horovod's Adasum moves the weights during backward" \
            in run["skips"][0]["refused"]
        assert run["weights"] == runs[0]["weights"]


def test_a_skip_only_some_ranks_wish_is_agreed_by_step_skip(tmp_path):
    """eng.step(opt, skip=wish) with a different single rank wishing each time: every rank
    drops the same global batches, bitwise the run where all ranks called skip_step."""
    for mode in ("skip", "vote"):
        (tmp_path / mode).mkdir()
        launch("torchrun", 3, tmp_path / mode, mode, "2")
    skip = result(tmp_path / "skip", "skip", "straight")
    for rank in range(3):
        vote = result(tmp_path / "vote", "vote", "straight", rank)
        assert [s["step"] for s in vote["skips"]] == [s["step"] for s in skip["skips"]]
        assert all(s["unchanged"] for s in vote["skips"])
        assert vote["weights"] == skip["weights"] and vote["skipped"] == skip["skipped"] == 2


def test_a_skip_on_one_rank_alone_is_found_by_the_audit(tmp_path):
    (tmp_path / "l").mkdir()
    done = launch("torchrun", 2, tmp_path / "l", "lonely", "1", ok=False)
    assert done.returncode != 0
    assert "DivergenceError: Engine.audit: the ranks diverged at step 5: parameter " \
           "checksum: rank 0 " in done.stderr


@pytest.mark.parametrize("how,nproc", [("python", 1), ("torchrun", 3)])
def test_the_collectives_and_helpers_a_loop_reaches_for(tmp_path, how, nproc):
    (tmp_path / "a").mkdir()
    launch(how, nproc, tmp_path / "a", "api")
    for rank in range(nproc):
        got = json.loads((tmp_path / "a" / f"api.rank{rank}.json").read_text())
        assert got["sum"] == nproc * (nproc + 1) / 2 and got["max"] == nproc
        assert got["gathered"] == [float(r + 1) for r in range(nproc)]
        assert got["objects"] == [{"rank": r} for r in range(nproc)]
        assert got["any_last"] is True and got["any_none"] is False
        assert got["first"] == [True]  # rank 0 made it before the others entered
        assert got["progress"] == {"iteration": 7, "name": "warmup"}  # loaded in place
        assert got["local_rank"] == rank and got["dtype"] == "torch.float32"
    assert (tmp_path / "a" / "results.csv").read_text() == "written by rank 0\n"


def test_engine_out_dir_holds_the_run_folder(tmp_path):
    """Two runs on one Engine(out_dir=): the second stops on every rank naming the holder,
    the first is untouched; once it ends the folder is free again."""
    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen([str(BIN / "python"), str(LOOP), str(out), "hold", "1"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=env())
    try:
        assert holder.stdout.readline().strip() == "holding"
        second = launch("torchrun", 3, out, "plateau", "1", ok=False)
        assert second.returncode != 0
        assert f"RunLocked: Engine(out_dir): {out} is in use by another run" in second.stderr
        assert f"PID {holder.pid}" in second.stderr
        assert holder.poll() is None  # the holder trains on
        (out / "release").touch()
        assert holder.wait(timeout=120) == 0, holder.stderr.read()[-2000:]
    finally:
        holder.kill()
    assert not (out / ".distrain.lock").exists()
    launch("python", 1, out, "plateau", "1")  # free again


def test_misleading_errors_name_the_call_and_the_fix(no_dist_env):
    import distrain

    eng = distrain.Engine(backend="local")
    try:
        model = torch.nn.Linear(4, 2)
        data = torch.utils.data.TensorDataset(torch.randn(16, 4), torch.randint(0, 2, (16,)))
        loader = eng.loader(data, batch_size=4)
        with pytest.raises(distrain.MisuseError, match="a batch before Engine.setup"):
            next(iter(loader))
        loaded = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        model(torch.randn(2, 4)).sum().backward()
        loaded.step()
        with pytest.raises(distrain.MisuseError, match="already holds state .it stepped, or a "
                           "state was loaded into it.; call setup first"):
            eng.setup(model, loaded)
        with pytest.raises(distrain.MisuseError, match="Engine.mean: weight: expected this "
                           "rank's sample count .an int. or a loader from eng.val_loader"):
            eng.mean(0.5, loader)
        assert eng.mean(0.5, 3) == 0.5
    finally:
        eng.close()
