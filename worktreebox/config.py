"""Loading and validating wtbox.toml (per repo) and config.toml (per host).

A config error names the file, the key and what was expected, and exits 2.
"""
from __future__ import annotations

import dataclasses
import os
import re
import tomllib
from pathlib import Path
from typing import Any

from .errors import ConfigError

DEFAULT_MIGRATION_GLOBS = ["alembic/**", "migrations/**", "**/migrations/*.py"]
_PORT_NAME = re.compile(r"^[a-z][a-z0-9_]{0,30}$")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*$")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_duration(text: str | int | float, *, where: str = "duration") -> float:
    """'90s', '10m', '72h', '2d' or a number of seconds → seconds."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        return float(text)
    m = _DURATION.match(str(text))
    if not m:
        raise ConfigError(f"{where}: expected a duration such as '30s', '10m' or '72h', got {text!r}.")
    return float(m.group(1)) * _UNITS[m.group(2)]


@dataclasses.dataclass
class BoxConfig:
    ports: list[str] = dataclasses.field(default_factory=lambda: ["web"])
    ttl: float = 72 * 3600.0
    copy: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    env: dict[str, str] = dataclasses.field(default_factory=dict)
    # Extra variables pointed into the box's cache dir, e.g. {"npm_config_cache": "npm"}.
    cache_env: dict[str, str] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class SetupConfig:
    cmd: str | None = None
    timeout: float = 1800.0


@dataclasses.dataclass
class DatabaseConfig:
    mode: str = "schema"  # schema | database | none
    extensions: list[str] = dataclasses.field(default_factory=list)
    migrate: str | None = None
    migrations: list[str] = dataclasses.field(default_factory=lambda: list(DEFAULT_MIGRATION_GLOBS))
    env: dict[str, str] = dataclasses.field(default_factory=dict)
    provider: str | None = None  # embedded | external | docker; None = host default


@dataclasses.dataclass
class ServiceConfig:
    name: str
    cmd: str
    cwd: str | None = None
    env: dict[str, str] = dataclasses.field(default_factory=dict)
    ready: str | None = None
    ready_timeout: float = 60.0
    restart: str = "on-failure"  # on-failure | always | no
    depends_on: list[str] = dataclasses.field(default_factory=list)
    metrics: str | None = None


@dataclasses.dataclass
class ObservabilityConfig:
    enabled: bool = True
    collector: str = "builtin"  # builtin | vector
    provider: str | None = None  # native | docker; None = host default
    retention: str = "2d"
    victorialogs_url: str | None = None


@dataclasses.dataclass
class PoolConfig:
    size: int = 0  # boxes made ahead (0: no pool)
    restart_on_update: bool = False  # restart a claimed box's services after fast-forwarding it


@dataclasses.dataclass
class RepoConfig:
    source: str = "(defaults)"
    box: BoxConfig = dataclasses.field(default_factory=BoxConfig)
    setup: SetupConfig = dataclasses.field(default_factory=SetupConfig)
    database: DatabaseConfig = dataclasses.field(default_factory=DatabaseConfig)
    services: dict[str, ServiceConfig] = dataclasses.field(default_factory=dict)
    services_from_procfile: bool = False
    observability: ObservabilityConfig = dataclasses.field(default_factory=ObservabilityConfig)
    pool: PoolConfig = dataclasses.field(default_factory=PoolConfig)

    @property
    def port_names(self) -> list[str]:
        """Named ports a box leases: the repo's, plus `metrics` when observability is on."""
        names = list(self.box.ports)
        if self.observability.enabled and "metrics" not in names:
            names.append("metrics")
        return names


