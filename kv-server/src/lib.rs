//! A kvpaxos replica: Multi-Paxos consensus, durable storage, the key-value
//! state machine, and the RPC glue serving `kv-api` and `kv-peer-api`.
//!
//! # Layout
//!
//! - [`binds`] — which addresses may be served without TLS (loopback).
//! - [`config`] — [`ServerConfig`]: what one replica needs to run.
//! - [`paxos`] — the consensus core: no I/O; messages and ticks in, records
//!   to persist, messages to send and entries to apply out.
//! - [`storage`] — the acceptor's durable state in a write-ahead log, one synced
//!   transaction per round (group commit).
//! - [`state`] — the key-value map and the client sessions (deduplication,
//!   expiry by the log's clock).
//! - `lock` — one replica process per data directory (`LOCK`, flock).
//! - [`node`] — the driver task that owns core, storage and state machine,
//!   generic over its log store and outbox so the simulation runs it too.
//! - [`inbox`] — what the driver receives (`Input`), from `peers`, `rpc` and
//!   itself; owned by none of them, so none imports another's.
//! - `peers` — outgoing peer calls: parallel, deadline-bounded, redialling.
//! - `rpc` — the `Kv` and `Peer` tarpc services.
//! - `net` — listening, dialling, framing, and the limits on connections,
//!   requests in flight, idle time and deadlines.
//! - [`logging`] — `--log-format json`: one JSON object a line.
//! - [`metrics`] — the replica's metrics (`kvpaxos_…`), process-wide.
//! - `redis` — the RESP listener (`--redis-addr`): redis-cli, redis-benchmark
//!   and Redis client libraries over the same paths as `rpc`.
//! - `admin` — the admin HTTP listener: `/metrics`, `/livez`, `/readyz`,
//!   `/status` (`--admin-addr`).
//! - [`restore`] — `kv-server restore`: a new replica's data directory
//!   from a backup.
//! - [`run`] — starts one replica and serves until `shutdown` resolves, or
//!   fails if a listener stops.
#![deny(missing_docs)]

mod admin;
pub mod binds;
pub mod config;
mod error;
pub mod faults;
pub mod inbox;
mod lock;
pub mod logging;
pub mod metrics;
pub mod net;
pub mod node;
pub mod paxos;
mod peers;
mod redis;
pub mod restore;
mod rpc;
pub mod snapshot;
pub mod state;
pub mod storage;

use std::sync::Arc;

pub use config::ServerConfig;
pub use error::{Result, ServerError};
use kv_api::membership::Membership;
use kv_api::replicas::ReplicaAddr;

