//! `kv-server cluster`: runs every replica of a replica file on this machine
//! as child processes of one [`Supervisor`].
//!
//! Each child is this same executable started with `--id N --replicas FILE
//! --data-dir DIR/N`. One watcher task per child owns its [`Child`] handle:
//! it waits for the exit and is the only one to signal the process, so a
//! signal can never reach a pid that was already reaped and reused. The
//! supervisor talks to the watchers through channels and learns of every
//! exit on one queue.
//!
//! The children are started in their own process group, so Ctrl-C at a
//! terminal reaches only the supervisor, which then stops them in order
//! (SIGTERM, SIGKILL after a grace period). Their stdin is a pipe that the
//! supervisor holds open and they run with `--exit-on-stdin-eof`: should the
//! supervisor die without cleaning up (SIGKILL), the pipe closes and the
//! replicas stop by themselves instead of holding their ports forever.

//!
//! # Chaos mode
//!
//! With [`ChaosSettings`] (`kv-server cluster --chaos`) the supervisor also
//! watches the replicas' health and injects faults, in three separate parts:
//!
//! - [`ChaosPlan`] decides, and only decides: given its seeded RNG and who is
//!   up and down now, which fault comes next (SIGKILL or SIGSTOP a replica
//!   for how long) and when. It is pure, so a seed reproduces a schedule and
//!   the unit tests check that it never takes more than `max_down` replicas
//!   down at once.
//! - The [`Supervisor`] carries the decisions out on the processes (through
//!   the watchers), restarts killed replicas and resumes paused ones when
//!   their time is up, and restarts replicas that exit by themselves. It
//!   prints one `chaos: ...` line per action and a summary at shutdown, when
//!   it also resumes any paused replica before stopping them all.
//! - One health poller per replica calls the client API's `status` RPC every
//!   [`POLL_EVERY`] with a short deadline; a pure [`HealthTracker`] turns the
//!   answers into `health: ...` lines: a replica stopped answering, answers
//!   again, the leader changed.
//!
//! Should the supervisor itself be killed (SIGKILL) while a replica is
//! paused, that replica's process group is orphaned with a stopped member,
//! so the kernel sends it SIGHUP and SIGCONT, which ends it.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::future::Future;
use std::io::Write;
use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use kv_api::replicas::{ReplicaAddr, Replicas};
use kv_api::{KvClient, ReplicaId, ReplicaStatus};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::process::{Child, ChildStdin, Command};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::{sleep_until, timeout, timeout_at, Instant};

/// How long the replicas get to stop after SIGTERM before they are killed.
pub const DEFAULT_GRACE: Duration = Duration::from_secs(5);

/// How long to wait for killed replicas to be reaped before giving up.
const KILL_WAIT: Duration = Duration::from_secs(5);

/// How long a watcher waits, after its child exited, for the child's last
/// output lines to be copied (a grandchild could hold the pipes open).
const DRAIN_WAIT: Duration = Duration::from_secs(1);

/// Capacity of each watcher's control queue: at most a pause or kill, a
/// resume, a SIGTERM and a SIGKILL request are ever pending.
const CONTROL_QUEUE: usize = 8;

/// How often the health pollers ask each replica for its status.
pub const POLL_EVERY: Duration = Duration::from_millis(200);

/// How long a replica has to answer a status call (connecting included).
const STATUS_DEADLINE: Duration = Duration::from_millis(400);

/// Consecutive unanswered status calls after which a replica that answered
/// before counts as failed: one slow answer on a loaded machine is not a
/// failure.
const MISSES_FOR_FAILURE: u32 = 2;

/// Chaos mode restarts a replica that exited by itself after this delay,
/// doubled for every further exit within [`QUICK_EXIT`] of its start, up to
/// [`MAX_RESTART_DELAY`]: one that cannot start is not restarted in a loop.
const RESTART_DELAY: Duration = Duration::from_secs(1);
const QUICK_EXIT: Duration = Duration::from_secs(10);
const MAX_RESTART_DELAY: Duration = Duration::from_secs(30);

/// Runs the replicas of one replica file as child processes and stops them.
pub struct Supervisor {
    exe: PathBuf,
    replicas: Replicas,
    replica_file: PathBuf,
    data_dir: PathBuf,
    grace: Duration,
    chaos: Option<ChaosSettings>,
    /// Passed to every replica after the supervisor's own arguments.
    replica_args: Vec<String>,
    /// Certificates for the replicas (`--tls-dir`), and the admin identity
    /// the health checks dial with.
    tls: Option<(PathBuf, Arc<rustls::ClientConfig>)>,
    running: BTreeMap<ReplicaId, Running>,
    /// Each replica's admin listener (`--admin-addr`), on a loopback port
    /// chosen free at its first start and kept across restarts.
    admin: BTreeMap<ReplicaId, String>,
    /// Each replica's RESP listener (`--redis-addr`): the replica file's
    /// fourth column, else a loopback port chosen like the admin one.
    redis: BTreeMap<ReplicaId, String>,
    exits_tx: mpsc::Sender<Exited>,
    exits: mpsc::Receiver<Exited>,
}

