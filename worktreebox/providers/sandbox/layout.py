"""What a box sees of the file system: bubblewrap's mount arguments for a holder.

- The host read-only (`--ro-bind / /`), so the host's toolchains work as they do outside.
- Its own `/tmp` and `/dev/shm` (tmpfs, 1777), its own `/proc` (its pid namespace only) and a
  minimal `/dev`.
- `/run` masked (sockets of the host's daemons: docker, dbus, PostgreSQL), except the file
  resolv.conf points into.
- $WTBOX_HOME masked: no other box, no registry, no PostgreSQL data or socket; then the box's
  own paths bound back at the same path (writable or read-only).
- A directory the box's user could not enter anyway (root's 0700 home above $WTBOX_HOME) is
  replaced by an empty one it can, so the paths bound below it are reachable; nothing that was
  readable is lost by that.
Mount points bubblewrap makes for a bind are created 0700 unless asked otherwise, which would
shut the box's user out of its own paths: every parent is made first with `--perms 0755 --dir`.
"""
from __future__ import annotations

import ipaddress
import os
import stat
from pathlib import Path

from worktreebox.providers.sandbox.base import Spec
from worktreebox.system import procfs

DNS_FORWARD = "10.0.2.3"  # slirp4netns's resolver: what a box asks when the host's resolver is on its loopback


def filesystem_args(spec: Spec, *, uid: int, gids: set[int], resolv: Path | None = None) -> list[str]:
    """bwrap's arguments for everything the box sees; `resolv`: a resolv.conf to show instead of
    the host's (see `resolver`)."""
    args = ["--ro-bind", "/", "/", "--proc", "/proc", "--dev", "/dev",
            "--perms", "1777", "--tmpfs", "/dev/shm", "--perms", "1777", "--tmpfs", "/tmp"]
    parents: set[Path] = {Path("/")}

    def mount(*how: str, dst: Path) -> None:
        if dst.parent not in parents:  # each mount point's parents made once, 0755
            parents.add(dst.parent)
            args.extend(["--perms", "0755", "--dir", str(dst.parent)])
        args.extend([*how, str(dst)])

    for hidden in masked(spec, uid=uid, gids=gids):
        mount("--perms", "0755", "--tmpfs", dst=hidden)
    resolv_at = Path(os.path.realpath("/etc/resolv.conf"))
    if resolv is not None:
        mount("--ro-bind", str(resolv), dst=resolv_at)
    elif _under(resolv_at, Path("/run")):
        mount("--ro-bind", str(resolv_at), dst=resolv_at)
    for bind in sorted(spec.binds, key=lambda b: len(b.dst.parts)):
        mount("--bind" if bind.writable else "--ro-bind", str(bind.src), dst=bind.dst)
    return args


def masked(spec: Spec, *, uid: int, gids: set[int]) -> list[Path]:
    """Directories replaced by an empty tmpfs, outermost first: /run, $WTBOX_HOME, and the first
    ancestor of a bound path (or of the home) that the box's user cannot enter."""
    wanted = {Path("/run"), spec.home}
    for path in [spec.home, *(b.dst for b in spec.binds)]:
        shut = closed_ancestor(path, uid=uid, gids=gids)
        if shut is not None:
            wanted.add(shut)
    # what lies below another mask (or below the box's own /tmp) is hidden already
    covers = wanted | {Path("/tmp")}
    return sorted((p for p in wanted if not any(_below(p, c) for c in covers)), key=lambda p: len(p.parts))


def closed_ancestor(path: Path, *, uid: int, gids: set[int],
                    known: dict[str, bool | None] | None = None) -> Path | None:
    """The outermost existing directory above `path` that `uid` may not enter (no search permission).
    `known`: what was found of directories before (a walk of many paths shares their ancestors)."""
    known = {} if known is None else known
    parent = ""
    for name in path.parts[:-1]:
        parent = os.path.join(parent, name) if parent else name
        if parent not in known:
            try:
                known[parent] = _may_enter(os.stat(parent), uid, gids)
            except OSError:
                known[parent] = None  # what does not exist is made by bwrap, reachable
        enter = known[parent]
        if enter is None:
            return None
        if not enter:
            return Path(parent)
    return None


