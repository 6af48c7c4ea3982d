//! The STUN decoder and ChannelData framing on arbitrary bytes.
//!
//! Oracles: no panic; a message that frames has attribute boundaries inside it; a message that
//! decodes with MESSAGE-INTEGRITY verifies under the key it was re-signed with.
#![no_main]

use libfuzzer_sys::fuzz_target;
use relay_proto::stun::{self, attr, Attrs, Encoder, Message, HEADER_LEN};

const KEY: &[u8] = b"0123456789abcdef";

fuzz_target!(|data: &[u8]| {
    if let Some((_, payload)) = stun::parse_channel_data(data) {
        assert!(payload.len() + stun::CHANNEL_HEADER_LEN <= data.len());
    }
    let Ok(msg) = Message::parse(data) else {
        return;
    };
    for (_, value, at) in msg.attributes() {
        assert!(at >= HEADER_LEN && at + 4 + value.len() <= data.len());
    }
    let Ok(attrs) = Attrs::decode(&msg) else {
        return;
    };
    let _ = attrs.verify_integrity(&msg, KEY);
    assert!(attrs.peers().count() <= stun::MAX_ATTRIBUTES);
    assert_eq!(attrs.peers().next(), attrs.peer);

    // Re-encode what was understood, sign it, and check it decodes to the same and verifies.
    let mut buf = Vec::new();
    let mut e = Encoder::new(&mut buf, msg.method(), msg.class(), msg.transaction_id());
    if let Some(u) = attrs.username {
        e.attr(attr::USERNAME, u);
    }
    if let Some(l) = attrs.lifetime {
        e.u32_attr(attr::LIFETIME, l);
    }
    for p in attrs.peers() {
        e.xor_address(attr::XOR_PEER_ADDRESS, p);
    }
    if let Some(d) = attrs.data {
        e.attr(attr::DATA, d);
    }
    e.integrity(KEY);
    if msg.has_fingerprint() {
        e.fingerprint();
    }
    e.finish();
    let again = Message::parse(&buf).expect("re-encoded message does not frame");
    let decoded = Attrs::decode(&again).expect("re-encoded message does not decode");
    assert_eq!(decoded.username, attrs.username);
    assert_eq!(decoded.lifetime, attrs.lifetime);
    assert_eq!(decoded.data, attrs.data);
    assert!(decoded.peers().eq(attrs.peers()));
    assert!(decoded.verify_integrity(&again, KEY));
});
