//! The SDK against fake replicas: in-process tarpc servers that implement
//! `kv_api::Kv` with scripted behaviour (leader, follower with a hint,
//! frozen, failing), on ports picked by the OS. They check what the SDK
//! sends: which replica it tries, the sessions it opens, the sequence
//! numbers of retries, the `acked_below` watermark, and that it stays
//! within its time budget.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use kv_api::{
    GetResponse, Kv, KvError, LeaderHint, Op, OpResult, ReadMode, ReplicaStatus, Route,
    WriteOutcome, WriteRequest,
};
use kv_client::{Client, Error};
use tarpc::context::Context;
use tarpc::server::{BaseChannel, Channel};
use tarpc::tokio_serde::formats::Bincode;

/// How a fake replica answers writes and linearizable reads.
#[derive(Clone, Debug)]
enum Mode {
    /// Applies writes (deduplicated by client id and sequence number).
    Leader,
    /// Refuses with `NotLeader`, with this hint.
    Follower(Option<LeaderHint>),
    /// Never answers.
    Hang,
    /// Answers `Timeout` this many more times (after applying the write, as
    /// a leader whose reply was lost would), then behaves as a leader.
    LoseReplies(usize),
    /// Refuses every write as invalid.
    Invalid,
    /// Applies the write, then forgets its session (as if it expired just
    /// after) and answers `Timeout`, as a leader whose reply was lost would.
    ApplyForgetAndLoseReply,
}

/// Session ids the fakes hand out: shared, so that two fakes (a leader and
/// its successor) never give the same one, as a real cluster would not.
static NEXT_SESSION: AtomicU64 = AtomicU64::new(1 << 20);

#[derive(Default)]
struct Shared {
    mode: Option<Mode>,
    /// Every write request received, in order (session opens excepted).
    writes: Vec<WriteRequest>,
    /// Session opens received.
    opens: usize,
    /// Sessions this fake no longer knows: their writes are refused.
    forgotten: HashSet<u64>,
    /// The route asked for by every write and read, in order.
    routes: Vec<Route>,
    map: HashMap<Vec<u8>, Vec<u8>>,
    /// Results of applied writes, by (client id, seq).
    applied: HashMap<(u64, u64), WriteOutcome>,
    slot: u64,
    /// A sequence number to hold back until the notify fires.
    hold: Option<(u64, Arc<tokio::sync::Notify>)>,
}

#[derive(Clone)]
struct Fake {
    id: u64,
    shared: Arc<Mutex<Shared>>,
}

impl Fake {
    fn mode(&self) -> Mode {
        self.shared
            .lock()
            .unwrap()
            .mode
            .clone()
            .unwrap_or(Mode::Leader)
    }

    fn writes(&self) -> Vec<WriteRequest> {
        self.shared.lock().unwrap().writes.clone()
    }

    fn opens(&self) -> usize {
        self.shared.lock().unwrap().opens
    }

    fn forget(&self, session: u64) {
        self.shared.lock().unwrap().forgotten.insert(session);
    }

    fn apply(&self, req: &WriteRequest) -> Result<WriteOutcome, KvError> {
        let mut s = self.shared.lock().unwrap();
        if let Op::OpenSession { .. } = req.op {
            s.slot += 1;
            return Ok(WriteOutcome {
                slot: s.slot,
                result: OpResult::SessionOpened {
                    session: NEXT_SESSION.fetch_add(1, Ordering::Relaxed),
                },
            });
        }
        if s.forgotten.contains(&req.client_id) {
            return Err(KvError::UnknownSession(req.client_id));
        }
        if let Some(o) = s.applied.get(&(req.client_id, req.seq)) {
            return Ok(o.clone());
        }
        s.slot += 1;
        let result = match &req.op {
            Op::Put { key, value } => {
                s.map.insert(key.clone(), value.clone());
                OpResult::Put
            }
            Op::Delete { key } => OpResult::Deleted {
                existed: s.map.remove(key).is_some(),
            },
            Op::Cas { key, expected, new } => {
                let swapped = s.map.get(key) == expected.as_ref();
                if swapped {
                    s.map.insert(key.clone(), new.clone());
                }
                OpResult::Cas {
                    swapped,
                    current: s.map.get(key).cloned(),
                }
            }
            Op::OpenSession { .. } => unreachable!("handled above"),
            Op::Reconfigure { .. } => OpResult::Reconfigured(Err("not in this fake".into())),
            Op::Txn(_)
            | Op::NewLeader { .. }
            | Op::Lease(_)
            | Op::Compact { .. }
            | Op::Incr { .. } => {
                return Err(KvError::InvalidArgument(
                    "the fake replica has no transactions".into(),
                ))
            }
        };
        let outcome = WriteOutcome {
            slot: s.slot,
            result,
        };
        s.applied.insert((req.client_id, req.seq), outcome.clone());
        Ok(outcome)
    }
}

