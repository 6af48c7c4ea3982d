//! Turnpike's TURN relay driver: sockets, threads and time around the sans-IO `relay-proto`
//! core.
//!
//! # Design
//!
//! - **One shard per core** ([`conf::Relay::threads`], default = cores). A shard is an OS thread
//!   running a single-threaded tokio runtime, owning one `relay_proto::Server`.
//! - **`SO_REUSEPORT`**: every shard has its own socket on every listen address. The kernel hashes
//!   a client's 4-tuple to one of them, so a client always reaches the same shard, which created
//!   its allocation and owns its relay socket. Both directions of an allocation are therefore
//!   handled on one thread: **no locks and no cross-thread hop on the data path**.
//! - **Relay ports** are split between shards (every n-th port of `relay-ports`), so binding needs
//!   no coordination either. The only state shards share is the allocation quota table, touched
//!   on Allocate and deletion only.
//! - **Bounded work per turn**: a task reads at most [`IO_LOOP_BOUND`] datagrams before flushing
//!   and yielding; sends are non-blocking and a full socket buffer drops (and counts) the packet
//!   rather than queueing without bound.
//! - **Few system calls per datagram**: receives are `recvmmsg` batches; a shard's outputs leave
//!   after every socket the reactor found ready was read, consecutive datagrams from one socket in
//!   one `sendmmsg`, and four or more equal datagrams to one destination (a video frame's
//!   packets) in one UDP GSO `sendmsg`. Sockets are registered for readability only: sends never
//!   wait, and write interest would make every send wake the reactor again on loopback. What each
//!   step bought is measured in `docs/benchmarks.md`.
//! - The admin listener (`/metrics`, `/live`, `/ready`, [`admin`]) runs on the caller's runtime,
//!   off the data path.
//! - **Revocations** ([`RelayServer::revoker`]) reach every shard over a bounded queue per shard:
//!   an allocation may live on any shard, and each shard's core keeps its own revocation table.
//!
//! # Why not the webrtc-rs `turn` server
//!
//! It runs every allocation in one task behind shared locks (a Go port), and its REST handler
//! cannot parse `expiry:user` usernames. We use its *client* in tests.
//!
//! # Lifecycle
//!
//! [`RelayServer::bind`] binds every listener (port 0 works: the chosen port is then shared by all
//! shards) and returns at once, so tests learn the addresses before traffic flows;
//! [`RelayServer::run`] runs until the injected shutdown future completes, then drains: new
//! Allocates get 508, existing allocations relay until they end or `grace-period` passes.

pub mod admin;
mod metrics;
mod ports;
mod shard;
mod stream;
mod tls;

