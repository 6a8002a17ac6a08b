//! The admin HTTP listener (`kv-server --admin-addr ADDR`): what an
//! operator's monitoring scrapes and an orchestrator probes.
//!
//! | path | answer |
//! |---|---|
//! | `/metrics` | the metrics, OpenMetrics text ([`crate::metrics`]) |
//! | `/livez` | 200 while the driver loop turns (its last tick is recent), else 503 |
//! | `/readyz` | 200 when this replica knows a leader that is talking to it and is within [`READY_MAX_LAG`] entries of it, else 503; the body says why |
//! | `/status` | this replica's `kv-client status` line, as JSON |
//!
//! With TLS (the replica's `--tls-*`), the listener speaks TLS 1.3 with
//! the replica's certificate. `/metrics` and `/status` then need a client
//! certificate with the `admin` role (403 otherwise); `/livez` and
//! `/readyz` answer without one, because orchestrators probe without
//! client certificates (a Kubernetes HTTPS probe presents none) and they
//! tell nothing but up or not.
//!
//! # Why a hand-written HTTP/1.1 server
//!
//! Four GET endpoints without request bodies, one request per connection:
//! parsing a request line and skipping headers is a few dozen lines, where
//! hyper would add a dozen crates to a build that takes minutes on two
//! cores. What a full server would give and this one needs is bounded
//! here by hand: the request head is at most [`MAX_HEAD`] bytes, a
//! connection lives at most [`CONNECTION_TIMEOUT`] (handshake included),
//! at most [`MAX_CONNECTIONS`] are served at once (more are closed at
//! once), every answer says `Connection: close`, and anything that is not
//! a well-formed `GET`/`HEAD` gets a 4xx — no input reaches a panic.
//! Prometheus, kubelet, curl and load balancers all speak this subset.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kv_api::tls::Role;
use kv_api::{ReplicaId, ReplicaStatus, Slot};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot, Semaphore};

use crate::inbox::Input;

/// Largest request head (request line and headers) read.
pub const MAX_HEAD: usize = 8 * 1024;
/// A connection is closed after this long, answered or not.
pub const CONNECTION_TIMEOUT: Duration = Duration::from_secs(5);
/// Connections served at once; more are closed when accepted.
pub const MAX_CONNECTIONS: usize = 64;
/// `/livez` fails once the driver has not ticked for this long (it ticks
/// every 10 ms; a round may take a while under a large write, but not
/// seconds).
pub const LIVE_STALE: Duration = Duration::from_secs(5);
/// `/readyz` fails once the leader has been silent for this long (it sends
/// heartbeats every 50 ms; an election timeout is 150-300 ms).
pub const LEADER_SILENT: Duration = Duration::from_secs(1);
/// `/readyz` fails while this replica has applied more than this many
/// entries fewer than the leader has announced chosen.
pub const READY_MAX_LAG: u64 = 1_000;
/// How long `/status` waits for the driver.
const STATUS_TIMEOUT: Duration = Duration::from_secs(2);

/// What the driver tells the admin listener, in atomics it writes as it
/// goes and the listener reads without asking it (so that a stuck driver
/// still gets a 503, not a hung probe).
#[derive(Debug)]
pub struct Health {
    started: Instant,
    /// Milliseconds since `started` of the driver's last tick (plus one;
    /// 0: never).
    ticked: AtomicU64,
    /// The leader this replica knows of (0: none).
    leader: AtomicU64,
    is_leader: AtomicBool,
    /// Milliseconds since `started` the leader last spoke to this replica
    /// (plus one; 0: never). On the leader: its last tick as leader.
    leader_heard: AtomicU64,
    leader_chosen: AtomicU64,
    applied: AtomicU64,
    /// 0 voter, 1 rejoining, 2 unknown.
    standing: AtomicU8,
}

impl Default for Health {
    fn default() -> Health {
        Health::new()
    }
}

/// A replica's standing, as [`Health`] keeps it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Standing {
    /// It votes.
    Voter,
    /// It lost its state and is catching up before it votes again.
    Rejoining,
    /// It started empty and asks its peers what they hold.
    Unknown,
}

