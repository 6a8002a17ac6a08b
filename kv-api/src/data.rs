//! The data model beyond put and get: revisions ([`KeyValue`]), ordered
//! ranges ([`RangeRequest`], [`RangeResponse`]) and transactions
//! ([`Txn`], [`Compare`], [`TxnOp`], [`TxnResult`]).
//!
//! # Revisions
//!
//! The store has one revision counter. Every write that changes the map
//! (a put, a delete of a present key, a swap that happened, a transaction
//! with at least one such write) takes the next revision, in log order, so
//! revisions are monotonic across the cluster and the same on every
//! replica: they are counted while applying the log, from the first entry
//! a leader of this version writes (a "new leader" entry, see
//! [`crate::Op::NewLeader`]). A transaction takes one revision for all its
//! writes. A key carries the revision that created it
//! (`create_revision`), the one that last changed it (`mod_revision`) and
//! how many times it was written since it was created (`version`, 1 on
//! creation). Keys written before revisions were counted (by a version
//! that did not count them) show revision 0 and version 1 until written
//! again.

use serde::{Deserialize, Serialize};

use crate::{KvError, Limits};

/// Most keys one range answer holds; more are asked for with its
/// continuation token. Also the default limit.
pub const MAX_RANGE_LIMIT: u64 = 10_000;

/// Most bytes of keys and values one range answer holds (one pair more, if
/// the first alone is larger): an answer stays well below the frame limit
/// of either end and bounds the memory a reply takes.
pub const MAX_RANGE_BYTES: usize = 1 << 20;

/// Most comparisons in a transaction.
pub const MAX_TXN_COMPARES: usize = 128;

/// Most operations in each branch of a transaction.
pub const MAX_TXN_OPS: usize = 128;

/// A key, its value and its revisions.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
pub struct KeyValue {
    /// The key.
    #[serde(with = "serde_bytes")]
    pub key: Vec<u8>,
    /// The value (empty in a keys-only answer).
    #[serde(with = "serde_bytes")]
    pub value: Vec<u8>,
    /// The revision of the write that created the key (0: before revisions
    /// were counted).
    pub create_revision: u64,
    /// The revision of the write that last changed it (0: before revisions
    /// were counted).
    pub mod_revision: u64,
    /// Writes since it was created, 1 on creation.
    pub version: u64,
    /// The lease the key is attached to (0: none).
    pub lease: u64,
}

/// The first key after every key that starts with `prefix`: the end of the
/// range `[prefix, prefix_end(prefix))`. Empty (no end: to the last key)
/// if there is none, e.g. for a prefix of only `0xff` bytes or an empty one.
pub fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    Vec::new()
}

/// A read of the keys in `[start, end)`, in key order.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
pub struct RangeRequest {
    /// The first key (inclusive; empty: from the first key).
    #[serde(with = "serde_bytes")]
    pub start: Vec<u8>,
    /// The end (exclusive; empty: to the last key).
    #[serde(with = "serde_bytes")]
    pub end: Vec<u8>,
    /// At most this many keys in the answer (0: [`MAX_RANGE_LIMIT`];
    /// larger values are cut to it).
    pub limit: u64,
    /// Leave the values out.
    pub keys_only: bool,
    /// Only count the keys of the whole range (no keys in the answer, no
    /// paging).
    pub count_only: bool,
    /// Continue where an earlier answer stopped: its `token`.
    #[serde(with = "serde_bytes")]
    pub token: Option<Vec<u8>>,
    /// Read the range as it was at this revision (0: as it is now), if the
    /// history still holds it: otherwise [`KvError::Compacted`]. Give the
    /// first page's `revision` to every later page for one consistent
    /// view.
    pub revision: u64,
}

impl RangeRequest {
    /// The keys in `[start, end)` (empty `end`: to the last key).
    pub fn between(start: impl Into<Vec<u8>>, end: impl Into<Vec<u8>>) -> RangeRequest {
        RangeRequest {
            start: start.into(),
            end: end.into(),
            ..RangeRequest::default()
        }
    }

