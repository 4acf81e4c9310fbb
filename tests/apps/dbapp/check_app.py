"""The app's own test suite: starts the server on $PORT against its database and checks the API.

It owns the database while it runs (it empties the items table), like most app test suites,
so two copies that share one schema step on each other.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import unittest
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
BASE = f"http://127.0.0.1:{os.environ.get('PORT', '0')}"


def call(method: str, path: str, body: object | None = None) -> object:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(BASE + path, data=data, method=method, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.loads(resp.read())


def wait_for_peers() -> None:
    """Optional start line for runs of several copies at once: DBAPP_BARRIER=dir (one per copy, which
    the one running them watches): say `ready` there, start on `go`."""
    barrier = os.environ.get("DBAPP_BARRIER")
    if not barrier:
        return
    open(os.path.join(barrier, "ready"), "w").close()
    deadline = time.time() + 120
    while not os.path.exists(os.path.join(barrier, "go")):
        if time.time() > deadline:
            raise RuntimeError("the other copies never reached the start line")
        time.sleep(0.01)


class ItemsApi(unittest.TestCase):
    @classmethod
    def setUpClass(cls) -> None:
        subprocess.run([sys.executable, "migrate.py"], cwd=HERE, check=True, capture_output=True)
        cls.server = subprocess.Popen([sys.executable, "app.py"], cwd=HERE)
        deadline = time.time() + 15
        while True:
            try:
                call("GET", "/health")
                break
            except OSError:
                if cls.server.poll() is not None:
                    raise RuntimeError(f"app.py exited with {cls.server.returncode} (is port {BASE} taken?)")
                if time.time() > deadline:
                    raise
                time.sleep(0.05)
        wait_for_peers()

    @classmethod
    def tearDownClass(cls) -> None:
        cls.server.terminate()
        cls.server.wait(10)

    def test_add_and_list(self) -> None:
        call("DELETE", "/items")
        tag = os.environ.get("WTBOX_ID", "local")
        names = [f"{tag}-{i}" for i in range(5)]
        for name in names:
            self.assertEqual(call("POST", "/items", {"name": name})["name"], name)
        time.sleep(0.5)  # the app does some work; another user of the same tables would show up here
        self.assertEqual(call("GET", "/items"), names)

    def test_delete_empties_the_list(self) -> None:
        call("POST", "/items", {"name": "x"})
        call("DELETE", "/items")
        time.sleep(0.3)
        self.assertEqual(call("GET", "/items"), [])


if __name__ == "__main__":
    unittest.main()
