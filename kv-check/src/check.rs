//! The checker: partition by key, pre-check, and the WGL search per key.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt::{self, Write as _};
use std::time::{Duration, Instant};

use crate::{format, Event, Op, Outcome, Ret};

/// Limits on the work [`check`] may do before giving up with
/// [`Verdict::Unknown`]. The search is exponential in the worst case; the
/// budget keeps a pathological history from hanging a test run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Budget {
    /// Search steps allowed per key (one step tries one call entry or
    /// backtracks once).
    pub max_steps_per_key: u64,
    /// Approximate memory the per-key cache of visited configurations may
    /// use, in bytes.
    pub max_cache_bytes_per_key: usize,
    /// Wall-clock time allowed for the whole check; `None`: no limit.
    pub max_time: Option<Duration>,
}

impl Default for Budget {
    /// 20 million steps and 512 MiB of cache per key, 60 seconds overall:
    /// far more than a linearizable history of a few thousand operations
    /// per key needs.
    fn default() -> Budget {
        Budget {
            max_steps_per_key: 20_000_000,
            max_cache_bytes_per_key: 512 << 20,
            max_time: Some(Duration::from_secs(60)),
        }
    }
}

impl Budget {
    /// No limits at all (use only on histories known to be small).
    pub fn unlimited() -> Budget {
        Budget {
            max_steps_per_key: u64::MAX,
            max_cache_bytes_per_key: usize::MAX,
            max_time: None,
        }
    }

    /// This budget with `steps` search steps per key.
    pub fn with_steps(mut self, steps: u64) -> Budget {
        self.max_steps_per_key = steps;
        self
    }

    /// This budget with `time` of wall-clock time overall.
    pub fn with_time(mut self, time: Duration) -> Budget {
        self.max_time = Some(time);
        self
    }
}

/// The conclusion of [`check`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Every key's sub-history is linearizable, hence the whole history is.
    Linearizable,
    /// The operations on `key` have no linearization.
    NotLinearizable {
        /// The key whose sub-history is not linearizable (the first one found,
        /// in key order).
        key: Vec<u8>,
        /// A multi-line explanation for a person: the operations involved,
        /// with their times, and why the last one cannot be placed.
        explanation: String,
    },
    /// The budget ran out before every key was decided; no violation was
    /// found among the keys that were.
    Unknown {
        /// The keys left undecided.
        keys: Vec<Vec<u8>>,
        /// Which limit was hit.
        reason: String,
    },
    /// The history itself is malformed, so nothing was checked.
    InvalidHistory {
        /// Index of the offending event in the history passed to [`check`].
        index: usize,
        /// What is wrong with it.
        reason: String,
    },
}

impl Verdict {
    /// Whether the verdict is [`Verdict::Linearizable`].
    pub fn is_linearizable(&self) -> bool {
        matches!(self, Verdict::Linearizable)
    }

    /// Whether the verdict is [`Verdict::NotLinearizable`].
    pub fn is_violation(&self) -> bool {
        matches!(self, Verdict::NotLinearizable { .. })
    }
}

/// What [`check`] found, with some statistics.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Report {
    /// The conclusion.
    pub verdict: Verdict,
    /// Keys whose sub-history was decided (linearizable or not).
    pub keys_checked: usize,
    /// Operations in the decided keys' sub-histories (after dropping failed
    /// operations and unknown-outcome reads).
    pub ops_checked: usize,
    /// Search steps taken over all keys.
    pub steps: u64,
}

impl Report {
    /// Whether the verdict is [`Verdict::Linearizable`].
    pub fn is_linearizable(&self) -> bool {
        self.verdict.is_linearizable()
    }

    /// Panics with the whole report unless the verdict is
    /// [`Verdict::Linearizable`] (so also when the budget ran out).
    #[track_caller]
    pub fn assert_linearizable(&self) {
        if !self.is_linearizable() {
            panic!("history check failed: {self}");
        }
    }

