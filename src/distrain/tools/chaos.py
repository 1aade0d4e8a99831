"""A seeded chaos run: faults injected into a real `torchrun --max-restarts` job, whose end
must equal an uninterrupted run of the same config, bitwise.

    python -m distrain.tools.chaos --config configs/digits.yaml --kills 5 --seed 3 [overrides]
    ./launcher/chaos --kills 10 --seed 1          # the same, set up, on configs/digits.yaml

First the reference: the job under torchrun, nothing injected. Then the chaos run: the same
job under `torchrun --max-restarts <kills + 1>`, while a supervisor (this process) watches
torchrun's workers (its child processes, read from /proc) and `checkpoints/`, and injects one
fault per worker group, as planned from the seed:

- `kill` `after_steps`: SIGKILL a rank once the group has checkpointed N steps past its start;
- `kill` `during_write`: SIGKILL rank 0 (the writer) while the group's Nth checkpoint write is
  in progress (a temporary `.step-*.pt.*.tmp` exists in `checkpoints/`);
- `kill` `after_restart`: SIGKILL a rank T s after a restarted group's workers appeared
  (before or around their first step);
- `term` `after_steps`: SIGTERM to one rank: the preemption path (every rank stops at the
  same step, rank 0 writes last.pt, all exit 75), which torchrun counts as a failure and
  restarts, and the new group resumes.

Then it checks: torchrun exited 0; last.pt's model weights and global step and metrics.jsonl
(without its wall-clock fields) equal the reference's bitwise; every retained checkpoint
verifies; no temporary file is left in the run folder. It prints a JSON report (the faults,
when and where each landed, the comparison, the time the faults cost) and exits 0 only if
every fault happened as planned and everything matched.

The supervisor reads nothing in the run folder but `checkpoints/` and `metrics.jsonl`, and
writes nothing there: torchrun's output goes beside the two run folders.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from distrain.components.checkpoint import files as ckpt
from distrain.components.observe.runfiles import METRICS_FILE

# metrics.jsonl fields that measure time, which no two runs share; every other field is compared.
WALL_CLOCK = ("samples_per_s", "epoch_time_s", "train_time_s", "data_wait_s", "sync_wait_s",
              "compute_s")
FAST_POLL_S = 0.0005  # while waiting for a checkpoint write: a ~10 ms write must not slip by
POLL_S = 0.01
SCAN_S = 0.02  # between scans of /proc for the workers (~2 ms each: not at FAST_POLL_S)


@dataclass
class Fault:
    """One planned fault, and what happened when it was injected."""

    kind: str  # "kill" (SIGKILL) or "term" (SIGTERM: preemption)
    moment: str  # "after_steps", "during_write" or "after_restart"
    value: float  # steps past the group's start / the group's write number / seconds
    rank: int
    group: int  # the worker group (0: the first, 1: after the first restart, ...)
    sent_at_s: float | None = None  # since the chaos run started
    newest_step: int | None = None  # the newest finished checkpoint when the signal was sent
    temp_file: str | None = None  # during_write: the temporary file seen being written
    temp_file_outlived_writer: bool | None = None  # ... and still there once rank 0 was dead
    first_failure: dict | None = None  # the process torchrun saw fail first, its exit code
    resumed_step: int | None = None  # where the next group resumed

    def describe(self) -> str:
        what = {"after_steps": f"{self.value:g} steps after the group started",
                "during_write": f"during the group's write #{self.value:g}",
                "after_restart": f"{self.value:.2f} s after the restarted workers appeared"}
        return f"{self.kind} rank {self.rank} {what[self.moment]}"


def plan(kills: int, seed: int, nproc: int, every_steps: int) -> list[Fault]:
    """The faults, one per worker group: `kills` SIGKILLs, at least one during a write and one
    soon after a restart (never in the first group), and one SIGTERM; the same seed, the same
    plan."""
    if kills < 2:
        raise ValueError(f"--kills: expected at least 2 (one during a write, one soon after a "
                         f"restart), got {kills}")
    rng = random.Random(seed)
    moments = ["during_write", "after_restart"] + [
        rng.choice(["after_steps", "after_steps", "during_write", "after_restart"])
        for _ in range(kills - 2)]
    kinds = [("kill", m) for m in moments] + [("term", "after_steps")]
    rng.shuffle(kinds)
    first = next(i for i, (_, m) in enumerate(kinds) if m != "after_restart")
    kinds.insert(0, kinds.pop(first))  # the first group was not restarted
    faults = []
    for group, (kind, moment) in enumerate(kinds):
        if moment == "during_write":
            value, rank = rng.randint(1, 3), 0  # only rank 0 writes
        elif moment == "after_restart":
            value, rank = round(rng.uniform(0.1, 1.0), 2), rng.randrange(nproc)
        else:
            value, rank = rng.randint(1, 3) * every_steps, rng.randrange(nproc)
        faults.append(Fault(kind, moment, value, rank, group))
    return faults


def worker_pids(parent: int) -> dict[int, int]:
    """torchrun's workers (its children that carry a RANK), by rank."""
    found = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            if ppid != parent:
                continue
            env = Path(entry.path, "environ").read_bytes().split(b"\0")
        except (OSError, ValueError, IndexError):  # gone meanwhile, or not ours to read
            continue
        rank = [v[5:] for v in env if v.startswith(b"RANK=")]
        if rank:  # no RANK yet: forked, not yet exec'ed
            found[int(rank[0])] = int(entry.name)
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"  # a zombie is dead, not yet reaped by torchrun


