//! Prometheus metrics of the relay (prefix `turnpike_relay_`). Labels come only from the fixed
//! enums of `relay-proto` and this crate: never usernames, IPs or ports.
//!
//! The core keeps plain counters; each shard copies the increase into these collectors on every
//! timer tick ([`crate::TICK`]), so the data path never touches an atomic shared with another
//! thread.
//!
//! Revocations ([`crate::Revoker`]) show in four places: `turnpike_relay_revocations_total`
//! (per `revoke` call, by [`RevocationResult`], counted by the handle itself),
//! `turnpike_relay_revocations_applied_total` and `turnpike_relay_revocations_evicted_total`
//! (per shard and summed: every shard applies every revocation and keeps its own table, so with
//! nothing dropped, applied = revocations × shards), `turnpike_relay_allocations_ended_total`
//! with reason `revoked` (allocations torn down) and `turnpike_relay_auth_failures_total` with
//! reason `revoked` (requests of a revoked group refused with 401). Groups are never labels.

use prometheus::{IntCounterVec, IntGaugeVec, Opts, Registry};
use relay_proto::{
    AllocResult, AuthFailure, DeleteReason, DenyReason, Direction, DropReason, Stats, Transport,
};

use crate::{DriverDrop, RevocationResult, StreamClose};

/// The label values of a collector without labels.
const NO_LABELS: &[&str] = &[];

/// Values of the `framing` label of `turnpike_relay_packets_total`.
const FRAMINGS: [&str; 2] = ["channel_data", "indication"];

/// Every relay collector, registered once per process and shared (cheaply cloned) by shards.
#[derive(Clone, Debug)]
pub struct RelayMetrics {
    allocations_active: IntGaugeVec,
    allocation_requests: IntCounterVec,
    allocations_ended: IntCounterVec,
    packets: IntCounterVec,
    bytes: IntCounterVec,
    dropped: IntCounterVec,
    auth_failures: IntCounterVec,
    peers_denied: IntCounterVec,
    binding_requests: IntCounterVec,
    relay_ports_available: IntGaugeVec,
    relay_ports_total: IntGaugeVec,
    shard_packets: IntCounterVec,
    shard_allocations: IntGaugeVec,
    stream_connections: IntGaugeVec,
    stream_closed: IntCounterVec,
    short_circuit: IntCounterVec,
    revocations: IntCounterVec,
    revocations_applied: IntCounterVec,
    revocations_evicted: IntCounterVec,
}

fn counter(
    r: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
) -> prometheus::Result<IntCounterVec> {
    let c = IntCounterVec::new(Opts::new(name, help), labels)?;
    r.register(Box::new(c.clone()))?;
    Ok(c)
}

fn gauge(r: &Registry, name: &str, help: &str, labels: &[&str]) -> prometheus::Result<IntGaugeVec> {
    let g = IntGaugeVec::new(Opts::new(name, help), labels)?;
    r.register(Box::new(g.clone()))?;
    Ok(g)
}

