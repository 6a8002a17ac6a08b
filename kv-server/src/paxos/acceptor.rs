//! The acceptor: promises and accepts, each durable before it is answered
//! (see the driver's rule in the parent module), heartbeats from the
//! leader it follows, and whether this replica may vote at all
//! ([`Standing`]): a replica that may have lost its state votes in nothing
//! until it is safe.

use kv_peer_api::{
    Accept, Accepted, AcceptedEntry, Ballot, Heartbeat, HeartbeatAck, Prepare, ProbeReply, Promise,
    Slot,
};

use super::*;

/// Whether a replica may vote (promise and accept), as far as its own
/// durable state tells.
///
/// # Losing a disk (amnesia)
///
/// An acceptor that forgets what it promised and accepted breaks Paxos: it
/// may have helped choose a value that a later quorum, with its forgetful
/// help, never hears of. A replica whose log is empty at start cannot tell
/// a new cluster from a lost disk (the README's own recovery procedure is
/// to delete the data directory), so it starts [`Standing::Unknown`] and
/// votes in nothing until it has found out. It still learns: chosen values
/// are facts, fetched and applied like any follower's.
///
/// It asks every peer ([`Probe`]) whether it votes, whether it holds any
/// history (a promise, an accepted or chosen value, a snapshot) and the
/// highest round it promised or granted in a pre-vote.
///
/// * **New cluster.** If every other replica answers with no history, no
///   value was ever chosen (that takes a majority of acceptances, so at
///   least one other replica would hold it) and no candidate holds a
///   promise of ours (it would have promised its own ballot first). There
///   is nothing to forget: it votes ([`Standing::Voter`]). This needs an
///   answer from every replica, not a majority: a replica that lost its own
///   disk also answers "no history", and two of them must not outvote the
///   one that still holds a value they chose together.
/// * **Rejoining.** If a majority of the replicas (not counting itself)
///   answer as voters, it takes `floor` = one above the highest round
///   they report, and becomes [`Standing::Rejoining`]. It votes again once
///   it hears a leader whose ballot has round `floor` or more and it knows
///   every slot up to that leader's `term_start` chosen.
///
/// Why that is safe. (1) Every ballot a candidate campaigns with was first
/// granted in a pre-vote by a majority, durably ([`Record::PreVoted`]), or
/// is the candidate's own, durably promised before it answers anyone; any
/// majority of the others meets one of those, so no ballot we may have
/// promised before losing our state has a round of `floor` or more. Voting
/// only at ballots of round `floor` or more, we never break such a promise
/// and never accept below it. (2) A leader of round `floor` or more
/// completed phase 1 without us (we answered no prepare): a majority of
/// the others promised its ballot and reported what they accepted. A value
/// chosen in an earlier ballot, even with our forgotten vote, was accepted
/// by a majority, which meets that one in a replica that reported it; so
/// the leader re-proposed it, at a slot at or below its `term_start`, and
/// no earlier ballot can get anything else chosen at a slot above it (it
/// would need acceptances from replicas that have promised the newer
/// ballot). Once we know every slot up to `term_start` chosen, our log
/// holds every value we may have voted for that matters. (3) A leader asked
/// by a rejoining replica ([`HeartbeatAck::rejoin_floor`]) runs phase 1
/// again in round `floor`, so a replica does not wait for the next leader
/// change; the others still follow it, so they promise at once.
///
/// The simulation wipes disks (`kv-server/tests/simulation.rs`); with
/// replicas that vote at once after a wipe, it finds two replicas applying
/// different values in one slot in about half of its seeds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Standing {
    /// Its log was empty at start: it cannot rule out having lost its
    /// state (a wiped or replaced disk), so it votes in nothing until it
    /// has found out from its peers.
    #[default]
    Unknown,
    /// It lost its state. It votes again only in ballots of at least this
    /// round, and only once it has caught up.
    Rejoining {
        /// The lowest round it may vote in.
        floor: u64,
    },
    /// A full acceptor: its log holds everything it ever promised and
    /// accepted.
    Voter,
}

impl Paxos {
    /// Whether this replica may vote (promise, accept, campaign).
    pub fn standing(&self) -> Standing {
        self.standing
    }

    /// Whether this replica votes: a voter of the configuration its
    /// chosen prefix ends in, and its standing lets it.
    pub(super) fn votes(&self) -> bool {
        self.standing == Standing::Voter && self.quorum.is_voter(self.cfg.id)
    }

    pub(super) fn promise(&mut self, ballot: Ballot) {
        if ballot > self.promised {
            self.promised = ballot;
            self.out.persist.push(Record::Promised(ballot));
        }
    }

