"""The traces resource: a per-box OTLP/HTTP receiver on the leased `otlp` port.

create() starts `python -m worktreebox.services.otlp_receiver` (detached, WTBOX_ID in its env, like
VictoriaMetrics) and exports the standard OpenTelemetry SDK variables, so an app instrumented
with the SDK reports to its own box with zero configuration. It runs in parallel with the
metrics resource: the receiver only needs the metrics port (leased already) and retries its
pushes until VictoriaMetrics answers. destroy() stops it and deletes traces/.
"""
from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from worktreebox.config.assets import PACKAGE_PARENT
from worktreebox.errors import WtboxError
from worktreebox.resources.base import Creation, Resource
from worktreebox.services.boxenv import OTEL_ENDPOINT, OTEL_PROTOCOL, OTEL_RESOURCE_ATTRIBUTES, OTEL_VARS
from worktreebox.system import cgroups, procs

if TYPE_CHECKING:
    from worktreebox.box import Box
    from worktreebox.context import HostContext

PORT_NAME = "otlp"
MODULE = "worktreebox.services.otlp_receiver"
PID_FILE = "otlp-receiver.pid"
LOG_FILE = "otlp-receiver.log"
START_TIMEOUT = 15.0


def otel_env(box_id: str, url: str) -> dict[str, str]:
    """The box env's OpenTelemetry SDK settings (OTEL_SERVICE_NAME is per process: boxenv.otel_service_name)."""
    return {OTEL_ENDPOINT: url, OTEL_PROTOCOL: "http/protobuf", OTEL_RESOURCE_ATTRIBUTES: f"wtbox.box={box_id}"}


class Traces(Resource):
    name = "traces"
    parallel = True  # needs only its port and the metrics port, both leased before

    def create(self, c: Creation) -> None:
        if not c.config.observability.enabled:
            return
        from worktreebox.resources.metrics import in_box_network

        box = c.box
        port, inside = box.ports[PORT_NAME], box.inside_ports[PORT_NAME]
        url, inside_url = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{inside}"
        # it pushes span counts to the metrics store as a process of the box's network sees it
        metrics_url = f"http://127.0.0.1:{box.inside_ports['metrics']}" if "metrics" in box.ports else ""
        # Recorded before the start, so a failed `new` still finds and destroys what was started.
        box.data[self.name] = {"url": url, "port": port}
        c.note(f"starting the OTLP receiver on port {port}")
        start_receiver(box, port, metrics_url, cgroup=cgroups.Leaf(c.host.home, box.id, cgroups.TRACES),
                       inside=inside, launcher=in_box_network(c))
        c.env.update(otel_env(box.id, inside_url))
        c.env["WTBOX_OTLP_URL"] = inside_url
        c.facts["traces"] = {"url": inside_url, "port": inside}

    def destroy(self, host: HostContext, box: Box) -> None:
        stop_receiver(box, sweep=bool(box.data.get(self.name)) or traces_dir(box).exists())
        shutil.rmtree(traces_dir(box), ignore_errors=True)
        for name in (PID_FILE, LOG_FILE):
            (box.run_dir / name).unlink(missing_ok=True)

    def discover(self, host: HostContext) -> set[str]:
        boxes = Path(host.boxes_dir)
        ids = {p.parent.name for p in boxes.glob("*/traces") if p.is_dir()}
        ids |= {p.parent.parent.name for p in boxes.glob(f"*/run/{PID_FILE}")}
        return ids  # live receivers without either are found by the services resource (WTBOX_ID)

    def status(self, host: HostContext, box: Box) -> dict[str, Any] | None:
        data = box.data.get(self.name)
        if not data:
            return None
        from worktreebox.telemetry.traces import store
        from worktreebox.telemetry.vmclient import healthy

        return {"traces": {"url": data["url"], "up": healthy(data["url"], timeout=0.5),
                           "store_bytes": store.size(traces_dir(box))}}


    def checks(self, host: HostContext) -> list[dict[str, Any]]:
        """The receiver decodes with opentelemetry-proto (a dependency; a broken install shows here)."""
        from importlib import metadata

        try:
            detail = (f"opentelemetry-proto {metadata.version('opentelemetry-proto')}, "
                      f"protobuf {metadata.version('protobuf')}")
            ok = True
        except metadata.PackageNotFoundError as e:
            detail, ok = f"missing: {e.name}; reinstall wtbox (pip install worktreebox)", False
        return [{"check": "OTLP receiver", "ok": ok, "detail": detail}]


