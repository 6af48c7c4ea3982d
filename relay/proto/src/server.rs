//! The TURN server state machine of one shard.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::ops::{Range, RangeInclusive};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

pub use crate::alloc::Quotas;
use crate::alloc::{Allocation, Cached, Channel, QuotaError, Relay, State};
use crate::auth::{self, NonceCheck, NonceKey};
use crate::label_enum;
use crate::limit::Limiter;
use crate::policy::{DenyReason, PeerPolicy};
use crate::revoke::Revocations;
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
/// Default of [`Config::max_revoked_groups`]. A group stays revoked only until its credentials
/// expire (hours at most), so this is far more calls than end within a credential lifetime on
/// one relay, while bounding the table at about 120 bytes per group of the control plane's 17
/// characters: 12 MB per shard at worst (each shard holds its own copy).
const MAX_REVOKED_GROUPS: usize = 100_000;

label_enum! {
    /// The transport between client and server (metric label).
    pub enum Transport {
        /// UDP.
        Udp => "udp",
        /// TCP (RFC 8656 §3.1: STUN and ChannelData framed on a stream).
        Tcp => "tcp",
        /// TLS over TCP.
        Tls => "tls",
    }
}

impl Transport {
    /// Whether messages travel on a byte stream (TCP, TLS) rather than in datagrams.
    pub fn is_stream(self) -> bool {
        !matches!(self, Transport::Udp)
    }
}

label_enum! {
    /// An address family (metric label).
    pub enum Family {
        /// IPv4.
        V4 => "ipv4",
        /// IPv6.
        V6 => "ipv6",
    }
}

impl Family {
    /// The family of `ip`; IPv4-mapped IPv6 addresses count as IPv4.
    pub fn of(ip: IpAddr) -> Self {
        if crate::policy::canonical(ip).is_ipv4() {
            Family::V4
        } else {
            Family::V6
        }
    }

    /// The value in REQUESTED-/ADDITIONAL-ADDRESS-FAMILY (RFC 8656 §18.6).
    fn from_attr(v: u8) -> Option<Self> {
        match v {
            0x01 => Some(Family::V4),
            0x02 => Some(Family::V6),
            _ => None,
        }
    }

    fn attr_value(self) -> u8 {
        match self {
            Family::V4 => 0x01,
            Family::V6 => 0x02,
        }
    }
}

/// One value per address family.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PerFamily<T> {
    /// The IPv4 value.
    pub v4: Option<T>,
    /// The IPv6 value.
    pub v6: Option<T>,
}

impl<T> Default for PerFamily<T> {
    fn default() -> Self {
        Self { v4: None, v6: None }
    }
}

impl<T: Copy> PerFamily<T> {
    /// The value for `f`.
    pub fn get(&self, f: Family) -> Option<T> {
        match f {
            Family::V4 => self.v4,
            Family::V6 => self.v6,
        }
    }

    /// Sets the value for `f`.
    pub fn set(&mut self, f: Family, v: Option<T>) {
        match f {
            Family::V4 => self.v4 = v,
            Family::V6 => self.v6 = v,
        }
    }

    /// The values present, IPv4 first.
    pub fn iter(&self) -> impl Iterator<Item = T> + '_ {
        self.v4.iter().chain(self.v6.iter()).copied()
    }
}

impl PerFamily<IpAddr> {
    /// The IP of its family (`v4` for an IPv4 address, `v6` otherwise).
    pub fn single(ip: IpAddr) -> Self {
        let mut p = Self::default();
        p.set(Family::of(ip), Some(ip));
        p
    }
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

/// Identifies an allocation: slot index plus a generation, so a stale id (of an allocation since
/// freed and the slot reused) never matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) struct AllocId {
    slot: u32,
    generation: u32,
}

/// Identifies a relay socket across driver and core: an allocation and one of its (at most two,
/// RFC 8656 dual allocation) address families.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RelayId {
    alloc: AllocId,
    family: Family,
}

impl PartialOrd for Family {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Family {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.index().cmp(&other.index())
    }
}

impl RelayId {
    /// Dense from 0 (two per allocation slot): drivers may index a `Vec` with it.
    pub fn index(self) -> usize {
        self.alloc.slot as usize * 2 + self.family.index()
    }

