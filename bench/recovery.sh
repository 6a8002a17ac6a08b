#!/usr/bin/env bash
# bench/recovery.sh — how fast a replica gets back in sync (issue 3).
#
# Builds release and starts five replicas on free loopback ports (temp dir
# /tmp/kvbench.recovery.*). Two measurements:
#
# (a) catch-up from the log. Replicas run with --snapshot-every 1000000, so
#     nothing is compacted and a behind replica fetches log entries. A
#     follower F is SIGKILLed; a put load (LOAD_CLIENTS clients, default 4,
#     128-byte values, 10,000 keys) runs until the leader's `applied` is
#     ENTRIES (default 100,000) log entries past F's. F is restarted with its
#     data; the time is from the restart (process spawn, so it includes F's
#     own start-up and replay of its local log) until F's `applied` equals the
#     leader's, polled every 50 ms through `kv-client status` on a replica
#     file listing only F and the leader. entries = leader applied - F applied
#     at the kill (a log entry is a batch of puts; the number of puts is shown
#     too). Then a second run: F is SIGKILLed, its data dir wiped and it is
#     restarted, so it fetches the entire log (no snapshot exists).
#
# (b) snapshot transfer. Fresh replicas with --snapshot-every 100000; 1,000,000
#     keys with 100-byte values are loaded (`bench --preload`, 256 clients),
#     then random keys of that range are overwritten (4 clients, 100-byte
#     values) until the leader has taken a snapshot (a 256-client load packs
#     many puts per log entry, so 1M keys are far fewer than 100,000 entries); a follower F is SIGKILLed, its data dir
#     removed (rm -rf) and it is restarted: it must fetch the snapshot and then
#     the log after it. Reported: time from restart until F's `applied` equals
#     the leader's, the snapshot file size (ls -l DIR/snapshot-*.snap) and
#     size/time in MB/s, F's VmHWM (peak RSS) just after catching up vs the
#     leader's VmRSS/VmHWM. Repeated SNAP_RUNS times (default 2) on the same
#     data (kill, wipe, restart again).
#
# Environment: ENTRIES, LOAD_CLIENTS, SNAP_KEYS (default 1000000), SNAP_RUNS,
# SKIP_A=1 / SKIP_B=1, KEEP_WORK=1. Stops only the processes it started.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
ENTRIES=${ENTRIES:-100000}
LOAD_CLIENTS=${LOAD_CLIENTS:-4}
SNAP_KEYS=${SNAP_KEYS:-1000000}
SNAP_RUNS=${SNAP_RUNS:-2}

setup_work recovery
build
echo "kvpaxos commit $COMMIT, $(nproc) cores"

now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", b - a }'; }

# A replica file listing only replicas $1 and $2, for cheap status polls.
pair_file() {
    awk -v a="$1" -v b="$2" '$1 == a || $1 == b' "$REPLICAS" > "$WORK/pair"
}
pair_applied() {  # pair_applied ID -> applied (or -1)
    "$CLIENT" --replicas "$WORK/pair" --output json --timeout 0.5 status 2>/dev/null \
        | jq -r --argjson id "$1" 'select(.id == $id) | .applied // -1' || echo -1
}
# wait_caught_up F L -> seconds since $T0 until F applied >= L applied
wait_caught_up() {
    local f=$1 l=$2 target a
    target=$(pair_applied "$l")
    while :; do
        a=$(pair_applied "$f"); a=${a:--1}
        if (( a >= target )); then
            # the leader may have moved (heartbeat no-ops); re-check once
            target=$(pair_applied "$l")
            (( a >= target )) && break
        fi
        if [[ -z "${PIDS[$f]}" ]] || ! kill -0 "${PIDS[$f]}" 2>/dev/null; then
            log "replica $f died while catching up"; tail -5 "$WORK/replica-$f.log" >&2; return 1
        fi
        sleep 0.05
    done
    T1=$(now)
    CAUGHT_APPLIED=$a
}
follower_of() {  # a follower id, not the leader
    local i
    for i in $(seq 1 "$NREPLICAS"); do [[ "$i" != "$1" ]] && { echo "$i"; return; }; done
}