impl Kv for Fake {
    async fn write(
        self,
        _: Context,
        req: WriteRequest,
        route: Route,
    ) -> Result<WriteOutcome, KvError> {
        let hold = {
            let mut s = self.shared.lock().unwrap();
            if let Op::OpenSession { .. } = req.op {
                s.opens += 1;
            } else {
                s.writes.push(req.clone());
            }
            s.routes.push(route);
            s.hold.clone().filter(|(seq, _)| *seq == req.seq)
        };
        if let Some((_, notify)) = hold {
            notify.notified().await;
        }
        let opening = matches!(req.op, Op::OpenSession { .. });
        match self.mode() {
            Mode::Leader => self.apply(&req),
            Mode::Follower(hint) => Err(KvError::NotLeader(hint)),
            Mode::Hang => std::future::pending().await,
            Mode::LoseReplies(_) | Mode::ApplyForgetAndLoseReply if opening => self.apply(&req),
            Mode::LoseReplies(n) => {
                let _ = self.apply(&req);
                if n == 0 {
                    return self.apply(&req);
                }
                self.shared.lock().unwrap().mode = Some(Mode::LoseReplies(n - 1));
                Err(KvError::Timeout("the reply was lost".into()))
            }
            Mode::ApplyForgetAndLoseReply => {
                self.apply(&req)?;
                self.forget(req.client_id);
                self.shared.lock().unwrap().mode = Some(Mode::Leader);
                Err(KvError::Timeout("the reply was lost".into()))
            }
            Mode::Invalid => Err(KvError::InvalidArgument("refused by the fake".into())),
        }
    }

    async fn get(
        self,
        _: Context,
        key: Vec<u8>,
        mode: ReadMode,
        route: Route,
    ) -> Result<GetResponse, KvError> {
        self.shared.lock().unwrap().routes.push(route);
        let serve = match (self.mode(), mode) {
            (Mode::Hang, _) => std::future::pending().await,
            (_, ReadMode::Local) => true,
            (Mode::Follower(hint), ReadMode::Linearizable) => return Err(KvError::NotLeader(hint)),
            _ => true,
        };
        assert!(serve);
        let s = self.shared.lock().unwrap();
        Ok(GetResponse {
            value: s.map.get(&key).cloned(),
            applied: s.slot,
        })
    }

    async fn set_faults(
        self,
        _: Context,
        _: kv_api::FaultSpec,
    ) -> Result<kv_api::FaultReport, KvError> {
        Err(KvError::InvalidArgument(
            "the fake replica injects no faults".into(),
        ))
    }

    async fn backup_begin(self, _: Context) -> Result<kv_api::BackupInfo, KvError> {
        Err(KvError::InvalidArgument(
            "the fake replica has no snapshots".into(),
        ))
    }

    async fn backup_chunk(
        self,
        _: Context,
        _: u64,
        _: u64,
        _: u32,
    ) -> Result<kv_api::BackupChunk, KvError> {
        Err(KvError::InvalidArgument(
            "the fake replica has no snapshots".into(),
        ))
    }

    async fn range(
        self,
        _: Context,
        _: kv_api::RangeRequest,
        _: ReadMode,
        _: Route,
    ) -> Result<kv_api::RangeResponse, KvError> {
        Err(KvError::InvalidArgument(
            "the fake replica has no ranges".into(),
        ))
    }

