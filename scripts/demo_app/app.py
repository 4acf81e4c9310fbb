"""A tiny demo web app for `scripts/demo.sh`: stdlib HTTP, counts visits in the box's own
PostgreSQL schema, exposes Prometheus metrics."""
import itertools
import os
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import psycopg

HITS = itertools.count(1)


def db():
    return psycopg.connect(host=os.environ["DB_HOST"], port=os.environ["DB_PORT"], user=os.environ["DB_USER"],
                           password=os.environ["DB_PASSWORD"], dbname=os.environ["DB_NAME"], autocommit=True)


def migrate():
    with db() as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS visits (id serial PRIMARY KEY, at timestamptz DEFAULT now())")


class Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        hits = next(HITS)
        if self.path == "/metrics":
            body = f"# TYPE demo_requests_total counter\ndemo_requests_total {hits}\n".encode()
        else:
            with db() as conn:
                conn.execute("INSERT INTO visits DEFAULT VALUES")
                n = conn.execute("SELECT count(*) FROM visits").fetchone()[0]
            body = f"hello from box {os.environ.get('WTBOX_ID')}: {n} visits\n".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, fmt, *args):
        print(f"INFO {self.address_string()} {fmt % args}", flush=True)


if __name__ == "__main__":
    if sys.argv[1:] == ["migrate"]:
        migrate()
        print("INFO migrated")
        sys.exit(0)
    print(f"INFO listening on {os.environ['PORT']}", flush=True)
    ThreadingHTTPServer(("127.0.0.1", int(os.environ["PORT"])), Handler).serve_forever()
