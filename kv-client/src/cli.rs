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
//! | 3 | no quorum answered before the timeout; a write's outcome is unknown (unless no replica could even be reached: then it was not sent) |

use std::ffi::OsString;
use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use clap::{ArgGroup, Parser, Subcommand};
use kv_api::replicas::Replicas;
use kv_api::ReplicaStatus;
use serde::Serialize;

use crate::{escape_bytes, Client, Error};

/// Exit status: success.
pub const EXIT_OK: u8 = 0;
/// Exit status: `get` found no such key, or `cas` did not swap.
pub const EXIT_NO: u8 = 1;
/// Exit status: bad usage or invalid input.
pub const EXIT_USAGE: u8 = 2;
/// Exit status: no quorum answered before the timeout.
pub const EXIT_UNAVAILABLE: u8 = 3;

const EXAMPLES: &str = "\
Examples:
  kv-client put color blue
  kv-client get color
  kv-client get --local color
  kv-client delete color
  kv-client cas color green --expect blue
  kv-client cas lock me --expect-absent
  kv-client --server 127.0.0.1:7002 --timeout 0.5 get color
  kv-client status

Exit status: 0 success; 1 get found no such key, or cas did not swap;
2 bad usage or invalid input; 3 no quorum answered before the timeout
(for a write: the outcome is unknown).";

/// Command-line client for a kvpaxos cluster.
#[derive(Parser, Debug)]
#[command(name = "kv-client", version, after_help = EXAMPLES)]
pub struct Cli {
    /// The replica file, one `ID CLIENT_ADDR PEER_ADDR` a line [default:
    /// `replica` in the current directory].
    #[arg(long, value_name = "FILE", global = true, conflicts_with = "server")]
    pub replicas: Option<PathBuf>,

    /// Talk only to this replica (HOST:PORT); it forwards to the leader.
    #[arg(long, value_name = "ADDR", global = true)]
    pub server: Option<String>,

    /// Overall time budget in seconds, retries included (fractions allowed,
    /// e.g. 0.5).
    #[arg(long, value_name = "SECS", default_value = "5", value_parser = parse_timeout, global = true)]
    pub timeout: Duration,

    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The commands.
#[derive(Subcommand, Debug)]
pub enum Command {
    /// Set KEY to VALUE. Prints nothing on success.
    #[command(after_help = "Example: kv-client put color blue")]
    Put {
        /// The key (at most 1 KiB).
        #[arg(allow_hyphen_values = true)]
        key: OsString,
        /// The value (at most 1 MiB).
        #[arg(allow_hyphen_values = true)]
        value: OsString,
    },
    /// Print the value of KEY and a newline (UTF-8 as is, other bytes as
    /// \xNN). Exit status 1 if there is no such key.
    #[command(after_help = "Examples:\n  kv-client get color\n  kv-client get --local color")]
    Get {
        /// Read the first answering replica's own state: fast, possibly
        /// stale (default: linearizable, through the leader).
        #[arg(long)]
        local: bool,
        /// The key.
        #[arg(allow_hyphen_values = true)]
        key: OsString,
    },
    /// Remove KEY. Prints nothing; succeeds whether or not it existed.
    #[command(after_help = "Example: kv-client delete color")]
    Delete {
        /// The key.
        #[arg(allow_hyphen_values = true)]
        key: OsString,
    },
    /// Compare and swap: set KEY to NEW only if it now holds OLD
    /// (--expect OLD) or is absent (--expect-absent). Exit status 0 if
    /// swapped, 1 if not (the current value is shown on stderr).
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
    /// Ask every replica for its role and progress; print one JSON object a
    /// line, in replica-file order. Exit status 3 if none answered.
    #[command(
        after_help = "Example: kv-client status\n\nEach line looks like\n  {\"id\":1,\"addr\":\"127.0.0.1:7001\",\"up\":true,\"leader\":false,\"leader_id\":3,\"applied\":42,\"chosen\":42,\"snapshot\":0,\"keys\":10,\"ballot_round\":2}\nor, for a replica that did not answer,\n  {\"id\":2,\"addr\":\"127.0.0.1:7002\",\"up\":false,\"leader\":false,\"leader_id\":null,\"applied\":null,...,\"error\":\"...\"}"
    )]
    Status,
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
    /// Round of the highest ballot it promised.
    pub ballot_round: Option<u64>,
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
                ballot_round: Some(s.ballot_round),
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
                ballot_round: None,
                error: Some(e.to_string()),
            },
        }
    }
}

