//! The replica's metrics, in the Prometheus/OpenMetrics text format
//! (served on `/metrics` by the admin listener, `kv-server --admin-addr`).
//!
//! Every name starts with `kvpaxos_` and carries its unit (`_seconds`,
//! `_bytes`; counters end in `_total`). The README's Operations section
//! lists them with what to alert on; [`Metrics::new`] is the one place
//! they are defined.
//!
//! # Why `prometheus-client`
//!
//! It is the Prometheus project's own Rust client, and the lighter build
//! of the two candidates: it adds seven small crates (dtoa, parking_lot and
//! its three helpers, a derive macro on the `syn` already in the tree).
//! The `metrics` facade with `metrics-exporter-prometheus` (default
//! features off) also needs `metrics-util` with its registry, `quanta`
//! and a sketch crate for summaries, and records through a global
//! recorder looked up by key on every call unless handles are kept —
//! which is what is done here anyway.
//!
//! # Cost on the hot path
//!
//! Counters and gauges are one relaxed atomic add or store. Histograms
//! take an uncontended mutex (parking_lot: one compare-and-swap each way);
//! a replica runs on one async thread, so there is no contention to speak
//! of. Label sets on the request path (operation kind and outcome) are
//! resolved once, at start, into plain handles ([`ClientOps`]), so that no
//! request hashes labels. Gauges that mirror the driver's state (indexes,
//! keys, sessions) are set once per tick (10 ms), not per event.
//!
//! One process runs one replica, so the metrics are process-wide
//! ([`global`]); a test running several replicas in one process sees their
//! sums.

use std::sync::LazyLock;
use std::time::Duration;

use kv_api::{KvError, Op, ReplicaId};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::{Registry, Unit};

/// The content type of [`Metrics::encode`]'s output.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Labels `op` and `outcome` of a client request.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OpLabels {
    op: &'static str,
    outcome: &'static str,
}

/// Label `op` alone.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OpKind {
    op: &'static str,
}

/// Label `outcome` alone.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabel {
    /// What happened.
    pub outcome: &'static str,
}

/// Labels of a failed peer call.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PeerError {
    /// The peer's replica id.
    pub peer: ReplicaId,
    /// `timeout`, `unreachable` (no connection), `error` (the call
    /// failed otherwise), `shed` (too many in flight to it).
    pub kind: &'static str,
}

/// Label `kind` of an injected fault.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FaultKind {
    /// `drop`, `delay`, `timeout`, `refuse` (a request from a cut link).
    pub kind: &'static str,
}

/// The kinds of client request, as labelled (`other`: a kind of write
/// this list does not name yet).
pub const OP_KINDS: [&str; 7] = [
    "put",
    "delete",
    "cas",
    "open_session",
    "get",
    "get_local",
    "other",
];

/// The outcomes of a client request, as labelled: `ok`, a get that found
/// nothing (`not_found`), or the error's kind.
pub const OUTCOMES: [&str; 10] = [
    "ok",
    "not_found",
    "not_leader",
    "unavailable",
    "invalid",
    "timeout",
    "unknown_session",
    "denied",
    "disabled",
    "other",
];

/// The label of `op`.
pub fn op_kind(op: &Op) -> usize {
    #[allow(unreachable_patterns)] // variants added later count as `other`
    match op {
        Op::Put { .. } => 0,
        Op::Delete { .. } => 1,
        Op::Cas { .. } => 2,
        Op::OpenSession { .. } => 3,
        _ => 6,
    }
}

/// Index of `get` (linearizable) and `get_local` in [`OP_KINDS`].
pub const GET: usize = 4;
/// See [`GET`].
pub const GET_LOCAL: usize = 5;

/// The outcome label of an error.
pub fn error_outcome(e: &KvError) -> usize {
    #[allow(unreachable_patterns)]
    match e {
        KvError::NotLeader(_) => 2,
        KvError::Unavailable(_) => 3,
        KvError::InvalidArgument(_) => 4,
        KvError::Timeout(_) => 5,
        KvError::UnknownSession(_) => 6,
        KvError::PermissionDenied(_) => 7,
        KvError::Disabled(_) => 8,
        _ => 9,
    }
}

/// Index of `not_found` in [`OUTCOMES`].
pub const NOT_FOUND: usize = 1;

/// Client request counters and latency histograms, one handle per label
/// set, resolved at start.
pub struct ClientOps {
    counts: Vec<[Counter; OUTCOMES.len()]>,
    latency: Vec<Histogram>,
}

impl ClientOps {
    /// Counts one request of kind `op` (an index into [`OP_KINDS`]) that
    /// ended with `outcome` (into [`OUTCOMES`]) after `took`.
    pub fn record(&self, op: usize, outcome: usize, took: Duration) {
        if let (Some(counts), Some(latency)) = (self.counts.get(op), self.latency.get(op)) {
            if let Some(c) = counts.get(outcome) {
                c.inc();
            }
            latency.observe(took.as_secs_f64());
        }
    }
}

