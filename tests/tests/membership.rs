//! Membership changes against real processes: growing and shrinking while
//! clients write, replacing a replica whose disk is gone, removing the
//! leader, a second change refused while one is in progress, and a removed
//! replica that restarts without voting.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kv_client::{Client, Error, Membership};
use kv_tests::{bounded, wait_for, wait_until, Cluster};

/// A client for the replicas `ids` of `cluster`.
fn client_of(cluster: &Cluster, ids: &[u64], timeout: Duration) -> Client {
    cluster
        .builder()
        .addrs(
            ids.iter()
                .map(|&id| cluster.client_addr(id).to_string())
                .collect(),
        )
        .timeout(timeout)
        .build()
        .expect("build a client")
}

/// Adds replica `id` through `admin`, starts it with `--join` and
/// promotes it once it has caught up (promotion is refused until then).
async fn grow(cluster: &mut Cluster, admin: &Client, id: u64, via: u64) -> Membership {
    let (client_addr, peer_addr) = cluster.add_node(id, via);
    let m = admin
        .add_member(id, client_addr, peer_addr)
        .await
        .unwrap_or_else(|e| panic!("add replica {id}: {e}"));
    assert!(
        m.get(id).is_some_and(|m| !m.voter),
        "a learner first: {m:?}"
    );
    cluster.spawn(id);
    cluster.wait_answers(id, Duration::from_secs(30)).await;
    wait_for(Duration::from_secs(60), "the learner promoted", || async {
        match admin.promote_member(id).await {
            Ok(m) => Some(m),
            Err(Error::Conflict(_)) => None,
            Err(e) => panic!("promote replica {id}: {e}"),
        }
    })
    .await
}

/// Eight writers, each putting its own keys one after another until
/// stopped; every acknowledged key is recorded, and so is the longest a
/// write took (failures count until the next success).
struct Writers {
    stop: Arc<AtomicBool>,
    acked: Arc<Mutex<BTreeSet<String>>>,
    failures: Arc<Mutex<Vec<String>>>,
    tasks: Vec<tokio::task::JoinHandle<Duration>>,
}

impl Writers {
    fn start(client: Client) -> Writers {
        let stop = Arc::new(AtomicBool::new(false));
        let acked = Arc::new(Mutex::new(BTreeSet::new()));
        let failures = Arc::new(Mutex::new(Vec::new()));
        let tasks = (0..8)
            .map(|w| {
                let (client, stop, acked, failures) = (
                    client.clone(),
                    stop.clone(),
                    acked.clone(),
                    failures.clone(),
                );
                tokio::spawn(async move {
                    let mut longest = Duration::ZERO;
                    let mut n = 0;
                    while !stop.load(Ordering::Relaxed) {
                        let key = format!("w{w}-{n}");
                        let started = Instant::now();
                        match client.put(key.clone(), format!("v{n}")).await {
                            Ok(()) => {
                                acked.lock().unwrap().insert(key);
                                n += 1;
                            }
                            Err(e) => failures.lock().unwrap().push(format!("{key}: {e}")),
                        }
                        longest = longest.max(started.elapsed());
                    }
                    longest
                })
            })
            .collect();
        Writers {
            stop,
            acked,
            failures,
            tasks,
        }
    }

    /// Stops them; the acknowledged keys and the longest write.
    async fn stop(self) -> (BTreeSet<String>, Vec<String>, Duration) {
        self.stop.store(true, Ordering::Relaxed);
        let mut longest = Duration::ZERO;
        for t in self.tasks {
            longest = longest.max(t.await.expect("a writer panicked"));
        }
        let acked = self.acked.lock().unwrap().clone();
        let failures = self.failures.lock().unwrap().clone();
        (acked, failures, longest)
    }
}

