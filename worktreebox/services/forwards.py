"""Forwards: a box's ports as reached from outside it, and the faults `wtbox net` injects into them.

A forward accepts on a listening socket it is given (bound by root in the host's network
namespace before the box's supervisor was started in the box's: the supervisor inherits it)
and connects each client to a target inside the box (127.0.0.1:<canonical port>), or, for the
box's database, from the box's 127.0.0.1:5432 to the host's PostgreSQL through slirp4netns's
10.0.2.2 (its sockets marked: the box's firewall lets only marked packets reach the host).
Bytes are copied chunk by chunk with asyncio streams; each target has a fault state that can
change while connections are open:

- delay D, jitter J: every chunk waits D/2 ± J/2 in each direction, so one request/response
  exchange takes D longer (order is kept: a chunk never overtakes the one before it);
- loss p: a chunk is lost with probability p and, as TCP would resend it, delivered one
  retransmission timeout later (200 ms, Linux's minimum, doubling when the resend is lost too);
  what follows it waits behind it, as TCP's in-order delivery makes it;
- down: open connections are cut (reset) and new ones reset as soon as they arrive; the
  listening socket stays, so `--reset` brings the target back on the same port.
Why loss lives here rather than as nftables `numgen` drops on the box's loopback: one
mechanism and one report for every fault of a forward, changed atomically in process, the same
on every kernel, and testable with a seeded generator; the cost is that loss is modelled as the
stall TCP shows its application, not as dropped packets (outbound traffic, which passes no
forward, gets real drops from the box's firewall).

Measured (2 cores, loaded): a forward adds ~0.75 ms p50 to a new connection's request.
`Forwards` runs in an asyncio loop; `ForwardsThread` hosts one in a thread of its own for the
thread-based supervisor. Idle, it waits in epoll and wakes for nothing.
"""
from __future__ import annotations

import dataclasses
import random
import socket
import struct
import sys
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

from worktreebox.errors import UsageError

# asyncio imports ssl for TLS streams, which a forward never opens: OpenSSL mapped and _ssl's state
# cost every sandboxed box's supervisor ~5 MB RSS (22.6 -> 18.1 MB measured, one box). So asyncio is
# imported with ssl hidden; ssl itself stays importable (an https:// ready check imports it).
_HIDE_SSL = "ssl" not in sys.modules
if _HIDE_SSL:
    sys.modules["ssl"] = None  # type: ignore[assignment]  # None there: `import ssl` raises ImportError
try:
    import asyncio
finally:
    if _HIDE_SSL and sys.modules.get("ssl", False) is None:
        del sys.modules["ssl"]

CHUNK = 64 * 1024
QUEUED_CHUNKS = 64  # per direction: a delayed fast sender holds at most 4 MiB before TCP pushes back
RTO, RTO_MAX = 0.2, 3.2  # seconds: one lost segment's retransmission timeout, doubling per loss


@dataclasses.dataclass(frozen=True)
class Faults:
    """What `wtbox net` has injected into one target."""

    delay: float = 0.0  # seconds added to a request/response exchange
    jitter: float = 0.0  # seconds either side of the delay
    loss: float = 0.0  # 0..1 of chunks
    down: bool = False

    def __post_init__(self) -> None:
        if self.delay < 0 or self.jitter < 0:
            raise UsageError("A delay and its jitter cannot be negative.")
        if not 0 <= self.loss < 1:
            raise UsageError(f"Loss is a share of traffic from 0 up to (not including) 100%, not {self.loss:.0%}.")

    @property
    def active(self) -> bool:
        return self != Faults()

    def hold(self, rng: random.Random) -> float:
        """Seconds one chunk waits in one direction."""
        wait = self.delay / 2 + (rng.uniform(-self.jitter, self.jitter) / 2 if self.jitter else 0.0)
        timeout = RTO
        while self.loss and rng.random() < self.loss:
            wait += timeout
            timeout = min(timeout * 2, RTO_MAX)
        return max(wait, 0.0)

    def to_json(self) -> dict[str, Any]:
        return {"delay_ms": round(self.delay * 1000, 3), "jitter_ms": round(self.jitter * 1000, 3),
                "loss": self.loss, "down": self.down}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Faults:
        return cls(delay=float(data.get("delay_ms") or 0) / 1000, jitter=float(data.get("jitter_ms") or 0) / 1000,
                   loss=float(data.get("loss") or 0), down=bool(data.get("down")))


