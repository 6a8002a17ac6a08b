//! Outgoing calls to peers: one lazily dialled tarpc connection per peer,
//! redialled with backoff after it breaks (a tarpc client never reconnects by
//! itself), and a deadline on every call. Sending never blocks the caller:
//! each message is its own task, so a dead or slow peer costs only its
//! deadline and never delays the others.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kv_api::{GetResponse, KvError, ReplicaId, WriteOutcome, WriteRequest};
use kv_peer_api::{PeerClient, SnapshotChunk, SnapshotRequest};
use tarpc::client::RpcError;
use tarpc::context;
use tarpc::tokio_serde::formats::Bincode;
use tokio::sync::{mpsc, Mutex};

use crate::faults::{Fate, Faults};
use crate::node::Input;
use crate::paxos::Msg;

const MIN_BACKOFF: Duration = Duration::from_millis(20);
const MAX_BACKOFF: Duration = Duration::from_millis(500);

struct Conn {
    client: PeerClient,
    broken: Arc<AtomicBool>,
}

struct PeerSlot {
    addr: String,
    state: Mutex<SlotState>,
}

struct SlotState {
    conn: Option<Conn>,
    retry_at: Option<Instant>,
    backoff: Duration,
}

/// Connections to every other replica.
pub struct PeerPool {
    me: ReplicaId,
    peers: HashMap<ReplicaId, PeerSlot>,
    timeout: Duration,
    faults: Arc<Faults>,
}

impl PeerPool {
    /// A pool for replica `me` to reach `(id, peer_addr)` pairs; `timeout`
    /// bounds each call; `faults` decides which calls are dropped or delayed.
    pub fn new(
        me: ReplicaId,
        peers: impl IntoIterator<Item = (ReplicaId, String)>,
        timeout: Duration,
        faults: Arc<Faults>,
    ) -> PeerPool {
        PeerPool {
            me,
            faults,
            peers: peers
                .into_iter()
                .map(|(id, addr)| {
                    (
                        id,
                        PeerSlot {
                            addr,
                            state: Mutex::new(SlotState {
                                conn: None,
                                retry_at: None,
                                backoff: MIN_BACKOFF,
                            }),
                        },
                    )
                })
                .collect(),
            timeout,
        }
    }

    /// A connected client for `id`, dialling if needed; `None` while the
    /// peer is unreachable (then retried after a backoff).
    async fn client(&self, id: ReplicaId) -> Option<(PeerClient, Arc<AtomicBool>)> {
        let slot = self.peers.get(&id)?;
        let mut st = slot.state.lock().await;
        if let Some(c) = &st.conn {
            if !c.broken.load(Ordering::Relaxed) {
                return Some((c.client.clone(), c.broken.clone()));
            }
            tracing::debug!(peer = id, "connection broke; will redial");
            st.conn = None;
        }
        if st.retry_at.is_some_and(|t| Instant::now() < t) {
            return None;
        }
        let dial = async {
            let mut transport = tarpc::serde_transport::tcp::connect(&slot.addr, Bincode::default);
            transport.config_mut().max_frame_length(kv_api::MAX_FRAME);
            let transport = transport.await?;
            // Small request/response messages: Nagle's algorithm against
            // delayed ACKs would hold them ~40 ms.
            transport.get_ref().set_nodelay(true)?;
            Ok::<_, std::io::Error>(transport)
        };
        match tokio::time::timeout(self.timeout, dial).await {
            Ok(Ok(transport)) => {
                let client = PeerClient::new(tarpc::client::Config::default(), transport).spawn();
                let broken = Arc::new(AtomicBool::new(false));
                st.conn = Some(Conn {
                    client: client.clone(),
                    broken: broken.clone(),
                });
                st.retry_at = None;
                st.backoff = MIN_BACKOFF;
                tracing::debug!(peer = id, addr = %slot.addr, "connected to peer");
                Some((client, broken))
            }
            failure => {
                let why = match failure {
                    Ok(Err(e)) => e.to_string(),
                    _ => "connect timed out".to_string(),
                };
                tracing::debug!(peer = id, addr = %slot.addr, %why, "cannot reach peer");
                st.retry_at = Some(Instant::now() + st.backoff);
                st.backoff = (st.backoff * 2).min(MAX_BACKOFF);
                None
            }
        }
    }

    /// Applies failure injection to one call due by `deadline`: `false`
    /// means the call must not be made (dropped, or held to its deadline).
    async fn inject(&self, to: ReplicaId, deadline: Instant) -> bool {
        match self.faults.fate(to) {
            Fate::Send(d) => {
                if !d.is_zero() {
                    tokio::time::sleep(d).await;
                }
                true
            }
            Fate::Drop => false,
            Fate::Timeout => {
                tokio::time::sleep_until(deadline.into()).await;
                false
            }
        }
    }

