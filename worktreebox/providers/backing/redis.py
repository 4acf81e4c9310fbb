"""Redis from Debian's `redis-server` (also what `valkey`, `keydb`, `redis-stack` images map to).

No persistence (a box's cache and queues are disposable, and a snapshot costs a fork), bound to
loopback, logging to stdout. Ready when it answers PING (base.PROBES).
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from worktreebox.providers.backing.base import LOOPBACK
from worktreebox.providers.backing.native import NativeProgram

if TYPE_CHECKING:
    from worktreebox.box import Box
    from worktreebox.config.backing import BackingConfig


class NativeRedis(NativeProgram):
    kind = "redis"
    program = "redis-server"
    package = "redis-server"
    processes = ("redis-server",)

    def argv(self, box: Box, cfg: BackingConfig, ports: dict[str, int], data: Path) -> list[str]:
        return [self.executable() or self.program, "--bind", LOOPBACK, "--port", str(ports[cfg.name]),
                "--dir", str(data), "--save", "", "--appendonly", "no", "--daemonize", "no", "--logfile", "",
                "--protected-mode", "yes", "--set-proc-title", "no"]  # a title would overwrite its environ (WTBOX_ID)
