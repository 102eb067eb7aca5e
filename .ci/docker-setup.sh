#!/usr/bin/env bash
# Install (if missing) and start a private Docker engine for the Docker runner tests.
#
# Idempotent: an engine already answering on our socket is reused. The engine keeps its
# data under $LLMOPS_DOCKERD_ROOT (default /tmp/llmops-dockerd) and runs in the
# background after this script exits. Stdout carries exactly one line,
#     export DOCKER_HOST=unix:///tmp/llmops-dockerd/docker.sock
# so callers can `eval "$(.ci/docker-setup.sh)"`; progress and errors go to stderr.
# Needs root (or password-less sudo) to install docker.io and run dockerd.
set -euo pipefail

ROOT="${LLMOPS_DOCKERD_ROOT:-/tmp/llmops-dockerd}"
SOCK="$ROOT/docker.sock"
HOST="unix://$SOCK"
WAIT_S="${LLMOPS_DOCKERD_WAIT_S:-30}"

log() { echo "docker-setup: $*" >&2; }

SUDO=""
if [ "$(id -u)" != 0 ]; then
    if sudo -n true 2>/dev/null; then
        SUDO="sudo -n"
    else
        log "must run as root (or with password-less sudo) to install and start dockerd"
        exit 1
    fi
fi

answers() {
    [ -S "$SOCK" ] || return 1
    if command -v curl >/dev/null; then
        $SUDO curl -sf --max-time 3 --unix-socket "$SOCK" http://localhost/_ping >/dev/null 2>&1
    else
        DOCKER_HOST="$HOST" timeout 5 $SUDO docker version >/dev/null 2>&1
    fi
}

$SUDO mkdir -p "$ROOT"
# One setup at a time: test sessions started together must not start two engines.
exec 9>"$ROOT/setup.lock"
flock -w 300 9

if answers; then
    log "engine already running on $SOCK"
    echo "export DOCKER_HOST=$HOST"
    exit 0
fi

if ! command -v dockerd >/dev/null; then
    log "installing docker.io"
    export DEBIAN_FRONTEND=noninteractive
    if ! $SUDO apt-get install -y --no-install-recommends docker.io >&2; then
        $SUDO apt-get update >&2
        $SUDO apt-get install -y --no-install-recommends docker.io >&2
    fi
fi

# An engine killed without a clean stop (CI ends every process of the session) leaves its
# pid file and socket behind, and a new dockerd refuses to start over the pid file.
clear_stale() {
    local pidfile="$ROOT/docker.pid" old
    if [ -f "$pidfile" ]; then
        old="$(cat "$pidfile" 2>/dev/null || true)"
        if [ -z "$old" ] || ! kill -0 "$old" 2>/dev/null; then
            log "removing stale pid file of a dockerd that is gone (pid ${old:-?})"
            $SUDO rm -f "$pidfile" "$SOCK"
        fi
    fi
    # containerd started by that dockerd keeps its own state under exec-root.
    $SUDO rm -f "$ROOT/exec/containerd/containerd.pid" 2>/dev/null || true
}
clear_stale

start_engine() {  # $1: storage driver; returns 0 once the socket answers
    local driver="$1" pid
    local data="$ROOT/data-$driver" logf="$ROOT/dockerd-$driver.log"
    log "starting dockerd (storage driver $driver, log $logf)"
    # fd 9 (the setup lock) must not leak into the daemon, or the lock is held forever.
    $SUDO setsid dockerd --storage-driver="$driver" --data-root "$data" --exec-root "$ROOT/exec" \
        --pidfile "$ROOT/docker.pid" -H "$HOST" </dev/null >"$logf" 2>&1 9>&- &
    pid=$!
    for _ in $(seq 1 $((WAIT_S * 4))); do
        if answers; then return 0; fi
        if ! kill -0 "$pid" 2>/dev/null && ! answers; then break; fi
        sleep 0.25
    done
    log "dockerd with $driver did not come up; last lines of $logf:"
    tail -n 5 "$logf" >&2 || true
    kill "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    return 1
}

if start_engine overlay2 || start_engine vfs; then
    echo "export DOCKER_HOST=$HOST"
    exit 0
fi
log "could not start dockerd"
exit 1
