#!/usr/bin/env bash
# bench/profile.sh — where the CPU of one workload goes.
#
# Builds release, starts five replicas on free loopback ports (temp dir
# /tmp/kvbench.profile.*), runs one `kv-client bench` workload (ARGS,
# default "--op put --clients 64 --value-size 128 --keys 10000") for SECS
# (default 10) s and reports:
#   1. CPU per operation of each process (user + system from
#      /proc/PID/stat over the run, warm-up included, divided by every
#      operation the run completed): the leader, each follower, the client.
#      On 2 cores the sum bounds the throughput: 2 s of CPU a second.
#   2. with PERF=1: `perf record -e cpu-clock -g` of the leader during a
#      second run (this VM has no hardware counters; cpu-clock sampling
#      works; DWARF call graphs, CALL_GRAPH to change), and the top of
#      `perf report` by symbol (self and inclusive) and by thread.
#   3. with CALLGRIND=1: replica 1 restarted under `valgrind
#      --tool=callgrind`, made the leader (links between the other four
#      cut with `kv-client fault --isolate`, and replica 1 cut from the old
#      leader, until replica 1 leads; then healed), the workload run again
#      against it, and the top of `callgrind_annotate` (instructions, the
#      counter this VM's perf lacks). The leader is far slower under
#      valgrind, so its batches are larger than without it.
# Outputs (perf.data, callgrind.out) are kept in OUT (default
# /tmp/kvprofile). Environment: SECS, ARGS, PERF=1, CALLGRIND=1, OUT,
# KEEP_WORK=1. Stops only what it started. Not part of CI.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
ARGS=${ARGS:-"--op put --clients 64 --value-size 128 --keys 10000"}
OUT=${OUT:-/tmp/kvprofile}
mkdir -p "$OUT"

setup_work profile
build
# CALLGRIND moves the leadership with `kv-client fault --isolate`
start_cluster ${CALLGRIND:+--enable-fault-injection}
sleep 1
L=$(leader_id)
echo "kvpaxos commit $COMMIT, $(nproc) cores; workload: bench $ARGS --secs $SECS; leader $L"

cpu_ticks() {  # cpu_ticks PID -> utime + stime in clock ticks
    awk '{ print $14 + $15 }' "/proc/$1/stat" 2>/dev/null || echo 0
}
HZ=$(getconf CLK_TCK)

# ---- 1. CPU per operation --------------------------------------------------
declare -A before=()
for i in $(seq 1 "$NREPLICAS"); do before[$i]=$(cpu_ticks "${PIDS[$i]}"); done
la0=$(cut -d' ' -f1 /proc/loadavg)
# shellcheck disable=SC2086
"$CLIENT" --replicas "$REPLICAS" bench $ARGS --secs "$SECS" >"$WORK/out.json" 2>>"$WORK/bench.stderr" &
cpid=$!
cbefore=$(cpu_ticks "$cpid")
sleep "$SECS"; sleep 1.9  # warm-up 2 s
cafter=$(cpu_ticks "$cpid")
wait "$cpid"
out=$(cat "$WORK/out.json")
ops=$(jq -r .ops <<<"$out")
# every op of the run, warm-up included: measured ops * (secs + 2) / secs
all_ops=$(awk -v o="$ops" -v s="$SECS" 'BEGIN { printf "%.0f", o * (s + 2) / s }')
echo
echo "1. $out (load average $la0 before, $(cut -d' ' -f1 /proc/loadavg) after)"
echo "   CPU per operation (µs), over ~$all_ops operations:"
total=0
for i in $(seq 1 "$NREPLICAS"); do
    d=$(( $(cpu_ticks "${PIDS[$i]}") - before[$i] ))
    us=$(awk -v d="$d" -v hz="$HZ" -v n="$all_ops" 'BEGIN { printf "%.1f", d / hz * 1e6 / n }')
    total=$(awk -v a="$total" -v b="$us" 'BEGIN { print a + b }')
    echo "     replica $i$([[ $i == "$L" ]] && echo ' (leader)'): $us"
