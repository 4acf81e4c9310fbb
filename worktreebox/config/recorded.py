"""The config a box was made with: the exact wtbox.toml and Procfile texts and where they came from.

`new` reads the main checkout's files (uncommitted edits apply) or, with --from, the files at that
ref; what it read is kept in the box's registry row (`data["config"]`), and that record, not
whatever the files say later, is what `up`, `restart`, the pool and `gc` use for the box. A box's
own edited wtbox.toml takes effect only through `up --reload`, which records it in turn.
"""
from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path
from typing import Any

from worktreebox.config.repo import RepoConfig, parse_repo_config
from worktreebox.errors import UsageError

DATA_KEY = "config"
# Tables `up --reload` can apply to a made box; the others were spent making it (ports leased,
# layers attached, database migrated) and need a new box.
RELOADABLE = ("services", "services_from_procfile", "pool", "test")


def digest(toml: str | None, procfile: str | None) -> str:
    """The config hash: both texts as written (the pool key hashes them the same way)."""
    h = hashlib.sha256()
    for part in (toml or "", procfile or ""):
        h.update(part.encode() + b"\0")
    return h.hexdigest()[:16]


def record(cfg: RepoConfig) -> dict[str, Any]:
    """What a box keeps of the config it was made with (its registry row's data["config"])."""
    return {"source": cfg.source, "toml": cfg.text, "procfile": cfg.procfile_text,
            "sha256": digest(cfg.text, cfg.procfile_text)}


def config_of(data: dict[str, Any]) -> RepoConfig | None:
    """The box's recorded config, parsed; None for a box made before configs were recorded."""
    rec = data.get(DATA_KEY)
    if not rec:
        return None
    return parse_repo_config(rec.get("toml"), rec.get("source") or "(recorded)", procfile=rec.get("procfile"))


def read_worktree(path: Path) -> RepoConfig:
    """The wtbox.toml (and Procfile) in a box's own worktree, as `up --reload` applies it."""
    from worktreebox.config.load import load_repo_config_file

    return load_repo_config_file(path, source_label=f"{path / 'wtbox.toml'} (reloaded)")


def check_reloadable(box_id: str, old: RepoConfig, new: RepoConfig) -> None:
    """`up --reload` applies services only: a change to any other table is refused, naming it."""
    changed = [f.name for f in dataclasses.fields(RepoConfig)
               if f.compare and f.name not in (*RELOADABLE, "source")
               and getattr(old, f.name) != getattr(new, f.name)]
    if changed:
        tables = ", ".join(f"[{name}]" for name in changed)
        raise UsageError(f"{new.source}: {tables} changed, which 'up --reload' cannot apply to {box_id} (only "
                         f"[services] and a Procfile); make a new box for it.")
