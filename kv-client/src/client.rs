//! [`Client`], [`ClientBuilder`] and [`CasOutcome`].

use std::future::Future;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use kv_api::membership::{MemberChange, Membership};
use kv_api::replicas::Replicas;
use kv_api::tls::{Tls, TlsFiles};
use kv_api::{
    BackupChunk, BackupInfo, FaultReport, FaultSpec, KeyValue, KvClient, KvError, LeaseOp,
    LeaseResult, Limits, Op, OpResult, RangeRequest, RangeResponse, ReadMode, ReplicaId,
    ReplicaStatus, Route, Txn, TxnOp, TxnResult, WatchEvent, WatchRequest, WatchResponse,
    WriteOutcome, WriteRequest, MAX_WATCH_WAIT_MS,
};
use tarpc::client::RpcError;
use tarpc::context::Context;

use crate::error::{Error, Result};
use crate::failover::{failover, Attempt};
use crate::pool::Pool;
use crate::seq::SeqTracker;

/// The default overall time budget of one operation.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);

/// The longest time budget a client accepts; longer ones are cut to it (so
/// that deadline arithmetic cannot overflow).
pub const MAX_TIMEOUT: Duration = Duration::from_secs(24 * 60 * 60);

/// How many times one write opens a new session because the cluster no
/// longer knew the one it was sent in, before giving up. More than once
/// only if sessions are evicted faster than a write can use them.
const MAX_REOPENS: usize = 3;

/// A handle on a kvpaxos cluster. Cheap to clone (an `Arc` inside); clones
/// share connections, the session and its sequence numbers, so one
/// `Client` may serve many tasks at once.
///
/// Writes belong to a session that the cluster opens (through its log) on
/// the client's first write and identifies with an id of its choosing, so
/// no two clients — not even a process and its restarted self — can share
/// one. If the cluster drops the session (idle longer than its TTL, or
/// evicted by newer ones), a write that was certainly not applied is sent
/// again in a new session; one that may have been applied fails with
/// [`Error::OutcomeUnknown`].
///
/// Each operation tries replicas in turn (starting with the one that last
/// worked, following leader hints) until one completes it or the time budget
/// set with [`ClientBuilder::timeout`] is spent.
#[derive(Clone, Debug)]
pub struct Client {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    /// The addresses given to the builder (duplicates removed).
    given: Vec<String>,
    /// The addresses tried now: the given ones, and once the client has
    /// learnt the cluster's configuration, its other members' (see
    /// [`Client::status`]). A std Mutex, never held across an await.
    known: Mutex<Known>,
    timeout: Duration,
    limits: Limits,
    follow_hints: bool,
    refresh_members: Option<Duration>,
    /// The session writes go to, once opened. A std Mutex, never held
    /// across an await.
    session: Mutex<Option<Arc<Session>>>,
    /// Held while a session is being opened, so that concurrent first
    /// writes open one, not one each.
    opening: tokio::sync::Mutex<()>,
    pool: Pool,
    /// The address that last completed a write or a linearizable read: the
    /// leader, or a replica that forwards to it. A std Mutex, never held
    /// across an await.
    preferred: Mutex<Option<String>>,
}

/// The addresses a client tries, and the configuration they came from.
#[derive(Debug)]
struct Known {
    /// The epoch of the configuration learnt; `None`: the given addresses.
    epoch: Option<u64>,
    addrs: Arc<Vec<String>>,
    /// When the configuration was last asked for, in the background.
    asked: Option<Instant>,
}

/// How often a client that follows hints asks, in the background, for the
/// cluster's configuration while it is being used: replicas replaced since
/// then are found before the ones it knows are all gone.
pub const MEMBERSHIP_REFRESH: Duration = Duration::from_secs(30);

/// A session the cluster opened for this client, and its sequence numbers.
#[derive(Debug)]
struct Session {
    id: u64,
    seqs: Arc<SeqTracker>,
}

/// Configures a [`Client`]. Start with [`Client::builder`].
#[derive(Clone, Debug)]
pub struct ClientBuilder {
    addrs: Vec<String>,
    timeout: Duration,
    limits: Limits,
    follow_hints: bool,
    refresh_members: Option<Duration>,
    tls: Option<TlsFiles>,
}

impl Default for ClientBuilder {
    fn default() -> Self {
        ClientBuilder {
            addrs: Vec::new(),
            timeout: DEFAULT_TIMEOUT,
            limits: Limits::default(),
            follow_hints: true,
            refresh_members: Some(MEMBERSHIP_REFRESH),
            tls: None,
        }
    }
}

/// The result of [`Client::cas`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CasOutcome {
    /// Whether the new value was stored.
    pub swapped: bool,
    /// The key's value after the operation: the new value if swapped,
    /// otherwise the value that made the comparison fail.
    pub current: Option<Vec<u8>>,
}

impl ClientBuilder {
    /// Talks to every replica of a replica file, by its client address.
    /// Replaces any addresses given before.
    pub fn replicas(mut self, r: Replicas) -> Self {
        self.addrs = r.replicas.into_iter().map(|r| r.client_addr).collect();
        self
    }

    /// Talks to these addresses (`host:port`) only, e.g. a single replica,
    /// which forwards to the leader. Replaces any addresses given before.
    pub fn addrs(mut self, addrs: Vec<String>) -> Self {
        self.addrs = addrs;
        self
    }

    /// The overall time budget of each operation, retries included
    /// (default 5 s, at most [`MAX_TIMEOUT`]).
    pub fn timeout(mut self, d: Duration) -> Self {
        self.timeout = d;
        self
    }

    /// Key and value size limits checked before sending (default
    /// [`Limits::default`], the server's).
    pub fn limits(mut self, l: Limits) -> Self {
        self.limits = l;
        self
    }

    /// Whether to follow a replica's leader hint to an address not given
    /// to the builder (default: yes). Without it the client talks only to
    /// the given addresses, as `kv-client --server` does, and a hint only
    /// appears in the error if the budget runs out.
    pub fn follow_hints(mut self, follow: bool) -> Self {
        self.follow_hints = follow;
        self
    }

