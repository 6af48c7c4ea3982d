//! Every way a signal token can be wrong, over a real socket: each is refused with `error
//! unauthorized` and close 4001 before any call state changes (a peer already in the call sees
//! nothing), and counted under its reason.

#![allow(clippy::unwrap_used)]

mod harness;

use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use base64::Engine as _;
use futures_util::SinkExt as _;
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
        // Below the 64 KiB message limit, far above any real token (the 1 MB one has its own
        // test: it is refused by the message size first).
        ("60 KB token", "a".repeat(60_000), "malformed"),
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

/// `header` and `claims` are raw JSON text (so keys can repeat), signed with `secret`.
fn sign_raw(header: &str, claims: &str, secret: &[u8]) -> String {
    let input = format!("{}.{}", B64.encode(header), B64.encode(claims));
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(secret).unwrap();
    mac.update(input.as_bytes());
    format!("{input}.{}", B64.encode(mac.finalize().into_bytes()))
}

/// Refused with 4001 and counted under `reason` (exactly once).
async fn refused_as(node: &Node, what: &str, token: &str, reason: &str) {
    let before = node.metric("turnpike_signal_auth_failures_total", &[("reason", reason)]);
    refused(node, token).await;
    let after = node.metric("turnpike_signal_auth_failures_total", &[("reason", reason)]);
    assert_eq!(after, before + 1.0, "{what}: counted under {reason}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_keys_in_the_header_or_claims_are_refused() {
    let node = Node::start(Options::default()).await;
    let (_, _, code) = node.call(8).await;
    let (mut a, wa, _) = enter(&node, &code, "A").await;
    let j = node.join(&code, "B").await;
    let good = j["signal_token"].as_str().unwrap().to_owned();
    let claims = claims_of(&good).to_string();
    let header = format!(r#"{{"alg":"HS256","typ":"JWT","kid":"{JWT_KID}"}}"#);
    // Every one correctly signed with the real key: only the repeated key is wrong. A parser
    // that kept the first or the last value would accept some of them, each differently.
    let open_claims = claims.strip_suffix('}').unwrap();
    let open_header = header.strip_suffix('}').unwrap();
    let cases = [
        (
            "sub twice (the second another peer)",
            sign_raw(
                &header,
                &format!(
                    r#"{open_claims},"sub":"{}"}}"#,
                    wa["peer_id"].as_str().unwrap()
                ),
                JWT_SECRET,
            ),
        ),
        (
            "sub twice, same value",
            sign_raw(
                &header,
                &format!(r#"{open_claims},"sub":{}}}"#, claims_of(&good)["sub"]),
                JWT_SECRET,
            ),
        ),
        (
            "aud twice",
            sign_raw(
                &header,
                &format!(r#"{open_claims},"aud":"other"}}"#),
                JWT_SECRET,
            ),
        ),
        (
            "exp twice",
            sign_raw(&header, &format!(r#"{open_claims},"exp":1}}"#), JWT_SECRET),
        ),
        (
            "alg twice",
            sign_raw(
                &format!(r#"{open_header},"alg":"none"}}"#),
                &claims,
                JWT_SECRET,
            ),
        ),
        (
            "kid twice",
            sign_raw(
                &format!(r#"{open_header},"kid":"k9"}}"#),
                &claims,
                JWT_SECRET,
            ),
        ),
    ];
    for (what, token) in &cases {
        refused_as(&node, what, token, "malformed").await;
    }
    // Nobody joined meanwhile, and the real token still works.
    a.send(json!({"v":1,"type":"ping"})).await;
    assert_eq!(a.recv().await["type"], "pong");
    let (_b, w) = Client::joined(&node.ws_url(), &good).await;
    assert_eq!(w["peer_id"], j["peer_id"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_one_megabyte_token_is_refused() {
    let token = format!(
        "{}.{}.{}",
        "a".repeat(500_000),
        "b".repeat(500_000),
        "c".repeat(48_576)
    );
    let auth = json!({"v":1,"type":"auth","token":token}).to_string();
    assert!(auth.len() > 1 << 20);

    // With the default 64 KiB message limit: the frame is refused before anything reads it.
    let node = Node::start(Options::default()).await;
    let (_, _, code) = node.call(8).await;
    let mut c = Client::connect(&node.ws_url()).await;
    let _ =
        c.ws.send(tokio_tungstenite::tungstenite::Message::Text(
            auth.clone().into(),
        ))
        .await;
    let (end, _) = c.until_end().await;
    assert_eq!(end, End::Closed(1009, "too_large".into()));
    let (mut b, _, _) = enter(&node, &code, "B").await;
    b.send(json!({"v":1,"type":"ping"})).await;
    assert_eq!(b.recv().await["type"], "pong");

    // With a limit that lets the message through: the token itself is refused (it is far
    // above the verifier's length limit), 4001 and counted, and the server goes on.
    let node = Node::start(Options {
        signal: signal::Settings {
            max_message: 2 << 20,
            ..signal::Settings::default()
        },
        ..Options::default()
    })
    .await;
    let (_, _, code) = node.call(8).await;
    refused_as(&node, "1 MB token", &token, "malformed").await;
    // A 1 MB token made of three valid-looking base64url parts with the real header.
    let j = node.join(&code, "C").await;
    let good = j["signal_token"].as_str().unwrap();
    let header = good.split('.').next().unwrap();
    let padded = format!("{header}.{}.{}", "A".repeat(1 << 20), "A".repeat(43));
    refused_as(&node, "1 MB payload", &padded, "malformed").await;
    let (mut c, _) = Client::joined(&node.ws_url(), good).await;
    c.send(json!({"v":1,"type":"ping"})).await;
    assert_eq!(c.recv().await["type"], "pong");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_url_and_embedded_key_headers_are_ignored_on_a_valid_token() {
    let node = Node::start(Options::default()).await;
    let (_, _, code) = node.call(8).await;
    // Where a verifier that followed `jku`/`x5u` would go: nothing may ever connect here.
    let trap = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    trap.set_nonblocking(true).unwrap();
    let trap_url = format!("http://{}", trap.local_addr().unwrap());
    let attacker_secret = b"attacker-chosen-secret-attacker-chosen";
    let jwk = json!({"kty":"oct","kid":JWT_KID,"k":B64.encode(attacker_secret),"alg":"HS256"});
    let headers = [
        (
            "jku",
            json!({"alg":"HS256","typ":"JWT","kid":JWT_KID,"jku":format!("{trap_url}/jwks.json")}),
        ),
        (
            "x5u",
            json!({"alg":"HS256","typ":"JWT","kid":JWT_KID,"x5u":format!("{trap_url}/cert.pem")}),
        ),
        (
            "jwk",
            json!({"alg":"HS256","typ":"JWT","kid":JWT_KID,"jwk":jwk}),
        ),
        (
            "all three",
            json!({"alg":"HS256","typ":"JWT","kid":JWT_KID,"jwk":jwk,
                   "jku":format!("{trap_url}/jwks.json"),"x5u":format!("{trap_url}/cert.pem")}),
        ),
    ];
    let mut clients = Vec::new();
    for (what, header) in &headers {
        let j = node.join(&code, what).await;
        let claims = claims_of(j["signal_token"].as_str().unwrap());
        // Signed with the configured key: a valid token whatever the extra headers say.
        let token = sign(header, &claims, JWT_SECRET);
        let (c, w) = Client::joined(&node.ws_url(), &token).await;
        assert_eq!(w["peer_id"], j["peer_id"], "{what}");
        clients.push(c);
        // The same claims signed with the key the `jwk` header carries: refused.
        let forged = sign(header, &claims, attacker_secret);
        refused_as(&node, what, &forged, "signature").await;
    }
    // Verification happens before `welcome`: a fetch would have connected by now, and a
    // completed TCP handshake waits in the backlog whether or not anyone accepted it.
    match trap.accept() {
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
        other => panic!("the verifier fetched a key URL: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_typ_is_refused() {
    let node = Node::start(Options::default()).await;
    let (_, _, code) = node.call(8).await;
    let j = node.join(&code, "B").await;
    let good = j["signal_token"].as_str().unwrap().to_owned();
    let claims = claims_of(&good);
    let cases = [
        (
            "at+jwt",
            json!({"alg":"HS256","typ":"at+jwt","kid":JWT_KID}),
            "algorithm",
        ),
        (
            "JWE",
            json!({"alg":"HS256","typ":"JWE","kid":JWT_KID}),
            "algorithm",
        ),
        (
            "empty",
            json!({"alg":"HS256","typ":"","kid":JWT_KID}),
            "algorithm",
        ),
        (
            "a number",
            json!({"alg":"HS256","typ":1,"kid":JWT_KID}),
            "malformed",
        ),
    ];
    for (what, header, reason) in &cases {
        refused_as(&node, what, &sign(header, &claims, JWT_SECRET), reason).await;
    }
    // The same claims with the right `typ` (or none) are fine.
    let (_b, w) = Client::joined(
        &node.ws_url(),
        &sign(&json!({"alg":"HS256","kid":JWT_KID}), &claims, JWT_SECRET),
    )
    .await;
    assert_eq!(w["peer_id"], j["peer_id"]);
}
