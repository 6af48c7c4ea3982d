//! Signaling with real WebSocket clients on one node (memory store): the exchange between two
//! and three peers, media, stats into the histograms, lifecycle (kick, end, resume, empty
//! timeout, credential and token refresh), and the refusals and limits of the protocol.

#![allow(clippy::unwrap_used)]

mod harness;
#[path = "../../control/tests/common/redis.rs"]
mod redis_server;

use std::sync::Arc;
use std::time::Duration;

use control::api::ManualClock;
use futures_util::{SinkExt as _, StreamExt as _};
use harness::{enter, eventually, Client, End, Node, Options};
use serde_json::json;
use signal::Settings;
use tokio_tungstenite::tungstenite::Message;

fn s(v: &serde_json::Value) -> &str {
    v.as_str().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_peers_exchange_offer_answer_and_candidates() {
    let node = Node::start(Options::default()).await;
    let (key, call, code) = node.call(8).await;
    let (mut a, wa, ja) = enter(&node, &code, "Ada").await;
    assert_eq!(wa["call_id"], call.as_str());
    assert_eq!(wa["peer_id"], ja["peer_id"]);
    assert_eq!(wa["peers"], json!([]));
    assert!(!wa["ice_servers"].as_array().unwrap().is_empty());
    assert!(wa["ping_interval_ms"].as_u64().unwrap() > 0);
    let a_id = s(&wa["peer_id"]).to_owned();

    let (mut b, wb, _) = enter(&node, &code, "Bob").await;
    let b_id = s(&wb["peer_id"]).to_owned();
    assert_eq!(wb["peers"][0]["peer_id"], a_id.as_str());
    assert_eq!(wb["peers"][0]["name"], "Ada");
    let joined = a.recv_type("peer_joined").await;
    assert_eq!(joined["peer"]["peer_id"], b_id.as_str());
    assert_eq!(joined["peer"]["name"], "Bob");

    a.send(json!({"v":1,"type":"offer","to":b_id,"sdp":"v=0 offer"}))
        .await;
    let offer = b.recv_type("offer").await;
    assert_eq!(offer["from"], a_id.as_str());
    assert_eq!(offer["sdp"], "v=0 offer");

    b.send(json!({"v":1,"type":"answer","to":a_id,"sdp":"v=0 answer"}))
        .await;
    let answer = a.recv_type("answer").await;
    assert_eq!(answer["from"], b_id.as_str());
    assert_eq!(answer["sdp"], "v=0 answer");

    let cand = json!({"candidate":"candidate:1 1 udp 1 127.0.0.1 5000 typ host","sdpMid":"0"});
    a.send(json!({"v":1,"type":"candidate","to":b_id,"candidate":cand}))
        .await;
    b.send(json!({"v":1,"type":"candidate","to":a_id,"candidate":null}))
        .await;
    let got = b.recv_type("candidate").await;
    assert_eq!(got["candidate"], cand);
    assert_eq!(got["from"], a_id.as_str());
    let got = a.recv_type("candidate").await;
    assert_eq!(got["candidate"], serde_json::Value::Null);

    b.send(json!({"v":1,"type":"media","audio":true,"video":false,"screen":true}))
        .await;
    let media = a.recv_type("media").await;
    assert_eq!(media["from"], b_id.as_str());
    assert_eq!(
        (
            media["audio"].clone(),
            media["video"].clone(),
            media["screen"].clone()
        ),
        (json!(true), json!(false), json!(true))
    );

    a.send(json!({"v":1,"type":"ping"})).await;
    a.recv_type("pong").await;

    b.send(json!({"v":1,"type":"leave"})).await;
    let (end, _) = b.until_end().await;
    assert_eq!(end, End::Closed(1000, "leave".into()));
    let left = a.recv_type("peer_left").await;
    assert_eq!(left["peer_id"], b_id.as_str());
    assert_eq!(left["reason"], "leave");

    // The call shows both participants: Bob left, with his last media state.
    let deadline = tokio::time::Instant::now() + harness::PATIENCE;
    loop {
        let (_, v) = node
            .http("GET", &format!("/v1/calls/{call}"), Some(&key), None)
            .await;
        let bob = v["participants"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["peer_id"] == b_id.as_str())
            .cloned()
            .unwrap();
        if bob["left_at"].is_string() {
            assert_eq!(
                bob["media"],
                json!({"audio": true, "video": false, "screen": true})
            );
            assert_eq!(v["state"], "active");
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "left_at not recorded: {v}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_peers_each_message_reaches_only_its_addressee() {
    let node = Node::start(Options::default()).await;
    let (_, _, code) = node.call(8).await;
    let (mut a, wa, _) = enter(&node, &code, "A").await;
    let (mut b, wb, _) = enter(&node, &code, "B").await;
    let (mut c, wc, _) = enter(&node, &code, "C").await;
    let (ida, idb, idc) = (s(&wa["peer_id"]), s(&wb["peer_id"]), s(&wc["peer_id"]));
    assert_eq!(wc["peers"].as_array().unwrap().len(), 2);
    a.recv_type("peer_joined").await;
    a.recv_type("peer_joined").await;
    b.recv_type("peer_joined").await;

    a.send(json!({"v":1,"type":"offer","to":idc,"sdp":"for c"}))
        .await;
    b.send(json!({"v":1,"type":"offer","to":idc,"sdp":"from b"}))
        .await;
    let first = c.recv_type("offer").await;
    let second = c.recv_type("offer").await;
    let mut froms = vec![s(&first["from"]).to_owned(), s(&second["from"]).to_owned()];
    froms.sort();
    let mut want = vec![ida.to_owned(), idb.to_owned()];
    want.sort();
    assert_eq!(froms, want);

    // Media goes to both others; a ping round trip then proves B saw no offer meant for C.
    c.send(json!({"v":1,"type":"media","audio":false,"video":true,"screen":false}))
        .await;
    assert_eq!(a.recv_type("media").await["from"], idc);
    b.send(json!({"v":1,"type":"ping"})).await;
    let mut seen = Vec::new();
    loop {
        let m = b.recv().await;
        if m["type"] == "pong" {
            break;
        }
        seen.push(m);
    }
    assert!(seen.iter().all(|m| m["type"] != "offer"), "{seen:?}");
    assert!(seen.iter().any(|m| m["type"] == "media"), "{seen:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_to_strangers_and_before_auth_are_refused() {
    let node = Node::start(Options::default()).await;
    let (_, _, code) = node.call(8).await;
    let (_, _, other_code) = node.call(8).await;
    let (mut a, _, _) = enter(&node, &code, "A").await;
    let (_stranger, ws, _) = enter(&node, &other_code, "S").await;
    a.send(json!({"v":1,"type":"offer","to":s(&ws["peer_id"]),"sdp":"x"}))
        .await;
    let e = a.recv_type("error").await;
    assert_eq!(e["code"], "unknown_peer");

    // Not authenticated: an offer as first message closes with 4001.
    let mut c = Client::connect(&node.ws_url()).await;
    c.send(json!({"v":1,"type":"offer","to":"p_x","sdp":"x"}))
        .await;
    let (end, seen) = c.until_end().await;
    assert_eq!(end, End::Closed(4001, "unauthorized".into()));
    assert_eq!(seen[0]["code"], "unauthorized");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stats_move_the_quality_histograms() {
    let node = Node::start(Options::default()).await;
    let (_, _, code) = node.call(8).await;
    let (mut a, _, _) = enter(&node, &code, "A").await;
    assert_eq!(node.histogram_count("turnpike_call_rtt_seconds"), 0);
    a.send(
        json!({"v":1,"type":"stats","rtt_ms":42.0,"jitter_ms":3.0,"packet_loss":0.01,
        "bitrate_kbps":900.0,"candidate_type":"relay","relay_protocol":"tcp"}),
    )
    .await;
    a.send(json!({"v":1,"type":"ping"})).await;
    a.recv_type("pong").await;
    for h in [
        "turnpike_call_rtt_seconds",
        "turnpike_call_jitter_seconds",
        "turnpike_call_packet_loss_ratio",
        "turnpike_call_mos",
    ] {
        assert_eq!(node.histogram_count(h), 1, "{h}");
    }
    assert_eq!(
        node.metric(
            "turnpike_call_connections_total",
            &[("candidate_type", "relay"), ("relay_protocol", "tcp")]
        ),
        1.0
    );
    // A bad report is refused with an error and observes nothing.
    a.send(
        json!({"v":1,"type":"stats","rtt_ms":-1,"jitter_ms":3.0,"packet_loss":2,
        "candidate_type":"relay","relay_protocol":"tcp"}),
    )
    .await;
    assert_eq!(a.recv_type("error").await["code"], "invalid_message");
    assert_eq!(node.histogram_count("turnpike_call_rtt_seconds"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stats_count_up_to_one_per_other_seat_every_interval() {
    // A client reports once per peer connection, all at once: in a call of 4 seats, up to 3
    // reports every 4 s count. A guest flooding absurd reports as fast as the message limit
    // allows must not drag the fleet's quality histograms beyond that.
    let node = Node::start(Options::default()).await;
    let (key, call, code) = node.call(4).await;
    let (mut a, _, _) = enter(&node, &code, "A").await;
    let report = |candidate: &str, rtt: f64| {
        json!({"v":1,"type":"stats","rtt_ms":rtt,"jitter_ms":3.0,"packet_loss":0.0,
        "candidate_type":candidate,"relay_protocol":"udp"})
    };
    let started = tokio::time::Instant::now();
    // An honest burst: three peer connections, two paths.
    for candidate in ["host", "relay", "host"] {
        a.send(report(candidate, 40.0)).await;
    }
    a.send(json!({"v":1,"type":"ping"})).await;
    a.recv_type("pong").await;
    let windows = 1 + started.elapsed().as_secs() / 4;
    assert_eq!(
        node.histogram_count("turnpike_call_rtt_seconds"),
        3,
        "every one of them counts"
    );
    // A flood, alternating paths.
    for i in 0..40 {
        let candidate = if i % 2 == 0 { "relay" } else { "srflx" };
        a.send(report(candidate, 60000.0)).await;
    }
    a.send(json!({"v":1,"type":"ping"})).await;
    a.recv_type("pong").await;
    // However slow the machine: 3 per 4 s window that began meanwhile.
    let bound = 3 * (windows + started.elapsed().as_secs() / 4);
    let observed = node.histogram_count("turnpike_call_rtt_seconds");
    assert!(
        (3..=bound).contains(&observed),
        "{observed} reports observed, bound {bound}"
    );
    // Each path counts once per connection, however often reports alternate.
    let path = |c: &str| {
        node.metric(
            "turnpike_call_connections_total",
            &[("candidate_type", c), ("relay_protocol", "udp")],
        )
    };
    assert_eq!(
        (path("host"), path("relay")),
        (1.0, 1.0),
        "host was reported twice"
    );
    assert!(path("srflx") <= 1.0);
    // The stored summary says how many counted.
    let deadline = tokio::time::Instant::now() + harness::PATIENCE;
    let reports = loop {
        let (_, v) = node
            .http("GET", &format!("/v1/calls/{call}"), Some(&key), None)
            .await;
        if let Some(n) = v["participants"][0]["quality"]["reports"].as_u64() {
            break n;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no summary stored: {v}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!((1..=observed).contains(&reports), "{reports} of {observed}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kick_closes_the_socket_and_revokes_the_token() {
    let node = Node::start(Options::default()).await;
    let (key, call, code) = node.call(8).await;
    let (mut a, _, _) = enter(&node, &code, "A").await;
    let (mut b, wb, jb) = enter(&node, &code, "B").await;
    let idb = s(&wb["peer_id"]).to_owned();
    a.recv_type("peer_joined").await;
    let (status, v) = node
        .http(
            "DELETE",
            &format!("/v1/calls/{call}/participants/{idb}"),
            Some(&key),
            None,
        )
        .await;
    assert_eq!(status.as_u16(), 204, "{v}");
    let (end, _) = b.until_end().await;
    assert_eq!(end, End::Closed(4003, "kicked".into()));
    let left = a.recv_type("peer_left").await;
    assert_eq!(left["reason"], "kicked");
    // The old token no longer opens a socket.
    let mut again = Client::connect(&node.ws_url()).await;
    again
        .send(json!({"v":1,"type":"auth","token":jb["signal_token"]}))
        .await;
    let (end, _) = again.until_end().await;
    assert_eq!(end, End::Closed(4001, "unauthorized".into()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ending_the_call_closes_everyone() {
    let node = Node::start(Options::default()).await;
    let (key, call, code) = node.call(8).await;
    let (mut a, _, _) = enter(&node, &code, "A").await;
    let (mut b, _, _) = enter(&node, &code, "B").await;
    let (status, _) = node
        .http("POST", &format!("/v1/calls/{call}/end"), Some(&key), None)
        .await;
    assert!(status.is_success());
    for c in [&mut a, &mut b] {
        let (end, seen) = c.until_end().await;
        assert_eq!(end, End::Closed(4000, "call_ended".into()));
        assert!(
            seen.iter()
                .any(|m| m["type"] == "call_ended" && m["reason"] == "api"),
            "{seen:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reconnect_within_the_window_resumes_unseen_and_after_it_the_peer_left() {
    let node = Node::start(Options {
        signal: Settings {
            resume_window: Duration::from_secs(2),
            ..Settings::default()
        },
        ..Options::default()
    })
    .await;
    let (_, _, code) = node.call(8).await;
    let (mut a, _, _) = enter(&node, &code, "A").await;
    let (b, wb, jb) = enter(&node, &code, "B").await;
    let idb = s(&wb["peer_id"]).to_owned();
    a.recv_type("peer_joined").await;
    drop(b); // the TCP connection goes away without a close frame
    let token = s(&jb["signal_token"]).to_owned();
    let (_b2, w2) = Client::joined(&node.ws_url(), &token).await;
    assert_eq!(w2["resumed"], true);
    assert_eq!(w2["peer_id"], idb.as_str());
    // A saw neither a leave nor a join: the next thing it gets is the pong.
    a.send(json!({"v":1,"type":"ping"})).await;
    assert_eq!(a.recv().await["type"], "pong");

    drop(_b2);
    let left = a.recv_type("peer_left").await;
    assert_eq!(left["peer_id"], idb.as_str());
    assert_eq!(left["reason"], "timeout");
}

/// Waits until the store records that `peer` left `call` (the room writes it in the background,
/// never waiting on the store).
async fn until_left_in_store(node: &Node, call: &str, peer: &str) {
    let deadline = tokio::time::Instant::now() + harness::PATIENCE;
    loop {
        let c = node.state.store.get_call(call).await.unwrap().unwrap();
        if c.participant(peer).unwrap().left_at.is_some() {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "leave never stored");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Authenticates with `token` and expects the refusal of a participant that left for good.
async fn refused_as_left(node: &Node, token: &str) {
    let before = node.metric("turnpike_signal_auth_failures_total", &[("reason", "left")]);
    let mut c = Client::connect(&node.ws_url()).await;
    c.send(json!({"v":1,"type":"auth","token":token})).await;
    let (end, seen) = c.until_end().await;
    assert_eq!(end, End::Closed(4001, "unauthorized".into()));
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert_eq!(seen[0]["type"], "error");
    assert_eq!(seen[0]["code"], "unauthorized");
    assert!(
        s(&seen[0]["message"]).contains("left"),
        "the client is told why: {seen:?}"
    );
    let after = node.metric("turnpike_signal_auth_failures_total", &[("reason", "left")]);
    assert_eq!(after, before + 1.0, "counted under reason left");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_left_cannot_come_back_with_its_old_token_and_its_seat_is_given_away() {
    let node = Node::start(Options::default()).await;
    let (key, call, code) = node.call(2).await;
    let (mut a, _, _) = enter(&node, &code, "A").await;
    let (mut b, wb, jb) = enter(&node, &code, "B").await;
    let idb = s(&wb["peer_id"]).to_owned();
    let token_b = s(&jb["signal_token"]).to_owned();
    a.recv_type("peer_joined").await;
    b.send(json!({"v":1,"type":"leave"})).await;
    let (end, _) = b.until_end().await;
    assert_eq!(end, End::Closed(1000, "leave".into()));
    // At once, before anything else: the leave is final even if the store has not heard yet.
    refused_as_left(&node, &token_b).await;
    let left = a.recv_type("peer_left").await;
    assert_eq!(left["peer_id"], idb.as_str());
    assert_eq!(left["reason"], "leave");
    // The seat is free for someone else (the call holds 2) once the store has the leave.
    until_left_in_store(&node, &call, &idb).await;
    let (mut c, wc, _) = enter(&node, &code, "C").await;
    assert_eq!(a.recv().await["peer"]["peer_id"], wc["peer_id"]);
    // And B's old token still does not get in (the room would be over max_participants).
    refused_as_left(&node, &token_b).await;
    // Nobody saw B come back: A's next message is the answer to its ping.
    a.send(json!({"v":1,"type":"ping"})).await;
    assert_eq!(a.recv().await["type"], "pong");
    c.send(json!({"v":1,"type":"ping"})).await;
    assert_eq!(c.recv().await["type"], "pong");
    // The store shows B left, and exactly two present.
    let (_, v) = node
        .http("GET", &format!("/v1/calls/{call}"), Some(&key), None)
        .await;
    let parts = v["participants"].as_array().unwrap();
    let b_rec = parts.iter().find(|p| p["peer_id"] == idb.as_str()).unwrap();
    assert!(b_rec["left_at"].is_string(), "{v}");
    assert_eq!(
        parts.iter().filter(|p| p["left_at"].is_null()).count(),
        2,
        "{v}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_the_resume_window_the_old_token_is_refused() {
    let node = Node::start(Options {
        signal: Settings {
            resume_window: Duration::from_millis(300),
            ..Settings::default()
        },
        ..Options::default()
    })
    .await;
    let (_, _, code) = node.call(8).await;
    let (mut a, _, _) = enter(&node, &code, "A").await;
    let (b, wb, jb) = enter(&node, &code, "B").await;
    a.recv_type("peer_joined").await;
    drop(b); // gone without leave: resumable for 300 ms
    let left = a.recv_type("peer_left").await;
    assert_eq!(left["peer_id"], wb["peer_id"]);
    assert_eq!(left["reason"], "timeout");
    refused_as_left(&node, s(&jb["signal_token"])).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_room_remembers_a_leave_the_store_has_not_recorded_yet() {
    let node = Node::start(Options::default()).await;
    let (_, call, code) = node.call(8).await;
    let (mut a, _, _) = enter(&node, &code, "A").await;
    let (mut b, wb, jb) = enter(&node, &code, "B").await;
    let idb = s(&wb["peer_id"]).to_owned();
    a.recv_type("peer_joined").await;
    b.send(json!({"v":1,"type":"leave"})).await;
    b.until_end().await;
    a.recv_type("peer_left").await;
    // The room writes the leave to the store in the background: wait for it, then undo it, as
    // if the write were still on its way (a slow Redis).
    until_left_in_store(&node, &call, &idb).await;
    let store = std::sync::Arc::clone(&node.state.store);
    assert!(store.set_left(&call, &idb, None).await.unwrap());
    refused_as_left(&node, s(&jb["signal_token"])).await;
    a.send(json!({"v":1,"type":"ping"})).await;
    assert_eq!(a.recv().await["type"], "pong", "A saw no join");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_of_a_participant_the_store_shows_left_is_refused() {
    // What another node sees after the peer left on this one: no room here remembers it, the
    // store is all there is.
    let node = Node::start(Options::default()).await;
    let (_, call, code) = node.call(8).await;
    let j = node.join(&code, "B").await;
    let now = node.state.clock.now_ms();
    assert!(node
        .state
        .store
        .set_left(&call, s(&j["peer_id"]), Some(now))
        .await
        .unwrap());
    refused_as_left(&node, s(&j["signal_token"])).await;
    // No room was started for the refused peer.
    assert_eq!(node.signal.rooms(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_empty_call_ends_after_the_empty_timeout() {
    let node = Node::start(Options {
        signal: Settings {
            empty_timeout: Duration::from_secs(1),
            resume_window: Duration::ZERO,
            ..Settings::default()
        },
        ..Options::default()
    })
    .await;
    let (key, call, code) = node.call(8).await;
    let (mut a, _, _) = enter(&node, &code, "A").await;
    a.send(json!({"v":1,"type":"leave"})).await;
    a.until_end().await;
    let deadline = tokio::time::Instant::now() + harness::PATIENCE;
    loop {
        let (_, v) = node
            .http("GET", &format!("/v1/calls/{call}"), Some(&key), None)
            .await;
        if v["state"] == "ended" {
            assert!(v["participants"][0]["left_at"].is_string(), "{v}");
            assert_eq!(v["end_reason"], "empty");
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "call not ended: {v}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

fn turn_username(v: &serde_json::Value) -> serde_json::Value {
    v["ice_servers"]
        .as_array()
        .unwrap()
        .iter()
        .find_map(|s| s.get("username").cloned())
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fresh_credentials_come_at_80_percent_of_their_lifetime_and_before_expiry() {
    // 5 s: a lifetime of 4–5 s (the expiry is in whole seconds), so the push is due 3.2–4 s in
    // and at least 0.8 s before the expiry — room for a loaded machine on the upper bound.
    let node = Node::start(Options {
        credential_ttl_s: 5,
        ..Options::default()
    })
    .await;
    let (_, _, code) = node.call(8).await;
    let j = node.join(&code, "A").await;
    let mut a = Client::connect(&node.ws_url()).await;
    // Before `auth` leaves: no earlier than the server's mint.
    let sent_auth = tokio::time::Instant::now();
    a.send(json!({"v":1,"type":"auth","token":j["signal_token"]}))
        .await;
    let w = a.recv_type("welcome").await;
    // After `welcome` arrived: no earlier than the mint either, so the lifetime measured from
    // here is at most the real one.
    let welcomed_ms = unix_ms();
    let expires_ms = w["ice_servers_expire_at"].as_u64().unwrap() * 1000;
    let lifetime_at_most = Duration::from_millis(expires_ms - welcomed_ms);
    let fresh = a.recv_type("ice_servers").await;
    let elapsed = sent_auth.elapsed();
    let arrived_ms = unix_ms();
    // Not early: the server pushed no sooner than 80 % of the lifetime after minting, and the
    // mint came after `sent_auth`. (A millisecond of slack for mixing the wall clock with the
    // monotonic one.)
    assert!(
        elapsed + Duration::from_millis(1) >= lifetime_at_most * 4 / 5,
        "pushed after {elapsed:?}, before 80 % of a lifetime of at least {lifetime_at_most:?}"
    );
    // Not late: before the old credentials stopped working.
    assert!(
        arrived_ms < expires_ms,
        "arrived at {arrived_ms} ms, the old credentials expired at {expires_ms} ms"
    );
    assert!(fresh["ice_servers_expire_at"].as_u64().unwrap() * 1000 > expires_ms);
    assert_ne!(turn_username(&w), turn_username(&fresh));
}

/// Reads until `pong` (after sending `ping`); returns what came before it.
async fn until_pong(c: &mut Client) -> Vec<serde_json::Value> {
    c.send(json!({"v":1,"type":"ping"})).await;
    let mut seen = Vec::new();
    loop {
        let m = c.recv().await;
        if m["type"] == "pong" {
            return seen;
        }
        seen.push(m);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pushed_token_resumes_a_dropped_socket_after_the_first_token_expired() {
    // The control plane's clock stands still unless moved: the tokens' times follow it, while
    // the push is scheduled in real time from the lifetime the clock gives (80 % of 4 s).
    // A whole second, so that lifetime is exactly 4 s.
    const T0_MS: u64 = 1_800_000_000_000;
    let clock = Arc::new(ManualClock::new(T0_MS));
    let node = Node::start(Options {
        token_ttl: Duration::from_secs(4),
        clock: clock.clone(),
        ..Options::default()
    })
    .await;
    let issuer = format!("http://{}", node.addr);
    let jwt = &node.state.settings.jwt;
    let (_, _, code) = node.call(8).await;
    let (mut a, _, _) = enter(&node, &code, "A").await;
    // Before B's `auth`, when the push gets scheduled, and after its `welcome`: the push is
    // checked against both, so a slow join cannot make it look late.
    let started = tokio::time::Instant::now();
    let (b, wb, jb) = enter(&node, &code, "B").await;
    let welcomed = tokio::time::Instant::now();
    let idb = s(&wb["peer_id"]).to_owned();
    a.recv_type("peer_joined").await;
    let first = s(&jb["signal_token"]).to_owned();
    let first_claims = jwt.verify(&first, &issuer, T0_MS / 1000, 0).unwrap();
    assert_eq!(first_claims.exp, T0_MS / 1000 + 4);

    // 3 s of the token's 4 pass on the control plane's clock before the push is due.
    clock.advance(Duration::from_secs(3));
    let mut b = b;
    let pushed = b.recv_type("token").await;
    let (elapsed, since_welcome) = (started.elapsed(), welcomed.elapsed());
    assert!(
        elapsed >= Duration::from_millis(3_200),
        "pushed after {elapsed:?}: before 80 % of the 4 s lifetime"
    );
    assert!(
        since_welcome < Duration::from_secs(4),
        "pushed {since_welcome:?} after the welcome: the first token had expired"
    );
    let token = s(&pushed["token"]).to_owned();
    assert_ne!(token, first);
    // Minted at the clock's T0 + 3 s, when the first token still had a second to live.
    let claims = jwt.verify(&token, &issuer, T0_MS / 1000 + 3, 0).unwrap();
    assert_eq!(claims.iat, T0_MS / 1000 + 3);
    assert_eq!(claims.nbf, claims.iat);
    assert_eq!(claims.exp, claims.iat + 4);
    assert_eq!(pushed["expires_at"].as_u64(), Some(claims.exp));
    assert_eq!(
        (&claims.iss, &claims.aud, &claims.sub, &claims.call),
        (
            &first_claims.iss,
            &first_claims.aud,
            &first_claims.sub,
            &first_claims.call
        )
    );
    assert_eq!(
        (claims.role, &claims.name, &claims.jti),
        (first_claims.role, &first_claims.name, &first_claims.jti)
    );
    assert_eq!(claims.sub, idb);
    assert!(
        node.metric("turnpike_signal_messages_sent_total", &[("type", "token")]) >= 1.0,
        "the push is counted"
    );

    // Past the first token's expiry and its leeway; within the pushed one's.
    clock.set(T0_MS + (4 + signal::LEEWAY_S + 1) * 1000);
    drop(b); // the TCP connection goes away without a close frame: resumable for 30 s
    let expired = node.metric(
        "turnpike_signal_auth_failures_total",
        &[("reason", "expired")],
    );
    let mut old = Client::connect(&node.ws_url()).await;
    old.send(json!({"v":1,"type":"auth","token":first})).await;
    let (end, _) = old.until_end().await;
    assert_eq!(end, End::Closed(4001, "unauthorized".into()));
    assert_eq!(
        node.metric(
            "turnpike_signal_auth_failures_total",
            &[("reason", "expired")]
        ),
        expired + 1.0,
        "the first token was refused as expired"
    );

    let (mut b2, w2) = Client::joined(&node.ws_url(), &token).await;
    assert_eq!(w2["resumed"], true, "{w2}");
    assert_eq!(w2["peer_id"], idb.as_str());
    // A saw neither a leave nor a join (only its own token pushes, maybe).
    let seen = until_pong(&mut a).await;
    assert!(
        seen.iter()
            .all(|m| m["type"] != "peer_left" && m["type"] != "peer_joined"),
        "{seen:?}"
    );
    // The resumed socket works and keeps getting fresh tokens.
    assert!(until_pong(&mut b2)
        .await
        .iter()
        .all(|m| m["type"] == "token"));
    let next = b2.recv_type("token").await;
    assert!(next["expires_at"].as_u64() >= Some(claims.exp));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pushed_token_of_a_kicked_or_left_peer_is_refused() {
    let node = Node::start(Options {
        token_ttl: Duration::from_secs(2),
        ..Options::default()
    })
    .await;
    let (key, call, code) = node.call(8).await;
    let (mut a, _, _) = enter(&node, &code, "A").await;
    let (mut b, wb, _) = enter(&node, &code, "B").await;
    let (mut c, _, _) = enter(&node, &code, "C").await;
    let idb = s(&wb["peer_id"]).to_owned();
    let token_b = s(&b.recv_type("token").await["token"]).to_owned();
    let token_c = s(&c.recv_type("token").await["token"]).to_owned();
    a.recv_type("peer_joined").await;

    let (status, v) = node
        .http(
            "DELETE",
            &format!("/v1/calls/{call}/participants/{idb}"),
            Some(&key),
            None,
        )
        .await;
    assert_eq!(status.as_u16(), 204, "{v}");
    let (end, _) = b.until_end().await;
    assert_eq!(end, End::Closed(4003, "kicked".into()));
    let revoked = node.metric(
        "turnpike_signal_auth_failures_total",
        &[("reason", "revoked")],
    );
    let mut again = Client::connect(&node.ws_url()).await;
    again
        .send(json!({"v":1,"type":"auth","token":token_b}))
        .await;
    let (end, _) = again.until_end().await;
    assert_eq!(end, End::Closed(4001, "unauthorized".into()));
    assert_eq!(
        node.metric(
            "turnpike_signal_auth_failures_total",
            &[("reason", "revoked")]
        ),
        revoked + 1.0
    );

    c.send(json!({"v":1,"type":"leave"})).await;
    let (end, _) = c.until_end().await;
    assert_eq!(end, End::Closed(1000, "leave".into()));
    refused_as_left(&node, &token_c).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_at_max_participants_refuses_the_next_socket() {
    let node = Node::start(Options::default()).await;
    let (_, _, code) = node.call(2).await;
    let (_a, _, _) = enter(&node, &code, "A").await;
    let (_b, _, _) = enter(&node, &code, "B").await;
    // /v1/join itself says 409 for the third.
    let (status, v) = node.try_join(&code, "C").await;
    assert_eq!(status.as_u16(), 409, "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connected_peer_keeps_its_seat_after_its_join_token_is_refused() {
    // A seat of a participant that never connects lapses when its join token can no longer
    // authenticate; authenticating marks the participant connected, which keeps the seat.
    const T0_MS: u64 = 1_800_000_000_000;
    let clock = Arc::new(ManualClock::new(T0_MS));
    let node = Node::start(Options {
        clock: clock.clone(),
        ..Options::default()
    })
    .await;
    let (key, call, code) = node.call(2).await;
    let (mut a, wa, _) = enter(&node, &code, "A").await;
    let ida = s(&wa["peer_id"]).to_owned();
    // B joins but never opens the socket.
    let jb = node.join(&code, "B").await;
    let stored = node.state.store.get_call(&call).await.unwrap().unwrap();
    let (pa, pb) = (&stored.participants[0], &stored.participants[1]);
    assert!(
        pa.connected,
        "authenticating marks the participant connected"
    );
    assert!(!pb.connected);
    let seat_until = T0_MS + (600 + signal::LEEWAY_S + 1) * 1000;
    assert_eq!(pb.seat_until, Some(seat_until));
    assert_eq!(pa.seat_until, pb.seat_until);

    // Past both join tokens' last moment: B's seat is free, A's is not.
    clock.set(seat_until);
    let (status, v) = node.try_join(&code, "C").await;
    assert_eq!(status.as_u16(), 200, "{v}");
    let (status, v) = node.try_join(&code, "D").await;
    assert_eq!(status.as_u16(), 409, "A still holds its seat: {v}");
    // A's socket is still in the call.
    assert!(until_pong(&mut a)
        .await
        .iter()
        .all(|m| m["type"] != "error"));
    let (status, v) = node
        .http("GET", &format!("/v1/calls/{call}"), Some(&key), None)
        .await;
    assert_eq!(status.as_u16(), 200, "{v}");
    let ps = v["participants"].as_array().unwrap();
    assert_eq!(ps[0]["peer_id"], ida.as_str());
    assert_eq!(
        (&ps[0]["connected"], &ps[0]["left_at"]),
        (&json!(true), &json!(null))
    );
    assert_eq!(ps[1]["peer_id"], jb["peer_id"]);
    assert_eq!(ps[1]["connected"], false);
    assert!(ps[1]["left_at"].is_string(), "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn foreign_origins_are_refused_before_the_upgrade() {
    let node = Node::start(Options::default()).await;
    let mut req = tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(
        node.ws_url(),
    )
    .unwrap();
    req.headers_mut()
        .insert("origin", "https://evil.example".parse().unwrap());
    let err = tokio_tungstenite::connect_async(req).await.unwrap_err();
    match err {
        tokio_tungstenite::tungstenite::Error::Http(resp) => assert_eq!(resp.status(), 403),
        other => panic!("{other:?}"),
    }
    // The control plane's own origin is fine.
    let mut req = tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(
        node.ws_url(),
    )
    .unwrap();
    req.headers_mut()
        .insert("origin", format!("http://{}", node.addr).parse().unwrap());
    assert!(tokio_tungstenite::connect_async(req).await.is_ok());
}

// ------------------------------------------------------------------------------------------
// Abuse: size, malformed input, rate, slow readers, sockets that never authenticate.
// ------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_one_megabyte_frame_is_closed_with_1009() {
    let node = Node::start(Options::default()).await;
    let (_, _, code) = node.call(8).await;
    let (mut a, _, _) = enter(&node, &code, "A").await;
    let big = format!(r#"{{"v":1,"type":"ping","x":"{}"}}"#, "a".repeat(1 << 20));
    let _ = a.ws.send(Message::Text(big.into())).await;
    let (end, _) = a.until_end().await;
    assert_eq!(end, End::Closed(1009, "too_large".into()));
    // The server serves others.
    let (mut b, _, _) = enter(&node, &code, "B").await;
    b.send(json!({"v":1,"type":"ping"})).await;
    b.recv_type("pong").await;
    // Counted once the server side of the socket is done (just after the client saw the close).
    eventually("too_large counted", || {
        node.metric(
            "turnpike_signal_disconnects_total",
            &[("reason", "too_large")],
        ) == 1.0
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_and_unknown_messages_get_errors_and_the_socket_stays() {
    let node = Node::start(Options::default()).await;
    let (_, _, code) = node.call(8).await;
    let (mut a, _, _) = enter(&node, &code, "A").await;
    let cases = [
        ("{not json", "invalid_message"),
        (r#"{"v":1,"type":"teleport"}"#, "unknown_type"),
        (r#"{"v":9,"type":"ping"}"#, "unsupported_version"),
        (
            r#"{"v":1,"type":"offer","to":["x"],"sdp":1}"#,
            "invalid_message",
        ),
    ];
    for (text, code) in cases {
        a.send_raw(text).await;
        assert_eq!(a.recv_type("error").await["code"], code, "{text}");
    }
    let deep = format!(
        r#"{{"v":1,"type":"media","x":{}{}}}"#,
        "[".repeat(5000),
        "]".repeat(5000)
    );
    a.send_raw(&deep).await;
    assert_eq!(a.recv_type("error").await["code"], "invalid_message");
    a.send(json!({"v":1,"type":"ping"})).await;
    a.recv_type("pong").await;
    assert!(node.metric("turnpike_signal_messages_total", &[("type", "unknown")]) >= 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_messages_a_second_are_limited_and_others_unaffected() {
    let node = Node::start(Options::default()).await;
    let (_, _, code) = node.call(8).await;
    let (mut flood, _, _) = enter(&node, &code, "F").await;
    let (mut calm, _, _) = enter(&node, &code, "C").await;
    for _ in 0..1000 {
        if flood
            .ws
            .send(Message::Text(r#"{"v":1,"type":"ping"}"#.into()))
            .await
            .is_err()
        {
            break;
        }
    }
    let (end, seen) = flood.until_end().await;
    assert_eq!(end, End::Closed(1008, "rate_limited".into()));
    assert!(seen.iter().any(|m| m["code"] == "rate_limited"));
    let pongs = seen.iter().filter(|m| m["type"] == "pong").count();
    assert!(
        (50..=200).contains(&pongs),
        "{pongs} pongs: the burst, not all 1000"
    );
    calm.send(json!({"v":1,"type":"ping"})).await;
    calm.recv_type("pong").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_that_never_reads_is_dropped_not_buffered() {
    let node = Node::start(Options {
        signal: Settings {
            send_queue: 64,
            message_rate: 10_000,
            message_burst: 10_000,
            // So the others hear of the drop at once rather than after the window.
            resume_window: Duration::ZERO,
            ..Settings::default()
        },
        ..Options::default()
    })
    .await;
    let (_, _, code) = node.call(8).await;
    let (sleeper, ws, _) = enter(&node, &code, "Sleeper").await;
    let (talker, _, _) = enter(&node, &code, "Talker").await;
    let to = s(&ws["peer_id"]).to_owned();
    // The talker reads everything it gets (it is the healthy one), on its own task.
    let (mut sink, mut stream) = talker.ws.split();
    let (seen_tx, mut seen) = tokio::sync::mpsc::unbounded_channel::<serde_json::Value>();
    tokio::spawn(async move {
        while let Some(Ok(m)) = stream.next().await {
            match m {
                Message::Text(t) => {
                    let _ = seen_tx.send(serde_json::from_str(&t).unwrap());
                }
                Message::Close(f) => panic!("the talker was closed: {f:?}"),
                _ => {}
            }
        }
    });
    // Large offers until the sleeper's TCP window and send queue are full and it is dropped.
    let sdp = "a".repeat(60_000);
    let offer = json!({"v":1,"type":"offer","to":to,"sdp":sdp}).to_string();
    let mut sent = 0;
    let left = 'outer: loop {
        sink.send(Message::Text(offer.clone().into()))
            .await
            .unwrap();
        sent += 1;
        assert!(sent < 5_000, "never dropped the slow reader");
        while let Ok(m) = seen.try_recv() {
            if m["type"] == "peer_left" {
                break 'outer m;
            }
        }
        if sent % 50 == 0 {
            tokio::task::yield_now().await;
        }
    };
    assert_eq!(left["peer_id"], to.as_str());
    assert_eq!(left["reason"], "disconnected");
    eventually("slow_reader counted", || {
        node.metric(
            "turnpike_signal_disconnects_total",
            &[("reason", "slow_reader")],
        ) == 1.0
    })
    .await;
    // The talker was never at risk.
    sink.send(Message::Text(r#"{"v":1,"type":"ping"}"#.into()))
        .await
        .unwrap();
    loop {
        let m = tokio::time::timeout(harness::PATIENCE, seen.recv())
            .await
            .unwrap()
            .unwrap();
        if m["type"] == "pong" {
            break;
        }
    }
    drop(sleeper);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_that_keeps_sending_but_never_reads_is_dropped_at_the_write_timeout() {
    // A send queue far larger than what this test ever queues: the queue never fills, so only
    // the write timeout can drop the sleeper (the other path has its own test above).
    let node = Node::start(Options {
        signal: Settings {
            send_queue: 100_000,
            message_rate: 10_000,
            message_burst: 10_000,
            // So the others hear of the drop at once rather than after the window.
            resume_window: Duration::ZERO,
            write_timeout: Duration::from_secs(1),
            ..Settings::default()
        },
        ..Options::default()
    })
    .await;
    let (_, _, code) = node.call(8).await;
    let (sleeper, ws, _) = enter(&node, &code, "Sleeper").await;
    let (talker, _, _) = enter(&node, &code, "Talker").await;
    let to = s(&ws["peer_id"]).to_owned();
    // The sleeper keeps sending (so it is never idle and its reads never fail) but never reads.
    let (mut sleeper_sink, sleeper_stream) = sleeper.ws.split();
    let pinger = tokio::spawn(async move {
        let mut sent = 0u64;
        let mut every = tokio::time::interval(Duration::from_millis(20));
        loop {
            every.tick().await;
            let ping = Message::Text(r#"{"v":1,"type":"ping"}"#.into());
            if sleeper_sink.send(ping).await.is_err() {
                return sent;
            }
            sent += 1;
        }
    });
    let (mut sink, mut stream) = talker.ws.split();
    let (seen_tx, mut seen) = tokio::sync::mpsc::unbounded_channel::<serde_json::Value>();
    tokio::spawn(async move {
        while let Some(Ok(m)) = stream.next().await {
            if let Message::Text(t) = m {
                let _ = seen_tx.send(serde_json::from_str(&t).unwrap());
            }
        }
    });
    // Large offers in batches until the sleeper's TCP buffers are full, one frame waits longer
    // than the write timeout, and the sleeper is dropped. Each batch is followed by a wait for
    // `peer_left` a little longer than the write timeout.
    let sdp = "a".repeat(60_000);
    let offer = json!({"v":1,"type":"offer","to":to,"sdp":sdp}).to_string();
    let mut sent = 0;
    let left = 'outer: loop {
        assert!(sent < 2_000, "the sleeper was never dropped");
        for _ in 0..50 {
            sink.send(Message::Text(offer.clone().into()))
                .await
                .unwrap();
            sent += 1;
        }
        let until = tokio::time::Instant::now() + Duration::from_secs(2);
        while let Ok(Some(m)) = tokio::time::timeout_at(until, seen.recv()).await {
            if m["type"] == "peer_left" {
                break 'outer m;
            }
        }
    };
    assert_eq!(left["peer_id"], to.as_str());
    assert_eq!(left["reason"], "disconnected");
    eventually("slow_reader counted", || {
        node.metric(
            "turnpike_signal_disconnects_total",
            &[("reason", "slow_reader")],
        ) == 1.0
    })
    .await;
    // The sleeper's sends stop working once the server dropped it.
    let pings = tokio::time::timeout(harness::PATIENCE, pinger)
        .await
        .expect("the sleeper's socket was never closed")
        .unwrap();
    assert!(pings > 0);
    drop(sleeper_stream);
    // The talker is still served.
    sink.send(Message::Text(r#"{"v":1,"type":"ping"}"#.into()))
        .await
        .unwrap();
    loop {
        let m = tokio::time::timeout(harness::PATIENCE, seen.recv())
            .await
            .unwrap()
            .unwrap();
        if m["type"] == "pong" {
            break;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sockets_that_never_authenticate_are_capped_per_address_and_closed_at_the_deadline() {
    let node = Node::start(Options {
        signal: Settings {
            auth_timeout: Duration::from_secs(1),
            max_unauthenticated_per_ip: 64,
            ..Settings::default()
        },
        ..Options::default()
    })
    .await;
    let (_, _, code) = node.call(8).await;
    // 10 000 upgrade attempts from 127.0.0.1, in waves: at most 64 are open unauthenticated at
    // any time (the ones accepted early are closed at their deadline meanwhile, freeing slots).
    let mut accepted = Vec::new();
    let mut refused = 0;
    let started = tokio::time::Instant::now();
    for _ in 0..100 {
        let open = node.metric("turnpike_signal_connections_unauthenticated", &[]);
        assert!(open <= 64.0, "{open} unauthenticated sockets open");
        let mut wave = Vec::new();
        for _ in 0..100 {
            let url = node.ws_url();
            wave.push(tokio::spawn(async move {
                tokio_tungstenite::connect_async(url).await
            }));
        }
        for h in wave {
            match h.await.unwrap() {
                Ok((ws, _)) => accepted.push(ws),
                Err(tokio_tungstenite::tungstenite::Error::Http(r)) => {
                    assert_eq!(r.status(), 429);
                    refused += 1;
                }
                Err(e) => panic!("{e}"),
            }
        }
    }
    // Each slot holds a socket for at least the 1 s deadline, so in `elapsed` at most 64 per
    // started second (plus the 64 of the first) got in, however slow the machine.
    let elapsed = started.elapsed();
    let bound = 64 * (elapsed.as_secs() as usize + 2);
    assert!(accepted.len() >= 64, "{}", accepted.len());
    assert_eq!(accepted.len() + refused, 10_000);
    assert!(
        accepted.len() <= bound,
        "{} accepted in {elapsed:?}, at most {bound} expected",
        accepted.len()
    );
    // Another address is served meanwhile (127.0.0.2 is loopback too).
    let j = node.join(&code, "legit").await;
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.bind("127.0.0.2:0".parse().unwrap()).unwrap();
    let stream = sock.connect(node.addr).await.unwrap();
    let (mut legit, _) = tokio_tungstenite::client_async(node.ws_url(), stream)
        .await
        .unwrap();
    legit
        .send(Message::Text(
            json!({"v":1,"type":"auth","token":j["signal_token"]})
                .to_string()
                .into(),
        ))
        .await
        .unwrap();
    let w = legit.next().await.unwrap().unwrap();
    assert!(w.to_text().unwrap().contains("welcome"));
    // Every idle one is closed at the auth deadline with 4008.
    for mut ws in accepted {
        let mut code = None;
        while let Some(Ok(m)) = ws.next().await {
            if let Message::Close(Some(f)) = m {
                code = Some(u16::from(f.code));
            }
        }
        assert_eq!(code, Some(4008));
    }
    eventually("unauthenticated gauge back to 0", || {
        node.metric("turnpike_signal_connections_unauthenticated", &[]) == 0.0
    })
    .await;
}

/// A WebSocket handshake from loopback address `127.0.0.{last}` (all of 127/8 is loopback on
/// Linux): how a test looks like many clients.
async fn connect_from(
    node: &Node,
    last: u8,
) -> Result<
    tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>,
    tokio_tungstenite::tungstenite::Error,
> {
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.bind(std::net::SocketAddr::from(([127, 0, 0, last], 0)))
        .unwrap();
    let stream = sock.connect(node.addr).await.unwrap();
    tokio_tungstenite::client_async(node.ws_url(), stream)
        .await
        .map(|(ws, _)| ws)
}

/// Expects the node cap's refusal: 503 with the control plane's error shape.
fn assert_node_full(
    r: Result<
        tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>,
        tokio_tungstenite::tungstenite::Error,
    >,
    what: &str,
) {
    match r {
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
            assert_eq!(resp.status(), 503, "{what}");
            let body: serde_json::Value =
                serde_json::from_slice(resp.body().as_deref().unwrap_or_default()).unwrap();
            assert_eq!(body["error"]["code"], "unavailable", "{what}: {body}");
        }
        Err(e) => panic!("{what}: {e}"),
        Ok(_) => panic!("{what}: accepted past the node's cap"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sockets_that_never_authenticate_from_many_addresses_hit_the_node_cap() {
    const CAP: usize = 40;
    let node = Node::start(Options {
        signal: Settings {
            max_connections: CAP,
            // Far above what any one address opens here: only the node's cap can refuse.
            max_unauthenticated_per_ip: 64,
            // Long enough to open them all and try past the cap before the first one closes.
            auth_timeout: Duration::from_secs(5),
            ..Settings::default()
        },
        ..Options::default()
    })
    .await;
    let (_, _, code) = node.call(8).await;
    // One authenticated peer first (from 127.0.0.1): it holds one of the 40.
    let (mut a, _, _) = enter(&node, &code, "A").await;
    // 39 sockets that never authenticate, 3 from each of 13 addresses (127.0.0.2–14).
    let mut idle = Vec::new();
    for i in 0..CAP - 1 {
        let last = 2 + u8::try_from(i / 3).unwrap();
        idle.push(connect_from(&node, last).await.unwrap());
    }
    assert_eq!(
        node.metric("turnpike_signal_connections_unauthenticated", &[]),
        (CAP - 1) as f64
    );
    // The node is full: every further socket is refused, from any address (127.0.0.20–29),
    // whether or not it would have authenticated.
    for last in 20..30 {
        assert_node_full(connect_from(&node, last).await, &format!("127.0.0.{last}"));
    }
    let j = node.join(&code, "B").await;
    assert_node_full(connect_from(&node, 30).await, "B before the deadline");
    // The authenticated peer is still served.
    a.send(json!({"v":1,"type":"ping"})).await;
    assert_eq!(a.recv().await["type"], "pong");
    // At the auth deadline every idle socket is closed with 4008, which frees their slots.
    for mut ws in idle {
        let mut close = None;
        while let Ok(Some(Ok(m))) = tokio::time::timeout(harness::PATIENCE, ws.next()).await {
            if let Message::Close(Some(f)) = m {
                close = Some(u16::from(f.code));
            }
        }
        assert_eq!(close, Some(4008));
    }
    // The slots are released once the server side is done with each socket (just after the
    // client saw the close): B gets in from another address as soon as one is free.
    eventually("auth_timeout counted for all", || {
        node.metric(
            "turnpike_signal_disconnects_total",
            &[("reason", "auth_timeout")],
        ) == (CAP - 1) as f64
    })
    .await;
    let mut b = connect_from(&node, 30).await.unwrap();
    b.send(Message::Text(
        json!({"v":1,"type":"auth","token":j["signal_token"]})
            .to_string()
            .into(),
    ))
    .await
    .unwrap();
    let w = tokio::time::timeout(harness::PATIENCE, b.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let w: serde_json::Value = serde_json::from_str(w.to_text().unwrap()).unwrap();
    assert_eq!(w["type"], "welcome", "{w}");
    assert_eq!(
        a.recv_type("peer_joined").await["peer"]["peer_id"],
        w["peer_id"]
    );
    // And the cap holds again: 38 more fit (A and B hold two), the next does not.
    let mut more = Vec::new();
    for i in 0..CAP - 2 {
        more.push(
            connect_from(&node, 40 + u8::try_from(i % 10).unwrap())
                .await
                .unwrap(),
        );
    }
    assert_node_full(connect_from(&node, 60).await, "full again");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_socket_is_closed_at_the_idle_timeout() {
    let node = Node::start(Options {
        signal: Settings {
            ping_interval: Duration::from_millis(200),
            idle_timeout: Duration::from_millis(600),
            ..Settings::default()
        },
        ..Options::default()
    })
    .await;
    let (_, _, code) = node.call(8).await;
    let (mut a, w, _) = enter(&node, &code, "A").await;
    assert_eq!(w["ping_interval_ms"], 200);
    let (end, _) = a.until_end().await;
    assert_eq!(end, End::Closed(4008, "idle_timeout".into()));
    harness::eventually("idle_timeout counted", || {
        node.metric(
            "turnpike_signal_disconnects_total",
            &[("reason", "idle_timeout")],
        ) == 1.0
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compression_is_never_negotiated() {
    let node = Node::start(Options::default()).await;
    let mut req = tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(
        node.ws_url(),
    )
    .unwrap();
    req.headers_mut().insert(
        "sec-websocket-extensions",
        "permessage-deflate; client_max_window_bits"
            .parse()
            .unwrap(),
    );
    let (_, resp) = tokio_tungstenite::connect_async(req).await.unwrap();
    assert!(
        resp.headers().get("sec-websocket-extensions").is_none(),
        "{:?}",
        resp.headers()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_huge_handshake_header_is_refused() {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let node = Node::start(Options::default()).await;
    let mut s = tokio::net::TcpStream::connect(node.addr).await.unwrap();
    let head =
        "GET /v1/signal HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nX-Big: ";
    s.write_all(head.as_bytes()).await.unwrap();
    // 20 MB of header: the server stops reading long before (hyper's head limit).
    let chunk = vec![b'a'; 64 * 1024];
    let mut refused = false;
    for _ in 0..320 {
        if s.write_all(&chunk).await.is_err() {
            refused = true;
            break;
        }
    }
    if !refused {
        let mut buf = vec![0; 1024];
        let n = tokio::time::timeout(harness::PATIENCE, s.read(&mut buf))
            .await
            .unwrap()
            .unwrap_or(0);
        let text = String::from_utf8_lossy(&buf[..n]);
        assert!(n == 0 || text.starts_with("HTTP/1.1 431"), "{text}");
    }
    // Still serving.
    let (_, _, code) = node.call(8).await;
    let (mut a, _, _) = enter(&node, &code, "A").await;
    a.send(json!({"v":1,"type":"ping"})).await;
    a.recv_type("pong").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fragments_are_capped_by_the_message_size() {
    use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};
    use tokio_tungstenite::tungstenite::protocol::frame::Frame;
    let node = Node::start(Options::default()).await;
    let (_, _, code) = node.call(8).await;
    let (mut a, _, _) = enter(&node, &code, "A").await;
    // 10 000 one-byte fragments make one 10 KB message: taken, and refused as not JSON.
    a.ws.send(Message::Frame(Frame::message(
        b"x".to_vec(),
        OpCode::Data(Data::Text),
        false,
    )))
    .await
    .unwrap();
    for i in 1..10_000 {
        let last = i == 9_999;
        a.ws.feed(Message::Frame(Frame::message(
            b"x".to_vec(),
            OpCode::Data(Data::Continue),
            last,
        )))
        .await
        .unwrap();
    }
    a.ws.flush().await.unwrap();
    assert_eq!(a.recv_type("error").await["code"], "invalid_message");
    // Fragments past the 64 KiB message limit close the socket with 1009.
    a.ws.send(Message::Frame(Frame::message(
        b"x".to_vec(),
        OpCode::Data(Data::Text),
        false,
    )))
    .await
    .unwrap();
    for _ in 0..70_000 {
        let frame = Frame::message(b"x".to_vec(), OpCode::Data(Data::Continue), false);
        if a.ws.feed(Message::Frame(frame)).await.is_err() {
            break;
        }
    }
    let _ = a.ws.flush().await;
    let (end, _) = a.until_end().await;
    assert_eq!(end, End::Closed(1009, "too_large".into()));
}

/// A room's broadcasts reach a new peer only after its `welcome`: the welcome is queued by the
/// room as it admits the peer, so a `media` another peer sends at that moment cannot overtake
/// it (a client that sees `media` before it knows who it is drops it, and shows stale state).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn welcome_comes_first_even_while_others_broadcast() {
    let node = Node::start(Options {
        signal: Settings {
            message_rate: 10_000,
            message_burst: 10_000,
            ..Settings::default()
        },
        ..Options::default()
    })
    .await;
    let (_, _, code) = node.call(32).await;
    let (talker, _, _) = enter(&node, &code, "Talker").await;
    // The talker toggles its microphone as fast as it can, on its own task, reading nothing.
    let (mut sink, _stream) = talker.ws.split();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flooding = {
        let stop = Arc::clone(&stop);
        tokio::spawn(async move {
            let mut on = false;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                on = !on;
                let m = json!({"v":1,"type":"media","audio":on,"video":false,"screen":false});
                if sink
                    .send(Message::Text(m.to_string().into()))
                    .await
                    .is_err()
                {
                    break;
                }
                tokio::task::yield_now().await;
            }
        })
    };
    // Each newcomer's first message must be its welcome (`Client::joined` checks).
    let mut newcomers = Vec::new();
    for i in 0..20 {
        let (c, w, _) = enter(&node, &code, &format!("N{i}")).await;
        assert_eq!(w["type"], "welcome");
        newcomers.push(c);
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    flooding.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_dropped_without_a_close_frame_counts_as_closed_and_garbage_as_a_protocol_error(
) {
    let node = Node::start(Options::default()).await;
    let (_, _, code) = node.call(8).await;
    let reason =
        |r: &'static str| node.metric("turnpike_signal_disconnects_total", &[("reason", r)]);
    // A network drop (the TCP connection ends without a close frame) is as normal as a close:
    // dashboards treat `protocol_error` as a fault.
    let (a, _, _) = enter(&node, &code, "A").await;
    drop(a);
    eventually("the drop counted", || reason("closed") == 1.0).await;
    assert_eq!(reason("protocol_error"), 0.0);
    // A frame with reserved bits set breaks the protocol.
    let (mut b, _, _) = enter(&node, &code, "B").await;
    let tokio_tungstenite::MaybeTlsStream::Plain(tcp) = b.ws.get_mut() else {
        panic!("a plain TCP connection")
    };
    tokio::io::AsyncWriteExt::write_all(tcp, &[0xF1, 0x80, 0, 0, 0, 0])
        .await
        .unwrap();
    eventually("the broken frame counted", || {
        reason("protocol_error") == 1.0
    })
    .await;
    assert_eq!(reason("closed"), 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_outage_during_auth_is_answered_try_again_and_counted_as_unavailable() {
    let mut redis = redis_server::RedisServer::start();
    let metrics = control::store::StoreMetrics::new(&prometheus::Registry::new()).unwrap();
    let store = control::store::RedisStore::connect(&redis.url, metrics)
        .await
        .unwrap();
    let node = Node::start(Options {
        store: Arc::new(store),
        ..Options::default()
    })
    .await;
    let (_, _, code) = node.call(8).await;
    let j = node.join(&code, "A").await;
    redis.kill();
    let mut c = Client::connect(&node.ws_url()).await;
    c.send(json!({"v":1,"type":"auth","token":j["signal_token"]}))
        .await;
    let (end, seen) = c.until_end().await;
    assert_eq!(end, End::Closed(1013, "unavailable".into()));
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert_eq!(seen[0]["code"], "unavailable", "{seen:?}");
    let reason =
        |r: &'static str| node.metric("turnpike_signal_disconnects_total", &[("reason", r)]);
    eventually("counted", || reason("unavailable") == 1.0).await;
    assert_eq!(reason("closed"), 0.0);
}

/// A call with A connected and B's first connection held inside its `auth`, just before the
/// store marks B connected (B's token check is done).
struct HeldAuth {
    store: std::sync::Arc<harness::gate::GateStore>,
    node: Node,
    key: String,
    call: String,
    a: Client,
    b: Client,
    idb: String,
}

async fn held_auth() -> HeldAuth {
    let store = harness::gate::GateStore::new();
    let node = Node::start(Options {
        store: store.clone(),
        ..Options::default()
    })
    .await;
    let (key, call, code) = node.call(8).await;
    let (a, _, _) = enter(&node, &code, "A").await;
    let jb = node.join(&code, "B").await;
    let idb = s(&jb["peer_id"]).to_owned();
    store.arm();
    let mut b = Client::connect(&node.ws_url()).await;
    b.send(json!({"v":1,"type":"auth","token":jb["signal_token"]}))
        .await;
    store.reached().await;
    HeldAuth {
        store,
        node,
        key,
        call,
        a,
        b,
        idb,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_participant_kicked_while_its_first_connection_authenticates_is_refused() {
    let HeldAuth {
        store,
        node,
        key,
        call,
        mut a,
        mut b,
        idb,
    } = held_auth().await;
    // The host kicks B now.
    let path = format!("/v1/calls/{call}/participants/{idb}");
    let (status, _) = node.http("DELETE", &path, Some(&key), None).await;
    assert_eq!(status, 204);
    store.release();
    let (end, seen) = b.until_end().await;
    assert_eq!(end, End::Closed(4001, "unauthorized".into()), "{seen:?}");
    // A never saw B: its next message is the answer to its ping.
    a.send(json!({"v":1,"type":"ping"})).await;
    assert_eq!(a.recv().await["type"], "pong");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_authenticating_while_the_call_ends_is_told_it_ended_not_left_alone_in_it() {
    let HeldAuth {
        store,
        node,
        key,
        call,
        mut a,
        mut b,
        ..
    } = held_auth().await;
    // The host ends the call now (A's room closes).
    let (status, _) = node
        .http("POST", &format!("/v1/calls/{call}/end"), Some(&key), None)
        .await;
    assert_eq!(status, 200);
    let (end, _) = a.until_end().await;
    assert_eq!(end, End::Closed(4000, "call_ended".into()));
    store.release();
    let (end, seen) = b.until_end().await;
    assert_eq!(end, End::Closed(4000, "call_ended".into()), "{seen:?}");
    assert!(seen.iter().all(|m| m["type"] != "welcome"), "{seen:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_in_the_welcome_never_outlive_the_call() {
    // Credentials last an hour by default; the call ends in two minutes.
    let node = Node::start(Options::default()).await;
    let key = node.app_key().await;
    let (s, call) = node
        .http(
            "POST",
            "/v1/calls",
            Some(&key),
            Some(json!({"max_participants": 4, "ttl": 120})),
        )
        .await;
    assert_eq!(s, axum::http::StatusCode::CREATED, "{call}");
    // The call's end (its creation + 120 s, by the same wall clock) is no later than this.
    let call_ends_s = unix_ms() / 1000 + 120;
    let j = node.join(call["join_code"].as_str().unwrap(), "A").await;

    let mut a = Client::connect(&node.ws_url()).await;
    a.send(json!({"v":1,"type":"auth","token":j["signal_token"]}))
        .await;
    let w = a.recv_type("welcome").await;
    let expires_s = w["ice_servers_expire_at"].as_u64().unwrap();
    assert!(
        expires_s <= call_ends_s,
        "welcome's credentials expire at {expires_s}, after the call's end at {call_ends_s}"
    );
    // The TURN username carries the same expiry (`EXPIRY:user`), which is what the relay checks.
    let user = turn_username(&w);
    let user_expiry: u64 = user
        .as_str()
        .unwrap()
        .split(':')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(user_expiry, expires_s);
}
