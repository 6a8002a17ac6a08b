//! `kv-server cluster`: runs every replica of a replica file on this machine
//! as child processes of one [`Supervisor`].
//!
//! Each child is this same executable started with `--id N --replicas FILE
//! --data-dir DIR/N`. One watcher task per child owns its [`Child`] handle:
//! it waits for the exit and is the only one to signal the process, so a
//! signal can never reach a pid that was already reaped and reused. The
//! supervisor talks to the watchers through channels and learns of every
//! exit on one queue, which is where a later chaos mode restarts replicas.
//!
//! The children are started in their own process group, so Ctrl-C at a
//! terminal reaches only the supervisor, which then stops them in order
//! (SIGTERM, SIGKILL after a grace period). Their stdin is a pipe that the
//! supervisor holds open and they run with `--exit-on-stdin-eof`: should the
//! supervisor die without cleaning up (SIGKILL), the pipe closes and the
//! replicas stop by themselves instead of holding their ports forever.

use std::collections::BTreeMap;
use std::future::Future;
use std::io::Write;
use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use anyhow::Context;
use kv_api::replicas::{ReplicaAddr, Replicas};
use kv_api::ReplicaId;
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::process::{Child, ChildStdin, Command};
use tokio::sync::mpsc;
use tokio::time::{timeout, timeout_at, Instant};

/// How long the replicas get to stop after SIGTERM before they are killed.
pub const DEFAULT_GRACE: Duration = Duration::from_secs(5);

/// How long to wait for killed replicas to be reaped before giving up.
const KILL_WAIT: Duration = Duration::from_secs(5);

/// How long a watcher waits, after its child exited, for the child's last
/// output lines to be copied (a grandchild could hold the pipes open).
const DRAIN_WAIT: Duration = Duration::from_secs(1);

/// Capacity of each watcher's control queue: it only ever holds a SIGTERM
/// and a SIGKILL request.
const CONTROL_QUEUE: usize = 4;

/// Runs the replicas of one replica file as child processes and stops them.
pub struct Supervisor {
    exe: PathBuf,
    replicas: Replicas,
    replica_file: PathBuf,
    data_dir: PathBuf,
    grace: Duration,
    running: BTreeMap<ReplicaId, Running>,
    exits_tx: mpsc::Sender<Exited>,
    exits: mpsc::Receiver<Exited>,
}

/// A replica process the supervisor started and has not yet seen exit.
struct Running {
    pid: u32,
    control: mpsc::Sender<Control>,
    /// Held open for the child's `--exit-on-stdin-eof`; dropping it (or the
    /// supervisor dying) tells the child to stop.
    _stdin: Option<ChildStdin>,
}

/// A request to a watcher.
#[derive(Clone, Copy, Debug)]
enum Control {
    /// Send SIGTERM: stop cleanly.
    Terminate,
    /// Send SIGKILL.
    Kill,
}

/// A child's exit, as reported by its watcher.
struct Exited {
    id: ReplicaId,
    pid: u32,
    status: std::io::Result<ExitStatus>,
}

impl Supervisor {
    /// A supervisor that will run every replica of `replicas` (read from
    /// `replica_file`) with `exe`, replica N keeping its data in
    /// `data_dir/N`.
    pub fn new(
        exe: PathBuf,
        replicas: Replicas,
        replica_file: PathBuf,
        data_dir: PathBuf,
    ) -> Supervisor {
        // Every watcher holds a sender; one slot per replica means a watcher
        // never waits long to report.
        let (exits_tx, exits) = mpsc::channel(replicas.replicas.len().max(1));
        Supervisor {
            exe,
            replicas,
            replica_file,
            data_dir,
            grace: DEFAULT_GRACE,
            running: BTreeMap::new(),
            exits_tx,
            exits,
        }
    }

    /// Sets how long the replicas get to stop after SIGTERM before SIGKILL.
    pub fn with_grace(mut self, grace: Duration) -> Supervisor {
        self.grace = grace;
        self
    }

    /// Starts every replica, prints where each listens, reports unexpected
    /// exits, and stops them all when `shutdown` resolves. Fails if a replica
    /// cannot be started (the others are stopped first) or once every
    /// replica has exited by itself.
    pub async fn run(mut self, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
        tracing::info!(
            replicas = self.replicas.replicas.len(),
            file = %self.replica_file.display(),
            data_dir = %self.data_dir.display(),
            "starting the cluster"
        );
        for replica in self.replicas.replicas.clone() {
            if let Err(e) = self.start(&replica) {
                self.stop_all().await;
                return Err(e);
            }
        }

        tokio::pin!(shutdown);
        let result = loop {
            tokio::select! {
                _ = &mut shutdown => break Ok(()),
                Some(exit) = self.exits.recv() => {
                    self.running.remove(&exit.id);
                    report(format_args!(
                        "replica {} exited unexpectedly: {} (pid {})",
                        exit.id,
                        describe(&exit.status),
                        exit.pid
                    ));
                    // Restarting it belongs here (chaos mode). Until then a
                    // cluster with no replica left has nothing to supervise.
                    if self.running.is_empty() {
                        break Err(anyhow::anyhow!("every replica has exited"));
                    }
                }
            }
        };
        self.stop_all().await;
        if result.is_ok() {
            report(format_args!("all replicas stopped"));
        }
        result
    }

