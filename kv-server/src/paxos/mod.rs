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
//!
//! # Layout, by role
//!
//! - `acceptor`: promises, accepts, heartbeats from the leader followed,
//!   and [`Standing`] (whether a replica that may have lost its state
//!   votes yet, with the argument why that is safe);
//! - `election`: pre-vote and phase 1, the state of each kept in its
//!   `Role` variant;
//! - `leader`: phase 2 (batching, pipelining, thrifty targeting,
//!   retransmission, the contact check), all its state in `Leader`,
//!   dropped when it steps down;
//! - `read_index`: linearizable reads confirmed by heartbeat rounds, or
//!   served under the leader's lease (with the argument why that is safe);
//! - `learner`: the chosen prefix, apply, catch-up (fetch, snapshots) and
//!   compaction;
//! - `quorum`: every "is this a majority" question goes through its
//!   `Quorum`; a leader's per-follower progress (`Tracker`) lives there
//!   too.
//!
//! - `membership`: configuration changes (see below).
//!
//! This module holds the messages, records and tuning shared by all, the
//! `Paxos` struct, the dispatch of input ([`Paxos::step`], [`Paxos::tick`])
//! and the output ([`Paxos::ready`]).
//!
//! # Membership: stop signs and epochs
//!
//! The configuration (voters, learners, their addresses; see
//! [`kv_peer_api::Membership`]) is replicated state: a change is a write
//! ([`kv_peer_api::Op::Reconfigure`]) chosen in a slot like any other, and
//! every replica computes the configuration at each log position from the
//! log alone (a new cluster's first one comes from the replica file). A
//! slot whose value changes the configuration is a *stop sign*: the
//! configuration of epoch `e` decides every slot up to and including it,
//! and the next one, epoch `e + 1`, decides every slot after it. Of the
//! three schemes the issue offered (joint consensus, a window of `α` slots,
//! a stop sign as omnipaxos has), this one needs no quorum of two
//! configurations at once and lets a change replace any number of voters
//! in one step.
//!
//! Rules, each enforced here:
//!
//! 1. **Ballots carry an epoch** in the high bits of the round
//!    ([`kv_peer_api::Ballot::epoch`]), so every ballot of epoch `e + 1` is
//!    above every ballot of epoch `e`. A replica runs phase 1 among the
//!    voters of the epoch its chosen prefix ends in, with a ballot of at
//!    least that epoch (a later one if it has seen one: a leader that
//!    learned a change chosen may crash before anyone else learns it,
//!    after the acceptors promised its new epoch's ballot; the old epoch
//!    is then finished under a ballot of the new one's range).
//! 2. **A leader proposes nothing after a stop sign** until it knows the
//!    stop sign chosen: a change gets a slot of its own, the last the
//!    leader proposes in its epoch. A new leader that finds a stop sign
//!    among the values it must re-propose re-proposes up to it and no
//!    further.
//! 3. **A replica that learns a stop sign chosen** (its chosen prefix
//!    passes it) raises its promise to the lowest ballot of the new epoch
//!    (durably, like any promise), drops every entry after the stop sign it
//!    accepted in an older epoch, and takes the new configuration for every
//!    quorum from then on. A leader of the old epoch steps down; if it
//!    votes in the new one it runs phase 1 there at once, to the new
//!    voters, from the slot after the stop sign.
//! 4. **Only values of the right epoch count as chosen** after a stop sign:
//!    a leader's word that a slot is chosen is taken for an entry accepted
//!    in that leader's ballot only up to a stop sign of a later epoch.
//!
//! Why no two quorums can choose different values for one slot. Take slot
//! `s`, governed by epoch `e` (the epoch after the last stop sign before
//! `s`). Within epoch `e` this is single-configuration Paxos: every ballot
//! of epoch `e` runs phase 1 at a majority of `e`'s voters (rule 1), so
//! any two of its quorums meet, and a value chosen at `s` in a ballot of
//! `e` is the only one any later ballot of `e` proposes there. Ballots of
//! other epochs cannot interfere: one of an earlier epoch `d < e` either
//! belongs to a leader that knows the stop sign ending `d` chosen (then it
//! proposes nothing past it, rule 2) or to one that does not; what such a
//! leader gets accepted at `s` is in `d`'s ballot: rule 4 keeps any
//! replica from counting it chosen, rule 3 from keeping it once it knows
//! better, and a candidate of `e` ignores what promises report accepted in
//! an older epoch and not known chosen (it is void: it would take a
//! chosen value only if the candidate found it known chosen, which a
//! replica records only by rules 3 and 4). Ballots of a later epoch's
//! range do not interfere either: a proposer runs phase 1 among the voters
//! of the epoch its own chosen prefix ends in, whatever its ballot (rule
//! 1). One whose prefix ends in `e` uses `e`'s quorums; one whose prefix
//! ends later knows `s` chosen and proposes only after it; one whose
//! prefix ends earlier, in `d`, finds the stop sign ending `d` in phase 1
//! (it is chosen, so `d`'s quorums report it) and proposes nothing after
//! it (rule 2). Which value is chosen at
//! `s` therefore depends on epoch `e`'s quorums alone, and those always
//! intersect. Applying in slot order, every replica applies, for each
//! slot, the value chosen in the epoch that governs it.
//!
//! A replica that is removed learns so as any other: it applies the stop
//! sign, finds itself out of the configuration, votes in nothing and says
//! so (also on every start). Members answer a non-member's prepare with a
//! refusal carrying their chosen prefix, and serve it chosen entries, so a
//! removed replica that was down during its removal still finds out.
//!
//! A change is done only when a majority of its new voters know it chosen
//! ([`Paxos::change_known`]; the driver answers the change only then). A
//! leader that removes itself may be the only replica that knows: the
//! others accepted the stop sign and had not heard it chosen. Stopped then
//! (as a removed replica may be), it would leave them counting the old
//! configuration's quorums, which count it: with one new voter down too,
//! a majority of the new configuration is up and elects no one. So the
//! leader hands over (`membership::Handoff`): it keeps sending the new
//! voters heartbeats of the ballot it led in, saying the stop sign's slot
//! is chosen, until a majority of them answer that they know. That adds
//! nothing to argue for safety: the word is true (it knows the slot
//! chosen), it comes in a ballot in which this replica led and proposed at
//! most one value per slot, and the receivers take it by the same rules as
//! any leader's (rule 4 included).
//! The simulation (`kv-server/tests/simulation.rs`) draws changes per
//! seed and checks that every replica applies the same value in every
//! slot.

