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
use signal::bus::{Bus, BusError, BusEvent, Envelope, PeerInfo, Removal, Revocation};
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

    async fn presence_remove(
        &self,
        _call_id: &str,
        peer_id: &str,
        node: &str,
    ) -> Result<Removal, BusError> {
        let mut presence = self.presence.lock().unwrap();
        Ok(match presence.get(peer_id) {
            None => Removal::Absent,
            Some(p) if p.node != node => Removal::Elsewhere(p.clone()),
            Some(_) => {
                presence.remove(peer_id);
                Removal::Removed
            }
        })
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_whose_resume_window_ends_after_it_moved_to_another_node_is_not_reported_left() {
    let bus = Arc::new(ScriptedBus::default());
    let node = Node::start(Options {
        bus: Some(bus.clone()),
        signal: signal::Settings {
            resume_window: std::time::Duration::from_millis(300),
            ..signal::Settings::default()
        },
        ..Options::default()
    })
    .await;
    let (_, call, code) = node.call(8).await;
    let (mut a, _, _) = enter(&node, &code, "A").await;
    let (b, wb, jb) = enter(&node, &code, "B").await;
    let idb = wb["peer_id"].as_str().unwrap().to_owned();
    a.recv_type("peer_joined").await;
    drop(b);
    // B comes back on another node, which writes B's presence entry; its `peer_joined` never
    // reaches this room (a bus hiccup).
    let mut moved = bus.presence.lock().unwrap()[&idb].clone();
    moved.node = "other-node".into();
    bus.presence.lock().unwrap().insert(idb.clone(), moved);
    // B's window here runs out: the others here see B go, then learn it is on the other node.
    let left = a.recv_type("peer_left").await;
    assert_eq!(left["peer_id"], idb.as_str());
    let back = a.recv_type("peer_joined").await;
    assert_eq!(back["peer"]["peer_id"], idb.as_str());
    // The other nodes were not told B left, its entry is the other node's still, and the store
    // still holds B's seat.
    assert!(
        !bus.ops().iter().any(|op| matches!(
            op,
            Op::Publish(BusEvent::PeerLeft { peer_id, .. }) if *peer_id == idb
        )),
        "{:?}",
        bus.ops()
    );
    assert_eq!(bus.presence.lock().unwrap()[&idb].node, "other-node");
    let c = node.state.store.get_call(&call).await.unwrap().unwrap();
    assert_eq!(c.participant(&idb).unwrap().left_at, None);
    // Not gone, so B may come back here with its token.
    let token = jb["signal_token"].as_str().unwrap();
    let (_b, welcome) = harness::Client::joined(&node.ws_url(), token).await;
    assert_eq!(welcome["peer_id"], idb.as_str());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_remote_peer_gone_from_presence_whose_leave_was_lost_is_reported_left_after_two_checks() {
    // A node timeout of 300 ms: the room checks presence at every tick (1 s).
    let bus = Arc::new(ScriptedBus::default());
    let node = Node::start(Options {
        bus: Some(bus.clone()),
        signal: signal::Settings {
            node_timeout: std::time::Duration::from_millis(300),
            ..signal::Settings::default()
        },
        ..Options::default()
    })
    .await;
    let (_, call, code) = node.call(8).await;
    let (mut a, _, _) = enter(&node, &code, "A").await;
    // R joins on another node: its entry, then its announcement.
    let r = PeerInfo {
        peer_id: "p_remote".into(),
        name: "R".into(),
        role: control::store::Role::Guest,
        node: "other-node".into(),
        media: control::store::Media::default(),
    };
    bus.presence
        .lock()
        .unwrap()
        .insert(r.peer_id.clone(), r.clone());
    bus.deliver(&call, BusEvent::PeerJoined { peer: r.clone() })
        .await;
    let joined = a.recv_type("peer_joined").await;
    assert_eq!(joined["peer"]["peer_id"], "p_remote");
    // Two checks with R listed: nothing happens.
    let checks = |bus: &ScriptedBus| {
        bus.ops()
            .iter()
            .filter(|op| **op == Op::PresenceRead)
            .count()
    };
    let seen = checks(&bus);
    eventually("two presence checks", || checks(&bus) >= seen + 2).await;
    // R leaves over there; its `peer_left` never arrives, but its entry is gone.
    bus.presence.lock().unwrap().remove("p_remote");
    let left = a.recv_type("peer_left").await;
    assert_eq!(left["peer_id"], "p_remote");
    assert_eq!(left["reason"], "left");
    // It took two checks without R, not one.
    assert!(checks(&bus) >= seen + 4, "{} checks", checks(&bus) - seen);
}