/// Runs a parsed command line and returns the exit status. Writes results
/// to stdout and messages to stderr; never takes much longer than the
/// `--timeout` budget.
pub async fn run(cli: Cli) -> u8 {
    let mut out = std::io::stdout().lock();
    let mut err = std::io::stderr().lock();
    let budget = cli.timeout;
    // Every SDK call is bounded by the budget already; this outer bound is
    // the promise that the command as a whole never hangs.
    match tokio::time::timeout(budget + Duration::from_millis(500), execute(cli, &mut out)).await {
        Ok(Ok(code)) => {
            let _ = out.flush();
            code
        }
        Ok(Err((code, msg))) => {
            let _ = out.flush();
            let _ = writeln!(err, "kv-client: {msg}");
            code
        }
        Err(_) => {
            let _ = out.flush();
            let _ = writeln!(
                err,
                "kv-client: timed out after {} s; if this was a write, its outcome is unknown",
                budget.as_secs_f64()
            );
            EXIT_UNAVAILABLE
        }
    }
}

type Failure = (u8, String);

fn failure(e: Error, write: bool) -> Failure {
    match e {
        Error::InvalidArgument(_) => (EXIT_USAGE, e.to_string()),
        // Unavailable means no connection was ever made: nothing was sent.
        Error::Unavailable(_) if write => (
            EXIT_UNAVAILABLE,
            format!("{e}\nno replica could be reached, so the write was not sent"),
        ),
        _ if write => (
            EXIT_UNAVAILABLE,
            format!("{e}\nthe write's outcome is unknown: it may or may not have been applied"),
        ),
        _ => (EXIT_UNAVAILABLE, e.to_string()),
    }
}

