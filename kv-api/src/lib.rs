//! The client-facing interface of kvpaxos: the `Kv` tarpc service, the
//! request and response types it carries, its typed errors, and the parser of
//! the `replica` file that clients and servers share.
//!
//! # Layout
//!
//! - [`Kv`] — the service trait (one listener per replica, on its client address).
//! - [`WriteRequest`], [`Op`], [`WriteOutcome`], [`OpResult`] — writes, which go
//!   through the replicated log and are deduplicated by `(client_id, seq)`,
//!   where `client_id` is a session the cluster opened ([`Op::OpenSession`]).
//! - [`ReadMode`], [`GetResponse`] — reads, linearizable or local.
//! - [`ReplicaStatus`] — what `status` reports about one replica.
//! - [`KvError`] — every error a client can see, serializable.
//! - [`replicas`] — the `replica` file format.
//! - `tls` (feature `tls`) — the TLS set-up and certificate names both ends share.
//! - [`Limits`] — key and value size limits, checked by client and server.
//! - [`FaultSpec`], [`FaultReport`] — failure injection, changeable at run time.
#![deny(missing_docs)]

use serde::{Deserialize, Serialize};

pub use data::{
    prefix_end, range_token, CmpOp, Compare, EventKind, KeyValue, LeaseOp, LeaseResult,
    RangeRequest, RangeResponse, Target, Txn, TxnOp, TxnOpResult, TxnResult, WatchEvent,
    WatchRequest, WatchResponse, MAX_LEASE_TTL_MS, MAX_RANGE_BYTES, MAX_RANGE_LIMIT,
    MAX_TXN_COMPARES, MAX_TXN_OPS, MAX_WATCH_EVENTS, MAX_WATCH_WAIT_MS, MIN_LEASE_TTL_MS,
};

pub mod data;
pub mod membership;
pub mod replicas;
#[cfg(feature = "tls")]
pub mod tls;

/// A replica's identifier, a positive integer from the `replica` file.
pub type ReplicaId = u64;

/// An index into the replicated log.
pub type Slot = u64;

