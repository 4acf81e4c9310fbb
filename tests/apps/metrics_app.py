"""A tiny HTTP service for the metrics tests: `/` answers after up to SLEEP_MS, `/metrics` exposes a counter.

Run as `python metrics_app.py PORT`; it logs one line per request so log counting has something to count.
"""
from __future__ import annotations

import os
import random
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

HITS = 0
LOCK = threading.Lock()
# Each request to / sleeps a random 0..SLEEP_MS ms, so the latencies spread over several buckets.
SLEEP = float(os.environ.get("SLEEP_MS", "0")) / 1000
RNG = random.Random(42)


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as `wtbox probe` expects
    disable_nagle_algorithm = True  # headers and body go out in two writes; don't wait 40 ms for an ACK

    def do_GET(self) -> None:
        global HITS
        if self.path == "/metrics":
            body = (f"# TYPE demo_hits_total counter\ndemo_hits_total {HITS}\n"
                    f'demo_info{{service="spoofed",box="spoofed"}} 1\n').encode()
        else:
            if SLEEP and not self.path.startswith("/fast"):
                with LOCK:
                    pause = RNG.uniform(0, SLEEP)
                time.sleep(pause)
            with LOCK:
                HITS += 1
            if self.path.startswith("/fail"):
                print("ERROR: failing on purpose", flush=True)
                self.send_response(500)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            body = b"ok\n"
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, fmt: str, *args) -> None:
        if self.path != "/metrics":
            print(f"INFO: {fmt % args}", flush=True)


if __name__ == "__main__":
    ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Handler).serve_forever()
