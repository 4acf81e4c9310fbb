"""The box's migrations: after `[setup] cmd`, before services (see Database.migrate).

In database mode they run once per migration hash on the host (the golden copy, migrated in
the first such box's tree) and every box gets a clone; in schema mode they run in every box.
"""
from __future__ import annotations

from worktreebox.resources.base import Creation, Resource


class Migrations(Resource):
    name = "migrations"

    def start(self, c: Creation) -> None:
        from worktreebox.resources.database import Database

        Database().migrate(c)
