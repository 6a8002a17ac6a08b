//! The two tarpc services a replica serves: `Kv` for clients on its client
//! address and `Peer` for the other replicas on its peer address. Handlers
//! are thin: they hand work to the driver task and await its answer, so a
//! handler dropped at its deadline never interrupts a consensus step or a
//! disk write.
//!
//! # Who may do what
//!
//! Each connection's handler knows its [`Caller`], from the certificate the
//! other side presented on a TLS port (see `kv_api::tls` for the names):
//! - client port: `read` for `get`, `write` for writes, `admin` for
//!   `set_faults`; `status` needs only a certificate the cluster's CA
//!   signed (it shows ids and log positions, no data), so that health
//!   checks can run with the least role. A refusal is
//!   [`KvError::PermissionDenied`], logged once per connection.
//! - peer port: a connection whose certificate names no member
//!   (`replica-N`) is closed at once; every message must say it is `from`
//!   the replica the certificate names, or it is refused (answered as a
//!   stopping replica answers, which no caller acts on) and logged once per
//!   connection.
//!
//! Without TLS every caller is [`Caller::Trusted`]: anyone who reaches a
//! port may do anything, which is why a replica refuses to bind a
//! non-loopback address without TLS unless told `--insecure`.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use kv_api::tls::Role;
use kv_api::{
    BackupChunk, BackupInfo, FaultReport, FaultSpec, GetResponse, Kv, KvError, Limits, Op,
    RangeRequest, RangeResponse, ReadMode, ReplicaId, ReplicaStatus, Route, WatchRequest,
    WatchResponse, WriteOutcome, WriteRequest, MAX_WATCH_WAIT_MS,
};
use kv_peer_api::{
    Accept, Accepted, Ballot, Fetch, FetchReply, Heartbeat, HeartbeatAck, Peer, Prepare, Probe,
    ProbeReply, Promise, SnapshotChunk, SnapshotRequest,
};
use tarpc::context::Context;
use tarpc::server::Channel;
use tokio::sync::{mpsc, oneshot};

use crate::faults::Faults;
use crate::inbox::Input;
use crate::net::{Listener, NetLimits, Port};
use crate::paxos::Msg;
use crate::peers::PeerPool;
use crate::snapshot::{SnapshotDir, MAX_SNAPSHOT_CHUNK};
use crate::Result;

/// Who is on the other end of a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Caller {
    /// A port without TLS: anyone, allowed everything.
    Trusted,
    /// A client certificate granting this role (`None`: it names none).
    Client(Option<Role>),
    /// A certificate naming this replica.
    Replica(ReplicaId),
}

/// One connection's caller, and whether a refusal on it was logged yet.
struct Connection {
    caller: Caller,
    from: SocketAddr,
    refusal_logged: AtomicBool,
}

/// What both handlers share.
#[derive(Clone)]
pub struct Handler {
    id: ReplicaId,
    inputs: mpsc::Sender<Input>,
    pool: Arc<PeerPool>,
    limits: Limits,
    snapshots: SnapshotDir,
    faults: Arc<Faults>,
    /// The connection this handler serves (`None` until [`listen`] gives
    /// it one: only then is it serving anyone).
    conn: Option<Arc<Connection>>,
}

fn stopping() -> KvError {
    KvError::Unavailable("this replica is shutting down; try another".into())
}

impl Handler {
    /// A handler feeding the driver through `inputs`.
    pub fn new(
        id: ReplicaId,
        inputs: mpsc::Sender<Input>,
        pool: Arc<PeerPool>,
        limits: Limits,
        snapshots: SnapshotDir,
        faults: Arc<Faults>,
    ) -> Handler {
        Handler {
            id,
            inputs,
            pool,
            limits,
            snapshots,
            faults,
            conn: None,
        }
    }

    /// This handler for one connection.
    pub(crate) fn for_conn(&self, caller: Caller, from: SocketAddr) -> Handler {
        Handler {
            conn: Some(Arc::new(Connection {
                caller,
                from,
                refusal_logged: AtomicBool::new(false),
            })),
            ..self.clone()
        }
    }

