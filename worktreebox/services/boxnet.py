"""A sandboxed box's forwards, as its supervisor hosts them (the supervisor runs in the box's network).

Each declared port, the metrics store, the OTLP endpoint and the browser's DevTools port: the host's
127.0.0.1:<leased> (a socket bound by whoever started the supervisor, inherited) -> the box's
127.0.0.1:<canonical>. The database: the box's 127.0.0.1:5432 (bound here, inside) -> the host's
PostgreSQL through slirp4netns's 10.0.2.2, on marked sockets (the only packets the box's firewall
lets reach the host). `wtbox expose` and a browse's cold Chromium add a forward on a host socket
sent over the control socket. `wtbox net` changes a forward's faults (services/forwards.py); the
report goes into the supervisor's state file, which `status` reads.
"""
from __future__ import annotations

import os
import socket
from typing import TYPE_CHECKING, Any

from worktreebox.errors import UsageError
from worktreebox.services import control
from worktreebox.services.spec import DB_MARK, ForwardSpec
from worktreebox.system import setns

if TYPE_CHECKING:
    from worktreebox.services.control import Request
    from worktreebox.services.forwards import ForwardsThread


class BoxNet:
    """The forwards of one box: started with the supervisor's payload, changed by control requests."""

    def __init__(self, specs: list[ForwardSpec], faults: dict[str, dict[str, Any]] | None = None) -> None:
        self.specs = list(specs)
        self.initial = dict(faults or {})
        self.thread: ForwardsThread | None = None

    @property
    def inherited_fds(self) -> tuple[int, ...]:
        return tuple(s.fd for s in self.specs if s.fd is not None)

    def start(self) -> None:
        """The forwards' loop and every forward of the payload (asyncio is imported only here)."""
        from worktreebox.services.forwards import ForwardsThread

        self.thread = ForwardsThread()
        for spec in self.specs:
            self.add(spec, spec.fd)

    def add(self, spec: ForwardSpec, fd: int | None) -> dict[str, Any]:
        """One forward: on the host socket `fd` (now ours), or on `spec.listen` bound here."""
        from worktreebox.services.forwards import Faults

        if self.thread is None:
            self.start()
        assert self.thread is not None
        sock = socket.socket(fileno=fd) if fd is not None else _listen(spec)
        faults = self.initial.get(spec.name) or self.initial.get("*")
        try:
            return self.thread.add(spec.name, sock, spec.target, mark=DB_MARK if spec.mark else None,
                                   faults=Faults.from_json(faults) if faults else None)
        except BaseException:
            sock.close()
            raise

    def remove(self, name: str) -> None:
        if self.thread is not None:
            self.thread.remove(name)

    def set_faults(self, target: str | None, data: dict[str, Any]) -> dict[str, Any]:
        """`wtbox net`: {"reset": true}, or the faults to change (Faults.to_json's keys; the others
        stay) of one forward or all."""
        if self.thread is None:
            raise UsageError("This box has no forwards to put faults on.")
        if data.get("reset"):
            return self.thread.reset(target)
        scale = {"delay_ms": ("delay", 1000), "jitter_ms": ("jitter", 1000), "loss": ("loss", 1), "down": ("down", 1)}
        changes = {scale[k][0]: (v if k == "down" else float(v) / scale[k][1]) for k, v in data.items() if k in scale}
        return self.thread.set_faults(target, **changes)

    def report(self) -> dict[str, Any]:
        return self.thread.report() if self.thread is not None else {}

    def handle(self, req: Request) -> None:
        """The supervisor's requests about them: `net` (faults), `forward` (one more, on the host
        socket sent along), `unforward`."""
        data = req.data or {}
        if req.cmd == control.NET:
            self.set_faults(req.service, data)
        elif req.cmd == control.FORWARD:
            self.add(ForwardSpec.from_json(data), os.dup(req.fds[0]) if req.fds else None)
        else:
            self.remove(str(data.get("name")))

    def stop(self) -> None:
        if self.thread is not None:
            self.thread.stop()
            self.thread = None


def _listen(spec: ForwardSpec) -> socket.socket:
    """A listening socket of the box's own (the supervisor is in its network namespace)."""
    if spec.listen is None:
        raise UsageError(f"The forward {spec.name!r} has neither a host socket nor an address to listen on.")
    sock = socket.socket(socket.AF_INET6 if ":" in spec.listen[0] else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(spec.listen)
        sock.listen(128)
    except OSError:
        sock.close()
        raise
    return sock


def enter_network(path: str) -> None:
    """Move this process, while it has one thread, into the network namespace at `path`. The
    supervisor does it when it was started before the box's network existed (client.start_supervisor's
    `later`)."""
    setns.join(path, setns.CLONE_NEWNET)