/// A replica process the supervisor started and has not yet seen exit.
struct Running {
    pid: u32,
    started: Instant,
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
    /// Send SIGSTOP.
    Pause,
    /// Send SIGCONT.
    Resume,
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
            chaos: None,
            replica_args: Vec::new(),
            tls: None,
            running: BTreeMap::new(),
            admin: BTreeMap::new(),
            redis: BTreeMap::new(),
            exits_tx,
            exits,
        }
    }

    /// Sets how long the replicas get to stop after SIGTERM before SIGKILL.
    pub fn with_grace(mut self, grace: Duration) -> Supervisor {
        self.grace = grace;
        self
    }

    /// Passes `args` to every replica (e.g. `--enable-fault-injection`).
    pub fn with_replica_args(mut self, args: Vec<String>) -> Supervisor {
        self.replica_args = args;
        self
    }

    /// Runs the replicas with the certificates of `dir` (written by
    /// `kv-server certs`): replica N with `replica-N.pem`/`.key`, health
    /// checks as `admin`. Fails if the admin identity cannot be loaded.
    pub fn with_tls_dir(mut self, dir: Option<PathBuf>) -> anyhow::Result<Supervisor> {
        let Some(dir) = dir else {
            return Ok(self);
        };
        let admin = kv_api::tls::TlsFiles {
            ca: dir.join("ca.pem"),
            cert: dir.join("admin.pem"),
            key: dir.join("admin.key"),
        };
        let config = kv_api::tls::Tls::load(&admin)
            .and_then(|t| t.client_config())
            .with_context(|| format!("--tls-dir {}", dir.display()))?;
        self.tls = Some((dir, config));
        Ok(self)
    }

    /// Turns on chaos mode: health checks and fault injection.
    pub fn with_chaos(mut self, settings: ChaosSettings) -> Supervisor {
        self.chaos = Some(settings);
        self
    }

    /// Starts every replica, prints where each listens, reports unexpected
    /// exits (in chaos mode: restarts them, checks health and injects
    /// faults), and stops them all when `shutdown` resolves. Fails if a
    /// replica cannot be started (the others are stopped first) or, outside
    /// chaos mode, once every replica has exited by itself.
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
        let mut chaos = self.chaos.take().map(|settings| {
            let tls = self.tls.as_ref().map(|(_, config)| config.clone());
            Chaos::start(settings, &self.replicas, tls)
        });

        tokio::pin!(shutdown);
        let result = loop {
            let wake = chaos.as_ref().map(Chaos::next_wake);
            tokio::select! {
                _ = &mut shutdown => break Ok(()),
                Some(exit) = self.exits.recv() => {
                    if let Err(e) = self.on_exit(exit, chaos.as_mut()) {
                        break Err(e);
                    }
                }
                Some(observation) = recv_health(chaos.as_mut()) => {
                    if let Some(chaos) = chaos.as_mut() {
                        for event in chaos.health.observe(observation) {
                            report(format_args!("{event}"));
                        }
                    }
                }
                _ = sleep_until_some(wake) => {
                    if let Some(chaos) = chaos.as_mut() {
                        self.on_chaos_timer(chaos);
                    }
                }
            }
        };
        if let Some(chaos) = chaos.as_mut() {
            chaos.stop_health_checks();
            self.resume_paused(chaos);
        }
        self.stop_all().await;
        if result.is_ok() {
            report(format_args!("all replicas stopped"));
        }
        if let Some(chaos) = &chaos {
            report(format_args!("{}", chaos.summary()));
        }
        result
    }

    /// Every address the cluster's listeners have, from the replica file or
    /// chosen here, except the admin and RESP ones chosen for `id`.
    fn addresses_but(&self, id: ReplicaId) -> BTreeSet<String> {
        let chosen = self
            .admin
            .iter()
            .chain(&self.redis)
            .filter(|(r, _)| **r != id)
            .map(|(_, a)| a.clone());
        let listed = self.replicas.replicas.iter().flat_map(|r| {
            [
                Some(&r.client_addr),
                Some(&r.peer_addr),
                r.redis_addr.as_ref(),
            ]
            .into_iter()
            .flatten()
            .cloned()
        });
        chosen.chain(listed).collect()
    }

    /// Starts one replica and prints its line.
    fn start(&mut self, replica: &ReplicaAddr) -> anyhow::Result<()> {
        let id = replica.id;
        let data_dir = self.data_dir.join(id.to_string());
        // A port chosen here is kept across restarts, unless another
        // process took it meanwhile (between choosing it and the replica's
        // bind, or while the replica was down): the replica would then
        // fail to start again and again.
        // Nor one that any other listener of the cluster has: a port is
        // free again once chosen (and released) until its replica binds it,
        // so the next choice may return it (CI saw replicas 1 and 2 given
        // the same RESP port; replica 1 could not start, and the cluster
        // could never begin without it).
        let mut taken = self.addresses_but(id);
        let admin = listener_addr(id, "admin", self.admin.get(&id), &taken)?;
        self.admin.insert(id, admin.clone());
        let redis = match &replica.redis_addr {
            Some(addr) => addr.clone(),
            None => {
                taken.insert(admin.clone());
                listener_addr(id, "RESP", self.redis.get(&id), &taken)?
            }
        };
        self.redis.insert(id, redis.clone());
        let mut child = Command::new(&self.exe)
            .arg("--id")
            .arg(id.to_string())
            .arg("--replicas")
            .arg(&self.replica_file)
            .arg("--data-dir")
            .arg(&data_dir)
            .arg("--exit-on-stdin-eof")
            .arg("--admin-addr")
            .arg(&admin)
            .arg("--redis-addr")
            .arg(&redis)
            .args(&self.replica_args)
            .args(self.tls.iter().flat_map(|(dir, _)| {
                let file = |name: String| dir.join(name).into_os_string();
                [
                    "--tls-ca".into(),
                    file("ca.pem".into()),
                    "--tls-cert".into(),
                    file(format!("replica-{id}.pem")),
                    "--tls-key".into(),
                    file(format!("replica-{id}.key")),
                ]
            }))
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
        // On a line of its own: scripts match the line above field by field.
        report(format_args!("replica {id} admin {admin}"));
        report(format_args!("replica {id} redis {redis}"));
        self.running.insert(
            id,
            Running {
                pid,
                started: Instant::now(),
                control,
                _stdin: stdin,
            },
        );
        Ok(())
    }

    /// Handles a child's exit: expected after a chaos kill; otherwise
    /// reported, and in chaos mode the replica is restarted later.
    fn on_exit(&mut self, exit: Exited, chaos: Option<&mut Chaos>) -> anyhow::Result<()> {
        // Only the current process of a replica can be reported: a replica
        // is restarted only after its previous process was reaped.
        let Some(running) = self.running.remove(&exit.id) else {
            return Ok(());
        };
        let Some(chaos) = chaos else {
            report(format_args!(
                "replica {} exited unexpectedly: {} (pid {})",
                exit.id,
                describe(&exit.status),
                exit.pid
            ));
            // A cluster with no replica left has nothing to supervise.
            if self.running.is_empty() {
                return Err(anyhow::anyhow!("every replica has exited"));
            }
            return Ok(());
        };
        if let Some(down) = chaos.down.get_mut(&exit.id) {
            if down.cause == Cause::Killed {
                down.reaped = true;
                return Ok(());
            }
        }
        // Exited by itself (or killed by someone else), perhaps while paused.
        let quick = running.started.elapsed() < QUICK_EXIT;
        let exits = chaos.quick_exits.entry(exit.id).or_default();
        *exits = if quick { *exits + 1 } else { 0 };
        let delay = RESTART_DELAY
            .saturating_mul(1 << (*exits).min(5))
            .min(MAX_RESTART_DELAY);
        chaos.counts.unexpected_exits += 1;
        report(format_args!(
            "replica {} exited unexpectedly: {} (pid {}); restarting it in {}",
            exit.id,
            describe(&exit.status),
            exit.pid,
            seconds(delay)
        ));
        chaos.down.insert(
            exit.id,
            Down {
                cause: Cause::Exited,
                since: Instant::now(),
                until: Instant::now() + delay,
                reaped: true,
            },
        );
        Ok(())
    }

    /// Brings back the replicas whose down time is over, then injects the
    /// next fault if it is due.
    fn on_chaos_timer(&mut self, chaos: &mut Chaos) {
        let now = Instant::now();
        let due: Vec<ReplicaId> = chaos
            .down
            .iter()
            .filter(|(_, down)| down.ready() && down.until <= now)
            .map(|(id, _)| *id)
            .collect();
        for id in due {
            self.bring_back(id, chaos);
        }
        if chaos.next_fault <= now {
            self.inject(chaos);
            chaos.next_fault = now + chaos.plan.next_interval();
        }
    }

    /// Ends one replica's down time: resumes or restarts it.
    fn bring_back(&mut self, id: ReplicaId, chaos: &mut Chaos) {
        let Some(down) = chaos.down.get(&id).copied() else {
            return;
        };
        let was_down = seconds(down.since.elapsed());
        match down.cause {
            Cause::Paused => {
                chaos.down.remove(&id);
                if let Some(r) = self.running.get(&id) {
                    let _ = r.control.try_send(Control::Resume);
                    chaos.counts.resumes += 1;
                    report(format_args!(
                        "chaos: resume replica {id} (pid {}) after {was_down}",
                        r.pid
                    ));
                }
            }
            Cause::Killed | Cause::Exited => {
                let Some(replica) = self.replicas.get(id).cloned() else {
                    chaos.down.remove(&id);
                    return;
                };
                report(format_args!("chaos: restart replica {id} after {was_down}"));
                match self.start(&replica) {
                    Ok(()) => {
                        chaos.down.remove(&id);
                        chaos.counts.restarts += 1;
                    }
                    Err(e) => {
                        report(format_args!(
                            "chaos: cannot restart replica {id}: {e:#}; retrying in {}",
                            seconds(RESTART_DELAY)
                        ));
                        if let Some(down) = chaos.down.get_mut(&id) {
                            down.until = Instant::now() + RESTART_DELAY;
                        }
                    }
                }
            }
        }
    }

    /// Asks the plan for a fault and causes it.
    fn inject(&mut self, chaos: &mut Chaos) {
        let up: Vec<ReplicaId> = self
            .running
            .keys()
            .filter(|id| !chaos.down.contains_key(id))
            .copied()
            .collect();
        let Some(fault) = chaos.plan.next_fault(&up, chaos.down.len()) else {
            return;
        };
        let Some(r) = self.running.get(&fault.id) else {
            return;
        };
        let (control, cause) = match fault.kind {
            FaultKind::Kill => (Control::Kill, Cause::Killed),
            FaultKind::Pause => (Control::Pause, Cause::Paused),
        };
        if let Err(e) = r.control.try_send(control) {
            // The watcher is reporting the exit right now: the replica is
            // down already, and the exit will be handled as unexpected.
            tracing::warn!(id = fault.id, "cannot {control:?} the replica: {e}");
            return;
        }
        let now = Instant::now();
        chaos.down.insert(
            fault.id,
            Down {
                cause,
                since: now,
                until: now + fault.down_for,
                reaped: false,
            },
        );
        let (verb, back) = match fault.kind {
            FaultKind::Kill => {
                chaos.counts.kills += 1;
                ("kill", "restart in")
            }
            FaultKind::Pause => {
                chaos.counts.pauses += 1;
                ("pause", "resume in")
            }
        };
        report(format_args!(
            "chaos: {verb} replica {} (pid {}), {back} {}; {} of {} down",
            fault.id,
            r.pid,
            seconds(fault.down_for),
            chaos.down.len(),
            self.replicas.replicas.len()
        ));
    }

    /// Sends SIGCONT to every paused replica, so that none is left stopped
    /// and each can act on the SIGTERM that follows.
    fn resume_paused(&mut self, chaos: &mut Chaos) {
        let paused: Vec<ReplicaId> = chaos
            .down
            .iter()
            .filter(|(_, d)| d.cause == Cause::Paused)
            .map(|(id, _)| *id)
            .collect();
        for id in paused {
            chaos.down.remove(&id);
            if let Some(r) = self.running.get(&id) {
                let _ = r.control.try_send(Control::Resume);
                chaos.counts.resumes += 1;
                report(format_args!(
                    "chaos: resume replica {id} (pid {}) before stopping it",
                    r.pid
                ));
            }
        }
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
            Some(request) = control.recv() => {
                if let Control::Kill = request {
                    if let Err(e) = child.start_kill() {
                        tracing::warn!(id, pid, "cannot send SIGKILL: {e}");
                    }
                    continue;
                }
                let signal = match request {
                    Control::Terminate => libc::SIGTERM,
                    Control::Pause => libc::SIGSTOP,
                    Control::Resume | Control::Kill => libc::SIGCONT,
                };
                // `id()` is `None` once the child has been reaped, so the
                // pid cannot belong to another process by now.
                if let Some(pid) = child.id() {
                    if let Err(e) = send_signal(pid, signal) {
                        tracing::warn!(id, pid, "cannot send {request:?} signal: {e}");
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

/// "2.4 s".
fn seconds(d: Duration) -> String {
    format!("{:.1} s", d.as_secs_f64())
}

/// Sends `signal` to a child process (tokio's `Child` can only send SIGKILL).
// The one unsafe call of the binary: `kill(2)` through libc, as neither std
// nor tokio offers another signal than SIGKILL.
#[allow(unsafe_code)]
fn send_signal(pid: u32, signal: libc::c_int) -> std::io::Result<()> {
    let pid = libc::pid_t::try_from(pid)
        .map_err(|_| std::io::Error::other(format!("pid {pid} out of range")))?;
    // SAFETY: kill(2) takes two integers and touches no memory of ours. The
    // caller guarantees `pid` is an unreaped child of ours, so it names that
    // child and no other process.
    let rc = unsafe { libc::kill(pid, signal) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

// ------------------------------------------------------------ chaos mode

/// What `--chaos` was given.
#[derive(Clone, Debug)]
pub struct ChaosSettings {
    /// Seeds the fault schedule; the same seed repeats the same decisions.
    pub seed: u64,
    /// Never more than this many replicas down (killed, paused or exited)
    /// at once.
    pub max_down: usize,
    /// Time from one fault to the next.
    pub interval: MsRange,
    /// How long a killed replica stays down before it is restarted, or a
    /// paused one before it is resumed.
    pub down_for: MsRange,
}

/// A range of milliseconds, `MIN..MAX` (both included) or a single `N`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MsRange {
    /// The shortest time, in milliseconds.
    pub min: u64,
    /// The longest time, in milliseconds.
    pub max: u64,
}

impl MsRange {
    fn pick(&self, rng: &mut StdRng) -> Duration {
        Duration::from_millis(rng.random_range(self.min..=self.max))
    }
}

impl FromStr for MsRange {
    type Err = String;

    fn from_str(text: &str) -> Result<MsRange, String> {
        let number = |part: &str| {
            part.trim()
                .parse::<u64>()
                .map_err(|_| format!("{text:?} is not MIN..MAX in milliseconds, e.g. 300..800"))
        };
        let (min, max) = match text.split_once("..") {
            Some((min, max)) => (number(min)?, number(max.trim_start_matches('='))?),
            None => {
                let n = number(text)?;
                (n, n)
            }
        };
        if min > max {
            return Err(format!("{text:?}: the minimum is above the maximum"));
        }
        if max == 0 {
            return Err(format!("{text:?}: the maximum must be above 0 ms"));
        }
        Ok(MsRange { min, max })
    }
}

impl fmt::Display for MsRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}..{} ms", self.min, self.max)
    }
}

/// A fault the plan decided on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fault {
    /// The replica to take down.
    pub id: ReplicaId,
    /// How.
    pub kind: FaultKind,
    /// For how long.
    pub down_for: Duration,
}

/// How a replica is taken down.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FaultKind {
    /// SIGKILL, restarted later with the same arguments and data directory.
    Kill,
    /// SIGSTOP, continued later with SIGCONT.
    Pause,
}

