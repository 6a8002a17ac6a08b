//! Hostile bytes on a replica's ports: nothing a client or a peer sends may
//! panic a replica, close a port, or lose data.
//!
//! - `deadline_overflow_frame_leaves_both_ports_serving` — the 15 bytes of
//!   issue 10, item 1 (a request whose deadline is u64::MAX seconds), on the
//!   client and the peer port: the replica still answers on both and takes
//!   a write.
//! - `fuzz_client_and_peer_ports` — for [`FUZZ_SECS`] (`KV_FUZZ_SECS`
//!   lengthens it), workers throw at the client and peer ports of every
//!   replica of a live 3-replica cluster: random bytes, truncated frames,
//!   frames with random lengths (over the frame limit included), mutated
//!   copies of real requests (encoded with tarpc's own types and codec),
//!   and well-formed requests with extreme field values (deadlines at and
//!   near u64::MAX seconds, nanoseconds over a second, huge length claims,
//!   ids 0 and u64::MAX, slots and ballot rounds u64::MAX, out-of-range
//!   fault settings). Afterwards every replica process is alive and answers
//!   on both ports, every key written before reads back with its value
//!   (linearizably), and a new write succeeds.
//!
//!   The seed is printed; `KV_FUZZ_SEED=N` replays the same inputs (their
//!   timing against the cluster differs from run to run).
//!
//!   A well-formed peer message with a huge ballot is legal Paxos input
//!   today (peers are not authenticated), so it may depose the leader; the
//!   invariant is not "no election" but "serving again afterwards". Two
//!   kinds of forged consensus values wedge the cluster for good today and
//!   are left out unless `KV_FUZZ_TOP_OF_RANGE=1`: ballot rounds near
//!   u64::MAX and accepted entries at far slots (the two ignored tests
//!   below show each). Accept messages otherwise carry no entries, since
//!   forging values into real slots is the peer-authentication issue, not
//!   robustness.
//! - `forged_top_round_ballot_wedges_elections` (ignored: fails today) —
//!   one Prepare with ballot round u64::MAX at each replica: no leader is
//!   ever elected again: no honest ballot can exceed it. Forged consensus
//!   messages are the peer-authentication issue (mutual TLS).
//! - `a_forged_far_slot_entry_does_not_hang_the_next_leader` — an accept
//!   of an entry at slot u64::MAX - 1 to each replica, then the leader
//!   killed: the next leader takes writes (acceptors refuse slots far past
//!   their chosen prefix; before that, it re-proposed every slot up to
//!   the forged one).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bincode::Options;
use kv_api::{FaultSpec, KvRequest, Op, ReadMode, ReplicaId, Route, WriteRequest};
use kv_peer_api::{
    Accept, Ballot, Fetch, Heartbeat, PeerClient, PeerRequest, Prepare, Probe, SnapshotRequest,
    Value,
};
use kv_tests::{bounded, wire, Cluster};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Sends `bytes` on a fresh connection to `addr` and closes it.
async fn send_raw(addr: &str, bytes: &[u8]) {
    if let Ok(mut s) = tokio::net::TcpStream::connect(addr).await {
        // The replica may close the connection first: not a failure.
        let _ = s.write_all(bytes).await;
        let _ = s.flush().await;
    }
}

