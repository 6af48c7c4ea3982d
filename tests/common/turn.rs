//! A one-shot TURN Allocate over UDP, built from `relay-proto`'s codec: enough to check from a
//! test whether the relay still accepts a set of credentials. Self-contained, so test binaries
//! without the rest of `common` can include it by path.
#![allow(dead_code, clippy::unwrap_used)]

use std::net::{SocketAddr, UdpSocket};

use relay_proto::stun::{attr, method, Class, Encoder, Message};

/// How long to wait for the relay's answer (a loaded CI machine; only a failing test waits).
const WAIT: std::time::Duration = std::time::Duration::from_secs(20);

/// REQUESTED-TRANSPORT UDP ([RFC 8656 §18.11](https://www.rfc-editor.org/rfc/rfc8656#section-18.11)).
const UDP: [u8; 4] = [17, 0, 0, 0];

/// Allocates at `server` with the long-term credentials `username`/`password` in `realm`:
/// `None` when granted, else the error code of the signed request's answer. A first unsigned
/// request fetches the nonce, as every TURN client does.
pub(crate) fn allocate(
    server: SocketAddr,
    realm: &str,
    username: &str,
    password: &str,
) -> Option<u16> {
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    sock.set_read_timeout(Some(WAIT)).unwrap();
    let key = relay_proto::auth::long_term_key(
        username.as_bytes(),
        realm.as_bytes(),
        password.as_bytes(),
    );
    let mut nonce: Option<Vec<u8>> = None;
    for round in 1u8..=2 {
        let tid = [round; 12];
        let mut buf = Vec::new();
        let mut e = Encoder::new(&mut buf, method::ALLOCATE, Class::Request, tid);
        e.attr(attr::REQUESTED_TRANSPORT, &UDP);
        if let Some(nonce) = &nonce {
            e.attr(attr::USERNAME, username.as_bytes())
                .attr(attr::REALM, realm.as_bytes())
                .attr(attr::NONCE, nonce)
                .integrity(&key);
        }
        e.finish();
        sock.send_to(&buf, server).unwrap();
        let mut answer = vec![0u8; 1500];
        let n = sock
            .recv(&mut answer)
            .unwrap_or_else(|e| panic!("no answer from the relay at {server}: {e}"));
        let msg = Message::parse(&answer[..n]).expect("the relay answers in STUN");
        assert_eq!(msg.transaction_id(), tid, "an answer to another request");
        let code = msg
            .attributes()
            .find(|(t, _, _)| *t == attr::ERROR_CODE)
            .map(|(_, v, _)| u16::from(v[2]) * 100 + u16::from(v[3]));
        match (&nonce, code) {
            (None, Some(401)) => {
                let (_, v, _) = msg
                    .attributes()
                    .find(|(t, _, _)| *t == attr::NONCE)
                    .expect("a 401 carries a NONCE");
                nonce = Some(v.to_vec());
            }
            _ => return code,
        }
    }
    panic!("the relay asked for a nonce twice");
}
