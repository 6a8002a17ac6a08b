//! TLS and authorization against real processes, with certificates made by
//! `kv-server certs` in the test: who is refused (a plain client, a
//! certificate from another CA, an expired one, a forged peer, a role that
//! does not allow the command), that each refusal closes only its own
//! connection with a log line saying who and why, and that the cluster's
//! data is unchanged and it keeps serving. The rest of the suite runs on
//! TLS clusters with `KV_TEST_TLS=1`.

use std::path::Path;
use std::time::Duration;

use kv_api::tls::{Tls, TlsFiles};
use kv_api::{ReplicaId, MAX_FRAME};
use kv_peer_api::{Accept, Ballot, PeerClient, Prepare, Value};
use kv_tests::{bounded, describe, make_certs, tls_args, tls_files, wait_until, Cluster};
use tarpc::tokio_serde::formats::Bincode;
use tarpc::tokio_util::codec::LengthDelimitedCodec;

/// A peer-protocol client of replica `to` over TLS with identity `files`.
async fn peer_client(addr: &str, files: &TlsFiles, to: ReplicaId) -> PeerClient {
    let tls = Tls::load(files).expect("load TLS files");
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let stream = kv_api::tls::connect(
        tls.client_config().unwrap(),
        kv_api::tls::replica_server_name(to),
        tcp,
    )
    .await
    .expect("TLS handshake with the replica");
    let framed = LengthDelimitedCodec::builder()
        .max_frame_length(MAX_FRAME)
        .new_framed(stream);
    let transport = tarpc::serde_transport::new(framed, Bincode::default());
    PeerClient::new(tarpc::client::Config::default(), transport).spawn()
}

fn ctx() -> tarpc::context::Context {
    let mut c = tarpc::context::current();
    c.deadline = std::time::Instant::now() + Duration::from_secs(5);
    c
}

/// `kv-client` with identity `name` of `dir` (none: plain), against the
/// whole cluster.
async fn cli_as(
    cluster: &Cluster,
    dir: Option<&Path>,
    name: &str,
    args: &[&str],
) -> std::process::Output {
    cli_with(cluster, dir.map(|d| tls_files(d, name)), args).await
}

/// `kv-client` with these TLS files (none: plain), against the whole
/// cluster unless `args` name a `--server`.
async fn cli_with(
    cluster: &Cluster,
    files: Option<TlsFiles>,
    args: &[&str],
) -> std::process::Output {
    let mut cmd = tokio::process::Command::new(kv_tests::bin_path("kv-client"));
    if let Some(f) = files {
        cmd.arg("--tls-ca").arg(f.ca);
        cmd.arg("--tls-cert").arg(f.cert);
        cmd.arg("--tls-key").arg(f.key);
    }
    if !args.contains(&"--server") {
        cmd.arg("--replicas").arg(cluster.replicas_file());
    }
    cmd.args(args);
    kv_tests::run_bin(cmd, Duration::from_secs(20))
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .0
}

