"""Backing services as host programs (Debian's redis-server, memcached, rabbitmq-server; Python's
aiosmtpd and moto for an SMTP sink and an S3 endpoint): one process tree per box.

Each runs in the box's cgroup (leaf `_backing`), with WTBOX_ID and WTBOX_BOX_DIR in its
environment, its data in boxes/<id>/backing/<name>/, its stdout and stderr on FIFOs that the
box's output keeper (telemetry/logs/keep.py) writes to logs/<name>.jsonl. A kind is one
subclass: which program and its command line (readiness is the kind's probe, base.PROBES).

`launch` starts all of a box's programs and their keeper with ONE shell that first moves itself
into the `_backing` leaf (so nothing of a program runs outside the box's cgroup). Measured on
the 2-core host (cgroup v1): each spawn from `wtbox new` with a placement hook cost 25-70 ms,
most of it the cgroup moves (one write per hierarchy); a leaf per program paid one move per
program. One leaf, one move, one shell: the launch is ~25 ms under load.
"""
from __future__ import annotations

import dataclasses
import os
import shlex
import shutil
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from worktreebox.providers.backing.base import Runtime
from worktreebox.system import cgroups, procs

if TYPE_CHECKING:
    from worktreebox.box import Box
    from worktreebox.config.backing import BackingConfig

PID_DIR = "backing"  # run/backing/<name>.pid
KEEPER = "_keeper"  # the keeper's pid file: run/backing/_keeper.pid
LEAF = "_backing"  # the cgroup leaf of every backing program of a box, and of their keeper


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

    def prepare(self, box: Box, cfg: BackingConfig, ports: dict[str, int]) -> Launch:
        """What `launch` runs for this service (nothing is started here)."""
        data = data_dir(box, cfg.name)
        data.mkdir(parents=True, exist_ok=True)
        argv = self.argv(box, cfg, ports, data)
        if self.python_module:
            argv = [sys.executable, "-m", self.python_module, *argv]
        return Launch(cfg.name, argv, self.env(box, cfg, ports, data), data)

    def failed(self, handle: int) -> str | None:
        return None if procs.pid_alive(handle) else "exited"


@dataclasses.dataclass
class Launch:
    name: str
    argv: list[str]
    env: dict[str, str]  # beyond the box markers
    cwd: Path


def pid_file(box: Box, name: str) -> Path:
    return box.run_dir / PID_DIR / f"{name}.pid"


def _base_env(box: Box) -> dict[str, str]:
    """The host's environment without another box's markers (a `new` run from inside a box), with ours."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("WTBOX_")}
    return {**env, "WTBOX_ID": box.id, "WTBOX_BOX_DIR": str(box.dir)}


def launch(box: Box, home: Path | str, launches: list[Launch],
           launcher: procs.Launcher | None = None) -> tuple[dict[str, int], list[int]]:
    """Start every program and the box's output keeper in one shell: ({name: pid}, held fds); with
    a sandboxed box's `launcher`, that shell runs in the box's network (its programs listen there).

    The caller holds each FIFO open (the fds returned) until its programs are ready: a program
    then never waits for the keeper's ~30 ms Python start to open its output, and what it writes
    first (its last words, if it dies at once) stays in the FIFO until the keeper reads it.
    Closing them is the caller's job (`release`)."""
    run = box.run_dir / PID_DIR
    run.mkdir(parents=True, exist_ok=True)
    backend = cgroups.for_home(home)
    lines = ["set -e", *_enter(backend, box, LEAF)]
    keep_args = []
    held: list[int] = []
    for ln in launches:
        out, err = run / f"{ln.name}.out", run / f"{ln.name}.err"
        for fifo in (out, err):
            fifo.unlink(missing_ok=True)
            os.mkfifo(fifo, 0o600)
            held.append(os.open(fifo, os.O_RDWR | os.O_NONBLOCK))  # a reader: the writer's open won't wait
        keep_args.append(f"{ln.name}={out},{err}")
        env = [f"{k}={v}" for k, v in ln.env.items()]
        cmd = shlex.join(["env", *env, *ln.argv]) if env else shlex.join(ln.argv)
        lines.append(f"cd {shlex.quote(str(ln.cwd))} && {cmd} >{shlex.quote(str(out))} 2>{shlex.quote(str(err))} "
                     f"</dev/null & echo $! >{shlex.quote(str(pid_file(box, ln.name)))}")
    keeper = [sys.executable, "-m", "worktreebox.telemetry.logs.keep", str(box.logs_dir), *keep_args]
    keeper_pid = shlex.quote(str(pid_file(box, KEEPER)))
    lines.append(f"{shlex.join(keeper)} </dev/null >/dev/null 2>&1 & echo $! >{keeper_pid}")
    errors = run / "_launch.err"  # not a pipe: the programs in the background would hold it open
    with open(errors, "wb") as launch_err:
        shell = ["/bin/sh", "-c", "\n".join(lines)]
        code = procs.spawn((launcher or procs.Launcher()).command(shell, box.dir), env=_base_env(box), cwd=box.dir,
                           stderr=launch_err).wait()
    if code != 0:
        release(held)
        raise OSError(f"the shell that starts them failed: {errors.read_text(errors='replace').strip()[:300]}")
    return {ln.name: int(pid_file(box, ln.name).read_text()) for ln in launches}, held


def release(fds: list[int]) -> None:
    """Close the FIFO ends `launch` held (from then on a program's exit is its output's end)."""
    while fds:
        os.close(fds.pop())


def _enter(backend: cgroups.Cgroups | None, box: Box, leaf: str) -> list[str]:
    """Shell lines that move the shell into a leaf of the box's cgroup (its next children start there)."""
    files = backend.create_leaf(box.id, leaf) if backend is not None else None
    return [f"echo $$ >{shlex.quote(str(f))}" for f in files or []]
