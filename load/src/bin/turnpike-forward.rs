//! `turnpike-forward`: the bare UDP forwarder that is the baseline of the client-to-peer
//! benchmark (`turnpike-load --mode raw-to-peer`, `bench/compare.sh`).
//!
//! ```text
//! turnpike-forward --listen 127.0.0.1:0 --upstream <echo peer address>
//! ```
//!
//! Prints `forward listening on ADDR` once bound. Every client address seen on the listen socket
//! gets one upstream UDP socket of its own, connected to the upstream address (as a TURN relay
//! gives each allocation a relayed socket). A datagram from a client leaves with one `send` from
//! that client's upstream socket; a datagram arriving on an upstream socket leaves with one
//! `send_to` from the listen socket to its client. No TURN, no batching: exactly one receive
//! and one send per datagram, on one thread, which is the floor with plain system calls.

use std::collections::HashMap;
use std::io::{self, Write as _};
use std::net::SocketAddr;
use std::process::ExitCode;

use mio::net::UdpSocket;
use mio::{Events, Interest, Poll, Token};

const LISTEN: Token = Token(usize::MAX);
const USAGE: &str = "usage: turnpike-forward --listen HOST:PORT --upstream HOST:PORT";

fn args() -> Result<(SocketAddr, SocketAddr), String> {
    let (mut listen, mut upstream) = (None, None);
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        let slot = match a.as_str() {
            "--listen" => &mut listen,
            "--upstream" => &mut upstream,
            "-h" | "--help" => return Err(USAGE.into()),
            _ => return Err(format!("unknown argument {a}\n{USAGE}")),
        };
        let v = it.next().ok_or_else(|| format!("{a} needs a value"))?;
        *slot = Some(v.parse().map_err(|e| format!("{a} {v}: {e}"))?);
    }
    match (listen, upstream) {
        (Some(l), Some(u)) => Ok((l, u)),
        _ => Err(USAGE.into()),
    }
}

/// Counts a failed send (full buffer, ICMP error) and goes on: the datagram is dropped.
fn sent(r: io::Result<usize>, dropped: &mut u64) {
    if r.is_err() {
        *dropped += 1;
    }
}

fn run(listen: SocketAddr, upstream: SocketAddr) -> io::Result<()> {
    let mut poll = Poll::new()?;
    let mut events = Events::with_capacity(1024);
    // The same kernel buffers Turnpike asks for on its listeners (4 MiB), so bursts are absorbed
    // alike and the comparison is of the forwarding work only.
    let std_front = std::net::UdpSocket::bind(listen)?;
    let sock = socket2::SockRef::from(&std_front);
    // Best effort: capped by net.core.rmem_max / wmem_max, as for Turnpike.
    let _ = sock.set_recv_buffer_size(4 << 20);
    let _ = sock.set_send_buffer_size(4 << 20);
    std_front.set_nonblocking(true)?;
    let mut front = UdpSocket::from_std(std_front);
    poll.registry()
        .register(&mut front, LISTEN, Interest::READABLE)?;
    let mut out = io::stdout().lock();
    writeln!(out, "forward listening on {}", front.local_addr()?)?;
    out.flush()?;
    drop(out);
    let any: SocketAddr = if upstream.is_ipv6() {
        "[::]:0".parse().map_err(io::Error::other)?
    } else {
        "0.0.0.0:0".parse().map_err(io::Error::other)?
    };
    let mut index: HashMap<SocketAddr, usize> = HashMap::new();
    let mut ups: Vec<(UdpSocket, SocketAddr)> = Vec::new();
    let mut buf = vec![0u8; 65536];
    let mut dropped = 0u64;
    loop {
        match poll.poll(&mut events, None) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
        for ev in events.iter() {
            // Edge-triggered: read until the socket is empty.
            loop {
                if ev.token() == LISTEN {
                    let (n, from) = match front.recv_from(&mut buf) {
                        Ok(r) => r,
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                        Err(_) => continue,
                    };
                    let i = match index.get(&from) {
                        Some(&i) => i,
                        None => {
                            let mut s = UdpSocket::bind(any)?;
                            s.connect(upstream)?;
                            poll.registry().register(
                                &mut s,
                                Token(ups.len()),
                                Interest::READABLE,
                            )?;
                            ups.push((s, from));
                            index.insert(from, ups.len() - 1);
                            ups.len() - 1
                        }
                    };
                    sent(ups[i].0.send(&buf[..n]), &mut dropped);
                } else {
                    let (s, client) = &ups[ev.token().0];
                    let n = match s.recv(&mut buf) {
                        Ok(n) => n,
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                        Err(_) => continue,
                    };
                    sent(front.send_to(&buf[..n], *client), &mut dropped);
                }
            }
        }
    }
}

fn main() -> ExitCode {
    let (listen, upstream) = match args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("turnpike-forward: {e}");
            return ExitCode::from(1);
        }
    };
    match run(listen, upstream) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("turnpike-forward: {e}");
            ExitCode::from(1)
        }
    }
}
