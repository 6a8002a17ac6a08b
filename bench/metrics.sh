#!/usr/bin/env bash
# bench/metrics.sh — what the metrics cost: the yardstick's put 64 and
# linearizable get 16 with binaries from before the metrics (BEFORE=DIR
# holding kv-server and kv-client, e.g. built from the parent commit) and
# with this tree's, every replica serving --admin-addr and its /metrics
# scraped once a second during the run (a scraper 15x more eager than
# Prometheus's default; bash's /dev/tcp, so no process is started per
# scrape). A fresh five-replica cluster for every run; the
# variants alternate (before, after, before, after, ...), RUNS rounds
# (default 3) of SECS seconds (default 8). Prints each run's ops/s and p99
# and the medians, and the replicas' CPU time per operation (user+system,
# over a window inside the measured part): on a shared machine the better
# yardstick of what the metrics cost. Stops only the processes it started.
# Not part of CI.
#
# SCRAPE=0: the after runs without --admin-addr and without the scraper
# (the cost of recording alone). WORKLOADS=get16 (or put64): one only.
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

# run VARIANT ARGS... -> "ops/s p99 cpu_us_per_op"
run() {
    local variant=$1; shift
    SERVER="$WORK/$variant/kv-server"
    CLIENT="$WORK/$variant/kv-client"
    make_replica_file
    local i admins=()
    for i in $(seq 1 "$NREPLICAS"); do
        if [[ "$variant" == after && "${SCRAPE:-1}" == 1 ]]; then
            local port
            port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
            admins+=("127.0.0.1:$port")
            start_replica "$i" --admin-addr "127.0.0.1:$port"
        else
            start_replica "$i"
        fi
    done
    wait_leader
    if [[ "$variant" == after && "${SCRAPE:-1}" == 1 ]]; then
        # Bash's /dev/tcp and builtin read: no process per scrape (curl's
        # start-up, five a second on two cores, cost more than the scrape).
        ( while true; do
              for a in "${admins[@]}"; do
                  if exec 3<>"/dev/tcp/${a%:*}/${a##*:}"; then
                      printf 'GET /metrics HTTP/1.1\r\nHost: %s\r\n\r\n' "$a" >&3
                      while IFS= read -r -u 3 _; do :; done
                      exec 3<&-
                  fi
              done
              sleep 1
          done ) 2>/dev/null &
        SCRAPER=$!
    fi
    # CPU time of the replicas over a window inside the measured part
    # (after preload and warm-up), per operation: less sensitive than ops/s
    # to other work on the machine.
    local out t0 t1 window=$((SECS - 3))
    bench "$@" --secs "$SECS" --value-size 128 --keys 10000 >"$WORK/bench.out" &
    local bpid=$!
    sleep 4
    t0=$(cpu_ticks)
    sleep "$window"
    t1=$(cpu_ticks)
    wait "$bpid"
    out=$(cat "$WORK/bench.out")
    stop_cluster
    jq -r --argjson ticks "$((t1 - t0))" --argjson w "$window" \
        '"\(.ops_per_s|floor) \(.p99_ms) \((($ticks * 10000) / (.ops_per_s * $w)) * 10 | floor / 10)"' <<<"$out"
}

# Sum of user+system clock ticks of the running replicas.
cpu_ticks() {
    local i sum=0
    for i in "${!PIDS[@]}"; do
        [[ -n "${PIDS[$i]}" ]] || continue
        sum=$((sum + $(awk '{ print $14 + $15 }' "/proc/${PIDS[$i]}/stat" 2>/dev/null || echo 0)))
    done
    echo "$sum"
}

declare -A OPS=() CPU=()
for r in $(seq 1 "$RUNS"); do
    for w in "put64|--op put --clients 64" "get16|--op get --clients 16 --preload"; do
        IFS='|' read -r name args <<<"$w"
        [[ -z "${WORKLOADS:-}" || "$WORKLOADS" == *"$name"* ]] || continue
        for v in before after; do
            # shellcheck disable=SC2086
            res=$(run "$v" $args)
            log "round $r $name $v: $res"
            OPS[$name.$v]+="${res%% *}"$'\n'
            CPU[$name.$v]+="${res##* }"$'\n'
        done
    done
done
for name in put64 get16; do
    [[ -n "${OPS[$name.before]:-}" ]] || continue
    b=$(printf '%s' "${OPS[$name.before]}" | median)
    a=$(printf '%s' "${OPS[$name.after]}" | median)
    echo "$name: before $(printf '%s' "${OPS[$name.before]}" | tr '\n' ' ')median $b; after $(printf '%s' "${OPS[$name.after]}" | tr '\n' ' ')median $a; after/before $(awk -v a="$a" -v b="$b" 'BEGIN{printf "%.3f", a/b}')"
    cb=$(printf '%s' "${CPU[$name.before]}" | median)
    ca=$(printf '%s' "${CPU[$name.after]}" | median)
    echo "$name replica CPU µs/op: before $(printf '%s' "${CPU[$name.before]}" | tr '\n' ' ')median $cb; after $(printf '%s' "${CPU[$name.after]}" | tr '\n' ' ')median $ca; after/before $(awk -v a="$ca" -v b="$cb" 'BEGIN{printf "%.3f", a/b}')"
done
