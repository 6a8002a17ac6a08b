//! One place for the network: listening, dialling, framing and the limits
//! on what a client or a peer can make a replica hold.
//!
//! tarpc's own TCP transport is not used on the serving side, because it
//! decodes a request's deadline with `Instant::now() + Duration`, which
//! panics on a deadline near u64::MAX seconds (one 15-byte frame used to kill
//! the task serving every connection of a port). Here frames are decoded
//! into mirror types of tarpc's `ClientMessage`, `Request` and `Context`
//! whose deadline is a plain `Duration`, clamped to [`MAX_DEADLINE`] before
//! tarpc's types are built. The wire format is unchanged: a 4-byte
//! big-endian length, then bincode with its default options (varint
//! integers), exactly what tarpc's `serde_transport` with `Bincode` speaks,
//! so clients need not change.
//!
//! Every connection is served by its own task: a panic or a stuck
//! connection affects that connection only. The accept loop never returns
//! on its own; `run` treats a listener task that ends, for any reason, as
//! fatal (a replica that cannot be reached must not look alive).
//!
//! # Limits
//!
//! | limit | value | beyond it |
//! |---|---|---|
//! | frame, client port | `2 × max value + max key + 64 KiB` (~2 MiB) | connection closed |
//! | frame, peer port | [`kv_api::MAX_FRAME`] | connection closed |
//! | connections per listener | [`MAX_CLIENT_CONNECTIONS`] (1024), [`MAX_PEER_CONNECTIONS`] (128) | new connections closed at once; one warning per [`LOG_INTERVAL`] |
//! | requests in flight per connection | [`MAX_IN_FLIGHT_PER_CONNECTION`] (1024) | answered at once with tarpc's "throttled" error (`WouldBlock`), which the SDK retries with backoff |
//! | idle connection | [`IDLE_TIMEOUT`] (5 min) without a frame either way | closed |
//! | request deadline | [`MAX_DEADLINE`] (10 s) | clamped |
//!
//! What a connection can pin is therefore bounded: its frame buffer, and
//! its requests in flight, each until its (clamped) deadline. Malformed
//! frames close their connection; they are logged at most once per
//! [`LOG_INTERVAL`] per listener, since the sender controls their rate.
//!
//! Tests lower the limits with the environment variable
//! `KV_TEST_NET_LIMITS=connections=N,in_flight=N,idle_ms=N` (any subset; a
//! name prefixed `client.` or `peer.` applies to that port only, the others
//! to both). It is logged as a warning, and it is not a tuning knob.

use std::future::Future;
use std::io;
use std::marker::PhantomData;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bincode::Options;
use futures::{Sink, Stream};
use kv_api::tls::Stream as Socket;
use rustls::pki_types::{CertificateDer, ServerName};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tarpc::server::limits::requests_per_channel::MaxRequests;
use tarpc::server::{BaseChannel, Channel};
use tarpc::tokio_util::bytes::{Bytes, BytesMut};
use tarpc::tokio_util::codec::{Framed, LengthDelimitedCodec};
use tarpc::{ClientMessage, Response};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

use crate::{Result, ServerError};

/// Connections served at once on the client port. Beyond it a new
/// connection is closed as soon as it is accepted, so that clients fail
/// over at once instead of queueing in the kernel's backlog.
pub const MAX_CLIENT_CONNECTIONS: usize = 1024;

/// Connections served at once on the peer port. A cluster needs one per
/// other replica (plus a few while broken ones are redialled); the rest of
/// the room is for the supervisor and for reconnect storms.
pub const MAX_PEER_CONNECTIONS: usize = 128;

/// Requests in flight on one connection. Above the tarpc client's own
/// default (1,000), so a well-behaved client is never throttled; the limit
/// is for clients that pipeline without bound.
pub const MAX_IN_FLIGHT_PER_CONNECTION: usize = 1024;

/// A connection that carries no frame in either direction for this long is
/// closed. Longer than [`MAX_DEADLINE`], so no request that could still be
/// answered is cut off. Clients redial on demand.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(5 * 60);

/// The longest deadline a request keeps: larger ones (up to u64::MAX
/// seconds on the wire) are cut to this. A request holds its in-flight slot,
/// and its connection stays open after the client has gone, at most this
/// long, so it bounds how long a client can pin a connection slot with
/// requests that wait (on a cut link, an unreachable leader). Every
/// legitimate wait is shorter: peer calls wait the peer timeout (0.5 s),
/// snapshot chunks ten times that; the SDK gives each attempt one second;
/// `status` and `set_faults` are answered at once.
pub const MAX_DEADLINE: Duration = Duration::from_secs(10);

/// Warnings about events a remote party controls the rate of (refused
/// connections, malformed frames, accept errors) are logged at most once
/// per this interval per listener, with a count of what was not logged.
pub const LOG_INTERVAL: Duration = Duration::from_secs(10);

/// Headroom on the client port's frame limit over the largest operation
/// (a compare-and-swap: key, expected and new value) for the request's
/// framing fields.
const CLIENT_FRAME_HEADROOM: usize = 64 * 1024;

/// How long a TLS handshake may take before its connection is closed (it
/// holds a connection slot meanwhile).
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Failed TLS handshakes logged per [`LOG_INTERVAL`] per listener: each
/// names who and why, so more than one, but bounded, since whoever can
/// reach the port controls their rate.
const HANDSHAKE_LOG_BURST: u32 = 20;

