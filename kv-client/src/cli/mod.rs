//! The `kv-client` command line: argument parsing and the commands, kept in
//! the library so the binary stays a thin `main`.
//!
//! Exit statuses (scripts rely on them):
//!
//! | status | meaning |
//! |---|---|
//! | 0 | success |
//! | 1 | `get`: no such key; `cas`: not swapped |
//! | 2 | bad usage or invalid input (arguments, sizes, replica file) |
//! | 3 | no quorum answered before the timeout, or a retried write's session was dropped; a write's outcome is unknown (unless the message says it was not sent: no replica could be reached, or no session opened) |
//! | 4 | permission denied: the TLS client certificate's role (`read`, `write`, `admin`) does not allow the command; nothing was done |
//!
//! # Layout
//!
//! - this module — [`Cli`], [`Command`], [`run`] and the one-shot commands.
//! - `output` — how results and errors are shown (`--output text|json`).
//! - `fault` — `kv-client fault`: failure injection at run time.
//! - `shell` — `kv-client shell`: the interactive prompt.
//! - `bench` — `kv-client bench`: the closed-loop load generator.
//! - `snapshot` — `kv-client snapshot save FILE`: a backup.
//! - `top` — `kv-client top`: the cluster at a glance, refreshed.

mod bench;
mod data;
mod fault;
mod output;
mod shell;
mod snapshot;
mod top;

use std::ffi::OsString;
use std::io::Read;
use std::path::PathBuf;
use std::time::Duration;

use clap::{ArgGroup, Parser, Subcommand, ValueEnum};
use kv_api::replicas::Replicas;
use kv_api::{Op, OpResult, ReplicaStatus};
use serde::Serialize;

use crate::{Client, ClientBuilder, Error};

pub use bench::{BenchArgs, BenchOp};
pub use data::{LeaseArgs, LeaseCommand, RangeArgs, TxnArgs, WatchArgs};
pub use fault::{FaultArgs, Ids};
use output::Reply;
pub use snapshot::{SnapshotAction, SnapshotArgs};
pub use top::{render as render_top, ReplicaLine, TopArgs, View as TopView};

/// Exit status: success.
pub const EXIT_OK: u8 = 0;
/// Exit status: `get` found no such key, or `cas` did not swap.
pub const EXIT_NO: u8 = 1;
/// Exit status: bad usage or invalid input.
pub const EXIT_USAGE: u8 = 2;
/// Exit status: no quorum answered before the timeout.
pub const EXIT_UNAVAILABLE: u8 = 3;
/// Exit status: the cluster refused this identity the role the command
/// needs (TLS client certificates; `read`, `write`, `admin`).
pub const EXIT_PERMISSION: u8 = 4;
/// Exit status: refused because it conflicts with a change in progress
/// (a second membership change, or promoting a learner not caught up).
pub const EXIT_CONFLICT: u8 = 5;

const EXAMPLES: &str = "\
Examples:
  kv-client put color blue
  printf 'two\\nlines' | kv-client put note -
  kv-client get color
  kv-client get --local color
  kv-client --output json get color
  kv-client delete color
  kv-client cas color green --expect blue
  kv-client cas lock me --expect-absent
  kv-client range --prefix config/
  kv-client txn --if 'value lock = free' --then 'put lock me'
  kv-client lease grant 10
  kv-client watch --prefix config/
  kv-client --server 127.0.0.1:7002 --timeout 0.5 get color
  kv-client status
  kv-client shell
  kv-client fault --server 127.0.0.1:7003 --drop-rate 0.2 --delay-ms 5..50
  kv-client fault --all --heal
  kv-client bench --clients 16 --secs 10 --op mixed
  kv-client snapshot save backup.snap
  kv-client top

