"""Running one command inside a box: captured (for agents: `box_exec`), or attached to the caller's
terminal (`wtbox exec` of a sandboxed box).

`wtbox exec` of a box without a sandbox replaces itself with the command (the terminal is the
output). A sandboxed box's command starts through its launcher in a session of its own
(`run_attached`): this host lets a process push keystrokes into its controlling terminal
(dev.tty.legacy_tiocsti = 1), so no box process gets the caller's as its own; `wtbox` waits for
it and passes the terminal's signals on. A caller that needs the result as data gets it from
`run_in_box` instead: the exit code and the last lines of stdout and stderr, with the box's
secret values masked, under a timeout, cancellable.
"""
from __future__ import annotations

import collections
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from worktreebox.errors import UsageError, WtboxError
from worktreebox.system import cgroups, procs

if TYPE_CHECKING:
    from worktreebox.box import Box
    from worktreebox.context import HostContext

DEFAULT_TIMEOUT = 600.0
DEFAULT_TAIL = 100
# A line longer than this is kept in pieces, and each stream's tail is bounded in size too, so
# a runaway command cannot fill the caller's memory (or an agent's context).
_MAX_LINE = 64 * 1024
MAX_TAIL_CHARS = 1 << 20


def argv_of(cmd: str | Sequence[str]) -> list[str]:
    """An argv list as given, or `sh -c` for a shell string; refuses an empty command."""
    if isinstance(cmd, str):
        if not cmd.strip():
            raise UsageError("The command is empty; give an argv list or a shell string.")
        return procs.shell_argv(cmd)
    argv = list(cmd)
    if not argv or not all(isinstance(a, str) for a in argv) or not argv[0]:
        raise UsageError("The command must be a non-empty list of strings, or a shell string.")
    return argv


def resolve_cwd(box: Box, cwd: str | None) -> Path:
    """A directory inside the box's worktree (relative to it, or absolute); refuses anything outside."""
    if not box.path.is_dir():
        raise WtboxError(f"The worktree of {box.id} is gone ({box.path}); remove the box with 'wtbox rm {box.id}'.")
    base = box.path.resolve()
    target = (base / cwd).resolve() if cwd else base
    if target != base and base not in target.parents:
        raise UsageError(f"cwd {cwd!r} is outside the worktree of {box.id}; give a path inside it.")
    if not target.is_dir():
        raise UsageError(f"cwd {cwd!r} is not a directory in the worktree of {box.id}.")
    return target


def run_attached(argv: Sequence[str], *, env: dict[str, str], cwd: Path, cgroup: cgroups.Leaf | None) -> int:
    """Run `argv` (a launcher's command) on the caller's stdin, stdout and stderr, in a session of its
    own; the signals a terminal sends reach its process group. Its exit code (128+N when killed by N)."""
    import signal

    proc = procs.spawn(argv, cwd=cwd, env=env, stdin=None, stdout=None, stderr=None, cgroup=cgroup)
    passed = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGWINCH)
    before = {sig: signal.signal(sig, lambda sig, _frame: procs.signal_group(proc.pid, sig)) for sig in passed}
    try:
        rc = proc.wait()
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)
    return 128 - rc if rc < 0 else rc


def run_in_box(host: HostContext, box: Box, cmd: str | Sequence[str], *, cwd: str | None = None,
               timeout: float | None = DEFAULT_TIMEOUT, tail: int = DEFAULT_TAIL,
               secrets: dict[str, str] | None = None, redact: Callable[[str], str] | None = None,
               cancel: threading.Event | None = None) -> dict[str, Any]:
    """Run `cmd` in the box's worktree with the box env plus `secrets` (the running supervisor's,
    as `wtbox exec` passes them) and return {exit_code, stdout, stderr (the last `tail` lines
    each), ...}, both passed through `redact` (which masks the secret values).

    On timeout or `cancel` the command's process group is stopped (SIGTERM, wait, SIGKILL); a
    timeout gives exit code 124.
    """
    argv = argv_of(cmd)
    if tail < 0:
        raise UsageError("tail must be zero or more lines.")
    if timeout is not None and timeout <= 0:
        raise UsageError("timeout must be more than zero seconds.")
    workdir = resolve_cwd(box, cwd)
    host.registry.touch(box.id)  # running something in a box is using it (TTL)
    env = host.exec_env(box, dict(secrets or {}))
    redact = redact or (lambda s: s)
    out: dict[str, Any] = {"id": box.id, "cmd": cmd if isinstance(cmd, str) else list(cmd),
                           "cwd": str(workdir.relative_to(box.path.resolve())), "timed_out": False}
    t0 = time.monotonic()
    try:
        proc = procs.spawn(host.launcher(box).command(argv, workdir), cwd=workdir, env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, cgroup=cgroups.Leaf(host.home, box.id, cgroups.EXEC))
    except (FileNotFoundError, PermissionError, NotADirectoryError) as e:
        code = 127 if isinstance(e, FileNotFoundError) else 126
        why = "command not found" if code == 127 else "permission denied"
        out.update(exit_code=code, seconds=0.0, stdout="", stderr=f"wtbox: {why}: {argv[0]}",
                   stdout_lines=0, stderr_lines=1)
        return out
    readers = {name: _Tail(pipe, tail) for name, pipe in (("stdout", proc.stdout), ("stderr", proc.stderr))}
    deadline = None if timeout is None else t0 + timeout
    while True:
        try:
            proc.wait(timeout=0.05)
            break
        except subprocess.TimeoutExpired:
            pass
        if cancel is not None and cancel.is_set():
            procs.stop_group(proc)
            break
        if deadline is not None and time.monotonic() >= deadline:
            out["timed_out"] = True
            procs.stop_group(proc)
            break
    for r in readers.values():
        r.join()
    rc = proc.returncode
    if out["timed_out"]:
        rc = 124
    elif rc is not None and rc < 0:
        out["signal"] = -rc
        rc = 128 - rc  # the shell's convention for "killed by signal N"
    out["exit_code"] = rc
    out["seconds"] = round(time.monotonic() - t0, 3)
    for name, r in readers.items():
        out[name] = redact("\n".join(r.lines()))
        out[f"{name}_lines"] = r.count
    return out


class _Tail:
    """Reads a pipe to its end in a thread, keeping the last `keep` lines and the line count."""

    def __init__(self, pipe: Any, keep: int) -> None:
        self._pipe = pipe
        self._lines: collections.deque[str] = collections.deque(maxlen=keep)
        self._chars = 0
        self.count = 0
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        try:
            while True:
                chunk = self._pipe.readline(_MAX_LINE)
                if not chunk:
                    break
                self.count += 1
                if not self._lines.maxlen:
                    continue
                if len(self._lines) == self._lines.maxlen:
                    self._chars -= len(self._lines[0])
                line = chunk.decode("utf-8", "replace").rstrip("\r\n")
                self._lines.append(line)
                self._chars += len(line)
                while self._chars > MAX_TAIL_CHARS and len(self._lines) > 1:
                    self._chars -= len(self._lines.popleft())
        except (OSError, ValueError):
            pass
        finally:
            try:
                self._pipe.close()
            except OSError:
                pass

    def join(self) -> None:
        # A daemon the command left behind may hold the pipe open: give it a moment, then move on.
        self._thread.join(timeout=2)

    def lines(self) -> list[str]:
        return list(self._lines)
