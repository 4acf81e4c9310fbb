"""Docker for the docker providers: availability, testcontainers setup, and wtbox's labels.

Every container, volume and network wtbox creates carries `wtbox.home=<home hash>` plus
`wtbox.box=<id>` (per box) or `wtbox.host=<home hash>` (host level). `rm` and `gc` find
them by label alone, so a crashed `wtbox new` leaves nothing that cannot be swept.

Ryuk is never used: it removes containers when the creating process exits, which is
wrong for boxes that outlive the CLI. wtbox's own sweep replaces it.

The docker SDK and testcontainers are imported inside functions: this module is on the
path of `wtbox doctor` and of the resources, not of `wtbox ls`.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from worktreebox.errors import WtboxError
from worktreebox.system import httpclient, procs, readiness

if TYPE_CHECKING:
    import docker

HOME_LABEL = "wtbox.home"
BOX_LABEL = "wtbox.box"
HOST_LABEL = "wtbox.host"
ROLE_LABEL = "wtbox.role"
DEFAULT_SOCKET = "/var/run/docker.sock"
PING_TIMEOUT = 2.0


def home_hash(home: str | Path) -> str:
    """12 hex digits naming a wtbox home in labels and container names."""
    return hashlib.sha256(str(Path(home)).encode()).hexdigest()[:12]


def labels(home: str | Path, box_id: str | None = None, role: str | None = None) -> dict[str, str]:
    """Labels for a box's thing (box_id given) or a host-level thing (box_id None)."""
    h = home_hash(home)
    out = {HOME_LABEL: h}
    if box_id:
        out[BOX_LABEL] = box_id
    else:
        out[HOST_LABEL] = h
    if role:
        out[ROLE_LABEL] = role
    return out


# ---------------------------------------------------------------- availability

def _socket_path() -> str | None:
    """The unix socket of the daemon, or None when DOCKER_HOST names a TCP/SSH daemon."""
    url = os.environ.get("DOCKER_HOST", "")
    if not url:
        return DEFAULT_SOCKET
    if url.startswith("unix://"):
        return url[len("unix://"):]
    return None


def docker_available(timeout: float = PING_TIMEOUT) -> tuple[bool, str]:
    """(True, version) when a daemon answers a ping, else (False, one sentence saying why)."""
    path = _socket_path()
    if path is None:
        return _ping_with_sdk(timeout)
    if not os.path.exists(path):
        return False, (f"Docker is not running: {path} does not exist "
                       "(install docker.io and start dockerd, e.g. scripts/start_dockerd.sh).")
    try:
        reply = httpclient.get("http://docker/_ping", timeout=timeout, unix_socket=path)
    except PermissionError:
        return False, f"Docker is not usable: permission denied on {path} (add this user to the docker group)."
    except TimeoutError:
        return False, f"Docker is not usable: the daemon on {path} did not answer within {timeout:g}s."
    except httpclient.HttpError as e:
        return False, f"Docker is not usable: the daemon on {path} answered something else ({e})."
    except OSError as e:
        return False, f"Docker is not running: cannot connect to {path} ({e.strerror or e}); start dockerd."
    if reply.status != 200 or reply.body.strip() != b"OK":
        return False, f"Docker is not usable: the daemon on {path} answered {reply.status}."
    version = reply.headers.get("api-version", "")
    return True, f"docker API {version}" if version else "docker is running"


def _ping_with_sdk(timeout: float) -> tuple[bool, str]:
    try:
        import docker
    except ImportError:
        return False, "Docker support is not installed (pip install testcontainers)."
    try:
        c = docker.from_env(timeout=int(max(1, timeout)))
        c.ping()
        return True, f"docker API {c.version().get('ApiVersion', '?')}"
    except Exception as e:  # any transport error means "not usable"
        return False, f"Docker is not usable at {os.environ.get('DOCKER_HOST')}: {first_line(e)}."


def require_docker() -> None:
    """Raise WtboxError with the reason when no daemon answers."""
    ok, why = docker_available()
    if not ok:
        raise WtboxError(why)


# ---------------------------------------------------------------- testcontainers setup

def inside_container() -> bool:
    return os.path.exists("/.dockerenv")


def daemon_is_local() -> bool:
    """True when dockerd runs in our own network namespace (started in this machine or container)."""
    if _socket_path() is None:
        return False
    try:
        name = procs.comm(int(Path("/var/run/docker.pid").read_text().strip()))
        if name is not None:
            return name == "dockerd"
    except (OSError, ValueError):
        pass
    return bool(procs.pids_named("dockerd"))


