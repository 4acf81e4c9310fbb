"""Named ports leased from a range below the kernel's ephemeral range.

A lease is decided inside one BEGIN IMMEDIATE transaction of the home's registry (two `new`
of one home never race) and claimed in the host-wide lease directory (worktreebox/system/leases.py:
two homes or users never get the same port). Each candidate is also checked free, because a
foreign process may hold it; `check_free` looks again right before services start and names
the holder.
"""
from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from worktreebox.box import is_box_id
from worktreebox.errors import UsageError, WtboxError
from worktreebox.resources.base import Creation, Resource

if TYPE_CHECKING:
    from worktreebox.box import Box
    from worktreebox.context import HostContext as Host
    from worktreebox.system.leases import HostLeases

DEFAULT_LOW = 20000


def ephemeral_range() -> tuple[int, int]:
    from worktreebox.system import procfs

    try:
        lo, hi = (procfs.sysctl("net/ipv4/ip_local_port_range") or "").split()
        return int(lo), int(hi)
    except ValueError:
        return 32768, 60999


def default_range() -> tuple[int, int]:
    eph_lo, _ = ephemeral_range()
    hi = eph_lo - 1
    lo = DEFAULT_LOW if hi - DEFAULT_LOW >= 1000 else max(1024, hi - 4000)
    return lo, hi


def is_port_free(port: int) -> bool:
    import portpicker

    return portpicker.is_port_free(port)


def host_leases(host: Host) -> HostLeases:
    from worktreebox.system.leases import HostLeases

    return HostLeases(host.home)


def lease(host: Host, owner: str, names: list[str]) -> dict[str, int]:
    """Lease a block of len(names) consecutive free ports for `owner`."""
    if not names:
        return {}
    lo, hi = host.config.port_range or default_range()
    n = len(names)
    store = host_leases(host)
    with host.registry.transaction() as db:
        taken = host.registry.leased_ports(db)
        start = lo
        while start + n - 1 <= hi:
            block = range(start, start + n)
            clash = next((p for p in block if p in taken or not is_port_free(p)), None)
            if clash is None:
                claimed = []
                for name, p in zip(names, block, strict=True):
                    if not store.claim(p, owner, name):
                        clash = p
                        break
                    claimed.append(p)
                if clash is None:
                    ports = dict(zip(names, block, strict=True))
                    try:
                        host.registry.insert_leases(db, owner, ports)
                    except BaseException:
                        for p in claimed:
                            store.release(p, owner)
                        raise
                    return ports
                for p in claimed:
                    store.release(p, owner)
            start = clash + 1
    raise WtboxError(f"No block of {n} free ports is left in {lo}-{hi}; remove boxes or widen [host] port_range.")


def release(host: Host, owner: str) -> None:
    """Drop every lease of `owner`: the registry's rows and the host-wide claims."""
    ports = host.registry.ports_of(owner).values()
    host_leases(host).release_owner(owner, ports)
    host.registry.delete_leases(owner)


def holder_of(port: int) -> str | None:
    """Who listens on `port`, as 'pid 123 (python3 app.py)', or None when nobody (visibly) does."""
    from worktreebox.system import procs

    pids = procs.listeners(port)
    return ", ".join(procs.describe(p) for p in pids) if pids else None


def check_free(box: Box, ports: Iterable[int | None]) -> None:
    """Right before services start: each of the box's `ports` must be free, else a WtboxError
    naming the port and its holder (a lease is only a promise among wtbox boxes)."""
    names = {p: n for n, p in box.ports.items()}
    for port in sorted({p for p in ports if p in names}):
        if not is_port_free(port):
            who = holder_of(port) or "a process wtbox cannot see"
            raise WtboxError(f"Port {port} ({names[port]}) of {box.id} is already in use by {who}; stop it, "
                             f"or remove the box and make a new one to get other ports.")


class Ports(Resource):
    name = "ports"
    phase = "ports"

    def create(self, c: Creation) -> None:
        from worktreebox.resources import sandbox

        c.box.ports = lease(c.host, c.box.id, c.config.port_names)
        data = sandbox.decide(c)  # a sandboxed box sees its canonical numbers inside
        inside = sandbox.inside_ports(c.config, c.box.ports, data["provider"] != sandbox.OFF)
        data["ports"] = inside
        c.facts["ports"] = dict(inside)
        if inside:
            first = c.config.box.ports[0] if c.config.box.ports else next(iter(inside))
            c.env["PORT"] = str(inside[first])
        for name, port in inside.items():
            c.env[f"WTBOX_PORT_{name.upper()}"] = str(port)

    def destroy(self, host: Host, box: Box) -> None:
        release(host, box.id)

    def discover(self, host: Host) -> set[str]:
        owners = host.registry.lease_owners() | host_leases(host).owners()
        return {o for o in owners if is_box_id(o)}


def url_for(host: Host, box: Box, target: str) -> str:
    """A URL as is; a PATH on the box's first port ([box] ports order), never wtbox's own (metrics,
    browser): what probe, browse and fan-out's --probe/--browse load."""
    from worktreebox.config.load import OWN_PORTS

    if target.startswith(("http://", "https://")):
        return target
    if not target.startswith("/"):
        raise UsageError(f"{target!r} is neither a URL nor a path; give e.g. /health or http://127.0.0.1:8000/.")
    names = [p for p in box.ports if p not in OWN_PORTS]
    try:
        first = host.repo_config(box).box.ports[0]
        if first in box.ports:
            names.insert(0, first)
    except Exception:  # an unreadable wtbox.toml: the leased order is good enough
        pass
    if not names:
        raise UsageError(f"{box.id} has no ports; give a full URL instead of {target!r}.")
    return f"http://127.0.0.1:{box.ports[names[0]]}{target}"


def seen_inside(box: Box, url: str) -> str:
    """`url` as a process of the box reaches it: a leased port of the box on its loopback becomes
    the port the box's own processes listen on (the same in a box without a sandbox)."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    inside = {port: box.inside_ports.get(name, port) for name, port in box.ports.items()}
    if parts.hostname not in ("127.0.0.1", "localhost") or parts.port not in inside:
        return url
    return urlunsplit(parts._replace(netloc=f"{parts.hostname}:{inside[parts.port]}"))
