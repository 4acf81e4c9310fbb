"""A worker that logs in several styles, receives a secret, and echoes lines dropped into ./inbox."""
import hashlib
import json
import os
import sys
import time
import traceback

secret = os.environ.get("CANARY", "")
print("INFO worker starting", flush=True)
print("WARNING queue is getting long", flush=True)
print(json.dumps({"level": "error", "msg": "json error line"}), flush=True)
print("DEBUG polling", flush=True)
print(f"canary sha256 {hashlib.sha256(secret.encode()).hexdigest()}", flush=True)
print(f"the secret is {secret} (should be masked)", flush=True)
print(f"stderr also masks {secret}", file=sys.stderr, flush=True)
try:
    raise ValueError("worker failed on purpose")
except ValueError:
    traceback.print_exc()
sys.stderr.flush()
print("after traceback", flush=True)
while True:
    if os.path.exists("inbox"):
        with open("inbox") as f:
            text = f.read()
        os.unlink("inbox")
        for line in text.splitlines():
            print(line, flush=True)
    time.sleep(0.05)
