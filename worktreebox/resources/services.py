"""The services resource: `[setup] cmd`, then a detached supervisor that runs `[services]`.

start(): setup once, render the service specs, spawn the supervisor (specs and
secrets over its stdin only; run/services.json is a copy for people, with passwords
masked) and wait until every service is ready.
destroy(): stop the supervisor, then kill whatever still carries WTBOX_ID=<id> or
sits in the box dir (daemons that double-forked out of their group).
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import UsageError, WtboxError
from .base import Creation, Resource, warn

if TYPE_CHECKING:
    from ..box import Box
    from ..host import Host

SOCKET = "ctl.sock"
STOP_TIMEOUT = 20.0


class Services(Resource):
    name = "services"

    def start(self, c: Creation) -> None:
        cfg = c.config
        box = c.box
        if cfg.setup.cmd:
            run_setup(c)
        if not cfg.services or not c.start_services:
            return
        specs = render_specs(c)
        write_specs(box, specs)
        c.note(f"starting services: {', '.join(s['name'] for s in specs)}")
        spawn_supervisor(box, c.secrets, specs)
        wait_ready(box, [s["name"] for s in specs], deadline=time.time() + sum(s["ready_timeout"] for s in specs) + 10)
        c.note("services ready")

    def destroy(self, host: "Host", box: "Box") -> None:
        from .. import procs

        stop_supervisor(box)
        strays = procs.find_box_processes(box.id, box.dir)
        if strays:
            procs.kill_staged(strays)

    def discover(self, host: "Host") -> set[str]:
        from .. import procs

        return procs.discover_box_ids(host.boxes_dir)

    def status(self, host: "Host", box: "Box") -> dict[str, Any] | None:
        services = services_status(box)
        return {"services": [{"name": n, **row} for n, row in services.items()]} if services else None


# ---------------------------------------------------------------- setup

def base_env(box: "Box", secrets: dict[str, str] | None = None) -> dict[str, str]:
    """What a process of the box runs with: the caller's env (minus another box's ids), the box env, secrets."""
    env = {k: v for k, v in os.environ.items() if not _other_box_var(k)}
    env.update(box.env)
    env.update(secrets or {})
    env["WTBOX_ID"] = box.id
    return env


def _other_box_var(name: str) -> bool:
    """Variables that tie a process to a box: a `wtbox new` run inside box A must not make B's processes A's."""
    return name in ("WTBOX_ID", "WTBOX_BOX_DIR", "WTBOX_SHELL", "WTBOX_METRICS_URL") or name.startswith("WTBOX_PORT_")


def redactor_for(box: "Box", secrets: dict[str, str]):
    from ..secrets import Redactor
    from ..supervisor import secret_values

    return Redactor(list(secrets.values()) + secret_values(box.env))


def run_setup(c: Creation) -> None:
    from ..host import render
    from ..logs import run_logged

    box, cfg = c.box, c.config
    cmd = render(cfg.setup.cmd, c.facts, f"{cfg.source}: [setup] cmd")
    c.note("running [setup] cmd")
    rc, last = run_logged(cmd, box.path, base_env(box, c.secrets), box.logs_dir, "setup",
                          redactor_for(box, c.secrets), timeout=cfg.setup.timeout)
    if rc != 0:
        tail = "\n".join("  " + line for line in last) or "  (no output)"
        raise WtboxError(f"[setup] cmd failed with exit code {rc}; its last output lines:\n{tail}")


# ---------------------------------------------------------------- specs

def facts_of(box: "Box") -> dict[str, Any]:
    """Jinja facts rebuilt from a saved box (for `up` on a box created with --no-services)."""
    db = dict(box.data.get("database") or {})
    if db:
        db.setdefault("host", box.env.get("PGHOST"))
        db.setdefault("port", int(box.env["PGPORT"]) if box.env.get("PGPORT", "").isdigit() else None)
    metrics = dict(box.data.get("metrics") or {})
    if metrics.get("url"):
        metrics.setdefault("remote_write_url", metrics["url"] + "/api/v1/write")
    return {
        "box": {"id": box.id, "task": box.task, "branch": box.branch, "path": str(box.path), "dir": str(box.dir),
                "home": str(box.dir.parent.parent)},
        "ports": dict(box.ports), "db": db, "metrics": metrics,
    }


def render_specs(c: Creation) -> list[dict[str, Any]]:
    from ..config import services_in_order
    from ..host import render

    cfg, box = c.config, c.box
    out = []
    for svc in services_in_order(cfg.services):
        where = f"{cfg.source}: [services.{svc.name}]"
        env = {k: render(v, c.facts, f"{where} env.{k}") for k, v in svc.env.items()}
        ready = render(svc.ready, c.facts, f"{where} ready") if svc.ready else None
        cwd = box.path / render(svc.cwd, c.facts, f"{where} cwd") if svc.cwd else box.path
        out.append({
            "name": svc.name, "cmd": render(svc.cmd, c.facts, f"{where} cmd"), "cwd": str(cwd), "env": env,
            "ready": ready, "ready_timeout": svc.ready_timeout, "restart": svc.restart,
            "depends_on": list(svc.depends_on), "port": _port_of(svc.name, ready, env, box.ports),
        })
    return out


def _port_of(name: str, ready: str | None, env: dict[str, str], ports: dict[str, int]) -> int | None:
    """The port a service listens on, for `status`: its ready check, $PORT, or a box port of its name."""
    if ready:
        if ready.startswith("tcp:"):
            tail = ready.rsplit(":", 1)[-1]
            if tail.isdigit():
                return int(tail)
        if ready.startswith(("http://", "https://")):
            from urllib.parse import urlsplit

            try:
                if urlsplit(ready).port:
                    return urlsplit(ready).port
            except ValueError:
                pass
    if env.get("PORT", "").isdigit():
        return int(env["PORT"])
    return ports.get(name)


def write_specs(box: "Box", specs: list[dict[str, Any]]) -> None:
    """run/services.json (0600): the rendered services for people to read, passwords masked.

    The supervisor gets the real specs over its stdin: a `{{ db.url }}` in a service's env
    must not put the database password into one more file.
    """
    redact = redactor_for(box, {})
    specs = json.loads(redact(json.dumps(specs)))
    box.run_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = box.run_dir / "services.json"
    tmp = path.with_name(".services.json.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump({"box_id": box.id, "workdir": str(box.path), "services": specs}, f, indent=1)
    os.replace(tmp, path)


# ---------------------------------------------------------------- supervisor process

def supervisor_pid(box: "Box") -> int | None:
    """The pid of the box's live supervisor, checked against its command line (pids are reused)."""
    from .. import procs

    try:
        pid = int((box.run_dir / "supervisor.pid").read_text().strip())
    except (FileNotFoundError, ValueError):
        return None
    if not procs.pid_alive(pid):
        return None
    args = procs.cmdline(pid)
    if "worktreebox.supervisor" not in args or box.id not in args:
        return None
    return pid


