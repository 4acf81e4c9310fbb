"""Host: new / rm / get / list, composition of resources and rollback.

The CLI is a thin layer over this class; tests and scripts use it directly:

    with Host(home).new("fix-login", repo=path) as box:
        ...  # the box is removed on exit
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any, Callable

from typing import TYPE_CHECKING

from . import git
from .box import CREATING, FAILED, READY, REMOVING, Box, branch_name, new_id, slugify
from .errors import ConfigError, NotFound, UnsavedWork, UsageError, WtboxError
from .registry import Registry
from .resources.base import Creation, Resource

if TYPE_CHECKING:
    from .config import HostConfig, RepoConfig


def default_home() -> Path:
    if os.environ.get("WTBOX_HOME"):
        return Path(os.environ["WTBOX_HOME"]).expanduser()
    state = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(state) / "wtbox"


# Resources created concurrently in `new` (they don't depend on each other).
PARALLEL = ("worktree", "caches", "database", "metrics")


class Host:
    def __init__(self, home: str | Path | None = None) -> None:
        self.home = Path(home).expanduser().absolute() if home else default_home().absolute()
        self.boxes_dir = self.home / "boxes"
        self.registry = Registry(self.home / "registry.sqlite3")
        self._config: HostConfig | None = None
        self._resources: list[Resource] | None = None

    def __repr__(self) -> str:
        return f"Host({str(self.home)!r})"

    @property
    def config(self) -> "HostConfig":
        if self._config is None:
            from .config import load_host_config

            self._config = load_host_config(self.home)
        return self._config

    @property
    def resources(self) -> list[Resource]:
        """All resources in creation order (imported lazily: most commands need none)."""
        if self._resources is None:
            from .resources.caches import Caches
            from .resources.database import Database
            from .resources.metrics import Metrics
            from .resources.ports import Ports
            from .resources.services import Services
            from .resources.worktree import Worktree

            self._resources = [Ports(), Worktree(), Caches(), Database(), Metrics(), Services()]
        return self._resources

    def resource(self, name: str) -> Resource:
        return next(r for r in self.resources if r.name == name)

    # ------------------------------------------------------------------ lookup
    def list(self) -> list[Box]:
        return self.registry.select_all_boxes()

    def get(self, ref: str | None = None) -> Box:
        """Resolve BOX: id, unique id prefix, task name, or (None) the box containing the cwd."""
        if ref is None or ref == "":
            box = self.box_of_path(Path.cwd())
            if box is None:
                raise UsageError("No BOX given and the current directory is not inside a box; name one (see 'wtbox ls').")
            return box
        box = self.registry.select_box(ref)
        if box:
            return box
        boxes = self.list()
        for matches in ([b for b in boxes if b.id.startswith(ref)], [b for b in boxes if b.task == ref]):
            if len(matches) == 1:
                return matches[0]
            if len(matches) > 1:
                ids = ", ".join(b.id for b in matches[:5])
                raise UsageError(f"{ref!r} matches {len(matches)} boxes ({ids}); give more of the id.")
        raise NotFound(f"No box matches {ref!r}; 'wtbox ls' lists the boxes.")

    def box_of_path(self, path: Path) -> Box | None:
        try:
            rel = path.resolve().relative_to(self.boxes_dir.resolve())
        except ValueError:
            return None
        return self.registry.select_box(rel.parts[0]) if rel.parts else None

    def repo_config(self, box: Box) -> "RepoConfig":
        """The wtbox.toml of a box: its worktree's file if present, else the defaults."""
        return load_repo_config_file(box.path, source_label=str(box.path / "wtbox.toml"))

    # ------------------------------------------------------------------ host ports
    def lease_host_port(self, owner: str) -> int:
        """A port for a host-level service (e.g. '@postgres'); stable while leased."""
        from .resources import ports

        existing = self.registry.ports_of(owner)
        if existing:
            return next(iter(existing.values()))
        return ports.lease(self, owner, [owner.lstrip("@")])[owner.lstrip("@")]

    def release_host_port(self, owner: str) -> None:
        self.registry.delete_leases(owner)

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
        config: "RepoConfig | None" = None,
    ) -> Box:
        """Create a box; on any failure everything made so far is destroyed and WtboxError raised."""
        from .config import parse_duration

        slugify(task)  # validates before anything is touched
        repo_root = git.resolve_repo(repo)
        base_sha = git.resolve_commit(repo_root, ref or "HEAD")
        cfg = config or load_config_for_new(repo_root, base_sha, explicit_ref=ref is not None)
        ttl_s = parse_duration(ttl, where="--ttl") if ttl is not None else cfg.box.ttl
        live = len(self.registry.select_box_ids())
        if live >= self.config.max_boxes:
            raise WtboxError(f"This host already has {live} boxes, the [host] max_boxes limit; remove some first.")

        box_id = new_id(task)
        box = Box(id=box_id, task=task, repo=str(repo_root), branch=branch_name(box_id),
                  dir=self.boxes_dir / box_id, state=CREATING, ttl=ttl_s, keep=keep)
        box.data["base_sha"] = base_sha
        box.data["creator"] = process_identity(os.getpid())
        box._host = self
        self.boxes_dir.mkdir(parents=True, exist_ok=True)
        self.registry.remember_repo(str(repo_root))
        self.registry.insert_box(box)
        _phase("new:row")
        box.dir.mkdir(mode=0o700)

        c = Creation(host=self, box=box, config=cfg, base_sha=base_sha, secrets=dict(secrets or {}),
                     start_services=start_services, progress=progress or (lambda m: None))
        c.facts["box"] = {"id": box.id, "task": task, "branch": box.branch, "path": str(box.path),
                          "dir": str(box.dir), "home": str(self.home)}
        c.facts.setdefault("db", {})
        c.facts.setdefault("metrics", {})
        c.env["WTBOX_ID"] = box.id
        c.env["WTBOX_BOX_DIR"] = str(box.dir)
        try:
            self._create(c)
        except BaseException as e:
            self._rollback(box)
            if isinstance(e, WtboxError):
                raise
            if isinstance(e, KeyboardInterrupt):
                raise WtboxError("Interrupted; the half-made box was removed.") from None
            raise WtboxError(f"Creating the box failed ({type(e).__name__}: {e}); nothing was left behind.") from e
        return box

    def _create(self, c: Creation) -> None:
        box = c.box
        by_name = {r.name: r for r in self.resources}
        by_name["ports"].create(c)
        _phase("new:ports")
        c.note("ports leased")
        parallel = [by_name[n] for n in PARALLEL if n in by_name]
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=len(parallel)) as pool:
            futures = [(r, pool.submit(r.create, c)) for r in parallel]
            errors = []
            for r, f in futures:
                try:
                    f.result()
                except BaseException as e:  # report the first, but let all finish
                    errors.append(e)
            if errors:
                raise errors[0]
        _phase("new:created")
        by_name["worktree"].copy_files(c)  # type: ignore[attr-defined]
        box.env = finalize_env(c)
        box.data["env_keys"] = sorted(box.env)
        self.write_env_file(box)
        self.registry.save_box(box)
        for r in self.resources:
            _phase(f"new:start:{r.name}")
            r.start(c)
        box.state = READY
        self.registry.save_box(box)
        _phase("new:ready")

    def _rollback(self, box: Box) -> None:
        try:
            self.registry.set_state(box.id, FAILED)
        except Exception:
            pass
        self._destroy_resources(box, strict=False)
        self.registry.delete_box(box.id)

    def _destroy_resources(self, box: Box, *, strict: bool) -> None:
        errors = []
        for r in reversed(self.resources):
            _phase(f"destroy:{r.name}")
            try:
                r.destroy(self, box)
            except Exception as e:
                errors.append(f"{r.name}: {e}")
        shutil.rmtree(box.dir, ignore_errors=True)
        if box.dir.exists():
            errors.append(f"could not delete {box.dir}")
        if errors and strict:
            raise WtboxError(f"Removing {box.id} was incomplete ({'; '.join(errors)}); run 'wtbox rm {box.id}' again.")

    # ------------------------------------------------------------------ env
    def write_env_file(self, box: Box) -> None:
        """boxes/<id>/env: KEY=VALUE lines, mode 0600, written atomically."""
        from .envfile import format_env

        tmp = box.env_file.with_name(".env.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(format_env(box.env, "dotenv"))
        os.replace(tmp, box.env_file)

    def exec_env(self, box: Box, secrets: dict[str, str] | None = None) -> dict[str, str]:
        """The environment a process in the box gets: the caller's (minus another box's ids), the box
        env, and secrets — the same as the box's services get."""
        from .resources.services import base_env

        return base_env(box, secrets)

    # ------------------------------------------------------------------ rm
    def unsaved_work(self, box: Box) -> str | None:
        return git.unsaved_work(box.path, box.branch, box.data.get("base_sha"))

    def rm(self, ref: str | Box, *, force: bool = False, keep_branch: bool = False) -> Box:
        """Destroy a box completely; refuses with unsaved work unless force. Restartable after a crash."""
        box = ref if isinstance(ref, Box) else self.get(ref)
        if not force:
            why = self.unsaved_work(box)
            if why:
                raise UnsavedWork(
                    f"{box.id} has {why}; commit and push them, or run 'wtbox rm --force {box.id}' to discard them.")
        if keep_branch:
            box.data["keep_branch"] = True
        box.data["remover"] = process_identity(os.getpid())
        box.state = REMOVING
        self.registry.save_box(box)
        _phase("rm:removing")
        self._destroy_resources(box, strict=True)
        self.registry.delete_box(box.id)
        _phase("rm:done")
        return box

    def destroy_orphan(self, box_id: str) -> None:
        """Destroy every piece of a box that has no (or a stale) registry row."""
        box = self.registry.select_box(box_id) or Box(
            id=box_id, task="?", repo="", branch=branch_name(box_id), dir=self.boxes_dir / box_id, state=REMOVING)
        self._destroy_resources(box, strict=True)
        self.registry.delete_box(box_id)


# ---------------------------------------------------------------------- config

def load_repo_config_file(root: Path, source_label: str | None = None) -> "RepoConfig":
    from .config import parse_repo_config

    toml = root / "wtbox.toml"
    procfile = root / "Procfile"
    text = _read(toml)
    return parse_repo_config(text, source_label or str(toml), procfile=_read(procfile))


def load_config_for_new(repo: Path, sha: str, *, explicit_ref: bool) -> "RepoConfig":
    """Without --from, the wtbox.toml in the main checkout as the user sees it (so edits apply
    before they are committed); with --from, the file at that ref."""
    from .config import parse_repo_config

    if not explicit_ref:
        return load_repo_config_file(repo)
    text = git.show_file(repo, sha, "wtbox.toml")
    return parse_repo_config(text, f"wtbox.toml at {sha[:12]}", procfile=git.show_file(repo, sha, "Procfile"))


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path} cannot be read: {e}.") from None


