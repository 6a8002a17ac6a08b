//! The SDK configured from the environment against a real TLS cluster:
//! `KV_REPLICAS` (a replica file, or a list of addresses) and `KV_TLS_CA`,
//! `KV_TLS_CERT`, `KV_TLS_KEY` reach the replicas with the identity they
//! name (a reader may read but not write), and without the TLS variables
//! the client speaks plain TCP, which a TLS cluster refuses.
//!
//! One test in its own binary: it sets the process's environment, which
//! nothing else here may read at the same time.

use std::time::Duration;

use kv_client::{
    Client, ClientBuilder, Error, ENV_REPLICAS, ENV_TLS_CA, ENV_TLS_CERT, ENV_TLS_KEY,
};
use kv_tests::{bounded, tls_files, Cluster};

/// Points the `KV_TLS_*` variables at identity `name` of `dir`, or removes
/// them.
fn set_tls(dir: Option<&std::path::Path>, name: &str) {
    match dir {
        Some(dir) => {
            let f = tls_files(dir, name);
            std::env::set_var(ENV_TLS_CA, f.ca);
            std::env::set_var(ENV_TLS_CERT, f.cert);
            std::env::set_var(ENV_TLS_KEY, f.key);
        }
        None => {
            for v in [ENV_TLS_CA, ENV_TLS_CERT, ENV_TLS_KEY] {
                std::env::remove_var(v);
            }
        }
    }
}

#[tokio::test]
async fn kv_replicas_and_kv_tls_configure_the_sdk() {
    let cluster = Cluster::start_tls(3, &[]).await;
    let tls = cluster.tls_dir().expect("a TLS cluster").to_path_buf();
    let test = async {
        // A replica file and the writer's identity.
        std::env::set_var(ENV_REPLICAS, cluster.replicas_file());
        set_tls(Some(&tls), "writer");
        let writer = Client::from_env().expect("configured from the environment");
        writer.put("env", "set").await.expect("the writer writes");
        assert_eq!(writer.get("env").await.unwrap(), Some(b"set".to_vec()));

        // Addresses, and the reader's identity: it reads, it may not write.
        let addrs: Vec<String> = (1..=3)
            .map(|id| cluster.client_addr(id).to_string())
            .collect();
        std::env::set_var(ENV_REPLICAS, addrs.join(","));
        set_tls(Some(&tls), "reader");
        let reader = Client::from_env().expect("configured from the environment");
        assert_eq!(reader.addrs(), addrs);
        assert_eq!(reader.get("env").await.unwrap(), Some(b"set".to_vec()));
        let e = reader.put("env", "no").await.unwrap_err();
        assert!(matches!(e, Error::PermissionDenied(_)), "{e}");

        // No TLS variables: plain TCP, which the cluster does not serve.
        set_tls(None, "");
        let plain = ClientBuilder::from_env()
            .expect("configured from the environment")
            .timeout(Duration::from_secs(1))
            .build()
            .unwrap();
        let e = plain.get("env").await.unwrap_err();
        assert!(
            matches!(e, Error::Unavailable(_) | Error::Timeout(_)),
            "a plain client of a TLS cluster: {e}"
        );
    };
    bounded(Duration::from_secs(60), "the test", test).await;
}
