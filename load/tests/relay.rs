//! The load generator against a Turnpike relay started in this process (port 0, loopback): both
//! modes and both framings carry every packet at a modest rate, a wrong secret fails setup with
//! 401, and the JSON summary has every field. No timing assertions: rates are low and the only
//! latency check is that the percentiles are ordered.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::sync::mpsc;
use std::sync::Mutex;
use std::thread::JoinHandle;
use std::time::Duration;

use turnpike_load::{
    Auth, Config, Event, FindMax, Framing, LoadError, Mode, Pacing, Rate, Summary,
};

const SECRET: &str = "load-test-secret-0123456789";

/// One relay at a time: the tests share two cores with it.
static SERIAL: Mutex<()> = Mutex::new(());

struct Relay {
    addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Relay {
    /// A relay on `ports`: below the kernel's ephemeral range (32768–60999), so no echo peer or
    /// client socket of ours ever sits on a port the relay considers one of its own.
    fn start(ports: &str) -> Self {
        let text = format!(
            r#"
[relay]
realm = "example.org"
listen = ["udp://127.0.0.1:0"]
relay-ip = "127.0.0.1"
relay-ports = "{ports}"
secrets = ["{SECRET}"]
allow-peers = ["127.0.0.0/8"]
user-quota = 10000
threads = 2
grace-period = "1s"
"#
        );
        let (addr_tx, addr_rx) = mpsc::channel();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let cfg = conf::parse(&text, &[]).unwrap();
                let server =
                    relay_server::RelayServer::bind(&cfg.relay, None, &prometheus::Registry::new())
                        .unwrap();
                addr_tx
                    .send(server.local_addr(conf::Transport::Udp).unwrap())
                    .unwrap();
                server
                    .run(async {
                        let _ = stopped.await;
                    })
                    .await
                    .unwrap();
            });
        });
        let addr = addr_rx.recv_timeout(Duration::from_secs(10)).unwrap();
        Self {
            addr,
            stop: Some(stop),
            thread: Some(thread),
        }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn config(server: SocketAddr, mode: Mode) -> Config {
    let mut c = Config::new(server, Auth::Secret(SECRET.into()));
    c.allocations = 8;
    c.mode = mode;
    c.size = 200;
    c.rate = Rate::Fixed(2000);
    c.duration = Duration::from_secs(1);
    c.drain = Duration::from_millis(500);
    c.threads = std::num::NonZeroUsize::new(2);
    c.progress_interval = Some(Duration::from_millis(300));
    c
}

/// Runs and counts the events seen.
fn run(cfg: &Config) -> (Result<Summary, LoadError>, usize, usize) {
    let mut setups = 0;
    let mut progress = 0;
    let r = turnpike_load::run(cfg, &mut |e| match e {
        Event::Setup(_) => setups += 1,
        Event::Progress(_) => progress += 1,
        Event::Step(_) => {}
    });
    (r, setups, progress)
}

fn assert_clean(s: &Summary, allocations: usize) {
    assert!(s.sent > 0, "{s:?}");
    assert_eq!(
        s.received, s.sent,
        "no loss on loopback at a low rate: {s:?}"
    );
    assert_eq!(s.lost, 0);
    assert_eq!(s.loss_pct, 0.0);
    assert_eq!((s.duplicates, s.too_late, s.send_errors), (0, 0, 0));
    assert_eq!(s.silent_flows, 0);
    let l = s.latency_us;
    let (p50, p99, p999, max) = (
        l.p50.unwrap(),
        l.p99.unwrap(),
        l.p999.unwrap(),
        l.max.unwrap(),
    );
    assert!(
        0.0 < p50 && p50 <= p99 && p99 <= p999 && p999 <= max,
        "{l:?}"
    );
    assert_eq!(s.allocations, allocations);
    assert_eq!(s.released, allocations, "every allocation is released");
    assert!(s.setup_s > 0.0 && s.allocations_per_s > 0.0);
}

const FIELDS: &[&str] = &[
    "server",
    "mode",
    "allocations",
    "size",
    "rate_target",
    "duration_s",
    "sent",
    "received",
    "lost",
    "loss_pct",
    "pps_sent",
    "pps_received",
    "latency_us",
    "setup_s",
    "allocations_per_s",
];

