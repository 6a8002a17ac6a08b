//! A small cluster harness for the `kv-client` end-to-end tests: real
//! `kv-server` processes on loopback ports picked by the OS, driven with the
//! real `kv-client` binary. Every process run is bounded in time, and the
//! replicas are killed when the [`Cluster`] is dropped (and, as a safety
//! net, stop by themselves when this test process dies: their stdin is a
//! pipe and they run with `--exit-on-stdin-eof`).

#![allow(dead_code)]

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::{Duration, Instant};

/// The `kv-client` binary under test.
pub const CLIENT: &str = env!("CARGO_BIN_EXE_kv-client");

/// How long a cluster may take to elect a leader (two shared cores may be
/// busy with other builds).
pub const START_TIMEOUT: Duration = Duration::from_secs(30);

/// The bound on one run of a binary.
pub const RUN_TIMEOUT: Duration = Duration::from_secs(30);

/// The profile directory of this test executable: `target/<profile>/deps/<exe>`
/// → `target/<profile>`.
pub fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("the path of the test executable");
    let mut dir = exe.parent().expect("a parent directory").to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    dir
}

/// The `kv-server` binary next to this test's target directory; panics with
/// the command that builds it when it is missing.
pub fn server_bin() -> PathBuf {
    let path = profile_dir().join("kv-server");
    if !path.is_file() {
        panic!(
            "the kv-server binary is missing at {}; build it first with \
             `cargo build --release -p kv-server` (for a release test run; \
             `cargo build -p kv-server` for a debug one), or run \
             `cargo test --workspace --release`, which builds it",
            path.display()
        );
    }
    path
}

/// The outcome of one run of a binary.
#[derive(Debug)]
pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stdout_bytes: Vec<u8>,
    pub stderr: String,
    pub took: Duration,
}

/// Runs `bin` with `args`, feeding `stdin` (closed after it), killing it
/// and failing if it runs longer than `limit`.
pub fn run_with(bin: &Path, args: &[&str], stdin: Option<&[u8]>, limit: Duration) -> Run {
    let started = Instant::now();
    let mut child = Command::new(bin)
        .args(args)
        .current_dir(std::env::temp_dir())
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {}: {e}", bin.display()));
    let feeder = stdin.map(|data| {
        let mut pipe = child.stdin.take().expect("a stdin pipe");
        let data = data.to_vec();
        std::thread::spawn(move || {
            let _ = pipe.write_all(&data);
        })
    });
    // Drain stdout and stderr on threads so that a chatty child never blocks.
    let mut out_pipe = child.stdout.take().expect("stdout pipe");
    let mut err_pipe = child.stderr.take().expect("stderr pipe");
    let out = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = std::io::Read::read_to_end(&mut out_pipe, &mut v);
        v
    });
    let err = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = std::io::Read::read_to_end(&mut err_pipe, &mut v);
        v
    });
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait for the child") {
            break s;
        }
        if started.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{} {args:?} did not finish within {limit:?}", bin.display());
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let took = started.elapsed();
    if let Some(f) = feeder {
        let _ = f.join();
    }
    let stdout_bytes = out.join().expect("stdout reader");
    let stderr = err.join().expect("stderr reader");
    Run {
        code: status.code().expect("killed by a signal"),
        stdout: String::from_utf8_lossy(&stdout_bytes).into_owned(),
        stdout_bytes,
        stderr: String::from_utf8_lossy(&stderr).into_owned(),
        took,
    }
}

/// Runs the `kv-client` binary.
pub fn client(args: &[&str]) -> Run {
    run_with(Path::new(CLIENT), args, None, RUN_TIMEOUT)
}