def spawn_supervisor(box: "Box", secrets: dict[str, str], specs: list[dict[str, Any]]) -> int:
    """Start the detached supervisor; specs and secrets go over a pipe to its stdin, nowhere else."""
    box.logs_dir.mkdir(parents=True, exist_ok=True)
    box.run_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    for stale in ("supervisor.pid", SOCKET, "state.json"):
        try:
            (box.run_dir / stale).unlink()
        except FileNotFoundError:
            pass
    env = base_env(box)
    env.pop("PYTHONSTARTUP", None)
    # -m finds the package from the cwd, so this works from a checkout as well as when installed.
    pkg_parent = str(Path(__file__).resolve().parents[2])
    home = box.dir.parent.parent
    proc = subprocess.Popen([sys.executable, "-m", "worktreebox.supervisor", str(home), box.id],
                            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            cwd=pkg_parent, env=env, start_new_session=True, close_fds=True)
    try:
        proc.stdin.write(json.dumps({"secrets": secrets, "workdir": str(box.path), "services": specs}).encode())
        proc.stdin.close()
    except BrokenPipeError:
        pass
    rc = proc.wait()  # the launcher forks the real supervisor and exits at once
    if rc != 0:
        raise WtboxError(f"The services supervisor of {box.id} failed to start (exit code {rc}).")
    deadline = time.time() + 10
    while time.time() < deadline:
        pid = supervisor_pid(box)
        if pid and (box.run_dir / "state.json").exists():
            return pid
        time.sleep(0.01)
    raise WtboxError(f"The services supervisor of {box.id} did not start; see 'wtbox logs {box.id}'.")


