//! Shared harness of the `relay-proto` integration tests.
//!
//! A [`Harness`] owns a [`Server`] built from a fixed test [`Config`], a virtual clock origin
//! (`t0`) and the fixed wall clock [`WALL_SECS`]. Every `handle_*` call is followed by a full drain
//! of [`Server::poll_output`], copied into owned [`Out`] values; `Output::BindRelay` is answered
//! at once according to [`BindMode`] with an address of the request's IP (so of its family: a
//! dual allocation gets an IPv4 and an IPv6 relay). Requests are built with [`Request`] (which encodes with
//! `stun::Encoder`) and responses read with the free functions at the end of this file.
#![allow(dead_code, clippy::unwrap_used)]

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use relay_proto::auth;
use relay_proto::stun::{self, attr, method, Attrs, Class, Encoder, Message};
use relay_proto::{
    BindError, BindRequest, Config, Dest, Event, Family, FiveTuple, Output, PeerPolicy, Quotas,
    RelayId, Server, Stats, Transport,
};

pub(crate) const REALM: &str = "example.org";
pub(crate) const SECRET_ONE: &[u8] = b"secret-one-0123456789";
pub(crate) const SECRET_TWO: &[u8] = b"secret-two-0123456789";
/// The wall clock at `t0`, in Unix seconds.
pub(crate) const WALL_SECS: u64 = 1_700_000_000;
/// Documentation space: denied as a peer by default, fine as the relay IP.
pub(crate) const RELAY_IP: IpAddr = IpAddr::V4(Ipv4Addr::new(203, 0, 113, 10));
/// The IPv6 relay IP of dual-stack and IPv6-only configs (documentation space).
pub(crate) const RELAY_IP6: IpAddr = IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x10));
/// Our listener (the `server` side of every client 5-tuple).
pub(crate) const LISTENER: SocketAddr =
    SocketAddr::new(IpAddr::V4(Ipv4Addr::new(198, 51, 100, 1)), 3478);
/// Our admin endpoint.
pub(crate) const ADMIN: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 1)), 9641);
/// Where test clients live (their server-reflexive IP).
pub(crate) const CLIENT_IP: IpAddr = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 33));
/// Public peers.
pub(crate) const PEER_A: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(8, 8, 8, 8)), 5000);
pub(crate) const PEER_B: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(1, 1, 1, 1)), 6000);
pub(crate) const PEER_C: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(9, 9, 9, 9)), 7000);
/// The n-th relay socket bound by the harness gets port `RELAY_PORT_BASE + n`.
pub(crate) const RELAY_PORT_BASE: u16 = 50000;
/// The REQUESTED-TRANSPORT value of UDP.
pub(crate) const UDP: u8 = 17;
/// REQUESTED-/ADDITIONAL-ADDRESS-FAMILY values.
pub(crate) const FAMILY_V4: u8 = 0x01;
pub(crate) const FAMILY_V6: u8 = 0x02;

pub(crate) fn wall() -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(WALL_SECS)
}

pub(crate) fn policy() -> PeerPolicy {
    PeerPolicy::new(
        vec![],
        vec![],
        vec![LISTENER, ADMIN],
        vec![RELAY_IP],
        49152..=65535,
    )
}

pub(crate) fn config() -> Config {
    Config::new(
        REALM,
        vec![SECRET_ONE.to_vec(), SECRET_TWO.to_vec()],
        [7; 32],
        RELAY_IP,
        policy(),
    )
}

pub(crate) fn five(port: u16) -> FiveTuple {
    five_on(port, Transport::Udp)
}

/// A client 5-tuple over `transport` (a TCP/TLS connection for stream transports).
pub(crate) fn five_on(port: u16, transport: Transport) -> FiveTuple {
    FiveTuple {
        client: SocketAddr::new(CLIENT_IP, port),
        server: LISTENER,
        transport,
    }
}

/// The sum of a per-transport counter row over every transport.
pub(crate) fn all_transports<const N: usize>(rows: &[[u64; N]; Transport::COUNT], i: usize) -> u64 {
    rows.iter().map(|r| r[i]).sum()
}

