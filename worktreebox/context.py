"""What resources, providers and operations may know of the host: a Protocol, not `Host`.

`host.py` composes resources; if resources imported `host.py` back, the two would be one
knot. They receive an object with these members instead (in practice a `Host`), typed
here, below both.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from worktreebox.box import Box
    from worktreebox.config.load import HostConfig, RepoConfig
    from worktreebox.registry import Registry
    from worktreebox.system.procs import Launcher


class HostContext(Protocol):
    home: Path
    boxes_dir: Path
    registry: Registry

    @property
    def config(self) -> HostConfig: ...

    def lease_host_port(self, owner: str) -> int: ...

    def release_host_port(self, owner: str) -> None: ...

    def get(self, ref: str | None = None) -> Box: ...

    def list(self) -> list[Box]: ...

    def rm(self, ref: Any, *, force: bool = False, keep_branch: bool = False) -> Box: ...

    def exec_env(self, box: Box, secrets: dict[str, str] | None = None) -> dict[str, str]: ...

    def repo_config(self, box: Box) -> RepoConfig: ...

    def running_secrets(self, box: Box) -> dict[str, str]: ...

    def unsaved_work(self, box: Box) -> str | None: ...

    def launcher(self, box: Box) -> Launcher: ...
