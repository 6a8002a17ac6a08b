//! The `kv-server` binary: runs one kvpaxos replica, or (`kv-server cluster`)
//! every replica of a replica file on this machine as child processes.
//!
//! This file only parses arguments, sets up logging and the shutdown signal,
//! and maps errors to exit codes; the replica itself is [`kv_server::run`] and
//! the supervisor of `cluster` mode lives in [`cluster`].
//!
//! Exit codes (scripts and tests rely on them):
//! - 0: clean shutdown (Ctrl-C or SIGTERM);
//! - 2: bad usage or invalid configuration (malformed replica file, unknown
//!   `--id`), with `kv-server: <error>` on stderr naming the file and line,
//!   or a data directory another process is using (`kv-server: data
//!   directory X is in use by process N ...`), or a plain (non-TLS) address
//!   that is not loopback without `--insecure`, or a fault option without
//!   `--enable-fault-injection`;
//! - 1: any other failure (data directory not writable, cannot bind, damaged
//!   storage), with a one-line message on stderr.

mod certs;
mod cluster;

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use kv_api::replicas::Replicas;
use kv_server::{ServerConfig, ServerError};
use tokio::signal::unix::{signal, SignalKind};
use tracing_subscriber::EnvFilter;

/// Exit code of a bad command line or an invalid configuration (clap uses it too).
const EXIT_USAGE: u8 = 2;
/// Exit code of any other failure.
const EXIT_FAILURE: u8 = 1;

const LONG_ABOUT: &str = "\
A replica of kvpaxos, a fault-tolerant key-value store replicated with
Multi-Paxos.

With --id, runs the replica with that id from the replica file (lines of
`ID CLIENT_ADDR PEER_ADDR`): it keeps its log and snapshots in its data
directory, serves clients on CLIENT_ADDR and its peers on PEER_ADDR, and
stops cleanly on Ctrl-C or SIGTERM. Writes succeed while a majority of the
replicas of the file is up.

`kv-server cluster` runs every replica of the file on this machine as child
processes, prints where each one listens, and stops them all on Ctrl-C or
SIGTERM. With --chaos it also checks their health and kills, pauses,
restarts and resumes them at random, to watch the store survive.

Logs go to stderr; set the level with RUST_LOG (default: info, with the
RPC library's own events off: RUST_LOG=info,tarpc=debug shows them).";

const EXAMPLES: &str = "\
Examples:
  # Run replica 3 of ./replica, keeping its data in data/3
  kv-server --id 3

  # Run replica 1 of another file with its data elsewhere
  kv-server --id 1 --replicas /etc/kvpaxos/replica --data-dir /var/lib/kvpaxos

  # Run all five replicas of ./replica on this machine (data in data/1 .. data/5)
  kv-server cluster

  # The same, killing and pausing replicas at random, at most two at a time
  kv-server cluster --chaos

  # All five on TLS, with certificates from `kv-server certs --out tls`
  kv-server cluster --tls-dir tls

  # Let `kv-client fault` drop, delay or cut replica 1's peer messages
  kv-server --id 1 --enable-fault-injection

Exit status: 0 after a clean shutdown, 2 for bad usage, an invalid replica
file or id, a data directory another kv-server is using, or an address that
is not loopback without TLS or --insecure, 1 for other failures (data
directory, address in use, storage).";

#[derive(Debug, Parser)]
#[command(
    name = "kv-server",
    version,
    about = "Run a kvpaxos replica, or a whole cluster of them on this machine",
    long_about = LONG_ABOUT,
    after_help = EXAMPLES,
    args_conflicts_with_subcommands = true,
    subcommand_negates_reqs = true
)]
struct Cli {
    /// The id of the replica to run, as listed in the replica file
    /// (required unless a subcommand is given).
    #[arg(long, value_name = "ID", required = true, value_parser = clap::value_parser!(u64).range(1..))]
    id: Option<u64>,

    /// The replica file: one `ID CLIENT_ADDR PEER_ADDR [REDIS_ADDR]` a line. Only a new
    /// cluster's first configuration comes from it; after that the cluster
    /// keeps its own (`kv-client member`), and a replica whose file
    /// disagrees says so and follows the cluster's.
    #[arg(long, value_name = "FILE", default_value = "replica")]
    replicas: PathBuf,

    /// Join a running cluster instead of reading a replica file: ADDR is
    /// any member's client address. Add this replica first with `kv-client
    /// member add ID CLIENT_ADDR PEER_ADDR` (until then it waits, saying
    /// so); it starts as a learner with an empty data directory, gets the
    /// log or a snapshot, and votes once promoted (`kv-client member
    /// promote ID`). Restarted with the same flags, it starts from its
    /// data directory without asking anyone.
    #[arg(long, value_name = "ADDR", requires_all = ["client_addr", "peer_addr"], conflicts_with = "replicas")]
    join: Option<String>,

