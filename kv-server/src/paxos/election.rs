//! Becoming leader: the pre-vote ([`Paxos::start_pre_vote`]), then phase 1
//! for a ballot ([`Paxos::start_election`]), counted through the quorum
//! tracker. A candidate that wins takes office in `leader.rs`.
//!
//! Each stage's state lives in its [`Role`] variant ([`PreCandidate`],
//! [`Candidate`]): stepping down, or moving on, drops it.

use std::collections::{BTreeMap, BTreeSet};

use kv_peer_api::{Ballot, Prepare, Promise, ReplicaId, Slot, Value};

use super::*;

/// A replica asking for pre-votes.
#[derive(Debug)]
pub(super) struct PreCandidate {
    /// The ballot it would campaign with.
    ballot: Ballot,
    /// Who granted it (itself included).
    votes: BTreeSet<ReplicaId>,
}

/// A replica running phase 1.
#[derive(Debug, Default)]
pub(super) struct Candidate {
    /// Promises for our ballot, by sender (ours included). A promise whose
    /// `more` is set still lacks pages.
    promises: BTreeMap<ReplicaId, Promise>,
    /// Writes a leader had queued when its configuration changed and it
    /// ran phase 1 again in the new one: proposed if it wins, handed back
    /// refused if not.
    pub(super) carried: std::collections::VecDeque<kv_peer_api::WriteRequest>,
    /// Bytes of `carried`, bounded as a leader's queue is.
    pub(super) carried_bytes: usize,
    /// It led in the configuration before: it takes writes meanwhile.
    pub(super) carrying: bool,
}

impl Paxos {
    /// Notes a ballot seen in a rejection: if it is above ours, stop
    /// leading or campaigning.
    pub(super) fn observe_higher(&mut self, ballot: Ballot) {
        if ballot > self.promised && !matches!(self.role, Role::Follower) {
            self.step_down(None);
        }
    }

    /// Pre-vote: asks the others whether they would promise a ballot one
    /// round above anything we know, without anyone promising anything.
    /// Only with a majority's yes does the real election raise ballots.
    ///
    /// Why: a replica that cannot win — cut off from the others, or facing
    /// a leader the others still hear — would otherwise raise its ballot
    /// at every election timeout, and on coming back its higher ballot,
    /// shown in its answers, would make a healthy leader step down. A
    /// replica refuses a pre-vote while it hears a live leader, so a
    /// returning replica cannot disrupt a working cluster.
    ///
    /// A grant is persisted (`Record::PreVoted`) before it is sent: every
    /// ballot anyone campaigns with was first granted, durably, by a
    /// majority. A replica that lost its state relies on this to find a
    /// round above every ballot it may have promised (see [`Standing`]).
    /// The candidate's own grant need not be durable: a majority of the
    /// others always includes one of the other granters or the candidate
    /// itself, whose real prepare is durable before it answers anyone.
    pub(super) fn start_pre_vote(&mut self) {
        if self.leased_to_another(self.cfg.id) {
            // Our own promise is not ours to give yet: a leader we
            // answered counts on this acceptor refusing every other
            // proposer, us included, until its lease runs out (or, just
            // after a start, a leader we may have answered before it).
            self.reset_election_timer();
            return;
        }
        // Above every ballot seen, and at least in our own epoch. A ballot
        // of a later epoch than ours is allowed (rule 1 of the module
        // doc): a leader that learned a change chosen may have crashed
        // before anyone else did, after the acceptors promised its new
        // epoch's ballot; one of us must then finish the old epoch.
        let known = self.promised.round.max(self.seen_round).max(self.prevoted);
        let round = known
            .max(Ballot::epoch_floor(self.epoch()).round)
            .saturating_add(1);
        let ballot = Ballot {
            round,
            id: self.cfg.id,
        };
        if !self.cfg.pre_vote {
            return self.start_election(ballot);
        }
        tracing::debug!(id = self.cfg.id, %ballot, "asking for pre-votes");
        self.step_down(None);
        self.role = Role::PreCandidate(PreCandidate {
            ballot,
            votes: BTreeSet::from([self.cfg.id]),
        });
        self.reset_election_timer();
        self.broadcast_prepare(ballot, true);
        self.maybe_prevoted();
    }

    /// Asks every other replica to promise `ballot` (or, for a pre-vote,
    /// whether it would) from our first slot not known chosen.
    pub(super) fn broadcast_prepare(&mut self, ballot: Ballot, pre_vote: bool) {
        self.broadcast(Msg::Prepare(Prepare {
            from: self.cfg.id,
            ballot,
            from_slot: self.chosen + 1,
            pre_vote,
        }));
    }