/// Runs one replica until `shutdown` resolves: opens its data directory,
/// rebuilds the map from disk, listens on its client and peer addresses, and
/// takes part in consensus.
///
/// If either listener stops (its task returns or panics), the replica
/// stops too and this returns [`ServerError::Internal`] naming it: a
/// replica that cannot be reached must not look alive to a supervisor.
pub async fn run(
    config: ServerConfig,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<()> {
    config.validate()?;
    let tls = config.load_tls()?;
    // Before anything in the directory is read or written; held until
    // this function returns.
    let _lock = lock::lock(&config.data_dir)?;
    let options = storage::Options {
        unsynced_journal: storage::testing::enabled_by_env(),
    };
    let dir = config.data_dir.clone();
    let opened = tokio::task::spawn_blocking(move || {
        let (storage, durable) = storage::Storage::open_with(&dir, options)?;
        let snapshots = snapshot::SnapshotDir::open(&dir)?;
        let (index, sm) = snapshots.load_latest()?;
        Ok::<_, ServerError>((storage, durable, snapshots, index, sm))
    })
    .await
    .map_err(|e| ServerError::Storage {
        path: config.data_dir.clone(),
        message: format!("opening the storage failed: {e}"),
    })?;
    let (storage, mut durable, snapshot_dir, snapshot_index, sm) = opened?;
    durable.snapshot = snapshot_index;
    let given = config
        .join
        .clone()
        .unwrap_or_else(|| Membership::from_replicas(&config.replicas));
    let members: Vec<u64> = given.members.iter().map(|m| m.id).collect();
    let mut core_cfg = paxos::Config::new(config.id, members);
    core_cfg.seed = rand::random();
    // Acceptors refuse other proposers for an election timeout's lower
    // bound after a leader's heartbeat (followers that hear the leader do
    // not campaign sooner anyway), so the leases cost elections nothing.
    core_cfg.lease_us =
        u64::try_from((config.tick * core_cfg.election_ticks.0).as_micros()).unwrap_or(u64::MAX);
    core_cfg.read_lease = config.read_lease;
    tracing::info!(
        id = config.id,
        promised = %durable.promised,
        chosen = durable.chosen,
        entries = durable.entries.len(),
        snapshot = snapshot_index,
        "loaded state from {}",
        storage.path().display()
    );
    let (core, sm, persist_seed) = node::recover(core_cfg, &given, durable, sm);
    // Decoding the snapshot and the log left their buffers freed, not
    // returned.
    node::release_free_memory();
    let current = core.membership().clone();
    if !persist_seed && config.join.is_none() && !current.same_members(&given) {
        tracing::warn!(
            id = config.id,
            epoch = current.epoch,
            "the replica file {} lists other replicas than the configuration this replica \
             keeps (epoch {}: {}); it follows the one it keeps, which changes only through \
             `kv-client member`",
            config.replicas.source.display(),
            current.epoch,
            describe(&current)
        );
    }
    // Listen where the configuration says the others reach us.
    let me = match current.get(config.id) {
        Some(m) => ReplicaAddr {
            id: m.id,
            client_addr: m.client_addr.clone(),
            peer_addr: m.peer_addr.clone(),
            redis_addr: None,
        },
        None => config
            .replicas
            .get(config.id)
            .expect("validate() checked the id")
            .clone(),
    };

    let fault_seed = config.fault_seed.unwrap_or_else(rand::random);
    let faults = Arc::new(
        faults::Faults::new(&config.faults, fault_seed)
            .allow_changes(config.enable_fault_injection),
    );
    if config.enable_fault_injection {
        tracing::warn!(
            id = config.id,
            "fault injection is enabled: any client can make this replica drop, delay or cut \
             its peer messages (for tests and demonstrations only)"
        );
    }
    if !faults.is_healthy() {
        tracing::warn!(id = config.id, fault_seed, faults = ?config.faults, "starting with failure injection");
    }
    let pool = Arc::new(
        peers::PeerPool::new(
            config.id,
            current
                .members
                .iter()
                .filter(|m| m.id != config.id)
                .map(|m| (m.id, m.peer_addr.clone())),
            config.peer_timeout,
            faults.clone(),
        )
        .with_tls(match &tls {
            Some(tls) => Some(
                tls.client_config()
                    .map_err(|e| ServerError::Config(e.to_string()))?,
            ),
            None => None,
        }),
    );
    let (tx, rx) = tokio::sync::mpsc::channel(inbox::INPUT_QUEUE);
    let handler = rpc::Handler::new(
        config.id,
        tx.clone(),
        pool.clone(),
        config.limits,
        snapshot_dir.clone(),
        faults,
    );
    let redis_handler = handler.clone();
    let server_tls = match &tls {
        Some(tls) => Some(
            tls.server_config()
                .map_err(|e| ServerError::Config(e.to_string()))?,
        ),
        None => None,
    };
    wait_until_resolvable(config.id, &[&me.client_addr, &me.peer_addr]).await;
    let (serve_kv, serve_peer) = rpc::listen(
        me.client_addr.clone(),
        me.peer_addr.clone(),
        handler,
        server_tls,
    )
    .await?;
    let listeners = Listeners {
        kv: tokio::spawn(serve_kv),
        kv_addr: me.client_addr.clone(),
        peer: tokio::spawn(serve_peer),
        peer_addr: me.peer_addr.clone(),
    };
    tracing::info!(
        id = config.id,
        client = %me.client_addr,
        peer = %me.peer_addr,
        data_dir = %config.data_dir.display(),
        "replica serving"
    );
    let snapshots = node::Snapshots::new(config.snapshot_every, snapshot_index);
    let outbox = node::PeerOutbox::new(pool, tx, snapshot_dir);
    let node = node::Node::new(core, sm, storage, snapshots, outbox, rand::random())
        .sessions(config.session_ttl, config.max_sessions);
    let admin = match &config.admin_addr {
        None => None,
        Some(addr) => {
            let listener = bind(addr).await?;
            let admin_tls = match &tls {
                Some(tls) => Some(
                    tls.server_config_optional_client()
                        .map_err(|e| ServerError::Config(e.to_string()))?,
                ),
                None => None,
            };
            let state = Arc::new(admin::Admin {
                id: config.id,
                client_addr: me.client_addr.clone(),
                health: node.health(),
                inputs: node.inputs(),
            });
            tracing::info!(id = config.id, admin = %addr, tls = admin_tls.is_some(), "admin listener serving /metrics /livez /readyz /status");
            Some(tokio::spawn(admin::serve(listener, admin_tls, state)))
        }
    };
    let redis = match &config.redis_addr {
        None => None,
        Some(addr) => {
            let listener = bind(addr).await?;
            let redis_tls = match &tls {
                Some(tls) => Some(
                    tls.server_config()
                        .map_err(|e| ServerError::Config(e.to_string()))?,
                ),
                None => None,
            };
            tracing::info!(id = config.id, redis = %addr, tls = redis_tls.is_some(), "RESP listener serving");
            Some(tokio::spawn(redis::serve(
                listener,
                redis_tls,
                redis_handler,
            )))
        }
    };
    let (listeners_ended, aborts) = listeners.watch();
    let (stop, failed) = stop_signal(config.id, shutdown, listeners_ended);
    let result = node.run(rx, config.tick, stop).await;
    for a in aborts {
        a.abort();
    }
    if let Some(admin) = admin {
        admin.abort();
    }
    if let Some(redis) = redis {
        redis.abort();
    }
    match failed.await {
        Ok(why) => Err(ServerError::Internal(why)),
        Err(_) => result,
    }
}

/// Binds one of the optional listeners (admin, RESP), naming the address
/// if it cannot.
async fn bind(addr: &str) -> Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|error| ServerError::Bind {
            addr: addr.to_string(),
            error,
        })
}

