//! Jepsen-style test: concurrent clients do random operations on a few keys
//! through the SDK (some puts with values of the maximum size, 1 MiB) while
//! a nemesis kills, restarts and pauses replicas, crashes the whole cluster,
//! wipes a replica's data directory, isolates the leader, splits the
//! cluster (two against three, or two halves that both see one replica in
//! the middle), and drops, delays and times out messages. Afterwards the cluster is healed, every key is read, and the
//! whole recorded history goes through the `kv-check` linearizability
//! checker — which also proves no acknowledged write was lost: a lost write
//! makes the final reads (part of the history) unexplainable.
//!
//! CI runs a fixed set of seeds (the nemesis schedule and the operation mix
//! come from the seed). Even seeds run on a TLS cluster (certificates made
//! by `kv-server certs`), odd ones plain; `KV_TEST_TLS=1` makes every seed
//! TLS. Longer runs:
//!
//! ```text
//! KV_SOAK_SECS=600 KV_JEPSEN_SEEDS=7 cargo test -p kv-tests --release --test jepsen -- --nocapture
//! ```

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kv_api::{FaultReport, FaultSpec, ReplicaId};
use kv_check::{check, Budget, Op, Outcome, Recorder, Ret, Verdict};
use kv_tests::{bounded, Cluster};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

const CLIENTS: u64 = 8;
/// Keys per minute of run (at least one minute's worth). The checker's
/// search grows with the operations on one key; more keys for longer runs
/// keep that near what a minute produces (~30,000 operations a key at
/// 2026-11 speeds), which it decides within its budget.
const KEYS_PER_MINUTE: usize = 5;
/// The seeds CI runs, one after another.
const CI_SEEDS: [u64; 2] = [1, 2];
/// How long the clients run under faults per seed, unless `KV_SOAK_SECS`;
/// a run also goes on until every kind of fault took effect `MIN_EACH`
/// times.
const CI_RUN_SECS: u64 = 10;
/// Times every kind of fault must take effect in a run.
const MIN_EACH: u64 = 2;
/// One put in this many carries a value of the maximum size.
const BIG_PUT_EVERY: u64 = 40;
/// The maximum value size.
const BIG_VALUE: usize = 1 << 20;

/// The kinds of fault the nemesis injects.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Fault {
    /// SIGKILL a replica, restart it later on the same data.
    Kill,
    /// SIGSTOP a replica, SIGCONT it later.
    Pause,
    /// Cut every link of the leader.
    IsolateLeader,
    /// Split the replicas two against three.
    Partition,
    /// Two halves that both see one replica in the middle (and it them).
    Bridge,
    /// SIGKILL every replica at once, restart them all later.
    CrashAll,
    /// SIGKILL a replica, delete its data directory, restart it empty.
    Wipe,
    /// Drop a fraction of peer messages everywhere.
    Drop,
    /// Delay peer messages everywhere.
    Delay,
    /// Hold a fraction of peer calls until their deadline.
    Timeout,
}

const ALL_FAULTS: [Fault; 10] = [
    Fault::Kill,
    Fault::Pause,
    Fault::IsolateLeader,
    Fault::Partition,
    Fault::Bridge,
    Fault::CrashAll,
    Fault::Wipe,
    Fault::Drop,
    Fault::Delay,
    Fault::Timeout,
];

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

fn seeds() -> Vec<u64> {
    match std::env::var("KV_JEPSEN_SEEDS") {
        Ok(v) => v.split(',').filter_map(|s| s.trim().parse().ok()).collect(),
        Err(_) => CI_SEEDS.to_vec(),
    }
}

/// An SDK result as the checker sees it: an invalid argument was certainly
/// not applied; any other error leaves the outcome unknown.
fn outcome(r: Result<Ret, kv_client::Error>) -> Outcome {
    match r {
        Ok(ret) => Outcome::Ok(ret),
        Err(e) if !e.outcome_unknown() => Outcome::Failed,
        Err(_) => Outcome::Unknown,
    }
}

