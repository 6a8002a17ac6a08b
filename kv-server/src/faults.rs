//! Failure injection at the peer RPC layer: dropped messages, delays,
//! forced timeouts and cut links (partitions), set at start and changeable
//! at run time through the client API's `set_faults`.
//!
//! Random choices come from one seeded generator, so a run with the same
//! seed and the same message order makes the same choices.
//!
//! Run-time changes are off unless the replica was started with
//! `--enable-fault-injection` ([`Faults::allow_changes`]): otherwise anyone
//! who reaches the client port could partition the cluster with a few
//! calls. A report-only call (an empty change) is answered either way: it
//! changes nothing, and tools read the counters with it.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use kv_api::{FaultReport, FaultSpec, KvError, ReplicaId};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// The fault settings in force.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct FaultState {
    /// Probability of dropping an outgoing message.
    pub drop_rate: f64,
    /// Delay range in milliseconds, inclusive.
    pub delay_ms: (u64, u64),
    /// Probability of holding a call until its deadline.
    pub timeout_rate: f64,
    /// Peers whose links are cut, both ways.
    pub isolated: HashSet<ReplicaId>,
}

impl FaultState {
    /// Whether nothing is injected.
    pub fn is_healthy(&self) -> bool {
        *self == FaultState::default()
    }

    fn spec(&self) -> FaultSpec {
        let mut isolate: Vec<ReplicaId> = self.isolated.iter().copied().collect();
        isolate.sort_unstable();
        FaultSpec {
            drop_rate: Some(self.drop_rate),
            delay_ms: Some(self.delay_ms),
            timeout_rate: Some(self.timeout_rate),
            isolate: Some(isolate),
            heal: false,
        }
    }
}

/// What to do with one outgoing message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fate {
    /// Send it after this delay (zero: now).
    Send(Duration),
    /// Do not send it; the caller sees no answer.
    Drop,
    /// Hold the call until its deadline, then fail it.
    Timeout,
}

/// The injector one replica shares between its tasks.
pub struct Faults {
    inner: Mutex<(FaultState, StdRng)>,
    dropped: AtomicU64,
    delayed: AtomicU64,
    timed_out: AtomicU64,
    refused: AtomicU64,
    /// Whether run-time changes are allowed (`--enable-fault-injection`).
    changes_allowed: bool,
}

impl Faults {
    /// An injector with `spec` applied to a healthy state.
    pub fn new(spec: &FaultSpec, seed: u64) -> Faults {
        let f = Faults {
            inner: Mutex::new((FaultState::default(), StdRng::seed_from_u64(seed))),
            dropped: AtomicU64::new(0),
            delayed: AtomicU64::new(0),
            timed_out: AtomicU64::new(0),
            refused: AtomicU64::new(0),
            changes_allowed: false,
        };
        f.change(spec);
        f
    }

    /// Allows (or not) changes at run time through `set_faults`; they are
    /// refused by default.
    pub fn allow_changes(mut self, allowed: bool) -> Faults {
        self.changes_allowed = allowed;
        self
    }

    /// Whether replica `id` may make `change` at run time: an empty change
    /// (report only) always, any other only if changes are allowed;
    /// otherwise [`KvError::Disabled`] saying how to allow them.
    pub fn check_change(&self, id: ReplicaId, change: &FaultSpec) -> Result<(), KvError> {
        if self.changes_allowed || *change == FaultSpec::default() {
            return Ok(());
        }
        Err(KvError::Disabled(format!(
            "fault injection is off on replica {id}; start it with --enable-fault-injection \
             to change its faults (for tests and demonstrations only)"
        )))
    }

    /// Applies a change; reports the settings now in force and the counts.
    pub fn change(&self, spec: &FaultSpec) -> FaultReport {
        let settings = self.apply(spec);
        FaultReport {
            settings,
            dropped: self.dropped.load(Ordering::Relaxed),
            delayed: self.delayed.load(Ordering::Relaxed),
            timed_out: self.timed_out.load(Ordering::Relaxed),
            refused: self.refused.load(Ordering::Relaxed),
        }
    }

