//! Prometheus metrics of signaling (`turnpike_signal_`) and of call quality (`turnpike_call_`).
//! Label values come from fixed sets only (message types, reasons, candidate types,
//! protocols): never peer ids, call ids, names or addresses. Per-call figures go to
//! `GET /v1/calls/{id}` instead.

use prometheus::{Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry};

use crate::quality::{CandidateType, RelayProtocol, Report};

/// Client → server message types (`type` label of `turnpike_signal_messages_total`):
/// the protocol's types, `unknown` for any other, `invalid` for frames that are not a message,
/// `rate_limited` for messages refused by the rate limit.
const IN_TYPES: [&str; 11] = [
    "auth",
    "offer",
    "answer",
    "candidate",
    "media",
    "stats",
    "leave",
    "ping",
    "unknown",
    "invalid",
    "rate_limited",
];
/// Server → client message types.
const OUT_TYPES: [&str; 12] = [
    "welcome",
    "peer_joined",
    "peer_left",
    "offer",
    "answer",
    "candidate",
    "media",
    "ice_servers",
    "token",
    "call_ended",
    "error",
    "pong",
];

/// Why a connection ended (`reason` label of `turnpike_signal_disconnects_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DisconnectReason {
    /// Sent `leave`.
    Leave,
    /// The client closed or the network dropped it.
    Closed,
    /// No `auth` within `signal.auth-timeout`.
    AuthTimeout,
    /// The token or the participant was refused.
    AuthFailed,
    /// Nothing received within `signal.idle-timeout`.
    IdleTimeout,
    /// A frame or message above `signal.max-message` (1009).
    TooLarge,
    /// Kept sending past the rate limit (1008).
    RateLimited,
    /// Did not read: its send queue filled up, or one frame could not be written in time.
    SlowReader,
    /// Removed through the API.
    Kicked,
    /// The call ended.
    CallEnded,
    /// Binary frames, or frames that break the WebSocket protocol (a connection that merely
    /// ends without a close frame counts as `Closed`).
    ProtocolError,
    /// The server is stopping (1001).
    Shutdown,
    /// The same peer connected again (another tab, a reconnect, another node).
    Replaced,
    /// The store could not be reached to authenticate (1013: try again shortly).
    Unavailable,
}

impl DisconnectReason {
    const ALL: [Self; 14] = [
        Self::Leave,
        Self::Closed,
        Self::AuthTimeout,
        Self::AuthFailed,
        Self::IdleTimeout,
        Self::TooLarge,
        Self::RateLimited,
        Self::SlowReader,
        Self::Kicked,
        Self::CallEnded,
        Self::ProtocolError,
        Self::Shutdown,
        Self::Replaced,
        Self::Unavailable,
    ];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Leave => "leave",
            Self::Closed => "closed",
            Self::AuthTimeout => "auth_timeout",
            Self::AuthFailed => "auth_failed",
            Self::IdleTimeout => "idle_timeout",
            Self::TooLarge => "too_large",
            Self::RateLimited => "rate_limited",
            Self::SlowReader => "slow_reader",
            Self::Kicked => "kicked",
            Self::CallEnded => "call_ended",
            Self::ProtocolError => "protocol_error",
            Self::Shutdown => "shutdown",
            Self::Replaced => "replaced",
            Self::Unavailable => "unavailable",
        }
    }
}

/// Why authentication failed (`reason` label of `turnpike_signal_auth_failures_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthFailure {
    /// Not a token, or the first message was not `auth`.
    Malformed,
    /// `alg` other than HS256, or a wrong `typ`.
    Algorithm,
    /// No or unknown `kid`.
    UnknownKey,
    /// Bad signature.
    Signature,
    /// Past `exp`.
    Expired,
    /// Before `nbf`.
    NotYetValid,
    /// Wrong `iss` or `aud`.
    Audience,
    /// A kicked participant, or a token that is not the participant's current one.
    Revoked,
    /// The call ended or does not exist.
    CallGone,
    /// A valid token of a participant that is gone for good: it sent `leave`, or its resume
    /// window ran out. Its seat may belong to someone else by now; a fresh `/v1/join` admits
    /// it again.
    Left,
    /// A valid token, but the room has no seat left: another node still counted a seat the
    /// store had let go (see `JoinRefused::Full`).
    Full,
}

