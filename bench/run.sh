#!/usr/bin/env bash
# bench/run.sh — the yardstick: kvpaxos and etcd side by side on this machine.
#
# Builds the release binaries, starts five replicas (`kv-server --id N`) on
# free loopback ports with data in a temp dir (/tmp/kvbench.run.*), and,
# beside them, five etcd members (Debian's etcd-server, installed if
# missing; default settings, WAL fsynced) on other free loopback ports. The
# workloads, 128-byte values over 10,000 keys (get and mixed after
# --preload):
#     put 1 client, put 16, put 64, put 256, linearizable get 16,
#     mixed 16 (90/10)
# run against kvpaxos with `kv-client bench` and against etcd with
# bench/etcd-load (the same closed loop, keys, values, warm-up and JSON;
# every client on one HTTP/2 connection to the etcd leader, as `kv-client
# bench` shares one client). Each workload runs RUNS times (default 3),
# interleaved: round 1 of every workload on both systems, then round 2, ...;
# within a workload the system that goes first alternates from round to
# round. Both clusters stay up throughout (the idle one ticks along beside
# the measured one). The table shows the median of the runs (with 2 runs:
# the mean of the two) of ops/s, p50 and p99 for each system, the ratio of
# the medians and each round's ratio, and for the put workloads the CPU
# the five servers used per operation (user + system from /proc, over the
# whole bench run): with other work on the machine, the least disturbed
# figure. The raw JSON of every run is printed too.
#
# Then the leader-failover measurement (bench/failover.py): 16 closed-loop
# put clients; after 4 s the leader is SIGKILLed; reported are the time from
# the kill to the first acknowledged put, and the put rate in the 1 s before
# the kill vs the 1 s after the first post-kill ack (see failover.py).
# Repeated FAILOVERS times (default 3) on a fresh cluster each time.
#
# Environment: SECS (default 10) seconds measured per run, RUNS (default 3),
# FAILOVERS (default 3), ETCD=0 (kvpaxos only), SKIP_TABLE=1 (failover
# only), KEEP_WORK=1 keeps the temp dir (replica and etcd logs).
# Stops only the processes it started (EXIT trap). Not part of CI.
#
#   bench/run.sh
#   SECS=5 RUNS=3 FAILOVERS=0 bench/run.sh
set -euo pipefail
source "$(dirname "$0")/lib.sh"
RUNS=${RUNS:-3}
FAILOVERS=${FAILOVERS:-3}
ETCD=${ETCD:-1}
[[ -n "${SKIP_TABLE:-}" ]] && RUNS=0 && ETCD=0

setup_work run
build
start_cluster
log "cluster up, leader $(leader_id); SECS=$SECS RUNS=$RUNS"
if [[ "$ETCD" != 0 ]]; then
    build_etcd
    start_etcd_cluster
    log "etcd $ETCD_VERSION up, leader $(etcd_leader)"
fi
LOAD_BEFORE=$(cut -d' ' -f1-3 /proc/loadavg)

# name | bench args (both systems)
WORKLOADS=(
    "put, 1 client|--op put --clients 1"
    "put, 16 clients|--op put --clients 16"
    "put, 64 clients|--op put --clients 64"
    "put, 256 clients|--op put --clients 256"
    "linearizable get, 16 clients|--op get --clients 16 --preload"
    "mixed 90/10, 16 clients|--op mixed --clients 16 --preload"
)
declare -A RES=() ERES=()
# CPU (user + system) of the five servers over a run, per operation: the
# yardstick that other work on the machine disturbs least. Counted over
# the whole bench run, warm-up included (ops scaled by (SECS + 2) / SECS);
# shown for the put workloads only (get and mixed preload 10,000 puts in
# the same window).
HZ=$(getconf CLK_TCK)
cpu_ticks() { local t=0 p; for p in "$@"; do [[ -n "$p" ]] && t=$((t + $(awk '{ print $14 + $15 }' "/proc/$p/stat" 2>/dev/null || echo 0))); done; echo "$t"; }
with_cpu() {  # with_cpu JSON TICKS_BEFORE TICKS_AFTER ARGS -> JSON + server_cpu_us_per_op
    local us=null
    if [[ "$4" != *--preload* ]]; then
        us=$(awk -v d="$(($3 - $2))" -v hz="$HZ" -v n="$(jq -r .ops <<<"$1")" -v s="$SECS" \
            'BEGIN { printf "%.1f", (n > 0 ? d / hz * 1e6 / (n * (s + 2) / s) : 0) }')
    fi
    jq -c --argjson us "$us" '. + {server_cpu_us_per_op: $us}' <<<"$1"
}
for r in $(seq 1 "$RUNS"); do
    for i in "${!WORKLOADS[@]}"; do
        IFS='|' read -r name args <<<"${WORKLOADS[$i]}"
        common=(--secs "$SECS" --value-size 128 --keys 10000)
        for turn in 0 1; do
            # kvpaxos first in odd rounds, etcd first in even ones
            if (( (r + turn) % 2 == 1 )); then
                t0=$(cpu_ticks "${PIDS[@]}")
                # shellcheck disable=SC2086
                out=$(bench $args "${common[@]}")
                out=$(with_cpu "$out" "$t0" "$(cpu_ticks "${PIDS[@]}")" "$args")
                log "run $r, $name, kvpaxos: $out"
                RES[$i]+="$out"$'\n'
            elif [[ "$ETCD" != 0 ]]; then
                t0=$(cpu_ticks "${ETCD_PIDS[@]}")
                # shellcheck disable=SC2086
                out=$(etcd_bench $args "${common[@]}")
                out=$(with_cpu "$out" "$t0" "$(cpu_ticks "${ETCD_PIDS[@]}")" "$args")
                log "run $r, $name, etcd: $out"
                ERES[$i]+="$out"$'\n'
            fi
        done
    done
