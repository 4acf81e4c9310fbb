"""The per-box supervisor: `python -m worktreebox.supervisor <home> <box_id>`.

Like honcho, three parts: a `Service` is what runs (one process group, its output
pumped into a LogWriter), the `Supervisor` coordinates (dependency order, readiness,
restarts with backoff, control socket, state file), and `worktreebox.logs` writes.

It gets the rendered services and the `--secret` values on stdin (from the services
resource; they live only in memory and in the services' environment), and the box env
from the box env file. Stopping is staged: SIGTERM the group, wait, SIGKILL.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from .logs import EventLog, LogWriter, pump

KILL_WAIT = float(os.environ.get("WTBOX_KILL_WAIT", "5"))  # SIGTERM → SIGKILL grace (tests shorten it)
BACKOFF_START, BACKOFF_CAP = 0.5, 30.0
STABLE_AFTER = 30.0  # a service that ran this long ready starts its backoff over
NO_CHECK_GRACE = 0.2  # without a ready check, surviving this long counts as ready
COLLECT_EVERY = 5.0
SOCKET = "ctl.sock"
STOPPED, STARTING, READY, BACKOFF, EXITED, FAILED = "stopped", "starting", "ready", "backoff", "exited", "failed"


def _now() -> float:
    return time.time()


class Service:
    """One service: its process group, readiness, restart policy."""

    def __init__(self, sup: "Supervisor", spec: dict[str, Any]) -> None:
        self.sup = sup
        self.spec = spec
        self.name: str = spec["name"]
        self.restart_policy: str = spec.get("restart") or "on-failure"
        self.ready_timeout = float(spec.get("ready_timeout") or 60.0)
        self.state = STOPPED
        self.proc: subprocess.Popen | None = None
        self.restarts = 0
        self.started_at: float | None = None
        self.ready_at: float | None = None
        self.ready_seconds: float | None = None
        self.exit_code: int | None = None
        self.error: str | None = None
        self.wanted = False
        self.first_start: float | None = None
        self._wake = threading.Event()
        self._lock = threading.Lock()
        self.writer = LogWriter(sup.logs_dir, self.name, sup.redact)
        self.thread: threading.Thread | None = None

    # -- control (called from socket threads)
    def up(self) -> None:
        with self._lock:
            if self.wanted and self.thread and self.thread.is_alive():
                return
            self.wanted = True
            self.error = None
            self.first_start = None
            self._wake.clear()
            self.thread = threading.Thread(target=self._run, name=f"svc-{self.name}", daemon=True)
            self.thread.start()

    def down(self) -> None:
        with self._lock:
            self.wanted = False
            self._wake.set()
        self._terminate()
        if self.thread is not None:
            self.thread.join(timeout=KILL_WAIT + 5)
        self.state = STOPPED
        self.sup.changed()

    # -- the life of the service
    def _run(self) -> None:
        backoff = BACKOFF_START
        if not self._wait_for_deps():
            return
        while self.wanted and not self.sup.stopping:
            self.first_start = self.first_start or _now()
            try:
                if not self._spawn():
                    break
            except OSError as e:
                self.error = f"cannot start: {e}"
                self.state = FAILED
                self.sup.event(self.name, "error", f"{self.name} could not start: {e}")
                self.sup.changed()
                return
            self._wait_ready()
            code = self._wait_exit()
            if not self.wanted or self.sup.stopping:
                break
            ran_ready = self.ready_at is not None and _now() - self.ready_at >= STABLE_AFTER
            if ran_ready:
                backoff = BACKOFF_START
            restart = self.restart_policy == "always" or (self.restart_policy == "on-failure" and code != 0)
            if not restart:
                self.state = EXITED if code == 0 else FAILED
                if code != 0:
                    self.error = f"exited with code {code}"
                self.sup.changed()
                return
            self.state = BACKOFF
            self.restarts += 1
            self.sup.event(self.name, "warning", f"{self.name} restarting in {backoff:g}s (restart {self.restarts})",
                           event="restart", restarts=self.restarts, delay=backoff)
            self.sup.changed()
            if self._wake.wait(backoff):
                break
            backoff = min(backoff * 2, BACKOFF_CAP)
        if self.state not in (FAILED,):
            self.state = STOPPED
        self.sup.changed()

    def _wait_for_deps(self) -> bool:
        deps = [self.sup.services[d] for d in self.spec.get("depends_on") or [] if d in self.sup.services]
        while self.wanted and not self.sup.stopping:
            # A one-shot dependency (restart = "no", e.g. a migration) counts once it finished cleanly.
            if all(d.state == READY or (d.state == EXITED and d.exit_code == 0 and d.ready_at) for d in deps):
                return True
            self._wake.wait(0.05)
        return False

    def _spawn(self) -> bool:
        """Start the process; False when a stop came first (checked under the lock `down` takes)."""
        env = dict(self.sup.base_env)
        env.update(self.spec.get("env") or {})
        env.update(self.sup.secrets)
        env["WTBOX_ID"] = self.sup.box_id
        cwd = self.spec.get("cwd") or self.sup.workdir
        with self._lock:
            if not self.wanted or self.sup.stopping:
                return False
            # Own session = own process group, so stopping takes the whole tree the shell started.
            self.proc = subprocess.Popen(["/bin/sh", "-c", self.spec["cmd"]], cwd=cwd, env=env,
                                         stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                         start_new_session=True, close_fds=True)
        self.started_at = _now()
        self.ready_at = None
        self.ready_seconds = None
        self.exit_code = None
        self.state = STARTING
        # The event goes first so that in the merged logs it precedes the service's own output.
        self.sup.event(self.name, "info", f"{self.name} started (pid {self.proc.pid})", event="start",
                       pid=self.proc.pid)
        for pipe, stream in ((self.proc.stdout, "stdout"), (self.proc.stderr, "stderr")):
            fd = os.dup(pipe.fileno())
            pipe.close()
            threading.Thread(target=pump, args=(fd, stream, self.writer), daemon=True,
                             name=f"pump-{self.name}-{stream}").start()
        self.sup.changed()
        return True

    def _wait_ready(self) -> None:
        """Poll the readiness check until it passes, the process exits, or ready_timeout passes."""
        check = self.spec.get("ready")
        delay = 0.02
        while self.wanted and not self.sup.stopping and self.proc.poll() is None:
            elapsed = _now() - self.started_at
            ok = _check_ready(check, self, timeout=min(2.0, max(0.2, self.ready_timeout - elapsed))) if check \
                else elapsed >= NO_CHECK_GRACE
            if ok and self.proc.poll() is None:
                self.ready_at = _now()
                self.ready_seconds = round(self.ready_at - self.started_at, 3)
                self.state = READY
                self.error = None
                self.sup.event(self.name, "info", f"{self.name} ready after {self.ready_seconds:.3f}s",
                               event="ready", ready_seconds=self.ready_seconds)
                self.sup.changed()
                return
            if self.first_start and _now() - self.first_start > self.ready_timeout and not self.error:
                self.error = f"not ready after {self.ready_timeout:g}s"
                self.sup.event(self.name, "error", f"{self.name} {self.error}", event="unready")
                self.sup.changed()
            self._wake.wait(delay if check else max(0.005, NO_CHECK_GRACE - elapsed))
            delay = min(delay * 1.5, 0.05)

    def _wait_exit(self) -> int:
        code = self.proc.wait()
        self.exit_code = code
        level = "info" if code == 0 or not self.wanted else "error"
        self.sup.event(self.name, level, f"{self.name} exited with code {code}", event="exit", code=code)
        if self.first_start and self.ready_at is None and _now() - self.first_start > self.ready_timeout \
                and not self.error:
            self.error = f"not ready after {self.ready_timeout:g}s (exits with code {code})"
        self.state = EXITED
        self.sup.changed()
        return code

    def _terminate(self) -> None:
        proc = self.proc
        if proc is None or proc.poll() is not None:
            _killpg_quiet(proc.pid if proc else None, signal.SIGKILL)  # stragglers left in the group
            return
        _killpg_quiet(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=KILL_WAIT)
        except subprocess.TimeoutExpired:
            pass
        _killpg_quiet(proc.pid, signal.SIGKILL)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass

    def info(self) -> dict[str, Any]:
        return {
            "state": self.state, "pid": self.proc.pid if self.proc and self.proc.poll() is None else None,
            "port": self.spec.get("port"), "started_at": self.started_at, "ready_at": self.ready_at,
            "ready_seconds": self.ready_seconds, "restarts": self.restarts, "exit_code": self.exit_code,
            "error": self.error, "restart": self.restart_policy,
        }


def _killpg_quiet(pgid: int | None, sig: int) -> None:
    if not pgid:
        return
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _check_ready(check: str, svc: Service, timeout: float) -> bool:
    """http(s):// answers < 500; tcp:PORT or tcp:HOST:PORT accepts; otherwise a shell command exits 0."""
    if check.startswith("http://"):
        return _http_ok(check, timeout)
    if check.startswith("https://"):
        import urllib.error
        import urllib.request

        try:
            with urllib.request.urlopen(check, timeout=timeout) as r:
                return r.status < 500
        except urllib.error.HTTPError as e:
            return e.code < 500
        except (OSError, ValueError):
            return False
    if check.startswith("tcp:"):
        host, _, port = check[4:].rpartition(":")
        try:
            with socket.create_connection((host or "127.0.0.1", int(port)), timeout=timeout):
                return True
        except (OSError, ValueError):
            return False
    env = dict(svc.sup.base_env)
    env.update(svc.spec.get("env") or {})
    env.update(svc.sup.secrets)
    env["WTBOX_ID"] = svc.sup.box_id
    try:
        return subprocess.run(["/bin/sh", "-c", check], cwd=svc.spec.get("cwd") or svc.sup.workdir, env=env,
                              stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              timeout=timeout, start_new_session=True).returncode == 0
    except (subprocess.TimeoutExpired, OSError):
        return False