def control(box: "Box", cmd: str, service: str | None = None, timeout: float = 120.0) -> dict[str, Any]:
    """Send one command to the supervisor's socket and return its JSON answer."""
    run_fd = os.open(box.run_dir, os.O_PATH | os.O_DIRECTORY)
    try:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(timeout)
        try:
            # Through /proc/self/fd: the real path can be longer than sun_path's 107 bytes.
            s.connect(f"/proc/self/fd/{run_fd}/{SOCKET}")
            s.sendall(json.dumps({"cmd": cmd, "service": service}).encode() + b"\n")
            from ..supervisor import read_line

            data = read_line(s)
        finally:
            s.close()
    finally:
        os.close(run_fd)
    if not data:
        raise OSError("the supervisor closed the connection")
    return json.loads(data)


def stop_supervisor(box: "Box") -> None:
    """Stop the supervisor and its services: socket 'stop', then SIGTERM/SIGKILL by pid. Idempotent."""
    from .. import procs

    pid = supervisor_pid(box)
    if pid is None:
        return
    try:
        control(box, "stop", timeout=STOP_TIMEOUT)
    except (OSError, ValueError):
        pass
    for sig in (None, signal.SIGTERM, signal.SIGKILL):
        if sig is not None:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                return
        deadline = time.time() + (STOP_TIMEOUT if sig == signal.SIGTERM else 5)
        while time.time() < deadline:
            if not procs.pid_alive(pid):
                return
            time.sleep(0.02)


def secrets_from_supervisor(host: "Host", box: "Box") -> dict[str, str]:
    return box_secrets(box)


def box_secrets(box: "Box") -> dict[str, str]:
    """The --secret values of a running box (for `wtbox exec`); {} when no supervisor runs."""
    if supervisor_pid(box) is None:
        return {}
    try:
        resp = control(box, "env-secrets", timeout=5)
    except (OSError, ValueError):
        return {}
    return dict(resp.get("secrets") or {})


# ---------------------------------------------------------------- readiness and status

def read_state(box: "Box") -> dict[str, Any] | None:
    try:
        return json.loads((box.run_dir / "state.json").read_text())
    except (FileNotFoundError, ValueError):
        return None


def last_lines(box: "Box", service: str, n: int = 10) -> list[str]:
    from ..logs import read_records

    try:
        recs = read_records(box.logs_dir, services=[service], tail=n, include_events=False)
    except OSError:
        return []
    return [line for r in recs for line in str(r.get("msg", "")).splitlines()][-n * 3:]


def wait_ready(box: "Box", names: list[str], deadline: float) -> None:
    """Return when every service is ready; raise naming the first that failed, with its last lines."""
    delay = 0.01
    while True:
        state = read_state(box) or {}
        services = state.get("services") or {}
        bad = next((n for n in names if services.get(n, {}).get("error")
                    or services.get(n, {}).get("state") == "failed"), None)
        if bad is None and names and all(_done(services.get(n, {})) for n in names):
            return
        alive = supervisor_pid(box) is not None
        if bad is None and not alive:
            bad = next((n for n in names if not _done(services.get(n, {}))), names[0])
            why = "the supervisor exited"
        elif bad is None and time.time() > deadline:
            bad = next((n for n in names if not _done(services.get(n, {}))), names[0])
            why = "it did not become ready in time"
        elif bad is not None:
            why = services[bad].get("error") or services[bad].get("state")
        else:
            time.sleep(delay)
            delay = min(delay * 1.5, 0.1)
            continue
        lines = last_lines(box, bad)
        tail = "\n".join("  " + line for line in lines) or "  (no output)"
        raise WtboxError(f"Service {bad!r} failed to start ({why}); its last log lines:\n{tail}")


