//! Every error response the core sends, each for a concrete cause: the code, whether it is signed,
//! what it carries, and the counters it moves.
#![allow(clippy::unwrap_used)]

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use relay_proto::stun::{attr, method, Class, MAGIC_COOKIE};
use relay_proto::{AllocResult, AuthFailure, BindError, DenyReason, DropReason, Quotas, Transport};

use common::*;

/// Fetches a nonce for `c`, then sends an Allocate built by `f` (credentials appended).
fn allocate_with(h: &mut Harness, c: &mut Client, f: impl FnOnce(Request) -> Request) -> Vec<u8> {
    let now = h.t0;
    h.fetch_nonce(now, c);
    let req = c.req_with(method::ALLOCATE, f);
    h.transact(now, c.five, &req.encode())
}

/// An Allocate for UDP as `creds` from a fresh client on `port`.
fn allocate_as(h: &mut Harness, port: u16, creds: Creds) -> Vec<u8> {
    let mut c = Client::new(port, creds);
    allocate_with(h, &mut c, |r| r.transport(UDP))
}

/// Allocate outcomes of `r`; every test here is over UDP, so no other transport's row moves.
fn stats_alloc(h: &Harness, r: AllocResult) -> u64 {
    let udp = h.stats().allocations[Transport::Udp.index()][r.index()];
    assert_eq!(all_transports(&h.stats().allocations, r.index()), udp);
    udp
}

fn auth_failures(h: &Harness, f: AuthFailure) -> u64 {
    h.stats().auth_failures[f.index()]
}

// ==== 400 Bad Request ====

#[test]
fn allocate_without_requested_transport_is_400() {
    let mut h = Harness::new();
    let mut c = Client::new(42000, Creds::alice());
    let resp = allocate_with(&mut h, &mut c, |r| r);
    assert_eq!(error_code(&resp), Some(400));
    assert!(verifies(&resp, &c.creds.key));
    assert_eq!(stats_alloc(&h, AllocResult::BadRequest), 1);
    assert_eq!(h.server.allocations(), 0);
}

#[test]
fn integrity_without_nonce_is_400() {
    let mut h = Harness::new();
    let creds = Creds::alice();
    let req = Request::allocate()
        .attr(attr::USERNAME, creds.username.as_bytes())
        .attr(attr::REALM, REALM.as_bytes())
        .integrity(&creds.key);
    let resp = h.transact(h.t0, five(42000), &req.encode());
    assert_eq!(error_code(&resp), Some(400));
    assert_eq!(attr_value(&resp, attr::MESSAGE_INTEGRITY), None);
    assert_eq!(auth_failures(&h, AuthFailure::Incomplete), 1);
}

#[test]
fn integrity_without_username_is_400() {
    let mut h = Harness::new();
    let mut c = Client::new(42000, Creds::alice());
    h.fetch_nonce(h.t0, &mut c);
    let req = Request::allocate()
        .attr(attr::REALM, REALM.as_bytes())
        .attr(attr::NONCE, &c.nonce)
        .integrity(&c.creds.key);
    let resp = h.transact(h.t0, c.five, &req.encode());
    assert_eq!(error_code(&resp), Some(400));
    assert_eq!(auth_failures(&h, AuthFailure::Incomplete), 1);
}

#[test]
fn integrity_without_realm_is_400() {
    let mut h = Harness::new();
    let mut c = Client::new(42000, Creds::alice());
    h.fetch_nonce(h.t0, &mut c);
    let req = Request::allocate()
        .attr(attr::USERNAME, c.creds.username.as_bytes())
        .attr(attr::NONCE, &c.nonce)
        .integrity(&c.creds.key);
    let resp = h.transact(h.t0, c.five, &req.encode());
    assert_eq!(error_code(&resp), Some(400));
    assert_eq!(auth_failures(&h, AuthFailure::Incomplete), 1);
}

#[test]
fn duplicate_lifetime_is_400() {
    let mut h = Harness::new();
    let mut c = Client::new(42000, Creds::alice());
    let resp = allocate_with(&mut h, &mut c, |r| {
        r.transport(UDP).lifetime(600).lifetime(0)
    });
    assert_eq!(error_code(&resp), Some(400));
    // The request never got as far as authentication: the answer is not signed.
    assert_eq!(attr_value(&resp, attr::MESSAGE_INTEGRITY), None);
    assert_eq!(stats_alloc(&h, AllocResult::BadRequest), 1);
    assert_eq!(h.server.allocations(), 0);
}

#[test]
fn duplicate_username_is_400() {
    let mut h = Harness::new();
    let mut c = Client::new(42000, Creds::alice());
    let resp = allocate_with(&mut h, &mut c, |r| {
        r.transport(UDP).attr(attr::USERNAME, b"1800000000:mallory")
    });
    assert_eq!(error_code(&resp), Some(400));
}

#[test]
fn lifetime_of_wrong_length_is_400() {
    let mut h = Harness::new();
    let mut c = Client::new(42000, Creds::alice());
    let resp = allocate_with(&mut h, &mut c, |r| {
        r.transport(UDP).attr(attr::LIFETIME, &[0, 0, 2])
    });
    assert_eq!(error_code(&resp), Some(400));
}

#[test]
fn requested_transport_of_wrong_length_is_400() {
    let mut h = Harness::new();
    let mut c = Client::new(42000, Creds::alice());
    let resp = allocate_with(&mut h, &mut c, |r| r.attr(attr::REQUESTED_TRANSPORT, &[17]));
    assert_eq!(error_code(&resp), Some(400));
}

#[test]
fn software_longer_than_763_bytes_is_400() {
    let mut h = Harness::new();
    let req = Request::new(method::BINDING).attr(attr::SOFTWARE, &[b'a'; 764]);
    let resp = h.transact(h.t0, five(42000), &req.encode());
    assert_eq!(error_code(&resp), Some(400));
}

