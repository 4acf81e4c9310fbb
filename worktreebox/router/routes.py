"""The route set, derived from the live boxes alone: which names reach which leased port.

Pure functions (no process, no file): `table(boxes)` says which host names route to which
upstream, `caddy_config` turns that into the JSON config the router's Caddy loads, `url`
spells a box's address. A box answers to its id and, when no other live box shares it, to its
task's slug (the id without its hex); each of its app ports as `<service>.<name>.localhost`,
the first (its $PORT) also as `<name>.localhost`. Anything else gets the list page.
"""
from __future__ import annotations

import dataclasses
import html
import json
from collections.abc import Iterable
from typing import Any

from worktreebox.box import CREATING, DEGRADED, EXPIRED, READY, Box
from worktreebox.config.repo import OWN_PORTS

DOMAIN = "localhost"  # browsers resolve *.localhost to the loopback by themselves
ROUTED_STATES = (CREATING, READY, DEGRADED, EXPIRED)  # not removing or failed: those are going
USER = "wtbox"  # the basic-auth user name when the router needs a token


@dataclasses.dataclass(frozen=True)
class Route:
    box_id: str
    service: str
    port: int  # the leased port on 127.0.0.1
    hosts: tuple[str, ...]
    first: bool  # the box's $PORT: its hosts end with `<name>.localhost`


def routed(boxes: Iterable[Box]) -> list[Box]:
    """The boxes that get routes: live, not waiting in the warm pool (a claim routes them)."""
    return [b for b in boxes if b.pool is None and b.state in ROUTED_STATES and app_ports(b)]


def app_ports(box: Box) -> dict[str, int]:
    """The box's own ports (not wtbox's metrics, OTLP or browser ports), its $PORT first."""
    ports = {n: p for n, p in sorted(box.ports.items(), key=lambda kv: kv[1]) if n not in OWN_PORTS}
    first = next((n for n, p in ports.items() if str(p) == box.env.get("PORT")), None)
    if first is None:
        return ports
    return {first: ports[first], **{n: p for n, p in ports.items() if n != first}}


def slug_of(box_id: str) -> str:
    return box_id.rsplit("-", 1)[0]


def names(boxes: list[Box]) -> dict[str, list[str]]:
    """box id -> the names it answers to: its id, and its slug unless an older live box has the
    same slug (so a URL once printed keeps working while its box lives) or the slug is some id."""
    ids = {b.id for b in boxes}
    owner: dict[str, str] = {}
    for b in sorted(boxes, key=lambda b: (b.created_at, b.id)):
        owner.setdefault(slug_of(b.id), b.id)
    return {b.id: [b.id] + ([slug_of(b.id)] if owner[slug_of(b.id)] == b.id and slug_of(b.id) not in ids else [])
            for b in boxes}


def label(service: str) -> str:
    """A port name as a DNS label (port names may hold '_', host names may not)."""
    return service.replace("_", "-")


def table(boxes: Iterable[Box]) -> list[Route]:
    """Every route, in a stable order (the same boxes give the same config, byte for byte)."""
    live = sorted(routed(boxes), key=lambda b: b.id)
    known = names(live)
    out = []
    for b in live:
        for i, (service, port) in enumerate(app_ports(b).items()):
            hosts = [f"{label(service)}.{n}.{DOMAIN}" for n in known[b.id]]
            if i == 0:
                hosts += [f"{n}.{DOMAIN}" for n in known[b.id]]
            out.append(Route(b.id, service, port, tuple(hosts), i == 0))
    return out


def url(port: int, name: str, service: str | None = None) -> str:
    """The address of a box (its first port) or of one service, through the router on `port`."""
    host = f"{label(service)}.{name}.{DOMAIN}" if service else f"{name}.{DOMAIN}"
    return f"http://{host}:{port}/"


def box_urls(box: Box, boxes: list[Box], port: int) -> dict[str, str]:
    """service -> URL of one box (its first service first); {} when it is not routed."""
    live = routed(boxes)
    if box.id not in {b.id for b in live}:
        return {}
    name = names(live)[box.id][-1]  # the slug when it is the box's, else the id
    return {s: url(port, name, s) for s in app_ports(box)}


