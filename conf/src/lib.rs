//! Turnpike's configuration: one TOML file plus `TURNPIKE_*` environment
//! overrides, turned into a typed [`Config`].
//!
//! # Schema
//!
//! Three sections, and the optional `[relay.tls]` table, nothing else:
//!
//! ```toml
//! [relay]
//! realm = "example.com"                 # required
//! # required, at least one; udp://, tcp:// or tls:// (IPv6 as "udp://[::]:3478")
//! listen = ["udp://0.0.0.0:3478", "tcp://0.0.0.0:3478", "tls://0.0.0.0:5349"]
//! # required when every listen address is 0.0.0.0 / ::; at most one per family
//! relay-ip = ["203.0.113.7", "2001:db8::7"]
//! secrets = ["a-long-random-secret-0001"]  # required in a file; first signs, all verify
//! # external-ip, relay-ports, allow-peers, deny-peers, user-quota,
//! # total-quota, max-permissions, max-lifetime, nonce-lifetime, threads,
//! # grace-period, max-connections-per-ip, handshake-timeout, idle-timeout,
//! # max-frame, stream-queue: optional, see examples/turnpike.toml
//!
//! [relay.tls]                           # required by a tls:// listener
//! cert-file = "/etc/turnpike/fullchain.pem"
//! key-file = "/etc/turnpike/privkey.pem"
//!
//! [admin]
//! listen = "127.0.0.1:9641"
//!
//! [log]
//! level = "info"
//! ```
//!
//! [`EXAMPLE`] (`conf/examples/turnpike.toml`) documents every key with its
//! meaning and default; [`SCHEMA`] lists them for programs. Durations are
//! written like `"30s"`, `"10m"`, `"1h"`. Any key or section not in the
//! schema is an error, so a typo never silently leaves a default in place.
//!
//! Without a file, [`load`] uses [`EMBEDDED_DEFAULT`]: a relay on
//! `127.0.0.1:3478` for trying things out on one machine, with one random
//! secret generated at start-up (a file must list its secrets).
//!
//! # Environment overrides
//!
//! Every key can be overridden by `TURNPIKE_` + SECTION + `_` + KEY,
//! uppercased, with `-` and `.` written as `_`: `relay.user-quota` is
//! `TURNPIKE_RELAY_USER_QUOTA`, `admin.listen` is `TURNPIKE_ADMIN_LISTEN`,
//! `relay.tls.cert-file` is `TURNPIKE_RELAY_TLS_CERT_FILE` (setting it
//! creates the `[relay.tls]` table). Names are built from [`SCHEMA`], so the
//! mapping is unambiguous. Lists (`listen`, `secrets`, `allow-peers`,
//! `deny-peers`, and `relay-ip`, `external-ip`, which also take a single
//! address) are comma-separated and an empty value is an empty list. An override replaces the file's
//! value and is checked exactly like it; its errors name the variable
//! (`env TURNPIKE_RELAY_USER_QUOTA: ...`). A `TURNPIKE_*` variable that
//! matches no key is an error, so a misspelt override is caught too
//! (`TURNPIKE_CONFIG` is left alone: the binary uses it for the file path).
//! `conf` never reads the process environment itself: callers pass the
//! variables in, which keeps tests hermetic.
//!
//! # Errors are collected
//!
//! A bad configuration is reported all at once: every bad value, every
//! unknown key and every bad override, each with its dotted path
//! (`relay.user-quota: expected an integer, got a string`). An operator
//! fixes everything in one pass instead of restarting once per mistake.
//! That is why the file is parsed into a plain [`toml::Table`] and walked by
//! a small hand-written reader rather than deserialized with
//! `deny_unknown_fields`, which stops at the first problem.

mod env;
mod reader;
mod schema;
mod sections;

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};
use std::time::Duration;

use base64::Engine as _;
use rand::RngCore as _;

pub use schema::{Key, ValueKind, ENV_CONFIG_PATH, ENV_PREFIX, SCHEMA};

/// The configuration used when no file is given: a loopback-only relay for
/// local testing, without secrets (one is generated at load time).
pub const EMBEDDED_DEFAULT: &str = include_str!("default.toml");

/// A commented example of every key; it is a valid configuration.
pub const EXAMPLE: &str = include_str!("../examples/turnpike.toml");

/// The whole configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// `[relay]`: the TURN service.
    pub relay: Relay,
    /// `[admin]`: the local admin/metrics HTTP endpoint.
    pub admin: Admin,
    /// `[log]`: logging.
    pub log: Log,
    /// Where the configuration came from.
    pub source: Source,
}

