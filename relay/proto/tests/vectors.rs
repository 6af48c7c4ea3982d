//! RFC 5769 test vectors: decoding, MESSAGE-INTEGRITY, FINGERPRINT, XOR-MAPPED-ADDRESS, and
//! re-encoding with `stun::Encoder`.
//!
//! The vectors of §2.1–§2.3 pad attributes with spaces (0x20), which the decoder must accept. The
//! encoder always pads with zeros (RFC 8489 §14 lets the sender pick the padding), so a
//! re-encoding of §2.2/§2.3 is compared with the vector whose padding byte is zeroed and whose
//! MESSAGE-INTEGRITY and FINGERPRINT are recomputed here, with the `hmac`/`crc32fast` crates, not
//! with the code under test. §2.4 pads with zeros and is compared byte for byte as published.
#![allow(clippy::unwrap_used)]

mod common;

use std::net::SocketAddr;

use hmac::{Hmac, Mac};
use relay_proto::stun::{attr, method, Attrs, Class, Encoder, FrameError, Message};
use relay_proto::{auth, Transport};
use sha1::Sha1;

use common::{error_code, five, unknown_attributes, Harness};

/// Short-term password of §2.1–§2.3.
const PASSWORD: &[u8] = b"VOkJxbRl1RmTxUk/WvJxBt";
/// Transaction id of §2.1–§2.3.
const TID: [u8; 12] = [
    0xb7, 0xe7, 0xa7, 0x01, 0xbc, 0x34, 0xd6, 0x86, 0xfa, 0x87, 0xdf, 0xae,
];

/// RFC 5769 §2.1: sample request.
#[rustfmt::skip]
const SAMPLE_REQUEST: &[u8] = &[
    0x00, 0x01, 0x00, 0x58, //    Request type and message length
    0x21, 0x12, 0xa4, 0x42, //    Magic cookie
    0xb7, 0xe7, 0xa7, 0x01, // }
    0xbc, 0x34, 0xd6, 0x86, // }  Transaction ID
    0xfa, 0x87, 0xdf, 0xae, // }
    0x80, 0x22, 0x00, 0x10, //    SOFTWARE attribute header
    0x53, 0x54, 0x55, 0x4e, // }
    0x20, 0x74, 0x65, 0x73, // }  User-agent...
    0x74, 0x20, 0x63, 0x6c, // }  ...name
    0x69, 0x65, 0x6e, 0x74, // }
    0x00, 0x24, 0x00, 0x04, //    PRIORITY attribute header
    0x6e, 0x00, 0x01, 0xff, //    ICE priority value
    0x80, 0x29, 0x00, 0x08, //    ICE-CONTROLLED attribute header
    0x93, 0x2f, 0xf9, 0xb1, // }  Pseudo-random tie breaker...
    0x51, 0x26, 0x3b, 0x36, // }   ...for ICE control
    0x00, 0x06, 0x00, 0x09, //    USERNAME attribute header
    0x65, 0x76, 0x74, 0x6a, // }
    0x3a, 0x68, 0x36, 0x76, // }  Username (9 bytes) and padding (3 bytes)
    0x59, 0x20, 0x20, 0x20, // }
    0x00, 0x08, 0x00, 0x14, //    MESSAGE-INTEGRITY attribute header
    0x9a, 0xea, 0xa7, 0x0c, // }
    0xbf, 0xd8, 0xcb, 0x56, // }
    0x78, 0x1e, 0xf2, 0xb5, // }  HMAC-SHA1 fingerprint
    0xb2, 0xd3, 0xf2, 0x49, // }
    0xc1, 0xb5, 0x71, 0xa2, // }
    0x80, 0x28, 0x00, 0x04, //    FINGERPRINT attribute header
    0xe5, 0x7a, 0x3b, 0xcf, //    CRC32 fingerprint
];

