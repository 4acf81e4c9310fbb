"""`wtbox diff A B`: what differs between two boxes, in three short parts.

1. fingerprint: the parts (fingerprint.py) that differ: what the boxes were made from;
2. files: the paths whose contents differ between the two worktrees (each box's own changes to
   its base, committed or not, untracked files included, and what differs between the bases);
3. data: tables whose row counts differ between the two boxes' databases.

Two boxes made from one commit and config by the same wtbox answer "the same" on all three.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from worktreebox.errors import WtboxError
from worktreebox.fleet import fingerprint
from worktreebox.system import git

if TYPE_CHECKING:
    from worktreebox.box import Box
    from worktreebox.host import Host

MAX_PATHS = 5000  # beyond this many changed paths, `diff` compares the first ones and says so
MAX_TABLES = 500


def diff(host: Host, a: Box, b: Box) -> dict[str, Any]:
    """The three parts, as `diff --json` prints them; `same` when all are empty."""
    fa, fb = fingerprint.parts_of(a), fingerprint.parts_of(b)
    parts = [{"part": p, "a": fa.get(p), "b": fb.get(p)} for p in fingerprint.differing(fa, fb)]
    files, truncated = differing_files(a, b)
    data, data_error = differing_rows(host, a, b)
    return {"a": a.id, "b": b.id, "fingerprints": [fingerprint.digest(fa), fingerprint.digest(fb)],
            "same": not (parts or files or data or data_error), "fingerprint": parts, "files": files,
            "files_truncated": truncated, "data": data, "data_error": data_error}


# ---------------------------------------------------------------------- files

def own_changes(box: Box) -> set[str]:
    """Paths the box changed against its base commit: tracked (committed on its branch or not) and untracked."""
    base = box.data.get("base_sha")
    if not box.path.is_dir():
        return set()
    from worktreebox.providers.sandbox import launcher_for

    launcher = launcher_for(box)  # a sandboxed box's git dir is its own: asked inside the box, as its user
    tracked = git.git(box.path, "diff", "--name-only", "-z", *([base] if base else []), check=False,
                      launcher=launcher).stdout
    untracked = git.git(box.path, "ls-files", "--others", "--exclude-standard", "-z", check=False,
                        launcher=launcher).stdout
    return {p for p in (tracked + untracked).split("\0") if p}


def differing_files(a: Box, b: Box) -> tuple[list[str], bool]:
    """Sorted paths whose contents differ between the two worktrees (and whether the list was cut)."""
    paths = own_changes(a) | own_changes(b)
    base_a, base_b = a.data.get("base_sha"), b.data.get("base_sha")
    if base_a and base_b and base_a != base_b:
        between = git.git(a.repo, "diff", "--name-only", "-z", base_a, base_b, check=False).stdout
        paths |= {p for p in between.split("\0") if p}
    ordered = sorted(paths)
    return [p for p in ordered[:MAX_PATHS] if _content(a.path / p) != _content(b.path / p)], len(ordered) > MAX_PATHS


def _content(path: Path) -> bytes | None:
    """A file's bytes, a symlink's target, or None when it is absent (a directory counts as absent)."""
    try:
        if path.is_symlink():
            return b"-> " + str(path.readlink()).encode()
        return path.read_bytes() if path.is_file() else None
    except OSError:
        return None


# ---------------------------------------------------------------------- data

def row_counts(host: Host, box: Box) -> dict[str, int] | None:
    """Rows per table of the box's own schema (schema mode) or database (database mode); None without one."""
    db = box.data.get("database") or {}
    if db.get("mode") in (None, "none") or not db.get("name"):
        return None
    import psycopg
    from psycopg import sql

    srv = host.database_server(db.get("provider"))
    schema = db.get("schema") or "public"
    try:
        with srv.session(db["name"]) as conn:
            tables = [r[0] for r in conn.execute(
                "SELECT table_name FROM information_schema.tables WHERE table_schema = %s"
                " AND table_type = 'BASE TABLE' ORDER BY table_name LIMIT %s", (schema, MAX_TABLES))]
            count = sql.SQL("SELECT count(*) FROM {}.{}")
            return {t: conn.execute(count.format(sql.Identifier(schema), sql.Identifier(t))).fetchall()[0][0]
                    for t in tables}
    except psycopg.Error as e:
        raise WtboxError(str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__) from e


def differing_rows(host: Host, a: Box, b: Box) -> tuple[list[dict[str, Any]], str | None]:
    """Tables whose row counts differ ({"table", "a", "b"}; None: the box has no such table), or why
    the data could not be compared (a server down, a database gone): said, never taken as the same."""
    counts = []
    for box in (a, b):
        try:
            counts.append(row_counts(host, box) or {})
        except (OSError, WtboxError) as e:
            return [], f"{box.id}'s database: {e}"
    ca, cb = counts
    rows = [{"table": t, "a": ca.get(t), "b": cb.get(t)} for t in sorted(set(ca) | set(cb)) if ca.get(t) != cb.get(t)]
    return rows, None


# ---------------------------------------------------------------------- a few lines for people

def lines(result: dict[str, Any]) -> list[str]:
    """`wtbox diff`'s output: fingerprint parts first, then files, then data."""
    a, b = result["a"], result["b"]
    if result["same"]:
        return [f"{a} and {b} are the same: fingerprint {result['fingerprints'][0]}, no file or row count differs."]
    out = [f"fingerprint  {result['fingerprints'][0]} ({a}) vs {result['fingerprints'][1]} ({b})"]
    for p in result["fingerprint"]:
        out.append(f"  {p['part']:<11}{_side(p['part'], p['a'], p['b'])}")
    files = result["files"]
    more = "+" if result["files_truncated"] else ""
    out.append(f"files        {len(files)}{more} differ" + (": " + ", ".join(files[:8]) if files else ""))
    if len(files) > 8:
        out.append(f"             ... and {len(files) - 8} more (--json lists them)")
    data = result["data"]
    if result.get("data_error"):
        out.append(f"data         not compared: {result['data_error']}")
        return out
    out.append("data         " + (", ".join(f"{d['table']} {_n(d['a'])} vs {_n(d['b'])} rows" for d in data[:8])
                                  if data else "the same row counts"))
    return out


def _side(part: str, a: Any, b: Any) -> str:
    """One part's two values; for a mapping only the keys that differ."""
    if isinstance(a, dict) and isinstance(b, dict):
        keys = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
        a, b = {k: a.get(k) for k in keys}, {k: b.get(k) for k in keys}
    return f"{fingerprint.describe_part(part, a)}  vs  {fingerprint.describe_part(part, b)}"


def _n(value: int | None) -> str:
    return "-" if value is None else str(value)
