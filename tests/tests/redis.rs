//! The Redis door (`kv-server --redis-addr`), driven by real, unmodified
//! Redis clients against real replicas: hostile bytes by hand, a
//! `redis-cli` session script and `redis-benchmark` (Debian's
//! `redis-tools`; `.ci/run` installs it), and the Rust `redis` crate
//! (pipelines, `MULTI`/`EXEC` with `WATCH`, `SET … EX`, reconnecting after
//! a SIGKILL, `INCR` exactly once).
//!
//! The tests that need `redis-cli`/`redis-benchmark` fail, naming the
//! package, if they are not installed.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use kv_tests::{bounded, run_bin, run_bin_with_input, wait_for, Cluster};

const T: Duration = Duration::from_secs(30);

/// A raw connection to a RESP port.
fn raw(addr: &str) -> TcpStream {
    let s = TcpStream::connect(addr).expect("connect to the RESP port");
    s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    s
}

/// Reads until `want` bytes arrived or the connection closed; what came.
fn read_n(s: &mut TcpStream, want: usize) -> Vec<u8> {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    while out.len() < want {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) => panic!("read failed after {:?}: {e}", String::from_utf8_lossy(&out)),
        }
    }
    out
}

/// Sends `req`, expects exactly `want` back.
fn exchange(s: &mut TcpStream, req: &[u8], want: &str) {
    s.write_all(req).unwrap();
    let got = read_n(s, want.len());
    assert_eq!(
        String::from_utf8_lossy(&got),
        want,
        "for {:?}",
        String::from_utf8_lossy(req)
    );
}

