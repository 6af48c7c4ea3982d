//! Relay port pools: each shard owns a disjoint slice of `relay-ports`, so binding needs no
//! coordination between shards. Slices are made of (even, odd) pairs so every shard can grant
//! EVEN-PORT requests.

use std::collections::VecDeque;
use std::ops::RangeInclusive;

use rand::seq::SliceRandom as _;

/// The shard that owns relay port `port` among `shards`: ports go to shards in (even, odd) pairs.
pub(crate) fn owner(port: u16, shards: usize) -> usize {
    usize::from(port / 2) % shards.max(1)
}

/// Free relay ports of one shard, in random order (RFC 8656 §7.2 asks for unpredictable relayed
/// ports). Freed ports go to the back, so a port is reused as late as possible and a peer that
/// still sends to an old allocation's address rarely reaches a new one.
#[derive(Debug)]
pub(crate) struct PortPool {
    free: VecDeque<u16>,
}

impl PortPool {
    /// The ports of `range` that belong to shard `shard` of `shards`: every `shards`-th pair.
    pub(crate) fn new(range: RangeInclusive<u16>, shard: usize, shards: usize) -> Self {
        let mut ports: Vec<u16> = range.filter(|p| owner(*p, shards) == shard).collect();
        ports.shuffle(&mut rand::rng());
        Self { free: ports.into() }
    }

    /// Takes a free port.
    pub(crate) fn take(&mut self) -> Option<u16> {
        self.free.pop_front()
    }

    /// Takes a free even port. The pool is shuffled, so about half the ports are even and the
    /// scan ends after a couple of steps.
    pub(crate) fn take_even(&mut self) -> Option<u16> {
        let i = self.free.iter().position(|p| p % 2 == 0)?;
        self.free.remove(i)
    }

    /// Gives a port back.
    pub(crate) fn put(&mut self, port: u16) {
        self.free.push_back(port);
    }

    /// How many ports are free.
    pub(crate) fn available(&self) -> usize {
        self.free.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_get_disjoint_slices_covering_the_range() {
        let mut all: Vec<u16> = (0..3)
            .flat_map(|s| {
                let mut p = PortPool::new(100..=109, s, 3);
                std::iter::from_fn(move || p.take()).collect::<Vec<_>>()
            })
            .collect();
        all.sort_unstable();
        assert_eq!(all, (100..=109).collect::<Vec<_>>());
    }

    #[test]
    fn every_shard_has_even_ports() {
        for s in 0..4 {
            let mut p = PortPool::new(49152..=49200, s, 4);
            let even = p.take_even();
            assert!(even.is_some_and(|e| e % 2 == 0), "shard {s}: {even:?}");
        }
    }

    #[test]
    fn freed_ports_come_back_last() {
        let mut p = PortPool::new(1..=3, 0, 1);
        let a = p.take();
        assert_eq!(p.available(), 2);
        if let Some(a) = a {
            p.put(a);
        }
        let order: Vec<_> = std::iter::from_fn(|| p.take()).collect();
        assert_eq!(order.len(), 3);
        assert_eq!(order.last().copied(), a);
    }
}
