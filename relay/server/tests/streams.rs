//! TURN over TCP and TLS end to end: a relay bound to port 0 in this process, raw stream clients
//! built from the codec (so the bytes on the wire are exactly what the test says), a rustls
//! client, UDP peers, and every limit that closes a connection, each proven by its
//! `turnpike_relay_stream_connections_closed_total` reason.
#![allow(clippy::unwrap_used)]

mod common;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use common::{binding_request, recv, unix_now, Running, REALM, SECRET, WAIT};
use relay_proto::stun::{self, attr, method, Class, Encoder, Message, MAGIC_COOKIE};
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};
use tokio::net::{TcpSocket, TcpStream, UdpSocket};
use tokio::time::Instant;
use tokio_rustls::client::TlsStream;

/// The largest frame the relay accepts by default; the tests' readers use the same bound.
const MAX_FRAME: usize = 65_552;

fn closed(reason: &str) -> String {
    format!(r#"turnpike_relay_stream_connections_closed_total{{reason="{reason}"}}"#)
}

fn bindings(transport: &str) -> String {
    format!(r#"turnpike_relay_binding_requests_total{{transport="{transport}"}}"#)
}

/// A self-signed certificate for "localhost" and 127.0.0.1, written as PEM to a temporary
/// directory (removed on drop).
struct CertFiles {
    dir: PathBuf,
    cert: PathBuf,
    key: PathBuf,
    der: CertificateDer<'static>,
}

impl CertFiles {
    fn new(name: &str) -> Self {
        let dir =
            std::env::temp_dir().join(format!("turnpike-streams-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let ck = rcgen::generate_simple_self_signed(vec![
            "localhost".to_owned(),
            "127.0.0.1".to_owned(),
        ])
        .unwrap();
        let cert = dir.join("cert.pem");
        let key = dir.join("key.pem");
        std::fs::write(&cert, ck.cert.pem()).unwrap();
        std::fs::write(&key, ck.signing_key.serialize_pem()).unwrap();
        Self {
            dir,
            cert,
            key,
            der: ck.cert.der().clone(),
        }
    }
}

impl Drop for CertFiles {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A relay with a UDP listener (which [`Running`] needs) and the given stream listeners, `extra`
/// `[relay]` keys, and `[relay.tls]` when `tls` is given.
async fn start(listen: &[&str], extra: &str, tls: Option<&CertFiles>) -> Running {
    let mut all = vec![r#""udp://127.0.0.1:0""#.to_owned()];
    all.extend(listen.iter().map(|l| format!("\"{l}\"")));
    let tls = tls
        .map(|c| {
            format!(
                "[relay.tls]\ncert-file = \"{}\"\nkey-file = \"{}\"\n",
                c.cert.display(),
                c.key.display()
            )
        })
        .unwrap_or_default();
    let text = format!(
        r#"
[relay]
realm = "{REALM}"
listen = [{}]
relay-ip = "127.0.0.1"
relay-ports = "40000-44999"
secrets = ["{SECRET}"]
allow-peers = ["127.0.0.0/8"]
threads = 2
grace-period = "1s"
{extra}
{tls}"#,
        all.join(", ")
    );
    Running::start_with(&text).await
}

/// The bound address of the relay's first stream listener of `transport`.
fn stream_addr(relay: &Running, transport: conf::Transport) -> SocketAddr {
    relay
        .server
        .iter()
        .find(|l| l.transport == transport)
        .map(|l| l.addr)
        .unwrap()
}

/// Polls a metric (published once per shard tick) until it equals `value`.
async fn wait_metric_eq(relay: &Running, series: &str, value: f64) {
    let deadline = Instant::now() + WAIT;
    loop {
        let v = relay.metric(series);
        if v == value {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{series} stayed at {v}, expected {value}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until a counter reaches `value`, then checks it did not pass it.
async fn expect_metric(relay: &Running, series: &str, value: f64) {
    let v = relay.wait_metric(series, value).await;
    assert_eq!(v, value, "{series}");
}

async fn tcp(addr: SocketAddr) -> TcpStream {
    let s = tokio::time::timeout(WAIT, TcpStream::connect(addr))
        .await
        .expect("connect within the deadline")
        .unwrap();
    s.set_nodelay(true).unwrap();
    s
}

/// A byte stream to the relay, cut into frames the way the relay cuts its own input.
struct Conn<S> {
    io: S,
    buf: Vec<u8>,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Conn<S> {
    fn new(io: S) -> Self {
        Self {
            io,
            buf: Vec::new(),
        }
    }

    async fn send(&mut self, bytes: &[u8]) {
        self.io.write_all(bytes).await.unwrap();
        self.io.flush().await.unwrap();
    }

    /// The next STUN message or ChannelData frame (with its stream padding).
    async fn frame(&mut self) -> Vec<u8> {
        tokio::time::timeout(WAIT, async {
            loop {
                if let Some(len) = stun::stream_frame_len(&self.buf, MAX_FRAME).unwrap() {
                    return self.buf.drain(..len).collect::<Vec<u8>>();
                }
                let mut chunk = [0u8; 4096];
                let n = self.io.read(&mut chunk).await.unwrap();
                assert!(n > 0, "connection closed while a frame was expected");
                self.buf.extend_from_slice(&chunk[..n]);
            }
        })
        .await
        .expect("a frame within the deadline")
    }

    /// Waits for the relay to close the connection (end of stream or reset); returns whatever
    /// it sent before.
    async fn expect_closed(&mut self) -> Vec<u8> {
        tokio::time::timeout(WAIT, async {
            let mut chunk = [0u8; 4096];
            loop {
                match self.io.read(&mut chunk).await {
                    Ok(0) | Err(_) => return std::mem::take(&mut self.buf),
                    Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                }
            }
        })
        .await
        .expect("the relay closes the connection within the deadline")
    }

    /// Sends a Binding request and checks the answer: success, same transaction id, and
    /// XOR-MAPPED-ADDRESS = `mapped` (the client's own address as the relay sees it).
    async fn binding(&mut self, tid: [u8; 12], mapped: SocketAddr) {
        self.send(&binding_request(tid)).await;
        let resp = self.frame().await;
        assert_binding_response(&resp, tid, mapped);
    }
}

fn assert_binding_response(resp: &[u8], tid: [u8; 12], mapped: SocketAddr) {
    let msg = Message::parse(resp).unwrap();
    assert_eq!(msg.method(), method::BINDING);
    assert_eq!(msg.class(), Class::Success);
    assert_eq!(msg.transaction_id(), tid);
    let got = msg
        .attributes()
        .find(|(t, _, _)| *t == attr::XOR_MAPPED_ADDRESS)
        .and_then(|(_, v, _)| stun::decode_xor_address(v, &tid));
    assert_eq!(got, Some(mapped));
}

/// A STUN header (Binding request) that declares `body` bytes, with nothing after it.
fn header_declaring(body: u16, tid: [u8; 12]) -> Vec<u8> {
    let mut h = Vec::with_capacity(20);
    h.extend_from_slice(&stun::message_type(method::BINDING, Class::Request).to_be_bytes());
    h.extend_from_slice(&body.to_be_bytes());
    h.extend_from_slice(&MAGIC_COOKIE.to_be_bytes());
    h.extend_from_slice(&tid);
    h
}

/// ChannelData as a stream carries it: header, data, zero padding to a multiple of 4.
fn channel_data(channel: u16, data: &[u8]) -> Vec<u8> {
    let mut f = Vec::new();
    f.extend_from_slice(&channel.to_be_bytes());
    f.extend_from_slice(&(data.len() as u16).to_be_bytes());
    f.extend_from_slice(data);
    f.resize(f.len().next_multiple_of(4), 0);
    f
}

/// A TURN client over a stream, from the codec (the stream twin of `common::RawClient`).
struct TurnConn<S> {
    conn: Conn<S>,
    username: String,
    key: [u8; 16],
    nonce: Vec<u8>,
    next_tid: u8,
}

impl<S: AsyncRead + AsyncWrite + Unpin> TurnConn<S> {
    fn new(io: S, user: &str) -> Self {
        let (username, password) =
            relay_proto::rest_credentials(SECRET.as_bytes(), user, unix_now() + 600);
        let key = relay_proto::auth::long_term_key(
            username.as_bytes(),
            REALM.as_bytes(),
            password.as_bytes(),
        );
        Self {
            conn: Conn::new(io),
            username,
            key,
            nonce: Vec::new(),
            next_tid: 0x80,
        }
    }

    /// Sends a request (authenticated once a nonce is known); returns the response's error
    /// code (`None` for success) and its bytes.
    async fn request(&mut self, m: u16, add: impl Fn(&mut Encoder<'_>)) -> (Option<u16>, Vec<u8>) {
        self.next_tid = self.next_tid.wrapping_add(1);
        let tid = [self.next_tid; 12];
        let mut buf = Vec::new();
        let mut e = Encoder::new(&mut buf, m, Class::Request, tid);
        add(&mut e);
        if !self.nonce.is_empty() {
            e.attr(attr::USERNAME, self.username.as_bytes())
                .attr(attr::REALM, REALM.as_bytes())
                .attr(attr::NONCE, &self.nonce)
                .integrity(&self.key);
        }
        e.finish();
        self.conn.send(&buf).await;
        let resp = self.conn.frame().await;
        let msg = Message::parse(&resp).unwrap();
        assert_eq!(msg.transaction_id(), tid);
        assert_eq!(msg.method(), m);
        let code = msg
            .attributes()
            .find(|(t, _, _)| *t == attr::ERROR_CODE)
            .map(|(_, v, _)| u16::from(v[2]) * 100 + u16::from(v[3]));
        if let Some((_, v, _)) = msg.attributes().find(|(t, _, _)| *t == attr::NONCE) {
            self.nonce = v.to_vec();
        }
        (code, resp)
    }

    /// Allocate (401, then with credentials); returns the relayed address.
    async fn allocate(&mut self) -> SocketAddr {
        let udp = |e: &mut Encoder<'_>| {
            e.attr(attr::REQUESTED_TRANSPORT, &[17, 0, 0, 0]);
        };
        let (code, _) = self.request(method::ALLOCATE, udp).await;
        assert_eq!(code, Some(401), "the first Allocate is challenged");
        assert!(!self.nonce.is_empty(), "the 401 carries a nonce");
        let (code, resp) = self.request(method::ALLOCATE, udp).await;
        assert_eq!(code, None, "the authenticated Allocate succeeds");
        let msg = Message::parse(&resp).unwrap();
        let tid = msg.transaction_id();
        msg.attributes()
            .find(|(t, _, _)| *t == attr::XOR_RELAYED_ADDRESS)
            .and_then(|(_, v, _)| stun::decode_xor_address(v, &tid))
            .unwrap()
    }
}

/// A rustls client trusting exactly `root`, offering `alpn`.
fn tls_connector(root: &CertificateDer<'static>, alpn: &[&[u8]]) -> tokio_rustls::TlsConnector {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(root.clone()).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    tokio_rustls::TlsConnector::from(Arc::new(cfg))
}

async fn tls(addr: SocketAddr, root: &CertificateDer<'static>) -> TlsStream<TcpStream> {
    let sock = tcp(addr).await;
    let name = ServerName::try_from("localhost").unwrap();
    tokio::time::timeout(
        WAIT,
        tls_connector(root, &[relay_server::ALPN_STUN_TURN]).connect(name, sock),
    )
    .await
    .expect("TLS handshake within the deadline")
    .unwrap()
}

/// A TLS 1.1 ClientHello by hand: record version 3.1, client_version 3.2, 32 random bytes, no
/// session id, one cipher suite (TLS_RSA_WITH_AES_128_CBC_SHA), null compression, no
/// extensions. rustls implements neither TLS 1.0 nor 1.1, so the handshake must fail.
fn tls11_client_hello() -> Vec<u8> {
    old_client_hello(0x02)
}

/// The same ClientHello with client_version 3.`minor` (1: TLS 1.0, 2: TLS 1.1).
fn old_client_hello(minor: u8) -> Vec<u8> {
    let mut body = vec![0x03, minor];
    body.extend_from_slice(&[0x5a; 32]);
    body.push(0); // session id length
    body.extend_from_slice(&[0x00, 0x02, 0x00, 0x2f]); // cipher suites
    body.extend_from_slice(&[0x01, 0x00]); // compression methods: null
    let mut hs = vec![0x01]; // ClientHello
    hs.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
    hs.extend_from_slice(&body);
    let mut rec = vec![0x16, 0x03, 0x01];
    rec.extend_from_slice(&(hs.len() as u16).to_be_bytes());
    rec.extend_from_slice(&hs);
    rec
}

#[tokio::test]
async fn tcp_binding_split_into_single_bytes_and_two_in_one_write() {
    let relay = start(&["tcp://127.0.0.1:0"], "", None).await;
    let addr = stream_addr(&relay, conf::Transport::Tcp);
    let sock = tcp(addr).await;
    let local = sock.local_addr().unwrap();
    let mut c = Conn::new(sock);

    // One byte per write (and per segment: no Nagle), yielding between them.
    let tid = [0x11; 12];
    for b in binding_request(tid) {
        c.io.write_all(&[b]).await.unwrap();
        c.io.flush().await.unwrap();
        tokio::task::yield_now().await;
    }
    assert_binding_response(&c.frame().await, tid, local);
    assert!(c.buf.is_empty(), "exactly one response: {:?}", c.buf);

    // Two requests in one write: two responses, each with its own transaction id, in order.
    let (t1, t2) = ([0x21; 12], [0x22; 12]);
    let mut two = binding_request(t1);
    two.extend_from_slice(&binding_request(t2));
    c.send(&two).await;
    assert_binding_response(&c.frame().await, t1, local);
    assert_binding_response(&c.frame().await, t2, local);

    expect_metric(&relay, &bindings("tcp"), 3.0).await;
    assert_eq!(relay.metric(&bindings("udp")), 0.0);
    assert_eq!(relay.metric(&bindings("tls")), 0.0);
    wait_metric_eq(
        &relay,
        r#"turnpike_relay_stream_connections_active{transport="tcp"}"#,
        1.0,
    )
    .await;

    drop(c);
    expect_metric(&relay, &closed("client_closed"), 1.0).await;
    wait_metric_eq(
        &relay,
        r#"turnpike_relay_stream_connections_active{transport="tcp"}"#,
        0.0,
    )
    .await;
    relay.shutdown().await;
}

/// Two Binding requests in one write, then the end of what the client sends; returns the
/// connection for the answers.
async fn two_requests_then_half_close<S: AsyncRead + AsyncWrite + Unpin>(
    io: S,
    tids: [[u8; 12]; 2],
) -> Conn<S> {
    let mut c = Conn::new(io);
    let mut two = binding_request(tids[0]);
    two.extend_from_slice(&binding_request(tids[1]));
    c.send(&two).await;
    // TCP: a FIN with the write half. TLS: close_notify first.
    c.io.shutdown().await.unwrap();
    c
}

#[tokio::test]
async fn a_client_that_half_closes_after_its_requests_still_gets_every_answer_over_tcp_and_tls() {
    let certs = CertFiles::new("half-close");
    // One stream listener serves both (it tells them apart by the first byte).
    let relay = start(&["tls://127.0.0.1:0"], "", Some(&certs)).await;
    let addr = stream_addr(&relay, conf::Transport::Tls);

    let sock = tcp(addr).await;
    let local = sock.local_addr().unwrap();
    let tids = [[0x31; 12], [0x32; 12]];
    let mut c = two_requests_then_half_close(sock, tids).await;
    assert_binding_response(&c.frame().await, tids[0], local);
    assert_binding_response(&c.frame().await, tids[1], local);
    // Then the relay closes its side, with nothing more.
    assert!(c.expect_closed().await.is_empty(), "{:?}", c.buf);
    expect_metric(&relay, &closed("client_closed"), 1.0).await;

    let stream = tls(addr, &certs.der).await;
    let local = stream.get_ref().0.local_addr().unwrap();
    let tids = [[0x41; 12], [0x42; 12]];
    let mut c = two_requests_then_half_close(stream, tids).await;
    assert_binding_response(&c.frame().await, tids[0], local);
    assert_binding_response(&c.frame().await, tids[1], local);
    assert!(c.expect_closed().await.is_empty(), "{:?}", c.buf);
    expect_metric(&relay, &closed("client_closed"), 2.0).await;
    relay.shutdown().await;
}

#[tokio::test]
async fn tcp_allocation_relays_channel_data_both_ways_and_ends_with_the_connection() {
    let relay = start(&["tcp://127.0.0.1:0"], "", None).await;
    let addr = stream_addr(&relay, conf::Transport::Tcp);
    let sock = tcp(addr).await;
    let local = sock.local_addr().unwrap();
    let mut t = TurnConn::new(sock, "alice");
    let relayed = t.allocate().await;
    assert_eq!(relayed.ip(), IpAddr::V4(Ipv4Addr::LOCALHOST));
    assert!((40000..=44999).contains(&relayed.port()), "{relayed}");
    expect_metric(
        &relay,
        r#"turnpike_relay_allocation_requests_total{result="ok",transport="tcp"}"#,
        1.0,
    )
    .await;
    wait_metric_eq(
        &relay,
        r#"turnpike_relay_allocations_active{transport="tcp"}"#,
        1.0,
    )
    .await;

    let peer = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let peer_addr = peer.local_addr().unwrap();
    let (code, _) = t
        .request(method::CHANNEL_BIND, |e| {
            e.attr(attr::CHANNEL_NUMBER, &[0x40, 0x00, 0, 0])
                .xor_address(attr::XOR_PEER_ADDRESS, peer_addr);
        })
        .await;
    assert_eq!(code, None, "ChannelBind succeeds");

    // One write: ChannelData (5 bytes, padded to 8 on the stream), then a Binding request.
    let tid = [0x33; 12];
    let mut write = channel_data(0x4000, b"hello");
    assert_eq!(write.len(), 12);
    write.extend_from_slice(&binding_request(tid));
    t.conn.send(&write).await;
    let (got, from) = recv(&peer).await;
    assert_eq!(got, b"hello", "the peer gets exactly the data, no padding");
    assert_eq!(from, relayed);
    assert_binding_response(&t.conn.frame().await, tid, local);

    // Peer → client: a 12-byte ChannelData frame: header, 5 data bytes, 3 zero bytes.
    peer.send_to(b"world", relayed).await.unwrap();
    let frame = t.conn.frame().await;
    assert_eq!(
        frame,
        [0x40, 0x00, 0x00, 0x05, b'w', b'o', b'r', b'l', b'd', 0, 0, 0]
    );
    assert_eq!(
        stun::parse_channel_data(&frame),
        Some((0x4000, &b"world"[..]))
    );

    expect_metric(
        &relay,
        r#"turnpike_relay_packets_total{direction="client_to_peer",framing="channel_data",transport="tcp"}"#,
        1.0,
    )
    .await;
    expect_metric(
        &relay,
        r#"turnpike_relay_packets_total{direction="peer_to_client",framing="channel_data",transport="tcp"}"#,
        1.0,
    )
    .await;
    expect_metric(
        &relay,
        r#"turnpike_relay_bytes_total{direction="client_to_peer",transport="tcp"}"#,
        5.0,
    )
    .await;
    expect_metric(
        &relay,
        r#"turnpike_relay_bytes_total{direction="peer_to_client",transport="tcp"}"#,
        5.0,
    )
    .await;
    assert_eq!(
        relay.metric(r#"turnpike_relay_packets_total{direction="client_to_peer",framing="channel_data",transport="udp"}"#),
        0.0
    );

    // Closing the connection ends the allocation.
    drop(t);
    expect_metric(
        &relay,
        r#"turnpike_relay_allocations_ended_total{reason="connection_closed"}"#,
        1.0,
    )
    .await;
    wait_metric_eq(
        &relay,
        r#"turnpike_relay_allocations_active{transport="tcp"}"#,
        0.0,
    )
    .await;
    expect_metric(&relay, &closed("client_closed"), 1.0).await;
    assert_eq!(
        relay.metric(r#"turnpike_relay_allocations_ended_total{reason="client"}"#),
        0.0
    );
    relay.shutdown().await;
}

#[tokio::test]
async fn idle_timeout_closes_a_connection_stuck_in_a_declared_frame() {
    let relay = start(&["tcp://127.0.0.1:0"], r#"idle-timeout = "1s""#, None).await;
    let addr = stream_addr(&relay, conf::Transport::Tcp);
    let sock = tcp(addr).await;
    let local = sock.local_addr().unwrap();
    let mut c = Conn::new(sock);
    c.binding([0x44; 12], local).await;

    // A header declaring the largest body, then silence.
    c.send(&header_declaring(65_532, [0x45; 12])).await;
    let sent = Instant::now();
    let rest = c.expect_closed().await;
    assert!(rest.is_empty(), "nothing more was answered: {rest:?}");
    let after = sent.elapsed();
    assert!(
        after >= Duration::from_millis(900),
        "closed after {after:?}"
    );

    expect_metric(&relay, &closed("idle_timeout"), 1.0).await;
    assert_eq!(relay.metric(&closed("handshake_timeout")), 0.0);
    assert_eq!(relay.metric(&closed("frame_too_large")), 0.0);
    assert_eq!(relay.metric(&bindings("tcp")), 1.0);
    relay.shutdown().await;
}

#[tokio::test]
async fn frame_limit_framing_errors_and_handshake_timeout_close_with_their_reasons() {
    let relay = start(
        &["tcp://127.0.0.1:0"],
        "max-frame = 1000\nhandshake-timeout = \"1s\"",
        None,
    )
    .await;
    let addr = stream_addr(&relay, conf::Transport::Tcp);

    // Silence after connecting, and a frame that never completes: both must hit
    // handshake-timeout, which runs while the rest of the test goes on.
    let opened = Instant::now();
    let mut silent = Conn::new(tcp(addr).await);
    let mut partial = Conn::new(tcp(addr).await);
    partial.send(&header_declaring(8, [0x55; 12])[..10]).await;

    // A Binding of exactly max-frame bytes is still served: the limit is inclusive.
    let sock = tcp(addr).await;
    let local = sock.local_addr().unwrap();
    let mut c = Conn::new(sock);
    let tid = [0x51; 12];
    let mut big = Vec::new();
    let mut e = Encoder::new(&mut big, method::BINDING, Class::Request, tid);
    // 20 header + 4 + 968 (an ignored comprehension-optional attribute) + 8 FINGERPRINT.
    e.attr(0x8050, &[0xab; 968]).fingerprint();
    e.finish();
    assert_eq!(big.len(), 1000);
    c.send(&big).await;
    assert_binding_response(&c.frame().await, tid, local);

    // A STUN header declaring 2000 bytes, and (after a first request) ChannelData declaring
    // 2000: both over the limit.
    let mut c = Conn::new(tcp(addr).await);
    c.send(&header_declaring(1980, [0x52; 12])).await;
    assert!(c.expect_closed().await.is_empty());
    let sock = tcp(addr).await;
    let local = sock.local_addr().unwrap();
    let mut c = Conn::new(sock);
    c.binding([0x55; 12], local).await;
    c.send(&[0x40, 0x01, 0x07, 0xd0]).await;
    assert!(c.expect_closed().await.is_empty());

    // Neither STUN nor ChannelData from the first byte; an HTTP request, whose "G" looks like
    // ChannelData but cannot come first; a STUN header with a wrong cookie; and garbage after a
    // valid frame.
    let mut c = Conn::new(tcp(addr).await);
    c.send(b"SSH-2.0-OpenSSH_9.6\r\n").await;
    assert!(c.expect_closed().await.is_empty());
    let mut c = Conn::new(tcp(addr).await);
    c.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert!(c.expect_closed().await.is_empty());
    let mut bad_cookie = header_declaring(0, [0x53; 12]);
    bad_cookie[4..8].copy_from_slice(&[0xde, 0xad, 0xbe, 0xef]);
    let mut c = Conn::new(tcp(addr).await);
    c.send(&bad_cookie).await;
    assert!(c.expect_closed().await.is_empty());
    let sock = tcp(addr).await;
    let local = sock.local_addr().unwrap();
    let mut c = Conn::new(sock);
    c.binding([0x54; 12], local).await;
    c.send(b"POST / HTTP/1.1\r\n\r\n").await;
    assert!(c.expect_closed().await.is_empty());

    assert!(silent.expect_closed().await.is_empty());
    assert!(partial.expect_closed().await.is_empty());
    let after = opened.elapsed();
    assert!(
        after >= Duration::from_millis(900),
        "closed after {after:?}"
    );

    expect_metric(&relay, &closed("frame_too_large"), 2.0).await;
    expect_metric(&relay, &closed("framing_error"), 4.0).await;
    expect_metric(&relay, &closed("handshake_timeout"), 2.0).await;
    assert_eq!(relay.metric(&closed("idle_timeout")), 0.0);
    // Each shard publishes on its own tick: the one that answered the last Binding may not
    // have yet.
    expect_metric(&relay, &bindings("tcp"), 3.0).await;
    relay.shutdown().await;
}

#[tokio::test]
async fn tls_listener_negotiates_stun_turn_and_refuses_old_tls_and_other_alpn() {
    let certs = CertFiles::new("tls");
    let relay = start(&["tls://127.0.0.1:0"], "", Some(&certs)).await;
    let addr = stream_addr(&relay, conf::Transport::Tls);

    let stream = tls(addr, &certs.der).await;
    let (sock, session) = stream.get_ref();
    assert_eq!(session.alpn_protocol(), Some(&b"stun.turn"[..]));
    assert_eq!(
        session.protocol_version(),
        Some(rustls::ProtocolVersion::TLSv1_3)
    );
    let local = sock.local_addr().unwrap();
    let mut c = Conn::new(stream);
    c.binding([0x61; 12], local).await;
    c.binding([0x62; 12], local).await;
    wait_metric_eq(
        &relay,
        r#"turnpike_relay_stream_connections_active{transport="tls"}"#,
        1.0,
    )
    .await;

    // A client that offers no ALPN is served too (ALPN is optional in RFC 7443).
    let sock = tcp(addr).await;
    let local = sock.local_addr().unwrap();
    let name = ServerName::try_from("localhost").unwrap();
    let stream = tls_connector(&certs.der, &[])
        .connect(name, sock)
        .await
        .unwrap();
    assert_eq!(stream.get_ref().1.alpn_protocol(), None);
    let mut c2 = Conn::new(stream);
    c2.binding([0x63; 12], local).await;

    // A hand-built TLS 1.1 ClientHello: answered with nothing but a fatal alert record
    // (content type 21, 2 bytes, level 2), then closed. (rustls 0.23 says handshake_failure.)
    // TLS 1.0 likewise.
    for hello in [tls11_client_hello(), old_client_hello(0x01)] {
        let mut old = Conn::new(tcp(addr).await);
        old.send(&hello).await;
        let answer = old.expect_closed().await;
        if !answer.is_empty() {
            assert_eq!(answer.len(), 7, "one alert record: {answer:02x?}");
            assert_eq!(answer[0], 0x15, "an alert record: {answer:02x?}");
            assert_eq!(&answer[3..6], &[0, 2, 2], "a fatal alert: {answer:02x?}");
        }
    }

    // A client that insists on another protocol ("h2") does not get one.
    let sock = tcp(addr).await;
    let name = ServerName::try_from("localhost").unwrap();
    let refused = tokio::time::timeout(
        WAIT,
        tls_connector(&certs.der, &[b"h2"]).connect(name, sock),
    )
    .await
    .expect("the handshake ends within the deadline");
    assert!(refused.is_err(), "ALPN h2 was accepted");

    // A plain TCP Binding also works on a tls:// listener (one stream listener serves both).
    let sock = tcp(addr).await;
    let local = sock.local_addr().unwrap();
    Conn::new(sock).binding([0x64; 12], local).await;

    // An orderly TLS close (close_notify, then FIN) counts as the client closing.
    c.io.shutdown().await.unwrap();
    c2.io.shutdown().await.unwrap();
    assert!(c.expect_closed().await.is_empty());
    assert!(c2.expect_closed().await.is_empty());

    expect_metric(&relay, &bindings("tls"), 3.0).await;
    expect_metric(&relay, &bindings("tcp"), 1.0).await;
    expect_metric(&relay, &closed("tls_handshake_failed"), 3.0).await;
    expect_metric(&relay, &closed("client_closed"), 3.0).await;
    assert_eq!(relay.metric(&closed("io_error")), 0.0);
    assert_eq!(relay.metric(&closed("tls_unavailable")), 0.0);
    relay.shutdown().await;
}

#[tokio::test]
async fn tls_client_hello_without_relay_tls_is_refused_at_its_first_byte() {
    let certs = CertFiles::new("no-tls");
    let relay = start(&["tcp://127.0.0.1:0"], "", None).await;
    let addr = stream_addr(&relay, conf::Transport::Tcp);
    let sock = tcp(addr).await;
    let name = ServerName::try_from("localhost").unwrap();
    let refused = tokio::time::timeout(
        WAIT,
        tls_connector(&certs.der, &[relay_server::ALPN_STUN_TURN]).connect(name, sock),
    )
    .await
    .expect("the handshake ends within the deadline");
    assert!(refused.is_err(), "TLS without [relay.tls]");
    let mut raw = Conn::new(tcp(addr).await);
    raw.send(&tls11_client_hello()).await;
    assert!(raw.expect_closed().await.is_empty(), "no TLS answer at all");

    // Plain TCP on the same listener is unaffected.
    let sock = tcp(addr).await;
    let local = sock.local_addr().unwrap();
    Conn::new(sock).binding([0x65; 12], local).await;

    expect_metric(&relay, &closed("tls_unavailable"), 2.0).await;
    expect_metric(&relay, &bindings("tcp"), 1.0).await;
    assert_eq!(relay.metric(&closed("tls_handshake_failed")), 0.0);
    assert_eq!(relay.metric(&bindings("tls")), 0.0);
    relay.shutdown().await;
}

#[tokio::test]
async fn one_tcp_listener_serves_plain_tcp_and_tls_on_the_same_port() {
    let certs = CertFiles::new("same-port");
    let relay = start(&["tcp://127.0.0.1:0"], "", Some(&certs)).await;
    assert!(relay
        .server
        .iter()
        .all(|l| l.transport != conf::Transport::Tls));
    let addr = stream_addr(&relay, conf::Transport::Tcp);

    let sock = tcp(addr).await;
    let local = sock.local_addr().unwrap();
    let mut plain = Conn::new(sock);
    plain.binding([0x71; 12], local).await;

    let stream = tls(addr, &certs.der).await;
    assert_eq!(stream.get_ref().1.alpn_protocol(), Some(&b"stun.turn"[..]));
    let local = stream.get_ref().0.local_addr().unwrap();
    let mut secure = Conn::new(stream);
    secure.binding([0x72; 12], local).await;

    // Both stay usable side by side.
    let local = plain.io.local_addr().unwrap();
    plain.binding([0x73; 12], local).await;

    expect_metric(&relay, &bindings("tcp"), 2.0).await;
    expect_metric(&relay, &bindings("tls"), 1.0).await;
    wait_metric_eq(
        &relay,
        r#"turnpike_relay_stream_connections_active{transport="tcp"}"#,
        1.0,
    )
    .await;
    wait_metric_eq(
        &relay,
        r#"turnpike_relay_stream_connections_active{transport="tls"}"#,
        1.0,
    )
    .await;
    relay.shutdown().await;
}

/// Makes room for `n` more open files: the soft limit is often 1024 in containers, while the
/// hard limit is much higher.
fn raise_open_file_limit(n: u64) {
    use rustix::process::{getrlimit, setrlimit, Resource};
    let mut lim = getrlimit(Resource::Nofile);
    let want = n + 1024;
    if lim.current.is_some_and(|c| c < want) {
        lim.current = Some(lim.maximum.map_or(want, |m| m.min(want)));
        setrlimit(Resource::Nofile, lim).unwrap();
    }
    let now = getrlimit(Resource::Nofile).current;
    assert!(
        now.is_none_or(|c| c >= want),
        "open-file limit {now:?} is too low for this test (hard limit too)"
    );
}

#[tokio::test]
async fn per_source_cap_refuses_the_flood_but_not_other_sources_or_admitted_connections() {
    const FLOOD: usize = 1000;
    const CAP: usize = 20;
    raise_open_file_limit(2 * FLOOD as u64);
    let relay = start(
        &["tcp://127.0.0.1:0"],
        // Long handshake timeout: admitted connections that stay silent must stay admitted.
        "max-connections-per-ip = 20\nhandshake-timeout = \"5m\"",
        None,
    )
    .await;
    let addr = stream_addr(&relay, conf::Transport::Tcp);

    // The first connection is admitted (it is answered), then the flood.
    let sock = tcp(addr).await;
    let first_local = sock.local_addr().unwrap();
    let mut first = Conn::new(sock);
    first.binding([0x81; 12], first_local).await;
    let mut flood = Vec::with_capacity(FLOOD - 1);
    for _ in 1..FLOOD {
        flood.push(Arc::new(tcp(addr).await));
    }
    let refused = (FLOOD - CAP) as f64;
    expect_metric(&relay, &closed("per_ip_limit"), refused).await;

    // Client side: exactly the refused connections see the relay close them.
    let mut watch = tokio::task::JoinSet::new();
    for s in &flood {
        let s = Arc::clone(s);
        watch.spawn(async move {
            let mut b = [0u8; 1];
            matches!(s.peek(&mut b).await, Ok(0) | Err(_))
        });
    }
    let mut seen = 0;
    let deadline = Instant::now() + WAIT;
    while seen < FLOOD - CAP {
        let done = tokio::time::timeout_at(deadline, watch.join_next())
            .await
            .unwrap_or_else(|_| panic!("only {seen} refused connections were closed"))
            .unwrap()
            .unwrap();
        assert!(done);
        seen += 1;
    }
    watch.abort_all();

    // Another source address has its own count.
    let other = TcpSocket::new_v4().unwrap();
    other.bind("127.0.0.2:0".parse().unwrap()).unwrap();
    let sock = tokio::time::timeout(WAIT, other.connect(addr))
        .await
        .unwrap()
        .unwrap();
    let local = sock.local_addr().unwrap();
    assert_eq!(local.ip(), IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2)));
    Conn::new(sock).binding([0x82; 12], local).await;

    // And the first admitted connection still works.
    first.binding([0x83; 12], first_local).await;

    expect_metric(&relay, &bindings("tcp"), 3.0).await;
    assert_eq!(relay.metric(&closed("per_ip_limit")), refused);
    assert_eq!(relay.metric(&closed("accept_error")), 0.0);
    drop(flood);
    relay.shutdown().await;
}

#[tokio::test]
async fn a_thousand_tcp_allocations_dropped_with_their_connections_leave_no_port_or_quota_behind() {
    let relay = start(&["tcp://127.0.0.1:0"], "", None).await;
    let addr = stream_addr(&relay, conf::Transport::Tcp);
    let ports = r#"turnpike_relay_ports_available{family="ipv4"}"#;
    wait_metric_eq(&relay, ports, 5000.0).await;
    for i in 0..1000 {
        // One user for all: its quota (16) only holds if every close gives its share back.
        let mut c = TurnConn::new(tcp(addr).await, "cycler");
        let relayed = c.allocate().await;
        assert!(
            (40000..=44999).contains(&relayed.port()),
            "cycle {i}: {relayed}"
        );
        drop(c);
    }
    expect_metric(
        &relay,
        r#"turnpike_relay_allocations_ended_total{reason="connection_closed"}"#,
        1000.0,
    )
    .await;
    wait_metric_eq(
        &relay,
        r#"turnpike_relay_allocations_active{transport="tcp"}"#,
        0.0,
    )
    .await;
    wait_metric_eq(&relay, ports, 5000.0).await;
    assert_eq!(
        relay.metric(r#"turnpike_relay_allocation_requests_total{result="quota",transport="tcp"}"#),
        0.0
    );
    relay.shutdown().await;
}

#[tokio::test]
async fn a_tcp_client_that_stops_reading_is_closed_after_the_write_timeout() {
    let relay = start(&["tcp://127.0.0.1:0"], "write-timeout = \"1s\"", None).await;
    let addr = stream_addr(&relay, conf::Transport::Tcp);
    // A allocates over TCP and then never reads again.
    let mut a = TurnConn::new(tcp(addr).await, "deaf");
    let a_relayed = a.allocate().await;
    // B, over UDP, sends it large datagrams through the relay.
    let mut b = common::RawClient::new(relay.addr, "talker").await;
    let r = b
        .request(
            method::ALLOCATE,
            &[(attr::REQUESTED_TRANSPORT, common::UDP.to_vec())],
        )
        .await;
    assert_eq!(r.code, None);
    let b_relayed = r.addresses(attr::XOR_RELAYED_ADDRESS)[0];
    let (code, _) = a
        .request(method::CREATE_PERMISSION, |e| {
            e.xor_address(attr::XOR_PEER_ADDRESS, b_relayed);
        })
        .await;
    assert_eq!(code, None);
    b.permit(a_relayed).await;
    let big = vec![0x5a; 60_000];
    let slow = closed("slow_reader");
    let deadline = Instant::now() + WAIT;
    // Its receive window and our send buffer fill (megabytes on loopback), the writer waits,
    // and a second later the connection is closed.
    while relay.metric(&slow) < 1.0 {
        assert!(Instant::now() < deadline, "never closed as a slow reader");
        for _ in 0..20 {
            b.send(a_relayed, &big).await;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(relay.metric(&closed("client_closed")), 0.0);
    drop(a);
    relay.shutdown().await;
}
