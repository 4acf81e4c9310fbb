"""`[host] sandbox = "off"`: today's behaviour. Box processes run as wtbox's own user in the
host's namespaces, kept apart only by their cgroup, names, leased ports and database roles;
the launcher adds nothing. `wtbox doctor` says so, loudly: a process of one box can see,
signal and read everything of every other box."""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from worktreebox.providers.sandbox.base import Holder, Sandbox, Spec
from worktreebox.system import cgroups, procs


class Off(Sandbox):
    name = "off"
    mode = "off"

    def probe(self) -> str | None:
        return None

    def create(self, spec: Spec, *, cgroup: cgroups.Leaf | None = None,
               started: Callable[[Holder], None] | None = None) -> Holder | None:
        return None

    def command(self, holder: Holder | None, argv: list[str], *, cwd: Path | str) -> list[str]:
        return list(argv)

    def netns_command(self, holder: Holder | None, argv: list[str]) -> list[str]:
        return list(argv)

    def launcher(self, holder: Holder | None) -> procs.Launcher:
        return procs.Launcher()

    def netns_launcher(self, holder: Holder | None, *, as_box_user: bool) -> procs.Launcher:
        return procs.Launcher()

    def destroy(self, box_id: str, box_dir: Path) -> list[int]:
        return []

    def discover(self, boxes_dir: Path) -> set[str]:
        return set()
