//! Turnpike's configuration: one TOML file plus `TURNPIKE_*` environment
//! overrides, turned into a typed [`Config`].
//!
//! # Schema
//!
//! Six sections, the optional `[relay.tls]` table and the `[[control.apps]]`
//! array, nothing else:
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
//! # max-frame, stream-queue, write-timeout: optional, see examples/turnpike.toml
//!
//! [relay.tls]                           # required by a tls:// listener
//! cert-file = "/etc/turnpike/fullchain.pem"
//! key-file = "/etc/turnpike/privkey.pem"
//!
//! [control]                             # optional: the HTTP API
//! hash-key = "a-long-random-hash-key"   # required, >= 16 bytes
//! # required, at least one; the first signs; or "KID:SECRET" strings
//! jwt-keys = [{ kid = "2025-01", secret = "a-random-secret-of-at-least-32-bytes" }]
//! # listen, public-url, admin-token, turn-urls, credential-ttl, token-ttl,
//! # max-body, request-timeout, trusted-proxies: optional, see
//! # examples/turnpike.toml
//!
//! [[control.apps]]                      # optional, any number
//! id = "web"
//! keys = ["a-long-random-app-key"]
//!
//! [store]                               # optional; no redis-url: in memory
//! redis-url = "redis://:password@127.0.0.1:6379/0"
//!
//! [signal]                              # optional: WebSocket signaling
//! allowed-origins = ["https://app.example.com"]  # or ["*"]; empty: public-url's origin
//! # listen, auth-timeout, ping-interval, idle-timeout, max-message,
//! # message-rate, message-burst, send-queue, write-timeout, resume-window, empty-timeout,
//! # node-timeout, max-connections, max-unauthenticated-per-ip: optional,
//! # see examples/turnpike.toml
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
//! Without `control.turn-urls`, the URLs handed to clients are derived from
//! `[relay]`: every listen address is advertised at the `external-ip` of its
//! family if set, else at its own IP (a wildcard with no `external-ip` of its
//! family is an error on `control.turn-urls`, which must then be given); a
//! UDP listener gives `stun:IP:PORT` and `turn:IP:PORT?transport=udp`, TCP
//! `turn:IP:PORT?transport=tcp`, TLS `turns:IP:PORT?transport=tcp`, in the
//! order stun, turn over UDP, turn over TCP, turns.
//!
//! Without a file, [`load`] uses [`EMBEDDED_DEFAULT`]: a relay on
//! `127.0.0.1:3478` and the control API on `127.0.0.1:8080` for trying
//! things out on one machine, with the secrets generated at start-up (a
//! file must list its own): the relay secret, `control.hash-key`, one jwt
//! key (kid `dev`) and one app (id `dev`, name `Development`, key `tpk_…`).
//! [`Config::generated`] says which values were generated, so the binary
//! can show them once.
//!
//! # Environment overrides
//!
//! Every key can be overridden by `TURNPIKE_` + SECTION + `_` + KEY,
//! uppercased, with `-` and `.` written as `_`: `relay.user-quota` is
//! `TURNPIKE_RELAY_USER_QUOTA`, `admin.listen` is `TURNPIKE_ADMIN_LISTEN`,
//! `relay.tls.cert-file` is `TURNPIKE_RELAY_TLS_CERT_FILE` (setting it
//! creates the `[relay.tls]` table; likewise a `TURNPIKE_CONTROL_*` variable
//! creates `[control]`). Names are built from [`SCHEMA`], so the
//! mapping is unambiguous. Lists (`listen`, `secrets`, `allow-peers`,
//! `deny-peers`, `turn-urls`, `allowed-origins`, and `relay-ip`,
//! `external-ip`, which also take a single address) are comma-separated
//! and an empty value is an empty list. `control.jwt-keys` and `control.apps` ([`ValueKind::NamedSecrets`])
//! take comma-separated `NAME:SECRET` items:
//! `TURNPIKE_CONTROL_JWT_KEYS=kid2:secret2,kid1:secret1`,
//! `TURNPIKE_CONTROL_APPS=web:key1,ios:key2` (one key per app, named by its
//! id). An override replaces the file's
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
//! (`relay.user-quota: expected an integer, got a string`,
//! `control.apps[1].keys[0]: too short: ...`). An operator
//! fixes everything in one pass instead of restarting once per mistake.
//! That is why the file is parsed into a plain [`toml::Table`] and walked by
//! a small hand-written reader rather than deserialized with
//! `deny_unknown_fields`, which stops at the first problem. Secrets are
//! never part of a message, nor of any `Debug` output.

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

