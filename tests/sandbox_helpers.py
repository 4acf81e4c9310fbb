"""Boxes as the sandbox tests make them: a box dir, a real cgroup, a real holder (bwrap, slirp4netns, nft)."""
from __future__ import annotations

import dataclasses
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from worktreebox.providers.sandbox import base, get
from worktreebox.providers.sandbox.namespaces import TOOLS, Namespaces
from worktreebox.system import cgroups, procs


def needs_sandbox_tools() -> pytest.MarkDecorator:
    missing = [t for t in TOOLS if shutil.which(t) is None]
    return pytest.mark.skipif(bool(missing), reason=f"sandbox tools missing: {', '.join(missing)}")


@dataclasses.dataclass
class TestBox:
    """One box: its dir, cgroup leaf names and live holder."""

    __test__ = False
    id: str
    home: Path
    dir: Path
    sandbox: Namespaces
    holder: base.Holder | None = None

    @property
    def worktree(self) -> Path:
        return self.dir / "worktree"

    def leaf(self, name: str = "_exec") -> cgroups.Leaf | None:
        return cgroups.Leaf(self.home, self.id, name) if cgroups.for_home(self.home) else None

    def argv(self, cmd: str, cwd: Path | None = None) -> list[str]:
        return self.sandbox.command(self.holder, ["/bin/sh", "-c", cmd], cwd=cwd or self.worktree)

    def run(self, cmd: str, *, timeout: float = 30, cwd: Path | None = None) -> subprocess.CompletedProcess:
        """`cmd` inside the box as its user, through the launcher and in the box's cgroup."""
        proc = procs.spawn(self.argv(cmd, cwd), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           env=self.env(), cgroup=self.leaf())
        out, err = proc.communicate(timeout=timeout)
        return subprocess.CompletedProcess(proc.args, proc.returncode, out.decode(), err.decode())

    def start(self, cmd: str, leaf: str = "web") -> subprocess.Popen:
        """A long-running process of the box (a 'service'), in its own cgroup leaf."""
        return procs.spawn(self.argv(cmd), env=self.env(), cgroup=self.leaf(leaf))

    def env(self) -> dict[str, str]:
        return {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": str(self.dir / "home"), "WTBOX_ID": self.id,
                "WTBOX_BOX_DIR": str(self.dir), "LC_ALL": "C.UTF-8"}

    def netns(self, argv: list[str]) -> list[str]:
        return self.sandbox.netns_command(self.holder, argv)


def make_box(home: Path, box_id: str, *, network: str = "open", gateway: bool = False,
             repo_git: Path | None = None, sandbox: Namespaces | None = None) -> TestBox:
    box_dir = home / "boxes" / box_id
    for name in ("worktree", "cache", "tmp", "home", "git", "run"):
        (box_dir / name).mkdir(parents=True, exist_ok=True)
    backend = cgroups.for_home(home)
    if backend is not None:
        backend.create(box_id, cgroups.Limits())
    box = TestBox(box_id, home, box_dir, sandbox or get("namespaces"))  # type: ignore[arg-type]
    spec = base.Spec(box_id, home, box_dir, base.box_binds(box_dir, repo_git=repo_git), network=network,
                     gateway=gateway)
    try:
        box.holder = box.sandbox.create(spec, cgroup=box.leaf(base.LEAF))
    except BaseException:
        if backend is not None:
            backend.remove(box_id)  # create cleaned up its own part; the cgroup is ours
        raise
    return box


def end_box(box: TestBox) -> None:
    box.sandbox.destroy(box.id, box.dir)
    backend = cgroups.for_home(box.home)
    if backend is not None:
        backend.remove(box.id)


def free_listener(host: str = "127.0.0.1") -> tuple[socket.socket, int]:
    sock = socket.create_server((host, 0))
    return sock, sock.getsockname()[1]


def serve_forwards(box: TestBox, specs: list[tuple[socket.socket, str, int]]) -> subprocess.Popen:
    """The box's forwards in its network namespace (as its supervisor will run them): each host
    socket's connections go to 127.0.0.1:<port> inside the box."""
    fds = [s.fileno() for s, _, _ in specs]
    args = [f"{s.fileno()}:{name}:127.0.0.1:{port}" for s, name, port in specs]
    return procs.spawn(box.netns([sys.executable, "-m", "worktreebox.services.forwards", *args]),
                       pass_fds=fds, env={"PATH": "/usr/bin:/bin", "WTBOX_ID": box.id, "WTBOX_BOX_DIR": str(box.dir)},
                       cgroup=box.leaf("_supervisor"))


def http_get(port: int, path: str = "/", host: str = "127.0.0.1", timeout: float = 5) -> str:
    import urllib.request

    with urllib.request.urlopen(f"http://{host}:{port}{path}", timeout=timeout) as r:
        return r.read().decode()


def wait_http(port: int, path: str = "/", timeout: float = 10) -> str:
    deadline = time.monotonic() + timeout
    while True:
        try:
            return http_get(port, path)
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
