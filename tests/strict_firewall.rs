//! Turnpike as the way out of a strict firewall, with real Linux network namespaces.
//!
//! The test builds its own little network from namespaces and veth pairs (nothing in the root
//! namespace is touched, every address is inside the namespaces):
//!
//! ```text
//!   client  10.231.1.2 ──┐                      ┌── 10.231.2.2  peer (turnutils_peer, UDP echo)
//!   (firewall: only      │ 10.231.1.1           │ 10.231.2.1 = relay-ip
//!    tcp to core:443)    └────────── core ──────┘
//!                                  (turnpike: udp 3478/3479, tls 443; forwards IPv4)
//!   natclient 10.231.4.2 ── 10.231.4.1 nat 10.231.3.2 ── 10.231.3.1 core
//!                           (MASQUERADE --random: a symmetric NAT)
//! ```
//!
//! It proves that a client whose firewall drops all UDP and all TCP except to the relay's port
//! 443 reaches the peer through Turnpike over TLS, while the same client cannot reach the peer
//! (nor Turnpike's UDP port) directly; and that a client behind a symmetric NAT relays over UDP.
//!
//! Needs root (namespaces, iptables). Without it the test prints a loud SKIPPED banner and
//! returns, except in CI (`CI=true`), where it fails instead of passing silently.
#![allow(clippy::unwrap_used, clippy::print_stdout)]

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_turnpike");
const SECRET: &str = "strict-firewall-secret-0123456789";
/// Upper bound on anything the test waits for (a loaded 2-core CI machine).
const WAIT: Duration = Duration::from_secs(20);

/// The client link (client <-> core).
const CORE_ON_CLIENT: &str = "10.231.1.1";
const CLIENT: &str = "10.231.1.2";
/// The peer link (core <-> peer); core's end is the relay-ip.
const CORE_ON_PEER: &str = "10.231.2.1";
const PEER: &str = "10.231.2.2";
const PEER_NET: &str = "10.231.2.0/24";
const PEER_PORT: u16 = 3480;
/// The NAT's uplink (nat <-> core).
const CORE_ON_NAT: &str = "10.231.3.1";
const NAT_OUTSIDE: &str = "10.231.3.2";
/// Behind the NAT (natclient <-> nat).
const NAT_INSIDE: &str = "10.231.4.1";
const NAT_CLIENT: &str = "10.231.4.2";

/// Tools the test runs (coturn provides the two turnutils_*).
const TOOLS: &[&str] = &[
    "ip",
    "iptables",
    "ss",
    "turnutils_uclient",
    "turnutils_peer",
    "python3",
    "curl",
    "openssl",
];

/// A UDP probe: `probe.py echo|stun SRC_PORT IP:PORT...` sends, from one socket bound to
/// SRC_PORT, a datagram (echo) or a STUN Binding request (stun) to each target in turn and
/// prints one line per target: "BLOCKED" when the local firewall refuses the send (EPERM from
/// an OUTPUT DROP), "NO-ANSWER" after 2 s of silence, "ANSWER" for the echo, or "MAPPED IP:PORT"
/// (the XOR-MAPPED-ADDRESS) for a Binding response.
const PROBE: &str = r#"
import os, socket, struct, sys
mode, sport = sys.argv[1], int(sys.argv[2])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", sport))
s.settimeout(2.0)
for target in sys.argv[3:]:
    ip, port = target.split(":")
    if mode == "stun":
        msg = struct.pack("!HHI", 1, 0, 0x2112A442) + os.urandom(12)
    else:
        msg = b"strict-firewall-probe-" + os.urandom(8).hex().encode()
    try:
        s.sendto(msg, (ip, int(port)))
    except PermissionError:
        print("BLOCKED", flush=True)
        continue
    try:
        data, _ = s.recvfrom(4096)
    except socket.timeout:
        print("NO-ANSWER", flush=True)
        continue
    if mode != "stun":
        print("ANSWER" if data == msg else "WRONG-ANSWER", flush=True)
        continue
    out, i = "ANSWER-WITHOUT-MAPPED-ADDRESS", 20
    while i + 4 <= len(data):
        t, n = struct.unpack("!HH", data[i:i + 4])
        if t == 0x0020 and n == 8:
            p = struct.unpack("!H", data[i + 6:i + 8])[0] ^ 0x2112
            a = bytes(x ^ y for x, y in zip(data[i + 8:i + 12], b"\x21\x12\xa4\x42"))
            out = "MAPPED %s:%d" % (socket.inet_ntoa(a), p)
        i += 4 + (n + 3) // 4 * 4
    print(out, flush=True)