    /// Starts one replica and prints its line.
    fn start(&mut self, replica: &ReplicaAddr) -> anyhow::Result<()> {
        let id = replica.id;
        let data_dir = self.data_dir.join(id.to_string());
        let mut child = Command::new(&self.exe)
            .arg("--id")
            .arg(id.to_string())
            .arg("--replicas")
            .arg(&self.replica_file)
            .arg("--data-dir")
            .arg(&data_dir)
            .arg("--exit-on-stdin-eof")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            // Backstop: if the supervisor unwinds without stopping it.
            .kill_on_drop(true)
            .spawn()
            .with_context(|| {
                format!(
                    "cannot start replica {id} ({}): check that the executable exists",
                    self.exe.display()
                )
            })?;
        let pid = child.id().unwrap_or_default();

        // `Child::wait` closes stdin, so take it out of the handle first.
        let stdin = child.stdin.take();
        let prefix = format!("[replica {id}] ");
        let mut copiers = Vec::new();
        if let Some(out) = child.stdout.take() {
            copiers.push(tokio::spawn(copy_lines(prefix.clone(), out)));
        }
        if let Some(err) = child.stderr.take() {
            copiers.push(tokio::spawn(copy_lines(prefix, err)));
        }
        let (control, control_rx) = mpsc::channel(CONTROL_QUEUE);
        tokio::spawn(watch(id, child, copiers, control_rx, self.exits_tx.clone()));

        report(format_args!(
            "replica {id} client {} peer {} pid {pid} data {}",
            replica.client_addr,
            replica.peer_addr,
            data_dir.display()
        ));
        self.running.insert(
            id,
            Running {
                pid,
                control,
                _stdin: stdin,
            },
        );
        Ok(())
    }

    /// Stops every running replica: SIGTERM, then SIGKILL for those still
    /// running after the grace period.
    async fn stop_all(&mut self) {
        if self.running.is_empty() {
            return;
        }
        tracing::info!(replicas = self.running.len(), "stopping the replicas");
        self.signal_all(Control::Terminate);
        self.reap_until(Instant::now() + self.grace).await;
        if self.running.is_empty() {
            return;
        }
        let late: Vec<String> = self
            .running
            .iter()
            .map(|(id, r)| format!("{id} (pid {})", r.pid))
            .collect();
        tracing::warn!(
            "replicas {} still running {:?} after SIGTERM, killing them",
            late.join(", "),
            self.grace
        );
        self.signal_all(Control::Kill);
        self.reap_until(Instant::now() + KILL_WAIT).await;
        for (id, r) in &self.running {
            tracing::error!(id, pid = r.pid, "replica did not exit after SIGKILL");
        }
    }

    fn signal_all(&self, request: Control) {
        for r in self.running.values() {
            // Full only if the same request is already queued; closed only if
            // the watcher is reporting the exit right now. Either is fine.
            let _ = r.control.try_send(request);
        }
    }

    /// Collects exits until every replica has exited or `deadline` passes.
    async fn reap_until(&mut self, deadline: Instant) {
        while !self.running.is_empty() {
            match timeout_at(deadline, self.exits.recv()).await {
                Ok(Some(exit)) => {
                    self.running.remove(&exit.id);
                    report(format_args!(
                        "replica {} stopped: {} (pid {})",
                        exit.id,
                        describe(&exit.status),
                        exit.pid
                    ));
                }
                Ok(None) | Err(_) => return,
            }
        }
    }
}

/// Owns one child: waits for it to exit, signals it on request, and reports
/// the exit once the child's last output lines have been copied.
async fn watch(
    id: ReplicaId,
    mut child: Child,
    copiers: Vec<tokio::task::JoinHandle<()>>,
    mut control: mpsc::Receiver<Control>,
    exits: mpsc::Sender<Exited>,
) {
    let pid = child.id().unwrap_or_default();
    let status = loop {
        tokio::select! {
            status = child.wait() => break status,
            Some(request) = control.recv() => match request {
                Control::Terminate => {
                    // `id()` is `None` once the child has been reaped, so
                    // the pid cannot belong to another process by now.
                    if let Some(pid) = child.id() {
                        if let Err(e) = terminate(pid) {
                            tracing::warn!(id, pid, "cannot send SIGTERM: {e}");
                        }
                    }
                }
                Control::Kill => {
                    if let Err(e) = child.start_kill() {
                        tracing::warn!(id, pid, "cannot send SIGKILL: {e}");
                    }
                }
            }
        }
    };
    for copier in copiers {
        let _ = timeout(DRAIN_WAIT, copier).await;
    }
    let _ = exits.send(Exited { id, pid, status }).await;
}

