//! Any `turnpike` command (`serve`, `relay`, `control`, `signal`) as a child process, with the
//! addresses it printed.

#![allow(dead_code, clippy::unwrap_used)]

use std::net::SocketAddr;
use std::time::Duration;

use super::serve::{raw_http, WAIT};

/// A running `turnpike COMMAND --config F`, killed on drop, with the addresses it printed.
pub(crate) struct Node {
    child: std::process::Child,
    /// `(what, scheme, address)` of every "turnpike: WHAT listening on SCHEME://ADDRESS" line.
    pub(crate) listening: Vec<(String, String, String)>,
}

impl Node {
    pub(crate) fn start(command: &str, config: &std::path::Path) -> Self {
        use std::io::BufRead as _;
        let mut child = std::process::Command::new(super::serve::BIN)
            .args([command, "--config", config.to_str().unwrap()])
            .env_remove("TURNPIKE_CONFIG")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let out = std::io::BufReader::new(child.stdout.take().unwrap());
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for l in out.lines().map_while(Result::ok) {
                if tx.send(l).is_err() {
                    break;
                }
            }
        });
        // Readiness: every listener is printed once bound, the admin listener's last.
        let mut listening = Vec::new();
        loop {
            let line = rx
                .recv_timeout(WAIT)
                .expect("the node prints its addresses");
            let Some((what, addr)) = line
                .strip_prefix("turnpike: ")
                .and_then(|l| l.split_once(" listening on "))
            else {
                continue;
            };
            let (scheme, addr) = addr.split_once("://").unwrap_or(("", addr));
            listening.push((what.to_owned(), scheme.to_owned(), addr.to_owned()));
            if what == "admin" {
                break;
            }
        }
        Self { child, listening }
    }

    /// The address of the first `what` listener (`signal`, `control`, `admin`, `relay`).
    pub(crate) fn addr(&self, what: &str) -> SocketAddr {
        self.addr_of(what, None)
    }

    /// The address of the first `what` listener with `scheme` (`udp`, `tcp`, `tls`, `http`)
    /// when given.
    pub(crate) fn addr_of(&self, what: &str, scheme: Option<&str>) -> SocketAddr {
        self.listening
            .iter()
            .find(|(w, s, _)| w == what && scheme.is_none_or(|want| s == want))
            .unwrap_or_else(|| panic!("no {what} {scheme:?} listener in {:?}", self.listening))
            .2
            .parse()
            .unwrap()
    }

    /// The value of `series` on the node's `/metrics` (0 when absent).
    pub(crate) fn metric(&self, series: &str) -> f64 {
        let (_, body) = raw_http(self.addr("admin"), "GET", "/metrics", None, None);
        body.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or(0.0)
    }

    /// Waits until `series` reaches `at_least`.
    pub(crate) async fn wait_metric(&self, series: &str, at_least: f64) {
        self.wait_metric_sum(&[series], at_least).await;
    }

    /// The sum of the values of `series` (each 0 when absent).
    pub(crate) fn metric_sum(&self, series: &[&str]) -> f64 {
        series.iter().map(|s| self.metric(s)).sum()
    }

    /// Waits until the sum of `series` reaches `at_least`.
    pub(crate) async fn wait_metric_sum(&self, series: &[&str], at_least: f64) {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let v = self.metric_sum(series);
            if v >= at_least {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{series:?} stayed at {v} in all"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
