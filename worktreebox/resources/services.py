"""The services resource: a detached supervisor that runs `[services]` (after setup and migrations).

start(): render the `ServiceSpec`s, start the supervisor (specs and secrets
over its stdin only; run/services.json is a copy for people, with passwords masked) and
wait until every service is ready. A supervisor that runs already (the sandbox resource started
a sandboxed box's in the box's network; the traces resource one for the box's OTLP endpoint)
gets the services over its control socket.
destroy(): stop the supervisor, then kill whatever still carries WTBOX_ID=<id> or
sits in the box dir (daemons that double-forked out of their group).
Talking to the supervisor is `worktreebox.services.client`.
"""
from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING, Any

from worktreebox.box import DEGRADED, READY
from worktreebox.config.load import check_ready, path_inside, services_in_order
from worktreebox.config.templating import render
from worktreebox.errors import ConfigError, UsageError
from worktreebox.resources.base import Creation, Resource, ids_by_hex, warn
from worktreebox.services import control, output
from worktreebox.services.boxenv import otel_service_name, redactor_for
from worktreebox.services.client import (
    PID_FILE,
    checked,
    control_request,
    give_services,
    otlp_port,
    read_state,
    services_status,
    start_supervisor,
    stop_supervisor,
    supervisor_pid,
    wait_ready,
)
from worktreebox.services.spec import ServiceSpec
from worktreebox.system import procs
from worktreebox.system.fsutil import atomic_write

if TYPE_CHECKING:
    from worktreebox.box import Box
    from worktreebox.context import HostContext


class Services(Resource):
    name = "services"
    start_phase = "services"

    def start(self, c: Creation) -> None:
        cfg = c.config
        box = c.box
        if not cfg.services or not c.start_services:
            return
        specs = render_specs(c)
        write_specs(box, specs)
        c.note(f"starting services: {', '.join(s.name for s in specs)}")
        from worktreebox.providers.sandbox import sandboxed
        from worktreebox.services.client import wait_started

        if sandboxed(box):
            wait_started(box)  # the sandbox resource started it a moment ago
        check_ports(box, specs)
        hand_over(c.host, box, specs, c.secrets)
        wait_ready(box, [s.name for s in specs], deadline=time.time() + sum(s.ready_timeout for s in specs) + 10)
        c.note("services ready")

    def destroy(self, host: HostContext, box: Box) -> None:
        stop_supervisor(box)  # the services get their SIGTERM and grace first
        # Then everything else of the box (exec sessions, daemons that left their group, session and
        # environment, VictoriaMetrics): its cgroup is killed, and env/cwd are swept as a second net.
        procs.end_box_processes(host.home, box.id, box.dir)
        output.remove(output.directory(host.home, box.id))

    def discover(self, host: HostContext) -> set[str]:
        return procs.discover_box_ids(host.boxes_dir) | _with_output(host)

    def health(self, host: HostContext, box: Box) -> str | None:
        return supervisor_problem(box)

    def status(self, host: HostContext, box: Box) -> dict[str, Any] | None:
        services = services_status(box)
        return {"services": [{"name": n, **row} for n, row in services.items()]} if services else None


def _with_output(host: HostContext) -> set[str]:
    """Boxes whose services' output files are left in memory (appendfiles.py), named by their hex."""
    from worktreebox.system import appendfiles
    from worktreebox.system.cgroups import home_key

    return ids_by_hex(host, set(appendfiles.dirs_of_home(home_key(host.home))), "wt_")


# ---------------------------------------------------------------- specs

def render_specs(c: Creation) -> list[ServiceSpec]:
    """[services.<name>] of wtbox.toml rendered over the box facts, in dependency order."""
    cfg, box = c.config, c.box
    out = []
    for svc in services_in_order(cfg.services):
        where = f"{cfg.source}: [services.{svc.name}]"
        env = {k: render(v, c.facts, f"{where} env.{k}") for k, v in svc.env.items()}
        env.update(otel_service_name(box.env, env, svc.name))
        ready = render(svc.ready, c.facts, f"{where} ready") if svc.ready else None
        if ready:
            check_ready(ready, f"{where} ready")
        cwd = path_inside(box.path, render(svc.cwd, c.facts, f"{where} cwd"), f"{where} cwd") if svc.cwd else box.path
        if not cwd.is_dir():
            raise ConfigError(f"{where} cwd: {svc.cwd!r} is not a directory in the worktree.")
        out.append(ServiceSpec(
            name=svc.name, cmd=render(svc.cmd, c.facts, f"{where} cmd"), cwd=str(cwd), env=env, ready=ready,
            ready_timeout=svc.ready_timeout, restart=svc.restart, depends_on=list(svc.depends_on),
            port=_port_of(svc.name, ready, env, box.ports), holds_port=svc.holds_port,
            metrics=render(svc.metrics, c.facts, f"{where} metrics") if svc.metrics else None))
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