    /// The keys that start with `prefix` (all keys for an empty one).
    pub fn prefix(prefix: impl Into<Vec<u8>>) -> RangeRequest {
        let start = prefix.into();
        let end = prefix_end(&start);
        RangeRequest::between(start, end)
    }

    /// `key` alone.
    pub fn key(key: impl Into<Vec<u8>>) -> RangeRequest {
        let start: Vec<u8> = key.into();
        let mut end = start.clone();
        end.push(0);
        RangeRequest {
            limit: 1,
            ..RangeRequest::between(start, end)
        }
    }

    /// Where the answer starts: `start`, or the key the token names. A
    /// token that is not one this version wrote, or that names a key
    /// outside the range, is refused.
    pub fn resume_key(&self, limits: &Limits) -> Result<Vec<u8>, KvError> {
        let Some(token) = &self.token else {
            return Ok(self.start.clone());
        };
        let bogus = |why: &str| {
            KvError::InvalidArgument(format!(
                "the continuation token is not one a range answer gave ({why}); start the \
                 range again without it"
            ))
        };
        let key = token
            .strip_prefix(TOKEN_TAG)
            .ok_or_else(|| bogus("unknown format"))?;
        if key.len() > limits.max_key {
            return Err(bogus("longer than any key"));
        }
        if key < self.start.as_slice() || (!self.end.is_empty() && key >= self.end.as_slice()) {
            return Err(bogus("it points outside the range"));
        }
        Ok(key.to_vec())
    }

    /// Checks the bounds: keys within the limit, `start` not after `end`.
    pub fn validate(&self, limits: &Limits) -> Result<(), KvError> {
        for (what, k) in [("start", &self.start), ("end", &self.end)] {
            if k.len() > limits.max_key.saturating_add(1) {
                return Err(KvError::InvalidArgument(format!(
                    "the range's {what} is {} bytes, over the key limit of {} bytes",
                    k.len(),
                    limits.max_key
                )));
            }
        }
        if !self.end.is_empty() && self.end < self.start {
            return Err(KvError::InvalidArgument(
                "the range's end is before its start".into(),
            ));
        }
        if let Some(t) = &self.token {
            if t.len() > limits.max_key.saturating_add(TOKEN_TAG.len()) {
                return Err(KvError::InvalidArgument(
                    "the continuation token is longer than any a range answer gives".into(),
                ));
            }
        }
        Ok(())
    }

    /// The number of keys an answer may hold.
    pub fn effective_limit(&self) -> usize {
        match self.limit {
            0 => MAX_RANGE_LIMIT as usize,
            n => n.min(MAX_RANGE_LIMIT) as usize,
        }
    }
}

/// What a continuation token starts with (then the key to resume at).
const TOKEN_TAG: &[u8] = b"kvr1:";

/// The continuation token that resumes a range at `key`.
pub fn range_token(key: &[u8]) -> Vec<u8> {
    let mut t = TOKEN_TAG.to_vec();
    t.extend_from_slice(key);
    t
}

/// The answer to a range.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
pub struct RangeResponse {
    /// The keys, in key order (none for `count_only`).
    pub kvs: Vec<KeyValue>,
    /// `count_only`: the number of keys in the whole range. Otherwise the
    /// number of keys in this answer.
    pub count: u64,
    /// Whether keys remain after this answer: ask again with `token`.
    pub more: bool,
    /// Where the next answer starts, if `more`.
    #[serde(with = "serde_bytes")]
    pub token: Option<Vec<u8>>,
    /// The store's revision when the range was read: the revision of the
    /// last write applied.
    pub revision: u64,
    /// The log index the serving replica had applied.
    pub applied: crate::Slot,
}

/// How a comparison's two sides relate.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum CmpOp {
    /// Equal.
    Equal,
    /// Not equal.
    NotEqual,
    /// The key's side is less.
    Less,
    /// The key's side is greater.
    Greater,
}

