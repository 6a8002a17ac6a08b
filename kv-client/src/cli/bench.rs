//! `kv-client bench`: a closed-loop load generator. C tasks each issue the
//! next operation as soon as the previous one completes, for a warm-up and
//! then a measured period; latencies of the measured period go into an HDR
//! histogram, and one JSON line sums it up.

use std::io::{IsTerminal, Write};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Args, ValueEnum};
use hdrhistogram::Histogram;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;

use super::output::Reply;
use super::{Failure, Settings, EXIT_OK, EXIT_UNAVAILABLE};
use crate::Client;

pub(crate) const EXAMPLES: &str = "\
Examples:
  kv-client bench
  kv-client bench --clients 64 --secs 10 --op put --value-size 128 --keys 10000
  kv-client --replicas replica bench --op mixed --preload

Runs a 2-second warm-up (not counted), then --secs seconds measured. While
it runs, a progress line on stderr shows the rate so far. At the end it
prints one JSON line on stdout:
  {\"system\":\"kvpaxos\",\"op\":\"put\",\"clients\":16,\"secs\":10,\"ops\":N,\"ops_per_s\":F,\"p50_ms\":F,\"p99_ms\":F,\"p999_ms\":F,\"errors\":E}
ops and the percentiles count operations that completed successfully in the
measured period; errors counts those that failed in it (not fatal). Keys are
key-000000 .. key-(K-1), chosen uniformly at random; mixed is 90% linearizable
gets and 10% puts. Exit status 0 if any operation succeeded, 3 if none did,
2 for bad arguments.";

/// The operations `bench` can issue.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum BenchOp {
    /// Puts only.
    Put,
    /// Linearizable gets only.
    Get,
    /// 90% linearizable gets, 10% puts.
    Mixed,
    /// Local gets only (`get --local`): one round trip to one replica, no
    /// consensus; the floor under every other operation's latency.
    Local,
    /// Linearizable ranges of 1,000 keys from a random key on (use
    /// --preload, and --keys well above 1,000).
    Range,
}

impl BenchOp {
    fn name(self) -> &'static str {
        match self {
            BenchOp::Put => "put",
            BenchOp::Get => "get",
            BenchOp::Mixed => "mixed",
            BenchOp::Local => "local",
            BenchOp::Range => "range",
        }
    }
}

/// The arguments of `kv-client bench`.
#[derive(Args, Debug, Clone, PartialEq)]
pub struct BenchArgs {
    /// Concurrent clients, each with at most one operation in flight.
    #[arg(long, value_name = "C", default_value_t = 16, value_parser = clap::value_parser!(u64).range(1..=4096))]
    pub clients: u64,
    /// Seconds measured, after the warm-up.
    #[arg(long, value_name = "D", default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=86_400))]
    pub secs: u64,
    /// What to issue: put, get, or mixed (90% get, 10% put).
    #[arg(long, value_enum, default_value_t = BenchOp::Put)]
    pub op: BenchOp,
    /// Bytes in each value put.
    #[arg(long, value_name = "B", default_value_t = 128, value_parser = clap::value_parser!(u64).range(0..=1024 * 1024))]
    pub value_size: u64,
    /// Number of distinct keys.
    #[arg(long, value_name = "K", default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..=1_000_000_000))]
    pub keys: u64,
    /// Put every key once before the warm-up, so that gets find values.
    #[arg(long)]
    pub preload: bool,
    /// Seconds of warm-up, not counted (fractions allowed).
    #[arg(long, value_name = "SECS", default_value_t = 2.0, hide = true, value_parser = parse_warmup)]
    pub warmup_secs: f64,
    /// One `Client` (own connections and client id) per task instead of one
    /// shared by all (for measuring which is faster).
    #[arg(long, hide = true)]
    pub client_per_task: bool,
}

fn parse_warmup(s: &str) -> Result<f64, String> {
    let w: f64 = s
        .trim()
        .parse()
        .map_err(|_| format!("{s:?} is not a number of seconds"))?;
    if !(0.0..=3600.0).contains(&w) {
        return Err(format!("the warm-up must be 0 to 3600 seconds, got {s}"));
    }
    Ok(w)
}

/// The final line.
#[derive(Serialize, Debug)]
struct Summary {
    system: &'static str,
    op: &'static str,
    clients: u64,
    secs: u64,
    ops: u64,
    ops_per_s: f64,
    p50_ms: f64,
    p99_ms: f64,
    p999_ms: f64,
    errors: u64,
}

/// The name of key number `i`.
fn key(i: u64) -> String {
    format!("key-{i:06}")
}

