//! The TURN state machine with a virtual clock: allocations, refreshes, permissions, channels,
//! relaying in both directions, retransmissions, quota release. One behaviour per test.
#![allow(clippy::unwrap_used)]

mod common;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use relay_proto::stun::{attr, method, Class};
use relay_proto::{
    AllocResult, AuthFailure, BindError, DeleteReason, Dest, Direction, DropReason, Event, Family,
    Quotas, Transport,
};

use common::*;

// ---- Binding ----

#[test]
fn binding_returns_client_address_in_xor_mapped_address() {
    let mut h = Harness::new();
    let resp = h.transact(h.t0, five(41000), &Request::new(method::BINDING).encode());
    assert_eq!(class_of(&resp), Class::Success);
    assert_eq!(method_of(&resp), method::BINDING);
    assert_eq!(
        xor_addr(&resp, attr::XOR_MAPPED_ADDRESS),
        Some(SocketAddr::new(CLIENT_IP, 41000))
    );
    assert_eq!(h.stats().binding_requests[Transport::Udp.index()], 1);
    assert_eq!(h.stats().binding_requests.iter().sum::<u64>(), 1);
}

#[test]
fn binding_response_keeps_transaction_id() {
    let mut h = Harness::new();
    let req = Request::new(method::BINDING);
    let resp = h.transact(h.t0, five(41000), &req.encode());
    assert_eq!(parse(&resp).transaction_id(), req.transaction_id());
}

#[test]
fn binding_with_fingerprint_is_answered_with_fingerprint() {
    let mut h = Harness::new();
    let with = h.transact(
        h.t0,
        five(41000),
        &Request::new(method::BINDING).fingerprint().encode(),
    );
    let without = h.transact(h.t0, five(41000), &Request::new(method::BINDING).encode());
    assert!(parse(&with).has_fingerprint());
    assert!(!parse(&without).has_fingerprint());
}

#[test]
fn binding_ipv6_client_gets_ipv6_mapped_address() {
    let mut h = Harness::new();
    let client: SocketAddr = "[2001:db8::77]:41001".parse().unwrap();
    let five = relay_proto::FiveTuple {
        client,
        server: "[2001:db8::1]:3478".parse().unwrap(),
        transport: relay_proto::Transport::Udp,
    };
    let resp = h.transact(h.t0, five, &Request::new(method::BINDING).encode());
    assert_eq!(xor_addr(&resp, attr::XOR_MAPPED_ADDRESS), Some(client));
}

// ---- Allocate ----

#[test]
fn allocate_without_credentials_gets_401_with_realm_and_nonce() {
    let mut h = Harness::new();
    let resp = h.transact(h.t0, five(41000), &Request::allocate().encode());
    assert_eq!(error_code(&resp), Some(401));
    assert_eq!(attr_value(&resp, attr::REALM).unwrap(), REALM.as_bytes());
    assert_eq!(nonce_of(&resp).unwrap().len(), relay_proto::auth::NONCE_LEN);
    assert_eq!(attr_value(&resp, attr::MESSAGE_INTEGRITY), None);
    assert_eq!(h.stats().auth_failures[AuthFailure::Missing.index()], 1);
    assert_eq!(
        h.stats().allocations[Transport::Udp.index()][AllocResult::Unauthenticated.index()],
        1
    );
    assert_eq!(h.server.allocations(), 0);
}

#[test]
fn allocate_success_carries_relayed_lifetime_and_mapped() {
    let mut h = Harness::new();
    let mut c = Client::new(41000, Creds::alice());
    let resp = h.allocate(h.t0, &mut c);
    assert_eq!(
        xor_addr(&resp, attr::XOR_RELAYED_ADDRESS),
        Some(SocketAddr::new(RELAY_IP, RELAY_PORT_BASE))
    );
    assert_eq!(lifetime_of(&resp), Some(600));
    assert_eq!(
        xor_addr(&resp, attr::XOR_MAPPED_ADDRESS),
        Some(SocketAddr::new(CLIENT_IP, 41000))
    );
}

#[test]
fn allocate_success_is_signed_with_the_long_term_key() {
    let mut h = Harness::new();
    let mut c = Client::new(41000, Creds::alice());
    let resp = h.allocate(h.t0, &mut c);
    assert!(verifies(&resp, &c.creds.key));
    assert!(!verifies(&resp, &Creds::bob().key));
}

#[test]
fn allocate_success_carries_software() {
    let mut h = Harness::new();
    let mut c = Client::new(41000, Creds::alice());
    let resp = h.allocate(h.t0, &mut c);
    let sw = attr_value(&resp, attr::SOFTWARE).unwrap();
    assert!(sw.starts_with(b"turnpike "), "{sw:?}");
}

#[test]
fn allocate_success_is_counted() {
    let mut h = Harness::new();
    let _c = h.allocated(41000);
    assert_eq!(
        h.stats().allocations[Transport::Udp.index()][AllocResult::Ok.index()],
        1
    );
    // The 401 round trip before it is counted as well.
    assert_eq!(
        h.stats().allocations[Transport::Udp.index()][AllocResult::Unauthenticated.index()],
        1
    );
    assert_eq!(h.server.allocations(), 1);
    assert_eq!(h.quotas().total(), 1);
    assert_eq!(h.quotas().user("alice"), 1);
}