def configure_testcontainers() -> None:
    """Environment testcontainers reads at import time; explicit user settings win, except Ryuk.

    Inside a container, testcontainers assumes the daemon is the outer host's (it connects to
    the default gateway). When dockerd runs in our own container, published ports are on our
    loopback: connect to 127.0.0.1. With the outer host's daemon (socket mounted), only the
    containers' bridge addresses are reachable from here.
    """
    os.environ["TESTCONTAINERS_RYUK_DISABLED"] = "true"
    if inside_container() and not os.environ.get("TESTCONTAINERS_CONNECTION_MODE"):
        if daemon_is_local():
            os.environ["TESTCONTAINERS_CONNECTION_MODE"] = "docker_host"
            if not os.environ.get("TC_HOST"):
                os.environ.setdefault("TESTCONTAINERS_HOST_OVERRIDE", "127.0.0.1")
        else:
            os.environ["TESTCONTAINERS_CONNECTION_MODE"] = "bridge_ip"


def testcontainers() -> Any:
    """Import testcontainers configured for wtbox; returns testcontainers.core.config's object."""
    configure_testcontainers()
    try:
        from testcontainers.core.config import ConnectionMode
        from testcontainers.core.config import testcontainers_config as cfg
    except ImportError:
        raise WtboxError("The docker providers need testcontainers (pip install 'testcontainers>=4').") from None
    # testcontainers reads the environment once, at import; it may have been imported first.
    cfg.ryuk_disabled = True
    mode = os.environ.get("TESTCONTAINERS_CONNECTION_MODE")
    if mode and cfg.connection_mode_override is None:
        cfg.connection_mode_override = ConnectionMode(mode)
    host = os.environ.get("TC_HOST") or os.environ.get("TESTCONTAINERS_HOST_OVERRIDE")
    if host and not cfg.tc_host_override:
        cfg.tc_host_override = host
    return cfg


def client(timeout: int = 30) -> docker.DockerClient:
    """A docker SDK client; WtboxError with one sentence when the daemon is not usable."""
    require_docker()
    try:
        import docker
    except ImportError:
        raise WtboxError("The docker providers need the docker SDK (pip install 'testcontainers>=4').") from None
    return docker.from_env(timeout=timeout)


def ensure_image(c: docker.DockerClient, image: str, what: str, setting: str) -> None:
    """Make sure `image` is local (pulling it once if it is not); one sentence on failure."""
    import docker.errors

    try:
        c.images.get(image)
        return
    except docker.errors.ImageNotFound:
        pass
    try:
        c.images.pull(image)
    except docker.errors.DockerException as e:
        text = str(e)
        why = ("no image registry is reachable" if "no such host" in text or "dial tcp" in text
               else first_line(e)[:200])
        raise WtboxError(
            f"The {what} image {image!r} is not on this machine and could not be pulled ({why}); "
            f"build local images with scripts/build_images.sh and set {setting}, or pull it."
        ) from None


class Attached:
    """testcontainers' WaitStrategyTarget over a container that already exists (a docker SDK
    container), so its wait strategies run on it without reaching into DockerContainer."""

    def __init__(self, container: Any, host_ip: str = "127.0.0.1") -> None:
        self.container = container
        self.host_ip = host_ip

    def get_container_host_ip(self) -> str:
        return self.host_ip

    def get_exposed_port(self, port: int) -> int:
        """The published host port, or `port` itself (host network)."""
        bindings = (self.container.attrs.get("NetworkSettings") or {}).get("Ports") or {}
        for binding in bindings.get(f"{port}/tcp") or []:
            with contextlib.suppress(TypeError, ValueError):
                return int(binding.get("HostPort"))
        return port

    def get_wrapped_container(self) -> Any:
        return self.container

    def get_logs(self) -> tuple[bytes, bytes]:
        return self.container.logs(stdout=True, stderr=False), self.container.logs(stdout=False, stderr=True)

    def reload(self) -> None:
        self.container.reload()

    @property
    def status(self) -> str:
        return self.container.status


class WaitProbe(readiness.Strategy):
    """One of testcontainers' public wait strategies as one readiness probe: it waits at most the
    probe's timeout, so `readiness.wait` can ask between probes whether the container still runs
    (`running`) and fail fast when it exited, which no public strategy does while it polls HTTP."""

    def __init__(self, strategy: Any, target: Any) -> None:
        self.strategy, self.target = strategy, target

    def ready(self, timeout: float) -> bool:
        # One second of the strategy's own polling, whatever the probe's timeout: testcontainers takes
        # whole seconds, and a shorter slice is what notices an exited container soonest.
        try:
            self.strategy.with_startup_timeout(1).wait_until_ready(self.target)
        except (TimeoutError, RuntimeError):  # RuntimeError: a log strategy saw the container exit
            return False
        return True