use std::future::Future;
use std::net::{IpAddr, SocketAddr, TcpListener as StdTcpListener, UdpSocket as StdUdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use rand::RngCore as _;
use relay_proto::{label_enum, Family, PeerPolicy, PerFamily, Quotas};
use socket2::{Domain, Protocol, Socket, Type};
use tokio::sync::{mpsc, watch};
use tracing::{debug, error, info, warn};

pub use metrics::RelayMetrics;
pub use tls::{TlsError, TlsHandle, ALPN_STUN_TURN};

/// Datagrams a task reads before it flushes and yields. Large enough to amortise the wake-up
/// (about 1 µs) over many packets, small enough that one busy socket delays the others on the
/// shard by well under a millisecond.
pub const IO_LOOP_BOUND: usize = 64;
/// Receive buffer slot: the largest UDP payload fits, so the kernel never truncates silently; the
/// core decides what is too large. [`RECV_BATCH`] slots per shard, not per socket.
pub const RECV_BUFFER: usize = 65_536;
/// Datagrams one `recvmmsg` may return: enough to empty a listener's queue under load in one
/// call (the system call, not the copy, dominates), few enough that the buffers (2 MiB per shard)
/// stay modest. A short batch also proves the queue empty, which saves the `EAGAIN` call.
pub const RECV_BATCH: usize = 32;
/// Datagrams one `sendmmsg` may carry: a receive batch's answers mostly leave one socket (the
/// listener, towards many clients), so the same size as [`RECV_BATCH`] sends a whole batch in one
/// call; far below the kernel's limit (`UIO_MAXIOV`, 1024).
pub const SEND_BATCH: usize = RECV_BATCH;
/// Kernel buffer asked for on listener sockets (capped by `net.core.rmem_max`/`wmem_max`): absorbs
/// bursts from thousands of clients while a shard is busy. Relay sockets keep the default to keep
/// per-allocation memory small.
pub const LISTENER_SOCKET_BUFFER: usize = 4 << 20;
/// Timer tick of a shard: publishes metrics, re-anchors the wall clock and notices deadlines that
/// moved earlier. Allocation, permission and channel lifetimes are whole seconds, so a second
/// of resolution loses nothing.
pub const TICK: Duration = Duration::from_secs(1);
/// Datagrams queued from one shard to another for the same-server short-circuit: a few ticks'
/// worth at the rates a shard sustains; beyond that the target shard is overloaded and dropping
/// (counted) is better than queueing without bound.
const HANDOFF_QUEUE: usize = 4096;
/// Revocations queued for one shard. The control plane sends one per ended call, and a shard
/// takes them between two reactor turns, so the queue is empty in normal operation; 1024 absorbs
/// a burst of calls ending together (a tenant ending all its calls, a control plane catching up
/// after a restart) while bounding it at some 30 KB per shard (the group string is shared by
/// all shards). A full queue means the shard is stuck, and the revocation is dropped (counted)
/// rather than piling up.
const REVOCATION_QUEUE: usize = 1024;
/// Backlog of stream listeners: connections the kernel completes before a shard accepts them.
const STREAM_BACKLOG: i32 = 1024;
/// First byte of a TLS handshake record: neither STUN (0x00–0x03) nor ChannelData (0x40–0x4F),
/// so one port can serve TCP and TLS (RFC 7983 demultiplexing).
pub(crate) const TLS_HANDSHAKE_BYTE: u8 = 0x16;

label_enum! {
    /// Drops counted by the driver (same metric as the core's drops, `reason` label).
    pub enum DriverDrop {
        /// A send found the socket buffer full.
        SendWouldBlock => "send_would_block",
        /// A send failed (or its socket was gone).
        SendError => "send_error",
        /// A receive failed with something other than "would block".
        RecvError => "recv_error",
        /// A stream client's egress queue was full (it does not read fast enough).
        StreamQueueFull => "stream_queue_full",
        /// Another shard's short-circuit queue was full (that shard is overloaded).
        HandoffQueueFull => "handoff_queue_full",
    }
}

label_enum! {
    /// Why a TCP/TLS connection ended (metric label). Every stream limit has its own value.
    pub enum StreamClose {
        /// The client closed it (or reset it).
        ClientClosed => "client_closed",
        /// Refused at accept: `max-connections-per-ip` reached.
        PerIpLimit => "per_ip_limit",
        /// No TLS handshake and first frame within `handshake-timeout`.
        HandshakeTimeout => "handshake_timeout",
        /// Nothing received for `idle-timeout`.
        IdleTimeout => "idle_timeout",
        /// A frame declared more than `max-frame` bytes.
        FrameTooLarge => "frame_too_large",
        /// The stream stopped being STUN/ChannelData.
        FramingError => "framing_error",
        /// A TLS ClientHello on a server without `[relay.tls]`.
        TlsUnavailable => "tls_unavailable",
        /// The TLS handshake failed (old protocol version, no common cipher, wrong ALPN).
        TlsHandshakeFailed => "tls_handshake_failed",
        /// A write did not complete within `write-timeout`: the client stopped reading.
        SlowReader => "slow_reader",
        /// A read or write failed.
        IoError => "io_error",
        /// The relay shut down.
        Shutdown => "shutdown",
        /// Accepting failed (e.g. out of file descriptors); counted per failed accept.
        AcceptError => "accept_error",
    }
}

label_enum! {
    /// What became of a revocation handed to [`Revoker::revoke`] (metric label).
    pub enum RevocationResult {
        /// Queued for every shard.
        Delivered => "delivered",
        /// At least one shard's queue was full (or the relay had stopped): that shard never saw it.
        Dropped => "dropped",
        /// The group is not a credential group (`[A-Za-z0-9_-]`, 1 to 64 characters): no username
        /// can have it, so there is nothing to do.
        Invalid => "invalid",
    }
}

/// A revocation on its way to one shard.
#[derive(Debug, Clone)]
pub(crate) struct Revocation {
    pub(crate) group: Arc<str>,
    pub(crate) until_unix: u64,
}

/// Revokes credential groups on every shard of a relay: the handle the control plane calls when
/// a call ends. Cheap to clone, usable from any thread; never blocks.
///
/// Each shard's core then deletes the group's allocations and refuses the group's new Allocates
/// until the given time (see `relay_proto::Server::handle_revocation`).
#[derive(Clone)]
pub struct Revoker {
    inner: Arc<RevokerInner>,
}

struct RevokerInner {
    /// One queue per shard, in shard order.
    queues: Vec<mpsc::Sender<Revocation>>,
    metrics: RelayMetrics,
    /// Set at the first dropped revocation: it is logged once, then only counted, so a stuck
    /// shard cannot flood the log.
    warned: AtomicBool,
}

impl std::fmt::Debug for Revoker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Revoker")
            .field("shards", &self.inner.queues.len())
            .finish_non_exhaustive()
    }
}

