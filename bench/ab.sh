#!/usr/bin/env bash
# bench/ab.sh — old binaries against this tree's, in one interleaved run.
#
# BEFORE=DIR holds the old kv-server and kv-client (e.g. built from the
# parent commit); this tree is built in release as the after. For each
# workload of WORKLOADS (default "put16 put64"; also put1, put256, get16,
# mixed16), RUNS rounds (default 3) of SECS seconds (default 8): before,
# after, before, after, ..., each run on a fresh five-replica cluster.
# Prints each run's ops/s, p50 and p99, the medians, and the replicas' CPU
# per operation (user + system over the whole bench run, warm-up included,
# divided by the operations it completed, scaled to the run's length).
# Stops only the processes it started. Not part of CI.
#
#   BEFORE=/tmp/old-bin RUNS=3 SECS=8 bench/ab.sh
set -euo pipefail
source "$(dirname "$0")/lib.sh"
RUNS=${RUNS:-3}
SECS=${SECS:-8}
WORKLOADS=${WORKLOADS:-"put16 put64"}
: "${BEFORE:?set BEFORE to a directory holding the old kv-server and kv-client}"

setup_work ab
build
mkdir -p "$WORK/before" "$WORK/after"
cp "$BEFORE/kv-server" "$BEFORE/kv-client" "$WORK/before/"
cp "$SERVER" "$CLIENT" "$WORK/after/"

args_of() {
    case $1 in
        put*) echo "--op put --clients ${1#put}" ;;
        get*) echo "--op get --clients ${1#get} --preload" ;;
        mixed*) echo "--op mixed --clients ${1#mixed} --preload" ;;
        *) log "unknown workload $1"; exit 2 ;;
    esac
}
cpu_ticks() { awk '{ print $14 + $15 }' "/proc/$1/stat" 2>/dev/null || echo 0; }
HZ=$(getconf CLK_TCK)

echo "after: commit $COMMIT; before: $BEFORE; $(nproc) cores; $RUNS rounds of $SECS s, fresh cluster each run"
declare -A RES=()
for w in $WORKLOADS; do
    for r in $(seq 1 "$RUNS"); do
        for v in before after; do
            SERVER="$WORK/$v/kv-server"; CLIENT="$WORK/$v/kv-client"
            rm -rf "$WORK/data"
            start_cluster
            sleep 1
            t0=0
            for i in $(seq 1 "$NREPLICAS"); do t0=$((t0 + $(cpu_ticks "${PIDS[$i]}"))); done
            # shellcheck disable=SC2046
            out=$(bench $(args_of "$w") --secs "$SECS" --value-size 128 --keys 10000)
            t1=0
            for i in $(seq 1 "$NREPLICAS"); do t1=$((t1 + $(cpu_ticks "${PIDS[$i]}"))); done
            ops=$(jq -r .ops <<<"$out")
            us=$(awk -v d="$((t1 - t0))" -v hz="$HZ" -v n="$ops" -v s="$SECS" \
                'BEGIN { printf "%.1f", d / hz * 1e6 / (n * (s + 2) / s) }')
            out=$(jq -c --argjson us "$us" '. + {replicas_cpu_us_per_op: $us}' <<<"$out")
            log "$w round $r $v: $out (load $(cut -d' ' -f1 /proc/loadavg))"
            RES[$w.$v]+="$out"$'\n'
            for i in "${!PIDS[@]}"; do [[ -n "${PIDS[$i]}" ]] && kill_replica "$i" TERM; done
        done
    done
done

echo
echo "| workload | before ops/s (runs) | after ops/s (runs) | after/before | p99 ms before / after | replicas' CPU µs/op before / after |"
echo "|---|---:|---:|---:|---:|---:|"
for w in $WORKLOADS; do
    b=$(sed '/^$/d' <<<"${RES[$w.before]}"); a=$(sed '/^$/d' <<<"${RES[$w.after]}")
    bo=$(jq -r .ops_per_s <<<"$b" | median); ao=$(jq -r .ops_per_s <<<"$a" | median)
    printf '| %s | %.0f (%s) | %.0f (%s) | %.2f | %.1f / %.1f | %.1f / %.1f |\n' "$w" \
        "$bo" "$(jq -r '.ops_per_s | round' <<<"$b" | paste -sd/ -)" \
        "$ao" "$(jq -r '.ops_per_s | round' <<<"$a" | paste -sd/ -)" \
        "$(awk -v a="$ao" -v b="$bo" 'BEGIN { print a / b }')" \
        "$(jq -r .p99_ms <<<"$b" | median)" "$(jq -r .p99_ms <<<"$a" | median)" \
        "$(jq -r .replicas_cpu_us_per_op <<<"$b" | median)" "$(jq -r .replicas_cpu_us_per_op <<<"$a" | median)"
done