#[test]
fn xor_peer_address_with_bad_family_is_400() {
    let mut h = Harness::new();
    let c = h.allocated(42000);
    let port = (5000 ^ (MAGIC_COOKIE >> 16) as u16).to_be_bytes();
    let value = [0, 0x03, port[0], port[1], 0x29, 0x1a, 0xac, 0x4a];
    let req = c.req_with(method::CREATE_PERMISSION, |r| {
        r.attr(attr::XOR_PEER_ADDRESS, &value)
    });
    let resp = h.transact(h.at(1), c.five, &req.encode());
    assert_eq!(error_code(&resp), Some(400));
}

#[test]
fn xor_peer_address_ipv4_with_ipv6_length_is_400() {
    let mut h = Harness::new();
    let c = h.allocated(42000);
    let mut value = [0u8; 20];
    value[1] = 0x01;
    let req = c.req_with(method::CREATE_PERMISSION, |r| {
        r.attr(attr::XOR_PEER_ADDRESS, &value)
    });
    let resp = h.transact(h.at(1), c.five, &req.encode());
    assert_eq!(error_code(&resp), Some(400));
}

#[test]
fn xor_peer_address_ipv6_with_ipv4_length_is_400() {
    let mut h = Harness::new();
    let c = h.allocated(42000);
    let value = [0, 0x02, 0x33, 0x44, 1, 2, 3, 4];
    let req = c.req_with(method::CREATE_PERMISSION, |r| {
        r.attr(attr::XOR_PEER_ADDRESS, &value)
    });
    let resp = h.transact(h.at(1), c.five, &req.encode());
    assert_eq!(error_code(&resp), Some(400));
}

#[test]
fn xor_peer_address_ipv6_too_long_is_400() {
    let mut h = Harness::new();
    let c = h.allocated(42000);
    let mut value = [0u8; 24];
    value[1] = 0x02;
    let req = c.req_with(method::CREATE_PERMISSION, |r| {
        r.attr(attr::XOR_PEER_ADDRESS, &value)
    });
    let resp = h.transact(h.at(1), c.five, &req.encode());
    assert_eq!(error_code(&resp), Some(400));
}

#[test]
fn xor_peer_address_ipv4_too_long_is_400() {
    let mut h = Harness::new();
    let c = h.allocated(42000);
    let mut value = [0u8; 12];
    value[1] = 0x01;
    let req = c.req_with(method::CREATE_PERMISSION, |r| {
        r.attr(attr::XOR_PEER_ADDRESS, &value)
    });
    let resp = h.transact(h.at(1), c.five, &req.encode());
    assert_eq!(error_code(&resp), Some(400));
}

#[test]
fn unknown_method_is_400() {
    let mut h = Harness::new();
    let resp = h.transact(h.t0, five(42000), &Request::new(0x0FF).encode());
    assert_eq!(error_code(&resp), Some(400));
    assert_eq!(method_of(&resp), 0x0FF);
    assert_eq!(class_of(&resp), Class::Error);
}

#[test]
fn create_permission_without_peer_is_400() {
    let mut h = Harness::new();
    let c = h.allocated(42000);
    let resp = h.transact(h.at(1), c.five, &c.req(method::CREATE_PERMISSION).encode());
    assert_eq!(error_code(&resp), Some(400));
    assert!(verifies(&resp, &c.creds.key));
}

#[test]
fn create_permission_with_many_peers_permits_them_all() {
    // pion/turn and webrtc-rs refresh every permission of an allocation in one CreatePermission
    // (RFC 8656 §9.1 allows any number): a limit below the permission cap would make those
    // refreshes fail and the permissions lapse.
    let mut h = Harness::new();
    let c = h.allocated(42000);
    let peers: Vec<SocketAddr> = (1..=20)
        .map(|i| SocketAddr::new([8, 8, 8, i].into(), 5000))
        .collect();
    let resp = h.create_permission(h.at(1), &c, &peers);
    assert_eq!(class_of(&resp), Class::Success);
    assert!(verifies(&resp, &c.creds.key));
    // Each of them, the last included, may now send to the client.
    for peer in [peers[0], peers[19]] {
        let outs = h.peer_sends(h.at(2), c.relay(), peer, b"hello");
        let ind = response_to(&outs, c.five);
        assert_eq!(method_of(&ind), method::DATA, "{peer}");
        assert_eq!(xor_addr(&ind, attr::XOR_PEER_ADDRESS), Some(peer));
    }
    // The refresh with all of them again succeeds too.
    let resp = h.create_permission(h.at(100), &c, &peers);
    assert_eq!(class_of(&resp), Class::Success);
}

#[test]
fn create_permission_past_the_permission_cap_is_a_signed_508() {
    let mut h = Harness::with(|c| c.max_permissions = 10);
    let c = h.allocated(42000);
    let peers: Vec<SocketAddr> = (1..=11)
        .map(|i| SocketAddr::new([8, 8, 8, i].into(), 5000))
        .collect();
    let resp = h.create_permission(h.at(1), &c, &peers);
    assert_eq!(error_code(&resp), Some(508));
    assert!(verifies(&resp, &c.creds.key));
    // All or nothing: not one of them was installed.
    let outs = h.peer_sends(h.at(2), c.relay(), peers[0], b"hello");
    assert!(outs.is_empty());
    // Exactly the cap is fine.
    let resp = h.create_permission(h.at(3), &c, &peers[..10]);
    assert_eq!(class_of(&resp), Class::Success);
}

#[test]
fn channel_bind_without_channel_number_is_400() {
    let mut h = Harness::new();
    let c = h.allocated(42000);
    let req = c.req_with(method::CHANNEL_BIND, |r| r.peer(PEER_A));
    let resp = h.transact(h.at(1), c.five, &req.encode());
    assert_eq!(error_code(&resp), Some(400));
}

#[test]
fn channel_bind_without_peer_is_400() {
    let mut h = Harness::new();
    let c = h.allocated(42000);
    let req = c.req_with(method::CHANNEL_BIND, |r| r.channel(0x4000));
    let resp = h.transact(h.at(1), c.five, &req.encode());
    assert_eq!(error_code(&resp), Some(400));
}

#[test]
fn username_not_utf8_is_400() {
    let mut h = Harness::new();
    let mut c = Client::new(42000, Creds::alice());
    h.fetch_nonce(h.t0, &mut c);
    let req = Request::allocate()
        .attr(attr::USERNAME, b"1800000000:\xff\xfe")
        .attr(attr::REALM, REALM.as_bytes())
        .attr(attr::NONCE, &c.nonce)
        .integrity(&c.creds.key);
    let resp = h.transact(h.t0, c.five, &req.encode());
    assert_eq!(error_code(&resp), Some(400));
}

