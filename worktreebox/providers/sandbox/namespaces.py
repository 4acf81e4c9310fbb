"""The `namespaces` sandbox: a bubblewrap holder per box, slirp4netns for its network, and one launcher.

The holder is `bwrap --unshare-pid --unshare-ipc --unshare-uts --unshare-net ... sh -c 'echo
ready; exec sleep infinity >/dev/null'`, started detached with WTBOX_ID in its environment and
moved into the box's cgroup (leaf `_sandbox`) while its network is made (`create` says why).
bwrap's `--info-fd` names the box's pid 1 (a host pid, bwrap's own init, which reaps whatever is
orphaned inside); the `ready` line comes from inside the finished sandbox (the info arrives
before the mounts are done, and a process entering then finds a half-built root). Then bwrap's
outer process, which only waits to relay the exit status, is ended. Killing that pid 1 ends
every process of the box at once.

Every box process starts through `command()`:

    nsenter -t <pid 1> -p -m -i -u -n -- setpriv --reuid=U --regid=G --clear-groups
        --inh-caps=-all --bounding-set=-all --no-new-privs -- env --chdir=<cwd> -- CMD

(measured in scripts/bench_sandbox.py; the lead's nsenter + setpriv without env: +2.8 ms over a
bare `true`). nsenter forks to enter the pid
namespace: CMD is its child, in the same process group (signal the group; nsenter exits with
CMD's status). Placement in the box's cgroup is procs.spawn's, before exec, as for every
process: nothing launched can leave the cgroup (the cgroup file system is read-only inside).

Modes: as root, box processes run as the dedicated system user `wtbox-box` (made when missing),
without capabilities; as an ordinary user, bubblewrap adds a user namespace (where the kernel
allows one) and box processes keep the user's own uid, without capabilities.
"""
from __future__ import annotations

import functools
import json
import os
import select
import shutil
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from worktreebox.providers.sandbox import layout, network
from worktreebox.providers.sandbox.base import (
    LOG,
    NONE,
    RECORD,
    Holder,
    Sandbox,
    SandboxError,
    SandboxGone,
    Spec,
    load,
    save,
)
from worktreebox.system import cgroups, procfs, procs, setns

BOX_USER = "wtbox-box"
TOOLS = ("bwrap", "slirp4netns", "nft", "nsenter", "setpriv")
HOLDER_NAMES = ("bwrap",)
READY_TIMEOUT = 10.0
START_TRIES = 3  # bubblewrap's start, when the host's mount table changed under it (mount_table_changed)
SHARED_LOCK = ".sandbox-mounts.lock"
MNT_DETACH = 2


