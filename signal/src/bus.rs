//! How the signaling nodes of one deployment reach each other: a [`Bus`].
//!
//! A call's peers may be connected to different `turnpike` processes. Each node runs one room per
//! call it has peers of (`crate::room`); rooms of the same call on different nodes talk through
//! the bus: one pub/sub channel per call carries [`BusEvent`]s, a presence table per call says
//! which peer is on which node, and a heartbeat per node lets the others notice a node that died
//! (its peers are reported `left` once its heartbeat has lapsed).
//!
//! Two implementations: [`LocalBus`] (one node, nothing to reach: every method is a no-op) and
//! `RedisBus` (Redis pub/sub and hashes, see `crate::redis_bus`).

use std::fmt;

use async_trait::async_trait;
use control::store::{Media, Role};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

/// A peer as the other nodes see it (its presence entry and its `peer_joined` event).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerInfo {
    /// The peer id (JWT `sub`).
    pub peer_id: String,
    /// Display name.
    pub name: String,
    /// Host or guest.
    pub role: Role,
    /// The node its WebSocket is connected to ([`Bus::node_id`]).
    pub node: String,
    /// What it sends.
    pub media: Media,
}

/// What a room tells the rooms of the same call on other nodes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum BusEvent {
    /// A peer connected (or resumed after its resume window had passed elsewhere).
    PeerJoined {
        /// Who.
        peer: PeerInfo,
    },
    /// A peer left for good (`reason` as in the `peer_left` message).
    PeerLeft {
        /// Who.
        peer_id: String,
        /// `leave`, `timeout`, `kicked`, `node_lost`, …
        reason: String,
    },
    /// A server message for exactly one peer (relayed `offer`/`answer`/`candidate`, already
    /// stamped with `from`): the node that has `to` delivers it.
    Deliver {
        /// The addressee's peer id.
        to: String,
        /// The complete server → client message.
        message: serde_json::Value,
    },
    /// A server message for every peer of the call except `from` (`media`).
    Broadcast {
        /// The sender, who does not get it back.
        from: String,
        /// The complete server → client message.
        message: serde_json::Value,
    },
    /// Close the peer's socket with this reason (a kick issued on another node).
    Kick {
        /// Who.
        peer_id: String,
        /// `kicked`.
        reason: String,
    },
    /// The call ended: every node closes its peers of the call.
    CallEnded {
        /// `api`, `empty`, …
        reason: String,
    },
    /// Not sent by any node: a bus whose subscriptions take effect later than
    /// [`Bus::subscribe`] returns (Redis) hands this to a room once its subscription is active,
    /// and to every subscribed room after it reconnected and resubscribed, because events may
    /// have been missed meanwhile; the room then re-reads presence.
    Resync,
}

/// A [`BusEvent`] with the node it came from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Envelope {
    /// The publishing node ([`Bus::node_id`]); a node never receives its own envelopes.
    pub node: String,
    /// What happened.
    pub event: BusEvent,
}

/// A bus failure: the shared backend is unreachable. Rooms keep serving their local peers.
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    /// The backend could not be reached or timed out.
    #[error("bus unavailable: {0}")]
    Unavailable(String),
    /// The backend returned something unreadable (foreign data or a bug).
    #[error("bus data corrupt: {0}")]
    Corrupt(String),
}