"#;

/// A child process killed (and reaped) when dropped.
struct Proc {
    name: String,
    child: Child,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Everything the test creates: namespaces (their veths go with them), long-running processes
/// and a temporary directory. Dropping it, also on a failed assertion, removes all of it.
struct Lab {
    prefix: String,
    namespaces: Vec<String>,
    procs: Vec<Proc>,
    dir: PathBuf,
}

impl Lab {
    fn ns(&self, short: &str) -> String {
        format!("{}{short}", self.prefix)
    }

    /// `ip netns add`; an error is returned (not a panic) so the caller can tell "cannot create
    /// namespaces here" from a failure of the test.
    fn add_ns(&mut self, short: &str) -> Result<(), String> {
        let name = self.ns(short);
        let out = run(&["ip", "netns", "add", &name]);
        if !out.status.success() {
            return Err(format!("`ip netns add {name}` failed: {}", out.text.trim()));
        }
        self.namespaces.push(name);
        Ok(())
    }

    /// Runs `args` inside namespace `short`, panicking with its output if it fails.
    fn exec(&self, short: &str, args: &[&str]) -> String {
        let ns = self.ns(short);
        let mut full = vec!["ip", "netns", "exec", &ns];
        full.extend_from_slice(args);
        must(&full)
    }

    /// Runs a command line (split at whitespace) inside namespace `short`; panics if it fails.
    fn sh(&self, short: &str, cmdline: &str) -> String {
        self.exec(short, &words(cmdline))
    }

    /// A veth pair with one end in each namespace (created there directly, so no interface
    /// ever exists in the root namespace), each `[namespace, interface, address]`, up.
    fn link(&self, [a, a_if, a_ip]: [&str; 3], [b, b_if, b_ip]: [&str; 3]) {
        let (na, nb) = (self.ns(a), self.ns(b));
        must(&words(&format!(
            "ip link add {a_if} netns {na} type veth peer name {b_if} netns {nb}"
        )));
        for (ns, ifname, ip) in [(a, a_if, a_ip), (b, b_if, b_ip)] {
            self.sh(ns, &format!("ip addr add {ip}/24 dev {ifname}"));
            self.sh(ns, &format!("ip link set dev {ifname} up"));
        }
    }

    /// Starts a long-running process inside a namespace; it is killed when the lab drops.
    /// Its stdout is returned line by line; its stderr goes to a file named after it.
    fn spawn(&mut self, short: &str, name: &str, args: &[&str]) -> mpsc::Receiver<String> {
        let stderr = std::fs::File::create(self.dir.join(format!("{name}.stderr"))).unwrap();
        let mut child = Command::new("ip")
            .args(["netns", "exec", &self.ns(short)])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {name}: {e}"));
        let (tx, lines) = mpsc::channel();
        let out = BufReader::new(child.stdout.take().unwrap());
        std::thread::spawn(move || {
            for l in out.lines().map_while(Result::ok) {
                if tx.send(l).is_err() {
                    break;
                }
            }
        });
        self.procs.push(Proc {
            name: name.to_owned(),
            child,
        });
        lines
    }

    /// What a spawned process wrote to stderr so far (for failure messages).
    fn stderr_of(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.join(format!("{name}.stderr"))).unwrap_or_default()
    }

    /// Panics unless every spawned process is still running (a crashed relay explains a lot).
    fn assert_alive(&mut self) {
        for p in &mut self.procs {
            if let Ok(Some(status)) = p.child.try_wait() {
                let log = std::fs::read_to_string(self.dir.join(format!("{}.stderr", p.name)));
                panic!("{} exited ({status}):\n{}", p.name, log.unwrap_or_default());
            }
        }
    }

