//! Property tests: no input panics the codec or the core, every datagram is either answered,
//! relayed or counted as dropped, encode→decode round-trips, and the REST username parser
//! accepts exactly `digits:non-empty`.
#![allow(clippy::unwrap_used)]

mod common;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use proptest::prelude::*;
use relay_proto::auth::{self, NonceCheck, NonceKey};
use relay_proto::stun::{self, attr, method, Attrs, Class, Encoder, Message};

use common::*;

// ---- strategies ----

fn socket_addr() -> impl Strategy<Value = SocketAddr> {
    prop_oneof![
        (any::<u32>(), any::<u16>())
            .prop_map(|(ip, port)| SocketAddr::new(IpAddr::V4(Ipv4Addr::from(ip)), port)),
        (any::<u128>(), any::<u16>())
            .prop_map(|(ip, port)| SocketAddr::new(IpAddr::V6(Ipv6Addr::from(ip)), port)),
    ]
}

/// Attribute types the decoder cares about, plus some it does not.
fn attr_type() -> impl Strategy<Value = u16> {
    prop_oneof![
        3 => prop::sample::select(vec![
            attr::MAPPED_ADDRESS,
            attr::USERNAME,
            attr::MESSAGE_INTEGRITY,
            attr::ERROR_CODE,
            attr::UNKNOWN_ATTRIBUTES,
            attr::CHANNEL_NUMBER,
            attr::LIFETIME,
            attr::XOR_PEER_ADDRESS,
            attr::DATA,
            attr::REALM,
            attr::NONCE,
            attr::XOR_RELAYED_ADDRESS,
            attr::REQUESTED_ADDRESS_FAMILY,
            attr::EVEN_PORT,
            attr::REQUESTED_TRANSPORT,
            attr::DONT_FRAGMENT,
            attr::XOR_MAPPED_ADDRESS,
            attr::RESERVATION_TOKEN,
            attr::ADDITIONAL_ADDRESS_FAMILY,
            attr::ADDRESS_ERROR_CODE,
            attr::SOFTWARE,
            attr::FINGERPRINT,
        ]),
        1 => any::<u16>(),
    ]
}

/// Well-framed STUN messages with random attributes: they get past `Message::parse` (unless a
/// random FINGERPRINT is wrong) and exercise attribute decoding and the request handlers.
fn stunish() -> impl Strategy<Value = Vec<u8>> {
    (
        prop::sample::select(vec![
            method::BINDING,
            method::ALLOCATE,
            method::REFRESH,
            method::SEND,
            method::DATA,
            method::CREATE_PERMISSION,
            method::CHANNEL_BIND,
            0x0FFF,
        ]),
        prop::sample::select(vec![
            Class::Request,
            Class::Indication,
            Class::Success,
            Class::Error,
        ]),
        any::<[u8; 12]>(),
        prop::collection::vec(
            (attr_type(), prop::collection::vec(any::<u8>(), 0..40)),
            0..12,
        ),
        any::<bool>(),
    )
        .prop_map(|(m, class, tid, attrs, fp)| {
            let mut buf = Vec::new();
            let mut e = Encoder::new(&mut buf, m, class, tid);
            for (t, v) in &attrs {
                e.attr(*t, v);
            }
            if fp {
                e.fingerprint();
            }
            e.finish();
            buf
        })
}

fn channel_dataish() -> impl Strategy<Value = Vec<u8>> {
    (
        0x4000u16..=0x4002,
        prop::collection::vec(any::<u8>(), 0..64),
        0usize..5,
    )
        .prop_map(|(n, payload, pad)| {
            let mut v = channel_data(n, &payload);
            v.resize(v.len() + pad, 0);
            v
        })
}

fn datagram() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        prop::collection::vec(any::<u8>(), 0..256),
        stunish(),
        channel_dataish(),
        // Random bytes behind a plausible STUN header.
        (0u8..=3, prop::collection::vec(any::<u8>(), 16..200)).prop_map(|(b0, rest)| {
            let mut v = vec![b0, rest[0], 0, 0, 0x21, 0x12, 0xA4, 0x42];
            v.extend_from_slice(&rest[1..]);
            if v.len() >= 20 {
                let len = (v.len() - 20) as u16;
                v[2..4].copy_from_slice(&len.to_be_bytes());
            }
            v
        }),
    ]
}

