//! Prometheus metrics of the control plane (prefix `turnpike_control_`). Label values come
//! from fixed sets only (route templates, methods, status classes, results): never ids, names,
//! codes or addresses.

use std::time::Duration;

use axum::http::{Method, StatusCode};
use prometheus::{
    HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts, Registry,
};

/// The control plane's collectors, registered once per process and cheaply cloned.
#[derive(Clone, Debug)]
pub struct ControlMetrics {
    http_requests: IntCounterVec,
    http_duration: HistogramVec,
    calls_created: IntCounter,
    calls_active: IntGauge,
    join_attempts: IntCounterVec,
    credentials_issued: IntCounterVec,
}

/// How a `POST /v1/join` ended (the `result` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum JoinResult {
    /// Admitted.
    Ok,
    /// The code or token did not admit (404 `invalid_or_expired`).
    Invalid,
    /// Refused by a rate limit.
    RateLimited,
    /// The call was full.
    Full,
    /// The store failed.
    Unavailable,
}

impl JoinResult {
    fn label(self) -> &'static str {
        match self {
            Self::Ok => "ok",
            Self::Invalid => "invalid",
            Self::RateLimited => "rate_limited",
            Self::Full => "full",
            Self::Unavailable => "unavailable",
        }
    }
}

/// Who got TURN credentials (the `via` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Via {
    /// `POST /v1/join`.
    Join,
    /// `POST /v1/turn/credentials`.
    Api,
    /// `POST /v1/diagnostics/ice-servers` (the public diagnostics page).
    Diagnostics,
}

/// The `method` label: the standard methods by name, anything else as `other` (a client can
/// send any token as a method; labels must stay a fixed set).
pub(crate) fn method_label(method: &Method) -> &'static str {
    match *method {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PATCH => "PATCH",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        _ => "other",
    }
}

fn status_class(status: StatusCode) -> &'static str {
    match status.as_u16() {
        100..=199 => "1xx",
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        _ => "5xx",
    }
}

impl ControlMetrics {
    /// Creates the collectors and registers them in `registry`.
    pub fn new(registry: &Registry) -> prometheus::Result<Self> {
        let m = Self {
            http_requests: IntCounterVec::new(
                Opts::new(
                    "turnpike_control_http_requests_total",
                    "HTTP requests by route template (`unmatched` for unknown routes), method and status class.",
                ),
                &["route", "method", "status_class"],
            )?,
            http_duration: HistogramVec::new(
                HistogramOpts::new(
                    "turnpike_control_http_request_duration_seconds",
                    "Time to answer an HTTP request (until the response head), by route template and status class.",
                ),
                // The status class too: fast 4xx refusals would otherwise hide slow successes
                // (and a brute-force burst would make latency look better than it is).
                &["route", "status_class"],
            )?,
            calls_created: IntCounter::new(
                "turnpike_control_calls_created_total",
                "Calls created.",
            )?,
            calls_active: IntGauge::new(
                "turnpike_control_calls_active",
                "Calls neither ended nor expired, over all apps (refreshed every few seconds).",
            )?,
            join_attempts: IntCounterVec::new(
                Opts::new(
                    "turnpike_control_join_attempts_total",
                    "POST /v1/join attempts by result (ok, invalid, rate_limited, full, unavailable).",
                ),
                &["result"],
            )?,
            credentials_issued: IntCounterVec::new(
                Opts::new(
                    "turnpike_control_credentials_issued_total",
                    "TURN credentials issued, by path (join, api or diagnostics).",
                ),
                &["via"],
            )?,
        };
        registry.register(Box::new(m.http_requests.clone()))?;
        registry.register(Box::new(m.http_duration.clone()))?;
        registry.register(Box::new(m.calls_created.clone()))?;
        registry.register(Box::new(m.calls_active.clone()))?;
        registry.register(Box::new(m.join_attempts.clone()))?;
        registry.register(Box::new(m.credentials_issued.clone()))?;
        // Every label value exists from the start, so rates work from the first scrape.
        for r in [
            JoinResult::Ok,
            JoinResult::Invalid,
            JoinResult::RateLimited,
            JoinResult::Full,
            JoinResult::Unavailable,
        ] {
            m.join_attempts.with_label_values(&[r.label()]);
        }
        for v in ["join", "api", "diagnostics"] {
            m.credentials_issued.with_label_values(&[v]);
        }
        Ok(m)
    }

    pub(crate) fn observe_request(
        &self,
        route: &str,
        method: &str,
        status: StatusCode,
        elapsed: Duration,
    ) {
        let class = status_class(status);
        self.http_requests
            .with_label_values(&[route, method, class])
            .inc();
        self.http_duration
            .with_label_values(&[route, class])
            .observe(elapsed.as_secs_f64());
    }

    pub(crate) fn call_created(&self) {
        self.calls_created.inc();
    }

    pub(crate) fn set_calls_active(&self, n: u64) {
        self.calls_active.set(i64::try_from(n).unwrap_or(i64::MAX));
    }

    pub(crate) fn join(&self, result: JoinResult) {
        self.join_attempts
            .with_label_values(&[result.label()])
            .inc();
    }

    pub(crate) fn credentials(&self, via: Via) {
        let label = match via {
            Via::Join => "join",
            Via::Api => "api",
            Via::Diagnostics => "diagnostics",
        };
        self.credentials_issued.with_label_values(&[label]).inc();
    }
}
