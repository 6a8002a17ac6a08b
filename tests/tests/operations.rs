//! The operations themselves, end to end through the SDK and the CLI:
//! compare-and-swap, delete, binary keys and values, and the largest key and
//! value the limits allow.

use std::os::unix::ffi::OsStrExt;
use std::time::Duration;

use kv_tests::{bounded, describe, Cluster};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cas_swaps_only_when_the_expectation_holds() {
    let cluster = Cluster::start(5).await;
    let test = async {
        // The CLI: exit 0 when swapped, 1 when not.
        let cas = |args: Vec<&'static str>| {
            let cluster = &cluster;
            async move {
                let mut full = vec!["--timeout", "10", "cas"];
                full.extend(args);
                cluster.cli(&full).await
            }
        };
        let out = cas(vec!["lock", "me", "--expect-absent"]).await;
        assert_eq!(
            out.status.code(),
            Some(0),
            "cas on an absent key: {}",
            describe(&out)
        );
        let out = cas(vec!["lock", "you", "--expect-absent"]).await;
        assert_eq!(
            out.status.code(),
            Some(1),
            "cas --expect-absent on a present key: {}",
            describe(&out)
        );
        let out = cas(vec!["lock", "you", "--expect", "nobody"]).await;
        assert_eq!(
            out.status.code(),
            Some(1),
            "cas with a wrong expectation: {}",
            describe(&out)
        );
        assert_eq!(
            cluster.cli_ok(&["--timeout", "10", "get", "lock"]).await,
            "me\n"
        );
        let out = cas(vec!["lock", "you", "--expect", "me"]).await;
        assert_eq!(
            out.status.code(),
            Some(0),
            "cas with the right expectation: {}",
            describe(&out)
        );
        assert_eq!(
            cluster.cli_ok(&["--timeout", "10", "get", "lock"]).await,
            "you\n"
        );

        // The SDK: the outcome says whether it swapped and what the key holds.
        let client = cluster.client();
        let o = client.cas("counter", None, "1").await.expect("cas");
        assert!(o.swapped);
        assert_eq!(o.current, Some(b"1".to_vec()));
        let o = client
            .cas("counter", Some(b"0".to_vec()), "2")
            .await
            .expect("cas");
        assert!(!o.swapped, "swapped with a wrong expectation");
        assert_eq!(o.current, Some(b"1".to_vec()));
        let o = client
            .cas("counter", Some(b"1".to_vec()), "2")
            .await
            .expect("cas");
        assert!(o.swapped);
        assert_eq!(client.get("counter").await.unwrap(), Some(b"2".to_vec()));
    };
    bounded(Duration::from_secs(60), "the test", test).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_cas_increments_lose_no_update() {
    let cluster = Cluster::start(5).await;
    let test = async {
        const TASKS: u64 = 16;
        const INCREMENTS: u64 = 50;
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..TASKS {
            let client = cluster.client_with_timeout(Duration::from_secs(10));
            tasks.spawn(async move {
                for _ in 0..INCREMENTS {
                    loop {
                        let current = client.get("n").await.expect("get");
                        let n: u64 = current
                            .as_deref()
                            .map(|v| String::from_utf8_lossy(v).parse().unwrap())
                            .unwrap_or(0);
                        let o = client
                            .cas("n", current, (n + 1).to_string())
                            .await
                            .expect("cas");
                        if o.swapped {
                            break;
                        }
                    }
                }
            });
        }
        while let Some(r) = tasks.join_next().await {
            r.expect("a task panicked");
        }
        let n = cluster.client().get("n").await.unwrap();
        assert_eq!(n, Some((TASKS * INCREMENTS).to_string().into_bytes()));
    };
    bounded(Duration::from_secs(90), "the test", test).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_reports_whether_the_key_existed() {
    let cluster = Cluster::start(5).await;
    let test = async {
        let client = cluster.client();
        client.put("k", "v").await.unwrap();
        assert!(client.delete("k").await.unwrap(), "delete of a present key");
        assert!(
            !client.delete("k").await.unwrap(),
            "delete of an absent key"
        );
        assert_eq!(client.get("k").await.unwrap(), None);
        // The CLI's delete succeeds either way.
        cluster.cli_ok(&["--timeout", "10", "delete", "k"]).await;
    };
    bounded(Duration::from_secs(60), "the test", test).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_keys_and_values_round_trip_and_the_cli_escapes_non_utf8() {
    let cluster = Cluster::start(5).await;
    let test = async {
        let client = cluster.client();
        let key = b"bin\x00\xff\xfekey".to_vec();
        let value = (0u8..=255).collect::<Vec<u8>>();
        client
            .put(key.clone(), value.clone())
            .await
            .expect("put binary");
        assert_eq!(client.get(key.clone()).await.unwrap(), Some(value));

        // The CLI shows UTF-8 as is and escapes other bytes as \xNN.
        client
            .put("mixed", b"caf\xc3\xa9 \x80!".to_vec())
            .await
            .unwrap();
        assert_eq!(
            cluster.cli_ok(&["--timeout", "10", "get", "mixed"]).await,
            "café \\x80!\n"
        );
        // A non-UTF-8 key given on the command line reaches the store as bytes.
        let out = {
            let file = cluster.replicas_file().as_os_str().to_owned();
            let mut cmd = cluster.cli_command();
            cmd.arg("--replicas")
                .arg(&file)
                .args(["--timeout", "10", "put"])
                .arg(std::ffi::OsStr::from_bytes(b"cli\xffkey"))
                .arg("from-cli");
            kv_tests::run_bin(cmd, Duration::from_secs(20))
                .await
                .unwrap()
                .0
        };
        assert!(
            out.status.success(),
            "put of a non-UTF-8 key: {}",
            describe(&out)
        );
        assert_eq!(
            client.get(b"cli\xffkey".to_vec()).await.unwrap(),
            Some(b"from-cli".to_vec())
        );
    };
    bounded(Duration::from_secs(60), "the test", test).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn largest_allowed_key_and_value_are_accepted() {
    let cluster = Cluster::start(5).await;
    let test = async {
        let key = "k".repeat(1024);
        cluster.cli_ok(&["--timeout", "10", "put", &key, "v"]).await;
        assert_eq!(
            cluster.cli_ok(&["--timeout", "10", "get", &key]).await,
            "v\n"
        );

        // Exactly 1 MiB through the CLI's stdin, read back by the CLI.
        let text = "0123456789abcdef".repeat((1 << 20) / 16);
        let mut put = vec!["--replicas", cluster.replicas_file().to_str().unwrap()];
        put.extend(["--timeout", "20", "put", "big-text", "-"]);
        let mut cmd = cluster.cli_command();
        cmd.args(&put);
        let (out, _) = kv_tests::run_bin_with_input(
            cmd,
            Some(text.clone().into_bytes()),
            Duration::from_secs(30),
        )
        .await
        .unwrap_or_else(|e| panic!("{e}"));
        assert!(
            out.status.success(),
            "put of 1 MiB from stdin: {}",
            describe(&out)
        );
        let got = cluster
            .cli_ok(&["--timeout", "20", "get", "big-text"])
            .await;
        assert!(
            got == format!("{text}\n"),
            "get of the 1 MiB value: {} bytes back",
            got.len()
        );

        let client = cluster.client_with_timeout(Duration::from_secs(20));
        let value: Vec<u8> = (0..1usize << 20).map(|i| (i % 251) as u8).collect();
        client
            .put("big", value.clone())
            .await
            .expect("put of a 1 MiB value");
        assert_eq!(
            client.get("big").await.unwrap().as_deref(),
            Some(&value[..])
        );
        // Every replica applies it.
        let applied = cluster.max_applied().await;
        cluster
            .wait_all_applied(applied, Duration::from_secs(30))
            .await;
        for id in cluster.ids() {
            let got = cluster.client_for(id).get_local("big").await.unwrap();
            assert!(
                got.as_deref() == Some(&value[..]),
                "replica {id}'s copy of the 1 MiB value"
            );
        }
    };
    bounded(Duration::from_secs(90), "the test", test).await;
}
