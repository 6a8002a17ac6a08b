//! The admin HTTP listener (`kv-server --admin-addr`): `/metrics` parses
//! as Prometheus text and its counters move with load; `/readyz` turns 503
//! on a replica cut off from the others and 200 again after the heal;
//! `/livez` and `/status` answer; garbage is refused without harm; with
//! TLS, `/metrics` needs the admin role and the probes need no certificate.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use kv_api::FaultSpec;
use kv_tests::{http_exchange, http_get, parse_http_response, wait_for, wait_until, Cluster};

/// Samples of an OpenMetrics/Prometheus text exposition, `name{labels}`
/// → value. Panics, naming the line, on anything that is not valid: a
/// sample whose family has no `# TYPE`, bad labels, a value that is not a
/// number, a missing `# EOF`.
fn parse_metrics(text: &str) -> BTreeMap<String, f64> {
    assert!(text.ends_with("# EOF\n"), "no # EOF at the end");
    let mut families = BTreeSet::new();
    let mut samples = BTreeMap::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut parts = rest.split(' ');
            let (Some(name), Some(kind), None) = (parts.next(), parts.next(), parts.next()) else {
                panic!("bad TYPE line: {line}");
            };
            assert!(
                [
                    "counter",
                    "gauge",
                    "histogram",
                    "summary",
                    "unknown",
                    "info"
                ]
                .contains(&kind),
                "{line}"
            );
            families.insert(name.to_string());
            continue;
        }
        if line.starts_with('#') {
            continue;
        }
        let (series, value) = line
            .rsplit_once(' ')
            .unwrap_or_else(|| panic!("no value: {line}"));
        let value: f64 = match value {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            v => v.parse().unwrap_or_else(|_| panic!("bad value: {line}")),
        };
        let name = match series.split_once('{') {
            None => series,
            Some((name, labels)) => {
                let labels = labels
                    .strip_suffix('}')
                    .unwrap_or_else(|| panic!("unclosed labels: {line}"));
                for pair in labels.split(',') {
                    let (k, v) = pair
                        .split_once('=')
                        .unwrap_or_else(|| panic!("bad label {pair:?}: {line}"));
                    assert!(
                        !k.is_empty() && k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'),
                        "bad label name: {line}"
                    );
                    assert!(
                        v.len() >= 2 && v.starts_with('"') && v.ends_with('"'),
                        "bad label value: {line}"
                    );
                }
                name
            }
        };
        assert!(name.starts_with("kvpaxos_"), "{line}");
        let family = ["_total", "_bucket", "_sum", "_count", "_created", ""]
            .iter()
            .find_map(|suffix| {
                name.strip_suffix(suffix)
                    .filter(|base| families.contains(*base))
            });
        assert!(family.is_some(), "a sample of no declared family: {line}");
        samples.insert(series.to_string(), value);
    }
    samples
}

async fn metrics(addr: &str) -> BTreeMap<String, f64> {
    let (code, body) = http_get(addr, "/metrics").await;
    assert_eq!(code, 200, "{body}");
    parse_metrics(&body)
}

