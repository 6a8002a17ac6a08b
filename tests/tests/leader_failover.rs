//! When the leader dies or stops answering, another replica takes over and
//! writes resume within a bounded time.

use std::time::{Duration, Instant};

use kv_tests::{bounded, Cluster};

/// Generous bound on the time from losing the leader to the first
/// acknowledged write (election timeout plus phase 1 plus client retry, on a
/// loaded two-core machine).
const FAILOVER_BOUND: Duration = Duration::from_secs(10);

/// Puts `key=value` through `client` until it is acknowledged; returns how
/// long that took from `since`. Panics after 30 s.
async fn first_acknowledged_put(
    client: &kv_client::Client,
    key: &str,
    value: &str,
    since: Instant,
) -> Duration {
    let mut last_error = None;
    while since.elapsed() < Duration::from_secs(30) {
        match client.put(key, value).await {
            Ok(()) => return since.elapsed(),
            Err(e) => {
                last_error = Some(e);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
    panic!(
        "no write was acknowledged within 30 s of losing the leader; last error: {last_error:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_leader_takes_over_after_leader_is_killed() {
    let mut cluster = Cluster::start(5).await;
    let test = async {
        let client = cluster.client_with_timeout(Duration::from_secs(2));
        client
            .put("before", "1")
            .await
            .expect("put before the failover");

        // Twice: five replicas down to four, then down to three (a bare majority).
        let mut killed = Vec::new();
        for round in 1..=2 {
            let old = cluster.wait_for_leader(Duration::from_secs(20)).await;
            let killed_at = Instant::now();
            cluster.kill(old);
            killed.push(old);
            let key = format!("after-failover-{round}");
            let took = first_acknowledged_put(&client, &key, "v", killed_at).await;
            eprintln!(
                "failover {round}: leader {old} killed; first write acknowledged after {took:?}"
            );
            let new = cluster.wait_for_leader(Duration::from_secs(20)).await;
            assert!(
                !killed.contains(&new),
                "replica {new} was killed but is reported leader"
            );
            assert!(
                took < FAILOVER_BOUND,
                "failover {round} took {took:?}, over the bound of {FAILOVER_BOUND:?}"
            );
            assert_eq!(
                client.get(key.as_str()).await.expect("get after failover"),
                Some(b"v".to_vec())
            );
        }
        assert_eq!(
            client.get("before").await.expect("get"),
            Some(b"1".to_vec())
        );
    };
    bounded(Duration::from_secs(120), "the test", test).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paused_leader_is_replaced_and_catches_up_after_resume() {
    let mut cluster = Cluster::start(5).await;
    let test = async {
        let client = cluster.client_with_timeout(Duration::from_secs(2));
        client
            .put("before", "1")
            .await
            .expect("put before the pause");
        let old = cluster.wait_for_leader(Duration::from_secs(20)).await;

        // SIGSTOP: the old leader keeps its sockets open but answers nothing.
        let paused_at = Instant::now();
        cluster.pause(old);
        let took = first_acknowledged_put(&client, "while-paused", "p", paused_at).await;
        eprintln!("leader {old} paused; first write acknowledged after {took:?}");
        assert!(
            took < FAILOVER_BOUND,
            "took {took:?} after pausing the leader"
        );
        for i in 0..20 {
            client
                .put(format!("while-paused-{i}"), format!("{i}"))
                .await
                .expect("put while the old leader is paused");
        }

        // SIGCONT: the old leader must learn of the new ballot and catch up.
        cluster.resume(old);
        let applied = cluster.max_applied().await;
        cluster
            .wait_all_applied(applied, Duration::from_secs(20))
            .await;
        let local = cluster.client_for(old);
        assert_eq!(
            local
                .get_local("while-paused-19")
                .await
                .expect("local get on the resumed replica"),
            Some(b"19".to_vec())
        );
        // Exactly one replica leads, and every replica follows it: the
        // resumed one has stepped down (it may take a heartbeat).
        kv_tests::wait_until(
            Duration::from_secs(10),
            "exactly one leader, followed by all",
            || async {
                let statuses: Vec<_> = cluster.statuses().await.into_values().flatten().collect();
                let leaders: Vec<_> = statuses.iter().filter(|s| s.leader).map(|s| s.id).collect();
                eprintln!("replicas claiming leadership after resume: {leaders:?}");
                statuses.len() == cluster.ids().len()
                    && leaders.len() == 1
                    && statuses.iter().all(|s| s.leader_id == Some(leaders[0]))
            },
        )
        .await;
        client
            .put("after-resume", "r")
            .await
            .expect("put after resume");
        assert_eq!(
            client.get("after-resume").await.expect("get"),
            Some(b"r".to_vec())
        );
    };
    bounded(Duration::from_secs(120), "the test", test).await;
}
