"""The one place that starts, stops and finds processes (honcho's Process, tox's executor).

- spawn: every long-lived or logged child wtbox starts goes through `spawn` (own session,
  so a group signal reaches its children; `before_exec` hooks run in the child before
  exec; `cgroup=` puts the child into a leaf of its box's cgroup before it runs anything).
- stop: staged, SIGTERM -> wait -> SIGKILL (`stop_group`, `stop_groups`, `stop_pid`,
  `kill_staged`), waiting until the processes are gone, not merely reaped.
- identity: (pid, start time) survives pid reuse, unlike a bare pid.
- find: every process a box starts sits in the box's cgroup (where the host has cgroups),
  carries WTBOX_ID=<id> in its environment (inherited by children and double-forked
  daemons alike), and most run with a cwd inside the box, so given an id the kernel can
  tell us exactly which processes belong to it. The cgroup is exact (a daemon that cleared
  its environment and left the box dir is still in it); env and cwd are the second net.
Only this module parses /proc.
"""
from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from worktreebox.system import cgroups

KILL_WAIT = 5.0

# Run in every spawned child just before exec (`spawn(cgroup=...)` puts the cgroup placement first).
BeforeExec = Callable[[], None]


# ---------------------------------------------------------------- spawning

def spawn(argv: Sequence[str], *, cwd: str | Path | None = None, env: dict[str, str] | None = None,
          stdin: Any = subprocess.DEVNULL, stdout: Any = subprocess.DEVNULL, stderr: Any = subprocess.DEVNULL,
          new_session: bool = True, nice: int = 0, before_exec: Sequence[BeforeExec] = (),
          pass_fds: Sequence[int] = (), cgroup: cgroups.Leaf | None = None) -> subprocess.Popen:
    """Start `argv` in its own session (its pid is its process group id); with `cgroup`, inside
    that leaf of its box's cgroup from its first instruction (nothing of it ever runs outside)."""
    hooks = list(before_exec)
    if nice:
        hooks.insert(0, lambda: os.nice(nice))
    if cgroup is not None:
        enter = cgroups.placement(cgroup)
        if enter is not None:
            hooks.insert(0, enter)

    def child() -> None:
        for hook in hooks:
            hook()

    try:
        return subprocess.Popen(list(argv), cwd=str(cwd) if cwd else None, env=env, stdin=stdin, stdout=stdout,
                                stderr=stderr, start_new_session=new_session, pass_fds=tuple(pass_fds),
                                preexec_fn=child if hooks else None)
    except subprocess.SubprocessError as e:  # a hook failed in the child (e.g. its cgroup was just removed)
        raise OSError(f"could not prepare the process ({e})") from None


def shell_argv(cmd: str) -> list[str]:
    """How a wtbox.toml command string is run."""
    return ["/bin/sh", "-c", cmd]


# ---------------------------------------------------------------- identity

