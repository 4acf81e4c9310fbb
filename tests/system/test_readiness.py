"""The one readiness mechanism (system/readiness.py): each strategy against the real thing it
probes (a socket, an HTTP server, a command, a file, a process), and the polling loop's rules
with a scripted clock."""
from __future__ import annotations

import http.server
import socket
import subprocess
import sys
import threading

import pytest

from worktreebox.system import readiness


@pytest.fixture
def listener():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def http_server():
    """A real HTTP server answering GET /<code> with that status and a body naming it."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            code = int(self.path.strip("/") or 200)
            body = f"status {code}".encode()
            self.send_response(code)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()
    srv.server_close()


def test_tcp_port(listener):
    assert readiness.TcpPort(listener).ready(1.0)
    assert not readiness.TcpPort(free_port()).ready(1.0)


@pytest.mark.parametrize("path, status, body, ready", [
    ("/200", None, None, True),
    ("/404", None, None, True),  # a server that answers 404 is up
    ("/503", None, None, False),
    ("/404", 200, None, False),
    ("/200", 200, b"status 200", True),
    ("/200", 200, b"OK", False),  # somebody answered, but not with what ours says
])
def test_http_url(http_server, path, status, body, ready):
    kw = {} if status is None else {"status": status}
    if body is not None:
        kw["body"] = lambda b, want=body: b.strip() == want
    assert readiness.HttpUrl(http_server + path, **kw).ready(1.0) is ready


def test_http_url_that_nothing_answers():
    assert not readiness.HttpUrl(f"http://127.0.0.1:{free_port()}/").ready(1.0)


def test_a_probe_that_fails_says_what_it_saw(http_server):
    """What `new` and `status` say of a service that never became ready: not only "not ready after
    60s" but what its check last saw (a server answering 501 to the check's GET looked like a hang)."""
    url = http_server + "/501"
    check = readiness.HttpUrl(url)
    assert not check.ready(1.0) and check.why == f"GET {url} answered 501"
    port = free_port()
    check = readiness.from_spec(f"tcp:{port}", lambda cmd: readiness.Command(["sh", "-c", cmd]))
    assert not check.ready(1.0) and check.why.startswith(f"nothing accepts on 127.0.0.1:{port}")
    check = readiness.from_spec("exit 3", lambda cmd: readiness.Command(["sh", "-c", cmd]))
    assert not check.ready(1.0) and check.why == "the check `exit 3` exited with code 3"
    both = readiness.HttpUrl(http_server + "/200") & readiness.HttpUrl(url)
    assert not both.ready(1.0) and both.why == f"GET {url} answered 501"
    assert readiness.HttpUrl(http_server + "/200").why == ""


@pytest.mark.parametrize("argv, ready", [(["true"], True), (["false"], False), (["/no/such/command"], False),
                                         (["sleep", "5"], False)])
def test_command(argv, ready):
    assert readiness.Command(argv).ready(0.3) is ready


def test_log_line(tmp_path):
    log = tmp_path / "app.log"
    strategy = readiness.LogLine(log, r"^listening on \d+$")
    assert not strategy.ready(0.1)  # no file yet
    log.write_text("starting\nlistening on port\n")
    assert not strategy.ready(0.1)
    log.write_text("starting\nlistening on 8080\n")
    assert strategy.ready(0.1)


def test_holds_port_tells_its_own_process_from_a_stranger(listener):
    """The port answers either way; only whose process tree listens tells them apart."""
    import os

    strangers: list[int] = []
    assert readiness.HoldsPort(listener, lambda: [os.getpid()], strangers.append).ready(1.0)
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        assert not readiness.HoldsPort(listener, lambda: [child.pid], strangers.append).ready(1.0)
        assert strangers == [os.getpid()]
    finally:
        child.kill()
        child.wait()


def test_all_of_stops_at_the_first_that_is_not_ready():
    asked = []

    def probe(name, answer):
        return readiness.Probe(lambda timeout: asked.append(name) or answer)

    assert not (probe("a", True) & probe("b", False) & probe("c", True)).ready(1.0)
    assert asked == ["a", "b"]


@pytest.mark.parametrize("check, kind", [
    ("http://127.0.0.1:1/health", readiness.HttpUrl), ("https://x/", readiness.HttpUrl),
    ("tcp:5432", readiness.TcpPort), ("tcp:10.0.0.1:80", readiness.TcpPort),
    ("tcp:nope", readiness.Probe), ("pg_isready -q", readiness.Command),
])
def test_from_spec(check, kind):
    strategy = readiness.from_spec(check, lambda cmd: readiness.Command(["sh", "-c", cmd]))
    assert isinstance(strategy, kind)
    assert readiness.connects(check) is (kind is not readiness.Command)


class Script:
    """A clock that sleeping advances, and a probe that answers from a list (recording its timeouts)."""

    def __init__(self, answers):
        self.t, self.answers, self.timeouts, self.sleeps = 0.0, list(answers), [], []

    def now(self):
        return self.t

    def sleep(self, s):
        self.sleeps.append(round(s, 4))
        self.t += s

    def probe(self, timeout):
        self.timeouts.append(round(timeout, 3))
        self.t += 0.01
        return self.answers.pop(0) if self.answers else False


def test_wait_polls_with_growing_pauses_until_ready():
    s = Script([False, False, False, True])
    assert readiness.wait(readiness.Probe(s.probe), 10, now=s.now, sleep=s.sleep, poll=0.02, poll_max=0.05) is None
    assert s.sleeps == [0.02, 0.03, 0.045]


def test_wait_gives_each_probe_what_is_left_within_bounds():
    s = Script([])
    why = readiness.wait(readiness.Probe(s.probe), 3.0, now=s.now, sleep=s.sleep, poll=0.5)
    assert why == readiness.TIMEOUT
    assert s.timeouts[0] == readiness.PROBE_MAX and s.timeouts[-1] == readiness.PROBE_MIN
    assert all(readiness.PROBE_MIN <= t <= readiness.PROBE_MAX for t in s.timeouts)


def test_wait_ends_when_the_process_does():
    s = Script([])
    alive = iter([True, True, False])
    assert readiness.wait(readiness.Probe(s.probe), 10, alive=lambda: next(alive), now=s.now,
                          sleep=s.sleep) == readiness.EXITED
    assert len(s.timeouts) == 2


def test_ready_counts_only_while_the_process_lives():
    s = Script([True])
    alive = iter([True, False, False])  # it answered, and died right after
    assert readiness.wait(readiness.Probe(s.probe), 10, alive=lambda: next(alive), now=s.now,
                          sleep=s.sleep) == readiness.EXITED


def test_on_timeout_reports_once_and_waits_on():
    s = Script([False] * 30 + [True])
    late = []
    assert readiness.wait(readiness.Probe(s.probe), 0.5, now=s.now, sleep=s.sleep, poll=0.05,
                          on_timeout=lambda: late.append(s.t)) is None
    assert len(late) == 1 and late[0] > 0.5


def test_lived():
    s = Script([])
    lived = readiness.Lived(started=0.0, grace=0.2, now=s.now)
    assert not lived.ready(1)
    s.t = 0.25
    assert lived.ready(1)