/// One write operation.
///
/// Keys and values are written as byte strings (`serde_bytes`): the same
/// bytes on the wire and on disk as a sequence of `u8`, but encoded and
/// decoded with one copy instead of one call per byte, which made large
/// values several times cheaper.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub enum Op {
    /// Set `key` to `value`.
    Put {
        /// The key.
        #[serde(with = "serde_bytes")]
        key: Vec<u8>,
        /// The new value.
        #[serde(with = "serde_bytes")]
        value: Vec<u8>,
    },
    /// Remove `key` if present.
    Delete {
        /// The key.
        #[serde(with = "serde_bytes")]
        key: Vec<u8>,
    },
    /// Set `key` to `new` only if its current value equals `expected`
    /// (`None`: only if the key is absent).
    Cas {
        /// The key.
        #[serde(with = "serde_bytes")]
        key: Vec<u8>,
        /// The value the key must hold now, or `None` for "absent".
        #[serde(with = "serde_bytes")]
        expected: Option<Vec<u8>>,
        /// The value to store if the comparison holds.
        #[serde(with = "serde_bytes")]
        new: Vec<u8>,
    },
    /// Opens a session: answered with [`OpResult::SessionOpened`] and the
    /// id that the writes of the session then carry as `client_id`.
    ///
    /// Sent with `client_id` 0; `seq` and both fields are filled in by the
    /// replica that proposes it (whatever a client puts there is ignored):
    /// the session's idle timeout and the cap on open sessions travel in
    /// the log with the open, so every replica applies the same limits
    /// even if their `kv-server` flags differ.
    ///
    /// It is a write rather than a `Kv` method of its own because it must
    /// take a place in the log like one: it then shares the write path
    /// whole — forwarding by followers, batching, the leader's bookkeeping
    /// of waiting clients, and the answer given when a leader steps down.
    /// It is last among the variants so that log entries and snapshots
    /// written before it existed still decode.
    OpenSession {
        /// Milliseconds of idleness (no write, as the log's clock counts)
        /// after which the session expires.
        ttl_ms: u64,
        /// Opening it evicts the least recently used sessions beyond this
        /// many.
        max_sessions: u64,
    },
    /// Changes the cluster's configuration (admin only): see
    /// [`membership`]. Applied like any write, in its place in the log;
    /// from the next slot on the new configuration decides. Its result is
    /// [`OpResult::Reconfigured`], or an error naming why the change
    /// cannot be made.
    Reconfigure {
        /// The epoch of the configuration it changes. A client sends
        /// `None`; the leader fills in its own, and a change applied to any
        /// other epoch does nothing (see [`membership`]).
        epoch: Option<u64>,
        /// The change.
        change: membership::MemberChange,
    },
    /// A transaction: comparisons, then one of two lists of writes
    /// (see [`Txn`]). Answered with [`OpResult::Txn`].
    Txn(Txn),
    /// Written by a replica into the log when it becomes leader, before any
    /// client write it proposes; refused from clients. Applying the first
    /// one starts the counting of revisions (see [`data`]): an entry only a
    /// leader of this version writes, so that every replica, whatever
    /// snapshot of an older version it started from, starts counting at
    /// the same place in the log. `now_ms` is the leader's clock, which
    /// becomes the log's (if ahead of it).
    NewLeader {
        /// The new leader's clock, milliseconds since the Unix epoch.
        now_ms: u64,
    },
    /// Grants, renews or revokes a lease (see [`LeaseOp`]). Answered with
    /// [`OpResult::Lease`].
    Lease(LeaseOp),
    /// Drops the history of changes up to and including `revision` (cut
    /// to the store's revision): ranges at those revisions and watches
    /// from them are then refused as [`KvError::Compacted`]. Answered with
    /// [`OpResult::Compacted`].
    Compact {
        /// The last revision to forget.
        revision: u64,
    },
    /// Adds `by` to the integer `key` holds (an absent key counts as 0),
    /// keeping its lease: the Redis door's `INCR`, `DECR`, `INCRBY` and
    /// `DECRBY`. One write applied in the state machine rather than a
    /// read and a compare-and-put, so that clients adding to one hot
    /// counter never conflict (a compare-and-put retried by fifty clients
    /// on one key mostly fails). Answered with [`OpResult::Incr`]. Last
    /// among the variants, so that entries written before it still decode.
    Incr {
        /// The key.
        #[serde(with = "serde_bytes")]
        key: Vec<u8>,
        /// What to add (negative: subtract).
        by: i64,
    },
}

impl Op {
    /// The key this operation touches (empty for [`Op::OpenSession`]).
    pub fn key(&self) -> &[u8] {
        match self {
            Op::Put { key, .. }
            | Op::Delete { key }
            | Op::Cas { key, .. }
            | Op::Incr { key, .. } => key,
            Op::OpenSession { .. }
            | Op::Reconfigure { .. }
            | Op::Txn(_)
            | Op::NewLeader { .. }
            | Op::Lease(_)
            | Op::Compact { .. } => &[],
        }
    }

    /// An open as a client sends it (the proposing replica fills it in).
    pub fn open_session() -> Op {
        Op::OpenSession {
            ttl_ms: 0,
            max_sessions: 0,
        }
    }

    /// Bytes of keys and values the operation carries.
    pub fn payload_len(&self) -> usize {
        let values = match self {
            Op::Put { value, .. } => value.len(),
            Op::Delete { .. }
            | Op::OpenSession { .. }
            | Op::NewLeader { .. }
            | Op::Lease(_)
            | Op::Compact { .. }
            | Op::Incr { .. } => 0,
            Op::Reconfigure { change, .. } => match change {
                membership::MemberChange::Add {
                    client_addr,
                    peer_addr,
                    ..
                } => client_addr.len() + peer_addr.len(),
                _ => 0,
            },
            Op::Cas { expected, new, .. } => expected.as_ref().map_or(0, Vec::len) + new.len(),
            Op::Txn(t) => t.payload_len(),
        };
        self.key().len() + values
    }
}

