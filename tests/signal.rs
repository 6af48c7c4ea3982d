//! Signaling through the binary: `turnpike serve` serves `/v1/signal` on the control listener;
//! two WebSocket clients joined by code hold an offer/answer/candidate exchange and their stats
//! show in `/metrics` on the admin port. With Redis, two `turnpike serve` processes carry one
//! call between their peers; killing one reports its peers left; restarting Redis recovers.
#![allow(clippy::unwrap_used, clippy::print_stdout)]

mod common;
#[path = "../control/tests/common/redis.rs"]
mod redis;

use std::path::PathBuf;
use std::time::Duration;

use common::node::Node;
use common::serve::{http, raw_http, Serve, ADMIN, SECRET, WAIT};
use common::ws::{connect, recv_type, send, Ws};
use futures_util::StreamExt as _;
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

/// The JWT issuer every node shares (several nodes behind one name).
const PUBLIC_URL: &str = "http://turnpike.test";

fn config(name: &str, store: &str, node_timeout: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("turnpike-signal-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("turnpike.toml");
    std::fs::write(
        &path,
        format!(
            r#"
[relay]
realm = "example.org"
listen = ["udp://127.0.0.1:0"]
relay-ip = "127.0.0.1"
secrets = ["{SECRET}"]
threads = 1

[control]
listen = "127.0.0.1:0"
public-url = "{PUBLIC_URL}"
admin-token = "{ADMIN}"
hash-key = "signal-e2e-hash-key-0123456789"
jwt-keys = [{{ kid = "k1", secret = "signal-e2e-jwt-secret-0123456789abcdef" }}]

[signal]
listen = "127.0.0.1:0"
node-timeout = "{node_timeout}"
resume-window = "0s"

{store}

[admin]
listen = "127.0.0.1:0"
"#
        ),
    )
    .unwrap();
    path
}

/// An app, a call and two joins through `serve`'s API: (key, call id, two join answers).
fn call_with_two(serve: &Serve) -> (String, String, Value, Value) {
    let (s, app) = serve.api("POST", "/v1/apps", Some(ADMIN), Some(json!({"name":"e2e"})));
    assert_eq!(s, 201, "{app}");
    let key = app["key"].as_str().unwrap().to_owned();
    let (s, call) = serve.api("POST", "/v1/calls", Some(&key), Some(json!({})));
    assert_eq!(s, 201, "{call}");
    let code = call["join_code"].as_str().unwrap();
    let join = |name: &str| {
        let (s, j) = serve.api(
            "POST",
            "/v1/join",
            None,
            Some(json!({"code":code,"name":name})),
        );
        assert_eq!(s, 200, "{j}");
        j
    };
    let (a, b) = (join("Ada"), join("Bob"));
    assert_eq!(a["signal_url"], format!("ws://turnpike.test/v1/signal"));
    (key, call["id"].as_str().unwrap().to_owned(), a, b)
}

/// A offers, B answers, both trade a candidate.
async fn exchange(a: &mut Ws, ida: &str, b: &mut Ws, idb: &str) {
    send(a, json!({"v":1,"type":"offer","to":idb,"sdp":"v=0 offer"})).await;
    let offer = recv_type(b, "offer").await;
    assert_eq!(offer["from"], ida);
    send(
        b,
        json!({"v":1,"type":"answer","to":ida,"sdp":"v=0 answer"}),
    )
    .await;
    assert_eq!(recv_type(a, "answer").await["from"], idb);
    let cand = json!({"candidate":"candidate:1 1 udp 1 192.0.2.1 9 typ relay","sdpMid":"0"});
    send(
        a,
        json!({"v":1,"type":"candidate","to":idb,"candidate":cand}),
    )
    .await;
    assert_eq!(recv_type(b, "candidate").await["candidate"], cand);
    send(
        b,
        json!({"v":1,"type":"candidate","to":ida,"candidate":cand}),
    )
    .await;
    assert_eq!(recv_type(a, "candidate").await["from"], idb);
}

/// The join code of a call is only shown at creation; a participant token works as well.
fn call_code(serve: &Serve, key: &str, call: &str) -> String {
    let path = format!("/v1/calls/{call}/tokens");
    let (st, t) = serve.api("POST", &path, Some(key), Some(json!({"role":"guest"})));
    assert_eq!(st, 201, "{t}");
    t["token"].as_str().unwrap().to_owned()
}

/// Waits for the close frame of `ws`: its code (0 when the socket ended without one).
async fn close_code(ws: &mut Ws) -> u16 {
    tokio::time::timeout(WAIT, async {
        loop {
            match ws.next().await {
                Some(Ok(Message::Close(Some(f)))) => return u16::from(f.code),
                Some(Ok(_)) => continue,
                _ => return 0,
            }
        }
    })
    .await
    .expect("the socket is closed in time")
}

fn s(v: &Value) -> &str {
    v.as_str().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_carries_a_call_and_its_stats_reach_metrics() {
    let serve = Serve::with_config(&config("one", "", "15s"));
    let (_, _, ja, jb) = call_with_two(&serve);
    let (mut a, wa) = connect(serve.control, s(&ja["signal_token"])).await;
    let (mut b, wb) = connect(serve.control, s(&jb["signal_token"])).await;
    let (ida, idb) = (s(&wa["peer_id"]).to_owned(), s(&wb["peer_id"]).to_owned());
    assert_eq!(
        recv_type(&mut a, "peer_joined").await["peer"]["peer_id"],
        idb.as_str()
    );
    exchange(&mut a, &ida, &mut b, &idb).await;
    send(
        &mut a,
        json!({"v":1,"type":"stats","rtt_ms":35,"jitter_ms":2,"packet_loss":0.0,
        "candidate_type":"relay","relay_protocol":"udp"}),
    )
    .await;
    send(&mut a, json!({"v":1,"type":"ping"})).await;
    recv_type(&mut a, "pong").await;
    serve.wait_metric("turnpike_signal_connections_active", 2.0);
    serve.wait_metric("turnpike_call_rtt_seconds_count", 1.0);
    serve.wait_metric("turnpike_call_mos_count", 1.0);
    serve.wait_metric(
        "turnpike_call_connections_total{candidate_type=\"relay\",relay_protocol=\"udp\"}",
        1.0,
    );
    let (_, body) = raw_http(serve.admin, "GET", "/metrics", None, None);
    assert!(!body.contains(&ida), "no peer id in metrics");
    // Signaling's route answers another method with the API's JSON 405.
    let (st, v) = http(serve.control, "POST", "/v1/signal", None, None);
    assert_eq!(
        (st, &v["error"]["code"]),
        (405, &json!("method_not_allowed"))
    );
}

/// Sends `msg` from `from` every half second until `to` receives a message of its type (a
/// node that lost Redis relays nothing until it has subscribed again); returns what arrived.
async fn until_heard(from: &mut Ws, to: &mut Ws, msg: Value) -> Value {
    let kind = msg["type"].as_str().unwrap().to_owned();
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        send(from, msg.clone()).await;
        let got = tokio::time::timeout(Duration::from_millis(500), recv_type(to, &kind)).await;
        if let Ok(got) = got {
            return got;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no {kind} got through after a Redis restart"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_on_redis_carry_one_call_and_a_dead_node_reports_its_peers_left() {
    let mut redis = redis::RedisServer::start();
    let store = format!("[store]\nredis-url = \"{}\"", redis.url);
    let node_a = Serve::with_config(&config("a", &store, "3s"));
    // Node B runs signaling alone (`turnpike signal`), like a deployment with separate tiers.
    let node_b = Node::start("signal", &config("b", &store, "3s"));
    let b_addr = node_b.addr("signal");
    let (key, call, ja, jb) = call_with_two(&node_a);
    // Ada on node A, Bob on node B.
    let (mut a, wa) = connect(node_a.control, s(&ja["signal_token"])).await;
    let (mut b, wb) = connect(b_addr, s(&jb["signal_token"])).await;
    let (ida, idb) = (s(&wa["peer_id"]).to_owned(), s(&wb["peer_id"]).to_owned());
    assert_eq!(
        wb["peers"][0]["peer_id"],
        ida.as_str(),
        "B sees A through presence"
    );
    assert_eq!(
        recv_type(&mut a, "peer_joined").await["peer"]["peer_id"],
        idb.as_str()
    );
    exchange(&mut a, &ida, &mut b, &idb).await;
    send(
        &mut b,
        json!({"v":1,"type":"media","audio":true,"video":true,"screen":false}),
    )
    .await;
    assert_eq!(recv_type(&mut a, "media").await["from"], idb.as_str());

    // A kick through node A's API closes Carol's socket on node B.
    let code = call_code(&node_a, &key, &call);
    let (st, jc) = node_a.api(
        "POST",
        "/v1/join",
        None,
        Some(json!({"token":code,"name":"Carol"})),
    );
    assert_eq!(st, 200, "{jc}");
    let (mut c, wc) = connect(b_addr, s(&jc["signal_token"])).await;
    let idc = s(&wc["peer_id"]).to_owned();
    assert_eq!(
        recv_type(&mut a, "peer_joined").await["peer"]["peer_id"],
        idc.as_str()
    );
    let path = format!("/v1/calls/{call}/participants/{idc}");
    let (st, _) = raw_http(node_a.control, "DELETE", &path, Some(&key), None);
    assert_eq!(st, 204);
    assert_eq!(close_code(&mut c).await, 4003, "kicked on the other node");
    let left = recv_type(&mut a, "peer_left").await;
    assert_eq!(
        (left["peer_id"].clone(), left["reason"].clone()),
        (json!(idc), json!("kicked"))
    );

    // Redis restarts empty: both nodes resubscribe and re-announce by themselves, each on its
    // own reconnect schedule, so each direction is retried until it gets through.
    redis.restart();
    let offer = json!({"v":1,"type":"offer","to":idb,"sdp":"after restart"});
    let offer = until_heard(&mut a, &mut b, offer).await;
    assert_eq!(offer["sdp"], "after restart");
    let answer = json!({"v":1,"type":"answer","to":ida,"sdp":"still here"});
    let answer = until_heard(&mut b, &mut a, answer).await;
    assert_eq!(answer["sdp"], "still here");

    // Node B dies: A hears Bob left once B's heartbeat lapses.
    drop(node_b);
    let left = recv_type(&mut a, "peer_left").await;
    assert_eq!(left["peer_id"], idb.as_str());
    assert_eq!(left["reason"], "node_lost");
    // Ada is still served (the restarted Redis lost the call's record, which only matters to
    // new joins: live peers keep signaling).
    send(&mut a, json!({"v":1,"type":"ping"})).await;
    recv_type(&mut a, "pong").await;
    let path = format!("/v1/calls/{call}");
    let (status, _) = http(node_a.control, "GET", &path, Some(&key), None);
    // An empty Redis has forgotten the app too: its key reads as unknown.
    assert_eq!(status, 401);
}

/// Three tiers on one Redis: the API alone (`turnpike control`), signaling alone (`turnpike
/// signal`) and a relay alone (`turnpike relay`). A kick and an end issued on the API node reach
/// the sockets on the signaling node and the relay on the third node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_control_only_node_kicks_and_ends_through_redis_and_every_relay_revokes() {
    let redis = redis::RedisServer::start();
    let store = format!("[store]\nredis-url = \"{}\"", redis.url);
    let api = Node::start("control", &config("api", &store, "3s"));
    let sig = Node::start("signal", &config("sig", &store, "3s"));
    let relay = Node::start("relay", &config("relay", &store, "3s"));
    // A signaling-only node answers JSON errors too.
    let (st, v) = http(sig.addr("signal"), "GET", "/nowhere", None, None);
    assert_eq!((st, &v["error"]["code"]), (404, &json!("not_found")));
    let (st, v) = http(sig.addr("signal"), "POST", "/v1/signal", None, None);
    assert_eq!(
        (st, &v["error"]["code"]),
        (405, &json!("method_not_allowed"))
    );
    let control = api.addr("control");
    let request = |method: &str, path: &str, bearer: Option<&str>, body: Option<Value>| {
        http(control, method, path, bearer, body)
    };
    let (st, app) = request(
        "POST",
        "/v1/apps",
        Some(ADMIN),
        Some(json!({"name":"tiers"})),
    );
    assert_eq!(st, 201, "{app}");
    let key = s(&app["key"]).to_owned();
    let (st, call) = request("POST", "/v1/calls", Some(&key), Some(json!({})));
    assert_eq!(st, 201, "{call}");
    let (code, call_id) = (s(&call["join_code"]).to_owned(), s(&call["id"]).to_owned());
    let join = |name: &str| {
        let (st, j) = request(
            "POST",
            "/v1/join",
            None,
            Some(json!({"code":code,"name":name})),
        );
        assert_eq!(st, 200, "{j}");
        j
    };
    let (ja, jb) = (join("Ada"), join("Bob"));
    let (mut a, wa) = connect(sig.addr("signal"), s(&ja["signal_token"])).await;
    let (mut b, wb) = connect(sig.addr("signal"), s(&jb["signal_token"])).await;
    let (ida, idb) = (s(&wa["peer_id"]).to_owned(), s(&wb["peer_id"]).to_owned());
    exchange(&mut a, &ida, &mut b, &idb).await;

    let delivered = r#"turnpike_relay_revocations_total{result="delivered"}"#;
    assert_eq!(relay.metric(delivered), 0.0);
    // Kick Bob on the API node: his socket on the signaling node closes, Ada hears why, and
    // the relay node revokes his credential group.
    let path = format!("/v1/calls/{call_id}/participants/{idb}");
    let (st, _) = raw_http(control, "DELETE", &path, Some(&key), None);
    assert_eq!(st, 204);
    assert_eq!(close_code(&mut b).await, 4003, "kicked from another node");
    let left = recv_type(&mut a, "peer_left").await;
    assert_eq!(
        (s(&left["peer_id"]), s(&left["reason"])),
        (idb.as_str(), "kicked")
    );
    relay.wait_metric(delivered, 1.0).await;

    // End the call on the API node: Ada is told and closed, the relay revokes the call.
    let (st, ended) = request(
        "POST",
        &format!("/v1/calls/{call_id}/end"),
        Some(&key),
        None,
    );
    assert_eq!(st, 200, "{ended}");
    let end = recv_type(&mut a, "call_ended").await;
    assert_eq!(end["reason"], "api");
    assert_ne!(close_code(&mut a).await, 0, "closed with a close frame");
    relay.wait_metric(delivered, 2.0).await;
}

/// The peers of a node that died are recorded as left by the survivors: their seats are free
/// again and the call's participants show when they went.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_nodes_peers_are_recorded_left_in_the_call() {
    let redis = redis::RedisServer::start();
    let store = format!("[store]\nredis-url = \"{}\"", redis.url);
    let node_a = Serve::with_config(&config("lost-a", &store, "3s"));
    let node_b = Node::start("signal", &config("lost-b", &store, "3s"));
    let (key, call, ja, jb) = call_with_two(&node_a);
    let (mut a, _) = connect(node_a.control, s(&ja["signal_token"])).await;
    let (_b, wb) = connect(node_b.addr("signal"), s(&jb["signal_token"])).await;
    let idb = s(&wb["peer_id"]).to_owned();
    assert_eq!(
        recv_type(&mut a, "peer_joined").await["peer"]["peer_id"],
        idb.as_str()
    );
    let bob = |call: &Value| {
        call["participants"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["peer_id"] == idb.as_str())
            .cloned()
            .unwrap()
    };
    let path = format!("/v1/calls/{call}");
    let (st, before) = node_a.api("GET", &path, Some(&key), None);
    assert_eq!(st, 200, "{before}");
    assert!(bob(&before)["left_at"].is_null(), "{before}");

    drop(node_b);
    let left = recv_type(&mut a, "peer_left").await;
    assert_eq!(
        (s(&left["peer_id"]), s(&left["reason"])),
        (idb.as_str(), "node_lost")
    );
    // The store write follows the announcement: poll.
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let (_, after) = node_a.api("GET", &path, Some(&key), None);
        if !bob(&after)["left_at"].is_null() {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "never recorded: {after}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// SIGTERM: every signaling socket is closed with 1001 `shutdown` before the process exits, so
/// clients reconnect at once instead of waiting to notice a dead connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_closes_every_signaling_socket_with_1001_before_exiting() {
    let mut serve = Serve::with_config(&config("sigterm", "", "15s"));
    let (_, _, ja, jb) = call_with_two(&serve);
    let (mut a, _) = connect(serve.control, s(&ja["signal_token"])).await;
    let (mut b, _) = connect(serve.control, s(&jb["signal_token"])).await;
    recv_type(&mut a, "peer_joined").await;
    sigterm_closes_both_with_1001_and_exits(&mut serve, &mut a, &mut b).await;
}

/// Sends SIGTERM to `serve`, expects `a` and `b` closed with 1001, and waits for the exit.
async fn sigterm_closes_both_with_1001_and_exits(serve: &mut Serve, a: &mut Ws, b: &mut Ws) {
    let pid = serve.child.id().to_string();
    let status = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    assert!(status.success());
    assert_eq!(close_code(a).await, 1001);
    assert_eq!(close_code(b).await, 1001);
    let deadline = std::time::Instant::now() + WAIT;
    while serve.child.try_wait().unwrap().is_none() {
        assert!(std::time::Instant::now() < deadline, "did not exit");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A node that stops lets its peers' seats go once they could no longer resume (here at once:
/// `resume-window = "0s"`): a peer that never comes back (a tab closed during a restart) does not
/// hold its seat until the call expires, even when no other node had the call to record it left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_nodes_peers_free_their_seats_when_they_do_not_come_back() {
    let redis = redis::RedisServer::start();
    let store = format!("[store]\nredis-url = \"{}\"", redis.url);
    let mut first = Serve::with_config(&config("seats-1", &store, "15s"));
    let (st, app) = first.api(
        "POST",
        "/v1/apps",
        Some(ADMIN),
        Some(json!({"name":"seats"})),
    );
    assert_eq!(st, 201, "{app}");
    let key = s(&app["key"]).to_owned();
    let (st, call) = first.api(
        "POST",
        "/v1/calls",
        Some(&key),
        Some(json!({"max_participants": 2})),
    );
    assert_eq!(st, 201, "{call}");
    let code = s(&call["join_code"]).to_owned();
    let join = |serve: &Serve, name: &str| {
        serve.api(
            "POST",
            "/v1/join",
            None,
            Some(json!({"code": code, "name": name})),
        )
    };
    let (_, ja) = join(&first, "A");
    let (_, jb) = join(&first, "B");
    let (mut a, _) = connect(first.control, s(&ja["signal_token"])).await;
    let (mut b, _) = connect(first.control, s(&jb["signal_token"])).await;
    recv_type(&mut a, "peer_joined").await;
    assert_eq!(
        join(&first, "C").0,
        409,
        "the call is full while both are in"
    );

    // The node stops (an upgrade); neither A nor B comes back.
    sigterm_closes_both_with_1001_and_exits(&mut first, &mut a, &mut b).await;

    // The restarted node (same store) lets newcomers in.
    let second = Serve::with_config(&config("seats-2", &store, "15s"));
    let (st, jc) = join(&second, "C");
    assert_eq!(st, 200, "{jc}");
}
