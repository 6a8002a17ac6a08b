//! Errors a replica reports at start-up or while running.

use std::path::PathBuf;

/// What stops a replica.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The configuration is invalid (unknown id, bad limits, ...).
    #[error("invalid configuration: {0}")]
    Config(String),
    /// The data directory cannot be created or written.
    #[error("data directory {path}: {source} (check that it exists and is writable)")]
    DataDir {
        /// The directory.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// A listening address cannot be bound.
    #[error("cannot listen on {addr}: {source} (is another process using it?)")]
    Bind {
        /// The address.
        addr: String,
        /// The cause.
        source: std::io::Error,
    },
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
