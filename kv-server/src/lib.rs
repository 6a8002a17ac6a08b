//! A kvpaxos replica: Multi-Paxos consensus, durable storage, the key-value
//! state machine, and the RPC glue serving `kv-api` and `kv-peer-api`.
//!
//! # Layout
//!
//! - [`config`] — [`ServerConfig`]: what one replica needs to run.
//! - [`paxos`] — the consensus core: no I/O; messages and ticks in, records
//!   to persist, messages to send and entries to apply out.
//! - [`storage`] — the acceptor's durable state in a write-ahead log, one synced
//!   transaction per round (group commit).
//! - [`state`] — the key-value map and per-client deduplication.
//! - `lock` — one replica process per data directory (`LOCK`, flock).
//! - `node` — the driver task that owns core, storage and state machine.
//! - `peers` — outgoing peer calls: parallel, deadline-bounded, redialling.
//! - `rpc` — the `Kv` and `Peer` tarpc services.
//! - [`run`] — starts one replica and serves until `shutdown` resolves.
#![deny(missing_docs)]

pub mod config;
mod error;
pub mod faults;
mod lock;
mod node;
pub mod paxos;
mod peers;
mod rpc;
pub mod snapshot;
pub mod state;
pub mod storage;

use std::sync::Arc;

pub use config::ServerConfig;
pub use error::{Result, ServerError};

/// Runs one replica until `shutdown` resolves: opens its data directory,
/// rebuilds the map from disk, listens on its client and peer addresses, and
/// takes part in consensus.
pub async fn run(
    config: ServerConfig,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<()> {
    config.validate()?;
    let me = config
        .replicas
        .get(config.id)
        .expect("validate() checked the id")
        .clone();
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
    let members: Vec<u64> = config.replicas.replicas.iter().map(|r| r.id).collect();
    let mut core_cfg = paxos::Config::new(config.id, members);
    core_cfg.seed = rand::random();
    tracing::info!(
        id = config.id,
        promised = %durable.promised,
        chosen = durable.chosen,
        entries = durable.entries.len(),
        snapshot = snapshot_index,
        "loaded state from {}",
        storage.path().display()
    );
    let core = paxos::Paxos::new(core_cfg, durable);

    let fault_seed = config.fault_seed.unwrap_or_else(rand::random);
    let faults = Arc::new(faults::Faults::new(&config.faults, fault_seed));
    if !faults.is_healthy() {
        tracing::warn!(id = config.id, fault_seed, faults = ?config.faults, "starting with failure injection");
    }
    let pool = Arc::new(peers::PeerPool::new(
        config.id,
        config
            .replicas
            .replicas
            .iter()
            .filter(|r| r.id != config.id)
            .map(|r| (r.id, r.peer_addr.clone())),
        config.peer_timeout,
        faults.clone(),
    ));
    let (tx, rx) = tokio::sync::mpsc::channel(node::INPUT_QUEUE);
    let handler = rpc::Handler::new(
        config.id,
        tx.clone(),
        pool.clone(),
        config.limits,
        snapshot_dir.clone(),
        faults,
    );
    let (serve_kv, serve_peer) =
        rpc::listen(me.client_addr.clone(), me.peer_addr.clone(), handler).await?;
    let kv_task = tokio::spawn(serve_kv);
    let peer_task = tokio::spawn(serve_peer);
    tracing::info!(
        id = config.id,
        client = %me.client_addr,
        peer = %me.peer_addr,
        data_dir = %config.data_dir.display(),
        "replica serving"
    );
    let snapshots = node::Snapshots {
        dir: snapshot_dir,
        every: config.snapshot_every,
        latest: snapshot_index,
        log_bytes: 0,
        taking: false,
        receiving: false,
    };
    let node = node::Node::new(
        core,
        sm,
        storage,
        snapshots,
        config.replicas.clone(),
        pool,
        tx,
    );
    let result = node.run(rx, config.tick, shutdown).await;
    kv_task.abort();
    peer_task.abort();
    result
}
