"""The docker part of `wtbox doctor`: is Docker usable, and which docker providers would work."""
from __future__ import annotations

from typing import Any


def docker_report(host: Any = None) -> dict[str, Any]:
    """Availability, reason, images present, and which docker providers are usable (never starts anything)."""
    if host is None:
        from ._common import get_host

        host = get_host()
    return host.docker_report()
