//! The HTTP API end to end: every endpoint and every error through `router(state).oneshot(req)`
//! on a `MemoryStore` behind a probing wrapper (counts store calls, can fail or hang), a
//! `ManualClock` (expiry without sleeping) and a recording `Revoker`; plus one walk-through over
//! a real socket with `serve`.

#![allow(clippy::unwrap_used)]

use std::collections::{BTreeSet, HashSet};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use axum::body::{Body, Bytes};
use axum::extract::connect_info::{ConnectInfo, MockConnectInfo};
use axum::http::{header, HeaderMap, HeaderValue, Request, StatusCode};
use axum::Router;
use control::api::{
    ApiError, Clock, ControlMetrics, Limits, ManualClock, NoEvents, NoRevoker, MAX_PARTICIPANTS,
};
use control::codes::ALPHABET;
use control::creds::Minter;
use control::jwt::{JwtError, JwtKey, Keys, AUDIENCE, LEEWAY_S};
use control::secrets::HashKey;
use control::store::{
    Admission, App, Call, CallState, Cursor, Digest, Media, MemoryStore, Millis, Page, Participant,
    Quality, Store, StoreError, TokenGrant,
};
use control::{router, serve, AppState, CallEvents, Revoker, Settings};
use http_body_util::BodyExt as _;
use prometheus::proto::MetricType;
use prometheus::Registry;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tower::ServiceExt as _;

const ADMIN: &str = "admin-token-for-tests-0123456789";
const PUBLIC_URL: &str = "https://turn.example.com";
const RELAY_SECRET: &[u8] = b"relay-shared-secret-for-tests";
const JWT_SECRET: &[u8] = b"jwt-secret-for-tests-0123456789-abcdef";
/// 2023-11-14T22:13:20Z: any fixed time works, the clock is manual.
const T0: Millis = 1_700_000_000_000;
const CRED_TTL_S: u64 = 3600;
const TOKEN_TTL: Duration = Duration::from_secs(600);
const MAX_BODY: usize = 64 * 1024;

// ---------------------------------------------------------------------------------------------
// Harness
// ---------------------------------------------------------------------------------------------

/// `MemoryStore` with a log of the operations called, and switches to fail or hang.
#[derive(Debug, Default)]
struct ProbeStore {
    inner: MemoryStore,
    ops: Mutex<Vec<&'static str>>,
    fail: AtomicBool,
    /// Fails only this operation (a store failure at one step of a request).
    fail_on: Mutex<Option<&'static str>>,
    hang: AtomicBool,
    /// Orders concurrent requests (see [`HitGate`]).
    gate: Mutex<Option<HitGate>>,
}

/// Holds the first `n` rate-limit hits (the first store call of `n` concurrent requests), each
/// after it was counted, until all `n` were counted; then lets them go on one at a time in the
/// reverse order of their hits, each once the requests let go before it have finished (the test
/// counts them in `done`). The worst order for anything that compares counters hit at different
/// moments: the first request counted goes on last.
#[derive(Debug)]
struct HitGate {
    n: usize,
    counted: usize,
    done: Arc<AtomicUsize>,
    changed: Arc<tokio::sync::Notify>,
}

impl ProbeStore {
    async fn enter(&self, op: &'static str) -> Result<(), StoreError> {
        self.ops.lock().unwrap().push(op);
        if self.hang.load(Ordering::SeqCst) {
            std::future::pending::<()>().await;
        }
        if self.fail.load(Ordering::SeqCst) || *self.fail_on.lock().unwrap() == Some(op) {
            return Err(StoreError::Unavailable("switched off by the test".into()));
        }
        Ok(())
    }

    /// After a hit was counted: waits for its turn when a [`HitGate`] is armed and not yet full.
    async fn after_hit(&self) {
        let turn = {
            let mut gate = self.gate.lock().unwrap();
            match gate.as_mut() {
                Some(g) if g.counted < g.n => {
                    g.counted += 1;
                    g.changed.notify_waiters();
                    Some((g.counted, g.n, g.done.clone(), g.changed.clone()))
                }
                _ => None,
            }
        };
        let Some((k, n, done, changed)) = turn else {
            return;
        };
        loop {
            let notified = changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let all_counted = self.gate.lock().unwrap().as_ref().map_or(0, |g| g.counted) == n;
            if all_counted && done.load(Ordering::SeqCst) >= n - k {
                return;
            }
            notified.await;
        }
    }

    fn take_ops(&self) -> Vec<&'static str> {
        std::mem::take(&mut *self.ops.lock().unwrap())
    }
}

#[async_trait]
impl Store for ProbeStore {
    async fn put_app(&self, app: &App, keys: &[Digest]) -> Result<bool, StoreError> {
        self.enter("put_app").await?;
        self.inner.put_app(app, keys).await
    }
    async fn list_apps(&self) -> Result<Vec<App>, StoreError> {
        self.enter("list_apps").await?;
        self.inner.list_apps().await
    }
    async fn get_app(&self, id: &str) -> Result<Option<App>, StoreError> {
        self.enter("get_app").await?;
        self.inner.get_app(id).await
    }
    async fn set_app_disabled(&self, id: &str, disabled: bool) -> Result<bool, StoreError> {
        self.enter("set_app_disabled").await?;
        self.inner.set_app_disabled(id, disabled).await
    }
    async fn add_app_key(&self, id: &str, key: Digest) -> Result<bool, StoreError> {
        self.enter("add_app_key").await?;
        self.inner.add_app_key(id, key).await
    }
    async fn app_for_key(&self, key: Digest) -> Result<Option<App>, StoreError> {
        self.enter("app_for_key").await?;
        self.inner.app_for_key(key).await
    }
    async fn create_call(&self, call: &Call, code: Digest) -> Result<(), StoreError> {
        self.enter("create_call").await?;
        self.inner.create_call(call, code).await
    }
    async fn get_call(&self, id: &str) -> Result<Option<Call>, StoreError> {
        self.enter("get_call").await?;
        self.inner.get_call(id).await
    }
    async fn list_calls(
        &self,
        app_id: &str,
        state: Option<CallState>,
        limit: usize,
        after: Option<&Cursor>,
        now: Millis,
    ) -> Result<Page, StoreError> {
        self.enter("list_calls").await?;
        self.inner
            .list_calls(app_id, state, limit, after, now)
            .await
    }
    async fn call_for_code(&self, code: Digest, now: Millis) -> Result<Option<String>, StoreError> {
        self.enter("call_for_code").await?;
        self.inner.call_for_code(code, now).await
    }
    async fn end_call(
        &self,
        id: &str,
        reason: &str,
        now: Millis,
    ) -> Result<Option<Call>, StoreError> {
        self.enter("end_call").await?;
        self.inner.end_call(id, reason, now).await
    }
    async fn put_token(&self, token: Digest, grant: &TokenGrant) -> Result<(), StoreError> {
        self.enter("put_token").await?;
        self.inner.put_token(token, grant).await
    }
    async fn redeem_token(
        &self,
        token: Digest,
        now: Millis,
    ) -> Result<Option<TokenGrant>, StoreError> {
        self.enter("redeem_token").await?;
        self.inner.redeem_token(token, now).await
    }
    async fn peek_token(
        &self,
        token: Digest,
        now: Millis,
    ) -> Result<Option<TokenGrant>, StoreError> {
        self.enter("peek_token").await?;
        self.inner.peek_token(token, now).await
    }
    async fn admit(
        &self,
        call_id: &str,
        participant: &Participant,
        now: Millis,
    ) -> Result<Admission, StoreError> {
        self.enter("admit").await?;
        self.inner.admit(call_id, participant, now).await
    }
    async fn admit_with_token(
        &self,
        token: Digest,
        call_id: &str,
        participant: &Participant,
        now: Millis,
    ) -> Result<Admission, StoreError> {
        self.enter("admit_with_token").await?;
        self.inner
            .admit_with_token(token, call_id, participant, now)
            .await
    }
    async fn set_left(
        &self,
        call_id: &str,
        peer_id: &str,
        left_at: Option<Millis>,
    ) -> Result<bool, StoreError> {
        self.enter("set_left").await?;
        self.inner.set_left(call_id, peer_id, left_at).await
    }
    async fn mark_connected(
        &self,
        call_id: &str,
        peer_id: &str,
        now: Millis,
    ) -> Result<Option<Participant>, StoreError> {
        self.enter("mark_connected").await?;
        self.inner.mark_connected(call_id, peer_id, now).await
    }
    async fn mark_disconnected(
        &self,
        call_id: &str,
        peer_id: &str,
        seat_until: Millis,
    ) -> Result<bool, StoreError> {
        self.enter("mark_disconnected").await?;
        self.inner
            .mark_disconnected(call_id, peer_id, seat_until)
            .await
    }
    async fn set_media(
        &self,
        call_id: &str,
        peer_id: &str,
        media: Media,
    ) -> Result<bool, StoreError> {
        self.enter("set_media").await?;
        self.inner.set_media(call_id, peer_id, media).await
    }
    async fn set_quality(
        &self,
        call_id: &str,
        peer_id: &str,
        quality: &Quality,
    ) -> Result<bool, StoreError> {
        self.enter("set_quality").await?;
        self.inner.set_quality(call_id, peer_id, quality).await
    }
    async fn kick(
        &self,
        call_id: &str,
        peer_id: &str,
        now: Millis,
    ) -> Result<Option<Participant>, StoreError> {
        self.enter("kick").await?;
        self.inner.kick(call_id, peer_id, now).await
    }
    async fn hit(&self, key: &str, window_ms: u64, now: Millis) -> Result<(u64, u64), StoreError> {
        self.enter("hit").await?;
        let counted = self.inner.hit(key, window_ms, now).await;
        self.after_hit().await;
        counted
    }
    async fn peek(&self, key: &str, now: Millis) -> Result<(u64, u64), StoreError> {
        self.enter("peek").await?;
        self.inner.peek(key, now).await
    }
    async fn live_calls(&self, now: Millis) -> Result<u64, StoreError> {
        self.enter("live_calls").await?;
        self.inner.live_calls(now).await
    }
    async fn ping(&self) -> Result<(), StoreError> {
        self.enter("ping").await?;
        self.inner.ping().await
    }
}

/// Remembers every revocation.
#[derive(Debug, Default)]
struct RecordingRevoker(Mutex<Vec<(String, u64)>>);

impl Revoker for RecordingRevoker {
    fn revoke(&self, group: &str, until_unix: u64) {
        self.0.lock().unwrap().push((group.to_owned(), until_unix));
    }
}

/// One thing the API told signaling.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Event {
    Ended { call: String, reason: String },
    Kicked { call: String, peer: String },
}

/// Remembers every event.
#[derive(Debug, Default)]
struct RecordingEvents(Mutex<Vec<Event>>);

impl CallEvents for RecordingEvents {
    fn call_ended(&self, call_id: &str, reason: &str) {
        self.0.lock().unwrap().push(Event::Ended {
            call: call_id.to_owned(),
            reason: reason.to_owned(),
        });
    }
    fn peer_kicked(&self, call_id: &str, peer_id: &str) {
        self.0.lock().unwrap().push(Event::Kicked {
            call: call_id.to_owned(),
            peer: peer_id.to_owned(),
        });
    }
}

fn jwt_keys() -> Keys {
    Keys::new(vec![JwtKey {
        kid: "k1".into(),
        secret: JWT_SECRET.to_vec(),
    }])
    .unwrap()
}

fn settings() -> Settings {
    Settings {
        public_url: PUBLIC_URL.into(),
        admin_token: Some(ADMIN.into()),
        hash_key: HashKey::new(b"hash-key-for-tests-0123456789"),
        jwt: jwt_keys(),
        token_ttl: TOKEN_TTL,
        minter: Minter::new(
            RELAY_SECRET,
            vec![
                "stun:turn.example.com:3478".into(),
                "turn:turn.example.com:3478?transport=udp".into(),
                "turns:turn.example.com:5349?transport=tcp".into(),
            ],
            CRED_TTL_S,
        ),
        max_body: MAX_BODY,
        request_timeout: Duration::from_secs(10),
        limits: Limits::default(),
        join_origins: conf::AllowedOrigins::PublicUrl,
        trusted_proxies: Vec::new(),
    }
}

struct Api {
    router: Router,
    state: AppState,
    registry: Registry,
    store: Arc<ProbeStore>,
    clock: Arc<ManualClock>,
    revoker: Arc<RecordingRevoker>,
    events: Arc<RecordingEvents>,
}

fn api() -> Api {
    api_with(|_| {})
}

fn api_with(tweak: impl FnOnce(&mut Settings)) -> Api {
    let mut s = settings();
    tweak(&mut s);
    let registry = Registry::new();
    let store = Arc::new(ProbeStore::default());
    let clock = Arc::new(ManualClock::new(T0));
    let revoker = Arc::new(RecordingRevoker::default());
    let events = Arc::new(RecordingEvents::default());
    let state = AppState {
        settings: Arc::new(s),
        store: store.clone(),
        revoker: revoker.clone(),
        events: events.clone(),
        clock: clock.clone(),
        metrics: ControlMetrics::new(&registry).unwrap(),
    };
    Api {
        router: router(state.clone()),
        state,
        registry,
        store,
        clock,
        revoker,
        events,
    }
}

/// What came back.
#[derive(Debug)]
struct Resp {
    status: StatusCode,
    headers: HeaderMap,
    bytes: Bytes,
    json: Value,
}

