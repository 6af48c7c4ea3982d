//! Random identifiers and secrets, and the keyed hash they are stored under.
//!
//! Everything random comes from the OS CSPRNG (`rand::rngs::OsRng` through `rand::rng()`'s
//! thread-local generator seeded from it).

use base64::Engine as _;
use hmac::{Hmac, Mac};
use rand::Rng as _;
use sha2::{Digest as _, Sha256};

use crate::store::Digest;

/// Random bytes in an id: 96 bits, so a guessed id hits nothing and ids never collide in
/// practice; a multiple of 3 so the base64 has no padding (16 characters).
const ID_BYTES: usize = 12;
/// Random bytes in an app key or token: 192 bits, beyond any online or offline guessing; a
/// multiple of 3 so the base64 is exactly 32 characters.
const SECRET_BYTES: usize = 24;

/// URL-safe base64 without padding: `A–Z a–z 0–9 - _`, so ids and secrets sit in URLs, Redis
/// keys and TURN usernames (no `.` or `:`) without escaping.
const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::URL_SAFE_NO_PAD;

/// `N` bytes from the thread-local CSPRNG, URL-safe base64.
fn random_b64<const N: usize>() -> String {
    let mut bytes = [0u8; N];
    rand::rng().fill(&mut bytes[..]);
    B64.encode(bytes)
}

/// An HMAC-SHA-256 instance keyed with `key`.
pub(crate) fn hmac_sha256(key: &[u8]) -> Hmac<Sha256> {
    // HMAC accepts keys of every length (long ones are hashed, short ones padded): `hmac`
    // never returns an error here, the `Result` only comes from the generic `KeyInit` trait.
    <Hmac<Sha256> as Mac>::new_from_slice(key).expect("HMAC takes keys of any length")
}

/// What a digest is of: the same bytes hashed for different purposes never collide.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Domain {
    /// An app key (`tpk_…`).
    AppKey,
    /// A join code's canonical 10 letters.
    JoinCode,
    /// A participant token (`tpt_…`).
    Token,
}

impl Domain {
    /// The label hashed before the value. Changing one invalidates every stored digest of
    /// that kind.
    fn label(self) -> &'static [u8] {
        match self {
            Domain::AppKey => b"turnpike/app-key",
            Domain::JoinCode => b"turnpike/join-code",
            Domain::Token => b"turnpike/token",
        }
    }
}

/// The key app keys, join codes and tokens are hashed under (`[control] hash-key`).
#[derive(Clone)]
pub struct HashKey(/* private */ [u8; 32]);

impl std::fmt::Debug for HashKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("HashKey(<redacted>)")
    }
}

impl HashKey {
    /// From configured secret bytes (any length; conf requires ≥ 16).
    pub fn new(secret: &[u8]) -> Self {
        // SHA-256 of the secret, so any length gives a 32-byte key.
        Self(Sha256::digest(secret).into())
    }

    /// HMAC-SHA-256 over the domain's label and the value.
    pub fn digest(&self, domain: Domain, value: &[u8]) -> Digest {
        let mut mac = hmac_sha256(&self.0);
        mac.update(domain.label());
        // The separator keeps `label ‖ value` unambiguous: no label contains a NUL byte.
        mac.update(&[0]);
        mac.update(value);
        Digest(mac.finalize().into_bytes().into())
    }
}

/// A new app key: `tpk_` + 32 characters of URL-safe base64 (192 random bits).
pub fn new_app_key() -> String {
    format!("tpk_{}", random_b64::<SECRET_BYTES>())
}

/// A new participant token: `tpt_` + 32 characters of URL-safe base64 (192 random bits).
pub fn new_token() -> String {
    format!("tpt_{}", random_b64::<SECRET_BYTES>())
}

