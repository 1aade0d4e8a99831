"""`distrain bench` in its tiny configuration: every case runs for real (torchrun,
horovodrun, one process) and its counts are right. No timing is asserted."""

import json
import math

import pytest

from distrain.commands.cli import main
from distrain.distributed.horovod import horovod_available
from distrain.tools.bench import CASES

# compile: its first step compiles for ~20 s whatever the size; compile = eager is tested in
# test_fsdp.py (one process's weights from compiled DDP and FSDP runs), the case runs in
# `distrain bench` only.
QUICK = [case for case in CASES if case != "compile"]


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    assert main(["bench", "--quick", "--out", str(out), "--only", *QUICK]) == 0
    data = json.loads((out / "bench.json").read_text())
    data["png"] = (out / "bench.png").read_bytes()
    return data


def rows(report, case):
    return {r["name"]: r for r in report["cases"][case]["rows"]}


def test_report_files_and_machine(report):
    assert report["png"][:8] == b"\x89PNG\r\n\x1a\n" and len(report["png"]) > 10_000
    machine = report["machine"]
    assert machine["cpus"] >= 1 and machine["versions"]["torch"] and "load_average" in machine
    assert set(report["cases"]) == {"overhead", "scaling", "accumulation", "sync", "checkpoint",
                                    "startup", "fsdp", "peers", "recipe", "gpu"}
    # Quick sizes judge counts only (a timing of a tiny model means nothing), and those hold.
    every = [r for case in report["cases"].values() for r in case["rows"]]
    judged = [r for r in every if r["passed"] is not None]
    assert len(judged) >= 6 and all(r["passed"] for r in judged), judged
    assert all(r["counted"] or r["target"].startswith("==") for r in judged)
    assert any("quick sizes: not judged" in r["detail"] for r in every)


def test_overhead_arms_end_with_bitwise_equal_weights(report):
    raw = report["cases"]["overhead"]["raw"]
    assert raw["world_size"] == 2 and raw["weights_bitwise_equal"] is True
    assert len(raw["step_s"]["distrain"]) == len(raw["step_s"]["reference"]) == 2
    scaling = report["cases"]["scaling"]["raw"]
    assert scaling["one"]["world_size"] == 1 and scaling["two"]["world_size"] == 2
    assert scaling["one"]["weights_bitwise_equal"] and scaling["two"]["weights_bitwise_equal"]


def test_accumulation_allreduces_once_per_step(report):
    raw = report["cases"]["accumulation"]["raw"]
    ddp = raw["torchrun"]
    assert ddp["accum"] == 4 and ddp["allreduces_per_set"] >= 1
    assert ddp["allreduce_sets_per_step"] == {"distrain": 1.0, "every_micro_step": 4.0}
    if horovod_available():
        hvd = raw["horovod"]
        assert hvd["allreduces_per_set"] == 6  # three Linear layers: weights and biases
        assert hvd["allreduce_sets_per_step"] == {"distrain": 1.0}


def test_sync_covers_every_backend_and_size(report):
    raw = report["cases"]["sync"]["raw"]
    expected = {"memcpy", "torchrun"} | ({"horovod-gloo", "horovod-mpi"}
                                         if horovod_available() else set())
    assert set(raw) == expected
    for name in expected - {"memcpy"}:
        assert set(raw[name]["by_size_mb"]) == {"1", "4"} and raw[name]["world_size"] == 2
    if horovod_available():
        assert raw["horovod-mpi"]["controller"] == "mpi"
        assert raw["horovod-gloo"]["controller"] == "gloo"


def test_checkpoint_counts(report):
    raw = report["cases"]["checkpoint"]["raw"]
    assert raw["save"]["verified"] and raw["save"]["bytes"] > 8 * 2**20
    by_rank = raw["writes"]["by_rank"]
    assert len(by_rank) == 2 and by_rank[0] > 0 and by_rank[1] == 0  # non-main ranks: nothing


def test_startup_and_gpu_rows(report):
    startup = report["cases"]["startup"]["raw"]["torchrun"]
    # Seconds from launch: a first training step comes after the process group exists.
    assert all(t > 0 for arm in startup.values() for t in arm)
    assert len(startup["distrain"]) == len(startup["bare"]) == 1
    gpu = report["cases"]["gpu"]["rows"][0]
    assert math.isnan(gpu["value"]) and gpu["passed"] is None and "not run" in gpu["detail"]


def test_unknown_case_is_a_clear_error(capsys):
    assert main(["bench", "--only", "overhed"]) == 2
    assert "--only: unknown case 'overhed'" in capsys.readouterr().err


def test_recipe_case_trains_both_arms(report):
    """Quick mode: one epoch of each arm, real balanced accuracies, no verdict (the full
    `distrain bench --only recipe` judges LDAM-DRW > cross-entropy and >= 0.97)."""
    best = report["cases"]["recipe"]["raw"]
    assert set(best) == {"ldam", "cross_entropy"} and all(0 < v <= 1 for v in best.values())
    judged = [r["passed"] for r in report["cases"]["recipe"]["rows"]]
    assert judged == [None, None]



def test_fsdp_holds_half_the_bytes_per_rank(report):
    raw = report["cases"]["fsdp"]["raw"]
    for name in ("ddp", "fsdp"):
        assert [r["params"] for r in raw[name]["by_rank"]] == [raw[name]["by_rank"][0]["params"]] * 2
    ddp, fsdp = raw["ddp"]["by_rank"][0], raw["fsdp"]["by_rank"][0]
    # Counted from the tensors: each rank holds half the weights, gradients and AdamW state.
    for part in ("params", "grads", "optimizer"):
        assert fsdp[part] / ddp[part] == pytest.approx(0.5, abs=0.01), part
    # AdamW's two moments, and a 0-dim step count per parameter.
    assert 2 * ddp["params"] <= ddp["optimizer"] < 2 * ddp["params"] + 1024
    assert report["cases"]["fsdp"]["rows"][0]["passed"] is True


def test_peers_side_by_side_only_distrain_is_exact_on_a_short_last_window(report):
    """The test set-up installs Accelerate and Fabric (the `peers` extra): every arm ran."""
    raw = report["cases"]["peers"]["raw"]
    for accum in ("accum1", "accum4"):
        assert raw[accum]["arms"] == ["ddp", "accelerate", "fabric", "distrain"]
        assert raw[accum]["world_size"] == 2
    errors = raw["accum4"]["errors"]
    assert errors["distrain"]["max_abs"] <= 1e-6
    assert errors["ddp"]["max_abs"] > 1e-3 and errors["fabric"]["max_abs"] > 1e-3  # loss / accum
    assert errors["accelerate"]["last_step_saw"] > errors["accelerate"]["last_batch"]  # padding
    assert errors["accelerate"]["max_abs"] > 1e-3
    # Without accumulation every arm's last step is the exact mean of a short batch.
    assert all(e["max_abs"] <= 1e-6 for arm, e in raw["accum1"]["errors"].items()
               if arm != "accelerate")
