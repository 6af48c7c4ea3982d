//! RFC 8656 beyond UDP/IPv4: TURN over TCP/TLS (framing, ChannelData padding, per-transport
//! counters, the allocation dying with its connection), IPv6 relays, REQUESTED-ADDRESS-FAMILY and
//! dual allocations (ADDITIONAL-ADDRESS-FAMILY, ADDRESS-ERROR-CODE) with every degraded path.
#![allow(clippy::unwrap_used)]

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use proptest::prelude::*;
use relay_proto::stun::{
    self, attr, method, stream_frame_len, Class, Encoder, StreamError, HEADER_LEN, MAGIC_COOKIE,
};
use relay_proto::{
    AllocResult, BindError, DeleteReason, Dest, Direction, DropReason, Event, Family, FiveTuple,
    Output, PeerPolicy, Quotas, Transport,
};

use common::*;

/// The largest frame a stream driver accepts: the largest STUN message (20 + 65 532).
const MAX_FRAME: usize = HEADER_LEN + 0xFFFC;

const PEER6: SocketAddr = SocketAddr::new(
    std::net::IpAddr::V6(std::net::Ipv6Addr::new(
        0x2606, 0x4700, 0, 0, 0, 0, 0, 0x1111,
    )),
    5000,
);
const PEER6_B: SocketAddr = SocketAddr::new(
    std::net::IpAddr::V6(std::net::Ipv6Addr::new(
        0x2001, 0x4860, 0x4860, 0, 0, 0, 0, 0x8888,
    )),
    6000,
);

fn policy_for(relay_ips: Vec<std::net::IpAddr>) -> PeerPolicy {
    PeerPolicy::new(
        vec![],
        vec![],
        vec![LISTENER, ADMIN],
        relay_ips,
        49152..=65535,
    )
}

/// A server with an IPv4 and an IPv6 relay IP.
fn dual_harness() -> Harness {
    Harness::with(|c| {
        c.relay_ips.v6 = Some(RELAY_IP6);
        c.policy = policy_for(vec![RELAY_IP, RELAY_IP6]);
    })
}

/// A server with only an IPv6 relay IP.
fn v6_only_harness() -> Harness {
    Harness::with(|c| {
        c.relay_ips.v4 = None;
        c.relay_ips.v6 = Some(RELAY_IP6);
        c.policy = policy_for(vec![RELAY_IP6]);
    })
}

/// Fetches a nonce, then sends an Allocate (REQUESTED-TRANSPORT UDP, then what `f` adds, then
/// credentials) and returns every output.
fn send_allocate(h: &mut Harness, c: &mut Client, f: impl FnOnce(Request) -> Request) -> Vec<Out> {
    let now = h.t0;
    h.fetch_nonce(now, c);
    let req = c.req_with(method::ALLOCATE, |r| f(r.transport(UDP)));
    h.client_sends(now, c.five, &req.encode())
}

/// Alice on `port` with a dual allocation (ADDITIONAL-ADDRESS-FAMILY IPv6), at `t0`.
fn dual_allocated(h: &mut Harness, port: u16) -> (Client, Vec<u8>) {
    let mut c = Client::new(port, Creds::alice());
    let resp = h.allocate_with(h.t0, &mut c, |r| r.additional_family(FAMILY_V6));
    (c, resp)
}

fn v6_allocated(h: &mut Harness, port: u16) -> Client {
    let mut c = Client::new(port, Creds::alice());
    h.allocate_with(h.t0, &mut c, |r| r.family(FAMILY_V6));
    c
}

fn refresh_family(h: &mut Harness, secs: u64, c: &Client, family: u8, lifetime: u32) -> Vec<Out> {
    let req = c.req_with(method::REFRESH, |r| r.family(family).lifetime(lifetime));
    h.client_sends(h.at(secs), c.five, &req.encode())
}

fn stats_alloc(h: &Harness, t: Transport, r: AllocResult) -> u64 {
    h.stats().allocations[t.index()][r.index()]
}

// ==== Dual allocation: happy path ====

#[test]
fn dual_allocation_binds_ipv4_then_ipv6_and_answers_when_both_are_bound() {
    let mut h = dual_harness();
    h.bind_mode = BindMode::Manual;
    let mut c = Client::new(45000, Creds::alice());
    let outs = send_allocate(&mut h, &mut c, |r| r.additional_family(FAMILY_V6));
    let b = binds(&outs);
    assert_eq!(b.len(), 2, "{outs:?}");
    assert_eq!((b[0].relay.family(), b[0].ip), (Family::V4, RELAY_IP));
    assert_eq!((b[1].relay.family(), b[1].ip), (Family::V6, RELAY_IP6));
    assert!(!b[0].even_port && !b[1].even_port);
    // Two sockets of one allocation: distinct ids, adjacent dense indices.
    assert_ne!(b[0].relay, b[1].relay);
    assert_eq!(b[0].relay.index() / 2, b[1].relay.index() / 2);
    assert_eq!(b[0].relay.index() % 2, Family::V4.index());
    assert_eq!(b[1].relay.index() % 2, Family::V6.index());
    assert!(transmits(&outs).is_empty());

    let v4: SocketAddr = SocketAddr::new(RELAY_IP, 50100);
    let v6: SocketAddr = SocketAddr::new(RELAY_IP6, 50200);
    // The IPv4 socket alone does not answer the Allocate.
    let outs = h.relay_bound(h.at(1), b[0].relay, Ok(v4));
    assert!(outs.is_empty(), "{outs:?}");
    let outs = h.relay_bound(h.at(1), b[1].relay, Ok(v6));
    let resp = response_to(&outs, c.five);
    assert_eq!(class_of(&resp), Class::Success);
    assert!(verifies(&resp, &c.creds.key));
    assert_eq!(xor_addrs(&resp, attr::XOR_RELAYED_ADDRESS), vec![v4, v6]);
    assert_eq!(address_error_code(&resp), None);
    assert_eq!(lifetime_of(&resp), Some(599));
    assert_eq!(
        events(&outs),
        vec![Event::AllocationCreated {
            client: c.five.client,
            relayed: v4,
            lifetime: Duration::from_secs(599),
        }]
    );
    assert_eq!(stats_alloc(&h, Transport::Udp, AllocResult::Ok), 1);
    assert_eq!(h.quotas().total(), 1);
}

#[test]
fn dual_allocation_lists_ipv4_first_whatever_order_the_binds_complete_in() {
    let mut h = dual_harness();
    h.bind_mode = BindMode::Manual;
    let mut c = Client::new(45000, Creds::alice());
    let outs = send_allocate(&mut h, &mut c, |r| r.additional_family(FAMILY_V6));
    let b = binds(&outs);
    let v4: SocketAddr = SocketAddr::new(RELAY_IP, 50100);
    let v6: SocketAddr = SocketAddr::new(RELAY_IP6, 50200);
    assert!(h.relay_bound(h.at(1), b[1].relay, Ok(v6)).is_empty());
    let outs = h.relay_bound(h.at(1), b[0].relay, Ok(v4));
    let resp = response_to(&outs, c.five);
    assert_eq!(xor_addrs(&resp, attr::XOR_RELAYED_ADDRESS), vec![v4, v6]);
    assert!(matches!(
        events(&outs)[..],
        [Event::AllocationCreated { relayed, .. }] if relayed == v4
    ));
}

#[test]
fn dual_allocation_with_harness_binds_relays_both_families() {
    let mut h = dual_harness();
    let (c, resp) = dual_allocated(&mut h, 45000);
    assert_eq!(
        xor_addrs(&resp, attr::XOR_RELAYED_ADDRESS),
        vec![
            SocketAddr::new(RELAY_IP, RELAY_PORT_BASE),
            SocketAddr::new(RELAY_IP6, RELAY_PORT_BASE + 1)
        ]
    );
    assert_eq!(c.relays.len(), 2);
    assert_eq!(h.server.allocations(), 1);
    assert_eq!(h.quotas().total(), 1, "one allocation, one quota unit");
}

