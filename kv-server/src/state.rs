//! The replicated state machine: the key-value map plus the client
//! sessions. Every replica applies the same log to it and so passes through
//! the same states; nothing here may depend on anything but the log (no
//! clock, no flag, no randomness), or replicas would drift apart.
//!
//! # Sessions
//!
//! A client opens a session through the log ([`Op::OpenSession`]); the id is
//! derived from the open's log position, so it is unique for the life of
//! the cluster and no two clients can share one by accident — the flaw of
//! client-chosen ids, where a process restarting with its old id and
//! sequence numbers from 1 was answered from the old session's results and
//! had its writes silently dropped. Each write carries `(session, seq)`; the
//! session keeps the results of writes the client has not acknowledged yet
//! (below `acked_below` they are forgotten), so a retry, even through
//! another replica, is answered with the first result, never applied twice.
//! A write for a session the state machine does not know is refused
//! ([`KvError::UnknownSession`]) and not applied.
//!
//! Memory is bounded: per session by count and bytes of cached results (a
//! result dropped for space is refused as [`OpResult::Stale`] if retried),
//! overall by the number of sessions and the bytes of all cached results
//! (the least recently used sessions are evicted), and in time: a session
//! idle for longer than its TTL expires. Time is the log's own clock — the
//! largest `Value::Time` the leaders proposed, applied in order — so every
//! replica drops the same sessions at the same log position.
//!
//! # Before sessions
//!
//! Log entries and snapshots written by the versions before sessions
//! existed carry client-chosen ids that were never opened. Until the log
//! holds an entry only a session-aware leader writes (an open or a time
//! reading), writes are applied by the old rules exactly ([`legacy`
//! mode](StateMachine::sessions_required)), so that every replica reaches
//! the same state whatever old snapshot it started from. At that entry the
//! old sessions are dropped: their ids were chosen by clients, which is the
//! flaw sessions remove, and a client of that version cannot write to the
//! new one anyway (it never opens a session); a late retry of one of its
//! writes is refused as an unknown session — not applied — which is safe.

use std::collections::{btree_map, BTreeMap, BTreeSet, HashMap, VecDeque};
use std::iter::Peekable;
use std::ops::Bound;

use kv_api::{
    range_token, EventKind, IncrError, KeyValue, KvError, LeaseOp, LeaseResult, Limits, Op,
    OpResult, RangeRequest, RangeResponse, Slot, Txn, TxnOp, TxnOpResult, TxnResult, WatchEvent,
    WatchRequest, WatchResponse, WriteOutcome, WriteRequest, MAX_RANGE_BYTES, MAX_WATCH_EVENTS,
};
use serde::{Deserialize, Serialize};

/// How long a session may stay idle (no write applied) before it expires,
/// unless the leader that opened it was told otherwise (`kv-server
/// --session-ttl`). Long next to any client's retry budget (5 s by
/// default), so a client that is retrying a write does not lose its session
/// meanwhile; short enough that the sessions of one-shot CLI invocations do
/// not pile up for hours.
pub const DEFAULT_SESSION_TTL_MS: u64 = 30 * 60 * 1000;

/// Sessions kept at most, unless the leader that opened a session was told
/// otherwise (`kv-server --max-sessions`): opening one beyond this evicts
/// the least recently used. About 200 bytes each without cached results.
pub const DEFAULT_MAX_SESSIONS: u64 = 100_000;

/// Results kept per session, at most; older ones are forgotten (a client
/// with that many writes in flight is misbehaving).
const MAX_RESULTS_PER_SESSION: usize = 4096;

/// Bytes of cached results kept per session, at most: a failed
/// compare-and-swap caches the key's current value, up to 1 MiB, so a count
/// alone would let one session hold gigabytes.
const MAX_RESULT_BYTES_PER_SESSION: u64 = 8 << 20;

/// Bytes of cached results kept over all sessions, at most: beyond it the
/// least recently used sessions are evicted. With the per-session bound
/// alone, the session cap times 8 MiB would be no bound at all.
#[cfg(not(test))]
const MAX_RESULT_BYTES: u64 = 256 << 20;
/// Smaller in unit tests, which fill it.
#[cfg(test)]
const MAX_RESULT_BYTES: u64 = 32 << 20;

/// The session ids of one log slot: `slot << OPEN_BITS | n` for the n-th
/// open applied in it. A slot holds at most a batch of writes (hundreds),
/// far below 2^20.
const OPEN_BITS: u32 = 20;

/// Results kept per client by the rules before sessions (legacy mode).
const LEGACY_MAX_RESULTS: usize = 4096;

#[derive(Default, Debug, Clone, Serialize, Deserialize)]
struct Session {
    /// Every seq below this has been acknowledged to the client, or had its
    /// result dropped for space: a request below it is answered `Stale`,
    /// never applied.
    acked_below: u64,
    /// Results of applied writes with seq >= acked_below.
    results: BTreeMap<u64, WriteOutcome>,
    /// Idle time after which it expires, in the log's milliseconds.
    ttl_ms: u64,
    /// The log's time when a write of it was last applied.
    last_used_ms: u64,
    /// The value of [`StateMachine::uses`] when a write of it was last
    /// applied: orders eviction (least recently used first).
    last_use: u64,
    /// What `results` hold, by [`result_bytes`]. Not in snapshots: counted
    /// again by [`StateMachine::recount`].
    #[serde(skip)]
    result_bytes: u64,
}

impl Session {
    fn expires_at(&self) -> u64 {
        self.last_used_ms.saturating_add(self.ttl_ms)
    }

    /// Forgets the results below `seq` (acknowledged, or dropped for
    /// space) and refuses them from now on.
    fn forget_below(&mut self, seq: u64) {
        if seq <= self.acked_below {
            return;
        }
        self.acked_below = seq;
        let kept = self.results.split_off(&seq);
        for gone in std::mem::replace(&mut self.results, kept).values() {
            self.result_bytes -= result_bytes(gone);
        }
    }

    /// Caches a result, then drops the oldest ones beyond the count and
    /// byte limits. Dropping one moves `acked_below` past it: with its
    /// result gone, a late retry of it could no longer be recognised, and
    /// must be refused rather than applied a second time.
    fn remember(&mut self, seq: u64, outcome: WriteOutcome) {
        self.result_bytes += result_bytes(&outcome);
        if let Some(old) = self.results.insert(seq, outcome) {
            self.result_bytes -= result_bytes(&old);
        }
        while self.results.len() > MAX_RESULTS_PER_SESSION
            || (self.result_bytes > MAX_RESULT_BYTES_PER_SESSION && self.results.len() > 1)
        {
            let Some((&oldest, _)) = self.results.first_key_value() else {
                break;
            };
            self.forget_below(oldest + 1);
        }
    }
}

/// What a cached result costs, roughly: the bytes it holds plus the map
/// entry around it.
fn result_bytes(o: &WriteOutcome) -> u64 {
    let held = match &o.result {
        OpResult::Cas {
            current: Some(v), ..
        } => v.len(),
        OpResult::Txn(t) => 16 * t.results.len(),
        _ => 0,
    };
    held as u64 + 64
}

/// The map's keys and values as byte strings, as the formats before
/// revisions wrote them (read, never written): the same bytes as sequences
/// of `u8`, but copied whole instead of one call per byte.
mod byte_map {
    use std::collections::HashMap;

    use serde::de::{MapAccess, Visitor};
    use serde::Deserializer;
    use serde_bytes::ByteBuf;

    pub fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<HashMap<Vec<u8>, Vec<u8>>, D::Error> {
        struct Pairs;
        impl<'de> Visitor<'de> for Pairs {
            type Value = HashMap<Vec<u8>, Vec<u8>>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a map of byte strings")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut a: A) -> Result<Self::Value, A::Error> {
                // The length comes from the file: reserve no more than a
                // bounded amount up front.
                let hint = a.size_hint().unwrap_or(0).min(1 << 20);
                let mut map = HashMap::with_capacity(hint);
                while let Some((k, v)) = a.next_entry::<ByteBuf, ByteBuf>()? {
                    map.insert(k.into_vec(), v.into_vec());
                }
                Ok(map)
            }
        }
        d.deserialize_map(Pairs)
    }
}

/// A lease: keys attached to it are deleted when it expires (by the log's
/// clock) or is revoked.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
struct Lease {
    ttl_ms: u64,
    /// The log's time after which it expires.
    expires_at: u64,
    /// The keys attached to it.
    keys: BTreeSet<Vec<u8>>,
}

/// One change of one key in the history.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct Change {
    rev: u64,
    #[serde(with = "serde_bytes")]
    key: Vec<u8>,
    /// The key after (`None`: deleted).
    new: Option<Entry>,
    /// The key before (`None`: absent).
    prev: Option<Entry>,
}

impl Change {
    fn bytes(&self) -> u64 {
        let v = |e: &Option<Entry>| e.as_ref().map_or(0, |e| e.value.len());
        (self.key.len() + v(&self.new) + v(&self.prev) + 96) as u64
    }
}

/// Most changes the history keeps (whole revisions are dropped from its
/// start beyond it): what ranges at a revision and watches can reach back.
/// In every snapshot, so it is the same on every replica — and so it is
/// small: with 100,000 changes and 32 MiB, a map of 10,000 small keys
/// (1.4 MB) made 33 MB snapshots, and puts at 16 clients on 2 cores were
/// half as fast, the replicas serializing and syncing history.
#[cfg(not(test))]
const MAX_HISTORY_CHANGES: usize = 10_000;
#[cfg(test)]
const MAX_HISTORY_CHANGES: usize = 50;

/// Most bytes of keys and values the history keeps.
const MAX_HISTORY_BYTES: u64 = 4 << 20;

/// Most leases held at once: a grant beyond it is refused (each holds a
/// set of keys, and expiring them is work on every replica).
const MAX_LEASES: usize = 100_000;

/// One key's value and metadata in the map.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct Entry {
    #[serde(with = "serde_bytes")]
    value: Vec<u8>,
    /// Revision of the write that created the key (0: before revisions).
    create: u64,
    /// Revision of the write that last changed it (0: before revisions).
    modified: u64,
    /// Writes since creation, 1 on creation.
    version: u64,
    /// The lease it is attached to (0: none).
    lease: u64,
}

impl Entry {
    /// A key as a version that did not count revisions left it.
    fn legacy(value: Vec<u8>) -> Entry {
        Entry {
            value,
            create: 0,
            modified: 0,
            version: 1,
            lease: 0,
        }
    }

    fn to_kv(&self, key: &[u8], with_value: bool) -> KeyValue {
        KeyValue {
            key: key.to_vec(),
            value: if with_value {
                self.value.clone()
            } else {
                Vec::new()
            },
            create_revision: self.create,
            mod_revision: self.modified,
            version: self.version,
            lease: self.lease,
        }
    }
}

/// The ordered map with its keys as byte strings (one copy, not one call
/// per byte), written in key order, so that decoding appends.
mod entry_map {
    use std::collections::BTreeMap;

    use serde::de::{MapAccess, Visitor};
    use serde::ser::SerializeMap;
    use serde::{Deserializer, Serializer};
    use serde_bytes::{ByteBuf, Bytes};

    use super::Entry;

