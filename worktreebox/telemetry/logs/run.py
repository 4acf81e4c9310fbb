"""Running a command once with its output captured as log records (setup, migrate, fan-out runs).

The command runs in its own session (procs.spawn), through the box's launcher (its sandbox), both
streams pumped into a LogWriter; the last lines, redacted, are kept for the error message when it
fails.
"""
from __future__ import annotations

import collections
import os
import subprocess
import threading
from collections.abc import Callable
from pathlib import Path

from worktreebox.system import cancel, procs
from worktreebox.system.cgroups import Leaf
from worktreebox.telemetry.logs.writer import LogWriter, pump


class OutputTail:
    """The last lines of a command's output, redacted, shared by its stdout and stderr pumps."""

    def __init__(self, redact: Callable[[str], str], keep: int) -> None:
        self._redact = redact
        self._lines: collections.deque[str] = collections.deque(maxlen=keep)
        self._lock = threading.Lock()

    def __call__(self, text: str) -> None:
        with self._lock:
            self._lines.append(self._redact(text))

    def lines(self) -> list[str]:
        with self._lock:
            return list(self._lines)


def start_logged(cmd: str, cwd: Path | str, env: dict[str, str], writer: LogWriter,
                 tail: OutputTail, cgroup: Leaf | None = None,
                 launcher: procs.Launcher | None = None) -> tuple[subprocess.Popen, list[threading.Thread]]:
    """Start `sh -c cmd` in its own session (and `cgroup`, through `launcher`) with both streams
    pumped into `writer` as records."""
    argv = (launcher or procs.Launcher()).command(procs.shell_argv(cmd), cwd)
    proc = procs.spawn(argv, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cgroup=cgroup)
    threads = []
    for pipe, stream in ((proc.stdout, "stdout"), (proc.stderr, "stderr")):
        assert pipe is not None  # both PIPE
        fd = os.dup(pipe.fileno())
        pipe.close()
        t = threading.Thread(target=pump, args=(fd, stream, writer, tail), daemon=True)
        t.start()
        threads.append(t)
    return proc, threads


def join_pumps(threads: list[threading.Thread]) -> None:
    # Children that keep the pipe open must not hang us: give the pumps a moment, then move on.
    for t in threads:
        t.join(timeout=2)


def run_logged(cmd: str, cwd: Path | str, env: dict[str, str], logs_dir: Path | str, service: str,
               redactor: Callable[[str], str] | None = None, timeout: float | None = None,
               keep_lines: int = 10, cgroup: Leaf | None = None,
               launcher: procs.Launcher | None = None) -> tuple[int, list[str]]:
    """Run a shell command once with its output captured as records; (returncode, last lines redacted)."""
    redact = redactor or (lambda s: s)
    writer = LogWriter(logs_dir, service, redact)
    tail = OutputTail(redact, keep_lines)
    proc, threads = start_logged(cmd, cwd, env, writer, tail, cgroup, launcher)
    try:
        rc = cancel.wait(proc, timeout)  # a cancelled box_new stops it as Ctrl-C would
    except subprocess.TimeoutExpired:
        procs.stop_group(proc)
        rc = 124
        msg = f"wtbox: timed out after {timeout:g}s"
        writer.line("stderr", msg)
        tail(msg)
    finally:
        join_pumps(threads)
        writer.close()
    return rc, tail.lines()