fn value(samples: &BTreeMap<String, f64>, series: &str) -> f64 {
    *samples
        .get(series)
        .unwrap_or_else(|| panic!("no {series} among {:?}", samples.keys()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_parse_as_prometheus_text_and_counters_move_with_load() {
    let cluster = Cluster::start_with_admin(3, &[], false).await;
    let ids = cluster.ids();
    let put_ok = r#"kvpaxos_client_requests_total{op="put",outcome="ok"}"#;
    let syncs = "kvpaxos_log_sync_duration_seconds_count";
    let mut before = BTreeMap::new();
    for &id in &ids {
        before.insert(id, metrics(cluster.admin_addr(id)).await);
    }
    let client = cluster.client();
    const PUTS: usize = 60;
    for i in 0..PUTS {
        client
            .put(format!("k{i}").into_bytes(), b"v".to_vec())
            .await
            .expect("put");
    }
    // The SDK sends its writes to the leader: the sum over the replicas
    // counts every put once.
    let mut puts = 0.0;
    for &id in &ids {
        let now = metrics(cluster.admin_addr(id)).await;
        puts += value(&now, put_ok) - value(&before[&id], put_ok);
        assert!(
            value(
                &now,
                "kvpaxos_client_request_duration_seconds_count{op=\"put\"}"
            ) >= value(&now, put_ok),
            "every counted put is timed"
        );
    }
    assert!(puts >= PUTS as f64, "{puts} puts counted, {PUTS} made");
    // Every replica syncs what it accepts and applies it.
    for &id in &ids {
        let addr = cluster.admin_addr(id).to_string();
        let old = before[&id].clone();
        wait_until(
            Duration::from_secs(10),
            "followers' metrics to move",
            || {
                let addr = addr.clone();
                let old = old.clone();
                async move {
                    let now = metrics(&addr).await;
                    value(&now, syncs) > value(&old, syncs)
                        && value(&now, "kvpaxos_applied_index")
                            >= value(&old, "kvpaxos_applied_index") + 1.0
                        && value(&now, "kvpaxos_keys") >= PUTS as f64
                }
            },
        )
        .await;
    }
    let leader = cluster.wait_for_leader(Duration::from_secs(10)).await;
    let on_leader = metrics(cluster.admin_addr(leader)).await;
    assert_eq!(value(&on_leader, "kvpaxos_is_leader"), 1.0);
    assert_eq!(value(&on_leader, "kvpaxos_leader_id"), leader as f64);
    assert!(value(&on_leader, "kvpaxos_proposals_total{outcome=\"accepted\"}") >= PUTS as f64);
    assert!(value(&on_leader, "kvpaxos_applied_batches_total") >= 1.0);
    assert!(value(&on_leader, "kvpaxos_elections_started_total") >= 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_turns_503_on_an_isolated_replica_and_200_after_heal() {
    let cluster = Cluster::start_with_admin(3, &[], false).await;
    let leader = cluster.wait_for_leader(Duration::from_secs(10)).await;
    let follower = *cluster.ids().iter().find(|&&id| id != leader).unwrap();
    for id in cluster.ids() {
        let addr = cluster.admin_addr(id).to_string();
        wait_for(Duration::from_secs(10), "every replica ready", || {
            let addr = addr.clone();
            async move { (http_get(&addr, "/readyz").await.0 == 200).then_some(()) }
        })
        .await;
        let (code, body) = http_get(&addr, "/livez").await;
        assert_eq!(code, 200, "{body}");
    }

    let others: Vec<u64> = cluster
        .ids()
        .into_iter()
        .filter(|&id| id != follower)
        .collect();
    cluster
        .set_faults(
            follower,
            FaultSpec {
                isolate: Some(others),
                ..Default::default()
            },
        )
        .await;
    let addr = cluster.admin_addr(follower).to_string();
    let why = wait_for(
        Duration::from_secs(10),
        "the isolated replica unready",
        || {
            let addr = addr.clone();
            async move {
                let (code, body) = http_get(&addr, "/readyz").await;
                (code == 503).then_some(body)
            }
        },
    )
    .await;
    assert!(
        why.contains("not been heard") || why.contains("no leader"),
        "the reason: {why}"
    );
    // Cut off, it still lives.
    assert_eq!(http_get(&addr, "/livez").await.0, 200);
    // The others keep a leader and stay ready.
    let leader_addr = cluster.admin_addr(leader).to_string();
    assert_eq!(http_get(&leader_addr, "/readyz").await.0, 200);

    cluster
        .set_faults(
            follower,
            FaultSpec {
                heal: true,
                ..Default::default()
            },
        )
        .await;
    wait_until(Duration::from_secs(15), "the healed replica ready", || {
        let addr = addr.clone();
        async move { http_get(&addr, "/readyz").await.0 == 200 }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_and_probes_answer_and_garbage_is_refused_without_harm() {
    let cluster = Cluster::start_with_admin(3, &[], false).await;
    let id = cluster.ids()[1];
    let addr = cluster.admin_addr(id).to_string();

    let (code, body) = http_get(&addr, "/status").await;
    assert_eq!(code, 200, "{body}");
    let status: serde_json::Value = serde_json::from_str(&body).expect("JSON");
    assert_eq!(status["id"], id);
    assert_eq!(status["up"], true);
    assert_eq!(status["addr"], cluster.client_addr(id));
    assert_eq!(status["standing"], "voter");

    assert_eq!(http_get(&addr, "/nothing-here").await.0, 404);
    let answer = |raw: Vec<u8>| parse_http_response(&raw).0;
    assert_eq!(
        answer(http_exchange(&addr, b"POST /metrics HTTP/1.1\r\n\r\n").await),
        405
    );
    assert_eq!(
        answer(http_exchange(&addr, b"\x00\xff garbage\r\n\r\n").await),
        400
    );
    let mut huge = b"GET /metrics HTTP/1.1\r\n".to_vec();
    huge.extend(std::iter::repeat_n(b'x', 20_000));
    assert_eq!(answer(http_exchange(&addr, &huge).await), 431);
    // A client that sends half a request and closes gets nothing, and the
    // listener goes on.
    let half = http_exchange(&addr, b"GET /met").await;
    assert!(
        half.is_empty() || half.starts_with(b"HTTP/1.1 400"),
        "{half:?}"
    );
    assert_eq!(http_get(&addr, "/livez").await.0, 200);
}

/// A TLS client configuration trusting `ca.pem`, presenting `identity`
/// (`admin`, `reader`, ...) or no certificate.
fn tls_client(dir: &std::path::Path, identity: Option<&str>) -> Arc<rustls::ClientConfig> {
    match identity {
        Some(name) => kv_api::tls::Tls::load(&kv_tests::tls_files(dir, name))
            .and_then(|t| t.client_config())
            .expect("load the identity"),
        None => {
            use rustls::pki_types::pem::PemObject;
            let mut roots = rustls::RootCertStore::empty();
            for ca in rustls::pki_types::CertificateDer::pem_file_iter(dir.join("ca.pem")).unwrap()
            {
                roots.add(ca.unwrap()).unwrap();
            }
            let config = rustls::ClientConfig::builder_with_provider(Arc::new(
                rustls::crypto::ring::default_provider(),
            ))
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
            Arc::new(config)
        }
    }
}

async fn https_get(addr: &str, config: Arc<rustls::ClientConfig>, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    kv_tests::bounded(Duration::from_secs(10), "an HTTPS exchange", async {
        let name = kv_api::tls::server_name_of(addr).unwrap();
        let mut s = kv_api::tls::dial(addr, Some((config, name)))
            .await
            .expect("TLS handshake");
        let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\n\r\n");
        s.write_all(request.as_bytes()).await.unwrap();
        let mut out = Vec::new();
        s.read_to_end(&mut out).await.expect("read the answer");
        parse_http_response(&out)
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_tls_metrics_need_the_admin_role_and_probes_no_certificate() {
    let cluster = Cluster::start_with_admin(3, &[], true).await;
    let dir = cluster.tls_dir().expect("TLS").to_path_buf();
    let addr = cluster.admin_addr(cluster.ids()[0]).to_string();

    let (code, body) = https_get(&addr, tls_client(&dir, Some("admin")), "/metrics").await;
    assert_eq!(code, 200, "{body}");
    parse_metrics(&body);
    let (code, body) = https_get(&addr, tls_client(&dir, Some("admin")), "/status").await;
    assert_eq!(code, 200, "{body}");

    let (code, body) = https_get(&addr, tls_client(&dir, Some("reader")), "/metrics").await;
    assert_eq!(code, 403, "{body}");
    assert!(body.contains("admin"), "{body}");
    let (code, _) = https_get(&addr, tls_client(&dir, None), "/status").await;
    assert_eq!(code, 403);

    wait_until(
        Duration::from_secs(10),
        "ready over TLS without a certificate",
        || {
            let addr = addr.clone();
            let config = tls_client(&dir, None);
            async move { https_get(&addr, config, "/readyz").await.0 == 200 }
        },
    )
    .await;
    let (code, _) = https_get(&addr, tls_client(&dir, None), "/livez").await;
    assert_eq!(code, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_log_lines_are_objects_carrying_the_replica_id() {
    let cluster = Cluster::start_with_args(3, &["--log-format", "json"]).await;
    cluster.client().put("k", "v").await.expect("put");
    for id in cluster.ids() {
        let text = cluster.log_text(id);
        let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
        assert!(!lines.is_empty(), "replica {id} logged nothing");
        for line in &lines {
            let v: serde_json::Value = serde_json::from_str(line)
                .unwrap_or_else(|e| panic!("replica {id}: not JSON ({e}): {line}"));
            assert_eq!(v["replica"], id, "{line}");
            assert!(v["ts"].as_str().is_some_and(|t| t.ends_with('Z')), "{line}");
            assert!(v["level"].is_string() && v["msg"].is_string(), "{line}");
        }
        assert!(
            lines
                .iter()
                .any(|l| l.contains("\"msg\":\"replica serving\"")),
            "replica {id}: {text}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn top_shows_every_replica_with_its_role_and_rates() {
    let cluster = Cluster::start_with_admin(3, &[], false).await;
    let leader = cluster.wait_for_leader(Duration::from_secs(10)).await;
    let admin: Vec<String> = cluster
        .ids()
        .iter()
        .map(|&id| cluster.admin_addr(id).to_string())
        .collect();
    let client = cluster.client();
    let load = tokio::spawn(async move {
        for i in 0..400 {
            let _ = client.put(format!("k{i}"), "v").await;
        }
    });
    let admin = admin.join(",");
    let out = cluster
        .cli(&[
            "top",
            "--iterations",
            "2",
            "--interval",
            "0.5",
            "--admin",
            &admin,
        ])
        .await;
    load.await.unwrap();
    assert!(out.status.success(), "{}", kv_tests::describe(&out));
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    // Two frames: a title, a header and a line per replica each.
    let frames: Vec<&str> = text.split(" kvpaxos: ").skip(1).collect();
    assert_eq!(frames.len(), 2, "{text}");
    let last: Vec<&str> = frames[1].lines().collect();
    assert!(last[0].contains(&format!("leader {leader}")), "{text}");
    assert!(
        last[1].contains("ops/s") && last[1].contains("p99"),
        "{text}"
    );
    for id in cluster.ids() {
        let line = last[2..]
            .iter()
            .find(|l| l.contains(cluster.client_addr(id)))
            .unwrap_or_else(|| panic!("no line for replica {id}: {text}"));
        let role = if id == leader { "leader" } else { "follower" };
        assert!(line.contains(role), "{line}");
        // The second frame has rates: columns after the lag are numbers.
        let cols: Vec<&str> = line.split_whitespace().collect();
        assert!(cols[5].parse::<f64>().is_ok(), "applied/s in {line}");
        assert!(cols[6].parse::<f64>().is_ok(), "ops/s in {line}");
    }
}
