#!/usr/bin/env bash
# The local SuperLink that `flwr run` starts in the background for simulations, and only that one.
#
#   scripts/local_superlink.sh status   its pid, if it is running
#   scripts/local_superlink.sh stop     stop it (SIGTERM, then SIGKILL after 10 s) and its children
#
# `flwr run` with Flower's default `local` connection starts `flower-superlink --simulation`
# detached, logging to $FLWR_HOME/local-superlink/superlink.log (FLWR_HOME defaults to ~/.flwr),
# and leaves it running. This script finds the SuperLink of yours whose command line names that
# log file: another user's SuperLink, a deployment's, or the local one of another FLWR_HOME is
# left alone (`pkill -f flower-superlink` would stop them all).
set -euo pipefail

PYTHON="${PYTHON:-python3}"

# Where Flower itself puts the log file (flwr/cli/local_superlink.py).
flwr_home="$("$PYTHON" -c 'from flwr.supercore.utils import get_flwr_home; print(get_flwr_home())' 2>/dev/null)" || {
    echo "error: '$PYTHON' cannot import flwr; activate the environment where fl-diloco is installed" >&2
    exit 2; }
log_file="$flwr_home/local-superlink/superlink.log"

# Running, and not a zombie waiting to be reaped.
alive() {
    local state
    state="$(ps -o stat= -p "$1" 2>/dev/null)" && [[ "${state// /}" != Z* ]]
}

# Pids of our local SuperLink (normally one).
superlink_pids() {
    local pid args
    for pid in $(pgrep -u "$(id -u)" -f flower-superlink || true); do
        args="$(ps -ww -o args= -p "$pid" 2>/dev/null)" || continue
        [[ " $args " == *"flower-superlink "*" --log-file $log_file "* ]] && echo "$pid"
    done
    return 0
}

# $1 and all its descendants, parents first.
process_tree() {
    local child
    echo "$1"
    for child in $(pgrep -P "$1" || true); do process_tree "$child"; done
}

# Wait up to $1 seconds until none of the remaining arguments is alive; print the survivors.
wait_for_exit() {
    local seconds="$1" pid left
    shift
    for ((t = 0; t < seconds * 10; t++)); do
        left=()
        for pid in "$@"; do alive "$pid" && left+=("$pid"); done
        ((${#left[@]})) || return 0
        sleep 0.1
    done
    echo "${left[@]}"
}

status() {
    local pids
    pids="$(superlink_pids)"
    if [[ -z "$pids" ]]; then echo "no local SuperLink running for $flwr_home"; return 0; fi
    for pid in $pids; do echo "local SuperLink (pid $pid) for $flwr_home; log: $log_file"; done
}

stop() {
    local pids tree survivors
    pids="$(superlink_pids)"
    if [[ -z "$pids" ]]; then echo "no local SuperLink running for $flwr_home"; return 0; fi
    for pid in $pids; do
        # Its SuperExec (and the app processes of a run still going) watch the SuperLink and
        # exit when it does; whatever has not within 10 s gets SIGTERM, then SIGKILL.
        tree=($(process_tree "$pid"))
        kill "$pid" 2>/dev/null || true
        survivors=($(wait_for_exit 10 "${tree[@]}"))
        if ((${#survivors[@]})); then
            kill "${survivors[@]}" 2>/dev/null || true
            survivors=($(wait_for_exit 5 "${survivors[@]}"))
            ((${#survivors[@]})) && kill -9 "${survivors[@]}" 2>/dev/null || true
        fi
        echo "stopped the local SuperLink (pid $pid) for $flwr_home"
    done
}

case "${1:-}" in
    status) status ;;
    stop) stop ;;
    *) echo "usage: $0 status | stop" >&2; exit 2 ;;
esac
