//! Prometheus metrics of the relay (prefix `turnpike_relay_`). Labels come only from the fixed
//! enums of `relay-proto`: never usernames, IPs or ports.
//!
//! The core keeps plain counters; each shard copies the increase into these collectors on every
//! timer tick ([`crate::TICK`]), so the data path never touches an atomic shared with another
//! thread.

use prometheus::{IntCounter, IntCounterVec, IntGauge, Opts, Registry};
use relay_proto::{
    AllocResult, AuthFailure, DeleteReason, DenyReason, Direction, DropReason, Stats,
};

use crate::DriverDrop;

/// Values of the `framing` label of `turnpike_relay_packets_total`.
const FRAMINGS: [&str; 2] = ["channel_data", "indication"];

/// Every relay collector, registered once per process and shared (cheaply cloned) by shards.
#[derive(Clone, Debug)]
pub struct RelayMetrics {
    allocations_active: IntGauge,
    allocation_requests: IntCounterVec,
    allocations_ended: IntCounterVec,
    packets: IntCounterVec,
    bytes: IntCounterVec,
    dropped: IntCounterVec,
    auth_failures: IntCounterVec,
    peers_denied: IntCounterVec,
    binding_requests: IntCounter,
    relay_ports_available: IntGauge,
}

fn counter_vec(
    r: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
) -> prometheus::Result<IntCounterVec> {
    let c = IntCounterVec::new(Opts::new(name, help), labels)?;
    r.register(Box::new(c.clone()))?;
    Ok(c)
}

impl RelayMetrics {
    /// Creates and registers the collectors.
    pub fn register(r: &Registry) -> prometheus::Result<Self> {
        let allocations_active = IntGauge::new(
            "turnpike_relay_allocations_active",
            "Allocations currently held (including those binding their relay socket).",
        )?;
        r.register(Box::new(allocations_active.clone()))?;
        let binding_requests = IntCounter::new(
            "turnpike_relay_binding_requests_total",
            "STUN Binding requests answered.",
        )?;
        r.register(Box::new(binding_requests.clone()))?;
        let relay_ports_available = IntGauge::new(
            "turnpike_relay_ports_available",
            "Free relay ports across all shards.",
        )?;
        r.register(Box::new(relay_ports_available.clone()))?;
        let m = Self {
            allocations_active,
            allocation_requests: counter_vec(
                r,
                "turnpike_relay_allocation_requests_total",
                "Allocate requests by result (unauthenticated includes the normal first 401).",
                &["result"],
            )?,
            allocations_ended: counter_vec(
                r,
                "turnpike_relay_allocations_ended_total",
                "Allocations ended, by reason.",
                &["reason"],
            )?,
            packets: counter_vec(
                r,
                "turnpike_relay_packets_total",
                "Packets relayed, by direction and framing (channel_data or indication).",
                &["direction", "framing"],
            )?,
            bytes: counter_vec(
                r,
                "turnpike_relay_bytes_total",
                "Application bytes relayed (without TURN framing), by direction.",
                &["direction"],
            )?,
            dropped: counter_vec(
                r,
                "turnpike_relay_dropped_packets_total",
                "Datagrams dropped without an answer, by reason.",
                &["reason"],
            )?,
            auth_failures: counter_vec(
                r,
                "turnpike_relay_auth_failures_total",
                "Requests that failed authentication, by reason.",
                &["reason"],
            )?,
            peers_denied: counter_vec(
                r,
                "turnpike_relay_peers_denied_total",
                "Peer addresses refused by the peer policy, by reason.",
                &["reason"],
            )?,
            binding_requests,
            relay_ports_available,
        };
        // Touch every label value so each series exists (at 0) from the first scrape: rate()
        // and alerts then work without waiting for the first event.
        for v in AllocResult::ALL {
            m.allocation_requests.with_label_values(&[v.as_str()]);
        }
        for v in DeleteReason::ALL {
            m.allocations_ended.with_label_values(&[v.as_str()]);
        }
        for v in Direction::ALL {
            for f in FRAMINGS {
                m.packets.with_label_values(&[v.as_str(), f]);
            }
            m.bytes.with_label_values(&[v.as_str()]);
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
        Ok(m)
    }
}

/// What one shard has published so far, to turn the core's running totals into increments.
#[derive(Debug, Default)]
pub(crate) struct Publisher {
    last: Stats,
    last_active: i64,
    last_ports: i64,
    last_driver: [u64; DriverDrop::COUNT],
}

fn add_each<T: Copy>(
    vec: &IntCounterVec,
    labels: &[T],
    name: impl Fn(T) -> &'static str,
    now: &[u64],
    last: &mut [u64],
) {
    for ((l, n), p) in labels.iter().zip(now).zip(last.iter_mut()) {
        if *n > *p {
            vec.with_label_values(&[name(*l)]).inc_by(*n - *p);
            *p = *n;
        }
    }
}

impl Publisher {
    pub(crate) fn publish(
        &mut self,
        m: &RelayMetrics,
        s: &Stats,
        active: usize,
        ports: usize,
        driver: &[u64; DriverDrop::COUNT],
    ) {
        let l = &mut self.last;
        add_each(
            &m.allocation_requests,
            AllocResult::ALL,
            AllocResult::as_str,
            &s.allocations,
            &mut l.allocations,
        );
        add_each(
            &m.allocations_ended,
            DeleteReason::ALL,
            DeleteReason::as_str,
            &s.deleted,
            &mut l.deleted,
        );
        for d in Direction::ALL {
            let i = d.index();
            let channel = s.channel_data[i];
            let indication = s.packets[i] - channel;
            let last_indication = l.packets[i] - l.channel_data[i];
            if channel > l.channel_data[i] {
                m.packets
                    .with_label_values(&[d.as_str(), FRAMINGS[0]])
                    .inc_by(channel - l.channel_data[i]);
            }
            if indication > last_indication {
                m.packets
                    .with_label_values(&[d.as_str(), FRAMINGS[1]])
                    .inc_by(indication - last_indication);
            }
        }
        l.packets = s.packets;
        l.channel_data = s.channel_data;
        add_each(
            &m.bytes,
            Direction::ALL,
            Direction::as_str,
            &s.bytes,
            &mut l.bytes,
        );
        add_each(
            &m.dropped,
            DropReason::ALL,
            DropReason::as_str,
            &s.dropped,
            &mut l.dropped,
        );
        add_each(
            &m.auth_failures,
            AuthFailure::ALL,
            AuthFailure::as_str,
            &s.auth_failures,
            &mut l.auth_failures,
        );
        add_each(
            &m.peers_denied,
            DenyReason::ALL,
            DenyReason::as_str,
            &s.peers_denied,
            &mut l.peers_denied,
        );
        add_each(
            &m.dropped,
            DriverDrop::ALL,
            DriverDrop::as_str,
            driver,
            &mut self.last_driver,
        );
        if s.binding_requests > l.binding_requests {
            m.binding_requests
                .inc_by(s.binding_requests - l.binding_requests);
            l.binding_requests = s.binding_requests;
        }
        let active = active as i64;
        m.allocations_active.add(active - self.last_active);
        self.last_active = active;
        let ports = ports as i64;
        m.relay_ports_available.add(ports - self.last_ports);
        self.last_ports = ports;
    }
}