#[test]
fn allocate_asks_driver_to_bind_on_relay_ip() {
    let mut h = Harness::new();
    h.bind_mode = BindMode::Manual;
    let mut c = Client::new(41000, Creds::alice());
    h.fetch_nonce(h.t0, &mut c);
    let outs = h.client_sends(
        h.t0,
        c.five,
        &c.req_with(method::ALLOCATE, |r| r.transport(UDP)).encode(),
    );
    let b = binds(&outs);
    assert_eq!(b.len(), 1);
    assert_eq!(b[0].ip, RELAY_IP);
    // Not answered until the socket is bound.
    assert!(transmits(&outs).is_empty());
    assert_eq!(h.server.allocations(), 1);
}

#[test]
fn allocate_without_even_port_asks_for_any_port() {
    let mut h = Harness::new();
    let mut c = Client::new(41000, Creds::alice());
    h.fetch_nonce(h.t0, &mut c);
    let outs = h.client_sends(
        h.t0,
        c.five,
        &c.req_with(method::ALLOCATE, |r| r.transport(UDP)).encode(),
    );
    assert!(!binds(&outs)[0].even_port);
}

#[test]
fn allocate_with_even_port_asks_for_even_port() {
    let mut h = Harness::new();
    let mut c = Client::new(41000, Creds::alice());
    h.fetch_nonce(h.t0, &mut c);
    let req = c.req_with(method::ALLOCATE, |r| {
        r.transport(UDP).attr(attr::EVEN_PORT, &[0x00])
    });
    let outs = h.client_sends(h.t0, c.five, &req.encode());
    assert!(binds(&outs)[0].even_port);
    assert_eq!(class_of(&response_to(&outs, c.five)), Class::Success);
}

#[test]
fn allocate_is_answered_when_relay_is_bound() {
    let mut h = Harness::new();
    h.bind_mode = BindMode::Manual;
    let mut c = Client::new(41000, Creds::alice());
    h.fetch_nonce(h.t0, &mut c);
    let outs = h.client_sends(
        h.t0,
        c.five,
        &c.req_with(method::ALLOCATE, |r| r.transport(UDP)).encode(),
    );
    let relay = binds(&outs)[0].relay;
    let relayed: SocketAddr = "203.0.113.10:61234".parse().unwrap();
    let outs = h.relay_bound(h.at(2), relay, Ok(relayed));
    let resp = response_to(&outs, c.five);
    assert_eq!(class_of(&resp), Class::Success);
    assert_eq!(xor_addr(&resp, attr::XOR_RELAYED_ADDRESS), Some(relayed));
    // Two seconds of the lifetime went by while binding.
    assert_eq!(lifetime_of(&resp), Some(598));
}

#[test]
fn allocate_emits_allocation_created_event() {
    let mut h = Harness::new();
    let mut c = Client::new(41000, Creds::alice());
    h.fetch_nonce(h.t0, &mut c);
    let outs = h.client_sends(
        h.t0,
        c.five,
        &c.req_with(method::ALLOCATE, |r| r.transport(UDP)).encode(),
    );
    assert_eq!(binds(&outs).len(), 1);
    assert_eq!(binds(&outs)[0].relay.family(), Family::V4);
    assert_eq!(
        events(&outs),
        vec![Event::AllocationCreated {
            client: c.five.client,
            relayed: SocketAddr::new(RELAY_IP, RELAY_PORT_BASE),
            lifetime: Duration::from_secs(600),
        }]
    );
}

#[test]
fn allocate_advertises_external_ip() {
    let ext = IpAddr::V4(Ipv4Addr::new(8, 8, 4, 4));
    let mut h = Harness::with(|c| c.external_ips.v4 = Some(ext));
    let mut c = Client::new(41000, Creds::alice());
    let resp = h.allocate(h.t0, &mut c);
    assert_eq!(
        xor_addr(&resp, attr::XOR_RELAYED_ADDRESS),
        Some(SocketAddr::new(ext, RELAY_PORT_BASE))
    );
}

#[test]
fn two_clients_get_two_relays() {
    let mut h = Harness::new();
    let a = h.allocated(41000);
    let b = h.allocated(41001);
    assert_ne!(a.relay(), b.relay());
    assert_eq!(a.relayed, Some(SocketAddr::new(RELAY_IP, RELAY_PORT_BASE)));
    assert_eq!(
        b.relayed,
        Some(SocketAddr::new(RELAY_IP, RELAY_PORT_BASE + 1))
    );
    assert_eq!(h.server.allocations(), 2);
    assert_eq!(h.quotas().user("alice"), 2);
}

#[test]
fn allocate_lifetime_max_u32_is_clamped_to_max_lifetime() {
    let mut h = Harness::new();
    let mut c = Client::new(41000, Creds::alice());
    h.fetch_nonce(h.t0, &mut c);
    let req = c.req_with(method::ALLOCATE, |r| r.transport(UDP).lifetime(u32::MAX));
    let resp = h.transact(h.t0, c.five, &req.encode());
    assert_eq!(lifetime_of(&resp), Some(3600));
    assert_eq!(h.server.poll_timeout(), Some(h.at(3600)));
}

#[test]
fn allocate_lifetime_below_default_is_raised_to_default() {
    let mut h = Harness::new();
    let mut c = Client::new(41000, Creds::alice());
    h.fetch_nonce(h.t0, &mut c);
    let req = c.req_with(method::ALLOCATE, |r| r.transport(UDP).lifetime(30));
    let resp = h.transact(h.t0, c.five, &req.encode());
    assert_eq!(lifetime_of(&resp), Some(600));
}

#[test]
fn allocate_lifetime_between_default_and_max_is_granted() {
    let mut h = Harness::new();
    let mut c = Client::new(41000, Creds::alice());
    h.fetch_nonce(h.t0, &mut c);
    let req = c.req_with(method::ALLOCATE, |r| r.transport(UDP).lifetime(1200));
    let resp = h.transact(h.t0, c.five, &req.encode());
    assert_eq!(lifetime_of(&resp), Some(1200));
}