/// Every metric of a replica.
pub struct Metrics {
    registry: Registry,
    /// `kvpaxos_client_requests_total{op,outcome}` and
    /// `kvpaxos_client_request_duration_seconds{op}`.
    pub client: ClientOps,
    /// `kvpaxos_proposals_total{outcome}`: writes handed to consensus here
    /// (`accepted`), refused because another replica leads
    /// (`not_leader`), or because the queue is full (`busy`);
    /// `duplicate` for a retry answered from the session's cache.
    pub proposals: Family<OutcomeLabel, Counter>,
    /// `kvpaxos_applied_batches_total`.
    pub batches: Counter,
    /// `kvpaxos_applied_batch_size_commands`.
    pub batch_commands: Histogram,
    /// `kvpaxos_applied_batch_size_bytes`.
    pub batch_bytes: Histogram,
    /// `kvpaxos_log_sync_duration_seconds`: one synced log write (write
    /// and `fdatasync`).
    pub log_sync: Histogram,
    /// `kvpaxos_log_written_bytes_total`.
    pub log_bytes: Counter,
    /// `kvpaxos_log_compactions_total`.
    pub compactions: Counter,
    /// `kvpaxos_chosen_index`.
    pub chosen: Gauge,
    /// `kvpaxos_applied_index`.
    pub applied: Gauge,
    /// `kvpaxos_leader_chosen_index`: the chosen index the leader last
    /// told this replica of (its own, on the leader).
    pub leader_chosen: Gauge,
    /// `kvpaxos_apply_lag_entries`: `leader_chosen - applied`.
    pub apply_lag: Gauge,
    /// `kvpaxos_is_leader` (0 or 1).
    pub is_leader: Gauge,
    /// `kvpaxos_leader_id` (0: none known).
    pub leader_id: Gauge,
    /// `kvpaxos_ballot_round`: the round of the highest ballot promised.
    pub ballot_round: Gauge,
    /// `kvpaxos_leader_changes_total`: the leader this replica knows of
    /// changed to another replica.
    pub leader_changes: Counter,
    /// `kvpaxos_elections_started_total`: this replica raised its ballot
    /// to run phase 1.
    pub elections: Counter,
    /// `kvpaxos_peer_rpc_errors_total{peer,kind}`.
    pub peer_errors: Family<PeerError, Counter>,
    /// `kvpaxos_reads_leased_total`: linearizable reads this replica
    /// served as leader under its lease, without a heartbeat round.
    pub reads_leased: Counter,
    /// `kvpaxos_catchup_fetches_total`: fetch replies received.
    pub catchup_fetches: Counter,
    /// `kvpaxos_catchup_entries_total`: log entries they carried.
    pub catchup_entries: Counter,
    /// `kvpaxos_snapshot_transfers_total{outcome}`: snapshots fetched
    /// from a peer (`ok`, `failed`).
    pub snapshot_transfers: Family<OutcomeLabel, Counter>,
    /// `kvpaxos_snapshot_transfer_bytes_total`.
    pub snapshot_transfer_bytes: Counter,
    /// `kvpaxos_snapshot_transfer_duration_seconds`.
    pub snapshot_transfer_duration: Histogram,
    /// `kvpaxos_snapshot_chunks_served_total`: chunks sent to peers.
    pub snapshot_chunks_served: Counter,
    /// `kvpaxos_snapshots_taken_total{outcome}`.
    pub snapshots_taken: Family<OutcomeLabel, Counter>,
    /// `kvpaxos_snapshot_duration_seconds`: writing one (serialize, sync).
    pub snapshot_duration: Histogram,
    /// `kvpaxos_snapshot_size_bytes`: the newest snapshot's file.
    pub snapshot_size: Gauge,
    /// `kvpaxos_snapshot_index`.
    pub snapshot_index: Gauge,
    /// `kvpaxos_keys`.
    pub keys: Gauge,
    /// `kvpaxos_data_bytes`: bytes of keys and values in the map.
    pub data_bytes: Gauge,
    /// `kvpaxos_sessions`.
    pub sessions: Gauge,
    /// `kvpaxos_faults_injected_total{kind}`.
    pub faults: Family<FaultKind, Counter>,
    /// `kvpaxos_driver_round_duration_seconds`: one round of the driver
    /// (handle inputs, persist, apply).
    pub round: Histogram,
}

fn latency_buckets() -> Histogram {
    // 50 µs to ~26 s.
    Histogram::new(exponential_buckets(0.000_05, 2.0, 20))
}