impl Config {
    /// Whether this is the embedded default (no file was given), in which
    /// case the secret may have been generated at load time.
    pub fn is_embedded(&self) -> bool {
        self.source == Source::Embedded
    }
}

/// Where a [`Config`] came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// A file (or, from [`parse`], the placeholder path `<string>`).
    File(PathBuf),
    /// [`EMBEDDED_DEFAULT`].
    Embedded,
}

/// `[relay]`: the TURN service.
#[derive(Debug, Clone)]
pub struct Relay {
    /// The REALM clients authenticate in. Non-empty, at most 763 bytes (the
    /// REALM attribute limit of RFC 8489), no control characters.
    pub realm: String,
    /// Where to receive TURN traffic; at least one. The same address may
    /// appear once for UDP and once for a stream transport (TCP or TLS, which
    /// share one listener per address: see [`Transport`]).
    pub listen: Vec<Listen>,
    /// The public addresses of this host, if it sits behind a 1:1 NAT
    /// (advertised in place of the relay address of the same family). At
    /// most one per family, and only for a family `relay_ips` has. Default:
    /// none (both `None`: not behind a NAT).
    pub external_ips: RelayIps,
    /// The local addresses relayed transport addresses are allocated on: at
    /// least one, at most one per family. Default: the IPs of the listen
    /// addresses that are not wildcards (the first IPv4, the first IPv6);
    /// required when every listen address is a wildcard, because 0.0.0.0
    /// cannot be advertised to clients.
    pub relay_ips: RelayIps,
    /// Ports relayed transport addresses are allocated from. Default
    /// 49152-65535, the IANA dynamic range (RFC 6335), which never collides
    /// with registered services.
    pub relay_ports: PortRange,
    /// Shared secrets for time-limited credentials. The first signs, all
    /// verify, so a secret can be rotated without dropping clients. Each is
    /// at least 16 bytes (an HMAC key shorter than that is guessable).
    pub secrets: Vec<Secret>,
    /// Peer networks to permit although the relay refuses them by default
    /// (loopback, private and other special-purpose ranges); wins over
    /// `deny_peers`. Default: none.
    pub allow_peers: Vec<ipnet::IpNet>,
    /// Peer networks to refuse on top of the built-in special-purpose
    /// ranges. Default: none.
    pub deny_peers: Vec<ipnet::IpNet>,
    /// Allocations one user may hold at once. Default 16 (a browser opens a
    /// few per call; 16 leaves room for several calls but stops one leaked
    /// credential from exhausting the port range). At least 1. The parser
    /// always sets it; there is no "0 means unlimited": write a large number.
    pub user_quota: Option<u32>,
    /// Allocations on this server at once. Default: none, i.e. bounded only
    /// by the size of `relay_ports`. At least 1.
    pub total_quota: Option<u32>,
    /// Permissions per allocation. Default 64 (a call needs a handful of
    /// peers; the cap bounds per-allocation state). 1 to 1024.
    pub max_permissions: u32,
    /// The longest lifetime a client may request. Default 1h. At least 10m,
    /// the RFC 8656 default allocation lifetime, and at most 24h.
    pub max_lifetime: Duration,
    /// How long a NONCE stays valid. Default 10m: long enough that clients
    /// rarely retry on 438 (Stale Nonce), short enough to limit replay.
    /// 30s to 1h.
    pub nonce_lifetime: Duration,
    /// Worker threads. Default (`None`): one per core. 1 to 1024.
    pub threads: Option<NonZeroUsize>,
    /// On SIGTERM, keep relaying existing allocations this long (refusing
    /// new ones) so calls can move elsewhere. Default 30s, at most 1h.
    pub grace_period: Duration,
    /// Concurrent TCP/TLS connections from one source IP. Default 64: room
    /// for a household or office behind one NAT (a call holds a connection
    /// or two per tab), while one host cannot tie up thousands of sockets.
    /// 1 to 100000.
    pub max_connections_per_ip: u32,
    /// Time a TCP/TLS connection gets from accept until its TLS handshake
    /// (if any) is done AND its first complete STUN message has arrived.
    /// Default 10s: a few round trips take well under a second, 10s allows
    /// for slow mobile links and still frees a stalling connection quickly.
    /// 1s to 5m.
    pub handshake_timeout: Duration,
    /// A TCP/TLS connection that receives no bytes for this long is closed.
    /// Default 5m: clients refresh permissions every 4-5 minutes, so a live
    /// call is never cut while a dead connection is freed in minutes.
    /// 5s to 1h.
    pub idle_timeout: Duration,
    /// The largest frame a TCP/TLS connection may declare, in bytes; a frame
    /// declaring more is refused and the connection closed. Default 65552,
    /// the largest STUN message (20 + 65532), which also covers the largest
    /// ChannelData message (4 + 65535). 548 to 65552.
    pub max_frame: usize,
    /// Frames queued between a TCP/TLS connection's task and its shard, in
    /// each direction; when full, frames are dropped and counted. Default
    /// 256: rides out a scheduling hiccup (about a quarter second of a video
    /// call) while bounding what a stuck connection holds. 1 to 65536.
    pub stream_queue: usize,
    /// `[relay.tls]`: the certificate for TLS on stream listeners; required
    /// by a `tls://` listener. Default: none.
    pub tls: Option<Tls>,
}

