//! The data phase: a few worker threads, each owning a share of the allocations' sockets (and, in
//! client-to-peer mode, one echo peer socket), driven by a `mio` event loop.
//!
//! Sending is paced by a token bucket per worker, refilled from the elapsed time every loop
//! turn (about every millisecond): the tokens due are spread round-robin over the worker's
//! sockets and each socket's share goes out in one `sendmmsg`. Receiving drains each readable
//! socket with `recvmmsg`, [`BATCH`] datagrams per call; the echo peer answers a whole batch with
//! one `sendmmsg`. The only shared state is a handful of atomics: the controller's commands and
//! per-step counters the workers add to once per loop turn.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use mio::net::UdpSocket;
use mio::{Events, Interest, Poll, Token};
use relay_proto::stun::{self, attr, method, Class, Message};

use crate::batch::{timestamp_arrivals, RecvBatch, SendBatch, BATCH};
use crate::packet::{now_ns, Arrival, FlowRx, Header};
use crate::Pacing;

/// At most this many steps (rates) in one run.
pub(crate) const MAX_STEPS: usize = 64;

const STOP: u64 = 1 << 63;
const SENDING: u64 = 1 << 62;

/// What the controller tells the workers, and what they count for it.
#[derive(Debug)]
pub(crate) struct Shared {
    /// `STOP` | `SENDING` | step index.
    control: AtomicU64,
    /// Target rate of the whole run, packets per second.
    rate: AtomicU64,
    /// Packets sent, per step.
    pub(crate) sent: [AtomicU64; MAX_STEPS],
    /// Unique test packets received, per step of their sending.
    pub(crate) received: [AtomicU64; MAX_STEPS],
}

impl Shared {
    pub(crate) fn new() -> Self {
        Self {
            control: AtomicU64::new(0),
            rate: AtomicU64::new(0),
            sent: std::array::from_fn(|_| AtomicU64::new(0)),
            received: std::array::from_fn(|_| AtomicU64::new(0)),
        }
    }

    /// Starts sending step `step` at `rate` packets per second (whole run).
    pub(crate) fn start_step(&self, step: usize, rate: u64) {
        self.rate.store(rate, Ordering::Relaxed);
        self.control.store(SENDING | step as u64, Ordering::Release);
    }

    /// Stops sending; receiving goes on.
    pub(crate) fn pause(&self) {
        let c = self.control.load(Ordering::Relaxed);
        self.control.store(c & !SENDING, Ordering::Release);
    }

    /// Ends the workers' loops.
    pub(crate) fn stop(&self) {
        self.control.fetch_or(STOP, Ordering::Release);
    }

    pub(crate) fn totals(&self) -> (u64, u64) {
        let sum = |a: &[AtomicU64]| a.iter().map(|c| c.load(Ordering::Relaxed)).sum();
        (sum(&self.sent), sum(&self.received))
    }
}

/// How one allocation's socket is used.
#[derive(Debug)]
pub(crate) struct SockPlan {
    /// Connected to the server.
    pub(crate) sock: std::net::UdpSocket,
    /// The flow this socket sends (its allocation's index).
    pub(crate) flow: u32,
    /// The flow this socket receives.
    pub(crate) rx_flow: u32,
    /// One complete frame (ChannelData or Send indication) with a zeroed payload.
    pub(crate) template: Vec<u8>,
    /// Where the application data starts in the frame.
    pub(crate) payload_at: usize,
    /// Whether frames are STUN Send indications that get a transaction id each (IPv4 peers: an
    /// IPv6 XOR-PEER-ADDRESS is XORed with the id, so those keep the template's).
    pub(crate) patch_tid: bool,
    /// Raw-to-peer: datagrams are the bare test packet, no TURN framing.
    pub(crate) raw: bool,
}

/// What a worker hands back when it stops.
#[derive(Debug)]
pub(crate) struct WorkerResult {
    /// Latency histograms (ns), per step.
    pub(crate) latency: Vec<Histogram<u64>>,
    /// The sockets, in plan order (to release the allocations).
    pub(crate) socks: Vec<(u32, std::net::UdpSocket)>,
    /// Per socket: what it sent of its flow and received of the flow it receives.
    pub(crate) flows: Vec<FlowCount>,
    pub(crate) counters: Counters,
}

/// One socket's totals.
#[derive(Debug, Clone, Copy)]
pub(crate) struct FlowCount {
    pub(crate) flow: u32,
    pub(crate) sent: u64,
    pub(crate) rx_flow: u32,
    pub(crate) received: u64,
}

