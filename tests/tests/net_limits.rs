//! The limits on what a client can make a replica hold (issue 10, item 10),
//! with the limits lowered through `KV_TEST_NET_LIMITS` (read by the
//! replicas this test binary starts):
//!
//! - `connections_over_the_limit_are_closed_and_idle_ones_time_out` — with
//!   16 connections per listener, a flood of 40 idle connections: those
//!   over the limit are closed at once, a client connected before keeps
//!   being served, the rest are closed after the idle timeout, and then new
//!   clients are served again. The replica logs the refusals once.
//! - `requests_over_the_in_flight_limit_are_refused_typed_and_retried` —
//!   with 2 requests in flight per client connection, the excess is
//!   answered at once with tarpc's "throttled" error (kind `WouldBlock`),
//!   the SDK reports it as "overloaded" and retries, and many concurrent
//!   SDK writes all succeed.

use std::sync::Once;
use std::time::{Duration, Instant};

use kv_api::{FaultSpec, KvClient, Op, ReplicaId, Route, WriteRequest};
use kv_tests::{bounded, Cluster};
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

const CONNECTIONS: usize = 16;
const IDLE: Duration = Duration::from_secs(3);
const IN_FLIGHT: usize = 2;

/// Sets the lowered limits for every replica this binary starts. Called
/// first by every test, before any runtime or child exists.
fn lower_limits() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        std::env::set_var(
            "KV_TEST_NET_LIMITS",
            format!(
                "connections={CONNECTIONS},idle_ms={},client.in_flight={IN_FLIGHT}",
                IDLE.as_millis()
            ),
        );
    });
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a runtime")
}

/// Whether the other end closes `s` within `within` (EOF or reset).
async fn closed_within(s: &mut TcpStream, within: Duration) -> bool {
    let mut buf = [0u8; 64];
    matches!(
        tokio::time::timeout(within, s.read(&mut buf)).await,
        Ok(Ok(0) | Err(_))
    )
}

#[test]
fn connections_over_the_limit_are_closed_and_idle_ones_time_out() {
    lower_limits();
    runtime().block_on(async {
        let mut cluster = Cluster::start(3).await;
        bounded(Duration::from_secs(120), "the connection-limit test", async {
            let id = cluster.wait_for_leader(Duration::from_secs(20)).await;
            let addr = cluster.client_addr(id).to_string();
            let early = cluster.client_for(id);
            early.put("k0", "v0").await.expect("a put before the flood");

            let flood_size = CONNECTIONS + 24;
            let opened = Instant::now();
            let mut flood = Vec::new();
            for _ in 0..flood_size {
                flood.push(TcpStream::connect(&addr).await.expect("connect"));
            }
            // Those over the limit are closed at once, long before the
            // idle timeout; the others stay open.
            let checks = flood
                .iter_mut()
                .map(|s| closed_within(s, Duration::from_secs(1)));
            let closed: Vec<bool> = futures::future::join_all(checks).await;
            let refused = closed.iter().filter(|&&c| c).count();
            assert!(
                opened.elapsed() < IDLE,
                "the machine is too slow for this test's timing"
            );
            // The early client holds one of the slots.
            assert!(
                refused >= flood_size - (CONNECTIONS - 1),
                "{refused} of {flood_size} connections over a limit of {CONNECTIONS} were closed at once"
            );
            assert!(refused < flood_size, "every connection was refused");

            // A client connected before the flood is still served.
            assert_eq!(
                early.get("k0").await.expect("a get during the flood"),
                Some(b"v0".to_vec())
            );

            // The flood's accepted connections say nothing and are closed
            // after the idle timeout (measured from a little before the
            // replica accepted them).
            let mut open: Vec<TcpStream> = flood
                .into_iter()
                .zip(closed)
                .filter(|(_, c)| !c)
                .map(|(s, _)| s)
                .collect();
            let checks = open
                .iter_mut()
                .map(|s| closed_within(s, IDLE + Duration::from_secs(10)));
            let idle_closed: Vec<bool> = futures::future::join_all(checks).await;
            assert!(
                idle_closed.iter().all(|&c| c),
                "idle connections were not closed within the idle timeout + 10 s"
            );
            let took = opened.elapsed();
            assert!(
                took >= IDLE - Duration::from_millis(200),
                "idle connections closed after {took:?}, before the idle timeout {IDLE:?}"
            );

            // Their places are free again: a new client is served.
            cluster
                .client_for(id)
                .put("k1", "v1")
                .await
                .expect("a put through a new connection after the flood");
            cluster.assert_alive(id);
            let client = cluster.client();
            assert_eq!(client.get("k0").await.unwrap(), Some(b"v0".to_vec()));
            assert_eq!(client.get("k1").await.unwrap(), Some(b"v1".to_vec()));

            // The refusals were logged, but not one line each.
            let log = cluster.log_text(id);
            let warnings = log.matches("connection limit reached").count();
            assert!(
                (1..=3).contains(&warnings),
                "{warnings} warnings about the connection limit for {refused} refusals"
            );
        })
        .await;
    });
}