    /// With --join: where this replica serves clients (as given to
    /// `member add`).
    #[arg(long, value_name = "ADDR", requires = "join")]
    client_addr: Option<String>,

    /// With --join: where this replica serves its peers (as given to
    /// `member add`).
    #[arg(long, value_name = "ADDR", requires = "join")]
    peer_addr: Option<String>,

    /// Where this replica keeps its log and snapshots, created if missing
    /// [default: data/ID]
    #[arg(long, value_name = "DIR")]
    data_dir: Option<PathBuf>,

    /// Snapshot the map every N applied log entries, or sooner once the
    /// writes applied since the last snapshot add up to half the map's size
    /// (at least 128 MiB), and drop the log behind it (the last 1,000 writes,
    /// at most 8 MiB of them, are kept for peers slightly behind).
    #[arg(long, value_name = "N", default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..))]
    snapshot_every: u64,

    /// Serve every linearizable read only after a heartbeat round that a
    /// majority answers (a read index), never from the leader's lease. By
    /// default a leader that a majority answered within the last 135 ms
    /// serves reads at once: safe while no replica's clock (CLOCK_BOOTTIME)
    /// runs more than 5% fast or slow, and while every replica runs a
    /// version that keeps leases (this one or later): give this option to
    /// every replica during an upgrade from an older version (README,
    /// "Reads and leases"). Replicas with and without it may be mixed.
    #[arg(long)]
    no_read_lease: bool,

    /// Allow failure injection: the options below, and changes at run time
    /// with `kv-client fault` (the `set_faults` call), which otherwise
    /// answers "disabled" (a call that only reports is answered either
    /// way). Any client that reaches the client port can then cut this
    /// replica off: for tests and demonstrations, never in production.
    #[arg(long)]
    enable_fault_injection: bool,

    /// Failure injection: drop each outgoing peer message with probability P
    /// (0..=1). Changeable at run time with `kv-client fault`. Needs
    /// --enable-fault-injection, as do the four options below.
    #[arg(long, value_name = "P")]
    drop_rate: Option<f64>,

    /// Failure injection: delay each outgoing peer message by a random
    /// number of milliseconds in MIN..MAX.
    #[arg(long, value_name = "MIN..MAX", value_parser = parse_range)]
    delay_ms: Option<(u64, u64)>,

    /// Failure injection: hold each outgoing peer call until its deadline
    /// with probability P (a forced timeout).
    #[arg(long, value_name = "P")]
    timeout_rate: Option<f64>,

    /// Failure injection: cut the links with these replicas, both ways
    /// (comma-separated ids), as a network partition would.
    #[arg(long, value_name = "IDS", value_delimiter = ',')]
    isolate: Vec<u64>,

    /// Seed of the failure injector's random choices (default: random,
    /// logged), so that a run can be repeated.
    #[arg(long, value_name = "S")]
    fault_seed: Option<u64>,

    /// A client session idle (no write) for longer than this many seconds
    /// (fractions allowed) expires; a client's later write in it is refused
    /// and the SDK opens a new one. Idle time is measured by the log's
    /// clock, which the leader advances once a second. Taken from the
    /// replica that leads when the session is opened.
    #[arg(long, value_name = "SECS", default_value = "1800", value_parser = parse_secs)]
    session_ttl: Duration,

    /// Keep at most this many client sessions: opening one more evicts the
    /// least recently used. Taken from the replica that leads when a
    /// session is opened.
    #[arg(long, value_name = "N", default_value_t = kv_server::state::DEFAULT_MAX_SESSIONS, value_parser = clap::value_parser!(u64).range(1..))]
    max_sessions: u64,

    /// Serve without TLS on client or peer addresses that are not loopback.
    /// Without TLS or this, a replica refuses to start on such an address
    /// (anything but 127.0.0.0/8, ::1, or a name resolving only to them,
    /// such as localhost; 0.0.0.0 and [::] included): anyone who can reach
    /// a plain port can read and write the store and forge consensus
    /// messages. Only for a network you trust entirely.
    #[arg(long)]
    insecure: bool,

    /// Stop when standard input reaches end-of-file. `cluster` passes this
    /// to its children (with a pipe as stdin) so that they stop even if the
    /// supervisor itself is killed with SIGKILL.
    #[arg(long, hide = true)]
    exit_on_stdin_eof: bool,

    /// TLS: the CA certificates (PEM) that sign the cluster's
    /// certificates. With --tls-cert and --tls-key both ports speak TLS 1.3
    /// only and demand a certificate signed by one of these CAs: on the
    /// peer port one naming a replica (`replica-N`), on the client port a
    /// client's, whose role (read, write, admin) decides what it may do.
    /// Several CAs in the file are all trusted (for a rotation).
    #[arg(long, value_name = "FILE", requires_all = ["tls_cert", "tls_key"])]
    tls_ca: Option<PathBuf>,

