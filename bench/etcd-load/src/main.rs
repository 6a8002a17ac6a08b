//! etcd-load: `kv-client bench` for etcd, so that bench/vs-etcd.sh can run
//! the same workloads against both systems.
//!
//! The same semantics as `kv-client bench` (kv-client/src/cli/bench.rs):
//! C closed-loop tasks, each issuing its next operation as soon as the
//! previous one completes; a warm-up (2 s) that is not counted, then --secs
//! measured; keys key-000000 .. key-(K-1) chosen uniformly at random; one
//! random value of --value-size bytes (a-z) for every put; ops put, get
//! (linearizable: an etcd Range of one key with `serializable` false, which
//! goes through the leader's read index) and mixed (90% get, 10% put);
//! --preload puts every key once first; latencies in an HDR histogram from
//! 1 µs, 3 significant digits; one JSON line at the end with the same
//! fields as `kv-client bench` (`"system":"etcd"`).
//!
//! All tasks share --conns HTTP/2 connections (default 1, like the one
//! connection a `kv-client bench` shares), to --endpoint, which should be
//! the leader (the script finds it). gRPC is spoken by hand: a request is
//! a POST to /etcdserverpb.KV/Put or /Range with a length-prefixed protobuf
//! body; only the fields used are encoded, and a reply counts as a success
//! when its grpc-status is 0.
//!
//!   etcd-load --endpoint 127.0.0.1:2379 --op put --clients 16 --secs 10

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{BufMut, Bytes, BytesMut};
use h2::client::SendRequest;
use hdrhistogram::Histogram;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const USAGE: &str = "usage: etcd-load --endpoint HOST:PORT [--op put|get|mixed] [--clients C] \
[--secs D] [--value-size B] [--keys K] [--preload] [--conns N] [--warmup-secs W] [--timeout-secs T]";

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Op {
    Put,
    Get,
    Mixed,
}

impl Op {
    fn name(self) -> &'static str {
        match self {
            Op::Put => "put",
            Op::Get => "get",
            Op::Mixed => "mixed",
        }
    }
}

#[derive(Debug)]
struct Args {
    endpoint: String,
    op: Op,
    clients: u64,
    secs: u64,
    value_size: usize,
    keys: u64,
    preload: bool,
    conns: usize,
    warmup_secs: f64,
    timeout: Duration,
}

fn num<T: std::str::FromStr>(flag: &str, v: &str) -> Result<T, String> {
    v.parse()
        .map_err(|_| format!("bad value for {flag}: {v:?}"))
}

fn parse_args() -> Result<Args, String> {
    let mut a = Args {
        endpoint: String::new(),
        op: Op::Put,
        clients: 16,
        secs: 10,
        value_size: 128,
        keys: 10_000,
        preload: false,
        conns: 1,
        warmup_secs: 2.0,
        timeout: Duration::from_secs(5),
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        if flag == "--preload" {
            a.preload = true;
            continue;
        }
        if flag == "-h" || flag == "--help" {
            return Err(USAGE.to_string());
        }
        let v = it.next().ok_or_else(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--endpoint" => a.endpoint = v.clone(),
            "--op" => {
                a.op = match v.as_str() {
                    "put" => Op::Put,
                    "get" => Op::Get,
                    "mixed" => Op::Mixed,
                    _ => return Err(format!("unknown --op {v:?}")),
                }
            }
            "--clients" => a.clients = num(&flag, &v)?,
            "--secs" => a.secs = num(&flag, &v)?,
            "--value-size" => a.value_size = num(&flag, &v)?,
            "--keys" => a.keys = num(&flag, &v)?,
            "--conns" => a.conns = num(&flag, &v)?,
            "--warmup-secs" => a.warmup_secs = num(&flag, &v)?,
            "--timeout-secs" => a.timeout = Duration::from_secs_f64(num(&flag, &v)?),
            _ => return Err(format!("unknown flag {flag}\n{USAGE}")),
        }
    }
    if a.endpoint.is_empty() {
        return Err(format!("--endpoint is required\n{USAGE}"));
    }
    if a.clients == 0 || a.secs == 0 || a.keys == 0 || a.conns == 0 {
        return Err("--clients, --secs, --keys and --conns must be at least 1".to_string());
    }
    Ok(a)
}

// ---- protobuf and gRPC framing ---------------------------------------------