/// After an accept error that means the process is short of a resource
/// (file descriptors, memory), wait this long before accepting again
/// rather than spinning.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// The environment variable through which tests lower the limits.
pub const TEST_LIMITS_ENV: &str = "KV_TEST_NET_LIMITS";

/// Which of a replica's two listeners.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Port {
    /// The client address (`Kv`).
    Client,
    /// The peer address (`Peer`).
    Peer,
}

impl std::fmt::Display for Port {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Port::Client => "client",
            Port::Peer => "peer",
        })
    }
}

/// The limits one listener enforces (see the module documentation).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NetLimits {
    /// Largest frame accepted (and sent) on a connection.
    pub max_frame: usize,
    /// Connections served at once.
    pub connections: usize,
    /// Requests in flight per connection.
    pub in_flight: usize,
    /// A connection without a frame for this long is closed.
    pub idle: Duration,
    /// Request deadlines are clamped to this.
    pub max_deadline: Duration,
}

impl NetLimits {
    /// The limits of `port`, for keys and values within `limits`, lowered
    /// by [`TEST_LIMITS_ENV`] if it is set.
    pub fn for_port(port: Port, limits: &kv_api::Limits) -> Result<NetLimits> {
        let mut l = match port {
            Port::Client => NetLimits {
                max_frame: client_frame_limit(limits),
                connections: MAX_CLIENT_CONNECTIONS,
                in_flight: MAX_IN_FLIGHT_PER_CONNECTION,
                idle: IDLE_TIMEOUT,
                max_deadline: MAX_DEADLINE,
            },
            Port::Peer => NetLimits {
                max_frame: kv_api::MAX_FRAME,
                connections: MAX_PEER_CONNECTIONS,
                in_flight: MAX_IN_FLIGHT_PER_CONNECTION,
                idle: IDLE_TIMEOUT,
                max_deadline: MAX_DEADLINE,
            },
        };
        if let Ok(text) = std::env::var(TEST_LIMITS_ENV) {
            l.apply_override(port, &text)
                .map_err(|e| ServerError::Config(format!("{TEST_LIMITS_ENV}={text:?}: {e}")))?;
            tracing::warn!(%port, limits = ?l, "network limits lowered by {TEST_LIMITS_ENV} (for tests only)");
        }
        Ok(l)
    }

    /// Applies `connections=N,in_flight=N,idle_ms=N` (any subset; a name
    /// may be prefixed `client.` or `peer.` to apply to that port only).
    fn apply_override(&mut self, port: Port, text: &str) -> std::result::Result<(), String> {
        for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (name, value) = part
                .split_once('=')
                .ok_or_else(|| format!("{part:?} is not NAME=NUMBER"))?;
            let name = match name.trim().split_once('.') {
                Some(("client", rest)) if port == Port::Client => rest,
                Some(("peer", rest)) if port == Port::Peer => rest,
                Some(("client" | "peer", _)) => continue,
                Some(_) => return Err(format!("{name:?}: the prefix must be client. or peer.")),
                None => name,
            };
            let n: u64 = value
                .trim()
                .parse()
                .ok()
                .filter(|&n| n > 0)
                .ok_or_else(|| format!("{value:?} is not a positive integer"))?;
            let n_usize = usize::try_from(n).map_err(|_| format!("{n} is too large"))?;
            match name.trim() {
                "connections" => self.connections = n_usize,
                "in_flight" => self.in_flight = n_usize,
                "idle_ms" => self.idle = Duration::from_millis(n),
                other => {
                    return Err(format!(
                        "unknown limit {other:?} (known: connections, in_flight, idle_ms)"
                    ))
                }
            }
        }
        // The idle timeout must not cut off requests that can still be
        // answered.
        self.max_deadline = self.max_deadline.min(self.idle);
        Ok(())
    }
}

/// The largest client request: a compare-and-swap carrying a maximal key,
/// expected value and new value, plus framing.
fn client_frame_limit(limits: &kv_api::Limits) -> usize {
    limits
        .max_value
        .saturating_mul(2)
        .saturating_add(limits.max_key)
        .saturating_add(CLIENT_FRAME_HEADROOM)
        .min(kv_api::MAX_FRAME)
}

/// The bincode options of tarpc's `Bincode` codec (tokio-serde uses
/// `bincode::DefaultOptions`), with an allocation limit of one frame.
fn options(max_frame: usize) -> impl Options + Copy {
    bincode::DefaultOptions::new().with_limit(max_frame as u64)
}

// ---------------------------------------------------------------------------
// Decoding what a client sends, without panicking.

/// tarpc's `ClientMessage<T>`, field for field, as bincode sees it.
#[derive(Deserialize)]
enum WireClientMessage<T> {
    Request(WireRequest<T>),
    Cancel {
        trace_context: tarpc::trace::Context,
        request_id: u64,
    },
}

/// tarpc's `Request<T>`.
#[derive(Deserialize)]
struct WireRequest<T> {
    context: WireContext,
    id: u64,
    message: T,
}

/// tarpc's `context::Context`, with the deadline as sent: the time left.
#[derive(Deserialize)]
struct WireContext {
    deadline: Duration,
    trace_context: tarpc::trace::Context,
}