# ---------------------------------------------------------------- the Caddy config

@dataclasses.dataclass(frozen=True)
class Auth:
    """What a request must show when the router listens beyond the loopback: the token as a
    bearer header (programs), or as the basic-auth password of user `wtbox` (browsers)."""

    token: str
    bcrypt_b64: str  # `caddy hash-password` of the token


def list_page(routes: list[Route], port: int) -> str:
    """The page an unknown name gets: the live boxes, names only, each a link."""
    hosts = sorted(r.hosts[-1] for r in routes if r.first)
    items = "".join(f'<li><a href="http://{html.escape(h)}:{port}/">{html.escape(h.split(".")[0])}</a></li>'
                    for h in hosts) or "<li>none</li>"
    return ("<!doctype html><html><head><meta charset=\"utf-8\"><title>wtbox: no such box</title></head>"
            f"<body><h1>No box answers to this name</h1><p>Live boxes:</p><ul>{items}</ul></body></html>\n")


def _proxy(route: Route, keep_streams: bool) -> dict[str, Any]:
    proxy: dict[str, Any] = {"handler": "reverse_proxy", "flush_interval": -1,  # -1: server-sent events pass at once
                             "upstreams": [{"dial": f"127.0.0.1:{route.port}"}]}
    if keep_streams:  # Caddy >= 2.7: a route change leaves open WebSockets alone for this long
        proxy["stream_close_delay"] = "24h"
    return {"@id": f"wtbox:{route.box_id}:{route.service}", "match": [{"host": list(route.hosts)}],
            "handle": [proxy], "terminal": True}


def _auth(auth: Auth) -> dict[str, Any]:
    # hash_cache: bcrypt costs ~0.1-1 s; a password checked once is remembered (in memory only).
    basic = {"accounts": [{"username": USER, "password": auth.bcrypt_b64}], "hash": {"algorithm": "bcrypt"},
             "hash_cache": {}, "realm": "wtbox"}
    return {"@id": "wtbox:auth", "match": [{"not": [{"header": {"Authorization": [f"Bearer {auth.token}"]}}]}],
            "handle": [{"handler": "authentication", "providers": {"http_basic": basic}}]}


def caddy_config(routes: list[Route], *, listen: str, port: int, admin: str, log_file: str,
                 auth: Auth | None = None, keep_streams: bool = False) -> dict[str, Any]:
    """The whole config: the admin API on a unix socket only, no automatic HTTPS (it would make a
    local CA and try to install it), nothing persisted, warnings and errors to a rolled log file."""
    unknown = {"@id": "wtbox:unknown", "handle": [{
        "handler": "static_response", "status_code": 404, "body": list_page(routes, port),
        "headers": {"Content-Type": ["text/html; charset=utf-8"], "Cache-Control": ["no-store"]}}]}
    server = {"listen": [f"{_bracketed(listen)}:{port}"], "automatic_https": {"disable": True},
              "routes": ([_auth(auth)] if auth else []) + [_proxy(r, keep_streams) for r in routes] + [unknown]}
    return {**bootstrap(admin, log_file), "apps": {"http": {"servers": {"router": server}}}}


def bootstrap(admin: str, log_file: str) -> dict[str, Any]:
    """What Caddy starts with: its admin socket and its log (routes come by the API)."""
    writer = {"output": "file", "filename": log_file, "roll_size_mb": 1, "roll_keep": 1}
    # origins: the Host our HTTP client names; the socket's 0700 dir is what keeps others out.
    return {"admin": {"listen": f"unix/{admin}", "origins": ["localhost"], "config": {"persist": False}},
            "logging": {"logs": {"default": {"level": "WARN", "writer": writer}}}}


def _bracketed(address: str) -> str:
    return f"[{address}]" if ":" in address else address


def encode(config: dict[str, Any]) -> bytes:
    return json.dumps(config, sort_keys=True, separators=(",", ":")).encode()
