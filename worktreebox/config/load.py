"""Loading and validating wtbox.toml (per repo) and config.toml (per host).

A config error names the file, the key and what was expected, and exits 2.
"""
from __future__ import annotations

import dataclasses
import math
import os
import posixpath
import re
import tomllib
from pathlib import Path
from typing import Any

from worktreebox.errors import ConfigError

DEFAULT_MIGRATION_GLOBS = ["alembic/**", "migrations/**", "**/migrations/*.py"]
_PORT_NAME = re.compile(r"^[a-z][a-z0-9_]{0,30}$")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_ENV_PATTERN = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*\*?$")
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*$")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
# Longer than any box should live; beyond it timers overflow (threading waits, poll timeouts).
MAX_DURATION = 10 * 365 * 86400.0
MAX_PORTS = 64
MAX_BOXES = 10000
# Characters no path, name or URL may hold: NUL ends a C string, the others hide in a terminal.
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def parse_duration(text: str | int | float, *, where: str = "duration", positive: bool = False) -> float:
    """'90s', '10m', '72h', '2d' or a number of seconds → seconds (finite, 0 up to ten years;
    above 0 when `positive`)."""
    expected = "a duration such as '30s', '10m' or '72h'"
    if isinstance(text, bool) or not isinstance(text, (str, int, float)):
        raise ConfigError(f"{where}: expected {expected}, got {text!r}.")
    if isinstance(text, (int, float)):
        seconds = float(text) if math.isfinite(text) and abs(text) <= MAX_DURATION * 2 else math.inf
    else:
        m = _DURATION.match(text)
        if not m:
            raise ConfigError(f"{where}: expected {expected}, got {text!r}.")
        seconds = float(m.group(1)) * _UNITS[m.group(2)]
    if not (0 <= seconds <= MAX_DURATION) or (positive and seconds == 0):
        low = "more than 0" if positive else "0 or more"
        raise ConfigError(f"{where}: expected {expected}, {low} and at most ten years, got {text!r}.")
    return seconds


def check_template(text: str, where: str) -> None:
    """A template that compiles (see templating.check)."""
    from worktreebox.config.templating import check

    check(text, where)


def is_template(text: str) -> bool:
    return "{{" in text or "{%" in text


def relative_inside(rel: str, where: str, expected: str) -> str:
    """A relative path that stays inside its root when read as written (no '..' out, not absolute,
    no control characters); `path_inside` checks the same again after symlinks, at use."""
    norm = posixpath.normpath(rel) if rel else ""
    if not rel or _CONTROL.search(rel) or rel.startswith(("/", "~")) or norm == ".." or norm.startswith("../"):
        raise ConfigError(f"{where}: expected {expected}, got {rel!r}.")
    return rel


def path_inside(root: Path, rel: str | Path, where: str) -> Path:
    """root / rel with symlinks resolved; a ConfigError naming `where` unless it lies inside root."""
    text = str(rel)
    if not text or _CONTROL.search(text):
        raise ConfigError(f"{where}: expected a path inside {root}, got {text!r}.")
    real_root = Path(os.path.realpath(root))
    target = Path(os.path.realpath(root / rel))
    if target != real_root and real_root not in target.parents:
        raise ConfigError(f"{where}: {text!r} leads outside {root} (to {target}); keep it inside.")
    return target


def check_ready(ready: str, where: str) -> None:
    """A readiness check that can be judged without running it: tcp:[HOST:]PORT and http(s) URLs."""
    if is_template(ready):
        return
    if ready.startswith("tcp:"):
        host, _, port = ready[4:].rpartition(":")
        if not (port.isdigit() and 1 <= int(port) <= 65535) or any(c.isspace() for c in host):
            raise ConfigError(f"{where}: expected tcp:PORT or tcp:HOST:PORT with a port from 1 to 65535, got {ready!r}.")
    elif ready.startswith(("http://", "https://")):
        check_url(ready, where)


