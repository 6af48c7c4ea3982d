//! The relay's per-packet paths, measured without sockets: decoding, ChannelData in and out,
//! Send/Data indications, and permission lookups. Run with `cargo bench -p relay-proto`.
#![allow(missing_docs, clippy::unwrap_used)]

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Instant, SystemTime};

use criterion::{black_box, criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use relay_proto::stun::{self, attr, method, Attrs, Class, Encoder, Message};
use relay_proto::{auth, Config, Dest, FiveTuple, Output, PeerPolicy, RelayId, Server, Transport};

const REALM: &str = "bench.example";
const SECRET: &[u8] = b"bench-secret-0123456789";
const RELAY_IP: IpAddr = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 10));

fn server(max_permissions: usize) -> Server {
    let policy = PeerPolicy::new(vec![], vec![], vec![], vec![RELAY_IP], 49152..=65535);
    let mut cfg = Config::new(REALM, vec![SECRET.to_vec()], [7; 32], RELAY_IP, policy);
    cfg.max_permissions = max_permissions;
    Server::new(cfg, Instant::now(), SystemTime::now())
}

/// A client with an allocation, `peers` permissions and a channel to the first peer.
struct Setup {
    server: Server,
    five: FiveTuple,
    relay: RelayId,
    peer: SocketAddr,
    now: Instant,
}

fn drain(s: &mut Server) -> Vec<Output> {
    std::iter::from_fn(|| s.poll_output()).collect()
}

fn request(
    m: u16,
    tid: u8,
    username: &str,
    key: &[u8; 16],
    nonce: &[u8],
    f: impl Fn(&mut Encoder<'_>),
) -> Vec<u8> {
    let mut b = Vec::new();
    let mut e = Encoder::new(&mut b, m, Class::Request, [tid; 12]);
    f(&mut e);
    e.attr(attr::USERNAME, username.as_bytes())
        .attr(attr::REALM, REALM.as_bytes())
        .attr(attr::NONCE, nonce)
        .integrity(key);
    e.finish();
    b
}

fn setup(peers: usize) -> Setup {
    let mut server = server(peers.max(1));
    let now = Instant::now();
    let five = FiveTuple {
        client: "198.51.100.7:40000".parse().unwrap(),
        server: "192.0.2.1:3478".parse().unwrap(),
        transport: Transport::Udp,
    };
    let expiry = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 3600;
    let (username, password) = relay_proto::rest_credentials(SECRET, "bench", expiry);
    let key = auth::long_term_key(username.as_bytes(), REALM.as_bytes(), password.as_bytes());
    // First Allocate: 401 with a nonce.
    let mut b = Vec::new();
    let mut e = Encoder::new(&mut b, method::ALLOCATE, Class::Request, [1; 12]);
    e.u32_attr(attr::REQUESTED_TRANSPORT, 17 << 24);
    e.finish();
    server.handle_client(now, five, &b);
    let nonce = drain(&mut server)
        .into_iter()
        .find_map(|o| match o {
            Output::Transmit(t) => {
                let m = Message::parse(server.payload(&t)).unwrap();
                m.attributes()
                    .find(|a| a.0 == attr::NONCE)
                    .map(|a| a.1.to_vec())
            }
            _ => None,
        })
        .unwrap();
    let alloc = request(method::ALLOCATE, 2, &username, &key, &nonce, |e| {
        e.u32_attr(attr::REQUESTED_TRANSPORT, 17 << 24);
    });
    server.handle_client(now, five, &alloc);
    let relay = drain(&mut server)
        .into_iter()
        .find_map(|o| match o {
            Output::BindRelay(b) => Some(b.relay),
            _ => None,
        })
        .unwrap();
    server.handle_relay_bound(now, relay, Ok(SocketAddr::new(RELAY_IP, 50000)));
    drain(&mut server);
    let peer: SocketAddr = "203.0.114.1:5000".parse().unwrap();
    for i in 0..peers {
        let p = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(203, 0, 114, i as u8 + 1)), 5000);
        let req = request(
            method::CREATE_PERMISSION,
            10 + i as u8,
            &username,
            &key,
            &nonce,
            |e| {
                e.xor_address(attr::XOR_PEER_ADDRESS, p);
            },
        );
        server.handle_client(now, five, &req);
        drain(&mut server);
    }
    let bind = request(method::CHANNEL_BIND, 200, &username, &key, &nonce, |e| {
        e.u32_attr(attr::CHANNEL_NUMBER, 0x4000 << 16)
            .xor_address(attr::XOR_PEER_ADDRESS, peer);
    });
    server.handle_client(now, five, &bind);
    drain(&mut server);
    Setup {
        server,
        five,
        relay,
        peer,
        now,
    }
}

