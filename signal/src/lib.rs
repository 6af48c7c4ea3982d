//! Turnpike's signaling: WebSocket connections of JWT-verified peers who exchange offers,
//! answers and ICE candidates with exactly the peers of their call, report their media state and
//! call-quality stats, and get fresh TURN credentials before the old ones expire.
//!
//! # Shape
//!
//! - [`Signal`] holds everything ([`Shared`]); [`Signal::router`] is `GET /v1/signal`, merged
//!   into the control plane's router by `turnpike serve` (one HTTP port for API, signaling and
//!   pages) or served alone by `turnpike signal`.
//! - `conn`: one task per socket (upgrade checks, auth, limits, read loop) and a writer task
//!   with the bounded send queue.
//! - `room`: one task per call with peers here; it owns the call's peers on this node and talks
//!   to the rooms of the same call on other nodes over the [`bus::Bus`].
//! - [`protocol`]: the versioned JSON messages (`docs/signaling.md`).
//! - [`quality`] and [`metrics`]: stats reports, the E-model MOS, Prometheus collectors.
//! - [`redis_bus`]: the bus on Redis pub/sub for several nodes; [`bus::LocalBus`] alone.
//!
//! # Why axum's WebSocket (tungstenite) and no compression
//!
//! axum's `ws` is the same stack the control plane already serves (hyper upgrades), and
//! tungstenite enforces the frame and message size limits before buffering a frame. It offers no
//! permessage-deflate, which is what the issue wants anyway: compressed frames would let a small
//! frame inflate past every limit, and signaling messages are small.

