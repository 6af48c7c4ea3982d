//! Bad input: never a panic, never an answer to garbage, always a counter that moves. Requests
//! that frame but carry bad attributes get a 400.
#![allow(clippy::unwrap_used)]

mod common;

use relay_proto::stun::{attr, method, Class, FrameError, Message};
use relay_proto::{AllocResult, DropReason, Transport};

use common::*;

fn dropped(h: &Harness, why: DropReason) -> u64 {
    h.stats().dropped[why.index()]
}

/// Feeds every proper prefix of `msg` (lengths 0 to len-1) and checks each is dropped as
/// malformed without any output.
fn assert_every_prefix_malformed(h: &mut Harness, five: relay_proto::FiveTuple, msg: &[u8]) {
    for len in 0..msg.len() {
        let before = dropped(h, DropReason::Malformed);
        let outs = h.client_sends(h.at(10), five, &msg[..len]);
        assert!(outs.is_empty(), "prefix of {len} bytes answered: {outs:?}");
        assert_eq!(
            dropped(h, DropReason::Malformed),
            before + 1,
            "prefix of {len} bytes"
        );
    }
    // And the whole message is not malformed (so the loop tested prefixes of something valid).
    let before = dropped(h, DropReason::Malformed);
    h.client_sends(h.at(10), five, msg);
    assert_eq!(dropped(h, DropReason::Malformed), before);
}

fn binding() -> Vec<u8> {
    Request::new(method::BINDING).fingerprint().encode()
}

// ---- prefixes ----

#[test]
fn every_prefix_of_allocate_is_malformed() {
    let mut h = Harness::new();
    let mut c = Client::new(43000, Creds::alice());
    h.fetch_nonce(h.t0, &mut c);
    let req = c
        .req_with(method::ALLOCATE, |r| r.transport(UDP).lifetime(600))
        .fingerprint()
        .encode();
    assert_every_prefix_malformed(&mut h, c.five, &req);
    assert_eq!(dropped(&h, DropReason::Malformed), req.len() as u64);
}

#[test]
fn every_prefix_of_binding_is_malformed() {
    let mut h = Harness::new();
    let req = Request::new(method::BINDING)
        .attr(attr::SOFTWARE, b"prefix test")
        .fingerprint()
        .encode();
    assert_every_prefix_malformed(&mut h, five(43000), &req);
}

#[test]
fn every_prefix_of_channel_bind_is_malformed() {
    let mut h = Harness::new();
    let c = h.allocated(43000);
    let req = c
        .req_with(method::CHANNEL_BIND, |r| r.channel(0x4000).peer(PEER_A))
        .encode();
    assert_every_prefix_malformed(&mut h, c.five, &req);
}

#[test]
fn every_prefix_of_refresh_is_malformed() {
    let mut h = Harness::new();
    let c = h.allocated(43000);
    let req = c.req_with(method::REFRESH, |r| r.lifetime(0)).encode();
    assert_every_prefix_malformed(&mut h, c.five, &req);
    // The complete request went through last and deleted the allocation.
    assert_eq!(h.server.allocations(), 0);
}

#[test]
fn every_prefix_of_send_indication_is_malformed() {
    let mut h = Harness::new();
    let c = h.allocated(43000);
    h.create_permission(h.t0, &c, &[PEER_A]);
    let ind = Request::new(method::SEND)
        .class(Class::Indication)
        .peer(PEER_A)
        .data(b"some payload")
        .encode();
    assert_every_prefix_malformed(&mut h, c.five, &ind);
}

#[test]
fn every_prefix_of_channel_data_is_malformed() {
    let mut h = Harness::new();
    let c = h.allocated(43000);
    h.channel_bind(h.t0, &c, 0x4000, PEER_A);
    // A multiple of four: no padding, so every shorter datagram is truncated.
    let cd = channel_data(0x4000, b"12345678");
    assert_every_prefix_malformed(&mut h, c.five, &cd);
}

// ---- framing ----

#[test]
fn wrong_magic_cookie_is_malformed() {
    let mut h = Harness::new();
    let mut m = binding();
    m[4] ^= 0xFF;
    assert!(h.client_sends(h.t0, five(43000), &m).is_empty());
    assert_eq!(dropped(&h, DropReason::Malformed), 1);
}

