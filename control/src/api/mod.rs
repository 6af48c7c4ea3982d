//! The HTTP API: router, handlers, the error type, limits, metrics and the OpenAPI document.
//!
//! Three kinds of callers:
//!
//! - the operator, with `Authorization: Bearer <admin-token>` (`/v1/apps…`); without a
//!   configured admin token those routes answer 404 as if they did not exist;
//! - API consumers, with an app key `Authorization: Bearer tpk_…` (`/v1/calls…`,
//!   `/v1/turn/credentials`), each seeing only its own calls;
//! - anyone with a join code or participant token (`POST /v1/join`), rate limited per client
//!   address and per code, every refusal of a secret looking exactly alike.
//!
//! Every error is `{"error":{"code","message"}}` with a stable `code` ([`ApiError`]); axum's
//! own rejections (bad JSON, wrong content type, body too large, unknown route or method) are
//! mapped into the same shape.

mod admin;
mod auth;
mod calls;
mod diagnostics;
mod error;
mod join;
mod metrics;
mod openapi;
mod util;

use std::fmt;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::extract::{DefaultBodyLimit, Request, State};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, patch, post};
use axum::Router;

use crate::store::Store;
use crate::{creds, jwt, secrets};

pub use self::calls::MAX_PARTICIPANTS;
pub use self::diagnostics::{
    DIAGNOSTICS_GROUP, DIAGNOSTICS_PER_IP, DIAGNOSTICS_TTL_S, DIAGNOSTICS_WINDOW,
};
pub use self::error::ApiError;
pub use self::metrics::ControlMetrics;

/// Everything the API needs from the configuration (the binary converts `conf` into this).
pub struct Settings {
    /// Where clients reach the API, without a trailing slash (`https://turn.example.com`): the
    /// base of join links, the JWT issuer, and (`http`→`ws`) of the signaling URL.
    pub public_url: String,
    /// The operator's bearer token for `/v1/apps…`; `None` hides those routes (404).
    pub admin_token: Option<String>,
    /// The key app keys, join codes and participant tokens are hashed under.
    pub hash_key: secrets::HashKey,
    /// Signaling token keys (the first signs).
    pub jwt: jwt::Keys,
    /// Lifetime of a signaling token.
    pub token_ttl: Duration,
    /// Mints `iceServers` with TURN credentials.
    pub minter: creds::Minter,
    /// Largest request body accepted, in bytes (413 above).
    pub max_body: usize,
    /// Longest a request may take, body upload included (503 `timeout` above).
    pub request_timeout: Duration,
    /// Rate limits of `POST /v1/join`.
    pub limits: Limits,
    /// Browser origins whose pages may call `POST /v1/join` from another origin (CORS). The
    /// binary passes `signal.allowed-origins`: the page that joins is the page that then opens
    /// the signaling socket, so one list says where Turnpike may be embedded.
    /// [`conf::AllowedOrigins::PublicUrl`] (the default) allows no other origin.
    pub join_origins: conf::AllowedOrigins,
    /// Proxies whose `X-Forwarded-For` names the client (`control.trusted-proxies`; see
    /// [`crate::client`]), applied by [`serve`] and [`serve_app`].
    pub trusted_proxies: Vec<ipnet::IpNet>,
}

impl fmt::Debug for Settings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Settings")
            .field("public_url", &self.public_url)
            // The admin token is a bearer secret: whether one is set is all logs may say.
            .field(
                "admin_token",
                &self.admin_token.as_ref().map(|_| "<redacted>"),
            )
            .field("hash_key", &self.hash_key)
            .field("jwt", &self.jwt)
            .field("token_ttl", &self.token_ttl)
            .field("minter", &self.minter)
            .field("max_body", &self.max_body)
            .field("request_timeout", &self.request_timeout)
            .field("limits", &self.limits)
            .field("join_origins", &self.join_origins)
            .field("trusted_proxies", &self.trusted_proxies)
            .finish()
    }
}