    /// Panics with the whole report if the history is not linearizable or is
    /// malformed; an undecided ([`Verdict::Unknown`]) check only prints a
    /// warning to stderr.
    #[track_caller]
    pub fn assert_no_violation(&self) {
        match &self.verdict {
            Verdict::Linearizable => {}
            Verdict::Unknown { .. } => eprintln!("warning: history check undecided: {self}"),
            Verdict::NotLinearizable { .. } | Verdict::InvalidHistory { .. } => {
                panic!("history check failed: {self}")
            }
        }
    }
}

impl Verdict {
    /// The one-line summary (the first line of the `Display` form).
    fn headline(&self) -> String {
        match self {
            Verdict::Linearizable => "linearizable".to_string(),
            Verdict::NotLinearizable { key, .. } => {
                format!("NOT linearizable: key {}", format::bytes(key))
            }
            Verdict::Unknown { keys, reason } => {
                let shown: Vec<String> = keys.iter().take(10).map(|k| format::bytes(k)).collect();
                format!(
                    "unknown: {} key(s) undecided ({}{}): {reason}",
                    keys.len(),
                    shown.join(", "),
                    if keys.len() > 10 { ", ..." } else { "" }
                )
            }
            Verdict::InvalidHistory { index, reason } => {
                format!("invalid history: event #{index}: {reason}")
            }
        }
    }
}

/// The headline, then (for a violation) the explanation on the following
/// lines.
impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.headline())?;
        if let Verdict::NotLinearizable { explanation, .. } = self {
            write!(f, "\n{}", explanation.trim_end())?;
        }
        Ok(())
    }
}

/// Like the verdict's, with the statistics on the first line.
impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} ({} key(s), {} operation(s) checked, {} search step(s))",
            self.verdict.headline(),
            self.keys_checked,
            self.ops_checked,
            self.steps
        )?;
        if let Verdict::NotLinearizable { explanation, .. } = &self.verdict {
            write!(f, "\n{}", explanation.trim_end())?;
        }
        Ok(())
    }
}

/// Checks whether `history` is linearizable with respect to a map of
/// independent registers (see the crate documentation for the model and the
/// meaning of each [`Outcome`]). Events may be given in any order.
///
/// Keys are checked independently, in key order; the first key found not
/// linearizable decides the verdict. A key that exhausts the budget makes the
/// verdict [`Verdict::Unknown`] unless another key is found not linearizable.
pub fn check(history: &[Event], budget: Budget) -> Report {
    let deadline = budget.max_time.map(|d| Instant::now() + d);
    let mut report = Report {
        verdict: Verdict::Linearizable,
        keys_checked: 0,
        ops_checked: 0,
        steps: 0,
    };

    let mut by_key: BTreeMap<&[u8], Vec<usize>> = BTreeMap::new();
    for (i, e) in history.iter().enumerate() {
        if let Err(reason) = validate(e) {
            report.verdict = Verdict::InvalidHistory { index: i, reason };
            return report;
        }
        let relevant = match e.outcome {
            Outcome::Ok(_) => true,
            Outcome::Failed => false,
            Outcome::Unknown => e.op.is_write(),
        };
        if relevant {
            by_key.entry(e.op.key()).or_default().push(i);
        }
    }

    let mut undecided: Vec<Vec<u8>> = Vec::new();
    let mut reasons: Vec<String> = Vec::new();
    for (key, events) in by_key {
        if deadline.is_some_and(|d| Instant::now() >= d) {
            if reasons.is_empty() {
                reasons.push("the time budget ran out".to_string());
            }
            undecided.push(key.to_vec());
            continue;
        }
        let sub = KeyHistory::new(history, &events);
        if let Some(explanation) = sub.precheck() {
            report.keys_checked += 1;
            report.ops_checked += events.len();
            report.verdict = Verdict::NotLinearizable {
                key: key.to_vec(),
                explanation,
            };
            return report;
        }
        let limits = Limits {
            max_steps: budget.max_steps_per_key,
            max_cache_bytes: budget.max_cache_bytes_per_key,
            deadline,
        };
        let (result, steps) = sub.search(&limits);
        report.steps += steps;
        match result {
            Search::Linearizable => {
                report.keys_checked += 1;
                report.ops_checked += events.len();
            }
            Search::Violation { prefix } => {
                report.keys_checked += 1;
                report.ops_checked += events.len();
                report.verdict = Verdict::NotLinearizable {
                    key: key.to_vec(),
                    explanation: sub.explain(&prefix),
                };
                return report;
            }
            Search::OutOfBudget(why) => {
                if reasons.len() < 3 {
                    reasons.push(format!(
                        "key {} ({} operations): {why}",
                        format::bytes(key),
                        events.len()
                    ));
                }
                undecided.push(key.to_vec());
            }
        }
    }
    if !undecided.is_empty() {
        report.verdict = Verdict::Unknown {
            keys: undecided,
            reason: reasons.join("; "),
        };
    }
    report
}

