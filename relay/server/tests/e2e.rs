//! End to end on real sockets: a relay bound to port 0, the webrtc-rs `turn` crate's client, UDP
//! peers, and hostile datagrams.
#![allow(clippy::unwrap_used, clippy::print_stdout)]

mod common;

use std::time::Duration;

use common::*;
use relay_proto::stun::{self, attr, method, Message};
use tokio::net::UdpSocket;
use webrtc_util::Conn as _;

#[tokio::test]
async fn turn_client_allocates_binds_a_channel_and_exchanges_data_with_a_peer() {
    let relay = Running::start("").await;
    let peer = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let peer_addr = peer.local_addr().unwrap();
    let (user, pass) = relay_proto::rest_credentials(SECRET.as_bytes(), "alice", unix_now() + 600);
    let client = turn_client(relay.addr, user, pass).await;
    let conn = client.allocate().await.unwrap();
    let relayed = conn.local_addr().unwrap();
    assert_eq!(relayed.ip().to_string(), "127.0.0.1");
    assert!((20000..=29999).contains(&relayed.port()), "{relayed}");

    // The first sends go as Send indications while the client binds a channel in the
    // background; keep sending until the relay has seen ChannelData from the client.
    let channel = r#"turnpike_relay_packets_total{direction="client_to_peer",framing="channel_data",transport="udp"}"#;
    let mut i = 0u32;
    while relay.metric(channel) < 1.0 {
        assert!(i < 200, "the client never switched to ChannelData");
        let msg = format!("ping {i}");
        conn.send_to(msg.as_bytes(), peer_addr).await.unwrap();
        let (got, from) = recv(&peer).await;
        assert_eq!(got, msg.as_bytes());
        assert_eq!(from, relayed, "the peer sees the relayed address");
        i += 1;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // Peer → client now arrives as ChannelData (the channel exists for this peer).
    peer.send_to(b"pong", relayed).await.unwrap();
    let mut buf = [0u8; 64];
    let (n, from) = tokio::time::timeout(WAIT, conn.recv_from(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&buf[..n], b"pong");
    assert_eq!(from, peer_addr);
    relay
        .wait_metric(
            r#"turnpike_relay_packets_total{direction="peer_to_client",framing="channel_data",transport="udp"}"#,
            1.0,
        )
        .await;
    relay
        .wait_metric(
            r#"turnpike_relay_allocation_requests_total{result="ok",transport="udp"}"#,
            1.0,
        )
        .await;
    assert_eq!(
        relay
            .wait_metric(r#"turnpike_relay_allocations_active{transport="udp"}"#, 1.0)
            .await,
        1.0
    );
    client.close().await.unwrap();
    relay.shutdown().await;
}

#[tokio::test]
async fn wrong_secret_and_expired_username_are_refused_with_401() {
    let relay = Running::start("").await;
    let (user, pass) =
        relay_proto::rest_credentials(b"not-the-secret-000000", "mallory", unix_now() + 600);
    let client = turn_client(relay.addr, user, pass).await;
    let err = client.allocate().await.err().expect("wrong secret refused");
    assert!(err.to_string().contains("401"), "{err}");
    client.close().await.unwrap();

    let (user, pass) = relay_proto::rest_credentials(SECRET.as_bytes(), "late", unix_now() - 1);
    let client = turn_client(relay.addr, user, pass).await;
    let err = client
        .allocate()
        .await
        .err()
        .expect("expired username refused");
    assert!(err.to_string().contains("401"), "{err}");
    client.close().await.unwrap();

    relay
        .wait_metric(
            r#"turnpike_relay_auth_failures_total{reason="bad_integrity"}"#,
            1.0,
        )
        .await;
    relay
        .wait_metric(
            r#"turnpike_relay_auth_failures_total{reason="expired"}"#,
            1.0,
        )
        .await;
    assert_eq!(
        relay.metric(r#"turnpike_relay_allocation_requests_total{result="ok",transport="udp"}"#),
        0.0
    );
    relay.shutdown().await;
}

#[tokio::test]
async fn hostile_datagrams_are_dropped_and_counted_and_the_relay_keeps_serving() {
    let relay = Running::start("").await;
    let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    expect_binding_answer(&sock, relay.addr, [1; 12]).await;

    let valid = binding_request([2; 12]);
    let mut hostile: Vec<Vec<u8>> = (0..valid.len()).map(|n| valid[..n].to_vec()).collect();
    let mut bad_cookie = valid.clone();
    bad_cookie[4] ^= 0xFF;
    hostile.push(bad_cookie);
    let mut bad_len = valid.clone();
    bad_len[3] = 0xFC;
    bad_len[2] = 0xFF;
    hostile.push(bad_len);
    hostile.push(vec![0x80; 9000]);
    hostile.push(vec![0x16; 300]); // DTLS-looking
    hostile.push(vec![0x40, 0x00, 0xFF, 0xFF, 1, 2, 3]); // ChannelData longer than the datagram
    for h in &hostile {
        sock.send_to(h, relay.addr).await.unwrap();
    }
    // Nothing above gets an answer; the next Binding does, on the same socket.
    expect_binding_answer(&sock, relay.addr, [3; 12]).await;
    // Empty datagrams are not counted as malformed (there is nothing to count), so expect the
    // rest: prefixes 1..len, cookie, length, 9000 bytes, DTLS, ChannelData.
    let expected = (hostile.len() - 1) as f64;
    let got = relay
        .wait_metric(
            r#"turnpike_relay_dropped_packets_total{reason="malformed"}"#,
            expected - 1.0,
        )
        .await;
    assert!(got >= expected - 1.0, "malformed drops {got}");
    relay
        .wait_metric(
            r#"turnpike_relay_binding_requests_total{transport="udp"}"#,
            2.0,
        )
        .await;
    relay.shutdown().await;
}

#[tokio::test]
async fn denied_peers_are_refused_with_403_and_counted() {
    // No allow-peers override here: loopback is denied like in production.
    let relay = Running::start_without_allow().await;
    let (user, pass) = relay_proto::rest_credentials(SECRET.as_bytes(), "bob", unix_now() + 600);
    let client = turn_client(relay.addr, user, pass).await;
    let conn = client.allocate().await.unwrap();
    // 127.0.0.1 itself is the relay IP (other allocations live there), so probe 127.0.0.2.
    for peer in ["127.0.0.2:9", "10.0.0.1:9", "169.254.169.254:80"] {
        let err = conn
            .send_to(b"x", peer.parse().unwrap())
            .await
            .err()
            .unwrap_or_else(|| panic!("{peer} must be refused"));
        assert!(err.to_string().contains("403"), "{peer}: {err}");
    }
    relay
        .wait_metric(
            r#"turnpike_relay_peers_denied_total{reason="loopback"}"#,
            1.0,
        )
        .await;
    relay
        .wait_metric(
            r#"turnpike_relay_peers_denied_total{reason="private"}"#,
            1.0,
        )
        .await;
    relay
        .wait_metric(
            r#"turnpike_relay_peers_denied_total{reason="link_local"}"#,
            1.0,
        )
        .await;
    client.close().await.unwrap();
    relay.shutdown().await;
}

/// Waits until a newcomer's Allocate gets 508: the drain is on.
async fn until_newcomers_get_508(relay: std::net::SocketAddr) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let (user, pass) =
            relay_proto::rest_credentials(SECRET.as_bytes(), "late", unix_now() + 600);
        let late = turn_client(relay, user, pass).await;
        let result = late.allocate().await;
        late.close().await.unwrap();
        match result {
            Err(e) if e.to_string().contains("508") => return,
            other => assert!(
                tokio::time::Instant::now() < deadline,
                "expected 508 while draining, got {:?}",
                other.map(|c| c.local_addr())
            ),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shards_left_empty_by_a_drain_keep_their_listeners_so_the_others_clients_still_reach_them()
{
    // Eight shards, three clients: at least five shards hold no allocation when the drain
    // starts. If those stopped (and closed their SO_REUSEPORT sockets), the kernel would hash
    // the clients of the busy shards to other sockets, where their allocations are not.
    let text = format!(
        r#"
[relay]
realm = "{REALM}"
listen = ["udp://127.0.0.1:0"]
relay-ip = "127.0.0.1"
relay-ports = "44000-44999"
secrets = ["{SECRET}"]
allow-peers = ["127.0.0.0/8"]
threads = 8
grace-period = "1h"
"#
    );
    let mut relay = Running::start_with(&text).await;
    let peer = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let peer_addr = peer.local_addr().unwrap();
    let mut clients = Vec::new();
    for i in 0..3 {
        let (user, pass) =
            relay_proto::rest_credentials(SECRET.as_bytes(), &format!("c{i}"), unix_now() + 600);
        let client = turn_client(relay.addr, user, pass).await;
        let conn = client.allocate().await.unwrap();
        clients.push((client, conn));
    }
    let _ = relay.stop.take().unwrap().send(());
    until_newcomers_get_508(relay.addr).await;
    // Empty shards would have stopped at their next tick (one second) after the drain began:
    // let two pass, then every client must still reach its allocation.
    tokio::time::sleep(2 * relay_server::TICK).await;
    for (i, (_, conn)) in clients.iter().enumerate() {
        let msg = format!("during drain {i}");
        conn.send_to(msg.as_bytes(), peer_addr).await.unwrap();
        assert_eq!(recv(&peer).await.0, msg.as_bytes(), "client {i}");
    }
    assert!(
        relay.task.as_ref().is_some_and(|t| !t.is_finished()),
        "still draining"
    );
    // Once the last allocation is released, the drain ends: not after the hour of grace.
    for (client, conn) in clients {
        conn.close().await.unwrap();
        client.close().await.unwrap();
    }
    tokio::time::timeout(WAIT, relay.task.take().unwrap())
        .await
        .expect("stops once every shard is empty")
        .unwrap();
}

#[tokio::test]
async fn shutdown_refuses_new_allocations_with_508_but_keeps_relaying_until_the_grace_period() {
    // Long enough that a loaded machine sees the 508 and relays once more well inside it.
    let mut relay = Running::start_with_grace("5s", "").await;
    let peer = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let peer_addr = peer.local_addr().unwrap();
    let (user, pass) = relay_proto::rest_credentials(SECRET.as_bytes(), "early", unix_now() + 600);
    let early = turn_client(relay.addr, user, pass).await;
    let conn = early.allocate().await.unwrap();
    conn.send_to(b"before", peer_addr).await.unwrap();
    assert_eq!(recv(&peer).await.0, b"before");

    let _ = relay.stop.take().unwrap().send(());
    until_newcomers_get_508(relay.addr).await;
    // The existing allocation still relays during the grace period.
    conn.send_to(b"during", peer_addr).await.unwrap();
    assert_eq!(recv(&peer).await.0, b"during");
    // After the grace period the relay closes it and stops.
    tokio::time::timeout(WAIT, relay.task.take().unwrap())
        .await
        .expect("stops after the grace period")
        .unwrap();
    assert_eq!(
        relay.metric(r#"turnpike_relay_allocations_ended_total{reason="shutdown"}"#),
        1.0
    );
    early.close().await.unwrap();
}

#[tokio::test]
async fn relay_ports_run_out_with_508_and_come_back_after_many_cycles() {
    let relay = Running::start_with(
        r#"
[relay]
realm = "example.org"
listen = ["udp://127.0.0.1:0"]
relay-ip = "127.0.0.1"
relay-ports = "40000-40003"
secrets = ["e2e-secret-0123456789abcdef"]
allow-peers = ["127.0.0.0/8"]
user-quota = 100
threads = 1
grace-period = "1s"
"#,
    )
    .await;
    // 1000 allocate/free cycles on a pool of four ports.
    let mut c = RawClient::new(relay.addr, "cycler").await;
    for i in 0..1000 {
        assert_eq!(c.allocate().await, None, "allocate #{i}");
        assert_eq!(c.free().await, None, "free #{i}");
    }
    // The pool is whole again: four concurrent allocations fit, the fifth gets 508.
    let mut held = Vec::new();
    for i in 0..4 {
        let mut c = RawClient::new(relay.addr, &format!("user{i}")).await;
        assert_eq!(c.allocate().await, None, "allocation {i}");
        held.push(c);
    }
    let mut extra = RawClient::new(relay.addr, "extra").await;
    assert_eq!(extra.allocate().await, Some(508));
    // Freeing one makes a port available again.
    assert_eq!(held[0].free().await, None);
    let mut again = RawClient::new(relay.addr, "again").await;
    assert_eq!(again.allocate().await, None);
    relay
        .wait_metric(
            r#"turnpike_relay_allocation_requests_total{result="ok",transport="udp"}"#,
            1005.0,
        )
        .await;
    relay
        .wait_metric(
            r#"turnpike_relay_allocation_requests_total{result="capacity",transport="udp"}"#,
            1.0,
        )
        .await;
    relay.shutdown().await;
}

#[tokio::test]
async fn allocations_on_this_server_reach_each_other_without_the_kernel_on_any_shard() {
    // Two shards: the kernel spreads clients over both, so pairs meet on the same shard or
    // across shards. Either way the datagram must be handed over inside the process.
    let relay = Running::start_with(&format!(
        r#"
[relay]
realm = "{REALM}"
listen = ["udp://127.0.0.1:0"]
relay-ip = "127.0.0.1"
relay-ports = "45000-45999"
secrets = ["{SECRET}"]
threads = 2
grace-period = "1s"
"#
    ))
    .await;
    let mut clients = Vec::new();
    let mut relayed = Vec::new();
    for i in 0..8 {
        let mut c = RawClient::new(relay.addr, &format!("pair{i}")).await;
        let r = c
            .request(
                method::ALLOCATE,
                &[(attr::REQUESTED_TRANSPORT, UDP.to_vec())],
            )
            .await;
        assert_eq!(r.code, None);
        relayed.push(r.addresses(attr::XOR_RELAYED_ADDRESS)[0]);
        clients.push(c);
    }
    // Pairs (0,1), (2,3), …: each permits the other (no allow-peers: relayed addresses of this
    // server are always allowed, even on loopback).
    for i in 0..8 {
        let other = relayed[i ^ 1];
        clients[i].permit(other).await;
    }
    for i in 0..8 {
        let other = relayed[i ^ 1];
        clients[i]
            .send(other, format!("to {}", i ^ 1).as_bytes())
            .await;
    }
    for i in 0..8 {
        let (raw, _) = recv(&clients[i].sock).await;
        let msg = Message::parse(&raw).unwrap();
        assert_eq!(msg.method(), method::DATA);
        let tid = msg.transaction_id();
        let from = msg
            .attributes()
            .find(|(t, _, _)| *t == attr::XOR_PEER_ADDRESS)
            .and_then(|(_, v, _)| stun::decode_xor_address(v, &tid));
        assert_eq!(
            from,
            Some(relayed[i ^ 1]),
            "the peer is the other relayed address"
        );
        let data = msg
            .attributes()
            .find(|(t, _, _)| *t == attr::DATA)
            .map(|(_, v, _)| v.to_vec());
        assert_eq!(data, Some(format!("to {i}").into_bytes()));
    }
    let same = r#"turnpike_relay_short_circuit_packets_total{path="same_shard"}"#;
    let cross = r#"turnpike_relay_short_circuit_packets_total{path="cross_shard"}"#;
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let total = relay.metric(same) + relay.metric(cross);
        if total >= 8.0 {
            assert_eq!(total, 8.0, "every datagram was handed over exactly once");
            eprintln!(
                "same shard {}, cross shard {}",
                relay.metric(same),
                relay.metric(cross)
            );
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "short-circuits: {total}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    relay.shutdown().await;
}

#[tokio::test]
async fn a_peer_inside_the_relay_port_range_that_is_no_relay_socket_still_gets_its_data() {
    // A local program listening on the relay IP, on a port inside `relay-ports`: datagrams to it
    // must go through the kernel from every shard, not be handed to a relay socket that does
    // not exist. (The default range overlaps Linux's ephemeral ports.)
    let peer = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let peer_addr = peer.local_addr().unwrap();
    let (lo, hi) = (
        peer_addr.port().saturating_sub(300).max(1024),
        peer_addr.port().saturating_add(300),
    );
    let relay = Running::start_with(&format!(
        r#"
[relay]
realm = "{REALM}"
listen = ["udp://127.0.0.1:0"]
relay-ip = "127.0.0.1"
relay-ports = "{lo}-{hi}"
secrets = ["{SECRET}"]
allow-peers = ["127.0.0.0/8"]
threads = 2
grace-period = "1s"
"#
    ))
    .await;
    // Ten clients: the kernel spreads them over both shards.
    for i in 0..10 {
        let mut c = RawClient::new(relay.addr, &format!("near{i}")).await;
        assert_eq!(c.allocate().await, None);
        c.permit(peer_addr).await;
        let msg = format!("from {i}");
        c.send(peer_addr, msg.as_bytes()).await;
        assert_eq!(recv(&peer).await.0, msg.as_bytes(), "client {i}");
    }
    relay.shutdown().await;
}

/// The DATA of a Data indication.
fn data_of(raw: &[u8]) -> Vec<u8> {
    let msg = Message::parse(raw).unwrap();
    msg.attributes()
        .find(|(t, _, _)| *t == attr::DATA)
        .map(|(_, v, _)| v.to_vec())
        .expect("a Data indication")
}

/// A relay, a peer socket, and a client of user `user` with an allocation that permits the
/// peer; returns them with the relayed address.
async fn allocated_with_peer(user: &str) -> (Running, UdpSocket, RawClient, std::net::SocketAddr) {
    let relay = Running::start("").await;
    let peer = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let mut c = RawClient::new(relay.addr, user).await;
    let r = c
        .request(
            method::ALLOCATE,
            &[(attr::REQUESTED_TRANSPORT, UDP.to_vec())],
        )
        .await;
    assert_eq!(r.code, None);
    let relayed = r.addresses(attr::XOR_RELAYED_ADDRESS)[0];
    c.permit(peer.local_addr().unwrap()).await;
    (relay, peer, c, relayed)
}

#[tokio::test]
async fn bursts_both_ways_arrive_complete_and_in_order() {
    // Back-to-back datagrams are read in batches and their answers leave in batched sends
    // (runs of up to SEND_BATCH per socket): every datagram must still arrive, once, in order,
    // at its own destination.
    const BURST: usize = 100;
    let (relay, peer, mut c, relayed) = allocated_with_peer("burst").await;
    let peer_addr = peer.local_addr().unwrap();

    for i in 0..BURST {
        c.send(peer_addr, format!("up {i}").as_bytes()).await;
    }
    for i in 0..BURST {
        let (got, from) = recv(&peer).await;
        assert_eq!(from, relayed);
        assert_eq!(String::from_utf8_lossy(&got), format!("up {i}"));
    }

    for i in 0..BURST {
        peer.send_to(format!("down {i}").as_bytes(), relayed)
            .await
            .unwrap();
    }
    for i in 0..BURST {
        let (raw, from) = recv(&c.sock).await;
        assert_eq!(from, relay.addr);
        assert_eq!(String::from_utf8_lossy(&data_of(&raw)), format!("down {i}"));
    }
    let sent = r#"turnpike_relay_packets_total{direction="peer_to_client",framing="indication",transport="udp"}"#;
    assert_eq!(relay.wait_metric(sent, BURST as f64).await, BURST as f64);
    relay.shutdown().await;
}

#[tokio::test]
async fn bursts_of_equal_datagrams_with_a_shorter_tail_keep_their_boundaries() {
    // Runs of four or more equal datagrams to one destination leave in one GSO send that the
    // kernel cuts back into datagrams (a video frame's packets): each must arrive on its own,
    // whole, in order — the full-size ones and the shorter last one of every frame.
    const FRAMES: usize = 4;
    const PACKETS: usize = 12;
    let payload = |f: usize, p: usize| {
        let len = if p == PACKETS - 1 { 311 } else { 1_100 };
        let mut v = vec![u8::try_from(f * PACKETS + p).unwrap(); len];
        v[0] = 0xee;
        v
    };
    let (relay, peer, mut c, relayed) = allocated_with_peer("frames").await;
    let peer_addr = peer.local_addr().unwrap();

    for f in 0..FRAMES {
        for p in 0..PACKETS {
            c.send(peer_addr, &payload(f, p)).await;
        }
    }
    for f in 0..FRAMES {
        for p in 0..PACKETS {
            let (got, from) = recv(&peer).await;
            assert_eq!(from, relayed);
            assert_eq!(got, payload(f, p), "frame {f} packet {p} to the peer");
        }
    }

    for f in 0..FRAMES {
        for p in 0..PACKETS {
            peer.send_to(&payload(f, p), relayed).await.unwrap();
        }
    }
    for f in 0..FRAMES {
        for p in 0..PACKETS {
            let (raw, from) = recv(&c.sock).await;
            assert_eq!(from, relay.addr);
            assert_eq!(
                data_of(&raw),
                payload(f, p),
                "frame {f} packet {p} to the client"
            );
        }
    }
    relay.shutdown().await;
}

/// `relay.challenge-rate` reaches every shard's core: with 10 answers a second (burst 20) per
/// source IP, a burst of 200 unauthenticated Allocates from one socket gets at most a few dozen
/// 401s and the rest are dropped and counted, while the default (500) would answer them all.
#[tokio::test]
async fn the_configured_challenge_rate_caps_answers_to_unauthenticated_requests() {
    let relay = Running::start("challenge-rate = 10").await;
    let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    for i in 0..200u32 {
        let mut tid = [0u8; 12];
        tid[..4].copy_from_slice(&i.to_be_bytes());
        let mut buf = Vec::new();
        let mut e = stun::Encoder::new(&mut buf, method::ALLOCATE, stun::Class::Request, tid);
        e.attr(attr::REQUESTED_TRANSPORT, &[17, 0, 0, 0]);
        e.finish();
        sock.send_to(&buf, relay.addr).await.unwrap();
    }
    let limited = relay
        .wait_metric(
            r#"turnpike_relay_dropped_packets_total{reason="challenge_limited"}"#,
            150.0,
        )
        .await;
    assert!(limited >= 150.0, "{limited}");
    relay.shutdown().await;
}