#[test]
fn username_with_nul_is_400() {
    let mut h = Harness::new();
    let mut c = Client::new(
        42000,
        Creds::with_username(SECRET_ONE, "1800000000:al\0ice"),
    );
    let resp = allocate_with(&mut h, &mut c, |r| r.transport(UDP));
    assert_eq!(error_code(&resp), Some(400));
}

#[test]
fn username_of_514_bytes_is_400() {
    let mut h = Harness::new();
    let name = format!("1800000000:{}", "u".repeat(514 - 11));
    assert_eq!(name.len(), 514);
    let resp = allocate_as(&mut h, 42000, Creds::with_username(SECRET_ONE, name));
    assert_eq!(error_code(&resp), Some(400));
}

#[test]
fn username_of_513_bytes_is_accepted() {
    let mut h = Harness::new();
    let name = format!("1800000000:{}", "u".repeat(513 - 11));
    assert_eq!(name.len(), 513);
    let resp = allocate_as(&mut h, 42000, Creds::with_username(SECRET_ONE, name));
    assert_eq!(class_of(&resp), Class::Success);
}

// ==== 401 Unauthenticated ====

#[test]
fn unauthenticated_401_is_not_signed() {
    let mut h = Harness::new();
    let resp = h.transact(h.t0, five(42000), &Request::allocate().encode());
    assert_eq!(error_code(&resp), Some(401));
    assert!(!attr_types(&resp).contains(&attr::MESSAGE_INTEGRITY));
}

#[test]
fn wrong_password_is_401() {
    let mut h = Harness::new();
    let creds = Creds::with_password(format!("{}:alice", WALL_SECS + 3600), "hunter2");
    let resp = allocate_as(&mut h, 42000, creds);
    assert_eq!(error_code(&resp), Some(401));
    assert_eq!(attr_value(&resp, attr::REALM).unwrap(), REALM.as_bytes());
    assert!(nonce_of(&resp).is_some());
    assert_eq!(auth_failures(&h, AuthFailure::BadIntegrity), 1);
    assert_eq!(stats_alloc(&h, AllocResult::Unauthenticated), 2);
}

#[test]
fn secret_not_configured_is_401() {
    let mut h = Harness::new();
    let creds = Creds::rest(b"secret-three-0123456789", "alice", WALL_SECS + 3600);
    let resp = allocate_as(&mut h, 42000, creds);
    assert_eq!(error_code(&resp), Some(401));
    assert_eq!(auth_failures(&h, AuthFailure::BadIntegrity), 1);
}

#[test]
fn second_secret_is_accepted() {
    let mut h = Harness::new();
    let creds = Creds::rest(SECRET_TWO, "alice", WALL_SECS + 3600);
    let resp = allocate_as(&mut h, 42000, creds.clone());
    assert_eq!(class_of(&resp), Class::Success);
    assert!(verifies(&resp, &creds.key));
}

macro_rules! bad_username_is_401 {
    ($($name:ident: $username:expr,)+) => {$(
        #[test]
        fn $name() {
            let mut h = Harness::new();
            // Signed with the REST password of this very username: only its format is wrong.
            let resp = allocate_as(&mut h, 42000, Creds::with_username(SECRET_ONE, $username));
            assert_eq!(error_code(&resp), Some(401));
            assert_eq!(auth_failures(&h, AuthFailure::BadUsername), 1);
            assert_eq!(h.server.allocations(), 0);
        }
    )+};
}

bad_username_is_401! {
    username_letters_expiry_is_401: "abc:alice",
    username_negative_expiry_is_401: "-1:x",
    username_plus_expiry_is_401: "+1800000000:alice",
    username_20_digit_expiry_is_401: "99999999999999999999:alice",
    username_20_digit_expiry_within_u64_is_401: "10000000000000000000:alice",
    username_empty_expiry_is_401: ":alice",
    username_empty_user_is_401: "1700000000:",
    username_without_colon_is_401: "alice",
    username_513_digits_is_401: "1".repeat(513),
}

#[test]
fn credential_expired_one_second_ago_is_401() {
    let mut h = Harness::new();
    let resp = allocate_as(
        &mut h,
        42000,
        Creds::rest(SECRET_ONE, "alice", WALL_SECS - 1),
    );
    assert_eq!(error_code(&resp), Some(401));
    assert_eq!(auth_failures(&h, AuthFailure::Expired), 1);
    // Not signed, and a fresh nonce to go with it.
    assert!(!attr_types(&resp).contains(&attr::MESSAGE_INTEGRITY));
    assert!(nonce_of(&resp).is_some());
}

#[test]
fn credential_expiring_in_one_second_is_accepted() {
    let mut h = Harness::new();
    let resp = allocate_as(
        &mut h,
        42000,
        Creds::rest(SECRET_ONE, "alice", WALL_SECS + 1),
    );
    assert_eq!(class_of(&resp), Class::Success);
}

#[test]
fn credential_expiring_this_second_is_accepted() {
    let mut h = Harness::new();
    let resp = allocate_as(&mut h, 42000, Creds::rest(SECRET_ONE, "alice", WALL_SECS));
    assert_eq!(class_of(&resp), Class::Success);
}

#[test]
fn wrong_realm_is_401_with_our_realm() {
    let mut h = Harness::new();
    let mut c = Client::new(42000, Creds::alice());
    h.fetch_nonce(h.t0, &mut c);
    let password = relay_proto::rest_password(SECRET_ONE, &c.creds.username);
    let key = relay_proto::auth::long_term_key(
        c.creds.username.as_bytes(),
        b"other.org",
        password.as_bytes(),
    );
    let req = Request::allocate()
        .attr(attr::USERNAME, c.creds.username.as_bytes())
        .attr(attr::REALM, b"other.org")
        .attr(attr::NONCE, &c.nonce)
        .integrity(&key);
    let resp = h.transact(h.t0, c.five, &req.encode());
    assert_eq!(error_code(&resp), Some(401));
    assert_eq!(attr_value(&resp, attr::REALM).unwrap(), REALM.as_bytes());
    assert!(nonce_of(&resp).is_some());
    assert_eq!(auth_failures(&h, AuthFailure::WrongRealm), 1);
}

