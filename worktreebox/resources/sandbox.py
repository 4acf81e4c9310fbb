"""The sandbox resource: a box's own processes, files and network, and the supervisor that joins it to the host.

create(), in parallel with the checkout: the box's holder (providers/sandbox: bubblewrap, then
its firewall and slirp4netns when the box goes online or has a database) and its supervisor,
started in the box's network with a forward per leased port (host 127.0.0.1:<leased> -> box
127.0.0.1:<inside>). As soon as bubblewrap runs (HOLDER) the supervisor gets its network and the
worktree's view may be mounted (after the holder, never before: see worktree.holder_before_view),
while the firewall and slirp4netns are made. The metrics store, OTLP receiver and browser wait
for all of it (`Creation.wait_for("sandbox")`): they start in the box's network too.
finish(): the database forward (box 127.0.0.1:5432 -> the host's PostgreSQL), once the database
resource has said where that is.
destroy(): SIGKILL the holder's pid 1 (every process of the box goes with it) and slirp4netns.
discover(): boxes whose holder or slirp4netns is alive. revive(): a holder again after a reboot.

Which provider a box gets is decided once, by the first resource that asks (`decide`, from the
ports resource: the numbers a box's processes see inside depend on it) and recorded in
box.data["sandbox"]: {"provider", "mode", "network", "ports": name -> the number seen inside}.
"""
from __future__ import annotations

import contextlib
import functools
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from worktreebox.config.assets import PACKAGE_PARENT
from worktreebox.config.values import INSIDE_PORTS
from worktreebox.errors import WtboxError
from worktreebox.resources.base import Creation, Resource, warn
from worktreebox.system import cgroups, procs

if TYPE_CHECKING:
    from worktreebox.box import Box
    from worktreebox.config.load import RepoConfig
    from worktreebox.context import HostContext
    from worktreebox.providers.sandbox.base import Holder
    from worktreebox.providers.sandbox.base import Sandbox as Provider
    from worktreebox.services.client import SandboxNet

NAME = "sandbox"
OFF = "off"
DB_FORWARD = "db"  # the database forward's name (`wtbox net BOX --down db`)
ENDPOINT_DIR = "endpoint"  # boxes/<id>/endpoint: the socket `wtbox` inside the box talks to
OFF_SAID = "sandbox-off.said"  # in the home: `new` said once that boxes are not sandboxed here
SPARE = "spare"  # box.data[SPARE]: the spare sandbox the box took (resources/sandbox_spares.py)
HOLDER = "sandbox holder"  # provided (Creation.provide) once the holder runs: the worktree's view may mount


