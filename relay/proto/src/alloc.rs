//! One allocation's state, and the quota leases that bound how many exist.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use crate::server::{Family, FiveTuple};

/// A permission: peers at `ip` may send to the allocation until `expires`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Permission {
    pub(crate) ip: IpAddr,
    pub(crate) expires: Instant,
}

/// A channel binding.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Channel {
    pub(crate) number: u16,
    pub(crate) peer: SocketAddr,
    pub(crate) expires: Instant,
}

/// A response kept for retransmissions of the same request (RFC 8656 §7.2: a retransmitted
/// Allocate must get the same answer, not a 437).
#[derive(Debug)]
pub(crate) struct Cached {
    pub(crate) tid: [u8; 12],
    pub(crate) bytes: Box<[u8]>,
}

/// One family's relay socket of an allocation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Relay {
    /// This family is not part of the allocation.
    None,
    /// The driver is binding the socket.
    Binding,
    /// Bound; the advertised relayed address (external IP when behind NAT).
    Bound(SocketAddr),
    /// The additional family of a dual allocation could not be had: the ADDRESS-ERROR-CODE.
    Failed(u16),
}

#[derive(Debug)]
pub(crate) enum State {
    /// Waiting for the driver to bind the relay socket; `tid` is the Allocate's, `fingerprint`
    /// whether its answer carries FINGERPRINT.
    Binding { tid: [u8; 12], fingerprint: bool },
    /// Relaying.
    Active,
}

/// Allocation state. Permissions and channels are small vectors: browsers use one to a few per
/// allocation, so a linear scan beats hashing, and `max-permissions` bounds the worst case.
#[derive(Debug)]
pub(crate) struct Allocation {
    pub(crate) five: FiveTuple,
    pub(crate) state: State,
    /// The family asked for with REQUESTED-ADDRESS-FAMILY (IPv4 by default).
    pub(crate) primary: Family,
    /// Relay sockets by [`Family::index`].
    pub(crate) relays: [Relay; 2],
    pub(crate) username: Box<str>,
    pub(crate) key: [u8; 16],
    pub(crate) expires: Instant,
    pub(crate) permissions: Vec<Permission>,
    pub(crate) channels: Vec<Channel>,
    pub(crate) last: Option<Cached>,
    /// The deadline of this allocation's live entry in the server's timer heap.
    pub(crate) timer_at: Option<Instant>,
    pub(crate) _lease: Lease,
}

impl Allocation {
    /// Whether a relay socket of `f` is bound.
    pub(crate) fn has(&self, f: Family) -> bool {
        matches!(self.relays[f.index()], Relay::Bound(_))
    }

    pub(crate) fn permitted(&self, ip: IpAddr, now: Instant) -> bool {
        self.permissions
            .iter()
            .any(|p| p.ip == ip && p.expires > now)
    }

    pub(crate) fn channel_by_number(&self, number: u16, now: Instant) -> Option<&Channel> {
        self.channels
            .iter()
            .find(|c| c.number == number && c.expires > now)
    }

    pub(crate) fn channel_by_peer(&self, peer: SocketAddr, now: Instant) -> Option<&Channel> {
        self.channels
            .iter()
            .find(|c| c.peer == peer && c.expires > now)
    }

    /// Installs or refreshes a permission.
    pub(crate) fn permit(&mut self, ip: IpAddr, expires: Instant) {
        match self.permissions.iter_mut().find(|p| p.ip == ip) {
            Some(p) => p.expires = expires,
            None => self.permissions.push(Permission { ip, expires }),
        }
    }

    /// Drops expired permissions and channels; returns the earliest remaining deadline,
    /// including the allocation's own.
    pub(crate) fn prune(&mut self, now: Instant) -> Instant {
        self.permissions.retain(|p| p.expires > now);
        self.channels.retain(|c| c.expires > now);
        self.next_deadline()
    }

    pub(crate) fn next_deadline(&self) -> Instant {
        let p = self.permissions.iter().map(|p| p.expires);
        let c = self.channels.iter().map(|c| c.expires);
        p.chain(c).fold(self.expires, Instant::min)
    }
}

/// Allocation quotas shared by every shard of one server.
///
/// This is the only state shards share. It is touched on Allocate and on deletion, never per
/// packet, so a mutex (for the per-user map) and an atomic (for the total) cost nothing on the
/// data path, while a per-shard quota would let one user multiply its quota by the core count.
#[derive(Debug)]
pub struct Quotas {
    user_limit: Option<u32>,
    total_limit: Option<u32>,
    total: AtomicU32,
    users: Mutex<HashMap<Box<str>, u32>>,
}

/// Why a quota refused an allocation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum QuotaError {
    /// The user has `user-quota` allocations (486).
    User,
    /// The server has `total-quota` allocations (508).
    Total,
}

impl Quotas {
    /// Limits per user and in total; `None` is "no limit of this kind".
    pub fn new(user_limit: Option<u32>, total_limit: Option<u32>) -> Arc<Self> {
        Arc::new(Self {
            user_limit,
            total_limit,
            total: AtomicU32::new(0),
            users: Mutex::new(HashMap::new()),
        })
    }

    /// Allocations currently counted.
    pub fn total(&self) -> u32 {
        self.total.load(Ordering::Relaxed)
    }

    /// Allocations currently counted for `user`.
    pub fn user(&self, user: &str) -> u32 {
        self.lock().get(user).copied().unwrap_or(0)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Box<str>, u32>> {
        // A poisoned lock only means another shard panicked (a bug); the counts are still sound.
        self.users.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn acquire(self: &Arc<Self>, user: &str) -> Result<Lease, QuotaError> {
        let mut users = self.lock();
        let used = users.get(user).copied().unwrap_or(0);
        if self.user_limit.is_some_and(|l| used >= l) {
            return Err(QuotaError::User);
        }
        // Under the users lock, so check-then-increment cannot race with another acquire.
        let total = self.total.load(Ordering::Relaxed);
        if self.total_limit.is_some_and(|l| total >= l) {
            return Err(QuotaError::Total);
        }
        self.total.store(total + 1, Ordering::Relaxed);
        *users.entry(user.into()).or_insert(0) += 1;
        Ok(Lease {
            quotas: Arc::clone(self),
            user: user.into(),
        })
    }
}

/// One allocation's share of the quotas, given back exactly once: when it is dropped.
#[derive(Debug)]
pub(crate) struct Lease {
    quotas: Arc<Quotas>,
    user: Box<str>,
}

impl Drop for Lease {
    fn drop(&mut self) {
        let mut users = self.quotas.lock();
        if let Some(n) = users.get_mut(&self.user) {
            *n -= 1;
            if *n == 0 {
                users.remove(&self.user);
            }
        }
        self.quotas.total.fetch_sub(1, Ordering::Relaxed);
    }
}