#[test]
fn refresh_with_wrong_password_is_401() {
    let mut h = Harness::new();
    let c = h.allocated(42000);
    let mut forged = c.clone();
    forged.creds = Creds::with_password(c.creds.username.clone(), "hunter2");
    let resp = h.refresh(h.at(1), &forged, None);
    assert_eq!(error_code(&resp), Some(401));
    assert_eq!(auth_failures(&h, AuthFailure::BadIntegrity), 1);
    assert_eq!(h.server.allocations(), 1);
}

// ==== 403 Forbidden ====

macro_rules! denied_permission_is_403 {
    ($($name:ident: $peer:expr => $why:expr,)+) => {$(
        #[test]
        fn $name() {
            let mut h = Harness::new();
            let c = h.allocated(42000);
            let peer: SocketAddr = $peer.parse().unwrap();
            let resp = h.create_permission(h.at(1), &c, &[peer]);
            assert_eq!(error_code(&resp), Some(403));
            assert!(verifies(&resp, &c.creds.key));
            assert_eq!(h.stats().peers_denied[$why.index()], 1);
            assert_eq!(h.stats().peers_denied.iter().sum::<u64>(), 1);
        }
    )+};
}

denied_permission_is_403! {
    permission_to_private_is_403: "10.0.0.1:5000" => DenyReason::Private,
    permission_to_loopback_is_403: "127.0.0.1:5000" => DenyReason::Loopback,
    permission_to_mapped_loopback_is_403: "[::ffff:127.0.0.1]:5000" => DenyReason::Loopback,
    permission_to_metadata_service_is_403: "169.254.169.254:80" => DenyReason::LinkLocal,
    permission_to_compatible_loopback_is_403: "[::127.0.0.1]:5000" => DenyReason::Loopback,
    permission_to_cgnat_is_403: "100.100.100.200:80" => DenyReason::Shared,
    permission_to_multicast_is_403: "239.255.255.250:1900" => DenyReason::Multicast,
    permission_to_unspecified_is_403: "0.0.0.0:5000" => DenyReason::Unspecified,
    permission_to_documentation_is_403: "192.0.2.1:5000" => DenyReason::Reserved,
    permission_to_ipv6_loopback_is_403: "[::1]:5000" => DenyReason::Loopback,
    permission_to_6to4_is_403: "[2002:7f00:1::]:5000" => DenyReason::Translated,
}

#[test]
fn channel_bind_to_our_listener_is_403() {
    let mut h = Harness::new();
    let c = h.allocated(42000);
    let resp = h.channel_bind(h.at(1), &c, 0x4000, LISTENER);
    assert_eq!(error_code(&resp), Some(403));
    assert_eq!(h.stats().peers_denied[DenyReason::OwnAddress.index()], 1);
}

#[test]
fn channel_bind_to_our_admin_port_is_403() {
    let mut h = Harness::new();
    let c = h.allocated(42000);
    let resp = h.channel_bind(h.at(1), &c, 0x4000, ADMIN);
    assert_eq!(error_code(&resp), Some(403));
    assert_eq!(h.stats().peers_denied[DenyReason::OwnAddress.index()], 1);
}

#[test]
fn one_denied_peer_refuses_whole_create_permission() {
    let mut h = Harness::new();
    let c = h.allocated(42000);
    let denied: SocketAddr = "10.0.0.1:5000".parse().unwrap();
    let resp = h.create_permission(h.at(1), &c, &[PEER_A, denied, PEER_B]);
    assert_eq!(error_code(&resp), Some(403));
    assert!(h.peer_sends(h.at(2), c.relay(), PEER_A, b"a").is_empty());
    assert!(h.peer_sends(h.at(2), c.relay(), PEER_B, b"b").is_empty());
    assert_eq!(h.stats().dropped[DropReason::NoPermission.index()], 2);
}

// ==== 420 Unknown Attribute ====

#[test]
fn allocate_with_even_port_reservation_is_508() {
    // EVEN-PORT with the R bit asks to reserve the next port too, which is not offered.
    let mut h = Harness::new();
    let mut c = Client::new(42000, Creds::alice());
    h.fetch_nonce(h.t0, &mut c);
    let req = c.req_with(method::ALLOCATE, |r| {
        r.transport(UDP).attr(attr::EVEN_PORT, &[0x80])
    });
    let outs = h.client_sends(h.t0, c.five, &req.encode());
    let resp = response_to(&outs, c.five);
    assert_eq!(error_code(&resp), Some(508));
    assert!(verifies(&resp, &c.creds.key));
    assert!(binds(&outs).is_empty());
    assert_eq!(h.server.allocations(), 0);
    assert_eq!(h.quotas().total(), 0);
    assert_eq!(stats_alloc(&h, AllocResult::Capacity), 1);
}

#[test]
fn even_port_of_wrong_length_is_400() {
    let mut h = Harness::new();
    let mut c = Client::new(42000, Creds::alice());
    let resp = allocate_with(&mut h, &mut c, |r| {
        r.transport(UDP).attr(attr::EVEN_PORT, &[0, 0, 0, 0])
    });
    assert_eq!(error_code(&resp), Some(400));
}

#[test]
fn allocate_with_unknown_required_attribute_is_420() {
    let mut h = Harness::new();
    let mut c = Client::new(42000, Creds::alice());
    let resp = allocate_with(&mut h, &mut c, |r| r.transport(UDP).attr(0x7F00, b"?"));
    assert_eq!(error_code(&resp), Some(420));
    assert_eq!(unknown_attributes(&resp), vec![0x7F00]);
}

#[test]
fn allocate_with_two_unknown_attributes_lists_both() {
    let mut h = Harness::new();
    let mut c = Client::new(42000, Creds::alice());
    let resp = allocate_with(&mut h, &mut c, |r| {
        r.transport(UDP)
            .attr(attr::DONT_FRAGMENT, b"")
            .attr(attr::RESERVATION_TOKEN, &[1; 8])
            .attr(attr::DONT_FRAGMENT, b"")
    });
    assert_eq!(error_code(&resp), Some(420));
    assert_eq!(unknown_attributes(&resp), vec![0x001A, 0x0022]);
}

