//! The SDK's error type.

/// Everything an SDK operation can fail with.
///
/// For writes, [`Error::Unavailable`] and [`Error::Timeout`] mean the outcome
/// is unknown: the write may or may not have been applied. Retrying it with
/// the same `(client_id, seq)` (see [`crate::Client::write`]) is safe.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// The request is malformed or too large (checked before sending, or
    /// refused by a replica); nothing was applied. Retrying will not help.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// No replica could be reached: every attempt failed to connect during
    /// the whole time budget. Check that the replicas are running and that
    /// the addresses are right.
    #[error("unavailable: {0}")]
    Unavailable(String),
    /// The operation did not complete within the time budget (replicas were
    /// reachable but no quorum answered in time). For a write the outcome is
    /// unknown.
    #[error("timed out: {0}")]
    Timeout(String),
    /// A replica sent an answer that does not fit the request (for example a
    /// delete answered with a compare-and-swap result). This is a bug in the
    /// server or a version mismatch; for a write the outcome is unknown.
    #[error("unexpected answer from {addr}: {detail}")]
    Protocol {
        /// The replica that answered.
        addr: String,
        /// What was wrong with the answer.
        detail: String,
    },
}

impl Error {
    /// Whether a write that failed with this error may nevertheless have
    /// been applied.
    pub fn outcome_unknown(&self) -> bool {
        !matches!(self, Error::InvalidArgument(_))
    }
}

/// `Result` with the SDK's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
