//! Signaling tokens: JWT, HS256 only, with a `kid` naming one of the configured keys.
//!
//! The first key signs; every key verifies (rotation: add a new key first, remove the old one
//! once tokens signed with it have expired). The header's `alg` must be exactly `HS256`: the
//! algorithm is pinned, never taken from the token (no `none`, no RS/HS confusion).

use serde::{Deserialize, Serialize};

use crate::store::Role;

/// One configured key.
#[derive(Clone)]
pub struct JwtKey {
    /// Key id, in the token header.
    pub kid: String,
    /// HMAC key bytes (conf requires ≥ 32).
    pub secret: Vec<u8>,
}

impl std::fmt::Debug for JwtKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwtKey")
            .field("kid", &self.kid)
            .field("secret", &"<redacted>")
            .finish()
    }
}

/// The configured keys, first one signing.
#[derive(Debug, Clone)]
pub struct Keys(/* private */ Vec<JwtKey>);

/// The claims of a signaling token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    /// Issuer (`[control] public-url`).
    pub iss: String,
    /// Audience: always [`AUDIENCE`].
    pub aud: String,
    /// The peer id.
    pub sub: String,
    /// The call id.
    pub call: String,
    /// Host or guest.
    pub role: Role,
    /// Display name.
    pub name: String,
    /// Issued at (Unix seconds).
    pub iat: u64,
    /// Not before (Unix seconds).
    pub nbf: u64,
    /// Expires (Unix seconds).
    pub exp: u64,
    /// Token id (revocation of kicked peers, later).
    pub jti: String,
}

/// The audience of signaling tokens.
pub const AUDIENCE: &str = "turnpike-signal";

/// Why a token was refused. Clients see one generic message; the variant is for logs and tests.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JwtError {
    /// Not three base64url parts of JSON, or a claim missing or of the wrong type.
    #[error("malformed token")]
    Malformed,
    /// `alg` is not `HS256` (or `typ` is present and not `JWT`).
    #[error("algorithm not accepted")]
    Algorithm,
    /// No `kid`, or one no configured key has.
    #[error("unknown key id")]
    UnknownKey,
    /// The signature does not match (checked in constant time).
    #[error("bad signature")]
    Signature,
    /// `exp` (plus leeway) has passed.
    #[error("token expired")]
    Expired,
    /// `nbf` (minus leeway) is in the future.
    #[error("token not yet valid")]
    NotYetValid,
    /// `iss` or `aud` is not the expected one.
    #[error("wrong issuer or audience")]
    Audience,
}

impl Keys {
    /// The keys; `None` when empty.
    pub fn new(keys: Vec<JwtKey>) -> Option<Self> {
        unimplemented!("H-prims")
    }

    /// Signs with the first key: header `{"alg":"HS256","typ":"JWT","kid":…}`.
    pub fn sign(&self, claims: &Claims) -> String {
        unimplemented!("H-prims")
    }

    /// Verifies signature, `alg`, `kid`, `iss` (= `issuer`), `aud` (= [`AUDIENCE`]), `exp` and
    /// `nbf` with `leeway_s` seconds of leeway at `now_s` (Unix seconds).
    pub fn verify(
        &self,
        token: &str,
        issuer: &str,
        now_s: u64,
        leeway_s: u64,
    ) -> Result<Claims, JwtError> {
        unimplemented!("H-prims")
    }
}
