"""The sandbox interface: what a box's sandbox is made of, how it is recorded, and what it offers.

A sandbox is a *holder*: a process that keeps the box's pid, mount, ipc, uts and network
namespaces alive (and, unprivileged, its user namespace). Nothing of the box runs in the holder
itself; every box process is started later through `command()`, the one launcher, which enters
those namespaces and drops to the box's user before it execs. The holder is found again by its
record (`boxes/<id>/run/sandbox.json`: pid + start time, so a reused pid is never mistaken for
it) or, after a crash, by WTBOX_ID in its environment; killing its pid 1 ends every process of
the box at once.
"""
from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from worktreebox.errors import WtboxError
from worktreebox.system import cgroups, procs

RECORD = "sandbox.json"  # under boxes/<id>/run/
LOG = "sandbox.log"  # bwrap's and slirp4netns's own complaints, for the one-sentence error
LEAF = "_sandbox"  # the box cgroup's leaf the holder and its network helper live in
OPEN, NONE = "open", "none"  # [box] network


class SandboxError(WtboxError):
    """A sandbox could not be made, entered or changed; the message says which and why."""


class SandboxGone(SandboxError):
    """The box's holder is not running (killed, or the host rebooted): nothing can be launched in it."""


@dataclasses.dataclass(frozen=True)
class Bind:
    """A host path shown inside the box at the same path; writable or read-only."""

    src: Path
    writable: bool = True

    @property
    def dst(self) -> Path:
        return self.src


@dataclasses.dataclass
class Spec:
    """What one box's sandbox holds. `home` ($WTBOX_HOME) is hidden inside except for `binds`;
    `gateway`: the box reaches a database through the host (its supervisor's forward to the
    host's loopback), so it needs the network helper even when it is offline."""

    box_id: str
    home: Path
    box_dir: Path
    binds: list[Bind]
    network: str = OPEN
    gateway: bool = False
    # ends with the process that made it (a dependency layer's build: a kill -9 of `new` leaves nothing)
    transient: bool = False
    # a spare (spares.py): it ends after `expires` seconds unless `keep_if` exists by then
    expires: float = 0.0
    keep_if: Path | None = None
    # the host's addresses its firewall blocks (network.host_addresses), read by whoever records them with
    # the holder (a spare's record: what `spares.fits` compares); None: read as the holder is made
    blocked: tuple[str, ...] | None = None

    @property
    def run_dir(self) -> Path:
        return self.box_dir / "run"

    @property
    def hostname(self) -> str:
        return self.box_id[:63]  # a uts name holds 64 bytes with its NUL

    def env(self) -> dict[str, str]:
        """The holder's environment: the ids every box process carries (gc finds the holder by them)."""
        return {"WTBOX_ID": self.box_id, "WTBOX_BOX_DIR": str(self.box_dir), "PATH": "/usr/bin:/bin"}


def box_binds(box_dir: Path, *, repo_git: Path | None = None) -> list[Bind]:
    """The standard binds of a box: its worktree, cache, tmp, home and own git dir writable (made
    by the caller); the repository's git dir read-only (the box's git borrows its objects)."""
    binds = [Bind(box_dir / name) for name in ("worktree", "cache", "tmp", "home", "git")]
    if repo_git is not None:
        binds.append(Bind(repo_git, writable=False))
    return binds


@dataclasses.dataclass
class Holder:
    """A live sandbox as recorded: `pid` is the host pid of the box's pid 1, `start` its start time."""

    box_id: str
    pid: int
    start: int
    mode: str  # "root" (box processes as a dedicated user) or "user" (a user namespace)
    uid: int
    gid: int
    network: str = OPEN
    helper_pid: int | None = None  # slirp4netns
    netns_file: str | None = None  # set when the holder is made; what the network tools are given

    @property
    def identity(self) -> list[int]:
        return [self.pid, self.start]

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "netns_file"}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Holder:
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in fields})


def save(run_dir: Path, holder: Holder) -> None:
    from worktreebox.system.fsutil import atomic_write

    atomic_write(run_dir / RECORD, json.dumps(holder.to_json()) + "\n")


def load(run_dir: Path) -> Holder | None:
    """The recorded holder of a box, None when there is none (or the record is unreadable)."""
    try:
        return Holder.from_json(json.loads((run_dir / RECORD).read_text()))
    except (OSError, ValueError, TypeError):
        return None


class Sandbox:
    """One way of keeping a box's processes apart from the host and from other boxes."""

    name = "sandbox"
    mode = "off"

    @classmethod
    def check(cls) -> dict | None:
        """`wtbox doctor`'s line for what this provider needs installed (None: nothing)."""
        return None

    def probe(self) -> str | None:
        """None when this provider works here, else why not (one phrase)."""
        raise NotImplementedError

    def box_user(self) -> tuple[int, int]:
        """(uid, gid) the box's processes run as."""
        import os

        return os.geteuid(), os.getegid()

    def create(self, spec: Spec, *, cgroup: cgroups.Leaf | None = None,
               started: Callable[[Holder], None] | None = None) -> Holder | None:
        """Start the box's holder (and its network) and record it; None when there is nothing to hold.
        `started`: told once the holder runs, before its network is made."""
        raise NotImplementedError

    def command(self, holder: Holder | None, argv: list[str], *, cwd: Path | str) -> list[str]:
        """The argv that runs `argv` inside the box, as the box's user, with `cwd` as its directory.
        Start it with procs.spawn(cgroup=...) as any other process: the placement happens before exec."""
        raise NotImplementedError

    def netns_command(self, holder: Holder | None, argv: list[str]) -> list[str]:
        """The argv that runs `argv` in the box's network namespace only, as the caller (the box's
        supervisor: it binds the box's canonical ports and accepts on host sockets it inherits)."""
        raise NotImplementedError

    def launcher(self, holder: Holder | None) -> procs.Launcher:
        """`command()` as a value for whoever starts box processes later (the supervisor, a run)."""
        raise NotImplementedError

    def netns_launcher(self, holder: Holder | None, *, as_box_user: bool) -> procs.Launcher:
        """`netns_command()` as a value; with `as_box_user`, without any privilege (the box's
        metrics store: in the box's network, invisible to its processes, held by its firewall)."""
        raise NotImplementedError

    def alias(self, holder: Holder | None, path: Path, target: str, hostname: str | None = None) -> None:
        """Inside the holder, `path` as a symlink to `target` (a box claimed from the pool, or made with a
        spare's holder: its dir got the new id on the host, while its holder was made with the old id's
        paths); with `hostname`, the holder's host name becomes that."""

    def destroy(self, box_id: str, box_dir: Path) -> list[int]:
        """End the box's holder and network helper, recorded or found by WTBOX_ID; idempotent.
        Returns the pids ended."""
        raise NotImplementedError

    def discover(self, boxes_dir: Path) -> set[str]:
        """Box ids under `boxes_dir` whose holder or network helper is alive."""
        raise NotImplementedError
