//! The leader (proposer): phase 2 for its ballot, with batching (many
//! commands per slot), pipelining (several slots in flight, bounded in
//! count and bytes), thrifty targeting (a new accept goes at once only to
//! as many followers as a majority needs), retransmission with backoff,
//! and the check that it still hears a majority.
//!
//! Everything only a leader holds lives in [`Leader`], inside
//! `Role::Leader`: stepping down drops it, and hands the proposals still
//! queued and the reads still waiting back to the driver, refused.

use std::collections::{BTreeMap, HashSet, VecDeque};

use kv_peer_api::{Accept, Accepted, Ballot, ReplicaId, Slot, Value, WriteRequest};

use super::quorum::Tracker;
use super::read_index::ReadIndex;
use super::*;

/// What only a leader holds: dropped when it steps down.
#[derive(Debug)]
pub(super) struct Leader {
    /// The next slot to propose in.
    pub(super) next_slot: Slot,
    /// The last slot this leader re-proposed when it was elected.
    pub(super) term_start: Slot,
    /// Slots proposed and not yet chosen.
    pub(super) pending: BTreeMap<Slot, Pending>,
    /// Proposals waiting for a slot.
    pub(super) queue: VecDeque<WriteRequest>,
    pub(super) queue_bytes: usize,
    /// A time entry to propose (see [`Paxos::propose_time`]).
    pub(super) time: Option<u64>,
    /// The tick the last heartbeat round started.
    pub(super) last_heartbeat: u64,
    /// What it knows of each follower: when it last answered, the
    /// heartbeat round it acknowledged, thrifty bookkeeping.
    pub(super) progress: Tracker,
    /// Followers in the order a thrifty leader prefers them.
    pub(super) preferred: Vec<ReplicaId>,
    /// Linearizable reads: heartbeat rounds confirmed, reads waiting.
    pub(super) read_index: ReadIndex,
    /// The slot of the configuration change this leader proposed (or
    /// re-proposed): it proposes nothing after it (rule 2 of the module
    /// doc), and its term ends once it is chosen.
    pub(super) stop_at: Option<Slot>,
}

impl Leader {
    /// Queues a proposal (its bytes counted).
    pub(super) fn enqueue(&mut self, req: WriteRequest) {
        self.queue_bytes += request_bytes(&req);
        self.queue.push_back(req);
    }

    /// Whether another slot may start.
    pub(super) fn room_in_flight(&self, cfg: &Config) -> bool {
        let bytes: usize = self.pending.values().map(|p| p.bytes).sum();
        self.pending.len() < cfg.max_inflight
            && (self.pending.is_empty() || bytes < cfg.max_inflight_bytes)
    }
}

/// A slot a leader proposed and awaits a majority for.
#[derive(Debug)]
pub(super) struct Pending {
    acks: HashSet<ReplicaId>,
    sent_tick: u64,
    /// Times re-sent.
    resent: u32,
    bytes: usize,
}

impl Paxos {
    /// Takes office after winning phase 1 at a majority: re-proposes, under
    /// our ballot, `best` (per slot after our chosen prefix up to `last`, the
    /// value to finish: known chosen, else of the highest ballot accepted)
    /// and fills the holes with no-ops.
    pub(super) fn become_leader(
        &mut self,
        mut best: BTreeMap<Slot, (bool, Ballot, Value)>,
        last: Slot,
        carried: VecDeque<WriteRequest>,
    ) {
        let others = self.others();
        // Prefer the followers after us in id order: leaders elected in turn
        // spread the load of being a target.
        let split = others.partition_point(|&o| o < self.cfg.id);
        let preferred = others[split..]
            .iter()
            .chain(&others[..split])
            .copied()
            .collect();
        self.role = Role::Leader(Box::new(Leader {
            next_slot: last + 1,
            term_start: last,
            pending: BTreeMap::new(),
            queue: VecDeque::new(),
            queue_bytes: 0,
            time: None,
            last_heartbeat: 0,
            progress: Tracker::new(&self.quorum, self.now),
            preferred,
            read_index: ReadIndex::new(self.hb_round),
            stop_at: None,
        }));
        self.leader = Some(self.cfg.id);
        let mut entries = Vec::new();
        for slot in self.chosen + 1..=last {
            let value = match best.remove(&slot) {
                Some((_, _, v)) => v,
                None => Value::Noop,
            };
            // Every slot before this one holds no change (we stop at the
            // first), so ours is the configuration it is proposed in.
            let stop = membership::stop_sign(&self.membership, &value).is_some();
            entries.push(self.propose_slot(slot, value));
            if stop {
                // Re-propose up to a configuration change, nothing after
                // it (rule 2): what lies beyond was accepted in this epoch
                // and is void once the change is chosen.
                if let Some(l) = self.lead() {
                    l.stop_at = Some(slot);
                    l.next_slot = slot + 1;
                    l.term_start = slot;
                }
                break;
            }
        }
        if let Some(l) = self.lead() {
            carried.into_iter().for_each(|req| l.enqueue(req));
        }
        // What a new leader re-proposes goes to everyone: it finishes what
        // an earlier leader left, whoever holds it.
        self.broadcast_accepts(entries);
        self.start_heartbeat_round();
        self.advance_chosen();
    }

