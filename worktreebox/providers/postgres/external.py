"""A PostgreSQL server given by URL (WTBOX_POSTGRES_URL or [database] url) with a CREATEROLE superuser."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from worktreebox.errors import WtboxError
from worktreebox.providers.postgres.base import Server
from worktreebox.secrets import mask_url

if TYPE_CHECKING:
    from worktreebox.context import HostContext


class ExternalServer(Server):
    """A server wtbox does not run: it only connects, makes and drops box roles."""

    provider = "external"

    def __init__(self, url: str) -> None:
        from psycopg.conninfo import conninfo_to_dict

        try:
            self.params = conninfo_to_dict(url)
        except Exception:
            raise WtboxError("The PostgreSQL URL (WTBOX_POSTGRES_URL or [database] url) "
                             "is not a valid postgresql:// URL.") from None
        self.url = url
        host = str(self.params.get("host") or "127.0.0.1")
        self.box_host = "127.0.0.1" if host.startswith("/") or host == "localhost" else host
        self.box_port = int(self.params.get("port") or 5432)
        self.shared_db = str(self.params.get("dbname") or "postgres")

    @classmethod
    def from_host(cls, host: HostContext) -> ExternalServer:
        url = host.config.database_url
        if not url:
            raise WtboxError("The database provider is 'external' but no server is given; "
                             "set WTBOX_POSTGRES_URL or [database] url in the host config.")
        return cls(url)

    def key(self) -> str:
        return self.url

    def conninfo(self, dbname: str) -> dict[str, Any]:
        return {**self.params, "dbname": dbname}

    def ensure_running(self) -> None:
        self.connect().close()

    def is_running(self) -> bool:
        try:
            self._connect(self.shared_db).close()
            return True
        except WtboxError:
            return False

    def stop(self) -> bool:
        raise WtboxError("The host uses an external PostgreSQL server; wtbox does not stop it.")

    def describe(self) -> str:
        return f"external server {mask_url(self.url)}"

    def status(self) -> dict[str, Any]:
        out: dict[str, Any] = {"provider": self.provider, "url": mask_url(self.url), "host": self.box_host,
                               "port": self.box_port, "running": False, "version": None}
        try:
            with self.session() as conn:
                out["version"] = conn.execute("SHOW server_version").fetchone()[0]  # type: ignore[index]  # SHOW: one row
            out["running"] = True
        except WtboxError as e:
            out["error"] = str(e)
        return out