    /// TLS: this replica's certificate (PEM), which must name it
    /// `replica-ID`; `kv-server certs` makes one for every replica.
    #[arg(long, value_name = "FILE", requires_all = ["tls_ca", "tls_key"])]
    tls_cert: Option<PathBuf>,

    /// TLS: this replica's private key (PEM).
    #[arg(long, value_name = "FILE", requires_all = ["tls_ca", "tls_cert"])]
    tls_key: Option<PathBuf>,

    /// Serve the admin HTTP endpoints on ADDR (host:port; off unless
    /// given): /metrics (Prometheus/OpenMetrics text), /livez (200 while
    /// the replica's loops turn), /readyz (200 when it knows a leader that
    /// is talking to it and is at most 1,000 entries behind it, else 503
    /// with the reason) and /status (its `kv-client status` line, JSON).
    /// With the --tls-* options it speaks TLS; /metrics and /status then
    /// need a client certificate with the admin role, the probes none.
    /// Like the other ports, a plain address must be loopback unless
    /// --insecure.
    #[arg(long, value_name = "ADDR")]
    admin_addr: Option<String>,

    /// Serve the Redis protocol (RESP2) on ADDR (host:port), for
    /// redis-cli, redis-benchmark and Redis client libraries; default: the
    /// replica file's fourth column for this replica, if it has one, else
    /// off. With the --tls-* options it speaks TLS and the client
    /// certificate's role decides what a connection may do. Like the other
    /// ports, a plain address must be loopback unless --insecure.
    #[arg(long, value_name = "ADDR")]
    redis_addr: Option<String>,

    /// How log lines are written to stderr: `text` for people, `json` for
    /// log shippers (one object a line: ts, level, target, replica, msg,
    /// fields).
    #[arg(long, value_name = "FORMAT", value_enum, default_value_t = kv_server::logging::LogFormat::Text)]
    log_format: kv_server::logging::LogFormat,

    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run every replica of the replica file on this machine as child
    /// processes; stop them all on Ctrl-C or SIGTERM.
    #[command(after_help = "\
Example:
  # Start the five replicas of ./replica, data in data/1 .. data/5
  kv-server cluster

  # The same, letting `kv-client fault` inject faults into them
  kv-server cluster --enable-fault-injection

  # Inject faults: at most 2 replicas down at once, a fault every 1 to 5 s
  kv-server cluster --chaos

  # Repeat a run's fault schedule, faster, and let a majority go down
  kv-server cluster --chaos --chaos-seed 42 --chaos-interval-ms 300..800 --max-down 3

Prints one line per replica: `replica ID client ADDR peer ADDR pid PID data DIR`,
and after it `replica ID admin ADDR`: each replica gets an admin listener
on a free loopback port (/metrics, /livez, /readyz, /status); then
`replica ID redis ADDR`: where it serves the Redis protocol (the replica
file's fourth column, else a free loopback port).
The replicas' log lines are copied to stderr prefixed with `[replica ID]`.

With --chaos, it polls every replica's status every 200 ms and prints
`health: ...` lines when one stops answering or answers again and when the
leader changes; it prints the seed first, one `chaos: ...` line per fault it
causes (kill, restart, pause, resume), and a summary when stopped. Paused
replicas are resumed before they are stopped, so none is left stopped.")]
    Cluster(ClusterArgs),
    /// Write a new cluster CA, a certificate and key for every replica of
    /// the replica file, and client certificates for the roles admin,
    /// write and read, ready for --tls-ca/--tls-cert/--tls-key.
    #[command(after_help = "\
Example:
  kv-server certs --replicas replica --out tls
  kv-server --id 1 --tls-ca tls/ca.pem --tls-cert tls/replica-1.pem --tls-key tls/replica-1.key
  kv-client --tls-ca tls/ca.pem --tls-cert tls/writer.pem --tls-key tls/writer.key put k v

Writes into DIR (created if missing; an existing file is never overwritten):
  ca.pem, ca.key                  the cluster CA; every replica and client
                                  trusts ca.pem. Keep ca.key offline: it
                                  signs identities, replicas never need it.
  replica-N.pem, replica-N.key    replica N: names `replica-N` (peers check
                                  it) and the hosts of its addresses
                                  (clients check them)
  admin.pem/.key                  a client with the role admin (everything,
                                  fault injection included)
  writer.pem/.key                 role write (reads and writes)
  reader.pem/.key                 role read (reads and status)
Keys are 0600. Certificates are valid for --days (the CA for ten years).

Rotating the CA: make a new set in another directory, give every replica
and client a --tls-ca file holding both CAs (cat old/ca.pem new/ca.pem),
restarting replicas one at a time; then move each to its new certificate
and key; then drop the old CA from the file, again one replica at a time.")]
    Certs(CertsArgs),
    /// Prepare one replica's data directory of a new cluster from a backup
    /// (`kv-client snapshot save`): checks the backup's checksum, then
    /// writes the snapshot and a log that continues after it. Run it once
    /// for every replica of the new replica file, from the same backup,
    /// then start the replicas as usual.
    #[command(after_help = "\
Example:
  kv-client snapshot save backup.snap                   # on the old cluster
  for id in 1 2 3 4 5; do
    kv-server restore backup.snap --id $id --replicas new/replica --data-dir new/data/$id
  done
  kv-server cluster --replicas new/replica --data-dir new/data

A damaged or truncated backup is refused with the reason (exit 1) and
nothing is written. DIR must be missing or empty (exit 2 otherwise): restore
never overwrites a replica's state. The restored replicas vote at once, as
the replicas of a new cluster: never restore into a cluster that runs.")]
    Restore(RestoreArgs),
}

/// Arguments of `kv-server restore`.
#[derive(Debug, Args)]
struct RestoreArgs {
    /// The backup: a snapshot file written by `kv-client snapshot save`.
    #[arg(value_name = "FILE")]
    file: PathBuf,