/// Decodes one frame from a client into tarpc's message, the deadline
/// clamped to `max_deadline`. Any input gives a message or an error.
fn decode_request<Req: DeserializeOwned>(
    frame: &[u8],
    max_frame: usize,
    max_deadline: Duration,
) -> bincode::Result<ClientMessage<Req>> {
    let wire: WireClientMessage<Req> = options(max_frame).deserialize(frame)?;
    Ok(match wire {
        WireClientMessage::Request(r) => {
            let mut context = tarpc::context::current();
            context.deadline = Instant::now() + r.context.deadline.min(max_deadline);
            context.trace_context = r.context.trace_context;
            ClientMessage::Request(tarpc::Request {
                context,
                id: r.id,
                message: r.message,
            })
        }
        WireClientMessage::Cancel {
            trace_context,
            request_id,
        } => ClientMessage::Cancel {
            trace_context,
            request_id,
        },
    })
}

// ---------------------------------------------------------------------------
// Rate-limited logging of what remote parties cause.

/// Lets `burst` log lines through per [`LOG_INTERVAL`] (one by default);
/// counts the others.
pub(crate) struct Throttle {
    /// The start of the current interval and the lines let through in it.
    window: Mutex<Option<(Instant, u32)>>,
    burst: u32,
    suppressed: AtomicU64,
}

impl Throttle {
    pub(crate) fn new() -> Throttle {
        Throttle::with_burst(1)
    }

    /// Up to `burst` lines per interval: for events where each line names
    /// a different party worth knowing about (failed TLS handshakes).
    pub(crate) fn with_burst(burst: u32) -> Throttle {
        Throttle {
            window: Mutex::new(None),
            burst: burst.max(1),
            suppressed: AtomicU64::new(0),
        }
    }

    /// `Some(n)` if a line may be logged now, `n` being how many were
    /// suppressed since the last one; `None` (and counted) otherwise.
    pub(crate) fn allow(&self) -> Option<u64> {
        let now = Instant::now();
        let mut window = self.window.lock().unwrap_or_else(|p| p.into_inner());
        match &mut *window {
            Some((start, n)) if now.duration_since(*start) < LOG_INTERVAL => {
                if *n >= self.burst {
                    self.suppressed.fetch_add(1, Ordering::Relaxed);
                    return None;
                }
                *n += 1;
            }
            w => *w = Some((now, 1)),
        }
        Some(self.suppressed.swap(0, Ordering::Relaxed))
    }
}

/// What one listener shares with its connections.
struct ListenerState {
    port: Port,
    addr: String,
    limits: NetLimits,
    /// Malformed or oversized frames.
    bad_frames: Throttle,
    /// Connections closed at the connection limit.
    refusals: Throttle,
    /// Errors from `accept`.
    accept_errors: Throttle,
    /// TLS on this port, if configured: every connection must complete a
    /// handshake, with a client certificate signed by the cluster's CA.
    tls: Option<Arc<rustls::ServerConfig>>,
    /// Failed TLS handshakes.
    handshakes: Throttle,
}

impl ListenerState {
    /// Logs, at `throttle`'s rate, that the connection from `from` is
    /// closed, and why.
    fn closing(&self, throttle: &Throttle, from: SocketAddr, why: std::fmt::Arguments<'_>) {
        if let Some(more) = throttle.allow() {
            tracing::warn!(
                port = %self.port,
                addr = %self.addr,
                %from,
                also_since_last_warning = more,
                "closing a connection {why}"
            );
        }
    }

    fn bad_frame(&self, from: SocketAddr, what: &str) {
        self.closing(
            &self.bad_frames,
            from,
            format_args!("that sent a bad frame: {what}"),
        );
    }
}

// ---------------------------------------------------------------------------
// Activity, for the idle timeout.

/// When a connection last carried a frame, in milliseconds since `base`.
struct Activity {
    base: Instant,
    last_ms: AtomicU64,
}

impl Activity {
    fn new() -> Activity {
        Activity {
            base: Instant::now(),
            last_ms: AtomicU64::new(0),
        }
    }

    fn touch(&self) {
        let ms = u64::try_from(self.base.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_ms.store(ms, Ordering::Relaxed);
    }

    fn last(&self) -> Instant {
        self.base + Duration::from_millis(self.last_ms.load(Ordering::Relaxed))
    }

    /// Resolves once `idle` has passed without a frame.
    async fn idle_for(&self, idle: Duration) {
        loop {
            let due = self.last() + idle;
            if Instant::now() >= due {
                return;
            }
            tokio::time::sleep_until(due.into()).await;
        }
    }
}

// ---------------------------------------------------------------------------
// The serving side's transport.

/// A server connection as tarpc sees it: a stream of decoded client
/// messages and a sink of responses. A frame that is oversized or cannot be
/// decoded ends the stream (tarpc then finishes the requests in flight and
/// closes the connection); so does a read error.
pub struct ServerWire<Req, Resp> {
    framed: Framed<Socket, LengthDelimitedCodec>,
    from: SocketAddr,
    state: Arc<ListenerState>,
    activity: Arc<Activity>,
    done: bool,
    _types: PhantomData<fn() -> (Req, Resp)>,
}

impl<Req: DeserializeOwned, Resp> Stream for ServerWire<Req, Resp> {
    type Item = io::Result<ClientMessage<Req>>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        if this.done {
            return Poll::Ready(None);
        }
        let frame = match Pin::new(&mut this.framed).poll_next(cx) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(None) => None,
            Poll::Ready(Some(Ok(frame))) => Some(frame),
            Poll::Ready(Some(Err(e))) => {
                // Oversized frames come here as InvalidData; resets and
                // the like are a client going away, not worth a warning.
                if e.kind() == io::ErrorKind::InvalidData {
                    this.state.bad_frame(this.from, &e.to_string());
                } else {
                    tracing::debug!(port = %this.state.port, from = %this.from, error = %e, "connection read failed");
                }
                None
            }
        };
        let Some(frame) = frame else {
            this.done = true;
            return Poll::Ready(None);
        };
        this.activity.touch();
        let limits = &this.state.limits;
        match decode_request(&frame, limits.max_frame, limits.max_deadline) {
            Ok(msg) => Poll::Ready(Some(Ok(msg))),
            Err(e) => {
                this.state
                    .bad_frame(this.from, &format!("{} bytes: {e}", frame.len()));
                this.done = true;
                Poll::Ready(None)
            }
        }
    }
}

