//! Signaling on a real socket: the control plane's router with `/v1/signal` merged in, served
//! on 127.0.0.1:0; HTTP calls go through the same router (`oneshot`), WebSocket clients are
//! real `tokio-tungstenite` clients.

#![allow(dead_code, unreachable_pub, clippy::unwrap_used)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::http::{header, Request, StatusCode};
use axum::Router;
use control::api::{Clock, ControlMetrics, Limits, NoRevoker, SystemClock};
use control::creds::Minter;
use control::jwt::{JwtKey, Keys};
use control::secrets::HashKey;
use control::store::{MemoryStore, Store};
use control::{AppState, Revoker};
use futures_util::{SinkExt as _, StreamExt as _};
use http_body_util::BodyExt as _;
use prometheus::Registry;
use serde_json::{json, Value};
use signal::bus::{Bus, LocalBus};
use signal::metrics::SignalMetrics;
use signal::{Settings, Signal};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use tower::ServiceExt as _;

pub mod gate;

pub const ADMIN: &str = "admin-token-for-tests-0123456789";
pub const RELAY_SECRET: &[u8] = b"relay-shared-secret-for-tests";
pub const JWT_KID: &str = "k1";
pub const JWT_SECRET: &[u8] = b"jwt-secret-for-tests-0123456789-abcdef";
/// How long a test waits for something that should happen at once: generous for a loaded CI
/// machine; only a failing test ever waits this long.
pub const PATIENCE: Duration = Duration::from_secs(15);

/// Knobs of one node.
pub struct Options {
    pub signal: Settings,
    pub store: Arc<dyn Store>,
    pub bus: Option<Arc<dyn Bus>>,
    pub credential_ttl_s: u64,
    /// `control.token-ttl`: the signaling token's lifetime.
    pub token_ttl: Duration,
    pub revoker: Arc<dyn Revoker>,
    /// The control plane's clock (token times, call expiry): a `ManualClock` lets a test
    /// expire tokens without waiting out the JWT leeway.
    pub clock: Arc<dyn Clock>,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            signal: Settings::default(),
            store: Arc::new(MemoryStore::new()),
            bus: None,
            credential_ttl_s: 3600,
            token_ttl: Duration::from_secs(600),
            revoker: Arc::new(NoRevoker),
            clock: Arc::new(SystemClock),
        }
    }
}

/// One node: control plane + signaling on a real listener.
pub struct Node {
    pub addr: SocketAddr,
    pub router: Router,
    pub state: AppState,
    pub signal: Signal,
    pub registry: Registry,
    server: tokio::task::JoinHandle<()>,
}

impl Drop for Node {
    fn drop(&mut self) {
        self.signal.shutdown();
        self.server.abort();
    }
}

pub fn control_settings(public_url: &str, credential_ttl_s: u64) -> control::Settings {
    control::Settings {
        public_url: public_url.into(),
        admin_token: Some(ADMIN.into()),
        hash_key: HashKey::new(b"hash-key-for-tests-0123456789"),
        jwt: Keys::new(vec![JwtKey {
            kid: JWT_KID.into(),
            secret: JWT_SECRET.to_vec(),
        }])
        .unwrap(),
        token_ttl: Duration::from_secs(600),
        minter: Minter::new(
            RELAY_SECRET,
            vec![
                "stun:127.0.0.1:3478".into(),
                "turn:127.0.0.1:3478?transport=udp".into(),
            ],
            credential_ttl_s,
        ),
        max_body: 64 * 1024,
        request_timeout: Duration::from_secs(10),
        // Tests join many times from one address.
        limits: Limits {
            join_per_ip: 10_000,
            join_failures_per_ip: 10_000,
            join_per_code: 10_000,
            window: Duration::from_secs(60),
        },
        join_origins: conf::AllowedOrigins::PublicUrl,
        trusted_proxies: Vec::new(),
    }
}

