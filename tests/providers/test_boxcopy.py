"""The copies of a box's database (snapshots, forks, replaced databases) against the embedded
PostgreSQL: changes to their catalog rows are serialised per box.

PostgreSQL does not wait for a pg_database row that another session is changing: it fails with
"tuple concurrently deleted/updated". A fork lends its origin's databases to the superuser for one
transaction (boxcopy.hand_to_box) while a background `db drop-copies` of that box may be dropping
one of them; a run under load failed exactly so."""
from __future__ import annotations

import contextlib
import threading
import time

import pytest

from worktreebox.providers.postgres import boxcopy
from worktreebox.providers.postgres.boxdb import ident, sql_text


@pytest.fixture
def srv(pg_host):
    return pg_host.database_server()


@pytest.fixture
def box_role(srv):
    role = "wt_0bc0ffee"
    with srv.session(srv.shared_db) as conn:
        conn.execute(sql_text("CREATE ROLE {r}", r=ident(role)))
    yield role
    with srv.session(srv.shared_db) as conn:
        for (name,) in conn.execute("SELECT datname FROM pg_database WHERE datname LIKE 'wt\\_0bc0ffee%'").fetchall():
            conn.execute(sql_text("DROP DATABASE {d} WITH (FORCE)", d=ident(name)))
        conn.execute(sql_text("DROP ROLE {r}", r=ident(role)))


def test_a_copy_is_not_dropped_while_its_box_lends_its_databases(srv, box_role):
    copy = boxcopy.copy_name(box_role, boxcopy.OUTGOING)
    with srv.session(srv.shared_db) as conn:
        conn.execute(sql_text("CREATE DATABASE {d} OWNER {r}", d=ident(copy), r=ident(box_role)))
    dropped = threading.Event()

    def drop() -> None:
        boxcopy.drop_database(srv, copy)
        dropped.set()

    with contextlib.closing(srv.connect()) as lending:  # another session, as the forking process's
        with boxcopy.owner_lock(lending, box_role):  # as hand_to_box holds it around the lending
            t = threading.Thread(target=drop)
            t.start()
            time.sleep(0.5)
            there = lending.execute("SELECT 1 FROM pg_database WHERE datname = %s", (copy,)).fetchone()
            assert not dropped.is_set() and there
        assert dropped.wait(10)
    t.join()
    assert not boxcopy.exists(srv, copy)


def test_the_lock_is_named_by_the_box_whichever_of_its_databases(box_role):
    assert boxcopy.owner_of(box_role) == box_role
    for kind in (boxcopy.OUTGOING, boxcopy.INCOMING, "s"):
        assert boxcopy.owner_of(boxcopy.copy_name(box_role, kind)) == box_role