Exit status: 0 success; 1 get found no such key, or cas did not swap;
2 bad usage or invalid input; 3 no quorum answered before the timeout
(for a write: the outcome is unknown); 4 permission denied (the client
certificate's role does not allow the command; nothing was done).";

/// Command-line client for a kvpaxos cluster.
#[derive(Parser, Debug)]
#[command(name = "kv-client", version, after_help = EXAMPLES)]
pub struct Cli {
    /// The replica file, one `ID CLIENT_ADDR PEER_ADDR` a line [default:
    /// `replica` in the current directory].
    #[arg(long, value_name = "FILE", global = true, conflicts_with = "server")]
    pub replicas: Option<PathBuf>,

    /// Talk only to this replica (HOST:PORT); it forwards to the leader.
    /// For `fault`: the replica whose failure injection to change.
    #[arg(long, value_name = "ADDR", global = true)]
    pub server: Option<String>,

    /// Overall time budget in seconds, retries included (fractions allowed,
    /// e.g. 0.5). In `shell` and `bench`: the budget of each operation.
    #[arg(long, value_name = "SECS", default_value = "5", value_parser = parse_timeout, global = true)]
    pub timeout: Duration,

    /// How results and errors are shown: `text` for people, `json` for
    /// programs (one JSON object a line on stdout, errors included).
    #[arg(long, value_name = "FORMAT", value_enum, default_value_t = Format::Text, global = true)]
    pub output: Format,

    /// TLS: the CA certificates (PEM) the replicas' certificates are
    /// checked against (with --tls-cert and --tls-key; a cluster started
    /// with TLS accepts nothing else).
    #[arg(long, value_name = "FILE", global = true, requires_all = ["tls_cert", "tls_key"])]
    pub tls_ca: Option<PathBuf>,

    /// TLS: this client's certificate (PEM); its role decides what it may
    /// do: `read` (get, status), `write` (and put, delete, cas), `admin`
    /// (and fault). `kv-server certs` writes reader, writer and admin ones.
    #[arg(long, value_name = "FILE", global = true, requires_all = ["tls_ca", "tls_key"])]
    pub tls_cert: Option<PathBuf>,

    /// TLS: this client's private key (PEM).
    #[arg(long, value_name = "FILE", global = true, requires_all = ["tls_ca", "tls_cert"])]
    pub tls_key: Option<PathBuf>,

    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The output formats of `--output`.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Format {
    /// For people: values as text, messages on stderr.
    #[default]
    Text,
    /// For programs: one JSON object a line on stdout, errors included.
    Json,
}

/// The commands.
#[derive(Subcommand, Debug)]
pub enum Command {
    /// Set KEY to VALUE (`-`: read the value from stdin). Prints nothing on
    /// success (JSON: `{"ok":true,"slot":N}`).
    #[command(after_help = "\
Examples:
  kv-client put color blue
  kv-client put config.json - < config.json
  kv-client put --lease 1048576 service/web-1 10.0.0.7:80

With VALUE `-` the value is every byte of stdin, exactly: nothing is
stripped, not even a trailing newline (use `printf`, not `echo`, for a value
without one). To store the one-character value `-`, pipe it in:
`printf - | kv-client put k -`.")]
    Put {
        /// The key (at most 1 KiB).
        #[arg(allow_hyphen_values = true)]
        key: OsString,
        /// The value (at most 1 MiB); `-` reads it from stdin.
        #[arg(allow_hyphen_values = true)]
        value: OsString,
        /// Attach the key to this lease (from `lease grant`): it is deleted
        /// when the lease ends. A lease that does not exist is refused
        /// (exit 2).
        #[arg(long, value_name = "ID")]
        lease: Option<u64>,
    },
    /// Print the value of KEY and a newline (UTF-8 as is, other bytes as
    /// \xNN). Exit status 1 if there is no such key.
    #[command(after_help = "\
Examples:
  kv-client get color
  kv-client get --local color
  kv-client --output json get color

JSON: {\"key\":\"color\",\"value\":\"blue\",\"found\":true,\"create_revision\":3,
\"mod_revision\":7,\"version\":2}; for an absent key
{\"key\":\"color\",\"value\":null,\"found\":false} (exit status 1). A value
that is not UTF-8 is shown escaped in \"value\" and exactly in
\"value_base64\" (standard base64, with padding).")]
    Get {
        /// Read the first answering replica's own state: fast, possibly
        /// stale (default: linearizable, through the leader).
        #[arg(long)]
        local: bool,
        /// The key.
        #[arg(allow_hyphen_values = true)]
        key: OsString,
    },
    /// Remove KEY. Prints nothing; succeeds whether or not it existed
    /// (JSON: `{"existed":BOOL,"slot":N}`).
    #[command(after_help = "Example: kv-client delete color")]
    Delete {
        /// The key.
        #[arg(allow_hyphen_values = true)]
        key: OsString,
    },
    /// Compare and swap: set KEY to NEW only if it now holds OLD
    /// (--expect OLD) or is absent (--expect-absent). Exit status 0 if
    /// swapped, 1 if not (the current value is shown on stderr; JSON:
    /// `{"swapped":BOOL,"current":VALUE|null,"slot":N}`).
    #[command(
        group(ArgGroup::new("expectation").required(true).args(["expect", "expect_absent"])),
        after_help = "Examples:\n  kv-client cas color green --expect blue\n  kv-client cas lock me --expect-absent"
    )]
    Cas {
        /// The key.
        #[arg(allow_hyphen_values = true)]
        key: OsString,
        /// The value to store.
        #[arg(allow_hyphen_values = true)]
        new: OsString,
        /// Swap only if the key holds this value.
        #[arg(long, value_name = "OLD", allow_hyphen_values = true)]
        expect: Option<OsString>,
        /// Swap only if the key is absent.
        #[arg(long)]
        expect_absent: bool,
    },
    /// Print the keys of [START, END) or of --prefix PREFIX in key order,
    /// one `KEY VALUE` line each (JSON: one object a line with the key's
    /// revisions).
    #[command(alias = "scan", after_help = data::RANGE_EXAMPLES)]
    Range(RangeArgs),
    /// Run a transaction: comparisons (--if), then writes if all hold
    /// (--then), else other writes (--else), atomically. Exit status 0 if
    /// the comparisons held, 1 if not.
    #[command(after_help = data::TXN_EXAMPLES)]
    Txn(TxnArgs),
    /// Print every change of KEY (or of the keys under --prefix) as it
    /// happens, one line each, until interrupted.
    #[command(after_help = data::WATCH_EXAMPLES)]
    Watch(WatchArgs),
    /// Drop the history of changes up to revision REV: ranges at older
    /// revisions and watches from them are refused from then on. Prints
    /// where the history now starts.
    #[command(
        after_help = "Example: kv-client compact 1200\n\nThe history also drops its oldest revisions by itself beyond 10,000 changes or 4 MiB."
    )]
    Compact {
        /// The last revision to forget.
        #[arg(value_name = "REV")]
        revision: u64,
    },
    /// Leases: grant one (prints its id alone on a line), keep it alive,
    /// revoke it. Keys put with `put --lease ID` are deleted when it ends.
    #[command(after_help = data::LEASE_EXAMPLES)]
    Lease(LeaseArgs),
    /// Ask every replica for its role and progress; print one JSON object a
    /// line, in replica-file order. Exit status 3 if none answered.
    #[command(
        after_help = "Example: kv-client status\n\nEach line looks like\n  {\"id\":1,\"addr\":\"127.0.0.1:7001\",\"up\":true,\"leader\":false,\"leader_id\":3,\"applied\":42,\"chosen\":42,\"snapshot\":0,\"keys\":10,\"sessions\":3,\"ballot_round\":2,\"standing\":\"voter\",\"snapshots_installed\":0,\"role\":\"voter\",\"epoch\":0}\n(role: voter, learner, or removed: not a member of the cluster any more; epoch: of the\nconfiguration it knows) or, for a replica that did not answer,\n  {\"id\":2,\"addr\":\"127.0.0.1:7002\",\"up\":false,\"leader\":false,\"leader_id\":null,\"applied\":null,...,\"error\":\"...\"}"
    )]
    Status,
    /// Change (or just show) the failure injection of one replica
    /// (--server ADDR) or of every replica of the replica file (--all).
    /// Prints the resulting report of each replica as one JSON line.
    #[command(after_help = fault::EXAMPLES)]
    Fault(FaultArgs),
    /// Show or change the cluster's members (voters and learners).
    #[command(subcommand, after_help = MEMBER_HELP)]
    Member(MemberCommand),
    /// An interactive prompt running the same commands (put, get, delete,
    /// cas, status, fault, help, quit) over one connection.
    #[command(after_help = shell::EXAMPLES)]
    Shell,
    /// Measure throughput and latency: a closed loop of concurrent clients
    /// for a fixed time; prints one JSON line at the end.
    #[command(after_help = bench::EXAMPLES)]
    Bench(BenchArgs),
    /// Backups: `snapshot save FILE` streams a consistent snapshot from
    /// the leader into FILE, checksummed (restore it with `kv-server
    /// restore`). Needs the admin role with TLS.
    #[command(after_help = snapshot::EXAMPLES)]
    Snapshot(SnapshotArgs),
    /// The cluster at a glance, refreshed every second: each replica's
    /// role, applied index, lag, rates, p99 (with --admin) and faults.
    #[command(after_help = top::EXAMPLES)]
    Top(TopArgs),
}

