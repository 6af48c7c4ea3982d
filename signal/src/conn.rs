//! One WebSocket connection: the upgrade checks, authentication, then the read loop (limits,
//! parsing, handing messages to the room) beside a writer task (the bounded send queue).
//!
//! # Order of checks
//!
//! Before the upgrade: `Origin` against the allow-list (403), the node's connection cap and the
//! per-address cap on unauthenticated sockets (503/429). After it: the first message must be
//! `auth` within `signal.auth-timeout`; the token is verified (HS256 pinned, `iss`, `aud`,
//! `exp`, `nbf`, leeway) and then checked against the store — the call must be live and the
//! participant neither kicked nor holding an older token (its `jti`); a first connection is
//! marked in the store (`mark_connected`, refused if the seat lapsed) — before any room hears
//! of the peer. Only then does the socket count as authenticated.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket};
use control::jwt::{Claims, JwtError};
use control::store::{Call, CallState};
use futures_util::{SinkExt as _, StreamExt as _};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;

use crate::bus::PeerInfo;
use crate::metrics::{AuthFailure, DisconnectReason};
use crate::protocol::{self, ClientMsg, ServerMsg};
use crate::quality;
use crate::room::{code, Close, Cmd, ConnHandle, Gone, JoinRefused, Outbound};
use crate::Shared;

/// Clock skew tolerated on `exp` and `nbf`: the control plane's, which also bounds how long a
/// participant who never connected holds its seat (so the two cannot disagree).
pub const LEEWAY_S: u64 = control::jwt::LEEWAY_S;
/// How long the reader waits for the writer to flush a close frame before it gives up.
const CLOSE_FLUSH: Duration = Duration::from_secs(2);
/// The window of the `stats` budget: in each, a connection's reports count (in the fleet's
/// quality histograms and the stored summary) up to one per other seat of its call
/// (`max_participants - 1`), what an honest client of a full call sends (the SDK reports every
/// 5 s, one report per peer connection, all at once); more is ignored, so a client sending as
/// fast as the message limit allows (50 a second) cannot outweigh the others in the histograms.
/// Below 5 s so that an honest client's timer jitter never costs a report.
const REPORT_EVERY: Duration = Duration::from_secs(4);

/// Counts this address's unauthenticated sockets while it lives; released at authentication or
/// when the socket ends.
#[derive(Debug)]
pub(crate) struct Pending {
    shared: Arc<Shared>,
    ip: Option<IpAddr>,
}

impl Pending {
    /// Reserves a slot for `ip`'s limit identity (an IPv4 address or an IPv6 /64, as the control
    /// plane counts: one host usually has a whole /64), or `None` when its cap is reached.
    pub(crate) fn reserve(shared: &Arc<Shared>, ip: IpAddr) -> Option<Self> {
        let ip = control::client::source_of(ip);
        let mut map = shared.lock_pending();
        let n = map.entry(ip).or_insert(0);
        if *n >= shared.settings.max_unauthenticated_per_ip {
            return None;
        }
        *n += 1;
        drop(map);
        shared.metrics.connections_unauthenticated().inc();
        Some(Self {
            shared: Arc::clone(shared),
            ip: Some(ip),
        })
    }

    fn release(&mut self) {
        if let Some(ip) = self.ip.take() {
            let mut map = self.shared.lock_pending();
            if let Some(n) = map.get_mut(&ip) {
                *n -= 1;
                if *n == 0 {
                    map.remove(&ip);
                }
            }
            drop(map);
            self.shared.metrics.connections_unauthenticated().dec();
        }
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        self.release();
    }
}

/// Holds one of the node's `signal.max-connections` slots.
#[derive(Debug)]
pub(crate) struct Slot(Arc<Shared>);

impl Slot {
    pub(crate) fn take(shared: &Arc<Shared>) -> Option<Self> {
        let max = shared.settings.max_connections;
        shared
            .connections
            .fetch_update(
                std::sync::atomic::Ordering::AcqRel,
                std::sync::atomic::Ordering::Acquire,
                |n| (n < max).then_some(n + 1),
            )
            .ok()
            .map(|_| Self(Arc::clone(shared)))
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.0
            .connections
            .fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
    }
}

