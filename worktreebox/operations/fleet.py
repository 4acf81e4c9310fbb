"""Operations over many boxes or the host: fanout, compare, pick, pool, gc."""
from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from worktreebox.errors import ParamError
from worktreebox.operations.spec import (
    BOX,
    CHANGES,
    DESTROYS,
    NO_WAIT,
    REQUIRED,
    Operation,
    Param,
    as_list,
    parsed,
)

if TYPE_CHECKING:
    from worktreebox.box import Box
    from worktreebox.fleet.fanout import Fanout
    from worktreebox.host import Host

URL_STARTS = ("/", "http://", "https://")


def plan_fanout(host: Host, task: str, n: int, ref: str | None = None, run: str | None = None,
                checks: Any = (), probes: Any = (), probe_requests: int = 100, browse: str | None = None,
                timeout: str | None = None, jobs: int | None = None, repo: str | None = None, warm: bool = False,
                no_pool: bool = False, no_wait: bool = False, from_box: str | None = None) -> Fanout:
    """A planned fan-out (every refusal happens here, before anything is created); the front ends
    start it and wait, each showing the attempts its own way."""
    from worktreebox.config.load import parse_duration
    from worktreebox.fleet import fanout as F

    if warm and no_pool:
        raise ParamError("{warm} fills the pool and {no_pool} ignores it; give one of them.", "warm", "no_pool")
    for name, paths in (("probes", as_list(probes)), ("browse", as_list(browse))):
        bad = next((p for p in paths if not p.startswith(URL_STARTS)), None)
        if bad is not None:
            raise ParamError(f"{{{name}}} {bad!r} is neither a path such as /health nor an http:// URL.", name)
    seconds = parsed("timeout", parse_duration, timeout) if timeout else None
    if ref and not from_box:
        ref, from_box = _ref_or_box(host, repo, ref)
    opts = F.Options(task=task, n=n, run=run, checks=tuple(as_list(checks)), probes=tuple(as_list(probes)),
                     repo=repo, ref=ref, timeout=seconds, jobs=jobs, probe_requests=probe_requests, warm=warm,
                     use_pool=not no_pool, browse=browse, wait=not no_wait, from_box=from_box)
    fo = F.Fanout(host, opts)
    fo.plan()
    return fo


def _ref_or_box(host: Host, repo: str | None, ref: str) -> tuple[str | None, str | None]:
    """`--from X`: a git ref of the repo when it is one, else a box (fork its state); (ref, box)."""
    from worktreebox.errors import WtboxError
    from worktreebox.system import git

    try:
        git.resolve_commit(git.resolve_repo(repo), ref)
        return ref, None
    except WtboxError:
        pass
    try:
        return None, host.get(ref).id
    except WtboxError:
        raise ParamError(f"{{ref}} {ref!r} is neither a git ref of the repo nor a box.", "ref") from None


def fanout(host: Host, task: str, n: int, *, on_change: Callable[[Any, Any], None] | None = None,
           tick: Callable[[], None] | None = None, **params: Any) -> list[dict]:
    """Plan, start and wait; the comparison rows. Interrupted (Ctrl-C, or a cancelled call's tick)
    stops the runs and leaves the boxes for inspection."""
    fo = plan_fanout(host, task, n, **params)
    if on_change is not None:
        fo.on_change = lambda a: on_change(fo, a)
    fo.start()
    rows = fo.wait(tick)
    none_made(rows)
    return rows


def none_made(rows: list[dict]) -> None:
    from worktreebox.errors import WtboxError

    if not any(r["id"] for r in rows):
        raise WtboxError(f"No box of the fan-out could be created; first error: {rows[0]['error']}")


def failed(rows: list[dict]) -> list[str]:
    """Attempts that did not succeed: not made, their --run exited non-zero or timed out, or a --check failed."""
    return [r["id"] or f"attempt {r.get('index')}" for r in rows
            if not r["id"] or r.get("error") or r.get("timed_out") or r.get("run_exit") not in (None, 0)
            or (r.get("checks_total") or 0) > (r.get("checks_passed") or 0)]


def all_succeeded(rows: list[dict]) -> None:
    """The CLI's exit code: 1 (after the table or JSON) when any attempt failed, naming them."""
    from worktreebox.errors import WtboxError

    none_made(rows)
    bad = failed(rows)
    if bad:
        raise WtboxError(f"{len(bad)} of {len(rows)} attempts failed their run or checks ({', '.join(bad[:5])}); "
                         "the table says which.")


