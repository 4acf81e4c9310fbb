"""Operations on boxes as wholes: new, ls, status, env, exec, test, shell, rm, keep, unkeep."""
from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from worktreebox.operations.spec import (
    BOX,
    CHANGES,
    DESTROYS,
    NO_POOL,
    NO_WAIT,
    REF,
    REPO,
    REQUIRED,
    SHOW_SECRETS,
    Operation,
    Param,
    parsed,
)

if TYPE_CHECKING:
    import threading

    from worktreebox.box import Box
    from worktreebox.host import Host


def new(host: Host, task: str, repo: str | None = None, ref: str | None = None, no_services: bool = False,
        ttl: str | None = None, keep: bool = False, no_pool: bool = False, no_wait: bool = False,
        show_secrets: bool = False, *, secrets: dict[str, str] | None = None,
        progress: Callable[[str], None] | None = None, on_wait: Callable[[str], None] | None = None) -> dict:
    """Host.new through the warm pool (fleet.pool.new_box); describe() plus `from_pool`. Under a
    cancelled MCP call (system/cancel.py) it unwinds as Ctrl-C does, and a box finished just
    before the cancel is removed too."""
    from worktreebox.config.load import parse_duration
    from worktreebox.errors import Interrupted
    from worktreebox.fleet.pool import new_box
    from worktreebox.system import cancel

    ttl_s = parsed("ttl", parse_duration, ttl, positive=True) if ttl is not None else None
    pool: dict[str, Any] = {}
    box, from_pool = new_box(host, task, repo=repo, ref=ref, secrets=secrets or {}, start_services=not no_services,
                             ttl=ttl_s, keep=keep, progress=progress, use_pool=not no_pool, wait=not no_wait,
                             on_wait=on_wait, report=pool)
    if cancel.cancelled():
        host.rm(box, force=True)
        raise Interrupted("Interrupted; the box was removed.")
    from worktreebox.fleet import fingerprint

    out = host.describe(box, show_secrets=show_secrets)
    out["fingerprint"] = fingerprint.of(box)
    out["from_pool"] = from_pool
    out["pool"] = pool  # claimed, and why not: no pooled box, or which fingerprint parts differed
    return out


def listed(host: Host, all: bool = False) -> tuple[list[Box], list[Box]]:
    """(the boxes to show, every box: the router's URLs need them all), each as it is now (a dead
    supervisor, a deleted directory: degraded, with the reason)."""
    every = [host.notice(b) for b in host.list()]
    return [b for b in every if all or b.pool is None], every


def ls_json(host: Host, box: Box, every: list[Box]) -> dict:
    """One element of `ls --json`: the box, its `url` through the router and its fingerprint's short hash."""
    from worktreebox.fleet import fingerprint

    return {**host.list_json(box, every), "fingerprint": fingerprint.short(box)}


def ls(host: Host, all: bool = False) -> list[dict]:
    found, every = listed(host, all)
    return [ls_json(host, b, every) for b in found]


def status(host: Host, box: str | None, show_secrets: bool = False) -> dict:
    """describe(), disk use, and a `problem` when the box dir is gone; looking is using (TTL)."""
    from worktreebox.fleet import fingerprint

    b = host.get(box)
    host.registry.touch(b.id)
    out = host.describe(b, show_secrets=show_secrets)
    out["fingerprint"] = fingerprint.of(b)
    out["disk_bytes"] = host.disk_bytes(b)  # logs and metrics included
    out["worktree_bytes"] = host.worktree_bytes(b)
    if not b.dir.exists():
        out["problem"] = f"the box directory {b.dir} is gone; 'wtbox rm {b.id}' cleans up the rest"
    return out


def env(host: Host, box: str | None, show_secrets: bool = False) -> dict[str, str]:
    from worktreebox.secrets import mask_env

    b = host.get(box)
    return dict(b.env) if show_secrets else mask_env(b.env)