/// A write as a client sends it. `(client_id, seq)` identifies it: the state
/// machine applies a given pair at most once and answers retries with the
/// first result, so a retry after a timeout is safe.
///
/// A write whose `client_id` is not a session the state machine knows
/// (never opened, or expired, or evicted) is refused when its log entry is
/// applied, with [`KvError::UnknownSession`], and not applied.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct WriteRequest {
    /// The session: the id an [`Op::OpenSession`] returned (0 in the open
    /// itself). The cluster assigns it, so that two clients cannot share
    /// one by accident.
    pub client_id: u64,
    /// Increasing per session, starting at 1; a retry reuses the number.
    pub seq: u64,
    /// The client has received the replies of every sequence number below
    /// this one, so the replicas may forget them. 0 or 1 mean "none yet".
    pub acked_below: u64,
    /// What to do.
    pub op: Op,
}

/// The result of one applied write.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub enum OpResult {
    /// A put was applied.
    Put,
    /// A delete was applied; `existed` tells whether the key was there.
    Deleted {
        /// Whether the key existed before the delete.
        existed: bool,
    },
    /// A compare-and-swap was evaluated.
    Cas {
        /// Whether the new value was stored.
        swapped: bool,
        /// The key's value after the operation.
        #[serde(with = "serde_bytes")]
        current: Option<Vec<u8>>,
    },
    /// The request's sequence number is below what the client already
    /// acknowledged, or its result was dropped to bound the session's
    /// memory; the original result has been forgotten and the request was
    /// not applied now. A client that keeps few writes in flight never
    /// sees this.
    Stale,
    /// A session was opened; its writes carry `session` as `client_id`.
    SessionOpened {
        /// The session's id: unique for the life of the cluster (derived
        /// from the log position of the open), never 0.
        session: u64,
    },
    /// A configuration change: the configuration after it, or why it was
    /// not made (nothing changed then).
    Reconfigured(Result<membership::Membership, String>),
    /// A transaction was evaluated.
    Txn(TxnResult),
    /// A leader's [`Op::NewLeader`] entry was applied.
    NewLeader,
    /// A lease operation was applied.
    Lease(LeaseResult),
    /// The history was compacted.
    Compacted {
        /// The history now starts after this revision.
        compacted: u64,
    },
    /// An [`Op::Incr`]: the key's new value, or why nothing changed (the
    /// value is not a decimal integer, or the sum overflows 64 bits).
    Incr(Result<i64, IncrError>),
}

/// Why an [`Op::Incr`] changed nothing.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum IncrError {
    /// The key's value is not a decimal integer within 64 bits.
    NotAnInteger,
    /// The sum is outside 64 bits.
    Overflow,
}

/// A write's result and where it sits in the log.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct WriteOutcome {
    /// The log slot that holds the write (of its first application).
    pub slot: Slot,
    /// The result.
    pub result: OpResult,
}

/// How a read is served.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum ReadMode {
    /// Reflects every write acknowledged before the read began (served by the
    /// leader after it confirms its leadership with a quorum).
    #[default]
    Linearizable,
    /// The contacted replica's own state: fast, possibly stale.
    Local,
}

/// The answer to a get.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct GetResponse {
    /// The value, or `None` if the key is absent.
    #[serde(with = "serde_bytes")]
    pub value: Option<Vec<u8>>,
    /// The log index the serving replica had applied when it read.
    pub applied: Slot,
}