#[test]
fn dual_allocation_retransmission_gets_the_same_answer() {
    let mut h = dual_harness();
    let mut c = Client::new(45000, Creds::alice());
    h.fetch_nonce(h.t0, &mut c);
    let req = c.req_with(method::ALLOCATE, |r| {
        r.transport(UDP).additional_family(FAMILY_V6)
    });
    let first = h.client_sends(h.t0, c.five, &req.encode());
    let again = h.client_sends(h.at(1), c.five, &req.encode());
    assert!(binds(&again).is_empty(), "no second pair of sockets");
    assert_eq!(response_to(&again, c.five), response_to(&first, c.five));
}

// ==== Dual allocation: degraded paths ====

#[test]
fn dual_allocation_without_ipv6_relay_ip_is_ipv4_with_address_error_440() {
    let mut h = Harness::new();
    let mut c = Client::new(45000, Creds::alice());
    let outs = send_allocate(&mut h, &mut c, |r| r.additional_family(FAMILY_V6));
    let b = binds(&outs);
    assert_eq!(b.len(), 1);
    assert_eq!(b[0].relay.family(), Family::V4);
    let resp = response_to(&outs, c.five);
    assert_eq!(class_of(&resp), Class::Success);
    assert!(verifies(&resp, &c.creds.key));
    assert_eq!(
        xor_addrs(&resp, attr::XOR_RELAYED_ADDRESS),
        vec![SocketAddr::new(RELAY_IP, RELAY_PORT_BASE)]
    );
    assert_eq!(address_error_code(&resp), Some((FAMILY_V6, 440)));
    assert_eq!(attr_values(&resp, attr::ADDRESS_ERROR_CODE).len(), 1);
    assert_eq!(stats_alloc(&h, Transport::Udp, AllocResult::Ok), 1);
}

#[test]
fn dual_allocation_ipv6_bind_failure_is_ipv4_with_address_error_508() {
    let mut h = dual_harness();
    h.bind_mode = BindMode::FailFamily(Family::V6, BindError::PortsExhausted);
    let mut c = Client::new(45000, Creds::alice());
    let outs = send_allocate(&mut h, &mut c, |r| r.additional_family(FAMILY_V6));
    assert_eq!(binds(&outs).len(), 2);
    assert!(releases(&outs).is_empty());
    let resp = response_to(&outs, c.five);
    assert_eq!(class_of(&resp), Class::Success);
    assert!(verifies(&resp, &c.creds.key));
    assert_eq!(
        xor_addrs(&resp, attr::XOR_RELAYED_ADDRESS),
        vec![SocketAddr::new(RELAY_IP, RELAY_PORT_BASE)]
    );
    assert_eq!(address_error_code(&resp), Some((FAMILY_V6, 508)));
    assert_eq!(stats_alloc(&h, Transport::Udp, AllocResult::Ok), 1);
    assert_eq!(h.quotas().total(), 1);
}

#[test]
fn dual_allocation_without_ipv6_relay_refuses_ipv6_peers_with_443() {
    let mut h = dual_harness();
    h.bind_mode = BindMode::FailFamily(Family::V6, BindError::System);
    let (c, _) = dual_allocated(&mut h, 45000);
    assert_eq!(
        error_code(&h.create_permission(h.at(1), &c, &[PEER6])),
        Some(443)
    );
    assert_eq!(
        class_of(&h.create_permission(h.at(1), &c, &[PEER_A])),
        Class::Success
    );
}

#[test]
fn dual_allocation_ipv4_bind_failure_is_508_and_releases_the_ipv6_relay() {
    let mut h = dual_harness();
    h.bind_mode = BindMode::FailFamily(Family::V4, BindError::PortsExhausted);
    let mut c = Client::new(45000, Creds::alice());
    let outs = send_allocate(&mut h, &mut c, |r| r.additional_family(FAMILY_V6));
    let b = binds(&outs);
    assert_eq!(b.len(), 2);
    assert_eq!(releases(&outs), vec![b[1].relay]);
    assert_eq!(b[1].relay.family(), Family::V6);
    let resp = response_to(&outs, c.five);
    assert_eq!(error_code(&resp), Some(508));
    assert!(verifies(&resp, &c.creds.key));
    assert!(attr_values(&resp, attr::XOR_RELAYED_ADDRESS).is_empty());
    // Never active: nothing to report as created or deleted.
    assert!(events(&outs).is_empty(), "{outs:?}");
    assert_eq!(h.server.allocations(), 0);
    assert_eq!(h.quotas().total(), 0);
    assert_eq!(h.quotas().user("alice"), 0);
    assert_eq!(stats_alloc(&h, Transport::Udp, AllocResult::Capacity), 1);
    assert_eq!(stats_alloc(&h, Transport::Udp, AllocResult::Ok), 0);
    // The 5-tuple is free again.
    h.bind_mode = BindMode::Ok;
    let (_c, resp) = dual_allocated(&mut h, 45000);
    assert_eq!(xor_addrs(&resp, attr::XOR_RELAYED_ADDRESS).len(), 2);
}

#[test]
fn dual_allocation_ipv4_failing_first_waits_for_ipv6_then_releases_it() {
    let mut h = dual_harness();
    h.bind_mode = BindMode::Manual;
    let mut c = Client::new(45000, Creds::alice());
    let b = binds(&send_allocate(&mut h, &mut c, |r| {
        r.additional_family(FAMILY_V6)
    }));
    let outs = h.relay_bound(h.at(1), b[0].relay, Err(BindError::System));
    assert!(outs.is_empty(), "{outs:?}");
    let outs = h.relay_bound(h.at(1), b[1].relay, Ok(SocketAddr::new(RELAY_IP6, 50001)));
    assert_eq!(releases(&outs), vec![b[1].relay]);
    assert_eq!(error_code(&response_to(&outs, c.five)), Some(508));
    assert_eq!(h.quotas().total(), 0);
}

#[test]
fn dual_allocation_both_binds_failing_is_508_without_release() {
    let mut h = dual_harness();
    h.bind_mode = BindMode::Fail(BindError::PortsExhausted);
    let mut c = Client::new(45000, Creds::alice());
    let outs = send_allocate(&mut h, &mut c, |r| r.additional_family(FAMILY_V6));
    assert_eq!(binds(&outs).len(), 2);
    assert!(releases(&outs).is_empty());
    assert_eq!(error_code(&response_to(&outs, c.five)), Some(508));
    assert_eq!(h.server.allocations(), 0);
    assert_eq!(h.quotas().total(), 0);
}

// ==== Allocate: address family validation ====

fn allocate_error(h: &mut Harness, f: impl FnOnce(Request) -> Request) -> Option<u16> {
    let mut c = Client::new(45000, Creds::alice());
    let outs = send_allocate(h, &mut c, f);
    assert!(binds(&outs).is_empty(), "{outs:?}");
    let resp = response_to(&outs, c.five);
    assert!(
        verifies(&resp, &c.creds.key),
        "authenticated errors are signed"
    );
    assert_eq!(h.server.allocations(), 0);
    assert_eq!(h.quotas().total(), 0);
    error_code(&resp)
}

#[test]
fn requested_and_additional_family_together_is_400() {
    let mut h = dual_harness();
    let code = allocate_error(&mut h, |r| r.family(FAMILY_V4).additional_family(FAMILY_V6));
    assert_eq!(code, Some(400));
    assert_eq!(stats_alloc(&h, Transport::Udp, AllocResult::BadRequest), 1);
}

#[test]
fn requested_ipv6_and_additional_family_together_is_400() {
    let mut h = dual_harness();
    let code = allocate_error(&mut h, |r| r.family(FAMILY_V6).additional_family(FAMILY_V6));
    assert_eq!(code, Some(400));
}

#[test]
fn additional_family_ipv4_is_400() {
    let mut h = dual_harness();
    assert_eq!(
        allocate_error(&mut h, |r| r.additional_family(FAMILY_V4)),
        Some(400)
    );
}

#[test]
fn additional_family_unknown_value_is_400() {
    let mut h = dual_harness();
    assert_eq!(
        allocate_error(&mut h, |r| r.additional_family(0x03)),
        Some(400)
    );
}

#[test]
fn additional_family_with_even_port_is_400() {
    let mut h = dual_harness();
    let code = allocate_error(&mut h, |r| {
        r.additional_family(FAMILY_V6)
            .attr(attr::EVEN_PORT, &[0x00])
    });
    assert_eq!(code, Some(400));
}