def compare(host: Host, boxes: Any = (), fanout: str | None = None, sort: str | None = None) -> list[dict]:
    from worktreebox.fleet import compare as C

    refs = as_list(boxes)
    if bool(refs) == bool(fanout):
        raise ParamError("Give either {boxes} or {fanout} to compare.", "boxes", "fanout")
    return C.compare(host, refs, fanout, sort)


def plan_pick(host: Host, box: str | None, merge_into: str | None = None, push: bool = False,
              remote: str = "origin") -> tuple[Box, list[Box]]:
    """The kept box and the others of its fan-out, refused before anything changes (a bad branch
    name must not leave a half-made pick)."""
    from worktreebox.fleet import pick as P
    from worktreebox.system import git

    chosen, others = P.pick_plan(host, box)
    if merge_into is not None:
        git.check_branch_name(chosen.repo, merge_into)
    if push and (not remote or remote.startswith("-")):
        raise ParamError(f"{{remote}} {remote!r} is not a git remote name.", "remote")
    return chosen, others


def pick(host: Host, box: str | None, merge_into: str | None = None, push: bool = False, remote: str = "origin",
         *, note: Callable[[str], None] | None = None) -> dict:
    from worktreebox.fleet import pick as P

    chosen, others = plan_pick(host, box, merge_into, push, remote)
    return P.pick(host, chosen, others, merge_into=merge_into, push=push, remote=remote, note=note)


def pool(host: Host, repo: str | None = None, size: int | None = None, status: bool = False, drain: bool = False,
         wait: float | None = None, *, note: Callable[[str], None] = lambda m: None) -> dict:
    """Start, resize, show or drain the warm pool of REPO; {pools: [...]} afterwards."""
    from worktreebox.errors import WtboxError
    from worktreebox.fleet import pool as P
    from worktreebox.system import git

    if status:
        if size is not None or drain:
            raise ParamError("{status} only shows; give {size} or {drain} separately.", "status", "size", "drain")
        return {"pools": P.status(host, str(git.resolve_repo(repo)) if repo else None)}
    root = str(git.resolve_repo(repo))
    if drain:
        if size is not None:
            raise ParamError("{drain} empties the pool; give {size} separately (or {size} 0 to keep it empty).",
                             "drain", "size")
        gone = P.drain(host, root)
        host.registry.set_pool_size(root, None)  # an earlier --size refills nothing now: wtbox.toml decides
        note(f"drained {len(gone)} pooled boxes of {root}")
        return {"pools": P.status(host, root)}
    t = P.resolve_target(root, home=host.home)
    if t.why_not:
        raise ParamError(f"The pool cannot serve {{repo}} {root}: {t.why_not}.", "repo")
    if size is not None:
        host.registry.set_pool_size(root, size)
    want = P.desired_size(host, root, t.config)
    if want <= 0:
        if size == 0:
            P.drain(host, root)
            return {"pools": P.status(host, root)}
        raise ParamError(f"{root} asks for no pool: add [pool] size = N to its wtbox.toml or give {{size}} N.",
                         "size")
    P.ensure_filler(host, root)
    if wait:
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            row = P.status(host, root)[0]
            if row["ready"] >= want:
                break
            if not row["filler"] and row["ready"] < want and not row["filling"]:
                P.ensure_filler(host, root)  # it gave up or exited: the log says why
            time.sleep(0.2)
        else:
            raise WtboxError(f"The pool of {root} has {row['ready']} of {want} boxes ready after {wait:g}s; "
                             f"see {P.log_path(host, root)}.")
    return {"pools": P.status(host, root)}


def gc(host: Host, dry_run: bool = False, grace: str = "10m", spares: bool = False) -> dict:
    from worktreebox.config.load import parse_duration
    from worktreebox.fleet import gc as gc_mod

    return gc_mod.run(host, grace=parsed("grace", parse_duration, grace), dry_run=dry_run, spares=spares)


