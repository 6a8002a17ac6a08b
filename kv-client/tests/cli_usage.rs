//! The `kv-client` command line: usage errors, input checks and the
//! behaviour without any server. No test needs a running cluster, none
//! uses a fixed port, and every run of the binary is bounded in time.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_kv-client");

/// The outcome of one run of the binary.
struct Run {
    code: i32,
    stdout: String,
    stderr: String,
    took: Duration,
}

/// Runs the binary in `cwd`, killing it (and failing) after 20 s.
fn run_in(cwd: &Path, args: &[&str]) -> Run {
    let started = Instant::now();
    let mut child = Command::new(BIN)
        .args(args)
        .current_dir(cwd)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start kv-client");
    loop {
        if child.try_wait().expect("wait for kv-client").is_some() {
            break;
        }
        if started.elapsed() > Duration::from_secs(20) {
            let _ = child.kill();
            let _ = child.wait();
            panic!("kv-client {args:?} did not finish within 20 s");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let took = started.elapsed();
    let out = child.wait_with_output().expect("collect kv-client output");
    Run {
        code: out.status.code().expect("kv-client was killed by a signal"),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        took,
    }
}

fn run(args: &[&str]) -> Run {
    run_in(&std::env::temp_dir(), args)
}

/// What process start and exit may add on a loaded machine (several test
/// binaries on two cores) to the time a run is allowed.
const SLACK: Duration = Duration::from_secs(3);
/// The `--timeout` a run gets when none is given.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);

/// Asserts that `r` gave up within `timeout` (zero: it had nothing to wait
/// for) plus [`SLACK`]. Kept under the default timeout, so a run that
/// ignores its `--timeout`, or contacts a replica it should not, still
/// fails.
#[track_caller]
fn assert_within(r: &Run, timeout: Duration, what: &str) {
    let bound = timeout + SLACK;
    assert!(
        bound < DEFAULT_TIMEOUT,
        "a bound of {bound:?} would not tell"
    );
    assert!(r.took < bound, "{what} took {:?} (bound {bound:?})", r.took);
}

/// A fresh, empty directory for one test.
fn temp_dir(name: &str) -> PathBuf {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let dir = std::env::temp_dir().join(format!(
        "kv-client-cli-{name}-{}-{nanos}",
        std::process::id()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Ports on 127.0.0.1 that nothing listens on (bound, then released).
fn dead_ports(n: usize) -> Vec<u16> {
    let listeners: Vec<_> = (0..n)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    listeners
        .iter()
        .map(|l| l.local_addr().unwrap().port())
        .collect()
}

/// A replica file of five replicas whose addresses have nothing listening.
fn dead_replica_file(dir: &Path) -> PathBuf {
    let ports = dead_ports(10);
    let mut text = String::from("# nothing listens here\n");
    for i in 0..5 {
        text.push_str(&format!(
            "{} 127.0.0.1:{} 127.0.0.1:{}\n",
            i + 1,
            ports[i],
            ports[i + 5]
        ));
    }
    let path = dir.join("replica");
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn bad_usage_exits_2() {
    let cases: &[&[&str]] = &[
        &[],
        &["frobnicate"],
        &["get"],
        &["put", "k"],
        &["put", "k", "v", "extra"],
        &["cas", "k", "new"],
        &["cas", "k", "new", "--expect", "old", "--expect-absent"],
        &["--timeout", "abc", "get", "k"],
        &["--timeout", "0", "get", "k"],
        &["--timeout", "-1", "get", "k"],
        &["--server", "127.0.0.1:1", "--replicas", "replica", "status"],
        &["status", "--bogus"],
    ];
    for args in cases {
        let r = run(args);
        assert_eq!(r.code, 2, "{args:?}: stderr {}", r.stderr);
        assert!(!r.stderr.is_empty(), "{args:?}: no reason given");
        assert!(r.stdout.is_empty(), "{args:?}: stdout {}", r.stdout);
    }
}

#[test]
fn help_explains_every_command_with_examples() {
    let r = run(&["--help"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    for word in [
        "put",
        "get",
        "delete",
        "cas",
        "status",
        "shell",
        "fault",
        "bench",
        "--output",
        "--replicas",
        "--server",
        "--timeout",
    ] {
        assert!(
            r.stdout.contains(word),
            "--help does not mention {word}:\n{}",
            r.stdout
        );
    }
    assert!(
        r.stdout.contains("kv-client put color blue"),
        "{}",
        r.stdout
    );
    for cmd in [
        "put", "get", "delete", "cas", "status", "fault", "shell", "bench",
    ] {
        let r = run(&[cmd, "--help"]);
        assert_eq!(r.code, 0, "{cmd} --help: {}", r.stderr);
        assert!(
            r.stdout.contains("Example"),
            "{cmd} --help has no example:\n{}",
            r.stdout
        );
    }
}

#[test]
fn over_long_key_exits_2_without_a_server() {
    let dir = temp_dir("long-key");
    let replicas = dead_replica_file(&dir);
    let key = "k".repeat(1025);
    // Both with a replica file and with --server: nothing is contacted.
    let file = replicas.to_str().unwrap();
    let server = format!("127.0.0.1:{}", dead_ports(1)[0]);
    for base in [["--replicas", file], ["--server", server.as_str()]] {
        for cmd in [
            vec!["put", key.as_str(), "v"],
            vec!["get", key.as_str()],
            vec!["delete", key.as_str()],
            vec!["cas", key.as_str(), "v", "--expect-absent"],
            vec!["put", "", "v"],
        ] {
            let args: Vec<&str> = base.iter().copied().chain(cmd).collect();
            let r = run(&args);
            assert_eq!(r.code, 2, "{:?}: {}", &args[..3], r.stderr);
            assert!(r.stderr.contains("key"), "{}", r.stderr);
            assert_within(&r, Duration::ZERO, &format!("{:?}", &args[..3]));
        }
    }
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn missing_replica_file_exits_2_naming_the_file() {
    let dir = temp_dir("missing");
    let path = dir.join("no-such-replica-file");
    let r = run(&["--replicas", path.to_str().unwrap(), "get", "k"]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.stderr.contains("no-such-replica-file"), "{}", r.stderr);

    // The default is `replica` in the current directory.
    let r = run_in(&dir, &["get", "k"]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.stderr.contains("replica"), "{}", r.stderr);
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn malformed_replica_file_exits_2_naming_file_and_line() {
    let dir = temp_dir("malformed");
    let path = dir.join("replica");
    std::fs::write(&path, "1 127.0.0.1:7001 127.0.0.1:7101\n2 nonsense\n").unwrap();
    // Also the default file, found relative to the working directory.
    for args in [
        vec!["--replicas", path.to_str().unwrap(), "status"],
        vec!["status"],
    ] {
        let r = run_in(&dir, &args);
        assert_eq!(r.code, 2, "{}", r.stderr);
        assert!(r.stderr.contains("replica:2"), "{}", r.stderr);
    }
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn put_with_no_replica_listening_exits_3_within_the_timeout() {
    let dir = temp_dir("dead-put");
    let replicas = dead_replica_file(&dir);
    let r = run(&[
        "--replicas",
        replicas.to_str().unwrap(),
        "--timeout",
        "1",
        "put",
        "k",
        "v",
    ]);
    assert_eq!(r.code, 3, "{}", r.stderr);
    assert!(r.stdout.is_empty(), "{}", r.stdout);
    // Nothing ever accepted a connection, so the write was never sent.
    assert!(r.stderr.contains("not sent"), "{}", r.stderr);
    assert_within(&r, Duration::from_secs(1), "put with --timeout 1");
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn reads_and_fractional_timeouts_with_no_replica_exit_3_promptly() {
    let dir = temp_dir("dead-get");
    let replicas = dead_replica_file(&dir);
    let file = replicas.to_str().unwrap();
    let server = format!("127.0.0.1:{}", dead_ports(1)[0]);
    for args in [
        vec!["--replicas", file, "--timeout", "0.5", "get", "k"],
        vec![
            "--replicas",
            file,
            "--timeout",
            "0.5",
            "get",
            "--local",
            "k",
        ],
        vec![
            "--server",
            server.as_str(),
            "--timeout",
            "0.5",
            "delete",
            "k",
        ],
        vec![
            "--timeout",
            "0.5",
            "--server",
            server.as_str(),
            "cas",
            "k",
            "n",
            "--expect",
            "o",
        ],
    ] {
        let r = run(&args);
        assert_eq!(r.code, 3, "{args:?}: {}", r.stderr);
        assert!(r.stdout.is_empty(), "{}", r.stdout);
        assert_within(&r, Duration::from_millis(500), &format!("{args:?}"));
    }
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn status_with_no_replica_up_prints_every_replica_down_and_exits_3() {
    let dir = temp_dir("dead-status");
    let replicas = dead_replica_file(&dir);
    let r = run(&[
        "--replicas",
        replicas.to_str().unwrap(),
        "--timeout",
        "1",
        "status",
    ]);
    assert_eq!(r.code, 3, "{}", r.stderr);
    assert_within(&r, Duration::from_secs(1), "status with --timeout 1");
    let lines: Vec<serde_json::Value> = r
        .stdout
        .lines()
        .map(|l| serde_json::from_str(l).expect("one JSON object a line"))
        .collect();
    assert_eq!(lines.len(), 5, "{}", r.stdout);
    for (i, v) in lines.iter().enumerate() {
        assert_eq!(v["id"], (i + 1) as u64, "replica-file order: {v}");
        assert_eq!(v["up"], false);
        assert_eq!(v["leader"], false);
        assert!(v["applied"].is_null());
        assert!(v["addr"].as_str().unwrap().starts_with("127.0.0.1:"));
        assert!(!v["error"].as_str().unwrap().is_empty());
    }

    // With --server there is no file, so no id.
    let server = format!("127.0.0.1:{}", dead_ports(1)[0]);
    let r = run(&["--server", &server, "--timeout", "0.5", "status"]);
    assert_eq!(r.code, 3, "{}", r.stderr);
    let v: serde_json::Value = serde_json::from_str(r.stdout.trim()).unwrap();
    assert!(v["id"].is_null());
    assert_eq!(v["addr"], server.as_str());
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn fault_and_bench_arguments_are_checked_before_anything_is_sent() {
    let server = format!("127.0.0.1:{}", dead_ports(1)[0]);
    let s = server.as_str();
    let cases: &[&[&str]] = &[
        &["fault", "--server", s, "--drop-rate", "1.5"],
        &["fault", "--server", s, "--drop-rate", "-0.1"],
        &["fault", "--server", s, "--drop-rate", "x"],
        &["fault", "--server", s, "--timeout-rate", "2"],
        &["fault", "--server", s, "--delay-ms", "9..1"],
        &["fault", "--server", s, "--delay-ms", "a..b"],
        &["fault", "--server", s, "--isolate", "0"],
        &["fault", "--server", s, "--isolate", "1,x"],
        &["fault", "--server", s, "--all"],
        &["fault"],
        &["fault", "--drop-rate", "0.5"],
        &["bench", "--clients", "0"],
        &["bench", "--secs", "0"],
        &["bench", "--op", "frobnicate"],
        &["bench", "--keys", "0"],
        &["bench", "--value-size", "2000000"],
        &["--output", "yaml", "status"],
    ];
    for args in cases {
        let r = run(args);
        assert_eq!(r.code, 2, "{args:?}: stderr {}", r.stderr);
        assert!(!r.stderr.is_empty(), "{args:?}: no reason given");
        assert!(r.stdout.is_empty(), "{args:?}: stdout {}", r.stdout);
        assert_within(&r, Duration::ZERO, &format!("{args:?}"));
    }
    // With --output json the usage error is on stdout as JSON too.
    let r = run(&[
        "--output",
        "json",
        "fault",
        "--server",
        s,
        "--drop-rate",
        "7",
    ]);
    assert_eq!(r.code, 2);
    let v: serde_json::Value = serde_json::from_str(r.stdout.trim()).unwrap();
    assert_eq!(v["kind"], "invalid_argument");
    assert!(v["error"].as_str().unwrap().contains("drop-rate"), "{v}");
}

#[test]
fn fault_with_no_replica_listening_exits_3_with_a_json_line() {
    let server = format!("127.0.0.1:{}", dead_ports(1)[0]);
    let r = run(&["--timeout", "0.5", "fault", "--server", &server, "--heal"]);
    assert_eq!(r.code, 3, "{}", r.stderr);
    let v: serde_json::Value = serde_json::from_str(r.stdout.trim()).unwrap();
    assert_eq!(v["addr"], server.as_str());
    assert_eq!(v["kind"], "unavailable");
    assert_within(&r, Duration::from_millis(500), "fault with --timeout 0.5");
}

#[test]
fn shell_without_a_cluster_reports_errors_and_exits_0_at_end_of_input() {
    let dir = temp_dir("shell-dead");
    let replicas = dead_replica_file(&dir);
    let mut child = Command::new(BIN)
        .args([
            "--replicas",
            replicas.to_str().unwrap(),
            "--timeout",
            "0.3",
            "shell",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().unwrap();
        stdin
            .write_all(b"get k\nput 'unclosed\nhelp put\n")
            .unwrap();
    }
    let started = Instant::now();
    while child.try_wait().unwrap().is_none() {
        assert!(started.elapsed() < Duration::from_secs(10), "shell hangs");
        std::thread::sleep(Duration::from_millis(10));
    }
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(0));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("could not connect"), "{stderr}");
    assert!(stderr.contains("quote"), "{stderr}");
    assert!(stdout.contains("Example"), "help put: {stdout}");
    let _ = std::fs::remove_dir_all(dir);
}
