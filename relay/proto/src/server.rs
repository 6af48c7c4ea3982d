//! The TURN server state machine of one shard.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::ops::{Range, RangeInclusive};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

pub use crate::alloc::Quotas;
use crate::alloc::{Allocation, Cached, Channel, QuotaError, State};
use crate::auth::{self, NonceCheck, NonceKey};
use crate::label_enum;
use crate::limit::Limiter;
use crate::policy::{DenyReason, PeerPolicy};
use crate::stun::{
    self, attr, code, method, AttrError, Attrs, Class, Encoder, Message, CHANNEL_HEADER_LEN,
    CHANNEL_MAX, CHANNEL_MIN,
};

/// UDP's protocol number in REQUESTED-TRANSPORT.
const PROTO_UDP: u8 = 17;
/// Refresh(LIFETIME=0) answers kept for retransmissions after the allocation is gone. Small: it
/// only has to outlive a client's retransmission timer (under 40 s), not hold history.
const RECENT_DELETES: usize = 64;
/// Largest UDP payload (IPv4: 65 535 − 20 − 8). Anything we would build bigger is dropped.
const MAX_UDP_PAYLOAD: usize = 65_507;

/// The transport between client and server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Transport {
    /// UDP.
    Udp,
}

/// A client's 5-tuple: who sent it, to which of our listeners, over what.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FiveTuple {
    /// The client's address as we see it (its server-reflexive address).
    pub client: SocketAddr,
    /// Our listener address the datagram arrived on.
    pub server: SocketAddr,
    /// The transport.
    pub transport: Transport,
}

/// Identifies an allocation's relay socket across driver and core. Slot index plus a generation,
/// so a stale id (of an allocation since freed and reused) never matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RelayId {
    slot: u32,
    generation: u32,
}

impl RelayId {
    /// The slot, dense from 0: drivers may index a `Vec` with it.
    pub fn index(self) -> usize {
        self.slot as usize
    }
}

/// Where a [`Transmit`] goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dest {
    /// To a client, from the listener of its 5-tuple.
    Client(FiveTuple),
    /// To a peer, from an allocation's relay socket.
    Peer {
        /// The relay socket to send from.
        relay: RelayId,
        /// The peer.
        peer: SocketAddr,
    },
}

/// A datagram to send. Its bytes are [`Server::payload`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transmit {
    /// Where it goes.
    pub dest: Dest,
    range: Range<usize>,
}

impl Transmit {
    /// Payload length in bytes.
    pub fn len(&self) -> usize {
        self.range.len()
    }
    /// Whether the payload is empty (an empty ChannelData or peer datagram is relayed as such).
    pub fn is_empty(&self) -> bool {
        self.range.is_empty()
    }
}

/// Asks the driver for a relay socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BindRequest {
    /// The id to report with [`Server::handle_relay_bound`].
    pub relay: RelayId,
    /// The IP to bind (the configured relay IP); the driver picks a port from its pool.
    pub ip: IpAddr,
    /// The port must be even (EVEN-PORT, RFC 8656 §7.2, for RTP).
    pub even_port: bool,
}

/// Why the driver could not bind a relay socket. Answered with 508.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum BindError {
    /// The relay port range of this shard is used up.
    #[error("no free relay port")]
    PortsExhausted,
    /// The operating system refused (file descriptor limit, address gone).
    #[error("the system refused to bind")]
    System,
}

/// Something for the driver to log or count.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// An allocation became active.
    AllocationCreated {
        /// Its relay.
        relay: RelayId,
        /// The advertised relayed address.
        relayed: SocketAddr,
        /// Its lifetime.
        lifetime: Duration,
    },
    /// An allocation ended.
    AllocationDeleted {
        /// Its relay.
        relay: RelayId,
        /// Why.
        reason: DeleteReason,
    },
}

/// What the driver should do next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Output {
    /// Send a datagram.
    Transmit(Transmit),
    /// Bind a relay socket, then call [`Server::handle_relay_bound`].
    BindRelay(BindRequest),
    /// Close a relay socket and give its port back.
    ReleaseRelay(RelayId),
    /// Log or count.
    Event(Event),
}

label_enum! {
    /// Why an allocation ended.
    pub enum DeleteReason {
        /// Refresh with LIFETIME 0.
        Client => "client",
        /// Its lifetime ran out.
        Expired => "expired",
        /// The server shut down.
        Shutdown => "shutdown",
    }
}

label_enum! {
    /// Outcome of an Allocate request (metric label).
    pub enum AllocResult {
        /// Allocated.
        Ok => "ok",
        /// 401 or 438: not (yet) authenticated; the normal first round trip lands here.
        Unauthenticated => "unauthenticated",
        /// 400 or 420.
        BadRequest => "bad_request",
        /// 437: the 5-tuple already has an allocation.
        Mismatch => "mismatch",
        /// 440 or 442: unsupported family or transport.
        Unsupported => "unsupported",
        /// 486: the user's quota.
        Quota => "quota",
        /// 508: total quota, ports, or draining.
        Capacity => "capacity",
    }
}

label_enum! {
    /// Relay direction (metric label).
    pub enum Direction {
        /// From a client to a peer.
        ClientToPeer => "client_to_peer",
        /// From a peer to a client.
        PeerToClient => "peer_to_client",
    }
}

label_enum! {
    /// Why a datagram was dropped without an answer (metric label).
    pub enum DropReason {
        /// Not STUN or ChannelData, bad framing, bad FINGERPRINT.
        Malformed => "malformed",
        /// A response or an indication other than Send.
        Unexpected => "unexpected",
        /// ChannelData or Send from a 5-tuple without an allocation, or peer data for a relay
        /// that no longer exists.
        NoAllocation => "no_allocation",
        /// ChannelData on a channel that is not bound.
        UnboundChannel => "unbound_channel",
        /// A peer without a permission (either direction).
        NoPermission => "no_permission",
        /// A Send to a peer the policy denies.
        DeniedPeer => "denied_peer",
        /// A Send indication without XOR-PEER-ADDRESS or DATA, or with bad attributes.
        BadIndication => "bad_indication",
        /// A retransmitted Allocate while the relay socket is being bound.
        Retransmit => "retransmit",
        /// Would exceed the largest UDP datagram.
        TooLarge => "too_large",
        /// An answer to an unauthenticated request over the per-source rate limit
        /// ([`Config::challenge_rate`]).
        ChallengeLimited => "challenge_limited",
    }
}

