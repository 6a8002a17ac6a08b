//! One RESP connection: reads requests, answers them in order, and keeps
//! what Redis keeps per connection (session, `MULTI` queue, watches, `SCAN`
//! cursors, name).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use kv_api::{KeyValue, KvError, Op, OpResult, RangeRequest, RangeResponse, WriteRequest};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::resp::{self, FrameLimits, Reply};
use super::{cmd, COMMAND_TIMEOUT, MAX_ARGS, MAX_INLINE, MAX_MULTI, MAX_WATCHED, REPLY_FLUSH};
use crate::rpc::Handler;

/// Connection ids for `CLIENT ID`, unique in this process.
static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// Most `SCAN` cursors one connection keeps (the oldest is forgotten).
const MAX_CURSORS: usize = 64;

/// A request: its arguments, the first the command name.
pub type Args = Vec<Vec<u8>>;

/// One connection's state.
pub struct Conn {
    pub(super) h: Handler,
    pub(super) id: u64,
    pub(super) from: SocketAddr,
    pub(super) name: Option<Vec<u8>>,
    /// The session its writes carry, once opened, and the last sequence
    /// number used.
    session: Option<u64>,
    seq: u64,
    /// `Some` between `MULTI` and `EXEC`/`DISCARD`: the queued commands,
    /// and whether one was refused (then `EXEC` aborts).
    pub(super) multi: Option<(Vec<Args>, bool)>,
    /// `WATCH`ed keys and the mod revision each had (`None`: absent).
    pub(super) watched: BTreeMap<Vec<u8>, Option<u64>>,
    /// `SCAN` cursors: number → the range token to resume at.
    pub(super) cursors: BTreeMap<u64, Vec<u8>>,
    next_cursor: u64,
    pub(super) quit: bool,
}

impl Conn {
    /// A connection served through `h`.
    pub fn new(h: Handler, from: SocketAddr) -> Conn {
        Conn {
            h,
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            from,
            name: None,
            session: None,
            seq: 0,
            multi: None,
            watched: BTreeMap::new(),
            cursors: BTreeMap::new(),
            next_cursor: 1,
            quit: false,
        }
    }

    fn frame_limits(&self) -> FrameLimits {
        let l = self.h.limits();
        let max_bulk = l.max_value.max(l.max_key);
        FrameLimits {
            max_bulk,
            max_args: MAX_ARGS,
            // An MSET of two maximal values, or many small pairs.
            max_request: max_bulk.saturating_mul(2).saturating_add(64 * 1024),
            max_inline: MAX_INLINE,
        }
    }

    /// Serves the connection until the client closes it, sends `QUIT`, or
    /// sends bytes that cannot be framed.
    pub async fn run<S>(mut self, mut stream: S) -> std::io::Result<()>
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    {
        let limits = self.frame_limits();
        let mut buf: Vec<u8> = Vec::with_capacity(16 * 1024);
        let mut pos = 0;
        let mut out: Vec<u8> = Vec::with_capacity(16 * 1024);
        let mut chunk = vec![0u8; 64 * 1024];
        loop {
            match resp::parse(&buf[pos..], &limits) {
                Ok(Some((args, used))) => {
                    pos += used;
                    if args.is_empty() {
                        continue;
                    }
                    let reply = self.request(args).await;
                    reply.encode(&mut out);
                    if self.quit {
                        stream.write_all(&out).await?;
                        return stream.shutdown().await;
                    }
                    if out.len() >= REPLY_FLUSH {
                        stream.write_all(&out).await?;
                        out.clear();
                    }
                }
                Ok(None) => {
                    if !out.is_empty() {
                        stream.write_all(&out).await?;
                        out.clear();
                    }
                    buf.drain(..pos);
                    pos = 0;
                    let n = stream.read(&mut chunk).await?;
                    if n == 0 {
                        return Ok(());
                    }
                    buf.extend_from_slice(&chunk[..n]);
                }
                Err(e) => {
                    Reply::err(e.0).encode(&mut out);
                    stream.write_all(&out).await?;
                    return stream.shutdown().await;
                }
            }
        }
    }

