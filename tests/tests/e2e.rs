//! The end-to-end tests that can share one process, as modules of one test
//! binary (`cargo test -p kv-tests --release --test e2e -- quorum::` runs
//! one file's tests). Every test binary links the whole workspace in
//! release mode; one binary instead of 26 saves most of CI's compile time.
//!
//! A file stays a binary of its own (`[[test]]` in `tests/Cargo.toml`) when
//! it sets the process's environment, which the replicas every other test
//! starts would inherit (`net_limits`, `power_cut`, `sdk_env`), or when it
//! loads both cores for long and must not share them with other tests
//! (`jepsen`, `jepsen_resp`, `big_values`, `fuzz`).

mod admin;
mod amnesia;
mod backup;
mod bad_input;
mod catch_up;
mod client_failover;
mod concurrent_clients;
mod crash_recovery;
mod damaged_data;
mod data_model;
mod deploy;
mod exactly_once;
mod leader_failover;
mod leases;
mod membership;
mod operations;
mod partition;
mod quorum;
mod recovery;
mod redis;
mod replication;
mod security_defaults;
mod sessions;
mod supervisor;
mod tls;
mod watch;

/// With `autotests = false`, a file under `tests/` that neither this list
/// nor a `[[test]]` of `Cargo.toml` names would silently not be compiled.
#[test]
fn every_test_file_is_a_module_here_or_a_binary_of_its_own() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let here = std::fs::read_to_string(dir.join("tests/e2e.rs")).unwrap();
    let manifest = std::fs::read_to_string(dir.join("Cargo.toml")).unwrap();
    for entry in std::fs::read_dir(dir.join("tests")).unwrap() {
        let name = entry.unwrap().file_name().into_string().unwrap();
        let Some(stem) = name.strip_suffix(".rs") else {
            continue;
        };
        assert!(
            stem == "e2e"
                || here.contains(&format!("\nmod {stem};\n"))
                || manifest.contains(&format!("path = \"tests/{name}\"")),
            "tests/{name} is neither a module of tests/e2e.rs nor a [[test]] in Cargo.toml"
        );
    }
}