impl Node {
    pub async fn start(opts: Options) -> Node {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let registry = Registry::new();
        let public_url = format!("http://{addr}");
        let bus: Arc<dyn Bus> = opts
            .bus
            .unwrap_or_else(|| Arc::new(LocalBus::new("node-test")));
        // The signal handle is both the control plane's event sink and a router: built in two
        // steps through a cell, as the binary does.
        let events = Arc::new(signal::LateEvents::default());
        let state = AppState {
            settings: Arc::new(control::Settings {
                token_ttl: opts.token_ttl,
                ..control_settings(&public_url, opts.credential_ttl_s)
            }),
            store: opts.store,
            revoker: opts.revoker,
            clock: opts.clock,
            metrics: ControlMetrics::new(&registry).unwrap(),
            events: events.clone(),
        };
        let signal = Signal::new(
            state.clone(),
            opts.signal,
            bus,
            SignalMetrics::new(&registry).unwrap(),
        );
        events.set(&signal);
        let router = control::router(state.clone()).merge(signal.router());
        let app = router.clone();
        let server = tokio::spawn(async move {
            axum::serve(
                listener,
                app.into_make_service_with_connect_info::<SocketAddr>(),
            )
            .await
            .unwrap();
        });
        Node {
            addr,
            router,
            state,
            signal,
            registry,
            server,
        }
    }

    /// An HTTP request through the router; returns status and JSON (Null when empty).
    pub async fn http(
        &self,
        method: &str,
        uri: &str,
        auth: Option<&str>,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        let mut b = Request::builder().method(method).uri(uri);
        if let Some(a) = auth {
            b = b.header(header::AUTHORIZATION, format!("Bearer {a}"));
        }
        let mut req = match body {
            Some(v) => b
                .header(header::CONTENT_TYPE, "application/json")
                .body(Body::from(v.to_string()))
                .unwrap(),
            None => b.body(Body::empty()).unwrap(),
        };
        req.extensions_mut()
            .insert(ConnectInfo(SocketAddr::from(([127, 0, 0, 1], 1))));
        let resp = self.router.clone().oneshot(req).await.unwrap();
        let status = resp.status();
        let bytes = resp.into_body().collect().await.unwrap().to_bytes();
        let json = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        (status, json)
    }

    /// A new app's key.
    pub async fn app_key(&self) -> String {
        let (s, v) = self
            .http(
                "POST",
                "/v1/apps",
                Some(ADMIN),
                Some(json!({"name": "tests"})),
            )
            .await;
        assert_eq!(s, StatusCode::CREATED, "{v}");
        v["key"].as_str().unwrap().to_owned()
    }

    /// A new call: (key, call id, join code).
    pub async fn call(&self, max_participants: u32) -> (String, String, String) {
        let key = self.app_key().await;
        let (s, v) = self
            .http(
                "POST",
                "/v1/calls",
                Some(&key),
                Some(json!({"max_participants": max_participants})),
            )
            .await;
        assert_eq!(s, StatusCode::CREATED, "{v}");
        (
            key,
            v["id"].as_str().unwrap().to_owned(),
            v["join_code"].as_str().unwrap().to_owned(),
        )
    }

    /// `/v1/join` by code: the whole answer.
    pub async fn join(&self, code: &str, name: &str) -> Value {
        let (s, v) = self.try_join(code, name).await;
        assert_eq!(s, StatusCode::OK, "{v}");
        v
    }

    /// `/v1/join` by code: status and answer, whatever the status.
    pub async fn try_join(&self, code: &str, name: &str) -> (StatusCode, Value) {
        self.http(
            "POST",
            "/v1/join",
            None,
            Some(json!({"code": code, "name": name})),
        )
        .await
    }

    pub fn ws_url(&self) -> String {
        format!("ws://{}/v1/signal", self.addr)
    }

    /// The value of a metric series (counter or gauge) with these labels, 0 when absent.
    pub fn metric(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        metric(&self.registry, name, labels)
    }

