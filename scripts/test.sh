#!/usr/bin/env bash
# Runs the whole suite inside .venv. Services the tests need (broker, Triton, PostgreSQL) are
# started and stopped by the test fixtures themselves; this script only makes sure the
# PostgreSQL server binaries are installed, since that needs apt.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
export PATH="$root/.venv/bin:$PATH"
set +e
python -m pytest "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
    echo "pytest collected no tests: failing on purpose" >&2
    exit 1
fi
# The containers suite (Docker daemon, stand-in images) runs after a green full run.
if [ "$rc" -eq 0 ] && [ "$#" -eq 0 ]; then bash "$root/scripts/containers-test.sh" || rc=$?; fi
exit "$rc"