impl CmpOp {
    fn holds<T: Ord + ?Sized>(self, actual: &T, wanted: &T) -> bool {
        match self {
            CmpOp::Equal => actual == wanted,
            CmpOp::NotEqual => actual != wanted,
            CmpOp::Less => actual < wanted,
            CmpOp::Greater => actual > wanted,
        }
    }
}

/// What a comparison looks at.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub enum Target {
    /// Whether the key exists.
    Exists(bool),
    /// The value (an absent key fails every value comparison).
    Value(#[serde(with = "serde_bytes")] Vec<u8>),
    /// The version (0 for an absent key).
    Version(u64),
    /// The mod revision (0 for an absent key).
    ModRevision(u64),
    /// The create revision (0 for an absent key).
    CreateRevision(u64),
}

/// One condition of a transaction: `key`'s `target` relates by `op`.
/// ([`Target::Exists`] ignores `op`.)
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct Compare {
    /// The key.
    #[serde(with = "serde_bytes")]
    pub key: Vec<u8>,
    /// How the key's side relates to the target's.
    pub op: CmpOp,
    /// What to compare.
    pub target: Target,
}

impl Compare {
    /// Whether the condition holds for `current` (`None`: the key is
    /// absent).
    pub fn holds(&self, current: Option<&KeyValue>) -> bool {
        let num =
            |f: fn(&KeyValue) -> u64, wanted: u64| self.op.holds(&current.map_or(0, f), &wanted);
        match &self.target {
            Target::Exists(e) => current.is_some() == *e,
            Target::Value(v) => current.is_some_and(|c| self.op.holds(c.value.as_slice(), v)),
            Target::Version(v) => num(|c| c.version, *v),
            Target::ModRevision(v) => num(|c| c.mod_revision, *v),
            Target::CreateRevision(v) => num(|c| c.create_revision, *v),
        }
    }
}

/// A write inside a transaction.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub enum TxnOp {
    /// Set `key` to `value`, attached to `lease` (0: none).
    Put {
        /// The key.
        #[serde(with = "serde_bytes")]
        key: Vec<u8>,
        /// The value.
        #[serde(with = "serde_bytes")]
        value: Vec<u8>,
        /// The lease (0: none).
        lease: u64,
    },
    /// Remove `key` if present.
    Delete {
        /// The key.
        #[serde(with = "serde_bytes")]
        key: Vec<u8>,
    },
}

impl TxnOp {
    /// The key it writes.
    pub fn key(&self) -> &[u8] {
        match self {
            TxnOp::Put { key, .. } | TxnOp::Delete { key } => key,
        }
    }

    fn payload_len(&self) -> usize {
        match self {
            TxnOp::Put { key, value, .. } => key.len() + value.len(),
            TxnOp::Delete { key } => key.len(),
        }
    }
}

/// A transaction: if every comparison holds, the `success` writes, else
/// the `failure` writes, atomically, at one revision. Like any write it is
/// applied at most once per `(session, seq)`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
pub struct Txn {
    /// The conditions (none: always holds).
    pub compares: Vec<Compare>,
    /// The writes if all hold.
    pub success: Vec<TxnOp>,
    /// The writes otherwise.
    pub failure: Vec<TxnOp>,
}

impl Txn {
    /// Bytes of keys and values it carries.
    pub fn payload_len(&self) -> usize {
        let compares: usize = self
            .compares
            .iter()
            .map(|c| {
                c.key.len()
                    + match &c.target {
                        Target::Value(v) => v.len(),
                        _ => 0,
                    }
            })
            .sum();
        let ops: usize = self
            .success
            .iter()
            .chain(&self.failure)
            .map(TxnOp::payload_len)
            .sum();
        compares + ops
    }