    pub(super) fn maybe_prevoted(&mut self) {
        let Role::PreCandidate(pc) = &self.role else {
            return;
        };
        if self.quorum.is_majority(pc.votes.iter().copied()) && !self.leased_to_another(self.cfg.id)
        {
            let ballot = pc.ballot;
            self.start_election(ballot);
        }
    }

    /// Phase 1 for `ballot` (above our promise: else one round above it).
    pub(super) fn start_election(&mut self, ballot: Ballot) {
        let ballot = if ballot > self.promised {
            ballot
        } else {
            Ballot {
                round: self.promised.round.saturating_add(1),
                id: self.cfg.id,
            }
        };
        tracing::info!(id = self.cfg.id, %ballot, from_slot = self.chosen + 1, "starting election");
        self.step_down(None);
        self.promise(ballot);
        self.reset_election_timer();
        let own = Promise {
            from: self.cfg.id,
            ballot,
            ok: true,
            accepted: self.accepted_after(self.chosen + 1, usize::MAX).0,
            chosen: self.chosen,
            pre_vote: false,
            more: false,
        };
        self.role = Role::Candidate(Candidate {
            promises: BTreeMap::from([(self.cfg.id, own)]),
            carried: Default::default(),
            carried_bytes: 0,
            carrying: false,
        });
        self.broadcast_prepare(ballot, false);
        self.maybe_win();
    }

    pub(super) fn on_promise(&mut self, m: Promise) {
        if !m.ok && m.chosen > self.chosen {
            // It knows more chosen: perhaps a configuration change we have
            // not heard of (we may even have been removed). Catch up.
            self.request_fetch(m.from);
        }
        if m.pre_vote {
            if !m.ok {
                // A live leader, or a higher ballot: ask above it next time.
                self.seen_round = self.seen_round.max(m.ballot.round);
            } else if let Role::PreCandidate(pc) = &mut self.role {
                if m.ballot == pc.ballot {
                    pc.votes.insert(m.from);
                    self.maybe_prevoted();
                }
            }
            return;
        }
        if !m.ok {
            self.observe_higher(m.ballot);
            return;
        }
        let promised = self.promised;
        let Role::Candidate(c) = &mut self.role else {
            return;
        };
        if m.ballot != promised {
            return;
        }
        // A promise comes in pages when the acceptor holds many accepted
        // entries: gather them; ask for the next page while `more` is set.
        let from = m.from;
        let merged = match c.promises.remove(&from) {
            Some(mut p) if p.more => {
                let last = p.accepted.last().map_or(0, |e| e.slot);
                p.accepted
                    .extend(m.accepted.into_iter().filter(|e| e.slot > last));
                p.chosen = p.chosen.max(m.chosen);
                p.more = m.more;
                p
            }
            Some(p) => p, // a duplicate of a complete promise
            None => m,
        };
        // Pages are asked for one at a time, each bounded; so is what they
        // add up to. No honest acceptor holds that many entries it does not
        // know chosen; one that claims to is not counted (a quorum of the
        // others can still elect).
        let bytes: usize = merged
            .accepted
            .iter()
            .map(|e| value_bytes(&e.value) + 32)
            .sum();
        if bytes > MAX_PROMISE_BYTES {
            tracing::warn!(
                id = self.cfg.id,
                from,
                bytes,
                "a promise reports more accepted entries than any acceptor holds; not counted"
            );
            return;
        }
        if merged.more {
            let next = merged.accepted.last().map_or(self.chosen, |e| e.slot) + 1;
            self.send(
                from,
                Msg::Prepare(Prepare {
                    from: self.cfg.id,
                    ballot: self.promised,
                    from_slot: next,
                    pre_vote: false,
                }),
            );
        }
        if let Role::Candidate(c) = &mut self.role {
            c.promises.insert(from, merged);
        }
        self.maybe_win();
    }

