"""Every WTBOX_* environment variable wtbox reads, declared once with its meaning and default.

Read when asked, never at import: a CLI server imports the package once and forks a child per
command, each with its caller's environment (a value read at import would be the server's,
frozen). `python -m worktreebox.settings` prints the table the README carries (a test checks it).

Standard library `os` only: the `wtbox` launcher resolves the home with it before deciding
whether a CLI server answers, so importing it must cost nothing.
"""
from __future__ import annotations

import math
import os

_OFF = ("0", "off", "no", "false")


class Setting:
    """One environment variable: its name, what it does, and its default as the README states it."""

    __slots__ = ("default", "meaning", "name")

    def __init__(self, name: str, meaning: str, default: str = "no effect") -> None:
        self.name, self.meaning, self.default = name, meaning, default

    def value(self) -> str | None:
        """The value now; None when unset or empty (an empty variable counts as unset)."""
        return os.environ.get(self.name) or None

    def on(self) -> bool:
        """A switch: set to anything but 0, off, no or false."""
        return (self.value() or "0").lower() not in _OFF

    def off(self) -> bool:
        """A switch that is on unless set to 0, off, no or false."""
        return (self.value() or "on").lower() in _OFF

    def seconds(self) -> float:
        """A number of seconds, 0 or more; the default when unset or not such a number (a tuning
        knob never stops a command)."""
        try:
            seconds = float(self.value() or self.default)
        except ValueError:
            return float(self.default)
        return seconds if 0 <= seconds < math.inf else float(self.default)


# ---------------------------------------------------------------- where and how wtbox runs
HOME = Setting("WTBOX_HOME", "the wtbox home: registry, boxes, shared layers, logs, `config.toml`",
               "`$XDG_STATE_HOME/wtbox`, else `~/.local/state/wtbox`")
LEASE_DIR = Setting("WTBOX_LEASE_DIR", "where host-wide port claims live (see \"Port leases\")",
                    "`/var/lib/wtbox/leases`, else `$XDG_STATE_HOME/wtbox-leases`")
NO_SERVER = Setting("WTBOX_NO_SERVER", "`1`: every command runs in its own process, no CLI server",
                    "served commands go through this home's CLI server")
SERVER_IDLE = Setting("WTBOX_SERVER_IDLE", "seconds without a command after which the CLI server exits", "600")
NO_AUTO_GC = Setting("WTBOX_NO_AUTO_GC", "`1`: no background gc", "gc runs in the background at most once an hour")
DEBUG = Setting("WTBOX_DEBUG", "`1`: debug diagnostics on stderr (as `-v`), and tracebacks of internal errors",
                "warnings only; an internal error's traceback goes to `$WTBOX_HOME/wtbox.log`")
PROGRESS = Setting("WTBOX_PROGRESS", "`1`: `new` prints its progress on stderr even when it is not a terminal",
                   "progress only on a terminal")
BOX_ID = Setting("WTBOX_ID", "set by wtbox in every process of a box (its id); a command run there is never served",
                 "outside a box")
BOX_SOCKET = Setting("WTBOX_BOX_SOCKET", "set in a sandboxed box: where `wtbox` typed inside it asks its supervisor",
                     "outside a sandboxed box")

# ---------------------------------------------------------------- overrides of config.toml
PORT_RANGE = Setting("WTBOX_PORT_RANGE", "`[host] port_range`: ports boxes lease, such as `20000-29999`",
                     "20000 up to just below the kernel's ephemeral range")
MOUNTS = Setting("WTBOX_MOUNTS", "`[host] mounts`: overlay, fuse-overlayfs, reflink or checkout",
                 "the first that works here")
LAYER_TTL = Setting("WTBOX_LAYER_TTL", "`[host] layer_ttl`: gc removes trees and layers unused this long", "24h")
POSTGRES_URL = Setting("WTBOX_POSTGRES_URL", "`[database] url`: an external server with a CREATEROLE superuser",
                       "the embedded cluster")
DATABASE_PROVIDER = Setting("WTBOX_DATABASE_PROVIDER", "`[database] provider`: embedded, external or docker",
                            "embedded (external when a URL is set)")
POSTGRES_IMAGE = Setting("WTBOX_POSTGRES_IMAGE", "`[database] image` (docker provider)", "`postgres:15`")
OBSERVABILITY_PROVIDER = Setting("WTBOX_OBSERVABILITY_PROVIDER", "`[observability] provider`: native or docker",
                                 "native")