class Sandbox(Resource):
    name = NAME
    parallel = True  # made while the worktree is checked out (see the module docstring)
    phase = "sandbox"

    def create(self, c: Creation) -> None:
        try:
            data = decide(c)
            if data["provider"] == OFF:
                return
            box = c.box
            c.note(f"sandbox ({data['mode']} mode, network {data['network']})")
            c.env["HOME"] = str(box.dir / "home")  # the box's user cannot write the caller's
            c.env["WTBOX_BOX_SOCKET"] = str(box.dir / ENDPOINT_DIR / "box.sock")  # `wtbox` inside: services/endpoint.py
            from worktreebox.services.client import SandboxNet, start_supervisor

            # The box's supervisor (its forwards, its endpoint) starts beside the rest of the box, and
            # `new` waits for it only where something is asked of it: the database's forward (`finish`),
            # the box's services (Services.start). Anything else that needs it later waits for one
            # still starting (client.supervisor_pid): a fresh Python's is ~70 ms of imports (no zygote:
            # in process, `wtbox mcp`), which a sandboxed `new` of a box without services waited for.
            if data["mode"] != "root":  # entering a network of another user namespace takes nsenter's -U
                start_supervisor(box, c.secrets, [], daemon_net(c.host, box, make_holder(c.host, box, c.config)),
                                 wait=False)
                return
            if box.data.get(SPARE) and c.use_spare(c):
                return
            # The supervisor's start-up while the holder is made; it enters the network then. The
            # worktree's view waits only for the holder's start (HOLDER), not for its network.
            first = SandboxNet([], procs.Launcher(), forwards=_host_forwards(box, data))
            start_supervisor(box, c.secrets, [], first, wait=False,
                             later=functools.partial(_made_net, c.host, box, c.config, lambda: c.provide(HOLDER)))
        finally:
            c.provide(HOLDER)
            c.provide(self.name)

    def finish(self, c: Creation) -> None:
        """The database forward, now that the database resource knows the server's address; and a
        look that the worktree's view reached the holder (see `check_view`)."""
        if not sandboxed(c.box):
            return
        from worktreebox.services import client, control

        check_view(c.box)
        target = db_target(c.host, c.box)
        if target is None:
            return  # nothing to ask it: `new` ends without waiting for it (see `create`)
        client.wait_started(c.box)  # started in create, alongside the checkout: up by now, or it says why not
        c.box.data[NAME]["db"] = list(target)
        client.checked(client.control_request(c.box, control.FORWARD, data=_db_forward(target).to_json()))

    def settle(self, c: Creation) -> None:
        """A pooled box is made ahead to be claimed warm: its supervisor is up before it is ready (any
        other box is returned while it may still start, see `create`)."""
        if sandboxed(c.box) and c.box.pool is not None:
            from worktreebox.services import client

            client.wait_started(c.box)

    def destroy(self, host: HostContext, box: Box) -> None:
        data = box.data.get(NAME) or {}
        if data.get("provider") == OFF:
            return
        provider_for(data.get("provider")).destroy(box.id, box.dir)

    def discover(self, host: HostContext) -> set[str]:
        return provider_for("namespaces").discover(Path(host.boxes_dir))

    def revive(self, host: HostContext, box: Box) -> None:
        """After a reboot the holder is gone: make it again (its supervisor comes back with `up`).
        Not for a box whose worktree is gone: there is nothing left to hold."""
        data = box.data.get(NAME) or {}
        if data.get("provider") in (None, OFF) or holder_of(box) is not None or not box.path.is_dir():
            return
        provider_for(data["provider"]).destroy(box.id, box.dir)  # what is left of the old one (no record)
        make_holder(host, box, host.repo_config(box))

    def health(self, host: HostContext, box: Box) -> str | None:
        data = box.data.get(NAME) or {}
        if data.get("provider") in (None, OFF) or holder_of(box) is not None:
            return None
        return f"its sandbox is not running; run 'wtbox up {box.id}' to make it again"

    def status(self, host: HostContext, box: Box) -> dict[str, Any] | None:
        data = box.data.get(NAME)
        if not data:
            return None
        out = {k: data[k] for k in ("provider", "mode", "network") if k in data}
        if data.get("provider") != OFF:
            from worktreebox.services.client import read_state, starting

            # (not waited for: `new` describes the box it made as its supervisor may still start)
            state = read_state(box, wait=False)
            out["running"] = holder_of(box) is not None
            out["forwards"] = state.forwards if state else {}
            if state is None and starting(box):
                out["supervisor"] = "starting"
            out["outbound"] = data.get("outbound") or {"down": False, "loss": 0.0}
            out["exposed"] = data.get("exposed") or {}
            out["spare"] = box.data.get(SPARE)  # the spare sandbox it was made with (sandbox_spares.py), or None
        return {"sandbox": out, "host_ports": dict(box.ports), "inside_ports": dict(data.get("ports") or {})}

    def checks(self, host: HostContext) -> list[dict[str, Any]]:
        return [doctor_line(host)]


# ---------------------------------------------------------------- which sandbox, which ports

@functools.lru_cache(maxsize=4)
def _choice(forced: str) -> tuple[str, str]:
    from worktreebox.providers import sandbox

    provider, why = sandbox.choose(None if forced == "auto" else forced)
    return provider.name, why


def choose(host: HostContext) -> tuple[Provider, str]:
    """The provider boxes of this host get ([host] sandbox; auto: the first that works) and why."""
    name, why = _choice(host.config.sandbox)
    return provider_for(name), why


def provider_for(name: str | None) -> Provider:
    from worktreebox.providers import sandbox

    return sandbox.get(name or "namespaces")


def decide(c: Creation) -> dict[str, Any]:
    """box.data["sandbox"], decided on the first call (the ports resource's): provider, mode, network,
    and the port each leased name is seen at inside the box."""
    data = c.box.data.get(NAME)
    if data is None:
        provider, _ = choose(c.host)
        data = {"provider": provider.name, "mode": provider.mode, "network": c.config.box.network}
        c.box.data[NAME] = data
        if provider.name == OFF:
            _say_off_once(c.host)
            return data
        data["outside"] = served_outside(c.host, c.config)
        if provider.mode == "root":
            # before any mount of this box: a bind of boxes/ made later would hide the box's views
            from worktreebox.providers.sandbox.namespaces import share_boxes_dir

            share_boxes_dir(Path(c.host.home))
    return data


