//! `turnpike serve` as a child process for the binary's end-to-end tests, and plain-std HTTP.

#![allow(dead_code, clippy::unwrap_used, clippy::print_stdout)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::Value;

pub(crate) const BIN: &str = env!("CARGO_BIN_EXE_turnpike");
/// Upper bound on anything the tests wait for (a loaded 2-core CI machine).
pub(crate) const WAIT: Duration = Duration::from_secs(20);
pub(crate) const SECRET: &str = "control-e2e-relay-secret-0123456789";
pub(crate) const ADMIN: &str = "control-e2e-admin-token-0123";

/// A configuration for `turnpike serve` on free ports: relay on UDP, control plane, admin, and
/// `extra` (a `[store]` section, or nothing).
pub(crate) fn config(name: &str, extra: &str) -> PathBuf {
    config_with(name, &["udp://127.0.0.1:0"], extra)
}

/// [`config`] with the relay on `listen`. `extra` is appended: whole sections (`[store]`,
/// `[relay.tls]`, …), in a directory of their own that the test may also use.
pub(crate) fn config_with(name: &str, listen: &[&str], extra: &str) -> PathBuf {
    let path = config_dir(name).join("turnpike.toml");
    let listen: Vec<String> = listen.iter().map(|l| format!("\"{l}\"")).collect();
    let listen = listen.join(", ");

    std::fs::write(
        &path,
        format!(
            r#"
[relay]
realm = "example.org"
listen = [{listen}]
relay-ip = "127.0.0.1"
secrets = ["{SECRET}"]
allow-peers = ["127.0.0.0/8"]
threads = 2

[control]
listen = "127.0.0.1:0"
admin-token = "{ADMIN}"
hash-key = "control-e2e-hash-key-0123456789"
jwt-keys = [{{ kid = "k1", secret = "control-e2e-jwt-secret-0123456789abcdef" }}]

{extra}

[admin]
listen = "127.0.0.1:0"
"#
        ),
    )
    .unwrap();
    path
}

/// A directory of this test process for `name`'s files (configuration, certificates).
pub(crate) fn config_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("turnpike-e2e-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A running `turnpike serve`, killed on drop.
pub(crate) struct Serve {
    pub(crate) child: Child,
    pub(crate) udp: SocketAddr,
    pub(crate) control: SocketAddr,
    pub(crate) admin: SocketAddr,
    /// Lines printed before the admin address (the generated secrets of the embedded default).
    pub(crate) printed: Vec<String>,
}

impl Serve {
    pub(crate) fn start(args: &[&str], env: &[(&str, &str)]) -> Self {
        let mut cmd = Command::new(BIN);
        cmd.arg("serve")
            .args(args)
            .env_remove("TURNPIKE_CONFIG")
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().unwrap();
        let (tx, lines) = mpsc::channel();
        let out = BufReader::new(child.stdout.take().unwrap());
        std::thread::spawn(move || {
            for l in out.lines().map_while(Result::ok) {
                if tx.send(l).is_err() {
                    break;
                }
            }
        });
        let (mut udp, mut control, mut printed) = (None, None, Vec::new());
        // Readiness: the addresses are printed once bound, the admin listener's last.
        let admin = loop {
            let line = lines
                .recv_timeout(WAIT)
                .expect("serve prints its addresses");
            if let Some(a) = line.strip_prefix("turnpike: relay listening on udp://") {
                udp = Some(a.parse().unwrap());
            }
            if let Some(a) = line.strip_prefix("turnpike: control listening on http://") {
                control = Some(a.parse().unwrap());
            }
            if let Some(a) = line.strip_prefix("turnpike: admin listening on http://") {
                break a.parse().unwrap();
            }
            printed.push(line);
        };
        Self {
            child,
            udp: udp.expect("a UDP relay listener"),
            control: control.expect("a control listener"),
            admin,
            printed,
        }
    }

    pub(crate) fn with_config(path: &std::path::Path) -> Self {
        Self::start(&["--config", path.to_str().unwrap()], &[])
    }

    /// A value printed as "turnpike: PREFIX VALUE".
    pub(crate) fn printed(&self, prefix: &str) -> String {
        self.printed
            .iter()
            .find_map(|l| l.strip_prefix(prefix))
            .unwrap_or_else(|| panic!("{prefix} not printed: {:?}", self.printed))
            .to_owned()
    }

    pub(crate) fn api(
        &self,
        method: &str,
        path: &str,
        bearer: Option<&str>,
        body: Option<Value>,
    ) -> (u16, Value) {
        http(self.control, method, path, bearer, body)
    }

    pub(crate) fn metric(&self, series: &str) -> f64 {
        let (_, body) = raw_http(self.admin, "GET", "/metrics", None, None);
        body.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or(0.0)
    }

    pub(crate) fn wait_metric(&self, series: &str, at_least: f64) {
        let deadline = Instant::now() + WAIT;
        loop {
            let v = self.metric(series);
            if v >= at_least {
                return;
            }
            assert!(Instant::now() < deadline, "{series} stayed at {v}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Waits until `/ready` answers `want`.
    pub(crate) fn wait_ready(&self, want: u16) {
        let deadline = Instant::now() + WAIT;
        loop {
            let (status, _) = raw_http(self.admin, "GET", "/ready", None, None);
            if status == want {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "/ready stayed {status}, want {want}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One HTTP/1.1 request with plain std (no HTTP client dependency); the status and body.
pub(crate) fn raw_http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    bearer: Option<&str>,
    body: Option<&str>,
) -> (u16, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(WAIT)).unwrap();
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n");
    if let Some(b) = bearer {
        req += &format!("Authorization: Bearer {b}\r\n");
    }
    let body = body.unwrap_or("");
    if !body.is_empty() {
        req += &format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            body.len()
        );
    }
    req += "\r\n";
    req += body;
    s.write_all(req.as_bytes()).unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    let status = resp[9..12].parse().unwrap();
    let (head, body) = resp.split_once("\r\n\r\n").unwrap_or((&resp, ""));
    // Small bodies may come chunked: undo it.
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        dechunk(body)
    } else {
        body.to_owned()
    };
    (status, body)
}

pub(crate) fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((len, rest)) = s.split_once("\r\n") {
        let n = usize::from_str_radix(len.trim(), 16).unwrap_or(0);
        if n == 0 {
            break;
        }
        out += &rest[..n];
        s = &rest[n + 2..];
    }
    out
}

pub(crate) fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    bearer: Option<&str>,
    body: Option<Value>,
) -> (u16, Value) {
    let body = body.map(|b| b.to_string());
    let (status, text) = raw_http(addr, method, path, bearer, body.as_deref());
    let v = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{method} {path}: {e}: {text}"));
    (status, v)
}