#[test]
fn unauthenticated_allocate_with_unknown_attribute_is_401_first() {
    let mut h = Harness::new();
    let req = Request::allocate().attr(0x7F00, &[0x80]);
    let resp = h.transact(h.t0, five(42000), &req.encode());
    assert_eq!(error_code(&resp), Some(401));
}

#[test]
fn binding_with_unknown_required_attribute_is_420() {
    let mut h = Harness::new();
    let req = Request::new(method::BINDING).attr(0x7F00, &[1, 2, 3, 4]);
    let resp = h.transact(h.t0, five(42000), &req.encode());
    assert_eq!(error_code(&resp), Some(420));
    assert_eq!(unknown_attributes(&resp), vec![0x7F00]);
    assert!(!attr_types(&resp).contains(&attr::MESSAGE_INTEGRITY));
    assert_eq!(h.stats().binding_requests, [0; Transport::COUNT]);
}

#[test]
fn binding_with_unknown_optional_attribute_succeeds() {
    let mut h = Harness::new();
    let req = Request::new(method::BINDING).attr(0xC001, &[1, 2, 3, 4]);
    let resp = h.transact(h.t0, five(42000), &req.encode());
    assert_eq!(class_of(&resp), Class::Success);
}

#[test]
fn refresh_with_unknown_required_attribute_is_420() {
    let mut h = Harness::new();
    let c = h.allocated(42000);
    let req = c.req_with(method::REFRESH, |r| r.attr(0x7F00, b""));
    let resp = h.transact(h.at(1), c.five, &req.encode());
    assert_eq!(error_code(&resp), Some(420));
    assert_eq!(unknown_attributes(&resp), vec![0x7F00]);
    assert!(verifies(&resp, &c.creds.key));
}

#[test]
fn unknown_attribute_after_integrity_is_ignored() {
    let mut h = Harness::new();
    let mut c = Client::new(42000, Creds::alice());
    h.fetch_nonce(h.t0, &mut c);
    let mut req = c.req_with(method::ALLOCATE, |r| r.transport(UDP)).encode();
    append_attr(&mut req, 0x7F00, &[0x80]);
    let resp = h.transact(h.t0, c.five, &req);
    assert_eq!(class_of(&resp), Class::Success);
}

// ==== 437 Allocation Mismatch ====

#[test]
fn second_allocate_on_same_five_tuple_is_437() {
    let mut h = Harness::new();
    let c = h.allocated(42000);
    let req = c.req_with(method::ALLOCATE, |r| r.transport(UDP));
    let outs = h.client_sends(h.at(1), c.five, &req.encode());
    let resp = response_to(&outs, c.five);
    assert_eq!(error_code(&resp), Some(437));
    assert!(verifies(&resp, &c.creds.key));
    assert!(binds(&outs).is_empty());
    assert_eq!(h.server.allocations(), 1);
    assert_eq!(stats_alloc(&h, AllocResult::Mismatch), 1);
}

#[test]
fn refresh_without_allocation_is_437() {
    let mut h = Harness::new();
    let mut c = Client::new(42000, Creds::alice());
    h.fetch_nonce(h.t0, &mut c);
    let resp = h.refresh(h.t0, &c, None);
    assert_eq!(error_code(&resp), Some(437));
    assert!(verifies(&resp, &c.creds.key));
}

#[test]
fn create_permission_without_allocation_is_437() {
    let mut h = Harness::new();
    let mut c = Client::new(42000, Creds::alice());
    h.fetch_nonce(h.t0, &mut c);
    let resp = h.create_permission(h.t0, &c, &[PEER_A]);
    assert_eq!(error_code(&resp), Some(437));
}

#[test]
fn channel_bind_without_allocation_is_437() {
    let mut h = Harness::new();
    let mut c = Client::new(42000, Creds::alice());
    h.fetch_nonce(h.t0, &mut c);
    let resp = h.channel_bind(h.t0, &c, 0x4000, PEER_A);
    assert_eq!(error_code(&resp), Some(437));
}

#[test]
fn refresh_while_relay_is_binding_is_437() {
    let mut h = Harness::new();
    h.bind_mode = BindMode::Manual;
    let mut c = Client::new(42000, Creds::alice());
    h.fetch_nonce(h.t0, &mut c);
    h.client_sends(
        h.t0,
        c.five,
        &c.req_with(method::ALLOCATE, |r| r.transport(UDP)).encode(),
    );
    let resp = h.refresh(h.at(1), &c, None);
    assert_eq!(error_code(&resp), Some(437));
}

// ==== 438 Stale Nonce ====

#[test]
fn stale_nonce_is_438_with_fresh_nonce() {
    let mut h = Harness::new();
    let mut c = Client::new(42000, Creds::alice());
    h.fetch_nonce(h.t0, &mut c);
    let old = c.nonce.clone();
    let req = c.req_with(method::ALLOCATE, |r| r.transport(UDP));
    let resp = h.transact(h.at(601), c.five, &req.encode());
    assert_eq!(error_code(&resp), Some(438));
    assert_eq!(attr_value(&resp, attr::REALM).unwrap(), REALM.as_bytes());
    let fresh = nonce_of(&resp).unwrap();
    assert_ne!(fresh, old);
    assert_eq!(auth_failures(&h, AuthFailure::StaleNonce), 1);
    assert_eq!(stats_alloc(&h, AllocResult::Unauthenticated), 2);
}

#[test]
fn retry_with_fresh_nonce_after_438_succeeds() {
    let mut h = Harness::new();
    let mut c = Client::new(42000, Creds::alice());
    h.fetch_nonce(h.t0, &mut c);
    let req = c.req_with(method::ALLOCATE, |r| r.transport(UDP));
    let resp = h.transact(h.at(601), c.five, &req.encode());
    c.nonce = nonce_of(&resp).unwrap();
    let req = c.req_with(method::ALLOCATE, |r| r.transport(UDP));
    let resp = h.transact(h.at(601), c.five, &req.encode());
    assert_eq!(class_of(&resp), Class::Success);
}

