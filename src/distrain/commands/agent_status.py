"""Run torchrun and exit with its workers' own status, without torchrun's page of traceback.

    python -m distrain.commands.agent_status torchrun --standalone --nproc-per-node 2 -m distrain train ...

torchrun exits 1 whenever a worker fails, and prints a Python traceback of its own plus a
failure summary, even when the worker said all there was to say in one line (a config error,
exit 2; a preemption, exit 75). This wrapper passes every line through except that traceback
and summary, and exits with the first failed worker's status (the summary's root cause; a
worker killed by signal N gives 128 + N), so `./launcher/run` and the node launchers report
2 for a config mistake and 75 for "stopped, launch again to resume", as one process does
(also when torchrun itself got the SIGTERM and its workers checkpointed: torchrun says 1
and a traceback of its own; a run whose workers did not say they checkpointed: 128 + N).
On a terminal the workers' stderr is a pseudo-terminal, so rank 0's progress bar shows
(tqdm draws one only on a terminal); its updates pass through as they come.
"""

from __future__ import annotations

import codecs
import os
import re
import signal
import subprocess
import sys
from typing import Iterator

EXITCODE = re.compile(r"^\s*exitcode\s*:\s*(-?\d+)")
SIGNALLED = re.compile(r"SignalException: Process \d+ got signal: (\d+)")
PREEMPTED = "distrain: preempted: "  # what a worker of `distrain train` says before exit 75


class _Filter:
    """Drops torchrun's ChildFailedError traceback and failure summary; remembers the root
    cause's exit status."""

    def __init__(self) -> None:
        self.held: list[str] = []  # a traceback being read: torchrun's (dropped) or a worker's
        self.rules_left = 0  # "=====" lines left in torchrun's failure summary
        self.root_cause: int | None = None
        self.in_root_cause = False
        self.signal: int | None = None  # torchrun itself got this signal (SIGTERM: a scheduler)
        self.preempted = False  # and a worker said it checkpointed and stopped for it

    def feed(self, line: str) -> list[str]:
        if self.rules_left:
            if line.startswith("====="):
                self.rules_left -= 1
            elif line.startswith("Root Cause"):
                self.in_root_cause = True
            elif self.in_root_cause and self.root_cause is None and (m := EXITCODE.match(line)):
                self.root_cause = int(m.group(1))
            return []
        if line.startswith("Traceback (most recent call last):"):
            flushed, self.held = self.held, [line]
            return flushed
        if self.held:
            self.held.append(line)
            if line[:1].isspace() or not line.strip():
                return []
            held, self.held = self.held, []
            if "ChildFailedError" in line:
                self.rules_left = 2  # the summary follows, between two "=====" lines
                return []
            if m := SIGNALLED.search(line):  # torchrun's own traceback for the signal
                self.signal = int(m.group(1))
                return []
            return held
        self.preempted = self.preempted or line.startswith(PREEMPTED)
        return [line]

    def status(self, returncode: int) -> int:
        if returncode != 0 and self.root_cause is None and self.signal is not None:
            # torchrun was signalled and stopped its workers: 75 when they checkpointed for
            # it (launch again to resume), else what a process the signal ended reports.
            return 75 if self.preempted else 128 + self.signal
        if returncode == 0 or self.root_cause is None:
            return returncode
        return 128 - self.root_cause if self.root_cause < 0 else self.root_cause


SEGMENT = re.compile(r"[^\r\n]*[\r\n]")


def _terminal_segments(fd: int) -> Iterator[str]:
    """What the workers write to the pseudo-terminal `fd`, cut after each newline or
    carriage return (a progress bar's update), until they close it."""
    decoder, pending = codecs.getincrementaldecoder("utf-8")(errors="replace"), ""
    while True:
        try:
            data = os.read(fd, 4096)
        except OSError:  # EIO: every writer has closed it
            data = b""
        if not data:
            break
        pending += decoder.decode(data)
        end = 0
        for match in SEGMENT.finditer(pending):
            yield match.group(0)
            end = match.end()
        pending = pending[end:]
    if pending:
        yield pending
    os.close(fd)


def _start(cmd: list[str]) -> tuple[subprocess.Popen, Iterator[str]]:
    """torchrun with its stderr read by us: through a pseudo-terminal when ours is a
    terminal (newlines untranslated), else a pipe."""
    if not sys.stderr.isatty():
        agent = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, bufsize=1)
        return agent, agent.stderr
    import fcntl
    import pty
    import termios

    master, slave = pty.openpty()
    size = fcntl.ioctl(sys.stderr.fileno(), termios.TIOCGWINSZ, b"\0" * 8)
    fcntl.ioctl(slave, termios.TIOCSWINSZ, size)  # the bar fits our terminal's width
    attrs = termios.tcgetattr(slave)
    attrs[1] &= ~termios.ONLCR  # "\n" stays "\n": the filter reads lines as they were written
    termios.tcsetattr(slave, termios.TCSANOW, attrs)
    agent = subprocess.Popen(cmd, stderr=slave)
    os.close(slave)
    return agent, _terminal_segments(master)


def main(argv: list[str] | None = None) -> int:
    cmd = argv if argv is not None else sys.argv[1:]
    if not cmd:
        print("usage: python -m distrain.commands.agent_status torchrun [args ...]", file=sys.stderr)
        return 2
    # torchrun handles SIGUSR1 (Slurm's `--signal=USR1@60`) as it does SIGTERM: it stops the
    # workers with SIGTERM, which they checkpoint for (its default list lacks it: killed).
    os.environ.setdefault("TORCHELASTIC_SIGNALS_TO_HANDLE", "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1")
    agent, stream = _start(cmd)
    # A terminal's Ctrl-C reaches torchrun too (same process group). Under srun, Slurm signals
    # every process of the step itself (torchrun included): passing it on would make two.
    # Elsewhere a SIGTERM/SIGUSR1 sent to this wrapper alone (a scheduler) is passed on.
    # Either way, wait for torchrun to finish.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    for signum in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(signum, signal.SIG_IGN if "SLURM_STEP_ID" in os.environ else
                      lambda got, frame: agent.send_signal(got))
    filt = _Filter()
    for line in stream:
        for out in filt.feed(line):
            sys.stderr.write(out)
        sys.stderr.flush()
    for out in filt.held:
        sys.stderr.write(out)
    return filt.status(agent.wait())


if __name__ == "__main__":
    sys.exit(main())