impl RelayMetrics {
    /// Creates and registers the collectors.
    pub fn register(r: &Registry) -> prometheus::Result<Self> {
        let m = Self {
            allocations_active: gauge(
                r,
                "turnpike_relay_allocations_active",
                "Allocations currently held (including those binding their relay socket), by client transport.",
                &["transport"],
            )?,
            allocation_requests: counter(
                r,
                "turnpike_relay_allocation_requests_total",
                "Allocate requests by client transport and result (unauthenticated includes the normal first 401).",
                &["transport", "result"],
            )?,
            allocations_ended: counter(
                r,
                "turnpike_relay_allocations_ended_total",
                "Allocations ended, by reason.",
                &["reason"],
            )?,
            packets: counter(
                r,
                "turnpike_relay_packets_total",
                "Packets relayed, by client transport, direction and framing (channel_data or indication).",
                &["transport", "direction", "framing"],
            )?,
            bytes: counter(
                r,
                "turnpike_relay_bytes_total",
                "Application bytes relayed (without TURN framing), by client transport and direction.",
                &["transport", "direction"],
            )?,
            dropped: counter(
                r,
                "turnpike_relay_dropped_packets_total",
                "Datagrams and stream frames dropped without an answer, by reason.",
                &["reason"],
            )?,
            auth_failures: counter(
                r,
                "turnpike_relay_auth_failures_total",
                "Requests that failed authentication, by reason.",
                &["reason"],
            )?,
            peers_denied: counter(
                r,
                "turnpike_relay_peers_denied_total",
                "Peer addresses refused by the peer policy, by reason.",
                &["reason"],
            )?,
            binding_requests: counter(
                r,
                "turnpike_relay_binding_requests_total",
                "STUN Binding requests answered, by transport.",
                &["transport"],
            )?,
            relay_ports_available: gauge(
                r,
                "turnpike_relay_ports_available",
                "Free relay ports across all shards, by address family.",
                &["family"],
            )?,
            relay_ports_total: gauge(
                r,
                "turnpike_relay_ports_configured",
                "Relay ports configured across all shards (free or in use), by address family.",
                &["family"],
            )?,
            shard_packets: counter(
                r,
                "turnpike_relay_shard_packets_total",
                "Packets relayed by one shard (relay thread), both directions and every transport: how evenly the load spreads.",
                &["shard"],
            )?,
            shard_allocations: gauge(
                r,
                "turnpike_relay_shard_allocations",
                "Allocations held by one shard (relay thread).",
                &["shard"],
            )?,
            stream_connections: gauge(
                r,
                "turnpike_relay_stream_connections_active",
                "Open TCP/TLS client connections, by transport (TLS counts once its handshake is done).",
                &["transport"],
            )?,
            stream_closed: counter(
                r,
                "turnpike_relay_stream_connections_closed_total",
                "TCP/TLS client connections closed, by reason (limits that trip have their own reason).",
                &["reason"],
            )?,
            short_circuit: counter(
                r,
                "turnpike_relay_short_circuit_packets_total",
                "Client-to-peer packets handed straight to another allocation on this server instead of through the kernel, by path (same_shard, cross_shard).",
                &["path"],
            )?,
            revocations: counter(
                r,
                "turnpike_relay_revocations_total",
                "Credential-group revocations handed to the relay, by result (delivered to every shard, dropped on a full shard queue, invalid group).",
                &["result"],
            )?,
            revocations_applied: counter(
                r,
                "turnpike_relay_revocations_applied_total",
                "Revocations applied by shards, summed over shards (each shard applies every revocation).",
                &[],
            )?,
            revocations_evicted: counter(
                r,
                "turnpike_relay_revocations_evicted_total",
                "Revoked groups forgotten before their time because a shard's table was full, summed over shards.",
                &[],
            )?,
        };
        // Touch every label value so each series exists (at 0) from the first scrape: rate()
        // and alerts then work without waiting for the first event.
        for t in Transport::ALL {
            let t = t.as_str();
            m.allocations_active.with_label_values(&[t]);
            m.binding_requests.with_label_values(&[t]);
            for v in AllocResult::ALL {
                m.allocation_requests.with_label_values(&[t, v.as_str()]);
            }
            for d in Direction::ALL {
                for f in FRAMINGS {
                    m.packets.with_label_values(&[t, d.as_str(), f]);
                }
                m.bytes.with_label_values(&[t, d.as_str()]);
            }
        }
        for t in [Transport::Tcp, Transport::Tls] {
            m.stream_connections.with_label_values(&[t.as_str()]);
        }
        for v in StreamClose::ALL {
            m.stream_closed.with_label_values(&[v.as_str()]);
        }
        for path in ["same_shard", "cross_shard"] {
            m.short_circuit.with_label_values(&[path]);
        }
        for v in RevocationResult::ALL {
            m.revocations.with_label_values(&[v.as_str()]);
        }
        m.revocations_applied.with_label_values(NO_LABELS);
        m.revocations_evicted.with_label_values(NO_LABELS);
        for v in DeleteReason::ALL {
            m.allocations_ended.with_label_values(&[v.as_str()]);
        }
        for v in DropReason::ALL {
            m.dropped.with_label_values(&[v.as_str()]);
        }
        for v in DriverDrop::ALL {
            m.dropped.with_label_values(&[v.as_str()]);
        }
        for v in AuthFailure::ALL {
            m.auth_failures.with_label_values(&[v.as_str()]);
        }
        for v in DenyReason::ALL {
            m.peers_denied.with_label_values(&[v.as_str()]);
        }
        for f in ["ipv4", "ipv6"] {
            m.relay_ports_available.with_label_values(&[f]);
            m.relay_ports_total.with_label_values(&[f]);
        }
        Ok(m)
    }