def traces_dir(box: Box) -> Path:
    return box.dir / "traces"


def start_receiver(box: Box, port: int, metrics_url: str, timeout: float = START_TIMEOUT,
                   cgroup: cgroups.Leaf | None = None, inside: int | None = None,
                   launcher: procs.Launcher | None = None) -> int:
    """Start the box's receiver detached (in `cgroup`) and wait until it answers /health on `port`;
    returns its pid. It listens on `inside` (default `port`), started through `launcher` (a
    sandboxed box's: in its network namespace)."""
    from worktreebox.system import readiness
    from worktreebox.system.fsutil import atomic_write

    box.run_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k not in OTEL_VARS and k != "PYTHONSTARTUP"}
    env.update({"WTBOX_ID": box.id, "WTBOX_BOX_DIR": str(box.dir)})
    log_path = box.run_dir / LOG_FILE
    # -m finds the package from the cwd, so this works from a checkout as well as when installed.
    pkg_parent = str(PACKAGE_PARENT)
    argv = (launcher or procs.Launcher()).command([sys.executable, "-m", MODULE, str(box.dir), str(inside or port),
                                                   metrics_url], pkg_parent)
    pid = procs.spawn_detached(argv, env=env, log_path=log_path, cwd=pkg_parent, cgroup=cgroup)
    atomic_write(box.run_dir / PID_FILE, f"{pid}\n")
    url = f"http://127.0.0.1:{port}"
    why = readiness.wait(readiness.HttpUrl(f"{url}/health", status=200), timeout, alive=readiness.process_alive(pid))
    if why == readiness.EXITED:
        raise WtboxError(f"The OTLP receiver of box {box.id} exited at start ({procs.last_line(log_path)}).")
    if why == readiness.TIMEOUT:
        raise WtboxError(f"The OTLP receiver of box {box.id} did not answer {url}/health within {timeout:.0f} s.")
    return pid


def receiver_pid(box: Box) -> int | None:
    """The live receiver named by the pid file, checked against its command line (pids are reused)."""
    from worktreebox.system import procs

    try:
        pid = int((box.run_dir / PID_FILE).read_text().strip())
    except (OSError, ValueError):
        return None
    return pid if procs.pid_alive(pid) and _is_receiver(pid, box) else None


def _is_receiver(pid: int, box: Box) -> bool:
    from worktreebox.system import procs

    args = procs.cmdline(pid)
    return MODULE in args and str(box.dir) in args


def stop_receiver(box: Box, sweep: bool = True) -> None:
    """SIGTERM (the receiver pushes its last span counts), wait, SIGKILL. Idempotent.

    `sweep` also looks for a receiver the pid file does not name (a `new` killed between the
    start and writing the file)."""
    from worktreebox.system import procs

    found = []
    pid_file = box.run_dir / PID_FILE
    pid = receiver_pid(box)
    if pid is not None:
        import psutil  # only when there is something to stop: the import costs ~35 ms

        try:
            found.append(psutil.Process(pid))
        except psutil.Error:
            pass
    elif sweep and not pid_file.exists():
        # (A pid file naming a dead process means it ended: rm's services sweep usually got it first.)
        found = [p for p in procs.find_box_processes(box.id, box.dir) if _is_receiver(p.pid, box)]
    if found:
        procs.stop_processes(found)
    pid_file.unlink(missing_ok=True)