    fn caller(&self) -> Caller {
        self.conn.as_ref().map_or(Caller::Trusted, |c| c.caller)
    }

    /// Logs `why` the first time something is refused on this connection.
    fn log_refusal(&self, why: &str) {
        if let Some(c) = &self.conn {
            if !c.refusal_logged.swap(true, Ordering::Relaxed) {
                tracing::warn!(id = self.id, from = %c.from, caller = ?c.caller, "{why} (logged once per connection)");
            }
        }
    }

    /// Whether this connection's client may do what needs `need`.
    fn allow(&self, need: Role, what: &str) -> std::result::Result<(), KvError> {
        let has = match self.caller() {
            Caller::Trusted => return Ok(()),
            Caller::Client(Some(role)) if role >= need => return Ok(()),
            Caller::Client(Some(role)) => format!("grants only the `{role}` role"),
            Caller::Client(None) => "grants no role".to_string(),
            Caller::Replica(id) => {
                format!("is replica {id}'s, which grants no client role")
            }
        };
        let why = format!("{what} needs the `{need}` role; this client's certificate {has}");
        self.log_refusal(&format!("refused: {why}"));
        Err(KvError::PermissionDenied(why))
    }

    /// Whether a peer message saying it is `from` that replica may be
    /// believed: on a TLS port, only if the certificate names `from`.
    fn peer_may_say(&self, from: ReplicaId) -> bool {
        match self.caller() {
            Caller::Trusted => true,
            Caller::Replica(id) if id == from => true,
            caller => {
                self.log_refusal(&format!(
                    "refused a peer message claiming to come from replica {from}: the \
                     connection's certificate is {caller:?}'s"
                ));
                false
            }
        }
    }

    /// A request from a peer whose link is cut gets no answer at all: the
    /// caller sees what a partition looks like, a deadline passing.
    async fn gate(&self, from: ReplicaId) {
        if self.faults.refuse_from(from) {
            std::future::pending::<()>().await;
        }
    }

    fn set_faults_now(&self, change: FaultSpec) -> std::result::Result<FaultReport, KvError> {
        self.faults.check_change(self.id, &change)?;
        change.validate()?;
        if change != FaultSpec::default() {
            tracing::warn!(
                id = self.id,
                ?change,
                "failure injection changed at run time"
            );
        }
        Ok(self.faults.change(&change))
    }

    async fn ask<T>(&self, make: impl FnOnce(oneshot::Sender<T>) -> Input) -> Option<T> {
        let (tx, rx) = oneshot::channel();
        self.inputs.send(make(tx)).await.ok()?;
        rx.await.ok()
    }

    async fn write_here(&self, req: WriteRequest) -> std::result::Result<WriteOutcome, KvError> {
        self.limits.check_op(&req.op)?;
        self.ask(|reply| Input::Write { req, reply })
            .await
            .unwrap_or_else(|| Err(stopping()))
    }

    async fn get_here(
        &self,
        key: Vec<u8>,
        mode: ReadMode,
    ) -> std::result::Result<GetResponse, KvError> {
        self.limits.check_key(&key)?;
        self.ask(|reply| Input::Get { key, mode, reply })
            .await
            .unwrap_or_else(|| Err(stopping()))
    }

    async fn range_here(
        &self,
        req: RangeRequest,
        mode: ReadMode,
    ) -> std::result::Result<RangeResponse, KvError> {
        req.validate(&self.limits)?;
        req.resume_key(&self.limits)?;
        self.ask(|reply| Input::Range { req, mode, reply })
            .await
            .unwrap_or_else(|| Err(stopping()))
    }

    /// A consensus request from peer `from`: through the fault gate to the
    /// driver, whose answer `unpack` takes out of its `Msg`. A replica that
    /// is stopping answers `refused` (built with `Ballot::ZERO`, which never
    /// makes the caller step down).
    async fn consensus<T>(
        &self,
        from: ReplicaId,
        msg: Msg,
        unpack: fn(Msg) -> Option<T>,
        refused: T,
    ) -> T {
        if !self.peer_may_say(from) {
            return refused;
        }
        self.gate(from).await;
        self.ask(|tx| Input::Peer {
            msg,
            reply: Some(tx),
        })
        .await
        .and_then(unpack)
        .unwrap_or(refused)
    }
}

