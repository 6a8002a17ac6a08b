//! Trying replicas one after another until one completes an operation.
//!
//! The policy, in one place so it can be tested without a network:
//!
//! - Start at the replica that last worked (the leader, once known), then go
//!   round the list.
//! - A `NotLeader` answer with a hint sends the next attempt to the hinted
//!   address, which need not be in the list.
//! - Connection errors, dropped connections, per-attempt deadlines,
//!   "no leader / no quorum" answers and "overloaded" (a request the replica
//!   throttled unrun, reported as `KvError::Unavailable`) move on to the
//!   next replica.
//! - After every full pass (as many attempts as there are replicas) without
//!   success, wait a little: 20 ms, doubling up to 200 ms.
//! - `InvalidArgument` is final.
//! - `UnknownSession` is final: [`Error::UnknownSession`] if no earlier
//!   attempt may have reached the log (so the write was certainly not
//!   applied), else [`Error::OutcomeUnknown`] — an earlier attempt may have
//!   been applied before the session was dropped, and its result went with
//!   it.
//! - Each attempt gets the remaining budget but at most [`MAX_ATTEMPT`], so a
//!   frozen replica (one that accepts connections but never answers) costs
//!   one second, not the whole budget.
//! - When the budget runs out: [`Error::Unavailable`] if no attempt ever
//!   got a connection, otherwise [`Error::Timeout`].

use std::future::Future;
use std::time::{Duration, Instant};

use kv_api::KvError;

use crate::error::{Error, Result};

/// The longest a single attempt at one replica may take.
pub(crate) const MAX_ATTEMPT: Duration = Duration::from_secs(1);
/// The wait after the first full pass without success.
pub(crate) const BACKOFF_MIN: Duration = Duration::from_millis(20);
/// The longest wait between passes.
pub(crate) const BACKOFF_MAX: Duration = Duration::from_millis(200);

/// What one attempt at one replica produced.
#[derive(Debug)]
pub(crate) enum Attempt<T> {
    /// The operation completed.
    Done(T),
    /// No connection could be made (refused, unreachable, connect timeout).
    NoConnection(String),
    /// Connected, but the call failed: the connection dropped, the deadline
    /// passed, or the server aborted the request.
    CallFailed(String),
    /// The replica answered with an error.
    Refused(KvError),
}

/// The order in which replicas are tried, and the backoff between passes.
#[derive(Debug)]
pub(crate) struct Rotation {
    addrs: Vec<String>,
    /// Index in `addrs` of the next replica in round-robin order.
    pos: usize,
    /// An address to try before continuing the round.
    hinted: Option<String>,
    /// Attempts since the last backoff.
    since_backoff: usize,
    backoff: Duration,
}

impl Rotation {
    /// Starts at `start` (the replica that last worked) if given.
    pub(crate) fn new(addrs: &[String], start: Option<&str>) -> Rotation {
        let mut r = Rotation {
            addrs: addrs.to_vec(),
            pos: 0,
            hinted: None,
            since_backoff: 0,
            backoff: BACKOFF_MIN,
        };
        if let Some(s) = start {
            r.hint(s);
        }
        r
    }

    /// The next address to try, and how long to wait before trying it.
    pub(crate) fn next(&mut self) -> (String, Duration) {
        let n = self.addrs.len().max(1);
        let wait = if self.since_backoff >= n {
            self.since_backoff = 0;
            let w = self.backoff;
            self.backoff = (self.backoff * 2).min(BACKOFF_MAX);
            w
        } else {
            Duration::ZERO
        };
        self.since_backoff += 1;
        if let Some(h) = self.hinted.take() {
            // Continue the round after the hinted replica if it is listed.
            if let Some(i) = self.addrs.iter().position(|a| *a == h) {
                self.pos = (i + 1) % n;
            }
            return (h, wait);
        }
        let Some(a) = self.addrs.get(self.pos).cloned() else {
            // No address at all: the builder refuses this, so unreachable.
            return (String::new(), wait);
        };
        self.pos = (self.pos + 1) % n;
        (a, wait)
    }

    /// Tries `addr` next.
    pub(crate) fn hint(&mut self, addr: &str) {
        self.hinted = Some(addr.to_string());
    }
}

