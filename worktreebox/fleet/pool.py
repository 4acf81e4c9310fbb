"""The warm pool: boxes made ahead per (repo, base commit, config hash), claimed by `new`.

A pooled box is an ordinary box made by `Host.new` under the task `pool` (id
`pool-<8 hex>`) with its pool key in the registry row. Claiming it (README, "Warm pool"):

- one `BEGIN IMMEDIATE` registry transaction picks a ready box of the key and renames its
  row to `<task-slug>-<same hex>` (task, branch, dir, port leases), state `creating`, the
  claimer as its creator: two claims never get one box, and a claim killed at any moment
  leaves a `creating` row with a dead creator, which `gc` destroys whole;
- then what can be renamed is renamed: `boxes/<pool id>` → `boxes/<id>` (the old name
  stays as a symlink, because running processes hold paths under it), `git branch -m`,
  `git worktree repair`, the env file (WTBOX_ID, paths) rewritten; the worktree is
  fast-forwarded when the caller's base moved on; state `ready`.

What is not renamed is what running processes hold: the services keep WTBOX_ID=<pool id>
in their environment (same hex), the database is `wt_<hex>` anyway. The claim records that
name (`data["pool_id"]`, read only as `Box.alias`); `Host.rm` destroys the pieces under it
too, and `gc` counts them as the claimed box's.

One filler process per repo (`python -m worktreebox.fleet.pool HOME REPO`, niced, under a file
lock) keeps the pool at its size and exits after a while without claims.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from worktreebox import admission, settings
from worktreebox.box import CREATING, READY, Box, branch_name, hex_of, slugify
from worktreebox.config.assets import PACKAGE_PARENT
from worktreebox.config.load import config_sources, parse_duration, parse_repo_config
from worktreebox.errors import ConfigError, UsageError, WtboxError
from worktreebox.host import Host, _phase
from worktreebox.layers import deps
from worktreebox.providers import sandbox
from worktreebox.resources import cgroup as cgroup_resource
from worktreebox.resources import router as router_resource
from worktreebox.services import boxenv
from worktreebox.services.boxenv import without_box_vars
from worktreebox.system import git, procs
from worktreebox.system.fsutil import LockBusy, atomic_write, file_lock

if TYPE_CHECKING:
    from worktreebox.config.load import RepoConfig

POOL_TASK = "pool"
FILLER_NICE = 10
# A filler with a full pool and no claims for this long exits; the next `new` starts it again.
IDLE_EXIT = 300.0
# Templates that name the box's task-derived identity cannot be rendered before the task is known.
_NAMES_TASK = re.compile(r"\bbox\s*(?:\.\s*(?:id|task|branch)\b|\[\s*['\"](?:id|task|branch)['\"])")


@dataclasses.dataclass
class Target:
    """What a box of this repo at this commit would be made from, and its pool key."""

    repo: str
    sha: str
    key: str
    config: RepoConfig
    # Why this config cannot be pooled (None: it can).
    why_not: str | None = None


def resolve_target(repo: Path | str, sha: str | None = None, *, explicit_ref: bool = False,
           config: RepoConfig | None = None, home: Path | None = None) -> Target:
    """The pool key of a `new` from `repo` at `sha` (default HEAD): wtbox.toml, Procfile and lock files.
    With `home`, the lock files come from the commit's dependency scan kept there (no `git ls-tree`
    of the whole commit on every claim)."""
    repo = Path(repo)
    sha = sha or git.resolve_commit(repo, "HEAD")
    source, text, procfile = config_sources(repo, sha, explicit_ref=explicit_ref)
    cfg = config or parse_repo_config(text, source, procfile=procfile)
    h = hashlib.sha256()
    for part in (text or "", procfile or ""):
        h.update(part.encode() + b"\0")
    try:
        files = deps.scan(repo, sha, home, cfg.deps) if home is not None else git.files_at(repo, sha)
    except WtboxError:
        files = {}
    for path, blob in sorted(deps.lock_files(files).items()):
        h.update(f"{path} {blob}\n".encode())
    why_not = None
    if _NAMES_TASK.search(text or "") or _NAMES_TASK.search(procfile or ""):
        why_not = (f"{source} names box.id, box.task or box.branch in a template, which a box made ahead "
                   "cannot know; such repos get fresh boxes")
    return Target(repo=str(repo), sha=sha, key=h.hexdigest()[:16], config=cfg, why_not=why_not)


def desired_size(host: Host, repo: str, cfg: RepoConfig) -> int:
    """`wtbox pool REPO --size N` if given, else [pool] size of the repo's wtbox.toml."""
    size = host.registry.pool_size_of(repo)
    return cfg.pool.size if size is None else size


