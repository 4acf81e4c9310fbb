"""The embedded PostgreSQL cluster under $WTBOX_HOME/postgres (the `embedded` database provider).

The cluster is created (initdb) and started (pg_ctl) on first need. Start is
serialised by a file lock so that many `wtbox new` hitting a stopped cluster start it
once. `initdb` and `postgres` refuse to run as root, so as root the cluster runs as an
unprivileged system user. Superuser access is over the unix socket (trust, reachable
only by the cluster's user and root); boxes use TCP on 127.0.0.1 with scram-sha-256.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import re
import shutil
import stat
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING, Any

from worktreebox import settings
from worktreebox.errors import WtboxError
from worktreebox.providers.postgres.base import SHARED_DB, SUPERUSER, Server, forget_connections
from worktreebox.system import procs
from worktreebox.system.fsutil import atomic_write, file_lock
from worktreebox.system.unixsock import SUN_PATH_MAX

if TYPE_CHECKING:
    from worktreebox.config.load import HostConfig
    from worktreebox.context import HostContext

PORT_OWNER = "@postgres"
PREPARED = "wtbox.prepared"  # in the data dir: the shared database is made (ensure_running's last step)
SYSTEM_USERS = ("postgres", "wtbox-pg")  # reused if present, in this order; else wtbox-pg is created
_SOCKET_FILE = "/.s.PGSQL.65535"


# ---------------------------------------------------------------- binaries

def find_bin_dir() -> Path:
    """Directory with initdb/pg_ctl: from PATH, else the highest /usr/lib/postgresql/*/bin."""
    env = settings.PG_BIN.value()
    if env and (Path(env) / "pg_ctl").exists():
        return Path(env)
    found = shutil.which("pg_ctl")
    if found and shutil.which("initdb"):
        return Path(found).resolve().parent
    candidates = []
    for d in Path("/usr/lib/postgresql").glob("*/bin"):
        if (d / "pg_ctl").exists() and (d / "initdb").exists():
            version = tuple(int(p) for p in re.findall(r"\d+", d.parent.name)) or (0,)
            candidates.append((version, d))
    if not candidates:
        raise WtboxError(
            "PostgreSQL is not installed (no pg_ctl on PATH or in /usr/lib/postgresql/*/bin); "
            "install it with 'apt-get install postgresql' or set WTBOX_POSTGRES_URL to an external server."
        )
    return max(candidates)[1]


# ---------------------------------------------------------------- embedded

@dataclasses.dataclass
class _OsUser:
    name: str
    uid: int
    gid: int
    home: str


