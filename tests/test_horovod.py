"""Horovod and MPI, launched as real processes by horovodrun (Gloo and MPI controllers) and
mpirun, compared on numbers with torchrun."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT, free_port, run_distributed, train_body

from distrain.distributed.horovod import horovod_available

BIN = Path(sys.executable).parent
DIGITS = str(ROOT / "configs" / "digits.yaml")

if not horovod_available():
    if os.environ.get("DISTRAIN_HOROVOD") == "0":
        pytest.skip("set up with DISTRAIN_HOROVOD=0: no Horovod", allow_module_level=True)
    raise RuntimeError("Horovod is not installed: run ./launcher/setup (or set DISTRAIN_HOROVOD=0 "
                       "to set up and test without it)")

MLP = ["model.name=mlp", "model.args={in_features: 64, hidden: [32], num_classes: 10}",
       "optimizer.name=sgd", "optimizer.lr=0.05", "train.log_every_steps=1000",
       "checkpoint.resume=none", "logging.plot=false", "data.num_workers=0"]


def env():
    out = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    # OpenMPI refuses root unless told; one thread per rank on a 2-core machine.
    out.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1", OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT / "tests"),
                                                        os.environ.get("PYTHONPATH")])))
    return out


def horovodrun(controller, *cmd, timeout=300, np_=2):
    full = [str(BIN / "horovodrun"), "-np", str(np_), "-H", f"localhost:{np_}",
            f"--{controller}", *cmd]
    out = subprocess.run(full, capture_output=True, text=True, timeout=timeout, env=env())
    assert out.returncode == 0, (out.stdout[-2000:], out.stderr[-3000:])
    return out


def distrain(*args):
    return [str(BIN / "distrain"), *args]


def last_row(out_dir):
    return json.loads((Path(out_dir) / "metrics.jsonl").read_text().splitlines()[-1])


def weights(out_dir):
    return torch.load(Path(out_dir) / "checkpoints" / "last.pt", weights_only=True)["model"]


DIGITS_ARGS = ("train", "--config", DIGITS, "train.epochs=8", "checkpoint.resume=none")


@pytest.fixture(scope="module")
def digits_under_torchrun(tmp_path_factory):
    """The digits job under torchrun: the reference for both Horovod controllers."""
    out = tmp_path_factory.mktemp("ddp")
    subprocess.run([str(BIN / "torchrun"), "--nproc-per-node", "2", "--master-port",
                    str(free_port()), "-m", "distrain", *DIGITS_ARGS, f"run.out_dir={out}"],
                   check=True, capture_output=True, env=env(), timeout=300)
    return last_row(out)


@pytest.mark.parametrize("controller", ["gloo", "mpi"])
def test_horovodrun_trains_digits_like_torchrun(tmp_path, controller, digits_under_torchrun):
    horovodrun(controller, *distrain(*DIGITS_ARGS, f"run.out_dir={tmp_path / 'hvd'}"))
    hvd, ddp = last_row(tmp_path / "hvd"), digits_under_torchrun
    assert hvd["val_acc"] >= 0.95
    assert hvd["val_acc"] == ddp["val_acc"]
    assert hvd["val_loss"] == pytest.approx(ddp["val_loss"], rel=1e-4)


@pytest.mark.parametrize("accum", [1, 2])
def test_same_weights_as_torchrun(tmp_path, accum, no_dist_env):
    # accum 2: 1437 samples in global batches of 28 (2 × 7 × 2): the last has 9 samples, one
    # micro-step, a short window (synchronize() starts its groups' allreduces).
    overrides = [*MLP, "train.epochs=2", "data.batch_size=16" if accum == 1 else "data.batch_size=7",
                 f"train.grad_accum_steps={accum}", "optimizer.weight_decay=1e-4"]
    horovodrun("gloo", *distrain("train", "dist.backend=horovod", f"run.out_dir={tmp_path / 'hvd'}",
                                 *overrides))
    run_distributed(train_body, 2, tmp_path / "ddp", ("dist.backend=torchrun", *overrides))
    hvd, ddp = weights(tmp_path / "hvd"), weights(tmp_path / "ddp")
    # Bitwise: both sum the gradients of losses already halved (distrain's DDP hook, Horovod's
    # Sum); test_bench's overhead case shows these are the floats of DDP's own divide-then-sum.
    for k in ddp:
        assert torch.equal(hvd[k], ddp[k]), (k, (hvd[k] - ddp[k]).abs().max())
    assert last_row(tmp_path / "hvd")["val_loss"] == last_row(tmp_path / "ddp")["val_loss"]


@pytest.mark.parametrize("overrides, sums", [
    ((), True), (("train.precision=bf16",), True), (("train.precision=fp16",), False),
    (("dist.horovod.compression=fp16",), False), (("dist.horovod.gradient_predivide_factor=2.0",), False),
    (("dist.horovod.op=adasum",), False)])
def test_horovod_sums_only_where_the_mean_is_kept(overrides, sums):
    """Sum of pre-divided losses (no averaging pass) where it is exact; Horovod's own Average
    (or Adasum) where half precision or a predivide factor is involved."""
    from distrain.config import load_config
    from distrain.distributed import make_backend

    backend = make_backend(load_config(None, ["dist.backend=horovod", *overrides]))
    backend.world_size = 4  # not initialised: no process group is needed for the choice
    assert backend.sums_gradients() is sums
    assert backend.loss_factor() == (1 if sums else 4)


def test_fp16_clipping_under_horovod_keeps_ranks_equal(tmp_path):
    horovodrun("gloo", sys.executable, str(ROOT / "tests" / "hvd_body.py"), "synced_grads",
               str(tmp_path), "train.precision=fp16", "train.clip_grad_norm=0.5",
               "train.grad_accum_steps=2", "data.batch_size=8")
    r0 = torch.load(tmp_path / "synced_grads.rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "synced_grads.rank1.pt", weights_only=True)
    assert r0["steps"] == r1["steps"] == len(r0["grads"]) == 45  # ceil(1437 / (2 × 8 × 2))
    for g0, g1 in zip(r0["grads"], r1["grads"]):
        assert torch.equal(g0, g1)
    assert r0["skipped"] == r1["skipped"]
    assert torch.equal(r0["weights"], r1["weights"])


# 4 × 7 × accum 3 = 84: the last global batch has 9 samples, one micro-step (a short window).
@pytest.mark.parametrize("np_,controller,batch,accum", [(3, "gloo", 8, 1), (4, "mpi", 7, 3)])
def test_resume_under_horovod_is_exact(tmp_path, np_, controller, batch, accum):
    """A mid-epoch resume under horovodrun at 3 (Gloo) and 4 (MPI, accumulation 3 with a short
    last window each epoch) processes ends bitwise equal to the straight run, through distrain's fixed
    gradient groups (each fused alone). The model's backward pauses at random
    (user_code.uneven_pace_mlp), so gradients are ready at other moments in each run.
    Horovod's own fusion by timing made two identical digits runs at 3 differ (2.8e-7 after
    3 epochs, Gloo) once; these shorter runs did not show it without the groups either."""
    common = [*MLP, "dist.backend=horovod", "optimizer.name=adamw", "optimizer.lr=3e-3",
              "model.name=user_code:uneven_pace_mlp", f"data.batch_size={batch}",
              "model.args={in_features: 64, hidden: [256, 256], num_classes: 10}",
              f"train.grad_accum_steps={accum}", "train.epochs=2"]
    a, b = tmp_path / "a", tmp_path / "b"
    horovodrun(controller, *distrain("train", f"run.out_dir={a}", *common,
                                     "checkpoint.every_steps=7", "checkpoint.keep_last=20"),
               np_=np_)
    saved = sorted((a / "checkpoints").glob("step-*.pt"))
    middle = saved[len(saved) // 2]
    out = horovodrun(controller, *distrain("train", f"run.out_dir={b}", *common,
                                           f"checkpoint.resume={middle}",
                                           "checkpoint.every_steps=7"), np_=np_)
    assert "resumed from" in out.stdout and "+ " in out.stdout  # mid-epoch
    wa, wb = weights(a), weights(b)
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    assert last_row(a)["train_loss"] == last_row(b)["train_loss"]


def test_gradient_groups_are_fixed_and_cover_every_parameter():
    from distrain.distributed.horovod import gradient_groups

    model = torch.nn.Sequential(torch.nn.Linear(512, 512), torch.nn.Linear(512, 1024),
                                torch.nn.Linear(1024, 10))
    model[0].bias.requires_grad_(False)
    groups = gradient_groups(model, cap=2 << 20)  # 2 MiB: the 2 MiB weight fills one alone
    sizes = [[tuple(p.shape) for p in g] for g in groups]
    assert sizes == [[(10,), (10, 1024), (1024,)], [(1024, 512)], [(512, 512)]]
    flat = [p for g in groups for p in g]
    assert [id(p) for p in flat] == [id(p) for p in reversed(list(model.parameters()))
                                     if p.requires_grad]
    again = gradient_groups(model, cap=2 << 20)
    assert [[id(p) for p in g] for g in again] == [[id(p) for p in g] for g in groups]


def test_mpirun_bootstraps_torch_distributed(tmp_path):
    cmd = ["mpirun", "-np", "2", "--oversubscribe", *distrain(
        "train", "dist.backend=torchrun", f"run.out_dir={tmp_path}", *MLP, "train.epochs=2")]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env())
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.count("distrain: done:") == 1
    check = subprocess.run(["mpirun", "-np", "2", "--oversubscribe", *distrain(
        "check", "dist.backend=torchrun")], capture_output=True, text=True, timeout=300, env=env())
    assert '"backend": "torchrun"' in check.stdout and "rank 1 local_rank 1" in check.stdout
    assert last_row(tmp_path)["val_acc"] > 0.8


def test_mpirun_runs_fsdp_over_torch_distributed_and_horovodrun_refuses_it(tmp_path, no_dist_env):
    """dist.strategy=fsdp under plain mpirun picks torch.distributed (bootstrapped from MPI)
    even with Horovod installed, and gives one process's weights; horovodrun refuses it."""
    from distrain.components.checkpoint.sharded import model_weights
    from distrain.config import load_config
    from distrain.trainer.run import train

    common = [*MLP, "train.epochs=2", "data.name=digits"]
    cmd = ["mpirun", "-np", "2", "--oversubscribe", *distrain(
        "train", f"run.out_dir={tmp_path / 'mpi'}", *common, "data.batch_size=16",
        "dist.strategy=fsdp")]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env())
    assert out.returncode == 0, out.stderr[-3000:]
    train(load_config(None, [f"run.out_dir={tmp_path / 'one'}", *common, "data.batch_size=32"]))
    got = model_weights(tmp_path / "mpi" / "checkpoints" / "last.dcp")
    ref = weights(tmp_path / "one")
    assert max((got[k] - ref[k]).abs().max().item() for k in ref) < 1e-5
    refused = subprocess.run([str(BIN / "horovodrun"), "-np", "2", "-H", "localhost:2", "--gloo",
                              *distrain("check", "dist.strategy=fsdp")],
                             capture_output=True, text=True, timeout=300, env=env())
    assert refused.returncode != 0
    assert "config error: dist.strategy: expected ddp under Horovod" in refused.stderr


