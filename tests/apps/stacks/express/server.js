// The app: an Express server on $PORT whose /visits counts in Redis and logs in PostgreSQL.
const express = require("express");
const { Pool } = require("pg");
const { createClient } = require("redis");

const pool = new Pool({ connectionString: process.env.DATABASE_URL });
const redis = createClient({ url: process.env.REDIS_URL });
const app = express();

app.get("/health", (req, res) => res.send("ok"));
app.get("/visits", async (req, res) => {
  const n = await redis.incr("visits");
  await pool.query("CREATE TABLE IF NOT EXISTS visits (n int)");
  await pool.query("INSERT INTO visits VALUES ($1)", [n]);
  res.json({ visits: n });
});

redis.connect().then(() => app.listen(Number(process.env.PORT), "127.0.0.1"));
