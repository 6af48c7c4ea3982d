//! Credential-group revocation end to end: `RelayServer::revoker` reaches every shard, which
//! tears down the group's allocations and refuses its new ones, on real sockets.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::*;
use relay_proto::stun::{attr, method};
use tokio::net::UdpSocket;

const APPLIED: &str = "turnpike_relay_revocations_applied_total";
const ENDED_REVOKED: &str = r#"turnpike_relay_allocations_ended_total{reason="revoked"}"#;
const REFUSED_REVOKED: &str = r#"turnpike_relay_auth_failures_total{reason="revoked"}"#;
const ACTIVE_UDP: &str = r#"turnpike_relay_allocations_active{transport="udp"}"#;

fn revocations(result: &str) -> String {
    format!(r#"turnpike_relay_revocations_total{{result="{result}"}}"#)
}

/// The shard owning a relayed port: ports are dealt to the shards in (even, odd) pairs.
fn shard_of(port: u16, shards: u16) -> usize {
    usize::from(port / 2 % shards)
}

/// Polls a metric (published once per shard tick) until it equals `value`.
async fn wait_metric_eq(relay: &Running, series: &str, value: f64) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let v = relay.metric(series);
        if v == value {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{series} stayed at {v}, expected {value}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn revoking_a_group_tears_down_its_allocations_on_every_shard_and_refuses_new_ones() {
    let relay = Running::start("").await; // threads = 2
    let peer = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let peer_addr = peer.local_addr().unwrap();

    // Group A: allocate until both shards hold some (the kernel hashes each client's 4-tuple to
    // a shard; 64 clients all on one shard would take odds of 2^-63).
    let mut group_a = Vec::new();
    let mut per_shard = [0usize; 2];
    for i in 0..64 {
        if group_a.len() >= 4 && per_shard.iter().all(|&n| n > 0) {
            break;
        }
        let mut c = RawClient::new(relay.addr, &format!("gA.{i}")).await;
        let r = c
            .request(
                method::ALLOCATE,
                &[(attr::REQUESTED_TRANSPORT, UDP.to_vec())],
            )
            .await;
        assert_eq!(r.code, None, "client {i}");
        let relayed = r.addresses(attr::XOR_RELAYED_ADDRESS)[0];
        per_shard[shard_of(relayed.port(), 2)] += 1;
        group_a.push(c);
    }
    assert!(
        per_shard.iter().all(|&n| n > 0),
        "every allocation landed on one shard: {per_shard:?}"
    );
    let torn_down = group_a.len() as f64;
    let mut b = RawClient::new(relay.addr, "gB.0").await;
    assert_eq!(b.allocate().await, None);
    b.permit(peer_addr).await;
    wait_metric_eq(&relay, ACTIVE_UDP, torn_down + 1.0).await;

    // From another thread, as the control plane would: the handle is Send + Sync.
    let revoker = relay.revoker.clone();
    std::thread::spawn(move || revoker.revoke("gA", unix_now() + 600))
        .join()
        .unwrap();

    // Both shards applied it before anything below is asked.
    relay.wait_metric(APPLIED, 2.0).await;
    wait_metric_eq(&relay, ENDED_REVOKED, torn_down).await;
    assert_eq!(relay.metric(&revocations("delivered")), 1.0);
    assert_eq!(relay.metric(&revocations("dropped")), 0.0);
    for (i, c) in group_a.iter_mut().enumerate() {
        let r = c.request(method::REFRESH, &[]).await;
        assert_eq!(
            r.code,
            Some(437),
            "group A client {i} still has an allocation"
        );
    }

    // Group B still relays and refreshes.
    b.send(peer_addr, b"still here").await;
    assert_eq!(recv(&peer).await.0, b"still here");
    assert_eq!(b.request(method::REFRESH, &[]).await.code, None);

    // Fresh group-A credentials are refused on whichever shard they land.
    for i in 0..4 {
        let mut c = RawClient::new(relay.addr, &format!("gA.fresh{i}")).await;
        assert_eq!(c.allocate().await, Some(401), "fresh client {i}");
    }
    relay.wait_metric(REFUSED_REVOKED, 4.0).await;
    wait_metric_eq(&relay, ACTIVE_UDP, 1.0).await;
    assert_eq!(relay.metric(APPLIED), 2.0);
    relay.shutdown().await;
}

#[tokio::test]
async fn revocations_queue_before_run_and_a_full_queue_or_a_stopped_relay_drops_and_counts() {
    let cfg = conf::parse(
        &format!(
            r#"
[relay]
realm = "{REALM}"
listen = ["udp://127.0.0.1:0"]
relay-ip = "127.0.0.1"
relay-ports = "46000-46999"
secrets = ["{SECRET}"]
threads = 2
grace-period = "1s"
"#
        ),
        &[],
    )
    .unwrap();
    let registry = prometheus::Registry::new();
    let server = relay_server::RelayServer::bind(&cfg.relay, None, &registry).unwrap();
    let relay = Running {
        addr: server.local_addr(conf::Transport::Udp).unwrap(),
        server: server.local_addrs().to_vec(),
        registry,
        revoker: server.revoker(),
        stop: None,
        task: None,
    };
    // Nothing consumes the queues before `run`: fill them, one more is dropped on both shards.
    let mut queued = 0u32;
    while relay.metric(&revocations("dropped")) == 0.0 {
        assert!(queued <= 100_000, "the revocation queue never filled");
        relay
            .revoker
            .revoke(&format!("g{queued}"), unix_now() + 600);
        queued += 1;
    }
    let delivered = relay.metric(&revocations("delivered"));
    assert_eq!(delivered, f64::from(queued - 1));
    relay.revoker.revoke("not.a.group", unix_now() + 600);
    relay.revoker.revoke("", unix_now() + 600);
    assert_eq!(relay.metric(&revocations("invalid")), 2.0);

    // Once running, every shard applies what was queued for it.
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        server
            .run(async {
                let _ = stopped.await;
            })
            .await
            .unwrap();
    });
    let relay = Running {
        stop: Some(stop),
        task: Some(task),
        ..relay
    };
    wait_metric_eq(&relay, APPLIED, 2.0 * delivered).await;
    // A revoked group's credentials are refused right from the start.
    let mut c = RawClient::new(relay.addr, "g0.x").await;
    assert_eq!(c.allocate().await, Some(401));
    let mut other = RawClient::new(relay.addr, "gOther.x").await;
    assert_eq!(other.allocate().await, None);

    let revoker = relay.revoker.clone();
    let registry = relay.registry.clone();
    relay.shutdown().await;
    // The shards are gone: nothing receives it any more.
    revoker.revoke("gLate", unix_now() + 600);
    assert_eq!(metric_in(&registry, &revocations("dropped")), 2.0);
}
