"""The live boxes as MCP resources: wtbox://box/<id>/status, .../env, .../logs/<service>."""
from __future__ import annotations

import functools
import json
from collections.abc import Callable
from typing import Any

import anyio.to_thread
from mcp.server.mcpserver.exceptions import ResourceError, ResourceNotFoundError
from mcp_types import Resource

from worktreebox.mcp.calls import Opened
from worktreebox.operations import boxes, observe

RESOURCE_LOG_LINES = 200  # records in a wtbox://box/<id>/logs/<service> resource

def live_resources() -> list[Resource]:
    """status, env and each service's logs of every live box, for resources/list."""
    from worktreebox.telemetry.logs import reader as L

    out = []
    with Opened() as host:
        for b in host.list():
            base = f"wtbox://box/{b.id}"
            out.append(Resource(uri=f"{base}/status", name=f"{b.id} status", mime_type="application/json",
                                description=f"Status of box {b.id} (task {b.task!r}, {b.state})."))
            out.append(Resource(uri=f"{base}/env", name=f"{b.id} env", mime_type="application/json",
                                description=f"Environment of box {b.id}, secrets masked."))
            try:
                services = L.available_services(b.logs_dir)
            except OSError:
                services = []
            for s in services:
                if not s.startswith("_"):
                    out.append(Resource(uri=f"{base}/logs/{s}", name=f"{b.id} logs {s}",
                                        mime_type="application/jsonl",
                                        description=f"The last {RESOURCE_LOG_LINES} log records of {s} in {b.id}."))
    return out


def _resource(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Run a resource reader in a thread; an unknown box is 'not found', other wtbox errors its sentence."""

    @functools.wraps(fn)
    async def read(**kwargs: Any) -> str:
        from worktreebox.errors import NotFound, WtboxError

        try:
            return await anyio.to_thread.run_sync(lambda: fn(**kwargs))
        except NotFound as e:
            raise ResourceNotFoundError(str(e)) from None
        except WtboxError as e:
            raise ResourceError(str(e)) from None

    return read


@_resource
def box_status_resource(box: str) -> str:
    with Opened() as host:
        return json.dumps(boxes.status(host, box), indent=2, default=str)


@_resource
def box_env_resource(box: str) -> str:
    with Opened() as host:
        return json.dumps(boxes.env(host, box), indent=2, sort_keys=True)


@_resource
def box_logs_resource(box: str, service: str) -> str:
    with Opened() as host:
        records = observe.logs(host, box, service, tail=RESOURCE_LOG_LINES)
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)


TEMPLATES = (
    ("wtbox://box/{box}/status", box_status_resource, "application/json", "Status of a box (as box_status)."),
    ("wtbox://box/{box}/env", box_env_resource, "application/json", "Environment of a box, secrets masked."),
    ("wtbox://box/{box}/logs/{service}", box_logs_resource, "application/jsonl",
     f"The last {RESOURCE_LOG_LINES} log records of one service of a box."),
)