/// Runs one upgraded socket to its end.
pub(crate) async fn run(shared: Arc<Shared>, socket: WebSocket, pending: Pending, slot: Slot) {
    let (sink, stream) = socket.split();
    let (tx, rx) = mpsc::channel(shared.settings.send_queue);
    let (kill, kill_rx) = watch::channel(None::<Close>);
    // The writer's receiver is made here, not in the task: a close requested before the task
    // first runs must still be seen as a change.
    let writer = tokio::spawn(writer(
        Arc::clone(&shared),
        sink,
        rx,
        (kill.clone(), kill_rx.clone()),
    ));
    let mut conn = Conn {
        shared: Arc::clone(&shared),
        stream,
        tx,
        kill,
        kill_rx,
        pending,
        peer: None,
        bucket: Bucket::new(shared.settings.message_rate, shared.settings.message_burst),
        report_window: None,
        reports_in_window: 0,
        report_budget: 1,
        reports: 0,
        last_quality_store: None,
        connection_types_counted: 0,
    };
    let reason = conn.serve().await;
    // The reason may have been set by the room (kicked, slow reader) or by us.
    let close = conn.kill_rx.borrow().to_owned();
    let metric = close.map_or(reason, |c| c.metric);
    if close.is_none() {
        conn.close(Close {
            code: code::NORMAL,
            reason: "closed",
            metric: reason,
        });
    }
    if let Some((peer, room, conn_id)) = conn.peer.take() {
        let how = if metric == DisconnectReason::Leave {
            Gone::Leave
        } else {
            Gone::Lost
        };
        let _ = room
            .send(Cmd::Gone {
                peer,
                conn: conn_id,
                how,
                done: None,
            })
            .await;
        shared.metrics.connections_active().dec();
    }
    let mut stream = conn.stream;
    drop(conn.tx);
    let abort = writer.abort_handle();
    if tokio::time::timeout(CLOSE_FLUSH, writer).await.is_err() {
        // Still stuck on a peer that does not read: the socket is being dropped anyway, and a
        // detached writer would hold it (and its buffers) for up to a whole write timeout.
        abort.abort();
    }
    // The closing handshake (RFC 6455 §7.1.1): read and discard until the client's close (or
    // the limit), so that frames it sent before seeing ours are not reset away with our close
    // frame still unread.
    let _ = tokio::time::timeout(CLOSE_FLUSH, async {
        while let Some(Ok(_)) = stream.next().await {}
    })
    .await;
    // The slot first: once a disconnect is counted, its slot is free (tests rely on it).
    drop(slot);
    shared.metrics.disconnect(metric);
}

type Sink = futures_util::stream::SplitSink<WebSocket, Message>;

/// How writing one frame went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Sent {
    Ok,
    /// It could not leave within the write timeout: the peer is not reading.
    TimedOut,
    /// The socket failed (reset, closed).
    Failed,
}

/// Writes one frame within `limit`.
async fn send(sink: &mut Sink, msg: Message, limit: Duration) -> Sent {
    match tokio::time::timeout(limit, sink.send(msg)).await {
        Ok(Ok(())) => Sent::Ok,
        Ok(Err(_)) => Sent::Failed,
        Err(_) => Sent::TimedOut,
    }
}

/// Ends the connection after a write that did not go through: the reader (which waits on
/// `kill` beside the socket) stops, and the room hears the peer is gone. Without this a client
/// that keeps sending but never reads would stay in its call for ever, its writer long gone.
fn write_failed(kill: &watch::Sender<Option<Close>>, how: Sent) {
    let close = match how {
        Sent::Ok => return,
        // Exactly as a full send queue (the room's `ConnHandle::send_text`): same close, same
        // metric.
        Sent::TimedOut => Close {
            code: code::POLICY,
            reason: "slow_reader",
            metric: DisconnectReason::SlowReader,
        },
        Sent::Failed => Close {
            code: code::NORMAL,
            reason: "closed",
            metric: DisconnectReason::Closed,
        },
    };
    // The first reason stays (a kicked peer whose close frame cannot leave is still kicked).
    kill.send_if_modified(|c| {
        if c.is_none() {
            *c = Some(close);
            true
        } else {
            false
        }
    });
}

/// Writes queued frames; on a close request, writes what is queued, then the close frame. A
/// frame that cannot be written ends the connection ([`write_failed`]).
async fn writer(
    shared: Arc<Shared>,
    mut sink: Sink,
    mut rx: mpsc::Receiver<Outbound>,
    (kill_tx, mut kill): (watch::Sender<Option<Close>>, watch::Receiver<Option<Close>>),
) {
    let limit = shared.settings.write_timeout;
    loop {
        tokio::select! {
            biased;
            changed = kill.changed() => {
                let close = if changed.is_ok() { *kill.borrow() } else { None };
                // Everything queued before the close request goes first (`call_ended` before
                // the close frame), except for a reader too slow to take it.
                if close.is_some_and(|c| c.metric != DisconnectReason::SlowReader) {
                    while let Ok(Outbound::Text(text, label)) = rx.try_recv() {
                        if send(&mut sink, Message::Text(text.into()), limit).await != Sent::Ok {
                            return;
                        }
                        shared.metrics.message_out(label);
                    }
                }
                if let Some(c) = close {
                    let frame = CloseFrame {
                        code: c.code,
                        reason: Utf8Bytes::from_static(c.reason),
                    };
                    let _ = send(&mut sink, Message::Close(Some(frame)), limit).await;
                }
                return;
            }
            out = rx.recv() => match out {
                Some(Outbound::Text(text, label)) => {
                    let sent = send(&mut sink, Message::Text(text.into()), limit).await;
                    if sent != Sent::Ok {
                        write_failed(&kill_tx, sent);
                        return;
                    }
                    shared.metrics.message_out(label);
                }
                None => return,
            },
        }
    }
}