#[test]
fn allocate_response_has_fingerprint_iff_request_had() {
    let mut h = Harness::new();
    let mut c = Client::new(41000, Creds::alice());
    h.fetch_nonce(h.t0, &mut c);
    let req = c
        .req_with(method::ALLOCATE, |r| r.transport(UDP))
        .fingerprint();
    let resp = h.transact(h.t0, c.five, &req.encode());
    assert_eq!(class_of(&resp), Class::Success);
    assert!(parse(&resp).has_fingerprint());
    assert!(verifies(&resp, &c.creds.key));
}

// ---- Expiry ----

#[test]
fn allocation_timer_is_due_at_lifetime() {
    let mut h = Harness::new();
    let _c = h.allocated(41000);
    assert_eq!(h.server.poll_timeout(), Some(h.at(600)));
}

#[test]
fn allocation_survives_until_lifetime() {
    let mut h = Harness::new();
    let _c = h.allocated(41000);
    let outs = h.timeout(h.at(599));
    assert!(outs.is_empty(), "{outs:?}");
    assert_eq!(h.server.allocations(), 1);
}

#[test]
fn allocation_lives_exactly_its_lifetime() {
    // Like permissions and channels, an allocation is gone at its deadline, not a tick later.
    let mut h = Harness::new();
    let c = h.allocated(41000);
    let outs = h.timeout(h.at(600));
    assert_eq!(releases(&outs), vec![c.relay()]);
}

#[test]
fn allocation_expires_after_lifetime() {
    let mut h = Harness::new();
    let c = h.allocated(41000);
    let outs = h.timeout(h.at(601));
    assert_eq!(releases(&outs), vec![c.relay()]);
    assert_eq!(
        events(&outs),
        vec![Event::AllocationDeleted {
            client: c.five.client,
            reason: DeleteReason::Expired
        }]
    );
    assert_eq!(h.server.allocations(), 0);
    assert_eq!(h.stats().deleted[DeleteReason::Expired.index()], 1);
}

#[test]
fn expired_allocation_drops_peer_data() {
    let mut h = Harness::new();
    let c = h.allocated(41000);
    h.create_permission(h.t0, &c, &[PEER_A]);
    h.timeout(h.at(601));
    let outs = h.peer_sends(h.at(602), c.relay(), PEER_A, b"late");
    assert!(outs.is_empty());
    assert_eq!(h.stats().dropped[DropReason::NoAllocation.index()], 1);
}

// ---- Refresh ----

#[test]
fn refresh_extends_allocation() {
    let mut h = Harness::new();
    let c = h.allocated(41000);
    let resp = h.refresh(h.at(500), &c, None);
    assert_eq!(class_of(&resp), Class::Success);
    assert_eq!(lifetime_of(&resp), Some(600));
    assert!(h.timeout(h.at(601)).is_empty());
    assert_eq!(h.server.allocations(), 1);
    let outs = h.timeout(h.at(1101));
    assert_eq!(releases(&outs), vec![c.relay()]);
    assert_eq!(h.server.allocations(), 0);
}

#[test]
fn refresh_lifetime_is_clamped_to_max() {
    let mut h = Harness::new();
    let c = h.allocated(41000);
    let resp = h.refresh(h.at(10), &c, Some(u32::MAX));
    assert_eq!(lifetime_of(&resp), Some(3600));
    assert!(h.timeout(h.at(3609)).is_empty());
    assert_eq!(releases(&h.timeout(h.at(3611))), vec![c.relay()]);
}

#[test]
fn refresh_lifetime_below_default_is_raised_to_default() {
    // RFC 8656 §7.3: the desired lifetime is the default when the (clamped) request is lower.
    let mut h = Harness::new();
    let c = h.allocated(41000);
    let resp = h.refresh(h.at(10), &c, Some(30));
    assert_eq!(lifetime_of(&resp), Some(600));
    assert!(h.timeout(h.at(50)).is_empty());
    assert_eq!(h.server.allocations(), 1);
}

#[test]
fn refresh_success_is_signed() {
    let mut h = Harness::new();
    let c = h.allocated(41000);
    let resp = h.refresh(h.at(10), &c, None);
    assert!(verifies(&resp, &c.creds.key));
}

#[test]
fn refresh_lifetime_zero_deletes_allocation() {
    let mut h = Harness::new();
    let c = h.allocated(41000);
    let req = c.req_with(method::REFRESH, |r| r.lifetime(0));
    let outs = h.client_sends(h.at(5), c.five, &req.encode());
    let resp = response_to(&outs, c.five);
    assert_eq!(class_of(&resp), Class::Success);
    assert_eq!(lifetime_of(&resp), Some(0));
    assert_eq!(releases(&outs), vec![c.relay()]);
    assert_eq!(
        events(&outs),
        vec![Event::AllocationDeleted {
            client: c.five.client,
            reason: DeleteReason::Client
        }]
    );
    assert_eq!(h.server.allocations(), 0);
    assert_eq!(h.stats().deleted[DeleteReason::Client.index()], 1);
}

#[test]
fn refresh_delete_retransmission_gets_same_bytes() {
    let mut h = Harness::new();
    let c = h.allocated(41000);
    let req = c.req_with(method::REFRESH, |r| r.lifetime(0)).encode();
    let first = h.transact(h.at(5), c.five, &req);
    let outs = h.client_sends(h.at(6), c.five, &req);
    assert_eq!(response_to(&outs, c.five), first);
    // No second deletion.
    assert!(releases(&outs).is_empty());
    assert_eq!(h.stats().deleted[DeleteReason::Client.index()], 1);
}