/// The nodes' meeting point. Cheap to call from many tasks; methods that talk to the backend
/// time out on their own (well under the HTTP request timeout).
#[async_trait]
pub trait Bus: Send + Sync + fmt::Debug + 'static {
    /// This node's id (random per process).
    fn node_id(&self) -> &str;

    /// Delivers every envelope published for `call_id` by *other* nodes to `tx`, from when the
    /// subscription is active until [`Bus::unsubscribe`]; re-subscribing replaces the earlier
    /// sender. A backend that subscribes in the background sends a [`BusEvent::Resync`] to `tx`
    /// once it is active, and again after every reconnect. When `tx` is full the envelope is
    /// dropped and counted: a room that cannot keep up must not stall the bus.
    fn subscribe(&self, call_id: &str, tx: mpsc::Sender<Envelope>);

    /// Stops delivering `call_id`'s envelopes.
    fn unsubscribe(&self, call_id: &str);

    /// Publishes `event` for the other nodes with rooms of `call_id`.
    async fn publish(&self, call_id: &str, event: &BusEvent) -> Result<(), BusError>;

    /// Records (or updates) `peer` in `call_id`'s presence table. The table expires `ttl_ms`
    /// after the last write (a call nobody writes to leaves nothing behind).
    async fn presence_put(
        &self,
        call_id: &str,
        peer: &PeerInfo,
        ttl_ms: u64,
    ) -> Result<(), BusError>;

    /// Removes `peer_id` from `call_id`'s presence if its entry is `node`'s (the peer has not
    /// moved to another node meanwhile). [`Removal::Removed`] only for the caller that actually
    /// removed it (of concurrent removers exactly one), so exactly one node reports the leave.
    async fn presence_remove(
        &self,
        call_id: &str,
        peer_id: &str,
        node: &str,
    ) -> Result<Removal, BusError>;

    /// Every peer in `call_id`'s presence table, on every node.
    async fn presence(&self, call_id: &str) -> Result<Vec<PeerInfo>, BusError>;

    /// For each of `nodes`, whether its heartbeat is current (the bus keeps this node's own
    /// heartbeat fresh by itself).
    async fn alive(&self, nodes: &[String]) -> Result<Vec<bool>, BusError>;

    /// Tells every other node's relay to revoke a credential group (see `relay_proto`'s
    /// revocation) until `until_unix`: allocations of an ended call or a kicked peer may live on
    /// any node's relay.
    async fn publish_revocation(&self, group: &str, until_unix: u64) -> Result<(), BusError>;

    /// Hands every revocation published by other nodes to `tx` (at most one receiver; a later
    /// call replaces it).
    fn on_revocation(&self, tx: mpsc::Sender<Revocation>);
}

/// What [`Bus::presence_remove`] did.
#[derive(Debug, Clone, PartialEq)]
pub enum Removal {
    /// The entry was the given node's, and this call removed it.
    Removed,
    /// There was no entry (removed by someone else, never written, or expired).
    Absent,
    /// The entry is another node's: the peer is there now. Left in place.
    Elsewhere(PeerInfo),
}

/// A revocation from another node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Revocation {
    /// The node that published it.
    pub node: String,
    /// The credential group (`CALL` or `CALL.PEER`).
    pub group: String,
    /// Until when (Unix seconds).
    pub until_unix: u64,
}

/// One node alone: nothing to publish to, no presence beyond the room's own peers.
#[derive(Debug, Clone)]
pub struct LocalBus {
    node: String,
}

impl LocalBus {
    /// A bus for a single node named `node`.
    pub fn new(node: impl Into<String>) -> Self {
        Self { node: node.into() }
    }
}

#[async_trait]
impl Bus for LocalBus {
    fn node_id(&self) -> &str {
        &self.node
    }

    fn subscribe(&self, _call_id: &str, _tx: mpsc::Sender<Envelope>) {}

    fn unsubscribe(&self, _call_id: &str) {}

    async fn publish(&self, _call_id: &str, _event: &BusEvent) -> Result<(), BusError> {
        Ok(())
    }

    async fn presence_put(&self, _: &str, _: &PeerInfo, _: u64) -> Result<(), BusError> {
        Ok(())
    }

    async fn presence_remove(&self, _: &str, _: &str, _: &str) -> Result<Removal, BusError> {
        // The room's own bookkeeping decides; alone, this node is always the one that removes.
        Ok(Removal::Removed)
    }

    async fn presence(&self, _: &str) -> Result<Vec<PeerInfo>, BusError> {
        Ok(Vec::new())
    }

    async fn alive(&self, nodes: &[String]) -> Result<Vec<bool>, BusError> {
        Ok(vec![true; nodes.len()])
    }

    async fn publish_revocation(&self, _: &str, _: u64) -> Result<(), BusError> {
        Ok(())
    }

    fn on_revocation(&self, _tx: mpsc::Sender<Revocation>) {}
}