def _stat_fields(pid: int) -> list[bytes] | None:
    """Fields of /proc/<pid>/stat after the command name (state is [0], ppid [1], starttime [19])."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    return stat[stat.rfind(b")") + 2:].split()


def identity(pid: int) -> list[int] | None:
    """[pid, start time in clock ticks]: survives pid reuse, unlike a bare pid."""
    fields = _stat_fields(pid)
    try:
        return [pid, int(fields[19])] if fields else None
    except (IndexError, ValueError):
        return None


def is_alive(ident: Sequence[int] | None) -> bool:
    """True when the process named by `identity()` is still the same live process."""
    if not ident:
        return False
    current = identity(ident[0])
    return current is not None and current[1] == ident[1] and pid_alive(ident[0])


def parent_of(pid: int) -> int | None:
    fields = _stat_fields(pid)
    try:
        return int(fields[1]) if fields else None
    except (IndexError, ValueError):
        return None


# The `wtbox` launcher a CLI server's child runs a command for (cliserver.py): its caller.
_ACTING_FOR: list[int] = []


def act_for(pid: int) -> None:
    """This process runs a command on behalf of process `pid`: spare it and its ancestors as our own."""
    _ACTING_FOR.append(pid)


def caller_and_ancestors() -> set[int]:
    """Ourselves and our ancestors (and those of the launcher we serve, if any): `wtbox rm` run
    from a shell inside the box must not kill that shell."""
    out = set()
    for start in (os.getpid(), *_ACTING_FOR):
        pid: int | None = start
        while pid and pid > 1 and pid not in out:
            out.add(pid)
            pid = parent_of(pid)
    return out


def _environ_id(pid: int) -> str | None:
    """WTBOX_ID from /proc/<pid>/environ, read directly: much faster than psutil for a full scan."""
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            data = f.read()
    except OSError:  # gone, a kernel thread, or not ours to read
        return None
    i = data.find(b"WTBOX_ID=")
    while i > 0 and data[i - 1] != 0:
        i = data.find(b"WTBOX_ID=", i + 1)
    if i < 0:
        return None
    end = data.find(b"\0", i)
    return data[i + 9:end if end >= 0 else None].decode("utf-8", "replace") or None


def _pids() -> list[int]:
    return [int(n) for n in os.listdir("/proc") if n.isdigit()]


def discover_box_ids(boxes_dir: Path | str) -> set[str]:
    """WTBOX_ID values of live processes that belong to boxes under `boxes_dir`.

    Several wtbox homes can share one machine (users, test suites): a process counts only
    when its WTBOX_BOX_DIR (every box process inherits the box env) or, failing that, its
    cwd lies under this home's boxes dir.
    """
    me = os.getpid()
    root = os.path.realpath(boxes_dir) + os.sep
    ids = set()
    for pid in _pids():
        if pid == me:
            continue
        box_id = _environ_id(pid)
        if not box_id:
            continue
        box_dir = _environ_var(pid, b"WTBOX_BOX_DIR=")
        if box_dir is None:
            try:
                box_dir = os.readlink(f"/proc/{pid}/cwd")
            except OSError:
                continue
        if os.path.realpath(box_dir).startswith(root) or box_dir.startswith(root):
            ids.add(box_id)
    return ids


def _environ_var(pid: int, key: bytes) -> str | None:
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            data = f.read()
    except OSError:
        return None
    for item in data.split(b"\0"):
        if item.startswith(key):
            return item[len(key):].decode("utf-8", "replace")
    return None


def find_box_processes(box_id: str, box_dir: Path | str | None) -> list[Any]:
    """psutil.Process objects that carry WTBOX_ID=<box_id> or whose cwd is inside box_dir."""

    root = os.path.realpath(box_dir) if box_dir else None
    protected = caller_and_ancestors()
    found = []
    for pid in _pids():
        if pid in protected:
            continue
        # WTBOX_ID alone could name a box of another home only by a 1-in-4-billion clash;
        # WTBOX_BOX_DIR rules even that out when the process carries it.
        mine = _environ_id(pid) == box_id and (
            box_dir is None or _environ_var(pid, b"WTBOX_BOX_DIR=") in (None, str(box_dir)))
        if not mine and root:
            try:
                cwd = os.readlink(f"/proc/{pid}/cwd")
            except OSError:
                cwd = None
            if cwd and cwd.endswith(" (deleted)"):
                cwd = cwd[: -len(" (deleted)")]
            mine = bool(cwd) and (cwd == root or cwd.startswith(root + os.sep))
        if not mine:
            continue
        import psutil  # only once something matched: the import costs ~35 ms per rm

        try:
            p = psutil.Process(pid)
            if p.status() == psutil.STATUS_ZOMBIE:
                continue  # already dead; its parent (or init) reaps it
            found.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


def kill_staged(procs: Iterable[Any], timeout: float = KILL_WAIT) -> list[int]:
    """Staged stop of found processes (psutil objects, e.g. from find_box_processes): SIGTERM them
    (whole groups they lead), wait up to `timeout`, then SIGKILL. Returns the pids."""
    procs = [p for p in procs if p.pid != os.getpid()]
    if not procs:
        return []
    pids = {p.pid for p in procs}
    own_pgid = os.getpgid(0)

    def send(sig: int, targets: list[Any]) -> None:
        for p in targets:
            try:
                pgid = os.getpgid(p.pid)
            except ProcessLookupError:
                continue
            try:
                # Signal a whole group only when its leader is one of ours: a stray that joined
                # someone else's group (a user's shell) must not take that group down with it.
                if pgid in pids and pgid != own_pgid:
                    os.killpg(pgid, sig)
                else:
                    os.kill(p.pid, sig)
            except (ProcessLookupError, PermissionError):
                pass

    send(signal.SIGTERM, procs)
    alive = wait_gone(procs, timeout)
    if alive:
        send(signal.SIGKILL, alive)
        wait_gone(alive, timeout)
    return sorted(pids)


def wait_gone(procs: Iterable[Any], timeout: float) -> list[Any]:
    """Wait until the processes (psutil objects, Popen objects or pids) are dead; returns the
    ones still alive. A zombie counts as dead, and is reaped when it is our child: psutil's
    wait_procs would wait for a reaping that a slow pid 1 may take seconds to do."""
    deadline = time.monotonic() + timeout
    alive = list(procs)
    while alive:
        still = []
        for p in alive:
            pid = p if isinstance(p, int) else p.pid
            if isinstance(p, subprocess.Popen):
                p.poll()
            else:
                try:
                    os.waitpid(pid, os.WNOHANG)
                except (ChildProcessError, OSError):
                    pass
            if pid_alive(pid):
                still.append(p)
        alive = still
        if not alive or time.monotonic() >= deadline:
            break
        time.sleep(0.01)
    return alive


def pid_alive(pid: int | None) -> bool:
    """True when the pid exists and is not a zombie."""
    if not pid:
        return False
    fields = _stat_fields(pid)
    return bool(fields) and fields[0] not in (b"Z", b"X")


def wait_started(pid: int, ready: Callable[[], bool], timeout: float, poll: float = 0.005) -> str | None:
    """Wait until `ready()` says a process we just started serves: None then, "exited" when it
    died first, "timeout" when `timeout` seconds passed. (A refused connect costs microseconds,
    so a short poll answers `new` as soon as the process listens.)"""
    deadline = time.monotonic() + timeout
    while True:
        if not pid_alive(pid):
            return "exited"
        if ready():
            return None
        if time.monotonic() > deadline:
            return "timeout"
        time.sleep(poll)


def signal_group(pgid: int | None, sig: int) -> bool:
    """Signal a whole process group, quietly; False when it is gone (or not ours)."""
    if not pgid or pgid <= 1:
        return False
    try:
        os.killpg(pgid, sig)
        return True
    except (ProcessLookupError, PermissionError):
        return False


def stop_groups(procs: Iterable[subprocess.Popen | int], wait: float = KILL_WAIT) -> None:
    """Staged stop of several process groups at once (each led by a process started with `spawn`):
    SIGTERM all, one wait, SIGKILL what is left (and stragglers in the groups), reap our children.
    Stopping N groups costs one `wait`, not N."""
    procs = [p for p in procs if p]
    for p in procs:
        signal_group(p if isinstance(p, int) else p.pid, signal.SIGTERM)
    wait_gone(procs, wait)
    for p in procs:
        signal_group(p if isinstance(p, int) else p.pid, signal.SIGKILL)
    wait_gone(procs, wait)


def stop_group(proc: subprocess.Popen | int | None, wait: float = KILL_WAIT) -> None:
    """Staged stop of one process group (see stop_groups)."""
    if proc:
        stop_groups([proc], wait)


def stop_pid(pid: int | None, wait: float = KILL_WAIT) -> bool:
    """Staged stop of one process (not its group). True when it is gone."""
    if not pid or not pid_alive(pid):
        return True
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return True
        if not wait_gone([pid], wait):
            return True
    return not pid_alive(pid)


def kill_mentioning(text: str, wait: float = KILL_WAIT) -> list[int]:
    """SIGKILL processes whose command line contains `text` (orphans of a killed child), and wait."""
    needle = text.encode()
    victims = []
    me = os.getpid()
    for pid in _pids():
        if pid == me:
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if needle in f.read():
                    os.kill(pid, signal.SIGKILL)
                    victims.append(pid)
        except (OSError, ProcessLookupError):
            continue
    wait_gone(victims, wait)
    return victims


def cmdline(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return [a.decode("utf-8", "replace") for a in f.read().split(b"\0") if a]
    except OSError:
        return []


# ---------------------------------------------------------------- detached helpers by name
# The metrics store and Vector run detached (reparented to init), found again by their
# name plus the WTBOX_ID in their environment, or by the pid file written at start.

def comm(pid: int) -> str | None:
    """The kernel's name of a process (/proc/<pid>/comm), None when it is gone."""
    try:
        with open(f"/proc/{pid}/comm", "rb") as f:
            return f.read().decode("utf-8", "replace").strip()
    except OSError:
        return None