/// At most one address per family. For [`Relay::relay_ips`] at least one
/// is set; for [`Relay::external_ips`] both may be `None`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RelayIps {
    /// The IPv4 address, if any.
    pub v4: Option<Ipv4Addr>,
    /// The IPv6 address, if any.
    pub v6: Option<Ipv6Addr>,
}

impl RelayIps {
    /// The address of one family: IPv6 if `ipv6`, else IPv4.
    pub fn get(&self, ipv6: bool) -> Option<IpAddr> {
        if ipv6 {
            self.v6.map(IpAddr::V6)
        } else {
            self.v4.map(IpAddr::V4)
        }
    }

    /// Every address, IPv4 first.
    pub fn iter(&self) -> impl Iterator<Item = IpAddr> {
        self.v4
            .map(IpAddr::V4)
            .into_iter()
            .chain(self.v6.map(IpAddr::V6))
    }

    /// The IPv4 address if there is one, else the IPv6 address. For an
    /// empty set (never the case for a parsed `relay_ips`) this is
    /// `0.0.0.0`; check [`RelayIps::is_empty`] where that can happen.
    pub fn primary(&self) -> IpAddr {
        self.iter()
            .next()
            .unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED))
    }

    /// Whether neither family has an address.
    pub fn is_empty(&self) -> bool {
        self.v4.is_none() && self.v6.is_none()
    }
}

/// `[relay.tls]`: PEM files for TLS on stream listeners. Both were
/// readable when the configuration was loaded; only their paths are kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tls {
    /// `cert-file`: the certificate chain, leaf first.
    pub cert_file: PathBuf,
    /// `key-file`: the private key of the leaf certificate.
    pub key_file: PathBuf,
}

/// One address to receive TURN traffic on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Listen {
    /// The transport.
    pub transport: Transport,
    /// The local socket address.
    pub addr: SocketAddr,
}

impl fmt::Display for Listen {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}://{}", self.transport, self.addr)
    }
}

/// A listening transport.
///
/// `tcp://` and `tls://` name the same thing, a stream listener, which tells
/// TLS from plain TCP by the first byte a client sends (a TLS handshake
/// record starts with 0x16, which no STUN message of a defined method and no
/// ChannelData message does). So one
/// address can have only one of them; `tls://` differs from `tcp://` only
/// in that it insists that `[relay.tls]` is configured. Without
/// `[relay.tls]`, a `tcp://` listener serves plain TCP only.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// `udp://`
    Udp,
    /// `tcp://`: TURN over TCP (RFC 8656), and over TLS too when
    /// `[relay.tls]` is configured.
    Tcp,
    /// `tls://`: like `tcp://`, but requires `[relay.tls]`.
    Tls,
}

impl Transport {
    /// Whether this is a stream (TCP or TLS) transport.
    pub fn is_stream(&self) -> bool {
        matches!(self, Transport::Tcp | Transport::Tls)
    }
}

impl fmt::Display for Transport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Transport::Udp => f.write_str("udp"),
            Transport::Tcp => f.write_str("tcp"),
            Transport::Tls => f.write_str("tls"),
        }
    }
}

/// An inclusive range of ports, written `"LOW-HIGH"`; `1 <= start <= end`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortRange {
    /// The lowest port in the range.
    pub start: u16,
    /// The highest port in the range (inclusive).
    pub end: u16,
}

impl PortRange {
    /// How many ports the range holds (0 only if built with `start > end`).
    pub fn len(&self) -> u32 {
        (u32::from(self.end) + 1).saturating_sub(u32::from(self.start))
    }

    /// Whether the range holds no port (never true for a parsed range).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether `port` is in the range.
    pub fn contains(&self, port: u16) -> bool {
        (self.start..=self.end).contains(&port)
    }
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.start, self.end)
    }
}

