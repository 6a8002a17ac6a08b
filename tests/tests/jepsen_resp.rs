//! The Jepsen-style test through the Redis door only: clients speak RESP
//! (the Rust `redis` crate) to whichever replica they reached — `SET` and
//! `GET` on a few registers, `INCR` on a few counters — while a nemesis
//! SIGKILLs and restarts replicas (the leader first), isolates the leader
//! and splits the cluster two against three. A client whose replica dies
//! reconnects to another. Afterwards the cluster is healed, every key is
//! read through RESP, and:
//!
//! - the registers' history (`SET`/`GET`, recorded with invocation and
//!   completion times) goes through the `kv-check` linearizability checker,
//!   as in `jepsen.rs` (whose nemesis this file does not share: it drives
//!   the SDK; the few lines that cut links are repeated here);
//! - each counter is checked as a linearizable increment-only counter:
//!   every acknowledged `INCR` answered a distinct value, all within the
//!   final value; an `INCR` that completed before another began answered
//!   less; and the final value exceeds the acknowledged count by no more
//!   than the `INCR`s whose outcome is unknown (an `INCR` applied twice, or
//!   an acknowledged one lost, fails one of these).
//!
//! ```text
//! KV_SOAK_SECS=120 KV_JEPSEN_SEEDS=3,4 cargo test -p kv-tests --release --test jepsen_resp -- --nocapture
//! ```

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kv_api::{FaultSpec, ReplicaId};
use kv_check::{check, Budget, Op, Outcome, Recorder, Ret, Verdict};
use kv_tests::{bounded, Cluster};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const CLIENTS: u64 = 6;
const REGISTERS: usize = 4;
const COUNTERS: usize = 2;
const CI_SEEDS: [u64; 1] = [1];
const CI_RUN_SECS: u64 = 10;

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

/// One `INCR`: when it was sent and answered (`None`: outcome unknown)
/// and what it answered.
#[derive(Clone, Debug)]
struct Incr {
    counter: usize,
    invoke: Instant,
    done: Option<(Instant, i64)>,
}

fn connect(addr: &str) -> Option<redis::Connection> {
    let client = redis::Client::open(format!("redis://{addr}/")).ok()?;
    let c = client
        .get_connection_with_timeout(Duration::from_secs(2))
        .ok()?;
    // Longer than the door's own retrying (10 s) of one command.
    c.set_read_timeout(Some(Duration::from_secs(15))).ok()?;
    c.set_write_timeout(Some(Duration::from_secs(5))).ok()?;
    Some(c)
}

/// One client thread: random operations until `stop`, reconnecting to the
/// next replica when its connection breaks.
fn client_loop(
    id: u64,
    seed: u64,
    addrs: Vec<String>,
    rec: Recorder,
    incrs: Arc<Mutex<Vec<Incr>>>,
    stop: Arc<AtomicBool>,
) -> u64 {
    let mut rng = StdRng::seed_from_u64(seed.wrapping_mul(1000).wrapping_add(id));
    let mut at = id as usize % addrs.len();
    let mut conn: Option<redis::Connection> = None;
    let mut n = 0;
    while !stop.load(Ordering::SeqCst) {
        let Some(c) = conn.as_mut() else {
            at = (at + 1) % addrs.len();
            conn = connect(&addrs[at]);
            if conn.is_none() {
                std::thread::sleep(Duration::from_millis(50));
            }
            continue;
        };
        n += 1;
        let broken = match rng.random_range(0..100u32) {
            0..=39 => {
                let key = format!("reg-{}", rng.random_range(0..REGISTERS));
                let value = format!("c{id}-{n}");
                let t = rec.invoke(id, Op::put(&key, &value));
                let r = redis::cmd("SET").arg(&key).arg(&value).query::<String>(c);
                let broken = matches!(&r, Err(e) if e.is_io_error() || e.is_timeout());
                rec.complete(
                    t,
                    match r {
                        Ok(_) => Outcome::Ok(Ret::Put),
                        // An error reply or a broken connection: the write
                        // may or may not have been applied.
                        Err(_) => Outcome::Unknown,
                    },
                );
                broken
            }
            40..=79 => {
                let key = format!("reg-{}", rng.random_range(0..REGISTERS));
                let t = rec.invoke(id, Op::get(&key));
                let r = redis::cmd("GET").arg(&key).query::<Option<Vec<u8>>>(c);
                let broken = matches!(&r, Err(e) if e.is_io_error() || e.is_timeout());
                rec.complete(
                    t,
                    match r {
                        Ok(v) => Outcome::Ok(Ret::Get(v)),
                        Err(_) => Outcome::Failed,
                    },
                );
                broken
            }
            _ => {
                let counter = rng.random_range(0..COUNTERS);
                let invoke = Instant::now();
                let r = redis::cmd("INCR")
                    .arg(format!("ctr-{counter}"))
                    .query::<i64>(c);
                let broken = matches!(&r, Err(e) if e.is_io_error() || e.is_timeout());
                incrs.lock().unwrap().push(Incr {
                    counter,
                    invoke,
                    done: r.ok().map(|v| (Instant::now(), v)),
                });
                broken
            }
        };
        if broken {
            conn = None;
        }
    }
    n
}

