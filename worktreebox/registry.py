"""The registry: one small SQLite file with every box and port lease.

Writers use short `BEGIN IMMEDIATE` transactions so that many concurrent `wtbox`
processes serialise on the decision (which ports, which state) and never on slow work.
"""
from __future__ import annotations

import contextlib
import json
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from worktreebox.box import READY, Box
from worktreebox.errors import WtboxError


class TaskTaken(WtboxError):
    """Another box already has this task name (names resolve boxes: they must be unique)."""

SCHEMA_VERSION = 2

# Each entry migrates from version i to i+1; later issues append to this list.
_MIGRATIONS = [
    """
    CREATE TABLE boxes (
        id TEXT PRIMARY KEY,
        task TEXT NOT NULL,
        repo TEXT NOT NULL,
        branch TEXT NOT NULL,
        dir TEXT NOT NULL,
        state TEXT NOT NULL,
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL,
        last_used_at REAL NOT NULL,
        ttl REAL,
        keep INTEGER NOT NULL DEFAULT 0,
        env TEXT NOT NULL DEFAULT '{}',
        data TEXT NOT NULL DEFAULT '{}'
    );
    CREATE TABLE port_leases (
        port INTEGER PRIMARY KEY,
        owner TEXT NOT NULL,       -- a box id, or '@name' for host-level leases
        name TEXT NOT NULL,
        leased_at REAL NOT NULL
    );
    CREATE INDEX port_leases_owner ON port_leases(owner);
    CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
    -- every repo a box was ever cut from, so gc can find orphaned wtbox/* branches
    CREATE TABLE repos (path TEXT PRIMARY KEY, first_used_at REAL NOT NULL);
    """,
    """
    -- a pooled box (made ahead, not yet claimed) carries its pool key: the config hash it was made for
    ALTER TABLE boxes ADD COLUMN pool TEXT;
    CREATE INDEX boxes_pool ON boxes(pool);
    -- `wtbox pool REPO --size N`: wins over [pool] size of the repo's wtbox.toml
    CREATE TABLE pool_sizes (repo TEXT PRIMARY KEY, size INTEGER NOT NULL);
    """,
]