impl Resp {
    /// Asserts an error response of the documented shape and returns its message.
    #[track_caller]
    fn error(&self, status: StatusCode, code: &str) -> String {
        assert_eq!(self.status, status, "{self:?}");
        assert_eq!(
            self.headers[header::CONTENT_TYPE],
            "application/json",
            "{self:?}"
        );
        assert_eq!(self.json["error"]["code"], code, "{self:?}");
        let message = self.json["error"]["message"].as_str().unwrap();
        assert!(!message.is_empty());
        assert_eq!(self.json.as_object().unwrap().len(), 1, "{self:?}");
        message.to_owned()
    }

    #[track_caller]
    fn ok(&self, status: StatusCode) -> &Value {
        assert_eq!(self.status, status, "{self:?}");
        &self.json
    }
}

/// A client address: 192.0.2.`n` (TEST-NET-1), or beyond 255 in 198.18.0.0/15.
fn ip(n: u32) -> SocketAddr {
    let addr = if n < 256 {
        Ipv4Addr::new(192, 0, 2, n as u8)
    } else {
        Ipv4Addr::from(u32::from(Ipv4Addr::new(198, 18, 0, 0)) + n)
    };
    SocketAddr::new(IpAddr::V4(addr), 40_000)
}

fn request(method: &str, uri: &str, auth: Option<&str>, body: Option<&Value>) -> Request<Body> {
    let mut b = Request::builder().method(method).uri(uri);
    if let Some(auth) = auth {
        b = b.header(header::AUTHORIZATION, format!("Bearer {auth}"));
    }
    match body {
        Some(v) => b
            .header(header::CONTENT_TYPE, "application/json")
            .body(Body::from(v.to_string()))
            .unwrap(),
        None => b.body(Body::empty()).unwrap(),
    }
}

impl Api {
    /// Sends through the router (from 192.0.2.1 unless the request says otherwise).
    async fn send(&self, mut req: Request<Body>) -> Resp {
        if req.extensions().get::<ConnectInfo<SocketAddr>>().is_none() {
            req.extensions_mut().insert(ConnectInfo(ip(1)));
        }
        let response = self.router.clone().oneshot(req).await.unwrap();
        let (parts, body) = response.into_parts();
        let bytes = body.collect().await.unwrap().to_bytes();
        let json = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes).unwrap_or(Value::Null)
        };
        Resp {
            status: parts.status,
            headers: parts.headers,
            bytes,
            json,
        }
    }

    async fn call(&self, method: &str, uri: &str, auth: Option<&str>, body: Option<Value>) -> Resp {
        self.send(request(method, uri, auth, body.as_ref())).await
    }

    async fn admin(&self, method: &str, uri: &str, body: Option<Value>) -> Resp {
        self.call(method, uri, Some(ADMIN), body).await
    }

    /// A new app: (id, key).
    async fn new_app(&self, name: &str) -> (String, String) {
        let r = self
            .admin("POST", "/v1/apps", Some(json!({ "name": name })))
            .await;
        let v = r.ok(StatusCode::CREATED);
        (
            v["id"].as_str().unwrap().to_owned(),
            v["key"].as_str().unwrap().to_owned(),
        )
    }

    async fn new_call(&self, key: &str, body: Value) -> Value {
        let r = self.call("POST", "/v1/calls", Some(key), Some(body)).await;
        r.ok(StatusCode::CREATED).clone()
    }

    async fn join_from(&self, from: SocketAddr, body: Value) -> Resp {
        let mut req = request("POST", "/v1/join", None, Some(&body));
        req.extensions_mut().insert(ConnectInfo(from));
        self.send(req).await
    }

    async fn join_code(&self, from: SocketAddr, code: &str) -> Resp {
        self.join_from(from, json!({ "code": code, "name": "Ada" }))
            .await
    }

    async fn stored_call(&self, id: &str) -> Call {
        self.store.inner.get_call(id).await.unwrap().unwrap()
    }

    /// One sample of a metric with exactly these labels (counter, gauge, or histogram count).
    fn metric(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        for family in self.registry.gather() {
            if family.name() != name {
                continue;
            }
            for m in family.get_metric() {
                let got: BTreeSet<(&str, &str)> = m
                    .get_label()
                    .iter()
                    .map(|l| (l.name(), l.value()))
                    .collect();
                let want: BTreeSet<(&str, &str)> = labels.iter().copied().collect();
                if got == want {
                    return match family.get_field_type() {
                        MetricType::COUNTER => m.get_counter().get_value(),
                        MetricType::GAUGE => m.get_gauge().get_value(),
                        MetricType::HISTOGRAM => m.get_histogram().get_sample_count() as f64,
                        other => panic!("{name}: unexpected type {other:?}"),
                    };
                }
            }
        }
        0.0
    }
}

fn is_join_code(s: &str) -> bool {
    let b = s.as_bytes();
    b.len() == 12
        && b[3] == b'-'
        && b[8] == b'-'
        && b.iter()
            .enumerate()
            .all(|(i, c)| i == 3 || i == 8 || ALPHABET.contains(c))
}

/// A code of the right shape that (with overwhelming likelihood) opens nothing.
const UNKNOWN_CODE: &str = "BCD-FGHJ-KLM";

// ---------------------------------------------------------------------------------------------
// Happy paths
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn walkthrough_admin_app_call_token_join_credentials_end() {
    let api = api();

    // Admin: an app (key shown once), the listing (never keys), a second key.
    let r = api
        .admin(
            "POST",
            "/v1/apps",
            Some(json!({ "name": "Acme", "id": "acme" })),
        )
        .await;
    let v = r.ok(StatusCode::CREATED);
    assert_eq!(v["id"], "acme");
    assert_eq!(v["name"], "Acme");
    assert_eq!(v["disabled"], false);
    assert_eq!(v["created_at"], "2023-11-14T22:13:20Z");
    let key = v["key"].as_str().unwrap().to_owned();
    assert!(key.starts_with("tpk_"), "{key}");

    let r = api.admin("GET", "/v1/apps", None).await;
    let apps = r.ok(StatusCode::OK)["apps"].as_array().unwrap().clone();
    assert_eq!(apps.len(), 1);
    assert_eq!(
        apps[0],
        json!({"id": "acme", "name": "Acme", "disabled": false, "from_config": false,
               "created_at": "2023-11-14T22:13:20Z"})
    );
    assert!(
        !r.bytes.windows(4).any(|w| w == b"tpk_"),
        "keys never listed"
    );

    let r = api.admin("POST", "/v1/apps/acme/keys", None).await;
    let v = r.ok(StatusCode::CREATED);
    assert_eq!(v["app_id"], "acme");
    let key2 = v["key"].as_str().unwrap().to_owned();
    assert!(key2.starts_with("tpk_") && key2 != key);

    // App: a call, with either key.
    let call = api
        .new_call(
            &key2,
            json!({ "name": "Standup", "max_participants": 4, "ttl": 3600,
                    "metadata": { "team": "core", "n": [1, 2] } }),
        )
        .await;
    let call_id = call["id"].as_str().unwrap().to_owned();
    assert!(call_id.starts_with("c_"));
    assert_eq!(call["name"], "Standup");
    assert_eq!(call["max_participants"], 4);
    assert_eq!(call["expires_at"], "2023-11-14T23:13:20Z");
    let code = call["join_code"].as_str().unwrap().to_owned();
    assert!(is_join_code(&code), "{code}");
    assert_eq!(call["join_url"], format!("{PUBLIC_URL}/join/{code}"));

    let r = api
        .call("GET", &format!("/v1/calls/{call_id}"), Some(&key), None)
        .await;
    let v = r.ok(StatusCode::OK);
    assert_eq!(v["state"], "waiting");
    assert_eq!(v["metadata"], json!({ "team": "core", "n": [1, 2] }));
    assert_eq!(v["participants"], json!([]));
    assert_eq!(v["ended_at"], Value::Null);

    // A host token, redeemed by join.
    let r = api
        .call(
            "POST",
            &format!("/v1/calls/{call_id}/tokens"),
            Some(&key),
            Some(json!({ "role": "host", "user_id": "u-42", "name": "Grace" })),
        )
        .await;
    let v = r.ok(StatusCode::CREATED);
    let token = v["token"].as_str().unwrap().to_owned();
    assert!(token.starts_with("tpt_"));
    assert_eq!(v["join_url"], format!("{PUBLIC_URL}/join#token={token}"));
    assert_eq!(
        v["expires_at"], "2023-11-14T23:13:20Z",
        "defaults to the call's expiry"
    );

    api.clock.advance(Duration::from_secs(5));
    let r = api
        .join_from(ip(2), json!({ "token": token, "name": "ignored" }))
        .await;
    let host = r.ok(StatusCode::OK).clone();
    assert_eq!(host["call_id"], call_id.as_str());
    assert_eq!(host["role"], "host");
    assert_eq!(host["signal_url"], "wss://turn.example.com/v1/signal");
    assert_eq!(host["expires_at"], "2023-11-14T23:13:20Z");

    // A guest by code.
    let r = api.join_code(ip(3), &code).await;
    let guest = r.ok(StatusCode::OK).clone();
    assert_eq!(guest["role"], "guest");
    assert!(guest["peer_id"].as_str().unwrap().starts_with("p_"));
    assert_ne!(guest["peer_id"], host["peer_id"]);

    let r = api
        .call("GET", &format!("/v1/calls/{call_id}"), Some(&key), None)
        .await;
    let v = r.ok(StatusCode::OK);
    assert_eq!(v["state"], "active");
    let ps = v["participants"].as_array().unwrap();
    assert_eq!(ps.len(), 2);
    assert_eq!(ps[0]["peer_id"], host["peer_id"]);
    assert_eq!(ps[0]["role"], "host");
    assert_eq!(ps[0]["name"], "Grace", "the token's preset name wins");
    assert_eq!(ps[0]["user_id"], "u-42");
    assert_eq!(ps[0]["joined_at"], "2023-11-14T22:13:25Z");
    assert_eq!(ps[0]["left_at"], Value::Null);
    assert_eq!(
        ps[0]["media"],
        json!({ "audio": false, "video": false, "screen": false })
    );
    assert_eq!(ps[1]["name"], "Ada");
    assert_eq!(ps[1]["role"], "guest");
    assert_eq!(ps[1]["user_id"], Value::Null);

    // Bare TURN credentials.
    let r = api
        .call("POST", "/v1/turn/credentials", Some(&key), None)
        .await;
    let v = r.ok(StatusCode::OK);
    assert_eq!(v["expires_at"], "2023-11-14T23:13:25Z");
    assert_eq!(v["ice_servers"].as_array().unwrap().len(), 2);

    // List.
    let r = api.call("GET", "/v1/calls", Some(&key), None).await;
    let v = r.ok(StatusCode::OK);
    assert_eq!(v["calls"].as_array().unwrap().len(), 1);
    assert_eq!(v["calls"][0]["id"], call_id.as_str());
    assert_eq!(v["next_cursor"], Value::Null);

    // End: revoked, and the code stops working.
    let r = api
        .call(
            "POST",
            &format!("/v1/calls/{call_id}/end"),
            Some(&key),
            None,
        )
        .await;
    let v = r.ok(StatusCode::OK);
    assert_eq!(v["state"], "ended");
    assert_eq!(v["end_reason"], "api");
    assert_eq!(v["ended_at"], "2023-11-14T22:13:25Z");
    assert_eq!(api.revoker.0.lock().unwrap().len(), 1);

    let r = api.join_code(ip(4), &code).await;
    r.error(StatusCode::NOT_FOUND, "invalid_or_expired");
}

#[tokio::test]
async fn join_by_code_reads_any_case_dashes_and_spaces() {
    let api = api();
    let (_, key) = api.new_app("A").await;
    let call = api.new_call(&key, json!({ "max_participants": 32 })).await;
    let code = call["join_code"].as_str().unwrap().to_owned();
    let letters: String = code.chars().filter(|c| *c != '-').collect();
    let forms = [
        code.clone(),
        code.to_lowercase(),
        letters.clone(),
        letters.to_lowercase(),
        format!(
            "-{}-",
            letters.chars().map(|c| format!("{c}-")).collect::<String>()
        ),
        format!("  {}  ", letters),
        format!("{} {} {}", &letters[..3], &letters[3..7], &letters[7..]),
        format!("{}{}", &letters[..5].to_lowercase(), &letters[5..]),
    ];
    for (i, form) in forms.iter().enumerate() {
        let r = api.join_code(ip(10 + i as u32), form).await;
        assert_eq!(r.status, StatusCode::OK, "{form:?}: {r:?}");
        assert_eq!(r.json["call_id"], call["id"]);
    }
}