class Namespaces(Sandbox):
    name = "namespaces"

    def __init__(self) -> None:
        self.mode = "root" if os.geteuid() == 0 else "user"

    @classmethod
    def check(cls) -> dict | None:
        missing = [t for t in TOOLS if shutil.which(t) is None]
        if not missing:
            return None
        return {"check": "sandbox tools", "ok": False,
                "detail": f"missing {', '.join(missing)}; install them with "
                          "'apt-get install bubblewrap slirp4netns nftables util-linux'."}

    def probe(self) -> str | None:
        missing = [t for t in TOOLS if shutil.which(t) is None]
        if missing:
            return f"{', '.join(missing)} not installed"
        if self.mode == "user" and not _userns_allowed():
            return "the kernel refuses user namespaces to ordinary users"
        return None

    # -- the box's user
    def box_user(self) -> tuple[int, int]:
        """(uid, gid) box processes run as: `wtbox-box` as root, the caller otherwise."""
        if self.mode != "root":
            return os.geteuid(), os.getegid()
        return _root_box_user(os.getpid())

    # -- the holder
    def create(self, spec: Spec, *, cgroup: cgroups.Leaf | None = None,
               started: Callable[[Holder], None] | None = None) -> Holder:
        uid, gid = self.box_user()
        spec.run_dir.mkdir(parents=True, exist_ok=True)
        if self.mode == "root":
            own_bind_roots(spec, uid, gid)
            share_boxes_dir(spec.home)
        resolv = _box_resolv(spec) if spec.network != NONE else None
        # slirp4netns ends when this pipe's write end closes: the holder's sleep keeps it, so the
        # helper goes with the box however the box ends (a kill -9 of its pid 1 included)
        exit_r, exit_w = os.pipe()
        try:
            holder, members = self._start_retrying(spec, uid=uid, gid=gid, resolv=resolv, keep_fd=exit_w)
            os.close(exit_w)
            exit_w = -1
            try:
                if started is not None:
                    started(holder)  # (nothing of the box runs before the network below is made)
                # Three waits on the kernel at once, not one after another: moving the holder into its
                # cgroup and loading the firewall each wait for an RCU grace period (cgroup v1's
                # migration lock, nftables' hook registration: ~15 ms apiece here, measured), and
                # slirp4netns's start. Nothing of the box runs before all three are done.
                from concurrent.futures import ThreadPoolExecutor

                with ThreadPoolExecutor(max_workers=2) as pool:
                    placed = pool.submit(_place, members, cgroup)
                    blocked = network.host_addresses() if spec.blocked is None else list(spec.blocked)
                    rules = pool.submit(network.apply_rules, holder, network.ruleset(
                        spec.network, blocked, network.Outbound()))
                    if network.wanted(spec):
                        holder.helper_pid = network.attach(holder, spec, log=spec.run_dir / LOG, exit_fd=exit_r,
                                                           cgroup=cgroup)
                    rules.result()
                    placed.result()
                save(spec.run_dir, holder)
            except BaseException:
                self.destroy(spec.box_id, spec.box_dir)
                raise
        finally:
            for fd in (exit_r, exit_w):
                if fd >= 0:
                    os.close(fd)
        return holder

    def _start_retrying(self, spec: Spec, **how: Any) -> tuple[Holder, list[int]]:
        """`_start`, again when the host's mount table changed under bubblewrap's copy of it."""
        for _ in range(START_TRIES - 1):
            try:
                return self._start(spec, **how)
            except MountTableChanged:
                pass
        return self._start(spec, **how)

    def _start(self, spec: Spec, *, uid: int, gid: int, resolv: Path | None, keep_fd: int) -> tuple[Holder, list[int]]:
        """The holder, started in its maker's cgroup (see create: it is moved into the box's at
        once), and its processes (what is moved)."""
        info_r, info_w = os.pipe()
        ready_r, ready_w = os.pipe()
        argv = holder_argv(spec, uid=uid, gids={gid}, user_ns=self.mode == "user", resolv=resolv, info_fd=info_w)
        try:
            with open(spec.run_dir / LOG, "ab") as log:
                # setsid -f: the holder is reparented to init at once, never a zombie of a long-lived caller;
                # its stdout is the ready pipe, its stderr (bwrap's complaints) the log. A transient one stays
                # our child, and bwrap's --die-with-parent ends it with us.
                starter = procs.spawn(argv if spec.transient else ["setsid", "-f", *argv], env=spec.env(),
                                      stdout=ready_w, stderr=log, pass_fds=(info_w, keep_fd))
            os.close(info_w)
            os.close(ready_w)
            info_w = ready_w = -1
            if not spec.transient:
                starter.wait()
            ready = _read_until(ready_r, b"\n", READY_TIMEOUT)
            info = _read_until(info_r, b"}", 1.0) if ready else b""
        finally:
            for fd in (info_r, ready_r, info_w, ready_w):
                if fd >= 0:
                    os.close(fd)
        if not ready.startswith(b"ready"):
            why = network._last_line(spec.run_dir / LOG)
            self.destroy(spec.box_id, spec.box_dir)
            kind = MountTableChanged if mount_table_changed(why) else SandboxError
            raise kind(f"The sandbox of box {spec.box_id} did not start: {why}.")
        pid = int(json.loads(info)["child-pid"])
        ident = procs.identity(pid)
        if ident is None:
            raise SandboxGone(f"The sandbox of box {spec.box_id} exited as soon as it started.")
        if not spec.transient:
            _end_monitor(pid)
        kids = procfs.children(pid)  # its shell (a spare's, with the shell's sleep) or its sleep
        members = [pid, *kids, *(g for k in kids for g in procfs.children(k)),
                   *([starter.pid] if spec.transient else [])]
        return Holder(spec.box_id, pid, ident[1], self.mode, uid, gid, network=spec.network,
                      netns_file=procfs.namespace_file(pid, "net")), members

    # -- the launcher
    def command(self, holder: Holder | None, argv: list[str], *, cwd: Path | str) -> list[str]:
        return [*self.prefix(_alive(holder), cwd=cwd), *argv]

    def prefix(self, holder: Holder, *, cwd: Path | str) -> list[str]:
        """The launcher without the command (what the supervisor gets once and uses per service).

        The directory is entered last, by `env --chdir`, inside the box's mount namespace:
        `nsenter --wd` opens it *before* entering, so the process would start in the host's
        directory, outside its root, and `os.chdir("..")` from there walked the host's file
        system (the box dir's env file, the home's registry: tests/providers/test_sandbox.py).

        nsenter forks to enter the pid namespace and waits for the command, in the same process
        group: a SIGTERM to the group ended nsenter at once (it forwards nothing), so a stop that
        waits for the group's leader saw the service gone while it ran on (found by a service that
        ignores SIGTERM). nsenter therefore runs with the terminating signals ignored (it exits
        when the command does, with its status) and the command gets their defaults back."""
        user = ["-U", "--preserve-credentials"] if holder.mode == "user" else []
        enter = ["nsenter", "-t", str(holder.pid), *user, "-p", "-m", "-i", "-u", "-n"]
        return ["env", f"--ignore-signal={PROXIED}", *enter, "--", "setpriv", *_become(holder), *NO_PRIVILEGES, "--",
                "env", f"--default-signal={PROXIED}", f"--chdir={cwd}", "--"]

    def netns_command(self, holder: Holder | None, argv: list[str]) -> list[str]:
        return network.enter(_alive(holder), argv)

    def launcher(self, holder: Holder | None) -> procs.Launcher:
        return procs.Launcher(tuple(self.prefix(_alive(holder), cwd=procs.CWD)))

    def netns_launcher(self, holder: Holder | None, *, as_box_user: bool) -> procs.Launcher:
        alive = _alive(holder)
        drop = [*_become(alive), *NO_PRIVILEGES] if as_box_user else []
        return procs.Launcher(tuple(network.enter(alive, ["setpriv", *drop, "--"] if drop else [])))

    def alias(self, holder: Holder | None, path: Path, target: str, hostname: str | None = None) -> None:
        alive = _alive(holder)
        if alive.mode == "root":  # no process to start: ~10 ms of `new` from a spare, on a loaded host
            try:
                _symlink_inside(alive.pid, path, target)
                if hostname:
                    import socket

                    with setns.thread_in_uts(alive.pid):
                        socket.sethostname(hostname[:63])
                return
            except OSError:
                pass  # a symlink on the way (resolved as the holder sees it only by entering it): nsenter
        user = ["-U", "--preserve-credentials"] if alive.mode == "user" else []
        import subprocess

        name = ["-u", "--", "sh", "-c", 'ln -sfn "$0" "$1" && hostname "$2"', target, str(path), hostname[:63]] \
            if hostname else ["--", "ln", "-sfn", target, str(path)]
        proc = subprocess.run(["nsenter", "-t", str(alive.pid), *user, "-m", *name], capture_output=True, text=True)
        if proc.returncode != 0:
            raise SandboxError(f"Could not name {path} inside the sandbox of box {alive.box_id}: "
                               f"{proc.stderr.strip() or proc.returncode}.")

    # -- the end
    def destroy(self, box_id: str, box_dir: Path) -> list[int]:
        """SIGKILL the box's pid 1 (the kernel then ends every process in its pid namespace) and
        slirp4netns: neither has anything to flush, and bwrap's init ignores SIGTERM from outside."""
        run_dir = box_dir / "run"
        pids = set()
        holder = load(run_dir)
        if holder is not None and procs.is_alive(holder.identity):
            pids.add(holder.pid)
        helper = network.helper_pid(run_dir)
        if helper is not None and procs.from_pid_file(run_dir / network.PID_FILE, box_id, None) is not None:
            pids.add(helper)
        pids |= {p.pid for p in procs.find_named(box_id, (*HOLDER_NAMES, *network.HELPER_NAMES), box_dir=box_dir)}
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        procs.wait_gone(sorted(pids), procs.kill_wait())
        for name in (RECORD, network.PID_FILE):
            (run_dir / name).unlink(missing_ok=True)
        return sorted(pids)

    def discover(self, boxes_dir: Path) -> set[str]:
        return procs.named_box_ids((*HOLDER_NAMES, *network.HELPER_NAMES), boxes_dir)


