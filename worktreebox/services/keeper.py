"""The output keeper: a child of the supervisor that owns its services' output pipes.

Why a process of its own: when the supervisor dies (kill -9) a service must neither block on a
full pipe nor die of SIGPIPE for want of a reader; the keeper goes on writing its output to
the logs until the service closes its pipes.
"""
from __future__ import annotations

import os
import signal
import socket
import threading
import time
from pathlib import Path
from typing import Any

from worktreebox.system import unixsock
from worktreebox.telemetry.logs.writer import LogWriter, pump


class OutputKeeper:
    """A child process that owns the services' output pipes and writes them to the logs.

    Forked from the supervisor before it starts any thread. Each started service's stdout and
    stderr are handed over a socket pair (unixsock's framing, SCM_RIGHTS) and read there, one thread per
    pipe, into logs/<service>.jsonl. When the supervisor dies (kill -9) the keeper goes on
    reading until the services close their pipes, so a service never blocks on a full pipe or
    dies of SIGPIPE for want of a supervisor; it exits once its supervisor is gone and every
    pipe has ended.
    """

    def __init__(self, logs_dir: Path, redact: Any, *, close_fds: tuple[int, ...] = ()) -> None:
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        pid = os.fork()
        if pid == 0:  # the keeper
            parent.close()
            for fd in close_fds:  # the forwards' host sockets: a keeper outliving its supervisor must not hold them
                os.close(fd)
            code = 0
            try:
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                signal.signal(signal.SIGINT, signal.SIG_DFL)
                _keep(child, logs_dir, redact)
            except BaseException:
                code = 1
            os._exit(code)
        child.close()
        self.pid, self.sock = pid, parent
        self._lock = threading.Lock()

    def take(self, service: str, *pipes: Any) -> None:
        """Hand a service's pipes to the keeper and close them here."""
        pipes = tuple(p for p in pipes if p is not None)
        with self._lock:
            try:
                unixsock.send(self.sock, {"service": service}, [p.fileno() for p in pipes])
            except OSError:
                pass  # the keeper is gone: the pipes close below and the service sees EOF/EPIPE
        for p in pipes:
            p.close()

    def redact_with(self, redact_values: list[str]) -> None:
        """From now on the keeper masks these values (a sandboxed box's secrets arrive after the fork)."""
        with self._lock:
            try:
                unixsock.send(self.sock, {"redact": list(redact_values)})
            except OSError:
                pass

    def close(self, wait: float = 3.0) -> None:
        """No more pipes: the keeper drains what it has and exits (waited for, so the logs are whole)."""
        with self._lock:
            try:
                self.sock.close()
            except OSError:
                pass
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            try:
                if os.waitpid(self.pid, os.WNOHANG)[0]:
                    return
            except ChildProcessError:
                return
            time.sleep(0.01)


class _Masking:
    """The keeper's redaction, which a message may replace while its writers use it."""

    def __init__(self, redact: Any) -> None:
        self.redact = redact

    def __call__(self, text: str) -> str:
        return self.redact(text)  # type: ignore[no-any-return]


def _keep(sock: socket.socket, logs_dir: Path, redact: Any) -> None:
    from worktreebox.secrets import Redactor

    writers: dict[str, LogWriter] = {}
    threads: list[threading.Thread] = []
    redact = _Masking(redact)
    while True:
        try:
            msg, fds = unixsock.recv(sock, max_fds=4)
        except (OSError, unixsock.ProtocolError):
            break  # the supervisor closed its end, or died
        if "redact" in msg:
            redact.redact = Redactor([str(v) for v in msg["redact"] or []])
            continue
        service = str(msg.get("service") or "service")
        writer = writers.get(service) or writers.setdefault(service, LogWriter(logs_dir, service, redact))
        for fd, stream in zip(fds, ("stdout", "stderr"), strict=False):  # stderr may be merged
            t = threading.Thread(target=pump, args=(fd, stream, writer), daemon=True, name=f"pump-{service}-{stream}")
            t.start()
            threads.append(t)
    for t in threads:
        t.join()
    for w in writers.values():
        w.close()
