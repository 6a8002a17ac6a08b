//! The deployment files in `deploy/` checked as far as this machine can
//! without Docker or Kubernetes: every `kv-server` flag they use exists in
//! `kv-server --help`; the YAML parses and names consistent ports, names
//! and counts; the replica files they carry are accepted by the parser
//! (and by `kv-server certs`); and a replica whose peers' names do not
//! resolve yet (a pod not scheduled) starts and serves with the others.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use kv_api::replicas::Replicas;
use kv_tests::{bin_path, free_ports, run_bin, temp_dir, wait_for, wait_until};
use serde_norway::Value;

const CLIENT_PORT: u16 = 7001;
const PEER_PORT: u16 = 7101;
const ADMIN_PORT: u16 = 7201;

fn deploy(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy")
        .join(path)
}

fn read(path: &str) -> String {
    let p = deploy(path);
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

fn yaml_docs(path: &str) -> Vec<Value> {
    let text = read(path);
    serde_norway::Deserializer::from_str(&text)
        .map(|doc| {
            serde::Deserialize::deserialize(doc)
                .unwrap_or_else(|e| panic!("deploy/{path} does not parse: {e}"))
        })
        .collect()
}

fn str_of(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Number(n) => n.to_string(),
        other => panic!("not a string: {other:?}"),
    }
}

fn strings(v: &Value) -> Vec<String> {
    v.as_sequence()
        .unwrap_or_else(|| panic!("not a list: {v:?}"))
        .iter()
        .map(str_of)
        .collect()
}

/// The `--flags` among `args`.
fn flags(args: &[String]) -> BTreeSet<String> {
    args.iter()
        .filter(|a| a.starts_with("--"))
        .map(|a| a.split('=').next().unwrap_or(a).to_string())
        .collect()
}

/// The words after `kv-server` in a shell command line.
fn after_kv_server(line: &str) -> Vec<String> {
    let words: Vec<&str> = line.split_whitespace().collect();
    let at = words
        .iter()
        .position(|w| w.ends_with("kv-server"))
        .unwrap_or_else(|| panic!("no kv-server in {line:?}"));
    words[at + 1..]
        .iter()
        .map(|w| w.trim_matches('"').to_string())
        .collect()
}

/// The value after `flag` in `args`.
fn arg_of(args: &[String], flag: &str) -> Option<String> {
    let i = args.iter().position(|a| a == flag)?;
    args.get(i + 1).cloned()
}

fn port_of(addr: &str) -> u16 {
    addr.rsplit_once(':')
        .and_then(|(_, p)| p.parse().ok())
        .unwrap_or_else(|| panic!("no port in {addr:?}"))
}

/// The Dockerfile's ENTRYPOINT (a JSON array), without `kv-server`.
fn entrypoint() -> Vec<String> {
    let text = read("Dockerfile");
    let line = text
        .lines()
        .find(|l| l.starts_with("ENTRYPOINT "))
        .expect("an ENTRYPOINT");
    let args: Vec<String> =
        serde_json::from_str(line.trim_start_matches("ENTRYPOINT ")).expect("exec form");
    assert_eq!(args[0], "kv-server");
    args[1..].to_vec()
}

/// The compose services, each with the arguments its container's
/// `kv-server` gets (the image's entrypoint, then `command`).
fn compose_services() -> Vec<(String, Vec<String>, Value)> {
    let docs = yaml_docs("compose/compose.yaml");
    assert_eq!(docs.len(), 1);
    let services = docs[0]["services"].as_mapping().expect("services");
    services
        .iter()
        .map(|(name, svc)| {
            let mut args = entrypoint();
            args.extend(strings(&svc["command"]));
            (str_of(name), args, svc.clone())
        })
        .collect()
}

