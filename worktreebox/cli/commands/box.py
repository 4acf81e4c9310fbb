"""Commands on single boxes: new, ls, status, env, exec, shell, rm."""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import click

from worktreebox import settings
from worktreebox.cli.build import command
from worktreebox.cli.commands._common import emit_json, get_host, info, table
from worktreebox.errors import UsageError, WtboxError
from worktreebox.operations import boxes


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
                raise UsageError(f"--secret {name}: give the value through the environment or NAME=@FILE, "
                                 "never inline.")
            try:
                out[name] = Path(src[1:]).read_text().rstrip("\n")
            except OSError as e:
                raise UsageError(f"--secret {name}: cannot read {src[1:]}: {e.strerror}.") from None
        elif name in os.environ:
            out[name] = os.environ[name]
        else:
            raise UsageError(f"--secret {name}: {name} is not set in your environment.")
    return out


SECRET = click.option("--secret", "secrets", multiple=True,
                      help="NAME (from your env) or NAME=@FILE; services get it, disk never does.")


@command(boxes.NEW, extras=[SECRET])
def new(task, repo, ref, secrets, no_services, ttl, keep, show_secrets, no_pool, no_wait, as_json):
    t0 = time.perf_counter()
    # WTBOX_PROGRESS=1: progress lines on stderr for a program that reads them.
    show = (sys.stderr.isatty() and not as_json) or settings.PROGRESS.on()
    progress = (lambda m: info(f"  {m}")) if show else (lambda m: None)
    out = boxes.new(get_host(), task, repo, ref, no_services, ttl, keep, no_pool, no_wait, show_secrets,
                    secrets=parse_secrets(secrets), progress=progress, on_wait=lambda m: info(f"wtbox: {m}"))
    if as_json:
        emit_json(out)
        return
    from_pool = out["from_pool"]
    info(f"{'claimed' if from_pool else 'created'} {out['id']} in {time.perf_counter() - t0:.2f}s"
         + (" (from the warm pool)" if from_pool else ""))
    _print_box(out)


def _print_box(out: dict) -> None:
    click.echo(f"box      {out['id']}  ({out['state']})")
    if out.get("reason"):
        click.echo(f"reason   {out['reason']}")
    click.echo(f"branch   {out['branch']}")
    click.echo(f"path     {out['path']}")
    if out.get("fingerprint"):
        click.echo(f"made of  {out['fingerprint']['hash']}  (fingerprint; 'wtbox diff' compares two boxes)")
    if out["ports"]:
        click.echo("ports    " + "  ".join(f"{k}={v}" for k, v in out["ports"].items()))
    for service, link in (out.get("urls") or {}).items():
        click.echo(f"url      {link}" + (f"  ({service})" if len(out["urls"]) > 1 else ""))
    if out.get("database"):
        db = out["database"]
        click.echo(f"database {db['mode']}: {db['url']}")
    for svc in out.get("services") or []:
        pid = f" pid={svc['pid']}" if svc.get("pid") else ""
        click.echo(f"service  {svc.get('name')}: {svc.get('state')}{pid} restarts={svc.get('restarts', 0)}"
                   + (f"  ({svc['error']})" if svc.get("error") else ""))
    click.echo(f"enter    cd {out['path']} && set -a && . {out['dir']}/env && set +a   (or: wtbox shell {out['id']})")


@command(boxes.LS)
def ls(all, as_json):
    from worktreebox.fleet import fingerprint

    host = get_host()
    found, every = boxes.listed(host, all)
    if as_json:
        emit_json([boxes.ls_json(host, b, every) for b in found])
        return
    if not found:
        info("no boxes; create one with 'wtbox new TASK'")
        return
    now = time.time()
    rows = [[b.id, b.state + (" (keep)" if b.keep else "") + (" (pool)" if b.pool else ""),
             " ".join(f"{k}={v}" for k, v in b.ports.items()), host.first_url(b, every) or "-",
             _age(now - b.created_at), fingerprint.short(b), str(b.path)] for b in found]
    table(rows, ["ID", "STATE", "PORTS", "URL", "AGE", "FINGERPRINT", "PATH"])


def _age(s: float) -> str:
    for unit, n in (("d", 86400), ("h", 3600), ("m", 60)):
        if s >= n:
            return f"{int(s // n)}{unit}"
    return f"{int(s)}s"