    /// The id of the replica whose data directory to prepare.
    #[arg(long, value_name = "ID", value_parser = clap::value_parser!(u64).range(1..))]
    id: u64,

    /// The new cluster's replica file.
    #[arg(long, value_name = "FILE", default_value = "replica")]
    replicas: PathBuf,

    /// The data directory to prepare (created; must be missing or empty)
    /// [default: data/ID]
    #[arg(long, value_name = "DIR")]
    data_dir: Option<PathBuf>,
}

/// Arguments of `kv-server certs`.
#[derive(Debug, Args)]
struct CertsArgs {
    /// The replica file: one `ID CLIENT_ADDR PEER_ADDR` a line.
    #[arg(long, value_name = "FILE", default_value = "replica")]
    replicas: PathBuf,

    /// Where to write the files (created if missing).
    #[arg(long, value_name = "DIR")]
    out: PathBuf,

    /// How many days the replica and client certificates are valid.
    #[arg(long, value_name = "N", default_value_t = 365, value_parser = clap::value_parser!(u64).range(1..=36_500))]
    days: u64,

    /// Move the validity window this many days into the past (tests make
    /// expired certificates with it).
    #[arg(long, value_name = "N", default_value_t = 0, hide = true)]
    backdate_days: u64,
}

/// Arguments of `kv-server cluster`.
#[derive(Debug, Args)]
struct ClusterArgs {
    /// Stop (stopping the replicas) when standard input reaches
    /// end-of-file: for a parent, such as a test, whose death must not
    /// leave the cluster running.
    #[arg(long, hide = true)]
    exit_on_stdin_eof: bool,

    /// The replica file: one `ID CLIENT_ADDR PEER_ADDR` a line.
    #[arg(long, value_name = "FILE", default_value = "replica")]
    replicas: PathBuf,

    /// The parent of the replicas' data directories (replica N uses DIR/N).
    #[arg(long, value_name = "DIR", default_value = "data")]
    data_dir: PathBuf,

    /// How long the replicas get to stop after SIGTERM before they are
    /// killed with SIGKILL.
    #[arg(long, value_name = "SECONDS", default_value = "5", value_parser = parse_seconds)]
    grace_period: Duration,

    /// Chaos mode: check the replicas' health and, at random moments, kill
    /// one (SIGKILL, restarted later with the same data) or pause it
    /// (SIGSTOP, resumed later with SIGCONT). Implies
    /// --enable-fault-injection.
    #[arg(long)]
    chaos: bool,

    /// Start the replicas with --enable-fault-injection, so that
    /// `kv-client fault` can make them drop, delay or cut peer messages.
    #[arg(long)]
    enable_fault_injection: bool,

    /// Start the replicas with --insecure: needed to serve a replica file
    /// whose addresses are not loopback without TLS.
    #[arg(long)]
    insecure: bool,

    /// Passed to every replica: see `kv-server --help` [default: the
    /// replicas' own, 1800]
    #[arg(long, value_name = "SECS", value_parser = parse_secs)]
    session_ttl: Option<Duration>,

    /// Passed to every replica: see `kv-server --help` [default: the
    /// replicas' own]
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    max_sessions: Option<u64>,

    /// Run the replicas with TLS, from a directory `kv-server certs` wrote:
    /// replica N gets DIR/ca.pem, DIR/replica-N.pem and DIR/replica-N.key;
    /// the health checks of --chaos use DIR/admin.pem and DIR/admin.key.
    #[arg(long, value_name = "DIR")]
    tls_dir: Option<PathBuf>,

    /// Seed of the fault schedule, to repeat a run [default: random,
    /// printed at start]
    #[arg(long, value_name = "SEED", requires = "chaos")]
    chaos_seed: Option<u64>,

    /// Never more than this many replicas down (killed or paused) at once.
    /// Below a majority's worth the store keeps serving writes; at or above,
    /// it refuses them until enough replicas are back.
    #[arg(long, value_name = "K", default_value = "2", requires = "chaos")]
    max_down: usize,