    pub fn serialize<S: Serializer>(
        map: &BTreeMap<Vec<u8>, Entry>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        let mut out = s.serialize_map(Some(map.len()))?;
        for (k, v) in map {
            out.serialize_entry(Bytes::new(k), v)?;
        }
        out.end()
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<BTreeMap<Vec<u8>, Entry>, D::Error> {
        struct Pairs;
        impl<'de> Visitor<'de> for Pairs {
            type Value = BTreeMap<Vec<u8>, Entry>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a map of byte strings to entries")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut a: A) -> Result<Self::Value, A::Error> {
                // Collected, then built in one pass: full nodes, where
                // inserting the sorted pairs one by one leaves them half
                // full (see `StateMachine::snapshot_copy`). The capacity
                // the file claims is not trusted beyond a bound.
                let mut pairs = Vec::with_capacity(a.size_hint().unwrap_or(0).min(1 << 16));
                while let Some((k, v)) = a.next_entry::<ByteBuf, Entry>()? {
                    pairs.push((k.into_vec(), v));
                }
                Ok(pairs.into_iter().collect())
            }
        }
        d.deserialize_map(Pairs)
    }
}

/// The map as it was at a revision: the keys of `now` (the map), except
/// those in `then` (changed since), which are as `then` says (`None`:
/// absent then). Both in key order.
struct AtRevision<'a> {
    now: Peekable<btree_map::Range<'a, Vec<u8>, Entry>>,
    then: Peekable<btree_map::Range<'a, Vec<u8>, Option<Entry>>>,
}

impl<'a> Iterator for AtRevision<'a> {
    type Item = (&'a Vec<u8>, &'a Entry);

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            let take_then = match (self.now.peek(), self.then.peek()) {
                (None, None) => return None,
                (Some(_), None) => false,
                (None, Some(_)) => true,
                (Some((n, _)), Some((t, _))) => {
                    if n == t {
                        self.now.next();
                        true
                    } else {
                        t < n
                    }
                }
            };
            if !take_then {
                return self.now.next();
            }
            if let Some((k, Some(e))) = self.then.next() {
                return Some((k, e));
            }
        }
    }
}

/// The key-value map and the client sessions. Serializable: a snapshot is
/// this structure as of `applied`.
#[derive(Default, Debug, Clone, Serialize, Deserialize)]
pub struct StateMachine {
    /// Ordered, for ranges. (A `HashMap` before; see `put_throughput` in
    /// the README for what the order costs.)
    #[serde(with = "entry_map")]
    map: BTreeMap<Vec<u8>, Entry>,
    sessions: HashMap<u64, Session>,
    applied: Slot,
    /// The log's clock, in milliseconds since the Unix epoch: the largest
    /// time reading applied so far (0: none yet).
    now_ms: u64,
    /// Whether writes need an opened session; false until the first open
    /// or time reading (see the module docs).
    sessions_required: bool,
    /// Writes applied to sessions so far: the clock of "least recently
    /// used".
    uses: u64,
    /// The slot of the last open and how many opens it held, for ids.
    opens_in_slot: (Slot, u64),
    /// Sessions dropped so far because they were idle too long / to stay
    /// within the caps. Like everything here, a function of the log.
    expired: u64,
    evicted: u64,
    /// The store's revision: that of the last write that changed the map
    /// (0: none since revisions are counted).
    revision: u64,
    /// Whether revisions are counted: from the first [`Op::NewLeader`]
    /// on (see `kv_api::data`). Before, every write has revision 0 and a
    /// key's version stays 1, so that replicas that started from
    /// snapshots of an older version, at different places in the log,
    /// still agree key for key.
    revisions: bool,
    /// The leases, by id (numbered like sessions, from the grant's log
    /// position).
    leases: BTreeMap<u64, Lease>,
    /// `(expires_at, id)` of every lease.
    #[serde(skip)]
    lease_deadlines: BTreeSet<(u64, u64)>,
    /// The recent changes, in revision order: every change after
    /// `compacted` (bounded by [`MAX_HISTORY_CHANGES`] and
    /// [`MAX_HISTORY_BYTES`]).
    history: VecDeque<Change>,
    /// The history holds every change after this revision.
    compacted: u64,
    /// What `history` holds, by [`Change::bytes`].
    #[serde(skip)]
    history_bytes: u64,
    /// `(expires_at, id)` of every session (in sessions-required mode).
    #[serde(skip)]
    by_expiry: BTreeSet<(u64, u64)>,
    /// `(last_use, id)` of every session (in sessions-required mode).
    #[serde(skip)]
    by_use: BTreeSet<(u64, u64)>,
    /// Bytes of all sessions' cached results.
    #[serde(skip)]
    result_bytes: u64,
    /// Bytes of the keys and values in `map`. Not in snapshots: counted
    /// again by [`StateMachine::recount`] when one is read.
    #[serde(skip)]
    bytes: u64,
    /// Writes found in the log a second time (a retry proposed before the
    /// first attempt was applied) and answered with the first result.
    /// Not in snapshots (an old snapshot must still decode): counts what
    /// this copy applied.
    #[serde(skip)]
    duplicates: u64,
    /// The cluster's configuration after the applied prefix. Kept beside
    /// the body in snapshot files (see `snapshot`), not in it, so bodies
    /// of every format still decode.
    #[serde(skip)]
    membership: kv_api::membership::Membership,
    /// The result of the configuration change being applied (see
    /// [`StateMachine::apply`]).
    #[serde(skip)]
    reconfigured: Option<Result<kv_api::membership::Membership, String>>,
}

/// The state machine as the versions before sessions wrote it in a
/// snapshot (`KVSNAP01`): field for field the same shape, so bincode reads
/// it.
#[derive(Deserialize)]
pub(crate) struct LegacyStateMachine {
    #[serde(with = "byte_map")]
    map: HashMap<Vec<u8>, Vec<u8>>,
    sessions: HashMap<u64, LegacySession>,
    applied: Slot,
}

#[derive(Deserialize)]
struct LegacySession {
    acked_below: u64,
    results: BTreeMap<u64, WriteOutcome>,
}

/// The state machine as the versions with sessions but before revisions
/// wrote it in a snapshot (`KVSNAP02`): field for field the same shape.
#[derive(Deserialize)]
pub(crate) struct V2StateMachine {
    #[serde(with = "byte_map")]
    map: HashMap<Vec<u8>, Vec<u8>>,
    sessions: HashMap<u64, Session>,
    applied: Slot,
    now_ms: u64,
    sessions_required: bool,
    uses: u64,
    opens_in_slot: (Slot, u64),
    expired: u64,
    evicted: u64,
}

/// Keys of a snapshot written before revisions: revision 0, version 1.
fn legacy_map(map: HashMap<Vec<u8>, Vec<u8>>) -> BTreeMap<Vec<u8>, Entry> {
    map.into_iter()
        .map(|(k, v)| (k, Entry::legacy(v)))
        .collect()
}

impl From<V2StateMachine> for StateMachine {
    /// Everything as it was; revisions are counted from the first
    /// [`Op::NewLeader`] in the log after it.
    fn from(old: V2StateMachine) -> StateMachine {
        let mut sm = StateMachine {
            map: legacy_map(old.map),
            sessions: old.sessions,
            applied: old.applied,
            now_ms: old.now_ms,
            sessions_required: old.sessions_required,
            uses: old.uses,
            opens_in_slot: old.opens_in_slot,
            expired: old.expired,
            evicted: old.evicted,
            ..StateMachine::default()
        };
        sm.recount();
        sm
    }
}

impl From<LegacyStateMachine> for StateMachine {
    /// Keeps the sessions, in legacy mode: the log after the snapshot was
    /// written by the same rules, and must be applied by them.
    fn from(old: LegacyStateMachine) -> StateMachine {
        let mut sm = StateMachine {
            map: legacy_map(old.map),
            applied: old.applied,
            sessions: old
                .sessions
                .into_iter()
                .map(|(id, s)| {
                    let session = Session {
                        acked_below: s.acked_below,
                        results: s.results,
                        ..Session::default()
                    };
                    (id, session)
                })
                .collect(),
            ..StateMachine::default()
        };
        sm.recount();
        sm
    }
}

impl StateMachine {
    /// The highest slot applied.
    pub fn applied(&self) -> Slot {
        self.applied
    }

    /// A copy of the whole state for a snapshot, taken so that the live
    /// map comes out packed. A B-tree filled in key order (a bulk load, or
    /// loading a snapshot by inserting pair after pair) keeps its nodes
    /// about half full (six keys of eleven: an insertion at the right end
    /// of a full node splits it there); one built in a single pass from
    /// its sorted pairs (`BTreeMap::from_iter`) fills them. So the copy
    /// is built that way and kept as the live map, and the old map goes
    /// to the snapshot, at the cost of the copy that a snapshot took
    /// anyway (plus, while it runs, a vector of the pairs).
    pub fn snapshot_copy(&mut self) -> StateMachine {
        let packed: BTreeMap<Vec<u8>, Entry> = self
            .map
            .iter()
            .map(|(k, e)| (k.clone(), e.clone()))
            .collect();
        let old = std::mem::take(&mut self.map);
        let mut copy = self.clone();
        copy.map = old;
        self.map = packed;
        copy
    }

    /// Number of keys.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Bytes of the keys and values in the map.
    pub fn data_bytes(&self) -> u64 {
        self.bytes
    }

    /// Number of sessions held.
    pub fn session_count(&self) -> usize {
        self.sessions.len()
    }

    /// Sessions expired (idle too long) and evicted (over a cap) so far.
    pub fn sessions_dropped(&self) -> (u64, u64) {
        (self.expired, self.evicted)
    }

    /// Writes this copy found in the log again and answered with the
    /// result of their first application, not applying them twice.
    pub fn duplicates(&self) -> u64 {
        self.duplicates
    }

    /// The log's clock: the largest time reading applied, in milliseconds
    /// since the Unix epoch (0: none yet).
    pub fn log_time_ms(&self) -> u64 {
        self.now_ms
    }

    /// Whether writes need a session opened through the log. False only
    /// while the log holds nothing but entries of the versions before
    /// sessions; the first open or time reading makes it true for good.
    pub fn sessions_required(&self) -> bool {
        self.sessions_required
    }

    /// Counts what snapshots leave out ([`StateMachine::data_bytes`], the
    /// bytes of cached results, the session indexes) from scratch, after
    /// decoding.
    pub fn recount(&mut self) {
        self.bytes = self.map.iter().map(|(k, e)| pair_len(k, &e.value)).sum();
        self.result_bytes = 0;
        self.by_expiry.clear();
        self.by_use.clear();
        for (&id, s) in &mut self.sessions {
            s.result_bytes = s.results.values().map(result_bytes).sum();
            self.result_bytes += s.result_bytes;
            if self.sessions_required {
                self.by_expiry.insert((s.expires_at(), id));
                self.by_use.insert((s.last_use, id));
            }
        }
        self.lease_deadlines = self
            .leases
            .iter()
            .map(|(&id, l)| (l.expires_at, id))
            .collect();
        self.history_bytes = self.history.iter().map(Change::bytes).sum();
    }

    /// Records a change of revision `rev` (only once revisions count).
    fn record(&mut self, rev: u64, key: &[u8], new: Option<Entry>, prev: Option<Entry>) {
        if !self.revisions {
            return;
        }
        let c = Change {
            rev,
            key: key.to_vec(),
            new,
            prev,
        };
        self.history_bytes += c.bytes();
        self.history.push_back(c);
        while self.history.len() > MAX_HISTORY_CHANGES || self.history_bytes > MAX_HISTORY_BYTES {
            let Some(first) = self.history.front().map(|c| c.rev) else {
                break;
            };
            self.forget_history(first);
        }
    }