@command(boxes.STATUS)
def status(box, show_secrets, as_json):
    out = boxes.status(get_host(), box, show_secrets)
    if as_json:
        emit_json(out)
        return
    _print_box(out)
    wt = out.get("worktree") or {}
    click.echo(f"disk     {out['disk_bytes'] / 1e6:.1f} MB of its own; "
               f"its worktree {out['worktree_bytes'] / 1e6:.1f} MB"
               + (f" (changes over its {wt['mount']} view of trees/{wt['tree'][:12]})" if wt.get("tree") else ""))
    sb = out.get("sandbox") or {}
    if sb:
        where = f"{sb['provider']}, {sb.get('mode')} mode, network {sb.get('network')}" \
            if sb["provider"] != "off" else "off: this box sees and signals every other"
        click.echo(f"sandbox  {where}" + ("" if sb.get("running", True) else " (NOT RUNNING)"))
        faults = [f"{n}: {_faults(f['faults'])}" for n, f in (sb.get("forwards") or {}).items()
                  if any(f["faults"].values())]
        outbound = sb.get("outbound") or {}
        if outbound.get("down") or outbound.get("loss"):
            faults.append(f"outbound: {_faults(outbound)}")
        if faults:
            click.echo("net      " + "; ".join(faults))
        for fixed, name in (sb.get("exposed") or {}).items():
            click.echo(f"exposed  127.0.0.1:{fixed} -> {name}")
    if out.get("problem"):
        info(f"warning: {out['problem']}")


def _faults(f: dict) -> str:
    from worktreebox.cli.commands.network import _faults as shown

    return shown(f)


FORMAT = click.option("--format", "fmt", type=click.Choice(["sh", "dotenv", "json"]), default="sh", show_default=True)


@command(boxes.ENV, extras=[FORMAT])
def env(box, fmt, as_json):
    from worktreebox.services.envfile import format_env

    values = boxes.env(get_host(), box, show_secrets=True)  # your own terminal: eval needs the real values
    sys.stdout.write(format_env(values, "json" if as_json else fmt))


@command(boxes.EXEC, json=False,
         context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False})
def exec_(box, cmd):
    if cmd and cmd[0] == "--":
        cmd = cmd[1:]
    if not cmd:
        raise UsageError("Give a command to run: wtbox exec BOX -- CMD ...")
    argv, env, code = boxes.exec_argv(get_host(), box, cmd)
    if code is not None:  # ran in the box's sandbox: leave as the exec below would, without Python's
        sys.stdout.flush()  # finalization (measured: tens of ms of module teardown after `true`)
        sys.stderr.flush()
        os._exit(code)
    try:
        os.execvpe(argv[0], argv, env)
    except FileNotFoundError:
        click.echo(f"wtbox: command not found: {cmd[0]}", err=True)
        sys.exit(127)
    except PermissionError:
        click.echo(f"wtbox: permission denied: {cmd[0]}", err=True)
        sys.exit(126)


@command(boxes.SHELL, json=False)
def shell(box):
    sh = os.environ.get("SHELL") or "/bin/bash"
    argv, env, _ = boxes.exec_argv(get_host(), box, [sh], shell=True)
    os.execvpe(argv[0], argv, env)


ALL = click.option("--all", "all_", is_flag=True, help="Remove every box.")
YES = click.option("--yes", is_flag=True, help="Don't ask for confirmation with --all.")


@command(boxes.RM, extras=[ALL, YES], several=["box"])
def rm(box, force, keep_branch, all_, yes, as_json):
    host, refs = get_host(), box
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
    elif not refs:
        targets = [host.get(None)]
    else:
        targets = []
        for ref in refs:
            b = host.get(ref)
            if b.id not in {t.id for t in targets}:
                targets.append(b)
    if not force:  # refuse before touching anything
        refusals = [(b, host.unsaved_work(b)) for b in targets]
        refusals = [(b, why) for b, why in refusals if why]
        if refusals:
            b, why = refusals[0]
            more = f" (and {len(refusals) - 1} more boxes)" if len(refusals) > 1 else ""
            raise WtboxError(f"{b.id} has {why}{more}; nothing was removed. "
                             "Commit and push, or use --force to discard.")
    removed = boxes.rm_many(host, targets, keep_branch=keep_branch,
                            removed=(lambda b: None) if as_json else (lambda b: info(f"removed {b.id}")))
    if as_json:
        emit_json(removed)
