//! The driver: one task per replica that owns the consensus core, the
//! storage and the state machine. It feeds the core with inputs (peer
//! messages, client requests, ticks), then carries out what the core hands
//! back, strictly in this order: persist and sync; release replies and
//! messages; apply chosen entries and answer the clients waiting on them.
//!
//! Everything that arrives while a sync is in progress waits in the input
//! queue and is handled in the next round, so its records share the next
//! sync: group commit falls out of the loop's shape.
//!
//! # The driver and its world
//!
//! The driver is generic over where its records go ([`LogStore`]) and
//! over everything else it hands to the world ([`Outbox`]: peer messages,
//! snapshot writes and transfers, and the clocks it reads). A replica runs
//! it with [`Storage`] and [`PeerOutbox`] on tokio ([`Node::run`]); the
//! deterministic simulation (`kv-server/tests/simulation.rs`) runs the
//! same driver, round by round ([`Node::handle`], [`Node::tick`],
//! [`Node::round`]), with a simulated disk that may lose a round's
//! un-synced records, a simulated network, and a simulated clock. What
//! only the tokio runner does: hand large writes to the blocking pool
//! while it keeps heartbeats going, and time its rounds.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use kv_api::{
    GetResponse, KvError, LeaderHint, Limits, Op, OpResult, RangeRequest, ReadMode, ReplicaId,
    ReplicaStatus, WriteOutcome, WriteRequest,
};
use kv_peer_api::{Membership, Slot, SnapshotRequest, Value};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::sync::{mpsc, oneshot};

use crate::admin::Health;
use crate::inbox::{GetReply, Input, RangeReply, WatchReply, WriteReply};
use crate::metrics::{self, gauge_value, OutcomeLabel};
use crate::paxos::{Msg, Paxos, Ready, Record, Refusal, Standing};
use crate::peers::PeerPool;
use crate::snapshot::{SnapshotDir, MAX_SNAPSHOT_CHUNK};
use crate::state::{StateMachine, DEFAULT_MAX_SESSIONS, DEFAULT_SESSION_TTL_MS};
use crate::storage::Storage;
use crate::{Result, ServerError};

/// Inputs handled per round at most, so ticks are never starved.
const MAX_DRAIN: usize = 4096;

/// Configuration changes answered only once known chosen by a majority of
/// the voters, at most this many waiting at once (more are answered at
/// once: a bound on what admin clients can make a replica hold).
const MAX_CHANGES_WAITING: usize = 64;

/// Ticks between sweeps of abandoned waiters.
const SWEEP_TICKS: u64 = 100;
/// The same, while the leader has writes queued.
const SWEEP_TICKS_QUEUED: u64 = 10;

/// Client commands kept in the log behind a snapshot, for peers slightly
/// behind to catch up from the log instead of a snapshot. Counted in
/// commands, not slots, so the log on disk stays about the same size
/// whatever the batching and the snapshot interval.
const KEEP_BEHIND_SNAPSHOT: usize = 1_000;

/// And at most this many bytes of them: with large values, 1,000 commands
/// would be a gigabyte held in memory and rewritten into the log's
/// checkpoint at every compaction.
const KEEP_BEHIND_SNAPSHOT_BYTES: usize = 8 << 20;

/// A snapshot is also taken once the writes applied since the last one
/// add up to half the map's size, but not before this many bytes. This
/// bounds the log held in memory (and replayed at start-up) by the data,
/// whatever the batching: `--snapshot-every` counts log entries, and one
/// entry may hold up to 512 writes.
const MIN_LOG_BYTES: u64 = 64 << 20;

/// A round of the driver taking this long is logged (at most once per
/// `SLOW_NOTE_EVERY`): heartbeats wait for it, and an election timeout is
/// 150-300 ms.
const SLOW_ROUND: Duration = Duration::from_millis(100);
const SLOW_NOTE_EVERY: Duration = Duration::from_secs(10);

/// How often a leader puts its clock into the log (`Value::Time`) while
/// the state machine holds sessions, which is what session expiry is
/// decided by. Once a second makes expiry late by at most a second against
/// TTLs of minutes and costs one small log entry a second — nothing next to
/// a write load — and a cluster without sessions writes none. While no
/// majority can be reached, no reading is chosen and nothing expires.
const TIME_EVERY: Duration = Duration::from_secs(1);

/// Limits for ranges in the driver: their bounds and tokens were checked
/// against the replica's own limits by the RPC handler already.
const CHECKED: Limits = Limits {
    max_key: usize::MAX,
    max_value: usize::MAX,
};

/// Watches waiting for an event at once, at most: beyond, a watch is
/// answered `unavailable` (retry shortly). Each holds its request and a
/// reply channel, and every applied round looks at each.
const MAX_PARKED_WATCHES: usize = 10_000;

/// A watch waiting for an event. Its cursor moves on as rounds apply
/// changes outside its range, so each round looks only at new changes.
struct ParkedWatch {
    req: kv_api::WatchRequest,
    until: Instant,
    reply: WatchReply,
}

/// A linearizable read waiting for its read index.
enum PendingRead {
    Get(Vec<u8>, GetReply),
    Range(RangeRequest, RangeReply),
}

impl PendingRead {
    fn fail(self, e: KvError) {
        match self {
            PendingRead::Get(_, tx) => {
                let _ = tx.send(Err(e));
            }
            PendingRead::Range(_, tx) => {
                let _ = tx.send(Err(e));
            }
        }
    }
}

/// Snapshot bookkeeping of the driver.
pub struct Snapshots {
    /// Take one every this many applied entries.
    pub every: u64,
    /// Client commands, and bytes of them, kept in the log behind a
    /// snapshot (`KEEP_BEHIND_SNAPSHOT`, `KEEP_BEHIND_SNAPSHOT_BYTES`
    /// unless a simulation wants its logs compacted sooner).
    pub keep_commands: usize,
    /// See `keep_commands`.
    pub keep_bytes: usize,
    /// The newest durable snapshot.
    pub latest: Slot,
    /// Bytes of the writes applied since the last snapshot began (or was
    /// installed).
    pub log_bytes: u64,
    /// A snapshot is being written.
    pub taking: bool,
    /// A snapshot is being received.
    pub receiving: bool,
    /// Snapshots received from peers and installed since start.
    pub installed: u64,
}

impl Snapshots {
    /// A snapshot every `every` applied entries; the newest durable one is
    /// at `latest` (0: none).
    pub fn new(every: u64, latest: Slot) -> Snapshots {
        Snapshots {
            every,
            keep_commands: KEEP_BEHIND_SNAPSHOT,
            keep_bytes: KEEP_BEHIND_SNAPSHOT_BYTES,
            latest,
            log_bytes: 0,
            taking: false,
            receiving: false,
            installed: 0,
        }
    }
}

/// Where the driver's records go: written and synced before anything that
/// depends on them leaves the driver (see [`Node::round`]). An error stops
/// the driver: what the round promised is not durable.
pub trait LogStore {
    /// Writes and syncs one round's records, in order.
    fn write(&mut self, records: &[Record]) -> Result<()>;
}

impl LogStore for Storage {
    fn write(&mut self, records: &[Record]) -> Result<()> {
        Storage::write(self, records)
    }
}

