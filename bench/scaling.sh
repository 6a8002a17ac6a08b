#!/usr/bin/env bash
# bench/scaling.sh — how kvpaxos scales with clients, value size and data.
#
# Builds release, starts five replicas on free loopback ports (temp dir
# /tmp/kvbench.scaling.*), then:
#   1. put and linearizable get with 1, 4, 16, 64 and 256 clients, 128-byte
#      values over 10,000 keys (keys preloaded first): ops/s, p50, p99.
#   2. put latency with 128 B, 4 KiB and 64 KiB values, 1 and 16 clients,
#      over 1,000 keys (so 64 KiB values stay at ~64 MB of live data).
#   3. memory, on a fresh cluster: VmRSS and VmHWM (/proc/PID/status) of
#      every replica when empty, after loading 100,000 keys and after
#      1,000,000 keys, 100-byte values. Loading is `bench --preload` (puts
#      key-0 .. key-(N-1) once each, 256 clients); `status` confirms the key
#      count. Reported: the leader's and the max over the replicas.
# Each measurement of 1 and 2 runs RUNS times (default 2); tables show the
# median (= the mean for 2 runs) and every run's ops/s.
#
# Environment: SECS (default 10), RUNS (default 2), MEM_KEYS (default
# "100000 1000000"), SKIP_MEM=1, KEEP_WORK=1. Stops only what it started.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
RUNS=${RUNS:-2}
MEM_KEYS=${MEM_KEYS:-"100000 1000000"}

setup_work scaling
build
start_cluster
log "cluster up, leader $(leader_id); SECS=$SECS RUNS=$RUNS"

# row NAME ARGS... : runs bench RUNS times, prints a markdown row
row() {
    local name=$1; shift
    local runs="" r out
    for r in $(seq 1 "$RUNS"); do
        out=$(bench "$@" --secs "$SECS")
        log "$name run $r: $out"
        runs+="$out"$'\n'
    done
    runs=$(sed '/^$/d' <<<"$runs")
    printf '| %s | %.0f (runs: %s) | %.2f | %.1f |\n' "$name" \
        "$(jq -r .ops_per_s <<<"$runs" | median)" \
        "$(jq -r .ops_per_s <<<"$runs" | paste -sd/ -)" \
        "$(jq -r .p50_ms <<<"$runs" | median)" \
        "$(jq -r .p99_ms <<<"$runs" | median)"
}

echo "kvpaxos commit $COMMIT, $(nproc) cores; median of $RUNS runs of ${SECS} s each"
echo
echo "### clients (128-byte values, 10,000 keys)"
echo
echo "| workload | ops/s | p50 ms | p99 ms |"
echo "|---|---:|---:|---:|"
kvc bench --op put --preload --clients 64 --keys 10000 --secs 1 >/dev/null 2>>"$WORK/bench.stderr"
for op in put get; do
    for c in 1 4 16 64 256; do
        row "$op, $c client$([[ $c == 1 ]] || echo s)" --op "$op" --clients "$c" --value-size 128 --keys 10000
    done
done

echo
echo "### value size (put, 1,000 keys)"
echo
echo "| workload | ops/s | p50 ms | p99 ms |"
echo "|---|---:|---:|---:|"
for c in 1 16; do
    for vs in 128 4096 65536; do
        row "put $vs B, $c client$([[ $c == 1 ]] || echo s)" --op put --clients "$c" --value-size "$vs" --keys 1000
    done
done

[[ -n "${SKIP_MEM:-}" ]] && exit 0

# ---- memory ----------------------------------------------------------------
for i in $(seq 1 "$NREPLICAS"); do kill_replica "$i" TERM; done
rm -rf "$WORK/data"
start_cluster
sleep 1

mem_row() {  # mem_row LABEL
    local L i rss hwm maxrss=0 maxhwm=0 all=""
    L=$(leader_id)
    for i in $(seq 1 "$NREPLICAS"); do
        rss=$(rss_kb "${PIDS[$i]}" VmRSS); hwm=$(rss_kb "${PIDS[$i]}" VmHWM)
        (( rss > maxrss )) && maxrss=$rss
        (( hwm > maxhwm )) && maxhwm=$hwm
        all+="$i:$((rss / 1024))/$((hwm / 1024)) "
    done
    local keys
    keys=$(status_json | jq -r "select(.id == $L) | .keys")
    printf '| %s | %s | %d / %d | %d / %d | %s|\n' "$1" "$keys" \
        $(( $(rss_kb "${PIDS[$L]}" VmRSS) / 1024 )) $(( $(rss_kb "${PIDS[$L]}" VmHWM) / 1024 )) \
        $((maxrss / 1024)) $((maxhwm / 1024)) "$all"
}

echo
echo "### memory (100-byte values; MiB; per replica id:RSS/HWM)"
echo
echo "| data | keys (leader's status) | leader RSS / HWM | max RSS / max HWM | all replicas |"
echo "|---|---:|---:|---:|---|"
mem_row "empty"
for n in $MEM_KEYS; do
    t0=$(date +%s.%N)
    kvc --timeout 30 bench --op put --preload --clients 256 --keys "$n" --value-size 100 --secs 1 >/dev/null 2>>"$WORK/bench.stderr"
    t1=$(date +%s.%N)
    log "loaded $n keys in $(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.0f", b - a }') s ($(grep -ao "bench: preloaded [0-9]* keys ([0-9]* failed)" "$WORK/bench.stderr" | tail -1))"
    sleep 3  # let followers apply
    mem_row "$n keys"
done
du -sh "$WORK"/data/* | sed 's/^/disk: /'