/// A harness with one allocation on `five(45000)`, a permission for PEER_A and PEER_B, and
/// channel 0x4000 bound to PEER_A.
fn busy_harness() -> (Harness, Client) {
    let mut h = Harness::new();
    let c = h.allocated(45000);
    h.create_permission(h.t0, &c, &[PEER_B]);
    h.channel_bind(h.t0, &c, 0x4000, PEER_A);
    (h, c)
}

fn drops(h: &Harness) -> u64 {
    h.stats().dropped.iter().sum()
}

// ---- the core ----

proptest! {
    #[test]
    fn handle_client_answers_relays_or_counts_every_datagram(d in datagram()) {
        let (mut h, c) = busy_harness();
        let before = drops(&h);
        let outs = h.client_sends(h.at(1), c.five, &d);
        let sent = transmits(&outs).len() as u64;
        prop_assert_eq!(sent + drops(&h) - before, 1, "outputs {:?}", outs);
    }

    #[test]
    fn handle_client_from_stranger_never_panics(d in datagram()) {
        let (mut h, _) = busy_harness();
        let before = drops(&h);
        let outs = h.client_sends(h.at(1), five(45999), &d);
        // Without an allocation nothing is relayed: only answers to the stranger, or drops.
        for (dest, _) in transmits(&outs) {
            prop_assert_eq!(dest, relay_proto::Dest::Client(five(45999)));
        }
        prop_assert_eq!(transmits(&outs).len() as u64 + drops(&h) - before, 1);
    }

    #[test]
    fn handle_peer_relays_or_counts_every_datagram(
        from in prop_oneof![Just(PEER_A), Just(PEER_B), socket_addr()],
        d in prop::collection::vec(any::<u8>(), 0..2048),
    ) {
        let (mut h, c) = busy_harness();
        let before = drops(&h);
        let outs = h.peer_sends(h.at(1), c.relay(), from, &d);
        let sent = transmits(&outs);
        prop_assert_eq!(sent.len() as u64 + drops(&h) - before, 1);
        for (dest, _) in sent {
            prop_assert_eq!(dest, relay_proto::Dest::Client(c.five));
        }
    }

    #[test]
    fn handle_timeout_at_any_time_never_panics(secs in 0u64..100_000) {
        let (mut h, _) = busy_harness();
        h.timeout(h.at(secs));
        prop_assert_eq!(h.server.allocations(), usize::from(secs < 600));
    }

    #[test]
    fn message_parse_never_panics(d in prop::collection::vec(any::<u8>(), 0..512)) {
        if let Ok(m) = Message::parse(&d) {
            let n = m.attributes().count();
            prop_assert!(n <= (d.len() - stun::HEADER_LEN) / 4);
            if let Ok(a) = Attrs::decode(&m) {
                let _ = a.verify_integrity(&m, b"key");
                prop_assert!(a.peers().count() <= stun::MAX_ATTRIBUTES);
                prop_assert_eq!(a.peers().next(), a.peer);
            }
        }
    }

    #[test]
    fn stunish_messages_decode_without_panic(d in stunish()) {
        if let Ok(m) = Message::parse(&d) {
            prop_assert_eq!(m.as_bytes().len(), d.len());
            if let Ok(a) = Attrs::decode(&m) {
                let _ = a.verify_integrity(&m, &[0u8; 16]);
            }
        }
    }

    #[test]
    fn parse_channel_data_never_panics(d in prop::collection::vec(any::<u8>(), 0..128)) {
        if let Some((_, data)) = stun::parse_channel_data(&d) {
            prop_assert!(data.len() + 4 <= d.len());
            prop_assert!(d.len() <= 4 + data.len().div_ceil(4) * 4);
        }
    }

    #[test]
    fn channel_data_round_trips(n in any::<u16>(), payload in prop::collection::vec(any::<u8>(), 0..300)) {
        let cd = channel_data(n, &payload);
        prop_assert_eq!(stun::parse_channel_data(&cd), Some((n, &payload[..])));
    }
}

// ---- encode → decode ----

#[derive(Debug, Clone)]
enum Field {
    Username(String),
    Lifetime(u32),
    Channel(u16),
    Peer(SocketAddr),
    Data(Vec<u8>),
}