/// Things that should stay at zero, and say why when they do not.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct Counters {
    pub(crate) duplicates: u64,
    pub(crate) too_late: u64,
    /// Datagrams on a client socket that were not a test packet of the expected flow.
    pub(crate) foreign: u64,
    /// Packets the kernel refused to take (full socket buffer) or errors on send.
    pub(crate) send_errors: u64,
    pub(crate) recv_errors: u64,
    pub(crate) echoed: u64,
}

impl Counters {
    pub(crate) fn add(&mut self, o: &Counters) {
        self.duplicates += o.duplicates;
        self.too_late += o.too_late;
        self.foreign += o.foreign;
        self.send_errors += o.send_errors;
        self.recv_errors += o.recv_errors;
        self.echoed += o.echoed;
    }
}

struct ClientSock {
    sock: UdpSocket,
    plan_flow: u32,
    rx_flow: u32,
    next_seq: u64,
    template: Vec<u8>,
    payload_at: usize,
    patch_tid: bool,
    raw: bool,
    rx: FlowRx,
}

pub(crate) fn new_histogram() -> Histogram<u64> {
    // 1 ns .. 60 s, 3 significant digits.
    Histogram::new_with_bounds(1, 60_000_000_000, 3).expect("constant histogram bounds are valid")
}

/// Per-step counts gathered during one loop turn, added to [`Shared`] at its end.
struct Pending {
    sent: [u64; MAX_STEPS],
    received: [u64; MAX_STEPS],
    dirty: bool,
}

pub(crate) struct Worker {
    socks: Vec<ClientSock>,
    echo: Option<UdpSocket>,
    shared: Arc<Shared>,
    /// This worker's share of the whole run's rate.
    share: f64,
    /// Packets a socket sends back to back each time its turn comes.
    burst: usize,
    pacing: Pacing,
    latency: Vec<Histogram<u64>>,
    counters: Counters,
    pending: Pending,
    frame_len: usize,
}

const ECHO: Token = Token(usize::MAX - 1);

impl Worker {
    /// Builds a worker from plans; `share` is the fraction of the run's rate it sends.
    pub(crate) fn new(
        plans: Vec<SockPlan>,
        echo: Option<std::net::UdpSocket>,
        shared: Arc<Shared>,
        share: f64,
        burst: usize,
        pacing: Pacing,
    ) -> Self {
        let frame_len = plans.first().map_or(0, |p| p.template.len());
        let socks = plans
            .into_iter()
            .map(|p| ClientSock {
                sock: UdpSocket::from_std(p.sock),
                plan_flow: p.flow,
                rx_flow: p.rx_flow,
                next_seq: 0,
                template: p.template,
                payload_at: p.payload_at,
                patch_tid: p.patch_tid,
                raw: p.raw,
                rx: FlowRx::default(),
            })
            .collect();
        Self {
            socks,
            echo: echo.map(UdpSocket::from_std),
            shared,
            share,
            burst: burst.max(1),
            pacing,
            latency: Vec::new(),
            counters: Counters::default(),
            pending: Pending {
                sent: [0; MAX_STEPS],
                received: [0; MAX_STEPS],
                dirty: false,
            },
            frame_len,
        }
    }