/// A token bucket: `rate` messages per second, bursts of `burst`.
#[derive(Debug)]
struct Bucket {
    tokens: f64,
    rate: f64,
    burst: f64,
    at: Instant,
    /// Messages refused since the last accepted one.
    refused: u32,
}

impl Bucket {
    fn new(rate: u32, burst: u32) -> Self {
        Self {
            tokens: f64::from(burst),
            rate: f64::from(rate),
            burst: f64::from(burst),
            at: Instant::now(),
            refused: 0,
        }
    }

    fn take(&mut self) -> bool {
        let now = Instant::now();
        let elapsed = now.duration_since(self.at).as_secs_f64();
        self.at = now;
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            self.refused = 0;
            true
        } else {
            self.refused = self.refused.saturating_add(1);
            false
        }
    }
}

struct Conn {
    shared: Arc<Shared>,
    stream: futures_util::stream::SplitStream<WebSocket>,
    tx: mpsc::Sender<Outbound>,
    kill: watch::Sender<Option<Close>>,
    kill_rx: watch::Receiver<Option<Close>>,
    pending: Pending,
    /// Once joined: peer id, its room, this connection's id there.
    peer: Option<(String, mpsc::Sender<Cmd>, u64)>,
    bucket: Bucket,
    /// When the current window of the `stats` budget began ([`REPORT_EVERY`]).
    report_window: Option<Instant>,
    /// Reports counted in that window.
    reports_in_window: u32,
    /// Reports that count per window: one per other seat of the call, at least one.
    report_budget: u32,
    /// How many `stats` reports of this connection counted.
    reports: u64,
    /// When the quality summary was last stored: at most once a window (it is the latest
    /// report's, whichever peer connection it is about).
    last_quality_store: Option<Instant>,
    /// The (candidate type, relay protocol) pairs already counted in
    /// `turnpike_call_connections_total` for this connection, one bit each: a client with peers
    /// over different paths reports them in turn, and each path counts once.
    connection_types_counted: u16,
}

/// An authenticated peer, as `main_loop` starts with it.
struct Joined {
    peer_id: String,
    call_id: String,
    /// When the call ends (Unix ms): no credentials pushed outlive it.
    call_expires_at: u64,
    /// Its TURN credential group.
    group: String,
    /// Of the token it authenticated with: the template of the fresh ones.
    claims: Claims,
    timers: Timers,
}

/// When the next server-initiated pushes are due.
struct Timers {
    /// Fresh TURN credentials (`ice_servers`).
    ice_servers: Instant,
    /// A fresh signaling token (`token`).
    token: Instant,
}

/// What the read loop made of one frame.
enum Read {
    Text(Utf8Bytes),
    /// Ping/pong control frames: they count as activity, nothing else.
    Control,
    /// Ended; why.
    End(DisconnectReason),
}

impl Conn {
    fn send(&self, msg: &ServerMsg) {
        if let Err(mpsc::error::TrySendError::Full(_)) =
            self.tx.try_send(Outbound::Text(msg.to_text(), msg.label()))
        {
            self.close(Close {
                code: code::POLICY,
                reason: "slow_reader",
                metric: DisconnectReason::SlowReader,
            });
        }
    }

    /// Queues an answer to this client's own message, waiting while its queue is full: a client
    /// that floods itself with answers is slowed down, not dropped (a client that never reads
    /// at all is dropped by the writer's timeout, which ends the queue).
    async fn reply(&self, msg: &ServerMsg) {
        let _ = self
            .tx
            .send(Outbound::Text(msg.to_text(), msg.label()))
            .await;
    }

    fn close(&self, close: Close) {
        self.kill.send_if_modified(|c| {
            if c.is_none() {
                *c = Some(close);
                true
            } else {
                false
            }
        });
    }

    /// Sends `error` and closes with `close`.
    fn refuse(&self, error_code: &str, message: &str, close: Close) -> DisconnectReason {
        self.send(&ServerMsg::error(error_code, message));
        self.close(close);
        close.metric
    }

