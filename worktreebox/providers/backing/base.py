"""The backing-service runtime interface: one kind (Redis, RabbitMQ, ...) on one runtime (native, docker).

A runtime is constructed per host and told the box per call. `start` launches the box's
instance of one [backing.<name>] on its leased ports and returns without waiting (a box's
services start together and are waited for together, resources/backing.py); `ready` says
whether it serves yet; `facts` is what {{ backing.<name>.* }} shows. Whatever it starts it
records under box.data["backing"][name] first, so a failed `new` still destroys it.
"""
from __future__ import annotations

import socket
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from worktreebox.box import Box
    from worktreebox.config.backing import BackingConfig
    from worktreebox.context import HostContext

LOOPBACK = "127.0.0.1"


class Runtime:
    """How one kind of backing service runs on this host."""

    runtime = "runtime"
    kind = "kind"
    processes: tuple[str, ...] = ()  # kernel names of the host processes it starts (WTBOX_ID in their env)

    def __init__(self, host: HostContext, kind: str | None = None) -> None:
        self.host = host
        self.kind = kind or self.kind  # one docker runtime serves every kind

    @classmethod
    def unavailable(cls, image: str | None = None) -> str | None:
        """Why this runtime cannot run the kind here (one sentence), or None when it can."""
        return None

    @classmethod
    def check(cls) -> dict[str, Any] | None:
        """`wtbox doctor`'s line for what this runtime needs installed (None: nothing to say)."""
        return None

    @classmethod
    def describe(cls) -> str:
        """What serves the kind here, for `doctor` and `init --explain` ("redis-server 7.0.15")."""
        return cls.runtime

    def start(self, box: Box, cfg: BackingConfig, ports: dict[str, int]) -> Any:
        """Launch the box's instance (not waiting for it); returns a handle `ready` and `failed` take."""
        raise NotImplementedError

    def ready(self, handle: Any, port: int) -> bool:
        """True once the instance answers its protocol on `port` (see PROBES)."""
        return probe(self.kind, port)

    def failed(self, handle: Any) -> str | None:
        """Why the instance stopped before it was ready ("exited: <last line>"), or None while it lives."""
        return None

    def facts(self, box: Box, cfg: BackingConfig, ports: dict[str, int]) -> dict[str, Any]:
        """{{ backing.<name>.* }}: url, host, port and the kind's own (credentials of a local sink)."""
        from worktreebox.config.backing import KINDS

        port = ports[cfg.name]
        return {"url": f"{KINDS[cfg.kind].scheme}://{LOOPBACK}:{port}", "host": LOOPBACK, "port": port,
                "kind": cfg.kind, "image": cfg.image, "runtime": self.runtime, "canonical_port": cfg.port}

    def remove(self, box: Box) -> None:
        """Remove what outlives the processes (containers); idempotent."""

    def discover(self) -> set[str]:
        """Box ids that own such a thing (beyond processes and the box dir) right now."""
        return set()


# kind -> (what to send, how the answer starts): the protocol's own first words, not a bare TCP
# accept, because docker's port proxy accepts before the container listens, and a Redis still
# loading accepts but answers -LOADING.
PROBES: dict[str, tuple[bytes, bytes]] = {
    "redis": (b"PING\r\n", b"+PONG"),
    "memcached": (b"version\r\n", b"VERSION"),
    "rabbitmq": (b"AMQP\x00\x00\x09\x01", b"\x01\x00\x00"),  # a connection.start method frame on channel 0
    "smtp": (b"", b"220"),
    "s3": (b"GET / HTTP/1.0\r\nHost: localhost\r\n\r\n", b"HTTP/"),
}


def probe(kind: str, port: int, host: str = LOOPBACK, timeout: float = 0.5) -> bool:
    """The service on host:port answers the kind's probe (a refused connect costs microseconds)."""
    send, expect = PROBES.get(kind, (b"", b""))
    try:
        with socket.create_connection((host, port), timeout=timeout) as s:
            if send:
                s.sendall(send)
            got = b""
            while len(got) < len(expect):
                chunk = s.recv(256)
                if not chunk:
                    return False
                got += chunk
            return got.startswith(expect)
    except OSError:
        return False
