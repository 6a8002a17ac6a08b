//! The end-to-end test harness of kvpaxos: starts real `kv-server` processes
//! on loopback ports and drives them with the real `kv-client` CLI and SDK.
//!
//! # Layout
//!
//! - [`Cluster`] — a cluster of replica processes in a temporary directory:
//!   start, kill (SIGKILL), pause/resume (SIGSTOP/SIGCONT), restart, status,
//!   leader, SDK clients and CLI runs. Dropping it kills every child, prints
//!   the tail of each replica's log if the test is failing, and removes the
//!   directory.
//! - [`bin_path`] — where the `kv-server` and `kv-client` binaries are.
//! - [`run_bin`] / [`kv_client_cli`] / [`kv_server_cmd`] — run a binary with a
//!   time bound, for tests that need no cluster (bad input).
//! - [`wait_for`] / [`wait_until`] — poll a condition until a deadline; the
//!   only way tests synchronise with the cluster (never bare sleeps).
//! - [`free_ports`] — loopback ports to listen on, allocated at run time.
//!
//! # Running
//!
//! `cargo test --workspace --release` builds `kv-server` and `kv-client` and
//! runs everything. `cargo test -p kv-tests --release` runs only these tests
//! but does not build the binaries: run `cargo build --release -p kv-server
//! -p kv-client` first, or the tests use whatever binaries are there.
//! A failing test prints the last lines of every replica's log.
//!
//! Environment:
//! - `KV_BIN_DIR`: the directory holding `kv-server` and `kv-client`
//!   (default: the profile directory of the running test executable).
//! - `KV_TEST_KEEP=1`: keep a failed test's directory (logs, data) and print
//!   its path instead of removing it.
//! - `KV_TEST_TLS=1`: every cluster runs with TLS (certificates made by
//!   `kv-server certs` in its directory); the harness's SDK clients and CLI
//!   runs use the `admin` identity. Tests that speak the wire protocol by
//!   hand (fuzz, limits) do not apply; CI runs the core and Jepsen-style
//!   tests this way too.

use std::collections::{BTreeMap, HashSet};
use std::fmt::Write as _;
use std::future::Future;
use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use kv_api::replicas::Replicas;
use kv_api::{ReplicaId, ReplicaStatus, Slot};

/// How long [`Cluster::start`] waits for every replica to answer and a
/// leader to exist. Generous: two cores may be shared by several builds.
pub const START_TIMEOUT: Duration = Duration::from_secs(30);

/// The per-operation timeout of [`Cluster::client`].
pub const CLIENT_TIMEOUT: Duration = Duration::from_secs(5);

/// The bound on one CLI run started by [`Cluster::cli`].
pub const CLI_TIMEOUT: Duration = Duration::from_secs(20);

/// How long one status poll waits for one replica (a paused or dead replica
/// must not stall the harness).
const STATUS_TIMEOUT: Duration = Duration::from_millis(1000);

/// Lines of each replica's log printed when a test fails.
const LOG_TAIL_LINES: usize = 40;

/// The directory holding the workspace binaries: `$KV_BIN_DIR`, or the
/// profile directory of the running test (`target/<profile>/deps/<exe>` →
/// `target/<profile>/`).
pub fn bin_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("KV_BIN_DIR") {
        return PathBuf::from(dir);
    }
    let exe = std::env::current_exe().expect("cannot find the path of the test executable");
    let mut dir = exe
        .parent()
        .expect("the test executable has no parent directory")
        .to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    dir
}

/// The path of a workspace binary (`kv-server` or `kv-client`); panics with
/// a message saying how to build it if it is missing.
pub fn bin_path(name: &str) -> PathBuf {
    let path = bin_dir().join(name);
    if !path.is_file() {
        panic!(
            "the `{name}` binary is missing at {}; build it first \
             (`cargo build --release -p kv-server -p kv-client`, or run \
             `cargo test --workspace --release`, which builds it), or point \
             KV_BIN_DIR at the directory that holds it",
            path.display()
        );
    }
    path
}

/// Ports handed out by this process, so that parallel tests in one test
/// binary never get the same one.
static HANDED_OUT: Mutex<Option<HashSet<u16>>> = Mutex::new(None);

/// `n` distinct loopback ports that were free a moment ago.
///
/// Each port is found by binding `127.0.0.1:0` and dropping the listener.
/// The kernel picks those from the ephemeral range, which outgoing
/// connections also use; to keep a client connection from taking a port
/// before the replica listens on it, ports are drawn at random from just
/// below the ephemeral range first, and only fall back to port 0.
pub fn free_ports(n: usize) -> Vec<u16> {
    use rand::Rng;
    let mut guard = HANDED_OUT.lock().unwrap_or_else(|e| e.into_inner());
    let handed = guard.get_or_insert_with(HashSet::new);
    let low = ephemeral_low().saturating_sub(1);
    let mut rng = rand::rng();
    // Hold every listener until all are found so that none repeats.
    let mut held = Vec::new();
    let mut ports = Vec::new();
    let mut attempts = 0;
    while ports.len() < n {
        attempts += 1;
        let candidate: u16 = if low > 12_000 && attempts < 10_000 {
            rng.random_range(10_000..low)
        } else {
            0
        };
        if candidate != 0 && handed.contains(&candidate) {
            continue;
        }
        let Ok(listener) = TcpListener::bind(("127.0.0.1", candidate)) else {
            continue;
        };
        let port = listener.local_addr().expect("local_addr").port();
        if handed.insert(port) {
            ports.push(port);
            held.push(listener);
        }
    }
    ports
}

/// The first port of the kernel's ephemeral range (32768 if unknown).
fn ephemeral_low() -> u16 {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|p| p.parse().ok()))
        .unwrap_or(32768)
}

