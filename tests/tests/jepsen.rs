//! Jepsen-style tests: concurrent clients work through the SDK while a
//! nemesis injects faults; what they saw is checked afterwards. Three
//! workloads, one test each (run one at a time: each loads both cores):
//!
//! 1. **Registers** (`history_under_every_kind_of_fault_is_linearizable`):
//!    clients put, get, delete and compare-and-swap a few keys (some puts
//!    of the maximum value size, 1 MiB) while the nemesis kills, restarts
//!    and pauses replicas, crashes the whole cluster, wipes a replica's
//!    data directory, isolates the leader, splits the cluster (two against
//!    three, or two halves that both see one replica in the middle), and
//!    drops, delays and times out messages. Afterwards the cluster is
//!    healed, every key is read, and the whole recorded history goes
//!    through the `kv-check` linearizability checker — which also proves no
//!    acknowledged write was lost: a lost write makes the final reads (part
//!    of the history) unexplainable.
//! 2. **The data model** (`watchers_bank_and_single_key_txns_hold_under_faults`),
//!    under the same nemesis: single-key transactions (a put, a delete, a
//!    compare-and-swap as a read then a transaction comparing the key's mod
//!    revision or value) recorded as register operations and checked the
//!    same way; a bank (transfers between accounts in transactions that
//!    compare what they read; every read of all accounts — linearizable,
//!    local, or at a past revision — must add up to the same total, and a
//!    read at a past revision must repeat the read that gave it); and
//!    watchers of the transactions' prefix from one start revision,
//!    retrying and resuming (in new clients, from their cursors) through
//!    the faults: every watcher's events must be a prefix of one order,
//!    every complete watcher that whole order, and that order the log's —
//!    each acknowledged write at the revision it took, nothing invented or
//!    repeated, the events replayed giving the final state, and the
//!    store's own ranges at revisions along the way agreeing with them.
//! 3. **Membership** (`history_through_membership_changes_under_faults_is_linearizable`):
//!    the register clients again, following the member set, while a
//!    membership nemesis adds replicas (new id, new ports, `--join`,
//!    promoted once caught up), removes voters (the leader too) and
//!    replaces a replica whose disk died (kill and wipe, add a new one,
//!    remove the dead one), half of the steps with a voter killed or cut
//!    off meanwhile, alternating with plain kills and partitions; it keeps
//!    three to seven voters and a majority of them up. At the end every
//!    member runs, reports the same configuration, has applied the same
//!    index and holds the same keys, removed replicas said they were
//!    removed, and the history is checked as in 1.
//!
//! Outcome-unknown operations (timeouts, lost connections) are recorded as
//! such: the checker may place them anywhere after their invocation, or
//! nowhere. The checks themselves are tested on what a broken store would
//! give (`the_watch_check_catches_...`, `the_bank_check_catches_...`).
//!
//! CI runs a fixed set of seeds per workload (the nemesis schedule and the
//! operation mix come from the seed). Even seeds run on a TLS cluster
//! (certificates made by `kv-server certs`, spare ones for added
//! replicas), odd ones plain; `KV_TEST_TLS=1` makes every seed TLS.
//! Environment:
//!
//! - `KV_SOAK_SECS`: how long each seed runs under faults (default 10; a
//!   run also goes on until every kind of fault or step took effect).
//! - `KV_JEPSEN_SEEDS`, `KV_JEPSEN_DATA_SEEDS`, `KV_JEPSEN_MEMBER_SEEDS`:
//!   comma-separated seeds for workloads 1, 2 and 3 (CI: `1,2`, `3`, `4`).
//!
//! Longer runs, e.g.:
//!
//! ```text
//! KV_SOAK_SECS=600 KV_JEPSEN_SEEDS=7 cargo test -p kv-tests --release --test jepsen -- --nocapture
//! KV_JEPSEN_DATA_SEEDS=1,2,3,4,5,6 KV_JEPSEN_MEMBER_SEEDS=1,2,3,4,5,6 KV_SOAK_SECS=60 \
//!     cargo test -p kv-tests --release --test jepsen -- --nocapture
//! ```

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kv_api::membership::{MemberChange, Membership};
use kv_api::{
    CmpOp, Compare, EventKind, FaultReport, FaultSpec, RangeRequest, RangeResponse, ReplicaId,
    Target, Txn, TxnOp, TxnOpResult, WatchEvent, WatchRequest,
};
use kv_check::{check, Budget, Op, Outcome, Recorder, Ret, Verdict};
use kv_tests::{bounded, Cluster};
use rand::rngs::StdRng;
use rand::seq::{IndexedRandom, SliceRandom};
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

