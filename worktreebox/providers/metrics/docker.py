"""A box's VictoriaMetrics as a container (the `docker` metrics store).

One container `wtbox-vm-<box id>` per box, started through testcontainers from the
configured image (HostConfig.victoriametrics_image / WTBOX_VICTORIAMETRICS_IMAGE). It runs
on the host network and listens on 127.0.0.1:<the box's metrics port>, so it scrapes the
box's services at the same 127.0.0.1 URLs as the native process does, and nothing is
published beyond loopback. Storage is the labelled volume `wtbox-vm-<box id>`; both carry
`wtbox.box=<id>`, so `rm` and `gc` sweep them by label.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from worktreebox.errors import WtboxError
from worktreebox.providers import docker_engine as engine
from worktreebox.providers.metrics.base import MEMORY_ENV, MetricsStore, flags
from worktreebox.system import readiness

if TYPE_CHECKING:
    from worktreebox.box import Box
    from worktreebox.context import HostContext

STORAGE = "/storage"
SCRAPE_DIR = "/etc/wtbox/scrape"
START_TIMEOUT = 60.0
IMAGE_SETTING = "[observability] image in config.toml or WTBOX_VICTORIAMETRICS_IMAGE"


def name(box_id: str) -> str:
    """Container and volume name of a box's VictoriaMetrics."""
    return f"wtbox-vm-{box_id}"


def _home_of(box: Box, host: HostContext | None) -> Path:
    # boxes/<id> lies directly under the home (DESIGN.md layout).
    return host.home if host is not None else box.dir.parent.parent


class DockerStore(MetricsStore):
    name = "docker"

    def start(self, box: Box, port: int, *, scrape_config: Path | None, retention: str,
              inside: int | None = None, launcher: Any = None) -> str:
        # a container publishes the host's port itself; a sandboxed box reaches it through its
        # supervisor's forward to the host (resources/sandbox.daemon_net)
        return start(box, port, scrape_config, host=self.host, retention=retention)

    def remove(self, box: Box) -> None:
        stop(box, home=self.host.home)

    def discover(self) -> set[str]:
        # Labelled containers, whatever the config says now.
        return engine.discover_box_ids(self.host.home)

    def status(self, box: Box) -> dict[str, Any]:
        return status(box, home=self.host.home)


def start(box: Box, port: int, scrape_config_path: Path | None = None, *, host: HostContext | None = None,
          image: str | None = None, retention: str = "2d", timeout: float = START_TIMEOUT) -> str:
    """Start the box's VictoriaMetrics container, wait for /health; returns its URL. Idempotent."""
    import docker.errors

    engine.testcontainers()

    home = _home_of(box, host)
    if image is None:
        if host is not None:
            image = host.config.victoriametrics_image
        else:
            from worktreebox.config.load import load_host_config

            image = load_host_config(home).victoriametrics_image
    c = engine.client()
    engine.ensure_image(c, image, "VictoriaMetrics", IMAGE_SETTING)
    cname = name(box.id)
    url = f"http://127.0.0.1:{port}"
    try:
        old = c.containers.get(cname)
        if old.status == "running" and f"-httpListenAddr=127.0.0.1:{port}" in (old.attrs["Config"].get("Cmd") or []):
            _wait_healthy(engine.Attached(old), port, timeout)
            return url
        old.remove(force=True)  # the volume keeps the data
    except docker.errors.NotFound:
        pass
    box_labels = engine.labels(home, box.id, role="victoria-metrics")
    made_volume = False
    try:
        c.volumes.get(cname)
    except docker.errors.NotFound:
        c.volumes.create(cname, labels=box_labels)
        made_volume = True

    scrape = None
    tc = _HostNetworkContainer(image)
    tc.with_name(cname).with_volume_mapping(cname, STORAGE, "rw")
    if scrape_config_path is not None:
        # The folder, not the file: a config replaced by rename stays visible in the container.
        path = Path(scrape_config_path).absolute()
        tc.with_volume_mapping(str(path.parent), SCRAPE_DIR, "ro")
        scrape = f"{SCRAPE_DIR}/{path.name}"
    for k, v in MEMORY_ENV.items():
        tc.with_env(k, v)
    tc.with_env("WTBOX_ID", box.id)
    tc.with_command(flags(port, STORAGE, retention, scrape))
    # `network`, not `network_mode`: testcontainers fills in `network` itself when it runs in a container.
    tc.with_kwargs(labels=box_labels, network="host")
    try:
        tc.start()
        _wait_healthy(tc, port, timeout)
    except (docker.errors.APIError, WtboxError) as e:
        # Leave nothing this call made (the labels would let gc find it, but rollback is cleaner).
        _remove_container(c, cname)
        if made_volume:
            _remove_volume(c, cname)
        if isinstance(e, WtboxError):
            raise
        raise WtboxError(f"Docker could not start VictoriaMetrics for box {box.id}: {engine.first_line(e)}.") from None
    return url