# ---- (a) catch-up from the log -----------------------------------------------
if [[ -z "${SKIP_A:-}" ]]; then
    start_cluster --snapshot-every 1000000
    sleep 1
    L=$(leader_id); F=$(follower_of "$L")
    pair_file "$F" "$L"
    kvc bench --op put --clients 4 --keys 10000 --secs 1 >/dev/null 2>&1  # some history
    sleep 0.5
    f_applied=$(pair_applied "$F")
    kill_replica "$F" KILL
    log "(a) leader $L, killed follower $F at applied $f_applied; loading until $ENTRIES entries behind"
    start_applied=$(pair_applied "$L"); puts=0; t0=$(now)
    while :; do
        out=$(bench --op put --clients "$LOAD_CLIENTS" --keys 10000 --value-size 128 --secs 10)
        puts=$(( puts + $(jq -r .ops <<<"$out") ))
        la=$(pair_applied "$L")
        log "(a) leader applied $la ($(( la - f_applied )) ahead of $F); $out"
        (( la - f_applied >= ENTRIES )) && break
    done
    t1=$(now)
    behind=$(( la - f_applied ))
    echo "(a) load: $(( la - start_applied )) entries in $(elapsed "$t0" "$t1") s (incl. 2 s warm-up per bench run) with $LOAD_CLIENTS clients, ~$puts puts measured"
    T0=$(now); start_replica "$F" --snapshot-every 1000000
    wait_caught_up "$F" "$L"
    secs=$(elapsed "$T0" "$T1")
    echo "(a) run 1 (restart with its data): $behind entries behind -> caught up in $secs s = $(awk -v n="$behind" -v s="$secs" 'BEGIN { printf "%.0f", n / s }') entries/s (applied $CAUGHT_APPLIED)"

    kill_replica "$F" KILL; rm -rf "$WORK/data/$F"
    total=$(pair_applied "$L")
    T0=$(now); start_replica "$F" --snapshot-every 1000000
    wait_caught_up "$F" "$L"
    secs=$(elapsed "$T0" "$T1")
    echo "(a) run 2 (data dir wiped, whole log, no snapshot): $total entries -> caught up in $secs s = $(awk -v n="$total" -v s="$secs" 'BEGIN { printf "%.0f", n / s }') entries/s"
    du -sh "$WORK/data/$L" | sed 's/^/(a) leader data dir: /'
    for i in $(seq 1 "$NREPLICAS"); do kill_replica "$i" TERM; done
    rm -rf "$WORK/data"
fi

# ---- (b) snapshot transfer ------------------------------------------------------
if [[ -z "${SKIP_B:-}" ]]; then
    start_cluster --snapshot-every 100000
    sleep 1
    t0=$(now)
    kvc --timeout 30 bench --op put --preload --clients 256 --keys "$SNAP_KEYS" --value-size 100 --secs 1 \
        >/dev/null 2>>"$WORK/bench.stderr"
    log "(b) loaded $SNAP_KEYS keys in $(elapsed "$t0" "$(now)") s ($(grep -ao 'bench: preloaded [0-9]* keys ([0-9]* failed)' "$WORK/bench.stderr" | tail -1))"
    L=$(leader_id); F=$(follower_of "$L")
    pair_file "$F" "$L"
    # Loading with 256 clients packs many puts into each log entry, so N keys
    # make far fewer than N entries: keep overwriting random keys of the same
    # range with a 4-client load until the leader has taken a snapshot.
    while :; do
        snap=$(status_json | jq -r --argjson id "$L" 'select(.id == $id) | .snapshot')
        (( snap > 0 )) && break
        out=$(bench --op put --clients 4 --keys "$SNAP_KEYS" --value-size 100 --secs 10)
        log "(b) leader applied $(pair_applied "$L"), no snapshot yet; $out"
    done
    sleep 2  # let the background snapshot write finish
    status_json | jq -c '{id, leader, applied, snapshot, keys}' | sed 's/^/(b) /'
    for r in $(seq 1 "$SNAP_RUNS"); do
        kill_replica "$F" KILL; rm -rf "$WORK/data/$F"
        T0=$(now); start_replica "$F" --snapshot-every 100000
        wait_caught_up "$F" "$L"
        secs=$(elapsed "$T0" "$T1")
        fhwm=$(rss_kb "${PIDS[$F]}" VmHWM); frss=$(rss_kb "${PIDS[$F]}" VmRSS)
        lrss=$(rss_kb "${PIDS[$L]}" VmRSS); lhwm=$(rss_kb "${PIDS[$L]}" VmHWM)
        # shellcheck disable=SC2012
        snapfile=$(ls -t "$WORK/data/$L"/snapshot-*.snap | head -1)
        size=$(stat -c %s "$snapfile")
        ls -l "$WORK/data/$L"/snapshot-*.snap "$WORK/data/$F"/snapshot-*.snap 2>/dev/null | sed 's/^/(b)   /'
        echo "(b) run $r: replica $F wiped, caught up to applied $CAUGHT_APPLIED in $secs s;" \
            "snapshot $(basename "$snapfile") $(awk -v s="$size" 'BEGIN { printf "%.1f", s / 1e6 }') MB" \
            "-> $(awk -v s="$size" -v t="$secs" 'BEGIN { printf "%.1f", s / 1e6 / t }') MB/s (whole catch-up time);" \
            "receiver VmHWM $((fhwm / 1024)) MiB, VmRSS $((frss / 1024)) MiB; leader VmRSS $((lrss / 1024)) MiB, VmHWM $((lhwm / 1024)) MiB"
    done
    grep -ai 'snapshot' "$WORK/replica-$F.log" | tail -5 | sed 's/^/(b) log of replica '"$F"': /' || true
fi
