"""pool: start, resize, show or drain the warm pool of boxes made ahead (worktreebox/fleet/pool.py)."""
from __future__ import annotations

import time

import click

from worktreebox.cli.commands._common import emit_json, get_host, info, json_option, run_cmd, table
from worktreebox.errors import UsageError, WtboxError


@click.command()
@click.argument("repo", required=False)
@click.option("--size", type=click.IntRange(0, 64), help="Keep this many boxes ready (wins over [pool] size).")
@click.option("--status", "show_status", is_flag=True, help="Show every pool: commit, size, ready, filling.")
@click.option("--drain", is_flag=True, help="Stop the filler and remove the pool's boxes.")
@click.option("--wait", "wait_s", type=float, metavar="SECONDS",
              help="Wait up to SECONDS until the pool is full before printing.")
@json_option
@run_cmd
def pool(repo, size, show_status, drain, wait_s, as_json):
    """Start or resize the warm pool of REPO (default: the repo around the cwd)."""
    from worktreebox.fleet import pool as P
    from worktreebox.system import git

    host = get_host()
    if show_status:
        if size is not None or drain:
            raise UsageError("--status only shows; run --size or --drain separately.")
        _print(P.status(host, str(git.resolve_repo(repo)) if repo else None), as_json)
        return
    root = str(git.resolve_repo(repo))
    if drain:
        if size is not None:
            raise UsageError("--drain empties the pool; give --size separately (or --size 0 to keep it empty).")
        gone = P.drain(host, root)
        info(f"drained {len(gone)} pooled boxes of {root}")
        _print(P.status(host, root), as_json)
        return
    t = P.resolve_target(root, home=host.home)
    if t.why_not:
        raise UsageError(f"The pool cannot serve {root}: {t.why_not}.")
    if size is not None:
        host.registry.set_pool_size(root, size)
    want = P.desired_size(host, root, t.config)
    if want <= 0:
        if size == 0:
            P.drain(host, root)
            _print(P.status(host, root), as_json)
            return
        raise UsageError(f"{root} asks for no pool: add [pool] size = N to its wtbox.toml or pass --size N.")
    P.ensure_filler(host, root)
    if wait_s:
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            row = P.status(host, root)[0]
            if row["ready"] >= want:
                break
            if not row["filler"] and row["ready"] < want and not row["filling"]:
                P.ensure_filler(host, root)  # it gave up or exited: the log says why
            time.sleep(0.2)
        else:
            raise WtboxError(f"The pool of {root} has {row['ready']} of {want} boxes ready after {wait_s:g}s; "
                             f"see {P.log_path(host, root)}.")
    _print(P.status(host, root), as_json)


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