def write_specs(box: Box, specs: list[ServiceSpec]) -> None:
    """run/services.json (0600): the rendered services for people to read, passwords masked.

    The supervisor gets the real specs over its stdin: a `{{ db.url }}` in a service's env
    must not put the database password into one more file.
    """
    redact = redactor_for(box, {})
    masked = json.loads(redact(json.dumps([s.to_json() for s in specs])))
    box.run_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    atomic_write(box.run_dir / "services.json",
                 json.dumps({"box_id": box.id, "workdir": str(box.path), "services": masked}, indent=1), mode=0o600)


def configured_names(box: Box) -> list[str]:
    """The service names write_specs recorded (also for a box whose supervisor is not running)."""
    try:
        return [s["name"] for s in json.loads((box.run_dir / "services.json").read_text())["services"]]
    except (OSError, ValueError, KeyError, TypeError):
        return []


# ---------------------------------------------------------------- up / down / restart

def check_ports(box: Box, specs: list[ServiceSpec]) -> None:
    """A stranger on a service's port fails the start here, naming it, before anything runs (a
    sandboxed box's ports are its own: nobody else is in its network)."""
    from worktreebox.providers.sandbox import sandboxed
    from worktreebox.resources.ports import check_free

    if not sandboxed(box):
        check_free(box, [s.port for s in specs])


def hand_over(host: HostContext, box: Box, specs: list[ServiceSpec], secrets: dict[str, str]) -> None:
    """The services to the box's supervisor: over its control socket when it runs (started early: a
    sandboxed box's runs from the start, a box with observability's from its traces' start for the
    OTLP endpoint), else in a new one's payload. The caller checked the ports (check_ports)."""
    from worktreebox.providers.sandbox import sandboxed
    from worktreebox.resources import sandbox

    if supervisor_pid(box) is not None:
        give_services(box, secrets, specs)
        return
    start_supervisor(box, secrets, specs, sandbox.daemon_net(host, box) if sandboxed(box) else None)


def render_from_config(host: HostContext, box: Box) -> list[ServiceSpec]:
    """The box's services rendered from its wtbox.toml (to start them after the supervisor stopped)."""
    cfg = host.repo_config(box)
    if not cfg.services:
        raise UsageError(f"{box.id} has no services; add [services.<name>] to wtbox.toml or a Procfile.")
    c = Creation(host=host, box=box, config=cfg, base_sha=box.data.get("base_sha", ""), facts=box.facts())
    specs = render_specs(c)
    write_specs(box, specs)
    return specs


def _names(host: HostContext, box: Box) -> list[str]:
    state = read_state(box)
    if state and state.services and supervisor_pid(box) is not None:
        return list(state.services)
    return [s.name for s in render_from_config(host, box)]


def _endpoint_only(host: HostContext, box: Box) -> bool:
    """A box whose supervisor serves its OTLP endpoint and runs no services (its wtbox.toml has none)."""
    return bool(otlp_port(box)) and not host.repo_config(box).services


def _running_services(box: Box) -> list[str]:
    """The services a live supervisor was given ([] when none runs, or it serves the OTLP endpoint alone)."""
    state = read_state(box) if supervisor_pid(box) is not None else None
    return list(state.services) if state else []


# ---------------------------------------------------------------- a supervisor that died

def supervisor_died(box: Box) -> bool:
    """Killed or crashed: a supervisor that ends on its own removes its pid file, this one did not (one
    still starting has written it: alive, not waited for)."""
    return (box.run_dir / PID_FILE).exists() and supervisor_pid(box, wait=False) is None


def supervisor_problem(box: Box) -> str | None:
    """The reason a box is degraded because of its supervisor, with what brings it back."""
    if not supervisor_died(box):
        return None
    names = box.data.get("secret_names") or []
    if names:
        flags = " ".join(f"--secret {n}" for n in names)
        return (f"its services supervisor died, and with it the --secret values it alone held; "
                f"run 'wtbox up {box.id} {flags}' to start the services again")
    return f"its services supervisor died; run 'wtbox up {box.id}' to start the services again"


def end_survivors(box: Box) -> list[int]:
    """End what a dead supervisor left running (its services, marked WTBOX_SERVICE, and their
    output keeper) so a new supervisor starts them anew on the same ports; forget its files."""
    import psutil

    found = []
    for p in procs.find_box_processes(box.id, box.dir):
        try:
            env, cmd = p.environ(), p.cmdline()
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
        if env.get("WTBOX_SERVICE") or ("worktreebox.services.supervisor" in cmd and box.id in cmd):
            found.append(p)
    killed = procs.stop_processes(found)
    for stale in (PID_FILE, control.SOCKET):
        try:
            (box.run_dir / stale).unlink()
        except FileNotFoundError:
            pass
    return killed


