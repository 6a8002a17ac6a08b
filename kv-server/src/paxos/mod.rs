//! The Multi-Paxos core: a deterministic state machine with no I/O.
//!
//! Messages and timer ticks go in ([`Paxos::step`], [`Paxos::tick`],
//! [`Paxos::propose`], [`Paxos::read`]); [`Paxos::ready`] hands out what the
//! driver must do: records to persist, messages to send, chosen entries to
//! apply, reads that may now be served. The driver must persist a `Ready`'s
//! records (and sync) before it delivers the replies returned by `step` in
//! that round, and before it steps in any answer to the round's messages.
//! That rule gives the acceptor its durability: a promise or an accept is on
//! disk before anyone hears of it. The round's *requests* (`messages`) may
//! leave before the sync completes: nothing counts our own vote until the
//! answers come back, and they are handled after the sync.
//!
//! Roles: every replica is an acceptor and a learner. One of them leads: it
//! won phase 1 for its ballot at a majority, and then runs only phase 2 (one
//! round trip to a majority per batch of commands), several slots in flight.
//! A replica that started with an empty log is only a learner until it
//! knows it may vote ([`Standing`]). Elections begin with a pre-vote, so a
//! replica that cannot win never raises its ballot.
//!
//! Every message is bounded in bytes: slots by [`Config::max_batch_bytes`],
//! accepts, fetch replies and promises by [`Config::max_message_bytes`] (a
//! promise too big for one message comes in pages, and a candidate counts
//! it only once it has every page).

mod quorum;

use std::collections::{BTreeMap, BTreeSet, HashSet, VecDeque};

use kv_peer_api::{
    Accept, Accepted, AcceptedEntry, Ballot, Fetch, FetchReply, Heartbeat, HeartbeatAck, Prepare,
    Probe, ProbeReply, Promise, ReplicaId, Slot, Value, WriteRequest,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use quorum::Quorum;

/// Default bytes of client commands per slot: one value of the maximum
/// size (a larger command still gets a slot of its own). Big enough that
/// batching still pays for small commands (512 commands of up to 2 KiB),
/// small enough that a slot is synced and sent in a few milliseconds even
/// on a busy machine and every message stays far below the frame limit
/// (`kv_api::MAX_FRAME`, 64 MiB).
pub const MAX_BATCH_BYTES: usize = 1 << 20;

/// How far past its chosen prefix an acceptor accepts a slot. A leader
/// proposes only a few slots past its own chosen prefix; a follower this
/// far behind does not vote on new slots until it has fetched the log (or
/// a snapshot). Bounds what a new leader may have to re-propose.
pub const MAX_ACCEPT_AHEAD: Slot = 1 << 16;

/// Bytes of accepted entries one promise may report over all its pages.
pub const MAX_PROMISE_BYTES: usize = 256 << 20;

/// Default bytes of log entries per message: a few full slots.
pub const MAX_MESSAGE_BYTES: usize = 8 << 20;

/// Bytes a client command counts for in the byte limits: its keys and
/// values plus its fixed fields.
pub fn request_bytes(r: &WriteRequest) -> usize {
    r.op.payload_len() + 32
}

/// Bytes a log entry's value counts for in the byte limits.
pub fn value_bytes(v: &Value) -> usize {
    match v {
        Value::Noop | Value::Time(_) => 16,
        Value::Batch(b) => 16 + b.iter().map(request_bytes).sum::<usize>(),
    }
}

/// Tuning of the core, in ticks and counts.
#[derive(Clone, Debug)]
pub struct Config {
    /// This replica.
    pub id: ReplicaId,
    /// Every replica, this one included.
    pub members: Vec<ReplicaId>,
    /// A leader sends heartbeats this often.
    pub heartbeat_ticks: u32,
    /// A follower that hears no leader for a random number of ticks in this
    /// range starts an election.
    pub election_ticks: (u32, u32),
    /// A leader re-sends accepts not yet answered by a majority after this long.
    pub retransmit_ticks: u32,
    /// Slots a leader may have in flight (proposed, not chosen).
    pub max_inflight: usize,
    /// Bytes of slots a leader may have in flight: with large values, what
    /// every follower must receive and sync before the next slot starts
    /// (flow control: past this, proposals wait in the queue, and beyond
    /// the queue's bytes clients are told to retry).
    pub max_inflight_bytes: usize,
    /// Client commands per slot, at most.
    pub max_batch: usize,
    /// Bytes of client commands per slot, at most (a single command is
    /// always taken, whatever its size).
    pub max_batch_bytes: usize,
    /// Entries per catch-up fetch and per accept message.
    pub max_entries_per_message: usize,
    /// Bytes of log entries per message (accept, promise, fetch reply), at
    /// most; a single entry always goes, so this must exceed the largest
    /// slot (`max_batch_bytes` plus one command) and stay well below the
    /// transport's frame limit.
    pub max_message_bytes: usize,
    /// Proposals queued at a leader waiting for a slot, at most.
    pub max_queue: usize,
    /// Bytes of proposals queued at a leader, at most.
    pub max_queue_bytes: usize,
    /// Thrifty phase 2: a leader sends a new accept at once only to as many
    /// followers as it needs for a majority (those answering best), and to
    /// the others batched at the next tick. See [`Paxos::tick`].
    pub thrifty: bool,
    /// Pre-vote before raising a ballot (see [`Paxos::tick`]'s election).
    /// Always on in a replica; the simulation turns it off in some seeds to
    /// keep duelling candidates, which it otherwise makes rare, in its
    /// reach. A replica that lost its state relies on it to rejoin safely.
    pub pre_vote: bool,
    /// Seed of the election-timeout jitter.
    pub seed: u64,
}

impl Config {
    /// Default tuning for replica `id` among `members`.
    pub fn new(id: ReplicaId, members: Vec<ReplicaId>) -> Config {
        Config {
            id,
            members,
            heartbeat_ticks: 5,
            election_ticks: (15, 30),
            retransmit_ticks: 30,
            max_inflight: 8,
            max_inflight_bytes: 4 * MAX_BATCH_BYTES,
            max_batch: 512,
            max_batch_bytes: MAX_BATCH_BYTES,
            max_entries_per_message: 256,
            max_message_bytes: MAX_MESSAGE_BYTES,
            max_queue: 100_000,
            max_queue_bytes: 256 << 20,
            thrifty: true,
            pre_vote: true,
            seed: id,
        }
    }
}

/// A message between replicas.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Msg {
    /// Phase 1a.
    Prepare(Prepare),
    /// Phase 1b.
    Promise(Promise),
    /// Phase 2a.
    Accept(Accept),
    /// Phase 2b.
    Accepted(Accepted),
    /// Leader liveness.
    Heartbeat(Heartbeat),
    /// Answer to a heartbeat.
    HeartbeatAck(HeartbeatAck),
    /// Catch-up request.
    Fetch(Fetch),
    /// Catch-up answer.
    FetchReply(FetchReply),
    /// What do you hold? (from a replica that started empty)
    Probe(Probe),
    /// Answer to a probe.
    ProbeReply(ProbeReply),
}

impl Msg {
    /// The replica that sent it.
    pub fn from(&self) -> ReplicaId {
        match self {
            Msg::Prepare(m) => m.from,
            Msg::Promise(m) => m.from,
            Msg::Accept(m) => m.from,
            Msg::Accepted(m) => m.from,
            Msg::Heartbeat(m) => m.from,
            Msg::HeartbeatAck(m) => m.from,
            Msg::Fetch(m) => m.from,
            Msg::FetchReply(m) => m.from,
            Msg::Probe(m) => m.from,
            Msg::ProbeReply(m) => m.from,
        }
    }
}

/// Why a proposal was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// This replica does not lead; the leader it knows of, if any.
    NotLeader(Option<ReplicaId>),
    /// This replica leads but its proposal queue is full: retry later.
    Busy,
}

/// What must reach the disk before a `Ready`'s replies go out.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Record {
    /// The highest ballot promised.
    Promised(Ballot),
    /// A value accepted (or learned chosen) for a slot.
    Accepted {
        /// The slot.
        slot: Slot,
        /// The ballot (of the acceptance; `Ballot::ZERO` for a learned value).
        ballot: Ballot,
        /// The value.
        value: Value,
    },
    /// Every slot up to and including this one is chosen, and the stored
    /// value of each is the chosen one.
    Chosen(Slot),
    /// Entries at or below this slot are covered by a durable snapshot and
    /// may be deleted.
    Compacted(Slot),
    /// The highest election round this replica granted in a pre-vote (the
    /// maximum counts). See [`Standing`] for why it must be durable.
    PreVoted(u64),
    /// This replica's standing as an acceptor changed.
    Standing(Standing),
}

/// Whether a replica may vote (promise and accept), as far as its own
/// durable state tells.
///
/// # Losing a disk (amnesia)
///
/// An acceptor that forgets what it promised and accepted breaks Paxos: it
/// may have helped choose a value that a later quorum, with its forgetful
/// help, never hears of. A replica whose log is empty at start cannot tell
/// a new cluster from a lost disk (the README's own recovery procedure is
/// to delete the data directory), so it starts [`Standing::Unknown`] and
/// votes in nothing until it has found out. It still learns: chosen values
/// are facts, fetched and applied like any follower's.
///
/// It asks every peer ([`Probe`]) whether it votes, whether it holds any
/// history (a promise, an accepted or chosen value, a snapshot) and the
/// highest round it promised or granted in a pre-vote.
///
/// * **New cluster.** If every other replica answers with no history, no
///   value was ever chosen (that takes a majority of acceptances, so at
///   least one other replica would hold it) and no candidate holds a
///   promise of ours (it would have promised its own ballot first). There
///   is nothing to forget: it votes ([`Standing::Voter`]). This needs an
///   answer from every replica, not a majority: a replica that lost its own
///   disk also answers "no history", and two of them must not outvote the
///   one that still holds a value they chose together.
/// * **Rejoining.** If a majority of the replicas (not counting itself)
///   answer as voters, it takes `floor` = one above the highest round
///   they report, and becomes [`Standing::Rejoining`]. It votes again once
///   it hears a leader whose ballot has round `floor` or more and it knows
///   every slot up to that leader's `term_start` chosen.
///
/// Why that is safe. (1) Every ballot a candidate campaigns with was first
/// granted in a pre-vote by a majority, durably ([`Record::PreVoted`]), or
/// is the candidate's own, durably promised before it answers anyone; any
/// majority of the others meets one of those, so no ballot we may have
/// promised before losing our state has a round of `floor` or more. Voting
/// only at ballots of round `floor` or more, we never break such a promise
/// and never accept below it. (2) A leader of round `floor` or more
/// completed phase 1 without us (we answered no prepare): a majority of
/// the others promised its ballot and reported what they accepted. A value
/// chosen in an earlier ballot, even with our forgotten vote, was accepted
/// by a majority, which meets that one in a replica that reported it; so
/// the leader re-proposed it, at a slot at or below its `term_start`, and
/// no earlier ballot can get anything else chosen at a slot above it (it
/// would need acceptances from replicas that have promised the newer
/// ballot). Once we know every slot up to `term_start` chosen, our log
/// holds every value we may have voted for that matters. (3) A leader asked
/// by a rejoining replica ([`HeartbeatAck::rejoin_floor`]) runs phase 1
/// again in round `floor`, so a replica does not wait for the next leader
/// change; the others still follow it, so they promise at once.
///
/// The simulation wipes disks (`kv-server/tests/simulation.rs`); with
/// replicas that vote at once after a wipe, it finds two replicas applying
/// different values in one slot in about half of its seeds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Standing {
    /// Its log was empty at start: it cannot rule out having lost its
    /// state (a wiped or replaced disk), so it votes in nothing until it
    /// has found out from its peers.
    #[default]
    Unknown,
    /// It lost its state. It votes again only in ballots of at least this
    /// round, and only once it has caught up.
    Rejoining {
        /// The lowest round it may vote in.
        floor: u64,
    },
    /// A full acceptor: its log holds everything it ever promised and
    /// accepted.
    Voter,
}

