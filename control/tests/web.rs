//! The browser side through `router(state).oneshot(req)`: the join and diagnostics pages, the
//! SDK and the assets (content types, the CSP and the other security headers, the JSON 404 for
//! anything else), the DOM contract the browser tests read, and the diagnostics credentials
//! endpoint (short-lived, in their own group, rate-limited per address). The scripts are
//! syntax-checked with `node --check` when Node is installed.

#![allow(clippy::unwrap_used)]

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::connect_info::ConnectInfo;
use axum::http::{header, HeaderMap, Request, StatusCode};
use axum::Router;
use control::api::{
    ControlMetrics, Limits, ManualClock, NoEvents, NoRevoker, DIAGNOSTICS_GROUP,
    DIAGNOSTICS_PER_IP, DIAGNOSTICS_TTL_S,
};
use control::creds::Minter;
use control::jwt::{JwtKey, Keys};
use control::secrets::HashKey;
use control::store::{MemoryStore, Millis};
use control::{router, AppState, Settings};
use http_body_util::BodyExt as _;
use prometheus::Registry;
use serde_json::Value;
use tower::ServiceExt as _;

const PUBLIC_URL: &str = "https://turn.example.com";
const RELAY_SECRET: &[u8] = b"relay-shared-secret-for-tests";
/// 2023-11-14T22:13:20Z.
const T0: Millis = 1_700_000_000_000;

const CSP: &str = "default-src 'self'; script-src 'self'; style-src 'self'; \
                   img-src 'self' data: blob:; media-src 'self' blob: mediastream:; \
                   connect-src 'self' ws: wss:; frame-ancestors 'none'; base-uri 'none'; \
                   form-action 'self'";

const HTML: &str = "text/html; charset=utf-8";
const JS: &str = "text/javascript; charset=utf-8";
const CSS: &str = "text/css; charset=utf-8";

/// Every page and asset: path, content type, `Cache-Control`.
const FILES: &[(&str, &str, &str)] = &[
    ("/join", HTML, "no-store"),
    ("/join/BCD-FGHJ-KLM", HTML, "no-store"),
    ("/join/bcdfghjklm", HTML, "no-store"),
    ("/diagnostics", HTML, "no-store"),
    ("/sdk/turnpike.js", JS, "no-cache"),
    ("/assets/join.js", JS, "no-cache"),
    ("/assets/diagnostics.js", JS, "no-cache"),
    ("/assets/style.css", CSS, "no-cache"),
];

struct Web {
    router: Router,
    registry: Registry,
    clock: Arc<ManualClock>,
}

fn web() -> Web {
    web_with_urls(&[
        "stun:turn.example.com:3478",
        "turn:turn.example.com:3478?transport=udp",
        "turn:turn.example.com:3478?transport=tcp",
        "turns:turn.example.com:5349?transport=tcp",
    ])
}

fn web_with_urls(urls: &[&str]) -> Web {
    let registry = Registry::new();
    let clock = Arc::new(ManualClock::new(T0));
    let settings = Settings {
        public_url: PUBLIC_URL.into(),
        admin_token: None,
        hash_key: HashKey::new(b"hash-key-for-tests-0123456789"),
        jwt: Keys::new(vec![JwtKey {
            kid: "k1".into(),
            secret: b"jwt-secret-for-tests-0123456789-abcdef".to_vec(),
        }])
        .unwrap(),
        token_ttl: Duration::from_secs(600),
        minter: Minter::new(
            RELAY_SECRET,
            urls.iter().map(|u| (*u).to_owned()).collect(),
            // Far longer than the diagnostics TTL: the endpoint must not use the default.
            4 * 3600,
        ),
        max_body: 64 * 1024,
        request_timeout: Duration::from_secs(10),
        limits: Limits::default(),
        join_origins: conf::AllowedOrigins::PublicUrl,
        trusted_proxies: Vec::new(),
    };
    let state = AppState {
        settings: Arc::new(settings),
        store: Arc::new(MemoryStore::default()),
        revoker: Arc::new(NoRevoker),
        events: Arc::new(NoEvents),
        clock: clock.clone(),
        metrics: ControlMetrics::new(&registry).unwrap(),
    };
    Web {
        router: router(state),
        registry,
        clock,
    }
}

#[derive(Debug)]
struct Resp {
    status: StatusCode,
    headers: HeaderMap,
    body: String,
}

impl Resp {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap()
    }

    #[track_caller]
    fn json_404(&self) {
        assert_eq!(self.status, StatusCode::NOT_FOUND, "{self:?}");
        assert_eq!(self.headers[header::CONTENT_TYPE], "application/json");
        assert_eq!(self.json()["error"]["code"], "not_found", "{self:?}");
    }
}