    /// How often a client that follows hints asks for the cluster's
    /// configuration in the background while it is used (see
    /// [`Client::status`]): at most once every `every` (default
    /// [`MEMBERSHIP_REFRESH`]); `None`: never. A command that makes one
    /// call and exits has no use for it.
    pub fn refresh_members(mut self, every: Option<Duration>) -> Self {
        self.refresh_members = every;
        self
    }

    /// Talks TLS to the replicas: trusts the CA certificates of
    /// `files.ca`, verifies each replica by the host it is dialled at, and
    /// presents `files.cert`/`files.key`, whose role (read, write, admin)
    /// decides what this client may do. The files are read by
    /// [`ClientBuilder::build`].
    pub fn tls(mut self, files: TlsFiles) -> Self {
        self.tls = Some(files);
        self
    }

    /// Builds the client. Does not connect: connections are made on first
    /// use. Fails with [`Error::InvalidArgument`] if no address was given,
    /// the timeout is zero, or the TLS files cannot be used (the message
    /// names the file).
    pub fn build(self) -> Result<Client> {
        let mut addrs: Vec<String> = Vec::with_capacity(self.addrs.len());
        for a in self.addrs {
            let a = a.trim().to_string();
            if a.is_empty() {
                return Err(Error::InvalidArgument(
                    "an empty replica address was given".into(),
                ));
            }
            if !addrs.contains(&a) {
                addrs.push(a);
            }
        }
        if addrs.is_empty() {
            return Err(Error::InvalidArgument(
                "no replica address was given (use a replica file or an explicit address)".into(),
            ));
        }
        if self.timeout.is_zero() {
            return Err(Error::InvalidArgument(
                "the timeout must be above zero".into(),
            ));
        }
        let tls = match &self.tls {
            None => None,
            Some(files) => Some(
                Tls::load(files)
                    .and_then(|t| t.client_config())
                    .map_err(|e| Error::InvalidArgument(e.to_string()))?,
            ),
        };
        Ok(Client {
            inner: Arc::new(Inner {
                known: Mutex::new(Known {
                    epoch: None,
                    addrs: Arc::new(addrs.clone()),
                    asked: None,
                }),
                given: addrs,
                timeout: self.timeout.min(MAX_TIMEOUT),
                limits: self.limits,
                follow_hints: self.follow_hints,
                refresh_members: self.refresh_members,
                session: Mutex::new(None),
                opening: tokio::sync::Mutex::new(()),
                pool: Pool::new(tls),
                preferred: Mutex::new(None),
            }),
        })
    }
}

fn invalid(e: KvError) -> Error {
    match e {
        KvError::InvalidArgument(m) => Error::InvalidArgument(m),
        other => Error::InvalidArgument(other.to_string()),
    }
}

impl Client {
    /// A builder with the defaults: no addresses yet, 5 s timeout, default
    /// limits.
    pub fn builder() -> ClientBuilder {
        ClientBuilder::default()
    }

    /// The session this client's writes now go to: `None` before the first
    /// write (or after the cluster dropped it, until the next write).
    pub fn session_id(&self) -> Option<u64> {
        self.current_session().map(|s| s.id)
    }

    /// Sets `key` to `value`.
    pub async fn put(&self, key: impl Into<Vec<u8>>, value: impl Into<Vec<u8>>) -> Result<()> {
        let op = Op::Put {
            key: key.into(),
            value: value.into(),
        };
        let (outcome, addr) = self.write_op(op).await?;
        match outcome.result {
            OpResult::Put => Ok(()),
            other => Err(unexpected(addr, "put", &other)),
        }
    }

    /// Reads `key` linearizably: the answer reflects every write that
    /// completed before the read began. `None` if the key is absent.
    pub async fn get(&self, key: impl Into<Vec<u8>>) -> Result<Option<Vec<u8>>> {
        self.read(key.into(), ReadMode::Linearizable).await
    }

    /// Reads `key` from the first replica that answers, from its own state:
    /// fast, possibly stale. `None` if the key is absent there.
    pub async fn get_local(&self, key: impl Into<Vec<u8>>) -> Result<Option<Vec<u8>>> {
        self.read(key.into(), ReadMode::Local).await
    }

    /// Removes `key`; returns whether it existed.
    pub async fn delete(&self, key: impl Into<Vec<u8>>) -> Result<bool> {
        let op = Op::Delete { key: key.into() };
        let (outcome, addr) = self.write_op(op).await?;
        match outcome.result {
            OpResult::Deleted { existed } => Ok(existed),
            other => Err(unexpected(addr, "delete", &other)),
        }
    }

    /// Sets `key` to `new` if its value is `expected` (`None`: if it is
    /// absent).
    pub async fn cas(
        &self,
        key: impl Into<Vec<u8>>,
        expected: Option<Vec<u8>>,
        new: impl Into<Vec<u8>>,
    ) -> Result<CasOutcome> {
        let op = Op::Cas {
            key: key.into(),
            expected,
            new: new.into(),
        };
        let (outcome, addr) = self.write_op(op).await?;
        match outcome.result {
            OpResult::Cas { swapped, current } => Ok(CasOutcome { swapped, current }),
            other => Err(unexpected(addr, "compare-and-swap", &other)),
        }
    }

    /// The cluster's configuration: its members (voters and learners) and
    /// their addresses, the newest any replica reports (every replica
    /// asked at once; the highest epoch wins, so a replica that is behind
    /// or was removed does not mislead). [`Error::Unavailable`] if none
    /// answers.
    ///
    /// ```no_run
    /// # async fn f(client: kv_client::Client) -> kv_client::Result<()> {
    /// for m in client.members().await?.members {
    ///     println!("{} {} {}", m.id, m.role(), m.client_addr);
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn members(&self) -> Result<Membership> {
        let mut best: Option<Membership> = None;
        let mut last = String::new();
        for (addr, answer) in self.status().await {
            match answer {
                Ok(s) if !s.membership.members.is_empty() => {
                    if best.as_ref().is_none_or(|b| s.membership.epoch > b.epoch) {
                        best = Some(s.membership);
                    }
                }
                Ok(_) => last = format!("{addr}: it reports no configuration (an older version?)"),
                Err(e) => last = e.to_string(),
            }
        }
        best.ok_or_else(|| {
            Error::Unavailable(format!("no replica told its configuration ({last})"))
        })
    }

