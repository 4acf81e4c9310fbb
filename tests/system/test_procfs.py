"""The one /proc reader: its parsers on written lines (no process needed), and its readers on ourselves."""
from __future__ import annotations

import os

import pytest
from helpers import ROOT

from worktreebox.system import procfs

PACKAGE = ROOT / "worktreebox"


def test_no_module_but_procfs_names_proc():
    """Everything read from /proc goes through procfs: no other module of the package names it."""
    named = sorted(str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py")
                   if "/proc/" in p.read_text() and p.name != "procfs.py")
    assert named == []


@pytest.mark.parametrize("stat, state, ppid, start", [
    (b"42 (sleep) S 1 42 42 0 -1 4194560 1 0 0 0 0 0 0 0 20 0 1 0 777 0 0", b"S", b"1", b"777"),
    (b"42 (a b) c) R 9 42 42 0 -1 4194560 1 0 0 0 0 0 0 0 20 0 1 0 123 0 0", b"R", b"9", b"123"),  # ')' in the name
    (b"7 ((sd-pam)) Z 3 7 7 0 -1 4194560 1 0 0 0 0 0 0 0 20 0 1 0 5 0 0", b"Z", b"3", b"5"),
])
def test_parse_stat_splits_after_the_last_parenthesis(stat, state, ppid, start):
    fields = procfs.parse_stat(stat)
    assert (fields[0], fields[1], fields[19]) == (state, ppid, start)


@pytest.mark.parametrize("env, key, value", [
    (b"WTBOX_ID=a-1\0HOME=/root\0", "WTBOX_ID", "a-1"),
    (b"HOME=/root\0WTBOX_ID=b-2\0", "WTBOX_ID", "b-2"),
    (b"HOME=/root\0WTBOX_ID=c-3", "WTBOX_ID", "c-3"),  # the last entry without its NUL
    (b"MY_WTBOX_ID=x\0WTBOX_ID=d-4\0", "WTBOX_ID", "d-4"),  # a longer name that ends the same is not it
    (b"MY_WTBOX_ID=x\0", "WTBOX_ID", None),
    (b"WTBOX_ID=\0", "WTBOX_ID", ""),
    (b"", "WTBOX_ID", None),
    (b"WTBOX_BOX_DIR=/h/boxes/a b\0", "WTBOX_BOX_DIR", "/h/boxes/a b"),
])
def test_environ_value(env, key, value):
    assert procfs.environ_value(env, key) == value


MOUNTINFO = (
    "22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw\n"
    "30 22 0:27 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n"
    "35 22 0:32 / /sys/fs/cgroup/cpu,cpuacct rw - cgroup cgroup rw,cpu,cpuacct\n"
    "41 22 0:40 / /home/a\\040b/box\\134x rw master:2 propagation:3 - overlay overlay rw,lowerdir=/l\n"
    "50 22 0:50 / /mnt/fuse rw - fuse.fuse-overlayfs fuse-overlayfs\n"  # no super options
    "not a mountinfo line\n"
    "60 22 0:60 / - broken\n"
)


def test_parse_mountinfo():
    assert procfs.parse_mountinfo(MOUNTINFO) == [
        ("/", "ext4", "/dev/sda1", "rw"),
        ("/sys/fs/cgroup", "cgroup2", "cgroup2", "rw,nsdelegate"),
        ("/sys/fs/cgroup/cpu,cpuacct", "cgroup", "cgroup", "rw,cpu,cpuacct"),
        ("/home/a b/box\\x", "overlay", "overlay", "rw,lowerdir=/l"),
        ("/mnt/fuse", "fuse.fuse-overlayfs", "fuse-overlayfs", ""),
    ]


@pytest.mark.parametrize("field, plain", [
    ("/plain", "/plain"), ("/a\\040b", "/a b"), ("/tab\\011x", "/tab\tx"), ("/nl\\012", "/nl\n"),
    ("/back\\134slash", "/back\\slash"), ("/not\\08", "/not\\08"), ("/end\\", "/end\\"),
])
def test_unescape(field, plain):
    assert procfs.unescape(field) == plain


@pytest.mark.parametrize("text, path", [
    ("0::/user.slice/wtbox-k-0000abcd/web\n", "/user.slice/wtbox-k-0000abcd/web"),
    ("12:cpu,cpuacct:/x\n1:name=systemd:/y\n0::/\n", "/"),
    ("12:cpu,cpuacct:/x\n", None),
    ("", None),
])
def test_unified_cgroup_path(text, path):
    assert procfs.unified_cgroup_path(text) == path