def run(host: Host, box: str | None, cmd: str | Sequence[str], cwd: str | None = None, timeout: float = 600.0,
        tail: int = 100, show_secrets: bool = False, *, cancel: threading.Event | None = None) -> dict:
    """A command in the box as `exec` runs it, captured: exit code and output tails, secrets masked
    unless `show_secrets` (execute.run_in_box)."""
    from worktreebox.services.boxenv import redactor_for
    from worktreebox.services.execute import run_in_box

    b = host.get(box)
    secrets = host.running_secrets(b)
    return run_in_box(host, b, cmd, cwd=cwd, timeout=timeout, tail=tail, secrets=secrets,
                      redact=None if show_secrets else redactor_for(b, secrets), cancel=cancel)


def test(host: Host, box: str | None, cmd: str | None = None, timeout: str | None = None, *,
         on_line: Callable[[str], None] | None = None) -> dict:
    """The repo's test command ([test] cmd, or `cmd`) in the box (fleet/testrun.py); `on_line` sees
    each output line as it comes (the CLI's terminal)."""
    from worktreebox.config.load import parse_duration
    from worktreebox.fleet.testrun import run_test

    limit = parsed("timeout", parse_duration, timeout, positive=True) if timeout else None
    b = host.get(box)
    return {"id": b.id, **run_test(host, b, cmd, limit, on_line=on_line)}


test.__test__ = False  # type: ignore[attr-defined]  # not a pytest test


def enter(host: Host, box: str | None) -> tuple[Box, dict[str, str]]:
    """For `exec` and `shell`, which become the command: resolve BOX, record the use (TTL), chdir into
    its worktree and step into its cgroup (what runs next runs there, and the box's limits and
    teardown cover it); (box, env with secrets)."""
    from worktreebox.system import cgroups, procs

    b, env = _entering(host, box)
    os.chdir(b.path)
    procs.enter_cgroup(cgroups.Leaf(host.home, b.id, cgroups.EXEC))
    return b, env


def _entering(host: Host, box: str | None) -> tuple[Box, dict[str, str]]:
    from worktreebox.errors import WtboxError

    b = host.get(box)
    if not b.path.is_dir():
        raise WtboxError(f"The worktree of {b.id} is gone ({b.path}); remove the box with 'wtbox rm {b.id}'.")
    host.registry.touch(b.id)
    return b, host.exec_env(b, host.running_secrets(b))


def exec_argv(host: Host, box: str | None, cmd: Sequence[str], *,
              shell: bool = False) -> tuple[list[str], dict[str, str], int | None]:
    """`exec` and `shell`: (argv, env, None) for the caller to become (it stands in the box's worktree
    and cgroup then), or, for a sandboxed box's `exec`, (argv, env, exit code) once CMD ran through
    its launcher in a session of its own (execute.run_attached: no box process gets the caller's
    terminal as its own). The shell keeps the terminal: it is the person's, not an agent's."""
    from worktreebox.services.execute import run_attached
    from worktreebox.system import cgroups, procs

    b, env = _entering(host, box)
    launcher = host.launcher(b)
    argv = launcher.command(list(cmd), b.path)
    if shell:
        env["WTBOX_SHELL"] = b.id
    os.chdir(b.path)
    procs.enter_cgroup(cgroups.Leaf(host.home, b.id, cgroups.EXEC))  # what it starts starts there
    if launcher.sandboxed and not shell:
        return argv, env, run_attached(argv, env=env, cwd=b.path, cgroup=None)
    return argv, env, None


def rm(host: Host, box: str | Box | None, force: bool = False, keep_branch: bool = False) -> dict:
    b = host.get(box) if box is None or isinstance(box, str) else box
    t0 = time.perf_counter()
    host.rm(b, force=force, keep_branch=keep_branch)
    return {"id": b.id, "seconds": round(time.perf_counter() - t0, 3)}


RM_AT_ONCE = 8  # boxes removed at once: each mostly waits (processes ending, git, PostgreSQL, unmounts)


def rm_many(host: Host, targets: Sequence[Box], keep_branch: bool = False,
            removed: Callable[[Box], None] = lambda b: None) -> list[dict]:
    """Remove the boxes RM_AT_ONCE at a time, sharing one walk of /proc (`rm --all` of 300 boxes
    in well under 30 s); every box is tried, then the first failure is raised."""
    from concurrent.futures import ThreadPoolExecutor

    from worktreebox.system import procs

    def one(b: Box) -> dict | BaseException:
        try:
            out = rm(host, b, force=True, keep_branch=keep_branch)
        except Exception as e:
            return e
        removed(b)
        return out

    with procs.one_walk(), ThreadPoolExecutor(min(RM_AT_ONCE, max(1, len(targets)))) as pool:
        results = list(pool.map(one, targets))
    failed = [r for r in results if isinstance(r, BaseException)]
    if failed:
        raise failed[0]
    return [r for r in results if isinstance(r, dict)]


