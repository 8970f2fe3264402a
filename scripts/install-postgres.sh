#!/usr/bin/env bash
# Makes sure PostgreSQL's server binaries (initdb, postgres) are installed, for the embedded
# server that tests and demos start (persrec/embedded/postgres.py). Idempotent: does nothing when
# the binaries exist. Installs Debian's package non-interactively otherwise (root, or sudo).
# The package creates and may start a default cluster on port 5432; it is stopped here, and our
# servers never use it (each runs its own data directory on a free port).
set -euo pipefail

if compgen -G "/usr/lib/postgresql/*/bin/postgres" >/dev/null \
    || { [ -n "${PERSREC_PG_BINDIR:-}" ] && [ -x "$PERSREC_PG_BINDIR/postgres" ]; } \
    || command -v postgres >/dev/null; then
    exit 0
fi

if ! command -v apt-get >/dev/null; then
    echo "install-postgres: no apt-get here; install the PostgreSQL server yourself and put" \
         "its bin directory on PATH or in PERSREC_PG_BINDIR" >&2
    exit 1
fi

sudo=()
if [ "$(id -u)" -ne 0 ]; then
    sudo=(sudo)
fi

echo "install-postgres: installing PostgreSQL server (apt-get)" >&2
export DEBIAN_FRONTEND=noninteractive
"${sudo[@]}" apt-get update -q
"${sudo[@]}" apt-get install -y -q --no-install-recommends postgresql

# Stop whatever cluster the package started; leave it installed (harmless when down).
if command -v pg_lsclusters >/dev/null; then
    pg_lsclusters --no-header | while read -r version name _port status _rest; do
        if [ "$status" = "online" ]; then
            "${sudo[@]}" pg_ctlcluster --mode fast "$version" "$name" stop || true
        fi
    done
fi