#[test]
fn refresh_after_delete_with_new_transaction_is_437() {
    let mut h = Harness::new();
    let c = h.allocated(41000);
    h.refresh(h.at(5), &c, Some(0));
    let resp = h.refresh(h.at(6), &c, Some(0));
    assert_eq!(error_code(&resp), Some(437));
}

#[test]
fn refresh_works_after_credential_expiry() {
    // Credential expiry is checked when allocating only: an allocation made with a credential
    // that expires later can still be refreshed (and deleted).
    let mut h = Harness::new();
    let creds = Creds::rest(SECRET_ONE, "alice", WALL_SECS + 10);
    let c = h.allocated_as(h.t0, 41000, creds);
    let resp = h.refresh(h.at(100), &c, None);
    assert_eq!(class_of(&resp), Class::Success);
}

#[test]
fn refresh_trailing_lifetime_zero_after_integrity_is_ignored() {
    let mut h = Harness::new();
    let c = h.allocated(41000);
    let mut req = c.req(method::REFRESH).encode();
    append_attr(&mut req, attr::LIFETIME, &0u32.to_be_bytes());
    let outs = h.client_sends(h.at(5), c.five, &req);
    let resp = response_to(&outs, c.five);
    assert_eq!(class_of(&resp), Class::Success);
    assert_eq!(lifetime_of(&resp), Some(600));
    assert!(releases(&outs).is_empty());
    assert_eq!(h.server.allocations(), 1);
}

#[test]
fn trailing_attribute_before_fingerprint_is_ignored() {
    // MESSAGE-INTEGRITY, then LIFETIME=0, then a valid FINGERPRINT over all of it.
    let mut h = Harness::new();
    let c = h.allocated(41000);
    let mut req = c.req(method::REFRESH).encode();
    append_attr(&mut req, attr::LIFETIME, &0u32.to_be_bytes());
    let fp_at = req.len();
    append_attr(&mut req, attr::FINGERPRINT, &[0; 4]);
    let crc = crc32fast::hash(&req[..fp_at]) ^ 0x5354_554E;
    req[fp_at + 4..].copy_from_slice(&crc.to_be_bytes());
    let resp = h.transact(h.at(5), c.five, &req);
    assert_eq!(lifetime_of(&resp), Some(600));
    assert!(parse(&resp).has_fingerprint());
    assert_eq!(h.server.allocations(), 1);
}

// ---- Retransmissions ----

#[test]
fn allocate_retransmission_gets_identical_bytes() {
    let mut h = Harness::new();
    let mut c = Client::new(41000, Creds::alice());
    h.fetch_nonce(h.t0, &mut c);
    let req = c.req_with(method::ALLOCATE, |r| r.transport(UDP)).encode();
    let first = h.client_sends(h.t0, c.five, &req);
    let second = h.client_sends(h.at(1), c.five, &req);
    assert_eq!(response_to(&second, c.five), response_to(&first, c.five));
    assert_eq!(binds(&first).len(), 1);
    assert!(binds(&second).is_empty());
    assert_eq!(h.server.allocations(), 1);
    assert_eq!(
        h.stats().allocations[Transport::Udp.index()][AllocResult::Ok.index()],
        1
    );
}

#[test]
fn allocate_retransmission_while_binding_is_dropped() {
    let mut h = Harness::new();
    h.bind_mode = BindMode::Manual;
    let mut c = Client::new(41000, Creds::alice());
    h.fetch_nonce(h.t0, &mut c);
    let req = c.req_with(method::ALLOCATE, |r| r.transport(UDP)).encode();
    h.client_sends(h.t0, c.five, &req);
    let outs = h.client_sends(h.at(1), c.five, &req);
    assert!(outs.is_empty(), "{outs:?}");
    assert_eq!(h.stats().dropped[DropReason::Retransmit.index()], 1);
    assert_eq!(h.server.allocations(), 1);
}

#[test]
fn create_permission_retransmission_gets_identical_bytes() {
    let mut h = Harness::new();
    let c = h.allocated(41000);
    let req = c
        .req_with(method::CREATE_PERMISSION, |r| r.peer(PEER_A))
        .encode();
    let first = h.transact(h.at(1), c.five, &req);
    let second = h.transact(h.at(2), c.five, &req);
    assert_eq!(first, second);
}

// ---- Permissions ----

#[test]
fn create_permission_succeeds_and_is_signed() {
    let mut h = Harness::new();
    let c = h.allocated(41000);
    let resp = h.create_permission(h.at(1), &c, &[PEER_A]);
    assert_eq!(class_of(&resp), Class::Success);
    assert_eq!(method_of(&resp), method::CREATE_PERMISSION);
    assert!(verifies(&resp, &c.creds.key));
}

#[test]
fn peer_data_without_permission_is_dropped() {
    let mut h = Harness::new();
    let c = h.allocated(41000);
    let outs = h.peer_sends(h.at(1), c.relay(), PEER_A, b"hello");
    assert!(outs.is_empty());
    assert_eq!(h.stats().dropped[DropReason::NoPermission.index()], 1);
}

#[test]
fn peer_data_with_permission_is_a_data_indication() {
    let mut h = Harness::new();
    let c = h.allocated(41000);
    h.create_permission(h.at(1), &c, &[PEER_A]);
    let outs = h.peer_sends(h.at(2), c.relay(), PEER_A, b"hello peer");
    let ind = response_to(&outs, c.five);
    assert_eq!(class_of(&ind), Class::Indication);
    assert_eq!(method_of(&ind), method::DATA);
    assert_eq!(xor_addr(&ind, attr::XOR_PEER_ADDRESS), Some(PEER_A));
    assert_eq!(attr_value(&ind, attr::DATA).unwrap(), b"hello peer");
    assert_eq!(
        h.stats().packets[Transport::Udp.index()][Direction::PeerToClient.index()],
        1
    );
    assert_eq!(
        h.stats().bytes[Transport::Udp.index()][Direction::PeerToClient.index()],
        10
    );
}