def _recover(box: Box) -> None:
    if supervisor_died(box):
        killed = end_survivors(box)
        warn(f"the services supervisor of {box.id} had died; ended what it left running"
             + (f" (pids {', '.join(map(str, killed))})" if killed else ""))


def _sandbox_alive(host: HostContext, box: Box) -> None:
    """A sandboxed box whose holder is gone (a reboot, a kill) gets it again before its supervisor."""
    from worktreebox.providers.sandbox import holder_of, sandboxed

    if sandboxed(box) and holder_of(box) is None:
        if supervisor_pid(box) is not None:
            stop_supervisor(box)  # it served a network that is gone
        host.launcher(box)  # makes the holder again


def _whole_again(host: HostContext, box: Box) -> None:
    if box.state == DEGRADED:
        box.state = READY
        box.data.pop("degraded", None)
        host.registry.save_box(box)


def services_up(host: HostContext, box: Box, service: str | None = None,
                secrets: dict[str, str] | None = None) -> dict[str, Any]:
    _recover(box)
    given = sorted(set(box.data.get("secret_names") or []) | set(secrets or {}))
    if given != (box.data.get("secret_names") or []):  # names only, as `new` keeps them (Host.running_secrets)
        box.data["secret_names"] = given
        host.registry.save_box(box)
    if not _running_services(box) and not service and _endpoint_only(host, box):
        # No services, only the OTLP endpoint its supervisor serves (which died): bring that back.
        if supervisor_pid(box) is None:
            _sandbox_alive(host, box)
            hand_over(host, box, [], dict(secrets or {}))
        _whole_again(host, box)
        return services_status(box)
    if not _running_services(box):
        specs = render_from_config(host, box)
        names = [s.name for s in specs]
        if service and service not in names:
            raise UsageError(f"{box.id} has no service {service!r}; it has: {', '.join(names)}.")
        missing = [n for n in box.data.get("secret_names") or [] if n not in (secrets or {})]
        if missing and supervisor_pid(box) is None and (box.run_dir / control.STATE_FILE).exists():
            warn(f"starting the services without the --secret values {', '.join(missing)} given to 'new' "
                 f"(they are never stored; pass them again with --secret)")
        check_ports(box, [s for s in specs if not service or s.name == service])
        _sandbox_alive(host, box)
        hand_over(host, box, specs, dict(secrets or {}))
        targets = names
    else:
        names = _names(host, box)
        if service and service not in names:
            raise UsageError(f"{box.id} has no service {service!r}; it has: {', '.join(names)}.")
        checked(control_request(box, control.UP, service))
        targets = [service] if service else names
    wait_ready(box, targets, deadline=time.time() + 120)
    _whole_again(host, box)
    return services_status(box)


def reload_config(host: HostContext, box: Box, secrets: dict[str, str] | None) -> dict[str, str]:
    """`up --reload`: record the box's own wtbox.toml (services only may change) and stop a running
    supervisor, so the services start anew from it; the secrets to start them with (the running
    supervisor's, which would die with it, under the ones given)."""
    from worktreebox.config import recorded

    new = recorded.read_worktree(box.path)
    recorded.check_reloadable(box.id, host.repo_config(box), new)
    held = host.running_secrets(box) if supervisor_pid(box) is not None else {}
    box.data[recorded.DATA_KEY] = recorded.record(new)
    host.registry.save_box(box)
    if supervisor_pid(box) is not None:
        stop_supervisor(box)
    return {**held, **(secrets or {})}


def services_down(host: HostContext, box: Box, service: str | None = None) -> dict[str, Any]:
    from worktreebox.providers.sandbox import sandboxed

    _recover(box)
    if supervisor_pid(box) is None:
        _whole_again(host, box)
        return services_status(box)
    if service is None and not otlp_port(box) and not sandboxed(box):
        stop_supervisor(box)
    else:  # it stays for the box's OTLP endpoint; a sandboxed box's is how the box reaches its database and the host
        checked(control_request(box, control.DOWN, service))
    return services_status(box)


def services_restart(host: HostContext, box: Box, service: str | None = None,
                     secrets: dict[str, str] | None = None) -> dict[str, Any]:
    if not _running_services(box):
        return services_up(host, box, service, secrets)
    names = _names(host, box)
    checked(control_request(box, control.RESTART, service))
    wait_ready(box, [service] if service else names, deadline=time.time() + 120)
    return services_status(box)
