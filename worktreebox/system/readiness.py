"""Whether a process we started serves yet: one mechanism, on testcontainers' model.

A `Strategy` answers with one probe, `ready(timeout)`: a TCP port accepts (TcpPort), a URL
answers (HttpUrl), a command exits 0 (Command), a log file shows a line (LogLine), a process
tree itself holds a port (HoldsPort), a process lived long enough (Lived). `a & b` needs both,
in order. `wait` is the one polling loop, with the one timeout rule: each probe may take what
is left of the wait, at least PROBE_MIN and at most PROBE_MAX seconds; polls start at `poll`
and grow by half up to `poll_max`. A refused connect costs microseconds, so a short first poll
answers `new` as soon as the process listens.

The supervisor's ready checks, the metrics store, the OTLP receiver and Chromium wait through
it; containers wait through testcontainers' own public wait strategies (providers/).
"""
from __future__ import annotations

import re
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from worktreebox.system import cancel, cgroups, httpclient, procs

PROBE_MIN, PROBE_MAX = 0.2, 2.0
EXITED, TIMEOUT = "exited", "timeout"


class Strategy:
    """One readiness condition, probed once per `ready` call; after a probe that was not ready,
    `why` says what it saw (what `new` and `status` tell of a service that never became ready)."""

    why = ""

    def ready(self, timeout: float) -> bool:
        raise NotImplementedError

    def __and__(self, other: Strategy) -> Strategy:
        return AllOf(self, other)


class AllOf(Strategy):
    def __init__(self, *strategies: Strategy) -> None:
        self.strategies = strategies

    def ready(self, timeout: float) -> bool:
        for s in self.strategies:
            if not s.ready(timeout):
                self.why = s.why
                return False
        return True


class Probe(Strategy):
    """Any callable probe (timeout -> bool): a test's scripted answers, a check given from outside."""

    def __init__(self, probe: Callable[[float], bool]) -> None:
        self.probe = probe

    def ready(self, timeout: float) -> bool:
        return self.probe(timeout)


class TcpPort(Strategy):
    def __init__(self, port: int, host: str = "127.0.0.1") -> None:
        self.host, self.port = host, port

    def ready(self, timeout: float) -> bool:
        try:
            with socket.create_connection((self.host, self.port), timeout=timeout):
                return True
        except OSError as e:
            self.why = f"nothing accepts on {self.host}:{self.port} ({e.strerror or e})"
            return False


class HttpUrl(Strategy):
    """The URL answers a GET with an accepted status (one code, or a test of it; by default anything
    below 500, as a server that answers 404 is up) and, when `body` is given, a body it accepts."""

    def __init__(self, url: str, status: int | Callable[[int], bool] = lambda code: code < 500,
                 body: Callable[[bytes], bool] | None = None) -> None:
        self.url, self.body = url, body
        self.status = status if callable(status) else (lambda code: code == status)

    def ready(self, timeout: float) -> bool:
        try:
            reply = httpclient.request("GET", self.url, timeout=timeout, read_body=self.body is not None)
        except (OSError, ValueError) as e:
            self.why = f"GET {self.url}: {getattr(e, 'strerror', None) or e}"
            return False
        if not self.status(reply.status):
            self.why = f"GET {self.url} answered {reply.status}"
            return False
        if self.body is not None and not self.body(reply.body):
            self.why = f"GET {self.url} answered {reply.status} with another body than the check wants"
            return False
        return True


class Command(Strategy):
    """The command exits 0 within the probe's timeout (run in its own session, in `cgroup`);
    one that takes longer is killed: a check has nothing to clean up."""

    def __init__(self, argv: Sequence[str], *, cwd: str | None = None, env: dict[str, str] | None = None,
                 cgroup: cgroups.Leaf | None = None, what: str = "") -> None:
        self.argv, self.cwd, self.env, self.cgroup = list(argv), cwd, env, cgroup
        self.what = what or " ".join(self.argv)  # the check as written (from_spec), for `why`

    def ready(self, timeout: float) -> bool:
        try:
            proc = procs.spawn(self.argv, cwd=self.cwd, env=self.env, cgroup=self.cgroup)
        except OSError as e:
            self.why = f"the check `{self.what}` could not start: {e.strerror or e}"
            return False
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            procs.signal_group(proc.pid, signal.SIGKILL)
            proc.wait()
            self.why = f"the check `{self.what}` took longer than {timeout:g}s"
            return False
        self.why = f"the check `{self.what}` exited with code {code}"
        return code == 0


