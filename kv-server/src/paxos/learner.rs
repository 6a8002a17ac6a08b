//! The learner: what is chosen, in order. It advances the chosen prefix,
//! hands chosen entries out for apply, catches up by fetching chosen slots
//! from a peer (or, once they are compacted away, by installing a
//! snapshot), serves such fetches, and compacts the log behind snapshots.
//! Every replica is a learner, voting or not: chosen values are facts.

use kv_peer_api::{Ballot, Fetch, FetchReply, ReplicaId, Slot, Value};

use super::*;

impl Paxos {
    /// Drops log entries up to `upto` (capped at what was applied): a
    /// snapshot covering them is durable.
    pub fn compact(&mut self, upto: Slot) {
        let upto = upto.min(self.applied);
        if upto <= self.compacted {
            return;
        }
        self.log = self.log.split_off(&(upto + 1));
        self.compacted = upto;
        self.out.persist.push(Record::Compacted(upto));
    }

    /// Drops log entries up to `upto`, but keeps enough of the newest ones
    /// before it to hold `keep_commands` client commands (a no-op counts as
    /// one) or `keep_bytes` bytes, whichever is less, for peers slightly
    /// behind to catch up from the log. (By commands alone, 1,000 values of
    /// 1 MiB would be kept in memory and rewritten into every checkpoint.)
    pub fn compact_keeping(&mut self, upto: Slot, keep_commands: usize, keep_bytes: usize) {
        let mut kept = 0;
        let mut bytes = 0;
        let mut cut = upto.min(self.applied);
        for (&slot, e) in self.log.range(..=cut).rev() {
            bytes += value_bytes(&e.value);
            if kept >= keep_commands || bytes > keep_bytes {
                break;
            }
            kept += match &e.value {
                Value::Batch(b) => b.len().max(1),
                Value::Noop | Value::Time(_) => 1,
            };
            cut = slot - 1;
        }
        self.compact(cut);
    }

    /// The state machine was replaced by a snapshot at `index` (durable):
    /// everything up to it counts as chosen and applied. `membership` is
    /// the configuration the snapshot ends in (`None`: a snapshot written
    /// before configurations were kept in them).
    pub fn install_snapshot(&mut self, index: Slot, membership: Option<Membership>) {
        if index <= self.applied {
            return;
        }
        if let Some(m) = membership {
            // Newer than what our chosen prefix ends in only if the
            // snapshot reaches past it.
            if index > self.chosen && m.epoch >= self.epoch() {
                self.adopt(m, index);
            }
        }
        tracing::info!(
            id = self.cfg.id,
            index,
            behind_by = index - self.applied,
            "installed snapshot"
        );
        self.out.apply.retain(|(slot, _)| *slot > index);
        self.applied = index;
        if index > self.chosen {
            self.chosen = index;
            self.chosen_dirty = true;
        }
        let chosen = self.chosen;
        if let Some(l) = self.lead() {
            l.pending = l.pending.split_off(&(index + 1));
            l.next_slot = l.next_slot.max(chosen + 1);
        }
        self.log = self.log.split_off(&(index + 1));
        self.compacted = self.compacted.max(index);
        self.out.persist.push(Record::Compacted(self.compacted));
        self.fetch_started = None;
        self.advance_chosen();
        self.emit_apply();
    }

    /// The leader of `ballot` says every slot up to `upto` is chosen. An
    /// entry we accepted in that same ballot holds the chosen value (a leader
    /// proposes one value per slot per ballot); for any other we must fetch.
    pub(super) fn learn_chosen(&mut self, ballot: Ballot, upto: Slot, leader: ReplicaId) {
        let mut slot = self.chosen + 1;
        while slot <= upto {
            match self.log.get_mut(&slot) {
                Some(e) if e.chosen || e.ballot == ballot => e.chosen = true,
                _ => break,
            }
            // One slot at a time: passing a configuration change drops
            // what was accepted after it in an older epoch, so a leader of
            // that epoch is not believed about those slots (rule 4).
            self.advance_chosen();
            slot += 1;
        }
        self.advance_chosen();
        if self.chosen < upto {
            self.request_fetch(leader);
        }
    }

    pub(super) fn request_fetch(&mut self, peer: ReplicaId) {
        if self.fetch_started.is_some() || peer == self.cfg.id {
            return;
        }
        self.fetch_started = Some(self.now);
        self.send(
            peer,
            Msg::Fetch(Fetch {
                from: self.cfg.id,
                from_slot: self.chosen + 1,
                max_entries: self.cfg.max_entries_per_message as u32,
            }),
        );
    }

    pub(super) fn advance_chosen(&mut self) {
        let before = self.chosen;
        while let Some(e) = self.log.get(&(self.chosen + 1)) {
            if !e.chosen {
                break;
            }
            let stop = membership::stop_sign(&self.membership, &e.value);
            self.chosen += 1;
            if let Some(next) = stop {
                let at = self.chosen;
                self.chosen_dirty = true;
                self.emit_apply();
                self.adopt(next, at);
            }
        }
        if self.chosen > before {
            self.chosen_dirty = true;
            self.emit_apply();
        }
    }

    pub(super) fn emit_apply(&mut self) {
        while self.applied < self.chosen {
            let slot = self.applied + 1;
            let Some(e) = self.log.get(&slot) else { break };
            self.out.apply.push((slot, e.value.clone()));
            self.applied = slot;
        }
    }