# ---------------------------------------------------------------------- claiming

def new_box(host: Host, task: str, repo: str | Path | None = None, ref: str | None = None, *,
            secrets: dict[str, str] | None = None, start_services: bool = True, ttl: str | float | None = None,
            keep: bool = False, progress: Callable[[str], None] | None = None,
            config: RepoConfig | None = None, use_pool: bool = True,
            target: Target | None = None, wait: bool = True,
            on_wait: Callable[[str], None] | None = None, report: dict[str, Any] | None = None) -> tuple[Box, bool]:
    """A box for TASK: claimed from the warm pool when one matches, else made fresh by Host.new.
    Returns (box, from_pool). Starts the repo's filler when it has a pool. `target`: the caller
    already resolved repo, commit and config (fan-out). A claimed box was already active, so only
    a fresh one waits for room on a full host (`wait`, `on_wait`: see Host.new). `report` is filled
    with why the pool served or did not (`new --json`'s "pool")."""
    report = {} if report is None else report
    t0 = time.perf_counter()
    slugify(task)
    if target is not None:
        t, repo_root = target, Path(target.repo)
    else:
        repo_root = git.resolve_repo(repo)
        sha = git.resolve_commit(repo_root, ref or "HEAD")
        t = resolve_target(repo_root, sha, explicit_ref=ref is not None, config=config, home=host.home)
    pooled = t.why_not is None and desired_size(host, t.repo, t.config) > 0
    box = None
    # Pool boxes run without secrets and with their services up: only such a `new` can take one.
    if use_pool and t.why_not is None and not secrets and start_services:
        box = claim(host, task, t, ttl=ttl, keep=keep, report=report)
    else:
        report["why"] = ("--no-pool" if not use_pool else t.why_not or
                         ("--secret values" if secrets else "--no-services") + " (pooled boxes run without them)")
    report["claimed"] = box is not None
    if pooled and use_pool:  # `--no-pool` starts no background work either
        ensure_filler(host, repo_root)
    if box is not None:
        box.data["timings"]["total"] = round(time.perf_counter() - t0, 4)
        return box, True
    box = host.new(task, repo=repo_root, ref=ref, secrets=secrets, start_services=start_services, ttl=ttl,
                   keep=keep, progress=progress, config=t.config, wait=wait, on_wait=on_wait, commit=t.sha)
    return box, False


def claim(host: Host, task: str, t: Target, *, ttl: str | float | None = None, keep: bool = False,
          report: dict[str, Any] | None = None, before_ready: Callable[[Box], None] | None = None) -> Box | None:
    """Take a ready pooled box of `t`'s key whose commit is `t.sha` or an ancestor, and whose fingerprint
    is what a fresh box would get, and make it TASK's box; None when there is none (`report` says why)
    or taking it failed (then it was destroyed). `before_ready(box)` runs while the claimed row is
    still `creating` (a fork puts its data in: a kill there leaves a row gc removes)."""
    from worktreebox.fleet import fingerprint

    report = {} if report is None else report
    t0 = time.perf_counter()
    commits = {c for c in host.registry.pool_commits(t.repo, t.key) if c}
    usable = ([t.sha] if t.sha in commits else []) + sorted(
        c for c in commits if c != t.sha and git.git(t.repo, "merge-base", "--is-ancestor", c, t.sha,
                                                      check=False).returncode == 0)
    if not usable:
        report["why"] = "no ready pooled box of this commit and config"
        return None
    want = fingerprint.expected(host, t.repo, t.sha, t.config)
    mismatches: list[list[str]] = []

    def accept(b: Box) -> bool:
        differ = fingerprint.pool_mismatch(b, want)
        mismatches.append(differ)
        return not differ
    slug = slugify(task)
    ttl_s = parse_duration(ttl, where="ttl", positive=True) if ttl is not None else t.config.box.ttl
    claimer = procs.identity(os.getpid())
    now = time.time()

    def rename(box: Box) -> None:
        pool_id = box.id
        box.data["pool_id"] = pool_id
        box.data["creator"] = claimer  # a claim killed now leaves a `creating` row gc can tell is dead
        box.id = f"{slug}-{hex_of(pool_id)}"
        box.task, box.branch, box.dir = task, branch_name(box.id), host.boxes_dir / box.id
        box.state, box.created_at, box.last_used_at, box.ttl, box.keep = CREATING, now, now, ttl_s, keep

    box = host.registry.claim_pool_box(t.repo, t.key, usable, rename, accept)
    if box is None:
        differ = sorted({p for m in mismatches for p in m}, key=fingerprint.PARTS.index)
        report["why"] = (f"the pooled boxes' fingerprints differ from a fresh box's in: {', '.join(differ)}"
                         if differ else "no ready pooled box of this commit and config")
        report["mismatch"] = differ
        return None
    _phase("claim:row")
    box._host = host
    t1 = time.perf_counter()
    try:
        moved = _take_over(host, box, t, before_ready)
    except BaseException as e:
        try:
            host.rm(box, force=True)  # its destruction is not cancelled (Host._destroy)
        finally:
            if not isinstance(e, Exception):
                raise
        print(f"wtbox: taking {box.alias} from the pool failed ({e}); it was removed, "
              "making a fresh box instead", file=sys.stderr)
        return None
    box.data["timings"] = {"claim": round(t1 - t0, 4), "take_over": round(time.perf_counter() - t1, 4),
                           "fast_forward": moved}
    return box


