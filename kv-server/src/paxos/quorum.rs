//! Every quorum decision of the core, in one place.
//!
//! Who votes, and how many of them make a majority, is decided here and
//! nowhere else: phase 1 (promises), phase 2 (accepts, per slot), the
//! pre-vote, the heartbeat rounds a linearizable read waits for, the
//! leader's check that it still hears a majority, thrifty targeting and
//! the probes of a replica that started with an empty log. The rest of the
//! core never compares a count with a number; it asks the [`Quorum`] about
//! a set of replicas.
//!
//! The voters and learners are those of the configuration the replica's
//! chosen prefix ends in (see the parent module on membership): the core
//! makes a new `Quorum` whenever its chosen prefix passes a configuration
//! change, and a majority is more than half of the voters. Learners are
//! members (their messages are heard, they are sent heartbeats) but count
//! for nothing in any majority.
//!
//! Answers from replicas that are not voters are counted for nothing (a
//! set that holds a stranger or a learner does not grow towards a
//! majority); the core also drops strangers' messages on arrival
//! ([`super::Paxos::step`]).
//!
//! A leader's view of its followers in its term ([`Progress`], gathered
//! in a [`Tracker`]) lives here too, with the questions a leader asks of
//! it: has a majority answered lately, which heartbeat round has a
//! majority acknowledged.

use std::collections::BTreeMap;

use kv_peer_api::{ReplicaId, Slot};

/// The voters of this replica's cluster and what makes a majority of them.
#[derive(Clone, Debug)]
pub(crate) struct Quorum {
    /// This replica.
    id: ReplicaId,
    /// Every voter, this replica included if it votes, in the configured
    /// order (the order messages are broadcast in).
    members: Vec<ReplicaId>,
    /// Members that do not vote.
    learners: Vec<ReplicaId>,
}

impl Quorum {
    /// The voters `members` (this replica, `id`, among them), no learners.
    #[cfg(test)]
    pub(crate) fn new(id: ReplicaId, members: Vec<ReplicaId>) -> Quorum {
        Quorum {
            id,
            members,
            learners: Vec::new(),
        }
    }

    /// The voters and learners of a configuration, seen from replica `id`.
    pub(crate) fn of(id: ReplicaId, m: &kv_peer_api::Membership) -> Quorum {
        Quorum {
            id,
            members: m.voters(),
            learners: m.learners(),
        }
    }

    /// Whether `r` votes.
    pub(crate) fn is_voter(&self, r: ReplicaId) -> bool {
        self.members.contains(&r)
    }

    /// The learners, this replica included if it is one.
    pub(crate) fn learners(&self) -> Vec<ReplicaId> {
        self.learners
            .iter()
            .copied()
            .filter(|&m| m != self.id)
            .collect()
    }

    /// This replica.
    pub(crate) fn id(&self) -> ReplicaId {
        self.id
    }

    /// Whether `r` is a member (voter or learner).
    pub(crate) fn is_member(&self, r: ReplicaId) -> bool {
        self.members.contains(&r) || self.learners.contains(&r)
    }

    /// Every voter but this replica, in the configured order.
    pub(crate) fn others(&self) -> Vec<ReplicaId> {
        self.members
            .iter()
            .copied()
            .filter(|&m| m != self.id)
            .collect()
    }

    /// Members that make a majority.
    fn majority(&self) -> usize {
        self.members.len() / 2 + 1
    }

    /// Whether the replicas `voters` (distinct; strangers not counted) are
    /// a majority of the members.
    pub(crate) fn is_majority(&self, voters: impl IntoIterator<Item = ReplicaId>) -> bool {
        let mut voters: Vec<ReplicaId> = voters.into_iter().filter(|&r| self.is_voter(r)).collect();
        voters.sort_unstable();
        voters.dedup();
        let members = voters.len();
        members >= self.majority()
    }

    /// Whether every member but this replica is among `answered`.
    pub(crate) fn all_others(&self, answered: impl IntoIterator<Item = ReplicaId>) -> bool {
        let answered: Vec<ReplicaId> = answered.into_iter().collect();
        self.members
            .iter()
            .all(|m| *m == self.id || answered.contains(m))
    }

    /// How many other members, with this replica, make a majority: whom a
    /// thrifty leader sends a new accept to at once.
    pub(crate) fn others_needed(&self) -> usize {
        self.majority().saturating_sub(1)
    }

    /// The highest value a majority has reached, this replica's (`own`)
    /// included, given what the others reported (`reported`, one value per
    /// replica, strangers not counted); `None` while fewer than a majority
    /// have reported. For heartbeat rounds: the latest round a majority
    /// acknowledged.
    pub(crate) fn majority_reached(
        &self,
        own: u64,
        reported: impl IntoIterator<Item = (ReplicaId, u64)>,
    ) -> Option<u64> {
        let mut values: Vec<u64> = std::iter::once(own)
            .chain(
                reported
                    .into_iter()
                    .filter(|&(r, _)| r != self.id && self.is_voter(r))
                    .map(|(_, v)| v),
            )
            .collect();
        if !self.is_voter(self.id) {
            values.remove(0);
        }
        values.sort_unstable_by(|a, b| b.cmp(a));
        values.get(self.majority() - 1).copied()
    }
}

