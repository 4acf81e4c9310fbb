"""worktreebox/cli/protocol.py: which commands a CLI server may run, where its files are, and the
launcher/server conversation over a socket pair (no server process: tests/cli/test_server.py
runs the real one)."""
from __future__ import annotations

import os
import socket
import time

import pytest

from worktreebox.cli import protocol


@pytest.mark.parametrize(("args", "tty", "served"), [
    (["ls"], False, True),
    (["ls", "--json"], True, True),
    (["new", "fix-login", "--repo", "."], True, True),
    (["status", "box", "--json"], False, True),
    (["logs", "box", "-n", "50"], True, True),
    (["logs", "box", "-f"], True, False),  # follows until Ctrl-C: job control wanted
    (["logs", "box", "-sf", "web"], True, False),  # -f inside a cluster of short flags
    (["logs", "box", "--follow"], False, False),
    (["top", "--watch"], True, False),
    (["top", "--watch=2"], True, False),
    (["top"], True, True),
    (["rm", "--all"], True, False),  # asks on the terminal
    (["rm", "--all"], False, True),  # no terminal: nothing to ask
    (["rm", "--all", "--yes"], True, True),
    (["rm", "box"], True, True),
    (["ls", "--help"], False, False),
    (["new", "-h"], False, False),
    (["exec", "box", "--", "ls"], False, False),  # needs the caller's terminal and process
    (["shell", "box"], True, False),
    (["mcp"], False, False),
    (["gc"], False, False),
    (["server", "stop"], False, False),  # must work on a broken server
    (["nosuchcommand"], False, False),
    ([], False, False),
    (["db", "status"], False, True),
])
def test_which_commands_are_served(args, tty, served):
    assert protocol.served(args, stdin_is_tty=tty) is served


def test_options_after_a_double_dash_belong_to_the_box_command():
    # `-f` and `--help` after `--` are arguments of what runs in the box, not wtbox's options
    assert protocol.served(["status", "box", "--", "--help"], stdin_is_tty=False)
    assert protocol.served(["logs", "box", "--", "-f"], stdin_is_tty=False)


def test_every_served_command_is_a_known_command():
    from worktreebox.cli.main import COMMANDS

    assert protocol.SERVED.issubset(COMMANDS)


def test_the_files_of_a_homes_server_live_in_its_run_dir(tmp_path):
    home = str(tmp_path / "home")
    assert protocol.run_dir(home) == os.path.join(home, "run")
    assert {os.path.basename(p(home)) for p in (protocol.socket_path, protocol.lock_path, protocol.log_path)} == {
        "cli.sock", "cli.lock", "cli.log"}
    assert {os.path.dirname(p(home)) for p in (protocol.socket_path, protocol.lock_path, protocol.log_path)} == {
        protocol.run_dir(home)}


@pytest.mark.parametrize(("value", "off"), [(None, False), ("0", False), ("1", True), ("yes", True)])
def test_turned_off_by_wtbox_no_server(monkeypatch, value, off):
    if value is None:
        monkeypatch.delenv("WTBOX_NO_SERVER", raising=False)
    else:
        monkeypatch.setenv("WTBOX_NO_SERVER", value)
    assert protocol.turned_off() is off


def test_asking_a_home_without_a_server_is_none_at_once(tmp_path):
    t0 = time.monotonic()
    assert protocol.ask(str(tmp_path / "home"), "status") is None
    assert protocol.connect(str(tmp_path / "home"), timeout=1) is None
    assert time.monotonic() - t0 < 1


def test_a_served_command_as_the_launcher_and_server_speak_it(tmp_path):
    """run + its four descriptors -> the child's pid -> go -> the exit code, as in the module's docstring."""
    launcher, server = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    out = tmp_path / "out"
    with launcher, server, open(out, "w") as stdout:
        fds = [0, stdout.fileno(), 2, os.open(str(tmp_path), os.O_RDONLY)]
        request = {"op": "run", "argv": ["ls", "--json"], "argv0": "wtbox", "main_package": "worktreebox",
                   "env": {"WTBOX_HOME": str(tmp_path)}, "umask": 0o22, "cwd": str(tmp_path), "pid": os.getpid()}
        protocol.send(launcher, request, fds)
        os.close(fds[3])
        got, received = protocol.recv(server, max_fds=4)
        assert got == request and len(received) == 4
        os.write(received[1], b"written through the launcher's stdout\n")  # the server's child writes here
        for fd in received:
            os.close(fd)
        protocol.send(server, {"pid": 4242})
        assert protocol.recv(launcher) == ({"pid": 4242}, [])
        protocol.send(launcher, {"go": True})
        assert protocol.recv(server)[0] == {"go": True}
        protocol.send(server, {"exit": 3})
        assert protocol.recv(launcher)[0] == {"exit": 3}
    assert out.read_text() == "written through the launcher's stdout\n"


def test_a_refusal_is_a_message_too():
    launcher, server = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with launcher, server:
        protocol.send(server, {"refused": "another install's server"})
        assert protocol.recv(launcher) == ({"refused": "another install's server"}, [])