/// Rate limits of `POST /v1/join`, counted in the store (so shared by every node) over fixed
/// windows of [`Limits::window`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Join attempts per client address (IPv4 address or IPv6 /64) and window.
    pub join_per_ip: u64,
    /// Failed join attempts per client address and window; once reached, further attempts from
    /// that address are refused (429) without looking at the code.
    pub join_failures_per_ip: u64,
    /// Join attempts per code or token (whatever address they come from) and window.
    pub join_per_code: u64,
    /// The counting window.
    pub window: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        let seats = u64::from(MAX_PARTICIPANTS);
        Self {
            // A classroom or office behind one NAT fills the largest call and every seat joins
            // again once (a reload, a switch of device) within a minute, twice over (two such
            // calls): 4 × 32 = 128. Raising it costs no guessing protection: failures are
            // capped separately, just below.
            join_per_ip: 4 * seats,
            // A person mistypes a code a few times; ten failures a minute is already guessing.
            // With 20^10 codes, 10 guesses a minute per address finds nothing in practice.
            join_failures_per_ip: 10,
            // Bounds guessing of one code spread over many addresses, while the largest call
            // can fill and every seat join once more within a minute: 2 × 32 = 64.
            join_per_code: 2 * seats,
            // One minute: short enough that a locked-out user can retry soon.
            window: Duration::from_secs(60),
        }
    }
}

/// Revokes the TURN credentials of a credential group (see the crate docs): implemented by the
/// binary on top of the relay.
pub trait Revoker: Send + Sync + fmt::Debug {
    /// Refuse usernames of `group` and tear down their allocations until `until_unix` (seconds).
    fn revoke(&self, group: &str, until_unix: u64);
}

/// A [`Revoker`] that does nothing (tests, control plane without a relay in the process).
#[derive(Debug, Clone, Copy, Default)]
pub struct NoRevoker;

impl Revoker for NoRevoker {
    fn revoke(&self, group: &str, until_unix: u64) {
        tracing::debug!(group, until_unix, "no relay to revoke credentials on");
    }
}

/// Told what the API did to calls, so signaling can act on it (close the call's sockets, drop
/// a kicked peer): implemented by the binary on top of signaling. Called after the store
/// change, never while holding anything; implementations must not block.
pub trait CallEvents: Send + Sync + fmt::Debug {
    /// Call `call_id` ended now (`reason`: `"api"` for `POST /v1/calls/{id}/end`).
    fn call_ended(&self, call_id: &str, reason: &str);
    /// Participant `peer_id` of call `call_id` was kicked
    /// (`DELETE /v1/calls/{id}/participants/{peer_id}`).
    fn peer_kicked(&self, call_id: &str, peer_id: &str);
}

/// [`CallEvents`] that go nowhere (tests, control plane without signaling in the process).
#[derive(Debug, Clone, Copy, Default)]
pub struct NoEvents;

impl CallEvents for NoEvents {
    fn call_ended(&self, call_id: &str, reason: &str) {
        tracing::debug!(call_id, reason, "no signaling to tell that a call ended");
    }

    fn peer_kicked(&self, call_id: &str, peer_id: &str) {
        tracing::debug!(call_id, peer_id, "no signaling to tell about a kick");
    }
}

/// Where the API reads the time (Unix milliseconds): injectable so tests expire calls and
/// tokens without sleeping.
pub trait Clock: Send + Sync + fmt::Debug {
    /// Now, in Unix milliseconds.
    fn now_ms(&self) -> u64;
}

/// The system's wall clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&self) -> u64 {
        // A clock before 1970 is a broken host; 0 keeps the API answering rather than panicking.
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64)
    }
}

/// A clock that only moves when told to (tests).
#[derive(Debug, Default)]
pub struct ManualClock(AtomicU64);

impl ManualClock {
    /// A clock reading `now_ms`.
    pub fn new(now_ms: u64) -> Self {
        Self(AtomicU64::new(now_ms))
    }

    /// Sets the time.
    pub fn set(&self, now_ms: u64) {
        self.0.store(now_ms, Ordering::SeqCst);
    }

