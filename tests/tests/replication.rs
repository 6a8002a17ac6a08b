//! A write through any replica is visible through every replica: by a
//! linearizable read at once, and by a local read once that replica has
//! applied it.

use std::time::Duration;

use kv_tests::{bounded, describe, parse_status_lines, Cluster};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn put_through_each_replica_is_read_back_through_every_other_replica() {
    let cluster = Cluster::start(5).await;
    bounded(Duration::from_secs(120), "the test", async {
        let ids = cluster.ids();
        for &writer in &ids {
            let key = format!("key-written-via-{writer}");
            let value = format!("value-{writer}");
            let out = cluster
                .cli_at(writer, &["--timeout", "10", "put", &key, &value])
                .await;
            assert!(
                out.status.success(),
                "put via replica {writer}: {}",
                describe(&out)
            );
            for &reader in ids.iter().filter(|&&r| r != writer) {
                let out = cluster
                    .cli_at(reader, &["--timeout", "10", "get", &key])
                    .await;
                assert!(
                    out.status.success(),
                    "linearizable get via replica {reader} of a put via {writer}: {}",
                    describe(&out)
                );
                assert_eq!(
                    String::from_utf8_lossy(&out.stdout),
                    format!("{value}\n"),
                    "linearizable get via replica {reader} of a put via {writer}"
                );
            }
        }

        // Every put was acknowledged, so the leader has applied it: once every
        // replica has applied as far, local reads must see all of them.
        let applied = cluster.max_applied().await;
        assert!(
            applied >= ids.len() as u64,
            "applied {applied} after {} puts",
            ids.len()
        );
        cluster
            .wait_all_applied(applied, Duration::from_secs(20))
            .await;
        for &reader in &ids {
            for &writer in &ids {
                let key = format!("key-written-via-{writer}");
                let out = cluster.cli_at(reader, &["get", "--local", &key]).await;
                assert!(
                    out.status.success(),
                    "local get of {key} via replica {reader}: {}",
                    describe(&out)
                );
                assert_eq!(
                    String::from_utf8_lossy(&out.stdout),
                    format!("value-{writer}\n"),
                    "local get of {key} via replica {reader}"
                );
            }
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_get_of_missing_key_exits_1_and_delete_removes_the_key() {
    let cluster = Cluster::start(5).await;
    bounded(Duration::from_secs(60), "the test", async {
        let out = cluster
            .cli(&["--timeout", "10", "get", "never-written"])
            .await;
        assert_eq!(
            out.status.code(),
            Some(1),
            "get of a missing key: {}",
            describe(&out)
        );

        cluster
            .cli_ok(&["--timeout", "10", "put", "doomed", "x"])
            .await;
        assert_eq!(
            cluster.cli_ok(&["--timeout", "10", "get", "doomed"]).await,
            "x\n"
        );
        cluster
            .cli_ok(&["--timeout", "10", "delete", "doomed"])
            .await;
        let out = cluster.cli(&["--timeout", "10", "get", "doomed"]).await;
        assert_eq!(
            out.status.code(),
            Some(1),
            "get after delete: {}",
            describe(&out)
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_status_reports_every_replica_as_json_lines() {
    let mut cluster = Cluster::start(5).await;
    bounded(Duration::from_secs(60), "the test", async {
        cluster.cli_ok(&["--timeout", "10", "put", "k", "v"]).await;
        let out = cluster.cli(&["status"]).await;
        assert!(out.status.success(), "status: {}", describe(&out));
        let lines = parse_status_lines(&out.stdout);
        assert_eq!(lines.len(), 5, "one line per replica: {}", describe(&out));
        let mut ids: Vec<u64> = Vec::new();
        for l in &lines {
            ids.push(
                l["id"]
                    .as_u64()
                    .unwrap_or_else(|| panic!("no numeric id: {l}")),
            );
            assert_eq!(l["up"], serde_json::Value::Bool(true), "all up: {l}");
            assert!(l["leader"].is_boolean(), "leader is a bool: {l}");
            assert!(l["applied"].is_u64(), "applied is a number: {l}");
        }
        ids.sort();
        assert_eq!(ids, vec![1, 2, 3, 4, 5]);

        // A killed replica is reported down, with no applied index.
        let victim = 5;
        cluster.kill(victim);
        let out = cluster.cli(&["status"]).await;
        let lines = parse_status_lines(&out.stdout);
        let line = lines
            .iter()
            .find(|l| l["id"].as_u64() == Some(victim))
            .unwrap_or_else(|| panic!("no line for replica {victim}: {}", describe(&out)));
        assert_eq!(line["up"], serde_json::Value::Bool(false), "{line}");
        assert!(
            line["applied"].is_null(),
            "applied of a down replica: {line}"
        );
        assert_eq!(lines.len(), 5, "{}", describe(&out));

        // None answering: exit 3, still one line per replica, all down.
        let ids = cluster.ids();
        cluster.kill_all(&ids);
        let out = cluster.cli(&["--timeout", "2", "status"]).await;
        assert_eq!(
            out.status.code(),
            Some(3),
            "status with every replica down: {}",
            describe(&out)
        );
        let lines = parse_status_lines(&out.stdout);
        assert_eq!(lines.len(), 5, "{}", describe(&out));
        assert!(
            lines
                .iter()
                .all(|l| l["up"] == serde_json::Value::Bool(false)),
            "{}",
            describe(&out)
        );
    })
    .await;
}