impl Health {
    /// Nothing known yet.
    pub fn new() -> Health {
        Health {
            started: Instant::now(),
            ticked: AtomicU64::new(0),
            leader: AtomicU64::new(0),
            is_leader: AtomicBool::new(false),
            leader_heard: AtomicU64::new(0),
            leader_chosen: AtomicU64::new(0),
            applied: AtomicU64::new(0),
            standing: AtomicU8::new(2),
        }
    }

    fn now(&self) -> u64 {
        u64::try_from(self.started.elapsed().as_millis())
            .unwrap_or(u64::MAX - 1)
            .saturating_add(1)
    }

    fn since(&self, stamp: u64) -> Option<Duration> {
        (stamp > 0).then(|| Duration::from_millis(self.now().saturating_sub(stamp)))
    }

    /// The driver ticked, knowing `leader` (`is_leader`: itself), having
    /// applied `applied`, with this `standing`. A leader counts as heard
    /// from itself, its own chosen index as the leader's.
    pub fn tick(
        &self,
        leader: Option<ReplicaId>,
        is_leader: bool,
        chosen: Slot,
        applied: Slot,
        standing: Standing,
    ) {
        let now = self.now();
        self.ticked.store(now, Ordering::Relaxed);
        self.leader.store(leader.unwrap_or(0), Ordering::Relaxed);
        self.is_leader.store(is_leader, Ordering::Relaxed);
        self.applied.store(applied, Ordering::Relaxed);
        self.standing.store(
            match standing {
                Standing::Voter => 0,
                Standing::Rejoining => 1,
                Standing::Unknown => 2,
            },
            Ordering::Relaxed,
        );
        if is_leader {
            self.leader_heard.store(now, Ordering::Relaxed);
            self.leader_chosen.store(chosen, Ordering::Relaxed);
        }
    }

    /// The leader's heartbeat (or accept) reached this replica, saying it
    /// has chosen up to `chosen`.
    pub fn heard_leader(&self, chosen: Slot) {
        self.leader_heard.store(self.now(), Ordering::Relaxed);
        self.leader_chosen.fetch_max(chosen, Ordering::Relaxed);
    }

    /// The chosen index the leader last announced (its own, on the leader).
    pub fn leader_chosen(&self) -> Slot {
        self.leader_chosen.load(Ordering::Relaxed)
    }

    /// `Ok` while the driver ticks; the reason otherwise.
    pub fn live(&self) -> Result<String, String> {
        match self.since(self.ticked.load(Ordering::Relaxed)) {
            None => Err("the driver loop has not ticked yet".into()),
            Some(d) if d > LIVE_STALE => Err(format!(
                "the driver loop last ticked {} ms ago (limit {} ms)",
                d.as_millis(),
                LIVE_STALE.as_millis()
            )),
            Some(d) => Ok(format!("ok: the driver ticked {} ms ago", d.as_millis())),
        }
    }

    /// `Ok` when this replica knows a leader that talks to it and is
    /// within [`READY_MAX_LAG`] of it; the reason otherwise.
    pub fn ready(&self) -> Result<String, String> {
        self.live()?;
        let leader = self.leader.load(Ordering::Relaxed);
        if leader == 0 {
            return Err(
                "no leader known (an election may be under way, or no majority \
                        can be reached)"
                    .into(),
            );
        }
        let is_leader = self.is_leader.load(Ordering::Relaxed);
        match self.since(self.leader_heard.load(Ordering::Relaxed)) {
            Some(d) if d <= LEADER_SILENT => {}
            heard => {
                return Err(format!(
                    "the leader (replica {leader}) has not been heard from {} (limit {} ms): \
                     this replica may be cut off",
                    heard.map_or("since start".to_string(), |d| format!(
                        "for {} ms",
                        d.as_millis()
                    )),
                    LEADER_SILENT.as_millis()
                ))
            }
        }
        let applied = self.applied.load(Ordering::Relaxed);
        let lag = self.leader_chosen().saturating_sub(applied);
        if lag > READY_MAX_LAG {
            return Err(format!(
                "{lag} entries behind the leader (replica {leader}), limit {READY_MAX_LAG}: \
                 catching up"
            ));
        }
        let standing = self.standing.load(Ordering::Relaxed);
        let role = if is_leader { "leader" } else { "follower" };
        Ok(format!(
            "ok: {role}, leader {leader}, {lag} entries behind{}",
            match standing {
                1 => ", rejoining",
                2 => ", standing unknown",
                _ => "",
            }
        ))
    }
}