/// What the driver must do after a round of input.
#[derive(Debug, Default)]
pub struct Ready {
    /// Persist these, in order, in one atomic, synced write.
    pub persist: Vec<Record>,
    /// Send these requests (may overlap the sync; their answers must be
    /// stepped in only after it).
    pub messages: Vec<(ReplicaId, Msg)>,
    /// Then apply these chosen entries, in order (contiguous).
    pub apply: Vec<(Slot, Value)>,
    /// Linearizable reads that may be served once `apply` is applied.
    pub reads_ready: Vec<u64>,
    /// Reads refused: this replica no longer leads (hint: who might).
    pub reads_failed: Vec<(u64, Option<ReplicaId>)>,
    /// Proposals dropped before they got a slot (this replica stopped leading).
    pub dropped: Vec<(WriteRequest, Option<ReplicaId>)>,
    /// This replica is behind what its peers keep in their logs: fetch the
    /// snapshot from this peer and [`Paxos::install_snapshot`] it.
    pub snapshot_from: Option<ReplicaId>,
}

impl Ready {
    /// Whether there is nothing to do.
    pub fn is_empty(&self) -> bool {
        self.persist.is_empty()
            && self.messages.is_empty()
            && self.apply.is_empty()
            && self.reads_ready.is_empty()
            && self.reads_failed.is_empty()
            && self.dropped.is_empty()
            && self.snapshot_from.is_none()
    }
}

/// One log entry as this replica knows it.
#[derive(Clone, Debug)]
struct Entry {
    ballot: Ballot,
    value: Value,
    chosen: bool,
}

/// What this replica is doing about leadership, with the state only that
/// role has: leaving a role drops its state.
#[derive(Debug)]
enum Role {
    Follower,
    /// Asking for pre-votes: no ballot raised yet.
    PreCandidate(PreCandidate),
    /// Running phase 1 for its promised ballot.
    Candidate(Candidate),
    /// Won phase 1 for its promised ballot: runs phase 2.
    Leader(Box<Leader>),
}

/// A replica asking for pre-votes.
#[derive(Debug)]
struct PreCandidate {
    /// The ballot it would campaign with.
    ballot: Ballot,
    /// Who granted it (itself included).
    votes: BTreeSet<ReplicaId>,
}

/// A replica running phase 1.
#[derive(Debug, Default)]
struct Candidate {
    /// Promises for our ballot, by sender (ours included). A promise whose
    /// `more` is set still lacks pages.
    promises: BTreeMap<ReplicaId, Promise>,
}

/// What only a leader holds: dropped when it steps down.
#[derive(Debug)]
struct Leader {
    /// The next slot to propose in.
    next_slot: Slot,
    /// The last slot this leader re-proposed when it was elected.
    term_start: Slot,
    /// Slots proposed and not yet chosen.
    pending: BTreeMap<Slot, Pending>,
    /// Proposals waiting for a slot.
    queue: VecDeque<WriteRequest>,
    queue_bytes: usize,
    /// A time entry to propose (see [`Paxos::propose_time`]).
    time: Option<u64>,
    /// The tick the last heartbeat round started.
    last_heartbeat: u64,
    /// Per follower, the latest heartbeat round it acknowledged.
    hb_acks: BTreeMap<ReplicaId, u64>,
    /// Per follower, the tick it last answered (an accept or a heartbeat).
    last_ack_tick: BTreeMap<ReplicaId, u64>,
    /// Followers in the order a thrifty leader prefers them.
    preferred: Vec<ReplicaId>,
    /// Slots not yet sent to a follower (thrifty), sent at the next tick.
    deferred: BTreeMap<ReplicaId, Vec<Slot>>,
    /// Thrifty targets sent accepts they have not answered yet, with the
    /// tick of the oldest such send.
    waiting_since: BTreeMap<ReplicaId, u64>,
    /// The latest heartbeat round a majority acknowledged.
    confirmed_round: u64,
    /// When the heartbeat round not yet confirmed started, if any.
    round_started: Option<u64>,
    /// Linearizable reads waiting for their round and for apply.
    reads: VecDeque<PendingRead>,
}

impl Leader {
    /// Whether another slot may start.
    fn room_in_flight(&self, cfg: &Config) -> bool {
        let bytes: usize = self.pending.values().map(|p| p.bytes).sum();
        self.pending.len() < cfg.max_inflight
            && (self.pending.is_empty() || bytes < cfg.max_inflight_bytes)
    }
}

/// A slot a leader proposed and awaits a majority for.
#[derive(Debug)]
struct Pending {
    acks: HashSet<ReplicaId>,
    sent_tick: u64,
    /// Times re-sent.
    resent: u32,
    bytes: usize,
}

/// A linearizable read waiting for its heartbeat round and for apply.
#[derive(Debug)]
struct PendingRead {
    token: u64,
    index: Slot,
    round: u64,
}

/// Durable state loaded at start-up.
#[derive(Debug, Default)]
pub struct Durable {
    /// Highest ballot promised.
    pub promised: Ballot,
    /// Contiguous chosen prefix.
    pub chosen: Slot,
    /// Accepted entries (`slot, ballot, value`), any order.
    pub entries: Vec<(Slot, Ballot, Value)>,
    /// The index of the snapshot the state machine starts from (0: none).
    pub snapshot: Slot,
    /// Entries at or below this slot were deleted (they are in a snapshot).
    pub compacted: Slot,
    /// The highest round granted in a pre-vote.
    pub prevoted: u64,
    /// Whether this replica may vote.
    pub standing: Standing,
}

/// The Multi-Paxos state machine of one replica.
pub struct Paxos {
    cfg: Config,
    /// Every quorum decision goes through it.
    quorum: Quorum,
    rng: StdRng,
    now: u64,

    // Acceptor.
    /// Whether this replica may vote, and how it gets there.
    standing: Standing,
    /// Answers to our probes while our standing is unknown.
    probes: BTreeMap<ReplicaId, ProbeReply>,
    promised: Ballot,
    /// The highest round granted in a pre-vote (durable).
    prevoted: u64,
    /// The highest round seen in a refusal (not durable): the next
    /// pre-vote asks for a round above it.
    seen_round: u64,
    log: BTreeMap<Slot, Entry>,
    /// Every slot `<= chosen` is chosen.
    chosen: Slot,
    /// Entries `<= compacted` are gone from the log (in a snapshot).
    compacted: Slot,
    /// Highest slot handed out for apply.
    applied: Slot,

    // Role: follower, pre-candidate, candidate or leader, each with its
    // own state.
    role: Role,
    /// The leader this replica follows, if it knows one.
    leader: Option<ReplicaId>,
    last_heard: u64,
    election_at: u64,
    /// Heartbeat rounds are numbered over this replica's life, not per
    /// term: an answer to a round of an earlier term never confirms one of
    /// a later term.
    hb_round: u64,

    // Learner.
    fetch_started: Option<u64>,

    out: Ready,
    chosen_dirty: bool,
}

impl Paxos {
    /// A replica starting from its durable state.
    pub fn new(cfg: Config, durable: Durable) -> Paxos {
        let quorum = Quorum::new(cfg.id, cfg.members.clone());
        let rng = StdRng::seed_from_u64(cfg.seed);
        // A snapshot received from a peer may be ahead of the log's record
        // of what is chosen (a crash after the snapshot was renamed into
        // place, before the compaction was synced). The entries between
        // the two are not known chosen: they may be values accepted but
        // never chosen, so they must not be served to peers as chosen.
        // The snapshot covers them: drop them.
        let chosen = durable.chosen.max(durable.snapshot);
        let mut compacted = durable.compacted;
        let mut persist = Vec::new();
        if durable.snapshot > durable.chosen && durable.snapshot > compacted {
            compacted = durable.snapshot;
            persist.push(Record::Compacted(compacted));
        }
        if durable.standing == Standing::Unknown {
            // Written before anything else this replica may persist
            // (learned entries, say), so that a restart does not take a
            // non-empty log for a voter's.
            persist.push(Record::Standing(Standing::Unknown));
        }
        let mut log = BTreeMap::new();
        for (slot, ballot, value) in durable.entries {
            if slot <= compacted {
                continue;
            }
            log.insert(
                slot,
                Entry {
                    ballot,
                    value,
                    chosen: slot <= chosen,
                },
            );
        }
        let mut p = Paxos {
            quorum,
            rng,
            now: 0,
            standing: durable.standing,
            probes: BTreeMap::new(),
            promised: durable.promised,
            prevoted: durable.prevoted,
            seen_round: 0,
            log,
            chosen,
            compacted,
            applied: durable.snapshot,
            role: Role::Follower,
            leader: None,
            last_heard: 0,
            election_at: 0,
            hb_round: 0,
            fetch_started: None,
            out: Ready {
                persist,
                ..Ready::default()
            },
            chosen_dirty: false,
            cfg,
        };
        p.reset_election_timer();
        p.emit_apply();
        p.decide_standing();
        p
    }

    /// Whether this replica may vote (promise, accept, campaign).
    pub fn standing(&self) -> Standing {
        self.standing
    }

    fn votes(&self) -> bool {
        self.standing == Standing::Voter
    }

    /// This replica's id.
    pub fn id(&self) -> ReplicaId {
        self.cfg.id
    }

    /// Whether this replica leads (phase 1 done for its ballot).
    pub fn is_leader(&self) -> bool {
        matches!(self.role, Role::Leader(_))
    }

    /// The leader's state, if this replica leads.
    fn lead(&mut self) -> Option<&mut Leader> {
        match &mut self.role {
            Role::Leader(l) => Some(l),
            _ => None,
        }
    }

    /// The leader this replica knows of.
    pub fn leader(&self) -> Option<ReplicaId> {
        match self.role {
            Role::Leader(_) => Some(self.cfg.id),
            _ => self.leader,
        }
    }

    /// The highest ballot promised.
    pub fn promised(&self) -> Ballot {
        self.promised
    }

    /// The contiguous chosen prefix.
    pub fn chosen(&self) -> Slot {
        self.chosen
    }

    /// The highest slot handed out for apply.
    pub fn applied(&self) -> Slot {
        self.applied
    }

    /// Entries at or below this slot have been dropped.
    pub fn compacted(&self) -> Slot {
        self.compacted
    }

    /// Drops log entries up to `upto` (capped at what was applied): a
    /// snapshot covering them is durable.
    pub fn compact(&mut self, upto: Slot) {
        let upto = upto.min(self.applied);
        if upto <= self.compacted {
            return;
        }
        self.log = self.log.split_off(&(upto + 1));
        self.compacted = upto;
        self.out.persist.push(Record::Compacted(upto));
    }

