//! Unit tests: known non-linearizable histories, tricky valid ones, and
//! randomized histories checked against a simulated register and against a
//! brute-force checker.

use std::collections::HashMap;

use crate::check::{KeyHistory, Limits, Search};
use crate::{check, Budget, Event, History, Op, Outcome, Recorder, Report, Ret, Verdict};

fn assert_lin(h: &History) {
    let report = h.check(Budget::default());
    assert!(
        report.is_linearizable(),
        "expected linearizable, got {report}"
    );
}

/// Asserts the history is rejected, both by `check` and by the bare search
/// (without the pre-check), and returns the explanation.
fn assert_not_lin(h: &History) -> String {
    let report = h.check(Budget::default());
    let Verdict::NotLinearizable { explanation, .. } = &report.verdict else {
        panic!("expected a violation, got {report}");
    };
    for (_, events) in by_key(h) {
        let sub = KeyHistory::new(h, &events);
        let (result, _) = sub.search(&no_limits());
        if matches!(result, Search::Violation { .. }) {
            return format!("{report}\n{explanation}");
        }
    }
    panic!("the pre-check rejected it but the search alone accepts it: {report}");
}

fn no_limits() -> Limits {
    Limits {
        max_steps: u64::MAX,
        max_cache_bytes: usize::MAX,
        deadline: None,
    }
}

/// The events `check` would search, by key.
fn by_key(h: &[Event]) -> Vec<(Vec<u8>, Vec<usize>)> {
    let mut m: std::collections::BTreeMap<Vec<u8>, Vec<usize>> = Default::default();
    for (i, e) in h.iter().enumerate() {
        let keep = match e.outcome {
            Outcome::Ok(_) => true,
            Outcome::Failed => false,
            Outcome::Unknown => e.op.is_write(),
        };
        if keep {
            m.entry(e.op.key().to_vec()).or_default().push(i);
        }
    }
    m.into_iter().collect()
}

fn put(k: &str, v: &str) -> Op {
    Op::put(k, v)
}

fn get(k: &str) -> Op {
    Op::get(k)
}

fn found(v: &str) -> Ret {
    Ret::found(v)
}

const ABSENT: Ret = Ret::Get(None);

// ---------------------------------------------------------------- rejects

#[test]
fn rejects_stale_read_after_completed_write() {
    let h = History::new()
        .ok(1, put("x", "1"), Ret::Put, 0, 10)
        .ok(2, get("x"), ABSENT, 20, 30);
    let why = assert_not_lin(&h);
    assert!(why.contains("\"x\""), "{why}");

    let h = History::new()
        .ok(1, put("x", "1"), Ret::Put, 0, 10)
        .ok(1, put("x", "2"), Ret::Put, 20, 30)
        .ok(2, get("x"), found("1"), 40, 50);
    assert_not_lin(&h);
}

#[test]
fn rejects_lost_acknowledged_write() {
    let h = History::new()
        .ok(1, put("x", "a"), Ret::Put, 0, 10)
        .ok(2, get("x"), found("a"), 20, 30)
        .ok(1, put("x", "b"), Ret::Put, 40, 50)
        .ok(2, get("x"), found("a"), 60, 70)
        .ok(3, get("x"), found("a"), 80, 90);
    let why = assert_not_lin(&h);
    assert!(why.contains("put(\"x\", \"b\")"), "{why}");
}

#[test]
fn rejects_read_of_value_never_written() {
    let h =
        History::new()
            .ok(1, put("x", "a"), Ret::Put, 0, 10)
            .ok(2, get("x"), found("zzz"), 5, 30);
    let why = assert_not_lin(&h);
    assert!(
        why.contains("\"zzz\"") && why.contains("ever writes"),
        "{why}"
    );
}

