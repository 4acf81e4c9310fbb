"""pool: start, resize, show or drain the warm pool of boxes made ahead (worktreebox/fleet/pool.py)."""
from __future__ import annotations

from worktreebox.cli.build import command
from worktreebox.cli.commands._common import emit_json, get_host, info, table
from worktreebox.operations import fleet


@command(fleet.POOL)
def pool(repo, size, status, drain, wait, as_json):
    out = fleet.pool(get_host(), repo, size, status, drain, wait, note=info)
    _print(out["pools"], as_json)


def _print(rows: list[dict], as_json: bool) -> None:
    if as_json:
        emit_json({"pools": rows})
        return
    if not rows:
        info("no pools; start one with 'wtbox pool REPO --size N' or [pool] size = N in wtbox.toml")
        return
    table([[r["repo"], (r["commit"] or "?")[:12], r["size"], r["ready"], r["filling"],
            "yes" if r["filler"] else "no"] for r in rows],
          ["REPO", "COMMIT", "SIZE", "READY", "FILLING", "FILLER"])
