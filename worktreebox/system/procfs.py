"""The one reader of /proc: every file wtbox reads there, and the parsers of their formats.

Standard library `os` only, and nothing at import: the `wtbox` launcher imports it on every call.
Readers return None (or an empty value) when the file is gone or not ours to read: a process
can end between listing and reading, and that is never an error here. The parsers take the
file's text, so tests feed them lines without any process.
"""
from __future__ import annotations

import os

TYPE_CHECKING = False  # not typing's: importing typing costs the launcher ~5 ms (as in unixsock)
if TYPE_CHECKING:  # not imported: the CLI launcher imports this module, and pathlib costs it ~10 ms
    from pathlib import Path

PROC = "/proc"
SELF_CGROUP = f"{PROC}/self/cgroup"  # named in messages, so a reader knows which file said so
SELF_MOUNTINFO = f"{PROC}/self/mountinfo"


def _path(pid: int | str, name: str) -> str:
    return f"{PROC}/{pid}/{name}"


def _read(path: str) -> bytes | None:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:  # gone, a kernel thread, or not ours to read
        return None


# ---------------------------------------------------------------- processes

def pids() -> list[int]:
    """Every process id the kernel shows us now."""
    return [int(n) for n in os.listdir(PROC) if n.isdigit()]


def stat_fields(pid: int) -> list[bytes] | None:
    """The fields of a process's stat file after its command name (see parse_stat)."""
    data = _read(_path(pid, "stat"))
    return parse_stat(data) if data else None


def parse_stat(data: bytes) -> list[bytes]:
    """stat's fields after `(comm)`: state is [0], ppid [1], starttime [19]. The command name may
    hold spaces and parentheses, so the split starts after the last ')'."""
    return data[data.rfind(b")") + 2:].split()


def usage(pid: int) -> tuple[float, int] | None:
    """A process's CPU seconds (user + system) and resident bytes, from its stat file."""
    fields = stat_fields(pid) or []
    try:
        ticks = int(fields[11]) + int(fields[12])  # utime, stime
        return ticks / os.sysconf("SC_CLK_TCK"), int(fields[21]) * os.sysconf("SC_PAGE_SIZE")  # rss in pages
    except (ValueError, IndexError):
        return None


def descendants(roots: set[int]) -> set[int]:
    """The processes under `roots` (roots included while alive): one pass over every stat file."""
    children: dict[int, list[int]] = {}
    for pid in pids():
        fields = stat_fields(pid)
        if fields and len(fields) > 1:
            children.setdefault(int(fields[1]), []).append(pid)
    found = {r for r in roots if os.path.exists(_path(r, "stat"))}
    todo = list(found)
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def children(pid: int) -> list[int]:
    """A process's children (its main thread's), without a walk of every process."""
    data = _read(f"{PROC}/{pid}/task/{pid}/children")
    return [int(c) for c in data.split()] if data else []


def listening_inodes(pid: int | str, port: int) -> set[int]:
    """Socket inodes listening on TCP `port` (any address, v4 or v6) in `pid`'s network namespace."""
    found: set[int] = set()
    for name in ("net/tcp", "net/tcp6"):
        found |= parse_listening((_read(_path(pid, name)) or b"").decode("ascii", "replace"), port)
    return found


def parse_listening(text: str, port: int) -> set[int]:
    """The inodes of /proc/net/tcp{,6} rows in state LISTEN (0A) whose local port is `port`."""
    found = set()
    for row in text.splitlines()[1:]:
        fields = row.split()
        if len(fields) > 9 and fields[3] == "0A" and fields[1].rsplit(":", 1)[-1] == f"{port:04X}":
            found.add(int(fields[9]))
    return found


def socket_inodes(pid: int | str) -> set[int]:
    """The inodes of the sockets a process holds open (its fd links read `socket:[inode]`)."""
    try:
        names = os.listdir(_path(pid, "fd"))
    except OSError:
        return set()
    found = set()
    for fd in names:
        try:
            link = os.readlink(_path(pid, f"fd/{fd}"))
        except OSError:
            continue
        if link.startswith("socket:["):
            found.add(int(link[8:-1]))
    return found


def environ(pid: int) -> bytes | None:
    """A process's environment, NUL-separated as the kernel keeps it."""
    return _read(_path(pid, "environ"))


def environ_value(data: bytes, key: str) -> str | None:
    """KEY's value in an environ block (see environ), or None when it is not set."""
    needle = key.encode() + b"="
    i = data.find(needle)
    while i > 0 and data[i - 1] != 0:  # FOO_KEY=... is not KEY=...
        i = data.find(needle, i + 1)
    if i < 0:
        return None
    end = data.find(b"\0", i)
    return data[i + len(needle):end if end >= 0 else None].decode("utf-8", "replace")


def cmdline_bytes(pid: int) -> bytes | None:
    """A process's command line, NUL-separated."""
    return _read(_path(pid, "cmdline"))


def cmdline(pid: int) -> list[str]:
    return [a.decode("utf-8", "replace") for a in (cmdline_bytes(pid) or b"").split(b"\0") if a]


def comm(pid: int) -> str | None:
    """The kernel's name of a process, None when it is gone."""
    data = _read(_path(pid, "comm"))
    return data.decode("utf-8", "replace").strip() if data is not None else None