def running(target: Any) -> Callable[[], bool]:
    """alive() for readiness.wait: the container (a WaitStrategyTarget) has not exited."""
    import docker.errors

    def alive() -> bool:
        try:
            wrapped = target.get_wrapped_container()
            wrapped.reload()
        except docker.errors.NotFound:
            return False
        return wrapped.status not in ("exited", "dead")

    return alive


def last_logs(target: Any, lines: int = 5) -> str:
    """The container's last log lines on one line (for a one-sentence error)."""
    return target.get_wrapped_container().logs(tail=lines).decode(errors="replace").strip().replace("\n", " | ")


# ---------------------------------------------------------------- labelled things

def _filters(home: str | Path, box_id: str | None, host_level: bool) -> dict[str, Any]:
    want = [f"{HOME_LABEL}={home_hash(home)}"]
    if box_id:
        want.append(f"{BOX_LABEL}={box_id}")
    elif host_level:
        want.append(f"{HOST_LABEL}={home_hash(home)}")
    return {"label": want}


def find_labelled(home: str | Path, box_id: str | None = None, *, host_level: bool = False,
                  c: docker.DockerClient | None = None) -> dict[str, list]:
    """Containers (any state), volumes and networks of this home: of one box, host-level ones, or all."""
    c = c or client()
    f = _filters(home, box_id, host_level)
    return {
        # ignore_removed: a container removed between list and inspect is simply gone.
        "containers": c.containers.list(all=True, filters=f, ignore_removed=True),
        "volumes": c.volumes.list(filters=f),
        "networks": c.networks.list(filters=f),
    }


def labelled_box_ids(home: str | Path, c: docker.DockerClient | None = None) -> set[str]:
    """Box ids owning a labelled container, volume or network (the docker half of `discover`)."""
    found = find_labelled(home, c=c)
    ids = set()
    for kind in ("containers", "volumes", "networks"):
        for obj in found[kind]:
            attrs = obj.attrs if kind != "containers" else obj.attrs.get("Config", {})
            box = (attrs.get("Labels") or {}).get(BOX_LABEL)
            if box:
                ids.add(box)
    return ids


def remove_labelled(home: str | Path, box_id: str | None = None, *, host_level: bool = False,
                    c: docker.DockerClient | None = None) -> dict[str, int]:
    """Remove what find_labelled finds (a box's, or with host_level the host's); idempotent.

    Refuses to sweep the whole home without saying which half: the host's PostgreSQL
    volume holds every box's data and must never go with a box.
    """
    import docker.errors

    if not box_id and not host_level:
        raise ValueError("remove_labelled needs box_id or host_level=True")
    c = c or client()
    found = find_labelled(home, box_id, host_level=host_level, c=c)
    counts = {"containers": 0, "volumes": 0, "networks": 0}
    # Containers first: a volume or network in use cannot be removed.
    for kind in ("containers", "networks", "volumes"):
        for obj in found[kind]:
            try:
                if kind == "containers":
                    obj.remove(force=True, v=True)
                else:
                    obj.remove()
                counts[kind] += 1
            except docker.errors.NotFound:
                pass
            except docker.errors.APIError as e:
                error = WtboxError(f"Cannot remove docker {kind[:-1]} {_name(obj)}: {first_line(e)}.")
                if kind == "containers" and _removal_in_progress(str(e)):
                    _wait_removed(functools.partial(_sdk_gone, obj, docker.errors.NotFound), error)
                elif kind != "containers" and _in_use(str(e)):
                    _wait_removed(functools.partial(_sdk_removed, obj, docker.errors), error)
                else:
                    raise error from None
                counts[kind] += 1
    return counts


def _name(obj: Any) -> str:
    return str(getattr(obj, "name", None) or getattr(obj, "short_id", "?"))


def first_line(e: BaseException) -> str:
    """The first line of a docker error, without a trailing period (for one-sentence errors)."""
    text = str(e).strip().splitlines()
    return (text[0] if text else type(e).__name__).rstrip(".")


def port_conflict(e: BaseException) -> bool:
    """True when a docker error (or container log) says the host port is taken."""
    text = str(e).lower()
    return "port is already allocated" in text or "address already in use" in text


# ---------------------------------------------------------------- for rm / gc
# The Engine API on the unix socket through the one HTTP client: `rm` and `gc` call these for
# every box, and the docker SDK alone costs ~170 ms to import.

class DockerConflict(WtboxError):
    """Docker answered 409: e.g. "removal of container … is already in progress"."""