/// The fault schedule: decides what to break and when, never does it.
/// Deterministic for a seed and the same sequence of states.
pub struct ChaosPlan {
    rng: StdRng,
    max_down: usize,
    interval: MsRange,
    down_for: MsRange,
}

impl ChaosPlan {
    /// The plan of `settings`, its RNG seeded with `settings.seed`.
    pub fn new(settings: &ChaosSettings) -> ChaosPlan {
        ChaosPlan {
            rng: StdRng::seed_from_u64(settings.seed),
            max_down: settings.max_down,
            interval: settings.interval,
            down_for: settings.down_for,
        }
    }

    /// How long to wait before the next fault.
    pub fn next_interval(&mut self) -> Duration {
        self.interval.pick(&mut self.rng)
    }

    /// The fault to cause now, given the replicas that are `up` (in any
    /// order) and how many are `down`: `None` if `max_down` replicas are
    /// down already or none is up (the turn is skipped).
    pub fn next_fault(&mut self, up: &[ReplicaId], down: usize) -> Option<Fault> {
        if down >= self.max_down || up.is_empty() {
            return None;
        }
        let mut candidates = up.to_vec();
        candidates.sort_unstable();
        let id = candidates[self.rng.random_range(0..candidates.len())];
        let kind = if self.rng.random_bool(0.5) {
            FaultKind::Kill
        } else {
            FaultKind::Pause
        };
        let down_for = self.down_for.pick(&mut self.rng);
        Some(Fault { id, kind, down_for })
    }
}