impl Revoker {
    /// Revokes credential group `group` (the `GROUP` of usernames `EXPIRY:GROUP.RANDOM`) until
    /// the Unix time `until_unix`, normally the expiry of the credentials minted in it: every
    /// shard tears down the group's allocations and refuses its new ones until then. Usable
    /// before [`RelayServer::run`] (shards apply it when they start); the outcome is counted in
    /// `turnpike_relay_revocations_total`.
    pub fn revoke(&self, group: &str, until_unix: u64) {
        let result = self.deliver(group, until_unix);
        self.inner.metrics.revocation(result);
    }

    fn deliver(&self, group: &str, until_unix: u64) -> RevocationResult {
        if !relay_proto::auth::is_valid_group(group) {
            debug!("revocation of an invalid credential group ignored");
            return RevocationResult::Invalid;
        }
        let r = Revocation {
            group: group.into(),
            until_unix,
        };
        let (mut full, mut closed) = (0usize, 0usize);
        for q in &self.inner.queues {
            match q.try_send(r.clone()) {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Full(_)) => full += 1,
                Err(mpsc::error::TrySendError::Closed(_)) => closed += 1,
            }
        }
        if full + closed == 0 {
            return RevocationResult::Delivered;
        }
        if full > 0 && !self.inner.warned.swap(true, Ordering::Relaxed) {
            warn!(
                shards = full,
                "revocation queue full: a revocation was dropped on a shard that is stuck or not \
                 running yet (further drops are only counted in turnpike_relay_revocations_total)"
            );
        } else {
            // A stopped relay has no allocation left to tear down.
            debug!(full, closed, "revocation not delivered to every shard");
        }
        RevocationResult::Dropped
    }
}

/// The phase all shards follow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Phase {
    Running,
    Draining,
    Stop,
}