    async fn read(&mut self, deadline: Instant) -> Read {
        let mut kill = self.kill_rx.clone();
        tokio::select! {
            frame = tokio::time::timeout_at(deadline, self.stream.next()) => match frame {
                Err(_) => Read::End(DisconnectReason::IdleTimeout),
                Ok(None) => Read::End(DisconnectReason::Closed),
                Ok(Some(Err(e))) => match read_failure(e) {
                    ReadFailure::TooBig => {
                        self.close(Close {
                            code: code::TOO_BIG,
                            reason: "too_large",
                            metric: DisconnectReason::TooLarge,
                        });
                        Read::End(DisconnectReason::TooLarge)
                    }
                    ReadFailure::Dropped => Read::End(DisconnectReason::Closed),
                    ReadFailure::Protocol => Read::End(DisconnectReason::ProtocolError),
                },
                Ok(Some(Ok(Message::Text(t)))) => Read::Text(t),
                Ok(Some(Ok(Message::Binary(_)))) => {
                    self.close(Close {
                        code: code::UNSUPPORTED,
                        reason: "binary",
                        metric: DisconnectReason::ProtocolError,
                    });
                    Read::End(DisconnectReason::ProtocolError)
                }
                Ok(Some(Ok(Message::Close(_)))) => Read::End(DisconnectReason::Closed),
                Ok(Some(Ok(Message::Ping(_) | Message::Pong(_)))) => Read::Control,
            },
            // Closed by the room (kicked, slow reader, call ended) or by the server stopping.
            _ = kill.wait_for(Option::is_some) => {
                Read::End(self.kill_rx.borrow().map_or(DisconnectReason::Closed, |c| c.metric))
            }
        }
    }

    /// The connection's life; returns why it ended.
    async fn serve(&mut self) -> DisconnectReason {
        let settings = &self.shared.settings;
        let auth_deadline = Instant::now() + settings.auth_timeout;
        let text = loop {
            match self.read(auth_deadline).await {
                Read::Text(t) => break t,
                Read::Control => continue,
                Read::End(DisconnectReason::IdleTimeout) => {
                    return self.refuse(
                        "auth_timeout",
                        "no auth message in time",
                        Close {
                            code: code::TIMEOUT,
                            reason: "auth_timeout",
                            metric: DisconnectReason::AuthTimeout,
                        },
                    );
                }
                Read::End(r) => return r,
            }
        };
        let (label, parsed) = protocol::parse(&text);
        self.shared.metrics.message_in(label);
        let token = match parsed {
            Ok(ClientMsg::Auth { token }) => token,
            _ => {
                self.shared.metrics.auth_failure(AuthFailure::Malformed);
                return self.unauthorized("the first message must be auth");
            }
        };
        let joined = match self.authenticate(&token).await {
            Ok(j) => j,
            Err(r) => return r,
        };
        self.pending.release();
        self.shared.metrics.connections_active().inc();
        self.main_loop(joined).await
    }

    fn unauthorized(&self, message: &str) -> DisconnectReason {
        self.refuse(
            "unauthorized",
            message,
            Close {
                code: code::UNAUTHORIZED,
                reason: "unauthorized",
                metric: DisconnectReason::AuthFailed,
            },
        )
    }

    /// The store failed during auth: the client may try again shortly (nothing is wrong with
    /// its token). Counted apart from ordinary closes, so an outage shows on the dashboard.
    fn store_unavailable(&self, e: &control::store::StoreError) -> DisconnectReason {
        tracing::warn!(error = %e, "store unavailable during signal auth");
        self.refuse(
            "unavailable",
            "try again shortly",
            Close {
                code: code::TRY_AGAIN,
                reason: "unavailable",
                metric: DisconnectReason::Unavailable,
            },
        )
    }

    /// Refuses the valid token of a participant that left for good. The message says so (the
    /// token is genuine, so nothing is given away): the client should join again rather than
    /// retry.
    fn left(&self) -> DisconnectReason {
        self.shared.metrics.auth_failure(AuthFailure::Left);
        self.unauthorized("this peer has left the call: join again (POST /v1/join)")
    }

