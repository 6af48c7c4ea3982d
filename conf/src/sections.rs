//! One function per section, plus the parsers for individual values.
//!
//! Each section function reads every key (recording all errors) before it
//! builds its struct, so one bad key never hides another.

use std::net::{IpAddr, SocketAddr};
use std::num::NonZeroUsize;
use std::time::Duration;

use ipnet::IpNet;
use toml::Table;

use crate::reader::{Errs, Invalid, Reader};
use crate::{Admin, Config, Listen, Log, PortRange, Relay, Secret, Source, Transport};

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
        Ok(Some(list)) if !list.is_empty() => {
            check_unique(r, "listen", &list, |a, b| a.addr == b.addr)
        }
        Ok(_) => {
            r.error(
                "listen",
                r#"at least one listen address is required, e.g. ["udp://0.0.0.0:3478"]"#,
            );
            Err(Invalid)
        }
        Err(Invalid) => Err(Invalid),
    };

    let external_ip = r.parse("external-ip", "an IP address", parse_specific_ip);
    let relay_ip = r.parse("relay-ip", "an IP address", parse_specific_ip);
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

    // relay-ip defaults to the first listen address, unless that is a
    // wildcard: 0.0.0.0 cannot be handed to clients as a relayed address.
    let relay_ip = match (relay_ip, &listen) {
        (Ok(Some(ip)), _) => Ok(ip),
        (Ok(None), Ok(listen)) => match listen.first().map(|l| l.addr.ip()) {
            Some(ip) if !ip.is_unspecified() => Ok(ip),
            _ => {
                r.error(
                    "relay-ip",
                    "required when relay.listen binds a wildcard address",
                );
                Err(Invalid)
            }
        },
        (Ok(None), Err(Invalid)) | (Err(Invalid), _) => Err(Invalid),
    };

    r.finish();
    Ok(Relay {
        realm: realm?,
        listen: listen?,
        external_ip: external_ip?,
        relay_ip: relay_ip?,
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
            let first_path = r.path(&format!("{key}[{first}]"));
            r.error(&format!("{key}[{i}]"), format!("duplicate of {first_path}"));
        }
    }
    if ok {
        Ok(list.to_vec())
    } else {
        Err(Invalid)
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
    let usage = r#"expected "udp://IP:PORT" (IPv6 as "udp://[::1]:3478")"#;
    let Some((scheme, addr)) = s.split_once("://") else {
        return Err(format!("{usage}, got {s:?}"));
    };
    let transport = match scheme.to_ascii_lowercase().as_str() {
        "udp" => Transport::Udp,
        "tcp" | "tls" | "dtls" => {
            return Err(format!(
                "{scheme}:// is not supported yet (UDP only), got {s:?}"
            ))
        }
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