/// A unique transaction id per call.
pub(crate) fn tid() -> [u8; 12] {
    static NEXT: AtomicU32 = AtomicU32::new(1);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let mut t = [0x5A; 12];
    t[8..].copy_from_slice(&n.to_be_bytes());
    t
}

/// REST credentials and their long-term key.
#[derive(Debug, Clone)]
pub(crate) struct Creds {
    pub(crate) username: String,
    pub(crate) key: [u8; 16],
}

impl Creds {
    /// `expiry:user` under `secret`.
    pub(crate) fn rest(secret: &[u8], user: &str, expiry: u64) -> Self {
        Self::with_username(secret, format!("{expiry}:{user}"))
    }

    /// Any username, with the REST password `secret` gives it.
    pub(crate) fn with_username(secret: &[u8], username: impl Into<String>) -> Self {
        let username = username.into();
        let password = auth::rest_password(secret, &username);
        let key = auth::long_term_key(username.as_bytes(), REALM.as_bytes(), password.as_bytes());
        Self { username, key }
    }

    /// A username with an explicit password (not the REST one).
    pub(crate) fn with_password(username: impl Into<String>, password: &str) -> Self {
        let username = username.into();
        let key = auth::long_term_key(username.as_bytes(), REALM.as_bytes(), password.as_bytes());
        Self { username, key }
    }

    pub(crate) fn alice() -> Self {
        Self::rest(SECRET_ONE, "alice", WALL_SECS + 3600)
    }

    pub(crate) fn bob() -> Self {
        Self::rest(SECRET_ONE, "bob", WALL_SECS + 3600)
    }
}

#[derive(Debug, Clone)]
enum Part {
    Raw(u16, Vec<u8>),
    Xor(u16, SocketAddr),
}

/// A STUN message to send, encoded with `stun::Encoder`.
#[derive(Debug, Clone)]
pub(crate) struct Request {
    method: u16,
    class: Class,
    tid: [u8; 12],
    parts: Vec<Part>,
    key: Option<Vec<u8>>,
    fingerprint: bool,
}

impl Request {
    pub(crate) fn new(method: u16) -> Self {
        Self {
            method,
            class: Class::Request,
            tid: tid(),
            parts: Vec::new(),
            key: None,
            fingerprint: false,
        }
    }

    /// An Allocate with REQUESTED-TRANSPORT UDP.
    pub(crate) fn allocate() -> Self {
        Self::new(method::ALLOCATE).transport(UDP)
    }

    pub(crate) fn class(mut self, class: Class) -> Self {
        self.class = class;
        self
    }

    pub(crate) fn tid(mut self, tid: [u8; 12]) -> Self {
        self.tid = tid;
        self
    }

    pub(crate) fn attr(mut self, typ: u16, value: &[u8]) -> Self {
        self.parts.push(Part::Raw(typ, value.to_vec()));
        self
    }

    pub(crate) fn u32(self, typ: u16, v: u32) -> Self {
        self.attr(typ, &v.to_be_bytes())
    }

    /// REQUESTED-ADDRESS-FAMILY.
    pub(crate) fn family(self, family: u8) -> Self {
        self.attr(attr::REQUESTED_ADDRESS_FAMILY, &[family, 0, 0, 0])
    }

    /// ADDITIONAL-ADDRESS-FAMILY (a dual allocation).
    pub(crate) fn additional_family(self, family: u8) -> Self {
        self.attr(attr::ADDITIONAL_ADDRESS_FAMILY, &[family, 0, 0, 0])
    }

    pub(crate) fn transport(self, proto: u8) -> Self {
        self.u32(attr::REQUESTED_TRANSPORT, u32::from(proto) << 24)
    }

    pub(crate) fn lifetime(self, secs: u32) -> Self {
        self.u32(attr::LIFETIME, secs)
    }

