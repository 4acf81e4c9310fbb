"""The rendered service spec: what the services resource hands the supervisor.

`resources/services.py` renders `[services.<name>]` of wtbox.toml into `ServiceSpec`s; the
supervisor gets them (with the `--secret` values) as one JSON `SupervisorPayload` on its stdin,
and `run/services.json` is a masked copy of the same list for people.
"""
from __future__ import annotations

import dataclasses
from typing import Any

RESTART_POLICIES = ("on-failure", "always", "no")
# The mark a sandboxed box's database forward sets on its sockets (SO_MARK, "wtbx"): the box's
# firewall lets only marked packets reach the host (providers/sandbox/network.py).
DB_MARK = 0x77746278


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
class ForwardSpec:
    """One forward the supervisor hosts: connections accepted on a host socket it inherits (`fd`,
    bound by its starter in the host's network namespace) or on `listen` (bound by itself, in the
    box's), each carried to `target`. `mark`: its sockets carry the firewall's mark that lets them
    past it (the database hop to the host)."""

    name: str
    target: tuple[str, int]
    fd: int | None = None
    listen: tuple[str, int] | None = None
    mark: bool = False

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "target": list(self.target), "fd": self.fd,
                "listen": list(self.listen) if self.listen else None, "mark": self.mark}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ForwardSpec:
        listen = data.get("listen")
        return cls(name=str(data["name"]), target=(str(data["target"][0]), int(data["target"][1])),
                   fd=data.get("fd"), listen=(str(listen[0]), int(listen[1])) if listen else None,
                   mark=bool(data.get("mark")))


@dataclasses.dataclass
class SupervisorPayload:
    """Everything the supervisor is started with, sent over its stdin (never argv, env or a file).

    In a sandboxed box it also gets how to start the box's processes (`launcher`: the sandbox's
    prefix, see procs.Launcher), the forwards it hosts, the faults they start with, and an fd
    of the host's network namespace (for the commands it runs for `wtbox` inside the box)."""

    services: list[ServiceSpec]
    workdir: str | None = None
    secrets: dict[str, str] = dataclasses.field(default_factory=dict)
    launcher: list[str] = dataclasses.field(default_factory=list)
    forwards: list[ForwardSpec] = dataclasses.field(default_factory=list)
    faults: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    host_netns_fd: int | None = None
    netns: str | None = None  # the box's network namespace, when the supervisor enters it itself
    otlp_port: int | None = None  # the box's OTLP/HTTP endpoint, served by this process (otlp_receiver.py)
    background_busy: bool = True  # `[host] background_busy` (the client reads the host config: the supervisor need not)
    disk_max: int | None = None  # watched by the supervisor (services/diskwatch.py) when no filesystem enforces it

    def to_json(self) -> dict[str, Any]:
        return {"secrets": dict(self.secrets), "workdir": self.workdir,
                "services": [s.to_json() for s in self.services],
                "launcher": list(self.launcher), "forwards": [f.to_json() for f in self.forwards],
                "faults": dict(self.faults), "host_netns_fd": self.host_netns_fd, "netns": self.netns,
                "otlp_port": self.otlp_port, "background_busy": self.background_busy, "disk_max": self.disk_max}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> SupervisorPayload:
        return cls(services=[ServiceSpec.from_json(s) for s in data.get("services") or []],
                   workdir=data.get("workdir"), secrets=dict(data.get("secrets") or {}),
                   launcher=list(data.get("launcher") or []),
                   forwards=[ForwardSpec.from_json(f) for f in data.get("forwards") or []],
                   faults=dict(data.get("faults") or {}), host_netns_fd=data.get("host_netns_fd"),
                   netns=data.get("netns"), otlp_port=data.get("otlp_port"),
                   background_busy=data.get("background_busy", True) is not False, disk_max=data.get("disk_max"))
