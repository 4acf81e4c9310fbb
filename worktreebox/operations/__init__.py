"""Every operation wtbox offers, declared once: its parameters, help, result and effect, and the
function that performs it (spec.py says how). The click commands (cli/build.py) and the MCP tools
(mcp/tools.py) are made from these declarations; what only one front end has is listed in
exceptions.py.

Importing a declaration is cheap (stdlib and spec.py only); each performing function imports
what it needs when called.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from worktreebox.operations.spec import Operation

# "module:NAME" of every declaration, in the order `wtbox --help` and the MCP tool list show them.
DECLARED = (
    "boxes:NEW", "boxes:LS", "boxes:STATUS", "router:URL", "router:OPEN", "boxes:ENV", "boxes:EXEC", "boxes:TEST",
    "boxes:SHELL", "boxes:RM", "boxes:KEEP", "boxes:UNKEEP", "network:NET", "network:EXPOSE",
    "services:UP", "services:DOWN", "services:RESTART",
    "observe:LOGS", "observe:METRICS", "observe:TRACES", "observe:PROBE", "observe:BROWSE", "observe:TOP",
    "fleet:FANOUT", "fleet:COMPARE", "fleet:DIFF", "fleet:PICK", "fleet:POOL", "fleet:GC",
    "state:SNAPSHOT", "state:RESTORE", "state:FORK",
    "admin:INIT", "admin:DOCTOR", "admin:DB_START", "admin:DB_STOP", "admin:DB_STATUS",
    "state:DB_RESET", "state:DB_PSQL", "state:DB_DUMP",
)


def all_operations() -> list[Operation]:
    out = []
    for entry in DECLARED:
        module, name = entry.split(":")
        out.append(getattr(importlib.import_module(f"{__name__}.{module}"), name))
    return out
