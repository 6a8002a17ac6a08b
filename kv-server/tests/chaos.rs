//! `kv-server cluster --chaos`: the store keeps serving while the supervisor
//! kills, pauses, restarts and resumes replicas, and a SIGTERM leaves no
//! replica behind (none killed, none left stopped).
//!
//! The test runs the real binary on ports the kernel picked, in a temporary
//! directory, and talks to the replicas over tarpc with `kv_api::KvClient`
//! directly (the `kv-client` binary is not necessarily built by
//! `cargo test -p kv-server`). It is bounded in time: a hung supervisor is
//! killed and the test fails saying so.

use std::collections::{BTreeSet, HashMap};
use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use kv_api::{KvClient, KvError, Op, OpResult, ReadMode, Route, WriteRequest};
use tarpc::tokio_serde::formats::Bincode;

mod common;

use common::{is_running_kv_server, replica_file, send_signal, wait_gone, TempDir};

const BIN: &str = env!("CARGO_BIN_EXE_kv-server");

/// How long the workload runs under chaos.
const WORKLOAD: Duration = Duration::from_secs(20);
/// How long one client operation may take, retries included.
const OP_BUDGET: Duration = Duration::from_secs(5);
/// How long one attempt at one replica may take.
const ATTEMPT: Duration = Duration::from_secs(1);
/// The share of operations that must succeed within [`OP_BUDGET`].
const MIN_SUCCESS: f64 = 0.90;
/// Bound on starting and on stopping the cluster.
const LIFECYCLE_TIMEOUT: Duration = Duration::from_secs(30);

// ---------------------------------------------------------------- helpers

/// The running supervisor. On drop (a failing test) it is killed, and so
/// is every replica process it reported, continued first in case it was
/// paused.
struct Supervisor {
    child: Child,
    lines: mpsc::Receiver<String>,
    /// Every stdout line so far.
    stdout: Vec<String>,
    /// Every replica pid it reported.
    pids: BTreeSet<u32>,
    stderr_file: PathBuf,
}

impl Supervisor {
    fn start(dir: &Path, args: &[&str]) -> Supervisor {
        let stderr_file = dir.join("stderr.log");
        // Its stdin is a pipe this process holds (in `child.stdin`, which
        // `try_wait` leaves open): if the test process dies, even by
        // SIGKILL, the pipe closes and the supervisor stops its replicas,
        // instead of going on killing and restarting them unattended.
        let mut child = Command::new(BIN)
            .args(args)
            .arg("--exit-on-stdin-eof")
            .current_dir(dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(File::create(&stderr_file).expect("create stderr log"))
            .spawn()
            .expect("start kv-server cluster");
        let out = child.stdout.take().expect("stdout pipe");
        let (tx, lines) = mpsc::channel();
        thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { return };
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        Supervisor {
            child,
            lines,
            stdout: Vec::new(),
            pids: BTreeSet::new(),
            stderr_file,
        }
    }

    /// Takes in the stdout lines printed so far, waiting up to `wait` for
    /// the first; remembers replica pids.
    fn collect(&mut self, wait: Duration) {
        let mut wait = wait;
        while let Ok(line) = self.lines.recv_timeout(wait) {
            wait = Duration::ZERO;
            // `replica ID client ADDR peer ADDR pid PID data DIR`
            let f: Vec<&str> = line.split_whitespace().collect();
            if let ["replica", _, "client", _, "peer", _, "pid", pid, ..] = f.as_slice() {
                if let Ok(pid) = pid.parse() {
                    self.pids.insert(pid);
                }
            }
            self.stdout.push(line);
        }
    }

    /// Waits until the supervisor printed a line starting with `prefix`.
    fn wait_for(&mut self, prefix: &str, limit: Duration) {
        let deadline = Instant::now() + limit;
        while !self.stdout.iter().any(|l| l.starts_with(prefix)) {
            assert!(
                Instant::now() < deadline,
                "no `{prefix}` line within {limit:?}; stdout:\n{}\nstderr tail:\n{}",
                self.stdout.join("\n"),
                self.stderr_tail()
            );
            self.collect(Duration::from_millis(100));
        }
    }

    fn count(&self, prefix: &str) -> usize {
        self.stdout.iter().filter(|l| l.starts_with(prefix)).count()
    }

    /// The last lines of the supervisor's stderr (its and the replicas' logs).
    fn stderr_tail(&self) -> String {
        let mut text = String::new();
        if let Ok(mut f) = File::open(&self.stderr_file) {
            let _ = f.read_to_string(&mut text);
        }
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    /// Waits up to `limit` for the exit; kills the supervisor and fails
    /// the test if it takes longer.
    fn wait(&mut self, limit: Duration) -> ExitStatus {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status;
            }
            if Instant::now() >= deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                panic!(
                    "the supervisor did not stop within {limit:?} of SIGTERM; killed it. \
                     stdout:\n{}",
                    self.stdout.join("\n")
                );
            }
            thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Supervisor {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        for &pid in &self.pids {
            if is_running_kv_server(pid) {
                let _ = send_signal(pid, libc::SIGCONT);
                let _ = send_signal(pid, libc::SIGKILL);
            }
        }
    }
}

// ---------------------------------------------------------------- client

/// A minimal client: one cached connection per replica, redialled after
/// any error; a write is retried with the same `(client_id, seq)` at the
/// next replica (or the leader a replica names) until the budget is spent.
struct TestClient {
    addrs: Vec<String>,
    conns: HashMap<String, KvClient>,
    client_id: u64,
    seq: u64,
    /// Where to try first: the last replica that answered, or a hint.
    next: usize,
}

impl TestClient {
    fn new(addrs: Vec<String>) -> TestClient {
        TestClient {
            addrs,
            conns: HashMap::new(),
            // Opened through the cluster before the first write.
            client_id: 0,
            seq: 0,
            next: 0,
        }
    }

