"""Keeping the router in step with the registry: start, push, stop; and what it says of a box."""
from __future__ import annotations

import contextlib
import hashlib
import json
import threading
from typing import TYPE_CHECKING, Any

from worktreebox.errors import UsageError, WtboxError
from worktreebox.router import caddy, routes
from worktreebox.router import token as tokens
from worktreebox.router.state import PORT_OWNER, Paths, read_state
from worktreebox.system import procs
from worktreebox.system.fsutil import atomic_write, file_lock

if TYPE_CHECKING:
    from collections.abc import Callable

    from worktreebox.box import Box
    from worktreebox.context import HostContext

# Caddy >= 2.7 can keep WebSockets open across a config change (2.6 closes them on every one).
KEEP_STREAMS_SINCE = (2, 7)


def sync(host: HostContext, *, sweep: bool = False) -> dict[str, Any]:
    """Make the router serve exactly the routes the registry implies: start it when the first box
    needs it, push the route set when it changed, stop it when no box needs it. Serialised per
    home; a `kill -9` at any point leaves a state the next sync repairs (`sweep`, as gc asks:
    also end a Caddy of this home that no state file names)."""
    if sweep:
        return _sync(host, sweep)
    return _BATCHES.setdefault(str(host.home), _Batch()).sync(lambda: _sync(host, False))


def _sync(host: HostContext, sweep: bool) -> dict[str, Any]:
    paths = Paths(host.home)
    paths.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    with file_lock(paths.lock, what="the router lock"):
        return _sync_locked(host, paths, sweep)


class _Batch:
    """Threads of one process that ask for a sync at once share one: a caller waits for a sync
    that began after it asked (it reads the registry as the caller left it), runs it itself when
    none is running. `rm --all` removes several boxes at a time; one sync each queued on the
    router lock for a quarter of its time."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.running = False
        self.done = 0  # syncs finished
        self.result: dict[str, Any] = {}

    def sync(self, run: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        with self.cond:
            wanted = self.done + (2 if self.running else 1)  # a running one may have read too early
            while self.done < wanted:
                if self.running:
                    self.cond.wait()
                    continue
                self.running = True
                self.cond.release()
                try:
                    result = run()
                finally:
                    self.cond.acquire()
                    self.running = False
                    self.cond.notify_all()
                self.done, self.result = self.done + 1, result
            return self.result


_BATCHES: dict[str, _Batch] = {}


def start_early(host: HostContext) -> None:
    """Start the router's Caddy on a thread if none runs, for a box about to be routed (its `sync`
    waits on the router lock meanwhile, then only pushes). What goes wrong is left for that `sync`
    to say; a Caddy nobody routes through is stopped by the next sync, or by gc's."""
    if procs.is_alive(read_state(host.home).get("pid")):
        return
    threading.Thread(target=_start_quietly, args=(host,), name="wtbox-router-start", daemon=True).start()


def _start_quietly(host: HostContext) -> None:
    paths = Paths(host.home)
    with contextlib.suppress(WtboxError, OSError):
        paths.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        with file_lock(paths.lock, what="the router lock"):
            if not procs.is_alive(read_state(host.home).get("pid")):
                _start(paths, caddy.find())


def _start(paths: Paths, binary: str) -> dict[str, Any]:
    """Caddy with the bootstrap config (the admin socket only), recorded; its state. Under the lock.
    A command killed between starting Caddy and recording it left one no file names, and the
    `starting` mark it made before: then the Caddy its command line names this home's bootstrap
    file is ended first (a /proc scan, ~5 ms: only after such a start)."""
    if paths.starting.exists():
        procs.kill_mentioning(str(paths.bootstrap))
    paths.state.unlink(missing_ok=True)  # a failed start leaves nothing for every command to retry
    paths.starting.touch(mode=0o600)
    state = {"pid": caddy.start(paths, binary, routes.encode(routes.bootstrap(str(paths.socket), str(paths.log)))),
             "version": list(caddy.version(binary, paths.version))}
    atomic_write(paths.state, json.dumps(state), mode=0o600)  # from now on a kill -9 is noticed
    paths.starting.unlink()
    return state


def _sync_locked(host: HostContext, paths: Paths, sweep: bool) -> dict[str, Any]:
    state = read_state(host.home)
    table = routes.table(host.list()) if host.config.router else []
    started = not procs.is_alive(state.get("pid"))
    if not table:
        if started and sweep:
            procs.kill_mentioning(str(paths.bootstrap))  # (see _start)
        caddy.stop(state.get("pid"))
        paths.state.unlink(missing_ok=True)
        return {"running": False, "routes": 0}
    binary = caddy.find()
    port = port_of(host)
    listen = host.config.router_listen
    if started:
        state = _start(paths, binary)
    auth = None if tokens.loopback(listen) else tokens.auth(paths, binary)
    body = routes.encode(routes.caddy_config(
        table, listen=listen, port=port, admin=str(paths.socket), log_file=str(paths.log), auth=auth,
        keep_streams=tuple(state.get("version") or ()) >= KEEP_STREAMS_SINCE))
    digest = hashlib.sha256(body).hexdigest()[:16]
    if state.get("pushed") != digest:
        try:
            caddy.load(paths.socket, body)
        except WtboxError:
            if started:  # a Caddy that serves nothing helps no one: the next sync tries afresh
                caddy.stop(state["pid"])
                paths.state.unlink(missing_ok=True)
            raise
        state.update(port=port, listen=listen, pushed=digest)
        atomic_write(paths.state, json.dumps(state), mode=0o600)
    return {"running": True, "routes": len(table), "port": port, "listen": listen, "started": started}


def port_of(host: HostContext) -> int:
    """[host] router_port, else a port leased once for this home (kept while the home lives, so an
    SSH tunnel to it keeps working across router restarts)."""
    return host.config.router_port or host.lease_host_port(PORT_OWNER)


def urls(host: HostContext, box: Box, boxes: list[Box] | None = None) -> dict[str, str]:
    """service -> URL of the box through the router (first service first); {} when the router is off
    or the box has no port. No process is started and nothing is asked of Caddy."""
    if not host.config.router:
        return {}
    if boxes is None:
        boxes = host.list()
    if not routes.routed([box]):
        return {}
    port = host.config.router_port or read_state(host.home).get("port") or _leased_port(host)
    return routes.box_urls(box, boxes, port) if port else {}


def url(host: HostContext, box: Box, service: str | None = None, *, show_token: bool = False) -> dict[str, Any]:
    """What `wtbox url --json` prints; the router is synced first (started if need be)."""
    if not host.config.router:
        ports = ", ".join(f"{n}={p}" for n, p in box.ports.items()) or "no ports"
        raise WtboxError(f"The router is off ([host] router = false in {host.config.source}); {box.id} listens on "
                         f"{ports}.")
    if not routes.routed([box]):
        waiting = "" if box.pool is None else " (it waits in the warm pool)"
        raise WtboxError(f"{box.id} has no port to route{waiting}.")
    names = list(routes.app_ports(box))
    if service is not None and service not in names:
        raise UsageError(f"{box.id} has no service port {service!r}; its ports: {', '.join(names)}.")
    router = sync(host)  # before the URLs: it leases the router's port the first time
    every = urls(host, box)
    service = service or next(iter(every))
    out: dict[str, Any] = {"id": box.id, "service": service, "url": every[service], "urls": every,
           "router": {"port": router.get("port"), "listen": router.get("listen")}}
    if not tokens.loopback(router.get("listen") or "127.0.0.1"):
        out["token_needed"] = True
        if show_token:
            out["token"] = tokens.read(Paths(host.home))
    return out


def _leased_port(host: HostContext) -> int | None:
    return next(iter(host.registry.ports_of(PORT_OWNER).values()), None)


def status(host: HostContext) -> dict[str, Any]:
    """What `doctor` says of the router: enabled, running, pid, port, listen, routes, token."""
    state = read_state(host.home)
    running = procs.is_alive(state.get("pid"))
    out: dict[str, Any] = {"enabled": host.config.router, "running": running, "listen": host.config.router_listen,
                           "port": host.config.router_port or state.get("port") or _leased_port(host),
                           "pid": state["pid"][0] if running else None,
                           "routes": len(routes.table(host.list())) if host.config.router else 0}
    out["token"] = not tokens.loopback(host.config.router_listen)
    return out
