//! Watches against real replicas: every change of a prefix exactly once, in
//! revision order, through a leader's SIGKILL and a replica's restart; the
//! history's bound (`compacted`); ranges at a revision; the CLI's `watch`,
//! `compact` and `range --rev`.

use std::process::Stdio;
use std::time::Duration;

use kv_api::{EventKind, RangeRequest, WatchRequest};
use kv_client::Error;
use kv_tests::{bounded, describe, Cluster};
use tokio::io::{AsyncBufReadExt, BufReader};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_sees_every_change_once_in_order_through_a_leader_kill_and_a_restart() {
    const N: usize = 150;
    let mut cluster = Cluster::start_with_args(5, &["--snapshot-every", "40"]).await;
    let test = async {
        let writer = cluster.client_with_timeout(Duration::from_secs(30));
        writer.put("w/start", "x").await.unwrap();
        let from = writer
            .get_kv("w/start")
            .await
            .unwrap()
            .unwrap()
            .mod_revision
            + 1;
        let watch_client = cluster.client_with_timeout(Duration::from_secs(30));
        let watcher = tokio::spawn(async move {
            let mut w = watch_client
                .watcher(WatchRequest::prefix("w/", from))
                .await
                .expect("watcher");
            let mut seen = Vec::new();
            while seen.len() < N {
                match w.next().await {
                    Ok(events) => seen.extend(events),
                    // Retried from the same cursor: nothing lost.
                    Err(e) => assert!(!matches!(e, Error::Compacted(_)), "{e}"),
                }
            }
            seen
        });
        for i in 0..N {
            writer
                .put(format!("w/{i:03}"), format!("{i}"))
                .await
                .unwrap();
            writer.put(format!("other/{i}"), "x").await.unwrap();
            if i == N / 3 {
                let leader = cluster.wait_for_leader(Duration::from_secs(10)).await;
                cluster.kill(leader);
            }
            if i == 2 * N / 3 {
                let restarted = cluster.running()[0];
                cluster.restart(restarted).await;
            }
        }
        let seen = bounded(Duration::from_secs(60), "the watcher", watcher)
            .await
            .unwrap();
        let got: Vec<String> = seen
            .iter()
            .map(|e| {
                assert_eq!(e.kind, EventKind::Put);
                String::from_utf8(e.kv.value.clone()).unwrap()
            })
            .collect();
        let want: Vec<String> = (0..N).map(|i| i.to_string()).collect();
        assert_eq!(got, want, "missed, repeated or reordered");
        assert!(seen
            .windows(2)
            .all(|p| p[0].kv.mod_revision < p[1].kv.mod_revision));
    };
    bounded(Duration::from_secs(150), "the test", test).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_watch_prints_one_line_per_change_and_compaction_is_a_clear_error() {
    let cluster = Cluster::start(3).await;
    let test = async {
        let client = cluster.client();
        client.put("c/a", "0").await.unwrap();
        let mut cmd = cluster.cli_command();
        cmd.args([
            "--replicas",
            cluster.replicas_file().to_str().unwrap(),
            "--output",
            "json",
            "watch",
            "--prefix",
            "c/",
            "--prev-kv",
            "--max-events",
            "3",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
        let mut child = cmd.spawn().unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        // It watches from the next change: wait until it has started.
        tokio::time::sleep(Duration::from_millis(500)).await;
        client.put("c/a", "1").await.unwrap();
        client.put("elsewhere", "1").await.unwrap();
        client.put("c/b", "2").await.unwrap();
        client.delete("c/a").await.unwrap();
        let mut got = Vec::new();
        while let Some(l) = bounded(Duration::from_secs(20), "a watch line", lines.next_line())
            .await
            .unwrap()
        {
            got.push(serde_json::from_str::<serde_json::Value>(&l).unwrap());
        }
        let status = bounded(Duration::from_secs(10), "watch to exit", child.wait())
            .await
            .unwrap();
        assert!(status.success());
        assert_eq!(got.len(), 3, "{got:?}");
        assert_eq!(
            (
                got[0]["type"].as_str(),
                got[0]["key"].as_str(),
                got[0]["value"].as_str()
            ),
            (Some("put"), Some("c/a"), Some("1"))
        );
        assert_eq!(got[0]["prev_value"], "0");
        assert_eq!(got[1]["key"], "c/b");
        assert_eq!(got[2]["type"], "delete");
        let revs: Vec<u64> = got
            .iter()
            .map(|j| j["revision"].as_u64().unwrap())
            .collect();
        assert!(revs[0] < revs[1] && revs[1] < revs[2], "{revs:?}");

        // A range at a revision shows the past.
        let out = cluster
            .cli_ok(&["range", "--prefix", "c/", "--rev", &revs[0].to_string()])
            .await;
        assert_eq!(out, "c/a 1\n");
        assert_eq!(
            cluster.cli_ok(&["range", "--prefix", "c/"]).await,
            "c/b 2\n"
        );

        // Compacted: old revisions are refused, with a clear error.
        let out = cluster.cli_ok(&["compact", &revs[1].to_string()]).await;
        assert_eq!(out.trim(), revs[1].to_string());
        let e = client
            .watcher(WatchRequest::prefix("c/", revs[0]))
            .await
            .unwrap()
            .next()
            .await
            .unwrap_err();
        assert_eq!(e, Error::Compacted(revs[1]));
        let old = RangeRequest {
            revision: revs[0],
            ..RangeRequest::prefix("c/")
        };
        assert_eq!(
            client.range(old).await.unwrap_err(),
            Error::Compacted(revs[1])
        );
        let out = cluster
            .cli(&["--output", "json", "watch", "c/a", "--from-rev", "1"])
            .await;
        assert_eq!(out.status.code(), Some(3), "{}", describe(&out));
        assert!(String::from_utf8_lossy(&out.stdout).contains("\"kind\":\"compacted\""));
        // From the compaction point on, it works.
        let mut w = client
            .watcher(WatchRequest::prefix("c/", revs[1] + 1))
            .await
            .unwrap();
        assert_eq!(w.next().await.unwrap().len(), 1, "the delete of c/a");
    };
    bounded(Duration::from_secs(90), "the test", test).await;
}
