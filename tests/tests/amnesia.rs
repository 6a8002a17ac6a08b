//! A replica that lost its data directory must not vote as the acceptor it
//! was: with its help a minority that never saw an acknowledged write could
//! otherwise elect a leader and fill that write's slot with something else.
//! It rejoins as a learner and votes again once that is safe (see
//! `kv_server::paxos::Standing`).

use std::time::{Duration, Instant};

use kv_api::{FaultSpec, ReplicaId};
use kv_tests::{wait_for, Cluster};

/// Cuts the cluster into `groups`: every replica drops its links with the
/// replicas outside its own group (a replica in no group is left alone).
async fn partition(cluster: &Cluster, groups: &[&[ReplicaId]]) {
    for group in groups {
        for &id in group.iter() {
            let outside: Vec<ReplicaId> = cluster
                .ids()
                .into_iter()
                .filter(|o| !group.contains(o))
                .collect();
            cluster
                .set_faults(
                    id,
                    FaultSpec {
                        heal: true,
                        isolate: Some(outside),
                        ..FaultSpec::default()
                    },
                )
                .await;
        }
    }
}

/// Replica `id` drops its links with `others` (and no other fault).
async fn isolate_from(cluster: &Cluster, id: ReplicaId, others: &[ReplicaId]) {
    cluster
        .set_faults(
            id,
            FaultSpec {
                heal: true,
                isolate: Some(others.to_vec()),
                ..FaultSpec::default()
            },
        )
        .await;
}

async fn standing(cluster: &Cluster, id: ReplicaId) -> Option<String> {
    cluster.status(id).await.map(|s| s.standing)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wiped_replica_cannot_help_a_minority_lose_an_acknowledged_write() {
    let mut cluster = Cluster::start(5).await;
    let leader = cluster.wait_for_leader(Duration::from_secs(20)).await;
    let others: Vec<ReplicaId> = cluster.ids().into_iter().filter(|&i| i != leader).collect();
    let (a, c, d, e) = (others[0], others[1], others[2], others[3]);

    // D and E are cut off: the write is chosen by the leader, A and C only.
    partition(&cluster, &[&[leader, a, c], &[d, e]]).await;
    let client = cluster.client_with_timeout(Duration::from_secs(10));
    client
        .put("k", "acknowledged")
        .await
        .expect("a majority takes the write");

    // A loses its disk. It comes back on the side of D and E, who never
    // saw the write; the leader and C are cut off from the three.
    cluster.kill(a);
    std::fs::remove_dir_all(cluster.data_dir(a)).expect("wipe A's data directory");
    for id in [leader, c] {
        isolate_from(&cluster, id, &[a, d, e]).await;
    }
    for id in [d, e] {
        isolate_from(&cluster, id, &[leader, c]).await;
    }
    cluster.spawn(a);
    cluster.wait_answers(a, Duration::from_secs(20)).await;
    isolate_from(&cluster, a, &[leader, c]).await;

    // A must not vote, so the three cannot elect a leader, and no write can
    // overwrite the slot that holds the acknowledged one.
    let minority = cluster
        .builder()
        .addrs(vec![
            cluster.client_addr(d).to_string(),
            cluster.client_addr(e).to_string(),
            cluster.client_addr(a).to_string(),
        ])
        .timeout(Duration::from_secs(3))
        // Only these three: a hint would lead it to the cut-off leader,
        // which queues the write until the partition heals.
        .follow_hints(false)
        .build()
        .expect("a client of the minority side");
    let started = Instant::now();
    let refused = minority.put("other", "from the minority").await;
    assert!(
        refused.is_err(),
        "a write succeeded on the side of two replicas that never saw the acknowledged \
         write and one that lost its disk"
    );
    for id in [a, d, e] {
        let s = cluster.status(id).await.expect("answers");
        assert!(!s.leader, "replica {id} leads a minority: {s:?}");
    }
    assert_eq!(
        standing(&cluster, a).await.as_deref(),
        Some("unknown"),
        "two voters are not a majority to rejoin through"
    );
    assert!(started.elapsed() >= Duration::from_secs(3));

    // Healed: the acknowledged write is there, and A votes again.
    partition(&cluster, &[&cluster.ids()]).await;
    let client = cluster.client_with_timeout(Duration::from_secs(10));
    assert_eq!(
        client
            .get("k")
            .await
            .expect("a linearizable read after healing"),
        Some(b"acknowledged".to_vec())
    );
    wait_for(Duration::from_secs(20), "A votes again", || async {
        (standing(&cluster, a).await.as_deref() == Some("voter")).then_some(())
    })
    .await;
    let applied = cluster.wait_applied_equal(1, Duration::from_secs(20)).await;
    for id in cluster.ids() {
        let local = cluster
            .client_for(id)
            .get_local("k")
            .await
            .expect("a local read");
        assert_eq!(
            local,
            Some(b"acknowledged".to_vec()),
            "replica {id} at {applied}"
        );
    }
}

/// The README's recovery procedure: a replica whose data directory is
/// removed rejoins on its own (as a learner first, then a voter) and the
/// cluster keeps serving throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wiped_replica_rejoins_and_votes_again() {
    let mut cluster = Cluster::start(3).await;
    let client = cluster.client_with_timeout(Duration::from_secs(10));
    for i in 0..50 {
        client.put(format!("k{i}"), format!("v{i}")).await.unwrap();
    }
    let leader = cluster.wait_for_leader(Duration::from_secs(20)).await;
    let victim = cluster.ids().into_iter().find(|&i| i != leader).unwrap();
    cluster.kill(victim);
    std::fs::remove_dir_all(cluster.data_dir(victim)).unwrap();
    cluster.spawn(victim);
    cluster.wait_answers(victim, Duration::from_secs(20)).await;
    wait_for(
        Duration::from_secs(20),
        "the wiped replica votes again",
        || async { (standing(&cluster, victim).await.as_deref() == Some("voter")).then_some(()) },
    )
    .await;
    // With the wiped replica voting, the cluster takes writes with the
    // leader down: a majority of two needs it.
    cluster.kill(leader);
    client
        .put("after", "the leader died")
        .await
        .expect("a write with the rejoined replica's vote");
    for i in 0..50 {
        assert_eq!(
            client.get(format!("k{i}")).await.unwrap(),
            Some(format!("v{i}").into_bytes())
        );
    }
}
