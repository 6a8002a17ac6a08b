//! `kv-client`: the command-line front end of the kvpaxos SDK. All the logic
//! lives in [`kv_client::cli`]; this only parses, runs and exits.

use std::io::Write;

use clap::Parser;

fn main() {
    // Usage errors exit 2 here, with clap's message.
    let cli = kv_client::cli::Cli::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("kv_client=warn")),
        )
        .init();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
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