/// The seeds named by `var` (comma-separated), or `ci`.
fn seeds_from(var: &str, ci: &[u64]) -> Vec<u64> {
    match std::env::var(var) {
        Ok(v) => v.split(',').filter_map(|s| s.trim().parse().ok()).collect(),
        Err(_) => ci.to_vec(),
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
    route: Arc<Route>,
    id: u64,
    seed: u64,
    rec: Recorder,
    stop: Arc<AtomicBool>,
    keys: usize,
) -> u64 {
    let mut rng = StdRng::seed_from_u64(seed.wrapping_mul(1000).wrapping_add(id));
    let mut last_seen: Vec<Option<Vec<u8>>> = vec![None; keys];
    let mut n = 0u64;
    let (mut generation, mut client) = route.client();
    while !stop.load(Ordering::SeqCst) {
        n += 1;
        if route.generation() != generation {
            (generation, client) = route.client();
        }
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

/// Where the clients send their requests: the members' client addresses,
/// replaced when the membership changes (a client built before a
/// replacement may know no live member after it). Each client task builds
/// its own SDK client (its own session) from it, again whenever the
/// addresses change.
struct Route {
    builder: kv_client::ClientBuilder,
    /// A generation, bumped at every change, and the addresses.
    addrs: std::sync::Mutex<(u64, Vec<String>)>,
}

impl Route {
    fn new(builder: kv_client::ClientBuilder, addrs: Vec<String>) -> Arc<Route> {
        Arc::new(Route {
            builder,
            addrs: std::sync::Mutex::new((0, addrs)),
        })
    }

    fn generation(&self) -> u64 {
        self.addrs.lock().unwrap_or_else(|e| e.into_inner()).0
    }

    /// A new SDK client over the current addresses, and their generation.
    fn client(&self) -> (u64, kv_client::Client) {
        let (generation, addrs) = self.addrs.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let client = self
            .builder
            .clone()
            .addrs(addrs)
            .build()
            .expect("build an SDK client");
        (generation, client)
    }

    fn set(&self, addrs: Vec<String>) {
        let mut now = self.addrs.lock().unwrap_or_else(|e| e.into_inner());
        if now.1 != addrs {
            *now = (now.0 + 1, addrs);
        }
    }
}

/// The nemesis: one fault at a time, each healed before the next, in a
/// seeded order that goes through every kind of its list before repeating
/// one.
struct Nemesis {
    rng: StdRng,
    /// The kinds it draws from.
    kinds: &'static [Fault],
    /// Rounds of each kind that must take effect before it is done.
    min_each: u64,
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
    fn new(seed: u64, kinds: &'static [Fault], min_each: u64) -> Nemesis {
        Nemesis {
            rng: StdRng::seed_from_u64(seed),
            kinds,
            min_each,
            queue: Vec::new(),
            effective: BTreeMap::new(),
            missed: BTreeMap::new(),
            reported: FaultReport::default(),
            last: BTreeMap::new(),
        }
    }

    fn next_fault(&mut self) -> Fault {
        if self.queue.is_empty() {
            self.queue = self.kinds.to_vec();
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

    /// Reads every running replica's counters, then heals its links;
    /// returns what the replicas counted since the last time. A heal is
    /// retried until the replica confirms it: one missed silently (a busy
    /// machine, a slow TLS handshake) would leave that replica cut off for
    /// the rest of the run, and a later step would fail for want of a
    /// majority with nothing pointing at the cause.
    async fn heal_links(&mut self, cluster: &mut Cluster) -> FaultReport {
        const CONFIRM_WITHIN: Duration = Duration::from_secs(30);
        let client = cluster.client_with_timeout(Duration::from_secs(2));
        let mut round = FaultReport::default();
        for id in cluster.running() {
            let heal = FaultSpec {
                heal: true,
                ..FaultSpec::default()
            };
            let since = Instant::now();
            let r = loop {
                match client
                    .set_faults(cluster.client_addr(id), heal.clone())
                    .await
                {
                    Ok(r) => break r,
                    Err(e) if since.elapsed() < CONFIRM_WITHIN => {
                        eprintln!("nemesis: healing replica {id} failed, retrying: {e}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                    Err(e) => panic!(
                        "replica {id} is running but did not confirm the heal of its links \
                         within {CONFIRM_WITHIN:?}: {e}"
                    ),
                }
            };
            let last = self.last.insert(id, r.clone()).unwrap_or_default();
            // A restarted replica counts from zero again.
            let delta = |now: u64, before: u64| now.checked_sub(before).unwrap_or(now);
            round.dropped += delta(r.dropped, last.dropped);
            round.delayed += delta(r.delayed, last.delayed);
            round.timed_out += delta(r.timed_out, last.timed_out);
            round.refused += delta(r.refused, last.refused);
        }
        self.reported.dropped += round.dropped;
        self.reported.delayed += round.delayed;
        self.reported.timed_out += round.timed_out;
        self.reported.refused += round.refused;
        round
    }

    fn done(&self) -> bool {
        self.kinds
            .iter()
            .all(|k| self.effective.get(k).copied().unwrap_or(0) >= self.min_each)
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

/// Reads every key of `keys` once more, linearizably, recorded like any
/// other operation (as client `reader_id`: a lost acknowledged write cannot
/// be explained by them), then runs the `kv-check` linearizability checker
/// over the whole history; panics on a violation (writing the history to a
/// file first), a malformed history or a check undecided within its
/// budget. Returns the operations checked, completed and of unknown
/// outcome.
async fn final_reads_and_check(
    seed: u64,
    what: &str,
    rec: &Recorder,
    reader: &kv_client::Client,
    reader_id: u64,
    keys: &[String],
) -> (usize, usize, usize) {
    for key in keys {
        let t = rec.invoke(reader_id, Op::get(key));
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
    let label = what.to_string();
    let report = tokio::task::spawn_blocking(move || {
        let report = check(
            &history,
            Budget::default().with_time(Duration::from_secs(60)),
        );
        if report.verdict.is_violation() {
            let path =
                std::env::temp_dir().join(format!("kv-jepsen-history-{label}-seed-{seed}.txt"));
            let _ = std::fs::write(&path, format!("{}", kv_check::History { events: history }));
            eprintln!("history written to {}", path.display());
        }
        report
    })
    .await
    .expect("the checker panicked");
    eprintln!("seed {seed} ({what}): kv-check: {report}");
    assert!(
        !report.verdict.is_violation(),
        "seed {seed} ({what}): the history is not linearizable: {report}"
    );
    assert!(
        !matches!(report.verdict, Verdict::InvalidHistory { .. }),
        "seed {seed} ({what}): the recorded history is malformed: {report}"
    );
    assert!(
        matches!(report.verdict, Verdict::Linearizable),
        "seed {seed} ({what}): the checker could not decide within its budget: {report}"
    );
    (ops, ok, unknown)
}

/// The client addresses of replicas `ids`.
fn addrs_of(cluster: &Cluster, ids: &[ReplicaId]) -> Vec<String> {
    ids.iter()
        .map(|&id| cluster.client_addr(id).to_string())
        .collect()
}

/// The Jepsen-style tests of this file run one at a time: each loads both
/// cores of a CI machine with a cluster of its own, and side by side they
/// would slow each other into timeouts.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

struct RunSummary {
    ops: usize,
    ok: usize,
    unknown: usize,
    effective: BTreeMap<Fault, u64>,
    missed: BTreeMap<Fault, u64>,
    reported: FaultReport,
}

/// The keys a run of `run_for` spreads its register writes over.
fn keys_for(run_for: Duration) -> usize {
    KEYS_PER_MINUTE * (run_for.as_secs().div_ceil(60).max(1) as usize)
}

/// A five-replica cluster for `seed`: TLS for even seeds (or all with
/// `KV_TEST_TLS`), plain TCP for odd ones; says which.
async fn start_cluster(seed: u64, what: &str) -> Cluster {
    // Not `is_multiple_of`: that needs Rust 1.87, the workspace says 1.80.
    #[allow(clippy::manual_is_multiple_of)]
    let cluster = if seed % 2 == 0 || kv_tests::tls_by_env() {
        Cluster::start_tls(5, &[]).await
    } else {
        Cluster::start(5).await
    };
    let how = if cluster.tls_dir().is_some() {
        "TLS"
    } else {
        "plain TCP"
    };
    eprintln!("seed {seed}{what}: {how}");
    cluster
}

/// The register clients of a run, started: their history, the flag that
/// stops them, the addresses they use, and their tasks.
fn start_register_clients(
    cluster: &Cluster,
    seed: u64,
    keys: usize,
) -> (
    Recorder,
    Arc<AtomicBool>,
    Arc<Route>,
    tokio::task::JoinSet<u64>,
) {
    let rec = Recorder::new();
    let stop = Arc::new(AtomicBool::new(false));
    let route = Route::new(
        cluster.builder().timeout(Duration::from_secs(1)),
        addrs_of(cluster, &cluster.ids()),
    );
    let mut clients = tokio::task::JoinSet::new();
    for id in 1..=CLIENTS {
        clients.spawn(client_loop(
            route.clone(),
            id,
            seed,
            rec.clone(),
            stop.clone(),
            keys,
        ));
    }
    (rec, stop, route, clients)
}

async fn run_seed(seed: u64, run_for: Duration) -> RunSummary {
    let keys = keys_for(run_for);
    let mut cluster = start_cluster(seed, "").await;
    let (rec, stop, _route, mut clients) = start_register_clients(&cluster, seed, keys);

    let mut nemesis = Nemesis::new(seed, &ALL_FAULTS, MIN_EACH);
    let started = Instant::now();
    // Runs at least `run_for`, and on until every kind of fault took effect
    // `MIN_EACH` times (bounded: a kind that never takes effect fails the
    // run below instead of running forever).
    let rounds_cap = nemesis.kinds.len() as u64 * nemesis.min_each * 4;
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
    nemesis.heal_links(&mut cluster).await;
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

    let reader = cluster.client_with_timeout(Duration::from_secs(5));
    let keys: Vec<String> = (0..keys).map(|k| format!("key-{k}")).collect();
    let (ops, ok, unknown) =
        final_reads_and_check(seed, "registers", &rec, &reader, CLIENTS + 1, &keys).await;
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
    let _one = ONE_AT_A_TIME.lock().await;
    let secs = env_u64("KV_SOAK_SECS").unwrap_or(CI_RUN_SECS);
    let run_for = Duration::from_secs(secs);
    let seeds = seeds_from("KV_JEPSEN_SEEDS", &CI_SEEDS);
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

// ---------------------------------------------------------------------
// The data model under faults: single-key transactions through the
// checker, a bank, and watchers.
// ---------------------------------------------------------------------

/// The seeds CI runs the data-model workloads with.
const DATA_CI_SEEDS: [u64; 1] = [3];
/// Times every kind of fault must take effect in a data-model run.
const DATA_MIN_EACH: u64 = 1;
/// The keys of the single-key transaction clients (and of the watchers).
const REG_PREFIX: &str = "reg/";
/// The bank's accounts.
const BANK_PREFIX: &str = "bank/";
const ACCOUNTS: u64 = 5;
const START_BALANCE: u64 = 100;
/// Clients doing single-key transactions on `REG_PREFIX` keys.
const TXN_CLIENTS: u64 = 4;
/// Clients moving money between accounts.
const TRANSFER_CLIENTS: u64 = 2;
/// Watchers of `REG_PREFIX`.
const WATCHERS: usize = 3;
/// Historical ranges of `REG_PREFIX` compared with the watchers' order at
/// the end.
const SAMPLED_REVISIONS: usize = 20;

/// A write a transaction client sent to a `REG_PREFIX` key.
#[derive(Clone, Debug)]
struct SentWrite {
    key: Vec<u8>,
    /// The value put (unique in the run), or `None` for a delete.
    value: Option<Vec<u8>>,
    /// The revision it took, if it was acknowledged and changed the store;
    /// `None` if its outcome is unknown.
    revision: Option<u64>,
}

type SentWrites = Arc<std::sync::Mutex<Vec<SentWrite>>>;

fn sent(writes: &SentWrites, key: &str, value: Option<&str>, revision: Option<u64>) {
    writes
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push(SentWrite {
            key: key.as_bytes().to_vec(),
            value: value.map(|v| v.as_bytes().to_vec()),
            revision,
        });
}

/// One client of single-key transactions on a few keys, every one recorded
/// for the checker as the register operation it is: a put (a transaction
/// of one put, no comparison), a delete (one delete), and a
/// compare-and-swap built the way etcd's users build one — read the key
/// with its revisions (recorded as a get), then a transaction that puts
/// only if the key's mod revision (or version 0: absent) is still what was
/// read, or, half the time, only if its value still is. Values are unique,
/// so "the mod revision is unchanged" and "the value is unchanged" are the
/// same condition, and the checker holds the server to it. Plain gets are
/// mixed in. A transaction whose comparison failed wrote nothing and is
/// recorded as not applied (the register model has no "compared and found
/// something else, unseen"), so it is the successful and the unknown ones
/// that the checker examines. Every write sent is also noted with the
/// revision it took, for the watchers' check.
async fn txn_client_loop(
    client: kv_client::Client,
    id: u64,
    seed: u64,
    rec: Recorder,
    writes: SentWrites,
    stop: Arc<AtomicBool>,
    keys: usize,
) -> u64 {
    let mut rng = StdRng::seed_from_u64(seed.wrapping_mul(1000).wrapping_add(100 + id));
    let mut n = 0u64;
    while !stop.load(Ordering::SeqCst) {
        n += 1;
        let key = format!("{REG_PREFIX}key-{}", rng.random_range(0..keys));
        let value = format!("t{id}-{n}");
        let put = TxnOp::Put {
            key: key.as_bytes().to_vec(),
            value: value.as_bytes().to_vec(),
            lease: 0,
        };
        match rng.random_range(0..100u32) {
            0..=24 => {
                let t = rec.invoke(id, Op::get(&key));
                let r = client.get(key.as_str()).await;
                rec.complete(t, outcome(r.map(Ret::Get)));
            }
            25..=49 => {
                let t = rec.invoke(id, Op::put(&key, &value));
                let r = client
                    .txn(Txn {
                        success: vec![put],
                        ..Txn::default()
                    })
                    .await;
                match &r {
                    Ok(done) => sent(&writes, &key, Some(&value), Some(done.revision)),
                    Err(e) if e.outcome_unknown() => sent(&writes, &key, Some(&value), None),
                    Err(_) => {}
                }
                rec.complete(t, outcome(r.map(|_| Ret::Put)));
            }
            50..=59 => {
                let t = rec.invoke(id, Op::delete(&key));
                let r = client
                    .txn(Txn {
                        success: vec![TxnOp::Delete {
                            key: key.as_bytes().to_vec(),
                        }],
                        ..Txn::default()
                    })
                    .await;
                let r = r.map(|done| {
                    let existed = matches!(
                        done.results.first(),
                        Some(TxnOpResult::Deleted { existed: true })
                    );
                    (existed, done.revision)
                });
                match &r {
                    Ok((true, revision)) => sent(&writes, &key, None, Some(*revision)),
                    Err(e) if e.outcome_unknown() => sent(&writes, &key, None, None),
                    _ => {}
                }
                rec.complete(t, outcome(r.map(|(existed, _)| Ret::Delete(existed))));
            }
            _ => {
                let t = rec.invoke(id, Op::get(&key));
                let r = client.get_kv(key.as_str()).await;
                let read = r.as_ref().ok().cloned();
                rec.complete(t, outcome(r.map(|kv| Ret::Get(kv.map(|kv| kv.value)))));
                let Some(read) = read else { continue };
                let by_revision = rng.random_bool(0.5);
                let compare = match (&read, by_revision) {
                    (Some(kv), true) => Compare {
                        key: key.as_bytes().to_vec(),
                        op: CmpOp::Equal,
                        target: Target::ModRevision(kv.mod_revision),
                    },
                    (None, true) => Compare {
                        key: key.as_bytes().to_vec(),
                        op: CmpOp::Equal,
                        target: Target::Version(0),
                    },
                    (Some(kv), false) => Compare {
                        key: key.as_bytes().to_vec(),
                        op: CmpOp::Equal,
                        target: Target::Value(kv.value.clone()),
                    },
                    (None, false) => Compare {
                        key: key.as_bytes().to_vec(),
                        op: CmpOp::Equal,
                        target: Target::Exists(false),
                    },
                };
                let expected = read.map(|kv| kv.value);
                let t = rec.invoke(id, Op::cas(&key, expected.as_ref(), &value));
                let r = client
                    .txn(Txn {
                        compares: vec![compare],
                        success: vec![put],
                        failure: vec![],
                    })
                    .await;
                match r {
                    Ok(done) if done.succeeded => {
                        sent(&writes, &key, Some(&value), Some(done.revision));
                        rec.complete(t, Outcome::Ok(Ret::swapped(&value)));
                    }
                    // The comparison failed: nothing was written.
                    Ok(_) => rec.complete(t, Outcome::Failed),
                    Err(e) => {
                        if e.outcome_unknown() {
                            sent(&writes, &key, Some(&value), None);
                        }
                        rec.complete(t, outcome(Err(e)));
                    }
                }
            }
        }
    }
    n
}

/// What the bank's clients counted.
#[derive(Default, Debug)]
struct BankTally {
    transfers: u64,
    refused: u64,
    unknown: u64,
    /// Reads of all accounts checked, by kind.
    linearizable_reads: u64,
    local_reads: u64,
    past_reads: u64,
    /// Reads at a past revision the history no longer held.
    compacted: u64,
    /// Every read whose accounts did not add up, and why.
    violations: Vec<String>,
}

type Bank = Arc<std::sync::Mutex<BankTally>>;

fn tally(bank: &Bank, f: impl FnOnce(&mut BankTally)) {
    f(&mut bank.lock().unwrap_or_else(|e| e.into_inner()));
}

/// The key of account `i`.
fn account(i: u64) -> String {
    format!("{BANK_PREFIX}acct-{i}")
}

/// Checks one read of every account: exactly the `ACCOUNTS` accounts, each
/// a number, summing to the total. Returns the balances.
fn bank_total(kvs: &[kv_api::KeyValue]) -> Result<Vec<u64>, String> {
    let keys: Vec<String> = kvs
        .iter()
        .map(|kv| String::from_utf8_lossy(&kv.key).into_owned())
        .collect();
    let want: Vec<String> = (0..ACCOUNTS).map(account).collect();
    if keys != want {
        return Err(format!("the accounts read are {keys:?}, not {want:?}"));
    }
    let balances: Vec<u64> = kvs
        .iter()
        .map(|kv| {
            String::from_utf8_lossy(&kv.value)
                .parse::<u64>()
                .map_err(|e| format!("a balance of {:?}: {e}", kv.value))
        })
        .collect::<Result<_, _>>()?;
    let sum: u64 = balances.iter().sum();
    if sum != ACCOUNTS * START_BALANCE {
        return Err(format!(
            "the balances {balances:?} sum to {sum}, not {}",
            ACCOUNTS * START_BALANCE
        ));
    }
    Ok(balances)
}

/// A client moving money: reads every account (one range), picks two,
/// and moves an amount between them in a transaction that compares both
/// accounts' mod revisions with what it read.
async fn transfer_loop(
    client: kv_client::Client,
    id: u64,
    seed: u64,
    bank: Bank,
    stop: Arc<AtomicBool>,
) {
    let mut rng = StdRng::seed_from_u64(seed.wrapping_mul(1000).wrapping_add(200 + id));
    while !stop.load(Ordering::SeqCst) {
        let Ok(page) = client.range(RangeRequest::prefix(BANK_PREFIX)).await else {
            continue;
        };
        let (Some(from), Some(to)) = (
            page.kvs.get(rng.random_range(0..page.kvs.len().max(1))),
            page.kvs.get(rng.random_range(0..page.kvs.len().max(1))),
        ) else {
            tally(&bank, |b| {
                b.violations
                    .push(format!("a transfer's read found no accounts: {page:?}"))
            });
            continue;
        };
        if from.key == to.key {
            continue;
        }
        let balance = |kv: &kv_api::KeyValue| -> u64 {
            String::from_utf8_lossy(&kv.value).parse().unwrap_or(0)
        };
        let amount = rng.random_range(0..=balance(from).min(30));
        let txn = Txn {
            compares: [from, to]
                .iter()
                .map(|kv| Compare {
                    key: kv.key.clone(),
                    op: CmpOp::Equal,
                    target: Target::ModRevision(kv.mod_revision),
                })
                .collect(),
            success: vec![
                TxnOp::Put {
                    key: from.key.clone(),
                    value: (balance(from) - amount).to_string().into_bytes(),
                    lease: 0,
                },
                TxnOp::Put {
                    key: to.key.clone(),
                    value: (balance(to) + amount).to_string().into_bytes(),
                    lease: 0,
                },
            ],
            failure: vec![],
        };
        match client.txn(txn).await {
            Ok(done) if done.succeeded => tally(&bank, |b| b.transfers += 1),
            Ok(_) => tally(&bank, |b| b.refused += 1),
            Err(_) => tally(&bank, |b| b.unknown += 1),
        }
    }
}

/// A client reading every account, three ways, each read checked to sum
/// to the total: a linearizable range; a local range at whichever replica
/// answers (possibly stale, but a state the log went through: before the
/// accounts were opened, none, after it, the total); and a range at the
/// revision of an earlier linearizable read, which must give exactly what
/// that read gave.
async fn bank_reader_loop(
    client: kv_client::Client,
    seed: u64,
    opened: u64,
    bank: Bank,
    stop: Arc<AtomicBool>,
) {
    let mut rng = StdRng::seed_from_u64(seed.wrapping_mul(1000).wrapping_add(300));
    let mut past: Vec<RangeResponse> = Vec::new();
    while !stop.load(Ordering::SeqCst) {
        match rng.random_range(0..3u32) {
            0 => {
                let Ok(page) = client.range(RangeRequest::prefix(BANK_PREFIX)).await else {
                    continue;
                };
                let checked = bank_total(&page.kvs);
                tally(&bank, |b| {
                    b.linearizable_reads += 1;
                    if let Err(why) = checked {
                        b.violations.push(format!(
                            "a linearizable read at revision {}: {why}",
                            page.revision
                        ));
                    }
                });
                if past.len() == 8 {
                    past.remove(rng.random_range(0..past.len()));
                }
                past.push(page);
            }
            1 => {
                let Ok(page) = client.range_local(RangeRequest::prefix(BANK_PREFIX)).await else {
                    continue;
                };
                let checked = if page.revision < opened {
                    if page.kvs.is_empty() {
                        Ok(Vec::new())
                    } else {
                        Err(format!(
                            "accounts before they were opened (at {opened}): {:?}",
                            page.kvs
                        ))
                    }
                } else {
                    bank_total(&page.kvs)
                };
                tally(&bank, |b| {
                    b.local_reads += 1;
                    if let Err(why) = checked {
                        b.violations
                            .push(format!("a local read at revision {}: {why}", page.revision));
                    }
                });
            }
            _ => {
                let Some(then) = past.choose(&mut rng) else {
                    continue;
                };
                let req = RangeRequest {
                    revision: then.revision,
                    ..RangeRequest::prefix(BANK_PREFIX)
                };
                match client.range(req).await {
                    Ok(page) => tally(&bank, |b| {
                        b.past_reads += 1;
                        if let Err(why) = bank_total(&page.kvs) {
                            b.violations
                                .push(format!("a read at past revision {}: {why}", then.revision));
                        } else if page.kvs != then.kvs {
                            b.violations.push(format!(
                                "a read at past revision {} gave {:?}, but a read at that \
                                 revision gave {:?}",
                                then.revision, page.kvs, then.kvs
                            ));
                        }
                    }),
                    Err(kv_client::Error::Compacted(_)) => tally(&bank, |b| b.compacted += 1),
                    Err(_) => {}
                }
            }
        }
    }
}

/// What one watcher saw.
#[derive(Debug, Default)]
struct WatchLog {
    events: Vec<WatchEvent>,
    /// Polls that failed (and were retried from the same cursor).
    errors: u64,
    /// Times it was dropped and made again, in a new SDK client, from its
    /// cursor (as a restarted process would resume).
    resumed: u64,
    /// If its cursor fell behind the history: where the history started.
    compacted: Option<u64>,
    /// Every answer, for a failure's report: the cursor asked from, the
    /// cursor after, the store's revision it gave, how many events
    /// (`Answer::events_before` is the log's length before it).
    answers: Vec<Answer>,
}

/// One answer a watcher got (see [`WatchLog::answers`]).
#[derive(Debug, Clone, Copy)]
#[allow(dead_code)] // read through Debug, in failure reports
struct Answer {
    asked: (u64, u64),
    next: (u64, u64),
    revision: u64,
    events: usize,
    events_before: usize,
    resumed: u64,
}

impl WatchLog {
    /// The answers around the one that brought event `at`.
    fn answers_near(&self, at: usize) -> Vec<Answer> {
        let i = self
            .answers
            .iter()
            .position(|a| a.events_before + a.events > at)
            .unwrap_or(self.answers.len());
        self.answers[i.saturating_sub(3)..(i + 3).min(self.answers.len())].to_vec()
    }
}

/// A watcher of `REG_PREFIX` from revision `from`, through faults: a
/// failed poll is retried from the same cursor; now and then the watcher
/// is dropped and made again in a new client from its cursor. It goes on
/// until `until` is set (non-zero) and it has seen the store up to it.
async fn watch_loop(
    builder: kv_client::ClientBuilder,
    mut addrs: Vec<String>,
    index: usize,
    seed: u64,
    from: u64,
    until: Arc<std::sync::atomic::AtomicU64>,
) -> WatchLog {
    let mut rng = StdRng::seed_from_u64(seed.wrapping_mul(1000).wrapping_add(400 + index as u64));
    let mut log = WatchLog::default();
    // The cursor: a revision, and how many of its events were seen.
    let mut next = (from, 0);
    'resume: loop {
        // A new process, as it were: a client of its own, starting at
        // another replica.
        addrs.rotate_left(1);
        let client = builder
            .clone()
            .addrs(addrs.clone())
            .build()
            .expect("build a watch client");
        let mut w = client
            .watcher(WatchRequest {
                skip: next.1,
                ..WatchRequest::prefix(REG_PREFIX, next.0)
            })
            .await
            .expect("a watcher from a revision needs no call");
        loop {
            let target = until.load(Ordering::SeqCst);
            if target != 0 && w.revision() >= target {
                return log;
            }
            let asked = (w.next_revision(), w.next_skip());
            match w.next().await {
                Ok(events) => {
                    log.answers.push(Answer {
                        asked,
                        next: (w.next_revision(), w.next_skip()),
                        revision: w.revision(),
                        events: events.len(),
                        events_before: log.events.len(),
                        resumed: log.resumed,
                    });
                    log.events.extend(events)
                }
                Err(kv_client::Error::Compacted(at)) => {
                    log.compacted = Some(at);
                    return log;
                }
                Err(_) => log.errors += 1,
            }
            if rng.random_ratio(1, 20) {
                // The whole cursor: an answer cut at its limit stops
                // partway through a revision's events.
                next = (w.next_revision(), w.next_skip());
                log.resumed += 1;
                continue 'resume;
            }
        }
    }
}

/// Applies one watch event to `state`, checking that the event says what
/// the change did: a put's version one more than the key's (1 if absent),
/// its create revision kept (its own if absent), its mod revision its own.
fn apply_event(
    state: &mut BTreeMap<Vec<u8>, kv_api::KeyValue>,
    e: &WatchEvent,
) -> Result<(), String> {
    let rev = e.kv.mod_revision;
    match e.kind {
        EventKind::Put => {
            let (version, create) = match state.get(&e.kv.key) {
                Some(old) => (old.version + 1, old.create_revision),
                None => (1, rev),
            };
            if e.kv.version != version || e.kv.create_revision != create {
                return Err(format!(
                    "the put at revision {rev} says version {} created at {}, but the events \
                     before it make it version {version} created at {create}",
                    e.kv.version, e.kv.create_revision
                ));
            }
            state.insert(e.kv.key.clone(), e.kv.clone());
        }
        EventKind::Delete => {
            if state.remove(&e.kv.key).is_none() {
                return Err(format!(
                    "a delete at revision {rev} of {:?}, which the events before it do not \
                     hold",
                    String::from_utf8_lossy(&e.kv.key)
                ));
            }
        }
    }
    Ok(())
}

/// The watchers' check. `logs` are what each watcher saw from revision
/// `from`; `writes` every write sent (acknowledged ones with the revision
/// each took); `last` the store's revision at the end and `last_kvs` the
/// watched keys then (none before `from`: the keys are new). Every log must
/// be a prefix of one order, and the complete ones (that were not cut off
/// by compaction) that order whole, which must be the order of the log:
/// revisions increasing, each acknowledged write at the revision it took,
/// every event a write that was sent, no value put twice, every event
/// consistent with the ones before it, and all of them together giving
/// the final state. Returns that order.
fn check_watches(
    logs: &[&WatchLog],
    writes: &[SentWrite],
    from: u64,
    last: u64,
    last_kvs: &[kv_api::KeyValue],
) -> Result<Vec<WatchEvent>, String> {
    let order = logs
        .iter()
        .map(|l| &l.events)
        .max_by_key(|e| e.len())
        .cloned()
        .unwrap_or_default();
    // Each write here is of one key: one event per revision. Checked
    // first, so that a watcher that repeats an event is named, not one
    // compared with its longer log.
    for (i, l) in logs.iter().enumerate() {
        if let Some(at) = l
            .events
            .windows(2)
            .position(|p| p[0].kv.mod_revision >= p[1].kv.mod_revision)
        {
            return Err(format!(
                "watcher {i} saw revision {} and then {} (its events {at} and {}); its answers \
                 near them: {:?}",
                l.events[at].kv.mod_revision,
                l.events[at + 1].kv.mod_revision,
                at + 1,
                l.answers_near(at + 1),
            ));
        }
    }
    for (i, l) in logs.iter().enumerate() {
        if let Some(at) = order.iter().zip(&l.events).position(|(a, b)| a != b) {
            let longest = logs
                .iter()
                .max_by_key(|l| l.events.len())
                .expect("this one at least");
            let revs =
                |e: &[WatchEvent]| -> Vec<u64> { e.iter().map(|e| e.kv.mod_revision).collect() };
            let near = |e: &Vec<WatchEvent>| revs(&e[at.saturating_sub(3)..(at + 3).min(e.len())]);
            let (a, b) = (l.events[at].kv.mod_revision, order[at].kv.mod_revision);
            let sent: Vec<_> = writes
                .iter()
                .filter(|w| {
                    w.revision
                        .is_some_and(|r| r + 2 >= a.min(b) && r <= a.max(b) + 2)
                })
                .collect();
            return Err(format!(
                "watcher {i} saw {:?} as its event {at}, another {:?}\n\
                 revisions near it: this one {:?}, the other {:?}\n\
                 this one's answers near it: {:?}\n\
                 the other's: {:?}\n\
                 acknowledged writes at those revisions: {sent:?}",
                l.events[at],
                order[at],
                near(&l.events),
                near(&order),
                l.answers_near(at),
                longest.answers_near(at),
            ));
        }
        if l.compacted.is_none() && l.events.len() != order.len() {
            return Err(format!(
                "watcher {i} saw {} events up to revision {last}, another {}",
                l.events.len(),
                order.len()
            ));
        }
    }
    if let Some(e) = order
        .iter()
        .find(|e| e.kv.mod_revision < from || e.kv.mod_revision > last)
    {
        return Err(format!(
            "an event outside the revisions watched ({from}..={last}): {e:?}"
        ));
    }
    let by_revision: BTreeMap<u64, &WatchEvent> =
        order.iter().map(|e| (e.kv.mod_revision, e)).collect();
    for w in writes {
        let Some(rev) = w.revision else { continue };
        let seen = by_revision.get(&rev).copied();
        let matches = seen.is_some_and(|e| {
            e.kv.key == w.key
                && match &w.value {
                    Some(v) => e.kind == EventKind::Put && e.kv.value == *v,
                    None => e.kind == EventKind::Delete,
                }
        });
        if !matches {
            return Err(format!(
                "the acknowledged {} of {:?} took revision {rev}, but the watchers saw {seen:?} \
                 there",
                if w.value.is_some() { "put" } else { "delete" },
                String::from_utf8_lossy(&w.key)
            ));
        }
    }
    let mut puts: BTreeMap<(&[u8], &[u8]), u32> = BTreeMap::new();
    let mut deletes: BTreeMap<&[u8], u32> = BTreeMap::new();
    for w in writes {
        match &w.value {
            Some(v) => *puts.entry((&w.key, v)).or_default() += 1,
            None => *deletes.entry(&w.key).or_default() += 1,
        }
    }
    let mut state = BTreeMap::new();
    for e in &order {
        match e.kind {
            EventKind::Put => match puts.get_mut(&(e.kv.key.as_slice(), e.kv.value.as_slice())) {
                Some(n) if *n > 0 => *n -= 1,
                Some(_) => return Err(format!("a value put twice: {e:?}")),
                None => return Err(format!("a put no client sent: {e:?}")),
            },
            EventKind::Delete => match deletes.get_mut(e.kv.key.as_slice()) {
                Some(n) if *n > 0 => *n -= 1,
                _ => return Err(format!("more deletes than clients sent: {e:?}")),
            },
        }
        apply_event(&mut state, e)?;
    }
    let replayed: Vec<&kv_api::KeyValue> = state.values().collect();
    let last_kvs: Vec<&kv_api::KeyValue> = last_kvs.iter().collect();
    if replayed != last_kvs {
        return Err(format!(
            "the events replayed give {replayed:?}, but the store holds {last_kvs:?} at \
             revision {last}"
        ));
    }
    Ok(order)
}

/// The keys of `REG_PREFIX` after the events of `order` up to revision
/// `rev`.
fn state_at(order: &[WatchEvent], rev: u64) -> Vec<kv_api::KeyValue> {
    let mut state = BTreeMap::new();
    for e in order.iter().take_while(|e| e.kv.mod_revision <= rev) {
        apply_event(&mut state, e).expect("checked before");
    }
    state.into_values().collect()
}

struct DataSummary {
    ops: usize,
    ok: usize,
    unknown: usize,
    events: usize,
    bank: BankTally,
    watch_errors: u64,
    resumed: u64,
    sampled: usize,
    effective: BTreeMap<Fault, u64>,
}

async fn run_data_seed(seed: u64, run_for: Duration) -> DataSummary {
    let keys = keys_for(run_for);
    let mut cluster = start_cluster(seed, " (data model)").await;
    // The accounts, opened in one transaction before anything else.
    let setup = cluster.client_with_timeout(Duration::from_secs(10));
    let open = Txn {
        success: (0..ACCOUNTS)
            .map(|i| TxnOp::Put {
                key: account(i).into_bytes(),
                value: START_BALANCE.to_string().into_bytes(),
                lease: 0,
            })
            .collect(),
        ..Txn::default()
    };
    let opened = setup.txn(open).await.expect("open the accounts").revision;
    let from = opened + 1;

    let rec = Recorder::new();
    let writes: SentWrites = Arc::default();
    let bank: Bank = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let until = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut clients = tokio::task::JoinSet::new();
    for id in 1..=TXN_CLIENTS {
        let client = cluster.client_with_timeout(Duration::from_secs(1));
        let (rec, writes, stop) = (rec.clone(), writes.clone(), stop.clone());
        clients.spawn(async move {
            txn_client_loop(client, id, seed, rec, writes, stop, keys).await;
        });
    }
    for id in 1..=TRANSFER_CLIENTS {
        let client = cluster.client_with_timeout(Duration::from_secs(1));
        clients.spawn(transfer_loop(client, id, seed, bank.clone(), stop.clone()));
    }
    clients.spawn(bank_reader_loop(
        cluster.client_with_timeout(Duration::from_secs(1)),
        seed,
        opened,
        bank.clone(),
        stop.clone(),
    ));
    let mut watchers = tokio::task::JoinSet::new();
    let addrs = addrs_of(&cluster, &cluster.ids());
    for index in 0..WATCHERS {
        let mut addrs = addrs.clone();
        addrs.rotate_left(index);
        watchers.spawn(watch_loop(
            cluster.builder().timeout(Duration::from_secs(2)),
            addrs,
            index,
            seed,
            from,
            until.clone(),
        ));
    }

    let mut nemesis = Nemesis::new(seed, &ALL_FAULTS, DATA_MIN_EACH);
    let started = Instant::now();
    let rounds_cap = nemesis.kinds.len() as u64 * nemesis.min_each * 4;
    let mut rounds = 0;
    while (started.elapsed() < run_for || !nemesis.done()) && rounds < rounds_cap {
        rounds += 1;
        nemesis.round(&mut cluster).await;
        let quiet = Duration::from_millis(nemesis.rng.random_range(200..600));
        tokio::time::sleep(quiet).await;
    }
    stop.store(true, Ordering::SeqCst);
    while let Some(r) = clients.join_next().await {
        r.expect("a client task panicked");
    }

    // Heal, as the register run does.
    nemesis.heal_links(&mut cluster).await;
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

    let reader = cluster.client_with_timeout(Duration::from_secs(5));
    // The bank: the total once more, linearizably and at every replica.
    let end = reader
        .range(RangeRequest::prefix(BANK_PREFIX))
        .await
        .expect("read the accounts after healing");
    if let Err(why) = bank_total(&end.kvs) {
        panic!("seed {seed}: the accounts after healing: {why}");
    }
    for id in cluster.ids() {
        let local = cluster
            .client_for(id)
            .range_local(RangeRequest::prefix(BANK_PREFIX))
            .await
            .unwrap_or_else(|e| panic!("a local read at replica {id}: {e}"));
        assert_eq!(
            local.kvs, end.kvs,
            "seed {seed}: replica {id} holds other accounts than the cluster"
        );
    }
    let bank = std::mem::take(&mut *bank.lock().unwrap_or_else(|e| e.into_inner()));
    assert!(
        bank.violations.is_empty(),
        "seed {seed}: reads of the bank did not add up: {:#?}",
        bank.violations
    );

    // The watchers: all of them up to the store's revision now.
    let last = reader
        .range(RangeRequest::prefix(REG_PREFIX))
        .await
        .expect("read the watched keys after healing");
    until.store(last.revision, Ordering::SeqCst);
    let mut logs = Vec::new();
    while let Some(r) = watchers.join_next().await {
        logs.push(r.expect("a watcher panicked"));
    }
    let writes = writes.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let order = check_watches(
        &logs.iter().collect::<Vec<_>>(),
        &writes,
        from,
        last.revision,
        &last.kvs,
    )
    .unwrap_or_else(|why| panic!("seed {seed}: the watchers: {why}"));
    let complete = logs.iter().filter(|l| l.compacted.is_none()).count();
    assert!(
        complete > 0,
        "seed {seed}: every watcher fell behind the history: {:?}",
        logs.iter().map(|l| l.compacted).collect::<Vec<_>>()
    );
    // The order is the log's: the store's own history, read at revisions
    // along the way, holds what the events up to each say.
    let mut rng = StdRng::seed_from_u64(seed);
    let mut sampled = 0;
    // The history is bounded: after a compaction, sample what it keeps.
    let mut oldest = from;
    for _ in 0..SAMPLED_REVISIONS {
        let rev = rng.random_range(oldest..=last.revision.max(oldest));
        let req = RangeRequest {
            revision: rev,
            ..RangeRequest::prefix(REG_PREFIX)
        };
        match reader.range(req).await {
            Ok(page) => {
                assert_eq!(
                    page.kvs,
                    state_at(&order, rev),
                    "seed {seed}: the store at revision {rev} is not what the watchers' events \
                     up to it make"
                );
                sampled += 1;
            }
            Err(kv_client::Error::Compacted(at)) => oldest = oldest.max(at + 1),
            Err(e) => panic!("seed {seed}: a range at revision {rev}: {e}"),
        }
    }

    // The single-key transactions: through the checker.
    let reg_keys: Vec<String> = (0..keys).map(|k| format!("{REG_PREFIX}key-{k}")).collect();
    let (ops, ok, unknown) = final_reads_and_check(
        seed,
        "transactions",
        &rec,
        &reader,
        TXN_CLIENTS + 1,
        &reg_keys,
    )
    .await;
    DataSummary {
        ops,
        ok,
        unknown,
        events: order.len(),
        bank,
        watch_errors: logs.iter().map(|l| l.errors).sum(),
        resumed: logs.iter().map(|l| l.resumed).sum(),
        sampled,
        effective: nemesis.effective,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watchers_bank_and_single_key_txns_hold_under_faults() {
    let _one = ONE_AT_A_TIME.lock().await;
    let secs = env_u64("KV_SOAK_SECS").unwrap_or(CI_RUN_SECS);
    let run_for = Duration::from_secs(secs);
    let seeds = seeds_from("KV_JEPSEN_DATA_SEEDS", &DATA_CI_SEEDS);
    assert!(!seeds.is_empty(), "KV_JEPSEN_DATA_SEEDS names no seed");
    for seed in seeds {
        let limit = run_for + Duration::from_secs(180);
        let s = bounded(
            limit,
            "a data-model Jepsen run",
            run_data_seed(seed, run_for),
        )
        .await;
        eprintln!(
            "seed {seed} (data model): {} register operations checked ({} completed, {} \
             unknown outcome); {} watch events, each watcher the same ({} failed polls \
             retried, {} resumes), {} past revisions compared; bank: {} transfers ({} refused, \
             {} unknown), {} linearizable, {} local and {} past reads all adding up ({} \
             compacted); faults that took effect: {:?}",
            s.ops,
            s.ok,
            s.unknown,
            s.events,
            s.watch_errors,
            s.resumed,
            s.sampled,
            s.bank.transfers,
            s.bank.refused,
            s.bank.unknown,
            s.bank.linearizable_reads,
            s.bank.local_reads,
            s.bank.past_reads,
            s.bank.compacted,
            s.effective
        );
        for kind in ALL_FAULTS {
            assert!(
                s.effective.get(&kind).copied().unwrap_or(0) >= DATA_MIN_EACH,
                "seed {seed}: {kind:?} took effect fewer than {DATA_MIN_EACH} times: {:?}",
                s.effective
            );
        }
        assert!(
            s.ok > 100,
            "seed {seed}: too few operations completed ({})",
            s.ok
        );
        assert!(
            s.events > 50,
            "seed {seed}: too few watch events ({})",
            s.events
        );
        assert!(
            s.bank.transfers > 10 && s.bank.linearizable_reads > 10 && s.bank.local_reads > 10,
            "seed {seed}: too little banking to say much: {:?}",
            s.bank
        );
        assert!(s.sampled > 0, "seed {seed}: no past revision could be read");
    }
}

// ---------------------------------------------------------------------
// Membership changes under faults.
// ---------------------------------------------------------------------

/// The seeds CI runs the membership nemesis with (even: TLS).
const MEMBER_CI_SEEDS: [u64; 1] = [4];
/// Times each kind of membership step must be done in a run.
const MEMBER_MIN_EACH: u64 = 2;
/// The voters the nemesis keeps, at least and at most.
const MIN_VOTERS: usize = 3;
const MAX_VOTERS: usize = 7;
/// How long one membership change may take, retries included.
const CHANGE_TIMEOUT: Duration = Duration::from_secs(60);

/// A membership step.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Step {
    /// A new replica (new id, new ports, `--join`), promoted once it has
    /// caught up.
    Add,
    /// A voter removed (not the leader), then stopped.
    Remove,
    /// The leader removed: it steps down once the change is chosen.
    RemoveLeader,
    /// A voter SIGKILLed and its disk wiped, a new replica added in its
    /// place, the dead one removed.
    Replace,
}

/// A fault held while a membership step runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Beside {
    Nothing,
    /// SIGKILL a voter (sometimes the leader); restarted after the step.
    Kill,
    /// Cut a voter (sometimes the leader) off from every other replica.
    Isolate,
}

/// The membership nemesis: membership steps, each with a kill or a
/// partition held during it half the time, alternating with rounds of
/// plain kills and partitions of the current voters; never fewer than
/// three voters, never fewer than a majority of them up and connected.
struct MemberNemesis {
    /// Its rng, and the link faults of the plain nemesis.
    links: Nemesis,
    next_id: ReplicaId,
    steps: BTreeMap<Step, u64>,
    beside: BTreeMap<Beside, u64>,
    faults: BTreeMap<Fault, u64>,
    route: Arc<Route>,
    /// The configuration after the last step.
    membership: Membership,
}

/// Makes `change` happen, through whatever faults: asks for it until the
/// configuration shows `done`, taking "a change is in progress" and "the
/// learner has not caught up" ([`kv_client::Error::Conflict`]) and unknown
/// outcomes (a timeout: asked again, or found done) as reasons to ask
/// again. Panics if it has not happened within [`CHANGE_TIMEOUT`].
async fn ensure(
    admin: &kv_client::Client,
    change: MemberChange,
    done: impl Fn(&Membership) -> bool,
) -> Membership {
    let deadline = Instant::now() + CHANGE_TIMEOUT;
    let mut last = String::from("not asked yet");
    loop {
        if let Ok(m) = admin.members().await {
            if done(&m) {
                return m;
            }
        }
        assert!(
            Instant::now() < deadline,
            "{change} did not happen within {CHANGE_TIMEOUT:?}; last answer: {last}"
        );
        match admin.reconfigure(change.clone()).await {
            Ok(m) if done(&m) => return m,
            Ok(m) => last = format!("{m:?}"),
            Err(e) => last = e.to_string(),
        }
        // A change in progress or a learner catching up: ask again soon.
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

impl MemberNemesis {
    fn admin(&self, cluster: &Cluster) -> kv_client::Client {
        let mut addrs = addrs_of(cluster, &self.membership.voters());
        // Learners and replicas added since answer `members` too.
        addrs.extend(addrs_of(cluster, &self.membership.learners()));
        cluster
            .builder()
            .addrs(addrs)
            .timeout(Duration::from_secs(5))
            .build()
            .expect("build an admin client")
    }

    /// Adds a new replica through `admin`, joining `via`, and promotes it.
    async fn add(&mut self, cluster: &mut Cluster, admin: &kv_client::Client, via: ReplicaId) {
        let id = self.next_id;
        self.next_id += 1;
        let (client_addr, peer_addr) = cluster.add_node(id, via);
        eprintln!("nemesis: add replica {id} at {client_addr}, joining {via}");
        let change = MemberChange::Add {
            id,
            client_addr,
            peer_addr,
        };
        self.membership = ensure(admin, change, |m| m.contains(id)).await;
        cluster.spawn(id);
        cluster.wait_answers(id, Duration::from_secs(30)).await;
        self.membership = ensure(admin, MemberChange::Promote(id), |m| m.is_voter(id)).await;
        eprintln!("nemesis: replica {id} promoted");
    }

    /// Removes `id` through `admin`; if it runs, it must say it was
    /// removed, and it is stopped.
    async fn remove(&mut self, cluster: &mut Cluster, admin: &kv_client::Client, id: ReplicaId) {
        eprintln!("nemesis: remove replica {id}");
        self.membership = ensure(admin, MemberChange::Remove(id), |m| !m.contains(id)).await;
        if cluster.is_running(id) {
            kv_tests::wait_until(
                Duration::from_secs(30),
                "the removed replica to say so",
                || async {
                    cluster
                        .status(id)
                        .await
                        .is_some_and(|s| s.removed && !s.leader)
                },
            )
            .await;
            cluster.kill(id);
        }
    }

    fn pick_step(&mut self) -> Step {
        let voters = self.membership.voters().len();
        let rng = &mut self.links.rng;
        if voters <= MIN_VOTERS {
            [Step::Add, Step::Replace][rng.random_range(0..2)]
        } else if voters >= MAX_VOTERS {
            [Step::Remove, Step::RemoveLeader, Step::Replace][rng.random_range(0..3)]
        } else {
            // The kind done least so far, ties broken at random.
            let least = [Step::Add, Step::Remove, Step::RemoveLeader, Step::Replace]
                .into_iter()
                .map(|s| {
                    (
                        self.steps.get(&s).copied().unwrap_or(0),
                        rng.random::<u32>(),
                        s,
                    )
                })
                .min()
                .expect("four kinds");
            least.2
        }
    }

    async fn step_round(&mut self, cluster: &mut Cluster) {
        let step = self.pick_step();
        let leader = cluster.leader().await;
        let voters = self.membership.voters();
        let rng = &mut self.links.rng;
        // The replica the step removes, if it removes one.
        let target = match step {
            Step::Add => None,
            Step::RemoveLeader => Some(leader.unwrap_or(voters[0])),
            Step::Remove | Step::Replace => {
                let others: Vec<ReplicaId> = voters
                    .iter()
                    .copied()
                    .filter(|&v| Some(v) != leader)
                    .collect();
                Some(*others.choose(rng).expect("at least three voters"))
            }
        };
        // A fault beside it, if a majority stays up through both: with n
        // voters, a replace makes n + 1 with two down, the others n or n + 1
        // with one down (a removal leaves n - 1, one down).
        let room = match step {
            Step::Replace => voters.len() >= 5,
            _ => voters.len() >= 4,
        };
        let beside = if room {
            [Beside::Nothing, Beside::Kill, Beside::Isolate][rng.random_range(0..3)]
        } else {
            Beside::Nothing
        };
        let candidates: Vec<ReplicaId> = voters
            .iter()
            .copied()
            .filter(|&v| Some(v) != target)
            .collect();
        let victim = match beside {
            Beside::Nothing => None,
            // The leader half the time, when it is not the step's.
            _ if leader.is_some_and(|l| candidates.contains(&l)) && rng.random_bool(0.5) => leader,
            _ => candidates.choose(rng).copied(),
        };
        eprintln!("nemesis: {step:?} {target:?}, {beside:?} {victim:?} beside it");
        match (beside, victim) {
            (Beside::Kill, Some(v)) => cluster.kill(v),
            (Beside::Isolate, Some(v)) => {
                let others: Vec<ReplicaId> =
                    cluster.ids().into_iter().filter(|&i| i != v).collect();
                self.links.cut(cluster, &[(&[v], &others)]).await;
            }
            _ => {}
        }
        let up: Vec<ReplicaId> = candidates
            .iter()
            .copied()
            .filter(|&c| Some(c) != victim)
            .collect();
        let admin = self.admin(cluster);
        let via = *up.choose(&mut self.links.rng).expect("a member up");
        match step {
            Step::Add => self.add(cluster, &admin, via).await,
            Step::Remove | Step::RemoveLeader => {
                let t = target.expect("a removal has a target");
                self.remove(cluster, &admin, t).await;
            }
            Step::Replace => {
                let dead = target.expect("a replacement has a target");
                eprintln!("nemesis: replica {dead} dies with its disk");
                cluster.kill(dead);
                std::fs::remove_dir_all(cluster.data_dir(dead))
                    .unwrap_or_else(|e| panic!("wipe replica {dead}: {e}"));
                self.add(cluster, &admin, via).await;
                let admin = self.admin(cluster);
                self.remove(cluster, &admin, dead).await;
            }
        }
        match (beside, victim) {
            (Beside::Kill, Some(v)) => cluster.restart(v).await,
            (Beside::Isolate, Some(_)) => {
                self.links.heal_links(cluster).await;
            }
            _ => {}
        }
        self.route.set(addrs_of(cluster, &self.membership.voters()));
        *self.steps.entry(step).or_insert(0) += 1;
        *self.beside.entry(beside).or_insert(0) += 1;
    }

    /// A plain fault of the current voters, held, then healed: a kill (the
    /// leader half the time), a minority cut off, or the leader isolated.
    async fn fault_round(&mut self, cluster: &mut Cluster) {
        let voters = self.membership.voters();
        let leader = cluster.leader().await;
        let hold = self.links.hold();
        let rng = &mut self.links.rng;
        let fault = [Fault::Kill, Fault::Partition, Fault::IsolateLeader][rng.random_range(0..3)];
        match fault {
            Fault::Kill => {
                let victim = match leader {
                    Some(l) if rng.random_bool(0.5) => l,
                    _ => *voters.choose(rng).expect("voters"),
                };
                eprintln!("nemesis: kill replica {victim} for {hold:?}");
                cluster.kill(victim);
                tokio::time::sleep(hold).await;
                cluster.restart(victim).await;
            }
            _ => {
                let mut shuffled = voters.clone();
                shuffled.shuffle(rng);
                let minority = match (fault, leader) {
                    (Fault::IsolateLeader, Some(l)) if voters.contains(&l) => vec![l],
                    _ => shuffled[..(voters.len() - 1) / 2].to_vec(),
                };
                let rest: Vec<ReplicaId> = cluster
                    .ids()
                    .into_iter()
                    .filter(|i| !minority.contains(i))
                    .collect();
                eprintln!("nemesis: cut {minority:?} off for {hold:?}");
                self.links.cut(cluster, &[(&minority, &rest)]).await;
                tokio::time::sleep(hold).await;
                self.links.heal_links(cluster).await;
            }
        }
        *self.faults.entry(fault).or_insert(0) += 1;
    }

    fn done(&self) -> bool {
        [Step::Add, Step::Remove, Step::RemoveLeader, Step::Replace]
            .iter()
            .all(|s| self.steps.get(s).copied().unwrap_or(0) >= MEMBER_MIN_EACH)
            && [Beside::Kill, Beside::Isolate]
                .iter()
                .all(|b| self.beside.get(b).copied().unwrap_or(0) >= 1)
    }
}

struct MemberSummary {
    ops: usize,
    ok: usize,
    unknown: usize,
    steps: BTreeMap<Step, u64>,
    beside: BTreeMap<Beside, u64>,
    faults: BTreeMap<Fault, u64>,
    membership: Membership,
}

async fn run_member_seed(seed: u64, run_for: Duration) -> MemberSummary {
    let keys = keys_for(run_for);
    let mut cluster = start_cluster(seed, " (membership)").await;
    let (rec, stop, route, mut clients) = start_register_clients(&cluster, seed, keys);
    let membership = cluster
        .client()
        .members()
        .await
        .expect("the first configuration");
    let mut nemesis = MemberNemesis {
        links: Nemesis::new(seed, &[], 0),
        next_id: cluster.ids().into_iter().max().unwrap_or(0) + 1,
        steps: BTreeMap::new(),
        beside: BTreeMap::new(),
        faults: BTreeMap::new(),
        route: route.clone(),
        membership,
    };
    let started = Instant::now();
    let rounds_cap = 40;
    let mut rounds = 0;
    while (started.elapsed() < run_for || !nemesis.done()) && rounds < rounds_cap {
        rounds += 1;
        nemesis.step_round(&mut cluster).await;
        let quiet = Duration::from_millis(nemesis.links.rng.random_range(200..600));
        tokio::time::sleep(quiet).await;
        if nemesis.links.rng.random_bool(0.5) {
            nemesis.fault_round(&mut cluster).await;
            tokio::time::sleep(quiet).await;
        }
    }
    stop.store(true, Ordering::SeqCst);
    while let Some(r) = clients.join_next().await {
        r.expect("a client task panicked");
    }

    // Heal; then every member runs, votes and agrees: one configuration,
    // one applied index, the same keys with the same revisions.
    nemesis.links.heal_links(&mut cluster).await;
    let m = nemesis.membership.clone();
    let members = m.voters();
    assert!(m.learners().is_empty(), "seed {seed}: learners left: {m:?}");
    for id in cluster.ids() {
        assert_eq!(
            cluster.is_running(id),
            m.contains(id),
            "seed {seed}: replica {id} runs exactly when it is a member of {m:?}"
        );
    }
    cluster.wait_for_leader(Duration::from_secs(20)).await;
    let applied = cluster.max_applied().await;
    cluster
        .wait_applied_equal(applied, Duration::from_secs(30))
        .await;
    let mut agreed: Option<(ReplicaId, RangeResponse)> = None;
    for &id in &members {
        let s = cluster
            .status(id)
            .await
            .unwrap_or_else(|| panic!("seed {seed}: member {id} does not answer"));
        assert!(
            !s.removed,
            "seed {seed}: member {id} says it was removed: {s:?}"
        );
        assert_eq!(s.membership, m, "seed {seed}: member {id}'s configuration");
        let all = cluster
            .client_for(id)
            .range_local(RangeRequest::prefix(""))
            .await
            .unwrap_or_else(|e| panic!("seed {seed}: a local read at member {id}: {e}"));
        match &agreed {
            None => agreed = Some((id, all)),
            Some((first, theirs)) => assert!(
                theirs.kvs == all.kvs && theirs.revision == all.revision,
                "seed {seed}: members {first} and {id} hold different data"
            ),
        }
    }

    let reader = cluster
        .builder()
        .addrs(addrs_of(&cluster, &members))
        .timeout(Duration::from_secs(5))
        .build()
        .expect("build a reader");
    let keys: Vec<String> = (0..keys).map(|k| format!("key-{k}")).collect();
    let (ops, ok, unknown) =
        final_reads_and_check(seed, "membership", &rec, &reader, CLIENTS + 1, &keys).await;
    MemberSummary {
        ops,
        ok,
        unknown,
        steps: nemesis.steps,
        beside: nemesis.beside,
        faults: nemesis.faults,
        membership: m,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_through_membership_changes_under_faults_is_linearizable() {
    let _one = ONE_AT_A_TIME.lock().await;
    let secs = env_u64("KV_SOAK_SECS").unwrap_or(CI_RUN_SECS);
    let run_for = Duration::from_secs(secs);
    let seeds = seeds_from("KV_JEPSEN_MEMBER_SEEDS", &MEMBER_CI_SEEDS);
    assert!(!seeds.is_empty(), "KV_JEPSEN_MEMBER_SEEDS names no seed");
    for seed in seeds {
        // Up to 40 rounds of changes (each bounded), healing, checking.
        let limit = run_for + Duration::from_secs(400);
        let s = bounded(
            limit,
            "a membership Jepsen run",
            run_member_seed(seed, run_for),
        )
        .await;
        eprintln!(
            "seed {seed} (membership): {} operations checked ({} completed, {} unknown \
             outcome); steps {:?}, beside them {:?}, plain faults {:?}; members at the end {:?}",
            s.ops,
            s.ok,
            s.unknown,
            s.steps,
            s.beside,
            s.faults,
            s.membership.voters()
        );
        assert!(
            [Step::Add, Step::Remove, Step::RemoveLeader, Step::Replace]
                .iter()
                .all(|k| s.steps.get(k).copied().unwrap_or(0) >= MEMBER_MIN_EACH),
            "seed {seed}: some kind of step was done fewer than {MEMBER_MIN_EACH} times: {:?}",
            s.steps
        );
        assert!(
            s.ok > 100,
            "seed {seed}: too few operations completed ({})",
            s.ok
        );
    }
}

// ---------------------------------------------------------------------
// The checks themselves can fail: each is fed what a broken store would
// give.
// ---------------------------------------------------------------------

fn put_event(key: &str, value: &str, rev: u64, version: u64, create: u64) -> WatchEvent {
    WatchEvent {
        kind: EventKind::Put,
        kv: kv_api::KeyValue {
            key: key.into(),
            value: value.into(),
            create_revision: create,
            mod_revision: rev,
            version,
            lease: 0,
        },
        prev: None,
    }
}

fn delete_event(key: &str, rev: u64) -> WatchEvent {
    WatchEvent {
        kind: EventKind::Delete,
        kv: kv_api::KeyValue {
            key: key.into(),
            mod_revision: rev,
            ..kv_api::KeyValue::default()
        },
        prev: None,
    }
}

fn sent_write(key: &str, value: Option<&str>, revision: Option<u64>) -> SentWrite {
    SentWrite {
        key: key.into(),
        value: value.map(Into::into),
        revision,
    }
}

#[test]
fn the_watch_check_catches_missed_repeated_reordered_invented_and_wrong_events() {
    let good = vec![
        put_event("reg/a", "1", 10, 1, 10),
        put_event("reg/b", "2", 11, 1, 11),
        put_event("reg/a", "3", 13, 2, 10),
        delete_event("reg/b", 14),
    ];
    let writes = vec![
        sent_write("reg/a", Some("1"), Some(10)),
        sent_write("reg/b", Some("2"), Some(11)),
        // Unknown outcome, applied.
        sent_write("reg/a", Some("3"), None),
        sent_write("reg/b", None, Some(14)),
        // Unknown outcome, never applied.
        sent_write("reg/a", Some("9"), None),
    ];
    let last = vec![good[2].kv.clone()];
    let log = |events: Vec<WatchEvent>| WatchLog {
        events,
        ..WatchLog::default()
    };
    let check = |logs: &[WatchLog], last: &[kv_api::KeyValue]| {
        check_watches(&logs.iter().collect::<Vec<_>>(), &writes, 10, 15, last)
    };
    assert_eq!(
        check(&[log(good.clone()), log(good.clone())], &last),
        Ok(good.clone())
    );
    // A watcher cut off by compaction may have seen a prefix only.
    let cut = WatchLog {
        events: good[..2].to_vec(),
        compacted: Some(12),
        ..WatchLog::default()
    };
    assert!(check(&[log(good.clone()), cut], &last).is_ok());

    let without = |i: usize| {
        let mut e = good.clone();
        e.remove(i);
        e
    };
    let broken: Vec<(&str, Vec<WatchLog>, Vec<kv_api::KeyValue>)> = vec![
        (
            "one watcher misses an event",
            vec![log(good.clone()), log(without(1))],
            last.clone(),
        ),
        (
            "one watcher stops early",
            vec![log(good.clone()), log(good[..3].to_vec())],
            last.clone(),
        ),
        (
            "every watcher misses an acknowledged put",
            vec![log(without(1)), log(without(1))],
            last.clone(),
        ),
        (
            "an unacknowledged put missed: the final state disagrees",
            vec![log(without(2))],
            last.clone(),
        ),
        (
            "two events swapped",
            vec![log(vec![
                good[1].clone(),
                good[0].clone(),
                good[2].clone(),
                good[3].clone(),
            ])],
            last.clone(),
        ),
        (
            "an event repeated",
            vec![log(vec![
                good[0].clone(),
                good[1].clone(),
                good[1].clone(),
                good[2].clone(),
                good[3].clone(),
            ])],
            last.clone(),
        ),
        (
            "a put nobody sent",
            vec![log(vec![
                good[0].clone(),
                good[1].clone(),
                put_event("reg/a", "x", 13, 2, 10),
                good[3].clone(),
            ])],
            vec![put_event("reg/a", "x", 13, 2, 10).kv],
        ),
        (
            "a wrong version",
            vec![log(vec![
                good[0].clone(),
                good[1].clone(),
                put_event("reg/a", "3", 13, 1, 10),
                good[3].clone(),
            ])],
            vec![put_event("reg/a", "3", 13, 1, 10).kv],
        ),
        (
            "a final state the events do not make",
            vec![log(good.clone())],
            Vec::new(),
        ),
        (
            "an event before the watch's start",
            vec![log(vec![put_event("reg/a", "1", 9, 1, 9)])],
            vec![put_event("reg/a", "1", 9, 1, 9).kv],
        ),
    ];
    for (what, logs, last) in broken {
        assert!(check(&logs, &last).is_err(), "not caught: {what}");
    }
    // A watcher that repeats an event (it resumed from a cut answer
    // without its skip) is named as the one at fault, even though its log
    // is the longest.
    let repeated = log(vec![
        good[0].clone(),
        good[1].clone(),
        good[1].clone(),
        good[2].clone(),
        good[3].clone(),
    ]);
    let why = check(&[log(good.clone()), repeated], &last).unwrap_err();
    assert!(
        why.starts_with("watcher 1 saw revision 11 and then 11"),
        "{why}"
    );
}

#[test]
fn the_bank_check_catches_money_made_or_lost_and_missing_accounts() {
    let accounts = |balances: &[u64]| -> Vec<kv_api::KeyValue> {
        balances
            .iter()
            .enumerate()
            .map(|(i, b)| kv_api::KeyValue {
                key: account(i as u64).into_bytes(),
                value: b.to_string().into_bytes(),
                ..kv_api::KeyValue::default()
            })
            .collect()
    };
    assert!(bank_total(&accounts(&[100, 100, 100, 100, 100])).is_ok());
    assert!(bank_total(&accounts(&[70, 130, 100, 0, 200])).is_ok());
    assert!(
        bank_total(&accounts(&[70, 100, 100, 100, 100])).is_err(),
        "money lost"
    );
    assert!(
        bank_total(&accounts(&[100, 130, 100, 100, 100])).is_err(),
        "money made"
    );
    assert!(
        bank_total(&accounts(&[200, 100, 100, 100])).is_err(),
        "an account missing"
    );
    assert!(bank_total(&[]).is_err(), "no accounts");
}
