"""wtbox.toml's schema (worktreebox/config/repo.py): each table's keys, good values and what they
become, bad values and the exact sentence each one gets. In process, no box is made."""
from __future__ import annotations

import dataclasses

import pytest

from worktreebox import providers
from worktreebox.config import backing, repo
from worktreebox.config.repo import LimitsConfig, RecipeConfig, ServiceConfig, parse_repo_config
from worktreebox.config.schema import Key, NamedTables
from worktreebox.config.values import UNLIMITED
from worktreebox.errors import ConfigError

SRC = "wtbox.toml"
DURATION = "a duration such as '30s', '10m' or '72h'"


def refused(text: str) -> str:
    with pytest.raises(ConfigError) as e:
        parse_repo_config(text, SRC)
    return str(e.value)


# ---------------------------------------------------------------- good values and what they become

@pytest.mark.parametrize(("text", "path", "value"), [
    ("", "box.ports", ["web"]),
    ("", "box.ttl", 72 * 3600.0),
    ("", "database.migrations", repo.DEFAULT_MIGRATION_GLOBS),
    ("", "observability.retention", "2d"),
    ('[box]\nports = ["web", "api"]', "box.ports", ["web", "api"]),
    ("[box]\nports = []", "box.ports", []),
    ('[box]\nttl = "2h"', "box.ttl", 7200.0),
    ("[box]\nttl = 90", "box.ttl", 90.0),
    ('[box]\nttl = "2w"', "box.ttl", 14 * 86400.0),
    ('[box]\ncopy = [".env.example:.env", "a/b"]', "box.copy", [(".env.example", ".env"), ("a/b", "a/b")]),
    ('[box]\nenv = { A = "x", B = 5, C = 1.5, D = "{{ ports.web }}" }', "box.env",
     {"A": "x", "B": "5", "C": "1.5", "D": "{{ ports.web }}"}),
    ('[box]\ncache_env = { npm_config_cache = "npm" }', "box.cache_env", {"npm_config_cache": "npm"}),
    ('[box]\ninherit_env = ["SSH_AUTH_SOCK", "AWS_*"]', "box.inherit_env", ["SSH_AUTH_SOCK", "AWS_*"]),
    ("[box]\nclean_env = true", "box.clean_env", True),
    ("[box]\ncpu_weight = 200", "box.limits", LimitsConfig(cpu_weight=200)),
    ('[box]\nmemory_max = "1.5GiB"', "box.limits", LimitsConfig(memory_max=int(1.5 * (1 << 30)))),
    ('[box]\nmemory_max = "4096k"', "box.limits", LimitsConfig(memory_max=4 << 20)),
    ("[box]\nmemory_max = 8388608", "box.limits", LimitsConfig(memory_max=8 << 20)),
    ('[box]\nmemory_max = "max"\npids_max = "max"', "box.limits",
     LimitsConfig(memory_max=UNLIMITED, pids_max=UNLIMITED)),
    ("[box]\npids_max = 100", "box.limits", LimitsConfig(pids_max=100)),
    ('[setup]\ncmd = "make"\ntimeout = "5m"', "setup", repo.SetupConfig(cmd="make", timeout=300.0)),
    ('[deps]\ndetect = false\nfiles = ["req/prod.txt", "./x.lock"]\ntimeout = 60', "deps",
     repo.DepsConfig(detect=False, files=["req/prod.txt", "x.lock"], timeout=60.0)),
    ('[deps.bundle]\ncmd = "bundle install"\npaths = ["vendor/bundle/", "./b"]\nlock = ["Gemfile.lock"]\ndir = "./sub"',
     "deps.recipes",
     {"bundle": RecipeConfig("bundle", "bundle install", ["vendor/bundle", "b"], ["Gemfile.lock"], "sub")}),
    ('[deps.x]\ncmd = "c"\npaths = ["p"]\ndir = "."', "deps.recipes", {"x": RecipeConfig("x", "c", ["p"])}),
    (('[database]\nmode = "schema"\nextensions = ["uuid-ossp"]\nmigrate = "alembic upgrade head"\n'
      'migrations = ["a/**"]\nenv = { PGX = "{{ db.host }}" }\nprovider = "docker"'), "database",
     repo.DatabaseConfig("schema", ["uuid-ossp"], "alembic upgrade head", ["a/**"], {"PGX": "{{ db.host }}"},
                         "docker")),
    (('[observability]\nenabled = false\ncollector = "vector"\nprovider = "docker"\nretention = "7d"\n'
      'victorialogs_url = "http://127.0.0.1:9428/"'), "observability",
     repo.ObservabilityConfig(False, "vector", "docker", "7d", "http://127.0.0.1:9428/")),
    ("[pool]\nsize = 3\nrestart_on_update = true", "pool", repo.PoolConfig(3, True)),
    ("[browser]\nenabled = true", "browser", repo.BrowserConfig(True)),
    (('[services.web]\ncmd = "run {{ ports.web }}"\ncwd = "app"\nenv = { X = "1" }\nready = "tcp:8000"\n'
      'ready_timeout = "2m"\nrestart = "always"\nmetrics = "http://127.0.0.1:{{ ports.web }}/m"\nholds_port = false'),
     "services.web", ServiceConfig("web", "run {{ ports.web }}", "app", {"X": "1"}, "tcp:8000", 120.0, "always", [],
                                   "http://127.0.0.1:{{ ports.web }}/m", False)),
    ('[services.web]\ncmd = "x"\ncwd = "{{ box.path }}/x"\nready = "https://h:443/x"', "services.web",
     ServiceConfig("web", "x", "{{ box.path }}/x", ready="https://h:443/x")),
    ('[services.web]\ncmd = "x"\nready = "pg_isready"', "services.web.ready", "pg_isready"),
    ('[services.web]\ncmd = "x"\nready = "tcp:localhost:80"', "services.web.ready", "tcp:localhost:80"),
])
def test_good_values(text, path, value):
    got = parse_repo_config(text, SRC)
    for part in path.split("."):
        got = got[part] if isinstance(got, dict) else getattr(got, part)
    assert got == value


