//! The kvpaxos client SDK: a [`Client`] that reads and writes a replicated
//! key-value store, finding the leader, failing over between replicas and
//! retrying writes safely. Everything an application needs is here, in
//! `kv_client` alone: the client, its errors, replica-file loading
//! ([`Replicas`]), [`Limits`], TLS ([`TlsFiles`]) and the types of the raw
//! and administrative calls ([`WriteRequest`], [`ReplicaStatus`],
//! [`FaultSpec`], ...).
//!
//! ```toml
//! [dependencies]
//! # Without the `kv-client` command line (clap, rustyline, ...): the SDK only.
//! kv-client = { path = "../kv-client", default-features = false }
//! ```
//!
//! The common path, from configuration to every operation:
//!
//! ```no_run
//! use std::time::Duration;
//!
//! use kv_client::{Client, Error, FaultSpec, Replicas, TlsFiles};
//!
//! # async fn demo() -> Result<(), Error> {
//! // One line: every replica of a replica file, default settings.
//! let client = Client::from_replica_file("replica")?;
//!
//! // Or from the environment: KV_REPLICAS (a replica file, or
//! // `host:port,host:port`) and, for TLS, KV_TLS_CA, KV_TLS_CERT, KV_TLS_KEY.
//! let client = Client::from_env()?;
//!
//! // Or spelled out.
//! let replicas = Replicas::load("replica")?; // errors convert into kv_client::Error
//! let client = Client::builder()
//!     .replicas(replicas) // or .addrs(vec!["127.0.0.1:7002".into()])
//!     .timeout(Duration::from_secs(5)) // the budget of each operation
//!     .tls(TlsFiles {
//!         ca: "tls/ca.pem".into(),
//!         cert: "tls/writer.pem".into(),
//!         key: "tls/writer.key".into(),
//!     })
//!     .build()?; // lazy: connects on first use
//!
//! client.put("greeting", "hello").await?;
//! assert_eq!(client.get("greeting").await?, Some(b"hello".to_vec()));
//! let fast = client.get_local("greeting").await?; // possibly stale
//!
//! // Compare-and-swap: only one of several racing writers wins.
//! let o = client.cas("lock", None, "me").await?;
//! if !o.swapped {
//!     println!("held by {:?}", o.current);
//! }
//! let existed = client.delete("greeting").await?;
//! assert!(existed);
//!
//! // What each replica says about itself.
//! for (addr, status) in client.status().await {
//!     match status {
//!         Ok(s) => println!("{addr}: leader {}, applied {}", s.leader, s.applied),
//!         Err(e) => println!("{addr}: {e}"),
//!     }
//! }
//!
//! // Failure injection at one replica (for tests and demonstrations).
//! let change = FaultSpec { drop_rate: Some(0.1), ..Default::default() };
//! let report = client.set_faults(&client.addrs()[0], change).await?;
//! println!("dropped so far: {}", report.dropped);
//!
//! // A write whose outcome is unknown may or may not have been applied.
//! if let Err(e) = client.put("k", "v").await {
//!     if e.outcome_unknown() {
//!         // read the data to find out
//!     }
//! }
//! # Ok(()) }
//! ```
//!
//! Two small applications come with the crate, both built on the SDK alone:
//! `examples/counter.rs` (many tasks incrementing one counter through
//! compare-and-swap) and `examples/watch.rs` (configured from
//! `KV_REPLICAS`, it prints a key's value whenever it changes).
//!
//! # Environment
//!
//! [`Client::from_env`] and [`ClientBuilder::from_env`] read:
//!
//! | variable | meaning |
//! |---|---|
//! | `KV_REPLICAS` | required: a replica file (if a file by that name exists), otherwise a comma-separated list of `host:port` client addresses |
//! | `KV_TLS_CA`, `KV_TLS_CERT`, `KV_TLS_KEY` | all three or none: the CA certificates to trust, this client's certificate and its key (PEM), as in [`ClientBuilder::tls`] |
//!
//! An empty variable counts as unset; anything else wrong is an
//! [`Error::InvalidArgument`] naming the variable.
//!
//! # Features
//!
//! - `cli` (default): the `kv-client` command line and what only it needs
//!   (clap, rustyline, hdrhistogram, tracing-subscriber, serde_json). An
//!   application sets `default-features = false`; the SDK is the same
//!   either way. The command line's code is the binary's business, not part
//!   of the SDK's API (a hidden module, with no stability promise).
//!
//! # Guarantees
//!
//! - Keys and values are checked against [`Limits`] before anything
//!   is sent ([`Error::InvalidArgument`]).
//! - Writes belong to a session the cluster opens for this client (through
//!   its log, on the first write) and numbers itself, so no other client can
//!   share it. Every write carries the session and a sequence number unique
//!   in it; a retry (after a timeout, a dropped connection, or on another
//!   replica) reuses the same number, so the cluster applies it at most once.
//! - If the cluster dropped the session (idle longer than its TTL, or
//!   evicted by newer ones), a write that was certainly not applied goes
//!   again in a new session; one that may have been fails with
//!   [`Error::OutcomeUnknown`].
//! - Each operation has an overall budget (default 5 s). When it runs out the
//!   error is [`Error::Unavailable`] if no replica ever accepted a connection,
//!   otherwise [`Error::Timeout`]; for a write both mean "outcome unknown".
//!
//! # Layout
//!
//! - [`client`](Client) — `Client`, `ClientBuilder`, `CasOutcome`: the API.
//! - `config` — [`Client::from_replica_file`], [`Client::from_env`].
//! - `failover` — the retry policy (replica order, hints, backoff, budget).
//! - `pool` — one cached tarpc connection per address, redialled on failure.
//! - `seq` — a session's sequence numbers and the `acked_below` watermark.
//! - [`escape`](escape_bytes) — showing byte strings as text.
//! - `cli` (feature `cli`, hidden) — the `kv-client` command line: one-shot
//!   commands, `--output json`, the `shell`, `fault` and the `bench` load
//!   generator.
#![deny(missing_docs)]