/// One client: random operations on a few keys until `stop`, each recorded
/// just before it is sent and just after its answer arrives.
async fn client_loop(
    client: kv_client::Client,
    id: u64,
    seed: u64,
    rec: Recorder,
    stop: Arc<AtomicBool>,
    keys: usize,
) -> u64 {
    let mut rng = StdRng::seed_from_u64(seed.wrapping_mul(1000).wrapping_add(id));
    let mut last_seen: Vec<Option<Vec<u8>>> = vec![None; keys];
    let mut n = 0u64;
    while !stop.load(Ordering::SeqCst) {
        n += 1;
        let k = rng.random_range(0..keys);
        let key = format!("key-{k}");
        let mut value = format!("c{id}-{n}");
        if n.is_multiple_of(BIG_PUT_EVERY) {
            // Distinct all the same: the name first, then padding.
            value.push(':');
            value.extend(std::iter::repeat_n('x', BIG_VALUE - value.len()));
        }
        match rng.random_range(0..100u32) {
            0..=29 => {
                let t = rec.invoke(id, Op::put(&key, &value));
                let r = client.put(key.as_str(), value.as_str()).await;
                rec.complete(t, outcome(r.map(|()| Ret::Put)));
            }
            30..=59 => {
                let t = rec.invoke(id, Op::get(&key));
                let r = client.get(key.as_str()).await;
                if let Ok(v) = &r {
                    last_seen[k] = v.clone();
                }
                rec.complete(t, outcome(r.map(Ret::Get)));
            }
            60..=69 => {
                let t = rec.invoke(id, Op::delete(&key));
                let r = client.delete(key.as_str()).await;
                rec.complete(t, outcome(r.map(Ret::Delete)));
            }
            _ => {
                let expected = last_seen[k].clone();
                let t = rec.invoke(id, Op::cas(&key, expected.as_ref(), &value));
                let r = client.cas(key.as_str(), expected, value.as_str()).await;
                if let Ok(o) = &r {
                    last_seen[k] = o.current.clone();
                }
                rec.complete(
                    t,
                    outcome(r.map(|o| Ret::Cas {
                        swapped: o.swapped,
                        current: o.current,
                    })),
                );
            }
        }
    }
    n
}

/// The nemesis: one fault at a time, each healed before the next, in a
/// seeded order that goes through every kind before repeating one.
struct Nemesis {
    rng: StdRng,
    queue: Vec<Fault>,
    /// Rounds of each kind that took effect: the fault was set (a failed
    /// `set_faults` does not count) and, for faults of the links, the
    /// replicas counted what it did (a drop round dropped messages, a
    /// partition refused requests on cut links, ...) in that round.
    effective: BTreeMap<Fault, u64>,
    /// Rounds of each kind that were tried but did not take effect.
    missed: BTreeMap<Fault, u64>,
    /// What the replicas themselves counted over the whole run.
    reported: FaultReport,
    /// Each replica's counters when last read (they restart from zero
    /// when the replica does).
    last: BTreeMap<ReplicaId, FaultReport>,
}

impl Nemesis {
    fn new(seed: u64) -> Nemesis {
        Nemesis {
            rng: StdRng::seed_from_u64(seed),
            queue: Vec::new(),
            effective: BTreeMap::new(),
            missed: BTreeMap::new(),
            reported: FaultReport::default(),
            last: BTreeMap::new(),
        }
    }

    fn next_fault(&mut self) -> Fault {
        if self.queue.is_empty() {
            self.queue = ALL_FAULTS.to_vec();
            self.queue.shuffle(&mut self.rng);
        }
        self.queue.pop().expect("refilled above")
    }

    fn hold(&mut self) -> Duration {
        Duration::from_millis(self.rng.random_range(500..1500))
    }

    /// Sets `spec` at replica `id`; whether it answered.
    async fn set(&mut self, cluster: &Cluster, id: ReplicaId, spec: FaultSpec) -> bool {
        // A replica that does not answer just keeps its faults until the
        // next heal.
        let client = cluster.client_with_timeout(Duration::from_millis(500));
        client
            .set_faults(cluster.client_addr(id), spec)
            .await
            .is_ok()
    }

    /// Sets `spec` everywhere; whether every replica answered.
    async fn set_all(&mut self, cluster: &Cluster, spec: FaultSpec) -> bool {
        let mut all = true;
        for id in cluster.ids() {
            all &= self.set(cluster, id, spec.clone()).await;
        }
        all
    }