#[test]
fn rejects_cas_that_swapped_on_mismatch() {
    // "b" is written, but only after the CAS completed.
    let h = History::new()
        .ok(1, put("x", "a"), Ret::Put, 0, 10)
        .ok(2, Op::cas("x", Some("b"), "c"), Ret::swapped("c"), 20, 30)
        .ok(1, put("x", "b"), Ret::Put, 40, 50);
    assert_not_lin(&h);

    // "expected absent" while the key held a value.
    let h = History::new().ok(1, put("x", "a"), Ret::Put, 0, 10).ok(
        2,
        Op::cas("x", None::<&str>, "c"),
        Ret::swapped("c"),
        20,
        30,
    );
    assert_not_lin(&h);

    // Reports no swap although the value matched.
    let h = History::new()
        .ok(1, put("x", "a"), Ret::Put, 0, 10)
        .ok(1, put("x", "b"), Ret::Put, 12, 14)
        .ok(
            2,
            Op::cas("x", Some("a"), "c"),
            Ret::not_swapped(Some("a")),
            20,
            30,
        );
    assert_not_lin(&h);
}

#[test]
fn rejects_sequential_puts_read_in_reverse() {
    let h = History::new()
        .ok(1, put("x", "a"), Ret::Put, 0, 10)
        .ok(1, put("x", "b"), Ret::Put, 20, 30)
        .ok(2, get("x"), found("b"), 40, 50)
        .ok(3, get("x"), found("a"), 60, 70);
    assert_not_lin(&h);
}

#[test]
fn rejects_reads_disagreeing_on_order_of_concurrent_puts() {
    // Two concurrent puts may land in either order, but all readers must
    // agree: after seeing b then a, nobody may see b again.
    let h = History::new()
        .ok(1, put("x", "a"), Ret::Put, 0, 100)
        .ok(2, put("x", "b"), Ret::Put, 0, 100)
        .ok(3, get("x"), found("b"), 10, 20)
        .ok(3, get("x"), found("a"), 30, 40)
        .ok(4, get("x"), found("b"), 50, 60);
    assert_not_lin(&h);
}

#[test]
fn rejects_failed_write_being_observed() {
    let h = History::new()
        .ok(1, put("x", "a"), Ret::Put, 0, 10)
        .failed(1, put("x", "b"), 20, 30)
        .ok(2, get("x"), found("b"), 40, 50);
    assert_not_lin(&h);
}

#[test]
fn rejects_unknown_write_observed_before_its_invocation() {
    let h = History::new()
        .ok(2, get("x"), found("a"), 0, 10)
        .unknown(1, put("x", "a"), 20);
    assert_not_lin(&h);
}

#[test]
fn rejects_unknown_write_observed_then_unobserved_then_observed() {
    // An unknown write takes effect once: its value cannot come back after
    // being overwritten.
    let h = History::new()
        .unknown(1, put("x", "a"), 0)
        .ok(2, get("x"), found("a"), 10, 20)
        .ok(2, put("x", "b"), Ret::Put, 30, 40)
        .ok(2, get("x"), found("a"), 50, 60);
    assert_not_lin(&h);
}

#[test]
fn rejects_double_delete_that_both_existed() {
    let h = History::new()
        .ok(1, put("x", "a"), Ret::Put, 0, 10)
        .ok(1, Op::delete("x"), Ret::Delete(true), 20, 30)
        .ok(2, Op::delete("x"), Ret::Delete(true), 40, 50);
    assert_not_lin(&h);
}

// ---------------------------------------------------------------- accepts

#[test]
fn accepts_concurrent_put_and_get_seeing_either_value() {
    for seen in [None, Some("1")] {
        let h = History::new()
            .ok(1, put("x", "1"), Ret::Put, 0, 10)
            .ok(2, get("x"), Ret::Get(seen.map(|s| s.into())), 5, 15)
            .ok(2, get("x"), found("1"), 20, 30);
        assert_lin(&h);
    }
    // Touching intervals count as concurrent.
    let h = History::new()
        .ok(1, put("x", "1"), Ret::Put, 0, 10)
        .ok(2, get("x"), ABSENT, 10, 20);
    assert_lin(&h);
}

#[test]
fn accepts_unknown_put_observed_later() {
    let h = History::new()
        .ok(1, put("x", "a"), Ret::Put, 0, 10)
        .unknown(1, put("x", "b"), 20)
        .ok(2, get("x"), found("a"), 30, 40)
        .ok(2, get("x"), found("b"), 1_000, 1_010)
        .ok(2, get("x"), found("b"), 2_000, 2_010);
    assert_lin(&h);
}

