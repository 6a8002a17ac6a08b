//! The replicated state machine: the key-value map plus, per client, the
//! results of its recent writes, so a retried `(client_id, seq)` is answered
//! from memory instead of being applied twice.

use std::collections::{BTreeMap, HashMap};

use kv_api::{Op, OpResult, Slot, WriteOutcome, WriteRequest};
use serde::{Deserialize, Serialize};

/// Results kept per client, at most; older ones are forgotten (a client with
/// that many writes in flight is misbehaving).
const MAX_RESULTS_PER_CLIENT: usize = 4096;

#[derive(Default, Debug, Clone, Serialize, Deserialize)]
struct Session {
    /// Every seq below this has been acknowledged to the client.
    acked_below: u64,
    /// Results of applied writes with seq >= acked_below.
    results: BTreeMap<u64, WriteOutcome>,
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
        session.results.insert(req.seq, outcome.clone());
        if session.results.len() > MAX_RESULTS_PER_CLIENT {
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
