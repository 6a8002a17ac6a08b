//! Outgoing calls to peers: one lazily dialled tarpc connection per peer,
//! redialled with backoff after it breaks (a tarpc client never reconnects by
//! itself), and a deadline on every call. Sending never blocks the caller:
//! each message is its own task, so a dead or slow peer costs only its
//! deadline and never delays the others.
//!
//! Those tasks are capped per peer ([`MAX_OUTGOING_PER_PEER`]): a peer that
//! is slow, paused, or behind an injected delay cannot make a replica pile
//! up sleeping tasks. A message over the cap is dropped and counted, which
//! Paxos takes as a lost message (a leader retransmits unanswered accepts
//! and heartbeats come again; a follower fetches again).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kv_api::{GetResponse, KvError, ReplicaId, WriteOutcome, WriteRequest};
use kv_peer_api::{PeerClient, SnapshotChunk, SnapshotRequest};
use tarpc::client::RpcError;
use tarpc::context;
use tokio::sync::{mpsc, Mutex};

use crate::faults::{Fate, Faults};
use crate::inbox::Input;
use crate::net;
use crate::paxos::Msg;

/// Consensus messages to one peer in flight at once: delayed by failure
/// injection, waiting for a connection, or awaiting the answer. In steady
/// state a leader has a few accepts (at most `max_inflight` slots, plus
/// retransmissions) and a heartbeat or two in flight per peer; a paused peer
/// holds each until its deadline (the peer timeout), i.e. about ten
/// heartbeats' worth. The cap leaves an order of magnitude over that.
pub const MAX_OUTGOING_PER_PEER: usize = 256;

const MIN_BACKOFF: Duration = Duration::from_millis(20);
const MAX_BACKOFF: Duration = Duration::from_millis(500);

struct Conn {
    client: PeerClient,
    broken: Arc<AtomicBool>,
}

struct PeerSlot {
    addr: String,
    state: Mutex<SlotState>,
    /// Messages to this peer in flight (tasks of `send`).
    outgoing: Arc<AtomicUsize>,
}

impl PeerSlot {
    fn new(addr: String) -> Arc<PeerSlot> {
        Arc::new(PeerSlot {
            addr,
            state: Mutex::new(SlotState {
                conn: None,
                retry_at: None,
                backoff: MIN_BACKOFF,
            }),
            outgoing: Arc::new(AtomicUsize::new(0)),
        })
    }
}

/// One message's place under [`MAX_OUTGOING_PER_PEER`], given back when
/// its task ends, however it ends.
struct OutgoingSlot(Arc<AtomicUsize>);

impl Drop for OutgoingSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

struct SlotState {
    conn: Option<Conn>,
    retry_at: Option<Instant>,
    backoff: Duration,
}