def pids_named(name: str) -> list[int]:
    """Pids of live processes whose kernel name is `name`."""
    return [pid for pid in _pids() if comm(pid) == name]


def spawn_detached(cmd: list[str], *, env: dict[str, str], log_path: Path, cwd: str | Path | None = None,
                   cgroup: cgroups.Leaf | None = None) -> int:
    """Start cmd in its own session (and `cgroup`) as a grandchild (output appended to log_path);
    returns its pid.

    A shell starts it in the background and exits, so the process is reparented to init and is
    never a zombie child of a long-lived caller (a test, `wtbox mcp`), which would make it look
    alive to everyone who waits for it to end."""
    sh = spawn(["/bin/sh", "-c", '"$@" >>"$0" 2>&1 </dev/null & echo $!', str(log_path), *cmd], env=env, cwd=cwd,
               stdout=subprocess.PIPE, cgroup=cgroup)
    out, _ = sh.communicate()
    if sh.returncode != 0:
        raise subprocess.CalledProcessError(sh.returncode, cmd[0])
    return int(out.decode().strip())


def find_named(box_id: str, names: Iterable[str], box_dir: Path | None = None) -> list[Any]:
    """Live processes (psutil) with one of `names` whose environment carries WTBOX_ID=<box_id>
    (and, when given, WTBOX_BOX_DIR=<box_dir>, so another home's box is never touched)."""
    import psutil

    names = set(names)
    found = []
    for p in psutil.process_iter(["name"]):
        try:
            if p.info["name"] not in names:
                continue
            env = p.environ()
            if env.get("WTBOX_ID") != box_id:
                continue
            if box_dir is not None and env.get("WTBOX_BOX_DIR", str(box_dir)) != str(box_dir):
                continue
            found.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


