//! The Redis door (`kv-server --redis-addr ADDR`): RESP2 on a third port,
//! so that `redis-cli`, `redis-benchmark` and any language's Redis client
//! read and write the replicated map.
//!
//! # Layout
//!
//! - [`resp`] — request framing (bounded) and reply encoding.
//! - `conn` — one connection: its session, `MULTI` queue, watches, cursors.
//! - `cmd` — the commands, each on a transaction overlay (`Tx`).
//! - `glob` — Redis's glob patterns (`KEYS`, `SCAN MATCH`, `CONFIG GET`).
//!
//! # Semantics
//!
//! Every command goes through [`crate::rpc::Handler`]'s client paths, as
//! the tarpc `Kv` service's do: the same authorization (the role of the
//! TLS client certificate), the same forwarding from a follower to the
//! leader (Redis clients follow no custom redirects), the same metrics.
//! Reads are linearizable; a command over several keys reads them at one
//! revision. A command that reads before it writes (`INCR`, `APPEND`,
//! `SET … NX`, `EXPIRE`, …) and a whole `MULTI`/`EXEC` are one
//! transaction ([`kv_api::Txn`]) whose comparisons are the revisions it
//! read (and those `WATCH` recorded): it applies only if nothing it read
//! changed, else it is computed again from a fresh read (or, if a watched
//! key changed, `EXEC` answers the nil array). It is linearizable at its
//! place in the log.
//!
//! Each connection opens a session on its first write; the writes carry
//! its sequence numbers, and when an attempt's outcome is unknown (a
//! leader change, a timeout) it is retried with the same number, which the
//! state machine applies at most once: an `INCR` that this door retries
//! cannot count twice. A client's own retry after a broken connection is a
//! new command on a new session, as with Redis itself.
//!
//! Expiry (`SET … EX`, `EXPIRE`) attaches the key to a lease of the data
//! model: expiry is decided through the log by the log's clock. Leases are
//! at least one second: shorter TTLs are rounded up to it. `TTL` counts
//! from the lease's end on this replica's clock.
//!
//! # Limits
//!
//! Keys and values as on the client port ([`kv_api::Limits`]); a request's
//! declared lengths are checked before its bytes are read
//! ([`resp::FrameLimits`]); at most [`MAX_CONNECTIONS`] connections; a
//! `MULTI` queue of at most [`MAX_MULTI`] commands; replies are written
//! once [`REPLY_FLUSH`] bytes wait, and the next request is read only when
//! the ones read are answered, so a pipelining client is held back by TCP
//! rather than by memory here.

mod cmd;
mod conn;
mod glob;
pub mod resp;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use crate::rpc::{Caller, Handler};

/// Connections served at once; more are answered
/// `-ERR max number of clients reached` and closed, as Redis does.
pub const MAX_CONNECTIONS: usize = 1024;
/// Most commands a `MULTI` queues (the transaction's bound on writes).
pub const MAX_MULTI: usize = kv_api::MAX_TXN_OPS;
/// Most keys one connection watches.
pub const MAX_WATCHED: usize = 64;
/// Most arguments in one request (an `MSET` of [`kv_api::MAX_TXN_OPS`]
/// pairs fits).
pub const MAX_ARGS: usize = 1024;
/// Longest inline request (Redis's own limit).
pub const MAX_INLINE: usize = 64 * 1024;
/// Replies are written once this many bytes wait (and whenever no further
/// complete request has been read).
pub const REPLY_FLUSH: usize = 64 * 1024;
/// How long one command keeps retrying through leader changes before it
/// answers an error.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(10);
/// A TLS handshake must finish within this.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves RESP on `listener` until the task is aborted.
pub async fn serve(
    listener: TcpListener,
    tls: Option<Arc<rustls::ServerConfig>>,
    handler: Handler,
) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let (mut tcp, from) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                tracing::debug!(id = handler.id(), error = %e, "redis listener: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tokio::spawn(async move {
                let _ = tcp
                    .write_all(b"-ERR max number of clients reached\r\n")
                    .await;
            });
            continue;
        };
        let handler = handler.clone();
        let tls = tls.clone();
        tokio::spawn(async move {
            let _slot = slot;
            if let Err(e) = connection(tcp, from, tls, handler).await {
                tracing::debug!(%from, error = %e, "redis connection ended");
            }
        });
    }
}

async fn connection(
    tcp: tokio::net::TcpStream,
    from: SocketAddr,
    tls: Option<Arc<rustls::ServerConfig>>,
    handler: Handler,
) -> std::io::Result<()> {
    let stream = match tls {
        None => kv_api::tls::Stream::Plain(tcp),
        Some(config) => tokio::time::timeout(HANDSHAKE_TIMEOUT, kv_api::tls::accept(config, tcp))
            .await
            .map_err(|_| std::io::Error::other("TLS handshake timed out"))??,
    };
    // With TLS the client certificate's role decides (as on the client
    // port); without, anyone who reaches the port is trusted.
    let caller = match &stream {
        kv_api::tls::Stream::Plain(_) => Caller::Trusted,
        s => Caller::Client(s.peer_cert().and_then(|c| kv_api::tls::role_of(&c))),
    };
    conn::Conn::new(handler.for_conn(caller, from), from)
        .run(stream)
        .await
}