// The command line lives in the library because it needs what the SDK
// keeps crate-private (a write's log slot, which `kv-client put --output
// json` prints); the binary, a separate crate of this package, can only
// reach `pub` items. So `pub`, but hidden and behind the `cli` feature: it
// is no part of the SDK's API and may change at any time.
#[cfg(feature = "cli")]
#[doc(hidden)]
pub mod cli;
mod client;
mod config;
mod error;
mod escape;
mod failover;
mod pool;
mod seq;

pub use client::{
    CasOutcome, Client, ClientBuilder, Watcher, DEFAULT_TIMEOUT, MAX_TIMEOUT, MEMBERSHIP_REFRESH,
};
pub use config::{ENV_REPLICAS, ENV_TLS_CA, ENV_TLS_CERT, ENV_TLS_KEY};
pub use error::{Error, Result};
pub use escape::escape_bytes;
// What the SDK's signatures name, so that an application needs no other
// crate: replica files, limits, TLS files, the raw write and its answer,
// replica status and failure injection, and what a replica itself answers
// (`KvError`, which `Limits`' checks return).
pub use kv_api::membership::{Member, MemberChange, Membership};
pub use kv_api::replicas::{ReplicaAddr, ReplicaFileError, Replicas};
pub use kv_api::tls::{Role, TlsFiles};
pub use kv_api::{
    FaultReport, FaultSpec, KvError, LeaderHint, Limits, Op, OpResult, ReplicaId, ReplicaStatus,
    Slot, WriteOutcome, WriteRequest, MAX_FAULT_DELAY_MS,
};
// The data model: revisions, ranges, transactions, leases and watches.
pub use kv_api::{
    prefix_end, CmpOp, Compare, EventKind, KeyValue, LeaseOp, LeaseResult, RangeRequest,
    RangeResponse, Target, Txn, TxnOp, TxnOpResult, TxnResult, WatchEvent, WatchRequest,
    WatchResponse, MAX_LEASE_TTL_MS, MAX_RANGE_BYTES, MAX_RANGE_LIMIT, MAX_TXN_COMPARES,
    MAX_TXN_OPS, MAX_WATCH_EVENTS, MAX_WATCH_WAIT_MS, MIN_LEASE_TTL_MS,
};