impl<Req, Resp: Serialize> Sink<Response<Resp>> for ServerWire<Req, Resp> {
    type Error = io::Error;

    fn poll_ready(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Sink::<Bytes>::poll_ready(Pin::new(&mut self.get_mut().framed), cx)
    }

    fn start_send(self: Pin<&mut Self>, item: Response<Resp>) -> io::Result<()> {
        let this = self.get_mut();
        this.activity.touch();
        let bytes = encode(&WireResponse::from(&item), this.state.limits.max_frame)?;
        Sink::<Bytes>::start_send(Pin::new(&mut this.framed), bytes)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Sink::<Bytes>::poll_flush(Pin::new(&mut self.get_mut().framed), cx)
    }

    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Sink::<Bytes>::poll_close(Pin::new(&mut self.get_mut().framed), cx)
    }
}

/// tarpc's `Response<T>` as sent. tarpc's own serializer writes a
/// `ServerError`'s kind as an `i32` (an untyped integer literal) but reads it
/// as a `u32`; with bincode's varint encoding the zigzagged value comes back
/// as another kind (`WouldBlock`, tarpc's "throttled", arrives as `Other`).
/// Sent as the `u32` tarpc reads, clients can tell a throttled request.
#[derive(Serialize)]
struct WireResponse<'a, T> {
    request_id: u64,
    message: std::result::Result<&'a T, WireServerError<'a>>,
}

/// tarpc's `ServerError`, its kind as the `u32` its deserializer expects.
#[derive(Serialize)]
struct WireServerError<'a> {
    kind: u32,
    detail: &'a str,
}

impl<'a, T> From<&'a Response<T>> for WireResponse<'a, T> {
    fn from(r: &'a Response<T>) -> Self {
        WireResponse {
            request_id: r.request_id,
            message: match &r.message {
                Ok(v) => Ok(v),
                Err(e) => Err(WireServerError {
                    kind: io_error_kind_code(e.kind),
                    detail: &e.detail,
                }),
            },
        }
    }
}

/// tarpc's table (`util::serde::serialize_io_error_kind_as_u32`).
fn io_error_kind_code(kind: io::ErrorKind) -> u32 {
    use io::ErrorKind::*;
    match kind {
        NotFound => 0,
        PermissionDenied => 1,
        ConnectionRefused => 2,
        ConnectionReset => 3,
        ConnectionAborted => 4,
        NotConnected => 5,
        AddrInUse => 6,
        AddrNotAvailable => 7,
        BrokenPipe => 8,
        AlreadyExists => 9,
        WouldBlock => 10,
        InvalidInput => 11,
        InvalidData => 12,
        TimedOut => 13,
        WriteZero => 14,
        Interrupted => 15,
        UnexpectedEof => 17,
        _ => 16,
    }
}

fn encode<T: Serialize>(item: &T, max_frame: usize) -> io::Result<Bytes> {
    let bytes = options(max_frame)
        .serialize(item)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
    Ok(Bytes::from(bytes))
}

fn framed(stream: Socket, max_frame: usize) -> Framed<Socket, LengthDelimitedCodec> {
    LengthDelimitedCodec::builder()
        .max_frame_length(max_frame)
        .new_framed(stream)
}

/// One accepted connection (its TLS handshake done, if the port has TLS),
/// handed to the listener's serving closure.
pub struct Conn {
    stream: Socket,
    from: SocketAddr,
    state: Arc<ListenerState>,
    activity: Arc<Activity>,
}

impl Conn {
    /// The remote address.
    pub fn from(&self) -> SocketAddr {
        self.from
    }

    /// The certificate the other side presented (verified against the
    /// cluster's CA), on a TLS port.
    pub fn peer_cert(&self) -> Option<CertificateDer<'static>> {
        self.stream.peer_cert()
    }

    /// Whether this port has TLS.
    pub fn tls(&self) -> bool {
        self.state.tls.is_some()
    }

    /// The connection as a tarpc channel with this listener's limit on
    /// requests in flight.
    pub fn channel<Req, Resp>(self) -> MaxRequests<BaseChannel<Req, Resp, ServerWire<Req, Resp>>>
    where
        Req: DeserializeOwned,
        Resp: Serialize,
    {
        let in_flight = self.state.limits.in_flight;
        let wire = ServerWire {
            framed: framed(self.stream, self.state.limits.max_frame),
            from: self.from,
            state: self.state,
            activity: self.activity,
            done: false,
            _types: PhantomData,
        };
        BaseChannel::with_defaults(wire).max_concurrent_requests(in_flight)
    }
}

