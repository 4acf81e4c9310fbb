#!/usr/bin/env bash
# The main job: make a demo repo (a tiny web app with a database and a service), cut a box
# from it with wtbox's embedded defaults (own port, PostgreSQL schema, service, metrics),
# show it, and answer on its port. Run after scripts/install.sh.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
WTBOX="$ROOT/.venv/bin/wtbox"
DEMO=${WTBOX_DEMO_REPO:-/tmp/wtbox-demo}
export PATH="$ROOT/.venv/bin:$PATH"   # the demo service runs `python3` with psycopg from the venv

if [ ! -d "$DEMO/.git" ]; then
    mkdir -p "$DEMO"
    cp "$ROOT/scripts/demo_app/app.py" "$ROOT/scripts/demo_app/wtbox.toml" "$DEMO/"
    git -C "$DEMO" init -q -b main
    git -C "$DEMO" add -A
    git -C "$DEMO" -c user.email=demo@wtbox -c user.name=demo commit -qm "demo app"
fi
"$WTBOX" new demo --repo "$DEMO"
BOX=$("$WTBOX" ls --json | "$ROOT/.venv/bin/python" -c 'import json,sys; print(json.load(sys.stdin)[-1]["id"])')
echo
"$WTBOX" status "$BOX"
PORT=$("$WTBOX" env "$BOX" --format json | "$ROOT/.venv/bin/python" -c 'import json,sys; print(json.load(sys.stdin)["PORT"])')
echo
curl -fsS "http://127.0.0.1:$PORT/" || python3 -c "import urllib.request; print(urllib.request.urlopen('http://127.0.0.1:$PORT/').read().decode())"
echo
echo "Try: $WTBOX logs $BOX   |   $WTBOX metrics $BOX 'demo_requests_total'   |   $WTBOX rm $BOX"