    /// Drops the history up to and including revision `upto`.
    fn forget_history(&mut self, upto: u64) {
        while self.history.front().is_some_and(|c| c.rev <= upto) {
            if let Some(c) = self.history.pop_front() {
                self.history_bytes -= c.bytes();
            }
        }
        self.compacted = self.compacted.max(upto);
    }

    /// The revision after which the history starts.
    pub fn compacted(&self) -> u64 {
        self.compacted
    }

    /// The changes in `req`'s range from its cursor on (see
    /// [`WatchRequest`]): at most its limit, about [`MAX_RANGE_BYTES`], and
    /// where to go on. A cursor before the history is refused as
    /// [`KvError::Compacted`].
    pub fn watch(&self, req: &WatchRequest) -> Result<WatchResponse, KvError> {
        if req.from_revision <= self.compacted {
            return Err(KvError::Compacted(self.compacted));
        }
        let limit = match req.limit {
            0 => MAX_WATCH_EVENTS,
            n => n.min(MAX_WATCH_EVENTS),
        } as usize;
        let first = self.history.partition_point(|c| c.rev < req.from_revision);
        let mut resp = WatchResponse {
            revision: self.revision,
            compacted: self.compacted,
            ..WatchResponse::default()
        };
        let (mut cur_rev, mut cur_count) = (req.from_revision, req.skip);
        let mut skipped = 0;
        let mut bytes = 0;
        let mut cut = false;
        for c in self.history.range(first..) {
            if !req.contains(&c.key) {
                continue;
            }
            if c.rev == req.from_revision && skipped < req.skip {
                skipped += 1;
                continue;
            }
            if resp.events.len() >= limit || (bytes > MAX_RANGE_BYTES && !resp.events.is_empty()) {
                cut = true;
                break;
            }
            let prev = if req.prev_kv {
                c.prev.as_ref().map(|e| e.to_kv(&c.key, true))
            } else {
                None
            };
            let (kind, kv) = match &c.new {
                Some(e) => (EventKind::Put, e.to_kv(&c.key, true)),
                None => (
                    EventKind::Delete,
                    KeyValue {
                        key: c.key.clone(),
                        mod_revision: c.rev,
                        ..KeyValue::default()
                    },
                ),
            };
            bytes += kv.key.len() + kv.value.len() + prev.as_ref().map_or(0, |p| p.value.len());
            resp.events.push(WatchEvent { kind, kv, prev });
            if c.rev == cur_rev {
                cur_count += 1;
            } else {
                (cur_rev, cur_count) = (c.rev, 1);
            }
        }
        (resp.next_revision, resp.next_skip) = if cut {
            (cur_rev, cur_count)
        } else if self.revision >= req.from_revision {
            // Everything in the range up to the store's revision is seen.
            (self.revision + 1, 0)
        } else {
            (req.from_revision, req.skip)
        };
        Ok(resp)
    }

    /// Whether a watch from `req`'s cursor could have something to answer
    /// (or an error): cheap, for the driver's parked watches.
    pub fn watch_ready(&self, req: &WatchRequest) -> bool {
        req.from_revision <= self.revision || req.from_revision <= self.compacted
    }

    /// Number of leases held.
    pub fn lease_count(&self) -> usize {
        self.leases.len()
    }

    /// The lease `id`'s TTL and the log time it expires at, if it exists.
    pub fn lease(&self, id: u64) -> Option<(u64, u64)> {
        self.leases.get(&id).map(|l| (l.ttl_ms, l.expires_at))
    }

    /// A lease a write names that does not exist (0 names none).
    fn missing_lease(&self, op: &Op) -> Option<u64> {
        let Op::Txn(t) = op else { return None };
        t.success.iter().chain(&t.failure).find_map(|op| match op {
            TxnOp::Put { lease, .. } if *lease != 0 && !self.leases.contains_key(lease) => {
                Some(*lease)
            }
            _ => None,
        })
    }

    /// The next id numbered from log position `slot`: `slot << 20 | n`
    /// for the n-th session or lease of the slot.
    fn number_in_slot(&mut self, slot: Slot) -> Option<u64> {
        if self.opens_in_slot.0 != slot {
            self.opens_in_slot = (slot, 0);
        }
        let n = self.opens_in_slot.1;
        let id = slot
            .checked_mul(1 << OPEN_BITS)
            .filter(|_| n < 1 << OPEN_BITS)
            .map(|base| base | n)
            .filter(|id| !self.sessions.contains_key(id) && !self.leases.contains_key(id))?;
        self.opens_in_slot.1 += 1;
        Some(id)
    }

    /// Applies a lease operation from `slot`.
    fn lease_op(&mut self, slot: Slot, op: &LeaseOp) -> LeaseResult {
        match *op {
            LeaseOp::Grant { ttl_ms, now_ms } => {
                let ttl_ms = ttl_ms.clamp(kv_api::MIN_LEASE_TTL_MS, kv_api::MAX_LEASE_TTL_MS);
                let id = if self.leases.len() < MAX_LEASES {
                    self.number_in_slot(slot)
                } else {
                    None
                };
                let Some(id) = id else {
                    return LeaseResult {
                        id: 0,
                        ttl_ms: 0,
                        deleted: 0,
                    };
                };
                let expires_at = now_ms.max(self.now_ms).saturating_add(ttl_ms);
                self.leases.insert(
                    id,
                    Lease {
                        ttl_ms,
                        expires_at,
                        keys: BTreeSet::new(),
                    },
                );
                self.lease_deadlines.insert((expires_at, id));
                LeaseResult {
                    id,
                    ttl_ms,
                    deleted: 0,
                }
            }
            LeaseOp::KeepAlive { id, now_ms } => {
                let ttl_ms = match self.leases.get(&id) {
                    Some(l) => l.ttl_ms,
                    None => 0,
                };
                if ttl_ms > 0 {
                    let at = now_ms.max(self.now_ms).saturating_add(ttl_ms);
                    self.renew(id, at);
                }
                LeaseResult {
                    id,
                    ttl_ms,
                    deleted: 0,
                }
            }
            LeaseOp::Revoke { id } => LeaseResult {
                id,
                ttl_ms: 0,
                deleted: self.end_lease(id),
            },
        }
    }

    /// Moves lease `id`'s end to `at`, if later.
    fn renew(&mut self, id: u64, at: u64) {
        if let Some(l) = self.leases.get_mut(&id) {
            if at > l.expires_at {
                self.lease_deadlines.remove(&(l.expires_at, id));
                l.expires_at = at;
                self.lease_deadlines.insert((at, id));
            }
        }
    }

    /// Ends lease `id` and deletes its keys, at one revision; how many.
    fn end_lease(&mut self, id: u64) -> u64 {
        let Some(lease) = self.leases.remove(&id) else {
            return 0;
        };
        self.lease_deadlines.remove(&(lease.expires_at, id));
        let rev = self.next_revision();
        let mut deleted = 0;
        for key in &lease.keys {
            if self.map.get(key).is_some_and(|e| e.lease == id) {
                self.remove(key, rev);
                deleted += 1;
            }
        }
        if deleted > 0 && self.revisions {
            self.revision = rev;
        }
        deleted
    }

    /// Ends every lease whose time is up by the log's clock.
    fn expire_leases(&mut self) {
        while let Some(&(at, id)) = self.lease_deadlines.first() {
            if at >= self.now_ms {
                break;
            }
            self.end_lease(id);
        }
    }

    /// Sets `key` to `value` as the write of revision `rev` (0 before
    /// revisions are counted).
    fn insert(&mut self, key: &[u8], value: &[u8], rev: u64, lease: u64) {
        self.bytes += pair_len(key, value);
        if lease != 0 {
            if let Some(l) = self.leases.get_mut(&lease) {
                l.keys.insert(key.to_vec());
            }
        }
        // One lookup; the entry before moves into the history (only its
        // value is replaced), where it used to be copied, and the map was
        // searched three times.
        let revisions = self.revisions;
        let (new, prev) = match self.map.get_mut(key) {
            Some(e) => {
                self.bytes -= pair_len(key, &e.value);
                let old_value = std::mem::replace(&mut e.value, value.to_vec());
                let prev = revisions.then_some(Entry {
                    value: old_value,
                    create: e.create,
                    modified: e.modified,
                    version: e.version,
                    lease: e.lease,
                });
                e.modified = rev;
                if e.lease != lease && e.lease != 0 {
                    if let Some(l) = self.leases.get_mut(&e.lease) {
                        l.keys.remove(key);
                    }
                }
                e.lease = lease;
                if revisions {
                    e.version += 1;
                }
                (revisions.then(|| e.clone()), prev)
            }
            None => {
                let e = Entry {
                    value: value.to_vec(),
                    create: rev,
                    modified: rev,
                    version: 1,
                    lease,
                };
                let new = revisions.then(|| e.clone());
                self.map.insert(key.to_vec(), e);
                (new, None)
            }
        };
        if revisions {
            self.record(rev, key, new, prev);
        }
    }

    /// Removes `key` as the write of revision `rev`; whether it was there.
    fn remove(&mut self, key: &[u8], rev: u64) -> bool {
        match self.map.remove(key) {
            Some(old) => {
                self.bytes -= pair_len(key, &old.value);
                if old.lease != 0 {
                    if let Some(l) = self.leases.get_mut(&old.lease) {
                        l.keys.remove(key);
                    }
                }
                self.record(rev, key, None, Some(old));
                true
            }
            None => false,
        }
    }

    /// The revision the next write that changes the map takes (0 while
    /// revisions are not counted).
    fn next_revision(&self) -> u64 {
        if self.revisions {
            self.revision + 1
        } else {
            0
        }
    }

    /// The store's revision: that of the last write that changed the map.
    pub fn revision(&self) -> u64 {
        self.revision
    }

    /// Whether revisions are counted yet (see `kv_api::data`).
    pub fn revisions_counted(&self) -> bool {
        self.revisions
    }

    /// `key` with its revisions.
    pub fn get_kv(&self, key: &[u8]) -> Option<KeyValue> {
        self.map.get(key).map(|e| e.to_kv(key, true))
    }

    /// Reads a range (see [`RangeRequest`]): at most its limit of keys and
    /// about [`MAX_RANGE_BYTES`], with a continuation token for the rest.
    /// Bad bounds or a token no answer gave are refused.
    pub fn range(&self, req: &RangeRequest, limits: &Limits) -> Result<RangeResponse, KvError> {
        req.validate(limits)?;
        let from = req.resume_key(limits)?;
        let end = if req.end.is_empty() {
            Bound::Unbounded
        } else {
            Bound::Excluded(req.end.as_slice())
        };
        let bounds = (Bound::Included(from.as_slice()), end);
        let at = match req.revision {
            0 => self.revision,
            r if r > self.revision => {
                return Err(KvError::Unavailable(format!(
                    "revision {r} is ahead of this replica, which has applied up to revision {}; \
                     retry, or read through the leader",
                    self.revision
                )))
            }
            r if r < self.compacted => return Err(KvError::Compacted(self.compacted)),
            r => r,
        };
        // The keys as they were at `at`: the current ones, but for the
        // keys changed since, as they were before their first change
        // after `at` (the history holds every change after `compacted`).
        let mut before = BTreeMap::new();
        if at < self.revision {
            let first = self.history.partition_point(|c| c.rev <= at);
            for c in self.history.range(first..) {
                let inside =
                    c.key.as_slice() >= from.as_slice() && (req.end.is_empty() || c.key < req.end);
                if inside {
                    before
                        .entry(c.key.clone())
                        .or_insert_with(|| c.prev.clone());
                }
            }
        }
        let keys = AtRevision {
            now: self.map.range::<[u8], _>(bounds).peekable(),
            then: before.range::<[u8], _>(bounds).peekable(),
        };
        let mut resp = RangeResponse {
            revision: at,
            applied: self.applied,
            ..RangeResponse::default()
        };
        if req.count_only {
            resp.count = keys.count() as u64;
            return Ok(resp);
        }
        let limit = req.effective_limit();
        let mut bytes = 0usize;
        for (k, e) in keys {
            let size = k.len() + if req.keys_only { 0 } else { e.value.len() };
            if resp.kvs.len() >= limit || (bytes + size > MAX_RANGE_BYTES && !resp.kvs.is_empty()) {
                resp.more = true;
                resp.token = Some(range_token(k));
                break;
            }
            bytes += size;
            resp.kvs.push(e.to_kv(k, !req.keys_only));
        }
        resp.count = resp.kvs.len() as u64;
        Ok(resp)
    }