#[test]
fn accepts_unknown_put_never_observed() {
    let h = History::new()
        .ok(1, put("x", "a"), Ret::Put, 0, 10)
        .unknown(1, put("x", "b"), 20)
        .ok(2, get("x"), found("a"), 30, 40)
        .ok(2, get("x"), found("a"), 1_000, 1_010);
    assert_lin(&h);
    // Several unknown writes, one observed, the others never.
    let h = History::new()
        .unknown(1, put("x", "a"), 0)
        .unknown(2, put("x", "b"), 0)
        .unknown(3, Op::delete("x"), 0)
        .unknown(4, Op::cas("x", Some("b"), "c"), 0)
        .ok(5, get("x"), found("c"), 50, 60)
        .ok(5, get("x"), found("c"), 70, 80);
    assert_lin(&h);
}

#[test]
fn accepts_failed_and_unknown_reads_dropped() {
    let h = History::new()
        .ok(1, put("x", "a"), Ret::Put, 0, 10)
        .failed(2, get("x"), 20, 30)
        .unknown(2, get("x"), 40)
        .failed(3, put("x", "b"), 50, 60);
    let report = h.check(Budget::default());
    assert!(report.is_linearizable(), "{report}");
    assert_eq!(report.ops_checked, 1);
}

#[test]
fn accepts_overlapping_cases() {
    let h = History::new()
        .ok(1, put("x", "0"), Ret::Put, 0, 10)
        .ok(
            2,
            Op::cas("x", Some("0"), "1"),
            Ret::not_swapped(Some("2")),
            20,
            40,
        )
        .ok(3, Op::cas("x", Some("0"), "2"), Ret::swapped("2"), 25, 35)
        .ok(4, get("x"), found("2"), 50, 60);
    assert_lin(&h);
    // Both cannot win.
    let h = History::new()
        .ok(1, put("x", "0"), Ret::Put, 0, 10)
        .ok(2, Op::cas("x", Some("0"), "1"), Ret::swapped("1"), 20, 40)
        .ok(3, Op::cas("x", Some("0"), "2"), Ret::swapped("2"), 25, 35);
    assert_not_lin(&h);
    // A chain of CASes overlapping each other, applied in the order 3, 1, 2.
    let h = History::new()
        .ok(1, Op::cas("x", Some("a"), "b"), Ret::swapped("b"), 0, 100)
        .ok(2, Op::cas("x", Some("b"), "c"), Ret::swapped("c"), 0, 100)
        .ok(
            3,
            Op::cas("x", None::<&str>, "a"),
            Ret::swapped("a"),
            0,
            100,
        )
        .ok(4, get("x"), found("c"), 110, 120);
    assert_lin(&h);
}

#[test]
fn delete_semantics() {
    let h = History::new()
        .ok(1, Op::delete("x"), Ret::Delete(false), 0, 10)
        .ok(1, put("x", "a"), Ret::Put, 20, 30)
        .ok(2, Op::delete("x"), Ret::Delete(true), 40, 50)
        .ok(2, get("x"), ABSENT, 60, 70)
        .ok(3, Op::delete("x"), Ret::Delete(false), 80, 90)
        .ok(
            3,
            Op::cas("x", None::<&str>, "b"),
            Ret::swapped("b"),
            100,
            110,
        )
        .ok(3, get("x"), found("b"), 120, 130);
    assert_lin(&h);
    // A delete that overlaps a put may see it or not; later reads agree.
    for existed in [true, false] {
        let after = if existed { ABSENT } else { found("a") };
        let h = History::new()
            .ok(1, put("x", "a"), Ret::Put, 0, 20)
            .ok(2, Op::delete("x"), Ret::Delete(existed), 10, 30)
            .ok(3, get("x"), after, 40, 50);
        assert_lin(&h);
    }
    // But not "did not exist" with the value still gone afterwards.
    let h = History::new()
        .ok(1, put("x", "a"), Ret::Put, 0, 20)
        .ok(2, Op::delete("x"), Ret::Delete(false), 30, 40)
        .ok(3, get("x"), ABSENT, 50, 60);
    assert_not_lin(&h);
}