def _http_ok(url: str, timeout: float) -> bool:
    """GET over a plain socket: urllib costs ~90 ms to import and ~8 MB of the supervisor's memory."""
    from urllib.parse import urlsplit

    try:
        u = urlsplit(url)
        host, port = u.hostname or "127.0.0.1", u.port or 80
        path = (u.path or "/") + (f"?{u.query}" if u.query else "")
        with socket.create_connection((host, port), timeout=timeout) as s:
            s.sendall(f"GET {path} HTTP/1.0\r\nHost: {u.netloc}\r\nUser-Agent: wtbox\r\n\r\n".encode())
            head = b""
            while b"\r\n" not in head and len(head) < 4096:
                chunk = s.recv(4096)
                if not chunk:
                    break
                head += chunk
        parts = head.split(b"\r\n", 1)[0].split()
        return len(parts) >= 2 and parts[0].startswith(b"HTTP/") and int(parts[1]) < 500
    except (OSError, ValueError):
        return False


class Supervisor:
    def __init__(self, home: Path, box_id: str, payload: dict[str, Any]) -> None:
        from .secrets import Redactor

        self.home = home
        self.box_id = box_id
        self.box_dir = home / "boxes" / box_id
        self.run_dir = self.box_dir / "run"
        self.logs_dir = self.box_dir / "logs"
        self.secrets: dict[str, str] = dict(payload.get("secrets") or {})
        spec = payload
        self.workdir = spec.get("workdir") or str(self.box_dir / "worktree")
        secrets = self.secrets
        box_env = read_env_file(self.box_dir / "env")
        self.base_env = dict(os.environ)
        self.base_env.update(box_env)
        self.base_env.update(spec.get("env") or {})
        self.base_env["WTBOX_ID"] = box_id
        self.metrics_url = self.base_env.get("WTBOX_METRICS_URL") or spec.get("metrics_url")
        self.redact = Redactor(list(secrets.values()) + secret_values(box_env))
        self.stopping = False
        self.events = EventLog(self.logs_dir)
        self.services: dict[str, Service] = {}
        for s in spec.get("services", []):
            self.services[s["name"]] = Service(self, s)
        self._state_lock = threading.Lock()
        self._dirty = threading.Event()
        self._done = threading.Event()
        self.started_at = _now()

    def event(self, service: str, level: str, msg: str, **extra: Any) -> None:
        try:
            self.events(service, level, self.redact(msg), **extra)
        except OSError:
            pass

    def changed(self) -> None:
        self._dirty.set()

    def write_state(self) -> None:
        state = {"box_id": self.box_id, "pid": os.getpid(), "started_at": self.started_at,
                 "stopping": self.stopping, "updated_at": _now(),
                 "services": {n: s.info() for n, s in self.services.items()}}
        with self._state_lock:  # the main loop and control threads both write it
            tmp = self.run_dir / f".state.json.{os.getpid()}.tmp"
            tmp.write_text(json.dumps(state, indent=1))
            os.replace(tmp, self.run_dir / "state.json")

    # -- control
    def select(self, name: str | None) -> list[Service]:
        if not name:
            return list(self.services.values())
        if name not in self.services:
            raise KeyError(name)
        return [self.services[name]]

    def up(self, name: str | None = None, wait: bool = True) -> None:
        targets = self.select(name)
        for s in targets:
            s.up()
        if wait:
            deadline = _now() + max([s.ready_timeout for s in targets] or [0]) * max(1, len(targets)) + 1
            while _now() < deadline and not self.stopping:
                if all(s.state == READY or s.error or s.state in (FAILED, EXITED) for s in targets):
                    break
                time.sleep(0.05)

    def down(self, name: str | None = None) -> None:
        # Reverse dependency order: dependents stop before what they depend on.
        targets = self.select(name)
        for s in reversed(targets):
            s.down()

    def stop_all(self) -> None:
        self.stopping = True
        self.changed()
        for s in reversed(list(self.services.values())):
            with s._lock:  # after this no service spawns again (see Service._spawn)
                s.wanted = False
                s._wake.set()
        # SIGTERM every group first, then wait once: stopping N services costs one KILL_WAIT, not N.
        procs = [s.proc for s in self.services.values() if s.proc is not None and s.proc.poll() is None]
        for p in procs:
            _killpg_quiet(p.pid, signal.SIGTERM)
        deadline = _now() + KILL_WAIT
        for p in procs:
            try:
                p.wait(timeout=max(0.0, deadline - _now()))
            except subprocess.TimeoutExpired:
                pass
        for s in self.services.values():
            if s.proc is not None:
                _killpg_quiet(s.proc.pid, signal.SIGKILL)  # survivors, and stragglers left in the group
                try:
                    s.proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    pass
            if s.thread is not None:
                s.thread.join(timeout=2)
            s.state = STOPPED
            s.writer.close()

    def handle(self, req: dict[str, Any]) -> dict[str, Any]:
        cmd = req.get("cmd")
        name = req.get("service")
        try:
            if cmd == "status":
                pass
            elif cmd == "up":
                self.up(name)
            elif cmd == "down":
                self.down(name)
            elif cmd == "restart":
                self.down(name)
                self.up(name)
            elif cmd == "env-secrets":
                return {"ok": True, "secrets": dict(self.secrets)}
            elif cmd == "stop":
                self.stop_all()  # the reply is sent before the process exits (see _serve_one)
            else:
                return {"ok": False, "error": f"unknown command {cmd!r}"}
        except KeyError:
            return {"ok": False, "error": f"the box has no service {name!r}; it has: {', '.join(self.services)}"}
        self.write_state()
        return {"ok": True, "services": {n: s.info() for n, s in self.services.items()}}

    def serve(self) -> None:
        # A relative path after chdir: the absolute one can exceed the 107-byte sun_path limit.
        os.chdir(self.run_dir)
        try:
            os.unlink(SOCKET)
        except FileNotFoundError:
            pass
        srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)
        try:
            srv.bind(SOCKET)
        finally:
            os.umask(old)
        srv.listen(16)
        threading.Thread(target=self._accept, args=(srv,), daemon=True, name="control").start()

    def _accept(self, srv: socket.socket) -> None:
        while True:
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            threading.Thread(target=self._serve_one, args=(conn,), daemon=True).start()

    def _serve_one(self, conn: socket.socket) -> None:
        req_cmd = None
        with conn:
            try:
                pid, uid, gid = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
                if uid != os.getuid():
                    conn.sendall(b'{"ok": false, "error": "permission denied"}\n')
                    return
                conn.settimeout(10)
                data = read_line(conn)
                conn.settimeout(None)
                req = json.loads(data or b"{}")
                req_cmd = req.get("cmd") if isinstance(req, dict) else None
                resp = self.handle(req if isinstance(req, dict) else {})
                conn.sendall(json.dumps(resp).encode() + b"\n")
            except (OSError, ValueError):
                pass
            finally:
                if req_cmd == "stop":
                    self.finish()

    def finish(self) -> None:
        """Let the main loop end now (it may be sleeping in its 1 s wait)."""
        self._done.set()
        self._dirty.set()

    def collect(self) -> None:
        if not self.metrics_url:
            return
        try:
            from . import collector  # written by the metrics helper; optional
        except ImportError:
            self.metrics_url = None
            return
        try:
            if not hasattr(self, "_collector"):
                self._collector = collector.Collector(self.box_id, self.metrics_url, self.logs_dir)
            self._collector.tick([
                {"name": s.name, "pids": [s.proc.pid] if s.proc and s.proc.poll() is None else [],
                 "up": s.state == READY, "ready_seconds": s.ready_seconds, "restarts": s.restarts}
                for s in self.services.values()
            ])
        except Exception:  # noqa: BLE001 - metrics must never take the supervisor down
            pass

    def run(self) -> None:
        self.serve()
        self.write_state()
        for s in self.services.values():
            s.up()
        next_collect = _now() + 1.0
        while not self._done.is_set():
            if self._dirty.wait(timeout=1.0):
                self._dirty.clear()
                self.write_state()
            if _now() >= next_collect:
                next_collect = _now() + COLLECT_EVERY
                self.collect()
        self.write_state()