fn put_varint(buf: &mut BytesMut, mut v: u64) {
    while v >= 0x80 {
        buf.put_u8((v as u8) | 0x80);
        v >>= 7;
    }
    buf.put_u8(v as u8);
}

/// A length-delimited protobuf field (wire type 2).
fn put_bytes_field(buf: &mut BytesMut, field: u32, data: &[u8]) {
    put_varint(buf, u64::from(field << 3 | 2));
    put_varint(buf, data.len() as u64);
    buf.put_slice(data);
}

/// A gRPC message: compressed flag 0, 4-byte big-endian length, protobuf.
fn grpc_frame(msg: BytesMut) -> Bytes {
    let mut out = BytesMut::with_capacity(5 + msg.len());
    out.put_u8(0);
    out.put_u32(msg.len() as u32);
    out.put_slice(&msg);
    out.freeze()
}

/// etcdserverpb.PutRequest { key = 1, value = 2 }.
fn put_request(key: &[u8], value: &[u8]) -> Bytes {
    let mut m = BytesMut::with_capacity(key.len() + value.len() + 16);
    put_bytes_field(&mut m, 1, key);
    put_bytes_field(&mut m, 2, value);
    grpc_frame(m)
}

/// etcdserverpb.RangeRequest { key = 1 } (serializable = 7 left false:
/// linearizable).
fn range_request(key: &[u8]) -> Bytes {
    let mut m = BytesMut::with_capacity(key.len() + 8);
    put_bytes_field(&mut m, 1, key);
    grpc_frame(m)
}

fn key(i: u64) -> String {
    format!("key-{i:06}")
}

/// One unary gRPC call; Ok when grpc-status is 0.
async fn call(
    mut conn: SendRequest<Bytes>,
    authority: &str,
    path: &str,
    body: Bytes,
) -> Result<(), String> {
    let req = http::Request::builder()
        .method("POST")
        .uri(format!("http://{authority}{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())
        .map_err(|e| e.to_string())?;
    conn = conn.ready().await.map_err(|e| e.to_string())?;
    let (resp, mut stream) = conn.send_request(req, false).map_err(|e| e.to_string())?;
    stream.send_data(body, true).map_err(|e| e.to_string())?;
    let resp = resp.await.map_err(|e| e.to_string())?;
    if resp.status() != http::StatusCode::OK {
        return Err(format!("HTTP status {}", resp.status()));
    }
    // A trailers-only reply carries grpc-status in the headers.
    if let Some(s) = resp.headers().get("grpc-status") {
        return if s == "0" {
            Ok(())
        } else {
            Err(format!("grpc-status {s:?}"))
        };
    }
    let mut body = resp.into_body();
    while let Some(chunk) = body.data().await {
        let chunk = chunk.map_err(|e| e.to_string())?;
        let _ = body.flow_control().release_capacity(chunk.len());
    }
    let trailers = body.trailers().await.map_err(|e| e.to_string())?;
    match trailers.as_ref().and_then(|t| t.get("grpc-status")) {
        Some(s) if s == "0" => Ok(()),
        Some(s) => Err(format!("grpc-status {s:?}")),
        None => Err("no grpc-status".to_string()),
    }
}

async fn connect(endpoint: &str) -> Result<SendRequest<Bytes>, String> {
    let tcp = tokio::net::TcpStream::connect(endpoint)
        .await
        .map_err(|e| format!("connecting to {endpoint}: {e}"))?;
    let _ = tcp.set_nodelay(true);
    let (send, conn) = h2::client::Builder::new()
        .initial_window_size(4 << 20)
        .initial_connection_window_size(16 << 20)
        .handshake::<_, Bytes>(tcp)
        .await
        .map_err(|e| format!("HTTP/2 handshake with {endpoint}: {e}"))?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            eprintln!("etcd-load: connection closed: {e}");
        }
    });
    Ok(send)
}

#[derive(Clone)]
struct Ctx {
    conns: Arc<Vec<SendRequest<Bytes>>>,
    authority: Arc<str>,
    value: Bytes,
    timeout: Duration,
}

