//! The TURN core driven by a fuzzer-chosen sequence of driver events.
//!
//! The input is a list of records `[op, len, payload[len]]`; `op % 8` picks the event:
//!
//! | op | event |
//! |----|-------|
//! | 0  | a raw datagram (UDP) or frame (TCP) from one of four clients (`handle_client`) |
//! | 1  | a raw datagram from a peer on one of the relays seen so far (`handle_peer`) |
//! | 2  | time passes (`handle_timeout`) |
//! | 3  | the driver answers a pending `BindRelay` (`handle_relay_bound`, Ok or Err) |
//! | 4  | a request signed with valid credentials and the client's latest nonce, so the fuzzer gets past authentication |
//! | 5  | the wall clock steps (`handle_wall_clock`) |
//! | 6  | `close_all` (empty payload or even first byte), else a TCP client's connection closes (`handle_connection_closed`) |
//! | 7  | `start_draining` |
//!
//! Clients 0 and 1 are UDP, 2 and 3 are TCP connections from the same two addresses (so they
//! share nonces). The server has an IPv4 and an IPv6 relay IP, so requests may ask for either
//! family (REQUESTED-ADDRESS-FAMILY) or both (ADDITIONAL-ADDRESS-FAMILY).
//!
//! Oracles, besides "no panic": every STUN message sent to a client frames; ChannelData sent to a
//! UDP client parses and is not padded; everything sent to a TCP client is exactly one frame for
//! `stream_frame_len` and ChannelData is padded to four bytes; a BindRelay names the relay IP of
//! its family; nothing is sent from a relay socket that is not bound, and data to a peer leaves
//! from the relay of the peer's family; a relay is released only once and only if bound; the
//! quota count always equals the allocation count, and allocations by transport add up to it;
//! after `close_all` and answering every pending bind, no allocation, no bound relay and no
//! quota is left.
#![no_main]

use std::collections::HashSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::{Duration, Instant, UNIX_EPOCH};

use libfuzzer_sys::fuzz_target;
use relay_proto::stun::{self, attr, method, Class, Encoder, Message};
use relay_proto::{
    auth, BindError, BindRequest, Config, Dest, Family, FiveTuple, Output, PeerPolicy, Quotas,
    RelayId, Server, Transport,
};

const REALM: &str = "example.org";
const SECRETS: [&[u8]; 2] = [b"secret-one-0123456789", b"secret-two-0123456789"];
const WALL: u64 = 1_700_000_000;
const RELAY_IP: IpAddr = IpAddr::V4(Ipv4Addr::new(203, 0, 113, 10));
const RELAY_IP6: IpAddr = IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x10));
/// The largest frame on a stream: the largest STUN message.
const MAX_FRAME: usize = 20 + 0xFFFC;
const LISTENER: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(198, 51, 100, 1)), 3478);
const ADMIN: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 1)), 9641);

/// Client `i % 4`: port 40000 + (i & 1), over UDP for 0 and 1, TCP for 2 and 3.
fn client(i: usize) -> FiveTuple {
    FiveTuple {
        client: SocketAddr::new(
            IpAddr::V4(Ipv4Addr::new(192, 0, 2, 33)),
            40000 + (i & 1) as u16,
        ),
        server: LISTENER,
        transport: if i & 2 == 0 {
            Transport::Udp
        } else {
            Transport::Tcp
        },
    }
}

/// Peers the fuzzer can name with one byte: public, denied, own, relayed, IPv6.
fn peer(i: u8) -> SocketAddr {
    let table = [
        "8.8.8.8:5000",
        "1.1.1.1:6000",
        "10.0.0.1:5000",
        "127.0.0.1:9641",
        "198.51.100.1:3478",
        "203.0.113.10:50000",
        "203.0.113.10:50001",
        "203.0.113.10:22",
        "[2606:4700::1111]:5000",
        "[::ffff:8.8.8.8]:5000",
        "169.254.169.254:80",
        "8.8.8.8:0",
        "[2001:4860:4860::8888]:6000",
        "[2001:db8::10]:50001",
    ];
    table[usize::from(i) % table.len()].parse().unwrap()
}