def test_readers_on_this_process():
    me = os.getpid()
    assert procfs.stat_fields(me)[0] == b"R" and int(procfs.stat_fields(me)[1]) == os.getppid()
    assert me in procfs.pids() and procfs.cwd(me) == os.getcwd()
    assert procfs.cmdline(me)[0].endswith(("python", "python3")) or "python" in procfs.cmdline(me)[0]
    assert procfs.comm(me) and procfs.thread_ids(me) and procfs.runnable_ns(me, str(me)) > 0
    assert procfs.environ_value(procfs.environ(me) or b"", "PATH") == os.environ.get("PATH")
    assert any(target == "/" for target, *_ in procfs.mountinfo())
    lo, hi = map(int, procfs.sysctl("net/ipv4/ip_local_port_range").split())
    assert 0 < lo < hi
    fd = os.open(".", os.O_PATH)
    try:
        assert os.path.samefile(procfs.fd_path(fd), ".")
    finally:
        os.close(fd)


def test_readers_of_a_process_that_is_gone():
    gone = 2**22 + 1  # above pid_max's largest value: never a process
    assert procfs.stat_fields(gone) is None and procfs.environ(gone) is None and procfs.cmdline(gone) == []
    assert procfs.comm(gone) is None and procfs.cwd(gone) is None and procfs.thread_ids(gone) == []


def test_descendants_and_usage_of_a_real_process_tree():
    """The collector's per-service CPU and RSS without psutil: a shell and its two sleeping
    children, found from the shell's pid; a process that burned CPU shows it."""
    import subprocess
    import time

    shell = subprocess.Popen(["sh", "-c", "sleep 30 & sleep 30 & wait"])
    try:
        deadline = time.monotonic() + 5
        while len(procfs.descendants({shell.pid})) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(procfs.descendants({shell.pid})) == 3
        assert procfs.descendants({shell.pid}) >= {shell.pid}
        t0 = time.process_time()
        while time.process_time() - t0 < 0.2:
            pass
        cpu, rss = procfs.usage(os.getpid())
        assert cpu >= 0.15 and rss > 1 << 20
        assert procfs.usage(2 ** 22 + 1) is None and procfs.descendants({2 ** 22 + 1}) == set()
    finally:
        for pid in procfs.descendants({shell.pid}):
            os.kill(pid, 9)
        shell.wait()


def test_a_listening_tree_is_found_on_its_port_and_not_on_another():
    """tree_listens_on without psutil: a shell whose child listens (v4, then v6) holds the port;
    the shell alone on a port nobody holds does not; the /proc/net/tcp parser on written rows."""
    import shlex
    import socket
    import subprocess
    import sys

    from worktreebox.system import procs

    for family, host in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
        code = (f"import socket,time; s=socket.socket({int(family)}); s.bind(('{host}', 0)); s.listen();"
                "print(s.getsockname()[1], flush=True); time.sleep(30)")
        shell = subprocess.Popen(["sh", "-c", f"{sys.executable} -c {shlex.quote(code)}; true"], stdout=subprocess.PIPE)
        try:
            port = int(shell.stdout.readline())
            assert procs.tree_listens_on(shell.pid, port)
            assert procs.listeners(port) == sorted(procfs.descendants({shell.pid}) - {shell.pid})
            assert not procs.tree_listens_on(shell.pid, port + 1 if port < 65535 else port - 1)
            other = subprocess.Popen(["sleep", "30"])
            assert not procs.tree_listens_on(other.pid, port)  # a sibling tree does not hold it
            other.kill()
            other.wait()
        finally:
            for pid in procfs.descendants({shell.pid}):
                os.kill(pid, 9)
            shell.wait()
    rows = ("  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n"
            "   0: 0100007F:4E20 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 111 1\n"
            "   1: 0100007F:4E20 0100007F:9C40 01 00000000:00000000 00:00000000 00000000     0        0 222 1\n"
            "   2: 00000000:4E21 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 333 1\n")
    assert procfs.parse_listening(rows, 0x4E20) == {111}
    assert procfs.parse_listening(rows, 0x4E21) == {333}
    assert procfs.parse_listening("", 1) == set()


def test_real_path_is_realpath_resolved_by_the_kernel(tmp_path):
    """The toolchain walk's resolution: os.path.realpath's answer for every kind of path, including
    those the kernel cannot open (missing, a dangling link), where it is realpath's own."""
    import os

    (tmp_path / "a b" / "c").mkdir(parents=True)
    (tmp_path / "a b" / "c" / "tool").write_text("")
    (tmp_path / "rel").symlink_to("a b/c")
    (tmp_path / "abs").symlink_to(tmp_path / "rel")
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    for p in ["/", "/usr/bin", tmp_path / "rel", tmp_path / "abs" / "tool", tmp_path / "abs" / ".." / "rel",
              tmp_path / "missing" / "x", tmp_path / "dangling", tmp_path / "rel" / "missing"]:
        assert procfs.real_path(str(p)) == os.path.realpath(p), p