def served_outside(host: HostContext, config: RepoConfig) -> list[str]:
    """The box's ports whose server runs outside its network: a docker container (metrics store,
    backing service) publishing the leased port on the host's loopback. They get no host forward;
    the box reaches them through a marked forward of its supervisor to the host (10.0.2.2)."""
    from worktreebox.providers.backing import runtime_for

    obs = config.observability
    names = ["metrics"] if obs.enabled and (obs.provider or getattr(host.config, "observability_provider",
                                                                      "native")) == "docker" else []
    for cfg in config.backing.values():
        try:
            docker = runtime_for(cfg, config.source).runtime == "docker"
        except WtboxError:
            continue  # the backing resource says why, in its own sentence
        names += cfg.port_names if docker else []
    return names


def sandboxed(box: Box) -> bool:
    from worktreebox.providers.sandbox import sandboxed as made_sandboxed

    return made_sandboxed(box)


def inside_ports(config: RepoConfig, leased: dict[str, int], sandboxed: bool) -> dict[str, int]:
    """The number each leased port has inside the box: its canonical one ([box] ports = { web = 3000 },
    wtbox's own helpers at their well-known ports, a backing service at its kind's: Redis at 6379)
    in a sandboxed box, else the leased number. A second backing service of one kind keeps its
    leased number (two Redis cannot both listen on 6379 in one network)."""
    if not sandboxed:
        return dict(leased)
    fixed = {**{k: v for k, v in INSIDE_PORTS.items() if k != "database"}, **config.box.canonical}
    for name, b in config.backing.items():
        if b.port not in fixed.values():
            fixed[name] = b.port
    return {name: fixed.get(name, port) for name, port in leased.items()}


def _say_off_once(host: HostContext) -> None:
    said = Path(host.home) / OFF_SAID
    if said.exists():
        return
    warn("boxes on this host are not sandboxed ([host] sandbox = \"off\", or bubblewrap and its tools do not "
         "work here): a process of one box can see, signal and read every other box; 'wtbox doctor' says why.")
    try:
        said.touch()
    except OSError:
        pass


# ---------------------------------------------------------------- the holder and its supervisor

def holder_of(box: Box) -> Holder | None:
    from worktreebox.providers.sandbox import holder_of as live_holder

    return live_holder(box)


def launcher(box: Box) -> procs.Launcher:
    """How a process of this box is started (providers/sandbox.launcher_for)."""
    from worktreebox.providers.sandbox import launcher_for

    return launcher_for(box)


def make_holder(host: HostContext, box: Box, config: RepoConfig,
                started: Callable[[Holder], None] | None = None) -> Holder:
    """Start the box's holder with what it must see, and record it (run/sandbox.json). `started`: told
    once the holder runs (its namespaces exist), before its network is made."""
    from worktreebox.providers.sandbox.base import LEAF, Spec

    data = box.data[NAME]
    provider = provider_for(data["provider"])
    for sub in ("worktree", "cache", "tmp", "home", "git", "browser", ENDPOINT_DIR, "run"):
        (box.dir / sub).mkdir(parents=True, exist_ok=True)
    spec = Spec(box.id, Path(host.home), box.dir, binds(box, config, provider), network=data["network"],
                gateway=config.database.mode != "none")
    leaf = cgroups.Leaf(host.home, box.id, LEAF) if cgroups.for_home(host.home) is not None else None
    holder = provider.create(spec, cgroup=leaf, started=started)
    if holder is None:
        raise WtboxError(f"The sandbox of box {box.id} could not be made.")
    return holder


def binds(box: Box, config: RepoConfig, provider: Provider) -> list[Any]:
    """What the box sees besides the host read-only: its own dirs writable, the repository's git
    dir read-only (its git dir borrows the objects), its endpoint's dir read-only, and read-only the
    toolchains its PATH names that its user could not reach otherwise."""
    from worktreebox.providers.sandbox import layout
    from worktreebox.providers.sandbox.base import Bind, box_binds
    from worktreebox.providers.sandbox.gitdir import common_dir
    from worktreebox.services.boxenv import DATA_KEY

    out = box_binds(box.dir, repo_git=common_dir(Path(box.repo)))
    out += [Bind(box.dir / "browser"), Bind(box.dir / ENDPOINT_DIR, writable=False)]
    uid, gid = provider.box_user()
    path = (box.data.get(DATA_KEY) or {}).get("PATH") or os.environ.get("PATH", "")
    extra = [sys.executable, sys.prefix, sys.base_prefix, str(PACKAGE_PARENT)]
    taken, home = {b.src for b in out}, box.dir.parent.parent
    # never one that holds the home: bound over its mask, it would show every box and the registry
    out += [Bind(p, writable=False) for p in layout.toolchain(path.split(os.pathsep), extra, uid=uid, gids={gid})
            if p not in taken and p != home and p not in home.parents]
    return out