    /// Moves the time forward.
    pub fn advance(&self, by: Duration) {
        self.0.fetch_add(by.as_millis() as u64, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now_ms(&self) -> u64 {
        self.0.load(Ordering::SeqCst)
    }
}

/// Everything a request handler reaches, cheap to clone.
#[derive(Clone, Debug)]
pub struct AppState {
    /// The configuration.
    pub settings: Arc<Settings>,
    /// Apps, calls, codes, tokens, rate-limit counters.
    pub store: Arc<dyn Store>,
    /// Told when a call ends or a participant is kicked (their TURN credentials).
    pub revoker: Arc<dyn Revoker>,
    /// Told when a call ends or a participant is kicked (signaling).
    pub events: Arc<dyn CallEvents>,
    /// The time.
    pub clock: Arc<dyn Clock>,
    /// The API's Prometheus collectors.
    pub metrics: ControlMetrics,
}

impl AppState {
    /// Sets the `calls_active` gauge from the store (the binary calls this every few seconds:
    /// counting live calls on every request would cost a store scan each time).
    pub async fn refresh_gauges(&self) {
        match self.store.live_calls(self.clock.now_ms()).await {
            Ok(n) => self.metrics.set_calls_active(n),
            Err(e) => tracing::warn!(error = %e, "cannot count live calls"),
        }
    }
}

/// The whole API with every layer: body limit, request timeout, metrics, JSON errors for
/// unknown routes and methods.
///
/// `POST /v1/join` rate-limits by client address, so serve it with
/// `into_make_service_with_connect_info::<SocketAddr>()` (as [`serve`] does); tests insert
/// `ConnectInfo` or `MockConnectInfo`.
pub fn router(state: AppState) -> Router {
    let max_body = state.settings.max_body;
    let timeout = state.settings.request_timeout;
    let metrics = state.metrics.clone();
    let mut api = Router::new();
    // Without an admin token the admin routes are not there at all: a 404 from the fallback,
    // identical to any unknown path whatever the method (a route that exists would answer 405
    // with an `Allow` header and give itself away).
    if state.settings.admin_token.is_some() {
        api = api
            .route("/v1/apps", post(admin::create_app).get(admin::list_apps))
            .route("/v1/apps/{id}", patch(admin::update_app))
            .route("/v1/apps/{id}/keys", post(admin::add_key));
    }
    api.route("/v1/calls", post(calls::create_call).get(calls::list_calls))
        .route("/v1/calls/{id}", get(calls::get_call))
        .route("/v1/calls/{id}/end", post(calls::end_call))
        .route("/v1/calls/{id}/tokens", post(calls::create_token))
        .route(
            "/v1/calls/{id}/participants/{peer_id}",
            delete(calls::kick_participant),
        )
        .route("/v1/turn/credentials", post(calls::turn_credentials))
        // OPTIONS is routed here so that the CORS layer, which answers every OPTIONS itself,
        // sees preflights: the router's 405 fallback runs outside route layers.
        .route(
            "/v1/join",
            post(join::join)
                .options(method_not_allowed)
                .layer(join_cors(&state.settings)),
        )
        .route(
            "/v1/diagnostics/ice-servers",
            post(diagnostics::ice_servers),
        )
        .route("/openapi.json", get(openapi::openapi_json))
        // The browser side (pages, SDK, assets): inside the layers below, so they are timed,
        // limited and counted under their route templates like the API.
        .merge(crate::web::routes())
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(max_body))
        // Inside the metrics layer, so timeouts are counted as the 503s clients see.
        .layer(middleware::from_fn_with_state(timeout, time_limit))
        .layer(middleware::from_fn_with_state(metrics, track))
        .with_state(state)
}

/// CORS for `POST /v1/join` ([`Settings::join_origins`]): a page on an allowed origin may send
/// its JSON body (the preflight is answered here) and read the answer, errors included. No
/// credentials mode: the code or token in the body is the credential, no cookie is involved.
/// Other origins get no CORS headers, so browsers keep their pages from reading the answer.
fn join_cors(settings: &Settings) -> tower_http::cors::CorsLayer {
    use axum::http::{header, HeaderValue, Method};
    use tower_http::cors::{AllowOrigin, CorsLayer};
    /// How long a browser may reuse a preflight's answer.
    const PREFLIGHT_MAX_AGE: Duration = Duration::from_secs(600);
    let origins = settings.join_origins.clone();
    let public_url = settings.public_url.clone();
    CorsLayer::new()
        .allow_origin(AllowOrigin::predicate(
            move |origin: &HeaderValue, _: &axum::http::request::Parts| {
                origin
                    .to_str()
                    .is_ok_and(|o| origins.allows(Some(o), Some(&public_url)))
            },
        ))
        .allow_methods([Method::POST])
        .allow_headers([header::CONTENT_TYPE])
        // A 429's Retry-After is not a header browsers show other origins by default.
        .expose_headers([header::RETRY_AFTER])
        .max_age(PREFLIGHT_MAX_AGE)
}

/// Serves the API on `listener` until `shutdown` completes, then finishes the requests in
/// flight (graceful shutdown, at most 65 s: `GRACEFUL_LIMIT`).
///
/// Written on hyper directly rather than `axum::serve`, which sets no timer and so never times
/// out a client that trickles its request head (slowloris): here a connection must deliver a
/// complete request head within `request_timeout`. WebSocket upgrades (signaling) pass through.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: AppState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let head_timeout = state.settings.request_timeout;
    let trusted = state.settings.trusted_proxies.clone();
    serve_app(listener, router(state), head_timeout, &trusted, shutdown).await
}