#[tokio::test]
async fn signal_token_verifies_and_turn_password_is_the_relays() {
    let api = api();
    let (_, key) = api.new_app("A").await;
    let call = api.new_call(&key, json!({ "ttl": 7200 })).await;
    let call_id = call["id"].as_str().unwrap();
    let r = api
        .join_code(ip(2), call["join_code"].as_str().unwrap())
        .await;
    let v = r.ok(StatusCode::OK).clone();

    // The signaling JWT, checked the way signaling will.
    let now_s = T0 / 1000;
    let claims = jwt_keys()
        .verify(v["signal_token"].as_str().unwrap(), PUBLIC_URL, now_s, 0)
        .unwrap();
    assert_eq!(claims.iss, PUBLIC_URL);
    assert_eq!(claims.aud, AUDIENCE);
    assert_eq!(claims.sub, v["peer_id"].as_str().unwrap());
    assert_eq!(claims.call, call_id);
    assert_eq!(claims.role, control::store::Role::Guest);
    assert_eq!(claims.name, "Ada");
    assert_eq!((claims.iat, claims.nbf), (now_s, now_s));
    assert_eq!(claims.exp, now_s + TOKEN_TTL.as_secs());
    assert!(claims.jti.starts_with("j_"));
    // Another issuer's view: refused.
    assert!(jwt_keys()
        .verify(
            v["signal_token"].as_str().unwrap(),
            "https://other",
            now_s,
            0
        )
        .is_err());

    // iceServers: a STUN entry without credentials, a TURN entry with them.
    let servers = v["ice_servers"].as_array().unwrap();
    assert_eq!(servers.len(), 2);
    assert_eq!(
        servers[0],
        json!({ "urls": ["stun:turn.example.com:3478"] })
    );
    assert_eq!(servers[1]["urls"].as_array().unwrap().len(), 2);
    let username = servers[1]["username"].as_str().unwrap();
    let password = servers[1]["credential"].as_str().unwrap();
    // The relay's check: parse the REST username, recompute the password under its secret.
    let parsed = relay_proto::auth::parse_rest_username(username.as_bytes()).unwrap();
    assert_eq!(parsed.expiry, now_s + CRED_TTL_S);
    assert_eq!(relay_proto::rest_password(RELAY_SECRET, username), password);
    assert_ne!(
        relay_proto::rest_password(b"another secret", username),
        password
    );
    // The groups the relay revokes by: the call's, and this participant's within it.
    let stored = api.stored_call(call_id).await;
    let peer_id = v["peer_id"].as_str().unwrap();
    assert_eq!(
        relay_proto::auth::rest_group(username.as_bytes()),
        Some(stored.cred_group.as_str())
    );
    let user = username.split_once(':').unwrap().1;
    let parts: Vec<&str> = user.split('.').collect();
    assert_eq!(parts.len(), 3, "{user}");
    assert_eq!(parts[0], stored.cred_group);
    assert_eq!(parts[1], peer_id);
    assert!(!parts[2].is_empty());
    let groups: Vec<&str> = relay_proto::auth::rest_groups(username.as_bytes()).collect();
    let peer_group = format!("{}.{peer_id}", stored.cred_group);
    assert_eq!(
        groups,
        vec![stored.cred_group.as_str(), peer_group.as_str()]
    );
    // The stored participant carries the token's jti (signaling accepts only that token).
    assert_eq!(stored.participants[0].peer_id, peer_id);
    assert_eq!(stored.participants[0].jti, claims.jti);
    assert!(!stored.participants[0].kicked);
    assert_eq!(v["ice_servers_expire_at"], "2023-11-14T23:13:20Z");

    // Near the call's end the credentials stop with the call (at least a minute, though).
    api.clock.advance(Duration::from_secs(7200 - 600));
    let r = api
        .join_code(ip(3), call["join_code"].as_str().unwrap())
        .await;
    let v = r.ok(StatusCode::OK);
    let username = v["ice_servers"][1]["username"].as_str().unwrap();
    let parsed = relay_proto::auth::parse_rest_username(username.as_bytes()).unwrap();
    assert_eq!(parsed.expiry, T0 / 1000 + 7200);
    assert_eq!(v["ice_servers_expire_at"], v["expires_at"]);
}

#[tokio::test]
async fn ending_a_call_revokes_its_credential_group() {
    let api = api();
    let (_, key) = api.new_app("A").await;
    let call = api.new_call(&key, json!({})).await;
    let id = call["id"].as_str().unwrap();
    api.clock.advance(Duration::from_secs(100));
    let r = api
        .call("POST", &format!("/v1/calls/{id}/end"), Some(&key), None)
        .await;
    r.ok(StatusCode::OK);
    let group = api.stored_call(id).await.cred_group;
    let revoked = api.revoker.0.lock().unwrap().clone();
    assert_eq!(revoked, vec![(group.clone(), T0 / 1000 + 100 + CRED_TTL_S)]);
    let ended = Event::Ended {
        call: id.to_owned(),
        reason: "api".to_owned(),
    };
    assert_eq!(*api.events.0.lock().unwrap(), vec![ended.clone()]);
    // Ending again revokes again (re-arming a restarted relay) but signaling heard it once.
    api.clock.advance(Duration::from_secs(1));
    let r = api
        .call("POST", &format!("/v1/calls/{id}/end"), Some(&key), None)
        .await;
    assert_eq!(r.ok(StatusCode::OK)["ended_at"], "2023-11-14T22:15:00Z");
    assert_eq!(api.revoker.0.lock().unwrap().len(), 2);
    assert_eq!(*api.events.0.lock().unwrap(), vec![ended]);
    // A call that merely expired is not "ended now" by an end request either.
    let short = api.new_call(&key, json!({ "ttl": 60 })).await;
    let short_id = short["id"].as_str().unwrap();
    api.clock.advance(Duration::from_secs(60));
    let r = api
        .call(
            "POST",
            &format!("/v1/calls/{short_id}/end"),
            Some(&key),
            None,
        )
        .await;
    assert_eq!(r.ok(StatusCode::OK)["state"], "ended");
    assert_eq!(api.events.0.lock().unwrap().len(), 1);
    // Tokens for an ended call are refused.
    let r = api
        .call(
            "POST",
            &format!("/v1/calls/{id}/tokens"),
            Some(&key),
            Some(json!({ "role": "guest" })),
        )
        .await;
    r.error(StatusCode::CONFLICT, "call_ended");
}

#[tokio::test]
async fn kicking_a_participant_frees_the_seat_and_revokes_only_theirs() {
    let api = api();
    let (_, key) = api.new_app("A").await;
    let call = api.new_call(&key, json!({ "max_participants": 2 })).await;
    let id = call["id"].as_str().unwrap().to_owned();
    let code = call["join_code"].as_str().unwrap().to_owned();
    let a = api.join_code(ip(2), &code).await.ok(StatusCode::OK).clone();
    let b = api.join_code(ip(3), &code).await.ok(StatusCode::OK).clone();
    let (peer_a, peer_b) = (
        a["peer_id"].as_str().unwrap().to_owned(),
        b["peer_id"].as_str().unwrap().to_owned(),
    );
    api.join_code(ip(4), &code)
        .await
        .error(StatusCode::CONFLICT, "call_full");
    let group = api.stored_call(&id).await.cred_group;

    api.clock.advance(Duration::from_secs(10));
    let kick = format!("/v1/calls/{id}/participants/{peer_a}");
    api.store.take_ops();
    let r = api.call("DELETE", &kick, Some(&key), None).await;
    assert_eq!(r.status, StatusCode::NO_CONTENT, "{r:?}");
    assert!(r.bytes.is_empty());
    assert_eq!(
        api.store.take_ops(),
        vec!["app_for_key", "get_call", "kick"]
    );
    // Only this participant's credentials: `CALLGROUP.PEERID`, until every one of them expired.
    let until = T0 / 1000 + 10 + CRED_TTL_S;
    assert_eq!(
        *api.revoker.0.lock().unwrap(),
        vec![(format!("{group}.{peer_a}"), until)]
    );
    assert_eq!(
        *api.events.0.lock().unwrap(),
        vec![Event::Kicked {
            call: id.clone(),
            peer: peer_a.clone(),
        }]
    );

    // The call shows it; the other participant is untouched.
    let r = api
        .call("GET", &format!("/v1/calls/{id}"), Some(&key), None)
        .await;
    let v = r.ok(StatusCode::OK);
    assert_eq!(v["state"], "active");
    let ps = v["participants"].as_array().unwrap();
    assert_eq!(ps[0]["peer_id"], peer_a.as_str());
    assert_eq!(ps[0]["kicked"], true);
    assert_eq!(ps[0]["left_at"], "2023-11-14T22:13:30Z");
    assert_eq!(ps[1]["peer_id"], peer_b.as_str());
    assert_eq!(ps[1]["kicked"], false);
    assert_eq!(ps[1]["left_at"], Value::Null);
    assert_eq!(ps[1]["quality"], Value::Null);

    // The seat is free.
    api.join_code(ip(4), &code).await.ok(StatusCode::OK);

    // Kicking again: 204 again, nothing changes (the kick's time stays), and the revocation and
    // the notice are repeated (finishing what a crash after the store write may have left).
    api.clock.advance(Duration::from_secs(5));
    let r = api.call("DELETE", &kick, Some(&key), None).await;
    assert_eq!(r.status, StatusCode::NO_CONTENT, "{r:?}");
    let stored = api.stored_call(&id).await;
    assert_eq!(stored.participants[0].left_at, Some(T0 + 10_000));
    assert!(stored.participants[0].kicked);
    assert_eq!(api.revoker.0.lock().unwrap().len(), 2);
    assert_eq!(api.events.0.lock().unwrap().len(), 2);

    // Unknown peers and calls: 404, nothing revoked or told.
    for path in [
        format!("/v1/calls/{id}/participants/p_unknown"),
        format!("/v1/calls/c_unknown/participants/{peer_b}"),
    ] {
        api.call("DELETE", &path, Some(&key), None)
            .await
            .error(StatusCode::NOT_FOUND, "not_found");
    }
    assert_eq!(api.revoker.0.lock().unwrap().len(), 2);
    assert_eq!(api.events.0.lock().unwrap().len(), 2);

    // Ended: signaling hears of the end; kicking is 409.
    let r = api
        .call("POST", &format!("/v1/calls/{id}/end"), Some(&key), None)
        .await;
    r.ok(StatusCode::OK);
    assert_eq!(
        api.events.0.lock().unwrap().last(),
        Some(&Event::Ended {
            call: id.clone(),
            reason: "api".to_owned(),
        })
    );
    let r = api
        .call(
            "DELETE",
            &format!("/v1/calls/{id}/participants/{peer_b}"),
            Some(&key),
            None,
        )
        .await;
    r.error(StatusCode::CONFLICT, "call_ended");
    assert!(!api.stored_call(&id).await.participants[1].kicked);
    assert_eq!(api.events.0.lock().unwrap().len(), 3);

    // Expired is ended too.
    let short = api.new_call(&key, json!({ "ttl": 60 })).await;
    let short_id = short["id"].as_str().unwrap();
    let j = api
        .join_code(ip(5), short["join_code"].as_str().unwrap())
        .await;
    let peer = j.ok(StatusCode::OK)["peer_id"].as_str().unwrap().to_owned();
    api.clock.advance(Duration::from_secs(60));
    api.call(
        "DELETE",
        &format!("/v1/calls/{short_id}/participants/{peer}"),
        Some(&key),
        None,
    )
    .await
    .error(StatusCode::CONFLICT, "call_ended");
}

/// A join whose client never reaches signaling (a closed tab, a crash, a preview) holds its
/// seat only while its signaling token could still authenticate, not for the whole call; a
/// participant that connected keeps its seat.
#[tokio::test]
async fn a_join_that_never_connects_frees_its_seat_once_its_token_is_refused() {
    let api = api();
    let (_, key) = api.new_app("A").await;
    let call = api.new_call(&key, json!({ "max_participants": 2 })).await;
    let id = call["id"].as_str().unwrap().to_owned();
    let code = call["join_code"].as_str().unwrap().to_owned();
    let a = api.join_code(ip(2), &code).await.ok(StatusCode::OK).clone();
    api.clock.advance(Duration::from_secs(1));
    let b = api.join_code(ip(3), &code).await.ok(StatusCode::OK).clone();
    api.join_code(ip(4), &code)
        .await
        .error(StatusCode::CONFLICT, "call_full");

    // a's seat is held exactly while signaling would still accept a's token.
    let token_a = a["signal_token"].as_str().unwrap();
    let exp = jwt_keys()
        .verify(token_a, PUBLIC_URL, T0 / 1000, 0)
        .unwrap()
        .exp;
    assert_eq!(exp, T0 / 1000 + TOKEN_TTL.as_secs());
    let seat_until = (exp + LEEWAY_S + 1) * 1000;
    let verify_at = |ms: Millis| jwt_keys().verify(token_a, PUBLIC_URL, ms / 1000, LEEWAY_S);
    api.clock.set(seat_until - 1);
    assert!(verify_at(seat_until - 1).is_ok());
    api.join_code(ip(4), &code)
        .await
        .error(StatusCode::CONFLICT, "call_full");
    api.clock.set(seat_until);
    assert_eq!(verify_at(seat_until), Err(JwtError::Expired));
    let c = api.join_code(ip(4), &code).await.ok(StatusCode::OK).clone();
    // b (a second younger) still holds its seat: full again.
    api.join_code(ip(5), &code)
        .await
        .error(StatusCode::CONFLICT, "call_full");

    // The call shows a gone since its seat lapsed, b and c waiting for signaling.
    let view = |v: &Value| v["participants"].as_array().unwrap().clone();
    let r = api
        .call("GET", &format!("/v1/calls/{id}"), Some(&key), None)
        .await;
    let ps = view(r.ok(StatusCode::OK));
    assert_eq!(ps.len(), 3);
    assert_eq!(ps[0]["peer_id"], a["peer_id"]);
    assert_eq!(ps[0]["connected"], false);
    assert_eq!(ps[0]["left_at"], "2023-11-14T22:23:51Z");
    assert_eq!(ps[0]["kicked"], false);
    for p in &ps[1..] {
        assert_eq!(p["connected"], false);
        assert_eq!(p["left_at"], Value::Null);
    }

    // Signaling authenticates c (what it does on the first `auth`); b never connects. Long
    // after both tokens are refused, c keeps its seat and b's is free.
    let peer_c = c["peer_id"].as_str().unwrap();
    let marked = api
        .store
        .inner
        .mark_connected(&id, peer_c, seat_until + 5_000)
        .await
        .unwrap()
        .unwrap();
    assert!(marked.connected);
    api.clock.advance(TOKEN_TTL * 2);
    let d = api.join_code(ip(5), &code).await.ok(StatusCode::OK).clone();
    api.join_code(ip(6), &code)
        .await
        .error(StatusCode::CONFLICT, "call_full");
    let r = api
        .call("GET", &format!("/v1/calls/{id}"), Some(&key), None)
        .await;
    let ps = view(r.ok(StatusCode::OK));
    assert_eq!(ps[1]["peer_id"], b["peer_id"]);
    assert_eq!(ps[1]["left_at"], "2023-11-14T22:23:52Z");
    assert_eq!(ps[2]["peer_id"], peer_c);
    assert_eq!(ps[2]["connected"], true);
    assert_eq!(ps[2]["left_at"], Value::Null);
    assert_eq!(ps[3]["peer_id"], d["peer_id"]);
    assert_eq!(ps[3]["left_at"], Value::Null);
}