    async fn watch(
        self,
        _: Context,
        _: kv_api::WatchRequest,
    ) -> Result<kv_api::WatchResponse, KvError> {
        Err(KvError::InvalidArgument(
            "the fake replica has no watches".into(),
        ))
    }

    async fn status(self, _: Context) -> ReplicaStatus {
        let mode = self.mode();
        if let Mode::Hang = mode {
            std::future::pending::<()>().await;
        }
        let s = self.shared.lock().unwrap();
        ReplicaStatus {
            id: self.id,
            leader: matches!(mode, Mode::Leader),
            leader_id: None,
            ballot_round: 1,
            applied: s.slot,
            chosen: s.slot,
            snapshot: 0,
            keys: s.map.len() as u64,
            sessions: 0,
            standing: "voter".into(),
            snapshots_installed: 0,
            duplicate_writes: 0,
            ..ReplicaStatus::default()
        }
    }
}

/// A running fake replica.
struct Replica {
    fake: Fake,
    addr: String,
    server: tokio::task::JoinHandle<()>,
    connections: Arc<Mutex<Vec<tokio::task::AbortHandle>>>,
}

impl Replica {
    async fn start(id: u64, mode: Mode) -> Replica {
        Replica::start_at(id, mode, "127.0.0.1:0").await
    }

    async fn start_at(id: u64, mode: Mode, bind: &str) -> Replica {
        let fake = Fake {
            id,
            shared: Arc::new(Mutex::new(Shared {
                mode: Some(mode),
                ..Shared::default()
            })),
        };
        let mut incoming = tarpc::serde_transport::tcp::listen(bind, Bincode::default)
            .await
            .expect("listen");
        incoming.config_mut().max_frame_length(kv_api::MAX_FRAME);
        let addr = incoming.local_addr().to_string();
        let connections: Arc<Mutex<Vec<tokio::task::AbortHandle>>> = Arc::default();
        let (f, conns) = (fake.clone(), connections.clone());
        let server = tokio::spawn(async move {
            while let Some(Ok(transport)) = incoming.next().await {
                let serve = BaseChannel::with_defaults(transport)
                    .execute(f.clone().serve())
                    .for_each(|request| async {
                        tokio::spawn(request);
                    });
                let task = tokio::spawn(serve);
                conns.lock().unwrap().push(task.abort_handle());
            }
        });
        Replica {
            fake,
            addr,
            server,
            connections,
        }
    }

    fn routes(&self) -> Vec<Route> {
        self.fake.shared.lock().unwrap().routes.clone()
    }

    fn set_mode(&self, mode: Mode) {
        self.fake.shared.lock().unwrap().mode = Some(mode);
    }

    fn hint(&self) -> LeaderHint {
        LeaderHint {
            id: self.fake.id,
            addr: self.addr.clone(),
        }
    }

    /// Stops listening and closes every connection (a crash). Returns
    /// once the listener is closed, so its address can be bound again.
    async fn stop(&mut self) {
        self.server.abort();
        for c in self.connections.lock().unwrap().drain(..) {
            c.abort();
        }
        // An aborted task's future (the listener with it) is dropped by
        // the time its handle reports the cancellation.
        let _ = (&mut self.server).await;
    }
}

fn client(addrs: &[&str], timeout: Duration) -> Client {
    Client::builder()
        .addrs(addrs.iter().map(|a| a.to_string()).collect())
        .timeout(timeout)
        .build()
        .unwrap()
}

fn dead_addr() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().to_string()
}

/// What a loaded machine (two cores, several test binaries at once) may
/// add to a deadline the SDK keeps. A bound of "budget + SLACK" still
/// tells a client that gives up at its budget from one that waits on.
const SLACK: Duration = Duration::from_secs(3);

/// Bounds a test body: no test may hang.
async fn bounded<T>(f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(20), f)
        .await
        .expect("the test took over 20 s")
}