/// Why the relay could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// A listen address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        /// The address.
        addr: SocketAddr,
        /// The cause.
        source: std::io::Error,
    },
    /// The TLS certificate or key could not be loaded.
    #[error("TLS: {0}")]
    Tls(#[from] TlsError),
    /// Registering metrics failed (a name registered twice).
    #[error("metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    /// A shard thread could not be started.
    #[error("cannot start a shard thread: {0}")]
    Thread(std::io::Error),
    /// A shard failed or panicked: the relay stopped (the others drained), so the process
    /// should exit and be restarted rather than run on without it.
    #[error("relay shard {shard} stopped: {cause}")]
    Shard {
        /// Which shard.
        shard: usize,
        /// Its error, or that it panicked.
        cause: String,
    },
}

/// A bound, not yet running relay.
#[derive(Debug)]
pub struct RelayServer {
    local_addrs: Vec<conf::Listen>,
    shards: Vec<shard::ShardSetup>,
    grace: Duration,
    ready: Arc<AtomicBool>,
    tls: Option<TlsHandle>,
    revoker: Revoker,
    /// Shards report here when a drain left them without allocations (see
    /// [`shard::ShardSetup::drained`]).
    drained: mpsc::Receiver<usize>,
}

impl std::fmt::Debug for shard::ShardSetup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShardSetup").finish_non_exhaustive()
    }
}

fn per_family(ips: &conf::RelayIps) -> PerFamily<IpAddr> {
    PerFamily {
        v4: ips.v4.map(IpAddr::V4),
        v6: ips.v6.map(IpAddr::V6),
    }
}

