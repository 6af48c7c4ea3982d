//! One function per section, plus the parsers for individual values.
//!
//! Each section function reads every key (recording all errors) before it
//! builds its struct, so one bad key never hides another.

use std::net::{IpAddr, SocketAddr};
use std::num::NonZeroUsize;
use std::path::PathBuf;
use std::time::Duration;

use ipnet::IpNet;
use toml::Table;

use crate::reader::{Errs, Invalid, Reader};
use crate::{
    Admin, Config, Listen, Log, PortRange, Relay, RelayIps, Secret, Source, Tls, Transport,
};

/// Relayed ports: the IANA dynamic/private range (RFC 6335), which no
/// registered service uses.
const DEFAULT_RELAY_PORTS: PortRange = PortRange {
    start: 49152,
    end: 65535,
};
/// A browser opens a few allocations per call; 16 leaves room for several
/// calls while one leaked credential cannot take the whole port range.
const DEFAULT_USER_QUOTA: u32 = 16;
/// A call needs a handful of peers; the cap bounds per-allocation state.
const DEFAULT_MAX_PERMISSIONS: u32 = 64;
const MAX_PERMISSIONS_LIMIT: u32 = 1024;
/// Long enough that clients refresh rarely, short enough that an abandoned
/// allocation frees its port within the hour.
const DEFAULT_MAX_LIFETIME: Duration = Duration::from_secs(3600);
/// RFC 8656's default allocation lifetime: a cap below it would shorten
/// even allocations that ask for nothing special.
const MIN_MAX_LIFETIME: Duration = Duration::from_secs(600);
const MAX_MAX_LIFETIME: Duration = Duration::from_secs(24 * 3600);
/// Long enough that clients rarely hit 438 (Stale Nonce), short enough to
/// limit replay of a captured request.
const DEFAULT_NONCE_LIFETIME: Duration = Duration::from_secs(600);
const MIN_NONCE_LIFETIME: Duration = Duration::from_secs(30);
const MAX_NONCE_LIFETIME: Duration = Duration::from_secs(3600);
/// Time for clients to notice the drain and move their calls (ICE restart)
/// without holding a deploy up for long.
const DEFAULT_GRACE_PERIOD: Duration = Duration::from_secs(30);
const MAX_GRACE_PERIOD: Duration = Duration::from_secs(3600);
const MAX_THREADS: u32 = 1024;
/// Enough for a household or an office behind one NAT (each browser tab in
/// a call holds a connection or two), while one host cannot hold thousands
/// of sockets and their buffers open.
const DEFAULT_MAX_CONNECTIONS_PER_IP: u32 = 64;
const MAX_MAX_CONNECTIONS_PER_IP: u32 = 100_000;
/// A TCP plus TLS handshake and the first Allocate take a few round trips,
/// well under a second on any real path; 10s tolerates slow mobile links
/// and still frees a silent or stalling connection quickly.
const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
const MIN_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(1);
const MAX_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(300);
/// Clients refresh permissions every 4-5 minutes even when media is on
/// hold, so a live call always sends within 5m: it is never cut, while a
/// dead connection is freed in minutes.
const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(300);
/// As short as a second is allowed for tests and for deployments that keep connections busy.
const MIN_IDLE_TIMEOUT: Duration = Duration::from_secs(1);
const MAX_IDLE_TIMEOUT: Duration = Duration::from_secs(3600);
/// The largest STUN message (20-byte header + 65532 bytes of attributes,
/// the most a 16-bit, 4-aligned length allows); it also covers the largest
/// ChannelData message (4 + 65535).
const DEFAULT_MAX_FRAME: u32 = 20 + 65_532;
/// Messages up to 548 bytes fit the smallest datagram every IPv4 host must
/// accept (576, less IP and UDP headers), so clients assume they always get
/// through; a lower limit would refuse ordinary requests.
const MIN_MAX_FRAME: u32 = 548;
/// A 16-bit STUN length cannot declare more than the default.
const MAX_MAX_FRAME: u32 = DEFAULT_MAX_FRAME;
/// About a quarter of a second of a video call's packets: rides out a
/// scheduling hiccup, while a stuck connection holds at most 256 frames
/// (16 MiB at the largest frame, usually far less) per direction.
const DEFAULT_STREAM_QUEUE: u32 = 256;
const MAX_STREAM_QUEUE: u32 = 65_536;
/// Loopback, because the admin endpoint has no authentication.
const DEFAULT_ADMIN_LISTEN: SocketAddr =
    SocketAddr::new(IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 9641);
