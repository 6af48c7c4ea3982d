//! One function per section, plus the parsers for individual values.
//!
//! Each section function reads every key (recording all errors) before it
//! builds its struct, so one bad key never hides another.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::num::NonZeroUsize;
use std::path::PathBuf;
use std::time::Duration;

use ipnet::IpNet;
use toml::{Table, Value};

use crate::reader::{describe, Errs, Invalid, Reader};
use crate::{
    Admin, AllowedOrigins, App, Config, Control, DeriveTurnUrlsError, Generated, JwtKey, Listen,
    Log, PortRange, RedisUrl, Relay, RelayIps, Secret, Signal, Source, Store, Tls, Transport,
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
/// 500 answers a second per source IP and relay thread: room for thousands of users behind one
/// NAT to allocate, while a spoofed flood reflects at most ~50 KB/s per thread at one victim.
const DEFAULT_CHALLENGE_RATE: u32 = 500;
/// Below 10 a busy office behind one NAT would wait for its first answers.
const MIN_CHALLENGE_RATE: u32 = 10;
const MAX_CHALLENGE_RATE: u32 = 1_000_000;
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
/// A write to a TCP/TLS client may take this long: a client that reads nothing for that long
/// (its receive window and our send buffer full) is closed rather than left holding its queue.
const DEFAULT_STREAM_WRITE_TIMEOUT: Duration = Duration::from_secs(10);
const MIN_STREAM_WRITE_TIMEOUT: Duration = Duration::from_secs(1);
const MAX_STREAM_WRITE_TIMEOUT: Duration = Duration::from_secs(300);
const MAX_STREAM_QUEUE: u32 = 65_536;
/// Loopback, because the admin endpoint has no authentication.
const DEFAULT_ADMIN_LISTEN: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 9641);
const DEFAULT_LOG_LEVEL: &str = "info";

/// The REALM attribute must be shorter than 128 characters and at most 763
/// bytes (RFC 8489, section 14.9).
const MAX_REALM_BYTES: usize = 763;
/// Shorter HMAC keys for time-limited credentials are guessable offline.
const MIN_SECRET_BYTES: usize = 16;

/// Loopback: a public API normally sits behind a TLS-terminating proxy,
/// and an API opened to the network should be a decision, not a default.
const DEFAULT_CONTROL_LISTEN: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 8080);
/// HS256 keys shorter than the hash output (32 bytes) weaken the MAC
/// (RFC 7518, section 3.2 requires at least that).
const MIN_JWT_SECRET_BYTES: usize = 32;
/// A kid travels in every token header and an app id in URLs and storage
/// keys: a bound keeps both short, 64 leaves room for dates and names.
const MAX_NAME_CHARS: usize = 64;
/// App names are shown in listings; a bound keeps one app from filling a
/// page, 128 is plenty for a human-readable name.
const MAX_APP_NAME_CHARS: usize = 128;
/// The default call length: a call's credentials outlive it, so nobody
/// loses the relay mid-call because their credential expired.
const DEFAULT_CREDENTIAL_TTL: Duration = Duration::from_secs(4 * 3600);
/// Shorter than a minute and a client on a slow link may not get to use
/// its credential at all.
const MIN_CREDENTIAL_TTL: Duration = Duration::from_secs(60);
/// A leaked credential works until it expires: a day at most.
const MAX_CREDENTIAL_TTL: Duration = Duration::from_secs(24 * 3600);
/// A signaling token is exchanged for a connection at once: minutes are
/// enough, and a leaked token dies quickly.
const DEFAULT_TOKEN_TTL: Duration = Duration::from_secs(300);
/// Below 30s clock skew between nodes and slow page loads reject good
/// tokens.
const MIN_TOKEN_TTL: Duration = Duration::from_secs(30);
const MAX_TOKEN_TTL: Duration = Duration::from_secs(3600);
/// API requests are small JSON objects (a call's metadata is the largest
/// part): 64 KiB holds any reasonable one and bounds memory per request.
const DEFAULT_MAX_BODY: u32 = 64 * 1024;
/// Below 1 KiB even an ordinary create-call request would not fit.
const MIN_MAX_BODY: u32 = 1024;
/// 1 MiB: beyond that a request is not an API call but a memory attack.
const MAX_MAX_BODY: u32 = 1024 * 1024;
/// Every API operation is a few store round trips: 10s covers a slow
/// Redis while a stuck request still frees its slot quickly.
const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
const MIN_REQUEST_TIMEOUT: Duration = Duration::from_secs(1);
/// A minute: longer than any operation should take, shorter than client
/// and proxy timeouts, so the API answers before they give up.
const MAX_REQUEST_TIMEOUT: Duration = Duration::from_secs(60);