def test_services_depend_on_each_other_in_order():
    cfg = parse_repo_config('[services.web]\ncmd = "w"\ndepends_on = ["db"]\n[services.db]\ncmd = "d"\n', SRC)
    assert [s.name for s in repo.services_in_order(cfg.services)] == ["db", "web"]


@pytest.mark.parametrize(("text", "procfile", "services"), [
    ("", "web: gunicorn app\nworker: celery -A x\n# c\nBad Name: y\n\nnocolon\n",
     {"web": ServiceConfig("web", "gunicorn app", env={"PORT": "{{ ports.web }}"}),
      "worker": ServiceConfig("worker", "celery -A x", env={"PORT": "{{ ports.web }}"}),
      "bad_name": ServiceConfig("bad_name", "y", env={"PORT": "{{ ports.web }}"})}),
    ("[box]\nports = []", "web: y", {"web": ServiceConfig("web", "y")}),
    ('[services.a]\ncmd = "x"', "web: y", {"a": ServiceConfig("a", "x")}),
])
def test_procfile_when_there_are_no_services(text, procfile, services):
    cfg = parse_repo_config(text, SRC, procfile=procfile)
    assert cfg.services == services
    assert cfg.services_from_procfile == ("[services" not in text)


# ---------------------------------------------------------------- bad values: the exact sentence

BOX_KEYS = ("cache_env, clean_env, copy, cpu_weight, disk_max, env, inherit_env, memory_max, network, pids_max, "
            "ports, ttl")