fn json_of(s: &Summary) -> serde_json::Value {
    let text = s.to_json();
    assert!(!text.contains('\n'), "one line");
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    for f in FIELDS {
        assert!(v.get(f).is_some(), "field {f} missing in {text}");
    }
    for p in ["p50", "p99", "p999", "max"] {
        assert!(v["latency_us"][p].is_number(), "latency_us.{p} in {text}");
    }
    v
}

#[test]
fn client_to_client_over_channels_loses_nothing() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let relay = Relay::start("10000-10999");
    let cfg = config(relay.addr, Mode::ClientToClient);
    let (r, setups, progress) = run(&cfg);
    let s = r.unwrap();
    assert_clean(&s, 8);
    assert_eq!(setups, 1);
    assert!(progress >= 1, "progress events while sending");
    let v = json_of(&s);
    assert_eq!(v["mode"], "client-to-client");
    assert_eq!(v["framing"], "channels");
    assert_eq!(v["rate_target"], 2000);
    assert_eq!(v["sent"].as_u64(), Some(s.sent));
    assert_eq!(v["server"], relay.addr.to_string());
    assert!(v.get("steps").is_none() && v.get("max_rate").is_none());
}

#[test]
fn client_to_peer_through_the_echo_peer_loses_nothing() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let relay = Relay::start("11000-11999");
    let mut cfg = config(relay.addr, Mode::ClientToPeer);
    cfg.allocations = 5; // odd is fine without pairs
    let (r, _, _) = run(&cfg);
    let s = r.unwrap();
    assert_clean(&s, 5);
    assert_eq!(json_of(&s)["mode"], "client-to-peer");
}

#[test]
fn send_indications_work_in_both_modes() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let relay = Relay::start("12000-12999");
    for mode in [Mode::ClientToClient, Mode::ClientToPeer] {
        let mut cfg = config(relay.addr, mode);
        cfg.allocations = 4;
        cfg.framing = Framing::SendIndications;
        cfg.duration = Duration::from_millis(500);
        cfg.user_prefix = format!("ind-{}", mode.as_str());
        let (r, _, _) = run(&cfg);
        let s = r.unwrap();
        assert_clean(&s, 4);
        assert_eq!(json_of(&s)["framing"], "send-indications");
    }
}

#[test]
fn find_max_reports_its_steps() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let relay = Relay::start("13000-13999");
    let mut cfg = config(relay.addr, Mode::ClientToClient);
    cfg.allocations = 4;
    cfg.drain = Duration::from_millis(300);
    cfg.rate = Rate::FindMax(FindMax {
        start: 500,
        factor: 2.0,
        step_duration: Duration::from_millis(400),
        max_steps: 2,
        refine: 0,
    });
    let mut steps_seen = 0;
    let s = turnpike_load::run(&cfg, &mut |e| {
        if let Event::Step(_) = e {
            steps_seen += 1;
        }
    })
    .unwrap();
    let f = s.find_max.as_ref().unwrap();
    assert!(!f.steps.is_empty() && f.steps.len() <= 2);
    assert_eq!(steps_seen, f.steps.len());
    assert_eq!(f.steps[0].rate_target, 500);
    assert_eq!(s.sent, f.steps.iter().map(|st| st.sent).sum::<u64>());
    let v = json_of(&s);
    assert!(v["rate_target"].is_null());
    assert!(v.get("max_rate").is_some() && v["steps"].is_array());
    assert!(["loss", "generator", "max-steps", "duration"].contains(&f.limit));
    // The maximum is what was sent at the best passing step, never more than its target.
    let best = f
        .steps
        .iter()
        .filter(|st| st.ok)
        .max_by_key(|st| st.rate_target);
    let expected = best.map(|st| (st.pps_sent.min(st.rate_target as f64)).round() as u64);
    assert_eq!(f.max_rate, expected, "{:?}", f.steps);
}

#[test]
fn wrong_secret_fails_setup_with_401() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let relay = Relay::start("14000-14499");
    let mut cfg = config(relay.addr, Mode::ClientToClient);
    cfg.auth = Auth::Secret("not-the-secret-0123456789".into());
    cfg.allocations = 2;
    let (r, setups, _) = run(&cfg);
    let e = r.unwrap_err();
    assert_eq!(e.stun_code(), Some(401), "{e}");
    let msg = e.to_string();
    assert!(
        msg.contains("401") && msg.contains("Allocate") && msg.contains("allocation"),
        "{msg}"
    );
    assert_eq!(setups, 0, "no traffic after a failed setup");
}

