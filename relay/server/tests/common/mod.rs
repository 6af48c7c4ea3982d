//! Shared by the relay's end-to-end tests: a relay bound to port 0 in this process, metric
//! reads, and small clients.
#![allow(dead_code, unreachable_pub, clippy::unwrap_used)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use relay_proto::stun::{self, attr, method, Class, Encoder, Message};
use relay_server::RelayServer;
use tokio::net::UdpSocket;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use turn::client::{Client, ClientConfig};

pub const SECRET: &str = "e2e-secret-0123456789abcdef";
pub const REALM: &str = "example.org";
/// Upper bound for anything a test waits for; generous for a loaded 2-core CI machine.
pub const WAIT: Duration = Duration::from_secs(10);

pub struct Running {
    pub addr: SocketAddr,
    pub server: Vec<conf::Listen>,
    pub registry: prometheus::Registry,
    /// Revokes credential groups on every shard.
    pub revoker: relay_server::Revoker,
    pub stop: Option<oneshot::Sender<()>>,
    pub task: Option<JoinHandle<()>>,
}

impl Running {
    pub async fn start(extra: &str) -> Self {
        Self::start_with_grace("1s", extra).await
    }

    /// [`Running::start`] with the grace period `grace` after a stop.
    pub async fn start_with_grace(grace: &str, extra: &str) -> Self {
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
grace-period = "{grace}"
{extra}
"#
        );
        Self::start_with(&text).await
    }

    pub async fn start_with(text: &str) -> Self {
        let cfg = conf::parse(text, &[]).unwrap();
        let registry = prometheus::Registry::new();
        let server = RelayServer::bind(&cfg.relay, None, &registry).unwrap();
        let addr = server.local_addr(conf::Transport::Udp).unwrap();
        let listens = server.local_addrs().to_vec();
        let revoker = server.revoker();
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
            server: listens,
            registry,
            revoker,
            stop: Some(stop),
            task: Some(task),
        }
    }

    pub async fn shutdown(mut self) {
        let _ = self.stop.take().unwrap().send(());
        tokio::time::timeout(WAIT, self.task.take().unwrap())
            .await
            .expect("relay stops within the grace period")
            .unwrap();
    }

    /// The value of one series, e.g. `turnpike_relay_packets_total{direction="…",framing="…"}`.
    pub fn metric(&self, series: &str) -> f64 {
        metric_in(&self.registry, series)
    }

    /// Waits until a metric (published once per shard tick) reaches `at_least`.
    pub async fn wait_metric(&self, series: &str, at_least: f64) -> f64 {
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

/// The value of one series in `registry` (0 when absent).
pub fn metric_in(registry: &prometheus::Registry, series: &str) -> f64 {
    use prometheus::Encoder as _;
    let mut out = Vec::new();
    prometheus::TextEncoder::new()
        .encode(&registry.gather(), &mut out)
        .unwrap();
    let text = String::from_utf8(out).unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(0.0)
}

pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

pub async fn turn_client(server: SocketAddr, username: String, password: String) -> Client {
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

pub async fn recv(sock: &UdpSocket) -> (Vec<u8>, SocketAddr) {
    let mut buf = vec![0u8; 2048];
    let (n, from) = tokio::time::timeout(WAIT, sock.recv_from(&mut buf))
        .await
        .expect("datagram within the deadline")
        .unwrap();
    buf.truncate(n);
    (buf, from)
}

impl Running {
    pub async fn start_without_allow() -> Self {
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

/// REQUESTED-TRANSPORT UDP.
pub const UDP: [u8; 4] = [17, 0, 0, 0];

/// A TURN client over UDP from any local address, built from the codec.
pub struct RawClient {
    pub sock: UdpSocket,
    server: SocketAddr,
    username: String,
    key: [u8; 16],
    nonce: Vec<u8>,
    /// Requests sent so far: the transaction id of the next one is derived from it.
    sent: u64,
}

/// A decoded response: error code (None for success) and the raw message.
pub struct Response {
    pub code: Option<u16>,
    pub raw: Vec<u8>,
    pub tid: [u8; 12],
}

impl Response {
    pub fn addresses(&self, typ: u16) -> Vec<SocketAddr> {
        let msg = Message::parse(&self.raw).unwrap();
        msg.attributes()
            .filter(|(t, _, _)| *t == typ)
            .filter_map(|(_, v, _)| stun::decode_xor_address(v, &self.tid))
            .collect()
    }

    pub fn address_error(&self) -> Option<(u8, u16)> {
        let msg = Message::parse(&self.raw).unwrap();
        msg.attributes()
            .find(|(t, _, _)| *t == attr::ADDRESS_ERROR_CODE)
            .map(|(_, v, _)| (v[0], u16::from(v[2]) * 100 + u16::from(v[3])))
    }
}

impl RawClient {
    /// A client on an ephemeral loopback port of the server's family.
    pub async fn new(server: SocketAddr, user: &str) -> Self {
        let bind = if server.is_ipv6() {
            "[::1]:0"
        } else {
            "127.0.0.1:0"
        };
        Self::new_at(bind, server, user).await
    }

    /// Allocates (UDP); the error code, `None` on success.
    pub async fn allocate(&mut self) -> Option<u16> {
        self.request(
            method::ALLOCATE,
            &[(attr::REQUESTED_TRANSPORT, UDP.to_vec())],
        )
        .await
        .code
    }

    /// Refresh with LIFETIME 0; the error code, `None` on success.
    pub async fn free(&mut self) -> Option<u16> {
        self.request(method::REFRESH, &[(attr::LIFETIME, vec![0, 0, 0, 0])])
            .await
            .code
    }

    /// A client on a socket bound to `bind` (e.g. "[::1]:0").
    pub async fn new_at(bind: &str, server: SocketAddr, user: &str) -> Self {
        let (username, password) =
            relay_proto::rest_credentials(SECRET.as_bytes(), user, unix_now() + 600);
        let key = relay_proto::auth::long_term_key(
            username.as_bytes(),
            REALM.as_bytes(),
            password.as_bytes(),
        );
        Self {
            sock: UdpSocket::bind(bind).await.unwrap(),
            server,
            username,
            key,
            nonce: Vec::new(),
            sent: 0,
        }
    }

    pub async fn request(&mut self, m: u16, attrs: &[(u16, Vec<u8>)]) -> Response {
        loop {
            self.sent += 1;
            let tid = tid_of(self.sent);
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
            let (raw, _) = recv(&self.sock).await;
            let msg = Message::parse(&raw).unwrap();
            assert_eq!(msg.transaction_id(), tid);
            let code = msg
                .attributes()
                .find(|(t, _, _)| *t == attr::ERROR_CODE)
                .map(|(_, v, _)| u16::from(v[2]) * 100 + u16::from(v[3]));
            let had_nonce = !self.nonce.is_empty();
            if let Some((_, v, _)) = msg.attributes().find(|(t, _, _)| *t == attr::NONCE) {
                self.nonce = v.to_vec();
            }
            // The first request of a client only fetches the nonce: send it again signed.
            if code == Some(401) && !had_nonce {
                continue;
            }
            return Response { code, raw, tid };
        }
    }

    pub async fn send(&mut self, peer: SocketAddr, data: &[u8]) {
        let mut buf = Vec::new();
        let mut e = Encoder::new(&mut buf, method::SEND, Class::Indication, [0xEE; 12]);
        e.xor_address(attr::XOR_PEER_ADDRESS, peer)
            .attr(attr::DATA, data);
        e.finish();
        self.sock.send_to(&buf, self.server).await.unwrap();
    }

    pub async fn permit(&mut self, peer: SocketAddr) {
        let r = self
            .request_with_peer(method::CREATE_PERMISSION, peer)
            .await;
        assert_eq!(r.code, None, "CreatePermission for {peer}");
    }

    pub async fn request_with_peer(&mut self, m: u16, peer: SocketAddr) -> Response {
        // XOR-PEER-ADDRESS for IPv6 is XORed with the transaction id, which `request` picks:
        // encode it for the next id (the nonce is known by now, so there is no retry).
        let tid = tid_of(self.sent + 1);
        let mut tmp = Vec::new();
        let mut e = Encoder::new(&mut tmp, m, Class::Request, tid);
        e.xor_address(attr::XOR_PEER_ADDRESS, peer);
        e.finish();
        let value = tmp[24..].to_vec();
        self.request(m, &[(attr::XOR_PEER_ADDRESS, value)]).await
    }
}

/// A transaction id that never repeats within a client (retransmission detection keys on it).
fn tid_of(n: u64) -> [u8; 12] {
    let mut t = [0x7Au8; 12];
    t[4..].copy_from_slice(&n.to_be_bytes());
    t
}

pub fn binding_request(tid: [u8; 12]) -> Vec<u8> {
    let mut buf = Vec::new();
    let mut e = Encoder::new(&mut buf, method::BINDING, Class::Request, tid);
    e.fingerprint();
    e.finish();
    buf
}

pub async fn expect_binding_answer(sock: &UdpSocket, server: SocketAddr, tid: [u8; 12]) {
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
