#!/usr/bin/env bash
# A whole Flower deployment on this machine, for trying cross-site training out: one SuperLink
# and N SuperNodes, each a separate process as on separate sites, talking over loopback.
#
#   scripts/local_deployment.sh up [N]             secure: TLS + SuperNode authentication (default N = 2)
#   scripts/local_deployment.sh up --insecure [N]  no TLS, no authentication: a loopback demo only
#   scripts/local_deployment.sh status             which of the started processes are alive
#   scripts/local_deployment.sh down               stop exactly the processes `up` started (by pid)
#
# Secure `up` does what the README's "Cross-site training" section asks of real sites: it makes a
# CA and a SuperLink certificate (for localhost and 127.0.0.1) and one key pair per SuperNode
# (fl_diloco/certificates.py), starts the SuperLink with TLS and --enable-supernode-auth, registers
# each node's public key with `flwr supernode register`, and starts each SuperNode with the CA
# and its private key. Whoever reaches the SuperLink's port can still submit runs that execute
# code on every node (README); here it listens on 127.0.0.1 only, which keeps other machines
# out but not other accounts of this machine: any of them can submit a run, and its ServerApp
# runs as the user the SuperLink runs as. So the processes never run as root where that can be
# helped: started with sudo, the script runs everything as the user who invoked sudo
# ($SUDO_USER); started as root otherwise, it warns.
#
# `up` adds (or replaces) a connection in Flower's config file, ${FLWR_HOME:-~/.flwr}/config.toml:
# `fl-diloco-local` (TLS) or `fl-diloco-local-insecure`. State (pids, logs, certificates and keys,
# the SuperLink database) goes to $FL_DILOCO_DEPLOYMENT_DIR (default: ./runs/local-deployment).
# Ports: the SuperLink's one HTTPS port $FL_DILOCO_SUPERLINK_PORT (default 8000: fleet, control
# and runtime APIs), SuperNode i's own runtime API $FL_DILOCO_SUPERNODE_PORT+i (default 9094+i).
# SuperNodes are plain `flower-supernode`; with $FL_DILOCO_SUPERNODE_POLL=S (seconds) they are
# `fl-diloco supernode --poll-interval S` instead: Flower's SuperNode with its 3 s idle poll and
# its shorter fixed waits cut to S (fl_diloco/supernode.py), an opt-in change to Flower's behaviour.
set -euo pipefail

if ((EUID == 0)) && [[ -n "${SUDO_USER:-}" && "$SUDO_USER" != root ]]; then
    command -v setpriv >/dev/null || {
        echo "error: started with sudo, but setpriv (util-linux) is missing to run as $SUDO_USER; run this script as $SUDO_USER, without sudo" >&2
        exit 2; }
    exec setpriv --reuid="$SUDO_USER" --regid="$(id -g "$SUDO_USER")" --init-groups \
        env HOME="$(getent passwd "$SUDO_USER" | cut -d: -f6)" USER="$SUDO_USER" LOGNAME="$SUDO_USER" \
        "$0" "$@"
fi

STATE_DIR="${FL_DILOCO_DEPLOYMENT_DIR:-$PWD/runs/local-deployment}"
PIDS="$STATE_DIR/pids"
CERTS="$STATE_DIR/certificates"
SUPERLINK_PORT="${FL_DILOCO_SUPERLINK_PORT:-8000}"
SUPERNODE_PORT="${FL_DILOCO_SUPERNODE_PORT:-9094}"
SUPERNODE_POLL="${FL_DILOCO_SUPERNODE_POLL:-}"
SUPERLINK="127.0.0.1:$SUPERLINK_PORT"
SECURE_CONNECTION="fl-diloco-local"
INSECURE_CONNECTION="fl-diloco-local-insecure"
FLWR_CONFIG="${FLWR_HOME:-$HOME/.flwr}/config.toml"
PYTHON="${PYTHON:-python3}"

# The SuperLink must not install the app's dependencies per run (it would pull CUDA torch).
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1
export FLWR_TELEMETRY_ENABLED="${FLWR_TELEMETRY_ENABLED:-0}"

alive() { kill -0 "$1" 2>/dev/null; }

die() {
    echo "error: $*" >&2
    if [[ -s "$PIDS" ]]; then
        echo "stopping what was started; logs stay in $STATE_DIR" >&2
        down >&2
    fi
    exit 1
}