def _take_over(host: Host, box: Box, t: Target, before_ready: Callable[[Box], None] | None = None) -> bool:
    """Rename what can be renamed to the claimed box's id, fast-forward it; True when its base moved."""
    pool_id = box.alias
    assert pool_id is not None  # set by the claim's rename
    old_dir = host.boxes_dir / pool_id
    if old_dir.is_dir() and not old_dir.is_symlink() and not box.dir.exists():
        gone = True
        if os.path.ismount(old_dir):  # a disk_max box's dir is a filesystem of its own (resources/disk.py)
            from worktreebox.providers.mounts.base import move_mount

            gone = move_mount(old_dir, box.dir)  # (under a shared boxes/ the old name stays mounted too)
        else:
            os.rename(old_dir, box.dir)
        # Running services, the supervisor and the metrics store hold paths under the old name.
        if gone:
            os.symlink(box.dir.name, old_dir)
    launcher = host.launcher(box)
    renamed_inside = sandbox.rename_inside(box, pool_id, launcher)  # beside the repository's refs
    _phase("claim:dir")
    _rename_branch(box.repo, box.path, branch_name(pool_id), box.branch, box.data.get("base_sha"), launcher)
    renamed_inside()
    git.repoint_worktree(box.path)
    _phase("claim:branch")
    old, new = str(old_dir), str(box.dir)
    box.env = {k: new + v[len(old):] if v == old or v.startswith(old + "/") else v for k, v in box.env.items()}
    box.env["WTBOX_ID"] = box.id
    box.env.update(boxenv.renamed_otel_box(box.env, pool_id, box.id))
    host.write_env_file(box)
    cgroup_resource.claimed(host, box)
    moved = box.data.get("base_sha") != t.sha
    if moved:
        git.git(box.path, "merge", "--ff-only", "--quiet", t.sha, launcher=launcher)  # the changed files only
        box.data["base_sha"] = t.sha
        if boxenv.SOURCE_DATE_EPOCH in box.env and boxenv.SOURCE_DATE_EPOCH not in t.config.box.env:
            box.env[boxenv.SOURCE_DATE_EPOCH] = str(git.commit_time(t.repo, t.sha))  # the time of its new base
            host.write_env_file(box)
    _phase("claim:ff")
    if before_ready is not None:
        before_ready(box)
    box.state = READY
    host.registry.save_box(box)
    if moved and t.config.pool.restart_on_update and t.config.services:
        host.services(box, "restart")
    router_resource.push(host)  # a claimed box is routed by its new names
    _phase("claim:router")
    return moved


def _rename_branch(repo: str, worktree: Path, old: str, new: str, tip: str | None,
                   launcher: procs.Launcher | None = None) -> None:
    """`git branch -m` without it: that rewrites .git/config under one lock, so concurrent claims
    failed on it. Refs only: make the new one, point the worktree at it, drop the old one. An
    untouched pool box's branch is at `tip`: then one transaction checks that and makes the new ref.
    (A sandboxed box's own branch is renamed in its git dir: sandbox.rename_inside.)"""
    sha = tip or ""
    if not tip or git.git(repo, "update-ref", "--stdin", check=False,
                          input=f"verify refs/heads/{old} {tip}\ncreate refs/heads/{new} {tip}\n").returncode:
        sha = git.git(repo, "rev-parse", "--verify", "--quiet", f"refs/heads/{old}", check=False).stdout.strip()
        if not sha:  # a retried claim: already renamed
            return
        git.git(repo, "update-ref", f"refs/heads/{new}", sha, "")
    if launcher is None or not launcher.sandboxed:
        git.git(worktree, "symbolic-ref", "HEAD", f"refs/heads/{new}")
    git.git(repo, "update-ref", "-d", f"refs/heads/{old}", sha)


