//! A write retried with the same session and sequence number is applied
//! once: the retry gets the first result and cannot overwrite a newer write.
//! (Sessions themselves, their ids, expiry and caps: `sessions.rs`.)

use std::time::Duration;

use kv_api::{Op, OpResult, WriteRequest};
use kv_tests::{bounded, Cluster};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retried_write_is_applied_once_and_never_overwrites_a_newer_write() {
    let cluster = Cluster::start(5).await;
    let test = async {
        let client_id = cluster.client().open_session().await.expect("open");
        let request = WriteRequest {
            client_id,
            seq: 1,
            acked_below: 0,
            op: Op::Put {
                key: b"k".to_vec(),
                value: b"a".to_vec(),
            },
        };
        let first = cluster
            .client()
            .write(request.clone())
            .await
            .expect("first write");
        assert_eq!(first.result, OpResult::Put);

        let other = cluster.client();
        other.put("k", "b").await.expect("the other client's put");
        assert_eq!(other.get("k").await.unwrap(), Some(b"b".to_vec()));

        // The retry, once through every replica: the deduplication lives in
        // the replicated state machine, not in one replica's connection.
        for id in cluster.ids() {
            let retry = cluster
                .client_for(id)
                .write(request.clone())
                .await
                .unwrap_or_else(|e| panic!("retry through replica {id}: {e}"));
            assert_eq!(
                retry, first,
                "retry through replica {id} must return the first outcome"
            );
            assert_eq!(
                other.get("k").await.unwrap(),
                Some(b"b".to_vec()),
                "the retry through replica {id} overwrote the newer write"
            );
        }
    };
    bounded(Duration::from_secs(60), "the test", test).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_below_the_acknowledged_sequence_is_refused_as_stale_not_applied() {
    let cluster = Cluster::start(5).await;
    let test = async {
        let client = cluster.client();
        let client_id = client.open_session().await.expect("open");
        let put = |seq: u64, acked_below: u64, value: &[u8]| WriteRequest {
            client_id,
            seq,
            acked_below,
            op: Op::Put {
                key: b"k".to_vec(),
                value: value.to_vec(),
            },
        };
        let first = client.write(put(1, 0, b"one")).await.expect("seq 1");
        assert_eq!(first.result, OpResult::Put);
        // seq 2 tells the replicas that the reply to seq 1 arrived.
        let second = client.write(put(2, 2, b"two")).await.expect("seq 2");
        assert_eq!(second.result, OpResult::Put);
        assert!(second.slot > first.slot, "{first:?} then {second:?}");

        // A late duplicate of seq 1 (say, a retry stuck in the network).
        let late = client.write(put(1, 0, b"one")).await.expect("late seq 1");
        assert!(
            late.result == OpResult::Stale || late == first,
            "a late retry of seq 1 must be answered as stale or with its first outcome, \
             got {late:?} (first {first:?})"
        );
        assert_eq!(
            client.get("k").await.unwrap(),
            Some(b"two".to_vec()),
            "a late retry of seq 1 overwrote seq 2"
        );
        // And a retry of seq 2 is still answered with its first outcome.
        let again = client.write(put(2, 2, b"two")).await.expect("retry seq 2");
        assert_eq!(again, second);
    };
    bounded(Duration::from_secs(60), "the test", test).await;
}