/// Loopback, next to the control API's 8080: a public signaling endpoint
/// normally sits behind a TLS-terminating proxy, and opening it to the
/// network should be a decision, not a default.
const DEFAULT_SIGNAL_LISTEN: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 8081);
/// A client opens the socket with its token in hand and authenticates at
/// once: 5s covers a slow mobile link, while a socket that never
/// authenticates gives its slot back quickly.
const DEFAULT_AUTH_TIMEOUT: Duration = Duration::from_secs(5);
const MIN_AUTH_TIMEOUT: Duration = Duration::from_secs(1);
/// Longer and an unauthenticated socket holds its slot for no reason.
const MAX_AUTH_TIMEOUT: Duration = Duration::from_secs(60);
/// Well under the 30-60s after which proxies, load balancers and NATs drop
/// a quiet connection, so an idle call keeps its socket, at one small
/// message per client every 15s.
const DEFAULT_PING_INTERVAL: Duration = Duration::from_secs(15);
const MIN_PING_INTERVAL: Duration = Duration::from_secs(1);
const MAX_PING_INTERVAL: Duration = Duration::from_secs(300);
/// Three ping intervals: a client may miss two pings (a stalled tab, a
/// lossy link) before it is taken for gone, and a dead socket is still
/// noticed within a minute.
const DEFAULT_SIGNAL_IDLE_TIMEOUT: Duration = Duration::from_secs(45);
const MIN_SIGNAL_IDLE_TIMEOUT: Duration = Duration::from_secs(1);
/// A dead socket should not hold its slot (and the peer its place in the
/// call) for more than an hour.
const MAX_SIGNAL_IDLE_TIMEOUT: Duration = Duration::from_secs(3600);
/// An SDP offer with many codecs and candidates runs to tens of KiB: 64 KiB
/// holds any real one and bounds what one message costs.
const DEFAULT_MAX_MESSAGE: u32 = 64 * 1024;
/// Below 1 KiB even a plain SDP answer would not fit.
const MIN_MAX_MESSAGE: u32 = 1024;
/// 1 MiB: beyond that a message is not signaling but a memory attack.
const MAX_MAX_MESSAGE: u32 = 1024 * 1024;
/// A call's signaling is a handful of messages per second, more only while
/// ICE gathers candidates: 50 leaves ample headroom, while one client
/// cannot flood a room.
const DEFAULT_MESSAGE_RATE: u32 = 50;
const MAX_MESSAGE_RATE: u32 = 10_000;
/// Two seconds' worth at the default rate: joining or restarting ICE sends
/// a flurry (offer, answer, a burst of candidates) that must not be cut.
const DEFAULT_MESSAGE_BURST: u32 = 100;
/// Rides out a reader's brief stall (a busy tab, a slow link), while one
/// stuck reader holds at most 256 messages (16 MiB at the largest message,
/// usually far less) before it is dropped.
const DEFAULT_SEND_QUEUE: u32 = 256;
/// A TCP window shut for 10 s is a client that stopped reading, not a slow network: a
/// browser reads signaling as it arrives.
const DEFAULT_WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// Below a second a busy but healthy client could be dropped; past five minutes a dead one
/// holds its queue too long.
const MIN_WRITE_TIMEOUT: Duration = Duration::from_secs(1);
const MAX_WRITE_TIMEOUT: Duration = Duration::from_secs(300);
/// Fewer and a reader is dropped for any hiccup during a candidate burst.
const MIN_SEND_QUEUE: u32 = 8;
const MAX_SEND_QUEUE: u32 = 65_536;
/// Covers a page reload or a network switch (Wi-Fi to cellular), so the
/// others see no leave and join; short enough that a peer who really left
/// is reported gone soon.
const DEFAULT_RESUME_WINDOW: Duration = Duration::from_secs(30);
const MAX_RESUME_WINDOW: Duration = Duration::from_secs(300);
/// A lone participant reloading, or everyone's network blipping at once,
/// must not end the call; an abandoned call is cleaned up within a minute.
const DEFAULT_EMPTY_TIMEOUT: Duration = Duration::from_secs(60);
const MIN_EMPTY_TIMEOUT: Duration = Duration::from_secs(1);
const MAX_EMPTY_TIMEOUT: Duration = Duration::from_secs(24 * 3600);
/// Several missed heartbeats: a busy node or a Redis failover is not taken
/// for a dead node, and a dead node's peers are still reported left within
/// seconds.
const DEFAULT_NODE_TIMEOUT: Duration = Duration::from_secs(15);
/// Below a few seconds a GC pause or a slow Redis would declare live nodes
/// dead.
const MIN_NODE_TIMEOUT: Duration = Duration::from_secs(3);
const MAX_NODE_TIMEOUT: Duration = Duration::from_secs(300);
/// Thousands of participants per node, while sockets and their buffers
/// stay well within the memory and file descriptors of a modest server;
/// raise it (and `ulimit -n`) for a bigger one.
const DEFAULT_MAX_CONNECTIONS: u32 = 10_000;
const MAX_MAX_CONNECTIONS: u32 = 1_000_000;
/// Like `relay.max-connections-per-ip`: room for a household or an office
/// behind one NAT opening tabs at once, while one host cannot tie up
/// thousands of sockets that never authenticate.
const DEFAULT_MAX_UNAUTHENTICATED_PER_IP: u32 = 64;
const MAX_MAX_UNAUTHENTICATED_PER_IP: u32 = 100_000;

/// The embedded default's generated jwt key and app.
const DEV_KID: &str = "dev";
const DEV_APP_ID: &str = "dev";
const DEV_APP_NAME: &str = "Development";
/// Generated app keys look like the API's (`control::secrets::new_app_key`),
/// so they are recognisable in logs and by secret scanners.
const APP_KEY_PREFIX: &str = "tpk_";

/// Reads the whole (already env-overridden) table.
pub(crate) fn read(table: &Table, source: Source, errs: &mut Errs) -> Result<Config, Invalid> {
    let empty = Table::new();
    let mut root = Reader::new("", table, errs);
    let relay = root.table("relay");
    let control = root.table("control");
    let store = root.table("store");
    let signal = root.table("signal");
    let admin = root.table("admin");
    let log = root.table("log");
    root.finish();

    let mut generated = Generated::default();
    // A section that is not a table was reported; don't pile errors on it.
    let relay = relay.and_then(|t| {
        read_relay(
            &mut Reader::new("relay", t.unwrap_or(&empty), errs),
            &source,
            &mut generated,
        )
    });
    let control = control.and_then(|t| match t {
        Some(t) => read_control(
            &mut Reader::new("control", t, errs),
            &source,
            relay.as_ref().ok(),
            &mut generated,
        )
        .map(Some),
        None => Ok(None),
    });
    let store =
        store.and_then(|t| read_store(&mut Reader::new("store", t.unwrap_or(&empty), errs)));
    let signal =
        signal.and_then(|t| read_signal(&mut Reader::new("signal", t.unwrap_or(&empty), errs)));
    let admin =
        admin.and_then(|t| read_admin(&mut Reader::new("admin", t.unwrap_or(&empty), errs)));
    let log = log.and_then(|t| read_log(&mut Reader::new("log", t.unwrap_or(&empty), errs)));

    Ok(Config {
        relay: relay?,
        control: control?,
        store: store?,
        signal: signal?,
        admin: admin?,
        log: log?,
        source,
        generated,
    })
}

