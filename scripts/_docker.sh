# shellcheck shell=bash
# A Docker engine for the docker backend's tests; sourced by scripts/test
# after _common.sh (uses its `quietly` and `as_root`).
#
#   ensure_docker      install Debian's docker.io if `dockerd` is missing; if
#                      no engine answers, start one (no bridge, no iptables:
#                      the tests run with --network none) and wait for it
#   stop_docker        stop the engine ensure_docker started, by its PID
#                      (nothing if it found one running); call it at exit
#
# The engine's log and pid file live in $HITZ_DOCKER_STATE (default: a
# fresh temporary folder), so a failed start can be read afterwards.

HITZ_DOCKER_PID=     # what ensure_docker started (as_root's subshell, or sudo)
HITZ_DOCKER_PIDFILE= # where dockerd itself wrote its PID

docker_answers() {
    docker version --format '{{.Server.Version}}' >/dev/null 2>&1
}

ensure_docker() {
    if ! command -v dockerd >/dev/null || ! command -v docker >/dev/null; then
        ensure_apt_packages docker.io || return 1
    fi
    if docker_answers; then
        return 0
    fi
    local state=${HITZ_DOCKER_STATE:-}
    if [[ -z $state ]]; then
        state=$(mktemp -d -t hitz-dockerd.XXXXXX)
        HITZ_DOCKER_TMP=$state # removed by stop_docker: only its log is in it
    fi
    mkdir -p "$state"
    echo "starting dockerd (log: $state/dockerd.log)" >&2
    # --bridge=none --iptables=false --ip-masq=false: no network set-up on
    # the host; every test container runs with --network none.
    as_root dockerd --bridge=none --iptables=false --ip-masq=false \
        --pidfile "$state/dockerd.pid" >"$state/dockerd.log" 2>&1 &
    HITZ_DOCKER_PID=$!
    HITZ_DOCKER_PIDFILE=$state/dockerd.pid
    local tries=0
    until docker_answers; do
        if ! kill -0 "$HITZ_DOCKER_PID" 2>/dev/null; then
            tail -n 20 "$state/dockerd.log" >&2
            echo "error: dockerd exited; its log is $state/dockerd.log" >&2
            HITZ_DOCKER_PID= HITZ_DOCKER_TMP=
            return 1
        fi
        tries=$((tries + 1))
        if ((tries > 300)); then # 30 s
            echo "error: dockerd did not answer within 30s; its log is $state/dockerd.log" >&2
            HITZ_DOCKER_TMP= # keep the log the message names
            stop_docker
            return 1
        fi
        sleep 0.1
    done
}

stop_docker() {
    [[ -n $HITZ_DOCKER_PID ]] || return 0
    local pid
    pid=$(cat "$HITZ_DOCKER_PIDFILE" 2>/dev/null) || pid=
    # The engine's own PID: $! is only the shell or sudo that started it.
    as_root kill "${pid:-$HITZ_DOCKER_PID}" 2>/dev/null || true
    # dockerd stops containerd and its containers before it exits.
    wait "$HITZ_DOCKER_PID" 2>/dev/null || true
    HITZ_DOCKER_PID= HITZ_DOCKER_PIDFILE=
    if [[ -n ${HITZ_DOCKER_TMP:-} ]]; then
        rm -rf "$HITZ_DOCKER_TMP"
        HITZ_DOCKER_TMP=
    fi
}
