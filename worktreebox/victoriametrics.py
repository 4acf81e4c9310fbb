"""One VictoriaMetrics process per box: find, start, wait, stop; and a small HTTP client for it.

Plain urllib (imported when used) so that the CLI needs no HTTP library and starts fast; the
supervisor's pushes use a bare socket, because urllib drags in ssl and email (~6 MB per box).
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Any, Iterable

from .errors import UsageError, WtboxError
from .procs import pid_alive

BINARY = "victoria-metrics"
PACKAGE = "victoria-metrics"  # the Debian package that ships the binary
PID_FILE = "victoria-metrics.pid"
LOG_FILE = "victoria-metrics.log"

# Idle RSS of VictoriaMetrics 1.79.5 on our 2-core host after a push of 20 series and a query,
# 5 s idle (min-max of 2 runs; start→/health in brackets):
#   defaults                                       25.1-25.4 MB (51 ms)
#   -memory.allowedPercent=5                       19.7 MB      (42 ms)
#   -memory.allowedPercent=1                       19.0-19.2 MB (41 ms)
#   -memory.allowedBytes=16MiB                     18.7-18.8 MB (55 ms)
#   16MiB + GOMAXPROCS=1                           18.4-18.5 MB (45 ms)
#   16MiB + 1 merge worker + 2 queries + GOMAXPROCS=1  18.5-18.7 MB (33 ms)
# GOGC=50 made no difference. The caches, not the heap floor, are what the flags bound; a box
# holds a few hundred series, so the smallest caches and one OS thread lose nothing measurable.
MEMORY_FLAGS = [
    "-memory.allowedBytes=16MiB",
    "-search.maxConcurrentRequests=2",
    "-smallMergeConcurrency=1",
    "-bigMergeConcurrency=1",
]
MEMORY_ENV = {"GOMAXPROCS": "1"}
STOP_WAIT = 5.0


def find_binary() -> str:
    """Path of the victoria-metrics binary, or a WtboxError naming the package."""
    path = shutil.which(BINARY)
    if not path:
        raise WtboxError(
            f"The `{BINARY}` binary is not on PATH; install the Debian package `{PACKAGE}` "
            "(apt-get install victoria-metrics) or set `[observability] enabled = false` in wtbox.toml."
        )
    return path


def retention_flag(retention: str) -> str:
    """wtbox.toml retention ("2d", "12h") → a -retentionPeriod value; VictoriaMetrics keeps at least a day."""
    from .config import parse_duration

    hours = max(24, int(round(parse_duration(retention, where="[observability] retention") / 3600)))
    return f"{hours}h"


# ---------------------------------------------------------------- processes


def start(box_id: str, *, port: int, data_dir: Path, run_dir: Path, retention: str = "2d",
          scrape_config: Path | None = None, timeout: float = 15.0) -> int:
    """Start a detached VictoriaMetrics for a box and wait until /health answers; returns its pid."""
    binary = find_binary()
    data_dir.mkdir(parents=True, exist_ok=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    cmd = [
        binary,
        f"-httpListenAddr=127.0.0.1:{port}",
        f"-storageDataPath={data_dir}",
        f"-retentionPeriod={retention_flag(retention)}",
        "-loggerLevel=WARN",
        # Data is pushed or scraped locally: show it after 1 s instead of VictoriaMetrics' 30 s.
        "-search.latencyOffset=1s",
        # Down services show up as up == 0 and on /targets; don't fill the log every interval.
        "-promscrape.suppressScrapeErrors",
        *MEMORY_FLAGS,
    ]
    if scrape_config is not None:
        cmd.append(f"-promscrape.config={scrape_config}")
    # WTBOX_ID lets teardown find the process even when the pid file is lost; WTBOX_BOX_DIR tells
    # this home's boxes from another home's (every process of a box carries both).
    env = {**os.environ, **MEMORY_ENV, "WTBOX_ID": box_id, "WTBOX_BOX_DIR": str(data_dir.parent)}
    log_path = run_dir / LOG_FILE
    pid = spawn_detached(cmd, env=env, log_path=log_path)
    (run_dir / PID_FILE).write_text(f"{pid}\n")
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while True:
        if not pid_alive(pid):
            raise WtboxError(f"VictoriaMetrics for box {box_id} exited at start ({_last_line(log_path)}).")
        if healthy(url, timeout=0.25):
            return pid
        if time.monotonic() > deadline:
            raise WtboxError(f"VictoriaMetrics for box {box_id} did not answer {url}/health within {timeout:.0f} s.")
        time.sleep(0.005)


def spawn_detached(cmd: list[str], *, env: dict[str, str], log_path: Path) -> int:
    """Start cmd in its own session as a grandchild (output appended to log_path); returns its pid.

    A shell starts it in the background and exits, so the process is reparented to init and is
    never a zombie child of a long-lived caller (a test, `wtbox mcp`), which would make it look
    alive to everyone who waits for it to end."""
    sh = subprocess.run(["/bin/sh", "-c", '"$@" >>"$0" 2>&1 </dev/null & echo $!', str(log_path), *cmd],
                        env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                        start_new_session=True, close_fds=True, check=True, text=True)
    return int(sh.stdout.strip())


def healthy(url: str, timeout: float = 1.0) -> bool:
    """GET /health answers 200. A bare socket: polled during `new`, where importing urllib
    (ssl, email, http.client) would cost more than VictoriaMetrics takes to start."""
    from urllib.parse import urlsplit

    u = urlsplit(url)
    try:
        with socket.create_connection((u.hostname or "127.0.0.1", u.port or 80), timeout=timeout) as s:
            s.settimeout(timeout)
            s.sendall(b"GET /health HTTP/1.0\r\nHost: localhost\r\n\r\n")
            head = s.recv(32)
    except OSError:
        return False
    return head.split(b" ", 2)[1:2] == [b"200"]


def find_processes(box_id: str, names: Iterable[str] = (BINARY,), box_dir: Path | None = None) -> list:
    """Live processes with one of `names` whose environment carries WTBOX_ID=<box_id>
    (and, when given, WTBOX_BOX_DIR=<box_dir>, so another home's box is never touched)."""
    import psutil

    names = set(names)
    found = []
    for p in psutil.process_iter(["name"]):
        try:
            if p.info["name"] not in names:
                continue
            env = p.environ()
            if env.get("WTBOX_ID") != box_id:
                continue
            if box_dir is not None and env.get("WTBOX_BOX_DIR", str(box_dir)) != str(box_dir):
                continue
            found.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


def process_from_pid_file(pid_file: Path, box_id: str, names: Iterable[str] = (BINARY,)):
    """The process a pid file names, if it is still ours (guards against pid reuse)."""
    import psutil

    try:
        pid = int(pid_file.read_text().strip())
        p = psutil.Process(pid)
        if p.name() in set(names) and p.environ().get("WTBOX_ID") == box_id:
            return p
    except (OSError, ValueError, psutil.Error):
        pass
    return None


def terminate(procs: list, wait: float = STOP_WAIT) -> None:
    """SIGTERM, wait, then SIGKILL what is left (honcho-style staged stop)."""
    import psutil

    for p in procs:
        try:
            p.send_signal(signal.SIGTERM)
        except psutil.Error:
            pass
    alive = _wait_gone(procs, wait)
    for p in alive:
        try:
            p.kill()
        except psutil.Error:
            pass
    _wait_gone(alive, wait)


def _wait_gone(procs: list, timeout: float) -> list:
    """Wait until the processes are gone; a zombie counts as gone (and is reaped if it is our child).

    A process that started the store (a test, a long-lived Python API user) stays its parent; its
    exited child lingers as a zombie that psutil would wait for until the timeout."""
    import psutil

    deadline = time.monotonic() + timeout
    alive = list(procs)
    while alive:
        still = []
        for p in alive:
            try:
                os.waitpid(p.pid, os.WNOHANG)
            except ChildProcessError:
                pass
            try:
                if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                    still.append(p)
            except psutil.NoSuchProcess:
                pass
        alive = still
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.005)
    return alive