    /// Verifies the token, checks it against the store and joins the room.
    async fn authenticate(&mut self, token: &str) -> Result<Joined, DisconnectReason> {
        let app = &self.shared.app;
        let now_ms = app.clock.now_ms();
        let claims =
            match app
                .settings
                .jwt
                .verify(token, &app.settings.public_url, now_ms / 1000, LEEWAY_S)
            {
                Ok(c) => c,
                Err(e) => {
                    self.shared.metrics.auth_failure(match e {
                        JwtError::Malformed => AuthFailure::Malformed,
                        JwtError::Algorithm => AuthFailure::Algorithm,
                        JwtError::UnknownKey => AuthFailure::UnknownKey,
                        JwtError::Signature => AuthFailure::Signature,
                        JwtError::Expired => AuthFailure::Expired,
                        JwtError::NotYetValid => AuthFailure::NotYetValid,
                        JwtError::Audience => AuthFailure::Audience,
                    });
                    tracing::debug!(reason = %e, "signal token refused");
                    // One message for every refusal: which check failed is for logs and metrics.
                    return Err(self.unauthorized("invalid or expired token"));
                }
            };
        let call = match app.store.get_call(&claims.call).await {
            Ok(c) => c,
            Err(e) => return Err(self.store_unavailable(&e)),
        };
        let Some(call) = call.filter(|c| c.state(now_ms) != CallState::Ended) else {
            self.shared.metrics.auth_failure(AuthFailure::CallGone);
            return Err(self.refuse(
                "call_ended",
                "the call has ended",
                Close {
                    code: code::CALL_ENDED,
                    reason: "call_ended",
                    metric: DisconnectReason::AuthFailed,
                },
            ));
        };
        // The token must be the participant's current one, and the participant not kicked:
        // a kicked peer's token (its `jti`) is revoked for good.
        let participant = call
            .participants
            .iter()
            .find(|p| p.peer_id == claims.sub && p.jti == claims.jti && !p.kicked);
        let Some(participant) = participant else {
            self.shared.metrics.auth_failure(AuthFailure::Revoked);
            return Err(self.unauthorized("invalid or expired token"));
        };
        // Left for good (`leave`, or the resume window ran out): the store no longer counts
        // the seat, so `/v1/join` may have given it away; letting the token back in would put
        // one more peer in the call than the store knows of. A fresh join is the way back.
        if participant.left_at.is_some() {
            return Err(self.left());
        }
        // First connection: from now on the seat is held until the peer leaves, not only while
        // its join token could still authenticate. A resume finds it marked already (no store
        // write per reconnect). Marked before the room hears of the peer: the other way round
        // a store failure would leave a peer in the room whose seat could still lapse.
        if !participant.connected {
            match app
                .store
                .mark_connected(&call.id, &claims.sub, app.clock.now_ms())
                .await
            {
                // Kicked between the token check and now: refused like any kicked token.
                Ok(Some(p)) if p.kicked => {
                    self.shared.metrics.auth_failure(AuthFailure::Revoked);
                    return Err(self.unauthorized("invalid or expired token"));
                }
                Ok(Some(p)) if p.connected && p.left_at.is_none() => {}
                // The seat lapsed between the token check and now (the token's last moments):
                // `/v1/join` may have given it away already, so a fresh join is the way in.
                Ok(Some(_)) => return Err(self.left()),
                Ok(None) => {
                    self.shared.metrics.auth_failure(AuthFailure::Revoked);
                    return Err(self.unauthorized("invalid or expired token"));
                }
                Err(e) => return Err(self.store_unavailable(&e)),
            }
        }
        let peer = PeerInfo {
            peer_id: claims.sub.clone(),
            name: participant.name.clone(),
            role: participant.role,
            node: self.shared.bus.node_id().to_owned(),
            media: participant.media,
        };
        let conn_id = self.shared.next_conn_id();
        let group = format!("{}.{}", call.cred_group, claims.sub);
        // A room that is ending refuses by dropping the reply: try once more on a fresh one,
        // unless the call ended with it (a fresh room would hold an ended call open).
        for attempt in 0..2 {
            if attempt > 0 {
                match app.store.get_call(&call.id).await {
                    Ok(Some(c)) if c.state(app.clock.now_ms()) != CallState::Ended => {}
                    Ok(_) => break,
                    Err(e) => return Err(self.store_unavailable(&e)),
                }
            }
            let (welcome, refresh) = self.welcome(&claims.sub, &call, &group);
            let room = self.shared.rooms.get_or_start(&self.shared, &call);
            let (reply, answer) = oneshot::channel();
            let cmd = Cmd::Join {
                peer: peer.clone(),
                handle: ConnHandle {
                    conn: conn_id,
                    tx: self.tx.clone(),
                    kill: self.kill.clone(),
                },
                welcome,
                reply,
            };
            if room.tx.send(cmd).await.is_err() {
                continue;
            }
            match answer.await {
                // The room has queued the welcome.
                Ok(Ok(_)) => {
                    self.peer = Some((claims.sub.clone(), room.tx.clone(), conn_id));
                    self.report_budget = call.max_participants.saturating_sub(1).max(1);
                    let token_due = Instant::now() + refresh_delay(now_ms, claims.exp);
                    return Ok(Joined {
                        peer_id: claims.sub.clone(),
                        call_id: call.id.clone(),
                        call_expires_at: call.expires_at,
                        group,
                        timers: Timers {
                            ice_servers: refresh,
                            token: token_due,
                        },
                        claims,
                    });
                }
                // Gone for good from the room a moment ago, before the store heard of it.
                Ok(Err(JoinRefused::Left)) => return Err(self.left()),
                Ok(Err(JoinRefused::Full)) => {
                    // The store counted this participant's seat (and holds it for good once
                    // marked connected, above) while the room, which knows who is present on
                    // every node, has no room for it: two nodes' clocks disagreed on when
                    // another seat lapsed. Give the seat back, or the call stays one seat
                    // short until it ends; the token is done with (a fresh join is the way in).
                    if let Err(e) = app
                        .store
                        .set_left(&call.id, &claims.sub, Some(app.clock.now_ms()))
                        .await
                    {
                        tracing::warn!(error = %e, "cannot release the seat of a peer refused as full");
                    }
                    self.shared.metrics.auth_failure(AuthFailure::Full);
                    return Err(self.refuse(
                        "full",
                        "the call is full",
                        Close {
                            code: code::FULL,
                            reason: "full",
                            metric: DisconnectReason::AuthFailed,
                        },
                    ));
                }
                // The room ended before answering.
                Err(_) => continue,
            }
        }
        Err(self.refuse(
            "call_ended",
            "the call has ended",
            Close {
                code: code::CALL_ENDED,
                reason: "call_ended",
                metric: DisconnectReason::CallEnded,
            },
        ))
    }