/// RFC 5769 §2.2: sample IPv4 response.
#[rustfmt::skip]
const IPV4_RESPONSE: &[u8] = &[
    0x01, 0x01, 0x00, 0x3c, //    Response type and message length
    0x21, 0x12, 0xa4, 0x42, //    Magic cookie
    0xb7, 0xe7, 0xa7, 0x01, // }
    0xbc, 0x34, 0xd6, 0x86, // }  Transaction ID
    0xfa, 0x87, 0xdf, 0xae, // }
    0x80, 0x22, 0x00, 0x0b, //    SOFTWARE attribute header
    0x74, 0x65, 0x73, 0x74, // }
    0x20, 0x76, 0x65, 0x63, // }  UTF-8 server name
    0x74, 0x6f, 0x72, 0x20, // }
    0x00, 0x20, 0x00, 0x08, //    XOR-MAPPED-ADDRESS attribute header
    0x00, 0x01, 0xa1, 0x47, //    Address family (IPv4) and xor'd mapped port number
    0xe1, 0x12, 0xa6, 0x43, //    Xor'd mapped IPv4 address
    0x00, 0x08, 0x00, 0x14, //    MESSAGE-INTEGRITY attribute header
    0x2b, 0x91, 0xf5, 0x99, // }
    0xfd, 0x9e, 0x90, 0xc3, // }
    0x8c, 0x74, 0x89, 0xf9, // }  HMAC-SHA1 fingerprint
    0x2a, 0xf9, 0xba, 0x53, // }
    0xf0, 0x6b, 0xe7, 0xd7, // }
    0x80, 0x28, 0x00, 0x04, //    FINGERPRINT attribute header
    0xc0, 0x7d, 0x4c, 0x96, //    CRC32 fingerprint
];

/// RFC 5769 §2.3: sample IPv6 response.
#[rustfmt::skip]
const IPV6_RESPONSE: &[u8] = &[
    0x01, 0x01, 0x00, 0x48, //    Response type and message length
    0x21, 0x12, 0xa4, 0x42, //    Magic cookie
    0xb7, 0xe7, 0xa7, 0x01, // }
    0xbc, 0x34, 0xd6, 0x86, // }  Transaction ID
    0xfa, 0x87, 0xdf, 0xae, // }
    0x80, 0x22, 0x00, 0x0b, //    SOFTWARE attribute header
    0x74, 0x65, 0x73, 0x74, // }
    0x20, 0x76, 0x65, 0x63, // }  UTF-8 server name
    0x74, 0x6f, 0x72, 0x20, // }
    0x00, 0x20, 0x00, 0x14, //    XOR-MAPPED-ADDRESS attribute header
    0x00, 0x02, 0xa1, 0x47, //    Address family (IPv6) and xor'd mapped port number
    0x01, 0x13, 0xa9, 0xfa, // }
    0xa5, 0xd3, 0xf1, 0x79, // }  Xor'd mapped IPv6 address
    0xbc, 0x25, 0xf4, 0xb5, // }
    0xbe, 0xd2, 0xb9, 0xd9, // }
    0x00, 0x08, 0x00, 0x14, //    MESSAGE-INTEGRITY attribute header
    0xa3, 0x82, 0x95, 0x4e, // }
    0x4b, 0xe6, 0x7b, 0xf1, // }
    0x17, 0x84, 0xc9, 0x7c, // }  HMAC-SHA1 fingerprint
    0x82, 0x92, 0xc2, 0x75, // }
    0xbf, 0xe3, 0xed, 0x41, // }
    0x80, 0x28, 0x00, 0x04, //    FINGERPRINT attribute header
    0xc8, 0xfb, 0x0b, 0x4c, //    CRC32 fingerprint
];