    /// Whether the map is empty.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Reads a key.
    pub fn get(&self, key: &[u8]) -> Option<&Vec<u8>> {
        self.map.get(key).map(|e| &e.value)
    }

    /// The result of `(client_id, seq)` if it was already applied and is
    /// still held.
    pub fn cached(&self, client_id: u64, seq: u64) -> Option<WriteOutcome> {
        self.sessions
            .get(&client_id)
            .and_then(|s| s.results.get(&seq).cloned())
    }

    /// The cluster's configuration after the applied prefix.
    pub fn membership(&self) -> &kv_api::membership::Membership {
        &self.membership
    }

    /// The configuration, if this state machine has one: `None` for one
    /// read from a snapshot written before configurations were kept in
    /// them (and not yet given one).
    pub fn known_membership(&self) -> Option<&kv_api::membership::Membership> {
        (!self.membership.members.is_empty()).then_some(&self.membership)
    }

    /// Sets the configuration (from a snapshot, or the first one).
    pub fn set_membership(&mut self, m: kv_api::membership::Membership) {
        self.membership = m;
    }

    /// Marks `slot` applied (for no-ops and batches alike).
    pub fn set_applied(&mut self, slot: Slot) {
        self.applied = slot;
    }

    /// Applies one write from `slot`, at most once per `(client_id, seq)`:
    /// an open, or a write of a known session. A write of an unknown
    /// session is refused and changes nothing.
    ///
    /// A configuration change takes effect whatever the session's answer
    /// (unknown, a retry): the consensus core decides from the log alone
    /// which slots change the configuration ([`crate::paxos::stop_sign`]),
    /// and this copy must agree with it at every position.
    pub fn apply(&mut self, slot: Slot, req: &WriteRequest) -> Result<WriteOutcome, KvError> {
        self.reconfigured = self.membership.apply_op(&req.op);
        if let Some(Ok(m)) = &self.reconfigured {
            self.membership = m.clone();
        }
        if let Op::OpenSession {
            ttl_ms,
            max_sessions,
        } = req.op
        {
            self.require_sessions();
            return self.open(slot, ttl_ms, max_sessions);
        }
        if let Op::NewLeader { now_ms } = req.op {
            self.new_leader(now_ms);
            return Ok(WriteOutcome {
                slot,
                result: OpResult::NewLeader,
            });
        }
        if self.cached(req.client_id, req.seq).is_none() {
            if let Some(lease) = self.missing_lease(&req.op) {
                return Err(KvError::InvalidArgument(format!(
                    "lease {lease} does not exist (never granted, expired or revoked); nothing \
                     was applied"
                )));
            }
        }
        if !self.sessions_required {
            return Ok(self.apply_legacy(slot, req));
        }
        let id = req.client_id;
        let Some(session) = self.sessions.get_mut(&id) else {
            return Err(KvError::UnknownSession(id));
        };
        let held = session.result_bytes;
        session.forget_below(req.acked_below);
        let done = if req.seq < session.acked_below {
            Some(WriteOutcome {
                slot,
                result: OpResult::Stale,
            })
        } else {
            let first = session.results.get(&req.seq).cloned();
            self.duplicates += u64::from(first.is_some());
            first
        };
        let outcome = match done {
            Some(done) => done,
            None => {
                let outcome = WriteOutcome {
                    slot,
                    result: self.execute(slot, &req.op),
                };
                if let Some(session) = self.sessions.get_mut(&id) {
                    session.remember(req.seq, outcome.clone());
                }
                outcome
            }
        };
        if let Some(session) = self.sessions.get(&id) {
            self.result_bytes = self.result_bytes - held + session.result_bytes;
        }
        self.touch(id);
        while self.result_bytes > MAX_RESULT_BYTES && self.evict_one(id) {}
        Ok(outcome)
    }

    /// Applies the log's clock reading `unix_ms`: time never goes back (a
    /// new leader's clock may be behind the last one's), and every session
    /// idle for longer than its TTL expires.
    pub fn apply_time(&mut self, unix_ms: u64) {
        self.require_sessions();
        if unix_ms <= self.now_ms {
            return;
        }
        let first = self.now_ms == 0;
        self.now_ms = unix_ms;
        if first {
            // Sessions opened before the log had a clock were stamped 0:
            // their idle time counts from now.
            for s in self.sessions.values_mut() {
                s.last_used_ms = unix_ms;
            }
            self.recount();
        }
        while let Some(&(expires_at, id)) = self.by_expiry.first() {
            if expires_at >= self.now_ms {
                break;
            }
            self.remove_session(id);
            self.expired += 1;
        }
        self.expire_leases();
    }

    /// A leader's first entry: its clock reading, and from the first one on,
    /// revisions are counted.
    fn new_leader(&mut self, now_ms: u64) {
        self.revisions = true;
        // Every lease gets its full TTL again, from the new leader's
        // reading, before that reading can expire anything: the old
        // leader may have died long enough ago for its leases' ends to
        // have passed while nobody could keep them alive.
        let from = now_ms.max(self.now_ms);
        let renewals: Vec<(u64, u64)> = self
            .leases
            .iter()
            .map(|(&id, l)| (id, from.saturating_add(l.ttl_ms)))
            .collect();
        for (id, at) in renewals {
            self.renew(id, at);
        }
        if now_ms > 0 {
            self.apply_time(now_ms);
        }
    }

    /// The first open or time reading: from here on the log is written by
    /// session-aware leaders. The sessions of the rules before (with
    /// client-chosen ids) are dropped; see the module docs.
    fn require_sessions(&mut self) {
        if self.sessions_required {
            return;
        }
        self.sessions_required = true;
        self.sessions.clear();
        self.recount();
    }

    fn open(
        &mut self,
        slot: Slot,
        ttl_ms: u64,
        max_sessions: u64,
    ) -> Result<WriteOutcome, KvError> {
        let id = self.number_in_slot(slot).ok_or_else(|| {
            KvError::Unavailable(format!(
                "cannot number another session opened in log slot {slot}; open again"
            ))
        })?;
        let session = Session {
            // A raw client may send zeros; the proposing replica fills
            // these in, but the state machine must not trust that.
            ttl_ms: if ttl_ms == 0 {
                DEFAULT_SESSION_TTL_MS
            } else {
                ttl_ms
            },
            last_used_ms: self.now_ms,
            ..Session::default()
        };
        self.by_expiry.insert((session.expires_at(), id));
        self.sessions.insert(id, session);
        self.touch(id);
        let max = if max_sessions == 0 {
            DEFAULT_MAX_SESSIONS
        } else {
            max_sessions
        };
        while self.sessions.len() as u64 > max && self.evict_one(id) {}
        Ok(WriteOutcome {
            slot,
            result: OpResult::SessionOpened { session: id },
        })
    }

    /// Marks session `id` used now.
    fn touch(&mut self, id: u64) {
        let Some(s) = self.sessions.get_mut(&id) else {
            return;
        };
        self.uses += 1;
        self.by_use.remove(&(s.last_use, id));
        s.last_use = self.uses;
        self.by_use.insert((s.last_use, id));
        if s.last_used_ms != self.now_ms {
            self.by_expiry.remove(&(s.expires_at(), id));
            s.last_used_ms = self.now_ms;
            self.by_expiry.insert((s.expires_at(), id));
        }
    }

    /// Evicts the least recently used session other than `keep`; false if
    /// there is none.
    fn evict_one(&mut self, keep: u64) -> bool {
        let victim = self.by_use.iter().map(|&(_, id)| id).find(|&id| id != keep);
        match victim {
            Some(id) => {
                self.remove_session(id);
                self.evicted += 1;
                true
            }
            None => false,
        }
    }

    fn remove_session(&mut self, id: u64) {
        if let Some(s) = self.sessions.remove(&id) {
            self.by_expiry.remove(&(s.expires_at(), id));
            self.by_use.remove(&(s.last_use, id));
            self.result_bytes -= s.result_bytes;
        }
    }

    fn execute(&mut self, slot: Slot, op: &Op) -> OpResult {
        let rev = self.next_revision();
        let (result, changed) = match op {
            Op::Put { key, value } => {
                self.insert(key, value, rev, 0);
                (OpResult::Put, true)
            }
            Op::Delete { key } => {
                let existed = self.remove(key, rev);
                (OpResult::Deleted { existed }, existed)
            }
            Op::Cas { key, expected, new } => {
                let current = self.map.get(key).map(|e| &e.value);
                if current == expected.as_ref() {
                    self.insert(key, new, rev, 0);
                    let current = Some(new.clone());
                    (
                        OpResult::Cas {
                            swapped: true,
                            current,
                        },
                        true,
                    )
                } else {
                    let current = current.cloned();
                    (
                        OpResult::Cas {
                            swapped: false,
                            current,
                        },
                        false,
                    )
                }
            }
            Op::Txn(txn) => return OpResult::Txn(self.txn(txn)),
            Op::Incr { key, by } => {
                let (current, lease) = match self.map.get(key) {
                    None => (Some(0), 0),
                    Some(e) => (parse_integer(&e.value), e.lease),
                };
                match current.map(|c| c.checked_add(*by)) {
                    None => (OpResult::Incr(Err(IncrError::NotAnInteger)), false),
                    Some(None) => (OpResult::Incr(Err(IncrError::Overflow)), false),
                    Some(Some(n)) => {
                        self.insert(key, n.to_string().as_bytes(), rev, lease);
                        (OpResult::Incr(Ok(n)), true)
                    }
                }
            }
            Op::Lease(l) => return OpResult::Lease(self.lease_op(slot, l)),
            Op::Compact { revision } => {
                self.forget_history((*revision).min(self.revision));
                let compacted = self.compacted;
                return OpResult::Compacted { compacted };
            }
            // Handled by `apply` before it gets here.
            Op::OpenSession { .. } | Op::NewLeader { .. } => (OpResult::Stale, false),
            Op::Reconfigure { .. } => (
                OpResult::Reconfigured(
                    self.reconfigured
                        .take()
                        .unwrap_or_else(|| Err("not a configuration change".into())),
                ),
                false,
            ),
        };
        if changed && self.revisions {
            self.revision = rev;
        }
        result
    }