/// Whether the peer port at `addr` answers a real (read-only) peer request
/// on a new connection within a second.
async fn peer_port_answers(addr: &str) -> bool {
    let probe = async {
        let mut connect = tarpc::serde_transport::tcp::connect(
            addr,
            tarpc::tokio_serde::formats::Bincode::default,
        );
        connect.config_mut().max_frame_length(kv_api::MAX_FRAME);
        let transport = connect.await.ok()?;
        let client = PeerClient::new(tarpc::client::Config::default(), transport).spawn();
        let mut ctx = tarpc::context::current();
        ctx.deadline = std::time::Instant::now() + Duration::from_secs(1);
        let fetch = Fetch {
            from: 0,
            from_slot: 1,
            max_entries: 1,
        };
        client.fetch(ctx, fetch).await.ok()
    };
    matches!(
        tokio::time::timeout(Duration::from_secs(2), probe).await,
        Ok(Some(_))
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deadline_overflow_frame_leaves_both_ports_serving() {
    let mut cluster = Cluster::start(3).await;
    bounded(
        Duration::from_secs(90),
        "the deadline-overflow test",
        async {
            cluster
                .cli_ok(&["--timeout", "10", "put", "before", "1"])
                .await;
            let leader = cluster.wait_for_leader(Duration::from_secs(20)).await;
            let follower = cluster.ids().into_iter().find(|&i| i != leader).unwrap();
            for id in [leader, follower] {
                let client = cluster.client_addr(id).to_string();
                let peer = cluster.peer_addr(id).to_string();
                send_raw(&client, &wire::DEADLINE_OVERFLOW).await;
                send_raw(&peer, &wire::DEADLINE_OVERFLOW).await;

                cluster.assert_alive(id);
                assert!(
                    cluster.status(id).await.is_some(),
                    "replica {id} no longer answers status on its client port"
                );
                assert!(
                    peer_port_answers(&peer).await,
                    "replica {id} no longer answers on its peer port"
                );
                let key = format!("after-{id}");
                let out = cluster
                    .cli_at(id, &["--timeout", "10", "put", &key, "2"])
                    .await;
                assert!(
                    out.status.success(),
                    "a write through replica {id} failed after the frame: {}",
                    kv_tests::describe(&out)
                );
            }
            assert_eq!(
                cluster.client().get("before").await.unwrap(),
                Some(b"1".to_vec())
            );
        },
    )
    .await;
}

/// How long the fuzz phase lasts by default (CI); `KV_FUZZ_SECS` sets it.
const FUZZ_SECS: u64 = 30;

/// Concurrent fuzzing connections.
const WORKERS: u64 = 6;

/// Connections a worker opens per second at most: keeps the test from
/// running the machine out of ephemeral ports (TIME_WAIT) in long soaks.
const CONNECTIONS_PER_SEC: u64 = 40;

/// The client port's frame limit for default key/value limits (see
/// kv-server's net.rs): 2 × 1 MiB + 1 KiB + 64 KiB.
const CLIENT_FRAME_LIMIT: u32 = 2 * 1024 * 1024 + 1024 + 64 * 1024;

fn env_u64(name: &str) -> Option<u64> {
    let v = std::env::var(name).ok()?;
    Some(
        v.trim()
            .parse()
            .unwrap_or_else(|_| panic!("{name}={v:?} is not a number")),
    )
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum PortKind {
    Client,
    Peer,
}

/// What one fuzzing connection sends, by kind (for the summary).
#[derive(Default)]
struct Stats {
    random: AtomicU64,
    truncated: AtomicU64,
    bad_length: AtomicU64,
    mutated: AtomicU64,
    extreme: AtomicU64,
    connections: AtomicU64,
    refused: AtomicU64,
}

/// Extreme values for a u64 field.
fn extreme_u64(rng: &mut StdRng) -> u64 {
    match rng.random_range(0..8) {
        0 => 0,
        1 => 1,
        2 => u64::MAX,
        3 => u64::MAX - 1,
        4 => u64::MAX / 2 + 1,
        5 => u64::from(u32::MAX),
        _ => rng.random(),
    }
}

/// Deadlines as sent (the time left): the overflow cases, their
/// neighbours, nanoseconds over a second, and ordinary ones.
fn extreme_deadline(rng: &mut StdRng) -> Duration {
    let (secs, nanos) = match rng.random_range(0..8) {
        0 => (u64::MAX, 0),
        1 => (u64::MAX, 999_999_999),
        2 => (u64::MAX - 1, rng.random_range(0..1_000_000_000)),
        3 => (1 << 40, 0),
        4 => (0, 0),
        5 => (rng.random_range(0..5), 999_999_999),
        6 => (u64::MAX / 2, 0),
        _ => (rng.random_range(0..3), rng.random_range(0..1_000_000_000)),
    };
    Duration::new(secs, nanos)
}

/// Whether to forge consensus values that only peer authentication can
/// keep out: ballot rounds at the very top of the range (see
/// `forged_top_round_ballot_wedges_elections`) and accepted entries (at
/// real slots they forge the log). Off in CI; `KV_FUZZ_TOP_OF_RANGE=1`
/// turns them on.
fn top_of_range() -> bool {
    env_u64("KV_FUZZ_TOP_OF_RANGE").is_some_and(|v| v != 0)
}

/// A ballot no honest replica would send: rounds 0, huge or random; ids 0,
/// members, strangers, u64::MAX. Rounds stop at u64::MAX / 2 unless
/// [`top_of_range`]: above that, the next honest round overflows.
fn extreme_ballot(rng: &mut StdRng, top: bool) -> Ballot {
    let round = match rng.random_range(0..5) {
        0 if top => u64::MAX,
        1 if top => u64::MAX - rng.random_range(0..3),
        0 | 1 => u64::MAX / 2 - rng.random_range(0..3),
        2 => 0,
        3 => 1 << 40,
        _ => rng.random_range(0..u64::MAX / 2),
    };
    let id = match rng.random_range(0..4) {
        0 => 0,
        1 => rng.random_range(1..=3),
        2 => u64::MAX,
        _ => rng.random(),
    };
    Ballot { round, id }
}

/// A slot far beyond anything the test chooses.
fn far_slot(rng: &mut StdRng) -> u64 {
    match rng.random_range(0..3) {
        0 => u64::MAX,
        1 => u64::MAX - rng.random_range(0..1000),
        _ => rng.random_range(1u64 << 62..u64::MAX),
    }
}

fn random_bytes(rng: &mut StdRng, max: usize) -> Vec<u8> {
    let n = rng.random_range(0..=max);
    (0..n).map(|_| rng.random()).collect()
}

fn fuzz_write(rng: &mut StdRng) -> WriteRequest {
    let key = match rng.random_range(0..4) {
        0 => vec![],
        1 => vec![b'z'; 1025],
        _ => format!("fuzz/{}", rng.random::<u32>()).into_bytes(),
    };
    let value = match rng.random_range(0..4) {
        0 => vec![],
        1 => vec![7; 1024 * 1024 + 1],
        _ => random_bytes(rng, 64),
    };
    let op = match rng.random_range(0..3) {
        0 => Op::Put { key, value },
        1 => Op::Delete { key },
        _ => Op::Cas {
            key,
            expected: rng.random_bool(0.5).then(|| random_bytes(rng, 16)),
            new: value,
        },
    };
    WriteRequest {
        client_id: extreme_u64(rng),
        seq: extreme_u64(rng),
        acked_below: extreme_u64(rng),
        op,
    }
}

fn fuzz_faults(rng: &mut StdRng) -> FaultSpec {
    let rate = |rng: &mut StdRng| match rng.random_range(0..6) {
        0 => Some(f64::NAN),
        1 => Some(-1.0),
        2 => Some(1.5),
        3 => Some(f64::INFINITY),
        4 => None,
        _ => Some(rng.random_range(0.0..=0.3)),
    };
    FaultSpec {
        drop_rate: rate(rng),
        delay_ms: match rng.random_range(0..4) {
            0 => Some((u64::MAX, u64::MAX)),
            1 => Some((0, u64::MAX)),
            2 => Some((10, 1)),
            _ => None,
        },
        timeout_rate: rate(rng),
        isolate: rng.random_bool(0.2).then(|| {
            (0..rng.random_range(0..50))
                .map(|_| extreme_u64(rng))
                .collect()
        }),
        heal: rng.random_bool(0.5),
    }
}

fn kv_message(rng: &mut StdRng) -> KvRequest {
    match rng.random_range(0..5) {
        0 | 1 => KvRequest::Write {
            req: fuzz_write(rng),
            route: if rng.random_bool(0.5) {
                Route::Forward
            } else {
                Route::Redirect
            },
        },
        2 => KvRequest::Get {
            key: random_bytes(rng, 2000),
            mode: if rng.random_bool(0.5) {
                ReadMode::Local
            } else {
                ReadMode::Linearizable
            },
            route: Route::Forward,
        },
        3 => KvRequest::Status {},
        _ => KvRequest::SetFaults {
            change: fuzz_faults(rng),
        },
    }
}

fn peer_message(rng: &mut StdRng) -> PeerRequest {
    let top = top_of_range();
    match rng.random_range(0..8) {
        0 => PeerRequest::Prepare {
            req: Prepare {
                from: extreme_u64(rng),
                ballot: extreme_ballot(rng, top),
                from_slot: extreme_u64(rng),
                pre_vote: rng.random_bool(0.5),
            },
        },
        1 => PeerRequest::Accept {
            req: Accept {
                from: extreme_u64(rng),
                ballot: extreme_ballot(rng, top),
                // Entries only with `top`: an entry at a real slot forges
                // the log (peer authentication), one at a far slot hangs
                // the next leader today.
                entries: (0..if top { rng.random_range(0..4) } else { 0 })
                    .map(|_| {
                        let v = match rng.random_range(0..3) {
                            0 => Value::Noop,
                            1 => Value::Time(extreme_u64(rng)),
                            _ => Value::Batch(vec![fuzz_write(rng)]),
                        };
                        (far_slot(rng), v)
                    })
                    .collect(),
                chosen: extreme_u64(rng),
            },
        },
        2 => PeerRequest::Heartbeat {
            req: Heartbeat {
                from: extreme_u64(rng),
                ballot: extreme_ballot(rng, top),
                chosen: extreme_u64(rng),
                round: extreme_u64(rng),
                term_start: extreme_u64(rng),
            },
        },
        3 => PeerRequest::Fetch {
            req: Fetch {
                from: extreme_u64(rng),
                from_slot: extreme_u64(rng),
                max_entries: if rng.random_bool(0.5) {
                    u32::MAX
                } else {
                    rng.random()
                },
            },
        },
        4 => PeerRequest::SnapshotChunk {
            req: SnapshotRequest {
                from: extreme_u64(rng),
                index: rng.random_bool(0.5).then(|| extreme_u64(rng)),
                offset: extreme_u64(rng),
                max_len: if rng.random_bool(0.5) {
                    u32::MAX
                } else {
                    rng.random()
                },
            },
        },
        5 => PeerRequest::ForwardWrite {
            from: extreme_u64(rng),
            req: fuzz_write(rng),
        },
        6 => PeerRequest::Probe {
            req: Probe {
                from: extreme_u64(rng),
            },
        },
        _ => PeerRequest::ForwardGet {
            from: extreme_u64(rng),
            key: random_bytes(rng, 2000),
        },
    }
}

/// A real request as tarpc itself encodes it (its types, its codec).
fn real_payload(rng: &mut StdRng, port: PortKind) -> Vec<u8> {
    let mut ctx = tarpc::context::current();
    ctx.deadline = Instant::now() + Duration::from_millis(rng.random_range(1..2000));
    let id = rng.random_range(0..100);
    let bytes = match port {
        PortKind::Client => {
            wire::options().serialize(&tarpc::ClientMessage::Request(tarpc::Request {
                context: ctx,
                id,
                message: kv_message(rng),
            }))
        }
        PortKind::Peer => {
            wire::options().serialize(&tarpc::ClientMessage::Request(tarpc::Request {
                context: ctx,
                id,
                message: peer_message(rng),
            }))
        }
    };
    bytes.expect("a real request encodes")
}

/// A well-formed request with extreme context fields (mirror types: a
/// deadline no `Instant` could hold), or a cancel of an extreme id.
fn extreme_payload(rng: &mut StdRng, port: PortKind) -> Vec<u8> {
    let id = extreme_u64(rng);
    if rng.random_bool(0.1) {
        let cancel: wire::ClientMessage<()> = wire::ClientMessage::Cancel {
            trace_context: wire::TraceContext::default(),
            request_id: id,
        };
        return wire::options().serialize(&cancel).unwrap();
    }
    let deadline = extreme_deadline(rng);
    match port {
        PortKind::Client => wire::request_payload(id, deadline, kv_message(rng)),
        PortKind::Peer => wire::request_payload(id, deadline, peer_message(rng)),
    }
}

/// Flips, overwrites, inserts or deletes a few bytes; or claims a huge
/// length for some varint-encoded vector.
fn mutate(rng: &mut StdRng, mut b: Vec<u8>) -> Vec<u8> {
    for _ in 0..rng.random_range(1..=6) {
        if b.is_empty() {
            b.push(rng.random());
            continue;
        }
        let i = rng.random_range(0..b.len());
        match rng.random_range(0..5) {
            0 => b[i] ^= 1 << rng.random_range(0..8),
            1 => b[i] = rng.random(),
            2 => b.insert(i, rng.random()),
            3 => {
                b.remove(i);
            }
            _ => {
                // A varint length claim of u64::MAX (0xfd + 8 bytes) or u32.
                let claim: &[u8] = if rng.random_bool(0.5) {
                    &[0xfd, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff]
                } else {
                    &[0xfc, 0xff, 0xff, 0xff, 0x7f]
                };
                b.splice(i..i, claim.iter().copied());
            }
        }
    }
    b
}

/// The bytes of one fuzzing connection.
fn fuzz_input(rng: &mut StdRng, port: PortKind, stats: &Stats) -> Vec<u8> {
    let frames = rng.random_range(1..=3);
    let mut out = Vec::new();
    for _ in 0..frames {
        match rng.random_range(0..10) {
            0 => {
                stats.random.fetch_add(1, Ordering::Relaxed);
                out.extend(random_bytes(rng, 4096));
            }
            1 => {
                stats.truncated.fetch_add(1, Ordering::Relaxed);
                let f = wire::frame(&real_payload(rng, port));
                let cut = rng.random_range(0..f.len());
                out.extend_from_slice(&f[..cut]);
            }
            2 => {
                stats.bad_length.fetch_add(1, Ordering::Relaxed);
                let limit = match port {
                    PortKind::Client => CLIENT_FRAME_LIMIT,
                    PortKind::Peer => kv_api::MAX_FRAME as u32,
                };
                let len: u32 = match rng.random_range(0..5) {
                    0 => u32::MAX,
                    1 => limit + 1,
                    2 => limit,
                    3 => 0,
                    _ => rng.random_range(0..4096),
                };
                out.extend(len.to_be_bytes());
                out.extend(random_bytes(rng, 512));
            }
            3..=5 => {
                stats.mutated.fetch_add(1, Ordering::Relaxed);
                let real = real_payload(rng, port);
                let m = mutate(rng, real);
                out.extend(wire::frame(&m));
            }
            _ => {
                stats.extreme.fetch_add(1, Ordering::Relaxed);
                let p = extreme_payload(rng, port);
                out.extend(wire::frame(&p));
            }
        }
    }
    out
}

/// One worker: connection after connection at random ports of random
/// replicas, until `end`.
async fn fuzz_worker(
    seed: u64,
    targets: Arc<Vec<(String, PortKind)>>,
    end: Instant,
    stats: Arc<Stats>,
) {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut pace = tokio::time::interval(Duration::from_millis(1000 / CONNECTIONS_PER_SEC));
    while Instant::now() < end {
        pace.tick().await;
        let (addr, port) = &targets[rng.random_range(0..targets.len())];
        let input = fuzz_input(&mut rng, *port, &stats);
        let listen_ms = rng.random_range(0..100);
        stats.connections.fetch_add(1, Ordering::Relaxed);
        let Ok(Ok(mut s)) =
            tokio::time::timeout(Duration::from_secs(2), tokio::net::TcpStream::connect(addr))
                .await
        else {
            stats.refused.fetch_add(1, Ordering::Relaxed);
            continue;
        };
        // The replica may close the connection at any point: fine.
        let _ = tokio::time::timeout(Duration::from_secs(2), s.write_all(&input)).await;
        let mut buf = vec![0u8; 64 * 1024];
        let _ = tokio::time::timeout(Duration::from_millis(listen_ms), async {
            while let Ok(n) = s.read(&mut buf).await {
                if n == 0 {
                    break;
                }
            }
        })
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fuzz_client_and_peer_ports() {
    let seed = env_u64("KV_FUZZ_SEED").unwrap_or_else(rand::random);
    let secs = env_u64("KV_FUZZ_SECS").unwrap_or(FUZZ_SECS);
    println!(
        "fuzz seed {seed}, {secs} s, top of range {} (replay with KV_FUZZ_SEED={seed})",
        top_of_range()
    );
    let mut cluster = Cluster::start(3).await;
    let budget = Duration::from_secs(secs + 120);
    bounded(budget, "the fuzz test", async {
        // Data that must survive: keys no fuzz input can name.
        let client = cluster.client();
        let mut expected = BTreeMap::new();
        for i in 0..40u32 {
            let key = format!("guarded/{seed}/{i}");
            let value = format!("value {i} \u{1F512} {}", "x".repeat(i as usize * 50));
            client.put(key.clone(), value.clone()).await.unwrap();
            expected.insert(key, value);
        }

        let targets: Vec<(String, PortKind)> = cluster
            .ids()
            .into_iter()
            .flat_map(|id| {
                [
                    (cluster.client_addr(id).to_string(), PortKind::Client),
                    (cluster.peer_addr(id).to_string(), PortKind::Peer),
                ]
            })
            .collect();
        let targets = Arc::new(targets);
        let stats = Arc::new(Stats::default());
        let end = Instant::now() + Duration::from_secs(secs);
        let workers: Vec<_> = (0..WORKERS)
            .map(|w| {
                tokio::spawn(fuzz_worker(
                    seed.wrapping_add(w),
                    targets.clone(),
                    end,
                    stats.clone(),
                ))
            })
            .collect();
        // Meanwhile every replica must stay alive.
        while Instant::now() < end {
            for id in cluster.ids() {
                cluster.assert_alive(id);
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        for w in workers {
            w.await.expect("a fuzz worker");
        }
        println!(
            "sent: {} connections ({} not accepted); frames: {} random, {} truncated, \
             {} bad length, {} mutated, {} extreme",
            stats.connections.load(Ordering::Relaxed),
            stats.refused.load(Ordering::Relaxed),
            stats.random.load(Ordering::Relaxed),
            stats.truncated.load(Ordering::Relaxed),
            stats.bad_length.load(Ordering::Relaxed),
            stats.mutated.load(Ordering::Relaxed),
            stats.extreme.load(Ordering::Relaxed),
        );

        // Fuzzed set_faults calls may have left failure injection on (a
        // legitimate operator API): heal it, then the cluster must serve.
        for id in cluster.ids() {
            cluster.assert_alive(id);
            let heal = FaultSpec {
                heal: true,
                ..Default::default()
            };
            client
                .set_faults(cluster.client_addr(id), heal)
                .await
                .unwrap_or_else(|e| panic!("replica {id} does not take set_faults: {e}"));
        }
        cluster.wait_ready(Duration::from_secs(60)).await;
        // A port may still be full of fuzz connections whose requests wait
        // out their (clamped, 10 s) deadlines; it must answer once they
        // have. Established peer connections are not affected meanwhile.
        for id in cluster.ids() {
            let peer = cluster.peer_addr(id).to_string();
            kv_tests::wait_until(
                Duration::from_secs(30),
                &format!("replica {id} answers on its peer port"),
                || peer_port_answers(&peer),
            )
            .await;
        }
        let client = cluster.client_with_timeout(Duration::from_secs(20));
        for (key, value) in &expected {
            let got = client
                .get(key.clone())
                .await
                .unwrap_or_else(|e| panic!("reading {key} after the fuzz: {e}"));
            assert_eq!(
                got.as_deref(),
                Some(value.as_bytes()),
                "{key} after the fuzz (seed {seed})"
            );
        }
        client
            .put(format!("after/{seed}"), "ok")
            .await
            .expect("a write after the fuzz");
        for id in cluster.ids() {
            let local = cluster.client_for(id);
            wait_has(&local, &format!("after/{seed}"), id).await;
        }
    })
    .await;
}

/// Waits until replica `id` has applied `key` (read locally).
async fn wait_has(local: &kv_client::Client, key: &str, id: ReplicaId) {
    kv_tests::wait_until(
        Duration::from_secs(30),
        &format!("replica {id} applies the write made after the fuzz"),
        || async { matches!(local.get_local(key.to_string()).await, Ok(Some(_))) },
    )
    .await;
}

/// Sends `msg` to `addr` as one well-formed peer request and waits briefly
/// for the answer (or the connection closing).
async fn send_peer_request(addr: &str, msg: PeerRequest) {
    let frame = wire::request_frame(1, Duration::from_secs(1), msg);
    if let Ok(mut s) = tokio::net::TcpStream::connect(addr).await {
        let _ = s.write_all(&frame).await;
        let mut buf = [0u8; 4096];
        let _ = tokio::time::timeout(Duration::from_secs(1), s.read(&mut buf)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "fails today: no ballot exceeds a forged one of round u64::MAX (needs peer authentication)"]
async fn forged_top_round_ballot_wedges_elections() {
    let mut cluster = Cluster::start(3).await;
    bounded(Duration::from_secs(120), "the top-ballot test", async {
        cluster.cli_ok(&["--timeout", "10", "put", "k", "v"]).await;
        let leader = cluster.wait_for_leader(Duration::from_secs(20)).await;
        for id in cluster.ids() {
            // From the leader, so leader stickiness does not refuse it (a
            // forged `from`: peers are not authenticated).
            let prepare = Prepare {
                from: leader,
                ballot: Ballot {
                    round: u64::MAX,
                    id: leader,
                },
                from_slot: 1,
                pre_vote: false,
            };
            let addr = cluster.peer_addr(id).to_string();
            send_peer_request(&addr, PeerRequest::Prepare { req: prepare }).await;
        }
        // Deposed, fine; but some leader must be elected again.
        cluster.wait_ready(Duration::from_secs(60)).await;
        cluster.cli_ok(&["--timeout", "10", "put", "k", "v2"]).await;
    })
    .await;
}

/// Failed before acceptors refused slots far past their chosen prefix
/// (`kv_server::paxos::MAX_ACCEPT_AHEAD`): the next leader re-proposed
/// every slot up to the forged one, and the write after the election timed
/// out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forged_far_slot_entry_does_not_hang_the_next_leader() {
    let mut cluster = Cluster::start(3).await;
    bounded(Duration::from_secs(120), "the far-slot test", async {
        cluster.cli_ok(&["--timeout", "10", "put", "k", "v"]).await;
        let leader = cluster.wait_for_leader(Duration::from_secs(20)).await;
        let status = cluster.status(leader).await.expect("the leader answers");
        for id in cluster.ids() {
            // The leader's own ballot, one round up: accepted everywhere.
            let accept = Accept {
                from: leader,
                ballot: Ballot {
                    round: status.ballot_round + 1,
                    id: leader,
                },
                entries: vec![(u64::MAX - 1, Value::Noop)],
                chosen: 0,
            };
            let addr = cluster.peer_addr(id).to_string();
            send_peer_request(&addr, PeerRequest::Accept { req: accept }).await;
        }
        cluster.kill(leader);
        let others: Vec<ReplicaId> = cluster.ids().into_iter().filter(|&i| i != leader).collect();
        let client = kv_client::Client::builder()
            .addrs(
                others
                    .iter()
                    .map(|&i| cluster.client_addr(i).to_string())
                    .collect(),
            )
            .timeout(Duration::from_secs(30))
            .build()
            .unwrap();
        client
            .put("k", "v2")
            .await
            .expect("a write after the election");
    })
    .await;
}