/// One replica's view of itself. (`Default`: a replica that knows
/// nothing yet, every count zero.)
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
pub struct ReplicaStatus {
    /// The replica's id.
    pub id: ReplicaId,
    /// Whether it currently believes itself the leader.
    pub leader: bool,
    /// The leader it knows of, if any.
    pub leader_id: Option<ReplicaId>,
    /// The round of the highest ballot it has promised.
    pub ballot_round: u64,
    /// The highest log index it has applied (0: nothing yet; slots start at 1).
    pub applied: Slot,
    /// The highest slot of the contiguous prefix it knows chosen (0: none).
    pub chosen: Slot,
    /// The log index covered by its latest snapshot (0: none).
    pub snapshot: Slot,
    /// Number of keys in its map.
    pub keys: u64,
    /// Number of client sessions its state machine holds.
    pub sessions: u64,
    /// Whether it votes: `voter`; `rejoining` (it lost its state and
    /// votes again once caught up with a newer leader); `unknown` (it
    /// started with an empty log and is asking its peers what they hold).
    pub standing: String,
    /// Snapshots it has received from peers and installed since it started.
    pub snapshots_installed: u64,
    /// Retried writes it answered, since it started, with the result their
    /// `(client_id, seq)` already had instead of applying them again: as
    /// leader before proposing, or on finding one in the log a second time.
    /// Last, and defaulted: status written without it in a self-describing
    /// encoding (JSON) still reads. (bincode, which tarpc uses, encodes no
    /// field names and so cannot default a missing field.)
    #[serde(default)]
    pub duplicate_writes: u64,
    /// The configuration as this replica knows it (the one its chosen
    /// prefix ends in).
    #[serde(default)]
    pub membership: membership::Membership,
    /// This replica is not a member of that configuration: it was removed
    /// (it votes in nothing and can be stopped).
    #[serde(default)]
    pub removed: bool,
}

/// Where the leader can be reached.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct LeaderHint {
    /// The leader's id.
    pub id: ReplicaId,
    /// The leader's client address (`host:port`).
    pub addr: String,
}

/// Every error the `Kv` service returns.
#[derive(thiserror::Error, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub enum KvError {
    /// This replica does not lead and could not forward; retry at the hint.
    #[error("replica is not the leader{}", match .0 { Some(h) => format!("; the leader is replica {} at {}", h.id, h.addr), None => "; no leader is known yet, retry shortly".to_string() })]
    NotLeader(Option<LeaderHint>),
    /// No quorum could be reached; for a write the outcome is unknown.
    #[error("unavailable: {0}")]
    Unavailable(String),
    /// The request is malformed or too large; it was not applied.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// The operation did not finish in time; for a write the outcome is unknown.
    #[error("timed out: {0}")]
    Timeout(String),
    /// The write's session is not one the cluster knows: never opened, or
    /// expired after being idle, or evicted to bound the number of
    /// sessions. This request was not applied; if it is a retry, an earlier
    /// attempt may have been (its result is gone with the session). Open a
    /// new session for new writes.
    #[error("session {0} is unknown to the cluster (never opened, expired or evicted); this request was not applied")]
    UnknownSession(u64),
    /// The caller's identity (its TLS client certificate) lacks the role
    /// this request needs: `read` for reads and status, `write` for writes,
    /// `admin` for fault injection. Nothing was done.
    #[error("permission denied: {0}")]
    PermissionDenied(String),
    /// The request asks for something this replica was not started to do
    /// (fault injection without `--enable-fault-injection`). Nothing was
    /// done.
    #[error("disabled: {0}")]
    Disabled(String),
    /// The request conflicts with one in progress (a second membership
    /// change while the first is not done). Nothing was done; retry once
    /// the first has finished.
    #[error("conflict: {0}")]
    Conflict(String),
    /// A range at a revision, or a watch from one, asked for history that
    /// was dropped (by compaction, or to stay within its bound): the
    /// history starts after the revision given. Read the current state and
    /// watch from its revision on.
    #[error("revision compacted: the history starts after revision {0}; read the current state and watch from its revision + 1")]
    Compacted(u64),
}

/// Size limits on keys and values, checked by the client before sending and
/// by the server before proposing.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Longest key in bytes (default 1 KiB).
    pub max_key: usize,
    /// Longest value in bytes (default 1 MiB).
    pub max_value: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_key: 1024,
            max_value: 1024 * 1024,
        }
    }
}

impl Limits {
    /// Checks a key: non-empty and not over the limit.
    pub fn check_key(&self, key: &[u8]) -> Result<(), KvError> {
        if key.is_empty() {
            return Err(KvError::InvalidArgument("the key is empty".into()));
        }
        if key.len() > self.max_key {
            return Err(KvError::InvalidArgument(format!(
                "the key is {} bytes, over the limit of {} bytes",
                key.len(),
                self.max_key
            )));
        }
        Ok(())
    }

