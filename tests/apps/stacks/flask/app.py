"""A Flask app with a PostgreSQL database and Redis, described by a Procfile and .gitlab-ci.yml."""
import os

import psycopg
import redis
from flask import Flask, jsonify

app = Flask(__name__)
cache = redis.Redis.from_url(os.environ["REDIS_URL"])


@app.get("/health")
def health():
    return "ok"


@app.get("/hits")
def hits():
    n = cache.incr("hits")
    with psycopg.connect(os.environ["DATABASE_URL"]) as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS hits (n int)")
        conn.execute("INSERT INTO hits VALUES (%s)", (n,))
    return jsonify(hits=n)
