"""One run per folder: rank 0 holds `<run.out_dir>/.distrain.lock` for the run's whole life.

A second launch on a live folder (a command pasted twice, a Slurm requeue while the old job
still runs) stops at once with exit status 2 and names the holder. A lock whose holder is
dead is taken over with a warning: on the same host, when its PID is gone (or is another
process now: the start time is compared); on another host, when its lease has expired (the
holder renews it every LEASE_S / 4 seconds). A launch of the same job (torchrun's run id,
Slurm's job id, horovodrun's rendezvous) on another host, such as a torchrun restart whose
rank 0 moved, waits up to one lease for a dead holder's lease to run out before refusing.

Taking over is a rename of the stale file (atomic: of two launches racing for it one wins),
then the same exclusive create as a first acquisition.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from datetime import datetime
from pathlib import Path

from distrain.components.observe.runfiles import LOCK_FILE
from distrain.distributed import Backend
from distrain.errors import RunLocked

LEASE_S = 60.0  # a holder on another host is dead when it has not renewed for this long


def job_id() -> str:
    """What identifies one launch across its restarts (empty: nothing does)."""
    run_id = os.environ.get("TORCHELASTIC_RUN_ID", "")
    if run_id and run_id != "none":
        return f"torchrun:{run_id}"
    if os.environ.get("SLURM_JOB_ID"):
        return f"slurm:{os.environ['SLURM_JOB_ID']}"
    addr = os.environ.get("HOROVOD_GLOO_RENDEZVOUS_ADDR")
    if addr:
        return f"horovod:{addr}:{os.environ.get('HOROVOD_GLOO_RENDEZVOUS_PORT', '')}"
    return ""


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def _start_ticks(pid: int) -> str | None:
    """The process's start time since boot (None: no such process, or a zombie)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) "
    return None if fields[0] in ("Z", "X") else fields[19]


def _pid_alive(pid: int, start: str | None) -> bool:
    if Path("/proc").is_dir():
        ticks = _start_ticks(pid)
        return ticks is not None and (start is None or ticks == start)
    try:  # no /proc (macOS): the PID alone
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def describe(record: dict) -> str:
    started = datetime.fromtimestamp(record.get("started", 0)).strftime("%Y-%m-%d %H:%M:%S")
    return f"host {record.get('host', '?')}, PID {record.get('pid', '?')}, started {started}"