/// What a leader knows of one follower, in its term.
#[derive(Clone, Debug, Default)]
pub(crate) struct Progress {
    /// The tick it last answered an accept or a heartbeat.
    pub(crate) last_ack: u64,
    /// Its chosen prefix, as it last reported it (learners too: a learner
    /// is promoted only once it has caught up).
    pub(crate) chosen: Slot,
    /// The latest heartbeat round it acknowledged, if any.
    pub(crate) round_acked: Option<u64>,
    /// It has answered this leader at all (a learner is promoted only
    /// once it has).
    pub(crate) answered: bool,
    /// It says it does not vote yet because it lost its state (or, a
    /// learner, started empty) and is rejoining.
    pub(crate) rejoining: bool,
    /// The heartbeat round of the answer `chosen` and `rejoining` were last
    /// taken from: an older answer, reordered behind a newer one, may
    /// predate a restart that emptied it, and is not believed over it.
    pub(crate) status_round: Option<u64>,
    /// Thrifty: the tick of the oldest accept sent to it at once that it
    /// has not answered yet.
    pub(crate) waiting_since: Option<u64>,
    /// Thrifty: slots not yet sent to it, sent at the next tick.
    pub(crate) deferred: Vec<Slot>,
}

/// A leader's [`Progress`] per follower, made when it takes office and
/// dropped with the rest of its state when it steps down.
#[derive(Debug)]
pub(crate) struct Tracker {
    followers: BTreeMap<ReplicaId, Progress>,
}

impl Tracker {
    /// A new leader's: every other voter counts as heard from `now`; the
    /// learners as not heard yet (a learner is promoted only once it has
    /// answered).
    pub(crate) fn new(quorum: &Quorum, now: u64) -> Tracker {
        let voters = quorum.others().into_iter().map(|o| (o, now));
        let learners = quorum.learners().into_iter().map(|o| (o, 0));
        let followers = voters
            .chain(learners)
            .map(|(o, last_ack)| {
                let p = Progress {
                    last_ack,
                    ..Progress::default()
                };
                (o, p)
            })
            .collect();
        Tracker { followers }
    }

    /// What we know of follower `r`.
    pub(crate) fn get(&self, r: ReplicaId) -> Option<&Progress> {
        self.followers.get(&r)
    }

    /// Follower `r`'s progress, to update.
    pub(crate) fn follower(&mut self, r: ReplicaId) -> &mut Progress {
        self.followers.entry(r).or_default()
    }

    /// Follower `r` answered at tick `now`.
    pub(crate) fn heard(&mut self, r: ReplicaId, now: u64) -> &mut Progress {
        let p = self.follower(r);
        p.last_ack = now;
        p
    }

    /// Every follower's progress, in id order.
    pub(crate) fn iter(&self) -> impl Iterator<Item = (ReplicaId, &Progress)> {
        self.followers.iter().map(|(&r, p)| (r, p))
    }

    /// Every follower's progress, in id order, to update.
    pub(crate) fn iter_mut(&mut self) -> impl Iterator<Item = (ReplicaId, &mut Progress)> {
        self.followers.iter_mut().map(|(&r, p)| (r, p))
    }

    /// Whether a majority (this replica included) answered within the
    /// last `window` ticks before `now`.
    pub(crate) fn majority_heard_within(&self, quorum: &Quorum, now: u64, window: u64) -> bool {
        let recent = self
            .iter()
            .filter(|(_, p)| p.last_ack + window >= now)
            .map(|(r, _)| r);
        quorum.is_majority(std::iter::once(quorum.id()).chain(recent))
    }

    /// The latest heartbeat round a majority acknowledged, this replica
    /// counting as in its latest round `own`.
    pub(crate) fn round_confirmed(&self, quorum: &Quorum, own: u64) -> Option<u64> {
        quorum.majority_reached(
            own,
            self.iter()
                .filter_map(|(r, p)| p.round_acked.map(|round| (r, round))),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn majorities_of_three_and_five() {
        let q = Quorum::new(1, vec![1, 2, 3]);
        assert!(!q.is_majority([1]));
        assert!(q.is_majority([1, 3]));
        assert!(!q.is_majority([1, 7]), "a stranger counts for nothing");
        assert_eq!(q.others_needed(), 1);
        let q = Quorum::new(2, vec![1, 2, 3, 4, 5]);
        assert!(!q.is_majority([2, 4]));
        assert!(q.is_majority([2, 4, 5]));
        assert_eq!(q.others(), vec![1, 3, 4, 5]);
        assert_eq!(q.others_needed(), 2);
        assert!(!q.all_others([1, 3, 4]));
        assert!(q.all_others([5, 4, 3, 1]));
    }

    #[test]
    fn the_value_a_majority_reached() {
        let q = Quorum::new(1, vec![1, 2, 3, 4, 5]);
        let mut acks = BTreeMap::new();
        assert_eq!(q.majority_reached(9, acks.clone()), None);
        acks.insert(2, 4);
        assert_eq!(q.majority_reached(9, acks.clone()), None);
        acks.insert(3, 7);
        assert_eq!(q.majority_reached(9, acks.clone()), Some(4));
        acks.insert(4, 8);
        assert_eq!(q.majority_reached(9, acks.clone()), Some(7));
        acks.insert(8, 9);
        assert_eq!(q.majority_reached(9, acks.clone()), Some(7), "not a member");
        assert_eq!(Quorum::new(1, vec![1]).majority_reached(3, acks), Some(3));
    }

    #[test]
    fn a_leader_tracks_who_answered_lately_and_which_rounds() {
        let q = Quorum::new(1, vec![1, 2, 3, 4, 5]);
        let mut t = Tracker::new(&q, 10);
        assert!(t.majority_heard_within(&q, 20, 10));
        assert!(!t.majority_heard_within(&q, 21, 10));
        t.heard(2, 21);
        assert!(!t.majority_heard_within(&q, 21, 10));
        t.heard(5, 21).round_acked = Some(3);
        assert!(t.majority_heard_within(&q, 21, 10));
        assert_eq!(t.round_confirmed(&q, 4), None);
        t.follower(2).round_acked = Some(2);
        assert_eq!(t.round_confirmed(&q, 4), Some(2));
    }
}
