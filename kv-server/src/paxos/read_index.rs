//! Linearizable reads at the leader (read index). A read waits for the
//! leader to confirm, with a heartbeat round a majority acknowledges after
//! the read arrived, that it still leads, and for the leader to have
//! applied every slot that could hold a write acknowledged before the read
//! (its chosen prefix, and at least the slots it re-proposed on election).
//! Heartbeats also carry the leader's ballot and chosen prefix to its
//! followers.
//!
//! # Leases: reads without a round of their own
//!
//! With [`Config::lease_us`] `W` set, a leader serves a read at once (it
//! still waits for apply) while its lease holds: until `0.9 W` on its own
//! lease clock after it *started* a heartbeat round of its current term
//! that a majority of its voters then acknowledged (itself included). The
//! rounds it starts every heartbeat interval keep the lease going; a read
//! that finds it run out (the followers answered late, or not at all)
//! starts a round and waits, as without leases.
//!
//! What makes it safe is on the acceptors' side: an acceptor that accepts
//! a heartbeat from leader `L` promises no other proposer for `W` on its
//! own lease clock from then on ([`Paxos::set_clock`] is read as each
//! input is handled), itself included (it starts no election either); and
//! for `W` after it starts it promises no one, since it may have answered
//! a heartbeat just before it stopped and does not remember.
//!
//! The argument. Say `L`, leading in ballot `b`, serves a read at real
//! time `r`, under a lease from a round it started at real time `s` and a
//! majority `Q` acknowledged. The read must reflect every write
//! acknowledged before it arrived; `L` has applied everything it knows
//! chosen (and all it re-proposed when elected), and every slot chosen in
//! ballot `b` or below is known to `L` (it proposed or re-proposed them
//! all). So the danger is a slot chosen by another proposer `L'` in a
//! ballot `b' > b` before `r`, which needs phase 1 of `b'` completed at a
//! majority before `r`, and that majority meets `Q` in some acceptor `q`.
//! `q` answered `L`'s round in ballot `b` positively at some time
//! `t >= s`, so it had not promised `b'` by then (it would have refused
//! `b`); after `t` it refuses `b'` until its clock has counted `W`, and it
//! counts from as the heartbeat is handled, at or after `t`. With every
//! lease clock within 5% of real time's rate, `q`'s promise of `b'` comes
//! after `s + W / 1.05`, and the read happened by `L`'s clock before
//! `s + 0.9 W` elapsed, so by real time `s + 0.9 W / 0.95 < s + W / 1.05`:
//! before that promise, so before `b'` could choose anything. (`q` may be
//! `L` itself: a leader refuses every prepare while it leads, and once it
//! steps down it serves no more reads.) A round started by an earlier
//! term of `L` counts for nothing: its start is not remembered, so acks
//! of it give no lease.
//!
//! Configuration changes need nothing more: a leader's term, its rounds and
//! its lease end when it learns its stop sign chosen (rule 3 of the module
//! doc: it steps down, and leads the next epoch only after phase 1 there),
//! and no proposer can run phase 1 in the next epoch before some replica
//! knows that stop sign chosen, which it can learn only from this leader.
//! Before that, any proposer must pass through this epoch's quorums, which
//! meet `Q`.
//!
//! What it assumes, and what is done about each: clocks that count time,
//! within 5% (CLOCK_BOOTTIME, which also counts while the machine
//! sleeps; the simulation runs each replica's lease clock at its own rate
//! within that bound, and its broken variant `drifting-clocks`, far
//! outside it, is caught serving a stale read); every replica of the
//! cluster refusing for `W` (a version without leases does not: turn
//! leased reads off with `kv-server --no-read-lease` while such a version
//! runs in the cluster). The refusals cost elections nothing in a
//! replica: `W` is the election timeout's lower bound, before which a
//! follower that heard the leader does not campaign anyway.

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
    /// When (lease clock) each round of this term not yet confirmed
    /// started, oldest first; at most [`MAX_TIMED_ROUNDS`].
    started_at: VecDeque<(u64, u64)>,
    /// Until when (lease clock) reads need no round of their own.
    lease_until: u64,
}

/// Rounds whose start a leader remembers while it waits for a majority to
/// acknowledge them (one per heartbeat interval while no majority answers:
/// a leader in that state steps down long before it has this many).
const MAX_TIMED_ROUNDS: usize = 256;

impl ReadIndex {
    /// A new leader's: nothing acknowledged yet, every round up to
    /// `confirmed` (those of earlier terms) counts as done.
    pub(super) fn new(confirmed: u64) -> ReadIndex {
        ReadIndex {
            confirmed,
            round_started: None,
            waiting: VecDeque::new(),
            started_at: VecDeque::new(),
            lease_until: 0,
        }
    }