#[test]
fn nonce_at_exactly_its_lifetime_is_still_valid() {
    let mut h = Harness::new();
    let mut c = Client::new(42000, Creds::alice());
    h.fetch_nonce(h.t0, &mut c);
    let req = c.req_with(method::ALLOCATE, |r| r.transport(UDP));
    let resp = h.transact(h.at(600), c.five, &req.encode());
    assert_eq!(class_of(&resp), Class::Success);
}

#[test]
fn nonce_lifetime_follows_config() {
    let mut h = Harness::with(|c| c.nonce_lifetime = Duration::from_secs(30));
    let mut c = Client::new(42000, Creds::alice());
    h.fetch_nonce(h.t0, &mut c);
    let req = c.req_with(method::ALLOCATE, |r| r.transport(UDP));
    let resp = h.transact(h.at(31), c.five, &req.encode());
    assert_eq!(error_code(&resp), Some(438));
}

#[test]
fn stale_nonce_on_refresh_is_438() {
    let mut h = Harness::with(|c| c.nonce_lifetime = Duration::from_secs(30));
    let c = h.allocated(42000);
    let resp = h.refresh(h.at(31), &c, None);
    assert_eq!(error_code(&resp), Some(438));
    assert!(!attr_types(&resp).contains(&attr::MESSAGE_INTEGRITY));
}

#[test]
fn nonce_from_another_client_port_is_438() {
    let mut h = Harness::new();
    let mut c = Client::new(42000, Creds::alice());
    h.fetch_nonce(h.t0, &mut c);
    c.five = five(42001);
    let req = c.req_with(method::ALLOCATE, |r| r.transport(UDP));
    let resp = h.transact(h.t0, c.five, &req.encode());
    assert_eq!(error_code(&resp), Some(438));
    assert_eq!(auth_failures(&h, AuthFailure::StaleNonce), 1);
}

#[test]
fn nonce_from_another_client_ip_is_438() {
    let mut h = Harness::new();
    let mut c = Client::new(42000, Creds::alice());
    h.fetch_nonce(h.t0, &mut c);
    c.five.client = "192.0.2.34:42000".parse().unwrap();
    let req = c.req_with(method::ALLOCATE, |r| r.transport(UDP));
    let resp = h.transact(h.t0, c.five, &req.encode());
    assert_eq!(error_code(&resp), Some(438));
}

#[test]
fn made_up_nonce_is_438() {
    let mut h = Harness::new();
    let mut c = Client::new(42000, Creds::alice());
    c.nonce = b"00000000deadbeefdeadbeef".to_vec();
    let req = c.req_with(method::ALLOCATE, |r| r.transport(UDP));
    let resp = h.transact(h.t0, c.five, &req.encode());
    assert_eq!(error_code(&resp), Some(438));
}

#[test]
fn nonce_from_another_server_key_is_438() {
    let mut other = Harness::with(|c| c.nonce_key = relay_proto::auth::NonceKey::new([8; 32]));
    let mut h = Harness::new();
    let mut c = Client::new(42000, Creds::alice());
    other.fetch_nonce(other.t0, &mut c);
    let req = c.req_with(method::ALLOCATE, |r| r.transport(UDP));
    let resp = h.transact(h.t0, c.five, &req.encode());
    assert_eq!(error_code(&resp), Some(438));
}

// ==== 441 Wrong Credentials ====

#[test]
fn refresh_with_other_valid_user_is_441() {
    let mut h = Harness::new();
    let c = h.allocated(42000);
    let mut bob = c.clone();
    bob.creds = Creds::bob();
    let resp = h.refresh(h.at(1), &bob, Some(0));
    assert_eq!(error_code(&resp), Some(441));
    assert!(verifies(&resp, &bob.creds.key));
    assert_eq!(auth_failures(&h, AuthFailure::WrongCredentials), 1);
    assert_eq!(
        h.server.allocations(),
        1,
        "bob must not delete alice's allocation"
    );
}

#[test]
fn create_permission_with_other_valid_user_is_441() {
    let mut h = Harness::new();
    let c = h.allocated(42000);
    let mut bob = c.clone();
    bob.creds = Creds::bob();
    let resp = h.create_permission(h.at(1), &bob, &[PEER_A]);
    assert_eq!(error_code(&resp), Some(441));
    assert!(h.peer_sends(h.at(2), c.relay(), PEER_A, b"x").is_empty());
}

#[test]
fn allocate_with_other_valid_user_on_allocated_five_tuple_is_441() {
    let mut h = Harness::new();
    let c = h.allocated(42000);
    let mut bob = c.clone();
    bob.creds = Creds::bob();
    let req = bob.req_with(method::ALLOCATE, |r| r.transport(UDP));
    let resp = h.transact(h.at(1), c.five, &req.encode());
    assert_eq!(error_code(&resp), Some(441));
    assert_eq!(stats_alloc(&h, AllocResult::Mismatch), 1);
}

// ==== 442 Unsupported Transport Protocol ====

#[test]
fn tcp_transport_is_442() {
    let mut h = Harness::new();
    let mut c = Client::new(42000, Creds::alice());
    let resp = allocate_with(&mut h, &mut c, |r| r.transport(6));
    assert_eq!(error_code(&resp), Some(442));
    assert!(verifies(&resp, &c.creds.key));
    assert_eq!(stats_alloc(&h, AllocResult::Unsupported), 1);
    assert_eq!(h.server.allocations(), 0);
}

// ==== 440 Address Family not Supported ====

#[test]
fn ipv6_family_on_ipv4_relay_is_440() {
    let mut h = Harness::new();
    let mut c = Client::new(42000, Creds::alice());
    let resp = allocate_with(&mut h, &mut c, |r| {
        r.transport(UDP)
            .u32(attr::REQUESTED_ADDRESS_FAMILY, 0x02 << 24)
    });
    assert_eq!(error_code(&resp), Some(440));
    assert!(verifies(&resp, &c.creds.key));
    assert_eq!(stats_alloc(&h, AllocResult::Unsupported), 1);
}

