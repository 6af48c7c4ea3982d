//! The client-to-peer baseline: `turnpike-load --mode raw-to-peer` through `turnpike-forward`
//! carries every packet at a modest rate.
#![allow(clippy::unwrap_used)]

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::Duration;

use turnpike_load::{Auth, Config, Mode, Rate};

#[test]
fn raw_to_peer_through_the_forwarder_loses_nothing() {
    // A free port for the echo peer (the forwarder must know it before the load starts).
    let echo: SocketAddr = {
        let probe = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        probe.local_addr().unwrap()
    };
    let mut fwd = Command::new(env!("CARGO_BIN_EXE_turnpike-forward"))
        .args(["--listen", "127.0.0.1:0", "--upstream", &echo.to_string()])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(fwd.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let server: SocketAddr = line
        .trim()
        .strip_prefix("forward listening on ")
        .unwrap()
        .parse()
        .unwrap();

    let mut cfg = Config::new(
        server,
        Auth::Static {
            user: String::new(),
            password: String::new(),
        },
    );
    cfg.mode = Mode::RawToPeer;
    cfg.echo = Some(echo);
    cfg.allocations = 20;
    cfg.rate = Rate::Fixed(2000);
    cfg.duration = Duration::from_secs(1);
    cfg.drain = Duration::from_millis(500);
    cfg.threads = std::num::NonZeroUsize::new(2);
    cfg.progress_interval = None;
    let result = turnpike_load::run(&cfg, &mut |_| {});
    let _ = fwd.kill();
    let _ = fwd.wait();
    let s = result.unwrap();
    assert_eq!(s.mode, Mode::RawToPeer);
    assert!(s.sent > 1000, "sent only {}", s.sent);
    assert_eq!(s.lost, 0, "{}", s.to_json());
    assert_eq!(s.received, s.sent);
    assert_eq!(s.silent_flows, 0);
    assert_eq!(s.foreign, 0);
    assert_eq!(s.released, 0);
}

#[test]
fn raw_to_peer_needs_an_echo_address() {
    let mut cfg = Config::new(
        "127.0.0.1:9".parse().unwrap(),
        Auth::Static {
            user: String::new(),
            password: String::new(),
        },
    );
    cfg.mode = Mode::RawToPeer;
    assert!(matches!(
        turnpike_load::run(&cfg, &mut |_| {}),
        Err(turnpike_load::LoadError::Config(_))
    ));
}