/// Why a replica is down.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Cause {
    /// We sent SIGKILL; restart when its time is up.
    Killed,
    /// We sent SIGSTOP; resume when its time is up.
    Paused,
    /// It exited by itself; restart after a delay.
    Exited,
}

/// A replica chaos mode has taken down (or seen exit) and will bring back.
#[derive(Clone, Copy, Debug)]
struct Down {
    cause: Cause,
    since: Instant,
    until: Instant,
    /// For `Killed`: whether its exit has been seen; it is restarted only
    /// then, so that the old process no longer holds its ports or files.
    reaped: bool,
}

impl Down {
    /// Whether it can be brought back once `until` has passed.
    fn ready(&self) -> bool {
        self.cause != Cause::Killed || self.reaped
    }
}

/// What chaos mode did, for the summary.
#[derive(Debug, Default)]
struct ChaosCounts {
    kills: u64,
    restarts: u64,
    pauses: u64,
    resumes: u64,
    unexpected_exits: u64,
}

/// The state of chaos mode inside [`Supervisor::run`].
struct Chaos {
    seed: u64,
    plan: ChaosPlan,
    next_fault: Instant,
    down: BTreeMap<ReplicaId, Down>,
    /// Consecutive exits soon after start, per replica (restart back-off).
    quick_exits: BTreeMap<ReplicaId, u32>,
    counts: ChaosCounts,
    health: HealthTracker,
    observations: mpsc::Receiver<Observation>,
    pollers: Vec<JoinHandle<()>>,
}

