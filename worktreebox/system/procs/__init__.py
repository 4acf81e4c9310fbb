"""The one place that starts, stops and finds processes (honcho's Process, tox's executor).

- spawn.py: every process wtbox starts (own session, cgroup leaf before exec);
- stop.py: the one stop policy (SIGTERM, KILL_WAIT, SIGKILL, wait until gone);
- find.py: a box's processes, detached helpers by name, who holds a port;
- identity.py: (pid, start time), liveness, the caller and its ancestors (never stopped).
What they read of the kernel comes through `worktreebox.system.procfs`, the one /proc reader.
Callers use the names below (`procs.spawn`, `procs.stop_group`, ...), not the submodules.
"""
from __future__ import annotations

from worktreebox.system.procs.find import (
    box_ids_elsewhere,
    cgroup_pids,
    discover_box_ids,
    find_box_processes,
    find_mentioning,
    find_named,
    from_pid_file,
    listeners,
    memory_of,
    named_box_ids,
    one_walk,
    pids_named,
    tree_listens_on,
)
from worktreebox.system.procs.identity import (
    act_for,
    caller_and_ancestors,
    cmdline,
    comm,
    describe,
    identity,
    is_alive,
    parent_of,
    pid_alive,
)
from worktreebox.system.procs.spawn import (
    CWD,
    BeforeExec,
    Launcher,
    enter_cgroup,
    last_line,
    shell_argv,
    spawn,
    spawn_detached,
)
from worktreebox.system.procs.stop import (
    end_box_processes,
    kill_cgroup,
    kill_mentioning,
    kill_wait,
    remove_box_cgroup,
    signal_group,
    stop_cgroup,
    stop_group,
    stop_groups,
    stop_named,
    stop_pid,
    stop_processes,
    wait_gone,
)

__all__ = [
    "CWD", "BeforeExec", "Launcher", "act_for", "box_ids_elsewhere", "caller_and_ancestors", "cgroup_pids", "cmdline",
    "comm", "describe",
    "discover_box_ids", "end_box_processes", "enter_cgroup", "find_box_processes", "find_mentioning", "find_named",
    "from_pid_file", "identity", "is_alive", "kill_cgroup", "kill_mentioning", "kill_wait", "last_line", "listeners",
    "memory_of", "named_box_ids", "one_walk", "parent_of", "pid_alive", "pids_named", "remove_box_cgroup", "shell_argv",
    "signal_group", "spawn", "spawn_detached", "stop_cgroup", "stop_group", "stop_groups", "stop_named", "stop_pid",
    "stop_processes", "tree_listens_on", "wait_gone",
]
