//! The replicated state machine: the key-value map plus, per client, the
//! results of its recent writes, so a retried `(client_id, seq)` is answered
//! from memory instead of being applied twice.

use std::collections::{BTreeMap, HashMap};

use kv_api::{Op, OpResult, Slot, WriteOutcome, WriteRequest};
use serde::{Deserialize, Serialize};

/// Results kept per client, at most; older ones are forgotten (a client with
/// that many writes in flight is misbehaving).
const MAX_RESULTS_PER_CLIENT: usize = 4096;

/// Bytes of cached results kept per client, at most: a failed
/// compare-and-swap caches the key's current value, up to 1 MiB, so a count
/// alone would let one client hold gigabytes.
const MAX_RESULT_BYTES_PER_CLIENT: u64 = 8 << 20;

#[derive(Default, Debug, Clone, Serialize, Deserialize)]
struct Session {
    /// Every seq below this has been acknowledged to the client, or had its
    /// result dropped for space: a request below it is answered `Stale`,
    /// never applied.
    acked_below: u64,
    /// Results of applied writes with seq >= acked_below.
    results: BTreeMap<u64, WriteOutcome>,
    /// What `results` hold, by [`result_bytes`]. Not in snapshots: counted
    /// again by [`StateMachine::recount`].
    #[serde(skip)]
    result_bytes: u64,
}

impl Session {
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
        while self.results.len() > MAX_RESULTS_PER_CLIENT
            || (self.result_bytes > MAX_RESULT_BYTES_PER_CLIENT && self.results.len() > 1)
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
        _ => 0,
    };
    held as u64 + 64
}

/// The key-value map and the client sessions. Serializable: a snapshot is
/// this structure as of `applied`.
#[derive(Default, Debug, Clone, Serialize, Deserialize)]
pub struct StateMachine {
    map: HashMap<Vec<u8>, Vec<u8>>,
    sessions: HashMap<u64, Session>,
    applied: Slot,
    /// Bytes of the keys and values in `map`. Not in snapshots: counted
    /// again by [`StateMachine::recount`] when one is read.
    #[serde(skip)]
    bytes: u64,
}

impl StateMachine {
    /// The highest slot applied.
    pub fn applied(&self) -> Slot {
        self.applied
    }

    /// Number of keys.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Bytes of the keys and values in the map.
    pub fn data_bytes(&self) -> u64 {
        self.bytes
    }

    /// Counts [`StateMachine::data_bytes`] from scratch (after decoding).
    pub fn recount(&mut self) {
        self.bytes = self.map.iter().map(|(k, v)| pair_len(k, v)).sum();
        for s in self.sessions.values_mut() {
            s.result_bytes = s.results.values().map(result_bytes).sum();
        }
    }

    fn insert(&mut self, key: &[u8], value: &[u8]) {
        self.bytes += pair_len(key, value);
        if let Some(old) = self.map.insert(key.to_vec(), value.to_vec()) {
            self.bytes -= pair_len(key, &old);
        }
    }

    /// Whether the map is empty.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Reads a key.
    pub fn get(&self, key: &[u8]) -> Option<&Vec<u8>> {
        self.map.get(key)
    }

    /// The result of `(client_id, seq)` if it was already applied.
    pub fn cached(&self, client_id: u64, seq: u64) -> Option<WriteOutcome> {
        self.sessions
            .get(&client_id)
            .and_then(|s| s.results.get(&seq).cloned())
    }

    /// Marks `slot` applied (for no-ops and batches alike).
    pub fn set_applied(&mut self, slot: Slot) {
        self.applied = slot;
    }

    /// Applies one write from `slot`, at most once per `(client_id, seq)`.
    pub fn apply(&mut self, slot: Slot, req: &WriteRequest) -> WriteOutcome {
        let session = self.sessions.entry(req.client_id).or_default();
        session.forget_below(req.acked_below);
        if req.seq < session.acked_below {
            return WriteOutcome {
                slot,
                result: OpResult::Stale,
            };
        }
        if let Some(done) = session.results.get(&req.seq) {
            return done.clone();
        }
        let result = match &req.op {
            Op::Put { key, value } => {
                self.insert(key, value);
                OpResult::Put
            }
            Op::Delete { key } => {
                let old = self.map.remove(key);
                if let Some(old) = &old {
                    self.bytes -= pair_len(key, old);
                }
                OpResult::Deleted {
                    existed: old.is_some(),
                }
            }
            Op::Cas { key, expected, new } => {
                let current = self.map.get(key);
                if current == expected.as_ref() {
                    self.insert(key, new);
                    OpResult::Cas {
                        swapped: true,
                        current: Some(new.clone()),
                    }
                } else {
                    OpResult::Cas {
                        swapped: false,
                        current: current.cloned(),
                    }
                }
            }
        };
        let outcome = WriteOutcome { slot, result };
        let session = self.sessions.entry(req.client_id).or_default();
        session.remember(req.seq, outcome.clone());
        outcome
    }
}

