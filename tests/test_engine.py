"""distrain.Engine, the API for a user's own loop: examples/own_loop.py against
examples/plain_loop.py, launched as real processes (python, torchrun, horovodrun, mpirun),
compared on numbers; misuse errors; exact save/resume through the API."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT, run_distributed

from distrain.distributed.horovod import horovod_available

BIN = Path(sys.executable).parent
PLAIN, OWN = ROOT / "examples" / "plain_loop.py", ROOT / "examples" / "own_loop.py"
FP32 = ["--precision", "fp32", "--mixup", "0", "--epochs", "2"]


def env() -> dict:
    out = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    out.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
               OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT / "src"))
    return out


def launch(how: str, out: Path, *args: str) -> subprocess.CompletedProcess:
    """The own loop on one process, or on 2 through `distrain launch` (as the README says)."""
    via = ["--controller", "gloo"] if how == "horovodrun" else []
    prefix = [str(BIN / "python")] if how == "python" else \
        [str(BIN / "distrain"), "launch", "--launcher", how, "--nproc", "2", *via]
    cmd = [*prefix, str(OWN), "--out", str(out), *args]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env())
    assert done.returncode == 0, (how, done.stdout[-2000:], done.stderr[-3000:])
    return done


def rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def final(out: Path) -> dict:
    return torch.load(out / "final.pt", weights_only=True)


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def test_own_loop_changes_at_most_12_lines_of_the_plain_loop():
    diff = subprocess.run(["diff", str(PLAIN), str(OWN)], capture_output=True, text=True).stdout
    changed = [line for line in diff.splitlines() if line.startswith(">")]
    assert 0 < len(changed) <= 12, "\n".join(changed)
    assert any("eng.backward(loss)" in line for line in changed)
    # The README shows this very diff (it cannot drift from the examples).
    assert f"```diff\n{diff}```" in (ROOT / "README.md").read_text()


@pytest.fixture(scope="module")
def layouts(tmp_path_factory, no_dist_env_module):
    """The fp32 loop without Mixup in three layouts of one global batch of 32."""
    base = tmp_path_factory.mktemp("layouts")
    runs = {"1x32": ("python", ["--batch-size", "32"]),
            "2x16": ("torchrun", ["--batch-size", "16"]),
            "2x8x2": ("torchrun", ["--batch-size", "8", "--accum", "2"])}
    for name, (how, args) in runs.items():
        launch(how, base / name, *FP32, *args)
    return base


@pytest.fixture(scope="module")
def no_dist_env_module():
    saved = {k: os.environ.pop(k) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                            "MASTER_PORT") if k in os.environ}
    yield
    os.environ.update(saved)


def test_own_loop_gives_the_same_weights_in_every_layout(layouts):
    one = final(layouts / "1x32")
    for name in ("2x16", "2x8x2"):
        assert max_diff(one, final(layouts / name)) < 1e-5, name
        # The rank-0 file writes happened once: one row per epoch, the same curve.
        theirs = rows(layouts / name)
        assert [r["epoch"] for r in theirs] == [1, 2]
        for a, b in zip(rows(layouts / "1x32"), theirs):
            assert b["val_loss"] == pytest.approx(a["val_loss"], rel=1e-5)
            assert b["val_acc"] == a["val_acc"] and b["lr"] == a["lr"]
    assert rows(layouts / "1x32")[-1]["val_acc"] > 0.7


def test_the_short_last_window_is_weighted_by_samples(layouts, tmp_path, no_dist_env):
    """The plain loop divides every micro-batch's loss by accum, also in an epoch's short
    last window, so its 1 × 16 × 2 differs from its 1 × 32; distrain weights each micro-batch
    by its samples, so its 2 × 8 × 2 (the same short window) equals its 1 × 32 (above)."""
    sys.path.insert(0, str(ROOT / "examples"))
    from plain_loop import long_tailed_digits

    assert len(long_tailed_digits()[0]) % 32 != 0  # an epoch ends with a short window
    for name, batch, accum in (("plain32", "32", "1"), ("plain16x2", "16", "2")):
        done = subprocess.run([str(BIN / "python"), str(PLAIN), "--out", str(tmp_path / name),
                               *FP32, "--batch-size", batch, "--accum", accum], env=env(),
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
    assert max_diff(final(tmp_path / "plain32"), final(tmp_path / "plain16x2")) > 1e-4


@pytest.mark.skipif(not horovod_available(), reason="set up with DISTRAIN_HOROVOD=0")
@pytest.mark.parametrize("how", ["horovodrun", "mpirun"])
def test_own_loop_under_horovodrun_and_mpirun(layouts, tmp_path, how):
    done = launch(how, tmp_path, *FP32, "--batch-size", "16")
    assert max_diff(final(layouts / "1x32"), final(tmp_path)) < 1e-5
    assert max_diff(final(layouts / "2x16"), final(tmp_path)) < 1e-5
    assert len(rows(tmp_path)) == 2
    assert done.stdout.count("best val_loss") == 2  # two ranks ran the loop


def test_fp16_mixup_loop_trains_under_torchrun(tmp_path, no_dist_env):
    launch("torchrun", tmp_path, "--precision", "fp16", "--mixup", "0.2", "--epochs", "4",
           "--batch-size", "8", "--accum", "2")
    history = rows(tmp_path)
    assert [r["epoch"] for r in history] == [1, 2, 3, 4]  # patience 4: no early stop yet
    assert history[-1]["val_acc"] > 0.7
    best = torch.load(tmp_path / "best.pt", weights_only=True)
    assert all(torch.isfinite(t).all() for t in best.values())
    assert (tmp_path / "best.pt.done").is_file()  # written through distrain's atomic save


# --------------------------------------------------------------------------- misuse

def _tiny(eng, accum_batch=8):
    from torch.utils.data import TensorDataset

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model, opt = eng.setup(model, opt)
    data = TensorDataset(torch.randn(40, 4), torch.randint(0, 3, (40,)))
    return model, opt, eng.loader(data, batch_size=accum_batch)


def test_misuse_is_a_clear_error(no_dist_env):
    import distrain

    eng = distrain.Engine(accum=2, backend="local")
    try:
        model, opt, loader = _tiny(eng)
        loss_fn = torch.nn.CrossEntropyLoss()
        with pytest.raises(distrain.MisuseError, match="no micro-batch in flight"):
            eng.backward(loss_fn(model(torch.randn(2, 4)), torch.tensor([0, 1])))
        batches = iter(loader)
        x, y = next(batches)
        eng.backward(loss_fn(model(x), y))
        with pytest.raises(distrain.MisuseError, match="called twice"):
            eng.backward(loss_fn(model(x), y))
        with pytest.raises(distrain.MisuseError, match="before the last micro-batch"):
            eng.step(opt)
        x, y = next(batches)
        # The window had a backward, this micro-batch not: said so (issue 22), not "none".
        with pytest.raises(distrain.MisuseError, match=r"the micro-batch in flight had no "
                           r"backward \(earlier ones of its global batch did\)"):
            eng.step(opt)
        eng.backward(loss_fn(model(x), y))
        with pytest.raises(distrain.MisuseError, match=r"Engine.save_checkpoint: the global "
                           r"batch in flight is complete .* but was never stepped \(e.g. an "
                           r"epoch's short last global batch"):
            eng.save_checkpoint()
        with pytest.raises(distrain.MisuseError, match="not the optimizer"):
            eng.step(torch.optim.SGD(model.parameters(), lr=0.1))
        assert eng.step(opt).taken() is True and eng.global_step == 1
        x, y = next(batches)
        with pytest.raises(distrain.MisuseError, match="no backward since the last step"):
            eng.step(opt)
        with pytest.raises(distrain.MisuseError, match="twice"):
            eng.setup(model, opt)
    finally:
        eng.close()


def test_moved_keywords_name_their_new_place(no_dist_env):
    """Engine's options of a strategy and of the checkpoints folder live in objects now;
    an old keyword says where it went (before any process group or file is made)."""
    import distrain

    with pytest.raises(distrain.MisuseError, match=r"keep_last= is now checkpoints="
                       r"distrain\.Checkpoints\(keep_last=\.\.\.\); compile= is now "
                       r"strategy=distrain\.DDP\(compile=True\)"):
        distrain.Engine(backend="local", keep_last=3, compile=True)
    with pytest.raises(TypeError, match="unexpected keyword argument 'keep_lsat'"):
        distrain.Engine(backend="local", keep_lsat=3)
    with pytest.raises(distrain.MisuseError, match="expected distrain.DDP"):
        distrain.Engine(backend="local", strategy="zero3")
    with pytest.raises(distrain.MisuseError, match=r"Engine\(checkpoints=...\): expected "
                       r"distrain.Checkpoints\(keep_last=, async_save=, sharded=\), got 3"):
        distrain.Engine(backend="local", checkpoints=3)
    with pytest.raises(distrain.MisuseError, match=r"Checkpoints\(keep_last=...\): expected an "
                       r"integer >= 1, got 0"):
        distrain.Engine(backend="local", checkpoints=distrain.Checkpoints(keep_last=0))
    with pytest.raises(distrain.MisuseError, match=r"Horovod\(op=...\): .*expected one of "):
        distrain.Horovod(op="adsum")
    with pytest.raises(distrain.MisuseError, match=r"Horovod\(gradient_predivide_factor=...\)"):
        distrain.Horovod(gradient_predivide_factor=0)
    eng = distrain.Engine(backend="local")
    try:
        with pytest.raises(distrain.MisuseError, match="call eng.setup first"):
            eng.model_state_dict()
    finally:
        eng.close()


def strategy_objects_body(out_dir: str) -> dict:
    """Under torchrun: Horovod's options are refused (nothing would use them); FSDP's
    object shards the blocks it names with its options; Checkpoints' keep_last holds."""
    import distrain
    from torch.distributed.fsdp import FSDPModule

    try:
        distrain.Engine(strategy=distrain.Horovod(op="adasum"))
        refused = ""
    except distrain.MisuseError as e:
        refused = str(e)
    strategy = distrain.FSDP(blocks=lambda m: [m[0]], reshard_after_forward=False)
    eng = distrain.Engine(strategy=strategy, out_dir=out_dir, seed=0,
                          checkpoints=distrain.Checkpoints(keep_last=1))
    try:
        net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
        model, opt = eng.setup(net, torch.optim.SGD(net.parameters(), lr=0.1))
        data = torch.utils.data.TensorDataset(torch.randn(36, 4), torch.randint(0, 3, (36,)))
        for x, y in eng.loader(data, batch_size=4):
            eng.backward(torch.nn.functional.cross_entropy(model(x), y))
            eng.step(opt)
            eng.save_checkpoint()
        try:  # the README's `eng.save(model.state_dict(), ...)`: one rank's shards only
            eng.save(model.state_dict(), Path(out_dir) / "shards.pt")
            half = ""
        except distrain.MisuseError as e:
            half = str(e)
        whole = eng.model_state_dict()  # every rank gathers; rank 0 holds the tensors
        eng.save(whole, Path(out_dir) / "whole.pt")
        if eng.is_main:
            plain = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(),
                                        torch.nn.Linear(8, 3))
            plain.load_state_dict(torch.load(Path(out_dir) / "whole.pt"), strict=True)
        return {"refused": refused, "options": eng.backend.options is strategy, "half": half,
                "sharded": [isinstance(m, FSDPModule) for m in net],
                "kept": sorted(p.name for p in (Path(out_dir) / "checkpoints").glob("step-*"))}
    finally:
        eng.close()