#[tokio::test]
async fn participants_show_signalings_quality_summary() {
    let api = api();
    let (_, key) = api.new_app("A").await;
    let call = api.new_call(&key, json!({})).await;
    let id = call["id"].as_str().unwrap();
    let j = api
        .join_code(ip(2), call["join_code"].as_str().unwrap())
        .await;
    let peer = j.ok(StatusCode::OK)["peer_id"].as_str().unwrap().to_owned();
    let quality = Quality {
        rtt_ms: 42.5,
        jitter_ms: 3.25,
        packet_loss: 0.01,
        bitrate_kbps: Some(850.0),
        mos: 4.3,
        candidate_type: "relay".to_owned(),
        relay_protocol: "udp".to_owned(),
        reports: 7,
        updated_at: T0 + 2_500,
    };
    // What signaling does.
    assert!(api
        .store
        .inner
        .set_quality(id, &peer, &quality)
        .await
        .unwrap());
    let media = Media {
        audio: true,
        video: true,
        screen: false,
    };
    assert!(api.store.inner.set_media(id, &peer, media).await.unwrap());
    let r = api
        .call("GET", &format!("/v1/calls/{id}"), Some(&key), None)
        .await;
    let p = &r.ok(StatusCode::OK)["participants"][0];
    assert_eq!(
        p["quality"],
        json!({
            "rtt_ms": 42.5, "jitter_ms": 3.25, "packet_loss": 0.01, "bitrate_kbps": 850.0,
            "mos": 4.3, "candidate_type": "relay", "relay_protocol": "udp", "reports": 7,
            "updated_at": "2023-11-14T22:13:22Z"
        })
    );
    assert_eq!(
        p["media"],
        json!({ "audio": true, "video": true, "screen": false })
    );
    assert_eq!(p["kicked"], false);
    // The listing shows the same.
    let r = api.call("GET", "/v1/calls", Some(&key), None).await;
    assert_eq!(
        r.ok(StatusCode::OK)["calls"][0]["participants"][0]["quality"],
        p["quality"]
    );
}

#[tokio::test]
async fn calls_default_and_validate_their_fields() {
    let api = api();
    let (_, key) = api.new_app("A").await;
    // No body at all: every default.
    let r = api.call("POST", "/v1/calls", Some(&key), None).await;
    let v = r.ok(StatusCode::CREATED);
    assert_eq!(v["max_participants"], 8);
    assert_eq!(v["expires_at"], "2023-11-15T02:13:20Z", "4 hours");
    assert_eq!(v["name"], Value::Null);
    let stored = api.stored_call(v["id"].as_str().unwrap()).await;
    assert!(stored.cred_group.starts_with('g'));

    for (body, field) in [
        (json!({ "max_participants": 0 }), "max_participants"),
        (json!({ "max_participants": 33 }), "max_participants"),
        (json!({ "max_participants": -1 }), "max_participants"),
        (json!({ "ttl": 59 }), "ttl"),
        (json!({ "ttl": 86_401 }), "ttl"),
        (json!({ "ttl": "long" }), "ttl"),
        (json!({ "metadata": [1, 2] }), "metadata"),
        (json!({ "name": "" }), "name"),
        (json!({ "name": "a\u{7}b" }), "name"),
        (json!({ "name": "x".repeat(129) }), "name"),
        (json!({ "colour": "blue" }), "colour"),
    ] {
        let r = api
            .call("POST", "/v1/calls", Some(&key), Some(body.clone()))
            .await;
        let message = r.error(StatusCode::UNPROCESSABLE_ENTITY, "invalid_request");
        assert!(message.contains(field), "{body}: {message}");
    }
    for (body, want) in [
        (json!({ "max_participants": 1, "ttl": 60 }), (1, 60)),
        (
            json!({ "max_participants": 32, "ttl": 86_400 }),
            (32, 86_400),
        ),
    ] {
        let v = api.new_call(&key, body).await;
        let stored = api.stored_call(v["id"].as_str().unwrap()).await;
        assert_eq!(
            (
                stored.max_participants,
                (stored.expires_at - stored.created_at) / 1000
            ),
            want
        );
    }
}

#[tokio::test]
async fn listing_pages_newest_first_and_filters_by_state() {
    let api = api();
    let (_, key) = api.new_app("A").await;
    let (_, other_key) = api.new_app("B").await;
    api.new_call(&other_key, json!({})).await;
    let mut ids = Vec::new();
    for _ in 0..5 {
        api.clock.advance(Duration::from_secs(1));
        ids.push(
            api.new_call(&key, json!({})).await["id"]
                .as_str()
                .unwrap()
                .to_owned(),
        );
    }
    ids.reverse();

    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    let mut pages = 0;
    loop {
        let uri = match &cursor {
            Some(c) => format!("/v1/calls?limit=2&cursor={c}"),
            None => "/v1/calls?limit=2".to_owned(),
        };
        let r = api.call("GET", &uri, Some(&key), None).await;
        let v = r.ok(StatusCode::OK);
        pages += 1;
        let calls = v["calls"].as_array().unwrap();
        assert!(calls.len() <= 2);
        seen.extend(calls.iter().map(|c| c["id"].as_str().unwrap().to_owned()));
        match v["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_owned()),
            None => break,
        }
        assert!(pages < 10, "pagination does not end");
    }
    assert_eq!(
        seen, ids,
        "every call once, newest first, none of the other app's"
    );

    // By state: one active, one ended, three waiting.
    let r = api
        .call(
            "POST",
            &format!("/v1/calls/{}/end", ids[0]),
            Some(&key),
            None,
        )
        .await;
    r.ok(StatusCode::OK);
    let grant = api
        .call(
            "POST",
            &format!("/v1/calls/{}/tokens", ids[1]),
            Some(&key),
            Some(json!({ "role": "guest" })),
        )
        .await;
    let token = grant.json["token"].as_str().unwrap().to_owned();
    api.join_from(ip(5), json!({ "token": token, "name": "Ada" }))
        .await
        .ok(StatusCode::OK);
    for (state, want) in [
        ("ended", vec![ids[0].clone()]),
        ("active", vec![ids[1].clone()]),
        ("waiting", ids[2..].to_vec()),
    ] {
        let r = api
            .call("GET", &format!("/v1/calls?state={state}"), Some(&key), None)
            .await;
        let got: Vec<String> = r.ok(StatusCode::OK)["calls"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| {
                assert_eq!(c["state"], state);
                c["id"].as_str().unwrap().to_owned()
            })
            .collect();
        assert_eq!(got, want, "{state}");
    }

    // Bad queries and cursors.
    for uri in [
        "/v1/calls?limit=0",
        "/v1/calls?limit=101",
        "/v1/calls?limit=ten",
        "/v1/calls?state=sleeping",
        "/v1/calls?cursor=not-base64!",
        "/v1/calls?cursor=bm90IGpzb24", // base64url of "not json"
    ] {
        let r = api.call("GET", uri, Some(&key), None).await;
        r.error(StatusCode::BAD_REQUEST, "bad_request");
    }
    let r = api
        .call("GET", "/v1/calls?limit=100", Some(&key), None)
        .await;
    r.ok(StatusCode::OK);
}

#[tokio::test]
async fn turn_credentials_endpoint() {
    let api = api();
    let (_, key) = api.new_app("A").await;
    let r = api
        .call(
            "POST",
            "/v1/turn/credentials",
            Some(&key),
            Some(json!({ "ttl": 120 })),
        )
        .await;
    let v = r.ok(StatusCode::OK);
    assert_eq!(v["expires_at"], "2023-11-14T22:15:20Z");
    let username = v["ice_servers"][1]["username"].as_str().unwrap();
    let parsed = relay_proto::auth::parse_rest_username(username.as_bytes()).unwrap();
    assert_eq!(parsed.expiry, T0 / 1000 + 120);
    assert_eq!(
        relay_proto::rest_password(RELAY_SECRET, username),
        v["ice_servers"][1]["credential"].as_str().unwrap()
    );
    assert!(relay_proto::auth::rest_group(username.as_bytes()).is_some());
    for ttl in [0, 59, 86_401] {
        let r = api
            .call(
                "POST",
                "/v1/turn/credentials",
                Some(&key),
                Some(json!({ "ttl": ttl })),
            )
            .await;
        let m = r.error(StatusCode::UNPROCESSABLE_ENTITY, "invalid_request");
        assert!(m.contains("ttl"), "{m}");
    }
}

// ---------------------------------------------------------------------------------------------
// Authentication
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn admin_routes_need_the_admin_token() {
    let api = api();
    let routes = [
        ("POST", "/v1/apps", Some(json!({ "name": "x" }))),
        ("GET", "/v1/apps", None),
        ("POST", "/v1/apps/acme/keys", None),
        ("PATCH", "/v1/apps/acme", Some(json!({ "disabled": true }))),
    ];
    for (method, uri, body) in &routes {
        for auth in [None, Some("wrong"), Some(&ADMIN[1..]), Some("tpk_x")] {
            let r = api.call(method, uri, auth, body.clone()).await;
            r.error(StatusCode::UNAUTHORIZED, "unauthorized");
            assert_eq!(r.headers[header::WWW_AUTHENTICATE], "Bearer");
        }
        // Another scheme with the right token: still refused.
        let mut req = request(method, uri, None, body.as_ref());
        req.headers_mut().insert(
            header::AUTHORIZATION,
            format!("Basic {ADMIN}").parse().unwrap(),
        );
        api.send(req)
            .await
            .error(StatusCode::UNAUTHORIZED, "unauthorized");
    }
    // The scheme is case-insensitive.
    let mut req = request("GET", "/v1/apps", None, None);
    req.headers_mut().insert(
        header::AUTHORIZATION,
        format!("bearer {ADMIN}").parse().unwrap(),
    );
    api.send(req).await.ok(StatusCode::OK);

    // No admin token configured: the admin API does not exist, whatever the method.
    let hidden = api_with(|s| s.admin_token = None);
    for (method, uri, body) in &routes {
        for auth in [None, Some(ADMIN)] {
            let r = hidden.call(method, uri, auth, body.clone()).await;
            r.error(StatusCode::NOT_FOUND, "not_found");
        }
    }
    // Byte for byte an unknown path, with no `Allow` header to give the route away.
    let absent = hidden.call("GET", "/v1/nothing-here", None, None).await;
    for method in ["DELETE", "PUT", "GET", "POST"] {
        let r = hidden.call(method, "/v1/apps", Some(ADMIN), None).await;
        r.error(StatusCode::NOT_FOUND, "not_found");
        assert_eq!(r.bytes, absent.bytes);
        assert!(!r.headers.contains_key(header::ALLOW), "{method}: {r:?}");
    }
    assert!(hidden.store.take_ops().is_empty());
}

#[tokio::test]
async fn app_creation_conflicts_and_validation() {
    let api = api();
    api.admin(
        "POST",
        "/v1/apps",
        Some(json!({ "name": "A", "id": "acme" })),
    )
    .await
    .ok(StatusCode::CREATED);
    let r = api
        .admin(
            "POST",
            "/v1/apps",
            Some(json!({ "name": "B", "id": "acme" })),
        )
        .await;
    r.error(StatusCode::CONFLICT, "conflict");
    let (generated, _) = api.new_app("C").await;
    assert!(generated.starts_with("app_"), "{generated}");
    for body in [
        json!({ "name": "" }),
        json!({ "name": "x", "id": "has space" }),
        json!({ "name": "x", "id": "" }),
        json!({ "name": "x", "id": "x".repeat(65) }),
        json!({ "name": "x", "secret": true }),
        json!({ "id": "nameless" }),
    ] {
        let r = api.admin("POST", "/v1/apps", Some(body.clone())).await;
        r.error(StatusCode::UNPROCESSABLE_ENTITY, "invalid_request");
    }
    let r = api.admin("POST", "/v1/apps/nope/keys", None).await;
    r.error(StatusCode::NOT_FOUND, "not_found");
    let r = api
        .admin("PATCH", "/v1/apps/nope", Some(json!({ "disabled": true })))
        .await;
    r.error(StatusCode::NOT_FOUND, "not_found");
    let r = api
        .admin("PATCH", "/v1/apps/acme", Some(json!({ "disabled": "yes" })))
        .await;
    r.error(StatusCode::UNPROCESSABLE_ENTITY, "invalid_request");
}

