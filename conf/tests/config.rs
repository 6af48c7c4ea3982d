#![allow(clippy::unwrap_used)]

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use conf::{
    load, parse, parse_with_source, Config, ConfigError, Errors, Listen, PortRange, RelayIps,
    Secret, Source, Tls, Transport, ValueKind, EXAMPLE, SCHEMA,
};

/// The smallest valid file; tests append keys to its `[relay]` table.
const MINIMAL: &str = r#"
[relay]
realm = "example.com"
listen = ["udp://192.0.2.10:3478"]
secrets = ["0123456789abcdef"]
"#;

fn with_relay(extra: &str) -> String {
    format!("{MINIMAL}{extra}\n")
}

fn env(vars: &[(&str, &str)]) -> Vec<(String, String)> {
    vars.iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn ok(text: &str) -> Config {
    match parse(text, &[]) {
        Ok(c) => c,
        Err(e) => panic!("expected a valid config, got:\n{e}"),
    }
}

fn errs(text: &str, vars: &[(&str, &str)]) -> Errors {
    match parse(text, &env(vars)) {
        Ok(c) => panic!("expected errors, got {c:?}"),
        Err(e) => e,
    }
}

/// The single error of a config that must have exactly one.
fn one_err(text: &str, vars: &[(&str, &str)]) -> ConfigError {
    let e = errs(text, vars);
    assert_eq!(e.0.len(), 1, "expected one error, got:\n{e}");
    e.0[0].clone()
}

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn net(s: &str) -> ipnet::IpNet {
    s.parse().unwrap()
}

fn v4(s: &str) -> Ipv4Addr {
    s.parse().unwrap()
}

fn v6(s: &str) -> Ipv6Addr {
    s.parse().unwrap()
}

fn ips(v4: Option<&str>, v6: Option<&str>) -> RelayIps {
    RelayIps {
        v4: v4.map(|s| s.parse().unwrap()),
        v6: v6.map(|s| s.parse().unwrap()),
    }
}

/// MINIMAL with another `listen` list (give the TOML array).
fn with_listen(list: &str) -> String {
    MINIMAL.replace("[\"udp://192.0.2.10:3478\"]", list)
}

/// A scratch directory, removed on drop; unique per test.
struct Scratch(PathBuf);

impl Scratch {
    fn new(test: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("conf-test-{}-{test}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Scratch(dir)
    }

    /// Writes `name` in the directory and returns its path as a string.
    fn file(&self, name: &str, contents: &str) -> String {
        let path = self.0.join(name);
        std::fs::write(&path, contents).unwrap();
        path.to_str().unwrap().to_string()
    }

    fn path(&self, name: &str) -> String {
        self.0.join(name).to_str().unwrap().to_string()
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A `[relay.tls]` table with these two paths (TOML basic strings).
fn tls_table(cert: &str, key: &str) -> String {
    format!("[relay.tls]\ncert-file = {cert:?}\nkey-file = {key:?}\n")
}

// ---------------------------------------------------------------- embedded

#[test]
fn embedded_default_loads_with_one_generated_secret() {
    let c = load(None, &[]).unwrap();
    assert!(c.is_embedded());
    assert_eq!(c.source, Source::Embedded);
    assert_eq!(c.relay.realm, "turnpike.local");
    assert_eq!(
        c.relay.listen,
        vec![
            Listen {
                transport: Transport::Udp,
                addr: addr("127.0.0.1:3478")
            },
            Listen {
                transport: Transport::Tcp,
                addr: addr("127.0.0.1:3478")
            }
        ]
    );
    assert_eq!(c.relay.relay_ips, ips(Some("127.0.0.1"), None));
    assert!(c.relay.external_ips.is_empty());
    // No TLS by default: there is no certificate for a local test.
    assert_eq!(c.relay.tls, None);
    assert_eq!(
        c.relay.relay_ports,
        PortRange {
            start: 49152,
            end: 65535
        }
    );
    assert_eq!(
        c.relay.allow_peers,
        vec![net("127.0.0.0/8"), net("::1/128")]
    );
    assert!(c.relay.deny_peers.is_empty());
    assert_eq!(c.admin.listen, addr("127.0.0.1:9641"));
    assert_eq!(c.log.level, "info");
    assert_eq!(c.relay.secrets.len(), 1);
    assert_eq!(c.relay.secrets[0].expose().len(), 43);
    assert!(c.generated.relay_secret);

    // A fresh secret each time.
    let again = load(None, &[]).unwrap();
    assert_ne!(again.relay.secrets[0], c.relay.secrets[0]);
}

#[test]
fn embedded_default_takes_secrets_from_env_instead_of_generating() {
    let vars = env(&[("TURNPIKE_RELAY_SECRETS", "0123456789abcdef-one")]);
    let c = load(None, &vars).unwrap();
    assert_eq!(
        c.relay.secrets,
        vec![Secret::new("0123456789abcdef-one".into())]
    );
    assert!(!c.generated.relay_secret);
}

#[test]
fn embedded_default_still_rejects_bad_env() {
    let e = load(None, &env(&[("TURNPIKE_RELAY_THREADS", "0")])).unwrap_err();
    assert_eq!(e.paths(), vec!["env TURNPIKE_RELAY_THREADS"]);
}

// ------------------------------------------------------- collected errors

#[test]
fn every_bad_key_is_reported_at_once() {
    let text = r#"
[relay]
realm = "example.com"
realmm = "typo.example.com"
listen = ["udp://192.0.2.10:3478"]
secrets = ["0123456789abcdef"]
user-quota = "sixteen"
max-lifetime = "5m"

[admin]
listen = "not an address"

[metrics]
enabled = true
"#;
    let e = errs(text, &[]);
    let mut paths = e.paths();
    paths.sort_unstable();
    assert_eq!(
        paths,
        vec![
            "admin.listen",
            "metrics",
            "relay.max-lifetime",
            "relay.realmm",
            "relay.user-quota",
        ],
        "{e}"
    );
    assert_eq!(e.at("relay.realmm").unwrap().message, "unknown key");
    assert_eq!(e.at("metrics").unwrap().message, "unknown key");
    assert_eq!(
        e.at("relay.user-quota").unwrap().message,
        "expected an integer, got a string"
    );
    assert_eq!(
        e.at("relay.max-lifetime").unwrap().message,
        r#"must be at least 10m, got "5m""#
    );
    // Display: one "PATH: MESSAGE" line per error.
    let shown = e.to_string();
    assert_eq!(shown.lines().count(), 5);
    assert!(shown.contains("relay.realmm: unknown key\n"), "{shown}");
}

#[test]
fn wrong_types_name_what_was_found() {
    let cases = [
        (
            "realm = 5",
            "relay.realm",
            "expected a string, got an integer",
        ),
        (
            "listen = \"udp://192.0.2.10:3478\"",
            "relay.listen",
            "expected an array of strings, got a string",
        ),
        (
            "max-permissions = 1.5",
            "relay.max-permissions",
            "expected an integer, got a float",
        ),
        (
            "threads = true",
            "relay.threads",
            "expected an integer, got a boolean",
        ),
        (
            "grace-period = 30",
            "relay.grace-period",
            r#"expected a duration like "30s", got an integer"#,
        ),
        (
            "deny-peers = [1]",
            "relay.deny-peers[0]",
            "expected a string, got an integer",
        ),
        (
            "relay-ip = 5",
            "relay.relay-ip",
            "expected an IP address or an array of them, got an integer",
        ),
        (
            "external-ip = [\"203.0.113.7\", true]",
            "relay.external-ip[1]",
            "expected a string, got a boolean",
        ),
        (
            "max-frame = \"64k\"",
            "relay.max-frame",
            "expected an integer, got a string",
        ),
        (
            "idle-timeout = 300",
            "relay.idle-timeout",
            r#"expected a duration like "30s", got an integer"#,
        ),
        (
            "tls = \"/etc/cert.pem\"",
            "relay.tls",
            "expected a table, got a string",
        ),
    ];
    for (line, path, message) in cases {
        // Later duplicates of MINIMAL's keys would be TOML errors: use a table that lacks them.
        let text = MINIMAL.replace(
            &format!("{} =", line.split(' ').next().unwrap()),
            "replaced =",
        );
        let text = format!("{text}{line}\n");
        let e = errs(&text, &[]);
        let found = e
            .at(path)
            .unwrap_or_else(|| panic!("no error at {path}:\n{e}"));
        assert_eq!(found.message, message, "{line}");
    }
}

#[test]
fn unknown_and_malformed_sections() {
    let e = errs(&format!("{MINIMAL}[relays]\nrealm = \"x\"\n"), &[]);
    assert_eq!(e.paths(), vec!["relays"]);

    let e = errs("log = \"debug\"\n[relay]\nrealm = \"x\"\nlisten = [\"udp://192.0.2.1:1\"]\nsecrets = [\"0123456789abcdef\"]\n", &[]);
    assert_eq!(e.paths(), vec!["log"]);
    assert_eq!(e.0[0].message, "expected a table, got a string");

    let e = errs(
        &format!("{MINIMAL}[log]\nlevel = \"info\"\nformat = \"json\"\n"),
        &[],
    );
    assert_eq!(e.paths(), vec!["log.format"]);
}

#[test]
fn a_syntax_error_has_line_and_column() {
    let e = one_err("[relay]\nrealm = \"example.com\"\nlisten = [\n", &[]);
    assert!(e.path.starts_with("<string>:"), "{e}");
    assert!(e.message.starts_with("invalid TOML: "), "{e}");

    let e = one_err("[relay]\nrealm = example.com\n", &[]);
    assert_eq!(e.path, "<string>:2:9");
    assert!(!e.message.contains('\n'), "{e}");
}

#[test]
fn a_syntax_error_does_not_hide_unknown_env_vars() {
    let e = errs("[relay", &[("TURNPIKE_RELAY_REALMM", "x")]);
    assert_eq!(e.0.len(), 2, "{e}");
    assert_eq!(e.0[1].path, "env TURNPIKE_RELAY_REALMM");
}

#[test]
fn duplicate_toml_keys_are_a_syntax_error() {
    let e = one_err(&with_relay("realm = \"again.example.com\""), &[]);
    assert!(e.path.starts_with("<string>:"), "{e}");
}

// --------------------------------------------------------------- defaults

#[test]
fn a_minimal_file_gets_the_documented_defaults() {
    let c = ok(MINIMAL);
    let r = &c.relay;
    assert!(!c.is_embedded());
    assert_eq!(c.source, Source::File(PathBuf::from("<string>")));
    assert_eq!(r.relay_ips, ips(Some("192.0.2.10"), None));
    assert_eq!(r.external_ips, RelayIps::default());
    assert_eq!(
        r.relay_ports,
        PortRange {
            start: 49152,
            end: 65535
        }
    );
    assert!(r.allow_peers.is_empty());
    assert!(r.deny_peers.is_empty());
    assert_eq!(r.user_quota, Some(16));
    assert_eq!(r.total_quota, None);
    assert_eq!(r.max_permissions, 64);
    assert_eq!(r.challenge_rate, 500);
    assert_eq!(r.max_lifetime, Duration::from_secs(3600));
    assert_eq!(r.nonce_lifetime, Duration::from_secs(600));
    assert_eq!(r.threads, None);
    assert_eq!(r.grace_period, Duration::from_secs(30));
    assert_eq!(r.max_connections_per_ip, 64);
    assert_eq!(r.handshake_timeout, Duration::from_secs(10));
    assert_eq!(r.idle_timeout, Duration::from_secs(300));
    assert_eq!(r.max_frame, 65552);
    assert_eq!(r.max_frame, 20 + 65532);
    assert!(r.max_frame >= 4 + 65535);
    assert_eq!(r.stream_queue, 256);
    assert_eq!(r.write_timeout, Duration::from_secs(10));
    assert_eq!(r.tls, None);
    assert_eq!(c.admin.listen, addr("127.0.0.1:9641"));
    assert_eq!(c.log.level, "info");
    // No [control]: a relay-only deployment. No [store]: in memory.
    assert!(c.control.is_none());
    assert_eq!(c.store.redis_url, None);
    assert_eq!(c.generated, conf::Generated::default());
}

#[test]
fn an_empty_file_lists_every_required_key() {
    let e = errs("", &[]);
    assert_eq!(
        e.paths(),
        vec!["relay.realm", "relay.listen", "relay.secrets"],
        "{e}"
    );
}

// -------------------------------------------------------------- durations

#[test]
fn durations_are_written_with_units() {
    let c = ok(&with_relay(
        "grace-period = \"30s\"\nnonce-lifetime = \"10m\"\nmax-lifetime = \"1h\"",
    ));
    assert_eq!(c.relay.grace_period, Duration::from_secs(30));
    assert_eq!(c.relay.nonce_lifetime, Duration::from_secs(600));
    assert_eq!(c.relay.max_lifetime, Duration::from_secs(3600));

    let c = ok(&with_relay(
        "max-lifetime = \"1h 30m\"\ngrace-period = \"0s\"",
    ));
    assert_eq!(c.relay.max_lifetime, Duration::from_secs(5400));
    assert_eq!(c.relay.grace_period, Duration::ZERO);
}

#[test]
fn bad_durations_are_reported_at_their_path() {
    let e = one_err(&with_relay("grace-period = \"ten\""), &[]);
    assert_eq!(e.path, "relay.grace-period");
    assert!(
        e.message
            .starts_with(r#"expected a duration like "30s", "10m" or "1h", got "ten""#),
        "{e}"
    );

    let cases = [
        (
            "max-lifetime = \"25h\"",
            "relay.max-lifetime",
            "must be at most 1day",
        ),
        (
            "nonce-lifetime = \"10s\"",
            "relay.nonce-lifetime",
            "must be at least 30s",
        ),
        (
            "nonce-lifetime = \"2h\"",
            "relay.nonce-lifetime",
            "must be at most 1h",
        ),
        (
            "grace-period = \"61m\"",
            "relay.grace-period",
            "must be at most 1h",
        ),
    ];
    for (line, path, start) in cases {
        let e = one_err(&with_relay(line), &[]);
        assert_eq!(e.path, path);
        assert!(e.message.starts_with(start), "{line}: {e}");
    }
}

// ------------------------------------------------------------- port range

#[test]
fn relay_ports_parse() {
    let c = ok(&with_relay("relay-ports = \"50000-50009\""));
    let p = c.relay.relay_ports;
    assert_eq!(
        p,
        PortRange {
            start: 50000,
            end: 50009
        }
    );
    assert_eq!(p.len(), 10);
    assert!(p.contains(50000) && p.contains(50009));
    assert!(!p.contains(49999) && !p.contains(50010));
    assert_eq!(p.to_string(), "50000-50009");

    let one = ok(&with_relay("relay-ports = \"3479-3479\""))
        .relay
        .relay_ports;
    assert_eq!(one.len(), 1);
    let all = ok(&with_relay("relay-ports = \"1-65535\""))
        .relay
        .relay_ports;
    assert_eq!(all.len(), 65535);
}

#[test]
fn relay_ports_reject_bad_ranges() {
    let cases = [
        ("\"0-10\"", "port 0 is out of range 1-65535"),
        ("\"100-50\"", "low port 100 is greater than high port 50"),
        (
            "\"abc\"",
            r#"expected "LOW-HIGH" like "49152-65535", got "abc""#,
        ),
        ("\"a-b\"", r#"expected a port number, got "a""#),
        ("\"1-70000\"", "port 70000 is out of range 1-65535"),
        (
            "70000",
            r#"expected a port range like "49152-65535", got an integer"#,
        ),
    ];
    for (value, message) in cases {
        let e = one_err(&with_relay(&format!("relay-ports = {value}")), &[]);
        assert_eq!(e.path, "relay.relay-ports");
        assert_eq!(e.message, message, "{value}");
    }
}

// ---------------------------------------------------------------- numbers

#[test]
fn integer_limits() {
    let cases = [
        (
            "user-quota = 0",
            "relay.user-quota",
            "must be at least 1, got 0",
        ),
        (
            "user-quota = 4294967296",
            "relay.user-quota",
            "must be at most 4294967295, got 4294967296",
        ),
        (
            "total-quota = -1",
            "relay.total-quota",
            "must be at least 1, got -1",
        ),
        (
            "max-permissions = 0",
            "relay.max-permissions",
            "must be at least 1, got 0",
        ),
        (
            "max-permissions = 1025",
            "relay.max-permissions",
            "must be at most 1024, got 1025",
        ),
        (
            "challenge-rate = 9",
            "relay.challenge-rate",
            "must be at least 10, got 9",
        ),
        (
            "challenge-rate = 1000001",
            "relay.challenge-rate",
            "must be at most 1000000, got 1000001",
        ),
        ("threads = 0", "relay.threads", "must be at least 1, got 0"),
        (
            "threads = 1025",
            "relay.threads",
            "must be at most 1024, got 1025",
        ),
    ];
    for (line, path, message) in cases {
        let e = one_err(&with_relay(line), &[]);
        assert_eq!(
            (e.path.as_str(), e.message.as_str()),
            (path, message),
            "{line}"
        );
    }
    let c = ok(&with_relay(
        "user-quota = 1000000\ntotal-quota = 1\nthreads = 1024\nmax-permissions = 1\nchallenge-rate = 1000000",
    ));
    assert_eq!(c.relay.challenge_rate, 1_000_000);
    assert_eq!(c.relay.user_quota, Some(1_000_000));
    assert_eq!(c.relay.total_quota, Some(1));
    assert_eq!(c.relay.threads.map(|n| n.get()), Some(1024));
    assert_eq!(c.relay.max_permissions, 1);
}

// ------------------------------------------------------------------ realm

#[test]
fn realm_rules() {
    let e = one_err(
        "[relay]\nlisten = [\"udp://192.0.2.10:3478\"]\nsecrets = [\"0123456789abcdef\"]\n",
        &[],
    );
    assert_eq!(e.path, "relay.realm");
    assert!(e.message.starts_with("required"), "{e}");

    let with_realm = |realm: &str| MINIMAL.replace("\"example.com\"", realm);
    assert_eq!(
        one_err(&with_realm("\"\""), &[]).message,
        "must not be empty"
    );
    assert_eq!(
        one_err(&with_realm("\"a\\tb\""), &[]).message,
        "must not contain control characters"
    );
    let long = format!("\"{}\"", "r".repeat(764));
    assert!(one_err(&with_realm(&long), &[])
        .message
        .starts_with("is 764 bytes"));
    let max = "r".repeat(763);
    assert_eq!(ok(&with_realm(&format!("\"{max}\""))).relay.realm, max);
}

// ---------------------------------------------------------------- secrets

#[test]
fn a_file_needs_at_least_one_secret() {
    let no_secrets = MINIMAL.replace("secrets = [\"0123456789abcdef\"]", "");
    let e = one_err(&no_secrets, &[]);
    assert_eq!(
        (e.path.as_str(), e.message.as_str()),
        ("relay.secrets", "at least one secret is required")
    );

    let empty = MINIMAL.replace("[\"0123456789abcdef\"]", "[]");
    let e = one_err(&empty, &[]);
    assert_eq!(
        (e.path.as_str(), e.message.as_str()),
        ("relay.secrets", "at least one secret is required")
    );

    // Same rule for a real file loaded from disk, and for the embedded
    // source only when told so.
    assert!(parse_with_source(&no_secrets, &[], Source::Embedded).is_ok());
}

#[test]
fn short_secrets_are_rejected_without_echoing_them() {
    let text = MINIMAL.replace(
        "[\"0123456789abcdef\"]",
        "[\"0123456789abcdef\", \"hunter2-secret\"]",
    );
    let e = one_err(&text, &[]);
    assert_eq!(e.path, "relay.secrets[1]");
    assert_eq!(e.message, "too short: 14 bytes, at least 16 are required");
    assert!(!e.to_string().contains("hunter2"));
}

#[test]
fn duplicate_secrets_are_rejected() {
    let text = MINIMAL.replace(
        "[\"0123456789abcdef\"]",
        "[\"0123456789abcdef\", \"another-long-secret\", \"0123456789abcdef\"]",
    );
    let e = one_err(&text, &[]);
    assert_eq!(e.path, "relay.secrets[2]");
    assert_eq!(e.message, "duplicate of relay.secrets[0]");
}

#[test]
fn secrets_keep_their_order_first_signs() {
    let text = MINIMAL.replace(
        "[\"0123456789abcdef\"]",
        "[\"new-secret-0000000002\", \"old-secret-0000000001\"]",
    );
    let s = ok(&text).relay.secrets;
    assert_eq!(s[0].expose(), "new-secret-0000000002");
    assert_eq!(s[1].expose(), "old-secret-0000000001");
}

#[test]
fn secret_debug_and_display_are_redacted() {
    let s = Secret::new("super-secret-value-1234".into());
    assert_eq!(format!("{s:?}"), "Secret(<redacted>)");
    assert_eq!(s.to_string(), "Secret(<redacted>)");
    assert_eq!(s.expose(), "super-secret-value-1234");
    let c = ok(&MINIMAL.replace("0123456789abcdef", "super-secret-value-1234"));
    let dump = format!("{c:?} {:#?}", c.relay);
    assert!(!dump.contains("super-secret"), "{dump}");
}

#[test]
fn generated_secrets_are_long_url_safe_and_distinct() {
    let a = Secret::generate();
    let b = Secret::generate();
    assert_ne!(a, b);
    assert_eq!(a.expose().len(), 43);
    assert!(a
        .expose()
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_'));
}

// ------------------------------------------------------ listen / relay-ip

#[test]
fn wildcard_listen_needs_relay_ip() {
    for wildcard in ["udp://0.0.0.0:3478", "udp://[::]:3478"] {
        let text = MINIMAL.replace("udp://192.0.2.10:3478", wildcard);
        let e = one_err(&text, &[]);
        assert_eq!(e.path, "relay.relay-ip");
        assert_eq!(
            e.message,
            "required when relay.listen binds a wildcard address"
        );

        let c = ok(&with_relay_text(&text, "relay-ip = \"192.0.2.10\""));
        assert_eq!(c.relay.relay_ips, ips(Some("192.0.2.10"), None));
        assert_eq!(c.relay.relay_ips.primary(), ip("192.0.2.10"));
    }
    // A wildcard as relay-ip is no better.
    let e = one_err(&with_relay("relay-ip = \"0.0.0.0\""), &[]);
    assert_eq!(e.path, "relay.relay-ip");
    assert!(e.message.starts_with("must be a specific address"), "{e}");
}

fn with_relay_text(text: &str, extra: &str) -> String {
    format!("{text}{extra}\n")
}

#[test]
fn relay_ip_defaults_to_the_specific_listen_addresses() {
    // Wildcards do not count; the specific IPv6 address is the only one.
    let c = ok(&with_listen(
        "[\"udp://[2001:db8::5]:3478\", \"udp://0.0.0.0:3479\"]",
    ));
    assert_eq!(c.relay.relay_ips, ips(None, Some("2001:db8::5")));
    assert_eq!(c.relay.relay_ips.primary(), ip("2001:db8::5"));
    assert_eq!(c.relay.listen.len(), 2);
    assert_eq!(c.relay.listen[1].addr, addr("0.0.0.0:3479"));
    assert_eq!(c.relay.listen[0].to_string(), "udp://[2001:db8::5]:3478");

    // The first of each family, from any transport; a wildcard first is skipped.
    let c = ok(&with_listen(
        r#"["udp://0.0.0.0:3478", "tcp://[2001:db8::5]:3478", "udp://192.0.2.20:3478", "udp://192.0.2.21:3478", "udp://[2001:db8::6]:3478"]"#,
    ));
    assert_eq!(
        c.relay.relay_ips,
        ips(Some("192.0.2.20"), Some("2001:db8::5"))
    );
    assert_eq!(c.relay.relay_ips.primary(), ip("192.0.2.20"));

    // Only wildcards, on every transport: relay-ip is required.
    let e = one_err(
        &with_listen(r#"["udp://0.0.0.0:3478", "tcp://[::]:3478"]"#),
        &[],
    );
    assert_eq!(e.path, "relay.relay-ip");
    assert_eq!(
        e.message,
        "required when relay.listen binds a wildcard address"
    );
}

#[test]
fn listen_takes_udp_tcp_and_tls() {
    let dir = Scratch::new("listen-transports");
    let tls = tls_table(&dir.file("cert.pem", "cert"), &dir.file("key.pem", "key"));
    let text = format!(
        "{}{tls}",
        with_listen(
            r#"["udp://192.0.2.10:3478", "TCP://192.0.2.10:3478", "tls://[2001:db8::5]:5349"]"#
        )
    );
    let c = ok(&text);
    assert_eq!(
        c.relay.listen,
        vec![
            Listen {
                transport: Transport::Udp,
                addr: addr("192.0.2.10:3478")
            },
            Listen {
                transport: Transport::Tcp,
                addr: addr("192.0.2.10:3478")
            },
            Listen {
                transport: Transport::Tls,
                addr: addr("[2001:db8::5]:5349")
            },
        ]
    );
    assert_eq!(c.relay.listen[1].to_string(), "tcp://192.0.2.10:3478");
    assert_eq!(c.relay.listen[2].to_string(), "tls://[2001:db8::5]:5349");
    assert_eq!(Transport::Udp.to_string(), "udp");
    assert_eq!(Transport::Tcp.to_string(), "tcp");
    assert_eq!(Transport::Tls.to_string(), "tls");
    assert!(!Transport::Udp.is_stream());
    assert!(Transport::Tcp.is_stream() && Transport::Tls.is_stream());
}

#[test]
fn bad_listen_addresses() {
    let usage = r#"expected "udp://IP:PORT", "tcp://IP:PORT" or "tls://IP:PORT""#;
    let cases = [
        ("dtls://0.0.0.0:5349", "unknown transport \"dtls\""),
        ("0.0.0.0:3478", usage),
        ("udp://example.com:3478", usage),
        ("tcp://192.0.2.1", usage),
        ("tls://192.0.2.1:99999", usage),
        ("sctp://192.0.2.1:3478", "unknown transport \"sctp\""),
        ("garbage", usage),
    ];
    for (value, start) in cases {
        let e = one_err(&MINIMAL.replace("udp://192.0.2.10:3478", value), &[]);
        assert_eq!(e.path, "relay.listen[0]", "{value}");
        assert!(e.message.starts_with(start), "{value}: {e}");
    }
    let e = one_err(&MINIMAL.replace("[\"udp://192.0.2.10:3478\"]", "[]"), &[]);
    assert_eq!(e.path, "relay.listen");
    assert!(
        e.message
            .starts_with("at least one listen address is required"),
        "{e}"
    );
}

#[test]
fn duplicate_listen_addresses_are_rejected() {
    let text = MINIMAL.replace(
        "[\"udp://192.0.2.10:3478\"]",
        "[\"udp://192.0.2.10:3478\", \"udp://192.0.2.10:3478\"]",
    );
    let e = one_err(&text, &[]);
    assert_eq!(
        (e.path.as_str(), e.message.as_str()),
        ("relay.listen[1]", "duplicate of relay.listen[0]")
    );
}

#[test]
fn every_bad_list_item_is_reported() {
    let text = MINIMAL.replace(
        "[\"udp://192.0.2.10:3478\"]",
        "[\"dtls://192.0.2.10:3478\", \"udp://192.0.2.10:3478\", \"nope\"]",
    );
    let e = errs(&text, &[]);
    assert_eq!(e.paths(), vec!["relay.listen[0]", "relay.listen[2]"]);
}

#[test]
fn one_address_may_serve_udp_and_a_stream_transport() {
    let c = ok(&with_listen(
        r#"["udp://0.0.0.0:3478", "tcp://0.0.0.0:3478", "udp://[::]:3478", "tcp://[::]:3478"]"#,
    )
    .replace("secrets", "relay-ip = \"192.0.2.10\"\nsecrets"));
    assert_eq!(c.relay.listen.len(), 4);
}

#[test]
fn the_same_transport_and_address_twice_is_a_duplicate() {
    let e = one_err(
        &with_listen(
            r#"["tcp://192.0.2.10:3478", "udp://192.0.2.10:3478", "tcp://192.0.2.10:3478"]"#,
        ),
        &[],
    );
    assert_eq!(
        (e.path.as_str(), e.message.as_str()),
        ("relay.listen[2]", "duplicate of relay.listen[0]")
    );
}

#[test]
fn tcp_and_tls_on_one_address_conflict() {
    let dir = Scratch::new("tcp-tls-conflict");
    let tls = tls_table(&dir.file("cert.pem", "cert"), &dir.file("key.pem", "key"));
    let text = format!(
        "{}{tls}",
        with_listen(
            r#"["tcp://192.0.2.10:3478", "udp://192.0.2.10:3478", "tls://192.0.2.10:3478", "tls://192.0.2.10:5349"]"#
        )
    );
    let e = one_err(&text, &[]);
    assert_eq!(e.path, "relay.listen[2]");
    assert!(
        e.message
            .starts_with("conflicts with relay.listen[0] (tcp://192.0.2.10:3478): one stream listener per address serves both TCP and TLS"),
        "{e}"
    );
    // The other order too, and a tls:// duplicate is still a duplicate.
    let text = format!(
        "{}{tls}",
        with_listen(
            r#"["tls://192.0.2.10:5349", "tcp://192.0.2.10:5349", "tls://192.0.2.10:5349"]"#
        )
    );
    let e = errs(&text, &[]);
    assert_eq!(e.paths(), vec!["relay.listen[1]", "relay.listen[2]"]);
    assert!(
        e.0[0]
            .message
            .starts_with("conflicts with relay.listen[0] (tls://192.0.2.10:5349)"),
        "{e}"
    );
    assert_eq!(e.0[1].message, "duplicate of relay.listen[0]");
}

#[test]
fn a_tls_listener_requires_relay_tls() {
    let text = with_listen(r#"["udp://192.0.2.10:3478", "tls://192.0.2.10:5349"]"#);
    let e = one_err(&text, &[]);
    assert_eq!(e.path, "relay.tls");
    assert!(
        e.message
            .starts_with("required by relay.listen[1] (tls://192.0.2.10:5349)"),
        "{e}"
    );

    // From the environment, the message names the variable.
    let e = one_err(
        MINIMAL,
        &[("TURNPIKE_RELAY_LISTEN", "tls://192.0.2.10:5349")],
    );
    assert_eq!(e.path, "relay.tls");
    assert!(
        e.message
            .starts_with("required by env TURNPIKE_RELAY_LISTEN[0] (tls://192.0.2.10:5349)"),
        "{e}"
    );

    // tcp:// does not insist; with [relay.tls] it would serve TLS too.
    let c = ok(&with_listen(r#"["tcp://192.0.2.10:3478"]"#));
    assert_eq!(c.relay.tls, None);
}

#[test]
fn relay_tls_names_two_readable_files() {
    let dir = Scratch::new("tls-ok");
    let (cert, key) = (
        dir.file("fullchain.pem", "-----BEGIN CERTIFICATE-----"),
        dir.file("privkey.pem", "-----BEGIN PRIVATE KEY-----"),
    );
    let text = format!(
        "{}{}",
        with_listen(r#"["udp://192.0.2.10:3478", "tls://192.0.2.10:5349"]"#),
        tls_table(&cert, &key)
    );
    let c = ok(&text);
    assert_eq!(
        c.relay.tls,
        Some(Tls {
            cert_file: PathBuf::from(&cert),
            key_file: PathBuf::from(&key),
        })
    );
    // [relay.tls] with only tcp:// listeners is fine (they then accept TLS too).
    let c = ok(&format!(
        "{}{}",
        with_listen(r#"["tcp://192.0.2.10:3478"]"#),
        tls_table(&cert, &key)
    ));
    assert!(c.relay.tls.is_some());
}

#[test]
fn relay_tls_files_must_exist_and_errors_name_key_and_path() {
    let dir = Scratch::new("tls-missing");
    let secret_pem = "-----BEGIN PRIVATE KEY----- top secret";
    let key = dir.file("privkey.pem", secret_pem);
    let missing = dir.path("missing.pem");
    let text = format!(
        "{}{}",
        with_listen(r#"["tls://192.0.2.10:5349"]"#),
        tls_table(&missing, &key)
    );
    let e = one_err(&text, &[]);
    assert_eq!(e.path, "relay.tls.cert-file");
    assert!(
        e.message.starts_with(&format!("cannot read {missing:?}: ")),
        "{e}"
    );

    // Both bad: both reported. A directory is not a readable file.
    let text = format!(
        "{}{}",
        with_listen(r#"["tls://192.0.2.10:5349"]"#),
        tls_table(&missing, dir.0.to_str().unwrap())
    );
    let e = errs(&text, &[]);
    assert_eq!(
        e.paths(),
        vec!["relay.tls.cert-file", "relay.tls.key-file"],
        "{e}"
    );
    assert!(e.0[1].message.contains(dir.0.to_str().unwrap()), "{e}");
    assert!(!e.to_string().contains("top secret"));

    let e = one_err(&format!("{MINIMAL}{}", tls_table("", &key)), &[]);
    assert_eq!(
        (e.path.as_str(), e.message.as_str()),
        ("relay.tls.cert-file", "must not be empty")
    );
}

#[test]
fn relay_tls_needs_both_keys_and_no_others() {
    let e = errs(&format!("{MINIMAL}[relay.tls]\n"), &[]);
    assert_eq!(
        e.paths(),
        vec!["relay.tls.cert-file", "relay.tls.key-file"],
        "{e}"
    );
    assert!(e.0[0].message.starts_with("required"), "{e}");

    let dir = Scratch::new("tls-unknown");
    let text = format!(
        "{MINIMAL}{}ca-file = \"/etc/ca.pem\"\n",
        tls_table(&dir.file("c.pem", "c"), &dir.file("k.pem", "k"))
    );
    let e = one_err(&text, &[]);
    assert_eq!(
        (e.path.as_str(), e.message.as_str()),
        ("relay.tls.ca-file", "unknown key")
    );
}

#[test]
fn relay_ip_takes_a_string_or_a_list() {
    let c = ok(&with_relay("relay-ip = \"192.0.2.99\""));
    assert_eq!(c.relay.relay_ips, ips(Some("192.0.2.99"), None));

    // Either order; IPv4 always comes first.
    let c = ok(&with_relay("relay-ip = [\"2001:db8::7\", \"203.0.113.7\"]"));
    let r = c.relay.relay_ips;
    assert_eq!(r.v4, Some(v4("203.0.113.7")));
    assert_eq!(r.v6, Some(v6("2001:db8::7")));
    assert_eq!(
        r.iter().collect::<Vec<_>>(),
        vec![ip("203.0.113.7"), ip("2001:db8::7")]
    );
    assert_eq!(r.primary(), ip("203.0.113.7"));
    assert_eq!(r.get(false), Some(ip("203.0.113.7")));
    assert_eq!(r.get(true), Some(ip("2001:db8::7")));

    // A list of one IPv6 address.
    let c = ok(&with_relay("relay-ip = [\"2001:db8::7\"]"));
    let r = c.relay.relay_ips;
    assert_eq!(r, ips(None, Some("2001:db8::7")));
    assert_eq!(r.primary(), ip("2001:db8::7"));
    assert_eq!(r.get(false), None);
    assert_eq!(r.iter().count(), 1);
}

#[test]
fn relay_ips_helpers_on_an_empty_set() {
    let none = RelayIps::default();
    assert!(none.is_empty());
    assert_eq!(none.iter().count(), 0);
    assert_eq!(none.get(false), None);
    assert_eq!(none.get(true), None);
    assert!(none.primary().is_unspecified());
}

#[test]
fn at_most_one_address_per_family() {
    let e = one_err(
        &with_relay("relay-ip = [\"192.0.2.1\", \"2001:db8::1\", \"192.0.2.2\"]"),
        &[],
    );
    assert_eq!(e.path, "relay.relay-ip[2]");
    assert_eq!(
        e.message,
        "a second IPv4 address (relay.relay-ip[0] is IPv4 too): at most one IPv4 and one IPv6 address"
    );

    let e = errs(
        &with_relay(
            "relay-ip = [\"2001:db8::1\", \"2001:db8::2\"]\nexternal-ip = [\"203.0.113.1\", \"203.0.113.1\"]",
        ),
        &[],
    );
    assert_eq!(
        e.paths(),
        vec!["relay.external-ip[1]", "relay.relay-ip[1]"],
        "{e}"
    );
    assert!(e.0[1].message.starts_with("a second IPv6 address"), "{e}");

    // Wildcards are refused in a list too, and an empty relay-ip list is no
    // relay address at all.
    let e = one_err(&with_relay("relay-ip = [\"192.0.2.1\", \"::\"]"), &[]);
    assert_eq!(e.path, "relay.relay-ip[1]");
    assert!(e.message.starts_with("must be a specific address"), "{e}");
    let e = one_err(&with_relay("relay-ip = []"), &[]);
    assert_eq!(e.path, "relay.relay-ip");
    assert!(
        e.message.starts_with("at least one IP address is required"),
        "{e}"
    );
}

#[test]
fn external_ip_takes_a_string_or_a_list() {
    let c = ok(&with_relay(
        "relay-ip = [\"10.0.0.5\", \"fd00::5\"]\nexternal-ip = [\"2001:db8::9\", \"203.0.113.9\"]",
    ));
    assert_eq!(
        c.relay.external_ips,
        ips(Some("203.0.113.9"), Some("2001:db8::9"))
    );
    assert_eq!(c.relay.relay_ips, ips(Some("10.0.0.5"), Some("fd00::5")));

    // Only one family behind a NAT.
    let c = ok(&with_relay(
        "relay-ip = [\"10.0.0.5\", \"2001:db8::5\"]\nexternal-ip = \"203.0.113.9\"",
    ));
    assert_eq!(c.relay.external_ips.get(false), Some(ip("203.0.113.9")));
    assert_eq!(c.relay.external_ips.get(true), None);

    // An empty list is no NAT.
    let c = ok(&with_relay("external-ip = []"));
    assert!(c.relay.external_ips.is_empty());
}

#[test]
fn external_ip_needs_a_relay_ip_of_its_family() {
    // The relay address defaults to the IPv4 listen address: nothing for an
    // IPv6 external address to stand for.
    let e = one_err(&with_relay("external-ip = \"2001:db8::9\""), &[]);
    assert_eq!(e.path, "relay.external-ip");
    assert!(
        e.message.starts_with(
            "2001:db8::9 is IPv6, but there is no IPv6 relay address for it to stand for"
        ),
        "{e}"
    );

    let e = one_err(
        &with_relay("relay-ip = \"2001:db8::5\"\nexternal-ip = [\"2001:db8::9\", \"203.0.113.9\"]"),
        &[],
    );
    assert_eq!(e.path, "relay.external-ip");
    assert!(e.message.starts_with("203.0.113.9 is IPv4"), "{e}");
    assert!(e.message.contains("relay.relay-ip"), "{e}");
}

#[test]
fn stream_keys_take_values_in_range() {
    let c = ok(&with_relay(
        "max-connections-per-ip = 100000\nhandshake-timeout = \"1s\"\nidle-timeout = \"1h\"\nmax-frame = 548\nstream-queue = 65536\nwrite-timeout = \"1s\"",
    ));
    let r = &c.relay;
    assert_eq!(r.max_connections_per_ip, 100_000);
    assert_eq!(r.handshake_timeout, Duration::from_secs(1));
    assert_eq!(r.idle_timeout, Duration::from_secs(3600));
    assert_eq!(r.max_frame, 548);
    assert_eq!(r.stream_queue, 65536);
    assert_eq!(r.write_timeout, Duration::from_secs(1));

    let c = ok(&with_relay(
        "max-connections-per-ip = 1\nhandshake-timeout = \"5m\"\nidle-timeout = \"5s\"\nmax-frame = 65552\nstream-queue = 1\nwrite-timeout = \"5m\"",
    ));
    let r = &c.relay;
    assert_eq!(r.max_connections_per_ip, 1);
    assert_eq!(r.handshake_timeout, Duration::from_secs(300));
    assert_eq!(r.idle_timeout, Duration::from_secs(5));
    assert_eq!(r.max_frame, 65552);
    assert_eq!(r.stream_queue, 1);
    assert_eq!(r.write_timeout, Duration::from_secs(300));
}

#[test]
fn stream_keys_reject_values_out_of_range() {
    let cases = [
        (
            "max-connections-per-ip = 0",
            "relay.max-connections-per-ip",
            "must be at least 1, got 0",
        ),
        (
            "max-connections-per-ip = 100001",
            "relay.max-connections-per-ip",
            "must be at most 100000, got 100001",
        ),
        (
            "handshake-timeout = \"500ms\"",
            "relay.handshake-timeout",
            "must be at least 1s, got \"500ms\"",
        ),
        (
            "handshake-timeout = \"6m\"",
            "relay.handshake-timeout",
            "must be at most 5m, got \"6m\"",
        ),
        (
            "idle-timeout = \"500ms\"",
            "relay.idle-timeout",
            "must be at least 1s, got \"500ms\"",
        ),
        (
            "idle-timeout = \"2h\"",
            "relay.idle-timeout",
            "must be at most 1h, got \"2h\"",
        ),
        (
            "max-frame = 547",
            "relay.max-frame",
            "must be at least 548, got 547",
        ),
        (
            "max-frame = 65553",
            "relay.max-frame",
            "must be at most 65552, got 65553",
        ),
        (
            "stream-queue = 0",
            "relay.stream-queue",
            "must be at least 1, got 0",
        ),
        (
            "stream-queue = 65537",
            "relay.stream-queue",
            "must be at most 65536, got 65537",
        ),
        (
            "write-timeout = \"500ms\"",
            "relay.write-timeout",
            "must be at least 1s, got \"500ms\"",
        ),
        (
            "write-timeout = \"6m\"",
            "relay.write-timeout",
            "must be at most 5m, got \"6m\"",
        ),
    ];
    for (line, path, message) in cases {
        let e = one_err(&with_relay(line), &[]);
        assert_eq!(
            (e.path.as_str(), e.message.as_str()),
            (path, message),
            "{line}"
        );
    }
}

// ------------------------------------------------------------------- CIDR

#[test]
fn peer_lists_take_networks_and_bare_addresses() {
    let c = ok(&with_relay(
        "allow-peers = [\"10.0.0.0/8\", \"192.0.2.1\", \"::1\", \"10.1.2.3/16\"]\ndeny-peers = [\"2001:db8::/32\"]",
    ));
    assert_eq!(
        c.relay.allow_peers,
        vec![
            net("10.0.0.0/8"),
            net("192.0.2.1/32"),
            net("::1/128"),
            net("10.1.0.0/16")
        ]
    );
    assert_eq!(c.relay.deny_peers, vec![net("2001:db8::/32")]);
}

#[test]
fn peer_lists_reject_bad_networks() {
    let text =
        with_relay("allow-peers = [\"10.0.0.0/33\", \"nonsense\", \"::/129\", \"10.0.0.0/x\"]");
    let e = errs(&text, &[]);
    assert_eq!(
        e.paths(),
        vec![
            "relay.allow-peers[0]",
            "relay.allow-peers[1]",
            "relay.allow-peers[2]",
            "relay.allow-peers[3]"
        ]
    );
    assert_eq!(
        e.0[0].message,
        "prefix length must be 0 to 32 for IPv4, got \"10.0.0.0/33\""
    );
    assert!(e.0[1].message.starts_with("expected a network like"), "{e}");
    assert_eq!(
        e.0[2].message,
        "prefix length must be 0 to 128 for IPv6, got \"::/129\""
    );
}

// ------------------------------------------------------------ admin / log

#[test]
fn admin_and_log_sections() {
    let c = ok(&format!(
        "{MINIMAL}[admin]\nlisten = \"[::1]:9000\"\n[log]\nlevel = \"info,relay_server=debug\"\n"
    ));
    assert_eq!(c.admin.listen, addr("[::1]:9000"));
    assert_eq!(c.log.level, "info,relay_server=debug");

    for bad in ["", "info debug", "debug;rm"] {
        let e = one_err(&format!("{MINIMAL}[log]\nlevel = \"{bad}\"\n"), &[]);
        assert_eq!(e.path, "log.level", "{bad:?}");
    }
    let e = one_err(
        &format!("{MINIMAL}[admin]\nlisten = \"localhost:9641\"\n"),
        &[],
    );
    assert_eq!(e.path, "admin.listen");
    assert_eq!(
        e.message,
        r#"expected IP:PORT like "127.0.0.1:9641", got "localhost:9641""#
    );
}

// -------------------------------------------------------------------- env

#[test]
fn env_overrides_win_over_the_file() {
    let vars = env(&[
        ("TURNPIKE_RELAY_REALM", "env.example.org"),
        ("TURNPIKE_RELAY_USER_QUOTA", "3"),
        (
            "TURNPIKE_RELAY_LISTEN",
            "udp://192.0.2.20:3478, udp://[2001:db8::1]:3478",
        ),
        ("TURNPIKE_RELAY_MAX_LIFETIME", "2h"),
        ("TURNPIKE_RELAY_RELAY_PORTS", "40000-40099"),
        ("TURNPIKE_RELAY_DENY_PEERS", "198.51.100.0/24,"),
        ("TURNPIKE_ADMIN_LISTEN", "127.0.0.1:9999"),
        ("TURNPIKE_LOG_LEVEL", "debug"),
        ("TURNPIKE_CONFIG", "/etc/turnpike.toml"),
        ("HOME", "/root"),
    ]);
    let c = parse(MINIMAL, &vars).unwrap();
    assert_eq!(c.relay.realm, "env.example.org");
    assert_eq!(c.relay.user_quota, Some(3));
    assert_eq!(
        c.relay.listen.iter().map(|l| l.addr).collect::<Vec<_>>(),
        vec![addr("192.0.2.20:3478"), addr("[2001:db8::1]:3478")]
    );
    assert_eq!(
        c.relay.relay_ips,
        ips(Some("192.0.2.20"), Some("2001:db8::1"))
    );
    assert_eq!(c.relay.max_lifetime, Duration::from_secs(7200));
    assert_eq!(
        c.relay.relay_ports,
        PortRange {
            start: 40000,
            end: 40099
        }
    );
    assert_eq!(c.relay.deny_peers, vec![net("198.51.100.0/24")]);
    assert_eq!(c.admin.listen, addr("127.0.0.1:9999"));
    assert_eq!(c.log.level, "debug");
}

#[test]
fn an_empty_env_list_is_an_empty_list() {
    let text = with_relay("allow-peers = [\"10.0.0.0/8\"]");
    let c = parse(&text, &env(&[("TURNPIKE_RELAY_ALLOW_PEERS", "")])).unwrap();
    assert!(c.relay.allow_peers.is_empty());

    let e = one_err(MINIMAL, &[("TURNPIKE_RELAY_SECRETS", "")]);
    assert_eq!(e.path, "env TURNPIKE_RELAY_SECRETS");
    assert_eq!(e.message, "at least one secret is required");
}

#[test]
fn env_can_supply_keys_and_sections_the_file_lacks() {
    let vars = env(&[
        ("TURNPIKE_RELAY_REALM", "example.net"),
        ("TURNPIKE_RELAY_LISTEN", "udp://127.0.0.1:3478"),
        (
            "TURNPIKE_RELAY_SECRETS",
            "first-secret-000001,second-secret-00002",
        ),
    ]);
    let c = parse("", &vars).unwrap();
    assert_eq!(c.relay.realm, "example.net");
    assert_eq!(c.relay.secrets.len(), 2);
    assert_eq!(c.relay.secrets[1].expose(), "second-secret-00002");
}

#[test]
fn unknown_turnpike_vars_are_rejected() {
    let e = errs(
        MINIMAL,
        &[("TURNPIKE_RELAY_REALMM", "x"), ("TURNPIKE_LOG", "debug")],
    );
    assert_eq!(
        e.paths(),
        vec!["env TURNPIKE_RELAY_REALMM", "env TURNPIKE_LOG"]
    );
    assert_eq!(e.0[0].message, "unknown environment variable");
}

#[test]
fn bad_env_values_name_the_variable() {
    let e = one_err(MINIMAL, &[("TURNPIKE_RELAY_USER_QUOTA", "lots")]);
    assert_eq!(e.path, "env TURNPIKE_RELAY_USER_QUOTA");
    assert_eq!(e.message, "expected an integer, got \"lots\"");

    let e = one_err(MINIMAL, &[("TURNPIKE_RELAY_USER_QUOTA", "0")]);
    assert_eq!(
        (e.path.as_str(), e.message.as_str()),
        ("env TURNPIKE_RELAY_USER_QUOTA", "must be at least 1, got 0")
    );

    let e = one_err(MINIMAL, &[("TURNPIKE_RELAY_MAX_LIFETIME", "ten")]);
    assert_eq!(e.path, "env TURNPIKE_RELAY_MAX_LIFETIME");

    let e = one_err(
        MINIMAL,
        &[(
            "TURNPIKE_RELAY_LISTEN",
            "udp://192.0.2.1:1,dtls://192.0.2.1:2",
        )],
    );
    assert_eq!(e.path, "env TURNPIKE_RELAY_LISTEN[1]");
    assert!(e.message.starts_with("unknown transport \"dtls\""), "{e}");

    let e = one_err(MINIMAL, &[("TURNPIKE_RELAY_RELAY_PORTS", "abc")]);
    assert_eq!(e.path, "env TURNPIKE_RELAY_RELAY_PORTS");
}

#[test]
fn env_overrides_the_new_relay_keys() {
    let dir = Scratch::new("env-new-keys");
    let (cert, key) = (dir.file("cert.pem", "c"), dir.file("key.pem", "k"));
    let vars = env(&[
        (
            "TURNPIKE_RELAY_LISTEN",
            "udp://0.0.0.0:3478,tcp://0.0.0.0:3478,tls://[::]:5349",
        ),
        ("TURNPIKE_RELAY_RELAY_IP", "192.0.2.10, 2001:db8::10"),
        ("TURNPIKE_RELAY_EXTERNAL_IP", "203.0.113.10"),
        ("TURNPIKE_RELAY_MAX_CONNECTIONS_PER_IP", "8"),
        ("TURNPIKE_RELAY_HANDSHAKE_TIMEOUT", "3s"),
        ("TURNPIKE_RELAY_IDLE_TIMEOUT", "90s"),
        ("TURNPIKE_RELAY_MAX_FRAME", "1500"),
        ("TURNPIKE_RELAY_STREAM_QUEUE", "32"),
        // No [relay.tls] in the file: the variables create it.
        ("TURNPIKE_RELAY_TLS_CERT_FILE", &cert),
        ("TURNPIKE_RELAY_TLS_KEY_FILE", &key),
    ]);
    let c = parse(MINIMAL, &vars).unwrap();
    let r = &c.relay;
    assert_eq!(r.listen.len(), 3);
    assert_eq!(r.listen[2].transport, Transport::Tls);
    assert_eq!(r.relay_ips, ips(Some("192.0.2.10"), Some("2001:db8::10")));
    assert_eq!(r.external_ips, ips(Some("203.0.113.10"), None));
    assert_eq!(r.max_connections_per_ip, 8);
    assert_eq!(r.handshake_timeout, Duration::from_secs(3));
    assert_eq!(r.idle_timeout, Duration::from_secs(90));
    assert_eq!(r.max_frame, 1500);
    assert_eq!(r.stream_queue, 32);
    assert_eq!(
        r.tls,
        Some(Tls {
            cert_file: PathBuf::from(&cert),
            key_file: PathBuf::from(&key),
        })
    );

    // A variable wins over the file's [relay.tls] key, and one alone leaves
    // the other key to the file.
    let other = dir.file("other.pem", "o");
    let text = format!("{MINIMAL}{}", tls_table(&cert, &key));
    let c = parse(&text, &env(&[("TURNPIKE_RELAY_TLS_CERT_FILE", &other)])).unwrap();
    let tls = c.relay.tls.unwrap();
    assert_eq!(tls.cert_file, PathBuf::from(&other));
    assert_eq!(tls.key_file, PathBuf::from(&key));

    // An empty external-ip clears the file's.
    let text = with_relay("external-ip = \"203.0.113.10\"");
    let c = parse(&text, &env(&[("TURNPIKE_RELAY_EXTERNAL_IP", "")])).unwrap();
    assert!(c.relay.external_ips.is_empty());
}

#[test]
fn bad_overrides_of_the_new_keys_name_the_variable() {
    let dir = Scratch::new("env-bad-new-keys");
    let missing = dir.path("missing.pem");
    let e = errs(
        MINIMAL,
        &[
            ("TURNPIKE_RELAY_TLS_CERT_FILE", &missing),
            ("TURNPIKE_RELAY_RELAY_IP", "192.0.2.1,192.0.2.2"),
            ("TURNPIKE_RELAY_MAX_FRAME", "100"),
            ("TURNPIKE_RELAY_IDLE_TIMEOUT", "forever"),
            ("TURNPIKE_RELAY_STREAM_QUEUE", "many"),
        ],
    );
    assert_eq!(
        e.paths(),
        vec![
            "env TURNPIKE_RELAY_STREAM_QUEUE",
            "env TURNPIKE_RELAY_RELAY_IP[1]",
            "env TURNPIKE_RELAY_IDLE_TIMEOUT",
            "env TURNPIKE_RELAY_MAX_FRAME",
            "env TURNPIKE_RELAY_TLS_CERT_FILE",
            // Only the certificate was given: the key is still required.
            "relay.tls.key-file",
        ],
        "{e}"
    );
    assert!(
        e.0[1]
            .message
            .starts_with("a second IPv4 address (env TURNPIKE_RELAY_RELAY_IP[0] is IPv4 too)"),
        "{e}"
    );
    assert!(
        e.0[4]
            .message
            .starts_with(&format!("cannot read {missing:?}")),
        "{e}"
    );

    // An external address without a relay address of its family.
    let e = one_err(MINIMAL, &[("TURNPIKE_RELAY_EXTERNAL_IP", "2001:db8::9")]);
    assert_eq!(e.path, "env TURNPIKE_RELAY_EXTERNAL_IP");

    // relay.tls is not a table: the override has nowhere to go, and the
    // file's mistake is what gets reported.
    let e = one_err(
        &with_relay("tls = 1"),
        &[("TURNPIKE_RELAY_TLS_KEY_FILE", "/x")],
    );
    assert_eq!(
        (e.path.as_str(), e.message.as_str()),
        ("relay.tls", "expected a table, got an integer")
    );
}

#[test]
fn env_var_names_follow_the_rule_and_are_unique() {
    let names: Vec<String> = SCHEMA.iter().map(|k| k.env_var()).collect();
    for expected in [
        "TURNPIKE_RELAY_REALM",
        "TURNPIKE_RELAY_RELAY_PORTS",
        "TURNPIKE_RELAY_USER_QUOTA",
        "TURNPIKE_ADMIN_LISTEN",
        "TURNPIKE_LOG_LEVEL",
        "TURNPIKE_RELAY_RELAY_IP",
        "TURNPIKE_RELAY_MAX_CONNECTIONS_PER_IP",
        "TURNPIKE_RELAY_TLS_CERT_FILE",
        "TURNPIKE_RELAY_TLS_KEY_FILE",
    ] {
        assert!(names.iter().any(|n| n == expected), "{expected}");
    }
    let mut sorted = names.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(sorted.len(), names.len());
    assert_eq!(SCHEMA.len(), 54);
    let lists: Vec<String> = SCHEMA
        .iter()
        .filter(|k| k.kind == ValueKind::List)
        .map(|k| k.path())
        .collect();
    assert_eq!(
        lists,
        [
            "relay.listen",
            "relay.secrets",
            "relay.allow-peers",
            "relay.deny-peers",
            "control.turn-urls",
            "control.trusted-proxies",
            "signal.allowed-origins"
        ]
    );
    let named: Vec<String> = SCHEMA
        .iter()
        .filter(|k| k.kind == ValueKind::NamedSecrets)
        .map(|k| k.env_var())
        .collect();
    assert_eq!(
        named,
        ["TURNPIKE_CONTROL_JWT_KEYS", "TURNPIKE_CONTROL_APPS"]
    );
    for expected in [
        "TURNPIKE_CONTROL_LISTEN",
        "TURNPIKE_CONTROL_PUBLIC_URL",
        "TURNPIKE_CONTROL_ADMIN_TOKEN",
        "TURNPIKE_CONTROL_HASH_KEY",
        "TURNPIKE_CONTROL_TURN_URLS",
        "TURNPIKE_CONTROL_CREDENTIAL_TTL",
        "TURNPIKE_CONTROL_TOKEN_TTL",
        "TURNPIKE_CONTROL_MAX_BODY",
        "TURNPIKE_CONTROL_REQUEST_TIMEOUT",
        "TURNPIKE_STORE_REDIS_URL",
    ] {
        assert!(names.iter().any(|n| n == expected), "{expected}");
    }
    let string_or_list: Vec<String> = SCHEMA
        .iter()
        .filter(|k| k.kind == ValueKind::StringOrList)
        .map(|k| k.path())
        .collect();
    assert_eq!(string_or_list, ["relay.external-ip", "relay.relay-ip"]);
    let tls: Vec<String> = SCHEMA
        .iter()
        .filter(|k| k.section == "relay.tls")
        .map(|k| k.path())
        .collect();
    assert_eq!(tls, ["relay.tls.cert-file", "relay.tls.key-file"]);
}

// ------------------------------------------------------------------- load

#[test]
fn load_reports_a_missing_file_by_name() {
    let path = Path::new("/nonexistent/turnpike/missing.toml");
    let e = load(Some(path), &[]).unwrap_err();
    assert_eq!(e.0.len(), 1);
    assert_eq!(e.0[0].path, "/nonexistent/turnpike/missing.toml");
    assert!(
        e.0[0]
            .message
            .starts_with("cannot read configuration file: "),
        "{e}"
    );
}

#[test]
fn load_reads_a_file_and_names_it_in_syntax_errors() {
    let dir = std::env::temp_dir().join(format!("conf-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let good = dir.join("good.toml");
    std::fs::write(&good, MINIMAL).unwrap();
    let c = load(Some(&good), &[]).unwrap();
    assert_eq!(c.source, Source::File(good.clone()));
    assert_eq!(c.relay.realm, "example.com");

    let bad = dir.join("bad.toml");
    std::fs::write(&bad, "[relay]\nrealm = \n").unwrap();
    let e = load(Some(&bad), &[]).unwrap_err();
    assert_eq!(e.0.len(), 1);
    assert!(
        e.0[0].path.starts_with(&format!("{}:2:", bad.display())),
        "{e}"
    );

    let no_secrets = dir.join("nosecrets.toml");
    std::fs::write(
        &no_secrets,
        MINIMAL.replace("secrets = [\"0123456789abcdef\"]", ""),
    )
    .unwrap();
    let e = load(Some(&no_secrets), &[]).unwrap_err();
    assert_eq!(e.paths(), vec!["relay.secrets"]);
    std::fs::remove_dir_all(&dir).unwrap();
}

// ---------------------------------------------------------------- example

#[test]
fn the_example_is_a_valid_config_with_these_values() {
    let c = ok(EXAMPLE);
    let r = &c.relay;
    assert_eq!(r.realm, "example.com");
    assert_eq!(
        r.listen.iter().map(ToString::to_string).collect::<Vec<_>>(),
        vec![
            "udp://0.0.0.0:3478",
            "udp://[::]:3478",
            "tcp://0.0.0.0:3478",
            "tcp://[::]:3478"
        ]
    );
    assert_eq!(r.external_ips, ips(Some("203.0.113.7"), None));
    assert_eq!(r.relay_ips, ips(Some("10.0.0.5"), Some("2001:db8::5")));
    assert_eq!(
        r.relay_ports,
        PortRange {
            start: 49152,
            end: 65535
        }
    );
    assert_eq!(
        r.secrets.iter().map(Secret::expose).collect::<Vec<_>>(),
        vec![
            "change-me-to-a-long-random-secret-0001",
            "change-me-to-a-long-random-secret-0000"
        ]
    );
    assert_eq!(
        r.allow_peers,
        vec![net("10.20.0.0/16"), net("fd00::10/128")]
    );
    assert_eq!(
        r.deny_peers,
        vec![net("198.51.100.0/24"), net("2001:db8::/32")]
    );
    assert_eq!(r.user_quota, Some(16));
    assert_eq!(r.total_quota, Some(10_000));
    assert_eq!(r.max_permissions, 64);
    assert_eq!(r.max_lifetime, Duration::from_secs(3600));
    assert_eq!(r.nonce_lifetime, Duration::from_secs(600));
    assert_eq!(r.threads.map(|n| n.get()), Some(4));
    assert_eq!(r.grace_period, Duration::from_secs(30));
    assert_eq!(r.max_connections_per_ip, 64);
    assert_eq!(r.handshake_timeout, Duration::from_secs(10));
    assert_eq!(r.idle_timeout, Duration::from_secs(300));
    assert_eq!(r.max_frame, 65552);
    assert_eq!(r.stream_queue, 256);
    // [relay.tls] is commented out: the example cannot name real files.
    assert_eq!(r.tls, None);
    assert_eq!(c.admin.listen, addr("127.0.0.1:9641"));
    assert_eq!(c.log.level, "info");

    let k = c.control.as_ref().unwrap();
    assert_eq!(k.listen, addr("127.0.0.1:8080"));
    assert_eq!(k.public_url, "https://turnpike.example.com");
    assert_eq!(
        k.admin_token.as_ref().map(Secret::expose),
        Some("change-me-to-a-long-random-admin-token")
    );
    assert_eq!(k.hash_key.expose(), "change-me-to-a-long-random-hash-key");
    assert_eq!(
        k.jwt_keys
            .iter()
            .map(|j| j.kid.as_str())
            .collect::<Vec<_>>(),
        vec!["2025-06", "2025-01"]
    );
    assert_eq!(
        k.jwt_keys[0].secret.expose(),
        "change-me-to-a-random-jwt-secret-of-32-bytes-0002"
    );
    assert_eq!(
        k.turn_urls,
        vec![
            "stun:turn.example.com:3478",
            "turn:turn.example.com:3478?transport=udp",
            "turn:turn.example.com:3478?transport=tcp",
        ]
    );
    assert_eq!(k.credential_ttl, Duration::from_secs(4 * 3600));
    assert_eq!(k.token_ttl, Duration::from_secs(300));
    assert_eq!(k.max_body, 65536);
    assert_eq!(k.request_timeout, Duration::from_secs(10));
    assert_eq!(
        k.apps
            .iter()
            .map(|a| (a.id.as_str(), a.name.as_str(), a.keys.len()))
            .collect::<Vec<_>>(),
        vec![("web", "Web client", 2), ("ios", "ios", 1)]
    );
    assert_eq!(c.store.redis_url, None);
    assert_eq!(c.generated, conf::Generated::default());
}

/// EXAMPLE with its commented-out settings switched on: every line `# X`
/// where X is a table header (`[relay.tls]`) or a single TOML `key = value`
/// becomes `X`. Prose comments never parse as either.
fn example_uncommented() -> String {
    EXAMPLE
        .lines()
        .map(|line| match line.strip_prefix("# ") {
            Some(rest) if is_setting(rest) => rest,
            _ => line,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn is_setting(line: &str) -> bool {
    let header = line.starts_with('[')
        && line.ends_with(']')
        && line[1..line.len() - 1]
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.');
    header || line.parse::<toml::Table>().is_ok_and(|t| t.len() == 1)
}

/// The table at a dotted section path (`relay.tls`).
fn section<'t>(table: &'t toml::Table, path: &str) -> Option<&'t toml::Table> {
    path.split('.')
        .try_fold(table, |t, part| t.get(part).and_then(|v| v.as_table()))
}

/// Keys the example shows commented out: `[relay.tls]` needs real files,
/// and most readers want the default store (in memory).
fn commented_in_example(key: &conf::Key) -> bool {
    key.section == "relay.tls" || key.path() == "store.redis-url"
}

#[test]
fn the_example_shows_every_key_in_the_schema() {
    // Set, or shown commented out (see commented_in_example).
    let table: toml::Table = example_uncommented().parse().unwrap();
    for key in SCHEMA {
        assert!(
            section(&table, key.section).is_some_and(|s| s.contains_key(key.name)),
            "{} is missing from examples/turnpike.toml",
            key.path()
        );
    }
    // Everything else is really set, not just shown.
    let set: toml::Table = EXAMPLE.parse().unwrap();
    for key in SCHEMA.iter().filter(|k| !commented_in_example(k)) {
        assert!(
            section(&set, key.section).is_some_and(|s| s.contains_key(key.name)),
            "{} is only commented out in examples/turnpike.toml",
            key.path()
        );
    }
    assert!(section(&set, "relay.tls").is_none());
    assert!(!section(&set, "store").unwrap().contains_key("redis-url"));
}

#[test]
fn the_examples_commented_tls_block_is_valid_when_switched_on() {
    // Uncommented, the block names files that do not exist here...
    let e = errs(&example_uncommented(), &[]);
    assert_eq!(
        e.paths(),
        vec!["relay.tls.cert-file", "relay.tls.key-file"],
        "{e}"
    );
    assert!(
        e.0[0].message.contains("/etc/turnpike/fullchain.pem"),
        "{e}"
    );
    // ...and with real files (through the environment) it is a valid config.
    let dir = Scratch::new("example-tls");
    let vars = env(&[
        (
            "TURNPIKE_RELAY_TLS_CERT_FILE",
            &dir.file("fullchain.pem", "cert"),
        ),
        (
            "TURNPIKE_RELAY_TLS_KEY_FILE",
            &dir.file("privkey.pem", "key"),
        ),
    ]);
    let c = parse(&example_uncommented(), &vars).unwrap();
    assert_eq!(
        c.relay.tls.unwrap().cert_file,
        PathBuf::from(dir.path("fullchain.pem"))
    );
    assert_eq!(c.relay.listen.len(), 4);
    // The commented-out redis-url is valid too, and shown redacted.
    let redis = c.store.redis_url.unwrap();
    assert_eq!(redis.expose(), "redis://:change-me@127.0.0.1:6379/0");
    assert_eq!(redis.to_string(), "redis://:***@127.0.0.1:6379/0");
}

#[test]
fn the_embedded_default_uses_only_known_keys() {
    let table: toml::Table = conf::EMBEDDED_DEFAULT.parse().unwrap();
    assert!(!table["relay"].as_table().unwrap().contains_key("secrets"));
    let control = table["control"].as_table().unwrap();
    for generated in ["hash-key", "jwt-keys", "apps"] {
        assert!(!control.contains_key(generated), "{generated}");
    }
    // And parsing it as a file only complains about the missing secrets:
    // a file never gets generated values.
    let e = errs(conf::EMBEDDED_DEFAULT, &[]);
    assert_eq!(
        e.paths(),
        vec!["relay.secrets", "control.hash-key", "control.jwt-keys"],
        "{e}"
    );
}