fn validate(e: &Event) -> Result<(), String> {
    if let Outcome::Ok(ret) = &e.outcome {
        if !ret.matches(&e.op) {
            return Err(format!(
                "result {ret:?} does not belong to operation {}",
                format::op(&e.op)
            ));
        }
    }
    if !matches!(e.outcome, Outcome::Unknown) && e.complete < e.invoke {
        return Err(format!(
            "completes at {} before it is invoked at {}",
            e.complete, e.invoke
        ));
    }
    Ok(())
}

/// A register state: 0 is "absent", `v` is the interned value `v - 1`.
type State = u32;

/// An operation on one key, with values interned as [`State`]s.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum Kind {
    /// Store `0`.
    Put(State),
    /// Observed the state.
    Get(State),
    /// Remove; observed whether the key existed (`None`: unobserved).
    Delete(Option<bool>),
    /// Compare-and-swap; observed `(swapped, state after)` (`None`:
    /// unobserved).
    Cas {
        expected: State,
        new: State,
        observed: Option<(bool, State)>,
    },
}

impl Kind {
    /// Applies the operation to `state`: the state after it and the result it
    /// would return, as (swapped / existed, state) where meaningful.
    fn apply(self, state: State) -> (State, Applied) {
        match self {
            Kind::Put(v) => (v, Applied::Put),
            Kind::Get(_) => (state, Applied::Get(state)),
            Kind::Delete(_) => (0, Applied::Delete(state != 0)),
            Kind::Cas { expected, new, .. } => {
                if state == expected {
                    (new, Applied::Cas(true, new))
                } else {
                    (state, Applied::Cas(false, state))
                }
            }
        }
    }

    /// Whether the observed result implies the operation left the state as it
    /// was, wherever it is placed.
    fn never_changes_state(self) -> bool {
        match self {
            Kind::Get(_) | Kind::Delete(Some(false)) => true,
            Kind::Cas {
                expected,
                new,
                observed: Some((swapped, _)),
            } => !swapped || expected == new,
            Kind::Put(_) | Kind::Delete(_) | Kind::Cas { .. } => false,
        }
    }

    /// The state after applying the operation to `state`, if the result it
    /// would return agrees with the observed one.
    pub(crate) fn step(self, state: State) -> Option<State> {
        let (after, applied) = self.apply(state);
        let agrees = match (self, applied) {
            (Kind::Put(_), _) => true,
            (Kind::Get(seen), Applied::Get(s)) => seen == s,
            (Kind::Delete(seen), Applied::Delete(existed)) => {
                seen.is_none() || seen == Some(existed)
            }
            (Kind::Cas { observed, .. }, Applied::Cas(swapped, now)) => {
                observed.is_none() || observed == Some((swapped, now))
            }
            _ => unreachable!("apply answers in kind"),
        };
        agrees.then_some(after)
    }
}