/// The configuration used when no file is given: a loopback-only relay and
/// control API for local testing, without secrets (they are generated at
/// load time).
pub const EMBEDDED_DEFAULT: &str = include_str!("default.toml");

/// A commented example of every key; it is a valid configuration.
pub const EXAMPLE: &str = include_str!("../examples/turnpike.toml");

/// The whole configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// `[relay]`: the TURN service.
    pub relay: Relay,
    /// `[control]`: the HTTP API; `None` when the section is absent (a
    /// relay-only deployment).
    pub control: Option<Control>,
    /// `[store]`: where the control plane keeps its state (always present:
    /// without the section, in memory).
    pub store: Store,
    /// `[signal]`: WebSocket signaling (always present: without the
    /// section, [`Signal::default`]).
    pub signal: Signal,
    /// `[admin]`: the local admin/metrics HTTP endpoint.
    pub admin: Admin,
    /// `[log]`: logging.
    pub log: Log,
    /// Where the configuration came from.
    pub source: Source,
    /// Which values were generated at load time rather than configured
    /// (only ever for [`Source::Embedded`]).
    pub generated: Generated,
}

impl Config {
    /// Whether this is the embedded default (no file was given), in which
    /// case secrets may have been generated at load time: see
    /// [`Config::generated`] for which.
    pub fn is_embedded(&self) -> bool {
        self.source == Source::Embedded
    }

    /// The app generated for the embedded default (`dev`, with one key),
    /// if one was: its key exists only in this process, so the binary
    /// shows it once to whoever started it.
    pub fn generated_app(&self) -> Option<&App> {
        if !self.generated.app {
            return None;
        }
        self.control.as_ref().and_then(|c| c.apps.first())
    }
}

/// Which values [`load`] generated because the embedded default has none
/// and no override gave them. Each lives in its usual place in the
/// [`Config`]; these flags only say that it was made up at start-up (and
/// dies with the process), so the binary can show it once, e.g. the relay
/// secret and the dev app's key. A file never gets generated values: all
/// flags are false for [`Source::File`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Generated {
    /// `relay.secrets[0]` (the only secret).
    pub relay_secret: bool,
    /// `control.admin-token` (the embedded default turns the admin API on).
    pub admin_token: bool,
    /// `control.hash-key`.
    pub hash_key: bool,
    /// `control.jwt-keys[0]` (the only key, kid `dev`).
    pub jwt_key: bool,
    /// `control.apps[0]` (the only app: id `dev`, name `Development`, one
    /// key `tpk_…`); see [`Config::generated_app`].
    pub app: bool,
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
    /// Answers to unauthenticated requests (the 401 that starts every
    /// allocation) per second and source IP, per relay thread; the burst is
    /// twice that. Bounds what a spoofed flood can reflect at one victim.
    /// Default 500 (raise it for very large NATs or load tests). 10 to
    /// 1000000.
    pub challenge_rate: u32,
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
    /// Frames queued for one TCP/TLS connection on their way to the client,
    /// never more than 512 KiB (when full, frames are dropped and counted),
    /// and the size of each
    /// shard's one queue of frames from its connections (when full, the
    /// connections wait, which pushes back on their clients through TCP).
    /// Default 256: rides out a scheduling hiccup (about a quarter second of
    /// a video call) while bounding what a stuck connection holds. 1 to 65536.
    pub stream_queue: usize,
    /// Longest one write to a TCP/TLS client may take; a client that reads
    /// nothing for that long is closed (`slow_reader`), freeing what is
    /// queued for it. Default 10s: far beyond a live client's stall, short
    /// enough that a client that stopped reading cannot hold memory. 1s to 5m.
    pub write_timeout: Duration,
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