/// Connections to every other replica.
pub struct PeerPool {
    me: ReplicaId,
    /// The other members and their addresses: the configuration changes
    /// ([`PeerPool::set_members`]), so the table does too. Held only to
    /// look a slot up, never across an await.
    peers: std::sync::RwLock<HashMap<ReplicaId, Arc<PeerSlot>>>,
    /// Every replica ever a member as far as this one knows, itself
    /// included: whose certificates the peer port accepts.
    known: std::sync::RwLock<std::collections::BTreeSet<ReplicaId>>,
    timeout: Duration,
    faults: Arc<Faults>,
    /// Messages dropped because their peer had [`MAX_OUTGOING_PER_PEER`]
    /// in flight.
    shed: AtomicU64,
    shed_log: net::Throttle,
    /// TLS to the peers, each verified as `replica-ID` (`None`: plain).
    tls: Option<Arc<rustls::ClientConfig>>,
    /// Dials that failed for a TLS reason (a peer with a wrong certificate).
    tls_log: net::Throttle,
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
        let peers: HashMap<ReplicaId, Arc<PeerSlot>> = peers
            .into_iter()
            .map(|(id, addr)| (id, PeerSlot::new(addr)))
            .collect();
        let known = peers.keys().copied().chain([me]).collect();
        PeerPool {
            me,
            faults,
            peers: std::sync::RwLock::new(peers),
            known: std::sync::RwLock::new(known),
            timeout,
            shed: AtomicU64::new(0),
            shed_log: net::Throttle::new(),
            tls: None,
            tls_log: net::Throttle::new(),
        }
    }

    /// Every replica ever a member as far as this one knows.
    pub fn known_ids(&self) -> Vec<ReplicaId> {
        let known = self.known.read().unwrap_or_else(|e| e.into_inner());
        known.iter().copied().collect()
    }

    fn slot(&self, id: ReplicaId) -> Option<Arc<PeerSlot>> {
        let peers = self.peers.read().unwrap_or_else(|e| e.into_inner());
        peers.get(&id).cloned()
    }

    /// The configuration changed: talk to its members (this replica
    /// aside) at its addresses. A member whose address changed is dialled
    /// anew; connections to replicas no longer members are dropped.
    pub fn set_members(&self, members: &kv_api::membership::Membership) {
        self.known
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .extend(members.members.iter().map(|m| m.id));
        let mut peers = self.peers.write().unwrap_or_else(|e| e.into_inner());
        peers.retain(|id, slot| {
            members
                .get(*id)
                .is_some_and(|m| m.peer_addr == slot.addr || m.peer_addr.is_empty())
        });
        for m in &members.members {
            if m.id != self.me && !m.peer_addr.is_empty() && !peers.contains_key(&m.id) {
                tracing::info!(peer = m.id, addr = %m.peer_addr, "a new peer");
                peers.insert(m.id, PeerSlot::new(m.peer_addr.clone()));
            }
        }
    }

    /// Dials the peers over TLS with `config`, verifying each one's
    /// certificate names it (`replica-ID`): a replica also checks whom it
    /// dialled, not only who dials it.
    pub fn with_tls(mut self, config: Option<Arc<rustls::ClientConfig>>) -> PeerPool {
        self.tls = config;
        self
    }

    /// A place for one more message to `to`, unless it has
    /// [`MAX_OUTGOING_PER_PEER`] in flight (then the message is counted as
    /// shed).
    fn outgoing_slot(&self, to: ReplicaId) -> Option<OutgoingSlot> {
        let slot = self.slot(to)?;
        let taken = slot
            .outgoing
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                (n < MAX_OUTGOING_PER_PEER).then_some(n + 1)
            });
        if taken.is_ok() {
            return Some(OutgoingSlot(slot.outgoing.clone()));
        }
        let shed = self.shed.fetch_add(1, Ordering::Relaxed) + 1;
        crate::metrics::global().peer_error(to, "shed");
        if let Some(more) = self.shed_log.allow() {
            tracing::warn!(
                peer = to,
                limit = MAX_OUTGOING_PER_PEER,
                shed_total = shed,
                also_since_last_warning = more,
                "dropping a message to a peer that has too many in flight (slow, paused or delayed)"
            );
        }
        None
    }

    /// Messages dropped so far at [`MAX_OUTGOING_PER_PEER`].
    #[cfg(test)]
    pub fn shed(&self) -> u64 {
        self.shed.load(Ordering::Relaxed)
    }

    /// A connected client for `id`, dialling if needed; `None` while the
    /// peer is unreachable (then retried after a backoff).
    async fn client(&self, id: ReplicaId) -> Option<(PeerClient, Arc<AtomicBool>)> {
        let slot = self.slot(id)?;
        let mut st = slot.state.lock().await;
        if let Some(c) = &st.conn {
            if !c.broken.load(Ordering::Relaxed) {
                return Some((c.client.clone(), c.broken.clone()));
            }
            tracing::debug!(peer = id, "connection broke; will redial");
            st.conn = None;
        }
        if st.retry_at.is_some_and(|t| Instant::now() < t) {
            crate::metrics::global().peer_error(id, "unreachable");
            return None;
        }
        // The transport sets `broken` itself when the connection ends (the
        // peer may close it when idle), so a dead one is redialled before
        // a message is lost to it.
        let broken = Arc::new(AtomicBool::new(false));
        let tls = self
            .tls
            .as_ref()
            .map(|config| (config.clone(), kv_api::tls::replica_server_name(id)));
        match net::dial(&slot.addr, self.timeout, broken.clone(), tls).await {
            Ok(transport) => {
                let client = PeerClient::new(tarpc::client::Config::default(), transport).spawn();
                st.conn = Some(Conn {
                    client: client.clone(),
                    broken: broken.clone(),
                });
                st.retry_at = None;
                st.backoff = MIN_BACKOFF;
                tracing::debug!(peer = id, addr = %slot.addr, "connected to peer");
                Some((client, broken))
            }
            Err(why) => {
                // rustls reports a certificate it refuses as InvalidData:
                // a misconfiguration worth a warning, not a peer that is down.
                if why.kind() == std::io::ErrorKind::InvalidData {
                    if let Some(more) = self.tls_log.allow() {
                        tracing::warn!(
                            peer = id,
                            addr = %slot.addr,
                            %why,
                            also_since_last_warning = more,
                            "TLS with a peer failed (does its certificate name replica-{id}, \
                             signed by our CA?)"
                        );
                    }
                } else {
                    tracing::debug!(peer = id, addr = %slot.addr, %why, "cannot reach peer");
                }
                crate::metrics::global().peer_error(id, "unreachable");
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
        let Some(place) = self.outgoing_slot(to) else {
            return;
        };
        let pool = self.clone();
        tokio::spawn(async move {
            let _place = place;
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

    /// Forwards a linearizable range read to the leader `to`, within
    /// `deadline`.
    pub async fn forward_range(
        &self,
        to: ReplicaId,
        deadline: Instant,
        req: kv_peer_api::RangeRequest,
    ) -> Result<kv_peer_api::RangeResponse, KvError> {
        if !self.inject(to, deadline).await {
            return Err(injected_timeout(to));
        }
        let (c, broken) = self.client(to).await.ok_or_else(|| unreachable(to))?;
        c.forward_range(self.ctx(deadline), self.me, req)
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
    let kind = match e {
        RpcError::DeadlineExceeded => "timeout",
        _ => "error",
    };
    crate::metrics::global().peer_error(to, kind);
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

#[cfg(test)]
mod tests {
    use super::*;
    use kv_api::FaultSpec;
    use kv_peer_api::{Ballot, Heartbeat};

    impl PeerPool {
        fn outgoing(&self, to: ReplicaId) -> usize {
            self.slot(to).unwrap().outgoing.load(Ordering::Relaxed)
        }
    }

    /// An address nothing listens on (bound, then released).
    fn dead_addr() -> String {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().to_string()
    }

    #[tokio::test]
    async fn messages_over_the_per_peer_cap_are_shed_and_places_come_back() {
        // Every message sleeps in an injected delay first, as a message to
        // a slow peer would wait for its answer.
        let delay = FaultSpec {
            delay_ms: Some((300, 300)),
            ..Default::default()
        };
        let faults = Arc::new(Faults::new(&delay, 1));
        let pool = Arc::new(PeerPool::new(
            1,
            [(2, dead_addr()), (3, dead_addr())],
            Duration::from_millis(200),
            faults,
        ));
        let (tx, _rx) = mpsc::channel(16);
        let hb = Msg::Heartbeat(Heartbeat {
            from: 1,
            ballot: Ballot { round: 1, id: 1 },
            chosen: 0,
            round: 0,
            term_start: 0,
        });
        for _ in 0..MAX_OUTGOING_PER_PEER + 10 {
            pool.send(2, hb.clone(), tx.clone());
        }
        assert_eq!(pool.outgoing(2), MAX_OUTGOING_PER_PEER);
        assert_eq!(pool.shed(), 10);
        // Another peer has its own places.
        pool.send(3, hb.clone(), tx.clone());
        assert_eq!(pool.outgoing(3), 1);
        assert_eq!(pool.shed(), 10);

        // Each task gives its place back when it ends (here: the delay
        // passes, the peer refuses the connection).
        tokio::time::timeout(Duration::from_secs(10), async {
            while pool.outgoing(2) + pool.outgoing(3) > 0 {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await
        .expect("every message task ended and gave its place back");
        pool.send(2, hb, tx);
        assert_eq!(pool.outgoing(2), 1);
        assert_eq!(pool.shed(), 10);
    }
}