#[test]
fn ipv6_only_server_answers_default_family_with_440() {
    let mut h = v6_only_harness();
    assert_eq!(allocate_error(&mut h, |r| r), Some(440));
    assert_eq!(stats_alloc(&h, Transport::Udp, AllocResult::Unsupported), 1);
}

#[test]
fn ipv6_only_server_answers_dual_allocation_with_440() {
    // The default (IPv4) family cannot be had, so there is no allocation to add IPv6 to.
    let mut h = v6_only_harness();
    assert_eq!(
        allocate_error(&mut h, |r| r.additional_family(FAMILY_V6)),
        Some(440)
    );
}

#[test]
fn ipv6_only_server_grants_requested_ipv6() {
    let mut h = v6_only_harness();
    let mut c = Client::new(45000, Creds::alice());
    let outs = send_allocate(&mut h, &mut c, |r| r.family(FAMILY_V6));
    let b = binds(&outs);
    assert_eq!(b.len(), 1);
    assert_eq!((b[0].relay.family(), b[0].ip), (Family::V6, RELAY_IP6));
    let resp = response_to(&outs, c.five);
    assert_eq!(
        xor_addrs(&resp, attr::XOR_RELAYED_ADDRESS),
        vec![SocketAddr::new(RELAY_IP6, RELAY_PORT_BASE)]
    );
}

#[test]
fn requested_ipv6_on_dual_capable_server_gets_only_an_ipv6_relay() {
    let mut h = dual_harness();
    let mut c = Client::new(45000, Creds::alice());
    let outs = send_allocate(&mut h, &mut c, |r| r.family(FAMILY_V6));
    let b = binds(&outs);
    assert_eq!(b.len(), 1);
    assert_eq!((b[0].relay.family(), b[0].ip), (Family::V6, RELAY_IP6));
    let resp = response_to(&outs, c.five);
    assert_eq!(class_of(&resp), Class::Success);
    assert_eq!(
        xor_addrs(&resp, attr::XOR_RELAYED_ADDRESS),
        vec![SocketAddr::new(RELAY_IP6, RELAY_PORT_BASE)]
    );
    assert_eq!(address_error_code(&resp), None);
    assert!(matches!(
        events(&outs)[..],
        [Event::AllocationCreated { relayed, .. }] if relayed.is_ipv6()
    ));
}

#[test]
fn requested_ipv4_on_dual_capable_server_gets_only_an_ipv4_relay() {
    let mut h = dual_harness();
    let mut c = Client::new(45000, Creds::alice());
    let outs = send_allocate(&mut h, &mut c, |r| r.family(FAMILY_V4));
    let b = binds(&outs);
    assert_eq!(b.len(), 1);
    assert_eq!((b[0].relay.family(), b[0].ip), (Family::V4, RELAY_IP));
}

#[test]
fn default_family_on_dual_capable_server_is_ipv4_only() {
    let mut h = dual_harness();
    let mut c = Client::new(45000, Creds::alice());
    let outs = send_allocate(&mut h, &mut c, |r| r);
    let b = binds(&outs);
    assert_eq!(b.len(), 1);
    assert_eq!(b[0].relay.family(), Family::V4);
}

#[test]
fn requested_unknown_family_is_440() {
    let mut h = dual_harness();
    assert_eq!(allocate_error(&mut h, |r| r.family(0x03)), Some(440));
}

#[test]
fn external_ips_are_advertised_per_family() {
    let ext4: std::net::IpAddr = "8.8.4.4".parse().unwrap();
    let ext6: std::net::IpAddr = "2001:4860:4860::8844".parse().unwrap();
    let mut h = Harness::with(|c| {
        c.relay_ips.v6 = Some(RELAY_IP6);
        c.external_ips.v4 = Some(ext4);
        c.external_ips.v6 = Some(ext6);
        c.policy = policy_for(vec![RELAY_IP, RELAY_IP6, ext4, ext6]);
    });
    let (_c, resp) = dual_allocated(&mut h, 45000);
    assert_eq!(
        xor_addrs(&resp, attr::XOR_RELAYED_ADDRESS),
        vec![
            SocketAddr::new(ext4, RELAY_PORT_BASE),
            SocketAddr::new(ext6, RELAY_PORT_BASE + 1)
        ]
    );
}

// ==== Permissions and data by family ====

#[test]
fn ipv4_peer_on_ipv6_only_allocation_is_443() {
    let mut h = dual_harness();
    let c = v6_allocated(&mut h, 45000);
    let resp = h.create_permission(h.at(1), &c, &[PEER_A]);
    assert_eq!(error_code(&resp), Some(443));
    assert!(verifies(&resp, &c.creds.key));
    assert_eq!(
        error_code(&h.channel_bind(h.at(1), &c, 0x4000, PEER_A)),
        Some(443)
    );
    assert_eq!(
        class_of(&h.create_permission(h.at(1), &c, &[PEER6])),
        Class::Success
    );
}

#[test]
fn ipv6_peer_on_ipv4_only_allocation_is_443() {
    let mut h = dual_harness();
    let c = h.allocated(45000);
    assert_eq!(
        error_code(&h.create_permission(h.at(1), &c, &[PEER6])),
        Some(443)
    );
    assert_eq!(
        error_code(&h.channel_bind(h.at(1), &c, 0x4000, PEER6)),
        Some(443)
    );
}

#[test]
fn one_wrong_family_peer_refuses_the_whole_create_permission() {
    let mut h = dual_harness();
    let c = h.allocated(45000);
    assert_eq!(
        error_code(&h.create_permission(h.at(1), &c, &[PEER_A, PEER6])),
        Some(443)
    );
    // All or nothing: PEER_A got no permission either.
    assert!(h.peer_sends(h.at(2), c.relay(), PEER_A, b"x").is_empty());
}

#[test]
fn dual_allocation_permits_peers_of_both_families_at_once() {
    let mut h = dual_harness();
    let (c, _) = dual_allocated(&mut h, 45000);
    assert_eq!(
        class_of(&h.create_permission(h.at(1), &c, &[PEER_A, PEER6])),
        Class::Success
    );
}

#[test]
fn send_to_ipv6_peer_goes_out_of_the_ipv6_relay() {
    let mut h = dual_harness();
    let (c, _) = dual_allocated(&mut h, 45000);
    h.create_permission(h.at(1), &c, &[PEER_A, PEER6]);
    let outs = h.send_indication(h.at(2), &c, PEER6, b"six");
    let relay6 = c.relay_of(Family::V6);
    assert_eq!(relay6.family(), Family::V6);
    assert_eq!(
        transmits(&outs),
        vec![(
            Dest::Peer {
                relay: relay6,
                peer: PEER6
            },
            b"six".to_vec()
        )]
    );
    let outs = h.send_indication(h.at(2), &c, PEER_A, b"four");
    assert_eq!(
        transmits(&outs),
        vec![(
            Dest::Peer {
                relay: c.relay_of(Family::V4),
                peer: PEER_A
            },
            b"four".to_vec()
        )]
    );
}

#[test]
fn channel_data_to_ipv6_peer_goes_out_of_the_ipv6_relay() {
    let mut h = dual_harness();
    let (c, _) = dual_allocated(&mut h, 45000);
    assert_eq!(
        class_of(&h.channel_bind(h.at(1), &c, 0x4001, PEER6)),
        Class::Success
    );
    let outs = h.client_sends(h.at(2), c.five, &channel_data(0x4001, b"chan6"));
    assert_eq!(
        transmits(&outs),
        vec![(
            Dest::Peer {
                relay: c.relay_of(Family::V6),
                peer: PEER6
            },
            b"chan6".to_vec()
        )]
    );
}