    /// Adds replica `id`, reached at `client_addr` and `peer_addr`, as a
    /// learner: it receives the log and votes once promoted
    /// ([`Client::promote_member`]). Start it with `kv-server --join`.
    /// Needs the `admin` role where TLS is on. Returns the new
    /// configuration. One change at a time: while another is in progress,
    /// [`Error::Conflict`].
    ///
    /// ```no_run
    /// # async fn f(client: kv_client::Client) -> kv_client::Result<()> {
    /// client.add_member(6, "10.0.0.6:7001", "10.0.0.6:7101").await?;
    /// // ... start replica 6 with `kv-server --join`, let it catch up ...
    /// client.promote_member(6).await?;
    /// client.remove_member(1).await?;
    /// # Ok(()) }
    /// ```
    pub async fn add_member(
        &self,
        id: ReplicaId,
        client_addr: impl Into<String>,
        peer_addr: impl Into<String>,
    ) -> Result<Membership> {
        self.reconfigure(MemberChange::Add {
            id,
            client_addr: client_addr.into(),
            peer_addr: peer_addr.into(),
        })
        .await
    }

    /// Removes replica `id` (voter or learner, up or down). Removing the
    /// leader makes it step down once the change is chosen; the others
    /// elect another. Returns the new configuration.
    pub async fn remove_member(&self, id: ReplicaId) -> Result<Membership> {
        self.reconfigure(MemberChange::Remove(id)).await
    }

    /// Makes learner `id` a voter. Refused ([`Error::Conflict`]) until it
    /// has caught up with the leader. Returns the new configuration.
    pub async fn promote_member(&self, id: ReplicaId) -> Result<Membership> {
        self.reconfigure(MemberChange::Promote(id)).await
    }

    /// Makes one configuration change (see the `member` methods).
    pub async fn reconfigure(&self, change: MemberChange) -> Result<Membership> {
        let what = change.to_string();
        let op = Op::Reconfigure {
            epoch: None,
            change,
        };
        let (outcome, addr) = self.write_op(op).await?;
        match outcome.result {
            OpResult::Reconfigured(Ok(m)) => Ok(m),
            OpResult::Reconfigured(Err(why)) => {
                Err(Error::InvalidArgument(format!("cannot {what}: {why}")))
            }
            other => Err(unexpected(addr, "membership change", &other)),
        }
    }

    /// Reads `key` with its revisions, linearizably. `None` if absent.
    ///
    /// ```no_run
    /// # async fn demo(client: kv_client::Client) -> kv_client::Result<()> {
    /// client.put("color", "blue").await?;
    /// let kv = client.get_kv("color").await?.expect("just written");
    /// println!("version {} at revision {}", kv.version, kv.mod_revision);
    /// # Ok(()) }
    /// ```
    pub async fn get_kv(&self, key: impl Into<Vec<u8>>) -> Result<Option<KeyValue>> {
        let key = key.into();
        self.inner.limits.check_key(&key).map_err(invalid)?;
        let resp = self
            .range_with(RangeRequest::key(key), ReadMode::Linearizable)
            .await?;
        Ok(resp.kvs.into_iter().next())
    }

    /// [`Client::get_kv`] from the first replica that answers, from its
    /// own state: fast, possibly stale.
    pub async fn get_kv_local(&self, key: impl Into<Vec<u8>>) -> Result<Option<KeyValue>> {
        let key = key.into();
        self.inner.limits.check_key(&key).map_err(invalid)?;
        let resp = self
            .range_with(RangeRequest::key(key), ReadMode::Local)
            .await?;
        Ok(resp.kvs.into_iter().next())
    }

    /// Reads one page of a range, linearizably: the keys of
    /// `[req.start, req.end)` in key order, at most `req.limit` of them
    /// (and at most [`kv_api::MAX_RANGE_LIMIT`] and about
    /// [`kv_api::MAX_RANGE_BYTES`]). If `more`, ask again with the
    /// answer's `token` for the next page. Bounds that make no sense and
    /// tokens no answer gave are refused ([`Error::InvalidArgument`]).
    ///
    /// ```no_run
    /// use kv_client::RangeRequest;
    ///
    /// # async fn demo(client: kv_client::Client) -> kv_client::Result<()> {
    /// let mut req = RangeRequest::prefix("config/");
    /// loop {
    ///     let page = client.range(req.clone()).await?;
    ///     for kv in &page.kvs {
    ///         println!("{:?} = {:?} (rev {})", kv.key, kv.value, kv.mod_revision);
    ///     }
    ///     if !page.more {
    ///         break;
    ///     }
    ///     req.token = page.token;
    /// }
    /// // How many keys, without reading them.
    /// let count = RangeRequest { count_only: true, ..RangeRequest::prefix("config/") };
    /// println!("{} keys", client.range(count).await?.count);
    /// # Ok(()) }
    /// ```
    pub async fn range(&self, req: RangeRequest) -> Result<RangeResponse> {
        self.range_with(req, ReadMode::Linearizable).await
    }

    /// [`Client::range`] from the first replica that answers, from its own
    /// state: fast, possibly stale.
    pub async fn range_local(&self, req: RangeRequest) -> Result<RangeResponse> {
        self.range_with(req, ReadMode::Local).await
    }

    async fn range_with(&self, req: RangeRequest, mode: ReadMode) -> Result<RangeResponse> {
        req.validate(&self.inner.limits).map_err(invalid)?;
        let route = self.route();
        let (resp, addr) = self
            .call(move |c, ctx| {
                let req = req.clone();
                async move { c.range(ctx, req, mode, route).await }
            })
            .await?;
        if mode == ReadMode::Linearizable {
            self.set_preferred(&addr);
        }
        Ok(resp)
    }