#[tokio::test]
async fn forged_other_app_and_disabled_keys() {
    let api = api();
    let (a_id, a_key) = api.new_app("A").await;
    let (_, b_key) = api.new_app("B").await;
    let call = api.new_call(&a_key, json!({})).await;
    let id = call["id"].as_str().unwrap();
    let code = call["join_code"].as_str().unwrap().to_owned();
    let joined = api.join_code(ip(6), &code).await;
    let peer = joined.ok(StatusCode::OK)["peer_id"]
        .as_str()
        .unwrap()
        .to_owned();

    // Unknown keys: 401.
    let forged = format!("tpk_{}", "A".repeat(32));
    for key in [forged.as_str(), "tpt_x", "", "garbage"] {
        let r = api.call("GET", "/v1/calls", Some(key), None).await;
        r.error(StatusCode::UNAUTHORIZED, "unauthorized");
    }
    let r = api.call("GET", "/v1/calls", None, None).await;
    r.error(StatusCode::UNAUTHORIZED, "unauthorized");
    assert_eq!(r.headers[header::WWW_AUTHENTICATE], "Bearer");
    // The admin token is not an app key.
    let r = api.call("GET", "/v1/calls", Some(ADMIN), None).await;
    r.error(StatusCode::UNAUTHORIZED, "unauthorized");

    // Another app's call is exactly as absent as a nonexistent one.
    for (method, path, body) in [
        ("GET", format!("/v1/calls/{id}"), None),
        ("POST", format!("/v1/calls/{id}/end"), None),
        (
            "POST",
            format!("/v1/calls/{id}/tokens"),
            Some(json!({ "role": "guest" })),
        ),
        (
            "DELETE",
            format!("/v1/calls/{id}/participants/{peer}"),
            None,
        ),
    ] {
        let theirs = api.call(method, &path, Some(&b_key), body.clone()).await;
        theirs.error(StatusCode::NOT_FOUND, "not_found");
        let missing_path = path.replace(id, "c_doesnotexist0000");
        let missing = api.call(method, &missing_path, Some(&b_key), body).await;
        assert_eq!(theirs.bytes, missing.bytes);
    }
    assert_eq!(
        api.stored_call(id).await.ended_at,
        None,
        "B could not end A's call"
    );
    assert!(
        !api.stored_call(id).await.participants[0].kicked,
        "B could not kick from A's call"
    );
    assert!(api.revoker.0.lock().unwrap().is_empty());
    assert!(api.events.0.lock().unwrap().is_empty());

    // Disabled: 403 for its keys, its calls cannot be joined; enabled again: back.
    let r = api
        .admin(
            "PATCH",
            &format!("/v1/apps/{a_id}"),
            Some(json!({ "disabled": true })),
        )
        .await;
    assert_eq!(r.ok(StatusCode::OK)["disabled"], true);
    let r = api.call("GET", "/v1/calls", Some(&a_key), None).await;
    r.error(StatusCode::FORBIDDEN, "app_disabled");
    let refused = api.join_code(ip(7), &code).await;
    refused.error(StatusCode::NOT_FOUND, "invalid_or_expired");
    let unknown = api.join_code(ip(8), UNKNOWN_CODE).await;
    assert_eq!(refused.bytes, unknown.bytes);
    let r = api
        .admin(
            "PATCH",
            &format!("/v1/apps/{a_id}"),
            Some(json!({ "disabled": false })),
        )
        .await;
    assert_eq!(r.ok(StatusCode::OK)["disabled"], false);
    api.call("GET", "/v1/calls", Some(&a_key), None)
        .await
        .ok(StatusCode::OK);
    api.join_code(ip(9), &code).await.ok(StatusCode::OK);
}

#[tokio::test]
async fn unauthenticated_requests_only_reach_the_key_lookup() {
    let api = api();
    let (_, key) = api.new_app("A").await;
    let call = api.new_call(&key, json!({})).await;
    let id = call["id"].as_str().unwrap();
    let routes = [
        ("POST", "/v1/calls".to_owned(), Some(json!({}))),
        ("GET", "/v1/calls".to_owned(), None),
        ("GET", format!("/v1/calls/{id}"), None),
        ("POST", format!("/v1/calls/{id}/end"), None),
        (
            "POST",
            format!("/v1/calls/{id}/tokens"),
            Some(json!({ "role": "host" })),
        ),
        ("POST", "/v1/turn/credentials".to_owned(), None),
        ("DELETE", format!("/v1/calls/{id}/participants/p_x"), None),
    ];
    let forged = format!("tpk_{}", "B".repeat(32));
    api.store.take_ops();
    for (method, path, body) in &routes {
        // Too short to be any app key: refused without the store.
        for auth in [
            None,
            Some("not-a-key"),
            Some("tpk_x"),
            Some("fifteen-bytes-x"),
        ] {
            let r = api.call(method, path, auth, body.clone()).await;
            r.error(StatusCode::UNAUTHORIZED, "unauthorized");
            assert_eq!(api.store.take_ops(), Vec::<&str>::new(), "{method} {path}");
        }
        // Long enough (a config app's key need not start with `tpk_`): looked up, unknown.
        for auth in [forged.as_str(), ADMIN, "sixteen-bytes-xx"] {
            let r = api.call(method, path, Some(auth), body.clone()).await;
            r.error(StatusCode::UNAUTHORIZED, "unauthorized");
            assert_eq!(api.store.take_ops(), vec!["app_for_key"], "{method} {path}");
        }
    }
    assert_eq!(api.stored_call(id).await.ended_at, None);
}

// ---------------------------------------------------------------------------------------------
// Join refusals and limits
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn every_refused_code_or_token_gets_the_same_404() {
    let api = api();
    let (_, key) = api.new_app("A").await;
    let call = api.new_call(&key, json!({ "ttl": 60 })).await;
    let code = call["join_code"].as_str().unwrap().to_owned();
    let ended = api.new_call(&key, json!({})).await;
    api.call(
        "POST",
        &format!("/v1/calls/{}/end", ended["id"].as_str().unwrap()),
        Some(&key),
        None,
    )
    .await
    .ok(StatusCode::OK);
    let letters: String = code.chars().filter(|c| *c != '-').collect();
    // A valid-looking code one letter off.
    let first = letters.as_bytes()[0];
    let swapped = if first == b'B' { 'C' } else { 'B' };
    let one_off = format!("{swapped}{}", &letters[1..]);

    let wrong: Vec<Value> = vec![
        json!({ "code": UNKNOWN_CODE, "name": "x" }),
        json!({ "code": one_off, "name": "x" }),
        json!({ "code": "AEI-OUAE-IOU", "name": "x" }), // vowels: not in the alphabet
        json!({ "code": "BCD-FGH", "name": "x" }),      // short
        json!({ "code": format!("{letters}B"), "name": "x" }), // long
        json!({ "code": "", "name": "x" }),
        json!({ "code": "1234567890", "name": "x" }),
        json!({ "code": "ÄÖÜ-ÄÖÜÄ-ÄÖÜ", "name": "x" }),
        json!({ "code": "B".repeat(10_000), "name": "x" }),
        json!({ "code": ended["join_code"], "name": "x" }),
        json!({ "token": "tpt_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA", "name": "x" }),
        json!({ "token": "", "name": "x" }),
        json!({ "token": code, "name": "x" }), // a code is not a token
    ];
    let reference = api.join_code(ip(100), UNKNOWN_CODE).await;
    reference.error(StatusCode::NOT_FOUND, "invalid_or_expired");
    for (i, body) in wrong.iter().enumerate() {
        let r = api.join_from(ip(101 + i as u32), body.clone()).await;
        assert_eq!(r.status, StatusCode::NOT_FOUND, "{body}");
        assert_eq!(r.bytes, reference.bytes, "{body}");
        assert_eq!(r.headers.len(), reference.headers.len(), "{body}");
    }

    // Each refusal did the same store work: two rate-limit hits and a read of the failures,
    // one lookup, one failure counted.
    for body in [
        json!({ "code": UNKNOWN_CODE, "name": "x" }),
        json!({ "code": "nonsense", "name": "x" }),
        json!({ "code": ended["join_code"], "name": "x" }),
    ] {
        api.store.take_ops();
        api.join_from(ip(150), body).await;
        assert_eq!(
            api.store.take_ops(),
            vec!["hit", "peek", "hit", "call_for_code", "hit"]
        );
    }

    // Expired: the call's code after its ttl.
    api.join_code(ip(200), &code).await.ok(StatusCode::OK);
    api.clock.advance(Duration::from_secs(61));
    let r = api.join_code(ip(201), &code).await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    assert_eq!(r.bytes, reference.bytes);
}

#[tokio::test]
async fn tokens_are_one_time_and_expire() {
    let api = api();
    let (_, key) = api.new_app("A").await;
    let call = api.new_call(&key, json!({})).await;
    let id = call["id"].as_str().unwrap();
    let token_for = |ttl: Option<u64>| {
        let mut body = json!({ "role": "guest" });
        if let Some(ttl) = ttl {
            body["ttl"] = json!(ttl);
        }
        request(
            "POST",
            &format!("/v1/calls/{id}/tokens"),
            Some(&key),
            Some(&body),
        )
    };
    let once = api.send(token_for(None)).await.json["token"]
        .as_str()
        .unwrap()
        .to_owned();
    let first = api
        .join_from(ip(2), json!({ "token": once, "name": "Ada" }))
        .await;
    first.ok(StatusCode::OK);
    let second = api
        .join_from(ip(3), json!({ "token": once, "name": "Ada" }))
        .await;
    second.error(StatusCode::NOT_FOUND, "invalid_or_expired");
    let unknown = api.join_code(ip(4), UNKNOWN_CODE).await;
    assert_eq!(second.bytes, unknown.bytes);

    let r = api.send(token_for(Some(60))).await;
    assert_eq!(
        r.ok(StatusCode::CREATED)["expires_at"],
        "2023-11-14T22:14:20Z"
    );
    let short = r.json["token"].as_str().unwrap().to_owned();
    api.clock.advance(Duration::from_secs(60));
    let r = api
        .join_from(ip(5), json!({ "token": short, "name": "Ada" }))
        .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    assert_eq!(r.bytes, unknown.bytes);

    for body in [
        json!({ "role": "admin" }),
        json!({}),
        json!({ "role": "guest", "ttl": 30 }),
        json!({ "role": "guest", "name": "" }),
        json!({ "role": "guest", "user_id": "a\nb" }),
        json!({ "role": "guest", "extra": 1 }),
    ] {
        let r = api
            .call(
                "POST",
                &format!("/v1/calls/{id}/tokens"),
                Some(&key),
                Some(body.clone()),
            )
            .await;
        r.error(StatusCode::UNPROCESSABLE_ENTITY, "invalid_request");
    }
}

/// An app from `[[control.apps]]`: its keys are whatever the operator wrote (16 bytes or more,
/// no `tpk_` prefix), and they work like generated ones.
#[tokio::test]
async fn a_config_app_key_without_the_tpk_prefix_authenticates() {
    let api = api();
    let key = "operator-chosen-key-0001";
    let digest = api
        .state
        .settings
        .hash_key
        .digest(control::secrets::Domain::AppKey, key.as_bytes());
    let app = App {
        id: "web".to_owned(),
        name: "Web".to_owned(),
        disabled: false,
        from_config: true,
        created_at: T0,
    };
    assert!(api.store.inner.put_app(&app, &[digest]).await.unwrap());
    let call = api.new_call(key, json!({})).await;
    assert_eq!(
        call["id"].as_str().map(|id| id.starts_with("c_")),
        Some(true),
        "{call}"
    );
    let r = api.call("GET", "/v1/calls", Some(key), None).await;
    assert_eq!(r.ok(StatusCode::OK)["calls"].as_array().unwrap().len(), 1);
}

#[tokio::test]
async fn a_token_refused_for_a_full_call_or_a_store_failure_stays_usable() {
    let api = api();
    let (_, key) = api.new_app("A").await;
    let call = api.new_call(&key, json!({ "max_participants": 1 })).await;
    let id = call["id"].as_str().unwrap().to_owned();
    let code = call["join_code"].as_str().unwrap().to_owned();
    let r = api
        .call(
            "POST",
            &format!("/v1/calls/{id}/tokens"),
            Some(&key),
            Some(json!({ "role": "host" })),
        )
        .await;
    let token = r.ok(StatusCode::CREATED)["token"]
        .as_str()
        .unwrap()
        .to_owned();
    let first = api.join_code(ip(2), &code).await.ok(StatusCode::OK).clone();

    // Full: 409, and the token is still good.
    for n in 0..2 {
        let r = api
            .join_from(ip(3), json!({ "token": token, "name": "Host" }))
            .await;
        r.error(StatusCode::CONFLICT, "call_full");
        assert_eq!(api.stored_call(&id).await.participants.len(), 1, "{n}");
    }

    // A seat frees up; the store fails exactly at the admission: 503, token still good.
    let peer = first["peer_id"].as_str().unwrap();
    let kick = format!("/v1/calls/{id}/participants/{peer}");
    let r = api.call("DELETE", &kick, Some(&key), None).await;
    assert_eq!(r.status, StatusCode::NO_CONTENT, "{r:?}");
    *api.store.fail_on.lock().unwrap() = Some("admit_with_token");
    let r = api
        .join_from(ip(3), json!({ "token": token, "name": "Host" }))
        .await;
    r.error(StatusCode::SERVICE_UNAVAILABLE, "unavailable");
    *api.store.fail_on.lock().unwrap() = None;

    // Now it admits, once.
    let r = api
        .join_from(ip(3), json!({ "token": token, "name": "Host" }))
        .await;
    assert_eq!(r.ok(StatusCode::OK)["role"], "host");
    let r = api
        .join_from(ip(4), json!({ "token": token, "name": "Host" }))
        .await;
    r.error(StatusCode::NOT_FOUND, "invalid_or_expired");
    assert_eq!(api.stored_call(&id).await.participants.len(), 2);
    for (result, n) in [
        ("full", 2.0),
        ("unavailable", 1.0),
        ("ok", 2.0),
        ("invalid", 1.0),
    ] {
        assert_eq!(
            api.metric(
                "turnpike_control_join_attempts_total",
                &[("result", result)]
            ),
            n,
            "{result}"
        );
    }
}