def check_url(url: str, where: str) -> str:
    """An http(s) URL with a host and a valid port, without spaces or control characters."""
    from urllib.parse import urlsplit

    expected = "an http:// or https:// URL"
    if is_template(url):
        return url
    try:
        u = urlsplit(url)
        ok = u.scheme in ("http", "https") and bool(u.hostname) and (u.port is None or 1 <= u.port <= 65535)
    except ValueError:
        ok = False
    if not ok or _CONTROL.search(url) or any(c.isspace() for c in url):
        raise ConfigError(f"{where}: expected {expected} such as 'http://127.0.0.1:8000/', got {url!r}.")
    return url


@dataclasses.dataclass
class LimitsConfig:
    """What a box may use ([box] in wtbox.toml; host defaults in config.toml's [box]).
    None = not set here (the host default applies); UNLIMITED = "max" said explicitly."""

    cpu_weight: int | None = None  # 1..10000; every box gets 100 unless it says otherwise
    memory_max: int | None = None  # bytes
    pids_max: int | None = None

    def over(self, defaults: LimitsConfig) -> LimitsConfig:
        """These limits, with the unset ones taken from `defaults`."""
        return LimitsConfig(*(mine if mine is not None else theirs for mine, theirs in
                              zip(dataclasses.astuple(self), dataclasses.astuple(defaults))))


UNLIMITED = 0
LIMIT_KEYS = ("cpu_weight", "memory_max", "pids_max")
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b?)\s*$", re.I)
_SIZE_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


@dataclasses.dataclass
class BoxConfig:
    ports: list[str] = dataclasses.field(default_factory=lambda: ["web"])
    ttl: float = 72 * 3600.0
    copy: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    env: dict[str, str] = dataclasses.field(default_factory=dict)
    # Extra variables pointed into the box's cache dir, e.g. {"npm_config_cache": "npm"}.
    cache_env: dict[str, str] = dataclasses.field(default_factory=dict)
    # Variables (or PREFIX_*) the box inherits from the shell that makes it (boxenv.py).
    inherit_env: list[str] = dataclasses.field(default_factory=list)
    clean_env: bool = False  # inherit only inherit_env, not the default PATH, HOME, locale
    limits: LimitsConfig = dataclasses.field(default_factory=LimitsConfig)


@dataclasses.dataclass
class SetupConfig:
    cmd: str | None = None
    timeout: float = 1800.0


@dataclasses.dataclass
class RecipeConfig:
    """[deps.<name>]: a dependency layer made by any command (e.g. `bundle install --path vendor/bundle`)."""

    name: str
    cmd: str
    paths: list[str]  # what cmd makes, relative to dir; attached copy-on-write in every box
    lock: list[str] = dataclasses.field(default_factory=list)  # files (relative to dir) whose contents key it
    dir: str = ""  # where cmd runs, relative to the repo root


@dataclasses.dataclass
class DepsConfig:
    detect: bool = True  # find uv.lock, poetry.lock, requirements*.txt, package-lock.json, ... by themselves
    files: list[str] = dataclasses.field(default_factory=list)  # lock files detection would not find
    recipes: dict[str, RecipeConfig] = dataclasses.field(default_factory=dict)
    timeout: float = 1800.0


@dataclasses.dataclass
class DatabaseConfig:
    mode: str = "database"  # database | schema | none
    extensions: list[str] = dataclasses.field(default_factory=list)
    migrate: str | None = None
    migrations: list[str] = dataclasses.field(default_factory=lambda: list(DEFAULT_MIGRATION_GLOBS))
    env: dict[str, str] = dataclasses.field(default_factory=dict)
    provider: str | None = None  # embedded | external | docker; None = host default


# Ports wtbox leases for its own observability (the metrics store, the OTLP receiver; Vector's
# OTLP source), never taken for the app's first port.
OBSERVABILITY_PORTS = ("metrics", "otlp")
OWN_PORTS = (*OBSERVABILITY_PORTS, "otlp_grpc", "otlp_vector", "browser")  # wtbox's, never the app's


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
    # Ready only when the service's own process tree listens on its port; false for a service
    # whose port a proxy holds (e.g. `docker run -p`).
    holds_port: bool = True


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
class BrowserConfig:
    enabled: bool = False  # keep a headless Chromium running for the box's lifetime


