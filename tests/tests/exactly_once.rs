//! A write retried with the same client id and sequence number is applied
//! once: the retry gets the first result and cannot overwrite a newer write.

use std::time::Duration;

use kv_api::{Op, OpResult, WriteRequest};
use kv_tests::{bounded, Cluster};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retried_write_is_applied_once_and_never_overwrites_a_newer_write() {
    let cluster = Cluster::start(5).await;
    let test = async {
        let client_id: u64 = rand::random::<u64>() | 1;
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
