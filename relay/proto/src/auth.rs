//! Credentials: coturn-compatible TURN REST usernames and passwords, the long-term key of
//! [RFC 8489 §9.2](https://www.rfc-editor.org/rfc/rfc8489#section-9.2), and stateless nonces.
//!
//! The control plane mints credentials with [`rest_credentials`]; the relay verifies them with the
//! same functions, so the two can never disagree on the format.

use std::net::{IpAddr, SocketAddr};

use base64::Engine as _;
use hmac::{Hmac, Mac};
use md5::{Digest, Md5};
use sha1::Sha1;

/// A username `expiry:user` split into its parts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RestUsername<'a> {
    /// Unix time (seconds) after which the credential no longer allocates.
    pub expiry: u64,
    /// The user part: quotas count allocations per user.
    pub user: &'a str,
}

/// Why a USERNAME is not a TURN REST username.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum UsernameError {
    /// Not `expiry:user`, or a part is empty.
    #[error("username is not of the form expiry:user")]
    Format,
    /// The expiry is not a decimal number of at most 19 digits.
    #[error("expiry is not a unix time")]
    Expiry,
    /// Not UTF-8.
    #[error("username is not UTF-8")]
    Encoding,
}

/// Parses `expiry:user` (coturn's `--use-auth-secret` format). The expiry must be 1–19 ASCII
/// digits (so it fits in a u64 without overflow checks surprising anyone); the user part must be
/// non-empty: it is the key of the per-user quota.
pub fn parse_rest_username(raw: &[u8]) -> Result<RestUsername<'_>, UsernameError> {
    let s = std::str::from_utf8(raw).map_err(|_| UsernameError::Encoding)?;
    let (expiry, user) = s.split_once(':').ok_or(UsernameError::Format)?;
    if user.is_empty() {
        return Err(UsernameError::Format);
    }
    if expiry.is_empty() || expiry.len() > 19 || !expiry.bytes().all(|b| b.is_ascii_digit()) {
        return Err(UsernameError::Expiry);
    }
    let expiry = expiry.parse().map_err(|_| UsernameError::Expiry)?;
    Ok(RestUsername { expiry, user })
}

/// Longest credential group, all its segments and dots counted. Unchanged since groups had a
/// single segment (so the first group of a username is cut exactly as before): the control
/// plane's longest, a participant's `CALL.PEER`, is 36 characters (`g` + 16 and `p_` + 16 id
/// characters and the dot), and the cap keeps the revocation table's entries small whatever
/// a caller hands in.
pub const MAX_GROUP_LEN: usize = 64;

/// Most segments a group has: a call (`CALL`) and one participant of it (`CALL.PEER`), all the
/// control plane mints. The bound also caps the work of an Allocate's revocation check at that
/// many table lookups, however many dots a hostile username has. Raising it makes deeper
/// nesting revocable with no other change.
pub const MAX_GROUP_SEGMENTS: usize = 2;

