//! A replica whose data on disk is damaged refuses to start, naming the
//! damaged file (it never serves wrong data), and once its data directory is
//! moved aside it rejoins empty and catches up from its peers.

use std::path::{Path, PathBuf};
use std::time::Duration;

use kv_tests::{bounded, Cluster};

/// The write-ahead log segments of a data directory (`wal/*.wal`, the
/// format documented in kv-server's `storage` module), largest first.
fn wal_segments(data_dir: &Path) -> Vec<PathBuf> {
    let mut segs: Vec<(u64, PathBuf)> = std::fs::read_dir(data_dir.join("wal"))
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|x| x == "wal"))
                .map(|p| (std::fs::metadata(&p).map(|m| m.len()).unwrap_or(0), p))
                .collect()
        })
        .unwrap_or_default();
    segs.sort_by_key(|s| std::cmp::Reverse(s.0));
    segs.into_iter().map(|(_, p)| p).collect()
}

/// Flips one byte in the middle of the payload of a complete frame in the
/// middle of `segment` (frames found with kv-server's own reader), so that
/// the frame is whole but its checksum no longer matches.
fn corrupt_a_frame(segment: &Path) -> usize {
    let mut bytes = std::fs::read(segment).expect("read the segment");
    let frames = kv_server::storage::testing::frame_bodies(&bytes);
    assert!(
        !frames.is_empty(),
        "no complete frame found in {} ({} bytes): has the storage format changed?",
        segment.display(),
        bytes.len()
    );
    let body = &frames[frames.len() / 2];
    let target = body.start + body.len() / 2;
    bytes[target] ^= 0x5a;
    std::fs::write(segment, &bytes).expect("write the damaged segment");
    target
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn damaged_replica_refuses_to_start_and_rejoins_once_its_data_is_moved_aside() {
    let mut cluster = Cluster::start(5).await;
    let test = async {
        let client = cluster.client();
        for i in 0..60 {
            client
                .put(format!("key-{i}"), format!("value-{i}"))
                .await
                .expect("put");
        }
        let applied = cluster.max_applied().await;
        cluster
            .wait_all_applied(applied, Duration::from_secs(20))
            .await;
        let leader = cluster.wait_for_leader(Duration::from_secs(20)).await;
        let victim = cluster.ids().into_iter().find(|&i| i != leader).unwrap();
        cluster.kill(victim);

        let data_dir = cluster.data_dir(victim).to_path_buf();
        let segments = wal_segments(&data_dir);
        assert!(
            !segments.is_empty(),
            "no write-ahead log segment under {}: has the storage layout changed?",
            data_dir.display()
        );
        let segment = &segments[0];
        let offset = corrupt_a_frame(segment);
        let name = segment.file_name().unwrap().to_string_lossy().into_owned();
        eprintln!("flipped a byte at offset {offset} of {}", segment.display());

        // It must refuse to start, naming the damaged file, without a panic.
        let (status, log) = cluster.start_expecting_refusal(victim, &name).await;
        eprintln!(
            "the damaged replica exited with {status}: {}",
            log.lines().last().unwrap_or("")
        );

        // The cluster still serves with four replicas.
        client.put("while-damaged", "w").await.expect("put");

        // Moved aside, the replica rejoins empty and catches up.
        let aside = data_dir.with_extension("damaged");
        std::fs::rename(&data_dir, &aside).expect("move the data directory aside");
        cluster.spawn(victim);
        cluster.wait_answers(victim, Duration::from_secs(20)).await;
        let applied = cluster.max_applied().await;
        cluster
            .wait_all_applied(applied, Duration::from_secs(30))
            .await;
        let local = cluster.client_for(victim);
        for i in 0..60 {
            assert_eq!(
                local
                    .get_local(format!("key-{i}"))
                    .await
                    .expect("local get"),
                Some(format!("value-{i}").into_bytes()),
                "key-{i} on the rejoined replica {victim}"
            );
        }
        assert_eq!(
            local.get_local("while-damaged").await.expect("local get"),
            Some(b"w".to_vec())
        );
    };
    bounded(Duration::from_secs(120), "the test", test).await;
}