/// Waits until replica `id`'s log has a line containing every one of
/// `parts`.
async fn wait_log(cluster: &Cluster, id: ReplicaId, parts: &[&str]) {
    wait_until(
        Duration::from_secs(10),
        &format!("replica {id} to log {parts:?}"),
        || async {
            cluster
                .log_text(id)
                .lines()
                .any(|l| parts.iter().all(|p| l.contains(p)))
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strangers_forged_peers_and_lesser_roles_are_refused_and_nothing_changes() {
    let mut cluster = Cluster::start_tls(5, &[]).await;
    let tls = cluster.tls_dir().unwrap().to_path_buf();
    let root = cluster.dir().to_path_buf();
    // Another CA, never trusted; and a CA trusted alongside the cluster's
    // (as during a rotation) whose certificates have all expired.
    let stranger = root.join("stranger");
    make_certs(cluster.replicas_file(), &stranger);
    let expired = root.join("expired");
    let out = std::process::Command::new(kv_tests::bin_path("kv-server"))
        .args([
            "certs",
            "--days",
            "1",
            "--backdate-days",
            "30",
            "--replicas",
        ])
        .arg(cluster.replicas_file())
        .arg("--out")
        .arg(&expired)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", describe(&out));
    // Rotation, step one: every replica trusts both CAs, restarted one at
    // a time while the others serve.
    let mut bundle = std::fs::read(tls.join("ca.pem")).unwrap();
    bundle.extend(std::fs::read(expired.join("ca.pem")).unwrap());
    std::fs::write(tls.join("ca.pem"), bundle).unwrap();
    for id in cluster.ids() {
        cluster.restart(id).await;
    }
    cluster.wait_ready(kv_tests::START_TIMEOUT).await;

    let test = async {
        let writer = cluster
            .builder()
            .tls(tls_files(&tls, "writer"))
            .replicas(cluster.replicas().clone())
            .build()
            .unwrap();
        // The whole CLI over TLS: one-shot commands, the shell, bench.
        for args in [
            &["put", "cli", "1"][..],
            &["cas", "cli", "2", "--expect", "1"],
            &["get", "--local", "cli"],
            &["delete", "cli"],
            &["status"],
            &["fault", "--all"],
        ] {
            let out = cli_as(&cluster, Some(&tls), "admin", args).await;
            assert!(out.status.success(), "{args:?}: {}", describe(&out));
        }
        let mut shell = cluster.cli_command();
        shell.args([
            "--replicas",
            cluster.replicas_file().to_str().unwrap(),
            "shell",
        ]);
        let (out, _) = kv_tests::run_bin_with_input(
            shell,
            Some(b"put sh 1\nget sh\n".to_vec()),
            Duration::from_secs(20),
        )
        .await
        .unwrap_or_else(|e| panic!("{e}"));
        assert!(
            String::from_utf8_lossy(&out.stdout).contains('1'),
            "{}",
            describe(&out)
        );
        let bench = [
            "bench",
            "--secs",
            "1",
            "--clients",
            "2",
            "--op",
            "mixed",
            "--output",
            "json",
        ];
        let out = cli_as(&cluster, Some(&tls), "writer", &bench).await;
        assert!(out.status.success(), "{}", describe(&out));
        assert!(
            String::from_utf8_lossy(&out.stdout).contains("\"errors\":0"),
            "{}",
            describe(&out)
        );

        writer.put("k", "v").await.unwrap();
        cluster.wait_applied_equal(0, Duration::from_secs(10)).await;
        let before = cluster.statuses().await;
        let keys_before: Vec<u64> = before.values().map(|s| s.as_ref().unwrap().keys).collect();

        // Roles: read may read, not write; write may not inject faults.
        let out = cli_as(&cluster, Some(&tls), "reader", &["get", "k"]).await;
        assert!(out.status.success(), "{}", describe(&out));
        assert_eq!(String::from_utf8_lossy(&out.stdout), "v\n");
        let out = cli_as(&cluster, Some(&tls), "reader", &["put", "k", "reader"]).await;
        assert_eq!(out.status.code(), Some(4), "{}", describe(&out));
        assert!(
            String::from_utf8_lossy(&out.stderr).contains(
                "permission denied: 127.0.0.1:"
            ) && String::from_utf8_lossy(&out.stderr)
                .contains("writing needs the `write` role; this client's certificate grants only the `read` role"),
            "{}",
            describe(&out)
        );
        let out = cli_as(
            &cluster,
            Some(&tls),
            "writer",
            &["fault", "--all", "--drop-rate", "1"],
        )
        .await;
        assert_eq!(out.status.code(), Some(4), "{}", describe(&out));
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("fault injection needs the `admin` role"),
            "{}",
            describe(&out)
        );
        // Nor may it change the cluster's members.
        let out = cli_as(&cluster, Some(&tls), "writer", &["member", "remove", "5"]).await;
        assert_eq!(out.status.code(), Some(4), "{}", describe(&out));
        assert!(
            String::from_utf8_lossy(&out.stderr)
                .contains("changing the cluster's members needs the `admin` role"),
            "{}",
            describe(&out)
        );
        // A replica's certificate is no client's.
        let out = cli_as(&cluster, Some(&tls), "replica-1", &["get", "k"]).await;
        assert_eq!(out.status.code(), Some(4), "{}", describe(&out));

        // No certificate, another CA's, an expired one: no connection at
        // all, and one line in the replica's log saying who and why.
        // Each at its own replica: the SDK redials all along its budget,
        // and a replica logs at most 20 failed handshakes per 10 s.
        let plain = [
            "--server",
            cluster.client_addr(1),
            "--timeout",
            "2",
            "put",
            "k",
            "x",
        ];
        let out = cli_with(&cluster, None, &plain).await;
        assert_eq!(out.status.code(), Some(3), "{}", describe(&out));
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("is the replica serving TLS?"),
            "{}",
            describe(&out)
        );
        wait_log(
            &cluster,
            1,
            &["TLS handshake failed", "from=127.0.0.1:", "port=client"],
        )
        .await;
        // (The client trusts the cluster's CA, so that it is the replica
        // that refuses the client, not the other way round.)
        let presenting = |dir: &Path| TlsFiles {
            ca: tls.join("ca.pem"),
            ..tls_files(dir, "admin")
        };
        let at = |id| {
            [
                "--server",
                cluster.client_addr(id),
                "--timeout",
                "2",
                "put",
                "k",
                "x",
            ]
        };
        let out = cli_with(&cluster, Some(presenting(&stranger)), &at(2)).await;
        assert_eq!(out.status.code(), Some(3), "{}", describe(&out));
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("received fatal alert: UnknownCA"),
            "the client is told why: {}",
            describe(&out)
        );
        wait_log(&cluster, 2, &["TLS handshake failed", "UnknownIssuer"]).await;
        let out = cli_with(&cluster, Some(presenting(&expired)), &at(3)).await;
        assert_eq!(out.status.code(), Some(3), "{}", describe(&out));
        wait_log(
            &cluster,
            3,
            &["TLS handshake failed", "certificate expired"],
        )
        .await;

        // Garbage on both TLS ports of replica 4: random bytes, and a TLS
        // record header announcing more than it sends, on fresh connections.
        {
            use rand::{Rng, SeedableRng};
            use tokio::io::AsyncWriteExt;
            let mut rng = rand::rngs::StdRng::seed_from_u64(11);
            for round in 0..40 {
                for addr in [cluster.client_addr(4), cluster.peer_addr(4)] {
                    let mut bytes: Vec<u8> = (0..rng.random_range(1..512))
                        .map(|_| rng.random())
                        .collect();
                    if round % 2 == 0 {
                        bytes.splice(0..0, [0x16, 0x03, 0x01, 0xff, 0xff]);
                    }
                    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
                    let _ = s.write_all(&bytes).await;
                }
            }
            wait_log(&cluster, 4, &["TLS handshake failed", "port=peer"]).await;
            let only_4 = cluster
                .builder()
                .tls(tls_files(&tls, "reader"))
                .addrs(vec![cluster.client_addr(4).to_string()])
                .build()
                .unwrap();
            assert_eq!(only_4.get("k").await.unwrap(), Some(b"v".to_vec()));
        }

        // A forged peer: a valid certificate (replica 2's) whose messages
        // claim to come from replica 3. Refused, and logged.
        let forged = peer_client(cluster.peer_addr(1), &tls_files(&tls, "replica-2"), 1).await;
        let high = Ballot {
            round: 1_000_000,
            id: 3,
        };
        let promise = forged
            .prepare(
                ctx(),
                Prepare {
                    from: 3,
                    ballot: high,
                    from_slot: 0,
                    pre_vote: false,
                },
            )
            .await
            .unwrap();
        assert!(!promise.ok, "a forged prepare was promised: {promise:?}");
        let accepted = forged
            .accept(
                ctx(),
                Accept {
                    from: 3,
                    ballot: high,
                    entries: vec![(1_000, Value::Noop)],
                    chosen: 0,
                },
            )
            .await
            .unwrap();
        assert!(!accepted.ok, "a forged accept was accepted: {accepted:?}");
        wait_log(
            &cluster,
            1,
            &["claiming to come from replica 3", "Replica(2)"],
        )
        .await;
        let status = cluster.status(1).await.unwrap();
        assert!(
            status.ballot_round < high.round,
            "replica 1 took the forged ballot: {status:?}"
        );
        // A client's certificate on the peer port: closed at once.
        let admin_as_peer = peer_client(cluster.peer_addr(2), &tls_files(&tls, "admin"), 2).await;
        let r = admin_as_peer
            .prepare(
                ctx(),
                Prepare {
                    from: 1,
                    ballot: high,
                    from_slot: 0,
                    pre_vote: false,
                },
            )
            .await;
        assert!(
            r.is_err(),
            "a client certificate spoke the peer protocol: {r:?}"
        );
        wait_log(&cluster, 2, &["names no replica of this cluster"]).await;

        // Nothing changed, and the cluster still serves.
        assert_eq!(writer.get("k").await.unwrap(), Some(b"v".to_vec()));
        cluster.wait_applied_equal(0, Duration::from_secs(10)).await;
        let after = cluster.statuses().await;
        let keys_after: Vec<u64> = after.values().map(|s| s.as_ref().unwrap().keys).collect();
        assert_eq!(keys_before, keys_after);
        writer.put("k2", "after").await.unwrap();
        let out = cli_as(&cluster, Some(&tls), "reader", &["get", "k2"]).await;
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            "after\n",
            "{}",
            describe(&out)
        );
        for id in cluster.ids() {
            cluster.assert_alive(id);
        }
    };
    bounded(Duration::from_secs(120), "the test", test).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_given_another_replicas_certificate_refuses_to_start() {
    let mut cluster = Cluster::start_tls(1, &[]).await;
    let tls = cluster.tls_dir().unwrap();
    let dir = cluster.dir().join("other");
    let mut args = vec![
        "--id".to_string(),
        "1".into(),
        "--replicas".into(),
        cluster.replicas_file().to_str().unwrap().into(),
        "--data-dir".into(),
        dir.to_str().unwrap().into(),
    ];
    let mut wrong = tls_args(tls, "replica-1");
    // replica-1's CA, but the admin client's certificate and key.
    wrong[3] = tls.join("admin.pem").to_str().unwrap().into();
    wrong[5] = tls.join("admin.key").to_str().unwrap().into();
    args.extend(wrong);
    let (out, _) = kv_tests::run_bin(kv_tests::kv_server_cmd(&args), Duration::from_secs(20))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(out.status.code(), Some(2), "{}", describe(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("admin.pem: the certificate does not name replica-1"),
        "{err}"
    );

    // A private key others can read is served, with a warning.
    use std::os::unix::fs::PermissionsExt;
    let key = tls.join("replica-1.key");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    cluster.restart(1).await;
    wait_log(
        &cluster,
        1,
        &["the private key is readable by other users", "mode=644"],
    )
    .await;
}
