//! Client sessions against real processes: opened through the log with ids
//! the cluster assigns, refused when unknown, expired by the log's clock at
//! the same log position on every replica, capped in number, and kept in
//! snapshots.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use kv_api::{Op, OpResult, ReplicaId, Slot, WriteRequest};
use kv_client::Error;
use kv_tests::{bounded, wait_until, Cluster};

fn put(session: u64, seq: u64, key: &str, value: &str) -> WriteRequest {
    WriteRequest {
        client_id: session,
        seq,
        acked_below: 0,
        op: Op::Put {
            key: key.into(),
            value: value.into(),
        },
    }
}

/// Waits until every replica answers with the same applied index and
/// returns each one's session count there.
async fn sessions_when_settled(cluster: &Cluster) -> BTreeMap<ReplicaId, u64> {
    let applied = cluster.wait_applied_equal(1, Duration::from_secs(20)).await;
    let statuses = cluster.statuses().await;
    statuses
        .into_iter()
        .filter_map(|(id, s)| s.filter(|s| s.applied == applied).map(|s| (id, s.sessions)))
        .collect()
}

/// Before sessions, a process that restarted with its old client id
/// (`ClientBuilder::client_id`, which no longer exists) started again at
/// seq 1 and was answered from the old session's results: its put
/// "succeeded" and nothing was written. Now the cluster picks the ids.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_process_gets_a_new_session_and_its_writes_are_applied() {
    let cluster = Cluster::start(3).await;
    let test = async {
        let first = cluster.client();
        first.put("a", "1").await.expect("first put");
        let old = first.session_id().expect("a session was opened");
        drop(first);
        // The process restarts: a new client, sequence numbers from 1.
        let restarted = cluster.client();
        restarted.put("b", "2").await.expect("put after restart");
        assert_ne!(restarted.session_id(), Some(old));
        assert_eq!(
            restarted.get("b").await.unwrap(),
            Some(b"2".to_vec()),
            "the put after the restart was acknowledged but not applied"
        );

        // Two clients at once, each writing its seq 1 and 2: none is
        // answered with the other's result.
        let (x, y) = (cluster.client(), cluster.client());
        let (rx, ry) = tokio::join!(
            async {
                x.put("x", "1").await?;
                x.cas("x", Some(b"1".to_vec()), "2").await
            },
            async {
                y.put("y", "1").await?;
                y.cas("y", Some(b"1".to_vec()), "2").await
            }
        );
        assert!(rx.expect("x").swapped && ry.expect("y").swapped);
        assert_ne!(x.session_id(), y.session_id());
        assert_eq!(x.get("x").await.unwrap(), Some(b"2".to_vec()));
        assert_eq!(x.get("y").await.unwrap(), Some(b"2".to_vec()));

        // Each CLI invocation is such a process too.
        cluster.cli_ok(&["put", "c", "1"]).await;
        cluster.cli_ok(&["put", "c", "2"]).await;
        assert_eq!(cluster.cli_ok(&["get", "c"]).await.trim(), "2");
    };
    bounded(Duration::from_secs(60), "the test", test).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_in_a_session_never_opened_is_refused_and_not_applied_through_any_replica() {
    let cluster = Cluster::start(3).await;
    let test = async {
        let real = cluster.client().open_session().await.expect("open");
        for id in cluster.ids() {
            // Made-up ids, as a client that picked its own would send:
            // through each replica (followers forward to the leader).
            let via = cluster
                .builder()
                .addrs(vec![cluster.client_addr(id).to_string()])
                .follow_hints(false)
                .build()
                .unwrap();
            for made_up in [77, real + 1] {
                let e = via
                    .write(put(made_up, 1, "k", "made up"))
                    .await
                    .unwrap_err();
                assert_eq!(e, Error::UnknownSession(made_up), "via replica {id}");
            }
        }
        let c = cluster.client();
        assert_eq!(c.get("k").await.unwrap(), None, "nothing was applied");
        let ok = c.write(put(real, 1, "k", "real")).await.expect("real");
        assert_eq!(ok.result, OpResult::Put);
        assert_eq!(c.get("k").await.unwrap(), Some(b"real".to_vec()));
    };
    bounded(Duration::from_secs(60), "the test", test).await;
}

