import os
import urllib.request

import psycopg
import redis
from app import app


def test_hits_counts_in_redis_and_postgres():
    client = app.test_client()
    first = client.get("/hits").get_json()["hits"]
    assert client.get("/hits").get_json()["hits"] == first + 1
    with psycopg.connect(os.environ["DATABASE_URL"]) as conn:
        assert conn.execute("SELECT max(n) FROM hits").fetchone()[0] == first + 1


def test_the_served_app_answers_on_port():
    with urllib.request.urlopen(f"http://127.0.0.1:{os.environ['PORT']}/health", timeout=10) as r:
        assert r.read() == b"ok"


def test_redis_is_this_boxes():
    r = redis.Redis.from_url(os.environ["REDIS_URL"])
    assert r.ping()
