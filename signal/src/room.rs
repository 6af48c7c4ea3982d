//! Rooms: one task per call with peers on this node, owning everything about the call's peers
//! here; connections talk to it over a bounded queue, other nodes over the [`Bus`].
//!
//! # Why an actor per call
//!
//! Every decision about a call — who is present, who may be addressed, whether a reconnect
//! resumes, when the call is empty — is made by the one task that owns that call's state, in
//! the order its commands arrive. No lock is held while a message is relayed; the only shared
//! table is the [`Hub`]'s map from call id to room, touched when a connection joins and when a
//! room ends, never per message.
//!
//! # What a room does with the bus
//!
//! Writes to the bus (presence, events) leave through a per-room ordered queue drained by a
//! publisher task, so a slow or unreachable Redis never stalls relaying between this node's
//! peers, and events reach other nodes in the order the room made them. Reads that need an
//! answer (presence after a reconnect, liveness of other nodes) run in spawned tasks that post
//! their result back to the room as a command.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use control::store::{Call, CallState, Media};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;

use crate::bus::{BusEvent, Envelope, PeerInfo, Removal};
use crate::metrics::DisconnectReason;
use crate::protocol::{PeerView, ServerMsg};
use crate::Shared;

/// Commands a room's queue holds. Connections block (await) when it is full, which only slows
/// the peers of this one call: 256 is far more than a call of 32 peers has in flight.
const ROOM_QUEUE: usize = 256;
/// Envelopes from other nodes waiting for the room; the bus drops (and counts) past it.
const BUS_QUEUE: usize = 1024;
/// Bus writes waiting for the publisher task; past it they are dropped and counted (Redis is
/// down or far too slow; the room keeps serving its local peers).
const PUBLISH_QUEUE: usize = 1024;
/// How often a room looks at its timers (resume windows, empty timeout, expiry) and, less
/// often, refreshes presence and checks other nodes. A second is finer than any of those
/// timeouts need.
const TICK: Duration = Duration::from_secs(1);
/// Longest a room waits for each of its start-up reads: the presence table (past it the room
/// starts without the other nodes' peers and learns them from their events and the next
/// resync) and the call's record (past it the room assumes the call is live, as the join that
/// started it found).
const START_READ_LIMIT: Duration = Duration::from_secs(2);
/// How long a stopping room may take to release its peers' seats in the store before it closes
/// their sockets anyway: a few store round trips (each bounded by the store's own timeout),
/// well inside the node's signaling drain.
const RELEASE_LIMIT: Duration = Duration::from_secs(5);

/// How a room closes one connection: code, reason text, and the metric reason.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Close {
    /// WebSocket close code.
    pub(crate) code: u16,
    /// Close reason text (a short stable word).
    pub(crate) reason: &'static str,
    /// For `turnpike_signal_disconnects_total`.
    pub(crate) metric: DisconnectReason,
}

/// Close codes (RFC 6455 §7.4; 4000–4999 are the application's own).
pub(crate) mod code {
    /// Left by request.
    pub(crate) const NORMAL: u16 = 1000;
    /// The server is shutting down.
    pub(crate) const GOING_AWAY: u16 = 1001;
    /// Binary frames are not part of the protocol.
    pub(crate) const UNSUPPORTED: u16 = 1003;
    /// Rate limit or origin/protocol policy.
    pub(crate) const POLICY: u16 = 1008;
    /// Frame or message above `signal.max-message`.
    pub(crate) const TOO_BIG: u16 = 1009;
    /// Server at capacity.
    pub(crate) const TRY_AGAIN: u16 = 1013;
    /// The call ended.
    pub(crate) const CALL_ENDED: u16 = 4000;
    /// No, bad or revoked token.
    pub(crate) const UNAUTHORIZED: u16 = 4001;
    /// Removed by the host or the API.
    pub(crate) const KICKED: u16 = 4003;
    /// The same peer connected again; this older socket is closed.
    pub(crate) const REPLACED: u16 = 4004;
    /// The call has `max_participants` connected.
    pub(crate) const FULL: u16 = 4009;
    /// No auth in time, or nothing received within the idle timeout.
    pub(crate) const TIMEOUT: u16 = 4008;
}

/// What the room sends a connection.
#[derive(Debug)]
pub(crate) enum Outbound {
    /// A text frame and its metric label.
    Text(String, &'static str),
}

/// A connection's handle inside the room.
#[derive(Debug)]
pub(crate) struct ConnHandle {
    /// Distinguishes a peer's successive connections.
    pub(crate) conn: u64,
    /// Frames to write. Bounded (`signal.send-queue`): full means a reader too slow to keep,
    /// and the room closes it instead of buffering.
    pub(crate) tx: mpsc::Sender<Outbound>,
    /// Tells the connection to close (after writing what is queued).
    pub(crate) kill: watch::Sender<Option<Close>>,
}

impl ConnHandle {
    /// Queues `msg`; a full queue closes the connection as a slow reader. Returns whether it
    /// was queued.
    fn send(&self, msg: &ServerMsg) -> bool {
        self.send_text(msg.to_text(), msg.label())
    }

