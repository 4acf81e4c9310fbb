"""An SMTP sink from the `aiosmtpd` package (what mailpit / mailhog images map to): every message
is kept in a Maildir under the box's data dir (facts: `maildir`), none is ever delivered."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from worktreebox.providers.backing.base import LOOPBACK
from worktreebox.providers.backing.native import NativeProgram, data_dir

if TYPE_CHECKING:
    from worktreebox.box import Box
    from worktreebox.config.backing import BackingConfig


class NativeSmtpSink(NativeProgram):
    kind = "smtp"
    python_module = "aiosmtpd"
    package = "aiosmtpd"
    processes = ("python", "python3")

    def argv(self, box: Box, cfg: BackingConfig, ports: dict[str, int], data: Path) -> list[str]:
        return ["-n", "-l", f"{LOOPBACK}:{ports[cfg.name]}", "-c", "aiosmtpd.handlers.Mailbox", str(data / "maildir")]

    def facts(self, box: Box, cfg: BackingConfig, ports: dict[str, int]) -> dict[str, Any]:
        return {**super().facts(box, cfg, ports), "maildir": str(data_dir(box, cfg.name) / "maildir")}
