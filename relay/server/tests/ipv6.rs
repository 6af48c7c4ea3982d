//! IPv6 relaying and RFC 8656 dual allocations on real sockets (`::1`, `127.0.0.1`).
#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use relay_proto::stun::{self, attr, method, Message};
use tokio::net::UdpSocket;

#[tokio::test]
async fn ipv6_relay_on_loopback_allocates_and_relays_to_an_ipv6_peer() {
    let relay = Running::start_with(&format!(
        r#"
[relay]
realm = "{REALM}"
listen = ["udp://[::1]:0"]
relay-ip = "::1"
relay-ports = "41000-41999"
secrets = ["{SECRET}"]
allow-peers = ["::1/128"]
threads = 1
grace-period = "1s"
"#
    ))
    .await;
    let peer = UdpSocket::bind("[::1]:0").await.unwrap();
    let peer_addr = peer.local_addr().unwrap();

    // RFC 8656 §7.2: without REQUESTED-ADDRESS-FAMILY the family is IPv4, which this server
    // does not have.
    let mut c = RawClient::new_at("[::1]:0", relay.addr, "v6only").await;
    let r = c
        .request(
            method::ALLOCATE,
            &[(attr::REQUESTED_TRANSPORT, UDP.to_vec())],
        )
        .await;
    assert_eq!(r.code, Some(440));

    let r = c
        .request(
            method::ALLOCATE,
            &[
                (attr::REQUESTED_TRANSPORT, UDP.to_vec()),
                (attr::REQUESTED_ADDRESS_FAMILY, vec![0x02, 0, 0, 0]),
            ],
        )
        .await;
    assert_eq!(r.code, None);
    let relayed = r.addresses(attr::XOR_RELAYED_ADDRESS);
    assert_eq!(relayed.len(), 1);
    assert_eq!(relayed[0].ip().to_string(), "::1");
    assert!((41000..=41999).contains(&relayed[0].port()));
    assert_eq!(
        r.addresses(attr::XOR_MAPPED_ADDRESS),
        vec![c.sock.local_addr().unwrap()]
    );

    c.permit(peer_addr).await;
    c.send(peer_addr, b"over six").await;
    let (got, from) = recv(&peer).await;
    assert_eq!(got, b"over six");
    assert_eq!(from, relayed[0]);

    // An IPv4 peer on an IPv6-only allocation: 443.
    let r = c
        .request_with_peer(method::CREATE_PERMISSION, "8.8.8.8:53".parse().unwrap())
        .await;
    assert_eq!(r.code, Some(443));
    relay.shutdown().await;
}

#[tokio::test]
async fn dual_allocation_returns_an_ipv4_and_an_ipv6_relayed_address_and_uses_both() {
    let relay = Running::start_with(&format!(
        r#"
[relay]
realm = "{REALM}"
listen = ["udp://127.0.0.1:0"]
relay-ip = ["127.0.0.1", "::1"]
relay-ports = "42000-42999"
secrets = ["{SECRET}"]
allow-peers = ["127.0.0.0/8", "::1/128"]
threads = 2
grace-period = "1s"
"#
    ))
    .await;
    let peer4 = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let peer6 = UdpSocket::bind("[::1]:0").await.unwrap();

    let mut c = RawClient::new_at("127.0.0.1:0", relay.addr, "dual").await;
    let r = c
        .request(
            method::ALLOCATE,
            &[
                (attr::REQUESTED_TRANSPORT, UDP.to_vec()),
                (attr::ADDITIONAL_ADDRESS_FAMILY, vec![0x02, 0, 0, 0]),
            ],
        )
        .await;
    assert_eq!(r.code, None);
    let relayed = r.addresses(attr::XOR_RELAYED_ADDRESS);
    assert_eq!(relayed.len(), 2, "two relayed addresses");
    assert!(relayed[0].is_ipv4() && relayed[1].is_ipv6(), "{relayed:?}");
    assert_eq!(r.address_error(), None);

    for (peer, relayed) in [(&peer4, relayed[0]), (&peer6, relayed[1])] {
        let peer_addr = peer.local_addr().unwrap();
        c.permit(peer_addr).await;
        c.send(peer_addr, b"dual").await;
        let (got, from) = recv(peer).await;
        assert_eq!(got, b"dual");
        assert_eq!(from, relayed, "each family leaves from its own relay");
        // And back: the client gets a Data indication naming the peer.
        peer.send_to(b"back", relayed).await.unwrap();
        let (raw, _) = recv(&c.sock).await;
        let msg = Message::parse(&raw).unwrap();
        assert_eq!(msg.method(), method::DATA);
        let tid = msg.transaction_id();
        let from_peer = msg
            .attributes()
            .find(|(t, _, _)| *t == attr::XOR_PEER_ADDRESS)
            .and_then(|(_, v, _)| stun::decode_xor_address(v, &tid));
        assert_eq!(from_peer, Some(peer_addr));
    }

    // Refresh with REQUESTED-ADDRESS-FAMILY IPv6 and LIFETIME 0 gives up only the IPv6 relay.
    let r = c
        .request(
            method::REFRESH,
            &[
                (attr::LIFETIME, vec![0, 0, 0, 0]),
                (attr::REQUESTED_ADDRESS_FAMILY, vec![0x02, 0, 0, 0]),
            ],
        )
        .await;
    assert_eq!(r.code, None);
    let r = c
        .request_with_peer(method::CREATE_PERMISSION, peer6.local_addr().unwrap())
        .await;
    assert_eq!(r.code, Some(443), "no IPv6 relay any more");
    c.send(peer4.local_addr().unwrap(), b"still v4").await;
    assert_eq!(recv(&peer4).await.0, b"still v4");
    relay.shutdown().await;
}

#[tokio::test]
async fn dual_allocation_on_an_ipv4_only_server_reports_the_missing_family() {
    let relay = Running::start("").await;
    let mut c = RawClient::new_at("127.0.0.1:0", relay.addr, "half").await;
    let r = c
        .request(
            method::ALLOCATE,
            &[
                (attr::REQUESTED_TRANSPORT, UDP.to_vec()),
                (attr::ADDITIONAL_ADDRESS_FAMILY, vec![0x02, 0, 0, 0]),
            ],
        )
        .await;
    assert_eq!(r.code, None);
    assert_eq!(r.addresses(attr::XOR_RELAYED_ADDRESS).len(), 1);
    assert_eq!(r.address_error(), Some((0x02, 440)));
    relay.shutdown().await;
}