@dataclasses.dataclass
class RepoConfig:
    source: str = "(defaults)"
    box: BoxConfig = dataclasses.field(default_factory=BoxConfig)
    setup: SetupConfig = dataclasses.field(default_factory=SetupConfig)
    deps: DepsConfig = dataclasses.field(default_factory=DepsConfig)
    database: DatabaseConfig = dataclasses.field(default_factory=DatabaseConfig)
    services: dict[str, ServiceConfig] = dataclasses.field(default_factory=dict)
    services_from_procfile: bool = False
    observability: ObservabilityConfig = dataclasses.field(default_factory=ObservabilityConfig)
    pool: PoolConfig = dataclasses.field(default_factory=PoolConfig)
    browser: BrowserConfig = dataclasses.field(default_factory=BrowserConfig)

    @property
    def port_names(self) -> list[str]:
        """Named ports a box leases: the repo's, plus `metrics` and `otlp` when observability is on."""
        names = list(self.box.ports)
        if self.observability.enabled:
            names += [n for n in OBSERVABILITY_PORTS if n not in names]
        if self.browser.enabled and "browser" not in names:
            names.append("browser")
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

    def text(self, key: str, default: str | None, expected: str, *, template: bool = False,
             control: bool = True) -> str | None:
        """A string without NUL (and, unless `control`, without any control character); with
        `template`, one that compiles as Jinja2."""
        if key not in self.table:
            return default
        val = self.get(key, str, default, expected)
        if "\0" in val or (not control and _CONTROL.search(val)):
            raise self.err(key, expected + " without control characters", val)
        if template:
            check_template(val, f"{self.source}: [{self.prefix}] {key}")
        return val

    def command(self, key: str) -> str | None:
        """A shell command: not blank, no NUL, a Jinja2 template that compiles."""
        val = self.text(key, None, "a shell command string", template=True)
        if val is not None and not val.strip():
            raise self.err(key, "a shell command string", val)
        return val

    def str_list(self, key: str, default: list[str], *, control: bool = False) -> list[str]:
        val = self.get(key, list, default, "a list of strings")
        if not all(isinstance(v, str) and (control or not _CONTROL.search(v)) for v in val):
            raise self.err(key, "a list of strings without control characters", val)
        return list(val)

    def env_map(self, key: str, *, template: bool = True) -> dict[str, str]:
        val = self.get(key, dict, {}, "a table of NAME = \"value\"")
        out = {}
        for k, v in val.items():
            if not _ENV_NAME.match(k):
                raise self.err(f"{key}.{k}", "an environment variable name", k)
            if isinstance(v, bool) or not isinstance(v, (str, int, float)):
                raise self.err(f"{key}.{k}", "a string", v)
            if isinstance(v, str):
                if "\0" in v:
                    raise self.err(f"{key}.{k}", "a string without NUL characters", v)
                if template:
                    check_template(v, f"{self.source}: [{self.prefix}] {key}.{k}")
            out[k] = str(v)
        return out

    def duration(self, key: str, default: float, *, positive: bool = True) -> float:
        if key not in self.table:
            return default
        return parse_duration(self.table[key], where=f"{self.source}: [{self.prefix}] {key}", positive=positive)

    def url(self, key: str) -> str | None:
        val = self.text(key, None, "an http:// or https:// URL", template=True)
        return check_url(val, f"{self.source}: [{self.prefix}] {key}") if val is not None else None

    def size(self, key: str) -> int | None:
        """A memory size: bytes as a number, or "512M", "2G", "1.5GiB"; "max" = UNLIMITED."""
        if key not in self.table:
            return None
        val = self.table[key]
        expected = "a size such as \"512M\" or \"2G\", or \"max\""
        if isinstance(val, int) and not isinstance(val, bool) and val > 0:
            return val
        if isinstance(val, str) and val.strip().lower() == "max":
            return UNLIMITED
        m = _SIZE.match(val) if isinstance(val, str) else None
        if not m or (m.group(3) and not m.group(2)) or float(m.group(1)) <= 0:
            raise self.err(key, expected, val)
        return int(float(m.group(1)) * _SIZE_UNITS[m.group(2).lower()])

    def limits(self) -> LimitsConfig:
        """cpu_weight, memory_max, pids_max of a [box] table."""
        weight = self.get("cpu_weight", int, None, "a whole number from 1 to 10000 (100 is every box's share)")
        if weight is not None and not 1 <= weight <= 10000:
            raise self.err("cpu_weight", "a whole number from 1 to 10000 (100 is every box's share)", weight)
        memory = self.size("memory_max")
        if memory not in (None, UNLIMITED) and memory < 4 << 20:
            raise self.err("memory_max", "at least \"4M\" (a box needs some memory to start)", self.table["memory_max"])
        pids = self.table.get("pids_max")
        if isinstance(pids, str) and pids.strip().lower() == "max":
            pids = UNLIMITED
        elif pids is not None and (not isinstance(pids, int) or isinstance(pids, bool) or pids < 1):
            raise self.err("pids_max", "a whole number of processes above 0, or \"max\"", pids)
        return LimitsConfig(cpu_weight=weight, memory_max=memory, pids_max=pids)

    def choice(self, key: str, choices: tuple[str, ...], default: str | None) -> str | None:
        val = self.get(key, str, default, "one of " + ", ".join(choices))
        if val is not None and val not in choices:
            raise self.err(key, "one of " + ", ".join(repr(c) for c in choices), val)
        return val