    /// Checks counts and sizes: at most [`MAX_TXN_COMPARES`] comparisons
    /// and [`MAX_TXN_OPS`] writes a branch, every key and value within
    /// `limits`, and all of it together no more than a compare-and-swap of
    /// two maximal values (so that it fits a client's frame).
    pub fn validate(&self, limits: &Limits) -> Result<(), KvError> {
        if self.compares.len() > MAX_TXN_COMPARES {
            return Err(KvError::InvalidArgument(format!(
                "the transaction has {} comparisons, over the limit of {MAX_TXN_COMPARES}",
                self.compares.len()
            )));
        }
        for (branch, ops) in [("success", &self.success), ("failure", &self.failure)] {
            if ops.len() > MAX_TXN_OPS {
                return Err(KvError::InvalidArgument(format!(
                    "the transaction's {branch} branch has {} operations, over the limit of \
                     {MAX_TXN_OPS}",
                    ops.len()
                )));
            }
        }
        for c in &self.compares {
            limits.check_key(&c.key)?;
            if let Target::Value(v) = &c.target {
                limits.check_value(v)?;
            }
        }
        for (branch, ops) in [("success", &self.success), ("failure", &self.failure)] {
            let mut keys = std::collections::BTreeSet::new();
            for op in ops {
                limits.check_key(op.key())?;
                if let TxnOp::Put { value, .. } = op {
                    limits.check_value(value)?;
                }
                if !keys.insert(op.key()) {
                    return Err(KvError::InvalidArgument(format!(
                        "the transaction's {branch} branch writes the key {:?} twice",
                        String::from_utf8_lossy(op.key())
                    )));
                }
            }
        }
        let max = limits.max_value.saturating_mul(2);
        let len = self.payload_len();
        if len > max {
            return Err(KvError::InvalidArgument(format!(
                "the transaction carries {len} bytes of keys and values, over the limit of \
                 {max} bytes"
            )));
        }
        Ok(())
    }
}

/// What one write of a transaction did.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub enum TxnOpResult {
    /// A put was applied.
    Put,
    /// A delete was applied.
    Deleted {
        /// Whether the key existed.
        existed: bool,
    },
}

/// The result of a transaction.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct TxnResult {
    /// Whether every comparison held (the `success` branch ran).
    pub succeeded: bool,
    /// The store's revision after it: its own if it wrote anything.
    pub revision: u64,
    /// One result per write of the branch that ran, in order.
    pub results: Vec<TxnOpResult>,
}

/// Most events one watch answer holds.
pub const MAX_WATCH_EVENTS: u64 = 1_000;

/// Longest a watch waits for an event before it answers with none (a
/// progress notification): below the SDK's one-second cap on one attempt,
/// so a long poll is never taken for a dead replica.
pub const MAX_WATCH_WAIT_MS: u64 = 800;

/// A long poll for the changes of a range from a revision on.
///
/// # Why a long poll
///
/// tarpc answers each request once; it has no server streams. A stream
/// beside it would need a listener of its own, and with it TLS, roles,
/// framing limits and connection limits a second time. A long poll reuses
/// all of it, and the revision cursor makes it resumable by construction:
/// after a disconnect, a leader's death or a replica's restart the client
/// asks again from the revision after the last event it saw, at any
/// replica — every replica applies the same log and keeps the same
/// history, so each answers the same events in the same order. A watcher
/// that cannot keep up holds nothing on a replica between polls; if it
/// falls behind the history, it is told so ([`KvError::Compacted`]) and
/// where the history now starts. The cost is one request per batch of
/// events, or per [`MAX_WATCH_WAIT_MS`] while nothing happens (and that
/// answer is the progress notification: the range is unchanged up to its
/// `revision`).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
pub struct WatchRequest {
    /// The first key (inclusive).
    #[serde(with = "serde_bytes")]
    pub start: Vec<u8>,
    /// The end (exclusive; empty: to the last key).
    #[serde(with = "serde_bytes")]
    pub end: Vec<u8>,
    /// Answer events from this revision on (at least 1).
    pub from_revision: u64,
    /// Skip this many events of `from_revision` (in the range), already
    /// seen: a revision's events may come in more than one answer.
    pub skip: u64,
    /// Include each event's previous key-value.
    pub prev_kv: bool,
    /// Most events in the answer (0 or over [`MAX_WATCH_EVENTS`]: that).
    pub limit: u64,
    /// How long to wait for an event, in milliseconds (at most
    /// [`MAX_WATCH_WAIT_MS`]; 0 answers at once).
    pub wait_ms: u64,
}