/// What an operation would return in some state.
#[derive(Clone, Copy, Debug)]
enum Applied {
    Put,
    Get(State),
    Delete(bool),
    Cas(bool, State),
}

/// One operation of a key's sub-history.
#[derive(Clone, Debug)]
pub(crate) struct KeyOp {
    /// Index of the event in the full history.
    pub(crate) event: usize,
    /// Invocation time.
    pub(crate) call: u128,
    /// Completion time; `u128::MAX` (after every real time) if unknown.
    pub(crate) ret: u128,
    /// The operation and its observation.
    pub(crate) kind: Kind,
}

/// The sub-history of one key, ready for searching.
pub(crate) struct KeyHistory<'a> {
    history: &'a [Event],
    /// Interned values; state `v` is `values[v - 1]`.
    values: Vec<&'a [u8]>,
    pub(crate) ops: Vec<KeyOp>,
}

impl<'a> KeyHistory<'a> {
    /// Builds the sub-history made of `history[i]` for `i` in `events`
    /// (which must all be on one key, and be completed operations or
    /// unknown-outcome writes).
    pub(crate) fn new(history: &'a [Event], events: &[usize]) -> KeyHistory<'a> {
        let mut ids: HashMap<&'a [u8], State> = HashMap::new();
        let mut values: Vec<&'a [u8]> = Vec::new();
        let mut intern = |v: Option<&'a [u8]>| -> State {
            match v {
                None => 0,
                Some(v) => *ids.entry(v).or_insert_with(|| {
                    values.push(v);
                    values.len() as State
                }),
            }
        };
        let mut ops = Vec::with_capacity(events.len());
        for &i in events {
            let e = &history[i];
            let ret = match &e.outcome {
                Outcome::Ok(r) => Some(r),
                Outcome::Unknown => None,
                Outcome::Failed => unreachable!("failed operations are dropped"),
            };
            let kind = match (&e.op, ret) {
                (Op::Put { value, .. }, _) => Kind::Put(intern(Some(value))),
                (Op::Get { .. }, Some(Ret::Get(v))) => Kind::Get(intern(v.as_deref())),
                (Op::Delete { .. }, Some(Ret::Delete(existed))) => Kind::Delete(Some(*existed)),
                (Op::Delete { .. }, None) => Kind::Delete(None),
                (Op::Cas { expected, new, .. }, ret) => {
                    let expected = intern(expected.as_deref());
                    let new = intern(Some(new));
                    let observed = match ret {
                        Some(Ret::Cas { swapped, current }) => {
                            Some((*swapped, intern(current.as_deref())))
                        }
                        _ => None,
                    };
                    Kind::Cas {
                        expected,
                        new,
                        observed,
                    }
                }
                _ => unreachable!("validated and filtered before"),
            };
            ops.push(KeyOp {
                event: i,
                call: u128::from(e.invoke),
                ret: match ret {
                    Some(_) => u128::from(e.complete),
                    None => u128::MAX,
                },
                kind,
            });
        }
        KeyHistory {
            history,
            values,
            ops,
        }
    }

    fn show_state(&self, s: State) -> String {
        match s {
            0 => "absent".to_string(),
            v => format::bytes(self.values[v as usize - 1]),
        }
    }

    fn show_op(&self, i: usize) -> String {
        let e = self.ops[i].event;
        format!("#{e} {}", self.history[e])
    }

