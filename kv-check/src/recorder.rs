//! A thread-safe history recorder with a monotonic clock.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use crate::{Event, Op, Outcome};

/// Records a history from concurrent clients.
///
/// Call [`invoke`](Recorder::invoke) just *before* sending a request and
/// [`complete`](Recorder::complete) just *after* its answer (or failure)
/// arrived. Times are nanoseconds since the recorder was created, from a
/// monotonic clock, taken under the recorder's lock so they are consistent
/// with the order of the calls. Clones share the same history.
///
/// ```
/// use kv_check::{check, Budget, Op, Outcome, Recorder, Ret};
///
/// let rec = Recorder::new();
/// let t = rec.invoke(1, Op::put("x", "1"));
/// // ... send the request, get the answer ...
/// rec.complete(t, Outcome::Ok(Ret::Put));
/// let t = rec.invoke(1, Op::get("x"));
/// rec.complete(t, Outcome::Ok(Ret::found("1")));
/// assert!(check(&rec.history(), Budget::default()).is_linearizable());
/// ```
#[derive(Clone, Debug)]
pub struct Recorder {
    inner: Arc<Mutex<Inner>>,
}

#[derive(Debug)]
struct Inner {
    start: Instant,
    events: Vec<Event>,
    /// Whether `events[i]` has been completed.
    done: Vec<bool>,
}

/// Names an invoked operation until it is completed. Not `Clone`: each
/// invocation is completed at most once. Dropping it without completing
/// leaves the operation's outcome [`Outcome::Unknown`].
#[derive(Debug)]
#[must_use = "complete the operation with Recorder::complete (or it stays Unknown)"]
pub struct Token {
    index: usize,
    /// Identifies the recorder that issued it.
    recorder: usize,
}

impl Default for Recorder {
    fn default() -> Recorder {
        Recorder::new()
    }
}

impl Recorder {
    /// A recorder with an empty history; its clock starts now.
    pub fn new() -> Recorder {
        Recorder {
            inner: Arc::new(Mutex::new(Inner {
                start: Instant::now(),
                events: Vec::new(),
                done: Vec::new(),
            })),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panicking client thread must not hide the history from the test.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records that `client` is about to issue `op`.
    pub fn invoke(&self, client: u64, op: Op) -> Token {
        let mut inner = self.lock();
        let invoke = nanos(inner.start);
        inner.events.push(Event {
            client,
            op,
            invoke,
            complete: u64::MAX,
            outcome: Outcome::Unknown,
        });
        inner.done.push(false);
        Token {
            index: inner.events.len() - 1,
            recorder: self.id(),
        }
    }

    fn id(&self) -> usize {
        Arc::as_ptr(&self.inner) as usize
    }

    /// Records how the operation named by `token` ended. With
    /// [`Outcome::Unknown`] the completion time stays +∞ (`u64::MAX`).
    ///
    /// # Panics
    ///
    /// If `token` was issued by another recorder (one that is not a clone of
    /// this one).
    pub fn complete(&self, token: Token, outcome: Outcome) {
        assert_eq!(
            token.recorder,
            self.id(),
            "Recorder::complete: token from another recorder"
        );
        let mut inner = self.lock();
        let now = nanos(inner.start);
        let i = token.index;
        inner.done[i] = true;
        let e = &mut inner.events[i];
        e.complete = match outcome {
            Outcome::Unknown => u64::MAX,
            _ => now.max(e.invoke),
        };
        e.outcome = outcome;
    }

    /// The history so far, in invocation order. Operations invoked but not
    /// (yet) completed have outcome [`Outcome::Unknown`].
    pub fn history(&self) -> Vec<Event> {
        self.lock().events.clone()
    }

    /// How many operations were invoked but not completed yet.
    pub fn pending(&self) -> usize {
        self.lock().done.iter().filter(|d| !**d).count()
    }
}

fn nanos(start: Instant) -> u64 {
    u64::try_from(start.elapsed().as_nanos()).unwrap_or(u64::MAX - 1)
}