impl Chaos {
    /// Prints the settings (the seed first, to repeat the run), starts the
    /// health pollers and schedules the first fault.
    fn start(
        settings: ChaosSettings,
        replicas: &Replicas,
        tls: Option<Arc<rustls::ClientConfig>>,
    ) -> Chaos {
        let n = replicas.replicas.len();
        report(format_args!(
            "chaos: seed {} (repeat with --chaos-seed {}); a fault every {}, \
             each for {}; at most {} of {n} replicas down at once",
            settings.seed, settings.seed, settings.interval, settings.down_for, settings.max_down
        ));
        if settings.max_down >= replicas.quorum() {
            report(format_args!(
                "chaos: with {} down only {} of {n} would be left, fewer than a \
                 majority ({}): writes will stall until enough are back",
                settings.max_down,
                n.saturating_sub(settings.max_down),
                replicas.quorum()
            ));
        }
        let (tx, observations) = mpsc::channel(4 * n.max(1));
        let pollers = replicas
            .replicas
            .iter()
            .map(|r| {
                tokio::spawn(poll_health(
                    r.id,
                    r.client_addr.clone(),
                    tls.clone(),
                    tx.clone(),
                ))
            })
            .collect();
        let mut plan = ChaosPlan::new(&settings);
        let next_fault = Instant::now() + plan.next_interval();
        Chaos {
            seed: settings.seed,
            plan,
            next_fault,
            down: BTreeMap::new(),
            quick_exits: BTreeMap::new(),
            counts: ChaosCounts::default(),
            health: HealthTracker::new(replicas.replicas.iter().map(|r| r.id)),
            observations,
            pollers,
        }
    }

    /// When the supervisor must act next: the next fault, or a replica to
    /// bring back.
    fn next_wake(&self) -> Instant {
        self.down
            .values()
            .filter(|d| d.ready())
            .map(|d| d.until)
            .fold(self.next_fault, Instant::min)
    }

    fn stop_health_checks(&mut self) {
        for poller in &self.pollers {
            poller.abort();
        }
        self.observations.close();
    }

    fn summary(&self) -> String {
        let c = &self.counts;
        let h = &self.health.counts;
        format!(
            "chaos summary: seed {}; {} faults injected: {} kills, {} pauses; \
             {} restarts, {} resumes; {} unexpected exits; detected {} failures, \
             {} recoveries, {} leader changes",
            self.seed,
            c.kills + c.pauses,
            c.kills,
            c.pauses,
            c.restarts,
            c.resumes,
            c.unexpected_exits,
            h.failures,
            h.recoveries,
            h.leader_changes
        )
    }
}

async fn recv_health(chaos: Option<&mut Chaos>) -> Option<Observation> {
    match chaos {
        Some(chaos) => chaos.observations.recv().await,
        None => std::future::pending().await,
    }
}

async fn sleep_until_some(wake: Option<Instant>) {
    match wake {
        Some(wake) => sleep_until(wake).await,
        None => std::future::pending().await,
    }
}

// -------------------------------------------------------- health checks

/// One status poll of one replica.
#[derive(Debug)]
pub struct Observation {
    id: ReplicaId,
    at: Instant,
    /// The status, or why there is none.
    status: Result<ReplicaStatus, String>,
}

/// Polls one replica's `status` every [`POLL_EVERY`] until the receiver
/// goes away, redialling after every failed call (a tarpc client never
/// reconnects).
async fn poll_health(
    id: ReplicaId,
    addr: String,
    tls: Option<Arc<rustls::ClientConfig>>,
    observations: mpsc::Sender<Observation>,
) {
    let mut client = None;
    let mut ticks = tokio::time::interval(POLL_EVERY);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        let status = status_of(&addr, tls.as_ref(), &mut client).await;
        if status.is_err() {
            client = None;
        }
        let observation = Observation {
            id,
            at: Instant::now(),
            status,
        };
        if observations.send(observation).await.is_err() {
            return;
        }
    }
}

/// Asks the replica at `addr` for its status within [`STATUS_DEADLINE`],
/// dialling first if `client` is `None`.
pub(crate) async fn status_of(
    addr: &str,
    tls: Option<&Arc<rustls::ClientConfig>>,
    client: &mut Option<KvClient>,
) -> Result<ReplicaStatus, String> {
    let deadline = Instant::now() + STATUS_DEADLINE;
    let no_answer = || format!("no answer within {} ms", STATUS_DEADLINE.as_millis());
    let kv = match client {
        Some(kv) => kv,
        None => {
            let tls = match tls {
                None => None,
                Some(config) => Some((
                    config.clone(),
                    kv_api::tls::server_name_of(addr).map_err(|e| e.to_string())?,
                )),
            };
            let left = deadline.saturating_duration_since(Instant::now());
            let closed = Arc::new(std::sync::atomic::AtomicBool::new(false));
            let transport = match kv_server::net::dial(addr, left, closed, tls).await {
                Ok(transport) => transport,
                Err(e) if e.kind() == std::io::ErrorKind::TimedOut => return Err(no_answer()),
                Err(e) => return Err(e.to_string()),
            };
            client.insert(KvClient::new(tarpc::client::Config::default(), transport).spawn())
        }
    };
    let mut ctx = tarpc::context::current();
    ctx.deadline = deadline.into_std();
    match timeout_at(deadline, kv.status(ctx)).await {
        Ok(Ok(status)) => Ok(status),
        Ok(Err(tarpc::client::RpcError::DeadlineExceeded)) | Err(_) => Err(no_answer()),
        Ok(Err(e)) => Err(e.to_string()),
    }
}

/// Turns status polls into what a person watching wants to know: a replica
/// answers for the first time, stops answering, answers again; the leader
/// changes. Pure: time comes in with the observations.
pub struct HealthTracker {
    replicas: BTreeMap<ReplicaId, Seen>,
    /// The leader as last reported, `None` for no leader.
    leader: Option<ReplicaId>,
    /// The last leader there was: a change is counted when another takes
    /// over, not when the same one is seen again after a gap.
    last_leader: Option<ReplicaId>,
    counts: HealthCounts,
}