/// `[control]`: the HTTP API that creates calls, hands out join codes and
/// exchanges them for signaling tokens and TURN credentials.
#[derive(Debug, Clone)]
pub struct Control {
    /// Where the API listens. Default 127.0.0.1:8080: loopback, because a
    /// public API normally sits behind a TLS-terminating proxy.
    pub listen: SocketAddr,
    /// The base of join and signaling URLs (and the JWT issuer): an
    /// absolute `http://` or `https://` URL without query, fragment or
    /// trailing `/`. Default `http://` + `listen` (required when `listen`
    /// is a wildcard address, which clients cannot reach).
    pub public_url: String,
    /// Whether `public_url` is the default, made from `listen`: if `listen`
    /// has port 0, rebuild it from the bound address.
    pub public_url_derived: bool,
    /// The bearer token of the admin API (apps); `None` turns the admin API
    /// off. At least 16 bytes.
    pub admin_token: Option<Secret>,
    /// The key app keys, join codes and tokens are hashed under before they
    /// are stored. At least 16 bytes. Changing it invalidates every stored
    /// app key, code and token.
    pub hash_key: Secret,
    /// Signaling token keys, at least one; the first signs, all verify.
    pub jwt_keys: Vec<JwtKey>,
    /// The `stun:`/`turn:`/`turns:` URLs handed to clients with their TURN
    /// credentials, at least one. Default: derived from `[relay]` by
    /// [`derive_turn_urls`], ordered stun, turn over UDP, turn over TCP,
    /// turns.
    pub turn_urls: Vec<String>,
    /// Whether `turn_urls` were derived from `[relay]`: if a relay listener
    /// has port 0, derive them again from the bound addresses with
    /// [`derive_turn_urls`].
    pub turn_urls_derived: bool,
    /// Lifetime of minted TURN credentials. Default 4h (1m to 24h).
    pub credential_ttl: Duration,
    /// Lifetime of signaling JWTs. Default 5m (30s to 1h).
    pub token_ttl: Duration,
    /// Largest request body in bytes. Default 65536 (1024 to 1048576).
    pub max_body: usize,
    /// Time a request may take. Default 10s (1s to 60s).
    pub request_timeout: Duration,
    /// Proxies in front of the HTTP listeners (control, and signaling on
    /// its own node) whose `X-Forwarded-For` names the client: a request
    /// from one of these networks is counted against the address it
    /// forwards for (per-address rate limits), any other request against
    /// its TCP peer. Default: none (every peer is the client).
    pub trusted_proxies: Vec<ipnet::IpNet>,
    /// Apps declared in the configuration (re-applied at every start).
    /// Default: none (apps are created through the admin API).
    pub apps: Vec<App>,
}

/// The `stun:`/`turn:`/`turns:` URLs that advertise these relay listeners
/// (the default of `control.turn-urls`). Every listen address is advertised
/// at the external IP of its family if there is one, else at its own IP; a
/// UDP listener gives `stun:IP:PORT` and `turn:IP:PORT?transport=udp`, TCP
/// `turn:IP:PORT?transport=tcp`, TLS `turns:IP:PORT?transport=tcp`. All
/// stun URLs come first, then turn over UDP, turn over TCP and turns, each
/// group in listen order; a URL two listeners share is listed once.
///
/// Pass the bound addresses when a listener was configured with port 0.
pub fn derive_turn_urls(
    listen: &[Listen],
    external_ips: &RelayIps,
) -> Result<Vec<String>, DeriveTurnUrlsError> {
    let (mut stun, mut turn_udp, mut turn_tcp, mut turns) = (vec![], vec![], vec![], vec![]);
    for (index, l) in listen.iter().enumerate() {
        let ip = match external_ips.get(l.addr.is_ipv6()) {
            Some(ip) => ip,
            None if l.addr.ip().is_unspecified() => {
                return Err(DeriveTurnUrlsError::Wildcard { index, listen: *l });
            }
            None => l.addr.ip(),
        };
        let at = SocketAddr::new(ip, l.addr.port());
        match l.transport {
            Transport::Udp => {
                stun.push(format!("stun:{at}"));
                turn_udp.push(format!("turn:{at}?transport=udp"));
            }
            Transport::Tcp => turn_tcp.push(format!("turn:{at}?transport=tcp")),
            Transport::Tls => turns.push(format!("turns:{at}?transport=tcp")),
        }
    }
    let mut urls: Vec<String> = Vec::new();
    // Two listeners may advertise the same address (a specific one and a
    // wildcard behind the same external IP): list each URL once.
    for url in [stun, turn_udp, turn_tcp, turns].into_iter().flatten() {
        if !urls.contains(&url) {
            urls.push(url);
        }
    }
    Ok(urls)
}

