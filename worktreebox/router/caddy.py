"""The router's Caddy process: find the binary, start it, talk to its admin API, stop it.

Caddy (the Debian package) is started with nothing but its admin API on a unix socket in the
home's 0700 `router/` dir (never the default :2019: several homes and test runs share a host),
then handed its whole config by `POST /load`. Its files (state, logs, the HOME it writes into)
stay under `router/`; its environment is a clean one, so nothing of a box (WTBOX_ID, a cwd in a
box) makes it look like a box's process.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
import subprocess
from pathlib import Path

from worktreebox import settings
from worktreebox.errors import WtboxError
from worktreebox.router.state import Paths
from worktreebox.system import httpclient, procs, readiness
from worktreebox.system.fsutil import atomic_write

BINARY = "caddy"
PACKAGE = "caddy"  # the Debian package that ships it
START_TIMEOUT = 10.0
API_TIMEOUT = 10.0


def find() -> str:
    """Path of the Caddy binary ($WTBOX_CADDY, else `caddy` on PATH), or an error naming the package."""
    name = settings.CADDY.value() or BINARY  # a test points it at a missing one
    path = shutil.which(name)
    if not path:
        raise WtboxError(f"Caddy is not installed (no {name!r} on PATH), so boxes have no router; install the "
                         f"Debian package `{PACKAGE}` (apt-get install {PACKAGE}) or set [host] router = false.")
    return path


def version(binary: str, known: Path | None = None) -> tuple[int, ...]:
    """(2, 6, 2) from `caddy version`; () when it says nothing we can read. `known`: a file that
    remembers the answer for this very binary (its path, inode, size and mtime): `caddy version`
    is a second Go start-up, ~30 ms on the path of every `new` that starts the router."""
    identity = _identity(binary)
    if known is not None and identity is not None:
        try:
            saved = json.loads(known.read_text())
            if saved.get("binary") == identity:
                return tuple(int(x) for x in saved["version"])
        except (OSError, ValueError, TypeError, KeyError):
            pass  # none yet, or unreadable: ask the binary
    try:
        out = subprocess.run([binary, "version"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return ()
    m = re.search(r"v?(\d+)\.(\d+)\.(\d+)", out)
    found = tuple(int(x) for x in m.groups()) if m else ()
    if known is not None and identity is not None and found:
        with contextlib.suppress(OSError):
            atomic_write(known, json.dumps({"binary": identity, "version": list(found)}), mode=0o600)
    return found


def _identity(binary: str) -> list[str | int] | None:
    """What changes when the binary does (a package upgrade writes a new file: inode and mtime)."""
    try:
        real = os.path.realpath(binary)
        st = os.stat(real)
    except OSError:
        return None
    return [real, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns]


def start(paths: Paths, binary: str, bootstrap: bytes) -> list[int]:
    """Start Caddy with `bootstrap` (its admin socket and log), detached; its identity once its
    admin API answers."""
    paths.make()
    paths.socket.unlink(missing_ok=True)  # a killed Caddy leaves its socket behind
    atomic_write(paths.bootstrap, bootstrap, mode=0o600)
    home = str(paths.caddy_home)
    env = {"PATH": os.environ.get("PATH") or "/usr/bin:/bin", "HOME": home, "XDG_DATA_HOME": home,
           "XDG_CONFIG_HOME": home, "LANG": "C.UTF-8"}
    paths.output.write_bytes(b"")
    pid = procs.spawn_detached([binary, "run", "--config", str(paths.bootstrap)], env=env, log_path=paths.output,
                               cwd=paths.dir)
    why = readiness.wait(readiness.Probe(lambda timeout: _answers(paths.socket)), START_TIMEOUT,
                         alive=readiness.process_alive(pid))
    ident = procs.identity(pid)
    if why is None and ident:
        return ident
    procs.stop_pid(pid)
    raise WtboxError(f"The router (Caddy) did not start ({why}): {_last_line(paths.output) or 'no output'}; "
                     f"see {paths.output}.")


def stop(ident: list[int] | None) -> None:
    """Stop the router's Caddy (staged: SIGTERM, wait, SIGKILL) if that process still runs."""
    if ident is not None and procs.is_alive(ident):
        procs.stop_pid(ident[0])


def of_gone_homes() -> list[tuple[int, str]]:
    """(pid, home) of every router Caddy whose home is gone (no registry left): nothing else would
    ever stop it. Found by the bootstrap file on its command line."""
    out = []
    for pid in procs.pids_named(BINARY):
        argv = procs.cmdline(pid)
        config = argv[argv.index("--config") + 1] if "--config" in argv[:-1] else ""
        home = Path(config).parent.parent
        if config.endswith("/router/bootstrap.json") and not (home / "registry.sqlite3").exists():
            out.append((pid, str(home)))
    return out


def load(sock: Path, config: bytes) -> None:
    """Replace Caddy's whole config (it applies it at once, or keeps the old one and says why)."""
    status, body = _request(sock, "POST", "/load", config)
    if status != 200:
        try:
            why = json.loads(body).get("error", "")
        except ValueError:
            why = body.decode(errors="replace")
        raise WtboxError(f"The router refused its new routes: {_short(why)}.")


def config(sock: Path) -> dict:
    """The config Caddy runs now (GET /config/)."""
    status, body = _request(sock, "GET", "/config/", None)
    if status != 200:
        raise WtboxError(f"The router's admin API answered {status} to GET /config/.")
    return json.loads(body) or {}


def _request(sock: Path, method: str, path: str, body: bytes | None) -> tuple[int, bytes]:
    try:
        reply = httpclient.request(method, f"http://localhost{path}", body=body or b"", timeout=API_TIMEOUT,
                                   headers={"Content-Type": "application/json"}, unix_socket=str(sock))
    except OSError as e:
        raise WtboxError(f"The router's admin API ({sock}) did not answer: {e.strerror or e}.") from None
    return reply.status, reply.body


def _answers(sock: Path) -> bool:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(str(sock))
        return True
    except OSError:
        return False
    finally:
        s.close()


def _last_line(path: Path) -> str:
    try:
        lines = [ln for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    if not lines:
        return ""
    try:
        return _short(json.loads(lines[-1]).get("error") or json.loads(lines[-1]).get("msg") or lines[-1])
    except (ValueError, AttributeError):
        return _short(lines[-1])


def _short(text: str) -> str:
    return " ".join(str(text).split())[:300].rstrip(".")
