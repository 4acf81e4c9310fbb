"""A box and the facts about it. Every external name is derived from the id."""
from __future__ import annotations

import dataclasses
import re
import secrets as _secrets
import time
import unicodedata
from pathlib import Path
from typing import Any

from worktreebox.errors import UsageError

# States a registry row goes through. `creating` and `removing` rows older than the
# gc grace window belong to a crashed command; `expired` boxes outlived their TTL but
# hold unsaved work, so gc reports them instead of destroying them.
CREATING, READY, FAILED, REMOVING, EXPIRED = "creating", "ready", "failed", "removing", "expired"
# A box that was ready but is not whole right now (its services' supervisor died); data["degraded"]
# says why and what brings it back.
DEGRADED = "degraded"
# A box whose own changes are being put back from a snapshot (fleet/restore.py): not ready until that
# finished; data["restoring"] names the snapshot, so a restore that was killed is finished by running it again.
RESTORING = "restoring"

_ID_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,40}-[0-9a-f]{8}$")
MAX_SLUG = 40


def slugify(task: str) -> str:
    """Turn a task name into a safe slug, or raise UsageError with one sentence."""
    if not isinstance(task, str) or not task.strip():
        raise UsageError("The task name is empty; give a short name such as 'fix-login'.")
    if len(task) > 200:
        raise UsageError(f"The task name is {len(task)} characters long; keep it under 200.")
    if task.startswith("-"):
        raise UsageError(f"The task name {task!r} starts with '-'; pass a name, not an option.")
    slug = re.sub(r"[^a-z0-9]+", "-", _ascii(task).lower()).strip("-")
    slug = slug[:MAX_SLUG].rstrip("-")
    if not slug:
        raise UsageError(
            f"The task name {task!r} has no letters or digits to build a box id from; use e.g. 'fix-login'."
        )
    return slug


def _ascii(task: str) -> str:
    """The task's letters and digits in ASCII: transliterated (ταsk -> task, 日本 -> RiBen), not dropped;
    anything else (emoji, punctuation) separates words."""
    if task.isascii():
        return task
    from anyascii import anyascii  # ~6 ms, only for a name that needs it

    return "".join(anyascii(ch) if unicodedata.category(ch)[0] in "LN" else " "
                   for ch in unicodedata.normalize("NFC", task))


def new_id(task: str) -> str:
    return f"{slugify(task)}-{_secrets.token_hex(4)}"


def is_box_id(text: str) -> bool:
    return bool(_ID_RE.match(text))


def hex_of(box_id: str) -> str:
    """The 8 random hex digits at the end of a box id."""
    return box_id.rsplit("-", 1)[-1]


def pg_name(box_id: str) -> str:
    """Postgres role, schema (and database) name of a box: wt_<8 hex>."""
    return f"wt_{hex_of(box_id)}"


def branch_name(box_id: str) -> str:
    return f"wtbox/{box_id}"