/// A client address in TEST-NET-1.
fn ip(n: u8) -> SocketAddr {
    SocketAddr::new(IpAddr::V4(Ipv4Addr::new(192, 0, 2, n)), 40_000)
}

impl Web {
    async fn send(&self, method: &str, uri: &str, from: SocketAddr) -> Resp {
        let mut req = Request::builder()
            .method(method)
            .uri(uri)
            .body(Body::empty())
            .unwrap();
        req.extensions_mut().insert(ConnectInfo(from));
        let response = self.router.clone().oneshot(req).await.unwrap();
        let (parts, body) = response.into_parts();
        let bytes = body.collect().await.unwrap().to_bytes();
        Resp {
            status: parts.status,
            headers: parts.headers,
            body: String::from_utf8(bytes.to_vec()).unwrap(),
        }
    }

    async fn get(&self, uri: &str) -> Resp {
        self.send("GET", uri, ip(1)).await
    }

    /// The value of counter `name` with `labels` (all of them must match).
    fn counter(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        for family in self.registry.gather() {
            if family.name() != name {
                continue;
            }
            for m in family.get_metric() {
                let matches = labels.iter().all(|(k, v)| {
                    m.get_label()
                        .iter()
                        .any(|l| l.name() == *k && l.value() == *v)
                });
                if matches {
                    return m.get_counter().get_value();
                }
            }
        }
        panic!("no {name} {labels:?}");
    }
}

#[tokio::test]
async fn pages_and_assets_have_their_type_the_csp_and_the_security_headers() {
    let web = web();
    for (path, content_type, cache) in FILES {
        let r = web.get(path).await;
        assert_eq!(r.status, StatusCode::OK, "{path}");
        assert_eq!(r.headers[header::CONTENT_TYPE], *content_type, "{path}");
        assert_eq!(r.headers[header::CONTENT_SECURITY_POLICY], CSP, "{path}");
        assert_eq!(
            r.headers[header::CONTENT_SECURITY_POLICY],
            control::web::CSP
        );
        assert_eq!(
            r.headers[header::X_CONTENT_TYPE_OPTIONS],
            "nosniff",
            "{path}"
        );
        assert_eq!(r.headers[header::REFERRER_POLICY], "no-referrer", "{path}");
        assert_eq!(r.headers[header::CACHE_CONTROL], *cache, "{path}");
        assert!(r.body.len() > 100, "{path}: {}", r.body);
        // HEAD too (a link checker, a proxy's probe).
        let head = web.send("HEAD", path, ip(1)).await;
        assert_eq!(head.status, StatusCode::OK, "HEAD {path}");
        assert_eq!(head.headers[header::CONTENT_SECURITY_POLICY], CSP);
    }
    // The same bytes as the files in control/web (embedded, not read at run time).
    let sdk = web.get("/sdk/turnpike.js").await;
    assert_eq!(sdk.body, include_str!("../web/turnpike.js"));
    assert!(sdk.body.contains("export const Turnpike"));
    // A page on another origin imports it as a module, which browsers fetch in CORS mode; the
    // pages and their own scripts stay same-origin.
    assert_eq!(sdk.headers[header::ACCESS_CONTROL_ALLOW_ORIGIN], "*");
    let page = web.get("/assets/join.js").await;
    assert!(!page
        .headers
        .contains_key(header::ACCESS_CONTROL_ALLOW_ORIGIN));
}

#[tokio::test]
async fn pages_are_counted_under_their_route_templates() {
    let web = web();
    web.get("/join/BCD-FGHJ-KLM").await;
    web.get("/join/ZZZ-ZZZZ-ZZZ").await;
    web.get("/assets/style.css").await;
    web.get("/assets/nope.css").await;
    let requests = "turnpike_control_http_requests_total";
    let count = |route| {
        web.counter(
            requests,
            &[("route", route), ("method", "GET"), ("status_class", "2xx")],
        )
    };
    assert_eq!(count("/join/{code}"), 2.0);
    assert_eq!(count("/assets/{file}"), 1.0);
    assert_eq!(
        web.counter(
            requests,
            &[
                ("route", "/assets/{file}"),
                ("method", "GET"),
                ("status_class", "4xx")
            ]
        ),
        1.0
    );
}

#[tokio::test]
async fn unknown_assets_and_pages_are_the_json_404() {
    let web = web();
    for uri in [
        "/assets/nope.js",
        "/assets/turnpike.js",
        "/assets/join.html",
        "/assets/..%2Fsrc%2Fweb.rs",
        "/assets/",
        "/assets",
        "/sdk/other.js",
        "/sdk/",
        "/join/ABC/extra",
        "/diagnostics/x",
        "/web/join.html",
    ] {
        let r = web.get(uri).await;
        r.json_404();
        assert!(r.headers.get(header::CONTENT_SECURITY_POLICY).is_none());
    }
    // Pages are GET (and HEAD) only: the API's 405.
    let r = web.send("POST", "/join/BCD-FGHJ-KLM", ip(1)).await;
    assert_eq!(r.status, StatusCode::METHOD_NOT_ALLOWED, "{r:?}");
    assert_eq!(r.json()["error"]["code"], "method_not_allowed");
}