/// Copies a child's output to our stderr line by line, each line prefixed
/// (e.g. `[replica 3] `) and written in one piece so that lines of different
/// replicas do not interleave.
async fn copy_lines(prefix: String, stream: impl AsyncRead + Unpin) {
    let mut reader = BufReader::new(stream);
    let mut line = Vec::new();
    loop {
        line.clear();
        match reader.read_until(b'\n', &mut line).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {
                if !line.ends_with(b"\n") {
                    line.push(b'\n');
                }
                let mut out = Vec::with_capacity(prefix.len() + line.len());
                out.extend_from_slice(prefix.as_bytes());
                out.extend_from_slice(&line);
                let _ = std::io::stderr().lock().write_all(&out);
            }
        }
    }
}

/// Prints one line of the supervisor's report on stdout. Errors are ignored
/// (unlike `println!`, which panics): a reader that went away must not take
/// the supervisor, and with it the cleanup of the replicas, down.
fn report(line: std::fmt::Arguments<'_>) {
    let mut out = std::io::stdout().lock();
    let _ = out.write_fmt(line);
    let _ = out.write_all(b"\n");
    let _ = out.flush();
}

/// "exit status: 1", "signal: 9 (SIGKILL)", or why waiting failed.
fn describe(status: &std::io::Result<ExitStatus>) -> String {
    match status {
        Ok(status) => status.to_string(),
        Err(e) => format!("cannot wait for it: {e}"),
    }
}

/// Sends SIGTERM to a child process (tokio's `Child` can only send SIGKILL).
// The one unsafe call of the binary: `kill(2)` through libc, as neither std
// nor tokio offers another signal than SIGKILL.
#[allow(unsafe_code)]
fn terminate(pid: u32) -> std::io::Result<()> {
    let pid = libc::pid_t::try_from(pid)
        .map_err(|_| std::io::Error::other(format!("pid {pid} out of range")))?;
    // SAFETY: kill(2) takes two integers and touches no memory of ours. The
    // caller guarantees `pid` is an unreaped child of ours, so it names that
    // child and no other process.
    let rc = unsafe { libc::kill(pid, libc::SIGTERM) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// Serializes the tests below: a script written by one test while the
    /// other forks could fail to execute with ETXTBSY ("text file busy").
    static SERIAL: Mutex<()> = Mutex::new(());

    /// A fresh directory holding `script` as an executable file; the
    /// supervisor runs it in place of kv-server (it ignores the arguments).
    fn script_dir(name: &str, script: &str) -> (PathBuf, PathBuf) {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("kv-cluster-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let exe = dir.join("fake-replica");
        std::fs::write(&exe, script).unwrap();
        std::fs::set_permissions(&exe, std::fs::Permissions::from_mode(0o755)).unwrap();
        (dir, exe)
    }

    fn two_replicas() -> Replicas {
        Replicas::parse(
            "1 127.0.0.1:1 127.0.0.1:2\n2 127.0.0.1:3 127.0.0.1:4\n",
            "replica",
        )
        .unwrap()
    }

    /// Runs `test` on a fresh runtime, one test at a time.
    fn serial(test: impl Future<Output = ()>) {
        let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(test);
    }

    #[test]
    fn replicas_ignoring_sigterm_are_killed_after_the_grace_period() {
        serial(replicas_ignoring_sigterm_are_killed());
    }

    async fn replicas_ignoring_sigterm_are_killed() {
        let (dir, exe) = script_dir(
            "ignore-term",
            "#!/bin/sh\ntrap '' TERM\nwhile :; do sleep 0.1; done\n",
        );
        let grace = Duration::from_millis(300);
        let supervisor = Supervisor::new(exe, two_replicas(), "replica".into(), dir.join("data"))
            .with_grace(grace);
        let started = Instant::now();
        let shutdown = tokio::time::sleep(Duration::from_millis(300));
        let result = timeout(Duration::from_secs(30), supervisor.run(shutdown))
            .await
            .expect("the supervisor did not kill replicas that ignore SIGTERM");
        assert!(result.is_ok(), "{result:?}");
        assert!(started.elapsed() >= Duration::from_millis(300) + grace);
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn supervisor_fails_once_every_replica_has_exited() {
        serial(supervisor_fails_when_all_exit());
    }

    async fn supervisor_fails_when_all_exit() {
        let (dir, exe) = script_dir("all-exit", "#!/bin/sh\nexit 3\n");
        let supervisor = Supervisor::new(exe, two_replicas(), "replica".into(), dir.join("data"));
        let result = timeout(
            Duration::from_secs(30),
            supervisor.run(std::future::pending()),
        )
        .await
        .expect("the supervisor kept waiting with no replica left");
        let error = result.expect_err("no replica is left, yet the supervisor succeeded");
        assert!(
            error.to_string().contains("every replica has exited"),
            "{error}"
        );
        let _ = std::fs::remove_dir_all(dir);
    }
}
