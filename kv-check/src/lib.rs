//! Linearizability checking of key-value histories, in the manner of
//! [Knossos](https://github.com/jepsen-io/knossos) and
//! [Porcupine](https://github.com/anishathalye/porcupine).
//!
//! A test records what its clients did — which operation each issued, when it
//! was invoked, when its answer arrived and what the answer was — as a list of
//! [`Event`]s (by hand, or with a [`Recorder`]). [`check`] then decides
//! whether some single total order of those operations, consistent with their
//! real-time order, explains every observed result with the semantics of a
//! map from byte-string keys to byte-string values.
//!
//! ```
//! use kv_check::{check, Budget, History, Op, Ret};
//!
//! let h = History::new()
//!     .ok(1, Op::put("x", "1"), Ret::Put, 0, 10)
//!     // Concurrent with the put: may see either the old or the new value.
//!     .ok(2, Op::get("x"), Ret::Get(None), 5, 15)
//!     // Strictly after the put completed: must see "1".
//!     .ok(3, Op::get("x"), Ret::found("1"), 20, 30);
//! assert!(check(&h, Budget::default()).is_linearizable());
//!
//! let stale = History::new()
//!     .ok(1, Op::put("x", "1"), Ret::Put, 0, 10)
//!     .ok(2, Op::get("x"), Ret::Get(None), 20, 30);
//! let report = check(&stale, Budget::default());
//! assert!(report.verdict.is_violation());
//! println!("{report}");
//! ```
//!
//! # Layout
//!
//! * [`Op`], [`Ret`], [`Outcome`], [`Event`] — one operation of a history, and
//!   [`History`], a builder for literal histories.
//! * [`Recorder`] — a thread-safe recorder that stamps invocations and
//!   completions with a monotonic clock; [`Recorder::history`] turns what it
//!   saw into events.
//! * [`check`] with a [`Budget`] returns a [`Report`] whose [`Verdict`] is
//!   linearizable, not linearizable (with a human-readable explanation),
//!   unknown (the budget ran out), or an invalid history (a result of the
//!   wrong kind for its operation, a completion before its invocation).
//!
//! Sources: `lib.rs` (the types), `check.rs` (partitioning, pre-check, the
//! search, explanations), `recorder.rs`, `format.rs` (rendering of values and
//! events), `tests.rs` (known histories, randomized histories from a
//! simulated linearizable store, agreement with a brute-force checker).
//!
//! ## The model
//!
//! Each key is an independent register holding either nothing or a value.
//! `put` stores a value; `get` returns the value (or `None`); `delete` removes
//! the value and answers whether there was one; `cas(expected, new)` stores
//! `new` if the register holds `expected` (`None` meaning "absent") and
//! answers whether it swapped together with the register's value *after* the
//! operation (so `current == Some(new)` exactly when it swapped) — the same
//! convention as the server's `OpResult::Cas`.
//!
//! ## The algorithm
//!
//! Linearizability is *compositional* (local): a history is linearizable iff
//! the sub-history of every object is. So the history is partitioned by key
//! and every key is checked on its own, which keeps each search small.
//!
//! For one key the checker runs the Wing–Gong / Lowe search (WGL), as in
//! Porcupine's `checkSingle`:
//!
//! 1. Every operation becomes a *call* entry (at its invocation time) and a
//!    *return* entry (at its completion time) in one doubly linked list sorted
//!    by time; at equal times calls come first, so operations that merely
//!    touch are treated as concurrent (the permissive choice).
//! 2. Walking the list from the front, the search tries to linearize a call
//!    entry: apply the operation to the current register state; if the
//!    observed result agrees, the call and its return entry are *lifted* out
//!    of the list, the (entry, previous state) pair is pushed on a stack, and
//!    the walk restarts from the front. Reaching a return entry means that
//!    operation completed before being linearized: *backtrack* — pop the last
//!    linearized operation, restore the state, *unlift* its entries back into
//!    the list and continue after its call entry.
//! 3. A cache of (set of linearized operations as a bitset, register state)
//!    pairs already visited prunes the search: a configuration reached a
//!    second time can only fail again. The cache is exact (full bitsets, no
//!    hashing shortcuts).
//! 4. The key is linearizable once every completed operation is linearized
//!    (unknown-outcome operations left over never took effect), and not
//!    linearizable when a return entry is reached with an empty stack.
//!
//! Two exact reductions keep the search small without changing its answer
//! (a randomized test compares it with a brute-force checker):
//!
//! * *Forced moves.* If a candidate's observed result says it changed nothing
//!   (a `get`, a CAS that did not swap, a delete of an absent key) and it
//!   matches the current state, it is linearized next and no alternative is
//!   tried from that configuration: moving such an operation to the front of
//!   any valid continuation keeps it valid. This removes the branching on
//!   reads, which dominate most histories.
//! * *Interchangeable unknown operations.* Unknown-outcome operations with
//!   identical effects (say two timed-out `put(k, v)`) are linearized only in
//!   invocation order.
//!
//! Before the search a cheap exact pre-check rejects results no reachable
//! state could produce — typically a read of a value that no operation on
//! the key ever writes — with a direct explanation.
//!
//! The search is exponential in the worst case, so it runs under a [`Budget`]
//! (steps per key, cache memory per key, overall wall-clock time); when the
//! budget runs out the verdict is [`Verdict::Unknown`] rather than a hang.
//!
//! ## Outcomes, and what `Unknown` means
//!
//! * [`Outcome::Ok`] — the operation completed and its result was observed.
//!   It took effect exactly once, at some instant between its invocation and
//!   its completion.
//! * [`Outcome::Failed`] — the operation certainly did not take effect (the
//!   request was rejected before it could be applied: invalid argument, "not
//!   the leader" before proposing, ...). Failed operations are dropped from
//!   the history.
//! * [`Outcome::Unknown`] — the client does not know (a timeout, a lost
//!   connection after sending). The operation may have taken effect at any
//!   instant after its invocation — even long after the client gave up — or
//!   never; its result is unobserved. The checker gives it a completion time
//!   of +∞ and accepts any result for it. This is exactly "optional": an
//!   operation that never took effect is indistinguishable from one that took
//!   effect after every other operation, because nothing observes it there.
//!   So a history is accepted iff some subset of its unknown operations can
//!   be linearized together with all the completed ones.
//! * Reads (`get`) that failed or timed out observe nothing and change
//!   nothing, so they are simply dropped from the history.
//!
//! ## Cost
//!
//! Proving a history *not* linearizable means exhausting the search, and each
//! unknown write concurrent with a stretch of the history multiplies the
//! configurations to visit; so does the number of operations in flight at
//! once. Linearizable histories of a few thousand operations on one key from
//! 10–20 concurrent clients take well under a second (release build);
//! with ~50 clients all hammering one key the default budget may run out and
//! the verdict is [`Verdict::Unknown`]. Spreading operations over more keys
//! helps, since keys are checked separately. Unoptimized (debug) builds are
//! about ten times slower; a workspace can build just this crate optimized
//! in tests with `[profile.dev.package.kv-check] opt-level = 3`.
//!
//! ## Recording a history
//!
//! Record one event per *logical* operation: if a client library retries a
//! request internally (with the same request id, applied at most once), the
//! event spans from the first attempt to the final answer. Take the
//! invocation time before the first byte is sent and the completion time
//! after the answer arrived; an operation whose answer never arrived is
//! [`Outcome::Unknown`], not [`Outcome::Failed`] — use `Failed` only when
//! the operation certainly was not applied.

