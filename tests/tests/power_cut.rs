//! No acknowledged write is lost when the power of every replica is cut at
//! once, at random moments, several times over: every log write that a
//! completed sync did not cover is undone (the last one possibly torn) by
//! kv-server's test-only file layer before the replicas restart.
//!
//! The replicas run with the layer on ([`UNSYNCED_JOURNAL_ENV`]), are all
//! killed together in the middle of a load, have their power cut, and are
//! restarted; then every write acknowledged so far, in every round, must
//! read back (linearizably) with its value.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kv_tests::{bounded, wait_until, Cluster, UNSYNCED_JOURNAL_ENV};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Replicas in the cluster.
const REPLICAS: usize = 3;
/// Concurrent writers during the load.
const WRITERS: usize = 4;
/// Power cuts.
const ROUNDS: u64 = 6;
/// Acknowledged writes to see before the cut is armed; the cut then comes
/// after a random number more, up to [`CUT_WITHIN`].
const ACKED_FIRST: usize = 20;
const CUT_WITHIN: usize = 60;

#[test]
fn acknowledged_writes_survive_cutting_the_power_of_every_replica() {
    // The replicas inherit this process's environment. Set before any
    // thread of this test exists (and this file holds one test), so no
    // other thread reads the environment meanwhile.
    std::env::set_var(UNSYNCED_JOURNAL_ENV, "1");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a runtime");
    runtime.block_on(run());
}

async fn run() {
    let mut cluster = Cluster::start(REPLICAS).await;
    let seed: u64 = std::env::var("KV_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    eprintln!("seed {seed} (set KV_TEST_SEED to repeat)");
    let mut rng = StdRng::seed_from_u64(seed);
    let test = async {
        let mut acked: BTreeMap<String, String> = BTreeMap::new();
        for round in 1..=ROUNDS {
            let record: Arc<Mutex<Vec<(String, String)>>> = Arc::default();
            let stop = Arc::new(AtomicBool::new(false));
            let mut writers = tokio::task::JoinSet::new();
            for w in 0..WRITERS {
                let client = cluster.client_with_timeout(Duration::from_secs(2));
                let record = record.clone();
                let stop = stop.clone();
                writers.spawn(async move {
                    let mut i = 0u64;
                    while !stop.load(Ordering::SeqCst) {
                        let key = format!("r{round}-w{w}-{i}");
                        let value = format!("v{round}-{w}-{i}-{seed:x}");
                        if client.put(key.as_str(), value.as_str()).await.is_ok() {
                            record.lock().unwrap().push((key, value));
                        }
                        i += 1;
                    }
                });
            }
            // A random moment: after a random number of acknowledgements.
            let cut_after = ACKED_FIRST + rng.random_range(0..CUT_WITHIN);
            let r = &record;
            wait_until(
                Duration::from_secs(30),
                "writes acknowledged under load",
                || {
                    let n = r.lock().unwrap().len();
                    async move { n >= cut_after }
                },
            )
            .await;

            let ids = cluster.ids();
            cluster.kill_all(&ids);
            stop.store(true, Ordering::SeqCst);
            while let Some(r) = writers.join_next().await {
                r.expect("a writer task panicked");
            }
            let this_round = std::mem::take(&mut *record.lock().unwrap());
            for &id in &ids {
                let what = cluster.power_cut(id, rng.random());
                eprintln!("round {round}: power cut of replica {id}: {what}");
            }
            eprintln!(
                "round {round}: {} writes acknowledged before the cut",
                this_round.len()
            );
            acked.extend(this_round);

            for &id in &ids {
                cluster.spawn(id);
            }
            cluster.wait_ready(Duration::from_secs(30)).await;
            verify(&cluster, &acked).await;
        }

        let client = cluster.client_with_timeout(Duration::from_secs(10));
        client.put("after", "ok").await.expect("put after the cuts");
        assert_eq!(client.get("after").await.unwrap(), Some(b"ok".to_vec()));
    };
    bounded(Duration::from_secs(150), "the test", test).await;
}

/// Reads back every acknowledged write, a few readers at a time.
async fn verify(cluster: &Cluster, acked: &BTreeMap<String, String>) {
    let all: Vec<(String, String)> = acked.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    let mut readers = tokio::task::JoinSet::new();
    for chunk in all.chunks(all.len().div_ceil(4).max(1)) {
        let chunk = chunk.to_vec();
        let client = cluster.client_with_timeout(Duration::from_secs(10));
        readers.spawn(async move {
            let mut wrong = Vec::new();
            for (key, value) in chunk {
                let got = client
                    .get(key.as_str())
                    .await
                    .unwrap_or_else(|e| panic!("get {key} after the power cut: {e}"));
                if got.as_deref() != Some(value.as_bytes()) {
                    wrong.push(format!(
                        "{key}: acknowledged {value:?}, read {:?}",
                        got.map(|v| String::from_utf8_lossy(&v).into_owned())
                    ));
                }
            }
            wrong
        });
    }
    let mut wrong = Vec::new();
    while let Some(r) = readers.join_next().await {
        wrong.extend(r.expect("a reader task panicked"));
    }
    assert!(
        wrong.is_empty(),
        "{} of {} acknowledged writes were lost or changed: {:#?}",
        wrong.len(),
        all.len(),
        &wrong[..wrong.len().min(20)]
    );
}
