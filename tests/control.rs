//! The control plane end to end through the binary (`turnpike serve`, relay and API in one
//! process): an app, a call, a join by code, and the TURN credentials it returned allocating on
//! the relay; ending the call tears that allocation down and refuses the credentials. Each runs
//! in memory and on a real `redis-server`. Also `docs/api.md`'s walk-through, run as written.
#![allow(clippy::unwrap_used, clippy::print_stdout)]

mod common;
#[path = "../control/tests/common/redis.rs"]
mod redis;

use std::net::{SocketAddr, UdpSocket};
use std::process::Command;
use std::time::{Duration, Instant};

use relay_proto::stun::{self, attr, method, Class, Encoder, Message};
use serde_json::{json, Value};

use common::serve::{config, http, raw_http, Serve, ADMIN, BIN, WAIT};

/// A TURN client over UDP built from the relay's own codec, with the long-term credential
/// mechanism (401 → realm and nonce → signed request).
struct TurnClient {
    sock: UdpSocket,
    server: SocketAddr,
    username: String,
    password: String,
    realm: Vec<u8>,
    nonce: Vec<u8>,
    sent: u64,
}

impl TurnClient {
    fn new(server: SocketAddr, username: &str, password: &str) -> Self {
        let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
        sock.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        Self {
            sock,
            server,
            username: username.to_owned(),
            password: password.to_owned(),
            realm: Vec::new(),
            nonce: Vec::new(),
            sent: 0,
        }
    }

    /// Sends a request (signed once the nonce is known) and returns its error code (None for
    /// success) and the raw answer. Retries a lost datagram; follows one 401/438 to sign.
    fn request(&mut self, m: u16, attrs: &[(u16, Vec<u8>)]) -> (Option<u16>, Vec<u8>, [u8; 12]) {
        let mut signed_retry = false;
        loop {
            self.sent += 1;
            let mut tid = [0x5Au8; 12];
            tid[4..].copy_from_slice(&self.sent.to_be_bytes());
            let mut buf = Vec::new();
            let mut e = Encoder::new(&mut buf, m, Class::Request, tid);
            for (t, v) in attrs {
                e.attr(*t, v);
            }
            let signing = !self.nonce.is_empty();
            if signing {
                let key = relay_proto::auth::long_term_key(
                    self.username.as_bytes(),
                    &self.realm,
                    self.password.as_bytes(),
                );
                e.attr(attr::USERNAME, self.username.as_bytes())
                    .attr(attr::REALM, &self.realm)
                    .attr(attr::NONCE, &self.nonce)
                    .integrity(&key);
            }
            e.finish();
            let raw = self.exchange(&buf, tid);
            let msg = Message::parse(&raw).unwrap();
            let code = msg
                .attributes()
                .find(|(t, _, _)| *t == attr::ERROR_CODE)
                .map(|(_, v, _)| u16::from(v[2]) * 100 + u16::from(v[3]));
            for (t, v, _) in msg.attributes() {
                match t {
                    attr::REALM => self.realm = v.to_vec(),
                    attr::NONCE => self.nonce = v.to_vec(),
                    _ => {}
                }
            }
            // Unsigned (first request) or a stale nonce: sign with what the answer gave, once.
            if (code == Some(401) && !signing || code == Some(438)) && !signed_retry {
                signed_retry = true;
                continue;
            }
            return (code, raw, tid);
        }
    }

    fn exchange(&self, req: &[u8], tid: [u8; 12]) -> Vec<u8> {
        let deadline = Instant::now() + WAIT;
        let mut buf = [0u8; 2048];
        loop {
            self.sock.send_to(req, self.server).unwrap();
            while let Ok((n, _)) = self.sock.recv_from(&mut buf) {
                if let Ok(msg) = Message::parse(&buf[..n]) {
                    if msg.transaction_id() == tid {
                        return buf[..n].to_vec();
                    }
                }
            }
            assert!(Instant::now() < deadline, "no answer from the relay");
        }
    }

