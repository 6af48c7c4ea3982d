//! One shard: an OS thread with a single-threaded tokio runtime that owns one `relay-proto`
//! core, one `SO_REUSEPORT` socket per listen address (UDP, and TCP for streams), and the relay
//! sockets of its allocations.
//!
//! Every task of a shard runs on its thread and shares the shard through `Rc<RefCell<_>>`: a
//! borrow, never a lock, and never held across an `.await`. Each task reads a bounded batch and
//! feeds the core; the core's outputs are flushed with non-blocking, batched sends once every
//! socket the reactor found ready has been read (see `recv_batch`).

use std::cell::RefCell;
use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr, TcpListener as StdTcpListener, UdpSocket as StdUdpSocket};
use std::os::fd::{AsRawFd as _, RawFd};
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use relay_proto::{
    BindError, Dest, Family, FiveTuple, Output, PerFamily, RelayId, Server, Transmit, Transport,
};
use tokio::io::unix::AsyncFd;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tracing::{debug, warn};

use crate::metrics::{DriverStats, Publisher, RelayMetrics};
use crate::ports::PortPool;
use crate::stream::{self, Ingress, StreamShared};
use crate::{
    DriverDrop, Phase, Revocation, IO_LOOP_BOUND, RECV_BATCH, RECV_BUFFER, SEND_BATCH, TICK,
};

struct Relay {
    id: RelayId,
    family: Family,
    port: u16,
    socket: Rc<UdpSock>,
    task: JoinHandle<()>,
}

struct Listener {
    local: SocketAddr,
    socket: Rc<UdpSock>,
}

/// A datagram one shard hands to another for the same-server short-circuit: for the relay
/// socket bound at `to`, from the relay socket at `from`.
#[derive(Debug)]
pub(crate) struct Handoff {
    to: SocketAddr,
    from: SocketAddr,
    /// A slice of the sending shard's handoff block (see [`Shard::handoff_buf`]).
    data: bytes::Bytes,
}

/// Where this shard sits among its siblings, to route datagrams between allocations on
/// different shards without the kernel.
pub(crate) struct Siblings {
    pub(crate) index: usize,
    /// One queue per shard (this one's included, unused).
    pub(crate) queues: Arc<Vec<mpsc::Sender<Handoff>>>,
    pub(crate) relay_ips: PerFamily<IpAddr>,
    pub(crate) relay_ports: std::ops::RangeInclusive<u16>,
    /// Which relay ports are bound right now, shared by all shards.
    pub(crate) bound: Arc<BoundPorts>,
}

impl Siblings {
    /// The shard owning a bound relay socket at `addr`, if there is one: ports are dealt to
    /// shards in pairs (see `PortPool::new`). An address in the relay range with no relay socket
    /// (another program's socket on the relay IP) is not ours and goes through the kernel.
    fn owner(&self, addr: SocketAddr) -> Option<usize> {
        let family = Family::of(addr.ip());
        let ours = self.relay_ips.get(family) == Some(addr.ip())
            && self.relay_ports.contains(&addr.port())
            && self.bound.get(family, addr.port());
        ours.then(|| crate::ports::owner(addr.port(), self.queues.len()))
    }
}

/// One bit per port and family: set while a relay socket is bound there. Written at bind and
/// release only; read per cross-shard packet with a relaxed load (a stale bit only sends a
/// datagram to a socket that just closed, exactly as the kernel would have).
#[derive(Debug)]
pub(crate) struct BoundPorts {
    bits: [Vec<std::sync::atomic::AtomicU64>; 2],
}

impl BoundPorts {
    pub(crate) fn new() -> Arc<Self> {
        let words = || {
            (0..1024)
                .map(|_| std::sync::atomic::AtomicU64::new(0))
                .collect()
        };
        Arc::new(Self {
            bits: [words(), words()],
        })
    }

    fn set(&self, family: Family, port: u16, on: bool) {
        use std::sync::atomic::Ordering::Relaxed;
        let (w, b) = (usize::from(port / 64), 1u64 << (port % 64));
        if on {
            self.bits[family.index()][w].fetch_or(b, Relaxed);
        } else {
            self.bits[family.index()][w].fetch_and(!b, Relaxed);
        }
    }

    fn get(&self, family: Family, port: u16) -> bool {
        let (w, b) = (usize::from(port / 64), 1u64 << (port % 64));
        self.bits[family.index()][w].load(std::sync::atomic::Ordering::Relaxed) & b != 0
    }
}