@contextlib.contextmanager
def build_sandbox(host: HostContext, box: Box, build_dir: Path) -> Iterator[procs.Launcher]:
    """A sandbox of its own for building a dependency layer for `box` (the build runs the repository's
    commands: npm's install scripts, setup.py): as the box's user, its network open, `build_dir`'s
    work/ and home/ and the shared download caches writable, nothing else of the home; it ends with
    the block, and with the process that made it (a kill -9 of `new` leaves nothing of it). What it
    builds is the box user's, as copy-up in every box's view needs. No sandbox: the launcher as is."""
    if not sandboxed(box):
        yield procs.Launcher()
        return
    from worktreebox.box import hex_of
    from worktreebox.layers import downloads
    from worktreebox.providers.sandbox import layout
    from worktreebox.providers.sandbox.base import Bind, Spec
    from worktreebox.system.users import give_tree

    provider = provider_for(box.data[NAME]["provider"])
    uid, gid = provider.box_user()
    shared = downloads.root(Path(host.home))
    # a cache kept elsewhere (a symlink to a bigger disk) is bound where it really is, too
    caches = [shared, *{Path(os.path.realpath(shared / sub)) for sub in downloads.CACHES.values()
                        if (shared / sub).is_symlink() and (shared / sub).is_dir()}]
    for path in (build_dir / "home", build_dir / "run"):
        path.mkdir(parents=True, exist_ok=True)
    for path in (build_dir / "work", build_dir / "home", *caches):
        give_tree(path, uid, gid)  # what was written by others (a build before sandboxes): the build's user's
    extra = [sys.executable, sys.prefix, sys.base_prefix]
    tools = layout.toolchain(os.environ.get("PATH", "").split(os.pathsep), extra, uid=uid, gids={gid})
    spec = Spec(f"build-{hex_of(box.id)}", Path(host.home), build_dir,
                [Bind(build_dir / "work"), Bind(build_dir / "home"), *(Bind(c) for c in caches),
                 *(Bind(p, writable=False) for p in tools)], transient=True)
    holder = provider.create(spec)
    try:
        yield provider.launcher(holder)
    finally:
        provider.destroy(spec.box_id, build_dir)
        give_tree(build_dir / "work", uid, gid)  # what the host moved or rewrote after the build, too


def check_view(box: Box) -> None:
    """The worktree's copy-on-write view, mounted on the host while the holder started, reaches the
    holder through boxes/, a shared mount. A program that copies the host's mounts into a namespace of
    its own and detaches them there without making them private first (pasta 2023, slirp4netns's
    --enable-sandbox: both seen on this host) takes that mount down for everyone: then the box would
    see an empty worktree. Said here in one sentence instead (and `new` rolls back)."""
    from worktreebox.providers.mounts.base import is_mountpoint
    from worktreebox.system import procfs

    holder = holder_of(box)
    if holder is None or not is_mountpoint(box.path):
        return
    try:
        same = os.stat(procfs.root_path(holder.pid, box.path)).st_dev == os.stat(box.path).st_dev
    except OSError:
        same = False
    if not same:
        raise WtboxError(f"The worktree of {box.id} did not reach its sandbox: {box.path.parent.parent} is no "
                         "longer a shared mount (a program on this host unmounted it); make the box again.")


def daemon_net(host: HostContext, box: Box, holder: Holder | None = None) -> SandboxNet:
    """How the box's supervisor starts in its network: its forwards (every leased port, the exposed
    ones, the database's once known) and the faults `wtbox net` left on them."""
    from worktreebox.providers.sandbox.base import load
    from worktreebox.services.client import SandboxNet

    data = box.data[NAME]
    provider = provider_for(data["provider"])
    holder = holder or load(box.run_dir)
    from worktreebox.providers.sandbox.network import GATEWAY
    from worktreebox.services.spec import ForwardSpec

    db = [_db_forward(tuple(data["db"]))] if data.get("db") else []
    seen = data.get("ports") or {}
    outside = [ForwardSpec(n, (GATEWAY, box.ports[n]), listen=("127.0.0.1", seen.get(n, box.ports[n])), mark=True)
               for n in data.get("outside") or () if n in box.ports]
    net = SandboxNet(enter=provider.netns_command(holder, []), launcher=provider.launcher(holder),
                     forwards=_host_forwards(box, data), inside=[*db, *outside], faults=dict(data.get("faults") or {}))
    if data.get("mode") == "root" and holder is not None:  # the supervisor enters it itself: no nsenter exec
        from worktreebox.system import procfs

        net.enter, net.netns = [], procfs.namespace_file(holder.pid, "net")
    return net


