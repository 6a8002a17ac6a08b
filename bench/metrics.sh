#!/usr/bin/env bash
# bench/metrics.sh — what the metrics cost: the yardstick's put 64 and
# linearizable get 16 with binaries from before the metrics (BEFORE=DIR
# holding kv-server and kv-client, e.g. built from the parent commit) and
# with this tree's, every replica serving --admin-addr and its /metrics
# scraped once a second during the run (a scraper 15x more eager than
# Prometheus's default). A fresh five-replica cluster for every run; the
# variants alternate (before, after, before, after, ...), RUNS rounds
# (default 3) of SECS seconds (default 8). Prints each run's ops/s and p99
# and the medians. Stops only the processes it started. Not part of CI.
#
#   BEFORE=/tmp/old-bin RUNS=3 SECS=8 bench/metrics.sh
set -euo pipefail
source "$(dirname "$0")/lib.sh"
RUNS=${RUNS:-3}
SECS=${SECS:-8}
: "${BEFORE:?set BEFORE to a directory holding the old kv-server and kv-client}"

setup_work metrics
build
mkdir -p "$WORK/before" "$WORK/after"
cp "$BEFORE/kv-server" "$BEFORE/kv-client" "$WORK/before/"
cp "$SERVER" "$CLIENT" "$WORK/after/"

SCRAPER=""
stop_cluster() {
    [[ -n "$SCRAPER" ]] && kill "$SCRAPER" 2>/dev/null && wait "$SCRAPER" 2>/dev/null || true
    SCRAPER=""
    local i
    for i in "${!PIDS[@]}"; do
        [[ -n "${PIDS[$i]}" ]] && kill -TERM "${PIDS[$i]}" 2>/dev/null || true
    done
    for i in "${!PIDS[@]}"; do
        [[ -n "${PIDS[$i]}" ]] && wait "${PIDS[$i]}" 2>/dev/null || true
        PIDS[$i]=""
    done
    rm -rf "$WORK/data"
}

# run VARIANT ARGS... -> "ops/s p99"
run() {
    local variant=$1; shift
    SERVER="$WORK/$variant/kv-server"
    CLIENT="$WORK/$variant/kv-client"
    make_replica_file
    local i admins=()
    for i in $(seq 1 "$NREPLICAS"); do
        if [[ "$variant" == after ]]; then
            local port
            port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
            admins+=("127.0.0.1:$port")
            start_replica "$i" --admin-addr "127.0.0.1:$port"
        else
            start_replica "$i"
        fi
    done
    wait_leader
    if [[ "$variant" == after ]]; then
        ( while true; do
              for a in "${admins[@]}"; do curl -s -o /dev/null "http://$a/metrics" || true; done
              sleep 1
          done ) &
        SCRAPER=$!
    fi
    local out
    out=$(bench "$@" --secs "$SECS" --value-size 128 --keys 10000)
    stop_cluster
    jq -r '"\(.ops_per_s|floor) \(.p99_ms)"' <<<"$out"
}

declare -A OPS=()
for r in $(seq 1 "$RUNS"); do
    for w in "put64|--op put --clients 64" "get16|--op get --clients 16 --preload"; do
        IFS='|' read -r name args <<<"$w"
        for v in before after; do
            # shellcheck disable=SC2086
            res=$(run "$v" $args)
            log "round $r $name $v: $res"
            OPS[$name.$v]+="${res%% *}"$'\n'
        done
    done
done
for name in put64 get16; do
    b=$(printf '%s' "${OPS[$name.before]}" | median)
    a=$(printf '%s' "${OPS[$name.after]}" | median)
    echo "$name: before $(printf '%s' "${OPS[$name.before]}" | tr '\n' ' ')median $b; after $(printf '%s' "${OPS[$name.after]}" | tr '\n' ' ')median $a; after/before $(awk -v a="$a" -v b="$b" 'BEGIN{printf "%.3f", a/b}')"
done
