//! `turnpike-load`: a TURN load generator that works against any TURN server over UDP (Turnpike,
//! coturn, …). It makes N allocations, sends test packets through them at a fixed rate or steps
//! the rate up to find the highest one without loss, and reports sent, received, lost,
//! packets per second and the latency the relay adds (p50/p99/p99.9), as a human summary and as
//! one line of JSON.
//!
//! # Why a crate of its own
//!
//! It is a *client-side* tool. Putting it in the server crates would pull a client into the relay
//! binary, and putting the server into it would make a load generator that can only measure
//! itself. It shares exactly two things with Turnpike, both from `relay-proto`: the STUN codec
//! ([`relay_proto::stun`]: `Encoder`, `Message`, `decode_xor_address`, `parse_channel_data`) and
//! the credential functions ([`relay_proto::rest_credentials`],
//! [`relay_proto::auth::long_term_key`]), so it mints REST credentials exactly as the relay checks
//! them. It depends on neither `relay-server` nor `conf` (its tests do, to start a relay
//! in-process).
//!
//! # How a run goes
//!
//! 1. **Setup (not timed as traffic).** One UDP socket per allocation, connected to the server.
//!    Allocate, answer the 401 challenge (REST username `expiry:prefix-i` from `--secret`, or a
//!    static user and password; realm from the 401 unless given), read XOR-RELAYED-ADDRESS; a
//!    438 is retried once with the fresh nonce. Then CreatePermission and ChannelBind (channel
//!    0x4000, inside both coturn's 0x4000–0x7FFF and the RFC's 0x4000–0x4FFF) towards the peer:
//!    in *client-to-client* mode allocations are paired (0↔1, 2↔3, …, like coturn's
//!    `turnutils_uclient -y`) and each binds to the other's relayed address; in *client-to-peer*
//!    mode each binds to an echo peer this process runs on its own sockets. Requests run
//!    concurrently (async, on a current-thread tokio runtime) with retransmissions. Setup time and
//!    allocations per second are reported.
//! 2. **Traffic.** A few worker threads (one per core by default) each own a share of the sockets
//!    and drive them with a `mio` event loop. A token bucket per worker, refilled about every
//!    millisecond, paces the rate (`--burst N` makes each allocation send N packets back to back,
//!    like a video frame; `--tick T` sends only every T, everything due at once, like coturn's
//!    test client, which sends 4 messages per client back to back every few milliseconds:
//!    `--tick 4ms --burst 4`); each socket's share of a turn goes out in one `sendmmsg`, and
//!    readable sockets are drained with `recvmmsg`, so the generator spends one system call per
//!    batch, not per packet ([`Config::threads`] sets the number of workers). Every packet's
//!    data starts with a [`packet::Header`]: flow, sequence number, send time (the wall clock,
//!    the clock of the kernel's receive timestamps), and the step of the run; it is padded to
//!    `--size`.
//! 3. **Measuring.** The receiver of a flow counts unique sequence numbers in a sliding window
//!    ([`packet::FlowRx`]): reordering is not loss, duplicates are not received twice. Latency is the
//!    time the relay adds: the kernel's arrival time at the receiving socket (`SO_TIMESTAMPNS`,
//!    so not the time the generator got round to reading it) minus the send time: one crossing
//!    of the relay through two allocations in client-to-client mode; in client-to-peer mode a
//!    round trip through the echo peer, less the time the echo peer held the packet (it moves
//!    the packet's send time forward by that, [`packet::Header::hold`]), so both passes through
//!    the relay and nothing of the generator's own wake-ups and queueing. After the
//!    sending stops, the run waits a drain window; whatever has not arrived by then is lost.
//!    Only packets the kernel accepted count as sent. A flow that lost every packet is reported
//!    as *silent*: a broken path (permission, routing), not congestion.
//!    Latencies go into HDR histograms (nanoseconds, 3 significant digits) per worker and step,
//!    merged at the end.
//! 4. **Find the maximum.** With [`Rate::FindMax`] the rate starts low and grows by a factor per
//!    step (pausing for the drain window between steps so each step is judged on its own
//!    packets) until a step loses ≥ 0.1 %; a few bisection steps between the last good and the
//!    first bad rate refine the answer. A step in which the generator itself could not send 90 %
//!    of its target ends the search too, and says so (`"limit": "generator"`).
//! 5. **Release.** Every allocation is released with a Refresh of lifetime 0 (best effort).
//!
//! Permissions last 300 s and are not refreshed, so a run sends for at most
//! [`MAX_RUN`]: a load test, not a soak test.

mod batch;
pub mod packet;
mod setup;
mod worker;

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::num::NonZeroUsize;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use relay_proto::stun::{self, attr, method, Class, Encoder, Message};
use serde::Serialize;

use crate::setup::{Conn, Session};
use crate::worker::{Counters, Shared, SockPlan, Worker, WorkerResult, MAX_STEPS};

/// The longest a run may send: permissions (300 s) are not refreshed.
pub const MAX_RUN: Duration = Duration::from_secs(280);
/// Largest `--size`.
pub const MAX_SIZE: usize = 8192;
/// A find-max step with at least this much loss (percent) is a failure.
pub const LOSS_THRESHOLD_PCT: f64 = 0.1;

/// How allocations authenticate.
#[derive(Clone, PartialEq, Eq)]
pub enum Auth {
    /// TURN REST credentials (coturn's `--use-auth-secret`): username `expiry:prefix-i`.
    Secret(String),
    /// The same static long-term user and password for every allocation.
    Static {
        /// USERNAME.
        user: String,
        /// Password.
        password: String,
    },
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Auth::Secret(_) => f.write_str("Secret(<redacted>)"),
            Auth::Static { user, .. } => write!(f, "Static {{ user: {user:?}, .. }}"),
        }
    }
}

