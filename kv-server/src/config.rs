//! Configuration of one replica.

use std::path::PathBuf;
use std::time::Duration;

use kv_api::replicas::Replicas;
use kv_api::{Limits, ReplicaId};

use crate::{Result, ServerError};

/// Everything one replica needs to run. Public fields; `validate()` checks them.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    /// This replica's id; must appear in `replicas`.
    pub id: ReplicaId,
    /// All replicas, this one included.
    pub replicas: Replicas,
    /// Where this replica keeps its log and snapshots (created if missing).
    pub data_dir: PathBuf,
    /// Key and value size limits.
    pub limits: Limits,
    /// The consensus clock's tick.
    pub tick: Duration,
    /// Deadline of one call to a peer.
    pub peer_timeout: Duration,
    /// Take a snapshot every this many applied log entries; the log behind
    /// it is then dropped (one interval of it is kept, so peers slightly
    /// behind can still catch up from the log).
    pub snapshot_every: u64,
    /// Whether this replica, leading, serves linearizable reads from its
    /// lease (`--no-read-lease` turns it off; see `paxos::read_index`).
    pub read_lease: bool,
    /// Whether failure injection may be used: at start (`faults`) and at
    /// run time (`set_faults`, refused with `Disabled` otherwise; a
    /// report-only call is answered either way). Off by default
    /// (`--enable-fault-injection`).
    pub enable_fault_injection: bool,
    /// Failure injection at start (changeable at run time); must be empty
    /// unless `enable_fault_injection`.
    pub faults: kv_api::FaultSpec,
    /// Seed of the failure injector's random choices (`None`: random, logged).
    pub fault_seed: Option<u64>,
    /// A client session idle (no write) for longer than this expires. Goes
    /// into the log with each session this replica opens as leader, so
    /// replicas with different settings still agree.
    pub session_ttl: Duration,
    /// Opening a session beyond this many evicts the least recently used
    /// (into the log like `session_ttl`).
    pub max_sessions: u64,
    /// TLS on both ports (`--tls-ca`, `--tls-cert`, `--tls-key`): the
    /// certificate must name this replica (`replica-ID`). `None`: plain TCP.
    pub tls: Option<kv_api::tls::TlsFiles>,
    /// The configuration a joining replica (`--join`) was given by the
    /// cluster: its starting point if its data directory holds none (then
    /// `replicas` lists the same members). `None`: a new cluster's first
    /// configuration is the replica file.
    pub join: Option<kv_api::membership::Membership>,
    /// Where the admin HTTP listener serves `/metrics`, `/livez`,
    /// `/readyz` and `/status` (`--admin-addr`; `None`: no listener).
    pub admin_addr: Option<String>,
    /// Where the RESP listener serves Redis clients (`--redis-addr`, else
    /// the replica file's fourth column; `None`: no listener).
    pub redis_addr: Option<String>,
}

impl ServerConfig {
    /// A configuration with default tuning.
    pub fn new(id: ReplicaId, replicas: Replicas, data_dir: PathBuf) -> ServerConfig {
        ServerConfig {
            id,
            replicas,
            data_dir,
            limits: Limits::default(),
            tick: Duration::from_millis(10),
            peer_timeout: Duration::from_millis(500),
            snapshot_every: 10_000,
            read_lease: true,
            enable_fault_injection: false,
            faults: kv_api::FaultSpec::default(),
            fault_seed: None,
            session_ttl: Duration::from_millis(crate::state::DEFAULT_SESSION_TTL_MS),
            max_sessions: crate::state::DEFAULT_MAX_SESSIONS,
            tls: None,
            join: None,
            admin_addr: None,
            redis_addr: None,
        }
    }

    /// Loads the TLS files, if configured, and checks that the certificate
    /// names this replica: a replica presenting another's certificate would
    /// be refused by every peer.
    pub fn load_tls(&self) -> Result<Option<kv_api::tls::Tls>> {
        let Some(files) = &self.tls else {
            return Ok(None);
        };
        let tls = kv_api::tls::Tls::load(files).map_err(|e| ServerError::Config(e.to_string()))?;
        {
            use std::os::unix::fs::PermissionsExt;
            if let Ok(meta) = std::fs::metadata(&files.key) {
                let mode = meta.permissions().mode() & 0o777;
                if mode & 0o077 != 0 {
                    tracing::warn!(
                        key = %files.key.display(),
                        mode = format_args!("{mode:o}"),
                        "the private key is readable by other users; `chmod 600` it \
                         (whoever reads it can act as this replica)"
                    );
                }
            }
        }
        let name = kv_api::tls::replica_name(self.id);
        if !kv_api::tls::names(tls.cert(), &name) {
            return Err(ServerError::Config(format!(
                "{}: the certificate does not name {name} (a DNS subject alternative name), \
                 so the other replicas would refuse it; give --tls-cert the one made for \
                 replica {} (`kv-server certs` writes replica-{}.pem)",
                files.cert.display(),
                self.id,
                self.id
            )));
        }
        Ok(Some(tls))
    }

    /// Checks that the id is in the replica list and the tuning is sane.
    pub fn validate(&self) -> Result<()> {
        if self.replicas.get(self.id).is_none() {
            let ids: Vec<String> = self
                .replicas
                .replicas
                .iter()
                .map(|r| r.id.to_string())
                .collect();
            return Err(ServerError::Config(format!(
                "--id {} is not in {} (its ids are {})",
                self.id,
                self.replicas.source.display(),
                ids.join(", ")
            )));
        }
        if self.snapshot_every == 0 {
            return Err(ServerError::Config(
                "--snapshot-every must be at least 1".into(),
            ));
        }
        self.faults
            .validate()
            .map_err(|e| ServerError::Config(e.to_string()))?;
        if !self.enable_fault_injection && self.faults != kv_api::FaultSpec::default() {
            return Err(ServerError::Config(
                "failure injection at start needs --enable-fault-injection".into(),
            ));
        }
        if self.session_ttl < Duration::from_millis(1) || self.max_sessions == 0 {
            return Err(ServerError::Config(
                "--session-ttl must be at least 1 ms and --max-sessions at least 1".into(),
            ));
        }
        if self.tick.is_zero() || self.peer_timeout.is_zero() {
            return Err(ServerError::Config(
                "tick and peer timeout must be positive".into(),
            ));
        }
        Ok(())
    }
}
