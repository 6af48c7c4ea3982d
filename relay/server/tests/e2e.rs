//! End to end on real sockets: a relay bound to port 0, the webrtc-rs `turn` crate's client, UDP
//! peers, and hostile datagrams.
#![allow(clippy::unwrap_used, clippy::print_stdout)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use relay_proto::stun::{self, attr, method, Class, Encoder, Message};
use relay_server::RelayServer;
use tokio::net::UdpSocket;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use turn::client::{Client, ClientConfig};
use webrtc_util::Conn as _;

const SECRET: &str = "e2e-secret-0123456789abcdef";
const REALM: &str = "example.org";
/// Upper bound for anything a test waits for; generous for a loaded 2-core CI machine.
const WAIT: Duration = Duration::from_secs(10);

struct Running {
    addr: SocketAddr,
    registry: prometheus::Registry,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl Running {
    async fn start(extra: &str) -> Self {
        let text = format!(
            r#"
[relay]
realm = "{REALM}"
listen = ["udp://127.0.0.1:0"]
relay-ip = "127.0.0.1"
relay-ports = "20000-29999"
secrets = ["{SECRET}"]
allow-peers = ["127.0.0.0/8"]
threads = 2
grace-period = "1s"
{extra}
"#
        );
        Self::start_with(&text).await
    }

    async fn start_with(text: &str) -> Self {
        let cfg = conf::parse(text, &[]).unwrap();
        let registry = prometheus::Registry::new();
        let server = RelayServer::bind(&cfg.relay, None, &registry).unwrap();
        let addr = server.local_addr(conf::Transport::Udp).unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            server
                .run(async {
                    let _ = stopped.await;
                })
                .await
                .unwrap();
        });
        Self {
            addr,
            registry,
            stop: Some(stop),
            task: Some(task),
        }
    }

    async fn shutdown(mut self) {
        let _ = self.stop.take().unwrap().send(());
        tokio::time::timeout(WAIT, self.task.take().unwrap())
            .await
            .expect("relay stops within the grace period")
            .unwrap();
    }

    /// The value of one series, e.g. `turnpike_relay_packets_total{direction="…",framing="…"}`.
    fn metric(&self, series: &str) -> f64 {
        use prometheus::Encoder as _;
        let mut out = Vec::new();
        prometheus::TextEncoder::new()
            .encode(&self.registry.gather(), &mut out)
            .unwrap();
        let text = String::from_utf8(out).unwrap();
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or(0.0)
    }

    /// Waits until a metric (published once per shard tick) reaches `at_least`.
    async fn wait_metric(&self, series: &str, at_least: f64) -> f64 {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let v = self.metric(series);
            if v >= at_least {
                return v;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{series} stayed at {v}, expected >= {at_least}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

async fn turn_client(server: SocketAddr, username: String, password: String) -> Client {
    let conn = Arc::new(UdpSocket::bind("127.0.0.1:0").await.unwrap());
    let client = Client::new(ClientConfig {
        stun_serv_addr: server.to_string(),
        turn_serv_addr: server.to_string(),
        username,
        password,
        realm: REALM.to_owned(),
        software: String::new(),
        rto_in_ms: 0,
        conn,
        vnet: None,
    })
    .await
    .unwrap();
    client.listen().await.unwrap();
    client
}

async fn recv(sock: &UdpSocket) -> (Vec<u8>, SocketAddr) {
    let mut buf = vec![0u8; 2048];
    let (n, from) = tokio::time::timeout(WAIT, sock.recv_from(&mut buf))
        .await
        .expect("datagram within the deadline")
        .unwrap();
    buf.truncate(n);
    (buf, from)
}

#[tokio::test]
async fn turn_client_allocates_binds_a_channel_and_exchanges_data_with_a_peer() {
    let relay = Running::start("").await;
    let peer = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let peer_addr = peer.local_addr().unwrap();
    let (user, pass) = relay_proto::rest_credentials(SECRET.as_bytes(), "alice", unix_now() + 600);
    let client = turn_client(relay.addr, user, pass).await;
    let conn = client.allocate().await.unwrap();
    let relayed = conn.local_addr().unwrap();
    assert_eq!(relayed.ip().to_string(), "127.0.0.1");
    assert!((20000..=29999).contains(&relayed.port()), "{relayed}");

    // The first sends go as Send indications while the client binds a channel in the
    // background; keep sending until the relay has seen ChannelData from the client.
    let channel = r#"turnpike_relay_packets_total{direction="client_to_peer",framing="channel_data",transport="udp"}"#;
    let mut i = 0u32;
    while relay.metric(channel) < 1.0 {
        assert!(i < 200, "the client never switched to ChannelData");
        let msg = format!("ping {i}");
        conn.send_to(msg.as_bytes(), peer_addr).await.unwrap();
        let (got, from) = recv(&peer).await;
        assert_eq!(got, msg.as_bytes());
        assert_eq!(from, relayed, "the peer sees the relayed address");
        i += 1;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // Peer → client now arrives as ChannelData (the channel exists for this peer).
    peer.send_to(b"pong", relayed).await.unwrap();
    let mut buf = [0u8; 64];
    let (n, from) = tokio::time::timeout(WAIT, conn.recv_from(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&buf[..n], b"pong");
    assert_eq!(from, peer_addr);
    relay
        .wait_metric(
            r#"turnpike_relay_packets_total{direction="peer_to_client",framing="channel_data",transport="udp"}"#,
            1.0,
        )
        .await;
    relay
        .wait_metric(
            r#"turnpike_relay_allocation_requests_total{result="ok",transport="udp"}"#,
            1.0,
        )
        .await;
    assert_eq!(
        relay
            .wait_metric(r#"turnpike_relay_allocations_active{transport="udp"}"#, 1.0)
            .await,
        1.0
    );
    client.close().await.unwrap();
    relay.shutdown().await;
}

#[tokio::test]
async fn wrong_secret_and_expired_username_are_refused_with_401() {
    let relay = Running::start("").await;
    let (user, pass) =
        relay_proto::rest_credentials(b"not-the-secret-000000", "mallory", unix_now() + 600);
    let client = turn_client(relay.addr, user, pass).await;
    let err = client.allocate().await.err().expect("wrong secret refused");
    assert!(err.to_string().contains("401"), "{err}");
    client.close().await.unwrap();

    let (user, pass) = relay_proto::rest_credentials(SECRET.as_bytes(), "late", unix_now() - 1);
    let client = turn_client(relay.addr, user, pass).await;
    let err = client
        .allocate()
        .await
        .err()
        .expect("expired username refused");
    assert!(err.to_string().contains("401"), "{err}");
    client.close().await.unwrap();

    relay
        .wait_metric(
            r#"turnpike_relay_auth_failures_total{reason="bad_integrity"}"#,
            1.0,
        )
        .await;
    relay
        .wait_metric(
            r#"turnpike_relay_auth_failures_total{reason="expired"}"#,
            1.0,
        )
        .await;
    assert_eq!(
        relay.metric(r#"turnpike_relay_allocation_requests_total{result="ok",transport="udp"}"#),
        0.0
    );
    relay.shutdown().await;
}

fn binding_request(tid: [u8; 12]) -> Vec<u8> {
    let mut buf = Vec::new();
    let mut e = Encoder::new(&mut buf, method::BINDING, Class::Request, tid);
    e.fingerprint();
    e.finish();
    buf
}

async fn expect_binding_answer(sock: &UdpSocket, server: SocketAddr, tid: [u8; 12]) {
    sock.send_to(&binding_request(tid), server).await.unwrap();
    let (resp, _) = recv(sock).await;
    let msg = Message::parse(&resp).unwrap();
    assert_eq!(msg.class(), Class::Success);
    assert_eq!(msg.transaction_id(), tid);
    let mapped = msg
        .attributes()
        .find(|(t, _, _)| *t == attr::XOR_MAPPED_ADDRESS)
        .and_then(|(_, v, _)| stun::decode_xor_address(v, &tid));
    assert_eq!(mapped, Some(sock.local_addr().unwrap()));
}

#[tokio::test]
async fn hostile_datagrams_are_dropped_and_counted_and_the_relay_keeps_serving() {
    let relay = Running::start("").await;
    let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    expect_binding_answer(&sock, relay.addr, [1; 12]).await;

    let valid = binding_request([2; 12]);
    let mut hostile: Vec<Vec<u8>> = (0..valid.len()).map(|n| valid[..n].to_vec()).collect();
    let mut bad_cookie = valid.clone();
    bad_cookie[4] ^= 0xFF;
    hostile.push(bad_cookie);
    let mut bad_len = valid.clone();
    bad_len[3] = 0xFC;
    bad_len[2] = 0xFF;
    hostile.push(bad_len);
    hostile.push(vec![0x80; 9000]);
    hostile.push(vec![0x16; 300]); // DTLS-looking
    hostile.push(vec![0x40, 0x00, 0xFF, 0xFF, 1, 2, 3]); // ChannelData longer than the datagram
    for h in &hostile {
        sock.send_to(h, relay.addr).await.unwrap();
    }
    // Nothing above gets an answer; the next Binding does, on the same socket.
    expect_binding_answer(&sock, relay.addr, [3; 12]).await;
    // Empty datagrams are not counted as malformed (there is nothing to count), so expect the
    // rest: prefixes 1..len, cookie, length, 9000 bytes, DTLS, ChannelData.
    let expected = (hostile.len() - 1) as f64;
    let got = relay
        .wait_metric(
            r#"turnpike_relay_dropped_packets_total{reason="malformed"}"#,
            expected - 1.0,
        )
        .await;
    assert!(got >= expected - 1.0, "malformed drops {got}");
    relay
        .wait_metric(
            r#"turnpike_relay_binding_requests_total{transport="udp"}"#,
            2.0,
        )
        .await;
    relay.shutdown().await;
}

#[tokio::test]
async fn denied_peers_are_refused_with_403_and_counted() {
    // No allow-peers override here: loopback is denied like in production.
    let relay = Running::start_without_allow().await;
    let (user, pass) = relay_proto::rest_credentials(SECRET.as_bytes(), "bob", unix_now() + 600);
    let client = turn_client(relay.addr, user, pass).await;
    let conn = client.allocate().await.unwrap();
    // 127.0.0.1 itself is the relay IP (other allocations live there), so probe 127.0.0.2.
    for peer in ["127.0.0.2:9", "10.0.0.1:9", "169.254.169.254:80"] {
        let err = conn
            .send_to(b"x", peer.parse().unwrap())
            .await
            .err()
            .unwrap_or_else(|| panic!("{peer} must be refused"));
        assert!(err.to_string().contains("403"), "{peer}: {err}");
    }
    relay
        .wait_metric(
            r#"turnpike_relay_peers_denied_total{reason="loopback"}"#,
            1.0,
        )
        .await;
    relay
        .wait_metric(
            r#"turnpike_relay_peers_denied_total{reason="private"}"#,
            1.0,
        )
        .await;
    relay
        .wait_metric(
            r#"turnpike_relay_peers_denied_total{reason="link_local"}"#,
            1.0,
        )
        .await;
    client.close().await.unwrap();
    relay.shutdown().await;
}

impl Running {
    async fn start_without_allow() -> Self {
        Self::start_with(
            r#"
[relay]
realm = "example.org"
listen = ["udp://127.0.0.1:0"]
relay-ip = "127.0.0.1"
relay-ports = "30000-39999"
secrets = ["e2e-secret-0123456789abcdef"]
threads = 1
grace-period = "1s"
"#,
        )
        .await
    }
}

#[tokio::test]
async fn shutdown_refuses_new_allocations_with_508_but_keeps_relaying_until_the_grace_period() {
    let mut relay = Running::start("").await;
    let peer = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let peer_addr = peer.local_addr().unwrap();
    let (user, pass) = relay_proto::rest_credentials(SECRET.as_bytes(), "early", unix_now() + 600);
    let early = turn_client(relay.addr, user, pass).await;
    let conn = early.allocate().await.unwrap();
    conn.send_to(b"before", peer_addr).await.unwrap();
    assert_eq!(recv(&peer).await.0, b"before");

    let _ = relay.stop.take().unwrap().send(());
    // Draining is visible as 508 to a newcomer.
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let (user, pass) =
            relay_proto::rest_credentials(SECRET.as_bytes(), "late", unix_now() + 600);
        let late = turn_client(relay.addr, user, pass).await;
        let result = late.allocate().await;
        late.close().await.unwrap();
        match result {
            Err(e) if e.to_string().contains("508") => break,
            other => assert!(
                tokio::time::Instant::now() < deadline,
                "expected 508 while draining, got {:?}",
                other.map(|c| c.local_addr())
            ),
        }
    }
    // The existing allocation still relays during the grace period.
    conn.send_to(b"during", peer_addr).await.unwrap();
    assert_eq!(recv(&peer).await.0, b"during");
    // After the grace period (1 s) the relay closes it and stops.
    tokio::time::timeout(WAIT, relay.task.take().unwrap())
        .await
        .expect("stops after the grace period")
        .unwrap();
    assert_eq!(
        relay.metric(r#"turnpike_relay_allocations_ended_total{reason="shutdown"}"#),
        1.0
    );
    early.close().await.unwrap();
}

/// A minimal TURN client over a real socket, built from the codec: enough to allocate and free
/// quickly, many times.
struct RawClient {
    sock: UdpSocket,
    server: SocketAddr,
    username: String,
    key: [u8; 16],
    nonce: Vec<u8>,
    next_tid: u8,
}

impl RawClient {
    async fn new(server: SocketAddr, user: &str) -> Self {
        let (username, password) =
            relay_proto::rest_credentials(SECRET.as_bytes(), user, unix_now() + 600);
        let key = relay_proto::auth::long_term_key(
            username.as_bytes(),
            REALM.as_bytes(),
            password.as_bytes(),
        );
        Self {
            sock: UdpSocket::bind("127.0.0.1:0").await.unwrap(),
            server,
            username,
            key,
            nonce: Vec::new(),
            next_tid: 0,
        }
    }

    /// Sends a request (authenticated once a nonce is known) and returns the response's error
    /// code (`None` for success) and raw bytes.
    async fn request(&mut self, m: u16, attrs: &[(u16, Vec<u8>)]) -> (Option<u16>, Vec<u8>) {
        self.next_tid = self.next_tid.wrapping_add(1);
        let tid = [self.next_tid; 12];
        let mut buf = Vec::new();
        let mut e = Encoder::new(&mut buf, m, Class::Request, tid);
        for (t, v) in attrs {
            e.attr(*t, v);
        }
        if !self.nonce.is_empty() {
            e.attr(attr::USERNAME, self.username.as_bytes())
                .attr(attr::REALM, REALM.as_bytes())
                .attr(attr::NONCE, &self.nonce)
                .integrity(&self.key);
        }
        e.finish();
        self.sock.send_to(&buf, self.server).await.unwrap();
        let (resp, _) = recv(&self.sock).await;
        let msg = Message::parse(&resp).unwrap();
        assert_eq!(msg.transaction_id(), tid);
        let code = msg
            .attributes()
            .find(|(t, _, _)| *t == attr::ERROR_CODE)
            .map(|(_, v, _)| u16::from(v[2]) * 100 + u16::from(v[3]));
        if let Some((_, v, _)) = msg.attributes().find(|(t, _, _)| *t == attr::NONCE) {
            self.nonce = v.to_vec();
        }
        (code, resp)
    }

    async fn allocate(&mut self) -> Option<u16> {
        let transport = vec![17, 0, 0, 0];
        let (mut code, _) = self
            .request(
                method::ALLOCATE,
                &[(attr::REQUESTED_TRANSPORT, transport.clone())],
            )
            .await;
        if code == Some(401) {
            code = self
                .request(method::ALLOCATE, &[(attr::REQUESTED_TRANSPORT, transport)])
                .await
                .0;
        }
        code
    }

    async fn free(&mut self) -> Option<u16> {
        self.request(method::REFRESH, &[(attr::LIFETIME, vec![0, 0, 0, 0])])
            .await
            .0
    }
}

#[tokio::test]
async fn relay_ports_run_out_with_508_and_come_back_after_many_cycles() {
    let relay = Running::start_with(
        r#"
[relay]
realm = "example.org"
listen = ["udp://127.0.0.1:0"]
relay-ip = "127.0.0.1"
relay-ports = "40000-40003"
secrets = ["e2e-secret-0123456789abcdef"]
allow-peers = ["127.0.0.0/8"]
user-quota = 100
threads = 1
grace-period = "1s"
"#,
    )
    .await;
    // 1000 allocate/free cycles on a pool of four ports.
    let mut c = RawClient::new(relay.addr, "cycler").await;
    for i in 0..1000 {
        assert_eq!(c.allocate().await, None, "allocate #{i}");
        assert_eq!(c.free().await, None, "free #{i}");
    }
    // The pool is whole again: four concurrent allocations fit, the fifth gets 508.
    let mut held = Vec::new();
    for i in 0..4 {
        let mut c = RawClient::new(relay.addr, &format!("user{i}")).await;
        assert_eq!(c.allocate().await, None, "allocation {i}");
        held.push(c);
    }
    let mut extra = RawClient::new(relay.addr, "extra").await;
    assert_eq!(extra.allocate().await, Some(508));
    // Freeing one makes a port available again.
    assert_eq!(held[0].free().await, None);
    let mut again = RawClient::new(relay.addr, "again").await;
    assert_eq!(again.allocate().await, None);
    relay
        .wait_metric(
            r#"turnpike_relay_allocation_requests_total{result="ok",transport="udp"}"#,
            1005.0,
        )
        .await;
    relay
        .wait_metric(
            r#"turnpike_relay_allocation_requests_total{result="capacity",transport="udp"}"#,
            1.0,
        )
        .await;
    relay.shutdown().await;
}