    /// Checks a value against the limit.
    pub fn check_value(&self, value: &[u8]) -> Result<(), KvError> {
        if value.len() > self.max_value {
            return Err(KvError::InvalidArgument(format!(
                "the value is {} bytes, over the limit of {} bytes",
                value.len(),
                self.max_value
            )));
        }
        Ok(())
    }

    /// Checks every key and value an operation carries.
    pub fn check_op(&self, op: &Op) -> Result<(), KvError> {
        match op {
            Op::Reconfigure { change, .. } => {
                return match change {
                    membership::MemberChange::Add {
                        id,
                        client_addr,
                        peer_addr,
                    } => {
                        if *id == 0 {
                            return Err(KvError::InvalidArgument(
                                "replica ids are positive integers; 0 is not one".into(),
                            ));
                        }
                        membership::check_addr(client_addr)
                            .and_then(|()| membership::check_addr(peer_addr))
                            .map_err(KvError::InvalidArgument)
                    }
                    _ => Ok(()),
                }
            }
            Op::OpenSession { .. } | Op::Compact { .. } => return Ok(()),
            Op::Txn(t) => return t.validate(self),
            Op::Lease(l) => return l.validate(),
            Op::NewLeader { .. } => {
                return Err(KvError::InvalidArgument(
                    "a new-leader entry is written by a replica becoming leader, never sent by a client"
                        .into(),
                ))
            }
            _ => {}
        }
        self.check_key(op.key())?;
        match op {
            Op::Put { value, .. } => self.check_value(value),
            Op::Delete { .. }
            | Op::OpenSession { .. }
            | Op::Reconfigure { .. }
            | Op::Txn(_)
            | Op::NewLeader { .. }
            | Op::Lease(_)
            | Op::Compact { .. }
            | Op::Incr { .. } => Ok(()),
            Op::Cas { expected, new, .. } => {
                if let Some(e) = expected {
                    self.check_value(e)?;
                }
                self.check_value(new)
            }
        }
    }
}

/// Failure injection at a replica's peer RPC layer, for showing that the
/// store keeps working. Every field is optional in a change: `None` leaves
/// the current setting as it is.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
pub struct FaultSpec {
    /// Probability (0..=1) that an outgoing peer message is dropped.
    pub drop_rate: Option<f64>,
    /// Each outgoing peer message is delayed by a random number of
    /// milliseconds in this inclusive range.
    pub delay_ms: Option<(u64, u64)>,
    /// Probability (0..=1) that an outgoing peer call is held until its
    /// deadline and then fails (a forced timeout).
    pub timeout_rate: Option<f64>,
    /// Cut the links with these replicas, both ways (a partition). Replaces
    /// the current set; an empty list heals all links.
    pub isolate: Option<Vec<ReplicaId>>,
    /// Reset everything to no faults before applying the rest.
    pub heal: bool,
}

/// The longest delay failure injection may put on one peer message, in
/// milliseconds (one minute). Every delayed message is a task holding its
/// message until it is sent, so delays of hours would only pile up memory;
/// a minute is already far beyond any election or peer timeout.
pub const MAX_FAULT_DELAY_MS: u64 = 60_000;

impl FaultSpec {
    /// Checks ranges: rates within 0..=1, delay min <= max <=
    /// [`MAX_FAULT_DELAY_MS`].
    pub fn validate(&self) -> Result<(), KvError> {
        for (name, rate) in [
            ("drop rate", self.drop_rate),
            ("timeout rate", self.timeout_rate),
        ] {
            if let Some(r) = rate {
                if !(0.0..=1.0).contains(&r) {
                    return Err(KvError::InvalidArgument(format!(
                        "the {name} {r} is not between 0 and 1"
                    )));
                }
            }
        }
        if let Some((lo, hi)) = self.delay_ms {
            if lo > hi {
                return Err(KvError::InvalidArgument(format!(
                    "the delay range {lo}..{hi} ms is empty (min above max)"
                )));
            }
            if hi > MAX_FAULT_DELAY_MS {
                return Err(KvError::InvalidArgument(format!(
                    "the delay range {lo}..{hi} ms goes over the longest injected delay, \
                     {MAX_FAULT_DELAY_MS} ms"
                )));
            }
        }
        Ok(())
    }
}

