//! The commands.
//!
//! Connection commands (`PING`, `HELLO`, `CLIENT`, `INFO`, …) answer from
//! the connection. Key commands run on a [`Tx`]: an overlay over the keys
//! they name, read at one revision; what they change becomes one
//! [`Txn`] that compares every key read with the revision it was read at
//! (and every `WATCH`ed key with the revision `WATCH` saw). A `MULTI` is
//! the same with several commands on one overlay. If the transaction's
//! comparisons fail, someone wrote in between: the commands are computed
//! again from a fresh read (a linearizable read-modify-write, retried),
//! unless a watched key changed, which answers `EXEC` with the nil array.
//!
//! Hot commands that need no read (`SET k v`, `MSET`, `DEL`) and `GET`
//! skip the overlay: a plain put, a transaction without comparisons, a
//! get.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{SystemTime, UNIX_EPOCH};

use kv_api::{
    prefix_end, CmpOp, Compare, IncrError, KeyValue, KvError, LeaseOp, Op, OpResult, RangeRequest,
    Target, Txn, TxnOp, TxnOpResult, MAX_LEASE_TTL_MS, MAX_TXN_COMPARES, MIN_LEASE_TTL_MS,
};

use super::conn::{kv_error, Args, Conn};
use super::glob;
use super::resp::Reply;

/// The version `INFO` and `HELLO` report: redis-cli and client libraries
/// gate features on it, and what we serve is Redis 7's string subset.
const REDIS_VERSION: &str = "7.0.0";

/// Times a transaction is computed again after a conflict before the
/// command answers an error.
const MAX_ATTEMPTS: usize = 64;

/// Most keys `KEYS` answers (use `SCAN` for more).
const MAX_KEYS_REPLY: usize = 100_000;

/// `SCAN`'s default and largest `COUNT`.
const SCAN_COUNT: u64 = 10;
const MAX_SCAN_COUNT: u64 = 10_000;

/// The commands that run on the overlay, with their arity (Redis's
/// convention: positive exact, negative at least) and where their keys are
/// (`first`, `last` (negative: from the end), `step`).
fn key_command(name: &str) -> Option<(i32, usize, i32, usize)> {
    Some(match name {
        "GET" | "STRLEN" | "TTL" | "PTTL" | "TYPE" | "GETDEL" | "INCR" | "DECR" | "PERSIST" => {
            (2, 1, 1, 1)
        }
        "SET" => (-3, 1, 1, 1),
        "SETNX" | "GETSET" | "APPEND" | "INCRBY" | "DECRBY" | "INCRBYFLOAT" => (3, 1, 1, 1),
        "EXPIRE" | "PEXPIRE" | "EXPIREAT" | "PEXPIREAT" => (-3, 1, 1, 1),
        "GETRANGE" | "SETRANGE" => (4, 1, 1, 1),
        "MGET" | "EXISTS" | "DEL" | "UNLINK" => (-2, 1, -1, 1),
        "MSET" | "MSETNX" => (-3, 1, -1, 2),
        "RENAME" | "RENAMENX" => (3, 1, 2, 1),
        "PING" => (-1, 0, 0, 0),
        "ECHO" => (2, 0, 0, 0),
        _ => return None,
    })
}

/// `-ERR wrong number of arguments for 'x' command`.
pub fn arity(name: &[u8]) -> Reply {
    Reply::err(format!(
        "wrong number of arguments for '{}' command",
        String::from_utf8_lossy(name).to_lowercase()
    ))
}

/// Redis's answer to a command it does not know.
fn unknown(args: &Args) -> Reply {
    let mut text = format!(
        "unknown command '{}', with args beginning with: ",
        printable(&args[0], 128)
    );
    let mut room = 128usize;
    for a in &args[1..] {
        if room == 0 {
            break;
        }
        let shown = printable(a, room);
        room = room.saturating_sub(a.len());
        text.push_str(&format!("'{shown}' "));
    }
    Reply::err(text)
}

fn printable(b: &[u8], max: usize) -> String {
    b.iter()
        .take(max)
        .map(|&c| {
            if c.is_ascii_graphic() || c == b' ' {
                char::from(c)
            } else {
                '?'
            }
        })
        .collect()
}

/// The keys of a key command's arguments, or its arity error.
fn keys_of(name: &str, args: &Args) -> Result<Vec<Vec<u8>>, Reply> {
    let Some((arity_n, first, last, step)) = key_command(name) else {
        return Err(unknown(args));
    };
    let n = args.len() as i32;
    let ok = if arity_n >= 0 {
        n == arity_n
    } else {
        n >= -arity_n
    };
    if !ok || (step == 2 && !(args.len() - 1).is_multiple_of(2)) {
        return Err(arity(&args[0]));
    }
    if first == 0 {
        return Ok(Vec::new());
    }
    let last = if last < 0 {
        (n + last) as usize
    } else {
        last as usize
    };
    Ok((first..=last)
        .step_by(step)
        .map(|i| args[i].clone())
        .collect())
}

/// Whether a command may be queued in `MULTI` (its arity and that it is
/// one a transaction can hold).
pub fn check_queued(name: &str, args: &Args) -> Result<(), Reply> {
    match keys_of(name, args) {
        Ok(_) => Ok(()),
        Err(e) if key_command(name).is_some() => Err(e),
        Err(_) if is_connection_command(name) => Err(Reply::err(format!(
            "'{}' cannot be used inside MULTI here: a transaction holds only key commands",
            name.to_lowercase()
        ))),
        Err(e) => Err(e),
    }
}