    fn send_text(&self, text: String, label: &'static str) -> bool {
        match self.tx.try_send(Outbound::Text(text, label)) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Full(_)) => {
                self.close(Close {
                    code: code::POLICY,
                    reason: "slow_reader",
                    metric: DisconnectReason::SlowReader,
                });
                false
            }
            // The connection is going away already.
            Err(mpsc::error::TrySendError::Closed(_)) => false,
        }
    }

    /// Queues an answer to the peer's own message (an `error`), dropped when the queue is full:
    /// a peer flooding itself with refusals is not a slow reader, and the errors are advisory.
    fn send_lossy(&self, msg: &ServerMsg) {
        let _ = self.tx.try_send(Outbound::Text(msg.to_text(), msg.label()));
    }

    fn close(&self, close: Close) {
        // Only the first reason counts: a kicked peer that is also slow stays "kicked".
        self.kill.send_if_modified(|current| {
            if current.is_none() {
                *current = Some(close);
                true
            } else {
                false
            }
        });
    }
}

/// What a joining connection gets back.
#[derive(Debug)]
pub(crate) struct Joined {
    /// The others present.
    pub(crate) peers: Vec<PeerView>,
    /// This connection continues an earlier one within the resume window.
    pub(crate) resumed: bool,
}

impl Joined {
    /// `welcome` with the room's part filled in: who is here, and whether this resumes.
    fn fill(&self, mut welcome: ServerMsg) -> ServerMsg {
        if let ServerMsg::Welcome { peers, resumed, .. } = &mut welcome {
            peers.clone_from(&self.peers);
            *resumed = self.resumed;
        }
        welcome
    }
}

/// Why a join was refused by the room.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum JoinRefused {
    /// `max_participants` peers connected.
    Full,
    /// The peer left this call for good (leave, resume window over, kicked) while this room
    /// ran: the store may not show it yet (it is written in the background).
    Left,
}

/// How a peer's connection went away.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Gone {
    /// It sent `leave`: gone for good, at once.
    Leave,
    /// The socket closed or was closed (timeout, slow reader, network): it may resume within
    /// `signal.resume-window`.
    Lost,
}

/// A room command.
#[derive(Debug)]
pub(crate) enum Cmd {
    /// An authenticated connection of `peer`.
    Join {
        peer: PeerInfo,
        handle: ConnHandle,
        /// The peer's `welcome`, its `peers` and `resumed` filled in by the room: queued by
        /// the room before the handle can receive anything else (see [`Room::join`]).
        welcome: ServerMsg,
        reply: oneshot::Sender<Result<Joined, JoinRefused>>,
    },
    /// Relay `msg` (already stamped with `from`) to `to`.
    Signal {
        from: String,
        conn: u64,
        to: String,
        msg: ServerMsg,
    },
    /// `from`'s media state changed.
    Media {
        from: String,
        conn: u64,
        media: Media,
    },
    /// `peer`'s connection `conn` ended; `done` is dropped once the room has dealt with it.
    Gone {
        peer: String,
        conn: u64,
        how: Gone,
        done: Option<oneshot::Sender<()>>,
    },
    /// Close `peer` (the API kicked it); `publish`: tell the other nodes when it is not here.
    Kick { peer: String, publish: bool },
    /// The call ended; `publish`: tell the other nodes (it did not come from them).
    End { reason: String, publish: bool },
    /// Presence as read from the bus (see [`PresenceRead`]).
    Presence(Vec<PeerInfo>, PresenceRead),
    /// A peer this room gave up on (its resume window ran out) is connected on another node:
    /// it moved, and that node's `peer_joined` did not reach this room.
    Moved(PeerInfo),
    /// Nodes of remote peers whose heartbeat is missing (the liveness check's answer).
    NodesDead(Vec<String>),
}

/// Why the room read the presence table, which says how much of it to trust.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PresenceRead {
    /// At the start, with nothing to lose: remote peers missing from it are gone.
    Start,
    /// After a resync: peers to add only (the table may have been emptied by a Redis restart,
    /// its owners are putting their peers back), and this node's peers are put back too.
    Resync,
    /// The periodic check: remote peers missing from two checks in a row are gone. Their
    /// `peer_left` was lost (a bus hiccup): their owners put live peers back every refresh, so
    /// one miss may be a restart, two are not. Nothing is added: a read taken just before a
    /// peer's owner removed it could otherwise bring back a peer whose `peer_left` came since.
    Check,
}

/// A room's handle in the hub.
#[derive(Debug, Clone)]
pub(crate) struct RoomHandle {
    id: u64,
    pub(crate) tx: mpsc::Sender<Cmd>,
}

/// The rooms of this node, by call id.
#[derive(Debug, Default)]
pub(crate) struct Rooms {
    // A plain mutex: held for a map lookup or insert when a connection joins or a room ends,
    // never across an await and never per relayed message.
    map: Mutex<HashMap<String, RoomHandle>>,
    next_id: AtomicU64,
}

