//! Sequence numbers of writes and the `acked_below` watermark.
//!
//! Every write a [`crate::Client`] sends carries a sequence number, unique
//! and increasing per session (each session has a tracker of its own), so
//! the replicas apply it at most once even when it is retried. The client
//! also tells the replicas the lowest number it still waits for
//! (`acked_below`): they may forget the results below it.
//! The client is shared between tasks, so several writes may be outstanding
//! at once and finish in any order; the watermark is the lowest of them.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex, PoisonError};

/// Hands out sequence numbers and tracks the outstanding ones.
#[derive(Debug)]
pub(crate) struct SeqTracker {
    // One lock for both, so taking a number and marking it outstanding is
    // atomic: otherwise another task could read a watermark above a number
    // that was taken but not yet recorded. A std Mutex: it is never held
    // across an await.
    state: Mutex<SeqState>,
}

#[derive(Debug)]
struct SeqState {
    /// The next number to hand out (starts at 1).
    next: u64,
    /// Numbers handed out whose write has not finished yet.
    outstanding: BTreeSet<u64>,
}

impl SeqTracker {
    pub(crate) fn new() -> Arc<SeqTracker> {
        Arc::new(SeqTracker {
            state: Mutex::new(SeqState {
                next: 1,
                outstanding: BTreeSet::new(),
            }),
        })
    }

    /// Takes the next number; it stays outstanding until the guard drops
    /// (also when the caller's future is cancelled).
    pub(crate) fn begin(self: &Arc<Self>) -> SeqGuard {
        let mut s = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let seq = s.next;
        s.next += 1;
        s.outstanding.insert(seq);
        SeqGuard {
            tracker: Arc::clone(self),
            seq,
        }
    }

    /// The lowest number still outstanding, or the next number to hand out
    /// if none is: every reply below it has been received (or given up on).
    pub(crate) fn acked_below(&self) -> u64 {
        let s = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        s.outstanding.first().copied().unwrap_or(s.next)
    }

    fn finish(&self, seq: u64) {
        let mut s = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        s.outstanding.remove(&seq);
    }
}

/// An outstanding sequence number; dropping it marks the write finished.
///
/// A write the client gave up on (timeout) also counts as finished: it will
/// never be retried, so the replicas need not keep its result, and a stale
/// copy still in flight is then answered `Stale` instead of being applied.
#[derive(Debug)]
pub(crate) struct SeqGuard {
    tracker: Arc<SeqTracker>,
    seq: u64,
}

impl SeqGuard {
    /// The sequence number.
    pub(crate) fn seq(&self) -> u64 {
        self.seq
    }
}

impl Drop for SeqGuard {
    fn drop(&mut self) {
        self.tracker.finish(self.seq);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_start_at_one_and_increase() {
        let t = SeqTracker::new();
        assert_eq!(t.acked_below(), 1);
        let a = t.begin();
        let b = t.begin();
        assert_eq!((a.seq(), b.seq()), (1, 2));
    }

    #[test]
    fn acked_below_is_the_lowest_outstanding_number() {
        let t = SeqTracker::new();
        let a = t.begin();
        let b = t.begin();
        let c = t.begin();
        assert_eq!(t.acked_below(), 1);
        // Finishing out of order: 2 done, 1 still outstanding.
        drop(b);
        assert_eq!(t.acked_below(), 1);
        drop(a);
        assert_eq!(t.acked_below(), 3);
        drop(c);
        // Nothing outstanding: everything below the next number is acked.
        assert_eq!(t.acked_below(), 4);
        let d = t.begin();
        assert_eq!(d.seq(), 4);
        assert_eq!(t.acked_below(), 4);
    }

    #[test]
    fn concurrent_writers_get_distinct_numbers() {
        let t = SeqTracker::new();
        let handles: Vec<_> = (0..8)
            .map(|_| {
                let t = Arc::clone(&t);
                std::thread::spawn(move || {
                    (0..100)
                        .map(|_| {
                            let g = t.begin();
                            // Our own number is outstanding, so the
                            // watermark can never be above it.
                            assert!(t.acked_below() <= g.seq());
                            g.seq()
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        let mut all: Vec<u64> = handles
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect();
        all.sort_unstable();
        all.dedup();
        assert_eq!(all.len(), 800);
        assert_eq!(t.acked_below(), 801);
    }
}