/// Checks one increment-only counter's `INCR`s against its final value;
/// `Err` says what is wrong.
fn check_counter(incrs: &[Incr], last: i64) -> Result<(), String> {
    let mut acked: Vec<(Instant, Instant, i64)> = incrs
        .iter()
        .filter_map(|i| i.done.map(|(at, v)| (i.invoke, at, v)))
        .collect();
    let unknown = incrs.len() - acked.len();
    acked.sort_by_key(|a| a.2);
    for w in acked.windows(2) {
        if w[0].2 == w[1].2 {
            return Err(format!("two INCRs answered {}", w[0].2));
        }
    }
    if let Some(a) = acked.iter().find(|a| a.2 < 1 || a.2 > last) {
        return Err(format!(
            "an INCR answered {} but the counter ends at {last}",
            a.2
        ));
    }
    let missing = last - acked.len() as i64;
    if missing < 0 || missing as usize > unknown {
        return Err(format!(
            "the counter ends at {last} after {} acknowledged INCRs and {unknown} of unknown \
             outcome",
            acked.len()
        ));
    }
    // Real time: one that completed before another began answered less.
    let mut by_completion = acked.clone();
    by_completion.sort_by_key(|a| a.1);
    let mut best_before = Vec::with_capacity(by_completion.len());
    let mut best = i64::MIN;
    for a in &by_completion {
        best = best.max(a.2);
        best_before.push(best);
    }
    for b in &acked {
        let before = by_completion.partition_point(|a| a.1 < b.0);
        if before > 0 && best_before[before - 1] >= b.2 {
            return Err(format!(
                "an INCR answered {} after another had completed with {}",
                b.2,
                best_before[before - 1]
            ));
        }
    }
    Ok(())
}

#[test]
fn the_counter_check_catches_doubles_losses_and_reorderings() {
    let t0 = Instant::now();
    let at = |ms: u64| t0 + Duration::from_millis(ms);
    let ok = |i: u64, c: u64, v: i64| Incr {
        counter: 0,
        invoke: at(i),
        done: Some((at(c), v)),
    };
    let unknown = |i: u64| Incr {
        counter: 0,
        invoke: at(i),
        done: None,
    };
    assert!(check_counter(&[ok(0, 10, 1), ok(5, 15, 2)], 2).is_ok());
    assert!(check_counter(&[ok(0, 10, 2), ok(5, 15, 1)], 2).is_ok());
    assert!(check_counter(&[ok(0, 10, 2), ok(20, 25, 1)], 2).is_err());
    assert!(check_counter(&[ok(0, 10, 1), ok(20, 25, 1)], 2).is_err());
    assert!(check_counter(&[ok(0, 10, 1), ok(20, 25, 2)], 1).is_err());
    assert!(check_counter(&[ok(0, 10, 1), ok(20, 25, 2)], 3).is_err());
    assert!(check_counter(&[ok(0, 10, 1), unknown(5), ok(20, 25, 3)], 3).is_ok());
}