fn is_connection_command(name: &str) -> bool {
    matches!(
        name,
        "SELECT"
            | "HELLO"
            | "AUTH"
            | "CLIENT"
            | "COMMAND"
            | "INFO"
            | "CONFIG"
            | "DBSIZE"
            | "KEYS"
            | "SCAN"
            | "UNWATCH"
            | "TIME"
    )
}

/// A command outside `MULTI`.
pub async fn single(c: &mut Conn, name: &str, args: Args) -> Reply {
    match name {
        "PING" if args.len() <= 2 => match args.get(1) {
            None => Reply::Simple("PONG".into()),
            Some(m) => Reply::bulk(m.clone()),
        },
        "QUIT" => {
            c.quit = true;
            Reply::ok()
        }
        "RESET" => {
            c.multi = None;
            c.watched.clear();
            c.name = None;
            Reply::Simple("RESET".into())
        }
        "SELECT" if args.len() == 2 => match args[1].as_slice() {
            b"0" => Reply::ok(),
            _ => Reply::err("DB index is out of range"),
        },
        "AUTH" => auth(),
        "HELLO" => hello(c, &args),
        "CLIENT" => client(c, &args),
        "COMMAND" => command(&args),
        "CONFIG" => config(&args),
        "TIME" => {
            let now = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default();
            Reply::array(vec![
                Reply::bulk(now.as_secs().to_string()),
                Reply::bulk(now.subsec_micros().to_string()),
            ])
        }
        "INFO" => info(c).await,
        "DBSIZE" if args.len() == 1 => {
            let req = RangeRequest {
                count_only: true,
                ..RangeRequest::between(Vec::new(), Vec::new())
            };
            match c.range(req).await {
                Ok(r) => Reply::Int(r.count as i64),
                Err(e) => kv_error(e),
            }
        }
        "KEYS" if args.len() == 2 => keys(c, &args[1]).await,
        "SCAN" if args.len() >= 2 => scan(c, &args).await,
        // The fast paths.
        "GET" if args.len() == 2 => match c.get(&args[1]).await {
            Ok(v) => Reply::Bulk(v),
            Err(e) => kv_error(e),
        },
        "SET" if args.len() == 3 => {
            let op = Op::Put {
                key: args[1].clone(),
                value: args[2].clone(),
            };
            match c.write(op).await {
                Ok(_) => Reply::ok(),
                Err(e) => kv_error(e),
            }
        }
        "MSET" if args.len() >= 3 && args.len() % 2 == 1 => {
            // The last value of a key given twice wins, as in Redis.
            let pairs: BTreeMap<&[u8], &[u8]> = args[1..]
                .chunks(2)
                .map(|p| (p[0].as_slice(), p[1].as_slice()))
                .collect();
            let txn = Txn {
                success: pairs
                    .into_iter()
                    .map(|(k, v)| TxnOp::Put {
                        key: k.to_vec(),
                        value: v.to_vec(),
                        lease: 0,
                    })
                    .collect(),
                ..Txn::default()
            };
            match c.write(Op::Txn(txn)).await {
                Ok(_) => Reply::ok(),
                Err(e) => kv_error(e),
            }
        }
        "DEL" | "UNLINK" if args.len() >= 2 => {
            let keys: BTreeSet<&Vec<u8>> = args[1..].iter().collect();
            let txn = Txn {
                success: keys
                    .into_iter()
                    .map(|k| TxnOp::Delete { key: k.clone() })
                    .collect(),
                ..Txn::default()
            };
            match c.write(Op::Txn(txn)).await {
                Ok(OpResult::Txn(r)) => Reply::Int(
                    r.results
                        .iter()
                        .filter(|r| matches!(r, TxnOpResult::Deleted { existed: true }))
                        .count() as i64,
                ),
                Ok(other) => Reply::err(format!("unexpected result {other:?}")),
                Err(e) => kv_error(e),
            }
        }
        "INCR" | "DECR" | "INCRBY" | "DECRBY" if keys_of(name, &args).is_ok() => {
            let by = match incr_by(name, &args) {
                Ok(by) => by,
                Err(reply) => return reply,
            };
            let op = Op::Incr {
                key: args[1].clone(),
                by,
            };
            match c.write(op).await {
                Ok(OpResult::Incr(Ok(n))) => Reply::Int(n),
                Ok(OpResult::Incr(Err(IncrError::NotAnInteger))) => not_integer(),
                Ok(OpResult::Incr(Err(IncrError::Overflow))) => {
                    Reply::err("increment or decrement would overflow")
                }
                Ok(other) => Reply::err(format!("unexpected result {other:?}")),
                Err(e) => kv_error(e),
            }
        }
        _ if key_command(name).is_some() => match execute(c, vec![args], BTreeMap::new()).await {
            Ok(mut replies) => replies.pop().unwrap_or_else(Reply::nil),
            Err(reply) => reply,
        },
        _ if is_connection_command(name) || name == "PING" => arity(&args[0]),
        _ => unknown(&args),
    }
}

fn auth() -> Reply {
    // Who a client is comes from its TLS certificate (its role), not from
    // a password: there is none to check, and Redis answers so too.
    Reply::err(
        "AUTH <password> called without any password configured for the default user. Are you \
         sure your configuration is correct?",
    )
}