    pub(crate) fn channel(self, number: u16) -> Self {
        let [hi, lo] = number.to_be_bytes();
        self.attr(attr::CHANNEL_NUMBER, &[hi, lo, 0, 0])
    }

    pub(crate) fn xor(mut self, typ: u16, addr: SocketAddr) -> Self {
        self.parts.push(Part::Xor(typ, addr));
        self
    }

    pub(crate) fn peer(self, addr: SocketAddr) -> Self {
        self.xor(attr::XOR_PEER_ADDRESS, addr)
    }

    pub(crate) fn data(self, data: &[u8]) -> Self {
        self.attr(attr::DATA, data)
    }

    /// USERNAME, REALM and NONCE now, MESSAGE-INTEGRITY with the credentials' key at the end.
    pub(crate) fn auth(self, creds: &Creds, nonce: &[u8]) -> Self {
        let key = creds.key;
        self.attr(attr::USERNAME, creds.username.as_bytes())
            .attr(attr::REALM, REALM.as_bytes())
            .attr(attr::NONCE, nonce)
            .integrity(&key)
    }

    /// MESSAGE-INTEGRITY with `key`, appended after every other attribute.
    pub(crate) fn integrity(mut self, key: &[u8]) -> Self {
        self.key = Some(key.to_vec());
        self
    }

    pub(crate) fn fingerprint(mut self) -> Self {
        self.fingerprint = true;
        self
    }

    pub(crate) fn transaction_id(&self) -> [u8; 12] {
        self.tid
    }

    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut buf = Vec::new();
        let mut e = Encoder::new(&mut buf, self.method, self.class, self.tid);
        for p in &self.parts {
            match p {
                Part::Raw(t, v) => e.attr(*t, v),
                Part::Xor(t, a) => e.xor_address(*t, *a),
            };
        }
        if let Some(key) = &self.key {
            e.integrity(key);
        }
        if self.fingerprint {
            e.fingerprint();
        }
        e.finish();
        buf
    }
}

/// Appends a raw attribute at the end of an encoded message and fixes the header length.
pub(crate) fn append_attr(msg: &mut Vec<u8>, typ: u16, value: &[u8]) {
    msg.extend_from_slice(&typ.to_be_bytes());
    msg.extend_from_slice(&(value.len() as u16).to_be_bytes());
    msg.extend_from_slice(value);
    msg.resize(msg.len() + (4 - value.len() % 4) % 4, 0);
    fix_len(msg);
}

/// Sets the header length field to the size of the message body.
pub(crate) fn fix_len(msg: &mut [u8]) {
    let len = (msg.len() - stun::HEADER_LEN) as u16;
    msg[2..4].copy_from_slice(&len.to_be_bytes());
}

/// A ChannelData message.
pub(crate) fn channel_data(number: u16, payload: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(4 + payload.len());
    v.extend_from_slice(&number.to_be_bytes());
    v.extend_from_slice(&(payload.len() as u16).to_be_bytes());
    v.extend_from_slice(payload);
    v
}

/// An output, with the transmit's bytes copied out of the server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Out {
    Transmit { dest: Dest, bytes: Vec<u8> },
    Bind(BindRequest),
    Release(RelayId),
    Event(Event),
}

/// How the harness answers `Output::BindRelay`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum BindMode {
    /// At once, with `<request ip>:(RELAY_PORT_BASE + n)`.
    Ok,
    /// At once, with this error.
    Fail(BindError),
    /// At once: this error for requests of this family, like `Ok` for the other.
    FailFamily(Family, BindError),
    /// Not at all: the test calls [`Harness::relay_bound`].
    Manual,
}

/// A test client: its 5-tuple, credentials, the last nonce it got, and its allocation.
#[derive(Debug, Clone)]
pub(crate) struct Client {
    pub(crate) five: FiveTuple,
    pub(crate) creds: Creds,
    pub(crate) nonce: Vec<u8>,
    /// The first relay (the primary family's: IPv4 of a dual allocation).
    pub(crate) relay: Option<RelayId>,
    /// Every relay asked for, in BindRelay order.
    pub(crate) relays: Vec<RelayId>,
    /// The first XOR-RELAYED-ADDRESS.
    pub(crate) relayed: Option<SocketAddr>,
}

