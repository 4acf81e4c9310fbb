"""The host's PostgreSQL as one long-lived container (the `docker` database provider).

One container `wtbox-pg-<home hash>` per wtbox home, started through testcontainers
from the configured image (HostConfig.postgres_image / WTBOX_POSTGRES_IMAGE), published
on 127.0.0.1:<leased port>, data in the labelled volume `wtbox-pg-<home hash>`. The
container is disposable (stop removes it), the volume is not: the data survives `db stop`.
Boxes reach it exactly like an external server at `superuser_url(host)`, so schema and
database isolation are the database resource's shared code.

The superuser password is generated once and kept only in $WTBOX_HOME/postgres-docker.json
(mode 0600). `start` is idempotent and serialised by a file lock.
"""
from __future__ import annotations

import contextlib
import json
import os
import secrets
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from worktreebox.errors import WtboxError
from worktreebox.providers import docker_engine as engine
from worktreebox.providers.postgres.base import forget_connections
from worktreebox.providers.postgres.external import ExternalServer
from worktreebox.system import readiness
from worktreebox.system.fsutil import atomic_write, file_lock

if TYPE_CHECKING:
    from worktreebox.context import HostContext

PORT_OWNER = "@postgres-docker"
STATE_FILE = "postgres-docker.json"
LOCK_FILE = "postgres-docker.lock"
SUPERUSER = "postgres"
DBNAME = "wtbox"  # the shared database boxes' schemas live in, as with the embedded cluster
DATA_DIR = "/var/lib/postgresql/data"
READY_LINE = r"database system is ready to accept connections"
START_TIMEOUT = 120.0
IMAGE_SETTING = "[database] image in config.toml or WTBOX_POSTGRES_IMAGE"


def name(host: HostContext) -> str:
    """Container and volume name of the host's PostgreSQL."""
    return f"wtbox-pg-{engine.home_hash(host.home)}"


# ---------------------------------------------------------------- credentials

def _state_path(host: HostContext) -> Path:
    return host.home / STATE_FILE


def _credentials(host: HostContext, *, create: bool) -> dict[str, str] | None:
    """{user, password, dbname} from the 0600 state file; generated on first start."""
    path = _state_path(host)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        if not create:
            return None
    except (OSError, ValueError) as e:
        raise WtboxError(f"{path} is unreadable ({e}); "
                         f"remove it together with the docker volume {name(host)}.") from None
    creds = {"user": SUPERUSER, "password": secrets.token_urlsafe(24), "dbname": DBNAME}
    host.home.mkdir(parents=True, exist_ok=True)
    atomic_write(path, json.dumps(creds), mode=0o600)
    return creds


def _lock(host: HostContext) -> contextlib.AbstractContextManager[None]:
    return file_lock(host.home / LOCK_FILE, what="the docker PostgreSQL lock")


# ---------------------------------------------------------------- readiness

class _Login(readiness.Strategy):
    """The superuser can log in over TCP (a password the volume was not made with is an error at once)."""

    def __init__(self, address: tuple[str, int], creds: dict[str, str]) -> None:
        self.address, self.creds = address, creds
        self.last = "no answer yet"

    def ready(self, timeout: float) -> bool:
        import psycopg

        try:
            psycopg.connect(host=self.address[0], port=self.address[1], user=self.creds["user"],
                            password=self.creds["password"], dbname=self.creds["dbname"],
                            connect_timeout=max(1, round(timeout))).close()
            return True
        except psycopg.OperationalError as e:
            self.last = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if "password authentication failed" in self.last:
            raise WtboxError(f"The docker PostgreSQL rejects the password in {STATE_FILE}; its volume was "
                             "initialised with another one (remove the volume to start afresh).")
        return False


def _wait_ready(target: Any, address: tuple[str, int], creds: dict[str, str], *, fresh: bool) -> None:
    """Until the superuser can log in. A fresh container says "ready" in its log first (testcontainers'
    LogMessageWaitStrategy), but the line alone is not enough with the upstream image: on first
    start it prints it once for its private init server, before the real one listens."""
    from testcontainers.core.wait_strategies import LogMessageWaitStrategy

    login = _Login(address, creds)
    ready: readiness.Strategy = login
    if fresh:
        ready = engine.WaitProbe(LogMessageWaitStrategy(READY_LINE).with_poll_interval(0.05), target) & login
    why = readiness.wait(ready, START_TIMEOUT, alive=engine.running(target), poll=0.05, poll_max=0.1)
    if why == readiness.EXITED:
        raise WtboxError(f"The docker PostgreSQL container exited during start: {engine.last_logs(target)[-400:]}")
    if why == readiness.TIMEOUT:
        raise WtboxError(f"The PostgreSQL container did not become ready (no login within {START_TIMEOUT:g}s: "
                         f"{login.last[:200]}): {engine.last_logs(target)[-300:]}")