VICTORIAMETRICS_IMAGE = Setting("WTBOX_VICTORIAMETRICS_IMAGE", "`[observability] image` (docker provider)",
                                "`victoriametrics/victoria-metrics:v1.93.0`")
SANDBOX = Setting("WTBOX_SANDBOX", "`[host] sandbox`: auto, namespaces or off (boxes see and signal each other)",
                  "auto: namespaces where bubblewrap and its tools work")

# ---------------------------------------------------------------- the host's programs and limits
CGROUPS = Setting("WTBOX_CGROUPS", "`off`: boxes get no cgroup (no limits; teardown by `WTBOX_ID` and cwd)",
                  "a cgroup per box where the host allows it")
DISK_WATCH = Setting("WTBOX_DISK_WATCH", "`1`: `[box] disk_max` is watched by the box's supervisor instead of "
                                         "enforced by a loop-mounted filesystem", "enforced where the host can (root, "
                                         "loop devices), else watched")
PG_BIN = Setting("WTBOX_PG_BIN", "the directory of `initdb` and `pg_ctl` for the embedded cluster",
                 "from PATH, else the newest `/usr/lib/postgresql/*/bin`")
CHROMIUM = Setting("WTBOX_CHROMIUM", "the Chromium binary of `browse` and `[browser]`", "`chromium` on PATH")
CADDY = Setting("WTBOX_CADDY", "the Caddy binary of the host router", "`caddy` on PATH")

# ---------------------------------------------------------------- timings (tests shorten them)
KILL_WAIT = Setting("WTBOX_KILL_WAIT", "seconds a stopped process gets between SIGTERM and SIGKILL, and then to be "
                                       "gone (services, fan-out commands, timed-out runs, Chromium, helpers)", "5")
POOL_IDLE = Setting("WTBOX_POOL_IDLE", "seconds the pool's filler waits, with the pool full and unclaimed, "
                                       "before it exits", "300")
SANDBOX_SPARES = Setting("WTBOX_SANDBOX_SPARES", "`[host] sandbox_spares`: spare sandboxes kept per recipe for the "
                                                 "next `new` (0: none)", "1")
SANDBOX_SPARE_TTL = Setting("WTBOX_SANDBOX_SPARE_TTL", "seconds a spare sandbox waits to be taken before it "
                                                       "ends itself", "600")
SANDBOX_SPARE_DELAY = Setting("WTBOX_SANDBOX_SPARE_DELAY", "seconds a spare sandbox's maker waits before it "
                                                           "makes one: the commands that follow the `new` that "
                                                           "asked (an exec, a status) run first", "0.5")
PHASE_FILE = Setting("WTBOX_PHASE_FILE", "crash tests: a file `new` appends each phase name to as it starts")
PHASE_STOP = Setting("WTBOX_PHASE_STOP", "crash tests: `new` halts at the first phase starting with this "
                                         "(for a `kill -9` there)")

SETTINGS = (HOME, LEASE_DIR, NO_SERVER, SERVER_IDLE, NO_AUTO_GC, DEBUG, PROGRESS, BOX_ID, BOX_SOCKET, PORT_RANGE,
            MOUNTS, LAYER_TTL, POSTGRES_URL, DATABASE_PROVIDER, POSTGRES_IMAGE, OBSERVABILITY_PROVIDER,
            VICTORIAMETRICS_IMAGE, SANDBOX, CGROUPS, DISK_WATCH, PG_BIN, CHROMIUM, CADDY, KILL_WAIT, POOL_IDLE,
            SANDBOX_SPARES, SANDBOX_SPARE_TTL, SANDBOX_SPARE_DELAY, PHASE_FILE, PHASE_STOP)


def user_state_dir() -> str:
    """The user's state directory ($XDG_STATE_HOME, else ~/.local/state): where the default home
    and the per-user fallbacks of the host-wide directories live."""
    return os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")


def default_home() -> str:
    """$WTBOX_HOME, else <user state dir>/wtbox."""
    home = HOME.value()
    return os.path.expanduser(home) if home else os.path.join(user_state_dir(), "wtbox")


def kill_wait() -> float:
    """The one stop grace (system/procs/stop.py)."""
    return KILL_WAIT.seconds()


def markdown() -> str:
    """The README's table of settings."""
    rows = ["| variable | what it does | when unset |", "|---|---|---|"]
    rows += [f"| `{s.name}` | {s.meaning} | {s.default} |" for s in SETTINGS]
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    print(markdown(), end="")