fn pair_len(key: &[u8], value: &[u8]) -> u64 {
    (key.len() + value.len()) as u64
}

#[cfg(test)]
mod tests {
    use super::*;

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

    #[test]
    fn a_retried_write_applies_once() {
        let mut sm = StateMachine::default();
        let first = sm.apply(1, &req(7, 1, put("k", "a")));
        sm.apply(2, &req(8, 1, put("k", "b")));
        let retry = sm.apply(3, &req(7, 1, put("k", "a")));
        assert_eq!(retry, first, "the retry gets the first result");
        assert_eq!(
            sm.get(b"k").unwrap(),
            b"b",
            "and does not overwrite the newer write"
        );
    }

    #[test]
    fn cas_swaps_only_on_match() {
        let mut sm = StateMachine::default();
        let absent = Op::Cas {
            key: "k".into(),
            expected: None,
            new: "1".into(),
        };
        let r = sm.apply(1, &req(1, 1, absent.clone()));
        assert_eq!(
            r.result,
            OpResult::Cas {
                swapped: true,
                current: Some(b"1".to_vec())
            }
        );
        let r = sm.apply(2, &req(1, 2, absent));
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
        sm.apply(1, &req(1, 1, put("k", "abc")));
        sm.apply(2, &req(1, 2, put("kk", "x")));
        assert_eq!(sm.data_bytes(), 4 + 3);
        sm.apply(3, &req(1, 3, put("k", "a")));
        assert_eq!(sm.data_bytes(), 2 + 3);
        let cas = Op::Cas {
            key: "kk".into(),
            expected: Some("x".into()),
            new: "xyz".into(),
        };
        sm.apply(4, &req(1, 4, cas));
        assert_eq!(sm.data_bytes(), 2 + 5);
        sm.apply(5, &req(1, 5, Op::Delete { key: "k".into() }));
        sm.apply(6, &req(1, 6, Op::Delete { key: "k".into() }));
        assert_eq!(sm.data_bytes(), 5);
        let mut copy: StateMachine =
            bincode::deserialize(&bincode::serialize(&sm).unwrap()).unwrap();
        assert_eq!(copy.data_bytes(), 0, "not serialized");
        copy.recount();
        assert_eq!(copy.data_bytes(), 5);
    }

    #[test]
    fn a_result_dropped_for_space_answers_its_retry_as_stale_and_is_not_applied_again() {
        let mut sm = StateMachine::default();
        sm.apply(1, &req(7, 1, put("k", "first")));
        // The client never acknowledges: its session fills up and the
        // oldest result (seq 1) is dropped to make room.
        let last = MAX_RESULTS_PER_CLIENT as u64 + 1;
        for seq in 2..=last {
            sm.apply(seq, &req(7, seq, put("other", "x")));
        }
        assert!(sm.cached(7, 1).is_none(), "seq 1's result was dropped");
        sm.apply(last + 1, &req(8, 1, put("k", "newer")));
        let late = sm.apply(last + 2, &req(7, 1, put("k", "first")));
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
        let big = vec![b'v'; 1 << 20];
        sm.apply(
            1,
            &req(
                1,
                1,
                Op::Put {
                    key: "k".into(),
                    value: big.clone(),
                },
            ),
        );
        // Failed swaps each cache the current value (1 MiB); the client
        // acknowledges none of them.
        let failed_cas = Op::Cas {
            key: "k".into(),
            expected: Some("nope".into()),
            new: "x".into(),
        };
        let n = 2 + MAX_RESULT_BYTES_PER_CLIENT / big.len() as u64;
        for seq in 2..=n {
            let r = sm.apply(seq, &req(7, seq, failed_cas.clone()));
            assert!(matches!(r.result, OpResult::Cas { swapped: false, .. }));
        }
        assert!(sm.cached(7, 2).is_none(), "the oldest result was dropped");
        assert!(sm.cached(7, n).is_some(), "the newest is kept");
        assert_eq!(
            sm.apply(n + 1, &req(7, 2, failed_cas)).result,
            OpResult::Stale
        );
    }

    #[test]
    fn acknowledged_results_are_forgotten() {
        let mut sm = StateMachine::default();
        sm.apply(1, &req(1, 1, put("k", "a")));
        let mut r = req(1, 2, put("k", "b"));
        r.acked_below = 2;
        sm.apply(2, &r);
        assert!(sm.cached(1, 1).is_none());
        assert_eq!(
            sm.apply(3, &req(1, 1, put("k", "a"))).result,
            OpResult::Stale
        );
        assert_eq!(sm.get(b"k").unwrap(), b"b");
    }
}
