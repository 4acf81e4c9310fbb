"""wtbox.toml, a repo's config: what its boxes are made of, as dataclasses and their schema.

Each table's dataclass holds the defaults; its schema (REPO, below) holds each key's parser, in
the order keys are checked. `tests/config/test_repo.py` holds the two to the same keys.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any

import cfgv

from worktreebox import diagnostics, providers
from worktreebox.config import values as v
from worktreebox.config.backing import BACKING, TEST, BackingConfig, TestConfig, backing_from, check_names
from worktreebox.config.schema import Key, NamedTables, Table, document, loads, table, validated
from worktreebox.errors import ConfigError

log = diagnostics.logger("config")
DEFAULT_MIGRATION_GLOBS = ["alembic/**", "migrations/**", "**/migrations/*.py"]
LIMIT_KEYS = ("cpu_weight", "memory_max", "pids_max", "disk_max")
# Ports wtbox leases for its own observability (the metrics store, the OTLP receiver; Vector's
# OTLP source), never taken for the app's first port.
OBSERVABILITY_PORTS = ("metrics", "otlp")
OWN_PORTS = (*OBSERVABILITY_PORTS, "otlp_grpc", "otlp_vector", "browser")  # wtbox's, never the app's


@dataclasses.dataclass
class LimitsConfig:
    """What a box may use ([box] in wtbox.toml; host defaults in config.toml's [box]).
    None = not set here (the host default applies); UNLIMITED = "max" said explicitly."""

    cpu_weight: int | None = None  # 1..10000; every box gets 100 unless it says otherwise
    memory_max: int | None = None  # bytes
    pids_max: int | None = None
    disk_max: int | None = None  # bytes of the box's own files (resources/disk.py)

    def over(self, defaults: LimitsConfig) -> LimitsConfig:
        """These limits, with the unset ones taken from `defaults`."""
        return LimitsConfig(*(mine if mine is not None else theirs for mine, theirs in
                              zip(dataclasses.astuple(self), dataclasses.astuple(defaults), strict=True)))

    @classmethod
    def of(cls, tables: dict[str, Any]) -> LimitsConfig:
        """The limit keys of a parsed [box] table, taken out of it."""
        return cls(**{k: tables.pop(k) for k in LIMIT_KEYS if k in tables})


LIMITS = (Key("cpu_weight", v.cpu_weight), Key("memory_max", v.memory_max), Key("pids_max", v.pids_max),
          Key("disk_max", v.disk_max))


@dataclasses.dataclass
class BoxConfig:
    ports: list[str] = dataclasses.field(default_factory=lambda: ["web"])
    # name -> the port the app binds inside every sandboxed box (`ports = { web = 3000 }`); a name
    # without one ([box] ports as a list) binds its leased number inside too.
    canonical: dict[str, int] = dataclasses.field(default_factory=dict)
    network: str = "open"  # open | none: whether the box reaches anything beyond its own loopback
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
    provider: str | None = None  # a postgres provider's name; None = host default
    timeout: float = 600.0  # for `migrate` (a hung migration must not hang `new`)


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
    provider: str | None = None  # a metrics provider's name; None = host default
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
    backing: dict[str, BackingConfig] = dataclasses.field(default_factory=dict)  # config/backing.py
    test: TestConfig = dataclasses.field(default_factory=TestConfig)
    # The exact texts this config was read from (None: no such file), what a box records (recorded.py).
    text: str | None = dataclasses.field(default=None, repr=False, compare=False)
    procfile_text: str | None = dataclasses.field(default=None, repr=False, compare=False)

    @property
    def port_names(self) -> list[str]:
        """Named ports a box leases: the repo's, its backing services', plus `metrics` and `otlp`
        when observability is on."""
        names = list(self.box.ports) + [p for b in self.backing.values() for p in b.port_names]
        if self.observability.enabled:
            names += [n for n in OBSERVABILITY_PORTS if n not in names]
        if self.browser.enabled and "browser" not in names:
            names.append("browser")
        return names


# ---------------------------------------------------------------- the schema

def _recipe_cmd(value: Any) -> str:
    """A recipe's command, run as written (not a template)."""
    if not isinstance(value, str) or not value:
        raise v.expected("a shell command string", value)
    return value


def _recipe_paths(value: Any) -> list[str]:
    what = 'a non-empty list of directories that cmd makes, such as ["vendor/bundle"]'
    paths = v.repo_relatives("directories relative to dir that cmd makes")([] if value is None else value)
    if not paths or "" in paths:
        raise v.expected(what, value)
    return paths


def _extensions(value: Any) -> list[str]:
    names = v.str_list(value)
    if any(not name.strip() for name in names):
        raise v.expected('extension names such as "uuid-ossp"', names)
    return names


def _recipe_dir(value: Any) -> str:
    what = "a directory relative to the repo root"
    path: str = v.typed(str, what)(value)
    return v.repo_relative(what)(path)


BOX = table("box", Key("ports", v.port_names), Key("copy", v.copies), Key("cache_env", v.cache_dirs),
            Key("inherit_env", v.env_names), Key("ttl", v.positive_duration), Key("env", v.env_map()),
            Key("clean_env", v.boolean), Key("network", v.choice("open", "none")), *LIMITS)
SETUP = table("setup", Key("cmd", v.command), Key("timeout", v.positive_duration))
RECIPE = table("recipe", Key("cmd", _recipe_cmd, required=True), Key("paths", _recipe_paths, required=True),
               Key("lock", v.repo_relatives("files relative to dir")), Key("dir", _recipe_dir))
DEPS_KEYS = ("detect", "files", "timeout")
DEPS = table("deps", Key("detect", v.boolean),
             Key("files", v.repo_relatives("lock file paths relative to the repo root")),
             Key("timeout", v.positive_duration),
             NamedTables("deps", "recipe", RECIPE, into="recipes", among_keys=DEPS_KEYS), among_tables=True)


DATABASE = table("database", Key("extensions", _extensions), Key("mode", v.choice("database", "schema", "none")),
                 Key("migrate", v.text("a shell command string")),  # run as written (resources/database.py)
                 Key("migrations", v.str_list), Key("env", v.env_map()),
                 Key("timeout", v.positive_duration), Key("provider", v.choice(*providers.names("postgres"))))
OBSERVABILITY = table("observability", Key("retention", v.retention), Key("enabled", v.boolean),
                      Key("collector", v.choice("builtin", "vector")),
                      Key("provider", v.choice(*providers.names("metrics"))), Key("victorialogs_url", v.url))


POOL = table("pool", Key("size", v.whole("a whole number of boxes (0 for no pool)", 0, 64,
                                         range_what="a whole number of boxes from 0 to 64")),
             Key("restart_on_update", v.boolean))
BROWSER = table("browser", Key("enabled", v.boolean))
SERVICE = table("service", Key("cmd", v.command, required=True), Key("cwd", v.workdir), Key("ready", v.ready),
                Key("depends_on", v.str_list), Key("env", v.env_map()), Key("ready_timeout", v.positive_duration),
                Key("restart", v.choice("on-failure", "always", "no")), Key("metrics", v.url),
                Key("holds_port", v.boolean))
SERVICES = cfgv.Map("services", None, NamedTables("services", "service", SERVICE))  # no keys of its own
REPO = document("wtbox.toml", Table("box", BOX), Table("setup", SETUP), Table("deps", DEPS),
                Table("database", DATABASE), Table("observability", OBSERVABILITY), Table("pool", POOL),
                Table("browser", BROWSER), Table("services", SERVICES), Table("backing", BACKING), Table("test", TEST))


# ---------------------------------------------------------------- reading it

def parse_repo_config(text: str | None, source: str, procfile: str | None = None) -> RepoConfig:
    """Parse the text of a wtbox.toml (None → defaults). `procfile` is the repo's Procfile text, if any."""
    log.debug("repo config: %s%s", source, "" if text is not None else " (none: the defaults)")
    tables = validated(REPO, loads(text, source) if text is not None else {}, source)
    box, deps = tables["box"], tables["deps"]
    if isinstance(box.get("ports"), dict):  # { web = 3000 }: the names, and what each binds inside
        box["canonical"] = box["ports"]
        box["ports"] = list(box["ports"])
    deps["recipes"] = {name: RecipeConfig(name=name, **recipe) for name, recipe in deps["recipes"].items()}
    cfg = RepoConfig(
        source=source, box=BoxConfig(limits=LimitsConfig.of(box), **box), setup=SetupConfig(**tables["setup"]),
        deps=DepsConfig(**deps),
        database=DatabaseConfig(**tables["database"]), observability=ObservabilityConfig(**tables["observability"]),
        pool=PoolConfig(**tables["pool"]), browser=BrowserConfig(**tables["browser"]),
        services={n: ServiceConfig(name=n, **s) for n, s in tables["services"].items()},
        backing=backing_from(source, tables["backing"]), test=TestConfig(**tables["test"]),
        text=text, procfile_text=procfile)
    _check_depends_on(source, cfg.services)
    if not cfg.services and procfile:
        cfg.services = parse_procfile(procfile, cfg.box.ports[0] if cfg.box.ports else None)
        cfg.services_from_procfile = True
    check_names(source, cfg.backing, cfg.box.ports, cfg.services)
    return cfg


def _check_depends_on(source: str, services: dict[str, ServiceConfig]) -> None:
    """Every depends_on names a service, and none depend on each other in a cycle."""
    for svc in services.values():
        for dep in svc.depends_on:
            if dep not in services:
                raise ConfigError(f"{source}: [services.{svc.name}] depends_on names {dep!r}, which is not a service.")
    state: dict[str, int] = {}

    def visit(n: str, path: list[str]) -> None:
        if state.get(n) == 1:
            raise ConfigError(f"{source}: services depend on each other in a cycle: {' -> '.join([*path, n])}.")
        if state.get(n) == 2:
            return
        state[n] = 1
        for d in services[n].depends_on:
            visit(d, [*path, n])
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
        if name and cmd and v.PORT_NAME.match(name):
            env = {"PORT": "{{ ports." + first_port + " }}"} if first_port else {}
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