    /// Runs a command inside a namespace with a time limit; returns its exit status and its
    /// stdout followed by its stderr.
    fn exec_timeout(&self, short: &str, args: &[&str], limit: Duration) -> (ExitStatus, String) {
        let mut child = Proc {
            name: args[0].to_owned(),
            child: Command::new("ip")
                .args(["netns", "exec", &self.ns(short)])
                .args(args)
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap_or_else(|e| panic!("starting {}: {e}", args[0])),
        };
        let read_all = |mut r: Box<dyn Read + Send>| {
            std::thread::spawn(move || {
                let mut s = Vec::new();
                let _ = r.read_to_end(&mut s);
                String::from_utf8_lossy(&s).into_owned()
            })
        };
        let out = read_all(Box::new(child.child.stdout.take().unwrap()));
        let err = read_all(Box::new(child.child.stderr.take().unwrap()));
        let deadline = Instant::now() + limit;
        let status = loop {
            if let Some(status) = child.child.try_wait().unwrap() {
                break Some(status);
            }
            if Instant::now() >= deadline {
                // Killed so that its pipes close and what it printed can be shown.
                let _ = child.child.kill();
                let _ = child.child.wait();
                break None;
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let text = out.join().unwrap() + &err.join().unwrap();
        let Some(status) = status else {
            panic!("{args:?} in {short} did not finish within {limit:?}; its output:\n{text}");
        };
        (status, text)
    }

    /// The UDP probe (see [`PROBE`]) from namespace `short`: one result line per target.
    fn probe(&self, short: &str, mode: &str, src_port: u16, targets: &[String]) -> Vec<String> {
        let port = src_port.to_string();
        let mut args = vec!["python3", "-c", PROBE, mode, &port];
        args.extend(targets.iter().map(String::as_str));
        let (status, text) = self.exec_timeout(short, &args, WAIT);
        assert!(status.success(), "probe from {short} failed: {text}");
        let lines: Vec<String> = text.lines().map(str::to_owned).collect();
        assert_eq!(lines.len(), targets.len(), "probe output: {text}");
        lines
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        // Never panics (it also runs while a failed assertion unwinds). Processes first (a
        // namespace lives on while a process is in it), then the namespaces and their veths.
        self.procs.clear();
        let quiet = |args: &[&str]| {
            let out = Command::new(args[0])
                .args(&args[1..])
                .stdin(Stdio::null())
                .output();
            out.map_or_else(
                |e| (false, e.to_string()),
                |o| {
                    (
                        o.status.success(),
                        String::from_utf8_lossy(&o.stdout).into_owned(),
                    )
                },
            )
        };
        for ns in &self.namespaces {
            // Anything still inside a namespace of this run was started by this test.
            for pid in quiet(&["ip", "netns", "pids", ns]).1.split_whitespace() {
                quiet(&["kill", "-KILL", pid]);
            }
            if !quiet(&["ip", "netns", "del", ns]).0 {
                eprintln!("strict_firewall: could not delete network namespace {ns}");
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

struct Output {
    status: ExitStatus,
    text: String,
}

/// Runs a short command (no namespace) to completion.
fn run(args: &[&str]) -> Output {
    let out = Command::new(args[0])
        .args(&args[1..])
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("running {args:?}: {e}"));
    Output {
        status: out.status,
        text: String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr),
    }
}

fn must(args: &[&str]) -> String {
    let out = run(args);
    assert!(out.status.success(), "{args:?} failed: {}", out.text);
    out.text
}

fn on_path(tool: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
}

/// The test cannot run here. Outside CI: a loud banner and the test returns. In CI: a failure.
fn cannot_run(reason: &str) {
    let ci = std::env::var("CI").as_deref() == Ok("true");
    let verdict = if ci { "FAILED (CI=true)" } else { "SKIPPED" };
    let banner = "!".repeat(78);
    let msg = format!(
        "{banner}\n!! strict_firewall: {verdict}: cannot build the network namespaces: {reason}\n\
         !! This test needs root, `ip netns`, veth and iptables (run scripts/test.sh as root).\n\
         {banner}"
    );
    // In CI a test that cannot run must fail, not pass silently.
    assert!(!ci, "{msg}");
    eprintln!("{msg}");
}

/// The value of one Prometheus series on the relay's admin listener (inside core), 0 if absent.
fn metric(lab: &Lab, admin_port: u16, series: &str) -> f64 {
    let url = format!("http://127.0.0.1:{admin_port}/metrics");
    let body = lab.exec("core", &["curl", "-sS", "--max-time", "5", &url]);
    body.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(0.0)
}

fn wait_metric(lab: &Lab, admin_port: u16, series: &str, at_least: f64) -> f64 {
    let deadline = Instant::now() + WAIT;
    loop {
        let v = metric(lab, admin_port, series);
        if v >= at_least {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "{series} stayed at {v} (< {at_least})"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Runs coturn's client (arguments as one line) inside a namespace and checks that all `n`
/// messages came back.
fn uclient_zero_loss(lab: &Lab, short: &str, args: &str, n: u32) -> String {
    let cmdline = format!("turnutils_uclient {args}");
    let (_, text) = lab.exec_timeout(short, &words(&cmdline), WAIT);
    let lost = text
        .lines()
        .find_map(|l| l.split("Total lost packets ").nth(1))
        .unwrap_or_else(|| panic!("no loss report in uclient output ({short}):\n{text}"));
    assert!(lost.starts_with("0 (0"), "{short}: lost {lost}\n{text}");
    let all = format!("tot_recv_msgs={n}");
    assert!(
        text.contains(&all),
        "{short}: not all {n} messages came back:\n{text}"
    );
    text
}

/// A self-signed P-256 certificate and its key, PEM, made with the openssl CLI.
fn self_signed_cert(dir: &Path) -> (PathBuf, PathBuf) {
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    let mut args = words(
        "openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 1 \
         -subj /CN=turn.strict-firewall.test",
    );
    args.extend([
        "-keyout",
        key.to_str().unwrap(),
        "-out",
        cert.to_str().unwrap(),
    ]);
    must(&args);
    (cert, key)
}

fn words(cmdline: &str) -> Vec<&str> {
    cmdline.split_whitespace().collect()
}

#[test]
fn tls_on_443_escapes_a_strict_firewall_and_udp_crosses_a_symmetric_nat() {
    let started = Instant::now();

    // --- Can this machine build the lab at all? -------------------------------------------
    let uid = run(&["id", "-u"]).text;
    if uid.trim() != "0" {
        return cannot_run(&format!("not root (uid {})", uid.trim()));
    }
    if let Some(missing) = TOOLS.iter().find(|t| !on_path(t)) {
        return cannot_run(&format!("`{missing}` is not installed"));
    }
    let pid = std::process::id();
    let dir = std::env::temp_dir().join(format!("turnpike-strict-firewall-{pid}"));
    std::fs::create_dir_all(&dir).unwrap();
    let mut lab = Lab {
        prefix: format!("tpfw{pid}-"),
        namespaces: Vec::new(),
        procs: Vec::new(),
        dir,
    };
    if let Err(e) = lab.add_ns("core") {
        return cannot_run(&e);
    }
    let iptables = run(&["ip", "netns", "exec", &lab.ns("core"), "iptables", "-S"]);
    if !iptables.status.success() {
        return cannot_run(&format!("iptables in a namespace: {}", iptables.text));
    }

    // --- The network --------------------------------------------------------------------
    for n in ["client", "peer", "nat", "natclient"] {
        lab.add_ns(n).unwrap();
    }
    for n in ["core", "client", "peer", "nat", "natclient"] {
        lab.sh(n, "ip link set dev lo up");
    }
    lab.link(
        ["core", "to-client", CORE_ON_CLIENT],
        ["client", "uplink", CLIENT],
    );
    lab.link(["core", "to-peer", CORE_ON_PEER], ["peer", "uplink", PEER]);
    lab.link(
        ["core", "to-nat", CORE_ON_NAT],
        ["nat", "uplink", NAT_OUTSIDE],
    );
    lab.link(
        ["nat", "downlink", NAT_INSIDE],
        ["natclient", "uplink", NAT_CLIENT],
    );
    for (n, gw) in [
        ("client", CORE_ON_CLIENT),
        ("peer", CORE_ON_PEER),
        ("nat", CORE_ON_NAT),
        ("natclient", NAT_INSIDE),
    ] {
        lab.sh(n, &format!("ip route add default via {gw}"));
    }
    // core routes between the client, the peer and the NAT's outside; nat forwards and hides
    // natclient behind its outside address with a fresh random port per flow (symmetric NAT).
    // core has no route to natclient's network: only the NAT's translation reaches it.
    for n in ["core", "nat"] {
        lab.exec(n, &["sh", "-c", "echo 1 > /proc/sys/net/ipv4/ip_forward"]);
    }
    lab.sh(
        "nat",
        "iptables -t nat -A POSTROUTING -o uplink -j MASQUERADE --random",
    );

    // --- The echo peer and the relay ----------------------------------------------------
    lab.spawn(
        "peer",
        "turnutils_peer",
        &words(&format!("turnutils_peer -p {PEER_PORT} -L {PEER}")),
    );
    let (cert, key) = self_signed_cert(&lab.dir);
    let config = lab.dir.join("turnpike.toml");
    std::fs::write(
        &config,
        format!(
            r#"
[relay]
realm = "strict-firewall.test"
listen = ["udp://0.0.0.0:3478", "udp://0.0.0.0:3479", "tls://0.0.0.0:443"]
relay-ip = "{CORE_ON_PEER}"
secrets = ["{SECRET}"]
allow-peers = ["{PEER_NET}"]
threads = 2

[relay.tls]
cert-file = "{}"
key-file = "{}"

[admin]
listen = "127.0.0.1:0"
"#,
            cert.display(),
            key.display()
        ),
    )
    .unwrap();
    let config = config.to_str().unwrap();
    let relay_lines = lab.spawn(
        "core",
        "turnpike",
        &["env", "RUST_LOG=info", BIN, "relay", "--config", config],
    );

    // Readiness: the relay prints its bound addresses once its sockets are open ...
    let (mut tls, mut udp, mut admin_port) = (false, false, None::<u16>);
    let deadline = Instant::now() + WAIT;
    while !(tls && udp && admin_port.is_some()) {
        let left = deadline.saturating_duration_since(Instant::now());
        let Ok(line) = relay_lines.recv_timeout(left) else {
            lab.assert_alive();
            let log = lab.stderr_of("turnpike");
            panic!("turnpike printed no readiness lines within {WAIT:?}:\n{log}");
        };
        println!("{line}");
        tls |= line == "turnpike: relay listening on tls://0.0.0.0:443";
        udp |= line == "turnpike: relay listening on udp://0.0.0.0:3478";
        if let Some(a) = line.strip_prefix("turnpike: admin listening on http://") {
            admin_port = Some(a.rsplit(':').next().unwrap().parse().unwrap());
        }
    }
    let admin_port = admin_port.unwrap();
    // ... and the echo peer once its UDP socket shows up.
    let deadline = Instant::now() + WAIT;
    let listening = format!("ss -Hlun sport = :{PEER_PORT}");
    while lab.sh("peer", &listening).trim().is_empty() {
        lab.assert_alive();
        let waited = Instant::now() < deadline;
        assert!(waited, "turnutils_peer never listened on {PEER_PORT}");
        std::thread::sleep(Duration::from_millis(50));
    }

    let to_peer = [format!("{PEER}:{PEER_PORT}")];
    let to_relay_udp = [format!("{CORE_ON_CLIENT}:3478")];

    // --- Before the firewall, the client reaches the peer and the relay's UDP port directly,
    // so the silence below is the firewall's doing, not a routing mistake.
    assert_eq!(lab.probe("client", "echo", 40001, &to_peer), ["ANSWER"]);
    let mapped = lab.probe("client", "stun", 40002, &to_relay_udp);
    assert_eq!(mapped, [format!("MAPPED {CLIENT}:40002")]);

    // --- The strict firewall: out only on loopback, replies, and TCP to the relay's 443 ---
    for rule in [
        "-A OUTPUT -o lo -j ACCEPT".to_owned(),
        "-A OUTPUT -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT".to_owned(),
        format!("-A OUTPUT -p tcp -d {CORE_ON_CLIENT} --dport 443 -j ACCEPT"),
        "-A OUTPUT -p udp -j DROP".to_owned(),
        "-A OUTPUT -p tcp -j DROP".to_owned(),
    ] {
        lab.sh("client", &format!("iptables {rule}"));
    }
    let rules = lab.sh("client", "iptables -S OUTPUT");
    println!("[{:.1?}] client firewall:\n{rules}", started.elapsed());

    // (1) TURN over TLS on 443: the client exchanges 50 messages with the peer via Turnpike.
    let text = uclient_zero_loss(
        &lab,
        "client",
        &format!(
            "-t -S -c -s -m 1 -n 50 -l 200 -e {PEER} -r {PEER_PORT} -W {SECRET} -u alice \
             -p 443 {CORE_ON_CLIENT}"
        ),
        50,
    );
    println!(
        "[{:.1?}] TLS client (strict firewall): {}",
        started.elapsed(),
        last_lines(&text, 3)
    );

    // (2) The same client can reach neither the peer directly nor the relay over UDP. New
    // source ports, so no conntrack entry of the probes above counts as "established". Both
    // probes run at once (each waits up to 2 s for an answer that must not come).
    let (direct, relay_udp) = std::thread::scope(|s| {
        let direct = s.spawn(|| lab.probe("client", "echo", 40003, &to_peer));
        let relay_udp = s.spawn(|| lab.probe("client", "stun", 40004, &to_relay_udp));
        (direct.join().unwrap(), relay_udp.join().unwrap())
    });
    println!(
        "[{:.1?}] from the client, direct UDP to the peer: {direct:?}, to the relay: {relay_udp:?}",
        started.elapsed()
    );
    let silent = |r: &[String]| matches!(r, [x] if x == "BLOCKED" || x == "NO-ANSWER");
    assert!(
        silent(&direct),
        "the client reached the peer directly: {direct:?}"
    );
    assert!(
        silent(&relay_udp),
        "the client reached the relay over UDP: {relay_udp:?}"
    );
    // Control: the same probe from the peer-facing side gets its echo right now.
    assert_eq!(lab.probe("core", "echo", 40005, &to_peer), ["ANSWER"]);

    // (3) Behind the symmetric NAT: the relay sees the NAT's outside address, with a different
    // port for each destination (two of the relay's UDP ports, one source socket) ...
    let to_both = [format!("{CORE_ON_NAT}:3478"), format!("{CORE_ON_NAT}:3479")];
    let mapped = lab.probe("natclient", "stun", 40006, &to_both);
    println!("natclient:40006 as the relay sees it: {mapped:?}");
    let prefix = format!("MAPPED {NAT_OUTSIDE}:");
    let ports: Vec<&str> = mapped
        .iter()
        .map(|m| {
            m.strip_prefix(&prefix)
                .unwrap_or_else(|| panic!("not NATed: {mapped:?}"))
        })
        .collect();
    assert_ne!(ports[0], ports[1], "the NAT is not symmetric: {mapped:?}");
    // ... and TURN over UDP works through it.
    let text = uclient_zero_loss(
        &lab,
        "natclient",
        &format!(
            "-c -s -m 1 -n 50 -l 200 -e {PEER} -r {PEER_PORT} -W {SECRET} -u bob -p 3478 \
             {CORE_ON_NAT}"
        ),
        50,
    );
    println!(
        "[{:.1?}] UDP client (symmetric NAT): {}",
        started.elapsed(),
        last_lines(&text, 3)
    );

    // The relay's own account: allocations over TLS and over UDP, and the TLS client's
    // messages relayed both ways.
    lab.assert_alive();
    for transport in ["tls", "udp"] {
        let series = format!(
            r#"turnpike_relay_allocation_requests_total{{result="ok",transport="{transport}"}}"#
        );
        wait_metric(&lab, admin_port, &series, 1.0);
    }
    for dir in ["client_to_peer", "peer_to_client"] {
        let series = format!(
            r#"turnpike_relay_packets_total{{direction="{dir}",framing="indication",transport="tls"}}"#
        );
        wait_metric(&lab, admin_port, &series, 50.0);
    }
    println!("strict_firewall: done in {:?}", started.elapsed());
}

fn last_lines(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join(" | ")
}