/// What the RESP listener (`crate::redis`) calls: the same paths as the
/// `Kv` service (authorization, follower forwarding, metrics), with a
/// deadline instead of a tarpc context.
impl Handler {
    /// This replica's id.
    pub(crate) fn id(&self) -> ReplicaId {
        self.id
    }

    /// The key and value limits.
    pub(crate) fn limits(&self) -> Limits {
        self.limits
    }

    /// A write, forwarded to the leader if this replica is not it.
    pub(crate) async fn client_write(
        &self,
        req: WriteRequest,
        deadline: Instant,
    ) -> std::result::Result<WriteOutcome, KvError> {
        Kv::write(self.clone(), ctx_until(deadline), req, Route::Forward).await
    }

    /// A linearizable get, forwarded to the leader if need be.
    pub(crate) async fn client_get(
        &self,
        key: Vec<u8>,
        deadline: Instant,
    ) -> std::result::Result<GetResponse, KvError> {
        Kv::get(
            self.clone(),
            ctx_until(deadline),
            key,
            ReadMode::Linearizable,
            Route::Forward,
        )
        .await
    }

    /// A linearizable range, forwarded to the leader if need be.
    pub(crate) async fn client_range(
        &self,
        req: RangeRequest,
        deadline: Instant,
    ) -> std::result::Result<RangeResponse, KvError> {
        Kv::range(
            self.clone(),
            ctx_until(deadline),
            req,
            ReadMode::Linearizable,
            Route::Forward,
        )
        .await
    }

    /// This replica's status.
    pub(crate) async fn client_status(&self) -> ReplicaStatus {
        Kv::status(self.clone(), tarpc::context::current()).await
    }

    /// Lease `id`'s TTL and the log time it ends at, as this replica's
    /// state machine has it (`None`: it does not know the lease).
    pub(crate) async fn lease_here(&self, id: u64) -> Option<(u64, u64)> {
        self.ask(|reply| Input::Lease { id, reply }).await.flatten()
    }
}

fn ctx_until(deadline: Instant) -> Context {
    let mut ctx = tarpc::context::current();
    ctx.deadline = deadline;
    ctx
}

/// Times one client request into `kvpaxos_client_requests_total` and
/// `kvpaxos_client_request_duration_seconds`. A handler dropped at its
/// deadline (tarpc drops it at any `.await`) is counted as a timeout.
struct Timing {
    op: usize,
    outcome: usize,
    started: std::time::Instant,
}

impl Timing {
    fn start(op: usize) -> Timing {
        Timing {
            op,
            // Until `finish` says otherwise.
            outcome: crate::metrics::error_outcome(&KvError::Timeout(String::new())),
            started: std::time::Instant::now(),
        }
    }

    fn finish<T>(mut self, result: &std::result::Result<T, KvError>, found: bool) {
        self.outcome = match result {
            Ok(_) if found => 0,
            Ok(_) => crate::metrics::NOT_FOUND,
            Err(e) => crate::metrics::error_outcome(e),
        };
    }
}

impl Drop for Timing {
    fn drop(&mut self) {
        crate::metrics::global()
            .client
            .record(self.op, self.outcome, self.started.elapsed());
    }
}

impl Kv for Handler {
    async fn write(
        self,
        ctx: Context,
        req: WriteRequest,
        route: Route,
    ) -> std::result::Result<WriteOutcome, KvError> {
        let timing = Timing::start(crate::metrics::op_kind(&req.op));
        let result = self.write_routed(ctx, req, route).await;
        timing.finish(&result, true);
        result
    }

    async fn get(
        self,
        ctx: Context,
        key: Vec<u8>,
        mode: ReadMode,
        route: Route,
    ) -> std::result::Result<GetResponse, KvError> {
        let timing = Timing::start(match mode {
            ReadMode::Local => crate::metrics::GET_LOCAL,
            _ => crate::metrics::GET,
        });
        let result = self.get_routed(ctx, key, mode, route).await;
        let found = result.as_ref().is_ok_and(|r| r.value.is_some());
        timing.finish(&result, found);
        result
    }