impl WatchRequest {
    /// Watches the keys starting with `prefix` from revision `from`.
    pub fn prefix(prefix: impl Into<Vec<u8>>, from: u64) -> WatchRequest {
        let start = prefix.into();
        WatchRequest {
            end: prefix_end(&start),
            start,
            from_revision: from,
            ..WatchRequest::default()
        }
    }

    /// Watches `key` alone from revision `from`.
    pub fn key(key: impl Into<Vec<u8>>, from: u64) -> WatchRequest {
        let start: Vec<u8> = key.into();
        let mut end = start.clone();
        end.push(0);
        WatchRequest {
            start,
            end,
            from_revision: from,
            ..WatchRequest::default()
        }
    }

    /// Whether `key` is in the watched range.
    pub fn contains(&self, key: &[u8]) -> bool {
        key >= self.start.as_slice() && (self.end.is_empty() || key < self.end.as_slice())
    }

    /// Checks the bounds, as for a range.
    pub fn validate(&self, limits: &Limits) -> Result<(), KvError> {
        RangeRequest::between(self.start.clone(), self.end.clone()).validate(limits)?;
        if self.from_revision == 0 {
            return Err(KvError::InvalidArgument(
                "a watch starts at revision 1 or later".into(),
            ));
        }
        Ok(())
    }
}

/// What happened to a key.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventKind {
    /// It was set.
    Put,
    /// It was deleted.
    Delete,
}

/// One change of one key.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct WatchEvent {
    /// Put or delete.
    pub kind: EventKind,
    /// The key after the change (for a delete: the key, no value, and the
    /// delete's revision as `mod_revision`).
    pub kv: KeyValue,
    /// The key before it, if asked for and it existed.
    pub prev: Option<KeyValue>,
}

/// The answer to a watch.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
pub struct WatchResponse {
    /// The events, in revision order.
    pub events: Vec<WatchEvent>,
    /// Where to go on: the next request's `from_revision`...
    pub next_revision: u64,
    /// ... and `skip`.
    pub next_skip: u64,
    /// The store's revision at the serving replica: nothing in the range
    /// changed between the last event (or the request's start) and it.
    pub revision: u64,
    /// The history starts after this revision.
    pub compacted: u64,
}

/// Shortest lease a grant may ask for, in milliseconds: below it, the log's
/// clock (a leader's reading about once a second) could not tell the
/// lease's end from its start.
pub const MIN_LEASE_TTL_MS: u64 = 1_000;

/// Longest lease, in milliseconds (one day).
pub const MAX_LEASE_TTL_MS: u64 = 24 * 60 * 60 * 1_000;

/// An operation on a lease. A lease is a time-to-live that keys can be
/// attached to (`put --lease`): when it expires or is revoked, its keys
/// are deleted. Expiry is decided through the log, by the log's clock (the
/// leaders' readings): every replica deletes the same keys at the same
/// place in the log, and no replica acts on its own clock. A new leader
/// renews every lease to its full TTL from its own first reading, so a
/// change of leader never makes a lease end early.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub enum LeaseOp {
    /// A new lease of `ttl_ms`, answered with its id.
    Grant {
        /// Its time to live, in milliseconds.
        ttl_ms: u64,
        /// Filled in by the leader that proposes it (its clock); whatever a
        /// client sends is ignored.
        now_ms: u64,
    },
    /// Starts the lease's TTL again from now.
    KeepAlive {
        /// The lease.
        id: u64,
        /// Filled in by the proposing leader, as for `Grant`.
        now_ms: u64,
    },
    /// Ends the lease now and deletes its keys.
    Revoke {
        /// The lease.
        id: u64,
    },
}