/// What the admin listener serves from.
pub struct Admin {
    /// This replica.
    pub id: ReplicaId,
    /// Its client address (reported in `/status`).
    pub client_addr: String,
    /// Liveness and readiness.
    pub health: Arc<Health>,
    /// The driver, for `/status`.
    pub inputs: mpsc::Sender<Input>,
}

/// An answer.
struct Response {
    code: u16,
    content_type: &'static str,
    body: String,
}

impl Response {
    fn text(code: u16, body: impl Into<String>) -> Response {
        let mut body = body.into();
        body.push('\n');
        Response {
            code,
            content_type: "text/plain; charset=utf-8",
            body,
        }
    }

    fn bytes(&self, head_only: bool) -> Vec<u8> {
        let reason = match self.code {
            200 => "OK",
            400 => "Bad Request",
            403 => "Forbidden",
            404 => "Not Found",
            405 => "Method Not Allowed",
            431 => "Request Header Fields Too Large",
            _ => "Service Unavailable",
        };
        let mut out = format!(
            "HTTP/1.1 {} {reason}\r\nContent-Type: {}\r\nContent-Length: {}\r\n\
             Cache-Control: no-store\r\nConnection: close\r\n\r\n",
            self.code,
            self.content_type,
            self.body.len()
        )
        .into_bytes();
        if !head_only {
            out.extend_from_slice(self.body.as_bytes());
        }
        out
    }
}

/// Serves `listener` for ever (with TLS if `tls` is given: a configuration
/// that asks for, but does not demand, a client certificate).
pub async fn serve(
    listener: TcpListener,
    tls: Option<Arc<rustls::ServerConfig>>,
    admin: Arc<Admin>,
) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let tcp = match listener.accept().await {
            Ok((tcp, _)) => tcp,
            Err(e) => {
                // Out of descriptors, or a connection gone before it was
                // accepted: wait a little rather than spin.
                tracing::debug!(id = admin.id, error = %e, "admin listener: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            continue; // closed at once
        };
        let admin = admin.clone();
        let tls = tls.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let _ = tokio::time::timeout(CONNECTION_TIMEOUT, connection(tcp, tls, &admin)).await;
        });
    }
}

async fn connection(
    tcp: TcpStream,
    tls: Option<Arc<rustls::ServerConfig>>,
    admin: &Admin,
) -> std::io::Result<()> {
    let _ = tcp.set_nodelay(true);
    let has_tls = tls.is_some();
    let mut stream = match tls {
        None => kv_api::tls::Stream::Plain(tcp),
        Some(config) => kv_api::tls::accept(config, tcp).await?,
    };
    let role = stream
        .peer_cert()
        .and_then(|cert| kv_api::tls::role_of(&cert));
    let (response, head_only) = match read_head(&mut stream).await? {
        Err(response) => (response, false),
        Ok(head) => match parse_request_line(&head) {
            Err(response) => (response, false),
            Ok((method, path)) => {
                let head_only = method == "HEAD";
                (route(admin, path, has_tls, role).await, head_only)
            }
        },
    };
    stream.write_all(&response.bytes(head_only)).await?;
    stream.shutdown().await
}

/// Reads up to the end of the request head (`\r\n\r\n`), at most
/// [`MAX_HEAD`] bytes; the body, if any, is not read.
async fn read_head(stream: &mut kv_api::tls::Stream) -> std::io::Result<Result<Vec<u8>, Response>> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    loop {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Ok(Err(Response::text(400, "incomplete request")));
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(end) = find(&buf, b"\r\n\r\n") {
            buf.truncate(end);
            return Ok(Ok(buf));
        }
        if buf.len() > MAX_HEAD {
            return Ok(Err(Response::text(
                431,
                format!("the request head exceeds {MAX_HEAD} bytes"),
            )));
        }
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// `(method, path)` of the request line, the query string dropped.
fn parse_request_line(head: &[u8]) -> Result<(&str, &str), Response> {
    let line_end = find(head, b"\r\n").unwrap_or(head.len());
    let line = std::str::from_utf8(&head[..line_end])
        .map_err(|_| Response::text(400, "the request line is not UTF-8"))?;
    let mut parts = line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(Response::text(400, "malformed request line"));
    };
    if !version.starts_with("HTTP/1.") {
        return Err(Response::text(400, "only HTTP/1.x is spoken here"));
    }
    if method != "GET" && method != "HEAD" {
        return Err(Response::text(405, "only GET and HEAD are served"));
    }
    let path = target.split_once('?').map_or(target, |(p, _)| p);
    Ok((method, path))
}

