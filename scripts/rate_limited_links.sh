#!/usr/bin/env bash
# A Flower deployment on this machine in which every SuperNode sits behind its own
# rate-limited link: the SuperLink in the host's network namespace, SuperNode i in a network
# namespace of its own, joined to the host by a veth pair shaped with `tc` in both directions.
# Real TCP traffic crosses real (virtual) interfaces at the configured rate; it is not a WAN.
#
#   sudo scripts/rate_limited_links.sh up N [--rate RATE] [--delay DELAY] [--no-flower]
#   sudo scripts/rate_limited_links.sh shape [--rate RATE] [--delay DELAY]
#   sudo scripts/rate_limited_links.sh status
#   sudo scripts/rate_limited_links.sh down
#   sudo scripts/rate_limited_links.sh check            # can it run here? (exit 3 if not)
#
# up      creates, for i = 0..N-1: namespace <name>-i, veth pair <name>-hi (host side,
#         10.213.i.1/30) / <name>-ni (namespace side, 10.213.i.2/30), a `tbf` rate limit on
#         the egress of BOTH ends (host side: what the node downloads; namespace side: what it
#         uploads) and, with --delay, a `netem` delay under it. Then starts the SuperLink on
#         10.213.0.1:8000 (not 0.0.0.0) and SuperNode i inside namespace i connecting to it
#         over link i, and adds the connection `<name>-links` to Flower's config file. No rate
#         means an unshaped link. --no-flower creates the links only.
# shape   changes the rate/delay of every link of the running setup (no rate: unshaped).
# down    stops exactly the processes `up` started (by pid, with the processes they started:
#         their children, and whatever runs inside our namespaces), deletes exactly the
#         namespaces and links it created, and removes the Flower connection it added.
#
# RATE and DELAY are in tc's units: 20mbit, 2500kbit; 10ms. The address block (default
# 10.213.0.0/16, --prefix 10.213) must be unused on this machine: `up` checks every address
# and route first and refuses to shadow any. Namespaces cannot reach each other or the outside
# (IP forwarding is not touched); SuperNode i only has a route to the SuperLink.
#
# INSECURE: no TLS and no node authentication. That is acceptable here, where every link is a
# private veth pair on one machine; across sites use TLS and SuperNode authentication (README).
#
# Needs root (CAP_NET_ADMIN), iproute2 (`ip`, `tc`), kernel support for network namespaces,
# veth and the tbf qdisc (netem only with --delay), and flower-superlink/flower-supernode on
# PATH. Exit status 3 means "cannot run on this machine" (not root, a tool or kernel feature
# missing), with the reason on stderr; 2 means a usage error.
#
# State (what was created, pids, logs, the SuperLink database): $FL_DILOCO_LINKS_DIR (default
# ./runs/rate-limited-links). Options for tests and parallel setups: --name (default fld),
# --prefix (default 10.213), --port (default 8000).
set -Eeuo pipefail  # -E: the ERR trap of `up` also fires inside the functions it calls

STATE_DIR="${FL_DILOCO_LINKS_DIR:-$PWD/runs/rate-limited-links}"
CREATED="$STATE_DIR/created"   # "netns NAME", "link NAME", "pid NAME PID", "flwr-connection NAME FILE" lines
SETTINGS="$STATE_DIR/settings" # shell assignments: NAME, PREFIX, PORT, N, RATE, DELAY
UNSUPPORTED=3

export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1
export FLWR_TELEMETRY_ENABLED="${FLWR_TELEMETRY_ENABLED:-0}"

die() { echo "error: $*" >&2; exit 2; }
unsupported() { echo "cannot run here: $*" >&2; exit "$UNSUPPORTED"; }
alive() { kill -0 "$1" 2>/dev/null; }
record() { echo "$*" >>"$CREATED"; }

