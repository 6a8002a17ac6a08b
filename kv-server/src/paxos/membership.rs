//! Configuration changes in the core: what a stop sign is, what a replica
//! does when its chosen prefix passes one, and a leader's rules for
//! proposing one. The argument for why this is safe is in the parent
//! module's doc ("Membership: stop signs and epochs").

use kv_peer_api::{Ballot, Membership, Op, Promise, ReplicaId, Slot, Value, WriteRequest};
use rand::Rng;

use super::*;

/// A learner is promoted only if its chosen prefix is at most this many
/// slots behind the leader's.
pub const PROMOTE_LAG: Slot = 256;

/// A configuration of `ids`, every one a voter, in epoch 0, with no
/// addresses (for cores built without a replica file: tests, simulation).
pub(super) fn of_ids(ids: &[ReplicaId]) -> Membership {
    let mut ids = ids.to_vec();
    ids.sort_unstable();
    ids.dedup();
    Membership {
        epoch: 0,
        members: ids
            .into_iter()
            .map(|id| kv_peer_api::Member {
                id,
                client_addr: String::new(),
                peer_addr: String::new(),
                voter: true,
            })
            .collect(),
    }
}

/// The configuration after a slot holding `value`, if it changes the
/// configuration `cur` (the slot is then a stop sign). Every change in the
/// slot's batch is applied in order, as the state machine applies them.
pub fn stop_sign(cur: &Membership, value: &Value) -> Option<Membership> {
    let Value::Batch(batch) = value else {
        return None;
    };
    let mut next: Option<Membership> = None;
    for req in batch {
        let at = next.as_ref().unwrap_or(cur);
        if let Some(Ok(m)) = at.apply_op(&req.op) {
            next = Some(m);
        }
    }
    next
}

/// A leader that left the voters by a change it knows chosen, handing it
/// over. It may be the only replica that knows: the others accepted the
/// stop sign but had not heard it chosen when the leader stepped down.
/// Should it then be stopped (a removed replica is told it can be), the
/// others would still count the old configuration's quorums, which count
/// the stopped replica: with one more of the new voters down, a majority
/// of the new configuration would be up and still elect no one. So, until
/// a majority of the new voters say they know the change chosen (or for
/// [`HANDOFF_TICKS`] at most), it sends them heartbeats of the ballot it
/// led in: they promised that ballot, so they take its word that the stop
/// sign is chosen (or fetch it from here, having missed it), as from any
/// leader. It proposes nothing. The driver says a change is done only
/// once [`Paxos::change_known`] holds, so a replica is stopped only after
/// its handoff.
pub(super) struct Handoff {
    /// The stop sign's slot.
    at: Slot,
    /// The ballot this replica led in.
    ballot: Ballot,
    /// Its term's first slot (heartbeats carry it).
    term_start: Slot,
    /// It gives up at this tick.
    until: u64,
    /// When it last sent heartbeats.
    last_sent: u64,
}

/// How long a handoff lasts at most, in ticks: long enough for a few
/// fetches on a busy machine; a new voter that learns nothing in that time
/// learns from the next leader.
const HANDOFF_TICKS: u64 = 500;

/// Whether a write is a configuration change.
pub(super) fn is_reconfig(req: &WriteRequest) -> bool {
    matches!(req.op, Op::Reconfigure { .. })
}

impl Paxos {
    /// The configuration this replica's chosen prefix ends in.
    pub fn membership(&self) -> &Membership {
        &self.membership
    }

    /// Whether this replica is no longer a member (it was removed).
    pub fn removed(&self) -> bool {
        !self.membership.contains(self.cfg.id)
    }

    /// The epoch of the configuration the chosen prefix ends in.
    pub(super) fn epoch(&self) -> u64 {
        self.membership.epoch
    }

    /// Whether a majority of the voters (this replica counted if it votes)
    /// are known to have chosen every slot up to `at`: a change at `at` is
    /// then done, in that no later failure of a minority of the voters
    /// needs a replica it removed. The driver answers a change only then.
    pub fn change_known(&self, at: Slot) -> bool {
        let voters = self.membership.voters();
        let knows = voters
            .iter()
            .filter(|&&v| {
                if v == self.cfg.id {
                    self.chosen >= at
                } else {
                    self.peer_chosen.get(&v).is_some_and(|&c| c >= at)
                }
            })
            .count();
        knows * 2 > voters.len()
    }

