//! `turnpike-load`: the command line of the load generator. Everything else is in the library.

use std::io::Write as _;
use std::net::{SocketAddr, ToSocketAddrs};
use std::num::NonZeroUsize;
use std::process::ExitCode;
use std::time::Duration;

use clap::{ArgGroup, Parser, ValueEnum};
use turnpike_load::{
    Auth, Config, Event, FindMax, Framing, Latency, LoadError, Mode, Pacing, Rate, Summary,
};

/// TURN load generator: N allocations relaying client-to-client or through an echo peer, at a
/// fixed rate or stepping up to the highest rate without loss. Works with any TURN server over
/// UDP (Turnpike, coturn). Progress and a human summary go to stderr, one line of JSON to stdout.
#[derive(Debug, Parser)]
#[command(name = "turnpike-load", version)]
#[command(group(ArgGroup::new("credentials").args(["secret", "user"])))]
struct Args {
    /// TURN server, host:port (UDP); a leading udp:// is accepted. In raw-to-peer mode: the
    /// plain UDP forwarder (turnpike-forward) under test.
    #[arg(long, value_name = "HOST:PORT")]
    server: String,
    /// REST shared secret (coturn --static-auth-secret): usernames are expiry:PREFIX-i.
    /// This or --user is required, except in raw-to-peer mode.
    #[arg(long, env = "TURNPIKE_LOAD_SECRET", hide_env_values = true)]
    secret: Option<String>,
    /// Static long-term username (with --password), the same for every allocation.
    #[arg(long, requires = "password", conflicts_with = "secret")]
    user: Option<String>,
    /// Password of --user.
    #[arg(long, env = "TURNPIKE_LOAD_PASSWORD", hide_env_values = true)]
    password: Option<String>,
    /// Realm to sign with (default: the one in the server's 401).
    #[arg(long)]
    realm: Option<String>,
    /// Number of allocations (even in client-to-client mode).
    #[arg(long, default_value_t = 100)]
    allocations: usize,
    /// client-to-client: pairs of allocations relay to each other. client-to-peer: every
    /// allocation relays to an echo peer run by this process. raw-to-peer: no TURN; bare test
    /// packets go to --server (a plain forwarder), which passes them to the echo peer at --echo.
    #[arg(long, value_enum, default_value_t = CliMode::ClientToClient)]
    mode: CliMode,
    /// Application bytes per packet (at least 28: the test header).
    #[arg(long, default_value_t = 200)]
    size: usize,
    /// Packets per second, all allocations together (with --find-max: the first step's rate,
    /// default 1000).
    #[arg(long)]
    rate: Option<u64>,
    /// Step the rate up (×--step-factor every --step-duration) until a step loses ≥ 0.1 %, then
    /// report the highest rate without loss.
    #[arg(long)]
    find_max: bool,
    /// Sending time (default 10s); with --find-max, the most sending time over all steps
    /// (default 280s). At most 280s: permissions are not refreshed.
    #[arg(long, value_parser = humantime::parse_duration)]
    duration: Option<Duration>,
    /// Packets each allocation sends back to back when its turn comes (1: evenly spaced; more
    /// looks like video frames and costs the generator fewer system calls).
    #[arg(long, default_value_t = 1)]
    burst: usize,
    /// Send only once per tick (1ms..100ms), everything due at once over all allocations
    /// (default: as evenly as possible). Coturn's test client: --tick 4ms --burst 4.
    #[arg(long, value_parser = humantime::parse_duration)]
    tick: Option<Duration>,
    /// Use ChannelData (the default).
    #[arg(long, conflicts_with = "send_indications")]
    channels: bool,
    /// Use Send/Data indications instead of channels.
    #[arg(long)]
    send_indications: bool,
    /// REST username prefix: allocation i is expiry:PREFIX-i.
    #[arg(long, default_value = "load")]
    user_prefix: String,
    /// Print only the JSON summary (no progress, no human summary).
    #[arg(long)]
    json_only: bool,
    /// How often to print a progress line on stderr (more than zero).
    #[arg(long, default_value = "1s", value_parser = positive_duration)]
    progress_interval: Duration,
    /// Print no progress lines (the human summary still goes to stderr).
    #[arg(long)]
    no_progress: bool,
    /// Worker threads [default: one per core].
    #[arg(long)]
    threads: Option<NonZeroUsize>,
    /// How long to wait for late packets after sending stops (also between find-max steps).
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    drain: Duration,
    /// find-max: sending time of each step.
    #[arg(long, default_value = "3s", value_parser = humantime::parse_duration)]
    step_duration: Duration,
    /// find-max: rate factor between steps.
    #[arg(long, default_value_t = 1.5)]
    step_factor: f64,
    /// find-max: most steps.
    #[arg(long, default_value_t = 40)]
    max_steps: usize,
    /// find-max: bisection steps after the first step with loss.
    #[arg(long, default_value_t = 2)]
    refine: u32,
    /// Setup requests in flight at once.
    #[arg(long, default_value_t = 64)]
    setup_concurrency: usize,
    /// raw-to-peer: the address the echo peer binds (the forwarder's --upstream).
    #[arg(long, value_name = "HOST:PORT")]
    echo: Option<String>,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum CliMode {
    #[value(alias = "c2c")]
    ClientToClient,
    #[value(alias = "c2p")]
    ClientToPeer,
    #[value(alias = "raw")]
    RawToPeer,
}

/// A duration longer than zero (`--progress-interval`; `--no-progress` turns progress off).
fn positive_duration(s: &str) -> Result<Duration, String> {
    match humantime::parse_duration(s) {
        Ok(d) if d.is_zero() => {
            Err("must be longer than zero (for no progress lines: --no-progress)".into())
        }
        Ok(d) => Ok(d),
        Err(e) => Err(e.to_string()),
    }
}

fn resolve(option: &str, server: &str) -> Result<SocketAddr, String> {
    let s = server.strip_prefix("udp://").unwrap_or(server);
    s.to_socket_addrs()
        .map_err(|e| format!("{option} {server}: {e}"))?
        .next()
        .ok_or_else(|| format!("{option} {server}: no address"))
}

fn config(a: &Args) -> Result<Config, String> {
    let server = resolve("--server", &a.server)?;
    let raw = matches!(a.mode, CliMode::RawToPeer);
    let auth = match (&a.secret, &a.user, &a.password) {
        (Some(s), _, _) => Auth::Secret(s.clone()),
        (None, Some(u), Some(p)) => Auth::Static {
            user: u.clone(),
            password: p.clone(),
        },
        // Raw-to-peer makes no allocations: nothing to sign.
        _ if raw => Auth::Static {
            user: String::new(),
            password: String::new(),
        },
        _ => return Err("give --secret, or --user and --password".into()),
    };
    let mut c = Config::new(server, auth);
    c.realm = a.realm.clone();
    c.allocations = a.allocations;
    c.mode = match a.mode {
        CliMode::ClientToClient => Mode::ClientToClient,
        CliMode::ClientToPeer => Mode::ClientToPeer,
        CliMode::RawToPeer => Mode::RawToPeer,
    };
    c.echo = a
        .echo
        .as_deref()
        .map(|e| resolve("--echo", e))
        .transpose()?;
    c.framing = if a.send_indications {
        Framing::SendIndications
    } else {
        Framing::Channels
    };
    c.size = a.size;
    if a.find_max {
        c.rate = Rate::FindMax(FindMax {
            start: a.rate.unwrap_or(1000),
            factor: a.step_factor,
            step_duration: a.step_duration,
            max_steps: a.max_steps,
            refine: a.refine,
        });
        c.duration = a.duration.unwrap_or(turnpike_load::MAX_RUN);
    } else {
        c.rate = Rate::Fixed(a.rate.unwrap_or(10_000));
        c.duration = a.duration.unwrap_or(Duration::from_secs(10));
    }
    c.burst = a.burst;
    c.pacing = a.tick.map_or(Pacing::Smooth, Pacing::Tick);
    c.user_prefix = a.user_prefix.clone();
    c.threads = a.threads;
    c.progress_interval = (!a.json_only && !a.no_progress).then_some(a.progress_interval);
    c.drain = a.drain;
    c.setup_concurrency = a.setup_concurrency;
    Ok(c)
}

fn us(v: Option<f64>) -> String {
    match v {
        Some(v) if v >= 1000.0 => format!("{:.2} ms", v / 1000.0),
        Some(v) => format!("{v:.1} µs"),
        None => "-".into(),
    }
}

fn latency(l: &Latency) -> String {
    format!(
        "p50 {}  p99 {}  p99.9 {}  max {}",
        us(l.p50),
        us(l.p99),
        us(l.p999),
        us(l.max)
    )
}

fn on_event(e: Event<'_>) {
    match e {
        Event::Setup(s) => eprintln!(
            "setup: {} allocations in {:.3} s ({:.0} allocations/s), first relayed address {}, {} worker thread(s)",
            s.allocations,
            s.setup.as_secs_f64(),
            s.allocations as f64 / s.allocate.as_secs_f64().max(1e-9),
            s.first_relayed.map_or("-".into(), |a| a.to_string()),
            s.threads
        ),
        Event::Progress(p) => {
            let target = match p.rate_target {
                Some(rate) => format!("step {} @ {rate} pkt/s", p.step),
                None => "draining".to_owned(),
            };
            eprintln!(
                "[{:6.1}s] {target}: sent {} ({:.0}/s)  received {} ({:.0}/s)  missing {}",
                p.elapsed.as_secs_f64(),
                p.sent,
                p.pps_sent,
                p.received,
                p.pps_received,
                p.missing
            );
        }
        Event::Step(s) => eprintln!(
            "step {}: target {} pkt/s: sent {} ({:.0}/s), received {}, lost {} ({:.3} %){}",
            s.step,
            s.rate_target,
            s.sent,
            s.pps_sent,
            s.received,
            s.lost,
            s.loss_pct,
            if s.generator_limited {
                ": GENERATOR-LIMITED"
            } else if s.ok {
                ": ok"
            } else {
                ": LOSS"
            }
        ),
    }
}

fn human(s: &Summary) {
    let rate = s
        .rate_target
        .map_or("find-max".to_owned(), |r| format!("{r} pkt/s"));
    eprintln!(
        "\n{} {}, {} allocations, {} bytes, {}, {rate}, {:.1} s of sending",
        s.server,
        s.mode.as_str(),
        s.allocations,
        s.size,
        s.framing.as_str(),
        s.duration_s
    );
    eprintln!(
        "  setup     {:.3} s ({:.0} allocations/s)",
        s.setup_s, s.allocations_per_s
    );
    eprintln!("  sent      {} ({:.0} pkt/s)", s.sent, s.pps_sent);
    eprintln!("  received  {} ({:.0} pkt/s)", s.received, s.pps_received);
    eprintln!("  lost      {} ({:.4} %)", s.lost, s.loss_pct);
    eprintln!("  latency   {}", latency(&s.latency_us));
    if s.duplicates + s.too_late + s.foreign + s.send_errors > 0 {
        eprintln!(
            "  also      {} duplicates, {} too late, {} foreign datagrams, {} send errors",
            s.duplicates, s.too_late, s.foreign, s.send_errors
        );
    }
    if s.silent_flows > 0 {
        eprintln!(
            "  silent    {} flow(s) lost every packet: a broken path, not congestion (flows {:?}; flow i is sent by allocation i)",
            s.silent_flows, s.silent_flow_ids
        );
    }
    if let Some(f) = &s.find_max {
        eprintln!("  steps:");
        for st in &f.steps {
            eprintln!(
                "    {:>2}  {:>8} pkt/s  sent {:>9.0}/s  lost {:>8.4} %  {}{}",
                st.step,
                st.rate_target,
                st.pps_sent,
                st.loss_pct,
                latency(&st.latency_us),
                if st.generator_limited {
                    "  generator-limited"
                } else if st.ok {
                    ""
                } else {
                    "  LOSS"
                }
            );
        }
        match f.max_rate {
            Some(r) => eprintln!("  max rate  {r} pkt/s (search ended by: {})", f.limit),
            None => eprintln!(
                "  max rate  none: the first step already lost ≥ {} % (ended by: {})",
                turnpike_load::LOSS_THRESHOLD_PCT,
                f.limit
            ),
        }
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    let cfg = match config(&args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("turnpike-load: {e}");
            return ExitCode::from(1);
        }
    };
    let quiet = args.json_only;
    let mut observe = |e: Event<'_>| {
        if !quiet {
            on_event(e);
        }
    };
    match turnpike_load::run(&cfg, &mut observe) {
        Ok(summary) => {
            if !quiet {
                human(&summary);
            }
            let mut out = std::io::stdout().lock();
            if writeln!(out, "{}", summary.to_json()).is_err() {
                return ExitCode::from(1);
            }
            ExitCode::SUCCESS
        }
        Err(e @ LoadError::Setup { .. }) => {
            eprintln!("turnpike-load: {e}");
            ExitCode::from(2)
        }
        Err(e) => {
            eprintln!("turnpike-load: {e}");
            ExitCode::from(1)
        }
    }
}
