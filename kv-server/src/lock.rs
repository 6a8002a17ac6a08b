//! One replica process per data directory.
//!
//! Two processes on one directory would both append to the log and each
//! cut off what it takes for the other's torn tail, so the directory is
//! locked before anything in it is read or written: an exclusive `flock`
//! on `LOCK` in it, held for the life of the process (the kernel releases
//! it when the process ends, however it ends, so a crash leaves no stale
//! lock). The file holds the holder's pid, for the message that refuses
//! the second process.

use std::fs::{self, File, OpenOptions};
use std::io::Read;
use std::os::unix::fs::FileExt;
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
    fs::create_dir_all(dir).map_err(io)?;
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(dir.join(LOCK_FILE))
        .map_err(io)?;
    match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
        Ok(locked) => {
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