def _may_enter(st: os.stat_result, uid: int, gids: set[int]) -> bool:
    if uid == 0:
        return True
    if st.st_uid == uid:
        return bool(st.st_mode & stat.S_IXUSR)
    if st.st_gid in gids:
        return bool(st.st_mode & stat.S_IXGRP)
    return bool(st.st_mode & stat.S_IXOTH)


# ---------------------------------------------------------------- toolchains

SYSTEM_DIRS = (Path("/usr"), Path("/bin"), Path("/sbin"), Path("/lib"), Path("/snap"))
PREFIX_DIRS = ("bin", "sbin", "shims")  # a tool dir whose parent is the installation (bin/ beside lib/)


def toolchain(path_dirs: list[str], extra: list[str], *, uid: int, gids: set[int]) -> list[Path]:
    """What the box must see read-only to run the tools its PATH names (and `extra` paths: wtbox's
    own interpreter and package) when they lie below a directory its user cannot enter, as a
    pyenv Python under root's 0700 home does, or below one the box has its own of (a checkout in
    /tmp): the installation of each (a `bin` dir's parent when it holds `lib/` or `versions/`, else
    the dir itself), also for the targets of the symlinks in non-system PATH dirs (a venv's python).
    Outermost first, none below another."""
    wanted: set[Path] = set()
    known: dict[str, bool | None] = {}
    for raw in dict.fromkeys([*path_dirs, *extra]):  # (a PATH often names a dir twice)
        for real in _targets(raw):
            if closed_ancestor(real, uid=uid, gids=gids, known=known) is not None or _under_own(real):
                wanted.add(_installation(real))
    return sorted((p for p in wanted if not any(_below(p, q) for q in wanted)), key=lambda p: (len(p.parts), p))


OWN_DIRS = (Path("/tmp"), Path("/dev/shm"), Path("/run"))  # the box's own tmpfs, or masked: the host's hidden


def _under_own(path: Path) -> bool:
    """Below a directory the box has its own of (a checkout and its venv in the host's /tmp)."""
    return any(_below(path, root) for root in OWN_DIRS)


def _targets(raw: str) -> list[Path]:
    """A path as it really is, and for a non-system directory the real places its symlinks lead to."""
    if not raw or not os.path.isabs(raw):
        return []
    real = Path(procfs.real_path(raw))
    out = [real]
    if real.is_dir() and not any(_under(real, d) for d in SYSTEM_DIRS):
        try:
            entries = list(os.scandir(real))
        except OSError:
            entries = []
        out += [Path(procfs.real_path(e.path)) for e in entries if e.is_symlink()]
    return out


def _installation(path: Path) -> Path:
    tool_dir = path if path.is_dir() else path.parent
    top = tool_dir.parent
    if tool_dir.name in PREFIX_DIRS and ((top / "lib").is_dir() or (top / "versions").is_dir()):
        return top
    return tool_dir


def _under(path: Path, root: Path) -> bool:
    """`path` is `root` or lies below it (absolute, normal paths; by their text: Path.parents makes a
    Path of every level, most of the toolchain walk's time)."""
    p, r = str(path), str(root)
    return p == r or p.startswith(r.rstrip("/") + "/")


def _below(path: Path, root: Path) -> bool:
    """`root` is one of `path`'s parents."""
    return path != root and _under(path, root)


# ---------------------------------------------------------------- names

def nameservers(text: str) -> list[str]:
    """The nameserver addresses of a resolv.conf."""
    out = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0] == "nameserver":
            out.append(parts[1])
    return out


def resolver(text: str) -> str | None:
    """A resolv.conf for the box when every nameserver of the host's is on the host's loopback
    (systemd-resolved's 127.0.0.53, a local dnsmasq): the box's loopback is its own, so it asks
    DNS_FORWARD instead, which the network helper maps to the host's resolver. None: the host's
    file works as it is."""
    servers = nameservers(text)
    if not servers or not all(_loopback(s) for s in servers):
        return None
    kept = [line for line in text.splitlines() if not line.strip().startswith("nameserver")]
    return "\n".join([f"nameserver {DNS_FORWARD}", *kept]) + "\n"


def _loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address.split("%", 1)[0]).is_loopback
    except ValueError:
        return False