/// Everything else the driver hands to the world, and the clocks it reads.
/// Nothing here may block: a message or a snapshot transfer is started
/// and its outcome comes back later as an [`Input`].
pub trait Outbox {
    /// Sends `msg` to peer `to`; its answer, if any, comes back as an
    /// [`Input::Peer`] without a reply channel.
    fn send(&mut self, to: ReplicaId, msg: Msg);
    /// The configuration changed: talk to its members.
    fn set_members(&mut self, members: &Membership);
    /// Writes `sm`, as of `index`, as this replica's newest snapshot; the
    /// outcome comes back as [`Input::SnapshotTaken`].
    fn write_snapshot(&mut self, index: Slot, sm: StateMachine);
    /// Fetches the newest snapshot of `peer` and makes it durable here;
    /// the outcome comes back as [`Input::SnapshotReceived`].
    fn fetch_snapshot(&mut self, me: ReplicaId, peer: ReplicaId);
    /// The monotonic clock: watch deadlines and how often the leader
    /// writes its clock into the log.
    fn now(&self) -> Instant {
        Instant::now()
    }
    /// This replica's wall clock, in milliseconds since the Unix epoch:
    /// only ever written into the log by a leader (time readings, lease
    /// grants); nothing is decided by it directly.
    fn unix_ms(&self) -> u64 {
        now_ms()
    }
    /// The lease clock, in microseconds (see [`Paxos::set_clock`]): by
    /// default CLOCK_BOOTTIME ([`lease_clock_us`]).
    fn lease_clock_us(&self) -> u64 {
        lease_clock_us()
    }
    /// The driver applied `value` at `slot` (after the state machine did):
    /// for a checker to compare what replicas apply. Nothing by default.
    fn applied(&mut self, _slot: Slot, _value: &Value) {}
}

/// The replica's [`Outbox`]: peer messages through the peer pool (their
/// answers back into the driver's inbox), snapshots into the data
/// directory on the blocking pool, the system clocks.
pub struct PeerOutbox {
    pool: Arc<PeerPool>,
    inputs: mpsc::Sender<Input>,
    dir: SnapshotDir,
}

impl PeerOutbox {
    /// Sends through `pool`, answers into `inputs`, snapshots into `dir`.
    pub(crate) fn new(
        pool: Arc<PeerPool>,
        inputs: mpsc::Sender<Input>,
        dir: SnapshotDir,
    ) -> PeerOutbox {
        PeerOutbox { pool, inputs, dir }
    }
}

impl Outbox for PeerOutbox {
    fn send(&mut self, to: ReplicaId, msg: Msg) {
        self.pool.send(to, msg, self.inputs.clone());
    }

    fn set_members(&mut self, members: &Membership) {
        self.pool.set_members(members);
    }

    /// Serializing and syncing happen off the driver, on the blocking pool.
    fn write_snapshot(&mut self, index: Slot, copy: StateMachine) {
        let dir = self.dir.clone();
        let inputs = self.inputs.clone();
        tokio::spawn(async move {
            let written = tokio::task::spawn_blocking(move || {
                let started = Instant::now();
                let r = dir.write(index, &copy);
                if r.is_ok() {
                    let m = metrics::global();
                    m.snapshot_duration.observe(started.elapsed().as_secs_f64());
                    if let Ok(meta) = std::fs::metadata(dir.path(index)) {
                        m.snapshot_size.set(gauge_value(meta.len()));
                    }
                }
                drop(copy);
                release_free_memory();
                r
            })
            .await;
            let result = match written {
                Ok(r) => r.map_err(|e| e.to_string()),
                Err(e) => Err(e.to_string()),
            };
            let _ = inputs.send(Input::SnapshotTaken { index, result }).await;
        });
    }

    /// In bounded chunks into a partial file, verified, then renamed into
    /// place (the commit point: a crash before leaves the old state), then
    /// decoded for install.
    fn fetch_snapshot(&mut self, me: ReplicaId, peer: ReplicaId) {
        let pool = self.pool.clone();
        let dir = self.dir.clone();
        let inputs = self.inputs.clone();
        tokio::spawn(async move {
            let started = Instant::now();
            let result = download(pool, peer, me, dir).await;
            if result.is_ok() {
                metrics::global()
                    .snapshot_transfer_duration
                    .observe(started.elapsed().as_secs_f64());
            }
            let _ = inputs.send(Input::SnapshotReceived { result }).await;
        });
    }
}

/// The driver's state: generic over its log store and its outbox (see the
/// module docs).
pub struct Node<S = Storage, O = PeerOutbox> {
    core: Paxos,
    sm: StateMachine,
    /// `None` while a write runs on the blocking pool (or after one failed).
    store: Option<S>,
    outbox: O,
    /// Session tokens and new-leader entry ids.
    rng: StdRng,
    held_replies: Vec<(oneshot::Sender<Msg>, Msg)>,
    /// Inputs that arrived while a round's write ran and were not reads
    /// answered at once: handled first in the next round, in order.
    deferred: VecDeque<Input>,
    waiters: HashMap<(u64, u64), Vec<WriteReply>>,
    /// Configuration changes applied, answered once a majority of the
    /// voters know them chosen (see [`Node::answer_changes`]).
    changes: Vec<(Slot, WriteOutcome, Vec<WriteReply>)>,
    reads: HashMap<u64, PendingRead>,
    watches: Vec<ParkedWatch>,
    next_token: u64,
    ticks: u64,
    /// The last round's log write, for the slow-round log line.
    last_write: WriteStats,
    snapshots: Snapshots,
    /// What this replica writes into the opens it proposes.
    session_ttl_ms: u64,
    max_sessions: u64,
    /// When this replica last proposed a time reading.
    time_proposed: Option<Instant>,
    /// Whether this replica, leading, has proposed its new-leader entry
    /// (`Op::NewLeader`) for the current leadership.
    leadership_marked: bool,
    /// The token (`seq`) of that entry, and whether it has been applied:
    /// until then this leader puts no time reading into the log, which
    /// could otherwise be chosen ahead of it and expire leases the entry
    /// would have renewed.
    leadership_entry: Option<u64>,
    leadership_applied: bool,
    /// Retried writes answered with the result of their first application
    /// since start: here, before proposing, and by the state machine when
    /// a retry reached the log too (its count restarts with an installed
    /// snapshot; this one does not).
    duplicates: u64,
    /// What the admin listener's probes read.
    health: Arc<Health>,
    /// What the driver saw at the end of its last round, to count leader
    /// changes and elections from (the core does not report them).
    seen: Seen,
    /// `kvpaxos_proposals_total` by outcome, resolved once.
    proposals: Proposals,
    /// Backups waiting for a snapshot covering at least this index.
    backups: Vec<(Slot, oneshot::Sender<std::result::Result<Slot, String>>)>,
}

/// The leader and ballot the driver last saw.
struct Seen {
    leader: Option<ReplicaId>,
    promised: kv_peer_api::Ballot,
}

/// Handles of `kvpaxos_proposals_total`.
struct Proposals {
    accepted: prometheus_client::metrics::counter::Counter,
    not_leader: prometheus_client::metrics::counter::Counter,
    busy: prometheus_client::metrics::counter::Counter,
    duplicate: prometheus_client::metrics::counter::Counter,
}

impl Proposals {
    fn new() -> Proposals {
        let m = &metrics::global().proposals;
        let get = |outcome| m.get_or_create(&OutcomeLabel { outcome }).clone();
        Proposals {
            accepted: get("accepted"),
            not_leader: get("not_leader"),
            busy: get("busy"),
            duplicate: get("duplicate"),
        }
    }
}

