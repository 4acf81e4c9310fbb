"""A tiny real web app: stdlib http.server + psycopg, a list of items in PostgreSQL.

Reads its database settings from separate variables, as many apps do (not DATABASE_URL).
"""
from __future__ import annotations

import json
import os
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import psycopg


def connect() -> psycopg.Connection:
    return psycopg.connect(
        host=os.environ["POSTGRES_SERVER"], port=int(os.environ["POSTGRES_PORT"]),
        user=os.environ["POSTGRES_USER"], password=os.environ["POSTGRES_PASSWORD"],
        dbname=os.environ["POSTGRES_DB"], autocommit=True,
    )


class Handler(BaseHTTPRequestHandler):
    def _send(self, code: int, body: object) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        if self.path == "/health":
            with connect() as conn:
                conn.execute("SELECT 1")
            return self._send(200, {"ok": True})
        if self.path == "/items":
            with connect() as conn:
                rows = conn.execute("SELECT name FROM items ORDER BY created_at, name").fetchall()
            return self._send(200, [r[0] for r in rows])
        self._send(404, {"error": "not found"})

    def do_POST(self) -> None:
        if self.path != "/items":
            return self._send(404, {"error": "not found"})
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"{}")
        with connect() as conn:
            (item_id,) = conn.execute("INSERT INTO items (name) VALUES (%s) RETURNING id", (body["name"],)).fetchone()
        self._send(201, {"id": str(item_id), "name": body["name"]})

    def do_DELETE(self) -> None:
        if self.path != "/items":
            return self._send(404, {"error": "not found"})
        with connect() as conn:
            conn.execute("DELETE FROM items")
        self._send(200, {"deleted": True})

    def log_message(self, *args: object) -> None:  # quiet
        pass


if __name__ == "__main__":
    ThreadingHTTPServer(("127.0.0.1", int(os.environ["PORT"])), Handler).serve_forever()