    /// Runs until the controller says stop.
    pub(crate) fn run(mut self) -> io::Result<WorkerResult> {
        let mut poll = Poll::new()?;
        let mut events = Events::with_capacity(1024);
        for (i, s) in self.socks.iter_mut().enumerate() {
            timestamp_arrivals(&s.sock)?;
            poll.registry()
                .register(&mut s.sock, Token(i), Interest::READABLE)?;
        }
        if let Some(e) = self.echo.as_mut() {
            timestamp_arrivals(e)?;
            poll.registry().register(e, ECHO, Interest::READABLE)?;
        }
        let buf_size = (self.frame_len + 256).max(2048);
        let mut rx = RecvBatch::new(buf_size);
        let mut tx = SendBatch::new();
        let mut arena = vec![0u8; self.frame_len.max(1) * BATCH];

        let tick = match self.pacing {
            Pacing::Smooth => Duration::from_millis(1),
            Pacing::Tick(t) => t,
        };
        // A late turn may catch up at most this much sending: more would be one burst that
        // measures the generator, not the relay.
        let catch_up = (2 * tick).max(Duration::from_millis(20)).as_secs_f64();
        let mut tokens = 0.0f64;
        let mut last_refill = Instant::now();
        let mut next_turn = last_refill;
        let mut was: u64 = 0;
        let mut cursor = 0usize;
        loop {
            let control = self.shared.control.load(Ordering::Acquire);
            if control & STOP != 0 {
                break;
            }
            let sending = control & SENDING != 0;
            let now = Instant::now();
            if control != was {
                // A new step (or the first): start from an empty bucket, sending at once.
                tokens = 0.0;
                last_refill = now;
                next_turn = now;
            }
            let turn = match self.pacing {
                Pacing::Smooth => true,
                Pacing::Tick(_) => now >= next_turn,
            };
            if sending && turn && !self.socks.is_empty() {
                if let Pacing::Tick(t) = self.pacing {
                    // The next turn one tick later; after a stall, a tick from now.
                    next_turn = (next_turn + t).max(now);
                }
                let rate = self.shared.rate.load(Ordering::Relaxed) as f64 * self.share;
                tokens += rate * now.duration_since(last_refill).as_secs_f64();
                last_refill = now;
                let burst = self.burst as f64;
                tokens = tokens.min((rate * catch_up).max(burst));
                // Whole bursts only; the rest waits for the next turn.
                let bursts = (tokens / burst) as u64;
                tokens -= bursts as f64 * burst;
                let step = (control & 0xFFFF_FFFF) as usize;
                self.send_due(bursts, step, &mut cursor, &mut tx, &mut arena);
            }
            was = control;
            let timeout = if sending {
                match self.pacing {
                    Pacing::Smooth => tick,
                    Pacing::Tick(_) => next_turn.saturating_duration_since(Instant::now()),
                }
            } else {
                Duration::from_millis(5)
            };
            match poll.poll(&mut events, Some(timeout)) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
            for ev in events.iter() {
                match ev.token() {
                    ECHO => self.drain_echo(&mut rx, &mut tx),
                    Token(i) => self.drain_client(i, &mut rx),
                }
            }
            self.flush();
        }
        self.flush();
        let mut socks = Vec::with_capacity(self.socks.len());
        let mut flows = Vec::with_capacity(self.socks.len());
        for mut s in self.socks {
            let _ = poll.registry().deregister(&mut s.sock);
            self.counters.duplicates += s.rx.duplicates;
            self.counters.too_late += s.rx.too_late;
            flows.push(FlowCount {
                flow: s.plan_flow,
                sent: s.next_seq,
                rx_flow: s.rx_flow,
                received: s.rx.received,
            });
            socks.push((s.plan_flow, std::net::UdpSocket::from(s.sock)));
        }
        Ok(WorkerResult {
            latency: self.latency,
            socks,
            flows,
            counters: self.counters,
        })
    }

    /// Sends `due` bursts of [`Worker::burst`] packets, spread round-robin over the sockets from
    /// `cursor`: each socket's share of a turn is one `sendmmsg` (per [`BATCH`] packets).
    fn send_due(
        &mut self,
        due: u64,
        step: usize,
        cursor: &mut usize,
        tx: &mut SendBatch,
        arena: &mut [u8],
    ) {
        let n = self.socks.len();
        if due == 0 || n == 0 {
            return;
        }
        let base = (due / n as u64) as usize;
        let extra = (due % n as u64) as usize;
        let start = *cursor;
        *cursor = (start + extra) % n;
        // With fewer packets than sockets only `extra` sockets send: visit just those.
        let visit = if base == 0 { extra } else { n };
        for j in 0..visit {
            let i = (start + j) % n;
            let mut k = (base + usize::from(j < extra)) * self.burst;
            while k > 0 {
                let burst = k.min(BATCH);
                let sent = self.send_burst(i, burst, step, tx, arena);
                k -= burst;
                if sent < burst {
                    self.counters.send_errors += (burst - sent + k) as u64;
                    break;
                }
            }
        }
    }

