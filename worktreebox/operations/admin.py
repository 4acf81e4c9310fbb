"""Operations on the host itself: init, doctor, and the host's PostgreSQL (db start|stop|status)."""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from worktreebox.operations.spec import CHANGES, Operation, Param

if TYPE_CHECKING:
    from worktreebox.host import Host


def template_path(name: str) -> Path:
    from worktreebox.config.assets import asset_path

    return asset_path(f"templates/{name}")


def init(host: Host | None, repo: str = ".", force: bool = False, explain: bool = False) -> dict:
    """wtbox.toml from what the repo declares (derive/), or the starter when it declares nothing;
    with `explain`, what was found and could not be mapped, nothing written. `text` (not JSON): the
    report --explain prints."""
    from worktreebox.derive import derive
    from worktreebox.derive.writer import check, explain_text, render
    from worktreebox.derive.writer import explain as explained
    from worktreebox.errors import UsageError

    root = Path(repo)
    if not root.is_dir():
        raise UsageError(f"--repo {repo}: no such directory.")
    dest = root / "wtbox.toml"
    plan = derive(root)
    text = None if plan.empty else render(plan)
    if text is not None:
        check(text)
    if explain:
        starter = "" if text else "nothing to derive: init would write the starter template\n"
        return {**explained(plan), "would_write": "derived" if text else "starter template",
                "text": explain_text(plan) + starter}
    if dest.exists() and not force:
        raise UsageError(f"{dest} already exists; use --force to overwrite it (or --explain to see what init finds).")
    if text is None:
        shutil.copyfile(template_path("wtbox.toml"), dest)
    else:
        dest.write_text(text)
    return {"path": str(dest.resolve()), "starter": text is None, "derived_from": plan.files,
            "not_mapped": plan.notes}


def doctor(host: Host, extra: list[dict[str, Any]] | None = None) -> dict:
    """What is installed and missing, disk per box, what leaked; `extra` checks come first (the CLI's own)."""
    from worktreebox.fleet.doctor import report

    return report(host, extra or [])


def db_start(host: Host) -> dict:
    srv = host.database_server()
    srv.ensure_running()
    return srv.status()


def db_stop(host: Host) -> dict:
    srv = host.database_server()
    was_running = srv.stop()  # an external server refuses: wtbox does not stop it
    return {**srv.status(), "stopped": was_running}


def db_status(host: Host) -> dict:
    return host.database_server().status()


INIT = Operation("init", "Write wtbox.toml from the repo's compose file, CI workflow, Procfile, package.json, "
                         "devcontainer or manage.py (each line says where it came from); a commented starter when "
                         "they declare nothing.",
                 (Param("repo", "Where to write wtbox.toml.", default="."),
                  Param("force", "Overwrite an existing wtbox.toml.", bool, False),
                  Param("explain", "Print what init found and what it could not map; write nothing.", bool, False)),
                 init, result="{path, starter, derived_from, not_mapped}; with explain: what was found, nothing "
                              "written.",
                 effect=CHANGES)
DOCTOR = Operation("doctor", "Check binaries, ports and disk; report orphans and disk use per box.", (), doctor,
                   result="{ok, checks, boxes, orphans, layers, stray_mounts}.")
DB_START = Operation("db start", "Start the host's PostgreSQL (initdb on first use); no-op if it runs.", (),
                     db_start, result="The server's status.", effect=CHANGES)
DB_STOP = Operation("db stop", "Stop the host's cluster or container (boxes keep their data; it starts again on "
                               "next need).", (), db_stop, result="The server's status plus stopped.",
                    effect=CHANGES)
DB_STATUS = Operation("db status", "Whether the server runs, where, and on which port (never starts it).", (),
                      db_status, result="{provider, running, url, port, ...}.")