    /// Time between two faults, a random number of milliseconds in MIN..MAX.
    #[arg(
        long,
        value_name = "MIN..MAX",
        default_value = "1000..5000",
        requires = "chaos"
    )]
    chaos_interval_ms: cluster::MsRange,

    /// How long a killed or paused replica stays down, a random number of
    /// milliseconds in MIN..MAX.
    #[arg(
        long,
        value_name = "MIN..MAX",
        default_value = "1000..5000",
        requires = "chaos"
    )]
    chaos_down_ms: cluster::MsRange,
}

/// A non-negative number of seconds, fractions allowed (`0.5`).
fn parse_seconds(text: &str) -> Result<Duration, String> {
    text.parse::<f64>()
        .ok()
        .and_then(|secs| Duration::try_from_secs_f64(secs).ok())
        .ok_or_else(|| format!("{text:?} is not a number of seconds"))
}

/// A failure together with the exit code it deserves.
struct Failure {
    code: u8,
    message: String,
}

impl Failure {
    fn usage(error: impl std::fmt::Display) -> Failure {
        Failure {
            code: EXIT_USAGE,
            message: one_line(error),
        }
    }

    fn runtime(error: impl std::fmt::Display) -> Failure {
        Failure {
            code: EXIT_FAILURE,
            message: one_line(error),
        }
    }
}

/// The message of an error on one line. `{:#}` makes an `anyhow::Error` add
/// its causes (`context: cause`); the library's error types already name
/// their cause in their own message and ignore the flag, so nothing is
/// repeated.
fn one_line(error: impl std::fmt::Display) -> String {
    format!("{error:#}")
}

impl From<ServerError> for Failure {
    fn from(e: ServerError) -> Failure {
        match e {
            ServerError::Config(_) | ServerError::DataDirInUse { .. } => Failure::usage(e),
            _ => Failure::runtime(e),
        }
    }
}

fn main() -> ExitCode {
    // Parse before anything else: clap prints its own message and exits 2.
    let cli = Cli::parse();
    init_logging(cli.log_format, cli.id);
    // Everything a replica creates (log segments, snapshots, temporary
    // files, LOCK, directories) is for its own user only: 0600 files, 0700
    // directories. One process-wide setting covers every place a file is
    // created, now and later, where a mode at each creation could be
    // forgotten; the data directory itself is made 0700 when it is locked.
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o077));

    let result = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
        .map_err(Failure::runtime)
        .and_then(|runtime| runtime.block_on(run_cli(cli)));

    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure { code, message }) => {
            // Not `eprintln!`, which panics if stderr is gone (e.g. the pipe
            // of a supervisor that died).
            let _ = writeln!(std::io::stderr(), "kv-server: {message}");
            ExitCode::from(code)
        }
    }
}

/// Logs to stderr, level from `RUST_LOG`, `info` by default.
///
/// tarpc's own events are off by default: it logs every request whose
/// deadline passed at ERROR, client and server side, a rate anyone who can
/// reach a port controls, and our code logs what matters of peer calls
/// itself. `RUST_LOG=info,tarpc=debug` brings them back.
fn init_logging(format: kv_server::logging::LogFormat, replica: Option<u64>) {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info,tarpc=off"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // No colour codes in files and pipes (e.g. under `cluster`).
        .with_ansi(
            std::io::stderr().is_terminal() && format == kv_server::logging::LogFormat::Text,
        );
    match format {
        kv_server::logging::LogFormat::Text => builder.init(),
        kv_server::logging::LogFormat::Json => builder
            .event_format(kv_server::logging::JsonLines { replica })
            .init(),
    }
}

