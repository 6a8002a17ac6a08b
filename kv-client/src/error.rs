//! The SDK's error type.

/// Everything an SDK operation can fail with.
///
/// For writes, [`Error::Unavailable`], [`Error::Timeout`] and
/// [`Error::OutcomeUnknown`] mean the outcome is unknown: the write may or
/// may not have been applied ([`Error::outcome_unknown`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// The request is malformed or too large (checked before sending, or
    /// refused by a replica); nothing was applied. Retrying will not help.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// No replica could be reached: every attempt failed to connect during
    /// the whole time budget. Check that the replicas are running and that
    /// the addresses are right. Also: no session could be opened for a
    /// write (the message says why). Either way a write was not sent.
    #[error("unavailable: {0}")]
    Unavailable(String),
    /// The operation did not complete within the time budget (replicas were
    /// reachable but no quorum answered in time). For a write the outcome is
    /// unknown.
    #[error("timed out: {0}")]
    Timeout(String),
    /// A write may or may not have been applied, and retrying cannot tell:
    /// an earlier attempt may have been applied, but its result is gone —
    /// its session expired (idle longer than the cluster's session TTL) or
    /// was evicted (too many sessions), or the result fell out of the
    /// session's bounded memory (too many writes in flight). Read the
    /// data to find out.
    #[error("outcome unknown: {0}")]
    OutcomeUnknown(String),
    /// The cluster does not know the session a [`crate::Client::write`]
    /// (the raw API) named: never opened, expired or evicted. It was not
    /// applied. The other operations handle this themselves (they open a
    /// new session and send the write again).
    #[error("session {0} is unknown to the cluster (never opened, expired or evicted); the write was not applied")]
    UnknownSession(u64),
    /// The cluster refused this client's identity the role the operation
    /// needs (`read`, `write` or `admin`; see the server's `--help`).
    /// Nothing was applied. Retrying will not help.
    #[error("permission denied: {0}")]
    PermissionDenied(String),
    /// The replica was not started to do this (fault injection without
    /// `--enable-fault-injection`). Nothing was done.
    #[error("disabled: {0}")]
    Disabled(String),
    /// The request conflicts with one in progress: a membership change
    /// while another is not done, or promoting a learner that has not
    /// caught up. Nothing was done; retry once the other has finished.
    #[error("conflict: {0}")]
    Conflict(String),
    /// A range at a revision, or a watch from one, reached back before the
    /// history the cluster keeps: it starts after this revision. Read the
    /// current state and watch from its revision + 1. Nothing was applied.
    #[error("revision compacted: the history starts after revision {0}; read the current state and watch from its revision + 1")]
    Compacted(u64),
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
        !matches!(
            self,
            Error::InvalidArgument(_)
                | Error::UnknownSession(_)
                | Error::PermissionDenied(_)
                | Error::Disabled(_)
                | Error::Conflict(_)
                | Error::Compacted(_)
        )
    }
}

/// A replica file that cannot be read or is malformed: an
/// [`Error::InvalidArgument`] naming the file (and the line), so that
/// `Replicas::load(path)?` works in a function returning [`Result`].
impl From<kv_api::replicas::ReplicaFileError> for Error {
    fn from(e: kv_api::replicas::ReplicaFileError) -> Error {
        Error::InvalidArgument(e.to_string())
    }
}

/// `Result` with the SDK's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