    /// Cuts `groups` apart: every replica of a group drops its links with
    /// the replicas of the groups after it in `cuts` (both sides are set).
    async fn cut(&mut self, cluster: &Cluster, cuts: &[(&[ReplicaId], &[ReplicaId])]) -> bool {
        let mut isolate: BTreeMap<ReplicaId, Vec<ReplicaId>> = BTreeMap::new();
        for (a, b) in cuts {
            for &x in a.iter() {
                isolate.entry(x).or_default().extend_from_slice(b);
            }
            for &y in b.iter() {
                isolate.entry(y).or_default().extend_from_slice(a);
            }
        }
        let mut all = true;
        for (id, others) in isolate {
            let spec = FaultSpec {
                isolate: Some(others),
                ..FaultSpec::default()
            };
            all &= self.set(cluster, id, spec).await;
        }
        all
    }

    /// Reads every replica's counters, then heals every link; returns what
    /// the replicas counted since the last time.
    async fn heal_links(&mut self, cluster: &Cluster) -> FaultReport {
        let client = cluster.client_with_timeout(Duration::from_millis(500));
        let mut round = FaultReport::default();
        for id in cluster.ids() {
            let heal = FaultSpec {
                heal: true,
                ..FaultSpec::default()
            };
            if let Ok(r) = client.set_faults(cluster.client_addr(id), heal).await {
                let last = self.last.insert(id, r.clone()).unwrap_or_default();
                // A restarted replica counts from zero again.
                let delta = |now: u64, before: u64| now.checked_sub(before).unwrap_or(now);
                round.dropped += delta(r.dropped, last.dropped);
                round.delayed += delta(r.delayed, last.delayed);
                round.timed_out += delta(r.timed_out, last.timed_out);
                round.refused += delta(r.refused, last.refused);
            }
        }
        self.reported.dropped += round.dropped;
        self.reported.delayed += round.delayed;
        self.reported.timed_out += round.timed_out;
        self.reported.refused += round.refused;
        round
    }

    fn done(&self) -> bool {
        ALL_FAULTS
            .iter()
            .all(|k| self.effective.get(k).copied().unwrap_or(0) >= MIN_EACH)
    }