impl RelayServer {
    /// Binds every listener of `cfg` and prepares one shard per thread. `admin` is the admin
    /// listener's address (a peer must never reach it through the relay).
    pub fn bind(
        cfg: &conf::Relay,
        admin: Option<SocketAddr>,
        registry: &prometheus::Registry,
    ) -> Result<Self, StartError> {
        let threads = cfg
            .threads
            .map(|n| n.get())
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
        let metrics = RelayMetrics::register(registry)?;
        let tls = match &cfg.tls {
            Some(t) => Some(TlsHandle::load(&t.cert_file, &t.key_file)?),
            None => None,
        };
        // udp[l][s] / tcp[l][s]: listen address l, shard s.
        let mut udp: Vec<Vec<StdUdpSocket>> = Vec::new();
        let mut tcp: Vec<Vec<StdTcpListener>> = Vec::new();
        let mut local_addrs = Vec::new();
        for l in &cfg.listen {
            let mut addr = l.addr;
            let listen_err = |addr, source| StartError::Listen { addr, source };
            if l.transport.is_stream() {
                let mut socks = Vec::with_capacity(threads);
                for _ in 0..threads {
                    let s = reuseport_listener(addr).map_err(|e| listen_err(addr, e))?;
                    // Port 0: the first bind chooses, the other shards join that port.
                    addr = s.local_addr().map_err(|e| listen_err(addr, e))?;
                    socks.push(s);
                }
                tcp.push(socks);
            } else {
                let mut socks = Vec::with_capacity(threads);
                for _ in 0..threads {
                    let s = reuseport_socket(addr).map_err(|e| listen_err(addr, e))?;
                    addr = s.local_addr().map_err(|e| listen_err(addr, e))?;
                    socks.push(s);
                }
                udp.push(socks);
            }
            local_addrs.push(conf::Listen {
                transport: l.transport,
                addr,
            });
        }
        let own = own_addresses(local_addrs.iter().map(|l| l.addr), admin);
        let relay_ips = per_family(&cfg.relay_ips);
        let external_ips = per_family(&cfg.external_ips);
        let range = cfg.relay_ports.start..=cfg.relay_ports.end;
        let policy = PeerPolicy::new(
            cfg.allow_peers.clone(),
            cfg.deny_peers.clone(),
            own,
            relay_ips.iter().chain(external_ips.iter()).collect(),
            range.clone(),
        );
        let quotas = Quotas::new(cfg.user_quota, cfg.total_quota);
        let mut nonce_key = [0u8; 32];
        rand::rng().fill_bytes(&mut nonce_key);
        let mut proto = relay_proto::Config::new(
            cfg.realm.clone(),
            cfg.secrets
                .iter()
                .map(|s| s.expose().as_bytes().to_vec())
                .collect(),
            nonce_key,
            cfg.relay_ips.primary(),
            policy,
        );
        proto.relay_ips = relay_ips;
        proto.external_ips = external_ips;
        proto.relay_ports = range.clone();
        proto.max_lifetime = cfg.max_lifetime;
        proto.nonce_lifetime = cfg.nonce_lifetime;
        proto.max_permissions = cfg.max_permissions as usize;
        proto.challenge_rate = cfg.challenge_rate;
        proto.challenge_burst = cfg.challenge_rate.saturating_mul(2);
        proto.quotas = quotas;
        let streams = stream::StreamShared::new(
            stream::StreamLimits {
                per_ip: cfg.max_connections_per_ip,
                handshake_timeout: cfg.handshake_timeout,
                idle_timeout: cfg.idle_timeout,
                max_frame: cfg.max_frame,
                queue: cfg.stream_queue,
                write_timeout: cfg.write_timeout,
            },
            tls.clone(),
        );
        let now = Instant::now();
        let wall = SystemTime::now();
        let (handoff_tx, mut handoff_rx): (Vec<_>, Vec<_>) = (0..threads)
            .map(|_| tokio::sync::mpsc::channel(HANDOFF_QUEUE))
            .unzip();
        let handoff_tx = Arc::new(handoff_tx);
        let (drained_tx, drained) = mpsc::channel(threads.max(1));
        let (revoke_tx, mut revoke_rx): (Vec<_>, Vec<_>) = (0..threads)
            .map(|_| mpsc::channel(REVOCATION_QUEUE))
            .unzip();
        let revoker = Revoker {
            inner: Arc::new(RevokerInner {
                queues: revoke_tx,
                metrics: metrics.clone(),
                warned: AtomicBool::new(false),
            }),
        };
        let bound = shard::BoundPorts::new();
        let mut shards = Vec::with_capacity(threads);
        for s in 0..threads {
            let pool = |f: Family| {
                relay_ips
                    .get(f)
                    .map(|_| ports::PortPool::new(range.clone(), s, threads))
            };
            shards.push(shard::ShardSetup {
                core: relay_proto::Server::new(proto.clone(), now, wall),
                listeners: udp.iter_mut().map(|v| v.remove(0)).collect(),
                stream_listeners: tcp.iter_mut().map(|v| v.remove(0)).collect(),
                ports: [pool(Family::V4), pool(Family::V6)],
                metrics: metrics.clone(),
                streams: Arc::clone(&streams),
                siblings: shard::Siblings {
                    index: s,
                    queues: Arc::clone(&handoff_tx),
                    relay_ips,
                    relay_ports: range.clone(),
                    bound: Arc::clone(&bound),
                },
                handoffs: handoff_rx.remove(0),
                revocations: revoke_rx.remove(0),
                drained: drained_tx.clone(),
            });
        }
        Ok(Self {
            local_addrs,
            shards,
            grace: cfg.grace_period,
            ready: Arc::new(AtomicBool::new(false)),
            tls,
            revoker,
            drained,
        })
    }

    /// The bound listen addresses, in `listen` order (with real ports when 0 was asked for).
    pub fn local_addrs(&self) -> &[conf::Listen] {
        &self.local_addrs
    }

    /// The bound address of the first listener of `transport`.
    pub fn local_addr(&self, transport: conf::Transport) -> Option<SocketAddr> {
        self.local_addrs
            .iter()
            .find(|l| l.transport == transport)
            .map(|l| l.addr)
    }

    /// True while the relay takes new allocations: for `/ready`.
    pub fn readiness(&self) -> Arc<AtomicBool> {
        Arc::clone(&self.ready)
    }

    /// The TLS configuration, to reload certificates (on SIGHUP) while running.
    pub fn tls(&self) -> Option<TlsHandle> {
        self.tls.clone()
    }

