"""Pytest plugin: one real embedded PostgreSQL cluster per test session, shared by every test.

The cluster lives in its own WTBOX_HOME (started by worktreebox's own EmbeddedCluster code)
and is stopped at the end of the session. `shared_postgres` exports
WTBOX_POSTGRES_URL for the whole session, so every test's private WTBOX_HOME uses this
cluster as an *external* server instead of initdb-ing its own (which would cost ~2 s per
test and leave clusters running); it starts with the first slow test (conftest.py). Tests of
the embedded provider itself use `pg_host`, a Host on the cluster's own home with
WTBOX_POSTGRES_URL unset.

Loaded for every test by tests/conftest.py (`pytest_plugins`); a test names a fixture as a parameter.
"""
from __future__ import annotations

import dataclasses
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any

import pytest
from helpers import remove_all_boxes


@dataclasses.dataclass
class PgCluster:
    home: Path  # the WTBOX_HOME that owns the embedded cluster
    url: str  # superuser over TCP: postgresql://postgres:<pw>@127.0.0.1:<port>/wtbox
    port: int
    cluster: Any  # worktreebox.providers.postgres.embedded.EmbeddedCluster

    def sql(self, query: str, params: tuple = (), dbname: str = "wtbox") -> list[tuple]:
        """Run one statement as superuser on a fresh connection; rows (or [] without a result)."""
        import psycopg

        with psycopg.connect(self.url.rsplit("/", 1)[0] + "/" + dbname, autocommit=True) as conn:
            cur = conn.execute(query, params)
            return cur.fetchall() if cur.description else []


def start_session_cluster(home: Path) -> PgCluster:
    from worktreebox.host import Host
    from worktreebox.providers.postgres import server

    saved = os.environ.pop("WTBOX_POSTGRES_URL", None)
    try:
        host = Host(home)
        srv = server(host)
        srv.ensure_running()
        password = secrets.token_urlsafe(16)
        with srv.session("postgres") as conn:
            from psycopg import sql

            conn.execute(sql.SQL("ALTER ROLE postgres PASSWORD {}").format(sql.Literal(password)))
        port = srv.box_port
        host.registry.close()
    finally:
        if saved is not None:
            os.environ["WTBOX_POSTGRES_URL"] = saved
    return PgCluster(home=home, url=f"postgresql://postgres:{password}@127.0.0.1:{port}/wtbox", port=port,
                     cluster=srv)


# Stops the cluster and deletes its dir if the pytest process dies without tearing down (kill -9, timeout).
_WATCHDOG = """
import os, shutil, sys, time
from pathlib import Path
pid, home = int(sys.argv[1]), Path(sys.argv[2])
while True:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        break
    time.sleep(0.5)
from worktreebox.providers.mounts.base import unmount_all
from worktreebox.providers.postgres.embedded import EmbeddedCluster
try:
    EmbeddedCluster(home).stop()
finally:
    unmount_all(home.parent)  # worktree views of boxes a test left behind
    shutil.rmtree(home.parent, ignore_errors=True)
"""


@pytest.fixture(scope="session")
def pg_cluster() -> PgCluster:
    """The session's cluster (one per process: an xdist worker has its own)."""
    # Not under pytest's basetemp: concurrent pytest sessions prune each other's old
    # /tmp/pytest-of-<user>/pytest-N dirs, which would delete a running cluster.
    home = Path(tempfile.mkdtemp(prefix="wtbox-test-pg-")) / "home"
    watchdog = subprocess.Popen(
        [sys.executable, "-c", _WATCHDOG, str(os.getpid()), str(home)], start_new_session=True,
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        cwd=str(Path(__file__).resolve().parent.parent))
    pg = start_session_cluster(home)
    yield pg
    try:
        pg.cluster.stop()
    finally:
        from worktreebox.providers.mounts.base import unmount_all

        unmount_all(pg.home.parent)  # worktree views of boxes a test left behind
        shutil.rmtree(pg.home.parent, ignore_errors=True)
        watchdog.kill()
        watchdog.wait()


@pytest.fixture(scope="session")
def shared_postgres(pg_cluster) -> PgCluster:
    """From the first test that asks on, every test's WTBOX_HOME uses the session cluster (as
    WTBOX_POSTGRES_URL); conftest.py asks for every slow test."""
    saved = os.environ.get("WTBOX_POSTGRES_URL")
    os.environ["WTBOX_POSTGRES_URL"] = pg_cluster.url
    yield pg_cluster
    if saved is None:
        os.environ.pop("WTBOX_POSTGRES_URL", None)
    else:
        os.environ["WTBOX_POSTGRES_URL"] = saved


@pytest.fixture
def pg_host(pg_cluster, monkeypatch):
    """A Host on the cluster's own home: the embedded provider, exactly as a user's host runs it."""
    from worktreebox.host import Host

    monkeypatch.delenv("WTBOX_POSTGRES_URL", raising=False)
    monkeypatch.setenv("WTBOX_HOME", str(pg_cluster.home))
    monkeypatch.setenv("WTBOX_NO_AUTO_GC", "1")
    host = Host(pg_cluster.home)
    yield host
    remove_all_boxes(host)


@pytest.fixture(autouse=True)
def no_stray_cluster(request):
    """After each test, stop any embedded cluster a test started in its own tmp WTBOX_HOME (and warn)."""
    if "tmp_path" not in request.fixturenames:
        yield
        return
    tmp = request.getfixturevalue("tmp_path")  # now, so it is torn down after this check
    yield
    for pid_file in list(tmp.glob("*/postgres/postmaster.pid")) + list(tmp.glob("*/*/postgres/postmaster.pid")):
        data_dir = pid_file.parent
        warnings.warn(f"a test left an embedded PostgreSQL running in {data_dir}; stopping it "
                      "(use the shared session cluster: WTBOX_POSTGRES_URL is set by pg_fixtures)", stacklevel=2)
        from worktreebox.providers.postgres.embedded import EmbeddedCluster

        EmbeddedCluster(data_dir.parent).stop()