class _Reader:
    """Typed access to one TOML table with error messages that name file and key."""

    def __init__(self, source: str, table: dict[str, Any], prefix: str) -> None:
        self.source, self.table, self.prefix = source, table, prefix

    def err(self, key: str, expected: str, got: Any) -> ConfigError:
        return ConfigError(f"{self.source}: [{self.prefix}] {key}: expected {expected}, got {got!r}.")

    def unknown(self, allowed: set[str]) -> None:
        for key in self.table:
            if key not in allowed:
                raise ConfigError(
                    f"{self.source}: [{self.prefix}] has an unknown key {key!r}; known keys: {', '.join(sorted(allowed))}."
                )

    def get(self, key: str, kind: type | tuple, default: Any, expected: str) -> Any:
        if key not in self.table:
            return default
        val = self.table[key]
        if not isinstance(val, kind) or (kind is not bool and isinstance(val, bool) and bool not in _tuple(kind)):
            raise self.err(key, expected, val)
        return val

    def str_list(self, key: str, default: list[str]) -> list[str]:
        val = self.get(key, list, default, "a list of strings")
        if not all(isinstance(v, str) for v in val):
            raise self.err(key, "a list of strings", val)
        return list(val)

    def env_map(self, key: str) -> dict[str, str]:
        val = self.get(key, dict, {}, "a table of NAME = \"value\"")
        out = {}
        for k, v in val.items():
            if not _ENV_NAME.match(k):
                raise self.err(f"{key}.{k}", "an environment variable name", k)
            if isinstance(v, bool) or not isinstance(v, (str, int, float)):
                raise self.err(f"{key}.{k}", "a string", v)
            out[k] = str(v)
        return out

    def duration(self, key: str, default: float) -> float:
        if key not in self.table:
            return default
        return parse_duration(self.table[key], where=f"{self.source}: [{self.prefix}] {key}")

    def choice(self, key: str, choices: tuple[str, ...], default: str | None) -> str | None:
        val = self.get(key, str, default, "one of " + ", ".join(choices))
        if val is not None and val not in choices:
            raise self.err(key, "one of " + ", ".join(repr(c) for c in choices), val)
        return val


def _tuple(kind: type | tuple) -> tuple:
    return kind if isinstance(kind, tuple) else (kind,)


def _table(source: str, data: dict[str, Any], name: str) -> dict[str, Any]:
    val = data.get(name, {})
    if not isinstance(val, dict):
        raise ConfigError(f"{source}: [{name}] must be a table, got {val!r}.")
    return val


def parse_repo_config(text: str | None, source: str, procfile: str | None = None) -> RepoConfig:
    """Parse the text of a wtbox.toml (None → defaults). `procfile` is the repo's Procfile text, if any."""
    cfg = RepoConfig(source=source)
    data: dict[str, Any] = {}
    if text is not None:
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{source} is not valid TOML: {e}.") from None
    known = {"box", "setup", "database", "services", "observability", "pool"}
    for key in data:
        if key not in known:
            raise ConfigError(f"{source}: unknown section [{key}]; known sections: {', '.join(sorted(known))}.")

    r = _Reader(source, _table(source, data, "box"), "box")
    r.unknown({"ports", "ttl", "copy", "env", "cache_env"})
    ports = r.str_list("ports", ["web"])
    seen = set()
    for p in ports:
        if not _PORT_NAME.match(p) or p in seen:
            raise r.err("ports", "unique lowercase names such as \"web\" or \"api\"", p)
        seen.add(p)
    copies = []
    for item in r.str_list("copy", []):
        src, _, dst = item.partition(":")
        dst = dst or src
        for part in (src, dst):
            if not part or part.startswith("/") or ".." in Path(part).parts:
                raise r.err("copy", "relative paths inside the repo such as \".env.example:.env\"", item)
        copies.append((src, dst))
    cache_env = r.env_map("cache_env")
    for k, v in cache_env.items():
        if v.startswith("/") or ".." in Path(v).parts:
            raise r.err(f"cache_env.{k}", "a relative directory name inside the box cache", v)
    cfg.box = BoxConfig(ports=ports, ttl=r.duration("ttl", 72 * 3600.0), copy=copies, env=r.env_map("env"),
                        cache_env=cache_env)

    r = _Reader(source, _table(source, data, "setup"), "setup")
    r.unknown({"cmd", "timeout"})
    cfg.setup = SetupConfig(cmd=r.get("cmd", str, None, "a shell command string"),
                            timeout=r.duration("timeout", 1800.0))

    r = _Reader(source, _table(source, data, "database"), "database")
    r.unknown({"mode", "extensions", "migrate", "migrations", "env", "provider"})
    cfg.database = DatabaseConfig(
        mode=r.choice("mode", ("schema", "database", "none"), "schema"),
        extensions=r.str_list("extensions", []),
        migrate=r.get("migrate", str, None, "a shell command string"),
        migrations=r.str_list("migrations", list(DEFAULT_MIGRATION_GLOBS)),
        env=r.env_map("env"),
        provider=r.choice("provider", ("embedded", "external", "docker"), None),
    )

    r = _Reader(source, _table(source, data, "observability"), "observability")
    r.unknown({"enabled", "collector", "provider", "retention", "victorialogs_url"})
    cfg.observability = ObservabilityConfig(
        enabled=r.get("enabled", bool, True, "true or false"),
        collector=r.choice("collector", ("builtin", "vector"), "builtin"),
        provider=r.choice("provider", ("native", "docker"), None),
        retention=r.get("retention", str, "2d", "a retention such as \"2d\""),
        victorialogs_url=r.get("victorialogs_url", str, None, "a URL"),
    )

    r = _Reader(source, _table(source, data, "pool"), "pool")
    r.unknown({"size", "restart_on_update"})
    size = r.get("size", int, 0, "a whole number of boxes (0 for no pool)")
    if size < 0 or size > 64:
        raise r.err("size", "a whole number of boxes from 0 to 64", size)
    cfg.pool = PoolConfig(size=size, restart_on_update=r.get("restart_on_update", bool, False, "true or false"))

    services = _table(source, data, "services")
    for name, table in services.items():
        if not _PORT_NAME.match(name):
            raise ConfigError(f"{source}: [services.{name}]: service names are lowercase letters, digits and '_'.")
        if not isinstance(table, dict):
            raise ConfigError(f"{source}: [services.{name}] must be a table with at least cmd = \"...\".")
        r = _Reader(source, table, f"services.{name}")
        r.unknown({"cmd", "cwd", "env", "ready", "ready_timeout", "restart", "depends_on", "metrics"})
        cmd = r.get("cmd", str, None, "a shell command string")
        if not cmd:
            raise r.err("cmd", "a shell command string", cmd)
        cfg.services[name] = ServiceConfig(
            name=name, cmd=cmd, cwd=r.get("cwd", str, None, "a directory relative to the worktree"),
            env=r.env_map("env"), ready=r.get("ready", str, None, "an http:// URL, tcp:PORT or a shell command"),
            ready_timeout=r.duration("ready_timeout", 60.0),
            restart=r.choice("restart", ("on-failure", "always", "no"), "on-failure"),
            depends_on=r.str_list("depends_on", []), metrics=r.get("metrics", str, None, "a URL"),
        )
    for svc in cfg.services.values():
        for dep in svc.depends_on:
            if dep not in cfg.services:
                raise ConfigError(f"{source}: [services.{svc.name}] depends_on names {dep!r}, which is not a service.")
    _check_acyclic(source, cfg.services)
    if not cfg.services and procfile:
        cfg.services = parse_procfile(procfile, cfg.box.ports[0] if cfg.box.ports else None)
        cfg.services_from_procfile = True
    return cfg


