"""RabbitMQ from Debian's `rabbitmq-server`: a node per box with its own name, ports and Mnesia dir.

Erlang's port mapper (epmd) is per box too (ERL_EPMD_PORT on a leased port): the host-wide one
on 4369 would outlive every box. The node's cookie lives in its data dir (HOME). The AMQP
listener opens last in the boot, so a TCP accept means ready (~5.5 s on the 2-core host).
The guest user may connect from loopback, which is where the box's processes are.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from worktreebox.box import hex_of
from worktreebox.providers.backing.base import LOOPBACK
from worktreebox.providers.backing.native import NativeProgram

if TYPE_CHECKING:
    from worktreebox.box import Box
    from worktreebox.config.backing import BackingConfig

USER = PASSWORD = "guest"


class NativeRabbitMQ(NativeProgram):
    kind = "rabbitmq"
    program = "/usr/lib/rabbitmq/bin/rabbitmq-server"  # Debian's /usr/sbin one insists on `su rabbitmq`
    package = "rabbitmq-server"
    processes = ("beam.smp", "epmd", "erl_child_setup", "inet_gethost", "rabbitmq-server")

    def argv(self, box: Box, cfg: BackingConfig, ports: dict[str, int], data: Path) -> list[str]:
        return [self.executable() or self.program]

    def env(self, box: Box, cfg: BackingConfig, ports: dict[str, int], data: Path) -> dict[str, str]:
        (data / "enabled_plugins").write_text("[].\n")
        return {
            "HOME": str(data), "RABBITMQ_NODENAME": f"wt_{hex_of(box.id)}_{cfg.name}@localhost",
            "RABBITMQ_NODE_IP_ADDRESS": LOOPBACK, "RABBITMQ_NODE_PORT": str(ports[cfg.name]),
            "RABBITMQ_DIST_PORT": str(ports[f"{cfg.name}_dist"]), "ERL_EPMD_PORT": str(ports[f"{cfg.name}_epmd"]),
            "RABBITMQ_BASE": str(data), "RABBITMQ_MNESIA_BASE": str(data / "mnesia"),
            "RABBITMQ_LOG_BASE": str(data / "log"), "RABBITMQ_LOGS": "-",
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(data / "enabled_plugins"),
            "RABBITMQ_CONFIG_FILE": str(data / "rabbitmq"),
            "RABBITMQ_ADVANCED_CONFIG_FILE": str(data / "advanced.config"),
            "RABBITMQ_CONF_ENV_FILE": str(data / "rabbitmq-env.conf"), "RABBITMQ_PID_FILE": str(data / "pid"),
        }

    def facts(self, box: Box, cfg: BackingConfig, ports: dict[str, int]) -> dict[str, Any]:
        out = super().facts(box, cfg, ports)
        out.update(url=f"amqp://{USER}:{PASSWORD}@{LOOPBACK}:{ports[cfg.name]}", user=USER, password=PASSWORD)
        return out
