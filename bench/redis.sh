#!/usr/bin/env bash
# bench/redis.sh — the Redis door beside the SDK and beside Redis itself,
# in one run:
#
#   1. redis-benchmark SET and GET, 50 clients, without and with -P 16,
#      against the five-replica cluster's RESP port (on the leader);
#   2. `kv-client bench` put and linearizable get, 50 clients, on the same
#      cluster;
#   3. redis-benchmark the same way against one Debian redis-server with
#      `appendonly yes` and `appendfsync always` (every write fsynced
#      before it is answered, the nearest Redis comes to our durability;
#      one machine, no replication).
#
# Values are 128 bytes, keys drawn from 10,000 (-r 10000 / --keys 10000).
# RUNS rounds (default 3) of every figure; the table shows medians (the
# machine has two cores and is shared).
#
# Needs redis-tools and redis-server (`apt-get install -y redis-tools
# redis-server`).
#
# Environment: N (requests per redis-benchmark test, default 50000),
# SECS (kv-client bench seconds, default 10), RUNS (default 3), KEEP_WORK=1.
#
#   bench/redis.sh
#   N=20000 SECS=5 RUNS=1 bench/redis.sh
set -euo pipefail
source "$(dirname "$0")/lib.sh"
RUNS=${RUNS:-3}
N=${N:-50000}

for tool in redis-benchmark redis-server redis-cli jq; do
    command -v "$tool" >/dev/null || { log "$tool is missing (apt-get install -y redis-tools redis-server jq)"; exit 1; }
done

setup_work redis
build

# The replica file with a fourth column: each replica's RESP address.
python3 - "$REPLICAS" "$NREPLICAS" <<'EOF'
import socket, sys
path, n = sys.argv[1], int(sys.argv[2])
socks = []
for _ in range(3 * n + 1):
    s = socket.socket(); s.bind(("127.0.0.1", 0)); socks.append(s)
ports = [s.getsockname()[1] for s in socks]
with open(path, "w") as f:
    f.write("# ID CLIENT_ADDR PEER_ADDR REDIS_ADDR (bench)\n")
    for i in range(n):
        f.write(f"{i+1} 127.0.0.1:{ports[i]} 127.0.0.1:{ports[n+i]} 127.0.0.1:{ports[2*n+i]}\n")
with open(path + ".redis-port", "w") as f:
    f.write(str(ports[3 * n]))
EOF
REDIS_PORT=$(cat "$REPLICAS.redis-port")

for i in $(seq 1 "$NREPLICAS"); do start_replica "$i"; done
wait_leader
LEADER=$(leader_id)
LEADER_RESP=$(awk -v id="$LEADER" '$1 == id { print $4 }' "$REPLICAS")
log "leader is replica $LEADER, RESP at $LEADER_RESP"

mkdir -p "$WORK/redis-server"
redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --dir "$WORK/redis-server" \
    --appendonly yes --appendfsync always --save "" --auto-aof-rewrite-percentage 0 \
    --daemonize no \
    >"$WORK/redis-server.log" 2>&1 &
PIDS[6]=$!
for _ in $(seq 1 50); do
    redis-cli -p "$REDIS_PORT" ping >/dev/null 2>&1 && break
    sleep 0.1
done

# rb HOST PORT PIPELINE -> "set_rps get_rps set_p50 get_p50"
rb() {
    local out
    out=$(redis-benchmark -h "$1" -p "$2" -t set,get -n "$N" -c 50 -r 10000 -d 128 -P "$3" --csv 2>>"$WORK/rb.stderr")
    if grep -qi error <<<"$out" "$WORK/rb.stderr"; then log "WARNING: redis-benchmark reported errors"; fi
    # "test","rps","avg_latency_ms","min_latency_ms","p50_latency_ms",...
    awk -F'","' '
        { gsub(/"/, "", $1); gsub(/"/, "", $NF) }
        $1 == "SET" { s = $2; sp = $5 }
        $1 == "GET" { g = $2; gp = $5 }
        END { print s, g, sp, gp }' <<<"$out"
}

declare -A R=()
add() { R[$1]+="$2"$'\n'; }

for r in $(seq 1 "$RUNS"); do
    # kvpaxos first, then redis-server: neither's disk traffic runs into
    # the other's measurement (redis-server's AOF rewrite is off, too).
    for p in 1 16; do
        read -r s g sp gp < <(rb 127.0.0.1 "${LEADER_RESP##*:}" "$p")
        log "round $r: kvpaxos RESP -P $p: SET $s/s (p50 $sp ms), GET $g/s (p50 $gp ms)"
        add "kv.$p.set" "$s"; add "kv.$p.get" "$g"; add "kv.$p.setp" "$sp"; add "kv.$p.getp" "$gp"
    done
    out=$(bench --op put --clients 50 --secs "$SECS" --value-size 128 --keys 10000)
    log "round $r: kv-client bench put: $out"
    add sdk.put "$(jq -r .ops_per_s <<<"$out")"; add sdk.putp "$(jq -r .p50_ms <<<"$out")"
    out=$(bench --op get --clients 50 --secs "$SECS" --value-size 128 --keys 10000 --preload)
    log "round $r: kv-client bench get: $out"
    add sdk.get "$(jq -r .ops_per_s <<<"$out")"; add sdk.getp "$(jq -r .p50_ms <<<"$out")"
    for p in 1 16; do
        read -r s g sp gp < <(rb 127.0.0.1 "$REDIS_PORT" "$p")
        log "round $r: redis-server -P $p: SET $s/s (p50 $sp ms), GET $g/s (p50 $gp ms)"
        add "rs.$p.set" "$s"; add "rs.$p.get" "$g"; add "rs.$p.setp" "$sp"; add "rs.$p.getp" "$gp"
    done
done

med() { printf '%s' "${R[$1]}" | sed '/^$/d' | median | awk '{ printf "%.0f", $1 }'; }
medf() { printf '%s' "${R[$1]}" | sed '/^$/d' | median | awk '{ printf "%.2f", $1 }'; }

echo
echo "kvpaxos commit $COMMIT, $(nproc) cores, five replicas on 127.0.0.1 (RESP on the leader), redis-server $(redis-server --version | awk '{ print $3 }' | sed 's/^v=//'); 50 clients, 128-byte values, 10,000 keys; median of $RUNS runs"
echo
echo "| target | SET ops/s | SET p50 ms | GET ops/s | GET p50 ms |"
echo "|---|---:|---:|---:|---:|"
for p in 1 16; do
    echo "| kvpaxos, redis-benchmark -P $p | $(med kv.$p.set) | $(medf kv.$p.setp) | $(med kv.$p.get) | $(medf kv.$p.getp) |"
done
echo "| kvpaxos, kv-client bench (put / linearizable get) | $(med sdk.put) | $(medf sdk.putp) | $(med sdk.get) | $(medf sdk.getp) |"
for p in 1 16; do
    echo "| redis-server appendfsync always, redis-benchmark -P $p | $(med rs.$p.set) | $(medf rs.$p.setp) | $(med rs.$p.get) | $(medf rs.$p.getp) |"
done
