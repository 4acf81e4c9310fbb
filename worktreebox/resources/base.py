"""The resource interface (docs/architecture.md, "Lifecycle").

A box is the ordered list of resources in `resources/__init__.py`. `Host.new` walks it:
`create` on each (a run of consecutive `parallel` resources at once), then `finish` on
each (the env is not final yet), then writes the env file and calls `start` on each
(setup, migrations, services). On any failure it calls `destroy` in reverse order (a
parallel stage at once); `Host.rm` does the same. `gc` compares `discover` with the
registry. `revive` restores what a reboot took (mounts) when `Host.get` finds it gone.
All must be idempotent: `destroy` succeeds when the thing is already gone, because a
crashed `rm` is finished by running it again.
"""
from __future__ import annotations

import dataclasses
import os
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from worktreebox.box import Box
    from worktreebox.config.load import RepoConfig
    from worktreebox.context import HostContext


@dataclasses.dataclass(frozen=True)
class Origin:
    """Where a fork's own changes start from (fleet/fork.py): a snapshot's files (upper layers and
    index, resources/own_changes.py), the branch tip its branch starts at, and the database its
    database is copied from (None: the box has none). Without an origin a box starts pristine."""

    files: Path
    tip: str
    database: str | None = None
    database_role: str | None = None  # the role that owns the objects in that database
    strategy: str | None = None  # how to copy it (WAL_LOG or FILE_COPY), as the golden copy measured
    take_database: bool = False  # rename it instead of copying (a fork's own snapshot, used up by one fork)


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

    host: HostContext
    box: Box
    config: RepoConfig
    base_sha: str
    facts: dict[str, Any] = dataclasses.field(default_factory=dict)
    env: dict[str, str] = dataclasses.field(default_factory=dict)
    secrets: dict[str, str] = dataclasses.field(default_factory=dict)
    start_services: bool = True
    progress: Callable[[str], None] = lambda msg: None
    # seconds per phase, for `new --json`'s timings
    timings: dict[str, float] = dataclasses.field(default_factory=dict)
    # resource name -> set once its create is over (a resource of the same parallel stage may wait)
    made: dict[str, threading.Event] = dataclasses.field(default_factory=dict, repr=False)
    _made_lock: threading.Lock = dataclasses.field(default_factory=threading.Lock, repr=False)
    origin: Origin | None = None  # a fork: its own changes start as a snapshot's
    # the sandbox resource's use of the spare sandbox the box took (resources/sandbox_spares.with_spare,
    # set by Host.new: it checks the spare beside the checkout, not before everything); False: none used
    use_spare: Callable[[Creation], bool] = dataclasses.field(default=lambda c: False, repr=False)

    def note(self, msg: str) -> None:
        self.progress(msg)

    def _made(self, name: str) -> threading.Event:
        with self._made_lock:
            return self.made.setdefault(name, threading.Event())

    def provide(self, name: str) -> None:
        """`name`'s create is over (made, or failed: the stage reports its error)."""
        self._made(name).set()

    def wait_for(self, name: str, timeout: float = 120.0) -> None:
        """Within a parallel stage: wait until the resource `name` was made (the metrics store starts
        in the box's network, which the sandbox resource makes alongside the checkout)."""
        from worktreebox.system import cancel

        event = self._made(name)
        waited = 0.0
        while not event.wait(0.05):
            cancel.check()
            waited += 0.05
            if waited >= timeout:
                raise TimeoutError(f"the {name} of the box was not made within {timeout:.0f} s")


class Resource:
    """Base class: override what applies. `name` keys the resource's entry in box.data."""

    name = "resource"
    # True: created at the same time as the neighbouring parallel resources (it needs
    # nothing from them); False: created alone, after everything before it.
    parallel = False
    # Keys of `new --json`'s timings this resource's create and start count towards (None: untimed).
    phase: str | None = None
    start_phase: str | None = None

    def warm(self, host: HostContext, data: dict[str, Any] | None, config: RepoConfig | None, *,
             pooled: bool = False) -> None:
        """First thing in `new` (with the repo config; `pooled`: a box made ahead for the warm pool) and
        `rm` (with the box's data): begin, in the background, loading or starting what create/destroy
        will need and costs time (a driver, the router), so that it overlaps git's work instead of
        following it. Never fails."""

    def create(self, c: Creation) -> None:
        """Make the thing and record in c.box.data / c.env / c.facts what was made."""

    def finish(self, c: Creation) -> None:
        """After every create, before the env is final (e.g. copying files into the worktree)."""

    def start(self, c: Creation) -> None:
        """After the box env is final and written (setup, migrations, services)."""

    def settle(self, c: Creation) -> None:
        """After every start, before the box is ready: wait for what create started in the background
        and nothing asked for since (the sandbox's supervisor)."""

    def destroy(self, host: HostContext, box: Box) -> None:
        """Remove it; succeed if it is already gone."""

    def pristine(self, host: HostContext, box: Box) -> bool:
        """True only when this resource can prove the box holds nothing of the user's (rm's unsaved-work
        check may then skip `git status`); False when it cannot tell."""
        return False

    def revive(self, host: HostContext, box: Box) -> None:
        """Bring back what a reboot took from a live box (mounts); nothing when it is all there."""

    def discover(self, host: HostContext) -> set[str]:
        """Box ids that own such a thing right now."""
        return set()

    def health(self, host: HostContext, box: Box) -> str | None:
        """Why a ready box is not whole right now (e.g. its supervisor died), or None. Cheap:
        every command that resolves a box asks."""
        return None

    def status(self, host: HostContext, box: Box) -> dict[str, Any] | None:
        """Extra facts for `wtbox status` (None: nothing to add)."""
        return None

    def failure_cause(self, host: HostContext, box: Box) -> str | None:
        """When making the box failed, a cause this resource can see that the error may not name (a
        limit the box hit); read before the rollback destroys it. None: nothing to add."""
        return None

    def checks(self, host: HostContext) -> list[dict[str, Any]]:
        """Lines for `wtbox doctor`: [{"check", "ok", "detail"}] (what this host can do for this kind)."""
        return []


def warn(msg: str) -> None:
    print(f"wtbox: {msg}", file=sys.stderr)


def ids_by_hex(host: HostContext, hexes: set[str], unknown: str) -> set[str]:
    """The box ids whose hex names something a resource keeps per box (a cgroup, a disk image): the
    registry's id, else the box dir's (`new` makes the dir first), else `unknown` + the hex."""
    from worktreebox.box import hex_of, is_box_id

    if not hexes:
        return set()
    by_hex = {hex_of(i): i for i in host.registry.select_box_ids()}
    try:
        dirs = {hex_of(e.name): e.name for e in os.scandir(host.boxes_dir) if is_box_id(e.name)}
    except FileNotFoundError:
        dirs = {}
    return {by_hex.get(h) or dirs.get(h) or f"{unknown}{h}" for h in hexes}
