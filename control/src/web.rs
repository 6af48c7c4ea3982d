//! The browser side, embedded in the binary: the join page (`/join/{code}`, `/join#token=…`),
//! the JS SDK (`/sdk/turnpike.js`), the diagnostics page (`/diagnostics`) and their scripts and
//! style sheet (`/assets/{file}`). Every file is compiled in with `include_str!`: nothing is
//! read from disk at run time, so `turnpike serve` needs no web server or asset directory.
//!
//! Every answer carries a strict Content Security Policy (no inline scripts or styles, no
//! third-party origins; the pages are written for it), `X-Content-Type-Options: nosniff` and
//! `Referrer-Policy: no-referrer` (a join URL carries the call's code). Pages are `no-store`;
//! scripts and the style sheet `no-cache` (revalidated, so an upgrade is seen at once).

use axum::http::{header, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;

use crate::api::ApiError;

const JOIN_HTML: &str = include_str!("../web/join.html");
const DIAGNOSTICS_HTML: &str = include_str!("../web/diagnostics.html");
const SDK_JS: &str = include_str!("../web/turnpike.js");
const JOIN_JS: &str = include_str!("../web/join.js");
const DIAGNOSTICS_JS: &str = include_str!("../web/diagnostics.js");
const STYLE_CSS: &str = include_str!("../web/style.css");

/// The Content Security Policy of every page and asset.
///
/// - `connect-src 'self' ws: wss:`: the SDK calls the API on its own origin and opens the
///   signaling WebSocket at the `signal_url` the API returns. Some browsers do not count
///   `ws:`/`wss:` of the same host as `'self'`, and `signal_url` may name another host when
///   signaling runs on its own nodes; signaling checks `Origin` itself.
/// - `media-src 'self' blob: mediastream:`: video elements play `MediaStream`s.
/// - `img-src data: blob:`: nothing uses them yet beyond what browsers render for video
///   posters; harmless without `script-src` leeway.
pub const CSP: &str = "default-src 'self'; script-src 'self'; style-src 'self'; \
                       img-src 'self' data: blob:; media-src 'self' blob: mediastream:; \
                       connect-src 'self' ws: wss:; frame-ancestors 'none'; base-uri 'none'; \
                       form-action 'self'";

const HTML: &str = "text/html; charset=utf-8";
const JS: &str = "text/javascript; charset=utf-8";
const CSS: &str = "text/css; charset=utf-8";

/// The pages, the SDK and the assets; merged into [`crate::router`] (so the API's layers,
/// metrics with route templates and the JSON fallback apply).
pub(crate) fn routes<S: Clone + Send + Sync + 'static>() -> Router<S> {
    Router::new()
        .route("/join", get(join_page))
        .route("/join/{code}", get(join_page))
        .route("/diagnostics", get(diagnostics_page))
        .route("/sdk/turnpike.js", get(sdk))
        .route("/assets/{file}", get(asset))
}

/// `body` as `content_type` with the security headers; `no-store` for pages (they may sit
/// behind a join code), `no-cache` for scripts and styles.
fn file(content_type: &'static str, body: &'static str) -> Response {
    let cache = if content_type == HTML {
        "no-store"
    } else {
        "no-cache"
    };
    let headers: [(HeaderName, HeaderValue); 5] = [
        (header::CONTENT_TYPE, HeaderValue::from_static(content_type)),
        (
            header::CONTENT_SECURITY_POLICY,
            HeaderValue::from_static(CSP),
        ),
        (
            header::X_CONTENT_TYPE_OPTIONS,
            HeaderValue::from_static("nosniff"),
        ),
        (
            header::REFERRER_POLICY,
            HeaderValue::from_static("no-referrer"),
        ),
        (header::CACHE_CONTROL, HeaderValue::from_static(cache)),
    ];
    (StatusCode::OK, headers, body).into_response()
}

/// `/join` and `/join/{code}`: the page reads the code from its path and a participant token
/// from its fragment (never sent to the server), so the code is not looked at here.
async fn join_page() -> Response {
    file(HTML, JOIN_HTML)
}

async fn diagnostics_page() -> Response {
    file(HTML, DIAGNOSTICS_HTML)
}

/// The SDK, importable from any origin (a module script is fetched in CORS mode): a public
/// file with nothing in it that depends on who asks.
async fn sdk() -> Response {
    let mut r = file(JS, SDK_JS);
    r.headers_mut().insert(
        header::ACCESS_CONTROL_ALLOW_ORIGIN,
        HeaderValue::from_static("*"),
    );
    r
}

/// A fixed set of files: anything else is the API's JSON 404.
async fn asset(axum::extract::Path(name): axum::extract::Path<String>) -> Response {
    match name.as_str() {
        "join.js" => file(JS, JOIN_JS),
        "diagnostics.js" => file(JS, DIAGNOSTICS_JS),
        "style.css" => file(CSS, STYLE_CSS),
        _ => ApiError::NotFound.into_response(),
    }
}
