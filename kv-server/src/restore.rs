//! `kv-server restore FILE --id ID --replicas FILE --data-dir DIR`:
//! prepares one replica's data directory of a new cluster from a backup
//! (`kv-client snapshot save`).
//!
//! The backup is a snapshot file, exactly as replicas write them; it is
//! verified (length and checksum, by [`SnapshotDir::read_file`]) before
//! anything is written, so a damaged backup is refused with the reason
//! and leaves nothing behind. The directory then holds that snapshot and
//! a write-ahead log that says: everything up to its index is chosen and
//! compacted, and this replica votes.
//!
//! Why it may vote at once: a replica that starts with an empty log
//! waits, as a learner, to hear whether its peers are new or have history
//! (it might be an old acceptor that lost its disk). A cluster restored
//! from one backup is a new cluster whose every replica has the same
//! history and has promised nothing; if they all waited, none would ever
//! vote. So restore is for a *new* cluster only: run it once per replica
//! of the new replica file, all from the same backup, then start them as
//! usual. It refuses a data directory that is not empty, so that it cannot
//! overwrite a live replica's state.

use std::fs;
use std::path::{Path, PathBuf};

use kv_api::membership::Membership;
use kv_api::replicas::Replicas;
use kv_api::{ReplicaId, Slot};

use crate::paxos::{Record, Standing};
use crate::snapshot::SnapshotDir;
use crate::storage::Storage;
use crate::{Result, ServerError};

/// What a restore wrote.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Restored {
    /// The log index of the snapshot: the new cluster continues after it.
    pub index: Slot,
    /// Keys in the restored map.
    pub keys: usize,
    /// The data directory prepared.
    pub data_dir: PathBuf,
}

/// Checks the backup `file`, then prepares `data_dir` (missing or empty)
/// for replica `id` of `replicas` to start from it.
pub fn restore(
    file: &Path,
    id: ReplicaId,
    replicas: &Replicas,
    data_dir: &Path,
) -> Result<Restored> {
    if replicas.get(id).is_none() {
        return Err(ServerError::Config(format!(
            "--id {id} is not in {}",
            replicas.source.display()
        )));
    }
    let (index, mut sm) = SnapshotDir::read_file(file).map_err(|e| match e {
        ServerError::Storage { path, message } => ServerError::Storage {
            // The reader's advice is for a replica's own snapshot.
            message: format!(
                "not a usable backup, refusing to restore it: {}",
                message
                    .split("; move this replica's data directory")
                    .next()
                    .unwrap_or(&message)
            ),
            path,
        },
        other => other,
    })?;
    if index == 0 {
        return Err(ServerError::Config(format!(
            "{}: the snapshot is at log index 0 (an empty store); nothing to restore",
            file.display()
        )));
    }
    if let Ok(mut entries) = fs::read_dir(data_dir) {
        if entries.next().is_some() {
            return Err(ServerError::Config(format!(
                "{} is not empty: restore prepares the data directory of a replica of a new \
                 cluster and never overwrites one (move it aside, or give another --data-dir)",
                data_dir.display()
            )));
        }
    }
    fs::create_dir_all(data_dir).map_err(|error| ServerError::DataDir {
        path: data_dir.to_path_buf(),
        error,
    })?;
    let _lock = crate::lock::lock(data_dir)?;
    let snapshots = SnapshotDir::open(data_dir)?;
    // The backup names the old cluster's members and addresses; the new
    // cluster is the replica file's, at epoch 0. So the snapshot is
    // written anew with that configuration rather than copied.
    let membership = Membership::from_replicas(replicas);
    sm.set_membership(membership.clone());
    snapshots.write(index, &sm)?;
    let (mut storage, _) = Storage::open(data_dir)?;
    storage.write(&[
        Record::Seed(membership),
        Record::Standing(Standing::Voter),
        Record::Chosen(index),
        Record::Compacted(index),
    ])?;
    drop(storage);
    // What a start will find.
    let (found, _) = snapshots.load_latest()?;
    if found != index {
        return Err(ServerError::Internal(format!(
            "{}: restored snapshot {index} but the newest found is {found}",
            data_dir.display()
        )));
    }
    Ok(Restored {
        index,
        keys: sm.len(),
        data_dir: data_dir.to_path_buf(),
    })
}
