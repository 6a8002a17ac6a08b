//! The replica-to-replica interface of kvpaxos: Multi-Paxos messages,
//! heartbeats, catch-up, and forwarding of client requests to the leader.
//!
//! Clients never link this crate; only `kv-server` does.
//!
//! # Layout
//!
//! - [`Ballot`] — totally ordered `(round, replica id)`.
//! - [`Value`] — what one log slot chooses: a batch of client writes or a no-op.
//! - Phase 1: [`Prepare`] → [`Promise`] (also pre-votes); phase 2:
//!   [`Accept`] → [`Accepted`]; [`Heartbeat`] → [`HeartbeatAck`]; catch-up:
//!   [`Fetch`] → [`FetchReply`], and [`SnapshotRequest`] → [`SnapshotChunk`]
//!   when the log was compacted; [`Probe`] → [`ProbeReply`] for a replica
//!   that started with an empty log.
//! - [`Peer`] — the tarpc service every replica serves on its peer address.
#![deny(missing_docs)]

use serde::{Deserialize, Serialize};

pub use kv_api::membership::{Member, MemberChange, Membership};
pub use kv_api::{
    GetResponse, KvError, Op, RangeRequest, RangeResponse, ReadMode, ReplicaId, Slot, WriteOutcome,
    WriteRequest,
};

/// A proposal number: totally ordered by round, then replica id, so two
/// replicas never use the same ballot.
#[derive(
    Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default,
)]
pub struct Ballot {
    /// Increases with every election a replica starts.
    pub round: u64,
    /// The replica that owns the ballot (0 only in the initial zero ballot).
    pub id: ReplicaId,
}

impl Ballot {
    /// The ballot below every real one.
    pub const ZERO: Ballot = Ballot { round: 0, id: 0 };

    /// Bits of `round` below the configuration epoch.
    pub const EPOCH_SHIFT: u32 = 32;

    /// The configuration epoch the ballot belongs to: the high bits of its
    /// round. Every ballot of a later configuration is above every ballot
    /// of an earlier one (see the core's module doc on membership).
    pub fn epoch(&self) -> u64 {
        self.round >> Self::EPOCH_SHIFT
    }

    /// The lowest ballot of configuration epoch `epoch`, above every ballot
    /// of the epochs before it; no replica campaigns with it (its id is 0).
    pub fn epoch_floor(epoch: u64) -> Ballot {
        Ballot {
            round: epoch.saturating_mul(1 << Self::EPOCH_SHIFT),
            id: 0,
        }
    }
}

impl std::fmt::Display for Ballot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.epoch() {
            0 => write!(f, "{}.{}", self.round, self.id),
            e => write!(
                f,
                "{e}:{}.{}",
                self.round & ((1 << Self::EPOCH_SHIFT) - 1),
                self.id
            ),
        }
    }
}

/// What a log slot chooses.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub enum Value {
    /// Fills a hole; applies nothing.
    Noop,
    /// Client writes, applied in order.
    Batch(Vec<WriteRequest>),
    /// The log's clock: the leader's wall-clock time (milliseconds since
    /// the Unix epoch) when it proposed this entry. Whatever depends on
    /// time (session expiry) is decided by applying these, so every replica
    /// decides the same at the same log position and none acts on its own
    /// clock. Appliers must treat the log's time as never going back
    /// (take the maximum): a new leader's clock may be behind.
    Time(u64),
}

/// One accepted (not necessarily chosen) log entry, as reported in a promise.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct AcceptedEntry {
    /// The slot.
    pub slot: Slot,
    /// The ballot it was accepted in.
    pub ballot: Ballot,
    /// The value.
    pub value: Value,
    /// The sender knows this value is chosen (the ballot is then irrelevant:
    /// a candidate must re-propose exactly this value).
    pub chosen: bool,
}

/// Phase 1a: a candidate asks for promises from `from_slot` on. Also the
/// pre-vote that comes before it (`pre_vote`): "would you promise this
/// ballot?", answered without promising anything, so that a replica that
/// cannot win (cut off, or facing a live leader) never raises its ballot
/// and disrupts the others when it comes back.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct Prepare {
    /// The sender.
    pub from: ReplicaId,
    /// The candidate's ballot.
    pub ballot: Ballot,
    /// The first slot the candidate does not know chosen (for a later page
    /// of a promise: the first slot not yet reported).
    pub from_slot: Slot,
    /// A pre-vote, not a prepare.
    pub pre_vote: bool,
}

/// Phase 1b: the answer to a prepare.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct Promise {
    /// The sender.
    pub from: ReplicaId,
    /// The ballot promised, if `ok`; else the higher ballot already promised.
    pub ballot: Ballot,
    /// Whether the promise was given.
    pub ok: bool,
    /// Entries accepted at or after `from_slot` (empty unless `ok`), in
    /// slot order, bounded in bytes.
    pub accepted: Vec<AcceptedEntry>,
    /// The sender's chosen prefix: every slot up to here is chosen.
    pub chosen: Slot,
    /// The answer to a pre-vote (then nothing was promised).
    pub pre_vote: bool,
    /// `accepted` was cut to bound the message: the sender holds more
    /// entries after the last one reported, and the candidate must ask for
    /// them (a prepare of the same ballot from the next slot) before it
    /// counts this promise.
    pub more: bool,
}

/// Phase 2a: the leader asks to accept values (several slots at once).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct Accept {
    /// The sender.
    pub from: ReplicaId,
    /// The leader's ballot.
    pub ballot: Ballot,
    /// `(slot, value)` pairs to accept.
    pub entries: Vec<(Slot, Value)>,
    /// The leader's chosen prefix, so followers learn what is chosen.
    pub chosen: Slot,
}