impl<S: LogStore, O: Outbox> Node<S, O> {
    /// A driver for `core` and `sm`, which were recovered from `store`'s
    /// contents and the newest snapshot (see [`recover`]). `seed` seeds
    /// the tokens it draws (session opens, new-leader entries).
    pub fn new(
        core: Paxos,
        sm: StateMachine,
        store: S,
        snapshots: Snapshots,
        outbox: O,
        seed: u64,
    ) -> Node<S, O> {
        // A ballot of its own promised before a restart is not an
        // election started now.
        let seen = Seen {
            leader: None,
            promised: core.promised(),
        };
        Node {
            core,
            sm,
            snapshots,
            store: Some(store),
            outbox,
            rng: StdRng::seed_from_u64(seed),
            held_replies: Vec::new(),
            deferred: VecDeque::new(),
            waiters: HashMap::new(),
            changes: Vec::new(),
            reads: HashMap::new(),
            watches: Vec::new(),
            next_token: 0,
            ticks: 0,
            last_write: WriteStats::default(),
            session_ttl_ms: DEFAULT_SESSION_TTL_MS,
            max_sessions: DEFAULT_MAX_SESSIONS,
            time_proposed: None,
            leadership_marked: false,
            leadership_entry: None,
            leadership_applied: false,
            duplicates: 0,
            health: Arc::new(Health::new()),
            seen,
            proposals: Proposals::new(),
            backups: Vec::new(),
        }
    }

    /// The consensus core.
    pub fn core(&self) -> &Paxos {
        &self.core
    }

    /// The state machine.
    pub fn state(&self) -> &StateMachine {
        &self.sm
    }

    /// The outbox.
    pub fn outbox(&self) -> &O {
        &self.outbox
    }

    /// The outbox, to take what the driver handed out.
    pub fn outbox_mut(&mut self) -> &mut O {
        &mut self.outbox
    }

    /// What this driver tells the admin listener's probes.
    pub(crate) fn health(&self) -> Arc<Health> {
        self.health.clone()
    }

    /// Counts leader changes and elections from what the round changed:
    /// the leader this replica knows of, and its promised ballot raised to
    /// one of its own (phase 1 started here).
    fn observe_round(&mut self) {
        let leader = self.core.leader();
        let promised = self.core.promised();
        let m = metrics::global();
        if leader.is_some() && leader != self.seen.leader {
            m.leader_changes.inc();
            tracing::info!(
                id = self.core.id(),
                leader = leader.unwrap_or(0),
                previous = self.seen.leader.unwrap_or(0),
                ballot = %promised,
                "leader changed"
            );
        }
        if promised > self.seen.promised && promised.id == self.core.id() {
            m.elections.inc();
        }
        if leader.is_some() {
            self.seen.leader = leader;
        }
        self.seen.promised = promised;
    }

    /// Sets the gauges that mirror the driver's state and the probes'
    /// view (once a tick).
    fn publish(&self) {
        let m = metrics::global();
        let leader = self.core.leader();
        let is_leader = self.core.is_leader();
        let applied = self.sm.applied();
        let chosen = self.core.chosen();
        let standing = match self.core.standing() {
            Standing::Voter => crate::admin::Standing::Voter,
            Standing::Rejoining { .. } => crate::admin::Standing::Rejoining,
            Standing::Unknown => crate::admin::Standing::Unknown,
        };
        self.health
            .tick(leader, is_leader, chosen, applied, standing);
        let leader_chosen = self.health.leader_chosen().max(chosen);
        m.chosen.set(gauge_value(chosen));
        m.applied.set(gauge_value(applied));
        m.leader_chosen.set(gauge_value(leader_chosen));
        m.apply_lag
            .set(gauge_value(leader_chosen.saturating_sub(applied)));
        m.is_leader.set(i64::from(is_leader));
        m.leader_id.set(gauge_value(leader.unwrap_or(0)));
        m.ballot_round.set(gauge_value(self.core.promised().round));
        m.keys.set(gauge_value(self.sm.len() as u64));
        m.data_bytes.set(gauge_value(self.sm.data_bytes()));
        m.sessions.set(gauge_value(self.sm.session_count() as u64));
        m.snapshot_index.set(gauge_value(self.snapshots.latest));
    }