def from_pid_file(pid_file: Path, box_id: str, names: Iterable[str] | None) -> Any | None:
    """The live process (psutil) a pid file names, if it is still ours (guards against pid reuse);
    `names` None: whatever its name (a binary the user may swap, such as Chromium)."""
    import psutil

    try:
        pid = int(pid_file.read_text().strip())
        p = psutil.Process(pid)
        if (names is None or p.name() in set(names)) and p.environ().get("WTBOX_ID") == box_id \
                and p.status() != psutil.STATUS_ZOMBIE:
            return p
    except (OSError, ValueError, psutil.Error):
        pass
    return None


def stop_named(box_id: str, *, run_dir: Path, names: Iterable[str], pid_files: Iterable[str],
               wait: float = KILL_WAIT) -> None:
    """Staged stop of a box's detached processes named `names`: those in the pid files (under
    run_dir), then any found by WTBOX_ID; the pid files are removed."""
    names, pid_files = tuple(names), tuple(pid_files)
    found = [p for f in pid_files if (p := from_pid_file(run_dir / f, box_id, names)) is not None]
    known = {p.pid for p in found}
    found += [q for q in find_named(box_id, names, box_dir=run_dir.parent) if q.pid not in known]
    if found:
        kill_staged(found, wait)
    for f in pid_files:
        (run_dir / f).unlink(missing_ok=True)


def named_box_ids(names: Iterable[str], under: Path) -> set[str]:
    """Box ids (WTBOX_ID) of live processes with one of `names` whose command line names a path
    under `under` (a home's boxes dir), as an argument or a `-flag=PATH` value."""
    import psutil

    names = set(names)
    root = f"{under}/"
    ids = set()
    for p in psutil.process_iter(["name", "cmdline"]):
        try:
            if p.info["name"] not in names:
                continue
            args = p.info["cmdline"] or []
            mine = any(a.startswith(root) or a.partition("=")[2].startswith(root) for a in args)
            box_id = p.environ().get("WTBOX_ID")
            if mine and box_id:
                ids.add(box_id)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return ids


# ---------------------------------------------------------------- ports and their holders

def listeners(port: int) -> list[int]:
    """Pids listening on TCP `port` (any address); 0 stands for a process we may not see."""
    import psutil

    try:
        conns = psutil.net_connections(kind="tcp")
    except (psutil.AccessDenied, OSError):
        return []
    return sorted({c.pid or 0 for c in conns
                   if c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port})


def tree_listens_on(pid: int, port: int) -> bool:
    """Whether `pid` or one of its descendants listens on TCP `port`."""
    import psutil

    try:
        root = psutil.Process(pid)
        tree = [root, *root.children(recursive=True)]
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False
    for p in tree:
        try:
            if any(c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port
                   for c in p.net_connections(kind="tcp")):
                return True
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return False


def describe(pid: int) -> str:
    """'pid 123 (python3 app.py)' for messages; one line, at most 80 characters of command."""
    if not pid:
        return "a process of another user"
    cmd = " ".join(" ".join(cmdline(pid)).split())[:80] or comm(pid) or "?"
    return f"pid {pid} ({cmd})"


