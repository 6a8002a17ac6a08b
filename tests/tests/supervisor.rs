//! `kv-server cluster` runs every replica of a replica file as child
//! processes: the cluster serves, SIGTERM stops every replica, and if the
//! supervisor is killed outright the replicas stop by themselves.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use kv_tests::{
    bin_path, bounded, describe, kv_client_cli, run_bin, signal_pid, temp_dir, wait_until,
    write_replica_file,
};
use tokio::io::{AsyncBufReadExt, BufReader};

/// A running `kv-server cluster`. Dropping it kills the supervisor and any
/// replica it reported that is still running, and removes the directory.
struct Supervised {
    dir: PathBuf,
    file: PathBuf,
    client_addrs: Vec<String>,
    supervisor: tokio::process::Child,
    replica_pids: Vec<u32>,
    stdout: Vec<String>,
    /// The certificates (`--tls-dir`), for a TLS cluster.
    tls: Option<PathBuf>,
}

impl Supervised {
    /// Starts `kv-server cluster` for five replicas and waits for its five
    /// `replica ID client ADDR peer ADDR pid PID data DIR` lines.
    async fn start() -> Supervised {
        Supervised::start_with(&[], false).await
    }

    /// Like [`Supervised::start`], with `args` for `kv-server cluster`, and
    /// with `--tls-dir` (certificates made by `kv-server certs`) if `tls`.
    async fn start_with(args: &[&str], tls: bool) -> Supervised {
        let dir = temp_dir("supervisor");
        let (file, replicas) = write_replica_file(&dir, 5);
        let tls = tls.then(|| {
            let out = dir.join("tls");
            kv_tests::make_certs(&file, &out);
            out
        });
        let log = std::fs::File::create(dir.join("supervisor.log")).unwrap();
        let mut supervisor = tokio::process::Command::new(bin_path("kv-server"))
            .arg("cluster")
            .arg("--replicas")
            .arg(&file)
            .arg("--data-dir")
            .arg(dir.join("data"))
            .args(
                tls.iter()
                    .flat_map(|d| [PathBuf::from("--tls-dir"), d.clone()]),
            )
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .expect("start kv-server cluster");
        let stdout = supervisor.stdout.take().unwrap();
        let mut s = Supervised {
            dir,
            file,
            client_addrs: replicas
                .replicas
                .iter()
                .map(|r| r.client_addr.clone())
                .collect(),
            supervisor,
            replica_pids: Vec::new(),
            stdout: Vec::new(),
            tls,
        };
        let mut lines = BufReader::new(stdout).lines();
        let read = tokio::time::timeout(Duration::from_secs(15), async {
            while s.replica_pids.len() < 5 {
                let Some(line) = lines.next_line().await.expect("read stdout") else {
                    break;
                };
                let words: Vec<&str> = line.split_whitespace().collect();
                if let Some(i) = words.iter().position(|w| *w == "pid") {
                    if let Some(pid) = words.get(i + 1).and_then(|p| p.parse().ok()) {
                        s.replica_pids.push(pid);
                    }
                }
                s.stdout.push(line);
            }
        })
        .await;
        // Keep draining stdout so that the supervisor never blocks on it,
        // into a file the tests can read.
        let rest = s.dir.join("supervisor.out");
        tokio::spawn(async move {
            use std::io::Write as _;
            let mut out = std::fs::File::create(rest).unwrap();
            while let Ok(Some(line)) = lines.next_line().await {
                let _ = writeln!(out, "{line}");
            }
        });
        assert!(
            read.is_ok() && s.replica_pids.len() == 5,
            "kv-server cluster did not report five replicas with pids; stdout: {:#?}\n{}",
            s.stdout,
            s.log()
        );
        s
    }

    fn log(&self) -> String {
        let text = std::fs::read_to_string(self.dir.join("supervisor.log")).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        format!(
            "--- supervisor log (last 40 lines) ---\n{}",
            lines[lines.len().saturating_sub(40)..].join("\n")
        )
    }

    /// Whether any replica's client port still accepts connections.
    async fn any_port_open(&self) -> bool {
        for addr in &self.client_addrs {
            if tokio::net::TcpStream::connect(addr).await.is_ok() {
                return true;
            }
        }
        false
    }

    /// Whether `pid` is still one of the replicas this supervisor started
    /// (and not yet reaped): its command line names kv-server.
    fn replica_alive(pid: u32) -> bool {
        std::fs::read(format!("/proc/{pid}/cmdline"))
            .map(|c| String::from_utf8_lossy(&c).contains("kv-server"))
            .unwrap_or(false)
            && !std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .map(|s| s.contains(") Z "))
                .unwrap_or(true)
    }

    async fn cli(&self, args: &[&str]) -> std::process::Output {
        let tls = self
            .tls
            .as_ref()
            .map(|d| kv_tests::tls_args(d, "admin"))
            .unwrap_or_default();
        let mut full: Vec<&str> = tls.iter().map(String::as_str).collect();
        full.extend(["--replicas", self.file.to_str().unwrap(), "--timeout", "10"]);
        full.extend_from_slice(args);
        run_bin(kv_client_cli(&full), Duration::from_secs(20))
            .await
            .unwrap_or_else(|e| panic!("{e}"))
            .0
    }