class _HostNetworkContainer:
    """Placeholder replaced on first use by a DockerContainer subclass (testcontainers is imported lazily)."""

    def __new__(cls, image: str) -> Any:
        from testcontainers.core.container import DockerContainer

        class HostNetworkContainer(DockerContainer):
            # On the host network a container's ports are the host's own, on loopback.
            def get_container_host_ip(self) -> str:
                return "127.0.0.1"

            def get_exposed_port(self, port: int) -> int:
                return port

        return HostNetworkContainer(image)


def _wait_healthy(tc: Any, port: int, timeout: float) -> None:
    """testcontainers' HTTP wait strategy on /health, failing fast if the container exits."""
    from testcontainers.core.wait_strategies import HttpWaitStrategy

    # The body check matters: on the host network another server on the same port would answer too.
    health = HttpWaitStrategy(port, "/health").for_response_predicate(lambda body: body.strip() == "OK")
    why = readiness.wait(engine.WaitProbe(health.with_poll_interval(0.02), tc), timeout, alive=engine.running(tc),
                         poll=0.02)
    if why == readiness.EXITED:
        logs = tc.get_wrapped_container().logs(tail=5).decode(errors="replace")
        if engine.port_conflict(Exception(logs)):
            raise WtboxError(f"Port {port} on 127.0.0.1 is already in use, so VictoriaMetrics cannot "
                             "listen on it; stop what holds it or run 'wtbox gc'.")
        last = logs.strip().splitlines()[-1] if logs.strip() else "no output"
        raise WtboxError(f"The VictoriaMetrics container exited at start ({last[:300]}).")
    if why == readiness.TIMEOUT:
        raise WtboxError(f"VictoriaMetrics in container {tc.get_wrapped_container().name} did not answer "
                         f"http://127.0.0.1:{port}/health within {timeout:.0f} s.")


def _remove_container(c: Any, cname: str) -> None:
    import docker.errors

    try:
        c.containers.get(cname).remove(force=True)
    except docker.errors.NotFound:
        pass


def _remove_volume(c: Any, vname: str) -> None:
    import docker.errors

    try:
        c.volumes.get(vname).remove(force=True)
    except docker.errors.NotFound:
        pass


def stop(box: Box | str, *, home: Path | None = None) -> dict[str, int]:
    """Remove the box's container and volume (everything labelled with its id); idempotent.

    Without Docker there is nothing to remove but also nothing to check: returns zeros.
    """
    box_id = box if isinstance(box, str) else box.id
    if home is None:
        if isinstance(box, str):
            raise ValueError("stop(box_id) needs home=")
        home = box.dir.parent.parent
    return engine.sweep_box(home, box_id)


def status(box: Box, *, home: Path | None = None) -> dict[str, Any]:
    """Container state of a box's VictoriaMetrics for `wtbox status`."""
    import docker.errors

    out: dict[str, Any] = {"provider": "docker", "container": name(box.id), "running": False}
    ok, why = engine.docker_available()
    if not ok:
        out["error"] = why
        return out
    try:
        ct = engine.client().containers.get(name(box.id))
        out.update(running=ct.status == "running", state=ct.status, image=ct.attrs["Config"].get("Image"))
    except docker.errors.NotFound:
        out["state"] = "missing"
    return out
