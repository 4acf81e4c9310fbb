"""A tiny app for the router tests, one service per mode.

    python router_app.py http PORT [NAME] a page titled "box NAME" (default $WTBOX_ID) at /, server-sent events at
                                          /events ("hello NAME" at once, then the stream stays open)
    python router_app.py ws PORT          a WebSocket echo (the `websockets` package)
"""
from __future__ import annotations

import asyncio
import os
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

MODE, PORT = sys.argv[1], int(sys.argv[2])
NAME = sys.argv[3] if len(sys.argv) > 3 else os.environ.get("WTBOX_ID", "")
PAGE = f"<!doctype html><html><head><title>box {NAME}</title></head><body><h1 id='name'>{NAME}</h1></body></html>"


class Page(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as browsers and the router's upstream connections use it
    # Headers and body leave in two writes: with Nagle's algorithm the body would wait for the
    # peer's delayed ACK (40 ms), as no real app server lets it (they set TCP_NODELAY too).
    disable_nagle_algorithm = True

    def do_GET(self) -> None:
        if self.path == "/events":
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            self.wfile.write(f"data: hello {NAME}\n\n".encode())
            self.wfile.flush()
            time.sleep(30)  # the stream stays open: a proxy that buffers would hold the event back
            return
        body = PAGE.encode() if self.path == "/" else b"not found"
        self.send_response(200 if self.path == "/" else 404)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, fmt: str, *args: object) -> None:
        print(fmt % args, flush=True)


async def echo_forever() -> None:
    from websockets.asyncio.server import serve

    async def echo(ws) -> None:
        async for message in ws:
            await ws.send(message)

    async with serve(echo, "127.0.0.1", PORT):
        await asyncio.Future()


if MODE == "ws":
    asyncio.run(echo_forever())
else:
    ThreadingHTTPServer.daemon_threads = True
    ThreadingHTTPServer(("127.0.0.1", PORT), Page).serve_forever()