done

if [[ -z "${SKIP_TABLE:-}" ]]; then
echo
echo "kvpaxos commit $COMMIT${ETCD_VERSION:+ and etcd $ETCD_VERSION}, $(nproc) cores, five replicas/members on 127.0.0.1;" \
    "median of $RUNS interleaved runs of ${SECS} s each; load average before $LOAD_BEFORE, after $(cut -d' ' -f1-3 /proc/loadavg)"
echo
echo "| workload | kvpaxos ops/s (runs) | p50 / p99 ms | etcd ops/s (runs) | p50 / p99 ms | ratio (each round) | servers' CPU µs/op kvpaxos / etcd |"
echo "|---|---:|---:|---:|---:|---:|---:|"
# col RUNS-JSON -> "ops (runs) | p50 / p99"
col() {
    local runs ops p50 p99 all
    runs=$(sed '/^$/d' <<<"$1")
    [[ -z "$runs" ]] && { echo "- | -"; return; }
    ops=$(jq -r .ops_per_s <<<"$runs" | median)
    p50=$(jq -r .p50_ms <<<"$runs" | median)
    p99=$(jq -r .p99_ms <<<"$runs" | median)
    all=$(jq -r '.ops_per_s | round' <<<"$runs" | paste -sd/ -)
    printf '%.0f (%s) | %.2f / %.1f' "$ops" "$all" "$p50" "$p99"
}
for i in "${!WORKLOADS[@]}"; do
    IFS='|' read -r name args <<<"${WORKLOADS[$i]}"
    ratio="-"
    if [[ -n "${ERES[$i]:-}" ]]; then
        k=$(sed '/^$/d' <<<"${RES[$i]}" | jq -r .ops_per_s)
        e=$(sed '/^$/d' <<<"${ERES[$i]}" | jq -r .ops_per_s)
        ratio=$(awk -v a="$(median <<<"$k")" -v b="$(median <<<"$e")" 'BEGIN { printf "%.1f×", a / b }')
        each=$(paste -d' ' <(echo "$k") <(echo "$e") | awk '{ printf "%s%.1f", (NR > 1 ? " / " : ""), $1 / $2 }')
        ratio+=" ($each)"
    fi
    cpu() { sed '/^$/d' <<<"$1" | jq -r 'select(.server_cpu_us_per_op != null) | .server_cpu_us_per_op' | median; }
    cpus="-"
    [[ "$args" != *--preload* ]] && cpus="$(cpu "${RES[$i]}") / $(cpu "${ERES[$i]:-}")"
    printf '| %s | %s | %s | %s | %s |\n' "$name" "$(col "${RES[$i]}")" "$(col "${ERES[$i]:-}")" "$ratio" "$cpus"
done
echo
echo "raw runs:"
for i in "${!WORKLOADS[@]}"; do printf '%s' "${RES[$i]}" "${ERES[$i]:-}"; done
fi

# ---- leader failover -------------------------------------------------------
[[ "$FAILOVERS" == 0 ]] && exit 0
stop_etcd_cluster
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