label_enum! {
    /// Why authentication failed (metric label).
    pub enum AuthFailure {
        /// No MESSAGE-INTEGRITY: the normal first request of every client.
        Missing => "missing",
        /// MESSAGE-INTEGRITY without USERNAME, REALM or NONCE.
        Incomplete => "incomplete",
        /// Stale or foreign NONCE (438).
        StaleNonce => "stale_nonce",
        /// REALM is not ours.
        WrongRealm => "wrong_realm",
        /// USERNAME is not `expiry:user`.
        BadUsername => "bad_username",
        /// The credential's expiry has passed.
        Expired => "expired",
        /// No configured secret verifies the MESSAGE-INTEGRITY.
        BadIntegrity => "bad_integrity",
        /// Valid credentials, but not the allocation's (441).
        WrongCredentials => "wrong_credentials",
    }
}

/// Counters of one shard. Plain integers: the driver copies them into its metrics registry.
#[derive(Debug, Clone, Default)]
pub struct Stats {
    /// Allocate outcomes by [`AllocResult`].
    pub allocations: [u64; AllocResult::COUNT],
    /// Relayed packets by [`Direction`].
    pub packets: [u64; Direction::COUNT],
    /// Relayed application bytes by [`Direction`].
    pub bytes: [u64; Direction::COUNT],
    /// Of [`Stats::packets`], those framed as ChannelData (the rest are Send/Data indications).
    pub channel_data: [u64; Direction::COUNT],
    /// Dropped datagrams by [`DropReason`].
    pub dropped: [u64; DropReason::COUNT],
    /// Authentication failures by [`AuthFailure`].
    pub auth_failures: [u64; AuthFailure::COUNT],
    /// Peers refused by [`DenyReason`].
    pub peers_denied: [u64; DenyReason::COUNT],
    /// Binding requests answered.
    pub binding_requests: u64,
    /// Allocations deleted by [`DeleteReason`].
    pub deleted: [u64; DeleteReason::COUNT],
}

/// Configuration of the core. Built by the driver from the file schema; the core never sees
/// the file format.
#[derive(Debug, Clone)]
pub struct Config {
    /// REALM.
    pub realm: String,
    /// REST secrets: any of them verifies (rotation).
    pub secrets: Vec<Vec<u8>>,
    /// Key of the stateless nonces; the same for every shard of a server.
    pub nonce_key: NonceKey,
    /// How long a nonce is accepted before 438.
    pub nonce_lifetime: Duration,
    /// Allocation lifetime when the client asks for none (RFC 8656: 600 s).
    pub default_lifetime: Duration,
    /// Longest allocation lifetime granted.
    pub max_lifetime: Duration,
    /// Permission lifetime (RFC 8656: 300 s).
    pub permission_lifetime: Duration,
    /// Channel binding lifetime (RFC 8656: 600 s).
    pub channel_lifetime: Duration,
    /// Distinct peer IPs one allocation may have permissions for.
    pub max_permissions: usize,
    /// The relay IP relay sockets bind to.
    pub relay_ip: IpAddr,
    /// The IP advertised in XOR-RELAYED-ADDRESS instead, behind a 1:1 NAT.
    pub external_ip: Option<IpAddr>,
    /// The relay port range (used to recognise other allocations' relayed addresses).
    pub relay_ports: RangeInclusive<u16>,
    /// Peer policy.
    pub policy: PeerPolicy,
    /// Shared quotas.
    pub quotas: Arc<Quotas>,
    /// SOFTWARE sent in Allocate responses; `None` sends none.
    pub software: Option<String>,
    /// Answers to unauthenticated requests (401, 438, 400, 420 before authentication) per second
    /// and source IP, per shard. A legitimate client needs one per allocation; the cap bounds
    /// what a spoofed flood can reflect at one victim (about 50 KB/s per shard) while leaving
    /// room for thousands of users behind one NAT, or a load generator, to allocate.
    pub challenge_rate: u32,
    /// Burst of such answers per source IP.
    pub challenge_burst: u32,
}

impl Config {
    /// A config with RFC defaults around the given essentials.
    pub fn new(
        realm: impl Into<String>,
        secrets: Vec<Vec<u8>>,
        nonce_key: [u8; 32],
        relay_ip: IpAddr,
        policy: PeerPolicy,
    ) -> Self {
        Self {
            realm: realm.into(),
            secrets,
            nonce_key: NonceKey::new(nonce_key),
            nonce_lifetime: Duration::from_secs(600),
            default_lifetime: Duration::from_secs(600),
            max_lifetime: Duration::from_secs(3600),
            permission_lifetime: Duration::from_secs(300),
            channel_lifetime: Duration::from_secs(600),
            max_permissions: 64,
            relay_ip,
            external_ip: None,
            relay_ports: 49152..=65535,
            policy,
            quotas: Quotas::new(Some(16), None),
            software: Some(concat!("turnpike ", env!("CARGO_PKG_VERSION")).to_owned()),
            challenge_rate: 500,
            challenge_burst: 1000,
        }
    }
}

struct Slot {
    generation: u32,
    alloc: Option<Allocation>,
}

/// A request after successful authentication.
struct Authed {
    key: [u8; 16],
    fingerprint: bool,
}

/// The answer to a request that failed.
struct Reject {
    code: u16,
    /// Key for MESSAGE-INTEGRITY, when the request was authenticated.
    key: Option<[u8; 16]>,
    unknown: Option<stun::UnknownList>,
}

impl Reject {
    fn plain(code: u16) -> Self {
        Self {
            code,
            key: None,
            unknown: None,
        }
    }
    fn authed(code: u16, key: [u8; 16]) -> Self {
        Self {
            code,
            key: Some(key),
            unknown: None,
        }
    }
}

