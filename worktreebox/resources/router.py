"""A box's routes through the host router: pushed when the box is up, gone before it goes.

Nothing is made or recorded here: the routes are derived from the registry (worktreebox/router).
The box's row is `creating` while it starts, which routes it; `removing` or `failed` while it is
destroyed, which does not. A router that cannot be reached never fails a box: the box keeps
its ports, and the warning says why.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from worktreebox.errors import WtboxError
from worktreebox.resources.base import Creation, Resource, warn
from worktreebox.router import caddy, control

if TYPE_CHECKING:
    from worktreebox.box import Box
    from worktreebox.config.load import RepoConfig
    from worktreebox.context import HostContext


class Router(Resource):
    name = "router"
    start_phase = "router"

    def warm(self, host: HostContext, data: dict[str, Any] | None, config: RepoConfig | None, *,
             pooled: bool = False) -> None:
        """`new` of a box with ports while no router runs (the first box after the last went): Caddy's
        start (~50 ms) on a thread now, beside the box's making; `start` pushes its routes as before.
        Not for a pooled box: it is routed when it is claimed."""
        if config is not None and config.box.ports and host.config.router and not pooled:
            control.start_early(host)

    def start(self, c: Creation) -> None:
        if c.box.pool is None:  # a pooled box is routed when it is claimed
            push(c.host)

    def destroy(self, host: HostContext, box: Box) -> None:
        push(host)

    def status(self, host: HostContext, box: Box) -> dict[str, Any] | None:
        urls = control.urls(host, box)
        return {"url": next(iter(urls.values()), None), "urls": urls}

    def checks(self, host: HostContext) -> list[dict[str, Any]]:
        return [check(host)]


def push(host: HostContext) -> None:
    """control.sync, with a failure told on stderr instead of raised (the box is whole without it)."""
    try:
        control.sync(host)
    except WtboxError as e:
        warn(f"{e} The box is reachable on its own ports.")
    except OSError as e:  # the router's files or process, not the box: never a reason to fail it
        warn(f"The router could not be brought in step ({e}). The box is reachable on its own ports.")


def check(host: HostContext) -> dict[str, Any]:
    """`wtbox doctor`'s line: is Caddy installed, does the router run, on which port."""
    line = {"check": "router"}
    if not host.config.router:
        return {**line, "ok": True, "detail": "off ([host] router = false)"}
    try:
        binary = caddy.find()
    except WtboxError as e:
        return {**line, "ok": False, "detail": str(e)}
    s = control.status(host)
    where = f"{s['listen']}:{s['port']}" if s["port"] else "no port leased yet"
    if s["running"]:
        detail = f"{binary} pid {s['pid']} on {where}, {s['routes']} routes"
    elif s["routes"]:
        detail = f"not running though {s['routes']} routes need it; the next wtbox command starts it ({where})"
    else:
        detail = f"{binary}; not running (no box has a port), starts with the first one on {where}"
    detail += "; asks for its token" if s["token"] else ""
    return {**line, "ok": s["running"] or not s["routes"], "detail": detail, "router": s}