/// The Kubernetes documents, by kind.
fn k8s(kind: &str) -> Value {
    let docs = yaml_docs("k8s/kvpaxos.yaml");
    let mut found: Vec<Value> = docs
        .into_iter()
        .filter(|d| d["kind"].as_str() == Some(kind))
        .collect();
    assert_eq!(found.len(), 1, "one {kind} in deploy/k8s/kvpaxos.yaml");
    found.remove(0)
}

/// The StatefulSet container's `kv-server` arguments.
fn k8s_args() -> Vec<String> {
    let sts = k8s("StatefulSet");
    let command = strings(&sts["spec"]["template"]["spec"]["containers"][0]["command"]);
    assert_eq!(command[..2], ["/bin/sh", "-c"]);
    after_kv_server(&command[2])
}

/// The systemd unit's `ExecStart`, continuation lines joined.
fn systemd_args() -> Vec<String> {
    let text = read("systemd/kvpaxos@.service").replace("\\\n", " ");
    let line = text
        .lines()
        .find(|l| l.starts_with("ExecStart="))
        .expect("ExecStart");
    after_kv_server(line)
}

#[tokio::test]
async fn every_flag_the_deploy_files_give_kv_server_exists_in_its_help() {
    let (out, _) = run_bin(kv_tests::kv_server_cmd(["--help"]), Duration::from_secs(20))
        .await
        .expect("kv-server --help");
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout).to_string();
    let known: BTreeSet<String> = help
        .split(|c: char| c.is_whitespace() || c == ',' || c == '[' || c == ']')
        .filter(|w| w.starts_with("--"))
        .map(|w| w.split('=').next().unwrap().to_string())
        .collect();
    assert!(known.contains("--admin-addr") && known.contains("--log-format"));

    let mut invocations = vec![("Dockerfile".to_string(), entrypoint())];
    for (name, args, _) in compose_services() {
        invocations.push((format!("compose {name}"), args));
    }
    invocations.push(("k8s StatefulSet".into(), k8s_args()));
    invocations.push(("systemd unit".into(), systemd_args()));
    for (what, args) in &invocations {
        for flag in flags(args) {
            assert!(
                known.contains(&flag),
                "{what} uses {flag}, which `kv-server --help` does not list"
            );
        }
        if what != "Dockerfile" {
            for needed in ["--id", "--replicas", "--data-dir", "--admin-addr"] {
                assert!(args.iter().any(|a| a == needed), "{what} lacks {needed}");
            }
            let admin = arg_of(args, "--admin-addr").unwrap();
            assert_eq!(port_of(&admin), ADMIN_PORT, "{what}: {admin}");
            assert_eq!(
                arg_of(args, "--log-format").as_deref(),
                Some("json"),
                "{what}"
            );
            // TLS on every deployment beyond one machine: all three files.
            for tls in ["--tls-ca", "--tls-cert", "--tls-key"] {
                assert!(args.iter().any(|a| a == tls), "{what} lacks {tls}");
            }
        }
    }
}

#[test]
fn compose_file_parses_and_names_five_replicas_with_consistent_ports() {
    let services = compose_services();
    let replicas = Replicas::load(deploy("compose/replica")).expect("the compose replica file");
    assert_eq!(services.len(), 5);
    assert_eq!(replicas.replicas.len(), 5);
    for (name, args, svc) in &services {
        let id: u64 = arg_of(args, "--id").unwrap().parse().unwrap();
        assert_eq!(name, &format!("kvpaxos-{id}"));
        let r = replicas.get(id).expect("the service's id is in the file");
        assert_eq!(r.client_addr, format!("{name}:{CLIENT_PORT}"));
        assert_eq!(r.peer_addr, format!("{name}:{PEER_PORT}"));
        assert_eq!(
            arg_of(args, "--tls-cert").unwrap(),
            format!("/etc/kvpaxos/tls/replica-{id}.pem")
        );
        let expose: BTreeSet<u16> = strings(&svc["expose"])
            .iter()
            .map(|p| p.parse().unwrap())
            .collect();
        assert_eq!(expose, BTreeSet::from([CLIENT_PORT, PEER_PORT, ADMIN_PORT]));
        for published in svc["ports"].as_sequence().into_iter().flatten() {
            let target = port_of(&str_of(published));
            assert!(expose.contains(&target), "{name} publishes {target}");
        }
        let volumes = strings(&svc["volumes"]);
        assert!(volumes
            .iter()
            .any(|v| v.ends_with(":/etc/kvpaxos/replica:ro")));
        let data = volumes
            .iter()
            .find(|v| v.ends_with(":/var/lib/kvpaxos"))
            .expect("a data volume");
        let volume = data.split(':').next().unwrap();
        assert!(
            docs_volume_declared(volume),
            "{name}: volume {volume} is declared"
        );
    }
}

