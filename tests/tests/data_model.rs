//! The data model end to end, against real replicas: revisions on every
//! key (the same on every replica, through a restart from a snapshot and a
//! leader's death), ordered ranges with paging and bounds, and
//! transactions (atomic, exactly once under retry, a bank whose total never
//! changes), through the SDK and the CLI.

use std::collections::BTreeMap;
use std::time::Duration;

use kv_api::{CmpOp, Compare, Op, OpResult, RangeRequest, Target, Txn, TxnOp, WriteRequest};
use kv_client::Error;
use kv_tests::{bounded, describe, run_bin_with_input, wait_until, Cluster};

fn json_lines(stdout: &str) -> Vec<serde_json::Value> {
    stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l:?}: {e}")))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_carry_revisions_that_every_replica_agrees_on_through_a_snapshot_and_a_leader_kill() {
    let mut cluster = Cluster::start_with_args(5, &["--snapshot-every", "20"]).await;
    let test = async {
        let client = cluster.client();
        client.put("a", "1").await.unwrap();
        let first = client.get_kv("a").await.unwrap().expect("a");
        assert_eq!(first.version, 1);
        assert_eq!(first.create_revision, first.mod_revision);
        assert!(first.mod_revision > 0, "revisions are counted: {first:?}");
        client.put("a", "2").await.unwrap();
        let second = client.get_kv("a").await.unwrap().expect("a");
        assert_eq!(second.version, 2);
        assert_eq!(second.create_revision, first.create_revision);
        assert!(second.mod_revision > first.mod_revision);
        // The CLI shows them.
        let out = cluster.cli_ok(&["--output", "json", "get", "a"]).await;
        let j = &json_lines(&out)[0];
        assert_eq!(j["mod_revision"], second.mod_revision);
        assert_eq!(j["version"], 2);

        // Enough writes for snapshots; then the leader dies, and a replica
        // restarts from its snapshot.
        for i in 0..60 {
            client
                .put(format!("k{i:02}"), format!("{i}"))
                .await
                .unwrap();
        }
        let leader = cluster.wait_for_leader(Duration::from_secs(10)).await;
        cluster.kill(leader);
        client.put("after", "x").await.unwrap();
        cluster.restart(leader).await;
        let other = cluster.ids().into_iter().find(|&id| id != leader).unwrap();
        cluster.kill(other);
        cluster.restart(other).await;
        client.put("last", "y").await.unwrap();
        let after = client.get_kv("after").await.unwrap().expect("after");
        let last = client.get_kv("last").await.unwrap().expect("last");
        assert!(last.mod_revision > after.mod_revision);
        assert!(after.mod_revision > second.mod_revision);

        // Every replica, read locally once caught up, holds the same keys
        // with the same revisions.
        let applied = cluster.max_applied().await;
        cluster
            .wait_all_applied(applied, Duration::from_secs(20))
            .await;
        let mut seen = BTreeMap::new();
        for id in cluster.ids() {
            let page = cluster
                .client_for(id)
                .range_local(RangeRequest::between("", ""))
                .await
                .expect("local range");
            assert_eq!(page.kvs.len(), 63, "replica {id}");
            seen.insert(id, page.kvs);
        }
        let reference = seen.values().next().unwrap().clone();
        for (id, kvs) in &seen {
            assert_eq!(kvs, &reference, "replica {id} differs");
        }
    };
    bounded(Duration::from_secs(120), "the test", test).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ranges_list_keys_in_order_page_by_page_and_refuse_bad_bounds() {
    let cluster = Cluster::start(5).await;
    let test = async {
        let client = cluster.client();
        for k in ["b", "a", "c/2", "c/1", "c/10", "d", "c0"] {
            client.put(k, format!("v-{k}")).await.unwrap();
        }
        // CLI text: KEY VALUE lines in key order.
        let out = cluster.cli_ok(&["range", "a", "c0"]).await;
        assert_eq!(out, "a v-a\nb v-b\nc/1 v-c/1\nc/10 v-c/10\nc/2 v-c/2\n");
        let out = cluster.cli_ok(&["range", "--prefix", "c/"]).await;
        assert_eq!(out, "c/1 v-c/1\nc/10 v-c/10\nc/2 v-c/2\n");
        let out = cluster.cli_ok(&["scan", "c0"]).await;
        assert_eq!(out, "c0 v-c0\nd v-d\n", "to the last key");
        // Paged through small pages, limited, keys only, counted, local.
        let out = cluster
            .cli_ok(&["range", "", "--page-size", "2", "--keys-only"])
            .await;
        assert_eq!(out, "a\nb\nc/1\nc/10\nc/2\nc0\nd\n");
        let out = cluster
            .cli_ok(&[
                "range",
                "",
                "--page-size",
                "2",
                "--limit",
                "3",
                "--keys-only",
            ])
            .await;
        assert_eq!(out, "a\nb\nc/1\n");
        assert_eq!(
            cluster
                .cli_ok(&["range", "--prefix", "c", "--count-only"])
                .await,
            "4\n"
        );
        let out = cluster
            .cli_ok(&["--output", "json", "range", "--prefix", "c/"])
            .await;
        let lines = json_lines(&out);
        assert_eq!(lines.len(), 3);
        let c1 = client.get_kv("c/1").await.unwrap().unwrap();
        assert_eq!(lines[0]["key"], "c/1");
        assert_eq!(lines[0]["value"], "v-c/1");
        assert_eq!(lines[0]["mod_revision"], c1.mod_revision);
        assert_eq!(lines[0]["version"], 1);
        let out = cluster.cli_ok(&["range", "--local", "--prefix", "d"]).await;
        assert_eq!(out, "d v-d\n");
        // Through one replica only: a follower forwards to the leader.
        for id in cluster.ids() {
            let out = cluster.cli_at(id, &["range", "--prefix", "c/"]).await;
            assert!(out.status.success(), "{}", describe(&out));
            assert_eq!(String::from_utf8_lossy(&out.stdout).lines().count(), 3);
        }

        // Bad input: typed errors, nothing held.
        let bogus = RangeRequest {
            token: Some(b"kvr1:zzz".to_vec()),
            ..RangeRequest::between("a", "c")
        };
        let e = client.range(bogus).await.unwrap_err();
        assert!(
            matches!(e, Error::InvalidArgument(ref m) if m.contains("token")),
            "{e}"
        );
        let garbage = RangeRequest {
            token: Some(b"garbage".to_vec()),
            ..RangeRequest::between("a", "c")
        };
        assert!(matches!(
            client.range(garbage).await,
            Err(Error::InvalidArgument(_))
        ));
        let backwards = client.range(RangeRequest::between("z", "a")).await;
        assert!(matches!(backwards, Err(Error::InvalidArgument(_))));
        let out = cluster.cli(&["range", "z", "a"]).await;
        assert_eq!(out.status.code(), Some(2), "{}", describe(&out));
        // A huge limit is cut to the server's cap, not obeyed.
        let big = RangeRequest {
            limit: u64::MAX,
            ..RangeRequest::between("", "")
        };
        assert_eq!(client.range(big).await.unwrap().kvs.len(), 7);
    };
    bounded(Duration::from_secs(90), "the test", test).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_range_answer_is_bounded_in_keys_and_bytes() {
    let cluster = Cluster::start(3).await;
    let test = async {
        let client = cluster.client();
        let value = vec![b'v'; 300 << 10];
        for i in 0..8 {
            client.put(format!("big{i}"), value.clone()).await.unwrap();
        }
        let mut req = RangeRequest::prefix("big");
        let mut pages = 0;
        let mut keys = 0;
        loop {
            let page = client.range(req.clone()).await.unwrap();
            let bytes: usize = page.kvs.iter().map(|kv| kv.value.len()).sum();
            assert!(bytes <= kv_api::MAX_RANGE_BYTES, "{bytes} bytes in a page");
            keys += page.kvs.len();
            pages += 1;
            if !page.more {
                break;
            }
            req.token = page.token;
        }
        assert_eq!(keys, 8);
        assert!(pages >= 3, "{pages} pages for 2.4 MiB");
        for i in 0..(kv_api::MAX_RANGE_LIMIT + 5) / 500 + 1 {
            let txn = Txn {
                success: (0..100)
                    .map(|j| TxnOp::Put {
                        key: format!("small{:05}", i * 100 + j).into_bytes(),
                        value: vec![],
                        lease: 0,
                    })
                    .collect(),
                ..Txn::default()
            };
            client.txn(txn).await.unwrap();
        }
        let all = client.range(RangeRequest::prefix("small")).await.unwrap();
        assert_eq!(all.kvs.len(), 2_100);
        assert!(!all.more);
        let capped = RangeRequest {
            limit: 1_000,
            ..RangeRequest::prefix("small")
        };
        let page = client.range(capped).await.unwrap();
        assert_eq!(page.kvs.len(), 1_000);
        assert!(page.more);
    };
    bounded(Duration::from_secs(90), "the test", test).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_txn_runs_one_branch_atomically_and_a_retry_is_applied_once() {
    let cluster = Cluster::start(5).await;
    let test = async {
        // The CLI: exit 0 when the comparisons hold, 1 when not.
        let out = cluster
            .cli(&[
                "txn",
                "--if",
                "absent lock",
                "--then",
                "put lock me",
                "--else",
                "put lost me",
            ])
            .await;
        assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
        assert_eq!(String::from_utf8_lossy(&out.stdout), "succeeded\n");
        let out = cluster
            .cli(&[
                "--output",
                "json",
                "txn",
                "--if",
                "absent lock",
                "--then",
                "put lock you",
                "--else",
                "put lost you",
            ])
            .await;
        assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
        let j = &json_lines(&String::from_utf8_lossy(&out.stdout))[0];
        assert_eq!(j["succeeded"], false);
        assert_eq!(j["results"][0]["op"], "put");
        assert_eq!(cluster.cli_ok(&["get", "lock"]).await, "me\n");
        assert_eq!(cluster.cli_ok(&["get", "lost"]).await, "you\n");
        // From stdin, with a quoted value and a revision comparison.
        let lock = cluster.client().get_kv("lock").await.unwrap().unwrap();
        let script = format!(
            "# take over the lock\nif mod lock = {}\nif value lock = me\nthen put lock \"you too\"\nthen del lost\n",
            lock.mod_revision
        );
        let mut cmd = cluster.cli_command();
        cmd.args([
            "--replicas",
            cluster.replicas_file().to_str().unwrap(),
            "txn",
            "-",
        ]);
        let (out, _) = run_bin_with_input(cmd, Some(script.into_bytes()), Duration::from_secs(20))
            .await
            .unwrap();
        assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
        assert_eq!(cluster.cli_ok(&["get", "lock"]).await, "you too\n");
        assert_eq!(cluster.cli(&["get", "lost"]).await.status.code(), Some(1));
        // Nonsense is refused before anything is sent.
        for args in [
            vec!["txn", "--if", "size lock > 3", "--then", "put a b"],
            vec!["txn", "--then", "put a"],
            vec!["txn"],
        ] {
            let out = cluster.cli(&args).await;
            assert_eq!(out.status.code(), Some(2), "{args:?}: {}", describe(&out));
        }

        // The SDK: one revision for the whole branch.
        let client = cluster.client();
        client.put("x", "1").await.unwrap();
        let x = client.get_kv("x").await.unwrap().unwrap();
        let swap = Txn {
            compares: vec![Compare {
                key: b"x".to_vec(),
                op: CmpOp::Equal,
                target: Target::Version(1),
            }],
            success: vec![
                TxnOp::Put {
                    key: b"x".to_vec(),
                    value: b"2".to_vec(),
                    lease: 0,
                },
                TxnOp::Put {
                    key: b"y".to_vec(),
                    value: b"2".to_vec(),
                    lease: 0,
                },
            ],
            failure: vec![],
        };
        let done = client.txn(swap.clone()).await.unwrap();
        assert!(done.succeeded);
        assert!(done.revision > x.mod_revision);
        let (x2, y) = (
            client.get_kv("x").await.unwrap().unwrap(),
            client.get_kv("y").await.unwrap().unwrap(),
        );
        assert_eq!(
            (x2.mod_revision, y.mod_revision),
            (done.revision, done.revision)
        );
        assert_eq!(x2.version, 2);

        // Exactly once: the same (session, seq) again, through every
        // replica, gets the first answer and changes nothing.
        let session = client.open_session().await.unwrap();
        let bump = Txn {
            compares: vec![],
            success: vec![TxnOp::Put {
                key: b"counter".to_vec(),
                value: b"1".to_vec(),
                lease: 0,
            }],
            failure: vec![],
        };
        let req = WriteRequest {
            client_id: session,
            seq: 1,
            acked_below: 0,
            op: Op::Txn(bump),
        };
        let first = client.write(req.clone()).await.unwrap();
        for id in cluster.ids() {
            let again = cluster.client_for(id).write(req.clone()).await.unwrap();
            assert_eq!(again, first, "replica {id}");
        }
        let counter = client.get_kv("counter").await.unwrap().unwrap();
        assert_eq!(counter.version, 1, "applied once");
        let OpResult::Txn(t) = first.result else {
            panic!("{first:?}")
        };
        assert_eq!(counter.mod_revision, t.revision);

        // Too big: refused with a typed error, by the SDK and by a replica.
        let many = Txn {
            success: (0..=kv_api::MAX_TXN_OPS)
                .map(|i| TxnOp::Delete {
                    key: format!("k{i}").into_bytes(),
                })
                .collect(),
            ..Txn::default()
        };
        assert!(matches!(
            client.txn(many.clone()).await,
            Err(Error::InvalidArgument(_))
        ));
        let raw = WriteRequest {
            client_id: session,
            seq: 2,
            acked_below: 0,
            op: Op::Txn(many),
        };
        let limits = kv_api::Limits {
            max_key: usize::MAX,
            max_value: usize::MAX,
        };
        let unchecked = cluster
            .builder()
            .replicas(cluster.replicas().clone())
            .limits(limits)
            .build()
            .unwrap();
        // The SDK's own check passes with these limits; the replica's
        // refuses.
        assert!(matches!(
            unchecked.write(raw).await,
            Err(Error::InvalidArgument(ref m)) if m.contains("operations")
        ));
        let forged = WriteRequest {
            client_id: session,
            seq: 3,
            acked_below: 0,
            op: Op::NewLeader { now_ms: 0 },
        };
        assert!(matches!(
            unchecked.write(forged).await,
            Err(Error::InvalidArgument(_))
        ));
    };
    bounded(Duration::from_secs(90), "the test", test).await;
}

/// The bank: accounts moved between by transactions that compare the
/// revisions they read; every read of all accounts (one linearizable range)
/// sums to the same total, while transfers race and a leader dies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bank_transfers_in_txns_keep_the_total_in_every_read() {
    const ACCOUNTS: u64 = 5;
    const START: u64 = 100;
    let mut cluster = Cluster::start(5).await;
    let test = async {
        let client = cluster.client();
        let open = Txn {
            success: (0..ACCOUNTS)
                .map(|i| TxnOp::Put {
                    key: format!("acct/{i}").into_bytes(),
                    value: START.to_string().into_bytes(),
                    lease: 0,
                })
                .collect(),
            ..Txn::default()
        };
        client.txn(open).await.unwrap();
        let total = ACCOUNTS * START;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let mut workers = Vec::new();
        for w in 0..4u64 {
            let client = cluster.client();
            let stop = stop.clone();
            workers.push(tokio::spawn(async move {
                let mut done = 0u64;
                let mut n = w;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    n += 1;
                    let (from, to) = (n % ACCOUNTS, (n * 7 + w + 1) % ACCOUNTS);
                    if from == to {
                        continue;
                    }
                    let Ok(page) = client.range(RangeRequest::prefix("acct/")).await else {
                        continue;
                    };
                    let acct = |i: u64| {
                        let key = format!("acct/{i}").into_bytes();
                        page.kvs.iter().find(|kv| kv.key == key).cloned().unwrap()
                    };
                    let (a, b) = (acct(from), acct(to));
                    let balance = |v: &[u8]| -> u64 { String::from_utf8_lossy(v).parse().unwrap() };
                    let amount = (n % 7 + 1).min(balance(&a.value));
                    let txn = Txn {
                        compares: [&a, &b]
                            .iter()
                            .map(|kv| Compare {
                                key: kv.key.clone(),
                                op: CmpOp::Equal,
                                target: Target::ModRevision(kv.mod_revision),
                            })
                            .collect(),
                        success: vec![
                            TxnOp::Put {
                                key: a.key.clone(),
                                value: (balance(&a.value) - amount).to_string().into_bytes(),
                                lease: 0,
                            },
                            TxnOp::Put {
                                key: b.key.clone(),
                                value: (balance(&b.value) + amount).to_string().into_bytes(),
                                lease: 0,
                            },
                        ],
                        failure: vec![],
                    };
                    // An unknown outcome is fine: the comparisons make a
                    // transfer apply at most once either way.
                    if let Ok(r) = client.txn(txn).await {
                        done += u64::from(r.succeeded);
                    }
                }
                done
            }));
        }
        let check = |page: kv_api::RangeResponse| {
            let sum: u64 = page
                .kvs
                .iter()
                .map(|kv| String::from_utf8_lossy(&kv.value).parse::<u64>().unwrap())
                .sum();
            assert_eq!(page.kvs.len() as u64, ACCOUNTS);
            assert_eq!(sum, total, "a read saw {page:?}");
        };
        let reader = cluster.client();
        let started = std::time::Instant::now();
        let mut reads = 0;
        let mut killed = false;
        while started.elapsed() < Duration::from_secs(8) {
            if let Ok(page) = reader.range(RangeRequest::prefix("acct/")).await {
                check(page);
                reads += 1;
            }
            if !killed && started.elapsed() > Duration::from_secs(3) {
                let leader = cluster.wait_for_leader(Duration::from_secs(10)).await;
                cluster.kill(leader);
                killed = true;
            }
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let mut transfers = 0;
        for w in workers {
            transfers += w.await.unwrap();
        }
        assert!(transfers > 10, "only {transfers} transfers went through");
        assert!(reads > 10, "only {reads} reads");
        // Every replica, read locally, agrees on the total once caught up.
        wait_until(Duration::from_secs(20), "a final read", || async {
            reader.range(RangeRequest::prefix("acct/")).await.is_ok()
        })
        .await;
        check(reader.range(RangeRequest::prefix("acct/")).await.unwrap());
    };
    bounded(Duration::from_secs(120), "the test", test).await;
}