def _looks_secret(name: str) -> bool:
    from worktreebox.secrets import _SECRET_NAME

    return bool(_SECRET_NAME.search(name))


def _loads(text: str, source: str) -> dict[str, Any]:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{source} is not valid TOML: {e}.") from None
    except ValueError as e:  # e.g. an integer of more than 4300 digits
        raise ConfigError(f"{source} is not valid TOML: {str(e).split(';')[0]}.") from None


def _tuple(kind: type | tuple) -> tuple:
    return kind if isinstance(kind, tuple) else (kind,)


def _table(source: str, data: dict[str, Any], name: str) -> dict[str, Any]:
    val = data.get(name, {})
    if not isinstance(val, dict):
        raise ConfigError(f"{source}: [{name}] must be a table, got {val!r}.")
    return val


def parse_repo_config(text: str | None, source: str, procfile: str | None = None) -> RepoConfig:
    """Parse the text of a wtbox.toml (None → defaults). `procfile` is the repo's Procfile text, if any."""
    data: dict[str, Any] = _loads(text, source) if text is not None else {}
    known = {"box", "setup", "database", "services", "observability", "pool", "browser", "deps"}
    for key in data:
        if key not in known:
            raise ConfigError(f"{source}: unknown section [{key}]; known sections: {', '.join(sorted(known))}.")

    def section(name: str) -> dict[str, Any]:
        return _table(source, data, name)

    cfg = RepoConfig(source=source)
    cfg.box = _parse_box(source, section("box"))
    cfg.setup = _parse_setup(source, section("setup"))
    cfg.deps = _parse_deps(source, section("deps"))
    cfg.database = _parse_database(source, section("database"))
    cfg.observability = _parse_observability(source, section("observability"))
    cfg.pool = _parse_pool(source, section("pool"))
    cfg.browser = _parse_browser(source, section("browser"))
    cfg.services = _parse_services(source, section("services"))
    if not cfg.services and procfile:
        cfg.services = parse_procfile(procfile, cfg.box.ports[0] if cfg.box.ports else None)
        cfg.services_from_procfile = True
    return cfg


