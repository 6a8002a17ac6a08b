//! Backups: a snapshot saved under load (`kv-client snapshot save`)
//! restores (`kv-server restore`) into a new cluster holding exactly the
//! writes of the log up to the snapshot's index — every write acknowledged
//! before the save, and of those in flight, a prefix; a corrupted or
//! truncated backup is refused with the reason and leaves nothing behind.

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use kv_tests::{describe, kv_server_cmd, run_bin, wait_until, Cluster, START_TIMEOUT};

const WRITERS: usize = 4;

fn key(writer: usize, i: u64) -> String {
    format!("w{writer}-{i:06}")
}

/// Runs `kv-server restore FILE --id ID --replicas R --data-dir DIR`.
async fn restore(file: &Path, id: u64, replicas: &Path, dir: &Path) -> std::process::Output {
    let cmd = kv_server_cmd([
        "restore".as_ref(),
        file.as_os_str(),
        "--id".as_ref(),
        id.to_string().as_ref(),
        "--replicas".as_ref(),
        replicas.as_os_str(),
        "--data-dir".as_ref(),
        dir.as_os_str(),
    ]);
    run_bin(cmd, Duration::from_secs(30))
        .await
        .expect("kv-server restore ran")
        .0
}

/// Saves a backup of `cluster` into `file`; returns its log index.
async fn save(cluster: &Cluster, file: &Path) -> u64 {
    let out = cluster
        .cli(&[
            "--timeout",
            "20",
            "snapshot",
            "save",
            file.to_str().unwrap(),
        ])
        .await;
    assert!(out.status.success(), "snapshot save: {}", describe(&out));
    let line: serde_json::Value =
        serde_json::from_slice(&out.stdout).expect("one JSON line on stdout");
    assert_eq!(line["saved"], file.to_str().unwrap());
    assert_eq!(
        line["bytes"].as_u64(),
        Some(std::fs::metadata(file).unwrap().len())
    );
    line["index"].as_u64().expect("an index")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_saved_under_load_restores_into_a_new_cluster_with_exactly_the_logged_writes() {
    let old = Cluster::start(3).await;
    // Writers put their keys one after another, each only once the one
    // before was acknowledged (a failed put is retried, same key and
    // value): so each writer's writes are in the log in key order, and
    // what a snapshot holds of them is a prefix.
    let stop = Arc::new(AtomicBool::new(false));
    let acked: Arc<Vec<AtomicU64>> = Arc::new((0..WRITERS).map(|_| AtomicU64::new(0)).collect());
    let mut tasks = Vec::new();
    for w in 0..WRITERS {
        let (client, stop, acked) = (old.client(), stop.clone(), acked.clone());
        tasks.push(tokio::spawn(async move {
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                if client.put(key(w, i), i.to_string()).await.is_ok() {
                    i += 1;
                    acked[w].store(i, Ordering::SeqCst);
                }
            }
        }));
    }
    let counts = |acked: &Arc<Vec<AtomicU64>>| -> Vec<u64> {
        acked.iter().map(|a| a.load(Ordering::SeqCst)).collect()
    };
    wait_until(Duration::from_secs(30), "the writers under way", || {
        let c = counts(&acked);
        async move { c.iter().all(|&n| n >= 20) }
    })
    .await;

    let file = old.dir().join("backup.snap");
    let before = counts(&acked);
    let index = save(&old, &file).await;
    let after = counts(&acked);
    // More load after the save: none of it may be in the backup.
    wait_until(Duration::from_secs(30), "writes after the save", || {
        let c = counts(&acked);
        let after = after.clone();
        async move { c.iter().zip(&after).all(|(n, a)| *n >= a + 5) }
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.unwrap();
    }
    let total = counts(&acked);

    let new = Cluster::prepare(3, &[]);
    for id in new.ids() {
        let out = restore(&file, id, new.replicas_file(), new.data_dir(id)).await;
        assert!(out.status.success(), "restore {id}: {}", describe(&out));
        let said = String::from_utf8_lossy(&out.stdout);
        assert!(said.contains(&format!("log index {index}")), "{said}");
    }
    let mut new = new;
    for id in new.ids() {
        new.spawn(id);
    }
    new.wait_ready(START_TIMEOUT).await;
    let client = new.client();
    let mut restored_keys = 0;
    for w in 0..WRITERS {
        // Present: a prefix of the writer's keys, holding every write
        // acknowledged before the save began, and nothing acknowledged
        // only after the save ended (the one in flight may be in).
        let mut present = 0;
        for i in 0..total[w] {
            if let Some(v) = client.get(key(w, i)).await.expect("get") {
                assert_eq!(present, i, "writer {w}: key {i} present after a gap");
                assert_eq!(v, i.to_string().into_bytes());
                present += 1;
            }
        }
        assert!(
            present >= before[w] && present <= after[w] + 1,
            "writer {w}: {present} keys restored; {} were acknowledged before the save, \
             {} when it ended",
            before[w],
            after[w]
        );
        restored_keys += present;
    }
    // Nothing else: the map holds exactly those keys.
    let status = new.status(1).await.expect("status");
    assert_eq!(status.keys, restored_keys);
    assert!(status.applied >= index);
    // The new cluster takes writes.
    client.put("after-restore", "yes").await.expect("a write");
    assert_eq!(
        client.get("after-restore").await.unwrap().as_deref(),
        Some(&b"yes"[..])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupted_or_truncated_backup_is_refused_and_leaves_nothing_behind() {
    let old = Cluster::start(3).await;
    let client = old.client();
    for i in 0..50 {
        client.put(format!("k{i}"), vec![b'v'; 100]).await.unwrap();
    }
    let file = old.dir().join("backup.snap");
    save(&old, &file).await;
    let good = std::fs::read(&file).unwrap();
    let replicas = old.replicas_file().to_path_buf();

    let mut flipped_mid = good.clone();
    flipped_mid[good.len() / 2] ^= 0x55;
    let mut flipped_end = good.clone();
    *flipped_end.last_mut().unwrap() ^= 0x01;
    let mut flipped_len = good.clone();
    // Early in the body: where the map's length prefix is.
    flipped_len[40] ^= 0xff;
    let cases: [(&str, Vec<u8>); 5] = [
        ("a byte flipped in the middle", flipped_mid),
        ("the last byte flipped", flipped_end),
        ("a length prefix flipped", flipped_len),
        ("truncated", good[..good.len() - 10].to_vec()),
        ("empty", Vec::new()),
    ];
    for (what, bytes) in cases {
        let bad = old.dir().join("bad.snap");
        std::fs::write(&bad, &bytes).unwrap();
        let dir = old.dir().join("restored-bad");
        let out = restore(&bad, 1, &replicas, &dir).await;
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{what}: {}", describe(&out));
        assert!(err.contains("refusing to restore"), "{what}: {err}");
        assert!(err.contains("bad.snap"), "{what}: names the file: {err}");
        assert!(!err.contains("panicked"), "{what}: {err}");
        assert!(!dir.exists(), "{what}: nothing is written");
    }

    // The good one restores; a second restore into the same directory is
    // refused (it never overwrites a replica's state).
    let dir = old.dir().join("restored");
    let out = restore(&file, 2, &replicas, &dir).await;
    assert!(out.status.success(), "{}", describe(&out));
    let out = restore(&file, 2, &replicas, &dir).await;
    assert_eq!(out.status.code(), Some(2), "{}", describe(&out));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not empty"));
    // An id the replica file does not list is refused.
    let out = restore(&file, 9, &replicas, &old.dir().join("nine")).await;
    assert_eq!(out.status.code(), Some(2), "{}", describe(&out));
}