/// Every replica drops the expired sessions at the same log position: the
/// session count is a function of the applied index, whichever replica is
/// asked. A replica that expired sessions by its own clock would report
/// fewer sessions at an index where another still reports them all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_expire_at_the_same_log_position_on_every_replica() {
    const N: u64 = 8;
    let cluster = Cluster::start_with_args(3, &["--session-ttl", "1.5"]).await;
    let test = async {
        let clients: Vec<_> = (0..N).map(|_| cluster.client()).collect();
        for (i, c) in clients.iter().enumerate() {
            c.put(format!("k{i}"), "v").await.expect("put");
        }
        wait_until(
            Duration::from_secs(10),
            "every replica holds the sessions",
            || async {
                cluster
                    .statuses()
                    .await
                    .values()
                    .all(|s| s.as_ref().is_some_and(|s| s.sessions == N))
            },
        )
        .await;
        // Watch them expire (1.5 s idle, by the log's clock), asking every
        // replica as often as it answers.
        let mut samples: Vec<(ReplicaId, Slot, u64)> = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let statuses = cluster.statuses().await;
            for (id, s) in &statuses {
                if let Some(s) = s {
                    samples.push((*id, s.applied, s.sessions));
                }
            }
            if statuses
                .values()
                .all(|s| s.as_ref().is_some_and(|s| s.sessions == 0))
            {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the sessions did not all expire within 20 s: {:?}",
                &samples[samples.len().saturating_sub(6)..]
            );
        }
        for id in cluster.ids() {
            let seen: Vec<u64> = samples.iter().filter(|s| s.0 == id).map(|s| s.2).collect();
            assert!(
                seen.first() == Some(&N) && seen.last() == Some(&0),
                "replica {id} was not watched from all sessions to none: {seen:?}"
            );
        }
        // The count never rises along the log, and two replicas at the
        // same index agree.
        let mut by_index = samples.clone();
        by_index.sort_by_key(|&(id, applied, sessions)| (applied, std::cmp::Reverse(sessions), id));
        for pair in by_index.windows(2) {
            let ((r1, a1, s1), (r2, a2, s2)) = (pair[0], pair[1]);
            assert!(
                s1 >= s2 && (a1 < a2 || s1 == s2),
                "replica {r1} had {s1} sessions at index {a1}, replica {r2} {s2} at {a2}: \
                 expiry is not decided at one log position"
            );
        }
        // A later write of an expired session's client opens a new one.
        let old = clients[0].session_id().unwrap();
        clients[0]
            .put("k0", "again")
            .await
            .expect("put after expiry");
        assert_ne!(clients[0].session_id(), Some(old));
        assert_eq!(clients[0].get("k0").await.unwrap(), Some(b"again".to_vec()));
    };
    bounded(Duration::from_secs(90), "the test", test).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_loop_of_opens_never_holds_more_than_the_cap_and_spares_a_busy_session() {
    const CAP: u64 = 20;
    let cap = CAP.to_string();
    let cluster = Cluster::start_with_args(3, &["--max-sessions", &cap]).await;
    let test = async {
        let busy = cluster.client();
        busy.put("busy", "0").await.expect("busy put");
        let busy_session = busy.session_id().unwrap();
        let opener = cluster.client();
        let first = opener.open_session().await.expect("open");
        for round in 1..=20u32 {
            // Ten opens at a time, then the busy client writes again.
            let mut opens = tokio::task::JoinSet::new();
            for _ in 0..10 {
                let opener = opener.clone();
                opens.spawn(async move { opener.open_session().await });
            }
            for r in opens.join_all().await {
                r.expect("open");
            }
            busy.put("busy", round.to_string()).await.expect("busy put");
            assert_eq!(
                busy.session_id(),
                Some(busy_session),
                "the busy client's session was evicted (round {round})"
            );
        }
        let counts = sessions_when_settled(&cluster).await;
        assert_eq!(counts.len(), cluster.ids().len(), "{counts:?}");
        assert!(counts.values().all(|&n| n == CAP), "{counts:?}");
        // The first session opened, never used, was evicted long ago.
        let e = opener.write(put(first, 1, "k", "v")).await.unwrap_err();
        assert_eq!(e, Error::UnknownSession(first));
        assert_eq!(busy.get("k").await.unwrap(), None);
    };
    bounded(Duration::from_secs(90), "the test", test).await;
}

/// Sessions and their results are part of the replicated state: kept in
/// snapshots and rebuilt from them and the log when the whole cluster
/// restarts, so a retry after the restart is still answered once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_survive_a_whole_cluster_restart_through_snapshots() {
    let mut cluster = Cluster::start_with_args(3, &["--snapshot-every", "3"]).await;
    let c = cluster.client();
    let session = bounded(Duration::from_secs(30), "the writes", async {
        let session = c.open_session().await.expect("open");
        for seq in 1..=10 {
            c.write(put(session, seq, "k", &seq.to_string()))
                .await
                .expect("write");
        }
        session
    })
    .await;
    let before = sessions_when_settled(&cluster).await;
    let statuses = cluster.statuses().await;
    assert!(
        statuses.values().flatten().all(|s| s.snapshot > 0),
        "snapshots were taken: {statuses:?}"
    );
    let ids = cluster.ids();
    cluster.kill_all(&ids);
    for &id in &ids {
        cluster.spawn(id);
    }
    cluster.wait_ready(Duration::from_secs(30)).await;
    let test = async {
        let c = cluster.client();
        // A late retry of seq 5 is answered with its first result, not
        // applied over seq 10's value.
        let retry = c.write(put(session, 5, "k", "5")).await.expect("retry");
        assert_eq!(retry.result, OpResult::Put);
        assert_eq!(c.get("k").await.unwrap(), Some(b"10".to_vec()));
        c.write(put(session, 11, "k", "11")).await.expect("seq 11");
        assert_eq!(c.get("k").await.unwrap(), Some(b"11".to_vec()));
        let after = sessions_when_settled(&cluster).await;
        assert_eq!(before.values().max(), after.values().max());
        assert!(after.values().all(|&n| n == after[&1]), "{after:?}");
    };
    bounded(Duration::from_secs(60), "the test", test).await;
}