    fn apply(&self, spec: &FaultSpec) -> FaultSpec {
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let state = &mut g.0;
        if spec.heal {
            *state = FaultState::default();
        }
        if let Some(r) = spec.drop_rate {
            state.drop_rate = r;
        }
        if let Some(d) = spec.delay_ms {
            state.delay_ms = d;
        }
        if let Some(r) = spec.timeout_rate {
            state.timeout_rate = r;
        }
        if let Some(ids) = &spec.isolate {
            state.isolated = ids.iter().copied().collect();
        }
        if !state.is_healthy() {
            tracing::warn!(faults = ?state, "failure injection active");
        }
        state.spec()
    }

    /// Whether nothing is injected now.
    pub fn is_healthy(&self) -> bool {
        let g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        g.0.is_healthy()
    }

    /// Whether the link with `peer` is cut; counts a refused request if so.
    pub fn refuse_from(&self, peer: ReplicaId) -> bool {
        let g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let cut = g.0.isolated.contains(&peer);
        if cut {
            self.refused.fetch_add(1, Ordering::Relaxed);
            crate::metrics::global().fault("refuse");
        }
        cut
    }

    /// Decides the fate of one message to `to`, and counts it.
    pub fn fate(&self, to: ReplicaId) -> Fate {
        let fate = self.choose(to);
        let (counter, kind) = match fate {
            Fate::Drop => (&self.dropped, "drop"),
            Fate::Timeout => (&self.timed_out, "timeout"),
            Fate::Send(d) if !d.is_zero() => (&self.delayed, "delay"),
            Fate::Send(_) => return fate,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        crate::metrics::global().fault(kind);
        fate
    }

    fn choose(&self, to: ReplicaId) -> Fate {
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let (state, rng) = &mut *g;
        if state.is_healthy() {
            return Fate::Send(Duration::ZERO);
        }
        if state.isolated.contains(&to) {
            return Fate::Drop;
        }
        if state.drop_rate > 0.0 && rng.random_bool(state.drop_rate) {
            return Fate::Drop;
        }
        if state.timeout_rate > 0.0 && rng.random_bool(state.timeout_rate) {
            return Fate::Timeout;
        }
        let (lo, hi) = state.delay_ms;
        let ms = if hi > 0 { rng.random_range(lo..=hi) } else { 0 };
        Fate::Send(Duration::from_millis(ms))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn healthy_by_default_and_heal_resets() {
        let f = Faults::new(&FaultSpec::default(), 1);
        assert_eq!(f.fate(2), Fate::Send(Duration::ZERO));
        f.change(&FaultSpec {
            isolate: Some(vec![2]),
            drop_rate: Some(1.0),
            ..Default::default()
        });
        assert!(f.refuse_from(2));
        assert_eq!(f.fate(2), Fate::Drop);
        assert_eq!(f.fate(3), Fate::Drop);
        let now = f.change(&FaultSpec {
            heal: true,
            ..Default::default()
        });
        assert_eq!(now.settings.isolate, Some(vec![]));
        assert_eq!(now.dropped, 2);
        assert_eq!(now.refused, 1);
        assert_eq!(f.fate(2), Fate::Send(Duration::ZERO));
    }

    #[test]
    fn run_time_changes_are_refused_unless_allowed_but_reports_are_answered() {
        let change = FaultSpec {
            isolate: Some(vec![2]),
            ..Default::default()
        };
        let off = Faults::new(&FaultSpec::default(), 1);
        match off.check_change(3, &change) {
            Err(KvError::Disabled(why)) => {
                assert!(why.contains("replica 3"), "{why}");
                assert!(why.contains("--enable-fault-injection"), "{why}");
            }
            other => panic!("expected Disabled, got {other:?}"),
        }
        assert_eq!(off.check_change(3, &FaultSpec::default()), Ok(()));
        let on = Faults::new(&FaultSpec::default(), 1).allow_changes(true);
        assert_eq!(on.check_change(3, &change), Ok(()));
    }

    #[test]
    fn same_seed_same_choices() {
        let spec = FaultSpec {
            drop_rate: Some(0.3),
            delay_ms: Some((1, 50)),
            timeout_rate: Some(0.1),
            ..Default::default()
        };
        let a = Faults::new(&spec, 42);
        let b = Faults::new(&spec, 42);
        let fa: Vec<Fate> = (0..200).map(|i| a.fate(i % 5)).collect();
        let fb: Vec<Fate> = (0..200).map(|i| b.fate(i % 5)).collect();
        assert_eq!(fa, fb);
        let drops = fa.iter().filter(|f| **f == Fate::Drop).count();
        assert!((30..=100).contains(&drops), "about 30% dropped: {drops}");
    }
}
