//! Who a request comes from, for the limits kept per client address: failed joins and
//! diagnostics credentials here, unauthenticated sockets in signaling.
//!
//! Behind a TLS-terminating proxy every TCP peer is the proxy, so the address must come from
//! the proxy's `X-Forwarded-For` — but only from proxies the operator named
//! (`control.trusted-proxies`): anyone else could write any address there and so dodge every
//! limit. The walk is the usual one (nginx's `real_ip_recursive`): each proxy appends the
//! address it received from, so the client is the rightmost address that is not itself a
//! trusted proxy; everything to its left could have been written by the client.

use std::net::{IpAddr, SocketAddr};

use axum::http::HeaderMap;
use ipnet::IpNet;

/// The `X-Forwarded-For` header (de facto standard; RFC 7239's `Forwarded` is not read).
const X_FORWARDED_FOR: &str = "x-forwarded-for";

/// The address a request from TCP peer `peer` is counted against: `peer` itself unless it is in
/// `trusted`, else the rightmost `X-Forwarded-For` address that is not in `trusted` (port 0:
/// the client's port is not forwarded). Several header lines count as one list in order. The
/// walk stops at an entry that is not an address (the nearest hop known for sure is taken) and,
/// when every entry is trusted, takes the leftmost; without the header, `peer`.
pub fn client_addr(peer: SocketAddr, headers: &HeaderMap, trusted: &[IpNet]) -> SocketAddr {
    let is_trusted = |ip: IpAddr| trusted.iter().any(|net| net.contains(&ip.to_canonical()));
    if !is_trusted(peer.ip()) {
        return peer;
    }
    let mut nearest = None;
    for line in headers.get_all(X_FORWARDED_FOR).iter().rev() {
        let Ok(line) = line.to_str() else { break };
        for hop in line.rsplit(',') {
            let Some(ip) = parse_hop(hop.trim()) else {
                return nearest.map_or(peer, |ip| SocketAddr::new(ip, 0));
            };
            if !is_trusted(ip) {
                return SocketAddr::new(ip, 0);
            }
            nearest = Some(ip);
        }
    }
    nearest.map_or(peer, |ip| SocketAddr::new(ip, 0))
}

/// `192.0.2.1`, `2001:db8::1`, `[2001:db8::1]`, or either with a port (some proxies add it);
/// IPv4-mapped IPv6 as IPv4.
fn parse_hop(s: &str) -> Option<IpAddr> {
    let ip = s
        .parse::<IpAddr>()
        .ok()
        .or_else(|| s.parse::<SocketAddr>().ok().map(|a| a.ip()))
        .or_else(|| {
            s.strip_prefix('[')
                .and_then(|r| r.strip_suffix(']'))
                .and_then(|r| r.parse::<IpAddr>().ok())
        })?;
    Some(ip.to_canonical())
}

/// The identity a per-address limit counts (an IPv4 address or an IPv6 /64): the relay's, so
/// every limit of the product counts a source the same way.
pub use relay_proto::policy::source_of;

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn nets(list: &[&str]) -> Vec<IpNet> {
        list.iter().map(|s| s.parse().unwrap()).collect()
    }

    fn headers(lines: &[&str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for l in lines {
            h.append(X_FORWARDED_FOR, l.parse().unwrap());
        }
        h
    }

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn an_untrusted_peer_is_the_client_whatever_it_forwards() {
        let peer = addr("203.0.113.9:5555");
        let h = headers(&["198.51.100.1"]);
        assert_eq!(client_addr(peer, &h, &[]), peer);
        assert_eq!(client_addr(peer, &h, &nets(&["10.0.0.0/8"])), peer);
    }

    #[test]
    fn a_trusted_peer_forwards_the_rightmost_untrusted_address() {
        let trusted = nets(&["10.0.0.0/8", "::1/128"]);
        let peer = addr("10.1.2.3:40000");
        let client = |lines: &[&str]| client_addr(peer, &headers(lines), &trusted);
        // One proxy.
        assert_eq!(client(&["198.51.100.1"]), addr("198.51.100.1:0"));
        // A client that wrote its own header: the proxy appended the real peer.
        assert_eq!(
            client(&["1.1.1.1, 2.2.2.2, 198.51.100.1"]),
            addr("198.51.100.1:0")
        );
        // Two trusted proxies in a row; several header lines are one list.
        assert_eq!(
            client(&["1.1.1.1, 198.51.100.1", "10.9.9.9"]),
            addr("198.51.100.1:0")
        );
        // IPv6 (bracketed, with a port), IPv4-mapped.
        assert_eq!(client(&["[2001:db8::7]:443"]), addr("[2001:db8::7]:0"));
        assert_eq!(client(&["::ffff:198.51.100.2"]), addr("198.51.100.2:0"));
        assert_eq!(client(&["198.51.100.3:1234"]), addr("198.51.100.3:0"));
        // Only trusted hops: the leftmost. Garbage: the nearest hop known for sure.
        assert_eq!(client(&["10.0.0.7, 10.0.0.8"]), addr("10.0.0.7:0"));
        assert_eq!(
            client(&["1.1.1.1, not-an-ip, 10.0.0.8"]),
            addr("10.0.0.8:0")
        );
        assert_eq!(client(&["not-an-ip"]), peer);
        // No header: the proxy itself.
        assert_eq!(client(&[]), peer);
        // A trusted IPv4-mapped peer is trusted as its IPv4 address.
        let mapped = addr("[::ffff:10.1.2.3]:40000");
        assert_eq!(
            client_addr(mapped, &headers(&["198.51.100.1"]), &trusted),
            addr("198.51.100.1:0")
        );
    }
}
