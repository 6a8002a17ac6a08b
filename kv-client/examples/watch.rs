//! A configuration watcher: prints a key's value whenever it changes.
//!
//! A small application on the lean SDK — it needs `kv-client` with
//! `default-features = false` and tokio, nothing else (no argument parser:
//! the replicas come from the environment, as for a service).
//!
//! ```text
//! KV_REPLICAS=replica cargo run --release -p kv-client --example watch -- feature-flags
//! KV_REPLICAS=127.0.0.1:7001,127.0.0.1:7002 target/release/examples/watch KEY --every-ms 200 --changes 3
//! ```
//!
//! `KV_TLS_CA`, `KV_TLS_CERT` and `KV_TLS_KEY` make it speak TLS (a `read`
//! certificate is enough). It reads KEY linearizably every `--every-ms`
//! milliseconds (default 1000) and prints its value, as text with other
//! bytes escaped as `\xNN`, or `(absent)`, each time it differs from the last
//! one printed — the first read always prints. A failed read is reported on
//! stderr and the watch goes on (a leader change, a replica restarting).
//! With `--changes N` it exits 0 after printing N lines; exit status 2 for
//! bad usage or configuration.

use std::process::ExitCode;
use std::time::Duration;

use kv_client::{escape_bytes, Client, ClientBuilder};

const USAGE: &str = "usage: KV_REPLICAS=FILE|HOST:PORT,... watch KEY [--every-ms MS] [--changes N]";

struct Args {
    key: String,
    every: Duration,
    changes: Option<u64>,
}

fn parse_args() -> Result<Args, String> {
    let mut key = None;
    let mut every = Duration::from_secs(1);
    let mut changes = None;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut number = |name: &str| -> Result<u64, String> {
            let v = args.next().ok_or(format!("{name} needs a value"))?;
            v.parse()
                .map_err(|_| format!("{name}: {v:?} is not a number"))
        };
        match arg.as_str() {
            "--every-ms" => every = Duration::from_millis(number("--every-ms")?.max(1)),
            "--changes" => changes = Some(number("--changes")?),
            "-h" | "--help" => return Err(String::new()),
            _ if key.is_none() && !arg.starts_with("--") => key = Some(arg),
            _ => return Err(format!("unexpected argument {arg:?}")),
        }
    }
    let key = key.ok_or("which KEY to watch?")?;
    Ok(Args {
        key,
        every,
        changes,
    })
}

fn show(v: &Option<Vec<u8>>) -> String {
    match v {
        Some(v) => escape_bytes(v),
        None => "(absent)".to_string(),
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            if !e.is_empty() {
                eprintln!("watch: {e}");
            }
            eprintln!("{USAGE}");
            return ExitCode::from(2);
        }
    };
    // From KV_REPLICAS (and KV_TLS_*), with a budget per read shorter than
    // the default so that a stuck read does not delay the next one much.
    let client: Client =
        match ClientBuilder::from_env().and_then(|b| b.timeout(Duration::from_secs(2)).build()) {
            Ok(c) => c,
            Err(e) => {
                eprintln!("watch: {e}");
                return ExitCode::from(2);
            }
        };
    let mut last: Option<Option<Vec<u8>>> = None;
    let mut printed = 0;
    let mut tick = tokio::time::interval(args.every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        if args.changes.is_some_and(|n| printed >= n) {
            return ExitCode::SUCCESS;
        }
        tick.tick().await;
        match client.get(args.key.as_str()).await {
            Ok(v) if last.as_ref() != Some(&v) => {
                println!("{}", show(&v));
                last = Some(v);
                printed += 1;
            }
            Ok(_) => {}
            Err(e) => eprintln!("watch: {}: {e}", args.key),
        }
    }
}