impl Client {
    pub(crate) fn new(port: u16, creds: Creds) -> Self {
        Self::on(five(port), creds)
    }

    /// A client on any 5-tuple (another transport, an IPv6 client).
    pub(crate) fn on(five: FiveTuple, creds: Creds) -> Self {
        Self {
            five,
            creds,
            nonce: Vec::new(),
            relay: None,
            relays: Vec::new(),
            relayed: None,
        }
    }

    /// The relay of `family`; panics if the allocation asked for none.
    pub(crate) fn relay_of(&self, family: Family) -> RelayId {
        *self
            .relays
            .iter()
            .find(|r| r.family() == family)
            .expect("client has no relay of that family")
    }

    pub(crate) fn relay(&self) -> RelayId {
        self.relay.expect("client has no allocation")
    }

    /// A request of `method` authenticated with this client's credentials and nonce.
    pub(crate) fn req(&self, method: u16) -> Request {
        Request::new(method).auth(&self.creds, &self.nonce)
    }

    /// The same, with extra attributes added by `f` before the credentials.
    pub(crate) fn req_with(&self, method: u16, f: impl FnOnce(Request) -> Request) -> Request {
        f(Request::new(method)).auth(&self.creds, &self.nonce)
    }
}

/// A server under test with a virtual clock.
#[derive(Debug)]
pub(crate) struct Harness {
    pub(crate) server: Server,
    pub(crate) t0: Instant,
    pub(crate) bind_mode: BindMode,
    /// The IP `next_relay_addr` names: the config's IPv4 relay IP, else its IPv6 one.
    relay_ip: IpAddr,
    binds: u16,
}

impl Default for Harness {
    fn default() -> Self {
        Self::new()
    }
}

impl Harness {
    pub(crate) fn new() -> Self {
        Self::with(|_| {})
    }

    /// A harness whose config `f` adjusts first.
    pub(crate) fn with(f: impl FnOnce(&mut Config)) -> Self {
        let mut cfg = config();
        f(&mut cfg);
        let t0 = Instant::now();
        Self {
            relay_ip: cfg.relay_ips.v4.or(cfg.relay_ips.v6).unwrap(),
            server: Server::new(cfg, t0, wall()),
            t0,
            bind_mode: BindMode::Ok,
            binds: 0,
        }
    }

    /// `t0 + secs`.
    pub(crate) fn at(&self, secs: u64) -> Instant {
        self.t0 + Duration::from_secs(secs)
    }

    /// `t0 + ms` milliseconds.
    pub(crate) fn at_ms(&self, ms: u64) -> Instant {
        self.t0 + Duration::from_millis(ms)
    }

    pub(crate) fn stats(&self) -> &Stats {
        self.server.stats()
    }

    pub(crate) fn quotas(&self) -> Arc<Quotas> {
        Arc::clone(&self.server.config().quotas)
    }

    /// The address the harness gives the next relay socket (of the default family).
    pub(crate) fn next_relay_addr(&self) -> SocketAddr {
        SocketAddr::new(self.relay_ip, RELAY_PORT_BASE + self.binds)
    }

    /// The client's TCP/TLS connection closed.
    pub(crate) fn connection_closed(&mut self, now: Instant, five: FiveTuple) -> Vec<Out> {
        self.server.handle_connection_closed(now, five);
        self.drain(now)
    }

    pub(crate) fn client_sends(&mut self, now: Instant, five: FiveTuple, bytes: &[u8]) -> Vec<Out> {
        self.server.handle_client(now, five, bytes);
        self.drain(now)
    }

    pub(crate) fn peer_sends(
        &mut self,
        now: Instant,
        relay: RelayId,
        from: SocketAddr,
        bytes: &[u8],
    ) -> Vec<Out> {
        self.server.handle_peer(now, relay, from, bytes);
        self.drain(now)
    }

