//! No acknowledged write is lost when every replica is killed at once in
//! the middle of a load and then restarted on its data directory.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kv_tests::{bounded, wait_until, Cluster};

/// Concurrent writers during the load.
const WRITERS: usize = 6;

/// Acknowledged writes to collect before the crash.
const ACKED_BEFORE_CRASH: usize = 150;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_writes_survive_killing_every_replica_mid_load() {
    let mut cluster = Cluster::start(5).await;
    let test = async {
        let acked: Arc<Mutex<Vec<(String, String)>>> = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let mut writers = tokio::task::JoinSet::new();
        for w in 0..WRITERS {
            let client = cluster.client_with_timeout(Duration::from_secs(2));
            let acked = acked.clone();
            let stop = stop.clone();
            let nonce: u32 = rand::random();
            writers.spawn(async move {
                let mut failures = 0u64;
                let mut i = 0u64;
                while !stop.load(Ordering::SeqCst) {
                    let key = format!("w{w}-{i}");
                    let value = format!("value-{w}-{i}-{nonce:08x}");
                    match client.put(key.as_str(), value.as_str()).await {
                        Ok(()) => acked.lock().unwrap().push((key, value)),
                        Err(_) => failures += 1,
                    }
                    i += 1;
                }
                failures
            });
        }

        wait_until(
            Duration::from_secs(60),
            "writes acknowledged under load",
            || {
                let n = acked.lock().unwrap().len();
                async move { n >= ACKED_BEFORE_CRASH }
            },
        )
        .await;

        // Every replica at once, while writes are in flight.
        let ids = cluster.ids();
        cluster.kill_all(&ids);
        stop.store(true, Ordering::SeqCst);
        // Writers see errors now; an acknowledgement that was already on its
        // way is still recorded before the writer returns.
        while let Some(r) = writers.join_next().await {
            r.expect("a writer task panicked");
        }
        let acked = acked.lock().unwrap().clone();
        eprintln!(
            "{} writes acknowledged before every replica was killed",
            acked.len()
        );

        for &id in &ids {
            cluster.spawn(id);
        }
        cluster.wait_ready(Duration::from_secs(30)).await;

        // Read every acknowledged write back, a few readers at a time.
        let mut readers = tokio::task::JoinSet::new();
        for chunk in acked.chunks(acked.len().div_ceil(4).max(1)) {
            let chunk = chunk.to_vec();
            let client = cluster.client_with_timeout(Duration::from_secs(10));
            readers.spawn(async move {
                let mut lost = Vec::new();
                for (key, value) in chunk {
                    let got = client
                        .get(key.as_str())
                        .await
                        .unwrap_or_else(|e| panic!("get {key} after the restart: {e}"));
                    if got.as_deref() != Some(value.as_bytes()) {
                        lost.push(format!(
                            "{key}: wrote {value:?}, read {:?}",
                            got.map(|v| String::from_utf8_lossy(&v).into_owned())
                        ));
                    }
                }
                lost
            });
        }
        let mut lost = Vec::new();
        while let Some(r) = readers.join_next().await {
            lost.extend(r.expect("a reader task panicked"));
        }
        assert!(
            lost.is_empty(),
            "{} of {} acknowledged writes were lost or changed: {:#?}",
            lost.len(),
            acked.len(),
            &lost[..lost.len().min(20)]
        );

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
    bounded(Duration::from_secs(150), "the test", test).await;
}