/// RFC 5769 §2.4: sample request with long-term authentication.
#[rustfmt::skip]
const LONG_TERM_REQUEST: &[u8] = &[
    0x00, 0x01, 0x00, 0x60, //    Request type and message length
    0x21, 0x12, 0xa4, 0x42, //    Magic cookie
    0x78, 0xad, 0x34, 0x33, // }
    0xc6, 0xad, 0x72, 0xc0, // }  Transaction ID
    0x29, 0xda, 0x41, 0x2e, // }
    0x00, 0x06, 0x00, 0x12, //    USERNAME attribute header
    0xe3, 0x83, 0x9e, 0xe3, // }
    0x83, 0x88, 0xe3, 0x83, // }
    0xaa, 0xe3, 0x83, 0x83, // }  Username value (18 bytes) and padding (2 bytes)
    0xe3, 0x82, 0xaf, 0xe3, // }
    0x82, 0xb9, 0x00, 0x00, // }
    0x00, 0x15, 0x00, 0x1c, //    NONCE attribute header
    0x66, 0x2f, 0x2f, 0x34, // }
    0x39, 0x39, 0x6b, 0x39, // }
    0x35, 0x34, 0x64, 0x36, // }
    0x4f, 0x4c, 0x33, 0x34, // }  Nonce value
    0x6f, 0x4c, 0x39, 0x46, // }
    0x53, 0x54, 0x76, 0x79, // }
    0x36, 0x34, 0x73, 0x41, // }
    0x00, 0x14, 0x00, 0x0b, //    REALM attribute header
    0x65, 0x78, 0x61, 0x6d, // }
    0x70, 0x6c, 0x65, 0x2e, // }  Realm value (11 bytes) and padding (1 byte)
    0x6f, 0x72, 0x67, 0x00, // }
    0x00, 0x08, 0x00, 0x14, //    MESSAGE-INTEGRITY attribute header
    0xf6, 0x70, 0x24, 0x65, // }
    0x6d, 0xd6, 0x4a, 0x3e, // }
    0x02, 0xb8, 0xe0, 0x71, // }  HMAC-SHA1 fingerprint
    0x2e, 0x85, 0xc9, 0xa2, // }
    0x8c, 0xa8, 0x96, 0x66, // }
];

/// "マトリックス" (the username of §2.4, already SASLprep'ed).
const MATRIX_USER: &str = "\u{30DE}\u{30C8}\u{30EA}\u{30C3}\u{30AF}\u{30B9}";
/// "The\u{00AD}M\u{00AA}tr\u{2168}" after SASLprep.
const MATRIX_PASSWORD: &str = "TheMatrIX";
const MATRIX_NONCE: &[u8] = b"f//499k954d6OL34oL9FSTvy64sA";

fn long_term_key() -> [u8; 16] {
    auth::long_term_key(
        MATRIX_USER.as_bytes(),
        b"example.org",
        MATRIX_PASSWORD.as_bytes(),
    )
}

fn decode(bytes: &[u8]) -> (Message<'_>, Attrs<'_>) {
    let msg = Message::parse(bytes).unwrap();
    let attrs = Attrs::decode(&msg).unwrap();
    (msg, attrs)
}

fn xor_mapped(bytes: &[u8]) -> SocketAddr {
    let msg = Message::parse(bytes).unwrap();
    let (_, v, _) = msg
        .attributes()
        .find(|(t, _, _)| *t == attr::XOR_MAPPED_ADDRESS)
        .unwrap();
    relay_proto::stun::decode_xor_address(v, &msg.transaction_id()).unwrap()
}

/// Offset of the first attribute of type `typ`, walking the message independently.
fn offset_of(msg: &[u8], typ: u16) -> usize {
    let mut off = 20;
    while off + 4 <= msg.len() {
        let t = u16::from_be_bytes([msg[off], msg[off + 1]]);
        let len = usize::from(u16::from_be_bytes([msg[off + 2], msg[off + 3]]));
        if t == typ {
            return off;
        }
        off += 4 + len.div_ceil(4) * 4;
    }
    panic!("attribute {typ:#06x} not found");
}

/// The vector with the padding bytes at `pad` zeroed and MESSAGE-INTEGRITY/FINGERPRINT
/// recomputed with reference implementations (not the crate under test).
fn zero_padded(vector: &[u8], pad: &[usize], key: &[u8]) -> Vec<u8> {
    let mut v = vector.to_vec();
    for &i in pad {
        assert_eq!(v[i], 0x20, "byte {i} is not space padding");
        v[i] = 0;
    }
    let mi = offset_of(&v, attr::MESSAGE_INTEGRITY);
    let fp = offset_of(&v, attr::FINGERPRINT);
    // HMAC over the message up to MESSAGE-INTEGRITY, with a length that ends after it.
    let mut covered = v[..mi].to_vec();
    covered[2..4].copy_from_slice(&((mi + 24 - 20) as u16).to_be_bytes());
    let mut mac = Hmac::<Sha1>::new_from_slice(key).unwrap();
    mac.update(&covered);
    v[mi + 4..mi + 24].copy_from_slice(&mac.finalize().into_bytes());
    let crc = crc32fast::hash(&v[..fp]) ^ 0x5354_554E;
    v[fp + 4..fp + 8].copy_from_slice(&crc.to_be_bytes());
    v
}