#[test]
fn ipv6_peer_data_on_the_ipv6_relay_reaches_the_client() {
    let mut h = dual_harness();
    let (c, _) = dual_allocated(&mut h, 45000);
    h.create_permission(h.at(1), &c, &[PEER6]);
    let outs = h.peer_sends(h.at(2), c.relay_of(Family::V6), PEER6, b"hi");
    let ind = response_to(&outs, c.five);
    assert_eq!(method_of(&ind), method::DATA);
    assert_eq!(xor_addr(&ind, attr::XOR_PEER_ADDRESS), Some(PEER6));
    assert_eq!(attr_value(&ind, attr::DATA).unwrap(), b"hi");
    h.channel_bind(h.at(3), &c, 0x4002, PEER6);
    let outs = h.peer_sends(h.at(4), c.relay_of(Family::V6), PEER6, b"hi");
    assert_eq!(response_to(&outs, c.five), channel_data(0x4002, b"hi"));
}

// ==== Refresh with REQUESTED-ADDRESS-FAMILY ====

#[test]
fn refresh_ipv4_family_on_ipv6_only_allocation_is_443() {
    let mut h = dual_harness();
    let c = v6_allocated(&mut h, 45000);
    let resp = response_to(&refresh_family(&mut h, 1, &c, FAMILY_V4, 600), c.five);
    assert_eq!(error_code(&resp), Some(443));
    assert!(verifies(&resp, &c.creds.key));
}

#[test]
fn refresh_ipv6_family_on_ipv4_only_allocation_is_443() {
    let mut h = dual_harness();
    let c = h.allocated(45000);
    let outs = refresh_family(&mut h, 1, &c, FAMILY_V6, 0);
    assert_eq!(error_code(&response_to(&outs, c.five)), Some(443));
    // A refused LIFETIME 0 deletes nothing.
    assert!(releases(&outs).is_empty());
    assert_eq!(h.server.allocations(), 1);
}

#[test]
fn refresh_unknown_family_is_443() {
    let mut h = dual_harness();
    let (c, _) = dual_allocated(&mut h, 45000);
    let outs = refresh_family(&mut h, 1, &c, 0x03, 600);
    assert_eq!(error_code(&response_to(&outs, c.five)), Some(443));
}

#[test]
fn refresh_of_one_family_with_lifetime_extends_the_whole_allocation() {
    let mut h = dual_harness();
    let (c, _) = dual_allocated(&mut h, 45000);
    let outs = refresh_family(&mut h, 500, &c, FAMILY_V6, 600);
    let resp = response_to(&outs, c.five);
    assert_eq!(class_of(&resp), Class::Success);
    assert_eq!(lifetime_of(&resp), Some(600));
    assert!(releases(&outs).is_empty());
    assert!(h.timeout(h.at(1000)).is_empty());
    let outs = h.timeout(h.at(1100));
    let mut released = releases(&outs);
    released.sort();
    let mut both = c.relays.clone();
    both.sort();
    assert_eq!(released, both);
}

#[test]
fn refresh_ipv6_lifetime_zero_on_dual_allocation_releases_only_ipv6() {
    let mut h = dual_harness();
    let (c, _) = dual_allocated(&mut h, 45000);
    let relay6 = c.relay_of(Family::V6);
    let outs = refresh_family(&mut h, 5, &c, FAMILY_V6, 0);
    let resp = response_to(&outs, c.five);
    assert_eq!(class_of(&resp), Class::Success);
    assert!(verifies(&resp, &c.creds.key));
    assert_eq!(lifetime_of(&resp), Some(0));
    assert_eq!(releases(&outs), vec![relay6]);
    assert!(
        events(&outs).is_empty(),
        "the allocation lives on: {outs:?}"
    );
    assert_eq!(h.server.allocations(), 1);
    assert_eq!(h.quotas().total(), 1);
    assert_eq!(h.stats().deleted.iter().sum::<u64>(), 0);

    // The IPv6 relay is gone: its peers are refused, its data dropped.
    assert_eq!(
        error_code(&h.create_permission(h.at(6), &c, &[PEER6])),
        Some(443)
    );
    let dropped = h.stats().dropped[DropReason::NoAllocation.index()];
    assert!(h.peer_sends(h.at(6), relay6, PEER6, b"x").is_empty());
    assert_eq!(
        h.stats().dropped[DropReason::NoAllocation.index()],
        dropped + 1
    );
    // Asking again for that family is a 443, not a second release.
    let outs = refresh_family(&mut h, 7, &c, FAMILY_V6, 0);
    assert_eq!(error_code(&response_to(&outs, c.five)), Some(443));
    assert!(releases(&outs).is_empty());

    // The IPv4 relay still relays.
    h.create_permission(h.at(8), &c, &[PEER_A]);
    let outs = h.send_indication(h.at(8), &c, PEER_A, b"still here");
    assert_eq!(
        transmits(&outs)[0].0,
        Dest::Peer {
            relay: c.relay_of(Family::V4),
            peer: PEER_A
        }
    );
    // And the whole allocation ends later with only the IPv4 relay to release.
    let outs = h.timeout(h.at(601));
    assert_eq!(releases(&outs), vec![c.relay_of(Family::V4)]);
    assert_eq!(h.quotas().total(), 0);
}

#[test]
fn refresh_releasing_ipv6_stops_relaying_to_ipv6_peers_bound_before() {
    // Permissions and channels to IPv6 peers were made through the IPv6 relay: once it is
    // released nothing may be sent from it any more.
    let mut h = dual_harness();
    let (c, _) = dual_allocated(&mut h, 45000);
    let relay6 = c.relay_of(Family::V6);
    h.create_permission(h.at(1), &c, &[PEER6_B]);
    assert_eq!(
        class_of(&h.channel_bind(h.at(1), &c, 0x4003, PEER6)),
        Class::Success
    );
    let outs = refresh_family(&mut h, 2, &c, FAMILY_V6, 0);
    assert_eq!(releases(&outs), vec![relay6]);

    let outs = h.client_sends(h.at(3), c.five, &channel_data(0x4003, b"x"));
    assert!(
        transmits(&outs).is_empty(),
        "sent from a released relay: {outs:?}"
    );
    let outs = h.send_indication(h.at(3), &c, PEER6_B, b"y");
    assert!(
        transmits(&outs).is_empty(),
        "sent from a released relay: {outs:?}"
    );
    let outs = h.send_indication(h.at(3), &c, PEER6, b"z");
    assert!(
        transmits(&outs).is_empty(),
        "sent from a released relay: {outs:?}"
    );
    assert_eq!(
        h.stats().packets[Transport::Udp.index()][Direction::ClientToPeer.index()],
        0
    );
    // The channel went with the relay (its number is free), the permissions too.
    assert_eq!(h.stats().dropped[DropReason::UnboundChannel.index()], 1);
    assert_eq!(h.stats().dropped[DropReason::NoPermission.index()], 2);
}

#[test]
fn refresh_ipv4_lifetime_zero_on_dual_allocation_keeps_ipv6() {
    let mut h = dual_harness();
    let (c, _) = dual_allocated(&mut h, 45000);
    let outs = refresh_family(&mut h, 5, &c, FAMILY_V4, 0);
    assert_eq!(class_of(&response_to(&outs, c.five)), Class::Success);
    assert_eq!(releases(&outs), vec![c.relay_of(Family::V4)]);
    assert_eq!(h.server.allocations(), 1);
    assert_eq!(
        error_code(&h.create_permission(h.at(6), &c, &[PEER_A])),
        Some(443)
    );
    h.create_permission(h.at(6), &c, &[PEER6]);
    let outs = h.send_indication(h.at(7), &c, PEER6, b"v6");
    assert_eq!(
        transmits(&outs)[0].0,
        Dest::Peer {
            relay: c.relay_of(Family::V6),
            peer: PEER6
        }
    );
    // LIFETIME 0 for the last family ends the allocation.
    let outs = refresh_family(&mut h, 8, &c, FAMILY_V6, 0);
    assert_eq!(class_of(&response_to(&outs, c.five)), Class::Success);
    assert_eq!(releases(&outs), vec![c.relay_of(Family::V6)]);
    assert_eq!(
        events(&outs),
        vec![Event::AllocationDeleted {
            client: c.five.client,
            reason: DeleteReason::Client
        }]
    );
    assert_eq!(h.server.allocations(), 0);
    assert_eq!(h.quotas().total(), 0);
}