    /// The control plane revoked credential group `group` until `until_unix`.
    pub(crate) fn revoke(&mut self, now: Instant, group: &str, until_unix: u64) -> Vec<Out> {
        self.server.handle_revocation(now, group, until_unix);
        self.drain(now)
    }

    /// The driver's timer tick re-anchored the wall clock at `now`, which the harness keeps in
    /// step with the virtual clock (`WALL_SECS` at `t0`).
    pub(crate) fn wall_clock(&mut self, now: Instant) {
        let wall = wall() + now.saturating_duration_since(self.t0);
        self.server.handle_wall_clock(now, wall);
    }

    pub(crate) fn timeout(&mut self, now: Instant) -> Vec<Out> {
        self.server.handle_timeout(now);
        self.drain(now)
    }

    pub(crate) fn relay_bound(
        &mut self,
        now: Instant,
        relay: RelayId,
        result: Result<SocketAddr, BindError>,
    ) -> Vec<Out> {
        self.server.handle_relay_bound(now, relay, result);
        self.drain(now)
    }

    /// Drains every output, answering `BindRelay` as `bind_mode` says.
    pub(crate) fn drain(&mut self, now: Instant) -> Vec<Out> {
        let mut outs = Vec::new();
        while let Some(o) = self.server.poll_output() {
            match o {
                Output::Transmit(t) => outs.push(Out::Transmit {
                    dest: t.dest,
                    bytes: self.server.payload(&t).to_vec(),
                }),
                Output::BindRelay(req) => {
                    outs.push(Out::Bind(req));
                    // A BindRelay names the IP, hence the family, of the socket it wants.
                    assert_eq!(Family::of(req.ip), req.relay.family(), "{req:?}");
                    let fail = match self.bind_mode {
                        BindMode::Manual => continue,
                        BindMode::Ok => None,
                        BindMode::Fail(e) => Some(e),
                        BindMode::FailFamily(f, e) => (f == req.relay.family()).then_some(e),
                    };
                    let result = match fail {
                        Some(e) => Err(e),
                        None => {
                            let addr = SocketAddr::new(req.ip, RELAY_PORT_BASE + self.binds);
                            self.binds += 1;
                            Ok(addr)
                        }
                    };
                    self.server.handle_relay_bound(now, req.relay, result);
                }
                Output::ReleaseRelay(id) => outs.push(Out::Release(id)),
                Output::Event(e) => outs.push(Out::Event(e)),
            }
        }
        outs
    }

    /// Sends `bytes` from `five` and returns the one datagram sent back to `five`.
    pub(crate) fn transact(&mut self, now: Instant, five: FiveTuple, bytes: &[u8]) -> Vec<u8> {
        let outs = self.client_sends(now, five, bytes);
        response_to(&outs, five)
    }

    /// Gets a nonce for `client` the normal way: an Allocate without credentials, answered 401.
    pub(crate) fn fetch_nonce(&mut self, now: Instant, client: &mut Client) {
        let resp = self.transact(now, client.five, &Request::allocate().encode());
        assert_eq!(error_code(&resp), Some(401));
        assert_eq!(
            attr_value(&resp, attr::REALM).as_deref(),
            Some(REALM.as_bytes())
        );
        client.nonce = nonce_of(&resp).expect("401 without NONCE");
    }

    /// The full allocate flow: 401, then the Allocate with credentials. Asserts success and
    /// returns the success response.
    pub(crate) fn allocate(&mut self, now: Instant, client: &mut Client) -> Vec<u8> {
        self.allocate_with(now, client, |r| r)
    }

