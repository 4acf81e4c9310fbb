"""Host: new / rm / get / list / describe / services / env, composition of resources and rollback.

What the front ends do with one box (status, run, logs, traces, probe, browse) is in
operations/; they and the fleet call this class; tests and scripts use it directly:

    with Host(home).new("fix-login", repo=path) as box:
        ...  # the box is removed on exit
"""
from __future__ import annotations

import builtins  # `list` in the class body below names Host.list
import os
import shutil
import time
from collections.abc import Callable
from operator import methodcaller
from pathlib import Path
from typing import TYPE_CHECKING, Any

from worktreebox import admission, diagnostics, providers, settings
from worktreebox.box import CREATING, DEGRADED, FAILED, READY, REMOVING, RESTORING, Box, branch_name, new_id, slugify
from worktreebox.config import recorded
from worktreebox.config.load import (
    load_config_for_new,
    load_host_config,
    load_repo_config_file,
    parse_duration,
)
from worktreebox.config.templating import render
from worktreebox.errors import ConfigError, Interrupted, NotFound, UnsavedWork, UsageError, WtboxError
from worktreebox.providers import sandbox
from worktreebox.providers.postgres import server as postgres_server
from worktreebox.registry import Registry
from worktreebox.resources import load_all, run_stage, sandbox_spares, stages
from worktreebox.resources.base import Creation, Origin, Resource
from worktreebox.services import boxenv
from worktreebox.services.boxenv import process_env
from worktreebox.services.envfile import format_env
from worktreebox.system import cancel, git, procs
from worktreebox.system.fsutil import atomic_write
from worktreebox.version import __version__

if TYPE_CHECKING:
    from worktreebox.config.load import HostConfig, RepoConfig
    from worktreebox.providers.postgres.base import Server

log = diagnostics.logger("host")


def default_home() -> Path:
    return Path(settings.default_home())