    /// Fresh credentials for `group` in a call that ends at `call_expires_at` (Unix ms; they
    /// never outlive it, as `POST /v1/join`'s do not), and when to push the next ones
    /// ([`refresh_delay`]).
    fn mint(&self, group: &str, call_expires_at: u64) -> (control::creds::Minted, Instant) {
        let app = &self.shared.app;
        let now_ms = app.clock.now_ms();
        let minted = app
            .settings
            .minter
            .mint_for_call(group, now_ms / 1000, call_expires_at);
        let next = Instant::now() + refresh_delay(now_ms, minted.expires_at);
        (minted, next)
    }

    /// This peer's `welcome` with fresh credentials, for the room to fill in and queue (the
    /// others present, whether it resumes), and when those credentials are due for a refresh.
    fn welcome(&self, peer_id: &str, call: &Call, group: &str) -> (ServerMsg, Instant) {
        let (minted, refresh) = self.mint(group, call.expires_at);
        let welcome = ServerMsg::Welcome {
            peer_id: peer_id.to_owned(),
            call_id: call.id.clone(),
            peers: Vec::new(),
            ice_servers: minted.ice_servers,
            ice_servers_expire_at: minted.expires_at,
            ping_interval_ms: self.shared.settings.ping_interval.as_millis() as u64,
            resumed: false,
        };
        (welcome, refresh)
    }

    /// A fresh signaling token for this peer, and when to push the next one. The claims are
    /// the verified ones of the current token with a new lifetime, signed by the control
    /// plane's first key as `POST /v1/join` does: same `iss`, `aud`, `sub`, call, role, name.
    ///
    /// The `jti` stays: `auth` accepts only the participant's stored `jti` (the one of its
    /// admission), and a kick or a leave is recorded on the participant, not on a token, so
    /// every token of the admission is refused together once the peer is kicked or gone.
    fn renew(&self, claims: &mut Claims) -> (ServerMsg, Instant) {
        let app = &self.shared.app;
        let now_ms = app.clock.now_ms();
        let now_s = now_ms / 1000;
        claims.iat = now_s;
        claims.nbf = now_s;
        claims.exp = now_s + app.settings.token_ttl.as_secs();
        let msg = ServerMsg::Token {
            token: app.settings.jwt.sign(claims),
            expires_at: claims.exp,
        };
        (msg, Instant::now() + refresh_delay(now_ms, claims.exp))
    }

