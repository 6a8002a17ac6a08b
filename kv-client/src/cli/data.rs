//! `kv-client range` (alias `scan`) and `kv-client txn`: the data model's
//! commands, their arguments, the transaction language and their output.

use std::ffi::OsString;
use std::io::Read;

use clap::{ArgGroup, Args, Subcommand};
use kv_api::{CmpOp, Compare, KeyValue, RangeRequest, Target, Txn, TxnOp, TxnOpResult};
use serde::Serialize;

use super::output::{Reply, Shown};
use super::{bytes, Failure, Settings, EXIT_NO};
use crate::Client;

/// `range --help`, after the options.
pub const RANGE_EXAMPLES: &str = "\
Examples:
  kv-client range a c              # keys from a (inclusive) to c (exclusive)
  kv-client range --prefix config/ # keys that start with config/
  kv-client range ''               # every key
  kv-client range --prefix app/ --keys-only --limit 10
  kv-client range --prefix app/ --count-only
  kv-client --output json range --prefix app/

Text: one `KEY VALUE` line per key, in key order (bytes that are not UTF-8
shown as \\xNN, and so are spaces, tabs and newlines in a key and newlines
in a value, so that a line splits at its first space);
with --keys-only just KEY; with --count-only the number of keys. JSON: one
object a line, {\"key\":..,\"value\":..,\"create_revision\":N,\"mod_revision\":N,
\"version\":N,\"lease\":N} (and key_base64/value_base64 for bytes that are not
UTF-8); with --count-only {\"count\":N,\"revision\":N}.

The range is read in pages of at most --page-size keys (each page a
linearizable read, or a local one with --local), every page at the first
page's revision: one consistent view, unless the history moves past it
meanwhile (then exit 3, kind \"compacted\"). --rev REV reads the range as it
was at revision REV.";

/// `watch --help`, after the options.
pub const WATCH_EXAMPLES: &str = "\
Examples:
  kv-client watch color                      # changes of one key, from now on
  kv-client watch --prefix config/           # of every key under config/
  kv-client watch --prefix config/ --from-rev 120 --prev-kv
  kv-client --output json watch --prefix jobs/ --progress

Text: one line per change as it happens, `put KEY VALUE` or `delete KEY`
(escaped as `range` does); JSON: {\"type\":\"put\"|\"delete\",\"key\":..,
\"value\":..,\"revision\":N,\"create_revision\":N,\"version\":N} (and
\"prev_value\" with --prev-kv). With --progress, a line
{\"type\":\"progress\",\"revision\":N} (text: `progress N`) whenever about a
second passed with no change: nothing in the range changed up to N.

Runs until interrupted (or --max-events). Every change is printed once, in
revision order, across a leader's death or a replica's restart: the watch
is a long poll with a revision cursor that any replica serves. A start
revision the history no longer holds ends it with exit 3 (kind
\"compacted\"): read the current state with `range` and watch from its
revision + 1.";

/// `watch` arguments.
#[derive(Args, Debug, Clone)]
#[command(group(ArgGroup::new("what").required(true).args(["key", "prefix"])))]
pub struct WatchArgs {
    /// The key to watch.
    #[arg(allow_hyphen_values = true)]
    pub key: Option<OsString>,
    /// Watch every key that starts with PREFIX instead.
    #[arg(
        long,
        value_name = "PREFIX",
        allow_hyphen_values = true,
        conflicts_with = "key"
    )]
    pub prefix: Option<OsString>,
    /// Start at revision REV (default: the next change).
    #[arg(long, value_name = "REV", value_parser = clap::value_parser!(u64).range(1..))]
    pub from_rev: Option<u64>,
    /// Show each change's previous value.
    #[arg(long)]
    pub prev_kv: bool,
    /// Print a progress line whenever nothing changed for about a second.
    #[arg(long)]
    pub progress: bool,
    /// Exit after this many changes.
    #[arg(long, value_name = "N")]
    pub max_events: Option<u64>,
}

#[derive(Serialize)]
struct EventJson {
    #[serde(rename = "type")]
    kind: &'static str,
    key: String,
    value: Option<String>,
    revision: u64,
    create_revision: u64,
    version: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    prev_value: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    key_base64: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    value_base64: Option<String>,
}

#[derive(Serialize)]
struct ProgressJson {
    #[serde(rename = "type")]
    kind: &'static str,
    revision: u64,
}

fn add_event(reply: &mut Reply, e: &kv_api::WatchEvent) {
    let k = Shown::of(&e.kv.key);
    let (kind, text, value) = match e.kind {
        kv_api::EventKind::Put => {
            let v = Shown::of(&e.kv.value);
            let line = format!(
                "put {} {}",
                key_text(&e.kv.key),
                v.text().replace('\n', "\\x0a")
            );
            ("put", line, Some(v))
        }
        kv_api::EventKind::Delete => ("delete", format!("delete {}", key_text(&e.kv.key)), None),
    };
    reply.line(
        text,
        &EventJson {
            kind,
            key: k.text().to_string(),
            value: value.as_ref().map(|v| v.text().to_string()),
            revision: e.kv.mod_revision,
            create_revision: e.kv.create_revision,
            version: e.kv.version,
            prev_value: e
                .prev
                .as_ref()
                .map(|p| Shown::of(&p.value).text().to_string()),
            key_base64: k.base64().map(str::to_string),
            value_base64: value.as_ref().and_then(|v| v.base64().map(str::to_string)),
        },
    );
}

/// Runs `watch` until interrupted, `--max-events`, or an error that
/// retrying cannot mend (compacted: exit 3; bad input: exit 2). Errors
/// that retrying can mend (no quorum, a replica down) are retried with
/// the same cursor, so nothing is missed or repeated.
pub(crate) async fn watch(settings: &Settings, args: WatchArgs) -> u8 {
    let client = match settings
        .builder()
        .and_then(|(b, _)| b.build().map_err(|e| Failure::from_error(e, false)))
    {
        Ok(c) => c,
        Err(f) => return Reply::failed(f).emit(settings.format),
    };
    let mut req = match (args.prefix, args.key) {
        (Some(p), _) => kv_api::WatchRequest::prefix(bytes(p), 0),
        (None, Some(k)) => kv_api::WatchRequest::key(bytes(k), 0),
        (None, None) => {
            return Reply::failed(Failure::usage("give KEY or --prefix PREFIX"))
                .emit(settings.format)
        }
    };
    req.from_revision = args.from_rev.unwrap_or(0);
    req.prev_kv = args.prev_kv;
    let fatal = |e: &crate::Error| {
        matches!(
            e,
            crate::Error::InvalidArgument(_)
                | crate::Error::PermissionDenied(_)
                | crate::Error::Compacted(_)
        )
    };
    let mut watcher = loop {
        match client.watcher(req.clone()).await {
            Ok(w) => break w,
            Err(e) if fatal(&e) => {
                return Reply::failed(Failure::from_error(e, false)).emit(settings.format)
            }
            Err(_) => tokio::time::sleep(std::time::Duration::from_millis(200)).await,
        }
    };
    let mut printed = 0u64;
    loop {
        match watcher.next().await {
            Ok(events) => {
                let mut reply = Reply::default();
                if events.is_empty() && args.progress {
                    let rev = watcher.revision();
                    reply.line(
                        format!("progress {rev}"),
                        &ProgressJson {
                            kind: "progress",
                            revision: rev,
                        },
                    );
                }
                for e in &events {
                    if args.max_events.is_some_and(|m| printed >= m) {
                        break;
                    }
                    add_event(&mut reply, e);
                    printed += 1;
                }
                reply.emit(settings.format);
                if args.max_events.is_some_and(|m| printed >= m) {
                    return super::EXIT_OK;
                }
            }
            Err(e) if fatal(&e) => {
                return Reply::failed(Failure::from_error(e, false)).emit(settings.format)
            }
            Err(e) => {
                tracing::debug!(error = %e, "watch poll failed; retrying from the same revision");
                tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            }
        }
    }
}

/// Runs `compact`.
pub(crate) async fn compact(client: &Client, revision: u64) -> Result<Reply, Failure> {
    let compacted = client
        .compact(revision)
        .await
        .map_err(|e| Failure::from_error(e, true))?;
    let mut reply = Reply::default();
    reply.line(
        compacted.to_string(),
        &ProgressJson {
            kind: "compacted",
            revision: compacted,
        },
    );
    Ok(reply)
}

/// `range` arguments.
#[derive(Args, Debug, Clone)]
#[command(group(ArgGroup::new("bounds").required(true).args(["start", "prefix"])))]
pub struct RangeArgs {
    /// The first key (inclusive; '' for the first key of all).
    #[arg(allow_hyphen_values = true)]
    pub start: Option<OsString>,
    /// The end (exclusive; default: to the last key).
    #[arg(allow_hyphen_values = true, requires = "start")]
    pub end: Option<OsString>,
    /// Every key that starts with PREFIX, instead of START and END.
    #[arg(
        long,
        value_name = "PREFIX",
        allow_hyphen_values = true,
        conflicts_with = "start"
    )]
    pub prefix: Option<OsString>,
    /// At most this many keys in all (default: every key in the range).
    #[arg(long, value_name = "N")]
    pub limit: Option<u64>,
    /// Keys per request (at most 10000).
    #[arg(long, value_name = "N", default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..=10_000))]
    pub page_size: u64,
    /// Print the keys only.
    #[arg(long, conflicts_with = "count_only")]
    pub keys_only: bool,
    /// Print only how many keys the range holds.
    #[arg(long)]
    pub count_only: bool,
    /// Read the first answering replica's own state: fast, possibly stale.
    #[arg(long)]
    pub local: bool,
    /// Read the range as it was at revision REV (refused, exit 3, if the
    /// history no longer reaches back to it). Without it, every page is
    /// read at the first page's revision: one consistent view.
    #[arg(long, value_name = "REV")]
    pub rev: Option<u64>,
}

/// `txn --help`, after the options.
pub const TXN_EXAMPLES: &str = "\
Examples:
  kv-client txn --if 'value lock = free' --then 'put lock me' --else 'put waiting me'
  kv-client txn --if 'absent lock' --then 'put lock me'
  kv-client txn --if 'mod a = 12' --if 'mod b = 13' --then 'put a 90' --then 'put b 110'
  printf 'if version config = 3\\nthen put config new\\nthen del config.old\\n' | kv-client txn -

Comparisons (--if; all must hold for the --then writes to run, otherwise the
--else writes run):
  value KEY OP VALUE     the key's value (an absent key fails every one)
  version KEY OP N       writes since the key was created (0: absent)
  mod KEY OP N           the revision of the key's last write (0: absent)
  create KEY OP N        the revision that created the key (0: absent)
  exists KEY / absent KEY
where OP is one of = != < >.
Writes (--then, --else):
  put KEY VALUE
  del KEY

Words are separated by spaces; a word with spaces, or an empty one, goes in
double quotes, inside which \\\" \\\\ \\n \\t and \\xNN are escapes. With `-`
the transaction is read from stdin, one `if ...`, `then ...` or `else ...` a
line (blank lines and lines starting with # are skipped).

All of it is applied atomically, at one revision, at most once. Exit status 0
if the comparisons held, 1 if not (the --else branch ran). Text output: the
word `succeeded` or `failed`; JSON: {\"succeeded\":BOOL,\"revision\":N,
\"results\":[{\"op\":\"put\"},{\"op\":\"delete\",\"existed\":BOOL}],\"slot\":N}.
At most 128 comparisons and 128 writes a branch, and 2 MiB of keys and values.";

/// `txn` arguments.
#[derive(Args, Debug, Clone)]
pub struct TxnArgs {
    /// A comparison (repeatable), e.g. 'value KEY = VALUE'.
    #[arg(long = "if", value_name = "COMPARE", allow_hyphen_values = true)]
    pub compares: Vec<String>,
    /// A write if every comparison holds (repeatable): 'put KEY VALUE',
    /// 'del KEY'.
    #[arg(long = "then", value_name = "WRITE", allow_hyphen_values = true)]
    pub success: Vec<String>,
    /// A write if not (repeatable).
    #[arg(long = "else", value_name = "WRITE", allow_hyphen_values = true)]
    pub failure: Vec<String>,
    /// `-`: read the transaction from stdin instead, one `if ...`,
    /// `then ...` or `else ...` a line.
    #[arg(value_name = "-", conflicts_with_all = ["compares", "success", "failure"])]
    pub stdin: Option<String>,
}

/// Most bytes of a transaction read from stdin (twice the largest
/// transaction's payload, for quoting).
const MAX_TXN_INPUT: u64 = 5 << 20;

impl TxnArgs {
    /// The transaction the arguments (or stdin) describe.
    pub(crate) fn parse(&self) -> Result<Txn, Failure> {
        let mut txn = Txn::default();
        match self.stdin.as_deref() {
            Some("-") => {
                let mut text = String::new();
                std::io::stdin()
                    .lock()
                    .take(MAX_TXN_INPUT)
                    .read_to_string(&mut text)
                    .map_err(|e| {
                        Failure::usage(format!("cannot read the transaction from stdin: {e}"))
                    })?;
                parse_lines(&text, &mut txn)?;
            }
            Some(other) => {
                return Err(Failure::usage(format!(
                    "unexpected argument {other:?}: give the transaction with --if/--then/--else, \
                     or `-` to read it from stdin"
                )))
            }
            None => {
                for c in &self.compares {
                    txn.compares.push(parse_compare(c)?);
                }
                for w in &self.success {
                    txn.success.push(parse_write(w)?);
                }
                for w in &self.failure {
                    txn.failure.push(parse_write(w)?);
                }
            }
        }
        if txn.compares.is_empty() && txn.success.is_empty() && txn.failure.is_empty() {
            return Err(Failure::usage(
                "the transaction is empty: give --if, --then or --else (see --help)",
            ));
        }
        Ok(txn)
    }
}

/// Parses a transaction written one `if`/`then`/`else` a line.
pub(crate) fn parse_lines(text: &str, txn: &mut Txn) -> Result<(), Failure> {
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let at = |f: Failure| Failure::usage(format!("line {}: {}", n + 1, f.msg));
        let (word, rest) = line.split_once(char::is_whitespace).unwrap_or((line, ""));
        match word {
            "if" => txn.compares.push(parse_compare(rest).map_err(at)?),
            "then" => txn.success.push(parse_write(rest).map_err(at)?),
            "else" => txn.failure.push(parse_write(rest).map_err(at)?),
            other => {
                return Err(at(Failure::usage(format!(
                    "{other:?}: a line starts with if, then or else"
                ))))
            }
        }
    }
    Ok(())
}

/// Splits a line into words: spaces separate, double quotes group, with
/// escapes inside quotes.
pub(crate) fn words(s: &str) -> Result<Vec<Vec<u8>>, Failure> {
    let mut out = Vec::new();
    let mut chars = s.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        let Some(&first) = chars.peek() else {
            return Ok(out);
        };
        let mut word = Vec::new();
        if first == '"' {
            chars.next();
            loop {
                match chars.next() {
                    None => return Err(Failure::usage(format!("unclosed quote in {s:?}"))),
                    Some('"') => break,
                    Some('\\') => match chars.next() {
                        Some('n') => word.push(b'\n'),
                        Some('t') => word.push(b'\t'),
                        Some('\\') => word.push(b'\\'),
                        Some('"') => word.push(b'"'),
                        Some('x') => {
                            let hex: String = chars.by_ref().take(2).collect();
                            let b = u8::from_str_radix(&hex, 16).map_err(|_| {
                                Failure::usage(format!("\\x{hex} is not a byte in {s:?}"))
                            })?;
                            word.push(b);
                        }
                        other => {
                            return Err(Failure::usage(format!(
                                "unknown escape \\{} in {s:?}",
                                other.map(String::from).unwrap_or_default()
                            )))
                        }
                    },
                    Some(c) => {
                        let mut buf = [0; 4];
                        word.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
                    }
                }
            }
            if chars.peek().is_some_and(|c| !c.is_whitespace()) {
                return Err(Failure::usage(format!(
                    "a closing quote must end its word in {s:?}"
                )));
            }
        } else {
            while let Some(&c) = chars.peek() {
                if c.is_whitespace() {
                    break;
                }
                let mut buf = [0; 4];
                word.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
                chars.next();
            }
        }
        out.push(word);
    }
}

fn text(w: &[u8]) -> String {
    String::from_utf8_lossy(w).into_owned()
}

/// Parses one comparison, e.g. `value KEY = VALUE` or `absent KEY`.
pub(crate) fn parse_compare(s: &str) -> Result<Compare, Failure> {
    let w = words(s)?;
    let bad = || {
        Failure::usage(format!(
            "{s:?} is not a comparison: expected `value|version|mod|create KEY OP ARG` or \
             `exists|absent KEY`, OP one of = != < >"
        ))
    };
    let kind = w.first().map(|k| text(k)).ok_or_else(bad)?;
    match (kind.as_str(), w.len()) {
        ("exists" | "absent", 2) => Ok(Compare {
            key: w[1].clone(),
            op: CmpOp::Equal,
            target: Target::Exists(kind == "exists"),
        }),
        ("value" | "version" | "mod" | "create", 4) => {
            let op = match text(&w[2]).as_str() {
                "=" | "==" => CmpOp::Equal,
                "!=" => CmpOp::NotEqual,
                "<" => CmpOp::Less,
                ">" => CmpOp::Greater,
                _ => return Err(bad()),
            };
            let num = || {
                text(&w[3]).parse::<u64>().map_err(|_| {
                    Failure::usage(format!("{s:?}: {:?} is not a number", text(&w[3])))
                })
            };
            let target = match kind.as_str() {
                "value" => Target::Value(w[3].clone()),
                "version" => Target::Version(num()?),
                "mod" => Target::ModRevision(num()?),
                _ => Target::CreateRevision(num()?),
            };
            Ok(Compare {
                key: w[1].clone(),
                op,
                target,
            })
        }
        _ => Err(bad()),
    }
}

/// Parses one write, `put KEY VALUE` or `del KEY`.
pub(crate) fn parse_write(s: &str) -> Result<TxnOp, Failure> {
    let w = words(s)?;
    let kind = w.first().map(|k| text(k)).unwrap_or_default();
    match (kind.as_str(), w.len()) {
        ("put", 3) => Ok(TxnOp::Put {
            key: w[1].clone(),
            value: w[2].clone(),
            lease: 0,
        }),
        ("del" | "delete", 2) => Ok(TxnOp::Delete { key: w[1].clone() }),
        _ => Err(Failure::usage(format!(
            "{s:?} is not a write: expected `put KEY VALUE` or `del KEY`"
        ))),
    }
}

#[derive(Serialize)]
struct KvJson {
    key: String,
    value: String,
    create_revision: u64,
    mod_revision: u64,
    version: u64,
    lease: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    key_base64: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    value_base64: Option<String>,
}

#[derive(Serialize)]
struct CountJson {
    count: u64,
    revision: u64,
}

/// A key as the text form shows it: escaped, and with the separators a
/// `KEY VALUE` line uses escaped too, so a line splits at its first space.
fn key_text(k: &[u8]) -> String {
    let mut out = String::new();
    for c in crate::escape_bytes(k).chars() {
        match c {
            ' ' => out.push_str("\\x20"),
            '\t' => out.push_str("\\x09"),
            '\n' => out.push_str("\\x0a"),
            '\r' => out.push_str("\\x0d"),
            c => out.push(c),
        }
    }
    out
}

fn add_kv(reply: &mut Reply, kv: &KeyValue, keys_only: bool) {
    let k = Shown::of(&kv.key);
    let v = Shown::of(&kv.value);
    let line = if keys_only {
        key_text(&kv.key)
    } else {
        format!("{} {}", key_text(&kv.key), v.text().replace('\n', "\\x0a"))
    };
    reply.line(
        line,
        &KvJson {
            key: k.text().to_string(),
            value: v.text().to_string(),
            create_revision: kv.create_revision,
            mod_revision: kv.mod_revision,
            version: kv.version,
            lease: kv.lease,
            key_base64: k.base64().map(str::to_string),
            value_base64: v.base64().map(str::to_string),
        },
    );
}

/// Runs `range`: page after page until the range or `--limit` ends.
pub(crate) async fn range(client: &Client, args: RangeArgs) -> Result<Reply, Failure> {
    let mut req = match (args.prefix, args.start) {
        (Some(p), _) => RangeRequest::prefix(bytes(p)),
        (None, Some(start)) => {
            RangeRequest::between(bytes(start), args.end.map(bytes).unwrap_or_default())
        }
        (None, None) => return Err(Failure::usage("give START [END] or --prefix PREFIX")),
    };
    req.keys_only = args.keys_only;
    req.count_only = args.count_only;
    req.revision = args.rev.unwrap_or(0);
    let mut left = args.limit.unwrap_or(u64::MAX);
    let mut reply = Reply::default();
    loop {
        req.limit = args.page_size.min(left);
        if req.limit == 0 {
            break;
        }
        let page = if args.local {
            client.range_local(req.clone()).await
        } else {
            client.range(req.clone()).await
        }
        .map_err(|e| Failure::from_error(e, false))?;
        if args.count_only {
            reply.line(
                page.count.to_string(),
                &CountJson {
                    count: page.count,
                    revision: page.revision,
                },
            );
            break;
        }
        for kv in &page.kvs {
            add_kv(&mut reply, kv, args.keys_only);
        }
        left = left.saturating_sub(page.kvs.len() as u64);
        if !page.more {
            break;
        }
        req.token = page.token;
        req.revision = page.revision;
    }
    Ok(reply)
}

#[derive(Serialize)]
struct TxnJson {
    succeeded: bool,
    revision: u64,
    results: Vec<OpJson>,
    slot: u64,
}

#[derive(Serialize)]
struct OpJson {
    op: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    existed: Option<bool>,
}

/// Runs `txn`.
pub(crate) async fn txn(client: &Client, args: TxnArgs) -> Result<Reply, Failure> {
    let txn = args.parse()?;
    let (done, slot) = client
        .txn_outcome(txn)
        .await
        .map_err(|e| Failure::from_error(e, true))?;
    let results = done
        .results
        .iter()
        .map(|r| match r {
            TxnOpResult::Put => OpJson {
                op: "put",
                existed: None,
            },
            TxnOpResult::Deleted { existed } => OpJson {
                op: "delete",
                existed: Some(*existed),
            },
        })
        .collect();
    let mut reply = Reply::default();
    reply.line(
        if done.succeeded {
            "succeeded"
        } else {
            "failed"
        }
        .to_string(),
        &TxnJson {
            succeeded: done.succeeded,
            revision: done.revision,
            results,
            slot,
        },
    );
    if !done.succeeded {
        reply.code = EXIT_NO;
    }
    Ok(reply)
}

/// `lease --help`, after the options.
pub const LEASE_EXAMPLES: &str = "\
Examples:
  id=$(kv-client lease grant 10)        # a 10 s lease; prints its id
  kv-client put --lease $id service/web-1 10.0.0.7:80
  kv-client lease keepalive $id          # renews every TTL/3 until Ctrl-C
  kv-client lease keepalive --once $id   # renews once
  kv-client lease revoke $id             # ends it now: its keys are deleted

A lease ends TTL after its last keepalive as the cluster's log counts time
(the leader's clock, put into the log about once a second), never by one
replica's own clock; a new leader gives every lease its full TTL again, so
a change of leader never ends one early. JSON: grant {\"id\":N,\"ttl_secs\":S};
keepalive {\"id\":N,\"ttl_secs\":S} each renewal (exit 1 once the lease is
gone); revoke {\"id\":N,\"deleted\":N}.";

/// `lease` arguments.
#[derive(Args, Debug, Clone)]
pub struct LeaseArgs {
    /// What to do.
    #[command(subcommand)]
    pub command: LeaseCommand,
}

/// The `lease` subcommands.
#[derive(Subcommand, Debug, Clone)]
pub enum LeaseCommand {
    /// Grant a lease of TTL_SECS seconds (1 to 86400, fractions allowed);
    /// prints its id alone on a line.
    Grant {
        /// The time to live in seconds.
        #[arg(value_name = "TTL_SECS", value_parser = parse_ttl)]
        ttl: std::time::Duration,
    },
    /// Start the lease's TTL again, every TTL/3 until interrupted (or once
    /// with --once); exit status 1 once it no longer exists.
    Keepalive {
        /// The lease id.
        id: u64,
        /// Renew once and exit.
        #[arg(long)]
        once: bool,
    },
    /// End the lease now and delete its keys.
    Revoke {
        /// The lease id.
        id: u64,
    },
}

fn parse_ttl(s: &str) -> Result<std::time::Duration, String> {
    let secs: f64 = s
        .trim()
        .parse()
        .map_err(|_| format!("{s:?} is not a number of seconds"))?;
    let ms = kv_api::MIN_LEASE_TTL_MS as f64..=kv_api::MAX_LEASE_TTL_MS as f64;
    if !ms.contains(&(secs * 1000.0)) {
        return Err(format!(
            "a lease's TTL must be between {} and {} seconds, not {s}",
            kv_api::MIN_LEASE_TTL_MS / 1000,
            kv_api::MAX_LEASE_TTL_MS / 1000
        ));
    }
    Ok(std::time::Duration::from_secs_f64(secs))
}

#[derive(Serialize)]
struct LeaseJson {
    id: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    ttl_secs: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    deleted: Option<u64>,
}

fn gone(id: u64) -> Failure {
    Failure {
        code: EXIT_NO,
        kind: "not_found",
        msg: format!("lease {id} does not exist (expired or revoked; its keys are gone)"),
    }
}

/// Runs a one-shot `lease` command.
pub(crate) async fn lease(client: &Client, args: LeaseArgs) -> Result<Reply, Failure> {
    let mut reply = Reply::default();
    match args.command {
        LeaseCommand::Grant { ttl } => {
            let id = client
                .lease_grant(ttl)
                .await
                .map_err(|e| Failure::from_error(e, true))?;
            reply.line(
                id.to_string(),
                &LeaseJson {
                    id,
                    ttl_secs: Some(ttl.as_secs_f64()),
                    deleted: None,
                },
            );
        }
        LeaseCommand::Keepalive { id, .. } => {
            match client
                .lease_keepalive(id)
                .await
                .map_err(|e| Failure::from_error(e, true))?
            {
                Some(ttl) => keepalive_line(&mut reply, id, ttl),
                None => return Err(gone(id)),
            }
        }
        LeaseCommand::Revoke { id } => {
            let deleted = client
                .lease_revoke(id)
                .await
                .map_err(|e| Failure::from_error(e, true))?;
            reply.line(
                format!("lease {id} revoked; {deleted} keys deleted"),
                &LeaseJson {
                    id,
                    ttl_secs: None,
                    deleted: Some(deleted),
                },
            );
        }
    }
    Ok(reply)
}

fn keepalive_line(reply: &mut Reply, id: u64, ttl: std::time::Duration) {
    reply.line(
        format!("lease {id} kept alive for {} s", ttl.as_secs_f64()),
        &LeaseJson {
            id,
            ttl_secs: Some(ttl.as_secs_f64()),
            deleted: None,
        },
    );
}

/// `lease keepalive ID` without --once: renews every TTL/3, printing a
/// line each time, until the lease is gone (exit 1), a renewal fails for
/// longer than the lease could survive (exit 3), or the process is
/// interrupted.
pub(crate) async fn keepalive_forever(settings: &Settings, id: u64) -> u8 {
    let client = match settings
        .builder()
        .and_then(|(b, _)| b.build().map_err(|e| Failure::from_error(e, false)))
    {
        Ok(c) => c,
        Err(f) => return Reply::failed(f).emit(settings.format),
    };
    loop {
        let mut reply = Reply::default();
        let ttl = match client.lease_keepalive(id).await {
            Ok(Some(ttl)) => ttl,
            Ok(None) => return Reply::failed(gone(id)).emit(settings.format),
            Err(e) => return Reply::failed(Failure::from_error(e, true)).emit(settings.format),
        };
        keepalive_line(&mut reply, id, ttl);
        reply.emit(settings.format);
        tokio::time::sleep(ttl / 3).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_split_on_spaces_and_group_quotes_with_escapes() {
        assert_eq!(
            words(r#"put "a key" "line\none\x00" plain"#).unwrap(),
            [
                b"put".to_vec(),
                b"a key".to_vec(),
                b"line\none\x00".to_vec(),
                b"plain".to_vec()
            ]
        );
        assert_eq!(words(r#"put k """#).unwrap()[2], b"");
        assert!(words(r#"put "open"#).is_err());
        assert!(words(r#"put "a"b"#).is_err());
        assert!(words(r#"put "\q""#).is_err());
    }

    #[test]
    fn comparisons_and_writes_parse_and_nonsense_is_refused() {
        let c = parse_compare("mod a < 12").unwrap();
        assert_eq!(
            (c.key, c.op, c.target),
            (b"a".to_vec(), CmpOp::Less, Target::ModRevision(12))
        );
        let c = parse_compare("absent lock").unwrap();
        assert_eq!(c.target, Target::Exists(false));
        let c = parse_compare("value k != \"x y\"").unwrap();
        assert_eq!(
            (c.op, c.target),
            (CmpOp::NotEqual, Target::Value(b"x y".to_vec()))
        );
        for bad in ["", "value k", "mod a ~ 1", "version k = x", "size k = 1"] {
            assert!(parse_compare(bad).is_err(), "{bad}");
        }
        assert_eq!(
            parse_write("del k").unwrap(),
            TxnOp::Delete { key: b"k".to_vec() }
        );
        for bad in ["", "put k", "get k", "del"] {
            assert!(parse_write(bad).is_err(), "{bad}");
        }
        let mut t = Txn::default();
        parse_lines("# move\nif exists a\n\nthen put a 1\nelse del a\n", &mut t).unwrap();
        assert_eq!(
            (t.compares.len(), t.success.len(), t.failure.len()),
            (1, 1, 1)
        );
        let e = parse_lines("if exists a\nwhen put a 1\n", &mut t).unwrap_err();
        assert!(e.msg.contains("line 2"), "{}", e.msg);
    }

    #[test]
    fn range_lines_split_at_the_first_space() {
        assert_eq!(key_text(b"a b\tc\n"), "a\\x20b\\x09c\\x0a");
    }
}