def _done(s: dict[str, Any]) -> bool:
    """Ready, or a one-shot service (restart = "no") that became ready and exited cleanly."""
    return s.get("state") == "ready" or (s.get("state") == "exited" and s.get("exit_code") == 0
                                          and s.get("ready_at") is not None)


def services_status(box: "Box") -> dict[str, dict[str, Any]]:
    """Per service: state, pid, port, ready time, restarts (stopped when no supervisor runs)."""
    state = read_state(box)
    if not state:
        return {}
    alive = supervisor_pid(box) is not None
    out = {}
    for name, s in (state.get("services") or {}).items():
        row = {k: s.get(k) for k in ("state", "pid", "port", "ready_seconds", "restarts", "exit_code", "error")}
        row["started_at"] = _iso(s.get("started_at"))
        row["ready_at"] = _iso(s.get("ready_at"))
        if not alive:
            row["state"], row["pid"] = "stopped", None
        out[name] = row
    return out


def _iso(ts: float | None) -> str | None:
    from ..box import _iso as iso

    return iso(ts)


# ---------------------------------------------------------------- up / down / restart

def render_from_config(host: "Host", box: "Box") -> list[dict[str, Any]]:
    """The box's services rendered from its wtbox.toml (to start them after the supervisor stopped)."""
    cfg = host.repo_config(box)
    if not cfg.services:
        raise UsageError(f"{box.id} has no services; add [services.<name>] to wtbox.toml or a Procfile.")
    c = Creation(host=host, box=box, config=cfg, base_sha=box.data.get("base_sha", ""), facts=facts_of(box))
    specs = render_specs(c)
    write_specs(box, specs)
    return specs


def _names(host: "Host", box: "Box") -> list[str]:
    state = read_state(box)
    if state and supervisor_pid(box) is not None:
        return list(state.get("services") or {})
    return [s["name"] for s in render_from_config(host, box)]


def services_up(host: "Host", box: "Box", service: str | None = None) -> dict[str, Any]:
    if supervisor_pid(box) is None:
        specs = render_from_config(host, box)
        names = [s["name"] for s in specs]
        if service and service not in names:
            raise UsageError(f"{box.id} has no service {service!r}; it has: {', '.join(names)}.")
        if (box.run_dir / "state.json").exists():  # it ran before: the secrets it held died with it
            warn("starting the services again without the --secret values given to 'new' (they are never stored)")
        spawn_supervisor(box, {}, specs)
        targets = names
    else:
        names = _names(host, box)
        if service and service not in names:
            raise UsageError(f"{box.id} has no service {service!r}; it has: {', '.join(names)}.")
        _checked(control(box, "up", service))
        targets = [service] if service else names
    wait_ready(box, targets, deadline=time.time() + 120)
    return services_status(box)


def services_down(host: "Host", box: "Box", service: str | None = None) -> dict[str, Any]:
    if supervisor_pid(box) is None:
        return services_status(box)
    if service is None:
        stop_supervisor(box)
    else:
        _checked(control(box, "down", service))
    return services_status(box)


def services_restart(host: "Host", box: "Box", service: str | None = None) -> dict[str, Any]:
    if supervisor_pid(box) is None:
        return services_up(host, box, service)
    names = _names(host, box)
    _checked(control(box, "restart", service))
    wait_ready(box, [service] if service else names, deadline=time.time() + 120)
    return services_status(box)


def _checked(resp: dict[str, Any]) -> dict[str, Any]:
    if not resp.get("ok"):
        raise UsageError(str(resp.get("error", "the supervisor refused the command")).rstrip(".") + ".")
    return resp