#[test]
fn many_keys_are_checked_independently() {
    // Per key the history is fine; mixing keys would not be (x's read of "b"
    // after y's later put is irrelevant to x).
    let mut h = History::new();
    for k in 0..50u64 {
        let key = format!("k{k}");
        let t = k * 3;
        h = h
            .ok(k, put(&key, "a"), Ret::Put, t, t + 10)
            .ok(k + 100, get(&key), ABSENT, t + 1, t + 5)
            .ok(k + 200, put(&key, "b"), Ret::Put, t + 20, t + 30)
            .ok(k + 300, get(&key), found("b"), t + 40, t + 50);
    }
    let report = h.check(Budget::default());
    assert!(report.is_linearizable(), "{report}");
    assert_eq!(report.keys_checked, 50);
    assert_eq!(report.ops_checked, 200);

    // One broken key is found and named.
    let h = h.ok(9, get("k17"), found("a"), 1_000, 1_010);
    let report = h.check(Budget::default());
    match &report.verdict {
        Verdict::NotLinearizable { key, explanation } => {
            assert_eq!(key, b"k17");
            assert!(explanation.contains("[1000, 1010]"), "{explanation}");
        }
        other => panic!("{other}"),
    }
}

#[test]
fn same_value_written_twice() {
    let h = History::new()
        .ok(1, put("x", "a"), Ret::Put, 0, 10)
        .ok(1, put("x", "b"), Ret::Put, 20, 30)
        .ok(1, put("x", "a"), Ret::Put, 40, 50)
        .ok(2, get("x"), found("b"), 25, 35)
        .ok(2, get("x"), found("a"), 60, 70);
    assert_lin(&h);
}