mod acceptor;
mod election;
mod leader;
mod learner;
mod membership;
mod quorum;
mod read_index;
#[cfg(test)]
mod testkit;

use std::collections::BTreeMap;

use kv_peer_api::{
    Accept, Accepted, Ballot, Fetch, FetchReply, Heartbeat, HeartbeatAck, Membership, Prepare,
    Probe, ProbeReply, Promise, ReplicaId, Slot, Value, WriteRequest,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

pub use acceptor::Standing;
use election::{Candidate, PreCandidate};
use leader::Leader;
pub use membership::{stop_sign, PROMOTE_LAG};
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
    /// A leader that has not heard from a majority for the election
    /// timeout's upper bound steps down. Always on in a replica; the
    /// simulation turns it off in some seeds, so that what keeps a cut-off
    /// leader from serving stale reads is the lease alone, as argued.
    pub check_quorum: bool,
    /// Leases, in microseconds of the lease clock ([`Paxos::set_clock`]):
    /// for this long after it accepts a leader's heartbeat, an acceptor
    /// promises no other proposer, and for [`Config::leader_lease_us`] after
    /// starting a heartbeat round a majority acknowledges, a leader may
    /// serve linearizable reads without another round (see `read_index`).
    /// 0: no leases (neither refusals nor leased reads). Every replica of a
    /// cluster must refuse for at least as long as any leader counts on.
    pub lease_us: u64,
    /// Whether this replica, leading, serves reads from its lease (when
    /// `lease_us` is not 0); off, every read waits for a heartbeat round.
    pub read_lease: bool,
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
            check_quorum: true,
            lease_us: 0,
            read_lease: false,
        }
    }

    /// How long after starting a heartbeat round that a majority then
    /// acknowledged a leader counts on its lease: 9/10 of the acceptors'
    /// `lease_us`, which holds while every replica's lease clock runs within
    /// 5% of real time's rate (a lease read at the leader's elapsed `0.9 W`
    /// happens by real time `0.9 W / 0.95 < W / 1.05`, before any acceptor
    /// of the majority has counted `W`). See `read_index`.
    pub fn leader_lease_us(&self) -> u64 {
        self.lease_us / 10 * 9
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
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// This replica does not lead; the leader it knows of, if any.
    NotLeader(Option<ReplicaId>),
    /// This replica leads but its proposal queue is full: retry later.
    Busy,
    /// A configuration change while another is in progress, or one that
    /// cannot be made now (promoting a learner that has not caught up).
    Conflict(String),
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
    /// The configuration this replica started from before any snapshot:
    /// a new cluster's first one (from the replica file), or the one a
    /// joining replica was given. Written once; the log and snapshots say
    /// what became of it.
    Seed(Membership),
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
    /// Every read of `reads_ready` may be served once the state machine
    /// has applied this slot (often already before this round's `apply`).
    pub reads_index: Slot,
    /// Reads refused: this replica no longer leads (hint: who might).
    pub reads_failed: Vec<(u64, Option<ReplicaId>)>,
    /// Proposals dropped before they got a slot (this replica stopped leading).
    pub dropped: Vec<(WriteRequest, Option<ReplicaId>)>,
    /// This replica is behind what its peers keep in their logs: fetch the
    /// snapshot from this peer and [`Paxos::install_snapshot`] it.
    pub snapshot_from: Option<ReplicaId>,
    /// The configuration changed (its chosen prefix passed a change, or a
    /// snapshot was installed): the peers to talk to are these. Set before
    /// this `Ready`'s messages, which may already go to new members.
    pub membership: Option<Membership>,
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
            && self.membership.is_none()
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
    /// The configuration as of the snapshot (or, without one, the first
    /// configuration); `None`: every replica of [`Config::members`], a
    /// voter, in epoch 0.
    pub membership: Option<Membership>,
    /// `membership` is not on disk yet: record it ([`Record::Seed`]).
    pub persist_seed: bool,
}