#[test]
fn permission_covers_every_port_of_the_peer_ip() {
    let mut h = Harness::new();
    let c = h.allocated(41000);
    h.create_permission(h.at(1), &c, &[PEER_A]);
    let other_port = SocketAddr::new(PEER_A.ip(), 9999);
    let outs = h.peer_sends(h.at(2), c.relay(), other_port, b"x");
    let ind = response_to(&outs, c.five);
    assert_eq!(xor_addr(&ind, attr::XOR_PEER_ADDRESS), Some(other_port));
}

#[test]
fn permission_expires_after_permission_lifetime() {
    let mut h = Harness::with(|c| c.permission_lifetime = Duration::from_secs(5));
    let c = h.allocated(41000);
    h.create_permission(h.t0, &c, &[PEER_A]);
    assert_eq!(
        transmits(&h.peer_sends(h.at(4), c.relay(), PEER_A, b"a")).len(),
        1
    );
    h.timeout(h.at(5));
    assert!(h.peer_sends(h.at(6), c.relay(), PEER_A, b"b").is_empty());
    assert_eq!(h.stats().dropped[DropReason::NoPermission.index()], 1);
}

#[test]
fn permission_expiry_leaves_other_permission() {
    let mut h = Harness::with(|c| c.permission_lifetime = Duration::from_secs(5));
    let c = h.allocated(41000);
    h.create_permission(h.t0, &c, &[PEER_A]);
    h.create_permission(h.at(3), &c, &[PEER_B]);
    h.timeout(h.at(6));
    assert!(h.peer_sends(h.at(6), c.relay(), PEER_A, b"a").is_empty());
    let outs = h.peer_sends(h.at(6), c.relay(), PEER_B, b"b");
    assert_eq!(
        xor_addr(&response_to(&outs, c.five), attr::XOR_PEER_ADDRESS),
        Some(PEER_B)
    );
}

#[test]
fn permission_expiry_applies_without_timer() {
    // The data path checks the deadline itself; a late timer does not extend a permission.
    let mut h = Harness::with(|c| c.permission_lifetime = Duration::from_secs(5));
    let c = h.allocated(41000);
    h.create_permission(h.t0, &c, &[PEER_A]);
    assert!(h.peer_sends(h.at(5), c.relay(), PEER_A, b"a").is_empty());
    assert_eq!(h.stats().dropped[DropReason::NoPermission.index()], 1);
}

#[test]
fn create_permission_refreshes_existing_permission() {
    let mut h = Harness::with(|c| c.permission_lifetime = Duration::from_secs(5));
    let c = h.allocated(41000);
    h.create_permission(h.t0, &c, &[PEER_A]);
    h.create_permission(h.at(4), &c, &[PEER_A]);
    h.timeout(h.at(6));
    assert_eq!(
        transmits(&h.peer_sends(h.at(8), c.relay(), PEER_A, b"a")).len(),
        1
    );
}

#[test]
fn permission_timer_is_scheduled() {
    let mut h = Harness::with(|c| c.permission_lifetime = Duration::from_secs(5));
    let c = h.allocated(41000);
    h.create_permission(h.t0, &c, &[PEER_A]);
    assert_eq!(h.server.poll_timeout(), Some(h.at(5)));
    h.timeout(h.at(5));
    assert_eq!(h.server.poll_timeout(), Some(h.at(600)));
}

#[test]
fn create_permission_with_several_peers_installs_all() {
    let mut h = Harness::new();
    let c = h.allocated(41000);
    let resp = h.create_permission(h.at(1), &c, &[PEER_A, PEER_B, PEER_C]);
    assert_eq!(class_of(&resp), Class::Success);
    for p in [PEER_A, PEER_B, PEER_C] {
        assert_eq!(
            transmits(&h.peer_sends(h.at(2), c.relay(), p, b"x")).len(),
            1,
            "{p}"
        );
    }
}

// ---- Send indications ----

#[test]
fn send_indication_with_permission_is_relayed() {
    let mut h = Harness::new();
    let c = h.allocated(41000);
    h.create_permission(h.at(1), &c, &[PEER_A]);
    let outs = h.send_indication(h.at(2), &c, PEER_A, b"to the peer");
    assert_eq!(
        transmits(&outs),
        vec![(
            Dest::Peer {
                relay: c.relay(),
                peer: PEER_A
            },
            b"to the peer".to_vec()
        )]
    );
    assert_eq!(
        h.stats().packets[Transport::Udp.index()][Direction::ClientToPeer.index()],
        1
    );
    assert_eq!(
        h.stats().bytes[Transport::Udp.index()][Direction::ClientToPeer.index()],
        11
    );
}

#[test]
fn send_indication_without_permission_is_dropped() {
    let mut h = Harness::new();
    let c = h.allocated(41000);
    let outs = h.send_indication(h.at(2), &c, PEER_A, b"nope");
    assert!(outs.is_empty());
    assert_eq!(h.stats().dropped[DropReason::NoPermission.index()], 1);
}

#[test]
fn send_indication_without_allocation_is_dropped() {
    let mut h = Harness::new();
    let c = Client::new(41000, Creds::alice());
    let outs = h.send_indication(h.t0, &c, PEER_A, b"nope");
    assert!(outs.is_empty());
    assert_eq!(h.stats().dropped[DropReason::NoAllocation.index()], 1);
}

