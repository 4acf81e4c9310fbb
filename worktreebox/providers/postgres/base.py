"""The PostgreSQL server interface every database provider implements, and its connection cache.

What the database resource needs from a server: superuser connections (cached per
process), where boxes connect (`box_host`, `box_port`, `box_url`), the shared database
schema-mode boxes live in, and start/stop/status for `wtbox db`.
"""
from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from worktreebox.errors import WtboxError

if TYPE_CHECKING:
    import psycopg

    from worktreebox.context import HostContext

SUPERUSER = "postgres"
# Schema-mode boxes of the embedded cluster live in this database (keeps `postgres` clean).
SHARED_DB = "wtbox"
APP_NAME = "wtbox"  # shows wtbox's own sessions in pg_stat_activity


class _Conn:
    """One cached superuser connection with a lock, so threads of one process can share it."""

    def __init__(self, conn: psycopg.Connection) -> None:
        self.conn, self.lock, self.pid = conn, threading.Lock(), os.getpid()
        self.used_at = time.monotonic()

    def usable(self) -> bool:
        if self.pid != os.getpid() or self.conn.closed or self.conn.broken:
            return False
        if time.monotonic() - self.used_at > _PING_AFTER:
            # A long-lived process (mcp) may hold a connection across a cluster restart.
            try:
                with self.lock:
                    self.conn.execute("SELECT 1")
            except Exception:
                return False
        return True


_PING_AFTER = 0.5  # seconds idle before a reused connection is checked (~0.1 ms)
_CONNS: dict[tuple[str, str], _Conn] = {}
_CONNS_LOCK = threading.Lock()


class Server:
    """What the database resource needs from a server, embedded, external or docker."""

    application_name = APP_NAME  # in pg_stat_activity (background work names itself differently)

    provider = "server"
    box_host = "127.0.0.1"
    box_port = 0
    shared_db = SHARED_DB

    @classmethod
    def from_host(cls, host: HostContext) -> Server:
        """The provider as configured for `host` (never starts anything)."""
        raise NotImplementedError

    @classmethod
    def check(cls) -> dict[str, Any] | None:
        """`wtbox doctor`'s line for what this provider needs installed (None: nothing)."""
        return None

    def key(self) -> str:
        raise NotImplementedError

    def conninfo(self, dbname: str) -> dict[str, Any]:
        raise NotImplementedError

    def ensure_running(self) -> None:
        """Make the server reachable (the embedded cluster is started if needed)."""

    def is_running(self) -> bool:
        return True

    def stop(self) -> bool:
        """`wtbox db stop`: stop the server wtbox runs; True if it was running."""
        raise WtboxError(f"wtbox does not stop {self.describe()}.")

    def _connect(self, dbname: str) -> psycopg.Connection:
        import psycopg

        try:
            return psycopg.connect(**self.conninfo(dbname), autocommit=True, connect_timeout=10,
                                   application_name=self.application_name)
        except psycopg.OperationalError as e:
            raise WtboxError(f"Cannot connect to PostgreSQL ({self.describe()}): {first_line(e)}.") from None

    def connect(self, dbname: str | None = None) -> psycopg.Connection:
        """A new (uncached) superuser connection; the caller closes it."""
        return self._connect(dbname or self.shared_db)

    @contextlib.contextmanager
    def session(self, dbname: str | None = None) -> Iterator[psycopg.Connection]:
        """The process's cached superuser connection to `dbname` (autocommit), held exclusively."""
        dbname = dbname or self.shared_db
        key = (self.key(), dbname)
        with _CONNS_LOCK:
            cached = _CONNS.get(key)
            if cached is not None and not cached.usable():
                _CONNS.pop(key, None)
                with contextlib.suppress(Exception):
                    cached.conn.close()
                cached = None
            if cached is None:
                cached = _CONNS[key] = _Conn(self._open(dbname))
        with cached.lock:
            try:
                yield cached.conn
            finally:
                cached.used_at = time.monotonic()

    def _open(self, dbname: str) -> psycopg.Connection:
        import psycopg

        try:
            return psycopg.connect(**self.conninfo(dbname), autocommit=True, connect_timeout=10,
                                   application_name=self.application_name)
        except psycopg.OperationalError:
            self.ensure_running()
            return self._connect(dbname)

    def box_url(self, user: str, password: str, dbname: str, at: tuple[str, int] | None = None) -> str:
        """The URL a box connects with: to the server, or `at` (host, port) when the box reaches it
        through a forward of its own (a sandboxed box: 127.0.0.1:5432 inside)."""
        host, port = at or (self.box_host, self.box_port)
        return f"postgresql://{user}:{password}@{_url_host(host)}:{port}/{dbname}"

    def describe(self) -> str:
        return self.provider

    def status(self) -> dict[str, Any]:
        raise NotImplementedError


def forget_connections() -> None:
    """Close this process's cached connections (before stopping the server, and in tests)."""
    with _CONNS_LOCK:
        for c in _CONNS.values():
            with contextlib.suppress(Exception):
                c.conn.close()
        _CONNS.clear()


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def first_line(e: BaseException) -> str:
    """The first line of an exception's text, without a trailing period (for one-sentence errors)."""
    text = str(e).strip().splitlines()
    return (text[0] if text else type(e).__name__).rstrip(".")