    /// The handle that revokes credential groups on every shard (see [`Revoker`]). Take it
    /// before [`RelayServer::run`]; it stays valid (and cheap to clone) while the relay runs.
    pub fn revoker(&self) -> Revoker {
        self.revoker.clone()
    }
    /// Runs the shards until `shutdown` completes, then drains for up to the grace period.
    /// A shard that fails or panics (in any of its tasks: listeners, relay sockets, TCP/TLS
    /// connections) stops the relay the same way, and `run` then returns [`StartError::Shard`].
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> Result<(), StartError> {
        self.run_shards(shutdown, shard::run).await
    }

    async fn run_shards(
        self,
        shutdown: impl Future<Output = ()>,
        shard_main: fn(usize, shard::ShardSetup, watch::Receiver<Phase>) -> std::io::Result<()>,
    ) -> Result<(), StartError> {
        let mut drained = self.drained;
        let (tx, rx) = watch::channel(Phase::Running);
        // Each shard reports once, when it ends: its failure, if any.
        let (done_tx, mut done_rx) =
            tokio::sync::mpsc::channel::<(usize, Option<String>)>(self.shards.len().max(1));
        let mut handles = Vec::new();
        for (i, setup) in self.shards.into_iter().enumerate() {
            let rx = rx.clone();
            let done = done_tx.clone();
            let h = std::thread::Builder::new()
                .name(format!("relay-shard-{i}"))
                .spawn(move || {
                    let run = std::panic::AssertUnwindSafe(|| shard_main(i, setup, rx));
                    let failure = match std::panic::catch_unwind(run) {
                        Ok(Ok(())) => None,
                        Ok(Err(e)) => Some(e.to_string()),
                        Err(_) => Some("panicked".to_owned()),
                    };
                    if let Some(cause) = &failure {
                        error!(shard = i, cause = %cause, "relay shard failed");
                    }
                    // The receiver may be gone when the whole server is being torn down.
                    let _ = done.try_send((i, failure));
                })
                .map_err(StartError::Thread)?;
            handles.push(h);
        }
        drop(done_tx);
        self.ready.store(true, Ordering::Relaxed);
        let total = handles.len();
        let mut failed: Option<(usize, String)> = None;
        // Shards that ended or drained: the drain is over when every one has.
        let mut quiet = vec![false; total];
        tokio::select! {
            _ = shutdown => {}
            Some((i, failure)) = done_rx.recv() => {
                // A shard never ends on its own while the relay runs.
                quiet[i] = true;
                failed = Some((i, failure.unwrap_or_else(|| "ended while running".to_owned())));
            }
        }
        self.ready.store(false, Ordering::Relaxed);
        info!(grace = ?self.grace, "relay draining: no new allocations");
        // Ignored error: no receivers means every shard has already stopped.
        let _ = tx.send(Phase::Draining);
        // Every shard keeps its listeners until all have drained: a shard that closed its
        // `SO_REUSEPORT` sockets early would make the kernel hash the other shards' clients to
        // the remaining sockets, and those shards do not have their allocations.
        let deadline = tokio::time::Instant::now() + self.grace;
        while quiet.contains(&false) {
            tokio::select! {
                r = done_rx.recv() => match r {
                    Some((i, failure)) => {
                        quiet[i] = true;
                        if let (None, Some(cause)) = (&failed, failure) {
                            failed = Some((i, cause));
                        }
                    }
                    None => break,
                },
                Some(i) = drained.recv() => quiet[i] = true,
                _ = tokio::time::sleep_until(deadline) => {
                    info!("grace period over: closing remaining allocations");
                    break;
                }
            }
        }
        let _ = tx.send(Phase::Stop);
        for h in handles {
            // Join off the async runtime: a shard finishing its last flush takes microseconds.
            // (A shard's panic was caught in its thread.)
            let _ = tokio::task::spawn_blocking(move || h.join()).await;
        }
        info!("relay stopped");
        match failed {
            Some((shard, cause)) => Err(StartError::Shard { shard, cause }),
            None => Ok(()),
        }
    }
}

