"""net, expose: a sandboxed box's network while it runs (resources/netctl.py does the work)."""
from __future__ import annotations

from typing import TYPE_CHECKING

from worktreebox.operations.spec import BOX, CHANGES, REQUIRED, Operation, Param, parsed

if TYPE_CHECKING:
    from worktreebox.host import Host


def net(host: Host, box: str | None, delay: str | None = None, jitter: str | None = None, loss: str | None = None,
        down: str | None = None, reset: bool = False, target: str | None = None) -> dict:
    from worktreebox.errors import ParamError
    from worktreebox.resources import netctl

    if down and target and down != target:
        raise ParamError("{down} names its target; give {target} only for the other faults.", "down", "target")
    seconds = {name: parsed(name, _duration, value) for name, value in (("delay", delay), ("jitter", jitter))
               if value is not None}
    lost = parsed("loss", _share, loss) if loss is not None else None
    b = host.get(box)
    return netctl.net(host, b, down or target, delay=seconds.get("delay"), jitter=seconds.get("jitter"), loss=lost,
                      down=bool(down), reset=reset)


def _duration(value: str, *, where: str) -> float:
    from worktreebox.config.values import parse_duration

    return parse_duration(value, where=where)


def _share(value: str, *, where: str) -> float:
    from worktreebox.config.values import at, share

    with at(where):
        return share(value)


def expose(host: Host, box: str | None, port: str, host_port: int | None = None, release: bool = False) -> dict:
    from worktreebox.resources import netctl

    return netctl.expose(host, host.get(box), port, host_port, release)


NET = Operation(
    "net", "Inject network faults into a sandboxed box: delay, jitter, loss, or a target down (the database, a "
           "port, outbound traffic); --reset takes them away. Without faults: what is set now.",
    (BOX,
     Param("delay", "Add this much to each request/response, e.g. 200ms.", metavar="DURATION"),
     Param("jitter", "Spread the delay by up to this much either way, e.g. 20ms.", metavar="DURATION"),
     Param("loss", "Lose this share of the traffic, e.g. 5% (a forward stalls as TCP does; outbound drops).",
           metavar="SHARE"),
     Param("down", "Cut this target: db, a port name, outbound (open connections are reset).", metavar="TARGET"),
     Param("reset", "Take the faults away (of --target, or of everything).", bool, False),
     Param("target", "Where the faults go: db, a port name, an exposed port, outbound (default: every forward).",
           metavar="TARGET")),
    net, result="{id, forwards: {name: {target, listen, faults, open, served}}, outbound: {down, loss}}.",
    effect=CHANGES, tool="box_net")

EXPOSE = Operation(
    "expose", "Forward a fixed host port to a port of a sandboxed box (one box per host port: exposing it for "
              "another box moves it); --release ends it.",
    (BOX,
     Param("port", "The box's port: its name (web) or the number its service binds.", default=REQUIRED,
           positional=True),
     Param("host_port", "The host's port (default: the same number as the box's).", int, min=1, max=65535),
     Param("release", "End the forward instead.", bool, False)),
    expose, result="{id, exposed: {host port: port name}}.", effect=CHANGES, tool="box_expose")