/// What one task measured.
struct TaskResult {
    hist: Histogram<u64>,
    ops: u64,
    errors: u64,
}

/// Latencies are recorded in microseconds, from 1 µs to 10 minutes, with 3
/// significant digits.
fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 600_000_000, 3).expect("valid histogram bounds")
}

/// Counters the progress line reads while the tasks run.
#[derive(Default)]
struct Progress {
    /// Successful operations so far, warm-up included.
    done: AtomicU64,
    /// Failed operations so far, warm-up included.
    failed: AtomicU64,
    /// Set when the progress line should stop.
    stop: AtomicBool,
}

/// Runs `bench` and prints its summary; returns the exit status.
pub(crate) async fn run(settings: Settings, args: BenchArgs) -> u8 {
    let (builder, _) = match settings.builder() {
        Ok(b) => b,
        Err(f) => return Reply::failed(f).emit(settings.format),
    };
    let n = if args.client_per_task {
        args.clients
    } else {
        1
    };
    let mut clients = Vec::new();
    for _ in 0..n {
        match builder.clone().build() {
            Ok(c) => clients.push(c),
            Err(e) => return Reply::failed(Failure::from_error(e, false)).emit(settings.format),
        }
    }
    let value: Arc<Vec<u8>> = {
        let mut rng = rand::rng();
        Arc::new(
            (0..args.value_size)
                .map(|_| rng.random_range(b'a'..=b'z'))
                .collect(),
        )
    };
    if args.preload {
        preload(&clients, &args, &value).await;
    }

    let progress = Arc::new(Progress::default());
    let start = Instant::now();
    let warm_end = start + Duration::from_secs_f64(args.warmup_secs);
    let end = warm_end + Duration::from_secs(args.secs);
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..args.clients {
        let client = clients[(i % n) as usize].clone();
        let (value, progress) = (value.clone(), progress.clone());
        let (op, keys) = (args.op, args.keys);
        tasks.spawn(
            async move { closed_loop(client, op, keys, value, warm_end, end, progress).await },
        );
    }
    let reporter = tokio::spawn(report_progress(
        progress.clone(),
        start,
        warm_end,
        end,
        args.clients,
    ));

    // Every task stops issuing at `end`; its last operation ends within one
    // operation budget. Past that (and a little slack) it is abandoned.
    let mut hist = new_histogram();
    let (mut ops, mut errors) = (0, 0);
    let grace = end + settings.timeout + Duration::from_secs(1);
    loop {
        match tokio::time::timeout_at(grace.into(), tasks.join_next()).await {
            Ok(Some(Ok(r))) => {
                let _ = hist.add(&r.hist);
                ops += r.ops;
                errors += r.errors;
            }
            Ok(Some(Err(_))) => errors += 1,
            Ok(None) => break,
            Err(_) => {
                tasks.abort_all();
                break;
            }
        }
    }
    progress.stop.store(true, Ordering::Relaxed);
    let _ = reporter.await;

    let ms = |q: f64| {
        if hist.is_empty() {
            0.0
        } else {
            round(hist.value_at_quantile(q) as f64 / 1000.0, 3)
        }
    };
    let summary = Summary {
        system: "kvpaxos",
        op: args.op.name(),
        clients: args.clients,
        secs: args.secs,
        ops,
        ops_per_s: round(ops as f64 / args.secs as f64, 1),
        p50_ms: ms(0.5),
        p99_ms: ms(0.99),
        p999_ms: ms(0.999),
        errors,
    };
    let mut reply = Reply::default();
    reply.json_line(&summary);
    reply.code = if ops > 0 { EXIT_OK } else { EXIT_UNAVAILABLE };
    reply.emit(settings.format)
}

fn round(v: f64, digits: i32) -> f64 {
    let f = 10f64.powi(digits);
    (v * f).round() / f
}