/// The Multi-Paxos state machine of one replica.
pub struct Paxos {
    cfg: Config,
    /// Every quorum decision goes through it.
    quorum: Quorum,
    /// The configuration the chosen prefix ends in.
    membership: Membership,
    rng: StdRng,
    now: u64,
    /// The lease clock, in microseconds, as the driver last set it
    /// ([`Paxos::set_clock`]); `None` before the first reading.
    clock: Option<u64>,

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
    /// Until when (lease clock) this acceptor promises no proposer but
    /// `lease_holder`: a leader whose heartbeat it accepted counts on it
    /// (see `read_index`). Not durable: after a start it refuses everyone
    /// for [`Config::lease_us`] (`lease_holder` is `None`).
    lease_until: u64,
    lease_holder: Option<ReplicaId>,
    /// Linearizable reads this replica served under its lease, as leader.
    leased_reads: u64,
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

    /// The chosen prefix each member last said it has (in its heartbeat
    /// answers and promises): whether a change is known chosen by a majority
    /// of the voters ([`Paxos::change_known`]).
    peer_chosen: BTreeMap<ReplicaId, Slot>,
    /// A leader that left the voters hands the change over: see
    /// [`membership::Handoff`].
    handoff: Option<membership::Handoff>,

    out: Ready,
    chosen_dirty: bool,
}

impl Paxos {
    /// A replica starting from its durable state.
    pub fn new(cfg: Config, durable: Durable) -> Paxos {
        let membership = durable
            .membership
            .clone()
            .unwrap_or_else(|| membership::of_ids(&cfg.members));
        let quorum = Quorum::of(cfg.id, &membership);
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
        if durable.persist_seed {
            if let Some(m) = &durable.membership {
                persist.push(Record::Seed(m.clone()));
            }
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
            membership,
            rng,
            now: 0,
            clock: None,
            lease_until: 0,
            lease_holder: None,
            leased_reads: 0,
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
            peer_chosen: BTreeMap::new(),
            handoff: None,
            out: Ready {
                persist,
                ..Ready::default()
            },
            chosen_dirty: false,
            cfg,
        };
        p.reset_election_timer();
        p.replay_membership(durable.snapshot);
        p.emit_apply();
        p.decide_standing();
        p
    }

    /// This replica's id.
    pub fn id(&self) -> ReplicaId {
        self.cfg.id
    }

