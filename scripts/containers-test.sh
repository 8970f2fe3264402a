#!/usr/bin/env bash
# The containers suite: persrec's services, its images and docker-compose.yml, in Docker.
#   scripts/containers-test.sh [pytest args...]
#
# 1. Installs Debian's docker.io and docker-compose when missing, without letting their init
#    scripts start a daemon.
# 2. Uses the Docker daemon that runs, or starts one with --iptables=false (the machine's
#    firewall rules stay as they are; published ports go through docker-proxy) and stops it, by
#    its PID, at the end.
# 3. Builds the stand-in images (docker/standin/build.py: no registry is reachable here) unless
#    PERSREC_STANDINS=0, which keeps the images named by PERSREC_*_IMAGE or their defaults.
# 4. Runs tests/containers, and tests/stream/test_end_to_end.py unchanged on containers
#    (--persrec-services=containers), with PERSREC_E2E_EVENTS events (default 4000).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
export PATH="$root/.venv/bin:$PATH"
state="$root/build/containers"  # gitignored
mkdir -p "$state"

sudo=()
if [ "$(id -u)" -ne 0 ]; then
    sudo=(sudo)
fi

install_packages() {
    local missing=()
    command -v dockerd >/dev/null || missing+=(docker.io)
    command -v docker-compose >/dev/null || missing+=(docker-compose)
    [ "${#missing[@]}" -eq 0 ] && return 0
    echo "containers-test: installing ${missing[*]} (apt-get)" >&2
    # Without this the packages' init scripts start dockerd with its default options, which
    # rewrite the firewall (FORWARD policy DROP).
    local policy=/usr/sbin/policy-rc.d created=0
    if [ ! -e "$policy" ]; then
        printf '#!/bin/sh\nexit 101\n' | "${sudo[@]}" tee "$policy" >/dev/null
        "${sudo[@]}" chmod +x "$policy"
        created=1
    fi
    export DEBIAN_FRONTEND=noninteractive
    "${sudo[@]}" apt-get update -q
    "${sudo[@]}" apt-get install -y -q --no-install-recommends "${missing[@]}" || {
        [ "$created" -eq 1 ] && "${sudo[@]}" rm -f "$policy"
        return 1
    }
    [ "$created" -eq 1 ] && "${sudo[@]}" rm -f "$policy"
    return 0
}

dockerd_pid=""

pid_of_dockerd() {  # the PID in dockerd's pidfile, if that process is a dockerd
    local pid
    pid="$(cat "$state/dockerd.pid" 2>/dev/null)" || return 1
    [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = dockerd ] && echo "$pid"
}

start_dockerd() {
    if docker info >/dev/null 2>&1; then
        echo "containers-test: using the running Docker daemon" >&2
        return 0
    fi
    echo "containers-test: starting dockerd (log $state/dockerd.log)" >&2
    "${sudo[@]}" setsid dockerd --iptables=false --ip-masq=false \
        --pidfile "$state/dockerd.pid" >"$state/dockerd.log" 2>&1 &
    for _ in $(seq 1 120); do
        if docker info >/dev/null 2>&1; then
            dockerd_pid="$(pid_of_dockerd)"
            # Containers a killed earlier run of ours left behind (stopped, with the daemon).
            docker ps -aq --filter label=org.testcontainers=true | xargs -r docker rm -f >/dev/null
            return 0
        fi
        sleep 0.5
    done
    echo "containers-test: dockerd did not start; its log:" >&2
    tail -n 30 "$state/dockerd.log" >&2
    dockerd_pid="$(pid_of_dockerd)" || true
    return 1
}

stop_dockerd() {
    [ -n "$dockerd_pid" ] || return 0
    echo "containers-test: stopping dockerd (pid $dockerd_pid)" >&2
    "${sudo[@]}" kill -TERM "$dockerd_pid" 2>/dev/null || return 0
    for _ in $(seq 1 60); do
        "${sudo[@]}" kill -0 "$dockerd_pid" 2>/dev/null || return 0
        sleep 0.5
    done
    echo "containers-test: dockerd ignored SIGTERM for 30 s: killing it" >&2
    "${sudo[@]}" kill -KILL "$dockerd_pid" 2>/dev/null || true
}
trap stop_dockerd EXIT

started=$SECONDS
install_packages
start_dockerd

if [ "${PERSREC_STANDINS:-1}" != 0 ]; then
    step=$SECONDS
    eval "$(python docker/standin/build.py)"
    echo "containers-test: images ready in $((SECONDS - step)) s" >&2
fi

export TESTCONTAINERS_RYUK_DISABLED="${TESTCONTAINERS_RYUK_DISABLED:-true}"  # no Ryuk image here
export PERSREC_CONTAINERS_REQUIRED=1  # no daemon is a failure here, not a skip
export PERSREC_E2E_EVENTS="${PERSREC_E2E_EVENTS:-4000}"
step=$SECONDS
set +e
python -m pytest -p persrec.testing.containers --persrec-services=containers \
    tests/containers tests/stream/test_end_to_end.py "$@"
rc=$?
set -e
echo "containers-test: suite ran in $((SECONDS - step)) s; all done in $((SECONDS - started)) s" >&2
if [ "$rc" -eq 5 ]; then
    echo "pytest collected no tests: failing on purpose" >&2
    exit 1
fi
exit "$rc"