pub(crate) struct Shard {
    core: Server,
    siblings: Siblings,
    listeners: Vec<Listener>,
    /// Indexed by `RelayId::index()`, which the core keeps dense.
    relays: Vec<Option<Relay>>,
    /// Relay port pools by family (IPv4, IPv6).
    ports: [Option<PortPool>; 2],
    /// [`RECV_BATCH`] receive slots of [`RECV_BUFFER`] bytes each, for one `recvmmsg`.
    recv_buf: Box<[u8]>,
    /// `recvmmsg` headers, one set per address family: the kernel shrinks each header's address
    /// length to what it wrote, and the headers are reused, so an IPv6 socket must never get
    /// headers an IPv4 socket shrank.
    recv_headers: [nix::sys::socket::MultiHeaders<nix::sys::socket::SockaddrStorage>; 2],
    /// `sendmmsg` headers ([`SEND_BATCH`]); the address length is set per datagram on every send.
    send_headers: nix::sys::socket::MultiHeaders<nix::sys::socket::SockaddrStorage>,
    /// Datagrams for other shards are cut from this block: one allocation per block, not per
    /// datagram; the block is freed (or reclaimed) once the other shards consumed its datagrams.
    handoff_buf: bytes::BytesMut,
    /// Datagrams received since the last flush (see [`recv_batch`]).
    unflushed: usize,
    /// Wakes [`flush_task`].
    flusher: Rc<tokio::sync::Notify>,
    /// Where the shard's tasks report a panic ([`spawn_guarded`]).
    pub(crate) panics: Rc<TaskPanics>,
    /// Transmits taken from the core and not yet sent (see [`Shard::flush`]); empty between
    /// flushes, kept for its capacity.
    pending: Vec<Transmit>,
    /// Whether sends may use UDP GSO (see [`Shard::send_gso`]); cleared for good when the kernel
    /// refuses it.
    gso: bool,
    /// Frames for stream clients, by 5-tuple: each connection's bounded egress queue.
    pub(crate) streams: HashMap<FiveTuple, stream::Egress>,
    pub(crate) stats: DriverStats,
    publisher: Publisher,
    metrics: RelayMetrics,
}

pub(crate) type ShardRef = Rc<RefCell<Shard>>;

/// Which of a shard's tasks panicked, if one did. A panic is a bug (the core never panics on
/// input); the shard then fails as a panic of its main future does, and the relay stops, rather
/// than going on without that task: a listener that no longer reads, an ingress that no longer
/// ends allocations, with `/ready` still saying 200.
#[derive(Debug, Default)]
pub(crate) struct TaskPanics {
    what: std::cell::Cell<Option<&'static str>>,
    notify: tokio::sync::Notify,
}

/// Spawns `fut` on the shard's `LocalSet`; if it panics, records `what` in `panics` and wakes
/// the shard's timer task, which fails the shard.
pub(crate) fn spawn_guarded(
    panics: &Rc<TaskPanics>,
    what: &'static str,
    fut: impl std::future::Future<Output = ()> + 'static,
) -> JoinHandle<()> {
    use futures_util::FutureExt as _;
    let panics = Rc::clone(panics);
    // Combinators, not an `async` block: a block that awaits a future it captured keeps room
    // for it twice (measured: 256 bytes more per allocation, a relay socket's task each).
    // The shard's state is a `RefCell` (released while unwinding, never poisoned), and the
    // shard stops right after: nothing observes what the panic left half done.
    tokio::task::spawn_local(
        std::panic::AssertUnwindSafe(fut)
            .catch_unwind()
            .map(move |result| {
                if result.is_err() {
                    panics.what.set(Some(what));
                    panics.notify.notify_one();
                }
            }),
    )
}

/// Datagrams received before a deferred flush is done at once: a few receive bounds' worth, so
/// the core's output queue (and the payload bytes it holds) stays small while sockets that woke
/// together still share `sendmmsg` calls.
const FLUSH_DEFER: usize = 4 * IO_LOOP_BOUND;

/// Bytes of one handoff block: a few hundred media-sized datagrams per allocation, small next to
/// a shard's receive buffers.
const HANDOFF_BLOCK: usize = 64 * 1024;

/// Consecutive datagrams leaving one UDP socket, sent together by [`Shard::send_run`]: the
/// destination and the index of the transmit in [`Shard::pending`].
struct SendRun {
    fd: Option<RawFd>,
    items: [(SocketAddr, usize); SEND_BATCH],
    len: usize,
}

impl SendRun {
    fn new() -> Self {
        Self {
            fd: None,
            items: [(SocketAddr::from(([0, 0, 0, 0], 0)), 0); SEND_BATCH],
            len: 0,
        }
    }
}

pub(crate) struct ShardSetup {
    pub(crate) core: Server,
    pub(crate) listeners: Vec<StdUdpSocket>,
    pub(crate) stream_listeners: Vec<StdTcpListener>,
    pub(crate) ports: [Option<PortPool>; 2],
    pub(crate) metrics: RelayMetrics,
    pub(crate) streams: Arc<StreamShared>,
    pub(crate) siblings: Siblings,
    pub(crate) handoffs: mpsc::Receiver<Handoff>,
    /// Credential-group revocations from the [`crate::Revoker`].
    pub(crate) revocations: mpsc::Receiver<Revocation>,
    /// Where the shard reports, once, that a drain left it without allocations (its index).
    /// It keeps running until [`Phase::Stop`]: its listeners must stay open while other shards
    /// drain, or the kernel's `SO_REUSEPORT` group shrinks and hashes their clients elsewhere.
    pub(crate) drained: mpsc::Sender<usize>,
}