    /// Rejects results that no reachable state can produce (a read of a value
    /// nothing writes, a self-contradictory CAS result...). Exact: every
    /// reachable state is "absent" or a value some put or CAS writes.
    pub(crate) fn precheck(&self) -> Option<String> {
        let written: HashSet<State> = self
            .ops
            .iter()
            .filter_map(|o| match o.kind {
                Kind::Put(v) => Some(v),
                Kind::Cas { new, .. } => Some(new),
                _ => None,
            })
            .collect();
        let reachable = |s: State| s == 0 || written.contains(&s);
        for (i, o) in self.ops.iter().enumerate() {
            let why = match o.kind {
                Kind::Get(seen) if !reachable(seen) => format!(
                    "it read {}, which no put or cas on this key ever writes",
                    self.show_state(seen)
                ),
                Kind::Delete(Some(true)) if written.is_empty() => {
                    "it reports the key existed, but nothing ever writes this key".to_string()
                }
                Kind::Cas {
                    expected,
                    new,
                    observed: Some((swapped, now)),
                } => {
                    if swapped && now != new {
                        format!(
                            "it reports it swapped, yet the value after it is {} rather than its new value",
                            self.show_state(now)
                        )
                    } else if swapped && !reachable(expected) {
                        format!(
                            "it swapped, so the key held {}, which no put or cas on this key ever writes",
                            self.show_state(expected)
                        )
                    } else if !swapped && now == expected {
                        format!(
                            "it reports it did not swap, yet the value it found ({}) is the expected one",
                            self.show_state(now)
                        )
                    } else if !swapped && !reachable(now) {
                        format!(
                            "it found {}, which no put or cas on this key ever writes",
                            self.show_state(now)
                        )
                    } else {
                        continue;
                    }
                }
                _ => continue,
            };
            return Some(format!(
                "No state of the key can produce the result of\n    {}\nbecause {why}.",
                self.show_op(i)
            ));
        }
        None
    }

