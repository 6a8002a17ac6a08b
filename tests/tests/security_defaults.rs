//! Safe defaults (issue 11): fault injection only on a replica started with
//! `--enable-fault-injection`; no plain bind on a non-loopback address
//! without `--insecure`; the data directory 0700 and every file in it 0600.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use kv_tests::{
    bounded, describe, free_ports, kv_server_cmd, run_bin, temp_dir, wait_until, Cluster,
    START_TIMEOUT,
};

/// A start-up that is refused must be refused at once, not after serving.
const REFUSAL_BOUND: Duration = Duration::from_secs(15);

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Runs `kv-server ARGS` and returns its output; fails the test if it does
/// not exit by itself within [`REFUSAL_BOUND`].
async fn server_refusal(args: &[&str]) -> std::process::Output {
    let (out, _) = run_bin(kv_server_cmd(args), REFUSAL_BOUND)
        .await
        .unwrap_or_else(|e| panic!("kv-server {args:?} should have refused to start: {e}"));
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_injection_is_refused_unless_the_replica_was_started_with_it() {
    bounded(
        Duration::from_secs(120),
        "the fault injection switch",
        async {
            let mut cluster = Cluster::start(3).await;
            // Replica 1 as in production: restarted without the flag.
            cluster.set_fault_injection(false);
            cluster.restart(1).await;

            // A change is refused: exit 2, one clear sentence, kind "disabled".
            let out = cluster.cli_at(1, &["fault", "--isolate", "2,3"]).await;
            assert_eq!(out.status.code(), Some(2), "{}", describe(&out));
            let err = stderr(&out);
            assert!(
                err.contains("fault injection is off on replica 1")
                    && err.contains("--enable-fault-injection"),
                "{}",
                describe(&out)
            );
            let line: serde_json::Value = serde_json::from_slice(&out.stdout)
                .unwrap_or_else(|e| panic!("one JSON line: {e}\n{}", describe(&out)));
            assert_eq!(line["kind"], "disabled", "{line}");

            // The SDK gets the typed error.
            let change = kv_api::FaultSpec {
                drop_rate: Some(1.0),
                ..Default::default()
            };
            let sdk = cluster
                .client_for(1)
                .set_faults(cluster.client_addr(1), change)
                .await;
            assert!(matches!(sdk, Err(kv_client::Error::Disabled(_))), "{sdk:?}");

            // A report-only call is answered, and shows nothing injected: the
            // refused changes did not touch the links.
            let out = cluster.cli_at(1, &["fault"]).await;
            assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
            let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
            assert_eq!(
                report["settings"]["isolate"],
                serde_json::json!([]),
                "{report}"
            );
            assert_eq!(report["settings"]["drop_rate"], 0.0, "{report}");
            assert_eq!(report["dropped"], 0, "{report}");
            assert_eq!(report["refused"], 0, "{report}");
            // And replica 1 still takes part: a write through it, read back
            // linearizably through it.
            let out = cluster.cli_at(1, &["put", "k", "v"]).await;
            assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
            let out = cluster.cli_at(1, &["get", "k"]).await;
            assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
            assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "v");

            // Replica 2 was started with the flag (the harness's default): the
            // same change is made.
            let out = cluster.cli_at(2, &["fault", "--drop-rate", "0.5"]).await;
            assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
            let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
            assert_eq!(report["settings"]["drop_rate"], 0.5, "{report}");
            let out = cluster.cli_at(2, &["fault", "--heal"]).await;
            assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_flags_at_start_need_enable_fault_injection() {
    bounded(Duration::from_secs(90), "start-up fault flags", async {
        let dir = temp_dir("fault-flags");
        let p = free_ports(2);
        let file = dir.join("replica");
        std::fs::write(&file, format!("1 127.0.0.1:{} 127.0.0.1:{}\n", p[0], p[1])).unwrap();
        let data = dir.join("data");
        let base = [
            "--id",
            "1",
            "--replicas",
            file.to_str().unwrap(),
            "--data-dir",
            data.to_str().unwrap(),
        ];
        for flag in [
            &["--drop-rate", "0.1"][..],
            &["--delay-ms", "1..5"],
            &["--timeout-rate", "0.1"],
            &["--isolate", "2"],
            &["--fault-seed", "7"],
        ] {
            let args: Vec<&str> = base.iter().chain(flag).copied().collect();
            let out = server_refusal(&args).await;
            assert_eq!(out.status.code(), Some(2), "{flag:?}: {}", describe(&out));
            let err = stderr(&out);
            assert!(
                err.contains(flag[0]) && err.contains("--enable-fault-injection"),
                "{flag:?}: {}",
                describe(&out)
            );
            assert!(
                !data.exists(),
                "{flag:?}: refused, yet it created its data directory"
            );
        }

        // `kv-server --help` explains the switch.
        let (out, _) = run_bin(kv_server_cmd(["--help"]), REFUSAL_BOUND)
            .await
            .unwrap();
        let help = String::from_utf8_lossy(&out.stdout);
        assert!(help.contains("--enable-fault-injection"), "{help}");
        let _ = std::fs::remove_dir_all(&dir);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plain_bind_on_a_non_loopback_address_needs_insecure() {
    bounded(Duration::from_secs(120), "non-loopback binds", async {
        let dir = temp_dir("public-bind");
        let p = free_ports(2);
        let data = dir.join("data");
        let file = dir.join("replica");
        let args = |extra: &[&str]| -> Vec<String> {
            let mut a: Vec<String> = [
                "--id",
                "1",
                "--replicas",
                file.to_str().unwrap(),
                "--data-dir",
                data.to_str().unwrap(),
            ]
            .iter()
            .map(|s| s.to_string())
            .collect();
            a.extend(extra.iter().map(|s| s.to_string()));
            a
        };
        let cases = [
            (
                format!("1 0.0.0.0:{} 127.0.0.1:{}\n", p[0], p[1]),
                format!("0.0.0.0:{}", p[0]),
            ),
            (
                format!("1 127.0.0.1:{} [::]:{}\n", p[0], p[1]),
                format!("[::]:{}", p[1]),
            ),
        ];
        for (text, named) in &cases {
            std::fs::write(&file, text).unwrap();
            let a = args(&[]);
            let a: Vec<&str> = a.iter().map(String::as_str).collect();
            let out = server_refusal(&a).await;
            assert_eq!(out.status.code(), Some(2), "{text}: {}", describe(&out));
            let err = stderr(&out);
            for needed in [
                named.as_str(),
                "is not a loopback address",
                "without TLS",
                "--tls-ca",
                "--insecure",
            ] {
                assert!(
                    err.contains(needed),
                    "{text}: no {needed:?} in\n{}",
                    describe(&out)
                );
            }
            assert!(
                !data.exists(),
                "{text}: refused, yet it created its data directory"
            );
        }

        // With --insecure it starts, and serves (0.0.0.0 takes loopback
        // connections too).
        std::fs::write(&file, &cases[0].0).unwrap();
        let mut child = kv_server_cmd(args(&["--insecure", "--exit-on-stdin-eof"]))
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("start kv-server");
        let client = kv_client::Client::builder()
            .addrs(vec![format!("127.0.0.1:{}", p[0])])
            .timeout(Duration::from_secs(1))
            .build()
            .unwrap();
        let deadline = std::time::Instant::now() + START_TIMEOUT;
        while !client.status().await.iter().any(|(_, r)| r.is_ok()) {
            if let Ok(Some(status)) = child.try_wait() {
                let out = child.wait_with_output().await.unwrap();
                panic!(
                    "kv-server --insecure exited with {status}: {}",
                    stderr(&out)
                );
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the --insecure replica did not answer within {START_TIMEOUT:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        drop(child.stdin.take());
        let out = child.wait_with_output().await.unwrap();
        assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
        assert!(
            stderr(&out).contains("--insecure"),
            "an --insecure start should say so in its log: {}",
            describe(&out)
        );
        let _ = std::fs::remove_dir_all(&dir);
    })
    .await;
}

/// Every path under `dir` (itself included) whose mode is not 0700 for a
/// directory or 0600 for a file, with its mode.
fn loose_modes(dir: &Path) -> Vec<(PathBuf, u32)> {
    let mut loose = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(path) = todo.pop() {
        let meta =
            std::fs::symlink_metadata(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let mode = meta.permissions().mode() & 0o7777;
        let wanted = if meta.is_dir() { 0o700 } else { 0o600 };
        if mode != wanted {
            loose.push((path.clone(), mode));
        }
        if meta.is_dir() {
            for entry in std::fs::read_dir(&path).unwrap() {
                todo.push(entry.unwrap().path());
            }
        }
    }
    loose
}

fn has_snapshot(dir: &Path) -> bool {
    std::fs::read_dir(dir).is_ok_and(|entries| {
        entries.flatten().any(|e| {
            let name = e.file_name();
            let name = name.to_string_lossy();
            name.starts_with("snapshot-") && name.ends_with(".snap")
        })
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_data_directory_is_0700_and_its_files_0600() {
    bounded(Duration::from_secs(120), "data directory modes", async {
        let mut cluster = Cluster::start_with_args(3, &["--snapshot-every", "10"]).await;
        let client = cluster.client();
        for i in 0..40 {
            client
                .put(format!("k{i}"), format!("v{i}"))
                .await
                .unwrap_or_else(|e| panic!("put {i}: {e}"));
        }
        let applied = cluster.max_applied().await;
        cluster
            .wait_all_applied(applied, Duration::from_secs(30))
            .await;
        for id in cluster.ids() {
            let dir = cluster.data_dir(id).to_path_buf();
            wait_until(
                Duration::from_secs(30),
                "a snapshot in every data directory",
                || {
                    let dir = dir.clone();
                    async move { has_snapshot(&dir) }
                },
            )
            .await;
            let loose = loose_modes(&dir);
            assert!(
                loose.is_empty(),
                "replica {id}: {}",
                loose
                    .iter()
                    .map(|(p, m)| format!("{} is {m:o}", p.display()))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }

        // A directory (and files) left looser, e.g. by an older version or
        // by hand, are tightened at the next start, with a warning.
        cluster.kill(1);
        let dir = cluster.data_dir(1).to_path_buf();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        let wal = dir.join("wal");
        std::fs::set_permissions(&wal, std::fs::Permissions::from_mode(0o755)).unwrap();
        let segment = std::fs::read_dir(&wal)
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .find(|p| p.is_file())
            .expect("a WAL segment");
        std::fs::set_permissions(&segment, std::fs::Permissions::from_mode(0o644)).unwrap();
        let log_before = cluster.log_text(1).len();
        cluster.spawn(1);
        cluster.wait_answers(1, START_TIMEOUT).await;
        let loose = loose_modes(&dir);
        assert!(loose.is_empty(), "after a restart: {loose:?}");
        let log = cluster.log_text(1)[log_before..].to_string();
        assert!(
            log.contains("WARN") && log.contains("were accessible to other users"),
            "no warning about the loose data directory: {log}"
        );
    })
    .await;
}