# ---------------------------------------------------------------------- what the pool holds

def pool_boxes(host: Host, repo: str | None = None) -> list[Box]:
    return [b for b in host.list() if b.pool is not None and (repo is None or b.repo == repo)]


def is_stale(repo: str, box: Box, t: Target | None) -> bool:
    """A pooled box no `new` at the repo's current target could take (config changed, base not an ancestor)."""
    if t is None or t.why_not or box.pool != t.key:
        return True
    base = box.data.get("base_sha")
    return not base or (base != t.sha and git.git(repo, "merge-base", "--is-ancestor", base, t.sha,
                                                  check=False).returncode != 0)


def current_target(repo: str, home: Path | None = None) -> Target | None:
    """The repo's target at HEAD; None when the repo or its config is gone or broken."""
    try:
        return resolve_target(repo, home=home) if Path(repo).is_dir() else None
    except (WtboxError, ConfigError):
        return None


def stale_boxes(host: Host) -> list[Box]:
    """Ready pooled boxes whose commit or config no longer matches their repo (gc removes them)."""
    out = []
    by_repo: dict[str, list[Box]] = {}
    for b in pool_boxes(host):
        if b.state == READY:
            by_repo.setdefault(b.repo, []).append(b)
    for repo, boxes in by_repo.items():
        t = current_target(repo, host.home)
        out += [b for b in boxes if is_stale(repo, b, t)]
    return out


def status(host: Host, repo: str | None = None) -> list[dict[str, Any]]:
    """`wtbox pool --status`: per repo, its current commit, size, ready and filling (boxes being made)."""
    repos = sorted({b.repo for b in pool_boxes(host)} | set(host.registry.pool_size_repos())
                   | {r for r in host.registry.select_repos() if _filler_identity(host, r)})
    if repo is not None:
        repos = [repo]
    out = []
    for r in repos:
        t = current_target(r, host.home)
        boxes = pool_boxes(host, r)
        ready = [b for b in boxes if b.state == READY and not is_stale(r, b, t)]
        out.append({"repo": r, "commit": t.sha if t else None, "size": desired_size(host, r, t.config) if t else 0,
                    "ready": len(ready), "filling": sum(1 for b in boxes if b.state == CREATING),
                    "stale": sum(1 for b in boxes if b.state == READY) - len(ready),
                    "filler": _filler_identity(host, r) is not None, "unpoolable": t.why_not if t else None})
    return out


# ---------------------------------------------------------------------- the filler

def _slot(repo: str) -> str:
    return hashlib.sha256(repo.encode()).hexdigest()[:12]


def _paths(host: Host, repo: str) -> tuple[Path, Path, Path]:
    d = host.home / "pool"
    s = _slot(repo)
    return d / f"{s}.lock", d / f"{s}.pid", d / f"{s}.log"


def log_path(host: Host, repo: str) -> Path:
    """The filler's log (what it made, drained, or why it gave up)."""
    return _paths(host, repo)[2]


def _filler_identity(host: Host, repo: str) -> list[int] | None:
    try:
        ident = json.loads(_paths(host, repo)[1].read_text())
    except (FileNotFoundError, ValueError):
        return None
    return ident if procs.is_alive(ident) else None


def ensure_filler(host: Host, repo: str | Path) -> bool:
    """Start the repo's filler unless one runs (its lock makes a second one exit at once). True if started."""
    repo = str(repo)
    if _filler_identity(host, repo):
        return False
    lock, _, log = _paths(host, repo)
    lock.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    env = {**without_box_vars(), "WTBOX_HOME": str(host.home), "WTBOX_NO_AUTO_GC": "1"}
    pkg_parent = str(PACKAGE_PARENT)
    with open(log, "ab") as out:
        procs.spawn([sys.executable, "-m", "worktreebox.fleet.pool", str(host.home), repo], cwd=pkg_parent, env=env,
                    stdout=out, stderr=out, nice=FILLER_NICE)
    return True


def stop_filler(host: Host, repo: str) -> None:
    ident = _filler_identity(host, repo)
    if ident:
        procs.stop_pid(ident[0], wait=20)  # SIGTERM: it rolls back the box it is making


def drain(host: Host, repo: str) -> list[str]:
    """Stop the repo's filler and remove every pooled box of it; the removed ids."""
    stop_filler(host, repo)
    gone = []
    for b in pool_boxes(host, repo):
        host.rm(b, force=True)
        gone.append(b.id)
    return gone