    fn allocate(&mut self) -> (Option<u16>, Option<SocketAddr>) {
        let (code, raw, tid) = self.request(
            method::ALLOCATE,
            &[(attr::REQUESTED_TRANSPORT, vec![17, 0, 0, 0])],
        );
        let relayed = Message::parse(&raw).ok().and_then(|m| {
            m.attributes()
                .find(|(t, _, _)| *t == attr::XOR_RELAYED_ADDRESS)
                .and_then(|(_, v, _)| stun::decode_xor_address(v, &tid))
        });
        (code, relayed)
    }

    fn refresh(&mut self) -> Option<u16> {
        self.request(method::REFRESH, &[]).0
    }
}

/// The TURN username and password of a join answer's `ice_servers`.
fn turn_credentials(join: &Value) -> (String, String) {
    let entry = join["ice_servers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e.get("username").is_some())
        .unwrap_or_else(|| panic!("no TURN entry in {join}"));
    let urls: Vec<&str> = entry["urls"]
        .as_array()
        .unwrap()
        .iter()
        .map(|u| u.as_str().unwrap())
        .collect();
    assert!(
        urls.iter()
            .any(|u| u.starts_with("turn:127.0.0.1:") && u.ends_with("?transport=udp")),
        "{urls:?}"
    );
    (
        entry["username"].as_str().unwrap().to_owned(),
        entry["credential"].as_str().unwrap().to_owned(),
    )
}

/// The whole product flow against one `turnpike serve`.
fn call_credentials_work_until_the_call_ends(serve: &Serve) {
    let (status, app) = serve.api(
        "POST",
        "/v1/apps",
        Some(ADMIN),
        Some(json!({"name": "E2E"})),
    );
    assert_eq!(status, 201, "{app}");
    let key = app["key"].as_str().unwrap().to_owned();
    let (status, call) = serve.api(
        "POST",
        "/v1/calls",
        Some(&key),
        Some(json!({"name": "e2e"})),
    );
    assert_eq!(status, 201, "{call}");
    let call_id = call["id"].as_str().unwrap().to_owned();
    let code = call["join_code"].as_str().unwrap().to_owned();
    let (status, join) = serve.api(
        "POST",
        "/v1/join",
        None,
        Some(json!({"code": code, "name": "Ann"})),
    );
    assert_eq!(status, 200, "{join}");
    let (username, password) = turn_credentials(&join);
    assert!(
        !username.contains("Ann") && !username.contains(&call_id),
        "{username}"
    );

    // The credentials allocate on the relay of this process, and a peer hears from it.
    let mut client = TurnClient::new(serve.udp, &username, &password);
    let (code_, relayed) = client.allocate();
    assert_eq!(code_, None, "Allocate with the joined credentials");
    let relayed = relayed.unwrap();
    assert_eq!(relayed.ip().to_string(), "127.0.0.1");
    assert_eq!(client.refresh(), None);

    let (status, ended) = serve.api(
        "POST",
        &format!("/v1/calls/{call_id}/end"),
        Some(&key),
        None,
    );
    assert_eq!(
        (status, ended["state"].as_str()),
        (200, Some("ended")),
        "{ended}"
    );

    // The live allocation is torn down (revocation reaches every shard asynchronously: poll).
    let deadline = Instant::now() + WAIT;
    loop {
        match client.refresh() {
            Some(437) => break,
            other => assert!(Instant::now() < deadline, "Refresh after end: {other:?}"),
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    // A new allocation with the same credentials is refused, on whichever shard it lands once
    // both (`threads = 2`) applied the revocation.
    serve.wait_metric("turnpike_relay_revocations_applied_total", 2.0);
    let mut again = TurnClient::new(serve.udp, &username, &password);
    assert_eq!(again.allocate().0, Some(401));
    // Shards publish their counters every second: poll.
    serve.wait_metric(
        r#"turnpike_relay_auth_failures_total{reason="revoked"}"#,
        1.0,
    );
    // And the code no longer admits.
    let (status, body) = serve.api(
        "POST",
        "/v1/join",
        None,
        Some(json!({"code": code, "name": "Bob"})),
    );
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (404, Some("invalid_or_expired"))
    );
}

#[test]
fn in_memory_call_credentials_allocate_until_the_call_ends() {
    let serve = Serve::with_config(&config("memory", ""));
    serve.wait_ready(200);
    call_credentials_work_until_the_call_ends(&serve);
}

#[test]
fn on_redis_call_credentials_allocate_until_the_call_ends_and_redis_outages_are_503() {
    let mut redis = redis::RedisServer::start();
    let serve = Serve::with_config(&config(
        "redis",
        &format!("[store]\nredis-url = \"{}\"", redis.url),
    ));
    serve.wait_ready(200);
    call_credentials_work_until_the_call_ends(&serve);

    // Redis down: the API answers 503 where it needs the store, /ready follows, /live stays.
    redis.kill();
    let (status, body) = serve.api(
        "POST",
        "/v1/join",
        None,
        Some(json!({"code": "BCD-FGHJ-KLM", "name": "Ann"})),
    );
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (503, Some("unavailable")),
        "{body}"
    );
    serve.wait_ready(503);
    assert_eq!(raw_http(serve.admin, "GET", "/live", None, None).0, 200);
    // Back (empty): ready again without a restart; the app is gone with the data, so its key is
    // unknown (401), which is what a restarted-empty Redis means.
    redis.restart();
    serve.wait_ready(200);
    let (status, _) = serve.api(
        "POST",
        "/v1/apps",
        Some(ADMIN),
        Some(json!({"name": "After"})),
    );
    assert_eq!(status, 201);
}

#[test]
fn redis_down_at_start_serves_503_then_recovers() {
    let mut redis = redis::RedisServer::start();
    redis.kill();
    let serve = Serve::with_config(&config(
        "redis-late",
        &format!("[store]\nredis-url = \"{}\"", redis.url),
    ));
    // The process is up and live, not ready; the API answers 503, not a hang or a crash.
    assert_eq!(raw_http(serve.admin, "GET", "/live", None, None).0, 200);
    serve.wait_ready(503);
    let (status, body) = serve.api(
        "POST",
        "/v1/apps",
        Some(ADMIN),
        Some(json!({"name": "Early"})),
    );
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (503, Some("unavailable")),
        "{body}"
    );
    redis.restart();
    serve.wait_ready(200);
    let (status, _) = serve.api(
        "POST",
        "/v1/apps",
        Some(ADMIN),
        Some(json!({"name": "Late"})),
    );
    assert_eq!(status, 201);
}

