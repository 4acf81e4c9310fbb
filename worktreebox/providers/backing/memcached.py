"""memcached from Debian's `memcached`: TCP on loopback only, 64 MB of cache at most."""
from __future__ import annotations

import os
import pwd
from pathlib import Path
from typing import TYPE_CHECKING

from worktreebox.providers.backing.base import LOOPBACK
from worktreebox.providers.backing.native import NativeProgram

if TYPE_CHECKING:
    from worktreebox.box import Box
    from worktreebox.config.backing import BackingConfig

CACHE_MB = 64  # memcached allocates as items arrive: idle it holds a few MB whatever this says


class NativeMemcached(NativeProgram):
    kind = "memcached"
    program = "memcached"
    package = "memcached"
    processes = ("memcached",)

    def argv(self, box: Box, cfg: BackingConfig, ports: dict[str, int], data: Path) -> list[str]:
        argv = [self.executable() or self.program, "-l", LOOPBACK, "-p", str(ports[cfg.name]), "-U", "0",
                "-m", str(CACHE_MB)]
        if os.getuid() == 0:  # memcached refuses to run as root unless told whom to run as
            argv += ["-u", pwd.getpwuid(0).pw_name]
        return argv