#[test]
fn binary_keys_and_values() {
    let h = History::new()
        .ok(1, Op::put([0u8, 255], [1u8, 2, 3]), Ret::Put, 0, 10)
        .ok(
            2,
            Op::get([0u8, 255]),
            Ret::Get(Some(vec![1, 2, 4])),
            20,
            30,
        );
    let report = h.check(Budget::default());
    let text = report.to_string();
    assert!(text.contains(r#"b"\x00\xff""#), "{text}");
    assert!(report.verdict.is_violation());
}

#[test]
fn report_assertions_and_history_display() {
    let good =
        History::new()
            .ok(1, put("x", "1"), Ret::Put, 0, 10)
            .ok(2, get("x"), found("1"), 20, 30);
    good.check(Budget::default()).assert_linearizable();
    good.check(Budget::default()).assert_no_violation();
    assert_eq!(
        good.to_string(),
        "#0 client 1: put(\"x\", \"1\") -> ok   [0, 10]\n\
         #1 client 2: get(\"x\") -> found \"1\"   [20, 30]\n"
    );
    let bad = good.ok(3, get("x"), ABSENT, 40, 50);
    let report = bad.check(Budget::default());
    let panic = std::panic::catch_unwind(|| report.assert_no_violation()).unwrap_err();
    let message = panic.downcast_ref::<String>().unwrap();
    assert!(message.contains("NOT linearizable"), "{message}");
    // Undecided: a warning only.
    let undecided = Report {
        verdict: Verdict::Unknown {
            keys: vec![b"x".to_vec()],
            reason: "test".into(),
        },
        keys_checked: 0,
        ops_checked: 0,
        steps: 0,
    };
    undecided.assert_no_violation();
    assert!(std::panic::catch_unwind(|| undecided.assert_linearizable()).is_err());
}

#[test]
fn empty_history_is_linearizable() {
    let report = check(&[], Budget::default());
    assert!(report.is_linearizable());
    assert_eq!(report.keys_checked, 0);
}

#[test]
fn invalid_histories_are_reported() {
    let h = History::new()
        .ok(1, put("x", "a"), Ret::Put, 0, 10)
        .ok(1, get("x"), Ret::Put, 20, 30);
    assert!(matches!(
        h.check(Budget::default()).verdict,
        Verdict::InvalidHistory { index: 1, .. }
    ));
    let h = History::new().ok(1, put("x", "a"), Ret::Put, 10, 5);
    assert!(matches!(
        h.check(Budget::default()).verdict,
        Verdict::InvalidHistory { index: 0, .. }
    ));
}

#[test]
fn budget_exhaustion_gives_unknown() {
    // Many concurrent unobserved unknown writes and a final impossible read
    // force the search through many subsets before giving up.
    let mut h = History::new().ok(0, put("x", "v"), Ret::Put, 0, 1);
    for c in 0..24u64 {
        h = h.unknown(c + 1, put("x", &format!("w{c}")), 2);
    }
    for c in 0..24u64 {
        h = h.ok(100 + c, get("x"), found("v"), 10 + 2 * c, 11 + 2 * c);
    }
    h = h.ok(200, Op::delete("x"), Ret::Delete(false), 100, 101);
    let report = h.check(Budget::default().with_steps(1_000));
    match &report.verdict {
        Verdict::Unknown { keys, reason } => {
            assert_eq!(keys, &vec![b"x".to_vec()]);
            assert!(reason.contains("step budget"), "{reason}");
        }
        other => panic!("{other}"),
    }
    assert_eq!(report.keys_checked, 0);
    // The same with a time budget instead.
    let report = h.check(Budget::unlimited().with_time(std::time::Duration::from_millis(1)));
    match &report.verdict {
        Verdict::Unknown { reason, .. } => assert!(reason.contains("time budget"), "{reason}"),
        other => panic!("{other}"),
    }
    // A violation on another key still wins over an undecided key.
    let h = h
        .ok(1, put("y", "1"), Ret::Put, 0, 10)
        .ok(1, get("y"), ABSENT, 20, 30);
    let report = h.check(Budget::default().with_steps(1_000));
    assert!(report.verdict.is_violation(), "{report}");
}

#[test]
fn explanation_names_the_ops_and_times() {
    let h = History::new()
        .ok(1, put("x", "a"), Ret::Put, 0, 10)
        .ok(1, put("x", "b"), Ret::Put, 20, 30)
        .ok(2, get("x"), found("b"), 40, 50)
        .ok(3, get("x"), found("a"), 60, 70);
    let report = h.check(Budget::default());
    let text = report.to_string();
    println!("{text}");
    for want in [
        "key \"x\"",
        "#0 client 1: put(\"x\", \"a\") -> ok   [0, 10]",
        "#3 client 3: get(\"x\") -> found \"a\"   [60, 70]",
        "it would have returned: found \"b\"",
        "It saw \"a\", written by 1 operation(s):",
    ] {
        assert!(text.contains(want), "missing {want:?} in\n{text}");
    }
}

// ---------------------------------------------------------------- recorder

#[test]
fn recorder_records_concurrent_clients() {
    let rec = Recorder::new();
    let store = std::sync::Arc::new(std::sync::Mutex::new(HashMap::<Vec<u8>, Vec<u8>>::new()));
    let threads: Vec<_> = (0..4u64)
        .map(|c| {
            let rec = rec.clone();
            let store = store.clone();
            std::thread::spawn(move || {
                for i in 0..200u64 {
                    let key = format!("k{}", i % 3).into_bytes();
                    if i % 2 == 0 {
                        let value = format!("{c}-{i}").into_bytes();
                        let t = rec.invoke(c, Op::put(&key, &value));
                        store.lock().unwrap().insert(key, value);
                        rec.complete(t, Outcome::Ok(Ret::Put));
                    } else {
                        let t = rec.invoke(c, Op::get(&key));
                        let v = store.lock().unwrap().get(&key).cloned();
                        rec.complete(t, Outcome::Ok(Ret::Get(v)));
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    // One operation that never completes: Unknown, and it was applied.
    let _never = rec.invoke(9, Op::put("k0", "lost"));
    store
        .lock()
        .unwrap()
        .insert(b"k0".to_vec(), b"lost".to_vec());
    let t = rec.invoke(9, Op::get("k0"));
    rec.complete(t, Outcome::Ok(Ret::found("lost")));
    assert_eq!(rec.pending(), 1);

    let h = rec.history();
    assert_eq!(h.len(), 802);
    assert!(h.iter().all(|e| e.invoke <= e.complete));
    assert_eq!(h[800].outcome, Outcome::Unknown);
    let report = check(&h, Budget::default());
    assert!(report.is_linearizable(), "{report}");
    assert_eq!(report.keys_checked, 3);
}

#[test]
#[should_panic(expected = "token from another recorder")]
fn recorder_rejects_foreign_tokens() {
    let a = Recorder::new();
    let b = Recorder::new();
    let t = a.invoke(1, get("x"));
    b.complete(t, Outcome::Failed);
}

#[test]
fn recorder_outcomes() {
    let rec = Recorder::new();
    let t1 = rec.invoke(1, put("x", "1"));
    let t2 = rec.invoke(2, put("x", "2"));
    let t3 = rec.clone().invoke(3, get("x"));
    rec.complete(t1, Outcome::Failed);
    rec.complete(t2, Outcome::Unknown);
    rec.complete(t3, Outcome::Ok(Ret::found("2")));
    let h = rec.history();
    assert_eq!(h.len(), 3);
    assert_eq!(h[1].complete, u64::MAX);
    assert!(h[0].invoke <= h[1].invoke && h[1].invoke <= h[2].invoke);
    assert!(h[2].complete >= h[2].invoke && h[2].complete != u64::MAX);
    assert_eq!(rec.pending(), 0);
    check(&h, Budget::default()).assert_linearizable();
}

// ---------------------------------------------------------------- randomized

/// A small deterministic PRNG (SplitMix64), to stay dependency-free.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

/// Parameters of a simulated run.
struct Sim {
    clients: u64,
    ops_per_client: u64,
    keys: u64,
    values: u64,
    max_delay: u64,
    unknown_percent: u64,
    failed_percent: u64,
}

/// Runs clients against a simulated linearizable store: every operation
/// takes effect at a random instant between its invocation and completion
/// (unknown ones possibly never), and its result is what the sequential map
/// returns at that instant.
fn simulate(rng: &mut Rng, sim: &Sim) -> Vec<Event> {
    let mut events = Vec::new();
    // (linearization point, event index) for operations that take effect.
    let mut points = Vec::new();
    for c in 0..sim.clients {
        let mut t = rng.below(sim.max_delay);
        for _ in 0..sim.ops_per_client {
            let key = format!("k{}", rng.below(sim.keys));
            let v = format!("v{}", rng.below(sim.values));
            let op = match rng.below(10) {
                0..=2 => Op::put(&key, &v),
                3..=6 => Op::get(&key),
                7 => Op::delete(&key),
                _ => {
                    let expected = if rng.chance(20) {
                        None
                    } else {
                        Some(format!("v{}", rng.below(sim.values)))
                    };
                    Op::cas(&key, expected, &v)
                }
            };
            let invoke = t + rng.below(sim.max_delay);
            let point = invoke + rng.below(sim.max_delay);
            let complete = point + rng.below(sim.max_delay);
            let outcome = if rng.chance(sim.failed_percent) {
                Outcome::Failed
            } else if rng.chance(sim.unknown_percent) {
                // Applied late, or never.
                if rng.chance(50) {
                    points.push((point + rng.below(10 * sim.max_delay), events.len()));
                }
                Outcome::Unknown
            } else {
                points.push((point, events.len()));
                Outcome::Ok(Ret::Put) // filled in below
            };
            events.push(Event {
                client: c,
                op,
                invoke,
                complete: if outcome == Outcome::Unknown {
                    u64::MAX
                } else {
                    complete
                },
                outcome,
            });
            // Clients are sequential: the next operation starts strictly later.
            t = complete + 1;
            if events.last().unwrap().outcome == Outcome::Unknown {
                // A client that timed out moves on later.
                t += sim.max_delay;
            }
        }
    }
    points.sort();
    let mut map: HashMap<Vec<u8>, Vec<u8>> = HashMap::new();
    for (_, i) in points {
        let e = &mut events[i];
        let ret = apply(&mut map, &e.op);
        if let Outcome::Ok(r) = &mut e.outcome {
            *r = ret;
        }
    }
    events
}

/// The sequential specification, written independently of the checker's
/// model.
fn apply(map: &mut HashMap<Vec<u8>, Vec<u8>>, op: &Op) -> Ret {
    match op {
        Op::Put { key, value } => {
            map.insert(key.clone(), value.clone());
            Ret::Put
        }
        Op::Get { key } => Ret::Get(map.get(key).cloned()),
        Op::Delete { key } => Ret::Delete(map.remove(key).is_some()),
        Op::Cas { key, expected, new } => {
            if map.get(key) == expected.as_ref() {
                map.insert(key.clone(), new.clone());
                Ret::Cas {
                    swapped: true,
                    current: Some(new.clone()),
                }
            } else {
                Ret::Cas {
                    swapped: false,
                    current: map.get(key).cloned(),
                }
            }
        }
    }
}

#[test]
fn random_linearizable_histories_are_accepted_and_corrupted_reads_rejected() {
    let mut rng = Rng(0x5eed);
    let (mut violations, mut out_of_budget) = (0, 0);
    for round in 0..300 {
        let sim = Sim {
            clients: 1 + rng.below(6),
            ops_per_client: 1 + rng.below(40),
            keys: 1 + rng.below(4),
            values: 1 + rng.below(5),
            max_delay: 1 + rng.below(30),
            unknown_percent: rng.below(15),
            failed_percent: rng.below(10),
        };
        let mut h = simulate(&mut rng, &sim);
        let report = check(&h, Budget::default());
        assert!(
            report.is_linearizable(),
            "round {round}: {report}\n{}",
            dump(&h)
        );

        // Corrupt one completed read to a value never written.
        let reads: Vec<usize> = (0..h.len())
            .filter(|&i| matches!(h[i].outcome, Outcome::Ok(Ret::Get(_))))
            .collect();
        if reads.is_empty() {
            continue;
        }
        let i = reads[rng.below(reads.len() as u64) as usize];
        h[i].outcome = Outcome::Ok(Ret::found("never-written"));
        let report = check(&h, Budget::default());
        match &report.verdict {
            Verdict::NotLinearizable { key, .. } => assert_eq!(key, h[i].op.key()),
            _ => panic!("round {round}: corrupted read accepted: {report}"),
        }
        // The search alone (no pre-check) must reject it too.
        let events = by_key(&h)
            .into_iter()
            .find(|(k, _)| k == h[i].op.key())
            .unwrap()
            .1;
        // The search alone (no pre-check) must not accept it either; failing
        // searches are exhaustive, so those with many unknown writes may run
        // out of budget.
        let (result, _) = KeyHistory::new(&h, &events).search(&Limits {
            max_steps: 3_000_000,
            ..no_limits()
        });
        match result {
            Search::Violation { .. } => violations += 1,
            Search::OutOfBudget(_) => out_of_budget += 1,
            Search::Linearizable => panic!("round {round}: search accepted a corrupted read"),
        }
    }
    assert!(
        violations > 20 * out_of_budget,
        "{violations} violations found, {out_of_budget} out of budget"
    );
}

#[test]
fn large_single_key_history_is_checked_quickly() {
    let mut rng = Rng(42);
    let sim = Sim {
        clients: 8,
        ops_per_client: 400,
        keys: 1,
        values: 4,
        max_delay: 20,
        unknown_percent: 2,
        failed_percent: 2,
    };
    let h = simulate(&mut rng, &sim);
    let start = std::time::Instant::now();
    let report = check(&h, Budget::default());
    assert!(report.is_linearizable(), "{report}");
    assert!(report.ops_checked > 3_000, "{report}");
    println!("{report} in {:?}", start.elapsed());
}

fn dump(h: &[Event]) -> String {
    h.iter()
        .enumerate()
        .map(|(i, e)| format!("#{i} {e}\n"))
        .collect()
}

/// Brute force: try every order of the completed operations plus any subset
/// of the unknown writes, consistent with real time.
fn brute_force(h: &[Event]) -> bool {
    let ops: Vec<&Event> = h
        .iter()
        .filter(|e| match e.outcome {
            Outcome::Ok(_) => true,
            Outcome::Failed => false,
            Outcome::Unknown => e.op.is_write(),
        })
        .collect();
    fn rec(ops: &[&Event], used: &mut [bool], map: &HashMap<Vec<u8>, Vec<u8>>) -> bool {
        let known_left = ops
            .iter()
            .zip(used.iter())
            .any(|(e, u)| !u && matches!(e.outcome, Outcome::Ok(_)));
        if !known_left {
            return true;
        }
        for x in 0..ops.len() {
            if used[x] {
                continue;
            }
            // x may go next unless a remaining completed op finished before
            // x was invoked.
            let blocked = ops.iter().enumerate().any(|(y, e)| {
                !used[y] && matches!(e.outcome, Outcome::Ok(_)) && e.complete < ops[x].invoke
            });
            if blocked {
                continue;
            }
            let mut next = map.clone();
            let ret = apply(&mut next, &ops[x].op);
            if let Outcome::Ok(seen) = &ops[x].outcome {
                if *seen != ret {
                    continue;
                }
            }
            used[x] = true;
            if rec(ops, used, &next) {
                return true;
            }
            used[x] = false;
        }
        false
    }
    rec(&ops, &mut vec![false; ops.len()], &HashMap::new())
}

/// A random result of the right kind, from a small set of values.
fn random_ret(rng: &mut Rng, op: &Op) -> Ret {
    let value = |rng: &mut Rng| match rng.below(4) {
        0 => None,
        v => Some(format!("v{}", v - 1).into_bytes()),
    };
    match op {
        Op::Put { .. } => Ret::Put,
        Op::Get { .. } => Ret::Get(value(rng)),
        Op::Delete { .. } => Ret::Delete(rng.chance(50)),
        Op::Cas { new, .. } => {
            if rng.chance(50) {
                Ret::Cas {
                    swapped: true,
                    current: Some(new.clone()),
                }
            } else {
                Ret::Cas {
                    swapped: false,
                    current: value(rng),
                }
            }
        }
    }
}

#[test]
fn agrees_with_brute_force_on_small_histories() {
    // KV_CHECK_BRUTE_ROUNDS=200000 KV_CHECK_SEED=1 for a longer campaign.
    let env = |name: &str, default: u64| {
        std::env::var(name)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    };
    let rounds = env("KV_CHECK_BRUTE_ROUNDS", 3_000);
    let mut rng = Rng(env("KV_CHECK_SEED", 7));
    let (mut yes, mut no) = (0, 0);
    for round in 0..rounds {
        let sim = Sim {
            clients: 1 + rng.below(5),
            ops_per_client: 1 + rng.below(3),
            keys: 1,
            values: 3,
            max_delay: 1 + rng.below(6),
            unknown_percent: 25,
            failed_percent: 5,
        };
        let mut h = simulate(&mut rng, &sim);
        h.truncate(9);
        // Perturb some results (often making the history non-linearizable).
        if rng.chance(60) {
            for _ in 0..1 + rng.below(2) {
                let i = rng.below(h.len() as u64) as usize;
                if matches!(h[i].outcome, Outcome::Ok(_)) {
                    h[i].outcome = Outcome::Ok(random_ret(&mut rng, &h[i].op));
                }
            }
        }
        let expected = brute_force(&h);
        let report = check(&h, Budget::unlimited());
        assert_eq!(
            report.is_linearizable(),
            expected,
            "round {round}: {report}\n{}",
            dump(&h)
        );
        // And the bare search, without the pre-check.
        for (_, events) in by_key(&h) {
            let (result, _) = KeyHistory::new(&h, &events).search(&no_limits());
            assert_eq!(
                matches!(result, Search::Linearizable),
                expected,
                "round {round} (search only)\n{}",
                dump(&h)
            );
        }
        if expected {
            yes += 1;
        } else {
            no += 1;
        }
    }
    assert!(
        yes > rounds / 6 && no > rounds / 6,
        "{yes} linearizable, {no} not"
    );
}

#[test]
#[ignore = "timing exploration; run with --release -- --ignored --nocapture"]
fn stress_timing() {
    for (clients, per, unknown, values) in [
        (10u64, 500u64, 0u64, 1000u64),
        (10, 500, 2, 1000),
        (10, 500, 5, 1000),
        (10, 500, 10, 1000),
        (20, 200, 0, 1000),
        (20, 200, 1, 1000),
        (20, 200, 5, 4),
        (50, 60, 0, 1000),
        (50, 60, 5, 1000),
    ] {
        let mut rng = Rng(clients * 1000 + unknown);
        let sim = Sim {
            clients,
            ops_per_client: per,
            keys: 1,
            values,
            max_delay: 1_000,
            unknown_percent: unknown,
            failed_percent: 2,
        };
        let h = simulate(&mut rng, &sim);
        let start = std::time::Instant::now();
        let report = check(&h, Budget::default());
        println!(
            "clients {clients} x {per}, {unknown}% unknown, {values} values: {} in {:?}",
            report.is_linearizable(),
            start.elapsed()
        );
        println!(
            "   {} ops, {} steps {}",
            report.ops_checked,
            report.steps,
            if report.is_linearizable() {
                String::new()
            } else {
                report.to_string()
            }
        );
    }
}
