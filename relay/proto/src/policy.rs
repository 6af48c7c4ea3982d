//! Which peers a client may relay to. Deny by default everything that is not the public Internet,
//! so a relay can't be used to reach the operator's own network, cloud metadata services or itself.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::ops::RangeInclusive;

use ipnet::IpNet;

use crate::label_enum;

label_enum! {
    /// Why a peer address was refused. Used as a metric label: a small fixed set.
    pub enum DenyReason {
        /// 0.0.0.0/8, ::.
        Unspecified => "unspecified",
        /// 127.0.0.0/8, ::1.
        Loopback => "loopback",
        /// RFC 1918, fc00::/7 (unique local), fec0::/10 (site local).
        Private => "private",
        /// 100.64.0.0/10 (carrier-grade NAT; also where some clouds put metadata services).
        Shared => "shared",
        /// 169.254.0.0/16 (incl. 169.254.169.254 metadata), fe80::/10.
        LinkLocal => "link_local",
        /// 224.0.0.0/4, ff00::/8.
        Multicast => "multicast",
        /// Documentation, benchmarking, IETF protocol assignments, 240/4, broadcast, discard.
        Reserved => "reserved",
        /// NAT64, 6to4, Teredo: IPv6 prefixes that embed (and would reach) IPv4 hosts.
        Translated => "translated",
        /// One of this server's own listener or admin ports: relaying there would loop.
        OwnAddress => "own_address",
        /// Listed in `deny-peers`.
        DenyList => "deny_list",
    }
}

/// The special-purpose ranges refused unless `allow-peers` lists them (IANA IPv4/IPv6
/// special-purpose address registries).
const DEFAULT_DENY: &[(&str, DenyReason)] = &[
    ("0.0.0.0/8", DenyReason::Unspecified),
    ("10.0.0.0/8", DenyReason::Private),
    ("100.64.0.0/10", DenyReason::Shared),
    ("127.0.0.0/8", DenyReason::Loopback),
    ("169.254.0.0/16", DenyReason::LinkLocal),
    ("172.16.0.0/12", DenyReason::Private),
    ("192.0.0.0/24", DenyReason::Reserved),
    ("192.0.2.0/24", DenyReason::Reserved),
    ("192.88.99.0/24", DenyReason::Translated),
    ("192.168.0.0/16", DenyReason::Private),
    ("198.18.0.0/15", DenyReason::Reserved),
    ("198.51.100.0/24", DenyReason::Reserved),
    ("203.0.113.0/24", DenyReason::Reserved),
    ("224.0.0.0/4", DenyReason::Multicast),
    ("240.0.0.0/4", DenyReason::Reserved),
    ("::/128", DenyReason::Unspecified),
    ("::1/128", DenyReason::Loopback),
    ("64:ff9b::/96", DenyReason::Translated),
    ("64:ff9b:1::/48", DenyReason::Translated),
    ("100::/64", DenyReason::Reserved),
    ("2001::/23", DenyReason::Reserved),
    ("2001::/32", DenyReason::Translated),
    ("2001:db8::/32", DenyReason::Reserved),
    ("2002::/16", DenyReason::Translated),
    ("3fff::/20", DenyReason::Reserved),
    ("5f00::/16", DenyReason::Reserved),
    ("fc00::/7", DenyReason::Private),
    ("fe80::/10", DenyReason::LinkLocal),
    ("fec0::/10", DenyReason::Private),
    ("ff00::/8", DenyReason::Multicast),
];

/// The peer policy of one server.
#[derive(Debug, Clone)]
pub struct PeerPolicy {
    allow: Vec<IpNet>,
    deny: Vec<IpNet>,
    defaults: Vec<(IpNet, DenyReason)>,
    own: Vec<SocketAddr>,
    relay_ips: Vec<IpAddr>,
    relay_ports: RangeInclusive<u16>,
}

/// What the policy decided for an allowed peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Allowed {
    /// An ordinary peer.
    Peer,
    /// Another allocation's relayed address on this server.
    Relayed,
}