impl Rooms {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, RoomHandle>> {
        // A panic while holding this lock cannot leave the map inconsistent (single inserts
        // and removes), so a poisoned lock is still usable.
        self.map
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The room of a call, if this node has one.
    pub(crate) fn get(&self, call_id: &str) -> Option<RoomHandle> {
        self.lock().get(call_id).cloned()
    }

    /// Calls with a room here (for tests and gauges).
    pub(crate) fn len(&self) -> usize {
        self.lock().len()
    }

    /// The room of `call`, started if this node has none (or the one it had is ending).
    pub(crate) fn get_or_start(&self, shared: &Arc<Shared>, call: &Call) -> RoomHandle {
        let mut map = self.lock();
        if let Some(h) = map.get(&call.id) {
            if !h.tx.is_closed() {
                return h.clone();
            }
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = mpsc::channel(ROOM_QUEUE);
        let (bus_tx, bus_rx) = mpsc::channel(BUS_QUEUE);
        // Subscribed under the lock, so a room ending for this call (which unsubscribes under
        // the lock too) cannot undo this subscription.
        shared.bus.subscribe(&call.id, bus_tx);
        let handle = RoomHandle { id, tx };
        map.insert(call.id.clone(), handle.clone());
        let room = Room::new(Arc::clone(shared), call, id, handle.tx.downgrade());
        tokio::spawn(room.run(rx, bus_rx));
        handle
    }

    /// Forgets room `id` of `call_id` (only if it is still the registered one).
    fn remove(&self, shared: &Shared, call_id: &str, id: u64) {
        let mut map = self.lock();
        if map.get(call_id).is_some_and(|h| h.id == id) {
            map.remove(call_id);
            shared.bus.unsubscribe(call_id);
        }
    }
}

/// A peer connected to this node.
#[derive(Debug)]
struct Local {
    info: PeerInfo,
    /// `None` while disconnected within the resume window.
    conn: Option<ConnHandle>,
    /// When a lost connection's resume window ends.
    resume_until: Option<Instant>,
}

/// A write for the other nodes, in order.
#[derive(Debug)]
enum BusOp {
    Publish(BusEvent),
    Put(PeerInfo),
    /// Remove a peer's presence entry if node `node` wrote it (a lost node's peer).
    Remove {
        peer: String,
        node: String,
    },
    /// A local peer is gone (`reason`) at `at_ms`: unless its presence entry shows it on another
    /// node by now (it moved, and that node's `peer_joined` did not reach this room), remove
    /// the entry, tell the other nodes and record the leave in the store (its seat is free).
    /// If it did move, the room learns it is remote instead.
    Depart {
        peer: String,
        reason: String,
        at_ms: u64,
    },
}

struct Room {
    shared: Arc<Shared>,
    id: u64,
    call_id: String,
    cred_group: String,
    max_participants: usize,
    expires_at_ms: u64,
    local: HashMap<String, Local>,
    remote: HashMap<String, PeerInfo>,
    /// Since when nobody (here or elsewhere) is in the call.
    empty_since: Option<Instant>,
    publish: mpsc::Sender<BusOp>,
    publish_rx: Option<mpsc::Receiver<BusOp>>,
    /// Its own queue's sender, for results of spawned reads; weak, so that the room does not
    /// keep itself alive (the hub's handle is the strong one).
    me: Option<mpsc::WeakSender<Cmd>>,
    last_presence: Instant,
    /// Nodes whose heartbeat was missing, since when.
    suspects: HashMap<String, Instant>,
    /// Remote peers missing from the last presence check (see [`PresenceRead::Check`]).
    unlisted: HashSet<String>,
    /// Since when no peer of this call is connected here (while others are elsewhere).
    local_empty_since: Option<Instant>,
    /// Peers removed for good here: they may not join again with the same peer id (the store
    /// says so too, once its `set_left` lands; this closes the gap before). At most every
    /// participant the call ever had (the store keeps them all too).
    departed: HashSet<String>,
}

impl Room {
    fn new(shared: Arc<Shared>, call: &Call, id: u64, me: mpsc::WeakSender<Cmd>) -> Self {
        let (publish, publish_rx) = mpsc::channel(PUBLISH_QUEUE);
        Self {
            shared,
            id,
            call_id: call.id.clone(),
            cred_group: call.cred_group.clone(),
            max_participants: call.max_participants as usize,
            expires_at_ms: call.expires_at,
            local: HashMap::new(),
            remote: HashMap::new(),
            empty_since: None,
            publish,
            publish_rx: Some(publish_rx),
            me: Some(me),
            last_presence: Instant::now(),
            suspects: HashMap::new(),
            unlisted: HashSet::new(),
            local_empty_since: None,
            departed: HashSet::new(),
        }
    }