def test_auto_detects_horovodrun():
    out = horovodrun("gloo", *distrain("check"))
    assert '"backend": "horovod"' in out.stdout and '"world_size": 2' in out.stdout


def test_horovod_config_errors(monkeypatch, capsys):
    from distrain.commands.cli import main

    assert main(["train", "dist.backend=horovod", "dist.horovod.op=adasum", "train.precision=fp16"]) == 2
    assert "dist.horovod.op: 'adasum' cannot be combined with train.precision=fp16" in \
        capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "horovod.torch", None)  # as if Horovod were not installed
    assert main(["check", "dist.backend=horovod"]) == 2
    assert "Horovod is not installed" in capsys.readouterr().err


@pytest.mark.parametrize("controller, options", [
    ("gloo", ["dist.horovod.compression=fp16", "dist.horovod.gradient_predivide_factor=2.0"]),
    ("mpi", ["dist.horovod.op=adasum"])])
def test_horovod_options_train(tmp_path, controller, options):
    horovodrun(controller, *distrain("train", "dist.backend=horovod", f"run.out_dir={tmp_path}", *MLP,
                                     "train.epochs=3", *options))
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["val_acc"] > 0.85 and rows[-1]["train_loss"] < rows[0]["train_loss"] / 2
    resolved = (tmp_path / "config.yaml").read_text()
    assert all(f"{o.split('=')[0].split('.')[-1]}: {o.split('=')[1]}" in resolved for o in options)


