//! The driver's inbox: what the peer layer (`peers`), the RPC services
//! (`rpc`) and the driver's own helpers send the driver task (`node`).
//! It belongs to none of them, so that they depend on it and not on each
//! other: `peers` and `rpc` hand messages and requests to the driver
//! without importing the driver.

use kv_api::{
    GetResponse, KvError, RangeRequest, RangeResponse, ReadMode, ReplicaStatus, WatchRequest,
    WatchResponse, WriteOutcome, WriteRequest,
};
use kv_peer_api::Slot;
use tokio::sync::oneshot;

use crate::paxos::Msg;
use crate::state::StateMachine;

/// Capacity of the driver's input queue.
pub const INPUT_QUEUE: usize = 16 * 1024;

/// Replies to a client write.
pub type WriteReply = oneshot::Sender<std::result::Result<WriteOutcome, KvError>>;
/// Replies to a client read.
pub type GetReply = oneshot::Sender<std::result::Result<GetResponse, KvError>>;
/// Replies to a watch.
pub type WatchReply = oneshot::Sender<std::result::Result<WatchResponse, KvError>>;
/// Replies to a client range read.
pub type RangeReply = oneshot::Sender<std::result::Result<RangeResponse, KvError>>;

/// What the driver task receives.
pub enum Input {
    /// A message from a peer: a request (with where to reply) or a reply.
    Peer {
        /// The message.
        msg: Msg,
        /// Where the answer goes, for requests.
        reply: Option<oneshot::Sender<Msg>>,
    },
    /// A client write.
    Write {
        /// The write.
        req: WriteRequest,
        /// Where the result goes.
        reply: WriteReply,
    },
    /// A client read.
    Get {
        /// The key.
        key: Vec<u8>,
        /// Linearizable or local.
        mode: ReadMode,
        /// Where the result goes.
        reply: GetReply,
    },
    /// A client range read (checked for bounds before it is sent here).
    Range {
        /// The range.
        req: RangeRequest,
        /// Linearizable or local.
        mode: ReadMode,
        /// Where the result goes.
        reply: RangeReply,
    },
    /// A watch (checked before it is sent here): answered at once if
    /// there are events (or an error), else when some are applied, or at
    /// `until` with none.
    Watch {
        /// The watch.
        req: WatchRequest,
        /// When to answer with no events.
        until: std::time::Instant,
        /// Where the answer goes.
        reply: WatchReply,
    },
    /// Lease `id`'s TTL and end (log time) as this replica's state machine
    /// has it: for the RESP `TTL` (see `crate::redis`).
    Lease {
        /// The lease.
        id: u64,
        /// Where `(ttl_ms, expires_at_ms)` goes (`None`: no such lease).
        reply: oneshot::Sender<Option<(u64, u64)>>,
    },
    /// A status request.
    Status {
        /// Where the status goes.
        reply: oneshot::Sender<ReplicaStatus>,
    },
    /// A backup wants a snapshot covering everything applied now: answered
    /// with its index once one is durable.
    Backup {
        /// Where the index (or why there is none) goes.
        reply: oneshot::Sender<std::result::Result<Slot, String>>,
    },
    /// A snapshot this replica took is durable (or failed).
    SnapshotTaken {
        /// Its index.
        index: Slot,
        /// Whether it was written.
        result: std::result::Result<(), String>,
    },
    /// A snapshot received from a peer is durable and decoded (or failed).
    SnapshotReceived {
        /// Its index and the state machine it holds.
        result: std::result::Result<(Slot, Box<StateMachine>), String>,
    },
}