/// Every acknowledged key reads back, linearizably.
async fn all_present(client: &Client, acked: &BTreeSet<String>) {
    for key in acked {
        let v = client
            .get(key.clone())
            .await
            .unwrap_or_else(|e| panic!("get {key}: {e}"));
        assert!(v.is_some(), "the acknowledged write of {key} is lost");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grows_three_to_five_and_shrinks_back_while_clients_write() {
    let mut cluster = Cluster::start(3).await;
    let admin = client_of(&cluster, &[1, 2, 3], Duration::from_secs(10));
    bounded(Duration::from_secs(240), "the test", async {
        let writers = Writers::start(client_of(&cluster, &[1, 2, 3], Duration::from_secs(10)));
        wait_until(Duration::from_secs(30), "some writes", || async {
            writers.acked.lock().unwrap().len() > 50
        })
        .await;
        grow(&mut cluster, &admin, 4, 1).await;
        let m = grow(&mut cluster, &admin, 5, 2).await;
        assert_eq!(m.voters(), vec![1, 2, 3, 4, 5]);
        let before = writers.acked.lock().unwrap().len();
        wait_until(
            Duration::from_secs(30),
            "writes with five voters",
            || async { writers.acked.lock().unwrap().len() > before + 50 },
        )
        .await;
        // Shrink to 4, 5 and whichever of 1-3 leads or not: remove two of
        // the first three.
        admin.remove_member(1).await.expect("remove replica 1");
        let m = admin.remove_member(2).await.expect("remove replica 2");
        assert_eq!(m.voters(), vec![3, 4, 5]);
        assert_eq!(m.epoch, 6, "six changes, one epoch each");
        let before = writers.acked.lock().unwrap().len();
        wait_until(
            Duration::from_secs(30),
            "writes with three voters",
            || async { writers.acked.lock().unwrap().len() > before + 50 },
        )
        .await;
        let (acked, failures, longest) = writers.stop().await;
        assert!(failures.is_empty(), "writes failed: {failures:?}");
        // An election takes well under a second here; a write waits for
        // one at most, plus its retries.
        assert!(longest < Duration::from_secs(5), "a write took {longest:?}");
        let reader = client_of(&cluster, &[3, 4, 5], Duration::from_secs(10));
        all_present(&reader, &acked).await;
        // The removed replicas know it, and every member reports the same
        // configuration.
        for id in [1, 2] {
            let s = cluster.status(id).await.expect("a removed replica answers");
            assert!(s.removed, "replica {id} says it was removed: {s:?}");
        }
        for id in [3, 4, 5] {
            let s = cluster.status(id).await.expect("a member answers");
            assert_eq!(s.membership, m, "replica {id}'s configuration");
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replaces_a_dead_replica_and_removes_the_leader() {
    let mut cluster = Cluster::start(3).await;
    bounded(Duration::from_secs(240), "the test", async {
        let leader = cluster.wait_for_leader(Duration::from_secs(30)).await;
        let dead = (1..=3).find(|&id| id != leader).unwrap();
        let admin = client_of(&cluster, &[1, 2, 3], Duration::from_secs(10));
        admin.put("before", "1").await.expect("a write");
        // A machine dies for good: its process and its disk.
        cluster.kill(dead);
        std::fs::remove_dir_all(cluster.data_dir(dead)).expect("remove its data");
        admin
            .put("while-down", "1")
            .await
            .expect("writes go on without it");
        grow(&mut cluster, &admin, 4, leader).await;
        let m = admin
            .remove_member(dead)
            .await
            .expect("remove the dead one");
        let mut voters = m.voters();
        voters.sort_unstable();
        let mut want: Vec<u64> = [1, 2, 3, 4].into_iter().filter(|&v| v != dead).collect();
        want.sort_unstable();
        assert_eq!(voters, want);
        admin
            .put("after-replace", "1")
            .await
            .expect("a write after replacing");
        // The new replica holds everything, by a local read.
        let four = client_of(&cluster, &[4], Duration::from_secs(10));
        wait_until(Duration::from_secs(30), "replica 4 caught up", || async {
            four.get_local("after-replace")
                .await
                .ok()
                .flatten()
                .is_some()
        })
        .await;
        assert_eq!(four.get_local("before").await.unwrap(), Some(b"1".to_vec()));

        // Remove the leader: it steps down once the change is chosen; the
        // others elect another and go on.
        let leader = cluster.wait_for_leader(Duration::from_secs(30)).await;
        let rest: Vec<u64> = want.iter().copied().filter(|&v| v != leader).collect();
        let admin = client_of(&cluster, &rest, Duration::from_secs(10));
        let m = admin
            .remove_member(leader)
            .await
            .expect("remove the leader");
        assert!(!m.contains(leader));
        admin.put("after-leader", "1").await.expect("a write after");
        let new = cluster.wait_for_leader(Duration::from_secs(30)).await;
        assert_ne!(new, leader, "the removed leader leads no more");
        let s = cluster.status(leader).await.expect("it answers");
        assert!(s.removed && !s.leader, "{s:?}");

        // It restarts from its disk and its old replica file: it does not
        // vote, and says it was removed.
        cluster.restart(leader).await;
        let s = cluster.status(leader).await.expect("it answers");
        assert!(s.removed && !s.leader, "{s:?}");
        assert!(
            cluster
                .log_text(leader)
                .contains("was removed from the cluster"),
            "its log says so:\n{}",
            cluster.log_tail(leader, 20)
        );
        admin.put("after-restart", "1").await.expect("a write");
        let members = admin.members().await.expect("members");
        assert_eq!(members.voters().len(), 2);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_change_is_refused_while_the_first_is_in_progress() {
    let cluster = Cluster::start(3).await;
    bounded(Duration::from_secs(120), "the test", async {
        let leader = cluster.wait_for_leader(Duration::from_secs(30)).await;
        // Both clients open their sessions first: then the two changes
        // leave together, not each behind an open of its own.
        let a = client_of(&cluster, &[leader], Duration::from_secs(10));
        let b = client_of(&cluster, &[leader], Duration::from_secs(10));
        a.put("a", "1").await.expect("a write");
        b.put("b", "1").await.expect("a write");
        // The followers answer 200 ms late: a change takes that long to be
        // chosen, and two sent at once overlap.
        for f in (1..=3).filter(|&id| id != leader) {
            cluster
                .set_faults(
                    f,
                    kv_api::FaultSpec {
                        delay_ms: Some((200, 200)),
                        ..Default::default()
                    },
                )
                .await;
        }
        let (x, y) = tokio::join!(
            a.add_member(7, "127.0.0.1:1", "127.0.0.1:2"),
            b.add_member(8, "127.0.0.1:3", "127.0.0.1:4")
        );
        let (done, refused) = match (x, y) {
            (Ok(m), Err(Error::Conflict(why))) | (Err(Error::Conflict(why)), Ok(m)) => (m, why),
            other => panic!("one change must go through and the other be refused: {other:?}"),
        };
        assert!(refused.contains("in progress"), "{refused}");
        assert_eq!(done.learners().len(), 1, "{done:?}");
        let learner = done.learners()[0];
        // Promoting a learner that never started is refused the same way;
        // the CLI exits with status 5.
        let out = cluster
            .cli_at(
                leader,
                &["--timeout", "5", "member", "promote", &learner.to_string()],
            )
            .await;
        assert_eq!(out.status.code(), Some(5), "{}", kv_tests::describe(&out));
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("has not caught up"),
            "{}",
            kv_tests::describe(&out)
        );
        let out = cluster
            .cli_at(leader, &["--output", "json", "member", "list"])
            .await;
        assert!(out.status.success(), "{}", kv_tests::describe(&out));
        let lines = kv_tests::parse_status_lines(&out.stdout);
        assert_eq!(lines.len(), 4, "{}", kv_tests::describe(&out));
        let l = lines
            .iter()
            .find(|l| l["id"] == learner)
            .expect("the learner listed");
        assert_eq!(l["role"], "learner");
        assert_eq!(l["epoch"], 1);
        let out = cluster.cli_at(leader, &["member", "list"]).await;
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            text.lines()
                .any(|l| l.starts_with(&format!("{learner} learner 127.0.0.1:"))),
            "{text}"
        );
    })
    .await;
}

/// An application started with the first replica file goes on working
/// after every replica it was given has been replaced and is gone: it
/// learns the configuration from the replicas as they change. The CLI's
/// `status` with the old file shows a new member too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_given_the_first_replicas_follows_them_being_replaced() {
    let mut cluster = Cluster::start(3).await;
    bounded(Duration::from_secs(240), "the test", async {
        cluster.wait_for_leader(Duration::from_secs(30)).await;
        let app = cluster
            .builder()
            .addrs(
                (1..=3)
                    .map(|id| cluster.client_addr(id).to_string())
                    .collect(),
            )
            .timeout(Duration::from_secs(10))
            .refresh_members(Some(Duration::from_millis(100)))
            .build()
            .expect("build a client");
        app.put("k0", "0").await.expect("a first write");
        let mut members = vec![1, 2, 3];
        for old in 1..=3u64 {
            let new = old + 3;
            let admin = client_of(&cluster, &members, Duration::from_secs(10));
            let via = *members.iter().find(|&&m| m != old).unwrap();
            grow(&mut cluster, &admin, new, via).await;
            members.push(new);
            admin
                .remove_member(old)
                .await
                .unwrap_or_else(|e| panic!("remove replica {old}: {e}"));
            members.retain(|&m| m != old);
            cluster.kill(old);
            // The application's writes go on, and it comes to know the new
            // replica's address (from the replicas, in the background).
            let addr = cluster.client_addr(new).to_string();
            let mut n = 0;
            wait_until(
                Duration::from_secs(30),
                "the client knows the new replica",
                || {
                    n += 1;
                    let key = format!("k{new}-{n}");
                    let app = &app;
                    let addr = addr.clone();
                    async move {
                        app.put(key, "1").await.expect("a write while replacing");
                        app.addrs().contains(&addr)
                    }
                },
            )
            .await;
            if old == 1 {
                // `kv-client status` with the first replica file (1, 2,
                // 3) shows the new member too, up.
                let out = cluster.cli(&["--output", "json", "status"]).await;
                let text = String::from_utf8_lossy(&out.stdout);
                assert!(
                    text.lines()
                        .any(|l| l.contains(&format!("\"addr\":\"{addr}\""))
                            && l.contains("\"up\":true")),
                    "status shows replica {new} up:\n{text}"
                );
            }
        }
        // Every replica it was given is gone; it still reads and writes.
        app.put("after", "1").await.expect("a write after");
        assert_eq!(app.get("k0").await.expect("a read"), Some(b"0".to_vec()));
    })
    .await;
}