#[tokio::test]
async fn operations_round_trip_through_the_leader() {
    bounded(async {
        let leader = Replica::start(1, Mode::Leader).await;
        let c = client(&[&leader.addr], Duration::from_secs(5));
        assert_eq!(c.session_id(), None);
        assert_eq!(c.get("k").await.unwrap(), None);
        assert_eq!(leader.fake.opens(), 0, "reads need no session");
        c.put("k", "v1").await.unwrap();
        assert_eq!(c.get("k").await.unwrap(), Some(b"v1".to_vec()));
        assert_eq!(c.get_local("k").await.unwrap(), Some(b"v1".to_vec()));
        let o = c.cas("k", Some(b"nope".to_vec()), "v2").await.unwrap();
        assert!(!o.swapped);
        assert_eq!(o.current, Some(b"v1".to_vec()));
        let o = c.cas("k", Some(b"v1".to_vec()), "v2").await.unwrap();
        assert!(o.swapped);
        assert!(c.delete("k").await.unwrap());
        assert!(!c.delete("k").await.unwrap());
        let o = c.cas("k", None, "v3").await.unwrap();
        assert!(o.swapped);
        // One session, opened before the first write; sequence numbers 1,
        // 2, ... one per write, acked_below following.
        assert_eq!(leader.fake.opens(), 1);
        let s = c.session_id().expect("a session was opened");
        let seqs: Vec<(u64, u64, u64)> = leader
            .fake
            .writes()
            .iter()
            .map(|w| (w.client_id, w.seq, w.acked_below))
            .collect();
        assert_eq!(
            seqs,
            [
                (s, 1, 1),
                (s, 2, 2),
                (s, 3, 3),
                (s, 4, 4),
                (s, 5, 5),
                (s, 6, 6)
            ]
        );
    })
    .await
}

#[tokio::test]
async fn follows_the_leader_hint_then_starts_at_the_leader() {
    bounded(async {
        let leader = Replica::start(2, Mode::Leader).await;
        let follower = Replica::start(1, Mode::Follower(Some(leader.hint()))).await;
        let other = Replica::start(3, Mode::Follower(Some(leader.hint()))).await;
        let c = client(
            &[&follower.addr, &other.addr, &leader.addr],
            Duration::from_secs(5),
        );
        c.put("k", "v").await.unwrap();
        // The first write (the session's open) met the follower, whose
        // hint sent it straight to the leader, skipping `other`.
        assert_eq!(follower.fake.opens(), 1);
        assert_eq!(follower.fake.writes().len(), 0);
        assert_eq!(other.fake.opens() + other.fake.writes().len(), 0);
        assert_eq!(leader.fake.opens(), 1);
        assert_eq!(leader.fake.writes().len(), 1);
        c.put("k", "w").await.unwrap();
        assert_eq!(
            follower.fake.writes().len(),
            0,
            "the leader should be tried first now"
        );
        assert_eq!(leader.fake.writes().len(), 2);
        // The leadership moves to `other`: the old leader's hint is followed.
        other.set_mode(Mode::Leader);
        leader.set_mode(Mode::Follower(Some(other.hint())));
        c.put("k", "x").await.unwrap();
        assert_eq!(leader.fake.writes().len(), 3);
        assert_eq!(other.fake.writes().len(), 1);
        assert_eq!(other.fake.writes()[0].seq, 3);
        assert_eq!(other.fake.opens(), 0, "the same session goes on");
        assert_eq!(c.get("k").await.unwrap(), Some(b"x".to_vec()));
    })
    .await
}

#[tokio::test]
async fn a_hint_to_an_unlisted_address_is_followed() {
    bounded(async {
        let leader = Replica::start(9, Mode::Leader).await;
        let follower = Replica::start(1, Mode::Follower(Some(leader.hint()))).await;
        let c = client(&[&follower.addr], Duration::from_secs(5));
        c.put("k", "v").await.unwrap();
        assert_eq!(leader.fake.writes().len(), 1);
    })
    .await
}