#[test]
fn length_not_multiple_of_four_is_malformed() {
    let mut h = Harness::new();
    let mut m = Request::new(method::BINDING).encode();
    m.extend_from_slice(&[0, 0]);
    fix_len(&mut m);
    assert_eq!(u16::from_be_bytes([m[2], m[3]]), 2);
    assert!(h.client_sends(h.t0, five(43000), &m).is_empty());
    assert_eq!(dropped(&h, DropReason::Malformed), 1);
}

#[test]
fn header_length_0xfffc_is_malformed() {
    let mut h = Harness::new();
    let mut m = binding();
    m[2] = 0xFF;
    m[3] = 0xFC;
    assert!(h.client_sends(h.t0, five(43000), &m).is_empty());
    assert_eq!(dropped(&h, DropReason::Malformed), 1);
}

#[test]
fn header_length_shorter_than_datagram_is_malformed() {
    let mut h = Harness::new();
    let mut m = binding();
    m.extend_from_slice(&[0; 4]);
    assert!(h.client_sends(h.t0, five(43000), &m).is_empty());
    assert_eq!(dropped(&h, DropReason::Malformed), 1);
}

#[test]
fn attribute_length_past_end_is_malformed() {
    let mut h = Harness::new();
    let mut m = Request::new(method::BINDING)
        .attr(attr::SOFTWARE, b"abcd")
        .encode();
    m[22..24].copy_from_slice(&100u16.to_be_bytes());
    assert!(h.client_sends(h.t0, five(43000), &m).is_empty());
    assert_eq!(dropped(&h, DropReason::Malformed), 1);
}

#[test]
fn nonzero_attribute_padding_is_accepted() {
    // RFC 8489 §14: padding bits are ignored, whatever their value.
    let mut h = Harness::new();
    let mut m = Request::new(method::BINDING).encode();
    m.extend_from_slice(&[0x80, 0x22, 0x00, 0x02, b'h', b'i', 0xFF, 0xFF]);
    fix_len(&mut m);
    let resp = h.transact(h.t0, five(43000), &m);
    assert_eq!(class_of(&resp), Class::Success);
    assert_eq!(dropped(&h, DropReason::Malformed), 0);
}

#[test]
fn wrong_fingerprint_is_malformed() {
    let mut h = Harness::new();
    let mut m = binding();
    let last = m.len() - 1;
    m[last] ^= 0x01;
    assert!(h.client_sends(h.t0, five(43000), &m).is_empty());
    assert_eq!(dropped(&h, DropReason::Malformed), 1);
}

#[test]
fn fingerprint_not_last_is_malformed() {
    // A FINGERPRINT that is correct for the final header length, followed by another attribute:
    // only its position is wrong.
    let mut h = Harness::new();
    let mut m = Request::new(method::BINDING).encode();
    let fp_at = m.len();
    append_attr(&mut m, attr::FINGERPRINT, &[0; 4]);
    append_attr(&mut m, attr::SOFTWARE, b"late");
    let crc = crc32fast::hash(&m[..fp_at]) ^ 0x5354_554E;
    m[fp_at + 4..fp_at + 8].copy_from_slice(&crc.to_be_bytes());
    assert_eq!(Message::parse(&m).unwrap_err(), FrameError::BadFingerprint);
    assert!(h.client_sends(h.t0, five(43000), &m).is_empty());
    assert_eq!(dropped(&h, DropReason::Malformed), 1);
}

#[test]
fn header_length_shorter_than_complete_attributes_is_malformed() {
    // Header length 0, followed by a complete, well-formed attribute the length does not count.
    let mut h = Harness::new();
    let mut m = Request::new(method::BINDING).encode();
    m.extend_from_slice(&[0x80, 0x23, 0x00, 0x00]);
    assert_eq!(Message::parse(&m).unwrap_err(), FrameError::BadLength);
    assert!(h.client_sends(h.t0, five(43000), &m).is_empty());
    assert_eq!(dropped(&h, DropReason::Malformed), 1);
}

// ---- frame errors, one cause each ----

#[test]
fn nineteen_bytes_are_short() {
    assert_eq!(
        Message::parse(&binding()[..19]).unwrap_err(),
        FrameError::Short
    );
}

#[test]
fn top_bits_set_is_not_stun() {
    let mut m = binding();
    m[0] |= 0x40;
    assert_eq!(Message::parse(&m).unwrap_err(), FrameError::NotStun);
}

#[test]
fn bad_cookie_is_bad_cookie() {
    let mut m = binding();
    m[7] ^= 1;
    assert_eq!(Message::parse(&m).unwrap_err(), FrameError::BadCookie);
}

