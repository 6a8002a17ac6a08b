//! The SDK against real replicas: it skips dead replicas, survives a
//! restart of the replica it was using, and a write whose reply is lost is
//! retried under the same sequence number and applied exactly once.

use std::time::{Duration, Instant};

use kv_api::FaultSpec;
use kv_tests::{bounded, Cluster};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_skips_two_dead_replicas_and_survives_a_restart_of_its_replica() {
    let mut cluster = Cluster::start(5).await;
    let test = async {
        // The replica list starts with replicas 1 and 2: kill them.
        let ids = cluster.ids();
        cluster.kill(ids[0]);
        cluster.kill(ids[1]);
        let client = cluster.client_with_timeout(Duration::from_secs(10));
        client
            .put("k", "1")
            .await
            .expect("put with two dead replicas first");
        assert_eq!(client.get("k").await.expect("get"), Some(b"1".to_vec()));

        // Restart the replica it was using (the leader it found), twice.
        for round in 2..=3 {
            let used = cluster.wait_for_leader(Duration::from_secs(20)).await;
            cluster.restart(used).await;
            let value = round.to_string();
            client
                .put("k", value.as_str())
                .await
                .unwrap_or_else(|e| panic!("put after restarting replica {used}: {e}"));
            assert_eq!(
                client.get("k").await.expect("get"),
                Some(value.into_bytes())
            );
        }
    };
    bounded(Duration::from_secs(120), "the test", test).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn write_whose_reply_is_lost_is_retried_and_applied_once() {
    let cluster = Cluster::start(5).await;
    let test = async {
        let leader = cluster.wait_for_leader(Duration::from_secs(20)).await;
        // Without following hints (so every replica forwards to the leader
        // for it): the delayed leader loses its office within ~300 ms, and
        // a client that follows hints is sent straight to the new leader,
        // answered before its first attempt runs out, with nothing retried.
        // Forwarded, the first attempt waits on the delayed links and the
        // retry goes to the next replica.
        let client = kv_client::Client::builder()
            .addrs(
                cluster
                    .ids()
                    .into_iter()
                    .map(|id| cluster.client_addr(id).to_string())
                    .collect(),
            )
            .follow_hints(false)
            .timeout(Duration::from_secs(30))
            .build()
            .expect("build an SDK client");
        client.put("warm", "up").await.expect("warm-up put");
        // The leader's messages now take longer than one attempt of the
        // client (1 s): the first attempt is proposed but its answer does
        // not come in time, so the SDK retries the same (client, seq).
        let admin = cluster.client_with_timeout(Duration::from_secs(5));
        admin
            .set_faults(
                cluster.client_addr(leader),
                FaultSpec {
                    delay_ms: Some((1_500, 1_500)),
                    ..FaultSpec::default()
                },
            )
            .await
            .expect("set faults");
        let started = Instant::now();
        // A compare-and-swap from "absent": applied twice, the second
        // application would answer `swapped: false`.
        let outcome = client
            .cas("once", None, "1")
            .await
            .expect("the CAS succeeds in the end");
        let took = started.elapsed();
        admin
            .set_faults(
                cluster.client_addr(leader),
                FaultSpec {
                    heal: true,
                    ..FaultSpec::default()
                },
            )
            .await
            .expect("heal");
        eprintln!("the CAS took {took:?} with its first answer lost: {outcome:?}");
        assert!(
            took >= Duration::from_secs(1),
            "the first attempt was answered in time ({took:?}): nothing was retried"
        );
        assert!(
            outcome.swapped,
            "the retry was applied a second time: {outcome:?}"
        );
        assert_eq!(outcome.current, Some(b"1".to_vec()));
        assert_eq!(client.get("once").await.expect("get"), Some(b"1".to_vec()));
        // The same client goes on with new sequence numbers.
        client.put("after", "x").await.expect("put after the retry");
    };
    bounded(Duration::from_secs(120), "the test", test).await;
}
