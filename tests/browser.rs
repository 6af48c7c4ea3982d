//! The join link opens a working call, proven in a real browser: headless Chromium with fake
//! camera and microphone opens the join page of `turnpike serve`, and its own ICE agent carries
//! the call through Turnpike's relay — over UDP, over TCP only, over TLS only. A third person
//! at a full call is told so; the diagnostics page finds STUN and TURN over UDP, TCP and TLS; a
//! page on another origin imports the SDK and joins.
//! A screenshot of a connected call is saved as `target/browser-artifacts/connected-call.png`.
#![allow(clippy::unwrap_used, clippy::print_stdout)]

mod common;

use std::path::{Path, PathBuf};

use common::browser::{Browser, Page};
use common::node::Node;
use common::serve::{config_dir, config_with, http, raw_http, ADMIN};
use serde_json::{json, Value};

/// One browser at a time: each runs a renderer per page and the CI machine has two cores.
static ONE_BROWSER: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// What a page shows when a wait fails: its status, error and tiles.
const EXPLAIN: &str = r#"JSON.stringify({
    status: document.querySelector('#call')?.dataset.status,
    error: document.querySelector('#error')?.textContent,
    tiles: [...document.querySelectorAll('.peer-tile')].map(t => ({...t.dataset}))
})"#;

/// `turnpike serve` with the relay on `listen` (TLS with a self-signed certificate when a
/// `tls://` listener is among them), the control plane and signaling, all on free ports. The
/// `iceServers` the control plane hands out are derived from exactly these listeners.
fn serve(name: &str, listen: &[&str]) -> Node {
    serve_with(name, listen, "")
}

/// [`serve`] with `extra` sections (e.g. `[signal]`) in the configuration.
fn serve_with(name: &str, listen: &[&str], extra: &str) -> Node {
    let dir = config_dir(name);
    let ck =
        rcgen::generate_simple_self_signed(vec!["localhost".into(), "127.0.0.1".into()]).unwrap();
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    std::fs::write(&cert, ck.cert.pem()).unwrap();
    std::fs::write(&key, ck.signing_key.serialize_pem()).unwrap();
    let sections = format!(
        "[relay.tls]\ncert-file = \"{}\"\nkey-file = \"{}\"\n{extra}",
        cert.display(),
        key.display()
    );
    Node::start("serve", &config_with(name, listen, &sections))
}

/// An app and a call of at most `max` participants: its join URL.
fn call(node: &Node, max: u32) -> String {
    call_with_key(node, max).0
}

/// An app and a call of at most `max` participants: (join URL, the app's key, call id).
fn call_with_key(node: &Node, max: u32) -> (String, String, String) {
    let control = node.addr("control");
    let (st, app) = http(
        control,
        "POST",
        "/v1/apps",
        Some(ADMIN),
        Some(json!({"name":"browser"})),
    );
    assert_eq!(st, 201, "{app}");
    let key = app["key"].as_str().unwrap();
    let (st, call) = http(
        control,
        "POST",
        "/v1/calls",
        Some(key),
        Some(json!({"max_participants": max})),
    );
    assert_eq!(st, 201, "{call}");
    (
        call["join_url"].as_str().unwrap().to_owned(),
        key.to_owned(),
        call["id"].as_str().unwrap().to_owned(),
    )
}

/// Waits until `page` has a remote tile connected through the relay, and returns the tile's
/// `data-candidate`.
async fn connected_via_relay(browser: &mut Browser, page: &Page) -> String {
    let expr = r#"(() => {
        const t = [...document.querySelectorAll('.peer-tile')]
            .find(t => t.dataset.state === 'connected' && (t.dataset.candidate || '').startsWith('relay-'));
        return t ? t.dataset.candidate : null;
    })()"#;
    let v = browser
        .wait_for(
            page,
            expr,
            "a remote peer connected through the relay",
            EXPLAIN,
        )
        .await;
    v.as_str().unwrap().to_owned()
}

fn artifacts() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("target/browser-artifacts")
}

/// Two people open the join link with `?relay=1`: both connect, through the relay over
/// `protocol`; returns the browser and pages (still in the call).
async fn two_in_a_call(node: &Node, name: &str, protocol: &str) -> (Browser, Page, Page) {
    two_in(&call(node, 2), name, protocol).await
}

