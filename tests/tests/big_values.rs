//! A heavy but legal workload: many clients putting values of the maximum
//! size at once. Every slot and every message is bounded in bytes, so the
//! cluster keeps choosing slots (it used to wedge: batches of 80 MiB could
//! not be sent in one frame, and elections never ended).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kv_tests::{bounded, Cluster};

/// Clients putting at once.
const CLIENTS: usize = 80;
/// The largest value the store takes.
const VALUE: usize = 1 << 20;
/// How long they put, by default (`KV_BIG_VALUES_SECS` changes it).
const SECS: u64 = 30;
/// No window this long without an acknowledged put.
const WINDOW: Duration = Duration::from_secs(3);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eighty_clients_putting_1_mib_values_keep_the_cluster_writing() {
    let secs = std::env::var("KV_BIG_VALUES_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(SECS);
    let cluster = Cluster::start(5).await;
    let test = async {
        // The client of the small put after the load: its session opened
        // now, so that the put is one write.
        let client = cluster.client_with_timeout(Duration::from_secs(10));
        client.put("small", "before").await.expect("a small put");
        let start = Instant::now();
        let stop = Arc::new(AtomicBool::new(false));
        let acked: Arc<Mutex<Vec<Duration>>> = Arc::default();
        let mut tasks = tokio::task::JoinSet::new();
        for c in 0..CLIENTS {
            let client = cluster.client_with_timeout(Duration::from_secs(20));
            let (stop, acked) = (stop.clone(), acked.clone());
            tasks.spawn(async move {
                let value = vec![c as u8; VALUE];
                let mut i = 0;
                while !stop.load(Ordering::Relaxed) {
                    let key = format!("big-{}", (c * 7 + i) % 100);
                    if client.put(key, value.clone()).await.is_ok() {
                        acked.lock().unwrap().push(start.elapsed());
                    }
                    i += 1;
                }
            });
        }
        tokio::time::sleep(Duration::from_secs(secs)).await;
        stop.store(true, Ordering::Relaxed);
        let stopped = start.elapsed();
        // The clients stop once their last put is answered.
        while tasks.join_next().await.is_some() {}
        let drained = start.elapsed() - stopped;

        // Then small puts go through at once: nothing is wedged.
        let small = Instant::now();
        client.put("small", "after").await.expect("a small put");
        let small = small.elapsed();

        let mut times = acked.lock().unwrap().clone();
        times.sort();
        eprintln!(
            "{} puts of {VALUE} bytes by {CLIENTS} clients in {stopped:?} ({:.1}/s); a small \
             put after them took {small:?} (the last big puts took {drained:?} to drain)",
            times.len(),
            times.len() as f64 / stopped.as_secs_f64()
        );
        // Throughput above zero throughout: no gap of WINDOW between the
        // start and the stop without an acknowledged put.
        let mut last = Duration::ZERO;
        for t in times.iter().copied().filter(|t| *t <= stopped) {
            assert!(
                t - last <= WINDOW,
                "no put acknowledged between {last:?} and {t:?}"
            );
            last = t;
        }
        assert!(
            stopped - last <= WINDOW,
            "no put acknowledged in the last {:?} of the load",
            stopped - last
        );
        assert!(
            small <= Duration::from_secs(1),
            "a small put took {small:?} after the load stopped"
        );
        assert_eq!(
            client.get("small").await.expect("a read"),
            Some(b"after".to_vec())
        );
    };
    bounded(Duration::from_secs(secs + 120), "the test", test).await;
}