/// Runs a shard to completion on the current thread.
pub(crate) fn run(
    index: usize,
    setup: ShardSetup,
    phase: watch::Receiver<Phase>,
) -> io::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let local = tokio::task::LocalSet::new();
    local.block_on(&rt, async move {
        let mut listeners = Vec::new();
        for s in setup.listeners {
            let local = s.local_addr()?;
            listeners.push(Listener {
                local,
                socket: Rc::new(register(s)?),
            });
        }
        // Every port of a new pool is free: its size is this shard's share of the capacity.
        setup.metrics.shard_started(
            index,
            setup
                .ports
                .each_ref()
                .map(|p| p.as_ref().map_or(0, PortPool::available)),
        );
        let shard = Rc::new(RefCell::new(Shard {
            core: setup.core,
            siblings: setup.siblings,
            listeners,
            relays: Vec::new(),
            ports: setup.ports,
            recv_buf: vec![0u8; RECV_BUFFER * RECV_BATCH].into_boxed_slice(),
            recv_headers: [
                nix::sys::socket::MultiHeaders::preallocate(RECV_BATCH, None),
                nix::sys::socket::MultiHeaders::preallocate(RECV_BATCH, None),
            ],
            send_headers: nix::sys::socket::MultiHeaders::preallocate(SEND_BATCH, None),
            pending: Vec::with_capacity(IO_LOOP_BOUND),
            gso: true,
            unflushed: 0,
            flusher: Rc::new(tokio::sync::Notify::new()),
            panics: Rc::new(TaskPanics::default()),
            handoff_buf: bytes::BytesMut::with_capacity(HANDOFF_BLOCK),
            streams: HashMap::new(),
            stats: DriverStats::default(),
            publisher: Publisher::new(index),
            metrics: setup.metrics,
        }));
        let mut tasks = Vec::new();
        let flusher = Rc::clone(&shard.borrow().flusher);
        let panics = Rc::clone(&shard.borrow().panics);
        tasks.push(spawn_guarded(
            &panics,
            "flush",
            flush_task(Rc::clone(&shard), flusher),
        ));
        let count = shard.borrow().listeners.len();
        for i in 0..count {
            tasks.push(spawn_guarded(
                &panics,
                "listener",
                listener_task(Rc::clone(&shard), i),
            ));
        }
        // Stream connections hand their frames to the shard over one bounded queue; a full
        // queue makes readers wait, which pushes back on the client through TCP.
        let (ingress_tx, ingress_rx) = mpsc::channel(setup.streams.limits.queue);
        tasks.push(spawn_guarded(
            &panics,
            "ingress",
            ingress_task(Rc::clone(&shard), ingress_rx),
        ));
        for l in setup.stream_listeners {
            let listener = tokio::net::TcpListener::from_std(l)?;
            tasks.push(spawn_guarded(
                &panics,
                "accept",
                stream::accept_task(
                    Rc::clone(&shard),
                    listener,
                    Arc::clone(&setup.streams),
                    ingress_tx.clone(),
                ),
            ));
        }
        drop(ingress_tx);
        tasks.push(spawn_guarded(
            &panics,
            "handoff",
            handoff_task(Rc::clone(&shard), setup.handoffs),
        ));
        tasks.push(spawn_guarded(
            &panics,
            "revocation",
            revocation_task(Rc::clone(&shard), setup.revocations),
        ));
        debug!(shard = index, "shard running");
        tokio::select! {
            () = timer_task(Rc::clone(&shard), phase, (index, setup.drained)) => {}
            () = panics.notify.notified() => {}
        }
        for t in tasks {
            t.abort();
        }
        let mut sh = shard.borrow_mut();
        for r in sh.relays.iter_mut().filter_map(Option::take) {
            r.task.abort();
        }
        // Dropping the egress senders ends every connection's writer, closing the connections.
        sh.streams.clear();
        sh.publish();
        if let Some(what) = panics.what.get() {
            return Err(io::Error::other(format!("its {what} task panicked")));
        }
        debug!(shard = index, "shard stopped");
        Ok(())
    })
}

async fn listener_task(shard: ShardRef, index: usize) {
    let (socket, local) = {
        let sh = shard.borrow();
        (
            Rc::clone(&sh.listeners[index].socket),
            sh.listeners[index].local,
        )
    };
    let family = Family::of(local.ip());
    loop {
        let mut ready = match socket.readable().await {
            Ok(r) => r,
            Err(e) => {
                warn!(error = %e, "listener socket failed");
                return;
            }
        };
        let more = recv_batch(&shard, socket.get_ref(), family, |core, now, from, data| {
            let five = FiveTuple {
                client: from,
                server: local,
                transport: Transport::Udp,
            };
            core.handle_client(now, five, data);
        });
        if !more {
            // A short batch emptied the queue: no need to ask the kernel again to learn that.
            ready.clear_ready();
        } else {
            // Let relay sockets and the timer have a turn before the next batch.
            tokio::task::yield_now().await;
        }
    }
}

/// A UDP socket registered with the shard's reactor.
type UdpSock = AsyncFd<StdUdpSocket>;

/// Registers a socket with the reactor for readability only. Sends never wait for space (a full
/// buffer drops and counts the datagram), so write interest would only cost: on loopback every
/// datagram sent frees its buffer space at once, and an `EPOLLOUT` edge would wake (or keep
/// awake) the shard's `epoll_wait` once per send for nothing.
///
/// `AsyncFd::with_interest` is deprecated because an arbitrary `AsRawFd` type need not keep its
/// descriptor open; a `std::net::UdpSocket` owns its descriptor until the `AsyncFd` drops it,
/// which is exactly the contract of the (unsafe) replacement, so the deprecated safe form is
/// sound here and keeps this crate free of `unsafe`.
#[allow(deprecated)]
fn register(socket: StdUdpSocket) -> io::Result<UdpSock> {
    AsyncFd::with_interest(socket, tokio::io::Interest::READABLE)
}