struct Creds {
    username: String,
    key: [u8; 16],
}

fn creds(secret: &[u8], user: &str, expiry: u64) -> Creds {
    let username = format!("{expiry}:{user}");
    let password = auth::rest_password(secret, &username);
    let key = auth::long_term_key(username.as_bytes(), REALM.as_bytes(), password.as_bytes());
    Creds { username, key }
}

/// `CORE_INPUT_TRACE=1` prints every output, to see what a crashing input does.
fn trace() -> bool {
    std::env::var_os("CORE_INPUT_TRACE").is_some()
}

struct Driver {
    server: Server,
    quotas: std::sync::Arc<Quotas>,
    now: Instant,
    pending: Vec<BindRequest>,
    bound: HashSet<RelayId>,
    relays: Vec<RelayId>,
    next_port: u16,
    nonces: [Vec<u8>; 2],
    creds: [Creds; 3],
}

impl Driver {
    fn new() -> Self {
        let policy = PeerPolicy::new(
            vec![],
            vec![],
            vec![LISTENER, ADMIN],
            vec![RELAY_IP, RELAY_IP6],
            49152..=65535,
        );
        let mut cfg = Config::new(
            REALM,
            SECRETS.iter().map(|s| s.to_vec()).collect(),
            [7; 32],
            RELAY_IP,
            policy,
        );
        cfg.relay_ips.v6 = Some(RELAY_IP6);
        cfg.quotas = Quotas::new(Some(2), Some(3));
        cfg.permission_lifetime = Duration::from_secs(30);
        cfg.channel_lifetime = Duration::from_secs(60);
        cfg.max_permissions = 4;
        let quotas = cfg.quotas.clone();
        let now = Instant::now();
        Self {
            server: Server::new(cfg, now, UNIX_EPOCH + Duration::from_secs(WALL)),
            quotas,
            now,
            pending: Vec::new(),
            bound: HashSet::new(),
            relays: Vec::new(),
            next_port: 50000,
            nonces: [Vec::new(), Vec::new()],
            creds: [
                creds(SECRETS[0], "alice", WALL + 3600),
                creds(SECRETS[1], "bob", WALL + 3600),
                creds(SECRETS[0], "carol", WALL + 5),
            ],
        }
    }

