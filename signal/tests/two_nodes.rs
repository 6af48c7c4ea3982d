//! Two signaling nodes in one process, sharing one store and talking over the Redis bus (a real
//! `redis-server`): what only happens between nodes whose clocks disagree.

#![allow(clippy::unwrap_used)]

mod harness;
#[path = "../../control/tests/common/redis.rs"]
mod redis_server;

use std::sync::Arc;
use std::time::{Duration, Instant};

use control::api::ManualClock;
use control::store::{MemoryStore, Store};
use harness::{enter, Client, End, Node, Options};
use serde_json::json;
use signal::redis_bus::{RedisBus, RedisBusOptions};

/// How long a change made on one node may take to show on the other (a Redis round trip on a
/// loaded machine takes milliseconds; this only bounds a failing test).
const PATIENCE: Duration = Duration::from_secs(15);

async fn node(redis: &str, id: &str, store: &Arc<MemoryStore>, clock: &Arc<ManualClock>) -> Node {
    let bus = RedisBus::new(redis, id.into(), RedisBusOptions::default()).unwrap();
    let store: Arc<dyn Store> = store.clone();
    Node::start(Options {
        store,
        bus: Some(bus),
        clock: clock.clone(),
        ..Options::default()
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_the_room_refuses_as_full_gives_its_seat_back() {
    const T0_MS: u64 = 1_800_000_000_000;
    let redis = redis_server::RedisServer::start();
    let store = Arc::new(MemoryStore::new());
    let (clock1, clock2) = (
        Arc::new(ManualClock::new(T0_MS)),
        Arc::new(ManualClock::new(T0_MS)),
    );
    let n1 = node(&redis.url, "n1", &store, &clock1).await;
    let n2 = node(&redis.url, "n2", &store, &clock2).await;
    let (_, call, code) = n1.call(2).await;
    let (mut a, _, _) = enter(&n1, &code, "A").await;
    // B joins on node 1 but does not open its socket yet.
    let jb = n1.join(&code, "B").await;
    let idb = jb["peer_id"].as_str().unwrap().to_owned();
    // Node 2's clock runs ahead: there B's seat has lapsed (its join token can no longer
    // authenticate), so C gets it and connects.
    clock2.set(T0_MS + (600 + signal::LEEWAY_S + 1) * 1000);
    let (mut c, wc, _) = enter(&n2, &code, "C").await;
    let joined = a.recv_type("peer_joined").await;
    assert_eq!(joined["peer"]["peer_id"], wc["peer_id"]);

    // On node 1's clock B's token is still good, and the store marks B connected; the room,
    // with A here and C on node 2, has no seat left.
    let full = |n: &Node| n.metric("turnpike_signal_auth_failures_total", &[("reason", "full")]);
    let before = full(&n1);
    let mut b = Client::connect(&n1.ws_url()).await;
    b.send(json!({"v": 1, "type": "auth", "token": jb["signal_token"]}))
        .await;
    let (end, msgs) = b.until_end().await;
    assert_eq!(end, End::Closed(4009, "full".into()), "{msgs:?}");
    assert!(
        msgs.iter()
            .any(|m| m["type"] == "error" && m["code"] == "full"),
        "{msgs:?}"
    );
    // Counted as a refused authentication, as its disconnect (`auth_failed`) says.
    assert_eq!(full(&n1), before + 1.0);

    // The seat is given back: B is recorded as gone, so the store counts A and C only.
    let stored = store.get_call(&call).await.unwrap().unwrap();
    let pb = stored
        .participants
        .iter()
        .find(|p| p.peer_id == idb)
        .unwrap();
    assert!(pb.left_at.is_some(), "{pb:?}");
    // B's token is done with; a fresh join is the way in (and the call is full: 409).
    let mut again = Client::connect(&n1.ws_url()).await;
    again
        .send(json!({"v": 1, "type": "auth", "token": jb["signal_token"]}))
        .await;
    let (end, seen) = again.until_end().await;
    assert_eq!(end, End::Closed(4001, "unauthorized".into()), "{seen:?}");
    assert!(
        seen[0]["message"].as_str().unwrap().contains("left"),
        "{seen:?}"
    );
    let (status, v) = n1.try_join(&code, "D").await;
    assert_eq!(status.as_u16(), 409, "A and C hold both seats: {v}");

    // Once C leaves, its seat is free (and B holds none).
    c.send(json!({"v": 1, "type": "leave"})).await;
    let (end, _) = c.until_end().await;
    assert_eq!(end, End::Closed(1000, "leave".into()));
    let deadline = Instant::now() + PATIENCE;
    loop {
        let (status, v) = n1.try_join(&code, "D").await;
        if status.as_u16() == 200 {
            break;
        }
        assert_eq!(status.as_u16(), 409, "{v}");
        assert!(
            Instant::now() < deadline,
            "C's seat never came free: B still holds one ({v})"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