    /// Leader: gives the clock reading and the queued proposals slots, as
    /// many as flow control lets be in flight, and sends them.
    pub(super) fn propose_queued(&mut self) {
        let mut entries = Vec::new();
        if let Role::Leader(l) = &mut self.role {
            if l.room_in_flight(&self.cfg) && l.stop_at.is_none() {
                if let Some(ms) = l.time.take() {
                    let slot = l.next_slot;
                    l.next_slot += 1;
                    entries.push(self.propose_slot(slot, Value::Time(ms)));
                }
            }
        }
        while let Role::Leader(l) = &mut self.role {
            if l.queue.is_empty() || !l.room_in_flight(&self.cfg) || l.stop_at.is_some() {
                break;
            }
            let mut budget = Budget::new(self.cfg.max_batch, self.cfg.max_batch_bytes);
            // A configuration change gets a slot of its own (rule 2).
            let n = if l.queue.front().is_some_and(membership::is_reconfig) {
                budget.take(request_bytes(&l.queue[0]));
                1
            } else {
                l.queue
                    .iter()
                    .take_while(|r| !membership::is_reconfig(r) && budget.take(request_bytes(r)))
                    .count()
            };
            l.queue_bytes = l.queue_bytes.saturating_sub(budget.bytes);
            let batch: Vec<WriteRequest> = l.queue.drain(..n).collect();
            let slot = l.next_slot;
            l.next_slot += 1;
            let value = Value::Batch(batch);
            if membership::stop_sign(&self.membership, &value).is_some() {
                l.stop_at = Some(slot);
            }
            entries.push(self.propose_slot(slot, value));
        }
        if !entries.is_empty() {
            self.send_accepts(entries);
            self.advance_chosen();
        }
    }

    /// The leader's state, if this replica leads.
    pub(super) fn lead(&mut self) -> Option<&mut Leader> {
        match &mut self.role {
            Role::Leader(l) => Some(l),
            _ => None,
        }
    }

    /// Leader: assigns `value` to `slot` under our ballot, accepting it
    /// ourselves. Returns the entry to send.
    pub(super) fn propose_slot(&mut self, slot: Slot, value: Value) -> (Slot, Value) {
        let ballot = self.promised;
        self.log.insert(
            slot,
            Entry {
                ballot,
                value: value.clone(),
                chosen: false,
            },
        );
        self.out.persist.push(Record::Accepted {
            slot,
            ballot,
            value: value.clone(),
        });
        let mut acks = HashSet::new();
        acks.insert(self.cfg.id);
        let now = self.now;
        if let Some(l) = self.lead() {
            l.pending.insert(
                slot,
                Pending {
                    acks,
                    sent_tick: now,
                    resent: 0,
                    bytes: value_bytes(&value),
                },
            );
        }
        self.check_chosen(slot);
        (slot, value)
    }

    /// `entries` as accept messages of at most `max_entries_per_message`
    /// entries and `max_message_bytes` bytes each.
    pub(super) fn accept_messages(&self, entries: &[(Slot, Value)]) -> Vec<Msg> {
        accept_messages(&self.cfg, self.promised, self.chosen, entries)
    }

    pub(super) fn broadcast_accepts(&mut self, entries: Vec<(Slot, Value)>) {
        for msg in self.accept_messages(&entries) {
            self.broadcast(msg);
        }
    }