fn encode_response(mapped: SocketAddr) -> Vec<u8> {
    let mut buf = Vec::new();
    let mut e = Encoder::new(&mut buf, method::BINDING, Class::Success, TID);
    e.attr(attr::SOFTWARE, b"test vector")
        .xor_address(attr::XOR_MAPPED_ADDRESS, mapped)
        .integrity(PASSWORD)
        .fingerprint();
    e.finish();
    buf
}

// ---- §2.1 ----

#[test]
fn sample_request_frames_with_fingerprint() {
    let msg = Message::parse(SAMPLE_REQUEST).unwrap();
    assert!(msg.has_fingerprint());
    assert_eq!(msg.class(), Class::Request);
    assert_eq!(msg.method(), method::BINDING);
    assert_eq!(msg.transaction_id(), TID);
}

#[test]
fn sample_request_attributes_decode_despite_space_padding() {
    let (_, a) = decode(SAMPLE_REQUEST);
    assert_eq!(a.software, Some(&b"STUN test client"[..]));
    assert_eq!(a.username, Some(&b"evtj:h6vY"[..]));
    // PRIORITY (0x0024) is comprehension-required and not TURN's: collected, not fatal.
    assert_eq!(a.unknown.as_slice(), &[0x0024]);
}

#[test]
fn sample_request_integrity_verifies_with_short_term_password() {
    let (msg, a) = decode(SAMPLE_REQUEST);
    assert!(a.verify_integrity(&msg, PASSWORD));
    assert!(!a.verify_integrity(&msg, b"VOkJxbRl1RmTxUk/WvJxBT"));
}

#[test]
fn sample_request_to_server_is_answered_420_priority() {
    let mut h = Harness::new();
    let outs = h.client_sends(h.t0, five(40000), SAMPLE_REQUEST);
    let resp = common::response_to(&outs, five(40000));
    assert_eq!(error_code(&resp), Some(420));
    assert_eq!(unknown_attributes(&resp), vec![0x0024]);
    // The request had FINGERPRINT, so the answer has one too.
    assert!(Message::parse(&resp).unwrap().has_fingerprint());
    assert_eq!(Message::parse(&resp).unwrap().transaction_id(), TID);
}

// ---- §2.2 ----

#[test]
fn ipv4_response_decodes() {
    let (msg, a) = decode(IPV4_RESPONSE);
    assert!(msg.has_fingerprint());
    assert_eq!(msg.class(), Class::Success);
    assert_eq!(msg.method(), method::BINDING);
    assert_eq!(a.software, Some(&b"test vector"[..]));
    assert!(a.verify_integrity(&msg, PASSWORD));
    assert_eq!(
        xor_mapped(IPV4_RESPONSE),
        "192.0.2.1:32853".parse().unwrap()
    );
}

#[test]
fn ipv4_response_reencodes_to_vector_bytes() {
    let ours = encode_response("192.0.2.1:32853".parse().unwrap());
    assert_eq!(ours.len(), IPV4_RESPONSE.len());
    // Byte 35 is the space padding SOFTWARE; MESSAGE-INTEGRITY (52..72) and FINGERPRINT
    // (76..80) hash over it. Everything else is identical to the vector.
    for (i, (a, b)) in ours.iter().zip(IPV4_RESPONSE).enumerate() {
        if i != 35 && !(52..72).contains(&i) && !(76..80).contains(&i) {
            assert_eq!(a, b, "byte {i}");
        }
    }
    assert_eq!(ours, zero_padded(IPV4_RESPONSE, &[35], PASSWORD));
}

// ---- §2.3 ----

#[test]
fn ipv6_response_decodes() {
    let (msg, a) = decode(IPV6_RESPONSE);
    assert!(msg.has_fingerprint());
    assert_eq!(msg.class(), Class::Success);
    assert_eq!(a.software, Some(&b"test vector"[..]));
    assert!(a.verify_integrity(&msg, PASSWORD));
    assert_eq!(
        xor_mapped(IPV6_RESPONSE),
        "[2001:db8:1234:5678:11:2233:4455:6677]:32853"
            .parse()
            .unwrap()
    );
}

