"""`distrain bench`: distrain against the hand-written loop and the raw collectives.

    distrain bench --out runs/bench            # the full set (minutes on 2 cores)
    distrain bench --quick --only overhead     # tiny sizes, one case

Each case launches real processes (torchrun, horovodrun, or one process) that time their
two arms interleaved (A B A B ...) after a warm-up; this parent collects the raw timings,
prints a table of medians (min-max) and ratios, and writes bench.json and bench.png.
Ratios are the figures that matter; absolute times are context.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from distrain.distributed.horovod import horovod_available
from distrain.tools.bench.report import (
    Row,
    median,
    spread,
    unjudged_when_quick,
    write_chart,
    write_table,
)

CASES = ("overhead", "scaling", "accumulation", "sync", "checkpoint", "startup", "fsdp", "compile",
         "peers", "recipe", "gpu")
RECIPE = Path(__file__).resolve().parents[4] / "configs" / "imbalanced_digits.yaml"


def _env() -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    # One thread per process (the processes share the cores); OpenMPI refuses root unless told.
    env.update(OMP_NUM_THREADS=env.get("OMP_NUM_THREADS", "1"), OMPI_ALLOW_RUN_AS_ROOT="1",
               OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    return env


def _bin(name: str) -> str:
    return str(Path(sys.executable).parent / name)


_RESULTS: dict[str, dict] = {}


def launch(case: str, args: dict, launcher: str = "local", nproc: int = 2,
           timeout: float = 900) -> dict:
    """Run one case under `launcher` (local, torchrun, horovodrun-gloo, horovodrun-mpi).
    A second call with the same arguments in one bench (the overhead and scaling cases'
    2-process run at quick sizes) reuses the first's measurement; `startup` times fresh
    launches and so calls `_launch`."""
    key = json.dumps([case, args, launcher, nproc], sort_keys=True)
    if key not in _RESULTS:
        _RESULTS[key] = _launch(case, args, launcher, nproc, timeout)
    return _RESULTS[key]


def _launch(case: str, args: dict, launcher: str, nproc: int, timeout: float = 900) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        args = {"out_dir": str(Path(tmp) / "run"), **args}
        worker = ["-m", "distrain.tools.bench.worker", case, str(out), json.dumps(args)]
        if launcher == "local":
            cmd = [sys.executable, *worker]
        elif launcher == "torchrun":
            cmd = [_bin("torchrun"), "--standalone", "--nproc-per-node", str(nproc), *worker]
        else:
            controller = launcher.split("-")[1]
            cmd = [_bin("horovodrun"), "-np", str(nproc), "-H", f"localhost:{nproc}",
                   f"--{controller}", sys.executable, *worker]
        done = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=timeout)
        if done.returncode != 0 or not out.exists():
            raise RuntimeError(f"bench case {case} under {launcher} failed "
                               f"({done.returncode}):\n{done.stderr[-3000:]}")
        return json.loads(out.read_text())


# --------------------------------------------------------------------------- the cases

def case_overhead(quick: bool) -> tuple[list[Row], dict]:
    args = {"n": 1024, "hidden": [64], "rounds": 2} if quick else \
        {"n": 8192, "hidden": [1024, 1024], "rounds": 7}
    raw = launch("overhead", args, "torchrun", 2)
    d, r = raw["step_s"]["distrain"], raw["step_s"]["reference"]
    rows = [Row("engine overhead, 2 procs (step time distrain / hand-written DDP)",
                median(d) / median(r), "<= 1.02", median(d) / median(r) <= 1.02,
                f"{spread(d, 1e3)} vs {spread(r, 1e3)} ms/step"),
            Row("final weights bit-identical to the hand-written loop",
                float(raw["weights_bitwise_equal"]), "== 1", raw["weights_bitwise_equal"], "")]
    return rows, raw


def case_scaling(quick: bool) -> tuple[list[Row], dict]:
    args = {"n": 1024, "hidden": [64], "rounds": 2} if quick else \
        {"n": 8192, "hidden": [1024, 1024], "rounds": 5}
    one, two = launch("overhead", args, "local"), launch("overhead", args, "torchrun", 2)
    eff = {}
    for arm in ("distrain", "reference"):
        # Per-rank batch fixed: 2 processes do twice the samples per step.
        t1, t2 = median(one["step_s"][arm]), median(two["step_s"][arm])
        eff[arm] = t1 / t2  # = (2 × samples / t2) / (2 × samples / t1) per process pair
    ratio = eff["distrain"] / eff["reference"]
    rows = [Row("scaling 1 -> 2 procs: distrain efficiency / DDP reference efficiency", ratio,
                ">= 0.95", ratio >= 0.95,
                f"efficiency distrain {eff['distrain']:.2f}, reference {eff['reference']:.2f}")]
    return rows, {"one": one, "two": two, "efficiency": eff}


def case_accumulation(quick: bool) -> tuple[list[Row], dict]:
    args = {"width": 256, "n": 1024, "steps": 2, "rounds": 1} if quick else \
        {"width": 2048, "n": 4096, "steps": 4, "rounds": 4}
    raw = {"torchrun": launch("accumulation", args, "torchrun", 2)}
    if horovod_available():
        raw["horovod"] = launch("accumulation", args, "horovodrun-gloo", 2)
    ddp = raw["torchrun"]
    t = {k: median(v) for k, v in ddp["step_s"].items()}
    accum = ddp["accum"]
    measured = t["every_micro_step"] / t["distrain"]
    predicted = (t["compute_only"] + accum * t["allreduce_only"]) / \
        (t["compute_only"] + t["allreduce_only"])
    rows = [Row(f"accumulation x{accum}, {ddp['grad_bytes'] / 2**20:.0f} MB grads: allreduce "
                "sets per step (DDP)", ddp["allreduce_sets_per_step"]["distrain"], "== 1",
                ddp["allreduce_sets_per_step"]["distrain"] == 1,
                f"syncing every micro-step: {ddp['allreduce_sets_per_step']['every_micro_step']:g}"),
            Row("accumulation speedup over syncing every micro-step (DDP)", measured,
                f"~ {predicted:.2f} predicted", None,
                f"compute {t['compute_only'] * 1e3:.1f} ms/step, allreduce "
                f"{t['allreduce_only'] * 1e3:.1f} ms")]
    if "horovod" in raw:
        h = raw["horovod"]["allreduce_sets_per_step"]["distrain"]
        rows.append(Row("allreduce sets per step (Horovod, backward_passes_per_step)", h,
                        "== 1", h == 1, f"{raw['horovod']['allreduces_per_set']:g} tensors/set"))
    return rows, raw


def case_sync(quick: bool) -> tuple[list[Row], dict]:
    args = {"sizes_mb": [1, 4], "rounds": 2} if quick else {"sizes_mb": [1, 4, 16, 64],
                                                            "rounds": 15}
    raw = {"memcpy": launch("memcpy", args), "torchrun": launch("sync", args, "torchrun", 2)}
    if horovod_available():
        raw["horovod-gloo"] = launch("sync", args, "horovodrun-gloo", 2)
        raw["horovod-mpi"] = launch("sync", args, "horovodrun-mpi", 2)
    rows = []
    for name in [k for k in raw if k != "memcpy"]:
        for mb, times in raw[name]["by_size_mb"].items():
            ratio = median(times["raw_allreduce"]) / median(times["distrain"])
            copy = median(raw["memcpy"]["by_size_mb"][mb])
            gate = float(mb) >= 4
            rows.append(Row(f"gradient sync {name}, {mb} MB: raw allreduce / distrain's sync",
                            ratio, ">= 0.9" if gate else "(context)",
                            ratio >= 0.9 if gate else None,
                            f"{spread(times['distrain'], 1e3)} ms; memcpy {copy * 1e3:.2f} ms "
                            f"({float(mb) / 1024 / copy:.1f} GB/s)"))
    return rows, raw


def case_checkpoint(quick: bool) -> tuple[list[Row], dict]:
    raw = launch("checkpoint", {"mb": 8 if quick else 256, "rounds": 1 if quick else 8})
    writes = launch("writes", {"quick": quick}, "torchrun", 2)
    t = {k: median(v) for k, v in raw["step_s"].items()}
    size = f"{raw['bytes'] / 2**20:.0f} MB"
    rows = [Row(f"checkpoint {size}: distrain save / torch.save + fsync",
                t["distrain"] / t["bare_torch_save"], "<= 1.15",
                t["distrain"] / t["bare_torch_save"] <= 1.15,
                f"{t['distrain']:.3f} s vs {t['bare_torch_save']:.3f} s"),
            Row(f"checkpoint {size}: async save, loop blocked / synchronous save",
                t["distrain_async"] / t["distrain"], "<= 0.25",
                t["distrain_async"] / t["distrain"] <= 0.25,
                f"blocked {t['distrain_async'] * 1e3:.0f} ms"),
            Row("checkpoint bytes written by non-main ranks", float(sum(writes["by_rank"][1:])),
                "== 0", sum(writes["by_rank"][1:]) == 0,
                f"rank 0 wrote {writes['by_rank'][0] / 2**10:.0f} KiB")]
    return rows, {"save": raw, "writes": writes}


def case_startup(quick: bool) -> tuple[list[Row], dict]:
    # Quick (the tests): torchrun only; each launch is seconds of start-up.
    launchers = ["torchrun"] + (["horovodrun-gloo"] if horovod_available() and not quick else [])
    rows, raw = [], {}
    for launcher in launchers:
        times: dict[str, list[float]] = {"distrain": [], "bare": []}
        for _ in range(1 if quick else 3):
            for arm in ("distrain", "bare"):
                began = time.time()
                result = _launch("startup", {"arm": arm}, launcher, 2)
                times[arm].append(result["ready_at"] - began)
        raw[launcher] = times
        d, b = median(times["distrain"]), median(times["bare"])
        rows.append(Row(f"time to first step under {launcher} / to a bare process group", d / b,
                        "(context)", None, f"{d:.1f} s vs {b:.1f} s"))
    return rows, raw


def case_fsdp(quick: bool) -> tuple[list[Row], dict]:
    """The same AdamW training under DDP, FSDP and FSDP with activation checkpointing, each
    in its own 2-process torchrun (so each peak RSS is its own): per-rank bytes counted from
    the tensors, and the epoch time."""
    args = {"n": 512, "hidden": [256, 256], "rounds": 1} if quick else \
        {"n": 2048, "hidden": [2048, 2048, 2048], "rounds": 3}
    arms = [("ddp", "ddp", False), ("fsdp", "fsdp", False)] + \
        ([] if quick else [("fsdp_ac", "fsdp", True)])
    raw = {name: launch("memory", {**args, "strategy": strategy, "checkpointing": ac},
                        "torchrun", 2) for name, strategy, ac in arms}

    def state_bytes(run: dict) -> int:  # the largest rank's weights + gradients + optimizer
        return max(r["params"] + r["grads"] + r["optimizer"] for r in run["by_rank"])

    def rss(run: dict) -> float:
        return max(r["peak_rss"] for r in run["by_rank"]) / 2**20

    ddp, fsdp = raw["ddp"], raw["fsdp"]
    ratio = state_bytes(fsdp) / state_bytes(ddp)
    t = {name: median(run["epoch_s"]) for name, run in raw.items()}
    rows = [Row(f"FSDP / DDP per-rank bytes of weights + gradients + AdamW state, 2 ranks, "
                f"{ddp['weights'] / 1e6:.1f} M weights", ratio, "<= 0.55", ratio <= 0.55,
                f"{state_bytes(fsdp) / 2**20:.0f} vs {state_bytes(ddp) / 2**20:.0f} MiB; peak "
                f"RSS {rss(fsdp):.0f} vs {rss(ddp):.0f} MiB", counted=True),
            Row("FSDP / DDP epoch time, 2 ranks on CPU (gloo)", t["fsdp"] / t["ddp"],
                "(context)", None, f"{t['fsdp']:.2f} s vs {t['ddp']:.2f} s per epoch of "
                f"{ddp['steps_per_epoch']} steps")]
    if "fsdp_ac" in raw:
        rows.append(Row("FSDP + activation checkpointing / FSDP epoch time",
                        t["fsdp_ac"] / t["fsdp"], "(context)", None,
                        f"peak RSS {rss(raw['fsdp_ac']):.0f} MiB (an MLP keeps few activations: "
                        "the gain is for deep models)"))
    return rows, raw


def case_compile(quick: bool) -> tuple[list[Row], dict]:
    args = {"steps": 6, "n_embd": 64} if quick else {"steps": 30, "n_embd": 256, "seq_len": 128}
    raw = launch("compile", args)
    eager, compiled = median(raw["step_s"]["eager"]), median(raw["step_s"]["compiled"])
    return [Row("torch.compile / eager step time, small GPT, one CPU process",
                compiled / eager, "(context)", None,
                f"{compiled * 1e3:.1f} vs {eager * 1e3:.1f} ms/step; first step (compiling) "
                f"{raw['first_step_s']['compiled']:.1f} s vs {raw['first_step_s']['eager']:.2f} s"),
            Row("torch.compile vs eager: largest final weight difference",
                raw["weights_max_abs_diff"], "<= 1e-4", raw["weights_max_abs_diff"] <= 1e-4,
                f"after {len(raw['step_s']['eager']) + 2} AdamW steps, "
                f"{raw['weights'] / 1e6:.2f} M weights", counted=True)], raw


def case_peers(quick: bool) -> tuple[list[Row], dict]:
    """The same MLP training through a hand-written DDP loop, Accelerate, Fabric and
    distrain (bench/peers.py), without and with accumulation × 4, 2 processes."""
    from distrain.tools.bench.peers import available

    missing = [arm for arm, version in available().items() if version is None]
    if missing:
        return [Row("peers side by side", float("nan"), "(context)", None,
                    f"not run: {', '.join(missing)} not installed; pip install -e '.[peers]'")], \
            {"skipped": missing}
    args = {"n": 1000, "batch": 16, "hidden": [64], "rounds": 1} if quick else \
        {"n": 8000, "batch": 32, "hidden": [1024, 1024], "rounds": 5}
    raw: dict = {}
    rows = []
    for accum in (1, 4):
        run = raw[f"accum{accum}"] = launch("peers", {**args, "accum": accum}, "torchrun", 2)
        t = {arm: median(v) for arm, v in run["epoch_s"].items()}
        rows.append(Row(f"peers, accumulation x{accum}: epoch time / hand-written DDP "
                        "(distrain; Accelerate; Fabric)", t["distrain"] / t["ddp"], "(context)",
                        None, f"Accelerate {t['accelerate'] / t['ddp']:.2f}, Fabric "
                        f"{t['fabric'] / t['ddp']:.2f}; DDP {t['ddp'] * 1e3:.0f} ms/epoch"))
    errors = raw["accum4"]["errors"]
    rows.append(Row("peers, short last window (accumulation x4): distrain's gradient, largest "
                    "difference from the exact global-batch mean", errors["distrain"]["max_abs"],
                    "<= 1e-6", errors["distrain"]["max_abs"] <= 1e-6,
                    f"loss / accum as DDP and Fabric users write it {errors['ddp']['max_abs']:.1e} "
                    f"and {errors['fabric']['max_abs']:.1e}; Accelerate "
                    f"{errors['accelerate']['max_abs']:.1e} (its last step saw "
                    f"{errors['accelerate']['last_step_saw']} samples for a last batch of "
                    f"{errors['accelerate']['last_batch']})", counted=True))
    if not quick:  # fresh processes per arm: the time to the end of the first step
        ready = {}
        for arm in ("ddp", "accelerate", "fabric", "distrain"):
            times = []
            for _ in range(3):
                began = time.time()
                result = _launch("first_step", {**args, "accum": 1, "arm": arm}, "torchrun",
                                 2)
                times.append(result["ready_at"] - began)
            ready[arm] = median(times)
        raw["first_step_s"] = ready
        rows.append(Row("peers: time to the first step, distrain / hand-written DDP",
                        ready["distrain"] / ready["ddp"], "(context)", None,
                        ", ".join(f"{arm} {s:.1f} s" for arm, s in ready.items())))
    return rows, raw


def case_recipe(quick: bool) -> tuple[list[Row], dict]:
    """The shipped imbalanced-digits recipe (LDAM-DRW, cosine head, Mixup, fp16) against the
    same recipe with plain cross-entropy and a linear head: the best balanced accuracy of
    each, 2 processes under torchrun, seed 1 (CPU runs are deterministic). A research-style
    comparison, so it lives here rather than in the test suite."""
    name = "imbalanced digits: best balanced accuracy, LDAM-DRW recipe / cross-entropy"
    if not RECIPE.is_file():
        return [Row(name, float("nan"), "> 1", None, f"not run: no {RECIPE}")], {}
    arms = {"ldam": [], "cross_entropy": ["model.args.cosine_head=false",
                                          "loss.name=cross_entropy", "loss.args=null"]}
    best: dict[str, float] = {}
    for arm, overrides in arms.items():
        with tempfile.TemporaryDirectory() as tmp:
            cmd = [_bin("torchrun"), "--standalone", "--nproc-per-node", "2", "-m", "distrain",
                   "train", "--config", str(RECIPE), f"run.out_dir={tmp}/run", "run.seed=1",
                   "logging.plot=false", *(["train.epochs=1"] if quick else []), *overrides]
            done = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=900)
            if done.returncode != 0:
                raise RuntimeError(f"bench case recipe ({arm}) failed:\n{done.stderr[-3000:]}")
            rows = [json.loads(line) for line in
                    (Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines()]
            best[arm] = max(r["val_balanced_acc"] for r in rows if "val_balanced_acc" in r)
    ratio = best["ldam"] / best["cross_entropy"]
    judged = not quick  # one epoch says nothing about the recipe
    return [Row(name, ratio, "> 1", ratio > 1 if judged else None,
                f"{best['ldam']:.4f} vs {best['cross_entropy']:.4f}"),
            Row("imbalanced digits: best balanced accuracy of the LDAM-DRW recipe",
                best["ldam"], ">= 0.97", best["ldam"] >= 0.97 if judged else None, "")], best


def case_gpu(quick: bool) -> tuple[list[Row], dict]:
    import torch

    name = "GPU bf16 GPT-2 small: tokens/s distrain / plain loop"
    if not torch.cuda.is_available():
        return [Row(name, float("nan"), ">= 0.97", None, "not run: no CUDA device here")], \
            {"skipped": "no CUDA device"}
    args = {"model": {"n_layer": 2, "n_embd": 256, "n_head": 4}, "seq_len": 256, "batch": 8,
            "steps": 4, "rounds": 2} if quick else {"seq_len": 1024, "batch": 16, "steps": 10,
                                                    "rounds": 9}
    raw = launch("lm", args)
    return gpu_rows(raw, name if not quick else name.replace("GPT-2 small", "tiny GPT")), raw


def gpu_rows(raw: dict, name: str) -> list[Row]:
    tokens = raw["tokens_per_epoch"]
    rate = {arm: tokens / median(t) for arm, t in raw["epoch_s"].items()}
    ratio = rate["distrain"] / rate["reference"]
    unchecked = rate["distrain_unchecked"] / rate["reference"]
    rows = [Row(name, ratio, ">= 0.97", ratio >= 0.97,
                f"{rate['distrain']:,.0f} vs {rate['reference']:,.0f} tokens/s, batch "
                f"{raw['batch']} × {raw['model']['block_size']}, {raw['weights'] / 1e6:.0f} M "
                f"weights, {raw['device']}"),
            Row(name.replace("distrain", "distrain without the NaN-step check"), unchecked,
                ">= 0.97", unchecked >= 0.97, f"{rate['distrain_unchecked']:,.0f} tokens/s "
                "(train.skip_nonfinite_steps=false: what the check costs)"),
            Row("GPU final weights: largest difference distrain vs plain loop",
                raw["weights_max_abs_diff"], "(context)", None,
                f"train loss {raw['train_loss']['distrain'][-1]:.4f} vs "
                f"{raw['train_loss']['reference'][-1]:.4f}")]
    gib = {arm: max(b) / 2**30 for arm, b in raw["peak_memory_bytes"].items()}
    if gib["reference"]:  # CUDA only
        rows.append(Row("GPU peak memory: distrain / plain loop",
                        gib["distrain"] / gib["reference"], "(context)", None,
                        f"{gib['distrain']:.2f} vs {gib['reference']:.2f} GiB (both models "
                        f"resident: {raw['resident_bytes'] / 2**30:.2f} GiB)"))
    if raw["peak_flops"]:
        mfu = {arm: r * raw["flops_per_token"] / raw["peak_flops"] for arm, r in rate.items()}
        rows.append(Row("GPU model FLOPs utilisation (MFU), distrain", mfu["distrain"],
                        "(context)", None, f"plain loop {mfu['reference']:.3f}; "
                        f"{raw['flops_per_token'] / 1e9:.2f} GFLOP/token, peak "
                        f"{raw['peak_flops'] / 1e12:.0f} TFLOP/s bf16 dense"))
    return rows


def machine() -> dict:
    import torch

    from distrain.distributed import versions

    return {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "host": platform.node(),
            "cpus": os.cpu_count(), "load_average": os.getloadavg(),
            "platform": platform.platform(), "versions": versions(),
            "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"}


def run(out_dir: str | Path, quick: bool = False, only: list[str] | None = None) -> dict:
    """Run the benchmarks, print the table, write bench.json and bench.png."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    report = {"machine": machine(), "quick": quick, "cases": {}}
    rows: list[Row] = []
    _RESULTS.clear()  # measurements are shared within one bench, never with the next
    for name in only or CASES:
        began = time.perf_counter()
        case_rows, raw = globals()[f"case_{name}"](quick)
        if quick:
            case_rows = [unjudged_when_quick(r) for r in case_rows]
        rows += case_rows
        report["cases"][name] = {"rows": [r.as_dict() for r in case_rows], "raw": raw,
                                 "seconds": time.perf_counter() - began}
        print(f"distrain bench: {name} done in {time.perf_counter() - began:.0f} s", flush=True)
    report["machine"]["load_average_after"] = os.getloadavg()
    (out / "bench.json").write_text(json.dumps(report, indent=1))
    print(write_table(rows, report["machine"]))
    write_chart(rows, out / "bench.png", report["machine"])
    print(f"distrain bench: wrote {out / 'bench.json'} and {out / 'bench.png'}")
    return report
