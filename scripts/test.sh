#!/usr/bin/env bash
# Runs the whole suite inside .venv. Services the tests need (broker, Triton, PostgreSQL) are
# started and stopped by the test fixtures themselves (scripts/dev setup installs PostgreSQL's
# binaries). With no arguments: every test but the containers suite, then, if that is green,
# scripts/containers-test.sh (Docker daemon + images + tests/containers). With arguments: pytest
# with those arguments only.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
export PATH="$root/.venv/bin:$PATH"
args=("$@")
[ "$#" -eq 0 ] && args=(-m "not containers")
set +e
python -m pytest "${args[@]}"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
    echo "pytest collected no tests: failing on purpose" >&2
    exit 1
fi
if [ "$rc" -eq 0 ] && [ "$#" -eq 0 ]; then bash "$root/scripts/containers-test.sh" || rc=$?; fi
exit "$rc"
