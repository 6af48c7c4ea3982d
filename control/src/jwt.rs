//! Signaling tokens: JWT, HS256 only, with a `kid` naming one of the configured keys.
//!
//! The first key signs; every key verifies (rotation: add a new key first, remove the old one
//! once tokens signed with it have expired). The header's `alg` must be exactly `HS256`: the
//! algorithm is pinned, never taken from the token (no `none`, no RS/HS confusion).

use base64::Engine as _;
use hmac::Mac as _;
use serde::{Deserialize, Serialize};

use crate::secrets::hmac_sha256;
use crate::store::Role;

/// base64url without padding (RFC 7515 §2). The engine refuses padding and non-canonical
/// trailing bits, so one signature has exactly one encoding.
const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::URL_SAFE_NO_PAD;

/// Longest token looked at: ours are a few hundred bytes; anything past this is refused
/// before any decoding, so garbage costs no allocation.
const MAX_TOKEN_LEN: usize = 8 * 1024;

/// The only algorithm accepted, and the one we sign with.
const ALG: &str = "HS256";
/// The `typ` we write; when present on a token it must be this.
const TYP: &str = "JWT";

/// The JOSE header as read: fields optional so a missing one maps to its own error
/// (`alg` → [`JwtError::Algorithm`], `kid` → [`JwtError::UnknownKey`]).
#[derive(Deserialize)]
struct Header {
    alg: Option<String>,
    typ: Option<String>,
    kid: Option<String>,
}

/// The header as written.
#[derive(Serialize)]
struct HeaderOut<'a> {
    alg: &'a str,
    typ: &'a str,
    kid: &'a str,
}

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

/// Clock skew tolerated on `exp` and `nbf` when signaling verifies a token: nodes are
/// NTP-synced, but a token minted by one node may reach another a moment "early". Defined here
/// rather than in signaling because the control plane needs it too: a participant who never
/// connected holds its seat exactly as long as its join token could still authenticate
/// ([`refused_from_ms`]), and that must not drift from what signaling accepts.
pub const LEEWAY_S: u64 = 30;