class Host:
    def __init__(self, home: str | Path | None = None) -> None:
        self.home = Path(home).expanduser().absolute() if home else default_home().absolute()
        if self.home.exists() and not self.home.is_dir():  # one stat; everything below assumes a directory
            raise ConfigError(f"WTBOX_HOME {self.home} is a file, not a directory; point WTBOX_HOME at a "
                              "directory (wtbox makes it when it is missing).")
        self.boxes_dir = self.home / "boxes"
        self.registry = Registry(self.home / "registry.sqlite3")
        self._config: HostConfig | None = None
        self._resources: list[Resource] | None = None

    def __repr__(self) -> str:
        return f"Host({str(self.home)!r})"

    @property
    def config(self) -> HostConfig:
        if self._config is None:
            self._config = load_host_config(self.home)
        return self._config

    @property
    def resources(self) -> list[Resource]:
        """All resources in creation order (resources/__init__.py; imported on first use)."""
        if self._resources is None:
            self._resources = load_all()
        return self._resources

    def resource(self, name: str) -> Resource:
        return next(r for r in self.resources if r.name == name)

    # ------------------------------------------------------------------ lookup
    def list(self) -> list[Box]:
        return self.registry.select_all_boxes()

    def get(self, ref: str | None = None) -> Box:
        """Resolve BOX: id, task name, unique id prefix, or (None) the box containing the cwd."""
        box = self._resolve(ref)
        # A reboot takes a box's copy-on-write mounts away (its upper layers stay): mount them again.
        if box.data.get("revive") and box.state not in (CREATING, REMOVING, RESTORING) \
                and not os.path.ismount(box.path) and box.env_file.exists():  # its dir is whole
            for r in self.resources:
                r.revive(self, box)
        return box

    def _resolve(self, ref: str | None) -> Box:
        if ref is None or ref == "":
            box = self.box_of_path(Path.cwd())
            if box is None:
                raise UsageError("No BOX given and the current directory is not inside a box; "
                                 "name one (see 'wtbox ls').")
            return self.notice(box)
        box = self.registry.select_box(ref)
        if box:
            return self.notice(box)
        boxes = self.list()
        # An exact task name first: `s7` is the box named s7 even while `s70-1a2b3c4d` exists.
        for matches in ([b for b in boxes if b.task == ref], [b for b in boxes if b.id.startswith(ref)]):
            if len(matches) == 1:
                return self.notice(matches[0])
            if len(matches) > 1:
                ids = ", ".join(b.id for b in matches[:5])
                raise UsageError(f"{ref!r} matches {len(matches)} boxes ({ids}); give more of the id.")
        raise NotFound(f"No box matches {ref!r}; 'wtbox ls' lists the boxes.")

    def notice(self, box: Box) -> Box:
        """A box that says ready but is not whole (its supervisor died) is marked degraded with the
        reason each resource gives; one that is whole again is ready. Every command that resolves
        a box goes through here, and gc."""
        if box.state not in (READY, DEGRADED):
            return box
        reason = next((why for why in (r.health(self, box) for r in self.resources) if why), None)
        if reason and (box.state != DEGRADED or box.data.get("degraded") != reason):
            box.state, box.data["degraded"] = DEGRADED, reason
            self.registry.save_box(box)
        elif not reason and box.state == DEGRADED:
            box.state = READY
            box.data.pop("degraded", None)
            self.registry.save_box(box)
        return box

    def describe(self, box: Box, *, show_secrets: bool = False) -> dict[str, Any]:
        """The JSON contract of `new` and `status`: the box plus what each resource reports."""
        out = box.to_json(show_secrets=show_secrets)
        for r in self.resources:
            extra = r.status(self, box)
            if extra:
                out.update(extra)
        if box.data.get("timings"):
            out["timings"] = box.data["timings"]
        rec = box.data.get(recorded.DATA_KEY)
        if rec:  # which config the box runs with (the text itself: boxes/<id>/... nowhere; the row)
            out["config"] = {"source": rec["source"], "sha256": rec["sha256"]}
        return out

    def disk_bytes(self, box: Box) -> int:
        """Disk the box uses of its own: its dir without the shared trees and layers mounted into it."""
        from worktreebox.system.fsutil import own_bytes

        return own_bytes(box.dir)

    def worktree_bytes(self, box: Box) -> int:
        """What the box's worktree costs it: the upper layers of its copy-on-write views (its changes),
        or the whole checkout when it is a plain one."""
        from worktreebox.system.fsutil import own_bytes

        uppers = [box.dir / "upper", *sorted((box.dir / "deps").glob("*/upper"))]
        if uppers[0].is_dir():
            return sum(own_bytes(p) for p in uppers)
        return own_bytes(box.path)

    def list_json(self, box: Box, boxes: builtins.list[Box]) -> dict[str, Any]:
        """One element of `ls --json`: the box's JSON (Box.to_json) and its `url` through the router."""
        return {**box.to_json(), "url": self.first_url(box, boxes)}

    def first_url(self, box: Box, boxes: builtins.list[Box] | None = None) -> str | None:
        """The box's URL through the host router (its first port), None when it has none. Reads only."""
        from worktreebox.router.control import urls

        return next(iter(urls(self, box, boxes).values()), None)

    def url(self, box: Box, service: str | None = None, *, show_token: bool = False) -> dict[str, Any]:
        """`url --json`: the URL of the box (its first service) or of one service through the host
        router, brought in step with the registry first so the URL answers (router/control.py)."""
        from worktreebox.router import control

        return control.url(self, box, service, show_token=show_token)

    def box_of_path(self, path: Path) -> Box | None:
        try:
            rel = path.resolve().relative_to(self.boxes_dir.resolve())
        except ValueError:
            return None
        return self.registry.select_box(rel.parts[0]) if rel.parts else None

    def repo_config(self, box: Box) -> RepoConfig:
        """The config the box was made with (or last `up --reload`ed): its record, not today's files.
        A box made before configs were recorded: its worktree's file, else the defaults."""
        return recorded.config_of(box.data) or load_repo_config_file(box.path,
                                                                    source_label=str(box.path / "wtbox.toml"))

    # ------------------------------------------------------------------ host ports
    def lease_host_port(self, owner: str) -> int:
        """A port for a host-level service (e.g. '@postgres'); stable while leased."""
        from worktreebox.resources import ports  # the lease rules live with the ports resource

        existing = self.registry.ports_of(owner)
        if existing:
            return next(iter(existing.values()))
        return ports.lease(self, owner, [owner.lstrip("@")])[owner.lstrip("@")]

    def release_host_port(self, owner: str) -> None:
        from worktreebox.resources import ports

        ports.release(self, owner)

    # ------------------------------------------------------------------ new
    def new(
        self,
        task: str,
        repo: str | Path | None = None,
        ref: str | None = None,
        *,
        secrets: dict[str, str] | None = None,
        start_services: bool = True,
        ttl: str | float | None = None,
        keep: bool = False,
        progress: Callable[[str], None] | None = None,
        config: RepoConfig | None = None,
        pool: str | None = None,
        wait: bool = True,
        on_wait: Callable[[str], None] | None = None,
        origin: Origin | None = None,
        commit: str | None = None,
    ) -> Box:
        """Create a box; on any failure everything made so far is destroyed and WtboxError raised.

        `pool`: make it ahead for the warm pool under this pool key (pool.py claims it later).
        When the host is full ([host] max_active / max_load) it waits for room, telling `on_wait`
        (default: stderr), or with wait=False raises admission.HostFull. `origin`: a fork, whose own
        changes (files, branch tip, database) start as a snapshot's (fleet/fork.py). `commit`: the
        commit `ref` names, resolved by the caller with the repository (`repo` is then its root):
        three git processes fewer (fleet/pool.new_box resolves both for the warm pool)."""
        slugify(task)  # validates before anything is touched
        if commit is not None:
            repo_root, base_sha = Path(repo or "."), commit
        else:
            repo_root = git.resolve_repo(repo)
            base_sha = git.resolve_commit(repo_root, ref or "HEAD")
        cfg = config or load_config_for_new(repo_root, base_sha, explicit_ref=ref is not None)
        ttl_s = parse_duration(ttl, where="ttl", positive=True) if ttl is not None else cfg.box.ttl
        for r in self.resources:
            r.warm(self, None, cfg, pooled=pool is not None)

        box_id = new_id(task)
        box = Box(id=box_id, task=task, repo=str(repo_root), branch=branch_name(box_id),
                  dir=self.boxes_dir / box_id, state=CREATING, ttl=ttl_s, keep=keep, pool=pool)
        box.data["base_sha"] = base_sha
        box.data[recorded.DATA_KEY] = recorded.record(cfg)  # what up, restart, the pool and gc use for it
        box.data["creator"] = procs.identity(os.getpid())
        box.data[boxenv.DATA_KEY] = boxenv.capture(cfg.box)  # what up/restart/exec from any shell give it
        from worktreebox.layers.deps import runtime_toolchain  # ~2 ms: only `new` needs it

        box.data["toolchain"] = runtime_toolchain(box.data[boxenv.DATA_KEY].get("PATH"), self.home)
        box.data["wtbox_version"] = __version__
        secrets = {**boxenv.inherited_secrets(cfg.box), **(secrets or {})}  # a proxy's password too
        box.data["secret_names"] = sorted(secrets)  # names only: to say what `up` needs again
        box._host = self
        self.boxes_dir.mkdir(parents=True, exist_ok=True)
        self.registry.remember_repo(str(repo_root))
        with admission.admitted(self, wait=wait, on_wait=on_wait):
            live = len(self.registry.select_box_ids())
            if live >= self.config.max_boxes:
                raise WtboxError(f"This host already has {live} boxes, the [host] max_boxes limit; remove some first.")
            with sandbox_spares.taken(self, box, cfg):  # a holder made ahead: the box takes its hex
                self.registry.insert_box(box)
        _phase("new:row")
        sandbox_spares.move_in(self, box)  # its dir: the spare's, or a new one

        c = Creation(host=self, box=box, config=cfg, base_sha=base_sha, secrets=dict(secrets or {}),
                     start_services=start_services, progress=progress or (lambda m: None), origin=origin,
                     use_spare=sandbox_spares.with_spare)
        c.facts.update(box.facts())
        c.env["WTBOX_ID"] = box.id
        c.env["WTBOX_BOX_DIR"] = str(box.dir)
        try:
            self._create(c)
        except BaseException as e:
            interrupted = isinstance(e, KeyboardInterrupt) or cancel.cancelled()  # Ctrl-C, or a cancelled MCP call
            cause = next(filter(None, (r.failure_cause(self, box) for r in self.resources)), None)
            self._rollback(box)
            if interrupted:
                raise Interrupted("Interrupted; the half-made box was removed.") from None
            if isinstance(e, WtboxError) and not cause:
                raise
            detail = f": {cause} ({type(e).__name__}: {e})" if cause else f" ({type(e).__name__}: {e})"
            raise WtboxError(f"Creating the box failed{detail}; nothing was left behind.") from e
        return box

    def _create(self, c: Creation) -> None:
        """Walk the resource order: create (stages of parallel resources at once), finish, env, start."""
        box = c.box
        epoch = git.commit_time_later(box.repo, c.base_sha)  # for finalize_env; its git runs beside the stages
        for stage in stages(self.resources):
            _phase("new:create:" + "+".join(r.name for r in stage))
            run_stage(stage, lambda r: _timed(c, r.phase, r.create))
        _phase("new:created")
        for r in self.resources:
            r.finish(c)
        box.env = finalize_env(c, epoch())
        box.data["env_keys"] = sorted(box.env)
        self.write_env_file(box)
        self.registry.save_box(box)
        # the next sandboxed `new` of this recipe gets a spare: asked for while this box's starts wait
        with sandbox_spares.replenishing(self, box, c.config):
            for r in self.resources:
                _phase(f"new:start:{r.name}")
                _timed(c, r.start_phase, r.start)
            for r in self.resources:
                _timed(c, r.phase, r.settle)
        box.state = READY
        box.data["timings"] = c.timings
        self.registry.save_box(box)
        _phase("new:ready")

    def _rollback(self, box: Box) -> None:
        try:
            self.registry.set_state(box.id, FAILED)
        except Exception:
            pass
        self._destroy(box, strict=False)

    def _destroy(self, box: Box, *, strict: bool) -> None:
        """Every piece of the box, then its row; then boxes/ stops being a shared mount if no box is left
        (after the row: two boxes removed at once each saw the other's row, and the mount stayed)."""
        with cancel.unwatched():  # never cancelled once begun: a roll-back's event stays set (system/cancel.py)
            # A box claimed from the pool runs processes started under its pool id (Box.alias): those first.
            # (A spare's name holds something only until its dir is the box's: a `new` killed before.)
            alias = box.under_alias()
            if alias is not None and (box.data.get("pool_id") or alias.dir.exists()):
                self._destroy_pieces(alias, strict=strict)
            self._destroy_pieces(box, strict=strict)
        self.registry.delete_box(box.id)
        sandbox.release_boxes_dir(self.home, lambda: not self.registry.select_box_ids())

    def _destroy_pieces(self, box: Box, *, strict: bool) -> None:
        """Every resource's destroy, in reverse creation order; the resources of a parallel stage
        (worktree, database, metrics, ...) at once, as they were made."""
        errors = []

        def destroy(r: Resource) -> None:
            _phase(f"destroy:{r.name}")
            try:
                r.destroy(self, box)
            except Exception as e:
                errors.append(f"{r.name}: {e}")

        for stage in reversed(stages(self.resources)):
            run_stage(stage[::-1], destroy)
        if box.dir.is_symlink():
            box.dir.unlink()
        shutil.rmtree(box.dir, ignore_errors=True)
        if box.dir.exists() or box.dir.is_symlink():
            errors.append(f"could not delete {box.dir}")
        if errors and strict:
            raise WtboxError(f"Removing {box.id} was incomplete ({'; '.join(errors)}); run 'wtbox rm {box.id}' again.")

    # ------------------------------------------------------------------ env
    def write_env_file(self, box: Box) -> None:
        """boxes/<id>/env: KEY=VALUE lines, mode 0600, written atomically."""
        atomic_write(box.env_file, format_env(box.env, "dotenv"), mode=0o600)

    def exec_env(self, box: Box, secrets: dict[str, str] | None = None) -> dict[str, str]:
        """The environment a process in the box gets: what it inherited when it was made, the box
        env, and secrets — the same as the box's services get."""
        return process_env(box, secrets)

    def running_secrets(self, box: Box) -> dict[str, str]:
        """The --secret values the box's running supervisor holds (memory only); {} without one, and
        without asking where none was given (`new` and `up` record the names: a sandboxed box's
        supervisor always runs, and the question was ~4-10 ms of every `exec`)."""
        if not box.data.get("secret_names"):
            return {}
        from worktreebox.services.client import box_secrets  # not loaded by commands that never ask

        return box_secrets(box)

    # ------------------------------------------------------------------ rm
    def unsaved_work(self, box: Box) -> str | None:
        """Why removing the box would lose work, or None; a box provably as made spares `git status`."""
        if box.data.get("revive") and any(r.pristine(self, box) for r in self.resources):
            return None
        return sandbox.unsaved_work(box, self.launcher(box)) if box.path.is_dir() else None

    def launcher(self, box: Box) -> procs.Launcher:  # its sandbox's; a holder a reboot took is made again
        return sandbox.launcher_for(box, revive=lambda: [*map(methodcaller("revive", self, box), self.resources)])

    def rm(self, ref: str | Box, *, force: bool = False, keep_branch: bool = False) -> Box:
        """Destroy a box completely; refuses with unsaved work unless force. Restartable after a crash."""
        box = ref if isinstance(ref, Box) else self.get(ref)
        creator = box.data.get("creator")
        if box.state == CREATING and creator and procs.is_alive(creator) and creator[0] != os.getpid():
            # Its command rolls back whatever it made on Ctrl-C; removing underneath it leaves both confused.
            raise WtboxError(f"{box.id} is still being made (by process {creator[0]}); wait for it, or interrupt "
                             "that command (Ctrl-C), which removes the half-made box.")
        for r in self.resources:
            r.warm(self, box.data, None)
        if not force and box.state != REMOVING:  # a removal cut short: it was decided already
            why = self.unsaved_work(box)
            if why:
                raise UnsavedWork(
                    f"{box.id} has {why}; commit and push them, or run 'wtbox rm --force {box.id}' to discard them.")
        if keep_branch:
            sandbox.bring_back(box, self.launcher(box))  # a sandboxed box's commits live in its own git dir
            box.data["keep_branch"] = True
        box.data["remover"] = procs.identity(os.getpid())
        box.state = REMOVING
        self.registry.save_box(box)
        _phase("rm:removing")
        self._destroy(box, strict=True)
        _phase("rm:done")
        return box

    # ------------------------------------------------------------------ services
    def services(self, box: Box, action: str, service: str | None = None,
                 secrets: dict[str, str] | None = None, *, reload: bool = False) -> dict[str, Any]:
        """up / down / restart the box's services (or one); the services' state afterwards.
        `secrets` reach a supervisor started anew (after `down`, or after one died). `reload` (up):
        first apply and record the box's own edited wtbox.toml."""
        from worktreebox.resources import services as svc  # the resource owns the supervisor's lifecycle

        if reload:
            if action != "up":
                raise UsageError("Only 'up' reloads the box's wtbox.toml.")
            secrets = svc.reload_config(self, box, secrets)
            if not self.repo_config(box).services:
                return {}  # the reloaded config has none: they were stopped
        if action == "down":
            return svc.services_down(self, box, service)
        fn = {"up": svc.services_up, "restart": svc.services_restart}.get(action)
        if fn is None:
            raise UsageError(f"Unknown services action {action!r}; expected up, down or restart.")
        return fn(self, box, service, secrets)

    # ------------------------------------------------------------------ backends (providers)
    # What commands and the MCP server ask of the providers, so neither imports a backend.
    def database_server(self, provider: str | None = None) -> Server:
        """The PostgreSQL server boxes use (`provider` as a box recorded it; default: the host's)."""
        return postgres_server(self, provider)

    def backend_checks(self) -> builtins.list[dict[str, Any]]:
        """`wtbox doctor`'s lines for what the providers need installed (PostgreSQL, VictoriaMetrics)."""
        return providers.checks()

    def docker_report(self) -> dict[str, Any]:
        """`wtbox doctor`'s docker check: is Docker usable, which docker providers would work."""
        from worktreebox.providers import docker_doctor

        return docker_doctor.doctor_report(self.home, self.config)

    def destroy_orphan(self, box_id: str) -> None:
        """Destroy every piece of a box that has no (or a stale) registry row."""
        box = self.registry.select_box(box_id) or Box(
            id=box_id, task="?", repo="", branch=branch_name(box_id), dir=self.boxes_dir / box_id, state=REMOVING)
        self._destroy(box, strict=True)


