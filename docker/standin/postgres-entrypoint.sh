#!/bin/sh
# Stand-in for the postgres image's docker-entrypoint.sh, on Debian's PostgreSQL 15. On an empty
# PGDATA: initdb for POSTGRES_USER, its password POSTGRES_PASSWORD (scram-sha-256 over TCP),
# listen on all addresses, create POSTGRES_DB. Then run the command (default: postgres).
# Only shell built-ins are used: the image holds no coreutils.
set -eu

: "${PGDATA:=/var/lib/postgresql/data}"
user="${POSTGRES_USER:-postgres}"
db="${POSTGRES_DB:-$user}"

if [ "${1:-}" = postgres ] && [ ! -s "$PGDATA/PG_VERSION" ]; then
    if [ -z "${POSTGRES_PASSWORD:-}" ]; then
        echo "postgres stand-in: POSTGRES_PASSWORD is required" >&2
        exit 1
    fi
    initdb --username="$user" --auth-local=trust --auth-host=scram-sha-256 \
        --encoding=UTF8 --locale=C --no-instructions -D "$PGDATA" >&2
    echo "listen_addresses = '*'" >> "$PGDATA/postgresql.conf"
    echo "host all all all scram-sha-256" >> "$PGDATA/pg_hba.conf"
    # Single-user mode runs one statement per line; dollar quoting spares escaping the password.
    {
        printf 'ALTER ROLE "%s" PASSWORD $persrec_pw$%s$persrec_pw$\n' "$user" "$POSTGRES_PASSWORD"
        if [ "$db" != postgres ]; then
            printf 'CREATE DATABASE "%s" OWNER "%s"\n' "$db" "$user"
        fi
    } | postgres --single -D "$PGDATA" postgres >/dev/null
    echo "postgres stand-in: initialised $PGDATA (user $user, database $db)" >&2
fi

exec "$@"
