//! A counter shared by many tasks, kept correct with compare-and-swap.
//!
//! Each task increments one key `--increments` times: read the value, then
//! `cas(expected → expected + 1)`; if another task got there first the CAS
//! fails and the task reads again and retries. At the end the counter must
//! have grown by exactly tasks × increments, or the program exits 1.
//!
//! ```text
//! cargo run --release -p kv-client --example counter -- --replicas replica --tasks 8 --increments 50
//! ```
//!
//! Every task shares one `Client`: the SDK gives each write its own sequence
//! number, so a CAS retried after a lost reply is applied at most once.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::Parser;
use kv_client::Client;

/// Increment one counter from many tasks through compare-and-swap.
#[derive(Parser, Debug)]
struct Args {
    /// The replica file.
    #[arg(long, value_name = "FILE", default_value = "replica")]
    replicas: PathBuf,
    /// Concurrent tasks.
    #[arg(long, default_value_t = 8)]
    tasks: u64,
    /// Increments each task makes.
    #[arg(long, default_value_t = 25)]
    increments: u64,
    /// The counter's key (default: a fresh one for this run).
    #[arg(long)]
    key: Option<String>,
    /// Budget of each operation, in seconds.
    #[arg(long, default_value_t = 5)]
    timeout: u64,
}

/// The counter's value: absent is 0.
fn parse(v: Option<&[u8]>) -> Result<u64, String> {
    match v {
        None => Ok(0),
        Some(b) => std::str::from_utf8(b)
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| format!("the counter holds {b:?}, not a number")),
    }
}

/// Adds one to the counter; returns how many CAS attempts lost a race.
async fn increment(client: &Client, key: &str) -> Result<u64, String> {
    let mut conflicts = 0;
    let mut current = client.get(key).await.map_err(|e| e.to_string())?;
    loop {
        let n = parse(current.as_deref())?;
        let next = (n + 1).to_string();
        let o = client
            .cas(key, current.clone(), next)
            .await
            .map_err(|e| e.to_string())?;
        if o.swapped {
            return Ok(conflicts);
        }
        // Someone else incremented first: retry from the value they left.
        conflicts += 1;
        current = o.current;
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    let replicas = match kv_api::replicas::Replicas::load(&args.replicas) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("counter: {e}");
            return ExitCode::from(2);
        }
    };
    let client = match Client::builder()
        .replicas(replicas)
        .timeout(Duration::from_secs(args.timeout))
        .build()
    {
        Ok(c) => c,
        Err(e) => {
            eprintln!("counter: {e}");
            return ExitCode::from(2);
        }
    };
    let key = args
        .key
        .clone()
        .unwrap_or_else(|| format!("counter-{:016x}", rand::random::<u64>()));
    let start = match client.get(key.as_str()).await {
        Ok(v) => match parse(v.as_deref()) {
            Ok(n) => n,
            Err(e) => {
                eprintln!("counter: {e}");
                return ExitCode::from(1);
            }
        },
        Err(e) => {
            eprintln!("counter: cannot read {key}: {e}");
            return ExitCode::from(3);
        }
    };

    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..args.tasks {
        let (client, key, n) = (client.clone(), key.clone(), args.increments);
        tasks.spawn(async move {
            let mut conflicts = 0;
            for _ in 0..n {
                conflicts += increment(&client, &key).await?;
            }
            Ok::<u64, String>(conflicts)
        });
    }
    let mut conflicts = 0;
    let mut failed = false;
    while let Some(r) = tasks.join_next().await {
        match r {
            Ok(Ok(c)) => conflicts += c,
            Ok(Err(e)) => {
                eprintln!("counter: a task gave up: {e}");
                failed = true;
            }
            Err(e) => {
                eprintln!("counter: a task panicked: {e}");
                failed = true;
            }
        }
    }

    let final_value = match client.get(key.as_str()).await.map_err(|e| e.to_string()) {
        Ok(v) => parse(v.as_deref()),
        Err(e) => Err(e),
    };
    let expected = start + args.tasks * args.increments;
    match final_value {
        Ok(v) => {
            println!(
                "{key} = {v} (expected {expected}: {} tasks x {} increments from {start}; \
                 {conflicts} CAS conflicts retried; {:.2} s)",
                args.tasks,
                args.increments,
                started.elapsed().as_secs_f64()
            );
            if v == expected && !failed {
                ExitCode::SUCCESS
            } else {
                eprintln!("counter: the final value is wrong");
                ExitCode::from(1)
            }
        }
        Err(e) => {
            eprintln!("counter: cannot read the final value: {e}");
            ExitCode::from(3)
        }
    }
}