/// One segment of a group: non-empty, `[A-Za-z0-9_-]` (no `.`, no `:`).
fn is_segment(s: &[u8]) -> bool {
    !s.is_empty()
        && s.iter()
            .all(|&b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// Whether `group` is a credential group: 1 to [`MAX_GROUP_SEGMENTS`] non-empty segments of
/// `[A-Za-z0-9_-]` joined by `.`, at most [`MAX_GROUP_LEN`] characters in all (`a`, `a.b`;
/// not `a..b`, `a.`, `.a`, nor `a.b.c` with two segments at most). No `:`, so a group can
/// always be cut back out of the username it was minted into. Exactly the groups
/// [`RestUsername::groups`] can yield, so anything else can match no username.
pub fn is_valid_group(group: &str) -> bool {
    (1..=MAX_GROUP_LEN).contains(&group.len())
        && group.split('.').count() <= MAX_GROUP_SEGMENTS
        && group.split('.').all(|s| is_segment(s.as_bytes()))
}

impl<'a> RestUsername<'a> {
    /// The widest credential group of the user part, the call's: everything up to the first
    /// `.` (see [`RestUsername::groups`]). `None` without a `.`, or when that prefix is not a
    /// valid group ([`is_valid_group`]): such credentials cannot be revoked by group.
    pub fn group(&self) -> Option<&'a str> {
        self.groups().next()
    }

    /// Every credential group of the user part, widest first: each prefix ending before a `.`
    /// that is a valid group. `A.B.RANDOM` belongs to `A` (a call) and `A.B` (one participant
    /// of it), `A.RANDOM` to `A`, `A` (no dot) to none: the last segment is always the random
    /// part, never a group. The walk stops at the first prefix that is not a valid group and
    /// after [`MAX_GROUP_SEGMENTS`] groups, and looks at no more than the first
    /// [`MAX_GROUP_LEN`] + 1 bytes: one pass, no allocation, whatever the username holds.
    pub fn groups(&self) -> impl Iterator<Item = &'a str> {
        let user = self.user;
        // A group ends at a `.` no further than MAX_GROUP_LEN bytes in. Bytes, not chars: a
        // `.` is ASCII, so cutting there always lands on a char boundary.
        let head = &user.as_bytes()[..user.len().min(MAX_GROUP_LEN + 1)];
        let mut segment_start = 0;
        head.iter()
            .enumerate()
            .filter(|&(_, &b)| b == b'.')
            .take(MAX_GROUP_SEGMENTS)
            .map_while(move |(dot, _)| {
                let segment = head.get(segment_start..dot)?;
                segment_start = dot + 1;
                if is_segment(segment) {
                    user.get(..dot)
                } else {
                    None
                }
            })
    }
}

/// The widest credential group of a REST username `EXPIRY:GROUP.RANDOM` or
/// `EXPIRY:GROUP.PEER.RANDOM`, the call's (see [`RestUsername::group`]); `None` when `raw` is
/// not a REST username or its user part has no valid group.
pub fn rest_group(raw: &[u8]) -> Option<&str> {
    parse_rest_username(raw).ok()?.group()
}

/// Every credential group of a REST username, widest first (see [`RestUsername::groups`]):
/// `EXPIRY:CALL.PEER.RANDOM` yields `CALL` then `CALL.PEER`. None when `raw` is not a REST
/// username or has no group. A username is revoked when any of its groups is.
pub fn rest_groups(raw: &[u8]) -> impl Iterator<Item = &str> {
    parse_rest_username(raw)
        .ok()
        .into_iter()
        .flat_map(|u| u.groups())
}

/// The REST password of `username` under `secret`: `base64(HMAC-SHA1(secret, username))`.
pub fn rest_password(secret: &[u8], username: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(hmac_sha1(secret, username.as_bytes()))
}

/// Mints a username valid until `expiry_unix` and its password, exactly as the relay verifies them.
pub fn rest_credentials(secret: &[u8], user: &str, expiry_unix: u64) -> (String, String) {
    let username = format!("{expiry_unix}:{user}");
    let password = rest_password(secret, &username);
    (username, password)
}

/// The long-term credential key: `MD5(username ":" realm ":" password)` (RFC 8489 §9.2.2).
pub fn long_term_key(username: &[u8], realm: &[u8], password: &[u8]) -> [u8; 16] {
    let mut h = Md5::new();
    h.update(username);
    h.update(b":");
    h.update(realm);
    h.update(b":");
    h.update(password);
    h.finalize().into()
}

fn hmac_sha1(key: &[u8], data: &[u8]) -> [u8; 20] {
    match Hmac::<Sha1>::new_from_slice(key) {
        Ok(mut mac) => {
            mac.update(data);
            mac.finalize().into_bytes().into()
        }
        // HMAC takes keys of any length; this arm only keeps the function total.
        Err(_) => [0; 20],
    }
}

/// Length of a nonce: 8 hex digits of issue time and 16 of MAC.
pub const NONCE_LEN: usize = 24;
/// Nonces dated this far in the future are refused: covers wall-clock steps between shards'
/// re-anchoring without letting anyone mint long-lived nonces.
const NONCE_FUTURE_SKEW_SECS: u64 = 5;