impl AuthFailure {
    const ALL: [Self; 11] = [
        Self::Malformed,
        Self::Algorithm,
        Self::UnknownKey,
        Self::Signature,
        Self::Expired,
        Self::NotYetValid,
        Self::Audience,
        Self::Revoked,
        Self::CallGone,
        Self::Left,
        Self::Full,
    ];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Malformed => "malformed",
            Self::Algorithm => "algorithm",
            Self::UnknownKey => "unknown_key",
            Self::Signature => "signature",
            Self::Expired => "expired",
            Self::NotYetValid => "not_yet_valid",
            Self::Audience => "audience",
            Self::Revoked => "revoked",
            Self::CallGone => "call_gone",
            Self::Left => "left",
            Self::Full => "full",
        }
    }
}

/// The collectors, registered once per process and cheaply cloned.
#[derive(Clone, Debug)]
pub struct SignalMetrics {
    connections_active: IntGauge,
    connections_unauthenticated: IntGauge,
    messages_in: IntCounterVec,
    messages_out: IntCounterVec,
    disconnects: IntCounterVec,
    auth_failures: IntCounterVec,
    bus_errors: IntCounter,
    bus_dropped: IntCounter,
    rtt: Histogram,
    jitter: Histogram,
    loss: Histogram,
    mos: Histogram,
    connection_types: IntCounterVec,
}

fn histogram(
    registry: &Registry,
    name: &str,
    help: &str,
    buckets: Vec<f64>,
) -> prometheus::Result<Histogram> {
    let h = Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets))?;
    registry.register(Box::new(h.clone()))?;
    Ok(h)
}

fn counter_vec(
    registry: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
) -> prometheus::Result<IntCounterVec> {
    let c = IntCounterVec::new(Opts::new(name, help), labels)?;
    registry.register(Box::new(c.clone()))?;
    Ok(c)
}

impl SignalMetrics {
    /// Registers every collector on `registry`, with every label combination at 0 (so
    /// dashboards and alerts have series from the start).
    pub fn new(registry: &Registry) -> prometheus::Result<Self> {
        let gauge = |name: &str, help: &str| -> prometheus::Result<IntGauge> {
            let g = IntGauge::new(name, help)?;
            registry.register(Box::new(g.clone()))?;
            Ok(g)
        };
        let counter = |name: &str, help: &str| -> prometheus::Result<IntCounter> {
            let c = IntCounter::new(name, help)?;
            registry.register(Box::new(c.clone()))?;
            Ok(c)
        };
        let m = Self {
            connections_active: gauge(
                "turnpike_signal_connections_active",
                "Authenticated signaling WebSocket connections open.",
            )?,
            connections_unauthenticated: gauge(
                "turnpike_signal_connections_unauthenticated",
                "Signaling WebSocket connections open that have not authenticated yet.",
            )?,
            messages_in: counter_vec(
                registry,
                "turnpike_signal_messages_total",
                "Client-to-server signaling messages received, by type.",
                &["type"],
            )?,
            messages_out: counter_vec(
                registry,
                "turnpike_signal_messages_sent_total",
                "Server-to-client signaling messages written, by type.",
                &["type"],
            )?,
            disconnects: counter_vec(
                registry,
                "turnpike_signal_disconnects_total",
                "Signaling connections ended, by reason.",
                &["reason"],
            )?,
            auth_failures: counter_vec(
                registry,
                "turnpike_signal_auth_failures_total",
                "Signaling authentications refused, by reason.",
                &["reason"],
            )?,
            bus_errors: counter(
                "turnpike_signal_bus_errors_total",
                "Failed reads and writes of the inter-node bus (Redis).",
            )?,
            bus_dropped: counter(
                "turnpike_signal_bus_dropped_total",
                "Bus events dropped because a queue was full.",
            )?,
            rtt: histogram(
                registry,
                "turnpike_call_rtt_seconds",
                "Round-trip time reported by call participants.",
                vec![0.01, 0.025, 0.05, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.0],
            )?,
            jitter: histogram(
                registry,
                "turnpike_call_jitter_seconds",
                "Jitter reported by call participants.",
                vec![0.001, 0.005, 0.01, 0.02, 0.03, 0.05, 0.1, 0.2, 0.5],
            )?,
            loss: histogram(
                registry,
                "turnpike_call_packet_loss_ratio",
                "Packet loss ratio (0-1) reported by call participants.",
                vec![0.0, 0.001, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0],
            )?,
            mos: histogram(
                registry,
                "turnpike_call_mos",
                "Estimated mean opinion score (E-model, 1-4.5) of participants' reports.",
                vec![1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0, 4.2, 4.4, 4.5],
            )?,
            connection_types: counter_vec(
                registry,
                "turnpike_call_connections_total",
                "Participant connections by selected candidate type and relay protocol.",
                &["candidate_type", "relay_protocol"],
            )?,
        };
        for t in IN_TYPES {
            m.messages_in.with_label_values(&[t]);
        }
        for t in OUT_TYPES {
            m.messages_out.with_label_values(&[t]);
        }
        for r in DisconnectReason::ALL {
            m.disconnects.with_label_values(&[r.as_str()]);
        }
        for r in AuthFailure::ALL {
            m.auth_failures.with_label_values(&[r.as_str()]);
        }
        for c in CandidateType::ALL {
            for p in RelayProtocol::ALL {
                m.connection_types
                    .with_label_values(&[c.as_str(), p.as_str()]);
            }
        }
        Ok(m)
    }