/// A UDP socket with `SO_REUSEPORT`, non-blocking, with large kernel buffers.
fn reuseport_socket(addr: SocketAddr) -> std::io::Result<StdUdpSocket> {
    let s = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    if addr.is_ipv6() {
        s.set_only_v6(true)?;
    }
    s.set_reuse_port(true)?;
    // Best effort: the kernel caps these at its maximums.
    let _ = s.set_recv_buffer_size(LISTENER_SOCKET_BUFFER);
    let _ = s.set_send_buffer_size(LISTENER_SOCKET_BUFFER);
    s.bind(&addr.into())?;
    s.set_nonblocking(true)?;
    Ok(s.into())
}

/// A TCP listener with `SO_REUSEPORT`, non-blocking, listening.
fn reuseport_listener(addr: SocketAddr) -> std::io::Result<StdTcpListener> {
    let s = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    if addr.is_ipv6() {
        s.set_only_v6(true)?;
    }
    s.set_reuse_address(true)?;
    s.set_reuse_port(true)?;
    s.bind(&addr.into())?;
    s.listen(STREAM_BACKLOG)?;
    s.set_nonblocking(true)?;
    Ok(s.into())
}

/// The server's own sockets, with wildcard listeners expanded to every interface address, so
/// the peer policy refuses exactly them (and not the same port on every host of the Internet).
fn own_addresses(
    listeners: impl Iterator<Item = SocketAddr>,
    admin: Option<SocketAddr>,
) -> Vec<SocketAddr> {
    let ifaces: Vec<IpAddr> = if_addrs::get_if_addrs()
        .map(|v| v.into_iter().map(|i| i.ip()).collect())
        .unwrap_or_default();
    let mut out = Vec::new();
    for a in listeners.chain(admin) {
        if a.ip().is_unspecified() {
            if ifaces.is_empty() {
                // Could not list interfaces: keep the wildcard, which the policy reads as "any".
                out.push(a);
            }
            for ip in &ifaces {
                if ip.is_ipv4() == a.is_ipv4() {
                    out.push(SocketAddr::new(*ip, a.port()));
                }
            }
        } else {
            out.push(a);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn two_shards() -> RelayServer {
        let cfg = conf::parse(
            r#"
[relay]
realm = "example.org"
listen = ["udp://127.0.0.1:0"]
relay-ip = "127.0.0.1"
secrets = ["unit-test-secret-0123456789"]
threads = 2
grace-period = "0s"
"#,
            &[],
        )
        .unwrap();
        RelayServer::bind(&cfg.relay, None, &prometheus::Registry::new()).unwrap()
    }

    #[tokio::test]
    async fn a_shard_that_panics_stops_the_relay_with_an_error() {
        let relay = two_shards();
        let ready = relay.readiness();
        let r = relay
            .run_shards(std::future::pending(), |i, setup, phase| {
                if i == 1 {
                    panic!("a bug in shard 1");
                }
                shard::run(i, setup, phase)
            })
            .await;
        match r {
            Err(StartError::Shard { shard: 1, cause }) => assert_eq!(cause, "panicked"),
            other => panic!("{other:?}"),
        }
        assert!(
            !ready.load(Ordering::Relaxed),
            "not ready once a shard is gone"
        );
    }

    #[tokio::test]
    async fn a_shard_that_fails_stops_the_relay_with_its_error() {
        let relay = two_shards();
        let r = relay
            .run_shards(std::future::pending(), |i, setup, phase| {
                if i == 0 {
                    return Err(std::io::Error::other("no runtime"));
                }
                shard::run(i, setup, phase)
            })
            .await;
        match r {
            Err(StartError::Shard { shard: 0, cause }) => assert_eq!(cause, "no runtime"),
            other => panic!("{other:?}"),
        }
    }
}
