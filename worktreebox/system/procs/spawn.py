"""Starting processes: every long-lived or logged child wtbox starts goes through `spawn`.

Own session, so a group signal reaches its children; `before_exec` hooks run in the child
before exec; `cgroup=` puts the child into a leaf of its box's cgroup before it runs anything.
"""
from __future__ import annotations

import dataclasses
import os
import subprocess
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from worktreebox.system import cgroups

# Run in every spawned child just before exec (`spawn(cgroup=...)` puts the cgroup placement first).
BeforeExec = Callable[[], None]


def spawn(argv: Sequence[str], *, cwd: str | Path | None = None, env: dict[str, str] | None = None,
          stdin: Any = subprocess.DEVNULL, stdout: Any = subprocess.DEVNULL, stderr: Any = subprocess.DEVNULL,
          new_session: bool = True, nice: int = 0, before_exec: Sequence[BeforeExec] = (),
          pass_fds: Sequence[int] = (), cgroup: cgroups.Leaf | None = None) -> subprocess.Popen:
    """Start `argv` in its own session (its pid is its process group id); with `cgroup`, inside
    that leaf of its box's cgroup from its first instruction (nothing of it ever runs outside)."""
    hooks = list(before_exec)
    if nice:
        def renice() -> None:
            os.nice(nice)

        hooks.insert(0, renice)
    if cgroup is not None:
        enter = cgroups.placement(cgroup)
        if enter is not None:
            hooks.insert(0, enter)

    def child() -> None:
        for hook in hooks:
            hook()

    try:
        return subprocess.Popen(list(argv), cwd=str(cwd) if cwd else None, env=env, stdin=stdin, stdout=stdout,
                                stderr=stderr, start_new_session=new_session, pass_fds=tuple(pass_fds),
                                preexec_fn=child if hooks else None)
    except subprocess.SubprocessError as e:  # a hook failed in the child (e.g. its cgroup was just removed)
        raise OSError(f"could not prepare the process ({e})") from None


CWD = "{cwd}"  # where a Launcher's prefix names the directory of the process it starts


@dataclasses.dataclass(frozen=True)
class Launcher:
    """How a box's processes are started: with the sandbox's prefix (nsenter into the box's
    namespaces, setpriv to the box's user, `env --chdir={cwd}`), or with nothing (no sandbox).
    Made by the sandbox provider; used by whoever starts a box process, as `spawn(launcher.command(
    argv, cwd), cgroup=...)`: the cgroup placement happens before exec, as for every process."""

    prefix: tuple[str, ...] = ()

    @property
    def sandboxed(self) -> bool:
        return bool(self.prefix)

    def command(self, argv: Sequence[str], cwd: str | Path) -> list[str]:
        return [*(a.replace(CWD, str(cwd)) if CWD in a else a for a in self.prefix), *argv]

    def with_env(self, env: dict[str, str]) -> Launcher:
        """The same launcher, setting `env` for the command (the prefix ends in `env ... --`; the
        environment a spawn gives reaches only the launcher itself, which `env` passes on)."""
        if not env or not self.prefix:
            return self
        return Launcher((*self.prefix[:-1], *(f"{k}={v}" for k, v in env.items()), self.prefix[-1]))

    def to_json(self) -> list[str]:
        return list(self.prefix)

    @classmethod
    def from_json(cls, data: Sequence[str] | None) -> Launcher:
        return cls(tuple(data or ()))


def shell_argv(cmd: str) -> list[str]:
    """How a wtbox.toml command string is run."""
    return ["/bin/sh", "-c", cmd]


def spawn_detached(cmd: list[str], *, env: dict[str, str], log_path: Path, cwd: str | Path | None = None,
                   cgroup: cgroups.Leaf | None = None) -> int:
    """Start cmd in its own session (and `cgroup`) as a grandchild (output appended to log_path);
    returns its pid.

    A shell starts it in the background and exits, so the process is reparented to init and is
    never a zombie child of a long-lived caller (a test, `wtbox mcp`), which would make it look
    alive to everyone who waits for it to end."""
    sh = spawn(["/bin/sh", "-c", '"$@" >>"$0" 2>&1 </dev/null & echo $!', str(log_path), *cmd], env=env, cwd=cwd,
               stdout=subprocess.PIPE, cgroup=cgroup)
    out, _ = sh.communicate()
    if sh.returncode != 0:
        raise subprocess.CalledProcessError(sh.returncode, cmd[0])
    return int(out.decode().strip())


def last_line(log_path: Path, *, noise: Callable[[str], bool] = lambda line: False,
              tidy: Callable[[str], str] = lambda line: line) -> str:
    """The last line a detached process wrote to its log (for a one-sentence error when it did not
    start): lines that are `noise` are passed over unless nothing else was said; `tidy` keeps the
    part that helps; at most 300 characters. "no log" / "no output" when there is nothing."""
    try:
        lines = [ln.strip() for ln in log_path.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return "no log"
    useful = [ln for ln in lines if not noise(ln)] or lines
    return tidy(useful[-1]).strip()[:300] if useful else "no output"


def enter_cgroup(leaf: cgroups.Leaf) -> bool:
    """Move this process into a leaf of its box's cgroup (`exec`/`shell` do it just before exec)."""
    return cgroups.place(leaf, os.getpid())