@dataclasses.dataclass
class Forward:
    """One listening socket and the target its connections go to."""

    name: str
    target: tuple[str, int]
    listen: tuple[str, int]
    faults: Faults = Faults()
    mark: int | None = None  # SO_MARK of the sockets to the target (needs CAP_NET_ADMIN in their namespace)
    served: int = 0
    links: set[Link] = dataclasses.field(default_factory=set)
    server: asyncio.Server | None = None

    def to_json(self) -> dict[str, Any]:
        return {"target": f"{self.target[0]}:{self.target[1]}", "listen": f"{self.listen[0]}:{self.listen[1]}",
                "faults": self.faults.to_json(), "open": len(self.links), "served": self.served}


@dataclasses.dataclass(eq=False)
class Link:
    """One client connection and its connection to the target."""

    client: asyncio.StreamWriter
    upstream: asyncio.StreamWriter | None = None
    task: asyncio.Task | None = None

    def reset(self) -> None:
        for w in (self.client, self.upstream):
            if w is not None:
                _reset(w)


class Forwards:
    """Every forward of one box, in one asyncio loop."""

    def __init__(self, *, rng: random.Random | None = None) -> None:
        self.rng = rng or random.Random()
        self.forwards: dict[str, Forward] = {}

    async def add(self, name: str, sock: socket.socket, target: tuple[str, int], *, mark: int | None = None,
                  faults: Faults | None = None) -> Forward:
        """Start accepting on `sock` (already bound and listening) for connections to `target`."""
        if name in self.forwards:
            raise UsageError(f"There is already a forward named {name!r}.")
        sock.setblocking(False)
        fwd = Forward(name, target, sock.getsockname()[:2], faults or Faults(), mark=mark)
        fwd.server = await asyncio.start_server(lambda r, w: self._serve(fwd, r, w), sock=sock, limit=CHUNK)
        self.forwards[name] = fwd
        return fwd

    async def remove(self, name: str) -> None:
        """Stop one forward: its listening socket closed, its connections cut."""
        fwd = self.forwards.pop(name, None)
        if fwd is not None:
            await _close(fwd)

    def set_faults(self, name: str | None = None, **changes: Any) -> dict[str, Any]:
        """Change the faults of one target (or all, name None) from here on; open connections
        follow at once, and `down` cuts them. Returns the report."""
        for fwd in self._named(name):
            fwd.faults = dataclasses.replace(fwd.faults, **changes)
            if fwd.faults.down:
                for link in list(fwd.links):
                    link.reset()
        return self.report()

    def reset(self, name: str | None = None) -> dict[str, Any]:
        """No faults on one target (or all)."""
        for fwd in self._named(name):
            fwd.faults = Faults()
        return self.report()

    def report(self) -> dict[str, Any]:
        """Every forward: target, listening address, its faults, open and served connections."""
        return {name: fwd.to_json() for name, fwd in sorted(self.forwards.items())}

    def _named(self, name: str | None) -> list[Forward]:
        if name is None:
            return list(self.forwards.values())
        if name not in self.forwards:
            known = ", ".join(sorted(self.forwards)) or "none"
            raise UsageError(f"No forward named {name!r}; this box has: {known}.")
        return [self.forwards[name]]

    async def close(self) -> None:
        """Stop listening, cut every open connection and wait until their tasks are done."""
        await asyncio.gather(*(_close(fwd) for fwd in self.forwards.values()))
        self.forwards.clear()

    # -- one connection
    async def _serve(self, fwd: Forward, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        link = Link(writer, task=asyncio.current_task())
        if fwd.faults.down:
            link.reset()
            return
        fwd.links.add(link)
        fwd.served += 1
        try:
            try:
                up_reader, link.upstream = await _connect(fwd)
            except OSError:
                link.reset()  # the target is not there: the client sees what it would see without us
                return
            async with asyncio.TaskGroup() as pipes:  # one side failing ends the other
                pipes.create_task(self._pipe(fwd, reader, link.upstream))
                pipes.create_task(self._pipe(fwd, up_reader, writer))
        except* (ConnectionError, OSError):
            link.reset()
        finally:
            fwd.links.discard(link)
            for w in (writer, link.upstream):
                if w is not None and not w.is_closing():
                    w.close()

    async def _pipe(self, fwd: Forward, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Copy one direction, each chunk held as the target's faults say (in order)."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue(QUEUED_CHUNKS)
        deliver = asyncio.create_task(_deliver(queue, writer))
        due = 0.0
        try:
            while True:
                data = await reader.read(CHUNK)
                hold = fwd.faults.hold(self.rng) if fwd.faults.active else 0.0
                due = max(due, loop.time() + hold)
                await queue.put((due, data))
                if not data:
                    break
            await deliver
        finally:
            deliver.cancel()


async def _close(fwd: Forward) -> None:
    if fwd.server is not None:
        fwd.server.close()
    tasks = []
    for link in list(fwd.links):
        link.reset()
        if link.task is not None:
            link.task.cancel()
            tasks.append(link.task)
    await asyncio.gather(*tasks, return_exceptions=True)


async def _connect(fwd: Forward) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A connection to the forward's target; marked when the forward says so."""
    if fwd.mark is None:
        return await asyncio.open_connection(*fwd.target, limit=CHUNK)
    family = socket.AF_INET6 if ":" in fwd.target[0] else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, fwd.mark)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, fwd.target)
    except BaseException:
        sock.close()
        raise
    return await asyncio.open_connection(sock=sock, limit=CHUNK)


