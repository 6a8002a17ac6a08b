//! A replica that was down while the others took many writes catches up by
//! itself once restarted, and then serves the same map.

use std::time::Duration;

use kv_tests::{bounded, Cluster};

const WRITERS: usize = 8;
const PUTS_PER_WRITER: usize = 300;
const KEYS: usize = 200;

fn key(i: usize) -> String {
    format!("key-{i:03}")
}

/// The value of the snapshot test's put `i`: `BIG` bytes, starting with `v{i}`.
fn value(i: usize) -> Vec<u8> {
    let mut v = format!("v{i}:").into_bytes();
    v.resize(BIG, b'.');
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarted_replica_catches_up_on_the_writes_it_missed() {
    let mut cluster = Cluster::start(5).await;
    let test = async {
        let leader = cluster.wait_for_leader(Duration::from_secs(20)).await;
        let behind = cluster.ids().into_iter().find(|&i| i != leader).unwrap();
        cluster.kill(behind);

        let mut writers = tokio::task::JoinSet::new();
        for w in 0..WRITERS {
            let client = cluster.client_with_timeout(Duration::from_secs(10));
            writers.spawn(async move {
                for i in 0..PUTS_PER_WRITER {
                    let k = key((w * PUTS_PER_WRITER + i) % KEYS);
                    client
                        .put(k.as_str(), format!("w{w}-{i}").as_str())
                        .await
                        .unwrap_or_else(|e| panic!("writer {w} put {i}: {e}"));
                }
            });
        }
        while let Some(r) = writers.join_next().await {
            r.expect("a writer panicked");
        }
        let target = cluster.max_applied().await;
        eprintln!(
            "replica {behind} missed {} writes (applied index {target})",
            WRITERS * PUTS_PER_WRITER
        );

        cluster.restart(behind).await;
        let started = std::time::Instant::now();
        cluster
            .wait_all_applied(target, Duration::from_secs(60))
            .await;
        eprintln!("replica {behind} caught up in {:?}", started.elapsed());

        let reference = cluster.client();
        let restarted = cluster.client_for(behind);
        for i in 0..KEYS {
            let k = key(i);
            let want = reference.get(k.as_str()).await.expect("linearizable get");
            let got = restarted
                .get_local(k.as_str())
                .await
                .unwrap_or_else(|e| panic!("local get of {k} on replica {behind}: {e}"));
            assert_eq!(got, want, "replica {behind} after catching up, key {k}");
        }
        let status = cluster
            .status(behind)
            .await
            .expect("status of the restarted replica");
        assert_eq!(status.keys, KEYS as u64, "key count on replica {behind}");
    };
    bounded(Duration::from_secs(150), "the test", test).await;
}

/// Entries between snapshots in the snapshot test: small, so that the log a
/// lagging replica needs is compacted away and it must take a snapshot.
const SNAPSHOT_EVERY: &str = "50";

/// Value size in the snapshot test: 400 of them are 25 MiB, far more than
/// the 8 MiB of log a replica keeps behind its snapshot for peers slightly
/// behind (or the 1,000 commands), so the restarted replica cannot catch
/// up from the log alone.
const BIG: usize = 64 << 10;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarted_replica_catches_up_from_a_snapshot_once_the_log_is_compacted() {
    let mut cluster = Cluster::start_with_args(5, &["--snapshot-every", SNAPSHOT_EVERY]).await;
    let test = async {
        let client = cluster.client_with_timeout(Duration::from_secs(10));
        client.put("early", "e").await.expect("put");
        let leader = cluster.wait_for_leader(Duration::from_secs(20)).await;
        let behind = cluster.ids().into_iter().find(|&i| i != leader).unwrap();
        cluster.kill(behind);

        // Sequential puts: one log entry each, far past two snapshot
        // intervals and past what is kept behind a snapshot.
        for i in 0..400 {
            client
                .put(key(i % KEYS).as_str(), value(i))
                .await
                .unwrap_or_else(|e| panic!("put {i}: {e}"));
        }
        let target = cluster.max_applied().await;
        let leader_status = cluster.status(leader).await.expect("leader status");
        eprintln!(
            "applied index {target}; the leader's snapshot covers {}",
            leader_status.snapshot
        );
        assert!(
            leader_status.snapshot > 0,
            "the leader took no snapshot with --snapshot-every {SNAPSHOT_EVERY} after {target} entries"
        );

        cluster.restart(behind).await;
        cluster
            .wait_all_applied(target, Duration::from_secs(60))
            .await;
        let status = cluster
            .status(behind)
            .await
            .expect("status of the restarted replica");
        eprintln!("restarted replica {behind}: {status:?}");
        assert!(
            status.snapshots_installed > 0,
            "replica {behind} caught up past a compacted log without receiving a snapshot: \
             {status:?}"
        );
        let restarted = cluster.client_for(behind);
        for i in 0..KEYS {
            let k = key(i);
            let want = client.get(k.as_str()).await.expect("linearizable get");
            let got = restarted.get_local(k.as_str()).await.expect("local get");
            assert_eq!(got, want, "replica {behind} after the snapshot, key {k}");
        }
        assert_eq!(
            restarted.get_local("early").await.expect("local get"),
            Some(b"e".to_vec())
        );

        // And it keeps up with new writes after installing the snapshot.
        client.put("late", "l").await.expect("put after catch-up");
        let target = cluster.max_applied().await;
        cluster
            .wait_all_applied(target, Duration::from_secs(20))
            .await;
        assert_eq!(
            restarted.get_local("late").await.expect("local get"),
            Some(b"l".to_vec())
        );
    };
    bounded(Duration::from_secs(150), "the test", test).await;
}