def set_keep(host: Host, box: str | None, value: bool) -> dict:
    b = host.get(box)
    host.registry.set_keep(b.id, value)
    b.keep = value
    return b.to_json()


NEW = Operation(
    "new", "Create a box for TASK (from the warm pool when one matches): worktree, ports, database, caches, "
           "metrics, services.",
    (Param("task", "Short task name; the box id is derived from it (e.g. fix-login).", default=REQUIRED,
           positional=True),
     REPO, REF,
     Param("no_services", "Create the box without starting its services.", bool, False),
     Param("ttl", "Remove after this long without use (e.g. 8h); default [box] ttl of wtbox.toml, or 72h."),
     Param("keep", "Never remove this box in gc.", bool, False),
     SHOW_SECRETS, NO_POOL, NO_WAIT),
    new, result="The box as `wtbox status` shows it (its fingerprint too), plus from_pool and pool (claimed; why "
                "not: no pooled box, or the fingerprint parts that differed). Reports progress; cancelling the call "
                "removes the half-made box.",
    effect=CHANGES, tool="box_new")

LS = Operation(
    "ls", "List boxes.",
    (Param("all", "Include the warm pool's boxes (made ahead, not yet claimed).", bool, False),),
    ls, list[dict[str, Any]], "Each box: id, task, state, branch, path, ports, fingerprint (its short hash), ...",
    tool="box_list")

STATUS = Operation(
    "status", "Show a box: ports, database, services, disk.", (BOX, SHOW_SECRETS), status,
    result="The box with what each of its resources reports, its fingerprint (hash and parts: what it was made "
           "from), disk_bytes, worktree_bytes, and a problem when something is wrong.", tool="box_status")

ENV = Operation(
    "env", "The environment variables the box exports.", (BOX,), env, dict[str, str],
    "Variable -> value (passwords masked unless show_secrets).", tool="box_env")

EXEC = Operation(
    "exec", "Run CMD in the box's worktree with the box env, as its services run.",
    (BOX, Param("cmd", "The command: an argv list (run as is) or, in MCP, a shell string (run with sh -c).",
                many=True, default=REQUIRED, positional=True)),
    run, result="exit_code, the last lines of stdout and stderr (secret values masked), seconds, timed_out.",
    effect=CHANGES, tool="box_exec")

TEST = Operation(
    "test", "Run the repo's test command ([test] cmd, which `wtbox init` finds in its CI) in the box with the "
            "box env, as exec runs commands; its result is the box's check in compare.",
    (BOX, Param("cmd", "Run this shell command instead of [test] cmd."),
     Param("timeout", "Stop it after this long, e.g. 30m (default: [test] timeout).")),
    test, result="{id, cmd, exit, seconds, timed_out, passed/failed/errors when it prints them, last_lines} "
                 "(secret values masked).", effect=CHANGES, tool="box_test")

SHELL = Operation("shell", "Open your $SHELL in the box.", (BOX,), enter, effect=CHANGES)

RM = Operation(
    "rm", "Remove a box and everything it owns; refused when its worktree holds unsaved work, unless force.",
    (BOX,
     Param("force", "Also discard uncommitted work and commits no other branch has.", bool, False),
     Param("keep_branch", "Keep the wtbox/<id> branch in the repo.", bool, False)),
    rm, result="{id, seconds}.", effect=DESTROYS, tool="box_rm")

KEEP = Operation("keep", "Mark a box so gc never removes it.", (BOX,),
                 lambda host, box: set_keep(host, box, True), effect=CHANGES)
UNKEEP = Operation("unkeep", "Let gc remove the box again when its TTL expires.", (BOX,),
                   lambda host, box: set_keep(host, box, False), effect=CHANGES)