impl PeerPolicy {
    /// Builds a policy.
    ///
    /// - `allow`: `allow-peers`, opens exactly what it lists (it beats the defaults and `deny`).
    /// - `deny`: `deny-peers`, closes more.
    /// - `own`: this server's listener and admin addresses; an unspecified IP (0.0.0.0) stands
    ///   for every local address, so the driver passes the interface addresses for wildcard binds.
    /// - `relay_ips` and `relay_ports`: addresses of relayed transport addresses on this server
    ///   (relay IP, and external IP when behind a 1:1 NAT). They are always allowed: two relayed
    ///   callers reach each other through them.
    pub fn new(
        allow: Vec<IpNet>,
        deny: Vec<IpNet>,
        own: Vec<SocketAddr>,
        relay_ips: Vec<IpAddr>,
        relay_ports: RangeInclusive<u16>,
    ) -> Self {
        let defaults = DEFAULT_DENY
            .iter()
            .filter_map(|(net, why)| net.parse().ok().map(|n| (n, *why)))
            .collect();
        Self {
            allow,
            deny,
            defaults,
            own,
            relay_ips: relay_ips.into_iter().map(canonical).collect(),
            relay_ports,
        }
    }

    /// Decides whether a client may relay to `peer`.
    pub fn check(&self, peer: SocketAddr) -> Result<Allowed, DenyReason> {
        let ip = canonical(peer.ip());
        let peer = SocketAddr::new(ip, peer.port());
        if self.is_own(peer) {
            return Err(DenyReason::OwnAddress);
        }
        if self.relay_ips.contains(&ip) && self.relay_ports.contains(&peer.port()) {
            return Ok(Allowed::Relayed);
        }
        self.check_ranges(ip).map(|()| Allowed::Peer)
    }

    /// Decides on an IP alone, for CreatePermission (whose port means nothing). A relay IP passes
    /// here; [`PeerPolicy::check`] still refuses its ports outside `relay-ports` packet by packet.
    pub fn check_ip(&self, ip: IpAddr) -> Result<(), DenyReason> {
        let ip = canonical(ip);
        if self.relay_ips.contains(&ip) {
            return Ok(());
        }
        self.check_ranges(ip)
    }

    fn check_ranges(&self, ip: IpAddr) -> Result<(), DenyReason> {
        if self.allow.iter().any(|n| n.contains(&ip)) {
            return Ok(());
        }
        if self.deny.iter().any(|n| n.contains(&ip)) {
            return Err(DenyReason::DenyList);
        }
        // Most specific match wins (Teredo 2001::/32 inside 2001::/23 reports "translated").
        match self
            .defaults
            .iter()
            .filter(|(n, _)| n.contains(&ip))
            .max_by_key(|(n, _)| n.prefix_len())
        {
            Some((_, why)) => Err(*why),
            None => Ok(()),
        }
    }

    /// Whether `peer` is one of this server's own listener or admin sockets.
    pub fn is_own(&self, peer: SocketAddr) -> bool {
        let ip = canonical(peer.ip());
        self.own.iter().any(|o| {
            o.port() == peer.port() && (o.ip().is_unspecified() || canonical(o.ip()) == ip)
        })
    }
}

/// The source a per-source limit counts an address as: an IPv4 address, or the /64 of an IPv6
/// one (one subscriber or host usually has a whole /64, so counting single IPv6 addresses would
/// limit nobody). IPv4-mapped addresses count as their IPv4 address. Used by the relay's
/// TCP/TLS connection cap and the control plane's and signaling's limits per client address.
pub fn source_of(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => {
            let s = v6.segments();
            IpAddr::V6(Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
        }
        v4 => v4,
    }
}