fn read_relay(
    r: &mut Reader<'_, '_>,
    source: &Source,
    generated: &mut Generated,
) -> Result<Relay, Invalid> {
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
        Ok(_) if *source == Source::Embedded => {
            generated.relay_secret = true;
            Ok(vec![Secret::generate()])
        }
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
    let challenge_rate = r.integer("challenge-rate", MIN_CHALLENGE_RATE, MAX_CHALLENGE_RATE);
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
    let write_timeout = r.duration(
        "write-timeout",
        MIN_STREAM_WRITE_TIMEOUT,
        MAX_STREAM_WRITE_TIMEOUT,
    );

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
        challenge_rate: challenge_rate?.unwrap_or(DEFAULT_CHALLENGE_RATE),
        max_lifetime: max_lifetime?.unwrap_or(DEFAULT_MAX_LIFETIME),
        nonce_lifetime: nonce_lifetime?.unwrap_or(DEFAULT_NONCE_LIFETIME),
        threads: threads?.and_then(|n| NonZeroUsize::new(n as usize)),
        grace_period: grace_period?.unwrap_or(DEFAULT_GRACE_PERIOD),
        max_connections_per_ip: max_connections_per_ip?.unwrap_or(DEFAULT_MAX_CONNECTIONS_PER_IP),
        handshake_timeout: handshake_timeout?.unwrap_or(DEFAULT_HANDSHAKE_TIMEOUT),
        idle_timeout: idle_timeout?.unwrap_or(DEFAULT_IDLE_TIMEOUT),
        max_frame: max_frame?.unwrap_or(DEFAULT_MAX_FRAME) as usize,
        stream_queue: stream_queue?.unwrap_or(DEFAULT_STREAM_QUEUE) as usize,
        write_timeout: write_timeout?.unwrap_or(DEFAULT_STREAM_WRITE_TIMEOUT),
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

/// How a `jwt-keys` item is written, for wrong-type messages.
const JWT_KEY_FORM: &str = r#"a table { kid = "…", secret = "…" } or a "KID:SECRET" string"#;
const JWT_KEYS_FORM: &str =
    r#"an array of { kid = "…", secret = "…" } tables or "KID:SECRET" strings"#;
/// How an `apps` item is written, for wrong-type messages.
const APP_FORM: &str = r#"a [[control.apps]] table (id, name, keys) or an "ID:KEY" string"#;
const APPS_FORM: &str = r#"[[control.apps]] tables or an array of "ID:KEY" strings"#;

/// `[control]`. Every key is read before the ones that depend on others
/// are judged: `public-url` defaults from `listen`, `turn-urls` from
/// `[relay]` (`relay` is `None` when that section was bad: its errors are
/// already recorded and nothing is derived from it).
fn read_control(
    r: &mut Reader<'_, '_>,
    source: &Source,
    relay: Option<&Relay>,
    generated: &mut Generated,
) -> Result<Control, Invalid> {
    let embedded = *source == Source::Embedded;
    let listen = r.parse("listen", r#"an address like "127.0.0.1:8080""#, |s| {
        parse_socket_addr(s, "127.0.0.1:8080")
    });
    let public_url = r.parse(
        "public-url",
        r#"a URL like "https://turnpike.example.com""#,
        parse_public_url,
    );
    let admin_token = match r.parse("admin-token", "a string", |s| {
        parse_secret_of(s, MIN_SECRET_BYTES)
    }) {
        // The local default turns the admin API on, so the walk-through in docs/api.md (create
        // an app, then a call) works on a laptop with no setup; a file turns it on explicitly.
        Ok(None) if embedded => {
            generated.admin_token = true;
            Ok(Some(Secret::generate()))
        }
        other => other,
    };

    let hash_key = match r.parse("hash-key", "a string", |s| {
        parse_secret_of(s, MIN_SECRET_BYTES)
    }) {
        Ok(Some(key)) => Ok(key),
        Ok(None) if embedded => {
            generated.hash_key = true;
            Ok(Secret::generate())
        }
        Ok(None) => {
            r.error(
                "hash-key",
                "required: a random secret of at least 16 bytes that app keys, join codes and \
                 tokens are stored hashed under (head -c 32 /dev/urandom | base64)",
            );
            Err(Invalid)
        }
        Err(Invalid) => Err(Invalid),
    };

    let jwt_keys = match r.array("jwt-keys", JWT_KEYS_FORM, read_jwt_key) {
        Ok(Some(keys)) if !keys.is_empty() => check_kids(r, keys),
        Ok(_) if embedded => {
            generated.jwt_key = true;
            Ok(vec![JwtKey {
                kid: DEV_KID.to_string(),
                secret: Secret::generate(),
            }])
        }
        Ok(_) => {
            r.error(
                "jwt-keys",
                r#"at least one key is required, e.g. [{ kid = "2025-01", secret = "…" }]"#,
            );
            Err(Invalid)
        }
        Err(Invalid) => Err(Invalid),
    };

    let mut turn_urls_derived = false;
    let turn_urls = match r.list("turn-urls", parse_turn_url) {
        Ok(Some(urls)) if urls.is_empty() => {
            r.error(
                "turn-urls",
                "at least one URL is required (leave turn-urls out to derive them from [relay])",
            );
            Err(Invalid)
        }
        Ok(Some(urls)) => check_unique(r, "turn-urls", &urls, |a, b| a.eq_ignore_ascii_case(b)),
        Ok(None) => {
            turn_urls_derived = true;
            match relay {
                Some(relay) => derive_turn_urls(r, relay),
                None => Err(Invalid),
            }
        }
        Err(Invalid) => Err(Invalid),
    };

    let credential_ttl = r.duration("credential-ttl", MIN_CREDENTIAL_TTL, MAX_CREDENTIAL_TTL);
    let token_ttl = r.duration("token-ttl", MIN_TOKEN_TTL, MAX_TOKEN_TTL);
    let max_body = r.integer("max-body", MIN_MAX_BODY, MAX_MAX_BODY);
    let request_timeout = r.duration("request-timeout", MIN_REQUEST_TIMEOUT, MAX_REQUEST_TIMEOUT);
    let trusted_proxies = r.list("trusted-proxies", parse_net);

    let apps = match r.array("apps", APPS_FORM, read_app) {
        Ok(Some(apps)) => check_apps(r, apps),
        // Only an absent list: an explicitly empty one (an empty
        // TURNPIKE_CONTROL_APPS) means "no apps", even here.
        Ok(None) if embedded => {
            generated.app = true;
            let key = format!("{APP_KEY_PREFIX}{}", Secret::generate().expose());
            Ok(vec![App {
                id: DEV_APP_ID.to_string(),
                name: DEV_APP_NAME.to_string(),
                keys: vec![Secret::new(key)],
            }])
        }
        Ok(None) => Ok(Vec::new()),
        Err(Invalid) => Err(Invalid),
    };

    // Join links built on 0.0.0.0 would lead nowhere: a wildcard listen
    // address needs the public URL spelled out.
    let public_url_derived = matches!(public_url, Ok(None));
    let public_url = match (public_url, listen) {
        (Ok(Some(url)), _) => Ok(url),
        (Ok(None), Ok(listen)) => {
            let listen = listen.unwrap_or(DEFAULT_CONTROL_LISTEN);
            if listen.ip().is_unspecified() {
                let by = r.name("listen");
                r.error(
                    "public-url",
                    format!(
                        "required when {by} binds a wildcard address ({listen}): join and \
                         signaling URLs need an address clients can reach, e.g. \
                         \"https://turnpike.example.com\""
                    ),
                );
                Err(Invalid)
            } else {
                Ok(format!("http://{listen}"))
            }
        }
        (Ok(None), Err(Invalid)) | (Err(Invalid), _) => Err(Invalid),
    };

    r.finish();
    Ok(Control {
        listen: listen?.unwrap_or(DEFAULT_CONTROL_LISTEN),
        public_url: public_url?,
        public_url_derived,
        admin_token: admin_token?,
        hash_key: hash_key?,
        jwt_keys: jwt_keys?,
        turn_urls: turn_urls?,
        turn_urls_derived,
        credential_ttl: credential_ttl?.unwrap_or(DEFAULT_CREDENTIAL_TTL),
        token_ttl: token_ttl?.unwrap_or(DEFAULT_TOKEN_TTL),
        max_body: max_body?.unwrap_or(DEFAULT_MAX_BODY) as usize,
        request_timeout: request_timeout?.unwrap_or(DEFAULT_REQUEST_TIMEOUT),
        trusted_proxies: trusted_proxies?.unwrap_or_default(),
        apps: apps?,
    })
}