const MEMBER_HELP: &str = "\
Replacing a dead replica (say 3) with a new one (6):
  kv-client member add 6 10.0.0.6:7001 10.0.0.6:7101
  kv-server --id 6 --join 10.0.0.1:7001 --client-addr 10.0.0.6:7001 \\
            --peer-addr 10.0.0.6:7101 --data-dir /var/lib/kvpaxos
  kv-client member promote 6     # once it has caught up (retry if refused)
  kv-client member remove 3

A new replica joins as a learner: it receives the log (or a snapshot) and
does not vote until promoted; promotion is refused (exit status 5) until it
has caught up. One change at a time: a change while another is in progress
is refused (exit status 5). Changes need the admin role where TLS is on.
Each change prints the new configuration, like `member list`.";

/// `kv-client member ...`.
#[derive(Subcommand, Debug, Clone)]
pub enum MemberCommand {
    /// Print the configuration: one line a member, `ID ROLE CLIENT_ADDR
    /// PEER_ADDR` (ROLE is `voter` or `learner`); JSON: one object a line
    /// with `id`, `role`, `client_addr`, `peer_addr`, `epoch`.
    List,
    /// Add replica ID as a learner, reached at CLIENT_ADDR and PEER_ADDR;
    /// then start it with `kv-server --join`.
    Add {
        /// The new replica's id (not in use).
        id: u64,
        /// Its client address (`host:port`).
        client_addr: String,
        /// Its peer address (`host:port`).
        peer_addr: String,
    },
    /// Remove replica ID (a voter or a learner, up or down; the leader
    /// too: it steps down once the change is chosen).
    Remove {
        /// The replica to remove.
        id: u64,
    },
    /// Make learner ID a voter (refused until it has caught up).
    Promote {
        /// The learner to promote.
        id: u64,
    },
}