    /// Sends newly proposed `entries`: to every follower, or (thrifty) at
    /// once only to the `quorum - 1` preferred followers that answered
    /// lately, deferring the others to the next tick.
    ///
    /// Why: on a small machine every follower woken by an accept costs a
    /// thread switch and a sync, and a majority is all a slot needs. With a
    /// single client, measured on the project machine, waking two followers
    /// per put instead of four cut the put latency by about a third (see
    /// README, Performance). Safety does not depend on who receives an
    /// accept; liveness does not suffer either, because deferred accepts go
    /// out within a tick and a target that does not answer in time loses
    /// its place ([`Paxos::demote_slow_targets`]).
    pub(super) fn send_accepts(&mut self, entries: Vec<(Slot, Value)>) {
        let Some(targets) = self.thrifty_targets() else {
            return self.broadcast_accepts(entries);
        };
        let others = self.others();
        let msgs = self.accept_messages(&entries);
        let now = self.now;
        if let Some(l) = self.lead() {
            for &t in &targets {
                l.progress.follower(t).waiting_since.get_or_insert(now);
            }
            for o in others {
                if !targets.contains(&o) {
                    let d = &mut l.progress.follower(o).deferred;
                    d.extend(entries.iter().map(|(slot, _)| *slot));
                }
            }
        }
        for msg in msgs {
            for &to in &targets {
                self.send(to, msg.clone());
            }
        }
    }

    /// The followers a thrifty leader sends new accepts to at once: the
    /// first `quorum - 1` preferred ones that answered within the last two
    /// heartbeat intervals. `None`: send to every follower (not thrifty, or
    /// too few answer).
    pub(super) fn thrifty_targets(&self) -> Option<Vec<ReplicaId>> {
        let Role::Leader(l) = &self.role else {
            return None;
        };
        if !self.cfg.thrifty {
            return None;
        }
        let need = self.quorum.others_needed();
        let fresh = u64::from(self.cfg.heartbeat_ticks) * 2;
        let targets: Vec<ReplicaId> = l
            .preferred
            .iter()
            .copied()
            .filter(|&o| {
                l.progress
                    .get(o)
                    .is_some_and(|p| p.last_ack + fresh >= self.now)
            })
            .take(need)
            .collect();
        (targets.len() == need && need < l.preferred.len()).then_some(targets)
    }

    /// A target that has answered nothing for a full tick since it was sent
    /// an accept goes to the back of the preference order (the accept itself
    /// reaches the others through [`Paxos::send_deferred`]).
    pub(super) fn demote_slow_targets(&mut self) {
        let now = self.now;
        let id = self.cfg.id;
        let Some(l) = self.lead() else {
            return;
        };
        let slow: Vec<ReplicaId> = l
            .progress
            .iter()
            .filter(|(_, p)| p.waiting_since.is_some_and(|since| since + 1 < now))
            .map(|(t, _)| t)
            .collect();
        if slow.is_empty() {
            return;
        }
        tracing::debug!(
            id,
            ?slow,
            "thrifty: followers slow to accept lose their place"
        );
        for &t in &slow {
            l.progress.follower(t).waiting_since = None;
        }
        l.preferred.retain(|o| !slow.contains(o));
        l.preferred.extend(slow);
    }

    /// Sends every follower the accepts deferred for it since the last tick,
    /// batched. Slots chosen since are sent all the same: the follower then
    /// holds them without fetching.
    pub(super) fn send_deferred(&mut self) {
        let Some(l) = self.lead() else {
            return;
        };
        let deferred: Vec<(ReplicaId, Vec<Slot>)> = l
            .progress
            .iter_mut()
            .filter(|(_, p)| !p.deferred.is_empty())
            .map(|(r, p)| (r, std::mem::take(&mut p.deferred)))
            .collect();
        for (to, slots) in deferred {
            let entries: Vec<(Slot, Value)> = slots
                .into_iter()
                .filter_map(|slot| self.log.get(&slot).map(|e| (slot, e.value.clone())))
                .collect();
            for msg in self.accept_messages(&entries) {
                self.send(to, msg);
            }
        }
    }