    async fn main_loop(&mut self, joined: Joined) -> DisconnectReason {
        let Joined {
            peer_id,
            call_id,
            call_expires_at,
            group,
            mut claims,
            mut timers,
        } = joined;
        let idle = self.shared.settings.idle_timeout;
        let mut deadline = Instant::now() + idle;
        loop {
            // Two independent schedules (TURN credentials, signaling token), each re-armed
            // from what it just pushed; neither resets the idle deadline: only the client's
            // messages count as activity.
            let read = tokio::select! {
                r = self.read(deadline) => r,
                _ = tokio::time::sleep_until(timers.ice_servers) => {
                    let (minted, next) = self.mint(&group, call_expires_at);
                    let msg = ServerMsg::IceServers {
                        ice_servers: minted.ice_servers,
                        ice_servers_expire_at: minted.expires_at,
                    };
                    self.reply(&msg).await;
                    timers.ice_servers = next;
                    continue;
                }
                _ = tokio::time::sleep_until(timers.token) => {
                    let (msg, next) = self.renew(&mut claims);
                    self.reply(&msg).await;
                    timers.token = next;
                    continue;
                }
            };
            let text = match read {
                Read::Text(t) => t,
                Read::Control => {
                    deadline = Instant::now() + idle;
                    continue;
                }
                Read::End(DisconnectReason::IdleTimeout) => {
                    self.close(Close {
                        code: code::TIMEOUT,
                        reason: "idle_timeout",
                        metric: DisconnectReason::IdleTimeout,
                    });
                    return DisconnectReason::IdleTimeout;
                }
                Read::End(r) => return r,
            };
            deadline = Instant::now() + idle;
            if !self.bucket.take() {
                self.shared.metrics.message_in("rate_limited");
                // A client that keeps sending after being told is closed; up to a burst's
                // worth of refused messages is tolerated (a reconnect storm, a buggy loop).
                if f64::from(self.bucket.refused) > self.bucket.burst {
                    return self.refuse(
                        "rate_limited",
                        "too many messages",
                        Close {
                            code: code::POLICY,
                            reason: "rate_limited",
                            metric: DisconnectReason::RateLimited,
                        },
                    );
                }
                if self.bucket.refused == 1 {
                    self.reply(&ServerMsg::error(
                        "rate_limited",
                        "too many messages: slow down",
                    ))
                    .await;
                }
                continue;
            }
            let (label, parsed) = protocol::parse(&text);
            self.shared.metrics.message_in(label);
            let msg = match parsed {
                Ok(m) => m,
                Err(e) => {
                    self.reply(&ServerMsg::error(e.code(), e.to_string())).await;
                    continue;
                }
            };
            if let Some(r) = self.handle(msg, &peer_id, &call_id).await {
                return r;
            }
        }
    }

    /// Handles one parsed message; `Some` when the connection ends.
    async fn handle(
        &mut self,
        msg: ClientMsg,
        peer_id: &str,
        call_id: &str,
    ) -> Option<DisconnectReason> {
        let Some((_, room, conn)) = self.peer.clone() else {
            return Some(DisconnectReason::Closed);
        };
        let from = peer_id.to_owned();
        let cmd = match msg {
            ClientMsg::Auth { .. } => {
                self.reply(&ServerMsg::error(
                    "already_authenticated",
                    "this connection is authenticated",
                ))
                .await;
                return None;
            }
            ClientMsg::Ping => {
                self.reply(&ServerMsg::Pong).await;
                return None;
            }
            ClientMsg::Leave => {
                // The room removes the peer before the close frame goes out: a client that
                // reconnects the moment it sees the close must find itself gone, not resume
                // the socket it just left. (`run` reports the end again; the room ignores it.)
                let (done, removed) = oneshot::channel();
                let gone = Cmd::Gone {
                    peer: from,
                    conn,
                    how: Gone::Leave,
                    done: Some(done),
                };
                if room.send(gone).await.is_ok() {
                    let _ = removed.await;
                }
                self.close(Close {
                    code: code::NORMAL,
                    reason: "leave",
                    metric: DisconnectReason::Leave,
                });
                return Some(DisconnectReason::Leave);
            }
            ClientMsg::Offer { to, sdp } => Cmd::Signal {
                msg: ServerMsg::Offer {
                    from: from.clone(),
                    sdp,
                },
                from,
                conn,
                to,
            },
            ClientMsg::Answer { to, sdp } => Cmd::Signal {
                msg: ServerMsg::Answer {
                    from: from.clone(),
                    sdp,
                },
                from,
                conn,
                to,
            },
            ClientMsg::Candidate { to, candidate } => Cmd::Signal {
                msg: ServerMsg::Candidate {
                    from: from.clone(),
                    candidate,
                },
                from,
                conn,
                to,
            },
            ClientMsg::Media(media) => Cmd::Media { from, conn, media },
            ClientMsg::Stats(body) => {
                self.stats(body, peer_id, call_id).await;
                return None;
            }
        };
        if room.send(cmd).await.is_err() {
            return Some(DisconnectReason::CallEnded);
        }
        None
    }

