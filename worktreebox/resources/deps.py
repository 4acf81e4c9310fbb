"""The box's dependency layers (deps.py): detected from the commit's lock files, built once per
lock hash on this host, attached copy-on-write at .venv / node_modules / a recipe's paths.

Runs after the worktree exists and before `[setup] cmd`, so setup, migrations and services
find their dependencies installed.
"""
from __future__ import annotations

import functools
import os
import shutil
from typing import TYPE_CHECKING, Any

from worktreebox.errors import WtboxError
from worktreebox.resources.base import Creation, Resource, warn

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

    from worktreebox.box import Box
    from worktreebox.context import HostContext as Host
    from worktreebox.layers.deps import Layer


class Deps(Resource):
    name = "deps"
    phase = "deps"

    def create(self, c: Creation) -> None:
        from worktreebox.layers import deps
        from worktreebox.layers import store as layerstore
        from worktreebox.providers import mounts, sandbox
        from worktreebox.providers.mounts.base import seed_upper

        box, home = c.box, c.host.home
        files = deps.scan(box.repo, c.base_sha, home, c.config.deps)
        layers = deps.detect(files, c.config.deps)
        if not layers:
            return
        provider = mounts.for_host(c.host)
        made: list[dict[str, Any]] = []
        box.data[self.name] = {"mount": provider.name, "layers": made}
        box.data["revive"] = box.data.get("revive") or provider.mounts
        for i, layer in enumerate(layers):
            missing = deps.missing_tool(layer)
            if missing:
                warn(f"{layer.files[0]} needs {missing}, which is not installed; no {layer.kind} layer for this box.")
                continue
            layer.key = deps.key_of(layer, files, home)
            layerstore.record_use(box, "deps", layer.key)  # before the layer is used: gc keeps it for this box
            where = layer.dir or "the repo root"
            with deps.use(home, box.repo, c.base_sha, layer, run=_runner(c, layer),
                          on_wait=functools.partial(c.note, f"waiting for the {layer.kind} layer of {where}"),
                          ) as (path, built):
                if built:
                    c.note(f"built the {layer.kind} layer of {where}")
                owner = sandbox.provider_of(box).box_user() if sandbox.sandboxed(box) else None
                if owner is not None:  # a layer built before boxes were sandboxed: copy-up needs the box user's
                    from worktreebox.resources.worktree import give_once

                    give_once(path / "paths", owner)
                for j, p in enumerate(layer.paths):
                    target = box.path / layer.dir / p
                    target.mkdir(parents=True, exist_ok=True)
                    if c.origin:  # a fork: the layer's own changes start as the snapshot's
                        seed_upper(c.origin.files / "deps" / f"{i}.{j}" / "upper", box.dir / "deps" / f"{i}.{j}")
                    provider.attach(path / "paths" / p, target, box.dir / "deps" / f"{i}.{j}")
                    if owner is not None:  # the view's top (its upper layer's own) is the box user's
                        os.chown(target, *owner)
            made.append({**layer.to_json(), "built": built})

    def revive(self, host: Host, box: Box) -> None:
        """Mount the layers again after a reboot (their upper dirs kept the box's changes)."""
        from worktreebox.layers import deps
        from worktreebox.providers import mounts
        from worktreebox.providers.mounts.base import is_mountpoint

        data = box.data.get(self.name) or {}
        provider = mounts.get(data["mount"]) if data.get("mount") in mounts.PROVIDERS else None
        if provider is None or not provider.mounts or not box.path.is_dir():
            return
        for i, layer in enumerate(data.get("layers") or []):
            for j, p in enumerate(layer["paths"]):
                target = box.path / layer["dir"] / p
                if is_mountpoint(target):
                    continue
                entry = deps.store(host.home).path(layer["key"])
                if not entry.is_dir():
                    raise WtboxError(f"The {layer['kind']} layer of {box.id} is gone ({entry}); "
                                     f"remove the box and make a new one.")
                target.mkdir(parents=True, exist_ok=True)
                provider.attach(entry / "paths" / p, target, box.dir / "deps" / f"{i}.{j}")

    def destroy(self, host: Host, box: Box) -> None:
        from worktreebox.providers.mounts.base import unmount_all

        if box.dir.is_symlink():
            return  # a claimed pool box's old name (see Worktree.destroy)
        # the layers are mounted inside the worktree view: below box.path, taken down before it
        unmount_all(box.path)
        shutil.rmtree(box.dir / "deps", ignore_errors=True)

    def status(self, host: Host, box: Box) -> dict[str, Any] | None:
        data = box.data.get(self.name)
        if not data:
            return None
        hidden = ("built", "toolchain")  # the toolchain is the fingerprint's; deps status keeps its shape
        return {"deps": [{k: v for k, v in layer.items() if k not in hidden} for layer in data["layers"]]}


def _runner(c: Creation, layer: Layer) -> Callable[[str, str | Path, dict[str, str]], None]:
    """Run a build command with its output in the box's logs/deps.jsonl (in a sandbox of its own
    when the box has one: resources/sandbox.build_sandbox); fail with its last lines."""
    def run(cmd: str, cwd: str | Path, env: dict[str, str]) -> None:
        from pathlib import Path

        from worktreebox.resources.sandbox import build_sandbox
        from worktreebox.secrets import Redactor
        from worktreebox.telemetry.logs.run import run_logged

        c.note(f"building the {layer.kind} layer of {layer.dir or 'the repo root'} (once per lock file)")
        with build_sandbox(c.host, c.box, Path(cwd).parent) as launcher:
            if launcher.sandboxed:
                env = {**env, "HOME": str(Path(cwd).parent / "home")}
            rc, last = run_logged(cmd, cwd, env, c.box.logs_dir, "deps", Redactor(list(c.secrets.values())),
                                  timeout=c.config.deps.timeout, keep_lines=15, launcher=launcher)
        if rc != 0:
            tail = "\n".join("  " + line for line in last) or "  (no output)"
            raise WtboxError(f"Building the {layer.kind} dependency layer of {layer.dir or 'the repo root'} "
                             f"(`{cmd}`) failed with exit code {rc}; nothing was kept. Its last lines:\n{tail}")
    return run
