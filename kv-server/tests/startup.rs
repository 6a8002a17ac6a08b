//! The `kv-server` command line: refusing bad configurations with the right
//! exit code and message, and starting and stopping replicas, one or a whole
//! `cluster` of them.
//!
//! Every test runs the real binary in its own temporary directory, on ports
//! the kernel picked (bound to 127.0.0.1:0, then released), and is bounded in
//! time: a hung process is killed and the test fails saying so.

use std::io::{BufRead, BufReader, Read};
use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

mod common;

use common::{free_ports_on, is_running_kv_server, replica_file, wait_gone, TempDir};

const BIN: &str = env!("CARGO_BIN_EXE_kv-server");

/// Bound on a run that is expected to fail at start-up.
const REFUSAL_TIMEOUT: Duration = Duration::from_secs(20);
/// Bound on starting and on stopping a replica or a cluster.
const LIFECYCLE_TIMEOUT: Duration = Duration::from_secs(30);

// ---------------------------------------------------------------- helpers

/// Whether `addr` accepts a TCP connection before `deadline`.
fn accepts_connections(addr: &str, deadline: Instant) -> bool {
    loop {
        if std::net::TcpStream::connect(addr).is_ok() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        thread::sleep(Duration::from_millis(50));
    }
}

/// The output of a finished run.
struct Outcome {
    status: ExitStatus,
    stderr: String,
}

/// Runs `kv-server ARGS` in `dir` to completion, killing it (and failing)
/// if it takes longer than `limit`.
fn run_to_end(dir: &Path, args: &[&str], limit: Duration) -> Outcome {
    let mut child = Command::new(BIN)
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start kv-server");
    // Read stderr on a thread so that a chatty process cannot block on a full pipe.
    let mut pipe = child.stderr.take().expect("stderr pipe");
    let reader = thread::spawn(move || {
        let mut text = String::new();
        let _ = pipe.read_to_string(&mut text);
        text
    });
    let status = wait_bounded(&mut child, limit)
        .unwrap_or_else(|| panic!("kv-server {args:?} still running after {limit:?}; killed it"));
    let stderr = reader.join().expect("stderr reader");
    Outcome { status, stderr }
}