const DEFAULT_LOG_LEVEL: &str = "info";

/// The REALM attribute must be shorter than 128 characters and at most 763
/// bytes (RFC 8489, section 14.9).
const MAX_REALM_BYTES: usize = 763;
/// Shorter HMAC keys for time-limited credentials are guessable offline.
const MIN_SECRET_BYTES: usize = 16;

/// Reads the whole (already env-overridden) table.
pub(crate) fn read(table: &Table, source: Source, errs: &mut Errs) -> Result<Config, Invalid> {
    let empty = Table::new();
    let mut root = Reader::new("", table, errs);
    let relay = root.table("relay");
    let admin = root.table("admin");
    let log = root.table("log");
    root.finish();

    // A section that is not a table was reported; don't pile errors on it.
    let relay = relay.and_then(|t| {
        read_relay(
            &mut Reader::new("relay", t.unwrap_or(&empty), errs),
            &source,
        )
    });
    let admin =
        admin.and_then(|t| read_admin(&mut Reader::new("admin", t.unwrap_or(&empty), errs)));
    let log = log.and_then(|t| read_log(&mut Reader::new("log", t.unwrap_or(&empty), errs)));

    Ok(Config {
        relay: relay?,
        admin: admin?,
        log: log?,
        source,
    })
}

fn read_relay(r: &mut Reader<'_, '_>, source: &Source) -> Result<Relay, Invalid> {
    let realm = r.parse("realm", "a string", parse_realm);
    let realm = r.required(
        "realm",
        realm,
        r#"required: the realm clients authenticate in, e.g. "example.com""#,
    );

    let listen = match r.list("listen", parse_listen) {
        Ok(Some(list)) if !list.is_empty() => check_listen(r, list),
        Ok(_) => {
            r.error(
                "listen",
                r#"at least one listen address is required, e.g. ["udp://0.0.0.0:3478"]"#,
            );
            Err(Invalid)
        }
        Err(Invalid) => Err(Invalid),
    };

    let external_ips = r
        .string_or_list("external-ip", "an IP address", parse_specific_ip)
        .and_then(|ips| one_per_family(r, "external-ip", &ips.unwrap_or_default()));
    let relay_ips = match r.string_or_list("relay-ip", "an IP address", parse_specific_ip) {
        Ok(Some(ips)) if ips.is_empty() => {
            r.error(
                "relay-ip",
                "at least one IP address is required (leave relay-ip out to use the specific \
                 listen addresses)",
            );
            Err(Invalid)
        }
        Ok(Some(ips)) => one_per_family(r, "relay-ip", &ips).map(Some),
        Ok(None) => Ok(None),
        Err(Invalid) => Err(Invalid),
    };
    let relay_ports = r.parse(
        "relay-ports",
        r#"a port range like "49152-65535""#,
        parse_port_range,
    );

    let secrets = match r.list("secrets", parse_secret) {
        Ok(Some(list)) if !list.is_empty() => check_unique(r, "secrets", &list, |a, b| a == b),
        Ok(_) if *source == Source::Embedded => Ok(vec![Secret::generate()]),
        Ok(_) => {
            r.error("secrets", "at least one secret is required");
            Err(Invalid)
        }
        Err(Invalid) => Err(Invalid),
    };

    let allow_peers = r.list("allow-peers", parse_net);
    let deny_peers = r.list("deny-peers", parse_net);
    let user_quota = r.integer("user-quota", 1, u32::MAX);
    let total_quota = r.integer("total-quota", 1, u32::MAX);
    let max_permissions = r.integer("max-permissions", 1, MAX_PERMISSIONS_LIMIT);
    let max_lifetime = r.duration("max-lifetime", MIN_MAX_LIFETIME, MAX_MAX_LIFETIME);
    let nonce_lifetime = r.duration("nonce-lifetime", MIN_NONCE_LIFETIME, MAX_NONCE_LIFETIME);
    let threads = r.integer("threads", 1, MAX_THREADS);
    let grace_period = r.duration("grace-period", Duration::ZERO, MAX_GRACE_PERIOD);
    let max_connections_per_ip = r.integer("max-connections-per-ip", 1, MAX_MAX_CONNECTIONS_PER_IP);
    let handshake_timeout = r.duration(
        "handshake-timeout",
        MIN_HANDSHAKE_TIMEOUT,
        MAX_HANDSHAKE_TIMEOUT,
    );
    let idle_timeout = r.duration("idle-timeout", MIN_IDLE_TIMEOUT, MAX_IDLE_TIMEOUT);
    let max_frame = r.integer("max-frame", MIN_MAX_FRAME, MAX_MAX_FRAME);
    let stream_queue = r.integer("stream-queue", 1, MAX_STREAM_QUEUE);

    let tls = r.table("tls").and_then(|table| match table {
        Some(table) => read_tls(&mut Reader::new("relay.tls", table, r.errs())).map(Some),
        None => Ok(None),
    });
    // tls:// promises TLS: without a certificate that promise cannot be kept.
    let tls = match (tls, &listen) {
        (Ok(None), Ok(listen)) => match listen.iter().position(|l| l.transport == Transport::Tls) {
            Some(i) => {
                let by = r.name(&format!("listen[{i}]"));
                r.error(
                    "tls",
                    format!(
                        "required by {by} ({}): add a [relay.tls] table with cert-file and \
                         key-file",
                        listen[i]
                    ),
                );
                Err(Invalid)
            }
            None => Ok(None),
        },
        (tls, _) => tls,
    };

    // relay-ip defaults to the specific listen addresses (the first of each
    // family); wildcards do not count: 0.0.0.0 cannot be handed to clients
    // as a relayed address.
    let relay_ips = match (relay_ips, &listen) {
        (Ok(Some(ips)), _) => Ok(ips),
        (Ok(None), Ok(listen)) => {
            let mut ips = RelayIps::default();
            for l in listen {
                match l.addr.ip() {
                    ip if ip.is_unspecified() => {}
                    IpAddr::V4(ip) => {
                        ips.v4.get_or_insert(ip);
                    }
                    IpAddr::V6(ip) => {
                        ips.v6.get_or_insert(ip);
                    }
                }
            }
            if ips.is_empty() {
                r.error(
                    "relay-ip",
                    "required when relay.listen binds a wildcard address",
                );
                Err(Invalid)
            } else {
                Ok(ips)
            }
        }
        (Ok(None), Err(Invalid)) | (Err(Invalid), _) => Err(Invalid),
    };

    // An external address stands for the relay address of its family.
    let external_ips = match (external_ips, &relay_ips) {
        (Ok(external), Ok(relay)) => {
            let mut ok = true;
            for ip in external.iter() {
                if relay.get(ip.is_ipv6()).is_none() {
                    ok = false;
                    let family = if ip.is_ipv6() { "IPv6" } else { "IPv4" };
                    let relay_ip = r.name("relay-ip");
                    r.error(
                        "external-ip",
                        format!(
                            "{ip} is {family}, but there is no {family} relay address for it \
                             to stand for: add one to {relay_ip} (or listen on a specific \
                             {family} address)"
                        ),
                    );
                }
            }
            if ok {
                Ok(external)
            } else {
                Err(Invalid)
            }
        }
        (external, _) => external,
    };

    r.finish();
    Ok(Relay {
        realm: realm?,
        listen: listen?,
        external_ips: external_ips?,
        relay_ips: relay_ips?,
        relay_ports: relay_ports?.unwrap_or(DEFAULT_RELAY_PORTS),
        secrets: secrets?,
        allow_peers: allow_peers?.unwrap_or_default(),
        deny_peers: deny_peers?.unwrap_or_default(),
        user_quota: Some(user_quota?.unwrap_or(DEFAULT_USER_QUOTA)),
        total_quota: total_quota?,
        max_permissions: max_permissions?.unwrap_or(DEFAULT_MAX_PERMISSIONS),
        max_lifetime: max_lifetime?.unwrap_or(DEFAULT_MAX_LIFETIME),
        nonce_lifetime: nonce_lifetime?.unwrap_or(DEFAULT_NONCE_LIFETIME),
        threads: threads?.and_then(|n| NonZeroUsize::new(n as usize)),
        grace_period: grace_period?.unwrap_or(DEFAULT_GRACE_PERIOD),
        max_connections_per_ip: max_connections_per_ip?.unwrap_or(DEFAULT_MAX_CONNECTIONS_PER_IP),
        handshake_timeout: handshake_timeout?.unwrap_or(DEFAULT_HANDSHAKE_TIMEOUT),
        idle_timeout: idle_timeout?.unwrap_or(DEFAULT_IDLE_TIMEOUT),
        max_frame: max_frame?.unwrap_or(DEFAULT_MAX_FRAME) as usize,
        stream_queue: stream_queue?.unwrap_or(DEFAULT_STREAM_QUEUE) as usize,
        tls: tls?,
    })
}