FANOUT = Operation(
    "fanout", "Create N boxes for TASK, run CMD in each, and compare the results.",
    (Param("task", "Task name; the boxes are TASK-1 … TASK-N.", default=REQUIRED, positional=True),
     Param("n", "Number of attempts.", int, REQUIRED, flags=("-n",), min=1),
     Param("ref", "Git ref every box starts from (default: HEAD), or a box: every attempt then starts from "
                  "that box's state, as `wtbox fork` makes it.", flags=("--from",)),
     Param("from_box", "Start every attempt from this box's state (its files, branch and data).", metavar="BOX"),
     Param("run", "Shell command run in each box's worktree; {i} and {box} are replaced, $WTBOX_FANOUT_INDEX "
                  "and $WTBOX_FANOUT_N are set.", metavar="CMD"),
     Param("checks", "Commands run after the run (e.g. 'pytest -q'); exit code, duration and test counts are "
                     "recorded.", many=True, default=(), flags=("--check",), metavar="CMD"),
     Param("probes", "Paths (or URLs) measured after the services restarted.", many=True, default=(),
           flags=("--probe",), metavar="PATH"),
     Param("probe_requests", "Requests per probe.", int, 100, min=1),
     Param("browse", "Load PATH in each box's Chromium after the services restarted: a screenshot and the "
                     "console errors per attempt.", metavar="PATH"),
     Param("timeout", "Limit for the run and each check (e.g. 30m)."),
     Param("jobs", "At most this many attempts at once (default: all).", int, None, min=1),
     Param("repo", "Repository to cut the boxes from (default: the one around the working directory)."),
     Param("warm", "Top the warm pool up to N boxes first, then claim them all.", bool, False),
     Param("no_pool", "Make every box fresh, never from the warm pool.", bool, False),
     NO_WAIT),
    fanout, list[dict[str, Any]], "The comparison rows. Reports progress per attempt; cancelling stops the runs "
                                  "as Ctrl-C does (the boxes stay for inspection).",
    effect=CHANGES, tool="fanout")

COMPARE = Operation(
    "compare", "Compare boxes side by side: run, checks, tests, diff, ready time, p95, errors in logs.",
    (Param("boxes", "Boxes to compare (or give fanout).", many=True, default=(), positional=True, metavar="BOX..."),
     Param("fanout", "Compare the boxes of the latest fan-out of this task.", metavar="TASK"),
     Param("sort", "Order rows by best, index, id, run_exit, run_seconds, checks_passed, tests_passed, "
                   "tests_failed, diff, ready, p95, errors or console (best first).")),
    compare, list[dict[str, Any]], "One row per box.", tool="compare")

def diff(host: Host, a: str, b: str) -> dict[str, Any]:
    from worktreebox.fleet.diff import diff as differ

    return differ(host, host.get(a), host.get(b))


DIFF = Operation(
    "diff", "What differs between two boxes: fingerprint parts (what they were made from), then files, then data "
            "(row counts per table).",
    (dataclasses.replace(BOX, name="a", cwd=False, metavar="A", help="The first box (id, id prefix or task)."),
     dataclasses.replace(BOX, name="b", cwd=False, metavar="B", help="The second box.")),
    diff, result="{a, b, same, fingerprints, fingerprint: [{part, a, b}], files: [path], files_truncated, "
                 "data: [{table, a, b}], data_error (why data was not compared)}.", tool="diff")

PICK = Operation(
    "pick", "Keep BOX (marked keep) and remove the other boxes of its fan-out; no committed work is lost.",
    (dataclasses.replace(BOX, cwd=False),
     Param("merge_into", "Merge the box's branch into this branch first.", metavar="BRANCH"),
     Param("push", "Push the branch (merge_into's, if given) to remote.", bool, False),
     Param("remote", "Remote for push.", default="origin")),
    pick, result="{kept, branch, merged_into, pushed, removed, kept_branches, failed}.", effect=DESTROYS,
    tool="box_pick")

POOL = Operation(
    "pool", "Start or resize the warm pool of REPO (default: the repo around the cwd).",
    (Param("repo", "The repository.", positional=True),
     Param("size", "Keep this many boxes ready (wins over [pool] size).", int, None, min=0, max=64),
     Param("status", "Show every pool: commit, size, ready, filling.", bool, False),
     Param("drain", "Stop the filler and remove the pool's boxes.", bool, False),
     Param("wait", "Wait up to SECONDS until the pool is full.", float, None, metavar="SECONDS")),
    pool, result="{pools: [{repo, commit, size, ready, filling, filler}]}.", effect=CHANGES)

GC = Operation(
    "gc", "Remove orphans, crashed half-boxes and boxes whose TTL expired.",
    (Param("dry_run", "Print what would be removed and why; change nothing.", bool, False),
     Param("grace", "Leave boxes in creating/removing alone for this long (their command may still run).",
           default="10m"),
     Param("spares", "Also remove the spare sandboxes kept for the next `new` (they end by themselves after "
                     "WTBOX_SANDBOX_SPARE_TTL).", bool, False)),
    gc, result="{actions, mounts, layers, cgroups, snapshots, errors, seconds}.", effect=DESTROYS)