/// Parses `--timeout`: positive seconds, fractions allowed.
fn parse_timeout(s: &str) -> Result<Duration, String> {
    let secs: f64 = s
        .trim()
        .parse()
        .map_err(|_| format!("{s:?} is not a number of seconds"))?;
    if secs.is_nan() || secs <= 0.0 {
        return Err(format!("the timeout must be above zero, got {s}"));
    }
    let d = Duration::try_from_secs_f64(secs).map_err(|e| format!("{s:?}: {e}"))?;
    if d > crate::MAX_TIMEOUT {
        return Err(format!(
            "the timeout must be at most {} seconds, got {s}",
            crate::MAX_TIMEOUT.as_secs()
        ));
    }
    Ok(d)
}

fn bytes(s: OsString) -> Vec<u8> {
    #[cfg(unix)]
    {
        std::os::unix::ffi::OsStringExt::into_vec(s)
    }
    #[cfg(not(unix))]
    {
        s.to_string_lossy().into_owned().into_bytes()
    }
}

/// One line of `status` output.
#[derive(Serialize, Debug, PartialEq)]
pub struct StatusLine {
    /// The replica id (from the replica file, else from its answer).
    pub id: Option<u64>,
    /// The address asked.
    pub addr: String,
    /// Whether it answered.
    pub up: bool,
    /// Whether it believes itself the leader.
    pub leader: bool,
    /// The leader it knows of.
    pub leader_id: Option<u64>,
    /// Highest applied log index.
    pub applied: Option<u64>,
    /// Highest index of the chosen prefix it knows.
    pub chosen: Option<u64>,
    /// Index covered by its latest snapshot.
    pub snapshot: Option<u64>,
    /// Number of keys.
    pub keys: Option<u64>,
    /// Number of client sessions held.
    pub sessions: Option<u64>,
    /// Round of the highest ballot it promised.
    pub ballot_round: Option<u64>,
    /// Whether it votes: `voter`, `rejoining` or `unknown`.
    pub standing: Option<String>,
    /// Snapshots it received from peers and installed since it started.
    pub snapshots_installed: Option<u64>,
    /// Its place in the configuration it knows: `voter`, `learner` or
    /// `removed` (not a member any more).
    pub role: Option<String>,
    /// The epoch of that configuration.
    pub epoch: Option<u64>,
    /// Why it did not answer.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl StatusLine {
    /// The line for the replica at `addr`, known as `file_id` in the replica
    /// file (`None` with `--server`).
    pub fn new(file_id: Option<u64>, addr: &str, answer: &Result<ReplicaStatus, Error>) -> Self {
        match answer {
            Ok(s) => StatusLine {
                id: file_id.or(Some(s.id)),
                addr: addr.to_string(),
                up: true,
                leader: s.leader,
                leader_id: s.leader_id,
                applied: Some(s.applied),
                chosen: Some(s.chosen),
                snapshot: Some(s.snapshot),
                keys: Some(s.keys),
                sessions: Some(s.sessions),
                ballot_round: Some(s.ballot_round),
                standing: Some(s.standing.clone()),
                snapshots_installed: Some(s.snapshots_installed),
                role: Some(
                    match s.membership.get(s.id) {
                        Some(m) => m.role(),
                        None if s.removed => "removed",
                        None => "unknown",
                    }
                    .to_string(),
                ),
                epoch: Some(s.membership.epoch),
                error: None,
            },
            Err(e) => StatusLine {
                id: file_id,
                addr: addr.to_string(),
                up: false,
                leader: false,
                leader_id: None,
                applied: None,
                chosen: None,
                snapshot: None,
                keys: None,
                sessions: None,
                ballot_round: None,
                standing: None,
                snapshots_installed: None,
                role: None,
                epoch: None,
                error: Some(e.to_string()),
            },
        }
    }
}

