//! The admin listener: `/metrics` (Prometheus text), `/live` and `/ready`. It belongs on a
//! private address (default `127.0.0.1:9641`); metrics are served nowhere else.

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use prometheus::{Encoder as _, Registry, TextEncoder};
use tokio::net::TcpListener;

/// What the admin endpoints read.
#[derive(Clone, Debug)]
pub struct AdminState {
    /// Every collector of the process.
    pub registry: Registry,
    /// Readiness flags of the components; `/ready` is 200 only when all are set.
    pub ready: Vec<Arc<AtomicBool>>,
}

/// The admin routes.
pub fn router(state: AdminState) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/live", get(|| async { "ok\n" }))
        .route("/ready", get(ready))
        .with_state(state)
}

async fn metrics(State(s): State<AdminState>) -> impl IntoResponse {
    let mut body = Vec::new();
    match TextEncoder::new().encode(&s.registry.gather(), &mut body) {
        Ok(()) => (
            StatusCode::OK,
            [(header::CONTENT_TYPE, prometheus::TEXT_FORMAT)],
            body,
        )
            .into_response(),
        Err(e) => {
            tracing::error!(error = %e, "encoding metrics failed");
            (
                StatusCode::INTERNAL_SERVER_ERROR,
                "metrics encoding failed\n",
            )
                .into_response()
        }
    }
}

async fn ready(State(s): State<AdminState>) -> impl IntoResponse {
    if s.ready.iter().all(|r| r.load(Ordering::Relaxed)) {
        (StatusCode::OK, "ready\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
    }
}

/// Serves the admin routes on `listener` until `shutdown` completes.
pub async fn serve(
    listener: TcpListener,
    state: AdminState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router(state))
        .with_graceful_shutdown(shutdown)
        .await
}