def test_adasum_under_gloo_is_a_clear_error(tmp_path):
    cmd = [str(BIN / "horovodrun"), "-np", "2", "-H", "localhost:2", "--gloo",
           *distrain("train", "dist.backend=horovod", "dist.horovod.op=adasum", f"run.out_dir={tmp_path}")]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env())
    assert out.returncode != 0
    # One line from rank 0, no traceback from any rank.
    assert out.stderr.count("distrain: config error: dist.horovod.op: 'adasum' needs Horovod's MPI") == 1
    assert "<stderr>:Traceback" not in out.stderr


def test_watchdog_ends_a_hang_under_horovodrun_gloo(tmp_path, no_dist_env):
    # Horovod's own stall shutdown does not fire under the Gloo controller; distrain's must.
    marker = tmp_path / "blocked"
    cmd = [str(BIN / "horovodrun"), "-np", "2", "-H", "localhost:2", "--gloo",
           *distrain("train", f"run.out_dir={tmp_path}", *MLP, "train.epochs=2",
                     "dist.timeout_s=8", "data.name=faulty:blocking_digits",
                     f"data.args={{rank: 1, after: 300, marker: '{marker}'}}")]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120,
                         env={**env(), "PYTHONPATH": str(Path(__file__).parent)})
    text = out.stdout + out.stderr
    assert marker.exists() and out.returncode != 0
    assert "rank 1 made no progress for 8 s in loading data" in text
    assert "rank 0 made no progress for 8 s in train step" in text
    assert "__getitem__" in (tmp_path / "hang" / "rank1.txt").read_text()


