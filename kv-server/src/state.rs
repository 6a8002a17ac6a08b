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
                self.map.insert(key.clone(), value.clone());
                OpResult::Put
            }
            Op::Delete { key } => OpResult::Deleted {
                existed: self.map.remove(key).is_some(),
            },
            Op::Cas { key, expected, new } => {
                let current = self.map.get(key);
                if current == expected.as_ref() {
                    self.map.insert(key.clone(), new.clone());
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