def newest_step(folder: Path) -> int:
    """The newest step checkpoint that finished (has its marker); 0 if none."""
    for path in ckpt.step_files(folder) if folder.is_dir() else []:
        if path.with_name(path.name + ckpt.DONE).is_file():
            return int(path.stem.split("-")[1])
    return 0


def writes_in_progress(folder: Path) -> list[str]:
    try:
        names = os.listdir(folder)
    except OSError:
        return []
    # save_atomic's temporary file (mkstemp); the marker's own `.done.tmp` is not the write.
    return [n for n in names if n.startswith(".step-") and n.endswith(".tmp")
            and not n.endswith(ckpt.DONE + ".tmp")]


def torchrun_cmd(nproc: int, restarts: int, config: str | None, overrides: list[str]) -> list:
    torchrun = Path(sys.executable).with_name("torchrun")
    config_args = ["--config", config] if config else []
    return [str(torchrun), "--standalone", "--nproc-per-node", str(nproc),
            "--max-restarts", str(restarts), "-m", "distrain", "train", *config_args, *overrides]


def launch(cmd: list, log: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)  # a fresh job even if this process was itself launched by torchrun
    with open(log, "w") as f:
        return subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)


def stop(proc: subprocess.Popen) -> None:
    """SIGKILL torchrun and its workers (torchrun's own death would leave them orphaned)."""
    for pid in worker_pids(proc.pid).values():
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.kill()
    proc.wait()


class Supervisor:
    """Injects `faults` into the torchrun process `proc`, one per worker group."""

    def __init__(self, proc: subprocess.Popen, faults: list[Fault], out_dir: Path,
                 nproc: int) -> None:
        self.proc, self.faults, self.folder = proc, faults, ckpt.checkpoint_dir(out_dir)
        self.nproc = nproc
        self.groups: list[dict] = []  # per group: its pids, start time, start step
        self.stale: set[str] = set()
        self.began = time.perf_counter()

    def run(self, timeout: float) -> None:
        current: set[int] = set()
        fired = True
        writes: set[str] = set()
        workers: dict[int, int] = {}
        scanned = 0.0
        while self.proc.poll() is None:
            if time.perf_counter() - self.began > timeout:
                stop(self.proc)
                raise TimeoutError(f"the chaos run took over {timeout:.0f} s")
            if time.perf_counter() - scanned >= SCAN_S:
                workers, scanned = worker_pids(self.proc.pid), time.perf_counter()
            # A new group: every rank's process is up and none is of the group before.
            if len(workers) == self.nproc and not current & set(workers.values()):
                current, fired, writes = set(workers.values()), False, set()
                # Left by a write killed in the group before (the next save removes it): not
                # a write in progress.
                self.stale = set(writes_in_progress(self.folder))
                self.groups.append({"pids": workers, "started_s": self.elapsed(),
                                    "start_step": newest_step(self.folder)})
            group = len(self.groups) - 1
            fault = self.faults[group] if 0 <= group < len(self.faults) else None
            if fault is None or fired:
                time.sleep(POLL_S)
                continue
            fired = self.maybe_fire(fault, workers, writes)
            time.sleep(FAST_POLL_S if fault.moment == "during_write" else POLL_S)

    def elapsed(self) -> float:
        return round(time.perf_counter() - self.began, 3)

    def maybe_fire(self, fault: Fault, workers: dict, writes: set[str]) -> bool:
        group, pid = self.groups[-1], workers.get(fault.rank)
        if pid is None:  # the group is going down by itself
            return False
        if fault.moment == "after_restart":
            if self.elapsed() - group["started_s"] < fault.value:
                return False
        elif fault.moment == "after_steps":
            if newest_step(self.folder) < group["start_step"] + fault.value:
                return False
        else:
            now = [n for n in writes_in_progress(self.folder) if n not in self.stale]
            writes.update(now)
            if len(writes) < fault.value or not now:
                return False
        try:
            os.kill(pid, signal.SIGKILL if fault.kind == "kill" else signal.SIGTERM)
        except ProcessLookupError:  # it died meanwhile: its group is going down anyway
            return False
        if fault.moment == "during_write":
            fault.temp_file = now[0]
        fault.sent_at_s, fault.newest_step = self.elapsed(), newest_step(self.folder)
        if fault.temp_file is not None:
            while alive(pid):
                time.sleep(FAST_POLL_S)
            fault.temp_file_outlived_writer = (self.folder / fault.temp_file).exists()
        return True