    fn drain(&mut self) {
        while let Some(out) = self.server.poll_output() {
            if trace() {
                match &out {
                    Output::Transmit(t) => {
                        let b = self.server.payload(t);
                        let code = Message::parse(b).ok().and_then(|m| {
                            m.attributes()
                                .find(|(t, _, _)| *t == attr::ERROR_CODE)
                                .map(|(_, v, _)| u16::from(v[2] & 7) * 100 + u16::from(v[3]))
                        });
                        eprintln!("  transmit {:?} {} bytes, error {code:?}", t.dest, b.len());
                    }
                    o => eprintln!("  {o:?}"),
                }
            }
            match out {
                Output::Transmit(t) => {
                    let bytes = self.server.payload(&t);
                    if let Dest::Client(five) = t.dest {
                        if five.transport.is_stream() {
                            assert_eq!(
                                stun::stream_frame_len(bytes, MAX_FRAME),
                                Ok(Some(bytes.len())),
                                "not one stream frame"
                            );
                        } else {
                            assert!(bytes.len() <= 65_507, "oversized datagram");
                        }
                    } else {
                        assert!(bytes.len() <= 65_507, "oversized datagram");
                    }
                    match t.dest {
                        Dest::Client(five) => match bytes.first() {
                            Some(0x00..=0x03) => {
                                let msg =
                                    Message::parse(bytes).expect("server sent malformed STUN");
                                let nonce = msg
                                    .attributes()
                                    .find(|(t, _, _)| *t == attr::NONCE)
                                    .map(|(_, v, _)| v.to_vec());
                                if let Some(n) = nonce {
                                    let i = usize::from(five.client.port() - 40000);
                                    // Nonces are per client address: both transports share it.
                                    self.nonces[i] = n;
                                }
                            }
                            Some(0x40..=0x4F) => {
                                let (_, data) = stun::parse_channel_data(bytes)
                                    .expect("server sent malformed ChannelData");
                                let unpadded = stun::CHANNEL_HEADER_LEN + data.len();
                                if five.transport.is_stream() {
                                    assert_eq!(bytes.len(), unpadded.next_multiple_of(4));
                                } else {
                                    assert_eq!(bytes.len(), unpadded, "padded over UDP");
                                }
                            }
                            other => panic!("server sent a datagram starting with {other:?}"),
                        },
                        Dest::Peer { relay, peer } => {
                            assert!(
                                self.bound.contains(&relay),
                                "sent from a relay that is not bound"
                            );
                            assert_eq!(
                                relay.family(),
                                Family::of(peer.ip()),
                                "sent to {peer} from a relay of the other family"
                            );
                        }
                    }
                }
                Output::BindRelay(req) => {
                    let ip = match req.relay.family() {
                        Family::V4 => RELAY_IP,
                        Family::V6 => RELAY_IP6,
                    };
                    assert_eq!(req.ip, ip);
                    self.pending.push(req);
                }
                Output::ReleaseRelay(id) => {
                    assert!(self.bound.remove(&id), "released a relay that is not bound");
                }
                Output::Event(_) => {}
            }
        }
        // One quota unit per allocation (binding or active), given back exactly once.
        let n = self.server.allocations();
        assert_eq!(self.quotas.total() as usize, n, "quota count drifted");
        assert_eq!(
            self.server.allocations_by_transport().iter().sum::<usize>(),
            n
        );
    }

    fn bind(&mut self, idx: usize, ok: bool) {
        if self.pending.is_empty() {
            return;
        }
        let req = self.pending.remove(idx % self.pending.len());
        let relay = req.relay;
        let result = if ok {
            let addr = SocketAddr::new(req.ip, self.next_port);
            self.next_port = self.next_port.wrapping_add(1).max(49152);
            self.bound.insert(relay);
            self.relays.push(relay);
            Ok(addr)
        } else {
            Err(BindError::PortsExhausted)
        };
        self.server.handle_relay_bound(self.now, relay, result);
    }

    fn signed_request(&self, p: &[u8]) -> (FiveTuple, Vec<u8>) {
        let get = |i: usize| p.get(i).copied().unwrap_or(0);
        let methods = [
            method::ALLOCATE,
            method::REFRESH,
            method::CREATE_PERMISSION,
            method::CHANNEL_BIND,
            method::BINDING,
            method::SEND,
        ];
        let m = methods[usize::from(get(0)) % methods.len()];
        let flags = get(1);
        // Bit 4 of the credentials byte moves the request to the client's TCP connection.
        let ci = usize::from(flags & 1) | usize::from((get(2) >> 3) & 2);
        let who = &self.creds[usize::from(get(2) % 3)];
        let tid = [get(3) & 7; 12];
        let mut buf = Vec::new();
        let mut e = Encoder::new(&mut buf, m, Class::Request, tid);
        if flags & 2 != 0 {
            e.u32_attr(attr::REQUESTED_TRANSPORT, 17 << 24);
        }
        if flags & 4 != 0 {
            e.xor_address(attr::XOR_PEER_ADDRESS, peer(get(4)));
        }
        if flags & 8 != 0 {
            e.attr(attr::CHANNEL_NUMBER, &[0x40, get(5) & 3, 0, 0]);
        }
        if flags & 16 != 0 {
            e.u32_attr(attr::LIFETIME, u32::from(get(6)) * 10);
        }
        // Address families: bits 3–4 of the tid byte give the value (0 to 3, 1 and 2 valid).
        let family = (get(3) >> 3) & 3;
        if flags & 64 != 0 {
            e.attr(attr::REQUESTED_ADDRESS_FAMILY, &[family, 0, 0, 0]);
        }
        if flags & 128 != 0 {
            let additional = if flags & 64 != 0 || family & 1 == 0 {
                2
            } else {
                family
            };
            e.attr(attr::ADDITIONAL_ADDRESS_FAMILY, &[additional, 0, 0, 0]);
        }
        // The rest: raw TLVs `[type_hi, type_lo, len, value...]`.
        let mut rest = p.get(7..).unwrap_or_default();
        while rest.len() >= 3 {
            let typ = u16::from_be_bytes([rest[0], rest[1]]);
            let len = usize::from(rest[2]).min(rest.len() - 3);
            e.attr(typ, &rest[3..3 + len]);
            rest = &rest[3 + len..];
        }
        e.attr(attr::USERNAME, who.username.as_bytes())
            .attr(attr::REALM, REALM.as_bytes())
            .attr(attr::NONCE, &self.nonces[ci & 1]);
        e.integrity(&who.key);
        if flags & 32 != 0 {
            e.fingerprint();
        }
        e.finish();
        (client(ci), buf)
    }