check_machine() {
    [[ $EUID -eq 0 ]] || unsupported "network namespaces and tc need root (CAP_NET_ADMIN); rerun with sudo"
    command -v ip >/dev/null || unsupported "'ip' (iproute2) not found"
    command -v tc >/dev/null || unsupported "'tc' (iproute2) not found"
    ip netns list >/dev/null 2>&1 || unsupported "'ip netns' does not work here (no network namespace support?)"
    # Probe the kernel features on a throwaway namespace, so `up` never half-builds a setup.
    local probe="fldprobe$$"
    ip netns add "$probe" 2>/dev/null || unsupported "cannot create a network namespace"
    local ok=1 why=""
    if ! ip -n "$probe" link add fldp0 type veth peer name fldp1 2>/dev/null; then
        ok=0; why="the kernel has no veth support"
    elif ! ip -n "$probe" link set fldp0 up 2>/dev/null \
            || ! tc -n "$probe" qdisc add dev fldp0 root tbf rate 10mbit burst 64kb latency 100ms 2>/dev/null; then
        ok=0; why="the kernel has no tbf qdisc (CONFIG_NET_SCH_TBF)"
    fi
    local netem=1
    tc -n "$probe" qdisc replace dev fldp0 root netem delay 1ms 2>/dev/null || netem=0
    ip netns del "$probe"
    [[ $ok -eq 1 ]] || unsupported "$why"
    NETEM_AVAILABLE=$netem
}

parse_link_options() {
    RATE="" DELAY=""
    while [[ $# -gt 0 ]]; do
        case "$1" in
            --rate) RATE="${2:?--rate needs a value, e.g. 20mbit}"; shift 2 ;;
            --delay) DELAY="${2:?--delay needs a value, e.g. 10ms}"; shift 2 ;;
            --name) NAME="${2:?}"; shift 2 ;;
            --prefix) PREFIX="${2:?}"; shift 2 ;;
            --port) PORT="${2:?}"; shift 2 ;;
            --no-flower) WITH_FLOWER=0; shift ;;
            *) die "unknown option '$1'" ;;
        esac
    done
    [[ -z "$RATE" || "$RATE" =~ ^[0-9]+(\.[0-9]+)?([kmg]?bit|[kmg]?bps)$ ]] \
        || die "--rate must look like 20mbit or 2500kbit, got '$RATE'"
    [[ ! "$RATE" =~ ^0+(\.0+)?[a-z]+$ ]] || die "--rate must be above 0 (leave it out for an unshaped link)"
    [[ -z "$DELAY" || "$DELAY" =~ ^[0-9]+(\.[0-9]+)?(ms|us|s)$ ]] \
        || die "--delay must look like 10ms, got '$DELAY'"
    [[ "$DELAY" =~ ^0+(\.0+)?(ms|us|s)$ ]] && DELAY=""
    if [[ -n "$DELAY" && "${NETEM_AVAILABLE:-1}" -eq 0 ]]; then
        unsupported "--delay needs the netem qdisc, which this kernel lacks (CONFIG_NET_SCH_NETEM); use --rate alone"
    fi
    [[ "$NAME" =~ ^[a-z][a-z0-9]{0,7}$ ]] || die "--name must be 1-8 lowercase letters/digits, got '$NAME'"
    [[ "$PREFIX" =~ ^(10|172|192)\.[0-9]{1,3}$ ]] || die "--prefix must be the first two octets of a private /16, e.g. 10.213"
    [[ "$PORT" =~ ^[0-9]+$ ]] || die "--port must be a number"
}

# Egress shaping of one end: tbf for the rate, netem (parent of tbf) for the delay.
shape_device() {
    local ns="$1" dev="$2"
    local tcn=(tc); [[ -n "$ns" ]] && tcn=(tc -n "$ns")
    "${tcn[@]}" qdisc del dev "$dev" root 2>/dev/null || true
    local tbf=(tbf rate "$RATE" burst 64kb latency 200ms)
    if [[ -n "$DELAY" ]]; then
        "${tcn[@]}" qdisc add dev "$dev" root handle 1: netem delay "$DELAY"
        [[ -n "$RATE" ]] && "${tcn[@]}" qdisc add dev "$dev" parent 1:1 handle 10: "${tbf[@]}"
    elif [[ -n "$RATE" ]]; then
        "${tcn[@]}" qdisc add dev "$dev" root handle 1: "${tbf[@]}"
    fi
    return 0
}