/// `[relay.tls]`: both files are required, and must be readable now, so a
/// typo in a path fails at start-up rather than at the first TLS client.
fn read_tls(r: &mut Reader<'_, '_>) -> Result<Tls, Invalid> {
    let cert_file = r.parse("cert-file", "a file path", parse_readable_file);
    let cert_file = r.required(
        "cert-file",
        cert_file,
        r#"required: the PEM certificate chain, e.g. "/etc/turnpike/fullchain.pem""#,
    );
    let key_file = r.parse("key-file", "a file path", parse_readable_file);
    let key_file = r.required(
        "key-file",
        key_file,
        r#"required: the PEM private key, e.g. "/etc/turnpike/privkey.pem""#,
    );
    r.finish();
    Ok(Tls {
        cert_file: cert_file?,
        key_file: key_file?,
    })
}

fn read_admin(r: &mut Reader<'_, '_>) -> Result<Admin, Invalid> {
    let listen = r.parse("listen", r#"an address like "127.0.0.1:9641""#, |s| {
        s.parse::<SocketAddr>()
            .map_err(|_| format!(r#"expected IP:PORT like "127.0.0.1:9641", got {s:?}"#))
    });
    r.finish();
    Ok(Admin {
        listen: listen?.unwrap_or(DEFAULT_ADMIN_LISTEN),
    })
}

fn read_log(r: &mut Reader<'_, '_>) -> Result<Log, Invalid> {
    let level = r.parse("level", "a string", parse_log_level);
    r.finish();
    Ok(Log {
        level: level?.unwrap_or_else(|| DEFAULT_LOG_LEVEL.to_string()),
    })
}

/// Reports every later duplicate at `key[i]`, naming the first occurrence.
fn check_unique<T>(
    r: &mut Reader<'_, '_>,
    key: &'static str,
    list: &[T],
    same: impl Fn(&T, &T) -> bool,
) -> Result<Vec<T>, Invalid>
where
    T: Clone,
{
    let mut ok = true;
    for (i, item) in list.iter().enumerate() {
        if let Some(first) = list[..i].iter().position(|earlier| same(earlier, item)) {
            ok = false;
            let first_path = r.name(&format!("{key}[{first}]"));
            r.error(&format!("{key}[{i}]"), format!("duplicate of {first_path}"));
        }
    }
    if ok {
        Ok(list.to_vec())
    } else {
        Err(Invalid)
    }
}

/// Reports every later listen entry with the address of an earlier one of
/// the same kind: a duplicate (same transport), or `tcp://` next to `tls://`
/// (one stream listener per address serves both, telling TLS from plain
/// TCP by the first byte). UDP and a stream transport may share an address.
fn check_listen(r: &mut Reader<'_, '_>, list: Vec<Listen>) -> Result<Vec<Listen>, Invalid> {
    let mut ok = true;
    for (i, item) in list.iter().enumerate() {
        let clash = |earlier: &Listen| {
            earlier.addr == item.addr && earlier.transport.is_stream() == item.transport.is_stream()
        };
        let Some(first) = list[..i].iter().position(clash) else {
            continue;
        };
        ok = false;
        let first_name = r.name(&format!("listen[{first}]"));
        let message = if list[first].transport == item.transport {
            format!("duplicate of {first_name}")
        } else {
            format!(
                "conflicts with {first_name} ({}): one stream listener per address serves both \
                 TCP and TLS (it tells them apart by the first byte), so list the address once; \
                 tls:// only adds the check that [relay.tls] is configured",
                list[first]
            )
        };
        r.error(&format!("listen[{i}]"), message);
    }
    if ok {
        Ok(list)
    } else {
        Err(Invalid)
    }
}

/// At most one address per family; reports every extra one at `key[i]`.
fn one_per_family(
    r: &mut Reader<'_, '_>,
    key: &'static str,
    ips: &[IpAddr],
) -> Result<RelayIps, Invalid> {
    let mut out = RelayIps::default();
    let mut first = [None, None];
    let mut ok = true;
    for (i, ip) in ips.iter().enumerate() {
        let family = usize::from(ip.is_ipv6());
        if let Some(j) = first[family] {
            ok = false;
            let name = if ip.is_ipv6() { "IPv6" } else { "IPv4" };
            let earlier = r.name(&format!("{key}[{j}]"));
            r.error(
                &format!("{key}[{i}]"),
                format!(
                    "a second {name} address ({earlier} is {name} too): at most one IPv4 and \
                     one IPv6 address"
                ),
            );
            continue;
        }
        first[family] = Some(i);
        match *ip {
            IpAddr::V4(ip) => out.v4 = Some(ip),
            IpAddr::V6(ip) => out.v6 = Some(ip),
        }
    }
    if ok {
        Ok(out)
    } else {
        Err(Invalid)
    }
}

/// A path to a file that exists and can be opened for reading now. Only
/// the path is ever shown in errors, never anything read from the file.
fn parse_readable_file(s: &str) -> Result<PathBuf, String> {
    if s.is_empty() {
        return Err("must not be empty".to_string());
    }
    let file = std::fs::File::open(s).map_err(|e| format!("cannot read {s:?}: {e}"))?;
    match file.metadata() {
        Ok(m) if m.is_dir() => Err(format!("cannot read {s:?}: it is a directory")),
        Ok(_) => Ok(PathBuf::from(s)),
        Err(e) => Err(format!("cannot read {s:?}: {e}")),
    }
}

fn parse_realm(s: &str) -> Result<String, String> {
    if s.is_empty() {
        Err("must not be empty".to_string())
    } else if s.len() > MAX_REALM_BYTES {
        Err(format!(
            "is {} bytes; at most {MAX_REALM_BYTES} are allowed (RFC 8489 REALM)",
            s.len()
        ))
    } else if s.chars().any(char::is_control) {
        Err("must not contain control characters".to_string())
    } else {
        Ok(s.to_string())
    }
}

fn parse_listen(s: &str) -> Result<Listen, String> {
    let usage = r#"expected "udp://IP:PORT", "tcp://IP:PORT" or "tls://IP:PORT" (IPv6 as "udp://[::1]:3478")"#;
    let Some((scheme, addr)) = s.split_once("://") else {
        return Err(format!("{usage}, got {s:?}"));
    };
    let transport = match scheme.to_ascii_lowercase().as_str() {
        "udp" => Transport::Udp,
        "tcp" => Transport::Tcp,
        "tls" => Transport::Tls,
        _ => return Err(format!("unknown transport {scheme:?}: {usage}, got {s:?}")),
    };
    let addr = addr
        .parse::<SocketAddr>()
        .map_err(|_| format!("{usage}, got {s:?}"))?;
    Ok(Listen { transport, addr })
}

/// An address that can be handed to clients: not 0.0.0.0 or ::.
fn parse_specific_ip(s: &str) -> Result<IpAddr, String> {
    let ip = s
        .parse::<IpAddr>()
        .map_err(|_| format!("expected an IP address, got {s:?}"))?;
    if ip.is_unspecified() {
        return Err(format!(
            "must be a specific address that clients can reach, not {ip}"
        ));
    }
    Ok(ip)
}

fn parse_port_range(s: &str) -> Result<PortRange, String> {
    let Some((low, high)) = s.split_once('-') else {
        return Err(format!(
            r#"expected "LOW-HIGH" like "49152-65535", got {s:?}"#
        ));
    };
    let (start, end) = (parse_port(low.trim())?, parse_port(high.trim())?);
    if start > end {
        return Err(format!("low port {start} is greater than high port {end}"));
    }
    Ok(PortRange { start, end })
}

fn parse_port(s: &str) -> Result<u16, String> {
    let n: u64 = s
        .parse()
        .map_err(|_| format!("expected a port number, got {s:?}"))?;
    match u16::try_from(n) {
        Ok(port) if port >= 1 => Ok(port),
        _ => Err(format!("port {n} is out of range 1-65535")),
    }
}

/// Never echoes the secret: error messages end up in logs.
fn parse_secret(s: &str) -> Result<Secret, String> {
    if s.len() < MIN_SECRET_BYTES {
        Err(format!(
            "too short: {} bytes, at least {MIN_SECRET_BYTES} are required",
            s.len()
        ))
    } else {
        Ok(Secret::new(s.to_string()))
    }
}

/// `10.0.0.0/8`, or a bare address meaning that one host (/32 or /128).
/// Host bits are cleared: `10.1.2.3/8` means `10.0.0.0/8`.
fn parse_net(s: &str) -> Result<IpNet, String> {
    let (ip, prefix) = match s.split_once('/') {
        Some((ip, prefix)) => (ip, Some(prefix)),
        None => (s, None),
    };
    let ip = ip.parse::<IpAddr>().map_err(|_| {
        format!(r#"expected a network like "10.0.0.0/8" or an IP address, got {s:?}"#)
    })?;
    let max = if ip.is_ipv4() { 32 } else { 128 };
    let prefix = match prefix {
        None => max,
        Some(p) => match p.parse::<u8>() {
            Ok(p) if p <= max => p,
            _ => {
                return Err(format!(
                    "prefix length must be 0 to {max} for {}, got {s:?}",
                    if ip.is_ipv4() { "IPv4" } else { "IPv6" }
                ))
            }
        },
    };
    IpNet::new(ip, prefix)
        .map(|net| net.trunc())
        .map_err(|e| format!("{e}, got {s:?}"))
}

/// A level or an `EnvFilter` directive; only its characters are checked
/// here, the logger validates the rest.
fn parse_log_level(s: &str) -> Result<String, String> {
    let ok = |c: char| c.is_ascii_alphanumeric() || "_=,:.-".contains(c);
    if !s.is_empty() && s.chars().all(ok) {
        Ok(s.to_string())
    } else {
        Err(format!(
            r#"expected error, warn, info, debug, trace or a filter like "info,relay_server=debug", got {s:?}"#
        ))
    }
}