    async fn conn(&mut self, addr: &str) -> Result<KvClient, String> {
        if let Some(c) = self.conns.get(addr) {
            return Ok(c.clone());
        }
        let mut connect = tarpc::serde_transport::tcp::connect(addr, Bincode::default);
        connect.config_mut().max_frame_length(kv_api::MAX_FRAME);
        let transport = tokio::time::timeout(ATTEMPT, connect)
            .await
            .map_err(|_| "connect timed out".to_string())?
            .map_err(|e| e.to_string())?;
        let client = KvClient::new(tarpc::client::Config::default(), transport).spawn();
        self.conns.insert(addr.to_string(), client.clone());
        Ok(client)
    }

    /// Moves on from a replica that failed (or follows a leader hint).
    fn failed(&mut self, addr: &str, error: &KvError) {
        if let KvError::NotLeader(Some(hint)) = error {
            if let Some(i) = self.addrs.iter().position(|a| *a == hint.addr) {
                self.next = i;
                return;
            }
        }
        self.conns.remove(addr);
        self.next = (self.next + 1) % self.addrs.len();
    }

    fn context() -> tarpc::context::Context {
        let mut ctx = tarpc::context::current();
        ctx.deadline = Instant::now() + ATTEMPT;
        ctx
    }

    /// One call at the current replica: its answer or the error to move on
    /// with.
    async fn attempt(&mut self, call: &Call) -> Result<Option<Vec<u8>>, (String, KvError)> {
        let addr = self.addrs[self.next].clone();
        let client = match self.conn(&addr).await {
            Ok(c) => c,
            Err(e) => return Err((addr, KvError::Unavailable(e))),
        };
        let answer = async {
            match call {
                // An open's answer is the session id (LE bytes); other
                // writes answer nothing.
                Call::Write(req) => client
                    .write(Self::context(), req.clone(), Route::Forward)
                    .await
                    .map(|r| {
                        r.map(|o| match o.result {
                            OpResult::SessionOpened { session } => {
                                Some(session.to_le_bytes().to_vec())
                            }
                            _ => None,
                        })
                    }),
                Call::Get(key) => client
                    .get(
                        Self::context(),
                        key.clone(),
                        ReadMode::Linearizable,
                        Route::Forward,
                    )
                    .await
                    .map(|r| r.map(|g| g.value)),
            }
        };
        match tokio::time::timeout(ATTEMPT, answer).await {
            Ok(Ok(Ok(value))) => Ok(value),
            Ok(Ok(Err(e))) => Err((addr, e)),
            Ok(Err(e)) => Err((addr, KvError::Unavailable(e.to_string()))),
            Err(_) => Err((addr, KvError::Timeout("no answer".into()))),
        }
    }