/// Where the traffic goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// Allocations in pairs, each relaying to the other's relayed address.
    ClientToClient,
    /// Every allocation relays to an echo peer run by this process, which sends it back.
    ClientToPeer,
    /// No TURN at all: each "allocation" socket sends bare test packets to the server, a plain
    /// UDP forwarder (`turnpike-forward`) that passes them to the echo peer this process runs at
    /// [`Config::echo`] and passes the answers back: the baseline of client-to-peer.
    RawToPeer,
}

impl Mode {
    /// The name used on the command line and in the JSON summary.
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::ClientToClient => "client-to-client",
            Mode::ClientToPeer => "client-to-peer",
            Mode::RawToPeer => "raw-to-peer",
        }
    }
}

/// How data travels between client and server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Framing {
    /// ChannelData (after ChannelBind): 4 bytes of overhead.
    Channels,
    /// Send and Data indications (after CreatePermission): 36 or more bytes of overhead.
    SendIndications,
}

impl Framing {
    /// The name used in the JSON summary.
    pub fn as_str(self) -> &'static str {
        match self {
            Framing::Channels => "channels",
            Framing::SendIndications => "send-indications",
        }
    }
}

/// The rate of a run.
#[derive(Debug, Clone, PartialEq)]
pub enum Rate {
    /// This many packets per second, all allocations together.
    Fixed(u64),
    /// Step the rate up until packets are lost.
    FindMax(FindMax),
}

/// How find-max steps.
#[derive(Debug, Clone, PartialEq)]
pub struct FindMax {
    /// Rate of the first step (packets per second, whole run).
    pub start: u64,
    /// Each step's rate is the previous one times this.
    pub factor: f64,
    /// How long each step sends.
    pub step_duration: Duration,
    /// At most this many steps (at most 64).
    pub max_steps: usize,
    /// Bisection steps between the last good and the first bad rate.
    pub refine: u32,
}

impl Default for FindMax {
    fn default() -> Self {
        Self {
            start: 1000,
            factor: 1.5,
            step_duration: Duration::from_secs(3),
            max_steps: 40,
            refine: 2,
        }
    }
}

/// Everything a run needs. [`Config::new`] gives the defaults of the command line.
#[derive(Debug, Clone)]
pub struct Config {
    /// The TURN server (UDP).
    pub server: SocketAddr,
    /// Credentials.
    pub auth: Auth,
    /// Realm to sign with; `None` takes the one of the server's 401.
    pub realm: Option<String>,
    /// Number of allocations (even in client-to-client mode).
    pub allocations: usize,
    /// Client-to-client or client-to-peer.
    pub mode: Mode,
    /// ChannelData or Send/Data indications.
    pub framing: Framing,
    /// Bytes of application data per packet (≥ [`packet::HEADER_LEN`]).
    pub size: usize,
    /// Fixed rate or find-max.
    pub rate: Rate,
    /// Fixed rate: how long to send. Find-max: the most sending time over all steps.
    pub duration: Duration,
    /// Packets each allocation sends back to back when its turn comes (1: evenly spaced).
    /// Larger bursts look like video frames and let the generator batch more per system call.
    pub burst: usize,
    /// When packets go out: as evenly as the loop allows, or everything due once per tick.
    pub pacing: Pacing,
    /// REST usernames are `expiry:PREFIX-i`.
    pub user_prefix: String,
    /// Worker threads; `None` picks one per core. At most one per allocation either way.
    pub threads: Option<NonZeroUsize>,
    /// Progress events this often (more than zero); `None` for none.
    pub progress_interval: Option<Duration>,
    /// How long to keep receiving after sending stops (and between find-max steps).
    pub drain: Duration,
    /// Setup requests in flight at once.
    pub setup_concurrency: usize,
    /// First retransmission timeout of a setup request (doubles each try).
    pub rto: Duration,
    /// Tries per setup request.
    pub tries: u32,
    /// Raw-to-peer only (and required there): the address the echo peer binds, which the
    /// forwarder under test sends to.
    pub echo: Option<SocketAddr>,
}

/// When a worker sends what its token bucket holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pacing {
    /// On every loop turn: about every millisecond, sooner when packets arrive. The most even
    /// spacing the generator can give.
    Smooth,
    /// Once per tick, everything due at once (back to back over the allocations): the shape of
    /// coturn's `turnutils_uclient` (with a burst of 4), and of many senders whose timers fire
    /// together.
    Tick(Duration),
}

/// Shortest `--tick`: the loop's own turn.
pub const MIN_TICK: Duration = Duration::from_millis(1);
/// Longest `--tick`: beyond it a "rate" is mostly a burst size.
pub const MAX_TICK: Duration = Duration::from_millis(100);

impl Config {
    /// The command line's defaults: 100 allocations client-to-client, 200 bytes, 10 000 packets
    /// per second for 10 s, ChannelData.
    pub fn new(server: SocketAddr, auth: Auth) -> Self {
        Self {
            server,
            auth,
            realm: None,
            allocations: 100,
            mode: Mode::ClientToClient,
            framing: Framing::Channels,
            size: 200,
            rate: Rate::Fixed(10_000),
            duration: Duration::from_secs(10),
            burst: 1,
            pacing: Pacing::Smooth,
            user_prefix: "load".into(),
            threads: None,
            progress_interval: Some(Duration::from_secs(1)),
            drain: Duration::from_secs(1),
            setup_concurrency: 64,
            rto: Duration::from_millis(250),
            tries: 5,
            echo: None,
        }
    }

