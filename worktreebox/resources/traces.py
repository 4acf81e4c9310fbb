"""The traces resource: a per-box OTLP/HTTP endpoint on the leased `otlp` port.

create() leases nothing more and exports the standard OpenTelemetry SDK variables, so an app
instrumented with the SDK reports to its own box with zero configuration; start() (after the
box env file exists, before setup and migrations) starts the box's supervisor, which serves the
endpoint in threads of its own (services/otlp_receiver.py; one wtbox process per box) from then
on, services or not. A sandboxed box's supervisor runs already (the sandbox resource started it
in the box's network, before the box env existed): it serves the endpoint on the port the box
sees, the host reaches it on the leased one through its forward, and start() has it read the
box env now. The services resource stops that process with the box; destroy() deletes traces/.
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from worktreebox.errors import WtboxError
from worktreebox.resources.base import Creation, Resource
from worktreebox.services import client
from worktreebox.services.boxenv import OTEL_ENDPOINT, OTEL_PROTOCOL, OTEL_RESOURCE_ATTRIBUTES

if TYPE_CHECKING:
    from worktreebox.box import Box
    from worktreebox.context import HostContext

PORT_NAME = "otlp"
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
        box = c.box
        # The host reaches it on the leased port; the box's processes on the port they see (in a
        # sandboxed box its canonical one, inside the box's network, where the supervisor serves it).
        port, inside = box.ports[PORT_NAME], box.inside_ports[PORT_NAME]
        url, inside_url = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{inside}"
        box.data[self.name] = {"url": url, "port": port}
        c.env.update(otel_env(box.id, inside_url))
        c.env["WTBOX_OTLP_URL"] = inside_url
        c.facts["traces"] = {"url": inside_url, "port": inside}

    def start(self, c: Creation) -> None:
        from worktreebox.providers.sandbox import sandboxed

        data = c.box.data.get(self.name)
        if not data:
            return
        if sandboxed(c.box):
            client.wait_started(c.box)  # started by the sandbox resource, maybe still starting
        if client.supervisor_pid(c.box) is None:
            c.note(f"starting the OTLP endpoint on port {data['port']}")
            start_endpoint(c.box, c.secrets)
        elif sandboxed(c.box):
            # The sandbox resource started it before the box env existed: it reads it now (where
            # its endpoint pushes span counts), and is given its services later, if any.
            client.give_services(c.box, c.secrets, [])

    def destroy(self, host: HostContext, box: Box) -> None:
        client.stop_supervisor(box)  # (the services resource, destroyed first, has stopped it already)
        shutil.rmtree(traces_dir(box), ignore_errors=True)

    def discover(self, host: HostContext) -> set[str]:
        boxes = Path(host.boxes_dir)
        ids = {p.parent.name for p in boxes.glob("*/traces") if p.is_dir()}
        return ids  # its live process is found by the services resource (WTBOX_ID)

    def status(self, host: HostContext, box: Box) -> dict[str, Any] | None:
        data = box.data.get(self.name)
        if not data:
            return None
        from worktreebox.telemetry.traces import store

        # Served by the box's supervisor: up while it runs (no request: status stays fast with many boxes).
        return {"traces": {"url": data["url"], "up": client.supervisor_pid(box) is not None,
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


def start_endpoint(box: Box, secrets: dict[str, str], timeout: float = START_TIMEOUT) -> int:
    """Start the box's supervisor (without services yet) and wait until its endpoint answers /health."""
    from worktreebox.system import readiness

    pid = client.start_supervisor(box, secrets, [])
    assert pid is not None  # (it waited for the start)
    url = box.data["traces"]["url"]
    why = readiness.wait(readiness.HttpUrl(f"{url}/health", status=200), timeout, alive=readiness.process_alive(pid))
    if why is not None:
        raise WtboxError(f"The OTLP endpoint of box {box.id} did not answer {url}/health within {timeout:.0f} s; "
                         f"see 'wtbox logs {box.id} --service _otlp'.")
    return pid


def receiver_pid(box: Box) -> int | None:
    """The live process serving the box's endpoint: its supervisor."""
    return client.supervisor_pid(box) if box.data.get("traces") else None