    /// Makes `call` within [`OP_BUDGET`], retrying it (a write with the
    /// same sequence number) at other replicas.
    async fn call(&mut self, call: Call) -> Result<Option<Vec<u8>>, String> {
        let deadline = Instant::now() + OP_BUDGET;
        let mut last = String::from("no attempt");
        while Instant::now() < deadline {
            match self.attempt(&call).await {
                Ok(value) => return Ok(value),
                Err((addr, e)) => {
                    last = format!("{addr}: {e}");
                    self.failed(&addr, &e);
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        }
        Err(last)
    }

    /// Puts `key = value`.
    async fn put(&mut self, key: &str, value: &str) -> Result<(), String> {
        if self.client_id == 0 {
            let open = WriteRequest {
                client_id: 0,
                seq: 0,
                acked_below: 0,
                op: Op::open_session(),
            };
            let id = self.call(Call::Write(open)).await?;
            let id: [u8; 8] = id
                .and_then(|b| b.try_into().ok())
                .ok_or("an open was not answered with a session")?;
            self.client_id = u64::from_le_bytes(id);
        }
        self.seq += 1;
        let req = WriteRequest {
            client_id: self.client_id,
            seq: self.seq,
            acked_below: 0,
            op: Op::Put {
                key: key.as_bytes().to_vec(),
                value: value.as_bytes().to_vec(),
            },
        };
        self.call(Call::Write(req)).await.map(|_| ())
    }

    /// Reads `key` linearizably.
    async fn get(&mut self, key: &str) -> Result<Option<String>, String> {
        let value = self.call(Call::Get(key.as_bytes().to_vec())).await?;
        Ok(value.map(|v| String::from_utf8_lossy(&v).into_owned()))
    }
}

/// A client operation.
enum Call {
    Write(WriteRequest),
    Get(Vec<u8>),
}

/// Outcome of the workload.
#[derive(Debug, Default)]
struct Tally {
    ok: usize,
    failed: usize,
    errors: Vec<String>,
}

/// Puts fresh keys and reads each back, one operation at a time, for
/// `length`. A read must return the value just written if the write was
/// acknowledged.
async fn workload(addrs: Vec<String>, length: Duration) -> Tally {
    let mut client = TestClient::new(addrs);
    let mut tally = Tally::default();
    let end = Instant::now() + length;
    let mut i = 0u64;
    while Instant::now() < end {
        i += 1;
        let key = format!("k{i}");
        let value = format!("v{i}");
        let acked = match client.put(&key, &value).await {
            Ok(()) => {
                tally.ok += 1;
                true
            }
            Err(e) => {
                tally.failed += 1;
                tally.errors.push(format!("put {key}: {e}"));
                false
            }
        };
        match client.get(&key).await {
            Ok(got) => {
                tally.ok += 1;
                if acked {
                    assert_eq!(
                        got.as_deref(),
                        Some(value.as_str()),
                        "an acknowledged write of {key} was not read back"
                    );
                }
            }
            Err(e) => {
                tally.failed += 1;
                tally.errors.push(format!("get {key}: {e}"));
            }
        }
    }
    tally
}

// ------------------------------------------------------------------ test

#[test]
fn store_keeps_serving_under_chaos_and_sigterm_stops_every_replica() {
    let dir = TempDir::new("serve");
    let (text, addrs) = replica_file(5);
    dir.write("replica", &text);
    let mut cluster = Supervisor::start(
        dir.path(),
        &[
            "cluster",
            "--replicas",
            "replica",
            "--data-dir",
            "data",
            "--chaos",
            "--chaos-seed",
            "1",
            "--max-down",
            "2",
            "--chaos-interval-ms",
            "300..800",
        ],
    );
    cluster.wait_for("chaos: seed 1", LIFECYCLE_TIMEOUT);
    assert_eq!(cluster.pids.len(), 5, "{:?}", cluster.stdout);

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    // The workload runs on this thread; stdout is collected afterwards (the
    // reader thread buffers it).
    let tally = runtime.block_on(workload(addrs, WORKLOAD));
    cluster.collect(Duration::from_millis(100));

    let total = tally.ok + tally.failed;
    let share = tally.ok as f64 / total.max(1) as f64;
    let faults = format!(
        "{} kills, {} restarts, {} pauses, {} resumes",
        cluster.count("chaos: kill replica"),
        cluster.count("chaos: restart replica"),
        cluster.count("chaos: pause replica"),
        cluster.count("chaos: resume replica")
    );
    eprintln!(
        "{} of {total} operations succeeded ({:.1}%); {faults}",
        tally.ok,
        share * 100.0
    );
    assert!(total >= 20, "only {total} operations in {WORKLOAD:?}");
    assert!(
        share >= MIN_SUCCESS,
        "only {} of {total} operations succeeded within {OP_BUDGET:?} ({faults}); \
         errors:\n{}\nstdout:\n{}",
        tally.ok,
        tally.errors.join("\n"),
        cluster.stdout.join("\n")
    );
    for prefix in [
        "chaos: kill replica",
        "chaos: restart replica",
        "chaos: pause replica",
        "chaos: resume replica",
    ] {
        assert!(
            cluster.count(prefix) >= 1,
            "no `{prefix}` line; stdout:\n{}",
            cluster.stdout.join("\n")
        );
    }
    assert!(
        cluster.count("health: replica") >= 1,
        "no health line; stdout:\n{}",
        cluster.stdout.join("\n")
    );

    // SIGTERM: every replica stops cleanly (a paused one is continued
    // first; none needs SIGKILL), and none is left running or stopped.
    send_signal(cluster.child.id(), libc::SIGTERM).expect("SIGTERM the supervisor");
    let status = cluster.wait(LIFECYCLE_TIMEOUT);
    cluster.collect(Duration::from_millis(500));
    assert_eq!(
        status.code(),
        Some(0),
        "stdout:\n{}\nstderr tail:\n{}",
        cluster.stdout.join("\n"),
        cluster.stderr_tail()
    );
    let alive = wait_gone(&cluster.pids, Duration::from_secs(5));
    assert!(
        alive.is_empty(),
        "replicas still running after the cluster stopped: {alive:?}"
    );
    let stopped: Vec<&String> = cluster
        .stdout
        .iter()
        .filter(|l| l.starts_with("replica ") && l.contains(" stopped: "))
        .collect();
    assert!(!stopped.is_empty(), "{:?}", cluster.stdout);
    // Replicas killed by chaos just before the SIGTERM may be reaped during
    // the shutdown; every other one exits by itself with status 0.
    let killed: BTreeSet<String> = cluster
        .stdout
        .iter()
        .filter(|l| l.starts_with("chaos: kill replica"))
        .filter_map(|l| {
            l.split("(pid ")
                .nth(1)?
                .split(')')
                .next()
                .map(str::to_string)
        })
        .collect();
    for line in stopped {
        let pid = line.split("(pid ").nth(1).and_then(|p| p.split(')').next());
        if pid.is_some_and(|p| killed.contains(p)) {
            continue;
        }
        assert!(line.contains("exit status: 0"), "not a clean stop: {line}");
    }
    assert_eq!(cluster.count("all replicas stopped"), 1);
    assert_eq!(
        cluster.count("chaos summary: seed 1;"),
        1,
        "{:?}",
        cluster.stdout
    );
}