    /// Drops log entries up to `upto`, but keeps enough of the newest ones
    /// before it to hold `keep_commands` client commands (a no-op counts as
    /// one) or `keep_bytes` bytes, whichever is less, for peers slightly
    /// behind to catch up from the log. (By commands alone, 1,000 values of
    /// 1 MiB would be kept in memory and rewritten into every checkpoint.)
    pub fn compact_keeping(&mut self, upto: Slot, keep_commands: usize, keep_bytes: usize) {
        let mut kept = 0;
        let mut bytes = 0;
        let mut cut = upto.min(self.applied);
        for (&slot, e) in self.log.range(..=cut).rev() {
            bytes += value_bytes(&e.value);
            if kept >= keep_commands || bytes > keep_bytes {
                break;
            }
            kept += match &e.value {
                Value::Batch(b) => b.len().max(1),
                Value::Noop | Value::Time(_) => 1,
            };
            cut = slot - 1;
        }
        self.compact(cut);
    }

    /// The state machine was replaced by a snapshot at `index` (durable):
    /// everything up to it counts as chosen and applied.
    pub fn install_snapshot(&mut self, index: Slot) {
        if index <= self.applied {
            return;
        }
        tracing::info!(
            id = self.cfg.id,
            index,
            behind_by = index - self.applied,
            "installed snapshot"
        );
        self.out.apply.retain(|(slot, _)| *slot > index);
        self.applied = index;
        if index > self.chosen {
            self.chosen = index;
            self.chosen_dirty = true;
        }
        let chosen = self.chosen;
        if let Some(l) = self.lead() {
            l.pending = l.pending.split_off(&(index + 1));
            l.next_slot = l.next_slot.max(chosen + 1);
        }
        self.log = self.log.split_off(&(index + 1));
        self.compacted = self.compacted.max(index);
        self.out.persist.push(Record::Compacted(self.compacted));
        self.fetch_started = None;
        self.advance_chosen();
        self.emit_apply();
    }

    fn others(&self) -> Vec<ReplicaId> {
        self.quorum.others()
    }

    fn send(&mut self, to: ReplicaId, msg: Msg) {
        self.out.messages.push((to, msg));
    }

    fn broadcast(&mut self, msg: Msg) {
        for to in self.others() {
            self.send(to, msg.clone());
        }
    }

    fn reset_election_timer(&mut self) {
        let (lo, hi) = self.cfg.election_ticks;
        let span = self.rng.random_range(lo..=hi.max(lo));
        self.last_heard = self.now;
        self.election_at = self.now + u64::from(span);
    }

    fn promise(&mut self, ballot: Ballot) {
        if ballot > self.promised {
            self.promised = ballot;
            self.out.persist.push(Record::Promised(ballot));
        }
    }

    /// Another replica holds a ballot above ours: follow it. Whatever the
    /// role held goes with it; a leader's queued proposals and waiting
    /// reads are handed back to the driver, refused.
    fn step_down(&mut self, leader: Option<ReplicaId>) {
        if !matches!(self.role, Role::Follower) {
            tracing::info!(id = self.cfg.id, ballot = %self.promised, ?leader, "stepping down");
        }
        if let Role::Leader(l) = std::mem::replace(&mut self.role, Role::Follower) {
            for req in l.queue {
                self.out.dropped.push((req, leader));
            }
            for r in l.reads {
                self.out.reads_failed.push((r.token, leader));
            }
        }
        self.leader = leader;
    }

    /// Advances the logical clock by one tick.
    pub fn tick(&mut self) {
        self.now += 1;
        match &self.role {
            Role::Leader(l) => {
                if self.now >= l.last_heartbeat + u64::from(self.cfg.heartbeat_ticks) {
                    self.start_heartbeat_round();
                }
                self.demote_slow_targets();
                self.send_deferred();
                self.retransmit();
                self.check_quorum();
            }
            Role::Follower | Role::PreCandidate(_) | Role::Candidate(_) => {
                if self.votes() && self.now >= self.election_at {
                    self.start_pre_vote();
                }
            }
        }
        if self.standing == Standing::Unknown
            && self
                .now
                .is_multiple_of(u64::from(self.cfg.heartbeat_ticks.max(1)))
        {
            self.broadcast(Msg::Probe(Probe { from: self.cfg.id }));
        }
        if let Some(t) = self.fetch_started {
            if self.now > t + u64::from(self.cfg.retransmit_ticks) {
                self.fetch_started = None;
            }
        }
    }

    /// A tick while the driver waits for a long write of this round: a
    /// leader keeps sending heartbeats and deferred accepts (requests, which
    /// may leave before the write completes), and does nothing that depends
    /// on answers, which are handled only after it (no step-down for lack
    /// of acknowledgements, no retransmits, no demotions). A follower does
    /// nothing: its election timer should not run while it is busy.
    pub fn tick_while_busy(&mut self) {
        let Role::Leader(l) = &self.role else {
            return;
        };
        let last_heartbeat = l.last_heartbeat;
        self.now += 1;
        if self.now >= last_heartbeat + u64::from(self.cfg.heartbeat_ticks) {
            self.start_heartbeat_round();
        }
        self.send_deferred();
    }

    /// Takes the messages to send now, leaving the rest of the round's
    /// output (records, applies) for the next [`Paxos::ready`].
    pub fn take_messages(&mut self) -> Vec<(ReplicaId, Msg)> {
        std::mem::take(&mut self.out.messages)
    }

    /// A leader that has not heard from a majority for an election timeout
    /// steps down, so clients stuck with a cut-off leader are told to go
    /// elsewhere instead of waiting.
    fn check_quorum(&mut self) {
        let window = u64::from(self.cfg.election_ticks.1);
        if self.now < window {
            return;
        }
        let Role::Leader(l) = &self.role else {
            return;
        };
        let recent = l
            .last_ack_tick
            .iter()
            .filter(|&(_, &t)| t + window >= self.now)
            .map(|(&r, _)| r);
        if !self
            .quorum
            .is_majority(std::iter::once(self.cfg.id).chain(recent))
        {
            tracing::warn!(
                id = self.cfg.id,
                "lost contact with a majority; stepping down"
            );
            self.step_down(None);
            self.reset_election_timer();
        }
    }

    /// Pre-vote: asks the others whether they would promise a ballot one
    /// round above anything we know, without anyone promising anything.
    /// Only with a majority's yes does the real election raise ballots.
    ///
    /// Why: a replica that cannot win — cut off from the others, or facing
    /// a leader the others still hear — would otherwise raise its ballot
    /// at every election timeout, and on coming back its higher ballot,
    /// shown in its answers, would make a healthy leader step down. A
    /// replica refuses a pre-vote while it hears a live leader, so a
    /// returning replica cannot disrupt a working cluster.
    ///
    /// A grant is persisted (`Record::PreVoted`) before it is sent: every
    /// ballot anyone campaigns with was first granted, durably, by a
    /// majority. A replica that lost its state relies on this to find a
    /// round above every ballot it may have promised (see [`Standing`]).
    /// The candidate's own grant need not be durable: a majority of the
    /// others always includes one of the other granters or the candidate
    /// itself, whose real prepare is durable before it answers anyone.
    fn start_pre_vote(&mut self) {
        let round = self
            .promised
            .round
            .max(self.seen_round)
            .max(self.prevoted)
            .saturating_add(1);
        let ballot = Ballot {
            round,
            id: self.cfg.id,
        };
        if !self.cfg.pre_vote {
            return self.start_election(ballot);
        }
        tracing::debug!(id = self.cfg.id, %ballot, "asking for pre-votes");
        self.step_down(None);
        self.role = Role::PreCandidate(PreCandidate {
            ballot,
            votes: BTreeSet::from([self.cfg.id]),
        });
        self.reset_election_timer();
        self.broadcast_prepare(ballot, true);
        self.maybe_prevoted();
    }

    /// Asks every other replica to promise `ballot` (or, for a pre-vote,
    /// whether it would) from our first slot not known chosen.
    fn broadcast_prepare(&mut self, ballot: Ballot, pre_vote: bool) {
        self.broadcast(Msg::Prepare(Prepare {
            from: self.cfg.id,
            ballot,
            from_slot: self.chosen + 1,
            pre_vote,
        }));
    }

    fn maybe_prevoted(&mut self) {
        let Role::PreCandidate(pc) = &self.role else {
            return;
        };
        if self.quorum.is_majority(pc.votes.iter().copied()) {
            let ballot = pc.ballot;
            self.start_election(ballot);
        }
    }

    /// Phase 1 for `ballot` (above our promise: else one round above it).
    fn start_election(&mut self, ballot: Ballot) {
        let ballot = if ballot > self.promised {
            ballot
        } else {
            Ballot {
                round: self.promised.round.saturating_add(1),
                id: self.cfg.id,
            }
        };
        tracing::info!(id = self.cfg.id, %ballot, from_slot = self.chosen + 1, "starting election");
        self.step_down(None);
        self.promise(ballot);
        self.reset_election_timer();
        let own = Promise {
            from: self.cfg.id,
            ballot,
            ok: true,
            accepted: self.accepted_after(self.chosen + 1, usize::MAX).0,
            chosen: self.chosen,
            pre_vote: false,
            more: false,
        };
        self.role = Role::Candidate(Candidate {
            promises: BTreeMap::from([(self.cfg.id, own)]),
        });
        self.broadcast_prepare(ballot, false);
        self.maybe_win();
    }

    /// Our accepted entries from slot `from` on, at most `max_bytes` of
    /// them (at least one); `true` if more follow.
    fn accepted_after(&self, from: Slot, max_bytes: usize) -> (Vec<AcceptedEntry>, bool) {
        let mut out = Vec::new();
        let mut budget = Budget::new(usize::MAX, max_bytes);
        for (&slot, e) in self.log.range(from..) {
            if !budget.take(value_bytes(&e.value) + 32) {
                return (out, true);
            }
            out.push(AcceptedEntry {
                slot,
                ballot: e.ballot,
                value: e.value.clone(),
                chosen: e.chosen,
            });
        }
        (out, false)
    }

    /// Handles a message. For a request (prepare, accept, heartbeat, fetch)
    /// returns the reply, which must be held back until this round's
    /// `ready().persist` is on disk.
    ///
    /// A message whose sender is not a member is dropped (`None`): every
    /// map of answers here is keyed by sender and every quorum counts
    /// senders, so a stranger must neither be counted nor grow them. (That
    /// a member is who it says is the transport's to prove: peer
    /// authentication.)
    pub fn step(&mut self, msg: Msg) -> Option<Msg> {
        let from = msg.from();
        if !self.quorum.is_member(from) {
            tracing::debug!(
                id = self.cfg.id,
                from,
                "a message from a non-member, dropped"
            );
            return None;
        }
        match msg {
            Msg::Prepare(m) => Some(Msg::Promise(self.on_prepare(m))),
            Msg::Accept(m) => Some(Msg::Accepted(self.on_accept(m))),
            Msg::Heartbeat(m) => Some(Msg::HeartbeatAck(self.on_heartbeat(m))),
            Msg::Fetch(m) => Some(Msg::FetchReply(self.on_fetch(m))),
            Msg::Promise(m) => {
                self.on_promise(m);
                None
            }
            Msg::Accepted(m) => {
                self.on_accepted(m);
                None
            }
            Msg::HeartbeatAck(m) => {
                self.on_heartbeat_ack(m);
                None
            }
            Msg::FetchReply(m) => {
                self.on_fetch_reply(m);
                None
            }
            Msg::Probe(_) => Some(Msg::ProbeReply(ProbeReply {
                from: self.cfg.id,
                voter: self.votes(),
                history: self.has_history(),
                max_round: self.promised.round.max(self.prevoted),
            })),
            Msg::ProbeReply(m) => {
                self.on_probe_reply(m);
                None
            }
        }
    }