#[test]
fn length_not_multiple_of_four_is_bad_length() {
    let mut m = Request::new(method::BINDING).encode();
    m.extend_from_slice(&[0x80, 0x22, 0x00, 0x02, b'h', b'i']);
    fix_len(&mut m);
    assert_eq!(Message::parse(&m).unwrap_err(), FrameError::BadLength);
}

#[test]
fn attribute_past_end_is_truncated() {
    let mut m = Request::new(method::BINDING)
        .attr(attr::SOFTWARE, b"abcd")
        .encode();
    m[22..24].copy_from_slice(&5u16.to_be_bytes());
    assert_eq!(Message::parse(&m).unwrap_err(), FrameError::Truncated);
}

#[test]
fn fingerprint_of_wrong_length_is_malformed() {
    let mut h = Harness::new();
    let mut m = Request::new(method::BINDING).encode();
    append_attr(&mut m, attr::FINGERPRINT, &[0; 8]);
    assert!(h.client_sends(h.t0, five(43000), &m).is_empty());
    assert_eq!(dropped(&h, DropReason::Malformed), 1);
}

#[test]
fn jumbo_9000_byte_garbage_is_malformed() {
    let mut h = Harness::new();
    let m = vec![0u8; 9000];
    assert!(h.client_sends(h.t0, five(43000), &m).is_empty());
    assert_eq!(dropped(&h, DropReason::Malformed), 1);
}

#[test]
fn largest_udp_datagram_of_garbage_is_malformed() {
    let mut h = Harness::new();
    let mut m = vec![0xA5u8; 65_507];
    m[0] = 0x00;
    assert!(h.client_sends(h.t0, five(43000), &m).is_empty());
    assert_eq!(dropped(&h, DropReason::Malformed), 1);
}

#[test]
fn largest_udp_datagram_as_channel_data_is_malformed() {
    let mut h = Harness::new();
    let c = h.allocated(43000);
    h.channel_bind(h.t0, &c, 0x4000, PEER_A);
    let mut m = vec![0xA5u8; 65_507];
    m[..4].copy_from_slice(&[0x40, 0x00, 0x00, 0x10]);
    assert!(h.client_sends(h.t0, c.five, &m).is_empty());
    assert_eq!(dropped(&h, DropReason::Malformed), 1);
}

#[test]
fn well_formed_9000_byte_binding_is_answered() {
    let mut h = Harness::new();
    let m = Request::new(method::BINDING)
        .attr(0xC0DE, &[7; 8976])
        .encode();
    assert_eq!(m.len(), 9000);
    let resp = h.transact(h.t0, five(43000), &m);
    assert_eq!(class_of(&resp), Class::Success);
}

macro_rules! first_byte_range_is_malformed {
    ($($name:ident: $range:expr,)+) => {$(
        #[test]
        fn $name() {
            let mut h = Harness::new();
            let c = h.allocated(43000);
            h.channel_bind(h.t0, &c, 0x4000, PEER_A);
            let range = $range;
            let n = range.clone().count() as u64;
            for b in range {
                // A valid Binding and a valid ChannelData, with only the first byte changed.
                for mut m in [binding(), channel_data(0x4000, b"data")] {
                    m[0] = b;
                    assert!(h.client_sends(h.at(1), c.five, &m).is_empty(), "first byte {b:#04x}");
                }
            }
            assert_eq!(dropped(&h, DropReason::Malformed), 2 * n);
        }
    )+};
}

first_byte_range_is_malformed! {
    first_byte_4_to_19_is_malformed: 4u8..=19,
    first_byte_20_to_63_dtls_is_malformed: 20u8..=63,
    first_byte_0x50_to_0x7f_reserved_channels_is_malformed: 0x50u8..=0x7F,
    first_byte_128_to_191_rtp_is_malformed: 128u8..=191,
    first_byte_192_to_255_is_malformed: 192u8..=255,
}

// ---- well framed, but not for us ----

#[test]
fn binding_success_response_to_server_is_unexpected() {
    let mut h = Harness::new();
    let m = Request::new(method::BINDING)
        .class(Class::Success)
        .xor(attr::XOR_MAPPED_ADDRESS, PEER_A)
        .encode();
    assert!(h.client_sends(h.t0, five(43000), &m).is_empty());
    assert_eq!(dropped(&h, DropReason::Unexpected), 1);
}