#[test]
fn refresh_lifetime_zero_without_family_releases_both_relays() {
    let mut h = dual_harness();
    let (c, _) = dual_allocated(&mut h, 45000);
    let req = c.req_with(method::REFRESH, |r| r.lifetime(0));
    let outs = h.client_sends(h.at(5), c.five, &req.encode());
    assert_eq!(class_of(&response_to(&outs, c.five)), Class::Success);
    assert_eq!(releases(&outs), c.relays);
    assert_eq!(
        events(&outs),
        vec![Event::AllocationDeleted {
            client: c.five.client,
            reason: DeleteReason::Client
        }]
    );
    assert_eq!(h.stats().deleted[DeleteReason::Client.index()], 1);
    assert_eq!(h.server.allocations(), 0);
    assert_eq!(h.quotas().total(), 0);
}

#[test]
fn refresh_family_lifetime_zero_on_single_family_allocation_deletes_it() {
    let mut h = dual_harness();
    let c = v6_allocated(&mut h, 45000);
    let outs = refresh_family(&mut h, 5, &c, FAMILY_V6, 0);
    assert_eq!(class_of(&response_to(&outs, c.five)), Class::Success);
    assert_eq!(releases(&outs), vec![c.relay()]);
    assert_eq!(h.server.allocations(), 0);
    assert_eq!(h.quotas().total(), 0);
}

#[test]
fn retransmitted_partial_release_gets_the_same_answer_and_releases_once() {
    let mut h = dual_harness();
    let (c, _) = dual_allocated(&mut h, 45000);
    let req = c.req_with(method::REFRESH, |r| r.family(FAMILY_V6).lifetime(0));
    let first = h.client_sends(h.at(5), c.five, &req.encode());
    let again = h.client_sends(h.at(6), c.five, &req.encode());
    assert_eq!(releases(&first).len(), 1);
    assert!(releases(&again).is_empty());
    assert_eq!(response_to(&again, c.five), response_to(&first, c.five));
}

#[test]
fn close_all_releases_both_relays_of_a_dual_allocation() {
    let mut h = dual_harness();
    let (c, _) = dual_allocated(&mut h, 45000);
    h.server.close_all();
    let outs = h.drain(h.at(1));
    assert_eq!(releases(&outs), c.relays);
    assert_eq!(h.quotas().total(), 0);
}

// ==== TURN over TCP/TLS ====

fn tcp(port: u16) -> FiveTuple {
    five_on(port, Transport::Tcp)
}

/// Alice on a TCP connection from `port`, allocated at `t0`.
fn tcp_allocated(h: &mut Harness, port: u16) -> Client {
    let mut c = Client::on(tcp(port), Creds::alice());
    h.allocate(h.t0, &mut c);
    c
}

/// A client that has channel 0x4000 bound to PEER_A, over `transport`.
fn channel_to_peer_a(h: &mut Harness, port: u16, transport: Transport) -> Client {
    let mut c = Client::on(five_on(port, transport), Creds::alice());
    h.allocate(h.t0, &mut c);
    assert_eq!(
        class_of(&h.channel_bind(h.at(1), &c, 0x4000, PEER_A)),
        Class::Success
    );
    c
}

#[test]
fn channel_data_to_a_tcp_client_is_padded_to_four_bytes() {
    let mut h = Harness::new();
    let c = channel_to_peer_a(&mut h, 46000, Transport::Tcp);
    let outs = h.peer_sends(h.at(2), c.relay(), PEER_A, b"12345");
    let frame = response_to(&outs, c.five);
    assert_eq!(frame.len(), 12);
    assert_eq!(
        frame[..4],
        [0x40, 0x00, 0x00, 0x05],
        "length counts the data only"
    );
    assert_eq!(&frame[4..9], b"12345");
    assert_eq!(frame[9..], [0, 0, 0]);
    // A stream reader cuts exactly this frame.
    assert_eq!(stream_frame_len(&frame, MAX_FRAME), Ok(Some(12)));
    assert_eq!(
        stun::parse_channel_data(&frame),
        Some((0x4000, &b"12345"[..]))
    );
    let t = Transport::Tcp.index();
    assert_eq!(h.stats().bytes[t][Direction::PeerToClient.index()], 5);
    assert_eq!(
        h.stats().channel_data[t][Direction::PeerToClient.index()],
        1
    );
}

#[test]
fn channel_data_to_a_tls_client_is_padded_too() {
    let mut h = Harness::new();
    let c = channel_to_peer_a(&mut h, 46000, Transport::Tls);
    let outs = h.peer_sends(h.at(2), c.relay(), PEER_A, b"x");
    assert_eq!(
        response_to(&outs, c.five),
        vec![0x40, 0x00, 0x00, 0x01, b'x', 0, 0, 0]
    );
}

#[test]
fn channel_data_to_a_udp_client_is_not_padded() {
    let mut h = Harness::new();
    let c = channel_to_peer_a(&mut h, 46000, Transport::Udp);
    let outs = h.peer_sends(h.at(2), c.relay(), PEER_A, b"12345");
    let frame = response_to(&outs, c.five);
    assert_eq!(frame.len(), 9);
    assert_eq!(frame, channel_data(0x4000, b"12345"));
}

#[test]
fn channel_data_of_a_multiple_of_four_is_not_padded_on_streams() {
    let mut h = Harness::new();
    let c = channel_to_peer_a(&mut h, 46000, Transport::Tcp);
    for (data, len) in [(&b""[..], 4), (b"1234", 8), (b"12345678", 12)] {
        let outs = h.peer_sends(h.at(2), c.relay(), PEER_A, data);
        assert_eq!(response_to(&outs, c.five), channel_data(0x4000, data));
        assert_eq!(channel_data(0x4000, data).len(), len);
    }
}

#[test]
fn padded_channel_data_from_a_tcp_client_relays_only_the_data() {
    let mut h = Harness::new();
    let c = channel_to_peer_a(&mut h, 46000, Transport::Tcp);
    let mut frame = channel_data(0x4000, b"12345");
    frame.extend_from_slice(&[0, 0, 0]);
    let outs = h.client_sends(h.at(2), c.five, &frame);
    assert_eq!(
        transmits(&outs),
        vec![(
            Dest::Peer {
                relay: c.relay(),
                peer: PEER_A
            },
            b"12345".to_vec()
        )]
    );
    let t = Transport::Tcp.index();
    assert_eq!(h.stats().bytes[t][Direction::ClientToPeer.index()], 5);
    assert_eq!(
        h.stats().channel_data[t][Direction::ClientToPeer.index()],
        1
    );
}

#[test]
fn data_indication_to_a_tcp_client_frames_on_the_stream() {
    let mut h = Harness::new();
    let c = tcp_allocated(&mut h, 46000);
    h.create_permission(h.at(1), &c, &[PEER_A]);
    let outs = h.peer_sends(h.at(2), c.relay(), PEER_A, b"12345");
    let ind = response_to(&outs, c.five);
    assert_eq!(stream_frame_len(&ind, MAX_FRAME), Ok(Some(ind.len())));
    assert_eq!(attr_value(&ind, attr::DATA).unwrap(), b"12345");
}

