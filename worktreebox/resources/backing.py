"""The backing resource: the box's own instance of each [backing.<name>] (Redis, RabbitMQ, ...).

Created in parallel with the worktree, the database and the metrics store (it needs only its
leased ports and the box dir): every instance is launched first, then all are waited for
together, so a box with Redis costs its `new` the slowest start, not the sum. What each
instance is gets recorded in box.data["backing"] before it starts, so a failed `new` destroys
it. The facts ({{ backing.<name>.url }}, .host, .port, ...) feed [box] env, where `wtbox init`
puts the repo's own variable names (REDIS_URL, CELERY_BROKER_URL, ...).
"""
from __future__ import annotations

import functools
import json
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from worktreebox.errors import WtboxError
from worktreebox.providers.backing import choice, runtime_class, runtime_for
from worktreebox.providers.backing.native import KEEPER, LEAF, PID_DIR, NativeProgram, launch, pid_file, release
from worktreebox.resources.base import Creation, Resource
from worktreebox.resources.metrics import in_box_network
from worktreebox.system import procs

if TYPE_CHECKING:
    from worktreebox.box import Box
    from worktreebox.config.backing import BackingConfig
    from worktreebox.context import HostContext
    from worktreebox.providers.backing.base import Runtime

POLL = 0.005  # a refused connect costs microseconds: answer `new` as soon as the service listens
KEEPER_FLUSH = 1.0  # seconds to let the keeper write a failed program's last lines


class Backing(Resource):
    name = "backing"
    phase = "backing"
    parallel = True

    def create(self, c: Creation) -> None:
        wanted = c.config.backing
        if not wanted:
            return
        box = c.box
        classes = {name: runtime_for(cfg, c.config.source) for name, cfg in wanted.items()}  # before anything runs
        launcher = in_box_network(c)
        began = time.monotonic()  # (after the wait for a sandboxed box's network: not the programs' own start)
        # A sandboxed box's programs listen in its own network, at their canonical ports; the host
        # reaches them at the leased ones through the supervisor's forwards, which hold those.
        ports = box.inside_ports if launcher.sandboxed else box.ports
        for cfg in wanted.values():
            if not launcher.sandboxed:
                _check_port(box, cfg)
        data: dict[str, Any] = box.data.setdefault(self.name, {})
        running: dict[str, tuple[Runtime, Any]] = {}
        c.note(f"starting backing services: {', '.join(f'{n} ({cls.runtime})' for n, cls in classes.items())}")
        runtimes = {name: classes[name](c.host, cfg.kind) for name, cfg in wanted.items()}
        for name, rt in runtimes.items():
            data[name] = {"kind": wanted[name].kind, "image": wanted[name].image, "runtime": rt.runtime}
        natives = [rt.prepare(box, wanted[n], ports) for n, rt in runtimes.items() if isinstance(rt, NativeProgram)]
        pids, held = launch(box, c.host.home, natives, launcher) if natives else ({}, [])
        try:
            for name, rt in runtimes.items():
                running[name] = (rt, pids[name] if name in pids else rt.start(box, wanted[name], box.ports))
            _wait_ready(box, wanted, running, held)
        finally:
            release(held)
        c.timings["backing_start"] = round(time.monotonic() - began, 4)  # launch until every one answers
        facts = c.facts.setdefault("backing", {})
        for name, (rt, _) in running.items():
            facts[name] = data[name]["facts"] = rt.facts(box, wanted[name], ports)
            c.env[f"WTBOX_BACKING_{name.upper()}_URL"] = facts[name]["url"]

    def destroy(self, host: HostContext, box: Box) -> None:
        data = box.data.get(self.name) or {}
        pid_dir = box.run_dir / PID_DIR
        names = set(data) | {p.stem for p in pid_dir.glob("*.pid") if p.stem != KEEPER}
        if names or pid_dir.exists():
            found = [p for f in pid_dir.glob("*.pid") if (p := procs.from_pid_file(f, box.id, None)) is not None]
            found += procs.find_named(box.id, _native_process_names(), box_dir=box.dir)
            procs.stop_processes(list({p.pid: p for p in found}.values()))
            procs.stop_cgroup(host.home, box.id, leaves=[LEAF])
        if any(d.get("runtime") == "docker" for d in data.values()) or (not data and "env_keys" not in box.data
                                                                       and _docker_used(host)):
            _docker(host).remove(box)
        shutil.rmtree(box.dir / "backing", ignore_errors=True)
        shutil.rmtree(pid_dir, ignore_errors=True)

    def discover(self, host: HostContext) -> set[str]:
        boxes = Path(host.boxes_dir)
        ids = {p.parent.name for p in boxes.glob("*/backing") if p.is_dir()}
        ids |= {p.parent.parent.name for p in boxes.glob(f"*/run/{PID_DIR}") if p.is_dir()}
        if _docker_used(host):
            ids |= _docker(host).discover()
        return ids

    def health(self, host: HostContext, box: Box) -> str | None:
        for name, d in (box.data.get(self.name) or {}).items():
            if d.get("runtime") == "native" and not _alive(box, name):
                return (f"its backing service {name!r} ({d.get('image')}) is not running; "
                        f"remove the box and make a new one (wtbox rm {box.id})")
        return None

    def status(self, host: HostContext, box: Box) -> dict[str, Any] | None:
        data = box.data.get(self.name)
        if not data:
            return None
        return {"backing": [{"name": n, "kind": d.get("kind"), "image": d.get("image"), "runtime": d.get("runtime"),
                             "url": (d.get("facts") or {}).get("url"), "up": _answers(d, box.ports.get(n))}
                            for n, d in data.items()]}

    def checks(self, host: HostContext) -> list[dict[str, Any]]:
        """Which runtime each kind gets here (optional: only a repo that declares one needs it)."""
        from worktreebox.config.backing import KINDS

        out = []
        for kind in KINDS:
            cls, why = choice(kind, None)
            detail = f"{cls.runtime}: {cls.describe()}" if cls else f"not on this host ({'; '.join(why)})"
            out.append({"check": f"backing {kind} (optional)", "ok": True, "detail": detail})
        return out


