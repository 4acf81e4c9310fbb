"""Commands on single boxes: new, ls, status, env, exec, shell, rm."""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import click

from worktreebox.cli.commands._common import box_argument, emit_json, get_host, info, json_option, run_cmd, table
from worktreebox.errors import UsageError, WtboxError


def parse_secrets(items: tuple[str, ...]) -> dict[str, str]:
    """--secret NAME (value from the caller's env) or NAME=@file."""
    import re

    out = {}
    for item in items:
        name, _, src = item.partition("=")
        if not re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", name):
            raise UsageError(f"--secret {item!r}: expected NAME or NAME=@FILE.")
        if src:
            if not src.startswith("@"):
                raise UsageError(f"--secret {name}: give the value through the environment or NAME=@FILE, never inline.")
            try:
                out[name] = Path(src[1:]).read_text().rstrip("\n")
            except OSError as e:
                raise UsageError(f"--secret {name}: cannot read {src[1:]}: {e.strerror}.") from None
        elif name in os.environ:
            out[name] = os.environ[name]
        else:
            raise UsageError(f"--secret {name}: {name} is not set in your environment.")
    return out


@click.command()
@click.argument("task")
@click.option("--repo", type=click.Path(), help="Repository to cut the box from (default: the one around the cwd).")
@click.option("--from", "ref", help="Git ref to start from (default: HEAD).")
@click.option("--secret", "secrets", multiple=True, help="NAME (from your env) or NAME=@FILE; services get it, disk never does.")
@click.option("--no-services", is_flag=True, help="Create the box without starting its services.")
@click.option("--ttl", help="Remove after this long without use (e.g. 8h); default [box] ttl or 72h.")
@click.option("--keep", is_flag=True, help="Never remove this box in gc.")
@click.option("--show-secrets", is_flag=True, help="Show passwords in the output.")
@click.option("--no-pool", is_flag=True, help="Always make a fresh box, never one from the warm pool.")
@click.option("--no-wait", is_flag=True, help="Refuse at once when the host is full ([host] max_active / max_load) "
              "instead of waiting for room.")
@json_option
@run_cmd
def new(task, repo, ref, secrets, no_services, ttl, keep, show_secrets, no_pool, no_wait, as_json):
    """Create a box for TASK (from the warm pool when one matches)."""
    from worktreebox.fleet.pool import new_box

    host = get_host()
    t0 = time.perf_counter()
    # WTBOX_PROGRESS=1: progress lines on stderr for a program that reads them (`wtbox mcp`).
    show = (sys.stderr.isatty() and not as_json) or os.environ.get("WTBOX_PROGRESS") == "1"
    progress = (lambda m: info(f"  {m}")) if show else (lambda m: None)
    box, from_pool = new_box(host, task, repo=repo, ref=ref, secrets=parse_secrets(secrets),
                             start_services=not no_services, ttl=ttl, keep=keep, progress=progress,
                             use_pool=not no_pool, wait=not no_wait, on_wait=lambda m: info(f"wtbox: {m}"))
    out = describe(host, box, show_secrets)
    out["from_pool"] = from_pool
    if as_json:
        emit_json(out)
        return
    info(f"{'claimed' if from_pool else 'created'} {box.id} in {time.perf_counter() - t0:.2f}s"
         + (" (from the warm pool)" if from_pool else ""))
    _print_box(out)


def describe(host, b, show_secrets: bool) -> dict:
    """The JSON contract of `new` and `status` (Host.describe)."""
    return host.describe(b, show_secrets=show_secrets)


def _print_box(out: dict) -> None:
    click.echo(f"box      {out['id']}  ({out['state']})")
    click.echo(f"branch   {out['branch']}")
    click.echo(f"path     {out['path']}")
    if out["ports"]:
        click.echo("ports    " + "  ".join(f"{k}={v}" for k, v in out["ports"].items()))
    for service, link in (out.get("urls") or {}).items():
        click.echo(f"url      {link}" + (f"  ({service})" if len(out["urls"]) > 1 else ""))
    if out.get("database"):
        db = out["database"]
        click.echo(f"database {db['mode']}: {db['url']}")
    for svc in out.get("services") or []:
        click.echo(f"service  {svc.get('name')}: {svc.get('state')} pid={svc.get('pid')} "
                   f"restarts={svc.get('restarts', 0)}")
    click.echo(f"enter    cd {out['path']} && set -a && . {out['dir']}/env && set +a   (or: wtbox shell {out['id']})")


@click.command()
@click.option("--all", "all_", is_flag=True, help="Include the warm pool's boxes (made ahead, not yet claimed).")
@json_option
@run_cmd
def ls(all_, as_json):
    """List boxes."""
    host = get_host()
    every = host.list()
    boxes = [b for b in every if all_ or b.pool is None]
    if as_json:
        emit_json([host.list_json(b, every) for b in boxes])
        return
    if not boxes:
        info("no boxes; create one with 'wtbox new TASK'")
        return
    now = time.time()
    rows = [[b.id, b.state + (" (keep)" if b.keep else "") + (" (pool)" if b.pool else ""),
             " ".join(f"{k}={v}" for k, v in b.ports.items()), host.first_url(b, every) or "-",
             _age(now - b.created_at), str(b.path)] for b in boxes]
    table(rows, ["ID", "STATE", "PORTS", "URL", "AGE", "PATH"])


