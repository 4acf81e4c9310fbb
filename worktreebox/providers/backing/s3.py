"""An S3 endpoint from the `moto[server]` package (what minio / localstack images map to): buckets in
memory, any access key accepted (facts: `endpoint`, `access_key`, `secret_key`, `region`)."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from worktreebox.providers.backing.base import LOOPBACK
from worktreebox.providers.backing.native import NativeProgram

if TYPE_CHECKING:
    from worktreebox.box import Box
    from worktreebox.config.backing import BackingConfig

ACCESS_KEY = SECRET_KEY = "test"  # moto takes any; these are the names its documentation uses
REGION = "us-east-1"


class NativeS3(NativeProgram):
    kind = "s3"
    python_module = "moto.server"
    package = "moto[server]"
    processes = ("python", "python3")

    def argv(self, box: Box, cfg: BackingConfig, ports: dict[str, int], data: Path) -> list[str]:
        return ["-H", LOOPBACK, "-p", str(ports[cfg.name])]

    def facts(self, box: Box, cfg: BackingConfig, ports: dict[str, int]) -> dict[str, Any]:
        out = super().facts(box, cfg, ports)
        return {**out, "endpoint": out["url"], "access_key": ACCESS_KEY, "secret_key": SECRET_KEY, "region": REGION}
