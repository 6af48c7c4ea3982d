//! The TURN core driven by a fuzzer-chosen sequence of driver events.
//!
//! The input is a list of records `[op, len, payload[len]]`; `op % 8` picks the event:
//!
//! | op | event |
//! |----|-------|
//! | 0  | a raw datagram from one of two clients (`handle_client`) |
//! | 1  | a raw datagram from a peer on one of the relays seen so far (`handle_peer`) |
//! | 2  | time passes (`handle_timeout`) |
//! | 3  | the driver answers a pending `BindRelay` (`handle_relay_bound`, Ok or Err) |
//! | 4  | a request signed with valid credentials and the client's latest nonce, so the fuzzer gets past authentication |
//! | 5  | the wall clock steps (`handle_wall_clock`) |
//! | 6  | `close_all` |
//! | 7  | `start_draining` |
//!
//! Oracles, besides "no panic": every STUN message sent to a client frames; ChannelData sent to a
//! client parses; nothing is sent from a relay socket that is not bound; a relay is released only
//! once and only if bound; after `close_all` and answering every pending bind, no allocation,
//! no bound relay and no quota is left.
#![no_main]

use std::collections::HashSet;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant, UNIX_EPOCH};

use libfuzzer_sys::fuzz_target;
use relay_proto::stun::{self, attr, method, Class, Encoder, Message};
use relay_proto::{
    auth, BindError, Config, Dest, FiveTuple, Output, PeerPolicy, Quotas, RelayId, Server,
    Transport,
};

const REALM: &str = "example.org";
const SECRETS: [&[u8]; 2] = [b"secret-one-0123456789", b"secret-two-0123456789"];
const WALL: u64 = 1_700_000_000;
const RELAY_IP: IpAddr = IpAddr::V4(Ipv4Addr::new(203, 0, 113, 10));
const LISTENER: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(198, 51, 100, 1)), 3478);
const ADMIN: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 1)), 9641);

fn client(i: usize) -> FiveTuple {
    FiveTuple {
        client: SocketAddr::new(IpAddr::V4(Ipv4Addr::new(192, 0, 2, 33)), 40000 + i as u16),
        server: LISTENER,
        transport: Transport::Udp,
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
    pending: Vec<RelayId>,
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
            vec![RELAY_IP],
            49152..=65535,
        );
        let mut cfg = Config::new(
            REALM,
            SECRETS.iter().map(|s| s.to_vec()).collect(),
            [7; 32],
            RELAY_IP,
            policy,
        );
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
                    assert!(bytes.len() <= 65_507, "oversized datagram");
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
                                    self.nonces[i] = n;
                                }
                            }
                            Some(0x40..=0x4F) => {
                                stun::parse_channel_data(bytes)
                                    .expect("server sent malformed ChannelData");
                            }
                            other => panic!("server sent a datagram starting with {other:?}"),
                        },
                        Dest::Peer { relay, .. } => {
                            assert!(
                                self.bound.contains(&relay),
                                "sent from a relay that is not bound"
                            );
                        }
                    }
                }
                Output::BindRelay(req) => {
                    assert_eq!(req.ip, RELAY_IP);
                    self.pending.push(req.relay);
                }
                Output::ReleaseRelay(id) => {
                    assert!(self.bound.remove(&id), "released a relay that is not bound");
                }
                Output::Event(_) => {}
            }
        }
    }

    fn bind(&mut self, idx: usize, ok: bool) {
        if self.pending.is_empty() {
            return;
        }
        let relay = self.pending.remove(idx % self.pending.len());
        let result = if ok {
            let addr = SocketAddr::new(RELAY_IP, self.next_port);
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
        let ci = usize::from(flags & 1);
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
            .attr(attr::NONCE, &self.nonces[ci]);
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
                let five = client(usize::from(get(0) & 1));
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
            6 => self.server.close_all(),
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