    /// The address family of this relay socket.
    pub fn family(self) -> Family {
        self.family
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
        /// The client's address.
        client: SocketAddr,
        /// The advertised relayed address (the first, for a dual allocation).
        relayed: SocketAddr,
        /// Its lifetime.
        lifetime: Duration,
    },
    /// An allocation ended.
    AllocationDeleted {
        /// The client's address.
        client: SocketAddr,
        /// Why.
        reason: DeleteReason,
    },
}

/// What the driver should do next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Output {
    /// Send a datagram.
    Transmit(Transmit),
    /// Bind a relay socket, then call [`Server::handle_relay_bound`] before taking the next
    /// output.
    BindRelay(BindRequest),
    /// Close a relay socket and give its port back. Always before any later `BindRelay` of a
    /// relay with the same [`RelayId::index`] (a new allocation in a reused slot).
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
        /// The client's TCP/TLS connection closed (RFC 8656 §3.1: the allocation dies with it).
        ConnectionClosed => "connection_closed",
        /// Its credential group was revoked ([`Server::handle_revocation`]): the call ended.
        Revoked => "revoked",
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
        /// A Send indication without XOR-PEER-ADDRESS or DATA, with bad attributes, or with an
        /// unknown comprehension-required one (RFC 8489 §6.3.2: discarded; DONT-FRAGMENT
        /// among them, which this server does not implement).
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
        /// Valid credentials of a revoked group ([`Server::handle_revocation`]): 401, like a
        /// wrong password.
        Revoked => "revoked",
    }
}