/// A shared secret. `Debug` and `Display` never show it: use
/// [`Secret::expose`] where the bytes are really needed.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret (no length check: the parser checks).
    pub fn new(secret: String) -> Self {
        Secret(secret)
    }

    /// 32 random bytes from the thread-local CSPRNG (seeded from the OS),
    /// base64url-encoded without padding (43 characters).
    pub fn generate() -> Secret {
        let mut bytes = [0u8; 32];
        rand::rng().fill_bytes(&mut bytes);
        Secret(base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes))
    }

    /// The secret itself.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

/// `[admin]`: the admin/metrics HTTP endpoint.
#[derive(Debug, Clone)]
pub struct Admin {
    /// Default 127.0.0.1:9641: loopback, because the endpoint has no
    /// authentication; expose it deliberately or through a proxy.
    pub listen: SocketAddr,
}

/// `[log]`: logging.
#[derive(Debug, Clone)]
pub struct Log {
    /// `error`, `warn`, `info`, `debug`, `trace`, or a tracing `EnvFilter`
    /// directive such as `info,relay_server=debug`. Default `info`.
    pub level: String,
}

/// One problem in the configuration.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{path}: {message}")]
pub struct ConfigError {
    /// Where: a dotted key path (`relay.listen[1]`), `env VAR` for an
    /// override, or the file (with line and column for a syntax error).
    pub path: String,
    /// What is wrong.
    pub message: String,
}

/// Every problem found in a configuration (never empty when returned).
#[derive(Debug)]
pub struct Errors(pub Vec<ConfigError>);

impl Errors {
    /// The paths of all errors, in the order they were found.
    pub fn paths(&self) -> Vec<&str> {
        self.0.iter().map(|e| e.path.as_str()).collect()
    }

    /// The first error at exactly `path`, if any.
    pub fn at(&self, path: &str) -> Option<&ConfigError> {
        self.0.iter().find(|e| e.path == path)
    }
}

/// One line per error: `PATH: MESSAGE`.
impl fmt::Display for Errors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for Errors {}

/// Loads the configuration file at `path`, or [`EMBEDDED_DEFAULT`] when
/// `path` is `None`, then applies the `TURNPIKE_*` overrides in `env`
/// (pass the process environment; other variables are ignored).
///
/// A file that cannot be read is an error naming it: there is no silent
/// fall-back to the embedded default.
pub fn load(path: Option<&Path>, env: &[(String, String)]) -> Result<Config, Errors> {
    let Some(path) = path else {
        return parse_with_source(EMBEDDED_DEFAULT, env, Source::Embedded);
    };
    match std::fs::read_to_string(path) {
        Ok(text) => parse_with_source(&text, env, Source::File(path.to_path_buf())),
        Err(e) => Err(Errors(vec![ConfigError {
            path: path.display().to_string(),
            message: format!("cannot read configuration file: {e}"),
        }])),
    }
}

/// Parses `text` as a configuration file (secrets required) with the
/// overrides in `env`. The result's source is `Source::File("<string>")`,
/// and syntax errors are reported at `<string>:LINE:COLUMN`.
pub fn parse(text: &str, env: &[(String, String)]) -> Result<Config, Errors> {
    parse_with_source(text, env, Source::File(PathBuf::from("<string>")))
}

/// Like [`parse`], with an explicit source: it names the text in syntax
/// errors, and with [`Source::Embedded`] a missing secret is generated
/// instead of being an error.
pub fn parse_with_source(
    text: &str,
    env: &[(String, String)],
    source: Source,
) -> Result<Config, Errors> {
    let mut errs = reader::Errs::default();
    match text.parse::<toml::Table>() {
        Ok(mut table) => {
            env::apply(&mut table, env, &mut errs);
            let config = sections::read(&table, source, &mut errs);
            match config {
                Ok(config) if errs.is_empty() => return Ok(config),
                Ok(_) => {}
                Err(reader::Invalid) if errs.is_empty() => {
                    errs.push_raw("config", "invalid configuration");
                }
                Err(reader::Invalid) => {}
            }
        }
        Err(e) => {
            errs.push_raw(
                syntax_error_path(text, &e, &source),
                format!("invalid TOML: {}", e.message().trim()),
            );
            // Still check the variable names, so every problem shows at once.
            env::apply(&mut toml::Table::new(), env, &mut errs);
        }
    }
    Err(Errors(errs.list))
}

/// `ORIGIN:LINE:COLUMN` (1-based; the column counts characters).
fn syntax_error_path(text: &str, e: &toml::de::Error, source: &Source) -> String {
    let origin = match source {
        Source::File(path) => path.display().to_string(),
        Source::Embedded => "<embedded default>".to_string(),
    };
    let Some(span) = e.span() else {
        return origin;
    };
    let before = text.get(..span.start).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    format!("{origin}:{line}:{column}")
}