#[tokio::test]
async fn retry_after_a_frozen_replica_reuses_the_seq_on_another_replica() {
    bounded(async {
        let frozen = Replica::start(1, Mode::Leader).await;
        let leader = Replica::start(2, Mode::Leader).await;
        let budget = Duration::from_secs(12);
        let c = client(&[&frozen.addr, &leader.addr], budget);
        // The session is opened, and the first write done, at replica 1,
        // which then freezes.
        c.put("k", "v").await.unwrap();
        frozen.set_mode(Mode::Hang);
        let started = Instant::now();
        c.put("k", "w").await.unwrap();
        let took = started.elapsed();
        // One capped attempt (about 1 s) at the frozen replica, not the
        // whole budget.
        assert!(took >= Duration::from_millis(900), "{took:?}");
        assert!(
            took < Duration::from_secs(1) + SLACK && took < budget,
            "{took:?}: more than one capped attempt"
        );
        let (a, b) = (frozen.fake.writes(), leader.fake.writes());
        assert_eq!(a.len(), 2);
        assert_eq!(b.len(), 1);
        assert_eq!(a[1], b[0], "the retry must be the very same request");
        assert_eq!((b[0].client_id, b[0].seq), (c.session_id().unwrap(), 2));
    })
    .await
}

#[tokio::test]
async fn a_lost_reply_is_retried_with_the_same_seq_and_applied_once() {
    bounded(async {
        let leader = Replica::start(1, Mode::LoseReplies(2)).await;
        let c = client(&[&leader.addr], Duration::from_secs(5));
        c.put("k", "v").await.unwrap();
        let w = leader.fake.writes();
        assert_eq!(w.len(), 3);
        let s = c.session_id().unwrap();
        assert!(w.iter().all(|r| r.seq == 1 && r.client_id == s));
        assert_eq!(
            leader.fake.shared.lock().unwrap().slot,
            2,
            "the open and the put, applied once"
        );
        // The next write gets the next number.
        c.put("k", "w").await.unwrap();
        assert_eq!(leader.fake.writes().last().unwrap().seq, 2);
    })
    .await
}

#[tokio::test]
async fn acked_below_stays_at_the_oldest_outstanding_write() {
    bounded(async {
        let leader = Replica::start(1, Mode::Leader).await;
        let release = Arc::new(tokio::sync::Notify::new());
        leader.fake.shared.lock().unwrap().hold = Some((1, release.clone()));
        let c = client(&[&leader.addr], Duration::from_secs(10));
        let slow = tokio::spawn({
            let c = c.clone();
            async move { c.put("a", "1").await }
        });
        while leader.fake.writes().is_empty() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        // Seq 1 is still outstanding while seq 2 and 3 complete.
        c.put("b", "2").await.unwrap();
        c.put("c", "3").await.unwrap();
        release.notify_one();
        slow.await.unwrap().unwrap();
        c.put("d", "4").await.unwrap();
        let seen: Vec<(u64, u64)> = leader
            .fake
            .writes()
            .iter()
            .map(|w| (w.seq, w.acked_below))
            .collect();
        assert_eq!(seen, [(1, 1), (2, 1), (3, 1), (4, 4)]);
    })
    .await
}

#[tokio::test]
async fn invalid_input_is_refused_before_anything_is_sent() {
    bounded(async {
        let leader = Replica::start(1, Mode::Leader).await;
        let c = client(&[&leader.addr], Duration::from_secs(5));
        let long_key = vec![b'k'; 1025];
        let big = vec![0u8; (1 << 20) + 1];
        let errors = [
            c.put(long_key.clone(), "v").await.unwrap_err(),
            c.put("", "v").await.unwrap_err(),
            c.put("k", big.clone()).await.unwrap_err(),
            c.get(long_key.clone()).await.unwrap_err(),
            c.get_local("").await.unwrap_err(),
            c.delete(long_key.clone()).await.unwrap_err(),
            c.cas("k", Some(big.clone()), "v").await.unwrap_err(),
            c.write(WriteRequest {
                client_id: 1,
                seq: 1,
                acked_below: 0,
                op: Op::Put {
                    key: long_key,
                    value: vec![],
                },
            })
            .await
            .unwrap_err(),
        ];
        for e in errors {
            assert!(matches!(e, Error::InvalidArgument(_)), "{e}");
        }
        assert!(leader.fake.writes().is_empty());
        assert_eq!(leader.fake.opens(), 0, "not even a session");
        // A 1 MiB value is within the limit and goes through.
        c.put("k", vec![7u8; 1 << 20]).await.unwrap();
    })
    .await
}