    async fn set_faults(
        self,
        _: Context,
        change: FaultSpec,
    ) -> std::result::Result<FaultReport, KvError> {
        self.allow(Role::Admin, "fault injection")?;
        self.set_faults_now(change)
    }

    async fn backup_begin(self, _: Context) -> std::result::Result<BackupInfo, KvError> {
        self.allow(Role::Admin, "a backup")?;
        let index = self
            .ask(|reply| Input::Backup { reply })
            .await
            .unwrap_or_else(|| Err("this replica is shutting down".into()))
            .map_err(KvError::Unavailable)?;
        // The length and checksum of the file as it is on disk, read off
        // the driver; the client checks what it receives against them.
        let dir = self.snapshots.clone();
        let summed = tokio::task::spawn_blocking(move || dir.file_crc32(index)).await;
        match summed {
            Ok(Ok((len, crc32))) => Ok(BackupInfo { index, len, crc32 }),
            Ok(Err(e)) => Err(KvError::Unavailable(format!("reading the snapshot: {e}"))),
            Err(e) => Err(KvError::Unavailable(format!("reading the snapshot: {e}"))),
        }
    }

    async fn backup_chunk(
        self,
        _: Context,
        index: kv_api::Slot,
        offset: u64,
        max_len: u32,
    ) -> std::result::Result<BackupChunk, KvError> {
        self.allow(Role::Admin, "a backup")?;
        let dir = self.snapshots.clone();
        let max = max_len.clamp(1, kv_api::MAX_BACKUP_CHUNK) as usize;
        let read = tokio::task::spawn_blocking(move || dir.read_chunk(Some(index), offset, max));
        match read.await {
            Ok(Ok((_, _, data))) => Ok(BackupChunk { offset, data }),
            Ok(Err(e)) => Err(KvError::Unavailable(format!(
                "snapshot {index} cannot be read (newer snapshots replace it: start the \
                 backup again): {e}"
            ))),
            Err(e) => Err(KvError::Unavailable(format!("reading the snapshot: {e}"))),
        }
    }

    async fn watch(
        self,
        ctx: Context,
        req: WatchRequest,
    ) -> std::result::Result<WatchResponse, KvError> {
        self.allow(Role::Read, "watching")?;
        req.validate(&self.limits)?;
        // Answer with no events a little before the caller gives up.
        let wait = Duration::from_millis(req.wait_ms.min(MAX_WATCH_WAIT_MS));
        let margin = Duration::from_millis(50);
        let until =
            (Instant::now() + wait).min(ctx.deadline.checked_sub(margin).unwrap_or(ctx.deadline));
        self.ask(|reply| Input::Watch { req, until, reply })
            .await
            .unwrap_or_else(|| Err(stopping()))
    }

    async fn range(
        self,
        ctx: Context,
        req: RangeRequest,
        mode: ReadMode,
        route: Route,
    ) -> std::result::Result<RangeResponse, KvError> {
        self.allow(Role::Read, "reading")?;
        if route == Route::Redirect {
            return self.range_here(req, mode).await;
        }
        match self.range_here(req.clone(), mode).await {
            Err(KvError::NotLeader(Some(hint))) if hint.id != self.id => {
                self.pool.forward_range(hint.id, ctx.deadline, req).await
            }
            other => other,
        }
    }

    async fn status(self, _: Context) -> ReplicaStatus {
        let id = self.id;
        self.ask(|reply| Input::Status { reply })
            .await
            .unwrap_or(ReplicaStatus {
                id,
                standing: "unknown".into(),
                ..ReplicaStatus::default()
            })
    }
}

impl Handler {
    async fn write_routed(
        self,
        ctx: Context,
        req: WriteRequest,
        route: Route,
    ) -> std::result::Result<WriteOutcome, KvError> {
        match req.op {
            Op::Reconfigure { .. } => self.allow(Role::Admin, "changing the cluster's members")?,
            _ => self.allow(Role::Write, "writing")?,
        }
        if route == Route::Redirect {
            return self.write_here(req).await;
        }
        match self.write_here(req.clone()).await {
            Err(KvError::NotLeader(Some(hint))) if hint.id != self.id => {
                self.pool.forward_write(hint.id, ctx.deadline, req).await
            }
            other => other,
        }
    }

