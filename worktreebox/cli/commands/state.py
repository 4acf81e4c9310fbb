"""`wtbox snapshot|restore|fork`: a box's own state frozen, put back, or copied into new boxes."""
from __future__ import annotations

from worktreebox.cli.build import command
from worktreebox.cli.commands._common import emit_json, get_host, info, table
from worktreebox.operations import state


def _size(n: int | None) -> str:
    if n is None:
        return ""
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return ""


@command(state.SNAPSHOT)
def snapshot(box, name, list_, rm, as_json):
    out = state.snapshot(get_host(), box, name, list_, rm)
    if as_json:
        emit_json(out)
    elif list_:
        table([[s["name"], s["tip"][:10], ",".join(s.get("services") or []), _size(s.get("files_bytes")),
                _size((s.get("database") or {}).get("bytes"))] for s in out["snapshots"]],
              ["NAME", "TIP", "SERVICES", "FILES", "DATABASE"])
    elif rm:
        info(f"removed snapshot {out['removed']} of {out['box']}")
    else:
        info(f"snapshot {out['name']} of {out['id']}: files {_size(out['files_bytes'])}"
             + (f", database {_size(out['database']['bytes'])}" if out.get("database") else "")
             + f"; the box was paused {out['paused_ms']:.0f} ms"
             + ("" if out["frozen"] else " (not frozen: no cgroup)"))
        print(out["name"])


@command(state.RESTORE)
def restore(box, name, as_json):
    out = state.restore(get_host(), box, name)
    if as_json:
        emit_json(out)
    else:
        what = "files and data" if out["files_restored"] else "data (the files were unchanged)"
        info(f"{out['id']}: {what} back to {out['snapshot']} in {out['seconds']:.2f}s; "
             f"paused {out['paused_ms']:.0f} ms" + ("; services restarted" if out["services_restarted"] else ""))


@command(state.FORK)
def fork(box, n, task, from_snapshot, ttl, no_pool, show_secrets, as_json):
    out = state.fork(get_host(), box, n, task, from_snapshot, ttl, no_pool, show_secrets, progress=info)
    if as_json:
        emit_json(out)
        return
    for b in out:
        print(b["id"])
    info(f"{len(out)} fork{'s' if len(out) != 1 else ''} of {out[0]['fork']['from']} ready in {out[0]['seconds']:.2f}s")