    /// Sample count of a histogram.
    pub fn histogram_count(&self, name: &str) -> u64 {
        self.registry
            .gather()
            .iter()
            .filter(|f| f.name() == name)
            .flat_map(|f| f.get_metric().iter())
            .map(|m| m.get_histogram().get_sample_count())
            .sum()
    }
}

pub fn metric(registry: &Registry, name: &str, labels: &[(&str, &str)]) -> f64 {
    for f in registry.gather() {
        if f.name() != name {
            continue;
        }
        for m in f.get_metric() {
            let ok = labels.iter().all(|(k, v)| {
                m.get_label()
                    .iter()
                    .any(|l| l.name() == *k && l.value() == *v)
            });
            if ok {
                // One of the two is set, the other reads 0.
                return m.get_counter().get_value() + m.get_gauge().get_value();
            }
        }
    }
    0.0
}

/// Polls `f` until it is true (or fails the test after [`PATIENCE`]).
pub async fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while !f() {
        assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A WebSocket client.
pub struct Client {
    pub ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
}

/// How a socket ended.
#[derive(Debug, PartialEq, Eq)]
pub enum End {
    /// A close frame with this code and reason.
    Closed(u16, String),
    /// The TCP connection ended without a close frame.
    Dropped,
}

impl Client {
    pub async fn connect(url: &str) -> Client {
        let (ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
        Client { ws }
    }

    pub async fn send(&mut self, v: Value) {
        self.ws
            .send(Message::Text(v.to_string().into()))
            .await
            .unwrap();
    }

    pub async fn send_raw(&mut self, text: &str) {
        self.ws
            .send(Message::Text(text.to_owned().into()))
            .await
            .unwrap();
    }

    /// The next text message as JSON; panics on close or after [`PATIENCE`].
    pub async fn recv(&mut self) -> Value {
        loop {
            let msg = tokio::time::timeout(PATIENCE, self.ws.next())
                .await
                .expect("no message in time")
                .expect("socket ended")
                .expect("socket error");
            match msg {
                Message::Text(t) => return serde_json::from_str(&t).unwrap(),
                Message::Ping(_) | Message::Pong(_) => continue,
                other => panic!("unexpected frame {other:?}"),
            }
        }
    }

    /// Skips messages until one of `type`; panics on close.
    pub async fn recv_type(&mut self, t: &str) -> Value {
        loop {
            let v = self.recv().await;
            assert_eq!(v["v"], 1, "{v}");
            if v["type"] == t {
                return v;
            }
        }
    }

    /// Reads until the socket ends; returns how, with the text messages seen before.
    pub async fn until_end(&mut self) -> (End, Vec<Value>) {
        let mut seen = Vec::new();
        loop {
            let next = tokio::time::timeout(PATIENCE, self.ws.next())
                .await
                .expect("socket did not end in time");
            match next {
                Some(Ok(Message::Text(t))) => seen.push(serde_json::from_str(&t).unwrap()),
                Some(Ok(Message::Close(Some(f)))) => {
                    return (End::Closed(u16::from(f.code), f.reason.to_string()), seen)
                }
                Some(Ok(Message::Close(None))) => {
                    return (
                        End::Closed(u16::from(CloseCode::Status), String::new()),
                        seen,
                    )
                }
                Some(Ok(_)) => continue,
                Some(Err(_)) | None => return (End::Dropped, seen),
            }
        }
    }

    /// Connects and authenticates with `token`; returns the `welcome`.
    pub async fn joined(url: &str, token: &str) -> (Client, Value) {
        let mut c = Client::connect(url).await;
        c.send(json!({"v": 1, "type": "auth", "token": token}))
            .await;
        let w = c.recv().await;
        assert_eq!(w["type"], "welcome", "{w}");
        (c, w)
    }
}

/// `/v1/join` then signaling: (client, welcome, join answer).
pub async fn enter(node: &Node, code: &str, name: &str) -> (Client, Value, Value) {
    let j = node.join(code, name).await;
    let (c, w) = Client::joined(&node.ws_url(), j["signal_token"].as_str().unwrap()).await;
    (c, w, j)
}
