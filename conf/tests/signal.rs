//! `[signal]`: defaults, every key, env overrides, errors collected with
//! their paths, the idle-timeout rule and allowed-origins.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::time::Duration;

use conf::{parse, AllowedOrigins, Config, ConfigError, Errors, Signal, EXAMPLE, SCHEMA};

/// A valid relay; tests append `[signal]` to it.
const RELAY: &str = r#"
[relay]
realm = "example.com"
listen = ["udp://192.0.2.10:3478"]
secrets = ["0123456789abcdef"]
"#;

/// RELAY plus a `[signal]` section holding `body`.
fn with_signal(body: &str) -> String {
    format!("{RELAY}[signal]\n{body}\n")
}

fn env(vars: &[(&str, &str)]) -> Vec<(String, String)> {
    vars.iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn ok(text: &str) -> Config {
    ok_env(text, &[])
}

fn ok_env(text: &str, vars: &[(&str, &str)]) -> Config {
    match parse(text, &env(vars)) {
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

fn one_err(text: &str, vars: &[(&str, &str)]) -> ConfigError {
    let e = errs(text, vars);
    assert_eq!(e.0.len(), 1, "expected one error, got:\n{e}");
    e.0[0].clone()
}

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

fn origins(list: &[&str]) -> AllowedOrigins {
    AllowedOrigins::List(list.iter().map(ToString::to_string).collect())
}

/// What `allowed-origins = [ITEMS]` reads as.
fn read_origins(items: &str) -> AllowedOrigins {
    ok(&with_signal(&format!("allowed-origins = [{items}]")))
        .signal
        .allowed_origins
}

/// The one error `allowed-origins = [ITEMS]` gives, as (path, message).
fn origin_err(items: &str) -> (String, String) {
    let e = one_err(&with_signal(&format!("allowed-origins = [{items}]")), &[]);
    (e.path, e.message)
}

// --------------------------------------------------------------- defaults

#[test]
fn an_absent_or_empty_signal_section_gets_the_documented_defaults() {
    let expected = Signal {
        listen: addr("127.0.0.1:8081"),
        allowed_origins: AllowedOrigins::PublicUrl,
        auth_timeout: secs(5),
        ping_interval: secs(15),
        idle_timeout: secs(45),
        max_message: 65536,
        message_rate: 50,
        message_burst: 100,
        send_queue: 256,
        write_timeout: secs(10),
        resume_window: secs(30),
        empty_timeout: secs(60),
        node_timeout: secs(15),
        max_connections: 10_000,
        max_unauthenticated_per_ip: 64,
    };
    assert_eq!(Signal::default(), expected);
    assert_eq!(AllowedOrigins::default(), AllowedOrigins::PublicUrl);
    // No [signal] at all, an empty one, and an empty origin list.
    assert_eq!(ok(RELAY).signal, expected);
    assert_eq!(ok(&with_signal("")).signal, expected);
    assert_eq!(ok(&with_signal("allowed-origins = []")).signal, expected);
}

#[test]
fn every_signal_key_is_read_from_the_file() {
    let c = ok(&with_signal(
        r#"listen = "0.0.0.0:9000"
allowed-origins = ["https://app.example.com", "http://localhost:3000"]
auth-timeout = "2s"
ping-interval = "20s"
idle-timeout = "1m"
max-message = 2048
message-rate = 10
message-burst = 5
send-queue = 8
write-timeout = "3s"
resume-window = "0s"
empty-timeout = "2h"
node-timeout = "3s"
max-connections = 1
max-unauthenticated-per-ip = 100000"#,
    ));
    assert_eq!(
        c.signal,
        Signal {
            listen: addr("0.0.0.0:9000"),
            allowed_origins: origins(&["https://app.example.com", "http://localhost:3000"]),
            auth_timeout: secs(2),
            ping_interval: secs(20),
            idle_timeout: secs(60),
            max_message: 2048,
            message_rate: 10,
            // Below message-rate is fine: only at least 1 is required.
            message_burst: 5,
            send_queue: 8,
            write_timeout: secs(3),
            resume_window: Duration::ZERO,
            empty_timeout: secs(7200),
            node_timeout: secs(3),
            max_connections: 1,
            max_unauthenticated_per_ip: 100_000,
        }
    );
}

#[test]
fn signal_limits_are_inclusive() {
    let low = ok(&with_signal(
        r#"auth-timeout = "1s"
ping-interval = "1s"
idle-timeout = "2s"
max-message = 1024
message-rate = 1
message-burst = 1
send-queue = 8
write-timeout = "1s"
resume-window = "0s"
empty-timeout = "1s"
node-timeout = "3s"
max-connections = 1
max-unauthenticated-per-ip = 1"#,
    ))
    .signal;
    assert_eq!(low.auth_timeout, secs(1));
    assert_eq!(low.max_message, 1024);
    assert_eq!(low.message_burst, 1);
    assert_eq!(low.write_timeout, secs(1));
    let high = ok(&with_signal(
        r#"auth-timeout = "60s"
ping-interval = "5m"
idle-timeout = "1h"
max-message = 1048576
message-rate = 10000
message-burst = 4294967295
send-queue = 65536
write-timeout = "5m"
resume-window = "5m"
empty-timeout = "24h"
node-timeout = "5m"
max-connections = 1000000
max-unauthenticated-per-ip = 100000"#,
    ))
    .signal;
    assert_eq!(high.ping_interval, secs(300));
    assert_eq!(high.idle_timeout, secs(3600));
    assert_eq!(high.max_message, 1_048_576);
    assert_eq!(high.message_burst, u32::MAX);
    assert_eq!(high.send_queue, 65536);
    assert_eq!(high.write_timeout, secs(300));
    assert_eq!(high.empty_timeout, secs(86400));
    assert_eq!(high.max_connections, 1_000_000);
}

// ---------------------------------------------------------------- errors

#[test]
fn every_bad_signal_key_is_reported_at_once_with_its_path() {
    let e = errs(
        &with_signal(
            r#"listen = "localhost:8081"
allowed-origins = ["ftp://app.example.com", "https://app.example.com/path"]
auth-timeout = "0s"
ping-interval = 15
idle-timeout = "forever"
max-message = 512
message-rate = 0
message-burst = 0
send-queue = 7
write-timeout = "0s"
resume-window = "6m"
empty-timeout = "25h"
node-timeout = "2s"
max-connections = 1000001
max-unauthenticated-per-ip = "many"
bogus = 1"#,
        ),
        &[],
    );
    assert_eq!(
        e.paths(),
        vec![
            "signal.listen",
            "signal.allowed-origins[0]",
            "signal.allowed-origins[1]",
            "signal.auth-timeout",
            "signal.ping-interval",
            "signal.idle-timeout",
            "signal.max-message",
            "signal.message-rate",
            "signal.message-burst",
            "signal.send-queue",
            "signal.write-timeout",
            "signal.resume-window",
            "signal.empty-timeout",
            "signal.node-timeout",
            "signal.max-connections",
            "signal.max-unauthenticated-per-ip",
            "signal.bogus",
        ],
        "{e}"
    );
    let message = |path: &str| e.at(path).unwrap().message.clone();
    assert_eq!(
        message("signal.listen"),
        r#"expected IP:PORT like "127.0.0.1:8081", got "localhost:8081""#
    );
    assert_eq!(
        message("signal.auth-timeout"),
        r#"must be at least 1s, got "0s""#
    );
    assert_eq!(
        message("signal.ping-interval"),
        r#"expected a duration like "30s", got an integer"#
    );
    assert!(message("signal.idle-timeout").starts_with("expected a duration"));
    assert_eq!(
        message("signal.max-message"),
        "must be at least 1024, got 512"
    );
    assert_eq!(message("signal.message-rate"), "must be at least 1, got 0");
    assert_eq!(message("signal.message-burst"), "must be at least 1, got 0");
    assert_eq!(message("signal.send-queue"), "must be at least 8, got 7");
    assert_eq!(
        message("signal.resume-window"),
        r#"must be at most 5m, got "6m""#
    );
    assert_eq!(
        message("signal.empty-timeout"),
        r#"must be at most 1day, got "25h""#
    );
    assert_eq!(
        message("signal.node-timeout"),
        r#"must be at least 3s, got "2s""#
    );
    assert_eq!(
        message("signal.max-connections"),
        "must be at most 1000000, got 1000001"
    );
    assert_eq!(
        message("signal.max-unauthenticated-per-ip"),
        "expected an integer, got a string"
    );
    assert_eq!(message("signal.bogus"), "unknown key");
}

#[test]
fn more_upper_limits() {
    for (key, value, message) in [
        (
            "auth-timeout",
            r#""61s""#,
            r#"must be at most 1m, got "61s""#,
        ),
        (
            "ping-interval",
            r#""301s""#,
            r#"must be at most 5m, got "301s""#,
        ),
        (
            "max-message",
            "1048577",
            "must be at most 1048576, got 1048577",
        ),
        ("message-rate", "10001", "must be at most 10000, got 10001"),
        ("send-queue", "65537", "must be at most 65536, got 65537"),
        (
            "node-timeout",
            r#""301s""#,
            r#"must be at most 5m, got "301s""#,
        ),
        (
            "max-unauthenticated-per-ip",
            "100001",
            "must be at most 100000, got 100001",
        ),
    ] {
        let e = one_err(&with_signal(&format!("{key} = {value}")), &[]);
        assert_eq!(e.path, format!("signal.{key}"));
        assert_eq!(e.message, message, "{key}");
    }
}

#[test]
fn signal_must_be_a_table() {
    let e = one_err(&format!("signal = 1\n{RELAY}"), &[]);
    assert_eq!(
        (e.path.as_str(), e.message.as_str()),
        ("signal", "expected a table, got an integer")
    );
}

#[test]
fn idle_timeout_must_be_longer_than_ping_interval() {
    // Equal is refused: a client that pings on time could still be dropped.
    let e = one_err(
        &with_signal("ping-interval = \"20s\"\nidle-timeout = \"20s\""),
        &[],
    );
    assert_eq!(e.path, "signal.idle-timeout");
    assert_eq!(
        e.message,
        "must be longer than signal.ping-interval (20s), got 20s: a client that pings on \
         time would be dropped as idle"
    );
    // Shorter, too.
    let e = one_err(
        &with_signal("ping-interval = \"20s\"\nidle-timeout = \"10s\""),
        &[],
    );
    assert_eq!(e.path, "signal.idle-timeout");
    // Against the default of the key that is not set: the error is still on
    // idle-timeout, and says which value is the default.
    let e = one_err(&with_signal("ping-interval = \"1m\""), &[]);
    assert_eq!(e.path, "signal.idle-timeout");
    assert!(
        e.message.contains("(1m), got the default 45s"),
        "{}",
        e.message
    );
    let e = one_err(&with_signal("idle-timeout = \"15s\""), &[]);
    assert_eq!(e.path, "signal.idle-timeout");
    assert!(
        e.message
            .contains("signal.ping-interval (the default 15s), got 15s"),
        "{}",
        e.message
    );
    // One second longer is enough.
    let s = ok(&with_signal(
        "ping-interval = \"20s\"\nidle-timeout = \"21s\"",
    ))
    .signal;
    assert_eq!((s.ping_interval, s.idle_timeout), (secs(20), secs(21)));
    // A bad ping-interval is reported once, with no comparison piled on.
    let e = one_err(
        &with_signal("ping-interval = \"0s\"\nidle-timeout = \"1s\""),
        &[],
    );
    assert_eq!(e.path, "signal.ping-interval");
}

// --------------------------------------------------------------- origins

#[test]
fn allowed_origins_take_origins_and_normalize_them() {
    assert_eq!(
        read_origins(
            r#""https://app.example.com", "http://localhost:3000", "https://[2001:db8::1]:8443", "http://192.0.2.1""#
        ),
        origins(&[
            "https://app.example.com",
            "http://localhost:3000",
            "https://[2001:db8::1]:8443",
            "http://192.0.2.1",
        ])
    );
    // Lowercase, and without the scheme's default port: as browsers send it.
    assert_eq!(
        read_origins(
            r#""HTTPS://App.Example.COM:443", "http://a.example.com:80", "http://b.example.com:443""#
        ),
        origins(&[
            "https://app.example.com",
            "http://a.example.com",
            "http://b.example.com:443",
        ])
    );
    // "*" alone is any origin.
    assert_eq!(read_origins(r#""*""#), AllowedOrigins::Any);
}

#[test]
fn bad_origins_are_reported_each_at_its_index() {
    let (path, message) = origin_err(r#""ftp://app.example.com""#);
    assert_eq!(path, "signal.allowed-origins[0]");
    assert!(
        message.starts_with("the scheme must be http or https"),
        "{message}"
    );
    assert!(message.ends_with(r#"got "ftp""#), "{message}");

    let (path, message) = origin_err(r#""https://app.example.com", "https://app.example.com/app""#);
    assert_eq!(path, "signal.allowed-origins[1]");
    assert!(message.starts_with("an origin has no path"), "{message}");
    assert!(
        message.contains(r#"write "https://app.example.com""#),
        "{message}"
    );
    // Not even a trailing slash: the Origin header never has one.
    let (_, message) = origin_err(r#""https://app.example.com/""#);
    assert!(message.starts_with("an origin has no path"), "{message}");
    let (_, message) = origin_err(r#""https://app.example.com?x=1""#);
    assert!(message.starts_with("an origin has no path"), "{message}");

    for (item, start) in [
        ("app.example.com", "expected an origin like"),
        ("https://", "the host is empty"),
        ("https://app.example.com:0", "the port must be a number"),
        ("https://app.example.com:99999", "the port must be a number"),
        ("https://exa mple.com", "must not contain spaces"),
        ("https://2001:db8::1", "an IPv6 address must be in brackets"),
        ("https://*.example.com", "wildcards are not supported"),
        ("https://bad_host!.com", "the host is not an IP address"),
    ] {
        let (path, message) = origin_err(&format!("{item:?}"));
        assert_eq!(path, "signal.allowed-origins[0]", "{item}");
        assert!(message.starts_with(start), "{item}: {message}");
    }
    // A user part is refused without being echoed.
    let (_, message) = origin_err(r#""https://user:hunter2@app.example.com""#);
    assert_eq!(message, "must not contain a user name or password");

    // Not a string.
    let (path, message) = origin_err("1");
    assert_eq!(
        (path.as_str(), message.as_str()),
        (
            "signal.allowed-origins[0]",
            "expected a string, got an integer"
        )
    );
    let e = one_err(&with_signal(r#"allowed-origins = "*""#), &[]);
    assert_eq!(
        (e.path.as_str(), e.message.as_str()),
        (
            "signal.allowed-origins",
            "expected an array of strings, got a string"
        )
    );
}

#[test]
fn every_bad_origin_is_reported() {
    let e = errs(
        &with_signal(
            r#"allowed-origins = ["ftp://a.example.com", "https://ok.example.com", "https://b.example.com/x", "c"]"#,
        ),
        &[],
    );
    assert_eq!(
        e.paths(),
        vec![
            "signal.allowed-origins[0]",
            "signal.allowed-origins[2]",
            "signal.allowed-origins[3]"
        ],
        "{e}"
    );
}

#[test]
fn a_star_must_stand_alone_and_origins_are_unique() {
    let e = errs(
        &with_signal(r#"allowed-origins = ["https://app.example.com", "*"]"#),
        &[],
    );
    assert_eq!(e.paths(), vec!["signal.allowed-origins[1]"], "{e}");
    assert!(
        e.0[0].message.contains("must be the only item"),
        "{}",
        e.0[0].message
    );
    // Duplicates are compared normalized.
    let (path, message) = origin_err(r#""https://app.example.com", "HTTPS://APP.example.com:443""#);
    assert_eq!(path, "signal.allowed-origins[1]");
    assert_eq!(message, "duplicate of signal.allowed-origins[0]");
}

#[test]
fn allows_follows_the_documented_rules() {
    let public = Some("https://Turnpike.example.com/base");
    // No Origin header: a non-browser client, always accepted.
    for allowed in [
        AllowedOrigins::PublicUrl,
        AllowedOrigins::Any,
        origins(&["https://app.example.com"]),
    ] {
        assert!(allowed.allows(None, public), "{allowed:?}");
        assert!(allowed.allows(None, None), "{allowed:?}");
    }
    // Empty list: the origin of control.public-url only.
    let p = AllowedOrigins::PublicUrl;
    assert!(p.allows(Some("https://turnpike.example.com"), public));
    assert!(p.allows(Some("https://turnpike.example.com:443"), public));
    assert!(!p.allows(Some("http://turnpike.example.com"), public));
    assert!(!p.allows(Some("https://turnpike.example.com:8443"), public));
    assert!(!p.allows(Some("https://evil.example.com"), public));
    assert!(!p.allows(Some("null"), public));
    assert!(p.allows(Some("http://127.0.0.1:8080"), Some("http://127.0.0.1:8080")));
    // Without [control] there is no public URL, so no browser origin.
    assert!(!p.allows(Some("https://turnpike.example.com"), None));
    // "*": anything, even an opaque origin.
    assert!(AllowedOrigins::Any.allows(Some("null"), None));
    assert!(AllowedOrigins::Any.allows(Some("https://evil.example.com"), public));
    // A list: only its origins (and not the public URL's unless listed).
    let l = read_origins(r#""https://App.example.com", "http://localhost:3000""#);
    assert!(l.allows(Some("https://app.example.com"), public));
    assert!(l.allows(Some("HTTPS://APP.EXAMPLE.COM"), public));
    assert!(l.allows(Some("http://localhost:3000"), public));
    assert!(!l.allows(Some("http://localhost:3001"), public));
    assert!(!l.allows(Some("https://turnpike.example.com"), public));
    assert!(!l.allows(Some("null"), public));
}

// ------------------------------------------------------------------- env

#[test]
fn env_overrides_signal_keys_and_creates_the_section() {
    // No [signal] in the file: the variables create it.
    let c = ok_env(
        RELAY,
        &[
            ("TURNPIKE_SIGNAL_AUTH_TIMEOUT", "10s"),
            ("TURNPIKE_SIGNAL_LISTEN", "127.0.0.1:9001"),
            (
                "TURNPIKE_SIGNAL_ALLOWED_ORIGINS",
                "https://a.example.com, http://localhost:3000",
            ),
            ("TURNPIKE_SIGNAL_MAX_CONNECTIONS", "500"),
            ("TURNPIKE_SIGNAL_MAX_UNAUTHENTICATED_PER_IP", "8"),
        ],
    );
    let s = &c.signal;
    assert_eq!(s.auth_timeout, secs(10));
    assert_eq!(s.listen, addr("127.0.0.1:9001"));
    assert_eq!(
        s.allowed_origins,
        origins(&["https://a.example.com", "http://localhost:3000"])
    );
    assert_eq!(s.max_connections, 500);
    assert_eq!(s.max_unauthenticated_per_ip, 8);
    assert_eq!(s.ping_interval, secs(15));

    // A variable wins over the file; "*" and an empty value work too.
    let file = with_signal("auth-timeout = \"2s\"\nallowed-origins = [\"https://a.example.com\"]");
    let c = ok_env(
        &file,
        &[
            ("TURNPIKE_SIGNAL_AUTH_TIMEOUT", "30s"),
            ("TURNPIKE_SIGNAL_ALLOWED_ORIGINS", "*"),
        ],
    );
    assert_eq!(c.signal.auth_timeout, secs(30));
    assert_eq!(c.signal.allowed_origins, AllowedOrigins::Any);
    let c = ok_env(&file, &[("TURNPIKE_SIGNAL_ALLOWED_ORIGINS", "")]);
    assert_eq!(c.signal.allowed_origins, AllowedOrigins::PublicUrl);
}

#[test]
fn every_signal_key_has_an_env_var() {
    let names: Vec<String> = SCHEMA
        .iter()
        .filter(|k| k.section == "signal")
        .map(|k| k.env_var())
        .collect();
    assert_eq!(
        names,
        [
            "TURNPIKE_SIGNAL_LISTEN",
            "TURNPIKE_SIGNAL_ALLOWED_ORIGINS",
            "TURNPIKE_SIGNAL_AUTH_TIMEOUT",
            "TURNPIKE_SIGNAL_PING_INTERVAL",
            "TURNPIKE_SIGNAL_IDLE_TIMEOUT",
            "TURNPIKE_SIGNAL_MAX_MESSAGE",
            "TURNPIKE_SIGNAL_MESSAGE_RATE",
            "TURNPIKE_SIGNAL_MESSAGE_BURST",
            "TURNPIKE_SIGNAL_SEND_QUEUE",
            "TURNPIKE_SIGNAL_WRITE_TIMEOUT",
            "TURNPIKE_SIGNAL_RESUME_WINDOW",
            "TURNPIKE_SIGNAL_EMPTY_TIMEOUT",
            "TURNPIKE_SIGNAL_NODE_TIMEOUT",
            "TURNPIKE_SIGNAL_MAX_CONNECTIONS",
            "TURNPIKE_SIGNAL_MAX_UNAUTHENTICATED_PER_IP",
        ]
    );
}

#[test]
fn bad_signal_overrides_name_the_variable() {
    let e = errs(
        &with_signal("ping-interval = \"20s\""),
        &[
            ("TURNPIKE_SIGNAL_AUTH_TIMEOUT", "2m"),
            ("TURNPIKE_SIGNAL_MESSAGE_RATE", "fast"),
            (
                "TURNPIKE_SIGNAL_ALLOWED_ORIGINS",
                "https://ok.example.com,ftp://x",
            ),
            ("TURNPIKE_SIGNAL_IDLE_TIMEOUT", "10s"),
            ("TURNPIKE_SIGNAL_BOGUS", "1"),
        ],
    );
    assert_eq!(
        e.paths(),
        vec![
            "env TURNPIKE_SIGNAL_MESSAGE_RATE",
            "env TURNPIKE_SIGNAL_BOGUS",
            "env TURNPIKE_SIGNAL_ALLOWED_ORIGINS[1]",
            "env TURNPIKE_SIGNAL_AUTH_TIMEOUT",
            "env TURNPIKE_SIGNAL_IDLE_TIMEOUT",
        ],
        "{e}"
    );
    assert_eq!(
        e.at("env TURNPIKE_SIGNAL_AUTH_TIMEOUT").unwrap().message,
        r#"must be at most 1m, got "2m""#
    );
    assert_eq!(
        e.at("env TURNPIKE_SIGNAL_MESSAGE_RATE").unwrap().message,
        r#"expected an integer, got "fast""#
    );
    // The comparison names the file's ping-interval...
    assert!(
        e.at("env TURNPIKE_SIGNAL_IDLE_TIMEOUT")
            .unwrap()
            .message
            .starts_with("must be longer than signal.ping-interval (20s), got 10s"),
        "{e}"
    );
    // ...or the variable that set it.
    let e = one_err(&with_signal(""), &[("TURNPIKE_SIGNAL_PING_INTERVAL", "1m")]);
    assert_eq!(e.path, "signal.idle-timeout");
    assert!(
        e.message
            .starts_with("must be longer than env TURNPIKE_SIGNAL_PING_INTERVAL (1m)"),
        "{}",
        e.message
    );
}

// --------------------------------------------------------------- example

#[test]
fn the_example_sets_every_signal_key_to_a_valid_value() {
    let c = ok(EXAMPLE);
    assert_eq!(
        c.signal,
        Signal {
            allowed_origins: origins(&["https://app.example.com", "http://localhost:3000"]),
            ..Signal::default()
        }
    );
}

#[test]
fn debug_shows_the_signal_section() {
    let c = ok(&with_signal(
        r#"allowed-origins = ["https://app.example.com"]"#,
    ));
    let debug = format!("{c:?}");
    assert!(debug.contains("signal: Signal {"), "{debug}");
    assert!(debug.contains("https://app.example.com"), "{debug}");
    // Still nothing secret from the rest of the configuration.
    assert!(!debug.contains("0123456789abcdef"), "{debug}");
}
