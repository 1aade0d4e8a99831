"""The torchrun wrapper (`python -m distrain.commands.agent_status`) on a terminal: the workers
see one (rank 0's progress bar shows, its updates pass through as they come) and the exit
status is still the workers' own, torchrun's traceback page still dropped."""

from __future__ import annotations

import fcntl
import os
import pty
import struct
import sys
import termios
from pathlib import Path

from conftest import ROOT, free_port

BIN = Path(sys.executable).parent


def on_a_terminal(cmd: list[str]) -> tuple[str, int]:
    """`cmd` with a pseudo-terminal as stdin, stdout and stderr; (what it wrote, status)."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT / "src"), COLUMNS="120")
    pid, fd = pty.fork()
    if pid == 0:  # the child: exec at once
        os.chdir(ROOT)
        os.execve(cmd[0], cmd, env)
    # A terminal 120 columns wide (a new one is 0 × 0, where tqdm draws nothing).
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    out = b""
    while True:
        try:
            data = os.read(fd, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not data:
            break
        out += data
    _, status = os.waitpid(pid, 0)
    os.close(fd)
    return out.decode(errors="replace"), os.waitstatus_to_exitcode(status)


def wrapped(*args: str) -> list[str]:
    return [str(BIN / "python"), "-m", "distrain.commands.agent_status", str(BIN / "torchrun"),
            "--nproc-per-node", "2", "--master-port", str(free_port()), "-m", "distrain", *args]


def test_the_progress_bar_shows_through_the_wrapper_on_a_terminal(tmp_path):
    out, status = on_a_terminal(wrapped(
        "train", "--config", "configs/digits.yaml", "train.epochs=1", "logging.plot=false",
        f"run.out_dir={tmp_path / 'run'}"))
    assert status == 0, out[-3000:]
    # tqdm draws on a terminal only: its carriage-return updates of rank 0's bar came through.
    assert "\repoch 1/1:" in out and out.count("\repoch 1/1:") >= 2, out[-2000:]
    assert "epoch   1 | train_loss" in out


def test_a_config_error_on_a_terminal_is_one_line_and_exit_2(tmp_path):
    out, status = on_a_terminal(wrapped(
        "train", "--config", "configs/digits.yaml", "data.batch_size=0",
        f"run.out_dir={tmp_path / 'run'}"))
    assert status == 2, out[-3000:]
    assert "distrain: config error: data.batch_size" in out
    assert "ChildFailedError" not in out and "Root Cause" not in out