#[test]
fn error_response_to_server_is_unexpected() {
    let mut h = Harness::new();
    let m = Request::new(method::ALLOCATE)
        .class(Class::Error)
        .attr(attr::ERROR_CODE, &[0, 0, 4, 1])
        .encode();
    assert!(h.client_sends(h.t0, five(43000), &m).is_empty());
    assert_eq!(dropped(&h, DropReason::Unexpected), 1);
}

#[test]
fn data_indication_to_server_is_unexpected() {
    let mut h = Harness::new();
    let c = h.allocated(43000);
    let m = Request::new(method::DATA)
        .class(Class::Indication)
        .peer(PEER_A)
        .data(b"x")
        .encode();
    assert!(h.client_sends(h.at(1), c.five, &m).is_empty());
    assert_eq!(dropped(&h, DropReason::Unexpected), 1);
}

#[test]
fn binding_indication_is_unexpected() {
    let mut h = Harness::new();
    let m = Request::new(method::BINDING)
        .class(Class::Indication)
        .encode();
    assert!(h.client_sends(h.t0, five(43000), &m).is_empty());
    assert_eq!(dropped(&h, DropReason::Unexpected), 1);
}

#[test]
fn channel_data_on_unbound_channel_is_dropped() {
    let mut h = Harness::new();
    let c = h.allocated(43000);
    h.channel_bind(h.t0, &c, 0x4000, PEER_A);
    assert!(h
        .client_sends(h.at(1), c.five, &channel_data(0x4001, b"x"))
        .is_empty());
    assert_eq!(dropped(&h, DropReason::UnboundChannel), 1);
}

#[test]
fn channel_data_longer_than_its_padding_is_malformed() {
    let mut h = Harness::new();
    let c = h.allocated(43000);
    h.channel_bind(h.t0, &c, 0x4000, PEER_A);
    let mut m = channel_data(0x4000, b"abcd");
    m.extend_from_slice(&[0; 4]);
    assert!(h.client_sends(h.at(1), c.five, &m).is_empty());
    assert_eq!(dropped(&h, DropReason::Malformed), 1);
}

#[test]
fn send_indication_with_duplicate_data_is_bad_indication() {
    let mut h = Harness::new();
    let c = h.allocated(43000);
    h.create_permission(h.t0, &c, &[PEER_A]);
    let m = Request::new(method::SEND)
        .class(Class::Indication)
        .peer(PEER_A)
        .data(b"a")
        .data(b"b")
        .encode();
    assert!(h.client_sends(h.at(1), c.five, &m).is_empty());
    assert_eq!(dropped(&h, DropReason::BadIndication), 1);
}

#[test]
fn send_indication_with_an_unknown_comprehension_required_attribute_is_discarded() {
    // RFC 8489 §6.3.2: not relayed, and no error (indications get no answer). DONT-FRAGMENT
    // (0x001A) is one here: this server cannot promise an unfragmented datagram per Send.
    let mut h = Harness::new();
    let c = h.allocated(43000);
    h.create_permission(h.t0, &c, &[PEER_A]);
    for typ in [attr::DONT_FRAGMENT, 0x7FF0] {
        let m = Request::new(method::SEND)
            .class(Class::Indication)
            .peer(PEER_A)
            .data(b"a")
            .attr(typ, &[])
            .encode();
        assert!(h.client_sends(h.at(1), c.five, &m).is_empty(), "{typ:#06x}");
    }
    assert_eq!(dropped(&h, DropReason::BadIndication), 2);
    // A comprehension-optional one is ignored and the data relayed.
    let m = Request::new(method::SEND)
        .class(Class::Indication)
        .peer(PEER_A)
        .data(b"a")
        .attr(0x8FF0, &[])
        .encode();
    assert_eq!(h.client_sends(h.at(1), c.five, &m).len(), 1);
}

#[test]
fn send_indication_without_peer_is_bad_indication() {
    let mut h = Harness::new();
    let c = h.allocated(43000);
    let m = Request::new(method::SEND)
        .class(Class::Indication)
        .data(b"a")
        .encode();
    assert!(h.client_sends(h.at(1), c.five, &m).is_empty());
    assert_eq!(dropped(&h, DropReason::BadIndication), 1);
}

// ---- too many attributes ----

fn binding_with_tiny_attributes(n: usize) -> Vec<u8> {
    let mut r = Request::new(method::BINDING);
    for _ in 0..n {
        r = r.attr(0x8023, b"");
    }
    r.encode()
}

