//! The `turnpike` binary as a user runs it: `relay` with a config file (ports 0, readiness read
//! from its output), coturn's `turnutils_uclient` relaying through it, `creds`, `check-config`,
//! and SIGTERM draining.
#![allow(clippy::unwrap_used, clippy::print_stdout)]

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

#[path = "common/turn.rs"]
mod turn;

const BIN: &str = env!("CARGO_BIN_EXE_turnpike");
const SECRET: &str = "cli-test-secret-0123456789";
/// Upper bound on anything the tests wait for (a loaded 2-core CI machine).
const WAIT: Duration = Duration::from_secs(20);

fn temp_config(name: &str, text: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("turnpike-cli-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("turnpike.toml");
    std::fs::write(&path, text).unwrap();
    path
}

fn relay_config(name: &str, extra: &str) -> PathBuf {
    temp_config(
        name,
        &format!(
            r#"
[relay]
realm = "example.org"
listen = ["udp://127.0.0.1:0"]
relay-ip = "127.0.0.1"
secrets = ["{SECRET}"]
threads = 2
{extra}
[admin]
listen = "127.0.0.1:0"
"#
        ),
    )
}

/// A running `turnpike relay`, killed on drop.
struct Relay {
    child: Child,
    udp: SocketAddr,
    admin: SocketAddr,
    /// Every "relay listening on SCHEME://ADDR" line, as (scheme, address).
    listens: Vec<(String, SocketAddr)>,
    lines: mpsc::Receiver<String>,
}

impl Relay {
    fn start(config: &PathBuf) -> Self {
        let mut cmd = Command::new(BIN);
        cmd.args(["relay", "--config"]).arg(config);
        Self::spawn(cmd)
    }

    /// Starts `cmd`, which runs `turnpike relay` (directly or through a shell).
    fn spawn(mut cmd: Command) -> Self {
        let mut child = cmd
            .env("RUST_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let (tx, lines) = mpsc::channel();
        let out = BufReader::new(child.stdout.take().unwrap());
        std::thread::spawn(move || {
            for l in out.lines().map_while(Result::ok) {
                if tx.send(l).is_err() {
                    break;
                }
            }
        });
        // Readiness: the binary prints its bound relay addresses once its sockets are open,
        // then the admin address.
        let mut listens = Vec::new();
        let admin = loop {
            let line = lines
                .recv_timeout(WAIT)
                .expect("relay prints its addresses");
            if let Some(l) = line.strip_prefix("turnpike: relay listening on ") {
                let (scheme, addr) = l.split_once("://").unwrap();
                listens.push((scheme.to_owned(), addr.parse().unwrap()));
            }
            if let Some(a) = line.strip_prefix("turnpike: admin listening on http://") {
                break a.parse().unwrap();
            }
        };
        let mut relay = Self {
            child,
            udp: "0.0.0.0:0".parse().unwrap(),
            admin,
            listens,
            lines,
        };
        relay.udp = relay.listen("udp");
        relay
    }

    /// The first listener of `scheme` ("udp", "tcp", "tls").
    fn listen(&self, scheme: &str) -> SocketAddr {
        self.listens
            .iter()
            .find(|(s, _)| s == scheme)
            .map(|(_, a)| *a)
            .unwrap_or_else(|| panic!("no {scheme} listener in {:?}", self.listens))
    }

    /// GET a path on the admin listener with plain std (no HTTP client dependency).
    fn get(&self, path: &str) -> (u16, String) {
        self.try_get(path)
            .unwrap_or_else(|e| panic!("admin {path}: {e}"))
    }

    /// [`Relay::get`], or why the connection failed.
    fn try_get(&self, path: &str) -> std::io::Result<(u16, String)> {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(self.admin)?;
        s.set_read_timeout(Some(WAIT)).unwrap();
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut resp = String::new();
        s.read_to_string(&mut resp)?;
        let status = resp[9..12].parse().unwrap();
        let body = resp
            .split_once("\r\n\r\n")
            .map(|x| x.1)
            .unwrap_or("")
            .to_owned();
        Ok((status, body))
    }

    fn metric(&self, series: &str) -> f64 {
        let (_, body) = self.get("/metrics");
        body.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or(0.0)
    }

    fn wait_metric(&self, series: &str, at_least: f64) -> f64 {
        let deadline = Instant::now() + WAIT;
        loop {
            let v = self.metric(series);
            if v >= at_least {
                return v;
            }
            assert!(Instant::now() < deadline, "{series} stayed at {v}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Held while a `turnutils_uclient` runs: the tests assert zero loss, and two runs at once (each
/// up to 10 sessions of 1 000 datagrams/s) on a 2-core machine could overflow the client's
/// default socket buffers during a stall, which would be the client's loss, not the relay's.
fn one_uclient_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    static UCLIENT: std::sync::Mutex<()> = std::sync::Mutex::new(());
    UCLIENT
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn uclient(relay: SocketAddr, secret: &str, extra: &[&str]) -> std::process::Output {
    let _one = one_uclient_at_a_time();
    let out = Command::new("turnutils_uclient")
        .args(["-c", "-y", "-s", "-l", "200", "-z", "1", "-u", "carol"])
        .args(["-W", secret, "-p", &relay.port().to_string()])
        .args(extra)
        .arg(relay.ip().to_string())
        .stdin(Stdio::null())
        .output()
        .expect("turnutils_uclient (Debian package coturn) is installed: run scripts/test.sh");
    out
}

#[test]
fn coturn_uclient_relays_client_to_client_with_zero_loss() {
    let relay = Relay::start(&relay_config("uclient", ""));
    let out = uclient(relay.udp, SECRET, &["-m", "10", "-n", "200"]);
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    let lost = text
        .lines()
        .find_map(|l| l.split("Total lost packets ").nth(1))
        .unwrap_or_else(|| panic!("no loss report in uclient output:\n{text}"));
    assert!(lost.starts_with("0 (0"), "lost: {lost}\n{text}");
    assert!(text.contains("tot_recv_msgs=2000"), "{text}");
    // At least one allocation per session, and every message crossed the relay.
    relay.wait_metric(
        r#"turnpike_relay_allocation_requests_total{result="ok",transport="udp"}"#,
        10.0,
    );
    let sent = relay.wait_metric(
        r#"turnpike_relay_packets_total{direction="client_to_peer",framing="indication",transport="udp"}"#,
        2000.0,
    );
    assert!(sent >= 2000.0);
}

#[test]
fn newcomer_flow_serve_without_config_then_creds_then_two_coturn_clients() {
    // `turnpike serve` with no file: the embedded default, ports moved to 0 by environment
    // overrides so the test never needs a fixed port.
    let mut child = Command::new(BIN)
        .arg("serve")
        .env("TURNPIKE_RELAY_LISTEN", "udp://127.0.0.1:0")
        .env("TURNPIKE_ADMIN_LISTEN", "127.0.0.1:0")
        .env("TURNPIKE_CONTROL_LISTEN", "127.0.0.1:0")
        .env_remove("TURNPIKE_CONFIG")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap()).lines();
    let (mut secret, mut udp) = (None::<String>, None::<SocketAddr>);
    while secret.is_none() || udp.is_none() {
        let line = out
            .next()
            .expect("serve prints its secret and address")
            .unwrap();
        if let Some(s) = line.strip_prefix("turnpike: secret for this run: ") {
            secret = Some(s.to_owned());
        }
        if let Some(a) = line.strip_prefix("turnpike: relay listening on udp://") {
            udp = Some(a.parse().unwrap());
        }
    }
    let (secret, udp) = (secret.unwrap(), udp.unwrap());
    // Mint a credential the way the README says, and give it to coturn's client as a plain
    // long-term username/password.
    let creds = Command::new(BIN)
        .args([
            "creds", "--user", "alice", "--ttl", "10m", "--secret", &secret,
        ])
        .output()
        .unwrap();
    let creds = String::from_utf8(creds.stdout).unwrap();
    let username = creds
        .lines()
        .find_map(|l| l.strip_prefix("username: "))
        .unwrap();
    let password = creds
        .lines()
        .find_map(|l| l.strip_prefix("password: "))
        .unwrap();
    let run = {
        let _one = one_uclient_at_a_time();
        Command::new("turnutils_uclient")
            .args([
                "-c", "-y", "-s", "-m", "2", "-n", "50", "-l", "200", "-z", "1",
            ])
            .args([
                "-u",
                username,
                "-w",
                password,
                "-p",
                &udp.port().to_string(),
            ])
            .arg(udp.ip().to_string())
            .stdin(Stdio::null())
            .output()
            .expect("turnutils_uclient (Debian package coturn) is installed: run scripts/test.sh")
    };
    let _ = child.kill();
    let _ = child.wait();
    let text =
        String::from_utf8_lossy(&run.stdout).to_string() + &String::from_utf8_lossy(&run.stderr);
    assert!(text.contains("Total lost packets 0 (0"), "{text}");
    assert!(text.contains("tot_recv_msgs=100"), "{text}");
}

#[test]
fn coturn_uclient_with_a_wrong_secret_is_refused() {
    let relay = Relay::start(&relay_config("wrong", ""));
    let out = uclient(
        relay.udp,
        "a-wrong-secret-000000000",
        &["-m", "1", "-n", "10"],
    );
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(!text.contains("Total lost packets 0"), "{text}");
    relay.wait_metric(
        r#"turnpike_relay_auth_failures_total{reason="bad_integrity"}"#,
        1.0,
    );
    assert_eq!(
        relay.metric(r#"turnpike_relay_allocation_requests_total{result="ok",transport="udp"}"#),
        0.0
    );
}

#[test]
fn admin_listener_serves_live_ready_and_metrics() {
    let relay = Relay::start(&relay_config("admin", ""));
    assert_eq!(relay.get("/live").0, 200);
    let deadline = Instant::now() + WAIT;
    while relay.get("/ready").0 != 200 {
        assert!(Instant::now() < deadline, "never ready");
        std::thread::sleep(Duration::from_millis(50));
    }
    let (status, body) = relay.get("/metrics");
    assert_eq!(status, 200);
    assert!(body.contains("turnpike_relay_allocations_active"), "{body}");
    assert!(!body.contains(SECRET));
    assert_eq!(relay.get("/nope").0, 404);
}

/// Sends `signals` (as `kill` names them, e.g. "-TERM") to the relay in order and waits until
/// it exits; returns how.
fn exit_after(mut relay: Relay, signals: &[&str]) -> std::process::ExitStatus {
    let pid = relay.child.id().to_string();
    for signal in signals {
        let status = Command::new("kill").args([*signal, &pid]).status().unwrap();
        assert!(status.success(), "kill {signal}");
    }
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(status) = relay.child.try_wait().unwrap() {
            // Drain the output the relay printed; nothing more is required of it.
            while relay.lines.try_recv().is_ok() {}
            return status;
        }
        assert!(Instant::now() < deadline, "did not exit after {signals:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn sigterm_drains_then_exits() {
    let relay = Relay::start(&relay_config("sigterm", "grace-period = \"2s\"\n"));
    let status = exit_after(relay, &["-TERM"]);
    assert!(status.success(), "{status}");
}

/// Holds an allocation (so the relay drains for its whole grace period), sends SIGTERM and waits
/// until `/ready` says the drain started; the admin listener answers throughout.
fn hold_and_start_draining(relay: &Relay) {
    let expiry = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 600;
    let (user, pass) = relay_proto::rest_credentials(SECRET.as_bytes(), "drainer", expiry);
    assert_eq!(turn::allocate(relay.udp, "example.org", &user, &pass), None);
    assert_eq!(relay.get("/ready").0, 200);
    let pid = relay.child.id().to_string();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    let deadline = Instant::now() + WAIT;
    loop {
        match relay.try_get("/ready") {
            Ok((503, _)) => break,
            Ok((200, _)) => {}
            other => panic!("/ready during the drain: {other:?}"),
        }
        assert!(Instant::now() < deadline, "never turned not ready");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn while_draining_ready_answers_503_and_metrics_stay_up() {
    let relay = Relay::start(&relay_config("drain-ready", "grace-period = \"3s\"\n"));
    hold_and_start_draining(&relay);
    let (status, metrics) = relay.get("/metrics");
    assert_eq!(status, 200);
    assert!(
        metrics.contains("turnpike_relay_allocations_active"),
        "{metrics}"
    );
    let status = exit_after(relay, &[]);
    assert!(status.success(), "{status}");
}

#[test]
fn a_second_sigterm_during_the_drain_exits_at_once_with_status_1() {
    // An hour of grace with an allocation held: only the second signal can end the process
    // within the test's wait.
    let relay = Relay::start(&relay_config("second-term", "grace-period = \"1h\"\n"));
    hold_and_start_draining(&relay);
    let status = exit_after(relay, &["-TERM"]);
    assert_eq!(status.code(), Some(1), "{status}");
}

/// The soft and hard "Max open files" of process `pid`.
fn open_file_limits(pid: u32) -> (String, String) {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap();
    let mut fields = line["Max open files".len()..].split_whitespace();
    (
        fields.next().unwrap().to_owned(),
        fields.next().unwrap().to_owned(),
    )
}

#[test]
fn the_relay_raises_its_open_file_limit_to_the_hard_limit() {
    // Every allocation holds a socket: a soft limit of 512 would cap the relay near 500
    // allocations, each one past it answered 508.
    let config = relay_config("nofile", "");
    let mut cmd = Command::new("bash");
    cmd.args([
        "-c",
        r#"ulimit -Sn 512 && exec "$0" relay --config "$1""#,
        BIN,
    ])
    .arg(&config);
    let relay = Relay::spawn(cmd);
    let (soft, hard) = open_file_limits(relay.child.id());
    assert_ne!(soft, "512", "the soft limit was left as it was");
    // Up to the hard limit (when that is unlimited, up to the kernel's per-process maximum).
    assert!(soft == hard || hard == "unlimited", "{soft} of {hard}");
}

#[test]
fn sighup_without_tls_does_not_stop_the_relay() {
    // SIGHUP reloads TLS certificates; a relay without TLS must survive it (its default action
    // would end the process at once), so the SIGTERM after it still drains and exits 0.
    let relay = Relay::start(&relay_config("sighup", "grace-period = \"1s\"\n"));
    let status = exit_after(relay, &["-HUP", "-TERM"]);
    assert!(status.success(), "{status}");
}

#[test]
fn creds_prints_a_credential_the_relay_formula_accepts() {
    let out = Command::new(BIN)
        .args([
            "creds", "--user", "dave", "--ttl", "10m", "--secret", SECRET,
        ])
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    let username = text
        .lines()
        .find_map(|l| l.strip_prefix("username: "))
        .unwrap();
    let password = text
        .lines()
        .find_map(|l| l.strip_prefix("password: "))
        .unwrap();
    let (expiry, user) = username.split_once(':').unwrap();
    assert_eq!(user, "dave");
    let expiry: u64 = expiry.parse().unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    assert!(
        (now + 590..=now + 610).contains(&expiry),
        "{expiry} vs {now}"
    );
    assert_eq!(
        password,
        relay_proto::rest_password(SECRET.as_bytes(), username)
    );
}

#[test]
fn creds_reads_the_signing_secret_from_a_config() {
    let cfg = relay_config("creds", "");
    let out = Command::new(BIN)
        .args(["creds", "--user", "erin", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8(out.stdout).unwrap();
    let username = text
        .lines()
        .find_map(|l| l.strip_prefix("username: "))
        .unwrap();
    let password = text
        .lines()
        .find_map(|l| l.strip_prefix("password: "))
        .unwrap();
    assert_eq!(
        password,
        relay_proto::rest_password(SECRET.as_bytes(), username)
    );
}

#[test]
fn check_config_reports_every_bad_key_with_exit_64() {
    let cfg = temp_config(
        "bad",
        r#"
[relay]
realm = "example.org"
listen = ["udp://127.0.0.1:3478"]
secrets = ["short"]
relay-ports = "100-50"
user-quota = "many"
colour = "blue"
"#,
    );
    let out = Command::new(BIN)
        .args(["check-config", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8(out.stderr).unwrap();
    for key in [
        "relay.secrets",
        "relay.relay-ports",
        "relay.user-quota",
        "relay.colour",
    ] {
        assert!(err.contains(key), "{key} missing from:\n{err}");
    }
    assert!(!err.contains("short\""), "a secret value leaked:\n{err}");
}

#[test]
fn check_config_accepts_the_shipped_example() {
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/conf/examples/turnpike.toml");
    let out = Command::new(BIN)
        .args(["check-config", "--config", example])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn bad_environment_override_is_reported_with_exit_64() {
    let cfg = relay_config("env", "");
    let out = Command::new(BIN)
        .args(["check-config", "--config"])
        .arg(&cfg)
        .env("TURNPIKE_RELAY_USER_QUOTA", "lots")
        .env("TURNPIKE_RELAY_NO_SUCH_KEY", "1")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(err.contains("TURNPIKE_RELAY_USER_QUOTA"), "{err}");
    assert!(err.contains("TURNPIKE_RELAY_NO_SUCH_KEY"), "{err}");
}

/// A relay with a stream listener (`tcp://` or `tls://`, from `listen`) next to the UDP one;
/// returns it and the stream listener's address, read from the binary's output.
fn start_stream_relay(name: &str, listen: &str, tls: bool) -> (Relay, SocketAddr) {
    let dir = std::env::temp_dir().join(format!("turnpike-cli-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let tls_table = if tls {
        let ck = rcgen::generate_simple_self_signed(vec![
            "localhost".to_owned(),
            "127.0.0.1".to_owned(),
        ])
        .unwrap();
        let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
        std::fs::write(&cert, ck.cert.pem()).unwrap();
        std::fs::write(&key, ck.signing_key.serialize_pem()).unwrap();
        format!(
            "[relay.tls]\ncert-file = \"{}\"\nkey-file = \"{}\"\n",
            cert.display(),
            key.display()
        )
    } else {
        String::new()
    };
    let config = temp_config(
        name,
        &format!(
            r#"
[relay]
realm = "example.org"
listen = ["udp://127.0.0.1:0", "{listen}"]
relay-ip = "127.0.0.1"
secrets = ["{SECRET}"]
threads = 2
{tls_table}
[admin]
listen = "127.0.0.1:0"
"#
        ),
    );
    let relay = Relay::start(&config);
    let stream = relay.listen(listen.split("://").next().unwrap());
    (relay, stream)
}

/// Runs coturn's client against a stream listener and checks: no loss, all 2000 messages
/// back, and the relay counted them on `transport`.
fn uclient_over_stream(relay: &Relay, addr: SocketAddr, transport: &str, extra: &[&str]) {
    let mut args = extra.to_vec();
    args.extend(["-m", "10", "-n", "200"]);
    let out = uclient(addr, SECRET, &args);
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    let lost = text
        .lines()
        .find_map(|l| l.split("Total lost packets ").nth(1))
        .unwrap_or_else(|| panic!("no loss report in uclient output:\n{text}"));
    assert!(lost.starts_with("0 (0"), "lost: {lost}\n{text}");
    assert!(text.contains("tot_recv_msgs=2000"), "{text}");
    relay.wait_metric(
        &format!(
            r#"turnpike_relay_allocation_requests_total{{result="ok",transport="{transport}"}}"#
        ),
        10.0,
    );
    relay.wait_metric(
        &format!(
            r#"turnpike_relay_packets_total{{direction="client_to_peer",framing="indication",transport="{transport}"}}"#
        ),
        2000.0,
    );
    relay.wait_metric(
        &format!(
            r#"turnpike_relay_packets_total{{direction="peer_to_client",framing="indication",transport="{transport}"}}"#
        ),
        2000.0,
    );
    assert_eq!(
        relay.metric(r#"turnpike_relay_allocation_requests_total{result="ok",transport="udp"}"#),
        0.0,
        "every allocation came over {transport}"
    );
}

#[test]
fn coturn_uclient_over_tcp_relays_with_zero_loss() {
    let (relay, tcp) = start_stream_relay("uclient-tcp", "tcp://127.0.0.1:0", false);
    uclient_over_stream(&relay, tcp, "tcp", &["-t"]);
}

#[test]
fn coturn_uclient_over_tls_relays_with_zero_loss() {
    let (relay, tls) = start_stream_relay("uclient-tls", "tls://127.0.0.1:0", true);
    // -t -S is TLS over TCP; -S alone would be DTLS.
    uclient_over_stream(&relay, tls, "tls", &["-t", "-S"]);
}

/// A TLS client that trusts exactly `cert_pem`, over a blocking socket.
fn tls_connect(
    addr: SocketAddr,
    cert_pem: &str,
) -> Result<rustls::StreamOwned<rustls::ClientConnection, std::net::TcpStream>, String> {
    use rustls::pki_types::pem::PemObject as _;
    let cert = rustls::pki_types::CertificateDer::from_pem_slice(cert_pem.as_bytes()).unwrap();
    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert).unwrap();
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = vec![b"stun.turn".to_vec()];
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let conn = rustls::ClientConnection::new(std::sync::Arc::new(cfg), name).unwrap();
    let sock = std::net::TcpStream::connect(addr).unwrap();
    sock.set_read_timeout(Some(WAIT)).unwrap();
    let mut tls = rustls::StreamOwned::new(conn, sock);
    // Drive the handshake to completion (or failure) now.
    while tls.conn.is_handshaking() {
        tls.conn
            .complete_io(&mut tls.sock)
            .map_err(|e| e.to_string())?;
    }
    Ok(tls)
}

/// Sends a Binding request on a stream and reads its answer.
fn binding_over<S: std::io::Read + std::io::Write>(stream: &mut S, tid: [u8; 12]) {
    use relay_proto::stun::{method, stream_frame_len, Class, Encoder, Message};
    let mut req = Vec::new();
    Encoder::new(&mut req, method::BINDING, Class::Request, tid).finish();
    stream.write_all(&req).unwrap();
    stream.flush().unwrap();
    let mut buf = Vec::new();
    let mut chunk = [0u8; 512];
    let len = loop {
        if let Ok(Some(n)) = stream_frame_len(&buf, 65_552) {
            break n;
        }
        let n = stream.read(&mut chunk).unwrap();
        assert!(n > 0, "connection closed before the Binding answer");
        buf.extend_from_slice(&chunk[..n]);
    };
    let msg = Message::parse(&buf[..len]).unwrap();
    assert_eq!(msg.class(), Class::Success);
    assert_eq!(msg.transaction_id(), tid);
}

#[test]
fn sighup_reloads_the_tls_certificate_without_dropping_connections() {
    let (relay, addr) = start_stream_relay("reload", "tls://127.0.0.1:0", true);
    let dir = std::env::temp_dir().join(format!("turnpike-cli-{}-reload", std::process::id()));
    let first = std::fs::read_to_string(dir.join("cert.pem")).unwrap();
    let mut old = tls_connect(addr, &first).expect("the first certificate is served");
    binding_over(&mut old, [1; 12]);

    // Replace the files, then SIGHUP.
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    let second = ck.cert.pem();
    std::fs::write(dir.join("cert.pem"), &second).unwrap();
    std::fs::write(dir.join("key.pem"), ck.signing_key.serialize_pem()).unwrap();
    let pid = relay.child.id().to_string();
    assert!(Command::new("kill")
        .args(["-HUP", &pid])
        .status()
        .unwrap()
        .success());

    // New handshakes get the new certificate (the signal is handled asynchronously).
    let deadline = Instant::now() + WAIT;
    let mut new = loop {
        match tls_connect(addr, &second) {
            Ok(c) => break c,
            Err(e) => {
                assert!(
                    Instant::now() < deadline,
                    "new certificate never served: {e}"
                );
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    };
    binding_over(&mut new, [2; 12]);
    assert!(
        tls_connect(addr, &first).is_err(),
        "the old certificate is no longer presented"
    );
    // The connection made before the reload is still up.
    binding_over(&mut old, [3; 12]);
}
