#!/usr/bin/env python3
"""Leader-failover measurement (used by bench/run.sh).

usage: failover.py KV_CLIENT REPLICA_FILE LEADER_PID [CLIENTS]

Starts CLIENTS (default 16) `kv-client --output json shell` processes, each a
closed loop of puts (128-byte values, keys fo-<worker>-<n>) driven over its
stdin/stdout, and records the wall-clock time at which every put is
acknowledged. After 4 s of load it SIGKILLs LEADER_PID and keeps the load
running until 4 s after the first acknowledgement that follows the kill.

Prints one JSON line:
  kill_to_first_ack_ms  time from the kill to the first put acknowledged
                        after it (any client), ignoring acks that arrive
                        within 10 ms of the kill: those are the old leader's
                        replies still in the socket or pipe when it died
                        (counted in inflight_acks). A new leader needs at
                        least an election timeout (150 ms), so no new-leader
                        ack is ignored.
  kill_to_rate_ms       time from the kill until a 100 ms window first
                        reaches half the pre-kill rate
  before_ops_per_s      acks in the 1 s before the kill
  after_ops_per_s       acks in the 1 s starting at the first post-kill ack
  after2_ops_per_s      acks in the next second (recovery complete)
  errors                puts answered with an error (each client retries
                        within its 10 s budget, so a put stalled by the
                        failover counts once, as its ack, not as an error)
Timestamps are taken in this script when the shell prints its answer line, so
they include the shell's pipe round trip (well under 1 ms).
"""
import json
import os
import signal
import subprocess
import sys
import threading
import time

client, replicas, leader_pid = sys.argv[1], sys.argv[2], int(sys.argv[3])
nclients = int(sys.argv[4]) if len(sys.argv) > 4 else 16
value = "v" * 128
acks = []  # (time, worker)
errors = []
stop = threading.Event()
lock = threading.Lock()


def worker(w):
    p = subprocess.Popen(
        [client, "--replicas", replicas, "--output", "json", "--timeout", "10", "shell"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
        text=True, bufsize=1)
    n = 0
    while not stop.is_set():
        p.stdin.write(f"put fo-{w}-{n % 1000} {value}\n")
        p.stdin.flush()
        line = p.stdout.readline()
        t = time.time()
        if not line:
            break
        n += 1
        ok = '"ok":true' in line
        with lock:
            (acks if ok else errors).append((t, line.strip()) if not ok else (t, w))
    p.stdin.close()
    p.wait()


threads = [threading.Thread(target=worker, args=(w,), daemon=True) for w in range(nclients)]
for th in threads:
    th.start()
time.sleep(4)
t_kill = time.time()
os.kill(leader_pid, signal.SIGKILL)
deadline = t_kill + 30
first = None
while time.time() < deadline:
    time.sleep(0.05)
    with lock:
        post = [t for t, _ in acks if t > t_kill + 0.010]
    if post:
        first = min(post)
        if time.time() > first + 4:
            break
stop.set()
for th in threads:
    th.join(timeout=15)

ts = sorted(t for t, _ in acks)


def count(a, b):
    return sum(1 for t in ts if a <= t < b)


before = count(t_kill - 1, t_kill)
res = {"clients": nclients, "before_ops_per_s": before, "errors": len(errors),
       "inflight_acks": count(t_kill, t_kill + 0.010)}
if first is None:
    res["kill_to_first_ack_ms"] = None
else:
    res["kill_to_first_ack_ms"] = round((first - t_kill) * 1000, 1)
    res["after_ops_per_s"] = count(first, first + 1)
    res["after2_ops_per_s"] = count(first + 1, first + 2)
    w = t_kill + 0.010
    res["kill_to_rate_ms"] = None
    while w < first + 4:
        if count(w, w + 0.1) * 10 >= before / 2:
            res["kill_to_rate_ms"] = round((w + 0.1 - t_kill) * 1000)
            break
        w += 0.01
if errors:
    res["first_error"] = errors[0][1][:200]
print(json.dumps(res))