/// Whether the server closed the connection (reads EOF, not a timeout).
fn closed(s: &mut TcpStream) -> bool {
    let mut b = [0u8; 64];
    matches!(s.read(&mut b), Ok(0)) || matches!(s.read(&mut b), Ok(0) | Err(_))
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    bounded(
        Duration::from_secs(120),
        "a blocking Redis exchange",
        async {
            tokio::task::spawn_blocking(f)
                .await
                .expect("the exchange panicked")
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_bytes_get_redis_errors_and_never_hurt_the_replica() {
    let cluster = Cluster::start_with_redis(3, &[]).await;
    let addr = cluster.redis_addr(1).to_string();
    blocking(move || {
        // Unparseable framing: an error, then the connection is closed.
        for (req, err) in [
            (
                &b"*1\r\n$x\r\n"[..],
                "-ERR Protocol error: invalid bulk length\r\n",
            ),
            (
                b"*abc\r\n",
                "-ERR Protocol error: invalid multibulk length\r\n",
            ),
            (
                b"*1\r\n:5\r\n",
                "-ERR Protocol error: expected '$', got ':'\r\n",
            ),
        ] {
            let mut s = raw(&addr);
            exchange(&mut s, req, err);
            assert!(
                closed(&mut s),
                "still open after {:?}",
                String::from_utf8_lossy(req)
            );
        }
        // A bulk length far over the value limit is refused at once,
        // before any of its bytes are sent, and nothing is reserved for it.
        let mut s = raw(&addr);
        exchange(
            &mut s,
            b"*2\r\n$3\r\nSET\r\n$2147483648\r\n",
            "-ERR Protocol error: invalid bulk length\r\n",
        );
        assert!(closed(&mut s));
        let mut s = raw(&addr);
        exchange(
            &mut s,
            b"*99999999\r\n",
            "-ERR Protocol error: invalid multibulk length\r\n",
        );
        // An inline line that never ends is cut off at the inline limit.
        let mut s = raw(&addr);
        s.write_all(&vec![b'a'; 70 * 1024]).unwrap();
        let got = read_n(&mut s, 41);
        assert_eq!(
            String::from_utf8_lossy(&got),
            "-ERR Protocol error: too big inline request\r\n"[..got.len()].to_string()
        );
        // Binary garbage on one line is an unknown command: answered, and
        // the connection stays.
        let mut s = raw(&addr);
        s.write_all(b"\x00\xff\xfe zz\r\n").unwrap();
        let got = read_n(&mut s, 1);
        s.set_read_timeout(Some(Duration::from_millis(300)))
            .unwrap();
        let mut rest = [0u8; 256];
        let n = s.read(&mut rest).unwrap_or(0);
        let line = [got, rest[..n].to_vec()].concat();
        assert!(
            String::from_utf8_lossy(&line)
                .starts_with("-ERR unknown command '???', with args beginning with: 'zz' \r\n"),
            "{:?}",
            String::from_utf8_lossy(&line)
        );
        s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
        exchange(&mut s, b"PING\r\n", "+PONG\r\n");
        exchange(
            &mut s,
            b"*3\r\n$3\r\nFOO\r\n$1\r\na\r\n$1\r\nb\r\n",
            "-ERR unknown command 'FOO', with args beginning with: 'a' 'b' \r\n",
        );
        exchange(
            &mut s,
            b"*1\r\n$3\r\nGET\r\n",
            "-ERR wrong number of arguments for 'get' command\r\n",
        );
        exchange(&mut s, b"PING\r\n", "+PONG\r\n");
    })
    .await;
    // The replica is still there and serves.
    let addr = cluster.redis_addr(1).to_string();
    blocking(move || {
        let mut s = raw(&addr);
        exchange(&mut s, b"SET k v\r\nGET k\r\n", "+OK\r\n$1\r\nv\r\n");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unterminated_pipeline_is_answered_up_to_its_last_complete_request() {
    let cluster = Cluster::start_with_redis(3, &[]).await;
    let addr = cluster.redis_addr(2).to_string();
    blocking(move || {
        let mut s = raw(&addr);
        // Three complete requests and half of a fourth, in one write.
        s.write_all(b"SET p 1\r\nINCR p\r\n*2\r\n$3\r\nGET\r\n$1\r\np\r\n*2\r\n$4\r\nINCR\r\n$1\r")
            .unwrap();
        let got = read_n(&mut s, "+OK\r\n:2\r\n$1\r\n2\r\n".len());
        assert_eq!(String::from_utf8_lossy(&got), "+OK\r\n:2\r\n$1\r\n2\r\n");
        // The rest of the fourth, one byte at a time.
        for b in b"\np\r\n" {
            s.write_all(&[*b]).unwrap();
        }
        let got = read_n(&mut s, 4);
        assert_eq!(String::from_utf8_lossy(&got), ":3\r\n");
        // A pipeline of many requests, answered in order.
        let mut req = Vec::new();
        let mut want = String::new();
        for i in 0..500 {
            req.extend_from_slice(format!("SET k{i} {i}\r\nGET k{i}\r\n").as_bytes());
            want.push_str(&format!("+OK\r\n${}\r\n{i}\r\n", i.to_string().len()));
        }
        exchange(&mut s, &req, &want);
    })
    .await;
}

fn redis_tool(name: &str) -> tokio::process::Command {
    let path = format!("/usr/bin/{name}");
    assert!(
        std::path::Path::new(&path).exists() || which(name),
        "{name} is not installed: `apt-get install -y redis-tools` (.ci/run does)"
    );
    tokio::process::Command::new(name)
}

fn which(name: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(name).exists()))
}

fn host_port(addr: &str) -> (String, String) {
    let (h, p) = addr.rsplit_once(':').unwrap();
    (h.to_string(), p.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_cli_session_script_gets_redis_answers() {
    let cluster = Cluster::start_with_redis(3, &[]).await;
    let leader = cluster.wait_for_leader(T).await;
    // A follower: every command is forwarded to the leader.
    let follower = cluster.ids().into_iter().find(|&i| i != leader).unwrap();
    let (host, port) = host_port(cluster.redis_addr(follower));
    let script = "\
PING
SET greeting hello
GET greeting
APPEND greeting \" world\"
STRLEN greeting
GETRANGE greeting 0 4
INCR counter
INCRBY counter 41
DECR counter
INCR greeting
SET n 10 NX
SET n 20 XX GET
GET n
SETNX n 30
MSET a 1 b 2 c 3
MGET a b nope c
EXISTS a b nope
DEL a b nope
KEYS *
TYPE greeting
TYPE nope
SET temp x EX 100
TTL temp
PERSIST temp
TTL temp
TTL nope
RENAME c d
GET d
MULTI
INCR counter
GET counter
EXEC
DBSIZE
SELECT 0
SELECT 1
NOSUCH a b
GETDEL d
GET d
INCRBYFLOAT f 2.5
";
    let want = "\
PONG
OK
hello
11
11
hello
1
42
41
ERR value is not an integer or out of range

OK
10
20
0
OK
1
2

3
2
2
c
counter
greeting
n
string
none
OK
100
1
-1
-2
OK
3
OK
QUEUED
QUEUED
42
42
5
OK
ERR DB index is out of range

ERR unknown command 'NOSUCH', with args beginning with: 'a' 'b' 

3

2.5
";
    let mut cmd = redis_tool("redis-cli");
    cmd.args(["-h", &host, "-p", &port]);
    let (out, _) = run_bin_with_input(cmd, Some(script.as_bytes().to_vec()), T)
        .await
        .expect("redis-cli ran");
    let got = String::from_utf8_lossy(&out.stdout);
    // `KEYS *` lists every key in order; compare line by line for a
    // readable failure.
    for (i, (g, w)) in got.lines().zip(want.lines()).enumerate() {
        assert_eq!(g, w, "line {} of the session (stdout:\n{got})", i + 1);
    }
    assert_eq!(
        got.lines().count(),
        want.lines().count(),
        "stdout:\n{got}\nstderr:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_tls_the_client_certificate_role_decides_what_a_connection_may_do() {
    let cluster = Cluster::start_with_redis_tls(3, &[]).await;
    let dir = cluster.tls_dir().expect("a TLS cluster").to_path_buf();
    let (host, port) = host_port(cluster.redis_addr(2));
    let cli = |who: &str, args: &[&str]| {
        let mut cmd = redis_tool("redis-cli");
        cmd.args(["-h", &host, "-p", &port, "--tls"]);
        cmd.arg("--cacert").arg(dir.join("ca.pem"));
        if who != "nobody" {
            cmd.arg("--cert").arg(dir.join(format!("{who}.pem")));
            cmd.arg("--key").arg(dir.join(format!("{who}.key")));
        }
        cmd.args(args);
        async move {
            let (out, _) = run_bin(cmd, T).await.expect("redis-cli ran");
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            )
        }
    };
    assert_eq!(cli("writer", &["SET", "k", "v"]).await.trim(), "OK");
    assert_eq!(cli("reader", &["GET", "k"]).await.trim(), "v");
    let refused = cli("reader", &["SET", "k", "w"]).await;
    assert!(refused.starts_with("NOPERM"), "{refused}");
    assert!(refused.contains("`write` role"), "{refused}");
    assert_eq!(cli("writer", &["GET", "k"]).await.trim(), "v");
    let auth = cli("writer", &["AUTH", "secret"]).await;
    assert!(auth.contains("without any password configured"), "{auth}");
    // No certificate: the handshake fails, nothing is served.
    let anon = cli("nobody", &["GET", "k"]).await;
    assert!(!anon.trim().ends_with('v'), "{anon}");
}

/// How many requests each redis-benchmark test sends: the issue's 20,000,
/// or `KV_REDIS_BENCH_N`.
fn bench_n() -> String {
    std::env::var("KV_REDIS_BENCH_N").unwrap_or_else(|_| "20000".into())
}

async fn benchmark(cluster: &Cluster, id: u64, pipeline: u32) {
    let (host, port) = host_port(cluster.redis_addr(id));
    let n = bench_n();
    let mut cmd = redis_tool("redis-benchmark");
    cmd.args([
        "-h",
        &host,
        "-p",
        &port,
        "-t",
        "ping,set,get,incr,mset",
        "-n",
        &n,
        "-c",
        "50",
        "-q",
    ]);
    cmd.args(["-P", &pipeline.to_string()]);
    let started = Instant::now();
    let (out, _) = run_bin(cmd, Duration::from_secs(400))
        .await
        .expect("redis-benchmark finished");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!(
        "redis-benchmark -P {pipeline} ({:?}):\n{stdout}",
        started.elapsed()
    );
    assert!(
        out.status.success(),
        "redis-benchmark failed: {stdout}\n{stderr}"
    );
    assert!(
        !stdout.contains("rror") && !stderr.contains("rror"),
        "errors from the server: {stdout}\n{stderr}"
    );
    for t in ["PING_INLINE", "PING_MBULK", "SET", "GET", "INCR", "MSET"] {
        assert!(
            stdout.split(['\r', '\n']).any(|l| {
                let l = l.trim_start();
                (l.starts_with(&format!("{t}:")) || l.starts_with(&format!("{t} (")))
                    && l.contains("requests per second")
            }),
            "no result for {t}: {stdout}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_benchmark_runs_without_errors_with_and_without_pipelining() {
    let cluster = Cluster::start_with_redis(3, &[]).await;
    let leader = cluster.wait_for_leader(T).await;
    benchmark(&cluster, leader, 1).await;
    benchmark(&cluster, leader, 16).await;
    // Every INCR counted once: the counter key holds 2 × n.
    let addr = cluster.redis_addr(leader).to_string();
    let n: u64 = bench_n().parse().unwrap();
    let counter = blocking(move || {
        let mut c = connect(&addr);
        redis::cmd("GET")
            .arg("counter:__rand_int__")
            .query::<u64>(&mut c)
            .unwrap()
    })
    .await;
    if counter != 2 * n {
        // Seen once, under heavy load, not reproduced since: what the
        // replicas say of sessions, deduplicated retries and leaders.
        let statuses: Vec<String> = cluster
            .statuses()
            .await
            .into_iter()
            .map(|(id, s)| match s {
                Some(s) => format!(
                    "replica {id}: leader {:?}, ballot round {}, applied {}, sessions {}, \
                     duplicate writes {}",
                    s.leader_id, s.ballot_round, s.applied, s.sessions, s.duplicate_writes
                ),
                None => format!("replica {id}: no answer"),
            })
            .collect();
        let logs: Vec<String> = cluster
            .ids()
            .into_iter()
            .map(|id| cluster.log_tail(id, 20))
            .collect();
        panic!(
            "every INCR counted once: the counter holds {counter}, not {}\n{}\n{}",
            2 * n,
            statuses.join("\n"),
            logs.join("\n")
        );
    }
}

fn connect(addr: &str) -> redis::Connection {
    let client = redis::Client::open(format!("redis://{addr}/")).expect("a client");
    client
        .get_connection_with_timeout(Duration::from_secs(5))
        .expect("connect")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_redis_crate_pipelines_transactions_and_watches() {
    let cluster = Cluster::start_with_redis(3, &[]).await;
    let a = cluster.redis_addr(1).to_string();
    let b = cluster.redis_addr(3).to_string();
    blocking(move || {
        let mut c = connect(&a);
        let mut other = connect(&b);
        // A pipeline: answers in order.
        let (x, y, z): (String, i64, Option<String>) = redis::pipe()
            .cmd("SET")
            .arg("pk")
            .arg("v")
            .cmd("INCRBY")
            .arg("pn")
            .arg(5)
            .cmd("GET")
            .arg("nothing")
            .query(&mut c)
            .unwrap();
        assert_eq!((x.as_str(), y, z), ("OK", 5, None));
        // An atomic pipeline is MULTI/EXEC.
        let (n, v): (i64, String) = redis::pipe()
            .atomic()
            .cmd("INCR")
            .arg("pn")
            .cmd("GET")
            .arg("pk")
            .query(&mut c)
            .unwrap();
        assert_eq!((n, v.as_str()), (6, "v"));
        // WATCH without a conflict: EXEC applies.
        redis::cmd("WATCH")
            .arg("balance")
            .query::<()>(&mut c)
            .unwrap();
        let bal: Option<i64> = redis::cmd("GET").arg("balance").query(&mut c).unwrap();
        assert_eq!(bal, None);
        let r: Option<(String,)> = redis::pipe()
            .atomic()
            .cmd("SET")
            .arg("balance")
            .arg(100)
            .query(&mut c)
            .unwrap();
        assert_eq!(r, Some(("OK".into(),)));
        // WATCH, then another client writes the key: EXEC answers nil and
        // nothing of the transaction is applied.
        redis::cmd("WATCH")
            .arg("balance")
            .query::<()>(&mut c)
            .unwrap();
        redis::cmd("SET")
            .arg("balance")
            .arg(50)
            .query::<()>(&mut other)
            .unwrap();
        let r: Option<(String, String)> = redis::pipe()
            .atomic()
            .cmd("SET")
            .arg("balance")
            .arg(0)
            .cmd("SET")
            .arg("side")
            .arg("effect")
            .query(&mut c)
            .unwrap();
        assert_eq!(r, None, "EXEC after a watched key changed must answer nil");
        let bal: i64 = redis::cmd("GET").arg("balance").query(&mut c).unwrap();
        let side: Option<String> = redis::cmd("GET").arg("side").query(&mut c).unwrap();
        assert_eq!((bal, side), (50, None));
        // The optimistic-locking loop Redis users write: two clients add
        // to one balance, each retrying on conflict; nothing is lost.
        let threads: Vec<_> = [a.clone(), b.clone()]
            .into_iter()
            .map(|addr| {
                std::thread::spawn(move || {
                    let mut c = connect(&addr);
                    for _ in 0..20 {
                        loop {
                            redis::cmd("WATCH")
                                .arg("balance")
                                .query::<()>(&mut c)
                                .unwrap();
                            let bal: i64 = redis::cmd("GET").arg("balance").query(&mut c).unwrap();
                            let r: Option<(String,)> = redis::pipe()
                                .atomic()
                                .cmd("SET")
                                .arg("balance")
                                .arg(bal + 1)
                                .query(&mut c)
                                .unwrap();
                            if r.is_some() {
                                break;
                            }
                        }
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let bal: i64 = redis::cmd("GET").arg("balance").query(&mut c).unwrap();
        assert_eq!(bal, 90);
        // DISCARD drops the queue; an arity error inside MULTI aborts EXEC.
        redis::cmd("MULTI").query::<()>(&mut c).unwrap();
        redis::cmd("SET")
            .arg("gone")
            .arg(1)
            .query::<()>(&mut c)
            .unwrap();
        redis::cmd("DISCARD").query::<()>(&mut c).unwrap();
        redis::cmd("MULTI").query::<()>(&mut c).unwrap();
        assert!(redis::cmd("GET").query::<()>(&mut c).is_err());
        let e = redis::cmd("EXEC").query::<()>(&mut c).unwrap_err();
        assert!(e.to_string().to_uppercase().contains("EXECABORT"), "{e}");
        let gone: Option<String> = redis::cmd("GET").arg("gone").query(&mut c).unwrap();
        assert_eq!(gone, None);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn set_with_ex_expires_through_the_log() {
    let cluster = Cluster::start_with_redis(3, &[]).await;
    let addr = cluster.redis_addr(2).to_string();
    let a = addr.clone();
    blocking(move || {
        let mut c = connect(&a);
        redis::cmd("SET")
            .arg("short")
            .arg("v")
            .arg("EX")
            .arg(1)
            .query::<()>(&mut c)
            .unwrap();
        redis::cmd("SET")
            .arg("long")
            .arg("v")
            .arg("EX")
            .arg(100)
            .query::<()>(&mut c)
            .unwrap();
        redis::cmd("SET")
            .arg("px")
            .arg("v")
            .arg("PX")
            .arg(1500)
            .query::<()>(&mut c)
            .unwrap();
        let ttl: i64 = redis::cmd("TTL").arg("long").query(&mut c).unwrap();
        assert!((99..=100).contains(&ttl), "{ttl}");
        let pttl: i64 = redis::cmd("PTTL").arg("px").query(&mut c).unwrap();
        assert!((0..=1500).contains(&pttl), "{pttl}");
        redis::cmd("SET")
            .arg("e")
            .arg("v")
            .query::<()>(&mut c)
            .unwrap();
        let set: i64 = redis::cmd("EXPIRE").arg("e").arg(1).query(&mut c).unwrap();
        assert_eq!(set, 1);
    })
    .await;
    // Gone once the log's clock passes their leases' ends (a few seconds).
    wait_for(Duration::from_secs(15), "the short keys to expire", || {
        let addr = addr.clone();
        async move {
            tokio::task::spawn_blocking(move || {
                let mut c = connect(&addr);
                let n: i64 = redis::cmd("EXISTS")
                    .arg("short")
                    .arg("px")
                    .arg("e")
                    .query(&mut c)
                    .unwrap();
                (n == 0).then_some(())
            })
            .await
            .unwrap()
        }
    })
    .await;
    let a = cluster.redis_addr(1).to_string();
    blocking(move || {
        let mut c = connect(&a);
        let v: Option<String> = redis::cmd("GET").arg("long").query(&mut c).unwrap();
        assert_eq!(v.as_deref(), Some("v"));
        let ttl: i64 = redis::cmd("TTL").arg("short").query(&mut c).unwrap();
        assert_eq!(ttl, -2);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_reconnects_to_another_replica_after_a_sigkill_and_loses_nothing() {
    let mut cluster = Cluster::start_with_redis(5, &[]).await;
    let leader = cluster.wait_for_leader(T).await;
    let used = cluster.redis_addr(leader).to_string();
    let other = cluster
        .ids()
        .into_iter()
        .find(|&i| i != leader)
        .map(|i| cluster.redis_addr(i).to_string())
        .unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let (killed_tx, killed_rx) = std::sync::mpsc::channel::<()>();
    let writer = tokio::task::spawn_blocking(move || {
        let mut c = connect(&used);
        for i in 0..50 {
            redis::cmd("SET")
                .arg(format!("r{i}"))
                .arg(i)
                .query::<()>(&mut c)
                .unwrap();
        }
        tx.send(()).unwrap();
        killed_rx.recv().unwrap();
        // The replica is gone: the connection fails, as any Redis
        // client sees a dead server.
        assert!(redis::cmd("GET")
            .arg("r0")
            .query::<Option<String>>(&mut c)
            .is_err());
        // Reconnect elsewhere: every acknowledged write is there, and
        // writes go on (through the new leader).
        let mut c = connect(&other);
        for i in 0..50 {
            let v: Option<i64> = redis::cmd("GET")
                .arg(format!("r{i}"))
                .query(&mut c)
                .unwrap();
            assert_eq!(v, Some(i), "r{i}");
        }
        let n: i64 = redis::cmd("INCR").arg("after").query(&mut c).unwrap();
        assert_eq!(n, 1);
    });
    bounded(T, "the first writes", async {
        tokio::task::spawn_blocking(move || rx.recv().unwrap())
            .await
            .unwrap()
    })
    .await;
    cluster.kill(leader);
    killed_tx.send(()).unwrap();
    bounded(Duration::from_secs(60), "the reconnected client", writer)
        .await
        .expect("the client thread");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn incr_counts_each_acknowledged_increment_once_across_a_leader_kill() {
    let mut cluster = Cluster::start_with_redis(5, &[]).await;
    let leader = cluster.wait_for_leader(T).await;
    let addrs: Vec<String> = cluster
        .ids()
        .iter()
        .map(|&i| cluster.redis_addr(i).to_string())
        .collect();
    let leader_addr = cluster.redis_addr(leader).to_string();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    // Clients on the four followers: the leader's death is, to them, a
    // leader change their replica rides out (retrying with the same
    // sequence numbers).
    let workers: Vec<_> = addrs
        .into_iter()
        .filter(|a| *a != leader_addr)
        .map(|addr| {
            let stop = stop.clone();
            tokio::task::spawn_blocking(move || {
                let mut c = connect(&addr);
                let (mut ok, mut failed) = (0u64, 0u64);
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    match redis::cmd("INCR").arg("hits").query::<i64>(&mut c) {
                        Ok(_) => ok += 1,
                        Err(_) => failed += 1,
                    }
                }
                (ok, failed)
            })
        })
        .collect();
    let count = |addr: String| async move {
        tokio::task::spawn_blocking(move || {
            let mut c = connect(&addr);
            redis::cmd("GET")
                .arg("hits")
                .query::<Option<u64>>(&mut c)
                .unwrap()
                .unwrap_or(0)
        })
        .await
        .unwrap()
    };
    let some_follower = cluster
        .ids()
        .into_iter()
        .find(|&i| i != leader)
        .map(|i| cluster.redis_addr(i).to_string())
        .unwrap();
    wait_for(T, "some increments", || {
        let a = some_follower.clone();
        async move { (count(a).await >= 100).then_some(()) }
    })
    .await;
    cluster.kill(leader);
    let new_leader = wait_for(T, "a new leader", || async {
        cluster.leader().await.filter(|&l| l != leader)
    })
    .await;
    let at = count(cluster.redis_addr(new_leader).to_string()).await;
    wait_for(T, "increments under the new leader", || {
        let a = cluster.redis_addr(new_leader).to_string();
        async move { (count(a).await >= at + 100).then_some(()) }
    })
    .await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (mut ok, mut failed) = (0, 0);
    for w in workers {
        let (o, f) = bounded(T, "a worker", w).await.unwrap();
        ok += o;
        failed += f;
    }
    let total = count(cluster.redis_addr(new_leader).to_string()).await;
    assert!(
        total >= ok && total <= ok + failed,
        "{total} increments applied; {ok} acknowledged, {failed} failed"
    );
    assert_eq!(failed, 0, "the door retries through a leader change");
    assert_eq!(total, ok);
}
