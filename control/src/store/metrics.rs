//! Prometheus metrics of the Redis store (prefix `turnpike_control_store_`): how long one store
//! operation takes and how often it fails, for the control plane's dashboard and the "Redis
//! errors" alert. The memory store has no such metrics: it neither waits nor fails.

use prometheus::{Histogram, HistogramOpts, IntCounterVec, Opts, Registry};

use super::StoreError;

/// Buckets from 0.5 ms to the store's 4 s operation timeout: a healthy Redis answers in well
/// under a millisecond to a few, a paused one shows up at the timeout.
const BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0,
];

/// The store's collectors, registered once per process and cheaply cloned (each clone feeds
/// the same series).
#[derive(Clone, Debug)]
pub struct StoreMetrics {
    duration: Histogram,
    errors: IntCounterVec,
}

impl StoreMetrics {
    /// Creates the collectors and registers them in `registry`.
    pub fn new(registry: &Registry) -> prometheus::Result<Self> {
        let m = Self {
            duration: Histogram::with_opts(
                HistogramOpts::new(
                    "turnpike_control_store_operation_duration_seconds",
                    "Time of one store operation against Redis.",
                )
                .buckets(BUCKETS.to_vec()),
            )?,
            errors: IntCounterVec::new(
                Opts::new(
                    "turnpike_control_store_errors_total",
                    "Failed store operations against Redis, by kind (unavailable: Redis \
                     unreachable or timed out; corrupt: data the store cannot read).",
                ),
                &["kind"],
            )?,
        };
        registry.register(Box::new(m.duration.clone()))?;
        registry.register(Box::new(m.errors.clone()))?;
        // Both kinds exist at 0 from the start, so an alert on their rate works from the first
        // scrape instead of only after the first error.
        for kind in ["unavailable", "corrupt"] {
            m.errors.with_label_values(&[kind]);
        }
        Ok(m)
    }

    /// Records one operation's duration in seconds.
    pub(crate) fn observe(&self, seconds: f64) {
        self.duration.observe(seconds);
    }

    /// Counts a failed operation by its kind.
    pub(crate) fn error(&self, e: &StoreError) {
        let kind = match e {
            StoreError::Unavailable(_) => "unavailable",
            StoreError::Corrupt(_) => "corrupt",
        };
        self.errors.with_label_values(&[kind]).inc();
    }
}