def holder_argv(spec: Spec, *, uid: int, gids: set[int], user_ns: bool, resolv: Path | None,
                info_fd: int) -> list[str]:
    """bwrap's command line for a box's holder (a pure function: tests read it).

    Unprivileged, bwrap 0.8's own `--unshare-user` nests the sandbox in a second user namespace
    below the one that owns its other namespaces, and nsenter 2.38 cannot reach the owner (it
    enters the process's, then may not join the network or pid namespace: EPERM). So the user
    namespace is made first (`unshare --user --map-root-user`: the caller is uid 0 there, with
    the capabilities bwrap needs) and bwrap makes every other namespace inside it: one owner,
    which the launcher enters."""
    argv = ["bwrap", "--unshare-pid", "--unshare-ipc", "--unshare-uts", "--unshare-net", "--hostname", spec.hostname,
            "--new-session", *(["--die-with-parent"] if spec.transient else []),
            *layout.filesystem_args(spec, uid=uid, gids=gids, resolv=resolv),
            "--info-fd", str(info_fd), "--", "/bin/sh", "-c", hold_command(spec)]
    return ["unshare", "--user", "--map-root-user", "--", *argv] if user_ns else argv


def hold_command(spec: Spec) -> str:
    """What the holder's pid 1 runs: a sleep (its stdout is the ready pipe, closed once `ready` is said).
    A spare's shell first waits `spec.expires` seconds, forked before `ready` (so it is in the box's
    cgroup with the rest), and then sleeps on only if it was taken meanwhile (`keep_if` exists)."""
    forever = "exec sleep infinity >/dev/null"
    if not spec.expires or spec.keep_if is None:
        return f"echo ready; {forever}"
    import shlex

    return (f"sleep {int(spec.expires)} >/dev/null & echo ready; wait $!; "
            f"test -e {shlex.quote(str(spec.keep_if))} && {forever}")