@pytest.mark.parametrize(("text", "sentence"), [
    # the file and its tables
    ("[boxes]", ("unknown section [boxes]; known sections: backing, box, browser, database, deps, observability, "
                 "pool, services, setup, test.")),
    ("box = 5", "[box] must be a table, got 5."),
    ('[[services]]\ncmd = "x"', "[services] must be a table, got [{'cmd': 'x'}]."),
    ("[box]\nport = 1", f"[box] has an unknown key 'port'; known keys: {BOX_KEYS}."),
    ("[box]\nzz = 1\naa = 2", f"[box] has an unknown key 'zz'; known keys: {BOX_KEYS}."),
    ('[box]\nttl = "x"\nzz = 1', f"[box] has an unknown key 'zz'; known keys: {BOX_KEYS}."),  # unknown keys first
    ('[setup]\ncmd = 5\n[box]\nttl = "x"', f"[box] ttl: expected {DURATION}, got 'x'."),  # tables in order
    # [box]
    ("[box]\nports = 5", "[box] ports: expected a list of strings, got 5."),
    ("[box]\nports = [1]", "[box] ports: expected a list of strings without control characters, got [1]."),
    ('[box]\nports = ["Web"]', "[box] ports: expected unique lowercase names such as \"web\" or \"api\", got 'Web'."),
    ('[box]\nports = ["web", "web"]', ("[box] ports: expected unique lowercase names such as \"web\" or \"api\", "
                                       "got 'web'.")),
    ("[box]\nports = [" + ", ".join(f'"p{i}"' for i in range(65)) + "]",
     "[box] ports: expected at most 64 names, got '65 names'."),
    ("[box]\nttl = -1", f"[box] ttl: expected {DURATION}, more than 0 and at most ten years, got -1."),
    ('[box]\nttl = "0s"', f"[box] ttl: expected {DURATION}, more than 0 and at most ten years, got '0s'."),
    ("[box]\nttl = nan", f"[box] ttl: expected {DURATION}, more than 0 and at most ten years, got nan."),
    ('[box]\nttl = "forever"', f"[box] ttl: expected {DURATION}, got 'forever'."),
    ("[box]\nttl = true", f"[box] ttl: expected {DURATION}, got True."),
    ('[box]\ncopy = "a:b"', "[box] copy: expected a list of strings, got 'a:b'."),
    ('[box]\ncopy = ["/etc/passwd:x"]', ("[box] copy: expected relative paths inside the repo such as "
                                         "\".env.example:.env\", got '/etc/passwd'.")),
    ('[box]\ncopy = ["README.md:../../b"]', ("[box] copy: expected relative paths inside the repo such as "
                                             "\".env.example:.env\", got '../../b'.")),
    ('[box]\ncopy = ["README.md:.git/config"]', ("[box] copy: expected relative paths inside the repo such as "
                                                 "\".env.example:.env\" outside .git, got 'README.md:.git/config'.")),
    ('[box]\nenv = "X=1"', "[box] env: expected a table of NAME = \"value\", got 'X=1'."),
    ('[box]\nenv = { "1X" = "a" }', "[box] env.1X: expected an environment variable name, got '1X'."),
    ("[box]\nenv = { X = true }", "[box] env.X: expected a string, got True."),
    ('[box]\nenv = { X = "a\\u0000b" }', "[box] env.X: expected a string without NUL characters, got 'a\\x00b'."),
    ('[box]\nenv = { X = "{% endfor %}" }', ("[box] env.X: bad template '{% endfor %}': Encountered unknown tag "
                                             "'endfor'..")),
    ('[box]\ncache_env = { X = "/abs" }', ("[box] cache_env.X: expected a relative directory name inside the box "
                                           "cache, got '/abs'.")),
    ('[box]\ncache_env = { "9" = "x" }', "[box] cache_env.9: expected an environment variable name, got '9'."),
    ('[box]\ninherit_env = ["A*B"]', ("[box] inherit_env: expected variable names, or prefixes ending in '*' such "
                                      "as \"AWS_*\", got 'A*B'.")),
    ('[box]\ninherit_env = ["MY_TOKEN"]', ("[box] inherit_env: expected names of variables that are not secrets "
                                           "(pass those with --secret), got 'MY_TOKEN'.")),
    ('[box]\nclean_env = "yes"', "[box] clean_env: expected true or false, got 'yes'."),
    ("[box]\ncpu_weight = 0", ("[box] cpu_weight: expected a whole number from 1 to 10000 (100 is every box's "
                               "share), got 0.")),
    ('[box]\nmemory_max = "lots"', ("[box] memory_max: expected a size such as \"512M\" or \"2G\", or \"max\", "
                                    "got 'lots'.")),
    ('[box]\nmemory_max = "1M"', ("[box] memory_max: expected at least \"4M\" (a box needs some memory to start), "
                                  "got '1M'.")),
    ("[box]\npids_max = 0", "[box] pids_max: expected a whole number of processes above 0, or \"max\", got 0."),
    # [setup]
    ("[setup]\ncmd = 5", "[setup] cmd: expected a shell command string, got 5."),
    ('[setup]\ncmd = "   "', "[setup] cmd: expected a shell command string, got '   '."),
    ('[setup]\ncmd = "a\\u0000b"', ("[setup] cmd: expected a shell command string without control characters, "
                                    "got 'a\\x00b'.")),
    ('[setup]\ncmd = "{{ box.id "', ("[setup] cmd: bad template '{{ box.id ': unexpected end of template, expected "
                                     "'end of print statement'..")),
    ('[setup]\ntimeout = "never"', f"[setup] timeout: expected {DURATION}, got 'never'."),
    ("[setup]\nfoo = 1", "[setup] has an unknown key 'foo'; known keys: cmd, timeout."),
    # [deps] and [deps.<name>]
    ("deps = [1]", "[deps] must be a table, got [1]."),
    ("[deps]\nfoo = 1", "[deps] has an unknown key 'foo'; known keys: detect, files, timeout."),
    ('[deps]\ndetect = "no"', "[deps] detect: expected true or false, got 'no'."),
    ('[deps]\nfiles = ["/abs"]', "[deps] files: expected lock file paths relative to the repo root, got '/abs'."),
    ("[deps]\nfiles = {}", "[deps] files: expected a list of strings, got {}."),
    ('[deps.Bad]\ncmd = "c"\npaths = ["p"]', "[deps.'Bad']: recipe names are lowercase letters, digits and '_'."),
    ('[deps.x]\npaths = ["p"]', "[deps.x] cmd: expected a shell command string, got None."),
    ('[deps.x]\ncmd = "c"', ("[deps.x] paths: expected a non-empty list of directories that cmd makes, such as "
                             "[\"vendor/bundle\"], got None.")),
    ('[deps.x]\ncmd = "c"\npaths = ["."]', ("[deps.x] paths: expected a non-empty list of directories that cmd "
                                            "makes, such as [\"vendor/bundle\"], got ['.'].")),
    ('[deps.x]\ncmd = "c"\npaths = ["/a"]', ("[deps.x] paths: expected directories relative to dir that cmd makes, "
                                             "got '/a'.")),
    ('[deps.x]\ncmd = "c"\npaths = ["p"]\nlock = ["../l"]', ("[deps.x] lock: expected files relative to dir, "
                                                             "got '../l'.")),
    ('[deps.x]\ncmd = "c"\npaths = ["p"]\ndir = 5', ("[deps.x] dir: expected a directory relative to the repo root, "
                                                     "got 5.")),
    ('[deps.x]\ncmd = "c"\npaths = ["p"]\nfoo = 1', ("[deps.x] has an unknown key 'foo'; known keys: cmd, dir, "
                                                     "lock, paths.")),
    # [database]
    ('[database]\nmode = "schemas"', "[database] mode: expected one of 'database', 'schema', 'none', got 'schemas'."),
    ("[database]\nmode = 5", "[database] mode: expected one of database, schema, none, got 5."),
    ('[database]\nextensions = [""]', ("[database] extensions: expected extension names such as \"uuid-ossp\", "
                                       "got [''].")),
    ("[database]\nmigrate = []", "[database] migrate: expected a shell command string, got []."),
    ("[database]\nmigrations = [5]", ("[database] migrations: expected a list of strings without control characters, "
                                      "got [5].")),
    ('[database]\nprovider = "mysql"', ("[database] provider: expected one of 'embedded', 'external', 'docker', "
                                        "got 'mysql'.")),
    ("[database]\nurl = 1", ("[database] has an unknown key 'url'; known keys: env, extensions, migrate, migrations, "
                             "mode, provider, timeout.")),
    # [observability]
    ('[observability]\nenabled = "yes"', "[observability] enabled: expected true or false, got 'yes'."),
    ('[observability]\ncollector = "fluentd"', ("[observability] collector: expected one of 'builtin', 'vector', "
                                                "got 'fluentd'.")),
    ("[observability]\nprovider = false", "[observability] provider: expected one of native, docker, got False."),
    ("[observability]\nretention = 5", "[observability] retention: expected a retention such as \"2d\", got 5."),
    ('[observability]\nretention = "-1d"', f"[observability] retention: expected {DURATION}, got '-1d'."),
    ('[observability]\nvictorialogs_url = "ftp://x"', ("[observability] victorialogs_url: expected an http:// or "
                                                       "https:// URL such as 'http://127.0.0.1:8000/', got 'ftp://x'.")),
    # [pool], [browser]
    ("[pool]\nsize = -1", "[pool] size: expected a whole number of boxes from 0 to 64, got -1."),
    ('[pool]\nsize = "3"', "[pool] size: expected a whole number of boxes (0 for no pool), got '3'."),
    ("[pool]\nrestart_on_update = 1", "[pool] restart_on_update: expected true or false, got 1."),
    ('[browser]\nenabled = "yes"', "[browser] enabled: expected true or false, got 'yes'."),
    ("[browser]\nheadless = true", "[browser] has an unknown key 'headless'; known keys: enabled."),
    # [services.<name>]
    ('[services.Web]\ncmd = "x"', "[services.'Web']: service names are lowercase letters, digits and '_'."),
    ("[services]\nweb = 5", "[services.web] must be a table with at least cmd = \"...\"."),
    ('[services.web]\nready = "tcp:1"', "[services.web] cmd: expected a shell command string, got None."),
    ('[services.web]\ncmd = "x"\ncommand = 1',
     ("[services.web] has an unknown key 'command'; known keys: cmd, cwd, depends_on, env, holds_port, metrics, "
      "ready, ready_timeout, restart.")),
    ('[services.web]\ncmd = "x"\ncwd = "/tmp"', ("[services.web] cwd: expected a directory relative to the worktree, "
                                                 "got '/tmp'.")),
    ('[services.web]\ncmd = "x"\ncwd = "a\\u0007"', ("[services.web] cwd: expected a directory relative to the "
                                                     "worktree without control characters, got 'a\\x07'.")),
    ('[services.web]\ncmd = "x"\nready = "tcp:99999"', ("[services.web] ready: expected tcp:PORT or tcp:HOST:PORT "
                                                        "with a port from 1 to 65535, got 'tcp:99999'.")),
    ('[services.web]\ncmd = "x"\nready = "http://"', ("[services.web] ready: expected an http:// or https:// URL "
                                                      "such as 'http://127.0.0.1:8000/', got 'http://'.")),
    ('[services.web]\ncmd = "x"\nready_timeout = 0', (f"[services.web] ready_timeout: expected {DURATION}, more than "
                                                      "0 and at most ten years, got 0.")),
    ('[services.web]\ncmd = "x"\nrestart = "ALWAYS"', ("[services.web] restart: expected one of 'on-failure', "
                                                       "'always', 'no', got 'ALWAYS'.")),
    ('[services.web]\ncmd = "x"\ndepends_on = "db"', ("[services.web] depends_on: expected a list of strings, "
                                                      "got 'db'.")),
    ('[services.web]\ncmd = "x"\nmetrics = "nope"', ("[services.web] metrics: expected an http:// or https:// URL "
                                                     "such as 'http://127.0.0.1:8000/', got 'nope'.")),
    ('[services.web]\ncmd = "x"\nholds_port = "no"', "[services.web] holds_port: expected true or false, got 'no'."),
    ('[services.web]\ncmd = "x"\nenv = []', "[services.web] env: expected a table of NAME = \"value\", got []."),
    ('[services.web]\ncmd = "x"\ndepends_on = ["nope"]', ("[services.web] depends_on names 'nope', which is not a "
                                                           "service.")),
    ('[services.a]\ncmd = "x"\ndepends_on = ["b"]\n[services.b]\ncmd = "x"\ndepends_on = ["a"]',
     "services depend on each other in a cycle: a -> b -> a."),
    ('[services.web]\ncmd = "x"\ndepends_on = ["web"]', "services depend on each other in a cycle: web -> web."),
    # not TOML at all
    ("[box\nports = [", "is not valid TOML: Expected ']' at the end of a table declaration (at line 1, column 5)."),
    ("[box]\nttl = " + "9" * 5000, ("is not valid TOML: Exceeds the limit (4300 digits) for integer string "
                                    "conversion: value has 5000 digits.")),
])
def test_bad_values_get_one_exact_sentence(text, sentence):
    msg = refused(text)
    assert msg == f"{SRC}: {sentence}" or msg == f"{SRC} {sentence}"


