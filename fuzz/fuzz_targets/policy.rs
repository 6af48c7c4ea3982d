//! `PeerPolicy::check`/`check_ip` on arbitrary addresses.
//!
//! Oracles: no panic; an IPv4 address and its IPv4-mapped IPv6 form get the same verdict (so
//! nothing hides behind `::ffff:`); a peer allowed by `check` as an ordinary peer is allowed by
//! `check_ip`; `canonical` is idempotent; the server's own sockets are never allowed.
#![no_main]

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use libfuzzer_sys::fuzz_target;
use relay_proto::policy::{canonical, Allowed};
use relay_proto::{DenyReason, PeerPolicy};

fn policy() -> PeerPolicy {
    PeerPolicy::new(
        vec!["10.99.0.0/16".parse().unwrap()],
        vec![
            "8.8.4.0/24".parse().unwrap(),
            "2606:4700:1::/48".parse().unwrap(),
        ],
        vec![
            "198.51.100.1:3478".parse().unwrap(),
            "127.0.0.1:9641".parse().unwrap(),
            "[::]:3479".parse().unwrap(),
        ],
        vec!["203.0.113.10".parse().unwrap()],
        49152..=65535,
    )
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 3 {
        return;
    }
    let port = u16::from_be_bytes([data[1], data[2]]);
    let rest = &data[3..];
    let ip = if data[0] & 1 == 0 {
        let mut b = [0u8; 4];
        for (d, s) in b.iter_mut().zip(rest) {
            *d = *s;
        }
        IpAddr::V4(Ipv4Addr::from(b))
    } else {
        let mut b = [0u8; 16];
        for (d, s) in b.iter_mut().zip(rest) {
            *d = *s;
        }
        IpAddr::V6(Ipv6Addr::from(b))
    };
    let p = policy();
    let addr = SocketAddr::new(ip, port);
    let verdict = p.check(addr);
    let ip_verdict = p.check_ip(ip);

    assert_eq!(canonical(canonical(ip)), canonical(ip));
    if verdict == Ok(Allowed::Peer) {
        assert_eq!(ip_verdict, Ok(()), "{addr}");
    }
    if let IpAddr::V4(v4) = ip {
        let mapped = SocketAddr::new(IpAddr::V6(v4.to_ipv6_mapped()), port);
        assert_eq!(p.check(mapped), verdict, "{addr} vs {mapped}");
        assert_eq!(p.check_ip(mapped.ip()), ip_verdict);
    }
    if p.is_own(addr) {
        assert_eq!(verdict, Err(DenyReason::OwnAddress));
    }
    if port == 3479 {
        // The wildcard listener covers every address on its port.
        assert_eq!(verdict, Err(DenyReason::OwnAddress));
    }
});
