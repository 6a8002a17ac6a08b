//! No acknowledged write is lost when every replica is killed at once in
//! the middle of a load and then restarted on its data directory — several
//! times over — and a write that was cut off is either there whole or absent.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kv_tests::{bounded, wait_until, Cluster};

/// Concurrent writers during the load.
const WRITERS: usize = 6;

/// Acknowledged writes to collect in each round before the crash.
const ACKED_PER_ROUND: usize = 100;

/// Crash-and-restart rounds.
const ROUNDS: usize = 3;

/// What the writers of one round saw.
#[derive(Default)]
struct Record {
    /// Acknowledged puts.
    acked: Vec<(String, String)>,
    /// Puts that failed: the outcome is unknown.
    unknown: Vec<(String, String)>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_writes_survive_killing_every_replica_mid_load() {
    let mut cluster = Cluster::start(5).await;
    let test = async {
        let mut acked: BTreeMap<String, String> = BTreeMap::new();
        let mut unknown: BTreeMap<String, String> = BTreeMap::new();
        for round in 1..=ROUNDS {
            let record: Arc<Mutex<Record>> = Arc::default();
            let stop = Arc::new(AtomicBool::new(false));
            let mut writers = tokio::task::JoinSet::new();
            for w in 0..WRITERS {
                let client = cluster.client_with_timeout(Duration::from_secs(2));
                let record = record.clone();
                let stop = stop.clone();
                let nonce: u32 = rand::random();
                writers.spawn(async move {
                    let mut i = 0u64;
                    while !stop.load(Ordering::SeqCst) {
                        let key = format!("r{round}-w{w}-{i}");
                        let value = format!("value-{round}-{w}-{i}-{nonce:08x}");
                        let ok = client.put(key.as_str(), value.as_str()).await.is_ok();
                        let mut r = record.lock().unwrap();
                        if ok {
                            r.acked.push((key, value));
                        } else {
                            r.unknown.push((key, value));
                        }
                        i += 1;
                    }
                });
            }

            let r = &record;
            wait_until(
                Duration::from_secs(60),
                "writes acknowledged under load",
                || {
                    let n = r.lock().unwrap().acked.len();
                    async move { n >= ACKED_PER_ROUND }
                },
            )
            .await;

            // Every replica at once, while writes are in flight.
            let ids = cluster.ids();
            cluster.kill_all(&ids);
            stop.store(true, Ordering::SeqCst);
            // Writers see errors now; an acknowledgement already on its way
            // is recorded before the writer returns.
            while let Some(r) = writers.join_next().await {
                r.expect("a writer task panicked");
            }
            let r = std::mem::take(&mut *record.lock().unwrap());
            eprintln!(
                "round {round}: {} writes acknowledged, {} cut off, then every replica killed",
                r.acked.len(),
                r.unknown.len()
            );
            acked.extend(r.acked);
            unknown.extend(r.unknown);

            for &id in &ids {
                cluster.spawn(id);
            }
            cluster.wait_ready(Duration::from_secs(30)).await;
            verify(&cluster, &acked, &unknown).await;
        }

        // And the restarted cluster takes new writes.
        let client = cluster.client_with_timeout(Duration::from_secs(10));
        client
            .put("after-restart", "ok")
            .await
            .expect("put after the restart");
        assert_eq!(
            client.get("after-restart").await.unwrap(),
            Some(b"ok".to_vec())
        );
    };
    bounded(Duration::from_secs(200), "the test", test).await;
}

/// Reads back every write: an acknowledged one must hold its value; one
/// whose outcome is unknown must hold its value or be absent.
async fn verify(
    cluster: &Cluster,
    acked: &BTreeMap<String, String>,
    unknown: &BTreeMap<String, String>,
) {
    let all: Vec<(String, String, bool)> = acked
        .iter()
        .map(|(k, v)| (k.clone(), v.clone(), true))
        .chain(unknown.iter().map(|(k, v)| (k.clone(), v.clone(), false)))
        .collect();
    let mut readers = tokio::task::JoinSet::new();
    for chunk in all.chunks(all.len().div_ceil(4).max(1)) {
        let chunk = chunk.to_vec();
        let client = cluster.client_with_timeout(Duration::from_secs(10));
        readers.spawn(async move {
            let mut wrong = Vec::new();
            for (key, value, was_acked) in chunk {
                let got = client
                    .get(key.as_str())
                    .await
                    .unwrap_or_else(|e| panic!("get {key} after the restart: {e}"));
                let fine = match &got {
                    Some(v) => v == value.as_bytes(),
                    None => !was_acked,
                };
                if !fine {
                    wrong.push(format!(
                        "{key} ({}): wrote {value:?}, read {:?}",
                        if was_acked {
                            "acknowledged"
                        } else {
                            "outcome unknown"
                        },
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
        "{} of {} writes were lost or changed after the restart: {:#?}",
        wrong.len(),
        all.len(),
        &wrong[..wrong.len().min(20)]
    );
}
