//! Network faults injected at the peer layer (`set_faults`): a leader cut
//! off from the majority is replaced and can no longer serve linearizable
//! operations; lost and delayed peer messages slow the cluster down but
//! never make it diverge.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use kv_api::{FaultSpec, ReplicaId};
use kv_tests::{bounded, describe, wait_until, Cluster};

/// Cuts `alone` off from every other replica, on both sides of each link.
async fn isolate(cluster: &Cluster, alone: ReplicaId) {
    let others: Vec<ReplicaId> = cluster.ids().into_iter().filter(|&i| i != alone).collect();
    cluster
        .set_faults(
            alone,
            FaultSpec {
                isolate: Some(others.clone()),
                ..FaultSpec::default()
            },
        )
        .await;
    for id in others {
        cluster
            .set_faults(
                id,
                FaultSpec {
                    isolate: Some(vec![alone]),
                    ..FaultSpec::default()
                },
            )
            .await;
    }
}

/// Removes every fault at every replica.
async fn heal_all(cluster: &Cluster) {
    for id in cluster.ids() {
        cluster
            .set_faults(
                id,
                FaultSpec {
                    heal: true,
                    ..FaultSpec::default()
                },
            )
            .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn isolated_leader_is_replaced_and_serves_no_stale_linearizable_read() {
    let cluster = Cluster::start(5).await;
    let test = async {
        cluster
            .cli_ok(&["--timeout", "10", "put", "k", "old"])
            .await;
        let old_leader = cluster.wait_for_leader(Duration::from_secs(20)).await;
        let applied = cluster.max_applied().await;
        cluster
            .wait_all_applied(applied, Duration::from_secs(20))
            .await;

        let cut_at = Instant::now();
        isolate(&cluster, old_leader).await;

        // The majority elects another leader and takes the write.
        let majority: Vec<ReplicaId> = cluster
            .ids()
            .into_iter()
            .filter(|&i| i != old_leader)
            .collect();
        let via = majority[0];
        wait_until(
            Duration::from_secs(20),
            "a write through the majority side",
            || async {
                cluster
                    .cli_at(via, &["--timeout", "3", "put", "k", "new"])
                    .await
                    .status
                    .success()
            },
        )
        .await;
        eprintln!(
            "write acknowledged {:?} after isolating leader {old_leader}",
            cut_at.elapsed()
        );
        let statuses = cluster.statuses().await;
        let new_leaders: Vec<ReplicaId> = statuses
            .values()
            .flatten()
            .filter(|s| s.leader && s.id != old_leader)
            .map(|s| s.id)
            .collect();
        assert!(
            !new_leaders.is_empty(),
            "no leader on the majority side: {statuses:#?}"
        );

        // The isolated replica must not serve a linearizable read of the old
        // value (it may refuse, or time out: exit 3).
        let out = cluster
            .cli_at(old_leader, &["--timeout", "3", "get", "k"])
            .await;
        assert!(
            !(out.status.success() && out.stdout == b"old\n"),
            "the isolated old leader {old_leader} served a stale linearizable read: {}",
            describe(&out)
        );
        if out.status.success() {
            assert_eq!(
                String::from_utf8_lossy(&out.stdout),
                "new\n",
                "{}",
                describe(&out)
            );
        }
        // Nor can it take a write on its own.
        let out = cluster
            .cli_at(old_leader, &["--timeout", "3", "put", "k", "lost"])
            .await;
        eprintln!(
            "put through the isolated replica: exit {:?}",
            out.status.code()
        );
        assert_eq!(
            out.status.code(),
            Some(3),
            "a put through the isolated replica {old_leader}: {}",
            describe(&out)
        );

        // Heal: the old leader rejoins and catches up.
        heal_all(&cluster).await;
        let after = cluster.cli_ok(&["--timeout", "10", "get", "k"]).await;
        assert!(
            after == "new\n" || after == "lost\n",
            "after healing, k is {after:?}"
        );
        let applied = cluster.max_applied().await;
        cluster
            .wait_all_applied(applied, Duration::from_secs(30))
            .await;
        let local = cluster.cli_at(old_leader, &["get", "--local", "k"]).await;
        assert_eq!(
            String::from_utf8_lossy(&local.stdout),
            after,
            "the healed replica {old_leader} disagrees: {}",
            describe(&local)
        );
    };
    bounded(Duration::from_secs(120), "the test", test).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lossy_slow_peer_links_slow_writes_down_but_replicas_converge() {
    let cluster = Cluster::start(5).await;
    let test = async {
        const WRITERS: usize = 4;
        const PUTS: usize = 40;
        // Each writer has keys of its own, so the last write it had
        // acknowledged to a key is what the key must hold in the end.
        const KEYS_PER_WRITER: usize = 3;
        let key = |w: usize, k: usize| format!("key-{w}-{k}");
        for id in cluster.ids() {
            cluster
                .set_faults(
                    id,
                    FaultSpec {
                        drop_rate: Some(0.1),
                        delay_ms: Some((1, 20)),
                        ..FaultSpec::default()
                    },
                )
                .await;
        }
        let before = fault_counts(&cluster, FaultSpec::default()).await;
        let started = Instant::now();
        let mut tasks = tokio::task::JoinSet::new();
        for w in 0..WRITERS {
            let client = cluster.client_with_timeout(Duration::from_secs(15));
            tasks.spawn(async move {
                let mut acked = BTreeMap::new();
                for i in 0..PUTS {
                    let key = key(w, i % KEYS_PER_WRITER);
                    let value = format!("w{w}-{i}");
                    client
                        .put(key.as_str(), value.as_str())
                        .await
                        .unwrap_or_else(|e| panic!("writer {w} put {i} with lossy links: {e}"));
                    acked.insert(key, value.into_bytes());
                }
                acked
            });
        }
        let mut acked: BTreeMap<String, Vec<u8>> = BTreeMap::new();
        while let Some(r) = tasks.join_next().await {
            acked.extend(r.expect("a writer panicked"));
        }
        let took = started.elapsed();
        let heal = FaultSpec {
            heal: true,
            ..FaultSpec::default()
        };
        let after = fault_counts(&cluster, heal).await;
        let (dropped, delayed) = (after.0 - before.0, after.1 - before.1);
        eprintln!(
            "{} puts with 10% of peer messages dropped and 1-20 ms delays took {took:?}; the \
             replicas dropped {dropped} and delayed {delayed} messages meanwhile",
            WRITERS * PUTS,
        );
        assert!(dropped > 0, "no peer message was dropped during the writes");
        assert!(delayed > 0, "no peer message was delayed during the writes");

        let applied = cluster.max_applied().await;
        let same = cluster
            .wait_applied_equal(applied, Duration::from_secs(30))
            .await;
        assert_eq!(acked.len(), WRITERS * KEYS_PER_WRITER);
        for id in cluster.ids() {
            let local = cluster.client_for(id);
            for (k, want) in &acked {
                let got = local.get_local(k.as_str()).await.expect("local get");
                assert_eq!(
                    got.as_deref(),
                    Some(want.as_slice()),
                    "replica {id} at applied index {same} does not hold the last acknowledged \
                     write to {k}"
                );
            }
        }
    };
    bounded(Duration::from_secs(150), "the test", test).await;
}

/// Sends `change` to every replica; returns the messages they dropped and
/// delayed so far, summed.
async fn fault_counts(cluster: &Cluster, change: FaultSpec) -> (u64, u64) {
    let mut sum = (0, 0);
    for id in cluster.ids() {
        let report = cluster.set_faults(id, change.clone()).await;
        sum.0 += report.dropped;
        sum.1 += report.delayed;
    }
    sum
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_three_split_serves_on_the_majority_side_only_and_converges_after_healing() {
    let cluster = Cluster::start(5).await;
    let test = async {
        cluster
            .cli_ok(&["--timeout", "10", "put", "k", "before"])
            .await;
        // Put the current leader on the minority side, the harder case.
        let leader = cluster.wait_for_leader(Duration::from_secs(20)).await;
        let others: Vec<ReplicaId> = cluster.ids().into_iter().filter(|&i| i != leader).collect();
        let minority = vec![leader, others[0]];
        let majority: Vec<ReplicaId> = others[1..].to_vec();
        for &id in &minority {
            cluster
                .set_faults(
                    id,
                    FaultSpec {
                        isolate: Some(majority.clone()),
                        ..FaultSpec::default()
                    },
                )
                .await;
        }
        for &id in &majority {
            cluster
                .set_faults(
                    id,
                    FaultSpec {
                        isolate: Some(minority.clone()),
                        ..FaultSpec::default()
                    },
                )
                .await;
        }

        let via = majority[0];
        wait_until(
            Duration::from_secs(20),
            "a write on the majority side",
            || async {
                cluster
                    .cli_at(via, &["--timeout", "3", "put", "k", "majority"])
                    .await
                    .status
                    .success()
            },
        )
        .await;
        for &id in &minority {
            let out = cluster
                .cli_at(id, &["--timeout", "2", "put", "k", "minority"])
                .await;
            assert_eq!(
                out.status.code(),
                Some(3),
                "a put on the minority side (replica {id}): {}",
                describe(&out)
            );
            let out = cluster.cli_at(id, &["--timeout", "2", "get", "k"]).await;
            assert!(
                !(out.status.success() && out.stdout == b"before\n"),
                "replica {id} on the minority side served a stale linearizable read: {}",
                describe(&out)
            );
        }

        heal_all(&cluster).await;
        let value = cluster.cli_ok(&["--timeout", "10", "get", "k"]).await;
        assert!(
            value == "majority\n" || value == "minority\n",
            "after healing k is {value:?}"
        );
        let applied = cluster.max_applied().await;
        let same = cluster
            .wait_applied_equal(applied, Duration::from_secs(30))
            .await;
        for id in cluster.ids() {
            let local = cluster.cli_at(id, &["get", "--local", "k"]).await;
            assert_eq!(
                String::from_utf8_lossy(&local.stdout),
                value,
                "replica {id} at applied index {same}: {}",
                describe(&local)
            );
        }
    };
    bounded(Duration::from_secs(120), "the test", test).await;
}

/// A follower cut off for a while under load comes back without deposing
/// the leader: its elections while alone were pre-votes that failed, so
/// its ballot did not rise, and the leader's stays the highest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_returning_follower_does_not_depose_a_healthy_leader() {
    let cluster = Cluster::start(5).await;
    let test = async {
        let leader = cluster.wait_for_leader(Duration::from_secs(20)).await;
        let before = cluster.status(leader).await.expect("the leader answers");
        let follower = cluster
            .ids()
            .into_iter()
            .find(|&i| i != leader)
            .expect("a follower");

        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let writer = {
            let client = cluster.client_with_timeout(Duration::from_secs(10));
            let stop = stop.clone();
            tokio::spawn(async move {
                let mut acked = 0u64;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    if client.put("load", acked.to_string()).await.is_ok() {
                        acked += 1;
                    }
                }
                acked
            })
        };

        isolate(&cluster, follower).await;
        // Long enough for ten election timeouts and more.
        tokio::time::sleep(Duration::from_secs(3)).await;
        let alone = cluster
            .status(follower)
            .await
            .expect("the follower answers");
        assert_eq!(
            alone.ballot_round, before.ballot_round,
            "the cut-off follower raised its ballot: {alone:?}"
        );
        heal_all(&cluster).await;
        let applied = cluster.max_applied().await;
        cluster
            .wait_all_applied(applied, Duration::from_secs(20))
            .await;
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let acked = writer.await.expect("the writer");
        assert!(acked > 0, "no write succeeded");

        let after = cluster.status(leader).await.expect("the leader answers");
        assert!(after.leader, "the leader stepped down: {after:?}");
        assert_eq!(
            after.ballot_round, before.ballot_round,
            "the leader had to take a new ballot: {after:?}"
        );
        let back = cluster
            .status(follower)
            .await
            .expect("the follower answers");
        assert_eq!(back.leader_id, Some(leader), "{back:?}");
    };
    bounded(Duration::from_secs(120), "the test", test).await;
}