    /// Evaluates a transaction: every comparison against the map as it is,
    /// then one branch's writes, all at one revision.
    fn txn(&mut self, txn: &Txn) -> TxnResult {
        let succeeded = txn
            .compares
            .iter()
            .all(|c| c.holds(self.get_kv(&c.key).as_ref()));
        let ops = if succeeded {
            &txn.success
        } else {
            &txn.failure
        };
        let rev = self.next_revision();
        let mut changed = false;
        let results = ops
            .iter()
            .map(|op| match op {
                TxnOp::Put { key, value, lease } => {
                    self.insert(key, value, rev, *lease);
                    changed = true;
                    TxnOpResult::Put
                }
                TxnOp::Delete { key } => {
                    let existed = self.remove(key, rev);
                    changed |= existed;
                    TxnOpResult::Deleted { existed }
                }
            })
            .collect();
        if changed && self.revisions {
            self.revision = rev;
        }
        TxnResult {
            succeeded,
            revision: self.revision,
            results,
        }
    }

    /// The rules of the versions before sessions, exactly — flaws
    /// included: any id is a session, created on first use, and the
    /// oldest result beyond 4,096 is dropped without refusing its retry.
    /// The entries applied here were applied by these rules by the
    /// replicas that chose them; applying them otherwise would make a
    /// replica that starts from an older snapshot end elsewhere than one
    /// that starts from a newer.
    fn apply_legacy(&mut self, slot: Slot, req: &WriteRequest) -> WriteOutcome {
        let session = self.sessions.entry(req.client_id).or_default();
        if req.acked_below > session.acked_below {
            session.acked_below = req.acked_below;
            session.results = session.results.split_off(&req.acked_below);
        }
        if req.seq < session.acked_below {
            return WriteOutcome {
                slot,
                result: OpResult::Stale,
            };
        }
        if let Some(done) = session.results.get(&req.seq) {
            let done = done.clone();
            self.duplicates += 1;
            return done;
        }
        let outcome = WriteOutcome {
            slot,
            result: self.execute(slot, &req.op),
        };
        let session = self.sessions.entry(req.client_id).or_default();
        session.results.insert(req.seq, outcome.clone());
        if session.results.len() > LEGACY_MAX_RESULTS {
            session.results.pop_first();
        }
        outcome
    }
}