#[test]
fn send_indication_without_data_is_dropped() {
    let mut h = Harness::new();
    let c = h.allocated(41000);
    h.create_permission(h.at(1), &c, &[PEER_A]);
    let ind = Request::new(method::SEND)
        .class(Class::Indication)
        .peer(PEER_A)
        .encode();
    assert!(h.client_sends(h.at(2), c.five, &ind).is_empty());
    assert_eq!(h.stats().dropped[DropReason::BadIndication.index()], 1);
}

#[test]
fn send_indication_to_denied_peer_is_dropped_and_counted() {
    let mut h = Harness::new();
    let c = h.allocated(41000);
    let outs = h.send_indication(h.at(2), &c, "10.0.0.1:5000".parse().unwrap(), b"x");
    assert!(outs.is_empty());
    assert_eq!(h.stats().dropped[DropReason::DeniedPeer.index()], 1);
    assert_eq!(
        h.stats().peers_denied[relay_proto::DenyReason::Private.index()],
        1
    );
}

// ---- Channels ----

#[test]
fn channel_bind_succeeds_and_is_signed() {
    let mut h = Harness::new();
    let c = h.allocated(41000);
    let resp = h.channel_bind(h.at(1), &c, 0x4000, PEER_A);
    assert_eq!(class_of(&resp), Class::Success);
    assert_eq!(method_of(&resp), method::CHANNEL_BIND);
    assert!(verifies(&resp, &c.creds.key));
}

#[test]
fn channel_data_from_client_goes_to_peer_without_header() {
    let mut h = Harness::new();
    let c = h.allocated(41000);
    h.channel_bind(h.at(1), &c, 0x4000, PEER_A);
    let outs = h.client_sends(h.at(2), c.five, &channel_data(0x4000, b"media"));
    assert_eq!(
        transmits(&outs),
        vec![(
            Dest::Peer {
                relay: c.relay(),
                peer: PEER_A
            },
            b"media".to_vec()
        )]
    );
    assert_eq!(
        h.stats().packets[Transport::Udp.index()][Direction::ClientToPeer.index()],
        1
    );
    assert_eq!(
        h.stats().bytes[Transport::Udp.index()][Direction::ClientToPeer.index()],
        5
    );
}

#[test]
fn channel_data_with_padding_from_client_is_accepted() {
    let mut h = Harness::new();
    let c = h.allocated(41000);
    h.channel_bind(h.at(1), &c, 0x4001, PEER_A);
    let mut cd = channel_data(0x4001, b"abcde");
    cd.extend_from_slice(&[0, 0, 0]);
    let outs = h.client_sends(h.at(2), c.five, &cd);
    assert_eq!(transmits(&outs)[0].1, b"abcde");
}

#[test]
fn peer_data_on_bound_channel_is_channel_data() {
    let mut h = Harness::new();
    let c = h.allocated(41000);
    h.channel_bind(h.at(1), &c, 0x4ABC, PEER_A);
    let outs = h.peer_sends(h.at(2), c.relay(), PEER_A, b"back");
    let cd = response_to(&outs, c.five);
    assert_eq!(cd, vec![0x4A, 0xBC, 0x00, 0x04, b'b', b'a', b'c', b'k']);
}

#[test]
fn peer_data_from_other_port_of_channel_peer_is_data_indication() {
    let mut h = Harness::new();
    let c = h.allocated(41000);
    h.channel_bind(h.at(1), &c, 0x4000, PEER_A);
    let other = SocketAddr::new(PEER_A.ip(), PEER_A.port() + 1);
    let outs = h.peer_sends(h.at(2), c.relay(), other, b"x");
    let ind = response_to(&outs, c.five);
    assert_eq!(method_of(&ind), method::DATA);
    assert_eq!(xor_addr(&ind, attr::XOR_PEER_ADDRESS), Some(other));
}

#[test]
fn channel_bind_installs_permission() {
    let mut h = Harness::new();
    let c = h.allocated(41000);
    h.channel_bind(h.at(1), &c, 0x4000, PEER_A);
    let ind = Request::new(method::SEND)
        .class(Class::Indication)
        .peer(SocketAddr::new(PEER_A.ip(), 1))
        .data(b"x")
        .encode();
    assert_eq!(transmits(&h.client_sends(h.at(2), c.five, &ind)).len(), 1);
}

#[test]
fn channel_expires_after_channel_lifetime() {
    let mut h = Harness::with(|c| c.channel_lifetime = Duration::from_secs(10));
    let c = h.allocated(41000);
    h.channel_bind(h.t0, &c, 0x4000, PEER_A);
    assert_eq!(
        transmits(&h.client_sends(h.at(9), c.five, &channel_data(0x4000, b"a"))).len(),
        1
    );
    h.timeout(h.at(10));
    assert!(h
        .client_sends(h.at(11), c.five, &channel_data(0x4000, b"b"))
        .is_empty());
    assert_eq!(h.stats().dropped[DropReason::UnboundChannel.index()], 1);
}

#[test]
fn expired_channel_peer_data_falls_back_to_data_indication() {
    let mut h = Harness::with(|c| c.channel_lifetime = Duration::from_secs(10));
    let c = h.allocated(41000);
    h.channel_bind(h.t0, &c, 0x4000, PEER_A);
    h.timeout(h.at(10));
    let outs = h.peer_sends(h.at(11), c.relay(), PEER_A, b"x");
    assert_eq!(method_of(&response_to(&outs, c.five)), method::DATA);
}