#[test]
fn full_allocation_over_tcp() {
    let mut h = Harness::new();
    let mut c = Client::on(tcp(46000), Creds::alice());
    let resp = h.allocate(h.t0, &mut c);
    assert!(verifies(&resp, &c.creds.key));
    assert_eq!(
        xor_addr(&resp, attr::XOR_MAPPED_ADDRESS),
        Some(c.five.client)
    );
    assert_eq!(
        xor_addr(&resp, attr::XOR_RELAYED_ADDRESS),
        Some(SocketAddr::new(RELAY_IP, RELAY_PORT_BASE))
    );
    assert_eq!(h.quotas().user("alice"), 1);
    assert_eq!(
        h.server.allocations_by_transport()[Transport::Tcp.index()],
        1
    );
    assert_eq!(
        h.server.allocations_by_transport()[Transport::Udp.index()],
        0
    );

    // Permissions, channels and relaying both ways, as over UDP.
    assert_eq!(
        class_of(&h.create_permission(h.at(1), &c, &[PEER_A])),
        Class::Success
    );
    assert_eq!(
        class_of(&h.channel_bind(h.at(1), &c, 0x4000, PEER_B)),
        Class::Success
    );
    let outs = h.send_indication(h.at(2), &c, PEER_A, b"send");
    assert_eq!(transmits(&outs).len(), 1);
    let outs = h.client_sends(h.at(2), c.five, &channel_data(0x4000, b"chan"));
    assert_eq!(transmits(&outs)[0].1, b"chan");
    let outs = h.peer_sends(h.at(3), c.relay(), PEER_B, b"back");
    assert_eq!(response_to(&outs, c.five), channel_data(0x4000, b"back"));
    // Refresh works; the same 5-tuple cannot allocate twice.
    assert_eq!(lifetime_of(&h.refresh(h.at(4), &c, Some(900))), Some(900));
    let req = c.req_with(method::ALLOCATE, |r| r.transport(UDP));
    assert_eq!(
        error_code(&h.transact(h.at(5), c.five, &req.encode())),
        Some(437)
    );

    // Every counter moved in the TCP row, none in the others.
    let s = h.stats();
    let (t, u) = (Transport::Tcp.index(), Transport::Udp.index());
    assert_eq!(s.allocations[t][AllocResult::Ok.index()], 1);
    assert_eq!(s.allocations[t][AllocResult::Unauthenticated.index()], 1);
    assert_eq!(s.allocations[t][AllocResult::Mismatch.index()], 1);
    assert_eq!(s.packets[t], [2, 1]);
    assert_eq!(s.bytes[t], [8, 4]);
    assert_eq!(s.channel_data[t], [1, 1]);
    for other in [u, Transport::Tls.index()] {
        assert_eq!(s.allocations[other], [0; AllocResult::COUNT]);
        assert_eq!(s.packets[other], [0; Direction::COUNT]);
        assert_eq!(s.bytes[other], [0; Direction::COUNT]);
        assert_eq!(s.channel_data[other], [0; Direction::COUNT]);
    }
}

#[test]
fn tcp_allocation_needs_the_same_credentials() {
    let mut h = Harness::new();
    let mut c = Client::on(
        tcp(46000),
        Creds::rest(b"not-our-secret", "alice", WALL_SECS + 60),
    );
    h.fetch_nonce(h.t0, &mut c);
    let req = c.req_with(method::ALLOCATE, |r| r.transport(UDP));
    let outs = h.client_sends(h.t0, c.five, &req.encode());
    assert_eq!(error_code(&response_to(&outs, c.five)), Some(401));
    assert!(binds(&outs).is_empty());
    assert_eq!(
        stats_alloc(&h, Transport::Tcp, AllocResult::Unauthenticated),
        2
    );
}

#[test]
fn tcp_and_udp_allocations_share_the_user_quota() {
    let mut h = Harness::with(|c| c.quotas = Quotas::new(Some(1), None));
    let _udp = h.allocated(46000);
    let mut c = Client::on(tcp(46001), Creds::alice());
    h.fetch_nonce(h.t0, &mut c);
    let req = c.req_with(method::ALLOCATE, |r| r.transport(UDP));
    assert_eq!(
        error_code(&h.transact(h.t0, c.five, &req.encode())),
        Some(486)
    );
    assert_eq!(stats_alloc(&h, Transport::Tcp, AllocResult::Quota), 1);
    assert_eq!(stats_alloc(&h, Transport::Udp, AllocResult::Quota), 0);
}

#[test]
fn tcp_and_udp_from_one_address_are_two_allocations() {
    let mut h = Harness::new();
    let udp = h.allocated(46000);
    let tcp_c = tcp_allocated(&mut h, 46000);
    assert_ne!(udp.relay(), tcp_c.relay());
    assert_eq!(h.server.allocations(), 2);
    assert_eq!(h.server.allocations_by_transport(), [1, 1, 0]);
    // Closing the TCP connection leaves the UDP allocation alone.
    let outs = h.connection_closed(h.at(1), tcp_c.five);
    assert_eq!(releases(&outs), vec![tcp_c.relay()]);
    assert_eq!(h.server.allocations_by_transport(), [1, 0, 0]);
    assert_eq!(
        class_of(&h.create_permission(h.at(2), &udp, &[PEER_A])),
        Class::Success
    );
}

#[test]
fn connection_closed_deletes_the_allocation_and_releases_quota_once() {
    let mut h = Harness::new();
    let c = tcp_allocated(&mut h, 46000);
    let other = h.allocated_as(h.t0, 46001, Creds::bob());
    assert_eq!(h.quotas().total(), 2);
    let outs = h.connection_closed(h.at(5), c.five);
    assert_eq!(releases(&outs), vec![c.relay()]);
    assert_eq!(
        events(&outs),
        vec![Event::AllocationDeleted {
            client: c.five.client,
            reason: DeleteReason::ConnectionClosed
        }]
    );
    assert!(transmits(&outs).is_empty());
    assert_eq!(h.stats().deleted[DeleteReason::ConnectionClosed.index()], 1);
    assert_eq!(h.stats().deleted.iter().sum::<u64>(), 1);
    assert_eq!(h.server.allocations(), 1);
    assert_eq!(h.quotas().total(), 1);
    assert_eq!(h.quotas().user("alice"), 0);
    assert_eq!(h.quotas().user("bob"), 1);

    // A second close (or a close of a connection without allocation) does nothing.
    assert!(h.connection_closed(h.at(6), c.five).is_empty());
    assert!(h.connection_closed(h.at(6), tcp(46999)).is_empty());
    assert_eq!(h.stats().deleted.iter().sum::<u64>(), 1);
    assert_eq!(h.quotas().total(), 1);
    assert_eq!(h.quotas().user("alice"), 0);

    // The timer of the deleted allocation finds nothing, and its relay id is dead.
    let outs = h.timeout(h.at(700));
    assert_eq!(releases(&outs), vec![other.relay()], "only bob's expires");
    assert_eq!(
        events(&outs),
        vec![Event::AllocationDeleted {
            client: other.five.client,
            reason: DeleteReason::Expired
        }]
    );
    assert!(h.peer_sends(h.at(700), c.relay(), PEER_A, b"x").is_empty());
    assert_eq!(h.quotas().total(), 0);
    assert_eq!(h.stats().deleted[DeleteReason::ConnectionClosed.index()], 1);
}

#[test]
fn connection_closed_releases_both_relays_of_a_dual_allocation() {
    let mut h = dual_harness();
    let mut c = Client::on(tcp(46000), Creds::alice());
    h.allocate_with(h.t0, &mut c, |r| r.additional_family(FAMILY_V6));
    let outs = h.connection_closed(h.at(1), c.five);
    assert_eq!(releases(&outs), c.relays);
    assert_eq!(releases(&outs).len(), 2);
    assert_eq!(h.quotas().total(), 0);
}

/// What a driver does with one turn's outputs: takes them in order, binding as it goes (the
/// result goes straight back to the core); returns the binds and releases, in order.
fn drive_binds(h: &mut Harness, now: std::time::Instant) -> Vec<Out> {
    let mut seen = Vec::new();
    let mut port = 50100;
    while let Some(o) = h.server.poll_output() {
        match o {
            Output::BindRelay(req) => {
                seen.push(Out::Bind(req));
                port += 1;
                let bound = SocketAddr::new(req.ip, port);
                h.server.handle_relay_bound(now, req.relay, Ok(bound));
            }
            Output::ReleaseRelay(id) => seen.push(Out::Release(id)),
            _ => {}
        }
    }
    seen
}

#[test]
fn a_socket_bound_for_an_allocation_deleted_meanwhile_is_released_before_the_next_bind() {
    // One driver turn reads X's Allocate, X's connection closing and Y's Allocate before it
    // takes the outputs. Y's allocation reuses X's slot, so its relay has X's relay index: X's
    // socket must be given back before Y's is bound there, or the driver loses it (its port
    // and task) for good.
    let mut h = Harness::new();
    let (mut x, mut y) = (
        Client::on(tcp(46000), Creds::alice()),
        Client::on(tcp(46001), Creds::bob()),
    );
    h.fetch_nonce(h.t0, &mut x);
    h.fetch_nonce(h.t0, &mut y);
    let now = h.at(1);
    let allocate = |c: &Client| c.req_with(method::ALLOCATE, |r| r.transport(UDP)).encode();
    h.server.handle_client(now, x.five, &allocate(&x));
    h.server.handle_connection_closed(now, x.five);
    h.server.handle_client(now, y.five, &allocate(&y));
    let seen = drive_binds(&mut h, now);
    let [Out::Bind(bx), Out::Release(released), Out::Bind(by)] = seen.as_slice() else {
        panic!("expected bind X, release X, bind Y: {seen:?}")
    };
    assert_eq!(*released, bx.relay);
    assert_eq!(by.relay.index(), bx.relay.index(), "Y reuses X's slot");
    assert_ne!(by.relay, bx.relay);
    assert_eq!(h.server.allocations(), 1);
}