async fn run_cli(cli: Cli) -> Result<(), Failure> {
    // Listen for signals first, so that a SIGTERM arriving during start-up
    // shuts down cleanly instead of killing the process outright.
    let on_eof = cli.exit_on_stdin_eof
        || matches!(&cli.command, Some(Command::Cluster(a)) if a.exit_on_stdin_eof);
    let shutdown = Shutdown::listen(on_eof).map_err(Failure::runtime)?;
    match cli.command {
        Some(Command::Certs(args)) => {
            let replicas = Replicas::load(&args.replicas).map_err(Failure::usage)?;
            const DAY: Duration = Duration::from_secs(24 * 3600);
            let written = certs::generate(&certs::Request {
                replicas,
                out: args.out,
                valid_for: DAY * u32::try_from(args.days).unwrap_or(u32::MAX),
                backdate: DAY * u32::try_from(args.backdate_days).unwrap_or(u32::MAX),
                ca_valid_for: DAY * 3650,
            })
            .map_err(Failure::usage)?;
            let mut out = std::io::stdout().lock();
            for path in written {
                let _ = writeln!(out, "{}", path.display());
            }
            Ok(())
        }
        Some(Command::Restore(args)) => {
            let replicas = Replicas::load(&args.replicas).map_err(Failure::usage)?;
            let data_dir = args
                .data_dir
                .unwrap_or_else(|| PathBuf::from("data").join(args.id.to_string()));
            let restored = kv_server::restore::restore(&args.file, args.id, &replicas, &data_dir)?;
            let _ = writeln!(
                std::io::stdout().lock(),
                "restored replica {} from {} at log index {} ({} keys) into {}",
                args.id,
                args.file.display(),
                restored.index,
                restored.keys,
                restored.data_dir.display()
            );
            Ok(())
        }
        Some(Command::Cluster(args)) => {
            let replicas = Replicas::load(&args.replicas).map_err(Failure::usage)?;
            let exe = std::env::current_exe()
                .context("cannot find the kv-server executable to start the replicas")
                .map_err(Failure::runtime)?;
            let mut replica_args = Vec::new();
            if args.chaos || args.enable_fault_injection {
                replica_args.push("--enable-fault-injection".to_string());
            }
            if args.insecure {
                replica_args.push("--insecure".to_string());
            }
            if let Some(ttl) = args.session_ttl {
                replica_args.push("--session-ttl".to_string());
                replica_args.push(ttl.as_secs_f64().to_string());
            }
            if let Some(n) = args.max_sessions {
                replica_args.push("--max-sessions".to_string());
                replica_args.push(n.to_string());
            }
            let mut supervisor =
                cluster::Supervisor::new(exe, replicas, args.replicas, args.data_dir)
                    .with_grace(args.grace_period)
                    .with_replica_args(replica_args)
                    .with_tls_dir(args.tls_dir)
                    .map_err(Failure::usage)?;
            if args.chaos {
                supervisor = supervisor.with_chaos(cluster::ChaosSettings {
                    seed: args.chaos_seed.unwrap_or_else(rand::random),
                    max_down: args.max_down,
                    interval: args.chaos_interval_ms,
                    down_for: args.chaos_down_ms,
                });
            }
            supervisor
                .run(shutdown.wait())
                .await
                .map_err(Failure::runtime)
        }
        None => {
            // clap guarantees `--id` when there is no subcommand.
            let id = cli.id.ok_or_else(|| Failure::usage("--id is required"))?;
            if !cli.enable_fault_injection {
                refuse_fault_flags(&cli).map_err(Failure::usage)?;
            }
            let faults = kv_api::FaultSpec {
                drop_rate: cli.drop_rate,
                delay_ms: cli.delay_ms,
                timeout_rate: cli.timeout_rate,
                isolate: (!cli.isolate.is_empty()).then(|| cli.isolate.clone()),
                heal: false,
            };
            let tuning = Tuning {
                snapshot_every: cli.snapshot_every,
                read_lease: !cli.no_read_lease,
                enable_fault_injection: cli.enable_fault_injection,
                insecure: cli.insecure,
                faults,
                fault_seed: cli.fault_seed,
                session_ttl: cli.session_ttl,
                max_sessions: cli.max_sessions,
                tls: match (cli.tls_ca, cli.tls_cert, cli.tls_key) {
                    (Some(ca), Some(cert), Some(key)) => {
                        Some(kv_api::tls::TlsFiles { ca, cert, key })
                    }
                    _ => None,
                },
                admin_addr: cli.admin_addr,
                redis_addr: cli.redis_addr,
            };
            let source = match cli.join {
                Some(addr) => Source::Join {
                    addr,
                    client_addr: cli.client_addr.unwrap_or_default(),
                    peer_addr: cli.peer_addr.unwrap_or_default(),
                },
                None => Source::File(cli.replicas),
            };
            run_replica(id, source, cli.data_dir, tuning, shutdown).await
        }
    }
}

/// Refuses the failure injection options of a replica started without
/// `--enable-fault-injection`, naming the first one given.
fn refuse_fault_flags(cli: &Cli) -> Result<(), String> {
    let given = [
        ("--drop-rate", cli.drop_rate.is_some()),
        ("--delay-ms", cli.delay_ms.is_some()),
        ("--timeout-rate", cli.timeout_rate.is_some()),
        ("--isolate", !cli.isolate.is_empty()),
        ("--fault-seed", cli.fault_seed.is_some()),
    ];
    match given.iter().find(|(_, given)| *given) {
        Some((flag, _)) => Err(format!(
            "{flag} is failure injection, which is off unless kv-server is started with \
             --enable-fault-injection (for tests and demonstrations only): add that option \
             or leave out {flag}"
        )),
        None => Ok(()),
    }
}

/// Replica settings beyond where it is and what it stores.
struct Tuning {
    snapshot_every: u64,
    read_lease: bool,
    enable_fault_injection: bool,
    insecure: bool,
    faults: kv_api::FaultSpec,
    fault_seed: Option<u64>,
    session_ttl: Duration,
    max_sessions: u64,
    tls: Option<kv_api::tls::TlsFiles>,
    admin_addr: Option<String>,
    redis_addr: Option<String>,
}