#[tokio::test]
async fn invalid_argument_from_a_replica_is_final() {
    bounded(async {
        let r = Replica::start(1, Mode::Invalid).await;
        let other = Replica::start(2, Mode::Leader).await;
        let c = client(&[&r.addr, &other.addr], Duration::from_secs(5));
        let e = c.put("k", "v").await.unwrap_err();
        assert!(
            matches!(e, Error::InvalidArgument(ref m) if m.contains("fake")),
            "{e}"
        );
        assert!(other.fake.writes().is_empty());
    })
    .await
}

#[tokio::test]
async fn raw_write_sends_the_callers_numbers() {
    bounded(async {
        let leader = Replica::start(1, Mode::Leader).await;
        let c = client(&[&leader.addr], Duration::from_secs(5));
        let req = WriteRequest {
            client_id: 5,
            seq: 40,
            acked_below: 39,
            op: Op::Put {
                key: b"k".to_vec(),
                value: b"v".to_vec(),
            },
        };
        let first = c.write(req.clone()).await.unwrap();
        let again = c.write(req.clone()).await.unwrap();
        assert_eq!(first, again, "deduplicated by the fake");
        assert_eq!(leader.fake.writes(), [req.clone(), req]);
    })
    .await
}

#[tokio::test]
async fn a_write_refused_for_an_unknown_session_goes_again_in_a_new_one() {
    bounded(async {
        let leader = Replica::start(1, Mode::Leader).await;
        let c = client(&[&leader.addr], Duration::from_secs(5));
        c.put("k", "v").await.unwrap();
        let first = c.session_id().unwrap();
        // The cluster drops the session (it expired while the client idled).
        leader.fake.forget(first);
        c.put("k", "w").await.unwrap();
        let second = c.session_id().unwrap();
        assert_ne!(second, first);
        assert_eq!(leader.fake.opens(), 2);
        let sent: Vec<(u64, u64)> = leader
            .fake
            .writes()
            .iter()
            .map(|w| (w.client_id, w.seq))
            .collect();
        // Refused in the old session, so certainly not applied: sent again
        // in the new one, its numbers starting over.
        assert_eq!(sent, [(first, 1), (first, 2), (second, 1)]);
        assert_eq!(c.get("k").await.unwrap(), Some(b"w".to_vec()));
        // The raw API reports the refusal instead.
        let e = c
            .write(WriteRequest {
                client_id: first,
                seq: 3,
                acked_below: 0,
                op: Op::Delete { key: b"k".to_vec() },
            })
            .await
            .unwrap_err();
        assert_eq!(e, Error::UnknownSession(first));
        assert!(!e.outcome_unknown());
    })
    .await
}

#[tokio::test]
async fn a_retry_refused_for_an_unknown_session_is_an_unknown_outcome_not_sent_again() {
    bounded(async {
        let leader = Replica::start(1, Mode::ApplyForgetAndLoseReply).await;
        let c = client(&[&leader.addr], Duration::from_secs(5));
        // Applied, then the session is dropped and the reply lost: the
        // retry is refused, and the SDK cannot know whether the first
        // attempt was applied (here it was), so it must not send the write
        // again in a new session.
        let e = c.put("k", "v").await.unwrap_err();
        assert!(matches!(e, Error::OutcomeUnknown(_)), "{e}");
        assert!(e.outcome_unknown());
        let w = leader.fake.writes();
        assert_eq!(w.len(), 2, "the first attempt and its retry, nothing more");
        assert_eq!(w[0], w[1]);
        assert_eq!(leader.fake.opens(), 1);
        // The next write opens a new session and goes through.
        c.put("k", "w").await.unwrap();
        assert_eq!(leader.fake.opens(), 2);
        assert_eq!(c.get("k").await.unwrap(), Some(b"w".to_vec()));
    })
    .await
}