def _publish_on_loopback(tc: Any, container_port: int, host_port: int) -> None:
    """Publish the port on 127.0.0.1 only: the superuser must not be reachable from the network.

    testcontainers' public API cannot say so: `with_bind_ports` takes a host port and no address,
    and `with_kwargs(ports=...)` collides with the `ports` it passes to docker itself. So its
    `ports` table is set directly, with the (address, port) pair the docker SDK takes there."""
    tc.ports[f"{container_port}/tcp"] = ("127.0.0.1", host_port)


# ---------------------------------------------------------------- start / stop / status

def _find(c: Any, host: HostContext) -> Any | None:
    import docker.errors

    try:
        return c.containers.get(name(host))
    except docker.errors.NotFound:
        return None


def _address(container: Any, port: int) -> tuple[str, int]:
    """Where this process reaches the server: the published port, or the bridge IP when the
    daemon is another machine's (see engine.configure_testcontainers)."""
    if os.environ.get("TESTCONTAINERS_CONNECTION_MODE") == "bridge_ip":
        container.reload()
        nets = container.attrs["NetworkSettings"]["Networks"]
        ip = next((n.get("IPAddress") for n in nets.values() if n.get("IPAddress")), None)
        if ip:
            return ip, 5432
    return "127.0.0.1", port


def start(host: HostContext) -> dict[str, Any]:
    """Start (or reuse) the container; returns {host, port, user, password, dbname}."""
    engine.testcontainers()
    c = engine.client()
    with _lock(host):
        existing = _find(c, host)
        creds = _credentials(host, create=True)
        assert creds is not None
        port = host.lease_host_port(PORT_OWNER)
        if existing is not None and existing.status == "running" and _published_port(existing) == port:
            addr = _address(existing, port)
            # Running, but perhaps just restarted by dockerd: ready means "accepts a login".
            _wait_ready(engine.Attached(existing), addr, creds, fresh=False)
            return _info(addr, creds)
        if existing is not None:
            # Stopped, exited, or published elsewhere: the container is disposable, the volume is not.
            existing.remove(force=True)
        return _create(c, host, creds, port)


def _published_port(container: Any) -> int | None:
    ports = (container.attrs.get("HostConfig") or {}).get("PortBindings") or {}
    for binding in ports.get("5432/tcp") or []:
        with contextlib.suppress(TypeError, ValueError):
            return int(binding.get("HostPort"))
    return None


def _create(c: Any, host: HostContext, creds: dict[str, str], port: int) -> dict[str, Any]:
    import docker.errors
    from testcontainers.core.container import DockerContainer

    image = host.config.postgres_image
    engine.ensure_image(c, image, "PostgreSQL", IMAGE_SETTING)
    vol = name(host)
    made_volume = False
    try:
        c.volumes.get(vol)
    except docker.errors.NotFound:
        c.volumes.create(vol, labels=engine.labels(host.home, role="postgres"))
        made_volume = True
    cmd = ["postgres", "-c", "max_connections=300"]
    initdb_args = ""
    if host.config.fsync_off:
        # Disposable dev data: durability costs more than it is worth (as with the embedded cluster).
        cmd += ["-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off"]
        initdb_args = "--no-sync"
    tc = (
        DockerContainer(image, command=cmd)  # type: ignore[arg-type]  # docker-py takes argv; typed as str
        .with_name(vol)
        .with_env("POSTGRES_USER", creds["user"])
        .with_env("POSTGRES_PASSWORD", creds["password"])
        .with_env("POSTGRES_DB", creds["dbname"])
        .with_env("POSTGRES_INITDB_ARGS", initdb_args)
        .with_volume_mapping(vol, DATA_DIR, "rw")
        .with_kwargs(labels=engine.labels(host.home, role="postgres"),
                     restart_policy={"Name": "unless-stopped"})
    )
    _publish_on_loopback(tc, 5432, port)
    try:
        tc.start()
    except docker.errors.APIError as e:
        _remove_quietly(c, vol, made_volume)
        if engine.port_conflict(e):
            raise WtboxError(f"Port {port} on 127.0.0.1 is already in use, so the PostgreSQL container cannot "
                             "publish it; stop what holds it or run 'wtbox gc'.") from None
        raise WtboxError(f"Docker could not start the PostgreSQL container: {engine.first_line(e)}.") from None
    addr = _address(tc.get_wrapped_container(), port)
    try:
        _wait_ready(tc, addr, creds, fresh=True)
    except WtboxError:
        _remove_quietly(c, vol, made_volume)
        raise
    return _info(addr, creds)