    /// Whether this replica holds anything durable that shows the cluster
    /// is not new: a promise, an accepted or chosen value, a snapshot. Not
    /// a pre-vote granted: voters of a new cluster grant each other
    /// pre-votes before a majority of them exists, and that must not keep
    /// the others from finding the cluster new. (Nothing can be chosen, or
    /// promised to a candidate, without a promise somewhere.)
    fn has_history(&self) -> bool {
        self.promised != Ballot::ZERO
            || self.chosen > 0
            || self.compacted > 0
            || self.applied > 0
            || !self.log.is_empty()
            || matches!(self.standing, Standing::Rejoining { .. })
    }

    fn on_probe_reply(&mut self, m: ProbeReply) {
        if self.standing != Standing::Unknown || m.from == self.cfg.id {
            return;
        }
        self.probes.insert(m.from, m);
        self.decide_standing();
    }

    /// A replica that started with an empty log decides, from its probes,
    /// whether it may vote. See [`Standing`] for the argument.
    fn decide_standing(&mut self) {
        if self.standing != Standing::Unknown {
            return;
        }
        if self.quorum.all_others(self.probes.keys().copied())
            && self.probes.values().all(|p| !p.history)
        {
            tracing::info!(
                id = self.cfg.id,
                "every replica is empty: a new cluster; voting from now on"
            );
            self.set_standing(Standing::Voter);
            return;
        }
        let voters: Vec<&ProbeReply> = self.probes.values().filter(|p| p.voter).collect();
        // Without any history seen, wait for every answer: it may be a new
        // cluster whose voters have just decided so.
        if self.quorum.is_majority(voters.iter().map(|p| p.from))
            && self.probes.values().any(|p| p.history)
        {
            let floor = voters
                .iter()
                .map(|p| p.max_round)
                .max()
                .unwrap_or(0)
                .saturating_add(1);
            tracing::warn!(
                id = self.cfg.id,
                floor,
                "started with an empty log in a cluster that has history: this replica may \
                 have lost its state, so it rejoins as a learner; it votes again once a \
                 leader of round {floor} or later leads and it has caught up"
            );
            self.set_standing(Standing::Rejoining { floor });
        }
    }

    fn set_standing(&mut self, standing: Standing) {
        self.standing = standing;
        self.out.persist.push(Record::Standing(standing));
    }

    /// Notes a ballot seen in a rejection: if it is above ours, stop
    /// leading or campaigning.
    fn observe_higher(&mut self, ballot: Ballot) {
        if ballot > self.promised && !matches!(self.role, Role::Follower) {
            self.step_down(None);
        }
    }

    fn heard_from_leader(&mut self, ballot: Ballot) {
        if !matches!(self.role, Role::Follower) || self.leader != Some(ballot.id) {
            self.step_down(Some(ballot.id));
        }
        self.reset_election_timer();
    }

    fn on_prepare(&mut self, m: Prepare) -> Promise {
        let refuse = |this: &Self, ballot: Ballot| Promise {
            from: this.cfg.id,
            ballot,
            ok: false,
            accepted: vec![],
            chosen: this.chosen,
            pre_vote: m.pre_vote,
            more: false,
        };
        if !self.votes() {
            // Not an acceptor (yet): a refusal that shows no ballot, so
            // that it makes no one step down.
            return refuse(self, Ballot::ZERO);
        }
        // Leader stickiness: while a live leader is heard from, refuse to
        // help depose it. Always safe (refusing never breaks Paxos) and it
        // keeps a replica that restarted or was cut off from disrupting a
        // working leader.
        let leader_alive = match self.role {
            Role::Leader(_) => true,
            _ => {
                self.leader.is_some()
                    && self.now < self.last_heard + u64::from(self.cfg.election_ticks.0)
            }
        };
        if m.pre_vote {
            if m.ballot <= self.promised || leader_alive {
                return refuse(self, self.promised);
            }
            if m.ballot.round > self.prevoted {
                self.prevoted = m.ballot.round;
                self.out.persist.push(Record::PreVoted(self.prevoted));
            }
            return Promise {
                ok: true,
                ..refuse(self, m.ballot)
            };
        }
        if m.ballot < self.promised || (leader_alive && self.leader() != Some(m.from)) {
            return refuse(self, self.promised);
        }
        if m.ballot > self.promised {
            self.step_down(None);
            self.promise(m.ballot);
        }
        self.reset_election_timer();
        // Only entries not known chosen locally: a candidate behind our
        // chosen prefix learns that from `chosen` and catches up first.
        let from = m.from_slot.max(self.chosen + 1);
        let (accepted, more) = self.accepted_after(from, self.cfg.max_message_bytes);
        Promise {
            from: self.cfg.id,
            ballot: m.ballot,
            ok: true,
            accepted,
            chosen: self.chosen,
            pre_vote: false,
            more,
        }
    }

    fn on_promise(&mut self, m: Promise) {
        if m.pre_vote {
            if !m.ok {
                // A live leader, or a higher ballot: ask above it next time.
                self.seen_round = self.seen_round.max(m.ballot.round);
            } else if let Role::PreCandidate(pc) = &mut self.role {
                if m.ballot == pc.ballot {
                    pc.votes.insert(m.from);
                    self.maybe_prevoted();
                }
            }
            return;
        }
        if !m.ok {
            self.observe_higher(m.ballot);
            return;
        }
        let promised = self.promised;
        let Role::Candidate(c) = &mut self.role else {
            return;
        };
        if m.ballot != promised {
            return;
        }
        // A promise comes in pages when the acceptor holds many accepted
        // entries: gather them; ask for the next page while `more` is set.
        let from = m.from;
        let merged = match c.promises.remove(&from) {
            Some(mut p) if p.more => {
                let last = p.accepted.last().map_or(0, |e| e.slot);
                p.accepted
                    .extend(m.accepted.into_iter().filter(|e| e.slot > last));
                p.chosen = p.chosen.max(m.chosen);
                p.more = m.more;
                p
            }
            Some(p) => p, // a duplicate of a complete promise
            None => m,
        };
        // Pages are asked for one at a time, each bounded; so is what they
        // add up to. No honest acceptor holds that many entries it does not
        // know chosen; one that claims to is not counted (a quorum of the
        // others can still elect).
        let bytes: usize = merged
            .accepted
            .iter()
            .map(|e| value_bytes(&e.value) + 32)
            .sum();
        if bytes > MAX_PROMISE_BYTES {
            tracing::warn!(
                id = self.cfg.id,
                from,
                bytes,
                "a promise reports more accepted entries than any acceptor holds; not counted"
            );
            return;
        }
        if merged.more {
            let next = merged.accepted.last().map_or(self.chosen, |e| e.slot) + 1;
            self.send(
                from,
                Msg::Prepare(Prepare {
                    from: self.cfg.id,
                    ballot: self.promised,
                    from_slot: next,
                    pre_vote: false,
                }),
            );
        }
        if let Role::Candidate(c) = &mut self.role {
            c.promises.insert(from, merged);
        }
        self.maybe_win();
    }

    fn maybe_win(&mut self) {
        let Role::Candidate(c) = &self.role else {
            return;
        };
        let complete = c.promises.values().filter(|p| !p.more).map(|p| p.from);
        if !self.quorum.is_majority(complete) {
            return;
        }
        let ballot = self.promised;
        let max_chosen = c.promises.values().map(|p| p.chosen).max().unwrap_or(0);
        if max_chosen > self.chosen {
            // A promiser knows more slots chosen than we do: we lack their
            // values, so we may not lead yet. Stay a candidate and fetch
            // them; the promises stay valid, and the fetch replies bring us
            // back here (a follower a tick behind, as a thrifty leader
            // leaves some, wins without waiting out another election
            // timeout). The election timer still bounds the wait.
            let from = c
                .promises
                .values()
                .find(|p| p.chosen == max_chosen)
                .map(|p| p.from);
            tracing::info!(
                id = self.cfg.id,
                behind = max_chosen - self.chosen,
                "won phase 1 but behind; catching up first"
            );
            if let Some(peer) = from {
                self.request_fetch(peer);
            }
            return;
        }
        // For every slot after our chosen prefix: a value known chosen, else
        // the value of the highest ballot accepted, else a no-op.
        let mut best: BTreeMap<Slot, (bool, Ballot, Value)> = BTreeMap::new();
        for p in c.promises.values() {
            for e in &p.accepted {
                // No acceptor accepts past its own chosen prefix plus
                // `MAX_ACCEPT_AHEAD`, and ours is now at least as long as
                // any promiser's: an entry beyond is not an acceptor's.
                if e.slot <= self.chosen || e.slot > self.chosen.saturating_add(MAX_ACCEPT_AHEAD) {
                    continue;
                }
                let replace = match best.get(&e.slot) {
                    None => true,
                    Some((chosen, b, _)) => !*chosen && (e.chosen || e.ballot > *b),
                };
                if replace {
                    best.insert(e.slot, (e.chosen, e.ballot, e.value.clone()));
                }
            }
        }
        let last = best.keys().next_back().copied().unwrap_or(self.chosen);
        tracing::info!(id = self.cfg.id, %ballot, chosen = self.chosen, reproposed = last - self.chosen, "elected leader");
        let others = self.others();
        // Prefer the followers after us in id order: leaders elected in turn
        // spread the load of being a target.
        let split = others.partition_point(|&o| o < self.cfg.id);
        let preferred = others[split..]
            .iter()
            .chain(&others[..split])
            .copied()
            .collect();
        self.role = Role::Leader(Box::new(Leader {
            next_slot: last + 1,
            term_start: last,
            pending: BTreeMap::new(),
            queue: VecDeque::new(),
            queue_bytes: 0,
            time: None,
            last_heartbeat: 0,
            hb_acks: BTreeMap::new(),
            last_ack_tick: others.iter().map(|&o| (o, self.now)).collect(),
            preferred,
            deferred: BTreeMap::new(),
            waiting_since: BTreeMap::new(),
            confirmed_round: self.hb_round,
            round_started: None,
            reads: VecDeque::new(),
        }));
        self.leader = Some(self.cfg.id);
        let mut entries = Vec::new();
        for slot in self.chosen + 1..=last {
            let value = match best.remove(&slot) {
                Some((_, _, v)) => v,
                None => Value::Noop,
            };
            entries.push(self.propose_slot(slot, value));
        }
        // What a new leader re-proposes goes to everyone: it finishes what
        // an earlier leader left, whoever holds it.
        self.broadcast_accepts(entries);
        self.start_heartbeat_round();
        self.advance_chosen();
    }

    /// Leader: assigns `value` to `slot` under our ballot, accepting it
    /// ourselves. Returns the entry to send.
    fn propose_slot(&mut self, slot: Slot, value: Value) -> (Slot, Value) {
        let ballot = self.promised;
        self.log.insert(
            slot,
            Entry {
                ballot,
                value: value.clone(),
                chosen: false,
            },
        );
        self.out.persist.push(Record::Accepted {
            slot,
            ballot,
            value: value.clone(),
        });
        let mut acks = HashSet::new();
        acks.insert(self.cfg.id);
        let now = self.now;
        if let Some(l) = self.lead() {
            l.pending.insert(
                slot,
                Pending {
                    acks,
                    sent_tick: now,
                    resent: 0,
                    bytes: value_bytes(&value),
                },
            );
        }
        self.check_chosen(slot);
        (slot, value)
    }

