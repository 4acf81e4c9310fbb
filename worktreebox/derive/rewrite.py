"""The repo's own variables rewritten onto the box's instances.

`DATABASE_URL=postgres://app:secret@db:5432/app` in a compose file names the compose service
`db`; in a GitHub Actions job the same service is `localhost:5432`. In a box both mean the box's
own database, so the value becomes `{{ db.url }}`; `REDIS_URL=redis://redis:6379/1` becomes
`{{ backing.redis.url }}/1` (the path, the Redis database number, is the repo's); `DB_HOST=db`
becomes `{{ db.host }}`, `DB_PORT=5432` `{{ db.port }}`, `POSTGRES_PASSWORD` `{{ db.password }}`.
A value that names nothing of the box is left as the repo wrote it.
"""
from __future__ import annotations

import re
from urllib.parse import urlsplit

from worktreebox.derive.model import Plan, Target, tpl

LOCAL_HOSTS = ("localhost", "127.0.0.1", "0.0.0.0", "::1", "[::1]")
# The database's identity under the names repos give it (the box has its own role, password and database).
DB_VARS = {
    "name": re.compile(r"^(POSTGRES_DB|PGDATABASE|(DB|DATABASE|POSTGRES|PG)_(NAME|DATABASE|DB))$"),
    "user": re.compile(r"^(POSTGRES_USER|PGUSER|(DB|DATABASE|POSTGRES|PG)_(USER|USERNAME))$"),
    "password": re.compile(r"^(POSTGRES_PASSWORD|PGPASSWORD|(DB|DATABASE|POSTGRES|PG)_(PASSWORD|PASS|PASSWD))$"),
}


def rewrite(name: str, value: str, plan: Plan) -> tuple[str, str] | None:
    """(template, what it now names) for a variable that points at the box's database, a backing
    service or an app service; None when it names none of them."""
    for attr, rx in DB_VARS.items():
        if plan.database is not None and rx.match(name):
            return tpl(f"db.{attr}"), f"the box database's {attr}"
    if "://" in value:
        return _url(value, plan)
    target = plan.hosts.get(value) or _host_port(value, plan)
    if target is not None and ":" in value:
        return f"{target.template('host')}:{target.template('port')}", _what(target)
    if target is not None:
        return target.template("host"), _what(target)
    if name.endswith("PORT") and value.isdigit():
        hit = _by_port(int(value), plan)
        if hit is not None:
            return hit.template("port"), _what(hit)
    return None


def _url(value: str, plan: Plan) -> tuple[str, str] | None:
    try:
        u = urlsplit(value)
        host, port = u.hostname, u.port
    except ValueError:
        return None
    if not host:
        return None
    target = _target(host, port, plan)
    if target is None:
        return None
    tail = u.path + (f"?{u.query}" if u.query else "") + (f"#{u.fragment}" if u.fragment else "")
    if target.kind == "db":
        query = f"?{u.query}" if u.query else ""
        return tpl("db.url") + query, "the box database (its own role, password and database name)"
    if target.kind == "backing":
        return tpl(f"backing.{target.name}.url") + (tail if tail not in ("", "/") else ""), _what(target)
    return f"{u.scheme}://127.0.0.1:{tpl(f'ports.{target.name}')}{tail}", _what(target)


def _target(host: str, port: int | None, plan: Plan) -> Target | None:
    if host in LOCAL_HOSTS:
        return _by_port(port, plan) if port else None
    return plan.hosts.get(host)


def _host_port(value: str, plan: Plan) -> Target | None:
    host, _, port = value.rpartition(":")
    if not host or not port.isdigit():
        return None
    return _target(host, int(port), plan)


def _by_port(port: int | None, plan: Plan) -> Target | None:
    if port in plan.published:
        return plan.published[port]
    hits = [t for t in plan.hosts.values() if t.port == port]
    return hits[0] if len({(t.kind, t.name) for t in hits}) == 1 else None


def _what(t: Target) -> str:
    return {"db": "the box database", "backing": f"the box's {t.name}"}.get(t.kind, f"the box's port {t.name}")