    /// Authenticated connections.
    pub fn connections_active(&self) -> &IntGauge {
        &self.connections_active
    }

    /// Unauthenticated connections.
    pub fn connections_unauthenticated(&self) -> &IntGauge {
        &self.connections_unauthenticated
    }

    /// A client message of type label `label` (see `protocol::type_label`); labels outside the
    /// fixed set count as `unknown`.
    pub fn message_in(&self, label: &str) {
        let label = IN_TYPES
            .iter()
            .find(|t| **t == label)
            .copied()
            .unwrap_or("unknown");
        self.messages_in.with_label_values(&[label]).inc();
    }

    /// A server message written.
    pub fn message_out(&self, label: &'static str) {
        let label = OUT_TYPES
            .iter()
            .find(|t| **t == label)
            .copied()
            .unwrap_or("error");
        self.messages_out.with_label_values(&[label]).inc();
    }

    /// A connection ended.
    pub fn disconnect(&self, reason: DisconnectReason) {
        self.disconnects.with_label_values(&[reason.as_str()]).inc();
    }

    /// An authentication was refused.
    pub fn auth_failure(&self, reason: AuthFailure) {
        self.auth_failures
            .with_label_values(&[reason.as_str()])
            .inc();
    }

    /// A bus read or write failed.
    pub fn bus_error(&self) {
        self.bus_errors.inc();
    }

    /// A bus event was dropped.
    pub fn bus_dropped(&self) {
        self.bus_dropped.inc();
    }

    /// A quality report: RTT and jitter in seconds, loss ratio, MOS.
    pub fn observe_report(&self, r: &Report) {
        self.rtt.observe(r.rtt_ms / 1000.0);
        self.jitter.observe(r.jitter_ms / 1000.0);
        self.loss.observe(r.packet_loss);
        self.mos.observe(r.mos());
    }

    /// A connection's (new) candidate type and relay protocol.
    pub fn count_connection_type(&self, c: CandidateType, p: RelayProtocol) {
        self.connection_types
            .with_label_values(&[c.as_str(), p.as_str()])
            .inc();
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn every_series_exists_from_the_start_and_labels_stay_fixed() {
        let registry = Registry::new();
        let m = SignalMetrics::new(&registry).unwrap();
        m.message_in("x-evil");
        m.message_out("nonsense");
        let families = registry.gather();
        let find = |name: &str| families.iter().find(|f| f.name() == name).unwrap();
        let msgs = find("turnpike_signal_messages_total");
        assert_eq!(msgs.get_metric().len(), IN_TYPES.len());
        let unknown = msgs
            .get_metric()
            .iter()
            .find(|s| s.get_label()[0].value() == "unknown")
            .unwrap();
        assert_eq!(unknown.get_counter().get_value(), 1.0);
        assert_eq!(
            find("turnpike_call_connections_total").get_metric().len(),
            16
        );
        assert_eq!(
            find("turnpike_signal_disconnects_total").get_metric().len(),
            14
        );
    }

    #[test]
    fn a_report_moves_every_histogram() {
        let registry = Registry::new();
        let m = SignalMetrics::new(&registry).unwrap();
        let r = Report::from_json(serde_json::json!({"rtt_ms": 40, "jitter_ms": 4,
            "packet_loss": 0.01, "candidate_type": "relay", "relay_protocol": "tls"}))
        .unwrap();
        m.observe_report(&r);
        for f in registry.gather() {
            if f.name().starts_with("turnpike_call_")
                && f.name() != "turnpike_call_connections_total"
            {
                let h = f.get_metric()[0].get_histogram();
                assert_eq!(h.get_sample_count(), 1, "{}", f.name());
            }
        }
        let rtt = registry
            .gather()
            .into_iter()
            .find(|f| f.name() == "turnpike_call_rtt_seconds")
            .unwrap();
        assert!((rtt.get_metric()[0].get_histogram().get_sample_sum() - 0.04).abs() < 1e-9);
    }
}
