//! `auth::parse_rest_username` against its specification: `expiry:user`, split at the first
//! colon, expiry 1–19 ASCII digits, user non-empty, all UTF-8. And `auth::rest_group`: the user
//! part up to its first `.`, 1–64 characters of `[A-Za-z0-9_-]`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use relay_proto::auth;

fn model(raw: &[u8]) -> Option<(u64, &str)> {
    let s = std::str::from_utf8(raw).ok()?;
    let (e, u) = s.split_once(':')?;
    if u.is_empty() || e.is_empty() || e.len() > 19 || !e.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some((e.parse().ok()?, u))
}

fn model_group(raw: &[u8]) -> Option<&str> {
    let (_, user) = model(raw)?;
    let (g, _) = user.split_once('.')?;
    let charset = g
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    (!g.is_empty() && g.len() <= 64 && charset).then_some(g)
}

fuzz_target!(|data: &[u8]| {
    let got = auth::parse_rest_username(data)
        .ok()
        .map(|r| (r.expiry, r.user));
    assert_eq!(got, model(data));
    assert_eq!(auth::rest_group(data), model_group(data));
    if let Ok(name) = std::str::from_utf8(data) {
        // The password is defined for every UTF-8 username and is base64 of 20 bytes.
        assert_eq!(relay_proto::rest_password(b"secret", name).len(), 28);
    }
});