/// Why a command failed: its exit status, a machine-readable kind (the
/// `"kind"` of a JSON error) and a message for a person.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Failure {
    pub(crate) code: u8,
    pub(crate) kind: &'static str,
    pub(crate) msg: String,
}

impl Failure {
    /// Bad usage or invalid input (exit status 2).
    pub(crate) fn usage(msg: impl Into<String>) -> Failure {
        Failure {
            code: EXIT_USAGE,
            kind: "invalid_argument",
            msg: msg.into(),
        }
    }

    /// An SDK error; `write` says whether the operation was a write, whose
    /// outcome the message must then qualify.
    pub(crate) fn from_error(e: Error, write: bool) -> Failure {
        let kind = error_kind(&e);
        let (code, msg) = match e {
            Error::InvalidArgument(_) => (EXIT_USAGE, e.to_string()),
            Error::PermissionDenied(_) => (EXIT_PERMISSION, e.to_string()),
            Error::Disabled(_) => (EXIT_USAGE, e.to_string()),
            Error::Conflict(_) => (EXIT_CONFLICT, e.to_string()),
            Error::Compacted(_) => (EXIT_UNAVAILABLE, e.to_string()),
            // Unavailable means no connection was ever made: nothing was sent.
            Error::Unavailable(_) if write => {
                (EXIT_UNAVAILABLE, format!("{e}\nthe write was not applied"))
            }
            Error::UnknownSession(_) => (EXIT_UNAVAILABLE, e.to_string()),
            _ if write => (
                EXIT_UNAVAILABLE,
                format!("{e}\nthe write's outcome is unknown: it may or may not have been applied"),
            ),
            _ => (EXIT_UNAVAILABLE, e.to_string()),
        };
        Failure { code, kind, msg }
    }
}