/// Polls `condition` every 50 ms until it returns `Some`, and returns that;
/// panics naming `what` if `timeout` passes first.
pub async fn wait_for<T, F, Fut>(timeout: Duration, what: &str, mut condition: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        let remaining = deadline.saturating_duration_since(Instant::now());
        if let Ok(Some(v)) = tokio::time::timeout(remaining, condition()).await {
            return v;
        }
        if Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Polls `condition` every 50 ms until it holds; panics naming `what` if
/// `timeout` passes first.
pub async fn wait_until<F, Fut>(timeout: Duration, what: &str, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let c = &mut condition;
    wait_for(timeout, what, || {
        let fut = c();
        async move { fut.await.then_some(()) }
    })
    .await
}

/// Runs `cmd` to completion, killing it if it takes longer than `timeout`.
/// Returns its output and how long it ran; `Err` if it timed out or could
/// not be started. Its stdin is empty.
pub async fn run_bin(
    cmd: tokio::process::Command,
    timeout: Duration,
) -> Result<(Output, Duration), String> {
    run_bin_with_input(cmd, None, timeout).await
}

/// Like [`run_bin`], writing `input` (if any) to the command's stdin.
pub async fn run_bin_with_input(
    mut cmd: tokio::process::Command,
    input: Option<Vec<u8>>,
    timeout: Duration,
) -> Result<(Output, Duration), String> {
    use tokio::io::AsyncWriteExt;
    cmd.stdin(if input.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .kill_on_drop(true);
    let shown = format!("{:?}", cmd.as_std());
    let shown: String = if shown.chars().count() > 300 {
        format!("{}…", shown.chars().take(300).collect::<String>())
    } else {
        shown
    };
    let started = Instant::now();
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("cannot start {shown}: {e}"))?;
    if let (Some(input), Some(mut stdin)) = (input, child.stdin.take()) {
        // A child that exits without reading all of it is not our concern
        // here (EPIPE); dropping stdin at the end closes it.
        tokio::spawn(async move {
            let _ = stdin.write_all(&input).await;
        });
    }
    match tokio::time::timeout(timeout, child.wait_with_output()).await {
        Ok(Ok(out)) => Ok((out, started.elapsed())),
        Ok(Err(e)) => Err(format!("waiting for {shown}: {e}")),
        // Dropping the future drops the child, which kills it (kill_on_drop).
        Err(_) => Err(format!("{shown} did not finish within {timeout:?}")),
    }
}

/// A `kv-client` command with the given arguments (nothing prepended).
pub fn kv_client_cli<I, S>(args: I) -> tokio::process::Command
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    let mut cmd = tokio::process::Command::new(bin_path("kv-client"));
    cmd.args(args);
    cmd
}

/// A `kv-server` command with the given arguments.
pub fn kv_server_cmd<I, S>(args: I) -> tokio::process::Command
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    let mut cmd = tokio::process::Command::new(bin_path("kv-server"));
    cmd.args(args);
    cmd
}

/// Describes a finished process for assertion messages.
pub fn describe(out: &Output) -> String {
    format!(
        "exit {:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).trim_end(),
        String::from_utf8_lossy(&out.stderr).trim_end()
    )
}

/// A fresh, empty temporary directory for one test (removed by its owner).
pub fn temp_dir(label: &str) -> PathBuf {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!(
        "kvpaxos-{label}-{}-{n}-{:08x}",
        std::process::id(),
        rand::random::<u32>()
    ));
    std::fs::create_dir_all(&dir)
        .unwrap_or_else(|e| panic!("cannot create {}: {e}", dir.display()));
    dir
}

/// Writes `dir/replica` listing `n` replicas (ids 1..=n) on fresh loopback
/// ports; returns its path and contents.
pub fn write_replica_file(dir: &Path, n: usize) -> (PathBuf, Replicas) {
    let ports = free_ports(2 * n);
    let mut text = String::from("# written by the kv-tests harness: ID CLIENT_ADDR PEER_ADDR\n");
    for i in 0..n {
        writeln!(
            text,
            "{} 127.0.0.1:{} 127.0.0.1:{}",
            i + 1,
            ports[2 * i],
            ports[2 * i + 1]
        )
        .unwrap();
    }
    let file = dir.join("replica");
    std::fs::write(&file, &text).unwrap_or_else(|e| panic!("cannot write {}: {e}", file.display()));
    let replicas = Replicas::parse(&text, &file).expect("the harness's replica file is valid");
    (file, replicas)
}

/// One HTTP/1.1 `GET path` to `addr` over plain TCP, bounded by 10 s:
/// the status code and the body. (The admin listener answers one request
/// a connection and closes it, so reading to the end is the whole answer.)
pub async fn http_get(addr: &str, path: &str) -> (u16, String) {
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\n\r\n");
    let raw = http_exchange(addr, request.as_bytes()).await;
    parse_http_response(&raw)
}

/// Writes `request` to `addr` and reads until the server closes, within
/// 10 s; panics on a connection error.
pub async fn http_exchange(addr: &str, request: &[u8]) -> Vec<u8> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    bounded(Duration::from_secs(10), "an HTTP exchange", async {
        let mut s = tokio::net::TcpStream::connect(addr)
            .await
            .unwrap_or_else(|e| panic!("connect to {addr}: {e}"));
        s.write_all(request).await.expect("send the request");
        let mut out = Vec::new();
        s.read_to_end(&mut out).await.expect("read the answer");
        out
    })
    .await
}

/// `(status code, body)` of a raw HTTP/1.1 response; panics if it is not one.
pub fn parse_http_response(raw: &[u8]) -> (u16, String) {
    let text = String::from_utf8_lossy(raw);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("not an HTTP response: {text:?}"));
    let code = head
        .strip_prefix("HTTP/1.1 ")
        .and_then(|rest| rest.get(..3))
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no status line: {head:?}"));
    let length: Option<usize> = head.lines().find_map(|l| {
        l.strip_prefix("Content-Length: ")
            .and_then(|n| n.trim().parse().ok())
    });
    if let Some(n) = length {
        assert_eq!(
            n,
            body.len(),
            "Content-Length and the body disagree: {head}"
        );
    }
    (code, body.to_string())
}