/// Seconds, fractions allowed, from 1 ms to 30 days.
fn parse_secs(s: &str) -> Result<Duration, String> {
    let secs: f64 = s
        .trim()
        .parse()
        .map_err(|_| format!("expected a number of seconds, e.g. 1800 or 1.5, not {s:?}"))?;
    if !(0.001..=30.0 * 24.0 * 3600.0).contains(&secs) {
        return Err(format!("{s} s is out of range (from 0.001 s to 30 days)"));
    }
    Ok(Duration::from_secs_f64(secs))
}

/// `MIN..MAX` (inclusive), e.g. `5..50`.
fn parse_range(s: &str) -> Result<(u64, u64), String> {
    let (lo, hi) = s
        .split_once("..")
        .ok_or_else(|| format!("expected MIN..MAX, e.g. 5..50, not {s:?}"))?;
    let lo: u64 = lo
        .trim()
        .parse()
        .map_err(|_| format!("bad minimum in {s:?}"))?;
    let hi: u64 = hi
        .trim()
        .parse()
        .map_err(|_| format!("bad maximum in {s:?}"))?;
    if lo > hi {
        return Err(format!("the range {s:?} is empty (minimum above maximum)"));
    }
    Ok((lo, hi))
}

/// Where a replica learns the cluster's members.
enum Source {
    /// A replica file (a new cluster's first configuration).
    File(PathBuf),
    /// A running cluster (`--join`), at this member's client address.
    Join {
        addr: String,
        client_addr: String,
        peer_addr: String,
    },
}

/// Whether the data directory holds a replica's state already.
fn has_state(data_dir: &std::path::Path) -> bool {
    std::fs::read_dir(data_dir.join("wal")).is_ok_and(|mut d| d.next().is_some())
}

/// `--join`: asks `addr` for the cluster's configuration until it lists
/// replica `id` at `client_addr` and `peer_addr` (saying what to run
/// meanwhile), or the shutdown signal comes.
async fn fetch_membership(
    id: u64,
    addr: &str,
    client_addr: &str,
    peer_addr: &str,
    tls: Option<&std::sync::Arc<rustls::ClientConfig>>,
    shutdown: &mut Shutdown,
) -> Result<Option<kv_api::membership::Membership>, Failure> {
    let mut client = None;
    let mut said = String::new();
    loop {
        let say = match cluster::status_of(addr, tls, &mut client).await {
            Ok(s) => match s.membership.get(id) {
                Some(m) if m.client_addr == client_addr && m.peer_addr == peer_addr => {
                    tracing::info!(
                        id,
                        epoch = s.membership.epoch,
                        members = %kv_server::describe(&s.membership),
                        "joining the cluster as it is now"
                    );
                    return Ok(Some(s.membership));
                }
                Some(m) => {
                    return Err(Failure::usage(format!(
                        "the cluster lists replica {id} at {} and {}, not {client_addr} and {peer_addr}: use those, or another id",
                        m.client_addr, m.peer_addr
                    )))
                }
                None if s.membership.members.is_empty() => format!(
                    "{addr} reports no configuration (a version without membership?); retrying"
                ),
                None => format!(
                    "replica {id} is not a member of the cluster yet; add it with `kv-client member add {id} {client_addr} {peer_addr}` (waiting)"
                ),
            },
            Err(e) => {
                client = None;
                format!("cannot ask {addr} for the cluster's configuration: {e}; retrying")
            }
        };
        if say != said {
            tracing::warn!(id, "{say}");
            said = say;
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            () = shutdown.wait_ref() => return Ok(None),
        }
    }
}

