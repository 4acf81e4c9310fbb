"""How a tool call runs: a Host of its own, in a worker thread, cancellable, reporting progress.

A cancelled call (notifications/cancelled, or the client going away) sets an event the work
watches (system/cancel.py), and the handler waits, shielded, until the work has undone itself.
"""
from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import anyio
import anyio.from_thread
import anyio.lowlevel
import anyio.to_thread
from mcp.server.mcpserver import Context


class Opened:
    """A Host for one call (its own registry connections, closed at the end: the server runs long)."""

    def __enter__(self) -> Any:
        from worktreebox.host import Host
        from worktreebox.router.state import needs_revive

        self.host = Host()
        if needs_revive(self.host.home):  # a killed router comes back with every route, as for the CLI
            from worktreebox.resources.router import push

            push(self.host)
        return self.host

    def __exit__(self, *exc: object) -> None:
        self.host.registry.close()


async def in_thread(work: Callable[[], Any], cancel: threading.Event | None = None) -> Any:
    """Run `work` in a worker thread. If the call is cancelled: set `cancel` (the work watches it
    and undoes itself), wait, shielded, until the work has ended, then let the cancellation go on."""
    done = threading.Event()

    def body() -> Any:
        try:
            return work()
        finally:
            done.set()

    try:
        return await anyio.to_thread.run_sync(body, abandon_on_cancel=True)
    except anyio.get_cancelled_exc_class():
        if cancel is not None:
            cancel.set()
        with anyio.CancelScope(shield=True):
            while not done.is_set():
                await anyio.sleep(0.05)
        raise


def reveal(ctx: Context | None, show_secrets: bool) -> bool:
    """show_secrets is honoured only on a server started with --allow-secrets."""
    if not show_secrets:
        return False
    if ctx is None or not getattr(ctx.mcp_server, "allow_secrets", False):
        from worktreebox.errors import UsageError

        raise UsageError("show_secrets needs a server started with 'wtbox mcp --allow-secrets'; "
                         "this one masks every secret.")
    return True


class Progress:
    """A progress reporter any thread may call: each report is a notifications/progress (when
    the client asked for them); silent once the call is cancelled. It never raises.

    MCP wants the value to grow with every notification: without a value each report counts
    one; a value that would not grow (a fan-out attempt changing state while the number done
    stays the same) is nudged up a little, and reports past `total` are dropped."""

    def __init__(self, ctx: Context, cancel: threading.Event, total: float | None = None) -> None:
        self._ctx = ctx
        self._cancel = cancel
        self._token = anyio.lowlevel.current_token()  # made in the event loop's thread
        self._lock = threading.Lock()  # held while sending, so reports leave in order
        self._last = 0.0
        self.total = total

    def __call__(self, message: str, progress: float | None = None) -> None:
        if self._cancel.is_set():
            return
        with self._lock:
            n = self._last + 1 if progress is None else max(progress, self._last + 0.001)
            if self.total is not None and n > self.total:
                return
            self._last = n
            try:
                anyio.from_thread.run(self._ctx.report_progress, n, self.total, message, token=self._token)
            except Exception:  # a client that went away must not break the work
                pass
