"""The embedded cluster's first start, killed half-way: the next command must finish it.

A `wtbox new` killed (kill -9) after its first `pg_ctl start` and before it made the shared
`wtbox` database left a cluster that ran without it: every later command returned at once
("running") and then failed on "database wtbox does not exist", gc included; nothing repaired it.
"""
from __future__ import annotations

import pytest

from worktreebox.providers.postgres import base
from worktreebox.providers.postgres.embedded import EmbeddedCluster

pytestmark = pytest.mark.slow


def test_a_start_killed_before_the_shared_database_is_finished_by_the_next(tmp_path, monkeypatch):
    cluster = EmbeddedCluster(tmp_path / "home")
    (tmp_path / "home").mkdir()
    real = EmbeddedCluster._prepare_shared_db

    def killed(self):
        raise KeyboardInterrupt  # as far as this start gets: the cluster runs, the database is not made

    monkeypatch.setattr(EmbeddedCluster, "_prepare_shared_db", killed)
    try:
        with pytest.raises(KeyboardInterrupt):
            cluster.ensure_running()
        assert cluster.pg_ctl_status()
        monkeypatch.setattr(EmbeddedCluster, "_prepare_shared_db", real)
        again = EmbeddedCluster(tmp_path / "home")  # the next command
        again.ensure_running()
        conn = again._connect(base.SHARED_DB)
        conn.close()
    finally:
        EmbeddedCluster(tmp_path / "home").stop()


def test_a_stopped_cluster_of_a_long_home_leaves_no_socket_dir_in_tmp(tmp_path):
    """A home whose path is too long for a socket keeps the socket in /tmp/wtbox-pg-<hash>: its stop
    left the empty dir there (60 of them in /tmp after a day of tests), the one thing of a home
    outside it."""
    home = tmp_path / ("h" * 90)
    home.mkdir()
    cluster = EmbeddedCluster(home)
    sock = cluster.socket_dir
    assert str(sock).startswith("/tmp/wtbox-pg-")
    try:
        cluster.ensure_running()
        assert sock.is_dir()
    finally:
        assert EmbeddedCluster(home).stop()
    assert not sock.exists()
    cluster.ensure_running()  # and the next start makes it again
    try:
        assert sock.is_dir()
    finally:
        EmbeddedCluster(home).stop()