def _check_acyclic(source: str, services: dict[str, ServiceConfig]) -> None:
    state: dict[str, int] = {}

    def visit(n: str, path: list[str]) -> None:
        if state.get(n) == 1:
            raise ConfigError(f"{source}: services depend on each other in a cycle: {' -> '.join(path + [n])}.")
        if state.get(n) == 2:
            return
        state[n] = 1
        for d in services[n].depends_on:
            visit(d, path + [n])
        state[n] = 2

    for n in services:
        visit(n, [])


def parse_procfile(text: str, first_port: str | None) -> dict[str, ServiceConfig]:
    """Procfile lines `name: command`; like honcho, `$PORT` is the box's first port."""
    out: dict[str, ServiceConfig] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#") or ":" not in line:
            continue
        name, cmd = (s.strip() for s in line.split(":", 1))
        name = re.sub(r"[^a-z0-9_]", "_", name.lower())
        if name and cmd and _PORT_NAME.match(name):
            env = {"PORT": "{{ ports.%s }}" % first_port} if first_port else {}
            out[name] = ServiceConfig(name=name, cmd=cmd, env=env)
    return out


def services_in_order(services: dict[str, ServiceConfig]) -> list[ServiceConfig]:
    """Dependencies first (the config was already checked to be acyclic)."""
    done: list[str] = []

    def visit(n: str) -> None:
        if n in done:
            return
        for d in services[n].depends_on:
            visit(d)
        done.append(n)

    for n in services:
        visit(n)
    return [services[n] for n in done]


# ---------------------------------------------------------------- host config

@dataclasses.dataclass
class HostConfig:
    source: str = "(defaults)"
    port_range: tuple[int, int] | None = None  # None → derived from the kernel's ephemeral range
    max_boxes: int = 64
    database_provider: str = "embedded"
    database_url: str | None = None
    postgres_image: str = "postgres:15"
    observability_provider: str = "native"
    victoriametrics_image: str = "victoriametrics/victoria-metrics:v1.93.0"
    fsync_off: bool = True