/// The failure injection in force at a replica and what it has done.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
pub struct FaultReport {
    /// The settings now in force (every field `Some`).
    pub settings: FaultSpec,
    /// Outgoing messages dropped (by rate or by a cut link).
    pub dropped: u64,
    /// Outgoing messages delayed.
    pub delayed: u64,
    /// Outgoing calls held until their deadline.
    pub timed_out: u64,
    /// Incoming requests refused from cut links.
    pub refused: u64,
}

/// Largest frame either side accepts: a maximal value plus headroom. Both
/// ends raise tarpc's default (8 MiB) to this.
pub const MAX_FRAME: usize = 64 * 1024 * 1024;

/// What a replica that does not lead does with a write or a linearizable
/// read.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Route {
    /// Forwards it to the leader and relays the answer: for a client that
    /// knows only this replica.
    #[default]
    Forward,
    /// Answers [`KvError::NotLeader`] with a hint, so that the client sends
    /// this and later requests to the leader itself: one hop less per
    /// request, for a client that can follow hints.
    Redirect,
}

/// A snapshot held for a backup ([`Kv::backup_begin`]): read it with
/// [`Kv::backup_chunk`] and check what was read against `len` and `crc32`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct BackupInfo {
    /// The log index the snapshot is at: it holds exactly the writes of
    /// the slots up to it.
    pub index: Slot,
    /// The snapshot file's length in bytes.
    pub len: u64,
    /// CRC-32 (IEEE) of the whole file.
    pub crc32: u32,
}

/// Bytes of a snapshot file, from `offset`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct BackupChunk {
    /// Where in the file they start.
    pub offset: u64,
    /// The bytes (empty at the end of the file).
    #[serde(with = "serde_bytes")]
    pub data: Vec<u8>,
}

/// The largest [`BackupChunk`] a replica sends: well below the client
/// port's frame limit.
pub const MAX_BACKUP_CHUNK: u32 = 512 * 1024;

/// The client-facing service every replica serves on its client address.
#[tarpc::service]
pub trait Kv {
    /// Applies a write through the replicated log and returns its result.
    /// A follower forwards it to the leader or redirects the client there,
    /// as `route` says. Retrying the same `(client_id, seq)` is safe: it is
    /// applied at most once. Sessions are opened through here too
    /// ([`Op::OpenSession`]).
    async fn write(req: WriteRequest, route: Route) -> Result<WriteOutcome, KvError>;
    /// Reads a key, linearizably (through the leader: forwarded or
    /// redirected as `route` says) or locally.
    async fn get(key: Vec<u8>, mode: ReadMode, route: Route) -> Result<GetResponse, KvError>;
    /// Reports this replica's role and progress.
    async fn status() -> ReplicaStatus;
    /// Changes the failure injection of this replica's peer RPC layer and
    /// returns the settings now in force and counts of what was injected so
    /// far (an empty change just reports). For tests and demonstrations: it
    /// makes the replica drop, delay or cut messages.
    async fn set_faults(change: FaultSpec) -> Result<FaultReport, KvError>;
    /// Admin: snapshots this replica's state now (unless a snapshot it
    /// holds already covers every write it has applied) and describes
    /// that snapshot, which [`Kv::backup_chunk`] then reads. Asked of the
    /// leader, the snapshot holds every write acknowledged before the
    /// call. The snapshot file is opaque to the client: `kv-server
    /// restore` reads it.
    async fn backup_begin() -> Result<BackupInfo, KvError>;
    /// Admin: up to `max_len` bytes (at most [`MAX_BACKUP_CHUNK`]) of the
    /// snapshot at `index`, from `offset`.
    async fn backup_chunk(index: Slot, offset: u64, max_len: u32) -> Result<BackupChunk, KvError>;
    // Methods are appended, never inserted: tarpc numbers them in order,
    // and older clients must keep reaching the ones they know.
    /// Reads the keys of a range in key order, with their revisions,
    /// linearizably (through the leader, as for `get`) or locally; at most
    /// [`MAX_RANGE_LIMIT`] keys and about [`MAX_RANGE_BYTES`] an answer,
    /// the rest through its continuation token.
    async fn range(
        req: RangeRequest,
        mode: ReadMode,
        route: Route,
    ) -> Result<RangeResponse, KvError>;
    /// A long poll for the changes of a range (see [`WatchRequest`]),
    /// served from this replica's own state: every replica keeps the same
    /// history, so any one answers the same events.
    async fn watch(req: WatchRequest) -> Result<WatchResponse, KvError>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_refuse_large_keys_and_values() {
        let l = Limits::default();
        assert!(l.check_key(b"k").is_ok());
        assert!(l.check_key(b"").is_err());
        assert!(l.check_key(&vec![0; 1025]).is_err());
        assert!(l.check_value(&vec![0; 1 << 20]).is_ok());
        assert!(l.check_value(&vec![0; (1 << 20) + 1]).is_err());
        let cas = Op::Cas {
            key: b"k".to_vec(),
            expected: Some(vec![0; (1 << 20) + 1]),
            new: vec![],
        };
        assert!(l.check_op(&cas).is_err());
    }