    /// Counts one [`crate::Revoker::revoke`] call. Called from the control plane's threads, not
    /// a shard: revocations are rare, so the shared atomic costs nothing.
    pub(crate) fn revocation(&self, result: RevocationResult) {
        self.revocations.with_label_values(&[result.as_str()]).inc();
    }

    /// A shard starts: its per-shard series exist from now on (at 0), and its relay ports
    /// (`[IPv4, IPv6]`) count towards the configured total.
    pub(crate) fn shard_started(&self, shard: usize, ports: [usize; 2]) {
        let shard = shard.to_string();
        self.shard_packets.with_label_values(&[shard.as_str()]);
        self.shard_allocations.with_label_values(&[shard.as_str()]);
        for (n, f) in ports.iter().zip(["ipv4", "ipv6"]) {
            self.relay_ports_total
                .with_label_values(&[f])
                .add(i64::try_from(*n).unwrap_or(i64::MAX));
        }
    }
}

/// Counters the driver keeps itself, next to the core's [`Stats`].
#[derive(Debug, Clone, Default)]
pub(crate) struct DriverStats {
    pub(crate) drops: [u64; DriverDrop::COUNT],
    pub(crate) closed: [u64; StreamClose::COUNT],
    /// Open stream connections by [`Transport`].
    pub(crate) streams: [i64; Transport::COUNT],
    /// Free relay ports by family (IPv4, IPv6).
    pub(crate) ports: [i64; 2],
    /// Datagrams handed to another shard's allocation (cross-shard short-circuit).
    pub(crate) handoffs: u64,
}

/// What one shard has published so far, to turn running totals into increments.
#[derive(Debug)]
pub(crate) struct Publisher {
    /// The `shard` label: the shard's index (a small, fixed set per process).
    shard: String,
    last: Stats,
    last_driver: DriverStats,
    last_active: [i64; Transport::COUNT],
    last_shard_packets: u64,
    last_shard_allocations: i64,
}

impl Publisher {
    /// A publisher for shard number `shard`.
    pub(crate) fn new(shard: usize) -> Self {
        Self {
            shard: shard.to_string(),
            last: Stats::default(),
            last_driver: DriverStats::default(),
            last_active: [0; Transport::COUNT],
            last_shard_packets: 0,
            last_shard_allocations: 0,
        }
    }
}

/// Adds `now - last` to the series `labels` and remembers `now`.
fn bump(vec: &IntCounterVec, labels: &[&str], now: u64, last: &mut u64) {
    if now > *last {
        vec.with_label_values(labels).inc_by(now - *last);
        *last = now;
    }
}

fn set(vec: &IntGaugeVec, labels: &[&str], now: i64, last: &mut i64) {
    if now != *last {
        vec.with_label_values(labels).add(now - *last);
        *last = now;
    }
}