def stop(box_id: str, *, run_dir: Path, names: Iterable[str] = (BINARY,),
         pid_files: Iterable[str] = (PID_FILE,)) -> None:
    """Stop the box's processes named `names`: those in the pid files, then any found by WTBOX_ID."""
    names = tuple(names)
    procs = [p for f in pid_files if (p := process_from_pid_file(run_dir / f, box_id, names)) is not None]
    known = {p.pid for p in procs}
    procs += [q for q in find_processes(box_id, names, box_dir=run_dir.parent) if q.pid not in known]
    if procs:
        terminate(procs)
    for f in pid_files:
        (run_dir / f).unlink(missing_ok=True)


def _last_line(path: Path) -> str:
    try:
        lines = [ln for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return "no log"
    if not lines:
        return "no output"
    line = lines[-1]
    # VictoriaMetrics logs "<ts>\t<level>\t<file:line>\t<message>"; the message is what helps.
    return line.rsplit("\t", 1)[-1].strip()[:300]


# ---------------------------------------------------------------- metric definitions

_SPECS: dict[str, dict[str, Any]] | None = None


def metric_specs() -> dict[str, dict[str, Any]]:
    """observability/metrics.toml: name → {type, help, labels, ...}."""
    global _SPECS
    if _SPECS is None:
        import tomllib

        from .assets import asset_path

        _SPECS = tomllib.loads(asset_path("observability/metrics.toml").read_text())["metrics"]
    return _SPECS


def exposition(samples: Iterable[tuple[str, dict[str, str], float]], timestamp_ms: int | None = None) -> str:
    """Prometheus text exposition of (name, labels, value), with # HELP/# TYPE from metrics.toml."""
    specs = metric_specs()
    out: list[str] = []
    described: set[str] = set()
    ts = f" {timestamp_ms}" if timestamp_ms is not None else ""
    for name, labels, value in samples:
        base = _family(name, specs)
        if base in specs and base not in described:
            described.add(base)
            out.append(f"# HELP {base} {specs[base]['help']}")
            out.append(f"# TYPE {base} {specs[base]['type']}")
        lab = ",".join(f'{k}="{_escape(str(v))}"' for k, v in labels.items())
        out.append(f"{name}{{{lab}}} {_num(value)}{ts}")
    return "\n".join(out) + "\n"


def _family(name: str, specs: dict) -> str:
    for suffix in ("_bucket", "_sum", "_count"):
        if name.endswith(suffix) and name[: -len(suffix)] in specs:
            return name[: -len(suffix)]
    return name


def _escape(v: str) -> str:
    return v.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _num(v: float) -> str:
    if isinstance(v, bool):
        return "1" if v else "0"
    if isinstance(v, int):
        return str(v)
    return repr(float(v))


# ---------------------------------------------------------------- HTTP


def push_prometheus(url: str, text: str, timeout: float = 2.0) -> None:
    """POST Prometheus text to <url>/api/v1/import/prometheus over a bare socket (plain http only)."""
    from urllib.parse import urlsplit  # urllib.parse alone is light

    u = urlsplit(url)
    host, port = u.hostname or "127.0.0.1", u.port or 80
    body = text.encode()
    head = (f"POST {u.path.rstrip('/')}/api/v1/import/prometheus HTTP/1.1\r\nHost: {host}:{port}\r\n"
            f"Content-Type: text/plain\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n")
    with socket.create_connection((host, port), timeout=timeout) as s:
        s.sendall(head.encode() + body)
        status = s.recv(64).split(b" ", 2)
    if len(status) < 2 or not status[1].startswith(b"2"):
        why = b" ".join(status[1:]).decode(errors="replace").strip() or "no answer"
        raise WtboxError(f"VictoriaMetrics at {url} refused the push ({why}).")


class Client:
    """Query and push helpers for one VictoriaMetrics (instant/range query, names, import)."""

    def __init__(self, url: str, timeout: float = 10.0, box_id: str | None = None) -> None:
        self.url = url.rstrip("/")
        self.timeout = timeout
        self.box_id = box_id

    # -- reading
    def query(self, query: str, at: float | None = None) -> dict[str, Any]:
        """Instant query; returns the `data` object ({resultType, result})."""
        # An explicit millisecond time: without it VictoriaMetrics rounds "now" down to the second
        # and hides samples pushed within that second.
        at = time.time() if at is None else at
        params = {"query": query, "time": f"{at:.3f}", "nocache": "1"}
        return self._api("/api/v1/query", params)

    def query_range(self, query: str, start: float, end: float, step: float) -> dict[str, Any]:
        params = {"query": query, "start": f"{start:.3f}", "end": f"{end:.3f}", "step": f"{step:g}s", "nocache": "1"}
        return self._api("/api/v1/query_range", params)

    def metric_names(self) -> list[str]:
        return sorted(self._api("/api/v1/label/__name__/values", {}))

    # -- writing
    def push_prometheus(self, text: str) -> None:
        """Push Prometheus text exposition through /api/v1/import/prometheus."""
        self._post("/api/v1/import/prometheus", text.encode())

    def push_jsonl(self, lines: Iterable[dict[str, Any]]) -> None:
        """Push JSON lines ({"metric": {...}, "values": [...], "timestamps": [...]}) through /api/v1/import."""
        body = "".join(json.dumps(line, separators=(",", ":")) + "\n" for line in lines)
        self._post("/api/v1/import", body.encode())

    def flush(self) -> None:
        """Make everything pushed so far searchable now (instead of within ~1 s)."""
        self._post("/internal/force_flush", b"", method="GET")

    # -- plumbing
    def _post(self, path: str, body: bytes, method: str = "POST") -> None:
        import urllib.error
        import urllib.request

        req = urllib.request.Request(self.url + path, data=body if method == "POST" else None, method=method)
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as r:
                r.read()
        except urllib.error.HTTPError as e:
            raise WtboxError(f"{self._who()} rejected {path}: {_error_text(e)}.") from None
        except OSError as e:
            raise self._down(e) from None

    def _api(self, path: str, params: dict[str, str]) -> Any:
        import urllib.error
        import urllib.parse
        import urllib.request

        url = f"{self.url}{path}?{urllib.parse.urlencode(params)}"
        try:
            with urllib.request.urlopen(url, timeout=self.timeout) as r:
                doc = json.load(r)
        except urllib.error.HTTPError as e:
            # 400/422: the query itself is wrong, a user mistake (exit 2).
            if e.code in (400, 422):
                raise UsageError(f"The query was rejected: {_error_text(e)}.") from None
            raise WtboxError(f"{self._who()} answered {e.code} to {path}: {_error_text(e)}.") from None
        except OSError as e:
            raise self._down(e) from None
        if doc.get("status") != "success":
            raise UsageError(f"The query was rejected: {doc.get('error', doc)}.")
        return doc["data"]

    def _who(self) -> str:
        if self.box_id:
            return f"The metrics store of box {self.box_id} ({self.url})"
        return f"VictoriaMetrics at {self.url}"

    def _down(self, e: OSError) -> WtboxError:
        reason = getattr(e, "reason", e)
        return WtboxError(f"{self._who()} is not reachable ({reason}); is the box running?")


def _error_text(e) -> str:
    try:
        body = e.read().decode(errors="replace")
    except OSError:
        body = ""
    try:
        msg = json.loads(body).get("error") or body
    except ValueError:
        msg = body
    msg = " ".join(str(msg).split()).rstrip(".")
    return msg[:400] or f"HTTP {e.code}"