def test_strategy_objects_under_torchrun_at_three_processes(tmp_path, no_dist_env):
    results = run_distributed(strategy_objects_body, 3, str(tmp_path))
    for r in results:
        assert "Engine(strategy=distrain.Horovod(...)): this process runs under the torchrun " \
               "backend, not Horovod" in r["refused"]
        assert r["options"] is True and r["sharded"] == [True, False, False]
        assert "Engine.save: [" in r["half"] and "] (this rank's (" in r["half"] and \
            "is an FSDP shard: rank 0 would save its part of the model only; save " \
            "eng.model_state_dict() instead" in r["half"]
    # 36 samples / (3 x 4) = 3 steps, one save each; keep_last=1 keeps the newest only.
    assert results[0]["kept"] == ["step-00000003.dcp", "step-00000003.dcp.done"]


def collective_on_main_body():
    import torch.distributed as dist

    import distrain
    from distrain.errors import CollectiveInMainOnlyRegion

    eng = distrain.Engine(debug=True)

    def bad_metric():
        return dist.all_reduce(torch.ones(1))

    try:
        eng.on_main(bad_metric)
        return "no error"
    except CollectiveInMainOnlyRegion as exc:
        return str(exc) if eng.is_main else "raised on rank 1"
    finally:
        eng.close()