/// Runs every ```sh block of docs/api.md, in order, in one bash with `set -euo pipefail`,
/// against a `turnpike serve` started like the walk-through says (the embedded default; ports
/// moved to 0 by environment overrides so the test needs no fixed port).
fn walk_through(extra_env: &[(&str, &str)]) {
    let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/api.md")).unwrap();
    let mut script = String::from("set -euo pipefail\n");
    let mut in_block = false;
    let mut blocks = 0;
    for line in doc.lines() {
        if line == "```sh" {
            in_block = true;
            blocks += 1;
        } else if line == "```" {
            in_block = false;
        } else if in_block {
            script += line;
            script += "\n";
        }
    }
    assert!(
        blocks >= 8,
        "the walk-through has its steps ({blocks} blocks)"
    );
    let mut env = vec![
        (
            "TURNPIKE_RELAY_LISTEN",
            "udp://127.0.0.1:0,tcp://127.0.0.1:0",
        ),
        ("TURNPIKE_CONTROL_LISTEN", "127.0.0.1:0"),
        ("TURNPIKE_ADMIN_LISTEN", "127.0.0.1:0"),
    ];
    env.extend_from_slice(extra_env);
    let serve = Serve::start(&[], &env);
    serve.wait_ready(200);
    let admin_token = serve.printed("turnpike: admin token for this run: ");
    let out = Command::new("bash")
        .arg("-c")
        .arg(&script)
        .env("TP", format!("http://{}", serve.control))
        .env("ADMIN_TOKEN", admin_token)
        .output()
        .expect("bash");
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "docs/api.md walk-through failed:\n{text}"
    );
    // Every `jq -e` check printed true; none printed false.
    assert!(
        text.lines().filter(|l| *l == "true").count() >= 10,
        "{text}"
    );
}