fn docs_volume_declared(name: &str) -> bool {
    let docs = yaml_docs("compose/compose.yaml");
    docs[0]["volumes"]
        .as_mapping()
        .is_some_and(|m| m.contains_key(name))
}

#[test]
fn kubernetes_manifests_parse_and_agree_on_names_ports_and_probes() {
    let svc = k8s("Service");
    let sts = k8s("StatefulSet");
    let pdb = k8s("PodDisruptionBudget");
    let cm = k8s("ConfigMap");
    let name = str_of(&svc["metadata"]["name"]);
    let ns = str_of(&svc["metadata"]["namespace"]);
    assert_eq!(str_of(&svc["spec"]["clusterIP"]), "None", "headless");
    assert_eq!(
        svc["spec"]["publishNotReadyAddresses"].as_bool(),
        Some(true)
    );
    let svc_ports: BTreeSet<u16> = svc["spec"]["ports"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|p| p["port"].as_u64().unwrap() as u16)
        .collect();
    assert_eq!(
        svc_ports,
        BTreeSet::from([CLIENT_PORT, PEER_PORT, ADMIN_PORT])
    );

    assert_eq!(str_of(&sts["spec"]["serviceName"]), name);
    let replicas_n = sts["spec"]["replicas"].as_u64().unwrap();
    let pod = &sts["spec"]["template"];
    let labels = &pod["metadata"]["labels"];
    assert_eq!(&sts["spec"]["selector"]["matchLabels"], labels);
    assert_eq!(&svc["spec"]["selector"], labels);
    assert_eq!(&pdb["spec"]["selector"]["matchLabels"], labels);
    assert_eq!(pdb["spec"]["maxUnavailable"].as_u64(), Some(1));

    let container = &pod["spec"]["containers"][0];
    let mut named = std::collections::BTreeMap::new();
    for p in container["ports"].as_sequence().unwrap() {
        named.insert(
            str_of(&p["name"]),
            p["containerPort"].as_u64().unwrap() as u16,
        );
    }
    assert_eq!(
        named.values().copied().collect::<BTreeSet<_>>(),
        svc_ports,
        "the container serves the Service's ports"
    );
    let readiness = &container["readinessProbe"]["httpGet"];
    assert_eq!(str_of(&readiness["path"]), "/readyz");
    assert_eq!(named[&str_of(&readiness["port"])], ADMIN_PORT);
    assert_eq!(
        str_of(&readiness["scheme"]),
        "HTTPS",
        "the admin port has TLS"
    );
    let liveness = &container["livenessProbe"]["httpGet"];
    assert_eq!(str_of(&liveness["path"]), "/livez");
    assert_eq!(named[&str_of(&liveness["port"])], ADMIN_PORT);
    assert_eq!(
        pod["spec"]["securityContext"]["runAsNonRoot"].as_bool(),
        Some(true)
    );

    // One volume each, mounted where --data-dir points.
    let claims = sts["spec"]["volumeClaimTemplates"].as_sequence().unwrap();
    assert_eq!(claims.len(), 1);
    let claim = str_of(&claims[0]["metadata"]["name"]);
    let mount = container["volumeMounts"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|m| str_of(&m["name"]) == claim)
        .map(|m| str_of(&m["mountPath"]))
        .expect("the claim is mounted");
    let args = k8s_args();
    assert!(arg_of(&args, "--data-dir").unwrap().starts_with(&mount));

    // The replica file: the ConfigMap's copy is deploy/k8s/replica, it
    // names every pod of the StatefulSet by its stable DNS name, on the
    // Service's ports.
    let text = str_of(&cm["data"]["replica"]);
    assert_eq!(text, read("k8s/replica"));
    let replicas = Replicas::parse(&text, "ConfigMap kvpaxos").expect("the ConfigMap's file");
    assert_eq!(replicas.replicas.len() as u64, replicas_n);
    for r in &replicas.replicas {
        let host = format!("{name}-{}.{name}.{ns}.svc.cluster.local", r.id - 1);
        assert_eq!(r.client_addr, format!("{host}:{CLIENT_PORT}"));
        assert_eq!(r.peer_addr, format!("{host}:{PEER_PORT}"));
    }
    assert_eq!(
        arg_of(&args, "--replicas").unwrap(),
        container["volumeMounts"]
            .as_sequence()
            .unwrap()
            .iter()
            .find(|m| str_of(&m["name"]) == "replica")
            .map(|m| str_of(&m["mountPath"]))
            .unwrap()
    );
}