FAILED = re.compile(r"failed \(exitcode: (-?\d+)\) local_rank: (\d+)")
RESUMED = re.compile(r"distrain: resumed from \S+ at epoch \d+(?: \+ \d+ steps)?, step (\d+)")
PREEMPTED = re.compile(r"distrain: preempted: stopped by signal 15 at step (\d+)")


def read_log(log: Path, faults: list[Fault], groups: list[dict]) -> dict:
    """What torchrun's log says: the first failure of each failed group (torchrun names one
    process per failure), the steps resumed from, the SIGTERM's step."""
    text = log.read_text(errors="replace")
    failures = [(int(rank), int(code)) for code, rank in FAILED.findall(text)]
    for fault, (rank, code) in zip(faults, failures):
        fault.first_failure = {"rank": rank, "exitcode": code}
    for fault, group in zip(faults, groups[1:]):
        fault.resumed_step = group["start_step"]  # the newest checkpoint: resume=auto takes it
    return {"failed_groups": len(failures),
            "resumed_steps": [int(s) for s in RESUMED.findall(text)],
            "preempted_steps": [int(s) for s in PREEMPTED.findall(text)]}


def rows(out_dir: Path) -> list[dict]:
    """metrics.jsonl without its wall-clock fields."""
    out = []
    for line in (out_dir / METRICS_FILE).read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            out.append({k: v for k, v in row.items() if k not in WALL_CLOCK})
    return out


def compare(reference: Path, chaos: Path) -> dict:
    """The properties a chaos run must end with, each with its evidence."""
    a = torch.load(ckpt.checkpoint_dir(reference) / ckpt.LAST, map_location="cpu",
                   weights_only=True)
    b = torch.load(ckpt.checkpoint_dir(chaos) / ckpt.LAST, map_location="cpu",
                   weights_only=True)
    differing = [k for k in a[ckpt.MODEL] if not torch.equal(a[ckpt.MODEL][k], b[ckpt.MODEL][k])]
    rows_a, rows_b = rows(reference), rows(chaos)
    folder = ckpt.checkpoint_dir(chaos)
    retained = [p for p in [*ckpt.step_files(folder), folder / ckpt.LAST, folder / ckpt.BEST]
                if p.exists()]
    problems = {p.name: ckpt.verify(p) for p in retained}
    temps = sorted(str(p.relative_to(chaos)) for p in chaos.rglob("*.tmp"))
    compared = sorted({k for r in rows_b for k in r})
    return {
        "weights_equal": not differing and a[ckpt.GLOBAL_STEP] == b[ckpt.GLOBAL_STEP],
        "weights_differing": differing, "global_step": [a[ckpt.GLOBAL_STEP], b[ckpt.GLOBAL_STEP]],
        "metrics_equal": rows_a == rows_b, "metrics_rows": [len(rows_a), len(rows_b)],
        "metrics_fields_compared": compared, "metrics_fields_dropped": list(WALL_CLOCK),
        "checkpoints_retained": sorted(problems),
        "checkpoints_failing": {k: v for k, v in problems.items() if v is not None},
        "temporary_files": temps,
    }