/// A bound listener, not yet serving.
pub struct Listener {
    listener: TcpListener,
    state: Arc<ListenerState>,
}

impl Listener {
    /// Binds `addr` for `port` with `limits`, and TLS if `tls` is given.
    pub async fn bind(
        addr: String,
        port: Port,
        limits: NetLimits,
        tls: Option<Arc<rustls::ServerConfig>>,
    ) -> Result<Listener> {
        let listener = TcpListener::bind(&addr)
            .await
            .map_err(|error| ServerError::Bind {
                addr: addr.clone(),
                error,
            })?;
        Ok(Listener {
            listener,
            state: Arc::new(ListenerState {
                port,
                addr,
                limits,
                bad_frames: Throttle::new(),
                refusals: Throttle::new(),
                accept_errors: Throttle::new(),
                tls,
                handshakes: Throttle::with_burst(HANDSHAKE_LOG_BURST),
            }),
        })
    }

    /// The address actually bound.
    #[cfg(test)]
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Accepts connections for ever, each served by `serve` in its own task
    /// (after its TLS handshake, on a TLS port; closed when idle too long).
    /// Returns only if the listening socket itself is broken.
    pub async fn run<F, Fut>(self, serve: F) -> io::Error
    where
        F: Fn(Conn) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let Listener { listener, state } = self;
        let serve = Arc::new(serve);
        let slots = Arc::new(Semaphore::new(state.limits.connections));
        loop {
            let (stream, from) = match listener.accept().await {
                Ok(accepted) => accepted,
                Err(e) => match accept_error(&e) {
                    AcceptError::Fatal => return e,
                    AcceptError::Connection => {
                        // That connection went away before it was accepted.
                        tracing::debug!(port = %state.port, error = %e, "accept failed");
                        continue;
                    }
                    AcceptError::Exhausted => {
                        if let Some(more) = state.accept_errors.allow() {
                            tracing::error!(
                                port = %state.port,
                                addr = %state.addr,
                                error = %e,
                                also_since_last_error = more,
                                "cannot accept connections: out of file descriptors or \
                                 memory (raise the descriptor limit, `ulimit -n`, above \
                                 the connection limits)"
                            );
                        }
                        tokio::time::sleep(ACCEPT_BACKOFF).await;
                        continue;
                    }
                },
            };
            let Ok(slot) = slots.clone().try_acquire_owned() else {
                // Closed at once: the client sees it and fails over, rather
                // than waiting in a queue that an attacker keeps full.
                drop(stream);
                if let Some(more) = state.refusals.allow() {
                    tracing::warn!(
                        port = %state.port,
                        addr = %state.addr,
                        %from,
                        limit = state.limits.connections,
                        also_since_last_warning = more,
                        "connection limit reached; closing new connections"
                    );
                }
                continue;
            };
            // Small request/response messages: Nagle's algorithm against
            // delayed ACKs would hold them ~40 ms.
            let _ = stream.set_nodelay(true);
            let activity = Arc::new(Activity::new());
            let idle = state.limits.idle;
            let state = state.clone();
            let serve = serve.clone();
            tokio::spawn(async move {
                let Some(stream) = handshake(&state, stream, from).await else {
                    drop(slot);
                    return;
                };
                let port = state.port;
                let conn = Conn {
                    stream,
                    from,
                    state,
                    activity: activity.clone(),
                };
                tokio::select! {
                    () = serve(conn) => {}
                    () = activity.idle_for(idle) => {
                        tracing::debug!(%port, %from, ?idle, "closing an idle connection");
                    }
                }
                drop(slot);
            });
        }
    }
}

/// The connection as served: plain, or after a TLS handshake bounded by
/// [`HANDSHAKE_TIMEOUT`]. A failed handshake (plain TCP or garbage on a TLS
/// port, no certificate, an expired one, one from another CA) closes this
/// connection only, with a warning that says who and why.
async fn handshake(state: &ListenerState, stream: TcpStream, from: SocketAddr) -> Option<Socket> {
    let Some(config) = &state.tls else {
        return Some(Socket::Plain(stream));
    };
    let why = match tokio::time::timeout(
        HANDSHAKE_TIMEOUT,
        kv_api::tls::accept(config.clone(), stream),
    )
    .await
    {
        Ok(Ok(stream)) => return Some(stream),
        Ok(Err(e)) => e.to_string(),
        Err(_) => format!("no handshake within {HANDSHAKE_TIMEOUT:?}"),
    };
    state.closing(
        &state.handshakes,
        from,
        format_args!("whose TLS handshake failed: {why}"),
    );
    None
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum AcceptError {
    /// This connection only (aborted before accept, protocol error, ...).
    Connection,
    /// The process is short of descriptors or memory: back off.
    Exhausted,
    /// The listening socket itself is unusable.
    Fatal,
}

fn accept_error(e: &io::Error) -> AcceptError {
    match e.raw_os_error() {
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM) => AcceptError::Exhausted,
        Some(libc::EBADF | libc::EINVAL | libc::ENOTSOCK | libc::EOPNOTSUPP | libc::EFAULT) => {
            AcceptError::Fatal
        }
        _ => AcceptError::Connection,
    }
}

// ---------------------------------------------------------------------------
// The dialling side's transport.

/// An outgoing connection as a tarpc client sees it. It sets `closed` when
/// the connection ends (EOF, error, undecodable frame), so that its owner
/// redials before the next call instead of losing it to a dead connection
/// (a peer closes idle connections).
pub struct ClientWire<Req, Resp> {
    framed: Framed<Socket, LengthDelimitedCodec>,
    max_frame: usize,
    closed: Arc<AtomicBool>,
    _types: PhantomData<fn() -> (Req, Resp)>,
}