#[test]
fn ipv4_family_on_ipv4_relay_is_fine() {
    let mut h = Harness::new();
    let mut c = Client::new(42000, Creds::alice());
    let resp = allocate_with(&mut h, &mut c, |r| {
        r.transport(UDP)
            .u32(attr::REQUESTED_ADDRESS_FAMILY, 0x01 << 24)
    });
    assert_eq!(class_of(&resp), Class::Success);
}

// ==== 443 Peer Address Family Mismatch ====

#[test]
fn ipv6_peer_on_ipv4_relay_is_443() {
    let mut h = Harness::new();
    let c = h.allocated(42000);
    let resp = h.create_permission(h.at(1), &c, &["[2606:4700::1111]:5000".parse().unwrap()]);
    assert_eq!(error_code(&resp), Some(443));
    assert!(verifies(&resp, &c.creds.key));
}

#[test]
fn ipv6_channel_peer_on_ipv4_relay_is_443() {
    let mut h = Harness::new();
    let c = h.allocated(42000);
    let resp = h.channel_bind(
        h.at(1),
        &c,
        0x4000,
        "[2606:4700::1111]:5000".parse().unwrap(),
    );
    assert_eq!(error_code(&resp), Some(443));
}

#[test]
fn mapped_public_peer_on_ipv4_relay_is_443() {
    let mut h = Harness::new();
    let c = h.allocated(42000);
    let resp = h.create_permission(h.at(1), &c, &["[::ffff:8.8.8.8]:5000".parse().unwrap()]);
    assert_eq!(error_code(&resp), Some(443));
}

#[test]
fn refresh_with_other_family_is_443() {
    let mut h = Harness::new();
    let c = h.allocated(42000);
    let req = c.req_with(method::REFRESH, |r| {
        r.u32(attr::REQUESTED_ADDRESS_FAMILY, 0x02 << 24)
    });
    let resp = h.transact(h.at(1), c.five, &req.encode());
    assert_eq!(error_code(&resp), Some(443));
}

// ==== 486 Allocation Quota Reached ====

#[test]
fn third_allocation_of_user_over_quota_is_486() {
    let mut h = Harness::with(|c| c.quotas = Quotas::new(Some(2), None));
    h.allocated(42000);
    h.allocated(42001);
    let mut c = Client::new(42002, Creds::alice());
    let resp = allocate_with(&mut h, &mut c, |r| r.transport(UDP));
    assert_eq!(error_code(&resp), Some(486));
    assert!(verifies(&resp, &c.creds.key));
    assert_eq!(stats_alloc(&h, AllocResult::Quota), 1);
    assert_eq!(h.quotas().user("alice"), 2);
}

#[test]
fn user_quota_counts_the_user_part_not_the_username() {
    let mut h = Harness::with(|c| c.quotas = Quotas::new(Some(1), None));
    h.allocated(42000);
    let later = Creds::rest(SECRET_ONE, "alice", WALL_SECS + 7200);
    let resp = allocate_as(&mut h, 42001, later);
    assert_eq!(error_code(&resp), Some(486));
}

#[test]
fn other_user_is_not_limited_by_full_user_quota() {
    let mut h = Harness::with(|c| c.quotas = Quotas::new(Some(2), None));
    h.allocated(42000);
    h.allocated(42001);
    let resp = allocate_as(&mut h, 42002, Creds::bob());
    assert_eq!(class_of(&resp), Class::Success);
    assert_eq!(h.quotas().total(), 3);
}

#[test]
fn user_quota_frees_up_after_delete() {
    let mut h = Harness::with(|c| c.quotas = Quotas::new(Some(1), None));
    let c = h.allocated(42000);
    h.refresh(h.at(1), &c, Some(0));
    let resp = allocate_as(&mut h, 42001, Creds::alice());
    assert_eq!(class_of(&resp), Class::Success);
}

// ==== 508 Insufficient Capacity ====

#[test]
fn total_quota_reached_is_508() {
    let mut h = Harness::with(|c| c.quotas = Quotas::new(None, Some(1)));
    h.allocated(42000);
    let mut c = Client::new(42001, Creds::bob());
    let resp = allocate_with(&mut h, &mut c, |r| r.transport(UDP));
    assert_eq!(error_code(&resp), Some(508));
    assert!(verifies(&resp, &c.creds.key));
    assert_eq!(stats_alloc(&h, AllocResult::Capacity), 1);
    assert_eq!(h.quotas().total(), 1);
}

#[test]
fn ports_exhausted_is_508() {
    let mut h = Harness::new();
    h.bind_mode = BindMode::Fail(BindError::PortsExhausted);
    let mut c = Client::new(42000, Creds::alice());
    h.fetch_nonce(h.t0, &mut c);
    let req = c
        .req_with(method::ALLOCATE, |r| r.transport(UDP))
        .fingerprint();
    let outs = h.client_sends(h.t0, c.five, &req.encode());
    let resp = response_to(&outs, c.five);
    assert_eq!(error_code(&resp), Some(508));
    assert!(verifies(&resp, &c.creds.key));
    assert!(parse(&resp).has_fingerprint());
    assert_eq!(parse(&resp).transaction_id(), req.transaction_id());
    // Never active: no release, no deletion event.
    assert!(releases(&outs).is_empty());
    assert!(events(&outs).is_empty());
    assert_eq!(h.server.allocations(), 0);
    assert_eq!(stats_alloc(&h, AllocResult::Capacity), 1);
    assert_eq!(stats_alloc(&h, AllocResult::Ok), 0);
}

#[test]
fn allocate_after_ports_come_back_succeeds() {
    let mut h = Harness::new();
    h.bind_mode = BindMode::Fail(BindError::PortsExhausted);
    let mut c = Client::new(42000, Creds::alice());
    h.fetch_nonce(h.t0, &mut c);
    h.client_sends(
        h.t0,
        c.five,
        &c.req_with(method::ALLOCATE, |r| r.transport(UDP)).encode(),
    );
    h.bind_mode = BindMode::Ok;
    let resp = h.transact(
        h.at(1),
        c.five,
        &c.req_with(method::ALLOCATE, |r| r.transport(UDP)).encode(),
    );
    assert_eq!(class_of(&resp), Class::Success);
}

