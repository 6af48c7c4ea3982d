//! Every way a signal token can be wrong, over a real socket: each is refused with `error
//! unauthorized` and close 4001 before any call state changes (a peer already in the call sees
//! nothing), and counted under its reason.

#![allow(clippy::unwrap_used)]

mod harness;

use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use base64::Engine as _;
use harness::{enter, Client, End, Node, Options, JWT_KID, JWT_SECRET};
use hmac::{Hmac, Mac};
use serde_json::{json, Value};

fn sign(header: &Value, claims: &Value, secret: &[u8]) -> String {
    let input = format!(
        "{}.{}",
        B64.encode(header.to_string()),
        B64.encode(claims.to_string())
    );
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(secret).unwrap();
    mac.update(input.as_bytes());
    format!("{input}.{}", B64.encode(mac.finalize().into_bytes()))
}

fn claims_of(token: &str) -> Value {
    let payload = token.split('.').nth(1).unwrap();
    serde_json::from_slice(&B64.decode(payload).unwrap()).unwrap()
}

/// A PEM public key, as an attacker would use it for an RS256→HS256 confusion.
const PUBLIC_KEY: &str =
    "-----BEGIN PUBLIC KEY-----\nMFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAE\n-----END PUBLIC KEY-----\n";

async fn refused(node: &Node, token: &str) -> Vec<Value> {
    let mut c = Client::connect(&node.ws_url()).await;
    c.send(json!({"v":1,"type":"auth","token":token})).await;
    let (end, seen) = c.until_end().await;
    assert_eq!(end, End::Closed(4001, "unauthorized".into()), "{token}");
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert_eq!(seen[0]["code"], "unauthorized");
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_bad_token_is_refused_before_the_call_changes() {
    let node = Node::start(Options::default()).await;
    let (_, _, code) = node.call(8).await;
    let (mut a, _, _) = enter(&node, &code, "A").await;
    // A second participant's real token: the base of the forgeries.
    let j = node.join(&code, "B").await;
    let good = j["signal_token"].as_str().unwrap().to_owned();
    let claims = claims_of(&good);
    let hs = json!({"alg":"HS256","typ":"JWT","kid":JWT_KID});
    let now = claims["iat"].as_u64().unwrap();
    let with = |k: &str, v: Value| {
        let mut c = claims.clone();
        c[k] = v;
        sign(&hs, &c, JWT_SECRET)
    };
    let without = |k: &str| {
        let mut c = claims.clone();
        c.as_object_mut().unwrap().remove(k);
        sign(&hs, &c, JWT_SECRET)
    };
    let (h, p, sig) = {
        let mut it = good.split('.');
        (it.next().unwrap(), it.next().unwrap(), it.next().unwrap())
    };
    let none_header = B64.encode(json!({"alg":"none","typ":"JWT","kid":JWT_KID}).to_string());
    let cases: Vec<(&str, String, &str)> = vec![
        (
            "alg none, no signature",
            format!("{none_header}.{p}."),
            "algorithm",
        ),
        (
            "alg none, old signature",
            format!("{none_header}.{p}.{sig}"),
            "algorithm",
        ),
        (
            "wrong key",
            sign(&hs, &claims, b"another-secret-another-secret-123"),
            "signature",
        ),
        (
            "HS256 with a public key",
            sign(
                &json!({"alg":"HS256","kid":JWT_KID}),
                &claims,
                PUBLIC_KEY.as_bytes(),
            ),
            "signature",
        ),
        (
            "RS256 header",
            sign(&json!({"alg":"RS256","kid":JWT_KID}), &claims, JWT_SECRET),
            "algorithm",
        ),
        ("expired", with("exp", json!(now - 3600)), "expired"),
        (
            "not yet valid",
            with("nbf", json!(now + 3600)),
            "not_yet_valid",
        ),
        ("no exp", without("exp"), "malformed"),
        ("no sub", without("sub"), "malformed"),
        ("wrong aud", with("aud", json!("someone-else")), "audience"),
        (
            "wrong iss",
            with("iss", json!("https://evil.example")),
            "audience",
        ),
        (
            "unknown kid",
            sign(&json!({"alg":"HS256","kid":"k9"}), &claims, JWT_SECRET),
            "unknown_key",
        ),
        (
            "kid path",
            sign(&json!({"alg":"HS256","kid":"../../dev/null"}), &claims, b""),
            "unknown_key",
        ),
        (
            "oversized kid",
            sign(
                &json!({"alg":"HS256","kid":"k".repeat(10_000)}),
                &claims,
                JWT_SECRET,
            ),
            "malformed",
        ),
        (
            "no kid",
            sign(&json!({"alg":"HS256"}), &claims, JWT_SECRET),
            "unknown_key",
        ),
        (
            "jku ignored",
            sign(
                &json!({"alg":"HS256","kid":"k9","jku":"http://127.0.0.1:1/jwks"}),
                &claims,
                JWT_SECRET,
            ),
            "unknown_key",
        ),
        ("2 segments", format!("{h}.{p}"), "malformed"),
        ("4 segments", format!("{good}.{sig}"), "malformed"),
        ("bad base64 header", format!("{h}!!.{p}.{sig}"), "malformed"),
        (
            "bad base64 signature",
            format!("{h}.{p}.{sig}!!"),
            "malformed",
        ),
        // The signature covers the payload as sent: tampering fails there first.
        (
            "bad base64 payload",
            format!("{h}.{p}!!.{sig}"),
            "signature",
        ),
        ("1 MB token", "a".repeat(60_000), "malformed"),
        ("not a token", "hello".into(), "malformed"),
        (
            "other participant's jti",
            with("jti", json!("j_forged")),
            "revoked",
        ),
        ("unknown peer", with("sub", json!("p_nobody")), "revoked"),
    ];
    for (what, token, reason) in &cases {
        let before = node.metric("turnpike_signal_auth_failures_total", &[("reason", reason)]);
        refused(&node, token).await;
        let after = node.metric("turnpike_signal_auth_failures_total", &[("reason", reason)]);
        assert_eq!(after, before + 1.0, "{what}: counted under {reason}");
    }
    // Nobody joined meanwhile: A's next message is the answer to its ping.
    a.send(json!({"v":1,"type":"ping"})).await;
    assert_eq!(a.recv().await["type"], "pong");
    // And the real token still works.
    let (_b, w) = Client::joined(&node.ws_url(), &good).await;
    assert_eq!(w["peer_id"], claims["sub"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_first_message_must_be_auth_and_arrive_in_time() {
    let node = Node::start(Options {
        signal: signal::Settings {
            auth_timeout: std::time::Duration::from_millis(300),
            ..signal::Settings::default()
        },
        ..Options::default()
    })
    .await;
    // Silent: closed at the deadline.
    let mut c = Client::connect(&node.ws_url()).await;
    let (end, seen) = c.until_end().await;
    assert_eq!(end, End::Closed(4008, "auth_timeout".into()));
    assert_eq!(seen[0]["code"], "auth_timeout");
    // Malformed first message.
    let mut c = Client::connect(&node.ws_url()).await;
    c.send_raw("{{{").await;
    let (end, _) = c.until_end().await;
    assert_eq!(end, End::Closed(4001, "unauthorized".into()));
    harness::eventually("auth_timeout counted", || {
        node.metric(
            "turnpike_signal_disconnects_total",
            &[("reason", "auth_timeout")],
        ) == 1.0
    })
    .await;
}
