//! Leases against real replicas: keys put with a lease go when it ends —
//! after its TTL by the log's clock, not before, even with a change of
//! leader in between — or at once when it is revoked; the CLI's `lease`
//! commands and `put --lease`.

use std::time::{Duration, Instant};

use kv_tests::{bounded, describe, Cluster};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_holders_keys_go_after_the_ttl_not_before_with_a_leader_change_between() {
    const TTL: Duration = Duration::from_secs(3);
    let mut cluster = Cluster::start(5).await;
    let test = async {
        let out = cluster.cli_ok(&["lease", "grant", "3"]).await;
        let id: u64 = out.trim().parse().unwrap_or_else(|_| panic!("{out:?}"));
        cluster
            .cli_ok(&["put", "--lease", &id.to_string(), "holder", "me"])
            .await;
        let client = cluster.client();
        // The holder renews once more, then dies.
        assert_eq!(client.lease_keepalive(id).await.unwrap(), Some(TTL));
        let last_renewal = Instant::now();
        // The leader dies too, a second later.
        tokio::time::sleep(Duration::from_secs(1)).await;
        let leader = cluster.wait_for_leader(Duration::from_secs(10)).await;
        cluster.kill(leader);
        let reader = cluster.client();
        loop {
            let present = reader.get("holder").await;
            let elapsed = last_renewal.elapsed();
            match present {
                Ok(Some(_)) => assert!(
                    elapsed < TTL + Duration::from_secs(12),
                    "still there {elapsed:?} after the last renewal"
                ),
                Ok(None) => {
                    assert!(elapsed >= TTL, "gone after {elapsed:?}, before the TTL");
                    break;
                }
                Err(e) => assert!(elapsed < Duration::from_secs(30), "{e}"),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(client.lease_keepalive(id).await.unwrap(), None);
        let out = cluster
            .cli(&["lease", "keepalive", "--once", &id.to_string()])
            .await;
        assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    };
    bounded(Duration::from_secs(90), "the test", test).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoke_deletes_a_leases_keys_and_a_missing_lease_is_refused() {
    let cluster = Cluster::start(3).await;
    let test = async {
        let client = cluster.client();
        let id = client.lease_grant(Duration::from_secs(60)).await.unwrap();
        for k in ["a", "b"] {
            client.put_with_lease(k, "v", id).await.unwrap();
        }
        client.put("plain", "v").await.unwrap();
        assert_eq!(client.get_kv("a").await.unwrap().unwrap().lease, id);
        let out = cluster
            .cli_ok(&[
                "--output",
                "json",
                "lease",
                "keepalive",
                "--once",
                &id.to_string(),
            ])
            .await;
        assert!(out.contains("\"ttl_secs\":60"), "{out}");
        let out = cluster
            .cli_ok(&["--output", "json", "lease", "revoke", &id.to_string()])
            .await;
        assert!(out.contains("\"deleted\":2"), "{out}");
        assert_eq!(client.get("a").await.unwrap(), None);
        assert_eq!(client.get("b").await.unwrap(), None);
        assert!(client.get("plain").await.unwrap().is_some());
        // Writing to a lease that is gone, or never was: refused, exit 2.
        for lease in [id.to_string(), "12345".to_string()] {
            let out = cluster.cli(&["put", "--lease", &lease, "c", "v"]).await;
            assert_eq!(out.status.code(), Some(2), "{}", describe(&out));
            assert!(String::from_utf8_lossy(&out.stderr).contains("does not exist"));
        }
        assert_eq!(client.get("c").await.unwrap(), None);
        for bad in ["0", "0.5", "100000", "x"] {
            let out = cluster.cli(&["lease", "grant", bad]).await;
            assert_eq!(out.status.code(), Some(2), "{bad}: {}", describe(&out));
        }
    };
    bounded(Duration::from_secs(60), "the test", test).await;
}