def name_self(name: str) -> bool:
    """Set this process's kernel name (what `comm` and `ps -o comm` show; 15 bytes at most), the one
    file written here: teardown finds a helper by it. False when the kernel refuses."""
    try:
        with open(_path("self", "comm"), "w") as f:
            f.write(name[:15])
        return True
    except OSError:
        return False


def umask() -> int:
    """This process's umask, read without setting it (os.umask sets it: another thread creating a
    file meanwhile would get the value it was set to); os.umask where the kernel does not say."""
    for line in (_read(_path("self", "status")) or b"").splitlines():
        if line.startswith(b"Umask:"):
            return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def cwd(pid: int) -> str | None:
    """A process's working directory (without the kernel's ' (deleted)' mark), None when unreadable."""
    try:
        where = os.readlink(_path(pid, "cwd"))
    except OSError:
        return None
    return where.removesuffix(" (deleted)")


def thread_ids(pid: int) -> list[str]:
    try:
        return os.listdir(_path(pid, "task"))
    except OSError:
        return []


def runnable_ns(pid: int, tid: str) -> int | None:
    """ns a thread has been on a CPU or waiting for one (schedstat's first two fields)."""
    data = _read(_path(pid, f"task/{tid}/schedstat"))
    try:
        fields = (data or b"").split()
        return int(fields[0]) + int(fields[1])
    except (ValueError, IndexError):
        return None


# ---------------------------------------------------------------- this process

def own_cgroup() -> str:
    """This process's cgroup file ('' when unreadable): one `id:controllers:path` line per hierarchy."""
    return (_read(SELF_CGROUP) or b"").decode("utf-8", "replace")


def unified_cgroup_path(text: str) -> str | None:
    """The cgroup v2 path in a cgroup file (its `0::` line), None when there is none."""
    return next((line[3:] for line in text.splitlines() if line.startswith("0::")), None)


def namespace_file(pid: int | str, kind: str) -> str:
    """The kernel's handle on one namespace ("net", "user", ...) of a process, as a path tools take
    (`pasta --netns PATH`); only as good as the pid: check its identity first."""
    return _path(pid, f"ns/{kind}")


def root_path(pid: int, path: str | Path) -> str:
    """`path` as process `pid` sees it (through its mount namespace and root)."""
    return _path(pid, f"root{path}")


def real_path(path: str) -> str:
    """os.path.realpath(path), resolved by the kernel when the path exists: one open and one readlink of
    its descriptor's name instead of an lstat per component in Python (a toolchain walk resolves ~40)."""
    try:
        fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
    except OSError:  # missing (realpath resolves what exists of it), or not ours to reach
        return os.path.realpath(path)
    try:
        return os.readlink(fd_path(fd))
    except OSError:
        return os.path.realpath(path)
    finally:
        os.close(fd)


def fd_path(fd: int) -> str:
    """A path that names what this process's descriptor `fd` names (a short path to a deep directory)."""
    return _path("self", f"fd/{fd}")


def sysctl(name: str) -> str | None:
    """A kernel setting by its sysctl name with slashes (net/ipv4/ip_local_port_range), None if unreadable."""
    data = _read(f"{PROC}/sys/{name}")
    return data.decode().strip() if data is not None else None


# ---------------------------------------------------------------- the mount table

def mountinfo_text() -> str:
    """This process's mount table as the kernel writes it; OSError when it cannot be read."""
    with open(SELF_MOUNTINFO, "rb") as f:
        return f.read().decode("utf-8", "surrogateescape")


def mountinfo() -> list[tuple[str, str, str, str]]:
    """(target, fstype, source, super options) of every mount this process sees, in mount order."""
    try:
        return parse_mountinfo(mountinfo_text())
    except OSError:
        return []


def shared_mounts() -> set[str]:
    """The targets of this process's mounts that are shared (their peers see what is mounted below)."""
    try:
        text = mountinfo_text()
    except OSError:
        return set()
    out = set()
    for line in text.splitlines():
        left, sep, _ = line.partition(" - ")
        fields = left.split()
        if sep and len(fields) >= 5 and any(f.startswith("shared:") for f in fields[6:]):
            out.add(unescape(fields[4]))
    return out


def parse_mountinfo(text: str) -> list[tuple[str, str, str, str]]:
    """(target, fstype, source, super options) per well-formed line of a mountinfo file:
    `id parent major:minor root target options [optional...] - fstype source super-options`."""
    out = []
    for line in text.splitlines():
        left, sep, right = line.partition(" - ")
        if not sep:
            continue
        fields, tail = left.split(), right.split()
        if len(fields) < 5 or len(tail) < 2:
            continue
        out.append((unescape(fields[4]), tail[0], unescape(tail[1]), unescape(tail[2]) if len(tail) > 2 else ""))
    return out


def unescape(field: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as \\ooo (octal)."""
    if "\\" not in field:
        return field
    out, i = [], 0
    while i < len(field):
        code = field[i + 1:i + 4]
        if field[i] == "\\" and len(code) == 3 and code.isdigit():
            out.append(chr(int(code, 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def give_back_memory() -> None:
    """This process's free heap pages back to the kernel (glibc's malloc_trim): a box's supervisor
    calls it when the box goes calm; what starting up, a push or a busy spell freed stays resident
    otherwise (0.9 MB of an idle supervisor)."""
    try:
        import ctypes  # loaded already in the supervisor: the output files' hole punching uses it

        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass
