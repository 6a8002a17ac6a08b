//! `kv-client`: the command-line front end of the kvpaxos SDK. All the logic
//! lives in the library's hidden `kv_client::cli` module (feature `cli`);
//! this only parses, runs and exits.

use std::io::Write;

use clap::Parser;
use kv_client::cli::Cli;

fn main() {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            // Usage errors exit 2 with clap's message on stderr; with
            // `--output json` the error is on stdout as JSON too.
            if e.use_stderr() && kv_client::cli::wants_json(std::env::args_os()) {
                println!("{}", kv_client::cli::usage_error_json(&e));
            }
            e.exit()
        }
    };
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("kv_client=warn")),
        )
        .init();
    // One thread for every command, `bench` included: its tasks spend their
    // time waiting on the network, and on a small machine shared with the
    // replicas a multi-threaded runtime measured slower (16 clients get:
    // 3435/3759 vs 6407/5202 ops/s; 64 clients put: 2346/2802 vs
    // 3543/2944), its cross-thread wake-ups costing more than they gain.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build();
    let runtime = match runtime {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("kv-client: cannot start the async runtime: {e}");
            std::process::exit(kv_client::cli::EXIT_UNAVAILABLE.into());
        }
    };
    let code = runtime.block_on(kv_client::cli::run(cli));
    let _ = std::io::stdout().flush();
    // Exit without dropping the runtime: a name lookup still running on a
    // blocking thread must not hold the process past its budget.
    std::process::exit(code.into());
}