#[tokio::test]
async fn a_session_that_cannot_be_opened_means_the_write_was_not_sent() {
    bounded(async {
        let r = Replica::start(1, Mode::Follower(None)).await;
        let c = client(&[&r.addr], Duration::from_millis(300));
        let e = c.put("k", "v").await.unwrap_err();
        assert!(
            matches!(e, Error::Unavailable(ref m) if m.contains("not sent")),
            "{e}"
        );
        assert!(r.fake.writes().is_empty());
        assert!(r.fake.opens() >= 1);
    })
    .await
}

#[tokio::test]
async fn nobody_listening_is_unavailable_within_the_budget() {
    bounded(async {
        let budget = Duration::from_millis(400);
        let c = client(&[&dead_addr(), &dead_addr()], budget);
        let started = Instant::now();
        let e = c.put("k", "v").await.unwrap_err();
        let took = started.elapsed();
        assert!(matches!(e, Error::Unavailable(_)), "{e}");
        assert!(took >= budget, "{took:?}");
        assert!(took < budget + SLACK, "{took:?}");
    })
    .await
}

#[tokio::test]
async fn frozen_replicas_time_out_within_the_budget() {
    bounded(async {
        // A listener that never accepts: TCP connects, nothing answers,
        // like a SIGSTOPped server.
        let frozen = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = frozen.local_addr().unwrap().to_string();
        let hung = Replica::start(2, Mode::Hang).await;
        let budget = Duration::from_millis(1500);
        let c = client(&[&addr, &hung.addr], budget);
        let started = Instant::now();
        let e = c.get("k").await.unwrap_err();
        let took = started.elapsed();
        assert!(matches!(e, Error::Timeout(_)), "{e}");
        assert!(took < budget + SLACK, "{took:?}");
        let started = Instant::now();
        let status = c.status().await;
        let took = started.elapsed();
        assert!(took < budget + SLACK, "{took:?}");
        assert_eq!(status.len(), 2);
        assert!(status.iter().all(|(_, r)| r.is_err()));
    })
    .await
}

#[tokio::test]
async fn reconnects_after_the_replica_restarts() {
    bounded(async {
        let mut r = Replica::start(1, Mode::Leader).await;
        let addr = r.addr.clone();
        let c = client(&[&addr], Duration::from_secs(5));
        c.put("k", "v").await.unwrap();
        r.stop().await;
        let restarted = Replica::start_at(1, Mode::Leader, &addr).await;
        c.put("k", "w").await.unwrap();
        assert_eq!(restarted.fake.writes().len(), 1);
        assert_eq!(restarted.fake.writes()[0].seq, 2);
        assert_eq!(restarted.fake.opens(), 0, "the cluster keeps the session");
    })
    .await
}

#[tokio::test]
async fn get_local_answers_from_the_first_replica_that_answers() {
    bounded(async {
        let leader = Replica::start(2, Mode::Leader).await;
        let follower = Replica::start(1, Mode::Follower(Some(leader.hint()))).await;
        follower
            .fake
            .shared
            .lock()
            .unwrap()
            .map
            .insert(b"k".to_vec(), b"stale".to_vec());
        let c = client(
            &[&dead_addr(), &follower.addr, &leader.addr],
            Duration::from_secs(5),
        );
        assert_eq!(c.get_local("k").await.unwrap(), Some(b"stale".to_vec()));
        // A linearizable read goes to the leader.
        assert_eq!(c.get("k").await.unwrap(), None);
    })
    .await
}