/// The TURN server of one shard. See the crate documentation for the driving contract.
pub struct Server {
    config: Config,
    slots: Vec<Slot>,
    free: Vec<u32>,
    by_five: HashMap<FiveTuple, RelayId, ahash::RandomState>,
    timers: BinaryHeap<Reverse<(Instant, RelayId)>>,
    recent_deletes: VecDeque<(FiveTuple, Cached)>,
    outputs: VecDeque<OutputItem>,
    buf: Vec<u8>,
    stats: Stats,
    /// Wall clock anchor: `unix_at_anchor` seconds at `anchor`.
    anchor: Instant,
    unix_at_anchor: Duration,
    /// The `now` of the current `handle_*` call.
    now: Instant,
    challenges: Limiter,
    draining: bool,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("allocations", &self.by_five.len())
            .field("draining", &self.draining)
            .finish_non_exhaustive()
    }
}

enum OutputItem {
    Transmit(Transmit),
    Other(Output),
}

impl Server {
    /// A server with no allocations. `now` and `wall` anchor the wall clock (see
    /// [`Server::handle_wall_clock`]).
    pub fn new(config: Config, now: Instant, wall: SystemTime) -> Self {
        let challenges = Limiter::new(now, config.challenge_rate, config.challenge_burst);
        Self {
            config,
            slots: Vec::new(),
            free: Vec::new(),
            by_five: HashMap::default(),
            timers: BinaryHeap::new(),
            recent_deletes: VecDeque::with_capacity(RECENT_DELETES),
            outputs: VecDeque::new(),
            buf: Vec::with_capacity(64 * 1024),
            stats: Stats::default(),
            anchor: now,
            unix_at_anchor: wall.duration_since(UNIX_EPOCH).unwrap_or_default(),
            now,
            challenges,
            draining: false,
        }
    }

    /// The configuration.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Counters so far.
    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// Allocations on this shard, including those waiting for their relay socket.
    pub fn allocations(&self) -> usize {
        self.by_five.len()
    }

    /// Re-anchors the wall clock: REST expiries and nonces are compared against
    /// `wall` + (now − `now` given here).
    pub fn handle_wall_clock(&mut self, now: Instant, wall: SystemTime) {
        self.anchor = now;
        self.unix_at_anchor = wall.duration_since(UNIX_EPOCH).unwrap_or_default();
    }

    fn unix_now(&self, now: Instant) -> u64 {
        (self.unix_at_anchor + now.saturating_duration_since(self.anchor)).as_secs()
    }

    /// Stops granting new allocations (answered with 508 so clients try another server);
    /// existing ones keep relaying until they end.
    pub fn start_draining(&mut self) {
        self.draining = true;
    }

    /// Deletes every allocation (shutdown after the grace period).
    pub fn close_all(&mut self) {
        let ids: Vec<RelayId> = self.by_five.values().copied().collect();
        for id in ids {
            self.delete(id, DeleteReason::Shutdown);
        }
    }

    /// The bytes of a transmit returned by [`Server::poll_output`].
    pub fn payload(&self, t: &Transmit) -> &[u8] {
        &self.buf[t.range.clone()]
    }

    /// The next thing to do, or `None` when there is nothing left.
    pub fn poll_output(&mut self) -> Option<Output> {
        match self.outputs.pop_front()? {
            OutputItem::Transmit(t) => Some(Output::Transmit(t)),
            OutputItem::Other(o) => Some(o),
        }
    }

