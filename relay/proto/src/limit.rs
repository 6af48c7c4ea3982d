//! A bounded per-source rate limit for answers to unauthenticated requests.
//!
//! A 401 or 438 is about three times larger than the smallest request that provokes it, and UDP
//! sources can be spoofed: without a cap the relay is a reflector. Keeping a bucket per source
//! would let spoofed sources fill memory, so buckets live in a fixed table indexed by a keyed
//! hash of the source IP. Sources that collide share a bucket, which can only make the limit
//! stricter for them; memory stays constant whatever the traffic.

use std::net::IpAddr;
use std::time::Instant;

/// Buckets per shard: 4096 × 16 bytes = 64 KiB. Collisions become likely only when thousands of
/// distinct sources are unauthenticated at the same moment, which is the flood case anyway.
const SLOTS: usize = 4096;

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f32,
    /// Milliseconds since the limiter was created, when `tokens` was last updated.
    at_ms: u32,
}

/// Token buckets: `per_second` refill, `burst` capacity, per source IP.
#[derive(Debug)]
pub(crate) struct Limiter {
    slots: Box<[Bucket]>,
    hasher: ahash::RandomState,
    epoch: Instant,
    per_second: f32,
    burst: f32,
}

impl Limiter {
    pub(crate) fn new(epoch: Instant, per_second: u32, burst: u32) -> Self {
        Self {
            slots: vec![
                Bucket {
                    tokens: burst as f32,
                    at_ms: 0,
                };
                SLOTS
            ]
            .into_boxed_slice(),
            hasher: ahash::RandomState::new(),
            epoch,
            per_second: per_second as f32,
            burst: burst as f32,
        }
    }

    /// Takes a token for `ip` if one is left.
    pub(crate) fn allow(&mut self, ip: IpAddr, now: Instant) -> bool {
        // u32 milliseconds wrap after 49 days; a wrapped clock only refills a bucket early.
        let now_ms = now.saturating_duration_since(self.epoch).as_millis() as u32;
        let i = (self.hasher.hash_one(ip) as usize) % SLOTS;
        let b = &mut self.slots[i];
        let elapsed = now_ms.wrapping_sub(b.at_ms) as f32 / 1000.0;
        b.tokens = (b.tokens + elapsed * self.per_second).min(self.burst);
        b.at_ms = now_ms;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn burst_then_refill() {
        let t0 = Instant::now();
        let mut l = Limiter::new(t0, 10, 5);
        let ip: IpAddr = "192.0.2.1".parse().unwrap_or(IpAddr::from([0, 0, 0, 0]));
        assert_eq!((0..20).filter(|_| l.allow(ip, t0)).count(), 5);
        assert!(!l.allow(ip, t0 + Duration::from_millis(50)));
        assert!(l.allow(ip, t0 + Duration::from_millis(200)));
        // Other sources have their own buckets (bar a rare hash collision, hence "most").
        let others = (1..=20u8).filter(|i| l.allow(IpAddr::from([198, 51, 100, *i]), t0));
        assert!(others.count() >= 18);
    }
}