    /// Our accepted entries from slot `from` on, at most `max_bytes` of
    /// them (at least one); `true` if more follow.
    pub(super) fn accepted_after(
        &self,
        from: Slot,
        max_bytes: usize,
    ) -> (Vec<AcceptedEntry>, bool) {
        let mut out = Vec::new();
        let mut budget = Budget::new(usize::MAX, max_bytes);
        for (&slot, e) in self.log.range(from..) {
            if !budget.take(value_bytes(&e.value) + 32) {
                return (out, true);
            }
            out.push(AcceptedEntry {
                slot,
                ballot: e.ballot,
                value: e.value.clone(),
                chosen: e.chosen,
            });
        }
        (out, false)
    }

    /// Whether this replica holds anything durable that shows the cluster
    /// is not new: a promise, an accepted or chosen value, a snapshot. Not
    /// a pre-vote granted: voters of a new cluster grant each other
    /// pre-votes before a majority of them exists, and that must not keep
    /// the others from finding the cluster new. (Nothing can be chosen, or
    /// promised to a candidate, without a promise somewhere.)
    pub(super) fn has_history(&self) -> bool {
        self.promised != Ballot::ZERO
            || self.chosen > 0
            || self.compacted > 0
            || self.applied > 0
            || !self.log.is_empty()
            || matches!(self.standing, Standing::Rejoining { .. })
    }

    pub(super) fn on_probe_reply(&mut self, m: ProbeReply) {
        if self.standing != Standing::Unknown || m.from == self.cfg.id {
            return;
        }
        self.probes.insert(m.from, m);
        self.decide_standing();
    }

    /// A replica that started with an empty log decides, from its probes,
    /// whether it may vote. See [`Standing`] for the argument.
    pub(super) fn decide_standing(&mut self) {
        if self.standing != Standing::Unknown {
            return;
        }
        if self.quorum.all_others(self.probes.keys().copied())
            && self.probes.values().all(|p| !p.history)
        {
            tracing::info!(
                id = self.cfg.id,
                "every replica is empty: a new cluster; voting from now on"
            );
            self.set_standing(Standing::Voter);
            return;
        }
        let voters: Vec<&ProbeReply> = self.probes.values().filter(|p| p.voter).collect();
        // Without any history seen, wait for every answer: it may be a new
        // cluster whose voters have just decided so.
        if self.quorum.is_majority(voters.iter().map(|p| p.from))
            && self.probes.values().any(|p| p.history)
        {
            let floor = voters
                .iter()
                .map(|p| p.max_round)
                .max()
                .unwrap_or(0)
                .saturating_add(1);
            tracing::warn!(
                id = self.cfg.id,
                floor,
                "started with an empty log in a cluster that has history: this replica may \
                 have lost its state, so it rejoins as a learner; it votes again once a \
                 leader of round {floor} or later leads and it has caught up"
            );
            self.set_standing(Standing::Rejoining { floor });
        }
    }

    pub(super) fn set_standing(&mut self, standing: Standing) {
        self.standing = standing;
        self.out.persist.push(Record::Standing(standing));
    }

    pub(super) fn heard_from_leader(&mut self, ballot: Ballot) {
        if !matches!(self.role, Role::Follower) || self.leader != Some(ballot.id) {
            self.step_down(Some(ballot.id));
        }
        self.reset_election_timer();
    }

    /// A leader's heartbeat accepted: no other proposer gets a promise from
    /// us for a lease's length from now (see `read_index`).
    fn grant_lease(&mut self, leader: ReplicaId) {
        if self.cfg.lease_us == 0 {
            return;
        }
        if let Some(now) = self.clock {
            self.lease_until = now.saturating_add(self.cfg.lease_us);
            self.lease_holder = Some(leader);
        }
    }

    /// Whether a lease keeps us from promising `from` now: one granted to
    /// another leader that has not run out, or, for a lease's length after
    /// a start (or before the driver set the clock at all), anyone's.
    pub(super) fn leased_to_another(&self, from: ReplicaId) -> bool {
        if self.cfg.lease_us == 0 {
            return false;
        }
        match self.clock {
            None => true,
            Some(now) => now < self.lease_until && self.lease_holder != Some(from),
        }
    }