async def _deliver(queue: asyncio.Queue[tuple[float, bytes]], writer: asyncio.StreamWriter) -> None:
    loop = asyncio.get_running_loop()
    while True:
        due, data = await queue.get()
        wait = due - loop.time()
        if wait > 0:
            await asyncio.sleep(wait)
        if not data:
            if writer.can_write_eof():
                writer.write_eof()  # half-close, as the sender did
            return
        writer.write(data)
        await writer.drain()


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with a reset (RST), not a polite FIN: what a cut connection looks like to its peer."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
    writer.transport.abort()


class ForwardsThread:
    """A `Forwards` in a loop of its own thread; every method may be called from any thread."""

    def __init__(self, *, rng: random.Random | None = None) -> None:
        self.forwards = Forwards(rng=rng)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="forwards", daemon=True)
        self.thread.start()

    def _call(self, fn: Callable[[], Any]) -> Any:
        async def run() -> Any:
            result = fn()
            return await result if asyncio.iscoroutine(result) else result

        future: Future = asyncio.run_coroutine_threadsafe(run(), self.loop)
        return future.result()

    def add(self, name: str, sock: socket.socket, target: tuple[str, int], *, mark: int | None = None,
            faults: Faults | None = None) -> dict[str, Any]:
        return self._call(lambda: self.forwards.add(name, sock, target, mark=mark, faults=faults)).to_json()

    def remove(self, name: str) -> None:
        self._call(lambda: self.forwards.remove(name))

    def set_faults(self, name: str | None = None, **changes: Any) -> dict[str, Any]:
        return self._call(lambda: self.forwards.set_faults(name, **changes))

    def reset(self, name: str | None = None) -> dict[str, Any]:
        return self._call(lambda: self.forwards.reset(name))

    def report(self) -> dict[str, Any]:
        return self._call(self.forwards.report)

    def stop(self) -> None:
        self._call(self.forwards.close)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join()
        self.loop.close()


# ---------------------------------------------------------------- standalone

def main(argv: list[str] | None = None) -> None:
    """`python -m worktreebox.services.forwards FD:NAME:HOST:PORT...`: serve inherited listening
    sockets until SIGTERM (a box's forwards without its supervisor; e.g. started with
    `nsenter -t <holder> -n` so that HOST:PORT is the box's own)."""
    import signal
    import sys

    specs = [_parse(arg) for arg in (sys.argv[1:] if argv is None else argv)]

    async def serve() -> None:
        forwards = Forwards()
        for fd, name, target in specs:
            await forwards.add(name, socket.socket(fileno=fd), target)
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        await stop.wait()
        await forwards.close()

    asyncio.run(serve())


def _parse(arg: str) -> tuple[int, str, tuple[str, int]]:
    fd, name, host, port = arg.split(":")
    return int(fd), name, (host, int(port))


if __name__ == "__main__":
    main()