/// Issues and checks nonces without storing anything: a nonce is its issue time plus a MAC over
/// that time and the client's address under a per-process key. An unauthenticated client thus
/// costs no memory, and a nonce works only from the address it was issued to.
#[derive(Clone)]
pub struct NonceKey([u8; 32]);

impl std::fmt::Debug for NonceKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("NonceKey(<redacted>)")
    }
}

/// The verdict on a presented nonce.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NonceCheck {
    /// Issued by us to this address and still fresh.
    Valid,
    /// Ours, but older than the nonce lifetime: answer 438 with a fresh one.
    Stale,
    /// Not ours (garbage, another address, future-dated): also 438, so clients recover.
    Invalid,
}

impl NonceKey {
    /// A key from 32 random bytes the driver supplies (the core has no randomness source).
    pub fn new(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    fn mac(&self, issued: u32, client: SocketAddr) -> [u8; 20] {
        let mut data = [0u8; 4 + 16 + 2];
        data[..4].copy_from_slice(&issued.to_be_bytes());
        match client.ip() {
            IpAddr::V4(ip) => data[4..8].copy_from_slice(&ip.octets()),
            IpAddr::V6(ip) => data[4..20].copy_from_slice(&ip.octets()),
        }
        data[20..].copy_from_slice(&client.port().to_be_bytes());
        hmac_sha1(&self.0, &data)
    }

    /// A nonce for `client`, issued at `now_unix`.
    pub fn issue(&self, now_unix: u64, client: SocketAddr) -> [u8; NONCE_LEN] {
        let issued = now_unix as u32;
        let mut out = [0u8; NONCE_LEN];
        hex(&issued.to_be_bytes(), &mut out[..8]);
        hex(&self.mac(issued, client)[..8], &mut out[8..]);
        out
    }

    /// Checks `nonce` from `client` at `now_unix` against `lifetime_secs`.
    pub fn check(
        &self,
        nonce: &[u8],
        now_unix: u64,
        client: SocketAddr,
        lifetime_secs: u64,
    ) -> NonceCheck {
        if nonce.len() != NONCE_LEN {
            return NonceCheck::Invalid;
        }
        let Some(issued) = unhex_u32(&nonce[..8]) else {
            return NonceCheck::Invalid;
        };
        let mut expect = [0u8; 16];
        hex(&self.mac(issued, client)[..8], &mut expect);
        if !constant_time_eq(&expect, &nonce[8..]) {
            return NonceCheck::Invalid;
        }
        // Time travels in u32 seconds inside the nonce; compare in the same modular space so the
        // 2106 wrap does not matter.
        let now = now_unix as u32;
        let age = now.wrapping_sub(issued);
        if issued.wrapping_sub(now) as u64 <= NONCE_FUTURE_SKEW_SECS {
            return NonceCheck::Valid;
        }
        if u64::from(age) > lifetime_secs {
            // Either old, or far in the future (age wraps to a huge number).
            return if u64::from(age) > u64::from(u32::MAX / 2) {
                NonceCheck::Invalid
            } else {
                NonceCheck::Stale
            };
        }
        NonceCheck::Valid
    }
}

fn hex(bytes: &[u8], out: &mut [u8]) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    for (i, b) in bytes.iter().enumerate() {
        out[2 * i] = DIGITS[usize::from(b >> 4)];
        out[2 * i + 1] = DIGITS[usize::from(b & 0xF)];
    }
}