def _parse_box(source: str, table: dict[str, Any]) -> BoxConfig:
    r = _Reader(source, table, "box")
    r.unknown({"ports", "ttl", "copy", "env", "cache_env", "inherit_env", "clean_env", *LIMIT_KEYS})
    ports = r.str_list("ports", ["web"])
    seen = set()
    for p in ports:
        if not _PORT_NAME.match(p) or p in seen:
            raise r.err("ports", "unique lowercase names such as \"web\" or \"api\"", p)
        seen.add(p)
    if len(ports) > MAX_PORTS:
        raise r.err("ports", f"at most {MAX_PORTS} names", f"{len(ports)} names")
    copies = []
    expected = "relative paths inside the repo such as \".env.example:.env\""
    for item in r.str_list("copy", []):
        src, _, dst = item.partition(":")
        dst = dst or src
        for part in (src, dst):
            relative_inside(part, f"{source}: [box] copy", expected)
        if ".git" in Path(dst).parts:
            raise r.err("copy", expected + " outside .git", item)
        copies.append((src, dst))
    cache_env = r.env_map("cache_env", template=False)
    for k, v in cache_env.items():
        relative_inside(v, f"{source}: [box] cache_env.{k}", "a relative directory name inside the box cache")
    inherit = r.str_list("inherit_env", [])
    for name in inherit:
        if not _ENV_PATTERN.match(name):
            raise r.err("inherit_env", "variable names, or prefixes ending in '*' such as \"AWS_*\"", name)
        if _looks_secret(name):
            raise r.err("inherit_env", "names of variables that are not secrets (pass those with --secret)", name)
    return BoxConfig(ports=ports, ttl=r.duration("ttl", 72 * 3600.0), copy=copies, env=r.env_map("env"),
                        cache_env=cache_env, inherit_env=inherit,
                        clean_env=r.get("clean_env", bool, False, "true or false"), limits=r.limits())


def _parse_setup(source: str, table: dict[str, Any]) -> SetupConfig:
    r = _Reader(source, table, "setup")
    r.unknown({"cmd", "timeout"})
    return SetupConfig(cmd=r.command("cmd"), timeout=r.duration("timeout", 1800.0))


def _parse_database(source: str, table: dict[str, Any]) -> DatabaseConfig:
    r = _Reader(source, table, "database")
    r.unknown({"mode", "extensions", "migrate", "migrations", "env", "provider"})
    extensions = r.str_list("extensions", [])
    if any(not e.strip() for e in extensions):
        raise r.err("extensions", "extension names such as \"uuid-ossp\"", extensions)
    return DatabaseConfig(
        mode=r.choice("mode", ("database", "schema", "none"), "database"),
        extensions=extensions,
        # not a template: run as written (see resources/database.py)
        migrate=r.text("migrate", None, "a shell command string"),
        migrations=r.str_list("migrations", list(DEFAULT_MIGRATION_GLOBS)),
        env=r.env_map("env"),
        provider=r.choice("provider", ("embedded", "external", "docker"), None),
    )


def _parse_observability(source: str, table: dict[str, Any]) -> ObservabilityConfig:
    r = _Reader(source, table, "observability")
    r.unknown({"enabled", "collector", "provider", "retention", "victorialogs_url"})
    retention = r.text("retention", "2d", "a retention such as \"2d\"", control=False)
    parse_duration(retention, where=f"{source}: [observability] retention", positive=True)
    return ObservabilityConfig(
        enabled=r.get("enabled", bool, True, "true or false"),
        collector=r.choice("collector", ("builtin", "vector"), "builtin"),
        provider=r.choice("provider", ("native", "docker"), None),
        retention=retention,
        victorialogs_url=r.url("victorialogs_url"),
    )


def _parse_pool(source: str, table: dict[str, Any]) -> PoolConfig:
    r = _Reader(source, table, "pool")
    r.unknown({"size", "restart_on_update"})
    size = r.get("size", int, 0, "a whole number of boxes (0 for no pool)")
    if size < 0 or size > 64:
        raise r.err("size", "a whole number of boxes from 0 to 64", size)
    return PoolConfig(size=size, restart_on_update=r.get("restart_on_update", bool, False, "true or false"))


