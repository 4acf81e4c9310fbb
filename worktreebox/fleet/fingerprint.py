"""A box's fingerprint: what it was made from, as parts and one short hash.

Two boxes with one fingerprint were made from the same inputs: the commit, the recorded config
(config/recorded.py), each dependency layer's key and the toolchain that built it, the
interpreters its services run with, the migration hash of its data, what it inherited from the
environment (secrets by name only), the host's mount provider and wtbox's version. Everything is
read from what the box recorded when it was made (its registry row), so `ls` pays a hash per box.

What it does not cover (README, "Reproducible boxes"): the host's kernel, the time, the network,
and anything a box's processes fetch or change after it was made (its own changes: `wtbox diff`).
"""
from __future__ import annotations

import hashlib
import json
from typing import TYPE_CHECKING, Any

from worktreebox.version import __version__

if TYPE_CHECKING:
    from worktreebox.box import Box
    from worktreebox.config.repo import RepoConfig
    from worktreebox.host import Host

# In the order `diff` and `status` show them.
PARTS = ("commit", "config", "layers", "toolchain", "migrations", "env", "secrets", "mounts", "wtbox")
SHORT = 12


def parts_of(box: Box) -> dict[str, Any]:
    """The fingerprint's parts, from the box's record (None where a box made by an older wtbox lacks one)."""
    data = box.data
    db = data.get("database") or {}
    return {
        "commit": data.get("base_sha"),
        "config": (data.get("config") or {}).get("sha256"),
        "layers": _layers((data.get("deps") or {}).get("layers") or []),
        "toolchain": data.get("toolchain"),
        "migrations": db.get("migrations") if db.get("mode") not in (None, "none") else None,
        "env": _env(data.get("inherited_env")),
        "secrets": sorted(data.get("secret_names") or []),
        "mounts": (data.get("worktree") or {}).get("mount"),
        "wtbox": data.get("wtbox_version"),
    }


def _layers(layers: list[dict[str, Any]]) -> dict[str, Any]:
    """Each layer by where it is attached: its key and the toolchain that built it."""
    return {f"{layer['kind']}:{layer.get('dir') or '.'}": {"key": layer["key"], "toolchain": layer.get("toolchain")}
            for layer in layers}


def _env(inherited: dict[str, str] | None) -> dict[str, str] | None:
    """What the box inherited as status shows it (a URL's password masked): the fingerprint is printed."""
    from worktreebox.secrets import mask_env

    return None if inherited is None else mask_env(inherited)


def digest(parts: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:SHORT]


def of(box: Box) -> dict[str, Any]:
    """`status --json`'s fingerprint: {"hash": short, "parts": {...}}."""
    parts = parts_of(box)
    return {"hash": digest(parts), "parts": parts}


def short(box: Box) -> str:
    """The one short hash `ls` and `status` show."""
    return digest(parts_of(box))


def differing(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """The names of the parts that differ, in PARTS order."""
    return [p for p in PARTS if a.get(p) != b.get(p)]


# ---------------------------------------------------------------------- a fresh box's, without making one

def expected(host: Host, repo: str, sha: str, cfg: RepoConfig, environ: dict[str, str] | None = None
             ) -> dict[str, Any]:
    """The parts a box made now from `repo` at `sha` with `cfg` by this process would get; the warm
    pool claims only a box whose parts are these. The same functions the resources record with:
    layer keys (toolchain versions cached per binary), the migration hash, the environment capture."""
    from worktreebox.config import recorded
    from worktreebox.layers import deps
    from worktreebox.providers import mounts
    from worktreebox.providers.postgres.golden import migrations_hash
    from worktreebox.services import boxenv

    files = deps.scan(repo, sha, host.home, cfg.deps)
    layers = []
    for layer in deps.detect(files, cfg.deps):
        if deps.missing_tool(layer) is None:
            layer.key = deps.key_of(layer, files, host.home)
            layers.append(layer.to_json())
    inherited = boxenv.capture(cfg.box, environ)
    db = cfg.database
    return {
        "commit": sha,
        "config": recorded.digest(cfg.text, cfg.procfile_text),
        "layers": _layers(layers),
        "toolchain": deps.runtime_toolchain(inherited.get("PATH"), host.home),
        "migrations": None if db.mode == "none" else migrations_hash(repo, sha, db.migrate, db.migrations,
                                                                     db.extensions),
        "env": _env(inherited),
        "secrets": sorted(boxenv.inherited_secrets(cfg.box, environ)),
        "mounts": mounts.for_host(host).name,
        "wtbox": __version__,
    }


def pool_mismatch(box: Box, want: dict[str, Any]) -> list[str]:
    """What keeps a pooled box from being the box a fresh `new` would make. Its commit may be an
    ancestor of the wanted one (a claim fast-forwards it): the pool's own check; the rest must match."""
    return [p for p in differing(parts_of(box), want) if p != "commit"]


def describe_part(name: str, value: Any) -> str:
    """One part as `diff` prints it: short hashes, a few names."""
    if value is None:
        return "-"
    if name == "commit" and isinstance(value, str):
        return value[:12]
    if isinstance(value, dict):
        return ", ".join(f"{k}={_brief(v)}" for k, v in sorted(value.items())) or "(none)"
    if isinstance(value, list):
        return ", ".join(map(str, value)) or "(none)"
    return str(value)


def _brief(value: Any) -> str:
    if isinstance(value, dict) and "key" in value:
        return str(value["key"])[:12]
    return str(value)