fn hello(c: &mut Conn, args: &Args) -> Reply {
    let mut i = 1;
    if let Some(v) = args.get(1) {
        match v.as_slice() {
            b"2" => {}
            b"3" => {
                return Reply::Error(
                    "NOPROTO sorry, this protocol version is not supported (RESP2 only)".into(),
                )
            }
            _ => return Reply::err("Protocol version is not an integer or out of range"),
        }
        i = 2;
    }
    while i < args.len() {
        match args[i].to_ascii_uppercase().as_slice() {
            b"AUTH" if i + 2 < args.len() => return auth(),
            b"SETNAME" if i + 1 < args.len() => {
                c.name = Some(args[i + 1].clone());
                i += 2;
            }
            _ => return Reply::err("syntax error"),
        }
    }
    let role = "master";
    Reply::array(vec![
        Reply::bulk("server"),
        Reply::bulk("redis"),
        Reply::bulk("version"),
        Reply::bulk(REDIS_VERSION),
        Reply::bulk("proto"),
        Reply::Int(2),
        Reply::bulk("id"),
        Reply::Int(c.id as i64),
        Reply::bulk("mode"),
        Reply::bulk("standalone"),
        Reply::bulk("role"),
        Reply::bulk(role),
        Reply::bulk("modules"),
        Reply::array(vec![]),
    ])
}

fn client_info(c: &Conn) -> String {
    format!(
        "id={} addr={} laddr=? fd=0 name={} db=0 multi={} watch={} resp=2 lib-name= lib-ver=\n",
        c.id,
        c.from,
        c.name
            .as_deref()
            .map(|n| String::from_utf8_lossy(n).into_owned())
            .unwrap_or_default(),
        c.multi.as_ref().map_or(-1, |(q, _)| q.len() as i64),
        c.watched.len()
    )
}

fn client(c: &mut Conn, args: &Args) -> Reply {
    let Some(sub) = args.get(1) else {
        return arity(&args[0]);
    };
    let sub = String::from_utf8_lossy(sub).to_ascii_uppercase();
    match (sub.as_str(), args.len()) {
        ("SETNAME", 3) => {
            let n = &args[2];
            if n.iter().any(|&b| !(b'!'..=b'~').contains(&b)) {
                return Reply::err(
                    "Client names cannot contain spaces, newlines or special characters.",
                );
            }
            c.name = (!n.is_empty()).then(|| n.clone());
            Reply::ok()
        }
        ("GETNAME", 2) => Reply::Bulk(c.name.clone()),
        ("ID", 2) => Reply::Int(c.id as i64),
        ("INFO", 2) | ("LIST", _) => Reply::bulk(client_info(c)),
        ("SETINFO", 4) | ("NO-EVICT", 3) | ("NO-TOUCH", 3) => Reply::ok(),
        ("SETNAME" | "GETNAME" | "ID" | "INFO" | "SETINFO", _) => Reply::err(format!(
            "wrong number of arguments for 'client|{}' command",
            sub.to_lowercase()
        )),
        _ => Reply::err(format!(
            "unknown subcommand '{}'. Try CLIENT HELP.",
            printable(&args[1], 128)
        )),
    }
}

fn command(args: &Args) -> Reply {
    let sub = args
        .get(1)
        .map(|s| String::from_utf8_lossy(s).to_ascii_uppercase());
    match sub.as_deref() {
        // Clients ask for the command table to learn key positions and
        // docs; an empty one makes them fall back to sending as typed.
        None | Some("DOCS") => Reply::array(vec![]),
        Some("COUNT") => Reply::Int(0),
        Some("INFO") => Reply::array(args[2..].iter().map(|_| Reply::Array(None)).collect()),
        Some(_) => Reply::err(format!(
            "unknown subcommand '{}'. Try COMMAND HELP.",
            printable(&args[1], 128)
        )),
    }
}

/// The configuration `CONFIG GET` shows (what redis-benchmark and client
/// libraries ask about). Every write is synced to a majority's disks
/// before it is acknowledged, the nearest Redis setting to which is
/// `appendfsync always`.
const CONFIG: &[(&str, &str)] = &[
    ("save", ""),
    ("appendonly", "yes"),
    ("appendfsync", "always"),
    ("databases", "1"),
    ("maxmemory", "0"),
    ("timeout", "0"),
];

fn config(args: &Args) -> Reply {
    let sub = args
        .get(1)
        .map(|s| String::from_utf8_lossy(s).to_ascii_uppercase());
    match sub.as_deref() {
        Some("GET") if args.len() >= 3 => {
            let mut out = Vec::new();
            for (k, v) in CONFIG {
                if args[2..]
                    .iter()
                    .any(|p| glob::matches(&p.to_ascii_lowercase(), k.as_bytes()))
                {
                    out.push(Reply::bulk(*k));
                    out.push(Reply::bulk(*v));
                }
            }
            Reply::array(out)
        }
        Some("GET") => arity(b"config|get"),
        Some("RESETSTAT") => Reply::ok(),
        Some("SET") => {
            Reply::err("CONFIG SET is not supported: kvpaxos is configured by its flags")
        }
        _ => Reply::err(format!(
            "unknown subcommand '{}'. Try CONFIG HELP.",
            args.get(1).map(|a| printable(a, 128)).unwrap_or_default()
        )),
    }
}

async fn info(c: &Conn) -> Reply {
    let s = c.h.client_status().await;
    let role = if s.leader { "master" } else { "slave" };
    let mut text = format!(
        "# Server\r\nredis_version:{REDIS_VERSION}\r\nkvpaxos_version:{}\r\nredis_mode:standalone\r\n\
         process_id:{}\r\n\r\n# Replication\r\nrole:{role}\r\nkvpaxos_replica_id:{}\r\n\
         kvpaxos_leader_id:{}\r\nkvpaxos_applied:{}\r\nkvpaxos_chosen:{}\r\n",
        env!("CARGO_PKG_VERSION"),
        std::process::id(),
        s.id,
        s.leader_id.map(|l| l.to_string()).unwrap_or_default(),
        s.applied,
        s.chosen,
    );
    if !s.leader {
        text.push_str("master_link_status:");
        text.push_str(if s.leader_id.is_some() { "up" } else { "down" });
        text.push_str("\r\n");
    }
    text.push_str(&format!(
        "\r\n# Keyspace\r\ndb0:keys={},expires=0,avg_ttl=0\r\n",
        s.keys
    ));
    Reply::bulk(text)
}