    /// The Wing–Gong / Lowe search with Porcupine's cache of visited
    /// configurations. Returns the result and the number of steps taken.
    pub(crate) fn search(&self, limits: &Limits) -> (Search, u64) {
        const NIL: usize = usize::MAX;
        const HEAD: usize = 0;
        let n = self.ops.len();

        // Entries: node 0 is the list head; nodes 1..=2n are call and return
        // entries sorted by time, calls before returns at equal times.
        let mut order: Vec<(u128, bool, usize)> = Vec::with_capacity(2 * n);
        for (i, o) in self.ops.iter().enumerate() {
            order.push((o.call, false, i));
            order.push((o.ret, true, i));
        }
        order.sort();
        let nodes = 2 * n + 1;
        let mut op_of = vec![NIL; nodes];
        let mut is_call = vec![false; nodes];
        let mut partner = vec![NIL; nodes];
        let mut call_node = vec![NIL; n];
        let mut ret_node = vec![NIL; n];
        for (j, &(_, is_ret, i)) in order.iter().enumerate() {
            let node = j + 1;
            op_of[node] = i;
            is_call[node] = !is_ret;
            if is_ret {
                ret_node[i] = node;
            } else {
                call_node[i] = node;
            }
        }
        for i in 0..n {
            partner[call_node[i]] = ret_node[i];
        }
        // Symmetry reduction: unknown-outcome operations with identical
        // effects are interchangeable, so the search linearizes them only in
        // invocation order — `twin_before[i]` must be linearized before `i`.
        // (Exact: in any linearization, giving the k-th used position of a
        // class to the k-th invoked member of the class keeps it valid, as an
        // earlier invocation only relaxes the real-time constraints and an
        // unknown operation's completion is +∞.)
        let mut twin_before = vec![NIL; n];
        let mut last_of_kind: HashMap<Kind, usize> = HashMap::new();
        for &(_, is_ret, i) in &order {
            if !is_ret && self.ops[i].ret == u128::MAX {
                if let Some(j) = last_of_kind.insert(self.ops[i].kind, i) {
                    twin_before[i] = j;
                }
            }
        }
        let mut next: Vec<usize> = (0..nodes)
            .map(|j| if j + 1 < nodes { j + 1 } else { NIL })
            .collect();
        let mut prev: Vec<usize> = (0..nodes)
            .map(|j| if j == 0 { NIL } else { j - 1 })
            .collect();

        // Removes a call entry and its return entry from the list.
        let lift = |next: &mut Vec<usize>, prev: &mut Vec<usize>, call: usize| {
            for node in [call, partner[call]] {
                next[prev[node]] = next[node];
                if next[node] != NIL {
                    prev[next[node]] = prev[node];
                }
            }
        };
        // Puts them back, in the reverse order.
        let unlift = |next: &mut Vec<usize>, prev: &mut Vec<usize>, call: usize| {
            for node in [partner[call], call] {
                next[prev[node]] = node;
                if next[node] != NIL {
                    prev[next[node]] = node;
                }
            }
        };

        let words = n.div_ceil(64);
        let entry_bytes = words * 8 + 48;
        let mut linearized = vec![0u64; words];
        let is_set = |bits: &[u64], i: usize| bits[i / 64] & (1 << (i % 64)) != 0;
        let mut cache: HashMap<State, HashSet<Box<[u64]>>> = HashMap::new();
        let mut cache_bytes = 0usize;
        let mut stack: Vec<Frame> = Vec::new();
        let mut best: Vec<usize> = Vec::new();
        let mut state: State = 0;
        let mut steps: u64 = 0;
        let mut next_clock_check: u64 = 1024;
        let unknown = |i: usize| self.ops[i].ret == u128::MAX;
        let known_total = (0..n).filter(|&i| !unknown(i)).count();
        let mut known_left = known_total;
        let mut best_known = 0;
        let mut entry = next[HEAD];
        // Whether the search just reached a new configuration.
        let mut arrived = true;

        // Done when every completed operation is linearized: the unknown ones
        // left over are the ones that never took effect (equivalently, took
        // effect after everything else, which always succeeds as nothing
        // observes them).
        while known_left > 0 {
            steps += 1;
            if steps > limits.max_steps {
                let why = format!(
                    "step budget of {} exhausted (at most {best_known} of the {known_total} completed operations linearized)",
                    limits.max_steps
                );
                return (Search::OutOfBudget(why), steps);
            }
            if steps >= next_clock_check {
                next_clock_check = steps + 1024;
                if limits.deadline.is_some_and(|d| Instant::now() >= d) {
                    let why = format!(
                        "time budget exhausted (at most {best_known} of the {known_total} completed operations linearized)"
                    );
                    return (Search::OutOfBudget(why), steps);
                }
            }
            // A completed operation is left, so its return entry comes before
            // the end of the list (unknown ones return at +∞, after it).
            debug_assert!(entry != NIL, "a return entry always precedes the end");

            // The move to try: (call entry, state after it, forced).
            let mut chosen = None;
            if arrived {
                // Forced moves: a candidate whose observed result says it
                // changed nothing (a read, a CAS that did not swap, a delete
                // of an absent key) and that matches the current state can
                // always go first — moving it to the front of any successful
                // continuation keeps that valid, as it observed the same state
                // there, changed nothing, and every remaining operation
                // returned after it was invoked. So it is the only move worth
                // trying here. (Not so for puts or unknown operations: their
                // effect depends on where they go.)
                arrived = false;
                let mut e = next[HEAD];
                while is_call[e] {
                    steps += 1;
                    let i = op_of[e];
                    let twin = twin_before[i];
                    let allowed = twin == NIL || is_set(&linearized, twin);
                    let kind = self.ops[i].kind;
                    if allowed && kind.never_changes_state() && kind.step(state).is_some() {
                        chosen = Some((e, state, true));
                        break;
                    }
                    e = next[e];
                }
                if chosen.is_none() {
                    entry = next[HEAD];
                    continue;
                }
            } else if is_call[entry] {
                let i = op_of[entry];
                let twin = twin_before[i];
                if twin == NIL || is_set(&linearized, twin) {
                    chosen = self.ops[i]
                        .kind
                        .step(state)
                        .map(|after| (entry, after, false));
                }
                if chosen.is_none() {
                    entry = next[entry];
                    continue;
                }
            }
            // else: a return entry — that operation returned before being
            // linearized, so this configuration has no more moves.

            if let Some((call, after, forced)) = chosen {
                let i = op_of[call];
                linearized[i / 64] |= 1 << (i % 64);
                let seen = cache.entry(after).or_default();
                if !seen.contains(&linearized[..]) {
                    seen.insert(linearized.clone().into_boxed_slice());
                    cache_bytes = cache_bytes.saturating_add(entry_bytes);
                    if cache_bytes > limits.max_cache_bytes {
                        let why = format!(
                            "cache memory budget of {} bytes exhausted (at most {best_known} of the {known_total} completed operations linearized)",
                            limits.max_cache_bytes
                        );
                        return (Search::OutOfBudget(why), steps);
                    }
                    stack.push(Frame {
                        call,
                        before: state,
                        forced,
                    });
                    state = after;
                    lift(&mut next, &mut prev, call);
                    if !unknown(i) {
                        known_left -= 1;
                    }
                    let known_done = known_total - known_left;
                    if known_done > best_known {
                        best_known = known_done;
                        best = stack.iter().map(|f| op_of[f.call]).collect();
                    }
                    arrived = true;
                    continue;
                }
                // Already explored from there, and it failed.
                linearized[i / 64] &= !(1 << (i % 64));
                if !forced {
                    entry = next[call];
                    continue;
                }
                // A forced move that fails means this configuration fails.
            }

            // Backtrack: undo moves up to one made from a configuration that
            // still has untried candidates (not a forced one).
            loop {
                let Some(frame) = stack.pop() else {
                    return (Search::Violation { prefix: best }, steps);
                };
                let j = op_of[frame.call];
                linearized[j / 64] &= !(1 << (j % 64));
                if !unknown(j) {
                    known_left += 1;
                }
                state = frame.before;
                unlift(&mut next, &mut prev, frame.call);
                if !frame.forced {
                    entry = next[frame.call];
                    break;
                }
            }
        }
        (Search::Linearizable, steps)
    }

