# Shared helpers for the bench/ scripts. Sourced, not run.
#
# Every script gets its own temp dir (WORK), its own free loopback ports and
# its own replica processes (started one by one with `kv-server --id N`, so
# each PID is known). The EXIT trap stops only the PIDs this script started.

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
SECS=${SECS:-10}
BIN="$ROOT/target/release"
declare -a PIDS=()      # PIDS[i] = pid of replica i (1..5), empty when down
declare -a ETCD_PIDS=() # ETCD_PIDS[i] = pid of etcd member i (1..5), when started
NREPLICAS=5

log() { printf '[%s] %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; }

build() {
    log "building release binaries"
    (cd "$ROOT" && cargo build --release --bin kv-server --bin kv-client >&2)
    COMMIT=$(cd "$ROOT" && git rev-parse --short HEAD)
    # Copy the binaries: others may rebuild target/ while we measure.
    cp "$BIN/kv-server" "$BIN/kv-client" "$WORK/"
    SERVER="$WORK/kv-server"
    CLIENT="$WORK/kv-client"
    log "measuring commit $COMMIT; load average $(cut -d' ' -f1-3 /proc/loadavg) (other work on the machine skews results)"
}

setup_work() {
    WORK=$(mktemp -d "/tmp/kvbench.$1.XXXXXX")
    REPLICAS="$WORK/replica"
    trap cleanup EXIT
    trap 'exit 130' INT TERM
}

# running PID: the process exists and is not a zombie waiting to be reaped
running() { [[ -r /proc/$1/status ]] && ! grep -q '^State:[[:space:]]*Z' "/proc/$1/status" 2>/dev/null; }

cleanup() {
    local i
    for i in "${!PIDS[@]}"; do
        [[ -n "${PIDS[$i]}" ]] && kill -TERM "${PIDS[$i]}" 2>/dev/null || true
    done
    for i in "${!ETCD_PIDS[@]}"; do
        [[ -n "${ETCD_PIDS[$i]}" ]] && kill -TERM "${ETCD_PIDS[$i]}" 2>/dev/null || true
    done
    # up to 5 s for a clean stop (a replica holding 1M keys takes a while)
    local t
    for t in $(seq 1 50); do
        local alive=0
        for i in "${!PIDS[@]}"; do
            { [[ -n "${PIDS[$i]}" ]] && running "${PIDS[$i]}" && alive=1; } || true
        done
        for i in "${!ETCD_PIDS[@]}"; do
            { [[ -n "${ETCD_PIDS[$i]}" ]] && running "${ETCD_PIDS[$i]}" && alive=1; } || true
        done
        (( alive )) || break
        sleep 0.1
    done
    for i in "${!PIDS[@]}"; do
        [[ -n "${PIDS[$i]}" ]] && kill -KILL "${PIDS[$i]}" 2>/dev/null || true
    done
    for i in "${!ETCD_PIDS[@]}"; do
        [[ -n "${ETCD_PIDS[$i]}" ]] && kill -KILL "${ETCD_PIDS[$i]}" 2>/dev/null || true
    done
    if [[ -n "${KEEP_WORK:-}" ]]; then
        log "kept $WORK"
    else
        rm -rf "$WORK"
    fi
}

# Writes $REPLICAS with 2*NREPLICAS free loopback ports (bound to port 0 and
# released at once; the window for a clash is tiny).
make_replica_file() {
    python3 - "$REPLICAS" "$NREPLICAS" <<'EOF'
import socket, sys
path, n = sys.argv[1], int(sys.argv[2])
socks = []
for _ in range(2 * n):
    s = socket.socket(); s.bind(("127.0.0.1", 0)); socks.append(s)
ports = [s.getsockname()[1] for s in socks]
with open(path, "w") as f:
    f.write("# ID CLIENT_ADDR PEER_ADDR (bench)\n")
    for i in range(n):
        f.write(f"{i+1} 127.0.0.1:{ports[i]} 127.0.0.1:{ports[n+i]}\n")
EOF
}

# start_replica ID [extra kv-server args...]
start_replica() {
    local id=$1; shift
    RUST_LOG=${RUST_LOG:-warn} "$SERVER" --id "$id" --replicas "$REPLICAS" \
        --data-dir "$WORK/data/$id" "$@" >>"$WORK/replica-$id.log" 2>&1 &
    PIDS[$id]=$!
}

# start_cluster [extra kv-server args...]: all replicas, waits for a leader.
start_cluster() {
    make_replica_file
    local i
    for i in $(seq 1 "$NREPLICAS"); do start_replica "$i" "$@"; done
    wait_leader
}

kill_replica() {  # kill_replica ID SIGNAL
    kill "-$2" "${PIDS[$1]}" 2>/dev/null || true
    wait "${PIDS[$1]}" 2>/dev/null || true
    PIDS[$1]=""
}

kvc() { "$CLIENT" --replicas "$REPLICAS" "$@"; }

status_json() { kvc --output json --timeout 1 status 2>/dev/null || true; }

leader_id() {
    status_json | jq -r 'select(.up and .leader) | .id' | head -1
}

wait_leader() {
    local t=0 id
    while (( t < 200 )); do
        id=$(leader_id)
        if [[ -n "$id" ]]; then echo "$id" >/dev/null; return 0; fi
        sleep 0.1; t=$((t + 1))
    done
    log "no leader after 20 s"; return 1
}

applied_of() {  # applied_of ID
    status_json | jq -r --argjson id "$1" 'select(.id == $id) | .applied // -1'
}

# bench ARGS... -> one JSON line; errors > 0 are reported on stderr.
bench() {
    local out
    out=$(kvc bench "$@" 2>>"$WORK/bench.stderr")
    local errs
    errs=$(jq -r '.errors' <<<"$out")
    [[ "$errs" == "0" ]] || log "WARNING: bench $* reported errors=$errs"
    echo "$out"
}

rss_kb() {  # rss_kb PID FIELD (VmRSS|VmHWM)
    awk -v f="$2:" '$1 == f { print $2 }' "/proc/$1/status" 2>/dev/null || echo 0
}

median() { sort -g | awk '{ a[NR] = $1 } END { if (NR % 2) print a[(NR+1)/2]; else print (a[NR/2] + a[NR/2+1]) / 2 }'; }

# ---- etcd beside kvpaxos ----------------------------------------------------

# Installs etcd from Debian (etcd-server, etcd-client) where it is missing,
# builds bench/etcd-load (its own workspace, never built by CI) and copies
# it into $WORK. Sets ETCD_LOAD and ETCD_VERSION.
build_etcd() {
    if ! command -v etcd >/dev/null || ! command -v etcdctl >/dev/null; then
        log "installing etcd-server and etcd-client from Debian"
        local sudo=""
        [[ $(id -u) == 0 ]] || sudo=sudo
        ($sudo apt-get update -qq && $sudo env DEBIAN_FRONTEND=noninteractive \
            apt-get install -y -qq etcd-server etcd-client) >&2
    fi
    log "building bench/etcd-load"
    (cd "$ROOT/bench/etcd-load" && cargo build --release >&2)
    cp "$ROOT/bench/etcd-load/target/release/etcd-load" "$WORK/"
    ETCD_LOAD="$WORK/etcd-load"
    ETCD_VERSION=$(etcd --version | awk '/^etcd Version/ { print $3 }')
}

# start_etcd_cluster: five members (m1..m5) on free loopback ports, data in
# $WORK/etcd/N, etcd's defaults otherwise (its WAL is fsynced on every
# write, as kvpaxos's log is); waits until a leader is known. Sets
# ETCD_ENDPOINTS (comma-separated client addresses).
start_etcd_cluster() {
    local ports i cluster="" eps=()
    mapfile -t ports < <(python3 - "$((2 * NREPLICAS))" <<'EOF'
import socket, sys
socks = []
for _ in range(int(sys.argv[1])):
    s = socket.socket(); s.bind(("127.0.0.1", 0)); socks.append(s)
for s in socks:
    print(s.getsockname()[1])
EOF
)
    for i in $(seq 1 "$NREPLICAS"); do
        cluster+="${cluster:+,}m$i=http://127.0.0.1:${ports[$((NREPLICAS + i - 1))]}"
        eps+=("127.0.0.1:${ports[$((i - 1))]}")
    done
    mkdir -p "$WORK/etcd"
    for i in $(seq 1 "$NREPLICAS"); do
        local c="http://${eps[$((i - 1))]}" p="http://127.0.0.1:${ports[$((NREPLICAS + i - 1))]}"
        etcd --name "m$i" --data-dir "$WORK/etcd/$i" \
            --listen-client-urls "$c" --advertise-client-urls "$c" \
            --listen-peer-urls "$p" --initial-advertise-peer-urls "$p" \
            --initial-cluster "$cluster" --initial-cluster-state new \
            --initial-cluster-token "kvbench-$$" \
            --logger zap --log-level warn >>"$WORK/etcd-$i.log" 2>&1 &
        ETCD_PIDS[$i]=$!
    done
    ETCD_ENDPOINTS=$(IFS=,; echo "${eps[*]}")
    local t
    for t in $(seq 1 200); do
        [[ -n "$(etcd_leader)" ]] && return 0
        sleep 0.1
    done
    log "etcd: no leader after 20 s"; return 1
}

# The leader's client address (`etcdctl endpoint status`: the fifth field
# of its simple format is IS LEADER).
etcd_leader() {
    ETCDCTL_API=3 etcdctl --endpoints "$ETCD_ENDPOINTS" --command-timeout 1s \
        endpoint status -w simple 2>/dev/null |
        awk -F', ' '$5 == "true" { print $1; exit }'
}

# etcd_bench ARGS... -> one JSON line from etcd-load connected to the leader
# (the same arguments and output as `bench`); errors > 0 go to stderr.
etcd_bench() {
    local out leader
    leader=$(etcd_leader)
    out=$("$ETCD_LOAD" --endpoint "$leader" "$@" 2>>"$WORK/etcd-load.stderr")
    [[ "$(jq -r '.errors' <<<"$out")" == "0" ]] || log "WARNING: etcd-load $* reported errors"
    echo "$out"
}

# Stops the etcd members this script started (SIGTERM, then waits).
stop_etcd_cluster() {
    local i
    for i in "${!ETCD_PIDS[@]}"; do
        [[ -n "${ETCD_PIDS[$i]}" ]] && kill -TERM "${ETCD_PIDS[$i]}" 2>/dev/null || true
    done
    for i in "${!ETCD_PIDS[@]}"; do
        [[ -n "${ETCD_PIDS[$i]}" ]] && wait "${ETCD_PIDS[$i]}" 2>/dev/null || true
        ETCD_PIDS[$i]=""
    done
}