/// What the CSP forbids must not be in the pages: inline scripts, inline styles, event
/// handler attributes, other origins.
#[tokio::test]
async fn pages_need_nothing_the_csp_forbids() {
    let web = web();
    for path in ["/join", "/diagnostics"] {
        let html = web.get(path).await.body;
        let lower = html.to_lowercase();
        for (i, _) in lower.match_indices("<script") {
            let tag = &lower[i..i + lower[i..].find('>').unwrap()];
            assert!(tag.contains(" src=\"/"), "{path}: inline script {tag}");
            assert!(
                lower[i..].starts_with(&format!("{tag}></script>")),
                "{path}: {tag}"
            );
        }
        assert!(!lower.contains("<style"), "{path}: inline style element");
        assert!(!lower.contains(" style="), "{path}: style attribute");
        assert!(
            !lower.contains(" onclick="),
            "{path}: event handler attribute"
        );
        assert!(
            !lower.contains(" onload="),
            "{path}: event handler attribute"
        );
        assert!(!lower.contains("http://"), "{path}: another origin");
        assert!(!lower.contains("https://"), "{path}: another origin");
        assert!(lower.contains("name=\"viewport\""), "{path}: phone screens");
    }
    for path in [
        "/sdk/turnpike.js",
        "/assets/join.js",
        "/assets/diagnostics.js",
    ] {
        let js = web.get(path).await.body;
        assert!(!js.contains("innerHTML"), "{path}: builds DOM from strings");
        assert!(!js.contains("eval("), "{path}");
        assert!(!js.contains(".style."), "{path}: inline style (CSP)");
    }
}

/// The ids and attributes the browser tests read (docs/sdk.md).
#[tokio::test]
async fn the_dom_contract_is_in_the_pages() {
    let web = web();
    let join = web.get("/join/BCD-FGHJ-KLM").await.body;
    for needle in [
        "id=\"call\"",
        "data-status=\"idle\"",
        "id=\"join-form\"",
        "id=\"name\"",
        "id=\"join-button\"",
        "id=\"toggle-audio\"",
        "id=\"toggle-video\"",
        "id=\"leave\"",
        "id=\"error\"",
        "class=\"tile peer-tile\"",
        "data-peer-id=",
        "data-state=",
        "data-candidate=",
    ] {
        assert!(join.contains(needle), "join page: {needle}");
    }
    let js = web.get("/assets/join.js").await.body;
    for needle in [
        "\"relay\"",
        "\"name\"",
        "\"autojoin\"",
        "\"token\"",
        "dataset.status",
        "dataset.state",
        "dataset.candidate",
        "dataset.code",
        "This call is full.",
        "call_full",
        "call_join_limit",
    ] {
        assert!(js.contains(needle), "join.js: {needle}");
    }
    let diag = web.get("/diagnostics").await.body;
    for needle in [
        "id=\"diagnostics\"",
        "data-check=\"stun\"",
        "data-check=\"turn-udp\"",
        "data-check=\"turn-tcp\"",
        "data-check=\"turn-tls\"",
        "id=\"copy-report\"",
        "<pre id=\"report\"",
    ] {
        assert!(diag.contains(needle), "diagnostics page: {needle}");
    }
}

#[tokio::test]
async fn diagnostics_credentials_live_a_minute_in_their_own_group() {
    let web = web();
    let before = web.counter(
        "turnpike_control_credentials_issued_total",
        &[("via", "diagnostics")],
    );
    assert_eq!(before, 0.0, "the label exists from the start");
    let r = web.send("POST", "/v1/diagnostics/ice-servers", ip(1)).await;
    assert_eq!(r.status, StatusCode::OK, "{r:?}");
    assert_eq!(r.headers[header::CONTENT_TYPE], "application/json");
    let body = r.json();
    assert_eq!(body["expires_at"], "2023-11-14T22:14:20Z");
    let servers = body["ice_servers"].as_array().unwrap();
    assert_eq!(servers[0]["urls"][0], "stun:turn.example.com:3478");
    let turn = servers
        .iter()
        .find(|s| s.get("username").is_some())
        .unwrap();
    assert_eq!(turn["urls"].as_array().unwrap().len(), 3);
    let username = turn["username"].as_str().unwrap();
    let (expiry, user) = username.split_once(':').unwrap();
    let expiry: u64 = expiry.parse().unwrap();
    assert!(expiry - T0 / 1000 <= 60, "{username}");
    assert_eq!(expiry - T0 / 1000, DIAGNOSTICS_TTL_S);
    assert!(
        user.starts_with(&format!("{DIAGNOSTICS_GROUP}.")),
        "{username}"
    );
    // The group the relay revokes by.
    let groups: Vec<&str> = relay_proto::auth::rest_groups(username.as_bytes()).collect();
    assert_eq!(groups, [DIAGNOSTICS_GROUP], "{username}");
    // A password the relay accepts.
    assert_eq!(
        relay_proto::rest_password(RELAY_SECRET, username),
        turn["credential"].as_str().unwrap()
    );
    assert_eq!(
        web.counter(
            "turnpike_control_credentials_issued_total",
            &[("via", "diagnostics")]
        ),
        1.0
    );
    // No body, no key: the page is public.
    let r = web.send("POST", "/v1/diagnostics/ice-servers", ip(2)).await;
    assert_eq!(r.status, StatusCode::OK);
    // GET is the API's 405.
    let r = web.send("GET", "/v1/diagnostics/ice-servers", ip(3)).await;
    assert_eq!(r.status, StatusCode::METHOD_NOT_ALLOWED);
}

