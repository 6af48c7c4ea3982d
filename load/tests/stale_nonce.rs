//! Setup against a scripted TURN server built from the codec: the 401 challenge, a 438 retried
//! once with the fresh nonce, a second 438 failing the setup with its code. The scripted server
//! relays nothing, so the run also shows every packet counted as lost.
#![allow(clippy::unwrap_used)]

use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use relay_proto::stun::{attr, code, Attrs, Class, Encoder, Message};
use turnpike_load::{Auth, Config, Mode, Rate};

struct Scripted {
    addr: SocketAddr,
    stale_sent: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Scripted {
    /// Answers: no NONCE → 401 with nonce "n1"; "n1" → 438 with "n2"; "n2" → success, or, when
    /// `always_stale`, 438 again with "n3".
    fn start(always_stale: bool) -> Self {
        let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(50)))
            .unwrap();
        let addr = sock.local_addr().unwrap();
        let stale_sent = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (stale, halt) = (stale_sent.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            let mut buf = [0u8; 2048];
            while !halt.load(Ordering::Relaxed) {
                let Ok((n, from)) = sock.recv_from(&mut buf) else {
                    continue;
                };
                let Ok(msg) = Message::parse(&buf[..n]) else {
                    continue; // ChannelData: dropped
                };
                let a = Attrs::decode(&msg).unwrap();
                let mut out = Vec::new();
                let tid = msg.transaction_id();
                let m = msg.method();
                let fail = |out: &mut Vec<u8>, c: u16, nonce: &[u8]| {
                    let mut e = Encoder::new(out, m, Class::Error, tid);
                    e.error_code(c)
                        .attr(attr::REALM, b"example.org")
                        .attr(attr::NONCE, nonce);
                    e.finish();
                };
                match a.nonce {
                    None => fail(&mut out, code::UNAUTHENTICATED, b"n1"),
                    Some(b"n1") => {
                        stale.fetch_add(1, Ordering::Relaxed);
                        fail(&mut out, code::STALE_NONCE, b"n2");
                    }
                    Some(_) if always_stale => {
                        stale.fetch_add(1, Ordering::Relaxed);
                        fail(&mut out, code::STALE_NONCE, b"n3");
                    }
                    Some(_) => {
                        let mut e = Encoder::new(&mut out, m, Class::Success, tid);
                        e.xor_address(attr::XOR_RELAYED_ADDRESS, "127.0.0.1:9".parse().unwrap());
                        e.finish();
                    }
                }
                let _ = sock.send_to(&out, from);
            }
        });
        Self {
            addr,
            stale_sent,
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Scripted {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn config(server: SocketAddr) -> Config {
    let mut c = Config::new(server, Auth::Secret("scripted-secret".into()));
    c.allocations = 2;
    c.mode = Mode::ClientToClient;
    c.rate = Rate::Fixed(200);
    c.duration = Duration::from_millis(300);
    c.drain = Duration::from_millis(100);
    c.progress_interval = None;
    c
}

#[test]
fn stale_nonce_is_retried_once_and_unrelayed_packets_are_lost() {
    let server = Scripted::start(false);
    let s = turnpike_load::run(&config(server.addr), &mut |_| {}).unwrap();
    // One 438 per allocation, on its first signed Allocate; the nonce then stays fresh.
    assert_eq!(server.stale_sent.load(Ordering::Relaxed), 2);
    assert!(s.sent > 0);
    assert_eq!((s.received, s.lost), (0, s.sent));
    assert_eq!(s.loss_pct, 100.0);
    assert_eq!((s.silent_flows, &s.silent_flow_ids[..]), (2, &[0, 1][..]));
    assert!(s.latency_us.p50.is_none(), "no samples, no percentiles");
    let v: serde_json::Value = serde_json::from_str(&s.to_json()).unwrap();
    assert!(v["latency_us"]["p50"].is_null());
    assert_eq!(s.released, 2);
}

#[test]
fn a_second_stale_nonce_fails_setup_with_438() {
    let server = Scripted::start(true);
    let e = turnpike_load::run(&config(server.addr), &mut |_| {}).unwrap_err();
    assert_eq!(e.stun_code(), Some(438), "{e}");
    assert!(e.to_string().contains("Allocate"), "{e}");
}
