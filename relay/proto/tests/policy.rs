//! The peer policy, directly and through the server: what a client may relay to, relayed
//! addresses of other allocations, NAT'ed external addresses, and IPv6 relays.
#![allow(clippy::unwrap_used)]

mod common;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use relay_proto::policy::{canonical, Allowed};
use relay_proto::stun::{attr, method, Class};
use relay_proto::{DenyReason, Direction, DropReason, PeerPolicy, PerFamily};

use common::*;

fn sa(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

// ---- PeerPolicy directly ----

#[test]
fn listener_is_own_address() {
    assert_eq!(policy().check(LISTENER), Err(DenyReason::OwnAddress));
}

#[test]
fn listener_ip_on_other_port_is_only_reserved() {
    assert_eq!(
        policy().check(sa("198.51.100.1:3479")),
        Err(DenyReason::Reserved)
    );
}

#[test]
fn admin_is_own_address() {
    assert_eq!(policy().check(ADMIN), Err(DenyReason::OwnAddress));
}

#[test]
fn admin_port_through_mapped_address_is_own_address() {
    assert_eq!(
        policy().check(sa("[::ffff:127.0.0.1]:9641")),
        Err(DenyReason::OwnAddress)
    );
}

#[test]
fn wildcard_listener_covers_every_ip() {
    let p = PeerPolicy::new(
        vec![],
        vec![],
        vec![sa("0.0.0.0:3478")],
        vec![],
        49152..=65535,
    );
    assert_eq!(p.check(sa("8.8.8.8:3478")), Err(DenyReason::OwnAddress));
    assert_eq!(p.check(sa("8.8.8.8:3479")), Ok(Allowed::Peer));
}

#[test]
fn relay_ip_in_relay_ports_is_relayed() {
    let p = policy();
    assert_eq!(p.check(sa("203.0.113.10:49152")), Ok(Allowed::Relayed));
    assert_eq!(p.check(sa("203.0.113.10:65535")), Ok(Allowed::Relayed));
}

#[test]
fn relay_ip_outside_relay_ports_is_its_range() {
    let p = policy();
    assert_eq!(p.check(sa("203.0.113.10:49151")), Err(DenyReason::Reserved));
    assert_eq!(p.check(sa("203.0.113.10:22")), Err(DenyReason::Reserved));
}

#[test]
fn mapped_relay_ip_is_relayed() {
    assert_eq!(
        policy().check(sa("[::ffff:203.0.113.10]:50000")),
        Ok(Allowed::Relayed)
    );
}

#[test]
fn check_ip_allows_relay_ip() {
    assert_eq!(policy().check_ip(RELAY_IP), Ok(()));
    assert_eq!(
        policy().check_ip(ip("203.0.113.11")),
        Err(DenyReason::Reserved)
    );
}

#[test]
fn public_addresses_are_peers() {
    let p = policy();
    assert_eq!(p.check(PEER_A), Ok(Allowed::Peer));
    assert_eq!(p.check(sa("[2606:4700::1111]:443")), Ok(Allowed::Peer));
}

#[test]
fn deny_list_beats_public() {
    let p = PeerPolicy::new(
        vec![],
        vec!["8.8.0.0/16".parse().unwrap()],
        vec![],
        vec![],
        49152..=65535,
    );
    assert_eq!(p.check(PEER_A), Err(DenyReason::DenyList));
    assert_eq!(p.check_ip(ip("8.8.4.4")), Err(DenyReason::DenyList));
    assert_eq!(p.check(PEER_B), Ok(Allowed::Peer));
}

#[test]
fn allow_list_beats_defaults_and_deny_list() {
    let p = PeerPolicy::new(
        vec!["10.1.0.0/16".parse().unwrap()],
        vec!["10.0.0.0/8".parse().unwrap()],
        vec![],
        vec![],
        49152..=65535,
    );
    assert_eq!(p.check(sa("10.1.2.3:5000")), Ok(Allowed::Peer));
    assert_eq!(p.check(sa("10.2.0.1:5000")), Err(DenyReason::DenyList));
}

#[test]
fn allow_list_never_opens_own_address() {
    let p = PeerPolicy::new(
        vec!["0.0.0.0/0".parse().unwrap()],
        vec![],
        vec![ADMIN],
        vec![],
        49152..=65535,
    );
    assert_eq!(p.check(ADMIN), Err(DenyReason::OwnAddress));
    assert_eq!(p.check(sa("127.0.0.1:9642")), Ok(Allowed::Peer));
}

#[test]
fn nat64_of_public_address_is_translated() {
    assert_eq!(
        policy().check(sa("[64:ff9b::808:808]:53")),
        Err(DenyReason::Translated)
    );
}

#[test]
fn teredo_is_translated_not_reserved() {
    assert_eq!(
        policy().check(sa("[2001:0:4136:e378::1]:5000")),
        Err(DenyReason::Translated)
    );
}

#[test]
fn broadcast_is_reserved() {
    assert_eq!(
        policy().check(sa("255.255.255.255:5000")),
        Err(DenyReason::Reserved)
    );
}

#[test]
fn compatible_unspecified_is_unspecified() {
    assert_eq!(
        policy().check(sa("[::0.0.0.2]:5000")),
        Err(DenyReason::Unspecified)
    );
}

#[test]
fn canonical_unwraps_ipv4_in_ipv6() {
    assert_eq!(canonical(ip("::ffff:1.2.3.4")), ip("1.2.3.4"));
    assert_eq!(canonical(ip("::1.2.3.4")), ip("1.2.3.4"));
}

#[test]
fn canonical_keeps_ipv6_loopback_and_unspecified() {
    assert_eq!(canonical(ip("::1")), ip("::1"));
    assert_eq!(canonical(ip("::")), ip("::"));
    assert_eq!(canonical(ip("2606:4700::1111")), ip("2606:4700::1111"));
}

// ---- through the server ----

#[test]
fn permission_for_relay_ip_is_allowed() {
    let mut h = Harness::new();
    let c = h.allocated(44000);
    let resp = h.create_permission(h.at(1), &c, &[sa("203.0.113.10:50001")]);
    assert_eq!(class_of(&resp), Class::Success);
    assert_eq!(h.stats().peers_denied.iter().sum::<u64>(), 0);
}

#[test]
fn channel_to_relay_ip_outside_relay_ports_is_403() {
    let mut h = Harness::new();
    let c = h.allocated(44000);
    let resp = h.channel_bind(h.at(1), &c, 0x4000, sa("203.0.113.10:22"));
    assert_eq!(error_code(&resp), Some(403));
    assert_eq!(h.stats().peers_denied[DenyReason::Reserved.index()], 1);
}

#[test]
fn send_to_relay_ip_outside_relay_ports_is_denied() {
    // CreatePermission for the relay IP passes (ports mean nothing there), but each Send is
    // checked with its port.
    let mut h = Harness::new();
    let c = h.allocated(44000);
    h.create_permission(h.at(1), &c, &[sa("203.0.113.10:50001")]);
    let outs = h.send_indication(h.at(2), &c, sa("203.0.113.10:22"), b"x");
    assert!(outs.is_empty());
    assert_eq!(h.stats().dropped[DropReason::DeniedPeer.index()], 1);
    assert_eq!(h.stats().peers_denied[DenyReason::Reserved.index()], 1);
}

#[test]
fn two_allocations_relay_to_each_other() {
    let mut h = Harness::new();
    let a = h.allocated(44000);
    let b = h.allocated(44001);
    let (ra, rb) = (a.relayed.unwrap(), b.relayed.unwrap());
    assert_eq!(
        class_of(&h.channel_bind(h.at(1), &a, 0x4000, rb)),
        Class::Success
    );
    assert_eq!(
        class_of(&h.create_permission(h.at(1), &b, &[ra])),
        Class::Success
    );
    // Same shard: the datagram goes straight to B's client, as if B's relay socket had received
    // it from A's relayed address — no transmit to a peer, no kernel hop.
    let outs = h.client_sends(h.at(2), a.five, &channel_data(0x4000, b"hairpin"));
    let ind = response_to(&outs, b.five);
    assert_eq!(xor_addr(&ind, attr::XOR_PEER_ADDRESS), Some(ra));
    assert_eq!(attr_value(&ind, attr::DATA).unwrap(), b"hairpin");
    assert_eq!(h.stats().short_circuit, 1);
    assert_eq!(h.stats().packets[0][Direction::ClientToPeer.index()], 1);
    assert_eq!(h.stats().packets[0][Direction::PeerToClient.index()], 1);
    // From another shard (the driver hands it over by address), the same delivery.
    let outs = {
        h.server.handle_peer_at(h.at(3), rb, ra, b"across");
        h.drain(h.at(3))
    };
    let ind = response_to(&outs, b.five);
    assert_eq!(attr_value(&ind, attr::DATA).unwrap(), b"across");
    // The receiving allocation's permissions still rule: C has none, so nothing reaches it.
    let c = h.allocated(44002);
    let outs = h.send_indication(h.at(4), &b, c.relayed.unwrap(), b"knock");
    assert!(transmits(&outs).is_empty(), "C has no permission");
    assert_eq!(h.stats().dropped[DropReason::NoPermission.index()], 1);
    assert_eq!(h.stats().short_circuit, 2);
}

#[test]
fn handing_over_to_an_unknown_relayed_address_is_dropped() {
    let mut h = Harness::new();
    let a = h.allocated(44000);
    h.server.handle_peer_at(
        h.at(1),
        SocketAddr::new(RELAY_IP, 60999),
        a.relayed.unwrap(),
        b"x",
    );
    assert!(h.drain(h.at(1)).is_empty());
    assert_eq!(h.stats().dropped[DropReason::NoAllocation.index()], 1);
}

#[test]
fn deny_list_peer_is_403() {
    let mut h = Harness::with(|c| {
        c.policy = PeerPolicy::new(
            vec![],
            vec!["8.8.8.0/24".parse().unwrap()],
            vec![LISTENER, ADMIN],
            vec![RELAY_IP],
            49152..=65535,
        )
    });
    let c = h.allocated(44000);
    let resp = h.create_permission(h.at(1), &c, &[PEER_A]);
    assert_eq!(error_code(&resp), Some(403));
    assert_eq!(h.stats().peers_denied[DenyReason::DenyList.index()], 1);
}

#[test]
fn allow_list_opens_private_peer() {
    let mut h = Harness::with(|c| {
        c.policy = PeerPolicy::new(
            vec!["10.0.0.0/8".parse().unwrap()],
            vec![],
            vec![LISTENER, ADMIN],
            vec![RELAY_IP],
            49152..=65535,
        )
    });
    let c = h.allocated(44000);
    let peer = sa("10.0.0.1:5000");
    assert_eq!(
        class_of(&h.create_permission(h.at(1), &c, &[peer])),
        Class::Success
    );
    let outs = h.peer_sends(h.at(2), c.relay(), peer, b"lan");
    assert_eq!(transmits(&outs).len(), 1);
}

#[test]
fn mapped_peer_data_matches_ipv4_permission() {
    // A dual-stack relay socket reports IPv4 peers as ::ffff:a.b.c.d; they are the same peer.
    let mut h = Harness::new();
    let c = h.allocated(44000);
    h.create_permission(h.at(1), &c, &[PEER_A]);
    let outs = h.peer_sends(h.at(2), c.relay(), sa("[::ffff:8.8.8.8]:5000"), b"x");
    let ind = response_to(&outs, c.five);
    assert_eq!(xor_addr(&ind, attr::XOR_PEER_ADDRESS), Some(PEER_A));
}

// ---- behind a 1:1 NAT ----

const EXTERNAL_IP: IpAddr = IpAddr::V4(Ipv4Addr::new(8, 8, 4, 4));

fn nat_harness() -> Harness {
    Harness::with(|c| {
        c.external_ips.v4 = Some(EXTERNAL_IP);
        c.policy = PeerPolicy::new(
            vec![],
            vec![],
            vec![LISTENER, ADMIN],
            vec![RELAY_IP, EXTERNAL_IP],
            49152..=65535,
        );
    })
}

#[test]
fn channel_to_external_relayed_address_is_sent_to_relay_ip() {
    let mut h = nat_harness();
    let a = h.allocated(44000);
    let b = h.allocated(44001);
    let rb = b.relayed.unwrap();
    assert_eq!(rb.ip(), EXTERNAL_IP);
    assert_eq!(
        class_of(&h.channel_bind(h.at(1), &a, 0x4000, rb)),
        Class::Success
    );
    // B lets A in by A's external (advertised) address.
    let ra = a.relayed.unwrap();
    assert_eq!(ra.ip(), EXTERNAL_IP);
    h.create_permission(h.at(1), &b, &[ra]);
    // Handed over inside the server (no NAT hairpin needed), and B sees A's external address.
    let outs = h.client_sends(h.at(2), a.five, &channel_data(0x4000, b"x"));
    let ind = response_to(&outs, b.five);
    assert_eq!(xor_addr(&ind, attr::XOR_PEER_ADDRESS), Some(ra));
    assert_eq!(h.stats().short_circuit, 1);
}

#[test]
fn peer_data_from_relay_ip_is_seen_as_external_address() {
    let mut h = nat_harness();
    let a = h.allocated(44000);
    let b = h.allocated(44001);
    let rb = b.relayed.unwrap();
    h.channel_bind(h.at(1), &a, 0x4000, rb);
    // B's socket sends to A directly on the relay IP; A's channel is bound to B's external address.
    let from = SocketAddr::new(RELAY_IP, rb.port());
    let outs = h.peer_sends(h.at(2), a.relay(), from, b"yo");
    assert_eq!(
        response_to(&outs, a.five),
        vec![0x40, 0x00, 0x00, 0x02, b'y', b'o']
    );
}

// ---- IPv6 relay ----

/// An IPv6-only server: its allocations need REQUESTED-ADDRESS-FAMILY IPv6 (IPv4 is the default).
fn v6_harness() -> Harness {
    Harness::with(|c| {
        c.relay_ips = PerFamily::single(RELAY_IP6);
        c.policy = PeerPolicy::new(
            vec![],
            vec![],
            vec![LISTENER, ADMIN],
            vec![RELAY_IP6],
            49152..=65535,
        );
    })
}

/// Alice on `port` with an IPv6 allocation, at `t0`.
fn allocated_v6(h: &mut Harness, port: u16) -> Client {
    let mut c = Client::new(port, Creds::alice());
    h.allocate_with(h.t0, &mut c, |r| r.family(FAMILY_V6));
    c
}

#[test]
fn ipv6_relay_advertises_ipv6_relayed_address() {
    let mut h = v6_harness();
    let mut c = Client::new(44000, Creds::alice());
    let resp = h.allocate_with(h.t0, &mut c, |r| r.family(FAMILY_V6));
    assert_eq!(
        xor_addr(&resp, attr::XOR_RELAYED_ADDRESS),
        Some(SocketAddr::new(RELAY_IP6, RELAY_PORT_BASE))
    );
    // The client itself is on IPv4: XOR-MAPPED-ADDRESS says so.
    assert_eq!(
        xor_addr(&resp, attr::XOR_MAPPED_ADDRESS),
        Some(SocketAddr::new(CLIENT_IP, 44000))
    );
}

#[test]
fn ipv6_relay_allows_ipv6_peer() {
    let mut h = v6_harness();
    let c = allocated_v6(&mut h, 44000);
    let peer = sa("[2606:4700::1111]:5000");
    assert_eq!(
        class_of(&h.create_permission(h.at(1), &c, &[peer])),
        Class::Success
    );
    let outs = h.peer_sends(h.at(2), c.relay(), peer, b"v6");
    let ind = response_to(&outs, c.five);
    assert_eq!(xor_addr(&ind, attr::XOR_PEER_ADDRESS), Some(peer));
}

#[test]
fn ipv6_relay_refuses_ipv4_peer_with_443() {
    let mut h = v6_harness();
    let c = allocated_v6(&mut h, 44000);
    assert_eq!(
        error_code(&h.create_permission(h.at(1), &c, &[PEER_A])),
        Some(443)
    );
}

#[test]
fn ipv6_relay_refuses_mapped_ipv4_peer_with_443() {
    // Peer data is matched on the canonical (IPv4) address, so a permission for
    // ::ffff:8.8.8.8 on an IPv6 relay could never let anything in: refuse it.
    let mut h = v6_harness();
    let c = allocated_v6(&mut h, 44000);
    let resp = h.create_permission(h.at(1), &c, &[sa("[::ffff:8.8.8.8]:5000")]);
    assert_eq!(error_code(&resp), Some(443));
    assert!(verifies(&resp, &c.creds.key));
}

#[test]
fn ipv6_relay_refuses_mapped_ipv4_channel_peer_with_443() {
    let mut h = v6_harness();
    let c = allocated_v6(&mut h, 44000);
    let resp = h.channel_bind(h.at(1), &c, 0x4000, sa("[::ffff:8.8.8.8]:5000"));
    assert_eq!(error_code(&resp), Some(443));
}

#[test]
fn ipv6_relay_refuses_ipv4_family_with_440() {
    let mut h = v6_harness();
    let mut c = Client::new(44000, Creds::alice());
    h.fetch_nonce(h.t0, &mut c);
    let req = c.req_with(method::ALLOCATE, |r| {
        r.transport(UDP)
            .u32(attr::REQUESTED_ADDRESS_FAMILY, 0x01 << 24)
    });
    assert_eq!(
        error_code(&h.transact(h.t0, c.five, &req.encode())),
        Some(440)
    );
}

#[test]
fn ipv6_relay_grants_ipv6_family() {
    let mut h = v6_harness();
    let mut c = Client::new(44000, Creds::alice());
    h.fetch_nonce(h.t0, &mut c);
    let req = c.req_with(method::ALLOCATE, |r| {
        r.transport(UDP)
            .u32(attr::REQUESTED_ADDRESS_FAMILY, 0x02 << 24)
    });
    assert_eq!(
        class_of(&h.transact(h.t0, c.five, &req.encode())),
        Class::Success
    );
}

#[test]
fn ipv6_relay_denies_ipv6_link_local_peer() {
    let mut h = v6_harness();
    let c = allocated_v6(&mut h, 44000);
    let resp = h.create_permission(h.at(1), &c, &[sa("[fe80::1]:5000")]);
    assert_eq!(error_code(&resp), Some(403));
    assert_eq!(h.stats().peers_denied[DenyReason::LinkLocal.index()], 1);
}

#[test]
fn ipv6_relay_denies_mapped_private_peer_as_private() {
    // Policy runs before the family check: an IPv4 address hidden in IPv6 is refused as what it
    // is, even on an IPv6 relay where the family would match.
    let mut h = v6_harness();
    let c = allocated_v6(&mut h, 44000);
    let resp = h.create_permission(h.at(1), &c, &[sa("[::ffff:10.0.0.1]:5000")]);
    assert_eq!(error_code(&resp), Some(403));
    assert_eq!(h.stats().peers_denied[DenyReason::Private.index()], 1);
}