    /// Waits until every replica answers status and one leads.
    async fn wait_ready(&self) {
        let mut builder = kv_client::Client::builder();
        if let Some(d) = &self.tls {
            builder = builder.tls(kv_tests::tls_files(d, "admin"));
        }
        let client = builder
            .replicas(kv_api::replicas::Replicas::load(&self.file).unwrap())
            .timeout(Duration::from_secs(1))
            .build()
            .unwrap();
        let client = &client;
        wait_until(
            Duration::from_secs(30),
            "the supervised cluster to be ready",
            || async move {
                let statuses = client.status().await;
                statuses.iter().all(|(_, r)| r.is_ok())
                    && statuses
                        .iter()
                        .any(|(_, r)| r.as_ref().is_ok_and(|s| s.leader))
            },
        )
        .await;
    }
}

impl Drop for Supervised {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("{}", self.log());
        }
        let _ = self.supervisor.start_kill();
        for &pid in &self.replica_pids {
            if Supervised::replica_alive(pid) {
                let _ = signal_pid(pid, libc::SIGKILL);
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_mode_serves_and_stops_every_replica_on_sigterm() {
    let mut s = Supervised::start().await;
    let test = async {
        s.wait_ready().await;
        let out = s.cli(&["put", "k", "v"]).await;
        assert!(out.status.success(), "put: {}", describe(&out));
        let out = s.cli(&["get", "k"]).await;
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            "v\n",
            "{}",
            describe(&out)
        );

        let pid = s.supervisor.id().expect("the supervisor runs");
        signal_pid(pid, libc::SIGTERM).expect("SIGTERM the supervisor");
        let status = tokio::time::timeout(Duration::from_secs(15), s.supervisor.wait())
            .await
            .expect("the supervisor did not exit within 15 s of SIGTERM")
            .expect("wait for the supervisor");
        assert_eq!(
            status.code(),
            Some(0),
            "supervisor exit after SIGTERM: {status}"
        );
        assert!(
            !s.any_port_open().await,
            "a replica still listens after the supervisor exited"
        );
        for &pid in &s.replica_pids {
            assert!(
                !Supervised::replica_alive(pid),
                "replica pid {pid} still runs"
            );
        }
    };
    bounded(Duration::from_secs(90), "the test", test).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_mode_replicas_stop_by_themselves_when_the_supervisor_is_killed() {
    let mut s = Supervised::start().await;
    let test = async {
        s.wait_ready().await;
        let out = s.cli(&["put", "k", "v"]).await;
        assert!(out.status.success(), "put: {}", describe(&out));

        let killed_at = Instant::now();
        s.supervisor.kill().await.expect("SIGKILL the supervisor");
        let s = &s;
        wait_until(
            Duration::from_secs(15),
            "every replica to stop after the supervisor was killed",
            || async move {
                !s.any_port_open().await
                    && s.replica_pids
                        .iter()
                        .all(|&p| !Supervised::replica_alive(p))
            },
        )
        .await;
        eprintln!(
            "replicas stopped {:?} after the supervisor was killed",
            killed_at.elapsed()
        );
    };
    bounded(Duration::from_secs(90), "the test", test).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_mode_with_tls_dir_runs_every_replica_on_tls_and_checks_their_health() {
    // Chaos with faults far apart: the health checks run (over TLS, as
    // admin) and print a line per replica that answers.
    let chaos = [
        "--chaos",
        "--chaos-seed",
        "1",
        "--chaos-interval-ms",
        "600000..600001",
    ];
    let s = Supervised::start_with(&chaos, true).await;
    let test = async {
        s.wait_ready().await;
        let out = s.cli(&["put", "k", "v"]).await;
        assert!(out.status.success(), "put over TLS: {}", describe(&out));
        // Without a certificate nothing is served.
        let plain = [
            "--replicas",
            s.file.to_str().unwrap(),
            "--timeout",
            "1",
            "get",
            "k",
        ];
        let (out, _) = run_bin(kv_client_cli(plain), Duration::from_secs(20))
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(out.status.code(), Some(3), "plain get: {}", describe(&out));
        let s = &s;
        wait_until(
            Duration::from_secs(15),
            "a health line for every replica",
            || async move {
                let out = std::fs::read_to_string(s.dir.join("supervisor.out")).unwrap_or_default();
                let all = [s.stdout.join("\n"), out].join("\n");
                (1..=5).all(|id| all.contains(&format!("health: replica {id} answers")))
            },
        )
        .await;
    };
    bounded(Duration::from_secs(90), "the test", test).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_mode_passes_session_settings_to_every_replica() {
    let s = Supervised::start_with(&["--session-ttl", "7.5", "--max-sessions", "9"], false).await;
    for &pid in &s.replica_pids {
        // A just-forked child's command line reads empty until its exec.
        let cmdline = kv_tests::wait_for(Duration::from_secs(10), "the replica's exec", || async {
            let c = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            String::from_utf8_lossy(&c)
                .contains("kv-server")
                .then_some(c)
        })
        .await;
        let args: Vec<String> = cmdline
            .split(|b| *b == 0)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        let after = |flag: &str| {
            args.iter()
                .position(|a| a == flag)
                .and_then(|i| args.get(i + 1).cloned())
        };
        assert_eq!(after("--session-ttl").as_deref(), Some("7.5"), "{args:?}");
        assert_eq!(after("--max-sessions").as_deref(), Some("9"), "{args:?}");
    }
}