    pub(super) fn on_prepare(&mut self, m: Prepare) -> Promise {
        let refuse = |this: &Self, ballot: Ballot| Promise {
            from: this.cfg.id,
            ballot,
            ok: false,
            accepted: vec![],
            chosen: this.chosen,
            pre_vote: m.pre_vote,
            more: false,
        };
        if !self.votes() {
            // Not an acceptor (yet): a refusal that shows no ballot, so
            // that it makes no one step down. A campaign in a later
            // configuration than ours means we are behind: catch up.
            if m.ballot.epoch() > self.epoch() {
                self.request_fetch(m.from);
            }
            return refuse(self, Ballot::ZERO);
        }
        // Leader stickiness: while a live leader is heard from, refuse to
        // help depose it. Always safe (refusing never breaks Paxos) and it
        // keeps a replica that restarted or was cut off from disrupting a
        // working leader.
        let leader_alive = match self.role {
            Role::Leader(_) => true,
            _ => {
                self.leader.is_some()
                    && self.now < self.last_heard + u64::from(self.cfg.election_ticks.0)
            }
        };
        if m.pre_vote {
            if m.ballot <= self.promised || leader_alive {
                return refuse(self, self.promised);
            }
            if m.ballot.round > self.prevoted {
                self.prevoted = m.ballot.round;
                self.out.persist.push(Record::PreVoted(self.prevoted));
            }
            return Promise {
                ok: true,
                ..refuse(self, m.ballot)
            };
        }
        if m.ballot < self.promised
            || (leader_alive && self.leader() != Some(m.from))
            || self.leased_to_another(m.from)
        {
            return refuse(self, self.promised);
        }
        if m.ballot > self.promised {
            self.step_down(None);
            self.promise(m.ballot);
        }
        self.reset_election_timer();
        // Only entries not known chosen locally: a candidate behind our
        // chosen prefix learns that from `chosen` and catches up first.
        let from = m.from_slot.max(self.chosen + 1);
        let (accepted, more) = self.accepted_after(from, self.cfg.max_message_bytes);
        Promise {
            from: self.cfg.id,
            ballot: m.ballot,
            ok: true,
            accepted,
            chosen: self.chosen,
            pre_vote: false,
            more,
        }
    }

    pub(super) fn on_accept(&mut self, m: Accept) -> Accepted {
        if !self.votes() {
            self.learn_as_learner(m.ballot, m.chosen, m.from);
            return Accepted {
                from: self.cfg.id,
                ballot: Ballot::ZERO,
                ok: false,
                slots: vec![],
            };
        }
        if m.ballot < self.promised {
            return Accepted {
                from: self.cfg.id,
                ballot: self.promised,
                ok: false,
                slots: vec![],
            };
        }
        self.promise(m.ballot);
        self.heard_from_leader(m.ballot);
        let mut slots = Vec::with_capacity(m.entries.len());
        for (slot, value) in m.entries {
            if let Some(e) = self.log.get(&slot) {
                if e.chosen {
                    // Known chosen: ack only the same value. A stale leader
                    // proposing something else must not count us.
                    if e.value == value {
                        slots.push(slot);
                    }
                    continue;
                }
                if e.ballot == m.ballot && e.value == value {
                    slots.push(slot); // a retransmission
                    continue;
                }
            } else if slot <= self.chosen {
                continue; // compacted away: cannot compare, do not ack
            }
            if slot == 0 || slot > self.chosen.saturating_add(MAX_ACCEPT_AHEAD) {
                // No leader proposes that far past what we know chosen (it
                // keeps a few slots in flight); refusing is always safe,
                // and a replica that far behind catches up by fetching. A
                // forged entry at slot 2^64 would otherwise make the next
                // leader re-propose every slot up to it.
                continue;
            }
            slots.push(slot);
            self.out.persist.push(Record::Accepted {
                slot,
                ballot: m.ballot,
                value: value.clone(),
            });
            self.log.insert(
                slot,
                Entry {
                    ballot: m.ballot,
                    value,
                    chosen: false,
                },
            );
        }
        self.learn_chosen(m.ballot, m.chosen, m.from);
        Accepted {
            from: self.cfg.id,
            ballot: m.ballot,
            ok: true,
            slots,
        }
    }