async fn route(admin: &Admin, path: &str, tls: bool, role: Option<Role>) -> Response {
    let admin_only = |what: &str| -> Option<Response> {
        (tls && role != Some(Role::Admin)).then(|| {
            Response::text(
                403,
                format!(
                    "{what} needs a client certificate with the `admin` role (this one has {})",
                    role.map_or("none".to_string(), |r| format!("`{r}`"))
                ),
            )
        })
    };
    match path {
        "/livez" => match admin.health.live() {
            Ok(why) => Response::text(200, why),
            Err(why) => Response::text(503, why),
        },
        "/readyz" => match admin.health.ready() {
            Ok(why) => Response::text(200, why),
            Err(why) => Response::text(503, why),
        },
        "/metrics" => {
            if let Some(refused) = admin_only("/metrics") {
                return refused;
            }
            Response {
                code: 200,
                content_type: crate::metrics::CONTENT_TYPE,
                body: crate::metrics::global().encode(),
            }
        }
        "/status" => {
            if let Some(refused) = admin_only("/status") {
                return refused;
            }
            match status(admin).await {
                Some(status) => Response {
                    code: 200,
                    content_type: "application/json",
                    body: status_json(&admin.client_addr, &status) + "\n",
                },
                None => Response::text(503, "the replica did not answer in time (stopping?)"),
            }
        }
        _ => Response::text(404, "not found: try /metrics, /livez, /readyz or /status"),
    }
}

async fn status(admin: &Admin) -> Option<ReplicaStatus> {
    let (tx, rx) = oneshot::channel();
    let ask = async {
        admin.inputs.send(Input::Status { reply: tx }).await.ok()?;
        rx.await.ok()
    };
    tokio::time::timeout(STATUS_TIMEOUT, ask).await.ok()?
}

/// The status as `kv-client status` prints it: the replica's fields with
/// its address and `"up": true`.
pub fn status_json(addr: &str, status: &ReplicaStatus) -> String {
    let mut value = serde_json::to_value(status).unwrap_or_default();
    if let Some(map) = value.as_object_mut() {
        map.insert("addr".into(), addr.into());
        map.insert("up".into(), true.into());
    }
    value.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_lines_are_parsed_or_refused() {
        let ok = parse_request_line(b"GET /metrics?x=1 HTTP/1.1\r\nHost: a").map_err(|r| r.code);
        assert_eq!(ok.ok(), Some(("GET", "/metrics")));
        for (bad, code) in [
            (&b"POST /metrics HTTP/1.1"[..], 405),
            (b"GET /metrics", 400),
            (b"GET  /metrics HTTP/1.1", 400),
            (b"GET /metrics SPDY/3", 400),
            (b"\xff\xfe", 400),
            (b"", 400),
        ] {
            match parse_request_line(bad) {
                Err(r) => assert_eq!(r.code, code, "{bad:?}"),
                Ok(p) => panic!("{bad:?} parsed as {p:?}"),
            }
        }
    }

    #[test]
    fn readiness_needs_a_leader_heard_from_and_a_small_lag() {
        let h = Health::new();
        assert!(h.live().is_err(), "not ticked yet");
        h.tick(None, false, 0, 0, Standing::Voter);
        assert!(h.live().is_ok());
        assert!(h.ready().unwrap_err().contains("no leader"));
        h.tick(Some(2), false, 0, 0, Standing::Voter);
        assert!(h.ready().unwrap_err().contains("not been heard"));
        h.heard_leader(5_000);
        assert!(h.ready().unwrap_err().contains("5000 entries behind"));
        h.tick(Some(2), false, 5_000, 4_500, Standing::Voter);
        assert!(h.ready().is_ok(), "{:?}", h.ready());
        h.tick(Some(1), true, 7, 7, Standing::Voter);
        assert!(h.ready().unwrap().contains("leader"));
    }
}
