//! Call quality from a client's `stats` report: validation, and an estimated MOS computed on the
//! server so that every client is scored by the same formula.
//!
//! # The E-model, simplified
//!
//! ITU-T G.107 rates a call by a transmission rating `R` (0–100) from which the MOS follows
//! (G.107 Annex B: `MOS = 1 + 0.035 R + 7·10⁻⁶ R (R − 60)(100 − R)`). The full model needs codec
//! and terminal parameters a browser does not report, so this uses the reduction common in VoIP
//! monitoring (after Cole & Rosenbluth, "Voice over IP performance monitoring", 2001): start
//! from the default `R₀ = 93.2`; the delay impairment uses an effective latency of one-way delay
//! (`rtt/2`) plus twice the jitter (a jitter buffer's cost) plus 10 ms of codec delay, costing
//! `eff/40` below 160 ms and `(eff − 120)/10` above (the knee where conversation suffers);
//! the loss impairment is `2.5` points per percent lost (a codec without strong concealment; it
//! errs on the side of flagging lossy calls). Absolute values are estimates; the point is that
//! they are comparable between calls and clients.

use serde::Deserialize;

/// Longest RTT or jitter accepted (ms): anything above is a broken client, not a call.
const MAX_MS: f64 = 60_000.0;
/// Highest bitrate accepted (kbit/s): 100 Mbit/s is far above any WebRTC call.
const MAX_KBPS: f64 = 100_000.0;

/// How the selected ICE candidate pair reaches the other side (the local candidate's type).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CandidateType {
    /// Directly, from a local address.
    Host,
    /// Directly, through a NAT (STUN).
    Srflx,
    /// Directly, peer-reflexive.
    Prflx,
    /// Through the TURN relay.
    Relay,
}

impl CandidateType {
    /// Every value, for pre-creating metric series.
    pub const ALL: [Self; 4] = [Self::Host, Self::Srflx, Self::Prflx, Self::Relay];

    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Host => "host",
            Self::Srflx => "srflx",
            Self::Prflx => "prflx",
            Self::Relay => "relay",
        }
    }
}

/// The transport between the client and the relay (`none` when not relayed).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RelayProtocol {
    /// TURN over UDP.
    Udp,
    /// TURN over TCP.
    Tcp,
    /// TURN over TLS.
    Tls,
    /// Not relayed.
    None,
}

impl RelayProtocol {
    /// Every value, for pre-creating metric series.
    pub const ALL: [Self; 4] = [Self::Udp, Self::Tcp, Self::Tls, Self::None];

    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Udp => "udp",
            Self::Tcp => "tcp",
            Self::Tls => "tls",
            Self::None => "none",
        }
    }
}

/// A validated `stats` report.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Report {
    /// Round-trip time, ms.
    pub rtt_ms: f64,
    /// Jitter, ms.
    pub jitter_ms: f64,
    /// Fraction of packets lost, 0–1.
    pub packet_loss: f64,
    /// Receive bitrate, kbit/s, when reported.
    pub bitrate_kbps: Option<f64>,
    /// How the selected pair connects.
    pub candidate_type: CandidateType,
    /// Transport to the relay.
    pub relay_protocol: RelayProtocol,
}

/// Why a report was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QualityError {
    /// Missing, extra or mistyped fields, or an unknown candidate type or protocol.
    #[error("invalid stats: {0}")]
    Shape(String),
    /// A number that is not finite, negative, or out of its range.
    #[error("stats field {0} out of range")]
    Range(&'static str),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Raw {
    rtt_ms: f64,
    jitter_ms: f64,
    packet_loss: f64,
    #[serde(default)]
    bitrate_kbps: Option<f64>,
    candidate_type: CandidateType,
    relay_protocol: RelayProtocol,
}

fn check(name: &'static str, v: f64, max: f64) -> Result<f64, QualityError> {
    if v.is_finite() && (0.0..=max).contains(&v) {
        Ok(v)
    } else {
        Err(QualityError::Range(name))
    }
}

impl Report {
    /// Reads and validates the body of a `stats` message (without `v` and `type`).
    pub fn from_json(body: serde_json::Value) -> Result<Self, QualityError> {
        let raw: Raw =
            serde_json::from_value(body).map_err(|e| QualityError::Shape(e.to_string()))?;
        Ok(Self {
            rtt_ms: check("rtt_ms", raw.rtt_ms, MAX_MS)?,
            jitter_ms: check("jitter_ms", raw.jitter_ms, MAX_MS)?,
            packet_loss: check("packet_loss", raw.packet_loss, 1.0)?,
            bitrate_kbps: raw
                .bitrate_kbps
                .map(|b| check("bitrate_kbps", b, MAX_KBPS))
                .transpose()?,
            candidate_type: raw.candidate_type,
            relay_protocol: raw.relay_protocol,
        })
    }