impl LeaseOp {
    /// Checks the TTL of a grant.
    pub fn validate(&self) -> Result<(), KvError> {
        if let LeaseOp::Grant { ttl_ms, .. } = self {
            if !(MIN_LEASE_TTL_MS..=MAX_LEASE_TTL_MS).contains(ttl_ms) {
                return Err(KvError::InvalidArgument(format!(
                    "a lease's TTL must be between {} s and {} s, not {} ms",
                    MIN_LEASE_TTL_MS / 1000,
                    MAX_LEASE_TTL_MS / 1000,
                    ttl_ms
                )));
            }
        }
        Ok(())
    }
}

/// The result of a lease operation.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct LeaseResult {
    /// The lease.
    pub id: u64,
    /// Its TTL in milliseconds (0: it does not exist, e.g. a keepalive of
    /// an expired lease, or after a revoke).
    pub ttl_ms: u64,
    /// Keys deleted (by a revoke).
    pub deleted: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_end_is_the_first_key_after_the_prefix() {
        assert_eq!(prefix_end(b"a"), b"b");
        assert_eq!(prefix_end(b"a\xff"), b"b");
        assert_eq!(prefix_end(b"\xff\xff"), b"");
        assert_eq!(prefix_end(b""), b"");
        assert_eq!(prefix_end(b"ab"), b"ac");
    }

    #[test]
    fn tokens_resume_inside_the_range_and_bogus_ones_are_refused() {
        let l = Limits::default();
        let mut r = RangeRequest::between("b", "d");
        assert_eq!(r.resume_key(&l).unwrap(), b"b");
        r.token = Some(range_token(b"c"));
        assert_eq!(r.resume_key(&l).unwrap(), b"c");
        for bad in [b"garbage".to_vec(), range_token(b"a"), range_token(b"d")] {
            r.token = Some(bad);
            let e = r.resume_key(&l).unwrap_err();
            assert!(matches!(e, KvError::InvalidArgument(_)), "{e}");
        }
        assert!(RangeRequest::between("z", "a").validate(&l).is_err());
        assert!(RangeRequest::between("a", "").validate(&l).is_ok());
    }

    #[test]
    fn compares_treat_an_absent_key_as_version_zero_and_no_value() {
        let kv = KeyValue {
            key: b"k".to_vec(),
            value: b"v".to_vec(),
            create_revision: 3,
            mod_revision: 5,
            version: 2,
            lease: 0,
        };
        let c = |op, target| Compare {
            key: b"k".to_vec(),
            op,
            target,
        };
        assert!(c(CmpOp::Equal, Target::Value(b"v".to_vec())).holds(Some(&kv)));
        assert!(!c(CmpOp::Equal, Target::Value(b"v".to_vec())).holds(None));
        assert!(!c(CmpOp::NotEqual, Target::Value(b"v".to_vec())).holds(None));
        assert!(c(CmpOp::Equal, Target::Version(0)).holds(None));
        assert!(c(CmpOp::Less, Target::ModRevision(6)).holds(Some(&kv)));
        assert!(c(CmpOp::Greater, Target::CreateRevision(2)).holds(Some(&kv)));
        assert!(c(CmpOp::Equal, Target::Exists(false)).holds(None));
        assert!(!c(CmpOp::Equal, Target::Exists(true)).holds(None));
    }

    #[test]
    fn oversized_transactions_are_refused() {
        let l = Limits::default();
        let put = |i: usize| TxnOp::Put {
            key: format!("k{i}").into_bytes(),
            value: vec![],
            lease: 0,
        };
        let mut t = Txn {
            success: (0..=MAX_TXN_OPS).map(put).collect(),
            ..Txn::default()
        };
        assert!(t.validate(&l).is_err());
        t.success.truncate(MAX_TXN_OPS);
        assert!(t.validate(&l).is_ok());
        t.failure = vec![
            TxnOp::Put {
                key: b"big".to_vec(),
                value: vec![0; l.max_value],
                lease: 0,
            };
            3
        ];
        assert!(t.validate(&l).is_err());
    }
}