/// How long a replica waits at start for its own addresses' names to
/// resolve before it tries to bind them anyway (and fails, naming them).
pub const OWN_NAME_WAIT: std::time::Duration = std::time::Duration::from_secs(120);

/// Waits, up to [`OWN_NAME_WAIT`], until every one of `addrs` resolves.
/// A replica named by DNS may start before its name is published (a
/// Kubernetes pod before its Service lists it, a container before its
/// network's DNS has it); binding at once would fail and crash-loop it.
/// Peers' names need no such wait: they are resolved at every dial, and
/// dials are retried with backoff for as long as the replica runs.
async fn wait_until_resolvable(id: kv_api::ReplicaId, addrs: &[&str]) {
    let deadline = tokio::time::Instant::now() + OWN_NAME_WAIT;
    let mut warned = false;
    for addr in addrs {
        loop {
            let result = tokio::net::lookup_host(*addr)
                .await
                .map(|mut found| found.next().is_some());
            match result {
                Ok(true) => break,
                result => {
                    if tokio::time::Instant::now() >= deadline {
                        break;
                    }
                    if !warned {
                        warned = true;
                        let why = match result {
                            Ok(_) => "it resolves to no address".to_string(),
                            Err(e) => e.to_string(),
                        };
                        tracing::warn!(
                            id,
                            addr,
                            error = %why,
                            wait_secs = OWN_NAME_WAIT.as_secs(),
                            "this replica's own address does not resolve yet; retrying"
                        );
                    }
                    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
                }
            }
        }
    }
}

/// The two listener tasks of a running replica.
struct Listeners {
    kv: tokio::task::JoinHandle<std::io::Error>,
    kv_addr: String,
    peer: tokio::task::JoinHandle<std::io::Error>,
    peer_addr: String,
}

impl Listeners {
    /// A future that resolves, describing how, when either listener task
    /// ends; and handles to stop both.
    fn watch(
        self,
    ) -> (
        impl std::future::Future<Output = String> + Send + 'static,
        [tokio::task::AbortHandle; 2],
    ) {
        let aborts = [self.kv.abort_handle(), self.peer.abort_handle()];
        let Listeners {
            mut kv,
            kv_addr,
            mut peer,
            peer_addr,
        } = self;
        let ended = async move { listener_end(&mut kv, &kv_addr, &mut peer, &peer_addr).await };
        (ended, aborts)
    }
}

