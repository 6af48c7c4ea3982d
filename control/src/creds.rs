//! `iceServers` with TURN REST credentials, in the exact shape `RTCPeerConnection` takes.
//!
//! The username is `EXPIRY:GROUP.RANDOM`: the expiry the relay checks, a credential group (the
//! relay revokes by it) and a random part per issue — no personal data. The group is the call's
//! `CALLGROUP` for credentials handed out for the call as a whole, and `CALLGROUP.PEERID` for a
//! participant joined through `/v1/join` (`PEERID` is `p_` + URL-safe base64, never a `.`), so
//! that participant's username is `EXPIRY:CALLGROUP.PEERID.RANDOM`. The relay's groups are
//! hierarchical (`relay_proto::auth::rest_groups`): such a username belongs to both
//! `CALLGROUP` and `CALLGROUP.PEERID`, so revoking `CALLGROUP.PEERID` kicks that participant
//! alone while revoking `CALLGROUP` ends the call for everyone. [`Minter::mint`] takes either
//! group as is. The password is `relay_proto::rest_password` of the username under the relay's
//! first (signing) secret, the very function the relay verifies with.

use serde::Serialize;

use crate::secrets;

/// Which `iceServers` entry a URL belongs in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scheme {
    /// `stun:`/`stuns:`: no credentials needed.
    Stun,
    /// `turn:`/`turns:`: needs the username and password.
    Turn,
}

/// The scheme of an ICE server URL (RFC 7064/7065), case-insensitively as URI schemes are.
fn scheme(url: &str) -> Option<Scheme> {
    let (scheme, _) = url.split_once(':')?;
    if scheme.eq_ignore_ascii_case("stun") || scheme.eq_ignore_ascii_case("stuns") {
        Some(Scheme::Stun)
    } else if scheme.eq_ignore_ascii_case("turn") || scheme.eq_ignore_ascii_case("turns") {
        Some(Scheme::Turn)
    } else {
        None
    }
}

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

