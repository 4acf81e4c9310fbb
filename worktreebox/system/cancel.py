"""Cancelling work that runs in a thread (MCP's box_new) the way Ctrl-C cancels a command.

Ctrl-C raises KeyboardInterrupt wherever the main thread is, and `Host.new` rolls back. A worker
thread gets no signal: its caller runs the work `watching(event)`, and the places where creating a
box waits see that event through the context: `check()` between steps, `sleep()` in polling loops,
`wait()` and `run()` for children (a child is stopped through procs' stop policy: SIGTERM to its
group, wait, SIGKILL). A cancelled wait raises `Cancelled`, a KeyboardInterrupt, so whatever handles
Ctrl-C handles it the same way. Without a watched event each of them is the plain call.

Threads started for the work see the event when they run in a copy of the starter's context
(`contextvars.copy_context().run`, as Host's parallel stages do).
"""
from __future__ import annotations

import contextlib
import contextvars
import subprocess
import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any

POLL = 0.05  # how often a wait looks at the event: a cancelled child is stopped within this

_watched: contextvars.ContextVar[threading.Event | None] = contextvars.ContextVar("wtbox_cancel", default=None)


class Cancelled(KeyboardInterrupt):
    """The watched event was set: unwind as Ctrl-C does."""


@contextlib.contextmanager
def watching(event: threading.Event) -> Iterator[threading.Event]:
    token = _watched.set(event)
    try:
        yield event
    finally:
        _watched.reset(token)


@contextlib.contextmanager
def unwatched() -> Iterator[None]:
    """No watched event inside: for undoing what a cancelled piece of work made. The event stays
    set, and a clean-up whose git or stop took longer than one poll was cancelled half-way, leaving
    the half-made box behind."""
    token = _watched.set(None)
    try:
        yield
    finally:
        _watched.reset(token)


def cancelled() -> bool:
    event = _watched.get()
    return event is not None and event.is_set()


def check() -> None:
    if cancelled():
        raise Cancelled()


def sleep(seconds: float) -> None:
    """time.sleep that ends early, raising Cancelled, when the watched event is set."""
    event = _watched.get()
    if event is None:
        time.sleep(seconds)
    elif event.wait(seconds):
        raise Cancelled()


def wait(proc: subprocess.Popen, timeout: float | None = None) -> int:
    """proc.wait(timeout); when the watched event is set, stop proc's group and raise Cancelled."""
    event = _watched.get()
    if event is None:
        return proc.wait(timeout=timeout)
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        step = POLL if deadline is None else max(0.0, min(POLL, deadline - time.monotonic()))
        try:
            return proc.wait(timeout=step)
        except subprocess.TimeoutExpired:
            if event.is_set():
                from worktreebox.system import procs

                procs.stop_group(proc)
                raise Cancelled() from None
            if deadline is not None and time.monotonic() >= deadline:
                raise


def run(argv: Sequence[str], *, input: str | bytes | None = None, timeout: float | None = None,
        **popen: Any) -> subprocess.CompletedProcess:
    """subprocess.run (capture_output, text, env, cwd, ... as it takes them) that kills the child and
    raises Cancelled when the watched event is set."""
    event = _watched.get()
    if event is None:
        return subprocess.run(argv, input=input, timeout=timeout, **popen)
    if popen.pop("capture_output", False):
        popen["stdout"] = popen["stderr"] = subprocess.PIPE
    if input is not None:
        popen["stdin"] = subprocess.PIPE
    deadline = None if timeout is None else time.monotonic() + timeout
    with subprocess.Popen(list(argv), **popen) as proc:
        pending = input
        while True:
            try:
                out, err = proc.communicate(pending, timeout=POLL)
                break
            except subprocess.TimeoutExpired:
                pending = None  # communicate() goes on sending what it was given first
                expired = deadline is not None and time.monotonic() >= deadline
                if event.is_set() or expired:
                    proc.kill()  # as subprocess.run does when it is interrupted
                    proc.communicate()
                    if expired and not event.is_set():
                        raise subprocess.TimeoutExpired(list(argv), timeout or 0) from None
                    raise Cancelled() from None
    return subprocess.CompletedProcess(list(argv), proc.returncode, out, err)
