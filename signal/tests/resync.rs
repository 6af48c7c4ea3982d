//! What a room does on `Resync` (the bus lost messages: a Redis restart, or a subscription that
//! took effect late), observed through a bus the test scripts: it records what the room writes
//! and lets the test hand the room envelopes as another node would.

#![allow(clippy::unwrap_used)]

mod harness;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use harness::{enter, eventually, Node, Options, PATIENCE};
use serde_json::json;
use signal::bus::{Bus, BusError, BusEvent, Envelope, PeerInfo, Revocation};
use tokio::sync::mpsc;

/// What the room did through the bus, in order.
#[derive(Debug, Clone, PartialEq)]
enum Op {
    Publish(BusEvent),
    Put(String),
    PresenceRead,
}

/// A bus with no other node: it keeps presence in memory, records every operation and keeps
/// the rooms' senders so the test can deliver envelopes.
#[derive(Debug, Default)]
struct ScriptedBus {
    ops: Mutex<Vec<Op>>,
    rooms: Mutex<HashMap<String, mpsc::Sender<Envelope>>>,
    presence: Mutex<HashMap<String, PeerInfo>>,
}

impl ScriptedBus {
    fn ops(&self) -> Vec<Op> {
        self.ops.lock().unwrap().clone()
    }

    fn record(&self, op: Op) {
        self.ops.lock().unwrap().push(op);
    }

    async fn deliver(&self, call: &str, event: BusEvent) {
        let tx = self.rooms.lock().unwrap().get(call).cloned().unwrap();
        let env = Envelope {
            node: "scripted".into(),
            event,
        };
        tx.send(env).await.unwrap();
    }

    /// Waits until an operation after the first `from` matches `want`; returns its index.
    async fn wait_op(&self, from: usize, want: impl Fn(&Op) -> bool) -> usize {
        let deadline = tokio::time::Instant::now() + PATIENCE;
        loop {
            if let Some(i) = self.ops().iter().skip(from).position(&want) {
                return from + i;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "not seen: {:?}",
                self.ops()
            );
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    }
}

#[async_trait]
impl Bus for ScriptedBus {
    fn node_id(&self) -> &str {
        "node-under-test"
    }

    fn subscribe(&self, call_id: &str, tx: mpsc::Sender<Envelope>) {
        self.rooms.lock().unwrap().insert(call_id.into(), tx);
    }

    fn unsubscribe(&self, call_id: &str) {
        self.rooms.lock().unwrap().remove(call_id);
    }

    async fn publish(&self, _call_id: &str, event: &BusEvent) -> Result<(), BusError> {
        self.record(Op::Publish(event.clone()));
        Ok(())
    }

    async fn presence_put(&self, _call: &str, peer: &PeerInfo, _ttl: u64) -> Result<(), BusError> {
        self.record(Op::Put(peer.peer_id.clone()));
        let mut presence = self.presence.lock().unwrap();
        presence.insert(peer.peer_id.clone(), peer.clone());
        Ok(())
    }

    async fn presence_remove(&self, _call_id: &str, peer_id: &str) -> Result<bool, BusError> {
        Ok(self.presence.lock().unwrap().remove(peer_id).is_some())
    }

    async fn presence(&self, _call_id: &str) -> Result<Vec<PeerInfo>, BusError> {
        self.record(Op::PresenceRead);
        Ok(self.presence.lock().unwrap().values().cloned().collect())
    }

    async fn alive(&self, nodes: &[String]) -> Result<Vec<bool>, BusError> {
        Ok(vec![true; nodes.len()])
    }

    async fn publish_revocation(&self, _group: &str, _until: u64) -> Result<(), BusError> {
        Ok(())
    }

    fn on_revocation(&self, _tx: mpsc::Sender<Revocation>) {}
}

fn joined(op: &Op, peer: &str) -> bool {
    matches!(op, Op::Publish(BusEvent::PeerJoined { peer: p }) if p.peer_id == peer)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resync_announces_connected_peers_and_puts_back_a_resuming_one_without_announcing_it() {
    let bus = Arc::new(ScriptedBus::default());
    let node = Node::start(Options {
        bus: Some(bus.clone()),
        ..Options::default()
    })
    .await;
    let (_, call, code) = node.call(8).await;
    let (mut a, wa, _) = enter(&node, &code, "A").await;
    let (b, wb, _) = enter(&node, &code, "B").await;
    let (ida, idb) = (
        wa["peer_id"].as_str().unwrap().to_owned(),
        wb["peer_id"].as_str().unwrap().to_owned(),
    );
    a.recv_type("peer_joined").await;
    // B's socket drops without `leave`: the room holds its seat for the resume window.
    drop(b);
    let closed = || node.metric("turnpike_signal_disconnects_total", &[("reason", "closed")]);
    eventually("B's drop seen", || closed() == 1.0).await;

    let from = bus.ops().len();
    bus.deliver(&call, BusEvent::Resync).await;
    // The room re-reads presence last, after queuing its writes; then A's next message is
    // published after all of them, so the writes of the resync are all recorded by then.
    bus.wait_op(from, |op| *op == Op::PresenceRead).await;
    a.send(json!({"v":1,"type":"media","audio":false,"video":true,"screen":false}))
        .await;
    let fence = bus
        .wait_op(from, |op| {
            matches!(op, Op::Publish(BusEvent::Broadcast { .. }))
        })
        .await;
    let resync = &bus.ops()[from..fence];
    assert!(resync.iter().any(|op| joined(op, &ida)), "{resync:?}");
    assert!(resync.contains(&Op::Put(idb.clone())), "{resync:?}");
    assert!(!resync.iter().any(|op| joined(op, &idb)), "{resync:?}");
}