    pub(super) fn on_heartbeat(&mut self, m: Heartbeat) -> HeartbeatAck {
        if !self.votes() {
            self.learn_as_learner(m.ballot, m.chosen, m.from);
            match self.standing {
                // Safe to vote again: this leader was elected without us
                // (we voted in nothing) in a round above any ballot we may
                // have promised before losing our state, and we know every
                // slot it found possibly chosen. See `Standing`.
                Standing::Rejoining { floor }
                    if m.ballot.round >= floor
                        && m.ballot >= self.promised
                        && self.chosen >= m.term_start =>
                {
                    tracing::info!(
                        id = self.cfg.id,
                        ballot = %m.ballot,
                        chosen = self.chosen,
                        "caught up with a leader elected since it lost its state: voting again"
                    );
                    self.set_standing(Standing::Voter);
                }
                _ => {}
            }
        }
        if !self.votes() {
            // No vote (a zero ballot makes no one step down): a learner,
            // or a replica not yet sure it may vote. A rejoining replica
            // says which round it waits for (a learner too: it must be
            // ready to vote by the time it is promoted).
            return HeartbeatAck {
                from: self.cfg.id,
                ballot: Ballot::ZERO,
                ok: false,
                round: m.round,
                chosen: self.chosen,
                rejoin_floor: match self.standing {
                    Standing::Rejoining { floor } => Some(floor),
                    _ => None,
                },
                unsure: self.standing == Standing::Unknown,
            };
        }
        if m.ballot < self.promised {
            return HeartbeatAck {
                from: self.cfg.id,
                ballot: self.promised,
                ok: false,
                round: m.round,
                chosen: self.chosen,
                rejoin_floor: None,
                unsure: false,
            };
        }
        self.promise(m.ballot);
        self.heard_from_leader(m.ballot);
        self.grant_lease(m.from);
        self.learn_chosen(m.ballot, m.chosen, m.from);
        HeartbeatAck {
            from: self.cfg.id,
            ballot: m.ballot,
            ok: true,
            round: m.round,
            chosen: self.chosen,
            rejoin_floor: None,
            unsure: false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::paxos::testkit::*;

    /// A new cluster starts only once every replica has answered: a replica
    /// that finds its log empty cannot tell a new cluster from lost state.
    #[test]
    fn a_new_cluster_waits_for_every_replica() {
        let mut nodes = cluster(3);
        let mut applied = vec![Vec::new(); 3];
        run_cut(&mut nodes, &mut applied, 100, &|a, b| a == 3 || b == 3);
        assert!(
            nodes.iter().all(|n| !n.is_leader()),
            "no leader without replica 3"
        );
        assert!(nodes.iter().all(|n| n.standing() == Standing::Unknown));
        run(&mut nodes, &mut applied, 100);
        assert_eq!(nodes.iter().filter(|n| n.is_leader()).count(), 1);
        assert!(nodes.iter().all(|n| n.standing() == Standing::Voter));
    }

    /// A replica that lost its state (its log is empty, its peers have
    /// history) votes in nothing until a leader elected without it, in a
    /// round above every ballot it may have promised, leads and it has
    /// caught up; then it votes again.
    #[test]
    fn a_replica_that_lost_its_state_votes_only_after_rejoining() {
        let mut nodes = cluster(3);
        let mut applied = vec![Vec::new(); 3];
        let l = elected(&mut nodes, &mut applied);
        for seq in 1..=5 {
            nodes[l].propose(put(seq)).unwrap();
        }
        run(&mut nodes, &mut applied, 20);
        let w = (l + 1) % 3;
        let wid = nodes[w].id();
        let old_round = nodes[l].promised().round;
        let (lid, lballot) = (nodes[l].id(), nodes[l].promised());
        // Its disk is gone.
        nodes[w] = Paxos::new(Config::new(wid, vec![1, 2, 3]), Durable::default());
        applied[w].clear();
        assert_eq!(nodes[w].standing(), Standing::Unknown);
        let Some(Msg::Promise(p)) = nodes[w].step(Msg::Prepare(Prepare {
            from: lid,
            ballot: Ballot {
                round: old_round + 5,
                id: lid,
            },
            from_slot: 1,
            pre_vote: false,
        })) else {
            panic!("a prepare is answered");
        };
        assert!(!p.ok && p.ballot == Ballot::ZERO, "no vote: {p:?}");
        let Some(Msg::Accepted(a)) = nodes[w].step(Msg::Accept(Accept {
            from: lid,
            ballot: lballot,
            entries: vec![(100, Value::Noop)],
            chosen: 0,
        })) else {
            panic!("an accept is answered");
        };
        assert!(!a.ok, "no vote: {a:?}");
        assert!(nodes[w]
            .ready()
            .persist
            .iter()
            .all(|r| !matches!(r, Record::Accepted { .. })));
        run(&mut nodes, &mut applied, 100);
        assert_eq!(nodes[w].standing(), Standing::Voter, "it rejoined");
        assert!(nodes[l].is_leader(), "the same leader, in a newer ballot");
        assert!(nodes[l].promised().round > old_round);
        assert_eq!(commands(&applied[w]), (1..=5).collect::<Vec<_>>());
    }

    /// Strangers' answers count for nothing: two probe replies from ids
    /// outside the cluster, both "empty", would otherwise make a replica of
    /// three decide that the cluster is new (and vote with no memory).
    #[test]
    fn messages_from_non_members_are_dropped() {
        let mut p = Paxos::new(Config::new(1, vec![1, 2, 3]), Durable::default());
        for from in [7, 8] {
            let reply = p.step(Msg::ProbeReply(ProbeReply {
                from,
                voter: true,
                history: false,
                max_round: 0,
            }));
            assert!(reply.is_none());
        }
        assert_eq!(p.standing(), Standing::Unknown);
        assert!(p.probes.is_empty());
        let asked = p.step(Msg::Probe(Probe { from: 9 }));
        assert!(asked.is_none(), "no answer to a stranger: {asked:?}");
    }
}