class EmbeddedCluster(Server):
    """initdb + pg_ctl under $WTBOX_HOME/postgres, started on demand."""

    provider = "embedded"

    def __init__(self, home: Path, config: HostConfig | None = None, lease_port: Any = None) -> None:
        self.home = Path(home).absolute()
        self.config = config
        self._lease_port = lease_port  # callable () -> int, asked only when the cluster starts
        self.data_dir = self.home / "postgres"
        self.lock_file = self.home / "postgres.lock"
        self.state_file = self.home / "postgres.json"
        self.log_file = self.data_dir / "server.log"

    @classmethod
    def from_host(cls, host: HostContext) -> EmbeddedCluster:
        return cls(host.home, host.config, lambda: host.lease_host_port(PORT_OWNER))

    @classmethod
    def check(cls) -> dict[str, Any]:
        try:
            return {"check": "postgres", "ok": True, "detail": str(find_bin_dir())}
        except WtboxError as e:  # its message names the package to install
            return {"check": "postgres", "ok": False, "detail": str(e)}

    # -- where things are
    @property
    def socket_dir(self) -> Path:
        """$WTBOX_HOME/postgres-socket, or a short dir in /tmp when that path is too long for a socket."""
        inside = self.home / "postgres-socket"
        if len(str(inside)) + len(_SOCKET_FILE) <= SUN_PATH_MAX:  # PostgreSQL binds it by its full path
            return inside
        digest = hashlib.sha256(str(self.home).encode()).hexdigest()[:12]
        return Path(f"/tmp/wtbox-pg-{digest}")

    def _state(self) -> dict[str, Any]:
        try:
            return json.loads(self.state_file.read_text())
        except (OSError, ValueError):
            return {}

    @property
    def box_port(self) -> int:  # type: ignore[override]
        return int(self._state().get("port") or 0)

    def key(self) -> str:
        return f"embedded:{self.home}"

    def conninfo(self, dbname: str) -> dict[str, Any]:
        state = self._state()
        return {"host": state.get("socket_dir") or str(self.socket_dir), "port": int(state.get("port") or 5432),
                "user": SUPERUSER, "dbname": dbname}

    def describe(self) -> str:
        return f"embedded cluster in {self.data_dir}"

    @property
    def initialised(self) -> bool:
        return (self.data_dir / "PG_VERSION").exists()

    # -- running as an unprivileged user when we are root
    def _os_user(self) -> _OsUser | None:
        if os.geteuid() != 0:
            return None
        from worktreebox.system import users

        found = next((u for u in map(users.lookup, SYSTEM_USERS) if u is not None), None)
        user = found or users.ensure("wtbox-pg", purpose="PostgreSQL")
        return _OsUser(user.name, user.uid, user.gid, user.home)

    def _run(self, args: list[str], user: _OsUser | None, *, check: bool = True,
             timeout: float = 120) -> subprocess.CompletedProcess:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env.update(LC_ALL="C.UTF-8", LANG="C.UTF-8")
        kwargs: dict[str, Any] = {}
        if user is not None:
            # Again on every call: something else (a new pytest session resets /tmp/pytest-of-<user>
            # to 0700, a user's chmod) may have closed the path to the data dir since initdb.
            _make_traversable(self.data_dir, user.uid)
            env.update(HOME=user.home or "/", USER=user.name, LOGNAME=user.name)
            kwargs.update(user=user.uid, group=user.gid, extra_groups=[])
        # Own session, no inherited pipes: the postmaster outlives this process and its callers.
        proc = subprocess.run(args, stdin=subprocess.DEVNULL, capture_output=True, text=True, env=env, cwd="/",
                              timeout=timeout, start_new_session=True, **kwargs)
        if check and proc.returncode != 0:
            lines = (proc.stderr or proc.stdout).strip().splitlines()
            # The first error line is the cause; later ones are clean-up chatter.
            why = next((ln for ln in lines if "error" in ln.lower()), lines[-1] if lines else f"exit {proc.returncode}")
            raise WtboxError(f"{Path(args[0]).name} failed for the embedded PostgreSQL cluster in {self.data_dir}: "
                             f"{why.strip()}")
        return proc

    def _own_dir(self, path: Path, user: _OsUser | None) -> None:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        if user is not None:
            st = path.stat()
            if st.st_uid != user.uid:
                os.chown(path, user.uid, user.gid)
            _make_traversable(path, user.uid)
        os.chmod(path, 0o700)

    # -- lifecycle
    def pg_ctl_status(self) -> bool:
        """True when a postmaster runs on our data dir: what `pg_ctl status` checks, without a subprocess."""
        try:
            pid = int((self.data_dir / "postmaster.pid").read_text().split("\n", 1)[0])
            os.kill(pid, 0)
        except (OSError, ValueError):
            return False
        return any("postgres" in arg for arg in procs.cmdline(pid))

    def is_running(self) -> bool:
        return self.initialised and self.pg_ctl_status()

    def _locked(self) -> contextlib.AbstractContextManager[None]:
        return file_lock(self.lock_file, what="the embedded PostgreSQL start lock")

    def ensure_running(self) -> None:
        """initdb once and start; idempotent and safe when many processes call it at once. Done
        means the shared database is made too (PREPARED, written last): a first start killed
        before that left a running cluster without it, which every later call took as done."""
        with self._locked():
            running = self.initialised and self.pg_ctl_status()
            if running and (self.data_dir / PREPARED).exists():
                return
            user = self._os_user()
            if not self.initialised:
                self._initdb(user)
            if not running:
                self._start(user)
            self._prepare_shared_db()
            (self.data_dir / PREPARED).touch()
            if user is not None:
                os.chown(self.data_dir / PREPARED, user.uid, user.gid)

    def _initdb(self, user: _OsUser | None) -> None:
        # initdb into a scratch dir and rename: a crash mid-initdb leaves no half cluster behind.
        # A killed attempt's initdb (and its `postgres --boot`) outlive their parent and keep
        # writing into their scratch dir: end them before deleting it. We hold the start lock,
        # so no live attempt of ours owns one.
        for stale in self.home.glob("postgres.initdb*"):
            procs.kill_mentioning(str(stale))
            shutil.rmtree(stale, ignore_errors=True)
        scratch = self.home / f"postgres.initdb.{os.getpid()}"
        if self.data_dir.exists():
            if any(self.data_dir.iterdir()):
                raise WtboxError(f"{self.data_dir} exists but holds no PostgreSQL cluster; move it away and retry.")
            self.data_dir.rmdir()
        self._own_dir(scratch, user)
        self._run([str(find_bin_dir() / "initdb"), "-D", str(scratch), "-U", SUPERUSER, "-E", "UTF8",
                   "--locale=C.UTF-8", "--no-sync", "--no-instructions", "--auth-local=trust",
                   "--auth-host=scram-sha-256"], user)
        with open(scratch / "postgresql.conf", "a") as f:
            f.write("\n# wtbox: settings that depend on $WTBOX_HOME and host config\n"
                    "include_if_exists = 'wtbox.conf'\n")
        # Trust on the socket for the superuser only; the socket dir is reachable by the cluster user and root.
        (scratch / "pg_hba.conf").write_text(
            "# wtbox: superuser over the unix socket only; boxes over TCP with a password\n"
            f"local   all  {SUPERUSER}  trust\n"
            "local   all  all       scram-sha-256\n"
            "host    all  all       127.0.0.1/32  scram-sha-256\n"
            "host    all  all       ::1/128       scram-sha-256\n"
        )
        if user is not None:
            for p in (scratch / "postgresql.conf", scratch / "pg_hba.conf"):
                os.chown(p, user.uid, user.gid)
        os.rename(scratch, self.data_dir)

    def _write_conf(self, port: int, socket_dir: Path, user: _OsUser | None) -> None:
        fsync_off = self.config is None or self.config.fsync_off
        lines = [
            f"port = {port}",
            "listen_addresses = '127.0.0.1'",
            f"unix_socket_directories = '{socket_dir}'",
            "unix_socket_permissions = 0700",
            "max_connections = 300",
            "password_encryption = 'scram-sha-256'",
        ]
        if fsync_off:
            # Boxes are disposable: trade crash safety for speed (opt out with [database] fsync_off = false).
            lines += ["fsync = off", "synchronous_commit = off", "full_page_writes = off"]
        conf = self.data_dir / "wtbox.conf"
        conf.write_text("\n".join(lines) + "\n")
        if user is not None:
            os.chown(conf, user.uid, user.gid)

    def _start(self, user: _OsUser | None) -> None:
        state = self._state()
        port = state.get("port")
        if self._lease_port is not None:
            port = self._lease_port()
        if not port:
            import portpicker

            port = portpicker.pick_unused_port()
        socket_dir = self.socket_dir
        if str(socket_dir).startswith("/tmp/") and socket_dir.exists():
            st = socket_dir.lstat()
            if not stat.S_ISDIR(st.st_mode) or st.st_uid not in (os.geteuid(), user.uid if user else -1):
                raise WtboxError(f"{socket_dir} exists and is not ours; "
                                 "remove it so the PostgreSQL socket can live there.")
        self._own_dir(socket_dir, user)
        self._write_conf(int(port), socket_dir, user)
        atomic_write(self.state_file, json.dumps({
            "port": int(port), "socket_dir": str(socket_dir), "bin_dir": str(find_bin_dir()),
            "os_user": user.name if user else None,
        }))
        proc = self._run([str(find_bin_dir() / "pg_ctl"), "start", "-w", "-t", "60", "-D", str(self.data_dir),
                          "-l", str(self.log_file)], user, check=False)
        if proc.returncode != 0:
            tail = _tail(self.log_file, 3)
            raise WtboxError(f"The embedded PostgreSQL cluster in {self.data_dir} did not start on port {port}: "
                             f"{tail or (proc.stderr or proc.stdout).strip()}")

    def _prepare_shared_db(self) -> None:
        conn = self._connect("postgres")
        try:
            if not conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (SHARED_DB,)).fetchone():
                conn.execute(f'CREATE DATABASE "{SHARED_DB}"')
        finally:
            conn.close()

    def stop(self) -> bool:
        """Stop the cluster (fast shutdown: ends sessions). True if it was running."""
        forget_connections()
        with self._locked():
            if not (self.initialised and self.pg_ctl_status()):
                return False
            self._run([str(find_bin_dir() / "pg_ctl"), "stop", "-w", "-t", "60", "-m", "fast", "-D",
                       str(self.data_dir)], self._os_user())
            socket_dir = Path(self._state().get("socket_dir") or self.socket_dir)
            if not socket_dir.is_relative_to(self.home):  # /tmp's (a long home's): the one thing outside it
                with contextlib.suppress(OSError):  # (empty once PostgreSQL removed its socket; else kept)
                    socket_dir.rmdir()
            return True

    def status(self) -> dict[str, Any]:
        state = self._state()
        running = self.is_running()
        out: dict[str, Any] = {
            "provider": self.provider, "initialised": self.initialised, "running": running,
            "data_dir": str(self.data_dir), "socket_dir": state.get("socket_dir", str(self.socket_dir)),
            "host": self.box_host, "port": state.get("port"), "os_user": state.get("os_user"),
            "version": None, "pid": None,
            "fsync_off": self.config is None or self.config.fsync_off,
        }
        if self.initialised:
            out["version"] = (self.data_dir / "PG_VERSION").read_text().strip()
        if running:
            with contextlib.suppress(OSError, ValueError, IndexError):
                out["pid"] = int((self.data_dir / "postmaster.pid").read_text().split()[0])
        return out


# ---------------------------------------------------------------- helpers

def _make_traversable(path: Path, uid: int) -> None:
    """Give others search (x, not read) permission on ancestors the cluster user could not pass."""
    for parent in list(path.absolute().parents)[::-1]:
        try:
            st = parent.stat()
        except OSError:
            return
        if st.st_uid == uid or st.st_mode & stat.S_IXOTH:
            continue
        os.chmod(parent, stat.S_IMODE(st.st_mode) | stat.S_IXOTH)


def _tail(path: Path, n: int) -> str:
    try:
        lines = [ln for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    return " | ".join(lines[-n:])