    /// Re-sends accepts a majority has not answered, each slot after
    /// `retransmit_ticks`, then twice, four and eight times as long: a
    /// cluster slow because it is overloaded (large values, a busy
    /// machine) must not be sent everything again every few hundred
    /// milliseconds, or it never catches up.
    pub(super) fn retransmit(&mut self) {
        let mut per_peer: BTreeMap<ReplicaId, Vec<(Slot, Value)>> = BTreeMap::new();
        let others = self.others();
        let base = u64::from(self.cfg.retransmit_ticks);
        let Role::Leader(l) = &mut self.role else {
            return;
        };
        for (&slot, p) in l.pending.iter_mut() {
            if self.now < p.sent_tick + (base << p.resent.min(3)) {
                continue;
            }
            p.sent_tick = self.now;
            p.resent += 1;
            let Some(e) = self.log.get(&slot) else {
                continue;
            };
            for &o in &others {
                if !p.acks.contains(&o) {
                    per_peer.entry(o).or_default().push((slot, e.value.clone()));
                }
            }
        }
        for (to, entries) in per_peer {
            for msg in self.accept_messages(&entries) {
                self.send(to, msg);
            }
        }
    }

    /// An answer from `from` to a leader's message: a refusal makes this
    /// replica observe the higher ballot it carries; an acceptance of its
    /// current ballot, while it still leads, marks `from` heard now and
    /// gives `from`'s progress. `None` for anything else (stale answers).
    pub(super) fn leader_heard(
        &mut self,
        from: ReplicaId,
        ok: bool,
        ballot: Ballot,
    ) -> Option<&mut super::quorum::Progress> {
        if !ok {
            self.observe_higher(ballot);
            return None;
        }
        if ballot != self.promised {
            return None;
        }
        let now = self.now;
        Some(self.lead()?.progress.heard(from, now))
    }

    pub(super) fn on_accepted(&mut self, m: Accepted) {
        let Some(p) = self.leader_heard(m.from, m.ok, m.ballot) else {
            return;
        };
        p.waiting_since = None;
        for slot in m.slots {
            let Some(l) = self.lead() else {
                break;
            };
            if let Some(p) = l.pending.get_mut(&slot) {
                p.acks.insert(m.from);
                self.check_chosen(slot);
            }
        }
        self.advance_chosen();
    }

    pub(super) fn check_chosen(&mut self, slot: Slot) {
        let Role::Leader(l) = &mut self.role else {
            return;
        };
        let Some(p) = l.pending.get(&slot) else {
            return;
        };
        if self.quorum.is_majority(p.acks.iter().copied()) {
            l.pending.remove(&slot);
            if let Some(e) = self.log.get_mut(&slot) {
                e.chosen = true;
            }
        }
    }

    /// A leader that has not heard from a majority for an election timeout
    /// steps down, so clients stuck with a cut-off leader are told to go
    /// elsewhere instead of waiting.
    pub(super) fn check_quorum(&mut self) {
        let window = u64::from(self.cfg.election_ticks.1);
        if !self.cfg.check_quorum || self.now < window {
            return;
        }
        let Role::Leader(l) = &self.role else {
            return;
        };
        if !l
            .progress
            .majority_heard_within(&self.quorum, self.now, window)
        {
            tracing::warn!(
                id = self.cfg.id,
                "lost contact with a majority; stepping down"
            );
            self.step_down(None);
            self.reset_election_timer();
        }
    }

    /// Offers a client write, refused if this replica does not lead or
    /// its queue is full (by count or bytes).
    pub fn propose(&mut self, mut req: WriteRequest) -> Result<(), Refusal> {
        if membership::is_reconfig(&req) {
            self.admit_reconfig(&mut req)?;
        }
        let bytes = request_bytes(&req);
        let full = |len: usize, held: usize| {
            len >= self.cfg.max_queue || (len > 0 && held + bytes > self.cfg.max_queue_bytes)
        };
        match &mut self.role {
            Role::Leader(l) => {
                if full(l.queue.len(), l.queue_bytes) {
                    return Err(Refusal::Busy);
                }
                l.enqueue(req);
                Ok(())
            }
            // A leader running phase 1 again in a new configuration keeps
            // taking writes for when it wins, within the same bounds.
            Role::Candidate(c) if c.carrying && !membership::is_reconfig(&req) => {
                if full(c.carried.len(), c.carried_bytes) {
                    return Err(Refusal::Busy);
                }
                c.carried_bytes += bytes;
                c.carried.push_back(req);
                Ok(())
            }
            _ => Err(Refusal::NotLeader(
                self.leader.filter(|&l| l != self.cfg.id),
            )),
        }
    }