/// Counters of one shard. Plain integers: the driver copies them into its metrics registry.
#[derive(Debug, Clone, Default)]
pub struct Stats {
    /// Allocate outcomes by client [`Transport`] and [`AllocResult`].
    pub allocations: [[u64; AllocResult::COUNT]; Transport::COUNT],
    /// Relayed packets by client [`Transport`] and [`Direction`].
    pub packets: [[u64; Direction::COUNT]; Transport::COUNT],
    /// Relayed application bytes by client [`Transport`] and [`Direction`].
    pub bytes: [[u64; Direction::COUNT]; Transport::COUNT],
    /// Of [`Stats::packets`], those framed as ChannelData (the rest are Send/Data indications).
    pub channel_data: [[u64; Direction::COUNT]; Transport::COUNT],
    /// Dropped datagrams by [`DropReason`].
    pub dropped: [u64; DropReason::COUNT],
    /// Authentication failures by [`AuthFailure`].
    pub auth_failures: [u64; AuthFailure::COUNT],
    /// Peers refused by [`DenyReason`].
    pub peers_denied: [u64; DenyReason::COUNT],
    /// Binding requests answered, by [`Transport`].
    pub binding_requests: [u64; Transport::COUNT],
    /// Allocations deleted by [`DeleteReason`]; those torn down by a revocation are
    /// [`DeleteReason::Revoked`].
    pub deleted: [u64; DeleteReason::COUNT],
    /// Revocations received ([`Server::handle_revocation`] calls, invalid groups included).
    pub revocations: u64,
    /// Revoked groups dropped from the full table before their time
    /// ([`Config::max_revoked_groups`]): their credentials allocate again.
    pub revocations_evicted: u64,
    /// Of the client-to-peer packets, those handed straight to another allocation of this shard
    /// (same-server short-circuit) instead of through the kernel.
    pub short_circuit: u64,
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
    /// The IPs relay sockets bind to, at most one per family. IPv4 is the default family of an
    /// allocation (RFC 8656 §7.2); an IPv6 one enables REQUESTED-ADDRESS-FAMILY IPv6 and dual
    /// allocations.
    pub relay_ips: PerFamily<IpAddr>,
    /// The IPs advertised in XOR-RELAYED-ADDRESS instead, behind a 1:1 NAT, per family.
    pub external_ips: PerFamily<IpAddr>,
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
    /// Credential groups remembered as revoked at most (default 100 000); past it, the group
    /// whose revocation ends first is forgotten (and counted in [`Stats::revocations_evicted`]).
    pub max_revoked_groups: usize,
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
            relay_ips: PerFamily::single(relay_ip),
            external_ips: PerFamily::default(),
            relay_ports: 49152..=65535,
            policy,
            quotas: Quotas::new(Some(16), None),
            software: Some(concat!("turnpike ", env!("CARGO_PKG_VERSION")).to_owned()),
            challenge_rate: 500,
            challenge_burst: 1000,
            max_revoked_groups: MAX_REVOKED_GROUPS,
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
    by_five: HashMap<FiveTuple, AllocId, ahash::RandomState>,
    timers: BinaryHeap<Reverse<(Instant, AllocId)>>,
    /// Allocations by client [`Transport`].
    active: [usize; Transport::COUNT],
    /// Bound relay sockets of this shard by their address (relay IP, not the external one): a
    /// peer address found here is another allocation of this shard, reached without the kernel.
    by_relayed: HashMap<SocketAddr, RelayId, ahash::RandomState>,
    /// Transaction ids of Data indications.
    indications: u64,
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
    /// Credential groups refused until a Unix time.
    revoked: Revocations,
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
        let revoked = Revocations::new(config.max_revoked_groups);
        Self {
            config,
            slots: Vec::new(),
            free: Vec::new(),
            by_five: HashMap::default(),
            timers: BinaryHeap::new(),
            active: [0; Transport::COUNT],
            by_relayed: HashMap::default(),
            indications: 0,
            recent_deletes: VecDeque::with_capacity(RECENT_DELETES),
            outputs: VecDeque::new(),
            buf: Vec::with_capacity(64 * 1024),
            stats: Stats::default(),
            anchor: now,
            unix_at_anchor: wall.duration_since(UNIX_EPOCH).unwrap_or_default(),
            now,
            challenges,
            draining: false,
            revoked,
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

    /// Allocations on this shard by client [`Transport`].
    pub fn allocations_by_transport(&self) -> [usize; Transport::COUNT] {
        self.active
    }

    /// Re-anchors the wall clock: REST expiries, nonces and revocations are compared against
    /// `wall` + (now − `now` given here). Revocations whose time is over are forgotten here.
    pub fn handle_wall_clock(&mut self, now: Instant, wall: SystemTime) {
        self.anchor = now;
        self.unix_at_anchor = wall.duration_since(UNIX_EPOCH).unwrap_or_default();
        let unix = self.unix_now(now);
        self.revoked.prune(unix);
    }

    /// Revokes the credential group `group` until the Unix time `until_unix` (inclusive; a
    /// later time already held for the group is kept). A username has every group of
    /// [`auth::RestUsername::groups`]: revoking a call's `CALL` covers `CALL.x` and
    /// `CALL.PEER.x`, revoking one participant's `CALL.PEER` only `CALL.PEER.x`.
    ///
    /// - every allocation of this shard whose username has that group is deleted at once, as
    ///   an expiry would ([`Output::ReleaseRelay`] for its relay sockets, its quota given back,
    ///   [`DeleteReason::Revoked`]);
    /// - until then, an Allocate with a username of that group is refused with 401.
    ///
    /// An invalid group ([`auth::is_valid_group`]: an empty segment, too many segments, too
    /// long, a character outside `[A-Za-z0-9_-.]`) can match no username and changes nothing.
    /// A `until_unix` already past still tears the group's allocations down (their credentials
    /// expired, but allocations outlive that through Refresh) and is not remembered.
    pub fn handle_revocation(&mut self, now: Instant, group: &str, until_unix: u64) {
        self.begin(now);
        self.stats.revocations += 1;
        if !auth::is_valid_group(group) {
            return;
        }
        let unix = self.unix_now(now);
        self.revoked.prune(unix);
        if until_unix >= unix {
            self.stats.revocations_evicted += self.revoked.insert(group, until_unix) as u64;
        }
        // A scan of every allocation: revocations come once per call, far rarer than packets,
        // and an index by group would cost memory and upkeep on every Allocate.
        let doomed: Vec<AllocId> = self
            .slots
            .iter()
            .enumerate()
            .filter_map(|(slot, s)| {
                let a = s.alloc.as_ref()?;
                auth::rest_groups(a.username.as_bytes())
                    .any(|g| g == group)
                    .then_some(AllocId {
                        slot: slot as u32,
                        generation: s.generation,
                    })
            })
            .collect();
        for id in doomed {
            self.delete(id, DeleteReason::Revoked);
        }
    }

    /// Credential groups currently remembered as revoked.
    pub fn revoked_groups(&self) -> usize {
        self.revoked.len()
    }

    /// Whether a group of `username` (the call's or the participant's) is revoked at `unix`:
    /// at most [`auth::MAX_GROUP_SEGMENTS`] lookups on slices of the username, none at all
    /// while nothing is revoked. Usernames without a group never are.
    fn is_revoked(&self, username: &[u8], unix: u64) -> bool {
        !self.revoked.is_empty()
            && auth::rest_groups(username).any(|g| self.revoked.is_revoked(g, unix))
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
        let ids: Vec<AllocId> = self.by_five.values().copied().collect();
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
    fn schedule(&mut self, id: AllocId, at: Instant) {
        let Some(a) = self.get_mut(id) else { return };
        if a.timer_at.is_none_or(|t| at < t) {
            a.timer_at = Some(at);
            self.timers.push(Reverse((at, id)));
        }
    }

    fn get(&self, id: AllocId) -> Option<&Allocation> {
        let s = self.slots.get(id.slot as usize)?;
        if s.generation != id.generation {
            return None;
        }
        s.alloc.as_ref()
    }

    fn get_mut(&mut self, id: AllocId) -> Option<&mut Allocation> {
        let s = self.slots.get_mut(id.slot as usize)?;
        if s.generation != id.generation {
            return None;
        }
        s.alloc.as_mut()
    }

    fn insert(&mut self, alloc: Allocation) -> AllocId {
        let five = alloc.five;
        let transport = five.transport;
        let id = match self.free.pop() {
            Some(slot) => {
                let s = &mut self.slots[slot as usize];
                s.alloc = Some(alloc);
                AllocId {
                    slot,
                    generation: s.generation,
                }
            }
            None => {
                self.slots.push(Slot {
                    generation: 0,
                    alloc: Some(alloc),
                });
                AllocId {
                    slot: (self.slots.len() - 1) as u32,
                    generation: 0,
                }
            }
        };
        self.by_five.insert(five, id);
        self.active[transport.index()] += 1;
        id
    }

    /// Takes an allocation out of every table. Its quota lease is given back when the returned
    /// value is dropped.
    fn remove(&mut self, id: AllocId) -> Option<Allocation> {
        let s = self.slots.get_mut(id.slot as usize)?;
        if s.generation != id.generation {
            return None;
        }
        let a = s.alloc.take()?;
        s.generation = s.generation.wrapping_add(1);
        self.free.push(id.slot);
        self.by_five.remove(&a.five);
        self.active[a.five.transport.index()] -= 1;
        Some(a)
    }

    fn delete(&mut self, id: AllocId, reason: DeleteReason) {
        let Some(a) = self.remove(id) else { return };
        self.stats.deleted[reason.index()] += 1;
        // Sockets still binding are released when the driver reports them bound.
        self.release_bound(id, a.relays);
        self.outputs
            .push_back(OutputItem::Other(Output::Event(Event::AllocationDeleted {
                client: a.five.client,
                reason,
            })));
    }

    /// The relay socket's own address (relay IP) for an advertised relayed address.
    fn wire_relayed(&self, family: Family, advertised: SocketAddr) -> SocketAddr {
        let ip = self.config.relay_ips.get(family).unwrap_or(advertised.ip());
        SocketAddr::new(ip, advertised.port())
    }

    /// Releases every bound relay socket of an allocation.
    fn release_bound(&mut self, alloc: AllocId, relays: [Relay; 2]) {
        for (family, r) in Family::ALL.iter().zip(relays) {
            if let Relay::Bound(advertised) = r {
                let family = *family;
                self.release(RelayId { alloc, family }, advertised);
            }
        }
    }

    /// Forgets a bound relay socket and tells the driver to close it.
    fn release(&mut self, relay: RelayId, advertised: SocketAddr) {
        let wire = self.wire_relayed(relay.family, advertised);
        self.by_relayed.remove(&wire);
        self.outputs
            .push_back(OutputItem::Other(Output::ReleaseRelay(relay)));
    }

    /// A datagram from a client arrived on a UDP listener, or a complete frame (see
    /// [`stun::stream_frame_len`]) on a TCP/TLS connection.
    pub fn handle_client(&mut self, now: Instant, five: FiveTuple, datagram: &[u8]) {
        self.begin(now);
        match datagram.first() {
            // RFC 8656 §12.4 / RFC 7983: 0x00–0x03 STUN, 0x40–0x4F ChannelData (0x4000–0x4FFF).
            Some(0x00..=0x03) => self.handle_stun(now, five, datagram),
            Some(0x40..=0x4F) => self.handle_channel_data(now, five, datagram),
            _ => self.drop(DropReason::Malformed),
        }
    }

    /// The client's TCP/TLS connection closed: its allocation ends with it (RFC 8656 §3.1).
    pub fn handle_connection_closed(&mut self, now: Instant, five: FiveTuple) {
        self.begin(now);
        if !five.transport.is_stream() {
            return; // UDP has no connection; its allocations end by lifetime or Refresh.
        }
        if let Some(&id) = self.by_five.get(&five) {
            self.delete(id, DeleteReason::ConnectionClosed);
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
        self.stats.channel_data[five.transport.index()][Direction::ClientToPeer.index()] += 1;
        self.forward_to_peer(id, five.transport, peer, data);
    }

    fn forward_to_peer(
        &mut self,
        id: AllocId,
        transport: Transport,
        peer: SocketAddr,
        data: &[u8],
    ) {
        self.stats.packets[transport.index()][Direction::ClientToPeer.index()] += 1;
        self.stats.bytes[transport.index()][Direction::ClientToPeer.index()] += data.len() as u64;
        let peer = self.client_view_to_wire(peer);
        let family = Family::of(peer.ip());
        let relay = RelayId { alloc: id, family };
        if let Some(&target) = self.by_relayed.get(&peer) {
            // Same-server short-circuit: the peer is another allocation of this shard. Deliver
            // the datagram as its relay socket would have received it from ours — same source
            // address, same permission check — without two system calls and a kernel hop.
            let from = match self.get(id).map(|a| a.relays[family.index()]) {
                Some(Relay::Bound(advertised)) => self.wire_relayed(family, advertised),
                _ => return self.drop(DropReason::NoAllocation),
            };
            self.stats.short_circuit += 1;
            return self.deliver_from_peer(self.now, target, from, data);
        }
        let start = self.buf.len();
        self.buf.extend_from_slice(data);
        self.outputs.push_back(OutputItem::Transmit(Transmit {
            dest: Dest::Peer { relay, peer },
            range: start..self.buf.len(),
        }));
    }

    /// Peers that name our external IP mean our relay IP: send there directly instead of
    /// relying on the NAT to hairpin.
    fn client_view_to_wire(&self, peer: SocketAddr) -> SocketAddr {
        let f = Family::of(peer.ip());
        match (
            self.config.external_ips.get(f),
            self.config.relay_ips.get(f),
        ) {
            (Some(ext), Some(relay))
                if peer.ip() == ext && self.config.relay_ports.contains(&peer.port()) =>
            {
                SocketAddr::new(relay, peer.port())
            }
            _ => peer,
        }
    }

    /// The inverse of [`Server::client_view_to_wire`], for addresses reported to clients and
    /// checked against permissions.
    fn wire_to_client_view(&self, peer: SocketAddr) -> SocketAddr {
        let f = Family::of(peer.ip());
        match (
            self.config.external_ips.get(f),
            self.config.relay_ips.get(f),
        ) {
            (Some(ext), Some(relay))
                if peer.ip() == relay && self.config.relay_ports.contains(&peer.port()) =>
            {
                SocketAddr::new(ext, peer.port())
            }
            _ => peer,
        }
    }

    /// A datagram from `from` arrived on the relay socket `relay`.
    pub fn handle_peer(&mut self, now: Instant, relay: RelayId, from: SocketAddr, datagram: &[u8]) {
        self.begin(now);
        self.deliver_from_peer(now, relay, from, datagram);
    }

    /// A datagram for the relay socket bound at `to` (a relay IP and port of this shard), from
    /// `from`: what another shard hands over for the same-server short-circuit. Dropped (as
    /// `no_allocation`) when no such socket is bound here any more.
    pub fn handle_peer_at(
        &mut self,
        now: Instant,
        to: SocketAddr,
        from: SocketAddr,
        datagram: &[u8],
    ) {
        self.begin(now);
        match self.by_relayed.get(&to) {
            Some(&relay) => self.deliver_from_peer(now, relay, from, datagram),
            None => self.drop(DropReason::NoAllocation),
        }
    }

    fn deliver_from_peer(
        &mut self,
        now: Instant,
        relay: RelayId,
        from: SocketAddr,
        datagram: &[u8],
    ) {
        let from = self.wire_to_client_view(SocketAddr::new(
            crate::policy::canonical(from.ip()),
            from.port(),
        ));
        let Some(a) = self.get(relay.alloc) else {
            return self.drop(DropReason::NoAllocation);
        };
        if !matches!(a.state, State::Active) || !a.has(relay.family) {
            return self.drop(DropReason::NoAllocation);
        }
        if !a.permitted(from.ip(), now) {
            return self.drop(DropReason::NoPermission);
        }
        let five = a.five;
        let t = five.transport.index();
        let start = self.buf.len();
        match a.channel_by_peer(from, now).map(|c| c.number) {
            Some(number) => {
                if CHANNEL_HEADER_LEN + datagram.len() > MAX_UDP_PAYLOAD {
                    return self.drop(DropReason::TooLarge);
                }
                self.stats.channel_data[t][Direction::PeerToClient.index()] += 1;
                self.buf.extend_from_slice(&number.to_be_bytes());
                self.buf
                    .extend_from_slice(&(datagram.len() as u16).to_be_bytes());
                self.buf.extend_from_slice(datagram);
                if five.transport.is_stream() {
                    // RFC 8656 §12.5: on streams ChannelData is padded to a multiple of four.
                    let pad = (4 - datagram.len() % 4) % 4;
                    self.buf.extend_from_slice(&[0u8; 3][..pad]);
                }
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
        self.stats.packets[t][Direction::PeerToClient.index()] += 1;
        self.stats.bytes[t][Direction::PeerToClient.index()] += datagram.len() as u64;
        self.outputs.push_back(OutputItem::Transmit(Transmit {
            dest: Dest::Client(five),
            range: start..self.buf.len(),
        }));
    }

    /// Indications need a transaction id but nobody matches on it; a counter is enough and keeps
    /// the core free of randomness.
    fn indication_tid(&mut self) -> [u8; 12] {
        self.indications = self.indications.wrapping_add(1);
        let mut t = [0u8; 12];
        t[4..].copy_from_slice(&self.indications.to_be_bytes());
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
        let external = self.config.external_ips.get(relay.family);
        let Some(a) = self.get_mut(relay.alloc) else {
            // Deleted meanwhile (shutdown, connection closed): give the socket back, before any
            // output still queued. A later `BindRelay` there may be for a new allocation in the
            // same slot, whose relay has the same index: the driver must have released this
            // socket by the time it binds that one.
            if result.is_ok() {
                self.outputs
                    .push_front(OutputItem::Other(Output::ReleaseRelay(relay)));
            }
            return;
        };
        let State::Binding { tid, fingerprint } = a.state else {
            return;
        };
        if a.relays[relay.family.index()] != Relay::Binding {
            return;
        }
        a.relays[relay.family.index()] = match result {
            Ok(bound) => Relay::Bound(SocketAddr::new(
                external.unwrap_or(bound.ip()),
                bound.port(),
            )),
            Err(_) => Relay::Failed(code::INSUFFICIENT_CAPACITY),
        };
        if let Ok(bound) = result {
            self.by_relayed.insert(bound, relay);
        }
        let Some(a) = self.get_mut(relay.alloc) else {
            return;
        };
        if a.relays.contains(&Relay::Binding) {
            return; // the other family of a dual allocation is still binding
        }
        let five = a.five;
        let key = a.key;
        let transport = five.transport.index();
        if !a.has(a.primary) {
            // Without its requested family there is no allocation: release the other, 508.
            let id = relay.alloc;
            let relays = a.relays;
            self.release_bound(id, relays);
            // Never active: no deletion to report.
            drop(self.remove(id));
            self.stats.allocations[transport][AllocResult::Capacity.index()] += 1;
            let reject = Reject::authed(code::INSUFFICIENT_CAPACITY, key);
            self.send_error(five, method::ALLOCATE, tid, fingerprint, &reject);
            return;
        }
        let lifetime = a.expires.saturating_duration_since(now);
        a.state = State::Active;
        let relays = a.relays;
        let start = self.buf.len();
        let mut e = Encoder::new(&mut self.buf, method::ALLOCATE, Class::Success, tid);
        for r in relays {
            if let Relay::Bound(addr) = r {
                e.xor_address(attr::XOR_RELAYED_ADDRESS, addr);
            }
        }
        for (family, r) in Family::ALL.iter().zip(relays) {
            if let Relay::Failed(code) = r {
                e.address_error_code(family.attr_value(), code);
            }
        }
        e.u32_attr(attr::LIFETIME, lifetime.as_secs() as u32)
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
        if let Some(a) = self.get_mut(relay.alloc) {
            a.last = Some(Cached { tid, bytes });
        }
        self.stats.allocations[transport][AllocResult::Ok.index()] += 1;
        self.outputs.push_back(OutputItem::Transmit(Transmit {
            dest: Dest::Client(five),
            range: start..range.end,
        }));
        let relayed = relays.iter().find_map(|r| match r {
            Relay::Bound(a) => Some(*a),
            _ => None,
        });
        if let Some(relayed) = relayed {
            self.outputs
                .push_back(OutputItem::Other(Output::Event(Event::AllocationCreated {
                    client: five.client,
                    relayed,
                    lifetime,
                })));
        }
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
        let (Some(peer), Some(data)) = (attrs.peer, attrs.data) else {
            return self.drop(DropReason::BadIndication);
        };
        if !attrs.unknown.as_slice().is_empty() {
            return self.drop(DropReason::BadIndication);
        }
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
        self.forward_to_peer(id, five.transport, peer, data);
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
                    self.stats.allocations[five.transport.index()]
                        [AllocResult::BadRequest.index()] += 1;
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
                self.stats.allocations[five.transport.index()]
                    [alloc_result(reject.code).index()] += 1;
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
        self.stats.binding_requests[five.transport.index()] += 1;
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
    /// USERNAME/REALM/NONCE present, nonce valid, username valid, integrity verifies. For a
    /// `new_allocation` (Allocate), the credentials must also be unexpired and their group not
    /// revoked; requests on an existing allocation check revocation in `existing`.
    fn authenticate(
        &mut self,
        now: Instant,
        five: FiveTuple,
        msg: &Message<'_>,
        attrs: &Attrs<'_>,
        new_allocation: bool,
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
        if new_allocation && rest.expiry < unix {
            self.auth_fail(AuthFailure::Expired);
            return Err(Reject::plain(code::UNAUTHENTICATED));
        }
        if new_allocation && self.is_revoked(username, unix) {
            self.auth_fail(AuthFailure::Revoked);
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
        // RFC 8656 §7.2: IPv4 unless REQUESTED-ADDRESS-FAMILY says otherwise; ADDITIONAL-ADDRESS-
        // FAMILY (IPv6 only) asks for a dual allocation and excludes REQUESTED-ADDRESS-FAMILY.
        let (primary, additional) = match (attrs.requested_family, attrs.additional_family) {
            (Some(_), Some(_)) => return Err(Reject::authed(code::BAD_REQUEST, key)),
            (None, Some(0x02)) => (Family::V4, Some(Family::V6)),
            (None, Some(_)) => return Err(Reject::authed(code::BAD_REQUEST, key)),
            (None, None) => (Family::V4, None),
            (Some(v), None) => match Family::from_attr(v) {
                Some(f) => (f, None),
                None => return Err(Reject::authed(code::ADDRESS_FAMILY_NOT_SUPPORTED, key)),
            },
        };
        if additional.is_some() && attrs.even_port.is_some() {
            return Err(Reject::authed(code::BAD_REQUEST, key));
        }
        let Some(primary_ip) = self.config.relay_ips.get(primary) else {
            return Err(Reject::authed(code::ADDRESS_FAMILY_NOT_SUPPORTED, key));
        };
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
        let mut relays = [Relay::None; 2];
        relays[primary.index()] = Relay::Binding;
        let mut binds = vec![(primary, primary_ip)];
        if let Some(f) = additional {
            match self.config.relay_ips.get(f) {
                Some(ip) => {
                    relays[f.index()] = Relay::Binding;
                    binds.push((f, ip));
                }
                // Answered in the success response with ADDRESS-ERROR-CODE (RFC 8656 §7.2).
                None => relays[f.index()] = Relay::Failed(code::ADDRESS_FAMILY_NOT_SUPPORTED),
            }
        }
        let alloc = Allocation {
            five,
            primary,
            relays,
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
        for (family, ip) in binds {
            self.outputs
                .push_back(OutputItem::Other(Output::BindRelay(BindRequest {
                    relay: RelayId { alloc: id, family },
                    ip,
                    even_port: attrs.even_port.is_some(),
                })));
        }
        Ok(())
    }

    /// Authenticates a request that needs an existing allocation; 437 without one.
    fn existing(
        &mut self,
        now: Instant,
        five: FiveTuple,
        msg: &Message<'_>,
        attrs: &Attrs<'_>,
    ) -> Result<(AllocId, Authed), Reject> {
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
        // After the 437: a client whose allocation a revocation tore down learns it is gone.
        // Revocation deletes every allocation of the group, so this only guards the invariant.
        let unix = self.unix_now(now);
        if self
            .get(id)
            .is_some_and(|a| self.is_revoked(a.username.as_bytes(), unix))
        {
            self.auth_fail(AuthFailure::Revoked);
            return Err(Reject::plain(code::UNAUTHENTICATED));
        }
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
        // RFC 8656 §7.3: REQUESTED-ADDRESS-FAMILY names one relay of the allocation (443 when it
        // has none of that family); with LIFETIME 0 only that one is deleted.
        let only = match attrs.requested_family {
            None => None,
            Some(v) => match Family::from_attr(v) {
                Some(f) if self.get(id).is_some_and(|a| a.has(f)) => Some(f),
                _ => {
                    return Err(Reject::authed(
                        code::PEER_ADDRESS_FAMILY_MISMATCH,
                        authed.key,
                    ))
                }
            },
        };
        // RFC 8656 §7.3: LIFETIME 0 deletes; anything else is granted like in Allocate, at least
        // the default and at most the maximum.
        let lifetime = match attrs.lifetime {
            Some(0) => Duration::ZERO,
            requested => self
                .lifetime(requested)
                .max(self.config.default_lifetime.min(self.config.max_lifetime)),
        };
        let other_family_stays = only.is_some_and(|f| {
            self.get(id)
                .is_some_and(|a| Family::ALL.iter().any(|g| *g != f && a.has(*g)))
        });
        if lifetime.is_zero() && other_family_stays {
            if let (Some(f), Some(a)) = (only, self.get_mut(id)) {
                let released = std::mem::replace(&mut a.relays[f.index()], Relay::None);
                // Permissions and channels of that family went through the released socket:
                // keeping them would send from it.
                a.permissions.retain(|p| Family::of(p.ip) != f);
                a.channels.retain(|c| Family::of(c.peer.ip()) != f);
                if let Relay::Bound(advertised) = released {
                    self.release(
                        RelayId {
                            alloc: id,
                            family: f,
                        },
                        advertised,
                    );
                }
            }
        } else if lifetime.is_zero() {
            self.delete(id, DeleteReason::Client);
        } else if let Some(a) = self.get_mut(id) {
            a.expires = now + lifetime;
            self.schedule(id, now + lifetime);
        }
        let range = self.success(five, msg, &authed, |e| {
            e.u32_attr(attr::LIFETIME, lifetime.as_secs() as u32);
        });
        let deleted = lifetime.is_zero() && !other_family_stays;
        self.remember(id, five, msg.transaction_id(), range, deleted);
        Ok(())
    }

    /// Checks a peer for CreatePermission (`with_port` false: only the IP matters) or
    /// ChannelBind (`with_port` true: the exact transport address). Policy comes first, so an
    /// IPv4 address hidden in IPv6 is refused as what it is (403), then the family (443).
    fn vet_peer(
        &mut self,
        id: AllocId,
        peer: SocketAddr,
        key: [u8; 16],
        with_port: bool,
    ) -> Result<(), Reject> {
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
        // on the canonical address, so its permission could never match: refuse it. Otherwise
        // the allocation needs a relay of the peer's family (RFC 8656 §9.1, §11.1: 443).
        let family = Family::of(peer.ip());
        let written_as_is = peer.is_ipv4() == (family == Family::V4);
        if !written_as_is || !self.get(id).is_some_and(|a| a.has(family)) {
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
        if attrs.peer.is_none() {
            return Err(Reject::authed(code::BAD_REQUEST, authed.key));
        }
        // All or nothing: one denied peer refuses the whole request.
        for peer in attrs.peers() {
            self.vet_peer(id, peer, authed.key, false)?;
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
        let (Some(number), Some(peer)) = (attrs.channel, attrs.peer) else {
            return Err(Reject::authed(code::BAD_REQUEST, key));
        };
        if !(CHANNEL_MIN..=CHANNEL_MAX).contains(&number) || peer.port() == 0 {
            return Err(Reject::authed(code::BAD_REQUEST, key));
        }
        self.vet_peer(id, peer, key, true)?;
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
        id: AllocId,
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