#[test]
fn connection_closed_between_the_two_binds_of_a_dual_allocation() {
    let mut h = dual_harness();
    h.bind_mode = BindMode::Manual;
    let mut c = Client::on(tcp(46000), Creds::alice());
    let b = binds(&send_allocate(&mut h, &mut c, |r| {
        r.additional_family(FAMILY_V6)
    }));
    assert!(h
        .relay_bound(h.at(1), b[0].relay, Ok(SocketAddr::new(RELAY_IP, 50001)))
        .is_empty());
    // The bound IPv4 socket goes now, the IPv6 one when the driver reports it.
    let outs = h.connection_closed(h.at(2), c.five);
    assert_eq!(releases(&outs), vec![b[0].relay]);
    assert_eq!(h.quotas().total(), 0);
    let outs = h.relay_bound(h.at(3), b[1].relay, Ok(SocketAddr::new(RELAY_IP6, 50002)));
    assert_eq!(outs, vec![Out::Release(b[1].relay)]);
    // A failed bind of a deleted allocation has nothing to release.
    let mut d = Client::on(tcp(46001), Creds::bob());
    let b = binds(&send_allocate(&mut h, &mut d, |r| {
        r.additional_family(FAMILY_V6)
    }));
    h.connection_closed(h.at(4), d.five);
    assert!(h
        .relay_bound(h.at(5), b[0].relay, Err(BindError::System))
        .is_empty());
    assert_eq!(
        h.relay_bound(h.at(5), b[1].relay, Ok(SocketAddr::new(RELAY_IP6, 50003))),
        vec![Out::Release(b[1].relay)]
    );
    assert_eq!(h.server.allocations(), 0);
    assert_eq!(h.quotas().total(), 0);
}

#[test]
fn connection_closed_while_binding_releases_the_socket_when_it_is_bound() {
    let mut h = Harness::new();
    h.bind_mode = BindMode::Manual;
    let mut c = Client::on(tcp(46000), Creds::alice());
    let outs = send_allocate(&mut h, &mut c, |r| r);
    let relay = binds(&outs)[0].relay;
    assert_eq!(h.quotas().total(), 1);
    let outs = h.connection_closed(h.at(1), c.five);
    assert!(releases(&outs).is_empty(), "not bound yet: {outs:?}");
    assert_eq!(h.server.allocations(), 0);
    assert_eq!(h.quotas().total(), 0);
    let outs = h.relay_bound(h.at(2), relay, Ok(SocketAddr::new(RELAY_IP, 50001)));
    assert_eq!(releases(&outs), vec![relay]);
    assert!(transmits(&outs).is_empty(), "nobody to answer: {outs:?}");
    assert_eq!(h.quotas().total(), 0);
}

#[test]
fn binding_requests_are_counted_by_transport() {
    let mut h = Harness::new();
    for (t, n) in [
        (Transport::Tcp, 2),
        (Transport::Tls, 1),
        (Transport::Udp, 3),
    ] {
        for _ in 0..n {
            let resp = h.transact(
                h.t0,
                five_on(46000, t),
                &Request::new(method::BINDING).encode(),
            );
            assert_eq!(class_of(&resp), Class::Success);
        }
    }
    let mut want = [0; Transport::COUNT];
    want[Transport::Tcp.index()] = 2;
    want[Transport::Tls.index()] = 1;
    want[Transport::Udp.index()] = 3;
    assert_eq!(h.stats().binding_requests, want);
}

#[test]
fn transport_labels() {
    assert_eq!(
        Transport::ALL,
        &[Transport::Udp, Transport::Tcp, Transport::Tls]
    );
    assert_eq!(Transport::COUNT, 3);
    assert!(!Transport::Udp.is_stream());
    assert!(Transport::Tcp.is_stream());
    assert!(Transport::Tls.is_stream());
    for (i, t) in Transport::ALL.iter().enumerate() {
        assert_eq!(t.index(), i);
    }
}

/// A stream driver: buffers what the connection delivers and hands complete frames to the core.
#[derive(Default)]
struct Conn {
    buf: Vec<u8>,
}

impl Conn {
    fn feed(&mut self, h: &mut Harness, secs: u64, five: FiveTuple, bytes: &[u8]) -> Vec<Out> {
        self.buf.extend_from_slice(bytes);
        let mut outs = Vec::new();
        while let Some(n) = stream_frame_len(&self.buf, MAX_FRAME).unwrap() {
            let frame: Vec<u8> = self.buf.drain(..n).collect();
            outs.extend(h.client_sends(h.at(secs), five, &frame));
        }
        outs
    }
}

#[test]
fn a_byte_stream_cut_with_stream_frame_len_drives_a_tcp_allocation() {
    let mut h = Harness::new();
    let mut c = Client::on(tcp(46000), Creds::alice());
    let mut conn = Conn::default();
    // The 401 round trip, delivered a byte at a time.
    let first = Request::allocate().encode();
    let mut outs = Vec::new();
    for b in &first {
        outs.extend(conn.feed(&mut h, 0, c.five, std::slice::from_ref(b)));
    }
    let resp = response_to(&outs, c.five);
    assert_eq!(error_code(&resp), Some(401));
    c.nonce = nonce_of(&resp).unwrap();
    // Allocate, CreatePermission and ChannelBind in one segment, ChannelData in the next.
    let mut segment = c.req_with(method::ALLOCATE, |r| r.transport(UDP)).encode();
    segment.extend(
        c.req_with(method::CREATE_PERMISSION, |r| r.peer(PEER_A))
            .encode(),
    );
    segment.extend(
        c.req_with(method::CHANNEL_BIND, |r| r.channel(0x4000).peer(PEER_B))
            .encode(),
    );
    let mut cd = channel_data(0x4000, b"abcde");
    cd.extend_from_slice(&[0, 0, 0]);
    segment.extend_from_slice(&cd[..6]);
    let outs = conn.feed(&mut h, 1, c.five, &segment);
    let relay = binds(&outs)[0].relay;
    let ts = transmits(&outs);
    assert_eq!(ts.len(), 3, "{outs:?}");
    for (dest, bytes) in &ts {
        assert_eq!(*dest, Dest::Client(c.five));
        assert_eq!(class_of(bytes), Class::Success);
    }
    assert_eq!(conn.buf.len(), 6, "half a ChannelData waits for the rest");
    let outs = conn.feed(&mut h, 1, c.five, &cd[6..]);
    assert_eq!(
        transmits(&outs),
        vec![(
            Dest::Peer {
                relay,
                peer: PEER_B
            },
            b"abcde".to_vec()
        )]
    );
    assert!(conn.buf.is_empty());
}

// ==== stream_frame_len ====

fn binding_request(tid: u8) -> Vec<u8> {
    Request::new(method::BINDING)
        .tid([tid; 12])
        .attr(attr::SOFTWARE, b"split me")
        .fingerprint()
        .encode()
}

#[test]
fn stun_message_split_at_every_byte_is_incomplete_until_whole() {
    let m = binding_request(1);
    assert!(m.len() > 20);
    for cut in 0..m.len() {
        assert_eq!(
            stream_frame_len(&m[..cut], MAX_FRAME),
            Ok(None),
            "cut {cut}"
        );
    }
    assert_eq!(stream_frame_len(&m, MAX_FRAME), Ok(Some(m.len())));
}

#[test]
fn channel_data_split_at_every_byte_is_incomplete_until_padded_end() {
    let mut cd = channel_data(0x4ABC, b"hello");
    cd.extend_from_slice(&[0, 0, 0]);
    for cut in 0..cd.len() {
        assert_eq!(
            stream_frame_len(&cd[..cut], MAX_FRAME),
            Ok(None),
            "cut {cut}"
        );
    }
    assert_eq!(stream_frame_len(&cd, MAX_FRAME), Ok(Some(12)));
}