@pytest.mark.parametrize(("section", "name"), [
    *(("database", name) for name in providers.names("postgres")),
    *(("observability", name) for name in providers.names("metrics")),
])
def test_provider_names_come_from_the_providers_table(section, name):
    """A provider added to the table is a value [database] and [observability] take, with no other edit."""
    assert repo.DATABASE.items[-1].key == "provider"
    cfg = parse_repo_config(f'[{section}]\nprovider = "{name}"', SRC)
    assert getattr(cfg, section).provider == name


# ---------------------------------------------------------------- the schema and the dataclasses agree

def _keys(schema) -> set[str]:
    return {item.key for item in schema.items if isinstance(item, Key)}


@pytest.mark.parametrize(("cls", "schema", "not_keys"), [
    (repo.BoxConfig, repo.BOX, {"limits", "canonical"}),  # canonical: [box] ports given as a table
    (repo.SetupConfig, repo.SETUP, set()),
    (repo.DepsConfig, repo.DEPS, {"recipes"}),
    (repo.RecipeConfig, repo.RECIPE, {"name"}),
    (repo.DatabaseConfig, repo.DATABASE, set()),
    (repo.ObservabilityConfig, repo.OBSERVABILITY, set()),
    (repo.PoolConfig, repo.POOL, set()),
    (repo.BrowserConfig, repo.BROWSER, set()),
    (repo.ServiceConfig, repo.SERVICE, {"name"}),
    (backing.BackingConfig, backing.SERVICE, {"name"}),
    (backing.TestConfig, backing.TEST, set()),
])
def test_every_field_is_a_key_and_every_key_a_field(cls, schema, not_keys):
    fields = {f.name for f in dataclasses.fields(cls)} - not_keys
    if cls is repo.BoxConfig:
        fields |= set(repo.LIMIT_KEYS)
    assert _keys(schema) == fields


def test_the_document_names_every_table():
    tables = {item.key for item in repo.REPO.items if hasattr(item, "schema")}
    not_tables = {"source", "services_from_procfile", "text", "procfile_text"}
    assert tables == {f.name for f in dataclasses.fields(repo.RepoConfig)} - not_tables
    assert any(isinstance(item, NamedTables) for item in repo.SERVICES.items)