    pub(super) fn maybe_win(&mut self) {
        let epoch = self.epoch();
        let Role::Candidate(c) = &self.role else {
            return;
        };
        let complete = c.promises.values().filter(|p| !p.more).map(|p| p.from);
        if !self.quorum.is_majority(complete) {
            return;
        }
        let ballot = self.promised;
        let max_chosen = c.promises.values().map(|p| p.chosen).max().unwrap_or(0);
        if max_chosen > self.chosen {
            // A promiser knows more slots chosen than we do: we lack their
            // values, so we may not lead yet. Stay a candidate and fetch
            // them; the promises stay valid, and the fetch replies bring us
            // back here (a follower a tick behind, as a thrifty leader
            // leaves some, wins without waiting out another election
            // timeout). The election timer still bounds the wait.
            let from = c
                .promises
                .values()
                .find(|p| p.chosen == max_chosen)
                .map(|p| p.from);
            tracing::info!(
                id = self.cfg.id,
                behind = max_chosen - self.chosen,
                "won phase 1 but behind; catching up first"
            );
            if let Some(peer) = from {
                self.request_fetch(peer);
            }
            return;
        }
        // For every slot after our chosen prefix: a value known chosen, else
        // the value of the highest ballot accepted, else a no-op.
        let mut best: BTreeMap<Slot, (bool, Ballot, Value)> = BTreeMap::new();
        for p in c.promises.values() {
            for e in &p.accepted {
                // No acceptor accepts past its own chosen prefix plus
                // `MAX_ACCEPT_AHEAD`, and ours is now at least as long as
                // any promiser's: an entry beyond is not an acceptor's.
                if e.slot <= self.chosen || e.slot > self.chosen.saturating_add(MAX_ACCEPT_AHEAD) {
                    continue;
                }
                // Accepted in an older configuration and not known
                // chosen: void after the stop sign that ended it.
                if !e.chosen && e.ballot.epoch() < epoch {
                    continue;
                }
                let replace = match best.get(&e.slot) {
                    None => true,
                    Some((chosen, b, _)) => !*chosen && (e.chosen || e.ballot > *b),
                };
                if replace {
                    best.insert(e.slot, (e.chosen, e.ballot, e.value.clone()));
                }
            }
        }
        let last = best.keys().next_back().copied().unwrap_or(self.chosen);
        tracing::info!(id = self.cfg.id, %ballot, chosen = self.chosen, reproposed = last - self.chosen, "elected leader");
        let carried = match &mut self.role {
            Role::Candidate(c) => std::mem::take(&mut c.carried),
            _ => Default::default(),
        };
        self.become_leader(best, last, carried);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::paxos::testkit::*;

    /// A promise whose accepted entries do not fit one message comes in
    /// pages, and the new leader re-proposes every entry of every page.
    #[test]
    fn a_promise_too_big_for_one_message_comes_in_pages() {
        let mut nodes = cluster(3);
        for n in nodes.iter_mut() {
            n.cfg.max_message_bytes = 2_000;
            n.cfg.max_batch = 1;
            n.cfg.max_inflight = 16;
            n.cfg.thrifty = false;
        }
        let mut applied = vec![Vec::new(); 3];
        let l = elected(&mut nodes, &mut applied);
        let lid = nodes[l].id();
        let f = (l + 1) % 3;
        // Ten 500-byte writes reach one follower only: chosen (two of
        // three), but the leader never hears so.
        for seq in 1..=10 {
            nodes[l].propose(big_put(seq, 500)).unwrap();
        }
        let r = nodes[l].ready();
        for (to, m) in r.messages {
            if to == nodes[f].id() && matches!(m, Msg::Accept(_)) {
                nodes[f].step(m);
            }
        }
        let _ = nodes[f].ready();
        // The leader dies. The third replica campaigns (the follower is
        // made patient) and needs the follower's promise, in pages.
        nodes[f].election_at = u64::MAX;
        let sent = run_cut(&mut nodes, &mut applied, 300, &|a, b| a == lid || b == lid);
        assert!(
            sent.iter()
                .any(|m| matches!(m, Msg::Promise(p) if p.more && !p.pre_vote)),
            "some promise came in pages"
        );
        for (i, a) in applied.iter().enumerate() {
            if i != l {
                assert_eq!(
                    commands(a),
                    (1..=10).collect::<Vec<_>>(),
                    "replica {}",
                    i + 1
                );
            }
        }
    }

    /// A follower cut off from everyone keeps its ballot (its pre-votes
    /// fail), and on its return the leader stays.
    #[test]
    fn a_returning_replica_does_not_depose_the_leader() {
        let mut nodes = cluster(5);
        let mut applied = vec![Vec::new(); 5];
        let l = elected(&mut nodes, &mut applied);
        let ballot = nodes[l].promised();
        let f = (l + 2) % 5;
        let fid = nodes[f].id();
        run_cut(&mut nodes, &mut applied, 300, &|a, b| {
            a != b && (a == fid || b == fid)
        });
        assert_eq!(
            nodes[f].promised(),
            ballot,
            "the cut-off replica kept its ballot"
        );
        run(&mut nodes, &mut applied, 50);
        assert!(nodes[l].is_leader(), "the leader stayed");
        assert_eq!(nodes[l].promised(), ballot);
        assert_eq!(nodes[f].leader(), Some(nodes[l].id()));
    }
}