    /// The idle timeout and the session cap this replica writes into the
    /// opens it proposes as leader (defaults: [`DEFAULT_SESSION_TTL_MS`],
    /// [`DEFAULT_MAX_SESSIONS`]). They take effect through the log, so
    /// replicas started with different values still agree.
    pub fn sessions(mut self, ttl: Duration, max_sessions: u64) -> Node<S, O> {
        self.session_ttl_ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1);
        self.max_sessions = max_sessions.max(1);
        self
    }

    /// Handles a tick (the timer of heartbeats, elections, retransmission
    /// and watch deadlines). Its effects leave at the next [`Node::round`].
    pub fn tick(&mut self) {
        self.core.set_clock(self.outbox.lease_clock_us());
        self.core.tick();
        self.answer_changes();
        self.answer_watches(false);
        self.mark_leadership();
        self.propose_time();
        self.ticks += 1;
        self.publish();
        // Often while writes are queued (a backlog nobody waits for must
        // not hold up the next client), rarely otherwise.
        let every = if self.core.queued() > 0 {
            SWEEP_TICKS_QUEUED
        } else {
            SWEEP_TICKS
        };
        if self.ticks.is_multiple_of(every) {
            self.waiters.retain(|_, v| {
                v.retain(|tx| !tx.is_closed());
                !v.is_empty()
            });
            // Writes still queued whose clients stopped waiting (their
            // deadline passed) are dropped before they take a slot: the
            // client saw an unknown outcome and retries the same
            // (session, seq) if it wants it. Under overload this keeps the
            // leader from working through a backlog nobody waits for.
            let waiters = &self.waiters;
            let dropped = self.core.retain_queued(|r| {
                matches!(r.op, Op::NewLeader { .. }) || waiters.contains_key(&(r.client_id, r.seq))
            });
            if dropped > 0 {
                tracing::debug!(dropped, "dropped queued writes nobody waits for");
            }
        }
    }

    /// As leader, puts this replica's clock into the log every
    /// [`TIME_EVERY`] while it matters: while there are sessions to expire,
    /// or while the log still holds only entries from before sessions (the
    /// first reading ends that mode; see `state`). Only the log's readings
    /// decide anything; this clock is never consulted elsewhere.
    fn propose_time(&mut self) {
        if !self.core.is_leader()
            || !self.leadership_applied
            || self
                .time_proposed
                .is_some_and(|t| self.outbox.now().saturating_duration_since(t) < TIME_EVERY)
            || (self.sm.session_count() == 0
                && self.sm.lease_count() == 0
                && self.sm.sessions_required())
        {
            return;
        }
        let ms = self.outbox.unix_ms();
        if self.core.propose_time(ms) {
            self.time_proposed = Some(self.outbox.now());
        }
    }

    /// As a new leader, proposes its new-leader entry ([`Op::NewLeader`],
    /// with this replica's clock) before any client write, once per
    /// leadership: revisions are counted from the first one in the log
    /// (see `kv_api::data`). Nobody waits for its answer.
    fn mark_leadership(&mut self) {
        if !self.core.is_leader() {
            self.leadership_marked = false;
            self.leadership_applied = false;
            self.leadership_entry = None;
            return;
        }
        if self.leadership_marked {
            return;
        }
        let seq = self.rng.random::<u64>();
        let req = WriteRequest {
            client_id: 0,
            seq,
            acked_below: 0,
            op: Op::NewLeader {
                now_ms: self.outbox.unix_ms(),
            },
        };
        self.leadership_marked = self.core.propose(req).is_ok();
        if self.leadership_marked {
            self.leadership_entry = Some(seq);
            // The entry carries this leader's clock: it is a time reading,
            // and the next one is due a `TIME_EVERY` after it.
            self.time_proposed = Some(self.outbox.now());
        }
    }

    /// Prepares an open for the log: the limits this replica was given,
    /// and a token of its own in `seq` by which its answer finds the
    /// waiting client. The token is drawn here, not taken from the client,
    /// so that no two clients (even ones with the same random seed) can
    /// be handed the same session.
    fn prepare_open(&mut self, req: &mut WriteRequest) {
        req.client_id = 0;
        req.acked_below = 0;
        req.op = Op::OpenSession {
            ttl_ms: self.session_ttl_ms,
            max_sessions: self.max_sessions,
        };
        req.seq = loop {
            let token = self.rng.random::<u64>();
            if !self.waiters.contains_key(&(0, token)) {
                break token;
            }
        };
    }

    fn hint(&self, leader: Option<ReplicaId>) -> KvError {
        KvError::NotLeader(
            leader
                .filter(|&l| l != self.core.id())
                .and_then(|l| self.core.membership().get(l))
                .map(|r| LeaderHint {
                    id: r.id,
                    addr: r.client_addr.clone(),
                }),
        )
    }

    /// Handles one input. Its effects leave at the next [`Node::round`].
    pub fn handle(&mut self, input: Input) {
        // Read as the input is handled, never earlier, by the inputs that
        // grant or check a lease (`Paxos::set_clock`); not on the accept
        // path, nor for writes.
        if times_a_lease(&input) {
            self.core.set_clock(self.outbox.lease_clock_us());
        }
        match input {
            Input::Peer { msg, reply } => {
                // What the leader says it has chosen, for readiness and
                // the apply lag; believed once the core accepts the
                // heartbeat (a stale leader's is refused).
                let heartbeat = match &msg {
                    Msg::Heartbeat(h) => Some(h.chosen),
                    Msg::FetchReply(r) => {
                        let m = metrics::global();
                        m.catchup_fetches.inc();
                        m.catchup_entries.inc_by(r.entries.len() as u64);
                        None
                    }
                    _ => None,
                };
                let answer = self.core.step(msg);
                if let (Some(chosen), Some(Msg::HeartbeatAck(ack))) = (heartbeat, &answer) {
                    if ack.ok {
                        self.health.heard_leader(chosen);
                    }
                }
                if let (Some(answer), Some(tx)) = (answer, reply) {
                    self.held_replies.push((tx, answer));
                }
            }
            Input::Write { mut req, reply } => {
                self.mark_leadership();
                // A lease's time counts from this leader's clock (the log's
                // may be up to a reading behind).
                if let Op::Lease(
                    kv_api::LeaseOp::Grant { now_ms: at, .. }
                    | kv_api::LeaseOp::KeepAlive { now_ms: at, .. },
                ) = &mut req.op
                {
                    *at = self.outbox.unix_ms();
                }
                if let Op::OpenSession { .. } = req.op {
                    self.prepare_open(&mut req);
                } else if let Some(done) = self.sm.cached(req.client_id, req.seq) {
                    self.duplicates += 1;
                    self.proposals.duplicate.inc();
                    self.answer_write(Ok(done), vec![reply]);
                    return;
                }
                let key = (req.client_id, req.seq);
                match self.core.propose(req) {
                    Ok(()) => {
                        self.proposals.accepted.inc();
                        self.waiters.entry(key).or_default().push(reply)
                    }
                    Err(Refusal::NotLeader(leader)) => {
                        self.proposals.not_leader.inc();
                        let _ = reply.send(Err(self.hint(leader)));
                    }
                    Err(Refusal::Busy) => {
                        self.proposals.busy.inc();
                        let _ = reply.send(Err(KvError::Unavailable(
                            "the leader's proposal queue is full; retry shortly".into(),
                        )));
                    }
                    Err(Refusal::Conflict(why)) => {
                        let _ = reply.send(Err(KvError::Conflict(why)));
                    }
                }
            }
            Input::Get { key, mode, reply } => match mode {
                ReadMode::Local => {
                    let _ = reply.send(Ok(self.read_local(&key)));
                }
                ReadMode::Linearizable => {
                    self.next_token += 1;
                    let token = self.next_token;
                    match self.read(token) {
                        Ok(()) => {
                            self.reads.insert(token, PendingRead::Get(key, reply));
                        }
                        Err(leader) => {
                            let _ = reply.send(Err(self.hint(leader)));
                        }
                    }
                }
            },
            Input::Range { req, mode, reply } => match mode {
                ReadMode::Local => {
                    let _ = reply.send(self.sm.range(&req, &CHECKED));
                }
                ReadMode::Linearizable => {
                    self.next_token += 1;
                    let token = self.next_token;
                    match self.read(token) {
                        Ok(()) => {
                            self.reads.insert(token, PendingRead::Range(req, reply));
                        }
                        Err(leader) => {
                            let _ = reply.send(Err(self.hint(leader)));
                        }
                    }
                }
            },
            Input::Watch { req, until, reply } => {
                let parked = ParkedWatch { req, until, reply };
                if let Some(parked) = self.try_watch(parked, self.outbox.now()) {
                    if self.watches.len() >= MAX_PARKED_WATCHES {
                        let _ = parked.reply.send(Err(KvError::Unavailable(format!(
                            "this replica already holds {MAX_PARKED_WATCHES} waiting watches; \
                             retry shortly or at another replica"
                        ))));
                    } else {
                        self.watches.push(parked);
                    }
                }
            }
            Input::Lease { id, reply } => {
                let _ = reply.send(self.sm.lease(id));
            }
            Input::Status { reply } => {
                let _ = reply.send(ReplicaStatus {
                    id: self.core.id(),
                    leader: self.core.is_leader(),
                    leader_id: self.core.leader(),
                    ballot_round: self.core.promised().round,
                    applied: self.sm.applied(),
                    chosen: self.core.chosen(),
                    snapshot: self.snapshots.latest,
                    keys: self.sm.len() as u64,
                    sessions: self.sm.session_count() as u64,
                    standing: match self.core.standing() {
                        Standing::Voter => "voter",
                        Standing::Rejoining { .. } => "rejoining",
                        Standing::Unknown => "unknown",
                    }
                    .into(),
                    snapshots_installed: self.snapshots.installed,
                    duplicate_writes: self.duplicates,
                    membership: self.core.membership().clone(),
                    removed: self.core.removed(),
                });
            }
            Input::Backup { reply } => {
                let applied = self.sm.applied();
                if applied == 0 {
                    let _ = reply.send(Err(
                        "nothing has been written to this cluster yet: no snapshot to back up"
                            .into(),
                    ));
                } else if self.snapshots.latest >= applied {
                    let _ = reply.send(Ok(self.snapshots.latest));
                } else {
                    self.backups.push((applied, reply));
                    if !self.snapshots.taking {
                        self.start_snapshot();
                    }
                }
            }
            Input::SnapshotTaken { index, result } => {
                self.snapshots.taking = false;
                // Backups this snapshot covers get it; later ones (asked
                // while it was being written) get the next, started now.
                let mut later = Vec::new();
                for (needed, reply) in std::mem::take(&mut self.backups) {
                    match &result {
                        Ok(()) if index >= needed => {
                            let _ = reply.send(Ok(index));
                        }
                        Err(e) => {
                            let _ = reply.send(Err(format!("cannot write a snapshot: {e}")));
                        }
                        Ok(()) => later.push((needed, reply)),
                    }
                }
                self.backups = later;
                let outcome = if result.is_ok() { "ok" } else { "failed" };
                metrics::global()
                    .snapshots_taken
                    .get_or_create(&OutcomeLabel { outcome })
                    .inc();
                match result {
                    Ok(()) => {
                        self.snapshots.latest = self.snapshots.latest.max(index);
                        // Keep some log behind the snapshot, so a peer
                        // slightly behind catches up from the log.
                        self.core.compact_keeping(
                            index,
                            self.snapshots.keep_commands,
                            self.snapshots.keep_bytes,
                        );
                        tracing::info!(
                            id = self.core.id(),
                            index,
                            compacted = self.core.compacted(),
                            "snapshot taken"
                        );
                    }
                    Err(e) => {
                        tracing::warn!(index, error = %e, "cannot write a snapshot; the log keeps growing until one succeeds");
                    }
                }
            }
            Input::SnapshotReceived { result } => {
                self.snapshots.receiving = false;
                let outcome = if result.is_ok() { "ok" } else { "failed" };
                metrics::global()
                    .snapshot_transfers
                    .get_or_create(&OutcomeLabel { outcome })
                    .inc();
                match result {
                    Ok((index, sm)) if index > self.sm.applied() => {
                        self.sm = *sm;
                        self.snapshots.latest = self.snapshots.latest.max(index);
                        self.snapshots.log_bytes = 0;
                        self.snapshots.installed += 1;
                        let m = self.sm.known_membership().cloned();
                        self.core.install_snapshot(index, m);
                        tracing::info!(
                            id = self.core.id(),
                            index,
                            ballot = %self.core.promised(),
                            "installed a snapshot from a peer"
                        );
                    }
                    Ok(_) => {}
                    Err(e) => {
                        tracing::warn!(error = %e, "snapshot transfer failed; will retry");
                    }
                }
            }
        }
    }

    /// Answers a watch if it has events, an error, or its time is up;
    /// otherwise moves its cursor past what it has seen and hands it back.
    fn try_watch(&self, mut w: ParkedWatch, now: Instant) -> Option<ParkedWatch> {
        if w.reply.is_closed() {
            return None;
        }
        if !self.sm.watch_ready(&w.req) && now < w.until {
            return Some(w);
        }
        match self.sm.watch(&w.req) {
            Ok(resp) if resp.events.is_empty() && now < w.until => {
                w.req.from_revision = resp.next_revision;
                w.req.skip = resp.next_skip;
                Some(w)
            }
            answer => {
                let _ = w.reply.send(answer);
                None
            }
        }
    }

    /// While a round's write runs: answers `input` at once if it is a read
    /// that needs nothing of the round (a local one; a linearizable one
    /// under the leader's lease whose index is applied: `Paxos::read_now`),
    /// else hands it back for the next round. Without this, a read that
    /// arrived during a put's sync waited for that sync and then for the
    /// next round's (mixed 90/10 at 16 clients: p50 0.6 ms, against 0.2 ms
    /// for reads alone).
    pub fn read_at_once(&mut self, input: Input) -> Option<Input> {
        self.core.set_clock(self.outbox.lease_clock_us());
        let linearizable = match &input {
            Input::Get { mode, .. } | Input::Range { mode, .. } => {
                matches!(mode, ReadMode::Linearizable)
            }
            _ => return Some(input),
        };
        if linearizable {
            if !self.core.read_now(self.sm.applied()) {
                return Some(input);
            }
            metrics::global().reads_leased.inc();
        }
        match input {
            Input::Get { key, reply, .. } => {
                let _ = reply.send(Ok(self.read_local(&key)));
            }
            Input::Range { req, reply, .. } => {
                let _ = reply.send(self.sm.range(&req, &CHECKED));
            }
            other => return Some(other),
        }
        None
    }

    /// Asks the core for a linearizable read, counting those served under
    /// the lease.
    fn read(&mut self, token: u64) -> std::result::Result<(), Option<ReplicaId>> {
        if self.core.read(token)? {
            metrics::global().reads_leased.inc();
        }
        Ok(())
    }

    /// Looks at every parked watch: after a round applied changes
    /// (`applied`), or at a tick for those whose time is up.
    fn answer_watches(&mut self, applied: bool) {
        if self.watches.is_empty() {
            return;
        }
        let now = self.outbox.now();
        let parked = std::mem::take(&mut self.watches);
        for w in parked {
            let due = applied || now >= w.until || w.reply.is_closed();
            let kept = if due { self.try_watch(w, now) } else { Some(w) };
            self.watches.extend(kept);
        }
    }

    /// Starts writing a snapshot if one is due. The driver pauses only for
    /// the copy of the map; serializing and syncing happen off it.
    ///
    /// Replicas take theirs at different log positions ([`stagger`]): every
    /// replica applies the same log, so on the same thresholds all five
    /// copied their maps and wrote their files in the same second, and on
    /// a small machine puts fell to a third or to none while they did
    /// (README, "What limits them"). Staggered, a follower's pause costs
    /// the leader nothing (the others make the majority).
    fn maybe_snapshot(&mut self) {
        let applied = self.sm.applied();
        let part = stagger(self.core.id());
        let by_entries =
            applied >= next_snapshot(self.snapshots.latest, self.snapshots.every, part);
        let by_bytes = self.snapshots.log_bytes
            >= MIN_LOG_BYTES.max(self.sm.data_bytes() / 2) / 10 * (10 + part);
        if self.snapshots.taking || !(by_entries || by_bytes || !self.backups.is_empty()) {
            return;
        }
        self.start_snapshot();
    }

    /// Starts writing a snapshot of the state now. The driver pauses only
    /// for the copy of the map; the outbox writes it.
    fn start_snapshot(&mut self) {
        let applied = self.sm.applied();
        self.snapshots.taking = true;
        self.snapshots.log_bytes = 0;
        let copy = self.sm.snapshot_copy();
        self.outbox.write_snapshot(applied, copy);
    }

    /// Fetches the newest snapshot of `peer` (one transfer at a time).
    fn receive_snapshot(&mut self, peer: ReplicaId) {
        if self.snapshots.receiving {
            return;
        }
        self.snapshots.receiving = true;
        tracing::info!(
            peer,
            applied = self.sm.applied(),
            "behind the peers' logs; fetching a snapshot"
        );
        let me = self.core.id();
        self.outbox.fetch_snapshot(me, peer);
    }

    fn read_local(&self, key: &[u8]) -> GetResponse {
        GetResponse {
            value: self.sm.get(key).cloned(),
            applied: self.sm.applied(),
        }
    }

    /// Ends a round: carries out the core's `Ready` (send requests,
    /// persist and sync, release replies, apply, answer reads). An error
    /// means the round's records may not be durable: the driver must stop
    /// (its replies and applies were not released).
    pub fn round(&mut self) -> Result<()> {
        let (records, _sent, ready) = self.begin_round();
        if !records.is_empty() {
            self.last_write = WriteStats::of(&records);
            let Some(store) = self.store.as_mut() else {
                return Err(lost_store());
            };
            store.write(&records)?;
        } else {
            self.last_write = WriteStats::default();
        }
        self.end_round(ready);
        Ok(())
    }

    /// The first half of a round: sends its requests and hands back its
    /// records to persist, whether requests left, and the rest of `Ready`.
    ///
    /// Requests go out before our own sync, so the leader's disk write
    /// overlaps the followers' (one sync on the critical path, not two).
    /// Safe: answers to them are handled only after the round, i.e. after
    /// our own records are durable.
    fn begin_round(&mut self) -> (Vec<Record>, bool, Ready) {
        let mut ready = self.core.ready();
        let messages = std::mem::take(&mut ready.messages);
        let sent = !messages.is_empty();
        if let Some(m) = &ready.membership {
            self.outbox.set_members(m);
        }
        for (to, msg) in messages {
            self.outbox.send(to, msg);
        }
        // Reads whose answer needs nothing of this round go before its
        // sync: what they show was applied, after its own round's sync,
        // and nothing this round persists changes it.
        if !ready.reads_ready.is_empty() && ready.reads_index <= self.sm.applied() {
            self.answer_reads(std::mem::take(&mut ready.reads_ready));
        }
        (std::mem::take(&mut ready.persist), sent, ready)
    }

    /// Answers linearizable reads the core released.
    fn answer_reads(&mut self, tokens: Vec<u64>) {
        for token in tokens {
            match self.reads.remove(&token) {
                Some(PendingRead::Get(key, tx)) => {
                    let _ = tx.send(Ok(self.read_local(&key)));
                }
                Some(PendingRead::Range(req, tx)) => {
                    let _ = tx.send(self.sm.range(&req, &CHECKED));
                }
                None => {}
            }
        }
    }

    /// The second half of a round, once its records are durable: releases
    /// replies, applies, answers reads and watches, starts snapshots.
    fn end_round(&mut self, ready: Ready) {
        for (tx, msg) in self.held_replies.drain(..) {
            let _ = tx.send(msg);
        }
        let applied = !ready.apply.is_empty();
        for (slot, value) in ready.apply {
            self.apply(slot, value);
        }
        self.answer_changes();
        self.answer_watches(applied);
        self.answer_reads(ready.reads_ready);
        for (token, leader) in ready.reads_failed {
            if let Some(read) = self.reads.remove(&token) {
                read.fail(self.hint(leader));
            }
        }
        if let Some(peer) = ready.snapshot_from {
            self.receive_snapshot(peer);
        }
        self.maybe_snapshot();
        for (req, leader) in ready.dropped {
            if let Some(txs) = self.waiters.remove(&(req.client_id, req.seq)) {
                for tx in txs {
                    let _ = tx.send(Err(self.hint(leader)));
                }
            }
        }
    }

    /// Answers the clients waiting for a write. A configuration change
    /// that took effect waits until a majority of the voters know it chosen
    /// ([`Paxos::change_known`]): an operator who stops a removed replica
    /// once told its removal is done must not leave the others needing it
    /// (the removed leader may have been the only one that knew).
    fn answer_write(
        &mut self,
        outcome: std::result::Result<WriteOutcome, KvError>,
        txs: Vec<WriteReply>,
    ) {
        match outcome {
            Ok(done)
                if matches!(done.result, OpResult::Reconfigured(Ok(_)))
                    && self.changes.len() < MAX_CHANGES_WAITING =>
            {
                self.changes.push((done.slot, done, txs));
                self.answer_changes();
            }
            outcome => {
                for tx in txs {
                    let _ = tx.send(outcome.clone());
                }
            }
        }
    }

    /// Answers the configuration changes a majority of the voters now know
    /// chosen; forgets those nobody waits for any more.
    ///
    /// Only a leader hears what the others have chosen (and a removed one
    /// handing its change over). A replica that is neither sends the
    /// client on: the retry, same session and sequence number, finds the
    /// change applied at the leader and waits there. With a leader known,
    /// as `NotLeader` with its address, which the replica a client called
    /// forwards (the client sees only the leader's answer; one that asked
    /// not to be forwarded follows the hint with the same request). With
    /// none known, as `Unavailable`, which does not say that nothing was
    /// applied, as `NotLeader` alone would.
    fn answer_changes(&mut self) {
        if self.changes.is_empty() {
            return;
        }
        let hears = self.core.is_leader() || self.core.handing_over();
        let redirect = (!hears).then(|| match self.hint(self.core.leader()) {
            hint @ KvError::NotLeader(Some(_)) => hint,
            _ => KvError::Unavailable(
                "the configuration change is applied, but this replica stopped leading before \
                 a majority of the voters knew it, and knows no leader yet; retry (the same \
                 request), which the next leader answers once they do"
                    .into(),
            ),
        });
        let core = &self.core;
        self.changes.retain_mut(|(at, done, txs)| {
            txs.retain(|tx| !tx.is_closed());
            if txs.is_empty() {
                return false;
            }
            let answer = if core.change_known(*at) {
                Ok(done.clone())
            } else if let Some(e) = &redirect {
                Err(e.clone())
            } else {
                return true;
            };
            for tx in txs.drain(..) {
                let _ = tx.send(answer.clone());
            }
            false
        });
    }

    fn apply(&mut self, slot: u64, value: Value) {
        if slot <= self.sm.applied() {
            return; // already in an installed snapshot
        }
        match &value {
            Value::Batch(reqs) => {
                let m = metrics::global();
                m.batches.inc();
                m.batch_commands.observe(reqs.len() as f64);
                let mut bytes = 0u64;
                for req in reqs {
                    bytes += req.op.payload_len() as u64;
                    if matches!(req.op, Op::NewLeader { .. })
                        && self.leadership_entry == Some(req.seq)
                    {
                        self.leadership_applied = true;
                    }
                    self.snapshots.log_bytes += crate::paxos::request_bytes(req) as u64;
                    // A write of an unknown session is answered with the
                    // refusal: decided here, at its log position, the same
                    // on every replica.
                    let before = self.sm.duplicates();
                    let outcome = self.sm.apply(slot, req);
                    self.duplicates += self.sm.duplicates() - before;
                    if let Some(txs) = self.waiters.remove(&(req.client_id, req.seq)) {
                        self.answer_write(outcome, txs);
                    }
                }
                m.batch_bytes.observe(bytes as f64);
            }
            Value::Time(ms) => {
                let before = self.sm.sessions_dropped().0;
                self.sm.apply_time(*ms);
                let expired = self.sm.sessions_dropped().0 - before;
                if expired > 0 {
                    tracing::debug!(
                        slot,
                        expired,
                        left = self.sm.session_count(),
                        "sessions expired"
                    );
                }
            }
            Value::Noop => {}
        }
        self.sm.set_applied(slot);
        self.outbox.applied(slot, &value);
    }
}