    /// Whether this replica, removed as leader, is handing its change over
    /// (see `Handoff`).
    pub fn handing_over(&self) -> bool {
        self.handoff.is_some()
    }

    /// A tick of a handoff, if one runs: heartbeats to the voters not yet
    /// known to know the change, until a majority do.
    pub(super) fn hand_over(&mut self) {
        let Some(h) = &self.handoff else {
            return;
        };
        if self.change_known(h.at) || self.now >= h.until || self.votes() {
            tracing::info!(
                id = self.cfg.id,
                at = h.at,
                done = self.change_known(h.at),
                "configuration change handed over"
            );
            self.handoff = None;
            return;
        }
        if self.now < h.last_sent + u64::from(self.cfg.heartbeat_ticks) {
            return;
        }
        let hb = Heartbeat {
            from: self.cfg.id,
            ballot: h.ballot,
            chosen: h.at,
            round: 0,
            term_start: h.term_start,
        };
        let at = h.at;
        let to: Vec<ReplicaId> = self
            .membership
            .voters()
            .into_iter()
            .filter(|&v| v != self.cfg.id && self.peer_chosen.get(&v).is_none_or(|&c| c < at))
            .collect();
        for v in to {
            self.send(v, Msg::Heartbeat(hb.clone()));
        }
        if let Some(h) = &mut self.handoff {
            h.last_sent = self.now;
        }
    }

    /// At start: the configuration after every change in the chosen log
    /// after the snapshot at `snapshot`; entries accepted in an older
    /// epoch and not known chosen are dropped (void: see rule 3).
    pub(super) fn replay_membership(&mut self, snapshot: Slot) {
        let mut cur = self.membership.clone();
        for (_, e) in self
            .log
            .range(snapshot + 1..)
            .take_while(|(&s, _)| s <= self.chosen)
        {
            if let Some(next) = stop_sign(&cur, &e.value) {
                cur = next;
            }
        }
        self.enter(cur, self.chosen);
    }

    /// Takes `m` as the configuration that decides every slot after `at`
    /// (rule 3): every quorum from now on, entries after `at` accepted in
    /// an older epoch dropped (void), the promise raised to the epoch's
    /// floor, the driver told whom to talk to.
    fn enter(&mut self, m: Membership, at: Slot) {
        self.quorum = Quorum::of(self.cfg.id, &m);
        self.peer_chosen.retain(|&id, _| m.contains(id));
        self.membership = m;
        self.out.membership = Some(self.membership.clone());
        let epoch = self.epoch();
        self.log
            .retain(|&slot, e| slot <= at || e.ballot == Ballot::ZERO || e.ballot.epoch() >= epoch);
        self.promise(Ballot::epoch_floor(epoch));
        if self.removed() {
            tracing::warn!(
                id = self.cfg.id,
                epoch,
                at,
                "this replica was removed from the cluster (it is not in configuration \
                 epoch {epoch}, in force after slot {at}): it votes in nothing and serves no \
                 one; it can be stopped"
            );
        }
    }

