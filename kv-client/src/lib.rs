//! The kvpaxos client SDK: a [`Client`] that reads and writes a replicated
//! key-value store, finding the leader, failing over between replicas and
//! retrying writes safely. The `kv-client` binary is a thin command-line
//! front end over it (see [`cli`]).
//!
//! ```no_run
//! # async fn demo() -> Result<(), kv_client::Error> {
//! let replicas = kv_api::replicas::Replicas::load("replica").expect("replica file");
//! let client = kv_client::Client::builder().replicas(replicas).build()?;
//! client.put("greeting", "hello").await?;
//! assert_eq!(client.get("greeting").await?, Some(b"hello".to_vec()));
//! # Ok(()) }
//! ```
//!
//! # Guarantees
//!
//! - Keys and values are checked against [`kv_api::Limits`] before anything
//!   is sent ([`Error::InvalidArgument`]).
//! - Every write carries the client id and a sequence number unique to this
//!   client; a retry (after a timeout, a dropped connection, or on another
//!   replica) reuses the same number, so the cluster applies it at most once.
//! - Each operation has an overall budget (default 5 s). When it runs out the
//!   error is [`Error::Unavailable`] if no replica ever accepted a connection,
//!   otherwise [`Error::Timeout`]; for a write both mean "outcome unknown".
//!
//! # Layout
//!
//! - [`client`](Client) — `Client`, `ClientBuilder`, `CasOutcome`: the API.
//! - `failover` — the retry policy (replica order, hints, backoff, budget).
//! - `pool` — one cached tarpc connection per address, redialled on failure.
//! - `seq` — sequence numbers and the `acked_below` watermark.
//! - [`escape`](escape_bytes) — showing byte strings as text.
//! - [`cli`] — the `kv-client` command line.
#![deny(missing_docs)]

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
