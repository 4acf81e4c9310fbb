"""A box's VictoriaMetrics as a detached host process (the `native` metrics store).

Started from the `victoria-metrics` binary with the box's data dir; it carries WTBOX_ID and
WTBOX_BOX_DIR in its environment, so teardown finds it even when the pid file is lost.
"""
from __future__ import annotations

import os
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from worktreebox.errors import WtboxError
from worktreebox.providers.metrics.base import MEMORY_ENV, MetricsStore, flags
from worktreebox.system import cgroups, procs, readiness
from worktreebox.telemetry import store_sleep

if TYPE_CHECKING:
    from worktreebox.box import Box

BINARY = "victoria-metrics"
PACKAGE = "victoria-metrics"  # the Debian package that ships the binary
PID_FILE = "victoria-metrics.pid"
LOG_FILE = "victoria-metrics.log"


class NativeStore(MetricsStore):
    name = "native"
    processes = (BINARY,)
    pid_files = (PID_FILE,)

    def start(self, box: Box, port: int, *, scrape_config: Path | None, retention: str,
              inside: int | None = None, launcher: procs.Launcher | None = None) -> str:
        start(box.id, port=port, data_dir=box.metrics_dir, run_dir=box.run_dir, retention=retention,
              scrape_config=scrape_config, cgroup=cgroups.Leaf(self.host.home, box.id, cgroups.METRICS),
              listen=inside, launcher=launcher)
        return f"http://127.0.0.1:{port}"

    @classmethod
    def check(cls) -> dict[str, Any]:
        path = shutil.which(BINARY)
        return {"check": BINARY, "ok": bool(path), "detail": path or f"missing: apt-get install {PACKAGE}"}


def find_binary() -> str:
    """Path of the victoria-metrics binary, or a WtboxError naming the package."""
    path = shutil.which(BINARY)
    if not path:
        raise WtboxError(
            f"The `{BINARY}` binary is not on PATH; install the Debian package `{PACKAGE}` "
            "(apt-get install victoria-metrics) or set `[observability] enabled = false` in wtbox.toml."
        )
    return path


def start(box_id: str, *, port: int, data_dir: Path, run_dir: Path, retention: str = "2d",
          scrape_config: Path | None = None, timeout: float = 15.0, cgroup: cgroups.Leaf | None = None,
          listen: int | None = None, launcher: procs.Launcher | None = None) -> int:
    """Start a detached VictoriaMetrics for a box (in `cgroup`) and wait until /health answers on
    `port`; returns its pid. It listens on `listen` (default `port`), started through `launcher`
    (a sandboxed box's: in its network namespace)."""
    binary = find_binary()
    data_dir.mkdir(parents=True, exist_ok=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    argv = [binary, *flags(listen or port, data_dir, retention, scrape_config)]
    cmd = (launcher or procs.Launcher()).command(argv, data_dir)
    # WTBOX_ID lets teardown find the process even when the pid file is lost; WTBOX_BOX_DIR tells
    # this home's boxes from another home's (every process of a box carries both).
    ours = {**MEMORY_ENV, "WTBOX_ID": box_id, "WTBOX_BOX_DIR": str(data_dir.parent)}
    env = {**os.environ, **ours}
    log_path = run_dir / LOG_FILE
    # how the box's supervisor starts it again after a sleep (telemetry/store_sleep.py)
    store_sleep.record(run_dir, argv, env=ours, port=listen or port, pid_file=PID_FILE,
                       log_file=LOG_FILE, names=(BINARY,))
    pid = procs.spawn_detached(cmd, env=env, log_path=log_path, cgroup=cgroup)
    (run_dir / PID_FILE).write_text(f"{pid}\n")
    url = f"http://127.0.0.1:{port}"
    why = readiness.wait(readiness.HttpUrl(f"{url}/health", status=200), timeout, alive=readiness.process_alive(pid))
    if why == readiness.EXITED:
        raise WtboxError(f"VictoriaMetrics for box {box_id} exited at start ({_last_line(log_path)}).")
    if why == readiness.TIMEOUT:
        raise WtboxError(f"VictoriaMetrics for box {box_id} did not answer {url}/health within {timeout:.0f} s.")
    return pid


def find_processes(box_id: str, names: Iterable[str] = (BINARY,), box_dir: Path | None = None) -> list:
    """Live processes named `names` (by default the store's) of this box (see procs.find_named)."""
    return procs.find_named(box_id, names, box_dir)


def stop(box_id: str, *, run_dir: Path, names: Iterable[str] = (BINARY,),
         pid_files: Iterable[str] = (PID_FILE,)) -> None:
    """Stop the box's store process: the one in its pid file, then any found by WTBOX_ID."""
    procs.stop_named(box_id, run_dir=run_dir, names=names, pid_files=pid_files)


def _last_line(path: Path) -> str:
    # VictoriaMetrics logs "<ts>\t<level>\t<file:line>\t<message>"; the message is what helps.
    return procs.last_line(path, tidy=lambda line: line.rsplit("\t", 1)[-1])
