#!/usr/bin/env bash
# bench/bigdata.sh — a million keys: memory, restart, and puts while a
# snapshot of them is taken.
#
# Builds release and starts five replicas on free loopback ports (temp dir
# /tmp/kvbench.bigdata.*), first with --snapshot-every 1000000000 so that
# no snapshot is taken by entry count (the byte trigger, writes since the
# last snapshot >= max(64 MiB, half the map), still fires while loading).
#   1. memory: KEYS keys (default 1,000,000; `bench --preload --clients 256
#      --value-size 100`, keys key-000000 .. as `kv-client bench` names
#      them, 10 bytes each below 1,000,000), then VmRSS / VmHWM of every
#      replica against the live bytes (keys x (key length + 100)); again
#      after the restart of step 3 and after step 4.
#   2. normal put rate: `bench --op put --clients 16 --value-size 100 --keys
#      KEYS` for PUT_SECS (default 15) s, no snapshot due.
#   3. restart: all five replicas SIGTERMed and started again with their
#      data (and the default --snapshot-every); the time from starting them
#      until a put is acknowledged and until a linearizable get of a loaded
#      key returns it (the first try of each waits for a leader); then one
#      follower restarted alone, and the time until it answers a local read
#      of a loaded key.
#   4. puts while snapshots are taken: the same put load for SNAP_SECS
#      (default 30) s on the restarted cluster, whose default
#      --snapshot-every (10,000 entries) takes a snapshot of the map every
#      few seconds on every replica. Reported: the run's ops/s against
#      step 2's, every second's rate (the bench progress line), and when
#      each replica logged "snapshot taken".
#
# PERF=1: `perf record -a` (cpu-clock) over the restart, reported for
# kv-server's threads. Environment: KEYS, PUT_SECS, SNAP_SECS, KEEP_WORK=1. Stops only what it
# started. Not part of CI.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
KEYS=${KEYS:-1000000}
PUT_SECS=${PUT_SECS:-15}
SNAP_SECS=${SNAP_SECS:-30}

setup_work bigdata
build
export RUST_LOG=${RUST_LOG:-warn,kv_server=info}
start_cluster --snapshot-every 1000000000
sleep 1
echo "kvpaxos commit $COMMIT, $(nproc) cores; load average $(cut -d' ' -f1-3 /proc/loadavg)"

now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", b - a }'; }

# ---- 1. memory ------------------------------------------------------------
t0=$(now)
kvc --timeout 30 bench --op put --preload --clients 256 --keys "$KEYS" --value-size 100 --secs 1 \
    >/dev/null 2>>"$WORK/bench.stderr"
