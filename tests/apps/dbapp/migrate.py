"""The app's own migrations (idempotent)."""
from app import connect

with connect() as conn:
    conn.execute('CREATE EXTENSION IF NOT EXISTS "uuid-ossp"')
    conn.execute("""CREATE TABLE IF NOT EXISTS items (
        id uuid PRIMARY KEY DEFAULT uuid_generate_v4(),
        name text NOT NULL,
        created_at timestamptz NOT NULL DEFAULT clock_timestamp())""")
print("migrations applied")