    /// Runs a transaction: if every comparison holds, the `success`
    /// writes, otherwise the `failure` writes, atomically and at most once
    /// (a retry is answered with the first result). Checked against the
    /// limits first ([`kv_api::MAX_TXN_COMPARES`], [`kv_api::MAX_TXN_OPS`],
    /// key and value sizes).
    ///
    /// ```no_run
    /// use kv_client::{CmpOp, Compare, Target, Txn, TxnOp};
    ///
    /// # async fn demo(client: kv_client::Client) -> kv_client::Result<()> {
    /// // Move 10 from a to b, only if neither changed since it was read.
    /// let a = client.get_kv("a").await?.expect("a exists");
    /// let b = client.get_kv("b").await?.expect("b exists");
    /// let txn = Txn {
    ///     compares: vec![
    ///         Compare { key: a.key.clone(), op: CmpOp::Equal, target: Target::ModRevision(a.mod_revision) },
    ///         Compare { key: b.key.clone(), op: CmpOp::Equal, target: Target::ModRevision(b.mod_revision) },
    ///     ],
    ///     success: vec![
    ///         TxnOp::Put { key: a.key, value: b"90".to_vec(), lease: 0 },
    ///         TxnOp::Put { key: b.key, value: b"110".to_vec(), lease: 0 },
    ///     ],
    ///     failure: vec![],
    /// };
    /// let done = client.txn(txn).await?;
    /// if !done.succeeded {
    ///     println!("someone else wrote first; read again and retry");
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn txn(&self, txn: Txn) -> Result<TxnResult> {
        Ok(self.txn_outcome(txn).await?.0)
    }

    /// [`Client::txn`], with the log slot that holds it.
    pub(crate) async fn txn_outcome(&self, txn: Txn) -> Result<(TxnResult, u64)> {
        let (outcome, addr) = self.write_op(Op::Txn(txn)).await?;
        match outcome.result {
            OpResult::Txn(t) => Ok((t, outcome.slot)),
            other => Err(unexpected(addr, "transaction", &other)),
        }
    }