/// Sets `isolate` faults so that each group in `groups` loses its links
/// to the others (both sides are told).
async fn cut(cluster: &Cluster, groups: &[Vec<ReplicaId>]) {
    let client = cluster.client_with_timeout(Duration::from_millis(500));
    for (i, g) in groups.iter().enumerate() {
        let others: Vec<ReplicaId> = groups
            .iter()
            .enumerate()
            .filter(|(j, _)| *j != i)
            .flat_map(|(_, o)| o.iter().copied())
            .collect();
        for &id in g {
            let spec = FaultSpec {
                isolate: Some(others.clone()),
                ..FaultSpec::default()
            };
            let _ = client.set_faults(cluster.client_addr(id), spec).await;
        }
    }
}

async fn heal(cluster: &Cluster) {
    let client = cluster.client_with_timeout(Duration::from_millis(500));
    for id in cluster.ids() {
        let spec = FaultSpec {
            heal: true,
            ..FaultSpec::default()
        };
        let _ = client.set_faults(cluster.client_addr(id), spec).await;
    }
}

async fn run_seed(seed: u64, run_for: Duration) {
    let mut cluster = Cluster::start_with_redis(5, &[]).await;
    let addrs: Vec<String> = cluster
        .ids()
        .iter()
        .map(|&i| cluster.redis_addr(i).to_string())
        .collect();
    let rec = Recorder::new();
    let incrs = Arc::new(Mutex::new(Vec::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let clients: Vec<_> = (0..CLIENTS)
        .map(|id| {
            let (addrs, rec, incrs, stop) =
                (addrs.clone(), rec.clone(), incrs.clone(), stop.clone());
            std::thread::spawn(move || client_loop(id, seed, addrs, rec, incrs, stop))
        })
        .collect();

    // The nemesis: kill, isolate the leader, split 2/3, in turn, each held
    // 0.5-1.5 s and healed before the next.
    let mut rng = StdRng::seed_from_u64(seed);
    let started = Instant::now();
    let mut rounds: BTreeMap<&str, u64> = BTreeMap::new();
    let mut round = 0u64;
    while started.elapsed() < run_for || rounds.len() < 3 || rounds.values().any(|&n| n < 2) {
        let hold = Duration::from_millis(rng.random_range(500..1500));
        let ids = cluster.ids();
        let leader = cluster.leader().await;
        match round % 3 {
            0 => {
                let victim = leader.unwrap_or(ids[rng.random_range(0..ids.len())]);
                eprintln!("nemesis: kill replica {victim} for {hold:?}");
                cluster.kill(victim);
                tokio::time::sleep(hold).await;
                cluster.spawn(victim);
                *rounds.entry("kill").or_default() += 1;
            }
            1 => {
                if let Some(l) = leader {
                    eprintln!("nemesis: isolate leader {l} for {hold:?}");
                    let rest: Vec<ReplicaId> = ids.iter().copied().filter(|&i| i != l).collect();
                    cut(&cluster, &[vec![l], rest]).await;
                    tokio::time::sleep(hold).await;
                    heal(&cluster).await;
                    *rounds.entry("isolate-leader").or_default() += 1;
                }
            }
            _ => {
                let mut shuffled = ids.clone();
                for i in (1..shuffled.len()).rev() {
                    shuffled.swap(i, rng.random_range(0..=i));
                }
                let (a, b) = shuffled.split_at(2);
                eprintln!("nemesis: partition {a:?} | {b:?} for {hold:?}");
                cut(&cluster, &[a.to_vec(), b.to_vec()]).await;
                tokio::time::sleep(hold).await;
                heal(&cluster).await;
                *rounds.entry("partition").or_default() += 1;
            }
        }
        round += 1;
        // Let the cluster elect and serve between faults.
        cluster.wait_for_leader(Duration::from_secs(30)).await;
        tokio::time::sleep(Duration::from_millis(rng.random_range(200..600))).await;
    }
    stop.store(true, Ordering::SeqCst);
    let mut sent = 0;
    for c in clients {
        sent += tokio::task::spawn_blocking(move || c.join().expect("a client panicked"))
            .await
            .unwrap();
    }
    heal(&cluster).await;
    let leader = cluster.wait_for_leader(Duration::from_secs(30)).await;
    // A command whose client gave up may still be retried by the door for
    // up to its 10 s; let those end before the final reads.
    tokio::time::sleep(Duration::from_secs(11)).await;

    // Final reads through RESP, recorded for the registers.
    let final_addr = cluster.redis_addr(leader).to_string();
    let rec2 = rec.clone();
    let finals = tokio::task::spawn_blocking(move || {
        let mut c = connect(&final_addr).expect("connect for the final reads");
        for k in 0..REGISTERS {
            let key = format!("reg-{k}");
            let t = rec2.invoke(CLIENTS + 1, Op::get(&key));
            let v = redis::cmd("GET")
                .arg(&key)
                .query::<Option<Vec<u8>>>(&mut c)
                .expect("final read");
            rec2.complete(t, Outcome::Ok(Ret::Get(v)));
        }
        (0..COUNTERS)
            .map(|k| {
                redis::cmd("GET")
                    .arg(format!("ctr-{k}"))
                    .query::<Option<i64>>(&mut c)
                    .expect("final read")
                    .unwrap_or(0)
            })
            .collect::<Vec<i64>>()
    })
    .await
    .unwrap();

    let incrs = incrs.lock().unwrap().clone();
    for (k, last) in finals.iter().enumerate() {
        let mine: Vec<Incr> = incrs.iter().filter(|i| i.counter == k).cloned().collect();
        let acked = mine.iter().filter(|i| i.done.is_some()).count();
        eprintln!(
            "seed {seed}: ctr-{k}: {} INCRs ({acked} acknowledged), final value {last}",
            mine.len()
        );
        if let Err(why) = check_counter(&mine, *last) {
            panic!("seed {seed}: ctr-{k} is not a linearizable counter: {why}");
        }
    }
    let history = rec.history();
    let ok = history
        .iter()
        .filter(|e| matches!(e.outcome, Outcome::Ok(_)))
        .count();
    let report = tokio::task::spawn_blocking(move || {
        check(
            &history,
            Budget::default().with_time(Duration::from_secs(60)),
        )
    })
    .await
    .unwrap();
    eprintln!(
        "seed {seed}: {sent} operations sent, nemesis rounds {rounds:?}; registers: {ok} \
         completed; kv-check: {report}"
    );
    assert!(
        matches!(report.verdict, Verdict::Linearizable),
        "seed {seed}: the registers' history is not (shown) linearizable: {report}"
    );
    assert!(ok > 100, "seed {seed}: too few operations completed ({ok})");
    assert!(
        incrs.iter().filter(|i| i.done.is_some()).count() > 20,
        "seed {seed}: too few INCRs completed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resp_history_under_kills_and_partitions_is_linearizable() {
    let run_for = Duration::from_secs(env_u64("KV_SOAK_SECS").unwrap_or(CI_RUN_SECS));
    let seeds: Vec<u64> = match std::env::var("KV_JEPSEN_SEEDS") {
        Ok(v) => v.split(',').filter_map(|s| s.trim().parse().ok()).collect(),
        Err(_) => CI_SEEDS.to_vec(),
    };
    for seed in seeds {
        bounded(
            run_for + Duration::from_secs(180),
            "a RESP Jepsen run",
            run_seed(seed, run_for),
        )
        .await;
    }
}
