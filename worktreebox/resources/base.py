"""The resource interface (DESIGN.md "Lifecycle").

A box is an ordered list of resources. `Host.new` calls `create` on each (some in
parallel), then `start` once the box env is final; on any failure it calls `destroy`
in reverse order. `Host.rm` calls `destroy` in reverse order. `Host.gc` compares
`discover` with the registry. All three must be idempotent: `destroy` succeeds when
the thing is already gone, because a crashed `rm` is finished by running it again.
"""
from __future__ import annotations

import dataclasses
import sys
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    from ..box import Box
    from ..config import RepoConfig
    from ..host import Host


@dataclasses.dataclass
class Creation:
    """What resources share while one box is being made.

    - `facts`: the Jinja2 context for [box] env, [database] env and service commands
      (`box`, `ports`, `db`, `metrics`); each resource adds its own section.
    - `env`: variables the box exports (written to the 0600 env file; no secrets).
    - `box.data[<resource>]`: what a resource must remember to destroy itself later
      (saved to the registry after create).
    - `secrets`: `--secret` values; memory only, never written anywhere.
    """

    host: "Host"
    box: "Box"
    config: "RepoConfig"
    base_sha: str
    facts: dict[str, Any] = dataclasses.field(default_factory=dict)
    env: dict[str, str] = dataclasses.field(default_factory=dict)
    secrets: dict[str, str] = dataclasses.field(default_factory=dict)
    start_services: bool = True
    progress: Callable[[str], None] = lambda msg: None

    def note(self, msg: str) -> None:
        self.progress(msg)


class Resource:
    """Base class: override what applies. `name` keys the resource's entry in box.data."""

    name = "resource"

    def create(self, c: Creation) -> None:
        """Make the thing and record in c.box.data / c.env / c.facts what was made."""

    def start(self, c: Creation) -> None:
        """Second phase, after the box env is final and written (migrations, services)."""

    def destroy(self, host: "Host", box: "Box") -> None:
        """Remove it; succeed if it is already gone."""

    def discover(self, host: "Host") -> set[str]:
        """Box ids that own such a thing right now."""
        return set()

    def status(self, host: "Host", box: "Box") -> dict[str, Any] | None:
        """Extra facts for `wtbox status` (None: nothing to add)."""
        return None


def warn(msg: str) -> None:
    print(f"wtbox: {msg}", file=sys.stderr)