def _check_port(box: Box, cfg: BackingConfig) -> None:
    """A stranger on a leased port (taken after the lease) fails the start here, naming the service."""
    import socket

    from worktreebox.resources.ports import holder_of

    for port_name in cfg.port_names:
        port = box.ports[port_name]
        with socket.socket() as s:
            # as the programs bind: a connection of the box before it, in TIME_WAIT, is no stranger
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                who = holder_of(port) or "a process wtbox cannot see"
                raise WtboxError(f"The backing service {cfg.name!r} ({cfg.image}) cannot start: its port {port} is "
                                 f"already in use by {who}.") from None


def _wait_ready(box: Box, wanted: dict[str, BackingConfig], running: dict[str, tuple[Runtime, Any]],
                held: list[int]) -> None:
    """Until every instance answers its probe (system/readiness.py; all were launched already, so
    one after the other costs the slowest); one sentence naming the first that died or timed out."""
    from worktreebox.system import readiness

    for name, (rt, handle) in running.items():
        cfg, port = wanted[name], box.ports[name]
        answers = readiness.Probe(functools.partial(_ready, rt, handle, port))
        why = readiness.wait(answers, cfg.ready_timeout, alive=functools.partial(_running, rt, handle), poll=POLL)
        if why == readiness.EXITED:
            raise WtboxError(f"The backing service {name!r} ({cfg.image}, {rt.runtime}) {rt.failed(handle)} at "
                             f"start: {_last_words(box, name, held)}.")
        if why == readiness.TIMEOUT:
            raise WtboxError(f"The backing service {name!r} ({cfg.image}, {rt.runtime}) did not answer on port "
                             f"{port} within {cfg.ready_timeout:g} s; see 'wtbox logs {box.id} --service {name}'.")


def _last_words(box: Box, name: str, held: list[int]) -> str:
    """The last line a failed program wrote. Its output waits in the FIFOs we hold until the keeper
    (maybe still starting) reads it into the log: wait for that, then let go (a line without its
    newline comes when the keeper sees the end)."""
    deadline = time.monotonic() + KEEPER_FLUSH
    while not (msgs := _logged(box, name)) and time.monotonic() < deadline:
        time.sleep(0.02)
    if msgs:
        time.sleep(0.05)  # the rest of what it wrote at once
        msgs = _logged(box, name)
    release(held)
    if not msgs:
        keeper = procs.from_pid_file(pid_file(box, KEEPER), box.id, None)
        if keeper is not None:
            procs.wait_gone([keeper.pid], KEEPER_FLUSH)
        msgs = _logged(box, name)
    last = next((m for m in reversed(msgs) if m.strip()), "")
    return " ".join(last.split())[:300] or "it wrote nothing"


def _logged(box: Box, name: str) -> list[str]:
    try:
        lines = (box.logs_dir / f"{name}.jsonl").read_text(errors="replace").splitlines()
        return [json.loads(ln).get("msg", "") for ln in lines if ln.strip()]
    except (OSError, ValueError):
        return []


def _alive(box: Box, name: str) -> bool:
    try:
        return procs.pid_alive(int(pid_file(box, name).read_text().strip()))
    except (OSError, ValueError):
        return False


def _ready(rt: Runtime, handle: Any, port: int, timeout: float) -> bool:
    return bool(rt.ready(handle, port))


def _running(rt: Runtime, handle: Any) -> bool:
    return rt.failed(handle) is None


def _answers(d: dict[str, Any], port: int | None) -> bool:
    """The instance answers on the port the host reaches it at (a sandboxed box's: its forward)."""
    from worktreebox.providers.backing.base import probe

    if not port:
        return False
    return bool(probe(d.get("kind", ""), port))


def _native_process_names() -> set[str]:
    """Kernel names of the native programs (a second net where cgroups are missing); not `python`,
    which the box's own services may be."""
    from worktreebox.config.backing import KINDS

    out: set[str] = set()
    for kind in KINDS:
        cls = runtime_class(kind, "native")
        out |= {n for n in getattr(cls, "processes", ()) if not n.startswith("python")}
    return out


def _docker(host: HostContext) -> Runtime:
    from worktreebox.providers.backing.docker import DockerBacking

    return DockerBacking(host)


def _docker_used(host: HostContext) -> bool:
    """Whether a docker backing could exist in this home: only asked of a daemon that is up."""
    from worktreebox.providers.docker_engine import docker_available

    return docker_available(timeout=0.5)[0]