#[test]
fn dockerfile_is_multi_stage_non_root_with_data_on_a_volume() {
    let text = read("Dockerfile");
    assert!(text.lines().filter(|l| l.starts_with("FROM ")).count() >= 2);
    let user = text
        .lines()
        .filter_map(|l| l.strip_prefix("USER "))
        .next_back()
        .expect("a USER");
    assert!(
        !user.starts_with("root") && !user.starts_with('0'),
        "{user}"
    );
    let volume = text
        .lines()
        .find_map(|l| l.strip_prefix("VOLUME "))
        .expect("a VOLUME");
    let volume: Vec<String> = serde_json::from_str(volume).unwrap();
    let args = entrypoint();
    assert!(arg_of(&args, "--data-dir").unwrap().starts_with(&volume[0]));
    let exposed: BTreeSet<u16> = text
        .lines()
        .find_map(|l| l.strip_prefix("EXPOSE "))
        .expect("EXPOSE")
        .split_whitespace()
        .map(|p| p.parse().unwrap())
        .collect();
    assert_eq!(
        exposed,
        BTreeSet::from([CLIENT_PORT, PEER_PORT, ADMIN_PORT])
    );
    assert_eq!(port_of(&arg_of(&args, "--admin-addr").unwrap()), ADMIN_PORT);
}

#[tokio::test]
async fn kv_server_certs_accepts_the_deploy_replica_files() {
    for file in ["compose/replica", "k8s/replica"] {
        let out_dir = temp_dir("deploy-certs").join("tls");
        let (out, _) = run_bin(
            kv_tests::kv_server_cmd([
                "certs".as_ref(),
                "--replicas".as_ref(),
                deploy(file).as_os_str(),
                "--out".as_ref(),
                out_dir.as_os_str(),
            ]),
            Duration::from_secs(30),
        )
        .await
        .expect("kv-server certs");
        assert!(out.status.success(), "{}", kv_tests::describe(&out));
        for id in 1..=5 {
            assert!(out_dir.join(format!("replica-{id}.pem")).exists());
        }
        let _ = std::fs::remove_dir_all(out_dir.parent().unwrap());
    }
}

/// Replica processes killed (and reaped) when dropped.
struct Procs(Vec<Child>);