    /// The same, with extra Allocate attributes (after REQUESTED-TRANSPORT) added by `f`.
    pub(crate) fn allocate_with(
        &mut self,
        now: Instant,
        client: &mut Client,
        f: impl FnOnce(Request) -> Request,
    ) -> Vec<u8> {
        self.fetch_nonce(now, client);
        let req = client.req_with(method::ALLOCATE, |r| f(r.transport(UDP)));
        let outs = self.client_sends(now, client.five, &req.encode());
        let relays: Vec<RelayId> = binds(&outs).iter().map(|b| b.relay).collect();
        let resp = response_to(&outs, client.five);
        assert_eq!(
            class_of(&resp),
            Class::Success,
            "error {:?}",
            error_code(&resp)
        );
        client.relay = Some(*relays.first().expect("no BindRelay"));
        client.relays = relays;
        client.relayed = xor_addr(&resp, attr::XOR_RELAYED_ADDRESS);
        resp
    }

    /// A client on `port` with `creds`, allocated at `now`.
    pub(crate) fn allocated_as(&mut self, now: Instant, port: u16, creds: Creds) -> Client {
        let mut c = Client::new(port, creds);
        self.allocate(now, &mut c);
        c
    }

    /// Alice on `port`, allocated at `t0`.
    pub(crate) fn allocated(&mut self, port: u16) -> Client {
        let now = self.t0;
        self.allocated_as(now, port, Creds::alice())
    }

    pub(crate) fn refresh(&mut self, now: Instant, c: &Client, lifetime: Option<u32>) -> Vec<u8> {
        let req = c.req_with(method::REFRESH, |r| match lifetime {
            Some(l) => r.lifetime(l),
            None => r,
        });
        self.transact(now, c.five, &req.encode())
    }

    pub(crate) fn create_permission(
        &mut self,
        now: Instant,
        c: &Client,
        peers: &[SocketAddr],
    ) -> Vec<u8> {
        let req = c.req_with(method::CREATE_PERMISSION, |mut r| {
            for p in peers {
                r = r.peer(*p);
            }
            r
        });
        self.transact(now, c.five, &req.encode())
    }

    pub(crate) fn channel_bind(
        &mut self,
        now: Instant,
        c: &Client,
        number: u16,
        peer: SocketAddr,
    ) -> Vec<u8> {
        let req = c.req_with(method::CHANNEL_BIND, |r| r.channel(number).peer(peer));
        self.transact(now, c.five, &req.encode())
    }

    /// A Send indication from `c` to `peer`.
    pub(crate) fn send_indication(
        &mut self,
        now: Instant,
        c: &Client,
        peer: SocketAddr,
        data: &[u8],
    ) -> Vec<Out> {
        let ind = Request::new(method::SEND)
            .class(Class::Indication)
            .peer(peer)
            .data(data)
            .encode();
        self.client_sends(now, c.five, &ind)
    }
}

// ---- reading outputs ----

/// The single datagram sent to `five`; panics unless there is exactly one transmit and it goes
/// there.
pub(crate) fn response_to(outs: &[Out], five: FiveTuple) -> Vec<u8> {
    let ts = transmits(outs);
    assert_eq!(ts.len(), 1, "expected exactly one transmit, got {outs:?}");
    assert_eq!(ts[0].0, Dest::Client(five));
    ts[0].1.clone()
}

pub(crate) fn transmits(outs: &[Out]) -> Vec<(Dest, Vec<u8>)> {
    outs.iter()
        .filter_map(|o| match o {
            Out::Transmit { dest, bytes } => Some((*dest, bytes.clone())),
            _ => None,
        })
        .collect()
}

pub(crate) fn binds(outs: &[Out]) -> Vec<BindRequest> {
    outs.iter()
        .filter_map(|o| match o {
            Out::Bind(b) => Some(*b),
            _ => None,
        })
        .collect()
}

pub(crate) fn releases(outs: &[Out]) -> Vec<RelayId> {
    outs.iter()
        .filter_map(|o| match o {
            Out::Release(r) => Some(*r),
            _ => None,
        })
        .collect()
}

pub(crate) fn events(outs: &[Out]) -> Vec<Event> {
    outs.iter()
        .filter_map(|o| match o {
            Out::Event(e) => Some(*e),
            _ => None,
        })
        .collect()
}

// ---- reading STUN messages ----