    /// Builds `count` frames for socket `i` in `arena` and sends them in one system call.
    fn send_burst(
        &mut self,
        i: usize,
        count: usize,
        step: usize,
        tx: &mut SendBatch,
        arena: &mut [u8],
    ) -> usize {
        let len = self.frame_len;
        let s = &mut self.socks[i];
        let sent_ns = now_ns();
        for (j, frame) in arena.chunks_exact_mut(len).take(count).enumerate() {
            frame.copy_from_slice(&s.template);
            let seq = s.next_seq + j as u64;
            if s.patch_tid {
                // A fresh transaction id per indication: flow and sequence number.
                frame[8..12].copy_from_slice(&s.plan_flow.to_be_bytes());
                frame[12..20].copy_from_slice(&seq.to_be_bytes());
            }
            Header {
                flow: s.plan_flow,
                seq,
                sent_ns,
                step: step as u32,
            }
            .encode(&mut frame[s.payload_at..]);
        }
        let sent = match tx.send_connected(&s.sock, &arena[..len * count], len) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => 0,
            // ICMP errors (the server went away) surface here on a connected socket.
            Err(_) => 0,
        };
        s.next_seq += sent as u64;
        self.pending.sent[step] += sent as u64;
        self.pending.dirty = true;
        sent
    }

    fn drain_client(&mut self, i: usize, rx: &mut RecvBatch) {
        let mut errors = 0;
        loop {
            let n = match rx.recv(&self.socks[i].sock) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(_) => {
                    // A pending socket error (e.g. ICMP unreachable) is consumed by the call.
                    self.counters.recv_errors += 1;
                    errors += 1;
                    if errors > 8 {
                        return;
                    }
                    continue;
                }
            };
            // The kernel's arrival time, so the generator's own delay in reading is not counted
            // as the relay's; the time now only if the kernel gave none.
            let now = now_ns();
            for d in 0..n {
                let at = rx.arrived_ns(d).unwrap_or(now);
                self.on_datagram(i, rx.datagram(d), at);
            }
            if n < BATCH {
                return;
            }
        }
    }

    fn on_datagram(&mut self, i: usize, dgram: &[u8], arrived: u64) {
        let s = &mut self.socks[i];
        let data = if s.raw { Some(dgram) } else { app_data(dgram) };
        let Some(h) = data.and_then(Header::decode) else {
            self.counters.foreign += 1;
            return;
        };
        if h.flow != s.rx_flow || h.step as usize >= MAX_STEPS {
            self.counters.foreign += 1;
            return;
        }
        if s.rx.record(h.seq) != Arrival::New {
            return;
        }
        let step = h.step as usize;
        self.pending.received[step] += 1;
        self.pending.dirty = true;
        while self.latency.len() <= step {
            self.latency.push(new_histogram());
        }
        self.latency[step].saturating_record(arrived.saturating_sub(h.sent_ns).max(1));
    }

    fn drain_echo(&mut self, rx: &mut RecvBatch, tx: &mut SendBatch) {
        let Some(sock) = self.echo.as_ref() else {
            return;
        };
        let mut errors = 0;
        loop {
            let n = match rx.recv(sock) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(_) => {
                    self.counters.recv_errors += 1;
                    errors += 1;
                    if errors > 8 {
                        return;
                    }
                    continue;
                }
            };
            match rx.echo(sock, tx, now_ns()) {
                Ok(sent) => {
                    self.counters.echoed += sent as u64;
                    self.counters.send_errors += (n - sent) as u64;
                }
                Err(_) => self.counters.send_errors += n as u64,
            }
            if n < BATCH {
                return;
            }
        }
    }

    /// Adds this turn's counts to the shared counters.
    fn flush(&mut self) {
        if !self.pending.dirty {
            return;
        }
        for (k, (s, r)) in self
            .pending
            .sent
            .iter_mut()
            .zip(self.pending.received.iter_mut())
            .enumerate()
        {
            if *s > 0 {
                self.shared.sent[k].fetch_add(*s, Ordering::Relaxed);
                *s = 0;
            }
            if *r > 0 {
                self.shared.received[k].fetch_add(*r, Ordering::Relaxed);
                *r = 0;
            }
        }
        self.pending.dirty = false;
    }
}

/// The application data of a datagram from the server: ChannelData, or a Data indication's DATA.
pub(crate) fn app_data(dgram: &[u8]) -> Option<&[u8]> {
    match dgram.first()? {
        0x40..=0x7F => stun::parse_channel_data(dgram).map(|(_, d)| d),
        0x00..=0x03 => {
            let m = Message::parse(dgram).ok()?;
            if m.method() != method::DATA || m.class() != Class::Indication {
                return None;
            }
            m.attributes()
                .find(|(t, _, _)| *t == attr::DATA)
                .map(|(_, v, _)| v)
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use relay_proto::stun::Encoder;
    use std::net::SocketAddr;

    #[test]
    fn app_data_of_channel_data_and_data_indications() {
        assert_eq!(app_data(&[0x40, 0, 0, 2, 7, 8]), Some(&[7u8, 8][..]));
        // Padding to four bytes, as servers may add it on UDP too.
        assert_eq!(app_data(&[0x40, 0, 0, 2, 7, 8, 0, 0]), Some(&[7u8, 8][..]));
        let mut buf = Vec::new();
        let mut e = Encoder::new(&mut buf, method::DATA, Class::Indication, [1; 12]);
        e.xor_address(
            attr::XOR_PEER_ADDRESS,
            SocketAddr::from(([127, 0, 0, 1], 5000)),
        )
        .attr(attr::DATA, b"hello");
        e.finish();
        assert_eq!(app_data(&buf), Some(&b"hello"[..]));
        // A success response is not data; neither is garbage.
        let mut resp = Vec::new();
        Encoder::new(&mut resp, method::ALLOCATE, Class::Success, [2; 12]).finish();
        assert_eq!(app_data(&resp), None);
        assert_eq!(app_data(&[0xFF, 1, 2]), None);
        assert_eq!(app_data(&[]), None);
    }
}
