"""What a config value may be: durations, sizes, names, paths, URLs, images, port ranges.

Each parser takes a value as TOML (or the environment) gives it and returns what wtbox uses,
or raises `Invalid` saying what was expected and what came. The schemas (schema.py) put the
file, table and key in front; `at(where)` does the same for a command-line flag or a variable.
"""
from __future__ import annotations

import contextlib
import math
import os
import posixpath
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import cfgv

from worktreebox.errors import ConfigError

Parser = Callable[[Any], Any]

PORT_NAME = re.compile(r"^[a-z][a-z0-9_]{0,30}$")  # also the names of services and dependency recipes
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_ENV_PATTERN = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*\*?$")
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|[smhdw]?)\s*$")
_UNITS = {"": 1, "ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b?)\s*$", re.I)
_SIZE_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
# Longer than any box should live; beyond it timers overflow (threading waits, poll timeouts).
MAX_DURATION = 10 * 365 * 86400.0
MAX_PORTS = 64
# Characters no path, name or URL may hold: NUL ends a C string, the others hide in a terminal.
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
UNLIMITED = 0  # a limit said to be "max"
MIN_MEMORY = 4 << 20
MIN_DISK = 16 << 20
MAX_MEMORY = (1 << 63) - (1 << 16)  # the largest limit a cgroup holds (LONG_MAX in pages, any page size)


class Invalid(cfgv.ValidationError):  # type: ignore[misc]  # cfgv ships no types
    """A value that is not what its key takes. The complaint follows the place, after `sep`:
    "<file>: [table] key: expected ..., got ..."; `part` names the entry of a table at fault."""

    def __init__(self, complaint: str, *, part: str | None = None, sep: str = ": ") -> None:
        super().__init__(complaint)
        self.part, self.sep = part, sep


def expected(what: str, got: Any, *, part: str | None = None) -> Invalid:
    return Invalid(f"expected {what}, got {got!r}", part=part)


@contextlib.contextmanager
def at(where: str) -> Iterator[None]:
    """An Invalid inside becomes a ConfigError naming `where` (a file and key, a flag, a variable)."""
    try:
        yield
    except Invalid as e:
        part = f".{e.part}" if e.part is not None else ""
        raise ConfigError(f"{where}{part}{e.sep}{e.error_msg}.") from None


def _is(value: Any, kind: type | tuple[type, ...]) -> bool:
    """isinstance, where true and false are not numbers unless `kind` says bool."""
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return isinstance(value, kinds) and (bool in kinds or not isinstance(value, bool))


# ---------------------------------------------------------------- plain values

def typed(kind: type | tuple[type, ...], what: str) -> Parser:
    def parse(value: Any) -> Any:
        if not _is(value, kind):
            raise expected(what, value)
        return value

    return parse


boolean = typed(bool, "true or false")


def whole(what: str, low: int | None = None, high: int | None = None, *,
          range_what: str | None = None) -> Callable[[Any], int]:
    """A whole number (from `low` to `high`); `range_what` says the range when it is out of it."""
    def parse(value: Any) -> int:
        if not _is(value, int):
            raise expected(what, value)
        if (low is not None and value < low) or (high is not None and value > high):
            raise expected(range_what or what, value)
        return int(value)

    return parse


def above_zero(what: str) -> Callable[[Any], float]:
    """A finite number above 0, as a float (a load average)."""
    def parse(value: Any) -> float:
        if not _is(value, (int, float)) or not 0 < value < math.inf:
            raise expected(what, value)
        return float(value)

    return parse


def choice(*choices: str) -> Callable[[Any], str]:
    def parse(value: Any) -> str:
        if not _is(value, str):
            raise expected("one of " + ", ".join(choices), value)
        if value not in choices:
            raise expected("one of " + ", ".join(repr(c) for c in choices), value)
        return str(value)

    return parse


def text(what: str, *, template: bool = False, control: bool = True) -> Callable[[Any], str]:
    """A string without NUL (and, unless `control`, without any control character); with
    `template`, a Jinja2 template that compiles."""
    def parse(value: Any) -> str:
        if not _is(value, str):
            raise expected(what, value)
        if "\0" in value or (not control and _CONTROL.search(value)):
            raise expected(what + " without control characters", value)
        if template:
            compiles(value)
        return str(value)

    return parse


def compiles(template: str) -> str:
    from worktreebox.config.templating import compile_error

    problem = compile_error(template)
    if problem:
        raise Invalid(problem)
    return template