/// A fresh, empty directory for one test.
pub fn temp_dir(name: &str) -> PathBuf {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let dir = std::env::temp_dir().join(format!(
        "kv-client-e2e-{name}-{}-{nanos}",
        std::process::id()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A random loopback address of 127.0.0.0/8 other than 127.0.0.1, for one
/// test cluster. Ports found free on it cannot be taken meanwhile by the
/// ephemeral source ports of other tests' connections (those use
/// 127.0.0.1), so parallel tests do not collide.
pub fn cluster_ip() -> String {
    use rand::Rng;
    let mut rng = rand::rng();
    format!(
        "127.{}.{}.{}",
        rng.random_range(1..=254u8),
        rng.random_range(0..=255u8),
        rng.random_range(1..=254u8)
    )
}

/// `n` distinct ports free on `ip`: all bound at once, then released.
pub fn free_ports_on(ip: &str, n: usize) -> Vec<u16> {
    let listeners: Vec<std::net::TcpListener> = (0..n)
        .map(|_| std::net::TcpListener::bind((ip, 0)).expect("bind a loopback port"))
        .collect();
    listeners
        .iter()
        .map(|l| l.local_addr().expect("local addr").port())
        .collect()
}

/// `n` distinct loopback ports that were free a moment ago (all bound at
/// once, so none repeats, then released for the replicas to take).
pub fn free_ports(n: usize) -> Vec<u16> {
    let listeners: Vec<_> = (0..n)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0"))
        .collect();
    listeners
        .iter()
        .map(|l| l.local_addr().unwrap().port())
        .collect()
}

/// Replicas running in a temporary directory.
pub struct Cluster {
    pub dir: PathBuf,
    /// The replica file.
    pub file: PathBuf,
    /// Client addresses, in id order (replica i+1 at index i).
    pub addrs: Vec<String>,
    children: Vec<(Child, ChildStdin)>,
}

impl Cluster {
    /// Starts `n` replicas and waits until one of them is the leader and a
    /// write goes through. A port taken between finding it free and the
    /// replica binding it makes that replica exit; then the whole cluster
    /// is started again on new ports (at most three times).
    pub fn start(name: &str, n: usize) -> Cluster {
        let mut tries = 0;
        loop {
            tries += 1;
            let mut c = Cluster::spawn(name, n);
            match c.wait_for_leader() {
                Ok(()) => return c,
                Err(e) if tries < 3 => eprintln!("cluster start failed, retrying: {e}"),
                Err(e) => panic!("{e}"),
            }
        }
    }

    fn spawn(name: &str, n: usize) -> Cluster {
        let server = server_bin();
        let dir = temp_dir(name);
        let ip = cluster_ip();
        let ports = free_ports_on(&ip, 2 * n);
        let mut text = String::new();
        let mut addrs = Vec::new();
        for i in 0..n {
            let addr = format!("{ip}:{}", ports[i]);
            text.push_str(&format!("{} {addr} {ip}:{}\n", i + 1, ports[n + i]));
            addrs.push(addr);
        }
        let file = dir.join("replica");
        std::fs::write(&file, text).unwrap();
        let mut cluster = Cluster {
            dir: dir.clone(),
            file,
            addrs,
            children: Vec::new(),
        };
        for id in 1..=n {
            let log = std::fs::File::create(dir.join(format!("replica-{id}.log"))).unwrap();
            let mut child = Command::new(&server)
                .arg("--id")
                .arg(id.to_string())
                .arg("--replicas")
                .arg(&cluster.file)
                .arg("--data-dir")
                .arg(dir.join("data").join(id.to_string()))
                .arg("--exit-on-stdin-eof")
                // cli_cluster.rs tests `kv-client fault`.
                .arg("--enable-fault-injection")
                .env("RUST_LOG", "warn")
                .stdin(Stdio::piped())
                .stdout(log.try_clone().unwrap())
                .stderr(log)
                .spawn()
                .unwrap_or_else(|e| panic!("cannot start {}: {e}", server.display()));
            let stdin = child.stdin.take().expect("stdin pipe");
            cluster.children.push((child, stdin));
        }
        cluster
    }

    /// Polls `status` until a replica says it leads and a write succeeds;
    /// `Err` if a replica exits first. Panics after [`START_TIMEOUT`].
    fn wait_for_leader(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            let mut exited = None;
            for (i, (child, _)) in self.children.iter_mut().enumerate() {
                if let Ok(Some(s)) = child.try_wait() {
                    exited = Some((i + 1, s));
                }
            }
            if let Some((id, s)) = exited {
                return Err(format!(
                    "replica {id} exited at start ({s}):\n{}",
                    self.logs()
                ));
            }
            let r = self.cli(&["--timeout", "1", "status"]);
            if r.code == 0 && r.stdout.contains("\"leader\":true") {
                let w = self.cli(&["--timeout", "2", "put", "harness-ready", "yes"]);
                if w.code == 0 {
                    return Ok(());
                }
            }
            if Instant::now() > deadline {
                panic!(
                    "no leader within {START_TIMEOUT:?}; last status:\n{}\n{}",
                    r.stdout,
                    self.logs()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The tail of every replica's log.
    pub fn logs(&self) -> String {
        let mut s = String::new();
        for id in 1..=self.children.len() {
            let text = std::fs::read_to_string(self.dir.join(format!("replica-{id}.log")))
                .unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            s.push_str(&format!("--- replica {id} ---\n"));
            for l in &lines[lines.len().saturating_sub(20)..] {
                s.push_str(l);
                s.push('\n');
            }
        }
        s
    }

    fn args<'a>(&'a self, args: &[&'a str]) -> Vec<&'a str> {
        let mut all = vec!["--replicas", self.file.to_str().unwrap()];
        all.extend_from_slice(args);
        all
    }

    /// Runs `kv-client --replicas FILE ARGS...`.
    pub fn cli(&self, args: &[&str]) -> Run {
        run_with(Path::new(CLIENT), &self.args(args), None, RUN_TIMEOUT)
    }

    /// Runs `kv-client --replicas FILE ARGS...` with `stdin` as its input.
    pub fn cli_stdin(&self, args: &[&str], stdin: &[u8]) -> Run {
        run_with(
            Path::new(CLIENT),
            &self.args(args),
            Some(stdin),
            RUN_TIMEOUT,
        )
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for (child, _) in &mut self.children {
            let _ = child.kill();
        }
        for (child, _) in &mut self.children {
            let _ = child.wait();
        }
        if std::thread::panicking() {
            eprintln!("replica logs:\n{}", self.logs());
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
