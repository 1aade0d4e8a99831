"""One run per folder: two real launches on one run.out_dir, a SIGKILLed holder, leases."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT, free_port
from test_e2e import clean_env

from distrain.components.observe.runfiles import LOCK_FILE, METRICS_FILE
from distrain.components.observe.runlock import RunLock
from distrain.errors import RunLocked

BIN = Path(sys.executable).parent
DIGITS = str(ROOT / "configs" / "digits.yaml")


def torchrun(out, *overrides):
    return [str(BIN / "torchrun"), "--nproc-per-node", "2", "--master-port", str(free_port()),
            "-m", "distrain", "train", "--config", DIGITS, f"run.out_dir={out}",
            "logging.plot=false", *overrides]


def wait_for(predicate, timeout=60.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError("timed out")


def test_a_second_launch_on_a_live_folder_stops_and_the_first_is_untouched(tmp_path):
    out = tmp_path / "run"
    first = subprocess.Popen(torchrun(out, "train.epochs=30"), env=clean_env(), text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: (out / METRICS_FILE).exists())  # training, holding the lock
        holder = json.loads((out / LOCK_FILE).read_text())
        # As ./launcher/run starts torchrun: exit with the workers' status, not torchrun's 1.
        second = subprocess.run([sys.executable, "-m", "distrain.commands.agent_status",
                                 *torchrun(out, "train.epochs=30", "optimizer.lr=0.2")],
                                env=clean_env(), capture_output=True, text=True, timeout=120)
        assert first.poll() is None, "the first run must still be training"
    finally:
        log, _ = first.communicate(timeout=300)
    assert second.returncode == 2, second.stderr
    lines = [l for l in second.stderr.splitlines() if l.startswith("distrain:")]
    assert len(lines) == 1 and "Traceback" not in second.stderr and "====" not in second.stderr
    assert f"run.out_dir: {out} is in use by another run (host {socket.gethostname()}, " \
           f"PID {holder['pid']}, started " in lines[0] and "give this run another folder" in lines[0]
    # The first run is whole: its own 30 rows in order, its config, no lock left behind.
    assert first.returncode == 0, log
    rows = [json.loads(l) for l in (out / METRICS_FILE).read_text().splitlines()]
    assert [r["epoch"] for r in rows] == list(range(1, 31))
    assert "lr: 0.05" in (out / "config.yaml").read_text()
    assert not (out / LOCK_FILE).exists()


def test_a_sigkilled_holders_lock_is_taken_over_and_the_run_resumes(tmp_path):
    out = tmp_path / "run"
    args = [str(BIN / "distrain"), "train", "--config", DIGITS, f"run.out_dir={out}",
            "logging.plot=false", "train.epochs=40", "checkpoint.every_steps=5"]
    victim = subprocess.Popen(args, env=clean_env(), stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    wait_for(lambda: (out / METRICS_FILE).exists())
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait()
    stale = json.loads((out / LOCK_FILE).read_text())
    assert stale["pid"] == victim.pid
    again = subprocess.run([*args[:-2], "train.epochs=3"], env=clean_env(), capture_output=True,
                           text=True, timeout=120)
    assert again.returncode == 0, again.stderr
    assert f"took over the lock of {out} from a run that is gone (host " \
           f"{socket.gethostname()}, PID {victim.pid}" in again.stdout
    assert "resumed from" in again.stdout and not (out / LOCK_FILE).exists()


def foreign(path: Path, renewed_ago: float, job: str = "") -> None:
    path.mkdir(parents=True, exist_ok=True)
    (path / LOCK_FILE).write_text(json.dumps({
        "host": "node-elsewhere", "boot_id": "x", "pid": 4242, "pid_start": "1", "job": job,
        "started": time.time() - 100, "renewed": time.time() - renewed_ago, "lease_s": 2.0}))


def test_a_lock_from_another_host_holds_for_its_lease(tmp_path, monkeypatch):
    foreign(tmp_path, renewed_ago=0.5)
    with pytest.raises(RunLocked, match="host node-elsewhere, PID 4242"):
        RunLock(tmp_path).acquire()
    foreign(tmp_path, renewed_ago=5.0)  # lease (2 s) expired: the holder is gone
    lock = RunLock(tmp_path, lease_s=0.4)
    assert "took over the lock" in lock.acquire()
    mine = json.loads((tmp_path / LOCK_FILE).read_text())
    assert mine["pid"] == os.getpid()
    time.sleep(0.35)  # renewed by its thread
    assert json.loads((tmp_path / LOCK_FILE).read_text())["renewed"] > mine["renewed"]
    with pytest.raises(RunLocked, match=f"PID {os.getpid()}"):  # this process holds it: live
        RunLock(tmp_path).acquire()
    lock.release()
    assert not (tmp_path / LOCK_FILE).exists()
    # The same job (a restart whose rank 0 moved to this host) waits for the lease to end.
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job7")
    foreign(tmp_path, renewed_ago=0.0, job="torchrun:job7")
    began, lock = time.time(), RunLock(tmp_path)
    assert "took over" in lock.acquire()
    assert time.time() - began >= 1.5  # waited for the 2 s lease
    lock.release()