# ---------------------------------------------------------------------- helpers

def _timed(c: Creation, phase: str | None, step: Callable[[Creation], None]) -> None:
    """Run one resource step, adding its seconds to `c.timings[phase]` (new --json's timings)."""
    cancel.check()  # between steps, as Ctrl-C would land (system/cancel.py)
    t0 = time.monotonic()
    try:
        step(c)
    finally:
        if phase:
            c.timings[phase] = round(c.timings.get(phase, 0.0) + time.monotonic() - t0, 4)


def finalize_env(c: Creation, commit_time: int | None) -> dict[str, str]:
    """The deterministic runtime defaults (`commit_time`: the base commit's, SOURCE_DATE_EPOCH), resource
    variables, then [database] env, then [box] env (the repo's own words win)."""
    env = {**boxenv.deterministic(c.config.box, commit_time), **c.env}
    for section, mapping in (("database", c.config.database.env), ("box", c.config.box.env)):
        for k, v in mapping.items():
            env[k] = render(v, c.facts, f"{c.config.source}: [{section}] env.{k}")
    for k in c.secrets:
        env.pop(k, None)  # secrets never reach the env file
    return env


def _phase(name: str) -> None:
    """Each phase of making a box as it starts: a debug line, and the crash-test hooks (with
    WTBOX_PHASE_FILE set, append the name to it; with WTBOX_PHASE_STOP set, halt at the first
    phase whose name starts with it, for a kill -9 there)."""
    log.debug("phase %s", name)
    path = settings.PHASE_FILE.value()
    if path:
        with open(path, "a") as f:
            f.write(name + "\n")
    stop = settings.PHASE_STOP.value()
    if stop and name.startswith(stop):
        time.sleep(3600)
