// Run by `npm test` in CI and by `wtbox test` in a box: the app, its database and its Redis.
const { test, after } = require("node:test");
const assert = require("node:assert");
const { Client } = require("pg");
const { createClient } = require("redis");

const db = new Client({ connectionString: process.env.DATABASE_URL });
const redis = createClient({ url: process.env.REDIS_URL });
after(async () => { await db.end(); await redis.quit(); });

test("the database is reachable and writable", async () => {
  await db.connect();
  await db.query("CREATE TABLE IF NOT EXISTS t (x int)");
  await db.query("INSERT INTO t VALUES (1)");
  const { rows } = await db.query("SELECT count(*)::int AS n FROM t");
  assert.ok(rows[0].n >= 1);
});

test("redis is reachable", async () => {
  await redis.connect();
  await redis.set("test-key", "v");
  assert.strictEqual(await redis.get("test-key"), "v");
});

test("the app answers on $PORT and counts in redis", async () => {
  const res = await fetch(`http://127.0.0.1:${process.env.PORT}/visits`);
  assert.strictEqual(res.status, 200);
  const { visits } = await res.json();
  assert.strictEqual(Number(await redis.get("visits")), visits);
});