@pytest.mark.parametrize("fault", ["removed", "killed", "added"])
def test_elastic_run_survives_a_changed_world(tmp_path, fault, no_dist_env):
    """Mid-epoch 2 a worker goes: removed by the discovery script (the others stop at their
    next commit) or SIGKILLed, rank 0 itself (the other fails a collective, rolls back to the
    last commit, becomes rank 0 and takes over the run folder's lock and its files); or one
    is added to a 1-process run. The global batch is kept (1 × 16 × accumulation 2
    <-> 2 × 16 × 1), so weights and metrics equal the uninterrupted 2-process run's."""
    marker = tmp_path / "fault"
    hosts = tmp_path / "hosts.sh"
    np_start, accum = 2, 1
    if fault == "added":
        hosts.write_text(f"#!/bin/sh\nif [ -f '{marker}' ]; then echo localhost:2; "
                         "else echo localhost:1; fi\n")
        data = ["data.name=faulty:marking_digits", f"data.args={{after: 2000, marker: '{marker}'}}"]
        np_start, accum = 1, 2
    elif fault == "removed":
        hosts.write_text(f"#!/bin/sh\nif [ -f '{marker}' ]; then echo localhost:1; "
                         "else echo localhost:2; fi\n")
        data = ["data.name=faulty:marking_digits", f"data.args={{after: 1000, marker: '{marker}'}}"]
    else:
        # Horovod blacklists the host of a failed worker: two names for this machine keep one.
        hosts.write_text("#!/bin/sh\necho localhost:1\necho 127.0.0.1:1\n")
        data = ["data.name=faulty:killing_digits",
                f"data.args={{kill_rank: 0, kill_after: 1000, marker: '{marker}'}}"]
    hosts.chmod(0o755)
    overrides = [*MLP, "train.epochs=3", "data.batch_size=16", "dist.horovod.commit_every_steps=5"]
    cmd = [str(BIN / "horovodrun"), "-np", str(np_start), "--min-np", "1", "--max-np", "2",
           "--host-discovery-script", str(hosts), "--gloo", "--network-interface", "lo",
           *distrain("train", f"run.out_dir={tmp_path / 'elastic'}", *overrides,
                     f"train.grad_accum_steps={accum}", *data)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=240,
                         env={**env(), "PYTHONPATH": str(Path(__file__).parent)})
    assert marker.exists(), "the fault was not injected"
    assert out.returncode == 0, (out.stdout[-3000:], out.stderr[-3000:])
    change = ("1 -> 2 processes; global batch 32 kept as 2 × 16 × accumulation 1"
              if fault == "added" else
              "2 -> 1 processes; global batch 32 kept as 1 × 16 × accumulation 2")
    assert f"distrain: elastic: {change}, LR unchanged" in out.stdout
    # The lock went with rank 0 (no takeover warning) and the last rank 0 released it.
    assert "took over the lock" not in out.stdout + out.stderr
    assert not (tmp_path / "elastic" / ".distrain.lock").exists()
    run_distributed(train_body, 2, tmp_path / "ddp", ("dist.backend=torchrun", *overrides))
    elastic, ddp = weights(tmp_path / "elastic"), weights(tmp_path / "ddp")
    for k in ddp:
        assert torch.allclose(elastic[k], ddp[k], rtol=1e-5, atol=1e-6), \
            (k, (elastic[k] - ddp[k]).abs().max())
    rows = [[json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text()
             .splitlines()] for run in ("elastic", "ddp")]
    assert [r["step"] for r in rows[0]] == [45, 90, 135]
    for a, b in zip(*rows):
        for key in ("train_loss", "train_acc", "val_loss", "val_acc"):
            assert a[key] == pytest.approx(b[key], rel=1e-4), (a["epoch"], key)