class MountTableChanged(SandboxError):
    """bubblewrap's copy of the host's mount table failed on a mount that went away meanwhile."""


def mount_table_changed(said: str) -> bool:
    """bubblewrap binds the host's whole tree (`--ro-bind / /`, recursive: other boxes' views
    included, before they are hidden) and then makes each mount read-only; a view unmounted in
    between (another box removed at that moment) fails it: "Can't bind mount /oldroot/ on
    /newroot/: Unable to apply mount flags: remount ...: Invalid argument" (seen in CI, two
    homes' chaos tests side by side). Another try copies the table as it is now."""
    return "Can't bind mount /oldroot/" in said and ("remount" in said or "No such file" in said)


NO_PRIVILEGES = ("--inh-caps=-all", "--bounding-set=-all", "--no-new-privs")
PROXIED = "HUP,INT,QUIT,TERM,USR1,USR2,ALRM"  # signals a stop or a terminal sends to a launched process group


def _become(holder: Holder) -> list[str]:
    """setpriv's user change: to `wtbox-box` as root; unprivileged, uid 0 of the box's user namespace
    (which is the caller outside) stays."""
    if holder.mode == "user":
        return []
    return [f"--reuid={holder.uid}", f"--regid={holder.gid}", "--clear-groups"]


def _alive(holder: Holder | None) -> Holder:
    """The holder if it is still the process it was (a pid reused by another process is never entered)."""
    if holder is None or not procs.is_alive(holder.identity):
        box = f"box {holder.box_id}" if holder is not None else "this box"
        raise SandboxGone(f"The sandbox of {box} is not running; 'wtbox up' makes it again.")
    return holder


def _symlink_inside(pid: int, path: Path, target: str) -> None:
    """`ln -sfn target path` in the files process `pid` sees: each directory on the way opened below
    its root without following a symlink (an absolute one would be resolved in ours, not its)."""
    flags = os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC
    fd = os.open(procfs.root_path(pid, "/"), flags)
    try:
        for part in path.parent.parts[1:]:
            fd, parent = os.open(part, flags | os.O_NOFOLLOW, dir_fd=fd), fd
            os.close(parent)
        tmp = f".{path.name}.{os.getpid()}.tmp"
        os.symlink(target, tmp, dir_fd=fd)
        try:
            os.rename(tmp, path.name, src_dir_fd=fd, dst_dir_fd=fd)
        except OSError:
            os.unlink(tmp, dir_fd=fd)
            raise
    finally:
        os.close(fd)


def _place(pids: list[int], cgroup: cgroups.Leaf | None) -> None:
    """Move the holder's processes into the box's cgroup leaf (they were started outside it)."""
    if cgroup is None:
        return
    for pid in pids:
        try:
            cgroups.place(cgroup, pid)
        except ProcessLookupError:
            raise SandboxGone(f"The sandbox of box {cgroup.box_id} exited as soon as it started.") from None