/// Reads up to [`IO_LOOP_BOUND`] datagrams from `socket` with `recvmmsg` (batches of
/// [`RECV_BATCH`]) into the core with `handle`, then has the core's outputs flushed (by
/// [`flush_task`], after the other sockets that are ready now). Returns whether
/// the socket may hold more: false when a batch came back short, which means the queue is empty
/// and the caller can clear its readiness without another system call.
fn recv_batch(
    shard: &ShardRef,
    socket: &StdUdpSocket,
    family: Family,
    handle: impl Fn(&mut Server, Instant, SocketAddr, &[u8]),
) -> bool {
    let mut sh = shard.borrow_mut();
    let sh = &mut *sh;
    let now = Instant::now();
    let mut read = 0;
    let more = loop {
        let mut got = [(0usize, None::<SocketAddr>); RECV_BATCH];
        let n = {
            // On the stack: no heap allocation per receive.
            let mut chunks = sh.recv_buf.chunks_exact_mut(RECV_BUFFER);
            let mut slices: [[io::IoSliceMut<'_>; 1]; RECV_BATCH] =
                std::array::from_fn(|_| [io::IoSliceMut::new(chunks.next().unwrap_or_default())]);
            match nix::sys::socket::recvmmsg(
                socket.as_raw_fd(),
                &mut sh.recv_headers[family.index()],
                slices.iter_mut(),
                nix::sys::socket::MsgFlags::MSG_DONTWAIT,
                None,
            ) {
                Ok(results) => {
                    let mut n = 0;
                    for (slot, r) in got.iter_mut().zip(results) {
                        *slot = (r.bytes, r.address.and_then(|a| std_addr(&a)));
                        n += 1;
                    }
                    n
                }
                Err(nix::errno::Errno::EAGAIN) => 0,
                Err(_) => {
                    sh.stats.drops[DriverDrop::RecvError.index()] += 1;
                    0
                }
            }
        };
        for (i, (len, from)) in got.iter().take(n).enumerate() {
            let Some(from) = from else { continue };
            let start = i * RECV_BUFFER;
            handle(&mut sh.core, now, *from, &sh.recv_buf[start..start + len]);
        }
        read += n;
        if n < RECV_BATCH {
            break false;
        }
        if read >= IO_LOOP_BOUND {
            break true;
        }
    };
    // Deferred flush: the flusher runs after every task the same reactor turn woke, so the
    // answers of many relay sockets that became readable together leave the listener in one
    // `sendmmsg` instead of one `sendto` each. Past FLUSH_DEFER datagrams, flush now to bound
    // what the core buffers.
    sh.unflushed += read;
    if sh.unflushed >= FLUSH_DEFER {
        sh.unflushed = 0;
        sh.flush(shard, now);
    } else if read > 0 {
        sh.flusher.notify_one();
    }
    more
}

/// Flushes the core's outputs when a receive deferred it (see [`recv_batch`]).
async fn flush_task(shard: ShardRef, notify: Rc<tokio::sync::Notify>) {
    loop {
        notify.notified().await;
        let mut sh = shard.borrow_mut();
        sh.unflushed = 0;
        sh.flush(&shard, Instant::now());
    }
}

fn std_addr(a: &nix::sys::socket::SockaddrStorage) -> Option<SocketAddr> {
    if let Some(v4) = a.as_sockaddr_in() {
        return Some(SocketAddr::V4(std::net::SocketAddrV4::from(*v4)));
    }
    a.as_sockaddr_in6()
        .map(|v6| SocketAddr::V6(std::net::SocketAddrV6::from(*v6)))
}

/// Feeds frames from this shard's stream connections to the core, in arrival order.
async fn ingress_task(shard: ShardRef, rx: mpsc::Receiver<Ingress>) {
    let me = Rc::clone(&shard);
    drain_queue(shard, rx, move |sh, now, item| match item {
        Ingress::Frame { five, frame } => sh.core.handle_client(now, five, &frame),
        Ingress::Closed { five } => {
            // The answers to the connection's last frames, taken in this same turn, go to its
            // queue before the queue is dropped: a client that half-closes after a request
            // still gets the response.
            sh.flush(&me, now);
            sh.streams.remove(&five);
            sh.core.handle_connection_closed(now, five);
        }
    })
    .await;
}

/// Feeds datagrams other shards hand over (same-server short-circuit across shards).
async fn handoff_task(shard: ShardRef, rx: mpsc::Receiver<Handoff>) {
    drain_queue(shard, rx, |sh, now, h| {
        sh.core.handle_peer_at(now, h.to, h.from, &h.data);
    })
    .await;
}

/// Applies revocations to this shard's core; the flush closes the relay sockets of the
/// allocations it tore down.
async fn revocation_task(shard: ShardRef, rx: mpsc::Receiver<Revocation>) {
    drain_queue(shard, rx, |sh, now, r| {
        sh.core.handle_revocation(now, &r.group, r.until_unix);
    })
    .await;
}

/// Takes items from a queue into the shard with `handle`, at most [`IO_LOOP_BOUND`] per turn,
/// flushing the core's outputs after each turn.
async fn drain_queue<T>(
    shard: ShardRef,
    mut rx: mpsc::Receiver<T>,
    handle: impl Fn(&mut Shard, Instant, T),
) {
    while let Some(first) = rx.recv().await {
        let n = {
            let mut sh = shard.borrow_mut();
            let now = Instant::now();
            let mut next = Some(first);
            let mut n = 0;
            while let Some(item) = next.take() {
                handle(&mut sh, now, item);
                n += 1;
                if n < IO_LOOP_BOUND {
                    next = rx.try_recv().ok();
                }
            }
            sh.flush(&shard, now);
            n
        };
        if n == IO_LOOP_BOUND {
            tokio::task::yield_now().await;
        }
    }
}

async fn relay_task(shard: ShardRef, id: RelayId, socket: Rc<UdpSock>) {
    loop {
        let Ok(mut ready) = socket.readable().await else {
            return;
        };
        let more = recv_batch(
            &shard,
            socket.get_ref(),
            id.family(),
            |core, now, from, data| {
                core.handle_peer(now, id, from, data);
            },
        );
        if !more {
            ready.clear_ready();
        } else {
            tokio::task::yield_now().await;
        }
    }
}

/// The shard's clock and phase. Ends at [`Phase::Stop`] (or when the server is gone); a drain
/// that leaves the shard without allocations is reported on `drained` (once), not an end.
async fn timer_task(
    shard: ShardRef,
    mut phase: watch::Receiver<Phase>,
    (index, drained): (usize, mpsc::Sender<usize>),
) {
    let mut draining = false;
    let mut reported = false;
    loop {
        let deadline = {
            let sh = shard.borrow();
            let tick = tokio::time::Instant::now() + TICK;
            match sh.core.poll_timeout() {
                Some(t) => tick.min(tokio::time::Instant::from_std(t)),
                None => tick,
            }
        };
        tokio::select! {
            _ = tokio::time::sleep_until(deadline) => {}
            changed = phase.changed() => {
                if changed.is_err() {
                    // The server handle is gone: stop as if told to.
                    break;
                }
            }
        }
        let now = Instant::now();
        let current = *phase.borrow();
        let mut sh = shard.borrow_mut();
        sh.core.handle_wall_clock(now, SystemTime::now());
        sh.core.handle_timeout(now);
        match current {
            Phase::Running => {}
            Phase::Draining if !draining => {
                draining = true;
                sh.core.start_draining();
            }
            Phase::Draining => {}
            Phase::Stop => {
                sh.core.close_all();
                sh.flush(&shard, now);
                break;
            }
        }
        sh.flush(&shard, now);
        sh.publish();
        if draining && !reported && sh.core.allocations() == 0 {
            reported = true;
            // Capacity is one per shard and each reports once; a closed receiver means the
            // server is being torn down and a Stop (or a dropped phase) comes anyway.
            let _ = drained.try_send(index);
        }
    }
}

/// Bytes one GSO send may carry: the payload limit of one IPv6 datagram (65 535 less the UDP
/// header), under IPv4's too (65 507) with room to spare, and within `u16` for the segment size.
const GSO_MAX_BYTES: usize = 65_000;

/// Fewest datagrams worth a GSO send: a GSO send is one `sendmsg`, so a run of pairs to
/// different clients (one `sendmmsg` without GSO) would take a system call per pair, and the
/// kernel's software segmentation on loopback costs about what it saves for two or three; from
/// four on, one route lookup and one buffer for the group pay (a video frame's packets to one
/// client). Measured: docs/benchmarks.md, "UDP GSO".
const GSO_MIN: usize = 4;

/// How many of `items` (from the first) one GSO send can carry: the following datagrams go to the
/// same destination and have the first one's size, except a last one that may be shorter (the
/// kernel cuts a GSO datagram into equal segments and a shorter tail), all within
/// [`GSO_MAX_BYTES`], and at least [`GSO_MIN`] of them. 1 means no group: send the first with
/// the others. A run holds at most [`SEND_BATCH`] items,
/// under the kernel's 64 segments.
fn gso_group(items: &[(SocketAddr, usize)], len: impl Fn(usize) -> usize) -> usize {
    let Some(&(to, first)) = items.first() else {
        return 0;
    };
    let segment = len(first);
    let mut total = segment;
    let mut n = 1;
    for &(dest, i) in &items[1..] {
        let l = len(i);
        if dest != to || l > segment || l == 0 || total + l > GSO_MAX_BYTES {
            break;
        }
        total += l;
        n += 1;
        if l < segment {
            break;
        }
    }
    if segment == 0 || n < GSO_MIN {
        1
    } else {
        n
    }
}

/// One `sendmsg` of `payloads` to `to` with UDP GSO: the kernel sends one datagram per
/// `segment` bytes of their concatenation (the last may be shorter), so each payload of
/// `segment` bytes (and a shorter last one) leaves as its own datagram.
fn send_segments(
    fd: RawFd,
    to: SocketAddr,
    payloads: &[io::IoSlice<'_>],
    segment: u16,
) -> nix::Result<usize> {
    use nix::sys::socket::{ControlMessage, MsgFlags, SockaddrStorage};
    nix::sys::socket::sendmsg(
        fd,
        payloads,
        &[ControlMessage::UdpGsoSegments(&segment)],
        MsgFlags::empty(),
        Some(&SockaddrStorage::from(to)),
    )
}

impl Shard {
    fn publish(&mut self) {
        let active = self.core.allocations_by_transport();
        for (i, p) in self.ports.iter().enumerate() {
            self.stats.ports[i] = p.as_ref().map_or(0, |p| p.available() as i64);
        }
        self.publisher
            .publish(&self.metrics, self.core.stats(), active, &self.stats);
    }

    /// Drains the core's outputs. Transmits are collected and sent in order, consecutive
    /// datagrams leaving the same UDP socket in one `sendmmsg` ([`SEND_BATCH`] at most); any
    /// other output first sends what is collected, because binding a relay socket answers the
    /// core at once (which may reuse the buffer the collected payloads live in) and releasing one
    /// closes a socket collected datagrams may still leave from.
    pub(crate) fn flush(&mut self, shard: &ShardRef, now: Instant) {
        while let Some(out) = self.core.poll_output() {
            match out {
                Output::Transmit(t) => self.pending.push(t),
                Output::BindRelay(req) => {
                    self.send_pending();
                    let result = self.bind_relay(shard, req.relay, req.ip, req.even_port);
                    self.core.handle_relay_bound(now, req.relay, result);
                }
                Output::ReleaseRelay(id) => {
                    self.send_pending();
                    self.release(id);
                }
                Output::Event(e) => debug!(event = ?e, "relay event"),
            }
        }
        self.send_pending();
    }

    /// Sends the collected transmits: UDP datagrams in runs per socket (see [`Shard::flush`]);
    /// stream frames to their connection's queue; datagrams for another shard's allocation over
    /// that shard's queue.
    fn send_pending(&mut self) {
        if self.pending.is_empty() {
            return;
        }
        let pending = std::mem::take(&mut self.pending);
        let mut run = SendRun::new();
        for (i, t) in pending.iter().enumerate() {
            let Some((fd, to)) = self.route(t) else {
                continue;
            };
            if run.len == SEND_BATCH || run.fd.is_some_and(|f| f != fd) {
                self.send_run(&mut run, &pending);
            }
            run.fd = Some(fd);
            run.items[run.len] = (to, i);
            run.len += 1;
        }
        self.send_run(&mut run, &pending);
        // Hand the vector back emptied: its capacity is reused, no allocation per flush.
        self.pending = pending;
        self.pending.clear();
    }

    /// Where a transmit leaves: the UDP socket and address for the batched send, or `None` when
    /// it went another way (stream, other shard) or was dropped (and counted).
    fn route(&mut self, t: &Transmit) -> Option<(RawFd, SocketAddr)> {
        match t.dest {
            Dest::Client(five) if five.transport.is_stream() => {
                let payload = self.core.payload(t);
                let drop = match self.streams.get(&five) {
                    Some(egress) => match egress.push(payload) {
                        Ok(()) => return None,
                        Err(why) => why,
                    },
                    None => DriverDrop::SendError,
                };
                self.stats.drops[drop.index()] += 1;
                None
            }
            Dest::Client(five) => {
                let found = self.listeners.iter().find(|l| l.local == five.server);
                if found.is_none() {
                    self.stats.drops[DriverDrop::SendError.index()] += 1;
                }
                found.map(|l| (l.socket.as_raw_fd(), five.client))
            }
            Dest::Peer { relay, peer } => {
                let Some(r) = self
                    .relays
                    .get(relay.index())
                    .and_then(Option::as_ref)
                    .filter(|r| r.id == relay)
                else {
                    self.stats.drops[DriverDrop::SendError.index()] += 1;
                    return None;
                };
                match self.siblings.owner(peer) {
                    // Another shard's allocation: hand it over, no kernel hop.
                    Some(o) if o != self.siblings.index => {
                        let from = SocketAddr::new(
                            self.siblings.relay_ips.get(r.family).unwrap_or(peer.ip()),
                            r.port,
                        );
                        let payload = self.core.payload(t);
                        let buf = &mut self.handoff_buf;
                        if buf.capacity() < payload.len() {
                            // Reclaims the block when every datagram cut from it was consumed,
                            // else starts a new one.
                            buf.reserve(HANDOFF_BLOCK.max(payload.len()));
                        }
                        buf.extend_from_slice(payload);
                        let h = Handoff {
                            to: peer,
                            from,
                            data: buf.split().freeze(),
                        };
                        match self.siblings.queues[o].try_send(h) {
                            Ok(()) => self.stats.handoffs += 1,
                            Err(_) => {
                                self.stats.drops[DriverDrop::HandoffQueueFull.index()] += 1;
                            }
                        }
                        None
                    }
                    _ => Some((r.socket.as_raw_fd(), peer)),
                }
            }
        }
    }

    /// Sends a run of datagrams from one socket, in order: consecutive datagrams to one
    /// destination that GSO can carry (see [`gso_group`]) in one `sendmsg` with `UDP_SEGMENT`,
    /// the rest with [`Shard::send_plain`]. Empties the run.
    fn send_run(&mut self, run: &mut SendRun, pending: &[Transmit]) {
        let Some(fd) = run.fd.take() else {
            return;
        };
        let items = &run.items[..std::mem::take(&mut run.len)];
        let mut next = 0;
        while next < items.len() {
            let group = if self.gso {
                gso_group(&items[next..], |i| self.core.payload(&pending[i]).len())
            } else {
                1
            };
            if group >= GSO_MIN {
                let batch = &items[next..next + group];
                if !self.send_gso(fd, batch, pending) {
                    self.send_plain(fd, batch, pending);
                }
                next += group;
                continue;
            }
            // Up to where the next GSO group starts.
            let mut end = next + 1;
            while end < items.len()
                && !(self.gso
                    && gso_group(&items[end..], |i| self.core.payload(&pending[i]).len())
                        >= GSO_MIN)
            {
                end += 1;
            }
            self.send_plain(fd, &items[next..end], pending);
            next = end;
        }
    }

    /// Sends `items` ([`GSO_MIN`] or more, one destination; see [`gso_group`]) as one GSO datagram the
    /// kernel cuts into one datagram per item. False when the kernel refused GSO itself (the
    /// caller sends them one by one); a full buffer drops them all, as it would one by one.
    fn send_gso(&mut self, fd: RawFd, items: &[(SocketAddr, usize)], pending: &[Transmit]) -> bool {
        let mut iov = [io::IoSlice::new(&[]); SEND_BATCH];
        for (slot, (_, i)) in iov.iter_mut().zip(items) {
            *slot = io::IoSlice::new(self.core.payload(&pending[*i]));
        }
        let Some(&(to, first)) = items.first() else {
            return true;
        };
        // gso_group keeps every size within u16 (GSO_MAX_BYTES).
        let segment = u16::try_from(self.core.payload(&pending[first]).len()).unwrap_or(u16::MAX);
        match send_segments(fd, to, &iov[..items.len()], segment) {
            Ok(_) => true,
            Err(nix::errno::Errno::EAGAIN) => {
                self.stats.drops[DriverDrop::SendWouldBlock.index()] += items.len() as u64;
                true
            }
            Err(e) => {
                // EIO: the route's device cannot checksum GSO segments (nothing on this shard
                // will do better: stop trying). EINVAL/EMSGSIZE: a segment above the path MTU,
                // which one by one the kernel fragments instead.
                if e == nix::errno::Errno::EIO {
                    debug!(error = %e, "UDP GSO refused: sending datagrams one by one");
                    self.gso = false;
                }
                false
            }
        }
    }

    /// Sends datagrams from one socket: one `sendto` for a single datagram, else `sendmmsg`,
    /// resumed after a datagram the kernel refused (that one is counted and dropped, as a failed
    /// `sendto` would be).
    fn send_plain(&mut self, fd: RawFd, items: &[(SocketAddr, usize)], pending: &[Transmit]) {
        use nix::sys::socket::{MsgFlags, SockaddrStorage};
        let mut next = 0;
        while next < items.len() {
            let rest = &items[next..];
            let result = if let [(to, i)] = rest {
                nix::sys::socket::sendto(
                    fd,
                    self.core.payload(&pending[*i]),
                    &SockaddrStorage::from(*to),
                    MsgFlags::empty(),
                )
                .map(|_| 1)
            } else {
                let mut slices = [[io::IoSlice::new(&[])]; SEND_BATCH];
                let mut addrs = [None::<SockaddrStorage>; SEND_BATCH];
                for (k, (to, i)) in rest.iter().enumerate() {
                    slices[k] = [io::IoSlice::new(self.core.payload(&pending[*i]))];
                    addrs[k] = Some(SockaddrStorage::from(*to));
                }
                nix::sys::socket::sendmmsg(
                    fd,
                    &mut self.send_headers,
                    &slices[..rest.len()],
                    &addrs[..rest.len()],
                    [],
                    MsgFlags::empty(),
                )
                .map(Iterator::count)
            };
            match result {
                // sendmmsg never returns 0 for a non-empty batch; guard against a loop anyway.
                Ok(n) => next += n.max(1),
                Err(e) => {
                    let drop = if e == nix::errno::Errno::EAGAIN {
                        DriverDrop::SendWouldBlock
                    } else {
                        DriverDrop::SendError
                    };
                    self.stats.drops[drop.index()] += 1;
                    next += 1;
                }
            }
        }
    }

    fn bind_relay(
        &mut self,
        shard: &ShardRef,
        id: RelayId,
        ip: IpAddr,
        even: bool,
    ) -> Result<SocketAddr, BindError> {
        // A port may still be held by a socket whose task has not been dropped yet, or by
        // another program: try a few before answering 508.
        const BIND_ATTEMPTS: usize = 8;
        let family = Family::of(ip);
        let Some(pool) = self.ports[family.index()].as_mut() else {
            return Err(BindError::PortsExhausted);
        };
        for _ in 0..BIND_ATTEMPTS {
            let port = if even { pool.take_even() } else { pool.take() };
            let Some(port) = port else {
                return Err(BindError::PortsExhausted);
            };
            let bound = StdUdpSocket::bind(SocketAddr::new(ip, port)).and_then(|s| {
                s.set_nonblocking(true)?;
                let addr = s.local_addr()?;
                Ok((register(s)?, addr))
            });
            match bound {
                Ok((socket, addr)) => {
                    let socket = Rc::new(socket);
                    let task = spawn_guarded(
                        &self.panics,
                        "relay",
                        relay_task(Rc::clone(shard), id, Rc::clone(&socket)),
                    );
                    self.siblings.bound.set(family, port, true);
                    let slot = id.index();
                    if self.relays.len() <= slot {
                        self.relays.resize_with(slot + 1, || None);
                    }
                    let old = self.relays[slot].replace(Relay {
                        id,
                        family,
                        port,
                        socket,
                        task,
                    });
                    if let Some(old) = old {
                        // The core releases a slot's relay before binding the next one there;
                        // should it not, the old socket must still not outlive its entry.
                        warn!("a relay socket was still held where a new one was bound");
                        self.free_relay(old);
                    }
                    return Ok(addr);
                }
                Err(e) if e.kind() == io::ErrorKind::AddrInUse => {
                    // Someone else has it; back of the queue, try the next.
                    pool.put(port);
                }
                Err(e) => {
                    pool.put(port);
                    warn!(error = %e, "binding a relay socket failed");
                    return Err(BindError::System);
                }
            }
        }
        Err(BindError::PortsExhausted)
    }

    fn release(&mut self, id: RelayId) {
        let Some(slot) = self.relays.get_mut(id.index()) else {
            return;
        };
        if slot.as_ref().is_none_or(|r| r.id != id) {
            return;
        }
        if let Some(r) = slot.take() {
            self.free_relay(r);
        }
    }

    /// Stops a relay socket's task (which holds the socket) and gives its port back.
    fn free_relay(&mut self, r: Relay) {
        r.task.abort();
        self.siblings.bound.set(r.family, r.port, false);
        if let Some(pool) = self.ports[r.family.index()].as_mut() {
            pool.put(r.port);
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn a_panicking_task_is_recorded_and_wakes_the_shard() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let local = tokio::task::LocalSet::new();
        local.block_on(&rt, async {
            let panics = Rc::new(TaskPanics::default());
            let fine = spawn_guarded(&panics, "flush", async {});
            assert!(fine.await.is_ok());
            assert_eq!(panics.what.get(), None, "a task that ends is no failure");
            let _bad = spawn_guarded(&panics, "listener", async {
                // A bug: indexing past what the task assumed was there.
                let slots: Vec<u8> = std::hint::black_box(Vec::new());
                #[allow(clippy::indexing_slicing)]
                let _ = slots[0];
            });
            // The shard's main future waits on this, and then fails the shard.
            panics.notify.notified().await;
            assert_eq!(panics.what.get(), Some("listener"));
        });
    }

    fn addr(port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    /// Items to `dests[k]` of `lens[k]` bytes; the index is the position.
    fn group(dests: &[u16], lens: &[usize]) -> usize {
        let items: Vec<(SocketAddr, usize)> = dests.iter().map(|&d| addr(d)).zip(0..).collect();
        gso_group(&items, |i| lens[i])
    }

    #[test]
    fn gso_groups_equal_datagrams_to_one_destination_with_a_shorter_tail() {
        assert_eq!(group(&[1, 1, 1, 1, 1], &[100, 100, 100, 100, 100]), 5);
        // A shorter one ends the group, included.
        assert_eq!(
            group(&[1, 1, 1, 1, 1, 1], &[100, 100, 100, 40, 100, 100]),
            4
        );
        // Another destination ends it, excluded.
        assert_eq!(group(&[1, 1, 1, 1, 2, 1], &[100; 6]), 4);
        // A longer one ends it, excluded.
        assert_eq!(group(&[1, 1, 1, 1, 1], &[100, 100, 100, 100, 101]), 4);
    }

    #[test]
    fn no_gso_group_below_the_minimum_or_for_empty_datagrams() {
        assert_eq!(group(&[1, 1, 1], &[100; 3]), 1);
        assert_eq!(group(&[1, 1, 1, 2, 2, 2, 2], &[100; 7]), 1);
        assert_eq!(group(&[1, 1, 1, 1, 1], &[100, 100, 40, 100, 100]), 1);
        assert_eq!(group(&[1, 1, 1, 1], &[0; 4]), 1);
        assert_eq!(group(&[], &[]), 0);
    }

    #[test]
    fn a_gso_group_stays_within_one_ip_datagram() {
        // 40 × 1 600 bytes = 64 000: all; 41 would pass GSO_MAX_BYTES.
        let dests = [1; 48];
        assert_eq!(group(&dests, &[1_600; 48]), 40);
        const { assert!(40 * 1_600 <= GSO_MAX_BYTES && 41 * 1_600 > GSO_MAX_BYTES) };
    }

    #[test]
    fn gso_send_arrives_as_one_datagram_per_payload() {
        let rx = StdUdpSocket::bind("127.0.0.1:0").unwrap();
        let tx = StdUdpSocket::bind("127.0.0.1:0").unwrap();
        rx.set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .unwrap();
        let payloads: Vec<Vec<u8>> = (0..6u8)
            .map(|k| vec![k; if k == 5 { 37 } else { 1_200 }])
            .collect();
        let iov: Vec<io::IoSlice<'_>> = payloads.iter().map(|p| io::IoSlice::new(p)).collect();
        let to = rx.local_addr().unwrap();
        // Linux has had UDP GSO since 4.18; the shard falls back to one datagram each without.
        let sent = send_segments(tx.as_raw_fd(), to, &iov, 1_200).expect("a GSO send");
        assert_eq!(sent, 5 * 1_200 + 37);
        let mut buf = [0u8; 2_048];
        for p in &payloads {
            let (n, from) = rx.recv_from(&mut buf).unwrap();
            assert_eq!(from, tx.local_addr().unwrap());
            assert_eq!(&buf[..n], &p[..]);
        }
    }
}