#[test]
fn the_api_walk_through_runs_as_written_in_memory() {
    walk_through(&[]);
}

#[test]
fn the_api_walk_through_runs_as_written_on_redis() {
    let redis = redis::RedisServer::start();
    walk_through(&[("TURNPIKE_STORE_REDIS_URL", redis.url.as_str())]);
}

#[test]
fn control_metrics_are_on_the_admin_port_only() {
    let serve = Serve::with_config(&config("metrics-port", ""));
    serve.wait_ready(200);
    let (status, _) = serve.api(
        "POST",
        "/v1/apps",
        Some(ADMIN),
        Some(json!({"name": "Metrics"})),
    );
    assert_eq!(status, 201);
    let (status, body) = raw_http(serve.admin, "GET", "/metrics", None, None);
    assert_eq!(status, 200);
    // The request just made, by route template and status class, counted and timed.
    for series in [
        r#"turnpike_control_http_requests_total{method="POST",route="/v1/apps",status_class="2xx"} 1"#,
        r#"turnpike_control_http_request_duration_seconds_count{route="/v1/apps",status_class="2xx"} 1"#,
        r#"turnpike_control_store_errors_total{kind="unavailable"} 0"#,
        r#"turnpike_control_store_errors_total{kind="corrupt"} 0"#,
        "turnpike_control_store_operation_duration_seconds_count 0",
        "turnpike_control_calls_created_total 0",
    ] {
        assert!(
            body.lines().any(|l| l == series),
            "{series} not in:\n{body}"
        );
    }
    // The public API port exposes none of it: a JSON 404, no metric text.
    let (status, body) = raw_http(serve.control, "GET", "/metrics", None, None);
    assert_eq!(status, 404, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["error"]["code"], "not_found", "{body}");
    assert!(!body.contains("turnpike_"), "{body}");
}

/// An app declared in config, with two keys (either works) and the STUN/TURN URLs handed out.
const APP_KEY: &str = "config-app-key-0123456789-first";
const APP_KEY_2: &str = "config-app-key-0123456789-second";
const CONFIG_APP: &str = r#"
turn-urls = ["stun:turn.test:3478", "turn:turn.test:3478?transport=udp", "turns:turn.test:443?transport=tcp"]

[[control.apps]]
id = "web"
name = "Web client"
keys = ["config-app-key-0123456789-first", "config-app-key-0123456789-second"]
"#;

/// Creates a call with an app key, joins it by code, and checks the join's `ice_servers` are
/// the configured URLs with TURN credentials; returns the join answer.
fn config_app_call_and_join(control: SocketAddr) -> Value {
    // The admin API lists the config app; its keys were never shown, only configured.
    let (status, apps) = http(control, "GET", "/v1/apps", Some(ADMIN), None);
    assert_eq!(status, 200, "{apps}");
    let web = apps["apps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["id"] == "web")
        .unwrap_or_else(|| panic!("config app not listed: {apps}"));
    assert_eq!(web["name"], "Web client", "{web}");

    // A key that is not the app's: a JSON 401, no call.
    let (status, body) = http(
        control,
        "POST",
        "/v1/calls",
        Some("config-app-key-0123456789-wrong"),
        Some(json!({})),
    );
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (401, Some("unauthorized")),
        "{body}"
    );

    // Both configured keys create calls for the app, and each sees the other's (one app).
    let mut codes = Vec::new();
    for (key, other) in [(APP_KEY, APP_KEY_2), (APP_KEY_2, APP_KEY)] {
        let (status, call) = http(
            control,
            "POST",
            "/v1/calls",
            Some(key),
            Some(json!({"name": "from config"})),
        );
        assert_eq!(status, 201, "{call}");
        let id = call["id"].as_str().unwrap();
        let (status, got) = http(
            control,
            "GET",
            &format!("/v1/calls/{id}"),
            Some(other),
            None,
        );
        assert_eq!(
            (status, got["state"].as_str(), got["name"].as_str()),
            (200, Some("waiting"), Some("from config")),
            "{got}"
        );
        codes.push(call["join_code"].as_str().unwrap().to_owned());
    }
    let code = &codes[0];

    let (status, join) = http(
        control,
        "POST",
        "/v1/join",
        None,
        Some(json!({"code": code, "name": "Ann"})),
    );
    assert_eq!(status, 200, "{join}");
    let servers = join["ice_servers"].as_array().unwrap();
    let urls: Vec<&str> = servers
        .iter()
        .flat_map(|s| s["urls"].as_array().unwrap())
        .map(|u| u.as_str().unwrap())
        .collect();
    assert_eq!(
        urls,
        [
            "stun:turn.test:3478",
            "turn:turn.test:3478?transport=udp",
            "turns:turn.test:443?transport=tcp"
        ],
        "{join}"
    );
    let turn = servers
        .iter()
        .find(|s| s.get("username").is_some())
        .unwrap_or_else(|| panic!("no TURN credentials: {join}"));
    assert!(!turn["credential"].as_str().unwrap().is_empty(), "{join}");
    join
}