def _parse_browser(source: str, table: dict[str, Any]) -> BrowserConfig:
    r = _Reader(source, table, "browser")
    r.unknown({"enabled"})
    return BrowserConfig(enabled=r.get("enabled", bool, False, "true or false"))


def _parse_services(source: str, tables: dict[str, Any]) -> dict[str, ServiceConfig]:
    out: dict[str, ServiceConfig] = {}
    for name, table in tables.items():
        if not _PORT_NAME.match(name):
            raise ConfigError(f"{source}: [services.{name!r}]: service names are lowercase letters, digits and '_'.")
        if not isinstance(table, dict):
            raise ConfigError(f"{source}: [services.{name}] must be a table with at least cmd = \"...\".")
        r = _Reader(source, table, f"services.{name}")
        r.unknown({"cmd", "cwd", "env", "ready", "ready_timeout", "restart", "depends_on", "metrics", "holds_port"})
        cmd = r.command("cmd")
        if not cmd:
            raise r.err("cmd", "a shell command string", cmd)
        cwd = r.text("cwd", None, "a directory relative to the worktree", template=True, control=False)
        if cwd is not None and not is_template(cwd):
            relative_inside(cwd, f"{source}: [services.{name}] cwd", "a directory relative to the worktree")
        ready = r.text("ready", None, "an http:// URL, tcp:PORT or a shell command", template=True)
        if ready is not None:
            check_ready(ready, f"{source}: [services.{name}] ready")
        deps = r.str_list("depends_on", [])
        out[name] = ServiceConfig(
            name=name, cmd=cmd, cwd=cwd, env=r.env_map("env"), ready=ready,
            ready_timeout=r.duration("ready_timeout", 60.0),
            restart=r.choice("restart", ("on-failure", "always", "no"), "on-failure"),
            depends_on=deps, metrics=r.url("metrics"), holds_port=r.get("holds_port", bool, True, "true or false"),
        )
    for svc in out.values():
        for dep in svc.depends_on:
            if dep not in out:
                raise ConfigError(f"{source}: [services.{svc.name}] depends_on names {dep!r}, which is not a service.")
    _check_acyclic(source, out)
    return out


def _relative(r: _Reader, key: str, value: str, what: str) -> str:
    if value.startswith("/") or ".." in Path(value).parts:
        raise r.err(key, what, value)
    return value.strip("/").removeprefix("./") if value not in (".", "./") else ""


