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
//! Today the voters are the members the core was built with
//! ([`super::Config::members`]), fixed for its lifetime, and a majority is
//! more than half of them. Membership changes will make the configuration
//! a value chosen through the log; this is the one place that learns it.
//!
//! Answers from replicas that are not members are counted for nothing (a
//! set that holds a stranger does not grow towards a majority); the core
//! also drops their messages on arrival ([`super::Paxos::step`]).

use std::collections::BTreeMap;

use kv_peer_api::ReplicaId;

/// The voters of this replica's cluster and what makes a majority of them.
#[derive(Clone, Debug)]
pub(crate) struct Quorum {
    /// This replica.
    id: ReplicaId,
    /// Every voter, this replica included, in the configured order (the
    /// order messages are broadcast in).
    members: Vec<ReplicaId>,
}

impl Quorum {
    /// The voters `members` (this replica, `id`, among them).
    pub(crate) fn new(id: ReplicaId, members: Vec<ReplicaId>) -> Quorum {
        Quorum { id, members }
    }

    /// Whether `r` is a member.
    pub(crate) fn is_member(&self, r: ReplicaId) -> bool {
        self.members.contains(&r)
    }

    /// Every member but this replica, in the configured order.
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
        let members = voters.into_iter().filter(|&r| self.is_member(r)).count();
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
    /// included, given what the others reported (`reported`, strangers
    /// not counted); `None` while fewer than a majority have reported.
    /// For heartbeat rounds: the latest round a majority acknowledged.
    pub(crate) fn majority_reached(
        &self,
        own: u64,
        reported: &BTreeMap<ReplicaId, u64>,
    ) -> Option<u64> {
        let mut values: Vec<u64> = std::iter::once(own)
            .chain(
                reported
                    .iter()
                    .filter(|&(&r, _)| r != self.id && self.is_member(r))
                    .map(|(_, &v)| v),
            )
            .collect();
        values.sort_unstable_by(|a, b| b.cmp(a));
        values.get(self.majority() - 1).copied()
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
        assert_eq!(q.majority_reached(9, &acks), None);
        acks.insert(2, 4);
        assert_eq!(q.majority_reached(9, &acks), None);
        acks.insert(3, 7);
        assert_eq!(q.majority_reached(9, &acks), Some(4));
        acks.insert(4, 8);
        assert_eq!(q.majority_reached(9, &acks), Some(7));
        acks.insert(8, 9);
        assert_eq!(q.majority_reached(9, &acks), Some(7), "not a member");
        assert_eq!(Quorum::new(1, vec![1]).majority_reached(3, &acks), Some(3));
    }
}