    /// Grants a lease of `ttl` (1 s to 1 day, whole milliseconds) and
    /// returns its id. Keys put with it ([`Client::put_with_lease`]) are
    /// deleted when it ends: `ttl` after the last keepalive, as the
    /// cluster's log counts time (a new leader gives every lease its full
    /// TTL again), or at a revoke.
    ///
    /// ```no_run
    /// use std::time::Duration;
    ///
    /// # async fn demo(client: kv_client::Client) -> kv_client::Result<()> {
    /// let lease = client.lease_grant(Duration::from_secs(10)).await?;
    /// client.put_with_lease("service/web-1", "10.0.0.7:80", lease).await?;
    /// loop {
    ///     tokio::time::sleep(Duration::from_secs(3)).await;
    ///     if client.lease_keepalive(lease).await?.is_none() {
    ///         break; // expired: the key is gone
    ///     }
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn lease_grant(&self, ttl: Duration) -> Result<u64> {
        let ttl_ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX);
        let r = self.lease(LeaseOp::Grant { ttl_ms, now_ms: 0 }).await?;
        if r.id == 0 {
            return Err(Error::Unavailable(
                "the cluster holds as many leases as it may; revoke some or retry later".into(),
            ));
        }
        Ok(r.id)
    }

    /// Starts lease `id`'s TTL again; its TTL, or `None` if the lease no
    /// longer exists (expired or revoked: its keys are gone).
    pub async fn lease_keepalive(&self, id: u64) -> Result<Option<Duration>> {
        let r = self.lease(LeaseOp::KeepAlive { id, now_ms: 0 }).await?;
        Ok((r.ttl_ms > 0).then(|| Duration::from_millis(r.ttl_ms)))
    }

    /// Ends lease `id` now and deletes its keys; how many were deleted (0
    /// also if the lease did not exist).
    pub async fn lease_revoke(&self, id: u64) -> Result<u64> {
        Ok(self.lease(LeaseOp::Revoke { id }).await?.deleted)
    }

    async fn lease(&self, op: LeaseOp) -> Result<LeaseResult> {
        let (outcome, addr) = self.write_op(Op::Lease(op)).await?;
        match outcome.result {
            OpResult::Lease(r) => Ok(r),
            other => Err(unexpected(addr, "lease operation", &other)),
        }
    }

    /// Sets `key` to `value`, attached to lease `lease`: deleted when the
    /// lease ends. A lease that does not exist is refused
    /// ([`Error::InvalidArgument`]; nothing is written).
    pub async fn put_with_lease(
        &self,
        key: impl Into<Vec<u8>>,
        value: impl Into<Vec<u8>>,
        lease: u64,
    ) -> Result<()> {
        self.put_with_lease_outcome(key.into(), value.into(), lease)
            .await
            .map(|_| ())
    }

    /// [`Client::put_with_lease`], with the log slot that holds it.
    pub(crate) async fn put_with_lease_outcome(
        &self,
        key: Vec<u8>,
        value: Vec<u8>,
        lease: u64,
    ) -> Result<u64> {
        let txn = Txn {
            success: vec![TxnOp::Put { key, value, lease }],
            ..Txn::default()
        };
        Ok(self.txn_outcome(txn).await?.1)
    }

    /// One long poll of a watch (see [`WatchRequest`]): the changes of its
    /// range from its cursor on, waiting up to `wait_ms` for one; the
    /// answer says where to go on. [`Client::watcher`] keeps the cursor
    /// for you. Served by any replica (each keeps the same history); a
    /// cursor before the history gives [`Error::Compacted`].
    pub async fn watch_poll(&self, req: WatchRequest) -> Result<WatchResponse> {
        req.validate(&self.inner.limits).map_err(invalid)?;
        let (resp, _) = self
            .call(move |c, ctx| {
                let req = req.clone();
                async move { c.watch(ctx, req).await }
            })
            .await?;
        Ok(resp)
    }

    /// Watches the range of `req` from `req.from_revision` on (0: from the
    /// next change, by the store's revision now): every change exactly
    /// once, in revision order, across disconnects, a leader's death and
    /// replica restarts (the cursor is a revision, which any replica
    /// understands).
    ///
    /// ```no_run
    /// use kv_client::{EventKind, WatchRequest};
    ///
    /// # async fn demo(client: kv_client::Client) -> kv_client::Result<()> {
    /// let mut w = client.watcher(WatchRequest::prefix("config/", 0)).await?;
    /// loop {
    ///     for e in w.next().await? {
    ///         match e.kind {
    ///             EventKind::Put => println!("{:?} = {:?}", e.kv.key, e.kv.value),
    ///             EventKind::Delete => println!("{:?} deleted", e.kv.key),
    ///         }
    ///     }
    ///     // No events: nothing changed up to w.revision().
    /// }
    /// # }
    /// ```
    pub async fn watcher(&self, mut req: WatchRequest) -> Result<Watcher> {
        if req.from_revision == 0 {
            let now = RangeRequest {
                count_only: true,
                ..RangeRequest::between(req.start.clone(), req.end.clone())
            };
            req.from_revision = self.range(now).await?.revision + 1;
        }
        req.validate(&self.inner.limits).map_err(invalid)?;
        req.wait_ms = MAX_WATCH_WAIT_MS;
        Ok(Watcher {
            client: self.clone(),
            revision: req.from_revision - 1,
            req,
        })
    }

    /// Compacts the history up to and including `revision` (cut to the
    /// store's revision); returns where the history now starts. Ranges at
    /// and watches from older revisions are then refused.
    pub async fn compact(&self, revision: u64) -> Result<u64> {
        let (outcome, addr) = self.write_op(Op::Compact { revision }).await?;
        match outcome.result {
            OpResult::Compacted { compacted } => Ok(compacted),
            other => Err(unexpected(addr, "compaction", &other)),
        }
    }

    /// Sends a write exactly as given: the caller picks `client_id` (a
    /// session from [`Client::open_session`], or any number, to see it
    /// refused), `seq` and `acked_below` — for tests of retries and
    /// deduplication. Limits are checked first; the same failover and
    /// budget apply as for the other operations, and every retry resends
    /// the same request. A session the cluster does not know gives
    /// [`Error::UnknownSession`] (not applied) or, if an earlier attempt
    /// may have been applied, [`Error::OutcomeUnknown`]; nothing is opened
    /// or resent in another session. The answer is returned as is
    /// (`OpResult::Stale` included).
    pub async fn write(&self, req: WriteRequest) -> Result<WriteOutcome> {
        self.inner.limits.check_op(&req.op).map_err(invalid)?;
        Ok(self.send_write(&req, self.inner.timeout).await?.0)
    }

    /// Opens a new session and returns its id, for [`Client::write`]; it
    /// does not become this client's own session. Every call opens another
    /// one (one log write); a retried open may leave an unused session
    /// behind, which expires.
    pub async fn open_session(&self) -> Result<u64> {
        Ok(self.open(self.inner.timeout).await?.0)
    }

    /// Asks every replica for its status, in parallel, in the order of
    /// [`Client::addrs`]. Each answer (or error) comes with the address
    /// asked. Takes at most the client's timeout.
    ///
    /// The answers carry the cluster's configuration. A client that
    /// follows hints (the default) adopts the newest one it hears of: from
    /// then on it also talks to members it was not given (see
    /// [`Client::addrs`]), and those it had not asked are asked too, their
    /// answers appended. So a client started with an old replica file
    /// still finds replicas added since, even after every replica it was
    /// given is gone. It also asks in the background, at most every
    /// [`MEMBERSHIP_REFRESH`], while it is used.
    pub async fn status(&self) -> Vec<(String, Result<ReplicaStatus>)> {
        let deadline = Instant::now() + self.inner.timeout;
        let asked = self.known_addrs();
        let mut answers = self.status_at(&asked, deadline).await;
        if self.learn(&answers) {
            let more: Vec<String> = self
                .known_addrs()
                .iter()
                .filter(|a| !asked.contains(a))
                .cloned()
                .collect();
            answers.extend(self.status_at(&more, deadline).await);
        }
        // A replica that calls itself leader is the best place to start.
        if let Some((addr, _)) = answers.iter().find(|(_, r)| matches!(r, Ok(s) if s.leader)) {
            self.set_preferred(addr);
        }
        answers
    }

    /// The addresses this client talks to: those given (in the order
    /// given, duplicates removed), followed, once it has learnt the
    /// cluster's configuration (see [`Client::status`]), by the client
    /// addresses of members not among them, in id order.
    pub fn addrs(&self) -> Vec<String> {
        self.known_addrs().to_vec()
    }

    fn known_addrs(&self) -> Arc<Vec<String>> {
        self.known().addrs.clone()
    }

    fn known(&self) -> std::sync::MutexGuard<'_, Known> {
        self.inner
            .known
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    async fn status_at(
        &self,
        addrs: &[String],
        deadline: Instant,
    ) -> Vec<(String, Result<ReplicaStatus>)> {
        let asks = addrs.iter().map(|addr| async move {
            let r = self.status_of(addr, deadline).await;
            (addr.clone(), r)
        });
        futures::future::join_all(asks).await
    }

    /// Adopts the newest configuration among `answers` if it is newer
    /// than the one this client follows (and it follows hints); true if
    /// the addresses changed.
    fn learn(&self, answers: &[(String, Result<ReplicaStatus>)]) -> bool {
        if !self.inner.follow_hints {
            return false;
        }
        let Some(newest) = answers
            .iter()
            .filter_map(|(_, r)| r.as_ref().ok())
            .map(|s| &s.membership)
            .filter(|m| !m.members.is_empty())
            .max_by_key(|m| m.epoch)
        else {
            return false;
        };
        let mut known = self.known();
        if known.epoch.is_some_and(|e| e >= newest.epoch) {
            return false;
        }
        // The given addresses keep their places (answers line up with a
        // replica file's order, and the application named them); members
        // not among them follow, in id order.
        let mut addrs = self.inner.given.clone();
        for m in &newest.members {
            if !addrs.contains(&m.client_addr) {
                addrs.push(m.client_addr.clone());
            }
        }
        known.epoch = Some(newest.epoch);
        let changed = *known.addrs != addrs;
        if changed {
            tracing::debug!(
                epoch = newest.epoch,
                ?addrs,
                "following the cluster's configuration"
            );
            known.addrs = Arc::new(addrs);
        }
        changed
    }

    /// Asks for the configuration in the background if it is due (see
    /// [`ClientBuilder::refresh_members`]).
    fn refresh_members_if_due(&self) {
        let Some(every) = self.inner.refresh_members else {
            return;
        };
        if !self.inner.follow_hints {
            return;
        }
        {
            let mut known = self.known();
            if known.asked.is_some_and(|t| t.elapsed() < every) {
                return;
            }
            known.asked = Some(Instant::now());
        }
        let client = self.clone();
        tokio::spawn(async move {
            let deadline = Instant::now() + client.inner.timeout;
            let answers = client.status_at(&client.known_addrs(), deadline).await;
            client.learn(&answers);
        });
    }

    /// Changes the failure injection of the one replica at `addr` (a
    /// `host:port` client address, which need not be one of this client's)
    /// and returns the settings now in force with counts of what it has
    /// injected so far. An empty change (`FaultSpec::default()`) only
    /// reports. The change is checked with [`FaultSpec::validate`] before
    /// anything is sent ([`Error::InvalidArgument`]).
    ///
    /// Only that replica is asked, never another one: faults are a
    /// per-replica setting. Bounded by the client's timeout; a replica that
    /// cannot be reached gives [`Error::Unavailable`], one that does not
    /// answer in time [`Error::Timeout`].
    pub async fn set_faults(&self, addr: &str, change: FaultSpec) -> Result<FaultReport> {
        change.validate().map_err(invalid)?;
        self.call_one(addr, move |c, ctx| {
            let change = change.clone();
            async move { c.set_faults(ctx, change).await }
        })
        .await
    }

    /// Admin: asks the one replica at `addr` for a snapshot to back up
    /// (taken now, unless one it holds covers everything it has applied):
    /// its log index, length and CRC-32. Read it with
    /// [`Client::backup_chunk`]. Ask the leader: its snapshot then holds
    /// every write acknowledged before the call. Bounded by the client's
    /// timeout, which must leave the replica time to write the snapshot.
    pub async fn backup_begin(&self, addr: &str) -> Result<BackupInfo> {
        self.call_one(addr, |c, ctx| async move { c.backup_begin(ctx).await })
            .await
    }

    /// Admin: up to [`kv_api::MAX_BACKUP_CHUNK`] bytes of snapshot `index`
    /// of the replica at `addr`, from `offset` (empty at the end).
    pub async fn backup_chunk(
        &self,
        addr: &str,
        index: kv_api::Slot,
        offset: u64,
    ) -> Result<BackupChunk> {
        self.call_one(addr, move |c, ctx| async move {
            c.backup_chunk(ctx, index, offset, kv_api::MAX_BACKUP_CHUNK)
                .await
        })
        .await
    }

    /// One call to the replica at `addr` only, bounded by the client's
    /// timeout (two tries: a cached connection may have died).
    async fn call_one<T, F, Fut>(&self, addr: &str, f: F) -> Result<T>
    where
        F: Fn(KvClient, Context) -> Fut,
        Fut: Future<Output = std::result::Result<std::result::Result<T, KvError>, RpcError>>,
    {
        let deadline = Instant::now() + self.inner.timeout;
        let mut last = String::new();
        for _ in 0..2 {
            match attempt(&self.inner.pool, addr, deadline, &f).await {
                Attempt::Done(r) => return Ok(r),
                Attempt::NoConnection(e) => {
                    return Err(Error::Unavailable(format!("{addr}: cannot connect: {e}")))
                }
                Attempt::CallFailed(e) => last = e,
                Attempt::Refused(KvError::InvalidArgument(m)) => {
                    return Err(Error::InvalidArgument(format!("{addr}: {m}")))
                }
                Attempt::Refused(KvError::Timeout(m)) => last = m,
                Attempt::Refused(KvError::PermissionDenied(m)) => {
                    return Err(Error::PermissionDenied(format!("{addr}: {m}")))
                }
                Attempt::Refused(KvError::Disabled(m)) => {
                    return Err(Error::Disabled(format!("{addr}: {m}")))
                }
                Attempt::Refused(KvError::Conflict(m)) => {
                    return Err(Error::Conflict(format!("{addr}: {m}")))
                }
                Attempt::Refused(e) => return Err(Error::Unavailable(format!("{addr}: {e}"))),
            }
            if Instant::now() >= deadline {
                break;
            }
        }
        Err(Error::Timeout(format!("{addr}: {last}")))
    }

    async fn status_of(&self, addr: &str, deadline: Instant) -> Result<ReplicaStatus> {
        // Two tries: the first may hit a cached connection that has died
        // since (the replica restarted); the second dials afresh.
        let mut last = String::new();
        for _ in 0..2 {
            match attempt(&self.inner.pool, addr, deadline, |c, ctx| async move {
                c.status(ctx).await.map(Ok)
            })
            .await
            {
                Attempt::Done(s) => return Ok(s),
                Attempt::NoConnection(e) => {
                    return Err(Error::Unavailable(format!("{addr}: cannot connect: {e}")))
                }
                Attempt::CallFailed(e) => last = e,
                Attempt::Refused(e) => return Err(Error::Unavailable(format!("{addr}: {e}"))),
            }
            if Instant::now() >= deadline {
                break;
            }
        }
        Err(Error::Timeout(format!("{addr}: {last}")))
    }

    async fn read(&self, key: Vec<u8>, mode: ReadMode) -> Result<Option<Vec<u8>>> {
        self.inner.limits.check_key(&key).map_err(invalid)?;
        let route = self.route();
        let (resp, addr) = self
            .call(move |c, ctx| {
                let key = key.clone();
                async move { c.get(ctx, key, mode, route).await }
            })
            .await?;
        if mode == ReadMode::Linearizable {
            self.set_preferred(&addr);
        }
        Ok(resp.value)
    }

    /// Checks limits, then sends the write in this client's session
    /// (opening one first if there is none), all within the client's
    /// budget. A sequence number stays outstanding (holding `acked_below`
    /// down) until its attempt returns. If the cluster answers that it
    /// does not know the session, and no attempt may have been applied,
    /// the write goes again in a new session.
    pub(crate) async fn write_op(&self, op: Op) -> Result<(WriteOutcome, String)> {
        self.inner.limits.check_op(&op).map_err(invalid)?;
        let deadline = Instant::now() + self.inner.timeout;
        let mut req = WriteRequest {
            client_id: 0,
            seq: 0,
            acked_below: 0,
            op,
        };
        for _ in 0..=MAX_REOPENS {
            let session = self.session(deadline).await?;
            let guard = session.seqs.begin();
            req.client_id = session.id;
            req.seq = guard.seq();
            req.acked_below = session.seqs.acked_below();
            let left = deadline.saturating_duration_since(Instant::now());
            match self.send_write(&req, left).await {
                Err(Error::UnknownSession(id)) => {
                    tracing::debug!(session = id, "the cluster no longer knows the session");
                    self.drop_session(id);
                }
                Ok((o, addr)) if o.result == OpResult::Stale => {
                    return Err(Error::OutcomeUnknown(format!(
                        "{addr}: the write's result was forgotten (it fell out of the \
                         session's memory: too many writes in flight)"
                    )))
                }
                other => return other,
            }
        }
        Err(Error::Unavailable(format!(
            "the cluster dropped each of {} sessions opened for this write before it \
             arrived (sessions are evicted faster than they are used: too many clients \
             for the cluster's --max-sessions); the write was not applied",
            MAX_REOPENS + 1
        )))
    }

    fn current_session(&self) -> Option<Arc<Session>> {
        self.inner
            .session
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// This client's session, opened now if it has none.
    async fn session(&self, deadline: Instant) -> Result<Arc<Session>> {
        if let Some(s) = self.current_session() {
            return Ok(s);
        }
        let not_opened = |e: Error| match e {
            Error::InvalidArgument(_) | Error::PermissionDenied(_) => e,
            e => Error::Unavailable(format!(
                "could not open a session, so the write was not sent: {e}"
            )),
        };
        let _opening = tokio::time::timeout_at(deadline.into(), self.inner.opening.lock())
            .await
            .map_err(|_| {
                not_opened(Error::Timeout("another task's open took the budget".into()))
            })?;
        // Another task may have opened one while this one waited.
        if let Some(s) = self.current_session() {
            return Ok(s);
        }
        let left = deadline.saturating_duration_since(Instant::now());
        let (id, _) = self.open(left).await.map_err(not_opened)?;
        let session = Arc::new(Session {
            id,
            seqs: SeqTracker::new(),
        });
        *self
            .inner
            .session
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(session.clone());
        tracing::debug!(session = id, "session opened");
        Ok(session)
    }

    /// Forgets session `id` if it is still the current one (another task
    /// may have replaced it already).
    fn drop_session(&self, id: u64) {
        let mut s = self
            .inner
            .session
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if s.as_ref().is_some_and(|s| s.id == id) {
            *s = None;
        }
    }

    /// Opens a session within `budget`: its id, and the replica that
    /// answered.
    async fn open(&self, budget: Duration) -> Result<(u64, String)> {
        let req = WriteRequest {
            client_id: 0,
            seq: 0,
            acked_below: 0,
            op: Op::open_session(),
        };
        let (outcome, addr) = self.send_write(&req, budget).await?;
        match outcome.result {
            OpResult::SessionOpened { session } if session != 0 => Ok((session, addr)),
            other => Err(unexpected(addr, "session open", &other)),
        }
    }

    async fn send_write(
        &self,
        req: &WriteRequest,
        budget: Duration,
    ) -> Result<(WriteOutcome, String)> {
        let route = self.route();
        let (outcome, addr) = self
            .call_within(budget, move |c, ctx| {
                let req = req.clone();
                async move { c.write(ctx, req, route).await }
            })
            .await?;
        self.set_preferred(&addr);
        Ok((outcome, addr))
    }

    /// Runs one RPC with failover within the client's budget.
    async fn call<T, F, Fut>(&self, f: F) -> Result<(T, String)>
    where
        F: Fn(KvClient, Context) -> Fut,
        Fut: Future<Output = std::result::Result<std::result::Result<T, KvError>, RpcError>>,
    {
        self.call_within(self.inner.timeout, f).await
    }

    /// Runs one RPC with failover within `budget`.
    async fn call_within<T, F, Fut>(&self, budget: Duration, f: F) -> Result<(T, String)>
    where
        F: Fn(KvClient, Context) -> Fut,
        Fut: Future<Output = std::result::Result<std::result::Result<T, KvError>, RpcError>>,
    {
        self.refresh_members_if_due();
        let start = self.preferred();
        let pool = &self.inner.pool;
        let f = &f;
        let addrs = self.known_addrs();
        failover(
            &addrs,
            start.as_deref(),
            budget,
            self.inner.follow_hints,
            move |addr, deadline| async move { attempt(pool, &addr, deadline, f).await },
        )
        .await
    }

    /// A client that follows hints goes to the leader itself (and stays
    /// with it), rather than through a follower that forwards: one hop less
    /// per request.
    fn route(&self) -> Route {
        if self.inner.follow_hints {
            Route::Redirect
        } else {
            Route::Forward
        }
    }

    fn preferred(&self) -> Option<String> {
        self.inner
            .preferred
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn set_preferred(&self, addr: &str) {
        let mut p = self
            .inner
            .preferred
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if p.as_deref() != Some(addr) {
            *p = Some(addr.to_string());
        }
    }
}

/// A watch with its cursor: see [`Client::watcher`].
#[derive(Debug)]
pub struct Watcher {
    client: Client,
    req: WatchRequest,
    revision: u64,
}

impl Watcher {
    /// The next changes, in revision order (none: nothing changed up to
    /// [`Watcher::revision`] within about a second — a progress
    /// notification). An error leaves the cursor where it was: calling
    /// again resumes with no change missed or repeated.
    pub async fn next(&mut self) -> Result<Vec<WatchEvent>> {
        let resp = self.client.watch_poll(self.req.clone()).await?;
        self.req.from_revision = resp.next_revision;
        self.req.skip = resp.next_skip;
        self.revision = self.revision.max(resp.revision);
        Ok(resp.events)
    }

    /// The store's revision as of the last answer: every change up to it
    /// has been returned.
    pub fn revision(&self) -> u64 {
        self.revision
    }

    /// The cursor's revision: the next answer starts at this revision,
    /// after [`Watcher::next_skip`] of its events (a revision's events may
    /// come in more than one answer).
    ///
    /// To resume elsewhere (a restarted process, another client), watch
    /// again from both: a [`WatchRequest`] with `from_revision` set to this
    /// and `skip` to `next_skip()`. Without the skip, the events of this
    /// revision already returned are returned again.
    pub fn next_revision(&self) -> u64 {
        self.req.from_revision
    }

    /// How many events of [`Watcher::next_revision`] were already returned
    /// (0 unless the last answer stopped partway through a revision).
    pub fn next_skip(&self) -> u64 {
        self.req.skip
    }
}

/// One RPC at one replica, connection included, bounded by `deadline`.
async fn attempt<T, F, Fut>(pool: &Pool, addr: &str, deadline: Instant, f: F) -> Attempt<T>
where
    F: FnOnce(KvClient, Context) -> Fut,
    Fut: Future<Output = std::result::Result<std::result::Result<T, KvError>, RpcError>>,
{
    let conn = match pool.get(addr, deadline).await {
        Ok(c) => c,
        Err(e) => return Attempt::NoConnection(e),
    };
    let mut ctx = tarpc::context::current();
    ctx.deadline = deadline;
    // tarpc enforces the deadline itself; the outer timeout is a second
    // guard so that nothing here can outlive the budget.
    match tokio::time::timeout_at(deadline.into(), f(conn.client.clone(), ctx)).await {
        Ok(Ok(Ok(v))) => Attempt::Done(v),
        Ok(Ok(Err(e))) => Attempt::Refused(e),
        Ok(Err(RpcError::Server(e))) if e.kind == std::io::ErrorKind::WouldBlock => {
            // The replica has too many of this connection's requests in
            // flight and refused this one unrun. The connection is fine;
            // like "no quorum", this moves on with backoff.
            Attempt::Refused(overloaded(addr, &e.detail))
        }
        Ok(Err(e)) => {
            // Dropped connection, deadline, aborted request: the connection
            // may be dead or wedged; dial afresh next time.
            pool.evict(addr, &conn);
            let mut why = with_causes(&e);
            // A TLS replica answers a plain client with an alert record,
            // whose header reads as a length far beyond any frame.
            if !pool.tls() && why.contains("frame size too big") {
                why.push_str(
                    " (is the replica serving TLS? then give the client --tls-ca, --tls-cert \
                     and --tls-key)",
                );
            }
            Attempt::CallFailed(why)
        }
        Err(_) => {
            pool.evict(addr, &conn);
            Attempt::CallFailed("no answer before the deadline".into())
        }
    }
}

/// An error's message followed by its causes' (tarpc's "critical error"
/// alone does not say that the replica refused this client's certificate,
/// or spoke TLS to a plain client).
fn with_causes(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let more = c.to_string();
        if !text.ends_with(&more) {
            text = format!("{text}: {more}");
        }
        cause = c.source();
    }
    text
}