    /// Answers one request.
    async fn request(&mut self, args: Args) -> Reply {
        let name = String::from_utf8_lossy(&args[0]).to_ascii_uppercase();
        if self.multi.is_some() {
            match name.as_str() {
                "EXEC" | "DISCARD" | "MULTI" | "WATCH" | "QUIT" | "RESET" => {}
                _ => return self.queue(&name, args),
            }
        }
        match name.as_str() {
            "MULTI" => {
                if self.multi.is_some() {
                    return Reply::err("MULTI calls can not be nested");
                }
                self.multi = Some((Vec::new(), false));
                Reply::ok()
            }
            "EXEC" => {
                let Some((queued, refused)) = self.multi.take() else {
                    return Reply::err("EXEC without MULTI");
                };
                let watched = std::mem::take(&mut self.watched);
                if refused {
                    return Reply::Error(
                        "EXECABORT Transaction discarded because of previous errors.".into(),
                    );
                }
                match cmd::execute(self, queued, watched).await {
                    Ok(replies) => Reply::array(replies),
                    Err(reply) => reply,
                }
            }
            "DISCARD" => {
                if self.multi.take().is_none() {
                    return Reply::err("DISCARD without MULTI");
                }
                self.watched.clear();
                Reply::ok()
            }
            "WATCH" => {
                if self.multi.is_some() {
                    return Reply::err("WATCH inside MULTI is not allowed");
                }
                if args.len() < 2 {
                    return cmd::arity(&args[0]);
                }
                self.watch(&args[1..]).await
            }
            "UNWATCH" => {
                self.watched.clear();
                Reply::ok()
            }
            _ => cmd::single(self, &name, args).await,
        }
    }

    /// Queues a command inside `MULTI` (or refuses it, which aborts the
    /// `EXEC`).
    fn queue(&mut self, name: &str, args: Args) -> Reply {
        let check = cmd::check_queued(name, &args);
        let Some((queued, refused)) = self.multi.as_mut() else {
            return Reply::err("not in MULTI");
        };
        if let Err(reply) = check {
            *refused = true;
            return reply;
        }
        if queued.len() >= MAX_MULTI {
            *refused = true;
            return Reply::err(format!(
                "a MULTI holds at most {MAX_MULTI} commands here (one transaction)"
            ));
        }
        queued.push(args);
        Reply::Simple("QUEUED".into())
    }

    async fn watch(&mut self, keys: &[Vec<u8>]) -> Reply {
        if self.watched.len() + keys.len() > MAX_WATCHED {
            return Reply::err(format!(
                "a connection watches at most {MAX_WATCHED} keys here"
            ));
        }
        for key in keys {
            match self.read_key(key, 0).await {
                Ok((kv, _)) => {
                    self.watched
                        .entry(key.clone())
                        .or_insert(kv.map(|kv| kv.mod_revision));
                }
                Err(e) => return kv_error(e),
            }
        }
        Reply::ok()
    }

    /// A time by which a command gives up retrying.
    pub(super) fn deadline() -> Instant {
        Instant::now() + COMMAND_TIMEOUT
    }

