//! The Redis bus against a real `redis-server`: two buses with different node ids stand for two
//! nodes.

#![allow(clippy::unwrap_used)]

#[path = "../../control/tests/common/redis.rs"]
mod redis_server;

use std::sync::Arc;
use std::time::Duration;

use control::store::{Media, Role};
use signal::bus::{Bus, BusError, BusEvent, Envelope, PeerInfo, Removal};
use signal::redis_bus::{RedisBus, RedisBusOptions};
use tokio::sync::mpsc;

const PATIENCE: Duration = Duration::from_secs(15);

fn bus(url: &str, node: &str) -> Arc<RedisBus> {
    RedisBus::new(
        url,
        node.into(),
        RedisBusOptions {
            node_timeout: Duration::from_secs(1),
            command_timeout: Duration::from_millis(500),
        },
    )
    .unwrap()
}

fn peer(id: &str, node: &str) -> PeerInfo {
    PeerInfo {
        peer_id: id.into(),
        name: "n".into(),
        role: Role::Guest,
        node: node.into(),
        media: Media::default(),
    }
}

async fn next(rx: &mut mpsc::Receiver<Envelope>) -> Envelope {
    tokio::time::timeout(PATIENCE, rx.recv())
        .await
        .unwrap()
        .unwrap()
}

/// Subscribes `bus` to `call` and waits until the subscription is active, which the bus marks
/// with a `Resync` first: whatever was published before it took effect was missed.
async fn subscribed(bus: &RedisBus, call: &str) -> mpsc::Receiver<Envelope> {
    let (tx, mut rx) = mpsc::channel(16);
    bus.subscribe(call, tx);
    bus.wait_subscribed(call).await;
    let first = next(&mut rx).await;
    assert_eq!(first.event, BusEvent::Resync);
    assert_eq!(first.node, bus.node_id());
    rx
}

fn left(id: &str) -> BusEvent {
    BusEvent::PeerLeft {
        peer_id: id.into(),
        reason: "leave".into(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_reach_the_other_node_only_and_stop_after_unsubscribe() {
    let redis = redis_server::RedisServer::start();
    let (a, b) = (bus(&redis.url, "A"), bus(&redis.url, "B"));
    let mut arx = subscribed(&a, "c1").await;
    let mut brx = subscribed(&b, "c1").await;
    a.publish("c1", &left("p1")).await.unwrap();
    let got = next(&mut brx).await;
    assert_eq!(got.node, "A");
    assert_eq!(got.event, left("p1"));
    // A's own envelope is not handed back to A: the next thing A sees is B's.
    b.publish("c1", &left("p2")).await.unwrap();
    assert_eq!(next(&mut arx).await.event, left("p2"));
    b.unsubscribe("c1");
    b.publish("c1", &left("p3")).await.unwrap();
    a.publish("c1", &left("p4")).await.unwrap();
    assert_eq!(next(&mut arx).await.event, left("p3"));
    assert!(
        tokio::time::timeout(Duration::from_millis(300), brx.recv())
            .await
            .map_or(true, |m| m.is_none()),
        "B unsubscribed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_has_one_remover_and_a_ttl() {
    let redis = redis_server::RedisServer::start();
    let (a, b) = (bus(&redis.url, "A"), bus(&redis.url, "B"));
    a.presence_put("c1", &peer("p1", "A"), 60_000)
        .await
        .unwrap();
    b.presence_put("c1", &peer("p2", "B"), 60_000)
        .await
        .unwrap();
    let mut ids: Vec<String> = a
        .presence("c1")
        .await
        .unwrap()
        .into_iter()
        .map(|p| p.peer_id)
        .collect();
    ids.sort();
    assert_eq!(ids, ["p1", "p2"]);
    let ttl = std::process::Command::new("redis-cli")
        .args(["-p", &redis.port.to_string(), "PTTL", "tp:{c:c1}:peers"])
        .output();
    if let Ok(out) = ttl {
        let ms: i64 = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap();
        assert!(ms > 0, "{ms}");
    }
    // Only the entry's own node removes it: B's p2 stays when A tries, and A learns where.
    match a.presence_remove("c1", "p2", "A").await.unwrap() {
        Removal::Elsewhere(p) => assert_eq!((p.peer_id.as_str(), p.node.as_str()), ("p2", "B")),
        other => panic!("{other:?}"),
    }
    // Of two removers of A's p1 (A itself, and B for a lost node A), exactly one removes it.
    let (ra, rb) = tokio::join!(
        a.presence_remove("c1", "p1", "A"),
        b.presence_remove("c1", "p1", "A")
    );
    let (ra, rb) = (ra.unwrap(), rb.unwrap());
    assert!(
        matches!(
            (&ra, &rb),
            (Removal::Removed, Removal::Absent) | (Removal::Absent, Removal::Removed)
        ),
        "exactly one remover: {ra:?} {rb:?}"
    );
    assert_eq!(
        a.presence_remove("c1", "p2", "B").await.unwrap(),
        Removal::Removed
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_is_alive_while_it_beats_and_dead_after_shutdown_or_a_crash() {
    let redis = redis_server::RedisServer::start();
    let (a, b, c) = (
        bus(&redis.url, "A"),
        bus(&redis.url, "B"),
        bus(&redis.url, "C"),
    );
    let nodes = ["B".to_owned(), "C".to_owned()];
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while a.alive(&nodes).await.unwrap_or_default() != [true, true] {
        assert!(
            tokio::time::Instant::now() < deadline,
            "heartbeats never appeared"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    b.shutdown().await;
    assert_eq!(a.alive(&nodes).await.unwrap(), [false, true]);
    c.stop_heartbeat();
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while a.alive(&nodes).await.unwrap() != [false, false] {
        assert!(
            tokio::time::Instant::now() < deadline,
            "crashed node still alive"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_restart_resubscribes_and_resyncs() {
    let mut redis = redis_server::RedisServer::start();
    let (a, b) = (bus(&redis.url, "A"), bus(&redis.url, "B"));
    let mut brx = subscribed(&b, "c1").await;
    redis.kill();
    // Down: commands fail promptly, nothing panics.
    let started = tokio::time::Instant::now();
    assert!(matches!(
        a.publish("c1", &left("p0")).await,
        Err(BusError::Unavailable(_))
    ));
    assert!(started.elapsed() < Duration::from_secs(5));
    redis.restart();
    let env = next(&mut brx).await;
    assert_eq!(env.event, BusEvent::Resync);
    b.wait_subscribed("c1").await;
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while a.publish("c1", &left("p1")).await.is_err() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "A never reconnected"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(next(&mut brx).await.event, left("p1"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_pubsub_connection_is_noticed_and_resubscribed_while_commands_work() {
    let redis = redis_server::RedisServer::start();
    let (a, b) = (bus(&redis.url, "A"), bus(&redis.url, "B"));
    let mut brx = subscribed(&b, "c1").await;
    // Only the pub/sub connections are killed; command connections stay.
    let out = std::process::Command::new("redis-cli")
        .args([
            "-p",
            &redis.port.to_string(),
            "CLIENT",
            "KILL",
            "TYPE",
            "pubsub",
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert_eq!(next(&mut brx).await.event, BusEvent::Resync);
    b.wait_subscribed("c1").await;
    a.publish("c1", &left("p1")).await.unwrap();
    assert_eq!(next(&mut brx).await.event, left("p1"));
}