/// One closed-loop client: the next operation as soon as the previous one
/// completes, until `end`.
async fn closed_loop(
    client: Client,
    op: BenchOp,
    keys: u64,
    value: Arc<Vec<u8>>,
    warm_end: Instant,
    end: Instant,
    progress: Arc<Progress>,
) -> TaskResult {
    // StdRng, not the thread-local one: the task may move between threads.
    let mut rng = StdRng::from_rng(&mut rand::rng());
    let mut r = TaskResult {
        hist: new_histogram(),
        ops: 0,
        errors: 0,
    };
    loop {
        let started = Instant::now();
        if started >= end {
            return r;
        }
        let k = key(rng.random_range(0..keys));
        let put = match op {
            BenchOp::Put => true,
            BenchOp::Get | BenchOp::Local | BenchOp::Range => false,
            BenchOp::Mixed => rng.random_bool(0.1),
        };
        let ok = if put {
            client.put(k, value.as_slice()).await.is_ok()
        } else if op == BenchOp::Local {
            client.get_local(k).await.is_ok()
        } else if op == BenchOp::Range {
            let req = kv_api::RangeRequest {
                limit: 1_000,
                ..kv_api::RangeRequest::between(k, "")
            };
            client.range(req).await.is_ok()
        } else {
            client.get(k).await.is_ok()
        };
        let done = Instant::now();
        if ok {
            progress.done.fetch_add(1, Ordering::Relaxed);
        } else {
            progress.failed.fetch_add(1, Ordering::Relaxed);
        }
        // Counted: what completed within the measured period.
        if done >= warm_end && done < end {
            if ok {
                r.ops += 1;
                let micros = (done - started).as_micros().max(1);
                let _ = r.hist.record(u64::try_from(micros).unwrap_or(u64::MAX));
            } else {
                r.errors += 1;
            }
        }
    }
}

/// Puts every key once, `clients` at a time.
async fn preload(clients: &[Client], args: &BenchArgs, value: &Arc<Vec<u8>>) {
    let next = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..args.clients.min(args.keys) {
        let client = clients[(i as usize) % clients.len()].clone();
        let (next, failed, value, keys) = (next.clone(), failed.clone(), value.clone(), args.keys);
        tasks.spawn(async move {
            loop {
                let k = next.fetch_add(1, Ordering::Relaxed);
                if k >= keys {
                    return;
                }
                if client.put(key(k), value.as_slice()).await.is_err() {
                    failed.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
    }
    while tasks.join_next().await.is_some() {}
    let failed = failed.load(Ordering::Relaxed);
    let mut err = std::io::stderr().lock();
    let _ = writeln!(
        err,
        "bench: preloaded {} keys ({failed} failed)",
        args.keys - failed
    );
}

/// Shows progress on stderr about once a second: one line rewritten in
/// place on a terminal, one line a second otherwise.
async fn report_progress(
    p: Arc<Progress>,
    start: Instant,
    warm_end: Instant,
    end: Instant,
    clients: u64,
) {
    let tty = std::io::stderr().is_terminal();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    let (mut last_done, mut last_at) = (0u64, Instant::now());
    let mut at_warm_end: Option<(u64, Instant)> = None;
    let mut wrote = false;
    loop {
        tick.tick().await;
        if p.stop.load(Ordering::Relaxed) {
            break;
        }
        let now = Instant::now();
        let done = p.done.load(Ordering::Relaxed);
        let failed = p.failed.load(Ordering::Relaxed);
        let rate = (done - last_done) as f64 / (now - last_at).as_secs_f64().max(1e-3);
        (last_done, last_at) = (done, now);
        let phase = if now < warm_end {
            "warm-up".to_string()
        } else if now < end {
            // The first tick after the warm-up sets the base; the rate so
            // far is shown from the next one on.
            let (base_done, base_at) = *at_warm_end.get_or_insert((done, now));
            let measured = (now - base_at).as_secs_f64();
            if measured < 0.5 {
                "measuring".to_string()
            } else {
                format!(
                    "measuring, {:.0} ops/s so far",
                    (done - base_done) as f64 / measured
                )
            }
        } else {
            "finishing".to_string()
        };
        let line = format!(
            "bench: {:>4.0} s  {clients} clients  {phase}  ({rate:.0} ops/s now, {failed} errors)",
            (now - start).as_secs_f64()
        );
        let mut err = std::io::stderr().lock();
        if tty {
            let _ = write!(err, "\r\x1b[2K{line}");
        } else {
            let _ = writeln!(err, "{line}");
        }
        let _ = err.flush();
        wrote = true;
    }
    if tty && wrote {
        let _ = writeln!(std::io::stderr());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_zero_padded() {
        assert_eq!(key(123), "key-000123");
        assert_eq!(key(1_234_567), "key-1234567");
    }

    #[test]
    fn the_summary_has_the_documented_field_order() {
        let s = Summary {
            system: "kvpaxos",
            op: "put",
            clients: 16,
            secs: 10,
            ops: 5,
            ops_per_s: 0.5,
            p50_ms: 1.5,
            p99_ms: 2.0,
            p999_ms: 3.25,
            errors: 0,
        };
        assert_eq!(
            serde_json::to_string(&s).unwrap(),
            r#"{"system":"kvpaxos","op":"put","clients":16,"secs":10,"ops":5,"ops_per_s":0.5,"p50_ms":1.5,"p99_ms":2.0,"p999_ms":3.25,"errors":0}"#
        );
    }
}