/// The `"kind"` of an SDK error in JSON output.
pub(crate) fn error_kind(e: &Error) -> &'static str {
    match e {
        Error::InvalidArgument(_) => "invalid_argument",
        Error::Unavailable(_) => "unavailable",
        Error::Timeout(_) => "timeout",
        Error::OutcomeUnknown(_) => "outcome_unknown",
        Error::UnknownSession(_) => "unknown_session",
        Error::PermissionDenied(_) => "permission_denied",
        Error::Disabled(_) => "disabled",
        Error::Conflict(_) => "conflict",
        Error::Compacted(_) => "compacted",
        Error::Protocol { .. } => "protocol",
    }
}

/// The settings every command shares, taken from the command line.
#[derive(Debug, Clone)]
pub(crate) struct Settings {
    pub(crate) replicas: Option<PathBuf>,
    pub(crate) server: Option<String>,
    pub(crate) timeout: Duration,
    pub(crate) format: Format,
    pub(crate) tls: Option<crate::TlsFiles>,
}

impl Settings {
    fn of(cli: &Cli) -> Settings {
        Settings {
            replicas: cli.replicas.clone(),
            server: cli.server.clone(),
            timeout: cli.timeout,
            format: cli.output,
            tls: match (&cli.tls_ca, &cli.tls_cert, &cli.tls_key) {
                (Some(ca), Some(cert), Some(key)) => Some(crate::TlsFiles {
                    ca: ca.clone(),
                    cert: cert.clone(),
                    key: key.clone(),
                }),
                _ => None,
            },
        }
    }

    /// The replica file, loaded (`--replicas`, default `replica`).
    pub(crate) fn load_replicas(&self) -> Result<Replicas, Failure> {
        let path = self
            .replicas
            .clone()
            .unwrap_or_else(|| PathBuf::from("replica"));
        Replicas::load(&path).map_err(|e| Failure::usage(e.to_string()))
    }

    /// A builder with `--timeout` and the TLS files, no addresses yet.
    pub(crate) fn base_builder(&self) -> ClientBuilder {
        let builder = Client::builder().timeout(self.timeout);
        match &self.tls {
            Some(files) => builder.tls(files.clone()),
            None => builder,
        }
    }

    /// A client builder for `--server` or the replica file, and the replica
    /// ids in address order (`None` with `--server`).
    pub(crate) fn builder(&self) -> Result<(ClientBuilder, Vec<Option<u64>>), Failure> {
        let builder = self.base_builder();
        Ok(match &self.server {
            // Only this replica, as the contract says: it forwards to the
            // leader; its hints are shown in errors, not followed.
            Some(addr) => (
                builder.addrs(vec![addr.clone()]).follow_hints(false),
                vec![None],
            ),
            None => {
                let r = self.load_replicas()?;
                let ids = r.replicas.iter().map(|r| Some(r.id)).collect();
                (builder.replicas(r), ids)
            }
        })
    }
}

/// Runs a parsed command line and returns the exit status. Writes results
/// to stdout and messages to stderr. One-shot commands never take much
/// longer than the `--timeout` budget; `bench` runs for its `--secs` (plus
/// at most one operation's budget) and `shell` until end of input.
pub async fn run(cli: Cli) -> u8 {
    let settings = Settings::of(&cli);
    match cli.command {
        Command::Shell => shell::run(settings).await,
        Command::Bench(args) => bench::run(settings, args).await,
        Command::Top(args) => top::run(settings, args).await,
        Command::Lease(LeaseArgs {
            command: LeaseCommand::Keepalive { id, once: false },
        }) => data::keepalive_forever(&settings, id).await,
        Command::Watch(args) => data::watch(&settings, args).await,
        command => {
            let reply = one_shot(&settings, command).await;
            reply.emit(settings.format)
        }
    }
}