fn channel_data(payload: &[u8]) -> Vec<u8> {
    let mut v = vec![0x40, 0x00];
    v.extend_from_slice(&(payload.len() as u16).to_be_bytes());
    v.extend_from_slice(payload);
    v
}

fn benches(c: &mut Criterion) {
    let payload = [0xAB; 200];

    let mut g = c.benchmark_group("decode");
    g.throughput(Throughput::Elements(1));
    let mut send = Vec::new();
    Encoder::new(&mut send, method::SEND, Class::Indication, [3; 12])
        .xor_address(attr::XOR_PEER_ADDRESS, "203.0.114.1:5000".parse().unwrap())
        .attr(attr::DATA, &payload)
        .fingerprint();
    let send = {
        // Fix the length field (the encoder does it in `finish`).
        let mut v = send;
        let len = (v.len() - 20) as u16;
        v[2..4].copy_from_slice(&len.to_be_bytes());
        v
    };
    g.bench_function("send_indication", |b| {
        b.iter(|| {
            let m = Message::parse(black_box(&send)).unwrap();
            black_box(Attrs::decode(&m).unwrap().data.map(<[u8]>::len))
        })
    });
    let cd = channel_data(&payload);
    g.bench_function("channel_data", |b| {
        b.iter(|| black_box(stun::parse_channel_data(black_box(&cd))))
    });
    g.finish();

    let mut g = c.benchmark_group("relay");
    g.throughput(Throughput::Elements(1));
    for peers in [1, 64] {
        let mut s = setup(peers);
        let five = s.five;
        let cd = channel_data(&payload);
        g.bench_function(format!("channel_data_in/{peers}_permissions"), |b| {
            b.iter(|| {
                s.server.handle_client(s.now, five, black_box(&cd));
                while let Some(o) = s.server.poll_output() {
                    if let Output::Transmit(t) = o {
                        debug_assert!(matches!(t.dest, Dest::Peer { .. }));
                        black_box(s.server.payload(&t).len());
                    }
                }
            })
        });
        let (relay, peer, now) = (s.relay, s.peer, s.now);
        g.bench_function(format!("channel_data_out/{peers}_permissions"), |b| {
            b.iter(|| {
                s.server.handle_peer(now, relay, peer, black_box(&payload));
                while let Some(o) = s.server.poll_output() {
                    if let Output::Transmit(t) = o {
                        black_box(s.server.payload(&t).len());
                    }
                }
            })
        });
        let unbound = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(203, 0, 114, peers as u8)), 6000);
        g.bench_function(format!("data_indication_out/{peers}_permissions"), |b| {
            b.iter(|| {
                s.server
                    .handle_peer(now, relay, unbound, black_box(&payload));
                while let Some(o) = s.server.poll_output() {
                    if let Output::Transmit(t) = o {
                        black_box(s.server.payload(&t).len());
                    }
                }
            })
        });
        g.bench_function(format!("no_permission_drop/{peers}_permissions"), |b| {
            let stranger: SocketAddr = "203.0.115.9:7000".parse().unwrap();
            b.iter_batched(
                || (),
                |()| {
                    s.server
                        .handle_peer(now, relay, stranger, black_box(&payload));
                    black_box(s.server.poll_output())
                },
                BatchSize::SmallInput,
            )
        });
    }
    g.finish();
}

criterion_group!(hot, benches);
criterion_main!(hot);