    /// When [`Server::handle_timeout`] should next be called.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.timers.peek().map(|Reverse((t, _))| *t)
    }

    fn begin(&mut self, now: Instant) {
        self.now = now;
        if self.outputs.is_empty() {
            self.buf.clear();
        }
    }

    /// Expires allocations, permissions and channels that are due.
    pub fn handle_timeout(&mut self, now: Instant) {
        self.begin(now);
        while let Some(Reverse((t, id))) = self.timers.peek().copied() {
            if t > now {
                break;
            }
            self.timers.pop();
            let Some(a) = self.get_mut(id) else { continue };
            // Entries are never removed from the heap; only the one `timer_at` names is live.
            if a.timer_at != Some(t) {
                continue;
            }
            if a.expires <= now {
                self.delete(id, DeleteReason::Expired);
                continue;
            }
            // `prune` leaves only deadlines after `now`; the clamp guarantees this loop ends
            // even if that were ever broken.
            let next = a.prune(now).max(now + Duration::from_millis(1));
            a.timer_at = Some(next);
            self.timers.push(Reverse((next, id)));
        }
    }

    /// Makes sure the allocation's timer fires by `at`. Deadlines that move later need nothing:
    /// the earlier entry fires, finds nothing due, and re-arms for the true deadline. So every
    /// call is O(log n) and the heap never needs searching.
    fn schedule(&mut self, id: RelayId, at: Instant) {
        let Some(a) = self.get_mut(id) else { return };
        if a.timer_at.is_none_or(|t| at < t) {
            a.timer_at = Some(at);
            self.timers.push(Reverse((at, id)));
        }
    }

    fn get(&self, id: RelayId) -> Option<&Allocation> {
        let s = self.slots.get(id.slot as usize)?;
        if s.generation != id.generation {
            return None;
        }
        s.alloc.as_ref()
    }

    fn get_mut(&mut self, id: RelayId) -> Option<&mut Allocation> {
        let s = self.slots.get_mut(id.slot as usize)?;
        if s.generation != id.generation {
            return None;
        }
        s.alloc.as_mut()
    }

    fn insert(&mut self, alloc: Allocation) -> RelayId {
        let five = alloc.five;
        let id = match self.free.pop() {
            Some(slot) => {
                let s = &mut self.slots[slot as usize];
                s.alloc = Some(alloc);
                RelayId {
                    slot,
                    generation: s.generation,
                }
            }
            None => {
                self.slots.push(Slot {
                    generation: 0,
                    alloc: Some(alloc),
                });
                RelayId {
                    slot: (self.slots.len() - 1) as u32,
                    generation: 0,
                }
            }
        };
        self.by_five.insert(five, id);
        id
    }

    /// Takes an allocation out of every table. Its quota lease is given back when the returned
    /// value is dropped.
    fn remove(&mut self, id: RelayId) -> Option<Allocation> {
        let s = self.slots.get_mut(id.slot as usize)?;
        if s.generation != id.generation {
            return None;
        }
        let a = s.alloc.take()?;
        s.generation = s.generation.wrapping_add(1);
        self.free.push(id.slot);
        self.by_five.remove(&a.five);
        Some(a)
    }

    fn delete(&mut self, id: RelayId, reason: DeleteReason) {
        let Some(a) = self.remove(id) else { return };
        self.stats.deleted[reason.index()] += 1;
        if matches!(a.state, State::Active) {
            self.outputs
                .push_back(OutputItem::Other(Output::ReleaseRelay(id)));
        }
        self.outputs
            .push_back(OutputItem::Other(Output::Event(Event::AllocationDeleted {
                relay: id,
                reason,
            })));
    }

    /// A datagram from a client arrived on a listener.
    pub fn handle_client(&mut self, now: Instant, five: FiveTuple, datagram: &[u8]) {
        self.begin(now);
        match datagram.first() {
            // RFC 8656 §12.4 / RFC 7983: 0x00–0x03 STUN, 0x40–0x4F ChannelData (0x4000–0x4FFF).
            Some(0x00..=0x03) => self.handle_stun(now, five, datagram),
            Some(0x40..=0x4F) => self.handle_channel_data(now, five, datagram),
            _ => self.drop(DropReason::Malformed),
        }
    }

    fn drop(&mut self, why: DropReason) {
        self.stats.dropped[why.index()] += 1;
    }

    fn handle_channel_data(&mut self, now: Instant, five: FiveTuple, datagram: &[u8]) {
        let Some((number, data)) = stun::parse_channel_data(datagram) else {
            return self.drop(DropReason::Malformed);
        };
        let Some(&id) = self.by_five.get(&five) else {
            return self.drop(DropReason::NoAllocation);
        };
        let Some(a) = self.get(id) else {
            return self.drop(DropReason::NoAllocation);
        };
        let Some(ch) = a.channel_by_number(number, now) else {
            return self.drop(DropReason::UnboundChannel);
        };
        let peer = ch.peer;
        if !a.permitted(peer.ip(), now) {
            return self.drop(DropReason::NoPermission);
        }
        self.stats.channel_data[Direction::ClientToPeer.index()] += 1;
        self.forward_to_peer(id, peer, data);
    }

    fn forward_to_peer(&mut self, relay: RelayId, peer: SocketAddr, data: &[u8]) {
        let start = self.buf.len();
        self.buf.extend_from_slice(data);
        self.stats.packets[Direction::ClientToPeer.index()] += 1;
        self.stats.bytes[Direction::ClientToPeer.index()] += data.len() as u64;
        let peer = self.client_view_to_wire(peer);
        self.outputs.push_back(OutputItem::Transmit(Transmit {
            dest: Dest::Peer { relay, peer },
            range: start..self.buf.len(),
        }));
    }

    /// Peers that name our external IP mean our relay IP: send there directly instead of
    /// relying on the NAT to hairpin.
    fn client_view_to_wire(&self, peer: SocketAddr) -> SocketAddr {
        match self.config.external_ip {
            Some(ext) if peer.ip() == ext && self.config.relay_ports.contains(&peer.port()) => {
                SocketAddr::new(self.config.relay_ip, peer.port())
            }
            _ => peer,
        }
    }

    /// The inverse of [`Server::client_view_to_wire`], for addresses reported to clients and permissions.
    fn wire_to_client_view(&self, peer: SocketAddr) -> SocketAddr {
        match self.config.external_ip {
            Some(ext)
                if peer.ip() == self.config.relay_ip
                    && self.config.relay_ports.contains(&peer.port()) =>
            {
                SocketAddr::new(ext, peer.port())
            }
            _ => peer,
        }
    }

    /// A datagram from `from` arrived on the relay socket `relay`.
    pub fn handle_peer(&mut self, now: Instant, relay: RelayId, from: SocketAddr, datagram: &[u8]) {
        self.begin(now);
        let from = self.wire_to_client_view(SocketAddr::new(
            crate::policy::canonical(from.ip()),
            from.port(),
        ));
        let Some(a) = self.get(relay) else {
            return self.drop(DropReason::NoAllocation);
        };
        if !matches!(a.state, State::Active) {
            return self.drop(DropReason::NoAllocation);
        }
        if !a.permitted(from.ip(), now) {
            return self.drop(DropReason::NoPermission);
        }
        let five = a.five;
        let start = self.buf.len();
        match a.channel_by_peer(from, now).map(|c| c.number) {
            Some(number) => {
                if CHANNEL_HEADER_LEN + datagram.len() > MAX_UDP_PAYLOAD {
                    return self.drop(DropReason::TooLarge);
                }
                self.stats.channel_data[Direction::PeerToClient.index()] += 1;
                self.buf.extend_from_slice(&number.to_be_bytes());
                self.buf
                    .extend_from_slice(&(datagram.len() as u16).to_be_bytes());
                self.buf.extend_from_slice(datagram);
            }
            None => {
                // Data indication: header 20 + XOR-PEER-ADDRESS (≤ 24) + DATA header 4 + padding 3.
                if datagram.len() + 51 > MAX_UDP_PAYLOAD {
                    return self.drop(DropReason::TooLarge);
                }
                let tid = self.indication_tid();
                let mut e = Encoder::new(&mut self.buf, method::DATA, Class::Indication, tid);
                e.xor_address(attr::XOR_PEER_ADDRESS, from)
                    .attr(attr::DATA, datagram);
                e.finish();
            }
        }
        self.stats.packets[Direction::PeerToClient.index()] += 1;
        self.stats.bytes[Direction::PeerToClient.index()] += datagram.len() as u64;
        self.outputs.push_back(OutputItem::Transmit(Transmit {
            dest: Dest::Client(five),
            range: start..self.buf.len(),
        }));
    }

    /// Indications need a transaction id but nobody matches on it; a counter is enough and keeps
    /// the core free of randomness.
    fn indication_tid(&self) -> [u8; 12] {
        let n = self.stats.packets[Direction::PeerToClient.index()];
        let mut t = [0u8; 12];
        t[4..].copy_from_slice(&n.to_be_bytes());
        t
    }

    /// The driver bound (or failed to bind) the relay socket asked for by [`Output::BindRelay`].
    pub fn handle_relay_bound(
        &mut self,
        now: Instant,
        relay: RelayId,
        result: Result<SocketAddr, BindError>,
    ) {
        self.begin(now);
        let external_ip = self.config.external_ip;
        let Some(a) = self.get_mut(relay) else {
            // Deleted meanwhile (shutdown): give the socket back.
            if result.is_ok() {
                self.outputs
                    .push_back(OutputItem::Other(Output::ReleaseRelay(relay)));
            }
            return;
        };
        let State::Binding { tid, fingerprint } = a.state else {
            return;
        };
        let five = a.five;
        let key = a.key;
        let relayed = match result {
            Ok(addr) => addr,
            Err(_) => {
                // Never active: no socket to release, no deletion to report.
                drop(self.remove(relay));
                self.stats.allocations[AllocResult::Capacity.index()] += 1;
                let reject = Reject::authed(code::INSUFFICIENT_CAPACITY, key);
                self.send_error(five, method::ALLOCATE, tid, fingerprint, &reject);
                return;
            }
        };
        let advertised = match external_ip {
            Some(ip) => SocketAddr::new(ip, relayed.port()),
            None => relayed,
        };
        let lifetime = a.expires.saturating_duration_since(now);
        a.state = State::Active;
        let start = self.buf.len();
        let mut e = Encoder::new(&mut self.buf, method::ALLOCATE, Class::Success, tid);
        e.xor_address(attr::XOR_RELAYED_ADDRESS, advertised)
            .u32_attr(attr::LIFETIME, lifetime.as_secs() as u32)
            .xor_address(attr::XOR_MAPPED_ADDRESS, five.client);
        if let Some(sw) = &self.config.software {
            e.attr(attr::SOFTWARE, sw.as_bytes());
        }
        e.integrity(&key);
        if fingerprint {
            e.fingerprint();
        }
        let range = e.finish();
        let bytes: Box<[u8]> = self.buf[range.clone()].into();
        if let Some(a) = self.get_mut(relay) {
            a.last = Some(Cached { tid, bytes });
        }
        self.stats.allocations[AllocResult::Ok.index()] += 1;
        self.outputs.push_back(OutputItem::Transmit(Transmit {
            dest: Dest::Client(five),
            range: start..range.end,
        }));
        self.outputs
            .push_back(OutputItem::Other(Output::Event(Event::AllocationCreated {
                relay,
                relayed: advertised,
                lifetime,
            })));
    }

    fn handle_stun(&mut self, now: Instant, five: FiveTuple, datagram: &[u8]) {
        let Ok(msg) = Message::parse(datagram) else {
            return self.drop(DropReason::Malformed);
        };
        match (msg.class(), msg.method()) {
            (Class::Request, _) => self.handle_request(now, five, &msg),
            (Class::Indication, method::SEND) => self.handle_send(now, five, &msg),
            _ => self.drop(DropReason::Unexpected),
        }
    }

    fn handle_send(&mut self, now: Instant, five: FiveTuple, msg: &Message<'_>) {
        let Ok(attrs) = Attrs::decode(msg) else {
            return self.drop(DropReason::BadIndication);
        };
        let (Some(peer), Some(data)) = (attrs.peers().next(), attrs.data) else {
            return self.drop(DropReason::BadIndication);
        };
        let Some(&id) = self.by_five.get(&five) else {
            return self.drop(DropReason::NoAllocation);
        };
        if let Err(why) = self.config.policy.check(peer) {
            self.stats.peers_denied[why.index()] += 1;
            return self.drop(DropReason::DeniedPeer);
        }
        let Some(a) = self.get(id) else {
            return self.drop(DropReason::NoAllocation);
        };
        if !matches!(a.state, State::Active) || !a.permitted(peer.ip(), now) {
            return self.drop(DropReason::NoPermission);
        }
        self.forward_to_peer(id, peer, data);
    }

    fn handle_request(&mut self, now: Instant, five: FiveTuple, msg: &Message<'_>) {
        let tid = msg.transaction_id();
        let fp = msg.has_fingerprint();
        let attrs = match Attrs::decode(msg) {
            Ok(a) => a,
            Err(e) => {
                let mut reject = Reject::plain(code::BAD_REQUEST);
                if let AttrError::Unknown(list) = e {
                    reject.code = code::UNKNOWN_ATTRIBUTE;
                    reject.unknown = Some(list);
                }
                if msg.method() == method::ALLOCATE {
                    self.stats.allocations[AllocResult::BadRequest.index()] += 1;
                }
                return self.send_error(five, msg.method(), tid, fp, &reject);
            }
        };
        if msg.method() == method::BINDING {
            return self.handle_binding(five, msg, &attrs);
        }
        // A retransmission of the last request answered on this 5-tuple gets the same bytes.
        if self.resend_cached(five, tid) {
            return;
        }
        let result = match msg.method() {
            method::ALLOCATE => self.handle_allocate(now, five, msg, &attrs),
            method::REFRESH => self.handle_refresh(now, five, msg, &attrs),
            method::CREATE_PERMISSION => self.handle_create_permission(now, five, msg, &attrs),
            method::CHANNEL_BIND => self.handle_channel_bind(now, five, msg, &attrs),
            _ => Err(Reject::plain(code::BAD_REQUEST)),
        };
        if let Err(reject) = result {
            if msg.method() == method::ALLOCATE {
                self.stats.allocations[alloc_result(reject.code).index()] += 1;
            }
            self.send_error(five, msg.method(), tid, fp, &reject);
        }
    }

    fn resend_cached(&mut self, five: FiveTuple, tid: [u8; 12]) -> bool {
        let cached = match self.by_five.get(&five).and_then(|id| self.get(*id)) {
            Some(a) => match (&a.state, &a.last) {
                (State::Binding { tid: t, .. }, _) if *t == tid => {
                    self.drop(DropReason::Retransmit);
                    return true;
                }
                (_, Some(c)) if c.tid == tid => c.bytes.clone(),
                _ => return false,
            },
            None => match self
                .recent_deletes
                .iter()
                .find(|(f, c)| *f == five && c.tid == tid)
            {
                Some((_, c)) => c.bytes.clone(),
                None => return false,
            },
        };
        let start = self.buf.len();
        // A clone, because the cache and the output buffer are both borrowed from `self`;
        // retransmissions are rare.
        self.buf.extend_from_slice(&cached);
        let range = start..self.buf.len();
        self.outputs.push_back(OutputItem::Transmit(Transmit {
            dest: Dest::Client(five),
            range,
        }));
        true
    }

    fn handle_binding(&mut self, five: FiveTuple, msg: &Message<'_>, attrs: &Attrs<'_>) {
        let tid = msg.transaction_id();
        if !attrs.unknown.as_slice().is_empty() {
            let reject = Reject {
                code: code::UNKNOWN_ATTRIBUTE,
                key: None,
                unknown: Some(attrs.unknown),
            };
            return self.send_error(five, method::BINDING, tid, msg.has_fingerprint(), &reject);
        }
        self.stats.binding_requests += 1;
        let start = self.buf.len();
        let mut e = Encoder::new(&mut self.buf, method::BINDING, Class::Success, tid);
        e.xor_address(attr::XOR_MAPPED_ADDRESS, five.client);
        if msg.has_fingerprint() {
            e.fingerprint();
        }
        let r = e.finish();
        self.outputs.push_back(OutputItem::Transmit(Transmit {
            dest: Dest::Client(five),
            range: start..r.end,
        }));
    }

    fn auth_fail(&mut self, why: AuthFailure) {
        self.stats.auth_failures[why.index()] += 1;
    }

    /// Long-term credential check (RFC 8489 §9.2.4), in the RFC's order: integrity present,
    /// USERNAME/REALM/NONCE present, nonce valid, username valid, integrity verifies.
    fn authenticate(
        &mut self,
        now: Instant,
        five: FiveTuple,
        msg: &Message<'_>,
        attrs: &Attrs<'_>,
        check_expiry: bool,
    ) -> Result<Authed, Reject> {
        if attrs.integrity.is_none() {
            self.auth_fail(AuthFailure::Missing);
            return Err(Reject::plain(code::UNAUTHENTICATED));
        }
        let (Some(username), Some(realm), Some(nonce)) = (attrs.username, attrs.realm, attrs.nonce)
        else {
            self.auth_fail(AuthFailure::Incomplete);
            return Err(Reject::plain(code::BAD_REQUEST));
        };
        let unix = self.unix_now(now);
        let lifetime = self.config.nonce_lifetime.as_secs();
        if self
            .config
            .nonce_key
            .check(nonce, unix, five.client, lifetime)
            != NonceCheck::Valid
        {
            self.auth_fail(AuthFailure::StaleNonce);
            return Err(Reject::plain(code::STALE_NONCE));
        }
        if realm != self.config.realm.as_bytes() {
            self.auth_fail(AuthFailure::WrongRealm);
            return Err(Reject::plain(code::UNAUTHENTICATED));
        }
        let existing = self.by_five.get(&five).and_then(|id| self.get(*id));
        if let Some(a) = existing {
            if a.username.as_bytes() == username {
                if !attrs.verify_integrity(msg, &a.key) {
                    self.auth_fail(AuthFailure::BadIntegrity);
                    return Err(Reject::plain(code::UNAUTHENTICATED));
                }
                let key = a.key;
                return Ok(Authed {
                    key,
                    fingerprint: msg.has_fingerprint(),
                });
            }
        }
        let rest = match auth::parse_rest_username(username) {
            Ok(r) => r,
            Err(_) => {
                self.auth_fail(AuthFailure::BadUsername);
                return Err(Reject::plain(code::UNAUTHENTICATED));
            }
        };
        let Some(key) = self.verify_rest(msg, attrs, username, realm) else {
            self.auth_fail(AuthFailure::BadIntegrity);
            return Err(Reject::plain(code::UNAUTHENTICATED));
        };
        if existing.is_some() {
            // Valid credentials, but not the ones this allocation was made with.
            self.auth_fail(AuthFailure::WrongCredentials);
            return Err(Reject::authed(code::WRONG_CREDENTIALS, key));
        }
        if check_expiry && rest.expiry < unix {
            self.auth_fail(AuthFailure::Expired);
            return Err(Reject::plain(code::UNAUTHENTICATED));
        }
        Ok(Authed {
            key,
            fingerprint: msg.has_fingerprint(),
        })
    }

    /// Tries every secret (rotation): the key of the first that verifies.
    fn verify_rest(
        &self,
        msg: &Message<'_>,
        attrs: &Attrs<'_>,
        username: &[u8],
        realm: &[u8],
    ) -> Option<[u8; 16]> {
        let name = std::str::from_utf8(username).ok()?;
        self.config.secrets.iter().find_map(|secret| {
            let password = auth::rest_password(secret, name);
            let key = auth::long_term_key(username, realm, password.as_bytes());
            attrs.verify_integrity(msg, &key).then_some(key)
        })
    }

    fn unknown_check(attrs: &Attrs<'_>, key: [u8; 16]) -> Result<(), Reject> {
        if attrs.unknown.as_slice().is_empty() {
            return Ok(());
        }
        Err(Reject {
            code: code::UNKNOWN_ATTRIBUTE,
            key: Some(key),
            unknown: Some(attrs.unknown),
        })
    }

    fn lifetime(&self, requested: Option<u32>) -> Duration {
        let req = requested.map_or(self.config.default_lifetime, |s| {
            Duration::from_secs(u64::from(s))
        });
        req.min(self.config.max_lifetime)
    }

    fn handle_allocate(
        &mut self,
        now: Instant,
        five: FiveTuple,
        msg: &Message<'_>,
        attrs: &Attrs<'_>,
    ) -> Result<(), Reject> {
        let tid = msg.transaction_id();
        let authed = self.authenticate(now, five, msg, attrs, true)?;
        let key = authed.key;
        if self.by_five.contains_key(&five) {
            return Err(Reject::authed(code::ALLOCATION_MISMATCH, key));
        }
        Self::unknown_check(attrs, key)?;
        match attrs.requested_transport {
            None => return Err(Reject::authed(code::BAD_REQUEST, key)),
            Some(PROTO_UDP) => {}
            Some(_) => return Err(Reject::authed(code::UNSUPPORTED_TRANSPORT, key)),
        }
        let family = if self.config.relay_ip.is_ipv4() { 1 } else { 2 };
        if attrs.requested_family.is_some_and(|f| f != family) {
            return Err(Reject::authed(code::ADDRESS_FAMILY_NOT_SUPPORTED, key));
        }
        if self.draining {
            return Err(Reject::authed(code::INSUFFICIENT_CAPACITY, key));
        }
        // Reserving the next port for a later Allocate (R bit, RESERVATION-TOKEN) is not offered;
        // RFC 8656 §7.2 answers a reservation the server cannot make with 508.
        if attrs.even_port == Some(true) {
            return Err(Reject::authed(code::INSUFFICIENT_CAPACITY, key));
        }
        let username = attrs.username.unwrap_or_default();
        let user = auth::parse_rest_username(username)
            .map(|r| r.user)
            .unwrap_or_default();
        let lease = match self.config.quotas.acquire(user) {
            Ok(l) => l,
            Err(QuotaError::User) => {
                return Err(Reject::authed(code::ALLOCATION_QUOTA_REACHED, key))
            }
            Err(QuotaError::Total) => return Err(Reject::authed(code::INSUFFICIENT_CAPACITY, key)),
        };
        // RFC 8656 §7.2: the granted lifetime is at least the default and at most the maximum.
        let lifetime = self
            .lifetime(attrs.lifetime)
            .max(self.config.default_lifetime.min(self.config.max_lifetime));
        let alloc = Allocation {
            five,
            state: State::Binding {
                tid,
                fingerprint: authed.fingerprint,
            },
            username: String::from_utf8_lossy(username).into(),
            key,
            expires: now + lifetime,
            permissions: Vec::new(),
            channels: Vec::new(),
            last: None,
            timer_at: None,
            _lease: lease,
        };
        let id = self.insert(alloc);
        self.schedule(id, now + lifetime);
        self.outputs
            .push_back(OutputItem::Other(Output::BindRelay(BindRequest {
                relay: id,
                ip: self.config.relay_ip,
                even_port: attrs.even_port.is_some(),
            })));
        Ok(())
    }

    /// Authenticates a request that needs an existing allocation; 437 without one.
    fn existing(
        &mut self,
        now: Instant,
        five: FiveTuple,
        msg: &Message<'_>,
        attrs: &Attrs<'_>,
    ) -> Result<(RelayId, Authed), Reject> {
        let authed = self.authenticate(now, five, msg, attrs, false)?;
        let id = match self.by_five.get(&five) {
            Some(id)
                if self
                    .get(*id)
                    .is_some_and(|a| matches!(a.state, State::Active) && a.expires > now) =>
            {
                *id
            }
            _ => return Err(Reject::authed(code::ALLOCATION_MISMATCH, authed.key)),
        };
        Self::unknown_check(attrs, authed.key)?;
        Ok((id, authed))
    }

    fn handle_refresh(
        &mut self,
        now: Instant,
        five: FiveTuple,
        msg: &Message<'_>,
        attrs: &Attrs<'_>,
    ) -> Result<(), Reject> {
        let (id, authed) = self.existing(now, five, msg, attrs)?;
        let family = if self.config.relay_ip.is_ipv4() { 1 } else { 2 };
        if attrs.requested_family.is_some_and(|f| f != family) {
            return Err(Reject::authed(
                code::PEER_ADDRESS_FAMILY_MISMATCH,
                authed.key,
            ));
        }
        // RFC 8656 §7.3: LIFETIME 0 deletes; anything else is granted like in Allocate, at least
        // the default and at most the maximum.
        let lifetime = match attrs.lifetime {
            Some(0) => Duration::ZERO,
            requested => self
                .lifetime(requested)
                .max(self.config.default_lifetime.min(self.config.max_lifetime)),
        };
        if lifetime.is_zero() {
            self.delete(id, DeleteReason::Client);
        } else if let Some(a) = self.get_mut(id) {
            a.expires = now + lifetime;
            self.schedule(id, now + lifetime);
        }
        let range = self.success(five, msg, &authed, |e| {
            e.u32_attr(attr::LIFETIME, lifetime.as_secs() as u32);
        });
        self.remember(id, five, msg.transaction_id(), range, lifetime.is_zero());
        Ok(())
    }

    /// Checks a peer for CreatePermission (`with_port` false: only the IP matters) or
    /// ChannelBind (`with_port` true: the exact transport address). Policy comes first, so an
    /// IPv4 address hidden in IPv6 is refused as what it is (403), then the family (443).
    fn vet_peer(&mut self, peer: SocketAddr, key: [u8; 16], with_port: bool) -> Result<(), Reject> {
        let verdict = if with_port {
            self.config.policy.check(peer).map(|_| ())
        } else {
            self.config.policy.check_ip(peer.ip())
        };
        if let Err(why) = verdict {
            self.stats.peers_denied[why.index()] += 1;
            return Err(Reject::authed(code::FORBIDDEN, key));
        }
        // An IPv4 address written as IPv6 (::ffff:a.b.c.d) is an IPv4 peer. Peer data is matched
        // on the canonical address, so on an IPv6 relay its permission could never match.
        let family_v4 = crate::policy::canonical(peer.ip()).is_ipv4();
        if peer.is_ipv4() != family_v4 || family_v4 != self.config.relay_ip.is_ipv4() {
            return Err(Reject::authed(code::PEER_ADDRESS_FAMILY_MISMATCH, key));
        }
        Ok(())
    }

    fn handle_create_permission(
        &mut self,
        now: Instant,
        five: FiveTuple,
        msg: &Message<'_>,
        attrs: &Attrs<'_>,
    ) -> Result<(), Reject> {
        let (id, authed) = self.existing(now, five, msg, attrs)?;
        if attrs.peers().next().is_none() {
            return Err(Reject::authed(code::BAD_REQUEST, authed.key));
        }
        // All or nothing: one denied peer refuses the whole request.
        for peer in attrs.peers() {
            self.vet_peer(peer, authed.key, false)?;
        }
        let max = self.config.max_permissions;
        let expires = now + self.config.permission_lifetime;
        let Some(a) = self.get_mut(id) else {
            return Err(Reject::authed(code::ALLOCATION_MISMATCH, authed.key));
        };
        // Expired permissions do not count against the cap, even before the timer prunes them.
        a.permissions.retain(|p| p.expires > now);
        let mut new: Vec<IpAddr> = Vec::new();
        for p in attrs.peers() {
            let ip = p.ip();
            if !a.permissions.iter().any(|x| x.ip == ip) && !new.contains(&ip) {
                new.push(ip);
            }
        }
        if a.permissions.len() + new.len() > max {
            return Err(Reject::authed(code::INSUFFICIENT_CAPACITY, authed.key));
        }
        for p in attrs.peers() {
            a.permit(p.ip(), expires);
        }
        self.schedule(id, expires);
        let range = self.success(five, msg, &authed, |_| {});
        self.remember(id, five, msg.transaction_id(), range, false);
        Ok(())
    }

    fn handle_channel_bind(
        &mut self,
        now: Instant,
        five: FiveTuple,
        msg: &Message<'_>,
        attrs: &Attrs<'_>,
    ) -> Result<(), Reject> {
        let (id, authed) = self.existing(now, five, msg, attrs)?;
        let key = authed.key;
        let (Some(number), Some(peer)) = (attrs.channel, attrs.peers().next()) else {
            return Err(Reject::authed(code::BAD_REQUEST, key));
        };
        if !(CHANNEL_MIN..=CHANNEL_MAX).contains(&number) || peer.port() == 0 {
            return Err(Reject::authed(code::BAD_REQUEST, key));
        }
        self.vet_peer(peer, key, true)?;
        let max = self.config.max_permissions;
        let perm_expires = now + self.config.permission_lifetime;
        let chan_expires = now + self.config.channel_lifetime;
        let Some(a) = self.get_mut(id) else {
            return Err(Reject::authed(code::ALLOCATION_MISMATCH, key));
        };
        a.channels.retain(|c| c.expires > now);
        let by_number = a.channels.iter().position(|c| c.number == number);
        let by_peer = a.channels.iter().position(|c| c.peer == peer);
        // RFC 8656 §11.2: a number is bound to one peer and a peer to one number.
        match (by_number, by_peer) {
            (Some(i), Some(j)) if i == j => a.channels[i].expires = chan_expires,
            (None, None) => {
                let has_perm = a.permissions.iter().any(|p| p.ip == peer.ip());
                if !has_perm && a.permissions.len() >= max {
                    return Err(Reject::authed(code::INSUFFICIENT_CAPACITY, key));
                }
                a.channels.push(Channel {
                    number,
                    peer,
                    expires: chan_expires,
                });
            }
            _ => return Err(Reject::authed(code::BAD_REQUEST, key)),
        }
        a.permit(peer.ip(), perm_expires);
        self.schedule(id, perm_expires.min(chan_expires));
        let range = self.success(five, msg, &authed, |_| {});
        self.remember(id, five, msg.transaction_id(), range, false);
        Ok(())
    }

    /// Encodes a success response with MESSAGE-INTEGRITY and queues it.
    fn success(
        &mut self,
        five: FiveTuple,
        msg: &Message<'_>,
        authed: &Authed,
        attrs: impl FnOnce(&mut Encoder<'_>),
    ) -> Range<usize> {
        let mut e = Encoder::new(
            &mut self.buf,
            msg.method(),
            Class::Success,
            msg.transaction_id(),
        );
        attrs(&mut e);
        e.integrity(&authed.key);
        if authed.fingerprint {
            e.fingerprint();
        }
        let range = e.finish();
        self.outputs.push_back(OutputItem::Transmit(Transmit {
            dest: Dest::Client(five),
            range: range.clone(),
        }));
        range
    }

    /// Keeps the answer for retransmissions of the same transaction.
    fn remember(
        &mut self,
        id: RelayId,
        five: FiveTuple,
        tid: [u8; 12],
        range: Range<usize>,
        deleted: bool,
    ) {
        let cached = Cached {
            tid,
            bytes: self.buf[range].into(),
        };
        if deleted {
            if self.recent_deletes.len() == RECENT_DELETES {
                self.recent_deletes.pop_front();
            }
            self.recent_deletes.push_back((five, cached));
        } else if let Some(a) = self.get_mut(id) {
            a.last = Some(cached);
        }
    }

    fn send_error(
        &mut self,
        five: FiveTuple,
        method: u16,
        tid: [u8; 12],
        fingerprint: bool,
        reject: &Reject,
    ) {
        if reject.key.is_none() && !self.challenges.allow(five.client.ip(), self.now) {
            return self.drop(DropReason::ChallengeLimited);
        }
        let unix = self.unix_now(self.now);
        let start = self.buf.len();
        let mut e = Encoder::new(&mut self.buf, method, Class::Error, tid);
        e.error_code(reject.code);
        if let Some(list) = &reject.unknown {
            e.unknown_attributes(list.as_slice());
        }
        if matches!(reject.code, code::UNAUTHENTICATED | code::STALE_NONCE) && reject.key.is_none()
        {
            // A fresh nonce and our realm let the client retry (RFC 8489 §9.2.4).
            let nonce = self.config.nonce_key.issue(unix, five.client);
            e.attr(attr::REALM, self.config.realm.as_bytes())
                .attr(attr::NONCE, &nonce);
        }
        if let Some(key) = reject.key {
            e.integrity(&key);
        }
        if fingerprint {
            e.fingerprint();
        }
        let r = e.finish();
        self.outputs.push_back(OutputItem::Transmit(Transmit {
            dest: Dest::Client(five),
            range: start..r.end,
        }));
    }
}

fn alloc_result(code: u16) -> AllocResult {
    match code {
        code::UNAUTHENTICATED | code::STALE_NONCE => AllocResult::Unauthenticated,
        code::ALLOCATION_MISMATCH | code::WRONG_CREDENTIALS => AllocResult::Mismatch,
        code::ADDRESS_FAMILY_NOT_SUPPORTED | code::UNSUPPORTED_TRANSPORT => {
            AllocResult::Unsupported
        }
        code::ALLOCATION_QUOTA_REACHED => AllocResult::Quota,
        code::INSUFFICIENT_CAPACITY => AllocResult::Capacity,
        _ => AllocResult::BadRequest,
    }
}