/// Runs `attempt(addr, attempt_deadline)` at replica after replica until one
/// completes, an error is final, or `budget` is spent. Returns the result and
/// the address that produced it. Without `follow_hints`, only `addrs` are
/// ever tried (leader hints are reported in the error, not followed).
pub(crate) async fn failover<T, F, Fut>(
    addrs: &[String],
    start: Option<&str>,
    budget: Duration,
    follow_hints: bool,
    mut attempt: F,
) -> Result<(T, String)>
where
    F: FnMut(String, Instant) -> Fut,
    Fut: Future<Output = Attempt<T>>,
{
    let deadline = Instant::now() + budget;
    let mut rotation = Rotation::new(addrs, start);
    let mut connected = false;
    // Whether an attempt so far may have put the request into the log: a
    // call that failed or timed out, or a replica that answered that it
    // could not tell. Only "not the leader" (never proposed), "invalid"
    // and no connection at all are certain.
    let mut maybe_applied = false;
    let mut attempts = 0u32;
    let mut last = String::from("no attempt was made");
    loop {
        let (addr, wait) = rotation.next();
        if !wait.is_zero() {
            let left = deadline.saturating_duration_since(Instant::now());
            tokio::time::sleep(wait.min(left)).await;
        }
        let now = Instant::now();
        if now >= deadline {
            break;
        }
        let attempt_deadline = deadline.min(now + MAX_ATTEMPT);
        attempts += 1;
        match attempt(addr.clone(), attempt_deadline).await {
            Attempt::Done(v) => return Ok((v, addr)),
            Attempt::NoConnection(e) => {
                tracing::debug!(%addr, error = %e, "cannot connect");
                note_failure(&mut last, &addr, &e, attempts, deadline);
            }
            Attempt::CallFailed(e) => {
                tracing::debug!(%addr, error = %e, "call failed");
                connected = true;
                maybe_applied = true;
                note_failure(&mut last, &addr, &e, attempts, deadline);
            }
            Attempt::Refused(KvError::InvalidArgument(m)) => return Err(Error::InvalidArgument(m)),
            // Refused before anything was done, and every replica would
            // refuse the same identity alike.
            Attempt::Refused(KvError::PermissionDenied(m)) => {
                return Err(Error::PermissionDenied(format!("{addr}: {m}")))
            }
            Attempt::Refused(KvError::Disabled(m)) => {
                return Err(Error::Disabled(format!("{addr}: {m}")))
            }
            Attempt::Refused(KvError::Conflict(m)) => {
                return Err(Error::Conflict(format!("{addr}: {m}")))
            }
            // The history is the same on every replica.
            Attempt::Refused(KvError::Compacted(rev)) => return Err(Error::Compacted(rev)),
            Attempt::Refused(e @ KvError::UnknownSession(id)) => {
                return Err(if maybe_applied {
                    Error::OutcomeUnknown(format!(
                        "{addr}: {e}; an earlier attempt may have been applied, and its \
                         result is gone with the session (last error before: {last})"
                    ))
                } else {
                    Error::UnknownSession(id)
                });
            }
            Attempt::Refused(e) => {
                tracing::debug!(%addr, error = %e, "replica refused");
                connected = true;
                maybe_applied |= !matches!(e, KvError::NotLeader(_));
                if let KvError::NotLeader(Some(h)) = &e {
                    if follow_hints && h.addr != addr {
                        rotation.hint(&h.addr);
                    }
                }
                last = format!("{addr}: {e}");
            }
        }
    }
    let secs = budget.as_secs_f64();
    Err(if connected {
        Error::Timeout(format!(
            "no replica completed the operation within {secs} s ({attempts} attempts); \
             last error: {last}"
        ))
    } else {
        Error::Unavailable(format!(
            "could not connect to any replica within {secs} s ({attempts} attempts); \
             last error: {last}"
        ))
    })
}