def test_a_collective_on_main_raises_instead_of_hanging(no_dist_env):
    # Rank 0 raises at once; rank 1 then fails in the broadcast that waits for rank 0's result.
    with pytest.raises(AssertionError, match="rank 0 failed|rank 1 failed") as info:
        run_distributed(collective_on_main_body, 2, timeout=120)
    assert "CollectiveInMainOnlyRegion" in str(info.value) or "bad_metric" in str(info.value)


# --------------------------------------------------------------------------- save/resume

def toy_problem(eng):
    """A user's loop's parts: a model with dropout, SGD with momentum, a registered StepLR,
    150 samples in micro-batches of 8."""
    from torch.utils.data import TensorDataset

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Dropout(0.2),
                                torch.nn.ReLU(), torch.nn.Linear(16, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model, opt = eng.setup(model, opt)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    eng.register("scheduler", sched)
    g = torch.Generator().manual_seed(1)
    data = TensorDataset(torch.randn(150, 8, generator=g), torch.randint(0, 3, (150,), generator=g))
    return model, opt, sched, eng.loader(data, batch_size=8)


def resume_body(out_dir: str, stop_at: int | None, resume: bool, accum: int):
    """Two epochs of a small loop with dropout (each rank's random stream matters); stop and
    save after optimizer step `stop_at`, or resume from that file and finish."""
    import distrain

    eng = distrain.Engine(accum=accum, seed=3)
    model, opt, sched, loader = toy_problem(eng)
    path = Path(out_dir) / "ckpt.pt"
    if resume:
        eng.load_checkpoint(path)
    stopped = False
    while loader.epoch < 2 and not stopped:
        for i, (x, y) in enumerate(loader):
            eng.backward(torch.nn.functional.cross_entropy(model(x), y))
            if (i + 1) % accum == 0 or i + 1 == len(loader):
                eng.step(opt)
                if eng.global_step == stop_at:
                    eng.save_checkpoint(path)
                    stopped = True
                    break
        else:
            sched.step()
    weights = torch.cat([p.detach().flatten() for p in eng.unwrap(model).parameters()])
    out = {"weights": weights, "step": eng.global_step, "lr": opt.param_groups[0]["lr"]}
    eng.close()
    return out


def test_resume_through_the_api_is_bitwise_exact(tmp_path, no_dist_env):
    straight = run_distributed(resume_body, 2, str(tmp_path / "a"), None, False, 2)
    run_distributed(resume_body, 2, str(tmp_path / "b"), 7, False, 2)  # mid-epoch 1
    resumed = run_distributed(resume_body, 2, str(tmp_path / "b"), None, True, 2)
    assert (tmp_path / "b" / "ckpt.pt.done").is_file()
    for a, b in zip(straight, resumed):
        assert a["step"] == b["step"] and a["lr"] == b["lr"] == 0.025
        assert torch.equal(a["weights"], b["weights"])
    assert torch.equal(straight[0]["weights"], straight[1]["weights"])


def preemption_body():
    import signal

    import distrain

    eng = distrain.Engine()
    seen = []
    try:
        for step in range(1, 8):
            if eng.rank == 0 and step == 3:
                os.kill(os.getpid(), signal.SIGTERM)  # what Slurm sends one rank's process
            if step % 2 == 0:  # every rank checks at the same steps
                seen.append((step, eng.should_stop()))
        return seen
    finally:
        eng.close()


def test_a_preemption_signal_on_one_rank_stops_every_rank_at_the_same_check(no_dist_env):
    r0, r1 = run_distributed(preemption_body, 2)
    assert r0 == r1 == [(2, 0), (4, 15), (6, 15)]


def test_the_wrapped_model_is_the_users_module_to_every_reader():
    """What setup returns under DDP: state dict, attributes and train/eval of the user's
    module, forward through the wrapper; copying it does not recurse."""
    import copy

    from distrain.distributed.backend import WrappedModel

    inner = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout(0.5))
    inner.classes = 2
    calls = []

    class Spy(torch.nn.Module):  # stands for DDP: records that the forward went through it
        def forward(self, x):
            calls.append(len(x))
            return inner(x)

    wrapped = WrappedModel(inner, Spy())
    assert wrapped.classes == 2 and list(wrapped.state_dict()) == list(inner.state_dict())
    wrapped.eval()
    assert not inner.training and not wrapped.wrapper.training
    wrapped(torch.ones(3, 2))
    assert calls == [3]
    assert copy.deepcopy(wrapped).classes == 2


def test_a_failed_save_keeps_the_previous_file(tmp_path, monkeypatch, no_dist_env):
    import distrain
    from distrain.errors import CheckpointError

    eng = distrain.Engine(backend="local")
    try:
        path = tmp_path / "best.pt"
        eng.save({"w": torch.ones(3)}, path)
        before = path.read_bytes()

        def disk_full(*args, **kwargs):
            raise OSError(28, "No space left on device")

        monkeypatch.setattr(torch, "save", disk_full)
        with pytest.raises(CheckpointError, match="No space left on device.*untouched"):
            eng.save({"w": torch.zeros(3)}, path)
        assert path.read_bytes() == before and (tmp_path / "best.pt.done").is_file()
        assert sorted(p.name for p in tmp_path.iterdir()) == ["best.pt", "best.pt.done"]
    finally:
        eng.close()