def find_mentioning(text: str) -> list[Any]:
    """Live processes (psutil) whose command line contains `text`, e.g. a profile dir: found even
    when their environment was cleared (Chromium's zygote clears it for what it forks)."""
    needle = text.encode()
    me = os.getpid()
    found = []
    for pid in _pids():
        if pid == me:
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if needle not in f.read():
                    continue
        except OSError:
            continue
        if not pid_alive(pid):
            continue
        import psutil  # only once something matched

        try:
            found.append(psutil.Process(pid))
        except psutil.Error:
            continue
    return found


def memory_of(processes: Iterable[Any]) -> dict[str, int]:
    """RSS, PSS and USS in bytes summed over psutil processes. RSS counts a shared binary's pages
    once per process; USS (pages no other process has) is what one more such process tree adds."""
    import psutil

    rss = pss = uss = 0
    for p in processes:
        try:
            m = p.memory_full_info()
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
        rss += m.rss
        pss += getattr(m, "pss", 0)
        uss += getattr(m, "uss", 0)
    return {"rss_bytes": rss, "pss_bytes": pss, "uss_bytes": uss}


# ---------------------------------------------------------------- a box's cgroup

def enter_cgroup(leaf: cgroups.Leaf) -> bool:
    """Move this process into a leaf of its box's cgroup (`exec`/`shell` do it just before exec)."""
    backend = cgroups.for_home(leaf.home)
    return backend is not None and backend.place(os.getpid(), leaf.box_id, leaf.name)


def cgroup_pids(home: Path | str, box_id: str, leaf: str | None = None) -> set[int]:
    """The live processes in the box's cgroup (or one leaf); empty without cgroups."""
    backend = cgroups.for_home(home)
    return backend.pids(box_id, leaf) if backend is not None else set()


def kill_cgroup(home: Path | str, box_id: str, leaf: str | None = None) -> set[int]:
    """SIGKILL everything in the box's cgroup (or one leaf), sparing ourselves and our ancestors,
    and wait until it is empty. Returns the pids killed (none without cgroups)."""
    backend = cgroups.for_home(home)
    if backend is None:
        return set()
    return backend.kill(box_id, leaf, spare=caller_and_ancestors())


def stop_cgroup(home: Path | str, box_id: str, leaves: Sequence[str | None] = (None,),
                wait: float = KILL_WAIT) -> set[int]:
    """Staged stop of everything in the box's cgroup, or in some of its leaves: SIGTERM each
    process (daemons in their own session too), one wait of up to `wait`, then kill the cgroups."""
    members: set[int] = set()
    for leaf in leaves:
        members |= cgroup_pids(home, box_id, leaf)
    members -= caller_and_ancestors()
    for pid in members:
        try:
            os.kill(pid, signal.SIGTERM)
        except (ProcessLookupError, PermissionError):
            pass
    wait_gone(members, wait)
    for leaf in leaves:
        members |= kill_cgroup(home, box_id, leaf)
    return members


def remove_box_cgroup(home: Path | str, box_id: str) -> None:
    """Kill what is left in the box's cgroup and delete it (leaves first)."""
    backend = cgroups.for_home(home)
    if backend is not None:
        backend.remove(box_id, spare=caller_and_ancestors())


def end_box_processes(home: Path | str, box_id: str, box_dir: Path | str | None) -> list[int]:
    """Every process of a box, gone: its cgroup killed first (exact), then what still carries
    WTBOX_ID or sits in the box dir (the second net, and the only one without cgroups)."""
    killed = kill_cgroup(home, box_id)
    strays = find_box_processes(box_id, box_dir)
    return sorted(killed | set(kill_staged(strays) if strays else []))


# ---------------------------------------------------------------- the mount table

def _unescape(field: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as \\ooo."""
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


def mountinfo() -> list[tuple[str, str, str, str]]:
    """(target, fstype, source, super options) of every mount this process sees (/proc/self/mountinfo)."""
    try:
        with open("/proc/self/mountinfo") as f:
            lines = f.read().splitlines()
    except OSError:
        return []
    out = []
    for line in lines:
        left, sep, right = line.partition(" - ")
        if not sep:
            continue
        fields, tail = left.split(), right.split()
        if len(fields) < 5 or len(tail) < 2:
            continue
        out.append((_unescape(fields[4]), tail[0], _unescape(tail[1]), _unescape(tail[2]) if len(tail) > 2 else ""))
    return out


# ---------------------------------------------------------------- namespaces

def namespace_file(pid: int, kind: str) -> str:
    """The kernel's handle on one namespace ("net", "user", ...) of a live process, as a path that
    tools take (`pasta --netns PATH`); only as good as the pid: check `is_alive` first."""
    return f"/proc/{pid}/ns/{kind}"