/// Keeps the last error for the final report. An attempt cut short by the
/// operation's own deadline says only that; the error before it (a
/// refused certificate, a connection refused) says why the operation
/// failed, so it is kept, with the cut-short attempt noted after it.
fn note_failure(last: &mut String, addr: &str, e: &str, attempts: u32, deadline: Instant) {
    if attempts > 1 && Instant::now() >= deadline {
        *last = format!("{last} (then {addr}: {e})");
    } else {
        *last = format!("{addr}: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kv_api::LeaderHint;
    use std::sync::Mutex;

    /// The attempt the deadline cut short does not hide why the ones
    /// before it failed.
    #[test]
    fn an_attempt_cut_short_by_the_deadline_keeps_the_error_before_it() {
        let mut last = String::from("no attempt was made");
        let later = Instant::now() + Duration::from_secs(60);
        note_failure(
            &mut last,
            "a:1",
            "received fatal alert: UnknownCA",
            1,
            later,
        );
        assert_eq!(last, "a:1: received fatal alert: UnknownCA");
        let passed = Instant::now();
        note_failure(&mut last, "b:2", "no answer before the deadline", 2, passed);
        assert_eq!(
            last,
            "a:1: received fatal alert: UnknownCA (then b:2: no answer before the deadline)"
        );
        note_failure(&mut last, "c:3", "connection refused", 3, later);
        assert_eq!(last, "c:3: connection refused");
    }

    fn addrs(n: usize) -> Vec<String> {
        (1..=n).map(|i| format!("r{i}")).collect()
    }

    #[test]
    fn rotation_starts_at_the_last_good_replica_and_goes_round() {
        let mut r = Rotation::new(&addrs(3), Some("r2"));
        let order: Vec<String> = (0..4).map(|_| r.next().0).collect();
        assert_eq!(order, ["r2", "r3", "r1", "r2"]);
    }

    #[test]
    fn rotation_follows_a_hint_then_continues_after_it() {
        let mut r = Rotation::new(&addrs(5), None);
        assert_eq!(r.next().0, "r1");
        r.hint("r4");
        assert_eq!(r.next().0, "r4");
        assert_eq!(r.next().0, "r5");
        // A hint outside the list is tried, then the round goes on.
        r.hint("elsewhere:1");
        assert_eq!(r.next().0, "elsewhere:1");
        assert_eq!(r.next().0, "r1");
    }

    #[test]
    fn rotation_backs_off_after_each_full_pass_up_to_the_cap() {
        let mut r = Rotation::new(&addrs(2), None);
        let waits: Vec<Duration> = (0..14).map(|_| r.next().1).collect();
        let ms = |n| Duration::from_millis(n);
        assert_eq!(waits[0], Duration::ZERO);
        assert_eq!(waits[1], Duration::ZERO);
        assert_eq!(waits[2], ms(20));
        assert_eq!(waits[3], Duration::ZERO);
        assert_eq!(waits[4], ms(40));
        assert_eq!(waits[6], ms(80));
        assert_eq!(waits[8], ms(160));
        assert_eq!(waits[10], ms(200));
        assert_eq!(waits[12], ms(200));
    }

    #[tokio::test]
    async fn failover_moves_on_after_errors_and_follows_hints() {
        let tried = Mutex::new(Vec::new());
        let (v, at) = failover(&addrs(5), None, Duration::from_secs(5), true, |a, _| {
            tried.lock().unwrap().push(a.clone());
            async move {
                match a.as_str() {
                    "r1" => Attempt::NoConnection("refused".into()),
                    "r2" => Attempt::Refused(KvError::NotLeader(Some(LeaderHint {
                        id: 4,
                        addr: "r4".into(),
                    }))),
                    "r4" => Attempt::Done(42),
                    _ => Attempt::CallFailed("should not be tried".into()),
                }
            }
        })
        .await
        .unwrap();
        assert_eq!((v, at.as_str()), (42, "r4"));
        assert_eq!(*tried.lock().unwrap(), ["r1", "r2", "r4"]);
    }

    #[tokio::test]
    async fn without_follow_hints_only_the_given_addresses_are_tried() {
        let tried = Mutex::new(Vec::new());
        let e = failover(
            &addrs(1),
            None,
            Duration::from_millis(150),
            false,
            |a, _| {
                tried.lock().unwrap().push(a);
                async {
                    Attempt::<()>::Refused(KvError::NotLeader(Some(LeaderHint {
                        id: 4,
                        addr: "r4".into(),
                    })))
                }
            },
        )
        .await
        .unwrap_err();
        // The hint is in the message, for a person to act on.
        assert!(
            matches!(e, Error::Timeout(ref m) if m.contains("r4")),
            "{e}"
        );
        let tried = tried.lock().unwrap();
        assert!(tried.len() >= 2, "retried with backoff: {tried:?}");
        assert!(tried.iter().all(|a| a == "r1"), "{tried:?}");
    }

    #[tokio::test]
    async fn invalid_argument_is_final() {
        let mut n = 0;
        let e = failover(&addrs(3), None, Duration::from_secs(5), true, |_, _| {
            n += 1;
            async { Attempt::<()>::Refused(KvError::InvalidArgument("too big".into())) }
        })
        .await
        .unwrap_err();
        assert_eq!(e, Error::InvalidArgument("too big".into()));
        assert_eq!(n, 1);
    }

    #[tokio::test]
    async fn an_unknown_session_is_final_and_says_whether_an_earlier_attempt_may_have_applied() {
        let unknown = || Attempt::<()>::Refused(KvError::UnknownSession(9));
        // Only certain refusals before it: the write was not applied.
        let mut n = 0;
        let e = failover(&addrs(3), None, Duration::from_secs(5), true, |a, _| {
            n += 1;
            async move {
                match a.as_str() {
                    "r1" => Attempt::NoConnection("refused".into()),
                    "r2" => Attempt::Refused(KvError::NotLeader(None)),
                    _ => unknown(),
                }
            }
        })
        .await
        .unwrap_err();
        assert_eq!(e, Error::UnknownSession(9));
        assert!(!e.outcome_unknown());
        assert_eq!(n, 3, "final: not tried again");
        // After a call that failed, it may have been applied.
        for earlier in [
            Attempt::CallFailed("connection reset".into()),
            Attempt::Refused(KvError::Timeout("no quorum in time".into())),
        ] {
            let mut earlier = Some(earlier);
            let e = failover(&addrs(2), None, Duration::from_secs(5), true, |_, _| {
                let a = earlier.take().unwrap_or_else(unknown);
                async move { a }
            })
            .await
            .unwrap_err();
            assert!(matches!(e, Error::OutcomeUnknown(_)), "{e}");
            assert!(e.outcome_unknown());
        }
    }

    #[tokio::test]
    async fn all_refused_connections_until_the_budget_is_unavailable() {
        let started = Instant::now();
        let e = failover(
            &addrs(3),
            None,
            Duration::from_millis(300),
            true,
            |_, _| async { Attempt::<()>::NoConnection("connection refused".into()) },
        )
        .await
        .unwrap_err();
        let took = started.elapsed();
        assert!(
            matches!(e, Error::Unavailable(ref m) if m.contains("refused")),
            "{e}"
        );
        assert!(took >= Duration::from_millis(300), "{took:?}");
        assert!(took < Duration::from_millis(800), "{took:?}");
    }

    #[tokio::test]
    async fn budget_spent_after_a_connection_is_a_timeout() {
        let e = failover(
            &addrs(3),
            None,
            Duration::from_millis(200),
            true,
            |a, _| async move {
                if a == "r2" {
                    Attempt::<()>::Refused(KvError::NotLeader(None))
                } else {
                    Attempt::NoConnection("refused".into())
                }
            },
        )
        .await
        .unwrap_err();
        assert!(matches!(e, Error::Timeout(_)), "{e}");
    }

    #[tokio::test]
    async fn each_attempt_deadline_is_capped_and_within_the_budget() {
        let budget = Duration::from_millis(2500);
        let start = Instant::now();
        let deadlines = Mutex::new(Vec::new());
        let _ = failover(&addrs(1), None, budget, true, |_, d| {
            deadlines.lock().unwrap().push(d);
            async move {
                // A frozen replica: answers nothing until the deadline.
                tokio::time::sleep_until(d.into()).await;
                Attempt::<()>::CallFailed("deadline".into())
            }
        })
        .await;
        let ds = deadlines.lock().unwrap();
        assert!(ds.len() >= 3, "{ds:?}");
        let mut prev = start;
        for d in ds.iter() {
            // (failover reads the clock a moment after `start`.)
            assert!(*d <= start + budget + Duration::from_millis(50));
            assert!(d.duration_since(prev) <= MAX_ATTEMPT + Duration::from_millis(300));
            prev = *d;
        }
    }
}
