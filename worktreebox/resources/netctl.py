"""`wtbox net` and `wtbox expose`: changes to a running sandboxed box's network.

`net`: faults on the box's traffic. A forward (a declared port as the host reaches it, the
database, the metrics store, the OTLP endpoint, an exposed port) gets them from the box's
supervisor (services/forwards.py: delay and jitter added to each exchange, loss as TCP's stalls,
down as reset connections); `outbound` (the box's own connections to the outside) gets them
from its firewall (down: refused, loss: dropped packets; a delay there would need netem, which
this kernel lacks: refused in one sentence). What is set is recorded in box.data["sandbox"]
(a supervisor started again gets it back, `status` shows it), as an event in the box's logs
(`_net`) and as the wtbox_net_fault gauge in its metrics; `--reset` or the box's end takes it away.

`expose`: a fixed port of the host (an OAuth callback, a URL a person keeps open) to a port of
one box. The host socket is bound here and handed to the box's supervisor over its control
socket; exposing the same host port for another box moves it; `--release` or the box's end
frees it.
"""
from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from worktreebox.errors import UsageError, WtboxError
from worktreebox.resources.sandbox import NAME, sandboxed

if TYPE_CHECKING:
    from worktreebox.box import Box
    from worktreebox.context import HostContext

OUTBOUND = "outbound"
EXPOSE_LOCK = "expose.lock"  # in the home: one host port moves between boxes under it


def _data(box: Box, what: str) -> dict[str, Any]:
    if not sandboxed(box):
        raise UsageError(f"{box.id} is not sandboxed ([host] sandbox = \"off\" when it was made): {what} works on "
                         "the network of a sandboxed box only.")
    data: dict[str, Any] = box.data[NAME]
    return data


# ---------------------------------------------------------------- net

def net(host: HostContext, box: Box, target: str | None = None, *, delay: float | None = None,
        jitter: float | None = None, loss: float | None = None, down: bool = False,
        reset: bool = False) -> dict[str, Any]:
    """Change the faults of one target (a forward's name, or `outbound`) or of every forward; the
    report afterwards. With nothing to change: the report alone."""
    data = _data(box, "wtbox net")
    changes = {k: v for k, v in (("delay_ms", None if delay is None else delay * 1000),
                                 ("jitter_ms", None if jitter is None else jitter * 1000),
                                 ("loss", loss), ("down", True if down else None)) if v is not None}
    if reset and changes:
        raise UsageError("--reset takes faults away; give it alone (with --target for one target).")
    if not reset and not changes:
        return report(box)
    if target == OUTBOUND:
        _outbound(host, box, data, changes, reset)
    else:
        _forwards(box, data, target, changes, reset)
    host.registry.save_box(box)
    _record(box, target, changes, reset)
    return report(box)


def _forwards(box: Box, data: dict[str, Any], target: str | None, changes: dict[str, Any], reset: bool) -> None:
    from worktreebox.services import client, control

    if client.supervisor_pid(box) is None:
        raise WtboxError(f"The supervisor of {box.id} is not running, and with it the box's forwards; run "
                         f"'wtbox up {box.id}' first.")
    client.checked(client.control_request(box, control.NET, target, data={"reset": True} if reset else changes))
    kept = data.setdefault("faults", {})
    key = target or "*"
    if reset:
        for name in ([key] if target else list(kept)):
            kept.pop(name, None)
    else:
        kept[key] = {**kept.get(key, {}), **changes}


def _outbound(host: HostContext, box: Box, data: dict[str, Any], changes: dict[str, Any], reset: bool) -> None:
    from worktreebox.providers.sandbox import holder_of, network

    if changes.get("delay_ms") or changes.get("jitter_ms"):
        raise UsageError("A delay on outbound traffic needs netem, which this kernel does not have; delay the "
                         "box's forwards instead (--target db, a port name, or none for all of them).")
    holder = holder_of(box)
    if holder is None:
        raise WtboxError(f"The sandbox of {box.id} is not running; run 'wtbox up {box.id}' first.")
    was = data.get("outbound") or {}
    now = network.Outbound() if reset else network.Outbound(down=bool(changes.get("down", was.get("down"))),
                                                              loss=float(changes.get("loss", was.get("loss") or 0)))
    if not 0 <= now.loss < 1:
        raise UsageError(f"Loss is a share of traffic from 0 up to (not including) 100%, not {now.loss:.0%}.")
    network.set_outbound(holder, network.host_addresses(), now)
    data["outbound"] = now.to_json()


def report(box: Box) -> dict[str, Any]:
    """What `status` shows of the box's network: each forward with its faults, and outbound."""
    from worktreebox.services.client import read_state

    state = read_state(box)
    data = box.data.get(NAME) or {}
    return {"id": box.id, "forwards": state.forwards if state else {},
            "outbound": data.get("outbound") or {"down": False, "loss": 0.0}}


def _record(box: Box, target: str | None, changes: dict[str, Any], reset: bool) -> None:
    """The change as an event in the box's logs and as the wtbox_net_fault gauge in its metrics."""
    from worktreebox.telemetry.logs.writer import EventLog

    where = f"the {target} forward" if target and target != OUTBOUND else ("outbound traffic" if target else
                                                                            "every forward")
    parts = [f"{k.removesuffix('_ms')} {v:g} ms" for k, v in changes.items() if k.endswith("_ms")]
    parts += ([f"loss {changes['loss']:.0%}"] if "loss" in changes else []) + (["down"] if changes.get("down") else [])
    msg = f"net: {where} has no faults again" if reset else f"net: {where}: {', '.join(parts)}"
    events = EventLog(box.logs_dir)
    try:
        events("_net", "info" if reset else "warning", msg, event="net", target=target or "all", reset=reset,
               **changes)
    except OSError:
        pass
    finally:
        events.close()
    _push(box, target or "all", changes, reset)


def _push(box: Box, target: str, changes: dict[str, Any], reset: bool) -> None:
    url = (box.data.get("metrics") or {}).get("url")
    if not url:
        return
    from worktreebox.telemetry.exposition import exposition
    from worktreebox.telemetry.vmclient import Client

    values = {"delay": 0.0, "jitter": 0.0, "loss": 0.0, "down": 0.0} if reset else {
        k.removesuffix("_ms"): (float(v) / 1000 if k.endswith("_ms") else float(v)) for k, v in changes.items()}
    samples = [("wtbox_net_fault", {"box": box.id, "target": target, "fault": k}, v) for k, v in values.items()]
    try:
        Client(url, box_id=box.id, timeout=2.0).push_prometheus(exposition(samples, int(time.time() * 1000)))
    except (OSError, WtboxError):
        pass  # the metrics store is down: the event and the record are there


# ---------------------------------------------------------------- expose

def expose(host: HostContext, box: Box, port: str, host_port: int | None = None,
           release: bool = False) -> dict[str, Any]:
    """Forward a fixed host port to the box's `port` (a declared name or the number the box's service
    binds); one box per host port (exposing it for another box moves it); `release` ends it."""
    from worktreebox.system.fsutil import file_lock

    data = _data(box, "wtbox expose")
    name, inside = _port_of(box, port)
    fixed = host_port or inside
    with file_lock(host.home / EXPOSE_LOCK, what="the exposed ports"):
        if release:
            _unexpose(box, fixed)
        else:
            for other in host.list():
                if other.id != box.id and str(fixed) in ((other.data.get(NAME) or {}).get("exposed") or {}):
                    _unexpose(other, fixed)
                    host.registry.save_box(other)
            _unexpose(box, fixed)
            _expose(box, fixed, name, inside)
        host.registry.save_box(box)
    return {"id": box.id, "exposed": dict(data.get("exposed") or {})}


def _port_of(box: Box, port: str) -> tuple[str, int]:
    inside = box.inside_ports
    if port in inside:
        return port, inside[port]
    if port.isdigit() and int(port) in inside.values():
        return next(n for n, p in inside.items() if p == int(port)), int(port)
    known = ", ".join(f"{n} ({p})" for n, p in inside.items()) or "none"
    raise UsageError(f"{box.id} has no port {port!r}; it has: {known}.")


def _expose(box: Box, fixed: int, name: str, inside: int) -> None:
    from worktreebox.services import client, control
    from worktreebox.services.spec import ForwardSpec

    if client.supervisor_pid(box) is None:
        raise WtboxError(f"The supervisor of {box.id} is not running; run 'wtbox up {box.id}' first.")
    forward = f"expose:{fixed}"
    sock = client.HostForward(forward, fixed, ("127.0.0.1", inside)).bind()
    try:
        client.checked(client.control_request(box, control.FORWARD, data=ForwardSpec(forward, ("127.0.0.1", inside))
                                              .to_json(), fds=[sock.fileno()]))
    finally:
        sock.close()
    box.data[NAME].setdefault("exposed", {})[str(fixed)] = name


def _unexpose(box: Box, fixed: int) -> None:
    from worktreebox.services import client, control

    exposed = (box.data.get(NAME) or {}).get("exposed") or {}
    if exposed.pop(str(fixed), None) is None:
        return
    if client.supervisor_pid(box) is not None:
        try:
            client.control_request(box, control.UNFORWARD, data={"name": f"expose:{fixed}"}, timeout=10)
        except (OSError, ValueError):
            pass