#[test]
fn back_to_back_messages_yield_the_first_length_only() {
    let a = binding_request(1);
    let b = Request::new(method::BINDING).tid([2; 12]).encode();
    let mut both = a.clone();
    both.extend_from_slice(&b);
    assert_eq!(stream_frame_len(&both, MAX_FRAME), Ok(Some(a.len())));
    assert_eq!(
        stream_frame_len(&both[a.len()..], MAX_FRAME),
        Ok(Some(b.len()))
    );
    // Also when only the first byte of the second has arrived.
    assert_eq!(
        stream_frame_len(&both[..a.len() + 1], MAX_FRAME),
        Ok(Some(a.len()))
    );
}

#[test]
fn channel_data_then_stun_in_one_buffer() {
    let mut buf = channel_data(0x4000, b"abcdef");
    buf.extend_from_slice(&[0, 0]);
    let stun = binding_request(3);
    buf.extend_from_slice(&stun);
    assert_eq!(stream_frame_len(&buf, MAX_FRAME), Ok(Some(12)));
    assert_eq!(
        stream_frame_len(&buf[12..], MAX_FRAME),
        Ok(Some(stun.len()))
    );
    assert_eq!(
        stun::parse_channel_data(&buf[..12]),
        Some((0x4000, &b"abcdef"[..]))
    );
}

/// A STUN header declaring `len` bytes of attributes.
fn stun_header(len: u16) -> Vec<u8> {
    let mut h = vec![0x00, 0x01];
    h.extend_from_slice(&len.to_be_bytes());
    h.extend_from_slice(&MAGIC_COOKIE.to_be_bytes());
    h.extend_from_slice(&[7; 12]);
    h
}

#[test]
fn largest_stun_message_needs_more_bytes_under_a_large_enough_max() {
    // 0xFFFC is the largest length a STUN header can declare (a multiple of four): 65 552 bytes.
    let hdr = stun_header(0xFFFC);
    assert_eq!(stream_frame_len(&hdr, 65_552), Ok(None));
    assert_eq!(stream_frame_len(&hdr[..4], 65_552), Ok(None));
    let mut whole = hdr.clone();
    whole.resize(65_552, 0);
    assert_eq!(stream_frame_len(&whole, 65_552), Ok(Some(65_552)));
    assert_eq!(
        stream_frame_len(&whole, 65_551),
        Err(StreamError::TooLarge(65_552))
    );
}

#[test]
fn largest_stun_message_is_too_large_under_a_small_max() {
    let hdr = stun_header(0xFFFC);
    assert_eq!(
        stream_frame_len(&hdr, 1000),
        Err(StreamError::TooLarge(65_552))
    );
    // Judged as soon as the length field is in, before the rest of the header.
    assert_eq!(
        stream_frame_len(&hdr[..4], 1000),
        Err(StreamError::TooLarge(65_552))
    );
}

#[test]
fn stun_length_of_65535_is_a_bad_header() {
    // Not a multiple of four: no STUN message can declare it.
    assert_eq!(
        stream_frame_len(&stun_header(0xFFFF), 65_552),
        Err(StreamError::BadHeader)
    );
    assert_eq!(
        stream_frame_len(&stun_header(0xFFFF)[..4], 65_552),
        Err(StreamError::BadHeader)
    );
}

#[test]
fn stun_with_a_wrong_cookie_is_a_bad_header() {
    let mut m = binding_request(1);
    m[7] ^= 1;
    assert_eq!(stream_frame_len(&m, MAX_FRAME), Err(StreamError::BadHeader));
}

#[test]
fn largest_channel_data_is_judged_against_max() {
    let hdr = [0x4F, 0xFF, 0xFF, 0xFF];
    assert_eq!(stream_frame_len(&hdr, 4 + 65_536), Ok(None));
    assert_eq!(
        stream_frame_len(&hdr, MAX_FRAME - 100),
        Err(StreamError::TooLarge(4 + 65_536))
    );
}

#[test]
fn garbage_first_byte_is_not_turn() {
    for first in [0x04u8, 0x16, 0x3F, 0x50, 0x7F, 0x80, 0xC0, 0xFF] {
        assert_eq!(
            stream_frame_len(&[first], MAX_FRAME),
            Err(StreamError::NotTurn),
            "{first:#04x}"
        );
        assert_eq!(
            stream_frame_len(&[first, 0, 0, 0, 0, 0, 0, 0], MAX_FRAME),
            Err(StreamError::NotTurn)
        );
    }
    // A TLS ClientHello on a plain TCP listener.
    assert_eq!(
        stream_frame_len(&[0x16, 0x03, 0x01, 0x02, 0x00], MAX_FRAME),
        Err(StreamError::NotTurn)
    );
}

#[test]
fn empty_buffer_needs_more() {
    assert_eq!(stream_frame_len(&[], MAX_FRAME), Ok(None));
    assert_eq!(stream_frame_len(&[], 0), Ok(None));
}

// ==== proptest: any split of valid frames re-assembles into exactly those frames ====

/// A valid stream frame: a STUN message (random type and body, right length and cookie) or a
/// ChannelData message padded to four bytes.
fn frame() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        (
            0u16..0x0400,
            any::<[u8; 12]>(),
            prop::collection::vec(any::<u8>(), 0..30)
        )
            .prop_map(|(typ, tid, body)| {
                let mut m = typ.to_be_bytes().to_vec();
                let len = (body.len() * 4) as u16;
                m.extend_from_slice(&len.to_be_bytes());
                m.extend_from_slice(&MAGIC_COOKIE.to_be_bytes());
                m.extend_from_slice(&tid);
                for b in body {
                    m.extend_from_slice(&[b; 4]);
                }
                m
            }),
        (
            0x4000u16..=0x4FFF,
            prop::collection::vec(any::<u8>(), 0..70)
        )
            .prop_map(|(number, data)| {
                let mut cd = channel_data(number, &data);
                cd.resize(cd.len().next_multiple_of(4), 0);
                cd
            }),
        any::<[u8; 12]>().prop_map(|tid| {
            let mut m = Vec::new();
            Encoder::new(&mut m, method::BINDING, Class::Request, tid).finish();
            m
        }),
    ]
}

/// The reassembly loop of a stream driver: frames cut from `chunks` delivered in order.
fn reassemble(chunks: &[&[u8]], max: usize) -> Result<(Vec<Vec<u8>>, Vec<u8>), StreamError> {
    let mut buf = Vec::new();
    let mut frames = Vec::new();
    for chunk in chunks {
        buf.extend_from_slice(chunk);
        while let Some(n) = stream_frame_len(&buf, max)? {
            assert!(n > 0 && n <= max && n <= buf.len());
            frames.push(buf.drain(..n).collect());
        }
    }
    Ok((frames, buf))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn any_split_of_valid_frames_reassembles_exactly(
        frames in prop::collection::vec(frame(), 0..8),
        cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..20),
    ) {
        let stream: Vec<u8> = frames.concat();
        let mut at: Vec<usize> = cuts.iter().map(|i| i.index(stream.len() + 1)).collect();
        at.push(0);
        at.push(stream.len());
        at.sort_unstable();
        at.dedup();
        let chunks: Vec<&[u8]> = at.windows(2).map(|w| &stream[w[0]..w[1]]).collect();
        let (got, rest) = reassemble(&chunks, MAX_FRAME).unwrap();
        prop_assert_eq!(got, frames);
        prop_assert!(rest.is_empty());
    }

    #[test]
    fn a_truncated_stream_yields_a_prefix_of_its_frames(
        frames in prop::collection::vec(frame(), 1..6),
        keep in any::<prop::sample::Index>(),
    ) {
        let stream: Vec<u8> = frames.concat();
        let keep = keep.index(stream.len());
        let (got, rest) = reassemble(&[&stream[..keep]], MAX_FRAME).unwrap();
        prop_assert!(got.len() < frames.len());
        prop_assert_eq!(&got[..], &frames[..got.len()]);
        prop_assert_eq!(got.concat().len() + rest.len(), keep);
    }
}