/// Sends signal `sig` to process `pid`.
///
/// The caller must know that `pid` is a process of this test (its own
/// unreaped child, or one whose command line it has just checked).
#[allow(unsafe_code)]
pub fn signal_pid(pid: u32, sig: libc::c_int) -> std::io::Result<()> {
    let pid = libc::pid_t::try_from(pid).map_err(std::io::Error::other)?;
    // SAFETY: kill(2) takes plain integers and touches no memory of ours.
    let rc = unsafe { libc::kill(pid, sig) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// One replica process of a [`Cluster`].
struct Node {
    client_addr: String,
    peer_addr: String,
    /// Its `--admin-addr`, if the cluster runs admin listeners.
    admin_addr: Option<String>,
    /// Its `--redis-addr`, if the cluster runs RESP listeners.
    redis_addr: Option<String>,
    data_dir: PathBuf,
    log: PathBuf,
    child: Option<Child>,
    paused: bool,
    /// Started with `--join` at this client address instead of the
    /// replica file (a replica added to a running cluster).
    join: Option<String>,
}

/// A cluster of real `kv-server` processes on loopback, in a temporary
/// directory holding the replica file, one data directory and one log file
/// per replica.
pub struct Cluster {
    dir: PathBuf,
    replicas_file: PathBuf,
    replicas: Replicas,
    nodes: BTreeMap<ReplicaId, Node>,
    server_bin: PathBuf,
    client_bin: PathBuf,
    /// Passed to every `kv-server` start, restarts included.
    server_args: Vec<String>,
    /// The directory of the certificates, when the cluster runs with TLS.
    tls: Option<PathBuf>,
    /// Whether starts get `--enable-fault-injection` (they do unless a test
    /// says otherwise: tests inject faults).
    fault_injection: bool,
}

/// Whether `KV_TEST_TLS` asks for TLS clusters.
pub fn tls_by_env() -> bool {
    std::env::var("KV_TEST_TLS").is_ok_and(|v| !v.is_empty() && v != "0")
}

/// Runs `kv-server certs` for `replicas_file` into `out`; panics on failure.
pub fn make_certs(replicas_file: &Path, out: &Path) {
    let output = Command::new(bin_path("kv-server"))
        .arg("certs")
        .arg("--replicas")
        .arg(replicas_file)
        .arg("--out")
        .arg(out)
        .output()
        .expect("run kv-server certs");
    assert!(
        output.status.success(),
        "kv-server certs: {}",
        describe(&output)
    );
}

/// How many replicas beyond its first `n` a TLS cluster has certificates
/// for: [`Cluster::add_node`] can add replicas up to id `n + SPARE_CERTS`.
pub const SPARE_CERTS: u64 = 32;

/// A replica file for `kv-server certs` only: ids 1..=`n` +
/// [`SPARE_CERTS`] on 127.0.0.1. A certificate names its replica
/// (`replica-N`) and the hosts of its addresses, not the ports, so the
/// certificates of the spare ids serve replicas added later on any
/// loopback ports, made by the same command and signed by the same CA as
/// the first `n`.
fn certs_file(dir: &Path, n: usize) -> PathBuf {
    let mut text = String::from("# for kv-server certs only: the ports are placeholders\n");
    for id in 1..=n as u64 + SPARE_CERTS {
        writeln!(
            text,
            "{id} 127.0.0.1:{} 127.0.0.1:{}",
            20_000 + 2 * id,
            20_001 + 2 * id
        )
        .unwrap();
    }
    let file = dir.join("replica-certs");
    std::fs::write(&file, &text).unwrap_or_else(|e| panic!("cannot write {}: {e}", file.display()));
    file
}

/// The TLS files of identity `name` (`replica-N`, `admin`, `writer`,
/// `reader`) in a directory `kv-server certs` wrote.
pub fn tls_files(dir: &Path, name: &str) -> kv_client::TlsFiles {
    kv_client::TlsFiles {
        ca: dir.join("ca.pem"),
        cert: dir.join(format!("{name}.pem")),
        key: dir.join(format!("{name}.key")),
    }
}

/// `--tls-ca A --tls-cert B --tls-key C` for identity `name`.
pub fn tls_args(dir: &Path, name: &str) -> Vec<String> {
    let f = tls_files(dir, name);
    let s = |p: PathBuf| p.to_str().expect("utf-8 path").to_string();
    vec![
        "--tls-ca".into(),
        s(f.ca),
        "--tls-cert".into(),
        s(f.cert),
        "--tls-key".into(),
        s(f.key),
    ]
}

impl Cluster {
    /// Writes a replica file for `n` replicas (ids 1..=n) on fresh loopback
    /// ports, starts all of them and waits until every one answers `status`
    /// and a leader exists.
    pub async fn start(n: usize) -> Cluster {
        Cluster::start_with_args(n, &[]).await
    }

    /// Like [`Cluster::start`], passing `server_args` (e.g.
    /// `["--snapshot-every", "50"]`) to every `kv-server` start and restart.
    pub async fn start_with_args(n: usize, server_args: &[&str]) -> Cluster {
        let mut cluster = Cluster::start_without_waiting(n, server_args);
        cluster.wait_ready(START_TIMEOUT).await;
        cluster
    }

    /// Like [`Cluster::start_with_args`] but returns as soon as the
    /// processes are spawned.
    pub fn start_without_waiting(n: usize, server_args: &[&str]) -> Cluster {
        Cluster::start_without_waiting_tls(n, server_args, tls_by_env())
    }

    /// A cluster with TLS on every port whatever `KV_TEST_TLS` says, ready.
    pub async fn start_tls(n: usize, server_args: &[&str]) -> Cluster {
        let mut cluster = Cluster::start_without_waiting_tls(n, server_args, true);
        cluster.wait_ready(START_TIMEOUT).await;
        cluster
    }

    /// Like [`Cluster::start_with_args`] (with TLS if `tls`), every replica
    /// also serving its admin HTTP endpoints on a free loopback port
    /// ([`Cluster::admin_addr`]).
    pub async fn start_with_admin(n: usize, server_args: &[&str], tls: bool) -> Cluster {
        let mut cluster = Cluster::start_inner(n, server_args, tls, true);
        cluster.wait_ready(START_TIMEOUT).await;
        cluster
    }

    /// Like [`Cluster::start_with_args`], without TLS (whatever
    /// `KV_TEST_TLS` says: Redis tools dial plain TCP), every replica also
    /// serving the Redis protocol on a free loopback port
    /// ([`Cluster::redis_addr`]).
    pub async fn start_with_redis(n: usize, server_args: &[&str]) -> Cluster {
        Cluster::start_redis(n, server_args, false).await
    }

    /// Like [`Cluster::start_with_redis`], with TLS on every port (the RESP
    /// port included: clients present a certificate from
    /// [`Cluster::tls_dir`]).
    pub async fn start_with_redis_tls(n: usize, server_args: &[&str]) -> Cluster {
        Cluster::start_redis(n, server_args, true).await
    }

    async fn start_redis(n: usize, server_args: &[&str], tls: bool) -> Cluster {
        let mut cluster = Cluster::build(n, server_args, tls, false);
        let mut ports = free_ports(n);
        for node in cluster.nodes.values_mut() {
            node.redis_addr = ports.pop().map(|p| format!("127.0.0.1:{p}"));
        }
        for id in cluster.ids() {
            cluster.spawn(id);
        }
        cluster.wait_ready(START_TIMEOUT).await;
        cluster
    }

    /// Replica `id`'s RESP listener (`host:port`); panics unless the
    /// cluster was started with [`Cluster::start_with_redis`].
    pub fn redis_addr(&self, id: ReplicaId) -> &str {
        self.node(id)
            .redis_addr
            .as_deref()
            .expect("the cluster was started with RESP listeners")
    }

    fn start_without_waiting_tls(n: usize, server_args: &[&str], tls: bool) -> Cluster {
        Cluster::start_inner(n, server_args, tls, false)
    }

    fn start_inner(n: usize, server_args: &[&str], tls: bool, admin: bool) -> Cluster {
        let mut cluster = Cluster::build(n, server_args, tls, admin);
        for id in cluster.ids() {
            cluster.spawn(id);
        }
        cluster
    }

    /// A cluster's directory, replica file and (empty) data directories,
    /// with no replica started: for a test that prepares the data first
    /// (a restore), then [`Cluster::spawn`]s each replica and waits with
    /// [`Cluster::wait_ready`].
    pub fn prepare(n: usize, server_args: &[&str]) -> Cluster {
        Cluster::build(n, server_args, tls_by_env(), false)
    }

    fn build(n: usize, server_args: &[&str], tls: bool, admin: bool) -> Cluster {
        assert!(n > 0, "a cluster needs at least one replica");
        let mut admin_ports = if admin { free_ports(n) } else { Vec::new() };
        let server_bin = bin_path("kv-server");
        let client_bin = bin_path("kv-client");
        let dir = temp_dir("cluster");
        let (replicas_file, replicas) = write_replica_file(&dir, n);
        std::fs::create_dir_all(dir.join("logs")).expect("create the log directory");
        let tls = tls.then(|| {
            let out = dir.join("tls");
            make_certs(&certs_file(&dir, n), &out);
            out
        });
        let nodes = replicas
            .replicas
            .iter()
            .map(|r| {
                (
                    r.id,
                    Node {
                        client_addr: r.client_addr.clone(),
                        peer_addr: r.peer_addr.clone(),
                        admin_addr: admin_ports.pop().map(|p| format!("127.0.0.1:{p}")),
                        redis_addr: None,
                        data_dir: dir.join("data").join(r.id.to_string()),
                        log: dir.join("logs").join(format!("replica-{}.log", r.id)),
                        child: None,
                        paused: false,
                        join: None,
                    },
                )
            })
            .collect();
        Cluster {
            dir,
            replicas_file,
            replicas,
            nodes,
            server_bin,
            client_bin,
            server_args: server_args.iter().map(|a| a.to_string()).collect(),
            tls,
            fault_injection: true,
        }
    }

    /// The replica ids, ascending.
    pub fn ids(&self) -> Vec<ReplicaId> {
        self.nodes.keys().copied().collect()
    }

    /// Replica `id`'s admin listener (`host:port`); panics unless the
    /// cluster was started with [`Cluster::start_with_admin`].
    pub fn admin_addr(&self, id: ReplicaId) -> &str {
        self.node(id)
            .admin_addr
            .as_deref()
            .expect("the cluster was started with admin listeners")
    }

    /// The cluster's temporary directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The certificates' directory, if the cluster runs with TLS.
    pub fn tls_dir(&self) -> Option<&Path> {
        self.tls.as_deref()
    }

    /// A client builder with this cluster's TLS (the `admin` identity), if
    /// it has TLS; no addresses yet.
    pub fn builder(&self) -> kv_client::ClientBuilder {
        let b = kv_client::Client::builder();
        match &self.tls {
            Some(dir) => b.tls(tls_files(dir, "admin")),
            None => b,
        }
    }

    /// The replica file.
    pub fn replicas_file(&self) -> &Path {
        &self.replicas_file
    }

    /// The parsed replica file.
    pub fn replicas(&self) -> &Replicas {
        &self.replicas
    }

    fn node(&self, id: ReplicaId) -> &Node {
        self.nodes
            .get(&id)
            .unwrap_or_else(|| panic!("no replica {id} in this cluster"))
    }

    fn node_mut(&mut self, id: ReplicaId) -> &mut Node {
        self.nodes
            .get_mut(&id)
            .unwrap_or_else(|| panic!("no replica {id} in this cluster"))
    }

    /// Replica `id`'s client address.
    pub fn client_addr(&self, id: ReplicaId) -> &str {
        &self.node(id).client_addr
    }

    /// Replica `id`'s peer address.
    pub fn peer_addr(&self, id: ReplicaId) -> &str {
        &self.node(id).peer_addr
    }

    /// Replica `id`'s data directory.
    pub fn data_dir(&self, id: ReplicaId) -> &Path {
        &self.node(id).data_dir
    }

    /// Replica `id`'s log file (stdout and stderr, across restarts).
    pub fn log_path(&self, id: ReplicaId) -> &Path {
        &self.node(id).log
    }

    /// Whether replica `id`'s process is running (started and not killed;
    /// a paused one counts as running).
    pub fn is_running(&mut self, id: ReplicaId) -> bool {
        let node = self.node_mut(id);
        match node.child.as_mut() {
            Some(child) => matches!(child.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// The ids of the replicas whose process is running.
    pub fn running(&mut self) -> Vec<ReplicaId> {
        self.ids()
            .into_iter()
            .filter(|&id| self.is_running(id))
            .collect()
    }

    /// Whether later starts and restarts get `--enable-fault-injection`
    /// (by default they do).
    pub fn set_fault_injection(&mut self, on: bool) {
        self.fault_injection = on;
    }

    /// A new replica `id` for this cluster, not started: fresh loopback
    /// ports, its own data directory and log. [`Cluster::spawn`] starts it
    /// with `--join` at replica `via`'s client address (add it with
    /// `member add` first). Returns its client and peer addresses. On a
    /// TLS cluster the id must be at most [`SPARE_CERTS`] beyond the
    /// replica file's (their certificates were made with the cluster's).
    pub fn add_node(&mut self, id: ReplicaId, via: ReplicaId) -> (String, String) {
        if let Some(dir) = &self.tls {
            assert!(
                tls_files(dir, &format!("replica-{id}")).cert.is_file(),
                "the harness made no certificate for replica {id} (TLS clusters have them for \
                 ids up to {} more than the replica file's)",
                SPARE_CERTS
            );
        }
        assert!(!self.nodes.contains_key(&id), "replica {id} exists already");
        let join = self.node(via).client_addr.clone();
        let ports = free_ports(2);
        let node = Node {
            client_addr: format!("127.0.0.1:{}", ports[0]),
            peer_addr: format!("127.0.0.1:{}", ports[1]),
            data_dir: self.dir.join("data").join(id.to_string()),
            log: self.dir.join("logs").join(format!("replica-{id}.log")),
            child: None,
            paused: false,
            join: Some(join),
            admin_addr: None,
            redis_addr: None,
        };
        let addrs = (node.client_addr.clone(), node.peer_addr.clone());
        self.nodes.insert(id, node);
        addrs
    }

    /// Starts replica `id`'s process (it must not be running).
    pub fn spawn(&mut self, id: ReplicaId) {
        assert!(
            !self.is_running(id),
            "replica {id} is already running; kill it first"
        );
        let server_bin = self.server_bin.clone();
        let replicas_file = self.replicas_file.clone();
        let mut server_args = self.server_args.clone();
        if let Some(dir) = &self.tls {
            server_args.extend(tls_args(dir, &format!("replica-{id}")));
        }
        if self.fault_injection {
            server_args.push("--enable-fault-injection".into());
        }
        if let Some(addr) = &self.node(id).admin_addr {
            server_args.push("--admin-addr".into());
            server_args.push(addr.clone());
        }
        if let Some(addr) = &self.node(id).redis_addr {
            server_args.push("--redis-addr".into());
            server_args.push(addr.clone());
        }
        let node = self.node_mut(id);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&node.log)
            .unwrap_or_else(|e| panic!("cannot open {}: {e}", node.log.display()));
        let log2 = log.try_clone().expect("clone the log file handle");
        let source: Vec<String> = match &node.join {
            None => vec!["--replicas".into(), replicas_file.display().to_string()],
            Some(addr) => vec![
                "--join".into(),
                addr.clone(),
                "--client-addr".into(),
                node.client_addr.clone(),
                "--peer-addr".into(),
                node.peer_addr.clone(),
            ],
        };
        let child = Command::new(&server_bin)
            .arg("--id")
            .arg(id.to_string())
            .args(&source)
            .arg("--data-dir")
            .arg(&node.data_dir)
            .args(&server_args)
            // The replica stops when this pipe closes: when the test
            // process ends, however it ends (a SIGKILL included), its
            // clusters do not outlive it.
            .arg("--exit-on-stdin-eof")
            .stdin(Stdio::piped())
            .stdout(log2)
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", server_bin.display()));
        node.child = Some(child);
        node.paused = false;
    }

    /// Kills replica `id` with SIGKILL and reaps it (no-op if not running).
    pub fn kill(&mut self, id: ReplicaId) {
        let node = self.node_mut(id);
        if let Some(mut child) = node.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        node.paused = false;
    }

    /// Kills several replicas with SIGKILL, signalling all of them before
    /// reaping any, so that they die as close to together as possible.
    pub fn kill_all(&mut self, ids: &[ReplicaId]) {
        let mut children = Vec::new();
        for &id in ids {
            let node = self.node_mut(id);
            if let Some(mut child) = node.child.take() {
                let _ = child.kill();
                children.push(child);
            }
            node.paused = false;
        }
        for mut child in children {
            let _ = child.wait();
        }
    }

    /// Stops replica `id` with SIGSTOP: it keeps its sockets but answers
    /// nothing until [`Cluster::resume`].
    pub fn pause(&mut self, id: ReplicaId) {
        self.signal(id, libc::SIGSTOP);
        self.node_mut(id).paused = true;
    }

    /// Continues a paused replica with SIGCONT.
    pub fn resume(&mut self, id: ReplicaId) {
        self.signal(id, libc::SIGCONT);
        self.node_mut(id).paused = false;
    }

    fn signal(&mut self, id: ReplicaId, sig: libc::c_int) {
        let node = self.node_mut(id);
        let child = node
            .child
            .as_mut()
            .unwrap_or_else(|| panic!("replica {id} is not running"));
        assert!(
            matches!(child.try_wait(), Ok(None)),
            "replica {id} has exited"
        );
        // Our own unreaped child: its pid cannot have been reused.
        let pid = child.id();
        signal_pid(pid, sig).unwrap_or_else(|e| panic!("kill({pid}, {sig}) failed: {e}"));
    }

    /// Kills replica `id` if it runs, starts it again on the same data
    /// directory and addresses, and waits until it answers `status`.
    pub async fn restart(&mut self, id: ReplicaId) {
        self.kill(id);
        self.spawn(id);
        self.wait_answers(id, START_TIMEOUT).await;
    }

    /// Waits until replica `id` answers `status`; panics (with its log tail)
    /// if its process exits or `timeout` passes.
    pub async fn wait_answers(&mut self, id: ReplicaId, timeout: Duration) -> ReplicaStatus {
        let deadline = Instant::now() + timeout;
        loop {
            self.assert_alive(id);
            if let Some(s) = self.status(id).await {
                return s;
            }
            if Instant::now() >= deadline {
                panic!("replica {id} did not answer status within {timeout:?}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until replica `id`'s process exits by itself and returns its
    /// exit status; panics if it is still running after `timeout`.
    pub async fn wait_exit(
        &mut self,
        id: ReplicaId,
        timeout: Duration,
    ) -> std::process::ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            let node = self.node_mut(id);
            let child = node
                .child
                .as_mut()
                .unwrap_or_else(|| panic!("replica {id} was not started"));
            if let Ok(Some(status)) = child.try_wait() {
                node.child = None;
                return status;
            }
            if Instant::now() >= deadline {
                panic!("replica {id} was expected to exit but still runs after {timeout:?}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Starts replica `id` on damaged data and asserts that it refuses:
    /// it exits unsuccessfully within 20 s, naming `file`, without a panic.
    /// Returns the exit status and what it logged on this start.
    pub async fn start_expecting_refusal(
        &mut self,
        id: ReplicaId,
        file: &str,
    ) -> (std::process::ExitStatus, String) {
        let log_before = self.log_text(id).len();
        self.spawn(id);
        let status = self.wait_exit(id, Duration::from_secs(20)).await;
        let log = self.log_text(id)[log_before..].to_string();
        assert!(
            !status.success(),
            "replica {id} started on damaged data: {log}"
        );
        assert!(log.contains(file), "the refusal should name {file}: {log}");
        assert!(!log.contains("panicked"), "{log}");
        (status, log)
    }

    /// The whole log of replica `id` (stdout and stderr, across restarts).
    pub fn log_text(&self, id: ReplicaId) -> String {
        std::fs::read_to_string(self.log_path(id)).unwrap_or_default()
    }

    /// Panics with a clear message if replica `id` was started and has
    /// exited on its own (a crash, or a refused start-up).
    pub fn assert_alive(&mut self, id: ReplicaId) {
        let node = self.node_mut(id);
        if let Some(child) = node.child.as_mut() {
            if let Ok(Some(status)) = child.try_wait() {
                panic!(
                    "replica {id} exited on its own with {status} (a crash, a refused \
                     start-up, or a signal from outside this test)"
                );
            }
        }
    }

    /// Waits until every running replica answers `status` and one of them
    /// says it leads. Panics at once if a replica exits meanwhile.
    pub async fn wait_ready(&mut self, timeout: Duration) -> ReplicaId {
        let deadline = Instant::now() + timeout;
        loop {
            for id in self.ids() {
                self.assert_alive(id);
            }
            let statuses = self.statuses().await;
            let mut all_answer = true;
            let mut leader = None;
            for (id, node) in &self.nodes {
                if node.child.is_none() {
                    continue;
                }
                match statuses.get(id).and_then(|s| s.as_ref()) {
                    Some(s) if s.leader => leader = Some(*id),
                    Some(_) => {}
                    None => all_answer = false,
                }
            }
            if all_answer {
                if let Some(l) = leader {
                    return l;
                }
            }
            if Instant::now() >= deadline {
                panic!(
                    "the cluster was not ready within {timeout:?} (every running replica \
                     answering status and a leader elected); last statuses: {statuses:#?}"
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// An SDK client with a short timeout for status polls.
    fn status_client(&self, addrs: Vec<String>) -> kv_client::Client {
        self.builder()
            .addrs(addrs)
            .timeout(STATUS_TIMEOUT)
            .build()
            .expect("build a status client")
    }

    /// Every replica's status (`None`: not running, paused, or no answer in
    /// time). Paused and dead replicas are not asked.
    pub async fn statuses(&self) -> BTreeMap<ReplicaId, Option<ReplicaStatus>> {
        let asked: Vec<(ReplicaId, String)> = self
            .nodes
            .iter()
            .filter(|(_, n)| n.child.is_some() && !n.paused)
            .map(|(id, n)| (*id, n.client_addr.clone()))
            .collect();
        let mut out: BTreeMap<ReplicaId, Option<ReplicaStatus>> =
            self.nodes.keys().map(|id| (*id, None)).collect();
        if asked.is_empty() {
            return out;
        }
        let client = self.status_client(asked.iter().map(|(_, a)| a.clone()).collect());
        let answers = tokio::time::timeout(STATUS_TIMEOUT * 2, client.status())
            .await
            .unwrap_or_default();
        for (addr, result) in answers {
            if let (Some((id, _)), Ok(status)) = (asked.iter().find(|(_, a)| *a == addr), result) {
                out.insert(*id, Some(status));
            }
        }
        out
    }

    /// Replica `id`'s status, or `None` if it does not answer in time.
    pub async fn status(&self, id: ReplicaId) -> Option<ReplicaStatus> {
        let node = self.node(id);
        if node.paused {
            return None;
        }
        let client = self.status_client(vec![node.client_addr.clone()]);
        let answers = tokio::time::timeout(STATUS_TIMEOUT * 2, client.status())
            .await
            .ok()?;
        answers.into_iter().find_map(|(_, r)| r.ok())
    }

    /// The replica that says it leads, if any. If several say so (an old
    /// leader that has not noticed yet), the one with the highest ballot.
    pub async fn leader(&self) -> Option<ReplicaId> {
        self.statuses()
            .await
            .into_values()
            .flatten()
            .filter(|s| s.leader)
            .max_by_key(|s| (s.ballot_round, s.id))
            .map(|s| s.id)
    }

    /// Waits until some replica says it leads, and returns it.
    pub async fn wait_for_leader(&self, timeout: Duration) -> ReplicaId {
        wait_for(timeout, "a leader", || self.leader()).await
    }

    /// Waits until every running, unpaused replica has applied the same
    /// index, at least `at_least`, and returns that index.
    pub async fn wait_applied_equal(&self, at_least: Slot, timeout: Duration) -> Slot {
        let deadline = Instant::now() + timeout;
        loop {
            let statuses = self.statuses().await;
            let applied: BTreeMap<ReplicaId, Option<Slot>> = self
                .nodes
                .iter()
                .filter(|(_, n)| n.child.is_some() && !n.paused)
                .map(|(id, _)| (*id, statuses[id].as_ref().map(|s| s.applied)))
                .collect();
            let values: HashSet<Option<Slot>> = applied.values().copied().collect();
            if values.len() == 1 {
                if let Some(Some(a)) = values.into_iter().next() {
                    if a >= at_least {
                        return a;
                    }
                }
            }
            if Instant::now() >= deadline {
                panic!(
                    "the replicas did not reach the same applied index (>= {at_least}) \
                     within {timeout:?}; last seen: {applied:?}"
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The highest applied index any answering replica reports (0 if none).
    pub async fn max_applied(&self) -> Slot {
        self.statuses()
            .await
            .into_values()
            .flatten()
            .map(|s| s.applied)
            .max()
            .unwrap_or(0)
    }

    /// Waits until every running, unpaused replica has applied at least
    /// `at_least`.
    pub async fn wait_all_applied(&self, at_least: Slot, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let statuses = self.statuses().await;
            let applied: BTreeMap<ReplicaId, Option<Slot>> = self
                .nodes
                .iter()
                .filter(|(_, n)| n.child.is_some() && !n.paused)
                .map(|(id, _)| (*id, statuses[id].as_ref().map(|s| s.applied)))
                .collect();
            if applied.values().all(|a| a.is_some_and(|a| a >= at_least)) {
                return;
            }
            if Instant::now() >= deadline {
                panic!(
                    "not every replica applied index {at_least} within {timeout:?}; \
                     last seen: {applied:?}"
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// An SDK client over every replica, with [`CLIENT_TIMEOUT`].
    pub fn client(&self) -> kv_client::Client {
        self.client_with_timeout(CLIENT_TIMEOUT)
    }

    /// An SDK client over every replica with the given per-operation timeout.
    pub fn client_with_timeout(&self, timeout: Duration) -> kv_client::Client {
        self.builder()
            .replicas(self.replicas.clone())
            .timeout(timeout)
            .build()
            .expect("build an SDK client")
    }

    /// Changes replica `id`'s failure injection (`set_faults`); panics if it
    /// does not answer.
    pub async fn set_faults(&self, id: ReplicaId, spec: kv_api::FaultSpec) -> kv_api::FaultReport {
        self.client_for(id)
            .set_faults(self.client_addr(id), spec)
            .await
            .unwrap_or_else(|e| panic!("set_faults at replica {id}: {e}"))
    }

    /// An SDK client that talks to replica `id` only (for local reads).
    pub fn client_for(&self, id: ReplicaId) -> kv_client::Client {
        self.builder()
            .addrs(vec![self.client_addr(id).to_string()])
            .timeout(CLIENT_TIMEOUT)
            .build()
            .expect("build an SDK client")
    }

    /// Runs `kv-client --replicas <file> ARGS...`, bounded by [`CLI_TIMEOUT`];
    /// panics if it does not finish in time.
    pub async fn cli(&self, args: &[&str]) -> Output {
        let mut full = vec![
            "--replicas",
            self.replicas_file.to_str().expect("utf-8 path"),
        ];
        full.extend_from_slice(args);
        self.run_cli(&full).await
    }

    /// Runs `kv-client --server <replica id's client address> ARGS...`.
    pub async fn cli_at(&self, id: ReplicaId, args: &[&str]) -> Output {
        let addr = self.client_addr(id).to_string();
        let mut full = vec!["--server", addr.as_str()];
        full.extend_from_slice(args);
        self.run_cli(&full).await
    }

    /// A `kv-client` command with this cluster's TLS arguments (the
    /// `admin` identity), if it has TLS; no other argument yet.
    pub fn cli_command(&self) -> tokio::process::Command {
        let mut cmd = tokio::process::Command::new(&self.client_bin);
        if let Some(dir) = &self.tls {
            cmd.args(tls_args(dir, "admin"));
        }
        cmd
    }

    /// Runs `kv-client ARGS...` as given, bounded by [`CLI_TIMEOUT`].
    pub async fn run_cli(&self, args: &[&str]) -> Output {
        let mut cmd = self.cli_command();
        cmd.args(args);
        match run_bin(cmd, CLI_TIMEOUT).await {
            Ok((out, _)) => out,
            Err(e) => panic!("{e}"),
        }
    }

    /// Runs the CLI like [`Cluster::cli`] and asserts it exited 0; returns
    /// its stdout.
    pub async fn cli_ok(&self, args: &[&str]) -> String {
        let out = self.cli(args).await;
        assert!(
            out.status.success(),
            "kv-client {args:?} failed: {}",
            describe(&out)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The last `lines` lines of replica `id`'s log.
    pub fn log_tail(&self, id: ReplicaId, lines: usize) -> String {
        let Ok(file) = std::fs::File::open(self.log_path(id)) else {
            return "(no log file)".into();
        };
        let all: Vec<String> = BufReader::new(file).lines().map_while(Result::ok).collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // SIGKILL ends paused (SIGSTOP) replicas too. Signal all before
        // reaping any so that the replicas die together.
        for node in self.nodes.values_mut() {
            if let Some(child) = node.child.as_mut() {
                let _ = child.kill();
            }
        }
        for node in self.nodes.values_mut() {
            if let Some(mut child) = node.child.take() {
                let _ = child.wait();
            }
        }
        let failed = std::thread::panicking();
        if failed {
            let mut report = format!("\n===== cluster in {} =====\n", self.dir.display());
            for id in self.ids() {
                let _ = writeln!(
                    report,
                    "----- replica {id} ({}), last {LOG_TAIL_LINES} log lines -----\n{}",
                    self.client_addr(id),
                    self.log_tail(id, LOG_TAIL_LINES)
                );
            }
            eprintln!("{report}");
        }
        if failed && std::env::var_os("KV_TEST_KEEP").is_some_and(|v| v != "0") {
            eprintln!("KV_TEST_KEEP: kept {}", self.dir.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// Parses `kv-client status` output: one JSON object a line.
pub fn parse_status_lines(stdout: &[u8]) -> Vec<serde_json::Value> {
    String::from_utf8_lossy(stdout)
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            serde_json::from_str(l)
                .unwrap_or_else(|e| panic!("status line is not JSON ({e}): {l:?}"))
        })
        .collect()
}

/// Runs `fut` with a time bound; panics naming `what` if it takes longer.
pub async fn bounded<T>(timeout: Duration, what: &str, fut: impl Future<Output = T>) -> T {
    match tokio::time::timeout(timeout, fut).await {
        Ok(v) => v,
        Err(_) => panic!("{what} did not finish within {timeout:?}"),
    }
}

/// The replicas' wire format, byte by byte, for tests that send hostile or
/// hand-made frames: a 4-byte big-endian length, then a tarpc
/// `ClientMessage` in bincode's default options (varint integers).
///
/// The message types here mirror tarpc's field for field, but carry the
/// deadline as the plain `Duration` it is on the wire, so that a test can
/// send deadlines no `Instant` could hold (u64::MAX seconds).
pub mod wire {
    use std::time::Duration;

    use bincode::Options;
    use serde::{Deserialize, Serialize};

    pub use kv_api::KvRequest;
    pub use kv_peer_api::PeerRequest;

    /// The bincode options of tarpc's `Bincode` codec (tokio-serde's
    /// default: `bincode::DefaultOptions`).
    pub fn options() -> impl Options + Copy {
        bincode::DefaultOptions::new()
    }

    /// tarpc's `trace::Context` as sent.
    #[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
    pub struct TraceContext {
        /// tarpc's `TraceId`: a u128 sent as 16 little-endian bytes.
        pub trace_id: [u8; 16],
        /// tarpc's `SpanId`.
        pub span_id: u64,
        /// tarpc's `SamplingDecision` (0 sampled, 1 unsampled).
        pub sampling_decision: SamplingDecision,
    }

    /// tarpc's `SamplingDecision`.
    #[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
    pub enum SamplingDecision {
        /// Sampled.
        Sampled,
        /// Not sampled.
        #[default]
        Unsampled,
    }

    /// tarpc's `context::Context` as sent: the deadline is relative.
    #[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
    pub struct Context {
        /// Time left until the deadline.
        pub deadline: Duration,
        /// Tracing.
        pub trace_context: TraceContext,
    }

    /// tarpc's `Request<T>`.
    #[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
    pub struct Request<T> {
        /// Deadline and tracing.
        pub context: Context,
        /// Unique per connection among requests in flight.
        pub id: u64,
        /// The service's request enum.
        pub message: T,
    }

    /// tarpc's `ClientMessage<T>`.
    #[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
    pub enum ClientMessage<T> {
        /// A request.
        Request(Request<T>),
        /// Cancels request `request_id`.
        Cancel {
            /// Tracing.
            trace_context: TraceContext,
            /// The request to cancel.
            request_id: u64,
        },
    }

    /// `payload` behind its length prefix.
    pub fn frame(payload: &[u8]) -> Vec<u8> {
        let len = u32::try_from(payload.len()).expect("a test frame under 4 GiB");
        let mut out = len.to_be_bytes().to_vec();
        out.extend_from_slice(payload);
        out
    }

    /// The payload of request `id` carrying `message` with `deadline` left.
    pub fn request_payload<T: Serialize>(id: u64, deadline: Duration, message: T) -> Vec<u8> {
        let msg = ClientMessage::Request(Request {
            context: Context {
                deadline,
                trace_context: TraceContext::default(),
            },
            id,
            message,
        });
        options()
            .serialize(&msg)
            .expect("a test message serializes")
    }

    /// A whole frame: request `id` carrying `message` with `deadline` left.
    pub fn request_frame<T: Serialize>(id: u64, deadline: Duration, message: T) -> Vec<u8> {
        frame(&request_payload(id, deadline, message))
    }

    /// The 15 bytes of issue 10, item 1: a `Request` whose deadline is
    /// u64::MAX seconds, cut off right after it (tarpc panicked computing
    /// `Instant::now() + deadline` before noticing the rest was missing).
    pub const DEADLINE_OVERFLOW: [u8; 15] = [
        0x00, 0x00, 0x00, 0x0b, 0x00, 0xfd, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x00,
    ];

    #[cfg(test)]
    mod tests {
        use super::*;

        /// The mirror types must be tarpc's layout exactly, or the hostile
        /// frames would test nothing: a message tarpc encodes decodes into
        /// the mirror, and the hand-made 15 bytes are what the mirror makes.
        #[test]
        fn the_mirror_matches_tarpc_encoding() {
            let mut ctx = tarpc::context::current();
            ctx.deadline = std::time::Instant::now() + Duration::from_secs(7);
            let real = tarpc::ClientMessage::Request(tarpc::Request {
                context: ctx,
                id: 42,
                message: KvRequest::Status {},
            });
            let bytes = options().serialize(&real).unwrap();
            let back: ClientMessage<KvRequest> = options().deserialize(&bytes).unwrap();
            let ClientMessage::Request(r) = back else {
                panic!("decoded as {back:?}");
            };
            assert_eq!(r.id, 42);
            assert!(matches!(r.message, KvRequest::Status {}));
            assert!(r.context.deadline > Duration::from_secs(6));
            assert!(r.context.deadline <= Duration::from_secs(7));
            // And the other way: the mirror's bytes are tarpc's.
            let again = options()
                .serialize(&ClientMessage::Request(Request {
                    context: r.context,
                    id: 42,
                    message: KvRequest::Status {},
                }))
                .unwrap();
            assert_eq!(again, bytes);

            let head = request_payload(0, Duration::new(u64::MAX, 0), KvRequest::Status {});
            assert_eq!(&DEADLINE_OVERFLOW[4..], &head[..11]);
        }
    }
}

/// The environment variable that turns on kv-server's test-only file layer
/// (`kv_server::storage::testing`): set to `1` in a test process before it
/// starts any replica, the replicas it starts (which inherit its
/// environment) record every log write not yet covered by a sync, so that
/// [`Cluster::power_cut`] can undo them.
pub const UNSYNCED_JOURNAL_ENV: &str = kv_server::storage::testing::ENV;

impl Cluster {
    /// Applies a power cut to stopped replica `id`'s data directory: what
    /// its log says never reached the disk (needs [`UNSYNCED_JOURNAL_ENV`])
    /// is undone, the last write possibly torn, choosing with `seed`.
    /// Returns what was undone.
    pub fn power_cut(&mut self, id: ReplicaId, seed: u64) -> String {
        assert!(
            !self.is_running(id),
            "replica {id} is running; kill it before cutting its power"
        );
        let dir = self.data_dir(id).to_path_buf();
        kv_server::storage::testing::power_cut(&dir, seed)
            .unwrap_or_else(|e| panic!("power cut of {}: {e}", dir.display()))
    }
}