    /// Whether this replica leads (phase 1 done for its ballot).
    pub fn is_leader(&self) -> bool {
        matches!(self.role, Role::Leader(_))
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

    /// Linearizable reads served under the leader's lease, without a
    /// heartbeat round of their own, over this replica's life.
    pub fn leased_reads(&self) -> u64 {
        self.leased_reads
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

    fn others(&self) -> Vec<ReplicaId> {
        self.quorum.others()
    }

    fn send(&mut self, to: ReplicaId, msg: Msg) {
        self.out.messages.push((to, msg));
    }

    /// Sends `msg` to every other voter.
    fn broadcast(&mut self, msg: Msg) {
        for to in self.others() {
            self.send(to, msg.clone());
        }
    }

    /// Sends `msg` to every other member, learners included.
    fn broadcast_members(&mut self, msg: Msg) {
        for to in self.others().into_iter().chain(self.quorum.learners()) {
            self.send(to, msg.clone());
        }
    }

    fn reset_election_timer(&mut self) {
        let (lo, hi) = self.cfg.election_ticks;
        let span = self.rng.random_range(lo..=hi.max(lo));
        self.last_heard = self.now;
        self.election_at = self.now + u64::from(span);
    }

    /// Another replica holds a ballot above ours: follow it. Whatever the
    /// role held goes with it; a leader's queued proposals and waiting
    /// reads are handed back to the driver, refused.
    fn step_down(&mut self, leader: Option<ReplicaId>) {
        if !matches!(self.role, Role::Follower) {
            tracing::info!(id = self.cfg.id, ballot = %self.promised, ?leader, "stepping down");
        }
        match std::mem::replace(&mut self.role, Role::Follower) {
            Role::Leader(l) => {
                for req in l.queue {
                    self.out.dropped.push((req, leader));
                }
                for r in l.read_index.waiting {
                    self.out.reads_failed.push((r.token, leader));
                }
            }
            Role::Candidate(c) => {
                for req in c.carried {
                    self.out.dropped.push((req, leader));
                }
            }
            Role::PreCandidate(_) | Role::Follower => {}
        }
        self.leader = leader;
    }

    /// Sets the lease clock: microseconds of a monotonic clock that keeps
    /// counting while the process or machine is paused, from any fixed
    /// origin. With leases on ([`Config::lease_us`]), the driver sets it
    /// before every tick and before every input that grants or checks a
    /// lease: a heartbeat, a prepare, a linearizable read (a reading from
    /// before such an input arrived would not do: an acceptor would time
    /// its refusal from too early, a leader count a lease that ran out).
    /// Elsewhere an older reading only starts a leader's lease earlier,
    /// which shortens it. Readings that go back are ignored. The
    /// first reading starts this acceptor's refusal of every prepare for
    /// a lease's length: a lease it granted before a restart is not
    /// remembered.
    pub fn set_clock(&mut self, us: u64) {
        match self.clock {
            None => {
                self.clock = Some(us);
                self.lease_until = us.saturating_add(self.cfg.lease_us);
                self.lease_holder = None;
            }
            Some(c) if us > c => self.clock = Some(us),
            Some(_) => {}
        }
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
        self.hand_over();
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

    /// Handles a message. For a request (prepare, accept, heartbeat, fetch)
    /// returns the reply, which must be held back until this round's
    /// `ready().persist` is on disk.
    ///
    /// A message whose sender is not a member is dropped (`None`): every
    /// map of answers here is keyed by sender and every quorum counts
    /// senders, so a stranger must neither be counted nor grow them. (That
    /// a member is who it says is the transport's to prove: peer
    /// authentication.)
    ///
    /// A non-member's prepare is refused (showing our chosen prefix, so a
    /// replica removed while it was down learns it is behind and fetches
    /// its own removal) and its fetch served: neither changes anything
    /// here.
    pub fn step(&mut self, msg: Msg) -> Option<Msg> {
        let from = msg.from();
        if !self.quorum.is_member(from) {
            return self.step_stranger(msg);
        }
        // What an answer says the sender has chosen: read by a leader and a
        // replica handing a change over (`change_known`), which hear only
        // answers; a follower's accept path does not pay for it.
        let chosen = match &msg {
            Msg::HeartbeatAck(m) => Some(m.chosen),
            Msg::Promise(m) => Some(m.chosen),
            _ => None,
        };
        if let Some(c) = chosen {
            // Its newest word, even if lower (it lost its state).
            self.peer_chosen.insert(from, c);
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

    /// Takes what the driver must do now.
    pub fn ready(&mut self) -> Ready {
        if self.is_leader() {
            self.propose_queued();
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
    use super::testkit::*;
    use super::*;

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
}
