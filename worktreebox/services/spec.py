"""The rendered service spec: what the services resource hands the supervisor.

`resources/services.py` renders `[services.<name>]` of wtbox.toml into `ServiceSpec`s; the
supervisor gets them (with the `--secret` values) as one JSON `SupervisorPayload` on its stdin,
and `run/services.json` is a masked copy of the same list for people.
"""
from __future__ import annotations

import dataclasses
from typing import Any

RESTART_POLICIES = ("on-failure", "always", "no")


@dataclasses.dataclass
class ServiceSpec:
    name: str
    cmd: str
    cwd: str | None = None  # None: the box worktree
    env: dict[str, str] = dataclasses.field(default_factory=dict)
    ready: str | None = None  # http(s)://…, tcp:[HOST:]PORT, or a shell command; None: alive counts as ready
    ready_timeout: float = 60.0
    restart: str = "on-failure"  # one of RESTART_POLICIES
    depends_on: list[str] = dataclasses.field(default_factory=list)
    port: int | None = None  # the port it listens on, for `status`
    metrics: str | None = None
    holds_port: bool = True  # ready only when its own process tree listens on `port` (tcp/http checks)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ServiceSpec:
        """From the wire; unknown keys are ignored, missing ones take their defaults."""
        known = {f.name for f in dataclasses.fields(cls)}
        spec = cls(**{k: v for k, v in data.items() if k in known})
        spec.env = dict(spec.env or {})
        spec.depends_on = list(spec.depends_on or [])
        spec.restart = spec.restart or "on-failure"
        spec.ready_timeout = float(spec.ready_timeout or 60.0)
        return spec


@dataclasses.dataclass
class SupervisorPayload:
    """Everything the supervisor is started with, sent over its stdin (never argv, env or a file)."""

    services: list[ServiceSpec]
    workdir: str | None = None
    secrets: dict[str, str] = dataclasses.field(default_factory=dict)
    disk_max: int | None = None  # watched by the supervisor (services/diskwatch.py) when no filesystem enforces it

    def to_json(self) -> dict[str, Any]:
        return {"secrets": dict(self.secrets), "workdir": self.workdir,
                "services": [s.to_json() for s in self.services], "disk_max": self.disk_max}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> SupervisorPayload:
        return cls(services=[ServiceSpec.from_json(s) for s in data.get("services") or []],
                   workdir=data.get("workdir"), secrets=dict(data.get("secrets") or {}), disk_max=data.get("disk_max"))