/// One `jwt-keys` item: `{ kid, secret }` or `"KID:SECRET"`.
fn read_jwt_key(errs: &mut Errs, path: &str, value: &Value) -> Result<JwtKey, Invalid> {
    match value {
        Value::String(s) => {
            let Some((kid, secret)) = s.split_once(':') else {
                // Never echo the item: without a ':' it may be a bare secret.
                errs.push(
                    path,
                    r#"expected "KID:SECRET" (or a table { kid, secret }), found no ':'"#,
                );
                return Err(Invalid);
            };
            let kid = parse_name(kid, ".").map_err(|e| errs.push(path, format!("kid: {e}")));
            let secret = parse_secret_of(secret, MIN_JWT_SECRET_BYTES)
                .map_err(|e| errs.push(path, format!("secret: {e}")));
            match (kid, secret) {
                (Ok(kid), Ok(secret)) => Ok(JwtKey { kid, secret }),
                _ => Err(Invalid),
            }
        }
        Value::Table(t) => {
            let mut r = Reader::item(path.to_string(), t, errs);
            let kid = r.parse("kid", "a string", |s| parse_name(s, "."));
            let kid = r.required("kid", kid, r#"required: the key id, e.g. "2025-01""#);
            let secret = r.parse("secret", "a string", |s| {
                parse_secret_of(s, MIN_JWT_SECRET_BYTES)
            });
            let secret = r.required(
                "secret",
                secret,
                "required: a random secret of at least 32 bytes",
            );
            r.finish();
            Ok(JwtKey {
                kid: kid?,
                secret: secret?,
            })
        }
        v => {
            errs.push(
                path,
                format!("expected {JWT_KEY_FORM}, got {}", describe(v)),
            );
            Err(Invalid)
        }
    }
}

/// Reports every later key with the kid of an earlier one at
/// `jwt-keys[i]`: a token names its key by kid, so it must be unique.
fn check_kids(r: &mut Reader<'_, '_>, keys: Vec<JwtKey>) -> Result<Vec<JwtKey>, Invalid> {
    let mut ok = true;
    for (i, key) in keys.iter().enumerate() {
        if let Some(first) = keys[..i].iter().position(|k| k.kid == key.kid) {
            ok = false;
            let first = r.name(&format!("jwt-keys[{first}]"));
            r.error(
                &format!("jwt-keys[{i}]"),
                format!("kid {:?} is already used by {first}", key.kid),
            );
        }
    }
    if ok {
        Ok(keys)
    } else {
        Err(Invalid)
    }
}

/// An app as read, with the dotted path of each of its keys (for
/// duplicate reports across apps).
struct ReadApp {
    app: App,
    key_paths: Vec<String>,
}

/// One `apps` item: a `[[control.apps]]` table or `"ID:KEY"`.
fn read_app(errs: &mut Errs, path: &str, value: &Value) -> Result<ReadApp, Invalid> {
    match value {
        Value::String(s) => {
            let Some((id, key)) = s.split_once(':') else {
                // Never echo the item: without a ':' it may be a bare key.
                errs.push(
                    path,
                    r#"expected "ID:KEY" (or a [[control.apps]] table), found no ':'"#,
                );
                return Err(Invalid);
            };
            let id = parse_name(id, "").map_err(|e| errs.push(path, format!("id: {e}")));
            let key = parse_secret_of(key, MIN_SECRET_BYTES)
                .map_err(|e| errs.push(path, format!("key: {e}")));
            match (id, key) {
                (Ok(id), Ok(key)) => Ok(ReadApp {
                    app: App {
                        name: id.clone(),
                        id,
                        keys: vec![key],
                    },
                    key_paths: vec![path.to_string()],
                }),
                _ => Err(Invalid),
            }
        }
        Value::Table(t) => {
            let mut r = Reader::item(path.to_string(), t, errs);
            let id = r.parse("id", "a string", |s| parse_name(s, ""));
            let id = r.required("id", id, r#"required: the app id, e.g. "web""#);
            let name = r.parse("name", "a string", parse_app_name);
            let keys = match r.list("keys", |s| parse_secret_of(s, MIN_SECRET_BYTES)) {
                Ok(Some(keys)) if !keys.is_empty() => Ok(keys),
                Ok(_) => {
                    r.error(
                        "keys",
                        "at least one key is required (each a random secret of at least 16 \
                         bytes)",
                    );
                    Err(Invalid)
                }
                Err(Invalid) => Err(Invalid),
            };
            r.finish();
            let (id, keys) = (id?, keys?);
            Ok(ReadApp {
                key_paths: (0..keys.len())
                    .map(|j| format!("{path}.keys[{j}]"))
                    .collect(),
                app: App {
                    name: name?.unwrap_or_else(|| id.clone()),
                    id,
                    keys,
                },
            })
        }
        v => {
            errs.push(path, format!("expected {APP_FORM}, got {}", describe(v)));
            Err(Invalid)
        }
    }
}

/// App ids are unique, and so are keys across all apps: a request's key
/// is what tells which app sends it.
fn check_apps(r: &mut Reader<'_, '_>, apps: Vec<ReadApp>) -> Result<Vec<App>, Invalid> {
    let mut ok = true;
    for (i, app) in apps.iter().enumerate() {
        if let Some(first) = apps[..i].iter().position(|a| a.app.id == app.app.id) {
            ok = false;
            let first = r.name(&format!("apps[{first}]"));
            r.error(
                &format!("apps[{i}]"),
                format!("id {:?} is already used by {first}", app.app.id),
            );
        }
    }
    let keys: Vec<(&Secret, &str)> = apps
        .iter()
        .flat_map(|a| {
            a.app
                .keys
                .iter()
                .zip(a.key_paths.iter().map(String::as_str))
        })
        .collect();
    for (i, (key, path)) in keys.iter().enumerate() {
        if let Some((_, first)) = keys[..i].iter().find(|(k, _)| k == key) {
            ok = false;
            let first = r.errs().name(first);
            r.errs().push(path, format!("duplicate of {first}"));
        }
    }
    if ok {
        Ok(apps.into_iter().map(|a| a.app).collect())
    } else {
        Err(Invalid)
    }
}

/// The default `turn-urls` (see [`crate::derive_turn_urls`]), or an error
/// at `turn-urls` naming the listener that cannot be advertised.
fn derive_turn_urls(r: &mut Reader<'_, '_>, relay: &Relay) -> Result<Vec<String>, Invalid> {
    match crate::derive_turn_urls(&relay.listen, &relay.external_ips) {
        Ok(urls) => Ok(urls),
        Err(DeriveTurnUrlsError::Wildcard { index, listen }) => {
            let family = if listen.addr.is_ipv6() {
                "IPv6"
            } else {
                "IPv4"
            };
            let by = r.errs().name(&format!("relay.listen[{index}]"));
            let external = r.errs().name("relay.external-ip");
            r.error(
                "turn-urls",
                format!(
                    "must be given: {by} ({listen}) binds a wildcard address and {external} \
                     has no {family} address to advertise in its place, so there is no \
                     address to tell clients"
                ),
            );
            Err(Invalid)
        }
    }
}

/// `[store]`.
fn read_store(r: &mut Reader<'_, '_>) -> Result<Store, Invalid> {
    let redis_url = r.parse(
        "redis-url",
        r#"a URL like "redis://127.0.0.1:6379/0""#,
        parse_redis_url,
    );
    r.finish();
    Ok(Store {
        redis_url: redis_url?,
    })
}

impl Default for Signal {
    /// What an absent `[signal]` section (or an absent key) means.
    fn default() -> Self {
        Signal {
            listen: DEFAULT_SIGNAL_LISTEN,
            allowed_origins: AllowedOrigins::PublicUrl,
            auth_timeout: DEFAULT_AUTH_TIMEOUT,
            ping_interval: DEFAULT_PING_INTERVAL,
            idle_timeout: DEFAULT_SIGNAL_IDLE_TIMEOUT,
            max_message: DEFAULT_MAX_MESSAGE as usize,
            message_rate: DEFAULT_MESSAGE_RATE,
            message_burst: DEFAULT_MESSAGE_BURST,
            send_queue: DEFAULT_SEND_QUEUE as usize,
            write_timeout: DEFAULT_WRITE_TIMEOUT,
            resume_window: DEFAULT_RESUME_WINDOW,
            empty_timeout: DEFAULT_EMPTY_TIMEOUT,
            node_timeout: DEFAULT_NODE_TIMEOUT,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            max_unauthenticated_per_ip: DEFAULT_MAX_UNAUTHENTICATED_PER_IP,
        }
    }
}

/// `[signal]`. Every key is read before `idle-timeout` is judged against
/// `ping-interval` (each as configured or its default).
fn read_signal(r: &mut Reader<'_, '_>) -> Result<Signal, Invalid> {
    let d = Signal::default();
    let listen = r.parse("listen", r#"an address like "127.0.0.1:8081""#, |s| {
        parse_socket_addr(s, "127.0.0.1:8081")
    });
    let allowed_origins = match r.list("allowed-origins", |s| {
        if s == "*" {
            Ok(None)
        } else {
            parse_origin(s).map(Some)
        }
    }) {
        Ok(Some(items)) => check_origins(r, items),
        Ok(None) => Ok(AllowedOrigins::PublicUrl),
        Err(Invalid) => Err(Invalid),
    };
    let auth_timeout = r.duration("auth-timeout", MIN_AUTH_TIMEOUT, MAX_AUTH_TIMEOUT);
    let ping_interval = r.duration("ping-interval", MIN_PING_INTERVAL, MAX_PING_INTERVAL);
    let idle_timeout = r.duration(
        "idle-timeout",
        MIN_SIGNAL_IDLE_TIMEOUT,
        MAX_SIGNAL_IDLE_TIMEOUT,
    );
    let max_message = r.integer("max-message", MIN_MAX_MESSAGE, MAX_MAX_MESSAGE);
    let message_rate = r.integer("message-rate", 1, MAX_MESSAGE_RATE);
    let message_burst = r.integer("message-burst", 1, u32::MAX);
    let send_queue = r.integer("send-queue", MIN_SEND_QUEUE, MAX_SEND_QUEUE);
    let write_timeout = r.duration("write-timeout", MIN_WRITE_TIMEOUT, MAX_WRITE_TIMEOUT);
    let resume_window = r.duration("resume-window", Duration::ZERO, MAX_RESUME_WINDOW);
    let empty_timeout = r.duration("empty-timeout", MIN_EMPTY_TIMEOUT, MAX_EMPTY_TIMEOUT);
    let node_timeout = r.duration("node-timeout", MIN_NODE_TIMEOUT, MAX_NODE_TIMEOUT);
    let max_connections = r.integer("max-connections", 1, MAX_MAX_CONNECTIONS);
    let max_unauthenticated_per_ip = r.integer(
        "max-unauthenticated-per-ip",
        1,
        MAX_MAX_UNAUTHENTICATED_PER_IP,
    );

    // A client that pings on time must never be taken for idle: the
    // timeout has to leave room for at least one ping to arrive.
    let idle_timeout = match (ping_interval, idle_timeout) {
        (Ok(ping), Ok(idle)) => {
            let show = |d: Duration, set: bool| {
                let d = humantime::format_duration(d);
                if set {
                    format!("{d}")
                } else {
                    format!("the default {d}")
                }
            };
            let (ping_set, idle_set) = (ping.is_some(), idle.is_some());
            let (ping, idle) = (
                ping.unwrap_or(d.ping_interval),
                idle.unwrap_or(d.idle_timeout),
            );
            if idle > ping {
                Ok(idle)
            } else {
                let by = r.name("ping-interval");
                r.error(
                    "idle-timeout",
                    format!(
                        "must be longer than {by} ({}), got {}: a client that pings on time \
                         would be dropped as idle",
                        show(ping, ping_set),
                        show(idle, idle_set)
                    ),
                );
                Err(Invalid)
            }
        }
        (_, idle) => idle.map(|idle| idle.unwrap_or(d.idle_timeout)),
    };

    r.finish();
    Ok(Signal {
        listen: listen?.unwrap_or(d.listen),
        allowed_origins: allowed_origins?,
        auth_timeout: auth_timeout?.unwrap_or(d.auth_timeout),
        ping_interval: ping_interval?.unwrap_or(d.ping_interval),
        idle_timeout: idle_timeout?,
        max_message: max_message?.map_or(d.max_message, |n| n as usize),
        message_rate: message_rate?.unwrap_or(d.message_rate),
        message_burst: message_burst?.unwrap_or(d.message_burst),
        send_queue: send_queue?.map_or(d.send_queue, |n| n as usize),
        write_timeout: write_timeout?.unwrap_or(d.write_timeout),
        resume_window: resume_window?.unwrap_or(d.resume_window),
        empty_timeout: empty_timeout?.unwrap_or(d.empty_timeout),
        node_timeout: node_timeout?.unwrap_or(d.node_timeout),
        max_connections: max_connections?.unwrap_or(d.max_connections),
        max_unauthenticated_per_ip: max_unauthenticated_per_ip?
            .unwrap_or(d.max_unauthenticated_per_ip),
    })
}

/// `allowed-origins` items as parsed (`None` is `"*"`): an empty list means
/// the public URL's origin, `"*"` must stand alone, and no origin may be
/// listed twice (compared normalized).
fn check_origins(
    r: &mut Reader<'_, '_>,
    items: Vec<Option<String>>,
) -> Result<AllowedOrigins, Invalid> {
    if items.is_empty() {
        return Ok(AllowedOrigins::PublicUrl);
    }
    if items.iter().any(Option::is_none) {
        if items.len() == 1 {
            return Ok(AllowedOrigins::Any);
        }
        for (i, _) in items.iter().enumerate().filter(|(_, o)| o.is_none()) {
            r.error(
                &format!("allowed-origins[{i}]"),
                r#""*" allows any origin, so it must be the only item (or list origins without it)"#,
            );
        }
        return Err(Invalid);
    }
    let origins: Vec<String> = items.into_iter().flatten().collect();
    check_unique(r, "allowed-origins", &origins, |a, b| a == b).map(AllowedOrigins::List)
}

fn read_admin(r: &mut Reader<'_, '_>) -> Result<Admin, Invalid> {
    let listen = r.parse("listen", r#"an address like "127.0.0.1:9641""#, |s| {
        parse_socket_addr(s, "127.0.0.1:9641")
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

fn parse_socket_addr(s: &str, example: &str) -> Result<SocketAddr, String> {
    s.parse::<SocketAddr>()
        .map_err(|_| format!(r#"expected IP:PORT like "{example}", got {s:?}"#))
}

/// Never echoes the secret: error messages end up in logs.
fn parse_secret_of(s: &str, min_bytes: usize) -> Result<Secret, String> {
    if s.len() < min_bytes {
        Err(format!(
            "too short: {} bytes, at least {min_bytes} are required",
            s.len()
        ))
    } else {
        Ok(Secret::new(s.to_string()))
    }
}

/// A kid (`extra` = ".") or an app id (`extra` = ""): 1 to 64 characters of
/// `A-Z a-z 0-9 _ -` and `extra`. Only the offending character is shown,
/// never the value: in `"NAME:SECRET"` a misplaced `:` could put part of
/// the secret here.
fn parse_name(s: &str, extra: &str) -> Result<String, String> {
    let allowed = format!(
        "A-Z a-z 0-9 _ -{}",
        if extra.is_empty() { "" } else { " ." }
    );
    let count = s.chars().count();
    if count == 0 || count > MAX_NAME_CHARS {
        return Err(format!(
            "must be 1 to {MAX_NAME_CHARS} characters of {allowed}, got {count}"
        ));
    }
    let ok = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == '-' || extra.contains(c);
    match s.chars().find(|c| !ok(*c)) {
        Some(c) => Err(format!("must be characters of {allowed} only, found {c:?}")),
        None => Ok(s.to_string()),
    }
}

fn parse_app_name(s: &str) -> Result<String, String> {
    let count = s.chars().count();
    if count == 0 {
        Err("must not be empty".to_string())
    } else if count > MAX_APP_NAME_CHARS {
        Err(format!(
            "is {count} characters; at most {MAX_APP_NAME_CHARS} are allowed"
        ))
    } else if s.chars().any(char::is_control) {
        Err("must not contain control characters".to_string())
    } else {
        Ok(s.to_string())
    }
}

/// `HOST[:PORT]` where HOST is an IPv4 address, a bracketed IPv6 address
/// or a host name. Messages never quote the input (callers decide whether
/// it may be shown: a Redis URL's may hold a password).
fn check_host_port(s: &str) -> Result<(), &'static str> {
    let port = if let Some(rest) = s.strip_prefix('[') {
        let Some((ip, after)) = rest.split_once(']') else {
            return Err("an IPv6 address has no closing ']'");
        };
        if ip.parse::<Ipv6Addr>().is_err() {
            return Err("not an IPv6 address inside [ ]");
        }
        match after {
            "" => None,
            _ => match after.strip_prefix(':') {
                Some(port) => Some(port),
                None => return Err("expected ':PORT' after the IPv6 address"),
            },
        }
    } else {
        if s.matches(':').count() > 1 {
            return Err("an IPv6 address must be in brackets, like [2001:db8::1]");
        }
        let (host, port) = match s.split_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (s, None),
        };
        if host.is_empty() {
            return Err("the host is empty");
        }
        let label_ok = |l: &str| {
            !l.is_empty()
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        };
        // A fully qualified name may end with a dot.
        if !host
            .strip_suffix('.')
            .unwrap_or(host)
            .split('.')
            .all(label_ok)
        {
            return Err("the host is not an IP address or a host name");
        }
        port
    };
    match port {
        None => Ok(()),
        Some(p) => match p.parse::<u16>() {
            Ok(port) if port >= 1 && p.chars().all(|c| c.is_ascii_digit()) => Ok(()),
            _ => Err("the port must be a number from 1 to 65535"),
        },
    }
}

/// An absolute http(s) URL, kept without trailing `/` so paths can be
/// appended with one.
fn parse_public_url(s: &str) -> Result<String, String> {
    let usage = r#"expected an absolute URL like "https://turnpike.example.com""#;
    let Some((scheme, rest)) = s.split_once("://") else {
        return Err(format!("{usage}, got {s:?}"));
    };
    let scheme = scheme.to_ascii_lowercase();
    if scheme != "http" && scheme != "https" {
        return Err(format!("the scheme must be http or https, got {scheme:?}"));
    }
    if s.contains(['?', '#']) {
        return Err(format!(
            "must not have a query or fragment (it is the base of join and signaling URLs), \
             got {s:?}"
        ));
    }
    if s.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(format!(
            "must not contain spaces or control characters, got {s:?}"
        ));
    }
    let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    if authority.contains('@') {
        // Not echoed: the user part may be a password.
        return Err("must not contain a user name or password".to_string());
    }
    check_host_port(authority).map_err(|e| format!("{e}, got {s:?}"))?;
    Ok(format!("{scheme}://{authority}{path}")
        .trim_end_matches('/')
        .to_string())
}

/// A browser origin, `scheme://host[:port]` with scheme http or https and
/// nothing after the host and port, normalized the way browsers send the
/// `Origin` header: lowercase, without the scheme's default port
/// (`HTTPS://App.Example.com:443` is `https://app.example.com`).
pub(crate) fn parse_origin(s: &str) -> Result<String, String> {
    let usage = r#"expected an origin like "https://app.example.com" (scheme://host[:port]), or "*" alone for any origin"#;
    let Some((scheme, rest)) = s.split_once("://") else {
        return Err(format!("{usage}, got {s:?}"));
    };
    let scheme = scheme.to_ascii_lowercase();
    if scheme != "http" && scheme != "https" {
        return Err(format!(
            "the scheme must be http or https (browsers send no other origin a page can \
             open a WebSocket from), got {scheme:?}"
        ));
    }
    if s.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(format!(
            "must not contain spaces or control characters, got {s:?}"
        ));
    }
    if rest.contains('@') {
        // Not echoed: the user part may be a password.
        return Err("must not contain a user name or password".to_string());
    }
    if let Some(end) = rest.find(['/', '?', '#']) {
        return Err(format!(
            "an origin has no path, query or fragment, not even a trailing \"/\" (browsers \
             send scheme://host[:port] only): write \"{scheme}://{}\", got {s:?}",
            &rest[..end]
        ));
    }
    if rest.contains('*') {
        return Err(format!(
            r#"wildcards are not supported: list each origin, or write "*" alone to allow any origin, got {s:?}"#
        ));
    }
    check_host_port(rest).map_err(|e| format!("{e}, got {s:?}"))?;
    let authority = rest.to_ascii_lowercase();
    // The last ':' starts the port unless it is inside an IPv6 address's
    // brackets; check_host_port has checked the port.
    let (host, port) = match authority.rfind(':') {
        Some(i) if !authority[i..].contains(']') => (&authority[..i], authority[i + 1..].parse()),
        _ => (authority.as_str(), Ok(0u16)),
    };
    let default_port = if scheme == "https" { 443 } else { 80 };
    match port {
        Ok(port) if port != 0 && port != default_port => Ok(format!("{scheme}://{host}:{port}")),
        _ => Ok(format!("{scheme}://{host}")),
    }
}

/// The origin of an http(s) URL such as `control.public-url`, normalized
/// like [`parse_origin`]; `None` if it has none.
pub(crate) fn origin_of_url(url: &str) -> Option<String> {
    let (scheme, rest) = url.split_once("://")?;
    let authority = &rest[..rest.find(['/', '?', '#']).unwrap_or(rest.len())];
    parse_origin(&format!("{scheme}://{authority}")).ok()
}

/// A STUN or TURN URL (RFC 7064, RFC 7065):
/// `stun:HOST[:PORT]`, `turn:HOST[:PORT][?transport=udp|tcp]`, `turns:…`.
/// Kept as written: it is handed to clients as is.
fn parse_turn_url(s: &str) -> Result<String, String> {
    let usage = r#"expected "stun:HOST[:PORT]", "turn:HOST[:PORT][?transport=udp|tcp]" or "turns:HOST[:PORT][?transport=udp|tcp]" (IPv6 in brackets)"#;
    let Some((scheme, rest)) = s.split_once(':') else {
        return Err(format!("{usage}, got {s:?}"));
    };
    let scheme = scheme.to_ascii_lowercase();
    if !matches!(scheme.as_str(), "stun" | "turn" | "turns") {
        return Err(format!("unknown scheme {scheme:?}: {usage}, got {s:?}"));
    }
    if rest.starts_with("//") {
        return Err(format!(
            r#"no "//" after the scheme: write "{scheme}:HOST:PORT", got {s:?}"#
        ));
    }
    let (host_port, query) = match rest.split_once('?') {
        Some((host_port, query)) => (host_port, Some(query)),
        None => (rest, None),
    };
    match query {
        None => {}
        Some(_) if scheme == "stun" => {
            return Err(format!("a stun: URL takes no ?transport, got {s:?}"));
        }
        Some(q)
            if q.eq_ignore_ascii_case("transport=udp")
                || q.eq_ignore_ascii_case("transport=tcp") => {}
        Some(_) => {
            return Err(format!(
                "the only query allowed is ?transport=udp or ?transport=tcp, got {s:?}"
            ));
        }
    }
    if host_port.contains(['@', '/']) {
        return Err(format!("{usage}, got {s:?}"));
    }
    check_host_port(host_port).map_err(|e| format!("{e}, got {s:?}"))?;
    Ok(s.to_string())
}

/// `redis://[[USER]:PASSWORD@]HOST[:PORT][/DB][?…]` or `rediss://…`.
/// Never echoes the URL, which may carry a password.
fn parse_redis_url(s: &str) -> Result<RedisUrl, String> {
    let usage = r#"expected "redis://[[USER]:PASSWORD@]HOST[:PORT][/DB]" or "rediss://…" (TLS)"#;
    let Some((scheme, rest)) = s.split_once("://") else {
        return Err(usage.to_string());
    };
    if !scheme.eq_ignore_ascii_case("redis") && !scheme.eq_ignore_ascii_case("rediss") {
        let plain = scheme
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "+.-".contains(c));
        return Err(if plain {
            format!("unknown scheme {scheme:?}: {usage}")
        } else {
            format!("unknown scheme: {usage}")
        });
    }
    if s.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err("must not contain spaces or control characters".to_string());
    }
    let (authority, tail) = rest.split_at(rest.find(['/', '?', '#']).unwrap_or(rest.len()));
    if tail.contains('@') {
        // A raw '/', '?' or '#' in a password ends the host part early,
        // which would leave the password where it is not redacted.
        return Err(
            "a '@' after the host: percent-encode '/', '?', '#' and '@' in a password".to_string(),
        );
    }
    let (user, host_port) = match authority.rsplit_once('@') {
        Some((user, host_port)) => (Some(user), host_port),
        None => (None, authority),
    };
    check_host_port(host_port).map_err(|e| format!("{e}: {usage}"))?;
    let path = &tail[..tail.find(['?', '#']).unwrap_or(tail.len())];
    let db = path.strip_prefix('/').unwrap_or(path);
    if !db.is_empty() && (db.parse::<u32>().is_err() || !db.chars().all(|c| c.is_ascii_digit())) {
        return Err(format!(
            "the database after the host must be a number, like /0: {usage}"
        ));
    }
    // The password goes; with no ':' the whole user part may be one.
    let user = match user {
        None => String::new(),
        Some(user) => match user.split_once(':') {
            Some((name, _)) => format!("{name}:***@"),
            None => "***@".to_string(),
        },
    };
    Ok(RedisUrl {
        url: s.to_string(),
        redacted: format!("{scheme}://{user}{host_port}{tail}"),
    })
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

fn parse_secret(s: &str) -> Result<Secret, String> {
    parse_secret_of(s, MIN_SECRET_BYTES)
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