    async fn stats(&mut self, body: serde_json::Value, peer_id: &str, call_id: &str) {
        let report = match quality::Report::from_json(body) {
            Ok(r) => r,
            Err(e) => {
                self.reply(&ServerMsg::error("invalid_message", e.to_string()))
                    .await;
                return;
            }
        };
        let now = Instant::now();
        if self
            .report_window
            .is_none_or(|t| now.duration_since(t) >= REPORT_EVERY)
        {
            self.report_window = Some(now);
            self.reports_in_window = 0;
        }
        if self.reports_in_window >= self.report_budget {
            return;
        }
        self.reports_in_window += 1;
        self.reports += 1;
        self.shared.metrics.observe_report(&report);
        let bit = 1u16 << report.connection_kind_index();
        if self.connection_types_counted & bit == 0 {
            self.connection_types_counted |= bit;
            self.shared
                .metrics
                .count_connection_type(report.candidate_type, report.relay_protocol);
        }
        if self
            .last_quality_store
            .is_some_and(|t| now.duration_since(t) < REPORT_EVERY)
        {
            return;
        }
        self.last_quality_store = Some(now);
        let store = Arc::clone(&self.shared.app.store);
        let quality = report.summary(self.shared.app.clock.now_ms(), self.reports);
        let (call, peer) = (call_id.to_owned(), peer_id.to_owned());
        tokio::spawn(async move {
            if let Err(e) = store.set_quality(&call, &peer, &quality).await {
                tracing::warn!(error = %e, "cannot store a quality summary");
            }
        });
    }
}

/// Least time between two credential (or token) pushes, whatever the lifetime: a zero or sub-second
/// `ttl` (a misconfiguration) must not become a loop of pushes.
const MIN_REFRESH: Duration = Duration::from_secs(1);

/// How long after minting, at `now_ms` (Unix ms), credentials that expire at `expires_at_s`
/// (Unix s) the next ones are pushed: at 80 % of their lifetime, so that the client has them
/// before the old ones stop working mid-call. Signaling tokens (`exp`) are scheduled alike.
///
/// The lifetime is counted from the mint instant to the expiry actually written in the
/// username, not taken as the configured ttl: the expiry is in whole seconds (rounded down
/// from `now`), so the real lifetime is up to a second shorter than the ttl, and 80 % of the
/// ttl could come after it with a short ttl.
fn refresh_delay(now_ms: u64, expires_at_s: u64) -> Duration {
    let lifetime_ms = expires_at_s.saturating_mul(1000).saturating_sub(now_ms);
    // `lifetime_ms * 4 / 5` without overflow for any u64.
    let delay_ms = lifetime_ms / 5 * 4 + lifetime_ms % 5 * 4 / 5;
    Duration::from_millis(delay_ms).max(MIN_REFRESH)
}

/// Whether a read failed because a frame or message exceeded `signal.max-message`.
/// What a failed WebSocket read means.
enum ReadFailure {
    /// A frame or message over the size limit.
    TooBig,
    /// The connection went away without a close frame: a closed laptop lid, a lost network, a
    /// killed tab. As normal as a close, and counted as one.
    Dropped,
    /// The client broke the WebSocket protocol.
    Protocol,
}

fn read_failure(e: axum::Error) -> ReadFailure {
    use tungstenite::error::ProtocolError;
    let inner = e.into_inner();
    match inner.downcast_ref::<tungstenite::Error>() {
        Some(tungstenite::Error::Capacity(_)) => ReadFailure::TooBig,
        Some(
            tungstenite::Error::Protocol(ProtocolError::ResetWithoutClosingHandshake)
            | tungstenite::Error::Io(_)
            | tungstenite::Error::ConnectionClosed
            | tungstenite::Error::AlreadyClosed,
        ) => ReadFailure::Dropped,
        other => {
            tracing::debug!(error = ?other, "WebSocket read failed");
            ReadFailure::Protocol
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fresh_credentials_are_due_at_80_percent_of_the_real_lifetime() {
        // Minted at 1000.9 s with a 10 s ttl: the username says 1010, a lifetime of 9.1 s.
        assert_eq!(
            refresh_delay(1_000_900, 1_010),
            Duration::from_millis(7_280)
        );
        // A whole-second mint: 80 % of the ttl exactly.
        assert_eq!(
            refresh_delay(1_000_000, 1_000 + 3_600),
            Duration::from_secs(2_880)
        );
        // Always before the expiry, never before 80 % of the lifetime, for every instant
        // within a second and a few short ttls.
        for ttl_s in [2_u64, 3, 5, 60] {
            for frac_ms in (0..1_000).step_by(37) {
                let now_ms = 1_700_000_000_000 + frac_ms;
                let expires_at = now_ms / 1000 + ttl_s;
                let lifetime = expires_at * 1000 - now_ms;
                let delay = refresh_delay(now_ms, expires_at).as_millis() as u64;
                assert!(
                    delay * 5 >= lifetime * 4 - 4,
                    "{ttl_s} s, +{frac_ms} ms: early"
                );
                assert!(delay < lifetime, "{ttl_s} s, +{frac_ms} ms: after expiry");
            }
        }
        // Expired or zero-lifetime credentials: not a loop of pushes.
        assert_eq!(refresh_delay(5_000, 5), MIN_REFRESH);
        assert_eq!(refresh_delay(9_000, 5), MIN_REFRESH);
        // No overflow at the extremes.
        assert!(refresh_delay(0, u64::MAX) > Duration::ZERO);
    }
}