fn unhex_u32(s: &[u8]) -> Option<u32> {
    let mut v = 0u32;
    for &c in s {
        let d = match c {
            b'0'..=b'9' => c - b'0',
            b'a'..=b'f' => c - b'a' + 10,
            _ => return None,
        };
        v = (v << 4) | u32::from(d);
    }
    Some(v)
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn rest_usernames() {
        assert_eq!(
            parse_rest_username(b"1700000000:alice"),
            Ok(RestUsername {
                expiry: 1_700_000_000,
                user: "alice"
            })
        );
        // The user part may itself contain colons (coturn splits at the first one).
        assert_eq!(parse_rest_username(b"5:a:b").unwrap().user, "a:b");
        for bad in [
            &b"abc:alice"[..],
            b"-1:alice",
            b"99999999999999999999:alice",
            b":alice",
            b"1700000000:",
            b"",
            b"alice",
            b"+5:alice",
            b"\xff\xfe:alice",
        ] {
            assert!(parse_rest_username(bad).is_err(), "{bad:?}");
        }
        assert!(parse_rest_username(&[b'1'; 513]).is_err());
    }

    #[test]
    fn groups_are_cut_from_the_user_part() {
        assert_eq!(
            rest_group(b"1700000000:gAbC123_-x.r4nd0m"),
            Some("gAbC123_-x")
        );
        // Up to the first dot; the random part may hold anything, dots and colons included.
        assert_eq!(rest_group(b"5:g.a.b"), Some("g"));
        assert_eq!(rest_group(b"5:g.a:b"), Some("g"));
        assert_eq!(rest_group(b"5:g."), Some("g"));
        let longest = format!("5:{}.x", "a".repeat(MAX_GROUP_LEN));
        assert_eq!(
            rest_group(longest.as_bytes()),
            Some(&longest[2..2 + MAX_GROUP_LEN])
        );
        let too_long = format!("5:{}.x", "a".repeat(MAX_GROUP_LEN + 1));
        for bad in [
            &b"5:alice"[..],    // no dot: a plain REST user, never revocable by group
            b"5:.random",       // empty group
            b"5:a b.random",    // space
            b"5:a:b.random",    // the group may not contain ':'
            b"5:caf\xc3\xa9.x", // non-ASCII
            b"5:a+b.x",
            b"alice.x", // not a REST username at all
            b"x5:g.r",  // bad expiry
            b":g.r",
            b"5:",
            b"\xff:g.r",
            too_long.as_bytes(),
        ] {
            assert_eq!(rest_group(bad), None, "{bad:?}");
        }
        assert!(is_valid_group("gAbC123_-x"));
        assert!(!is_valid_group(""));
        assert!(is_valid_group("a.b"));
        assert!(!is_valid_group("a.b.c"), "more than MAX_GROUP_SEGMENTS");
        assert!(!is_valid_group("a..b"));
        assert!(!is_valid_group("a."));
        assert!(!is_valid_group(".a"));
        assert!(!is_valid_group(&"a".repeat(MAX_GROUP_LEN + 1)));
    }

    #[test]
    fn a_participant_belongs_to_its_call_group_and_its_own() {
        fn groups(raw: &[u8]) -> Vec<&str> {
            rest_groups(raw).collect()
        }
        assert_eq!(groups(b"5:call.p_peer.r4nd"), ["call", "call.p_peer"]);
        assert_eq!(groups(b"5:call.r4nd"), ["call"]);
        assert_eq!(groups(b"5:call"), Vec::<&str>::new());
        // The walk stops at the first invalid prefix, and never past two segments.
        assert_eq!(groups(b"5:call..x"), ["call"]);
        assert_eq!(groups(b"5:a.b.c.d.e"), ["a", "a.b"]);
        let many = format!("5:{}", "a.".repeat(10_000));
        assert_eq!(groups(many.as_bytes()), ["a", "a.a"]);
        assert_eq!(groups(b"no-expiry.x"), Vec::<&str>::new());
        // A bad participant segment leaves the call group; a bad call segment leaves nothing.
        assert_eq!(groups(b"5:call.p$x.r"), ["call"]);
        assert_eq!(groups(b"5:ca ll.p_x.r"), Vec::<&str>::new());
        assert_eq!(groups(b"5:.p_x.r"), Vec::<&str>::new());
        // The random part may hold anything, colons and non-ASCII included.
        assert_eq!(groups("5:call.p_x.ré:.".as_bytes()), ["call", "call.p_x"]);
        // MAX_GROUP_LEN counts the whole group: a participant group one byte too long leaves
        // only the call group.
        let call = "c".repeat(MAX_GROUP_LEN / 2);
        let fits = format!("{call}.{}", "p".repeat(MAX_GROUP_LEN - call.len() - 1));
        assert_eq!(fits.len(), MAX_GROUP_LEN);
        let raw = format!("5:{fits}.r");
        assert_eq!(groups(raw.as_bytes()), [call.as_str(), fits.as_str()]);
        let raw = format!("5:{fits}p.r");
        assert_eq!(groups(raw.as_bytes()), [call.as_str()]);
        // Multi-byte characters around the MAX_GROUP_LEN cut never split a char (no panic).
        for pad in 0..4 {
            let raw = format!(
                "5:g.{}{}.r",
                "a".repeat(MAX_GROUP_LEN - 3 + pad),
                "é".repeat(40)
            );
            assert_eq!(groups(raw.as_bytes()), ["g"], "{pad}");
        }
    }

    #[test]
    fn every_group_cut_from_a_username_is_a_valid_group_and_back() {
        let users = [
            "a.b.c",
            "a.b",
            "a",
            "a..b",
            "g1.p_abc.r",
            "x-y_z.Q-9.rest.more",
            "a.b:c.d",
            "a:b.c",
            "é.x",
            "a.é.x",
        ];
        for user in users {
            let raw = format!("5:{user}");
            let got: Vec<&str> = rest_groups(raw.as_bytes()).collect();
            assert_eq!(rest_group(raw.as_bytes()), got.first().copied(), "{user}");
            for g in &got {
                assert!(is_valid_group(g), "{user}: {g}");
                assert!(user.starts_with(&format!("{g}.")), "{user}: {g}");
            }
            // Conversely, every prefix before a dot that is a valid group is among them.
            for (dot, _) in user.match_indices('.') {
                let prefix = &user[..dot];
                assert_eq!(
                    is_valid_group(prefix),
                    got.contains(&prefix),
                    "{user}: {prefix}"
                );
            }
        }
        // A valid group minted into a username comes back out of it, as its narrowest group.
        for g in ["g", "g1.p_abc", "a-b.C_d"] {
            let raw = format!("5:{g}.random");
            assert_eq!(rest_groups(raw.as_bytes()).last(), Some(g));
        }
    }

    #[test]
    fn password_matches_coturn_formula() {
        // Reference computed with: printf %s 1234567890:user | openssl dgst -sha1 -hmac secret -binary | base64
        assert_eq!(
            rest_password(b"secret", "1234567890:user"),
            "tHbOsg6j8vjx6g3+R1ACZpLMHG0="
        );
        let (u, p) = rest_credentials(b"secret", "user", 1_234_567_890);
        assert_eq!(u, "1234567890:user");
        assert_eq!(p, rest_password(b"secret", &u));
    }

    #[test]
    fn nonce_is_bound_to_address_and_time() {
        let k = NonceKey::new([9; 32]);
        let a: SocketAddr = "192.0.2.1:5000".parse().unwrap();
        let b: SocketAddr = "192.0.2.1:5001".parse().unwrap();
        let n = k.issue(1000, a);
        assert_eq!(k.check(&n, 1000, a, 600), NonceCheck::Valid);
        assert_eq!(k.check(&n, 1600, a, 600), NonceCheck::Valid);
        assert_eq!(k.check(&n, 1601, a, 600), NonceCheck::Stale);
        assert_eq!(k.check(&n, 1000, b, 600), NonceCheck::Invalid);
        assert_eq!(k.check(&n, 900, a, 600), NonceCheck::Invalid);
        assert_eq!(k.check(b"garbage", 1000, a, 600), NonceCheck::Invalid);
        assert_eq!(k.check(&[b'a'; 1024], 1000, a, 600), NonceCheck::Invalid);
        let other = NonceKey::new([8; 32]);
        assert_eq!(other.check(&n, 1000, a, 600), NonceCheck::Invalid);
    }
}