/// A raw tarpc client of `addr`'s `Kv` service, on one connection.
async fn raw_kv_client(addr: &str) -> KvClient {
    let mut connect =
        tarpc::serde_transport::tcp::connect(addr, tarpc::tokio_serde::formats::Bincode::default);
    connect.config_mut().max_frame_length(kv_api::MAX_FRAME);
    let transport = connect.await.expect("connect");
    KvClient::new(tarpc::client::Config::default(), transport).spawn()
}

async fn hold_forwards(cluster: &Cluster, id: ReplicaId, hold: bool) {
    let change = if hold {
        FaultSpec {
            timeout_rate: Some(1.0),
            ..Default::default()
        }
    } else {
        FaultSpec {
            heal: true,
            ..Default::default()
        }
    };
    cluster
        .client()
        .set_faults(cluster.client_addr(id), change)
        .await
        .expect("set faults");
}

#[test]
fn requests_over_the_in_flight_limit_are_refused_typed_and_retried() {
    lower_limits();
    runtime().block_on(async {
        let mut cluster = Cluster::start(3).await;
        bounded(
            Duration::from_secs(120),
            "the in-flight-limit test",
            async {
                let leader = cluster.wait_for_leader(Duration::from_secs(20)).await;
                let f = cluster.ids().into_iter().find(|&i| i != leader).unwrap();
                kv_tests::wait_until(
                    Duration::from_secs(20),
                    "the follower knows the leader",
                    || async {
                        cluster
                            .status(f)
                            .await
                            .is_some_and(|s| s.leader_id == Some(leader))
                    },
                )
                .await;
                // An SDK client of the follower only, whose session is
                // opened (by a first put) while writes still go through:
                // its writes below then need no open, which would hold
                // them all back behind the first.
                let sdk = kv_client::Client::builder()
                    .addrs(vec![cluster.client_addr(f).to_string()])
                    .follow_hints(false)
                    .timeout(Duration::from_millis(1500))
                    .build()
                    .unwrap();
                sdk.put("warm", "up")
                    .await
                    .expect("a first put opens its session");
                // Every call from the follower to a peer (so every write it
                // forwards) is now held until its deadline: writes stay in
                // flight there.
                hold_forwards(&cluster, f, true).await;

                let raw = raw_kv_client(cluster.client_addr(f)).await;
                let client_id = rand::random::<u64>() | 1;
                let calls: Vec<_> = (1..=5u64)
                    .map(|seq| {
                        let raw = raw.clone();
                        tokio::spawn(async move {
                            let mut ctx = tarpc::context::current();
                            ctx.deadline = Instant::now() + Duration::from_secs(3);
                            let req = WriteRequest {
                                client_id,
                                seq,
                                acked_below: 0,
                                op: Op::Put {
                                    key: format!("held-{seq}").into_bytes(),
                                    value: b"x".to_vec(),
                                },
                            };
                            let started = Instant::now();
                            let r = raw.write(ctx, req, Route::Forward).await;
                            (r, started.elapsed())
                        })
                    })
                    .collect();
                let mut throttled = 0;
                for call in calls {
                    let (r, took) = call.await.unwrap();
                    if let Err(tarpc::client::RpcError::Server(e)) = &r {
                        assert_eq!(e.kind, std::io::ErrorKind::WouldBlock, "{e:?}");
                        assert!(
                            took < Duration::from_secs(1),
                            "throttled only after {took:?}"
                        );
                        throttled += 1;
                    }
                }
                assert_eq!(throttled, 5 - IN_FLIGHT, "throttled requests");

                // The SDK on that one connection: the excess is "overloaded",
                // retried until the budget is spent.
                let puts: Vec<_> = (0..6)
                    .map(|i| {
                        let sdk = sdk.clone();
                        tokio::spawn(async move { sdk.put(format!("o{i}"), "x").await })
                    })
                    .collect();
                let mut overloaded = 0;
                for p in puts {
                    if let Err(e) = p.await.unwrap() {
                        assert!(e.outcome_unknown(), "{e}");
                        if e.to_string().contains("overloaded") {
                            overloaded += 1;
                        }
                    }
                }
                assert!(
                    overloaded > 0,
                    "no SDK error said the replica was overloaded"
                );

                // Healed: many concurrent writes through one SDK client (one
                // connection per replica, two requests in flight on each) all
                // succeed, the throttled ones retried.
                hold_forwards(&cluster, f, false).await;
                let client = cluster.client();
                let puts: Vec<_> = (0..24)
                    .map(|i| {
                        let client = client.clone();
                        tokio::spawn(
                            async move { client.put(format!("c{i}"), format!("{i}")).await },
                        )
                    })
                    .collect();
                for p in puts {
                    p.await.unwrap().expect("a put under the in-flight limit");
                }
                for i in 0..24 {
                    assert_eq!(
                        client.get(format!("c{i}")).await.unwrap(),
                        Some(format!("{i}").into_bytes())
                    );
                }
                cluster.assert_alive(f);
            },
        )
        .await;
    });
}
