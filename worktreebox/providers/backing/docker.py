"""A backing service as the image the repo declares, through testcontainers (any kind).

The container publishes its canonical port (what the image listens on) on the box's leased
port on loopback, carries wtbox's labels (`wtbox.box=<id>`: rm and gc find it by label alone)
and is named `wtbox-<home hash>-<id>-<name>`. Only an image already on this machine is used:
`unavailable` says so rather than pulling in the middle of a `new`. Readiness is the kind's
protocol probe (base.PROBES): docker's port proxy accepts connections before the container
listens. Its output stays with the container (`docker logs <name>`); only the native runtime
writes it to `wtbox logs` today.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from worktreebox.errors import WtboxError
from worktreebox.providers import docker_engine as engine
from worktreebox.providers.backing.base import LOOPBACK, Runtime

if TYPE_CHECKING:
    from worktreebox.box import Box
    from worktreebox.config.backing import BackingConfig

# What some images need to serve at all (minio has no default command).
COMMANDS = {"minio": "server /data"}
ENV = {"minio": {"MINIO_ROOT_USER": "minioadmin", "MINIO_ROOT_PASSWORD": "minioadmin"}}


def container_name(home: Any, box_id: str, name: str) -> str:
    return f"wtbox-{engine.home_hash(home)}-{box_id}-{name}"


class DockerBacking(Runtime):
    runtime = "docker"

    @classmethod
    def unavailable(cls, image: str | None = None) -> str | None:
        ok, why = engine.docker_available()
        if not ok:
            return why.rstrip(".")
        if image and not engine.image_present(image):
            return f"the image {image!r} is not on this machine (docker pull {image})"
        return None

    @classmethod
    def check(cls) -> dict[str, Any] | None:
        return None  # docker's own doctor lines say whether it answers

    def start(self, box: Box, cfg: BackingConfig, ports: dict[str, int]) -> Any:
        from worktreebox.config.backing import image_repository

        engine.testcontainers()
        from testcontainers.core.container import DockerContainer

        repo = image_repository(cfg.image)
        tc = DockerContainer(cfg.image)
        tc.with_name(container_name(self.host.home, box.id, cfg.name))
        tc.with_bind_ports(cfg.port, ports[cfg.name])
        # on loopback only, as the native programs listen: the docker SDK's (ip, port) form of the
        # mapping testcontainers hands it (its with_bind_ports takes no address)
        tc.ports[str(cfg.port)] = (LOOPBACK, ports[cfg.name])  # type: ignore[assignment]  # typed as a bare port
        for k, v in ENV.get(repo, {}).items():
            tc.with_env(k, v)
        if repo in COMMANDS:
            tc.with_command(COMMANDS[repo])
        tc.with_kwargs(labels=engine.labels(self.host.home, box.id, role=f"backing-{cfg.name}"))
        try:
            tc.start()
        except Exception as e:
            raise WtboxError(f"Docker could not start the backing service {cfg.name!r} ({cfg.image}): "
                             f"{engine.first_line(e)}.") from None
        return tc

    def failed(self, handle: Any) -> str | None:
        try:
            handle.get_wrapped_container().reload()
            status = handle.get_wrapped_container().status
        except Exception as e:
            return f"its container is gone ({engine.first_line(e)})"
        return None if status in ("created", "running") else f"its container is {status}"

    def facts(self, box: Box, cfg: BackingConfig, ports: dict[str, int]) -> dict[str, Any]:
        from worktreebox.config.backing import image_repository

        out = super().facts(box, cfg, ports)
        if cfg.kind == "rabbitmq":
            out.update(url=f"amqp://guest:guest@{LOOPBACK}:{ports[cfg.name]}", user="guest", password="guest")
        creds = ENV.get(image_repository(cfg.image))
        if cfg.kind == "s3":
            key, secret = (creds["MINIO_ROOT_USER"], creds["MINIO_ROOT_PASSWORD"]) if creds else ("test", "test")
            out.update(endpoint=out["url"], access_key=key, secret_key=secret, region="us-east-1")
        return out

    def remove(self, box: Box) -> None:
        engine.sweep_box(self.host.home, box.id)

    def discover(self) -> set[str]:
        return engine.discover_box_ids(self.host.home)

