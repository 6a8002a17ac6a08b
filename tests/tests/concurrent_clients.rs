//! Many clients writing and reading concurrently: the history they see,
//! final reads of every key included, is linearizable (`kv-check`), so no
//! acknowledged write is lost, not even on every replica at once; and every
//! replica ends with the same applied index and the same map.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use kv_check::{check, Budget, Op, Outcome, Recorder, Ret};
use kv_tests::{bounded, Cluster};
use rand::Rng;

const CLIENTS: usize = 16;
const OPS_PER_CLIENT: usize = 500;
const KEYS: usize = 24;

fn key(i: usize) -> String {
    format!("key-{i:02}")
}

/// An SDK result as the checker sees it: an error that certainly left the
/// store unchanged fails the operation; any other leaves it unknown.
fn outcome(r: Result<Ret, kv_client::Error>) -> Outcome {
    match r {
        Ok(ret) => Outcome::Ok(ret),
        Err(e) if !e.outcome_unknown() => Outcome::Failed,
        Err(_) => Outcome::Unknown,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_clients_see_a_linearizable_history_and_leave_every_replica_with_the_same_map() {
    let cluster = Cluster::start(5).await;
    let test = async {
        let rec = Recorder::new();
        let started = Instant::now();
        let mut tasks = tokio::task::JoinSet::new();
        for c in 0..CLIENTS {
            let client = cluster.client_with_timeout(Duration::from_secs(10));
            let rec = rec.clone();
            tasks.spawn(async move {
                let mut errors = Vec::new();
                for i in 0..OPS_PER_CLIENT {
                    // Decide before awaiting: the RNG is not Send.
                    let (choice, k) = {
                        let mut rng = rand::rng();
                        (rng.random_range(0..10u32), key(rng.random_range(0..KEYS)))
                    };
                    let id = c as u64;
                    let result = match choice {
                        0..=4 => {
                            let value = format!("c{c}-op{i}");
                            let t = rec.invoke(id, Op::put(&k, &value));
                            let r = client.put(k.as_str(), value.as_str()).await;
                            rec.complete(t, outcome(r.clone().map(|()| Ret::Put)));
                            r.map(|_| ())
                        }
                        5..=7 => {
                            let t = rec.invoke(id, Op::get(&k));
                            let r = client.get(k.as_str()).await;
                            rec.complete(t, outcome(r.clone().map(Ret::Get)));
                            r.map(|_| ())
                        }
                        _ => {
                            let t = rec.invoke(id, Op::delete(&k));
                            let r = client.delete(k.as_str()).await;
                            rec.complete(t, outcome(r.clone().map(Ret::Delete)));
                            r.map(|_| ())
                        }
                    };
                    if let Err(e) = result {
                        errors.push(format!("client {c} op {i} on {k}: {e}"));
                    }
                }
                errors
            });
        }
        let mut errors = Vec::new();
        while let Some(r) = tasks.join_next().await {
            errors.extend(r.expect("a client task panicked"));
        }
        let took = started.elapsed();
        let total = CLIENTS * OPS_PER_CLIENT;
        eprintln!(
            "{total} ops from {CLIENTS} clients in {took:?} ({:.0} ops/s), {} errors",
            total as f64 / took.as_secs_f64(),
            errors.len()
        );
        assert!(
            errors.is_empty(),
            "{} operations failed in a fault-free cluster, e.g. {:#?}",
            errors.len(),
            &errors[..errors.len().min(10)]
        );

        // Every replica reaches the same applied index...
        let applied = cluster.max_applied().await;
        let same = cluster
            .wait_applied_equal(applied, Duration::from_secs(30))
            .await;
        eprintln!("every replica applied index {same}");

        // ...and holds the same map.
        let mut maps: BTreeMap<u64, BTreeMap<String, Option<Vec<u8>>>> = BTreeMap::new();
        for id in cluster.ids() {
            let local = cluster.client_for(id);
            let mut map = BTreeMap::new();
            for i in 0..KEYS {
                let k = key(i);
                let v = local
                    .get_local(k.as_str())
                    .await
                    .unwrap_or_else(|e| panic!("local get of {k} on replica {id}: {e}"));
                map.insert(k, v);
            }
            maps.insert(id, map);
        }
        let (first_id, first) = maps.iter().next().expect("five maps");
        for (id, map) in &maps {
            for (k, v) in map {
                assert_eq!(
                    v, &first[k],
                    "replica {id} and replica {first_id} disagree on {k} at applied index {same}"
                );
            }
        }
        // The linearizable view agrees with the replicas' local state. These
        // final reads go into the history too: a write acknowledged but
        // lost everywhere leaves them unexplainable.
        let client = cluster.client();
        for (k, v) in first {
            let t = rec.invoke(CLIENTS as u64, Op::get(k));
            let r = client.get(k.as_str()).await;
            rec.complete(t, outcome(r.clone().map(Ret::Get)));
            assert_eq!(&r.expect("get"), v, "linearizable get of {k}");
        }
        let history = rec.history();
        let ops = history.len();
        let checked = Instant::now();
        let report = tokio::task::spawn_blocking(move || {
            check(
                &history,
                Budget::default().with_time(Duration::from_secs(60)),
            )
        })
        .await
        .expect("the checker panicked");
        eprintln!(
            "kv-check on {ops} operations took {:?}: {report}",
            checked.elapsed()
        );
        report.assert_linearizable();
        let statuses = cluster.statuses().await;
        let present = first.values().filter(|v| v.is_some()).count() as u64;
        for (id, s) in statuses {
            let s = s.unwrap_or_else(|| panic!("replica {id} did not answer status"));
            assert_eq!(s.keys, present, "replica {id}'s key count");
        }
    };
    bounded(Duration::from_secs(240), "the test", test).await;
}