/// [`serve`] for a router made elsewhere: the control plane's [`router`] with signaling (or
/// pages) merged in, sharing the listener. `head_timeout`: how long a connection may take to
/// deliver a request head. Each request's `ConnectInfo` is the client's address: the TCP peer,
/// or what a proxy in `trusted_proxies` forwards ([`crate::client::client_addr`]).
pub async fn serve_app(
    listener: tokio::net::TcpListener,
    app: Router,
    head_timeout: Duration,
    trusted_proxies: &[ipnet::IpNet],
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
    use hyper_util::server::conn::auto::Builder;
    use hyper_util::service::TowerToHyperService;
    use tower::ServiceExt as _;

    let trusted: Arc<[ipnet::IpNet]> = trusted_proxies.into();
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of descriptors or a connection reset before accept: keep serving the
                    // others; back off a little so a persistent error cannot spin the loop.
                    tracing::warn!(error = %e, "accepting a connection failed");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let trusted = Arc::clone(&trusted);
        let svc = app.clone().map_request(
            move |mut req: axum::extract::Request<hyper::body::Incoming>| {
                let client = crate::client::client_addr(peer, req.headers(), &trusted);
                req.extensions_mut()
                    .insert(axum::extract::ConnectInfo(client));
                req.map(axum::body::Body::new)
            },
        );
        let mut builder = Builder::new(TokioExecutor::new());
        builder
            .http1()
            .timer(TokioTimer::new())
            .header_read_timeout(head_timeout);
        let conn = builder
            .serve_connection_with_upgrades(TokioIo::new(stream), TowerToHyperService::new(svc))
            .into_owned();
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "HTTP connection ended with an error");
            }
        });
    }
    drop(listener);
    if tokio::time::timeout(GRACEFUL_LIMIT, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("requests still running after the graceful shutdown limit: dropped");
    }
    Ok(())
}

/// How long a graceful shutdown waits for requests in flight: longer than any request may take
/// (`request-timeout` is at most 60 s), short enough not to hold a deploy.
const GRACEFUL_LIMIT: Duration = Duration::from_secs(65);
/// Pause after a failed `accept` (e.g. out of file descriptors) before the next one.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// The JSON 404 for unknown paths and 405 for known paths with another method, on `router`
/// and on everything merged into it so far. [`router`] has them; an app that merges more
/// routes in (signaling) applies them again after the merge, else those routes answer an
/// empty 405, and an app without the control plane an empty 404.
pub fn json_fallbacks(router: Router) -> Router {
    router
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
}

async fn not_found() -> ApiError {
    ApiError::NotFound
}

async fn method_not_allowed() -> ApiError {
    ApiError::MethodNotAllowed
}

/// Our own timeout (rather than tower's) so the answer is the JSON `timeout` error.
async fn time_limit(State(limit): State<Duration>, req: Request, next: Next) -> Response {
    match tokio::time::timeout(limit, next.run(req)).await {
        Ok(response) => response,
        Err(_) => ApiError::Timeout.into_response(),
    }
}

async fn track(State(metrics): State<ControlMetrics>, req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<axum::extract::MatchedPath>()
        .map(|p| p.as_str().to_owned());
    let method = metrics::method_label(req.method());
    let start = std::time::Instant::now();
    let response = next.run(req).await;
    metrics.observe_request(
        route.as_deref().unwrap_or("unmatched"),
        method,
        response.status(),
        start.elapsed(),
    );
    response
}
