#!/usr/bin/env bash
# bench/run.sh — the yardstick: kvpaxos against etcd 3.4 on this machine.
#
# Builds the release binaries, starts five replicas (`kv-server --id N`) on
# free loopback ports with data in a temp dir (/tmp/kvbench.run.*), and runs
# the yardstick workloads with `kv-client bench`, 128-byte values over 10,000
# keys (get and mixed after --preload):
#     put 1 client, put 16, put 64, linearizable get 16, mixed 16 (90/10)
# Each workload runs RUNS times (default 2), interleaved (round 1 of every
# workload, then round 2, ...), and the table shows the median of the runs
# (with 2 runs: the mean of the two) of ops/s, p50 and p99, next to the etcd
# 3.4 reference numbers (five members on 127.0.0.1, this machine) and the
# ratio kvpaxos/etcd. The raw JSON of every run is printed too.
#
# Then the leader-failover measurement (bench/failover.py): 16 closed-loop
# put clients; after 4 s the leader is SIGKILLed; reported are the time from
# the kill to the first acknowledged put, and the put rate in the 1 s before
# the kill vs the 1 s after the first post-kill ack (see failover.py).
# Repeated FAILOVERS times (default 3) on a fresh cluster each time.
#
# Environment: SECS (default 10) seconds measured per run, RUNS (default 2),
# FAILOVERS (default 3), SKIP_TABLE=1 (failover only), KEEP_WORK=1 keeps the temp dir (replica logs).
# Stops only the processes it started (EXIT trap). Not part of CI.
#
#   bench/run.sh
#   SECS=5 RUNS=3 bench/run.sh
set -euo pipefail
source "$(dirname "$0")/lib.sh"
RUNS=${RUNS:-2}
FAILOVERS=${FAILOVERS:-3}

setup_work run
build
start_cluster
log "cluster up, leader $(leader_id); SECS=$SECS RUNS=$RUNS"

# name | bench args | etcd ops/s | etcd p50/p99
WORKLOADS=(
    "put, 1 client|--op put --clients 1|607|1.56 / 3.8"
    "put, 16 clients|--op put --clients 16|1824|8.3 / 19.7"
    "put, 64 clients|--op put --clients 64|4065|14.6 / 37.2"
    "linearizable get, 16 clients|--op get --clients 16 --preload|4566|3.1 / 11.5"
    "mixed 90/10, 16 clients|--op mixed --clients 16 --preload|2396|5.6 / 23.0"
)
declare -A RES=()
[[ -n "${SKIP_TABLE:-}" ]] && RUNS=0
for r in $(seq 1 "$RUNS"); do
    for i in "${!WORKLOADS[@]}"; do
        IFS='|' read -r name args _ _ <<<"${WORKLOADS[$i]}"
        # shellcheck disable=SC2086
        out=$(bench $args --secs "$SECS" --value-size 128 --keys 10000)
        log "run $r, $name: $out"
        RES[$i]+="$out"$'\n'
    done
done

if [[ -z "${SKIP_TABLE:-}" ]]; then
echo
echo "kvpaxos commit $COMMIT, $(nproc) cores, five replicas on 127.0.0.1; median of $RUNS runs of ${SECS} s each"
echo
echo "| workload | ops/s | p50 / p99 ms | etcd 3.4 ops/s (p50 / p99 ms) | ratio |"
echo "|---|---:|---:|---:|---:|"
for i in "${!WORKLOADS[@]}"; do
    IFS='|' read -r name _ etcd etcdlat <<<"${WORKLOADS[$i]}"
    runs=$(printf '%s' "${RES[$i]}" | sed '/^$/d')
    ops=$(jq -r .ops_per_s <<<"$runs" | median)
    p50=$(jq -r .p50_ms <<<"$runs" | median)
    p99=$(jq -r .p99_ms <<<"$runs" | median)
    all=$(jq -r .ops_per_s <<<"$runs" | paste -sd/ -)
    ratio=$(awk -v a="$ops" -v b="$etcd" 'BEGIN { printf "%.2f", a / b }')
    printf '| %s | %.0f (runs: %s) | %.2f / %.1f | %s (%s) | %sx |\n' \
        "$name" "$ops" "$all" "$p50" "$p99" "$etcd" "$etcdlat" "$ratio"
done
echo
echo "raw runs:"
for i in "${!WORKLOADS[@]}"; do printf '%s' "${RES[$i]}"; done
fi

if command -v etcd >/dev/null && command -v benchmark >/dev/null; then
    echo "(etcd and benchmark are installed, but this script only prints the reference numbers above)"
fi

# ---- leader failover -------------------------------------------------------
[[ "$FAILOVERS" == 0 ]] && exit 0
echo
echo "leader failover (16 put clients, leader SIGKILLed after 4 s):"
FO=""
for f in $(seq 1 "$FAILOVERS"); do
    cleanup_cluster() {
        for i in "${!PIDS[@]}"; do [[ -n "${PIDS[$i]}" ]] && kill_replica "$i" TERM; done
        rm -rf "$WORK/data"
    }
    cleanup_cluster
    start_cluster
    sleep 1
    L=$(leader_id)
    out=$(python3 "$ROOT/bench/failover.py" "$CLIENT" "$REPLICAS" "${PIDS[$L]}" 16)
    wait "${PIDS[$L]}" 2>/dev/null || true
    PIDS[$L]=""
    echo "  run $f (killed replica $L): $out"
    FO+="$out"$'\n'
done
FO=$(sed '/^$/d' <<<"$FO")
[[ -n "$FO" ]] && echo "  median kill -> first ack: $(jq -r .kill_to_first_ack_ms <<<"$FO" | median) ms" \
    "(runs: $(jq -r .kill_to_first_ack_ms <<<"$FO" | paste -sd/ -));" \
    "kill -> half the previous rate: $(jq -r .kill_to_rate_ms <<<"$FO" | median) ms;" \
    "put rate 1 s before / 1 s after / next 1 s: $(jq -r .before_ops_per_s <<<"$FO" | median) /" \
    "$(jq -r .after_ops_per_s <<<"$FO" | median) / $(jq -r .after2_ops_per_s <<<"$FO" | median) ops/s"