async fn execute(cli: Cli, out: &mut impl Write) -> Result<u8, Failure> {
    let mut builder = Client::builder().timeout(cli.timeout);
    let ids: Vec<Option<u64>> = match &cli.server {
        Some(addr) => {
            // Only this replica, as the contract says: it forwards to the
            // leader; its hints are shown in errors, not followed.
            builder = builder.addrs(vec![addr.clone()]).follow_hints(false);
            vec![None]
        }
        None => {
            let path = cli
                .replicas
                .clone()
                .unwrap_or_else(|| PathBuf::from("replica"));
            let r = Replicas::load(&path).map_err(|e| (EXIT_USAGE, e.to_string()))?;
            let ids = r.replicas.iter().map(|r| Some(r.id)).collect();
            builder = builder.replicas(r);
            ids
        }
    };
    let client = builder.build().map_err(|e| failure(e, false))?;
    let note = |s: String| {
        let _ = writeln!(std::io::stderr(), "{s}");
    };
    match cli.command {
        Command::Put { key, value } => {
            client
                .put(bytes(key), bytes(value))
                .await
                .map_err(|e| failure(e, true))?;
            Ok(EXIT_OK)
        }
        Command::Get { local, key } => {
            let key = bytes(key);
            let v = if local {
                client.get_local(key.clone()).await
            } else {
                client.get(key.clone()).await
            }
            .map_err(|e| failure(e, false))?;
            match v {
                Some(v) => {
                    let _ = writeln!(out, "{}", escape_bytes(&v));
                    Ok(EXIT_OK)
                }
                None => {
                    note(format!("kv-client: no such key: {}", escape_bytes(&key)));
                    Ok(EXIT_NO)
                }
            }
        }
        Command::Delete { key } => {
            client
                .delete(bytes(key))
                .await
                .map_err(|e| failure(e, true))?;
            Ok(EXIT_OK)
        }
        Command::Cas {
            key,
            new,
            expect,
            expect_absent: _,
        } => {
            let o = client
                .cas(bytes(key), expect.map(bytes), bytes(new))
                .await
                .map_err(|e| failure(e, true))?;
            if o.swapped {
                Ok(EXIT_OK)
            } else {
                note(match o.current {
                    Some(v) => format!(
                        "kv-client: not swapped; the current value is {}",
                        escape_bytes(&v)
                    ),
                    None => "kv-client: not swapped; the key is absent".to_string(),
                });
                Ok(EXIT_NO)
            }
        }
        Command::Status => {
            let answers = client.status().await;
            let mut any_up = false;
            for (i, (addr, answer)) in answers.iter().enumerate() {
                any_up |= answer.is_ok();
                let line = StatusLine::new(ids.get(i).copied().flatten(), addr, answer);
                let json =
                    serde_json::to_string(&line).map_err(|e| (EXIT_UNAVAILABLE, e.to_string()))?;
                let _ = writeln!(out, "{json}");
            }
            if any_up {
                Ok(EXIT_OK)
            } else {
                Err((EXIT_UNAVAILABLE, "no replica answered".to_string()))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_command_line_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn timeout_accepts_fractions_and_refuses_nonsense() {
        assert_eq!(parse_timeout("0.5"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_timeout("5"), Ok(Duration::from_secs(5)));
        for bad in ["0", "-1", "abc", "NaN", "inf", "", "1e30", "86401"] {
            assert!(parse_timeout(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn options_may_come_before_or_after_the_command() {
        let c =
            Cli::try_parse_from(["kv-client", "--timeout", "0.5", "get", "--local", "k"]).unwrap();
        assert_eq!(c.timeout, Duration::from_millis(500));
        assert!(matches!(c.command, Command::Get { local: true, .. }));
        let c = Cli::try_parse_from(["kv-client", "put", "k", "-v", "--server", "h:1"]).unwrap();
        assert_eq!(c.server.as_deref(), Some("h:1"));
        assert!(matches!(c.command, Command::Put { ref value, .. } if value == "-v"));
    }

    #[test]
    fn cas_needs_exactly_one_expectation_and_server_excludes_replicas() {
        assert!(Cli::try_parse_from(["kv-client", "cas", "k", "n"]).is_err());
        assert!(Cli::try_parse_from([
            "kv-client",
            "cas",
            "k",
            "n",
            "--expect",
            "o",
            "--expect-absent"
        ])
        .is_err());
        assert!(Cli::try_parse_from(["kv-client", "cas", "k", "n", "--expect-absent"]).is_ok());
        assert!(
            Cli::try_parse_from(["kv-client", "--server", "a:1", "--replicas", "f", "status"])
                .is_err()
        );
    }

    #[test]
    fn status_lines_have_the_documented_shape() {
        let s = ReplicaStatus {
            id: 1,
            leader: false,
            leader_id: Some(3),
            ballot_round: 2,
            applied: 42,
            chosen: 42,
            snapshot: 0,
            keys: 10,
        };
        let up =
            serde_json::to_string(&StatusLine::new(Some(1), "127.0.0.1:7001", &Ok(s))).unwrap();
        assert_eq!(
            up,
            r#"{"id":1,"addr":"127.0.0.1:7001","up":true,"leader":false,"leader_id":3,"applied":42,"chosen":42,"snapshot":0,"keys":10,"ballot_round":2}"#
        );
        let down = StatusLine::new(None, "h:2", &Err(Error::Unavailable("refused".into())));
        let v: serde_json::Value = serde_json::to_value(&down).unwrap();
        assert_eq!(v["id"], serde_json::Value::Null);
        assert_eq!(v["up"], false);
        assert_eq!(v["leader"], false);
        assert_eq!(v["applied"], serde_json::Value::Null);
        assert_eq!(v["error"], "unavailable: refused");
    }
}