/// The driver's stop signal: `shutdown`, or a listener ending. In the
/// second case the replica stops as at a shutdown, the reason is logged as
/// an error, and the receiver gets it (it is dropped unsent otherwise).
fn stop_signal(
    id: kv_api::ReplicaId,
    shutdown: impl std::future::Future<Output = ()> + Send,
    listener_ended: impl std::future::Future<Output = String> + Send,
) -> (
    impl std::future::Future<Output = ()> + Send,
    tokio::sync::oneshot::Receiver<String>,
) {
    let (tx, rx) = tokio::sync::oneshot::channel();
    let stop = async move {
        tokio::select! {
            () = shutdown => {}
            why = listener_ended => {
                tracing::error!(id, "{why}; stopping the replica");
                let _ = tx.send(why);
            }
        }
    };
    (stop, rx)
}

/// Resolves when either listener task ends, describing how. They never
/// end by themselves while the replica runs.
async fn listener_end(
    kv: &mut tokio::task::JoinHandle<std::io::Error>,
    kv_addr: &str,
    peer: &mut tokio::task::JoinHandle<std::io::Error>,
    peer_addr: &str,
) -> String {
    let (port, addr, ended) = tokio::select! {
        r = kv => ("client", kv_addr, r),
        r = peer => ("peer", peer_addr, r),
    };
    let how = match ended {
        Ok(error) => format!("its socket failed: {error}"),
        Err(e) if e.is_panic() => {
            let payload = e.into_panic();
            let msg = payload
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "a panic".to_string());
            format!("it panicked: {msg}")
        }
        Err(e) => format!("its task ended: {e}"),
    };
    format!("the {port} listener on {addr} stopped ({how})")
}

/// A configuration's members, for a log line: `1 (voter, 127.0.0.1:7001),
/// ...`.
pub fn describe(m: &Membership) -> String {
    m.members
        .iter()
        .map(|m| format!("{} ({}, {})", m.id, m.role(), m.client_addr))
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn listeners(
        kv: impl std::future::Future<Output = std::io::Error> + Send + 'static,
    ) -> Listeners {
        Listeners {
            kv: tokio::spawn(kv),
            kv_addr: "127.0.0.1:1".into(),
            peer: tokio::spawn(std::future::pending()),
            peer_addr: "127.0.0.1:2".into(),
        }
    }

    /// The reason the replica was stopped with, if it was stopped by a
    /// listener ending (within 5 s).
    async fn stopped_by(l: Listeners, shutdown: bool) -> Option<String> {
        let (ended, aborts) = l.watch();
        let shutdown = async move {
            if !shutdown {
                std::future::pending::<()>().await;
            }
        };
        let (stop, failed) = stop_signal(1, shutdown, ended);
        tokio::time::timeout(Duration::from_secs(5), stop)
            .await
            .expect("the replica was told to stop");
        for a in aborts {
            a.abort();
        }
        failed.await.ok()
    }

    #[tokio::test]
    async fn a_listener_that_panics_or_returns_stops_the_replica_with_its_reason() {
        let panicking = listeners(async {
            tokio::task::yield_now().await;
            panic!("boom in the accept loop")
        });
        let why = stopped_by(panicking, false).await.expect("a failure");
        assert!(why.contains("client listener on 127.0.0.1:1"), "{why}");
        assert!(why.contains("boom in the accept loop"), "{why}");

        let returning = listeners(async { std::io::Error::other("socket gone") });
        let why = stopped_by(returning, false).await.expect("a failure");
        assert!(why.contains("socket gone"), "{why}");
    }

    #[tokio::test]
    async fn a_shutdown_is_not_a_failure_and_stops_the_listeners() {
        let l = listeners(std::future::pending());
        let (kv, peer) = (l.kv.abort_handle(), l.peer.abort_handle());
        assert_eq!(stopped_by(l, true).await, None);
        tokio::task::yield_now().await;
        assert!(kv.is_finished() && peer.is_finished());
    }
}