impl Metrics {
    /// Every metric, registered, at zero.
    pub fn new() -> Metrics {
        let mut r = Registry::with_prefix("kvpaxos");
        let client_counts: Family<OpLabels, Counter> = Family::default();
        let client_latency: Family<OpKind, Histogram> =
            Family::new_with_constructor(latency_buckets);
        let client = ClientOps {
            counts: OP_KINDS
                .iter()
                .map(|&op| {
                    OUTCOMES.map(|outcome| {
                        client_counts
                            .get_or_create(&OpLabels { op, outcome })
                            .clone()
                    })
                })
                .collect(),
            latency: OP_KINDS
                .iter()
                .map(|&op| client_latency.get_or_create(&OpKind { op }).clone())
                .collect(),
        };
        r.register(
            "client_requests",
            "Client requests served by this replica, by operation and outcome",
            client_counts,
        );
        r.register_with_unit(
            "client_request_duration",
            "Time from a client request's arrival to its answer, by operation",
            Unit::Seconds,
            client_latency,
        );
        let m = Metrics {
            client,
            proposals: Family::default(),
            batches: Counter::default(),
            batch_commands: Histogram::new(exponential_buckets(1.0, 2.0, 11)),
            batch_bytes: Histogram::new(exponential_buckets(64.0, 4.0, 12)),
            log_sync: latency_buckets(),
            log_bytes: Counter::default(),
            compactions: Counter::default(),
            chosen: Gauge::default(),
            applied: Gauge::default(),
            leader_chosen: Gauge::default(),
            apply_lag: Gauge::default(),
            is_leader: Gauge::default(),
            leader_id: Gauge::default(),
            ballot_round: Gauge::default(),
            leader_changes: Counter::default(),
            elections: Counter::default(),
            peer_errors: Family::default(),
            reads_leased: Counter::default(),
            catchup_fetches: Counter::default(),
            catchup_entries: Counter::default(),
            snapshot_transfers: Family::default(),
            snapshot_transfer_bytes: Counter::default(),
            snapshot_transfer_duration: latency_buckets(),
            snapshot_chunks_served: Counter::default(),
            snapshots_taken: Family::default(),
            snapshot_duration: latency_buckets(),
            snapshot_size: Gauge::default(),
            snapshot_index: Gauge::default(),
            keys: Gauge::default(),
            data_bytes: Gauge::default(),
            sessions: Gauge::default(),
            faults: Family::default(),
            round: latency_buckets(),
            registry: Registry::default(),
        };
        for outcome in ["accepted", "not_leader", "busy", "duplicate"] {
            let _ = m.proposals.get_or_create(&OutcomeLabel { outcome });
        }
        for outcome in ["ok", "failed"] {
            let _ = m
                .snapshot_transfers
                .get_or_create(&OutcomeLabel { outcome });
            let _ = m.snapshots_taken.get_or_create(&OutcomeLabel { outcome });
        }
        for kind in ["drop", "delay", "timeout", "refuse"] {
            let _ = m.faults.get_or_create(&FaultKind { kind });
        }
        r.register(
            "proposals",
            "Client writes handed to consensus (accepted) or refused here (not_leader, busy), or answered from the session cache (duplicate)",
            m.proposals.clone(),
        );
        r.register(
            "applied_batches",
            "Log entries holding client commands applied",
            m.batches.clone(),
        );
        r.register_with_unit(
            "applied_batch_size",
            "Client commands per applied log entry",
            Unit::Other("commands".into()),
            m.batch_commands.clone(),
        );
        r.register_with_unit(
            "applied_batch_size",
            "Bytes of keys and values per applied log entry",
            Unit::Bytes,
            m.batch_bytes.clone(),
        );
        r.register_with_unit(
            "log_sync_duration",
            "One synced write of the write-ahead log (write and fdatasync)",
            Unit::Seconds,
            m.log_sync.clone(),
        );
        r.register_with_unit(
            "log_written",
            "Bytes appended to the write-ahead log",
            Unit::Bytes,
            m.log_bytes.clone(),
        );
        r.register(
            "log_compactions",
            "Log compactions behind a snapshot",
            m.compactions.clone(),
        );
        r.register(
            "chosen_index",
            "Highest slot of the log prefix known chosen",
            m.chosen.clone(),
        );
        r.register(
            "applied_index",
            "Highest log slot applied to the map",
            m.applied.clone(),
        );
        r.register(
            "leader_chosen_index",
            "The chosen index the leader last announced to this replica",
            m.leader_chosen.clone(),
        );
        r.register_with_unit(
            "apply_lag",
            "Log entries the leader has chosen that this replica has not applied",
            Unit::Other("entries".into()),
            m.apply_lag.clone(),
        );
        r.register(
            "is_leader",
            "1 while this replica leads",
            m.is_leader.clone(),
        );
        r.register(
            "leader_id",
            "The leader this replica knows of (0: none)",
            m.leader_id.clone(),
        );
        r.register(
            "ballot_round",
            "Round of the highest ballot promised",
            m.ballot_round.clone(),
        );
        r.register(
            "leader_changes",
            "Times the leader this replica knows of changed",
            m.leader_changes.clone(),
        );
        r.register(
            "elections_started",
            "Times this replica raised its ballot to become leader",
            m.elections.clone(),
        );
        r.register(
            "peer_rpc_errors",
            "Failed calls to a peer, by peer and kind (timeout, unreachable, error, shed)",
            m.peer_errors.clone(),
        );
        r.register(
            "reads_leased",
            "Linearizable reads served as leader under its lease, without a heartbeat round",
            m.reads_leased.clone(),
        );
        r.register(
            "catchup_fetches",
            "Fetch replies received while catching up",
            m.catchup_fetches.clone(),
        );
        r.register(
            "catchup_entries",
            "Log entries received while catching up",
            m.catchup_entries.clone(),
        );
        r.register(
            "snapshot_transfers",
            "Snapshots fetched from a peer, by outcome",
            m.snapshot_transfers.clone(),
        );
        r.register_with_unit(
            "snapshot_transfer",
            "Bytes of snapshots fetched from peers",
            Unit::Bytes,
            m.snapshot_transfer_bytes.clone(),
        );
        r.register_with_unit(
            "snapshot_transfer_duration",
            "Time to fetch, verify and install one snapshot from a peer",
            Unit::Seconds,
            m.snapshot_transfer_duration.clone(),
        );
        r.register(
            "snapshot_chunks_served",
            "Snapshot chunks sent to peers",
            m.snapshot_chunks_served.clone(),
        );
        r.register(
            "snapshots_taken",
            "Snapshots written by this replica, by outcome",
            m.snapshots_taken.clone(),
        );
        r.register_with_unit(
            "snapshot_duration",
            "Time to write one snapshot (serialize and sync), off the driver",
            Unit::Seconds,
            m.snapshot_duration.clone(),
        );
        r.register_with_unit(
            "snapshot_size",
            "Size of the newest snapshot file this replica wrote",
            Unit::Bytes,
            m.snapshot_size.clone(),
        );
        r.register(
            "snapshot_index",
            "Log index of the newest snapshot",
            m.snapshot_index.clone(),
        );
        r.register("keys", "Keys in the map", m.keys.clone());
        r.register_with_unit(
            "data",
            "Bytes of keys and values in the map",
            Unit::Bytes,
            m.data_bytes.clone(),
        );
        r.register(
            "sessions",
            "Client sessions the state machine holds",
            m.sessions.clone(),
        );
        r.register(
            "faults_injected",
            "Faults injected into this replica's peer messages, by kind",
            m.faults.clone(),
        );
        r.register_with_unit(
            "driver_round_duration",
            "One round of the consensus driver: handle inputs, persist, apply",
            Unit::Seconds,
            m.round.clone(),
        );
        Metrics { registry: r, ..m }
    }