    async fn round(&mut self, cluster: &mut Cluster) {
        let fault = self.next_fault();
        let ids = cluster.ids();
        let leader = cluster.leader().await;
        let hold = self.hold();
        let took_effect = match fault {
            Fault::Kill => {
                let victim = leader.unwrap_or_else(|| ids[self.rng.random_range(0..ids.len())]);
                eprintln!("nemesis: kill replica {victim} for {hold:?}");
                cluster.kill(victim);
                tokio::time::sleep(hold).await;
                cluster.restart(victim).await;
                true
            }
            Fault::Pause => {
                let victim = ids[self.rng.random_range(0..ids.len())];
                eprintln!("nemesis: pause replica {victim} for {hold:?}");
                cluster.pause(victim);
                tokio::time::sleep(hold).await;
                cluster.resume(victim);
                true
            }
            Fault::CrashAll => {
                eprintln!("nemesis: crash every replica for {hold:?}");
                cluster.kill_all(&ids);
                tokio::time::sleep(hold).await;
                for &id in &ids {
                    cluster.spawn(id);
                }
                for &id in &ids {
                    cluster.wait_answers(id, Duration::from_secs(30)).await;
                }
                true
            }
            Fault::Wipe => {
                let victim = ids[self.rng.random_range(0..ids.len())];
                eprintln!("nemesis: wipe replica {victim}'s data directory, restart it empty");
                cluster.kill(victim);
                std::fs::remove_dir_all(cluster.data_dir(victim))
                    .unwrap_or_else(|e| panic!("wipe replica {victim}: {e}"));
                cluster.restart(victim).await;
                let standing = cluster.status(victim).await.map(|s| s.standing);
                eprintln!("nemesis: replica {victim} came back {standing:?}");
                tokio::time::sleep(hold).await;
                true
            }
            Fault::IsolateLeader => {
                let Some(leader) = leader else {
                    return; // nobody to isolate this round; not counted
                };
                let others: Vec<ReplicaId> = ids.iter().copied().filter(|&i| i != leader).collect();
                eprintln!("nemesis: isolate leader {leader} for {hold:?}");
                let set = self.cut(cluster, &[(&[leader], &others)]).await;
                tokio::time::sleep(hold).await;
                let counted = self.heal_links(cluster).await;
                set && counted.refused + counted.dropped > 0
            }
            Fault::Partition => {
                let mut shuffled = ids.clone();
                shuffled.shuffle(&mut self.rng);
                let (small, large) = shuffled.split_at(2);
                eprintln!("nemesis: partition {small:?} | {large:?} for {hold:?}");
                let set = self.cut(cluster, &[(small, large)]).await;
                tokio::time::sleep(hold).await;
                let counted = self.heal_links(cluster).await;
                set && counted.refused + counted.dropped > 0
            }
            Fault::Bridge => {
                let mut shuffled = ids.clone();
                shuffled.shuffle(&mut self.rng);
                let (middle, rest) = shuffled.split_first().expect("replicas");
                let (left, right) = rest.split_at(rest.len() / 2);
                eprintln!("nemesis: bridge {left:?} | {middle} | {right:?} for {hold:?}");
                let set = self.cut(cluster, &[(left, right)]).await;
                tokio::time::sleep(hold).await;
                let counted = self.heal_links(cluster).await;
                set && counted.refused + counted.dropped > 0
            }
            Fault::Drop => {
                eprintln!("nemesis: drop 20% of peer messages for {hold:?}");
                let spec = FaultSpec {
                    drop_rate: Some(0.2),
                    ..FaultSpec::default()
                };
                let set = self.set_all(cluster, spec).await;
                tokio::time::sleep(hold).await;
                set && self.heal_links(cluster).await.dropped > 0
            }
            Fault::Delay => {
                eprintln!("nemesis: delay peer messages 1-30 ms for {hold:?}");
                let spec = FaultSpec {
                    delay_ms: Some((1, 30)),
                    ..FaultSpec::default()
                };
                let set = self.set_all(cluster, spec).await;
                tokio::time::sleep(hold).await;
                set && self.heal_links(cluster).await.delayed > 0
            }
            Fault::Timeout => {
                eprintln!("nemesis: time out 20% of peer calls for {hold:?}");
                let spec = FaultSpec {
                    timeout_rate: Some(0.2),
                    ..FaultSpec::default()
                };
                let set = self.set_all(cluster, spec).await;
                tokio::time::sleep(hold).await;
                set && self.heal_links(cluster).await.timed_out > 0
            }
        };
        let tally = if took_effect {
            &mut self.effective
        } else {
            eprintln!("nemesis: the {fault:?} round did not take effect");
            &mut self.missed
        };
        *tally.entry(fault).or_insert(0) += 1;
    }
}

struct RunSummary {
    ops: usize,
    ok: usize,
    unknown: usize,
    effective: BTreeMap<Fault, u64>,
    missed: BTreeMap<Fault, u64>,
    reported: FaultReport,
}

