//! The SDK against real replicas: it skips dead replicas, survives a
//! restart of the replica it was using, and a write whose reply is lost is
//! retried under the same sequence number and applied exactly once.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kv_tests::{bounded, Cluster};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;

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

/// A TCP relay in front of one replica's client port that can lose every
/// reply: requests go on to the replica, so a write is proposed, chosen and
/// applied as usual, but once `lose` is set its answer goes nowhere — what a
/// client sees when the network drops a reply. Its tasks end when it is
/// dropped.
struct ReplyEater {
    addr: String,
    lose: Arc<AtomicBool>,
    /// Bytes of replies lost so far.
    lost: Arc<AtomicU64>,
    _tasks: JoinSet<()>,
}

impl ReplyEater {
    async fn start(upstream: String) -> ReplyEater {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("local addr").to_string();
        let lose = Arc::new(AtomicBool::new(false));
        let lost = Arc::new(AtomicU64::new(0));
        let mut tasks = JoinSet::new();
        let (lose2, lost2) = (lose.clone(), lost.clone());
        tasks.spawn(async move {
            // The connections' tasks live in this set, dropped (aborted)
            // with the accepting task.
            let mut conns = JoinSet::new();
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = TcpStream::connect(&upstream).await else {
                    continue;
                };
                let (mut client_rx, mut client_tx) = client.into_split();
                let (mut server_rx, mut server_tx) = server.into_split();
                conns.spawn(async move {
                    let _ = tokio::io::copy(&mut client_rx, &mut server_tx).await;
                });
                let (lose, lost) = (lose2.clone(), lost2.clone());
                conns.spawn(async move {
                    let mut buf = vec![0u8; 64 * 1024];
                    loop {
                        let n = match server_rx.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => n,
                        };
                        if lose.load(Ordering::SeqCst) {
                            lost.fetch_add(n as u64, Ordering::SeqCst);
                        } else if client_tx.write_all(&buf[..n]).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        ReplyEater {
            addr,
            lose,
            lost,
            _tasks: tasks,
        }
    }
}

/// The total of every replica's `duplicate_writes`.
async fn duplicates(cluster: &Cluster) -> u64 {
    let statuses = cluster.statuses().await;
    statuses
        .iter()
        .map(|(id, s)| {
            s.as_ref()
                .unwrap_or_else(|| panic!("replica {id} did not answer status"))
                .duplicate_writes
        })
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn write_whose_reply_is_lost_is_retried_and_applied_once() {
    let cluster = Cluster::start(5).await;
    let test = async {
        let leader = cluster.wait_for_leader(Duration::from_secs(20)).await;
        // The SDK knows the relay first, then every replica: it opens its
        // session and sends its first write through the relay, to the
        // leader itself, and after a lost reply retries at a replica.
        let eater = ReplyEater::start(cluster.client_addr(leader).to_string()).await;
        let mut addrs = vec![eater.addr.clone()];
        addrs.extend(
            cluster
                .ids()
                .into_iter()
                .map(|id| cluster.client_addr(id).to_string()),
        );
        let client = kv_client::Client::builder()
            .addrs(addrs)
            .timeout(Duration::from_secs(30))
            .build()
            .expect("build an SDK client");
        client.put("warm", "up").await.expect("warm-up put");
        let before = duplicates(&cluster).await;

        // From now on the leader's answers through the relay are lost: the
        // first attempt is applied, its reply never comes, and after one
        // attempt's time (1 s) the SDK retries the same (client, seq) at
        // the next replica, which forwards it to the leader.
        eater.lose.store(true, Ordering::SeqCst);
        let started = Instant::now();
        // A compare-and-swap from "absent": applied twice, the second
        // application would answer `swapped: false`.
        let outcome = client
            .cas("once", None, "1")
            .await
            .expect("the CAS succeeds in the end");
        let took = started.elapsed();
        let lost = eater.lost.load(Ordering::SeqCst);
        let answered_again = duplicates(&cluster).await - before;
        eprintln!(
            "the CAS took {took:?}; {lost} bytes of replies lost; {answered_again} retried \
             write(s) answered with their first result: {outcome:?}"
        );
        assert!(
            lost > 0,
            "no reply was lost: the first attempt was never answered by the leader"
        );
        assert!(
            took >= Duration::from_secs(1),
            "the first attempt was answered in time ({took:?}): nothing was retried"
        );
        assert!(
            outcome.swapped,
            "the retry was applied a second time: {outcome:?}"
        );
        assert_eq!(outcome.current, Some(b"1".to_vec()));
        assert!(
            answered_again >= 1,
            "no replica answered the retry with the first attempt's result (duplicate_writes \
             did not move): the first attempt was not applied, or the retry was applied afresh"
        );
        assert_eq!(client.get("once").await.expect("get"), Some(b"1".to_vec()));
        // The same client goes on with new sequence numbers.
        client.put("after", "x").await.expect("put after the retry");
    };
    bounded(Duration::from_secs(120), "the test", test).await;
}
