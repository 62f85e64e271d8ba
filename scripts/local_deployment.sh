#!/usr/bin/env bash
# A whole Flower deployment on this machine, for trying cross-site training out: one SuperLink
# and N SuperNodes, each a separate process as on separate sites, talking over loopback.
#
#   scripts/local_deployment.sh up [N]     start them (default N = 2) and print how to run
#   scripts/local_deployment.sh status     which of the started processes are alive
#   scripts/local_deployment.sh down       stop exactly the processes `up` started (by pid)
#
# INSECURE: no TLS and no node authentication. That is acceptable on loopback only; across
# sites use TLS and SuperNode authentication (README, "Cross-site training"). Whoever reaches
# the SuperLink's ports can submit runs that execute code on every node.
#
# State (pids, logs, the SuperLink database) goes to $FL_DILOCO_DEPLOYMENT_DIR
# (default: ./runs/local-deployment). Ports: the SuperLink's one HTTP port 8000 (fleet,
# control and runtime APIs), SuperNode i's own runtime API 9094+i.
set -euo pipefail

STATE_DIR="${FL_DILOCO_DEPLOYMENT_DIR:-$PWD/runs/local-deployment}"
PIDS="$STATE_DIR/pids"
CONNECTION="fl-diloco-local"

# The SuperLink must not install the app's dependencies per run (it would pull CUDA torch).
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1
export FLWR_TELEMETRY_ENABLED="${FLWR_TELEMETRY_ENABLED:-0}"

alive() { kill -0 "$1" 2>/dev/null; }

up() {
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
    echo "WARNING: insecure deployment (no TLS, no node authentication): loopback demo only" >&2

    flower-superlink --insecure --database "$STATE_DIR/superlink.db" \
        >"$STATE_DIR/superlink.log" 2>&1 &
    echo "superlink $!" >>"$PIDS"
    sleep 3
    for ((i = 0; i < n; i++)); do
        flower-supernode --insecure --superlink 127.0.0.1:8000 --port $((9094 + i)) \
            --node-config "partition-id=$i num-partitions=$n" \
            >"$STATE_DIR/supernode-$i.log" 2>&1 &
        echo "supernode-$i $!" >>"$PIDS"
    done
    sleep 2
    status

    # `flwr run . <connection>` reads connections from Flower's config file.
    local flwr_config="${FLWR_HOME:-$HOME/.flwr}/config.toml"
    if ! grep -q "^\[superlink\.$CONNECTION\]" "$flwr_config" 2>/dev/null; then
        mkdir -p "$(dirname "$flwr_config")"
        printf '\n[superlink.%s]\naddress = "127.0.0.1:8000"\ninsecure = true\n' "$CONNECTION" >>"$flwr_config"
        echo "added connection '$CONNECTION' (127.0.0.1:8000, insecure) to $flwr_config"
    fi
    cat <<EOF

Run training on it (num_clients must equal N, out_dir must be absolute):
  flwr run . $CONNECTION --run-config "num_clients=$n out_dir=\"$PWD/runs/deployment\"" --stream
Logs: $STATE_DIR/*.log    Stop: $0 down
EOF
}

status() {
    [[ -s "$PIDS" ]] || { echo "no deployment is up"; return 0; }
    while read -r name pid; do
        if alive "$pid"; then echo "$name (pid $pid): running"; else echo "$name (pid $pid): not running"; fi
    done <"$PIDS"
}

down() {
    [[ -s "$PIDS" ]] || { echo "no deployment is up"; return 0; }
    # SuperNodes first, so none is left retrying a SuperLink that has gone.
    tac "$PIDS" | while read -r name pid; do
        if alive "$pid"; then
            kill "$pid"
            for _ in $(seq 50); do alive "$pid" || break; sleep 0.1; done
            alive "$pid" && kill -9 "$pid"
            echo "stopped $name (pid $pid)"
        fi
    done
    rm -f "$PIDS"
}

case "${1:-}" in
    up) up "${2:-2}" ;;
    status) status ;;
    down) down ;;
    *) echo "usage: $0 up [N] | status | down" >&2; exit 2 ;;
esac