/// `KEYS pattern`: the matching keys, read at one revision.
async fn keys(c: &Conn, pattern: &[u8]) -> Reply {
    let prefix = glob::literal_prefix(pattern);
    let mut req = RangeRequest {
        keys_only: true,
        limit: 1000,
        ..RangeRequest::prefix(prefix)
    };
    let mut out = Vec::new();
    'again: for _ in 0..MAX_ATTEMPTS {
        out.clear();
        req.token = None;
        req.revision = 0;
        loop {
            let r = match c.range(req.clone()).await {
                Ok(r) => r,
                Err(KvError::Compacted(_)) => continue 'again,
                Err(e) => return kv_error(e),
            };
            for kv in r.kvs {
                if glob::matches(pattern, &kv.key) {
                    if out.len() >= MAX_KEYS_REPLY {
                        return Reply::err(format!(
                            "KEYS answers at most {MAX_KEYS_REPLY} keys here; use SCAN"
                        ));
                    }
                    out.push(Reply::bulk(kv.key));
                }
            }
            if !r.more {
                return Reply::array(out);
            }
            req.revision = r.revision;
            req.token = r.token;
        }
    }
    Reply::err("the keys changed too fast to list; retry")
}

/// `SCAN cursor [MATCH p] [COUNT n] [TYPE t]`.
async fn scan(c: &mut Conn, args: &Args) -> Reply {
    let mut pattern: Option<Vec<u8>> = None;
    let mut count = SCAN_COUNT;
    let mut only_strings = true;
    let mut i = 2;
    while i < args.len() {
        let Some(v) = args.get(i + 1) else {
            return Reply::err("syntax error");
        };
        match args[i].to_ascii_uppercase().as_slice() {
            b"MATCH" => pattern = Some(v.clone()),
            b"COUNT" => match parse_i64(v) {
                Some(n) if n >= 1 => count = (n as u64).min(MAX_SCAN_COUNT),
                Some(_) => return Reply::err("syntax error"),
                None => return Reply::err("value is not an integer or out of range"),
            },
            b"TYPE" => only_strings = v.eq_ignore_ascii_case(b"string"),
            _ => return Reply::err("syntax error"),
        }
        i += 2;
    }
    let token = match args[1].as_slice() {
        b"0" => None,
        cur => match parse_i64(cur).and_then(|n| c.cursors.remove(&(n as u64))) {
            Some(t) => Some(t),
            None => return Reply::err("invalid cursor"),
        },
    };
    let prefix = pattern
        .as_deref()
        .map(glob::literal_prefix)
        .unwrap_or_default();
    let req = RangeRequest {
        keys_only: true,
        limit: count,
        token,
        ..RangeRequest::between(prefix.clone(), prefix_end(&prefix))
    };
    let r = match c.range(req).await {
        Ok(r) => r,
        Err(e) => return kv_error(e),
    };
    let keys: Vec<Reply> = r
        .kvs
        .into_iter()
        .filter(|kv| only_strings && pattern.as_deref().is_none_or(|p| glob::matches(p, &kv.key)))
        .map(|kv| Reply::bulk(kv.key))
        .collect();
    let next = match (r.more, r.token) {
        (true, Some(t)) => c.new_cursor(t),
        _ => 0,
    };
    Reply::array(vec![Reply::bulk(next.to_string()), Reply::array(keys)])
}

/// Where a key's TTL comes from in the overlay.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Lease {
    None,
    /// An existing lease.
    Id(u64),
    /// The n-th lease this transaction grants.
    New(usize),
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct Val {
    value: Vec<u8>,
    lease: Lease,
}

/// The overlay: keys as read, then as the commands leave them.
struct Tx {
    now_ms: u64,
    cur: BTreeMap<Vec<u8>, Option<Val>>,
    dirty: BTreeSet<Vec<u8>>,
    /// TTLs (ms) of the leases to grant.
    new_leases: Vec<u64>,
    /// Remaining ms of the existing leases read, if asked for.
    remaining: BTreeMap<u64, i64>,
}

impl Tx {
    fn get(&self, k: &[u8]) -> Option<&Val> {
        self.cur.get(k).and_then(Option::as_ref)
    }

    fn set(&mut self, k: &[u8], v: Option<Val>) {
        self.cur.insert(k.to_vec(), v);
        self.dirty.insert(k.to_vec());
    }

    fn put(&mut self, k: &[u8], value: Vec<u8>, lease: Lease) {
        self.set(k, Some(Val { value, lease }));
    }

    /// A lease of `ms` from now, or the key's deletion if `ms` is not
    /// positive; `Err` if it is beyond the longest lease.
    fn expire_in(&mut self, ms: i64) -> Result<Option<Lease>, Reply> {
        if ms <= 0 {
            return Ok(None);
        }
        let ms = (ms as u64).max(MIN_LEASE_TTL_MS);
        if ms > MAX_LEASE_TTL_MS {
            return Err(Reply::err(format!(
                "invalid expire time: the longest TTL here is {} s",
                MAX_LEASE_TTL_MS / 1000
            )));
        }
        self.new_leases.push(ms);
        Ok(Some(Lease::New(self.new_leases.len() - 1)))
    }