async fn run_replica(
    id: u64,
    source: Source,
    data_dir: Option<PathBuf>,
    tuning: Tuning,
    mut shutdown: Shutdown,
) -> Result<(), Failure> {
    let data_dir = data_dir.unwrap_or_else(|| PathBuf::from("data").join(id.to_string()));
    let (replicas, join) = match source {
        Source::File(file) => (Replicas::load(&file).map_err(Failure::usage)?, None),
        Source::Join {
            addr,
            client_addr,
            peer_addr,
        } => {
            let me = format!("{id} {client_addr} {peer_addr}\n");
            let own = Replicas::parse(&me, "--join").map_err(Failure::usage)?;
            if has_state(&data_dir) {
                // A joined replica restarting: its data directory knows
                // the configuration.
                (own, None)
            } else {
                let tls = match &tuning.tls {
                    None => None,
                    Some(files) => Some(
                        kv_api::tls::Tls::load(files)
                            .and_then(|t| t.client_config())
                            .map_err(|e| Failure::usage(e.to_string()))?,
                    ),
                };
                let Some(m) = fetch_membership(
                    id,
                    &addr,
                    &client_addr,
                    &peer_addr,
                    tls.as_ref(),
                    &mut shutdown,
                )
                .await?
                else {
                    return Ok(());
                };
                let all = Replicas {
                    replicas: m
                        .members
                        .iter()
                        .map(|m| kv_api::replicas::ReplicaAddr {
                            id: m.id,
                            client_addr: m.client_addr.clone(),
                            peer_addr: m.peer_addr.clone(),
                            redis_addr: None,
                        })
                        .collect(),
                    source: PathBuf::from(format!("the configuration of {addr}")),
                };
                (all, Some(m))
            }
        }
    };
    let mut config = ServerConfig::new(id, replicas, data_dir);
    config.join = join;
    config.snapshot_every = tuning.snapshot_every;
    config.read_lease = tuning.read_lease;
    config.enable_fault_injection = tuning.enable_fault_injection;
    config.faults = tuning.faults;
    config.fault_seed = tuning.fault_seed;
    config.session_ttl = tuning.session_ttl;
    config.max_sessions = tuning.max_sessions;
    config.tls = tuning.tls;
    config.admin_addr = tuning.admin_addr;
    config.redis_addr = tuning
        .redis_addr
        .or_else(|| config.replicas.get(id).and_then(|me| me.redis_addr.clone()));
    config.validate()?;
    if let Some(me) = config.replicas.get(id) {
        let tls_configured = config.tls.is_some();
        let mut addrs = vec![me.client_addr.as_str(), me.peer_addr.as_str()];
        addrs.extend(config.admin_addr.as_deref());
        addrs.extend(config.redis_addr.as_deref());
        kv_server::binds::refuse_plain_public_bind(&addrs, tls_configured, tuning.insecure)
            .map_err(Failure::usage)?;
        if tuning.insecure
            && !tls_configured
            && kv_server::binds::refuse_plain_public_bind(&addrs, false, false).is_err()
        {
            tracing::warn!(
                id,
                client_addr = %me.client_addr,
                peer_addr = %me.peer_addr,
                admin_addr = config.admin_addr.as_deref().unwrap_or("-"),
                "serving without TLS on an address that is not loopback (--insecure): anyone \
                 who can reach it can read and write the store and forge consensus messages"
            );
        }
        tracing::info!(
            id,
            client_addr = %me.client_addr,
            peer_addr = %me.peer_addr,
            data_dir = %config.data_dir.display(),
            replicas = %config.replicas.source.display(),
            "starting replica"
        );
    }
    kv_server::run(config, shutdown.wait()).await?;
    tracing::info!(id, "replica stopped");
    Ok(())
}

/// The shutdown signal: Ctrl-C (SIGINT), SIGTERM, or, with
/// `--exit-on-stdin-eof`, the end of standard input.
struct Shutdown {
    sigint: tokio::signal::unix::Signal,
    sigterm: tokio::signal::unix::Signal,
    stdin_eof: Option<tokio::sync::oneshot::Receiver<()>>,
}

impl Shutdown {
    fn listen(exit_on_stdin_eof: bool) -> anyhow::Result<Shutdown> {
        let sigint = signal(SignalKind::interrupt()).context("cannot listen for SIGINT")?;
        let sigterm = signal(SignalKind::terminate()).context("cannot listen for SIGTERM")?;
        let stdin_eof = exit_on_stdin_eof.then(|| {
            let (tx, rx) = tokio::sync::oneshot::channel();
            // A plain thread, not `tokio::io::stdin()`: a blocking read would
            // keep the runtime from shutting down, whereas a detached thread
            // simply ends with the process.
            std::thread::spawn(move || {
                let mut sink = std::io::sink();
                let _ = std::io::copy(&mut std::io::stdin().lock(), &mut sink);
                let _ = tx.send(());
            });
            rx
        });
        Ok(Shutdown {
            sigint,
            sigterm,
            stdin_eof,
        })
    }

    /// Resolves at the first signal, leaving the listener usable (for a
    /// wait before the replica starts).
    async fn wait_ref(&mut self) {
        let stdin_eof = async {
            match self.stdin_eof.as_mut() {
                Some(rx) => {
                    let _ = rx.await;
                }
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = self.sigint.recv() => tracing::info!("received Ctrl-C, shutting down"),
            _ = self.sigterm.recv() => tracing::info!("received SIGTERM, shutting down"),
            _ = stdin_eof => tracing::info!("standard input closed, shutting down"),
        }
    }

    /// Resolves at the first signal.
    async fn wait(self) {
        let Shutdown {
            mut sigint,
            mut sigterm,
            stdin_eof,
        } = self;
        let stdin_eof = async move {
            match stdin_eof {
                Some(rx) => {
                    let _ = rx.await;
                }
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = sigint.recv() => tracing::info!("received Ctrl-C, shutting down"),
            _ = sigterm.recv() => tracing::info!("received SIGTERM, shutting down"),
            _ = stdin_eof => tracing::info!("standard input closed, shutting down"),
        }
    }
}