@dataclasses.dataclass
class Box:
    """One box as recorded in the registry, plus paths derived from its id."""

    id: str
    task: str
    repo: str
    branch: str
    dir: Path
    state: str = CREATING
    created_at: float = dataclasses.field(default_factory=time.time)
    last_used_at: float = dataclasses.field(default_factory=time.time)
    updated_at: float | None = None  # last state change (gc's grace window); set by the registry
    ttl: float | None = None
    keep: bool = False
    ports: dict[str, int] = dataclasses.field(default_factory=dict)
    env: dict[str, str] = dataclasses.field(default_factory=dict)
    # Per-resource facts that must survive the CLI process (e.g. database mode, base sha).
    data: dict[str, Any] = dataclasses.field(default_factory=dict)
    # The pool key (config hash) of a box made ahead and not yet claimed; None for every other box.
    pool: str | None = None
    # In-memory only: set by Host.new so the context-manager API can remove the box.
    _host: Any = dataclasses.field(default=None, repr=False, compare=False)

    # Derived paths: the box layout of docs/architecture.md.
    @property
    def path(self) -> Path:
        return self.dir / "worktree"

    @property
    def cache_dir(self) -> Path:
        return self.dir / "cache"

    @property
    def tmp_dir(self) -> Path:
        return self.dir / "tmp"

    @property
    def logs_dir(self) -> Path:
        return self.dir / "logs"

    @property
    def metrics_dir(self) -> Path:
        return self.dir / "metrics"

    @property
    def run_dir(self) -> Path:
        return self.dir / "run"

    @property
    def env_file(self) -> Path:
        return self.dir / "env"

    @property
    def pg_name(self) -> str:
        return pg_name(self.id)

    @property
    def inside_ports(self) -> dict[str, int]:
        """Each port as the box's own processes see it: its canonical number in a sandboxed box
        ([box] ports = { web = 3000 }), else the leased one (`ports` is what the host reaches)."""
        return dict((self.data.get("sandbox") or {}).get("ports") or self.ports)

    # The one reader of data["pool_id"] (written by the claim, fleet/pool.py) and data["spare"]
    # (resources/sandbox_spares.py): the name a box claimed from the warm pool was made under,
    # `pool-<the same hex>`, or the name of the spare sandbox it was made with, `spare-<the same hex>`.
    # Its services, supervisor, metrics store or holder were started under it and keep it (WTBOX_ID,
    # paths under boxes/<alias>), so rm and gc destroy and count what that name holds too.
    @property
    def alias(self) -> str | None:
        """The pool id this box was made under or the spare it took, or None."""
        alias = self.data.get("pool_id") or self.data.get("spare")
        return alias if isinstance(alias, str) and alias != self.id else None

    def under_alias(self) -> Box | None:
        """This box named by its alias (id, branch, dir), or None when it has none."""
        if self.alias is None:
            return None
        return dataclasses.replace(self, id=self.alias, branch=branch_name(self.alias),
                                   dir=self.dir.parent / self.alias, _host=None)

    def facts(self) -> dict[str, Any]:
        """The Jinja2 context of this box ({{ box.id }}, {{ ports.web }}, {{ db.url }}, {{ metrics.url }},
        {{ traces.url }}, {{ browser.cdp_url }}, {{ backing.redis.url }}): the one builder, used while the box
        is made and rebuilt from the saved box later (`up`). Addresses are the ones its processes use
        (inside a sandbox)."""
        inside = self.inside_ports
        db = dict(self.data.get("database") or {})
        if db:
            db["host"] = self.env.get("PGHOST", db.get("host"))
            db["port"] = int(self.env["PGPORT"]) if self.env.get("PGPORT", "").isdigit() else db.get("port")
            db["url"] = self.env.get("DATABASE_URL", db.get("url"))
        metrics = _at(self.data.get("metrics"), inside.get("metrics"))
        if metrics.get("url"):
            metrics["remote_write_url"] = metrics["url"] + "/api/v1/write"
        return {
            "box": {"id": self.id, "task": self.task, "branch": self.branch, "path": str(self.path),
                    "dir": str(self.dir), "home": str(self.dir.parent.parent)},
            "ports": inside, "db": db, "metrics": metrics, "traces": _at(self.data.get("traces"), inside.get("otlp")),
            "browser": {k: v for k, v in _at(self.data.get("browser"), inside.get("browser"), "cdp_url").items()
                        if k != "enabled"},
            "backing": {n: d["facts"] for n, d in (self.data.get("backing") or {}).items() if d.get("facts")},
        }

    def to_json(self, *, show_secrets: bool = False) -> dict[str, Any]:
        """The JSON contract of `new`, `status` and `ls`."""
        from worktreebox.secrets import mask_env

        out: dict[str, Any] = {
            "id": self.id,
            "task": self.task,
            "repo": self.repo,
            "branch": self.branch,
            "path": str(self.path),
            "dir": str(self.dir),
            "state": self.state,
            "created_at": _iso(self.created_at),
            "last_used_at": _iso(self.last_used_at),
            "ttl_seconds": self.ttl,
            "keep": self.keep,
            "pooled": self.pool is not None,
            "ports": dict(self.ports),
            "env": dict(self.env) if show_secrets else mask_env(self.env),
        }
        if self.state == DEGRADED and self.data.get("degraded"):
            out["reason"] = self.data["degraded"]
        if self.state == RESTORING and self.data.get("restoring"):
            name = self.data["restoring"]["snapshot"]
            out["reason"] = f"restoring snapshot {name}; if that stopped, run 'wtbox restore {self.id} {name}' again"
        if "inherited_env" in self.data:  # what the box took from the shell that made it (boxenv.py)
            out["inherited_env"] = mask_env(self.data["inherited_env"])
        db = self.data.get("database")
        if db:
            from worktreebox.secrets import mask_url

            out["database"] = {
                "mode": db.get("mode"),
                "url": db.get("url") if show_secrets else mask_url(db.get("url", "")),
                "name": db.get("name"),
                "schema": db.get("schema"),
                "user": db.get("user"),
            }
        return out

    # Context manager: `with host.new("task") as box:` removes the box on exit.
    def __enter__(self) -> Box:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._host is not None:
            self._host.rm(self.id, force=True)


def _at(data: dict[str, Any] | None, seen: int | None, key: str = "url") -> dict[str, Any]:
    """A helper's facts (`port`, and its URL under `key`) at the port its box sees it on inside."""
    out = dict(data or {})
    port = out.get("port")
    if port and seen and seen != port:
        out["port"] = seen
        if out.get(key):
            out[key] = str(out[key]).replace(f":{port}", f":{seen}")
    return out


def _iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    import datetime as _dt

    return _dt.datetime.fromtimestamp(ts, _dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