def is_template(text: str) -> bool:
    return "{{" in text or "{%" in text


def command(value: Any) -> str:
    """A shell command: not blank, no NUL, a Jinja2 template that compiles."""
    cmd = text("a shell command string", template=True)(value)
    if not cmd.strip():
        raise expected("a shell command string", value)
    return cmd


def str_list(value: Any) -> list[str]:
    if not _is(value, list):
        raise expected("a list of strings", value)
    if not all(isinstance(v, str) and not _CONTROL.search(v) for v in value):
        raise expected("a list of strings without control characters", value)
    return list(value)


def env_map(*, template: bool = True) -> Callable[[Any], dict[str, str]]:
    """A table of NAME = "value" (numbers become strings); with `template`, values that compile."""
    def parse(value: Any) -> dict[str, str]:
        if not _is(value, dict):
            raise expected('a table of NAME = "value"', value)
        return {name: _env_value(name, v, template) for name, v in value.items()}

    return parse


def _env_value(name: str, value: Any, template: bool) -> str:
    if not _ENV_NAME.match(name):
        raise expected("an environment variable name", name, part=name)
    if not _is(value, (str, int, float)):
        raise expected("a string", value, part=name)
    if isinstance(value, str) and "\0" in value:
        raise expected("a string without NUL characters", value, part=name)
    if isinstance(value, str) and template:
        try:
            compiles(value)
        except Invalid as e:
            raise Invalid(e.error_msg, part=name) from None
    return str(value)


def env_names(value: Any) -> list[str]:
    """Variables (or PREFIX_*) a box inherits: never one that looks like a secret."""
    from worktreebox.secrets import looks_secret

    names = str_list(value)
    for name in names:
        if not _ENV_PATTERN.match(name):
            raise expected("variable names, or prefixes ending in '*' such as \"AWS_*\"", name)
        if looks_secret(name):
            raise expected("names of variables that are not secrets (pass those with --secret)", name)
    return names


# ---------------------------------------------------------------- durations and sizes

def duration(value: Any, *, positive: bool = False) -> float:
    """'90s', '10m', '72h', '2d' or a number of seconds → seconds (finite, 0 up to ten years;
    above 0 when `positive`)."""
    what = "a duration such as '30s', '10m' or '72h'"
    if not _is(value, (str, int, float)):
        raise expected(what, value)
    if isinstance(value, (int, float)):
        seconds = float(value) if math.isfinite(value) and abs(value) <= MAX_DURATION * 2 else math.inf
    else:
        m = _DURATION.match(value)
        if not m:
            raise expected(what, value)
        seconds = float(m.group(1)) * _UNITS[m.group(2)]
    if not (0 <= seconds <= MAX_DURATION) or (positive and seconds == 0):
        low = "more than 0" if positive else "0 or more"
        raise expected(f"{what}, {low} and at most ten years", value)
    return seconds


def positive_duration(value: Any) -> float:
    return duration(value, positive=True)


def parse_duration(value: str | int | float, *, where: str = "duration", positive: bool = False) -> float:
    """duration() for a flag or a variable: a ConfigError naming `where`."""
    with at(where):
        return duration(value, positive=positive)


def share(value: Any) -> float:
    """'5%', '0.05' or 5 (percent when above 1) -> a share from 0 up to (not including) 1."""
    what = "a share of traffic such as '5%' or 0.05, below 100%"
    text = str(value).strip()
    try:
        number = float(text.removesuffix("%"))
    except ValueError:
        raise expected(what, value) from None
    got = number / 100 if text.endswith("%") or number > 1 else number
    if not (math.isfinite(got) and 0 <= got < 1):
        raise expected(what, value)
    return got


def retention(value: Any) -> str:
    """How long a metrics store keeps data, as VictoriaMetrics reads it ("2d"): kept as written."""
    kept = text('a retention such as "2d"', control=False)(value)
    positive_duration(kept)
    return kept


def size(value: Any) -> int:
    """A memory size: bytes as a number, or "512M", "2G", "1.5GiB"; "max" = UNLIMITED."""
    if _is(value, int) and value > 0:
        return int(value)
    if isinstance(value, str) and value.strip().lower() == "max":
        return UNLIMITED
    m = _SIZE.match(value) if isinstance(value, str) else None
    if not m or (m.group(3) and not m.group(2)) or float(m.group(1)) <= 0:
        raise expected('a size such as "512M" or "2G", or "max"', value)
    return int(float(m.group(1)) * _SIZE_UNITS[m.group(2).lower()])


