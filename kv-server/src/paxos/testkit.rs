//! Helpers for the core's unit tests: a tiny synchronous network and
//! commands to propose.

use std::collections::VecDeque;

use kv_api::Op;
use kv_peer_api::{Ballot, ReplicaId, Slot, Value, WriteRequest};

use super::{Config, Durable, Msg, Paxos, Standing};

/// A tiny synchronous network: delivers every message, persists nothing.
pub(super) fn cluster(n: u64) -> Vec<Paxos> {
    let members: Vec<ReplicaId> = (1..=n).collect();
    members
        .iter()
        .map(|&id| Paxos::new(Config::new(id, members.clone()), Durable::default()))
        .collect()
}

/// Runs until quiet; returns everything applied per replica.
pub(super) fn run(nodes: &mut [Paxos], applied: &mut [Vec<(Slot, Value)>], rounds: usize) {
    run_cut(nodes, applied, rounds, &|_, _| false);
}

/// Like [`run`], but a message from `a` to `b` is lost when `cut(a, b)`
/// (a replica cut from itself is down: it does not tick). Returns every
/// message delivered.
pub(super) fn run_cut(
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

pub(super) fn commands(applied: &[(Slot, Value)]) -> Vec<u64> {
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
pub(super) fn voter_with_chosen(chosen: Slot, batch: impl Fn(Slot) -> Vec<WriteRequest>) -> Paxos {
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

pub(super) fn big_put(seq: u64, len: usize) -> WriteRequest {
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

pub(super) fn put(seq: u64) -> WriteRequest {
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

/// Elects a leader in a 5-replica cluster; returns its index.
pub(super) fn elected(nodes: &mut [Paxos], applied: &mut [Vec<(Slot, Value)>]) -> usize {
    run(nodes, applied, 100);
    let l = nodes.iter().position(|n| n.is_leader()).expect("a leader");
    // Settle the first term's no-ops and heartbeats.
    run(nodes, applied, 10);
    l
}

pub(super) fn accept_targets(msgs: &[(ReplicaId, Msg)]) -> Vec<ReplicaId> {
    let mut to: Vec<ReplicaId> = msgs
        .iter()
        .filter(|(_, m)| matches!(m, Msg::Accept(_)))
        .map(|(t, _)| *t)
        .collect();
    to.sort_unstable();
    to
}