impl<Req, Resp> ClientWire<Req, Resp> {
    fn close(&mut self) {
        self.closed.store(true, Ordering::Relaxed);
    }
}

impl<Req, Resp: DeserializeOwned> Stream for ClientWire<Req, Resp> {
    type Item = io::Result<Response<Resp>>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        match Pin::new(&mut this.framed).poll_next(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Some(Ok(frame))) => {
                let decoded = decode_response(&frame, this.max_frame);
                if decoded.is_err() {
                    this.close();
                }
                Poll::Ready(Some(decoded))
            }
            Poll::Ready(Some(Err(e))) => {
                this.close();
                Poll::Ready(Some(Err(e)))
            }
            Poll::Ready(None) => {
                this.close();
                Poll::Ready(None)
            }
        }
    }
}

fn decode_response<Resp: DeserializeOwned>(
    frame: &BytesMut,
    max_frame: usize,
) -> io::Result<Response<Resp>> {
    options(max_frame)
        .deserialize(frame)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

impl<Req: Serialize, Resp> Sink<ClientMessage<Req>> for ClientWire<Req, Resp> {
    type Error = io::Error;

    fn poll_ready(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let r = Sink::<Bytes>::poll_ready(Pin::new(&mut this.framed), cx);
        if let Poll::Ready(Err(_)) = r {
            this.close();
        }
        r
    }

    fn start_send(self: Pin<&mut Self>, item: ClientMessage<Req>) -> io::Result<()> {
        let this = self.get_mut();
        let bytes = encode(&item, this.max_frame)?;
        Sink::<Bytes>::start_send(Pin::new(&mut this.framed), bytes)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let r = Sink::<Bytes>::poll_flush(Pin::new(&mut this.framed), cx);
        if let Poll::Ready(Err(_)) = r {
            this.close();
        }
        r
    }

    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.close();
        Sink::<Bytes>::poll_close(Pin::new(&mut this.framed), cx)
    }
}