def _host_forwards(box: Box, data: dict[str, Any]) -> list[Any]:
    """A forward per leased port (host 127.0.0.1:<leased> -> box 127.0.0.1:<inside>) and per exposed one."""
    from worktreebox.services.client import HostForward

    inside, outside = data.get("ports") or {}, set(data.get("outside") or ())
    forwards = [HostForward(name, port, ("127.0.0.1", inside.get(name, port))) for name, port in box.ports.items()
                if name not in outside]
    for host_port, name in (data.get("exposed") or {}).items():
        forwards.append(HostForward(f"expose:{host_port}", int(host_port), ("127.0.0.1", inside.get(name, 0))))
    return forwards


def _made_net(host: HostContext, box: Box, config: RepoConfig, started: Callable[[], None],
              give: Callable[[SandboxNet], None]) -> None:
    """Make the holder; as soon as it runs, give the supervisor its network (root mode: it enters it
    itself) and say it runs (`started`): the supervisor starts and the worktree's view is mounted
    while the holder's network (firewall, slirp4netns) is made."""
    def running(holder: Holder) -> None:
        give(daemon_net(host, box, holder))
        started()

    make_holder(host, box, config, running)


@contextlib.contextmanager
def forwarded(box: Box, name: str, host_port: int, inside: int) -> Iterator[None]:
    """A forward for the length of a block (a cold browse's DevTools port): the host's port bound
    here and handed to the box's supervisor; nothing to do for a box without a sandbox."""
    if not sandboxed(box):
        yield
        return
    from worktreebox.services import client, control
    from worktreebox.services.spec import ForwardSpec

    sock = client.HostForward(name, host_port, ("127.0.0.1", inside)).bind()
    try:
        client.checked(client.control_request(box, control.FORWARD, data=ForwardSpec(name, ("127.0.0.1", inside))
                                              .to_json(), fds=[sock.fileno()]))
    finally:
        sock.close()  # the supervisor holds it now
    try:
        yield
    finally:
        with contextlib.suppress(OSError, ValueError, WtboxError):
            client.control_request(box, control.UNFORWARD, data={"name": name}, timeout=10)


def db_target(host: HostContext, box: Box) -> tuple[str, int] | None:
    """Where a sandboxed box's database forward goes: the server's address, the host's loopback
    seen through slirp4netns's gateway."""
    from worktreebox.providers.postgres import server
    from worktreebox.providers.sandbox.network import GATEWAY

    db = box.data.get("database")
    if not sandboxed(box) or not db or db.get("mode") == "none":
        return None
    srv = server(host, db.get("provider"))
    addr = srv.box_host
    loopback = addr in ("localhost", "::1") or addr.startswith("127.")
    return (GATEWAY if loopback else addr, int(srv.box_port))


def _db_forward(target: tuple[str, int]) -> Any:
    from worktreebox.services.spec import ForwardSpec

    return ForwardSpec(DB_FORWARD, (str(target[0]), int(target[1])), listen=("127.0.0.1", INSIDE_PORTS["database"]),
                       mark=True)


# ---------------------------------------------------------------- doctor

def doctor_line(host: HostContext) -> dict[str, Any]:
    """Which sandbox boxes get here, in which mode, and how `wtbox net` makes delays."""
    try:
        provider, why = choose(host)
    except WtboxError as e:
        return {"check": "sandbox", "ok": False, "detail": str(e)}
    if provider.name == OFF:
        return {"check": "sandbox", "ok": True, "sandbox": {"provider": OFF},
                "detail": f"OFF ({why}): a process of one box can see, signal and read every other box, "
                          "the host's loopback and its files as wtbox's own user"}
    from worktreebox.providers.sandbox.network import netem_in_kernel

    faults = "netem and the forwards" if netem_in_kernel() else "the forwards only (this kernel has no netem)"
    return {"check": "sandbox", "ok": True, "sandbox": {"provider": provider.name, "mode": provider.mode},
            "detail": f"{provider.name}, {provider.mode} mode ({why}); `wtbox net` delays traffic with {faults}"}