def _parse_deps(source: str, table: dict[str, Any]) -> DepsConfig:
    """[deps]: detect = true|false, files = [...], timeout, and [deps.<name>] recipes (cmd + paths)."""
    scalars = {"detect", "files", "timeout"}
    r = _Reader(source, {k: v for k, v in table.items() if k in scalars or not isinstance(v, dict)}, "deps")
    r.unknown(scalars)
    cfg = DepsConfig(detect=r.get("detect", bool, True, "true or false"),
                     files=[_relative(r, "files", f, "lock file paths relative to the repo root")
                            for f in r.str_list("files", [])],
                     timeout=r.duration("timeout", 1800.0))
    for name, sub in table.items():
        if not isinstance(sub, dict):
            continue
        if not _PORT_NAME.match(name):
            raise ConfigError(f"{source}: [deps.{name}]: recipe names are lowercase letters, digits and '_'.")
        rr = _Reader(source, sub, f"deps.{name}")
        rr.unknown({"cmd", "paths", "lock", "dir"})
        cmd = rr.get("cmd", str, None, "a shell command string")
        if not cmd:
            raise rr.err("cmd", "a shell command string", cmd)
        paths = [_relative(rr, "paths", p, "directories relative to dir that cmd makes")
                 for p in rr.str_list("paths", [])]
        if not paths or "" in paths:
            raise rr.err("paths", "a non-empty list of directories that cmd makes, such as [\"vendor/bundle\"]",
                         sub.get("paths"))
        cfg.recipes[name] = RecipeConfig(
            name=name, cmd=cmd, paths=paths,
            lock=[_relative(rr, "lock", p, "files relative to dir") for p in rr.str_list("lock", [])],
            dir=_relative(rr, "dir", rr.get("dir", str, ".", "a directory relative to the repo root"),
                          "a directory relative to the repo root"))
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
    # Admission: `new`/`fanout` wait (or refuse with --no-wait) while the host is this full.
    max_active: int | None = None  # boxes being made or running processes
    max_load: float | None = None  # 1-minute load average
    box_limits: LimitsConfig = dataclasses.field(default_factory=LimitsConfig)  # [box]: defaults for every box
    database_spares: int = 3  # databases made ahead per golden copy (0: none)
    mounts: str | None = None  # a mount provider by name (providers/mounts); None = the first that works
    mounts_where: str = "[host] mounts"  # where that came from, for error messages
    layer_ttl: float = 24 * 3600.0  # gc removes trees and dependency layers no box used for this long
    background_busy: bool = True  # a box that keeps the CPU busy runs as background (background.py)
    # The host router (worktreebox/router): on, on a leased port (None) or this one, on the loopback.
    router: bool = True
    router_port: int | None = None
    router_listen: str = "127.0.0.1"


def load_host_config(home: Path) -> HostConfig:
    path = home / "config.toml"
    cfg = HostConfig(source=str(path))
    data: dict[str, Any] = {}
    if path.exists():
        try:
            data = _loads(path.read_text(), str(path))
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path} cannot be read as UTF-8 TOML: {e}.") from None
    src = str(path)
    known = {"host", "box", "database", "observability"}
    for key in data:
        if key not in known:
            raise ConfigError(f"{src}: unknown section [{key}]; known sections: {', '.join(sorted(known))}.")
    r = _Reader(src, _table(src, data, "host"), "host")
    r.unknown({"port_range", "max_boxes", "max_active", "max_load", "mounts", "layer_ttl", "background_busy",
               "router", "router_port", "router_listen"})
    pr = r.get("port_range", str, None, "a range such as \"20000-29999\"")
    cfg.port_range = parse_port_range(pr, f"{src}: [host] port_range") if pr is not None else None
    cfg.max_boxes = r.get("max_boxes", int, 64, "a whole number")
    if not 1 <= cfg.max_boxes <= MAX_BOXES:
        raise r.err("max_boxes", f"a whole number from 1 to {MAX_BOXES}", cfg.max_boxes)
    cfg.mounts = r.get("mounts", str, None, "a mount provider name such as \"overlay\" or \"checkout\"")
    cfg.mounts_where = f"{src}: [host] mounts"
    cfg.layer_ttl = r.duration("layer_ttl", cfg.layer_ttl)
    cfg.max_active = r.get("max_active", int, None, "a whole number of boxes above 0")
    if cfg.max_active is not None and cfg.max_active < 1:
        raise r.err("max_active", "a whole number of boxes above 0", cfg.max_active)
    load = r.get("max_load", (int, float), None, "a load average above 0, such as 4.0")
    if load is not None and load <= 0:
        raise r.err("max_load", "a load average above 0, such as 4.0", load)
    cfg.max_load = float(load) if load is not None else None
    cfg.background_busy = r.get("background_busy", bool, True, "true or false")
    _read_router(r, cfg)
    r = _Reader(src, _table(src, data, "box"), "box")
    r.unknown(set(LIMIT_KEYS))
    cfg.box_limits = r.limits()
    r = _Reader(src, _table(src, data, "database"), "database")
    r.unknown({"provider", "url", "image", "fsync_off", "spares"})
    cfg.database_provider = r.choice("provider", ("embedded", "external", "docker"), "embedded")
    url = r.get("url", str, None, "a postgresql:// URL")
    cfg.database_url = check_postgres_url(url, f"{src}: [database] url") if url is not None else None
    cfg.postgres_image = check_image(r.get("image", str, cfg.postgres_image, "an image name"),
                                     f"{src}: [database] image")
    cfg.fsync_off = r.get("fsync_off", bool, True, "true or false")
    cfg.database_spares = r.get("spares", int, cfg.database_spares, "a whole number of spare databases, 0 or more")
    if cfg.database_spares < 0:
        raise r.err("spares", "a whole number of spare databases, 0 or more", cfg.database_spares)
    r = _Reader(src, _table(src, data, "observability"), "observability")
    r.unknown({"provider", "image"})
    cfg.observability_provider = r.choice("provider", ("native", "docker"), "native")
    cfg.victoriametrics_image = check_image(r.get("image", str, cfg.victoriametrics_image, "an image name"),
                                            f"{src}: [observability] image")

    # Environment overrides (documented in the README).
    if os.environ.get("WTBOX_MOUNTS"):
        cfg.mounts, cfg.mounts_where = os.environ["WTBOX_MOUNTS"], "WTBOX_MOUNTS"
    if os.environ.get("WTBOX_LAYER_TTL"):
        cfg.layer_ttl = parse_duration(os.environ["WTBOX_LAYER_TTL"], where="WTBOX_LAYER_TTL")
    if os.environ.get("WTBOX_PORT_RANGE"):
        cfg.port_range = parse_port_range(os.environ["WTBOX_PORT_RANGE"], "WTBOX_PORT_RANGE")
    if os.environ.get("WTBOX_POSTGRES_URL"):
        cfg.database_url = check_postgres_url(os.environ["WTBOX_POSTGRES_URL"], "WTBOX_POSTGRES_URL")
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
        cfg.postgres_image = check_image(os.environ["WTBOX_POSTGRES_IMAGE"], "WTBOX_POSTGRES_IMAGE")
    if os.environ.get("WTBOX_VICTORIAMETRICS_IMAGE"):
        cfg.victoriametrics_image = check_image(os.environ["WTBOX_VICTORIAMETRICS_IMAGE"], "WTBOX_VICTORIAMETRICS_IMAGE")
    return cfg