impl Publisher {
    pub(crate) fn publish(
        &mut self,
        m: &RelayMetrics,
        s: &Stats,
        active: [usize; Transport::COUNT],
        d: &DriverStats,
    ) {
        let shard = [self.shard.as_str()];
        let packets: u64 = s.packets.iter().flatten().sum();
        bump(
            &m.shard_packets,
            &shard,
            packets,
            &mut self.last_shard_packets,
        );
        let allocations: usize = active.iter().sum();
        set(
            &m.shard_allocations,
            &shard,
            allocations as i64,
            &mut self.last_shard_allocations,
        );
        let l = &mut self.last;
        for t in Transport::ALL {
            let (ti, ts) = (t.index(), t.as_str());
            set(
                &m.allocations_active,
                &[ts],
                active[ti] as i64,
                &mut self.last_active[ti],
            );
            bump(
                &m.binding_requests,
                &[ts],
                s.binding_requests[ti],
                &mut l.binding_requests[ti],
            );
            for r in AllocResult::ALL {
                let i = r.index();
                bump(
                    &m.allocation_requests,
                    &[ts, r.as_str()],
                    s.allocations[ti][i],
                    &mut l.allocations[ti][i],
                );
            }
            for dir in Direction::ALL {
                let i = dir.index();
                let (channel, total) = (s.channel_data[ti][i], s.packets[ti][i]);
                let mut last_indication = l.packets[ti][i] - l.channel_data[ti][i];
                bump(
                    &m.packets,
                    &[ts, dir.as_str(), FRAMINGS[0]],
                    channel,
                    &mut l.channel_data[ti][i],
                );
                bump(
                    &m.packets,
                    &[ts, dir.as_str(), FRAMINGS[1]],
                    total - channel,
                    &mut last_indication,
                );
                l.packets[ti][i] = total;
                bump(
                    &m.bytes,
                    &[ts, dir.as_str()],
                    s.bytes[ti][i],
                    &mut l.bytes[ti][i],
                );
            }
        }
        bump(
            &m.short_circuit,
            &["same_shard"],
            s.short_circuit,
            &mut l.short_circuit,
        );
        for r in DeleteReason::ALL {
            bump(
                &m.allocations_ended,
                &[r.as_str()],
                s.deleted[r.index()],
                &mut l.deleted[r.index()],
            );
        }
        for r in DropReason::ALL {
            bump(
                &m.dropped,
                &[r.as_str()],
                s.dropped[r.index()],
                &mut l.dropped[r.index()],
            );
        }
        for r in AuthFailure::ALL {
            bump(
                &m.auth_failures,
                &[r.as_str()],
                s.auth_failures[r.index()],
                &mut l.auth_failures[r.index()],
            );
        }
        for r in DenyReason::ALL {
            bump(
                &m.peers_denied,
                &[r.as_str()],
                s.peers_denied[r.index()],
                &mut l.peers_denied[r.index()],
            );
        }
        bump(
            &m.revocations_applied,
            NO_LABELS,
            s.revocations,
            &mut l.revocations,
        );
        bump(
            &m.revocations_evicted,
            NO_LABELS,
            s.revocations_evicted,
            &mut l.revocations_evicted,
        );
        let ld = &mut self.last_driver;
        for r in DriverDrop::ALL {
            bump(
                &m.dropped,
                &[r.as_str()],
                d.drops[r.index()],
                &mut ld.drops[r.index()],
            );
        }
        bump(
            &m.short_circuit,
            &["cross_shard"],
            d.handoffs,
            &mut ld.handoffs,
        );
        for r in StreamClose::ALL {
            bump(
                &m.stream_closed,
                &[r.as_str()],
                d.closed[r.index()],
                &mut ld.closed[r.index()],
            );
        }
        for t in [Transport::Tcp, Transport::Tls] {
            let ti = t.index();
            set(
                &m.stream_connections,
                &[t.as_str()],
                d.streams[ti],
                &mut ld.streams[ti],
            );
        }
        for (i, f) in ["ipv4", "ipv6"].iter().enumerate() {
            set(&m.relay_ports_available, &[f], d.ports[i], &mut ld.ports[i]);
        }
    }
}