    /// `entries` as accept messages of at most `max_entries_per_message`
    /// entries and `max_message_bytes` bytes each.
    fn accept_messages(&self, entries: &[(Slot, Value)]) -> Vec<Msg> {
        accept_messages(&self.cfg, self.promised, self.chosen, entries)
    }

    fn broadcast_accepts(&mut self, entries: Vec<(Slot, Value)>) {
        for msg in self.accept_messages(&entries) {
            self.broadcast(msg);
        }
    }

    /// Sends newly proposed `entries`: to every follower, or (thrifty) at
    /// once only to the `quorum - 1` preferred followers that answered
    /// lately, deferring the others to the next tick.
    ///
    /// Why: on a small machine every follower woken by an accept costs a
    /// thread switch and a sync, and a majority is all a slot needs. With a
    /// single client, measured on the project machine, waking two followers
    /// per put instead of four cut the put latency by about a third (see
    /// README, Performance). Safety does not depend on who receives an
    /// accept; liveness does not suffer either, because deferred accepts go
    /// out within a tick and a target that does not answer in time loses
    /// its place ([`Paxos::demote_slow_targets`]).
    fn send_accepts(&mut self, entries: Vec<(Slot, Value)>) {
        let Some(targets) = self.thrifty_targets() else {
            return self.broadcast_accepts(entries);
        };
        let others = self.others();
        let msgs = self.accept_messages(&entries);
        let now = self.now;
        if let Some(l) = self.lead() {
            for &t in &targets {
                l.waiting_since.entry(t).or_insert(now);
            }
            for o in others {
                if !targets.contains(&o) {
                    let d = l.deferred.entry(o).or_default();
                    d.extend(entries.iter().map(|(slot, _)| *slot));
                }
            }
        }
        for msg in msgs {
            for &to in &targets {
                self.send(to, msg.clone());
            }
        }
    }

    /// The followers a thrifty leader sends new accepts to at once: the
    /// first `quorum - 1` preferred ones that answered within the last two
    /// heartbeat intervals. `None`: send to every follower (not thrifty, or
    /// too few answer).
    fn thrifty_targets(&self) -> Option<Vec<ReplicaId>> {
        let Role::Leader(l) = &self.role else {
            return None;
        };
        if !self.cfg.thrifty {
            return None;
        }
        let need = self.quorum.others_needed();
        let fresh = u64::from(self.cfg.heartbeat_ticks) * 2;
        let targets: Vec<ReplicaId> = l
            .preferred
            .iter()
            .copied()
            .filter(|o| {
                l.last_ack_tick
                    .get(o)
                    .is_some_and(|&t| t + fresh >= self.now)
            })
            .take(need)
            .collect();
        (targets.len() == need && need < l.preferred.len()).then_some(targets)
    }

    /// A target that has answered nothing for a full tick since it was sent
    /// an accept goes to the back of the preference order (the accept itself
    /// reaches the others through [`Paxos::send_deferred`]).
    fn demote_slow_targets(&mut self) {
        let now = self.now;
        let id = self.cfg.id;
        let Some(l) = self.lead() else {
            return;
        };
        let slow: Vec<ReplicaId> = l
            .waiting_since
            .iter()
            .filter(|&(_, &since)| since + 1 < now)
            .map(|(&t, _)| t)
            .collect();
        if slow.is_empty() {
            return;
        }
        tracing::debug!(
            id,
            ?slow,
            "thrifty: followers slow to accept lose their place"
        );
        for t in &slow {
            l.waiting_since.remove(t);
        }
        l.preferred.retain(|o| !slow.contains(o));
        l.preferred.extend(slow);
    }

    /// Sends every follower the accepts deferred for it since the last tick,
    /// batched. Slots chosen since are sent all the same: the follower then
    /// holds them without fetching.
    fn send_deferred(&mut self) {
        let Some(l) = self.lead() else {
            return;
        };
        for (to, slots) in std::mem::take(&mut l.deferred) {
            let entries: Vec<(Slot, Value)> = slots
                .into_iter()
                .filter_map(|slot| self.log.get(&slot).map(|e| (slot, e.value.clone())))
                .collect();
            for msg in self.accept_messages(&entries) {
                self.send(to, msg);
            }
        }
    }

    /// Re-sends accepts a majority has not answered, each slot after
    /// `retransmit_ticks`, then twice, four and eight times as long: a
    /// cluster slow because it is overloaded (large values, a busy
    /// machine) must not be sent everything again every few hundred
    /// milliseconds, or it never catches up.
    fn retransmit(&mut self) {
        let mut per_peer: BTreeMap<ReplicaId, Vec<(Slot, Value)>> = BTreeMap::new();
        let others = self.others();
        let base = u64::from(self.cfg.retransmit_ticks);
        let Role::Leader(l) = &mut self.role else {
            return;
        };
        for (&slot, p) in l.pending.iter_mut() {
            if self.now < p.sent_tick + (base << p.resent.min(3)) {
                continue;
            }
            p.sent_tick = self.now;
            p.resent += 1;
            let Some(e) = self.log.get(&slot) else {
                continue;
            };
            for &o in &others {
                if !p.acks.contains(&o) {
                    per_peer.entry(o).or_default().push((slot, e.value.clone()));
                }
            }
        }
        for (to, entries) in per_peer {
            for msg in self.accept_messages(&entries) {
                self.send(to, msg);
            }
        }
    }

    fn on_accept(&mut self, m: Accept) -> Accepted {
        if !self.votes() {
            self.learn_as_learner(m.ballot, m.chosen, m.from);
            return Accepted {
                from: self.cfg.id,
                ballot: Ballot::ZERO,
                ok: false,
                slots: vec![],
            };
        }
        if m.ballot < self.promised {
            return Accepted {
                from: self.cfg.id,
                ballot: self.promised,
                ok: false,
                slots: vec![],
            };
        }
        self.promise(m.ballot);
        self.heard_from_leader(m.ballot);
        let mut slots = Vec::with_capacity(m.entries.len());
        for (slot, value) in m.entries {
            if let Some(e) = self.log.get(&slot) {
                if e.chosen {
                    // Known chosen: ack only the same value. A stale leader
                    // proposing something else must not count us.
                    if e.value == value {
                        slots.push(slot);
                    }
                    continue;
                }
                if e.ballot == m.ballot && e.value == value {
                    slots.push(slot); // a retransmission
                    continue;
                }
            } else if slot <= self.chosen {
                continue; // compacted away: cannot compare, do not ack
            }
            if slot == 0 || slot > self.chosen.saturating_add(MAX_ACCEPT_AHEAD) {
                // No leader proposes that far past what we know chosen (it
                // keeps a few slots in flight); refusing is always safe,
                // and a replica that far behind catches up by fetching. A
                // forged entry at slot 2^64 would otherwise make the next
                // leader re-propose every slot up to it.
                continue;
            }
            slots.push(slot);
            self.out.persist.push(Record::Accepted {
                slot,
                ballot: m.ballot,
                value: value.clone(),
            });
            self.log.insert(
                slot,
                Entry {
                    ballot: m.ballot,
                    value,
                    chosen: false,
                },
            );
        }
        self.learn_chosen(m.ballot, m.chosen, m.from);
        Accepted {
            from: self.cfg.id,
            ballot: m.ballot,
            ok: true,
            slots,
        }
    }

    /// The leader of `ballot` says every slot up to `upto` is chosen. An
    /// entry we accepted in that same ballot holds the chosen value (a leader
    /// proposes one value per slot per ballot); for any other we must fetch.
    fn learn_chosen(&mut self, ballot: Ballot, upto: Slot, leader: ReplicaId) {
        let mut slot = self.chosen + 1;
        while slot <= upto {
            match self.log.get_mut(&slot) {
                Some(e) if e.chosen || e.ballot == ballot => e.chosen = true,
                _ => break,
            }
            slot += 1;
        }
        self.advance_chosen();
        if self.chosen < upto {
            self.request_fetch(leader);
        }
    }

    fn request_fetch(&mut self, peer: ReplicaId) {
        if self.fetch_started.is_some() || peer == self.cfg.id {
            return;
        }
        self.fetch_started = Some(self.now);
        self.send(
            peer,
            Msg::Fetch(Fetch {
                from: self.cfg.id,
                from_slot: self.chosen + 1,
                max_entries: self.cfg.max_entries_per_message as u32,
            }),
        );
    }

    fn on_accepted(&mut self, m: Accepted) {
        if !m.ok {
            self.observe_higher(m.ballot);
            return;
        }
        if m.ballot != self.promised {
            return;
        }
        let now = self.now;
        let Some(l) = self.lead() else {
            return;
        };
        l.last_ack_tick.insert(m.from, now);
        l.waiting_since.remove(&m.from);
        for slot in m.slots {
            let Some(l) = self.lead() else {
                break;
            };
            if let Some(p) = l.pending.get_mut(&slot) {
                p.acks.insert(m.from);
                self.check_chosen(slot);
            }
        }
        self.advance_chosen();
    }

    fn check_chosen(&mut self, slot: Slot) {
        let Role::Leader(l) = &mut self.role else {
            return;
        };
        let Some(p) = l.pending.get(&slot) else {
            return;
        };
        if self.quorum.is_majority(p.acks.iter().copied()) {
            l.pending.remove(&slot);
            if let Some(e) = self.log.get_mut(&slot) {
                e.chosen = true;
            }
        }
    }

    fn advance_chosen(&mut self) {
        let before = self.chosen;
        while let Some(e) = self.log.get(&(self.chosen + 1)) {
            if !e.chosen {
                break;
            }
            self.chosen += 1;
        }
        if self.chosen > before {
            self.chosen_dirty = true;
            self.emit_apply();
        }
    }

    fn emit_apply(&mut self) {
        while self.applied < self.chosen {
            let slot = self.applied + 1;
            let Some(e) = self.log.get(&slot) else { break };
            self.out.apply.push((slot, e.value.clone()));
            self.applied = slot;
        }
    }

    /// A replica that does not vote follows the leader's progress: it
    /// fetches what is chosen (chosen values are facts, safe to hold and
    /// serve) but answers nothing that counts as a vote.
    fn learn_as_learner(&mut self, ballot: Ballot, chosen: Slot, from: ReplicaId) {
        if ballot >= self.promised {
            self.leader = Some(ballot.id);
            self.last_heard = self.now;
        }
        if chosen > self.chosen {
            self.request_fetch(from);
        }
    }