/// Phase 2b: the answer to an accept.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct Accepted {
    /// The sender.
    pub from: ReplicaId,
    /// The ballot accepted, if `ok`; else the higher ballot already promised.
    pub ballot: Ballot,
    /// Whether the entries were accepted.
    pub ok: bool,
    /// The slots accepted.
    pub slots: Vec<Slot>,
}

/// The leader's periodic assertion of its ballot and progress.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct Heartbeat {
    /// The sender.
    pub from: ReplicaId,
    /// The leader's ballot.
    pub ballot: Ballot,
    /// The leader's chosen prefix.
    pub chosen: Slot,
    /// The heartbeat's round number, echoed in the ack; confirms leadership
    /// for reads (read-index).
    pub round: u64,
    /// The last slot this leader re-proposed when it took office: every
    /// slot that may have been chosen in an earlier ballot is at or below
    /// it. A replica rejoining after losing its state votes once it knows
    /// every slot up to here chosen.
    pub term_start: Slot,
}

/// The answer to a heartbeat.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct HeartbeatAck {
    /// The sender.
    pub from: ReplicaId,
    /// The highest ballot the sender has promised.
    pub ballot: Ballot,
    /// Whether the sender still follows the heartbeat's ballot.
    pub ok: bool,
    /// The heartbeat round echoed back.
    pub round: u64,
    /// The sender's chosen prefix (so the leader sees who is behind).
    pub chosen: Slot,
    /// The sender does not vote yet (it lost its state and is rejoining):
    /// it needs a leader whose ballot has at least this round (see
    /// `Probe`). `ok` is then false and `ballot` zero.
    pub rejoin_floor: Option<u64>,
    /// The sender does not know yet whether it may vote: it started with
    /// an empty log and is still asking its peers (`Probe`). A learner is
    /// promoted only once this and `rejoin_floor` are clear.
    pub unsure: bool,
}

/// Asked by a replica that started with an empty log: it cannot tell a
/// new cluster from a lost disk, so it asks the others what they hold
/// before it votes in anything.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct Probe {
    /// The sender.
    pub from: ReplicaId,
}

/// What a replica holds, for a `Probe`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct ProbeReply {
    /// The sender.
    pub from: ReplicaId,
    /// The sender votes (its log holds all it ever promised and accepted).
    pub voter: bool,
    /// The sender has promised or accepted something, knows something
    /// chosen, holds a snapshot, or is rejoining: the cluster is not new.
    /// (A pre-vote granted does not count: voters of a new cluster grant
    /// each other pre-votes before a majority of them exists.)
    pub history: bool,
    /// The highest election round the sender promised or granted in a
    /// pre-vote.
    pub max_round: u64,
}

/// Catch-up: asks for chosen entries from `from_slot` on.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct Fetch {
    /// The sender.
    pub from: ReplicaId,
    /// The first slot wanted.
    pub from_slot: Slot,
    /// At most this many entries.
    pub max_entries: u32,
}

/// Chosen entries in slot order, contiguous from the requested slot.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct FetchReply {
    /// The sender.
    pub from: ReplicaId,
    /// `(slot, chosen value)`, contiguous from the requested slot.
    pub entries: Vec<(Slot, Value)>,
    /// The sender's chosen prefix.
    pub chosen: Slot,
    /// The sender no longer keeps entries at or below this slot (they are
    /// in its snapshot): a caller that needs them must fetch the snapshot.
    pub compacted: Slot,
}

/// Asks for a piece of a snapshot file.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct SnapshotRequest {
    /// The sender.
    pub from: ReplicaId,
    /// The snapshot wanted (`None`: the newest; then keep asking for the
    /// index the first answer names).
    pub index: Option<Slot>,
    /// Byte offset in the file.
    pub offset: u64,
    /// At most this many bytes.
    pub max_len: u32,
}

/// A piece of a snapshot file.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct SnapshotChunk {
    /// The snapshot's log index.
    pub index: Slot,
    /// The whole file's length.
    pub total_len: u64,
    /// Where these bytes start.
    pub offset: u64,
    /// The bytes.
    pub data: Vec<u8>,
}

/// The service every replica serves on its peer address.
#[tarpc::service]
pub trait Peer {
    /// Phase 1: promise not to accept lower ballots; report accepted entries.
    async fn prepare(req: Prepare) -> Promise;
    /// What the receiver holds: asked by a replica that started empty.
    async fn probe(req: Probe) -> ProbeReply;
    /// Phase 2: accept entries (persisted before the reply).
    async fn accept(req: Accept) -> Accepted;
    /// Leader liveness, chosen prefix, and read-index confirmation.
    async fn heartbeat(req: Heartbeat) -> HeartbeatAck;
    /// Returns chosen entries the caller lacks.
    async fn fetch(req: Fetch) -> FetchReply;
    /// Returns a piece of a snapshot file, for a replica too far behind to
    /// catch up from the log. Errors say why (e.g. no such snapshot).
    async fn snapshot_chunk(req: SnapshotRequest) -> Result<SnapshotChunk, String>;
    /// A client write forwarded by follower `from`; answered as the leader would.
    async fn forward_write(from: ReplicaId, req: WriteRequest) -> Result<WriteOutcome, KvError>;
    /// A linearizable read forwarded by follower `from`.
    async fn forward_get(from: ReplicaId, key: Vec<u8>) -> Result<GetResponse, KvError>;
    // Appended, never inserted: tarpc numbers methods in order.
    /// A linearizable range read forwarded by follower `from`.
    async fn forward_range(from: ReplicaId, req: RangeRequest) -> Result<RangeResponse, KvError>;
}