    fn ttl_ms(&self, k: &[u8]) -> i64 {
        match self.get(k) {
            None => -2,
            Some(Val {
                lease: Lease::None, ..
            }) => -1,
            Some(Val {
                lease: Lease::New(i),
                ..
            }) => self.new_leases[*i] as i64,
            Some(Val {
                lease: Lease::Id(id),
                ..
            }) => self.remaining.get(id).copied().unwrap_or(-1),
        }
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Redis's strict integer: optional `-`, digits, no leading zeros or `+`,
/// within i64.
fn parse_i64(b: &[u8]) -> Option<i64> {
    crate::state::parse_integer(b)
}

fn parse_f64(b: &[u8]) -> Option<f64> {
    let s = std::str::from_utf8(b).ok()?;
    if s.is_empty() || s.trim() != s {
        return None;
    }
    let v: f64 = s.parse().ok()?;
    (!v.is_nan()).then_some(v)
}

/// What `INCR`, `DECR`, `INCRBY` or `DECRBY` (`name`, arity checked)
/// adds, or the error reply for its argument.
fn incr_by(name: &str, args: &[Vec<u8>]) -> Result<i64, Reply> {
    match name {
        "INCR" => Ok(1),
        "DECR" => Ok(-1),
        _ => match parse_i64(&args[2]) {
            Some(n) if name == "INCRBY" => Ok(n),
            Some(n) => n
                .checked_neg()
                .ok_or_else(|| Reply::err("decrement would overflow")),
            None => Err(not_integer()),
        },
    }
}

fn not_integer() -> Reply {
    Reply::err("value is not an integer or out of range")
}

fn syntax() -> Reply {
    Reply::err("syntax error")
}

/// Redis's index into a string of `len` bytes (negative from the end).
fn range_of(len: usize, start: i64, end: i64) -> Option<(usize, usize)> {
    let len = len as i64;
    let norm = |i: i64| if i < 0 { (len + i).max(0) } else { i };
    let (s, e) = (norm(start), norm(end).min(len - 1));
    if len == 0 || s > e || s >= len {
        return None;
    }
    Some((s as usize, e as usize + 1))
}

/// Applies one key command to the overlay; its reply.
fn apply(tx: &mut Tx, args: &Args, max_value: usize) -> Reply {
    let name = String::from_utf8_lossy(&args[0]).to_ascii_uppercase();
    let k = args.get(1).map(Vec::as_slice).unwrap_or_default();
    match name.as_str() {
        "PING" => match args.get(1) {
            None => Reply::Simple("PONG".into()),
            Some(m) => Reply::bulk(m.clone()),
        },
        "ECHO" => Reply::bulk(args[1].clone()),
        "GET" => Reply::Bulk(tx.get(k).map(|v| v.value.clone())),
        "STRLEN" => Reply::Int(tx.get(k).map_or(0, |v| v.value.len() as i64)),
        "TYPE" => Reply::Simple(
            if tx.get(k).is_some() {
                "string"
            } else {
                "none"
            }
            .into(),
        ),
        "TTL" => match tx.ttl_ms(k) {
            ms if ms < 0 => Reply::Int(ms),
            ms => Reply::Int((ms + 500) / 1000),
        },
        "PTTL" => Reply::Int(tx.ttl_ms(k)),
        "EXISTS" => Reply::Int(args[1..].iter().filter(|k| tx.get(k).is_some()).count() as i64),
        "MGET" => Reply::array(
            args[1..]
                .iter()
                .map(|k| Reply::Bulk(tx.get(k).map(|v| v.value.clone())))
                .collect(),
        ),
        "GETRANGE" => {
            let (Some(s), Some(e)) = (parse_i64(&args[2]), parse_i64(&args[3])) else {
                return not_integer();
            };
            let v = tx.get(k).map(|v| v.value.as_slice()).unwrap_or_default();
            match range_of(v.len(), s, e) {
                Some((s, e)) => Reply::bulk(v[s..e].to_vec()),
                None => Reply::bulk(Vec::new()),
            }
        }
        "DEL" | "UNLINK" => {
            let mut n = 0;
            for k in &args[1..] {
                if tx.get(k).is_some() {
                    n += 1;
                    tx.set(k, None);
                }
            }
            Reply::Int(n)
        }
        "SET" => set(tx, args),
        "SETNX" => {
            if tx.get(k).is_some() {
                return Reply::Int(0);
            }
            tx.put(k, args[2].clone(), Lease::None);
            Reply::Int(1)
        }
        "GETSET" => {
            let old = tx.get(k).map(|v| v.value.clone());
            tx.put(k, args[2].clone(), Lease::None);
            Reply::Bulk(old)
        }
        "GETDEL" => {
            let old = tx.get(k).map(|v| v.value.clone());
            if old.is_some() {
                tx.set(k, None);
            }
            Reply::Bulk(old)
        }
        "MSET" => {
            for p in args[1..].chunks(2) {
                tx.put(&p[0], p[1].clone(), Lease::None);
            }
            Reply::ok()
        }
        "MSETNX" => {
            if args[1..].chunks(2).any(|p| tx.get(&p[0]).is_some()) {
                return Reply::Int(0);
            }
            for p in args[1..].chunks(2) {
                tx.put(&p[0], p[1].clone(), Lease::None);
            }
            Reply::Int(1)
        }
        "INCR" | "DECR" | "INCRBY" | "DECRBY" => {
            let by = match incr_by(&name, args) {
                Ok(by) => by,
                Err(reply) => return reply,
            };
            let (cur, lease) = match tx.get(k) {
                None => (0, Lease::None),
                Some(v) => match parse_i64(&v.value) {
                    Some(n) => (n, v.lease),
                    None => return not_integer(),
                },
            };
            let Some(new) = cur.checked_add(by) else {
                return Reply::err("increment or decrement would overflow");
            };
            tx.put(k, new.to_string().into_bytes(), lease);
            Reply::Int(new)
        }
        "INCRBYFLOAT" => {
            let Some(by) = parse_f64(&args[2]) else {
                return Reply::err("value is not a valid float");
            };
            let (cur, lease) = match tx.get(k) {
                None => (0.0, Lease::None),
                Some(v) => match parse_f64(&v.value) {
                    Some(n) => (n, v.lease),
                    None => return Reply::err("value is not a valid float"),
                },
            };
            let new = cur + by;
            if !new.is_finite() {
                return Reply::err("increment would produce NaN or Infinity");
            }
            let text = format!("{new}").into_bytes();
            tx.put(k, text.clone(), lease);
            Reply::bulk(text)
        }
        "APPEND" => {
            let (mut v, lease) = match tx.get(k) {
                None => (Vec::new(), Lease::None),
                Some(v) => (v.value.clone(), v.lease),
            };
            if v.len() + args[2].len() > max_value {
                return too_big();
            }
            v.extend_from_slice(&args[2]);
            let n = v.len() as i64;
            tx.put(k, v, lease);
            Reply::Int(n)
        }
        "SETRANGE" => {
            let Some(off) = parse_i64(&args[2]) else {
                return not_integer();
            };
            if off < 0 {
                return Reply::err("offset is out of range");
            }
            let add = &args[3];
            let (mut v, lease) = match tx.get(k) {
                None => (Vec::new(), Lease::None),
                Some(v) => (v.value.clone(), v.lease),
            };
            if add.is_empty() {
                return Reply::Int(v.len() as i64);
            }
            let off = off as usize;
            if off.saturating_add(add.len()) > max_value {
                return too_big();
            }
            if v.len() < off + add.len() {
                v.resize(off + add.len(), 0);
            }
            v[off..off + add.len()].copy_from_slice(add);
            let n = v.len() as i64;
            tx.put(k, v, lease);
            Reply::Int(n)
        }
        "EXPIRE" | "PEXPIRE" | "EXPIREAT" | "PEXPIREAT" => {
            if args.len() > 3 {
                return Reply::err(format!("Unsupported option {}", printable(&args[3], 64)));
            }
            let Some(n) = parse_i64(&args[2]) else {
                return not_integer();
            };
            let ms = match name.as_str() {
                "EXPIRE" => n.checked_mul(1000),
                "PEXPIRE" => Some(n),
                "EXPIREAT" => n.checked_mul(1000).map(|at| at - tx.now_ms as i64),
                _ => Some(n - tx.now_ms as i64),
            };
            let Some(ms) = ms else {
                return Reply::err(format!(
                    "invalid expire time in '{}' command",
                    name.to_lowercase()
                ));
            };
            let Some(v) = tx.get(k).cloned() else {
                return Reply::Int(0);
            };
            match tx.expire_in(ms) {
                Err(e) => e,
                Ok(None) => {
                    tx.set(k, None);
                    Reply::Int(1)
                }
                Ok(Some(lease)) => {
                    tx.put(k, v.value, lease);
                    Reply::Int(1)
                }
            }
        }
        "PERSIST" => match tx.get(k).cloned() {
            Some(v) if v.lease != Lease::None => {
                tx.put(k, v.value, Lease::None);
                Reply::Int(1)
            }
            _ => Reply::Int(0),
        },
        "RENAME" | "RENAMENX" => {
            let to = &args[2];
            let Some(v) = tx.get(k).cloned() else {
                return Reply::err("no such key");
            };
            if name == "RENAMENX" && tx.get(to).is_some() {
                return Reply::Int(0);
            }
            if to.as_slice() != k {
                tx.set(k, None);
                tx.set(to, Some(v));
            }
            if name == "RENAME" {
                Reply::ok()
            } else {
                Reply::Int(1)
            }
        }
        _ => Reply::err(format!("'{}' is not a key command", name.to_lowercase())),
    }
}

fn too_big() -> Reply {
    Reply::err("string exceeds maximum allowed size (proto-max-bulk-len)")
}

/// `SET key value [NX|XX] [GET] [EX s|PX ms|EXAT s|PXAT ms|KEEPTTL]`.
fn set(tx: &mut Tx, args: &Args) -> Reply {
    let k = &args[1];
    let (mut nx, mut xx, mut get, mut keepttl) = (false, false, false, false);
    let mut expire: Option<i64> = None;
    let mut i = 3;
    while i < args.len() {
        let opt = args[i].to_ascii_uppercase();
        match opt.as_slice() {
            b"NX" if !xx => nx = true,
            b"XX" if !nx => xx = true,
            b"GET" => get = true,
            b"KEEPTTL" if expire.is_none() => keepttl = true,
            b"EX" | b"PX" | b"EXAT" | b"PXAT" if expire.is_none() && !keepttl => {
                let Some(v) = args.get(i + 1) else {
                    return syntax();
                };
                let Some(n) = parse_i64(v) else {
                    return not_integer();
                };
                if n <= 0 {
                    return Reply::err("invalid expire time in 'set' command");
                }
                let ms = match opt.as_slice() {
                    b"EX" => n.checked_mul(1000),
                    b"PX" => Some(n),
                    b"EXAT" => n.checked_mul(1000).map(|at| at - tx.now_ms as i64),
                    _ => Some(n - tx.now_ms as i64),
                };
                let Some(ms) = ms else {
                    return Reply::err("invalid expire time in 'set' command");
                };
                expire = Some(ms);
                i += 1;
            }
            _ => return syntax(),
        }
        i += 1;
    }
    let old = tx.get(k).cloned();
    let old_reply = || Reply::Bulk(old.as_ref().map(|v| v.value.clone()));
    if (nx && old.is_some()) || (xx && old.is_none()) {
        return if get { old_reply() } else { Reply::nil() };
    }
    let lease = match expire {
        Some(ms) => match tx.expire_in(ms) {
            Err(e) => return e,
            Ok(l) => l,
        },
        None if keepttl => Some(old.as_ref().map_or(Lease::None, |v| v.lease)),
        None => Some(Lease::None),
    };
    match lease {
        // An absolute time already past: set and gone at once.
        None => tx.set(k, None),
        Some(lease) => tx.put(k, args[2].clone(), lease),
    }
    if get {
        old_reply()
    } else {
        Reply::ok()
    }
}

/// Runs key commands as one transaction (a `MULTI`'s queue, or one
/// command): their replies, or the reply for the whole (the nil array when
/// a watched key changed, or an error).
pub async fn execute(
    c: &mut Conn,
    cmds: Vec<Args>,
    watched: BTreeMap<Vec<u8>, Option<u64>>,
) -> Result<Vec<Reply>, Reply> {
    let mut keys = BTreeSet::new();
    for args in &cmds {
        let name = String::from_utf8_lossy(&args[0]).to_ascii_uppercase();
        keys.extend(keys_of(&name, args)?);
    }
    keys.extend(watched.keys().cloned());
    if keys.len() > MAX_TXN_COMPARES {
        return Err(Reply::err(format!(
            "a transaction here touches at most {MAX_TXN_COMPARES} keys"
        )));
    }
    let wants_ttl = cmds.iter().any(|a| {
        let n = a[0].to_ascii_uppercase();
        n == b"TTL" || n == b"PTTL"
    });
    let max_value = c.h.limits().max_value;
    let keys: Vec<Vec<u8>> = keys.into_iter().collect();
    for attempt in 0..MAX_ATTEMPTS {
        if attempt > 0 {
            // Someone wrote a key in between: back off a random while, so
            // that clients contending on one key do not stay in step.
            let most = 1 + 2 * attempt.min(10) as u64;
            let ms = rand::random::<u64>() % most;
            tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
        }
        let read = match read_all(c, &keys).await {
            Ok(r) => r,
            Err(KvError::Compacted(_)) => continue,
            Err(e) => return Err(kv_error(e)),
        };
        // A watched key changed since WATCH: the transaction does nothing.
        if watched
            .iter()
            .any(|(k, rev)| read.get(k).map(|kv| kv.mod_revision) != *rev)
        {
            return Err(Reply::Array(None));
        }
        let mut tx = Tx {
            now_ms: now_ms(),
            cur: read
                .iter()
                .map(|(k, kv)| (k.clone(), Some(val_of(kv))))
                .collect(),
            dirty: BTreeSet::new(),
            new_leases: Vec::new(),
            remaining: BTreeMap::new(),
        };
        if wants_ttl {
            for kv in read.values().filter(|kv| kv.lease != 0) {
                let left = match lease_end(c, kv.lease).await {
                    Some((ttl, ends)) => (ends as i64 - now_ms() as i64).clamp(0, ttl as i64),
                    None => -1,
                };
                tx.remaining.insert(kv.lease, left);
            }
        }
        let replies: Vec<Reply> = cmds.iter().map(|a| apply(&mut tx, a, max_value)).collect();
        let changed: Vec<&Vec<u8>> = tx
            .dirty
            .iter()
            .filter(|k| read.get(*k).map(val_of).as_ref() != tx.get(k))
            .collect();
        if changed.is_empty() {
            return Ok(replies);
        }
        // The leases the commands asked for; granted before the
        // transaction (one that then fails leaves its leases to expire
        // with nothing attached).
        let mut granted = Vec::with_capacity(tx.new_leases.len());
        for ttl_ms in &tx.new_leases {
            match c
                .write(Op::Lease(LeaseOp::Grant {
                    ttl_ms: *ttl_ms,
                    now_ms: 0,
                }))
                .await
            {
                Ok(OpResult::Lease(l)) => granted.push(l.id),
                Ok(other) => return Err(Reply::err(format!("unexpected result {other:?}"))),
                Err(e) => return Err(kv_error(e)),
            }
        }
        let txn = Txn {
            compares: keys
                .iter()
                .map(|k| match read.get(k) {
                    Some(kv) => Compare {
                        key: k.clone(),
                        op: CmpOp::Equal,
                        target: Target::ModRevision(kv.mod_revision),
                    },
                    None => Compare {
                        key: k.clone(),
                        op: CmpOp::Equal,
                        target: Target::Version(0),
                    },
                })
                .collect(),
            success: changed
                .iter()
                .map(|k| match tx.get(k) {
                    None => TxnOp::Delete { key: k.to_vec() },
                    Some(v) => TxnOp::Put {
                        key: k.to_vec(),
                        value: v.value.clone(),
                        lease: match v.lease {
                            Lease::None => 0,
                            Lease::Id(id) => id,
                            Lease::New(i) => granted[i],
                        },
                    },
                })
                .collect(),
            failure: Vec::new(),
        };
        match c.write(Op::Txn(txn)).await {
            Ok(OpResult::Txn(r)) if r.succeeded => return Ok(replies),
            Ok(OpResult::Txn(_)) => continue,
            // A lease the key had ended between the read and the write.
            Err(KvError::InvalidArgument(m)) if m.contains("lease") => continue,
            Ok(other) => return Err(Reply::err(format!("unexpected result {other:?}"))),
            Err(e) => return Err(kv_error(e)),
        }
    }
    Err(Reply::err(
        "the keys changed under this command too often to apply it; retry",
    ))
}

/// Lease `id`'s TTL and end as this replica knows them. The key was read
/// through the leader; a follower may not have applied the grant yet, so
/// it is asked again for a little while.
async fn lease_end(c: &Conn, id: u64) -> Option<(u64, u64)> {
    for _ in 0..50 {
        if let Some(l) = c.h.lease_here(id).await {
            return Some(l);
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    None
}

/// Reads `keys` at one revision: the first linearizably, the others at its
/// revision (concurrently). Absent keys are left out.
async fn read_all(c: &Conn, keys: &[Vec<u8>]) -> Result<BTreeMap<Vec<u8>, KeyValue>, KvError> {
    let mut out = BTreeMap::new();
    let Some(first) = keys.first() else {
        return Ok(out);
    };
    let (kv, revision) = c.read_key(first, 0).await?;
    if let Some(kv) = kv {
        out.insert(first.clone(), kv);
    }
    let rest = futures::future::join_all(keys[1..].iter().map(|k| c.read_key(k, revision))).await;
    for (k, r) in keys[1..].iter().zip(rest) {
        if let (Some(kv), _) = r? {
            out.insert(k.clone(), kv);
        }
    }
    Ok(out)
}

fn val_of(kv: &KeyValue) -> Val {
    Val {
        value: kv.value.clone(),
        lease: match kv.lease {
            0 => Lease::None,
            id => Lease::Id(id),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tx() -> Tx {
        Tx {
            now_ms: 1_000_000,
            cur: BTreeMap::new(),
            dirty: BTreeSet::new(),
            new_leases: Vec::new(),
            remaining: BTreeMap::new(),
        }
    }

    fn run(tx: &mut Tx, line: &str) -> Reply {
        let args: Args = line.split(' ').map(|s| s.as_bytes().to_vec()).collect();
        apply(tx, &args, 1024)
    }

    #[test]
    fn string_commands_answer_as_redis() {
        let mut t = tx();
        assert_eq!(run(&mut t, "INCR n"), Reply::Int(1));
        assert_eq!(run(&mut t, "INCRBY n 41"), Reply::Int(42));
        assert_eq!(run(&mut t, "DECRBY n 2"), Reply::Int(40));
        assert_eq!(run(&mut t, "SET s abc"), Reply::ok());
        assert_eq!(run(&mut t, "INCR s"), not_integer());
        assert_eq!(run(&mut t, "INCRBY n x"), not_integer());
        assert_eq!(run(&mut t, "INCRBY n 01"), not_integer());
        assert_eq!(run(&mut t, "APPEND s de"), Reply::Int(5));
        assert_eq!(run(&mut t, "GETRANGE s 1 -2"), Reply::bulk("bcd"));
        assert_eq!(run(&mut t, "GETRANGE s 10 20"), Reply::bulk(""));
        assert_eq!(run(&mut t, "SETRANGE s 7 X"), Reply::Int(8));
        assert_eq!(run(&mut t, "GET s"), Reply::bulk(b"abcde\0\0X".to_vec()));
        assert_eq!(run(&mut t, "SET s v NX"), Reply::nil());
        assert_eq!(
            run(&mut t, "SET s v XX GET"),
            Reply::bulk(b"abcde\0\0X".to_vec())
        );
        assert_eq!(
            run(&mut t, "SET s v EX 0"),
            Reply::err("invalid expire time in 'set' command")
        );
        assert_eq!(run(&mut t, "SET s v FOO"), syntax());
        assert_eq!(run(&mut t, "SET s v EX 10"), Reply::ok());
        assert_eq!(run(&mut t, "TTL s"), Reply::Int(10));
        assert_eq!(run(&mut t, "PERSIST s"), Reply::Int(1));
        assert_eq!(run(&mut t, "TTL s"), Reply::Int(-1));
        assert_eq!(run(&mut t, "TTL nope"), Reply::Int(-2));
        assert_eq!(run(&mut t, "INCRBYFLOAT f 10.5"), Reply::bulk("10.5"));
        assert_eq!(run(&mut t, "INCRBYFLOAT f 0.1"), Reply::bulk("10.6"));
        assert_eq!(run(&mut t, "RENAME nope x"), Reply::err("no such key"));
        assert_eq!(run(&mut t, "RENAME s t"), Reply::ok());
        assert_eq!(run(&mut t, "EXISTS s t t"), Reply::Int(2));
        assert_eq!(run(&mut t, "DEL s t"), Reply::Int(1));
        assert_eq!(run(&mut t, "MSETNX a 1 n 2"), Reply::Int(0));
        assert_eq!(run(&mut t, "MSETNX a 1 b 2"), Reply::Int(1));
        assert_eq!(
            run(&mut t, "MGET a zz b"),
            Reply::array(vec![Reply::bulk("1"), Reply::nil(), Reply::bulk("2")])
        );
        assert_eq!(run(&mut t, "SET m 9223372036854775807"), Reply::ok());
        assert_eq!(
            run(&mut t, "INCR m"),
            Reply::err("increment or decrement would overflow")
        );
    }

    #[test]
    fn unknown_commands_name_their_arguments_as_redis_does() {
        let args: Args = vec![b"foo".to_vec(), b"a".to_vec(), b"b\r\n".to_vec()];
        assert_eq!(
            unknown(&args),
            Reply::err("unknown command 'foo', with args beginning with: 'a' 'b??' ")
        );
        assert_eq!(
            keys_of("GET", &vec![b"get".to_vec()]),
            Err(Reply::err("wrong number of arguments for 'get' command"))
        );
        assert_eq!(
            keys_of(
                "MSET",
                &vec![
                    b"mset".to_vec(),
                    b"a".to_vec(),
                    b"1".to_vec(),
                    b"b".to_vec()
                ]
            ),
            Err(Reply::err("wrong number of arguments for 'mset' command"))
        );
    }
}