#[test]
fn channel_rebind_refreshes_channel() {
    let mut h = Harness::with(|c| c.channel_lifetime = Duration::from_secs(10));
    let c = h.allocated(41000);
    h.channel_bind(h.t0, &c, 0x4000, PEER_A);
    let resp = h.channel_bind(h.at(8), &c, 0x4000, PEER_A);
    assert_eq!(class_of(&resp), Class::Success);
    h.timeout(h.at(12));
    assert_eq!(
        transmits(&h.client_sends(h.at(12), c.five, &channel_data(0x4000, b"a"))).len(),
        1
    );
}

#[test]
fn channel_number_can_be_rebound_after_expiry() {
    let mut h = Harness::with(|c| c.channel_lifetime = Duration::from_secs(10));
    let c = h.allocated(41000);
    h.channel_bind(h.t0, &c, 0x4000, PEER_A);
    let resp = h.channel_bind(h.at(11), &c, 0x4000, PEER_B);
    assert_eq!(class_of(&resp), Class::Success);
    let outs = h.client_sends(h.at(12), c.five, &channel_data(0x4000, b"a"));
    assert_eq!(
        transmits(&outs)[0].0,
        Dest::Peer {
            relay: c.relay(),
            peer: PEER_B
        }
    );
}

#[test]
fn channel_data_without_allocation_is_dropped() {
    let mut h = Harness::new();
    let outs = h.client_sends(h.t0, five(41000), &channel_data(0x4000, b"a"));
    assert!(outs.is_empty());
    assert_eq!(h.stats().dropped[DropReason::NoAllocation.index()], 1);
}

#[test]
fn channel_data_after_permission_expiry_is_dropped() {
    let mut h = Harness::with(|c| c.permission_lifetime = Duration::from_secs(5));
    let c = h.allocated(41000);
    h.channel_bind(h.t0, &c, 0x4000, PEER_A);
    let outs = h.client_sends(h.at(6), c.five, &channel_data(0x4000, b"a"));
    assert!(outs.is_empty());
    assert_eq!(h.stats().dropped[DropReason::NoPermission.index()], 1);
}

#[test]
fn empty_channel_data_is_relayed_as_empty_datagram() {
    let mut h = Harness::new();
    let c = h.allocated(41000);
    h.channel_bind(h.at(1), &c, 0x4000, PEER_A);
    let outs = h.client_sends(h.at(2), c.five, &channel_data(0x4000, b""));
    assert_eq!(
        transmits(&outs),
        vec![(
            Dest::Peer {
                relay: c.relay(),
                peer: PEER_A
            },
            vec![]
        )]
    );
}

// ---- Size limits ----

#[test]
fn largest_peer_datagram_fits_a_data_indication() {
    let mut h = Harness::new();
    let c = h.allocated(41000);
    h.create_permission(h.at(1), &c, &[PEER_A]);
    let outs = h.peer_sends(h.at(2), c.relay(), PEER_A, &vec![0xAB; 65_456]);
    let ind = response_to(&outs, c.five);
    assert_eq!(attr_value(&ind, attr::DATA).unwrap().len(), 65_456);
}

#[test]
fn too_large_peer_datagram_for_data_indication_is_dropped() {
    let mut h = Harness::new();
    let c = h.allocated(41000);
    h.create_permission(h.at(1), &c, &[PEER_A]);
    let outs = h.peer_sends(h.at(2), c.relay(), PEER_A, &vec![0xAB; 65_457]);
    assert!(outs.is_empty());
    assert_eq!(h.stats().dropped[DropReason::TooLarge.index()], 1);
}

#[test]
fn largest_peer_datagram_fits_channel_data() {
    let mut h = Harness::new();
    let c = h.allocated(41000);
    h.channel_bind(h.at(1), &c, 0x4000, PEER_A);
    let outs = h.peer_sends(h.at(2), c.relay(), PEER_A, &vec![0xAB; 65_503]);
    let cd = response_to(&outs, c.five);
    assert_eq!(cd.len(), 65_507);
    assert_eq!(&cd[..4], &[0x40, 0x00, 0xFF, 0xDF]);
}

#[test]
fn too_large_peer_datagram_for_channel_data_is_dropped() {
    let mut h = Harness::new();
    let c = h.allocated(41000);
    h.channel_bind(h.at(1), &c, 0x4000, PEER_A);
    let outs = h.peer_sends(h.at(2), c.relay(), PEER_A, &vec![0xAB; 65_504]);
    assert!(outs.is_empty());
    assert_eq!(h.stats().dropped[DropReason::TooLarge.index()], 1);
}

// ---- Relay ids ----

#[test]
fn stale_relay_id_is_not_confused_with_reused_slot() {
    let mut h = Harness::new();
    let old = h.allocated(41000);
    h.refresh(h.at(1), &old, Some(0));
    let new = h.allocated_as(h.at(2), 41001, Creds::alice());
    assert_eq!(new.relay().index(), old.relay().index(), "slot reused");
    assert_ne!(new.relay(), old.relay());
    h.create_permission(h.at(3), &new, &[PEER_A]);
    let outs = h.peer_sends(h.at(4), old.relay(), PEER_A, b"x");
    assert!(outs.is_empty());
    assert_eq!(h.stats().dropped[DropReason::NoAllocation.index()], 1);
}

#[test]
fn peer_data_for_relay_still_binding_is_dropped() {
    let mut h = Harness::new();
    h.bind_mode = BindMode::Manual;
    let mut c = Client::new(41000, Creds::alice());
    h.fetch_nonce(h.t0, &mut c);
    let outs = h.client_sends(
        h.t0,
        c.five,
        &c.req_with(method::ALLOCATE, |r| r.transport(UDP)).encode(),
    );
    let relay = binds(&outs)[0].relay;
    assert!(h.peer_sends(h.at(1), relay, PEER_A, b"x").is_empty());
    assert_eq!(h.stats().dropped[DropReason::NoAllocation.index()], 1);
}

