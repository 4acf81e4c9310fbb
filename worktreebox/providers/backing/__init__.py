"""Backing services per box (Redis, memcached, RabbitMQ, an SMTP sink, S3): one module per kind and
runtime, chosen from the providers table (providers/__init__.py, kinds `backing.<kind>`).

`base.py` is the interface; `native.py` runs host programs (one subclass per kind in its own
module); `docker.py` runs the declared image through testcontainers. `runtime_for` picks the
runtime a [backing.<name>] gets on this host: the one it names, else native when the host has
the program, else docker when docker and the image are here.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from worktreebox.errors import WtboxError

if TYPE_CHECKING:
    from worktreebox.config.backing import BackingConfig
    from worktreebox.providers.backing.base import Runtime

RUNTIMES = ("native", "docker")


def runtime_class(kind: str, runtime: str) -> type[Runtime] | None:
    from worktreebox.providers import PROVIDERS, choose

    return choose(f"backing.{kind}", runtime) if runtime in PROVIDERS.get(f"backing.{kind}", {}) else None


def choice(kind: str, image: str | None, wanted: str | None = None) -> tuple[type[Runtime] | None, list[str]]:
    """(the runtime class that serves `kind` here, why each one tried cannot); wanted: only that one."""
    why = []
    for name in [wanted] if wanted else RUNTIMES:
        cls = runtime_class(kind, name)
        if cls is None:
            why.append(f"wtbox has no {name} runtime for {kind}")
            continue
        reason = cls.unavailable(image)
        if reason is None:
            return cls, why
        why.append(f"{name}: {reason}")
    return None, why


def runtime_for(cfg: BackingConfig, source: str) -> type[Runtime]:
    """The runtime class for one [backing.<name>], or a WtboxError that names the service and what to install."""
    cls, why = choice(cfg.kind, cfg.image, cfg.runtime)
    if cls is None:
        raise WtboxError(f"The backing service {cfg.name!r} ({cfg.image}, {source}) cannot run on this host: "
                         f"{'; '.join(why)}.")
    return cls
