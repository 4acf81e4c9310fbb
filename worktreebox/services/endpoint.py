"""The box endpoint: `wtbox` typed inside a sandboxed box works for that box, and only for it.

A box cannot reach its home (masked), its registry or the host's CLI server; what it can reach is
a unix socket in boxes/<id>/endpoint/ (bound read-only into the box; a socket in a read-only mount
still accepts connections), served by the box's supervisor. The launcher inside the box
(cli/launcher.py, WTBOX_BOX_SOCKET set) sends argv, a few terminal variables and its stdin,
stdout and stderr (unixsock framing, SCM_RIGHTS, as the CLI server protocol does); the
supervisor runs `wtbox <command> <this box> ...` on the host's side (its network namespace: the
box's leased ports and metrics store are the host's; its mount namespace; as root) with those
descriptors, and answers the exit code.

What runs is narrow on purpose, since it runs as root for a box that may be hostile: only
`logs`, `metrics`, `traces`, `probe`, `browse`, `status`, `restart`; this box's id goes in as BOX
(a BOX naming another box is refused, in one sentence); no option that reads or writes a file of
the host (--secret NAME=@FILE, --screenshot, --diff) or names another box (--compare); a clean
environment (the caller's terminal width and colour wishes only).

    launcher -> supervisor {"op": "run", "argv": [...], "env": {TERM, COLUMNS, ...}} + fds [0, 1, 2]
    supervisor -> launcher {"exit": code}  or  {"refused": "<sentence>"}
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

from worktreebox.system import procfs, procs, unixsock

SOCKET = "box.sock"  # in boxes/<id>/endpoint/
COMMANDS = ("logs", "metrics", "traces", "probe", "browse", "status", "restart")
REFUSED_OPTIONS = ("--secret", "--screenshot", "--diff", "--compare")
PASSED_ENV = ("TERM", "COLUMNS", "LINES", "NO_COLOR", "FORCE_COLOR", "LANG", "LC_ALL")


class Refused(Exception):
    """What a box asked for that it may not have; the message is the sentence it gets."""


def host_argv(argv: list[str], box_id: str, box_named: Callable[[str], str | None]) -> list[str]:
    """The host's `wtbox` argv for what the box typed: its own id as BOX. `box_named(word)` is the id of
    the box a word names (None: it names none)."""
    if not argv or argv[0] not in COMMANDS:
        asked = f"'wtbox {argv[0]}'" if argv else "wtbox without a command"
        raise Refused(f"Inside box {box_id}, {asked} is not available; wtbox runs {', '.join(COMMANDS)} here, "
                      f"for this box only.")
    rest = list(argv[1:])
    for arg in rest:
        if arg.split("=", 1)[0] in REFUSED_OPTIONS:
            raise Refused(f"Inside box {box_id}, {arg.split('=', 1)[0]} is not available (it reads or writes "
                          f"the host's files, or names another box); run it on the host.")
    word = next((i for i, a in enumerate(rest) if not a.startswith("-")), None)
    named = box_named(rest[word]) if word is not None else None
    if word is not None and named is not None and named != box_id:
        raise Refused(f"Inside box {box_id}, wtbox works on this box only; {rest[word]!r} is another box.")
    if word is not None and named == box_id:
        del rest[word]
    return [argv[0], box_id, *rest]


class Endpoint:
    """The supervisor's side: a thread accepting on the socket, one thread per request."""

    def __init__(self, home: Path, box_id: str, host_netns_fd: int | None) -> None:
        self.home, self.box_id, self.netns_fd = home, box_id, host_netns_fd
        self.path = home / "boxes" / box_id / "endpoint" / SOCKET

    def names(self) -> tuple[str, Callable[[str], str | None]]:
        """This box's id now (a box claimed from the pool has a new one; its hex stays) and what names
        a box: its id or its task name."""
        from worktreebox.box import hex_of
        from worktreebox.registry import Registry

        boxes = [(b.id, b.task) for b in Registry(self.home / "registry.sqlite3").select_all_boxes()]
        me = next((i for i, _ in boxes if hex_of(i) == hex_of(self.box_id)), self.box_id)
        return me, lambda word: next((i for i, task in boxes if word in (i, task)), None)

    def start(self) -> None:
        self.path.unlink(missing_ok=True)
        srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        unixsock.bind(srv, str(self.path))
        os.chmod(self.path, 0o666)  # the box's user connects; only this box sees the socket
        srv.listen(8)
        threading.Thread(target=self._accept, args=(srv,), name="endpoint", daemon=True).start()

    def _accept(self, srv: socket.socket) -> None:
        while True:
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        fds: list[int] = []
        with conn:
            try:
                msg, fds = unixsock.recv(conn, max_fds=3)
                argv = [str(a) for a in msg.get("argv") or []]
                if len(fds) != 3:
                    raise Refused("The request came without the caller's stdin, stdout and stderr.")
                me, named = self.names()
                code = self._run(host_argv(argv, me, named), msg.get("env") or {}, fds, conn)
                unixsock.send(conn, {"exit": code})
            except Refused as e:
                _answer(conn, {"refused": str(e)})
            except (OSError, unixsock.ProtocolError):
                pass
            finally:
                for fd in fds:
                    os.close(fd)

    def _run(self, argv: list[str], caller_env: dict[str, str], fds: list[int], conn: socket.socket) -> int:
        env = {k: str(v) for k, v in caller_env.items() if k in PASSED_ENV}
        env.update({"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "WTBOX_HOME": str(self.home)})
        cmd = [sys.executable, "-m", "worktreebox.cli.launcher", *argv]
        if self.netns_fd is not None:  # the host's network: leased ports, the metrics store as the host sees them
            cmd = ["nsenter", f"--net={procfs.fd_path(self.netns_fd)}", "--", *cmd]
        proc = procs.spawn(cmd, cwd=str(self.home), env=env, stdin=fds[0], stdout=fds[1], stderr=fds[2],
                           pass_fds=(self.netns_fd,) if self.netns_fd is not None else ())
        gone = threading.Thread(target=_hang_up, args=(conn, proc), daemon=True)
        gone.start()
        return proc.wait()


def _hang_up(conn: socket.socket, proc: subprocess.Popen) -> None:
    """The caller sends nothing more: end of file means it went away (Ctrl-C, killed): so does its command."""
    try:
        while conn.recv(64):
            pass
    except OSError:
        pass
    if proc.poll() is None:
        procs.stop_group(proc)


def _answer(conn: socket.socket, obj: dict) -> None:
    try:
        unixsock.send(conn, obj)
    except OSError:
        pass