    fn step(&mut self, op: u8, p: &[u8]) {
        if trace() {
            eprintln!("op {} {:02x?}", op % 8, p);
        }
        let get = |i: usize| p.get(i).copied().unwrap_or(0);
        match op % 8 {
            0 => {
                let five = client(usize::from(get(0) & 3));
                self.server
                    .handle_client(self.now, five, p.get(1..).unwrap_or_default());
            }
            1 => {
                if self.relays.is_empty() {
                    return;
                }
                let relay = self.relays[usize::from(get(0)) % self.relays.len()];
                self.server.handle_peer(
                    self.now,
                    relay,
                    peer(get(1)),
                    p.get(2..).unwrap_or_default(),
                );
            }
            2 => {
                self.now += Duration::from_secs(u64::from(u16::from_be_bytes([get(0), get(1)])));
                self.server.handle_timeout(self.now);
            }
            3 => self.bind(usize::from(get(0)), get(1) & 1 == 0),
            4 => {
                let (five, req) = self.signed_request(p);
                self.server.handle_client(self.now, five, &req);
            }
            5 => {
                let step = i64::from(i16::from_be_bytes([get(0), get(1)]));
                let wall = UNIX_EPOCH + Duration::from_secs((WALL as i64 + step * 10) as u64);
                self.server.handle_wall_clock(self.now, wall);
            }
            6 if get(0) & 1 == 0 => self.server.close_all(),
            6 => {
                // Only stream connections close; a UDP 5-tuple has no connection.
                let five = client(2 | usize::from((get(0) >> 1) & 1));
                self.server.handle_connection_closed(self.now, five);
            }
            _ => self.server.start_draining(),
        }
        self.drain();
    }

    fn finish(mut self) {
        self.server.close_all();
        self.drain();
        while !self.pending.is_empty() {
            self.bind(0, true);
            self.drain();
        }
        assert_eq!(self.server.allocations(), 0);
        assert!(
            self.bound.is_empty(),
            "relays never released: {:?}",
            self.bound
        );
        assert_eq!(self.quotas.total(), 0);
        for u in ["alice", "bob", "carol"] {
            assert_eq!(self.quotas.user(u), 0);
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let mut d = Driver::new();
    // Start with a nonce for client 0, as a real client would.
    let mut first = Vec::new();
    Encoder::new(&mut first, method::ALLOCATE, Class::Request, [9; 12]).finish();
    d.server.handle_client(d.now, client(0), &first);
    d.drain();
    let mut rest = data;
    while rest.len() >= 2 {
        let op = rest[0];
        let len = usize::from(rest[1]).min(rest.len() - 2);
        d.step(op, &rest[2..2 + len]);
        rest = &rest[2 + len..];
    }
    d.finish();
});