async fn run_seed(seed: u64, run_for: Duration) -> RunSummary {
    let keys = KEYS_PER_MINUTE * (run_for.as_secs().div_ceil(60).max(1) as usize);
    let mut cluster = if seed.is_multiple_of(2) || kv_tests::tls_by_env() {
        Cluster::start_tls(5, &[]).await
    } else {
        Cluster::start(5).await
    };
    eprintln!(
        "seed {seed}: {}",
        if cluster.tls_dir().is_some() {
            "TLS"
        } else {
            "plain TCP"
        }
    );
    let rec = Recorder::new();
    let stop = Arc::new(AtomicBool::new(false));
    let mut clients = tokio::task::JoinSet::new();
    for id in 1..=CLIENTS {
        let client = cluster.client_with_timeout(Duration::from_secs(1));
        clients.spawn(client_loop(
            client,
            id,
            seed,
            rec.clone(),
            stop.clone(),
            keys,
        ));
    }

    let mut nemesis = Nemesis::new(seed);
    let started = Instant::now();
    // Runs at least `run_for`, and on until every kind of fault took effect
    // `MIN_EACH` times (bounded: a kind that never takes effect fails the
    // run below instead of running forever).
    let rounds_cap = ALL_FAULTS.len() as u64 * MIN_EACH * 4;
    let mut rounds = 0;
    while (started.elapsed() < run_for || !nemesis.done()) && rounds < rounds_cap {
        rounds += 1;
        nemesis.round(&mut cluster).await;
        // A quiet moment between faults, so progress is possible.
        let quiet = Duration::from_millis(nemesis.rng.random_range(200..600));
        tokio::time::sleep(quiet).await;
    }
    stop.store(true, Ordering::SeqCst);
    while let Some(r) = clients.join_next().await {
        r.expect("a client task panicked");
    }

    // Heal: every replica runs and answers, every link is whole, and every
    // replica votes (a wiped one has rejoined).
    nemesis.heal_links(&cluster).await;
    cluster.wait_for_leader(Duration::from_secs(20)).await;
    kv_tests::wait_until(Duration::from_secs(30), "every replica votes", || async {
        cluster
            .statuses()
            .await
            .values()
            .all(|s| s.as_ref().is_some_and(|s| s.standing == "voter"))
    })
    .await;
    let applied = cluster.max_applied().await;
    cluster
        .wait_applied_equal(applied, Duration::from_secs(30))
        .await;

    // Final reads of every key, linearizable, recorded like any other
    // operation: a lost acknowledged write cannot be explained by them.
    let reader = cluster.client_with_timeout(Duration::from_secs(5));
    for k in 0..keys {
        let key = format!("key-{k}");
        let t = rec.invoke(CLIENTS + 1, Op::get(&key));
        let r = reader.get(key.as_str()).await;
        assert!(r.is_ok(), "final read of {key} failed after healing: {r:?}");
        rec.complete(t, outcome(r.map(Ret::Get)));
    }

    let history = rec.history();
    let ok = history
        .iter()
        .filter(|e| matches!(e.outcome, Outcome::Ok(_)))
        .count();
    let unknown = history
        .iter()
        .filter(|e| matches!(e.outcome, Outcome::Unknown))
        .count();
    let ops = history.len();
    let report = tokio::task::spawn_blocking(move || {
        let report = check(
            &history,
            Budget::default().with_time(Duration::from_secs(60)),
        );
        if report.verdict.is_violation() {
            let path = std::env::temp_dir().join(format!("kv-jepsen-history-seed-{seed}.txt"));
            let _ = std::fs::write(&path, format!("{}", kv_check::History { events: history }));
            eprintln!("history written to {}", path.display());
        }
        report
    })
    .await
    .expect("the checker panicked");
    eprintln!("seed {seed}: kv-check: {report}");
    assert!(
        !report.verdict.is_violation(),
        "seed {seed}: the history is not linearizable: {report}"
    );
    assert!(
        !matches!(report.verdict, Verdict::InvalidHistory { .. }),
        "seed {seed}: the recorded history is malformed: {report}"
    );
    assert!(
        matches!(report.verdict, Verdict::Linearizable),
        "seed {seed}: the checker could not decide within its budget: {report}"
    );
    RunSummary {
        ops,
        ok,
        unknown,
        effective: nemesis.effective,
        missed: nemesis.missed,
        reported: nemesis.reported,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_under_every_kind_of_fault_is_linearizable() {
    let secs = env_u64("KV_SOAK_SECS").unwrap_or(CI_RUN_SECS);
    let run_for = Duration::from_secs(secs);
    let seeds = seeds();
    assert!(!seeds.is_empty(), "KV_JEPSEN_SEEDS names no seed");
    for seed in seeds {
        // Bounded: the run, healing (up to ~50 s) and checking (up to 60 s).
        let limit = run_for + Duration::from_secs(150);
        let s = bounded(limit, "a Jepsen run", run_seed(seed, run_for)).await;
        eprintln!(
            "seed {seed}: {} operations checked ({} completed, {} unknown outcome); faults that \
             took effect: {:?}, that did not: {:?}; replicas counted {} dropped, {} delayed, {} \
             timed-out messages and {} refused requests",
            s.ops,
            s.ok,
            s.unknown,
            s.effective,
            s.missed,
            s.reported.dropped,
            s.reported.delayed,
            s.reported.timed_out,
            s.reported.refused
        );
        for kind in ALL_FAULTS {
            assert!(
                s.effective.get(&kind).copied().unwrap_or(0) >= MIN_EACH,
                "seed {seed}: {kind:?} took effect fewer than {MIN_EACH} times (took effect: \
                 {:?}; did not: {:?})",
                s.effective,
                s.missed
            );
        }
        assert!(
            s.ok > 100,
            "seed {seed}: too few operations completed under faults ({}) to say much",
            s.ok
        );
    }
}
