//! Bad input is refused cleanly: a malformed replica file or unknown id at
//! start-up (exit 2, naming the file and line), a data directory that cannot
//! be created (a clear message, no panic), oversized keys and values (exit 2
//! from the CLI, before anything is sent), and garbage bytes on a replica's
//! ports (that connection is closed; the cluster keeps serving).

use std::path::Path;
use std::time::Duration;

use kv_tests::{
    bounded, describe, free_ports, kv_client_cli, kv_server_cmd, run_bin, run_bin_with_input,
    temp_dir, Cluster,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A start-up that is refused must be refused at once, not after serving.
const REFUSAL_BOUND: Duration = Duration::from_secs(15);

/// A valid replica file's lines for three replicas on fresh ports.
fn valid_lines() -> Vec<String> {
    let p = free_ports(6);
    (0..3)
        .map(|i| {
            format!(
                "{} 127.0.0.1:{} 127.0.0.1:{}",
                i + 1,
                p[2 * i],
                p[2 * i + 1]
            )
        })
        .collect()
}

/// Runs `kv-server ARGS` and returns its output; fails the test if it does
/// not exit by itself within [`REFUSAL_BOUND`].
async fn server_refusal(args: &[&str]) -> std::process::Output {
    let (out, _) = run_bin(kv_server_cmd(args), REFUSAL_BOUND)
        .await
        .unwrap_or_else(|e| panic!("kv-server {args:?} should have refused to start: {e}"));
    out
}

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_replica_file_is_refused_with_exit_2_naming_file_and_line() {
    let dir = temp_dir("bad-replica-file");
    let lines = valid_lines();
    let cases: Vec<(&str, String, usize)> = vec![
        (
            "bad-line",
            format!("# three replicas\n{}\n1 127.0.0.1:9\n", lines[0]),
            3,
        ),
        (
            "not-a-number",
            format!("{}\nthree 127.0.0.1:1 127.0.0.1:2\n", lines[0]),
            2,
        ),
        (
            "duplicate-id",
            format!(
                "{}\n{}\n\n{}\n",
                lines[0],
                lines[1],
                lines[2].replacen("3 ", "1 ", 1)
            ),
            4,
        ),
        (
            "duplicate-address",
            {
                let addr = lines[0].split_whitespace().nth(1).unwrap();
                format!("{}\n2 127.0.0.1:1 {addr}\n", lines[0])
            },
            2,
        ),
    ];
    for (name, text, line) in cases {
        let file = dir.join(format!("{name}.replica"));
        std::fs::write(&file, &text).unwrap();
        let data = dir.join(format!("data-{name}"));
        let out = bounded(
            REFUSAL_BOUND * 2,
            name,
            server_refusal(&[
                "--id",
                "1",
                "--replicas",
                file.to_str().unwrap(),
                "--data-dir",
                data.to_str().unwrap(),
            ]),
        )
        .await;
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(2), "{name}: {}", describe(&out));
        let at = format!("{name}.replica:{line}");
        assert!(
            err.contains(&at),
            "{name}: stderr should name the file and line ({at}): {err}"
        );
        assert!(!err.contains("panicked"), "{name}: {err}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_replica_id_is_refused_with_exit_2() {
    let dir = temp_dir("unknown-id");
    let file = dir.join("replica");
    std::fs::write(&file, valid_lines().join("\n") + "\n").unwrap();
    let out = server_refusal(&[
        "--id",
        "9",
        "--replicas",
        file.to_str().unwrap(),
        "--data-dir",
        dir.join("data").to_str().unwrap(),
    ])
    .await;
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(2), "{}", describe(&out));
    // The exact message: the unknown id, the file, and the ids it holds.
    let ids: Vec<String> = valid_lines()
        .iter()
        .map(|l| l.split_whitespace().next().unwrap().to_string())
        .collect();
    assert_eq!(
        err.trim_end(),
        format!(
            "kv-server: invalid configuration: --id 9 is not in {} (its ids are {})",
            file.display(),
            ids.join(", ")
        ),
        "stderr should name the unknown id, the file and its ids"
    );
    assert!(!err.contains("panicked"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_dir_that_cannot_be_created_fails_with_a_message_not_a_panic() {
    let dir = temp_dir("bad-data-dir");
    let file = dir.join("replica");
    std::fs::write(&file, valid_lines().join("\n") + "\n").unwrap();
    // A regular file where a directory would have to be.
    let blocker = dir.join("not-a-directory");
    std::fs::write(&blocker, "just a file\n").unwrap();
    let data = blocker.join("data");
    let out = server_refusal(&[
        "--id",
        "1",
        "--replicas",
        file.to_str().unwrap(),
        "--data-dir",
        data.to_str().unwrap(),
    ])
    .await;
    let err = stderr(&out);
    assert!(!out.status.success(), "{}", describe(&out));
    assert!(!err.contains("panicked"), "{err}");
    assert!(
        err.contains("not-a-directory"),
        "stderr should name the data directory: {err}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// Runs the CLI against a replica file whose replicas are not running: a
/// refusal must come from the CLI itself (exit 2), before it tries to
/// connect (which would end in exit 3).
async fn cli_without_cluster(replicas: &Path, args: &[&str]) -> std::process::Output {
    let mut full = vec!["--replicas", replicas.to_str().unwrap(), "--timeout", "2"];
    full.extend_from_slice(args);
    let (out, _) = run_bin(kv_client_cli(&full), Duration::from_secs(15))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_refuses_oversized_key_and_value_with_exit_2() {
    let dir = temp_dir("oversized");
    let file = dir.join("replica");
    std::fs::write(&file, valid_lines().join("\n") + "\n").unwrap();

    let long_key = "k".repeat(1025);
    let out = cli_without_cluster(&file, &["put", &long_key, "v"]).await;
    assert_eq!(
        out.status.code(),
        Some(2),
        "a 1025-byte key: {}",
        describe(&out)
    );
    let out = cli_without_cluster(&file, &["get", &long_key]).await;
    assert_eq!(
        out.status.code(),
        Some(2),
        "get of a 1025-byte key: {}",
        describe(&out)
    );

    // A value over 1 MiB, through stdin (`put KEY -`): one command-line
    // argument is limited to 128 KiB on Linux.
    let (out, _) = run_bin_with_input(
        kv_client_cli([
            "--replicas",
            file.to_str().unwrap(),
            "--timeout",
            "2",
            "put",
            "big",
            "-",
        ]),
        Some(vec![b'v'; (1 << 20) + 1]),
        Duration::from_secs(15),
    )
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        out.status.code(),
        Some(2),
        "a value of 1 MiB + 1 on stdin: {}",
        describe(&out)
    );

    // The SDK refuses them too, without a cluster.
    let client = kv_client::Client::builder()
        .replicas(kv_api::replicas::Replicas::load(&file).unwrap())
        .timeout(Duration::from_secs(2))
        .build()
        .unwrap();
    let e = client.put(long_key.as_str(), "v").await.unwrap_err();
    assert!(
        matches!(e, kv_client::Error::InvalidArgument { .. }),
        "{e:?}"
    );
    let e = client
        .put("k", vec![b'v'; (1 << 20) + 1])
        .await
        .unwrap_err();
    assert!(
        matches!(e, kv_client::Error::InvalidArgument { .. }),
        "{e:?}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// Connects to `addr`, sends `garbage`, and waits for the replica to close
/// the connection (EOF or reset); panics if it stays open for 5 s.
async fn garbage_connection_is_closed(addr: &str, garbage: &[u8], what: &str) {
    let mut stream = tokio::net::TcpStream::connect(addr)
        .await
        .unwrap_or_else(|e| panic!("{what}: connect to {addr}: {e}"));
    // A write error means the replica already closed it: fine.
    let _ = stream.write_all(garbage).await;
    let _ = stream.flush().await;
    let closed = tokio::time::timeout(Duration::from_secs(5), async {
        let mut buf = [0u8; 4096];
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(
        closed.is_ok(),
        "{what}: the replica kept the connection open 5 s after receiving garbage"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_on_client_and_peer_ports_closes_only_that_connection() {
    let mut cluster = Cluster::start(5).await;
    let test = async {
        cluster
            .cli_ok(&["--timeout", "10", "put", "before", "1"])
            .await;
        let leader = cluster.wait_for_leader(Duration::from_secs(20)).await;
        let follower = cluster.ids().into_iter().find(|&i| i != leader).unwrap();

        // A length prefix that is fine followed by bytes that decode to
        // nothing, and a length prefix far over any frame limit.
        let mut bad_body = 64u32.to_be_bytes().to_vec();
        bad_body.extend_from_slice(&[0xff; 64]);
        let mut huge = u32::MAX.to_be_bytes().to_vec();
        huge.extend_from_slice(b"not a frame at all");
        let mut random = vec![0u8; 4096];
        rand::Rng::fill(&mut rand::rng(), &mut random[..]);

        for id in [leader, follower] {
            for (port, addr) in [
                ("client", cluster.client_addr(id).to_string()),
                ("peer", cluster.peer_addr(id).to_string()),
            ] {
                for (kind, bytes) in [("undecodable frame", &bad_body), ("oversized frame", &huge)]
                {
                    let what = format!("{kind} on replica {id}'s {port} port");
                    garbage_connection_is_closed(&addr, bytes, &what).await;
                }
                // Random bytes may look like the start of a long frame, so
                // the connection may stay open; only send them.
                if let Ok(mut s) = tokio::net::TcpStream::connect(&addr).await {
                    let _ = s.write_all(&random).await;
                }
            }
        }

        // Every replica is still up, and the cluster serves.
        for id in cluster.ids() {
            cluster.assert_alive(id);
        }
        cluster
            .cli_ok(&["--timeout", "10", "put", "after", "2"])
            .await;
        assert_eq!(
            cluster.cli_ok(&["--timeout", "10", "get", "after"]).await,
            "2\n"
        );
        assert_eq!(
            cluster.cli_ok(&["--timeout", "10", "get", "before"]).await,
            "1\n"
        );
        let applied = cluster.max_applied().await;
        cluster
            .wait_all_applied(applied, Duration::from_secs(20))
            .await;
        for id in cluster.ids() {
            cluster.assert_alive(id);
        }
    };
    bounded(Duration::from_secs(90), "the test", test).await;
}