/// Parts of the snapshot interval the replicas' snapshots are spread over.
const STAGGER_PARTS: u64 = 5;

/// Which part of the snapshot interval replica `id` takes its snapshots in
/// (0 to `STAGGER_PARTS - 1`): see [`next_snapshot`]; by bytes, that many
/// tenths later.
fn stagger(id: ReplicaId) -> u64 {
    id.saturating_sub(1) % STAGGER_PARTS
}

/// The applied index at which a replica in `part` whose newest snapshot is
/// at `latest` takes its next one, with a snapshot every `every` entries:
/// the first index after `latest` that is `part` fifths into an interval
/// (indexes `m * every + every / 5 * part`). Never more than `every` after
/// `latest`, as without the stagger.
fn next_snapshot(latest: Slot, every: u64, part: u64) -> Slot {
    let every = every.max(1);
    let offset = every / STAGGER_PARTS * part;
    let base = latest - latest % every + offset;
    if base > latest {
        base
    } else {
        base.saturating_add(every)
    }
}

/// Builds a replica's core and state machine from what it loaded at start:
/// its log's durable state, and its newest snapshot `sm` (at
/// `durable.snapshot`; an empty map without one). `given` is the
/// configuration it was started with (the replica file's, or the one
/// `--join` learned). It starts from the snapshot's configuration, else the
/// first one it recorded, else (a new replica) `given`, which it then
/// records as its seed; the last of the three is `fresh`.
pub fn recover(
    cfg: crate::paxos::Config,
    given: &Membership,
    mut durable: crate::paxos::Durable,
    mut sm: StateMachine,
) -> (Paxos, StateMachine, bool) {
    let (start, fresh) = match (sm.known_membership().cloned(), durable.membership.take()) {
        (Some(m), _) => (m, false),
        (None, Some(seed)) => (seed, false),
        (None, None) => (given.clone(), true),
    };
    sm.set_membership(start.clone());
    durable.membership = Some(start);
    durable.persist_seed = fresh;
    (Paxos::new(cfg, durable), sm, fresh)
}