    fn check(&self) -> Result<(), LoadError> {
        let bad = |m: String| Err(LoadError::Config(m));
        if self.allocations == 0 {
            return bad("--allocations must be at least 1".into());
        }
        if self.mode == Mode::ClientToClient && self.allocations % 2 != 0 {
            return bad(format!(
                "client-to-client pairs allocations: --allocations must be even, not {}",
                self.allocations
            ));
        }
        if (self.mode == Mode::RawToPeer) != self.echo.is_some() {
            return bad(
                "an echo address (--echo) is required in raw-to-peer mode and only there".into(),
            );
        }
        if self.allocations > u32::MAX as usize / 2 {
            return bad("too many allocations".into());
        }
        if self.size < packet::HEADER_LEN || self.size > MAX_SIZE {
            return bad(format!(
                "--size must be {}..={MAX_SIZE} bytes (the test header takes {}), not {}",
                packet::HEADER_LEN,
                packet::HEADER_LEN,
                self.size
            ));
        }
        if self.duration.is_zero() || self.duration > MAX_RUN {
            return bad(format!(
                "--duration must be more than 0 and at most {} (permissions are not refreshed)",
                humantime::format_duration(MAX_RUN)
            ));
        }
        match &self.rate {
            Rate::Fixed(0) => return bad("--rate must be at least 1 packet per second".into()),
            Rate::Fixed(_) => {}
            Rate::FindMax(f) => {
                if f.start == 0 || f.factor.is_nan() || f.factor <= 1.0 || f.step_duration.is_zero()
                {
                    return bad(
                        "find-max needs a start rate ≥ 1, a step factor > 1 and a step duration"
                            .into(),
                    );
                }
                if f.max_steps == 0 || f.max_steps > MAX_STEPS {
                    return bad(format!("find-max takes 1..={MAX_STEPS} steps"));
                }
            }
        }
        if let Auth::Secret(s) = &self.auth {
            if s.is_empty() {
                return bad("--secret is empty".into());
            }
        }
        if self.burst == 0 || self.burst > batch::BATCH {
            return bad(format!("--burst must be 1..={}", batch::BATCH));
        }
        if let Pacing::Tick(t) = self.pacing {
            if t < MIN_TICK || t > MAX_TICK {
                return bad(format!(
                    "--tick must be {}..={}",
                    humantime::format_duration(MIN_TICK),
                    humantime::format_duration(MAX_TICK)
                ));
            }
        }
        if self.tries == 0 {
            return bad("tries must be at least 1".into());
        }
        if self.progress_interval.is_some_and(|d| d.is_zero()) {
            return bad(
                "progress_interval must be longer than zero (`None` for no progress)".into(),
            );
        }
        Ok(())
    }

    fn worker_count(&self) -> usize {
        let n = self
            .threads
            .or_else(|| std::thread::available_parallelism().ok())
            .map_or(1, NonZeroUsize::get);
        n.clamp(1, self.allocations.max(1))
    }
}

/// Why a run could not happen.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The configuration is unusable.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// A setup request failed.
    #[error("setup failed: allocation {index} (username {username}): {request} {failure}")]
    Setup {
        /// Which allocation (0-based).
        index: usize,
        /// Its username.
        username: String,
        /// Allocate, CreatePermission or ChannelBind.
        request: &'static str,
        /// What went wrong.
        failure: SetupFailure,
    },
    /// A local socket or thread could not be set up.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// A bug.
    #[error("internal error: {0}")]
    Internal(String),
}

impl LoadError {
    /// The STUN error code that failed the setup, if one did.
    pub fn stun_code(&self) -> Option<u16> {
        match self {
            LoadError::Setup {
                failure: SetupFailure::Refused { code, .. },
                ..
            } => Some(*code),
            _ => None,
        }
    }

    fn io(context: impl Into<String>) -> impl FnOnce(io::Error) -> Self {
        let context = context.into();
        move |source| LoadError::Io { context, source }
    }
}

/// How a setup request failed.
#[derive(Debug, thiserror::Error)]
pub enum SetupFailure {
    /// The server answered with an error.
    #[error("was refused with {code} {reason}{}", hint(*code))]
    Refused {
        /// The STUN error code (401, 403, 486, …).
        code: u16,
        /// The server's reason phrase.
        reason: String,
    },
    /// No answer.
    #[error("got no response after {tries} tries ({:.1} s): is a TURN server listening on UDP there?", waited.as_secs_f64())]
    Timeout {
        /// Requests sent.
        tries: u32,
        /// How long it waited.
        waited: Duration,
    },
    /// A socket error (ECONNREFUSED: nothing listens on the server port).
    #[error("failed: {0}")]
    Io(io::Error),
    /// An answer that makes no sense.
    #[error("got a malformed response: {0}")]
    Malformed(String),
}

fn hint(code: u16) -> &'static str {
    match code {
        401 | 441 => " (wrong credentials: check --secret, or --user/--password, and --realm)",
        403 => " (the server refuses this peer address: allow loopback peers, e.g. coturn --allow-loopback-peers or Turnpike allow-peers)",
        437 => " (the server already has an allocation for this 5-tuple)",
        438 => " (the nonce was still stale after one retry)",
        486 => " (allocation quota reached: raise the server's user or total quota)",
        508 => " (the server is out of capacity, e.g. relay ports)",
        _ => "",
    }
}

/// Latency percentiles in microseconds; `null` without samples.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Latency {
    /// Median.
    pub p50: Option<f64>,
    /// 99th percentile.
    pub p99: Option<f64>,
    /// 99.9th percentile.
    pub p999: Option<f64>,
    /// Largest.
    pub max: Option<f64>,
}