pub mod bus;
mod conn;
pub mod metrics;
pub mod protocol;
pub mod quality;
pub mod redis_bus;
mod room;

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::ws::WebSocketUpgrade;
use axum::extract::{ConnectInfo, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use tokio::sync::watch;

pub use conn::LEEWAY_S;

/// Signaling's settings (the binary converts `conf::Signal` into this).
#[derive(Debug, Clone)]
pub struct Settings {
    /// Allowed browser origins (`signal.allowed-origins`; requests without `Origin`, i.e. not
    /// from a browser, always pass: the token is what authenticates, the check only stops other
    /// sites' pages).
    pub origins: conf::AllowedOrigins,
    /// The first message must be `auth` within this.
    pub auth_timeout: Duration,
    /// Told to clients: send `ping` this often.
    pub ping_interval: Duration,
    /// Nothing received for this long closes the socket.
    pub idle_timeout: Duration,
    /// Largest frame and message (bytes); above it the socket is closed with 1009.
    pub max_message: usize,
    /// Messages per second per connection (token bucket rate).
    pub message_rate: u32,
    /// Token bucket capacity.
    pub message_burst: u32,
    /// Frames queued for one connection before it counts as a slow reader and is dropped.
    pub send_queue: usize,
    /// Longest one frame may take to leave: a peer whose TCP window stays shut that long is
    /// not reading, and the socket is dropped as a slow reader.
    pub write_timeout: Duration,
    /// A peer reconnecting within this resumes unseen.
    pub resume_window: Duration,
    /// An empty call ends after this.
    pub empty_timeout: Duration,
    /// A node whose heartbeat lapsed this long has its peers reported left.
    pub node_timeout: Duration,
    /// Sockets this node serves at once.
    pub max_connections: usize,
    /// Unauthenticated sockets per client address.
    pub max_unauthenticated_per_ip: usize,
}

impl Default for Settings {
    /// The defaults of `conf`'s `[signal]` section.
    fn default() -> Self {
        Self {
            origins: conf::AllowedOrigins::PublicUrl,
            auth_timeout: Duration::from_secs(5),
            ping_interval: Duration::from_secs(15),
            idle_timeout: Duration::from_secs(45),
            max_message: 64 * 1024,
            message_rate: 50,
            message_burst: 100,
            send_queue: 256,
            write_timeout: Duration::from_secs(10),
            resume_window: Duration::from_secs(30),
            empty_timeout: Duration::from_secs(60),
            node_timeout: Duration::from_secs(15),
            max_connections: 10_000,
            max_unauthenticated_per_ip: 64,
        }
    }
}

/// Everything signaling shares between connections and rooms.
#[derive(Debug)]
pub struct Shared {
    /// The control plane's state: store, JWT keys, credential minter, clock, revoker.
    pub app: control::AppState,
    /// Signaling settings.
    pub settings: Settings,
    /// How nodes meet.
    pub bus: Arc<dyn bus::Bus>,
    /// Prometheus collectors.
    pub metrics: metrics::SignalMetrics,
    rooms: room::Rooms,
    shutdown: watch::Receiver<bool>,
    stop: watch::Sender<bool>,
    connections: AtomicUsize,
    pending: Mutex<HashMap<IpAddr, usize>>,
    next_conn: AtomicU64,
}

impl Shared {
    fn lock_pending(&self) -> std::sync::MutexGuard<'_, HashMap<IpAddr, usize>> {
        // Counters only: a panic mid-update cannot break an invariant worth refusing service.
        self.pending
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn next_conn_id(&self) -> u64 {
        self.next_conn.fetch_add(1, Ordering::Relaxed)
    }
}

/// Signaling: cheap to clone.
#[derive(Debug, Clone)]
pub struct Signal(Arc<Shared>);

impl Signal {
    /// Signaling on `app`'s store and keys, meeting other nodes over `bus`.
    pub fn new(
        app: control::AppState,
        settings: Settings,
        bus: Arc<dyn bus::Bus>,
        metrics: metrics::SignalMetrics,
    ) -> Self {
        let (stop, shutdown) = watch::channel(false);
        Self(Arc::new(Shared {
            app,
            settings,
            bus,
            metrics,
            rooms: room::Rooms::default(),
            shutdown,
            stop,
            connections: AtomicUsize::new(0),
            pending: Mutex::new(HashMap::new()),
            next_conn: AtomicU64::new(0),
        }))
    }

    /// `GET /v1/signal`. Serve it with `ConnectInfo<SocketAddr>` and upgrades enabled (as
    /// `control::serve` does).
    pub fn router(&self) -> Router {
        Router::new()
            .route("/v1/signal", get(upgrade))
            .with_state(self.clone())
    }

    /// Closes every socket with 1001 (`shutdown`) and ends the rooms.
    pub fn shutdown(&self) {
        let _ = self.0.stop.send(true);
    }

    /// After [`Signal::shutdown`]: resolves once every socket has ended (its 1001 sent and its
    /// closing handshake done or timed out), or after `limit`. Upgraded sockets are no longer
    /// the HTTP server's: without this wait, a process that exits drops them unclosed.
    pub async fn drained(&self, limit: std::time::Duration) {
        let deadline = tokio::time::Instant::now() + limit;
        // Polled: this runs once, at shutdown, and a socket ends within its close timeout.
        while self
            .0
            .connections
            .load(std::sync::atomic::Ordering::Acquire)
            > 0
            && tokio::time::Instant::now() < deadline
        {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }

    /// Rooms on this node (calls with peers connected here, or waiting out their empty
    /// timeout).
    pub fn rooms(&self) -> usize {
        self.0.rooms.len()
    }

    /// The shared state.
    pub fn shared(&self) -> &Shared {
        &self.0
    }
}

impl control::api::CallEvents for Signal {
    fn call_ended(&self, call_id: &str, reason: &str) {
        let reason = reason.to_owned();
        if let Some(room) = self.0.rooms.get(call_id) {
            let cmd = room::Cmd::End {
                reason,
                publish: true,
            };
            tokio::spawn(async move {
                let _ = room.tx.send(cmd).await;
            });
        } else {
            let bus = Arc::clone(&self.0.bus);
            let call = call_id.to_owned();
            tokio::spawn(async move {
                let _ = bus
                    .publish(&call, &bus::BusEvent::CallEnded { reason })
                    .await;
            });
        }
    }

    fn peer_kicked(&self, call_id: &str, peer_id: &str) {
        let peer = peer_id.to_owned();
        if let Some(room) = self.0.rooms.get(call_id) {
            tokio::spawn(async move {
                let _ = room
                    .tx
                    .send(room::Cmd::Kick {
                        peer,
                        publish: true,
                    })
                    .await;
            });
        } else {
            let bus = Arc::clone(&self.0.bus);
            let call = call_id.to_owned();
            tokio::spawn(async move {
                let event = bus::BusEvent::Kick {
                    peer_id: peer,
                    reason: "kicked".into(),
                };
                let _ = bus.publish(&call, &event).await;
            });
        }
    }
}

/// The control plane's [`control::api::CallEvents`] for a [`Signal`] made after it: the
/// control plane's `AppState` is needed to make the `Signal`, and the `Signal` is where the
/// control plane's events go. Holds it weakly, so the two do not keep each other alive.
#[derive(Debug, Default)]
pub struct LateEvents(std::sync::OnceLock<std::sync::Weak<Shared>>);

impl LateEvents {
    /// Connects the events to `signal` (once; later calls change nothing).
    pub fn set(&self, signal: &Signal) {
        let _ = self.0.set(Arc::downgrade(&signal.0));
    }

    fn signal(&self) -> Option<Signal> {
        self.0.get().and_then(std::sync::Weak::upgrade).map(Signal)
    }
}

impl control::api::CallEvents for LateEvents {
    fn call_ended(&self, call_id: &str, reason: &str) {
        if let Some(s) = self.signal() {
            s.call_ended(call_id, reason);
        }
    }

    fn peer_kicked(&self, call_id: &str, peer_id: &str) {
        if let Some(s) = self.signal() {
            s.peer_kicked(call_id, peer_id);
        }
    }
}

/// A JSON error before the upgrade, in the control plane's shape.
fn refuse(status: StatusCode, code: &str, message: &str) -> Response {
    let body = serde_json::json!({"error": {"code": code, "message": message}});
    (status, axum::Json(body)).into_response()
}

fn origin_allowed(shared: &Shared, headers: &HeaderMap) -> bool {
    let origin = match headers.get(axum::http::header::ORIGIN).map(|o| o.to_str()) {
        None => None,
        Some(Ok(o)) => Some(o),
        // Not even text: no browser sends that.
        Some(Err(_)) => return false,
    };
    shared
        .settings
        .origins
        .allows(origin, Some(&shared.app.settings.public_url))
}

async fn upgrade(
    State(signal): State<Signal>,
    ConnectInfo(addr): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    ws: Result<WebSocketUpgrade, axum::extract::ws::rejection::WebSocketUpgradeRejection>,
) -> Response {
    let shared = &signal.0;
    if !origin_allowed(shared, &headers) {
        return refuse(
            StatusCode::FORBIDDEN,
            "origin_not_allowed",
            "this origin may not open signaling sockets",
        );
    }
    let ws = match ws {
        Ok(ws) => ws,
        Err(e) => {
            return refuse(
                StatusCode::BAD_REQUEST,
                "not_websocket",
                &format!("a WebSocket upgrade is required: {e}"),
            )
        }
    };
    if *shared.shutdown.borrow() {
        return refuse(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            "shutting down",
        );
    }
    let Some(slot) = conn::Slot::take(&signal.0) else {
        return refuse(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            "too many connections on this node",
        );
    };
    let Some(pending) = conn::Pending::reserve(&signal.0, addr.ip()) else {
        return refuse(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limited",
            "too many unauthenticated connections from this address",
        );
    };
    let max = shared.settings.max_message;
    let shared = Arc::clone(&signal.0);
    ws.max_message_size(max)
        .max_frame_size(max)
        // Bounds what one socket may hold unsent inside tungstenite; the send queue in front
        // of it is the real bound (frames, not bytes).
        .max_write_buffer_size(max.saturating_mul(4))
        .on_upgrade(move |socket| conn::run(shared, socket, pending, slot))
}