/// The first Unix millisecond at which a token expiring at `exp_s` (Unix seconds) is refused
/// by [`Keys::verify`] with `leeway_s`: verification compares whole seconds and accepts up to
/// and including second `exp_s + leeway_s`, so the token works until the end of that second.
pub fn refused_from_ms(exp_s: u64, leeway_s: u64) -> u64 {
    exp_s
        .saturating_add(leeway_s)
        .saturating_add(1)
        .saturating_mul(1000)
}

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
        if keys.is_empty() {
            None
        } else {
            Some(Self(keys))
        }
    }

    /// Signs with the first key: header `{"alg":"HS256","typ":"JWT","kid":…}`.
    pub fn sign(&self, claims: &Claims) -> String {
        // `new` refuses an empty list, so there is always a first key.
        let key = &self.0[0];
        let header = HeaderOut {
            alg: ALG,
            typ: TYP,
            kid: &key.kid,
        };
        // Serializing plain strings, numbers and a unit enum into JSON cannot fail.
        let header = serde_json::to_vec(&header).expect("header serializes");
        let payload = serde_json::to_vec(claims).expect("claims serialize");
        let mut token = format!("{}.{}", B64.encode(header), B64.encode(payload));
        let mut mac = hmac_sha256(&key.secret);
        mac.update(token.as_bytes());
        let signature = B64.encode(mac.finalize().into_bytes());
        token.push('.');
        token.push_str(&signature);
        token
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
        if token.len() > MAX_TOKEN_LEN {
            return Err(JwtError::Malformed);
        }
        let mut parts = token.split('.');
        let (Some(header_b64), Some(payload_b64), Some(signature_b64), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(JwtError::Malformed);
        };

        let header = B64.decode(header_b64).map_err(|_| JwtError::Malformed)?;
        let header: Header = serde_json::from_slice(&header).map_err(|_| JwtError::Malformed)?;
        // Pinned: the token's `alg` is checked, never used to pick the algorithm.
        if header.alg.as_deref() != Some(ALG) {
            return Err(JwtError::Algorithm);
        }
        if header.typ.as_deref().is_some_and(|typ| typ != TYP) {
            return Err(JwtError::Algorithm);
        }
        let kid = header.kid.ok_or(JwtError::UnknownKey)?;
        let key = self
            .0
            .iter()
            .find(|key| key.kid == kid)
            .ok_or(JwtError::UnknownKey)?;

        // The signature is checked before the claims are parsed: nothing unauthenticated
        // reaches the claims parser.
        let signature = B64.decode(signature_b64).map_err(|_| JwtError::Malformed)?;
        let mut mac = hmac_sha256(&key.secret);
        mac.update(header_b64.as_bytes());
        mac.update(b".");
        mac.update(payload_b64.as_bytes());
        // Constant time (`subtle` inside `hmac`), and the length must be the full 32 bytes.
        mac.verify_slice(&signature)
            .map_err(|_| JwtError::Signature)?;

        let payload = B64.decode(payload_b64).map_err(|_| JwtError::Malformed)?;
        // Every field of `Claims` is required: a missing one fails here.
        let claims: Claims = serde_json::from_slice(&payload).map_err(|_| JwtError::Malformed)?;

        if claims.iss != issuer || claims.aud != AUDIENCE {
            return Err(JwtError::Audience);
        }
        if now_s > claims.exp.saturating_add(leeway_s) {
            return Err(JwtError::Expired);
        }
        if now_s.saturating_add(leeway_s) < claims.nbf {
            return Err(JwtError::NotYetValid);
        }
        Ok(claims)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use serde_json::{json, Value};

    use super::*;

    const ISS: &str = "https://control.example";
    const K1: &[u8] = b"k1-secret-k1-secret-k1-secret-32";
    const K2: &[u8] = b"k2-secret-k2-secret-k2-secret-32";
    const NOW: u64 = 2_000;
    const LEEWAY: u64 = 30;

    fn key(kid: &str, secret: &[u8]) -> JwtKey {
        JwtKey {
            kid: kid.into(),
            secret: secret.to_vec(),
        }
    }

    fn keys1() -> Keys {
        Keys::new(vec![key("k1", K1)]).unwrap()
    }

    fn claims() -> Claims {
        Claims {
            iss: ISS.into(),
            aud: AUDIENCE.into(),
            sub: "p_abc".into(),
            call: "c_def".into(),
            role: Role::Guest,
            name: "Ada".into(),
            iat: 1_000,
            nbf: 1_000,
            exp: 4_600,
            jti: "j_ghi".into(),
        }
    }

    /// A token with any header and payload JSON, HMAC-SHA-256-signed with `secret`: what an
    /// attacker who knows (or guesses) a key, or crafts headers, can produce.
    fn forge(header: &Value, payload: &Value, secret: &[u8]) -> String {
        let signing_input = format!(
            "{}.{}",
            B64.encode(header.to_string()),
            B64.encode(payload.to_string())
        );
        let mut mac = hmac_sha256(secret);
        mac.update(signing_input.as_bytes());
        format!(
            "{signing_input}.{}",
            B64.encode(mac.finalize().into_bytes())
        )
    }

    fn hs256(kid: &str) -> Value {
        json!({"alg": "HS256", "typ": "JWT", "kid": kid})
    }

    fn claims_json() -> Value {
        serde_json::to_value(claims()).unwrap()
    }

    fn verify(keys: &Keys, token: &str) -> Result<Claims, JwtError> {
        keys.verify(token, ISS, NOW, LEEWAY)
    }

    #[test]
    fn round_trip() {
        let keys = keys1();
        let token = keys.sign(&claims());
        assert_eq!(verify(&keys, &token), Ok(claims()));
        let host = Claims {
            role: Role::Host,
            name: "Ünïcödé \"name\" ✓".into(),
            ..claims()
        };
        assert_eq!(verify(&keys, &keys.sign(&host)), Ok(host));
    }

    #[test]
    fn signs_exactly_like_an_independent_hs256() {
        // Computed with Python's hmac/hashlib/base64/json: any HS256 library verifies ours.
        let expected = "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCIsImtpZCI6ImsxIn0.\
            eyJpc3MiOiJodHRwczovL2NvbnRyb2wuZXhhbXBsZSIsImF1ZCI6InR1cm5waWtlLXNpZ25hbCIsInN1YiI6\
            InBfYWJjIiwiY2FsbCI6ImNfZGVmIiwicm9sZSI6Imd1ZXN0IiwibmFtZSI6IkFkYSIsImlhdCI6MTAwMCwi\
            bmJmIjoxMDAwLCJleHAiOjQ2MDAsImp0aSI6ImpfZ2hpIn0.\
            DYLAVbXIIj2_7VAo2eKm4kT96S3Lz_1ZRGOaLfKgq9k";
        assert_eq!(keys1().sign(&claims()), expected);
    }

    #[test]
    fn header_is_hs256_jwt_with_kid_and_unpadded_base64url() {
        let token = keys1().sign(&claims());
        assert!(!token.contains('=') && !token.contains('+') && !token.contains('/'));
        let header = token.split('.').next().unwrap();
        let header: Value = serde_json::from_slice(&B64.decode(header).unwrap()).unwrap();
        assert_eq!(header, json!({"alg": "HS256", "typ": "JWT", "kid": "k1"}));
    }

    #[test]
    fn empty_key_list_is_refused() {
        assert!(Keys::new(Vec::new()).is_none());
    }

    #[test]
    fn rotation_first_key_signs_every_key_verifies() {
        let old = keys1();
        let rotated = Keys::new(vec![key("k2", K2), key("k1", K1)]).unwrap();
        let old_token = old.sign(&claims());
        let new_token = rotated.sign(&claims());
        // Tokens from before the rotation still work …
        assert_eq!(verify(&rotated, &old_token), Ok(claims()));
        // … new ones are signed with the new key …
        let header = B64.decode(new_token.split('.').next().unwrap()).unwrap();
        let header: Value = serde_json::from_slice(&header).unwrap();
        assert_eq!(header["kid"], "k2");
        assert_eq!(verify(&rotated, &new_token), Ok(claims()));
        // … which nodes without it do not know.
        assert_eq!(verify(&old, &new_token), Err(JwtError::UnknownKey));
        // Once the old key is removed, its tokens stop working.
        let retired = Keys::new(vec![key("k2", K2)]).unwrap();
        assert_eq!(verify(&retired, &old_token), Err(JwtError::UnknownKey));
    }

    #[test]
    fn kid_selects_the_key_it_names() {
        let keys = Keys::new(vec![key("k2", K2), key("k1", K1)]).unwrap();
        // Signed with k2 but claiming k1: checked against k1, so refused.
        let token = forge(&hs256("k1"), &claims_json(), K2);
        assert_eq!(verify(&keys, &token), Err(JwtError::Signature));
    }

    #[test]
    fn only_hs256_is_accepted() {
        let keys = keys1();
        let payload = claims_json();
        let cases = [
            // `none` with an empty signature, the classic.
            format!(
                "{}.{}.",
                B64.encode(json!({"alg": "none", "typ": "JWT", "kid": "k1"}).to_string()),
                B64.encode(payload.to_string())
            ),
            // Otherwise valid HMACs under another algorithm name: HS/RS confusion, HS512.
            forge(
                &json!({"alg": "RS256", "typ": "JWT", "kid": "k1"}),
                &payload,
                K1,
            ),
            forge(
                &json!({"alg": "HS512", "typ": "JWT", "kid": "k1"}),
                &payload,
                K1,
            ),
            forge(&json!({"alg": "ES256", "kid": "k1"}), &payload, K1),
            forge(&json!({"alg": "none", "kid": "k1"}), &payload, K1),
            // Near misses of the exact string.
            forge(&json!({"alg": "hs256", "kid": "k1"}), &payload, K1),
            forge(&json!({"alg": "HS256 ", "kid": "k1"}), &payload, K1),
            forge(&json!({"alg": "", "kid": "k1"}), &payload, K1),
            forge(&json!({"alg": null, "kid": "k1"}), &payload, K1),
            forge(&json!({"kid": "k1"}), &payload, K1),
            // A `typ` other than JWT.
            forge(
                &json!({"alg": "HS256", "typ": "JWE", "kid": "k1"}),
                &payload,
                K1,
            ),
        ];
        for token in cases {
            assert_eq!(verify(&keys, &token), Err(JwtError::Algorithm), "{token}");
        }
        // `typ` may be left out.
        let token = forge(&json!({"alg": "HS256", "kid": "k1"}), &payload, K1);
        assert_eq!(verify(&keys, &token), Ok(claims()));
    }

    #[test]
    fn unknown_or_missing_kid_is_refused() {
        let keys = keys1();
        let payload = claims_json();
        for header in [
            hs256("k3"),
            hs256(""),
            hs256("K1"),
            json!({"alg": "HS256", "typ": "JWT"}),
            json!({"alg": "HS256", "typ": "JWT", "kid": null}),
        ] {
            let token = forge(&header, &payload, K1);
            assert_eq!(verify(&keys, &token), Err(JwtError::UnknownKey), "{header}");
        }
    }

    #[test]
    fn altered_signatures_are_refused() {
        let keys = keys1();
        let token = keys.sign(&claims());
        let (signing_input, signature) = token.rsplit_once('.').unwrap();
        let signature = B64.decode(signature).unwrap();
        for i in 0..signature.len() {
            let mut flipped = signature.clone();
            flipped[i] ^= 0x01;
            let token = format!("{signing_input}.{}", B64.encode(&flipped));
            assert_eq!(verify(&keys, &token), Err(JwtError::Signature), "byte {i}");
        }
        for short in [0, 1, 16, 31] {
            let token = format!("{signing_input}.{}", B64.encode(&signature[..short]));
            assert_eq!(
                verify(&keys, &token),
                Err(JwtError::Signature),
                "{short} bytes"
            );
        }
        let mut long = signature.clone();
        long.push(0);
        let token = format!("{signing_input}.{}", B64.encode(&long));
        assert_eq!(verify(&keys, &token), Err(JwtError::Signature));
        // The right signature under a wrong key.
        let token = forge(&hs256("k1"), &claims_json(), K2);
        assert_eq!(verify(&keys, &token), Err(JwtError::Signature));
    }

    #[test]
    fn tampered_payload_or_header_is_refused() {
        let keys = keys1();
        let token = keys.sign(&claims());
        let parts: Vec<&str> = token.split('.').collect();
        let host = Claims {
            role: Role::Host,
            ..claims()
        };
        let later = Claims {
            exp: u64::MAX,
            ..claims()
        };
        for tampered in [host, later] {
            let payload = B64.encode(serde_json::to_vec(&tampered).unwrap());
            let token = format!("{}.{payload}.{}", parts[0], parts[2]);
            assert_eq!(verify(&keys, &token), Err(JwtError::Signature));
        }
        // Same header JSON, re-serialized differently: the signature covers the bytes.
        let header = B64.encode(br#"{"kid":"k1","typ":"JWT","alg":"HS256"}"#);
        let token = format!("{header}.{}.{}", parts[1], parts[2]);
        assert_eq!(verify(&keys, &token), Err(JwtError::Signature));
    }

    #[test]
    fn exp_and_nbf_apply_with_leeway_at_the_edges() {
        let keys = keys1();
        let token = keys.sign(&Claims {
            nbf: 1_000,
            exp: 2_000,
            ..claims()
        });
        let at = |now| keys.verify(&token, ISS, now, LEEWAY);
        assert!(at(970).is_ok());
        assert_eq!(at(969), Err(JwtError::NotYetValid));
        assert_eq!(at(0), Err(JwtError::NotYetValid));
        assert!(at(1_500).is_ok());
        assert!(at(2_030).is_ok());
        assert_eq!(at(2_031), Err(JwtError::Expired));
        assert_eq!(at(u64::MAX), Err(JwtError::Expired));
        // Without leeway the edges are `nbf` and `exp` themselves.
        let exact = |now| keys.verify(&token, ISS, now, 0);
        assert_eq!(exact(999), Err(JwtError::NotYetValid));
        assert!(exact(1_000).is_ok());
        assert!(exact(2_000).is_ok());
        assert_eq!(exact(2_001), Err(JwtError::Expired));
    }

    #[test]
    fn refused_from_ms_is_the_first_millisecond_verify_refuses() {
        let keys = keys1();
        let token = keys.sign(&Claims {
            nbf: 1_000,
            exp: 2_000,
            ..claims()
        });
        let edge = refused_from_ms(2_000, LEEWAY);
        assert_eq!(edge, 2_031_000);
        // Signaling verifies at `now_ms / 1000`.
        assert!(keys.verify(&token, ISS, (edge - 1) / 1000, LEEWAY).is_ok());
        assert_eq!(
            keys.verify(&token, ISS, edge / 1000, LEEWAY),
            Err(JwtError::Expired)
        );
        assert_eq!(refused_from_ms(u64::MAX, LEEWAY), u64::MAX);
    }

    #[test]
    fn extreme_times_and_leeway_do_not_overflow() {
        let keys = keys1();
        let token = keys.sign(&Claims {
            nbf: u64::MAX,
            exp: u64::MAX,
            ..claims()
        });
        // `now + leeway` and `exp + leeway` saturate instead of wrapping.
        assert!(keys.verify(&token, ISS, 0, u64::MAX).is_ok());
        assert!(keys.verify(&token, ISS, u64::MAX, 0).is_ok());
        assert_eq!(keys.verify(&token, ISS, 5, 0), Err(JwtError::NotYetValid));
        assert!(keys.verify(&token, ISS, 5, u64::MAX).is_ok());
    }

    #[test]
    fn wrong_issuer_or_audience_is_refused() {
        let keys = keys1();
        let token = keys.sign(&claims());
        for issuer in ["https://other.example", "", "https://control.example/"] {
            assert_eq!(
                keys.verify(&token, issuer, NOW, LEEWAY),
                Err(JwtError::Audience),
                "{issuer}"
            );
        }
        for aud in ["turnpike-api", "", "TURNPIKE-SIGNAL"] {
            let token = keys.sign(&Claims {
                aud: aud.into(),
                ..claims()
            });
            assert_eq!(verify(&keys, &token), Err(JwtError::Audience), "{aud}");
        }
    }

    #[test]
    fn missing_or_mistyped_claims_are_malformed() {
        let keys = keys1();
        for field in [
            "iss", "aud", "sub", "call", "role", "name", "iat", "nbf", "exp", "jti",
        ] {
            let mut payload = claims_json();
            payload.as_object_mut().unwrap().remove(field);
            let token = forge(&hs256("k1"), &payload, K1);
            assert_eq!(verify(&keys, &token), Err(JwtError::Malformed), "{field}");
        }
        for (field, value) in [
            ("exp", json!("4600")),
            ("exp", json!(-1)),
            ("exp", json!(4600.5)),
            ("exp", json!(null)),
            ("role", json!("admin")),
            ("aud", json!([AUDIENCE])),
            ("sub", json!(7)),
        ] {
            let mut payload = claims_json();
            payload[field] = value.clone();
            let token = forge(&hs256("k1"), &payload, K1);
            assert_eq!(
                verify(&keys, &token),
                Err(JwtError::Malformed),
                "{field}: {value}"
            );
        }
        for payload in [json!([]), json!("claims"), json!(null), json!({})] {
            let token = forge(&hs256("k1"), &payload, K1);
            assert_eq!(verify(&keys, &token), Err(JwtError::Malformed), "{payload}");
        }
        // Extra claims are ignored.
        let mut payload = claims_json();
        payload["extra"] = json!({"nested": true});
        let token = forge(&hs256("k1"), &payload, K1);
        assert_eq!(verify(&keys, &token), Ok(claims()));
    }

    #[test]
    fn garbage_is_malformed_never_a_panic() {
        let keys = keys1();
        let good = keys.sign(&claims());
        let parts: Vec<&str> = good.split('.').collect();
        let header_not_json = B64.encode("not json");
        let header_array = B64.encode("[\"HS256\"]");
        let padded = format!("{}=", parts[0]);
        let too_long = format!("{good}{}", "A".repeat(MAX_TOKEN_LEN));
        let cases = [
            String::new(),
            ".".into(),
            "..".into(),
            "...".into(),
            "a.b".into(),
            "a.b.c.d".into(),
            "!!!.###.$$$".into(),
            "\u{1f600}.\u{1f600}.\u{1f600}".into(),
            format!("{}.{}", parts[0], parts[1]),
            format!("{good}."),
            format!("{good}.{}", parts[2]),
            format!(".{}.{}", parts[1], parts[2]),
            format!("{header_not_json}.{}.{}", parts[1], parts[2]),
            format!("{header_array}.{}.{}", parts[1], parts[2]),
            format!("{padded}.{}.{}", parts[1], parts[2]),
            format!("{}.{}.{}=", parts[0], parts[1], parts[2]),
            format!("{}.{}.{}!", parts[0], parts[1], parts[2]),
            too_long,
        ];
        for token in cases {
            assert_eq!(verify(&keys, &token), Err(JwtError::Malformed), "{token:?}");
        }
        // The payload is only decoded once the signature over its text matched.
        let token = forge_raw(parts[0], "%%%", K1);
        assert_eq!(verify(&keys, &token), Err(JwtError::Malformed));
    }

    /// Signs arbitrary (possibly non-base64) text as header and payload parts.
    fn forge_raw(header_b64: &str, payload_b64: &str, secret: &[u8]) -> String {
        let mut mac = hmac_sha256(secret);
        mac.update(format!("{header_b64}.{payload_b64}").as_bytes());
        format!(
            "{header_b64}.{payload_b64}.{}",
            B64.encode(mac.finalize().into_bytes())
        )
    }

    #[test]
    fn random_mutations_never_panic() {
        // Every single-character substitution and truncation of a valid token, and a few
        // splices: all refused (they cannot keep a valid signature), none panics.
        let keys = keys1();
        let good = keys.sign(&claims());
        let alphabet = ['A', 'z', '0', '-', '_', '.', '=', '+', '/', '\u{e9}'];
        for (i, original) in good.char_indices() {
            for c in alphabet.into_iter().filter(|&c| c != original) {
                let mut token = good.clone();
                token.replace_range(i..i + original.len_utf8(), c.encode_utf8(&mut [0; 4]));
                assert!(verify(&keys, &token).is_err(), "{token}");
            }
            assert!(verify(&keys, &good[..i]).is_err());
        }
    }

    #[test]
    fn debug_never_shows_secrets() {
        let keys = keys1();
        let shown = format!("{keys:?}");
        assert!(shown.contains("k1"));
        assert!(!shown.contains("k1-secret"), "{shown}");
        let bytes = format!("{:?}", K1.to_vec());
        assert!(!shown.contains(&bytes[1..20]), "{shown}");
    }
}