    /// Explains a violation from the longest linearizable prefix the search
    /// found.
    pub(crate) fn explain(&self, prefix: &[usize]) -> String {
        const SHOWN_PREFIX: usize = 12;
        const SHOWN_OTHERS: usize = 16;
        let mut out = String::new();
        let _ = writeln!(
            out,
            "The {} operations on this key (failed operations and unknown-outcome reads dropped) have no linearization.",
            self.ops.len()
        );

        // Replay the prefix to get the state after each operation.
        let mut state: State = 0;
        let mut states = Vec::with_capacity(prefix.len());
        for &i in prefix {
            let (after, _) = self.ops[i].kind.apply(state);
            state = after;
            states.push(state);
        }
        if prefix.is_empty() {
            let _ = writeln!(out, "Not even one operation can be linearized first.");
        } else {
            let skip = prefix.len().saturating_sub(SHOWN_PREFIX);
            let _ = writeln!(
                out,
                "Longest linearizable prefix found: {} operation(s){}; in linearization order, with the key's value after each:",
                prefix.len(),
                if skip > 0 {
                    format!(" (the first {skip} not shown)")
                } else {
                    String::new()
                }
            );
            for (k, &i) in prefix.iter().enumerate().skip(skip) {
                let _ = writeln!(
                    out,
                    "    {}   => {}",
                    self.show_op(i),
                    self.show_state(states[k])
                );
            }
            let _ = writeln!(out, "After it the key is {}.", self.show_state(state));
            let _ = writeln!(
                out,
                "(The search tried every order consistent with real time; this is as far as any got.)"
            );
        }

        let mut placed = vec![false; self.ops.len()];
        for &i in prefix {
            placed[i] = true;
        }
        // The remaining operation that completed first must come next, or
        // after some other remaining operation invoked before it completed.
        let Some(blocker) = (0..self.ops.len())
            .filter(|&i| !placed[i])
            .min_by_key(|&i| (self.ops[i].ret, i))
        else {
            return out;
        };
        let deadline = self.ops[blocker].ret;
        let _ = writeln!(
            out,
            "The remaining operation that completed first cannot be placed next:\n    {}\n  {}",
            self.show_op(blocker),
            self.judge(blocker, state)
        );
        // Where the value it saw came from, if it saw one.
        let seen = match self.ops[blocker].kind {
            Kind::Get(seen) => seen,
            Kind::Cas {
                observed: Some((false, now)),
                ..
            } => now,
            _ => 0,
        };
        if seen != 0 {
            let writers: Vec<usize> = (0..self.ops.len())
                .filter(|&i| match self.ops[i].kind {
                    Kind::Put(v) => v == seen,
                    Kind::Cas { new, .. } => new == seen,
                    _ => false,
                })
                .collect();
            let _ = writeln!(
                out,
                "  It saw {}, written by {} operation(s){}",
                self.show_state(seen),
                writers.len(),
                if writers.is_empty() { "." } else { ":" }
            );
            for &i in writers.iter().take(SHOWN_OTHERS) {
                let _ = writeln!(out, "    {}", self.show_op(i));
            }
        }
        let others: Vec<usize> = (0..self.ops.len())
            .filter(|&i| !placed[i] && i != blocker && self.ops[i].call <= deadline)
            .collect();
        if others.is_empty() {
            let _ = writeln!(
                out,
                "No other remaining operation was invoked before it completed, so none could go first."
            );
        } else {
            let _ = writeln!(
                out,
                "None of the {} other remaining operation(s) invoked before it completed can go first with success either:",
                others.len()
            );
            for &i in others.iter().take(SHOWN_OTHERS) {
                let _ = writeln!(
                    out,
                    "    {}\n      {}",
                    self.show_op(i),
                    self.judge(i, state)
                );
            }
            if others.len() > SHOWN_OTHERS {
                let _ = writeln!(out, "    ... and {} more", others.len() - SHOWN_OTHERS);
            }
        }
        out
    }

