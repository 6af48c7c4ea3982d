//! `iceServers` with TURN REST credentials, in the exact shape `RTCPeerConnection` takes.
//!
//! The username is `EXPIRY:GROUP.RANDOM`: the expiry the relay checks, the call's credential
//! group (the relay revokes by it) and a random part per issue — no personal data. The password
//! is `relay_proto::rest_password` of the username under the relay's first (signing) secret,
//! the very function the relay verifies with.

use serde::Serialize;

/// One entry of `iceServers`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct IceServer {
    /// `stun:`, `turn:` or `turns:` URLs.
    pub urls: Vec<String>,
    /// TURN username (absent for STUN-only entries).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub username: Option<String>,
    /// TURN password (absent for STUN-only entries).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub credential: Option<String>,
}

/// Credentials minted once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Minted {
    /// One entry with the `stun:` URLs (no credentials), one with every `turn:`/`turns:` URL and
    /// the credentials; an entry is left out when it would have no URL.
    pub ice_servers: Vec<IceServer>,
    /// When the credentials stop allocating (Unix seconds): the username's expiry.
    pub expires_at: u64,
}

/// Mints credentials for configured URLs under the relay's signing secret.
#[derive(Clone)]
pub struct Minter {
    secret: Vec<u8>,
    urls: Vec<String>,
    ttl_s: u64,
}

impl std::fmt::Debug for Minter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Minter")
            .field("urls", &self.urls)
            .field("ttl_s", &self.ttl_s)
            .finish_non_exhaustive()
    }
}

impl Minter {
    /// `secret`: the relay's first secret; `urls`: `stun:`/`turn:`/`turns:` URLs; `ttl_s`: the
    /// default credential lifetime.
    pub fn new(secret: &[u8], urls: Vec<String>, ttl_s: u64) -> Self {
        Self {
            secret: secret.to_vec(),
            urls,
            ttl_s,
        }
    }

    /// The default lifetime in seconds.
    pub fn ttl_s(&self) -> u64 {
        self.ttl_s
    }

    /// Credentials in `group` valid for `ttl_s` from `now_s` (Unix seconds).
    pub fn mint(&self, group: &str, now_s: u64, ttl_s: u64) -> Minted {
        unimplemented!("H-prims")
    }
}