    /// A majority acknowledged `round` (or later ones): if it is one of
    /// this term's, the lease runs `lease_us` from its start.
    fn confirm(&mut self, round: u64, lease_us: u64) {
        self.confirmed = self.confirmed.max(round);
        while let Some(&(r, at)) = self.started_at.front() {
            if r > round {
                break;
            }
            self.started_at.pop_front();
            if r == round {
                self.lease_until = self.lease_until.max(at.saturating_add(lease_us));
            }
        }
    }
}

impl Paxos {
    /// Asks for a linearizable read; `token` comes back in
    /// `Ready::reads_ready` once the leader has confirmed its ballot with a
    /// majority after the read arrived (or holds a lease: then the rounds
    /// already confirmed do) and has applied every slot that could hold a
    /// write acknowledged before it. Whether it was taken under the lease.
    pub fn read(&mut self, token: u64) -> Result<bool, Option<ReplicaId>> {
        let (chosen, hb_round, leased) = (self.chosen, self.hb_round, self.lease_holds());
        let Role::Leader(l) = &mut self.role else {
            return Err(self.leader);
        };
        let round = if leased {
            l.read_index.confirmed
        } else {
            hb_round + 1
        };
        l.read_index.waiting.push_back(PendingRead {
            token,
            index: chosen.max(l.term_start),
            round,
        });
        if leased {
            self.leased_reads += 1;
        } else if l.read_index.round_started.is_none() {
            self.start_heartbeat_round();
        }
        self.serve_reads();
        Ok(leased)
    }

    /// Whether a linearizable read may be answered at once from a state
    /// machine that has applied `applied`, outside a round (while the
    /// driver waits for a write): this replica leads, its lease holds, no
    /// read waits before it, and `applied` covers the read's index. Counts
    /// it as a leased read if so.
    pub fn read_now(&mut self, applied: Slot) -> bool {
        let ok = self.lease_holds()
            && matches!(&self.role, Role::Leader(l)
                if l.read_index.waiting.is_empty() && self.chosen.max(l.term_start) <= applied);
        if ok {
            self.leased_reads += 1;
        }
        ok
    }