    /// The metrics in the OpenMetrics text format (which Prometheus
    /// scrapes; [`CONTENT_TYPE`]).
    pub fn encode(&self) -> String {
        let mut out = String::with_capacity(16 << 10);
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }

    /// Counts a failed call to `peer`.
    pub fn peer_error(&self, peer: ReplicaId, kind: &'static str) {
        self.peer_errors
            .get_or_create(&PeerError { peer, kind })
            .inc();
    }

    /// Counts an injected fault.
    pub fn fault(&self, kind: &'static str) {
        self.faults.get_or_create(&FaultKind { kind }).inc();
    }
}

impl Default for Metrics {
    fn default() -> Metrics {
        Metrics::new()
    }
}

static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::new);

/// This process's metrics.
pub fn global() -> &'static Metrics {
    &METRICS
}

/// A gauge value from a count (saturating at `i64::MAX`).
pub fn gauge_value(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_name_has_the_prefix_and_counters_move() {
        let m = Metrics::new();
        m.client.record(0, 0, Duration::from_millis(2));
        m.peer_error(3, "timeout");
        let text = m.encode();
        assert!(text.ends_with("# EOF\n"), "{text}");
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            assert!(line.starts_with("kvpaxos_"), "{line}");
        }
        assert!(
            text.contains("kvpaxos_client_requests_total{op=\"put\",outcome=\"ok\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("kvpaxos_peer_rpc_errors_total{peer=\"3\",kind=\"timeout\"} 1"),
            "{text}"
        );
        assert!(text.contains("kvpaxos_client_request_duration_seconds_count{op=\"put\"} 1"));
        assert!(text.contains("kvpaxos_applied_batch_size_commands_bucket"));
        assert!(text.contains("kvpaxos_log_sync_duration_seconds_bucket"));
    }
}