#[test]
fn thousand_tiny_attributes_are_400() {
    let mut h = Harness::new();
    let m = binding_with_tiny_attributes(1000);
    assert_eq!(m.len(), 20 + 4000);
    let resp = h.transact(h.t0, five(43000), &m);
    assert_eq!(error_code(&resp), Some(400));
    assert_eq!(h.stats().binding_requests, [0; Transport::COUNT]);
}

#[test]
fn sixty_four_attributes_are_fine() {
    let mut h = Harness::new();
    let resp = h.transact(h.t0, five(43000), &binding_with_tiny_attributes(64));
    assert_eq!(class_of(&resp), Class::Success);
}

#[test]
fn sixty_five_attributes_are_400() {
    let mut h = Harness::new();
    let resp = h.transact(h.t0, five(43000), &binding_with_tiny_attributes(65));
    assert_eq!(error_code(&resp), Some(400));
}

#[test]
fn allocate_with_too_many_attributes_is_counted_bad_request() {
    let mut h = Harness::new();
    let mut r = Request::allocate();
    for _ in 0..100 {
        r = r.attr(0x8023, b"");
    }
    let resp = h.transact(h.t0, five(43000), &r.encode());
    assert_eq!(error_code(&resp), Some(400));
    assert_eq!(
        h.stats().allocations[Transport::Udp.index()][AllocResult::BadRequest.index()],
        1
    );
}

// ---- bad MESSAGE-INTEGRITY ----

macro_rules! integrity_of_length_is_400 {
    ($($name:ident: $len:expr,)+) => {$(
        #[test]
        fn $name() {
            let mut h = Harness::new();
            let mut c = Client::new(43000, Creds::alice());
            h.fetch_nonce(h.t0, &mut c);
            let m = Request::allocate()
                .attr(attr::USERNAME, c.creds.username.as_bytes())
                .attr(attr::REALM, REALM.as_bytes())
                .attr(attr::NONCE, &c.nonce)
                .attr(attr::MESSAGE_INTEGRITY, &[0xAB; $len])
                .encode();
            let resp = h.transact(h.t0, c.five, &m);
            assert_eq!(error_code(&resp), Some(400));
            assert!(!attr_types(&resp).contains(&attr::MESSAGE_INTEGRITY));
            assert_eq!(h.server.allocations(), 0);
        }
    )+};
}

integrity_of_length_is_400! {
    integrity_of_0_bytes_is_400: 0,
    integrity_of_1_byte_is_400: 1,
    integrity_of_19_bytes_is_400: 19,
    integrity_of_21_bytes_is_400: 21,
    integrity_of_32_bytes_is_400: 32,
}

#[test]
fn integrity_of_20_zero_bytes_is_401() {
    // Right length, wrong value: an authentication failure, not a malformed request.
    let mut h = Harness::new();
    let mut c = Client::new(43000, Creds::alice());
    h.fetch_nonce(h.t0, &mut c);
    let m = Request::allocate()
        .attr(attr::USERNAME, c.creds.username.as_bytes())
        .attr(attr::REALM, REALM.as_bytes())
        .attr(attr::NONCE, &c.nonce)
        .attr(attr::MESSAGE_INTEGRITY, &[0; 20])
        .encode();
    let resp = h.transact(h.t0, c.five, &m);
    assert_eq!(error_code(&resp), Some(401));
}

// ---- peers may send anything ----

#[test]
fn peer_garbage_is_relayed_opaquely() {
    let mut h = Harness::new();
    let c = h.allocated(43000);
    h.create_permission(h.t0, &c, &[PEER_A]);
    // Looks like a STUN header with a bad length; peers' payloads are never parsed.
    let junk = [0x00, 0x01, 0xFF, 0xFF, 0x21, 0x12, 0xA4, 0x42, 0xFF];
    let outs = h.peer_sends(h.at(1), c.relay(), PEER_A, &junk);
    let ind = response_to(&outs, c.five);
    assert_eq!(attr_value(&ind, attr::DATA).unwrap(), junk);
}

#[test]
fn empty_peer_datagram_is_relayed() {
    let mut h = Harness::new();
    let c = h.allocated(43000);
    h.channel_bind(h.t0, &c, 0x4000, PEER_A);
    let outs = h.peer_sends(h.at(1), c.relay(), PEER_A, b"");
    assert_eq!(response_to(&outs, c.five), vec![0x40, 0x00, 0x00, 0x00]);
}