    /// A range, retried through leader changes until [`COMMAND_TIMEOUT`].
    pub(super) async fn range(&self, req: RangeRequest) -> Result<RangeResponse, KvError> {
        let deadline = Conn::deadline();
        let mut pause = Duration::from_millis(10);
        loop {
            match self.h.client_range(req.clone(), deadline).await {
                Err(e) if retryable(&e) && Instant::now() + pause < deadline => {
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_millis(200));
                }
                other => return other,
            }
        }
    }

    /// `key` at `revision` (0: now, linearizable): its key-value and the
    /// store's revision of the read.
    pub(super) async fn read_key(
        &self,
        key: &[u8],
        revision: u64,
    ) -> Result<(Option<KeyValue>, u64), KvError> {
        self.h.limits().check_key(key)?;
        let mut req = RangeRequest::key(key.to_vec());
        req.revision = revision;
        let r = self.range(req).await?;
        Ok((r.kvs.into_iter().next(), r.revision))
    }

    /// A linearizable get (no revisions: the fast path of `GET`).
    pub(super) async fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, KvError> {
        let deadline = Conn::deadline();
        let mut pause = Duration::from_millis(10);
        loop {
            match self.h.client_get(key.to_vec(), deadline).await {
                Err(e) if retryable(&e) && Instant::now() + pause < deadline => {
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_millis(200));
                }
                other => return other.map(|r| r.value),
            }
        }
    }

    /// Opens this connection's session if it has none.
    async fn session(&mut self, deadline: Instant) -> Result<u64, KvError> {
        if let Some(s) = self.session {
            return Ok(s);
        }
        let mut pause = Duration::from_millis(10);
        loop {
            let req = WriteRequest {
                client_id: 0,
                seq: 0,
                acked_below: 0,
                op: Op::open_session(),
            };
            match self.h.client_write(req, deadline).await {
                Ok(o) => match o.result {
                    OpResult::SessionOpened { session } => {
                        self.session = Some(session);
                        self.seq = 0;
                        return Ok(session);
                    }
                    other => {
                        return Err(KvError::Unavailable(format!(
                            "opening a session answered {other:?}"
                        )))
                    }
                },
                Err(e) if retryable(&e) && Instant::now() + pause < deadline => {
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_millis(200));
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// A write through this connection's session, applied at most once:
    /// an attempt whose outcome is unknown is retried with the same
    /// sequence number until [`COMMAND_TIMEOUT`].
    pub(super) async fn write(&mut self, op: Op) -> Result<OpResult, KvError> {
        let deadline = Conn::deadline();
        let mut session = self.session(deadline).await?;
        self.seq += 1;
        // Whether no attempt so far can have been applied.
        let mut clean = true;
        let mut pause = Duration::from_millis(10);
        loop {
            let req = WriteRequest {
                client_id: session,
                seq: self.seq,
                // One write at a time: every earlier answer was received.
                acked_below: self.seq,
                op: op.clone(),
            };
            match self.h.client_write(req, deadline).await {
                Ok(o) => match o.result {
                    OpResult::Stale => {
                        return Err(KvError::Unavailable(
                            "the write's outcome is unknown (its session forgot it)".into(),
                        ))
                    }
                    result => return Ok(result),
                },
                Err(KvError::UnknownSession(_)) => {
                    // Expired while idle (or evicted): reopen. Sending the
                    // write again is safe only if no attempt can have been
                    // applied under the old session.
                    self.session = None;
                    if !clean {
                        return Err(KvError::Unavailable(
                            "the write's outcome is unknown: its session expired while it was \
                             retried"
                                .into(),
                        ));
                    }
                    session = self.session(deadline).await?;
                    self.seq = 1;
                }
                Err(e) if retryable(&e) && Instant::now() + pause < deadline => {
                    if !matches!(e, KvError::NotLeader(_)) {
                        clean = false;
                    }
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_millis(200));
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Remembers where a `SCAN` goes on; its cursor number.
    pub(super) fn new_cursor(&mut self, token: Vec<u8>) -> u64 {
        if self.cursors.len() >= MAX_CURSORS {
            self.cursors.pop_first();
        }
        let c = self.next_cursor;
        self.next_cursor += 1;
        self.cursors.insert(c, token);
        c
    }
}

/// Errors after which a request is tried again: nothing was refused, the
/// cluster was between leaders or slow.
pub(super) fn retryable(e: &KvError) -> bool {
    matches!(
        e,
        KvError::NotLeader(_) | KvError::Unavailable(_) | KvError::Timeout(_)
    )
}

/// A [`KvError`] as a Redis error reply.
pub(super) fn kv_error(e: KvError) -> Reply {
    match e {
        KvError::PermissionDenied(m) => Reply::Error(format!("NOPERM {m}")),
        KvError::InvalidArgument(m) => Reply::err(m),
        e => Reply::err(e),
    }
}
