//! An application that depends on `kv-client` with `default-features =
//! false` gets the SDK without the command line: clap, rustyline,
//! hdrhistogram and serde_json are not in its dependency tree, and neither
//! is the part of tracing-subscriber only the binary turns on (`env-filter`,
//! `fmt`: regex-automata, nu-ansi-term). tracing-subscriber itself stays:
//! tarpc depends on it (through tracing-opentelemetry, for its registry
//! only), so the check there is that kv-client does not depend on it
//! directly.
//!
//! Writes a scratch crate in a temporary directory with a path dependency on
//! this package and the workspace's `Cargo.lock` (so the versions are the
//! ones already in the local registry cache), and runs `cargo tree -e normal
//! --offline` on it: resolution only, nothing is compiled, a few seconds.
//! As a control, the same crate with the default features must show them
//! (so an empty or broken tree cannot pass).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// What only the command line needs: its own dependencies, and what the
/// `env-filter` and `fmt` features of tracing-subscriber bring in.
const CLI_ONLY: [&str; 6] = [
    "clap",
    "rustyline",
    "hdrhistogram",
    "serde_json",
    "regex-automata",
    "nu-ansi-term",
];

/// A dependency of the command line that tarpc also has: it may be in the
/// tree, but not as kv-client's own.
const CLI_DIRECT: &str = "tracing-subscriber";

/// What the SDK itself cannot do without (a tree without them is broken).
const SDK: [&str; 4] = ["kv-client", "kv-api", "tarpc", "tokio"];

/// The bound on one `cargo tree` run.
const LIMIT: Duration = Duration::from_secs(120);

fn package_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A scratch crate depending on this package, `extra` added to the
/// dependency's table (e.g. `default-features = false`).
fn probe(name: &str, extra: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "kv-client-lean-{name}-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    ));
    std::fs::create_dir_all(dir.join("src")).unwrap();
    let manifest = format!(
        "[package]\nname = \"kv-lean-probe\"\nversion = \"0.0.0\"\nedition = \"2021\"\n\
         publish = false\n\n[dependencies]\nkv-client = {{ path = {:?}{extra} }}\n\n\
         # Its own workspace, whatever the directory it is in.\n[workspace]\n",
        package_dir().display().to_string()
    );
    std::fs::write(dir.join("Cargo.toml"), manifest).unwrap();
    std::fs::write(dir.join("src/lib.rs"), "pub use kv_client::Client;\n").unwrap();
    let lock = package_dir().join("../Cargo.lock");
    std::fs::copy(&lock, dir.join("Cargo.lock"))
        .unwrap_or_else(|e| panic!("copy {}: {e}", lock.display()));
    dir
}

/// The packages in the normal dependency tree of the crate at `dir`.
struct Tree {
    /// Every package's name.
    all: BTreeSet<String>,
    /// The names of kv-client's direct dependencies (depth 2: the probe's
    /// only dependency is kv-client).
    direct: BTreeSet<String>,
}

fn tree(dir: &Path) -> Tree {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let started = Instant::now();
    let mut child = Command::new(&cargo)
        .args(["tree", "-e", "normal", "--offline", "--prefix", "depth"])
        .args(["--format", "{p}"])
        .current_dir(dir)
        .env("CARGO_TARGET_DIR", dir.join("target"))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {cargo:?}: {e}"));
    loop {
        if child.try_wait().unwrap().is_some() {
            break;
        }
        if started.elapsed() > LIMIT {
            let _ = child.kill();
            let _ = child.wait();
            panic!("cargo tree in {} took over {LIMIT:?}", dir.display());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "cargo tree failed in {}:\n{}",
        dir.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let mut t = Tree {
        all: BTreeSet::new(),
        direct: BTreeSet::new(),
    };
    for line in stdout.lines() {
        // `2tokio v1.48.0`: the depth, then the package.
        let rest = line.trim_start_matches(|c: char| c.is_ascii_digit());
        let Some(name) = rest.split_whitespace().next() else {
            continue;
        };
        if &line[..line.len() - rest.len()] == "2" {
            t.direct.insert(name.to_string());
        }
        t.all.insert(name.to_string());
    }
    t
}

fn check(name: &str, extra: &str) -> Tree {
    let dir = probe(name, extra);
    let t = tree(&dir);
    let _ = std::fs::remove_dir_all(&dir);
    for p in SDK {
        assert!(t.all.contains(p), "{p} missing from {:?}", t.all);
    }
    assert!(t.direct.contains("tokio"), "{:?}", t.direct);
    t
}

#[test]
fn without_default_features_the_command_line_crates_are_absent() {
    let t = check("lean", ", default-features = false");
    let present: Vec<&str> = CLI_ONLY
        .into_iter()
        .filter(|p| t.all.contains(*p))
        .collect();
    assert!(
        present.is_empty(),
        "kv-client with default-features = false still pulls in {present:?} \
         (a dependency of the command line that is not optional, or an \
         optional one the SDK turns on); whole tree: {:?}",
        t.all
    );
    assert!(
        !t.direct.contains(CLI_DIRECT),
        "kv-client with default-features = false depends on {CLI_DIRECT} itself: {:?}",
        t.direct
    );
}

#[test]
fn with_default_features_the_command_line_crates_are_there() {
    let t = check("full", "");
    for p in CLI_ONLY {
        assert!(t.all.contains(p), "{p} missing from {:?}", t.all);
    }
    assert!(t.direct.contains(CLI_DIRECT), "{:?}", t.direct);
}