impl Latency {
    fn of(h: &Histogram<u64>) -> Self {
        if h.is_empty() {
            return Self::default();
        }
        let us = |ns: u64| Some(round(ns as f64 / 1000.0, 1));
        Self {
            p50: us(h.value_at_quantile(0.50)),
            p99: us(h.value_at_quantile(0.99)),
            p999: us(h.value_at_quantile(0.999)),
            max: us(h.max()),
        }
    }
}

fn round(x: f64, decimals: i32) -> f64 {
    let m = 10f64.powi(decimals);
    (x * m).round() / m
}

/// One rate of a find-max run (or the single rate of a fixed one).
#[derive(Debug, Clone, Serialize)]
pub struct StepSummary {
    /// Step index, from 0.
    pub step: usize,
    /// Target packets per second.
    pub rate_target: u64,
    /// Sending time.
    pub duration_s: f64,
    /// Packets sent.
    pub sent: u64,
    /// Unique packets received in time.
    pub received: u64,
    /// `sent - received`.
    pub lost: u64,
    /// Lost, percent of sent.
    pub loss_pct: f64,
    /// Sent per second of sending time.
    pub pps_sent: f64,
    /// Received per second of sending time.
    pub pps_received: f64,
    /// Latency (filled in at the end of the run).
    pub latency_us: Latency,
    /// Loss below the threshold and the generator kept up.
    pub ok: bool,
    /// The generator sent less than 90 % of the target.
    pub generator_limited: bool,
}

/// The find-max part of a summary.
#[derive(Debug, Clone, Serialize)]
pub struct FindMaxSummary {
    /// Messages per second actually sent at the highest step with less than 0.1 % loss (at
    /// most that step's target: a step may pass having sent 90 % of it); `null` if even the
    /// first step lost more.
    pub max_rate: Option<u64>,
    /// Why the search stopped: `loss` (bracketed and refined), `generator` (this process could
    /// not send faster), `max-steps` or `duration`.
    pub limit: &'static str,
    /// Every step, in order.
    pub steps: Vec<StepSummary>,
}

/// The result of a run; serialized as the one-line JSON summary.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    /// The server address.
    pub server: String,
    /// `client-to-client` or `client-to-peer`.
    pub mode: Mode,
    /// `channels` or `send-indications`.
    pub framing: Framing,
    /// Allocations.
    pub allocations: usize,
    /// Application bytes per packet.
    pub size: usize,
    /// Packets an allocation sends back to back.
    pub burst: usize,
    /// With `--tick`: milliseconds between sending turns (everything due goes out at once);
    /// `null` when pacing is smooth.
    pub tick_ms: Option<f64>,
    /// Target packets per second; `null` in find-max.
    pub rate_target: Option<u64>,
    /// Sending time (all steps).
    pub duration_s: f64,
    /// Packets sent.
    pub sent: u64,
    /// Unique packets received within the drain window.
    pub received: u64,
    /// `sent - received`.
    pub lost: u64,
    /// Lost, percent of sent.
    pub loss_pct: f64,
    /// Sent per second of sending time.
    pub pps_sent: f64,
    /// Received per second of sending time.
    pub pps_received: f64,
    /// Added latency, microseconds.
    pub latency_us: Latency,
    /// Setup time: allocations, permissions and channels.
    pub setup_s: f64,
    /// Allocations divided by the time of the Allocate phase.
    pub allocations_per_s: f64,
    /// Worker threads.
    pub threads: usize,
    /// Copies of packets already received (not counted twice).
    pub duplicates: u64,
    /// Packets that came more than a window late (counted as lost).
    pub too_late: u64,
    /// Datagrams on a client socket that were not an expected test packet.
    pub foreign: u64,
    /// Packets the kernel would not take (full buffers) or failed sends; not counted as sent.
    pub send_errors: u64,
    /// Flows that sent packets of which not one arrived: a broken path rather than congestion
    /// (the first few are named in `silent_flow_ids`).
    pub silent_flows: usize,
    /// Up to 10 silent flows (a flow is the index of the allocation that sends it).
    pub silent_flow_ids: Vec<u32>,
    /// Allocations released at the end.
    pub released: usize,
    /// Find-max results (absent at a fixed rate).
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    pub find_max: Option<FindMaxSummary>,
}

impl Summary {
    /// The one-line JSON form.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
    }
}

/// Setup results, reported as soon as setup is done.
#[derive(Debug, Clone)]
pub struct SetupReport {
    /// Allocations made.
    pub allocations: usize,
    /// Whole setup.
    pub setup: Duration,
    /// The Allocate phase alone.
    pub allocate: Duration,
    /// Worker threads about to send.
    pub threads: usize,
    /// Relayed address of the first allocation.
    pub first_relayed: Option<SocketAddr>,
}

/// A progress line.
#[derive(Debug, Clone)]
pub struct Progress {
    /// Since traffic started (pauses included).
    pub elapsed: Duration,
    /// Current step (the last one while draining).
    pub step: usize,
    /// Target packets per second now; `None` while nothing is sent (draining after a step).
    pub rate_target: Option<u64>,
    /// Packets sent so far.
    pub sent: u64,
    /// Unique packets received so far.
    pub received: u64,
    /// Sent but not (yet) received: in flight or lost.
    pub missing: u64,
    /// Send rate over the last interval.
    pub pps_sent: f64,
    /// Receive rate over the last interval.
    pub pps_received: f64,
}

