#!/bin/sh
# Init the data dir on first start (as the postgres user), then exec postgres.
# Arguments: like the upstream image, "postgres -c key=value ..." (the leading
# "postgres" is optional).
set -eu
PGDATA=${PGDATA:-/var/lib/postgresql/data}
PGUSER_NAME=${POSTGRES_USER:-postgres}
as_postgres() { setpriv --reuid=postgres --regid=postgres --init-groups "$@"; }

mkdir -p "$PGDATA"
chown postgres:postgres "$PGDATA"
chmod 700 "$PGDATA"
if [ ! -s "$PGDATA/PG_VERSION" ]; then
    if [ -z "${POSTGRES_PASSWORD:-}" ]; then
        echo "wtbox-postgres: POSTGRES_PASSWORD must be set to initialise a new data directory." >&2
        exit 1
    fi
    pwfile=$(mktemp)
    printf '%s\n' "$POSTGRES_PASSWORD" > "$pwfile"
    chown postgres "$pwfile"
    # Local socket connections are trusted (only reachable inside the container);
    # every TCP connection must authenticate with scram-sha-256. POSTGRES_INITDB_ARGS as
    # in the upstream image (wtbox passes --no-sync for disposable data).
    # shellcheck disable=SC2086
    as_postgres initdb -D "$PGDATA" -U "$PGUSER_NAME" --pwfile="$pwfile" \
        --auth-local=trust --auth-host=scram-sha-256 --encoding=UTF8 --locale=C.UTF-8 \
        ${POSTGRES_INITDB_ARGS:-} >/dev/null
    rm -f "$pwfile"
    {
        echo "host all all 0.0.0.0/0 scram-sha-256"
        echo "host all all ::/0 scram-sha-256"
    } >> "$PGDATA/pg_hba.conf"
    if [ -n "${POSTGRES_DB:-}" ] && [ "$POSTGRES_DB" != "postgres" ]; then
        echo "CREATE DATABASE \"$POSTGRES_DB\";" | as_postgres postgres --single -D "$PGDATA" -j postgres >/dev/null
    fi
    echo "wtbox-postgres: initialised $PGDATA" >&2
fi
if [ "${1:-}" = "postgres" ]; then
    shift
fi
exec setpriv --reuid=postgres --regid=postgres --init-groups \
    postgres -D "$PGDATA" -c listen_addresses='*' -c port=5432 "$@"