/// Runs one command of the command line (not `shell` or `bench`).
async fn one_shot(settings: &Settings, command: Command) -> Reply {
    // `put KEY -` reads its value before the clock starts.
    let command = match command {
        Command::Put { key, value, lease } if value == "-" => match read_stdin_value() {
            Ok(v) => Command::Put {
                key,
                value: os_from_bytes(v),
                lease,
            },
            Err(f) => return Reply::failed(f),
        },
        other => other,
    };
    if let Command::Fault(args) = command {
        return fault::run(settings, args).await;
    }
    // Bounded per request, not as a whole: a snapshot takes as long as
    // its size.
    if let Command::Snapshot(args) = command {
        return snapshot::run(settings, args).await;
    }
    let (builder, ids) = match settings.builder() {
        Ok(b) => b,
        Err(f) => return Reply::failed(f),
    };
    let client = match builder.refresh_members(None).build() {
        Ok(c) => c,
        Err(e) => return Reply::failed(Failure::from_error(e, false)),
    };
    run_bounded(settings, &client, &ids, command).await
}

/// Runs one command with the shared client, bounded by the budget plus half
/// a second: every SDK call is bounded already; this is the promise that the
/// command as a whole never hangs.
pub(crate) async fn run_bounded(
    settings: &Settings,
    client: &Client,
    ids: &[Option<u64>],
    command: Command,
) -> Reply {
    let budget = settings.timeout;
    let work = execute(settings, client, ids, command);
    match tokio::time::timeout(budget + Duration::from_millis(500), work).await {
        Ok(reply) => reply,
        Err(_) => Reply::failed(Failure {
            code: EXIT_UNAVAILABLE,
            kind: "timeout",
            msg: format!(
                "timed out after {} s; if this was a write, its outcome is unknown",
                budget.as_secs_f64()
            ),
        }),
    }
}

/// Reads a value from stdin: every byte, nothing stripped. Reads at most one
/// byte over the value limit, so that a huge input is refused, not stored
/// in memory.
fn read_stdin_value() -> Result<Vec<u8>, Failure> {
    let limit = kv_api::Limits::default().max_value as u64 + 1;
    let mut v = Vec::new();
    std::io::stdin()
        .lock()
        .take(limit)
        .read_to_end(&mut v)
        .map_err(|e| Failure::usage(format!("cannot read the value from stdin: {e}")))?;
    Ok(v)
}

fn os_from_bytes(v: Vec<u8>) -> OsString {
    #[cfg(unix)]
    {
        std::os::unix::ffi::OsStringExt::from_vec(v)
    }
    #[cfg(not(unix))]
    {
        OsString::from(String::from_utf8_lossy(&v).into_owned())
    }
}

/// Sends a write and returns its result and slot.
async fn write(client: &Client, op: Op) -> Result<(OpResult, u64), Failure> {
    let (o, _) = client
        .write_op(op)
        .await
        .map_err(|e| Failure::from_error(e, true))?;
    Ok((o.result, o.slot))
}

fn mismatch(what: &str, got: &OpResult) -> Failure {
    Failure::from_error(
        Error::Protocol {
            addr: "the cluster".into(),
            detail: format!("a {what} was answered with {got:?}"),
        },
        true,
    )
}

/// Runs one command (not `shell` or `bench`) with `client`.
pub(crate) async fn execute(
    settings: &Settings,
    client: &Client,
    ids: &[Option<u64>],
    command: Command,
) -> Reply {
    match execute_inner(settings, client, ids, command).await {
        Ok(r) => r,
        Err(f) => Reply::failed(f),
    }
}

