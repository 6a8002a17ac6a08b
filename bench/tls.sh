#!/usr/bin/env bash
# bench/tls.sh — what TLS costs: the yardstick's put 1, put 64 and
# linearizable get 16 (128-byte values, 10,000 keys) on a five-replica
# cluster without TLS and on one with TLS (certificates from
# `kv-server certs`, the client as `writer`), in one run.
#
# Each round starts a fresh plain cluster, runs the three workloads, stops
# it, then does the same with TLS; RUNS rounds (default 3), and the table
# shows the median of each figure and the TLS/plain ratio. Alternating
# rounds spread the machine's noise over both modes.
#
# Environment: SECS (default 10), RUNS (default 3), KEEP_WORK=1.
#
#   bench/tls.sh
#   SECS=5 RUNS=5 bench/tls.sh
set -euo pipefail
source "$(dirname "$0")/lib.sh"
RUNS=${RUNS:-3}

setup_work tls
build
make_replica_file
"$SERVER" certs --replicas "$REPLICAS" --out "$WORK/tls" >/dev/null
TLS_DIR="$WORK/tls"

WORKLOADS=(
    "put, 1 client|--op put --clients 1"
    "put, 64 clients|--op put --clients 64"
    "linearizable get, 16 clients|--op get --clients 16 --preload"
)
declare -A RES=()

stop_cluster() {
    local i
    for i in $(seq 1 "$NREPLICAS"); do kill_replica "$i" TERM; done
    rm -rf "$WORK/data"
}

for r in $(seq 1 "$RUNS"); do
    for mode in plain tls; do
        CLIENT_ARGS=()
        for i in $(seq 1 "$NREPLICAS"); do
            if [[ $mode == tls ]]; then
                start_replica "$i" --tls-ca "$TLS_DIR/ca.pem" \
                    --tls-cert "$TLS_DIR/replica-$i.pem" --tls-key "$TLS_DIR/replica-$i.key"
            else
                start_replica "$i"
            fi
        done
        if [[ $mode == tls ]]; then
            CLIENT_ARGS=(--tls-ca "$TLS_DIR/ca.pem" --tls-cert "$TLS_DIR/admin.pem" --tls-key "$TLS_DIR/admin.key")
        fi
        kvc() { "$CLIENT" "${CLIENT_ARGS[@]}" --replicas "$REPLICAS" "$@"; }
        wait_leader
        for i in "${!WORKLOADS[@]}"; do
            IFS='|' read -r name args <<<"${WORKLOADS[$i]}"
            # shellcheck disable=SC2086
            out=$(bench $args --secs "$SECS" --value-size 128 --keys 10000)
            log "round $r, $mode, $name: $out"
            RES[$mode.$i]+="$out"$'\n'
        done
        stop_cluster
    done
done

echo
echo "kvpaxos commit $COMMIT, $(nproc) cores, five replicas on 127.0.0.1; median of $RUNS runs of ${SECS} s each, plain and TLS alternating"
echo
echo "| workload | plain ops/s | TLS ops/s | TLS/plain | plain p50 / p99 ms | TLS p50 / p99 ms |"
echo "|---|---:|---:|---:|---:|---:|"
for i in "${!WORKLOADS[@]}"; do
    IFS='|' read -r name _ <<<"${WORKLOADS[$i]}"
    declare -A M=()
    for mode in plain tls; do
        runs=$(printf '%s' "${RES[$mode.$i]}" | sed '/^$/d')
        M[$mode.ops]=$(jq -r .ops_per_s <<<"$runs" | median)
        M[$mode.p50]=$(jq -r .p50_ms <<<"$runs" | median)
        M[$mode.p99]=$(jq -r .p99_ms <<<"$runs" | median)
    done
    ratio=$(awk -v a="${M[tls.ops]}" -v b="${M[plain.ops]}" 'BEGIN { printf "%.2f", a / b }')
    printf '| %s | %.0f | %.0f | %s | %.2f / %.1f | %.2f / %.1f |\n' "$name" \
        "${M[plain.ops]}" "${M[tls.ops]}" "$ratio" \
        "${M[plain.p50]}" "${M[plain.p99]}" "${M[tls.p50]}" "${M[tls.p99]}"
done