    /// The chosen prefix passed a stop sign at `at` (or a snapshot of
    /// index `at` was installed): `next` decides every slot after `at`.
    /// Rule 3 of the parent module.
    pub(super) fn adopt(&mut self, next: Membership, at: Slot) {
        if next == self.membership {
            return;
        }
        tracing::info!(
            id = self.cfg.id,
            epoch = next.epoch,
            at,
            voters = ?next.voters(),
            learners = ?next.learners(),
            "configuration changed"
        );
        let led = self.promised;
        self.enter(next, at);
        let epoch = self.epoch();
        self.probes.clear();
        let me = self.cfg.id;
        match std::mem::replace(&mut self.role, Role::Follower) {
            Role::Leader(l) => {
                for r in l.read_index.waiting {
                    self.out.reads_failed.push((r.token, None));
                }
                if self.votes() {
                    // Phase 1 in the new epoch at once, to the new voters,
                    // keeping the queued writes for when it wins.
                    tracing::info!(id = me, epoch, "leading on into the new configuration");
                    self.start_election(Ballot::ZERO);
                    if let Role::Candidate(c) = &mut self.role {
                        c.carried = l.queue;
                        c.carried_bytes = l.queue_bytes;
                        c.carrying = true;
                    } else if let Some(nl) = self.lead() {
                        l.queue.into_iter().for_each(|req| nl.enqueue(req));
                    }
                } else {
                    tracing::info!(
                        id = me,
                        epoch,
                        "no longer a voter: stepping down as leader, handing the change over"
                    );
                    for req in l.queue {
                        self.out.dropped.push((req, None));
                    }
                    self.leader = None;
                    self.handoff = Some(Handoff {
                        at,
                        ballot: led,
                        term_start: l.term_start,
                        until: self.now + HANDOFF_TICKS,
                        last_sent: 0,
                    });
                    self.hand_over();
                }
            }
            Role::Candidate(c) => {
                for req in c.carried {
                    self.out.dropped.push((req, None));
                }
                self.leader = None;
            }
            Role::PreCandidate(_) | Role::Follower => {}
        }
        if !matches!(self.role, Role::Leader(_) | Role::Candidate(_))
            && self.leader.is_some_and(|l| !self.membership.is_voter(l))
        {
            // Our leader was removed or demoted: elect another soon,
            // without waiting out a full timeout.
            self.leader = None;
            let span = self
                .rng
                .random_range(1..=self.cfg.heartbeat_ticks.max(1) * 2);
            self.election_at = self.now + u64::from(span);
        }
    }

    /// A message from a replica that is not a member: a prepare is
    /// refused with our chosen prefix (a removed replica learns it is
    /// behind), a fetch is served (chosen values are facts); anything else
    /// is dropped. Nothing here changes.
    ///
    /// A leader's message in a later epoch than ours, from a replica we do
    /// not know as a member, means our configuration is behind (it was
    /// added since, and we were told of it as a learner): fetch the chosen
    /// log from a member we do know, to learn of it.
    pub(super) fn step_stranger(&mut self, msg: Msg) -> Option<Msg> {
        let ballot = match &msg {
            Msg::Heartbeat(m) => Some(m.ballot),
            Msg::Accept(m) => Some(m.ballot),
            Msg::Prepare(m) => Some(m.ballot),
            _ => None,
        };
        if ballot.is_some_and(|b| b.epoch() > self.epoch()) {
            let known: Vec<ReplicaId> = self
                .others()
                .into_iter()
                .chain(self.quorum.learners())
                .collect();
            if !known.is_empty() {
                let peer = known[self.rng.random_range(0..known.len())];
                self.request_fetch(peer);
            }
        }
        match msg {
            Msg::Prepare(m) => Some(Msg::Promise(Promise {
                from: self.cfg.id,
                ballot: Ballot::ZERO,
                ok: false,
                accepted: vec![],
                chosen: self.chosen,
                pre_vote: m.pre_vote,
                more: false,
            })),
            Msg::Fetch(m) => Some(Msg::FetchReply(self.on_fetch(m))),
            m => {
                tracing::debug!(
                    id = self.cfg.id,
                    from = m.from(),
                    "a message from a non-member, dropped"
                );
                None
            }
        }
    }

