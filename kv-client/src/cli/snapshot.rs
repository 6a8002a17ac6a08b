//! `kv-client snapshot save FILE`: a backup. Streams a consistent snapshot
//! (the state at one log index) from the leader into FILE, checked
//! against the length and CRC-32 the leader gave for it.
//!
//! The file is the replica's own snapshot file, byte for byte: opaque
//! here, read by `kv-server restore` (which checks its checksum again).
//! It is written to `FILE.partial`, synced, and renamed to FILE only once
//! complete and verified, so a FILE that exists is whole.

use std::io::Write;
use std::path::PathBuf;

use clap::{Args, Subcommand};
use serde::Serialize;

use super::output::Reply;
use super::{Failure, Settings};

pub(crate) const EXAMPLES: &str = "\
Examples:
  kv-client snapshot save backup.snap
  kv-client --tls-ca tls/ca.pem --tls-cert tls/admin.pem --tls-key tls/admin.key \\
      --timeout 30 snapshot save /backups/kv-$(date +%F).snap

Asks the leader (or the replica given with --server) to snapshot its state
now, streams that snapshot into FILE, checks its length and CRC-32, and
prints {\"saved\":FILE,\"index\":N,\"bytes\":N,\"crc32\":N,\"from\":ADDR}. The
snapshot holds exactly the writes of the log up to index N: every write
acknowledged before the command started, and perhaps some that were in
flight. Restore it into a new cluster with
  kv-server restore FILE --id ID --replicas REPLICA_FILE --data-dir DIR
once for each replica of that cluster. Needs the admin role with TLS.
--timeout bounds each request (the snapshot itself may take longer to
write on a large store: raise it then).";

/// `kv-client snapshot ...`.
#[derive(Args, Debug, Clone, PartialEq)]
pub struct SnapshotArgs {
    /// What to do with a snapshot.
    #[command(subcommand)]
    pub action: SnapshotAction,
}

/// The actions of `kv-client snapshot`.
#[derive(Subcommand, Debug, Clone, PartialEq)]
pub enum SnapshotAction {
    /// Save a consistent snapshot of the store, from the leader, into FILE.
    #[command(after_help = EXAMPLES)]
    Save {
        /// Where to write it (replaced if it exists, only once the new
        /// one is complete and verified).
        file: PathBuf,
    },
}

#[derive(Serialize)]
struct Saved<'a> {
    saved: String,
    index: u64,
    bytes: u64,
    crc32: u32,
    from: &'a str,
}

pub(crate) async fn run(settings: &Settings, args: SnapshotArgs) -> Reply {
    match args.action {
        SnapshotAction::Save { file } => match save(settings, file).await {
            Ok(reply) => reply,
            Err(f) => Reply::failed(f),
        },
    }
}

async fn save(settings: &Settings, file: PathBuf) -> Result<Reply, Failure> {
    let (builder, _) = settings.builder()?;
    let client = builder.build().map_err(|e| Failure::from_error(e, false))?;
    // The leader's snapshot holds every write acknowledged before this.
    let addr = match &settings.server {
        Some(addr) => addr.clone(),
        None => client
            .status()
            .await
            .into_iter()
            .find(|(_, s)| matches!(s, Ok(s) if s.leader))
            .map(|(addr, _)| addr)
            .ok_or_else(|| Failure {
                code: super::EXIT_UNAVAILABLE,
                kind: "unavailable",
                msg: "snapshot save: no replica says it leads; retry shortly".into(),
            })?,
    };
    let failed = |e| Failure::from_error(e, false);
    let info = client.backup_begin(&addr).await.map_err(failed)?;
    let partial = partial_path(&file);
    let io = |what: &str, e: std::io::Error| Failure {
        code: 1,
        kind: "io",
        msg: format!("snapshot save: {what} {}: {e}", partial.display()),
    };
    let mut out = std::fs::File::create(&partial).map_err(|e| io("cannot create", e))?;
    let mut hasher = crc32fast::Hasher::new();
    let mut offset = 0u64;
    let result = async {
        while offset < info.len {
            let chunk = client
                .backup_chunk(&addr, info.index, offset)
                .await
                .map_err(failed)?;
            if chunk.data.is_empty() || chunk.offset != offset {
                return Err(Failure {
                    code: 1,
                    kind: "protocol",
                    msg: format!(
                        "snapshot save: {addr} sent no data at offset {offset} of {}",
                        info.len
                    ),
                });
            }
            hasher.update(&chunk.data);
            out.write_all(&chunk.data)
                .map_err(|e| io("cannot write", e))?;
            offset += chunk.data.len() as u64;
        }
        let crc32 = hasher.clone().finalize();
        if offset != info.len || crc32 != info.crc32 {
            return Err(Failure {
                code: 1,
                kind: "checksum",
                msg: format!(
                    "snapshot save: the received snapshot does not check out ({offset} bytes, \
                     CRC-32 {crc32:08x}; {addr} announced {} bytes, {:08x}); nothing was saved",
                    info.len, info.crc32
                ),
            });
        }
        out.sync_all().map_err(|e| io("cannot sync", e))?;
        std::fs::rename(&partial, &file).map_err(|e| io("cannot rename", e))?;
        Ok(())
    }
    .await;
    if let Err(f) = result {
        let _ = std::fs::remove_file(&partial);
        return Err(f);
    }
    let mut reply = Reply::default();
    reply.json_line(&Saved {
        saved: file.display().to_string(),
        index: info.index,
        bytes: info.len,
        crc32: info.crc32,
        from: &addr,
    });
    Ok(reply)
}

fn partial_path(file: &std::path::Path) -> PathBuf {
    let mut name = file.file_name().unwrap_or_default().to_os_string();
    name.push(".partial");
    file.with_file_name(name)
}