#[test]
fn an_app_from_config_authenticates_and_creates_a_call() {
    let serve = Serve::with_config(&config("config-app", CONFIG_APP));
    serve.wait_ready(200);
    config_app_call_and_join(serve.control);
}

/// `turnpike control --config F`, killed on drop: the control plane without a relay.
struct ControlOnly {
    child: std::process::Child,
    control: SocketAddr,
    admin: SocketAddr,
}

impl ControlOnly {
    fn start(config: &std::path::Path) -> Self {
        use std::io::BufRead as _;
        let mut child = Command::new(BIN)
            .args(["control", "--config", config.to_str().unwrap()])
            .env_remove("TURNPIKE_CONFIG")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let (tx, lines) = std::sync::mpsc::channel();
        let out = std::io::BufReader::new(child.stdout.take().unwrap());
        std::thread::spawn(move || {
            for l in out.lines().map_while(Result::ok) {
                if tx.send(l).is_err() {
                    break;
                }
            }
        });
        // Readiness: the addresses are printed once bound, the admin listener's last.
        let mut control = None;
        let admin = loop {
            let line = lines
                .recv_timeout(WAIT)
                .expect("turnpike control prints its addresses");
            assert!(!line.contains("relay listening"), "a relay started: {line}");
            if let Some(a) = line.strip_prefix("turnpike: control listening on http://") {
                control = Some(a.parse().unwrap());
            }
            if let Some(a) = line.strip_prefix("turnpike: admin listening on http://") {
                break a.parse().unwrap();
            }
        };
        Self {
            child,
            control: control.expect("a control listener"),
            admin,
        }
    }
}

impl Drop for ControlOnly {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn control_alone_serves_the_api_and_joins_return_ice_servers() {
    let path = config("control-only", CONFIG_APP);
    let node = ControlOnly::start(&path);
    let deadline = Instant::now() + WAIT;
    while raw_http(node.admin, "GET", "/ready", None, None).0 != 200 {
        assert!(Instant::now() < deadline, "/ready never 200");
        std::thread::sleep(Duration::from_millis(50));
    }
    let join = config_app_call_and_join(node.control);
    // Signed with the configured relay secret: the TURN password is the relay's HMAC of the
    // username, so a relay sharing the secret accepts it.
    let turn = join["ice_servers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s.get("username").is_some())
        .unwrap();
    let username = turn["username"].as_str().unwrap();
    let expected = relay_proto::auth::rest_password(common::serve::SECRET.as_bytes(), username);
    assert_eq!(turn["credential"].as_str().unwrap(), expected);
    // The relay's UDP port is not served by this process: no relay metrics either.
    let (_, metrics) = raw_http(node.admin, "GET", "/metrics", None, None);
    assert!(
        metrics.contains("turnpike_control_calls_created_total 2"),
        "{metrics}"
    );
    assert!(!metrics.contains("turnpike_relay_allocations"), "{metrics}");
}