#[derive(Debug, Clone)]
struct Msg {
    method: u16,
    class: Class,
    tid: [u8; 12],
    fields: Vec<Field>,
    key: Option<[u8; 16]>,
    fingerprint: bool,
}

fn msg() -> impl Strategy<Value = Msg> {
    (
        prop::sample::select(vec![
            method::BINDING,
            method::ALLOCATE,
            method::REFRESH,
            method::CREATE_PERMISSION,
            method::CHANNEL_BIND,
        ]),
        prop::sample::select(vec![Class::Request, Class::Success, Class::Error]),
        any::<[u8; 12]>(),
        prop::option::of("[^\u{0}]{0,60}"),
        prop::option::of(any::<u32>()),
        prop::option::of(any::<u16>()),
        prop::collection::vec(socket_addr(), 0..=12),
        prop::option::of(prop::collection::vec(any::<u8>(), 0..300)),
        prop::option::of(any::<[u8; 16]>()),
        any::<bool>(),
    )
        .prop_flat_map(
            |(method, class, tid, user, life, chan, peers, data, key, fp)| {
                let mut fields = Vec::new();
                fields.extend(user.map(Field::Username));
                fields.extend(life.map(Field::Lifetime));
                fields.extend(chan.map(Field::Channel));
                fields.extend(peers.into_iter().map(Field::Peer));
                fields.extend(data.map(Field::Data));
                Just(fields).prop_shuffle().prop_map(move |fields| Msg {
                    method,
                    class,
                    tid,
                    fields,
                    key,
                    fingerprint: fp,
                })
            },
        )
}

fn encode(m: &Msg) -> Vec<u8> {
    let mut buf = Vec::new();
    let mut e = Encoder::new(&mut buf, m.method, m.class, m.tid);
    for f in &m.fields {
        match f {
            Field::Username(u) => e.attr(attr::USERNAME, u.as_bytes()),
            Field::Lifetime(l) => e.u32_attr(attr::LIFETIME, *l),
            Field::Channel(n) => e.attr(attr::CHANNEL_NUMBER, &[(n >> 8) as u8, *n as u8, 0, 0]),
            Field::Peer(p) => e.xor_address(attr::XOR_PEER_ADDRESS, *p),
            Field::Data(d) => e.attr(attr::DATA, d),
        };
    }
    if let Some(k) = &m.key {
        e.integrity(k);
    }
    if m.fingerprint {
        e.fingerprint();
    }
    e.finish();
    buf
}

proptest! {
    #[test]
    fn encode_decode_round_trips(m in msg()) {
        let bytes = encode(&m);
        let parsed = Message::parse(&bytes).unwrap();
        prop_assert_eq!(parsed.method(), m.method);
        prop_assert_eq!(parsed.class(), m.class);
        prop_assert_eq!(parsed.transaction_id(), m.tid);
        prop_assert_eq!(parsed.has_fingerprint(), m.fingerprint);
        let a = Attrs::decode(&parsed).unwrap();
        let mut peers = Vec::new();
        let (mut user, mut life, mut chan, mut data) = (None, None, None, None);
        for f in &m.fields {
            match f {
                Field::Username(u) => user = Some(u.as_bytes()),
                Field::Lifetime(l) => life = Some(*l),
                Field::Channel(n) => chan = Some(*n),
                Field::Peer(p) => peers.push(*p),
                Field::Data(d) => data = Some(&d[..]),
            }
        }
        prop_assert_eq!(a.username, user);
        prop_assert_eq!(a.lifetime, life);
        prop_assert_eq!(a.channel, chan);
        prop_assert_eq!(a.data, data);
        prop_assert_eq!(a.peers().collect::<Vec<_>>(), peers);
        prop_assert!(a.unknown.as_slice().is_empty());
        match &m.key {
            Some(k) => {
                prop_assert!(a.verify_integrity(&parsed, k));
                let mut other = *k;
                other[0] ^= 1;
                prop_assert!(!a.verify_integrity(&parsed, &other));
            }
            None => prop_assert!(!a.verify_integrity(&parsed, &[0u8; 16])),
        }
    }

    #[test]
    fn flipping_any_bit_breaks_integrity_or_framing(m in msg(), bit in any::<prop::sample::Index>()) {
        prop_assume!(m.key.is_some());
        let mut bytes = encode(&m);
        // Flip a bit covered by MESSAGE-INTEGRITY (header bytes 0..2 and 4.. up to the MAC),
        // never the length field, which framing already guards.
        let mi_end = bytes.len() - if m.fingerprint { 8 } else { 0 };
        let covered: Vec<usize> = (0..mi_end).filter(|i| !(2..4).contains(i)).collect();
        let i = bit.index(covered.len() * 8);
        bytes[covered[i / 8]] ^= 1 << (i % 8);
        let key = m.key.unwrap();
        let ok = Message::parse(&bytes)
            .ok()
            .and_then(|p| Attrs::decode(&p).ok().map(|a| a.verify_integrity(&p, &key)))
            .unwrap_or(false);
        prop_assert!(!ok);
    }
}