def top_up(host: Host, t: Target, n: int, *, jobs: int = 2, new_host: Callable[[Path], Host] | None = None,
           timeout: float = 600.0) -> int:
    """Make pooled boxes of `t` now (in this process, `jobs` at a time) until `n` are ready; the number made."""
    if t.why_not:
        raise UsageError(f"The pool cannot serve this repo: {t.why_not}.")
    have = [b for b in pool_boxes(host, t.repo) if b.pool == t.key and b.state in (READY, CREATING)]
    missing = max(0, n - len(have))
    new_host = new_host or type(host)

    def make(_: int) -> None:
        h = new_host(host.home)
        try:
            h.new(POOL_TASK, repo=t.repo, ref=t.sha, config=t.config, pool=t.key)
        finally:
            h.registry.close()

    if missing:
        from concurrent.futures import ThreadPoolExecutor  # only a top-up runs several at once

        with ThreadPoolExecutor(max_workers=max(1, min(jobs, missing))) as ex:
            list(ex.map(make, range(missing)))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:  # boxes a filler is making count: wait for them
        ready = [b for b in pool_boxes(host, t.repo) if b.pool == t.key and b.state == READY]
        if len(ready) >= n or not [b for b in pool_boxes(host, t.repo) if b.state == CREATING]:
            break
        time.sleep(0.2)
    return missing


def fill(host: Host, repo: str, *, idle_exit: float = IDLE_EXIT, poll: float = 0.5) -> int:
    """The filler's loop: keep the pool of `repo` at its size, one box at a time; exit code."""
    lock, pid_file, _ = _paths(host, repo)
    try:
        with file_lock(lock, timeout=0, what="the pool filler"):
            atomic_write(pid_file, json.dumps(procs.identity(os.getpid())), mode=0o600)
            try:
                return _fill_locked(host, repo, idle_exit, poll)
            finally:
                pid_file.unlink(missing_ok=True)
    except LockBusy:
        return 0  # another filler serves this repo


def _fill_locked(host: Host, repo: str, idle_exit: float, poll: float) -> int:
    last_change = time.monotonic()
    failures = 0
    seen: tuple | None = None
    while not _stopping.is_set():
        t = current_target(repo, host.home)
        size = desired_size(host, repo, t.config) if t else 0
        boxes = pool_boxes(host, repo)
        for b in boxes:
            if b.state == READY and is_stale(repo, b, t):
                _log(f"draining stale {b.id}")
                host.rm(b, force=True)
        if t is None or t.why_not or size <= 0:
            _log("no pool wanted here (size 0, no repo, or a config that cannot be pooled); exiting")
            return 0
        mine = [b for b in pool_boxes(host, repo) if b.pool == t.key]
        now_seen = (t.key, t.sha, tuple(sorted(b.id for b in mine)))
        if now_seen != seen:
            seen, last_change = now_seen, time.monotonic()
        making = [b for b in mine if b.state == CREATING]
        room = host.config.max_boxes - len(host.registry.select_box_ids())
        # A full host ([host] max_active / max_load) is no failure: the filler waits like a `new` would.
        if len(mine) < size and room > 0 and not making and admission.why_full(host) is None:
            try:
                b = host.new(POOL_TASK, repo=repo, ref=t.sha, config=t.config, pool=t.key, wait=False)
                _log(f"made {b.id} at {t.sha[:12]}")
                failures = 0
            except admission.HostFull:
                time.sleep(poll)  # another `new` took the last slot meanwhile
            except WtboxError as e:
                if _stopping.is_set():
                    break
                failures += 1
                _log(f"making a pooled box failed ({failures}): {e}")
                if failures >= 3:
                    return 1
                time.sleep(2 ** failures)
            continue
        if time.monotonic() - last_change > idle_exit:
            _log(f"full and unclaimed for {idle_exit:.0f}s; exiting")
            return 0
        time.sleep(poll)
    return 0


_stopping = threading.Event()  # set by SIGTERM: the filler stops after the box it is making


def _on_term(signum: int, frame: Any) -> None:
    _stopping.set()
    raise KeyboardInterrupt  # Host.new rolls back the box being made


def _log(msg: str) -> None:
    print(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} wtbox pool: {msg}", flush=True)


def main(argv: list[str]) -> int:
    """`python -m worktreebox.fleet.pool HOME REPO`: the detached filler."""
    signal.signal(signal.SIGTERM, _on_term)
    home, repo = argv
    idle = settings.POOL_IDLE.seconds()
    try:
        return fill(Host(home), repo, idle_exit=idle)
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