log "loaded $KEYS keys in $(elapsed "$t0" "$(now)") s ($(grep -ao 'bench: preloaded [0-9]* keys ([0-9]* failed)' "$WORK/bench.stderr" | tail -1))"
sleep 5  # followers apply; background snapshot writes finish
L=$(leader_id)
keys=$(status_json | jq -r "select(.id == $L) | .keys")
live=$(python3 -c "n=$KEYS; print(sum(len(f'key-{i:06}') + 100 for i in range(n)))")
memory() {
    local L
    L=$(leader_id)
    for i in $(seq 1 "$NREPLICAS"); do
        rss=$(rss_kb "${PIDS[$i]}" VmRSS); hwm=$(rss_kb "${PIDS[$i]}" VmHWM)
        printf '   replica %d%s: VmRSS %d MiB (%.2fx live), VmHWM %d MiB (%.2fx)\n' "$i" \
            "$([[ $i == "$L" ]] && echo ' (leader)')" $((rss / 1024)) "$(awk -v r="$rss" -v l="$live" 'BEGIN { print r * 1024 / l }')" \
            $((hwm / 1024)) "$(awk -v r="$hwm" -v l="$live" 'BEGIN { print r * 1024 / l }')"
    done
}
echo
echo "1. memory at $keys keys: live bytes $((live / 1024 / 1024)) MiB (keys + values)"
memory
du -sh "$WORK"/data/* | sed 's/^/   disk: /'

# ---- 2. normal put rate ----------------------------------------------------
normal=$(bench --op put --clients 16 --value-size 100 --keys "$KEYS" --secs "$PUT_SECS")
echo
echo "2. put, 16 clients, no snapshot due: $normal"
grep -h '"snapshot taken"\|snapshot taken' "$WORK"/replica-*.log | tail -3 | sed 's/^/   (snapshots so far, last 3) /' || true

# ---- 3. restart ------------------------------------------------------------
for i in $(seq 1 "$NREPLICAS"); do kill_replica "$i" TERM; done
if [[ -n "${PERF:-}" ]]; then
    # every CPU, call graphs by frame pointer; report only kv-server's threads
    perf record -q -a -F 499 -g -o "$WORK/restart.perf" -- sleep 8 2>/dev/null &
    perf_pid=$!
    sleep 0.5
fi
t0=$(now)
for i in $(seq 1 "$NREPLICAS"); do start_replica "$i"; done
kvc --timeout 30 put restart-probe x >/dev/null
t_put=$(elapsed "$t0" "$(now)")
got=$(kvc --timeout 30 get key-000001 | head -c 16)
t_get=$(elapsed "$t0" "$(now)")
echo
echo "3. restart of all five with $keys keys: first put acknowledged ${t_put} s after starting them," \
    "first linearizable get (${got}...) ${t_get} s"
grep -ah 'leader\|elected\|took office' "$WORK"/replica-*.log | tail -5 | sed 's/^/   /' || true
sleep 2
echo "   memory after the restart (each loaded its snapshot and replayed its log):"
memory

# 3b. One replica restarted alone (a follower), the others serving: the
# time from starting it until it answers a local read of a loaded key.
follower=$(status_json | jq -r 'select(.up and (.leader | not)) | .id' | head -1)
if [[ -n "$follower" ]]; then
    addr=$(awk -v id="$follower" '$1 == id { print $2 }' "$REPLICAS")
    kill_replica "$follower" TERM
    t0=$(now)
    start_replica "$follower"
    tries=0
    until "$CLIENT" --server "$addr" --timeout 1 get --local key-000001 >/dev/null 2>&1; do
        tries=$((tries + 1))
        if ((tries > 1500)); then break; fi  # ~30 s
        sleep 0.02
    done
    echo "   one follower (replica $follower) restarted alone: it answered a local read" \
        "$(elapsed "$t0" "$(now)") s after starting"
fi
if [[ -n "${PERF:-}" ]]; then
    wait "$perf_pid" || true
    echo "   where the CPU went in the 8 s from the restart (perf cpu-clock, every CPU, by thread and symbol):"
    perf report -i "$WORK/restart.perf" --no-children --sort comm --stdio 2>/dev/null |
        grep -E '^ +[0-9.]+%' | head -8 | sed 's/ *$//; s/^/     /' || true
    perf report -i "$WORK/restart.perf" --comms kv-server,tokio-rt-worker --no-children --sort symbol --stdio -g none 2>/dev/null |
        grep -E '^ +[0-9.]+%' | head -25 | sed 's/ *$//; s/^/     /' || true
fi

# ---- 4. puts while snapshots are taken -----------------------------------
sleep 2
mark=$(date -u +%H:%M:%S)
: >"$WORK/snap.stderr"
snap=$(kvc bench --op put --clients 16 --value-size 100 --keys "$KEYS" --secs "$SNAP_SECS" 2>"$WORK/snap.stderr")
echo
echo "4. put, 16 clients, default --snapshot-every (started $mark UTC): $snap"
awk -v a="$(jq -r .ops_per_s <<<"$snap")" -v b="$(jq -r .ops_per_s <<<"$normal")" \
    'BEGIN { printf "   %.0f%% of the normal rate (step 2)\n", 100 * a / b }'
echo "   each second (bench progress, warm-up included): $(grep -ao 'ops/s now' -B0 "$WORK/snap.stderr" >/dev/null;
    sed -n 's/.*(\([0-9]*\) ops\/s now.*/\1/p' "$WORK/snap.stderr" | paste -sd' ' -)"
echo "   memory after it:"
memory
for i in $(seq 1 "$NREPLICAS"); do
    echo "   replica $i snapshots after $mark: $(grep -a 'snapshot taken' "$WORK/replica-$i.log" |
        grep -ao '[0-9][0-9]:[0-9][0-9]:[0-9][0-9][.0-9]*' | awk -v m="$mark" '$1 >= m' | paste -sd' ' -)"
done