fn pair_len(key: &[u8], value: &[u8]) -> u64 {
    (key.len() + value.len()) as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    const TTL: u64 = 60_000;
    const T0: u64 = 1_700_000_000_000;

    fn req(client_id: u64, seq: u64, op: Op) -> WriteRequest {
        WriteRequest {
            client_id,
            seq,
            acked_below: 0,
            op,
        }
    }

    fn put(k: &str, v: &str) -> Op {
        Op::Put {
            key: k.into(),
            value: v.into(),
        }
    }

    fn open_with(sm: &mut StateMachine, slot: Slot, ttl_ms: u64, max_sessions: u64) -> u64 {
        let opened = sm.apply(
            slot,
            &req(
                0,
                0,
                Op::OpenSession {
                    ttl_ms,
                    max_sessions,
                },
            ),
        );
        match opened {
            Ok(WriteOutcome {
                result: OpResult::SessionOpened { session },
                ..
            }) => session,
            other => panic!("an open was answered {other:?}"),
        }
    }

    fn open(sm: &mut StateMachine, slot: Slot) -> u64 {
        open_with(sm, slot, TTL, 0)
    }

    /// Applies a write that must succeed.
    fn ok(sm: &mut StateMachine, slot: Slot, r: WriteRequest) -> WriteOutcome {
        sm.apply(slot, &r)
            .unwrap_or_else(|e| panic!("{r:?} refused: {e}"))
    }

    fn new_leader(sm: &mut StateMachine, slot: Slot) {
        let r = sm.apply(slot, &req(0, 7, Op::NewLeader { now_ms: 0 }));
        assert_eq!(r.map(|o| o.result), Ok(OpResult::NewLeader));
    }

    fn meta(sm: &StateMachine, key: &str) -> (u64, u64, u64) {
        let kv = sm.get_kv(key.as_bytes()).expect("present");
        (kv.create_revision, kv.mod_revision, kv.version)
    }

    fn txn(compares: Vec<kv_api::Compare>, success: Vec<TxnOp>, failure: Vec<TxnOp>) -> Op {
        Op::Txn(Txn {
            compares,
            success,
            failure,
        })
    }

    fn tput(k: &str, v: &str) -> TxnOp {
        TxnOp::Put {
            key: k.into(),
            value: v.into(),
            lease: 0,
        }
    }

    fn cmp(k: &str, op: kv_api::CmpOp, target: kv_api::Target) -> kv_api::Compare {
        kv_api::Compare {
            key: k.into(),
            op,
            target,
        }
    }

    #[test]
    fn incr_adds_in_place_keeps_the_lease_and_counts_a_retry_once() {
        let mut sm = StateMachine::default();
        let s = open(&mut sm, 1);
        let incr = |by| Op::Incr {
            key: b"n".to_vec(),
            by,
        };
        assert_eq!(
            ok(&mut sm, 2, req(s, 1, incr(5))).result,
            OpResult::Incr(Ok(5))
        );
        // The same (session, seq) again: the first result, not 10.
        assert_eq!(
            ok(&mut sm, 3, req(s, 1, incr(5))).result,
            OpResult::Incr(Ok(5))
        );
        assert_eq!(
            ok(&mut sm, 4, req(s, 2, incr(-7))).result,
            OpResult::Incr(Ok(-2))
        );
        assert_eq!(sm.get_kv(b"n").unwrap().value, b"-2");
        ok(&mut sm, 5, req(s, 3, put("t", "x1")));
        let t = |by| Op::Incr {
            key: b"t".to_vec(),
            by,
        };
        assert_eq!(
            ok(&mut sm, 6, req(s, 4, t(1))).result,
            OpResult::Incr(Err(IncrError::NotAnInteger))
        );
        ok(&mut sm, 7, req(s, 5, put("t", &i64::MAX.to_string())));
        assert_eq!(
            ok(&mut sm, 8, req(s, 6, t(1))).result,
            OpResult::Incr(Err(IncrError::Overflow))
        );
        for bad in ["", "01", "+1", " 1", "-0", "1.0", "99999999999999999999"] {
            assert_eq!(parse_integer(bad.as_bytes()), None, "{bad:?}");
        }
    }

    #[test]
    fn writes_take_revisions_in_log_order_from_the_first_new_leader_entry() {
        let mut sm = StateMachine::default();
        let s = open(&mut sm, 1);
        ok(&mut sm, 2, req(s, 1, put("early", "x")));
        assert_eq!(meta(&sm, "early"), (0, 0, 1), "before any leader entry");
        ok(&mut sm, 2, req(s, 2, put("early", "y")));
        assert_eq!(
            meta(&sm, "early"),
            (0, 0, 1),
            "versions are not counted yet"
        );
        new_leader(&mut sm, 3);
        assert!(sm.revisions_counted());
        assert_eq!(sm.revision(), 0);
        ok(&mut sm, 4, req(s, 3, put("a", "1")));
        ok(&mut sm, 4, req(s, 4, put("b", "1")));
        assert_eq!(meta(&sm, "a"), (1, 1, 1));
        assert_eq!(meta(&sm, "b"), (2, 2, 1));
        ok(&mut sm, 5, req(s, 5, put("a", "2")));
        assert_eq!(meta(&sm, "a"), (1, 3, 2));
        ok(&mut sm, 5, req(s, 6, put("early", "z")));
        assert_eq!(meta(&sm, "early"), (0, 4, 2));
        // A delete of an absent key and a failed swap change nothing and
        // take no revision; a retry takes none either.
        ok(&mut sm, 6, req(s, 7, Op::Delete { key: "nope".into() }));
        let failed = Op::Cas {
            key: "a".into(),
            expected: Some("0".into()),
            new: "9".into(),
        };
        ok(&mut sm, 6, req(s, 8, failed));
        ok(&mut sm, 6, req(s, 6, put("early", "z")));
        assert_eq!(sm.revision(), 4);
        ok(&mut sm, 7, req(s, 9, Op::Delete { key: "a".into() }));
        assert_eq!(sm.revision(), 5);
        ok(&mut sm, 8, req(s, 10, put("a", "new")));
        assert_eq!(meta(&sm, "a"), (6, 6, 1), "created again");
        // Another leader entry does not restart the count.
        new_leader(&mut sm, 9);
        assert_eq!(sm.revision(), 6);
    }

    #[test]
    fn replicas_from_different_old_snapshots_agree_on_every_key() {
        // Two replicas of a version before revisions, one snapshotted
        // before slot 3, the other after: each loads its snapshot (an
        // old-format body) and applies the rest of the same log.
        let log: Vec<(Slot, WriteRequest)> = vec![
            (3, req(1 << OPEN_BITS, 1, put("k", "a"))),
            (4, req(1 << OPEN_BITS, 2, put("k", "b"))),
            (5, req(0, 9, Op::NewLeader { now_ms: T0 })),
            (6, req(1 << OPEN_BITS, 3, put("k", "c"))),
            (6, req(1 << OPEN_BITS, 4, put("j", "c"))),
        ];
        let mut base = StateMachine::default();
        open(&mut base, 1);
        ok(&mut base, 2, req(1 << OPEN_BITS, 0, put("old", "v")));
        let old_format = |sm: &StateMachine| {
            StateMachine::from(V2StateMachine {
                map: sm
                    .map
                    .iter()
                    .map(|(k, e)| (k.clone(), e.value.clone()))
                    .collect(),
                sessions: sm.sessions.clone(),
                applied: sm.applied,
                now_ms: sm.now_ms,
                sessions_required: sm.sessions_required,
                uses: sm.uses,
                opens_in_slot: sm.opens_in_slot,
                expired: sm.expired,
                evicted: sm.evicted,
            })
        };
        let mut early = old_format(&base);
        let mut later_base = base.clone();
        for (slot, r) in &log[..2] {
            later_base.apply(*slot, r).unwrap();
        }
        let mut later = old_format(&later_base);
        for (slot, r) in &log {
            early.apply(*slot, r).unwrap();
        }
        for (slot, r) in &log[2..] {
            later.apply(*slot, r).unwrap();
        }
        for key in ["old", "k", "j"] {
            assert_eq!(
                early.get_kv(key.as_bytes()),
                later.get_kv(key.as_bytes()),
                "{key}"
            );
        }
        assert_eq!(meta(&early, "k"), (0, 1, 2));
        assert_eq!(early.revision(), later.revision());
    }

    #[test]
    fn a_txn_applies_one_branch_atomically_at_one_revision() {
        use kv_api::{CmpOp, Target};
        let mut sm = StateMachine::default();
        new_leader(&mut sm, 1);
        let s = open(&mut sm, 1);
        ok(&mut sm, 2, req(s, 1, put("a", "10")));
        ok(&mut sm, 2, req(s, 2, put("b", "0")));
        let (_, a_rev, _) = meta(&sm, "a");
        let transfer = txn(
            vec![
                cmp("a", CmpOp::Equal, Target::ModRevision(a_rev)),
                cmp("b", CmpOp::Equal, Target::Value("0".into())),
                cmp("c", CmpOp::Equal, Target::Exists(false)),
            ],
            vec![
                tput("a", "5"),
                tput("b", "5"),
                TxnOp::Delete { key: "z".into() },
            ],
            vec![tput("failed", "1")],
        );
        let r = ok(&mut sm, 3, req(s, 3, transfer.clone()));
        let OpResult::Txn(t) = r.result else {
            panic!("{r:?}")
        };
        assert!(t.succeeded);
        assert_eq!(t.revision, 3);
        assert_eq!(
            t.results,
            [
                TxnOpResult::Put,
                TxnOpResult::Put,
                TxnOpResult::Deleted { existed: false }
            ]
        );
        assert_eq!(meta(&sm, "a"), (1, 3, 2));
        assert_eq!(meta(&sm, "b"), (2, 3, 2));
        // The same comparisons no longer hold: the other branch runs.
        let r = ok(&mut sm, 4, req(s, 4, transfer.clone()));
        assert!(matches!(
            r.result,
            OpResult::Txn(TxnResult {
                succeeded: false,
                revision: 4,
                ..
            })
        ));
        assert_eq!(sm.get(b"a").unwrap(), b"5");
        assert_eq!(sm.get(b"failed").unwrap(), b"1");
        // A retry of the first is answered from the session, not run again.
        let again = ok(&mut sm, 5, req(s, 3, transfer));
        assert!(matches!(
            again.result,
            OpResult::Txn(TxnResult {
                succeeded: true,
                revision: 3,
                ..
            })
        ));
        assert_eq!(sm.revision(), 4);
        // A branch that changes nothing takes no revision.
        let noop = txn(vec![], vec![TxnOp::Delete { key: "zz".into() }], vec![]);
        let r = ok(&mut sm, 6, req(s, 5, noop));
        assert!(matches!(
            r.result,
            OpResult::Txn(TxnResult { revision: 4, .. })
        ));
    }

    fn grant(sm: &mut StateMachine, slot: Slot, s: u64, seq: u64, ttl_ms: u64, now_ms: u64) -> u64 {
        let r = ok(
            sm,
            slot,
            req(s, seq, Op::Lease(LeaseOp::Grant { ttl_ms, now_ms })),
        );
        match r.result {
            OpResult::Lease(l) if l.id != 0 => l.id,
            other => panic!("{other:?}"),
        }
    }

    fn lease_put(k: &str, lease: u64) -> Op {
        txn(
            vec![],
            vec![TxnOp::Put {
                key: k.into(),
                value: "v".into(),
                lease,
            }],
            vec![],
        )
    }

    #[test]
    fn keys_of_a_lease_go_when_the_log_clock_passes_its_end_not_before() {
        let mut sm = StateMachine::default();
        sm.apply(1, &req(0, 1, Op::NewLeader { now_ms: T0 }))
            .unwrap();
        let s = open(&mut sm, 1);
        let lease = grant(&mut sm, 2, s, 1, 5_000, T0);
        assert_ne!(lease, s, "numbered apart from sessions");
        ok(&mut sm, 3, req(s, 2, lease_put("a", lease)));
        ok(&mut sm, 3, req(s, 3, lease_put("b", lease)));
        ok(&mut sm, 3, req(s, 4, put("c", "plain")));
        // Overwritten without the lease: no longer attached.
        ok(&mut sm, 4, req(s, 5, put("b", "kept")));
        assert_eq!(sm.get_kv(b"a").unwrap().lease, lease);
        sm.apply_time(T0 + 5_000);
        assert!(sm.get(b"a").is_some(), "not before the TTL");
        let rev = sm.revision();
        sm.apply_time(T0 + 5_001);
        assert!(sm.get(b"a").is_none(), "gone after it");
        assert_eq!(sm.get(b"b").unwrap(), b"kept");
        assert!(sm.get(b"c").is_some());
        assert_eq!(sm.revision(), rev + 1, "one revision for the expiry");
        assert_eq!(sm.lease_count(), 0);
        // A write to the expired lease is refused and does nothing.
        let e = sm.apply(5, &req(s, 6, lease_put("d", lease))).unwrap_err();
        assert!(matches!(e, KvError::InvalidArgument(ref m) if m.contains("does not exist")));
        assert!(sm.get(b"d").is_none());
    }

    #[test]
    fn keepalive_restarts_the_ttl_and_revoke_deletes_at_once() {
        let mut sm = StateMachine::default();
        sm.apply(1, &req(0, 1, Op::NewLeader { now_ms: T0 }))
            .unwrap();
        let s = open(&mut sm, 1);
        let lease = grant(&mut sm, 2, s, 1, 2_000, T0);
        ok(&mut sm, 3, req(s, 2, lease_put("a", lease)));
        sm.apply_time(T0 + 1_500);
        let keep = Op::Lease(LeaseOp::KeepAlive {
            id: lease,
            now_ms: T0 + 1_600,
        });
        let r = ok(&mut sm, 4, req(s, 3, keep));
        assert!(matches!(
            r.result,
            OpResult::Lease(LeaseResult { ttl_ms: 2_000, .. })
        ));
        sm.apply_time(T0 + 3_000);
        assert!(sm.get(b"a").is_some(), "kept alive until T0 + 3,600");
        sm.apply_time(T0 + 3_601);
        assert!(sm.get(b"a").is_none());
        let gone = ok(
            &mut sm,
            5,
            req(
                s,
                4,
                Op::Lease(LeaseOp::KeepAlive {
                    id: lease,
                    now_ms: 0,
                }),
            ),
        );
        assert!(matches!(
            gone.result,
            OpResult::Lease(LeaseResult { ttl_ms: 0, .. })
        ));
        let other = grant(&mut sm, 6, s, 5, 60_000, T0 + 4_000);
        ok(&mut sm, 7, req(s, 6, lease_put("x", other)));
        ok(&mut sm, 7, req(s, 7, lease_put("y", other)));
        let r = ok(
            &mut sm,
            8,
            req(s, 8, Op::Lease(LeaseOp::Revoke { id: other })),
        );
        assert!(matches!(
            r.result,
            OpResult::Lease(LeaseResult { deleted: 2, .. })
        ));
        assert!(sm.is_empty());
    }

    #[test]
    fn a_new_leader_gives_every_lease_its_full_ttl_again() {
        let mut sm = StateMachine::default();
        sm.apply(1, &req(0, 1, Op::NewLeader { now_ms: T0 }))
            .unwrap();
        let s = open(&mut sm, 1);
        let lease = grant(&mut sm, 2, s, 1, 3_000, T0);
        ok(&mut sm, 3, req(s, 2, lease_put("a", lease)));
        sm.apply_time(T0 + 1_000);
        // The leader dies; the next one is elected 5 s later, long past the
        // lease's end by the old count.
        sm.apply(4, &req(0, 2, Op::NewLeader { now_ms: T0 + 6_000 }))
            .unwrap();
        assert!(
            sm.get(b"a").is_some(),
            "not expired by the new leader's reading"
        );
        sm.apply_time(T0 + 9_000);
        assert!(sm.get(b"a").is_some());
        sm.apply_time(T0 + 9_001);
        assert!(sm.get(b"a").is_none());
    }

    #[test]
    fn leases_survive_a_snapshot_and_expire_the_same_after_it() {
        let mut sm = StateMachine::default();
        sm.apply(1, &req(0, 1, Op::NewLeader { now_ms: T0 }))
            .unwrap();
        let s = open(&mut sm, 1);
        let lease = grant(&mut sm, 2, s, 1, 2_000, T0);
        ok(&mut sm, 3, req(s, 2, lease_put("a", lease)));
        let mut copy: StateMachine =
            bincode::deserialize(&bincode::serialize(&sm).unwrap()).unwrap();
        copy.recount();
        for m in [&mut sm, &mut copy] {
            m.apply_time(T0 + 2_001);
            assert!(m.get(b"a").is_none());
        }
        assert_eq!(sm.revision(), copy.revision());
    }

    fn events(
        sm: &StateMachine,
        req: &WatchRequest,
    ) -> (Vec<(EventKind, String, u64)>, WatchResponse) {
        let resp = sm.watch(req).unwrap();
        let ev = resp
            .events
            .iter()
            .map(|e| {
                (
                    e.kind,
                    String::from_utf8(e.kv.key.clone()).unwrap(),
                    e.kv.mod_revision,
                )
            })
            .collect();
        (ev, resp)
    }

    #[test]
    fn a_watch_sees_every_change_of_its_range_once_in_order_page_by_page() {
        use EventKind::{Delete, Put};
        let mut sm = StateMachine::default();
        new_leader(&mut sm, 1);
        let s = open(&mut sm, 1);
        ok(&mut sm, 2, req(s, 1, put("p/a", "1")));
        ok(&mut sm, 2, req(s, 2, put("q", "1")));
        let both = txn(vec![], vec![tput("p/b", "1"), tput("p/c", "1")], vec![]);
        ok(&mut sm, 3, req(s, 3, both));
        ok(&mut sm, 4, req(s, 4, Op::Delete { key: "p/a".into() }));
        let mut w = WatchRequest::prefix("p/", 1);
        w.prev_kv = true;
        let (all, resp) = events(&sm, &w);
        assert_eq!(
            all,
            [
                (Put, "p/a".into(), 1),
                (Put, "p/b".into(), 3),
                (Put, "p/c".into(), 3),
                (Delete, "p/a".into(), 4)
            ]
        );
        assert_eq!(resp.events[3].prev.as_ref().unwrap().value, b"1");
        assert_eq!((resp.next_revision, resp.next_skip), (5, 0));
        // One event an answer: the cursor goes through revision 3's two.
        w.limit = 1;
        let mut seen = Vec::new();
        for _ in 0..10 {
            let (ev, resp) = events(&sm, &w);
            seen.extend(ev);
            (w.from_revision, w.skip) = (resp.next_revision, resp.next_skip);
            if w.from_revision == 5 {
                break;
            }
        }
        assert_eq!(seen, all);
        let (none, resp) = events(&sm, &w);
        assert!(none.is_empty());
        assert_eq!((resp.next_revision, resp.revision), (5, 4));
        assert!(!sm.watch_ready(&w));
        ok(&mut sm, 5, req(s, 5, put("p/z", "1")));
        assert!(sm.watch_ready(&w));
        assert_eq!(events(&sm, &w).0, [(Put, "p/z".to_string(), 5)]);
    }

    #[test]
    fn the_history_is_bounded_and_compaction_refuses_older_revisions() {
        let mut sm = StateMachine::default();
        new_leader(&mut sm, 1);
        let s = open(&mut sm, 1);
        for i in 0..(MAX_HISTORY_CHANGES as u64 + 10) {
            ok(&mut sm, 2 + i, req(s, i + 1, put("k", &i.to_string())));
        }
        assert_eq!(sm.compacted(), 10);
        assert_eq!(
            sm.watch(&WatchRequest::key("k", 10)),
            Err(KvError::Compacted(10))
        );
        assert_eq!(
            sm.watch(&WatchRequest::key("k", 11)).unwrap().events.len(),
            50
        );
        let r = ok(&mut sm, 100, req(s, 100, Op::Compact { revision: 40 }));
        assert_eq!(r.result, OpResult::Compacted { compacted: 40 });
        assert_eq!(
            sm.watch(&WatchRequest::key("k", 11)),
            Err(KvError::Compacted(40))
        );
        let old = RangeRequest {
            revision: 39,
            ..RangeRequest::key("k")
        };
        assert_eq!(
            sm.range(&old, &Limits::default()),
            Err(KvError::Compacted(40))
        );
        // A compaction beyond the store's revision stops at it.
        let r = ok(
            &mut sm,
            101,
            req(s, 101, Op::Compact { revision: u64::MAX }),
        );
        assert_eq!(r.result, OpResult::Compacted { compacted: 60 });
    }

    #[test]
    fn a_range_at_a_revision_shows_the_keys_as_they_were() {
        let mut sm = StateMachine::default();
        new_leader(&mut sm, 1);
        let s = open(&mut sm, 1);
        ok(&mut sm, 2, req(s, 1, put("a", "1")));
        ok(&mut sm, 2, req(s, 2, put("b", "1")));
        let at2 = sm.revision();
        ok(&mut sm, 3, req(s, 3, put("a", "2")));
        ok(&mut sm, 3, req(s, 4, Op::Delete { key: "b".into() }));
        ok(&mut sm, 3, req(s, 5, put("c", "1")));
        let l = Limits::default();
        let at = |rev: u64| {
            let r = sm
                .range(
                    &RangeRequest {
                        revision: rev,
                        ..RangeRequest::between("", "")
                    },
                    &l,
                )
                .unwrap();
            r.kvs
                .iter()
                .map(|kv| {
                    format!(
                        "{}={}@{}",
                        String::from_utf8_lossy(&kv.key),
                        String::from_utf8_lossy(&kv.value),
                        kv.mod_revision
                    )
                })
                .collect::<Vec<_>>()
        };
        assert_eq!(at(at2), ["a=1@1", "b=1@2"]);
        assert_eq!(at(1), ["a=1@1"]);
        assert_eq!(at(0), ["a=2@3", "c=1@5"]);
        assert_eq!(at(4), ["a=2@3"]);
        let ahead = RangeRequest {
            revision: 99,
            ..RangeRequest::between("", "")
        };
        assert!(matches!(sm.range(&ahead, &l), Err(KvError::Unavailable(_))));
        // Paged at a revision: the token resumes in the same view.
        let mut page = RangeRequest {
            revision: at2,
            limit: 1,
            ..RangeRequest::between("", "")
        };
        let first = sm.range(&page, &l).unwrap();
        page.token = first.token;
        let second = sm.range(&page, &l).unwrap();
        assert_eq!(second.kvs[0].key, b"b");
        assert!(!second.more);
    }

    #[test]
    fn ranges_are_ordered_bounded_and_resumable() {
        let mut sm = StateMachine::default();
        new_leader(&mut sm, 1);
        let s = open(&mut sm, 1);
        for (i, k) in ["b", "a", "c/2", "c/1", "c/10", "d"].iter().enumerate() {
            ok(&mut sm, 2, req(s, i as u64 + 1, put(k, k)));
        }
        let l = Limits::default();
        let keys = |r: &RangeResponse| -> Vec<String> {
            r.kvs
                .iter()
                .map(|kv| String::from_utf8(kv.key.clone()).unwrap())
                .collect()
        };
        let all = sm.range(&RangeRequest::between("", ""), &l).unwrap();
        assert_eq!(keys(&all), ["a", "b", "c/1", "c/10", "c/2", "d"]);
        assert!(!all.more);
        assert_eq!(all.revision, 6);
        let prefix = sm.range(&RangeRequest::prefix("c/"), &l).unwrap();
        assert_eq!(keys(&prefix), ["c/1", "c/10", "c/2"]);
        assert_eq!(prefix.kvs[0].value, b"c/1");
        assert_eq!(prefix.kvs[0].mod_revision, 4);
        let mut page = RangeRequest {
            limit: 2,
            ..RangeRequest::between("a", "d")
        };
        let mut seen = Vec::new();
        loop {
            let r = sm.range(&page, &l).unwrap();
            seen.extend(keys(&r));
            if !r.more {
                break;
            }
            page.token = r.token;
        }
        assert_eq!(seen, ["a", "b", "c/1", "c/10", "c/2"]);
        let count = RangeRequest {
            count_only: true,
            ..RangeRequest::prefix("c/")
        };
        let r = sm.range(&count, &l).unwrap();
        assert_eq!((r.count, r.kvs.len()), (3, 0));
        let keys_only = RangeRequest {
            keys_only: true,
            ..RangeRequest::prefix("c/")
        };
        assert!(sm
            .range(&keys_only, &l)
            .unwrap()
            .kvs
            .iter()
            .all(|kv| kv.value.is_empty()));
        let single = sm.range(&RangeRequest::key("b"), &l).unwrap();
        assert_eq!(keys(&single), ["b"]);
        let bogus = RangeRequest {
            token: Some(b"not a token".to_vec()),
            ..RangeRequest::between("a", "d")
        };
        assert!(matches!(
            sm.range(&bogus, &l),
            Err(KvError::InvalidArgument(_))
        ));
        let backwards = RangeRequest::between("d", "a");
        assert!(matches!(
            sm.range(&backwards, &l),
            Err(KvError::InvalidArgument(_))
        ));
    }

    #[test]
    fn a_range_answer_is_bounded_in_bytes_but_holds_at_least_one_key() {
        let mut sm = StateMachine::default();
        let s = open(&mut sm, 1);
        let big = "v".repeat(700 << 10);
        for (i, k) in ["a", "b", "c"].iter().enumerate() {
            ok(&mut sm, 2, req(s, i as u64 + 1, put(k, &big)));
        }
        let l = Limits::default();
        let mut r = RangeRequest::between("", "");
        let mut pages = 0;
        loop {
            let a = sm.range(&r, &l).unwrap();
            assert_eq!(a.kvs.len(), 1, "one 700 KiB value an answer");
            pages += 1;
            if !a.more {
                break;
            }
            r.token = a.token;
        }
        assert_eq!(pages, 3);
    }

    #[test]
    fn a_retried_write_applies_once() {
        let mut sm = StateMachine::default();
        let (a, b) = (open(&mut sm, 1), open(&mut sm, 1));
        let first = ok(&mut sm, 2, req(a, 1, put("k", "a")));
        ok(&mut sm, 3, req(b, 1, put("k", "b")));
        assert_eq!(sm.duplicates(), 0);
        let retry = ok(&mut sm, 4, req(a, 1, put("k", "a")));
        assert_eq!(retry, first, "the retry gets the first result");
        assert_eq!(sm.duplicates(), 1, "and is counted as a duplicate");
        assert_eq!(
            sm.get(b"k").unwrap(),
            b"b",
            "and does not overwrite the newer write"
        );
    }

    #[test]
    fn cas_swaps_only_on_match() {
        let mut sm = StateMachine::default();
        let s = open(&mut sm, 1);
        let absent = Op::Cas {
            key: "k".into(),
            expected: None,
            new: "1".into(),
        };
        let r = ok(&mut sm, 2, req(s, 1, absent.clone()));
        assert_eq!(
            r.result,
            OpResult::Cas {
                swapped: true,
                current: Some(b"1".to_vec())
            }
        );
        let r = ok(&mut sm, 3, req(s, 2, absent));
        assert_eq!(
            r.result,
            OpResult::Cas {
                swapped: false,
                current: Some(b"1".to_vec())
            }
        );
    }

    #[test]
    fn data_bytes_follow_puts_deletes_and_swaps() {
        let mut sm = StateMachine::default();
        let s = open(&mut sm, 1);
        ok(&mut sm, 2, req(s, 1, put("k", "abc")));
        ok(&mut sm, 2, req(s, 2, put("kk", "x")));
        assert_eq!(sm.data_bytes(), 4 + 3);
        ok(&mut sm, 3, req(s, 3, put("k", "a")));
        assert_eq!(sm.data_bytes(), 2 + 3);
        let cas = Op::Cas {
            key: "kk".into(),
            expected: Some("x".into()),
            new: "xyz".into(),
        };
        ok(&mut sm, 4, req(s, 4, cas));
        assert_eq!(sm.data_bytes(), 2 + 5);
        ok(&mut sm, 5, req(s, 5, Op::Delete { key: "k".into() }));
        ok(&mut sm, 6, req(s, 6, Op::Delete { key: "k".into() }));
        assert_eq!(sm.data_bytes(), 5);
        let mut copy: StateMachine =
            bincode::deserialize(&bincode::serialize(&sm).unwrap()).unwrap();
        assert_eq!(copy.data_bytes(), 0, "not serialized");
        copy.recount();
        assert_eq!(copy.data_bytes(), 5);
    }

    #[test]
    fn acknowledged_results_are_forgotten() {
        let mut sm = StateMachine::default();
        let s = open(&mut sm, 1);
        ok(&mut sm, 2, req(s, 1, put("k", "a")));
        let mut r = req(s, 2, put("k", "b"));
        r.acked_below = 2;
        ok(&mut sm, 3, r);
        assert!(sm.cached(s, 1).is_none());
        assert_eq!(
            ok(&mut sm, 4, req(s, 1, put("k", "a"))).result,
            OpResult::Stale
        );
        assert_eq!(sm.get(b"k").unwrap(), b"b");
    }

    #[test]
    fn a_result_dropped_for_space_answers_its_retry_as_stale_and_is_not_applied_again() {
        let mut sm = StateMachine::default();
        let (s, other) = (open(&mut sm, 1), open(&mut sm, 1));
        ok(&mut sm, 2, req(s, 1, put("k", "first")));
        // The client never acknowledges: its session fills up and the
        // oldest result (seq 1) is dropped to make room.
        let last = MAX_RESULTS_PER_SESSION as u64 + 1;
        for seq in 2..=last {
            ok(&mut sm, seq + 1, req(s, seq, put("other", "x")));
        }
        assert!(sm.cached(s, 1).is_none(), "seq 1's result was dropped");
        ok(&mut sm, last + 2, req(other, 1, put("k", "newer")));
        let late = ok(&mut sm, last + 3, req(s, 1, put("k", "first")));
        assert_eq!(late.result, OpResult::Stale);
        assert_eq!(
            sm.get(b"k").unwrap(),
            b"newer",
            "the late retry of seq 1 was applied a second time"
        );
    }

    #[test]
    fn cached_results_are_bounded_by_bytes_and_a_forgotten_one_is_stale() {
        let mut sm = StateMachine::default();
        let (writer, s) = (open(&mut sm, 1), open(&mut sm, 1));
        let big = vec![b'v'; 1 << 20];
        let put_big = Op::Put {
            key: "k".into(),
            value: big.clone(),
        };
        ok(&mut sm, 2, req(writer, 1, put_big));
        // Failed swaps each cache the current value (1 MiB); the client
        // acknowledges none of them.
        let failed_cas = Op::Cas {
            key: "k".into(),
            expected: Some("nope".into()),
            new: "x".into(),
        };
        let n = 2 + MAX_RESULT_BYTES_PER_SESSION / big.len() as u64;
        for seq in 2..=n {
            let r = ok(&mut sm, seq + 1, req(s, seq, failed_cas.clone()));
            assert!(matches!(r.result, OpResult::Cas { swapped: false, .. }));
        }
        assert!(sm.cached(s, 2).is_none(), "the oldest result was dropped");
        assert!(sm.cached(s, n).is_some(), "the newest is kept");
        assert!(sm.result_bytes <= MAX_RESULT_BYTES_PER_SESSION + (2 << 20));
        assert_eq!(
            ok(&mut sm, n + 2, req(s, 2, failed_cas)).result,
            OpResult::Stale
        );
    }

    #[test]
    fn the_results_of_all_sessions_together_are_bounded_by_evicting_the_least_recent() {
        let mut sm = StateMachine::default();
        let writer = open(&mut sm, 1);
        let big = vec![b'v'; 1 << 20];
        let put_big = Op::Put {
            key: "k".into(),
            value: big.clone(),
        };
        ok(&mut sm, 2, req(writer, 1, put_big));
        let failed_cas = Op::Cas {
            key: "k".into(),
            expected: None,
            new: "x".into(),
        };
        // One-shot clients: each opens a session and does one failed swap
        // (1 MiB cached), then goes away without acknowledging.
        let n = MAX_RESULT_BYTES / big.len() as u64 + 8;
        let mut ids = Vec::new();
        for i in 0..n {
            let s = open(&mut sm, 3 + 2 * i);
            ok(&mut sm, 4 + 2 * i, req(s, 1, failed_cas.clone()));
            ids.push(s);
            assert!(sm.result_bytes <= MAX_RESULT_BYTES, "{}", sm.result_bytes);
        }
        assert!(
            !sm.sessions.contains_key(&ids[0]),
            "the least recently used went first"
        );
        assert!(sm.sessions.contains_key(ids.last().unwrap()));
        assert!(sm.sessions_dropped().1 >= 8);
    }

    #[test]
    fn writes_of_a_session_never_opened_are_refused_and_not_applied() {
        let mut sm = StateMachine::default();
        let s = open(&mut sm, 1);
        for made_up in [0, 7, s + 1, u64::MAX] {
            let r = sm.apply(2, &req(made_up, 1, put("k", "v")));
            assert_eq!(r, Err(KvError::UnknownSession(made_up)));
        }
        assert!(sm.get(b"k").is_none(), "nothing was applied");
        assert_eq!(sm.session_count(), 1, "and no session was made up");
        ok(&mut sm, 3, req(s, 1, put("k", "v")));
        assert_eq!(sm.get(b"k").unwrap(), b"v");
    }

    #[test]
    fn a_restarted_client_gets_a_new_session_and_its_writes_are_applied() {
        let mut sm = StateMachine::default();
        let before = open(&mut sm, 1);
        ok(&mut sm, 2, req(before, 1, put("a", "1")));
        // The process restarts and opens again; its numbers start at 1.
        let after = open(&mut sm, 3);
        assert_ne!(after, before);
        let r = ok(&mut sm, 4, req(after, 1, put("b", "2")));
        assert_eq!(r.result, OpResult::Put);
        assert_eq!(r.slot, 4, "applied now, not answered from a cache");
        assert_eq!(sm.get(b"b").unwrap(), b"2");
    }

    #[test]
    fn session_ids_are_unique_nonzero_and_come_from_the_log_position() {
        let mut sm = StateMachine::default();
        let mut seen = BTreeSet::new();
        for slot in [1, 1, 1, 2, 5, 5] {
            let id = open(&mut sm, slot);
            assert_ne!(id, 0);
            assert_eq!(id >> OPEN_BITS, slot);
            assert!(seen.insert(id), "{id} given twice");
        }
        // Another replica applying the same log assigns the same ids.
        let mut other = StateMachine::default();
        let again: BTreeSet<u64> = [1, 1, 1, 2, 5, 5]
            .into_iter()
            .map(|slot| open(&mut other, slot))
            .collect();
        assert_eq!(again, seen);
    }

    #[test]
    fn a_session_idle_for_longer_than_its_ttl_expires_as_the_log_time_passes() {
        let mut sm = StateMachine::default();
        sm.apply_time(T0);
        let idle = open_with(&mut sm, 2, 1_000, 0);
        let busy = open_with(&mut sm, 2, 1_000, 0);
        sm.apply_time(T0 + 600);
        ok(&mut sm, 3, req(busy, 1, put("k", "1")));
        sm.apply_time(T0 + 1_000);
        assert_eq!(sm.session_count(), 2, "idle for exactly the TTL: kept");
        sm.apply_time(T0 + 1_001);
        assert_eq!(sm.session_count(), 1);
        assert_eq!(
            sm.apply(4, &req(idle, 1, put("k", "2"))),
            Err(KvError::UnknownSession(idle))
        );
        assert_eq!(sm.get(b"k").unwrap(), b"1", "the refused write did nothing");
        // The busy one was last used at T0 + 600.
        sm.apply_time(T0 + 1_600);
        assert_eq!(sm.session_count(), 1);
        sm.apply_time(T0 + 1_601);
        assert_eq!(sm.session_count(), 0);
        assert_eq!(sm.sessions_dropped(), (2, 0));
    }

    #[test]
    fn the_log_time_never_goes_back() {
        let mut sm = StateMachine::default();
        sm.apply_time(T0);
        let s = open_with(&mut sm, 2, 1_000, 0);
        // A new leader with a clock 10 s behind.
        sm.apply_time(T0 - 10_000);
        assert_eq!(sm.log_time_ms(), T0);
        ok(&mut sm, 3, req(s, 1, put("k", "1")));
        sm.apply_time(T0 - 9_000);
        assert_eq!(sm.session_count(), 1);
        sm.apply_time(T0 + 1_001);
        assert_eq!(sm.session_count(), 0, "idle since T0, by the log's clock");
    }

    #[test]
    fn sessions_opened_before_the_first_time_reading_count_idleness_from_it() {
        let mut sm = StateMachine::default();
        let s = open_with(&mut sm, 1, 1_000, 0);
        sm.apply_time(T0);
        assert_eq!(sm.session_count(), 1, "not idle since 1970");
        sm.apply_time(T0 + 1_001);
        assert_eq!(sm.session_count(), 0);
        assert!(sm.cached(s, 1).is_none());
    }

    #[test]
    fn opening_beyond_the_cap_evicts_the_least_recently_used() {
        let mut sm = StateMachine::default();
        sm.apply_time(T0);
        let a = open_with(&mut sm, 2, TTL, 3);
        let b = open_with(&mut sm, 3, TTL, 3);
        let c = open_with(&mut sm, 4, TTL, 3);
        ok(&mut sm, 5, req(a, 1, put("k", "a")));
        // All within the same millisecond of the log: recency is counted
        // in writes, not time.
        let d = open_with(&mut sm, 6, TTL, 3);
        assert_eq!(sm.session_count(), 3);
        assert!(!sm.sessions.contains_key(&b), "b was the least recent");
        for s in [a, c, d] {
            assert!(sm.sessions.contains_key(&s));
        }
        assert_eq!(
            sm.apply(7, &req(b, 1, put("k", "b"))),
            Err(KvError::UnknownSession(b))
        );
        // A loop of opens never holds more than the cap.
        for slot in 8..200 {
            open_with(&mut sm, slot, TTL, 3);
            assert_eq!(sm.session_count(), 3);
        }
        assert_eq!(sm.sessions_dropped(), (0, 1 + 192));
    }

    #[test]
    fn before_sessions_the_old_rules_apply_and_the_first_open_drops_their_sessions() {
        let mut sm = StateMachine::default();
        assert!(!sm.sessions_required());
        // Entries of the versions before sessions: any id is a session.
        let first = ok(&mut sm, 1, req(77, 1, put("k", "a")));
        assert_eq!(ok(&mut sm, 2, req(77, 1, put("k", "a"))), first);
        assert_eq!(sm.session_count(), 1);
        // Their flaw is reproduced too: a dropped result is not refused.
        for seq in 2..=LEGACY_MAX_RESULTS as u64 + 1 {
            ok(&mut sm, 3, req(77, seq, put("x", "x")));
        }
        ok(&mut sm, 4, req(77, 1, put("k", "again")));
        assert_eq!(sm.get(b"k").unwrap(), b"again", "as the old rules did");
        let s = open(&mut sm, 5);
        assert!(sm.sessions_required());
        assert_eq!(sm.session_count(), 1, "only the new session");
        assert_eq!(
            sm.apply(6, &req(77, 4098, put("k", "late"))),
            Err(KvError::UnknownSession(77))
        );
        assert_eq!(sm.get(b"k").unwrap(), b"again");
        ok(&mut sm, 7, req(s, 1, put("k", "new")));
    }

    #[test]
    fn a_time_reading_also_ends_the_old_rules() {
        let mut sm = StateMachine::default();
        ok(&mut sm, 1, req(77, 1, put("k", "a")));
        sm.apply_time(T0);
        assert!(sm.sessions_required());
        assert_eq!(sm.session_count(), 0);
        assert_eq!(
            sm.apply(2, &req(77, 2, put("k", "b"))),
            Err(KvError::UnknownSession(77))
        );
    }

    #[test]
    fn a_decoded_copy_goes_on_exactly_like_the_original() {
        let mut sm = StateMachine::default();
        sm.apply_time(T0);
        let ids: Vec<u64> = (0..5)
            .map(|i| open_with(&mut sm, 2 + i, 1_000, 4))
            .collect();
        ok(&mut sm, 8, req(ids[1], 1, put("k", "1")));
        sm.apply_time(T0 + 500);
        ok(&mut sm, 9, req(ids[3], 1, put("k", "3")));
        let mut copy: StateMachine =
            bincode::deserialize(&bincode::serialize(&sm).unwrap()).unwrap();
        copy.recount();
        assert_eq!(copy.log_time_ms(), T0 + 500);
        assert!(copy.sessions_required());
        // The same entries from here on give the same answers.
        for m in [&mut sm, &mut copy] {
            let e = open_with(m, 10, 1_000, 4);
            assert_eq!(m.session_count(), 4, "evicted the least recently used, {e}");
            m.apply_time(T0 + 1_200);
        }
        assert_eq!(
            sm.sessions.keys().collect::<BTreeSet<_>>(),
            copy.sessions.keys().collect::<BTreeSet<_>>()
        );
        assert_eq!(sm.by_use, copy.by_use);
        assert_eq!(sm.by_expiry, copy.by_expiry);
        assert_eq!(sm.result_bytes, copy.result_bytes);
        assert_eq!(sm.sessions_dropped(), copy.sessions_dropped());
    }
}

