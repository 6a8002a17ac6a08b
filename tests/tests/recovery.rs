//! Replicas that crashed, froze or fell behind get back in sync by
//! themselves: from the log, from a snapshot, after SIGSTOP; a truncated
//! snapshot is refused at start; the data directory does not grow with the
//! number of writes.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use kv_api::ReplicaId;
use kv_tests::{bounded, Cluster};

/// Writes `total` puts from `writers` concurrent tasks over `keys` keys;
/// each task owns its keys, so the latest value of every key is known
/// without reading it. Returns the last value written to each key.
async fn write_load(
    cluster: &Cluster,
    writers: usize,
    total: usize,
    keys: usize,
    tag: &str,
) -> BTreeMap<String, String> {
    let mut tasks = tokio::task::JoinSet::new();
    for w in 0..writers {
        let client = cluster.client_with_timeout(Duration::from_secs(10));
        let tag = tag.to_string();
        tasks.spawn(async move {
            let mut last = BTreeMap::new();
            let mine: Vec<usize> = (0..keys).filter(|k| k % writers == w).collect();
            for i in 0..total / writers {
                let key = format!("key-{:05}", mine[i % mine.len()]);
                let value = format!("{tag}-{w}-{i}");
                client
                    .put(key.as_str(), value.as_str())
                    .await
                    .unwrap_or_else(|e| panic!("put {key}: {e}"));
                last.insert(key, value);
            }
            last
        });
    }
    let mut latest = BTreeMap::new();
    while let Some(r) = tasks.join_next().await {
        latest.extend(r.expect("a writer panicked"));
    }
    latest
}