# ---------------------------------------------------------------- limits ([box] in either file)

cpu_weight = whole("a whole number from 1 to 10000 (100 is every box's share)", 1, 10000)


def memory_max(value: Any) -> int:
    memory = size(value)
    if memory != UNLIMITED and memory < MIN_MEMORY:
        raise expected('at least "4M" (a box needs some memory to start)', value)
    if memory > MAX_MEMORY:  # the kernel would take it as no limit at all
        raise expected('a size below 8 exabytes, the most a cgroup can hold ("max" for no limit)', value)
    return memory


def disk_max(value: Any) -> int:
    disk = size(value)
    if disk != UNLIMITED and disk < MIN_DISK:
        raise expected('at least "16M" (a box\'s own files need some room)', value)
    if disk > MAX_MEMORY:
        raise expected('a size below 8 exabytes ("max" for no limit)', value)
    return disk


def pids_max(value: Any) -> int:
    if isinstance(value, str) and value.strip().lower() == "max":
        return UNLIMITED
    if not _is(value, int) or value < 1:
        raise expected('a whole number of processes above 0, or "max"', value)
    return int(value)


# ---------------------------------------------------------------- names and paths

def port_names(value: Any) -> list[str] | dict[str, int]:
    """[box] ports: a list of names (each box uses its leased number inside too), or a table of
    name = the port the app binds inside every box (reached at a leased port outside)."""
    if _is(value, dict):
        return canonical_ports(value)
    names = str_list(value)
    seen: set[str] = set()
    for name in names:
        if not PORT_NAME.match(name) or name in seen:
            raise expected('unique lowercase names such as "web" or "api"', name)
        seen.add(name)
    if len(names) > MAX_PORTS:
        raise expected(f"at most {MAX_PORTS} names", f"{len(names)} names")
    return names


# Where a sandboxed box finds its own helpers inside (their well-known ports): taken for them.
INSIDE_PORTS = {"database": 5432, "metrics": 8428, "otlp": 4318, "browser": 9222}
RESERVED_PORTS = {5432: "the box's database", 8428: "its metrics store", 4318: "its OTLP endpoint",
                  9222: "its browser's DevTools"}


def canonical_ports(value: dict[str, Any]) -> dict[str, int]:
    what = 'a table of name = port such as { web = 3000 } (ports 1 to 65535, each once)'
    if len(value) > MAX_PORTS:
        raise expected(f"at most {MAX_PORTS} names", f"{len(value)} names")
    taken: dict[int, str] = {}
    for name, port in value.items():
        if not PORT_NAME.match(name):
            raise expected('lowercase names such as "web" or "api"', name)
        if not _is(port, int) or not 1 <= port <= 65535 or port in taken:
            raise expected(what, port, part=name)
        if port in RESERVED_PORTS:
            raise expected(f"a port other than {port}, which is {RESERVED_PORTS[port]} inside a box", port, part=name)
        taken[port] = name
    return {name: int(port) for name, port in value.items()}


def inside(what: str, rel: str) -> str:
    """A relative path that stays inside its root when read as written (no '..' out, not absolute,
    no control characters); `path_inside` checks the same again after symlinks, at use."""
    norm = posixpath.normpath(rel) if rel else ""
    if not rel or _CONTROL.search(rel) or rel.startswith(("/", "~")) or norm == ".." or norm.startswith("../"):
        raise expected(what, rel)
    return rel


def copies(value: Any) -> list[tuple[str, str]]:
    """[box] copy: "SRC[:DST]" pairs of paths inside the repo, never into .git."""
    what = 'relative paths inside the repo such as ".env.example:.env"'
    out = []
    for item in str_list(value):
        src, _, dst = item.partition(":")
        dst = dst or src
        for part in (src, dst):
            inside(what, part)
        if ".git" in Path(dst).parts:
            raise expected(what + " outside .git", item)
        out.append((src, dst))
    return out


def cache_dirs(value: Any) -> dict[str, str]:
    """[box] cache_env: variables pointed into the box's cache dir, e.g. {"npm_config_cache": "npm"}."""
    dirs = env_map(template=False)(value)
    for name, rel in dirs.items():
        try:
            inside("a relative directory name inside the box cache", rel)
        except Invalid as e:
            raise Invalid(e.error_msg, part=name) from None
    return dirs