class RunLock:
    """`out_dir`'s lock; `key` names the setting that chose the folder in a refusal."""

    def __init__(self, out_dir: str | Path, lease_s: float = LEASE_S,
                 key: str = "run.out_dir") -> None:
        self.path = Path(out_dir) / LOCK_FILE
        self.key = key
        self.lease_s = lease_s
        self.record: dict | None = None
        self.stop = threading.Event()
        self.thread: threading.Thread | None = None
        self.lost: str | None = None  # set when another launch took the lock from this one
        self.made_dir = False  # the run folder did not exist before this lock

    # -- the record
    def _mine(self) -> dict:
        now = time.time()
        return {"host": socket.gethostname(), "boot_id": _boot_id(), "pid": os.getpid(),
                "pid_start": _start_ticks(os.getpid()), "job": job_id(), "started": now,
                "renewed": now, "lease_s": self.lease_s}

    def _read(self) -> dict | None:
        """The holder's record; None when the file is gone. A record being written (or
        left half-written by a holder that died) reads as {} after a short wait."""
        for _ in range(20):
            try:
                text = self.path.read_text()
            except FileNotFoundError:
                return None
            try:
                return json.loads(text)
            except ValueError:
                time.sleep(0.05)
        return {}

    def _alive(self, record: dict) -> bool:
        if not record:
            return False
        if record.get("host") == socket.gethostname() and record.get("boot_id") == _boot_id():
            return _pid_alive(int(record["pid"]), record.get("pid_start"))
        return time.time() - float(record.get("renewed", 0)) < float(record.get("lease_s", 0))

    def _create(self, record: dict) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            json.dump(record, f)
            f.flush()
            os.fsync(f.fileno())
        return True

    # -- acquire, renew, release
    def acquire(self, from_my_job: bool = False) -> str | None:
        """Take the lock or raise RunLocked; returns a warning when a dead holder's lock was
        taken over. `from_my_job`: a holder of this same job is replaced at once (Horovod
        elastic's new rank 0, whose predecessor the job has already dropped)."""
        self.made_dir = not self.path.parent.exists()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        mine, warning = self._mine(), None
        waited_until = None
        while True:
            if self._create(mine):
                self.record, self.stop = mine, threading.Event()
                self.thread = threading.Thread(target=self._renew, name="distrain-run-lock",
                                               daemon=True)
                self.thread.start()
                return warning
            holder = self._read()
            if holder is None:  # released between our create and our read
                continue
            handover = from_my_job and mine["job"] and holder.get("job") == mine["job"]
            if not handover and self._alive(holder):
                same_job = mine["job"] and holder.get("job") == mine["job"] \
                    and holder.get("host") != mine["host"]
                if same_job:  # e.g. a torchrun restart whose rank 0 moved: its lease runs out
                    waited_until = waited_until or time.time() + self.lease_s + 5
                    if time.time() < waited_until:
                        time.sleep(1.0)
                        continue
                raise RunLocked(self._refusal(holder))
            stale = self.path.with_name(f"{LOCK_FILE}.stale-{os.getpid()}")
            try:
                os.rename(self.path, stale)
            except FileNotFoundError:  # another launch took it over first: look again
                continue
            taken = self._parse(stale)
            if taken != holder:  # a live lock was made between our read and our rename: undo
                try:
                    os.link(stale, self.path)
                except FileExistsError:
                    pass
                stale.unlink()
                continue
            stale.unlink()
            if not handover:
                warning = (f"distrain: warning: took over the lock of {self.path.parent} from "
                           f"a run that is gone "
                           f"({describe(holder) if holder else 'unreadable record'})")

    @staticmethod
    def _parse(path: Path) -> dict:
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            return {}

    def _refusal(self, holder: dict) -> str:
        age = time.time() - float(holder.get("renewed", time.time()))
        setting = "run.out_dir=..." if self.key == "run.out_dir" else "Engine(out_dir=...)"
        return (f"{self.key}: {self.path.parent} is in use by another run ({describe(holder)}, "
                f"lock renewed {age:.0f} s ago); wait for it to end, or give this run another "
                f"folder ({setting}); if that process is gone for good, delete {self.path}")

    def _renew(self) -> None:
        while not self.stop.wait(self.lease_s / 4):
            holder = self._read()
            mine = self.record
            if mine is None:  # given up (follow_rank_0) while this thread waited
                return
            if holder and (holder.get("host"), holder.get("pid")) != (mine["host"], mine["pid"]):
                same_job = mine["job"] and holder.get("job") == mine["job"]
                if same_job and float(holder.get("started", 0)) >= float(mine["started"]):
                    self.record = None  # handed over within the job (a new elastic rank 0)
                    return
                if not same_job:
                    self.lost = describe(holder)
                    print(f"distrain: warning: the lock of {self.path.parent} was taken over "
                          f"by {self.lost}; two runs may now write this folder", flush=True)
                    return
                # else: an older holder of this job wrote over ours (its last renewal racing
                # our take-over after an elastic reset): ours goes back
            mine["renewed"] = time.time()
            tmp = self.path.with_name(f"{LOCK_FILE}.tmp-{os.getpid()}")
            tmp.write_text(json.dumps(mine))
            os.replace(tmp, self.path)

    def check_joined(self, timeout_s: float = 60.0) -> None:
        """A worker that is not rank 0 under an elastic horovodrun (no collective at set-up):
        wait until the lock is this job's, and refuse when another live launch holds it."""
        mine = job_id()
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            holder = self._read()
            if holder and holder.get("job") == mine:
                return
            if holder and self._alive(holder) and holder.get("job") != mine:
                raise RunLocked(self._refusal(holder))
            time.sleep(0.2)
        raise RunLocked(f"{self.key}: {self.path.parent}: rank 0 did not take the run's lock "
                        f"within {timeout_s:.0f} s")

    def follow_rank_0(self, backend: Backend) -> None:
        """After a Horovod elastic reset: the process that is rank 0 now holds the lock (its
        predecessor may be gone); the others leave it to that one."""
        if backend.is_main and self.record is None:
            self.acquire(from_my_job=True)
        elif not backend.is_main and self.record is not None:
            self.stop.set()  # the new rank 0 replaces this record; nothing to unlink
            if self.thread is not None:
                self.thread.join(timeout=5)  # no renewal of ours lands after this
            self.record = None

    def release(self) -> None:
        """Give the lock up (safe to call twice); leaves another holder's lock alone."""
        if self.record is None:
            return
        self.stop.set()
        if self.thread is not None:
            self.thread.join(timeout=5)
        holder = self._read()
        if holder and holder.get("pid") == self.record["pid"] \
                and holder.get("host") == self.record["host"]:
            self.path.unlink(missing_ok=True)
            if self.made_dir:  # a run that stopped before writing leaves no folder it made
                try:
                    self.path.parent.rmdir()
                except OSError:  # not empty
                    pass
        self.record = None


def hold(lock: RunLock, backend: Backend) -> None:
    """Rank 0 takes the run folder's lock; every rank learns the outcome before any work."""
    outcome = None
    if backend.is_main:
        try:
            warning = lock.acquire()
            if warning:
                print(warning, flush=True)
        except RunLocked as exc:
            outcome = str(exc)
        except OSError as exc:  # e.g. no permission for the folder: every rank stops alike
            outcome = f"{lock.key}: cannot take the lock {lock.path}: {exc}"
    if backend.elastic:  # set-up runs no collective there: each worker reads the lock itself
        if not backend.is_main:
            lock.check_joined()
    else:
        outcome = backend.broadcast_object(outcome)  # Distribution: all ranks stop alike
    if outcome:
        raise RunLocked(outcome)


def lock_folder(out_dir: str | Path, backend: Backend, key: str) -> RunLock:
    """`hold` a new lock of `out_dir` (`key`: the setting that named it); on a refusal the
    backend is torn down before RunLocked reaches the caller."""
    lock = RunLock(out_dir, key=key)
    try:
        hold(lock, backend)
    except RunLocked:
        backend.teardown()
        raise
    return lock