    /// Leader: readies a configuration change for the queue. Refused while
    /// another is queued or proposed and not yet chosen, or (promotion) if
    /// the learner has not caught up; else it is given our epoch, so that
    /// it changes the configuration it was checked against or nothing.
    pub(super) fn admit_reconfig(&self, req: &mut WriteRequest) -> Result<(), Refusal> {
        let Role::Leader(l) = &self.role else {
            return Ok(()); // refused as not leader by the caller
        };
        let Op::Reconfigure { epoch, change } = &mut req.op else {
            return Ok(());
        };
        if l.stop_at.is_some() || l.queue.iter().any(is_reconfig) {
            return Err(Refusal::Conflict(
                "another membership change is in progress; retry once it is done".into(),
            ));
        }
        if let kv_peer_api::MemberChange::Promote(id) = change {
            if self.membership.get(*id).is_some_and(|m| !m.voter) {
                let window = u64::from(self.cfg.election_ticks.1);
                let p = l.progress.get(*id);
                let heard = p.is_some_and(|p| p.answered && p.last_ack + window >= self.now);
                let chosen = p.map_or(0, |p| p.chosen);
                if !heard || p.is_some_and(|p| p.rejoining) || chosen + PROMOTE_LAG < self.chosen {
                    return Err(Refusal::Conflict(format!(
                        "replica {id} has not caught up yet (it knows {chosen} slots chosen, \
                         the leader {}{}); a learner votes only once it has: retry when it has",
                        self.chosen,
                        if heard {
                            ""
                        } else {
                            ", and it has not answered lately"
                        }
                    )));
                }
            }
        }
        if let kv_peer_api::MemberChange::Remove(gone) = change {
            // As etcd's strict reconfiguration check: refuse a removal
            // after which the voters left that answer this leader and may
            // vote are not a majority of the voters left. Chosen, such a
            // change would leave a cluster that cannot choose anything (not
            // even the change that would bring a replica back) until a
            // replica that is down or lost its disk returns.
            let window = u64::from(self.cfg.election_ticks.1);
            let left: Vec<ReplicaId> = self
                .membership
                .voters()
                .into_iter()
                .filter(|v| v != gone)
                .collect();
            if self.membership.get(*gone).is_some_and(|m| m.voter) && !left.is_empty() {
                let able: Vec<ReplicaId> = left
                    .iter()
                    .copied()
                    .filter(|&v| {
                        v == self.cfg.id
                            || l.progress
                                .get(v)
                                .is_some_and(|p| !p.rejoining && p.last_ack + window >= self.now)
                    })
                    .collect();
                let need = left.len() / 2 + 1;
                if able.len() < need {
                    let down: Vec<String> = left
                        .iter()
                        .filter(|v| !able.contains(v))
                        .map(|v| v.to_string())
                        .collect();
                    return Err(Refusal::Conflict(format!(
                        "removing replica {gone} would leave {} voters of which only {} \
                         answer this leader and may vote ({} do not: {}), fewer than the {need} \
                         a majority of them needs; the cluster could not go on. Bring those \
                         back (or let them catch up) first",
                        left.len(),
                        able.len(),
                        down.len(),
                        down.join(", ")
                    )));
                }
            }
        }
        *epoch = Some(self.epoch());
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use kv_peer_api::MemberChange;

    use super::*;
    use crate::paxos::testkit::*;

    fn change(seq: u64, change: MemberChange) -> WriteRequest {
        WriteRequest {
            client_id: 1,
            seq,
            acked_below: 0,
            op: Op::Reconfigure {
                epoch: None,
                change,
            },
        }
    }

    fn add(seq: u64, id: ReplicaId) -> WriteRequest {
        change(
            seq,
            MemberChange::Add {
                id,
                client_addr: format!("h:{id}"),
                peer_addr: format!("h:1{id}"),
            },
        )
    }

    fn leader_of(nodes: &[Paxos], up: &[bool]) -> usize {
        (0..nodes.len())
            .find(|&i| up[i] && nodes[i].is_leader())
            .expect("a leader")
    }

    /// Runs with the replicas not `up` down.
    fn run_up(nodes: &mut [Paxos], applied: &mut [Vec<(Slot, Value)>], up: &[bool], rounds: usize) {
        let up = up.to_vec();
        run_cut(nodes, applied, rounds, &|a, b| {
            !up[(a - 1) as usize] || !up[(b - 1) as usize]
        });
    }

    /// Every pair of replicas applied the same value in every slot both
    /// applied.
    fn agree(applied: &[Vec<(Slot, Value)>]) {
        let mut by_slot: BTreeMap<Slot, &Value> = BTreeMap::new();
        for a in applied {
            for (slot, v) in a {
                if let Some(other) = by_slot.insert(*slot, v) {
                    assert_eq!(other, v, "two values applied in slot {slot}");
                }
            }
        }
    }

    /// A replica joining with the configuration it was given (as
    /// `--join` gives it) and an empty log.
    fn joiner(id: ReplicaId, m: &Membership) -> Paxos {
        let cfg = Config::new(id, m.voters());
        Paxos::new(
            cfg,
            Durable {
                membership: Some(m.clone()),
                persist_seed: true,
                ..Durable::default()
            },
        )
    }

    /// Grows 3 -> 5 through learners, then removes the leader and a
    /// follower: writes keep being chosen, every replica applies the same
    /// log, and the removed ones know it.
    #[test]
    fn grows_through_learners_and_shrinks_removing_the_leader() {
        let mut nodes = cluster(5);
        // Replicas 4 and 5 are not started yet; 1-3 are the cluster.
        for (i, n) in nodes.iter_mut().enumerate().take(3) {
            *n = Paxos::new(Config::new(i as u64 + 1, vec![1, 2, 3]), Durable::default());
        }
        let mut up = vec![true, true, true, false, false];
        let mut applied = vec![Vec::new(); 5];
        run_up(&mut nodes, &mut applied, &up, 100);
        let mut seq = 0;
        let mut write = |nodes: &mut [Paxos], up: &[bool], applied: &mut [Vec<(Slot, Value)>]| {
            seq += 1;
            let l = leader_of(nodes, up);
            nodes[l].propose(put(seq)).unwrap();
            run_up(nodes, applied, up, 5);
            seq
        };
        write(&mut nodes, &up, &mut applied);
        for new in [4u64, 5] {
            let l = leader_of(&nodes, &up);
            nodes[l].propose(add(100 + new, new)).unwrap();
            // A second change while the first is in progress is refused.
            assert!(matches!(
                nodes[l].propose(change(200 + new, MemberChange::Remove(2))),
                Err(Refusal::Conflict(_))
            ));
            run_up(&mut nodes, &mut applied, &up, 20);
            let m = nodes[leader_of(&nodes, &up)].membership().clone();
            assert!(m.get(new).is_some_and(|m| !m.voter), "{m:?}");
            // Not caught up (not even started): promotion is refused.
            let l = leader_of(&nodes, &up);
            assert!(matches!(
                nodes[l].propose(change(300 + new, MemberChange::Promote(new))),
                Err(Refusal::Conflict(_))
            ));
            let i = (new - 1) as usize;
            nodes[i] = joiner(new, &m);
            up[i] = true;
            run_up(&mut nodes, &mut applied, &up, 100);
            write(&mut nodes, &up, &mut applied);
            let l = leader_of(&nodes, &up);
            nodes[l]
                .propose(change(400 + new, MemberChange::Promote(new)))
                .unwrap();
            run_up(&mut nodes, &mut applied, &up, 50);
            assert!(nodes[i].votes(), "replica {new} votes once promoted");
        }
        let l = leader_of(&nodes, &up);
        assert_eq!(nodes[l].membership().voters(), vec![1, 2, 3, 4, 5]);
        // Remove the leader, then another.
        let old = nodes[l].id();
        nodes[l]
            .propose(change(500, MemberChange::Remove(old)))
            .unwrap();
        run_up(&mut nodes, &mut applied, &up, 100);
        assert!(nodes[l].removed() && !nodes[l].is_leader());
        let l = leader_of(&nodes, &up);
        assert_ne!(nodes[l].id(), old);
        let w = write(&mut nodes, &up, &mut applied);
        let other = (1..=5).find(|&r| r != old && r != nodes[l].id()).unwrap();
        nodes[l]
            .propose(change(501, MemberChange::Remove(other)))
            .unwrap();
        run_up(&mut nodes, &mut applied, &up, 100);
        let l = leader_of(&nodes, &up);
        assert_eq!(nodes[l].membership().voters().len(), 3);
        let w2 = write(&mut nodes, &up, &mut applied);
        run_up(&mut nodes, &mut applied, &up, 20);
        agree(&applied);
        for v in nodes[l].membership().voters() {
            let got = commands(&applied[(v - 1) as usize]);
            assert!(
                got.contains(&w) && got.contains(&w2),
                "replica {v}: {got:?}"
            );
        }
    }

    /// A leader that removes itself may be the only replica that knows the
    /// change chosen: the others accepted it but never heard so. It tells
    /// them before it says the change is done ([`Paxos::change_known`]);
    /// once it is stopped (as a removed replica is), a majority of the new
    /// voters elects a leader even with one of them down, though that is
    /// no majority of the old configuration.
    #[test]
    fn a_removed_leader_hands_over_before_it_is_stopped() {
        let mut nodes = cluster(4);
        let mut applied = vec![Vec::new(); 4];
        let l = elected(&mut nodes, &mut applied);
        let old = nodes[l].id();
        nodes[l]
            .propose(change(500, MemberChange::Remove(old)))
            .unwrap();
        // The accepts go out and their answers come back; nothing else.
        let accepts = nodes[l].ready().messages;
        for (to, m) in accepts {
            let i = (to - 1) as usize;
            let reply = nodes[i].step(m);
            let _ = nodes[i].ready();
            if let Some(reply) = reply {
                nodes[l].step(reply);
            }
        }
        assert!(nodes[l].removed(), "the leader knows the change chosen");
        let at = nodes[l].chosen();
        for (i, n) in nodes.iter().enumerate() {
            if i != l {
                assert!(n.chosen() < at, "replica {} does not know it yet", n.id());
            }
        }
        assert!(!nodes[l].change_known(at));
        // It runs until it may say the change is done, then is stopped.
        let mut up = vec![true; 4];
        for _ in 0..50 {
            if nodes[l].change_known(at) {
                break;
            }
            run_up(&mut nodes, &mut applied, &up, 1);
        }
        assert!(nodes[l].change_known(at), "handed over");
        up[l] = false;
        // And one of the three left goes down too.
        let f = (0..4).find(|&i| i != l).unwrap();
        up[f] = false;
        run_up(&mut nodes, &mut applied, &up, 300);
        let n = leader_of(&nodes, &up);
        assert_eq!(nodes[n].membership().voters().len(), 3);
        nodes[n].propose(put(9)).unwrap();
        run_up(&mut nodes, &mut applied, &up, 20);
        assert!(commands(&applied[n]).contains(&9));
        agree(&applied);
    }

    /// Writes a leader had queued when its configuration changed are
    /// proposed once it leads in the new one, not dropped.
    #[test]
    fn a_leader_keeps_its_queue_across_a_change() {
        let mut nodes = cluster(4);
        nodes[3] = Paxos::new(Config::new(4, vec![1, 2, 3]), Durable::default());
        for (i, n) in nodes.iter_mut().enumerate().take(3) {
            *n = Paxos::new(Config::new(i as u64 + 1, vec![1, 2, 3]), Durable::default());
        }
        let up = [true, true, true, false];
        let mut applied = vec![Vec::new(); 4];
        run_up(&mut nodes, &mut applied, &up, 100);
        let l = leader_of(&nodes, &up);
        nodes[l].propose(add(50, 4)).unwrap();
        for seq in 1..=5 {
            nodes[l].propose(put(seq)).unwrap();
        }
        run_up(&mut nodes, &mut applied, &up, 30);
        assert_eq!(nodes[l].membership().epoch, 1);
        let got = commands(&applied[l]);
        for seq in 1..=5 {
            assert!(got.contains(&seq), "{got:?}");
        }
        let r = nodes[l].ready();
        assert!(r.dropped.is_empty(), "{:?}", r.dropped);
        agree(&applied);
    }

    /// A replica removed while it was down learns of it when it comes
    /// back: it never votes again and says it was removed.
    #[test]
    fn a_replica_removed_while_down_finds_out() {
        let mut nodes = cluster(5);
        let mut applied = vec![Vec::new(); 5];
        run(&mut nodes, &mut applied, 100);
        let mut up = vec![true; 5];
        let l = leader_of(&nodes, &up);
        let gone = (l + 2) % 5;
        up[gone] = false;
        nodes[l]
            .propose(change(1, MemberChange::Remove(gone as u64 + 1)))
            .unwrap();
        run_up(&mut nodes, &mut applied, &up, 50);
        assert!(!nodes[l].membership().contains(gone as u64 + 1));
        assert!(!nodes[gone].removed(), "it was down");
        up[gone] = true;
        run_up(&mut nodes, &mut applied, &up, 200);
        assert!(nodes[gone].removed(), "it found out");
        assert!(!nodes[gone].votes());
        agree(&applied);
    }

    /// A removal after which the voters left that answer the leader are
    /// not a majority of them is refused, naming the silent ones; once
    /// they are back it goes through.
    #[test]
    fn a_learner_is_judged_by_its_newest_answer_not_a_reordered_older_one() {
        // Replica 4 is down: the leader hears only the answers below.
        let mut nodes = cluster(4);
        for (i, n) in nodes.iter_mut().enumerate().take(3) {
            *n = Paxos::new(Config::new(i as u64 + 1, vec![1, 2, 3]), Durable::default());
        }
        let up = vec![true, true, true, false];
        let mut applied = vec![Vec::new(); 4];
        run_up(&mut nodes, &mut applied, &up, 100);
        let l = leader_of(&nodes, &up);
        nodes[l].propose(add(1, 4)).unwrap();
        run_up(&mut nodes, &mut applied, &up, 50);
        let l = leader_of(&nodes, &up);
        let m = nodes[l].membership().clone();
        assert!(m.contains(4) && !m.is_voter(4), "{m:?}");
        let ack = |round, chosen, unsure| {
            Msg::HeartbeatAck(HeartbeatAck {
                from: 4,
                ballot: Ballot::ZERO,
                ok: true,
                round,
                chosen,
                rejoin_floor: None,
                unsure,
            })
        };
        let chosen = nodes[l].chosen();
        // Caught up at round 10; then it restarts empty and says so at
        // round 12; its answer of round 11 (from before) arrives last.
        nodes[l].step(ack(10, chosen, false));
        nodes[l].step(ack(12, 0, true));
        nodes[l].step(ack(11, chosen, false));
        match nodes[l].propose(change(2, MemberChange::Promote(4))) {
            Err(Refusal::Conflict(why)) => assert!(why.contains("not caught up"), "{why}"),
            other => panic!("promoted on a stale answer: {other:?}"),
        }
        // Its next answer says it caught up again: now it may vote.
        nodes[l].step(ack(13, chosen, false));
        nodes[l]
            .propose(change(3, MemberChange::Promote(4)))
            .unwrap();
    }

    #[test]
    fn a_removal_that_would_leave_no_working_majority_is_refused() {
        let mut nodes = cluster(5);
        let mut applied = vec![Vec::new(); 5];
        run(&mut nodes, &mut applied, 100);
        let mut up = vec![true; 5];
        let l = leader_of(&nodes, &up);
        // Two of the others down for longer than an election window.
        let down: Vec<usize> = (0..5).filter(|&i| i != l).take(2).collect();
        for &i in &down {
            up[i] = false;
        }
        run_up(&mut nodes, &mut applied, &up, 200);
        let l = leader_of(&nodes, &up);
        let healthy = (0..5).find(|&i| i != l && up[i]).expect("a third one up");
        // 5 voters, 2 down: removing a healthy one leaves 4, of which 2
        // answer; a majority of 4 is 3.
        match nodes[l].propose(change(1, MemberChange::Remove(healthy as u64 + 1))) {
            Err(Refusal::Conflict(why)) => {
                for &i in &down {
                    assert!(why.contains(&(i as u64 + 1).to_string()), "{why}");
                }
            }
            other => panic!("removal admitted: {other:?}"),
        }
        // Removing one that is down leaves 4 of which 3 answer: fine.
        nodes[l]
            .propose(change(2, MemberChange::Remove(down[0] as u64 + 1)))
            .unwrap();
        run_up(&mut nodes, &mut applied, &up, 50);
        // The other comes back: now the healthy one may go too.
        up[down[1]] = true;
        run_up(&mut nodes, &mut applied, &up, 100);
        let l = leader_of(&nodes, &up);
        nodes[l]
            .propose(change(3, MemberChange::Remove(healthy as u64 + 1)))
            .unwrap();
        run_up(&mut nodes, &mut applied, &up, 50);
        assert_eq!(nodes[leader_of(&nodes, &up)].membership().voters().len(), 3);
        agree(&applied);
    }
}
