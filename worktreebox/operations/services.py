"""up, down, restart: a box's services, through its supervisor."""
from __future__ import annotations

from typing import TYPE_CHECKING

from worktreebox.operations.spec import BOX, CHANGES, Operation, Param

if TYPE_CHECKING:
    from worktreebox.host import Host

SERVICE = Param("service", "Only this service (default: all).", positional=True)


RELOAD = Param("reload", "First apply the box's own edited wtbox.toml (its [services], or a Procfile) and "
                         "record it as the box's config; the services start anew from it.", bool, False)


def control(action: str):
    def perform(host: Host, box: str | None, service: str | None = None, reload: bool = False, *,
                secrets: dict[str, str] | None = None) -> dict:
        b = host.get(box)
        rows = host.services(b, action, service, secrets, reload=reload)
        return {"id": b.id, "box": b.id, "services": [{"name": n, **s} for n, s in rows.items()]}  # box: alias

    return perform


_RESULT = "{id, services: [{name, state, pid, port, ready_seconds, restarts, error}]}."
UP = Operation("up", "Start the box's services (or one SERVICE) and wait until they are ready.",
               (BOX, SERVICE, RELOAD),
               control("up"), result=_RESULT, effect=CHANGES, tool="box_up")
DOWN = Operation("down", "Stop the box's services (or one SERVICE): SIGTERM, wait, SIGKILL.", (BOX, SERVICE),
                 control("down"), result=_RESULT, effect=CHANGES, tool="box_down")
RESTART = Operation("restart", "Restart the box's services (or one SERVICE) and wait until they are ready.",
                    (BOX, SERVICE), control("restart"), result=_RESULT, effect=CHANGES, tool="box_restart")