/// The error of a driver whose store was lost to an earlier failure.
fn lost_store() -> ServerError {
    ServerError::Internal("storage lost after an earlier failure".into())
}

impl Node<Storage, PeerOutbox> {
    /// A sender into this driver's inbox.
    pub fn inputs(&self) -> mpsc::Sender<Input> {
        self.outbox.inputs.clone()
    }

    /// Serves inputs until `shutdown` resolves or a storage failure makes
    /// it unsafe to go on.
    pub async fn run(
        mut self,
        mut rx: mpsc::Receiver<Input>,
        tick: Duration,
        shutdown: impl std::future::Future<Output = ()>,
    ) -> Result<()> {
        let mut ticker = tokio::time::interval(tick);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        self.flush(&mut ticker, &mut rx).await?;
        tokio::pin!(shutdown);
        let mut last_slow_note: Option<Instant> = None;
        loop {
            let mut inputs = 0;
            tokio::select! {
                biased;
                _ = &mut shutdown => break,
                _ = ticker.tick() => self.tick(),
                _ = std::future::ready(()), if !self.deferred.is_empty() => {}
                input = rx.recv() => match input {
                    Some(input) => {
                        inputs += 1;
                        self.handle(input)
                    }
                    None => break,
                },
            }
            let started = Instant::now();
            while let Some(input) = self.deferred.pop_front() {
                inputs += 1;
                self.handle(input);
            }
            for _ in 0..MAX_DRAIN {
                match rx.try_recv() {
                    Ok(input) => {
                        inputs += 1;
                        self.handle(input)
                    }
                    Err(_) => break,
                }
            }
            let handled = started.elapsed();
            self.flush(&mut ticker, &mut rx).await?;
            self.observe_round();
            let took = started.elapsed();
            metrics::global().round.observe(took.as_secs_f64());
            if took >= SLOW_ROUND && last_slow_note.is_none_or(|t| t.elapsed() >= SLOW_NOTE_EVERY) {
                last_slow_note = Some(Instant::now());
                tracing::warn!(
                    id = self.core.id(),
                    took_ms = took.as_millis() as u64,
                    handling_ms = handled.as_millis() as u64,
                    inputs,
                    leader = self.core.is_leader(),
                    persisted_bytes = self.last_write.bytes,
                    compacted = self.last_write.compacts,
                    persist_ms = self.last_write.took.as_millis() as u64,
                    "a consensus round took long: heartbeats and answers were late meanwhile, \
                     and followers may have started an election (an overloaded machine, \
                     slow disk, or large values)"
                );
            }
        }
        tracing::info!(id = self.core.id(), "replica stopping");
        Ok(())
    }