/// What a run reports while it goes.
#[derive(Debug)]
pub enum Event<'a> {
    /// Setup is done; traffic starts.
    Setup(&'a SetupReport),
    /// Periodic progress.
    Progress(&'a Progress),
    /// A find-max step ended (latency is filled in only in the final summary).
    Step(&'a StepSummary),
}

/// Runs a load test: setup, traffic, release. Blocking; it starts its own threads and a
/// current-thread tokio runtime, so call it from a plain thread (not from inside an async task).
pub fn run(cfg: &Config, observe: &mut dyn FnMut(Event<'_>)) -> Result<Summary, LoadError> {
    cfg.check()?;
    if tokio::runtime::Handle::try_current().is_ok() {
        return Err(LoadError::Config(
            "run() blocks: call it from a plain thread, not inside a tokio runtime".into(),
        ));
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(LoadError::io("cannot start the setup runtime"))?;
    let workers = cfg.worker_count();
    raise_fd_limit(cfg.allocations + workers);
    let local_ip = local_ip_towards(cfg.server)?;

    // Echo peers: one socket per worker, owned by that worker's event loop.
    let mut echo = Vec::new();
    if let (Mode::RawToPeer, Some(at)) = (cfg.mode, cfg.echo) {
        // One echo peer at a fixed address, owned by the first worker.
        echo.push(udp_socket(at, ECHO_BUFFER, None)?);
    } else if cfg.mode == Mode::ClientToPeer {
        for _ in 0..workers {
            echo.push(udp_socket(SocketAddr::new(local_ip, 0), ECHO_BUFFER, None)?);
        }
    }
    let echo_addrs = echo
        .iter()
        .map(|s| s.local_addr())
        .collect::<io::Result<Vec<_>>>()
        .map_err(LoadError::io("echo peer address"))?;

    // Setup.
    let started = Instant::now();
    let raw = cfg.mode == Mode::RawToPeer;
    let (established, allocate_time) = if raw {
        (establish_raw(cfg, local_ip, &echo_addrs)?, Duration::ZERO)
    } else {
        rt.block_on(establish(cfg, local_ip, &echo_addrs, workers))?
    };
    let setup_time = started.elapsed();
    let report = SetupReport {
        allocations: cfg.allocations,
        setup: setup_time,
        allocate: allocate_time,
        threads: workers,
        first_relayed: established.first().map(|e| e.relayed),
    };
    observe(Event::Setup(&report));

    // Traffic.
    let shared = Arc::new(Shared::new());
    let mut sessions = Vec::with_capacity(established.len());
    let mut plans: Vec<Vec<SockPlan>> = (0..workers).map(|_| Vec::new()).collect();
    for e in established {
        let (template, payload_at) = frame_template(cfg, e.peer);
        let i = e.session.index;
        plans[i % workers].push(SockPlan {
            sock: e.sock,
            flow: i as u32,
            rx_flow: match cfg.mode {
                Mode::ClientToClient => (i ^ 1) as u32,
                Mode::ClientToPeer | Mode::RawToPeer => i as u32,
            },
            template,
            payload_at,
            patch_tid: !raw && cfg.framing == Framing::SendIndications && e.peer.is_ipv4(),
            raw,
        });
        sessions.push((e.session, e.relayed));
    }
    let mut handles = Vec::with_capacity(workers);
    let mut echo = echo.into_iter();
    for (w, plan) in plans.into_iter().enumerate() {
        let share = plan.len() as f64 / cfg.allocations as f64;
        let worker = Worker::new(
            plan,
            echo.next(),
            shared.clone(),
            share,
            cfg.burst,
            cfg.pacing,
        );
        let h = std::thread::Builder::new()
            .name(format!("load-worker-{w}"))
            .spawn(move || worker.run())
            .map_err(LoadError::io("cannot start a worker thread"))?;
        handles.push(h);
    }

    let mut ctl = Controller::new(cfg, shared.clone());
    let outcome = ctl.drive(cfg, observe);
    shared.stop();
    let mut results: Vec<WorkerResult> = Vec::with_capacity(workers);
    let mut worker_error = None;
    for h in handles {
        match h.join() {
            Ok(Ok(r)) => results.push(r),
            Ok(Err(e)) => {
                worker_error = Some(LoadError::Io {
                    context: "worker event loop".into(),
                    source: e,
                })
            }
            Err(_) => worker_error = Some(LoadError::Internal("a worker thread panicked".into())),
        }
    }

    // Release.
    let mut socks: Vec<Option<std::net::UdpSocket>> = (0..cfg.allocations).map(|_| None).collect();
    for r in &mut results {
        for (flow, s) in r.socks.drain(..) {
            if let Some(slot) = socks.get_mut(flow as usize) {
                *slot = Some(s);
            }
        }
    }
    let released = rt.block_on(async {
        let mut conns = Vec::new();
        for (session, relayed) in sessions.into_iter().filter(|_| !raw) {
            let Some(std) = socks.get_mut(session.index).and_then(Option::take) else {
                continue;
            };
            if let Ok(sock) = tokio::net::UdpSocket::from_std(std) {
                let mut c = Conn::new(sock, session, cfg);
                c.relayed = Some(relayed);
                conns.push(c);
            }
        }
        setup::release_all(conns, cfg.setup_concurrency).await
    });
    if let Some(e) = worker_error {
        return Err(e);
    }
    Ok(summarize(
        cfg, &ctl, outcome, &results, &report, workers, released,
    ))
}

const CLIENT_BUFFER: usize = 1 << 20;
const ECHO_BUFFER: usize = 8 << 20;

struct Established {
    sock: std::net::UdpSocket,
    session: Session,
    relayed: SocketAddr,
    peer: SocketAddr,
}

/// Allocates and binds everything; on failure releases what was allocated.
async fn establish(
    cfg: &Config,
    local_ip: IpAddr,
    echo_addrs: &[SocketAddr],
    workers: usize,
) -> Result<(Vec<Established>, Duration), LoadError> {
    let mut conns = Vec::with_capacity(cfg.allocations);
    for i in 0..cfg.allocations {
        let std = udp_socket(
            SocketAddr::new(local_ip, 0),
            CLIENT_BUFFER,
            Some(cfg.server),
        )?;
        let sock = tokio::net::UdpSocket::from_std(std)
            .map_err(LoadError::io("cannot register a socket"))?;
        conns.push(Conn::new(sock, Session::new(cfg, i), cfg));
    }
    let ipv6 = cfg.server.is_ipv6();
    let t0 = Instant::now();
    let conns = match setup::for_all(conns, cfg.setup_concurrency, |mut c| async move {
        let r = c.allocate(ipv6).await;
        (c, r)
    })
    .await
    {
        Ok(c) => c,
        Err((e, conns)) => {
            setup::release_all(conns, cfg.setup_concurrency).await;
            return Err(e);
        }
    };
    let allocate_time = t0.elapsed();
    let relayed: Vec<SocketAddr> = conns
        .iter()
        .map(|c| c.relayed.unwrap_or(SocketAddr::new(local_ip, 0)))
        .collect();
    let peer_of = |i: usize| match cfg.mode {
        Mode::ClientToClient => relayed[i ^ 1],
        Mode::ClientToPeer | Mode::RawToPeer => echo_addrs[(i % workers) % echo_addrs.len().max(1)],
    };
    let framing = cfg.framing;
    let conns = match setup::for_all(conns, cfg.setup_concurrency, |mut c| {
        let peer = peer_of(c.session.index);
        async move {
            let r = c.bind(peer, framing).await;
            (c, r)
        }
    })
    .await
    {
        Ok(c) => c,
        Err((e, conns)) => {
            setup::release_all(conns, cfg.setup_concurrency).await;
            return Err(e);
        }
    };
    let mut out = Vec::with_capacity(conns.len());
    for c in conns {
        let peer = peer_of(c.session.index);
        let relayed = c.relayed.unwrap_or(SocketAddr::new(local_ip, 0));
        let sock = c
            .sock
            .into_std()
            .map_err(LoadError::io("cannot take a socket back from the runtime"))?;
        out.push(Established {
            sock,
            session: c.session,
            relayed,
            peer,
        });
    }
    Ok((out, allocate_time))
}

/// Raw-to-peer: sockets connected to the forwarder, nothing to set up.
fn establish_raw(
    cfg: &Config,
    local_ip: IpAddr,
    echo_addrs: &[SocketAddr],
) -> Result<Vec<Established>, LoadError> {
    let peer = echo_addrs
        .first()
        .copied()
        .ok_or_else(|| LoadError::Internal("raw-to-peer without an echo peer".into()))?;
    (0..cfg.allocations)
        .map(|i| {
            let sock = udp_socket(
                SocketAddr::new(local_ip, 0),
                CLIENT_BUFFER,
                Some(cfg.server),
            )?;
            let relayed = sock
                .local_addr()
                .map_err(LoadError::io("client socket address"))?;
            Ok(Established {
                sock,
                session: Session::new(cfg, i),
                relayed,
                peer,
            })
        })
        .collect()
}

/// One frame with a zeroed payload, and where the payload starts.
fn frame_template(cfg: &Config, peer: SocketAddr) -> (Vec<u8>, usize) {
    if cfg.mode == Mode::RawToPeer {
        return (vec![0; cfg.size], 0);
    }
    match cfg.framing {
        Framing::Channels => {
            let mut f = Vec::with_capacity(stun::CHANNEL_HEADER_LEN + cfg.size);
            f.extend_from_slice(&stun::CHANNEL_MIN.to_be_bytes());
            f.extend_from_slice(&(cfg.size as u16).to_be_bytes());
            f.resize(stun::CHANNEL_HEADER_LEN + cfg.size, 0);
            (f, stun::CHANNEL_HEADER_LEN)
        }
        Framing::SendIndications => {
            let mut f = Vec::new();
            let mut e = Encoder::new(&mut f, method::SEND, Class::Indication, [0; 12]);
            e.xor_address(attr::XOR_PEER_ADDRESS, peer)
                .attr(attr::DATA, &vec![0u8; cfg.size]);
            e.finish();
            let at = Message::parse(&f)
                .ok()
                .and_then(|m| m.attributes().find(|(t, _, _)| *t == attr::DATA))
                .map_or(f.len(), |(_, _, at)| at + 4);
            (f, at)
        }
    }
}

/// A non-blocking UDP socket bound to `bind` (connected to `connect` if given), with large
/// buffers (forced past `rmem_max` when allowed).
fn udp_socket(
    bind: SocketAddr,
    buffer: usize,
    connect: Option<SocketAddr>,
) -> Result<std::net::UdpSocket, LoadError> {
    use nix::sys::socket::{setsockopt, sockopt};
    use socket2::{Domain, Protocol, Socket, Type};
    let s = Socket::new(Domain::for_address(bind), Type::DGRAM, Some(Protocol::UDP))
        .map_err(LoadError::io("cannot create a UDP socket"))?;
    if setsockopt(&s, sockopt::RcvBufForce, &buffer).is_err() {
        let _ = s.set_recv_buffer_size(buffer);
    }
    if setsockopt(&s, sockopt::SndBufForce, &buffer).is_err() {
        let _ = s.set_send_buffer_size(buffer);
    }
    s.bind(&bind.into())
        .map_err(LoadError::io(format!("cannot bind a UDP socket to {bind}")))?;
    if let Some(server) = connect {
        s.connect(&server.into()).map_err(LoadError::io(format!(
            "cannot connect a UDP socket to {server}"
        )))?;
    }
    s.set_nonblocking(true)
        .map_err(LoadError::io("cannot make a socket non-blocking"))?;
    Ok(s.into())
}

/// The local address the kernel would use to reach `server` (127.0.0.1 for a loopback server).
fn local_ip_towards(server: SocketAddr) -> Result<IpAddr, LoadError> {
    let any: IpAddr = if server.is_ipv6() {
        Ipv6Addr::UNSPECIFIED.into()
    } else {
        Ipv4Addr::UNSPECIFIED.into()
    };
    let probe = std::net::UdpSocket::bind(SocketAddr::new(any, 0))
        .map_err(LoadError::io("cannot create a probe socket"))?;
    probe
        .connect(server)
        .map_err(LoadError::io(format!("no route to {server}")))?;
    Ok(probe
        .local_addr()
        .map_err(LoadError::io("probe socket address"))?
        .ip())
}

/// Many allocations need many sockets: lift the soft open-file limit towards the hard one.
fn raise_fd_limit(want: usize) {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        // Room for the runtime, the echo peers and whatever the caller has open.
        let want = (want as u64).saturating_add(256);
        if soft < want {
            let _ = setrlimit(Resource::RLIMIT_NOFILE, want.min(hard), hard);
        }
    }
}

/// A step as the controller ran it.
#[derive(Debug, Clone, Copy)]
struct StepRun {
    rate: u64,
    sending: Duration,
}

/// Drives the workers through the steps and emits progress.
struct Controller {
    shared: Arc<Shared>,
    interval: Option<Duration>,
    started: Instant,
    next_progress: Instant,
    last: (Instant, u64, u64),
    steps: Vec<StepRun>,
    /// The step running and its rate (`None` while draining).
    current: (usize, Option<u64>),
}

/// How a find-max search ended, and its best rate.
struct Finding {
    max_rate: Option<u64>,
    limit: &'static str,
}

impl Controller {
    fn new(cfg: &Config, shared: Arc<Shared>) -> Self {
        let now = Instant::now();
        Self {
            shared,
            interval: cfg.progress_interval,
            started: now,
            next_progress: now + cfg.progress_interval.unwrap_or_default(),
            last: (now, 0, 0),
            steps: Vec::new(),
            current: (0, None),
        }
    }

    /// Sleeps until `until`, emitting progress on the way.
    fn wait(&mut self, until: Instant, observe: &mut dyn FnMut(Event<'_>)) {
        loop {
            let now = Instant::now();
            if now >= until {
                return;
            }
            let wake = match self.interval {
                Some(_) => self.next_progress.min(until),
                None => until,
            };
            std::thread::sleep(wake.saturating_duration_since(now));
            if let Some(iv) = self.interval {
                let now = Instant::now();
                if now >= self.next_progress {
                    self.progress(now, observe);
                    while self.next_progress <= now {
                        self.next_progress += iv;
                    }
                }
            }
        }
    }

    fn progress(&mut self, now: Instant, observe: &mut dyn FnMut(Event<'_>)) {
        let (sent, received) = self.shared.totals();
        let (t, s0, r0) = self.last;
        let dt = now.duration_since(t).as_secs_f64().max(1e-9);
        let p = Progress {
            elapsed: now.duration_since(self.started),
            step: self.current.0,
            rate_target: self.current.1,
            sent,
            received,
            missing: sent.saturating_sub(received),
            pps_sent: sent.saturating_sub(s0) as f64 / dt,
            pps_received: received.saturating_sub(r0) as f64 / dt,
        };
        self.last = (now, sent, received);
        observe(Event::Progress(&p));
    }

    /// Sends one step at `rate` for `length`, then drains.
    fn step(
        &mut self,
        rate: u64,
        length: Duration,
        drain: Duration,
        observe: &mut dyn FnMut(Event<'_>),
    ) -> usize {
        let step = self.steps.len();
        self.current = (step, Some(rate));
        let t = Instant::now();
        self.shared.start_step(step, rate);
        self.wait(t + length, observe);
        self.shared.pause();
        let sending = t.elapsed();
        self.steps.push(StepRun { rate, sending });
        self.current = (step, None);
        self.wait(Instant::now() + drain, observe);
        step
    }

    fn drive(&mut self, cfg: &Config, observe: &mut dyn FnMut(Event<'_>)) -> Option<Finding> {
        let now = Instant::now();
        self.started = now;
        self.last = (now, 0, 0);
        if let Some(iv) = self.interval {
            self.next_progress = now + iv;
        }
        let f = match &cfg.rate {
            Rate::Fixed(rate) => {
                self.step(*rate, cfg.duration, cfg.drain, observe);
                return None;
            }
            Rate::FindMax(f) => f.clone(),
        };
        let mut rate = f.start as f64;
        let mut good: Option<f64> = None;
        let mut achieved: Option<f64> = None;
        let mut bad: Option<f64> = None;
        let mut refine = f.refine;
        let mut budget = cfg.duration;
        let limit = loop {
            if self.steps.len() >= f.max_steps {
                break "max-steps";
            }
            if budget.is_zero() {
                break "duration";
            }
            let length = f.step_duration.min(budget);
            let r = rate.round().max(1.0) as u64;
            let k = self.step(r, length, cfg.drain, observe);
            budget = budget.saturating_sub(length);
            let s = step_summary(&self.shared, k, self.steps[k], None);
            observe(Event::Step(&s));
            if s.generator_limited {
                break "generator";
            }
            if s.ok {
                if good.is_none_or(|g| rate > g) {
                    // What the generator actually sent at the best passing step, never more
                    // than asked: a step may pass having sent 90 % of its target.
                    achieved = Some(s.pps_sent.min(r as f64));
                }
                good = Some(good.map_or(rate, |g: f64| g.max(rate)));
            } else {
                bad = Some(bad.map_or(rate, |b: f64| b.min(rate)));
            }
            rate = match (good, bad) {
                (_, None) => rate * f.factor,
                (Some(g), Some(b)) if refine > 0 && b - g > g * 0.02 => {
                    refine -= 1;
                    (g + b) / 2.0
                }
                (None, Some(b)) if refine > 0 && b > 2.0 => {
                    refine -= 1;
                    b / 2.0
                }
                _ => break "loss",
            };
        };
        Some(Finding {
            max_rate: achieved.map(|a| a.round() as u64),
            limit,
        })
    }
}

fn step_summary(
    shared: &Shared,
    k: usize,
    run: StepRun,
    latency: Option<&Histogram<u64>>,
) -> StepSummary {
    let sent = shared.sent[k].load(std::sync::atomic::Ordering::Relaxed);
    let received = shared.received[k].load(std::sync::atomic::Ordering::Relaxed);
    let secs = run.sending.as_secs_f64().max(1e-9);
    let lost = sent.saturating_sub(received);
    let loss_pct = pct(lost, sent);
    let generator_limited = (sent as f64) < 0.9 * run.rate as f64 * secs;
    StepSummary {
        step: k,
        rate_target: run.rate,
        duration_s: round(secs, 3),
        sent,
        received,
        lost,
        loss_pct,
        pps_sent: round(sent as f64 / secs, 1),
        pps_received: round(received as f64 / secs, 1),
        latency_us: latency.map(Latency::of).unwrap_or_default(),
        ok: sent > 0 && loss_pct < LOSS_THRESHOLD_PCT && !generator_limited,
        generator_limited,
    }
}

fn pct(part: u64, whole: u64) -> f64 {
    if whole == 0 {
        0.0
    } else {
        round(part as f64 * 100.0 / whole as f64, 4)
    }
}

fn summarize(
    cfg: &Config,
    ctl: &Controller,
    finding: Option<Finding>,
    results: &[WorkerResult],
    setup: &SetupReport,
    threads: usize,
    released: usize,
) -> Summary {
    let mut total = worker::new_histogram();
    let mut per_step: Vec<Histogram<u64>> = Vec::new();
    let mut counters = Counters::default();
    for r in results {
        counters.add(&r.counters);
        for (k, h) in r.latency.iter().enumerate() {
            let _ = total.add(h);
            while per_step.len() <= k {
                per_step.push(worker::new_histogram());
            }
            let _ = per_step[k].add(h);
        }
    }
    let steps: Vec<StepSummary> = ctl
        .steps
        .iter()
        .enumerate()
        .map(|(k, run)| step_summary(&ctl.shared, k, *run, per_step.get(k)))
        .collect();
    let sent: u64 = steps.iter().map(|s| s.sent).sum();
    let received: u64 = steps.iter().map(|s| s.received).sum();
    let secs: f64 = ctl
        .steps
        .iter()
        .map(|s| s.sending.as_secs_f64())
        .sum::<f64>()
        .max(1e-9);
    let lost = sent.saturating_sub(received);
    let mut per_flow = vec![(0u64, 0u64); cfg.allocations];
    for r in results {
        for f in &r.flows {
            if let Some(e) = per_flow.get_mut(f.flow as usize) {
                e.0 += f.sent;
            }
            if let Some(e) = per_flow.get_mut(f.rx_flow as usize) {
                e.1 += f.received;
            }
        }
    }
    let silent: Vec<u32> = (0..cfg.allocations as u32)
        .filter(|&f| matches!(per_flow[f as usize], (s, 0) if s > 0))
        .collect();
    let alloc_secs = setup.allocate.as_secs_f64().max(1e-9);
    Summary {
        server: cfg.server.to_string(),
        mode: cfg.mode,
        framing: cfg.framing,
        allocations: cfg.allocations,
        size: cfg.size,
        burst: cfg.burst,
        tick_ms: match cfg.pacing {
            Pacing::Smooth => None,
            Pacing::Tick(t) => Some(t.as_secs_f64() * 1e3),
        },
        rate_target: match cfg.rate {
            Rate::Fixed(r) => Some(r),
            Rate::FindMax(_) => None,
        },
        duration_s: round(secs, 3),
        sent,
        received,
        lost,
        loss_pct: pct(lost, sent),
        pps_sent: round(sent as f64 / secs, 1),
        pps_received: round(received as f64 / secs, 1),
        latency_us: Latency::of(&total),
        setup_s: round(setup.setup.as_secs_f64(), 3),
        // Raw-to-peer allocates nothing: 0.
        allocations_per_s: if setup.allocate.is_zero() {
            0.0
        } else {
            round(setup.allocations as f64 / alloc_secs, 1)
        },
        threads,
        duplicates: counters.duplicates,
        too_late: counters.too_late,
        foreign: counters.foreign,
        send_errors: counters.send_errors,
        silent_flows: silent.len(),
        silent_flow_ids: silent.iter().take(10).copied().collect(),
        released,
        find_max: finding.map(|f| FindMaxSummary {
            max_rate: f.max_rate,
            limit: f.limit,
            steps,
        }),
    }
}
