"""Work a command asks for as it ends, for the commands after it (the next spare sandbox of `new`).

A command served by its home's CLI server (cli/server.py) has answered its caller before any of it
runs: the server's child sends the exit code, lets go of the caller's terminal and pipes, then does
it. Anywhere else (a command run in process, `wtbox mcp`, a test) it runs on a thread beside the rest
of the block that asked, and the block ends once it is done: nothing outlives its caller's call.
"""
from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator


class _Served:
    after_reply: list[Callable[[], object]] | None = None  # a served command's, once `serving()` was called


_served = _Served()


def serving() -> None:
    """This process is a served command: what it asks for runs after its reply (`run_after_reply`)."""
    _served.after_reply = []


@contextlib.contextmanager
def beside(work: Callable[[], object]) -> Iterator[None]:
    """`work` after the served command's reply, else on a thread for the length of the block. `work`
    says what went wrong itself: it must not raise."""
    if _served.after_reply is not None:
        _served.after_reply.append(work)
        yield
        return
    thread = threading.Thread(target=work, name="wtbox-afterwards", daemon=True)
    thread.start()
    try:
        yield
    finally:
        thread.join()


def run_after_reply() -> None:
    """What the served command asked for, in order (cli/server.py, once the caller has its answer)."""
    while _served.after_reply:
        _served.after_reply.pop(0)()
