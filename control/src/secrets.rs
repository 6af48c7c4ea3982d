//! Random identifiers and secrets, and the keyed hash they are stored under.
//!
//! Everything random comes from the OS CSPRNG (`rand::rngs::OsRng` through `rand::rng()`'s
//! thread-local generator seeded from it).

use crate::store::Digest;

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
        unimplemented!("H-prims: SHA-256 of the secret, so any length gives a 32-byte key")
    }

    /// HMAC-SHA-256 over the domain's label and the value.
    pub fn digest(&self, domain: Domain, value: &[u8]) -> Digest {
        unimplemented!("H-prims")
    }
}

/// A new app key: `tpk_` + 32 characters of URL-safe base64 (192 random bits).
pub fn new_app_key() -> String {
    unimplemented!("H-prims")
}

/// A new participant token: `tpt_` + 32 characters of URL-safe base64 (192 random bits).
pub fn new_token() -> String {
    unimplemented!("H-prims")
}

/// A new identifier: `prefix` + 16 characters of URL-safe base64 (96 random bits), e.g.
/// `new_id("c_")` for a call, `"app_"`, `"p_"` (peer), `"j_"` (JWT id), `"g"` (credential group:
/// no `.` or `:` in the result, so it can sit inside a TURN username).
pub fn new_id(prefix: &str) -> String {
    unimplemented!("H-prims")
}
