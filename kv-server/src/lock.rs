//! One replica process per data directory.
//!
//! Two processes on one directory would both append to the log and each
//! cut off what it takes for the other's torn tail, so the directory is
//! locked before anything in it is read or written: an exclusive `flock`
//! on `LOCK` in it, held for the life of the process (the kernel releases
//! it when the process ends, however it ends, so a crash leaves no stale
//! lock). The file holds the holder's pid, for the message that refuses
//! the second process.
//!
//! The directory is also made private here, before anything in it is read
//! or written: created mode 0700, or, if it exists and other users may
//! enter it, tightened to 0700 with a warning, as is anything in it open to
//! others (directories to 0700, files to 0600). The files written later are
//! created 0600 because `kv-server` runs with umask 077 (see `main.rs`);
//! the 0700 directory is what bars other users even where that is not so.

use std::fs::{self, File, OpenOptions};
use std::io::Read;
use std::os::unix::fs::{DirBuilderExt, FileExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};

use crate::{Result, ServerError};

/// The lock file's name in the data directory.
pub const LOCK_FILE: &str = "LOCK";

/// The held lock; released when dropped (or when the process ends).
pub struct DataDirLock {
    _file: Flock<File>,
}

/// Creates `dir` if needed and locks it, or says which process holds it.
pub fn lock(dir: &Path) -> Result<DataDirLock> {
    let io = |error: std::io::Error| ServerError::DataDir {
        path: dir.to_path_buf(),
        error,
    };
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(io)?;
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(dir.join(LOCK_FILE))
        .map_err(io)?;
    match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
        Ok(locked) => {
            make_private(dir).map_err(io)?;
            // Not synced: the pid only matters while this process lives.
            let pid = format!("{}\n", std::process::id());
            locked
                .set_len(0)
                .and_then(|()| locked.write_all_at(pid.as_bytes(), 0))
                .map_err(io)?;
            Ok(DataDirLock { _file: locked })
        }
        Err((mut file, Errno::EWOULDBLOCK)) => {
            let mut text = String::new();
            // The holder may be between emptying the file and writing its
            // pid: then there is no pid to name.
            let holder = file
                .read_to_string(&mut text)
                .ok()
                .and_then(|_| text.trim().parse::<u32>().ok());
            Err(ServerError::DataDirInUse {
                path: dir.to_path_buf(),
                holder: match holder {
                    Some(pid) => format!("process {pid}"),
                    None => "another process".into(),
                },
            })
        }
        Err((_, e)) => Err(io(e.into())),
    }
}

/// Makes `dir` 0700 and everything in it that others may use 0700
/// (directories) or 0600 (files), with one warning if anything changed.
/// Symbolic links are left alone (their mode means nothing).
fn make_private(dir: &Path) -> std::io::Result<()> {
    let was = fs::metadata(dir)?.permissions().mode() & 0o7777;
    let mut tightened = 0usize;
    let mut todo = vec![dir.to_path_buf()];
    while let Some(path) = todo.pop() {
        let meta = fs::symlink_metadata(&path)?;
        let private = if meta.is_dir() {
            todo.extend(
                fs::read_dir(&path)?
                    .map(|e| e.map(|e| e.path()))
                    .collect::<std::io::Result<Vec<_>>>()?,
            );
            0o700
        } else if meta.is_file() {
            0o600
        } else {
            continue;
        };
        if meta.permissions().mode() & 0o077 != 0 {
            fs::set_permissions(&path, fs::Permissions::from_mode(private))?;
            tightened += 1;
        }
    }
    if tightened > 0 {
        tracing::warn!(
            "data directory {} (mode {was:04o}) or files in it were accessible to other \
             users: made it and its directories 0700, its files 0600 ({tightened} changed)",
            dir.display()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode(path: &Path) -> u32 {
        fs::symlink_metadata(path).unwrap().permissions().mode() & 0o7777
    }

    #[test]
    fn a_new_directory_is_private_and_a_loose_one_is_tightened() {
        let root = std::env::temp_dir().join(format!("kv-lock-modes-{}", std::process::id()));
        let _ = fs::remove_dir_all(&root);
        let dir = root.join("data").join("1");
        {
            let _held = lock(&dir).unwrap();
            assert_eq!(mode(&dir), 0o700);
            assert_eq!(mode(&dir.join(LOCK_FILE)), 0o600);
        }
        // Loosened, as an older version or a hand might leave it.
        let set = |p: &Path, m: u32| fs::set_permissions(p, fs::Permissions::from_mode(m)).unwrap();
        set(&dir, 0o755);
        set(&dir.join(LOCK_FILE), 0o644);
        fs::create_dir(dir.join("wal")).unwrap();
        set(&dir.join("wal"), 0o775);
        fs::write(dir.join("wal").join("1.wal"), b"x").unwrap();
        set(&dir.join("wal").join("1.wal"), 0o664);
        fs::write(dir.join("private"), b"x").unwrap();
        set(&dir.join("private"), 0o400);
        std::os::unix::fs::symlink("/etc/hostname", dir.join("link")).unwrap();
        {
            let _held = lock(&dir).unwrap();
            assert_eq!(mode(&dir), 0o700);
            assert_eq!(mode(&dir.join(LOCK_FILE)), 0o600);
            assert_eq!(mode(&dir.join("wal")), 0o700);
            assert_eq!(mode(&dir.join("wal").join("1.wal")), 0o600);
            // Already private: left as it was.
            assert_eq!(mode(&dir.join("private")), 0o400);
        }
        fs::remove_dir_all(&root).unwrap();
    }
}