def _to_wal(db: sqlite3.Connection, timeout: float = 30.0) -> None:
    """Switch a (new) database to WAL. That takes an exclusive lock SQLite does not wait for
    (no busy handler): when several processes open a fresh registry at once, some get
    'database is locked' right away, so they wait here as busy_timeout would."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if db.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
                db.execute("PRAGMA journal_mode = WAL")
            return
        except sqlite3.OperationalError as e:
            if "locked" not in str(e) or time.monotonic() > deadline:
                raise
            time.sleep(0.01)


class Registry:
    """Store with intention-revealing methods; one connection per thread (a sqlite3
    connection can hold only one transaction, and `new` and fanout use threads)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._local = threading.local()
        self._all: list[sqlite3.Connection] = []

    @property
    def _db(self) -> sqlite3.Connection | None:
        return getattr(self._local, "db", None)

    @_db.setter
    def _db(self, value: sqlite3.Connection | None) -> None:
        self._local.db = value

    @property
    def db(self) -> sqlite3.Connection:
        if self._db is None:
            try:
                self._open()
            except sqlite3.DatabaseError as e:
                if isinstance(e, sqlite3.OperationalError) and "unable to open" not in str(e):
                    raise  # locked, busy: not about the file itself
                raise WtboxError(f"The registry {self.path} is not a readable SQLite database ({e}); restore it, "
                                 "or move it aside to start an empty one (the boxes it listed then look like "
                                 "orphans to 'wtbox gc': save their work first).") from None
        assert self._db is not None
        return self._db

    def _open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)
        try:
            db.row_factory = sqlite3.Row
            db.execute("PRAGMA busy_timeout = 30000")
            _to_wal(db)
            db.execute("PRAGMA synchronous = NORMAL")
        except BaseException:
            db.close()
            raise
        self._db = db
        self._all.append(db)
        self._migrate()

    def close(self) -> None:
        for db in self._all:
            try:
                db.close()
            except sqlite3.ProgrammingError:
                pass  # made in another thread that is gone
        self._all.clear()
        self._db = None

    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        db = self.db
        db.execute("BEGIN IMMEDIATE")
        try:
            yield db
        except BaseException:
            db.execute("ROLLBACK")
            raise
        else:
            db.execute("COMMIT")

    def _migrate(self) -> None:
        db = self._db
        assert db is not None
        version = db.execute("PRAGMA user_version").fetchone()[0]
        if version >= len(_MIGRATIONS):
            return
        with self.transaction():
            version = db.execute("PRAGMA user_version").fetchone()[0]  # re-read under the lock
            for i in range(version, len(_MIGRATIONS)):
                for stmt in _split(_MIGRATIONS[i]):
                    db.execute(stmt)
                db.execute(f"PRAGMA user_version = {i + 1}")

    # ---------------------------------------------------------------- boxes
    def insert_box(self, box: Box) -> None:
        """Add a box's row; a task name another box (not a pooled one) has is refused, in the same
        transaction: five concurrent `new same` make one box named `same`."""
        now = time.time()
        with self.transaction() as db:
            if box.pool is None:
                _refuse_taken_task(db, box.task)
            db.execute(
                "INSERT INTO boxes (id, task, repo, branch, dir, state, created_at, updated_at, last_used_at,"
                " ttl, keep, env, data, pool) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (box.id, box.task, box.repo, box.branch, str(box.dir), box.state, box.created_at, now,
                 box.last_used_at, box.ttl, int(box.keep), json.dumps(box.env), json.dumps(box.data), box.pool),
            )

    def save_box(self, box: Box) -> None:
        """Write the mutable facts of a box (state, ports are separate, env, data, keep, ttl)."""
        with self.transaction() as db:
            db.execute(
                "UPDATE boxes SET state=?, updated_at=?, ttl=?, keep=?, env=?, data=? WHERE id=?",
                (box.state, time.time(), box.ttl, int(box.keep), json.dumps(box.env), json.dumps(box.data), box.id),
            )

    def set_state(self, box_id: str, state: str) -> None:
        with self.transaction() as db:
            db.execute("UPDATE boxes SET state=?, updated_at=? WHERE id=?", (state, time.time(), box_id))

    def set_keep(self, box_id: str, keep: bool) -> None:
        with self.transaction() as db:
            db.execute("UPDATE boxes SET keep=? WHERE id=?", (int(keep), box_id))

    def touch(self, box_id: str) -> None:
        """Record use (for TTL): cheap, best effort."""
        try:
            self.db.execute("UPDATE boxes SET last_used_at=? WHERE id=?", (time.time(), box_id))
        except sqlite3.OperationalError:
            pass

    def delete_box(self, box_id: str) -> None:
        with self.transaction() as db:
            db.execute("DELETE FROM port_leases WHERE owner=?", (box_id,))
            db.execute("DELETE FROM boxes WHERE id=?", (box_id,))

    def select_box(self, box_id: str) -> Box | None:
        row = self.db.execute("SELECT * FROM boxes WHERE id=?", (box_id,)).fetchone()
        return self._box(row) if row else None

    def select_all_boxes(self) -> list[Box]:
        rows = self.db.execute("SELECT * FROM boxes ORDER BY created_at").fetchall()
        ports = self._ports_by_owner()
        return [self._box(r, ports.get(r["id"], {})) for r in rows]

    def select_box_ids(self) -> set[str]:
        return {r[0] for r in self.db.execute("SELECT id FROM boxes")}

    def _box(self, row: sqlite3.Row, ports: dict[str, int] | None = None) -> Box:
        if ports is None:
            ports = {r["name"]: r["port"] for r in
                     self.db.execute("SELECT port, name FROM port_leases WHERE owner=? ORDER BY port", (row["id"],))}
        return Box(
            id=row["id"], task=row["task"], repo=row["repo"], branch=row["branch"], dir=Path(row["dir"]),
            state=row["state"], created_at=row["created_at"], last_used_at=row["last_used_at"],
            updated_at=row["updated_at"], ttl=row["ttl"],
            keep=bool(row["keep"]), ports=ports, env=json.loads(row["env"]), data=json.loads(row["data"]),
            pool=row["pool"],
        )

    # ---------------------------------------------------------------- pool
    def pool_commits(self, repo: str, key: str) -> set[str]:
        """Base commits of the ready pooled boxes of (repo, config key)."""
        rows = self.db.execute("SELECT data FROM boxes WHERE pool=? AND repo=? AND state=?", (key, repo, READY))
        return {json.loads(r[0]).get("base_sha") for r in rows}

    def claim_pool_box(self, repo: str, key: str, commits: list[str], rename: Callable[[Box], None],
                       accept: Callable[[Box], bool] = lambda box: True) -> Box | None:
        """Take one ready pooled box of (repo, key) that `accept`s and whose base is in `commits` (earlier
        ones preferred) and hand it to `rename`, which sets its new id, task, branch, dir, data; all in
        one `BEGIN IMMEDIATE` transaction, so two claims never get the same box."""
        with self.transaction() as db:
            rows = db.execute("SELECT * FROM boxes WHERE pool=? AND repo=? AND state=? ORDER BY created_at",
                              (key, repo, READY)).fetchall()
            by_commit: dict[str, sqlite3.Row] = {}
            for r in rows:
                if accept(self._box(r, {})):
                    by_commit.setdefault(json.loads(r["data"]).get("base_sha"), r)
            row = next((by_commit[c] for c in commits if c in by_commit), None)
            if row is None:
                return None
            box = self._box(row)
            old = box.id
            rename(box)
            _refuse_taken_task(db, box.task)
            db.execute("UPDATE boxes SET id=?, task=?, branch=?, dir=?, state=?, created_at=?, updated_at=?,"
                       " last_used_at=?, ttl=?, keep=?, env=?, data=?, pool=NULL WHERE id=?",
                       (box.id, box.task, box.branch, str(box.dir), box.state, box.created_at, time.time(),
                        box.last_used_at, box.ttl, int(box.keep), json.dumps(box.env), json.dumps(box.data), old))
            db.execute("UPDATE port_leases SET owner=? WHERE owner=?", (box.id, old))
            box.pool = None
            return box

    def set_pool_size(self, repo: str, size: int | None) -> None:
        """Record `wtbox pool REPO --size N` (None forgets it: the repo's wtbox.toml decides again)."""
        with self.transaction() as db:
            if size is None:
                db.execute("DELETE FROM pool_sizes WHERE repo=?", (repo,))
            else:
                db.execute("INSERT INTO pool_sizes (repo, size) VALUES (?, ?)"
                           " ON CONFLICT(repo) DO UPDATE SET size=excluded.size", (repo, size))

    def pool_size_of(self, repo: str) -> int | None:
        row = self.db.execute("SELECT size FROM pool_sizes WHERE repo=?", (repo,)).fetchone()
        return row[0] if row else None

    def pool_size_repos(self) -> list[str]:
        return [r[0] for r in self.db.execute("SELECT repo FROM pool_sizes ORDER BY repo")]

    # ---------------------------------------------------------------- ports
    def _ports_by_owner(self) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {}
        for r in self.db.execute("SELECT port, owner, name FROM port_leases ORDER BY port"):
            out.setdefault(r["owner"], {})[r["name"]] = r["port"]
        return out

    def leased_ports(self, db: sqlite3.Connection | None = None) -> set[int]:
        return {r[0] for r in (db or self.db).execute("SELECT port FROM port_leases")}

    def insert_leases(self, db: sqlite3.Connection, owner: str, ports: dict[str, int]) -> None:
        now = time.time()
        db.executemany("INSERT INTO port_leases (port, owner, name, leased_at) VALUES (?,?,?,?)",
                       [(p, owner, n, now) for n, p in ports.items()])

    def ports_of(self, owner: str) -> dict[str, int]:
        return {r["name"]: r["port"] for r in
                self.db.execute("SELECT port, name FROM port_leases WHERE owner=? ORDER BY port", (owner,))}

    def delete_leases(self, owner: str) -> None:
        with self.transaction() as db:
            db.execute("DELETE FROM port_leases WHERE owner=?", (owner,))

    def delete_lease(self, owner: str, name: str) -> None:
        """Give back one named port of an owner (a port leased for one command, e.g. a cold browse)."""
        with self.transaction() as db:
            db.execute("DELETE FROM port_leases WHERE owner=? AND name=?", (owner, name))

    def lease_owners(self) -> set[str]:
        return {r[0] for r in self.db.execute("SELECT DISTINCT owner FROM port_leases")}

    # ---------------------------------------------------------------- repos
    def remember_repo(self, path: str) -> None:
        with self.transaction() as db:
            db.execute("INSERT OR IGNORE INTO repos (path, first_used_at) VALUES (?, ?)", (path, time.time()))

    def select_repos(self) -> list[str]:
        return [r[0] for r in self.db.execute("SELECT path FROM repos ORDER BY path")]

    # ---------------------------------------------------------------- meta
    def get_meta(self, key: str) -> str | None:
        row = self.db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return row[0] if row else None

    def set_meta(self, key: str, value: str) -> None:
        with self.transaction() as db:
            db.execute("INSERT INTO meta (key, value) VALUES (?, ?)"
                       " ON CONFLICT(key) DO UPDATE SET value=excluded.value", (key, value))


def _refuse_taken_task(db: sqlite3.Connection, task: str) -> None:
    row = db.execute("SELECT id FROM boxes WHERE task=? AND pool IS NULL LIMIT 1", (task,)).fetchone()
    if row is not None:
        raise TaskTaken(f"A box named {task!r} already exists ({row[0]}); use it, remove it with 'wtbox rm "
                        f"{row[0]}', or choose another name.")


def _split(script: str) -> Iterable[str]:
    for stmt in script.split(";"):
        # drop SQL comments so an all-comment fragment is skipped
        lines = [ln.split("--", 1)[0] for ln in stmt.splitlines()]
        text = "\n".join(lines).strip()
        if text:
            yield text