    /// Whether this replica leads and may serve reads under its lease now.
    fn lease_holds(&self) -> bool {
        let Role::Leader(l) = &self.role else {
            return false;
        };
        self.cfg.read_lease && self.clock.is_some_and(|now| now < l.read_index.lease_until)
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
            self.out.reads_index = self.out.reads_index.max(r.index);
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
        if let Some(clock) = self.clock.filter(|_| self.cfg.lease_us > 0) {
            let timed = &mut l.read_index.started_at;
            if timed.len() >= MAX_TIMED_ROUNDS {
                timed.pop_front();
            }
            timed.push_back((self.hb_round, clock));
        }
        let term_start = l.term_start;
        // Alone, a leader is its own majority: the round is confirmed as it
        // starts. (With others, nothing changes until they answer.)
        if let Some(confirmed) = l.progress.round_confirmed(&self.quorum, self.hb_round) {
            l.read_index.confirm(confirmed, self.cfg.leader_lease_us());
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
                l.read_index.confirm(confirmed, self.cfg.leader_lease_us());
                if l.read_index.round_started.is_some() && confirmed >= hb_round {
                    l.read_index.round_started = None;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use kv_peer_api::{Ballot, Prepare, ReplicaId};

    use crate::paxos::testkit::*;
    use crate::paxos::{Config, Durable, Msg, Paxos, Standing};

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

    /// Three replicas with leases of `W` µs, every clock at `clock`.
    fn leased_cluster(clock: u64) -> Vec<Paxos> {
        let members: Vec<ReplicaId> = vec![1, 2, 3];
        members
            .iter()
            .map(|&id| {
                let mut cfg = Config::new(id, members.clone());
                cfg.lease_us = W;
                cfg.read_lease = true;
                let mut p = Paxos::new(cfg, Durable::default());
                p.set_clock(clock);
                p
            })
            .collect()
    }

    const W: u64 = 150_000;

    fn set_clocks(nodes: &mut [Paxos], clock: u64) {
        nodes.iter_mut().for_each(|n| n.set_clock(clock));
    }

    /// Delivers a leader's messages and steps the answers back in; returns
    /// the reads that became ready.
    fn exchange(nodes: &mut [Paxos], l: usize, msgs: Vec<(ReplicaId, Msg)>) -> Vec<u64> {
        let mut got = Vec::new();
        for (to, m) in msgs {
            if let Some(reply) = nodes[(to - 1) as usize].step(m) {
                nodes[l].step(reply);
                got.extend(nodes[l].ready().reads_ready);
            }
        }
        got
    }

    /// A leased cluster past its acceptors' refusal after their start,
    /// with a leader elected and a heartbeat round it started at `at`
    /// (every clock then) acknowledged by all; and the leader's index.
    fn leader_with_round_at(at: u64) -> (Vec<Paxos>, usize) {
        let mut nodes = leased_cluster(0);
        let mut applied = vec![Vec::new(); 3];
        set_clocks(&mut nodes, W);
        run(&mut nodes, &mut applied, 100);
        let l = nodes.iter().position(|n| n.is_leader()).unwrap();
        set_clocks(&mut nodes, at);
        nodes[l].tick_while_busy();
        let hb = nodes[l].take_messages();
        exchange(&mut nodes, l, hb);
        (nodes, l)
    }

    #[test]
    fn under_a_lease_a_read_needs_no_round_and_after_it_one() {
        let (mut nodes, l) = leader_with_round_at(2 * W);
        // Within 0.9 W of the round's start: served at once, no messages.
        nodes[l].set_clock(2 * W + W / 10 * 9 - 1);
        nodes[l].read(1).unwrap();
        let r = nodes[l].ready();
        assert_eq!(r.reads_ready, vec![1], "served under the lease");
        assert!(
            r.messages.is_empty(),
            "no heartbeat round for a leased read"
        );
        assert_eq!(nodes[l].leased_reads(), 1);
        // At 0.9 W the lease has run out: the read waits for a round.
        nodes[l].set_clock(2 * W + W / 10 * 9);
        nodes[l].read(2).unwrap();
        let r = nodes[l].ready();
        assert!(r.reads_ready.is_empty(), "not served after the lease");
        assert!(!r.messages.is_empty(), "a heartbeat round started");
        assert_eq!(exchange(&mut nodes, l, r.messages), vec![2]);
        assert_eq!(nodes[l].leased_reads(), 1);
    }

    #[test]
    fn with_read_leases_off_every_read_waits_for_a_round() {
        let (mut nodes, l) = leader_with_round_at(2 * W);
        nodes[l].cfg.read_lease = false;
        nodes[l].read(1).unwrap();
        let r = nodes[l].ready();
        assert!(r.reads_ready.is_empty(), "no lease to serve it from");
        assert_eq!(exchange(&mut nodes, l, r.messages), vec![1]);
    }

    #[test]
    fn an_acceptor_promises_no_one_else_while_a_lease_runs() {
        // The follower accepts a heartbeat at 5 W.
        let (mut nodes, l) = leader_with_round_at(5 * W);
        let f = (l + 1) % 3;
        let other = (l + 2) % 3;
        let prepare = |round| {
            Msg::Prepare(Prepare {
                from: nodes[other].id(),
                ballot: Ballot {
                    round,
                    id: nodes[other].id(),
                },
                from_slot: 1,
                pre_vote: false,
            })
        };
        let high = nodes[f].promised().round + 10;
        let (p1, p2) = (prepare(high), prepare(high));
        // Stickiness by ticks is not what refuses here: the tick clock has
        // not moved, so take it out of the way.
        nodes[f].leader = None;
        nodes[f].set_clock(6 * W - 1);
        let Some(Msg::Promise(p)) = nodes[f].step(p1) else {
            panic!("a promise answers a prepare");
        };
        assert!(!p.ok, "refused while the lease runs");
        nodes[f].set_clock(6 * W);
        let Some(Msg::Promise(p)) = nodes[f].step(p2) else {
            panic!("a promise answers a prepare");
        };
        assert!(p.ok, "promised once it ran out");
    }

    #[test]
    fn an_acceptor_that_starts_promises_no_one_for_a_lease() {
        let mut cfg = Config::new(2, vec![1, 2, 3]);
        cfg.lease_us = W;
        let mut p = Paxos::new(
            cfg,
            Durable {
                standing: Standing::Voter,
                ..Durable::default()
            },
        );
        let prepare = |round| {
            Msg::Prepare(Prepare {
                from: 1,
                ballot: Ballot { round, id: 1 },
                from_slot: 1,
                pre_vote: false,
            })
        };
        let refused = |m: Option<Msg>| matches!(m, Some(Msg::Promise(p)) if !p.ok);
        assert!(refused(p.step(prepare(1))), "no clock yet: refused");
        p.set_clock(1_000_000);
        assert!(refused(p.step(prepare(2))), "just started: refused");
        p.set_clock(1_000_000 + W);
        assert!(
            !refused(p.step(prepare(3))),
            "a lease after its start: promised"
        );
    }
}