    async fn get_routed(
        self,
        ctx: Context,
        key: Vec<u8>,
        mode: ReadMode,
        route: Route,
    ) -> std::result::Result<GetResponse, KvError> {
        self.allow(Role::Read, "reading")?;
        if route == Route::Redirect {
            return self.get_here(key, mode).await;
        }
        match self.get_here(key.clone(), mode).await {
            Err(KvError::NotLeader(Some(hint))) if hint.id != self.id => {
                self.pool.forward_get(hint.id, ctx.deadline, key).await
            }
            other => other,
        }
    }
}

impl Peer for Handler {
    async fn prepare(self, _: Context, req: Prepare) -> Promise {
        let refused = Promise {
            from: self.id,
            ballot: Ballot::ZERO,
            ok: false,
            accepted: vec![],
            chosen: 0,
            pre_vote: req.pre_vote,
            more: false,
        };
        let unpack = |m| match m {
            Msg::Promise(p) => Some(p),
            _ => None,
        };
        self.consensus(req.from, Msg::Prepare(req), unpack, refused)
            .await
    }

    async fn probe(self, _: Context, req: Probe) -> ProbeReply {
        // Refused while stopping: not a voter, and with history, so that
        // the asker concludes nothing from it (neither that the cluster is
        // new nor a floor to rejoin at).
        let refused = ProbeReply {
            from: self.id,
            voter: false,
            history: true,
            max_round: 0,
        };
        let unpack = |m| match m {
            Msg::ProbeReply(r) => Some(r),
            _ => None,
        };
        self.consensus(req.from, Msg::Probe(req), unpack, refused)
            .await
    }

    async fn accept(self, _: Context, req: Accept) -> Accepted {
        let refused = Accepted {
            from: self.id,
            ballot: Ballot::ZERO,
            ok: false,
            slots: vec![],
        };
        let unpack = |m| match m {
            Msg::Accepted(a) => Some(a),
            _ => None,
        };
        self.consensus(req.from, Msg::Accept(req), unpack, refused)
            .await
    }

    async fn heartbeat(self, _: Context, req: Heartbeat) -> HeartbeatAck {
        let refused = HeartbeatAck {
            from: self.id,
            ballot: Ballot::ZERO,
            ok: false,
            round: req.round,
            chosen: 0,
            rejoin_floor: None,
            unsure: false,
        };
        let unpack = |m| match m {
            Msg::HeartbeatAck(a) => Some(a),
            _ => None,
        };
        self.consensus(req.from, Msg::Heartbeat(req), unpack, refused)
            .await
    }

    async fn fetch(self, _: Context, req: Fetch) -> FetchReply {
        let refused = FetchReply {
            from: self.id,
            entries: vec![],
            chosen: 0,
            compacted: 0,
        };
        let unpack = |m| match m {
            Msg::FetchReply(r) => Some(r),
            _ => None,
        };
        self.consensus(req.from, Msg::Fetch(req), unpack, refused)
            .await
    }

    async fn snapshot_chunk(
        self,
        _: Context,
        req: SnapshotRequest,
    ) -> std::result::Result<SnapshotChunk, String> {
        if !self.peer_may_say(req.from) {
            return Err("refused: the connection's certificate does not name this sender".into());
        }
        self.gate(req.from).await;
        // Served from the file, off the driver: a transfer never stalls
        // consensus, and memory stays at one chunk.
        let dir = self.snapshots.clone();
        let max = req.max_len.clamp(1, MAX_SNAPSHOT_CHUNK) as usize;
        let read = tokio::task::spawn_blocking(move || dir.read_chunk(req.index, req.offset, max));
        match read.await {
            Ok(Ok((index, total_len, data))) => {
                crate::metrics::global().snapshot_chunks_served.inc();
                Ok(SnapshotChunk {
                    index,
                    total_len,
                    offset: req.offset,
                    data,
                })
            }
            Ok(Err(e)) => Err(e.to_string()),
            Err(e) => Err(format!("reading the snapshot failed: {e}")),
        }
    }