/// What applying a put costs, alone: `cargo test -p kv-server --release
/// --lib apply_cost -- --ignored --nocapture`.
#[cfg(test)]
mod cost {
    use super::*;

    #[test]
    #[ignore]
    fn apply_cost() {
        let mut sm = StateMachine::default();
        let open = WriteRequest {
            client_id: 0,
            seq: 0,
            acked_below: 0,
            op: Op::OpenSession {
                ttl_ms: 60_000,
                max_sessions: 10,
            },
        };
        let s = match sm.apply(1, &open).unwrap().result {
            OpResult::SessionOpened { session } => session,
            other => panic!("{other:?}"),
        };
        let lead = WriteRequest {
            client_id: 0,
            seq: 1,
            acked_below: 0,
            op: Op::NewLeader { now_ms: 0 },
        };
        let _ = sm.apply(1, &lead);
        let n = 400_000u64;
        let value = vec![7u8; 128];
        let started = std::time::Instant::now();
        for i in 0..n {
            let r = WriteRequest {
                client_id: s,
                seq: i + 1,
                acked_below: i,
                op: Op::Put {
                    key: format!("key-{:06}", (i * 7919) % 10_000).into_bytes(),
                    value: value.clone(),
                },
            };
            sm.apply(2 + i / 64, &r).unwrap();
        }
        let per = started.elapsed() / n as u32;
        println!("apply_cost: {per:?} per put (10,000 keys, 128-byte values)");
    }
}

/// A decimal integer as Redis reads one: an optional `-`, digits without a
/// leading zero (or `0` alone), within 64 bits.
pub fn parse_integer(b: &[u8]) -> Option<i64> {
    let s = std::str::from_utf8(b).ok()?;
    let digits = s.strip_prefix('-').unwrap_or(s);
    if digits.is_empty()
        || !digits.bytes().all(|c| c.is_ascii_digit())
        || (digits.len() > 1 && digits.starts_with('0'))
        || s == "-0"
    {
        return None;
    }
    s.parse().ok()
}