#[test]
fn system_bind_error_is_508() {
    let mut h = Harness::new();
    h.bind_mode = BindMode::Fail(BindError::System);
    let resp = allocate_as(&mut h, 42000, Creds::alice());
    assert_eq!(error_code(&resp), Some(508));
}

#[test]
fn draining_server_answers_allocate_508() {
    let mut h = Harness::new();
    h.server.start_draining();
    let mut c = Client::new(42000, Creds::alice());
    let outs = {
        h.fetch_nonce(h.t0, &mut c);
        h.client_sends(
            h.t0,
            c.five,
            &c.req_with(method::ALLOCATE, |r| r.transport(UDP)).encode(),
        )
    };
    let resp = response_to(&outs, c.five);
    assert_eq!(error_code(&resp), Some(508));
    assert!(binds(&outs).is_empty());
    assert_eq!(stats_alloc(&h, AllocResult::Capacity), 1);
    assert_eq!(h.quotas().total(), 0);
}

#[test]
fn permissions_over_max_are_508() {
    let mut h = Harness::with(|c| c.max_permissions = 2);
    let c = h.allocated(42000);
    h.create_permission(h.at(1), &c, &[PEER_A, PEER_B]);
    let resp = h.create_permission(h.at(2), &c, &[PEER_C]);
    assert_eq!(error_code(&resp), Some(508));
    assert!(verifies(&resp, &c.creds.key));
    assert!(h.peer_sends(h.at(3), c.relay(), PEER_C, b"x").is_empty());
}

#[test]
fn permissions_over_max_in_one_request_are_508_and_install_nothing() {
    let mut h = Harness::with(|c| c.max_permissions = 2);
    let c = h.allocated(42000);
    let resp = h.create_permission(h.at(1), &c, &[PEER_A, PEER_B, PEER_C]);
    assert_eq!(error_code(&resp), Some(508));
    assert!(h.peer_sends(h.at(2), c.relay(), PEER_A, b"x").is_empty());
}

#[test]
fn refreshing_existing_permission_at_max_is_fine() {
    let mut h = Harness::with(|c| c.max_permissions = 2);
    let c = h.allocated(42000);
    h.create_permission(h.at(1), &c, &[PEER_A, PEER_B]);
    let resp = h.create_permission(h.at(2), &c, &[PEER_B, PEER_A]);
    assert_eq!(class_of(&resp), Class::Success);
}

#[test]
fn channel_bind_over_max_permissions_is_508() {
    let mut h = Harness::with(|c| c.max_permissions = 1);
    let c = h.allocated(42000);
    h.create_permission(h.at(1), &c, &[PEER_A]);
    let resp = h.channel_bind(h.at(2), &c, 0x4000, PEER_B);
    assert_eq!(error_code(&resp), Some(508));
}

// ==== Channel numbers ====

macro_rules! bad_channel_number_is_400 {
    ($($name:ident: $n:expr,)+) => {$(
        #[test]
        fn $name() {
            let mut h = Harness::new();
            let c = h.allocated(42000);
            let resp = h.channel_bind(h.at(1), &c, $n, PEER_A);
            assert_eq!(error_code(&resp), Some(400));
            assert!(verifies(&resp, &c.creds.key));
            // No permission came with the refused binding.
            assert!(h.peer_sends(h.at(2), c.relay(), PEER_A, b"x").is_empty());
        }
    )+};
}

bad_channel_number_is_400! {
    channel_0x3fff_is_400: 0x3FFF,
    channel_0x5000_is_400: 0x5000,
    channel_0x7fff_is_400: 0x7FFF,
    channel_0x8000_is_400: 0x8000,
    channel_0xffff_is_400: 0xFFFF,
    channel_0x0000_is_400: 0x0000,
}

#[test]
fn channel_0x4000_is_accepted() {
    let mut h = Harness::new();
    let c = h.allocated(42000);
    assert_eq!(
        class_of(&h.channel_bind(h.at(1), &c, 0x4000, PEER_A)),
        Class::Success
    );
}

#[test]
fn channel_0x4fff_is_accepted() {
    let mut h = Harness::new();
    let c = h.allocated(42000);
    assert_eq!(
        class_of(&h.channel_bind(h.at(1), &c, 0x4FFF, PEER_A)),
        Class::Success
    );
}

#[test]
fn bound_channel_to_another_peer_is_400() {
    let mut h = Harness::new();
    let c = h.allocated(42000);
    h.channel_bind(h.at(1), &c, 0x4000, PEER_A);
    let resp = h.channel_bind(h.at(2), &c, 0x4000, PEER_B);
    assert_eq!(error_code(&resp), Some(400));
    // The old binding still holds.
    let outs = h.client_sends(h.at(3), c.five, &channel_data(0x4000, b"x"));
    assert_eq!(
        transmits(&outs)[0].0,
        relay_proto::Dest::Peer {
            relay: c.relay(),
            peer: PEER_A
        }
    );
}

#[test]
fn bound_peer_on_another_channel_is_400() {
    let mut h = Harness::new();
    let c = h.allocated(42000);
    h.channel_bind(h.at(1), &c, 0x4000, PEER_A);
    let resp = h.channel_bind(h.at(2), &c, 0x4001, PEER_A);
    assert_eq!(error_code(&resp), Some(400));
    assert!(h
        .client_sends(h.at(3), c.five, &channel_data(0x4001, b"x"))
        .is_empty());
}

#[test]
fn same_channel_and_peer_again_is_success() {
    let mut h = Harness::new();
    let c = h.allocated(42000);
    h.channel_bind(h.at(1), &c, 0x4000, PEER_A);
    let resp = h.channel_bind(h.at(2), &c, 0x4000, PEER_A);
    assert_eq!(class_of(&resp), Class::Success);
}

#[test]
fn channel_peer_port_zero_is_400() {
    let mut h = Harness::new();
    let c = h.allocated(42000);
    let resp = h.channel_bind(h.at(1), &c, 0x4000, SocketAddr::new(PEER_A.ip(), 0));
    assert_eq!(error_code(&resp), Some(400));
}