#[test]
fn nothing_listening_fails_setup_clearly() {
    // A port that was just free: the kernel answers with ICMP port unreachable.
    let port = std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut cfg = config(SocketAddr::from(([127, 0, 0, 1], port)), Mode::ClientToPeer);
    cfg.allocations = 1;
    cfg.rto = Duration::from_millis(50);
    cfg.tries = 2;
    let e = run(&cfg).0.unwrap_err();
    assert!(matches!(e, LoadError::Setup { index: 0, .. }), "{e}");
}

#[test]
fn ticked_pacing_sends_in_turns_and_loses_nothing() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let relay = Relay::start("11000-11999");
    let mut cfg = config(relay.addr, Mode::ClientToPeer);
    cfg.pacing = Pacing::Tick(Duration::from_millis(20));
    let (r, _, _) = run(&cfg);
    let s = r.unwrap();
    assert_clean(&s, 8);
    let v = json_of(&s);
    assert_eq!(v["tick_ms"], 20.0);
    // Smooth pacing reports no tick.
    let cfg = config(relay.addr, Mode::ClientToPeer);
    let s = run(&cfg).0.unwrap();
    assert!(json_of(&s)["tick_ms"].is_null());
}

#[test]
fn bad_configurations_are_refused_before_any_socket() {
    let server = SocketAddr::from(([127, 0, 0, 1], 9));
    let mut odd = config(server, Mode::ClientToClient);
    odd.allocations = 3;
    let mut small = config(server, Mode::ClientToPeer);
    small.size = 10;
    let mut long = config(server, Mode::ClientToPeer);
    long.duration = Duration::from_secs(3600);
    let mut no_tick = config(server, Mode::ClientToPeer);
    no_tick.pacing = Pacing::Tick(Duration::ZERO);
    let mut slow_tick = config(server, Mode::ClientToPeer);
    slow_tick.pacing = Pacing::Tick(Duration::from_secs(1));
    let mut busy_progress = config(server, Mode::ClientToPeer);
    busy_progress.progress_interval = Some(Duration::ZERO);
    for cfg in [odd, small, long, no_tick, slow_tick, busy_progress] {
        let e = run(&cfg).0.unwrap_err();
        assert!(matches!(e, LoadError::Config(_)), "{e}");
    }
}

#[test]
fn the_binary_refuses_zero_threads_and_a_zero_progress_interval() {
    let bin = env!("CARGO_BIN_EXE_turnpike-load");
    for (flag, value) in [("--threads", "0"), ("--progress-interval", "0s")] {
        let out = std::process::Command::new(bin)
            .args(["--server", "127.0.0.1:9", "--secret", SECRET, flag, value])
            .output()
            .unwrap();
        assert!(!out.status.success(), "{flag} {value}: {out:?}");
        assert!(out.stdout.is_empty());
        let stderr = String::from_utf8(out.stderr).unwrap();
        assert!(stderr.contains(flag), "{flag}: {stderr}");
    }
}

#[test]
fn the_binary_prints_one_json_line_and_exits_2_on_setup_failure() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let relay = Relay::start("14500-14999");
    let bin = env!("CARGO_BIN_EXE_turnpike-load");
    let common = |secret: &str| {
        let mut c = std::process::Command::new(bin);
        c.args([
            "--server",
            &format!("udp://{}", relay.addr),
            "--secret",
            secret,
        ])
        .args(["--allocations", "4", "--mode", "c2p", "--size", "100"])
        .args(["--rate", "500", "--duration", "500ms", "--drain", "300ms"]);
        c
    };
    let out = common(SECRET).arg("--json-only").output().unwrap();
    assert!(out.status.success(), "{out:?}");
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert_eq!(stdout.lines().count(), 1, "{stdout}");
    let v: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    for f in FIELDS {
        assert!(v.get(f).is_some(), "field {f} missing in {stdout}");
    }
    assert_eq!(v["size"], 100);
    assert!(out.stderr.is_empty(), "--json-only keeps stderr quiet");

    let out = common("wrong-secret-0123456789").output().unwrap();
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(out.stdout.is_empty());
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(
        stderr.contains("allocation 0") && stderr.contains("401"),
        "{stderr}"
    );
}