class LogLine(Strategy):
    """A line of the log file matches `pattern` (a regular expression)."""

    def __init__(self, path: Path | str, pattern: str) -> None:
        self.path, self.pattern = Path(path), re.compile(pattern, re.MULTILINE)

    def ready(self, timeout: float) -> bool:
        try:
            return self.pattern.search(self.path.read_text(errors="replace")) is not None
        except OSError:
            return False


class HoldsPort(Strategy):
    """The port is held by one of the process trees `pids()` names, not by a stranger: a check
    answered on the port proves nothing when someone else answers it. `on_stranger(pid)` hears
    of a stranger that still holds the port after a second look."""

    def __init__(self, port: int, pids: Callable[[], Iterable[int]],
                 on_stranger: Callable[[int], None] | None = None) -> None:
        self.port, self.pids, self.on_stranger = port, pids, on_stranger

    def _ours(self) -> bool:
        return any(procs.tree_listens_on(pid, self.port) for pid in self.pids())

    def ready(self, timeout: float) -> bool:
        if self._ours():
            return True
        # A listener with no visible pid (0) may be the service's socket made a moment ago, while
        # the system-wide scan ran: only a named stranger, still there after a second look, counts.
        roots = set(self.pids())
        strangers = [p for p in procs.listeners(self.port) if p and p not in roots]
        if strangers and self._ours():
            return True
        if strangers and self.on_stranger is not None:
            self.on_stranger(strangers[0])
        return False


class Lived(Strategy):
    """Ready once `grace` seconds passed since `started` (a process without a check: surviving
    its start counts)."""

    def __init__(self, started: float, grace: float, now: Callable[[], float] = time.monotonic) -> None:
        self.started, self.grace, self.now = started, grace, now

    def ready(self, timeout: float) -> bool:
        return self.now() - self.started >= self.grace


def from_spec(check: str, command: Callable[[str], Strategy]) -> Strategy:
    """A ready check as wtbox.toml writes it: http(s)://URL answers below 500, tcp:PORT or
    tcp:HOST:PORT accepts; anything else is a shell command, made into a strategy by `command`."""
    if check.startswith(("http://", "https://")):
        return HttpUrl(check)
    if check.startswith("tcp:"):
        host, _, port = check[4:].rpartition(":")
        return TcpPort(int(port), host or "127.0.0.1") if port.isdigit() else Probe(lambda timeout: False)
    strategy = command(check)
    if isinstance(strategy, Command):
        strategy.what = check  # named as wtbox.toml writes it, not by the launcher's argv
    return strategy


def connects(check: str | None) -> bool:
    """Whether a ready check connects to a port (only such a check can be answered by a stranger)."""
    return bool(check) and str(check).startswith(("tcp:", "http://", "https://"))


def wait(strategy: Strategy, timeout: float, *, alive: Callable[[], bool] = lambda: True,
         poll: float = 0.005, poll_max: float | None = None, now: Callable[[], float] = time.monotonic,
         sleep: Callable[[float], object] = cancel.sleep, on_timeout: Callable[[], None] | None = None
         ) -> str | None:
    """Probe until ready (None), until `alive()` says the process is gone first (EXITED), or
    until `timeout` seconds passed (TIMEOUT). With `on_timeout` the wait goes on after the
    timeout, which it reports once (a service may still come up, late). The pauses end early
    when the work is cancelled (system/cancel.py: a cancelled MCP `box_new`), raising Cancelled."""
    deadline = now() + timeout
    delay, reported = poll, False
    while alive():
        left = deadline - now()
        if strategy.ready(min(PROBE_MAX, max(PROBE_MIN, left))) and alive():
            return None
        if now() > deadline:
            if on_timeout is None:
                return TIMEOUT
            if not reported:
                on_timeout()
                reported = True
        sleep(delay)
        delay = min(delay * 1.5, poll_max or poll)
    return EXITED


def process_alive(pid: int) -> Callable[[], bool]:
    """alive() for wait: the process still runs (a zombie does not)."""
    return lambda: procs.pid_alive(pid)