shape_all() {
    local i
    for ((i = 0; i < N; i++)); do
        shape_device "" "$NAME-h$i"
        shape_device "$NAME-$i" "$NAME-n$i"
    done
    echo "links: ${RATE:-unshaped} each way${DELAY:+, $DELAY delay each way} ($N link(s))"
}

# Refuse an address block that any address or route of this machine overlaps.
check_block_unused() {
    local used
    # Every IPv4 address or prefix named in any address or route (all tables) counts as used.
    used=$( { ip -4 -o addr show; ip -4 route show table all; } | python3 -c '
import ipaddress, sys
block = ipaddress.ip_network(sys.argv[1])
for word in set(sys.stdin.read().split()):
    try:
        net = ipaddress.ip_network(word, strict=False)
    except ValueError:
        continue
    if net.version == 4 and net.prefixlen > 0 and net.overlaps(block):
        print(net)
' "$PREFIX.0.0/16")
    [[ -z "$used" ]] || die "the address block $PREFIX.0.0/16 is in use here ($(echo $used)); pick another with --prefix"
}

up() {
    local n="${1:-}"; shift || true
    [[ "$n" =~ ^[1-9][0-9]*$ && "$n" -le 250 ]] || die "N must be a number of SuperNodes in 1..250, got '$n'"
    NAME=fld PREFIX=10.213 PORT=8000 WITH_FLOWER=1
    check_machine
    parse_link_options "$@"
    N=$n
    if [[ -s "$CREATED" ]]; then
        die "a setup is already up (see $CREATED); run '$0 down' first"
    fi
    if [[ $WITH_FLOWER -eq 1 ]]; then
        command -v flower-superlink >/dev/null && command -v flower-supernode >/dev/null \
            || die "flower-superlink/flower-supernode not found; activate the environment where fl-diloco is installed"
    fi
    local i
    for ((i = 0; i < n; i++)); do
        ! ip netns list | grep -qw "$NAME-$i" || die "namespace $NAME-$i already exists; pick another --name"
        ! ip link show "$NAME-h$i" >/dev/null 2>&1 || die "link $NAME-h$i already exists; pick another --name"
    done
    check_block_unused
    mkdir -p "$STATE_DIR/logs"
    : >"$CREATED"
    # From here on, anything that fails takes down what was already made.
    trap 'echo "error: setup failed; removing what was created" >&2; down >&2' ERR
    printf 'NAME=%s\nPREFIX=%s\nPORT=%s\nN=%s\nRATE=%s\nDELAY=%s\n' \
        "$NAME" "$PREFIX" "$PORT" "$n" "$RATE" "$DELAY" >"$SETTINGS"

    local superlink="$PREFIX.0.1"
    for ((i = 0; i < n; i++)); do
        local ns="$NAME-$i" host="$NAME-h$i" node="$NAME-n$i"
        ip netns add "$ns"; record "netns $ns"
        ip link add "$host" type veth peer name "$node" netns "$ns"; record "link $host"
        ip addr add "$PREFIX.$i.1/30" dev "$host"
        ip link set "$host" up
        ip -n "$ns" addr add "$PREFIX.$i.2/30" dev "$node"
        ip -n "$ns" link set "$node" up
        ip -n "$ns" link set lo up  # the SuperNode's own runtime API listens on the namespace's loopback
        if [[ $i -gt 0 ]]; then     # the SuperLink's address sits on link 0's host end; reach it over link i
            ip -n "$ns" route add "$superlink/32" via "$PREFIX.$i.1" dev "$node"
        fi
    done
    shape_all

    if [[ $WITH_FLOWER -eq 1 ]]; then
        echo "WARNING: insecure deployment (no TLS, no node authentication) over private veth links on this machine" >&2
        flower-superlink --insecure --host "$superlink" --port "$PORT" --database "$STATE_DIR/superlink.db" \
            >"$STATE_DIR/logs/superlink.log" 2>&1 &
        record "pid superlink $!"
        wait_for_port "$superlink" "$PORT" "$!" "$STATE_DIR/logs/superlink.log"
        for ((i = 0; i < n; i++)); do
            ip netns exec "$NAME-$i" flower-supernode --insecure --superlink "$superlink:$PORT" --port 9094 \
                --node-config "partition-id=$i num-partitions=$n" \
                >"$STATE_DIR/logs/supernode-$i.log" 2>&1 &
            record "pid supernode-$i $!"
        done
        add_flwr_connection "$NAME-links" "$superlink:$PORT"
    fi
    trap - ERR
    status
    if [[ $WITH_FLOWER -eq 1 ]]; then
        cat <<EOF

Run training on it (num_clients must equal N, out_dir must be absolute):
  flwr run . $NAME-links --run-config "num_clients=$n out_dir=\"$PWD/runs/links\"" --stream
Logs: $STATE_DIR/logs    Change the links: $0 shape --rate 20mbit    Stop: $0 down
EOF
    fi
}

wait_for_port() {
    local host="$1" port="$2" pid="$3" log="$4"
    for _ in $(seq 100); do
        alive "$pid" || { echo "error: the SuperLink exited; see $log" >&2; return 1; }
        if python3 -c 'import socket, sys; socket.create_connection((sys.argv[1], int(sys.argv[2])), 1).close()' \
                "$host" "$port" 2>/dev/null; then
            return 0
        fi
        sleep 0.3
    done
    echo "error: the SuperLink does not listen on $host:$port after 30 s; see $log" >&2
    return 1
}

# `flwr run . <connection>` reads connections from Flower's config file.
add_flwr_connection() {
    local name="$1" address="$2" file="${FLWR_HOME:-$HOME/.flwr}/config.toml"
    if grep -q "^\[superlink\.$name\]" "$file" 2>/dev/null; then
        grep -A1 "^\[superlink\.$name\]" "$file" | grep -q "address = \"$address\"" \
            || echo "warning: $file already has a connection '$name' with another address; left as is" >&2
        return 0
    fi
    mkdir -p "$(dirname "$file")"
    printf '\n[superlink.%s]\naddress = "%s"\ninsecure = true\n' "$name" "$address" >>"$file"
    record "flwr-connection $name $file"
    echo "added connection '$name' ($address, insecure) to $file"
}

remove_flwr_connection() {
    local name="$1" file="$2"
    [[ -f "$file" ]] || return 0
    python3 - "$name" "$file" <<'EOF'
import re, sys
name, path = sys.argv[1], sys.argv[2]
text = open(path).read()
# Exactly the block `up` appended: a blank line, the header, address, insecure.
block = re.compile(r'\n\[superlink\.' + re.escape(name) + r'\]\naddress = "[^"\n]*"\ninsecure = true\n')
new, count = block.subn("", text, count=1)
if count:
    open(path, "w").write(new)
EOF
}

load_settings() {
    [[ -s "$SETTINGS" ]] || return 1
    # shellcheck disable=SC1090
    source "$SETTINGS"
}

shape() {
    [[ -s "$CREATED" ]] && load_settings || die "no setup is up (nothing recorded in $STATE_DIR)"
    check_machine
    local name=$NAME prefix=$PREFIX port=$PORT
    WITH_FLOWER=1
    parse_link_options "$@"
    NAME=$name PREFIX=$prefix PORT=$port
    shape_all
    printf 'NAME=%s\nPREFIX=%s\nPORT=%s\nN=%s\nRATE=%s\nDELAY=%s\n' \
        "$NAME" "$PREFIX" "$PORT" "$N" "$RATE" "$DELAY" >"$SETTINGS"
}

status() {
    [[ -s "$CREATED" ]] || { echo "nothing is up"; return 0; }
    load_settings || true
    local kind a b
    while read -r kind a b; do
        case "$kind" in
            netns) echo "namespace $a: $(ip netns pids "$a" 2>/dev/null | wc -l) process(es)" ;;
            link)
                local i="${a#"$NAME"-h}"
                echo "link $a ($PREFIX.$i.1) <-> $NAME-n$i ($PREFIX.$i.2 in $NAME-$i)"
                echo "  download shaping: $(tc qdisc show dev "$a" 2>/dev/null | tr '\n' ';')"
                echo "  upload shaping:   $(tc -n "$NAME-$i" qdisc show dev "$NAME-n$i" 2>/dev/null | tr '\n' ';')" ;;
            pid) if alive "$b"; then echo "$a (pid $b): running"; else echo "$a (pid $b): not running"; fi ;;
            flwr-connection) echo "Flower connection '$a' in $b" ;;
        esac
    done <"$CREATED"
}