impl Ctx {
    async fn op(&self, n: usize, put: bool, k: &str) -> bool {
        let conn = self.conns[n % self.conns.len()].clone();
        let (path, body) = if put {
            (
                "/etcdserverpb.KV/Put",
                put_request(k.as_bytes(), &self.value),
            )
        } else {
            ("/etcdserverpb.KV/Range", range_request(k.as_bytes()))
        };
        match tokio::time::timeout(self.timeout, call(conn, &self.authority, path, body)).await {
            Ok(Ok(())) => true,
            Ok(Err(e)) => {
                log_error(&e);
                false
            }
            Err(_) => {
                log_error("timed out");
                false
            }
        }
    }
}

/// Prints the first few errors only.
fn log_error(e: &str) {
    static SHOWN: AtomicU64 = AtomicU64::new(0);
    if SHOWN.fetch_add(1, Ordering::Relaxed) < 5 {
        eprintln!("etcd-load: {e}");
    }
}

fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 600_000_000, 3).expect("valid histogram bounds")
}

struct TaskResult {
    hist: Histogram<u64>,
    ops: u64,
    errors: u64,
}

async fn closed_loop(
    ctx: Ctx,
    n: usize,
    op: Op,
    keys: u64,
    warm_end: Instant,
    end: Instant,
) -> TaskResult {
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
            Op::Put => true,
            Op::Get => false,
            Op::Mixed => rng.random_bool(0.1),
        };
        let ok = ctx.op(n, put, &k).await;
        let done = Instant::now();
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

async fn preload(ctx: &Ctx, clients: u64, keys: u64) {
    let next = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..clients.min(keys) {
        let (ctx, next, failed) = (ctx.clone(), next.clone(), failed.clone());
        tasks.spawn(async move {
            loop {
                let k = next.fetch_add(1, Ordering::Relaxed);
                if k >= keys {
                    return;
                }
                if !ctx.op(i as usize, true, &key(k)).await {
                    failed.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
    }
    while tasks.join_next().await.is_some() {}
    let failed = failed.load(Ordering::Relaxed);
    eprintln!(
        "etcd-load: preloaded {} keys ({failed} failed)",
        keys - failed
    );
}

fn round(v: f64, digits: i32) -> f64 {
    let f = 10f64.powi(digits);
    (v * f).round() / f
}

async fn run(args: Args) -> Result<u64, String> {
    let mut conns = Vec::new();
    for _ in 0..args.conns {
        conns.push(connect(&args.endpoint).await?);
    }
    let mut rng = rand::rng();
    let value: Vec<u8> = (0..args.value_size)
        .map(|_| rng.random_range(b'a'..=b'z'))
        .collect();
    let ctx = Ctx {
        conns: Arc::new(conns),
        authority: args.endpoint.as_str().into(),
        value: Bytes::from(value),
        timeout: args.timeout,
    };
    if args.preload {
        preload(&ctx, args.clients, args.keys).await;
    }
    let start = Instant::now();
    let warm_end = start + Duration::from_secs_f64(args.warmup_secs);
    let end = warm_end + Duration::from_secs(args.secs);
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..args.clients {
        let ctx = ctx.clone();
        let (op, keys) = (args.op, args.keys);
        tasks.spawn(async move { closed_loop(ctx, i as usize, op, keys, warm_end, end).await });
    }
    let mut hist = new_histogram();
    let (mut ops, mut errors) = (0u64, 0u64);
    let grace = end + args.timeout + Duration::from_secs(1);
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
    let ms = |q: f64| {
        if hist.is_empty() {
            0.0
        } else {
            round(hist.value_at_quantile(q) as f64 / 1000.0, 3)
        }
    };
    // The field order of `kv-client bench`'s line.
    println!(
        "{{\"system\":\"etcd\",\"op\":\"{}\",\"clients\":{},\"secs\":{},\"ops\":{},\"ops_per_s\":{},\"p50_ms\":{},\"p99_ms\":{},\"p999_ms\":{},\"errors\":{}}}",
        args.op.name(),
        args.clients,
        args.secs,
        ops,
        round(ops as f64 / args.secs as f64, 1),
        ms(0.5),
        ms(0.99),
        ms(0.999),
        errors
    );
    Ok(ops)
}

fn main() {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("etcd-load: {e}");
            std::process::exit(2);
        }
    };
    // One thread, like `kv-client bench` (see kv-client/src/main.rs).
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime");
    match rt.block_on(run(args)) {
        Ok(ops) if ops > 0 => std::process::exit(0),
        Ok(_) => std::process::exit(3),
        Err(e) => {
            eprintln!("etcd-load: {e}");
            std::process::exit(3);
        }
    }
}