#[tokio::test]
async fn diagnostics_credentials_are_rate_limited_per_address() {
    let web = web();
    assert_eq!(DIAGNOSTICS_PER_IP, 10);
    for i in 0..DIAGNOSTICS_PER_IP {
        let r = web.send("POST", "/v1/diagnostics/ice-servers", ip(7)).await;
        assert_eq!(r.status, StatusCode::OK, "request {i}: {r:?}");
    }
    web.clock.advance(Duration::from_secs(20));
    let r = web.send("POST", "/v1/diagnostics/ice-servers", ip(7)).await;
    assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS, "{r:?}");
    assert_eq!(r.json()["error"]["code"], "rate_limited");
    let retry: u64 = r.headers[header::RETRY_AFTER]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=60).contains(&retry), "{retry}");
    assert_eq!(retry, 40, "the window's rest");
    // Another address is not affected; the counted one is counted as issued only when issued.
    let r = web.send("POST", "/v1/diagnostics/ice-servers", ip(8)).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(
        web.counter(
            "turnpike_control_credentials_issued_total",
            &[("via", "diagnostics")]
        ),
        (DIAGNOSTICS_PER_IP + 1) as f64
    );
    // The next window admits again.
    web.clock.advance(Duration::from_secs(retry));
    let r = web.send("POST", "/v1/diagnostics/ice-servers", ip(7)).await;
    assert_eq!(r.status, StatusCode::OK, "{r:?}");
}

#[tokio::test]
async fn diagnostics_without_turn_urls_gives_what_there_is() {
    let web = web_with_urls(&["stun:turn.example.com:3478"]);
    let r = web.send("POST", "/v1/diagnostics/ice-servers", ip(1)).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(
        r.json()["ice_servers"],
        serde_json::json!([{"urls": ["stun:turn.example.com:3478"]}])
    );
}

/// `node --check` on every script, and the SDK's pure helper run under Node, when Node is
/// installed (the CI image has it; without it this says so and checks nothing).
#[test]
fn scripts_parse_under_node() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("web");
    let Ok(version) = std::process::Command::new("node").arg("--version").output() else {
        eprintln!("node not found: scripts not syntax-checked");
        return;
    };
    assert!(version.status.success());
    for file in ["turnpike.js", "join.js", "diagnostics.js"] {
        let out = std::process::Command::new("node")
            .arg("--check")
            .arg(dir.join(file))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{file}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // The SDK imports without a browser; its candidate label is the DOM contract's.
    let sdk = dir.join("turnpike.js");
    let script = format!(
        "const m = await import({:?});
         const l = m.candidateLabel;
         const cases = [
           [{{candidate_type: 'host', relay_protocol: 'none'}}, 'direct'],
           [{{candidate_type: 'srflx', relay_protocol: 'none'}}, 'direct'],
           [{{candidate_type: 'prflx', relay_protocol: 'none'}}, 'direct'],
           [{{candidate_type: 'relay', relay_protocol: 'udp'}}, 'relay-udp'],
           [{{candidate_type: 'relay', relay_protocol: 'tcp'}}, 'relay-tcp'],
           [{{candidate_type: 'relay', relay_protocol: 'tls'}}, 'relay-tls'],
           [{{candidate_type: null, relay_protocol: null}}, ''],
         ];
         for (const [q, want] of cases) {{
           if (l(q) !== want) throw new Error(JSON.stringify(q) + ' -> ' + l(q));
         }}
         if (typeof m.Turnpike.join !== 'function') throw new Error('no join');",
        format!("file://{}", sdk.display())
    );
    let out = std::process::Command::new("node")
        .args(["--input-type=module", "-e", &script])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