def workdir(value: Any) -> str:
    """A service's cwd: inside the worktree as written (templates are checked when rendered)."""
    what = "a directory relative to the worktree"
    cwd = text(what, template=True, control=False)(value)
    return cwd if is_template(cwd) else inside(what, cwd)


def repo_relative(what: str) -> Callable[[str], str]:
    """A path under a repo directory, normalised: no leading or trailing '/', no './', '.' → ''."""
    def parse(value: str) -> str:
        if value.startswith("/") or ".." in Path(value).parts:
            raise expected(what, value)
        return value.strip("/").removeprefix("./") if value not in (".", "./") else ""

    return parse


def repo_relatives(what: str) -> Callable[[Any], list[str]]:
    one = repo_relative(what)
    return lambda value: [one(v) for v in str_list(value)]


def path_inside(root: Path, rel: str | Path, where: str) -> Path:
    """root / rel with symlinks resolved; a ConfigError naming `where` unless it lies inside root."""
    text_ = str(rel)
    if not text_ or _CONTROL.search(text_):
        raise ConfigError(f"{where}: expected a path inside {root}, got {text_!r}.")
    real_root = Path(os.path.realpath(root))
    target = Path(os.path.realpath(root / rel))
    if target != real_root and real_root not in target.parents:
        raise ConfigError(f"{where}: {text_!r} leads outside {root} (to {target}); keep it inside.")
    return target


# ---------------------------------------------------------------- URLs, readiness, images, ports

def url(value: Any) -> str:
    """An http(s) URL with a host and a valid port, without spaces or control characters."""
    from urllib.parse import urlsplit

    what = "an http:// or https:// URL"
    link = text(what, template=True)(value)
    if is_template(link):
        return link
    try:
        u = urlsplit(link)
        ok = u.scheme in ("http", "https") and bool(u.hostname) and (u.port is None or 1 <= u.port <= 65535)
    except ValueError:
        ok = False
    if not ok or _CONTROL.search(link) or any(c.isspace() for c in link):
        raise expected(f"{what} such as 'http://127.0.0.1:8000/'", link)
    return link


def ready(value: Any) -> str:
    """A readiness check judged as far as it can be without running it: tcp:[HOST:]PORT, an
    http(s) URL, or a shell command."""
    check = text("an http:// URL, tcp:PORT or a shell command", template=True)(value)
    if is_template(check):
        return check
    if check.startswith("tcp:"):
        host, _, port = check[4:].rpartition(":")
        if not (port.isdigit() and 1 <= int(port) <= 65535) or any(c.isspace() for c in host):
            raise expected("tcp:PORT or tcp:HOST:PORT with a port from 1 to 65535", check)
    elif check.startswith(("http://", "https://")):
        url(check)
    return check


def check_ready(check: str, where: str) -> None:
    with at(where):
        ready(check)


def postgres_url(value: Any) -> str:
    """A postgresql:// (or postgres://) URL without spaces or control characters; never shown back
    (it holds a password)."""
    link: str = typed(str, "a postgresql:// URL")(value)
    if not re.match(r"^postgres(ql)?://\S+$", link) or _CONTROL.search(link):
        raise Invalid("expected a postgresql://USER:PASSWORD@HOST:PORT/DB URL, got a value that is not one")
    return link


def image(value: Any) -> str:
    """A container image reference: one word of printable characters."""
    ref: str = typed(str, "an image name")(value)
    if not ref or _CONTROL.search(ref) or any(c.isspace() for c in ref):
        raise Invalid(f"expected an image name such as 'postgres:15', got {ref!r}")
    return ref


def port_range(value: Any) -> tuple[int, int]:
    text_: str = typed(str, 'a range such as "20000-29999"')(value)
    m = re.match(r"^\s*([0-9]{1,6})\s*-\s*([0-9]{1,6})\s*$", text_)
    if not m:
        raise Invalid(f"expected a range such as '20000-29999', got {text_!r}")
    low, high = int(m.group(1)), int(m.group(2))
    if not (1024 <= low < high <= 65535):
        raise Invalid(f"the range {text_!r} must lie between 1024 and 65535, low to high")
    return low, high


def ip_address(value: Any) -> str:
    """An IP address to listen on, as the kernel reads it ("0.0.0.0", "127.0.0.1", "::")."""
    import ipaddress

    what = 'an IP address such as "127.0.0.1" or "0.0.0.0"'
    text_: str = typed(str, what)(value)
    try:
        return str(ipaddress.ip_address(text_))
    except ValueError:
        raise expected(what, text_) from None