def load_host_config(home: Path) -> HostConfig:
    path = home / "config.toml"
    cfg = HostConfig(source=str(path))
    data: dict[str, Any] = {}
    if path.exists():
        try:
            data = tomllib.loads(path.read_text())
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path} is not valid TOML: {e}.") from None
    src = str(path)
    r = _Reader(src, _table(src, data, "host"), "host")
    r.unknown({"port_range", "max_boxes"})
    pr = r.get("port_range", str, None, "a range such as \"20000-29999\"")
    cfg.port_range = parse_port_range(pr, f"{src}: [host] port_range") if pr else None
    cfg.max_boxes = r.get("max_boxes", int, 64, "a whole number")
    r = _Reader(src, _table(src, data, "database"), "database")
    r.unknown({"provider", "url", "image", "fsync_off"})
    cfg.database_provider = r.choice("provider", ("embedded", "external", "docker"), "embedded")
    cfg.database_url = r.get("url", str, None, "a postgresql:// URL")
    cfg.postgres_image = r.get("image", str, cfg.postgres_image, "an image name")
    cfg.fsync_off = r.get("fsync_off", bool, True, "true or false")
    r = _Reader(src, _table(src, data, "observability"), "observability")
    r.unknown({"provider", "image"})
    cfg.observability_provider = r.choice("provider", ("native", "docker"), "native")
    cfg.victoriametrics_image = r.get("image", str, cfg.victoriametrics_image, "an image name")

    # Environment overrides (documented in the README).
    if os.environ.get("WTBOX_PORT_RANGE"):
        cfg.port_range = parse_port_range(os.environ["WTBOX_PORT_RANGE"], "WTBOX_PORT_RANGE")
    if os.environ.get("WTBOX_POSTGRES_URL"):
        cfg.database_url = os.environ["WTBOX_POSTGRES_URL"]
    if cfg.database_url and not os.environ.get("WTBOX_DATABASE_PROVIDER") and "provider" not in data.get("database", {}):
        cfg.database_provider = "external"
    if os.environ.get("WTBOX_DATABASE_PROVIDER"):
        val = os.environ["WTBOX_DATABASE_PROVIDER"]
        if val not in ("embedded", "external", "docker"):
            raise ConfigError(f"WTBOX_DATABASE_PROVIDER: expected embedded, external or docker, got {val!r}.")
        cfg.database_provider = val
    if os.environ.get("WTBOX_OBSERVABILITY_PROVIDER"):
        val = os.environ["WTBOX_OBSERVABILITY_PROVIDER"]
        if val not in ("native", "docker"):
            raise ConfigError(f"WTBOX_OBSERVABILITY_PROVIDER: expected native or docker, got {val!r}.")
        cfg.observability_provider = val
    if os.environ.get("WTBOX_POSTGRES_IMAGE"):
        cfg.postgres_image = os.environ["WTBOX_POSTGRES_IMAGE"]
    if os.environ.get("WTBOX_VICTORIAMETRICS_IMAGE"):
        cfg.victoriametrics_image = os.environ["WTBOX_VICTORIAMETRICS_IMAGE"]
    return cfg


def parse_port_range(text: str, where: str) -> tuple[int, int]:
    m = re.match(r"^\s*(\d+)\s*-\s*(\d+)\s*$", text)
    if not m:
        raise ConfigError(f"{where}: expected a range such as '20000-29999', got {text!r}.")
    lo, hi = int(m.group(1)), int(m.group(2))
    if not (1024 <= lo < hi <= 65535):
        raise ConfigError(f"{where}: the range {text!r} must lie between 1024 and 65535, low to high.")
    return lo, hi


# ---------------------------------------------------------------- which wtbox.toml a box uses

def load_repo_config_file(root: Path, source_label: str | None = None) -> RepoConfig:
    """The wtbox.toml (or Procfile) in a checkout; the defaults when neither exists."""
    toml = root / "wtbox.toml"
    return parse_repo_config(_read(toml), source_label or str(toml), procfile=_read(root / "Procfile"))


def config_sources(repo: Path, sha: str, *, explicit_ref: bool) -> tuple[str, str | None, str | None]:
    """(source label, wtbox.toml text, Procfile text) a `new` at `sha` reads: without --from, the
    files in the main checkout as the user sees them (so edits apply before they are committed);
    with --from, the files at that ref."""
    from . import git

    if not explicit_ref:
        return str(repo / "wtbox.toml"), _read(repo / "wtbox.toml"), _read(repo / "Procfile")
    return f"wtbox.toml at {sha[:12]}", git.show_file(repo, sha, "wtbox.toml"), git.show_file(repo, sha, "Procfile")


def load_config_for_new(repo: Path, sha: str, *, explicit_ref: bool) -> RepoConfig:
    """The config a `new` at `sha` uses (config_sources says which files)."""
    source, text, procfile = config_sources(repo, sha, explicit_ref=explicit_ref)
    return parse_repo_config(text, source, procfile=procfile)


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path} cannot be read: {e}.") from None
