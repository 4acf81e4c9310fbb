"""Named ports leased from a range below the kernel's ephemeral range.

Leases are decided inside one BEGIN IMMEDIATE transaction, so two concurrent `new`
can never get the same port; each candidate is also checked free (a foreign process
may hold it), because a lease is a promise only among wtbox boxes.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from ..box import is_box_id
from ..errors import WtboxError
from .base import Creation, Resource

if TYPE_CHECKING:
    from ..box import Box
    from ..context import HostContext as Host

DEFAULT_LOW = 20000


def ephemeral_range() -> tuple[int, int]:
    try:
        lo, hi = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(lo), int(hi)
    except (OSError, ValueError):
        return 32768, 60999


def default_range() -> tuple[int, int]:
    eph_lo, _ = ephemeral_range()
    hi = eph_lo - 1
    lo = DEFAULT_LOW if hi - DEFAULT_LOW >= 1000 else max(1024, hi - 4000)
    return lo, hi


def is_port_free(port: int) -> bool:
    import portpicker

    return portpicker.is_port_free(port)


def lease(host: "Host", owner: str, names: list[str]) -> dict[str, int]:
    """Lease a block of len(names) consecutive free ports for `owner`."""
    if not names:
        return {}
    lo, hi = host.config.port_range or default_range()
    n = len(names)
    with host.registry.transaction() as db:
        taken = host.registry.leased_ports(db)
        start = lo
        while start + n - 1 <= hi:
            block = range(start, start + n)
            clash = next((p for p in block if p in taken or not is_port_free(p)), None)
            if clash is None:
                ports = dict(zip(names, block))
                host.registry.insert_leases(db, owner, ports)
                return ports
            start = clash + 1
    raise WtboxError(f"No block of {n} free ports is left in {lo}-{hi}; remove boxes or widen [host] port_range.")


class Ports(Resource):
    name = "ports"

    def create(self, c: Creation) -> None:
        c.box.ports = lease(c.host, c.box.id, c.config.port_names)
        c.facts["ports"] = dict(c.box.ports)
        if c.box.ports:
            first = c.config.box.ports[0] if c.config.box.ports else next(iter(c.box.ports))
            c.env["PORT"] = str(c.box.ports[first])
        for name, port in c.box.ports.items():
            c.env[f"WTBOX_PORT_{name.upper()}"] = str(port)

    def destroy(self, host: "Host", box: "Box") -> None:
        host.registry.delete_leases(box.id)

    def discover(self, host: "Host") -> set[str]:
        return {o for o in host.registry.lease_owners() if is_box_id(o)}