def render(template: str, facts: dict[str, Any], where: str) -> str:
    """Render one Jinja2 string over box facts; a missing fact is a config error naming `where`."""
    if "{{" not in template and "{%" not in template:
        return template
    import jinja2

    env = jinja2.Environment(undefined=jinja2.StrictUndefined, autoescape=False, keep_trailing_newline=True)
    try:
        return env.from_string(template).render(**facts)
    except jinja2.UndefinedError as e:
        raise ConfigError(f"{where}: {e.message} (available: {', '.join(sorted(facts))}).") from None
    except jinja2.TemplateError as e:
        raise ConfigError(f"{where}: bad template {template!r}: {e}.") from None


def finalize_env(c: Creation) -> dict[str, str]:
    """Resource variables, then [database] env, then [box] env (the repo's own words win)."""
    env = dict(c.env)
    for section, mapping in (("database", c.config.database.env), ("box", c.config.box.env)):
        for k, v in mapping.items():
            env[k] = render(v, c.facts, f"{c.config.source}: [{section}] env.{k}")
    for k in c.secrets:
        env.pop(k, None)  # secrets never reach the env file
    return env


def _phase(name: str) -> None:
    """Crash-test hook: with WTBOX_PHASE_FILE set, append each phase name as it starts."""
    path = os.environ.get("WTBOX_PHASE_FILE")
    if path:
        with open(path, "a") as f:
            f.write(name + "\n")


def process_identity(pid: int) -> list[int] | None:
    """(pid, start time in clock ticks): survives pid reuse, unlike a bare pid."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return [pid, int(stat.rsplit(")", 1)[1].split()[19])]
    except (OSError, IndexError, ValueError):
        return None


def process_alive(identity: list[int] | None) -> bool:
    if not identity:
        return False
    current = process_identity(identity[0])
    return current is not None and current[1] == identity[1]