    fn on_heartbeat(&mut self, m: Heartbeat) -> HeartbeatAck {
        if !self.votes() {
            self.learn_as_learner(m.ballot, m.chosen, m.from);
            match self.standing {
                // Safe to vote again: this leader was elected without us
                // (we voted in nothing) in a round above any ballot we may
                // have promised before losing our state, and we know every
                // slot it found possibly chosen. See `Standing`.
                Standing::Rejoining { floor }
                    if m.ballot.round >= floor
                        && m.ballot >= self.promised
                        && self.chosen >= m.term_start =>
                {
                    tracing::info!(
                        id = self.cfg.id,
                        ballot = %m.ballot,
                        chosen = self.chosen,
                        "caught up with a leader elected since it lost its state: voting again"
                    );
                    self.set_standing(Standing::Voter);
                }
                // No vote (a zero ballot makes no one step down); a
                // rejoining replica says which round it waits for.
                standing => {
                    return HeartbeatAck {
                        from: self.cfg.id,
                        ballot: Ballot::ZERO,
                        ok: false,
                        round: m.round,
                        chosen: self.chosen,
                        rejoin_floor: match standing {
                            Standing::Rejoining { floor } => Some(floor),
                            _ => None,
                        },
                    };
                }
            }
        }
        if m.ballot < self.promised {
            return HeartbeatAck {
                from: self.cfg.id,
                ballot: self.promised,
                ok: false,
                round: m.round,
                chosen: self.chosen,
                rejoin_floor: None,
            };
        }
        self.promise(m.ballot);
        self.heard_from_leader(m.ballot);
        self.learn_chosen(m.ballot, m.chosen, m.from);
        HeartbeatAck {
            from: self.cfg.id,
            ballot: m.ballot,
            ok: true,
            round: m.round,
            chosen: self.chosen,
            rejoin_floor: None,
        }
    }

    fn on_heartbeat_ack(&mut self, m: HeartbeatAck) {
        if self.is_leader() && m.chosen > self.chosen {
            // A follower learned more chosen than we know (from a snapshot
            // or a peer, after it promised us): fetch it rather than wait
            // for acks on slots it may have compacted away.
            self.request_fetch(m.from);
        }
        if let Some(floor) = m.rejoin_floor {
            // A replica that lost its state votes again only under a
            // leader of round `floor` or later: run phase 1 again in such
            // a round (we stay the replica the others follow, so they
            // promise at once).
            if self.is_leader() && floor > self.promised.round {
                tracing::info!(
                    id = self.cfg.id,
                    rejoining = m.from,
                    floor,
                    "a replica rejoining after losing its state needs a newer ballot; \
                     running phase 1 again"
                );
                self.start_election(Ballot {
                    round: floor,
                    id: self.cfg.id,
                });
            }
            return;
        }
        if !m.ok {
            self.observe_higher(m.ballot);
            return;
        }
        if m.ballot != self.promised {
            return;
        }
        let now = self.now;
        let Some(l) = self.lead() else {
            return;
        };
        l.last_ack_tick.insert(m.from, now);
        let seen = l.hb_acks.entry(m.from).or_insert(0);
        *seen = (*seen).max(m.round);
        self.confirm_rounds();
        self.serve_reads();
    }

    /// A round is confirmed when a majority (us included: we are in our
    /// latest round) acked it or a later one.
    fn confirm_rounds(&mut self) {
        let hb_round = self.hb_round;
        let Role::Leader(l) = &mut self.role else {
            return;
        };
        if let Some(confirmed) = self.quorum.majority_reached(hb_round, &l.hb_acks) {
            if confirmed > l.confirmed_round {
                l.confirmed_round = confirmed;
                if l.round_started.is_some() && confirmed >= hb_round {
                    l.round_started = None;
                }
            }
        }
    }

    fn start_heartbeat_round(&mut self) {
        let now = self.now;
        let Role::Leader(l) = &mut self.role else {
            return;
        };
        self.hb_round += 1;
        l.last_heartbeat = now;
        l.round_started = Some(now);
        let term_start = l.term_start;
        // Alone, a leader is its own majority: the round is confirmed as it
        // starts. (With others, nothing changes until they answer.)
        if let Some(confirmed) = self.quorum.majority_reached(self.hb_round, &l.hb_acks) {
            l.confirmed_round = l.confirmed_round.max(confirmed);
        }
        self.broadcast(Msg::Heartbeat(Heartbeat {
            from: self.cfg.id,
            ballot: self.promised,
            chosen: self.chosen,
            round: self.hb_round,
            term_start,
        }));
    }

    fn on_fetch(&mut self, m: Fetch) -> FetchReply {
        let max = (m.max_entries as usize)
            .min(self.cfg.max_entries_per_message)
            .max(1);
        let mut entries = Vec::new();
        let mut budget = Budget::new(max, self.cfg.max_message_bytes);
        let mut slot = m.from_slot.max(1);
        if slot <= self.compacted {
            slot = self.chosen + 1; // nothing to send: the caller needs the snapshot
        }
        while slot <= self.chosen {
            match self.log.get(&slot) {
                Some(e) if budget.take(value_bytes(&e.value)) => {
                    entries.push((slot, e.value.clone()));
                }
                _ => break,
            }
            slot += 1;
        }
        FetchReply {
            from: self.cfg.id,
            entries,
            chosen: self.chosen,
            compacted: self.compacted,
        }
    }

    fn on_fetch_reply(&mut self, m: FetchReply) {
        self.fetch_started = None;
        if m.entries.is_empty() && m.compacted > self.chosen {
            self.out.snapshot_from = Some(m.from);
            return;
        }
        let mut expected = self.chosen + 1;
        for (slot, value) in m.entries {
            if slot != expected {
                if slot < expected {
                    continue;
                }
                break; // not contiguous: ignore the rest
            }
            let ballot = self
                .log
                .get(&slot)
                .map(|e| e.ballot)
                .unwrap_or(Ballot::ZERO);
            self.out.persist.push(Record::Accepted {
                slot,
                ballot,
                value: value.clone(),
            });
            self.log.insert(
                slot,
                Entry {
                    ballot,
                    value,
                    chosen: true,
                },
            );
            if let Some(l) = self.lead() {
                l.pending.remove(&slot);
            }
            expected += 1;
        }
        self.advance_chosen();
        if m.chosen > self.chosen && expected > self.chosen {
            self.request_fetch(m.from);
        }
        if matches!(self.role, Role::Candidate(_)) {
            self.maybe_win();
        }
    }

    /// Offers a client write, refused if this replica does not lead or
    /// its queue is full (by count or bytes).
    pub fn propose(&mut self, req: WriteRequest) -> Result<(), Refusal> {
        let Role::Leader(l) = &mut self.role else {
            return Err(Refusal::NotLeader(
                self.leader.filter(|&l| l != self.cfg.id),
            ));
        };
        let bytes = request_bytes(&req);
        if l.queue.len() >= self.cfg.max_queue
            || (!l.queue.is_empty() && l.queue_bytes + bytes > self.cfg.max_queue_bytes)
        {
            return Err(Refusal::Busy);
        }
        l.queue_bytes += bytes;
        l.queue.push_back(req);
        Ok(())
    }

    /// Proposals queued at a leader, waiting for a slot.
    pub fn queued(&self) -> usize {
        match &self.role {
            Role::Leader(l) => l.queue.len(),
            _ => 0,
        }
    }

    /// Keeps only the queued proposals (not yet in a slot) for which `keep`
    /// holds; returns how many were dropped.
    pub fn retain_queued(&mut self, mut keep: impl FnMut(&WriteRequest) -> bool) -> usize {
        let Some(l) = self.lead() else {
            return 0;
        };
        let before = l.queue.len();
        let mut bytes = 0;
        l.queue.retain(|r| {
            let k = keep(r);
            if k {
                bytes += request_bytes(r);
            }
            k
        });
        l.queue_bytes = bytes;
        before - l.queue.len()
    }

    /// Offers the log's clock a reading (`Value::Time`), proposed in a slot
    /// of its own ahead of queued writes. `false` if this replica does not
    /// lead. A reading not yet proposed is replaced by a newer one.
    pub fn propose_time(&mut self, unix_ms: u64) -> bool {
        let Some(l) = self.lead() else {
            return false;
        };
        l.time = Some(unix_ms);
        true
    }

    /// Asks for a linearizable read; `token` comes back in
    /// `Ready::reads_ready` once the leader has confirmed its ballot with a
    /// majority after the read arrived and has applied every slot that
    /// could hold a write acknowledged before it.
    pub fn read(&mut self, token: u64) -> Result<(), Option<ReplicaId>> {
        let (chosen, hb_round) = (self.chosen, self.hb_round);
        let Role::Leader(l) = &mut self.role else {
            return Err(self.leader);
        };
        let index = chosen.max(l.term_start);
        l.reads.push_back(PendingRead {
            token,
            index,
            round: hb_round + 1,
        });
        if l.round_started.is_none() {
            self.start_heartbeat_round();
        }
        self.serve_reads();
        Ok(())
    }

    fn serve_reads(&mut self) {
        let (applied, hb_round) = (self.applied, self.hb_round);
        let Role::Leader(l) = &mut self.role else {
            return;
        };
        while let Some(r) = l.reads.front() {
            if r.round > l.confirmed_round || r.index > applied {
                break;
            }
            let r = l.reads.pop_front().expect("front exists");
            self.out.reads_ready.push(r.token);
        }
        // Reads waiting for a round not yet started start it now.
        if l.round_started.is_none() && l.reads.iter().any(|r| r.round > hb_round) {
            self.start_heartbeat_round();
        }
    }

    /// Takes what the driver must do now.
    pub fn ready(&mut self) -> Ready {
        if self.is_leader() {
            let mut entries = Vec::new();
            if let Role::Leader(l) = &mut self.role {
                if l.room_in_flight(&self.cfg) {
                    if let Some(ms) = l.time.take() {
                        let slot = l.next_slot;
                        l.next_slot += 1;
                        entries.push(self.propose_slot(slot, Value::Time(ms)));
                    }
                }
            }
            while let Role::Leader(l) = &mut self.role {
                if l.queue.is_empty() || !l.room_in_flight(&self.cfg) {
                    break;
                }
                let mut budget = Budget::new(self.cfg.max_batch, self.cfg.max_batch_bytes);
                let n = l
                    .queue
                    .iter()
                    .take_while(|r| budget.take(request_bytes(r)))
                    .count();
                l.queue_bytes = l.queue_bytes.saturating_sub(budget.bytes);
                let batch: Vec<WriteRequest> = l.queue.drain(..n).collect();
                let slot = l.next_slot;
                l.next_slot += 1;
                entries.push(self.propose_slot(slot, Value::Batch(batch)));
            }
            if !entries.is_empty() {
                self.send_accepts(entries);
                self.advance_chosen();
            }
            self.serve_reads();
        }
        if self.chosen_dirty {
            self.chosen_dirty = false;
            self.out.persist.push(Record::Chosen(self.chosen));
        }
        std::mem::take(&mut self.out)
    }
}

/// What a slot or a message may still take: at most `max_count` items of
/// at most `max_bytes` together, but always the first, whatever its size
/// (a single command or entry over the limit must still go somewhere).
struct Budget {
    max_count: usize,
    max_bytes: usize,
    count: usize,
    bytes: usize,
}

impl Budget {
    fn new(max_count: usize, max_bytes: usize) -> Budget {
        Budget {
            max_count: max_count.max(1),
            max_bytes,
            count: 0,
            bytes: 0,
        }
    }

    /// Takes an item of `bytes` if it fits; whether it did.
    fn take(&mut self, bytes: usize) -> bool {
        if self.count >= self.max_count
            || (self.count > 0 && self.bytes.saturating_add(bytes) > self.max_bytes)
        {
            return false;
        }
        self.count += 1;
        self.bytes += bytes;
        true
    }
}