#[tokio::test]
async fn status_asks_every_replica_in_order() {
    bounded(async {
        let a = Replica::start(1, Mode::Follower(None)).await;
        let b = Replica::start(2, Mode::Leader).await;
        let dead = dead_addr();
        let c = client(&[&a.addr, &dead, &b.addr], Duration::from_secs(2));
        let s = c.status().await;
        let addrs: Vec<&str> = s.iter().map(|(a, _)| a.as_str()).collect();
        assert_eq!(addrs, [a.addr.as_str(), dead.as_str(), b.addr.as_str()]);
        assert_eq!(s[0].1.as_ref().unwrap().id, 1);
        assert!(s[1].1.is_err());
        assert!(s[2].1.as_ref().unwrap().leader);
    })
    .await
}

#[tokio::test]
async fn the_client_is_shared_between_tasks() {
    bounded(async {
        let leader = Replica::start(1, Mode::Leader).await;
        let c = client(&[&leader.addr], Duration::from_secs(10));
        let tasks: Vec<_> = (0..20)
            .map(|i| {
                let c = c.clone();
                tokio::spawn(async move { c.put(format!("k{i}"), "v").await })
            })
            .collect();
        for t in tasks {
            t.await.unwrap().unwrap();
        }
        let mut seqs: Vec<u64> = leader.fake.writes().iter().map(|w| w.seq).collect();
        seqs.sort_unstable();
        assert_eq!(seqs, (1..=20).collect::<Vec<_>>());
        assert_eq!(
            leader.fake.opens(),
            1,
            "twenty first writes at once open one session"
        );
        fn assert_send_sync<T: Send + Sync + Clone>() {}
        assert_send_sync::<Client>();
    })
    .await
}

#[tokio::test]
async fn without_follow_hints_only_the_given_address_is_used() {
    bounded(async {
        let leader = Replica::start(2, Mode::Leader).await;
        let follower = Replica::start(1, Mode::Follower(Some(leader.hint()))).await;
        let c = Client::builder()
            .addrs(vec![follower.addr.clone()])
            .timeout(Duration::from_millis(300))
            .follow_hints(false)
            .build()
            .unwrap();
        // Its first write is the session's open, which cannot be done:
        // the write is not sent.
        let e = c.put("k", "v").await.unwrap_err();
        assert!(
            matches!(e, Error::Unavailable(ref m) if m.contains(&leader.addr)),
            "{e}"
        );
        assert_eq!(leader.fake.opens() + leader.fake.writes().len(), 0);
        assert!(follower.fake.opens() >= 2, "retried at the same replica");
    })
    .await
}

#[tokio::test]
async fn a_huge_timeout_is_accepted_without_overflow() {
    bounded(async {
        let leader = Replica::start(1, Mode::Leader).await;
        let c = Client::builder()
            .addrs(vec![leader.addr.clone()])
            .timeout(Duration::MAX)
            .build()
            .unwrap();
        c.put("k", "v").await.unwrap();
        assert_eq!(c.get("k").await.unwrap(), Some(b"v".to_vec()));
        assert_eq!(c.status().await.len(), 1);
    })
    .await
}

#[tokio::test]
async fn a_client_following_hints_is_redirected_to_the_leader_and_stays_there() {
    let test = async {
        let leader = Replica::start(1, Mode::Leader).await;
        let follower = Replica::start(2, Mode::Follower(Some(leader.hint()))).await;
        let c = client(&[&follower.addr, &leader.addr], Duration::from_secs(5));
        c.put("k", "v").await.unwrap();
        c.put("k", "w").await.unwrap();
        assert_eq!(c.get("k").await.unwrap(), Some(b"w".to_vec()));
        // Only the first request (the session's open) met the follower: it
        // asked to be redirected rather than forwarded, and every later one
        // went to the leader directly.
        assert_eq!(follower.routes(), [Route::Redirect]);
        assert_eq!(leader.routes(), [Route::Redirect; 4]);

        // A client told to stay with one replica asks it to forward.
        let pinned = Client::builder()
            .addrs(vec![follower.addr.clone()])
            .follow_hints(false)
            .timeout(Duration::from_millis(300))
            .build()
            .unwrap();
        let _ = pinned.put("k", "x").await;
        assert_eq!(follower.routes().get(1), Some(&Route::Forward));
    };
    tokio::time::timeout(Duration::from_secs(30), test)
        .await
        .expect("the test took over 30 s");
}