def _age(s: float) -> str:
    for unit, n in (("d", 86400), ("h", 3600), ("m", 60)):
        if s >= n:
            return f"{int(s // n)}{unit}"
    return f"{int(s)}s"


@click.command()
@box_argument
@click.option("--show-secrets", is_flag=True, help="Show passwords in the output.")
@json_option
@run_cmd
def status(box, show_secrets, as_json):
    """Show a box: ports, database, services."""
    host = get_host()
    out = host.status(host.get(box), show_secrets=show_secrets)
    if as_json:
        emit_json(out)
        return
    _print_box(out)
    wt = out.get("worktree") or {}
    click.echo(f"disk     {out['disk_bytes'] / 1e6:.1f} MB of its own; its worktree {out['worktree_bytes'] / 1e6:.1f} MB"
               + (f" (changes over its {wt['mount']} view of trees/{wt['tree'][:12]})" if wt.get("tree") else ""))
    if out.get("problem"):
        info(f"warning: {out['problem']}")


@click.command()
@box_argument
@click.option("--format", "fmt", type=click.Choice(["sh", "dotenv", "json"]), default="sh", show_default=True)
@json_option
@run_cmd
def env(box, fmt, as_json):
    """Print the box env (eval "$(wtbox env BOX)")."""
    from worktreebox.services.envfile import format_env

    b = get_host().get(box)
    sys.stdout.write(format_env(b.env, "json" if as_json else fmt))


@click.command(name="exec", context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False})
@click.argument("box")
@click.argument("cmd", nargs=-1, required=True, type=click.UNPROCESSED)
@run_cmd
def exec_(box, cmd):
    """Run CMD in the box's worktree with the box env; exits with CMD's exit code."""
    if cmd and cmd[0] == "--":
        cmd = cmd[1:]
    if not cmd:
        raise UsageError("Give a command to run: wtbox exec BOX -- CMD ...")
    b, env = _enter(box)
    try:
        os.execvpe(cmd[0], list(cmd), env)
    except FileNotFoundError:
        click.echo(f"wtbox: command not found: {cmd[0]}", err=True)
        sys.exit(127)
    except PermissionError:
        click.echo(f"wtbox: permission denied: {cmd[0]}", err=True)
        sys.exit(126)


@click.command()
@box_argument
@run_cmd
def shell(box):
    """Open your $SHELL in the box."""
    b, env = _enter(box)
    env["WTBOX_SHELL"] = b.id
    sh = os.environ.get("SHELL") or "/bin/bash"
    os.execvpe(sh, [sh], env)


def _enter(ref):
    """Resolve BOX, record the use (TTL), chdir into its worktree and step into its cgroup (what we
    exec next runs there, and the box's limits and teardown cover it); (box, env with secrets)."""
    from worktreebox.system import cgroups, procs

    host = get_host()
    b = host.get(ref)
    if not b.path.is_dir():
        raise WtboxError(f"The worktree of {b.id} is gone ({b.path}); remove the box with 'wtbox rm {b.id}'.")
    host.registry.touch(b.id)
    env = host.exec_env(b, host.running_secrets(b))
    os.chdir(b.path)
    procs.enter_cgroup(cgroups.Leaf(host.home, b.id, cgroups.EXEC))
    return b, env


@click.command()
@click.argument("boxes", nargs=-1)
@click.option("--force", is_flag=True, help="Also discard uncommitted work and commits no other branch has.")
@click.option("--all", "all_", is_flag=True, help="Remove every box.")
@click.option("--yes", is_flag=True, help="Don't ask for confirmation with --all.")
@click.option("--keep-branch", is_flag=True, help="Keep the wtbox/<id> branch in the repo.")
@json_option
@run_cmd
def rm(boxes, force, all_, yes, keep_branch, as_json):
    """Remove boxes and everything they own."""
    host = get_host()
    if all_:
        targets = host.list()
        if not targets:
            info("no boxes to remove")
            if as_json:
                emit_json([])
            return
        if not yes:
            if not sys.stdin.isatty():
                raise UsageError("--all needs --yes when there is no terminal to confirm on.")
            click.confirm(f"Remove all {len(targets)} boxes?", abort=True, err=True)
    elif not boxes:
        targets = [host.get(None)]
    else:
        targets = []
        for ref in boxes:
            b = host.get(ref)
            if b.id not in {t.id for t in targets}:
                targets.append(b)
    if not force:  # refuse before touching anything
        refusals = [(b, host.unsaved_work(b)) for b in targets]
        refusals = [(b, why) for b, why in refusals if why]
        if refusals:
            b, why = refusals[0]
            more = f" (and {len(refusals) - 1} more boxes)" if len(refusals) > 1 else ""
            raise WtboxError(f"{b.id} has {why}{more}; nothing was removed. Commit and push, or use --force to discard.")
    removed = []
    for b in targets:
        t0 = time.perf_counter()
        host.rm(b, force=True, keep_branch=keep_branch)
        removed.append({"id": b.id, "seconds": round(time.perf_counter() - t0, 3)})
        if not as_json:
            info(f"removed {b.id}")
    if as_json:
        emit_json(removed)
