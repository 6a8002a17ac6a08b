//! `kv-client fault`: changes (or shows) the failure injection of one
//! replica, or of every replica of the replica file, through the
//! `Kv::set_faults` RPC.

use clap::Args;
use kv_api::{FaultReport, FaultSpec, ReplicaId};
use serde::Serialize;

use super::output::Reply;
use super::{error_kind, Failure, Settings};

pub(crate) const EXAMPLES: &str = "\
Examples:
  # Show what replica 3 injects now, and what it has injected so far
  kv-client fault --server 127.0.0.1:7003

  # Make it drop 20% of its peer messages and delay the rest by 5 to 50 ms
  kv-client fault --server 127.0.0.1:7003 --drop-rate 0.2 --delay-ms 5..50

  # Cut it off from replicas 1 and 2 (both ways), then heal everything
  kv-client fault --server 127.0.0.1:7003 --isolate 1,2
  kv-client fault --all --heal

One JSON line per replica, e.g.
  {\"id\":3,\"addr\":\"127.0.0.1:7003\",\"settings\":{\"drop_rate\":0.2,\"delay_ms\":[5,50],\"timeout_rate\":0.0,\"isolate\":[],\"heal\":false},\"dropped\":12,\"delayed\":40,\"timed_out\":0,\"refused\":0}
or, for a replica that could not be changed,
  {\"id\":3,\"addr\":\"127.0.0.1:7003\",\"error\":\"...\",\"kind\":\"unavailable\"}
Options left out keep their current setting; --heal resets every setting
first. A replica started without --enable-fault-injection refuses changes
(it still reports). Exit status: 0 if every replica answered, 2 for an
invalid change or one refused as disabled, 3 if a replica could not be
reached.";

/// The arguments of `kv-client fault`. Options left out keep the replica's
/// current setting.
#[derive(Args, Debug, Clone, PartialEq)]
pub struct FaultArgs {
    /// Apply to every replica of the replica file (instead of --server).
    #[arg(long)]
    pub all: bool,
    /// Drop each outgoing peer message with probability P (0..=1).
    #[arg(long, value_name = "P", value_parser = parse_rate)]
    pub drop_rate: Option<f64>,
    /// Delay each outgoing peer message by a random number of milliseconds
    /// in MIN..MAX (inclusive; `N` alone means exactly N).
    #[arg(long, value_name = "MIN..MAX", value_parser = parse_delay)]
    pub delay_ms: Option<(u64, u64)>,
    /// Hold each outgoing peer call until its deadline with probability P
    /// (0..=1): a forced timeout.
    #[arg(long, value_name = "P", value_parser = parse_rate)]
    pub timeout_rate: Option<f64>,
    /// Cut the links with these replicas, both ways (comma-separated ids,
    /// e.g. 2,3); replaces the current set. `none` heals every link.
    #[arg(long, value_name = "IDS", value_parser = parse_ids)]
    pub isolate: Option<Ids>,
    /// Reset every setting to no faults (before applying the other options).
    #[arg(long)]
    pub heal: bool,
}

/// A list of replica ids, as `--isolate` takes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ids(pub Vec<ReplicaId>);

impl FaultArgs {
    /// The change these arguments ask for.
    pub fn spec(&self) -> FaultSpec {
        FaultSpec {
            drop_rate: self.drop_rate,
            delay_ms: self.delay_ms,
            timeout_rate: self.timeout_rate,
            isolate: self.isolate.as_ref().map(|i| i.0.clone()),
            heal: self.heal,
        }
    }
}

fn parse_rate(s: &str) -> Result<f64, String> {
    let r: f64 = s
        .trim()
        .parse()
        .map_err(|_| format!("{s:?} is not a probability (a number from 0 to 1)"))?;
    if !(0.0..=1.0).contains(&r) {
        return Err(format!("the probability must be between 0 and 1, got {s}"));
    }
    Ok(r)
}

fn parse_delay(s: &str) -> Result<(u64, u64), String> {
    let num = |p: &str| {
        p.trim()
            .parse::<u64>()
            .map_err(|_| format!("{p:?} is not a whole number of milliseconds"))
    };
    let (lo, hi) = match s.split_once("..") {
        Some((a, b)) => (num(a)?, num(b.trim_start_matches('='))?),
        None => {
            let n = num(s)?;
            (n, n)
        }
    };
    if lo > hi {
        return Err(format!("the delay range {s} is empty (MIN above MAX)"));
    }
    Ok((lo, hi))
}

fn parse_ids(s: &str) -> Result<Ids, String> {
    let s = s.trim();
    if s.is_empty() || s == "none" {
        return Ok(Ids(Vec::new()));
    }
    let mut ids = Vec::new();
    for part in s.split(',') {
        let id: u64 = part
            .trim()
            .parse()
            .ok()
            .filter(|id| *id > 0)
            .ok_or_else(|| format!("{part:?} is not a replica id (a positive integer)"))?;
        if !ids.contains(&id) {
            ids.push(id);
        }
    }
    Ok(Ids(ids))
}

/// One line of `fault` output: a replica's report, or why it has none.
#[derive(Serialize)]
struct FaultLine<'a> {
    id: Option<u64>,
    addr: &'a str,
    #[serde(flatten)]
    report: Option<&'a FaultReport>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    kind: Option<&'static str>,
}

/// Runs `fault`: to `--server`, or with `--all` to every replica of the
/// replica file, all at once.
pub(crate) async fn run(settings: &Settings, args: FaultArgs) -> Reply {
    let targets: Vec<(Option<u64>, String)> = match (&settings.server, args.all) {
        (Some(_), true) => {
            return Reply::failed(Failure::usage(
                "fault: give either --server ADDR or --all, not both",
            ))
        }
        (Some(addr), false) => vec![(None, addr.clone())],
        (None, true) => match settings.load_replicas() {
            Ok(r) => r
                .replicas
                .into_iter()
                .map(|r| (Some(r.id), r.client_addr))
                .collect(),
            Err(f) => return Reply::failed(f),
        },
        (None, false) => return Reply::failed(Failure::usage(
            "fault needs --server ADDR (one replica) or --all (every replica of the replica file)",
        )),
    };
    let spec = args.spec();
    if let Err(e) = spec.validate() {
        return Reply::failed(Failure::usage(e.to_string()));
    }
    let client = match settings
        .base_builder()
        .addrs(targets.iter().map(|(_, a)| a.clone()).collect())
        .build()
    {
        Ok(c) => c,
        Err(e) => return Reply::failed(Failure::from_error(e, false)),
    };
    let asks = targets.iter().map(|(id, addr)| {
        let (client, spec) = (&client, spec.clone());
        async move { (*id, addr.as_str(), client.set_faults(addr, spec).await) }
    });
    let answers = futures::future::join_all(asks).await;
    let mut reply = Reply::default();
    let mut worst: Option<Failure> = None;
    for (id, addr, answer) in &answers {
        let line = match answer {
            Ok(report) => FaultLine {
                id: *id,
                addr,
                report: Some(report),
                error: None,
                kind: None,
            },
            Err(e) => {
                let f = Failure {
                    msg: format!("fault: {e}"),
                    ..Failure::from_error(e.clone(), false)
                };
                if !matches!(&worst, Some(w) if w.code >= f.code) {
                    worst = Some(f);
                }
                FaultLine {
                    id: *id,
                    addr,
                    report: None,
                    error: Some(e.to_string()),
                    kind: Some(error_kind(e)),
                }
            }
        };
        reply.json_line(&line);
    }
    if let Some(f) = worst {
        let failed = answers.iter().filter(|a| a.2.is_err()).count();
        reply.fail(Failure {
            msg: if answers.len() > 1 {
                format!(
                    "{failed} of {} replicas not changed; {}",
                    answers.len(),
                    f.msg
                )
            } else {
                f.msg.clone()
            },
            ..f
        });
    }
    reply
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_delays_and_ids_are_checked() {
        assert_eq!(parse_rate("0.25"), Ok(0.25));
        for bad in ["-0.1", "1.5", "x", "NaN"] {
            assert!(parse_rate(bad).is_err(), "{bad}");
        }
        assert_eq!(parse_delay("5..50"), Ok((5, 50)));
        assert_eq!(parse_delay("5..=50"), Ok((5, 50)));
        assert_eq!(parse_delay("7"), Ok((7, 7)));
        for bad in ["50..5", "a..b", "-1..3", "..", ""] {
            assert!(parse_delay(bad).is_err(), "{bad}");
        }
        assert_eq!(parse_ids("2,3"), Ok(Ids(vec![2, 3])));
        assert_eq!(parse_ids("none"), Ok(Ids(vec![])));
        for bad in ["0", "a", "1,,2", "-1"] {
            assert!(parse_ids(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn report_lines_flatten_the_report() {
        let report = FaultReport {
            settings: FaultSpec {
                drop_rate: Some(0.5),
                delay_ms: Some((1, 2)),
                timeout_rate: Some(0.0),
                isolate: Some(vec![2]),
                heal: false,
            },
            dropped: 3,
            ..FaultReport::default()
        };
        let line = FaultLine {
            id: Some(1),
            addr: "h:1",
            report: Some(&report),
            error: None,
            kind: None,
        };
        assert_eq!(
            serde_json::to_string(&line).unwrap(),
            r#"{"id":1,"addr":"h:1","settings":{"drop_rate":0.5,"delay_ms":[1,2],"timeout_rate":0.0,"isolate":[2],"heal":false},"dropped":3,"delayed":0,"timed_out":0,"refused":0}"#
        );
    }
}