def _api(method: str, path: str, timeout: float = 30.0) -> Any:
    import json

    reply = httpclient.request(method, f"http://docker{path}", timeout=timeout, unix_socket=_socket_path())
    if reply.status == 404:
        return None
    if reply.status >= 400:
        try:
            msg = json.loads(reply.body).get("message", "")
        except ValueError:
            msg = reply.text()
        kind = DockerConflict if reply.status == 409 else WtboxError
        raise kind(f"Docker refused {method} {path.split('?')[0]}: {msg.strip()[:200]}.")
    return json.loads(reply.body) if reply.body.strip() else None


def _remove_container(container_id: str) -> None:
    """DELETE a container; when another removal of it is under way, wait until that one is done."""
    try:
        _api("DELETE", f"/containers/{container_id}?force=1&v=1")
    except DockerConflict as e:
        if not _removal_in_progress(str(e)):
            raise
        _wait_removed(lambda: _api("GET", f"/containers/{container_id}/json") is None, e)


def _removal_in_progress(error: str) -> bool:
    """Docker's 409 for a container another request is removing: the box's resources are removed in
    parallel (Host._destroy), and each docker provider sweeps every container of the box."""
    return "removal of container" in error and "already in progress" in error


def _in_use(error: str) -> bool:
    """Docker's 409 for a volume or network a container still holds: one of the box's that another
    sweep removes (its volume was seen held a moment after it was gone; gc said "incomplete")."""
    return "is in use" in error or "has active endpoints" in error


def _remove_when_free(path: str) -> None:
    """DELETE a volume or network, again while a container that is going away still holds it."""
    def removed() -> bool:
        try:
            _api("DELETE", path)
        except DockerConflict as e:
            if not _in_use(str(e)):
                raise
            return False
        return True

    _wait_removed(removed, WtboxError(f"Docker kept {path.split('?')[0]} in use for 30 s; try 'wtbox gc' again."))


def _sdk_removed(obj: Any, errors: Any) -> bool:
    """The SDK's removal of a volume or network, False while it is still held."""
    try:
        obj.remove()
    except errors.NotFound:
        return True
    except errors.APIError as e:
        if not _in_use(str(e)):
            raise
        return False
    return True


def _wait_removed(gone: Callable[[], bool], error: Exception, timeout: float = 30.0) -> None:
    """Until the other removal is done; `error` if it is not within `timeout`."""
    deadline = time.monotonic() + timeout
    while not gone():
        if time.monotonic() > deadline:
            raise error
        time.sleep(0.05)


def _sdk_gone(obj: Any, not_found: type[Exception]) -> bool:
    try:
        obj.reload()
    except not_found:
        return True
    return False


def _raw_labelled(home: str | Path, box_id: str | None) -> dict[str, list[dict[str, Any]]]:
    import json
    from urllib.parse import quote

    q = "filters=" + quote(json.dumps(_filters(home, box_id, False)))
    return {
        "containers": _api("GET", f"/containers/json?all=1&{q}") or [],
        "volumes": (_api("GET", f"/volumes?{q}") or {}).get("Volumes") or [],
        "networks": _api("GET", f"/networks?{q}") or [],
    }


def sweep_box(home: str | Path, box_id: str) -> dict[str, int]:
    """rm/rollback: remove every container, volume and network labelled with this box; no-op without Docker."""
    counts = {"containers": 0, "volumes": 0, "networks": 0}
    if not docker_available()[0]:
        return counts
    if _socket_path() is None:
        return remove_labelled(home, box_id)
    found = _raw_labelled(home, box_id)
    for ct in found["containers"]:
        _remove_container(ct["Id"])
        counts["containers"] += 1
    for net in found["networks"]:
        _remove_when_free(f"/networks/{net['Id']}")
        counts["networks"] += 1
    for vol in found["volumes"]:
        _remove_when_free(f"/volumes/{vol['Name']}?force=1")
        counts["volumes"] += 1
    return counts


def image_present(image: str) -> bool:
    """The image is on this machine (no pull); False without a local daemon socket."""
    if _socket_path() is None:
        return False
    try:
        return _api("GET", f"/images/{image}/json", timeout=5) is not None
    except (OSError, WtboxError):
        return False


def discover_box_ids(home: str | Path) -> set[str]:
    """gc: box ids that own labelled docker things in this home; empty without Docker."""
    if not docker_available()[0]:
        return set()
    if _socket_path() is None:
        return labelled_box_ids(home)
    found = _raw_labelled(home, None)
    ids = {(o.get("Labels") or {}).get(BOX_LABEL) for objs in found.values() for o in objs}
    return {i for i in ids if i is not None}