    /// [`Node::round`] on tokio: the same halves, with the write on the
    /// driver's thread or on the blocking pool (see [`WriteStats::inline`]),
    /// heartbeats going out meanwhile.
    async fn flush(
        &mut self,
        ticker: &mut tokio::time::Interval,
        rx: &mut mpsc::Receiver<Input>,
    ) -> Result<()> {
        let (records, sent, ready) = self.begin_round();
        if !records.is_empty() {
            let Some(mut storage) = self.store.take() else {
                return Err(lost_store());
            };
            let write_started = Instant::now();
            self.last_write = WriteStats::of(&records);
            let result = if self.last_write.inline(&records, sent) {
                let r = storage.write(&records);
                self.store = Some(storage);
                r
            } else {
                let mut write = tokio::task::spawn_blocking(move || {
                    let r = storage.write(&records);
                    (storage, r)
                });
                // A leader keeps its heartbeats going while a long write
                // runs (large values, a compaction, a busy machine): its
                // followers would otherwise take the pause for its death.
                // Only requests go out meanwhile; answers are handled after
                // the write, as always (see `Paxos::tick_while_busy`).
                // Reads the state machine can answer now are answered
                // meanwhile (`Node::read_at_once`); other inputs wait for the
                // next round, at most `MAX_DRAIN` of them here.
                let mut open = true;
                let result = loop {
                    tokio::select! {
                        r = &mut write => break r,
                        _ = ticker.tick() => {
                            self.core.set_clock(self.outbox.lease_clock_us());
                            self.core.tick_while_busy();
                            for (to, msg) in self.core.take_messages() {
                                self.outbox.send(to, msg);
                            }
                        }
                        input = rx.recv(), if open && self.deferred.len() < MAX_DRAIN => {
                            match input {
                                Some(input) => {
                                    if let Some(input) = self.read_at_once(input) {
                                        self.deferred.push_back(input);
                                    }
                                }
                                // Closed: the run loop stops after this round.
                                None => open = false,
                            }
                        }
                    }
                };
                match result {
                    Ok((storage, r)) => {
                        self.store = Some(storage);
                        r
                    }
                    Err(e) => Err(ServerError::Internal(format!(
                        "the storage task failed: {e}"
                    ))),
                }
            };
            self.last_write.took = write_started.elapsed();
            if self.last_write.compacts {
                metrics::global().compactions.inc();
            }
            if let Err(e) = result {
                tracing::error!(error = %e, "cannot persist consensus state; stopping this replica");
                return Err(e);
            }
        } else {
            self.last_write = WriteStats::default();
        }
        self.end_round(ready);
        Ok(())
    }
}

