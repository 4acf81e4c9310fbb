"""config.toml, the host's config ($WTBOX_HOME/config.toml), and the WTBOX_* variables that
override some of its keys: the dataclass with the defaults, the schema with each key's parser."""
from __future__ import annotations

import dataclasses
from typing import Any

from worktreebox import diagnostics, providers, settings
from worktreebox.config import values as v
from worktreebox.config.repo import LIMITS, LimitsConfig
from worktreebox.config.schema import Key, Table, document, table, validated

MAX_BOXES = 10000
log = diagnostics.logger("config")


@dataclasses.dataclass
class HostConfig:
    source: str = "(defaults)"
    port_range: tuple[int, int] | None = None  # None → derived from the kernel's ephemeral range
    max_boxes: int = 64
    database_provider: str = "embedded"
    database_url: str | None = None
    postgres_image: str = "postgres:15"
    observability_provider: str = "native"
    victoriametrics_image: str = "victoriametrics/victoria-metrics:v1.93.0"
    fsync_off: bool = True
    # Admission: `new`/`fanout` wait (or refuse with --no-wait) while the host is this full.
    max_active: int | None = None  # boxes being made or running processes
    max_load: float | None = None  # 1-minute load average
    box_limits: LimitsConfig = dataclasses.field(default_factory=LimitsConfig)  # [box]: defaults for every box
    database_spares: int = 3  # databases made ahead per golden copy (0: none)
    mounts: str | None = None  # a mount provider by name (providers/mounts); None = the first that works
    mounts_where: str = "[host] mounts"  # where that came from, for error messages
    layer_ttl: float = 24 * 3600.0  # gc removes trees and dependency layers no box used for this long
    background_busy: bool = True  # a box that keeps the CPU busy runs as background (background.py)
    sandbox: str = "auto"  # auto | namespaces | off: how boxes are kept apart (providers/sandbox)
    sandbox_spares: int = 1  # holders made ahead per recipe for the next `new` (providers/sandbox/spares.py)
    # The host router (worktreebox/router): on, on a leased port (None) or this one, on the loopback.
    router: bool = True
    router_port: int | None = None
    router_listen: str = "127.0.0.1"


_SPARES = v.whole("a whole number of spare sandboxes, 0 or more", 0)
HOST = document(
    "config.toml",
    Table("host", table("host", Key("port_range", v.port_range),
                        Key("max_boxes", v.whole("a whole number", 1, MAX_BOXES,
                                                 range_what=f"a whole number from 1 to {MAX_BOXES}")),
                        Key("mounts", v.typed(str, 'a mount provider name such as "overlay" or "checkout"')),
                        Key("layer_ttl", v.positive_duration),
                        Key("max_active", v.whole("a whole number of boxes above 0", 1)),
                        Key("max_load", v.above_zero("a load average above 0, such as 4.0")),
                        Key("background_busy", v.boolean),
                        Key("router", v.boolean),
                        Key("router_port", v.whole("a port number from 1 to 65535", 1, 65535)),
                        Key("router_listen", v.ip_address),
                        Key("sandbox", v.choice("auto", *providers.names("sandbox"))),
                        Key("sandbox_spares", _SPARES))),
    Table("box", table("box", *LIMITS)),
    Table("database", table("database", Key("provider", v.choice(*providers.names("postgres"))),
                            Key("url", v.postgres_url), Key("image", v.image), Key("fsync_off", v.boolean),
                            Key("spares", v.whole("a whole number of spare databases, 0 or more", 0)))),
    Table("observability", table("observability", Key("provider", v.choice(*providers.names("metrics"))),
                                 Key("image", v.image))),
)
# The HostConfig field of each key that is not called as its key is.
_FIELDS = {"database": {"provider": "database_provider", "url": "database_url", "image": "postgres_image",
                        "spares": "database_spares"},
           "observability": {"provider": "observability_provider", "image": "victoriametrics_image"}}


def _provider(kind: str) -> v.Parser:
    names = providers.names(kind)
    choices = ", ".join(names[:-1]) + " or " + names[-1]

    def parse(value: str) -> str:
        if value not in names:
            raise v.expected(choices, value)
        return value

    return parse


# Variables that win over a key of config.toml, in the order they are read.
OVERRIDES = (
    (settings.MOUNTS, "mounts", str),
    (settings.LAYER_TTL, "layer_ttl", v.duration),
    (settings.PORT_RANGE, "port_range", v.port_range),
    (settings.POSTGRES_URL, "database_url", v.postgres_url),
    (settings.DATABASE_PROVIDER, "database_provider", _provider("postgres")),
    (settings.OBSERVABILITY_PROVIDER, "observability_provider", _provider("metrics")),
    (settings.POSTGRES_IMAGE, "postgres_image", v.image),
    (settings.VICTORIAMETRICS_IMAGE, "victoriametrics_image", v.image),
    (settings.SANDBOX, "sandbox", v.choice("auto", *providers.names("sandbox"))),
    (settings.SANDBOX_SPARES, "sandbox_spares", lambda text: _SPARES(int(text) if text.isdigit() else text)),
)


def parse_host_config(doc: dict[str, Any], source: str) -> HostConfig:
    """A parsed config.toml, with the WTBOX_* overrides of this environment applied."""
    tables = validated(HOST, doc, source)
    fields = dict(tables["host"])
    for section, renamed in _FIELDS.items():
        fields.update({renamed.get(k, k): value for k, value in tables[section].items()})
    cfg = HostConfig(source=source, box_limits=LimitsConfig(**tables["box"]), mounts_where=f"{source}: [host] mounts",
                     **fields)
    _override(cfg)
    if cfg.database_url and not settings.DATABASE_PROVIDER.value() and "provider" not in tables["database"]:
        cfg.database_provider = "external"  # a URL alone says which server
    return cfg


def _override(cfg: HostConfig) -> None:
    for setting, field, parse in OVERRIDES:
        value = setting.value()
        if value is not None:
            with v.at(setting.name):
                setattr(cfg, field, parse(value))
            log.debug("%s overrides %s's %s", setting.name, cfg.source, field)
    if settings.MOUNTS.value():
        cfg.mounts_where = settings.MOUNTS.name