def _read_router(r: _Reader, cfg: HostConfig) -> None:
    """[host] router, router_port, router_listen (an IP address: Caddy binds it as given)."""
    import ipaddress

    cfg.router = r.get("router", bool, True, "true or false")
    cfg.router_port = r.get("router_port", int, None, "a port number from 1 to 65535")
    if cfg.router_port is not None and not 1 <= cfg.router_port <= 65535:
        raise r.err("router_port", "a port number from 1 to 65535", cfg.router_port)
    listen = r.get("router_listen", str, cfg.router_listen, "an IP address such as \"127.0.0.1\" or \"0.0.0.0\"")
    try:
        cfg.router_listen = str(ipaddress.ip_address(listen))
    except ValueError:
        raise r.err("router_listen", "an IP address such as \"127.0.0.1\" or \"0.0.0.0\"", listen) from None


def check_postgres_url(url: str, where: str) -> str:
    """A postgresql:// (or postgres://) URL without spaces or control characters."""
    if not re.match(r"^postgres(ql)?://\S+$", url) or _CONTROL.search(url):
        raise ConfigError(f"{where}: expected a postgresql://USER:PASSWORD@HOST:PORT/DB URL, got a value that is not one.")
    return url


def check_image(image: str, where: str) -> str:
    """A container image reference: one word of printable characters."""
    if not image or _CONTROL.search(image) or any(c.isspace() for c in image):
        raise ConfigError(f"{where}: expected an image name such as 'postgres:15', got {image!r}.")
    return image


def parse_port_range(text: str, where: str) -> tuple[int, int]:
    m = re.match(r"^\s*([0-9]{1,6})\s*-\s*([0-9]{1,6})\s*$", text)
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
    from worktreebox.system import git

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