def fault_problems(faults: list[Fault], groups: list[dict], log: dict) -> list[str]:
    """Each planned fault must have landed at its planned kind of moment, and cost one
    restart; the SIGTERM must have stopped the group through the preemption path."""
    out = []
    for f in faults:
        if f.sent_at_s is None:
            out.append(f"never injected: {f.describe()} (group {f.group})")
        elif f.moment == "during_write" and not f.temp_file_outlived_writer:
            out.append(f"the write had finished when the kill landed: {f.describe()}")
        elif f.moment == "after_restart" and f.sent_at_s - groups[f.group]["started_s"] > 1.5:
            out.append(f"later than planned: {f.describe()}")
        elif f.kind == "term":
            stopped = log["preempted_steps"]
            if (f.first_failure or {}).get("exitcode") != 75 or stopped != [f.resumed_step]:
                out.append(f"SIGTERM: expected exit 75, rank 0 stopped at step S and the next "
                           f"group resumed at S; got {f.first_failure}, stopped at {stopped}, "
                           f"resumed at {f.resumed_step}")
    if not len(faults) == log["failed_groups"] == len(groups) - 1:
        out.append(f"{len(faults)} faults, {log['failed_groups']} failed groups in torchrun's "
                   f"log, {len(groups)} groups seen")
    if not set(log["resumed_steps"]) <= {g["start_step"] for g in groups}:
        out.append(f"resumed at steps {log['resumed_steps']}, expected only at the newest "
                   f"checkpoints when the groups started, {[g['start_step'] for g in groups]}")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m distrain.tools.chaos", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="the job's YAML config")
    parser.add_argument("--kills", type=int, default=3, help="SIGKILLs (>= 2); one SIGTERM too")
    parser.add_argument("--seed", type=int, default=0, help="the fault plan's seed")
    parser.add_argument("--nproc", type=int, default=2, help="processes (torchrun --nproc-per-node)")
    parser.add_argument("--out", default=None,
                        help="folder for the two runs (reference/, chaos/) and torchrun's logs; "
                             "default runs/chaos-<time>")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per run, at most")
    parser.add_argument("overrides", nargs="*", help="section.key=value, as for distrain train")
    args = parser.parse_intermixed_args(argv)  # options among the overrides
    try:
        report = chaos(args.config, args.overrides, args.kills, args.seed, args.nproc,
                       Path(args.out or time.strftime("runs/chaos-%Y%m%d-%H%M%S")), args.timeout)
    except (ValueError, TimeoutError) as exc:  # ConfigError is a ValueError
        print(f"distrain.tools.chaos: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(report, indent=2))
    return 0 if report["ok"] else 1


def chaos(config: str | None, overrides: list[str], kills: int, seed: int, nproc: int,
          out: Path, timeout: float = 1800) -> dict:
    """Run the reference and the chaos run into `out`/reference and `out`/chaos; the report."""
    from distrain.config import load_config

    cfg = load_config(config, overrides)
    every = cfg.checkpoint.every_steps
    if not every or cfg.checkpoint.resume != "auto":
        raise ValueError("chaos: expected checkpoint.every_steps > 0 and checkpoint.resume=auto "
                         f"(got {every} and {cfg.checkpoint.resume!r}): the restarted groups "
                         "resume from the step checkpoints")
    faults = plan(kills, seed, nproc, every)
    out.mkdir(parents=True, exist_ok=True)
    reference, chaotic = out / "reference", out / "chaos"

    began = time.perf_counter()
    straight = launch(torchrun_cmd(nproc, 0, config, [*overrides, f"run.out_dir={reference}"]),
                      out / "reference.log")
    try:
        straight_rc = straight.wait(timeout)
    except subprocess.TimeoutExpired:
        stop(straight)
        raise TimeoutError(f"the reference run took over {timeout:.0f} s") from None
    straight_s = time.perf_counter() - began
    if straight_rc != 0:
        return {"ok": False, "error": f"the reference run failed ({straight_rc}); see "
                                      f"{out / 'reference.log'}"}

    began = time.perf_counter()
    log = out / "chaos.log"
    proc = launch(torchrun_cmd(nproc, len(faults), config,
                               [*overrides, f"run.out_dir={chaotic}"]), log)
    supervisor = Supervisor(proc, faults, chaotic, nproc)
    supervisor.run(timeout)
    chaos_rc = proc.wait()
    chaos_s = time.perf_counter() - began

    found = read_log(log, faults, supervisor.groups)
    result = compare(reference, chaotic) if chaos_rc == 0 else {}
    problems = fault_problems(faults, supervisor.groups, found)
    ok = (chaos_rc == 0 and not problems and result["weights_equal"] and result["metrics_equal"]
          and not result["checkpoints_failing"] and not result["temporary_files"])
    return {"ok": ok, "seed": seed, "kills": kills, "torchrun_exit": chaos_rc,
            "faults": [{**asdict(f), "what": f.describe()} for f in faults],
            "groups": supervisor.groups, "restarts": len(supervisor.groups) - 1, **found,
            "fault_problems": problems, "comparison": result,
            "reference_s": round(straight_s, 1), "chaos_s": round(chaos_s, 1),
            "faults_cost_s": round(chaos_s - straight_s, 1), "out": str(out)}


if __name__ == "__main__":
    sys.exit(main())
