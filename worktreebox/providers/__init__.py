"""Interchangeable backends, chosen by name from one table.

Each kind has one interface (`postgres/base.py`: a PostgreSQL server; `metrics/base.py`: a
box's metrics store) and one module per provider. The host config (or a repo's
wtbox.toml) names the provider; `choose(kind, name)` imports its module only then, so
`wtbox ls` never loads psycopg or testcontainers. Adding a provider = one module + one
line here (tox's `ToxEnvRegister` in spirit, without the plugin machinery).
"""
from __future__ import annotations

import importlib
from typing import Any

from worktreebox import diagnostics
from worktreebox.errors import ConfigError

log = diagnostics.logger("providers")
# kind -> provider name -> "module:Class" (relative to this package).
PROVIDERS: dict[str, dict[str, str]] = {
    "postgres": {
        "embedded": "postgres.embedded:EmbeddedCluster",
        "external": "postgres.external:ExternalServer",
        "docker": "postgres.docker:DockerServer",
    },
    "metrics": {
        "native": "metrics.native:NativeStore",
        "docker": "metrics.docker:DockerStore",
    },
    # A box's own backing services (providers/backing/), one kind each: `native` runs a host
    # program, `docker` the declared image; backing.runtime_for picks one.
    "backing.redis": {"native": "backing.redis:NativeRedis", "docker": "backing.docker:DockerBacking"},
    "backing.memcached": {"native": "backing.memcached:NativeMemcached", "docker": "backing.docker:DockerBacking"},
    "backing.rabbitmq": {"native": "backing.rabbitmq:NativeRabbitMQ", "docker": "backing.docker:DockerBacking"},
    "backing.smtp": {"native": "backing.smtp:NativeSmtpSink", "docker": "backing.docker:DockerBacking"},
    "backing.s3": {"native": "backing.s3:NativeS3", "docker": "backing.docker:DockerBacking"},
    # How a box gets its copy-on-write view of a shared tree, in order of preference (mounts/__init__.py
    # picks the first that works on this host).
    "mounts": {
        "overlay": "mounts.overlay:Overlay",
        "fuse-overlayfs": "mounts.fuse:FuseOverlay",
        "reflink": "mounts.reflink:Reflink",
        "checkout": "mounts.checkout:Checkout",
    },
    # What keeps a box's processes apart from the host and from other boxes (sandbox/__init__.py).
    "sandbox": {
        "namespaces": "sandbox.namespaces:Namespaces",
        "off": "sandbox.off:Off",
    },
}


def names(kind: str) -> list[str]:
    """The provider names of one kind, in table order."""
    return list(PROVIDERS[kind])


def checks() -> list[dict[str, Any]]:
    """`wtbox doctor`'s lines for what the providers need installed, in table order."""
    out = []
    for kind, table in PROVIDERS.items():
        for name in table:
            line = choose(kind, name).check()
            if line:
                out.append(line)
    return out


def choose(kind: str, name: str) -> Any:
    """The provider class registered as `name` for `kind`; ConfigError naming the choices if unknown."""
    table = PROVIDERS.get(kind)
    if table is None:
        raise ValueError(f"no provider kind {kind!r}")
    target = table.get(name)
    if target is None:
        raise ConfigError(f"Unknown {kind} provider {name!r}; choose one of {', '.join(table)}.")
    log.debug("%s provider: %s", kind, name)
    module, _, cls = target.partition(":")
    return getattr(importlib.import_module(f"{__name__}.{module}"), cls)