/// What a throttled request is reported as: [`KvError::Unavailable`], which
/// every caller already retries elsewhere and with backoff, and which tells
/// a person what happened. (A variant of its own would say no more to a
/// program: the request was not run, and retrying later is the answer.)
fn overloaded(addr: &str, detail: &str) -> KvError {
    KvError::Unavailable(format!(
        "{addr} is overloaded: too many requests in flight on one connection \
         (the replica said: {detail}); the request was not run"
    ))
}

fn unexpected(addr: String, what: &str, got: &OpResult) -> Error {
    Error::Protocol {
        addr,
        detail: format!("a {what} was answered with {got:?}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn build_refuses_missing_addresses_and_zero_timeout() {
        let e = Client::builder().build().unwrap_err();
        assert!(matches!(e, Error::InvalidArgument(_)), "{e}");
        let e = Client::builder()
            .addrs(vec![" ".into()])
            .build()
            .unwrap_err();
        assert!(matches!(e, Error::InvalidArgument(_)), "{e}");
        let e = Client::builder()
            .addrs(vec!["h:1".into()])
            .timeout(Duration::ZERO)
            .build()
            .unwrap_err();
        assert!(matches!(e, Error::InvalidArgument(_)), "{e}");
    }

    #[test]
    fn build_dedups_addresses_clamps_the_timeout_and_opens_no_session_yet() {
        let c = Client::builder()
            .addrs(vec!["a:1".into(), "b:2".into(), "a:1".into()])
            .timeout(Duration::MAX)
            .build()
            .unwrap();
        assert_eq!(c.addrs(), ["a:1", "b:2"]);
        assert_eq!(c.inner.timeout, MAX_TIMEOUT);
        assert_eq!(c.session_id(), None, "opened on the first write");
    }

    #[test]
    fn replicas_gives_every_client_address_in_file_order() {
        let r = Replicas::parse("2 h:12 h:22\n1 h:11 h:21\n", "replica").unwrap();
        let c = Client::builder().replicas(r).build().unwrap();
        assert_eq!(c.addrs(), ["h:12", "h:11"]);
    }
}