/// Hands the heap's free pages back to the system. glibc keeps what is
/// freed for reuse, so once a snapshot's copy of the map is dropped the
/// replica's resident memory would stay at its peak (two maps, and the
/// serializer's buffers) for good: `bench/bigdata.sh` measured 4.7–6.9×
/// the live bytes at 1M keys. Called on a blocking thread after each
/// snapshot is written; with other allocators (musl) it does nothing.
// The second unsafe call of the binary (see `cluster::send_signal`).
#[allow(unsafe_code)]
pub(crate) fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim(3) takes a padding size and only walks and
    // releases the allocator's own free memory; it is thread-safe (it
    // takes each arena's lock) and touches nothing of ours.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Whether handling `input` may grant or check a lease, and so needs a
/// fresh reading of the lease clock: a heartbeat (an acceptor's grant), a
/// prepare (its refusal), a linearizable read (a leader's lease).
fn times_a_lease(input: &Input) -> bool {
    match input {
        Input::Peer { msg, .. } => matches!(msg, Msg::Heartbeat(_) | Msg::Prepare(_)),
        Input::Get { mode, .. } | Input::Range { mode, .. } => {
            matches!(mode, ReadMode::Linearizable)
        }
        _ => false,
    }
}

/// The clock leases are timed by, in microseconds since boot: Linux's
/// CLOCK_BOOTTIME, which, unlike CLOCK_MONOTONIC (`Instant`), keeps
/// counting while the machine is suspended, so a leader that sleeps
/// through its lease finds it expired when it wakes. Elsewhere, `Instant`
/// from the first reading.
// The third unsafe call of the binary (see `release_free_memory`).
#[allow(unsafe_code)]
pub fn lease_clock_us() -> u64 {
    #[cfg(target_os = "linux")]
    {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: clock_gettime(2) writes the one timespec we pass, which
        // we own and which outlives the call.
        if unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) } == 0 {
            let secs = u64::try_from(ts.tv_sec).unwrap_or(0);
            let nanos = u64::try_from(ts.tv_nsec).unwrap_or(0);
            return secs.saturating_mul(1_000_000).saturating_add(nanos / 1_000);
        }
    }
    static ORIGIN: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    u64::try_from(ORIGIN.get_or_init(Instant::now).elapsed().as_micros()).unwrap_or(u64::MAX)
}

/// This replica's clock, in milliseconds since the Unix epoch (0 if it is
/// before 1970). Only ever written into the log by a leader; nothing is
/// decided by it directly.
fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// What one round's log write holds, and (once done) how long it took.
#[derive(Clone, Copy, Debug, Default)]
struct WriteStats {
    /// Bytes of the records, roughly (values counted, others 16 each).
    bytes: usize,
    /// Whether it compacts the log (then it starts a new log segment).
    compacts: bool,
    took: Duration,
}

impl WriteStats {
    fn of(records: &[crate::paxos::Record]) -> WriteStats {
        use crate::paxos::Record;
        let mut stats = WriteStats::default();
        for r in records {
            stats.bytes += match r {
                Record::Accepted { value, .. } => crate::paxos::value_bytes(value),
                _ => 16,
            };
            stats.compacts |= matches!(r, Record::Compacted(_));
        }
        stats
    }

    /// Whether to write `records` on the driver's own thread rather than
    /// on the blocking pool. Handing a write to the pool costs two thread
    /// wakeups, which on a small machine cost more than the write itself:
    /// measured with `perf stat -e context-switches` under one put client,
    /// they were most of the CPU a put costs. So the pool is used only
    /// where it buys something: when requests were just handed to the
    /// network (`sent`), which must reach the wire while the leader's own
    /// sync runs; for a compaction, which starts a new log segment (file
    /// creation and directory syncs); and for a large write (big values),
    /// whose sync takes long enough that the network must be read
    /// meanwhile, or heartbeats queue behind it and followers start
    /// elections. A follower's small accept (nothing is sent before its
    /// sync) and a write that only moves the chosen mark (storage keeps
    /// that in memory until its next synced write: no I/O at all) run
    /// inline.
    fn inline(&self, records: &[crate::paxos::Record], sent: bool) -> bool {
        !(self.compacts
            || self.bytes > INLINE_WRITE_BYTES
            || (sent && crate::storage::needs_sync(records)))
    }
}

/// Above this many bytes a log write runs on the blocking pool.
const INLINE_WRITE_BYTES: usize = 256 << 10;

async fn download(
    pool: Arc<PeerPool>,
    peer: ReplicaId,
    me: ReplicaId,
    dir: SnapshotDir,
) -> std::result::Result<(Slot, Box<StateMachine>), String> {
    use tokio::io::AsyncWriteExt;
    let partial = dir.partial_path();
    let mut file = tokio::fs::File::create(&partial)
        .await
        .map_err(|e| format!("{}: {e}", partial.display()))?;
    let mut index = None;
    let mut offset = 0u64;
    loop {
        let chunk = pool
            .snapshot_chunk(
                peer,
                SnapshotRequest {
                    from: me,
                    index,
                    offset,
                    max_len: MAX_SNAPSHOT_CHUNK,
                },
            )
            .await?;
        if index.is_some_and(|i| i != chunk.index) || chunk.offset != offset {
            return Err("the peer answered for another snapshot or offset".into());
        }
        index = Some(chunk.index);
        if chunk.data.is_empty() && offset < chunk.total_len {
            return Err("the peer sent an empty chunk before the end".into());
        }
        file.write_all(&chunk.data)
            .await
            .map_err(|e| format!("{}: {e}", partial.display()))?;
        offset += chunk.data.len() as u64;
        metrics::global()
            .snapshot_transfer_bytes
            .inc_by(chunk.data.len() as u64);
        if offset >= chunk.total_len {
            break;
        }
    }
    file.sync_all()
        .await
        .map_err(|e| format!("{}: {e}", partial.display()))?;
    drop(file);
    let index = index.unwrap_or(0);
    let installed = tokio::task::spawn_blocking(move || {
        // Decoding verifies the checksum: a damaged transfer is never committed.
        let (found, sm) = SnapshotDir::read_file(&partial)?;
        if found != index {
            return Err(crate::ServerError::Internal(format!(
                "the snapshot file says index {found}, the transfer said {index}"
            )));
        }
        dir.commit(&partial, index)?;
        Ok((index, Box::new(sm)))
    })
    .await
    .map_err(|e| e.to_string())?;
    installed.map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replicas_take_their_snapshots_at_different_indexes_within_the_interval() {
        // Every 10,000 entries: five replicas, five positions 2,000 apart.
        let firsts: Vec<Slot> = (1..=5)
            .map(|id| next_snapshot(0, 10_000, stagger(id)))
            .collect();
        assert_eq!(firsts, vec![10_000, 2_000, 4_000, 6_000, 8_000]);
        for id in 1..=5u64 {
            let part = stagger(id);
            let mut latest = 0;
            for _ in 0..5 {
                let next = next_snapshot(latest, 10_000, part);
                assert!(
                    next > latest && next <= latest + 10_000,
                    "{latest} -> {next}"
                );
                assert_eq!(next % 10_000, 2_000 * part);
                latest = next;
            }
            // After a snapshot installed from a peer (another position),
            // back to its own within one interval.
            let next = next_snapshot(12_345, 10_000, part);
            assert!(next > 12_345 && next <= 22_345 && next % 10_000 == 2_000 * part);
        }
        // Intervals too short to split, and none at all.
        assert_eq!(next_snapshot(7, 3, stagger(4)), 9);
        assert_eq!(next_snapshot(0, 1, stagger(5)), 1);
        assert!(next_snapshot(5, u64::MAX / 4, stagger(2)) > 5);
    }
}