/// IPv4-mapped (`::ffff:a.b.c.d`) and IPv4-compatible (`::a.b.c.d`) addresses are the IPv4 address
/// they carry: `::ffff:127.0.0.1` is loopback. `::` and `::1` stay IPv6.
pub fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return IpAddr::V4(v4);
            }
            let s = v6.segments();
            if s[..6] == [0; 6] && v6 != Ipv6Addr::UNSPECIFIED && v6 != Ipv6Addr::LOCALHOST {
                let o = v6.octets();
                return IpAddr::V4(Ipv4Addr::new(o[12], o[13], o[14], o[15]));
            }
            ip
        }
        IpAddr::V4(_) => ip,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn sources_are_ipv4_addresses_and_ipv6_64s() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert_eq!(source_of(ip("192.0.2.7")), ip("192.0.2.7"));
        assert_eq!(source_of(ip("::ffff:192.0.2.7")), ip("192.0.2.7"));
        assert_eq!(source_of(ip("2001:db8:1:2:3:4:5:6")), ip("2001:db8:1:2::"));
        assert_eq!(
            source_of(ip("2001:db8:1:2:ffff::1")),
            source_of(ip("2001:db8:1:2::9"))
        );
        assert_ne!(
            source_of(ip("2001:db8:1:2::1")),
            source_of(ip("2001:db8:1:3::1"))
        );
    }

    fn policy() -> PeerPolicy {
        PeerPolicy::new(
            vec![],
            vec!["198.100.0.0/16".parse().unwrap()],
            vec![
                "0.0.0.0:3478".parse().unwrap(),
                "127.0.0.1:9641".parse().unwrap(),
            ],
            vec!["10.1.2.3".parse().unwrap()],
            49152..=65535,
        )
    }

    fn deny(p: &PeerPolicy, ip: &str) -> Option<DenyReason> {
        p.check(SocketAddr::new(ip.parse().unwrap(), 5000)).err()
    }

    #[test]
    fn special_ipv4_denied() {
        let p = policy();
        for ip in [
            "0.0.0.0",
            "0.1.2.3",
            "127.0.0.1",
            "10.0.0.1",
            "172.16.0.1",
            "192.168.1.1",
            "100.64.0.1",
            "100.100.100.200",
            "169.254.169.254",
            "192.0.0.1",
            "192.0.2.1",
            "198.18.0.1",
            "198.51.100.1",
            "203.0.113.1",
            "224.0.0.1",
            "239.255.255.250",
            "240.0.0.1",
            "255.255.255.255",
        ] {
            assert!(deny(&p, ip).is_some(), "{ip} must be denied");
        }
        assert_eq!(deny(&p, "169.254.169.254"), Some(DenyReason::LinkLocal));
        assert_eq!(deny(&p, "127.0.0.1"), Some(DenyReason::Loopback));
    }

    #[test]
    fn special_ipv6_denied() {
        let p = policy();
        for ip in [
            "::",
            "::1",
            "fe80::1",
            "fec0::1",
            "fc00::1",
            "fd00:ec2::254",
            "ff02::1",
            "64:ff9b::7f00:1",
            "64:ff9b:1::1",
            "2002:7f00:1::",
            "2001:0::1",
            "2001:db8::1",
            "100::1",
        ] {
            assert!(deny(&p, ip).is_some(), "{ip} must be denied");
        }
    }

    #[test]
    fn ipv4_hidden_in_ipv6_denied() {
        let p = policy();
        for ip in [
            "::ffff:127.0.0.1",
            "::ffff:0.0.0.0",
            "::ffff:10.0.0.5",
            "::ffff:169.254.169.254",
            "::127.0.0.1",
            "2002:a00:5::",
            "64:ff9b::a00:5",
        ] {
            assert!(deny(&p, ip).is_some(), "{ip} must be denied");
        }
        assert_eq!(deny(&p, "::ffff:127.0.0.1"), Some(DenyReason::Loopback));
        assert_eq!(
            deny(&p, "::ffff:169.254.169.254"),
            Some(DenyReason::LinkLocal)
        );
    }

    #[test]
    fn public_allowed_and_lists_apply() {
        let p = policy();
        assert_eq!(deny(&p, "8.8.8.8"), None);
        assert_eq!(deny(&p, "2606:4700::1111"), None);
        assert_eq!(deny(&p, "198.100.5.5"), Some(DenyReason::DenyList));
        let open = PeerPolicy::new(
            vec!["127.0.0.0/8".parse().unwrap()],
            vec![],
            vec!["127.0.0.1:3478".parse().unwrap()],
            vec![],
            49152..=65535,
        );
        assert_eq!(deny(&open, "127.0.0.5"), None);
        assert_eq!(deny(&open, "10.0.0.1"), Some(DenyReason::Private));
        // allow-peers never opens the server's own sockets.
        assert_eq!(
            open.check("127.0.0.1:3478".parse().unwrap()),
            Err(DenyReason::OwnAddress)
        );
    }

    #[test]
    fn own_ports_denied_on_any_address_of_a_wildcard_listener() {
        let p = policy();
        assert_eq!(
            p.check("8.8.8.8:3478".parse().unwrap()),
            Err(DenyReason::OwnAddress)
        );
        assert_eq!(
            p.check("127.0.0.1:9641".parse().unwrap()),
            Err(DenyReason::OwnAddress)
        );
        assert!(p.check("8.8.8.8:9641".parse().unwrap()).is_ok());
    }

    #[test]
    fn other_allocations_on_this_server_allowed_even_when_private() {
        let p = policy();
        assert_eq!(
            p.check("10.1.2.3:50000".parse().unwrap()),
            Ok(Allowed::Relayed)
        );
        assert_eq!(
            p.check("[::ffff:10.1.2.3]:50000".parse().unwrap()),
            Ok(Allowed::Relayed)
        );
        // Outside the relay port range it is an ordinary private address.
        assert_eq!(
            p.check("10.1.2.3:22".parse().unwrap()),
            Err(DenyReason::Private)
        );
        assert_eq!(p.check_ip("10.1.2.3".parse().unwrap()), Ok(()));
    }
}