    fn ctx(&self, deadline: Instant) -> context::Context {
        let mut ctx = context::current();
        ctx.deadline = deadline;
        ctx
    }

    /// Sends a consensus message to `to` in the background; its reply, if
    /// one comes before the deadline, is fed back through `inputs`.
    pub fn send(self: &Arc<Self>, to: ReplicaId, msg: Msg, inputs: mpsc::Sender<Input>) {
        let pool = self.clone();
        tokio::spawn(async move {
            let deadline = Instant::now() + pool.timeout;
            if !pool.inject(to, deadline).await {
                return;
            }
            let Some((c, broken)) = pool.client(to).await else {
                return;
            };
            let ctx = pool.ctx(deadline);
            let reply = match msg {
                Msg::Prepare(m) => c.prepare(ctx, m).await.map(Msg::Promise),
                Msg::Accept(m) => c.accept(ctx, m).await.map(Msg::Accepted),
                Msg::Heartbeat(m) => c.heartbeat(ctx, m).await.map(Msg::HeartbeatAck),
                Msg::Fetch(m) => c.fetch(ctx, m).await.map(Msg::FetchReply),
                Msg::Probe(m) => c.probe(ctx, m).await.map(Msg::ProbeReply),
                other => {
                    tracing::error!(?other, "a reply message cannot be sent as a request");
                    return;
                }
            };
            match reply {
                Ok(msg) => {
                    let _ = inputs.send(Input::Peer { msg, reply: None }).await;
                }
                Err(e) => note_failure(&broken, to, e),
            }
        });
    }

    /// Forwards a client write to the leader `to`, within `deadline`.
    pub async fn forward_write(
        &self,
        to: ReplicaId,
        deadline: Instant,
        req: WriteRequest,
    ) -> Result<WriteOutcome, KvError> {
        if !self.inject(to, deadline).await {
            return Err(injected_timeout(to));
        }
        let (c, broken) = self.client(to).await.ok_or_else(|| unreachable(to))?;
        c.forward_write(self.ctx(deadline), self.me, req)
            .await
            .unwrap_or_else(|e| Err(rpc_failure(&broken, to, e)))
    }

    /// Forwards a linearizable read to the leader `to`, within `deadline`.
    pub async fn forward_get(
        &self,
        to: ReplicaId,
        deadline: Instant,
        key: Vec<u8>,
    ) -> Result<GetResponse, KvError> {
        if !self.inject(to, deadline).await {
            return Err(injected_timeout(to));
        }
        let (c, broken) = self.client(to).await.ok_or_else(|| unreachable(to))?;
        c.forward_get(self.ctx(deadline), self.me, key)
            .await
            .unwrap_or_else(|e| Err(rpc_failure(&broken, to, e)))
    }
}

impl PeerPool {
    /// Asks `to` for a piece of a snapshot.
    pub async fn snapshot_chunk(
        &self,
        to: ReplicaId,
        req: SnapshotRequest,
    ) -> Result<SnapshotChunk, String> {
        // A chunk is at most a few MiB: allow more than a consensus message.
        let deadline = Instant::now() + self.timeout * 10;
        if !self.inject(to, deadline).await {
            return Err(format!(
                "snapshot chunk from replica {to}: no answer (injected fault)"
            ));
        }
        let (c, broken) = self
            .client(to)
            .await
            .ok_or_else(|| format!("replica {to} is unreachable"))?;
        let ctx = self.ctx(deadline);
        match c.snapshot_chunk(ctx, req).await {
            Ok(r) => r,
            Err(e) => {
                let msg = format!("snapshot chunk from replica {to}: {e}");
                note_failure(&broken, to, e);
                Err(msg)
            }
        }
    }
}

fn injected_timeout(to: ReplicaId) -> KvError {
    KvError::Timeout(format!(
        "no answer from the leader (replica {to}) in time; a write's outcome is unknown"
    ))
}

fn unreachable(to: ReplicaId) -> KvError {
    KvError::Unavailable(format!(
        "the leader (replica {to}) is unreachable from this replica; retry or try another replica"
    ))
}

fn note_failure(broken: &AtomicBool, to: ReplicaId, e: RpcError) {
    match e {
        RpcError::DeadlineExceeded | RpcError::Server(_) => {}
        other => {
            tracing::debug!(peer = to, error = %other, "peer call failed");
            broken.store(true, Ordering::Relaxed);
        }
    }
}

fn rpc_failure(broken: &AtomicBool, to: ReplicaId, e: RpcError) -> KvError {
    let timed_out = matches!(e, RpcError::DeadlineExceeded);
    note_failure(broken, to, e);
    if timed_out {
        KvError::Timeout(format!(
            "the leader (replica {to}) did not answer in time; a write's outcome is unknown"
        ))
    } else {
        unreachable(to)
    }
}