/// Why [`derive_turn_urls`] found no URLs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DeriveTurnUrlsError {
    /// A listener binds a wildcard address (0.0.0.0 or ::) and there is no
    /// external IP of its family to advertise in its place.
    #[error("{listen} binds a wildcard address and there is no external IP of its family")]
    Wildcard {
        /// Its index in the listen list.
        index: usize,
        /// The listener.
        listen: Listen,
    },
}

/// One signaling token key (`control.jwt-keys`). `Debug` shows the kid,
/// never the secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JwtKey {
    /// The key id in the token header: 1 to 64 characters of
    /// `A-Z a-z 0-9 . _ -`, unique.
    pub kid: String,
    /// The HMAC-SHA-256 key: at least 32 bytes.
    pub secret: Secret,
}

/// One app declared in `[[control.apps]]`. `Debug` shows id and name,
/// never the keys.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct App {
    /// 1 to 64 characters of `A-Z a-z 0-9 _ -`, unique.
    pub id: String,
    /// Shown in listings. Default: the id.
    pub name: String,
    /// The app's API keys, at least one, each at least 16 bytes; no key
    /// belongs to two apps (a key identifies its app).
    pub keys: Vec<Secret>,
}

/// `[store]`: where the control plane keeps its state.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Store {
    /// `redis-url`: Redis, shared by every node. `None` (the default): in
    /// memory, one process, nothing survives a restart.
    pub redis_url: Option<RedisUrl>,
}

/// A `redis://` or `rediss://` (TLS) URL, checked at load time. It may
/// carry a password, so `Debug` and `Display` show it redacted
/// (`redis://:***@host:6379/0`); use [`RedisUrl::expose`] to connect.
#[derive(Clone, PartialEq, Eq)]
pub struct RedisUrl {
    url: String,
    redacted: String,
}

impl RedisUrl {
    /// The URL as configured, password included.
    pub fn expose(&self) -> &str {
        &self.url
    }

    /// Whether the scheme is `rediss://` (TLS).
    pub fn is_tls(&self) -> bool {
        self.url
            .get(..9)
            .is_some_and(|s| s.eq_ignore_ascii_case("rediss://"))
    }
}

impl fmt::Debug for RedisUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RedisUrl({:?})", self.redacted)
    }
}

/// The URL with its password (the whole user part, when it has no `:`)
/// replaced by `***`.
impl fmt::Display for RedisUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted)
    }
}