/// `entries` as accept messages of ballot `ballot` (with our chosen prefix
/// `chosen`), of at most `max_entries_per_message` entries and
/// `max_message_bytes` bytes each.
fn accept_messages(
    cfg: &Config,
    ballot: Ballot,
    chosen: Slot,
    entries: &[(Slot, Value)],
) -> Vec<Msg> {
    chunks(
        entries,
        cfg.max_entries_per_message,
        cfg.max_message_bytes,
        |(_, v)| value_bytes(v),
    )
    .into_iter()
    .map(|chunk| {
        Msg::Accept(Accept {
            from: cfg.id,
            ballot,
            entries: chunk.to_vec(),
            chosen,
        })
    })
    .collect()
}

/// Splits `items` into runs that each fit a [`Budget`] of `max_count`
/// items and `max_bytes` bytes (as `size` counts them).
fn chunks<T>(
    items: &[T],
    max_count: usize,
    max_bytes: usize,
    size: impl Fn(&T) -> usize,
) -> Vec<&[T]> {
    let mut out = Vec::new();
    let mut rest = items;
    while !rest.is_empty() {
        let mut budget = Budget::new(max_count, max_bytes);
        let n = rest.iter().take_while(|i| budget.take(size(i))).count();
        let (run, tail) = rest.split_at(n);
        out.push(run);
        rest = tail;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use kv_api::Op;

    /// A tiny synchronous network: delivers every message, persists nothing.
    fn cluster(n: u64) -> Vec<Paxos> {
        let members: Vec<ReplicaId> = (1..=n).collect();
        members
            .iter()
            .map(|&id| Paxos::new(Config::new(id, members.clone()), Durable::default()))
            .collect()
    }

    /// Runs until quiet; returns everything applied per replica.
    fn run(nodes: &mut [Paxos], applied: &mut [Vec<(Slot, Value)>], rounds: usize) {
        run_cut(nodes, applied, rounds, &|_, _| false);
    }

    /// Like [`run`], but a message from `a` to `b` is lost when `cut(a, b)`
    /// (a replica cut from itself is down: it does not tick). Returns every
    /// message delivered.
    fn run_cut(
        nodes: &mut [Paxos],
        applied: &mut [Vec<(Slot, Value)>],
        rounds: usize,
        cut: &dyn Fn(ReplicaId, ReplicaId) -> bool,
    ) -> Vec<Msg> {
        let mut seen = Vec::new();
        for _ in 0..rounds {
            let mut inflight: VecDeque<(ReplicaId, ReplicaId, Msg)> = VecDeque::new();
            for (i, n) in nodes.iter_mut().enumerate() {
                if cut(n.id(), n.id()) {
                    continue;
                }
                n.tick();
                let r = n.ready();
                applied[i].extend(r.apply);
                for (to, m) in r.messages {
                    inflight.push_back((n.id(), to, m));
                }
            }
            while let Some((from, to, m)) = inflight.pop_front() {
                if cut(from, to) || cut(to, to) {
                    continue;
                }
                seen.push(m.clone());
                let idx = (to - 1) as usize;
                let reply = nodes[idx].step(m);
                let r = nodes[idx].ready();
                applied[idx].extend(r.apply);
                for (t, m) in r.messages {
                    inflight.push_back((to, t, m));
                }
                if let Some(reply) = reply {
                    inflight.push_back((to, from, reply));
                }
            }
        }
        seen
    }

    fn commands(applied: &[(Slot, Value)]) -> Vec<u64> {
        applied
            .iter()
            .flat_map(|(_, v)| match v {
                Value::Batch(b) => b.iter().map(|r| r.seq).collect(),
                Value::Noop | Value::Time(_) => vec![],
            })
            .collect()
    }

    /// Replica 1 of three, a voter, restarted with slots `1..=chosen` chosen,
    /// slot `s` holding the batch `batch(s)`.
    fn voter_with_chosen(chosen: Slot, batch: impl Fn(Slot) -> Vec<WriteRequest>) -> Paxos {
        let entries = (1..=chosen)
            .map(|slot| (slot, Ballot { round: 1, id: 1 }, Value::Batch(batch(slot))))
            .collect();
        let durable = Durable {
            chosen,
            entries,
            standing: Standing::Voter,
            ..Durable::default()
        };
        Paxos::new(Config::new(1, vec![1, 2, 3]), durable)
    }

    fn big_put(seq: u64, len: usize) -> WriteRequest {
        WriteRequest {
            client_id: 1,
            seq,
            acked_below: 0,
            op: Op::Put {
                key: b"k".to_vec(),
                value: vec![seq as u8; len],
            },
        }
    }

    fn put(seq: u64) -> WriteRequest {
        WriteRequest {
            client_id: 1,
            seq,
            acked_below: 0,
            op: Op::Put {
                key: b"k".to_vec(),
                value: seq.to_be_bytes().to_vec(),
            },
        }
    }

    #[test]
    fn elects_a_leader_and_chooses_proposals_everywhere() {
        let mut nodes = cluster(5);
        let mut applied = vec![Vec::new(); 5];
        run(&mut nodes, &mut applied, 100);
        let leaders: Vec<_> = nodes
            .iter()
            .filter(|n| n.is_leader())
            .map(|n| n.id())
            .collect();
        assert_eq!(leaders.len(), 1, "exactly one leader");
        let l = (leaders[0] - 1) as usize;
        for seq in 1..=10 {
            nodes[l].propose(put(seq)).unwrap();
        }
        run(&mut nodes, &mut applied, 20);
        for a in &applied {
            assert_eq!(a, &applied[l], "every replica applies the same log");
        }
        let batches: usize = applied[l]
            .iter()
            .map(|(_, v)| match v {
                Value::Batch(b) => b.len(),
                Value::Noop | Value::Time(_) => 0,
            })
            .sum();
        assert_eq!(batches, 10);
    }

    impl Paxos {
        /// The leader's state (this replica must lead).
        fn leading(&self) -> &Leader {
            match &self.role {
                Role::Leader(l) => l,
                _ => panic!("replica {} does not lead", self.cfg.id),
            }
        }
    }

    /// Elects a leader in a 5-replica cluster; returns its index.
    fn elected(nodes: &mut [Paxos], applied: &mut [Vec<(Slot, Value)>]) -> usize {
        run(nodes, applied, 100);
        let l = nodes.iter().position(|n| n.is_leader()).expect("a leader");
        // Settle the first term's no-ops and heartbeats.
        run(nodes, applied, 10);
        l
    }

    fn accept_targets(msgs: &[(ReplicaId, Msg)]) -> Vec<ReplicaId> {
        let mut to: Vec<ReplicaId> = msgs
            .iter()
            .filter(|(_, m)| matches!(m, Msg::Accept(_)))
            .map(|(t, _)| *t)
            .collect();
        to.sort_unstable();
        to
    }

    /// A 5-replica cluster whose leader (returned) has just proposed one
    /// write; the followers its accepts went to at once, and its messages.
    fn one_proposal(thrifty: bool) -> (Vec<Paxos>, usize, Vec<ReplicaId>, Ready) {
        let mut nodes = cluster(5);
        for n in nodes.iter_mut() {
            n.cfg.thrifty = thrifty;
        }
        let mut applied = vec![Vec::new(); 5];
        let l = elected(&mut nodes, &mut applied);
        let _ = nodes[l].ready();
        nodes[l].propose(put(1)).unwrap();
        let r = nodes[l].ready();
        let first = accept_targets(&r.messages);
        (nodes, l, first, r)
    }

    #[test]
    fn thrifty_leader_sends_to_a_majority_at_once_and_to_the_rest_at_the_tick() {
        let (mut nodes, l, first, _) = one_proposal(true);
        assert_eq!(
            first.len(),
            2,
            "two followers make a majority with the leader"
        );
        // The other two get it, batched, at the next tick.
        nodes[l].tick();
        let r = nodes[l].ready();
        let rest = accept_targets(&r.messages);
        assert_eq!(rest.len(), 2, "{rest:?}");
        assert!(
            rest.iter().all(|t| !first.contains(t)),
            "{first:?} {rest:?}"
        );

        // Not thrifty: everyone at once.
        let (_, _, all, _) = one_proposal(false);
        assert_eq!(all.len(), 4);
    }

    #[test]
    fn a_target_that_does_not_answer_loses_its_place_and_the_write_is_still_chosen() {
        let (mut nodes, l, first, r) = one_proposal(true);
        // The first target is gone: its accept and everything after is lost.
        let gone = first[0];
        let deliver = |nodes: &mut [Paxos], msgs: Vec<(ReplicaId, Msg)>| {
            let mut inflight: VecDeque<(ReplicaId, ReplicaId, Msg)> = msgs
                .into_iter()
                .map(|(to, m)| (nodes[l].id(), to, m))
                .collect();
            while let Some((from, to, m)) = inflight.pop_front() {
                if to == gone || from == gone {
                    continue;
                }
                let idx = (to - 1) as usize;
                let reply = nodes[idx].step(m);
                let r = nodes[idx].ready();
                for (t, m) in r.messages {
                    inflight.push_back((to, t, m));
                }
                if let Some(reply) = reply {
                    inflight.push_back((to, from, reply));
                }
            }
        };
        deliver(&mut nodes, r.messages);
        assert!(
            !nodes[l].leading().pending.is_empty(),
            "one answer is not a majority"
        );
        // Ticks: the deferred accepts reach the other two, which answer.
        for _ in 0..3 {
            nodes[l].tick();
            let r = nodes[l].ready();
            deliver(&mut nodes, r.messages);
        }
        assert!(
            nodes[l].leading().pending.is_empty(),
            "chosen without the lost target"
        );
        assert_eq!(
            nodes[l].leading().preferred.last(),
            Some(&gone),
            "the silent target went to the back"
        );
        // The next write goes to answering followers at once.
        nodes[l].propose(put(2)).unwrap();
        let next = accept_targets(&nodes[l].ready().messages);
        assert_eq!(next.len(), 2);
        assert!(!next.contains(&gone), "{next:?}");
    }

    #[test]
    fn follower_refuses_proposals_with_leader_hint() {
        let mut nodes = cluster(3);
        let mut applied = vec![Vec::new(); 3];
        run(&mut nodes, &mut applied, 100);
        let leader = nodes.iter().find(|n| n.is_leader()).unwrap().id();
        let f = nodes.iter_mut().find(|n| !n.is_leader()).unwrap();
        assert_eq!(f.propose(put(1)), Err(Refusal::NotLeader(Some(leader))));
    }

    #[test]
    fn reads_are_served_after_a_heartbeat_round() {
        let mut nodes = cluster(3);
        let mut applied = vec![Vec::new(); 3];
        run(&mut nodes, &mut applied, 100);
        let l = nodes.iter().position(|n| n.is_leader()).unwrap();
        nodes[l].read(7).unwrap();
        let r = nodes[l].ready();
        assert!(r.reads_ready.is_empty(), "not before a quorum confirms");
        let mut got = Vec::new();
        let hb: Vec<_> = r.messages;
        for (to, m) in hb {
            let reply = nodes[(to - 1) as usize].step(m).unwrap();
            nodes[l].step(reply);
            got.extend(nodes[l].ready().reads_ready);
        }
        assert_eq!(got, vec![7]);
    }

    #[test]
    fn batches_and_messages_are_bounded_in_bytes() {
        let mut nodes = cluster(3);
        let mut applied = vec![Vec::new(); 3];
        let l = elected(&mut nodes, &mut applied);
        // Twenty values of the maximum size, all at once.
        for seq in 1..=20 {
            nodes[l].propose(big_put(seq, 1 << 20)).unwrap();
        }
        let sent = run_cut(&mut nodes, &mut applied, 30, &|_, _| false);
        let mut accepts = 0;
        for m in &sent {
            if let Msg::Accept(a) = m {
                accepts += 1;
                let bytes: usize = a.entries.iter().map(|(_, v)| value_bytes(v)).sum();
                assert!(bytes <= MAX_MESSAGE_BYTES, "an accept of {bytes} bytes");
                for (_, v) in &a.entries {
                    let alone = matches!(v, Value::Batch(b) if b.len() == 1);
                    assert!(
                        value_bytes(v) <= MAX_BATCH_BYTES || alone,
                        "a slot of {} bytes",
                        value_bytes(v)
                    );
                }
                let wire = bincode::serialize(a).unwrap().len();
                assert!(wire < kv_api::MAX_FRAME / 2, "{wire} bytes on the wire");
            }
        }
        assert!(accepts > 0);
        for a in &applied {
            assert_eq!(
                commands(a),
                (1..=20).collect::<Vec<_>>(),
                "all applied, in order"
            );
        }
    }

    #[test]
    fn a_leader_refuses_proposals_beyond_its_queue_bytes() {
        let mut nodes = cluster(3);
        let mut applied = vec![Vec::new(); 3];
        let l = elected(&mut nodes, &mut applied);
        nodes[l].cfg.max_queue_bytes = 3 * request_bytes(&big_put(1, 1 << 20));
        for seq in 1..=3 {
            nodes[l].propose(big_put(seq, 1 << 20)).unwrap();
        }
        assert_eq!(nodes[l].propose(big_put(4, 1 << 20)), Err(Refusal::Busy));
        // Once the queue drains into slots, proposals are taken again.
        let _ = nodes[l].ready();
        assert_eq!(nodes[l].propose(big_put(4, 1 << 20)), Ok(()));
    }

    #[test]
    fn fetch_replies_are_bounded_in_bytes() {
        let mut p = voter_with_chosen(40, |slot| vec![big_put(slot, 1 << 20)]);
        let Some(Msg::FetchReply(r)) = p.step(Msg::Fetch(Fetch {
            from: 2,
            from_slot: 1,
            max_entries: 256,
        })) else {
            panic!("a fetch is answered");
        };
        let bytes: usize = r.entries.iter().map(|(_, v)| value_bytes(v)).sum();
        assert!(!r.entries.is_empty());
        assert!(bytes <= MAX_MESSAGE_BYTES, "{bytes} bytes");
        assert_eq!(r.chosen, 40, "the caller learns there is more");
    }

    /// A promise whose accepted entries do not fit one message comes in
    /// pages, and the new leader re-proposes every entry of every page.
    #[test]
    fn a_promise_too_big_for_one_message_comes_in_pages() {
        let mut nodes = cluster(3);
        for n in nodes.iter_mut() {
            n.cfg.max_message_bytes = 2_000;
            n.cfg.max_batch = 1;
            n.cfg.max_inflight = 16;
            n.cfg.thrifty = false;
        }
        let mut applied = vec![Vec::new(); 3];
        let l = elected(&mut nodes, &mut applied);
        let lid = nodes[l].id();
        let f = (l + 1) % 3;
        // Ten 500-byte writes reach one follower only: chosen (two of
        // three), but the leader never hears so.
        for seq in 1..=10 {
            nodes[l].propose(big_put(seq, 500)).unwrap();
        }
        let r = nodes[l].ready();
        for (to, m) in r.messages {
            if to == nodes[f].id() && matches!(m, Msg::Accept(_)) {
                nodes[f].step(m);
            }
        }
        let _ = nodes[f].ready();
        // The leader dies. The third replica campaigns (the follower is
        // made patient) and needs the follower's promise, in pages.
        nodes[f].election_at = u64::MAX;
        let sent = run_cut(&mut nodes, &mut applied, 300, &|a, b| a == lid || b == lid);
        assert!(
            sent.iter()
                .any(|m| matches!(m, Msg::Promise(p) if p.more && !p.pre_vote)),
            "some promise came in pages"
        );
        for (i, a) in applied.iter().enumerate() {
            if i != l {
                assert_eq!(
                    commands(a),
                    (1..=10).collect::<Vec<_>>(),
                    "replica {}",
                    i + 1
                );
            }
        }
    }

    /// A crash after a received snapshot was installed but before its
    /// compaction was synced: the entries between the chosen mark and the
    /// snapshot may never have been chosen, and must not be served.
    #[test]
    fn entries_between_the_chosen_mark_and_a_newer_snapshot_are_not_served() {
        let entries = (1..=12)
            .map(|slot| {
                (
                    slot,
                    Ballot { round: 1, id: 1 },
                    Value::Batch(vec![put(slot)]),
                )
            })
            .collect();
        let durable = Durable {
            chosen: 5,
            snapshot: 10,
            entries,
            standing: Standing::Voter,
            ..Durable::default()
        };
        let mut p = Paxos::new(Config::new(1, vec![1, 2, 3]), durable);
        assert_eq!(p.chosen(), 10);
        let Some(Msg::FetchReply(r)) = p.step(Msg::Fetch(Fetch {
            from: 2,
            from_slot: 6,
            max_entries: 256,
        })) else {
            panic!("a fetch is answered");
        };
        assert!(r.entries.is_empty(), "served {:?}", r.entries);
        assert_eq!(r.compacted, 10, "the caller is sent to the snapshot");
        assert!(p.ready().persist.contains(&Record::Compacted(10)));
    }

    /// A follower cut off from everyone keeps its ballot (its pre-votes
    /// fail), and on its return the leader stays.
    #[test]
    fn a_returning_replica_does_not_depose_the_leader() {
        let mut nodes = cluster(5);
        let mut applied = vec![Vec::new(); 5];
        let l = elected(&mut nodes, &mut applied);
        let ballot = nodes[l].promised();
        let f = (l + 2) % 5;
        let fid = nodes[f].id();
        run_cut(&mut nodes, &mut applied, 300, &|a, b| {
            a != b && (a == fid || b == fid)
        });
        assert_eq!(
            nodes[f].promised(),
            ballot,
            "the cut-off replica kept its ballot"
        );
        run(&mut nodes, &mut applied, 50);
        assert!(nodes[l].is_leader(), "the leader stayed");
        assert_eq!(nodes[l].promised(), ballot);
        assert_eq!(nodes[f].leader(), Some(nodes[l].id()));
    }

    /// A new cluster starts only once every replica has answered: a replica
    /// that finds its log empty cannot tell a new cluster from lost state.
    #[test]
    fn a_new_cluster_waits_for_every_replica() {
        let mut nodes = cluster(3);
        let mut applied = vec![Vec::new(); 3];
        run_cut(&mut nodes, &mut applied, 100, &|a, b| a == 3 || b == 3);
        assert!(
            nodes.iter().all(|n| !n.is_leader()),
            "no leader without replica 3"
        );
        assert!(nodes.iter().all(|n| n.standing() == Standing::Unknown));
        run(&mut nodes, &mut applied, 100);
        assert_eq!(nodes.iter().filter(|n| n.is_leader()).count(), 1);
        assert!(nodes.iter().all(|n| n.standing() == Standing::Voter));
    }

    /// A replica that lost its state (its log is empty, its peers have
    /// history) votes in nothing until a leader elected without it, in a
    /// round above every ballot it may have promised, leads and it has
    /// caught up; then it votes again.
    #[test]
    fn a_replica_that_lost_its_state_votes_only_after_rejoining() {
        let mut nodes = cluster(3);
        let mut applied = vec![Vec::new(); 3];
        let l = elected(&mut nodes, &mut applied);
        for seq in 1..=5 {
            nodes[l].propose(put(seq)).unwrap();
        }
        run(&mut nodes, &mut applied, 20);
        let w = (l + 1) % 3;
        let wid = nodes[w].id();
        let old_round = nodes[l].promised().round;
        let (lid, lballot) = (nodes[l].id(), nodes[l].promised());
        // Its disk is gone.
        nodes[w] = Paxos::new(Config::new(wid, vec![1, 2, 3]), Durable::default());
        applied[w].clear();
        assert_eq!(nodes[w].standing(), Standing::Unknown);
        let Some(Msg::Promise(p)) = nodes[w].step(Msg::Prepare(Prepare {
            from: lid,
            ballot: Ballot {
                round: old_round + 5,
                id: lid,
            },
            from_slot: 1,
            pre_vote: false,
        })) else {
            panic!("a prepare is answered");
        };
        assert!(!p.ok && p.ballot == Ballot::ZERO, "no vote: {p:?}");
        let Some(Msg::Accepted(a)) = nodes[w].step(Msg::Accept(Accept {
            from: lid,
            ballot: lballot,
            entries: vec![(100, Value::Noop)],
            chosen: 0,
        })) else {
            panic!("an accept is answered");
        };
        assert!(!a.ok, "no vote: {a:?}");
        assert!(nodes[w]
            .ready()
            .persist
            .iter()
            .all(|r| !matches!(r, Record::Accepted { .. })));
        run(&mut nodes, &mut applied, 100);
        assert_eq!(nodes[w].standing(), Standing::Voter, "it rejoined");
        assert!(nodes[l].is_leader(), "the same leader, in a newer ballot");
        assert!(nodes[l].promised().round > old_round);
        assert_eq!(commands(&applied[w]), (1..=5).collect::<Vec<_>>());
    }

    /// Compaction keeps the newest entries behind a snapshot, up to a
    /// number of commands or of bytes, whichever comes first.
    #[test]
    fn compaction_keeps_commands_or_bytes_behind_a_snapshot() {
        let mut p = voter_with_chosen(100, |slot| {
            vec![big_put(slot, 1000), big_put(slot + 1000, 1000)]
        });
        assert_eq!(p.applied(), 100);
        let slot_bytes = value_bytes(&p.log[&1].value);
        // Ten commands: the last five slots (two commands each).
        p.compact_keeping(90, 10, usize::MAX);
        assert_eq!(p.compacted(), 85);
        // Bytes for three slots: three more slots behind 95.
        p.compact_keeping(95, 1000, 3 * slot_bytes);
        assert_eq!(p.compacted(), 92);
        // Never beyond what was applied, and never backwards.
        p.compact_keeping(200, 0, 0);
        assert_eq!(p.compacted(), 100);
        p.compact_keeping(50, 0, 0);
        assert_eq!(p.compacted(), 100);
    }

    /// Strangers' answers count for nothing: two probe replies from ids
    /// outside the cluster, both "empty", would otherwise make a replica of
    /// three decide that the cluster is new (and vote with no memory).
    #[test]
    fn messages_from_non_members_are_dropped() {
        let mut p = Paxos::new(Config::new(1, vec![1, 2, 3]), Durable::default());
        for from in [7, 8] {
            let reply = p.step(Msg::ProbeReply(ProbeReply {
                from,
                voter: true,
                history: false,
                max_round: 0,
            }));
            assert!(reply.is_none());
        }
        assert_eq!(p.standing(), Standing::Unknown);
        assert!(p.probes.is_empty());
        let asked = p.step(Msg::Probe(Probe { from: 9 }));
        assert!(asked.is_none(), "no answer to a stranger: {asked:?}");
    }
}