/// Waits up to `limit` for `child`; on timeout kills it and returns `None`.
fn wait_bounded(child: &mut Child, limit: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            return Some(status);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// Asserts a refusal: exit code `code`, and exactly one error line, the
/// one starting `kv-server: `, which is `message` exactly (log lines before
/// it, from a replica that started and then failed, are allowed).
fn assert_refused(outcome: &Outcome, code: i32, message: &str) {
    let stderr = &outcome.stderr;
    assert_eq!(
        outcome.status.code(),
        Some(code),
        "want exit {code}, got {:?}; stderr:\n{stderr}",
        outcome.status
    );
    assert!(
        !stderr.contains("panicked"),
        "kv-server panicked:\n{stderr}"
    );
    let errors: Vec<&str> = stderr
        .lines()
        .filter(|l| l.starts_with("kv-server: "))
        .collect();
    assert_eq!(errors, [message], "the error line(s); stderr:\n{stderr}");
}

/// Asserts a usage error from the argument parser: exit code 2 and stderr
/// starting with exactly `lines` (the usage summary that follows is the
/// parser's, and changes with every flag).
fn assert_usage_error(outcome: &Outcome, lines: &[&str]) {
    let stderr = &outcome.stderr;
    assert_eq!(
        outcome.status.code(),
        Some(2),
        "want exit 2, got {:?}; stderr:\n{stderr}",
        outcome.status
    );
    let head: Vec<&str> = stderr.lines().take(lines.len()).collect();
    assert_eq!(head, lines, "stderr:\n{stderr}");
}

/// Sends `sig` to `pid`, failing the test if it cannot.
fn signal(pid: u32, sig: i32) {
    common::send_signal(pid, sig).unwrap_or_else(|e| panic!("kill({pid}, {sig}): {e}"));
}

/// A running `kv-server` whose output lines arrive on channels; killed with
/// SIGKILL on drop if still running, so a failing test leaves nothing behind
/// (the replicas of a killed `cluster` stop by themselves).
struct Running {
    child: Child,
    stdout: mpsc::Receiver<String>,
    stderr: mpsc::Receiver<String>,
    /// Every stdout line seen so far, for messages.
    stdout_seen: Vec<String>,
}

impl Running {
    fn start(dir: &Path, args: &[&str]) -> Running {
        let mut child = Command::new(BIN)
            .args(args)
            .current_dir(dir)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start kv-server");
        let stdout = lines_of(child.stdout.take().expect("stdout pipe"));
        let stderr = lines_of(child.stderr.take().expect("stderr pipe"));
        Running {
            child,
            stdout,
            stderr,
            stdout_seen: Vec::new(),
        }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The next stdout line that satisfies `want`, waiting until `deadline`.
    fn stdout_line(
        &mut self,
        deadline: Instant,
        what: &str,
        want: impl Fn(&str) -> bool,
    ) -> String {
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.stdout.recv_timeout(left) {
                Ok(line) => {
                    self.stdout_seen.push(line.clone());
                    if want(&line) {
                        return line;
                    }
                }
                Err(_) => panic!(
                    "no stdout line {what} in time; stdout so far:\n{}\nstderr so far:\n{}",
                    self.stdout_seen.join("\n"),
                    self.drain_stderr()
                ),
            }
        }
    }

    /// Waits until a stderr line contains `needle`.
    fn wait_stderr(&mut self, needle: &str, limit: Duration) {
        let deadline = Instant::now() + limit;
        let mut seen = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.stderr.recv_timeout(left) {
                Ok(line) if line.contains(needle) => return,
                Ok(line) => seen.push(line),
                Err(_) => panic!("stderr never said {needle:?}; stderr:\n{}", seen.join("\n")),
            }
        }
    }

    fn drain_stderr(&self) -> String {
        self.stderr.try_iter().collect::<Vec<_>>().join("\n")
    }

    /// Waits for the exit, failing the test after `limit`.
    fn wait(&mut self, limit: Duration) -> ExitStatus {
        match wait_bounded(&mut self.child, limit) {
            Some(status) => status,
            None => panic!(
                "kv-server still running {limit:?} after being told to stop; killed it. stderr:\n{}",
                self.drain_stderr()
            ),
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn lines_of(stream: impl Read + Send + 'static) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        for line in BufReader::new(stream).lines() {
            let Ok(line) = line else { return };
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    rx
}

/// One `replica ID client ADDR peer ADDR pid PID data DIR` line of `cluster`.
#[derive(Debug)]
struct ReplicaLine {
    id: u64,
    client: String,
    peer: String,
    pid: u32,
    data: String,
}

fn parse_replica_line(line: &str) -> Option<ReplicaLine> {
    let f: Vec<&str> = line.split_whitespace().collect();
    match f.as_slice() {
        ["replica", id, "client", client, "peer", peer, "pid", pid, "data", data] => {
            Some(ReplicaLine {
                id: id.parse().ok()?,
                client: client.to_string(),
                peer: peer.to_string(),
                pid: pid.parse().ok()?,
                data: data.to_string(),
            })
        }
        _ => None,
    }
}

/// Starts `kv-server cluster` with `n` replicas and returns it with the
/// lines it printed for them, checked against the replica file.
fn start_cluster(dir: &TempDir, n: usize) -> (Running, Vec<ReplicaLine>) {
    let (text, _) = replica_file(n);
    dir.write("replica", &text);
    let mut cluster = Running::start(
        dir.path(),
        &["cluster", "--replicas", "replica", "--data-dir", "data"],
    );
    let deadline = Instant::now() + LIFECYCLE_TIMEOUT;
    let mut lines = Vec::new();
    for _ in 0..n {
        let line = cluster.stdout_line(deadline, "describing a replica", |l| {
            parse_replica_line(l).is_some()
        });
        lines.push(parse_replica_line(&line).expect("parsed above"));
    }
    for (i, line) in lines.iter().enumerate() {
        let want: Vec<&str> = text
            .lines()
            .nth(i + 1)
            .expect("replica line")
            .split_whitespace()
            .collect();
        assert_eq!(line.id.to_string(), want[0], "{line:?}");
        assert_eq!(line.client, want[1], "{line:?}");
        assert_eq!(line.peer, want[2], "{line:?}");
        assert_eq!(
            Path::new(&line.data),
            Path::new("data").join(line.id.to_string()),
            "{line:?}"
        );
    }
    await_running(&lines.iter().map(|l| l.pid).collect::<Vec<_>>(), deadline);
    (cluster, lines)
}

/// Waits (until `deadline`) for every one of `pids` to run `kv-server`: a
/// child the supervisor has just reported may still be in the middle of
/// exec, its command line reading empty for a moment. Whether they all do
/// is for the caller to assert.
fn await_running(pids: &[u32], deadline: Instant) {
    while !pids.iter().all(|&p| is_running_kv_server(p)) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
}

// ------------------------------------------------- refused configurations

#[test]
fn replica_file_line_with_two_fields_is_refused_naming_file_and_line() {
    let dir = TempDir::new("two-fields");
    dir.write(
        "replica",
        "# comment\n1 127.0.0.1:7001 127.0.0.1:7101\n2 127.0.0.1:7002\n",
    );
    for args in [
        &["--id", "1", "--replicas", "replica"][..],
        &["cluster", "--replicas", "replica"][..],
    ] {
        let out = run_to_end(dir.path(), args, REFUSAL_TIMEOUT);
        assert_refused(
            &out,
            2,
            "kv-server: replica:3: expected `ID CLIENT_ADDR PEER_ADDR [REDIS_ADDR]`, found 2 field(s): \
             \"2 127.0.0.1:7002\"",
        );
    }
}

#[test]
fn replica_file_with_duplicate_id_is_refused_naming_file_and_line() {
    let dir = TempDir::new("dup-id");
    dir.write(
        "my-replicas",
        "1 127.0.0.1:7001 127.0.0.1:7101\n\n1 127.0.0.1:7002 127.0.0.1:7102\n",
    );
    for args in [
        &["--id", "1", "--replicas", "my-replicas"][..],
        &["cluster", "--replicas", "my-replicas"][..],
    ] {
        let out = run_to_end(dir.path(), args, REFUSAL_TIMEOUT);
        assert_refused(&out, 2, "kv-server: my-replicas:3: the id 1 appears twice");
    }
}

#[test]
fn replica_file_with_duplicate_address_is_refused_naming_file_and_line() {
    let dir = TempDir::new("dup-addr");
    dir.write(
        "replica",
        "1 127.0.0.1:7001 127.0.0.1:7101\n2 127.0.0.1:7002 127.0.0.1:7101\n",
    );
    for args in [
        &["--id", "2", "--replicas", "replica"][..],
        &["cluster", "--replicas", "replica"][..],
    ] {
        let out = run_to_end(dir.path(), args, REFUSAL_TIMEOUT);
        assert_refused(
            &out,
            2,
            "kv-server: replica:2: the address 127.0.0.1:7101 appears twice",
        );
    }
}

#[test]
fn missing_replica_file_is_refused_naming_it() {
    let dir = TempDir::new("no-file");
    let out = run_to_end(
        dir.path(),
        &["--id", "1", "--replicas", "nowhere"],
        REFUSAL_TIMEOUT,
    );
    assert_refused(
        &out,
        2,
        "kv-server: nowhere: cannot read the replica file: No such file or directory (os error 2)",
    );
}

#[test]
fn unknown_id_is_refused_naming_the_file() {
    let dir = TempDir::new("unknown-id");
    dir.write("cluster-file", &replica_file(3).0);
    let out = run_to_end(
        dir.path(),
        &["--id", "9", "--replicas", "cluster-file"],
        REFUSAL_TIMEOUT,
    );
    assert_refused(
        &out,
        2,
        "kv-server: invalid configuration: --id 9 is not in cluster-file (its ids are 1, 2, 3)",
    );
}

#[test]
fn missing_id_is_a_usage_error() {
    let dir = TempDir::new("no-id");
    dir.write("replica", &replica_file(3).0);
    let out = run_to_end(dir.path(), &[], REFUSAL_TIMEOUT);
    assert_usage_error(
        &out,
        &[
            "error: the following required arguments were not provided:",
            "  --id <ID>",
        ],
    );
}

#[test]
fn id_and_cluster_subcommand_are_mutually_exclusive() {
    let dir = TempDir::new("id-and-cluster");
    dir.write("replica", &replica_file(3).0);
    let out = run_to_end(dir.path(), &["--id", "1", "cluster"], REFUSAL_TIMEOUT);
    assert_usage_error(
        &out,
        &["error: the subcommand 'cluster' cannot be used with '--id <ID>'"],
    );
}

#[test]
fn help_explains_both_modes_with_examples() {
    let output = Command::new(BIN)
        .arg("--help")
        .output()
        .expect("run kv-server --help");
    assert!(output.status.success());
    let help = String::from_utf8_lossy(&output.stdout);
    for needle in [
        "--id",
        "--replicas",
        "--data-dir",
        "kv-server cluster",
        "Examples",
    ] {
        assert!(help.contains(needle), "--help lacks {needle:?}:\n{help}");
    }
}

#[test]
fn uncreatable_data_dir_fails_with_a_message_naming_it() {
    let dir = TempDir::new("bad-data-dir");
    dir.write("replica", &replica_file(3).0);
    dir.write("not-a-dir", "a regular file\n");
    let out = run_to_end(
        dir.path(),
        &["--id", "1", "--data-dir", "not-a-dir/data"],
        REFUSAL_TIMEOUT,
    );
    // The cause is said once: not by the library error and again by its
    // source.
    assert_refused(
        &out,
        1,
        "kv-server: data directory not-a-dir/data: Not a directory (os error 20) (check that \
         it exists and is writable)",
    );
}

#[test]
fn address_in_use_fails_with_a_message_naming_it() {
    let dir = TempDir::new("addr-in-use");
    let taken = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    let taken_addr = taken.local_addr().expect("local addr").to_string();
    let peer_port = free_ports_on("127.0.0.1", 1)[0];
    dir.write(
        "replica",
        &format!("1 {taken_addr} 127.0.0.1:{peer_port}\n"),
    );
    let out = run_to_end(dir.path(), &["--id", "1"], REFUSAL_TIMEOUT);
    assert_refused(
        &out,
        1,
        &format!(
            "kv-server: cannot listen on {taken_addr}: Address already in use (os error 98) (is \
             another process using it?)"
        ),
    );
    drop(taken);
}

// ---------------------------------------------------- starting and stopping

// With the library stub, `run` only waits for the shutdown signal; these
// tests then check the command line and the supervisor. With the real
// server they also check that replicas bind their ports and stop cleanly.

#[test]
fn replica_stops_cleanly_on_sigterm() {
    let dir = TempDir::new("sigterm");
    dir.write("replica", &replica_file(3).0);
    let mut replica = Running::start(dir.path(), &["--id", "2", "--data-dir", "d2"]);
    replica.wait_stderr("starting replica", LIFECYCLE_TIMEOUT);
    signal(replica.pid(), libc::SIGTERM);
    let status = replica.wait(LIFECYCLE_TIMEOUT);
    assert_eq!(status.code(), Some(0), "{}", replica.drain_stderr());
}

#[test]
fn cluster_with_exit_on_stdin_eof_stops_its_replicas_when_its_input_closes() {
    // What a test harness relies on so that its death (even by SIGKILL)
    // does not leave a cluster behind: its end of the pipe closes, and the
    // supervisor stops, stopping every replica it started.
    let dir = TempDir::new("cluster-eof");
    dir.write("replica", &replica_file(3).0);
    let mut child = Command::new(BIN)
        .args(["cluster", "--replicas", "replica", "--data-dir", "data"])
        .arg("--exit-on-stdin-eof")
        .current_dir(dir.path())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start kv-server cluster");
    let input = child.stdin.take().expect("stdin pipe");
    let stdout = lines_of(child.stdout.take().expect("stdout pipe"));
    let deadline = Instant::now() + LIFECYCLE_TIMEOUT;
    let mut pids = Vec::new();
    while pids.len() < 3 {
        let left = deadline.saturating_duration_since(Instant::now());
        let Ok(line) = stdout.recv_timeout(left) else {
            let _ = child.kill();
            panic!("the cluster did not report 3 replicas; got {pids:?}");
        };
        if let Some(r) = parse_replica_line(&line) {
            pids.push(r.pid);
        }
    }
    await_running(&pids, deadline);
    assert!(pids.iter().all(|&p| is_running_kv_server(p)), "{pids:?}");
    drop(input);
    let status = wait_bounded(&mut child, LIFECYCLE_TIMEOUT)
        .expect("the cluster did not stop when its input closed; killed it");
    assert_eq!(status.code(), Some(0));
    let alive = wait_gone(&pids, Duration::from_secs(5));
    assert!(
        alive.is_empty(),
        "replicas still running after the cluster stopped: {alive:?}"
    );
}

#[test]
fn cluster_starts_every_replica_and_sigterm_stops_them_all() {
    let dir = TempDir::new("cluster");
    let (mut cluster, replicas) = start_cluster(&dir, 5);
    let pids: Vec<u32> = replicas.iter().map(|r| r.pid).collect();
    for r in &replicas {
        if !is_running_kv_server(r.pid) {
            // Give the supervisor a moment to report the exit, then show
            // everything it said: the exit status and the replica's log.
            std::thread::sleep(Duration::from_millis(500));
            let stdout: Vec<String> = cluster.stdout.try_iter().collect();
            panic!(
                "replica not running: {r:?}\nsupervisor stdout:\n{}\n{}\nsupervisor stderr:\n{}",
                cluster.stdout_seen.join("\n"),
                stdout.join("\n"),
                cluster.drain_stderr()
            );
        }
    }
    // Every replica logs its start-up line, prefixed with its id.
    let ids: Vec<u64> = replicas.iter().map(|r| r.id).collect();
    let deadline = Instant::now() + LIFECYCLE_TIMEOUT;
    let mut started = std::collections::BTreeSet::new();
    while started.len() < ids.len() {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = cluster.stderr.recv_timeout(left).unwrap_or_else(|_| {
            panic!("replicas {ids:?} did not all log their start; saw {started:?}")
        });
        for id in &ids {
            if line.starts_with(&format!("[replica {id}] ")) && line.contains("starting replica") {
                started.insert(*id);
            }
        }
    }

    // And listens where it said it would.
    for r in &replicas {
        for addr in [&r.client, &r.peer] {
            assert!(
                accepts_connections(addr, deadline),
                "replica {} does not accept connections on {addr}",
                r.id
            );
        }
    }

    signal(cluster.pid(), libc::SIGTERM);
    let status = cluster.wait(LIFECYCLE_TIMEOUT);
    assert_eq!(status.code(), Some(0), "{}", cluster.drain_stderr());
    let alive = wait_gone(&pids, Duration::from_secs(5));
    assert!(
        alive.is_empty(),
        "replicas still running after the cluster stopped: {alive:?}"
    );
    cluster.stdout_line(
        Instant::now() + Duration::from_secs(5),
        "saying all stopped",
        |l| l == "all replicas stopped",
    );
}

#[test]
fn cluster_reports_a_replica_that_exits_unexpectedly() {
    let dir = TempDir::new("cluster-crash");
    let (mut cluster, replicas) = start_cluster(&dir, 3);
    let victim = &replicas[1];
    signal(victim.pid, libc::SIGKILL);
    let want = format!("replica {} exited unexpectedly", victim.id);
    let line = cluster.stdout_line(
        Instant::now() + LIFECYCLE_TIMEOUT,
        "reporting the crash",
        |l| l.starts_with(&want),
    );
    assert!(
        line.contains("SIGKILL") || line.contains("signal: 9"),
        "{line}"
    );

    // The others keep running until the cluster is stopped.
    let others: Vec<u32> = replicas
        .iter()
        .filter(|r| r.id != victim.id)
        .map(|r| r.pid)
        .collect();
    for &pid in &others {
        assert!(is_running_kv_server(pid), "replica pid {pid} stopped too");
    }
    signal(cluster.pid(), libc::SIGTERM);
    assert_eq!(cluster.wait(LIFECYCLE_TIMEOUT).code(), Some(0));
    assert!(wait_gone(&others, Duration::from_secs(5)).is_empty());
}

#[test]
fn cluster_replicas_stop_when_the_supervisor_is_killed() {
    let dir = TempDir::new("cluster-orphans");
    let (mut cluster, replicas) = start_cluster(&dir, 3);
    let pids: Vec<u32> = replicas.iter().map(|r| r.pid).collect();
    signal(cluster.pid(), libc::SIGKILL);
    cluster.wait(LIFECYCLE_TIMEOUT);
    let alive = wait_gone(&pids, LIFECYCLE_TIMEOUT);
    assert!(
        alive.is_empty(),
        "replicas outlived their supervisor: {alive:?}"
    );
}

// ------------------------------------------------------ one data directory

/// A put or a linearizable get against one replica over tarpc, retried
/// until `deadline` (the replica may still be electing itself).
fn call_until(addr: &str, key: &str, put: Option<&str>, deadline: Instant) -> Option<Vec<u8>> {
    use kv_api::{KvClient, Op, ReadMode, Route, WriteRequest};
    use tarpc::tokio_serde::formats::Bincode;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    runtime.block_on(async {
        let mut last = String::new();
        while Instant::now() < deadline {
            let attempt = async {
                let mut connect = tarpc::serde_transport::tcp::connect(addr, Bincode::default);
                connect.config_mut().max_frame_length(kv_api::MAX_FRAME);
                let transport = connect.await.map_err(|e| e.to_string())?;
                let client = KvClient::new(tarpc::client::Config::default(), transport).spawn();
                let ctx = tarpc::context::current();
                match put {
                    Some(value) => {
                        // Writes need a session, opened through the log.
                        let open = WriteRequest {
                            client_id: 0,
                            seq: rand::random(),
                            acked_below: 0,
                            op: Op::open_session(),
                        };
                        let opened = client
                            .write(ctx, open, Route::Forward)
                            .await
                            .map_err(|e| e.to_string())?
                            .map_err(|e| e.to_string())?;
                        let kv_api::OpResult::SessionOpened { session } = opened.result else {
                            return Err(format!("opening a session answered {opened:?}"));
                        };
                        let req = WriteRequest {
                            client_id: session,
                            seq: 1,
                            acked_below: 0,
                            op: Op::Put {
                                key: key.as_bytes().to_vec(),
                                value: value.as_bytes().to_vec(),
                            },
                        };
                        client
                            .write(ctx, req, Route::Forward)
                            .await
                            .map_err(|e| e.to_string())?
                            .map_err(|e| e.to_string())?;
                        Ok::<_, String>(None)
                    }
                    None => client
                        .get(
                            ctx,
                            key.as_bytes().to_vec(),
                            ReadMode::Linearizable,
                            Route::Forward,
                        )
                        .await
                        .map_err(|e| e.to_string())?
                        .map(|g| g.value)
                        .map_err(|e| e.to_string()),
                }
            };
            match tokio::time::timeout(Duration::from_secs(2), attempt).await {
                Ok(Ok(value)) => return value,
                Ok(Err(e)) => last = e,
                Err(_) => last = "timed out".into(),
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("no answer from {addr} for {key:?} in time: {last}");
    })
}

/// The bytes of every file under `dir`, by path.
fn files_under(dir: &Path) -> Vec<(std::path::PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for entry in std::fs::read_dir(&d).expect("read a directory") {
            let path = entry.expect("a directory entry").path();
            if path.is_dir() {
                todo.push(path);
            } else {
                let bytes = std::fs::read(&path).expect("read a file");
                out.push((path, bytes));
            }
        }
    }
    out.sort();
    out
}

#[test]
fn a_second_replica_on_a_data_directory_in_use_is_refused_and_touches_nothing() {
    let dir = TempDir::new("data-dir-in-use");
    // One replica is its own majority, so it serves alone.
    let (text, clients) = replica_file(1);
    dir.write("replica", &text);
    // The same id elsewhere: a second process would bind without trouble.
    let (other, _) = replica_file(1);
    dir.write("other", &other);
    let mut first = Running::start(dir.path(), &["--id", "1", "--data-dir", "d1"]);
    let deadline = Instant::now() + LIFECYCLE_TIMEOUT;
    call_until(&clients[0], "before", Some("written"), deadline);
    let wal = dir.path().join("d1").join("wal");
    let before = files_under(&wal);
    assert!(!before.is_empty(), "no log under {}", wal.display());

    for file in ["replica", "other"] {
        let out = run_to_end(
            dir.path(),
            &["--id", "1", "--replicas", file, "--data-dir", "d1"],
            REFUSAL_TIMEOUT,
        );
        let refusal = format!(
            "kv-server: data directory d1 is in use by process {} (is another kv-server running \
             with this --data-dir? stop it first, or give this one another directory)",
            first.pid()
        );
        assert_refused(&out, 2, &refusal);
        assert_eq!(files_under(&wal), before, "the log changed ({file})");
    }

    let deadline = Instant::now() + LIFECYCLE_TIMEOUT;
    assert_eq!(
        call_until(&clients[0], "before", None, deadline),
        Some(b"written".to_vec())
    );
    call_until(&clients[0], "after", Some("also"), deadline);
    signal(first.pid(), libc::SIGTERM);
    let status = first.wait(LIFECYCLE_TIMEOUT);
    assert_eq!(status.code(), Some(0), "{}", first.drain_stderr());
}
