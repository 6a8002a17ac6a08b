//! Hostile bytes on a replica's ports: nothing a client or a peer sends may
//! panic a replica, close a port, or lose data.
//!
//! - `deadline_overflow_frame_leaves_both_ports_serving` — the 15 bytes of
//!   issue 10, item 1 (a request whose deadline is u64::MAX seconds), on the
//!   client and the peer port: the replica still answers on both and takes
//!   a write.

use std::time::Duration;

use kv_peer_api::{Fetch, PeerClient};
use kv_tests::{bounded, wire, Cluster};
use tokio::io::AsyncWriteExt;

/// Sends `bytes` on a fresh connection to `addr` and closes it.
async fn send_raw(addr: &str, bytes: &[u8]) {
    if let Ok(mut s) = tokio::net::TcpStream::connect(addr).await {
        // The replica may close the connection first: not a failure.
        let _ = s.write_all(bytes).await;
        let _ = s.flush().await;
    }
}

/// Whether the peer port at `addr` answers a real (read-only) peer request
/// on a new connection within a second.
async fn peer_port_answers(addr: &str) -> bool {
    let probe = async {
        let mut connect = tarpc::serde_transport::tcp::connect(
            addr,
            tarpc::tokio_serde::formats::Bincode::default,
        );
        connect.config_mut().max_frame_length(kv_api::MAX_FRAME);
        let transport = connect.await.ok()?;
        let client = PeerClient::new(tarpc::client::Config::default(), transport).spawn();
        let mut ctx = tarpc::context::current();
        ctx.deadline = std::time::Instant::now() + Duration::from_secs(1);
        let fetch = Fetch {
            from: 0,
            from_slot: 1,
            max_entries: 1,
        };
        client.fetch(ctx, fetch).await.ok()
    };
    matches!(
        tokio::time::timeout(Duration::from_secs(2), probe).await,
        Ok(Some(_))
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deadline_overflow_frame_leaves_both_ports_serving() {
    let mut cluster = Cluster::start(3).await;
    bounded(
        Duration::from_secs(90),
        "the deadline-overflow test",
        async {
            cluster
                .cli_ok(&["--timeout", "10", "put", "before", "1"])
                .await;
            let leader = cluster.wait_for_leader(Duration::from_secs(20)).await;
            let follower = cluster.ids().into_iter().find(|&i| i != leader).unwrap();
            for id in [leader, follower] {
                let client = cluster.client_addr(id).to_string();
                let peer = cluster.peer_addr(id).to_string();
                send_raw(&client, &wire::DEADLINE_OVERFLOW).await;
                send_raw(&peer, &wire::DEADLINE_OVERFLOW).await;

                cluster.assert_alive(id);
                assert!(
                    cluster.status(id).await.is_some(),
                    "replica {id} no longer answers status on its client port"
                );
                assert!(
                    peer_port_answers(&peer).await,
                    "replica {id} no longer answers on its peer port"
                );
                let key = format!("after-{id}");
                let out = cluster
                    .cli_at(id, &["--timeout", "10", "put", &key, "2"])
                    .await;
                assert!(
                    out.status.success(),
                    "a write through replica {id} failed after the frame: {}",
                    kv_tests::describe(&out)
                );
            }
            assert_eq!(
                cluster.client().get("before").await.unwrap(),
                Some(b"1".to_vec())
            );
        },
    )
    .await;
}