// ---- Quota release ----

#[test]
fn quota_released_on_expiry() {
    let mut h = Harness::new();
    let _c = h.allocated(41000);
    h.timeout(h.at(601));
    assert_eq!(h.quotas().total(), 0);
    assert_eq!(h.quotas().user("alice"), 0);
}

#[test]
fn quota_released_on_client_delete() {
    let mut h = Harness::new();
    let c = h.allocated(41000);
    h.refresh(h.at(1), &c, Some(0));
    assert_eq!(h.quotas().total(), 0);
    assert_eq!(h.quotas().user("alice"), 0);
}

#[test]
fn quota_released_on_close_all() {
    let mut h = Harness::new();
    let _a = h.allocated(41000);
    let _b = h.allocated_as(h.t0, 41001, Creds::bob());
    h.server.close_all();
    h.drain(h.at(1));
    assert_eq!(h.quotas().total(), 0);
    assert_eq!(h.quotas().user("alice"), 0);
    assert_eq!(h.quotas().user("bob"), 0);
}

#[test]
fn quota_released_when_bind_fails() {
    let mut h = Harness::new();
    h.bind_mode = BindMode::Fail(BindError::System);
    let mut c = Client::new(41000, Creds::alice());
    h.fetch_nonce(h.t0, &mut c);
    h.client_sends(
        h.t0,
        c.five,
        &c.req_with(method::ALLOCATE, |r| r.transport(UDP)).encode(),
    );
    assert_eq!(h.quotas().total(), 0);
    assert_eq!(h.quotas().user("alice"), 0);
}

#[test]
fn quota_shared_between_servers_counts_both() {
    let quotas = Quotas::new(Some(16), None);
    let q = quotas.clone();
    let mut h1 = Harness::with(|c| c.quotas = q);
    let q = quotas.clone();
    let mut h2 = Harness::with(|c| c.quotas = q);
    let _a = h1.allocated(41000);
    let b = h2.allocated(41001);
    assert_eq!(quotas.total(), 2);
    h2.refresh(h2.at(1), &b, Some(0));
    assert_eq!(quotas.total(), 1);
    assert_eq!(quotas.user("alice"), 1);
}

// ---- Shutdown ----

#[test]
fn close_all_releases_relays_with_shutdown_reason() {
    let mut h = Harness::new();
    let c = h.allocated(41000);
    h.server.close_all();
    let outs = h.drain(h.at(1));
    assert_eq!(releases(&outs), vec![c.relay()]);
    assert_eq!(
        events(&outs),
        vec![Event::AllocationDeleted {
            client: c.five.client,
            reason: DeleteReason::Shutdown
        }]
    );
    assert_eq!(h.stats().deleted[DeleteReason::Shutdown.index()], 1);
    assert_eq!(h.server.allocations(), 0);
}

#[test]
fn close_all_while_binding_releases_socket_when_bound() {
    let mut h = Harness::new();
    h.bind_mode = BindMode::Manual;
    let mut c = Client::new(41000, Creds::alice());
    h.fetch_nonce(h.t0, &mut c);
    let outs = h.client_sends(
        h.t0,
        c.five,
        &c.req_with(method::ALLOCATE, |r| r.transport(UDP)).encode(),
    );
    let relay = binds(&outs)[0].relay;
    h.server.close_all();
    let outs = h.drain(h.t0);
    // Never active: nothing to release yet.
    assert!(releases(&outs).is_empty());
    let outs = h.relay_bound(h.at(1), relay, Ok(SocketAddr::new(RELAY_IP, 50123)));
    assert_eq!(outs, vec![Out::Release(relay)]);
}

#[test]
fn draining_keeps_existing_allocations() {
    let mut h = Harness::new();
    let c = h.allocated(41000);
    h.server.start_draining();
    let resp = h.refresh(h.at(1), &c, None);
    assert_eq!(class_of(&resp), Class::Success);
    let resp = h.create_permission(h.at(1), &c, &[PEER_A]);
    assert_eq!(class_of(&resp), Class::Success);
}

// ---- Wall clock ----

#[test]
fn wall_clock_step_expires_credentials() {
    let mut h = Harness::new();
    let creds = Creds::rest(SECRET_ONE, "alice", WALL_SECS + 100);
    let mut c = Client::new(41000, creds);
    h.server
        .handle_wall_clock(h.t0, wall() + Duration::from_secs(200));
    h.fetch_nonce(h.t0, &mut c);
    let resp = h.transact(
        h.t0,
        c.five,
        &c.req_with(method::ALLOCATE, |r| r.transport(UDP)).encode(),
    );
    assert_eq!(error_code(&resp), Some(401));
    assert_eq!(h.stats().auth_failures[AuthFailure::Expired.index()], 1);
}

#[test]
fn wall_clock_follows_virtual_time_between_anchors() {
    // Credential valid until WALL+100; 101 s of monotonic time later it has expired.
    let mut h = Harness::new();
    let creds = Creds::rest(SECRET_ONE, "alice", WALL_SECS + 100);
    let mut c = Client::new(41000, creds);
    h.fetch_nonce(h.at(101), &mut c);
    let resp = h.transact(
        h.at(101),
        c.five,
        &c.req_with(method::ALLOCATE, |r| r.transport(UDP)).encode(),
    );
    assert_eq!(error_code(&resp), Some(401));
    assert_eq!(h.stats().auth_failures[AuthFailure::Expired.index()], 1);
}