/// What the tracker knows of one replica.
#[derive(Debug, Default)]
struct Seen {
    answering: Answering,
    /// Consecutive unanswered polls.
    misses: u32,
    /// When the current state began.
    since: Option<Instant>,
    last: Option<ReplicaStatus>,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum Answering {
    /// Not yet answered since the supervisor started.
    #[default]
    Never,
    Yes,
    No,
}

#[derive(Debug, Default)]
struct HealthCounts {
    failures: u64,
    recoveries: u64,
    leader_changes: u64,
}

/// Something the health checks noticed, printed as one `health: ...` line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HealthEvent {
    /// The replica answered for the first time.
    Answers {
        /// The replica.
        id: ReplicaId,
        /// Its applied index.
        applied: u64,
    },
    /// A replica that answered before stopped answering.
    Failed {
        /// The replica.
        id: ReplicaId,
        /// Why the last poll failed.
        error: String,
    },
    /// A failed replica answers again.
    Recovered {
        /// The replica.
        id: ReplicaId,
        /// How long it did not answer.
        after: Duration,
        /// Its applied index.
        applied: u64,
    },
    /// Another replica (or none) now claims leadership.
    Leader {
        /// The new leader, if any.
        id: Option<ReplicaId>,
        /// The previous one, if any.
        was: Option<ReplicaId>,
        /// The new leader's ballot round.
        round: u64,
    },
}

impl fmt::Display for HealthEvent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HealthEvent::Answers { id, applied } => {
                write!(f, "health: replica {id} answers (applied {applied})")
            }
            HealthEvent::Failed { id, error } => {
                write!(f, "health: replica {id} stopped answering ({error})")
            }
            HealthEvent::Recovered { id, after, applied } => write!(
                f,
                "health: replica {id} answers again after {} (applied {applied})",
                seconds(*after)
            ),
            HealthEvent::Leader {
                id: Some(id),
                was,
                round,
            } => {
                write!(f, "health: leader is replica {id} (round {round}")?;
                match was {
                    Some(was) => write!(f, ", was replica {was})"),
                    None => write!(f, ")"),
                }
            }
            HealthEvent::Leader { id: None, was, .. } => {
                write!(f, "health: no answering replica leads")?;
                match was {
                    Some(was) => write!(f, " (was replica {was})"),
                    None => Ok(()),
                }
            }
        }
    }
}

impl HealthTracker {
    /// A tracker of the replicas `ids`, none of which has answered yet.
    pub fn new(ids: impl IntoIterator<Item = ReplicaId>) -> HealthTracker {
        HealthTracker {
            replicas: ids.into_iter().map(|id| (id, Seen::default())).collect(),
            leader: None,
            last_leader: None,
            counts: HealthCounts::default(),
        }
    }

    /// Takes in one poll and returns what changed.
    pub fn observe(&mut self, observation: Observation) -> Vec<HealthEvent> {
        let Observation { id, at, status } = observation;
        let mut events = Vec::new();
        let Some(seen) = self.replicas.get_mut(&id) else {
            return events;
        };
        match status {
            Ok(status) => {
                let applied = status.applied;
                match seen.answering {
                    Answering::Never => events.push(HealthEvent::Answers { id, applied }),
                    Answering::No => {
                        self.counts.recoveries += 1;
                        let after = seen.since.map(|s| at - s).unwrap_or_default();
                        events.push(HealthEvent::Recovered { id, after, applied });
                    }
                    Answering::Yes => {}
                }
                if seen.answering != Answering::Yes {
                    seen.answering = Answering::Yes;
                    seen.since = Some(at);
                }
                seen.misses = 0;
                seen.last = Some(status);
            }
            Err(error) => {
                seen.misses += 1;
                if seen.answering == Answering::Yes && seen.misses >= MISSES_FOR_FAILURE {
                    self.counts.failures += 1;
                    seen.answering = Answering::No;
                    // Down since the first missed poll, about.
                    let missed = POLL_EVERY.saturating_mul(MISSES_FOR_FAILURE - 1);
                    seen.since = Some(at.checked_sub(missed).unwrap_or(at));
                    events.push(HealthEvent::Failed { id, error });
                }
            }
        }
        // The leader: of the answering replicas that claim it, the one with
        // the highest ballot (an old leader may not know it was replaced).
        let leader = self
            .replicas
            .iter()
            .filter(|(_, s)| s.answering == Answering::Yes)
            .filter_map(|(id, s)| s.last.as_ref().map(|st| (id, st)))
            .filter(|(_, st)| st.leader)
            .max_by_key(|(id, st)| (st.ballot_round, **id))
            .map(|(id, st)| (*id, st.ballot_round));
        let leader_id = leader.map(|(id, _)| id);
        if leader_id != self.leader {
            let was = self.last_leader.filter(|&last| Some(last) != leader_id);
            if leader_id.is_some() {
                if was.is_some() {
                    self.counts.leader_changes += 1;
                }
                self.last_leader = leader_id;
            }
            events.push(HealthEvent::Leader {
                id: leader_id,
                was,
                round: leader.map(|(_, round)| round).unwrap_or_default(),
            });
            self.leader = leader_id;
        }
        events
    }
}

/// The address for replica `id`'s `what` listener, chosen here: `kept`
/// (the one of its last start) if nothing listens there now, else a new
/// free loopback port that is none of `taken`, reported when it replaces
/// `kept`.
fn listener_addr(
    id: ReplicaId,
    what: &str,
    kept: Option<&String>,
    taken: &BTreeSet<String>,
) -> anyhow::Result<String> {
    match kept {
        Some(addr) if still_free(addr) => Ok(addr.clone()),
        was => {
            let addr = untaken(taken, free_loopback_addr).with_context(|| {
                format!("cannot find a free loopback port for replica {id}'s {what} listener")
            })?;
            if let Some(was) = was {
                report(format_args!(
                    "replica {id}'s {what} listener moves from {was} to {addr}: another process \
                     took its port"
                ));
            }
            Ok(addr)
        }
    }
}

/// The first address `choose` gives that is none of `taken` (100 tries).
fn untaken(
    taken: &BTreeSet<String>,
    mut choose: impl FnMut() -> std::io::Result<String>,
) -> anyhow::Result<String> {
    for _ in 0..100 {
        let addr = choose()?;
        if !taken.contains(&addr) {
            return Ok(addr);
        }
    }
    anyhow::bail!("100 ports in a row were already another listener's")
}

/// Whether nothing listens on `addr` now (a replica restarted there can
/// bind it).
fn still_free(addr: &str) -> bool {
    std::net::TcpListener::bind(addr).is_ok()
}