# Replace connection $1's block in Flower's config with the lines in $2, leaving the rest of the
# file as it was. Flower creates its default config on first use; do the same, so that adding our
# connection does not leave a file without Flower's own `local` connection.
write_connection() {
    local name="$1" body="$2"
    [[ -f "$FLWR_CONFIG" ]] || flwr config list >/dev/null
    local kept
    kept="$(awk -v header="[superlink.$name]" -v sub_prefix="[superlink.$name." '
        $0 == header || index($0, sub_prefix) == 1 { skip = 1; next }
        skip && /^\[/ { skip = 0 }
        !skip { print }' "$FLWR_CONFIG")"
    printf '%s\n\n[superlink.%s]\n%s\n' "$kept" "$name" "$body" >"$FLWR_CONFIG.tmp"
    mv "$FLWR_CONFIG.tmp" "$FLWR_CONFIG"
    echo "connection '$name' in $FLWR_CONFIG: $(echo "$body" | tr '\n' ' ')"
}

# Wait up to $2 seconds for line pattern $3 in log $1, failing early if pid $4 exits.
wait_for_log() {
    local log="$1" timeout="$2" pattern="$3" pid="$4"
    for ((t = 0; t < timeout * 10; t++)); do
        grep -q "$pattern" "$log" 2>/dev/null && return 0
        alive "$pid" || die "$(basename "$log" .log) exited while starting; its log ($log) ends with:
$(tail -n 15 "$log")"
        sleep 0.1
    done
    die "no '$pattern' in $log after ${timeout}s"
}

# Wait until N SuperNodes show as online on the SuperLink.
wait_for_nodes() {
    local n="$1" connection="$2" online=0
    for _ in $(seq 60); do
        online="$(flwr supernode list "$connection" --format json 2>/dev/null | grep -c '"status": "online"' || true)"
        [[ "$online" -ge "$n" ]] && return 0
        sleep 1
    done
    die "only $online of $n SuperNodes came online within 60 s; see $STATE_DIR/supernode-*.log"
}

make_credentials() {
    local n="$1"
    "$PYTHON" -c "import fl_diloco.certificates" 2>/dev/null || {
        echo "error: '$PYTHON' cannot import fl_diloco; activate the environment where fl-diloco is installed" >&2
        exit 2; }
    [[ -f "$CERTS/ca.crt" ]] || "$PYTHON" -m fl_diloco.certificates superlink "$CERTS" >/dev/null
    for ((i = 0; i < n; i++)); do
        [[ -f "$CERTS/supernode-$i" ]] ||
            "$PYTHON" -m fl_diloco.certificates node-key "$CERTS/supernode-$i" --comment "supernode-$i" >/dev/null
    done
    echo "certificates and SuperNode keys in $CERTS"
}

register_node() {
    local public_key="$1" output
    # The SuperLink's database outlives `down`, so a key from an earlier `up` is known already.
    if output="$(flwr supernode register "$public_key" "$SECURE_CONNECTION" 2>&1)"; then
        echo "registered $(basename "$public_key")"
    elif grep -q "already in use" <<<"$output"; then
        echo "registered $(basename "$public_key") (already, from an earlier up)"
    else
        die "could not register $public_key:
$output"
    fi
}

up() {
    local insecure=0
    if [[ "${1:-}" == "--insecure" ]]; then insecure=1; shift; fi
    local n="${1:-2}"
    if [[ ! "$n" =~ ^[1-9][0-9]*$ ]]; then
        echo "error: N must be a positive number of SuperNodes, got '$n'" >&2; exit 2
    fi
    if [[ -s "$PIDS" ]]; then
        echo "error: a deployment is already up (see $PIDS); run '$0 down' first" >&2; exit 2
    fi
    command -v flower-superlink >/dev/null || {
        echo "error: flower-superlink not found; activate the environment where fl-diloco is installed" >&2; exit 2; }
    mkdir -p "$STATE_DIR"
    [[ -w "$STATE_DIR" ]] || {
        echo "error: $STATE_DIR is not writable by $(id -un) (left by an earlier up as another user?); remove it, or set FL_DILOCO_DEPLOYMENT_DIR" >&2
        exit 2; }
    if ((EUID == 0)); then
        cat >&2 <<'EOF'
WARNING: running as root. The SuperLink, every ServerApp submitted to it and the SuperNodes'
workers run as root, and any account of this machine can submit a run to 127.0.0.1.
Run this script as an unprivileged user (started with sudo, it runs as the user who invoked it).
EOF
    fi

    local supernode_command=(flower-supernode)
    if [[ -n "$SUPERNODE_POLL" ]]; then
        [[ "$SUPERNODE_POLL" =~ ^[0-9]*\.?[0-9]+$ ]] || {
            echo "error: FL_DILOCO_SUPERNODE_POLL must be a number of seconds, got '$SUPERNODE_POLL'" >&2; exit 2; }
        command -v fl-diloco >/dev/null || {
            echo "error: fl-diloco not found (FL_DILOCO_SUPERNODE_POLL is set); activate the environment where fl-diloco is installed" >&2
            exit 2; }
        supernode_command=(fl-diloco supernode --poll-interval "$SUPERNODE_POLL")
    fi

    local connection superlink_security=() supernode_security=()
    if ((insecure)); then
        connection="$INSECURE_CONNECTION"
        cat >&2 <<'EOF'
################################################################################
# WARNING: INSECURE deployment: no TLS and no SuperNode authentication.        #
# For a loopback demo on one machine ONLY. Never expose these ports; across    #
# sites use the secure default (`up` without --insecure, README).              #
################################################################################
EOF
        superlink_security=(--insecure)
        write_connection "$connection" "address = \"$SUPERLINK\"
insecure = true"
    else
        connection="$SECURE_CONNECTION"
        make_credentials "$n"
        superlink_security=(--ssl-ca-certfile "$CERTS/ca.crt" --ssl-certfile "$CERTS/server.crt"
                            --ssl-keyfile "$CERTS/server.key" --enable-supernode-auth)
        write_connection "$connection" "address = \"$SUPERLINK\"
root-certificates = \"$CERTS/ca.crt\""
    fi

    flower-superlink "${superlink_security[@]}" --host 127.0.0.1 --port "$SUPERLINK_PORT" \
        --database "$STATE_DIR/superlink.db" >"$STATE_DIR/superlink.log" 2>&1 &
    echo "superlink $!" >>"$PIDS"
    wait_for_log "$STATE_DIR/superlink.log" 60 "Uvicorn running on" "$!"

    for ((i = 0; i < n; i++)); do
        if ((insecure)); then
            supernode_security=(--insecure)
        else
            register_node "$CERTS/supernode-$i.pub"
            supernode_security=(--root-certificates "$CERTS/ca.crt"
                                --auth-supernode-private-key "$CERTS/supernode-$i")
        fi
        "${supernode_command[@]}" "${supernode_security[@]}" --superlink "$SUPERLINK" \
            --port $((SUPERNODE_PORT + i)) --node-config "partition-id=$i num-partitions=$n" \
            >"$STATE_DIR/supernode-$i.log" 2>&1 &
        echo "supernode-$i $!" >>"$PIDS"
    done
    wait_for_nodes "$n" "$connection"
    status

    cat <<EOF

$n SuperNodes online (${supernode_command[*]}). Run training on them (num_clients must equal N, out_dir must be absolute):
  flwr run . $connection --run-config "num_clients=$n out_dir=\"$PWD/runs/deployment\"" --stream
Follow a run: flwr log <run-id> $connection    Logs: $STATE_DIR/*.log    Stop: $0 down
EOF
}

status() {
    [[ -s "$PIDS" ]] || { echo "no deployment is up"; return 0; }
    while read -r name pid; do
        if alive "$pid"; then echo "$name (pid $pid): running"; else echo "$name (pid $pid): not running"; fi
    done <"$PIDS"
}

# Stop the recorded processes named by pattern $1 together: SIGTERM, up to 5 s, then SIGKILL.
stop_matching() {
    local pattern="$1" name pid stopping=()
    while read -r name pid; do
        [[ "$name" == $pattern ]] && alive "$pid" && kill "$pid" && stopping+=("$name:$pid")
    done <"$PIDS"
    for _ in $(seq 50); do
        local left=0
        for entry in "${stopping[@]}"; do alive "${entry#*:}" && left=1; done
        ((left)) || break
        sleep 0.1
    done
    for entry in "${stopping[@]}"; do
        alive "${entry#*:}" && kill -9 "${entry#*:}"
        echo "stopped ${entry%%:*} (pid ${entry#*:})"
    done
}

down() {
    [[ -s "$PIDS" ]] || { echo "no deployment is up"; return 0; }
    # SuperNodes first, so none is left retrying a SuperLink that has gone. Each one's SuperExec
    # (a detached child) watches its parent and exits on its own within seconds.
    stop_matching "supernode-*"
    stop_matching "superlink"
    rm -f "$PIDS"
}

case "${1:-}" in
    up) shift; up "$@" ;;
    status) status ;;
    down) down ;;
    *) echo "usage: $0 up [--insecure] [N] | status | down" >&2; exit 2 ;;
esac
