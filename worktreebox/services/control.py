"""The contract between a box's supervisor and its clients: the control socket and the state file.

Both ends import this module and nothing of each other. The socket (`run/ctl.sock`, 0600,
peer uid checked) takes one JSON `Request` per connection, newline-terminated, and answers
one JSON `Response` the same way. `run/state.json` is a `SupervisorState`, rewritten whole
(atomically) whenever a service changes state.
"""
from __future__ import annotations

import dataclasses
import json
import os
import socket
from pathlib import Path
from typing import Any

from worktreebox.system.fsutil import atomic_write

SOCKET = "ctl.sock"
STATE_FILE = "state.json"

# Service states, as `status` shows them.
STOPPED, STARTING, READY, BACKOFF, EXITED, FAILED = "stopped", "starting", "ready", "backoff", "exited", "failed"

# Requests: `service` None means every service.
STATUS, UP, DOWN, RESTART, ENV_SECRETS, STOP = "status", "up", "down", "restart", "env-secrets", "stop"


@dataclasses.dataclass
class ServiceState:
    state: str = STOPPED
    pid: int | None = None
    port: int | None = None
    started_at: float | None = None
    ready_at: float | None = None
    ready_seconds: float | None = None
    restarts: int = 0
    exit_code: int | None = None
    error: str | None = None
    restart: str = "on-failure"

    @property
    def done(self) -> bool:
        """Ready, or a one-shot service (restart = "no") that became ready and exited cleanly."""
        return self.state == READY or (self.state == EXITED and self.exit_code == 0 and self.ready_at is not None)

    @property
    def failed(self) -> bool:
        return bool(self.error) or self.state == FAILED

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ServiceState:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


@dataclasses.dataclass
class SupervisorState:
    box_id: str
    pid: int | None = None
    started_at: float | None = None
    stopping: bool = False
    updated_at: float | None = None
    services: dict[str, ServiceState] = dataclasses.field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"box_id": self.box_id, "pid": self.pid, "started_at": self.started_at, "stopping": self.stopping,
                "updated_at": self.updated_at, "services": {n: s.to_json() for n, s in self.services.items()}}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> SupervisorState:
        return cls(box_id=data.get("box_id", ""), pid=data.get("pid"), started_at=data.get("started_at"),
                   stopping=bool(data.get("stopping")), updated_at=data.get("updated_at"),
                   services={n: ServiceState.from_json(s) for n, s in (data.get("services") or {}).items()})


def write_state(run_dir: Path, state: SupervisorState) -> None:
    atomic_write(run_dir / STATE_FILE, json.dumps(state.to_json(), indent=1))


def read_state(run_dir: Path) -> SupervisorState | None:
    try:
        return SupervisorState.from_json(json.loads((run_dir / STATE_FILE).read_text()))
    except (FileNotFoundError, ValueError, AttributeError, TypeError):
        return None


@dataclasses.dataclass
class Request:
    cmd: str
    service: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"cmd": self.cmd, "service": self.service}

    @classmethod
    def from_json(cls, data: Any) -> Request:
        """A malformed request becomes one the supervisor refuses (cmd "")."""
        if not isinstance(data, dict):
            return cls("")
        return cls(cmd=data.get("cmd") or "", service=data.get("service"))


@dataclasses.dataclass
class Response:
    ok: bool
    error: str | None = None
    services: dict[str, ServiceState] | None = None
    secrets: dict[str, str] | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"ok": self.ok}
        if self.error is not None:
            out["error"] = self.error
        if self.services is not None:
            out["services"] = {n: s.to_json() for n, s in self.services.items()}
        if self.secrets is not None:
            out["secrets"] = dict(self.secrets)
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Response:
        services = data.get("services")
        return cls(ok=bool(data.get("ok")), error=data.get("error"), secrets=data.get("secrets"),
                   services={n: ServiceState.from_json(s) for n, s in services.items()} if services else None)


def read_line(sock: socket.socket) -> bytes:
    """One newline-terminated message (both ends)."""
    data = b""
    while not data.endswith(b"\n"):
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return data


def write_message(sock: socket.socket, message: Request | Response) -> None:
    sock.sendall(json.dumps(message.to_json()).encode() + b"\n")


def request(run_dir: Path, req: Request, timeout: float) -> Response:
    """Send one request to the supervisor listening in `run_dir` and return its answer."""
    run_fd = os.open(run_dir, os.O_PATH | os.O_DIRECTORY)
    try:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(timeout)
        try:
            # Through /proc/self/fd: the real path can be longer than sun_path's 107 bytes.
            s.connect(f"/proc/self/fd/{run_fd}/{SOCKET}")
            write_message(s, req)
            data = read_line(s)
        finally:
            s.close()
    finally:
        os.close(run_fd)
    if not data:
        raise OSError("the supervisor closed the connection")
    answer = json.loads(data)
    if not isinstance(answer, dict):
        raise ValueError("the supervisor answered something that is not an object")
    return Response.from_json(answer)