/// `127.0.0.1:PORT` with a port nothing listens on now (bound, then
/// released: the window for another process to take it is small).
fn free_loopback_addr() -> std::io::Result<String> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(listener.local_addr()?.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_port_chosen_for_one_listener_is_never_chosen_for_another() {
        let taken: BTreeSet<String> = ["127.0.0.1:1".to_string()].into();
        let mut offers = ["127.0.0.1:1", "127.0.0.1:1", "127.0.0.1:2"].into_iter();
        let got = untaken(&taken, || Ok(offers.next().unwrap().to_string())).unwrap();
        assert_eq!(got, "127.0.0.1:2");
        let e = untaken(&taken, || Ok("127.0.0.1:1".to_string())).unwrap_err();
        assert!(e.to_string().contains("another listener's"), "{e}");
    }
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

    /// A port the supervisor chose for a replica's listener and another
    /// process took meanwhile is replaced at the next start; otherwise
    /// the replica would fail to bind it at every restart.
    #[test]
    fn a_listener_port_taken_meanwhile_is_replaced_at_the_next_start() {
        serial(async {
            let (dir, exe) = script_dir("taken-port", "#!/bin/sh\nexit 0\n");
            let mut supervisor =
                Supervisor::new(exe, two_replicas(), "replica".into(), dir.join("data"));
            let replica = supervisor.replicas.replicas[0].clone();
            supervisor.start(&replica).unwrap();
            let (admin, redis) = (supervisor.admin[&1].clone(), supervisor.redis[&1].clone());
            // Another process takes both ports while the replica is down.
            let _a = std::net::TcpListener::bind(&admin).unwrap();
            let _r = std::net::TcpListener::bind(&redis).unwrap();
            supervisor.running.clear();
            supervisor.start(&replica).unwrap();
            assert_ne!(supervisor.admin[&1], admin);
            assert_ne!(supervisor.redis[&1], redis);
            // Free ports are kept.
            let (admin, redis) = (supervisor.admin[&1].clone(), supervisor.redis[&1].clone());
            supervisor.running.clear();
            supervisor.start(&replica).unwrap();
            assert_eq!(
                (&supervisor.admin[&1], &supervisor.redis[&1]),
                (&admin, &redis)
            );
            let _ = std::fs::remove_dir_all(dir);
        });
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

    // ------------------------------------------------------- chaos plan

    fn settings(seed: u64, max_down: usize) -> ChaosSettings {
        ChaosSettings {
            seed,
            max_down,
            interval: MsRange { min: 100, max: 900 },
            down_for: MsRange {
                min: 500,
                max: 5000,
            },
        }
    }

    /// What happened in a simulated run: (time in ms, replica, event).
    type Trace = Vec<(u64, ReplicaId, &'static str)>;

    /// Runs a plan for `faults` fault turns against `n` simulated replicas
    /// in virtual time, bringing replicas back when their time is up the
    /// way the supervisor does, and checks the `max_down` bound after every
    /// step.
    fn simulate(seed: u64, n: u64, max_down: usize, turns: usize) -> Trace {
        let mut plan = ChaosPlan::new(&settings(seed, max_down));
        let ids: Vec<ReplicaId> = (1..=n).collect();
        let mut down: BTreeMap<ReplicaId, (u64, FaultKind)> = BTreeMap::new();
        let mut trace = Vec::new();
        let mut now = 0u64;
        let mut next_fault = plan.next_interval().as_millis() as u64;
        for _ in 0..turns {
            // Bring back everything due before the next fault.
            let mut due: Vec<(u64, ReplicaId, FaultKind)> = down
                .iter()
                .filter(|(_, (until, _))| *until <= next_fault)
                .map(|(id, (until, kind))| (*until, *id, *kind))
                .collect();
            due.sort_unstable_by_key(|(until, id, _)| (*until, *id));
            for (until, id, kind) in due {
                down.remove(&id);
                let what = match kind {
                    FaultKind::Kill => "restart",
                    FaultKind::Pause => "resume",
                };
                trace.push((until, id, what));
            }
            now = now.max(next_fault);
            let up: Vec<ReplicaId> = ids
                .iter()
                .copied()
                .filter(|id| !down.contains_key(id))
                .collect();
            if let Some(fault) = plan.next_fault(&up, down.len()) {
                assert!(up.contains(&fault.id), "{fault:?} is not up");
                let ms = fault.down_for.as_millis() as u64;
                assert!((500..=5000).contains(&ms), "{fault:?}");
                down.insert(fault.id, (now + ms, fault.kind));
                let what = match fault.kind {
                    FaultKind::Kill => "kill",
                    FaultKind::Pause => "pause",
                };
                trace.push((now, fault.id, what));
            }
            assert!(
                down.len() <= max_down,
                "seed {seed}: {} down, max {max_down}",
                down.len()
            );
            let wait = plan.next_interval().as_millis() as u64;
            assert!((100..=900).contains(&wait));
            next_fault = now + wait;
        }
        trace
    }

    #[test]
    fn chaos_plan_never_takes_more_than_max_down_replicas_down() {
        for max_down in 0..=5 {
            for seed in 0..20 {
                let trace = simulate(seed, 5, max_down, 500);
                // Replay the trace: the count of down replicas never
                // exceeds the bound, and the bound is reached when it can be.
                let mut down = 0usize;
                let mut peak = 0usize;
                for (_, _, what) in &trace {
                    match *what {
                        "kill" | "pause" => down += 1,
                        _ => down -= 1,
                    }
                    assert!(down <= max_down, "seed {seed} max {max_down}: {trace:?}");
                    peak = peak.max(down);
                }
                assert_eq!(peak, max_down, "seed {seed}: the bound is never reached");
            }
        }
    }

    #[test]
    fn chaos_plan_is_reproducible_from_its_seed() {
        let a = simulate(1, 5, 2, 300);
        assert_eq!(a, simulate(1, 5, 2, 300));
        assert_ne!(a, simulate(2, 5, 2, 300));
        // Both kinds of fault and both ways back occur.
        for what in ["kill", "pause", "restart", "resume"] {
            assert!(a.iter().any(|(_, _, w)| *w == what), "no {what}: {a:?}");
        }
    }

    #[test]
    fn chaos_plan_skips_its_turn_when_nothing_may_go_down() {
        let mut plan = ChaosPlan::new(&settings(7, 2));
        assert_eq!(plan.next_fault(&[1, 2, 3], 2), None);
        assert_eq!(plan.next_fault(&[], 0), None);
        let fault = plan.next_fault(&[4], 1).expect("one more may go down");
        assert_eq!(fault.id, 4);
        // The order of `up` does not matter.
        let mut a = ChaosPlan::new(&settings(9, 2));
        let mut b = ChaosPlan::new(&settings(9, 2));
        assert_eq!(a.next_fault(&[1, 2, 3], 0), b.next_fault(&[3, 1, 2], 0));
    }

    #[test]
    fn ms_ranges_parse() {
        assert_eq!("300..800".parse(), Ok(MsRange { min: 300, max: 800 }));
        assert_eq!("300..=800".parse(), Ok(MsRange { min: 300, max: 800 }));
        assert_eq!("500".parse(), Ok(MsRange { min: 500, max: 500 }));
        for bad in ["", "800..300", "a..b", "0", "0..0", "1..", "-1..5"] {
            assert!(bad.parse::<MsRange>().is_err(), "{bad:?} was accepted");
        }
    }

    // ---------------------------------------------------- health tracker

    fn status(id: ReplicaId, leader: bool, round: u64) -> ReplicaStatus {
        ReplicaStatus {
            id,
            leader,
            leader_id: leader.then_some(id),
            ballot_round: round,
            applied: 7,
            chosen: 7,
            snapshot: 0,
            keys: 1,
            sessions: 0,
            standing: "voter".into(),
            snapshots_installed: 0,
            duplicate_writes: 0,
            ..ReplicaStatus::default()
        }
    }

    fn seen(id: ReplicaId, at: Instant, status: Result<ReplicaStatus, String>) -> Observation {
        Observation { id, at, status }
    }

    #[test]
    fn health_tracker_reports_failures_recoveries_and_leader_changes() {
        let t0 = Instant::now();
        let ms = |n: u64| t0 + Duration::from_millis(n);
        let mut h = HealthTracker::new([1, 2, 3]);
        // Misses before the first answer are start-up, not failures.
        assert_eq!(h.observe(seen(1, ms(0), Err("refused".into()))), vec![]);
        assert_eq!(h.observe(seen(1, ms(200), Err("refused".into()))), vec![]);
        assert_eq!(
            h.observe(seen(1, ms(400), Ok(status(1, true, 1)))),
            vec![
                HealthEvent::Answers { id: 1, applied: 7 },
                HealthEvent::Leader {
                    id: Some(1),
                    was: None,
                    round: 1
                }
            ]
        );
        h.observe(seen(2, ms(400), Ok(status(2, false, 1))));
        // One miss is not a failure; two are.
        assert_eq!(h.observe(seen(1, ms(600), Err("timeout".into()))), vec![]);
        let events = h.observe(seen(1, ms(800), Err("timeout".into())));
        assert_eq!(
            events,
            vec![
                HealthEvent::Failed {
                    id: 1,
                    error: "timeout".into()
                },
                HealthEvent::Leader {
                    id: None,
                    was: Some(1),
                    round: 0
                }
            ]
        );
        assert_eq!(
            events[0].to_string(),
            "health: replica 1 stopped answering (timeout)"
        );
        let events = h.observe(seen(2, ms(1000), Ok(status(2, true, 2))));
        assert_eq!(
            events[0].to_string(),
            "health: leader is replica 2 (round 2, was replica 1)"
        );
        // The old leader comes back still believing it leads: the higher
        // ballot wins, so the leader does not change.
        let events = h.observe(seen(1, ms(1400), Ok(status(1, true, 1))));
        assert_eq!(
            events,
            vec![HealthEvent::Recovered {
                id: 1,
                after: Duration::from_millis(800),
                applied: 7
            }]
        );
        assert_eq!(h.counts.failures, 1);
        assert_eq!(h.counts.recoveries, 1);
        assert_eq!(h.counts.leader_changes, 1);
    }

    // ------------------------------------------------ chaos on processes

    #[test]
    fn paused_replicas_are_resumed_before_they_are_stopped() {
        serial(paused_replicas_are_resumed());
    }

    async fn paused_replicas_are_resumed() {
        // Replicas that exit at once on SIGTERM, once they run. A seed whose
        // first two faults are pauses, with long pauses: both replicas are
        // stopped (SIGSTOP) when the shutdown comes.
        let (dir, exe) = script_dir(
            "pause",
            "#!/bin/sh\ntrap 'exit 0' TERM\nwhile :; do sleep 0.05; done\n",
        );
        let pause_first = |seed: u64| {
            let mut plan = ChaosPlan::new(&ChaosSettings {
                seed,
                max_down: 2,
                interval: MsRange { min: 10, max: 20 },
                down_for: MsRange {
                    min: 60_000,
                    max: 60_000,
                },
            });
            plan.next_interval();
            let first = plan.next_fault(&[1, 2], 0);
            plan.next_interval();
            let up: Vec<ReplicaId> = [1, 2]
                .into_iter()
                .filter(|id| first.map(|f| f.id) != Some(*id))
                .collect();
            let second = plan.next_fault(&up, 1);
            [first, second]
                .iter()
                .all(|f| f.is_some_and(|f| f.kind == FaultKind::Pause))
        };
        let seed = (0..1000)
            .find(|s| pause_first(*s))
            .expect("a seed that pauses twice");
        let grace = Duration::from_secs(20);
        let supervisor = Supervisor::new(exe, two_replicas(), "replica".into(), dir.join("data"))
            .with_grace(grace)
            .with_chaos(ChaosSettings {
                seed,
                max_down: 2,
                interval: MsRange { min: 10, max: 20 },
                down_for: MsRange {
                    min: 60_000,
                    max: 60_000,
                },
            });
        let shutdown = tokio::time::sleep(Duration::from_millis(500));
        let started = Instant::now();
        let result = timeout(Duration::from_secs(60), supervisor.run(shutdown))
            .await
            .expect("the supervisor did not stop");
        assert!(result.is_ok(), "{result:?}");
        // Stopped replicas act on SIGTERM only once continued: without the
        // SIGCONT they would be killed after the grace period.
        assert!(
            started.elapsed() < grace,
            "paused replicas were not resumed before SIGTERM ({:?})",
            started.elapsed()
        );
        let _ = std::fs::remove_dir_all(dir);
    }
}
