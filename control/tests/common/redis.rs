//! A throwaway `redis-server` for tests: its own free port, no persistence, killed on drop.
//!
//! ```ignore
//! mod common;
//! let server = common::redis::RedisServer::start();
//! let store = control::store::RedisStore::connect(&server.url, metrics).await?;
//! ```
#![allow(dead_code, unreachable_pub)] // Each test binary uses a different part of it.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long a fresh `redis-server` may take to answer `PING`: generous, because a loaded CI
/// machine can be slow to start a process; a healthy one answers in milliseconds.
const READY_DEADLINE: Duration = Duration::from_secs(30);

/// Pause between readiness probes (a poll, not a wait for a fixed time).
const POLL: Duration = Duration::from_millis(10);

/// Attempts at finding a port nobody grabs between our probe and redis-server's bind.
const PORT_ATTEMPTS: usize = 10;

/// A running `redis-server` on 127.0.0.1.
#[derive(Debug)]
pub struct RedisServer {
    /// `redis://127.0.0.1:PORT/`.
    pub url: String,
    /// Its port (stays the same across [`RedisServer::restart`]).
    pub port: u16,
    child: Option<Child>,
}

impl RedisServer {
    /// Starts one on a free port and waits until it answers `PING`. Panics (failing the test)
    /// if `redis-server` cannot be started.
    pub fn start() -> RedisServer {
        for _ in 0..PORT_ATTEMPTS {
            let port = free_port();
            let mut server = RedisServer {
                url: format!("redis://127.0.0.1:{port}/"),
                port,
                child: None,
            };
            if server.spawn() {
                return server;
            }
        }
        panic!("could not start redis-server on a free port");
    }

    /// Kills it (SIGKILL: no goodbye to clients, like a crash) and waits for it to exit.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Kills it if running and starts a new, empty one on the same port.
    pub fn restart(&mut self) {
        self.kill();
        let deadline = Instant::now() + READY_DEADLINE;
        // The port was ours a moment ago; retry in case the old socket lingers briefly.
        while !self.spawn() {
            assert!(
                Instant::now() < deadline,
                "redis-server did not restart on port {}",
                self.port
            );
            std::thread::sleep(POLL);
        }
    }

    /// Stops it answering without closing connections (SIGSTOP), like a hung server.
    pub fn pause(&self) {
        self.signal("-STOP");
    }

    /// Undoes [`RedisServer::pause`] (SIGCONT).
    pub fn resume(&self) {
        self.signal("-CONT");
    }

    fn signal(&self, sig: &str) {
        let child = self.child.as_ref().expect("redis-server is not running");
        let status = Command::new("kill")
            .arg(sig)
            .arg(child.id().to_string())
            .status()
            .expect("run kill");
        assert!(status.success(), "kill {sig} failed");
    }

    /// Spawns on `self.port`; `true` once it answers `PING`, `false` if it exited (port taken).
    fn spawn(&mut self) -> bool {
        let mut child = Command::new("redis-server")
            .args(["--port", &self.port.to_string()])
            .args(["--bind", "127.0.0.1"])
            .args(["--save", ""])
            .args(["--appendonly", "no"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn redis-server (is it installed?)");
        let deadline = Instant::now() + READY_DEADLINE;
        loop {
            if let Ok(Some(_)) = child.try_wait() {
                return false;
            }
            if pong(self.port) {
                self.child = Some(child);
                return true;
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("redis-server on port {} never answered PING", self.port);
            }
            std::thread::sleep(POLL);
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A port that was free a moment ago (redis-server has no `--port 0`).
fn free_port() -> u16 {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind port 0");
    listener.local_addr().expect("local addr").port()
}

/// Whether something on `port` answers `PING` with `+PONG`.
fn pong(port: u16) -> bool {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_secs(1)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
    if s.write_all(b"PING\r\n").is_err() {
        return false;
    }
    let mut buf = [0u8; 7];
    s.read_exact(&mut buf).is_ok() && &buf == b"+PONG\r\n"
}