def _end_monitor(pid: int) -> None:
    """End bubblewrap's outer process, the box's pid 1's parent: all it does from now on is wait to
    relay the sandbox's exit status, which nobody reads of a holder, and it kept 1.8 MB of RSS per
    box (scripts/bench_scale.py). The box's pid 1 lives on, reparented to the host's init, as its
    parent was already (setsid -f); a transient holder keeps it (--die-with-parent is its tie)."""
    fields = procfs.stat_fields(pid) or []
    parent = int(fields[1]) if len(fields) > 1 and fields[1].isdigit() else 0
    if parent > 1 and parent != os.getpid() and procfs.comm(parent) == "bwrap":
        try:
            os.kill(parent, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _read_until(fd: int, end: bytes, timeout: float) -> bytes:
    """Bytes from a pipe until `end` is among them, EOF, or `timeout` seconds."""
    data, deadline = b"", time.monotonic() + timeout
    while end not in data:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            break
        chunk = os.read(fd, 4096)
        if not chunk:
            break
        data += chunk
    return data


def _box_resolv(spec: Spec) -> Path | None:
    """A resolv.conf of the box's own when the host's names only loopback resolvers."""
    try:
        text = Path("/etc/resolv.conf").read_text()
    except OSError:
        return None
    wanted = layout.resolver(text)
    if wanted is None:
        return None
    path = spec.run_dir / "resolv.conf"
    path.write_text(wanted)
    return path


def _userns_allowed() -> bool:
    import subprocess

    proc = subprocess.run(["bwrap", "--unshare-user", "--ro-bind", "/", "/", "true"], capture_output=True)
    return proc.returncode == 0


# ---------------------------------------------------------------- host-side preparation (root)

def own_bind_roots(spec: Spec, uid: int, gid: int) -> None:
    """Give the box's user the top of each writable bind (not its content: a worktree's files come
    from a tree whose owner is settled when the tree is built; docs/architecture.md, "The sandbox")."""
    for bind in spec.binds:
        if bind.writable:
            bind.src.mkdir(parents=True, exist_ok=True)
            os.chown(bind.src, uid, gid)


def share_boxes_dir(home: Path) -> None:
    """Make $WTBOX_HOME/boxes a shared mount (a bind of itself), once per home.

    Every holder copies the host's mount table when it starts, including other boxes' mounts
    under boxes/ (hidden under its tmpfs). With boxes/ shared, each holder's copy is a slave:
    a mount made later under its own worktree (a dependency layer) appears inside, and when
    another box's mount is taken down on the host its hidden copy goes too, instead of pinning
    that file system until this box ends."""
    from worktreebox.providers.mounts.base import is_mountpoint, make_shared
    from worktreebox.system.fsutil import file_lock

    boxes = home / "boxes"
    boxes.mkdir(parents=True, exist_ok=True)
    with file_lock(home / SHARED_LOCK, what="the boxes mount"):  # gc takes it down under this lock
        if not _shared(boxes):
            make_shared(boxes, bind=not is_mountpoint(boxes))


def release_boxes_dir(home: Path, no_box_left: Callable[[], bool]) -> bool:
    """Take boxes/ down as a mount once no box is left (`rm` of the last box, gc): under the lock
    `share_boxes_dir` shares it under, never while anything is mounted below it."""
    from worktreebox.providers.mounts.base import _umount2, is_mountpoint, mounts_under
    from worktreebox.system.fsutil import file_lock

    boxes = home / "boxes"
    if os.geteuid() != 0 or not is_mountpoint(boxes) or not no_box_left():
        return False
    with file_lock(home / SHARED_LOCK, what="the boxes mount"):
        if not no_box_left() or mounts_under(boxes) or not is_mountpoint(boxes):
            return False
        # nothing below it: a process whose cwd lies in it (a dying box's) must not keep it (EBUSY)
        return _umount2(str(boxes), MNT_DETACH) == 0


def _shared(path: Path) -> bool:
    return str(path) in procfs.shared_mounts()


@functools.lru_cache(maxsize=1)
def _root_box_user(pid: int) -> tuple[int, int]:
    """`wtbox-box`'s (uid, gid), looked up once per process (`pid`: a forked child asks again): a
    sandboxed `new` asks three times (its worktree, caches, binds), each a read of the user database."""
    from worktreebox.system import users

    user = users.ensure(BOX_USER, purpose="sandboxed box processes")
    return user.uid, user.gid