    #[test]
    fn fault_delays_are_bounded() {
        let delay = |lo, hi| FaultSpec {
            delay_ms: Some((lo, hi)),
            ..Default::default()
        };
        assert!(delay(0, MAX_FAULT_DELAY_MS).validate().is_ok());
        let e = delay(0, MAX_FAULT_DELAY_MS + 1).validate().unwrap_err();
        assert!(
            matches!(e, KvError::InvalidArgument(ref m) if m.contains("60000 ms")),
            "{e}"
        );
        assert!(delay(u64::MAX, u64::MAX).validate().is_err());
        assert!(delay(5, 4).validate().is_err());
        let nan = FaultSpec {
            drop_rate: Some(f64::NAN),
            ..Default::default()
        };
        assert!(nan.validate().is_err());
    }

    /// Byte strings are encoded exactly as the sequences of `u8` they were
    /// before `serde_bytes` (logs and snapshots written before still
    /// decode, and peers of either kind understand each other), with both
    /// encodings in use: bincode's default options (tarpc) and its fixed
    /// integers (the log and snapshots).
    #[test]
    fn byte_strings_encode_as_the_sequences_of_u8_they_were() {
        use bincode::Options;
        #[derive(Serialize)]
        enum OldOp {
            #[allow(dead_code)]
            Put { key: Vec<u8>, value: Vec<u8> },
            #[allow(dead_code)]
            Delete { key: Vec<u8> },
            Cas {
                key: Vec<u8>,
                expected: Option<Vec<u8>>,
                new: Vec<u8>,
            },
        }
        let value: Vec<u8> = (0..300u32).map(|i| (i % 251) as u8).collect();
        let pairs = [
            (
                bincode::serialize(&Op::Put {
                    key: b"k".to_vec(),
                    value: value.clone(),
                })
                .unwrap(),
                bincode::serialize(&OldOp::Put {
                    key: b"k".to_vec(),
                    value: value.clone(),
                })
                .unwrap(),
            ),
            (
                bincode::DefaultOptions::new()
                    .serialize(&Op::Cas {
                        key: b"k".to_vec(),
                        expected: Some(value.clone()),
                        new: vec![],
                    })
                    .unwrap(),
                bincode::DefaultOptions::new()
                    .serialize(&OldOp::Cas {
                        key: b"k".to_vec(),
                        expected: Some(value.clone()),
                        new: vec![],
                    })
                    .unwrap(),
            ),
        ];
        for (new, old) in pairs {
            assert_eq!(new, old);
        }
        let back: Op = bincode::deserialize(
            &bincode::serialize(&OldOp::Delete {
                key: b"gone".to_vec(),
            })
            .unwrap(),
        )
        .unwrap();
        assert_eq!(
            back,
            Op::Delete {
                key: b"gone".to_vec()
            }
        );
    }

    #[test]
    fn not_leader_message_names_the_leader() {
        let e = KvError::NotLeader(Some(LeaderHint {
            id: 3,
            addr: "127.0.0.1:7003".into(),
        }));
        assert_eq!(
            e.to_string(),
            "replica is not the leader; the leader is replica 3 at 127.0.0.1:7003"
        );
    }
}