/// [`two_in_a_call`] for the call with join URL `url`.
async fn two_in(url: &str, name: &str, protocol: &str) -> (Browser, Page, Page) {
    let mut browser = Browser::launch(name).await;
    let a = browser
        .open(&format!("{url}?relay=1&autojoin=1&name=Ada"))
        .await;
    let b = browser
        .open(&format!("{url}?relay=1&autojoin=1&name=Bob"))
        .await;
    for page in [&a, &b] {
        let via = connected_via_relay(&mut browser, page).await;
        assert_eq!(via, format!("relay-{protocol}"), "{name}");
        // Of the pair, the side with the smaller peer id offered, whoever came first.
        let role = browser
            .eval(
                page,
                "(() => { const c = window.__turnpikeCall; const [p] = [...c._peers.values()];
                   return p.offerer === (c.peerId < p.id); })()",
            )
            .await;
        assert_eq!(role, json!(true), "{name}: the offerer is the smaller id");
    }
    (browser, a, b)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_browsers_join_by_code_and_talk_through_the_relay_and_a_third_is_told_the_call_is_full()
{
    let _one = ONE_BROWSER.lock().await;
    // Only TURN over UDP offered: with TCP too, Chrome may pick either.
    let node = serve("udp", &["udp://127.0.0.1:0"]);
    let (mut browser, a, _b) = two_in_a_call(&node, "udp", "udp").await;

    // Media crosses the relay both ways, and the pages' quality reports (every 5 s) reach
    // the histograms.
    for series in [
        r#"turnpike_relay_bytes_total{direction="client_to_peer",transport="udp"}"#,
        r#"turnpike_relay_bytes_total{direction="peer_to_client",transport="udp"}"#,
        r#"turnpike_relay_allocations_active{transport="udp"}"#,
        "turnpike_call_rtt_seconds_count",
        "turnpike_call_mos_count",
        r#"turnpike_call_connections_total{candidate_type="relay",relay_protocol="udp"}"#,
    ] {
        node.wait_metric(series, 1.0).await;
    }
    // The remote video is playing (frames decoded from the other side's fake camera).
    browser
        .wait_for(
            &a,
            "[...document.querySelectorAll('.peer-tile video')].some(v => v.readyState >= 2 && v.videoWidth > 0)",
            "remote video playing",
            EXPLAIN,
        )
        .await;
    // Bob's microphone and camera are on, and Ada's page says so (no "muted" badge).
    browser
        .wait_for(
            &a,
            "[...document.querySelectorAll('.peer-tile .tile-media')].every(m => m.hidden)",
            "the remote peer's media state shown",
            EXPLAIN,
        )
        .await;
    browser
        .screenshot(&a, &artifacts().join("connected-call.png"))
        .await;

    // A third person at this two-person call is told it is full.
    let url = {
        // The first page's URL is the call's join URL.
        let href = browser.eval(&a, "location.href").await;
        href.as_str().unwrap().split('?').next().unwrap().to_owned()
    };
    let c = browser
        .open(&format!("{url}?relay=1&autojoin=1&name=Cleo"))
        .await;
    let error = browser
        .wait_for(
            &c,
            "(() => { const e = document.querySelector('#error'); return e && e.dataset.code ? {code: e.dataset.code, text: e.textContent} : null })()",
            "the full call's error",
            EXPLAIN,
        )
        .await;
    assert_eq!(error["code"], "call_full", "{error}");
    assert!(
        error["text"]
            .as_str()
            .unwrap()
            .to_lowercase()
            .contains("full"),
        "{error}"
    );
    let status = browser
        .eval(&c, "document.querySelector('#call').dataset.status")
        .await;
    assert_eq!(status, json!("error"));
    assert_eq!(
        browser
            .eval(&c, "document.querySelectorAll('.peer-tile').length")
            .await,
        json!(0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_only_turn_over_tcp_offered_the_call_connects_over_tcp() {
    let _one = ONE_BROWSER.lock().await;
    let node = serve("tcp", &["tcp://127.0.0.1:0"]);
    let (mut browser, a, _b) = two_in_a_call(&node, "tcp", "tcp").await;
    node.wait_metric(
        r#"turnpike_relay_bytes_total{direction="peer_to_client",transport="tcp"}"#,
        1.0,
    )
    .await;

    // The call on a phone-sized screen: nothing wider than the screen, every control on it.
    browser
        .call(
            Some(&a),
            "Emulation.setDeviceMetricsOverride",
            json!({"width": 375, "height": 667, "deviceScaleFactor": 2, "mobile": true}),
        )
        .await;
    let fits = r#"(() => {
        const w = window.innerWidth;
        const inside = (sel) => [...document.querySelectorAll(sel)].every(e => {
            const r = e.getBoundingClientRect();
            return r.width > 0 && r.left >= 0 && r.right <= w + 1;
        });
        return w === 375 && document.documentElement.scrollWidth <= w
            && inside('#toggle-audio, #toggle-video, #leave') && inside('.tile:not([hidden])');
    })()"#;
    browser
        .wait_for(
            &a,
            fits,
            "the call laid out within a 375 px screen",
            EXPLAIN,
        )
        .await;
    browser
        .screenshot(&a, &artifacts().join("phone-call.png"))
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_only_turns_offered_the_call_connects_over_tls() {
    let _one = ONE_BROWSER.lock().await;
    let node = serve("tls", &["tls://127.0.0.1:0"]);
    let (_browser, _a, _b) = two_in_a_call(&node, "tls", "tls").await;
    node.wait_metric(
        r#"turnpike_relay_bytes_total{direction="peer_to_client",transport="tls"}"#,
        1.0,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn diagnostics_finds_stun_and_turn_over_udp_tcp_and_tls() {
    let _one = ONE_BROWSER.lock().await;
    let node = serve(
        "diag",
        // One stream listener per address serves TCP and TLS alike; a second loopback
        // address gives TLS its own `turns:` URL.
        &[
            "udp://127.0.0.1:0",
            "tcp://127.0.0.1:0",
            "tls://127.0.0.2:0",
        ],
    );
    let mut browser = Browser::launch("diag").await;
    let page = browser
        .open(&format!("http://{}/diagnostics", node.addr("control")))
        .await;
    let explain = r#"JSON.stringify([...document.querySelectorAll('[data-check]')].map(r => ({...r.dataset})))"#;
    browser
        .wait_for(
            &page,
            "document.querySelector('#diagnostics')?.dataset.status === 'done'",
            "diagnostics done",
            explain,
        )
        .await;
    let results: Value = browser
        .eval(
            &page,
            "Object.fromEntries([...document.querySelectorAll('[data-check]')].map(r => [r.dataset.check, r.dataset.result]))",
        )
        .await;
    assert_eq!(
        results,
        json!({"stun":"ok","turn-udp":"ok","turn-tcp":"ok","turn-tls":"ok"}),
        "{}",
        browser.eval(&page, explain).await
    );
    // The report is there to copy, without the credentials.
    let report = browser
        .eval(&page, "document.querySelector('#report').textContent")
        .await;
    let report = report.as_str().unwrap();
    assert!(report.contains("turn-tls"), "{report}");
    assert!(!report.contains("credential"), "{report}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_signaling_socket_reconnects_and_resumes_unseen() {
    let _one = ONE_BROWSER.lock().await;
    let node = serve("reconnect", &["udp://127.0.0.1:0"]);
    let (mut browser, a, b) = two_in_a_call(&node, "reconnect", "udp").await;
    let id_a = browser.eval(&a, "window.__turnpikeCall.peerId").await;
    let id_a = id_a.as_str().unwrap().to_owned();
    // Everything B's SDK says about peers leaving, and what A's says about reconnecting.
    browser
        .eval(
            &b,
            "window.__left = []; window.__turnpikeCall.on('peer-left', d => window.__left.push(d)); true",
        )
        .await;
    browser
        .eval(
            &a,
            "window.__reconnecting = []; window.__reconnected = null;
             window.__turnpikeCall.on('reconnecting', d => window.__reconnecting.push(d));
             window.__turnpikeCall.on('reconnected', d => { window.__reconnected = d; }); true",
        )
        .await;
    let closed = r#"turnpike_signal_disconnects_total{reason="closed"}"#;
    let closed_before = node.metric(closed);

    // A's signaling socket goes away under the SDK (as on a network hiccup).
    browser
        .eval(&a, "window.__turnpikeCall._ws.close(); true")
        .await;
    node.wait_metric(closed, closed_before + 1.0).await;
    let reconnected = browser
        .wait_for(
            &a,
            "document.querySelector('#call').dataset.status === 'joined' && window.__reconnected",
            "A reconnected and joined again",
            EXPLAIN,
        )
        .await;
    assert_eq!(reconnected["resumed"], json!(true), "{reconnected}");
    let tries = browser.eval(&a, "window.__reconnecting.length").await;
    assert!(tries.as_u64().unwrap() >= 1, "{tries}");

    // The new socket carries A's messages: a mute reaches B.
    browser
        .eval(&a, "document.querySelector('#toggle-audio').click(); true")
        .await;
    let muted = format!(
        "window.__turnpikeCall.peers.some(p => p.peerId === '{id_a}' && p.media.audio === false)"
    );
    browser
        .wait_for(&b, &muted, "B sees A muted after the reconnect", EXPLAIN)
        .await;
    // B never saw A leave: no peer-left, A's tile is still there and still connected.
    assert_eq!(browser.eval(&b, "window.__left").await, json!([]));
    let tile = browser
        .eval(
            &b,
            &format!(
                "(() => {{ const t = document.querySelector('.peer-tile[data-peer-id=\"{id_a}\"]'); return t ? t.dataset.state : null }})()"
            ),
        )
        .await;
    assert_eq!(
        tile,
        json!("connected"),
        "{}",
        browser.eval(&b, EXPLAIN).await
    );
    // Nor did A lose B: the same peer connection goes on.
    connected_via_relay(&mut browser, &a).await;
}

/// The host kicks a participant: the kicked page ends (and does not reconnect), the other
/// page sees it leave, the kicked browser's allocation ends, and its TURN credentials are
/// revoked on the relay, not only its signaling.
///
/// Which comes first on the relay is a race: the revocation tears the allocation down (reason
/// `revoked`) unless the page's own release (Chrome frees its allocations when the call's
/// peer connection closes) reaches the shard first. So the test checks that the allocation is
/// gone, and then that the kicked page's credentials can no longer allocate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kicked_participant_is_ended_in_the_browser_and_on_the_relay() {
    let _one = ONE_BROWSER.lock().await;
    let node = serve("kick", &["udp://127.0.0.1:0"]);
    let (url, key, call_id) = call_with_key(&node, 2);
    let (mut browser, a, b) = two_in(&url, "kick", "udp").await;
    let ada = browser.eval(&a, "window.__turnpikeCall.peerId").await;
    let ada = ada.as_str().expect("the page exposes its call").to_owned();
    let turn = browser
        .eval(
            &a,
            "window.__turnpikeCall._iceServers.find(s => s.username)",
        )
        .await;
    let (user, pass) = (turn["username"].as_str(), turn["credential"].as_str());
    let (user, pass) = (user.expect("TURN credentials"), pass.expect("a password"));
    let ended = [
        r#"turnpike_relay_allocations_ended_total{reason="revoked"}"#,
        r#"turnpike_relay_allocations_ended_total{reason="client"}"#,
    ];
    let ended_before = node.metric_sum(&ended);
    let path = format!("/v1/calls/{call_id}/participants/{ada}");
    let (st, body) = raw_http(node.addr("control"), "DELETE", &path, Some(&key), None);
    assert_eq!(st, 204, "{body}");
    browser
        .wait_for(
            &a,
            "document.querySelector('#call').dataset.status === 'ended'",
            "the kicked page ended",
            EXPLAIN,
        )
        .await;
    let gone = format!("!document.querySelector('.peer-tile[data-peer-id=\"{ada}\"]')");
    browser
        .wait_for(&b, &gone, "the kicked peer's tile removed", EXPLAIN)
        .await;
    // Every shard (`threads = 2`) has applied the revocation, and the kicked page's
    // allocation is gone, torn down or released.
    node.wait_metric("turnpike_relay_revocations_applied_total", 2.0)
        .await;
    node.wait_metric_sum(&ended, ended_before + 1.0).await;
    // Its credentials are refused as revoked: what a kicked client could otherwise keep
    // using. (The page's own release may have been refused so already.)
    let refused = r#"turnpike_relay_auth_failures_total{reason="revoked"}"#;
    let refused_before = node.metric(refused);
    assert_eq!(
        common::turn::allocate(node.addr("relay"), "example.org", user, pass),
        Some(401)
    );
    node.wait_metric(refused, refused_before + 1.0).await;
    node.wait_metric(r#"turnpike_signal_disconnects_total{reason="kicked"}"#, 1.0)
        .await;
    // It did not come back: still ended, and signaling refused no token of it (the SDK does
    // not retry after a kick's close code).
    assert_eq!(
        browser
            .eval(&a, "document.querySelector('#call').dataset.status")
            .await,
        json!("ended")
    );
    assert_eq!(
        node.metric(r#"turnpike_signal_auth_failures_total{reason="revoked"}"#),
        0.0
    );
}

/// Holds the page's SDK reconnect attempts until `window.__go` is set, counts them in
/// `window.__tries`, and keeps the call object (`window.__call`, which the page drops when the
/// call ends) and its `ended` event (`window.__ended`).
const GATE_RECONNECTS: &str = "const c = window.__turnpikeCall; window.__call = c;
    window.__ended = null; window.__tries = 0; window.__go = false;
    c.on('ended', d => { window.__ended = d; });
    const attempt = c._attempt.bind(c);
    c._attempt = () => {
      const run = () => { if (window.__go) { window.__tries += 1; attempt(); } else setTimeout(run, 20); };
      run();
    };
    true";

/// Holds `page`'s reconnect attempts ([`GATE_RECONNECTS`]) and drops its signaling socket;
/// returns once the node has seen the socket go.
async fn drop_signaling_held(browser: &mut Browser, node: &Node, page: &Page) {
    browser.eval(page, GATE_RECONNECTS).await;
    let closed = r#"turnpike_signal_disconnects_total{reason="closed"}"#;
    let closed_before = node.metric(closed);
    browser
        .eval(page, "window.__turnpikeCall._ws.close(); true")
        .await;
    node.wait_metric(closed, closed_before + 1.0).await;
}

/// Lets `page`'s held reconnect attempt go and expects it refused by signaling for `refused`
/// (an auth-failure reason), the call ended with `reason`, after one try and none pending.
async fn let_back_and_expect_end(
    browser: &mut Browser,
    node: &Node,
    page: &Page,
    refused: &str,
    reason: &str,
) {
    let refused = format!(r#"turnpike_signal_auth_failures_total{{reason="{refused}"}}"#);
    let refused_before = node.metric(&refused);
    browser.eval(page, "window.__go = true; true").await;
    let ended = browser
        .wait_for(
            page,
            "window.__ended",
            "the reconnecting page ended",
            EXPLAIN,
        )
        .await;
    assert_eq!(ended["reason"], json!(reason), "{ended}");
    assert_eq!(
        browser
            .eval(page, "document.querySelector('#call').dataset.status")
            .await,
        json!("ended")
    );
    node.wait_metric(&refused, refused_before + 1.0).await;
    assert_eq!(browser.eval(page, "window.__tries").await, json!(1));
    assert_eq!(
        browser.eval(page, "window.__call._reconnect").await,
        json!(null)
    );
}

/// The call ends while a page's signaling socket is down: the page's next reconnect attempt is
/// refused with `call_ended`, and the page ends with that reason instead of trying again until
/// its resume window runs out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_ended_while_a_page_reconnects_ends_the_page_with_call_ended() {
    let _one = ONE_BROWSER.lock().await;
    let node = serve("ended-away", &["udp://127.0.0.1:0"]);
    let (url, key, call_id) = call_with_key(&node, 2);
    let (mut browser, a, b) = two_in(&url, "ended-away", "udp").await;
    // A's attempts wait until let back, so the call surely ends before A tries (the first
    // attempt would otherwise come 500 ms after the drop, racing the request below).
    drop_signaling_held(&mut browser, &node, &a).await;
    let path = format!("/v1/calls/{call_id}/end");
    let (st, body) = raw_http(node.addr("control"), "POST", &path, Some(&key), None);
    assert_eq!(st, 200, "{body}");
    // B, still connected, is told at once.
    browser
        .wait_for(
            &b,
            "document.querySelector('#call').dataset.status === 'ended'",
            "the connected page ended",
            EXPLAIN,
        )
        .await;
    let_back_and_expect_end(&mut browser, &node, &a, "call_gone", "call_ended").await;
}

/// A page comes back after the server's resume window (2 s here) has run out: its first
/// reconnect attempt is refused (the peer has left the call), and the page ends with
/// `disconnected` at once rather than trying until its own window runs out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_page_back_after_the_resume_window_is_refused_once_and_ends_disconnected() {
    let _one = ONE_BROWSER.lock().await;
    let node = serve_with(
        "too-late",
        &["udp://127.0.0.1:0"],
        "[signal]\nresume-window = \"2s\"\n",
    );
    let (url, _, _) = call_with_key(&node, 2);
    let (mut browser, a, b) = two_in(&url, "too-late", "udp").await;
    let ada = browser.eval(&a, "window.__turnpikeCall.peerId").await;
    let ada = ada.as_str().expect("the page exposes its call").to_owned();
    drop_signaling_held(&mut browser, &node, &a).await;
    // The server gives A's seat up after the window: B sees A leave.
    let gone = format!("!document.querySelector('.peer-tile[data-peer-id=\"{ada}\"]')");
    browser
        .wait_for(
            &b,
            &gone,
            "A's tile removed after its resume window",
            EXPLAIN,
        )
        .await;
    let_back_and_expect_end(&mut browser, &node, &a, "left", "disconnected").await;
}

/// A signaling socket that goes deaf (a dead path the browser does not notice) is given up
/// after two ping intervals without a word, and the page reconnects and resumes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_signaling_socket_that_hears_nothing_for_two_ping_intervals_is_replaced() {
    let _one = ONE_BROWSER.lock().await;
    let node = serve_with(
        "deaf",
        &["udp://127.0.0.1:0"],
        "[signal]\nping-interval = \"1s\"\n",
    );
    let (url, _, _) = call_with_key(&node, 2);
    let (mut browser, a, _b) = two_in(&url, "deaf", "udp").await;
    browser
        .eval(
            &a,
            "window.__reconnecting = []; window.__reconnected = null;
             window.__turnpikeCall.on('reconnecting', d => window.__reconnecting.push(d));
             window.__turnpikeCall.on('reconnected', d => { window.__reconnected = d; });
             window.__turnpikeCall._ws.onmessage = null; true",
        )
        .await;
    let back = browser
        .wait_for(
            &a,
            "window.__reconnected",
            "A gave up the deaf socket and resumed",
            EXPLAIN,
        )
        .await;
    assert_eq!(back["resumed"], json!(true), "{back}");
    let tries = browser.eval(&a, "window.__reconnecting").await;
    assert_eq!(tries[0]["reason"], json!("timeout"), "{tries}");
    connected_via_relay(&mut browser, &a).await;
}

/// While a page's signaling is away, one peer leaves and another joins: nothing of that reaches
/// the page. When it resumes, it drops the peer who left and connects to the newcomer, from
/// the welcome's list of who is there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resumed_page_catches_up_with_who_left_and_who_joined_while_it_was_away() {
    let _one = ONE_BROWSER.lock().await;
    let node = serve("catch-up", &["udp://127.0.0.1:0"]);
    let (url, _, _) = call_with_key(&node, 3);
    let (mut browser, a, b) = two_in(&url, "catch-up", "udp").await;
    let idb = browser.eval(&b, "window.__turnpikeCall.peerId").await;
    let idb = idb.as_str().unwrap().to_owned();
    drop_signaling_held(&mut browser, &node, &a).await;
    // B leaves and C joins meanwhile.
    browser
        .eval(&b, "document.querySelector('#leave').click(); true")
        .await;
    node.wait_metric(r#"turnpike_signal_disconnects_total{reason="leave"}"#, 1.0)
        .await;
    let c = browser
        .open(&format!("{url}?relay=1&autojoin=1&name=Cy"))
        .await;
    browser
        .wait_for(
            &c,
            "document.querySelector('#call').dataset.status === 'joined'",
            "C joined",
            EXPLAIN,
        )
        .await;
    let idc = browser.eval(&c, "window.__turnpikeCall.peerId").await;
    let idc = idc.as_str().unwrap().to_owned();
    // A comes back.
    browser.eval(&a, "window.__go = true; true").await;
    let b_gone = format!("!document.querySelector('.peer-tile[data-peer-id=\"{idb}\"]')");
    browser
        .wait_for(&a, &b_gone, "A dropped B's tile", EXPLAIN)
        .await;
    let c_connected = format!(
        "(() => {{ const t = document.querySelector('.peer-tile[data-peer-id=\"{idc}\"]'); return !!t && t.dataset.state === 'connected'; }})()"
    );
    browser
        .wait_for(&a, &c_connected, "A connected to C", EXPLAIN)
        .await;
    assert_eq!(browser.eval(&a, "window.__tries").await, json!(1));
}

/// Another web site: one HTML page without any policy, on a port of its own (so another origin
/// than the node's), answered to every request until the test process ends.
fn embedding_site() -> std::net::SocketAddr {
    use std::io::{Read as _, Write as _};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut s) = stream else { continue };
            let mut head = [0u8; 4096];
            let _ = s.read(&mut head);
            let body = "<!doctype html><title>an app</title><p>a page that embeds a call</p>";
            let _ = write!(
                s,
                "HTTP/1.1 200 OK\r\ncontent-type: text/html\r\ncontent-length: {}\r\n\
                 connection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_page_on_another_origin_imports_the_sdk_and_joins_with_base_url() {
    let _one = ONE_BROWSER.lock().await;
    let node = serve_with(
        "embed",
        &["udp://127.0.0.1:0"],
        "[signal]\nallowed-origins = [\"*\"]\n",
    );
    let url = call(&node, 2);
    let (base, code) = url.split_once("/join/").unwrap();
    let site = embedding_site();
    let mut browser = Browser::launch("embed").await;
    let page = browser.open(&format!("http://{site}/")).await;
    browser
        .wait_for(
            &page,
            "document.readyState === 'complete' && location.host !== '' ? true : null",
            "the embedding page loaded",
            "location.href",
        )
        .await;
    // The SDK as a module from Turnpike's origin, then POST /v1/join across origins (a
    // preflight first: a JSON body) and the signaling socket from this page's origin.
    let joined = browser
        .eval(
            &page,
            &format!(
                r#"(async () => {{
                    const {{ Turnpike }} = await import("{base}/sdk/turnpike.js");
                    const call = await Turnpike.join({{
                        code: "{code}", name: "Embed", baseUrl: "{base}", localStream: null,
                    }});
                    return {{ origin: location.origin, peerId: call.peerId }};
                }})().catch(e => ({{ error: String(e) }}))"#
            ),
        )
        .await;
    assert_eq!(
        joined["origin"],
        json!(format!("http://{site}")),
        "{joined}"
    );
    assert!(
        joined["peerId"]
            .as_str()
            .is_some_and(|p| p.starts_with("p_")),
        "{joined}"
    );
    // Its signaling socket is open on the node.
    node.wait_metric("turnpike_signal_connections_active", 1.0)
        .await;
}

/// A TCP listener that accepts connections and never answers (a proxy or network path that
/// holds them): its address.
fn black_hole() -> std::net::SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for stream in listener.incoming() {
            held.extend(stream.ok());
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_join_whose_signaling_never_answers_fails_with_signal_unreachable_in_time() {
    let _one = ONE_BROWSER.lock().await;
    let node = serve_with(
        "black-hole",
        &["udp://127.0.0.1:0"],
        "[signal]\nallowed-origins = [\"*\"]\n",
    );
    let url = call(&node, 2);
    let (base, code) = url.split_once("/join/").unwrap();
    let hole = black_hole();
    // A page without a Content Security Policy (the node's own pages would refuse the socket
    // to another address at once, which is not what is tested here).
    let site = embedding_site();
    let mut browser = Browser::launch("black-hole").await;
    let page = browser.open(&format!("http://{site}/")).await;
    browser
        .wait_for(
            &page,
            "document.readyState === 'complete' && location.host !== '' ? true : null",
            "the page loaded",
            "location.href",
        )
        .await;
    // The join answers with a signaling URL that accepts the connection and then says nothing.
    let result = browser
        .eval(
            &page,
            &format!(
                r#"(async () => {{
                    const {{ Turnpike }} = await import("{base}/sdk/turnpike.js");
                    const realFetch = window.fetch;
                    window.fetch = async (...args) => {{
                        const res = await realFetch(...args);
                        const body = await res.json();
                        body.signal_url = "ws://{hole}/v1/signal";
                        return new Response(JSON.stringify(body), {{ status: res.status, headers: res.headers }});
                    }};
                    try {{
                        await Turnpike.join({{
                            code: "{code}", name: "Held", baseUrl: "{base}", localStream: null,
                            connectTimeoutMs: 1000,
                        }});
                        return {{ joined: true }};
                    }} catch (e) {{
                        return {{ code: e.code }};
                    }}
                }})()"#
            ),
        )
        .await;
    assert_eq!(result["code"], json!("signal_unreachable"), "{result}");
}
