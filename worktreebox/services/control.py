"""The contract between a box's supervisor and its clients: the control socket and the state file.

Both ends import this module and nothing of each other. The socket (`run/ctl.sock`, 0600,
peer uid checked) takes one `Request` per connection and answers one `Response`, framed as
every wtbox socket is (`worktreebox.system.unixsock`: a length, then JSON); `serve` is the
supervisor's side, `request` the clients'. `run/state.json` is a `SupervisorState`, rewritten
whole (atomically) whenever a service changes state.
"""
from __future__ import annotations

import dataclasses
import json
import os
import socket
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from worktreebox.system import unixsock
from worktreebox.system.fsutil import atomic_write

SOCKET = "ctl.sock"
STATE_FILE = "state.json"
MAX_REQUEST = 1 << 20  # a command, a service name, or a box's services (`services`); a longer one is not ours
READ_TIMEOUT = 10.0  # a client that connects and sends nothing holds a thread this long at most

# Service states, as `status` shows them.
STOPPED, STARTING, READY, BACKOFF, EXITED, FAILED = "stopped", "starting", "ready", "backoff", "exited", "failed"

# Requests: `service` None means every service.
STATUS, UP, DOWN, RESTART, ENV_SECRETS, STOP = "status", "up", "down", "restart", "env-secrets", "stop"
# A supervisor may run before its box's services are known (started for the box's OTLP endpoint,
# or by the sandbox resource in the box's network): `services` hands them over (a SupervisorPayload
# in `data`: specs, workdir, --secret values); `net` changes a forward's faults; `forward` adds one
# on a host socket sent along (expose, a cold browser), `unforward` ends it.
SERVICES, NET, FORWARD, UNFORWARD = "services", "net", "forward", "unforward"
MAX_FDS = 1  # a request carries at most one descriptor (a forward's host socket)
COLLECT = "collect"  # push the box's own metrics now (a query is coming)
WAKE_STORE = "wake-store"  # start the box's sleeping metrics store again and answer once it does (store_sleep.py)


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
    forwards: dict[str, Any] = dataclasses.field(default_factory=dict)  # forwards.Forwards.report()

    def to_json(self) -> dict[str, Any]:
        return {"box_id": self.box_id, "pid": self.pid, "started_at": self.started_at, "stopping": self.stopping,
                "updated_at": self.updated_at, "services": {n: s.to_json() for n, s in self.services.items()},
                "forwards": dict(self.forwards)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> SupervisorState:
        return cls(box_id=data.get("box_id", ""), pid=data.get("pid"), started_at=data.get("started_at"),
                   stopping=bool(data.get("stopping")), updated_at=data.get("updated_at"),
                   services={n: ServiceState.from_json(s) for n, s in (data.get("services") or {}).items()},
                   forwards=dict(data.get("forwards") or {}))


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
    data: dict[str, Any] | None = None  # what `services`, `net` and `forward` carry
    fds: list[int] = dataclasses.field(default_factory=list)  # sent alongside; the receiver owns them

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"cmd": self.cmd, "service": self.service}
        if self.data is not None:
            out["data"] = self.data
        return out

    @classmethod
    def from_json(cls, data: Any, fds: list[int] | None = None) -> Request:
        """A malformed request becomes one the supervisor refuses (cmd "")."""
        if not isinstance(data, dict):
            return cls("", fds=list(fds or []))
        extra = data.get("data")
        return cls(cmd=data.get("cmd") or "", service=data.get("service"),
                   data=extra if isinstance(extra, dict) else None, fds=list(fds or []))


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


def write_message(sock: socket.socket, message: Request | Response) -> None:
    unixsock.send(sock, message.to_json(), message.fds if isinstance(message, Request) else ())


def read_request(sock: socket.socket) -> Request:
    """One request; a malformed one becomes one the supervisor refuses (cmd "")."""
    obj, fds = unixsock.recv(sock, max_fds=MAX_FDS, limit=MAX_REQUEST)
    return Request.from_json(obj, fds)


def read_response(sock: socket.socket) -> Response:
    return Response.from_json(unixsock.recv(sock)[0])


def request(run_dir: Path, req: Request, timeout: float) -> Response:
    """Send one request to the supervisor listening in `run_dir` and return its answer; OSError
    when it is not there or went away, ValueError when it answered something else."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        unixsock.connect(s, str(run_dir / SOCKET))
        write_message(s, req)
        try:
            return read_response(s)
        except unixsock.Closed:
            raise OSError("the supervisor closed the connection") from None
        except unixsock.ProtocolError as e:
            raise ValueError(f"the supervisor answered something that is not a message ({e})") from None


def serve(run_dir: Path, handle: Callable[[Request], Response], after: Callable[[Request], None]) -> socket.socket:
    """Listen on the control socket (0600; only our own uid is answered), one thread per client:
    `handle` makes the answer, `after` runs once it was sent (a stop ends the process there)."""
    path = run_dir / SOCKET
    path.unlink(missing_ok=True)
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        unixsock.bind(srv, str(path))
    finally:
        os.umask(old)
    srv.listen(16)
    threading.Thread(target=_accept, args=(srv, handle, after), daemon=True, name="control").start()
    return srv


def _accept(srv: socket.socket, handle: Callable[[Request], Response], after: Callable[[Request], None]) -> None:
    while True:
        try:
            conn, _ = srv.accept()
        except OSError:
            return
        threading.Thread(target=_serve_one, args=(conn, handle, after), daemon=True).start()


def _serve_one(conn: socket.socket, handle: Callable[[Request], Response], after: Callable[[Request], None]) -> None:
    req = None
    with conn:
        try:
            if unixsock.peer_uid(conn) != os.getuid():
                write_message(conn, Response(ok=False, error="permission denied"))
                return
            conn.settimeout(READ_TIMEOUT)
            req = read_request(conn)
            conn.settimeout(None)
            write_message(conn, handle(req))
        except unixsock.Closed:
            pass
        except unixsock.ProtocolError as e:
            _answer(conn, Response(ok=False, error=f"not a request: {e}"))
        except OSError:
            pass
        finally:
            if req is not None:
                for fd in req.fds:  # what the handler kept, it duplicated
                    try:
                        os.close(fd)
                    except OSError:
                        pass
                after(req)


def _answer(conn: socket.socket, response: Response) -> None:
    try:
        write_message(conn, response)
    except OSError:
        pass