    /// The estimated MOS of this report.
    pub fn mos(&self) -> f64 {
        mos(self.rtt_ms, self.jitter_ms, self.packet_loss)
    }

    /// A number below 16 for the (candidate type, relay protocol) pair, one per pair.
    pub fn connection_kind_index(&self) -> u32 {
        let c = CandidateType::ALL
            .iter()
            .position(|c| *c == self.candidate_type)
            .unwrap_or(0);
        let p = RelayProtocol::ALL
            .iter()
            .position(|p| *p == self.relay_protocol)
            .unwrap_or(0);
        (c * RelayProtocol::ALL.len() + p) as u32
    }

    /// The per-participant summary kept with the call (`GET /v1/calls/{id}`): this report's
    /// figures, and `reports`, how many of the connection's reports have counted so far.
    pub fn summary(&self, now_ms: u64, reports: u64) -> control::store::Quality {
        control::store::Quality {
            rtt_ms: self.rtt_ms,
            jitter_ms: self.jitter_ms,
            packet_loss: self.packet_loss,
            bitrate_kbps: self.bitrate_kbps,
            mos: self.mos(),
            candidate_type: self.candidate_type.as_str().to_owned(),
            relay_protocol: self.relay_protocol.as_str().to_owned(),
            updated_at: now_ms,
            reports,
        }
    }
}

/// Estimated MOS (1–4.5) from RTT and jitter in ms and the loss ratio (see the module doc).
pub fn mos(rtt_ms: f64, jitter_ms: f64, packet_loss: f64) -> f64 {
    let effective = rtt_ms / 2.0 + 2.0 * jitter_ms + 10.0;
    let delay = if effective < 160.0 {
        effective / 40.0
    } else {
        (effective - 120.0) / 10.0
    };
    let loss = packet_loss.clamp(0.0, 1.0) * 100.0 * 2.5;
    let r = (93.2 - delay - loss).clamp(0.0, 100.0);
    let mos = 1.0 + 0.035 * r + 7.0e-6 * r * (r - 60.0) * (100.0 - r);
    mos.clamp(1.0, 4.5)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use serde_json::json;

    use super::*;

    #[test]
    fn a_perfect_network_scores_about_four_point_four() {
        let m = mos(0.0, 0.0, 0.0);
        assert!((4.35..=4.45).contains(&m), "{m}");
    }

    #[test]
    fn worse_networks_score_lower() {
        assert!(mos(300.0, 5.0, 0.0) < mos(50.0, 5.0, 0.0));
        assert!(mos(50.0, 5.0, 0.10) < 3.5);
        let mut last = f64::INFINITY;
        for rtt in (0..2000).step_by(50) {
            let m = mos(f64::from(rtt), 5.0, 0.01);
            assert!(m <= last, "not monotonic in rtt at {rtt}");
            last = m;
        }
        let mut last = f64::INFINITY;
        for j in 0..200 {
            let m = mos(50.0, f64::from(j), 0.01);
            assert!(m <= last, "not monotonic in jitter at {j}");
            last = m;
        }
        let mut last = f64::INFINITY;
        for l in 0..=100 {
            let m = mos(50.0, 5.0, f64::from(l) / 100.0);
            assert!(m <= last, "not monotonic in loss at {l}");
            assert!((1.0..=4.5).contains(&m));
            last = m;
        }
    }

    fn body(rtt: serde_json::Value, loss: serde_json::Value) -> serde_json::Value {
        json!({"rtt_ms": rtt, "jitter_ms": 2, "packet_loss": loss,
               "candidate_type": "relay", "relay_protocol": "udp"})
    }

    #[test]
    fn reports_are_validated() {
        let r = Report::from_json(body(json!(40), json!(0.01))).unwrap();
        assert_eq!(r.candidate_type, CandidateType::Relay);
        assert_eq!(r.bitrate_kbps, None);
        assert_eq!(
            Report::from_json(body(json!(-1), json!(0))).unwrap_err(),
            QualityError::Range("rtt_ms")
        );
        assert_eq!(
            Report::from_json(body(json!(1), json!(1.5))).unwrap_err(),
            QualityError::Range("packet_loss")
        );
        assert!(Report::from_json(body(json!(1e12), json!(0))).is_err());
        assert!(Report::from_json(body(json!("fast"), json!(0))).is_err());
        let mut b = body(json!(1), json!(0));
        b["candidate_type"] = json!("carrier-pigeon");
        assert!(matches!(Report::from_json(b), Err(QualityError::Shape(_))));
        let mut b = body(json!(1), json!(0));
        b["extra"] = json!(1);
        assert!(Report::from_json(b).is_err());
    }
}
