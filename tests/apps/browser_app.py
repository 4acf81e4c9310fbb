"""A tiny web app for the browser tests: `/` is a page with a coloured block, a console.error and an
image that answers 404; `/slow` never finishes loading.

Run as `python browser_app.py PORT COLOUR` (COLOUR as rrggbb hex); the block covers (0,0)-(200,100).
"""
from __future__ import annotations

import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

COLOUR = sys.argv[2] if len(sys.argv) > 2 else "ff0000"
PAGE = f"""<!doctype html>
<html><head><title>block {COLOUR}</title>
<style>html, body {{ margin: 0; background: #ffffff; }}
#block {{ position: absolute; left: 0; top: 0; width: 200px; height: 100px; background: #{COLOUR}; }}</style>
</head><body><div id="block"></div>
<img src="/missing.png" alt="" width="1" height="1" style="position: absolute; left: 600px; top: 600px">
<script>console.error("boom from the page"); console.warn("careful");</script>
</body></html>
"""


class Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        if self.path == "/slow":
            # Headers out, body never: the load event never fires.
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", "100000")
            self.end_headers()
            self.wfile.write(b"<html><body><script>console.error('half way')</script>")
            self.wfile.flush()
            time.sleep(3600)
            return
        if self.path != "/":
            self.send_error(404)
            return
        body = PAGE.encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, fmt: str, *args: object) -> None:
        print(fmt % args, flush=True)


ThreadingHTTPServer.daemon_threads = True
ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Handler).serve_forever()