/// Waits until replica `id` has applied as far as the leader, with no
/// client traffic; returns how long it took.
async fn wait_caught_up(cluster: &Cluster, id: ReplicaId, limit: Duration) -> Duration {
    let started = Instant::now();
    let leader = cluster.wait_for_leader(Duration::from_secs(10)).await;
    let target = cluster
        .status(leader)
        .await
        .map(|s| s.applied)
        .expect("the leader answers");
    loop {
        if let Some(s) = cluster.status(id).await {
            if s.applied >= target {
                return started.elapsed();
            }
        }
        assert!(
            started.elapsed() < limit,
            "replica {id} did not reach applied {target} within {limit:?}: {:?}",
            cluster.status(id).await
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Every key reads back its latest value from replica `id`'s own map.
async fn assert_local_values(cluster: &Cluster, id: ReplicaId, latest: &BTreeMap<String, String>) {
    let local = cluster.client_for(id);
    for (key, value) in latest {
        let got = local.get_local(key.as_str()).await.expect("local get");
        assert_eq!(
            got.as_deref(),
            Some(value.as_bytes()),
            "replica {id} holds a stale {key}"
        );
    }
}

async fn follower(cluster: &Cluster) -> ReplicaId {
    let leader = cluster.wait_for_leader(Duration::from_secs(20)).await;
    cluster
        .ids()
        .into_iter()
        .find(|&i| i != leader)
        .expect("a follower")
}

/// Kills a follower, writes 5,000 puts from `writers` tasks, restarts it:
/// with no client traffic it reaches the leader's applied index within
/// 10 s and holds the latest values. With `snapshot_every`, first waits
/// until every other replica's newest snapshot covers the load (so each has
/// compacted its log). Returns whether the victim installed a snapshot.
async fn killed_replica_catches_up(writers: usize, snapshot_every: Option<&str>) -> bool {
    let server_args: Vec<&str> = match snapshot_every {
        Some(n) => vec!["--snapshot-every", n],
        None => vec![],
    };
    let mut cluster = Cluster::start_with_args(5, &server_args).await;
    let test = async {
        let victim = follower(&cluster).await;
        cluster.kill(victim);
        let latest = write_load(&cluster, writers, 5_000, 500, "v").await;
        if let Some(every) = snapshot_every {
            let every: u64 = every.parse().expect("a number");
            let applied = cluster.max_applied().await;
            kv_tests::wait_for(
                Duration::from_secs(30),
                "snapshots covering the load",
                || async {
                    let statuses = cluster.statuses().await;
                    statuses
                        .iter()
                        .filter(|(id, _)| **id != victim)
                        .all(|(_, s)| s.as_ref().is_some_and(|s| s.snapshot + every >= applied))
                        .then_some(())
                },
            )
            .await;
        }
        cluster.spawn(victim);
        let took = wait_caught_up(&cluster, victim, Duration::from_secs(10)).await;
        eprintln!("replica {victim} caught up on 5,000 writes in {took:?} (args {server_args:?})");
        assert_local_values(&cluster, victim, &latest).await;
        // Whether it got there through a snapshot transfer, as the replica
        // itself counts them (not a log line, which RUST_LOG can hide).
        cluster
            .status(victim)
            .await
            .expect("the restarted replica answers")
            .snapshots_installed
            > 0
    };
    bounded(Duration::from_secs(120), "the test", test).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replica_killed_during_5000_writes_catches_up_from_the_log_within_10s() {
    let via_snapshot = killed_replica_catches_up(16, None).await;
    assert!(!via_snapshot, "with the default interval the log suffices");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replica_killed_during_5000_writes_catches_up_from_a_snapshot_within_10s() {
    // The 5,000 puts missed are far more than the 1,000 commands kept in
    // the log behind a snapshot.
    let via_snapshot = killed_replica_catches_up(16, Some("100")).await;
    assert!(
        via_snapshot,
        "with --snapshot-every 100 what it missed is only in a snapshot"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replica_frozen_with_sigstop_catches_up_after_sigcont() {
    let mut cluster = Cluster::start(5).await;
    let test = async {
        let victim = follower(&cluster).await;
        cluster.pause(victim);
        let latest = write_load(&cluster, 16, 2_000, 200, "p").await;
        cluster.resume(victim);
        // Liveness, not speed (unlike the 10 s of the kill tests, which
        // their names promise): generous for a loaded machine.
        let took = wait_caught_up(&cluster, victim, Duration::from_secs(30)).await;
        eprintln!("replica {victim} resumed and caught up in {took:?}");
        assert_local_values(&cluster, victim, &latest).await;
    };
    bounded(Duration::from_secs(120), "the test", test).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn truncated_snapshot_is_refused_at_start_naming_the_file() {
    let mut cluster = Cluster::start_with_args(5, &["--snapshot-every", "50"]).await;
    let test = async {
        let victim = follower(&cluster).await;
        let latest = write_load(&cluster, 16, 800, 100, "s").await;
        let applied = cluster.max_applied().await;
        cluster
            .wait_all_applied(applied, Duration::from_secs(30))
            .await;
        cluster.kill(victim);
        let dir = cluster.data_dir(victim).to_path_buf();
        let mut snaps: Vec<_> = std::fs::read_dir(&dir)
            .expect("data dir")
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "snap"))
            .collect();
        snaps.sort();
        let newest = snaps.last().expect("a snapshot was taken").clone();
        let len = std::fs::metadata(&newest).expect("metadata").len();
        std::fs::OpenOptions::new()
            .write(true)
            .open(&newest)
            .and_then(|f| f.set_len(len / 2))
            .expect("truncate the snapshot");
        let name = newest.file_name().unwrap().to_string_lossy().into_owned();

        cluster.start_expecting_refusal(victim, &name).await;

        // The README's recovery: wipe the data directory and restart.
        std::fs::remove_dir_all(&dir).expect("wipe");
        cluster.spawn(victim);
        // Liveness, not speed: generous for a loaded machine.
        let took = wait_caught_up(&cluster, victim, Duration::from_secs(60)).await;
        eprintln!("the wiped replica rejoined and caught up in {took:?}");
        assert_local_values(&cluster, victim, &latest).await;
    };
    bounded(Duration::from_secs(120), "the test", test).await;
}

/// Bytes under `dir`, not counting files being written at this moment (a
/// snapshot in progress, `*.tmp`, or being received, `*.partial`).
fn dir_size(dir: &Path) -> u64 {
    let mut total = 0;
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if path
            .extension()
            .is_some_and(|x| x == "tmp" || x == "partial")
        {
            continue;
        }
        total += if path.is_dir() {
            dir_size(&path)
        } else {
            entry.metadata().map(|m| m.len()).unwrap_or(0)
        };
    }
    total
}

/// Puts per phase of `data_directory_stops_growing_with_the_number_of_writes`
/// (200,000 until 2026-11: the longest test of CI, five minutes on a loaded
/// two-core machine; 100,000 would come too close to the tolerance below).
const PHASE: usize = 150_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_directory_stops_growing_with_the_number_of_writes() {
    // What stays on disk: two snapshots of the map (1,000 keys) and the log
    // kept behind the newest (1,000 commands), plus what came since it — at
    // most 10 entries with a snapshot every 10. The size is sampled several
    // times near the end of each phase and the medians compared, so the
    // sawtooth of snapshot-then-compact does not decide the result.
    let cluster = Cluster::start_with_args(5, &["--snapshot-every", "10"]).await;
    let test = async {
        let first = load_and_sample(&cluster, PHASE).await;
        let second = load_and_sample(&cluster, PHASE).await;
        eprintln!(
            "median data directory bytes per replica: after {PHASE} puts {first:?}, \
             after {} {second:?}",
            2 * PHASE
        );
        // Log files are preallocated in steps of `storage::RESERVE` (4 MiB),
        // so one more or one fewer at the sampled moments moves ~20 MB by
        // 20%: allow one step beside the 20%. A log that kept every write
        // would grow by over 15 MB between the phases (150,000 commands of
        // more than 100 bytes each), more than that allows at the 27-32 MB
        // measured in 2026-11 (10-11 MB).
        let step = kv_server::storage::RESERVE as f64;
        for (a, b) in first.iter().zip(&second) {
            let (a, b) = (*a as f64, *b as f64);
            assert!(
                (b - a).abs() <= 0.2 * a + step,
                "a data directory went from {a} to {b} bytes between {PHASE} and {} puts",
                2 * PHASE
            );
        }
    };
    bounded(Duration::from_secs(400), "the test", test).await;
}

/// Runs `total` puts over 1,000 keys from 64 tasks; while the last tenth of
/// them runs, samples every replica's data directory size `SAMPLES` times.
/// Returns the median per replica.
async fn load_and_sample(cluster: &Cluster, total: usize) -> Vec<u64> {
    const TASKS: usize = 64;
    let client = cluster.client_with_timeout(Duration::from_secs(10));
    let done = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    for t in 0..TASKS {
        let client = client.clone();
        let done = done.clone();
        tasks.spawn(async move {
            for i in 0..total / TASKS {
                let key = format!("key-{:04}", (t * 7919 + i) % 1_000);
                client
                    .put(key.as_str(), [b'x'; 100].as_slice())
                    .await
                    .unwrap_or_else(|e| panic!("put {key}: {e}"));
                done.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
        });
    }
    const SAMPLES: usize = 15;
    let mut samples: Vec<Vec<u64>> = Vec::new();
    let tail = total * 9 / 10;
    while samples.len() < SAMPLES {
        let n = done.load(std::sync::atomic::Ordering::Relaxed);
        if n >= tail + (total - tail) * samples.len() / SAMPLES || tasks.is_empty() {
            samples.push(
                cluster
                    .ids()
                    .into_iter()
                    .map(|id| dir_size(cluster.data_dir(id)))
                    .collect(),
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        while let Some(r) = tasks.try_join_next() {
            r.expect("a writer panicked");
        }
    }
    while let Some(r) = tasks.join_next().await {
        r.expect("a writer panicked");
    }
    (0..samples[0].len())
        .map(|r| {
            let mut v: Vec<u64> = samples.iter().map(|s| s[r]).collect();
            v.sort_unstable();
            v[v.len() / 2]
        })
        .collect()
}
