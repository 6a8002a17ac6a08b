//! Concurrent clients under crashes, pauses and partitions produce a
//! linearizable history: recorded operation by operation and checked with
//! `kv-check`, not eyeballed.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kv_api::{FaultSpec, ReplicaId};
use kv_check::{check, Budget, Op, Outcome, Recorder, Ret};
use kv_tests::{bounded, Cluster};
use rand::Rng;

const CLIENTS: u64 = 5;
const KEYS: usize = 4;
/// How long the clients run while the nemesis injects faults.
const RUN_FOR: Duration = Duration::from_secs(8);

/// One client: random operations on a few keys until `stop`, each recorded
/// just before it is sent and just after its answer arrives.
async fn client_loop(client: kv_client::Client, id: u64, rec: Recorder, stop: Arc<AtomicBool>) {
    let mut last_seen: Vec<Option<Vec<u8>>> = vec![None; KEYS];
    let mut i = 0u64;
    while !stop.load(Ordering::SeqCst) {
        i += 1;
        let (choice, k) = {
            let mut rng = rand::rng();
            (rng.random_range(0..100u32), rng.random_range(0..KEYS))
        };
        let key = format!("key-{k}");
        let value = format!("c{id}-{i}");
        match choice {
            0..=34 => {
                let t = rec.invoke(id, Op::put(&key, &value));
                let r = client.put(key.as_str(), value.as_str()).await;
                rec.complete(t, outcome(r.map(|()| Ret::Put)));
            }
            35..=69 => {
                let t = rec.invoke(id, Op::get(&key));
                let r = client.get(key.as_str()).await;
                if let Ok(v) = &r {
                    last_seen[k] = v.clone();
                }
                rec.complete(t, outcome(r.map(Ret::Get)));
            }
            70..=79 => {
                let t = rec.invoke(id, Op::delete(&key));
                let r = client.delete(key.as_str()).await;
                rec.complete(t, outcome(r.map(Ret::Delete)));
            }
            _ => {
                let expected = last_seen[k].clone();
                let t = rec.invoke(id, Op::cas(&key, expected.as_ref(), &value));
                let r = client.cas(key.as_str(), expected, value.as_str()).await;
                if let Ok(o) = &r {
                    last_seen[k] = o.current.clone();
                }
                rec.complete(
                    t,
                    outcome(r.map(|o| Ret::Cas {
                        swapped: o.swapped,
                        current: o.current,
                    })),
                );
            }
        }
    }
}

/// An SDK result as the checker sees it: an invalid argument was certainly
/// not applied; any other error leaves the outcome unknown.
fn outcome(r: Result<Ret, kv_client::Error>) -> Outcome {
    match r {
        Ok(ret) => Outcome::Ok(ret),
        Err(e) if !e.outcome_unknown() => Outcome::Failed,
        Err(_) => Outcome::Unknown,
    }
}

async fn set_faults(cluster: &Cluster, id: ReplicaId, spec: FaultSpec) {
    // Best effort: the nemesis must not fail the test by itself.
    let _ = cluster
        .client_for(id)
        .set_faults(cluster.client_addr(id), spec)
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_under_crashes_pauses_and_partitions_is_linearizable() {
    let mut cluster = Cluster::start(5).await;
    let test = async {
        let rec = Recorder::new();
        let stop = Arc::new(AtomicBool::new(false));
        let mut clients = tokio::task::JoinSet::new();
        for id in 1..=CLIENTS {
            let client = cluster.client_with_timeout(Duration::from_secs(1));
            clients.spawn(client_loop(client, id, rec.clone(), stop.clone()));
        }

        // The nemesis: in turn kill the leader, pause the leader, isolate a
        // replica — one fault at a time, so a majority is always there.
        let started = Instant::now();
        let mut round = 0;
        while started.elapsed() < RUN_FOR {
            round += 1;
            let Some(leader) = cluster.leader().await else {
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            };
            match round % 3 {
                1 => {
                    eprintln!("nemesis: kill leader {leader}");
                    cluster.kill(leader);
                    tokio::time::sleep(Duration::from_millis(800)).await;
                    cluster.restart(leader).await;
                }
                2 => {
                    eprintln!("nemesis: pause leader {leader}");
                    cluster.pause(leader);
                    tokio::time::sleep(Duration::from_millis(800)).await;
                    cluster.resume(leader);
                }
                _ => {
                    let others: Vec<ReplicaId> =
                        cluster.ids().into_iter().filter(|&i| i != leader).collect();
                    eprintln!("nemesis: isolate leader {leader}");
                    set_faults(
                        &cluster,
                        leader,
                        FaultSpec {
                            isolate: Some(others.clone()),
                            ..FaultSpec::default()
                        },
                    )
                    .await;
                    tokio::time::sleep(Duration::from_millis(800)).await;
                    for id in cluster.ids() {
                        set_faults(
                            &cluster,
                            id,
                            FaultSpec {
                                heal: true,
                                ..FaultSpec::default()
                            },
                        )
                        .await;
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        stop.store(true, Ordering::SeqCst);
        while let Some(r) = clients.join_next().await {
            r.expect("a client task panicked");
        }

        let history = rec.history();
        let ok = history
            .iter()
            .filter(|e| matches!(e.outcome, Outcome::Ok(_)))
            .count();
        let unknown = history
            .iter()
            .filter(|e| matches!(e.outcome, Outcome::Unknown))
            .count();
        eprintln!(
            "{} operations recorded in {} nemesis rounds: {ok} completed, {unknown} with unknown outcome",
            history.len(),
            round
        );
        assert!(
            ok > 200,
            "too few operations completed under faults ({ok}) to say much"
        );
        let report = tokio::task::spawn_blocking(move || {
            check(
                &history,
                Budget::default().with_time(Duration::from_secs(60)),
            )
        })
        .await
        .expect("the checker panicked");
        eprintln!("kv-check: {report}");
        assert!(
            !report.verdict.is_violation(),
            "the history is not linearizable: {report}"
        );
        assert!(
            !matches!(report.verdict, kv_check::Verdict::InvalidHistory { .. }),
            "the recorded history is malformed: {report}"
        );
    };
    bounded(Duration::from_secs(150), "the test", test).await;
}