#[test]
fn ipv6_response_reencodes_to_vector_bytes() {
    let ours = encode_response(
        "[2001:db8:1234:5678:11:2233:4455:6677]:32853"
            .parse()
            .unwrap(),
    );
    assert_eq!(ours, zero_padded(IPV6_RESPONSE, &[35], PASSWORD));
    assert_eq!(ours[36..60], IPV6_RESPONSE[36..60], "XOR-MAPPED-ADDRESS");
}

// ---- §2.4 ----

#[test]
fn long_term_request_decodes() {
    let (msg, a) = decode(LONG_TERM_REQUEST);
    assert!(!msg.has_fingerprint());
    assert_eq!(msg.class(), Class::Request);
    assert_eq!(msg.method(), method::BINDING);
    assert_eq!(a.username, Some(MATRIX_USER.as_bytes()));
    assert_eq!(a.nonce, Some(MATRIX_NONCE));
    assert_eq!(a.realm, Some(&b"example.org"[..]));
    assert!(a.unknown.as_slice().is_empty());
}

#[test]
fn long_term_request_integrity_verifies_with_md5_key() {
    let (msg, a) = decode(LONG_TERM_REQUEST);
    assert!(a.verify_integrity(&msg, &long_term_key()));
    let wrong = auth::long_term_key(MATRIX_USER.as_bytes(), b"example.org", b"TheMatrix");
    assert!(!a.verify_integrity(&msg, &wrong));
}

#[test]
fn long_term_request_reencodes_byte_for_byte() {
    let msg = Message::parse(LONG_TERM_REQUEST).unwrap();
    let mut buf = Vec::new();
    let mut e = Encoder::new(
        &mut buf,
        method::BINDING,
        Class::Request,
        msg.transaction_id(),
    );
    e.attr(attr::USERNAME, MATRIX_USER.as_bytes())
        .attr(attr::NONCE, MATRIX_NONCE)
        .attr(attr::REALM, b"example.org")
        .integrity(&long_term_key());
    e.finish();
    assert_eq!(buf, LONG_TERM_REQUEST);
}

// ---- corruption ----

#[test]
fn corrupted_vector_fails_fingerprint() {
    let mut v = IPV4_RESPONSE.to_vec();
    v[45] ^= 0x01; // inside XOR-MAPPED-ADDRESS
    assert_eq!(Message::parse(&v).unwrap_err(), FrameError::BadFingerprint);
}

#[test]
fn corrupted_long_term_request_fails_integrity() {
    let mut v = LONG_TERM_REQUEST.to_vec();
    v[50] ^= 0x01; // inside NONCE
    let (msg, a) = decode(&v);
    assert!(!a.verify_integrity(&msg, &long_term_key()));
}

#[test]
fn space_padding_is_covered_by_integrity() {
    // The padding byte is not part of any value, but it is hashed: changing it must break both
    // hashes, which proves the decoder really accepted the vector's 0x20, not a normalised copy.
    let mut v = IPV4_RESPONSE.to_vec();
    v[35] = 0;
    assert_eq!(Message::parse(&v).unwrap_err(), FrameError::BadFingerprint);
    let fp = offset_of(&v, attr::FINGERPRINT);
    let crc = crc32fast::hash(&v[..fp]) ^ 0x5354_554E;
    v[fp + 4..fp + 8].copy_from_slice(&crc.to_be_bytes());
    let (msg, a) = decode(&v);
    assert!(!a.verify_integrity(&msg, PASSWORD));
}

#[test]
fn long_term_vector_to_server_is_a_plain_binding() {
    // Binding is never authenticated: the foreign NONCE and credentials are not even looked at.
    let mut h = Harness::new();
    let resp = h.transact(h.t0, five(40001), LONG_TERM_REQUEST);
    assert_eq!(common::class_of(&resp), Class::Success);
    assert_eq!(xor_mapped(&resp), five(40001).client);
    assert_eq!(h.stats().binding_requests[Transport::Udp.index()], 1);
    assert_eq!(h.stats().binding_requests.iter().sum::<u64>(), 1);
    assert_eq!(h.stats().auth_failures.iter().sum::<u64>(), 0);
}