    async fn forward_write(
        self,
        _: Context,
        from: ReplicaId,
        req: WriteRequest,
    ) -> std::result::Result<WriteOutcome, KvError> {
        if !self.peer_may_say(from) {
            return Err(KvError::PermissionDenied(
                "the connection's certificate does not name this sender".into(),
            ));
        }
        self.gate(from).await;
        self.write_here(req).await
    }

    async fn forward_get(
        self,
        _: Context,
        from: ReplicaId,
        key: Vec<u8>,
    ) -> std::result::Result<GetResponse, KvError> {
        if !self.peer_may_say(from) {
            return Err(KvError::PermissionDenied(
                "the connection's certificate does not name this sender".into(),
            ));
        }
        self.gate(from).await;
        self.get_here(key, ReadMode::Linearizable).await
    }

    async fn forward_range(
        self,
        _: Context,
        from: ReplicaId,
        req: RangeRequest,
    ) -> std::result::Result<RangeResponse, KvError> {
        if !self.peer_may_say(from) {
            return Err(KvError::PermissionDenied(
                "the connection's certificate does not name this sender".into(),
            ));
        }
        self.gate(from).await;
        self.range_here(req, ReadMode::Linearizable).await
    }
}

/// Binds the client and peer listeners, with TLS if `tls` is given (then
/// the peer port serves only certificates naming a replica this one has
/// known as a member: [`PeerPool::known_ids`], which grows as the
/// configuration changes, and keeps removed replicas so that they can
/// still learn they were removed);
/// returns the futures that serve them. Each connection is served in its
/// own task (see [`crate::net`]); the futures end only if a listening
/// socket breaks, with its error.
pub async fn listen(
    client_addr: String,
    peer_addr: String,
    handler: Handler,
    tls: Option<Arc<rustls::ServerConfig>>,
) -> Result<(
    impl Future<Output = std::io::Error>,
    impl Future<Output = std::io::Error>,
)> {
    let client_limits = NetLimits::for_port(Port::Client, &handler.limits)?;
    let peer_limits = NetLimits::for_port(Port::Peer, &handler.limits)?;
    let kv = Listener::bind(client_addr, Port::Client, client_limits, tls.clone()).await?;
    let peer = Listener::bind(peer_addr, Port::Peer, peer_limits, tls).await?;
    // The service types are named here, not in `net`: spawning a request
    // needs its future to be `Send`, which a generic `Serve` cannot promise.
    let kv_handler = handler.clone();
    let kv = kv.run(move |conn| {
        let caller = match conn.peer_cert() {
            Some(cert) if conn.tls() => match kv_api::tls::role_of(&cert) {
                Some(role) => Caller::Client(Some(role)),
                None => match kv_api::tls::replica_of(&cert, kv_handler.pool.known_ids()) {
                    Some(id) => Caller::Replica(id),
                    None => Caller::Client(None),
                },
            },
            _ => Caller::Trusted,
        };
        let serve = Kv::serve(kv_handler.for_conn(caller, conn.from()));
        async move {
            conn.channel()
                .execute(serve)
                .for_each(|response| async {
                    tokio::spawn(response);
                })
                .await
        }
    });
    let peer = peer.run(move |conn| {
        let caller = if conn.tls() {
            let named = conn
                .peer_cert()
                .and_then(|cert| kv_api::tls::replica_of(&cert, handler.pool.known_ids()));
            match named {
                Some(id) => Caller::Replica(id),
                None => {
                    tracing::warn!(
                        id = handler.id,
                        from = %conn.from(),
                        "closing a peer connection whose certificate names no replica of \
                         this cluster (a client's certificate on the peer port?)"
                    );
                    return futures::future::Either::Left(std::future::ready(()));
                }
            }
        } else {
            Caller::Trusted
        };
        let serve = Peer::serve(handler.for_conn(caller, conn.from()));
        futures::future::Either::Right(async move {
            conn.channel()
                .execute(serve)
                .for_each(|response| async {
                    tokio::spawn(response);
                })
                .await
        })
    });
    Ok((kv, peer))
}