/// Parses a message the server sent; panics if it does not frame.
pub(crate) fn parse(bytes: &[u8]) -> Message<'_> {
    Message::parse(bytes).expect("server sent a malformed STUN message")
}

pub(crate) fn class_of(bytes: &[u8]) -> Class {
    parse(bytes).class()
}

pub(crate) fn method_of(bytes: &[u8]) -> u16 {
    parse(bytes).method()
}

/// The first value of attribute `typ`.
pub(crate) fn attr_value(bytes: &[u8], typ: u16) -> Option<Vec<u8>> {
    parse(bytes)
        .attributes()
        .find(|(t, _, _)| *t == typ)
        .map(|(_, v, _)| v.to_vec())
}

/// Attribute types in order.
pub(crate) fn attr_types(bytes: &[u8]) -> Vec<u16> {
    parse(bytes).attributes().map(|(t, _, _)| t).collect()
}

/// ERROR-CODE as class*100 + number.
pub(crate) fn error_code(bytes: &[u8]) -> Option<u16> {
    let v = attr_value(bytes, attr::ERROR_CODE)?;
    assert!(v.len() >= 4, "short ERROR-CODE");
    Some(u16::from(v[2] & 0x07) * 100 + u16::from(v[3]))
}

pub(crate) fn xor_addr(bytes: &[u8], typ: u16) -> Option<SocketAddr> {
    let msg = parse(bytes);
    let v = attr_value(bytes, typ)?;
    stun::decode_xor_address(&v, &msg.transaction_id())
}

/// Every value of attribute `typ`, in order.
pub(crate) fn attr_values(bytes: &[u8], typ: u16) -> Vec<Vec<u8>> {
    parse(bytes)
        .attributes()
        .filter(|(t, _, _)| *t == typ)
        .map(|(_, v, _)| v.to_vec())
        .collect()
}

/// Every XOR address of type `typ`, in order; panics on one that does not decode.
pub(crate) fn xor_addrs(bytes: &[u8], typ: u16) -> Vec<SocketAddr> {
    let tid = parse(bytes).transaction_id();
    attr_values(bytes, typ)
        .iter()
        .map(|v| stun::decode_xor_address(v, &tid).expect("bad XOR address"))
        .collect()
}

/// ADDRESS-ERROR-CODE (RFC 8656 §18.12) as (family, class*100 + number), checking its layout:
/// family, reserved zero, class, number, a UTF-8 reason phrase.
pub(crate) fn address_error_code(bytes: &[u8]) -> Option<(u8, u16)> {
    let v = attr_value(bytes, attr::ADDRESS_ERROR_CODE)?;
    assert!(v.len() >= 4, "short ADDRESS-ERROR-CODE");
    assert_eq!(v[1], 0, "reserved byte of ADDRESS-ERROR-CODE");
    assert!(std::str::from_utf8(&v[4..]).is_ok(), "reason is not UTF-8");
    Some((v[0], u16::from(v[2] & 0x07) * 100 + u16::from(v[3])))
}

pub(crate) fn lifetime_of(bytes: &[u8]) -> Option<u32> {
    let v = attr_value(bytes, attr::LIFETIME)?;
    Some(u32::from_be_bytes(v.try_into().ok()?))
}

pub(crate) fn nonce_of(bytes: &[u8]) -> Option<Vec<u8>> {
    attr_value(bytes, attr::NONCE)
}

pub(crate) fn unknown_attributes(bytes: &[u8]) -> Vec<u16> {
    attr_value(bytes, attr::UNKNOWN_ATTRIBUTES)
        .unwrap_or_default()
        .chunks_exact(2)
        .map(|c| u16::from_be_bytes([c[0], c[1]]))
        .collect()
}

/// Whether the message carries a MESSAGE-INTEGRITY that verifies under `key`.
pub(crate) fn verifies(bytes: &[u8], key: &[u8]) -> bool {
    let msg = parse(bytes);
    Attrs::decode(&msg).unwrap().verify_integrity(&msg, key)
}