impl Drop for Procs {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Starts replica `id` of `file` with its data in `dir`, logging there.
fn start(dir: &Path, file: &Path, id: u64, extra: &[String]) -> Child {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join(format!("replica-{id}.log")))
        .unwrap();
    Command::new(bin_path("kv-server"))
        .arg("--id")
        .arg(id.to_string())
        .arg("--replicas")
        .arg(file)
        .arg("--data-dir")
        .arg(dir.join(format!("data-{id}")))
        .args(extra)
        .arg("--exit-on-stdin-eof")
        .stdin(Stdio::piped())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .expect("start kv-server")
}

fn client_for(addrs: Vec<String>) -> kv_client::Client {
    kv_client::Client::builder()
        .addrs(addrs)
        .timeout(Duration::from_secs(2))
        .build()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_whose_peer_name_does_not_resolve_start_serve_and_keep_dialling() {
    let dir = temp_dir("late-dns");
    let p = free_ports(8);
    let file = dir.join("replica");
    let line = |id: usize| {
        format!(
            "{id} 127.0.0.1:{} 127.0.0.1:{}\n",
            p[2 * id - 2],
            p[2 * id - 1]
        )
    };
    // A new cluster starts once every replica has been up (see the README:
    // an empty replica cannot tell a new cluster from a lost disk), so the
    // cluster is made on loopback first.
    std::fs::write(&file, format!("{}{}{}", line(1), line(2), line(3))).unwrap();
    let mut procs = Procs((1..=3).map(|id| start(&dir, &file, id, &[])).collect());
    let addrs = vec![format!("127.0.0.1:{}", p[0]), format!("127.0.0.1:{}", p[2])];
    let client = client_for(addrs.clone());
    wait_for(Duration::from_secs(30), "a write acknowledged", || {
        let client = client.clone();
        async move { client.put("k", "before").await.ok() }
    })
    .await;
    drop(procs);

    // Now replica 3 is a name in a domain that never resolves (RFC 2606),
    // as a pod not scheduled yet would not: 1 and 2 must start anyway,
    // serve as a majority, and keep dialling 3.
    std::fs::write(
        &file,
        format!(
            "{}{}3 kvpaxos-late.invalid:7001 kvpaxos-late.invalid:7101\n",
            line(1),
            line(2)
        ),
    )
    .unwrap();
    let admins = [format!("127.0.0.1:{}", p[6]), format!("127.0.0.1:{}", p[7])];
    procs = Procs(vec![
        start(&dir, &file, 1, &["--admin-addr".into(), admins[0].clone()]),
        start(&dir, &file, 2, &["--admin-addr".into(), admins[1].clone()]),
    ]);
    let client = client_for(addrs);
    wait_for(Duration::from_secs(30), "a write acknowledged", || {
        let client = client.clone();
        async move { client.put("k", "after").await.ok() }
    })
    .await;
    assert_eq!(
        client.get("k").await.expect("get").as_deref(),
        Some(&b"after"[..])
    );
    let unreachable = r#"kvpaxos_peer_rpc_errors_total{peer="3",kind="unreachable"}"#;
    // Failed dials of 3, summed over 1 and 2 (the leader sends to it).
    let dials = || {
        let admins = admins.clone();
        async move {
            let mut n = 0.0;
            for admin in &admins {
                let body = kv_tests::http_get(admin, "/metrics").await.1;
                n += body
                    .lines()
                    .find_map(|l| l.strip_prefix(unreachable))
                    .and_then(|v| v.trim().parse::<f64>().ok())
                    .unwrap_or(0.0);
            }
            n
        }
    };
    let first = dials().await;
    wait_until(
        Duration::from_secs(10),
        "1 and 2 still dialling 3",
        || async move { dials().await > first },
    )
    .await;
    for (i, c) in procs.0.iter_mut().enumerate() {
        let log =
            std::fs::read_to_string(dir.join(format!("replica-{}.log", i + 1))).unwrap_or_default();
        assert!(
            c.try_wait().unwrap().is_none(),
            "replica {} exited: {log}",
            i + 1
        );
    }
    drop(procs);
    let _ = std::fs::remove_dir_all(&dir);
}
