//! Writes and reads need a majority: with any two of five replicas down
//! they succeed, with three down they fail fast with exit code 3 (never
//! hang), and once a majority is back they succeed again.

use std::time::{Duration, Instant};

use kv_tests::{bounded, describe, run_bin, wait_until, Cluster};

/// The `--timeout` the CLI gets where it must give up.
const TIMEOUT: Duration = Duration::from_secs(2);
/// What process start and a loaded machine (several clusters on two cores)
/// may add to it. `TIMEOUT + SLACK` is the CLI's default timeout, 5 s: the
/// bound still fails a CLI that ignores `--timeout`, or hangs.
const SLACK: Duration = Duration::from_secs(3);
/// Bound on one run of the CLI, past which it is killed.
const RUN_LIMIT: Duration = Duration::from_secs(30);

/// Puts `key=value` through the CLI, retrying until it succeeds (the
/// cluster may be electing a new leader).
async fn put_eventually(cluster: &Cluster, key: &str, value: &str, what: &str) {
    wait_until(Duration::from_secs(30), what, || async {
        cluster
            .cli(&["--timeout", "5", "put", key, value])
            .await
            .status
            .success()
    })
    .await;
}

/// Puts and reads back a few keys, each of which must succeed at once.
async fn puts_and_gets_succeed(cluster: &Cluster, tag: &str) {
    for i in 0..3 {
        let key = format!("{tag}-{i}");
        let value = format!("value-{tag}-{i}");
        cluster
            .cli_ok(&["--timeout", "10", "put", &key, &value])
            .await;
        assert_eq!(
            cluster.cli_ok(&["--timeout", "10", "get", &key]).await,
            format!("{value}\n"),
            "get {key}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn any_two_down_still_serves_three_down_fails_fast_with_exit_3() {
    let mut cluster = Cluster::start(5).await;
    let test = async {
        cluster
            .cli_ok(&["--timeout", "10", "put", "before", "1"])
            .await;
        let leader = cluster.wait_for_leader(Duration::from_secs(20)).await;
        let followers: Vec<u64> = cluster.ids().into_iter().filter(|&i| i != leader).collect();

        // Two followers down: the leader keeps a majority.
        cluster.kill_all(&[followers[0], followers[1]]);
        put_eventually(
            &cluster,
            "two-followers-down",
            "x",
            "a put with two followers down",
        )
        .await;
        puts_and_gets_succeed(&cluster, "two-followers-down").await;
        cluster.restart(followers[0]).await;
        cluster.restart(followers[1]).await;

        // The leader and a follower down: a new leader must take over.
        let leader = cluster.wait_for_leader(Duration::from_secs(20)).await;
        let followers: Vec<u64> = cluster.ids().into_iter().filter(|&i| i != leader).collect();
        cluster.kill_all(&[leader, followers[0]]);
        put_eventually(
            &cluster,
            "leader-down",
            "x",
            "a put with the leader and a follower down",
        )
        .await;
        puts_and_gets_succeed(&cluster, "leader-down").await;
        assert_eq!(
            cluster.cli_ok(&["--timeout", "10", "get", "before"]).await,
            "1\n"
        );

        // `--server` naming a dead replica: no retry elsewhere, exit 3 in time.
        let dead = cluster.client_addr(leader).to_string();
        let args = [
            "--server",
            &dead,
            "--timeout",
            "2",
            "put",
            "to-the-dead",
            "x",
        ];
        let (out, took) = run_bin(kv_tests::kv_client_cli(args), RUN_LIMIT)
            .await
            .unwrap_or_else(|e| panic!("kv-client {args:?} hung: {e}"));
        assert_eq!(
            out.status.code(),
            Some(3),
            "put via a dead replica: {}",
            describe(&out)
        );
        assert!(
            took < TIMEOUT + SLACK,
            "put via a dead replica took {took:?} with --timeout 2"
        );

        // Three down: no quorum. The CLI must give up within its timeout.
        cluster.kill(followers[1]);
        let file = cluster.replicas_file().to_str().unwrap().to_string();
        for args in [
            vec![
                "--replicas",
                &file,
                "--timeout",
                "2",
                "put",
                "no-quorum",
                "x",
            ],
            vec!["--replicas", &file, "--timeout", "2", "get", "before"],
        ] {
            let cmd = kv_tests::kv_client_cli(&args);
            let (out, took) = run_bin(cmd, RUN_LIMIT)
                .await
                .unwrap_or_else(|e| panic!("kv-client {args:?} hung without a quorum: {e}"));
            eprintln!(
                "kv-client {args:?} without a quorum: exit {:?} after {took:?}",
                out.status.code()
            );
            assert_eq!(
                out.status.code(),
                Some(3),
                "kv-client {args:?} without a quorum: {}",
                describe(&out)
            );
            assert!(
                took < TIMEOUT + SLACK,
                "kv-client {args:?} took {took:?} with --timeout 2 (bound: {:?})",
                TIMEOUT + SLACK
            );
        }

        // One back: a majority again, writes succeed.
        let back_at = Instant::now();
        cluster.restart(followers[1]).await;
        put_eventually(
            &cluster,
            "majority-back",
            "y",
            "a put after a majority is back",
        )
        .await;
        eprintln!(
            "writes resumed {:?} after restarting the third replica",
            back_at.elapsed()
        );
        puts_and_gets_succeed(&cluster, "majority-back").await;
        assert_eq!(
            cluster
                .cli_ok(&["--timeout", "10", "get", "leader-down-0"])
                .await,
            "value-leader-down-0\n"
        );
    };
    bounded(Duration::from_secs(150), "the test", test).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paused_majority_makes_the_cli_time_out_with_exit_3_and_local_reads_still_work() {
    let mut cluster = Cluster::start(5).await;
    let test = async {
        cluster
            .cli_ok(&["--timeout", "10", "put", "before", "1"])
            .await;
        let applied = cluster.max_applied().await;
        cluster
            .wait_all_applied(applied, Duration::from_secs(20))
            .await;

        // SIGSTOP keeps the sockets open: connections are accepted by the
        // kernel and then nothing answers. The CLI must still give up in time.
        let leader = cluster.wait_for_leader(Duration::from_secs(20)).await;
        let followers: Vec<u64> = cluster.ids().into_iter().filter(|&i| i != leader).collect();
        let paused = [leader, followers[0], followers[1]];
        let awake = followers[2];
        for id in paused {
            cluster.pause(id);
        }
        let file = cluster.replicas_file().to_str().unwrap().to_string();
        for args in [
            vec![
                "--replicas",
                &file,
                "--timeout",
                "2",
                "put",
                "no-quorum",
                "x",
            ],
            vec!["--replicas", &file, "--timeout", "2", "get", "before"],
        ] {
            let (out, took) = run_bin(kv_tests::kv_client_cli(&args), RUN_LIMIT)
                .await
                .unwrap_or_else(|e| panic!("kv-client {args:?} hung with a paused majority: {e}"));
            eprintln!(
                "kv-client {args:?} with a paused majority: exit {:?} after {took:?}",
                out.status.code()
            );
            assert_eq!(out.status.code(), Some(3), "{args:?}: {}", describe(&out));
            assert!(
                took < TIMEOUT + SLACK,
                "{args:?} took {took:?} with --timeout 2 (bound: {:?})",
                TIMEOUT + SLACK
            );
        }

        // A local read needs no quorum: the awake replica answers from its state.
        let out = cluster
            .cli_at(awake, &["--timeout", "2", "get", "--local", "before"])
            .await;
        assert!(
            out.status.success(),
            "local get on the awake replica {awake}: {}",
            describe(&out)
        );
        assert_eq!(String::from_utf8_lossy(&out.stdout), "1\n");

        for id in paused {
            cluster.resume(id);
        }
        put_eventually(
            &cluster,
            "after-resume",
            "z",
            "a put after resuming the majority",
        )
        .await;
        puts_and_gets_succeed(&cluster, "after-resume").await;
        assert_eq!(
            cluster.cli_ok(&["--timeout", "10", "get", "before"]).await,
            "1\n"
        );
    };
    bounded(Duration::from_secs(120), "the test", test).await;
}
