//! The `kv-client` binary against a real cluster of three `kv-server`
//! processes: every command and its exit status, `--output json`, values
//! from stdin, the shell driven through a pipe, `fault`, `bench` and the
//! counter example. Each test starts its own cluster on free ports and every
//! process run is bounded in time.
//!
//! Needs the `kv-server` binary of the same profile: `cargo build --release
//! -p kv-server` (or `cargo test --workspace --release`, which builds it).

mod common;

use std::time::Duration;

use common::{Cluster, Run};
use serde_json::Value;

fn json(line: &str) -> Value {
    serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line:?}"))
}

fn json_lines(r: &Run) -> Vec<Value> {
    r.stdout.lines().map(json).collect()
}

#[track_caller]
fn ok(r: &Run) {
    assert_eq!(r.code, 0, "stdout {:?}\nstderr {}", r.stdout, r.stderr);
}

#[test]
fn every_command_prints_its_result_and_exits_with_the_documented_status() {
    let c = Cluster::start("commands", 3);

    let r = c.cli(&["put", "color", "blue"]);
    ok(&r);
    assert!(r.stdout.is_empty(), "put prints nothing: {:?}", r.stdout);

    let r = c.cli(&["get", "color"]);
    ok(&r);
    assert_eq!(r.stdout, "blue\n");

    // A local read may lag, but this replica answers: 0 (found) or 1.
    let r = c.cli(&["get", "--local", "color"]);
    assert!(r.code == 0 || r.code == 1, "{}", r.stderr);

    let r = c.cli(&["get", "no-such-key"]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(r.stdout.is_empty());
    assert!(r.stderr.contains("no such key"), "{}", r.stderr);

    let r = c.cli(&["cas", "color", "green", "--expect", "blue"]);
    ok(&r);
    let r = c.cli(&["cas", "color", "red", "--expect", "blue"]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(
        r.stderr.contains("green"),
        "current value shown: {}",
        r.stderr
    );
    let r = c.cli(&["cas", "color", "red", "--expect-absent"]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    let r = c.cli(&["cas", "lock", "me", "--expect-absent"]);
    ok(&r);

    let r = c.cli(&["delete", "color"]);
    ok(&r);
    assert!(r.stdout.is_empty());
    let r = c.cli(&["get", "color"]);
    assert_eq!(r.code, 1);
    // Deleting an absent key succeeds too.
    ok(&c.cli(&["delete", "color"]));

    // Values that are not UTF-8 are shown escaped.
    let r = c.cli(&["put", "-k", "-v"]);
    ok(&r);
    assert_eq!(c.cli(&["get", "-k"]).stdout, "-v\n");

    // Too large: refused before sending, exit 2 (a value over 1 MiB is in
    // the stdin test: an argument that long is over the OS limit).
    let big = "k".repeat(1025);
    let r = c.cli(&["put", &big, "v"]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    let r = c.cli(&["put", "", "v"]);
    assert_eq!(r.code, 2, "{}", r.stderr);

    let r = c.cli(&["status"]);
    ok(&r);
    let lines = json_lines(&r);
    assert_eq!(lines.len(), 3, "{}", r.stdout);
    assert_eq!(
        lines.iter().filter(|l| l["leader"] == true).count(),
        1,
        "{}",
        r.stdout
    );
    assert!(lines.iter().all(|l| l["up"] == true));

    // --server: one replica, which forwards to the leader.
    for addr in &c.addrs {
        let r = common::client(&["--server", addr, "get", "lock"]);
        ok(&r);
        assert_eq!(r.stdout, "me\n");
    }
}

#[test]
fn json_output_covers_results_and_errors() {
    let c = Cluster::start("json", 3);
    let j = |args: &[&str]| {
        let mut all = vec!["--output", "json"];
        all.extend_from_slice(args);
        c.cli(&all)
    };

    let r = j(&["put", "k", "v1"]);
    ok(&r);
    let v = json(r.stdout.trim());
    assert_eq!(v["ok"], true);
    let slot = v["slot"].as_u64().expect("a slot number");
    assert!(slot > 0);

    let r = j(&["get", "k"]);
    ok(&r);
    let mut got = json(r.stdout.trim());
    // The key's revisions (see `kv_api::data`): the first put of the key,
    // so created and last changed by the same write.
    let rev = got["mod_revision"].as_u64().expect("a mod revision");
    assert!(rev > 0);
    assert_eq!(got["create_revision"], rev);
    assert_eq!(got["version"], 1);
    for field in ["create_revision", "mod_revision", "version"] {
        got.as_object_mut().unwrap().remove(field);
    }
    assert_eq!(got, json(r#"{"key":"k","value":"v1","found":true}"#));
    assert!(r.stderr.is_empty(), "{}", r.stderr);

    let r = j(&["get", "--local", "absent"]);
    assert_eq!(r.code, 1);
    assert_eq!(
        json(r.stdout.trim()),
        json(r#"{"key":"absent","value":null,"found":false}"#)
    );

    let r = j(&["cas", "k", "v2", "--expect", "nope"]);
    assert_eq!(r.code, 1);
    let v = json(r.stdout.trim());
    assert_eq!(
        (v["swapped"].clone(), v["current"].clone()),
        (false.into(), "v1".into())
    );
    let r = j(&["cas", "k", "v2", "--expect", "v1"]);
    ok(&r);
    let v = json(r.stdout.trim());
    assert_eq!(v["swapped"], true);
    assert_eq!(v["current"], "v2");
    assert!(v["slot"].as_u64().unwrap() > slot);

    let r = j(&["delete", "k"]);
    ok(&r);
    assert_eq!(json(r.stdout.trim())["existed"], true);
    let r = j(&["delete", "k"]);
    ok(&r);
    assert_eq!(json(r.stdout.trim())["existed"], false);

    let r = j(&["status"]);
    ok(&r);
    assert_eq!(json_lines(&r).len(), 3);

    // Errors: JSON on stdout with a kind, and the exit status.
    let big = "k".repeat(2000);
    let r = j(&["get", &big]);
    assert_eq!(r.code, 2);
    assert_eq!(json(r.stdout.trim())["kind"], "invalid_argument");
    let dead = format!("127.0.0.1:{}", common::free_ports(1)[0]);
    let r = common::client(&[
        "--output",
        "json",
        "--server",
        &dead,
        "--timeout",
        "0.5",
        "put",
        "k",
        "v",
    ]);
    assert_eq!(r.code, 3);
    let v = json(r.stdout.trim());
    assert_eq!(v["kind"], "unavailable");
    assert!(v["error"].as_str().unwrap().contains("not sent"), "{v}");
    let r = j(&["get"]);
    assert_eq!(r.code, 2);
    assert_eq!(json(r.stdout.trim())["kind"], "invalid_argument");
}

#[test]
fn put_dash_stores_stdin_exactly() {
    let c = Cluster::start("stdin", 3);
    let value = b"line one\nline two \xff\x00 end\n\n";
    ok(&c.cli_stdin(&["put", "blob", "-"], value));

    // Text: the trailing newlines are kept, the bad bytes escaped.
    let r = c.cli(&["get", "blob"]);
    ok(&r);
    assert_eq!(r.stdout, "line one\nline two \\xff\0 end\n\n\n");

    // JSON: exact bytes in value_base64.
    let r = c.cli(&["--output", "json", "get", "blob"]);
    ok(&r);
    let v = json(r.stdout.trim());
    assert_eq!(v["found"], true);
    assert_eq!(
        v["value_base64"], "bGluZSBvbmUKbGluZSB0d28g/wAgZW5kCgo=",
        "{v}"
    );

    // Empty stdin: an empty value (not absent).
    ok(&c.cli_stdin(&["put", "empty", "-"], b""));
    let r = c.cli(&["get", "empty"]);
    ok(&r);
    assert_eq!(r.stdout, "\n");

    // Over the limit: exit 2, nothing stored.
    let big = vec![b'x'; 1024 * 1024 + 1];
    let r = c.cli_stdin(&["put", "big", "-"], &big);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert_eq!(c.cli(&["get", "big"]).code, 1);
}

#[test]
fn shell_through_a_pipe_prints_what_one_shot_commands_print() {
    let c = Cluster::start("shell", 3);
    let script = b"put color blue\n\
        get color\n\
        # a comment\n\
        \n\
        get missing\n\
        frobnicate\n\
        put 'two words' \"a \\x41 b\"\n\
        get 'two words'\n\
        cas color green --expect blue\n\
        cas color red --expect blue\n\
        delete color\n\
        get color\n\
        put k -\n\
        status\n\
        help\n\
        get --local 'two words'\n";
    let r = c.cli_stdin(&["shell"], script);
    ok(&r);
    let lines: Vec<&str> = r.stdout.lines().collect();
    assert_eq!(
        lines[0], "blue",
        "no prompt noise on stdout: {:?}",
        r.stdout
    );
    assert_eq!(lines[1], "a A b");
    assert_eq!(lines.iter().filter(|l| l.starts_with("{\"id\"")).count(), 3);
    assert!(r.stdout.contains("Commands"), "help: {}", r.stdout);
    for expected in [
        "no such key: missing",
        "frobnicate",
        "not swapped; the current value is green",
        "no such key: color",
        "stdin",
    ] {
        assert!(r.stderr.contains(expected), "{expected}: {}", r.stderr);
    }

    // JSON mode: one object a line, errors included; quit stops early.
    let r = c.cli_stdin(
        &["--output", "json", "shell"],
        b"put a 1\nget a\nget nothing\nbogus\nquit\nget a\n",
    );
    ok(&r);
    let lines = json_lines(&r);
    assert_eq!(lines.len(), 4, "{}", r.stdout);
    assert_eq!(lines[0]["ok"], true);
    assert_eq!(lines[1]["value"], "1");
    assert_eq!(lines[2]["found"], false);
    assert_eq!(lines[3]["kind"], "invalid_argument");
}

#[test]
fn fault_changes_reports_and_heals_injection() {
    let c = Cluster::start("fault", 3);
    let addr = c.addrs[2].as_str();

    // Just a report.
    let r = common::client(&["fault", "--server", addr]);
    ok(&r);
    let v = json(r.stdout.trim());
    assert_eq!(v["addr"], addr);
    assert_eq!(v["settings"]["drop_rate"], 0.0);

    let r = common::client(&[
        "fault",
        "--server",
        addr,
        "--drop-rate",
        "0.25",
        "--delay-ms",
        "1..3",
        "--isolate",
        "1",
    ]);
    ok(&r);
    let v = json(r.stdout.trim());
    assert_eq!(v["settings"]["drop_rate"], 0.25);
    assert_eq!(v["settings"]["delay_ms"], json("[1,3]"));
    assert_eq!(v["settings"]["isolate"], json("[1]"));

    // Writes still go through with a majority (1 and 2) connected.
    ok(&c.cli(&["put", "during", "faults"]));

    // --all reports every replica of the file; --heal resets them.
    let r = c.cli(&["fault", "--all", "--heal"]);
    ok(&r);
    let lines = json_lines(&r);
    assert_eq!(lines.len(), 3);
    for (i, l) in lines.iter().enumerate() {
        assert_eq!(l["id"], (i + 1) as u64);
        assert_eq!(l["settings"]["drop_rate"], 0.0);
        assert_eq!(l["settings"]["isolate"], json("[]"));
    }

    // Invalid changes exit 2 without touching anything.
    for args in [
        vec!["fault", "--server", addr, "--drop-rate", "1.5"],
        vec!["fault", "--server", addr, "--delay-ms", "9..1"],
        vec!["fault", "--server", addr, "--isolate", "0"],
        vec!["fault", "--server", addr, "--all"],
    ] {
        let r = common::client(&args);
        assert_eq!(r.code, 2, "{args:?}: {}", r.stderr);
    }
    let r = c.cli(&["fault"]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.stderr.contains("--server"), "{}", r.stderr);

    // The shell runs fault too.
    let line = format!("fault --server {addr} --timeout-rate 0\n");
    let r = c.cli_stdin(&["shell"], line.as_bytes());
    ok(&r);
    assert_eq!(json(r.stdout.trim())["settings"]["timeout_rate"], 0.0);
}

#[test]
fn bench_runs_for_its_time_and_prints_one_json_line() {
    let c = Cluster::start("bench", 3);
    for op in ["put", "mixed"] {
        let r = c.cli(&[
            "bench",
            "--clients",
            "4",
            "--secs",
            "1",
            "--warmup-secs",
            "0.5",
            "--op",
            op,
            "--keys",
            "50",
            "--value-size",
            "16",
        ]);
        ok(&r);
        let lines = json_lines(&r);
        assert_eq!(lines.len(), 1, "{}", r.stdout);
        let v = &lines[0];
        assert_eq!(v["system"], "kvpaxos");
        assert_eq!(v["op"], op);
        assert_eq!(v["clients"], 4);
        assert_eq!(v["secs"], 1);
        assert!(v["ops"].as_u64().unwrap() > 0, "{v}");
        assert!(v["ops_per_s"].as_f64().unwrap() > 0.0, "{v}");
        let (p50, p99, p999) = (
            v["p50_ms"].as_f64().unwrap(),
            v["p99_ms"].as_f64().unwrap(),
            v["p999_ms"].as_f64().unwrap(),
        );
        assert!(0.0 < p50 && p50 <= p99 && p99 <= p999, "{v}");
        assert_eq!(v["errors"], 0, "{v}");
        assert!(
            r.stderr.contains("bench:"),
            "progress on stderr: {}",
            r.stderr
        );
        // 1.5 s of load, plus start-up and the last operation.
        assert!(r.took < Duration::from_secs(8), "took {:?}", r.took);
    }

    // Gets after a preload find values; bad arguments exit 2.
    let r = c.cli(&[
        "bench",
        "--clients",
        "2",
        "--secs",
        "1",
        "--warmup-secs",
        "0",
        "--op",
        "get",
        "--keys",
        "10",
        "--preload",
    ]);
    ok(&r);
    assert!(json(r.stdout.trim())["ops"].as_u64().unwrap() > 0);
    assert!(r.stderr.contains("preloaded 10 keys"), "{}", r.stderr);
}

#[test]
fn bench_against_no_cluster_counts_errors_and_still_stops() {
    let dead = format!("127.0.0.1:{}", common::free_ports(1)[0]);
    let r = common::client(&[
        "--server",
        &dead,
        "--timeout",
        "0.3",
        "bench",
        "--clients",
        "2",
        "--secs",
        "1",
        "--warmup-secs",
        "0",
    ]);
    assert_eq!(r.code, 3, "{}", r.stderr);
    let v = json(r.stdout.trim());
    assert_eq!(v["ops"], 0);
    assert!(v["errors"].as_u64().unwrap() > 0, "{v}");
    assert!(r.took < Duration::from_secs(5), "took {:?}", r.took);
}

#[test]
fn counter_example_ends_at_tasks_times_increments() {
    let bin = common::profile_dir().join("examples").join("counter");
    if !bin.is_file() {
        panic!(
            "the counter example is missing at {}; `cargo test -p kv-client` builds it",
            bin.display()
        );
    }
    let c = Cluster::start("counter", 3);
    let r = common::run_with(
        &bin,
        &[
            "--replicas",
            c.file.to_str().unwrap(),
            "--tasks",
            "4",
            "--increments",
            "10",
        ],
        None,
        Duration::from_secs(60),
    );
    ok(&r);
    assert!(r.stdout.contains("expected 40"), "{}", r.stdout);
}

#[test]
fn watch_example_configured_from_kv_replicas_prints_each_change() {
    use std::io::{BufRead, BufReader};
    use std::process::{Command, Stdio};
    use std::sync::mpsc;

    let bin = common::profile_dir().join("examples").join("watch");
    assert!(
        bin.is_file(),
        "the watch example is missing at {}; `cargo test -p kv-client` builds it",
        bin.display()
    );
    let c = Cluster::start("watch", 3);
    // Addresses, not the file: KV_REPLICAS as a comma list (spaces allowed).
    let replicas = c.addrs.join(", ");
    let mut child = Command::new(&bin)
        .args(["flag", "--every-ms", "20", "--changes", "3"])
        .env("KV_REPLICAS", &replicas)
        .env_remove("KV_TLS_CA")
        .env_remove("KV_TLS_CERT")
        .env_remove("KV_TLS_KEY")
        .current_dir(std::env::temp_dir())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the watch example");
    let (tx, lines) = mpsc::channel();
    let out = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let next = |what: &str| {
        lines
            .recv_timeout(Duration::from_secs(30))
            .unwrap_or_else(|e| panic!("no line from the watcher ({what}): {e}"))
    };
    // Each change is made only once the previous one was seen, so that no
    // value comes and goes between two polls.
    assert_eq!(next("first read"), "(absent)");
    ok(&c.cli(&["put", "flag", "on"]));
    assert_eq!(next("after put on"), "on");
    ok(&c.cli(&["delete", "flag"]));
    assert_eq!(next("after delete"), "(absent)");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("the watcher did not exit after --changes 3");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "{status:?}");
}
