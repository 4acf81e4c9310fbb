"""[backing.<name>] and [test] of wtbox.toml: the box's own backing services, and its test command.

A backing service is named the way compose names it, by image (`redis:7`, `rabbitmq:3`,
`memcached`, `axllent/mailpit`, `minio/minio`); the image picks its kind from KINDS, and the
kind says its canonical port (kept in the declaration: inside the box it is the port the app
expects) and the programs that serve it natively. PostgreSQL is not a backing service: it is
the box's own database ([database]), so a `postgres` image here is a config error that says so.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any

import cfgv

from worktreebox.config import values as v
from worktreebox.config.schema import Key, NamedTables, table
from worktreebox.errors import ConfigError

_NAME = re.compile(r"^[a-z][a-z0-9_]{0,23}$")


@dataclasses.dataclass(frozen=True)
class Kind:
    """One kind of backing service: what it is, its canonical port and the images that are it."""

    name: str
    port: int  # canonical port inside the box (what the image listens on)
    images: tuple[str, ...]  # image repository names (the last path part, tag dropped) that are this kind
    scheme: str  # the URL scheme of {{ backing.<name>.url }}
    extra_ports: tuple[str, ...] = ()  # more leased ports a native instance needs, by role
    what: str = ""


KINDS: dict[str, Kind] = {k.name: k for k in (
    Kind("redis", 6379, ("redis", "redis-stack", "redis-stack-server", "valkey", "keydb"), "redis", what="Redis"),
    Kind("memcached", 11211, ("memcached",), "memcached", what="memcached"),
    Kind("rabbitmq", 5672, ("rabbitmq",), "amqp", extra_ports=("dist", "epmd"), what="RabbitMQ"),
    Kind("smtp", 1025, ("mailpit", "mailhog", "smtp4dev", "maildev", "mailcatcher"), "smtp", what="an SMTP sink"),
    Kind("s3", 9000, ("minio", "localstack", "s3mock", "moto", "motoserver"), "http", what="an S3 endpoint"),
)}
POSTGRES_IMAGES = ("postgres", "postgis", "timescaledb", "timescaledb-ha", "pgvector")


def image_repository(image: str) -> str:
    """'docker.io/library/redis:7-alpine' → 'redis'; 'axllent/mailpit' → 'mailpit'."""
    name = image.split("@", 1)[0]
    last = name.rsplit("/", 1)[-1]
    return last.split(":", 1)[0].lower()


def kind_of_image(image: str) -> str | None:
    """The backing kind an image is ('postgres' for PostgreSQL images), or None when unknown."""
    repo = image_repository(image)
    if repo in POSTGRES_IMAGES:
        return "postgres"
    return next((k.name for k in KINDS.values() if repo in k.images), None)


@dataclasses.dataclass
class BackingConfig:
    name: str
    image: str
    kind: str
    runtime: str | None = None  # native | docker; None: native when the host has the program, else docker
    port: int = 0  # canonical port inside the box (0: the kind's)
    ready_timeout: float = 60.0

    @property
    def port_names(self) -> list[str]:
        """The box ports this service leases: its own name, then one per extra role (`<name>_dist`)."""
        return [self.name, *(f"{self.name}_{role}" for role in KINDS[self.kind].extra_ports)]


@dataclasses.dataclass
class TestConfig:
    cmd: str | None = None
    timeout: float = 1800.0


TestConfig.__test__ = False  # type: ignore[attr-defined]  # not a pytest test class

# The schema (config/schema.py): [backing.<name>] tables and [test].
SERVICE = table("backing", Key("image", v.image, required=True), Key("kind", v.choice(*KINDS)),
                Key("runtime", v.choice("native", "docker")),
                Key("port", v.whole("a port number from 1 to 65535", 1, 65535)),
                Key("ready_timeout", v.positive_duration))
# [backing] has no keys of its own: each entry is a table [backing.<name>]
BACKING = cfgv.Map("backing", None, NamedTables("backing", "backing service", SERVICE, needs='image = "..."'))
TEST = table("test", Key("cmd", v.command), Key("timeout", v.positive_duration))


def backing_from(source: str, tables: dict[str, dict[str, Any]]) -> dict[str, BackingConfig]:
    """The validated [backing.<name>] tables as BackingConfigs: the kind from the image (or `kind`)."""
    out = {}
    for name, t in tables.items():
        if not _NAME.match(name):
            raise ConfigError(f"{source}: [backing.{name}]: names are at most 24 lowercase letters, digits and '_', "
                              "such as \"redis\".")
        kind = t.get("kind") or _kind(source, name, t["image"])
        out[name] = BackingConfig(name=name, image=t["image"], kind=kind, runtime=t.get("runtime"),
                                  port=t.get("port", KINDS[kind].port), ready_timeout=t.get("ready_timeout", 60.0))
    return out


def _kind(source: str, name: str, image: str) -> str:
    kind = kind_of_image(image)
    if kind == "postgres":
        raise ConfigError(f"{source}: [backing.{name}] image {image!r} is PostgreSQL, which is the box's own "
                          "database: remove this table and use [database] (the box gets its own role and database).")
    if kind is None:
        raise ConfigError(f"{source}: [backing.{name}] image {image!r} is not a kind wtbox runs per box; "
                          f"set kind = one of {', '.join(KINDS)}, or run it as a [services] entry.")
    return kind


def check_names(source: str, backing: dict[str, BackingConfig], box_ports: list[str], services: dict[str, Any]) -> None:
    """A backing service's name is its port's and its log's: no [box] port or service may share it."""
    for b in backing.values():
        clash = next((p for p in b.port_names if p in box_ports), None)
        if clash:
            raise ConfigError(f"{source}: [backing.{b.name}] leases the port {clash!r}, which [box] ports also "
                              "names; rename one of them.")
        if b.name in services:
            raise ConfigError(f"{source}: [backing.{b.name}] and [services.{b.name}] share a name (it names "
                              "their logs); rename one of them.")
