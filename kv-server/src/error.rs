//! Errors a replica reports at start-up or while running.

use std::path::PathBuf;

/// What stops a replica.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The configuration is invalid (unknown id, bad limits, ...).
    #[error("invalid configuration: {0}")]
    Config(String),
    /// The data directory cannot be created or written.
    #[error("data directory {path}: {error} (check that it exists and is writable)")]
    DataDir {
        /// The directory.
        path: PathBuf,
        /// The cause (in the message, so not also a `source()`).
        error: std::io::Error,
    },
    /// Another process holds the data directory's lock.
    #[error(
        "data directory {path} is in use by {holder} (is another kv-server running with this \
         --data-dir? stop it first, or give this one another directory)"
    )]
    DataDirInUse {
        /// The directory.
        path: PathBuf,
        /// Who holds it: `process N`, or `another process` if its pid
        /// could not be read.
        holder: String,
    },
    /// A listening address cannot be bound.
    #[error("cannot listen on {addr}: {error} (is another process using it?)")]
    Bind {
        /// The address.
        addr: String,
        /// The cause (in the message, so not also a `source()`).
        error: std::io::Error,
    },
    /// An internal task failed; the replica stops rather than risk its state.
    #[error("internal failure: {0}")]
    Internal(String),
    /// The storage files are unreadable or damaged.
    #[error("storage {path}: {message}")]
    Storage {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
}

/// Result alias for this crate.
pub type Result<T> = std::result::Result<T, ServerError>;
