//! Durable acceptor state in redb: the promised ballot, accepted entries and
//! the chosen prefix. Every [`Storage::write`] is one ACID transaction,
//! synced before it returns, so a batch of records from one round of the
//! consensus core shares one sync (group commit).

use std::path::{Path, PathBuf};

use kv_peer_api::{Ballot, Value};
use redb::{Database, Durability, ReadableTable, TableDefinition};

use crate::paxos::{Durable, Record};
use crate::{Result, ServerError};

const LOG: TableDefinition<u64, &[u8]> = TableDefinition::new("log");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");

const PROMISED_ROUND: &str = "promised_round";
const PROMISED_ID: &str = "promised_id";
const CHOSEN: &str = "chosen";
const COMPACTED: &str = "compacted";

/// The replica's database file.
pub struct Storage {
    db: Database,
    path: PathBuf,
    compacted: u64,
}

/// A log entry on disk: CRC-32 of the rest, then bincode of (ballot, value).
fn encode_entry(ballot: &Ballot, value: &Value) -> std::result::Result<Vec<u8>, bincode::Error> {
    let body = bincode::serialize(&(ballot, value))?;
    let mut out = Vec::with_capacity(4 + body.len());
    out.extend_from_slice(&crc32fast::hash(&body).to_le_bytes());
    out.extend_from_slice(&body);
    Ok(out)
}

fn decode_entry(bytes: &[u8]) -> std::result::Result<(Ballot, Value), String> {
    if bytes.len() < 4 {
        return Err("truncated".into());
    }
    let (crc, body) = bytes.split_at(4);
    if crc32fast::hash(body).to_le_bytes() != crc {
        return Err("checksum mismatch".into());
    }
    bincode::deserialize(body).map_err(|e| e.to_string())
}

impl Storage {
    /// Opens (or creates) the database in `dir` and loads what it holds.
    pub fn open(dir: &Path) -> Result<(Storage, Durable)> {
        std::fs::create_dir_all(dir).map_err(|error| ServerError::DataDir {
            path: dir.to_path_buf(),
            error,
        })?;
        let path = dir.join("kv.redb");
        let db = Database::create(&path).map_err(|e| storage_err(&path, e))?;
        let mut storage = Storage {
            db,
            path,
            compacted: 0,
        };
        let durable = storage.load()?;
        storage.compacted = durable.compacted;
        Ok((storage, durable))
    }

    fn err(&self, e: impl std::fmt::Display) -> ServerError {
        storage_err(&self.path, e)
    }

    fn load(&self) -> Result<Durable> {
        // Create the tables on first start, so reads below find them.
        let tx = self.db.begin_write().map_err(|e| self.err(e))?;
        tx.open_table(LOG).map_err(|e| self.err(e))?;
        tx.open_table(META).map_err(|e| self.err(e))?;
        tx.commit().map_err(|e| self.err(e))?;

        let tx = self.db.begin_read().map_err(|e| self.err(e))?;
        let meta = tx.open_table(META).map_err(|e| self.err(e))?;
        let get = |k: &str| -> Result<u64> {
            Ok(meta
                .get(k)
                .map_err(|e| self.err(e))?
                .map(|v| v.value())
                .unwrap_or(0))
        };
        let promised = Ballot {
            round: get(PROMISED_ROUND)?,
            id: get(PROMISED_ID)?,
        };
        let chosen = get(CHOSEN)?;
        let compacted = get(COMPACTED)?;
        let log = tx.open_table(LOG).map_err(|e| self.err(e))?;
        let mut entries = Vec::new();
        for row in log.iter().map_err(|e| self.err(e))? {
            let (k, v) = row.map_err(|e| self.err(e))?;
            let slot = k.value();
            let (ballot, value) = decode_entry(v.value()).map_err(|e| {
                self.err(format!(
                    "log entry {slot} is damaged ({e}); move this replica's data directory \
                     aside and restart it to catch up from its peers"
                ))
            })?;
            entries.push((slot, ballot, value));
        }
        // redb iterates in key order: slots compacted+1..=chosen must all be there.
        if chosen > compacted {
            let n = (chosen - compacted) as usize;
            let first = entries.first().map(|e| e.0);
            if entries.len() < n || first != Some(compacted + 1) || entries[n - 1].0 != chosen {
                return Err(self.err(format!(
                    "the log records slots {}..={chosen} as chosen but some of them are missing",
                    compacted + 1
                )));
            }
        }
        Ok(Durable {
            promised,
            chosen,
            entries,
            snapshot: 0,
            compacted,
        })
    }