#[tokio::test]
async fn join_requests_are_validated_before_any_secret_is_looked_at() {
    let api = api();
    api.store.take_ops();
    for body in [
        json!({ "name": "Ada" }),
        json!({ "code": UNKNOWN_CODE, "token": "tpt_x", "name": "Ada" }),
        json!({ "code": UNKNOWN_CODE }),
        json!({ "code": UNKNOWN_CODE, "name": "   " }),
        json!({ "code": UNKNOWN_CODE, "name": "x".repeat(65) }),
        json!({ "code": UNKNOWN_CODE, "name": "line\nbreak" }),
        json!({ "code": UNKNOWN_CODE, "name": "Ada", "admin": true }),
        json!({ "code": 42, "name": "Ada" }),
    ] {
        let r = api.join_from(ip(2), body.clone()).await;
        r.error(StatusCode::UNPROCESSABLE_ENTITY, "invalid_request");
    }
    assert!(api.store.take_ops().is_empty());
    // 64 characters (not bytes) is fine.
    let (_, key) = api.new_app("A").await;
    let call = api.new_call(&key, json!({})).await;
    let r = api
        .join_from(
            ip(3),
            json!({ "code": call["join_code"], "name": "ü".repeat(64) }),
        )
        .await;
    r.ok(StatusCode::OK);
}

#[tokio::test]
async fn a_call_admits_32_joins_per_seat_over_its_life() {
    let api = api();
    let (_, key) = api.new_app("A").await;
    let call = api.new_call(&key, json!({ "max_participants": 1 })).await;
    let id = call["id"].as_str().unwrap().to_owned();
    let code = call["join_code"].as_str().unwrap().to_owned();
    for n in 0..control::store::JOINS_PER_SEAT {
        let r = api.join_code(ip(50), &code).await;
        assert_eq!(r.status, StatusCode::OK, "join {n}: {r:?}");
        let peer = r.json["peer_id"].as_str().unwrap().to_owned();
        let left = api
            .store
            .inner
            .set_left(&id, &peer, Some(api.clock.now_ms()));
        assert!(left.await.unwrap());
    }
    // The seat is free; the call's record of joins is not.
    let r = api.join_code(ip(50), &code).await;
    r.error(StatusCode::CONFLICT, "call_join_limit");
    // Counted as a call that could not take anyone.
    assert_eq!(
        api.metric(
            "turnpike_control_join_attempts_total",
            &[("result", "full")]
        ),
        1.0
    );
}

#[tokio::test]
async fn wrong_codes_from_one_address_are_rate_limited() {
    let api = api();
    let (_, key) = api.new_app("A").await;
    let call = api.new_call(&key, json!({})).await;
    let code = call["join_code"].as_str().unwrap().to_owned();
    let attacker = ip(66);
    let mut statuses = Vec::new();
    for i in 0..1000u32 {
        // Different well-formed codes each time (per-code limits play no part).
        let mut n = i;
        let guess: String = (0..10)
            .map(|_| {
                let letter = ALPHABET[(n % 20) as usize] as char;
                n /= 20;
                letter
            })
            .collect();
        let r = api.join_code(attacker, &guess).await;
        if r.status == StatusCode::TOO_MANY_REQUESTS {
            r.error(StatusCode::TOO_MANY_REQUESTS, "rate_limited");
            let retry: u64 = r.headers[header::RETRY_AFTER]
                .to_str()
                .unwrap()
                .parse()
                .unwrap();
            assert!((1..=60).contains(&retry), "{retry}");
        }
        statuses.push(r.status);
    }
    let limit = Limits::default().join_failures_per_ip as usize;
    assert!(statuses[..limit]
        .iter()
        .all(|s| *s == StatusCode::NOT_FOUND));
    assert!(statuses[limit..]
        .iter()
        .all(|s| *s == StatusCode::TOO_MANY_REQUESTS));

    // The right code from that address is refused without being looked at...
    api.store.take_ops();
    let r = api.join_code(attacker, &code).await;
    r.error(StatusCode::TOO_MANY_REQUESTS, "rate_limited");
    assert!(!api.store.take_ops().contains(&"call_for_code"));
    // ...works from elsewhere, and from there again once the window has passed.
    api.join_code(ip(67), &code).await.ok(StatusCode::OK);
    api.clock.advance(Limits::default().window);
    api.join_code(attacker, &code).await.ok(StatusCode::OK);

    assert_eq!(
        api.metric(
            "turnpike_control_join_attempts_total",
            &[("result", "invalid")]
        ),
        limit as f64
    );
    assert_eq!(
        api.metric(
            "turnpike_control_join_attempts_total",
            &[("result", "rate_limited")]
        ),
        (1000 - limit + 1) as f64
    );
}

#[tokio::test]
async fn attempts_per_address_are_limited_even_when_they_succeed() {
    let api = api();
    let (_, key) = api.new_app("A").await;
    let office = ip(30);
    // Full calls of the largest size, one after the other, until the address's limit.
    let mut joined = 0;
    let mut code = String::new();
    while joined < Limits::default().join_per_ip {
        if joined % u64::from(MAX_PARTICIPANTS) == 0 {
            let call = api
                .new_call(&key, json!({ "max_participants": MAX_PARTICIPANTS }))
                .await;
            code = call["join_code"].as_str().unwrap().to_owned();
        }
        api.join_code(office, &code).await.ok(StatusCode::OK);
        joined += 1;
    }
    let call = api.new_call(&key, json!({})).await;
    let r = api
        .join_code(office, call["join_code"].as_str().unwrap())
        .await;
    r.error(StatusCode::TOO_MANY_REQUESTS, "rate_limited");
    assert!(r.headers.contains_key(header::RETRY_AFTER));
}

/// A classroom behind one NAT: the largest call fills from one address, everyone reloads and
/// joins again, all within a minute — 2 × 32 joins with one code pass. The limit per code
/// still stops the next one, and two more such calls still fit under the address's limit.
#[tokio::test]
async fn a_classroom_behind_one_address_fills_the_largest_call_twice_a_minute() {
    let api = api();
    let (_, key) = api.new_app("A").await;
    let seats = MAX_PARTICIPANTS;
    assert_eq!(seats, 32, "the API documents 32 seats at most");
    let call = api
        .new_call(&key, json!({ "max_participants": seats }))
        .await;
    let id = call["id"].as_str().unwrap().to_owned();
    let code = call["join_code"].as_str().unwrap().to_owned();
    let school = ip(40);
    for round in 0..2 {
        let mut peers = Vec::new();
        for n in 0..seats {
            let r = api.join_code(school, &code).await;
            assert_eq!(r.status, StatusCode::OK, "round {round}, join {n}: {r:?}");
            peers.push(r.json["peer_id"].as_str().unwrap().to_owned());
        }
        // Everyone's tab reloads: they leave (as signaling records it) and join again.
        for peer in &peers {
            assert!(api
                .store
                .inner
                .set_left(&id, peer, Some(api.clock.now_ms()))
                .await
                .unwrap());
        }
    }
    // One code, 2 × seats attempts: the next is over the per-code limit (brute-force bound).
    let r = api.join_code(school, &code).await;
    r.error(StatusCode::TOO_MANY_REQUESTS, "rate_limited");
    // The address itself is not exhausted: another call of the school's fills too.
    let other = api
        .new_call(&key, json!({ "max_participants": seats }))
        .await;
    let other = other["join_code"].as_str().unwrap().to_owned();
    for _ in 0..seats {
        api.join_code(school, &other).await.ok(StatusCode::OK);
    }
}

#[tokio::test]
async fn one_code_from_many_addresses_is_rate_limited() {
    let api = api();
    let per_code = Limits::default().join_per_code as u32;
    for n in 0..per_code {
        let r = api.join_code(ip(1000 + n), UNKNOWN_CODE).await;
        r.error(StatusCode::NOT_FOUND, "invalid_or_expired");
    }
    // Written differently, it is the same code.
    let r = api.join_code(ip(5000), &UNKNOWN_CODE.to_lowercase()).await;
    r.error(StatusCode::TOO_MANY_REQUESTS, "rate_limited");
    let retry: u64 = r.headers[header::RETRY_AFTER]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(retry >= 1);
    // Other codes are not affected.
    let r = api.join_code(ip(5001), "ZZZ-ZZZZ-ZZZ").await;
    r.error(StatusCode::NOT_FOUND, "invalid_or_expired");
}