# A process and everything it started that is still there, children first.
descendants() {
    local child
    for child in $(ps -o pid= --ppid "$1" 2>/dev/null); do
        descendants "$child"
        echo "$child"
    done
}

stop_pids() {
    local pid
    for pid in "$@"; do kill "$pid" 2>/dev/null || true; done
    for _ in $(seq 50); do
        local left=0
        for pid in "$@"; do alive "$pid" && left=1; done
        [[ $left -eq 0 ]] && return 0
        sleep 0.1
    done
    for pid in "$@"; do kill -9 "$pid" 2>/dev/null || true; done
    return 0
}

down() {
    [[ -s "$CREATED" ]] || { echo "nothing is up"; rm -f "$SETTINGS"; return 0; }
    local kind a b
    # Processes first (SuperNodes before the SuperLink, so none is left retrying it), then
    # whatever still runs in our namespaces (the ClientApps and workers the SuperNodes
    # started), then the links and namespaces, then the Flower connection.
    while read -r kind a b; do
        [[ "$kind" == pid ]] || continue
        # Only a process still running the program we started: never a recycled pid.
        if ! tr '\0' ' ' 2>/dev/null <"/proc/$b/cmdline" | grep -q "flower-super"; then
            echo "$a (pid $b) had already exited"; continue
        fi
        local tree
        tree=$(descendants "$b")
        stop_pids "$b" $tree
        echo "stopped $a (pid $b)"
    done < <(tac "$CREATED")
    while read -r kind a b; do
        [[ "$kind" == netns ]] || continue
        local inside
        inside=$(ip netns pids "$a" 2>/dev/null || true)
        if [[ -n "$inside" ]]; then
            stop_pids $inside
            echo "stopped $(echo $inside | wc -w) process(es) left in $a"
        fi
    done <"$CREATED"
    while read -r kind a b; do
        case "$kind" in
            link) if ip link del "$a" 2>/dev/null; then echo "deleted link $a"; fi ;;
            netns) if ip netns del "$a" 2>/dev/null; then echo "deleted namespace $a"; fi ;;
            flwr-connection) remove_flwr_connection "$a" "$b"; echo "removed Flower connection '$a'" ;;
        esac
    done < <(tac "$CREATED")
    rm -f "$CREATED" "$SETTINGS"
}

case "${1:-}" in
    up) shift; up "$@" ;;
    shape) shift; shape "$@" ;;
    status) status ;;
    down) down ;;
    check) check_machine; echo "ok: root, ip, tc, network namespaces, veth and tbf work here$([[ $NETEM_AVAILABLE -eq 1 ]] && echo ", and netem (delay)" || echo "; netem (delay) does not")" ;;
    *) echo "usage: $0 up N [--rate RATE] [--delay DELAY] [--no-flower] | shape [--rate RATE] [--delay DELAY] | status | down | check" >&2; exit 2 ;;
esac