    /// Proposals queued at a leader, waiting for a slot.
    pub fn queued(&self) -> usize {
        match &self.role {
            Role::Leader(l) => l.queue.len(),
            _ => 0,
        }
    }

    /// Keeps only the queued proposals (not yet in a slot) for which `keep`
    /// holds; returns how many were dropped.
    pub fn retain_queued(&mut self, mut keep: impl FnMut(&WriteRequest) -> bool) -> usize {
        let Some(l) = self.lead() else {
            return 0;
        };
        let before = l.queue.len();
        let mut bytes = 0;
        l.queue.retain(|r| {
            let k = keep(r);
            if k {
                bytes += request_bytes(r);
            }
            k
        });
        l.queue_bytes = bytes;
        before - l.queue.len()
    }

    /// Offers the log's clock a reading (`Value::Time`), proposed in a slot
    /// of its own ahead of queued writes. `false` if this replica does not
    /// lead. A reading not yet proposed is replaced by a newer one.
    pub fn propose_time(&mut self, unix_ms: u64) -> bool {
        let Some(l) = self.lead() else {
            return false;
        };
        l.time = Some(unix_ms);
        true
    }
}

/// `entries` as accept messages of ballot `ballot` (with our chosen prefix
/// `chosen`), of at most `max_entries_per_message` entries and
/// `max_message_bytes` bytes each.
pub(super) fn accept_messages(
    cfg: &Config,
    ballot: Ballot,
    chosen: Slot,
    entries: &[(Slot, Value)],
) -> Vec<Msg> {
    chunks(
        entries,
        cfg.max_entries_per_message,
        cfg.max_message_bytes,
        |(_, v)| value_bytes(v),
    )
    .into_iter()
    .map(|chunk| {
        Msg::Accept(Accept {
            from: cfg.id,
            ballot,
            entries: chunk.to_vec(),
            chosen,
        })
    })
    .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::paxos::testkit::*;

    impl Paxos {
        /// The leader's state (this replica must lead).
        fn leading(&self) -> &Leader {
            match &self.role {
                Role::Leader(l) => l,
                _ => panic!("replica {} does not lead", self.cfg.id),
            }
        }
    }

    /// A 5-replica cluster whose leader (returned) has just proposed one
    /// write; the followers its accepts went to at once, and its messages.
    fn one_proposal(thrifty: bool) -> (Vec<Paxos>, usize, Vec<ReplicaId>, Ready) {
        let mut nodes = cluster(5);
        for n in nodes.iter_mut() {
            n.cfg.thrifty = thrifty;
        }
        let mut applied = vec![Vec::new(); 5];
        let l = elected(&mut nodes, &mut applied);
        let _ = nodes[l].ready();
        nodes[l].propose(put(1)).unwrap();
        let r = nodes[l].ready();
        let first = accept_targets(&r.messages);
        (nodes, l, first, r)
    }

    #[test]
    fn thrifty_leader_sends_to_a_majority_at_once_and_to_the_rest_at_the_tick() {
        let (mut nodes, l, first, _) = one_proposal(true);
        assert_eq!(
            first.len(),
            2,
            "two followers make a majority with the leader"
        );
        // The other two get it, batched, at the next tick.
        nodes[l].tick();
        let r = nodes[l].ready();
        let rest = accept_targets(&r.messages);
        assert_eq!(rest.len(), 2, "{rest:?}");
        assert!(
            rest.iter().all(|t| !first.contains(t)),
            "{first:?} {rest:?}"
        );

        // Not thrifty: everyone at once.
        let (_, _, all, _) = one_proposal(false);
        assert_eq!(all.len(), 4);
    }

    #[test]
    fn a_target_that_does_not_answer_loses_its_place_and_the_write_is_still_chosen() {
        let (mut nodes, l, first, r) = one_proposal(true);
        // The first target is gone: its accept and everything after is lost.
        let gone = first[0];
        let deliver = |nodes: &mut [Paxos], msgs: Vec<(ReplicaId, Msg)>| {
            let mut inflight: VecDeque<(ReplicaId, ReplicaId, Msg)> = msgs
                .into_iter()
                .map(|(to, m)| (nodes[l].id(), to, m))
                .collect();
            while let Some((from, to, m)) = inflight.pop_front() {
                if to == gone || from == gone {
                    continue;
                }
                let idx = (to - 1) as usize;
                let reply = nodes[idx].step(m);
                let r = nodes[idx].ready();
                for (t, m) in r.messages {
                    inflight.push_back((to, t, m));
                }
                if let Some(reply) = reply {
                    inflight.push_back((to, from, reply));
                }
            }
        };
        deliver(&mut nodes, r.messages);
        assert!(
            !nodes[l].leading().pending.is_empty(),
            "one answer is not a majority"
        );
        // Ticks: the deferred accepts reach the other two, which answer.
        for _ in 0..3 {
            nodes[l].tick();
            let r = nodes[l].ready();
            deliver(&mut nodes, r.messages);
        }
        assert!(
            nodes[l].leading().pending.is_empty(),
            "chosen without the lost target"
        );
        assert_eq!(
            nodes[l].leading().preferred.last(),
            Some(&gone),
            "the silent target went to the back"
        );
        // The next write goes to answering followers at once.
        nodes[l].propose(put(2)).unwrap();
        let next = accept_targets(&nodes[l].ready().messages);
        assert_eq!(next.len(), 2);
        assert!(!next.contains(&gone), "{next:?}");
    }

    #[test]
    fn follower_refuses_proposals_with_leader_hint() {
        let mut nodes = cluster(3);
        let mut applied = vec![Vec::new(); 3];
        run(&mut nodes, &mut applied, 100);
        let leader = nodes.iter().find(|n| n.is_leader()).unwrap().id();
        let f = nodes.iter_mut().find(|n| !n.is_leader()).unwrap();
        assert_eq!(f.propose(put(1)), Err(Refusal::NotLeader(Some(leader))));
    }

    #[test]
    fn batches_and_messages_are_bounded_in_bytes() {
        let mut nodes = cluster(3);
        let mut applied = vec![Vec::new(); 3];
        let l = elected(&mut nodes, &mut applied);
        // Twenty values of the maximum size, all at once.
        for seq in 1..=20 {
            nodes[l].propose(big_put(seq, 1 << 20)).unwrap();
        }
        let sent = run_cut(&mut nodes, &mut applied, 30, &|_, _| false);
        let mut accepts = 0;
        for m in &sent {
            if let Msg::Accept(a) = m {
                accepts += 1;
                let bytes: usize = a.entries.iter().map(|(_, v)| value_bytes(v)).sum();
                assert!(bytes <= MAX_MESSAGE_BYTES, "an accept of {bytes} bytes");
                for (_, v) in &a.entries {
                    let alone = matches!(v, Value::Batch(b) if b.len() == 1);
                    assert!(
                        value_bytes(v) <= MAX_BATCH_BYTES || alone,
                        "a slot of {} bytes",
                        value_bytes(v)
                    );
                }
                let wire = bincode::serialize(a).unwrap().len();
                assert!(wire < kv_api::MAX_FRAME / 2, "{wire} bytes on the wire");
            }
        }
        assert!(accepts > 0);
        for a in &applied {
            assert_eq!(
                commands(a),
                (1..=20).collect::<Vec<_>>(),
                "all applied, in order"
            );
        }
    }

    #[test]
    fn a_leader_refuses_proposals_beyond_its_queue_bytes() {
        let mut nodes = cluster(3);
        let mut applied = vec![Vec::new(); 3];
        let l = elected(&mut nodes, &mut applied);
        nodes[l].cfg.max_queue_bytes = 3 * request_bytes(&big_put(1, 1 << 20));
        for seq in 1..=3 {
            nodes[l].propose(big_put(seq, 1 << 20)).unwrap();
        }
        assert_eq!(nodes[l].propose(big_put(4, 1 << 20)), Err(Refusal::Busy));
        // Once the queue drains into slots, proposals are taken again.
        let _ = nodes[l].ready();
        assert_eq!(nodes[l].propose(big_put(4, 1 << 20)), Ok(()));
    }
}