    /// Says why operation `i` cannot go next from `state`.
    fn judge(&self, i: usize, state: State) -> String {
        let kind = self.ops[i].kind;
        if kind.step(state).is_some() {
            return format!(
                "(consistent with {}, but every continuation from there fails)",
                self.show_state(state)
            );
        }
        let (_, applied) = kind.apply(state);
        let would = match applied {
            Applied::Put => "ok".to_string(),
            Applied::Get(0) => "absent".to_string(),
            Applied::Get(s) => format!("found {}", self.show_state(s)),
            Applied::Delete(true) => "existed".to_string(),
            Applied::Delete(false) => "did not exist".to_string(),
            Applied::Cas(swapped, now) => format!(
                "{}, now {}",
                if swapped { "swapped" } else { "not swapped" },
                self.show_state(now)
            ),
        };
        format!(
            "(with the key {} it would have returned: {would})",
            self.show_state(state)
        )
    }
}

/// A move of the search: the call entry linearized, the state before it, and
/// whether it was forced (the only move tried from its configuration).
struct Frame {
    call: usize,
    before: State,
    forced: bool,
}

/// Limits for one key's search.
pub(crate) struct Limits {
    pub(crate) max_steps: u64,
    pub(crate) max_cache_bytes: usize,
    pub(crate) deadline: Option<Instant>,
}

/// The result of one key's search.
#[derive(Debug)]
pub(crate) enum Search {
    Linearizable,
    /// Not linearizable; the longest linearizable prefix found (operation
    /// indices in linearization order).
    Violation {
        prefix: Vec<usize>,
    },
    OutOfBudget(String),
}