done
cus=$(awk -v d="$((cafter - cbefore))" -v hz="$HZ" -v n="$all_ops" 'BEGIN { printf "%.1f", d / hz * 1e6 / n }')
echo "     client (kv-client bench): $cus"
echo "     all: $(awk -v a="$total" -v b="$cus" 'BEGIN { printf "%.1f µs -> at most %.0f ops/s on %d cores", a + b, 2e6 / (a + b) * '"$(nproc)"' / 2, '"$(nproc)"' }')"

# ---- 2. perf cpu-clock of the leader ---------------------------------------
if [[ -n "${PERF:-}" ]]; then
    L=$(leader_id)
    # shellcheck disable=SC2086
    kvc bench $ARGS --secs "$SECS" >"$WORK/out2.json" 2>>"$WORK/bench.stderr" &
    cpid=$!
    sleep 2
    perf record -q -e cpu-clock -F "${PERF_FREQ:-499}" --call-graph "${CALL_GRAPH:-dwarf,16384}" -p "${PIDS[$L]}" -o "$OUT/perf.data" -- sleep "$((SECS - 1))" 2>/dev/null
    wait "$cpid"
    echo
    echo "2. perf (cpu-clock) of the leader (replica $L) during: $(cat "$WORK/out2.json")"
    perf report -i "$OUT/perf.data" --no-children --sort symbol --stdio 2>/dev/null |
        grep -E '^ +[0-9.]+%' | head -40 | sed 's/ *- *- *$//; s/^/   /' || true
    perf report -i "$OUT/perf.data" --no-children --sort comm,dso --stdio 2>/dev/null |
        grep -E '^ +[0-9.]+%' | head -10 | sed 's/ *$//; s/^/   thread, dso: /' || true
    perf report -i "$OUT/perf.data" --children --sort symbol --stdio -g none 2>/dev/null |
        grep -E '^ +[0-9.]+%' | grep -v '\[k\]' | head -40 | sed 's/ *$//; s/^/   inclusive: /' || true
fi

# ---- 3. callgrind of a leader ------------------------------------------------
if [[ -n "${CALLGRIND:-}" ]]; then
    command -v valgrind >/dev/null || { log "valgrind missing (apt-get install valgrind)"; exit 1; }
    kill_replica 1 TERM
    RUST_LOG=${RUST_LOG:-warn} valgrind --tool=callgrind --callgrind-out-file="$OUT/callgrind.out" \
        "$SERVER" --id 1 --replicas "$REPLICAS" --data-dir "$WORK/data/1" --enable-fault-injection >>"$WORK/replica-1.log" 2>&1 &
    PIDS[1]=$!
    fault() { kvc fault --server "$(awk -v i="$1" '$1 == i { print $2 }' "$REPLICAS")" --isolate "$2" >/dev/null; }
    for t in $(seq 1 20); do
        L=$(leader_id)
        [[ "$L" == 1 ]] && break
        sleep 3  # replica 1 catches up under valgrind
        # the others hear only replica 1; replica 1 does not hear the old leader
        for i in 2 3 4 5; do
            others=$(seq 2 5 | grep -vx "$i" | paste -sd, -)
            fault "$i" "$others"
        done
        [[ -n "$L" ]] && fault 1 "$L"
        sleep 3
        kvc fault --all --isolate none >/dev/null 2>&1 || true
        sleep 1
    done
    [[ "$(leader_id)" == 1 ]] || { log "replica 1 did not become the leader"; exit 1; }
    callgrind_control -z "${PIDS[1]}" >/dev/null
    # shellcheck disable=SC2086
    out=$(kvc bench $ARGS --secs "$SECS" 2>>"$WORK/bench.stderr")
    callgrind_control -d "${PIDS[1]}" >/dev/null
    sleep 1
    f=$(ls -t "$OUT"/callgrind.out* | head -1)
    echo
    echo "3. callgrind of the leader (replica 1 under valgrind) during: $out"
    callgrind_annotate --inclusive=no "$f" 2>/dev/null | grep -E '^ *[0-9,]+ ' | head -40 | sed 's/^/   /' || true
    callgrind_annotate --inclusive=yes "$f" 2>/dev/null | grep -E '^ *[0-9,]+ ' | head -60 | sed 's/^/   inclusive: /' || true
    echo "   (file: $f; inclusive: callgrind_annotate --inclusive=yes $f)"
fi