/// `[signal]`: WebSocket signaling, where the peers of a call exchange
/// offers, answers and candidates. Every field has a default
/// ([`Signal::default`]), so the section is optional. Nothing in it is
/// secret: signaling tokens are checked with `control.jwt-keys`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Signal {
    /// Where `turnpike signal` serves WebSocket signaling. `turnpike serve`
    /// ignores it and serves signaling on the control listener
    /// (`control.listen`) instead. Default 127.0.0.1:8081: loopback, next
    /// to the control API's 8080, because a public endpoint normally sits
    /// behind a TLS-terminating proxy.
    pub listen: SocketAddr,
    /// Which browser origins may open a socket (the `Origin` header of the
    /// upgrade request). Default: [`AllowedOrigins::PublicUrl`] (an empty
    /// list). A request without an `Origin` header (a non-browser client)
    /// is always accepted: see [`AllowedOrigins::allows`].
    pub allowed_origins: AllowedOrigins,
    /// The first message must be `auth` and must arrive within this long
    /// of the upgrade, else the socket is closed. Default 5s (1s to 60s).
    pub auth_timeout: Duration,
    /// How often clients should ping, told to them in `welcome` as
    /// `ping_interval_ms`. Default 15s (1s to 5m).
    pub ping_interval: Duration,
    /// A socket that receives nothing for this long is closed. Always
    /// longer than `ping_interval`. Default 45s (at most 1h).
    pub idle_timeout: Duration,
    /// The largest message a client may send, in bytes; a larger one
    /// closes the socket. Default 65536 (1024 to 1048576).
    pub max_message: usize,
    /// Messages per second one connection may send on average (the refill
    /// rate of its token bucket). Default 50 (1 to 10000).
    pub message_rate: u32,
    /// The capacity of that token bucket: how many messages a connection
    /// may send in a burst. Default 100 (at least 1).
    pub message_burst: u32,
    /// Messages buffered for one slow reader; when its queue is full, the
    /// reader is dropped. Default 256 (8 to 65536).
    pub send_queue: usize,
    /// Longest one message may take to leave; a client whose TCP window
    /// stays shut that long is not reading and is dropped as a slow reader.
    /// Default 10s (1s to 5m).
    pub write_timeout: Duration,
    /// A peer that reconnects with the same peer id within this long
    /// resumes silently (the others see no leave and join). Default 30s
    /// (0s, no resume, to 5m).
    pub resume_window: Duration,
    /// After the last peer leaves, the call ends after this long (unless
    /// someone joins again). Default 60s (1s to 24h).
    pub empty_timeout: Duration,
    /// With several nodes (Redis): a node whose heartbeat has lapsed this
    /// long is taken for dead and its peers are reported left. Default 15s
    /// (3s to 5m).
    pub node_timeout: Duration,
    /// Open signaling sockets on this node; above it new upgrades are
    /// refused with 503. Default 10000 (1 to 1000000).
    pub max_connections: u32,
    /// Sockets from one IP that have not authenticated yet; above it new
    /// upgrades from that IP are refused with 429. Default 64 (1 to
    /// 100000).
    pub max_unauthenticated_per_ip: u32,
}

/// `signal.allowed-origins`: which browser origins may open a signaling
/// socket, and call `POST /v1/join` from their pages (CORS). Configured origins are kept normalized the way browsers send
/// them: lowercase, without the default port (`https://app.example.com`,
/// `http://localhost:3000`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum AllowedOrigins {
    /// An empty list (the default): only the origin of `control.public-url`
    /// (none, without a `[control]` section).
    #[default]
    PublicUrl,
    /// `["*"]`: any origin.
    Any,
    /// These origins only (at least one, no duplicates).
    List(Vec<String>),
}

impl AllowedOrigins {
    /// Whether an upgrade request with this `Origin` header may proceed.
    /// `origin` is `None` when the header is absent (a non-browser
    /// client): always accepted. `public_url` is `control.public-url`
    /// (`None` without a `[control]` section), whose origin is the one
    /// accepted by [`AllowedOrigins::PublicUrl`]. Origins compare
    /// case-insensitively and with the default port omitted; an `Origin`
    /// that is not `scheme://host[:port]` (such as `null`) is accepted only
    /// by [`AllowedOrigins::Any`].
    pub fn allows(&self, origin: Option<&str>, public_url: Option<&str>) -> bool {
        let Some(origin) = origin else {
            return true;
        };
        if *self == AllowedOrigins::Any {
            return true;
        }
        let Ok(origin) = sections::parse_origin(origin) else {
            return false;
        };
        match self {
            AllowedOrigins::Any => true,
            AllowedOrigins::PublicUrl => {
                public_url.and_then(sections::origin_of_url).as_ref() == Some(&origin)
            }
            AllowedOrigins::List(list) => list.contains(&origin),
        }
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
/// errors, and with [`Source::Embedded`] a missing secret (relay secret,
/// `control.hash-key`, `control.jwt-keys`) or app list is generated instead
/// of being an error or empty; [`Config::generated`] says which.
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