#![deny(missing_docs)]

mod check;
mod format;
mod recorder;
#[cfg(test)]
mod tests;

pub use check::{check, Budget, Report, Verdict};
pub use recorder::{Recorder, Token};

use std::fmt;

/// An operation on the key-value store, with its arguments.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Op {
    /// Set `key` to `value`.
    Put {
        /// The key.
        key: Vec<u8>,
        /// The value stored.
        value: Vec<u8>,
    },
    /// Read `key`.
    Get {
        /// The key.
        key: Vec<u8>,
    },
    /// Remove `key` if present.
    Delete {
        /// The key.
        key: Vec<u8>,
    },
    /// Set `key` to `new` only if it currently holds `expected` (`None`: only
    /// if the key is absent).
    Cas {
        /// The key.
        key: Vec<u8>,
        /// The value the key must hold, or `None` for "absent".
        expected: Option<Vec<u8>>,
        /// The value stored if the comparison holds.
        new: Vec<u8>,
    },
}

impl Op {
    /// `Op::Put { key, value }`.
    pub fn put(key: impl AsRef<[u8]>, value: impl AsRef<[u8]>) -> Op {
        Op::Put {
            key: key.as_ref().to_vec(),
            value: value.as_ref().to_vec(),
        }
    }

    /// `Op::Get { key }`.
    pub fn get(key: impl AsRef<[u8]>) -> Op {
        Op::Get {
            key: key.as_ref().to_vec(),
        }
    }

    /// `Op::Delete { key }`.
    pub fn delete(key: impl AsRef<[u8]>) -> Op {
        Op::Delete {
            key: key.as_ref().to_vec(),
        }
    }

    /// `Op::Cas { key, expected, new }`. Pass `None::<&str>` (or
    /// `None::<Vec<u8>>`) for "only if absent".
    pub fn cas<E: AsRef<[u8]>>(
        key: impl AsRef<[u8]>,
        expected: Option<E>,
        new: impl AsRef<[u8]>,
    ) -> Op {
        Op::Cas {
            key: key.as_ref().to_vec(),
            expected: expected.map(|e| e.as_ref().to_vec()),
            new: new.as_ref().to_vec(),
        }
    }

    /// The key the operation touches.
    pub fn key(&self) -> &[u8] {
        match self {
            Op::Put { key, .. } | Op::Get { key } | Op::Delete { key } | Op::Cas { key, .. } => key,
        }
    }

    /// Whether the operation can change the store (everything but `get`).
    pub fn is_write(&self) -> bool {
        !matches!(self, Op::Get { .. })
    }
}

/// The observed result of a completed operation. Its variant must match the
/// operation's ([`check`] reports a mismatch as [`Verdict::InvalidHistory`]).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Ret {
    /// A put completed.
    Put,
    /// A get returned this value (`None`: the key was absent).
    Get(Option<Vec<u8>>),
    /// A delete completed; whether the key existed before it.
    Delete(bool),
    /// A compare-and-swap completed.
    Cas {
        /// Whether `new` was stored.
        swapped: bool,
        /// The key's value after the operation: `Some(new)` if it swapped,
        /// otherwise the value that did not match `expected`.
        current: Option<Vec<u8>>,
    },
}

impl Ret {
    /// `Ret::Get(Some(value))`: a get that found `value`.
    pub fn found(value: impl AsRef<[u8]>) -> Ret {
        Ret::Get(Some(value.as_ref().to_vec()))
    }

    /// `Ret::Cas { swapped: true, current: Some(new) }`: a CAS that stored
    /// `new`.
    pub fn swapped(new: impl AsRef<[u8]>) -> Ret {
        Ret::Cas {
            swapped: true,
            current: Some(new.as_ref().to_vec()),
        }
    }

    /// `Ret::Cas { swapped: false, current }`: a CAS that found `current`
    /// (`None`: absent) instead of what it expected.
    pub fn not_swapped<C: AsRef<[u8]>>(current: Option<C>) -> Ret {
        Ret::Cas {
            swapped: false,
            current: current.map(|c| c.as_ref().to_vec()),
        }
    }

    /// Whether this result is of the right kind for `op`.
    pub fn matches(&self, op: &Op) -> bool {
        matches!(
            (op, self),
            (Op::Put { .. }, Ret::Put)
                | (Op::Get { .. }, Ret::Get(_))
                | (Op::Delete { .. }, Ret::Delete(_))
                | (Op::Cas { .. }, Ret::Cas { .. })
        )
    }
}

/// How an operation ended, as far as its client knows.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Outcome {
    /// It completed with this observed result (and so took effect exactly
    /// once between invocation and completion).
    Ok(Ret),
    /// It certainly did not take effect (rejected before being applied).
    /// Dropped from the history by the checker.
    Failed,
    /// It may have taken effect at any time after its invocation, or never
    /// (e.g. a timeout); its result is unobserved. Its completion time is
    /// treated as +∞. Unknown reads are dropped.
    Unknown,
}

/// One operation of a history.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Event {
    /// Which client (process) issued it. Used only in explanations: the
    /// checker does not assume a client's operations are sequential.
    pub client: u64,
    /// The operation and its arguments.
    pub op: Op,
    /// Invocation time, in nanoseconds from any fixed origin.
    pub invoke: u64,
    /// Completion time, same clock; must not be before `invoke`. Ignored for
    /// [`Outcome::Unknown`] (conventionally `u64::MAX`).
    pub complete: u64,
    /// How it ended.
    pub outcome: Outcome,
}

impl fmt::Display for Event {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        format::event(f, self)
    }
}

/// A history under construction: a list of [`Event`]s with builder methods
/// for writing histories literally in tests.
///
/// It dereferences to `[Event]`, so it can be passed to [`check`] directly.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct History {
    /// The events, in any order.
    pub events: Vec<Event>,
}

impl History {
    /// An empty history.
    pub fn new() -> History {
        History::default()
    }

    /// Adds an event.
    pub fn push(&mut self, event: Event) {
        self.events.push(event);
    }

    /// Adds an operation that completed at `complete` with result `ret`.
    pub fn ok(mut self, client: u64, op: Op, ret: Ret, invoke: u64, complete: u64) -> History {
        self.push(Event {
            client,
            op,
            invoke,
            complete,
            outcome: Outcome::Ok(ret),
        });
        self
    }

    /// Adds an operation that certainly did not take effect.
    pub fn failed(mut self, client: u64, op: Op, invoke: u64, complete: u64) -> History {
        self.push(Event {
            client,
            op,
            invoke,
            complete,
            outcome: Outcome::Failed,
        });
        self
    }

    /// Adds an operation with an unknown outcome (e.g. it timed out).
    pub fn unknown(mut self, client: u64, op: Op, invoke: u64) -> History {
        self.push(Event {
            client,
            op,
            invoke,
            complete: u64::MAX,
            outcome: Outcome::Unknown,
        });
        self
    }

    /// Checks the history; see [`check`].
    pub fn check(&self, budget: Budget) -> Report {
        check(&self.events, budget)
    }
}

/// One event per line, prefixed with its index (`#3 client 1: get("k") ...`),
/// the way explanations refer to events.
impl fmt::Display for History {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.events.iter().enumerate() {
            writeln!(f, "#{i} {e}")?;
        }
        Ok(())
    }
}

impl From<Vec<Event>> for History {
    fn from(events: Vec<Event>) -> History {
        History { events }
    }
}

impl std::ops::Deref for History {
    type Target = [Event];
    fn deref(&self) -> &[Event] {
        &self.events
    }
}