    /// A replica that does not vote follows the leader's progress: it
    /// fetches what is chosen (chosen values are facts, safe to hold and
    /// serve) but answers nothing that counts as a vote.
    pub(super) fn learn_as_learner(&mut self, ballot: Ballot, chosen: Slot, from: ReplicaId) {
        if ballot >= self.promised {
            self.leader = Some(ballot.id);
            self.last_heard = self.now;
        }
        if chosen > self.chosen {
            self.request_fetch(from);
        }
    }

    pub(super) fn on_fetch(&mut self, m: Fetch) -> FetchReply {
        let max = (m.max_entries as usize)
            .min(self.cfg.max_entries_per_message)
            .max(1);
        let mut entries = Vec::new();
        let mut budget = Budget::new(max, self.cfg.max_message_bytes);
        let mut slot = m.from_slot.max(1);
        if slot <= self.compacted {
            slot = self.chosen + 1; // nothing to send: the caller needs the snapshot
        }
        while slot <= self.chosen {
            match self.log.get(&slot) {
                Some(e) if budget.take(value_bytes(&e.value)) => {
                    entries.push((slot, e.value.clone()));
                }
                _ => break,
            }
            slot += 1;
        }
        FetchReply {
            from: self.cfg.id,
            entries,
            chosen: self.chosen,
            compacted: self.compacted,
        }
    }

    pub(super) fn on_fetch_reply(&mut self, m: FetchReply) {
        self.fetch_started = None;
        if m.entries.is_empty() && m.compacted > self.chosen {
            self.out.snapshot_from = Some(m.from);
            return;
        }
        let mut expected = self.chosen + 1;
        for (slot, value) in m.entries {
            if slot != expected {
                if slot < expected {
                    continue;
                }
                break; // not contiguous: ignore the rest
            }
            let ballot = self
                .log
                .get(&slot)
                .map(|e| e.ballot)
                .unwrap_or(Ballot::ZERO);
            self.out.persist.push(Record::Accepted {
                slot,
                ballot,
                value: value.clone(),
            });
            self.log.insert(
                slot,
                Entry {
                    ballot,
                    value,
                    chosen: true,
                },
            );
            if let Some(l) = self.lead() {
                l.pending.remove(&slot);
            }
            // Entry by entry: past a configuration change the entries we
            // accepted in the old epoch are dropped before the next is
            // stored (it keeps no void entry's ballot).
            self.advance_chosen();
            expected += 1;
        }
        self.advance_chosen();
        if m.chosen > self.chosen && expected > self.chosen {
            self.request_fetch(m.from);
        }
        if matches!(self.role, Role::Candidate(_)) {
            self.maybe_win();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::paxos::testkit::*;

    #[test]
    fn fetch_replies_are_bounded_in_bytes() {
        let mut p = voter_with_chosen(40, |slot| vec![big_put(slot, 1 << 20)]);
        let Some(Msg::FetchReply(r)) = p.step(Msg::Fetch(Fetch {
            from: 2,
            from_slot: 1,
            max_entries: 256,
        })) else {
            panic!("a fetch is answered");
        };
        let bytes: usize = r.entries.iter().map(|(_, v)| value_bytes(v)).sum();
        assert!(!r.entries.is_empty());
        assert!(bytes <= MAX_MESSAGE_BYTES, "{bytes} bytes");
        assert_eq!(r.chosen, 40, "the caller learns there is more");
    }

    /// A crash after a received snapshot was installed but before its
    /// compaction was synced: the entries between the chosen mark and the
    /// snapshot may never have been chosen, and must not be served.
    #[test]
    fn entries_between_the_chosen_mark_and_a_newer_snapshot_are_not_served() {
        let entries = (1..=12)
            .map(|slot| {
                (
                    slot,
                    Ballot { round: 1, id: 1 },
                    Value::Batch(vec![put(slot)]),
                )
            })
            .collect();
        let durable = Durable {
            chosen: 5,
            snapshot: 10,
            entries,
            standing: Standing::Voter,
            ..Durable::default()
        };
        let mut p = Paxos::new(Config::new(1, vec![1, 2, 3]), durable);
        assert_eq!(p.chosen(), 10);
        let Some(Msg::FetchReply(r)) = p.step(Msg::Fetch(Fetch {
            from: 2,
            from_slot: 6,
            max_entries: 256,
        })) else {
            panic!("a fetch is answered");
        };
        assert!(r.entries.is_empty(), "served {:?}", r.entries);
        assert_eq!(r.compacted, 10, "the caller is sent to the snapshot");
        assert!(p.ready().persist.contains(&Record::Compacted(10)));
    }

    /// Compaction keeps the newest entries behind a snapshot, up to a
    /// number of commands or of bytes, whichever comes first.
    #[test]
    fn compaction_keeps_commands_or_bytes_behind_a_snapshot() {
        let mut p = voter_with_chosen(100, |slot| {
            vec![big_put(slot, 1000), big_put(slot + 1000, 1000)]
        });
        assert_eq!(p.applied(), 100);
        let slot_bytes = value_bytes(&p.log[&1].value);
        // Ten commands: the last five slots (two commands each).
        p.compact_keeping(90, 10, usize::MAX);
        assert_eq!(p.compacted(), 85);
        // Bytes for three slots: three more slots behind 95.
        p.compact_keeping(95, 1000, 3 * slot_bytes);
        assert_eq!(p.compacted(), 92);
        // Never beyond what was applied, and never backwards.
        p.compact_keeping(200, 0, 0);
        assert_eq!(p.compacted(), 100);
        p.compact_keeping(50, 0, 0);
        assert_eq!(p.compacted(), 100);
    }
}