def read_line(sock: socket.socket) -> bytes:
    """One newline-terminated message of the control protocol (client and server side)."""
    data = b""
    while not data.endswith(b"\n"):
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return data


def read_env_file(path: Path) -> dict[str, str]:
    """The box env file as worktreebox.envfile writes it (KEY=VALUE or KEY="escaped")."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return {}
    out = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, _, val = line.removeprefix("export ").partition("=")
        if len(val) >= 2 and val[0] == val[-1] == '"':
            val = _unescape(val[1:-1])
        elif len(val) >= 2 and val[0] == val[-1] == "'":
            val = val[1:-1]
        out[key.strip()] = val
    return out


def _unescape(s: str) -> str:
    """Undo envfile.format_env's escapes (backslash, quote, newline, dollar)."""
    out, i = [], 0
    while i < len(s):
        ch = s[i]
        if ch == "\\" and i + 1 < len(s):
            nxt = s[i + 1]
            out.append({"n": "\n", "t": "\t"}.get(nxt, nxt))
            i += 2
            continue
        out.append(ch)
        i += 1
    return "".join(out)


def secret_values(env: dict[str, str]) -> list[str]:
    """Values in the box env that must never appear in logs: passwords, tokens, URL passwords."""
    import re

    from .secrets import _SECRET_NAME

    out = []
    for k, v in env.items():
        if _SECRET_NAME.search(k):
            out.append(v)
        m = re.match(r"^[a-z][a-z0-9+.-]*://[^:/@]*:([^@]*)@", v, re.I)
        if m:
            out.append(m.group(1))
    return [v for v in out if v]


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    home, box_id = Path(argv[0]), argv[1]
    # Secrets come on stdin (a pipe from the resource), never through argv, env or a file.
    raw = sys.stdin.buffer.read() if not sys.stdin.isatty() else b""
    payload = json.loads(raw) if raw.strip() else {}
    secrets = payload.get("secrets") or {}
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    # Fork once more so the supervisor is nobody's child: the caller reaps the short-lived
    # parent at once and no zombie waits for a parent that never calls wait().
    if os.fork() > 0:
        os._exit(0)
    run_dir = home / "boxes" / box_id / "run"
    pid_file = run_dir / "supervisor.pid"
    sup = None
    try:
        sup = Supervisor(home, box_id, payload)
        pid_file.write_text(f"{os.getpid()}\n")

        def on_term(signum: int, frame: Any) -> None:
            threading.Thread(target=lambda: (sup.stop_all(), sup.finish()), daemon=True).start()

        signal.signal(signal.SIGTERM, on_term)
        signal.signal(signal.SIGINT, on_term)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        sup.run()
    except Exception:  # noqa: BLE001 - report in the events log; stderr is /dev/null
        import traceback

        msg = traceback.format_exc()
        try:
            from .secrets import Redactor

            EventLog(home / "boxes" / box_id / "logs")("_supervisor", "critical",
                                                        Redactor(list(secrets.values()))(msg))
        except OSError:
            pass
        if sup is not None:
            sup.stop_all()
    finally:
        for p in (pid_file, run_dir / SOCKET):
            try:
                p.unlink()
            except FileNotFoundError:
                pass
        if sup is not None:
            try:
                sup.write_state()
            except OSError:
                pass
        os._exit(0)


if __name__ == "__main__":
    main()
