//! Linearizable reads at the leader (read index). A read waits for the
//! leader to confirm, with a heartbeat round a majority acknowledges after
//! the read arrived, that it still leads, and for the leader to have
//! applied every slot that could hold a write acknowledged before the read
//! (its chosen prefix, and at least the slots it re-proposed on election).
//! Heartbeats also carry the leader's ballot and chosen prefix to its
//! followers.

use std::collections::VecDeque;

use kv_peer_api::{Ballot, Heartbeat, HeartbeatAck, ReplicaId, Slot};

use super::*;

/// A linearizable read waiting for its heartbeat round and for apply.
#[derive(Debug)]
pub(super) struct PendingRead {
    pub(super) token: u64,
    index: Slot,
    round: u64,
}

/// A leader's read index: which heartbeat round a majority has confirmed
/// (who acknowledged which round is in the leader's progress tracker),
/// and the reads waiting for a round and for apply.
#[derive(Debug)]
pub(super) struct ReadIndex {
    /// The latest heartbeat round a majority acknowledged.
    pub(super) confirmed: u64,
    /// When the heartbeat round not yet confirmed started, if any.
    pub(super) round_started: Option<u64>,
    /// Reads waiting for their round and for apply, oldest first.
    pub(super) waiting: VecDeque<PendingRead>,
}

impl ReadIndex {
    /// A new leader's: nothing acknowledged yet, every round up to
    /// `confirmed` (those of earlier terms) counts as done.
    pub(super) fn new(confirmed: u64) -> ReadIndex {
        ReadIndex {
            confirmed,
            round_started: None,
            waiting: VecDeque::new(),
        }
    }
}

impl Paxos {
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
        l.read_index.waiting.push_back(PendingRead {
            token,
            index,
            round: hb_round + 1,
        });
        if l.read_index.round_started.is_none() {
            self.start_heartbeat_round();
        }
        self.serve_reads();
        Ok(())
    }

    pub(super) fn serve_reads(&mut self) {
        let (applied, hb_round) = (self.applied, self.hb_round);
        let Role::Leader(l) = &mut self.role else {
            return;
        };
        while let Some(r) = l.read_index.waiting.front() {
            if r.round > l.read_index.confirmed || r.index > applied {
                break;
            }
            let r = l.read_index.waiting.pop_front().expect("front exists");
            self.out.reads_ready.push(r.token);
        }
        // Reads waiting for a round not yet started start it now.
        if l.read_index.round_started.is_none()
            && l.read_index.waiting.iter().any(|r| r.round > hb_round)
        {
            self.start_heartbeat_round();
        }
    }

    pub(super) fn start_heartbeat_round(&mut self) {
        let now = self.now;
        let Role::Leader(l) = &mut self.role else {
            return;
        };
        self.hb_round += 1;
        l.last_heartbeat = now;
        l.read_index.round_started = Some(now);
        let term_start = l.term_start;
        // Alone, a leader is its own majority: the round is confirmed as it
        // starts. (With others, nothing changes until they answer.)
        if let Some(confirmed) = l.progress.round_confirmed(&self.quorum, self.hb_round) {
            l.read_index.confirmed = l.read_index.confirmed.max(confirmed);
        }
        self.broadcast_members(Msg::Heartbeat(Heartbeat {
            from: self.cfg.id,
            ballot: self.promised,
            chosen: self.chosen,
            round: self.hb_round,
            term_start,
        }));
    }

    pub(super) fn on_heartbeat_ack(&mut self, m: HeartbeatAck) {
        let now = self.now;
        if let Some(l) = self.lead() {
            // Learners and rejoining replicas too: a learner is promoted
            // only once it has caught up and may vote.
            let p = l.progress.follower(m.from);
            if p.status_round.is_none_or(|r| m.round >= r) {
                // What it says of itself, from its newest answer: its
                // chosen prefix goes down if it lost its state.
                p.status_round = Some(m.round);
                p.chosen = m.chosen;
                p.rejoining = m.rejoin_floor.is_some() || m.unsure;
            }
            p.answered = true;
            if m.ballot == Ballot::ZERO {
                p.last_ack = now;
            }
        }
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
        let Some(p) = self.leader_heard(m.from, m.ok, m.ballot) else {
            return;
        };
        p.round_acked = Some(p.round_acked.unwrap_or(0).max(m.round));
        self.confirm_rounds();
        self.serve_reads();
    }

    /// A round is confirmed when a majority (us included: we are in our
    /// latest round) acked it or a later one.
    pub(super) fn confirm_rounds(&mut self) {
        let hb_round = self.hb_round;
        let Role::Leader(l) = &mut self.role else {
            return;
        };
        if let Some(confirmed) = l.progress.round_confirmed(&self.quorum, hb_round) {
            if confirmed > l.read_index.confirmed {
                l.read_index.confirmed = confirmed;
                if l.read_index.round_started.is_some() && confirmed >= hb_round {
                    l.read_index.round_started = None;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::paxos::testkit::*;

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
}