    /// Writes `records` in one transaction and syncs it.
    pub fn write(&mut self, records: &[Record]) -> Result<()> {
        if records.is_empty() {
            return Ok(());
        }
        let mut tx = self.db.begin_write().map_err(|e| self.err(e))?;
        tx.set_durability(Durability::Immediate);
        {
            let mut log = tx.open_table(LOG).map_err(|e| self.err(e))?;
            let mut meta = tx.open_table(META).map_err(|e| self.err(e))?;
            for r in records {
                match r {
                    Record::Promised(b) => {
                        meta.insert(PROMISED_ROUND, b.round)
                            .map_err(|e| self.err(e))?;
                        meta.insert(PROMISED_ID, b.id).map_err(|e| self.err(e))?;
                    }
                    Record::Accepted {
                        slot,
                        ballot,
                        value,
                    } => {
                        let bytes = encode_entry(ballot, value).map_err(|e| self.err(e))?;
                        log.insert(*slot, bytes.as_slice())
                            .map_err(|e| self.err(e))?;
                    }
                    Record::Chosen(slot) => {
                        meta.insert(CHOSEN, *slot).map_err(|e| self.err(e))?;
                    }
                    Record::Compacted(upto) => {
                        if *upto > self.compacted {
                            for slot in self.compacted + 1..=*upto {
                                log.remove(slot).map_err(|e| self.err(e))?;
                            }
                            self.compacted = *upto;
                            meta.insert(COMPACTED, *upto).map_err(|e| self.err(e))?;
                        }
                    }
                }
            }
        }
        tx.commit().map_err(|e| self.err(e))
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

fn storage_err(path: &Path, e: impl std::fmt::Display) -> ServerError {
    ServerError::Storage {
        path: path.to_path_buf(),
        message: e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_survive_reopen() {
        let dir = std::env::temp_dir().join(format!("kv-storage-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        {
            let (mut s, d) = Storage::open(&dir).unwrap();
            assert_eq!(d.promised, Ballot::ZERO);
            let b = Ballot { round: 3, id: 2 };
            s.write(&[
                Record::Promised(b),
                Record::Accepted {
                    slot: 1,
                    ballot: b,
                    value: Value::Noop,
                },
                Record::Chosen(1),
            ])
            .unwrap();
        }
        let (_s, d) = Storage::open(&dir).unwrap();
        assert_eq!(d.promised, Ballot { round: 3, id: 2 });
        assert_eq!(d.chosen, 1);
        assert_eq!(d.entries.len(), 1);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

#[cfg(test)]
mod bench {
    use super::*;

    /// Not a pass/fail test: prints what one synced commit costs here.
    /// `cargo test -p kv-server --release --lib storage_commit_latency -- --ignored --nocapture`
    #[test]
    #[ignore]
    fn storage_commit_latency() {
        let dir = std::env::temp_dir().join(format!("kv-storage-bench-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let (mut s, _) = Storage::open(&dir).unwrap();
        let b = Ballot { round: 1, id: 1 };
        let mut times = Vec::new();
        for slot in 1..=2000u64 {
            let t = std::time::Instant::now();
            s.write(&[
                Record::Accepted {
                    slot,
                    ballot: b,
                    value: Value::Batch(vec![]),
                },
                Record::Chosen(slot - 1),
            ])
            .unwrap();
            times.push(t.elapsed());
        }
        times.sort();
        println!(
            "redb synced commit: p50 {:?} p99 {:?}",
            times[times.len() / 2],
            times[times.len() * 99 / 100]
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