#[tokio::test]
async fn a_full_call_refuses_with_409() {
    let api = api();
    let (_, key) = api.new_app("A").await;
    let call = api.new_call(&key, json!({ "max_participants": 1 })).await;
    let code = call["join_code"].as_str().unwrap().to_owned();
    api.join_code(ip(2), &code).await.ok(StatusCode::OK);
    let r = api.join_code(ip(3), &code).await;
    r.error(StatusCode::CONFLICT, "call_full");
    assert_eq!(
        api.metric(
            "turnpike_control_join_attempts_total",
            &[("result", "full")]
        ),
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_concurrent_joins_for_five_seats() {
    let api = api();
    let (_, key) = api.new_app("A").await;
    let call = api.new_call(&key, json!({ "max_participants": 5 })).await;
    let code = call["join_code"].as_str().unwrap().to_owned();
    // One address for all (MockConnectInfo): 20 attempts are within the per-address limit.
    let app = router(api.state.clone()).layer(MockConnectInfo(ip(9)));
    let barrier = Arc::new(tokio::sync::Barrier::new(20));
    let tasks: Vec<_> = (0..20)
        .map(|_| {
            let app = app.clone();
            let barrier = barrier.clone();
            let body = json!({ "code": code, "name": "Ada" });
            tokio::spawn(async move {
                barrier.wait().await;
                let req = request("POST", "/v1/join", None, Some(&body));
                app.oneshot(req).await.unwrap().status()
            })
        })
        .collect();
    let mut ok = 0;
    let mut full = 0;
    for t in tasks {
        match t.await.unwrap() {
            StatusCode::OK => ok += 1,
            StatusCode::CONFLICT => full += 1,
            other => panic!("unexpected {other}"),
        }
    }
    assert_eq!((ok, full), (5, 15));
    let stored = api.stored_call(call["id"].as_str().unwrap()).await;
    assert_eq!(stored.participants.len(), 5);
}

/// Joins from one address that all succeed or find the call full are never failures, whatever
/// the order the store sees them in: here every request's first hit is counted before any goes
/// on, and the first one counted goes on last (see [`HitGate`]). Counting failures as a
/// difference of two counters hit at different moments refused five of these with 429.
#[tokio::test]
async fn joins_from_one_address_in_the_worst_order_are_not_failures() {
    let api = api();
    let (_, key) = api.new_app("A").await;
    let call = api.new_call(&key, json!({ "max_participants": 5 })).await;
    let code = call["join_code"].as_str().unwrap().to_owned();
    const N: usize = 20;
    let done = Arc::new(AtomicUsize::new(0));
    let changed = Arc::new(tokio::sync::Notify::new());
    *api.store.gate.lock().unwrap() = Some(HitGate {
        n: N,
        counted: 0,
        done: done.clone(),
        changed: changed.clone(),
    });
    let app = router(api.state.clone()).layer(MockConnectInfo(ip(9)));
    let tasks: Vec<_> = (0..N)
        .map(|_| {
            let app = app.clone();
            let (done, changed) = (done.clone(), changed.clone());
            let body = json!({ "code": code, "name": "Ada" });
            tokio::spawn(async move {
                let req = request("POST", "/v1/join", None, Some(&body));
                let status = app.oneshot(req).await.unwrap().status();
                done.fetch_add(1, Ordering::SeqCst);
                changed.notify_waiters();
                status
            })
        })
        .collect();
    let mut statuses = Vec::new();
    for t in tasks {
        statuses.push(t.await.unwrap());
    }
    let count = |s: StatusCode| statuses.iter().filter(|x| **x == s).count();
    assert_eq!(
        (count(StatusCode::OK), count(StatusCode::CONFLICT)),
        (5, 15),
        "{statuses:?}"
    );
    // The gate really ordered them: all twenty were held.
    assert_eq!(api.store.gate.lock().unwrap().as_ref().unwrap().counted, N);
    // And none counted as a failure: a wrong code from that address is still looked up.
    api.join_code(ip(9), UNKNOWN_CODE)
        .await
        .error(StatusCode::NOT_FOUND, "invalid_or_expired");
}

// ---------------------------------------------------------------------------------------------
// Transport-level errors
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn malformed_oversized_and_mistyped_bodies() {
    let api = api();
    let (_, key) = api.new_app("A").await;

    // 10 MB: 413 (whatever the route, authenticated or not).
    let big = format!("{{\"name\":\"{}\"}}", "x".repeat(10 * 1024 * 1024));
    for (uri, auth) in [("/v1/join", None), ("/v1/calls", Some(key.as_str()))] {
        let mut req = Request::post(uri)
            .header(header::CONTENT_TYPE, "application/json")
            .body(Body::from(big.clone()))
            .unwrap();
        if let Some(auth) = auth {
            req.headers_mut().insert(
                header::AUTHORIZATION,
                format!("Bearer {auth}").parse().unwrap(),
            );
        }
        api.send(req)
            .await
            .error(StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large");
    }

    // Nested 10 000 deep (well under the body limit): serde_json's recursion limit, 400.
    let deep = format!(
        "{{\"metadata\":{{\"x\":{}{}}}}}",
        "[".repeat(10_000),
        "]".repeat(10_000)
    );
    assert!(deep.len() < MAX_BODY);
    let send_raw = |body: String, content_type: &'static str| {
        Request::post("/v1/calls")
            .header(header::AUTHORIZATION, format!("Bearer {key}"))
            .header(header::CONTENT_TYPE, content_type)
            .body(Body::from(body))
            .unwrap()
    };
    api.send(send_raw(deep, "application/json"))
        .await
        .error(StatusCode::BAD_REQUEST, "bad_request");
    api.send(send_raw("{\"name\":".into(), "application/json"))
        .await
        .error(StatusCode::BAD_REQUEST, "bad_request");
    api.send(send_raw("not json".into(), "application/json"))
        .await
        .error(StatusCode::BAD_REQUEST, "bad_request");
    // Not JSON by content type: 415.
    api.send(send_raw("{}".into(), "text/plain"))
        .await
        .error(StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported_media_type");
    let no_type = Request::post("/v1/join").body(Body::from("{}")).unwrap();
    api.send(no_type)
        .await
        .error(StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported_media_type");
    // A body without a content type where the body is optional: still 415, not ignored.
    let mut req = Request::post("/v1/calls")
        .header(header::AUTHORIZATION, format!("Bearer {key}"))
        .body(Body::from("{\"max_participants\":2}"))
        .unwrap();
    req.extensions_mut().insert(ConnectInfo(ip(1)));
    api.send(req)
        .await
        .error(StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported_media_type");
    // Unknown field: 422 naming it.
    let m = api
        .send(send_raw("{\"nmae\":\"typo\"}".into(), "application/json"))
        .await
        .error(StatusCode::UNPROCESSABLE_ENTITY, "invalid_request");
    assert!(m.contains("nmae"), "{m}");
    // `application/json; charset=utf-8` is JSON.
    api.send(send_raw("{}".into(), "application/json; charset=utf-8"))
        .await
        .ok(StatusCode::CREATED);
}

#[tokio::test]
async fn unknown_routes_and_methods_answer_json() {
    let api = api();
    for uri in ["/", "/v1", "/v1/nope", "/v1/calls/x/y/z", "/openapi.yaml"] {
        api.call("GET", uri, None, None)
            .await
            .error(StatusCode::NOT_FOUND, "not_found");
    }
    for (method, uri, allow) in [
        ("DELETE", "/v1/calls", "GET"),
        ("GET", "/v1/join", "POST"),
        ("PUT", "/v1/apps", "GET"),
        ("GET", "/v1/calls/x/end", "POST"),
    ] {
        let r = api.call(method, uri, Some(ADMIN), None).await;
        r.error(StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed");
        let allowed = r.headers[header::ALLOW].to_str().unwrap();
        assert!(allowed.contains(allow), "{method} {uri}: {allowed}");
    }
}

#[tokio::test]
async fn a_failing_store_answers_503_and_issues_nothing() {
    let api = api();
    let (_, key) = api.new_app("A").await;
    let call = api.new_call(&key, json!({})).await;
    let code = call["join_code"].as_str().unwrap().to_owned();
    api.store.fail.store(true, Ordering::SeqCst);
    let r = api.join_code(ip(2), &code).await;
    let m = r.error(StatusCode::SERVICE_UNAVAILABLE, "unavailable");
    assert!(!m.contains("switched off"), "the cause is not shown: {m}");
    api.call("GET", "/v1/calls", Some(&key), None)
        .await
        .error(StatusCode::SERVICE_UNAVAILABLE, "unavailable");
    api.admin("GET", "/v1/apps", None)
        .await
        .error(StatusCode::SERVICE_UNAVAILABLE, "unavailable");
    assert_eq!(
        api.metric(
            "turnpike_control_join_attempts_total",
            &[("result", "unavailable")]
        ),
        1.0
    );
    assert_eq!(
        api.metric(
            "turnpike_control_credentials_issued_total",
            &[("via", "join")]
        ),
        0.0
    );
    api.store.fail.store(false, Ordering::SeqCst);
    api.join_code(ip(2), &code).await.ok(StatusCode::OK);
}

#[tokio::test(start_paused = true)]
async fn a_join_cut_off_by_the_timeout_counts_as_unavailable() {
    let api = api_with(|s| s.request_timeout = Duration::from_secs(5));
    let (_, key) = api.new_app("A").await;
    let call = api.new_call(&key, json!({})).await;
    let code = call["join_code"].as_str().unwrap().to_owned();
    api.store.hang.store(true, Ordering::SeqCst);
    let r = api.join_code(ip(3), &code).await;
    r.error(StatusCode::SERVICE_UNAVAILABLE, "timeout");
    assert_eq!(
        api.metric(
            "turnpike_control_join_attempts_total",
            &[("result", "unavailable")]
        ),
        1.0
    );
}

#[tokio::test(start_paused = true)]
async fn a_request_over_the_timeout_answers_503_timeout() {
    // Paused time: the runtime jumps to the timeout as soon as everything waits.
    let api = api_with(|s| s.request_timeout = Duration::from_secs(5));
    let (_, key) = api.new_app("A").await;
    api.store.hang.store(true, Ordering::SeqCst);
    let r = api.call("GET", "/v1/calls", Some(&key), None).await;
    r.error(StatusCode::SERVICE_UNAVAILABLE, "timeout");
    assert_eq!(
        api.metric(
            "turnpike_control_http_requests_total",
            &[
                ("route", "/v1/calls"),
                ("method", "GET"),
                ("status_class", "5xx")
            ]
        ),
        1.0
    );
}

// ---------------------------------------------------------------------------------------------
// OpenAPI, metrics, settings
// ---------------------------------------------------------------------------------------------

/// Every route the router serves, with its methods.
const ROUTES: &[(&str, &str)] = &[
    ("post", "/v1/apps"),
    ("get", "/v1/apps"),
    ("patch", "/v1/apps/{id}"),
    ("post", "/v1/apps/{id}/keys"),
    ("post", "/v1/calls"),
    ("get", "/v1/calls"),
    ("get", "/v1/calls/{id}"),
    ("post", "/v1/calls/{id}/end"),
    ("post", "/v1/calls/{id}/tokens"),
    ("delete", "/v1/calls/{id}/participants/{peer_id}"),
    ("post", "/v1/turn/credentials"),
    ("post", "/v1/join"),
    ("post", "/v1/diagnostics/ice-servers"),
    ("get", "/openapi.json"),
];

#[tokio::test]
async fn openapi_lists_every_route() {
    let api = api();
    let r = api.call("GET", "/openapi.json", None, None).await;
    let doc = r.ok(StatusCode::OK).clone();
    assert!(
        doc["openapi"].as_str().unwrap().starts_with("3.1"),
        "{}",
        doc["openapi"]
    );
    assert_eq!(doc["servers"][0]["url"], PUBLIC_URL);
    let mut documented = BTreeSet::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for method in item.as_object().unwrap().keys() {
            if ["get", "post", "patch", "put", "delete"].contains(&method.as_str()) {
                documented.insert((method.clone(), path.clone()));
            }
        }
    }
    let served: BTreeSet<(String, String)> = ROUTES
        .iter()
        .map(|(m, p)| (m.to_string(), p.to_string()))
        .collect();
    assert_eq!(documented, served);

    // ...and the router serves each of them (not the unknown-route fallback, not 405).
    for (method, path) in ROUTES {
        let uri = path.replace("{id}", "x").replace("{peer_id}", "y");
        let r = api.call(&method.to_uppercase(), &uri, None, None).await;
        assert!(
            r.status != StatusCode::METHOD_NOT_ALLOWED && r.json["error"]["code"] != "not_found",
            "{method} {path}: {r:?}"
        );
    }

    let schemes = doc["components"]["securitySchemes"].as_object().unwrap();
    for name in ["admin_token", "app_key"] {
        assert_eq!(schemes[name]["scheme"], "bearer", "{name}");
    }
    assert_eq!(
        doc["paths"]["/v1/calls"]["post"]["security"][0],
        json!({ "app_key": [] })
    );
    assert_eq!(
        doc["paths"]["/v1/apps"]["get"]["security"][0],
        json!({ "admin_token": [] })
    );
    assert!(doc["paths"]["/v1/join"]["post"].get("security").is_none());
    for schema in [
        "ErrorBody",
        "Joined",
        "CallView",
        "IceServer",
        "CreatedCall",
        "ParticipantView",
        "QualityView",
    ] {
        assert!(
            doc["components"]["schemas"].get(schema).is_some(),
            "{schema} missing"
        );
    }
    let participant = &doc["components"]["schemas"]["ParticipantView"]["properties"];
    for field in ["kicked", "quality", "left_at", "media"] {
        assert!(participant.get(field).is_some(), "ParticipantView.{field}");
    }
    let quality = &doc["components"]["schemas"]["QualityView"]["properties"];
    for field in [
        "rtt_ms",
        "jitter_ms",
        "packet_loss",
        "bitrate_kbps",
        "mos",
        "candidate_type",
        "relay_protocol",
        "reports",
        "updated_at",
    ] {
        assert!(quality.get(field).is_some(), "QualityView.{field}");
    }
    let kick = &doc["paths"]["/v1/calls/{id}/participants/{peer_id}"]["delete"];
    assert_eq!(kick["security"][0], json!({ "app_key": [] }));
    for status in ["204", "404", "409"] {
        assert!(kick["responses"].get(status).is_some(), "kick {status}");
    }
}

#[tokio::test]
async fn metrics_move_and_carry_no_identifiers() {
    let api = api();
    let (app_id, key) = api.new_app("A").await;
    let call = api.new_call(&key, json!({ "max_participants": 1 })).await;
    let id = call["id"].as_str().unwrap().to_owned();
    let code = call["join_code"].as_str().unwrap().to_owned();
    api.call("GET", &format!("/v1/calls/{id}"), Some(&key), None)
        .await
        .ok(StatusCode::OK);
    api.call("GET", "/v1/nowhere", None, None).await;
    api.join_code(ip(2), &code).await.ok(StatusCode::OK);
    api.join_code(ip(3), &code).await; // full
    api.join_code(ip(4), UNKNOWN_CODE).await; // invalid
    api.call("POST", "/v1/turn/credentials", Some(&key), None)
        .await
        .ok(StatusCode::OK);
    api.state.refresh_gauges().await;

    let m = |name: &str, labels: &[(&str, &str)]| api.metric(name, labels);
    assert_eq!(
        m(
            "turnpike_control_http_requests_total",
            &[
                ("route", "/v1/calls/{id}"),
                ("method", "GET"),
                ("status_class", "2xx")
            ]
        ),
        1.0
    );
    assert_eq!(
        m(
            "turnpike_control_http_requests_total",
            &[
                ("route", "unmatched"),
                ("method", "GET"),
                ("status_class", "4xx")
            ]
        ),
        1.0
    );
    assert_eq!(
        m(
            "turnpike_control_http_requests_total",
            &[
                ("route", "/v1/join"),
                ("method", "POST"),
                ("status_class", "4xx")
            ]
        ),
        2.0
    );
    // Latency by status class: the one admitted join apart from the two refused.
    for (class, n) in [("2xx", 1.0), ("4xx", 2.0), ("5xx", 0.0)] {
        assert_eq!(
            m(
                "turnpike_control_http_request_duration_seconds",
                &[("route", "/v1/join"), ("status_class", class)]
            ),
            n,
            "{class}"
        );
    }
    assert_eq!(
        m(
            "turnpike_control_http_request_duration_seconds",
            &[("route", "unmatched"), ("status_class", "4xx")]
        ),
        1.0
    );
    assert_eq!(m("turnpike_control_calls_created_total", &[]), 1.0);
    assert_eq!(m("turnpike_control_calls_active", &[]), 1.0);
    for (result, n) in [
        ("ok", 1.0),
        ("full", 1.0),
        ("invalid", 1.0),
        ("rate_limited", 0.0),
    ] {
        assert_eq!(
            m(
                "turnpike_control_join_attempts_total",
                &[("result", result)]
            ),
            n,
            "{result}"
        );
    }
    assert_eq!(
        m(
            "turnpike_control_credentials_issued_total",
            &[("via", "join")]
        ),
        1.0
    );
    assert_eq!(
        m(
            "turnpike_control_credentials_issued_total",
            &[("via", "api")]
        ),
        1.0
    );

    // No id, key, code or address in any label.
    let secretish = [
        app_id.as_str(),
        key.as_str(),
        id.as_str(),
        code.as_str(),
        "192.0.2.",
    ];
    for family in api.registry.gather() {
        for metric in family.get_metric() {
            for label in metric.get_label() {
                for s in secretish {
                    assert!(
                        !label.value().contains(s),
                        "{}: {}",
                        family.name(),
                        label.value()
                    );
                }
            }
        }
    }

    // An arbitrary method does not become a label value.
    let r = api.call("BREW", "/v1/calls", None, None).await;
    assert_eq!(r.status, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(
        m(
            "turnpike_control_http_requests_total",
            &[
                ("route", "/v1/calls"),
                ("method", "other"),
                ("status_class", "4xx")
            ]
        ),
        1.0
    );

    // The gauge follows the store.
    api.call("POST", &format!("/v1/calls/{id}/end"), Some(&key), None)
        .await
        .ok(StatusCode::OK);
    api.state.refresh_gauges().await;
    assert_eq!(m("turnpike_control_calls_active", &[]), 0.0);
}

#[test]
fn settings_debug_redacts_secrets() {
    let shown = format!("{:?}", settings());
    assert!(!shown.contains(ADMIN), "{shown}");
    assert!(
        !shown.contains(std::str::from_utf8(JWT_SECRET).unwrap()),
        "{shown}"
    );
    assert!(
        !shown.contains(std::str::from_utf8(RELAY_SECRET).unwrap()),
        "{shown}"
    );
    assert!(shown.contains("<redacted>"), "{shown}");
    assert!(shown.contains(PUBLIC_URL), "{shown}");
}

#[test]
fn errors_have_stable_codes_and_statuses() {
    let all = [
        ApiError::BadRequest("b".into()),
        ApiError::Unauthorized,
        ApiError::AppDisabled,
        ApiError::NotFound,
        ApiError::InvalidOrExpired,
        ApiError::MethodNotAllowed,
        ApiError::Conflict("c".into()),
        ApiError::CallFull,
        ApiError::CallEnded,
        ApiError::PayloadTooLarge,
        ApiError::UnsupportedMediaType,
        ApiError::InvalidRequest("i".into()),
        ApiError::RateLimited { retry_after_s: 3 },
        ApiError::Unavailable(StoreError::Unavailable("x".into())),
        ApiError::Timeout,
    ];
    let codes: HashSet<(&str, u16)> = all
        .iter()
        .map(|e| (e.code(), e.status().as_u16()))
        .collect();
    assert_eq!(codes.len(), all.len(), "one code per variant");
    for (code, status) in [
        ("bad_request", 400),
        ("unauthorized", 401),
        ("app_disabled", 403),
        ("not_found", 404),
        ("invalid_or_expired", 404),
        ("method_not_allowed", 405),
        ("conflict", 409),
        ("call_full", 409),
        ("call_ended", 409),
        ("payload_too_large", 413),
        ("unsupported_media_type", 415),
        ("invalid_request", 422),
        ("rate_limited", 429),
        ("unavailable", 503),
        ("timeout", 503),
    ] {
        assert!(codes.contains(&(code, status)), "{code}");
    }
}

#[test]
fn clocks() {
    let manual = ManualClock::new(5);
    manual.advance(Duration::from_millis(10));
    assert_eq!(manual.now_ms(), 15);
    manual.set(1);
    assert_eq!(manual.now_ms(), 1);
    // The system clock is past 2023 and moves forward.
    let a = control::api::SystemClock.now_ms();
    assert!(a > T0);
    assert!(control::api::SystemClock.now_ms() >= a);
    NoRevoker.revoke("g", 1);
    NoEvents.call_ended("c", "api");
    NoEvents.peer_kicked("c", "p");
}

// ---------------------------------------------------------------------------------------------
// A real socket
// ---------------------------------------------------------------------------------------------

/// One HTTP/1.1 exchange on a fresh connection (`Connection: close`): status and JSON body.
async fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    auth: Option<&str>,
    body: Option<Value>,
) -> (u16, Value) {
    http_with(addr, method, path, auth, &[], body).await
}

/// [`http`] with extra header lines.
async fn http_with(
    addr: SocketAddr,
    method: &str,
    path: &str,
    auth: Option<&str>,
    headers: &[(&str, &str)],
    body: Option<Value>,
) -> (u16, Value) {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    if let Some(auth) = auth {
        req.push_str(&format!("Authorization: Bearer {auth}\r\n"));
    }
    for (name, value) in headers {
        req.push_str(&format!("{name}: {value}\r\n"));
    }
    if !body.is_empty() {
        req.push_str("Content-Type: application/json\r\n");
    }
    req.push_str("\r\n");
    req.push_str(&body);
    stream.write_all(req.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).await.unwrap();
    let raw = String::from_utf8(raw).unwrap();
    let (head, body) = raw.split_once("\r\n\r\n").unwrap();
    let status: u16 = head.split(' ').nth(1).unwrap().parse().unwrap();
    assert!(
        !head
            .to_ascii_lowercase()
            .contains("transfer-encoding: chunked"),
        "JSON answers have a length: {head}"
    );
    (status, serde_json::from_str(body).unwrap())
}

#[tokio::test]
async fn serve_walkthrough_on_a_real_socket() {
    let api = api();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(serve(listener, api.state.clone(), async {
        stopped.await.ok();
    }));

    let (status, v) = http(
        addr,
        "POST",
        "/v1/apps",
        Some(ADMIN),
        Some(json!({ "name": "Live" })),
    )
    .await;
    assert_eq!(status, 201, "{v}");
    let key = v["key"].as_str().unwrap().to_owned();
    let (status, call) = http(addr, "POST", "/v1/calls", Some(&key), None).await;
    assert_eq!(status, 201, "{call}");
    let (status, joined) = http(
        addr,
        "POST",
        "/v1/join",
        None,
        Some(json!({ "code": call["join_code"], "name": "Ada" })),
    )
    .await;
    assert_eq!(status, 200, "{joined}");
    assert_eq!(joined["call_id"], call["id"]);
    // The client address came from the socket: the per-address counter is 127.0.0.1's.
    let (attempts, _) = api
        .store
        .inner
        .hit("join:ip:127.0.0.1", 60_000, T0)
        .await
        .unwrap();
    assert_eq!(attempts, 2);
    let (status, v) = http(addr, "GET", "/nowhere", None, None).await;
    assert_eq!((status, &v["error"]["code"]), (404, &json!("not_found")));

    stop.send(()).unwrap();
    server.await.unwrap().unwrap();
    assert!(
        tokio::net::TcpStream::connect(addr).await.is_err(),
        "stopped listening"
    );
}

#[tokio::test]
async fn a_client_trickling_its_request_head_is_cut_off_at_the_timeout() {
    // Slowloris: a connection that never completes its request head must not be held forever.
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let api = api_with(|s| s.request_timeout = Duration::from_secs(1));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(serve(listener, api.state.clone(), async {
        stopped.await.ok();
    }));
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(b"POST /v1/join HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    // Never finish the head. The server closes the connection (EOF, or a 408 then EOF); the
    // outer bound only keeps a broken build from hanging the suite.
    let mut buf = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(60), s.read_to_end(&mut buf)).await;
    assert!(read.is_ok(), "the connection was still open after 60 s");
    let text = String::from_utf8_lossy(&buf);
    assert!(
        text.is_empty() || text.starts_with("HTTP/1.1 408"),
        "no answer but a timeout: {text}"
    );
    // A well-behaved client on the same server is unaffected.
    let (status, _) = http(addr, "GET", "/openapi.json", None, None).await;
    assert_eq!(status, 200);
    stop.send(()).unwrap();
    server.await.unwrap().unwrap();
}

/// A preflight for `POST /v1/join` with a JSON body, from `origin`.
fn preflight(origin: &str) -> Request<Body> {
    Request::builder()
        .method("OPTIONS")
        .uri("/v1/join")
        .header(header::ORIGIN, origin)
        .header(header::ACCESS_CONTROL_REQUEST_METHOD, "POST")
        .header(header::ACCESS_CONTROL_REQUEST_HEADERS, "content-type")
        .body(Body::empty())
        .unwrap()
}

#[tokio::test]
async fn join_answers_cross_origin_pages_only_from_allowed_origins() {
    const APP: &str = "https://app.example.com";
    let api = api_with(|s| s.join_origins = conf::AllowedOrigins::List(vec![APP.into()]));
    let (_, key) = api.new_app("cors").await;
    let call = api.new_call(&key, json!({})).await;
    let code = call["join_code"].as_str().unwrap().to_owned();
    let allow = |r: &Resp| {
        r.headers
            .get(header::ACCESS_CONTROL_ALLOW_ORIGIN)
            .map(|v| v.to_str().unwrap().to_owned())
    };

    // The preflight of an allowed page says what it may send; browsers compare origins
    // case-insensitively, and so does the check.
    let r = api.send(preflight("https://APP.example.com")).await;
    assert!(r.status.is_success(), "{r:?}");
    assert_eq!(allow(&r).as_deref(), Some("https://APP.example.com"));
    let methods = r.headers[header::ACCESS_CONTROL_ALLOW_METHODS]
        .to_str()
        .unwrap();
    assert!(methods.contains("POST"), "{methods}");
    let headers = r.headers[header::ACCESS_CONTROL_ALLOW_HEADERS]
        .to_str()
        .unwrap()
        .to_ascii_lowercase();
    assert!(headers.contains("content-type"), "{headers}");
    assert!(r.headers.contains_key(header::ACCESS_CONTROL_MAX_AGE));

    // Its join, and its errors, are readable by the page.
    let mut req = request(
        "POST",
        "/v1/join",
        None,
        Some(&json!({ "code": code, "name": "Ada" })),
    );
    req.headers_mut()
        .insert(header::ORIGIN, HeaderValue::from_static(APP));
    let r = api.send(req).await;
    r.ok(StatusCode::OK);
    assert_eq!(allow(&r).as_deref(), Some(APP));
    let vary = r.headers[header::VARY]
        .to_str()
        .unwrap()
        .to_ascii_lowercase();
    assert!(vary.contains("origin"), "{vary}");
    let mut req = request(
        "POST",
        "/v1/join",
        None,
        Some(&json!({ "code": UNKNOWN_CODE, "name": "Ada" })),
    );
    req.headers_mut()
        .insert(header::ORIGIN, HeaderValue::from_static(APP));
    let r = api.send(req).await;
    r.error(StatusCode::NOT_FOUND, "invalid_or_expired");
    assert_eq!(allow(&r).as_deref(), Some(APP));
    // The page may read Retry-After (of a 429): the SDK's `retryAfter`.
    let exposed = r.headers[header::ACCESS_CONTROL_EXPOSE_HEADERS]
        .to_str()
        .unwrap()
        .to_ascii_lowercase();
    assert!(exposed.contains("retry-after"), "{exposed}");

    // Another origin gets no CORS headers: its page cannot read the answer.
    let r = api.send(preflight("https://evil.example.net")).await;
    assert_eq!(allow(&r), None, "{r:?}");
    let mut req = request(
        "POST",
        "/v1/join",
        None,
        Some(&json!({ "code": UNKNOWN_CODE, "name": "Eve" })),
    );
    req.headers_mut().insert(
        header::ORIGIN,
        HeaderValue::from_static("https://evil.example.net"),
    );
    let r = api.send(req).await;
    assert_eq!(allow(&r), None, "{r:?}");

    // Only /v1/join: the app API is for servers, not pages.
    let mut req = request("GET", "/v1/calls", Some(&key), None);
    req.headers_mut()
        .insert(header::ORIGIN, HeaderValue::from_static(APP));
    let r = api.send(req).await;
    r.ok(StatusCode::OK);
    assert_eq!(allow(&r), None, "{r:?}");
}

#[tokio::test]
async fn by_default_only_the_public_urls_own_origin_is_answered_cross_origin() {
    let api = api();
    let r = api.send(preflight(PUBLIC_URL)).await;
    assert_eq!(
        r.headers
            .get(header::ACCESS_CONTROL_ALLOW_ORIGIN)
            .map(|v| v.to_str().unwrap()),
        Some(PUBLIC_URL),
        "{r:?}"
    );
    let r = api.send(preflight("https://app.example.com")).await;
    assert!(
        !r.headers.contains_key(header::ACCESS_CONTROL_ALLOW_ORIGIN),
        "{r:?}"
    );
}

/// Joins with a code that does not exist through a served API, forwarding for `xff`.
async fn wrong_code_via(addr: SocketAddr, xff: &str) -> u16 {
    let body = json!({ "code": "BCD-FGHJ-KLM", "name": "x" });
    http_with(
        addr,
        "POST",
        "/v1/join",
        None,
        &[("X-Forwarded-For", xff)],
        Some(body),
    )
    .await
    .0
}

#[tokio::test]
async fn behind_a_trusted_proxy_each_forwarded_client_has_its_own_join_limit() {
    // The proxy is this test's loopback connection.
    let api = api_with(|s| s.trusted_proxies = vec!["127.0.0.0/8".parse().unwrap()]);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(serve(listener, api.state.clone(), async {
        stopped.await.ok();
    }));
    let limit = Limits::default().join_failures_per_ip;
    for i in 0..limit {
        assert_eq!(
            wrong_code_via(addr, "198.51.100.66").await,
            404,
            "attempt {i}"
        );
    }
    assert_eq!(wrong_code_via(addr, "198.51.100.66").await, 429);
    // Another user behind the same proxy is not refused for the first one's guesses.
    assert_eq!(wrong_code_via(addr, "198.51.100.7").await, 404);
    // A client that writes its own X-Forwarded-For cannot pick a fresh identity: the proxy
    // appends the address it really came from, and that is the one counted.
    assert_eq!(
        wrong_code_via(addr, "203.0.113.1, 198.51.100.66").await,
        429
    );
    // The counter is the forwarded client's, not the proxy's.
    let (proxy, _) = api
        .store
        .inner
        .hit("join:fail:127.0.0.1", 60_000, T0)
        .await
        .unwrap();
    assert_eq!(proxy, 1, "only this probe ever counted against the proxy");
    stop.send(()).unwrap();
    server.await.unwrap().unwrap();
}

#[tokio::test]
async fn x_forwarded_for_from_a_peer_that_is_not_a_trusted_proxy_is_ignored() {
    let api = api();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(serve(listener, api.state.clone(), async {
        stopped.await.ok();
    }));
    let limit = Limits::default().join_failures_per_ip;
    // A fresh forwarded address on every guess changes nothing: all count against the peer.
    for i in 0..limit {
        let xff = format!("198.51.100.{i}");
        assert_eq!(wrong_code_via(addr, &xff).await, 404, "attempt {i}");
    }
    assert_eq!(wrong_code_via(addr, "198.51.100.200").await, 429);
    stop.send(()).unwrap();
    server.await.unwrap().unwrap();
}
