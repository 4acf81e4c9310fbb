"""Backing services as host programs (Debian's redis-server, memcached, rabbitmq-server; Python's
aiosmtpd and moto for an SMTP sink and an S3 endpoint): one process tree per box.

Each runs in its own session inside a leaf of the box's cgroup named after it, with WTBOX_ID and
WTBOX_BOX_DIR in its environment (teardown finds it even when its pid file is lost), its data in
boxes/<id>/backing/<name>/, its stdout and stderr on pipes that the box's output keeper
(telemetry/logs/keep.py) writes to logs/<name>.jsonl. A kind is one subclass: which program,
its command line, and (when a TCP accept is not enough) its readiness.
"""
from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from worktreebox.providers.backing.base import Runtime
from worktreebox.system import cgroups, procs

if TYPE_CHECKING:
    from worktreebox.box import Box
    from worktreebox.config.backing import BackingConfig

PID_DIR = "backing"  # run/backing/<name>.pid
KEEPER_PID = "_keeper.pid"
KEEPER_LEAF = "_backing"


def data_dir(box: Box, name: str) -> Path:
    return box.dir / "backing" / name


class NativeProgram(Runtime):
    """A backing kind served by a program on this host."""

    runtime = "native"
    program = ""  # the executable looked up on PATH (or an absolute path)
    package = ""  # what installs it: a Debian package, or a Python distribution (`python_module`)
    python_module: str | None = None  # run as `<python> -m <module>`: served by a kept Python package

    @classmethod
    def executable(cls) -> str | None:
        if cls.python_module:
            import importlib.util

            return sys.executable if importlib.util.find_spec(cls.python_module.split(".")[0]) else None
        return shutil.which(cls.program) or (cls.program if os.path.isabs(cls.program) and
                                             os.access(cls.program, os.X_OK) else None)

    @classmethod
    def unavailable(cls, image: str | None = None) -> str | None:
        if cls.executable():
            return None
        how = f"pip install {cls.package}" if cls.python_module else f"apt-get install {cls.package}"
        return f"`{cls.python_module or cls.program}` is not installed ({how})"

    @classmethod
    def describe(cls) -> str:
        if cls.python_module:
            return f"{cls.python_module} (Python package {cls.package})"
        return cls.executable() or cls.program

    def argv(self, box: Box, cfg: BackingConfig, ports: dict[str, int], data: Path) -> list[str]:
        raise NotImplementedError

    def env(self, box: Box, cfg: BackingConfig, ports: dict[str, int], data: Path) -> dict[str, str]:
        """Variables the program needs beyond the box markers."""
        return {}

    def start(self, box: Box, cfg: BackingConfig, ports: dict[str, int]) -> Launched:
        data = data_dir(box, cfg.name)
        data.mkdir(parents=True, exist_ok=True)
        argv = self.argv(box, cfg, ports, data)
        if self.python_module:
            argv = [sys.executable, "-m", self.python_module, *argv]
        env = {**_base_env(), **self.env(box, cfg, ports, data), "WTBOX_ID": box.id, "WTBOX_BOX_DIR": str(box.dir)}
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        try:
            pid = spawn_orphan(argv, env=env, cwd=data, stdout=out_w, stderr=err_w,
                               cgroup=cgroups.Leaf(self.host.home, box.id, cfg.name),
                               pid_file=pid_file(box, cfg.name))
        except BaseException:
            for fd in (out_r, err_r):
                os.close(fd)
            raise
        finally:
            for fd in (out_w, err_w):
                os.close(fd)
        return Launched(pid, out_r, err_r)

    def failed(self, handle: Launched) -> str | None:
        return None if procs.pid_alive(handle.pid) else "exited"


@dataclasses.dataclass
class Launched:
    """A started program: its pid and the read ends of its stdout and stderr."""

    pid: int
    out: int
    err: int


def pid_file(box: Box, name: str) -> Path:
    return box.run_dir / PID_DIR / f"{name}.pid"


def spawn_orphan(argv: list[str], *, env: dict[str, str], cwd: Path, stdout: int, stderr: int,
                 cgroup: cgroups.Leaf, pid_file: Path, pass_fds: tuple[int, ...] = ()) -> int:
    """Start argv in its own session as init's child (a shell starts it and exits: a long-lived
    caller such as `wtbox mcp` never holds it as a zombie), its output on the given fds; the pid
    goes to `pid_file` (written by the shell before we read it) and is returned."""
    pid_file.parent.mkdir(parents=True, exist_ok=True)
    sh = procs.spawn(["/bin/sh", "-c", '"$@" </dev/null & echo $! >"$0"', str(pid_file), *argv], env=env, cwd=cwd,
                     stdout=stdout, stderr=stderr, pass_fds=pass_fds, cgroup=cgroup)
    if sh.wait() != 0:
        raise OSError(f"could not start {argv[0]} (exit code {sh.returncode})")
    return int(pid_file.read_text().strip())


def _base_env() -> dict[str, str]:
    """The host's environment without another box's markers (a `new` run from inside a box)."""
    return {k: v for k, v in os.environ.items() if not k.startswith("WTBOX_")}


def start_keeper(box: Box, home: Path | str, started: dict[str, Launched]) -> int | None:
    """Hand the started programs' output pipes to one keeper process for the box (see keep.py)."""
    if not started:
        return None
    args = [f"{name}={h.out},{h.err}" for name, h in started.items()]
    fds = tuple(fd for h in started.values() for fd in (h.out, h.err))
    env = {**_base_env(), "WTBOX_ID": box.id, "WTBOX_BOX_DIR": str(box.dir)}
    try:
        return spawn_orphan([sys.executable, "-m", "worktreebox.telemetry.logs.keep", str(box.logs_dir), *args],
                            env=env, cwd=box.dir, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            pass_fds=fds, cgroup=cgroups.Leaf(home, box.id, KEEPER_LEAF),
                            pid_file=box.run_dir / PID_DIR / KEEPER_PID)
    finally:
        for fd in fds:  # the keeper holds them now; ours would keep the pipes open after it ends
            os.close(fd)
