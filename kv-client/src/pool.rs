//! One cached tarpc connection per replica address, redialled on demand.
//!
//! A tarpc client never reconnects: once its connection drops, every call
//! fails. So a connection that failed a call is forgotten and the next
//! attempt at that address dials again. The failover loop's backoff paces
//! the redials.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::Instant;

use std::sync::Arc;

use kv_api::KvClient;
use tarpc::tokio_serde::formats::Bincode;
use tarpc::tokio_util::codec::LengthDelimitedCodec;

/// A connection and the generation number it was stored under, so that a
/// failure on an old connection does not evict a newer one.
#[derive(Clone)]
pub(crate) struct Conn {
    pub(crate) client: KvClient,
    generation: u64,
}

/// The cache. Dials happen outside the lock; two tasks may dial the same
/// address at once, and the first to finish wins.
#[derive(Default)]
pub(crate) struct Pool {
    // A std Mutex: held only to look up or store, never across an await.
    conns: Mutex<HashMap<String, Conn>>,
    generation: AtomicU64,
    /// TLS to every replica, each verified by the host it is dialled at
    /// (`None`: plain TCP).
    tls: Option<Arc<rustls::ClientConfig>>,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let n = self
            .conns
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len();
        f.debug_struct("Pool").field("connections", &n).finish()
    }
}

impl Pool {
    /// A pool dialling with TLS if `tls` is given.
    pub(crate) fn new(tls: Option<Arc<rustls::ClientConfig>>) -> Pool {
        Pool {
            tls,
            ..Pool::default()
        }
    }

    /// The cached connection to `addr`, or a new one dialled before
    /// `deadline` (a frozen server may accept TCP and never answer, and a
    /// black-holed address may never refuse, so the dial is bounded too).
    pub(crate) async fn get(&self, addr: &str, deadline: Instant) -> Result<Conn, String> {
        if let Some(c) = self.lock().get(addr) {
            return Ok(c.clone());
        }
        let dialled = dial(addr, self.tls.clone());
        let client = match tokio::time::timeout_at(deadline.into(), dialled).await {
            Ok(r) => r?,
            Err(_) => return Err("timed out connecting".to_string()),
        };
        let generation = self.generation.fetch_add(1, Ordering::Relaxed);
        let mut conns = self.lock();
        let c = conns
            .entry(addr.to_string())
            .or_insert(Conn { client, generation });
        Ok(c.clone())
    }

    /// Whether this pool dials with TLS.
    pub(crate) fn tls(&self) -> bool {
        self.tls.is_some()
    }

    /// Forgets `conn` (if it is still the cached one for `addr`).
    pub(crate) fn evict(&self, addr: &str, conn: &Conn) {
        let mut conns = self.lock();
        if conns.get(addr).map(|c| c.generation) == Some(conn.generation) {
            conns.remove(addr);
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Conn>> {
        self.conns.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Opens a connection exactly as the server expects it: tarpc over TCP
/// (over TLS if `tls` is given, the server verified by the host of `addr`)
/// with bincode and frames up to [`kv_api::MAX_FRAME`].
async fn dial(addr: &str, tls: Option<Arc<rustls::ClientConfig>>) -> Result<KvClient, String> {
    let tls = match tls {
        None => None,
        Some(config) => {
            let name = kv_api::tls::server_name_of(addr).map_err(|e| e.to_string())?;
            Some((config, name))
        }
    };
    let secure = tls.is_some();
    let stream = kv_api::tls::dial(addr, tls).await.map_err(|e| {
        // rustls reports what it refused as InvalidData.
        if secure && e.kind() == std::io::ErrorKind::InvalidData {
            format!("TLS: {e}")
        } else {
            e.to_string()
        }
    })?;
    let framed = LengthDelimitedCodec::builder()
        .max_frame_length(kv_api::MAX_FRAME)
        .new_framed(stream);
    let transport = tarpc::serde_transport::new(framed, Bincode::default());
    Ok(KvClient::new(tarpc::client::Config::default(), transport).spawn())
}