async fn execute_inner(
    settings: &Settings,
    client: &Client,
    ids: &[Option<u64>],
    command: Command,
) -> Result<Reply, Failure> {
    match command {
        Command::Put {
            key,
            value,
            lease: Some(lease),
        } => {
            let slot = client
                .put_with_lease_outcome(bytes(key), bytes(value), lease)
                .await
                .map_err(|e| Failure::from_error(e, true))?;
            Ok(Reply::put(slot))
        }
        Command::Put {
            key,
            value,
            lease: None,
        } => {
            let op = Op::Put {
                key: bytes(key),
                value: bytes(value),
            };
            match write(client, op).await? {
                (OpResult::Put, slot) => Ok(Reply::put(slot)),
                (other, _) => Err(mismatch("put", &other)),
            }
        }
        Command::Get { local, key } => {
            let key = bytes(key);
            let kv = if local {
                client.get_kv_local(key.clone()).await
            } else {
                client.get_kv(key.clone()).await
            }
            .map_err(|e| Failure::from_error(e, false))?;
            Ok(Reply::get_kv(&key, kv.as_ref()))
        }
        Command::Delete { key } => match write(client, Op::Delete { key: bytes(key) }).await? {
            (OpResult::Deleted { existed }, slot) => Ok(Reply::deleted(existed, slot)),
            (other, _) => Err(mismatch("delete", &other)),
        },
        Command::Cas {
            key,
            new,
            expect,
            expect_absent: _,
        } => {
            let op = Op::Cas {
                key: bytes(key),
                expected: expect.map(bytes),
                new: bytes(new),
            };
            match write(client, op).await? {
                (OpResult::Cas { swapped, current }, slot) => {
                    Ok(Reply::cas(swapped, current.as_deref(), slot))
                }
                (other, _) => Err(mismatch("compare-and-swap", &other)),
            }
        }
        Command::Status => {
            let answers = client.status().await;
            let mut reply = Reply::default();
            let mut any_up = false;
            for (i, (addr, answer)) in answers.iter().enumerate() {
                any_up |= answer.is_ok();
                let line = StatusLine::new(ids.get(i).copied().flatten(), addr, answer);
                reply.json_line(&line);
            }
            if !any_up {
                reply.fail(Failure {
                    code: EXIT_UNAVAILABLE,
                    kind: "unavailable",
                    msg: "no replica answered".into(),
                });
            }
            Ok(reply)
        }
        Command::Fault(args) => Ok(fault::run(settings, args).await),
        Command::Member(m) => {
            let (result, write) = match m {
                MemberCommand::List => (client.members().await, false),
                MemberCommand::Add {
                    id,
                    client_addr,
                    peer_addr,
                } => (client.add_member(id, client_addr, peer_addr).await, true),
                MemberCommand::Remove { id } => (client.remove_member(id).await, true),
                MemberCommand::Promote { id } => (client.promote_member(id).await, true),
            };
            result
                .map(|m| Reply::members(&m))
                .map_err(|e| Failure::from_error(e, write))
        }
        Command::Snapshot(args) => Ok(snapshot::run(settings, args).await),
        Command::Range(args) => data::range(client, args).await,
        Command::Txn(args) => data::txn(client, args).await,
        Command::Lease(args) => data::lease(client, args).await,
        Command::Compact { revision } => data::compact(client, revision).await,
        Command::Watch(_) => Err(Failure::usage(
            "`watch` runs until interrupted: run it on its own, not in the shell",
        )),
        Command::Shell | Command::Bench(_) | Command::Top(_) => Err(Failure::usage(
            "`shell`, `bench` and `top` cannot be run from the shell",
        )),
    }
}

/// Whether a raw command line asks for JSON output, for reporting a usage
/// error (found by clap before the command line is understood) as JSON.
pub fn wants_json<I: IntoIterator<Item = OsString>>(args: I) -> bool {
    let args: Vec<OsString> = args.into_iter().collect();
    args.iter().enumerate().any(|(i, a)| {
        a == "--output=json" || (a == "--output" && args.get(i + 1).is_some_and(|n| n == "json"))
    })
}

/// The JSON line for a usage error found by clap (`kind`
/// `"invalid_argument"`), for `--output json`.
pub fn usage_error_json(e: &clap::Error) -> String {
    output::error_json(&Failure::usage(clap_message(e)))
}

/// The message of a clap error without the usage and the tip: the lines up
/// to the first blank one, joined.
pub(crate) fn clap_message(e: &clap::Error) -> String {
    let text = e.to_string();
    let lines: Vec<&str> = text
        .lines()
        .take_while(|l| !l.trim().is_empty())
        .map(str::trim)
        .collect();
    let msg = lines.join(" ");
    let msg = msg.trim_start_matches("error: ");
    if msg.is_empty() {
        "bad usage".to_string()
    } else {
        msg.to_string()
    }
}

#[cfg(test)]
mod tests;