    async fn run(mut self, mut rx: mpsc::Receiver<Cmd>, mut bus_rx: mpsc::Receiver<Envelope>) {
        if let Some(publish_rx) = self.publish_rx.take() {
            tokio::spawn(publisher(
                Arc::clone(&self.shared),
                self.call_id.clone(),
                publish_rx,
                self.me.clone(),
            ));
        }
        match tokio::time::timeout(START_READ_LIMIT, self.shared.bus.presence(&self.call_id)).await
        {
            Ok(Ok(peers)) => self.apply_presence(peers, PresenceRead::Start),
            Ok(Err(e)) => {
                self.shared.metrics.bus_error();
                tracing::warn!(error = %e, "cannot read presence; starting without other nodes");
            }
            Err(_) => tracing::warn!("presence read timed out; starting without other nodes"),
        }
        // A join that raced the call's end may have started this room after the last one
        // closed: a room for an ended call would hold it open for that peer. Such a room
        // stops at once; the joins queued meanwhile retry, find the call ended and are
        // refused. (Unreadable: carry on, as the join that started the room did.)
        let store_read = self.shared.app.store.get_call(&self.call_id);
        let mut done = match tokio::time::timeout(START_READ_LIMIT, store_read).await {
            Ok(Ok(call)) => {
                let now = self.shared.app.clock.now_ms();
                call.is_none_or(|c| c.state(now) == CallState::Ended)
            }
            _ => false,
        };

        // The first tick a whole TICK after the start, not at once: the join that started the
        // room comes first.
        let mut tick = tokio::time::interval_at(Instant::now() + TICK, TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut shutdown = self.shared.shutdown.clone();
        let mut stopping = false;
        while !done {
            done = tokio::select! {
                cmd = rx.recv() => match cmd {
                    Some(cmd) => self.handle(cmd),
                    None => true,
                },
                Some(env) = bus_rx.recv() => self.handle_bus(env),
                _ = tick.tick() => self.tick(),
                _ = shutdown.wait_for(|s| *s) => {
                    stopping = true;
                    true
                }
            };
        }
        if stopping {
            self.release_seats().await;
            self.close_all(Close {
                code: code::GOING_AWAY,
                reason: "shutdown",
                metric: DisconnectReason::Shutdown,
            });
        }
        self.shared
            .rooms
            .remove(&self.shared, &self.call_id, self.id);
        // Commands that raced the end: joins get their reply dropped and retry on a new room;
        // everything else concerned this room's peers, who are being closed.
        rx.close();
    }

    fn views(&self, except: &str) -> Vec<PeerView> {
        let mut peers: Vec<PeerView> = self
            .local
            .values()
            .map(|l| &l.info)
            .chain(self.remote.values())
            .filter(|p| p.peer_id != except)
            .map(view)
            .collect();
        peers.sort_by(|a, b| a.peer_id.cmp(&b.peer_id));
        peers
    }

    /// Sends to every connected local peer except `except`.
    fn broadcast(&self, msg: &ServerMsg, except: &str) {
        let text = msg.to_text();
        for (id, l) in &self.local {
            if id != except {
                if let Some(c) = &l.conn {
                    c.send_text(text.clone(), msg.label());
                }
            }
        }
    }

    fn bus(&self, op: BusOp) {
        if self.publish.try_send(op).is_err() {
            self.shared.metrics.bus_dropped();
        }
    }

    fn is_current(&self, peer: &str, conn: u64) -> bool {
        self.local
            .get(peer)
            .and_then(|l| l.conn.as_ref())
            .is_some_and(|c| c.conn == conn)
    }

    /// Handles one command; `true` when the room is done.
    fn handle(&mut self, cmd: Cmd) -> bool {
        match cmd {
            Cmd::Join {
                peer,
                handle,
                welcome,
                reply,
            } => {
                let result = self.join(peer, handle, welcome);
                let _ = reply.send(result);
            }
            Cmd::Signal {
                from,
                conn,
                to,
                msg,
            } => {
                if !self.is_current(&from, conn) {
                    return false;
                }
                if to == from {
                    self.reply_error(&from, "invalid_peer", "cannot send to yourself");
                } else if let Some(target) = self.local.get(&to) {
                    // Within its resume window (no connection) the message is lost, as on a
                    // dead socket; the peers renegotiate when it is back (docs/signaling.md).
                    if let Some(c) = &target.conn {
                        c.send(&msg);
                    }
                } else if self.remote.contains_key(&to) {
                    self.bus(BusOp::Publish(BusEvent::Deliver {
                        to,
                        message: msg.to_value(),
                    }));
                } else {
                    self.reply_error(&from, "unknown_peer", "no such peer in this call");
                }
            }
            Cmd::Media { from, conn, media } => {
                if !self.is_current(&from, conn) {
                    return false;
                }
                let Some(l) = self.local.get_mut(&from) else {
                    return false;
                };
                l.info.media = media;
                let info = l.info.clone();
                let msg = ServerMsg::Media {
                    from: from.clone(),
                    audio: media.audio,
                    video: media.video,
                    screen: media.screen,
                };
                self.broadcast(&msg, &from);
                self.bus(BusOp::Put(info));
                self.bus(BusOp::Publish(BusEvent::Broadcast {
                    from: from.clone(),
                    message: msg.to_value(),
                }));
                let store = Arc::clone(&self.shared.app.store);
                let call = self.call_id.clone();
                tokio::spawn(async move {
                    if let Err(e) = store.set_media(&call, &from, media).await {
                        tracing::warn!(error = %e, "cannot store a media state");
                    }
                });
            }
            Cmd::Gone {
                peer,
                conn,
                how,
                // Held (not `_`) so that it drops, answering the waiting connection, only
                // after the peer is dealt with below.
                done: _done,
            } => {
                if !self.is_current(&peer, conn) {
                    return false;
                }
                let window = self.shared.settings.resume_window;
                match how {
                    Gone::Leave => self.remove_local(&peer, "leave"),
                    Gone::Lost if window.is_zero() => self.remove_local(&peer, "disconnected"),
                    Gone::Lost => {
                        if let Some(l) = self.local.get_mut(&peer) {
                            l.conn = None;
                            l.resume_until = Some(Instant::now() + window);
                        }
                    }
                }
            }
            Cmd::Kick { peer, publish } => {
                if self.local.contains_key(&peer) {
                    self.close_peer(
                        &peer,
                        Close {
                            code: code::KICKED,
                            reason: "kicked",
                            metric: DisconnectReason::Kicked,
                        },
                    );
                    self.remove_local(&peer, "kicked");
                } else {
                    // Not here (yet): a join of it already past its token check, here or
                    // arriving from another node, must not get in after the kick.
                    self.departed.insert(peer.clone());
                    if publish {
                        self.bus(BusOp::Publish(BusEvent::Kick {
                            peer_id: peer,
                            reason: "kicked".into(),
                        }));
                    }
                }
            }
            Cmd::End { reason, publish } => {
                self.end(&reason, publish);
                return true;
            }
            Cmd::Presence(peers, read) => self.apply_presence(peers, read),
            Cmd::Moved(peer) => {
                // Not gone after all: it may come back here later with its token.
                self.departed.remove(&peer.peer_id);
                self.apply_presence(vec![peer], PresenceRead::Resync);
            }
            Cmd::NodesDead(nodes) => self.nodes_dead(nodes),
        }
        false
    }

    /// Admits `peer` on `handle` and queues its `welcome` there first: once the handle is in
    /// the room, broadcasts (a `media`, a `peer_joined`) go to it at once, and a client must
    /// never see those before the `welcome` that tells it who it is.
    fn join(
        &mut self,
        peer: PeerInfo,
        handle: ConnHandle,
        welcome: ServerMsg,
    ) -> Result<Joined, JoinRefused> {
        let id = peer.peer_id.clone();
        if self.departed.contains(&id) {
            return Err(JoinRefused::Left);
        }
        if let Some(l) = self.local.get_mut(&id) {
            // The same peer again: a reconnect within the resume window, or a second socket
            // (another tab) that replaces the first. Either way the others see nothing.
            if let Some(old) = l.conn.take() {
                old.close(Close {
                    code: code::REPLACED,
                    reason: "replaced",
                    metric: DisconnectReason::Replaced,
                });
            }
            l.resume_until = None;
            let joined = Joined {
                peers: self.views(&id),
                resumed: true,
            };
            handle.send(&joined.fill(welcome));
            if let Some(l) = self.local.get_mut(&id) {
                l.conn = Some(handle);
            }
            return Ok(joined);
        }
        // On another node until now (it moved): known to everyone already, so no announcement.
        let moved = self.remote.remove(&id).is_some();
        let present = self.local.len() + self.remote.len();
        if !moved && present >= self.max_participants {
            return Err(JoinRefused::Full);
        }
        self.empty_since = None;
        if !moved {
            self.broadcast(&ServerMsg::PeerJoined { peer: view(&peer) }, &id);
        }
        self.bus(BusOp::Put(peer.clone()));
        self.bus(BusOp::Publish(BusEvent::PeerJoined { peer: peer.clone() }));
        let joined = Joined {
            peers: self.views(&id),
            resumed: moved,
        };
        handle.send(&joined.fill(welcome));
        self.local.insert(
            id.clone(),
            Local {
                info: peer,
                conn: Some(handle),
                resume_until: None,
            },
        );
        Ok(joined)
    }

    fn reply_error(&self, to: &str, code: &str, message: &str) {
        if let Some(c) = self.local.get(to).and_then(|l| l.conn.as_ref()) {
            c.send_lossy(&ServerMsg::error(code, message));
        }
    }

    fn close_peer(&self, peer: &str, close: Close) {
        if let Some(c) = self.local.get(peer).and_then(|l| l.conn.as_ref()) {
            c.close(close);
        }
    }

    fn close_all(&self, close: Close) {
        for l in self.local.values() {
            if let Some(c) = &l.conn {
                c.close(close);
            }
        }
    }

    /// The node is stopping: each of its peers holds its seat only for the resume window (the
    /// time a client tries to reconnect), unless it authenticates again on another node or on
    /// this one restarted. Without this, a peer that never came back (a tab closed meanwhile)
    /// would hold its seat until the call expires whenever no other node had the call: only a
    /// surviving node records a lost node's peers as left. Done before the sockets close, so a
    /// peer reconnecting elsewhere at once finds the mark made; the other way round, the mark
    /// could land after its reconnect and lapse the seat of a connected peer.
    async fn release_seats(&self) {
        let app = &self.shared.app;
        let until = app
            .clock
            .now_ms()
            .saturating_add(self.shared.settings.resume_window.as_millis() as u64);
        let marks = async {
            for peer in self.local.keys() {
                if let Err(e) = app
                    .store
                    .mark_disconnected(&self.call_id, peer, until)
                    .await
                {
                    tracing::warn!(error = %e, "cannot release a seat at shutdown");
                }
            }
        };
        if tokio::time::timeout(RELEASE_LIMIT, marks).await.is_err() {
            tracing::warn!("releasing seats at shutdown took too long");
        }
    }

    /// `peer` is gone for good from this node: tell everyone, record it.
    fn remove_local(&mut self, peer: &str, reason: &str) {
        if self.local.remove(peer).is_none() {
            return;
        }
        self.departed.insert(peer.to_owned());
        self.broadcast(
            &ServerMsg::PeerLeft {
                peer_id: peer.to_owned(),
                reason: reason.to_owned(),
            },
            peer,
        );
        self.bus(BusOp::Depart {
            peer: peer.to_owned(),
            reason: reason.to_owned(),
            at_ms: self.shared.app.clock.now_ms(),
        });
    }

    /// Records in the store that `peer` left (its seat is free, `GET /v1/calls/{id}` shows
    /// when), in the background: the room does not wait on the store.
    fn record_left(&self, peer: &str) {
        let app = self.shared.app.clone();
        let call = self.call_id.clone();
        let peer = peer.to_owned();
        let now = self.shared.app.clock.now_ms();
        tokio::spawn(async move { set_left(&app, &call, &peer, now).await });
    }

    fn remote_left(&mut self, peer: &str, reason: &str) {
        if self.remote.remove(peer).is_some() {
            self.broadcast(
                &ServerMsg::PeerLeft {
                    peer_id: peer.to_owned(),
                    reason: reason.to_owned(),
                },
                peer,
            );
        }
    }

    /// Learns the other nodes' peers from the presence table, as `read` says.
    fn apply_presence(&mut self, peers: Vec<PeerInfo>, read: PresenceRead) {
        let me = self.shared.bus.node_id().to_owned();
        let fresh: HashMap<String, PeerInfo> = peers
            .into_iter()
            .filter(|p| p.node != me && !self.local.contains_key(&p.peer_id))
            .map(|p| (p.peer_id.clone(), p))
            .collect();
        let missing = self.remote.keys().filter(|id| !fresh.contains_key(*id));
        let gone: Vec<String> = match read {
            PresenceRead::Start => missing.cloned().collect(),
            PresenceRead::Resync => Vec::new(),
            PresenceRead::Check => {
                let missing: HashSet<String> = missing.cloned().collect();
                let gone = self.unlisted.intersection(&missing).cloned().collect();
                self.unlisted = missing;
                gone
            }
        };
        for id in gone {
            self.unlisted.remove(&id);
            self.remote_left(&id, "left");
        }
        if read == PresenceRead::Check {
            return;
        }
        for (id, p) in fresh {
            if !self.remote.contains_key(&id) {
                self.broadcast(&ServerMsg::PeerJoined { peer: view(&p) }, &id);
            }
            self.remote.insert(id, p);
        }
        // After a Redis restart the table may be empty: put our own peers back.
        for l in self.local.values() {
            self.bus(BusOp::Put(l.info.clone()));
        }
        self.last_presence = Instant::now();
    }

    fn handle_bus(&mut self, env: Envelope) -> bool {
        match env.event {
            BusEvent::PeerJoined { peer } => {
                let id = peer.peer_id.clone();
                if let Some(l) = self.local.get(&id) {
                    // It connected elsewhere: that socket wins, this one is closed silently.
                    if let Some(c) = &l.conn {
                        c.close(Close {
                            code: code::REPLACED,
                            reason: "replaced",
                            metric: DisconnectReason::Replaced,
                        });
                    }
                    self.local.remove(&id);
                    self.remote.insert(id, peer);
                } else if self.remote.insert(id.clone(), peer.clone()).is_none() {
                    self.empty_since = None;
                    self.broadcast(&ServerMsg::PeerJoined { peer: view(&peer) }, &id);
                }
            }
            BusEvent::PeerLeft { peer_id, reason } => self.remote_left(&peer_id, &reason),
            BusEvent::Deliver { to, message } => {
                if let Some(c) = self.local.get(&to).and_then(|l| l.conn.as_ref()) {
                    c.send_text(message.to_string(), ServerMsg::label_of(&message));
                }
            }
            BusEvent::Broadcast { from, message } => {
                if let Some(p) = self.remote.get_mut(&from) {
                    if let Some(m) = media_of(&message) {
                        p.media = m;
                    }
                }
                let text = message.to_string();
                let label = ServerMsg::label_of(&message);
                for (id, l) in &self.local {
                    if *id != from {
                        if let Some(c) = &l.conn {
                            c.send_text(text.clone(), label);
                        }
                    }
                }
            }
            BusEvent::Kick { peer_id, .. } => {
                return self.handle(Cmd::Kick {
                    peer: peer_id,
                    publish: false,
                });
            }
            BusEvent::CallEnded { reason } => {
                self.end(&reason, false);
                return true;
            }
            BusEvent::Resync => {
                // Redis may have restarted empty: put our peers back and announce them again
                // (rooms that know them already ignore it), then learn who else is there. A
                // peer whose socket is gone (in its resume window) is put back but not
                // announced: it may have come back on another node meanwhile, whose room would
                // take our announcement for a newer connection and close its live one.
                for l in self.local.values() {
                    self.bus(BusOp::Put(l.info.clone()));
                    if l.conn.is_some() {
                        self.bus(BusOp::Publish(BusEvent::PeerJoined {
                            peer: l.info.clone(),
                        }));
                    }
                }
                self.spawn_presence_read(PresenceRead::Resync);
            }
        }
        false
    }

    fn spawn_presence_read(&self, read: PresenceRead) {
        let Some(me) = self.me.clone() else { return };
        let bus = Arc::clone(&self.shared.bus);
        let metrics = self.shared.metrics.clone();
        let call = self.call_id.clone();
        tokio::spawn(async move {
            match bus.presence(&call).await {
                Ok(peers) => {
                    if let Some(tx) = me.upgrade() {
                        let _ = tx.send(Cmd::Presence(peers, read)).await;
                    }
                }
                Err(e) => {
                    metrics.bus_error();
                    tracing::warn!(error = %e, "cannot read presence");
                }
            }
        });
    }

    /// Asks the bus which nodes of remote peers have a current heartbeat; the answer comes
    /// back as [`Cmd::NodesDead`].
    fn spawn_liveness_check(&self) {
        let Some(me) = self.me.clone() else { return };
        let mut nodes: Vec<String> = self.remote.values().map(|p| p.node.clone()).collect();
        nodes.sort();
        nodes.dedup();
        let bus = Arc::clone(&self.shared.bus);
        let metrics = self.shared.metrics.clone();
        tokio::spawn(async move {
            match bus.alive(&nodes).await {
                Ok(alive) => {
                    let dead = nodes
                        .into_iter()
                        .zip(alive)
                        .filter_map(|(n, ok)| (!ok).then_some(n))
                        .collect();
                    if let Some(tx) = me.upgrade() {
                        let _ = tx.send(Cmd::NodesDead(dead)).await;
                    }
                }
                Err(e) => {
                    // Unknown is not dead: keep everyone until the bus answers.
                    metrics.bus_error();
                    tracing::warn!(error = %e, "cannot check other nodes");
                }
            }
        });
    }

    /// A node counts as lost once its heartbeat has been missing for a whole node timeout: a
    /// Redis restart wipes every heartbeat at once, and live nodes set theirs again within a
    /// third of the timeout.
    fn nodes_dead(&mut self, dead: Vec<String>) {
        let now = Instant::now();
        let timeout = self.shared.settings.node_timeout;
        self.suspects.retain(|n, _| dead.contains(n));
        let mut lost_nodes = Vec::new();
        for node in dead {
            let since = *self.suspects.entry(node.clone()).or_insert(now);
            if now.duration_since(since) >= timeout {
                lost_nodes.push(node);
            }
        }
        let lost: Vec<(String, String)> = self
            .remote
            .values()
            .filter(|p| lost_nodes.contains(&p.node))
            .map(|p| (p.peer_id.clone(), p.node.clone()))
            .collect();
        if !lost.is_empty() {
            tracing::info!(peers = lost.len(), "peers of a lost node left");
        }
        for (id, node) in lost {
            self.bus(BusOp::Remove {
                peer: id.clone(),
                node,
            });
            self.remote_left(&id, "node_lost");
            // The lost node can no longer record it: its peers would hold their seats forever.
            // Every surviving node writes the same fact, a moment apart.
            self.record_left(&id);
        }
        for node in lost_nodes {
            self.suspects.remove(&node);
        }
    }

    /// Timers; `true` when the room is done.
    fn tick(&mut self) -> bool {
        let now = Instant::now();
        let expired: Vec<String> = self
            .local
            .iter()
            .filter(|(_, l)| l.resume_until.is_some_and(|t| now >= t))
            .map(|(id, _)| id.clone())
            .collect();
        for id in expired {
            self.remove_local(&id, "timeout");
        }
        if self.shared.app.clock.now_ms() >= self.expires_at_ms {
            self.end("expired", true);
            return true;
        }
        let settings = &self.shared.settings;
        // Presence is refreshed (and other nodes checked) three times per node timeout: a
        // node's table entry and heartbeat outlive two missed refreshes.
        let refresh = settings.node_timeout / 3;
        if now.duration_since(self.last_presence) >= refresh {
            self.last_presence = now;
            for l in self.local.values() {
                self.bus(BusOp::Put(l.info.clone()));
            }
            if !self.remote.is_empty() {
                self.spawn_liveness_check();
                self.spawn_presence_read(PresenceRead::Check);
            }
        }
        if self.local.is_empty() && self.remote.is_empty() {
            let since = *self.empty_since.get_or_insert(now);
            if now.duration_since(since) >= settings.empty_timeout {
                self.end("empty", true);
                return true;
            }
        } else if self.local.is_empty() {
            // Everyone is on other nodes: their rooms carry the call on. Not on the first tick
            // without local peers, so a join racing the decision still finds this room.
            let since = *self.local_empty_since.get_or_insert(now);
            if now.duration_since(since) >= TICK {
                return true;
            }
        } else {
            self.empty_since = None;
            self.local_empty_since = None;
        }
        false
    }

    /// Ends the call: every local peer gets `call_ended` and is closed; when the end started
    /// here, the store records it, the relay revokes its credentials and the other nodes hear.
    fn end(&mut self, reason: &str, publish: bool) {
        self.broadcast(
            &ServerMsg::CallEnded {
                reason: reason.to_owned(),
            },
            "",
        );
        self.close_all(Close {
            code: code::CALL_ENDED,
            reason: "call_ended",
            metric: DisconnectReason::CallEnded,
        });
        let me = self.shared.bus.node_id().to_owned();
        for id in self.local.keys() {
            self.bus(BusOp::Remove {
                peer: id.clone(),
                node: me.clone(),
            });
        }
        self.local.clear();
        if publish {
            self.bus(BusOp::Publish(BusEvent::CallEnded {
                reason: reason.to_owned(),
            }));
            if reason != "api" {
                // `api`: the control plane ended it (and revoked) already.
                let app = self.shared.app.clone();
                let call = self.call_id.clone();
                let group = self.cred_group.clone();
                let reason = reason.to_owned();
                tokio::spawn(async move {
                    let now = app.clock.now_ms();
                    match app.store.end_call(&call, &reason, now).await {
                        Ok(Some(ended)) if ended.state(now) == CallState::Ended => {
                            let until = now / 1000 + app.settings.minter.ttl_s() + 60;
                            app.revoker.revoke(&group, until);
                        }
                        Ok(_) => {}
                        Err(e) => tracing::warn!(error = %e, "cannot record a call's end"),
                    }
                });
            }
        }
    }
}

/// Drains a room's bus writes in order. `room` hears of a departed peer found on another node.
async fn publisher(
    shared: Arc<Shared>,
    call_id: String,
    mut rx: mpsc::Receiver<BusOp>,
    room: Option<mpsc::WeakSender<Cmd>>,
) {
    let ttl = presence_ttl_ms(&shared);
    let me = shared.bus.node_id().to_owned();
    while let Some(op) = rx.recv().await {
        let result = match op {
            BusOp::Publish(event) => shared.bus.publish(&call_id, &event).await,
            BusOp::Put(peer) => shared.bus.presence_put(&call_id, &peer, ttl).await,
            BusOp::Remove { peer, node } => shared
                .bus
                .presence_remove(&call_id, &peer, &node)
                .await
                .map(|_| ()),
            BusOp::Depart {
                peer,
                reason,
                at_ms,
            } => match shared.bus.presence_remove(&call_id, &peer, &me).await {
                Ok(Removal::Elsewhere(there)) => {
                    if let Some(tx) = room.as_ref().and_then(mpsc::WeakSender::upgrade) {
                        let _ = tx.send(Cmd::Moved(there)).await;
                    }
                    Ok(())
                }
                // Removed here, or no entry (never written, expired, or the bus failed): the
                // leave is this node's to report.
                removal => {
                    set_left(&shared.app, &call_id, &peer, at_ms).await;
                    let left = BusEvent::PeerLeft {
                        peer_id: peer,
                        reason,
                    };
                    let published = shared.bus.publish(&call_id, &left).await;
                    removal.and(published)
                }
            },
        };
        if let Err(e) = result {
            shared.metrics.bus_error();
            tracing::debug!(error = %e, "bus write failed");
        }
    }
}

/// Records in the store that `peer` left `call` at `at_ms`.
async fn set_left(app: &control::AppState, call: &str, peer: &str, at_ms: u64) {
    if let Err(e) = app.store.set_left(call, peer, Some(at_ms)).await {
        tracing::warn!(error = %e, "cannot record a peer leaving");
    }
}

/// A presence table outlives its last refresh by three node timeouts: long enough that a live
/// room always refreshes it in time, short enough that a call nobody touches leaves nothing.
fn presence_ttl_ms(shared: &Shared) -> u64 {
    (shared.settings.node_timeout * 3).as_millis() as u64
}

fn view(p: &PeerInfo) -> PeerView {
    PeerView {
        peer_id: p.peer_id.clone(),
        name: p.name.clone(),
        role: p.role,
        media: p.media,
    }
}

fn media_of(message: &serde_json::Value) -> Option<Media> {
    if message.get("type")?.as_str()? != "media" {
        return None;
    }
    Some(Media {
        audio: message.get("audio")?.as_bool()?,
        video: message.get("video")?.as_bool()?,
        screen: message.get("screen")?.as_bool()?,
    })
}