/// Shortest lifetime of a participant's credentials (seconds), even for a call about to end:
/// less is not enough to set up a connection.
pub const MIN_CALL_CRED_TTL_S: u64 = 60;

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

    /// Credentials for a participant of a call that ends at `call_expires_at_ms` (Unix ms):
    /// the default lifetime, but never past the call's end, except that a call about to end
    /// still gets [`MIN_CALL_CRED_TTL_S`] (less is not enough to set up a connection; never
    /// more than the default lifetime). Every place that hands a participant credentials
    /// (`POST /v1/join`, signaling's `welcome` and `ice_servers`) mints through this, so none
    /// outlives the call by more than that.
    pub fn mint_for_call(&self, group: &str, now_s: u64, call_expires_at_ms: u64) -> Minted {
        let call_end = (call_expires_at_ms / 1000).max(now_s.saturating_add(MIN_CALL_CRED_TTL_S));
        let expires_at = now_s.saturating_add(self.ttl_s).min(call_end);
        self.mint(group, now_s, expires_at - now_s)
    }

    /// Credentials in `group` (`CALLGROUP`, or `CALLGROUP.PEERID` for one participant; see the
    /// module doc) valid for `ttl_s` from `now_s` (Unix seconds).
    pub fn mint(&self, group: &str, now_s: u64, ttl_s: u64) -> Minted {
        let expires_at = now_s.saturating_add(ttl_s);
        // `GROUP.RANDOM`: the id alphabet (URL-safe base64) has no `.` or `:`, so the relay
        // splits `EXPIRY:` and each group (every prefix before a `.`) unambiguously, and the
        // random part is never mistaken for a group.
        let user = format!("{group}.{}", secrets::new_id(""));
        // The very function the relay verifies with: `EXPIRY:user` and its HMAC.
        let (username, credential) = relay_proto::rest_credentials(&self.secret, &user, expires_at);

        let (mut stun, mut turn) = (Vec::new(), Vec::new());
        for url in &self.urls {
            match scheme(url) {
                Some(Scheme::Stun) => stun.push(url.clone()),
                Some(Scheme::Turn) => turn.push(url.clone()),
                // Config validation refuses other schemes; one slipping through is not offered.
                None => {}
            }
        }
        let mut ice_servers = Vec::with_capacity(2);
        if !stun.is_empty() {
            ice_servers.push(IceServer {
                urls: stun,
                username: None,
                credential: None,
            });
        }
        if !turn.is_empty() {
            ice_servers.push(IceServer {
                urls: turn,
                username: Some(username),
                credential: Some(credential),
            });
        }
        Minted {
            ice_servers,
            expires_at,
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use serde_json::json;

    use super::*;

    const SECRET: &[u8] = b"the relay's first secret";
    const NOW: u64 = 1_700_000_000;
    const TTL: u64 = 600;

    fn urls(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| (*s).to_owned()).collect()
    }

    fn minter() -> Minter {
        Minter::new(
            SECRET,
            urls(&[
                "stun:relay.example:3478",
                "turn:relay.example:3478?transport=udp",
                "turn:relay.example:3478?transport=tcp",
                "turns:relay.example:5349?transport=tcp",
            ]),
            TTL,
        )
    }

    fn turn_entry(minted: &Minted) -> &IceServer {
        minted
            .ice_servers
            .iter()
            .find(|s| s.username.is_some())
            .unwrap()
    }

    #[test]
    fn a_participant_s_credentials_end_with_the_call_but_never_below_a_minute() {
        let m = minter();
        let exp = |call_end_s: u64| m.mint_for_call("g", NOW, call_end_s * 1000).expires_at;
        // A call that outlives the default lifetime: the default.
        assert_eq!(exp(NOW + 10 * TTL), NOW + TTL);
        // A call that ends sooner: its end.
        assert_eq!(exp(NOW + TTL / 2), NOW + TTL / 2);
        // A call about to end (or just ended): a minute, enough to connect.
        assert_eq!(exp(NOW + 5), NOW + MIN_CALL_CRED_TTL_S);
        assert_eq!(exp(NOW - 5), NOW + MIN_CALL_CRED_TTL_S);
        // Never more than the configured lifetime, even when that is under a minute.
        let short = Minter::new(SECRET, urls(&["turn:relay.example"]), 5);
        assert_eq!(
            short.mint_for_call("g", NOW, (NOW + 5) * 1000).expires_at,
            NOW + 5
        );
    }

    #[test]
    fn password_verifies_the_way_the_relay_checks_it() {
        let minted = minter().mint("gGROUP1234567890", NOW, TTL);
        let turn = turn_entry(&minted);
        let username = turn.username.as_deref().unwrap();
        let credential = turn.credential.as_deref().unwrap();
        // The relay's steps: parse `EXPIRY:user`, recompute the password under its secret,
        // derive the long-term key from it.
        let parsed = relay_proto::auth::parse_rest_username(username.as_bytes()).unwrap();
        assert_eq!(parsed.expiry, NOW + TTL);
        assert_eq!(relay_proto::rest_password(SECRET, username), credential);
        assert_eq!(
            relay_proto::auth::long_term_key(username.as_bytes(), b"realm", credential.as_bytes()),
            relay_proto::auth::long_term_key(
                username.as_bytes(),
                b"realm",
                relay_proto::rest_password(SECRET, username).as_bytes()
            )
        );
        // And `rest_credentials` for the same user part gives the same pair.
        assert_eq!(
            relay_proto::rest_credentials(SECRET, parsed.user, NOW + TTL),
            (username.to_owned(), credential.to_owned())
        );
        // Under another secret it does not verify.
        assert_ne!(
            relay_proto::rest_password(b"another secret", username),
            credential
        );
    }

    #[test]
    fn username_is_expiry_group_random_and_nothing_else() {
        let group = "gAbC-dEf_0123456";
        let m = minter();
        let first = m.mint(group, NOW, TTL);
        let username = turn_entry(&first).username.clone().unwrap();
        let (expiry, user) = username.split_once(':').unwrap();
        assert_eq!(expiry, (NOW + TTL).to_string());
        let (g, random) = user.split_once('.').unwrap();
        assert_eq!(g, group);
        assert_eq!(random.len(), 16, "{username}");
        assert!(
            random
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'),
            "{username}"
        );
        // Fresh random part per issue.
        let second = m.mint(group, NOW, TTL);
        assert_ne!(turn_entry(&second).username, turn_entry(&first).username);
        assert_ne!(
            turn_entry(&second).credential,
            turn_entry(&first).credential
        );
    }

    #[test]
    fn a_participant_username_has_the_call_group_and_its_own() {
        let minted = minter().mint("g1.p_abc", NOW, TTL);
        let username = turn_entry(&minted).username.as_deref().unwrap();
        let groups: Vec<&str> = relay_proto::auth::rest_groups(username.as_bytes()).collect();
        assert_eq!(groups, ["g1", "g1.p_abc"], "{username}");
        assert_eq!(
            relay_proto::auth::rest_group(username.as_bytes()),
            Some("g1")
        );
        for g in &groups {
            assert!(relay_proto::auth::is_valid_group(g), "{g}");
        }
        // The call-wide credentials of the same call have the call group alone.
        let minted = minter().mint("g1", NOW, TTL);
        let username = turn_entry(&minted).username.as_deref().unwrap();
        let groups: Vec<&str> = relay_proto::auth::rest_groups(username.as_bytes()).collect();
        assert_eq!(groups, ["g1"], "{username}");
        // With the control plane's real ids the participant group is well within the relay's
        // bound, so it stays revocable on its own.
        let group = format!("{}.{}", secrets::new_id("g"), secrets::new_id("p_"));
        assert!(group.len() <= relay_proto::auth::MAX_GROUP_LEN, "{group}");
        let minted = minter().mint(&group, NOW, TTL);
        let username = turn_entry(&minted).username.as_deref().unwrap();
        assert_eq!(
            relay_proto::auth::rest_groups(username.as_bytes()).last(),
            Some(group.as_str())
        );
    }

    #[test]
    fn expiry_is_now_plus_ttl() {
        let m = minter();
        assert_eq!(m.ttl_s(), TTL);
        let minted = m.mint("g1", NOW, 42);
        assert_eq!(minted.expires_at, NOW + 42);
        let username = turn_entry(&minted).username.as_deref().unwrap();
        assert!(
            username.starts_with(&format!("{}:g1.", NOW + 42)),
            "{username}"
        );
        // Absurd inputs saturate rather than wrap around to the past.
        assert_eq!(m.mint("g1", u64::MAX, TTL).expires_at, u64::MAX);
    }

    #[test]
    fn json_is_exactly_what_rtcpeerconnection_takes() {
        let minted = minter().mint("g1", NOW, TTL);
        let turn = turn_entry(&minted);
        let value = serde_json::to_value(&minted.ice_servers).unwrap();
        assert_eq!(
            value,
            json!([
                {"urls": ["stun:relay.example:3478"]},
                {
                    "urls": [
                        "turn:relay.example:3478?transport=udp",
                        "turn:relay.example:3478?transport=tcp",
                        "turns:relay.example:5349?transport=tcp",
                    ],
                    "username": turn.username.as_deref().unwrap(),
                    "credential": turn.credential.as_deref().unwrap(),
                },
            ])
        );
    }

    #[test]
    fn entries_without_urls_are_left_out() {
        let stun_only = Minter::new(SECRET, urls(&["stun:a:3478", "stuns:b:5349"]), TTL);
        assert_eq!(
            serde_json::to_value(stun_only.mint("g1", NOW, TTL).ice_servers).unwrap(),
            json!([{"urls": ["stun:a:3478", "stuns:b:5349"]}])
        );

        let turn_only = Minter::new(SECRET, urls(&["turns:b:5349"]), TTL);
        let minted = turn_only.mint("g1", NOW, TTL);
        assert_eq!(minted.ice_servers.len(), 1);
        assert_eq!(minted.ice_servers[0].urls, urls(&["turns:b:5349"]));
        assert!(minted.ice_servers[0].username.is_some());
        assert!(minted.ice_servers[0].credential.is_some());

        let none = Minter::new(SECRET, Vec::new(), TTL);
        assert!(none.mint("g1", NOW, TTL).ice_servers.is_empty());
    }

    #[test]
    fn schemes_sort_case_insensitively_and_keep_order() {
        let m = Minter::new(
            SECRET,
            urls(&[
                "TURN:x:3478",
                "stun:y:3478",
                "Turns:z:5349",
                "STUN:w:3478",
                "http://not-ice.example",
                "turnx:v",
            ]),
            TTL,
        );
        let minted = m.mint("g1", NOW, TTL);
        assert_eq!(minted.ice_servers.len(), 2);
        assert_eq!(
            minted.ice_servers[0].urls,
            urls(&["stun:y:3478", "STUN:w:3478"])
        );
        assert_eq!(minted.ice_servers[0].username, None);
        assert_eq!(minted.ice_servers[0].credential, None);
        assert_eq!(
            minted.ice_servers[1].urls,
            urls(&["TURN:x:3478", "Turns:z:5349"])
        );
    }

    #[test]
    fn debug_hides_the_secret() {
        let shown = format!("{:?}", minter());
        assert!(shown.contains("ttl_s"), "{shown}");
        assert!(!shown.contains("relay's first secret"), "{shown}");
        assert!(!shown.contains("secret"), "{shown}");
    }
}