// ---- REST usernames ----

/// The specification: `expiry:user`, split at the first colon, expiry 1–19 ASCII digits, user
/// non-empty, the whole thing UTF-8.
fn rest_model(raw: &[u8]) -> Option<(u64, String)> {
    let s = std::str::from_utf8(raw).ok()?;
    let (e, u) = s.split_once(':')?;
    if u.is_empty() || e.is_empty() || e.len() > 19 || !e.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some((e.parse().ok()?, u.to_owned()))
}

proptest! {
    #[test]
    fn rest_username_on_arbitrary_bytes_matches_model(raw in prop::collection::vec(any::<u8>(), 0..64)) {
        let got = auth::parse_rest_username(&raw).ok().map(|r| (r.expiry, r.user.to_owned()));
        prop_assert_eq!(got, rest_model(&raw));
    }

    #[test]
    fn rest_username_accepts_digits_colon_nonempty(
        expiry in "[0-9]{1,19}",
        user in "[^\u{0}]{1,40}",
    ) {
        let raw = format!("{expiry}:{user}");
        let r = auth::parse_rest_username(raw.as_bytes()).unwrap();
        prop_assert_eq!(r.expiry, expiry.parse::<u64>().unwrap());
        prop_assert_eq!(r.user, user.as_str());
    }

    #[test]
    fn rest_username_near_misses_match_model(
        expiry in "[0-9+-]{0,21}",
        sep in prop::sample::select(vec!["", ":", "::", " :"]),
        user in "[a-z:]{0,5}",
    ) {
        let raw = format!("{expiry}{sep}{user}");
        let got = auth::parse_rest_username(raw.as_bytes()).ok().map(|r| (r.expiry, r.user.to_owned()));
        prop_assert_eq!(got, rest_model(raw.as_bytes()));
    }

    #[test]
    fn rest_password_verifies_through_the_server_key(user in "[a-z]{1,12}", expiry in 1_700_000_001u64..2_000_000_000) {
        let (name, pass) = relay_proto::rest_credentials(SECRET_ONE, &user, expiry);
        prop_assert_eq!(&pass, &relay_proto::rest_password(SECRET_ONE, &name));
        prop_assert_ne!(&pass, &relay_proto::rest_password(SECRET_TWO, &name));
        prop_assert_eq!(auth::parse_rest_username(name.as_bytes()).unwrap().user, user.as_str());
    }
}

// ---- nonces ----

proptest! {
    #[test]
    fn nonce_is_valid_for_its_lifetime_then_stale(
        issued in 1_000_000u64..4_000_000_000,
        age in 0u64..100_000,
        lifetime in 1u64..10_000,
        client in socket_addr(),
    ) {
        let k = NonceKey::new([3; 32]);
        let n = k.issue(issued, client);
        let want = if age <= lifetime { NonceCheck::Valid } else { NonceCheck::Stale };
        prop_assert_eq!(k.check(&n, issued + age, client, lifetime), want);
    }

    #[test]
    fn nonce_is_bound_to_client(client in socket_addr(), other in socket_addr()) {
        prop_assume!(client != other);
        let k = NonceKey::new([3; 32]);
        let n = k.issue(1_700_000_000, client);
        prop_assert_eq!(k.check(&n, 1_700_000_000, other, 600), NonceCheck::Invalid);
    }

    #[test]
    fn nonce_check_never_panics(nonce in prop::collection::vec(any::<u8>(), 0..40), now in any::<u64>()) {
        let k = NonceKey::new([3; 32]);
        let _ = k.check(&nonce, now, PEER_A, 600);
    }
}
