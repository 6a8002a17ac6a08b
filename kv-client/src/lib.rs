//! The kvpaxos client SDK: a [`Client`] that reads and writes a replicated
//! key-value store, finding the leader, failing over between replicas and
//! retrying writes safely. The `kv-client` binary is a thin command-line
//! front end over it (feature `cli`, on by default; an application sets
//! `default-features = false` and compiles the SDK only).
//!
//! ```no_run
//! use std::time::Duration;
//!
//! # async fn demo() -> Result<(), kv_client::Error> {
//! let replicas = kv_api::replicas::Replicas::load("replica").expect("replica file");
//! let client = kv_client::Client::builder()
//!     .replicas(replicas)
//!     .timeout(Duration::from_secs(5)) // the budget of each operation
//!     .build()?; // lazy: connects on first use
//!
//! client.put("greeting", "hello").await?;
//! assert_eq!(client.get("greeting").await?, Some(b"hello".to_vec()));
//!
//! // Compare-and-swap: only one of several racing writers wins.
//! let o = client.cas("lock", None, "me").await?;
//! if !o.swapped {
//!     println!("held by {:?}", o.current);
//! }
//! let existed = client.delete("greeting").await?;
//! assert!(existed);
//!
//! // Failure injection at one replica (for tests and demonstrations).
//! let change = kv_api::FaultSpec { drop_rate: Some(0.1), ..Default::default() };
//! let report = client.set_faults(&client.addrs()[0], change).await?;
//! println!("dropped so far: {}", report.dropped);
//! # Ok(()) }
//! ```
//!
//! `examples/counter.rs` is a small application: many tasks incrementing
//! one counter through compare-and-swap.
//!
//! # Guarantees
//!
//! - Keys and values are checked against [`kv_api::Limits`] before anything
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
mod error;
mod escape;
mod failover;
mod pool;
mod seq;

pub use client::{CasOutcome, Client, ClientBuilder, DEFAULT_TIMEOUT, MAX_TIMEOUT};
pub use error::{Error, Result};
pub use escape::escape_bytes;
pub use kv_api::tls::{Role, TlsFiles};