/// A new identifier: `prefix` + 16 characters of URL-safe base64 (96 random bits), e.g.
/// `new_id("c_")` for a call, `"app_"`, `"p_"` (peer), `"j_"` (JWT id), `"g"` (credential group:
/// no `.` or `:` in the result, so it can sit inside a TURN username).
pub fn new_id(prefix: &str) -> String {
    format!("{prefix}{}", random_b64::<ID_BYTES>())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::collections::HashSet;

    use super::*;

    fn hex(bytes: &[u8]) -> String {
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// Decodes the random part of a generated value, checking its alphabet on the way.
    fn random_part(s: &str, prefix: &str, chars: usize, bytes: usize) -> Vec<u8> {
        let rest = s.strip_prefix(prefix).unwrap();
        assert_eq!(rest.len(), chars, "{s}");
        assert!(
            rest.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'),
            "{s} leaves the URL-safe alphabet"
        );
        let raw = B64.decode(rest).unwrap();
        assert_eq!(raw.len(), bytes);
        raw
    }

    #[test]
    fn hmac_matches_rfc4231_case_2() {
        let mut mac = hmac_sha256(b"Jefe");
        mac.update(b"what do ya want for nothing?");
        assert_eq!(
            hex(&mac.finalize().into_bytes()),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn digest_matches_independent_computation() {
        // Computed with Python's hmac/hashlib: HMAC-SHA-256(SHA-256(secret), label ‖ 0 ‖ value).
        // Stored digests depend on this exact construction: a change here orphans every
        // app key, join code and token in a store.
        let key = HashKey::new(b"an example hash-key secret");
        assert_eq!(
            key.digest(Domain::JoinCode, b"BCDFGHJKLM").to_hex(),
            "e4f42f2a4f69e4349a6265c06344a8c7ea8932b036c9b1b075fb0540be5c3897"
        );
        assert_eq!(
            key.digest(Domain::AppKey, b"tpk_x").to_hex(),
            "4f8ffbf4cc9154bbce04f39fa9cb4a4f95565f0980f95059327dec9c55b70d41"
        );
        assert_eq!(
            key.digest(Domain::Token, b"tpt_x").to_hex(),
            "1cdb201aa82eaaa8c825c131ecb2c2c992d2a3aae5134e253c97f03a9ae6ec7b"
        );
    }

    #[test]
    fn digest_separates_domains_keys_and_values() {
        let key = HashKey::new(b"0123456789abcdef");
        let same = HashKey::new(b"0123456789abcdef");
        let other = HashKey::new(b"0123456789abcdeg");
        let v = b"ABCDEFGH";
        assert_eq!(key.digest(Domain::Token, v), same.digest(Domain::Token, v));
        assert_ne!(key.digest(Domain::Token, v), other.digest(Domain::Token, v));
        assert_ne!(
            key.digest(Domain::Token, v),
            key.digest(Domain::Token, b"ABCDEFGI")
        );
        let all: HashSet<_> = [Domain::AppKey, Domain::JoinCode, Domain::Token]
            .into_iter()
            .map(|d| key.digest(d, v))
            .collect();
        assert_eq!(all.len(), 3);
    }

    #[test]
    fn hash_key_accepts_any_length_and_hides_itself() {
        // Short, block-sized and longer-than-a-block secrets all give working, distinct keys.
        let digests: HashSet<_> = [&b""[..], &[7u8; 64][..], &[7u8; 200][..]]
            .into_iter()
            .map(|s| HashKey::new(s).digest(Domain::AppKey, b"x"))
            .collect();
        assert_eq!(digests.len(), 3);
        let shown = format!("{:?}", HashKey::new(b"very-secret-bytes"));
        assert_eq!(shown, "HashKey(<redacted>)");
    }

    #[test]
    fn ids_are_prefixed_url_safe_96_bits() {
        let mut seen = HashSet::new();
        for prefix in ["c_", "app_", "p_", "j_", "g", ""] {
            for _ in 0..100 {
                let id = new_id(prefix);
                random_part(&id, prefix, 16, 12);
                // Credential groups sit inside `EXPIRY:GROUP.RANDOM`.
                assert!(!id.contains('.') && !id.contains(':'), "{id}");
                assert!(seen.insert(id));
            }
        }
    }

    #[test]
    fn app_keys_and_tokens_are_prefixed_url_safe_192_bits() {
        let mut seen = HashSet::new();
        for _ in 0..100 {
            let key = new_app_key();
            let token = new_token();
            random_part(&key, "tpk_", 32, 24);
            random_part(&token, "tpt_", 32, 24);
            assert!(seen.insert(key));
            assert!(seen.insert(token));
        }
    }

    #[test]
    fn random_bytes_are_not_constant() {
        // A broken generator (all zeros, a fixed seed per call) would repeat bytes across
        // values; 200 × 24 bytes must use most of the 256 byte values.
        let mut bytes = HashSet::new();
        for _ in 0..200 {
            bytes.extend(random_part(&new_token(), "tpt_", 32, 24));
        }
        assert!(bytes.len() > 200, "{} distinct byte values", bytes.len());
    }
}