/// Connects to `addr` (bounded by `timeout`, handshake included), with
/// frames up to [`kv_api::MAX_FRAME`]; over TLS if `tls` is given, the
/// server's certificate verified against the name given with it. `closed`
/// is set when the connection ends.
pub async fn dial<Req, Resp>(
    addr: &str,
    timeout: Duration,
    closed: Arc<AtomicBool>,
    tls: Option<(Arc<rustls::ClientConfig>, ServerName<'static>)>,
) -> io::Result<ClientWire<Req, Resp>> {
    let stream = tokio::time::timeout(timeout, kv_api::tls::dial(addr, tls))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "connect timed out"))??;
    Ok(ClientWire {
        framed: framed(stream, kv_api::MAX_FRAME),
        max_frame: kv_api::MAX_FRAME,
        closed,
        _types: PhantomData,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::StreamExt;
    use kv_api::{FaultReport, FaultSpec, GetResponse, Kv, KvClient, KvError, KvRequest};
    use kv_api::{ReadMode, ReplicaStatus, Route, WriteOutcome, WriteRequest};
    use tarpc::client::RpcError;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    const MINUTE: Duration = Duration::from_secs(60);

    fn request_bytes(secs: u64, nanos: u32, rest: &[u8]) -> Vec<u8> {
        // Request variant, then the deadline (varint secs, varint nanos).
        let mut b = vec![0u8];
        b.extend(bincode::DefaultOptions::new().serialize(&secs).unwrap());
        b.extend(bincode::DefaultOptions::new().serialize(&nanos).unwrap());
        b.extend_from_slice(rest);
        b
    }

    #[test]
    fn the_issue_frame_decodes_to_an_error_not_a_panic() {
        let payload = [
            0x00, 0xfd, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x00,
        ];
        let r = decode_request::<KvRequest>(&payload, 1 << 20, MINUTE);
        assert!(r.is_err(), "truncated after the deadline");
    }

    #[test]
    fn extreme_deadlines_are_clamped() {
        // trace context: 16 bytes of trace id, span id 0, Unsampled; id 7;
        // Status (variant 2 of the Kv request enum) has no fields.
        let mut rest = vec![0u8; 16];
        rest.extend([0, 1, 7, 2]);
        for (secs, nanos) in [
            (u64::MAX, 0),
            (u64::MAX - 1, 999_999_999),
            (u64::MAX / 2, 0),
            (1 << 40, 0),
            (5, 1_999_999_999),
        ] {
            let before = Instant::now();
            let msg: ClientMessage<KvRequest> =
                decode_request(&request_bytes(secs, nanos, &rest), 1 << 20, MINUTE)
                    .unwrap_or_else(|e| panic!("{secs} s {nanos} ns: {e}"));
            let ClientMessage::Request(r) = msg else {
                panic!("not a request");
            };
            assert_eq!(r.id, 7);
            assert!(r.context.deadline <= Instant::now() + MINUTE);
            assert!(r.context.deadline >= before + Duration::from_secs(5));
        }
        // Seconds plus carried nanoseconds overflowing: an error.
        assert!(decode_request::<KvRequest>(
            &request_bytes(u64::MAX, 1_999_999_999, &rest),
            1 << 20,
            MINUTE
        )
        .is_err());
    }

    #[test]
    fn what_tarpc_encodes_decodes_the_same() {
        let mut ctx = tarpc::context::current();
        ctx.deadline = Instant::now() + Duration::from_secs(3);
        let msg = ClientMessage::Request(tarpc::Request {
            context: ctx,
            id: 99,
            message: KvRequest::Get {
                key: b"k".to_vec(),
                mode: ReadMode::Local,
                route: Route::Redirect,
            },
        });
        let bytes = bincode::DefaultOptions::new().serialize(&msg).unwrap();
        let back: ClientMessage<KvRequest> = decode_request(&bytes, 1 << 20, MINUTE).unwrap();
        let ClientMessage::Request(r) = back else {
            panic!("not a request");
        };
        assert_eq!(r.id, 99);
        assert!(r.context.deadline > Instant::now() + Duration::from_secs(2));
        assert!(matches!(
            r.message,
            KvRequest::Get { ref key, mode: ReadMode::Local, route: Route::Redirect } if key == b"k"
        ));
        let cancel: ClientMessage<KvRequest> = ClientMessage::Cancel {
            trace_context: Default::default(),
            request_id: 5,
        };
        let bytes = bincode::DefaultOptions::new().serialize(&cancel).unwrap();
        assert!(matches!(
            decode_request::<KvRequest>(&bytes, 1 << 20, MINUTE).unwrap(),
            ClientMessage::Cancel { request_id: 5, .. }
        ));
    }

    #[test]
    fn random_bytes_never_panic_the_decoder() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        for _ in 0..20_000 {
            let len = rng.random_range(0..64);
            let mut b: Vec<u8> = (0..len).map(|_| rng.random()).collect();
            if !b.is_empty() && rng.random_bool(0.5) {
                b[0] = rng.random_range(0..2);
            }
            let _ = decode_request::<KvRequest>(&b, 1 << 16, MINUTE);
            let _ = decode_request::<kv_peer_api::PeerRequest>(&b, 1 << 16, MINUTE);
        }
    }

    #[test]
    fn a_throttled_response_reaches_tarpc_as_would_block() {
        use io::ErrorKind::*;
        for kind in [WouldBlock, TimedOut, NotFound, Other, UnexpectedEof] {
            let r: Response<u32> = Response {
                request_id: 3,
                message: Err(tarpc::ServerError::new(kind, "throttled".into())),
            };
            let bytes = encode(&WireResponse::from(&r), 1 << 10).unwrap();
            let back: Response<u32> =
                decode_response(&BytesMut::from(&bytes[..]), 1 << 10).unwrap();
            assert_eq!(back.request_id, 3);
            assert_eq!(back.message.unwrap_err().kind, kind);
        }
        let ok: Response<u32> = Response {
            request_id: 4,
            message: Ok(77),
        };
        let ours = encode(&WireResponse::from(&ok), 1 << 10).unwrap();
        let tarpcs = bincode::DefaultOptions::new().serialize(&ok).unwrap();
        assert_eq!(&ours[..], &tarpcs[..], "an answer is encoded as tarpc does");
    }

    #[test]
    fn test_limits_override() {
        let mut l = NetLimits::for_port(Port::Client, &kv_api::Limits::default()).unwrap();
        assert_eq!(l.max_frame, 2 * 1024 * 1024 + 1024 + CLIENT_FRAME_HEADROOM);
        l.apply_override(Port::Client, "connections=3, idle_ms=500")
            .unwrap();
        assert_eq!(l.connections, 3);
        assert_eq!(l.idle, Duration::from_millis(500));
        assert_eq!(l.max_deadline, Duration::from_millis(500));
        assert_eq!(l.in_flight, MAX_IN_FLIGHT_PER_CONNECTION);
        l.apply_override(Port::Client, "peer.in_flight=7,client.connections=9")
            .unwrap();
        assert_eq!(
            (l.connections, l.in_flight),
            (9, MAX_IN_FLIGHT_PER_CONNECTION)
        );
        assert!(l.apply_override(Port::Client, "connections=0").is_err());
        assert!(l.apply_override(Port::Client, "sockets=4").is_err());
        assert!(l.apply_override(Port::Client, "in_flight").is_err());
        assert!(l
            .apply_override(Port::Client, "server.in_flight=1")
            .is_err());
    }

    /// A `Kv` service whose `status` waits until released, for holding
    /// requests in flight.
    #[derive(Clone)]
    struct Held(Arc<tokio::sync::Semaphore>);

    impl Kv for Held {
        async fn write(
            self,
            _: tarpc::context::Context,
            _: WriteRequest,
            _: Route,
        ) -> std::result::Result<WriteOutcome, KvError> {
            Err(KvError::Unavailable("test".into()))
        }
        async fn get(
            self,
            _: tarpc::context::Context,
            _: Vec<u8>,
            _: ReadMode,
            _: Route,
        ) -> std::result::Result<GetResponse, KvError> {
            Err(KvError::Unavailable("test".into()))
        }
        async fn status(self, _: tarpc::context::Context) -> ReplicaStatus {
            let _ = self.0.acquire().await;
            ReplicaStatus {
                id: 1,
                ..ReplicaStatus::default()
            }
        }
        async fn set_faults(
            self,
            _: tarpc::context::Context,
            _: FaultSpec,
        ) -> std::result::Result<FaultReport, KvError> {
            Err(KvError::Unavailable("test".into()))
        }

        async fn backup_begin(
            self,
            _: tarpc::context::Context,
        ) -> std::result::Result<kv_api::BackupInfo, KvError> {
            Err(KvError::Unavailable("test".into()))
        }

        async fn backup_chunk(
            self,
            _: tarpc::context::Context,
            _: u64,
            _: u64,
            _: u32,
        ) -> std::result::Result<kv_api::BackupChunk, KvError> {
            Err(KvError::Unavailable("test".into()))
        }

        async fn range(
            self,
            _: tarpc::context::Context,
            _: kv_api::RangeRequest,
            _: ReadMode,
            _: Route,
        ) -> std::result::Result<kv_api::RangeResponse, KvError> {
            Err(KvError::Unavailable("test".into()))
        }
        async fn watch(
            self,
            _: tarpc::context::Context,
            _: kv_api::WatchRequest,
        ) -> std::result::Result<kv_api::WatchResponse, KvError> {
            Err(KvError::Unavailable("test".into()))
        }
    }

    async fn serve_held(limits: NetLimits) -> (SocketAddr, Arc<tokio::sync::Semaphore>) {
        let listener = Listener::bind("127.0.0.1:0".into(), Port::Client, limits, None)
            .await
            .unwrap();
        let addr = listener.local_addr().unwrap();
        let gate = Arc::new(tokio::sync::Semaphore::new(0));
        let serve = Kv::serve(Held(gate.clone()));
        tokio::spawn(listener.run(move |conn| {
            let serve = serve.clone();
            async move {
                conn.channel()
                    .execute(serve)
                    .for_each(|r| async {
                        tokio::spawn(r);
                    })
                    .await
            }
        }));
        (addr, gate)
    }

    fn small(connections: usize, in_flight: usize, idle: Duration) -> NetLimits {
        NetLimits {
            max_frame: 1 << 20,
            connections,
            in_flight,
            idle,
            max_deadline: MINUTE.min(idle),
        }
    }

    async fn kv_client(addr: SocketAddr) -> KvClient {
        let wire = dial(&addr.to_string(), MINUTE, Arc::default(), None)
            .await
            .unwrap();
        KvClient::new(tarpc::client::Config::default(), wire).spawn()
    }

    fn ctx() -> tarpc::context::Context {
        let mut c = tarpc::context::current();
        c.deadline = Instant::now() + Duration::from_secs(10);
        c
    }

    #[tokio::test]
    async fn requests_over_the_in_flight_limit_are_throttled_not_queued() {
        let (addr, gate) = serve_held(small(8, 2, MINUTE)).await;
        let client = kv_client(addr).await;
        let calls: Vec<_> = (0..5)
            .map(|_| {
                let c = client.clone();
                tokio::spawn(async move { c.status(ctx()).await })
            })
            .collect();
        // Three are refused at once, while two are held.
        let mut throttled = 0;
        let mut held = 0;
        for call in calls {
            let call = tokio::time::timeout(Duration::from_millis(300), call);
            match call.await {
                Ok(r) => match r.unwrap() {
                    Err(RpcError::Server(e)) if e.kind == io::ErrorKind::WouldBlock => {
                        throttled += 1
                    }
                    other => panic!("unexpected {other:?}"),
                },
                Err(_) => held += 1,
            }
        }
        assert_eq!((throttled, held), (3, 2));
        gate.add_permits(10);
        // The connection still serves once they are released.
        client.status(ctx()).await.unwrap();
    }

    #[tokio::test]
    async fn connections_over_the_limit_are_closed_and_idle_ones_time_out() {
        let idle = Duration::from_millis(400);
        let (addr, _gate) = serve_held(small(2, 8, idle)).await;
        let started = Instant::now();
        let mut held = Vec::new();
        for _ in 0..2 {
            held.push(TcpStream::connect(addr).await.unwrap());
        }
        // The third is accepted and closed at once.
        let mut third = TcpStream::connect(addr).await.unwrap();
        let mut buf = [0u8; 1];
        let n = tokio::time::timeout(Duration::from_secs(5), third.read(&mut buf))
            .await
            .expect("closed promptly");
        assert!(matches!(n, Ok(0) | Err(_)), "{n:?}");
        // The two held ones send nothing and are closed after `idle`.
        for mut s in held {
            let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
                .await
                .expect("closed when idle");
            assert!(matches!(n, Ok(0) | Err(_)), "{n:?}");
        }
        assert!(started.elapsed() >= idle);
        // Their slots are free again: a real client is served.
        kv_client(addr).await;
        let c = TcpStream::connect(addr).await.unwrap();
        drop(c);
    }

    #[tokio::test]
    async fn a_bad_frame_closes_only_its_connection() {
        let (addr, gate) = serve_held(small(8, 8, MINUTE)).await;
        gate.add_permits(100);
        let client = kv_client(addr).await;
        for bad in [
            vec![
                0, 0, 0, 11, 0, 0xfd, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0,
            ],
            vec![0xff, 0xff, 0xff, 0xff, 1, 2, 3],
            vec![0, 0, 0, 4, 9, 9, 9, 9],
        ] {
            let mut s = TcpStream::connect(addr).await.unwrap();
            s.write_all(&bad).await.unwrap();
            let mut buf = [0u8; 16];
            let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
                .await
                .expect("closed promptly");
            assert!(matches!(n, Ok(0) | Err(_)), "{bad:?}: {n:?}");
            client.status(ctx()).await.unwrap();
        }
    }
}