def _remove_quietly(c: Any, container_name: str, volume_too: bool) -> None:
    """Undo a failed start; a volume is removed only if this start made it (half-initialised)."""
    import docker.errors

    with contextlib.suppress(docker.errors.DockerException):
        c.containers.get(container_name).remove(force=True)
    if volume_too:
        with contextlib.suppress(docker.errors.DockerException):
            c.volumes.get(container_name).remove(force=True)


def _info(addr: tuple[str, int], creds: dict[str, str]) -> dict[str, Any]:
    return {"host": addr[0], "port": addr[1], "user": creds["user"], "password": creds["password"],
            "dbname": creds["dbname"]}


def superuser_url(host: HostContext, *, ensure_running: bool = True) -> str:
    """postgresql:// URL of the superuser (starts the container unless told not to)."""
    info = start(host) if ensure_running else _current_info(host)
    return (f"postgresql://{quote(info['user'], safe='')}:{quote(info['password'], safe='')}"
            f"@{info['host']}:{info['port']}/{quote(info['dbname'], safe='')}")


def _current_info(host: HostContext) -> dict[str, Any]:
    """Connection facts without starting anything (the password is made if it does not exist yet)."""
    creds = _credentials(host, create=True)
    assert creds is not None
    port = host.lease_host_port(PORT_OWNER)
    addr: tuple[str, int] = ("127.0.0.1", port)
    if os.environ.get("TESTCONTAINERS_CONNECTION_MODE") == "bridge_ip" and engine.docker_available()[0]:
        existing = _find(engine.client(), host)
        if existing is not None:
            addr = _address(existing, port)
    return _info(addr, creds)


def stop(host: HostContext) -> bool:
    """Stop and remove the container (the volume keeps the data); True if one was running."""
    c = engine.client()
    with _lock(host):
        existing = _find(c, host)
        if existing is None:
            return False
        was_running = existing.status == "running"
        # SIGINT (the image's STOPSIGNAL) is a fast shutdown: sessions are cut, data is consistent.
        with contextlib.suppress(Exception):
            existing.stop(timeout=10)
        existing.remove(force=True)
        return was_running


def destroy(host: HostContext) -> None:
    """Remove container, volume, port lease and password: the host's docker PostgreSQL is gone."""
    with _lock(host):
        if engine.docker_available()[0]:
            engine.remove_labelled(host.home, host_level=True)
        host.release_host_port(PORT_OWNER)
        with contextlib.suppress(FileNotFoundError):
            _state_path(host).unlink()


def status(host: HostContext) -> dict[str, Any]:
    """What `wtbox db status` shows for the docker provider (never the password)."""
    out: dict[str, Any] = {"provider": "docker", "container": name(host), "volume": name(host),
                           "image": host.config.postgres_image, "running": False,
                           "port": host.registry.ports_of(PORT_OWNER).get(PORT_OWNER.lstrip("@")),
                           "host": "127.0.0.1"}
    ok, why = engine.docker_available()
    if not ok:
        out["error"] = why
        return out
    c = engine.client()
    existing = _find(c, host)
    if existing is not None:
        out["running"] = existing.status == "running"
        out["state"] = existing.status
        out["image"] = existing.attrs.get("Config", {}).get("Image", out["image"])
        out["id"] = existing.short_id
    return out


class DockerServer(ExternalServer):
    """The container seen as an external server: schema and database isolation are shared code."""

    provider = "docker"

    def __init__(self, host: HostContext) -> None:
        # No start here: `db status` must not start anything. The first connection that
        # fails calls ensure_running (Server._open).
        engine.configure_testcontainers()
        self.host = host
        super().__init__(superuser_url(host, ensure_running=False))

    @classmethod
    def from_host(cls, host: HostContext) -> DockerServer:
        return cls(host)

    def key(self) -> str:
        return f"docker:{name(self.host)}"

    def ensure_running(self) -> None:
        start(self.host)

    def is_running(self) -> bool:
        return _is_running(self.host)

    def describe(self) -> str:
        return f"docker container {name(self.host)}"

    def stop(self) -> bool:
        """`wtbox db stop`: remove the container, keep the volume; True if it was running."""
        forget_connections()
        return stop(self.host)

    def status(self) -> dict[str, Any]:
        out = status(self.host)
        if out["running"]:
            with contextlib.suppress(WtboxError), self.session() as conn:
                out["version"] = conn.execute("SHOW server_version").fetchone()[0]  # type: ignore[index]  # SHOW: one row
        return out


def _is_running(host: HostContext) -> bool:
    if not engine.docker_available()[0]:
        return False
    existing = _find(engine.client(), host)
    return existing is not None and existing.status == "running"
