# Shared helpers for the bench/ scripts. Sourced, not run.
#
# Every script gets its own temp dir (WORK), its own free loopback ports and
# its own replica processes (started one by one with `kv-server --id N`, so
# each PID is known). The EXIT trap stops only the PIDs this script started.

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
SECS=${SECS:-10}
BIN="$ROOT/target/release"
declare -a PIDS=()      # PIDS[i] = pid of replica i (1..5), empty when down
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
    # up to 5 s for a clean stop (a replica holding 1M keys takes a while)
    local t
    for t in $(seq 1 50); do
        local alive=0
        for i in "${!PIDS[@]}"; do
            { [[ -n "${PIDS[$i]}" ]] && running "${PIDS[$i]}" && alive=1; } || true
        done
        (( alive )) || break
        sleep 0.1
    done
    for i in "${!PIDS[@]}"; do
        [[ -n "${PIDS[$i]}" ]] && kill -KILL "${PIDS[$i]}" 2>/dev/null || true
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
