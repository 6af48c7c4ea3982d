//! `[control]` and `[store]`: defaults, every rule, env overrides, derived
//! turn-urls, redaction and the embedded default's generated values.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use conf::{
    derive_turn_urls, load, parse, parse_with_source, Config, ConfigError, DeriveTurnUrlsError,
    Errors, Generated, Listen, RelayIps, Source, Transport,
};

/// A valid relay; tests append `[control]` and `[store]` to it.
const RELAY: &str = r#"
[relay]
realm = "example.com"
listen = ["udp://192.0.2.10:3478"]
secrets = ["0123456789abcdef"]
"#;

const HASH_KEY: &str = "hash-key-0123456789";
const JWT_SECRET: &str = "jwt-secret-0123456789abcdef-0123456";

/// RELAY plus a `[control]` section with the two required keys and `extra`.
fn with_control(extra: &str) -> String {
    format!(
        "{RELAY}[control]\nhash-key = \"{HASH_KEY}\"\njwt-keys = [{{ kid = \"k1\", secret = \"{JWT_SECRET}\" }}]\n{extra}\n"
    )
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

/// RELAY with another `listen` list (a TOML array) and extra relay keys.
fn relay_listening(list: &str, extra: &str) -> String {
    format!(
        "{}{extra}\n",
        RELAY.replace("[\"udp://192.0.2.10:3478\"]", list)
    )
}

/// A control section with the required keys (to append after a relay).
fn control_section(extra: &str) -> String {
    format!("[control]\nhash-key = \"{HASH_KEY}\"\njwt-keys = [\"k1:{JWT_SECRET}\"]\n{extra}\n")
}

/// A scratch directory, removed on drop; unique per test.
struct Scratch(PathBuf);

impl Scratch {
    fn new(test: &str) -> Self {
        let dir =
            std::env::temp_dir().join(format!("conf-control-test-{}-{test}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Scratch(dir)
    }

    fn file(&self, name: &str, contents: &str) -> String {
        let path = self.0.join(name);
        std::fs::write(&path, contents).unwrap();
        path.to_str().unwrap().to_string()
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

// --------------------------------------------------------------- defaults

#[test]
fn a_minimal_control_section_gets_the_documented_defaults() {
    let c = ok(&with_control(""));
    let k = c.control.as_ref().unwrap();
    assert_eq!(k.listen, addr("127.0.0.1:8080"));
    assert_eq!(k.public_url, "http://127.0.0.1:8080");
    assert_eq!(k.admin_token, None);
    assert_eq!(k.hash_key.expose(), HASH_KEY);
    assert_eq!(k.jwt_keys.len(), 1);
    assert_eq!(k.jwt_keys[0].kid, "k1");
    assert_eq!(k.jwt_keys[0].secret.expose(), JWT_SECRET);
    // Derived from RELAY's one UDP listener.
    assert_eq!(
        k.turn_urls,
        vec!["stun:192.0.2.10:3478", "turn:192.0.2.10:3478?transport=udp"]
    );
    assert!(k.turn_urls_derived && k.public_url_derived);
    assert_eq!(k.credential_ttl, Duration::from_secs(4 * 3600));
    assert_eq!(k.token_ttl, Duration::from_secs(300));
    assert_eq!(k.max_body, 65536);
    assert_eq!(k.request_timeout, Duration::from_secs(10));
    assert!(k.apps.is_empty());
    assert_eq!(c.store.redis_url, None);
    assert_eq!(c.generated, Generated::default());
    assert!(c.generated_app().is_none());

    // An empty [store] is the in-memory store too.
    let c = ok(&format!("{}[store]\n", with_control("")));
    assert_eq!(c.store.redis_url, None);
}

#[test]
fn control_keys_take_every_form_and_their_limits() {
    let c = ok(&format!(
        "{RELAY}[control]
listen = \"[::1]:9000\"
admin-token = \"admin-token-0123456\"
hash-key = \"{HASH_KEY}\"
jwt-keys = [\"new.key_2-x:{JWT_SECRET}-new\", {{ kid = \"old\", secret = \"{JWT_SECRET}:with:colons\" }}]
credential-ttl = \"1m\"
token-ttl = \"1h\"
max-body = 1024
request-timeout = \"60s\"
apps = [\"web:web-key-0123456789\", {{ id = \"i_o-s\", name = \"iOS app\", keys = [\"ios-key-0123456789\", \"ios-key-9876543210\"] }}]
"
    ));
    let k = c.control.unwrap();
    assert_eq!(k.listen, addr("[::1]:9000"));
    // The default public URL keeps the brackets.
    assert_eq!(k.public_url, "http://[::1]:9000");
    assert_eq!(k.admin_token.unwrap().expose(), "admin-token-0123456");
    assert_eq!(
        k.jwt_keys
            .iter()
            .map(|j| (j.kid.as_str(), j.secret.expose()))
            .collect::<Vec<_>>(),
        vec![
            ("new.key_2-x", format!("{JWT_SECRET}-new").as_str()),
            // The first ':' ends a kid; a table's secret may hold any.
            ("old", format!("{JWT_SECRET}:with:colons").as_str()),
        ]
    );
    assert_eq!(k.credential_ttl, Duration::from_secs(60));
    assert_eq!(k.token_ttl, Duration::from_secs(3600));
    assert_eq!(k.max_body, 1024);
    assert_eq!(k.request_timeout, Duration::from_secs(60));
    assert_eq!(k.apps.len(), 2);
    // The string form: one key, the id as name.
    assert_eq!(
        (k.apps[0].id.as_str(), k.apps[0].name.as_str()),
        ("web", "web")
    );
    assert_eq!(k.apps[0].keys[0].expose(), "web-key-0123456789");
    assert_eq!(
        (k.apps[1].id.as_str(), k.apps[1].name.as_str()),
        ("i_o-s", "iOS app")
    );
    assert_eq!(k.apps[1].keys.len(), 2);

    // The other ends of the ranges, and [[control.apps]] with the default name.
    let c = ok(&with_control(
        "credential-ttl = \"24h\"\ntoken-ttl = \"30s\"\nmax-body = 1048576\nrequest-timeout = \"1s\"\n[[control.apps]]\nid = \"web\"\nkeys = [\"web-key-0123456789\"]",
    ));
    let k = c.control.unwrap();
    assert_eq!(k.credential_ttl, Duration::from_secs(24 * 3600));
    assert_eq!(k.token_ttl, Duration::from_secs(30));
    assert_eq!(k.max_body, 1_048_576);
    assert_eq!(k.request_timeout, Duration::from_secs(1));
    assert_eq!(k.apps[0].name, "web");
}

#[test]
fn a_kid_and_an_app_id_may_be_64_characters() {
    let long = "k".repeat(64);
    let c = ok(&with_control(&format!(
        "apps = [\"{long}:web-key-0123456789\"]"
    )));
    assert_eq!(c.control.unwrap().apps[0].id, long);
    let text = with_control("").replace("kid = \"k1\"", &format!("kid = \"{long}\""));
    assert_eq!(ok(&text).control.unwrap().jwt_keys[0].kid, long);
}

// ------------------------------------------------------ collected errors

#[test]
fn every_bad_control_and_store_key_is_reported_at_once() {
    let text = format!(
        r#"{RELAY}
[control]
listen = "localhost:8080"
public-url = "https://turnpike.example.com/?x=1"
admin-token = "short-admin"
hash-key = "short-hash"
jwt-keys = [
    {{ kid = "a b", secret = "short-jwt" }},
    "no-colon-in-this-one",
    {{ kid = "k2" }},
    {{ kid = "k3", secret = "{JWT_SECRET}", alg = "HS256" }},
    7,
]
turn-urls = ["stun:turn.example.com:3478?transport=udp", "turn://turn.example.com", "http:x"]
credential-ttl = "30s"
token-ttl = "2h"
max-body = 512
request-timeout = "2m"
typo = 1

[[control.apps]]
id = "web"
keys = ["short-app-key"]

[[control.apps]]
name = ""
keys = []

[store]
redis-url = "http://:hunter2-password@localhost"
other = true
"#
    );
    let e = errs(&text, &[]);
    let mut paths = e.paths();
    paths.sort_unstable();
    assert_eq!(
        paths,
        vec![
            "control.admin-token",
            "control.apps[0].keys[0]",
            "control.apps[1].id",
            "control.apps[1].keys",
            "control.apps[1].name",
            "control.credential-ttl",
            "control.hash-key",
            "control.jwt-keys[0].kid",
            "control.jwt-keys[0].secret",
            "control.jwt-keys[1]",
            "control.jwt-keys[2].secret",
            "control.jwt-keys[3].alg",
            "control.jwt-keys[4]",
            "control.listen",
            "control.max-body",
            "control.public-url",
            "control.request-timeout",
            "control.token-ttl",
            "control.turn-urls[0]",
            "control.turn-urls[1]",
            "control.turn-urls[2]",
            "control.typo",
            "store.other",
            "store.redis-url",
        ],
        "{e}"
    );
    let at = |path: &str| e.at(path).unwrap().message.clone();
    assert_eq!(
        at("control.listen"),
        r#"expected IP:PORT like "127.0.0.1:8080", got "localhost:8080""#
    );
    assert!(at("control.public-url").starts_with("must not have a query or fragment"));
    assert_eq!(
        at("control.admin-token"),
        "too short: 11 bytes, at least 16 are required"
    );
    assert_eq!(
        at("control.hash-key"),
        "too short: 10 bytes, at least 16 are required"
    );
    assert_eq!(
        at("control.jwt-keys[0].secret"),
        "too short: 9 bytes, at least 32 are required"
    );
    assert_eq!(
        at("control.jwt-keys[0].kid"),
        r#"must be characters of A-Z a-z 0-9 _ - . only, found ' '"#
    );
    assert_eq!(
        at("control.jwt-keys[1]"),
        r#"expected "KID:SECRET" (or a table { kid, secret }), found no ':'"#
    );
    assert!(at("control.jwt-keys[2].secret").starts_with("required"));
    assert_eq!(at("control.jwt-keys[3].alg"), "unknown key");
    assert_eq!(
        at("control.jwt-keys[4]"),
        r#"expected a table { kid = "…", secret = "…" } or a "KID:SECRET" string, got an integer"#
    );
    assert!(at("control.turn-urls[0]").starts_with("a stun: URL takes no ?transport"));
    assert!(at("control.turn-urls[1]").starts_with(r#"no "//" after the scheme"#));
    assert!(at("control.turn-urls[2]").starts_with(r#"unknown scheme "http""#));
    assert_eq!(
        at("control.credential-ttl"),
        r#"must be at least 1m, got "30s""#
    );
    assert_eq!(at("control.token-ttl"), r#"must be at most 1h, got "2h""#);
    assert_eq!(at("control.max-body"), "must be at least 1024, got 512");
    assert_eq!(
        at("control.request-timeout"),
        r#"must be at most 1m, got "2m""#
    );
    assert_eq!(
        at("control.apps[0].keys[0]"),
        "too short: 13 bytes, at least 16 are required"
    );
    assert!(at("control.apps[1].id").starts_with("required"));
    assert!(at("control.apps[1].keys").starts_with("at least one key is required"));
    assert_eq!(at("control.apps[1].name"), "must not be empty");
    assert!(at("store.redis-url").starts_with(r#"unknown scheme "http""#));
    // No secret, and no part of the Redis password, in any message.
    let shown = e.to_string();
    for secret in [
        "short-admin",
        "short-hash",
        "short-jwt",
        "no-colon",
        "short-app",
        "hunter2",
    ] {
        assert!(!shown.contains(secret), "{secret} in:\n{shown}");
    }
    assert_eq!(shown.lines().count(), 24);
}

#[test]
fn control_values_out_of_range() {
    let cases = [
        ("credential-ttl = \"25h\"", "control.credential-ttl", "must be at most 1day, got \"25h\""),
        ("token-ttl = \"29s\"", "control.token-ttl", "must be at least 30s, got \"29s\""),
        ("max-body = 1048577", "control.max-body", "must be at most 1048576, got 1048577"),
        ("max-body = \"64k\"", "control.max-body", "expected an integer, got a string"),
        ("request-timeout = \"500ms\"", "control.request-timeout", "must be at least 1s, got \"500ms\""),
        ("request-timeout = 10", "control.request-timeout", "expected a duration like \"30s\", got an integer"),
        ("listen = 8080", "control.listen", "expected an address like \"127.0.0.1:8080\", got an integer"),
        ("admin-token = 5", "control.admin-token", "expected a string, got an integer"),
        ("turn-urls = \"stun:a.example\"", "control.turn-urls", "expected an array of strings, got a string"),
        ("apps = \"web:web-key-0123456789\"", "control.apps", "expected [[control.apps]] tables or an array of \"ID:KEY\" strings, got a string"),
        ("apps = [true]", "control.apps[0]", "expected a [[control.apps]] table (id, name, keys) or an \"ID:KEY\" string, got a boolean"),
    ];
    for (line, path, message) in cases {
        let e = one_err(&with_control(line), &[]);
        assert_eq!(
            (e.path.as_str(), e.message.as_str()),
            (path, message),
            "{line}"
        );
    }
}

#[test]
fn the_control_section_must_be_a_table_and_has_no_unknown_keys() {
    let e = one_err(&format!("control = 5\n{RELAY}"), &[]);
    assert_eq!(
        (e.path.as_str(), e.message.as_str()),
        ("control", "expected a table, got an integer")
    );
    let e = one_err(&format!("store = \"redis://x\"\n{RELAY}"), &[]);
    assert_eq!(e.path, "store");
    let e = one_err(&with_control("jwt-key = \"x\""), &[]);
    assert_eq!(
        (e.path.as_str(), e.message.as_str()),
        ("control.jwt-key", "unknown key")
    );
}

// ------------------------------------------------------ required / keys

#[test]
fn a_file_control_section_needs_hash_key_and_jwt_keys() {
    let e = errs(&format!("{RELAY}[control]\n"), &[]);
    assert_eq!(
        e.paths(),
        vec!["control.hash-key", "control.jwt-keys"],
        "{e}"
    );
    assert!(e.0[0].message.starts_with("required"), "{e}");
    assert!(
        e.0[1].message.starts_with("at least one key is required"),
        "{e}"
    );

    // An empty list is no key either.
    let e = one_err(
        &format!("{RELAY}[control]\nhash-key = \"{HASH_KEY}\"\njwt-keys = []\n"),
        &[],
    );
    assert_eq!(e.path, "control.jwt-keys");
}

#[test]
fn kids_are_unique_and_well_formed() {
    let text = format!(
        "{RELAY}[control]\nhash-key = \"{HASH_KEY}\"\njwt-keys = [\"a:{JWT_SECRET}\", \"b:{JWT_SECRET}\", {{ kid = \"a\", secret = \"{JWT_SECRET}\" }}, \":{JWT_SECRET}\", \"{}:{JWT_SECRET}\", \"c/d:short\"]\n",
        "k".repeat(65)
    );
    let e = errs(&text, &[]);
    assert_eq!(
        e.paths(),
        vec![
            "control.jwt-keys[3]",
            "control.jwt-keys[4]",
            "control.jwt-keys[5]",
            "control.jwt-keys[5]",
        ],
        "{e}"
    );
    assert_eq!(
        e.0[0].message,
        "kid: must be 1 to 64 characters of A-Z a-z 0-9 _ - ., got 0"
    );
    assert_eq!(
        e.0[1].message,
        "kid: must be 1 to 64 characters of A-Z a-z 0-9 _ - ., got 65"
    );
    assert_eq!(
        e.0[2].message,
        "kid: must be characters of A-Z a-z 0-9 _ - . only, found '/'"
    );
    assert_eq!(
        e.0[3].message,
        "secret: too short: 5 bytes, at least 32 are required"
    );

    // Duplicates are judged once every item is well-formed.
    let text = format!(
        "{RELAY}[control]\nhash-key = \"{HASH_KEY}\"\njwt-keys = [\"a:{JWT_SECRET}\", \"b:{JWT_SECRET}\", {{ kid = \"a\", secret = \"{JWT_SECRET}-2\" }}]\n"
    );
    let e = one_err(&text, &[]);
    assert_eq!(
        (e.path.as_str(), e.message.as_str()),
        (
            "control.jwt-keys[2]",
            r#"kid "a" is already used by control.jwt-keys[0]"#
        )
    );
}

#[test]
fn app_ids_and_keys_are_unique() {
    // Tables and strings mix in one list; keys are unique across both.
    let text = with_control(
        r#"apps = ["web:shared-key-0123456789", "ios:ios-key-0123456789", "web:other-key-0123456789", { id = "and", keys = ["and-key-0123456789", "shared-key-0123456789", "and-key-0123456789"] }]"#,
    );
    let e = errs(&text, &[]);
    assert_eq!(
        e.paths(),
        vec![
            "control.apps[2]",
            "control.apps[3].keys[1]",
            "control.apps[3].keys[2]"
        ],
        "{e}"
    );
    assert_eq!(
        e.0[0].message,
        r#"id "web" is already used by control.apps[0]"#
    );
    assert_eq!(e.0[1].message, "duplicate of control.apps[0]");
    assert_eq!(e.0[2].message, "duplicate of control.apps[3].keys[0]");
    assert!(!e.to_string().contains("shared-key"), "{e}");
}

#[test]
fn app_tables_are_checked_key_by_key() {
    let text = with_control(&format!(
        r#"[[control.apps]]
id = "web!"
name = "{}"
keys = ["web-key-0123456789", 5]
secret = "x"

[[control.apps]]
id = "ok"
name = "a\tb"
keys = "ok-key-0123456789"

[[control.apps]]
keys = ["nokey"]
"#,
        "n".repeat(129)
    ));
    let e = errs(&text, &[]);
    assert_eq!(
        e.paths(),
        vec![
            "control.apps[0].id",
            "control.apps[0].name",
            "control.apps[0].keys[1]",
            "control.apps[0].secret",
            "control.apps[1].name",
            "control.apps[1].keys",
            "control.apps[2].id",
            "control.apps[2].keys[0]",
        ],
        "{e}"
    );
    assert_eq!(
        e.0[0].message,
        "must be characters of A-Z a-z 0-9 _ - only, found '!'"
    );
    assert_eq!(e.0[1].message, "is 129 characters; at most 128 are allowed");
    assert_eq!(e.0[2].message, "expected a string, got an integer");
    assert_eq!(e.0[3].message, "unknown key");
    assert_eq!(e.0[4].message, "must not contain control characters");
    assert_eq!(e.0[5].message, "expected an array of strings, got a string");
    assert!(!e.to_string().contains("nokey"), "{e}");
}

// -------------------------------------------------------------- turn-urls

#[test]
fn turn_urls_take_rfc_7064_and_7065_syntax() {
    let urls = [
        "stun:turn.example.com",
        "stun:203.0.113.7:3478",
        "STUN:[2001:db8::7]:3478",
        "turn:turn.example.com:3478?transport=udp",
        "turn:[2001:db8::7]?transport=tcp",
        "turn:203.0.113.7",
        "turns:turn.example.com:5349?transport=tcp",
        "turns:turn.example.com.:443?transport=udp",
        "turn:turn_1.internal:3478",
    ];
    let list = urls
        .iter()
        .map(|u| format!("{u:?}"))
        .collect::<Vec<_>>()
        .join(", ");
    let c = ok(&with_control(&format!("turn-urls = [{list}]")));
    // Kept as written: they go to clients as they are.
    assert_eq!(c.control.unwrap().turn_urls, urls);
}

#[test]
fn bad_turn_urls_are_reported_each_at_its_index() {
    let cases = [
        ("stun:host?transport=udp", "a stun: URL takes no ?transport"),
        ("turn://host:3478", r#"no "//" after the scheme"#),
        (
            "turn:2001:db8::1:3478",
            "an IPv6 address must be in brackets",
        ),
        ("turn:[2001:db8::1", "an IPv6 address has no closing ']'"),
        ("turn:[not-v6]:3478", "not an IPv6 address inside [ ]"),
        ("turn:[::1]3478", "expected ':PORT' after the IPv6 address"),
        ("turn:host:0", "the port must be a number from 1 to 65535"),
        (
            "turn:host:70000",
            "the port must be a number from 1 to 65535",
        ),
        ("turn:host:+80", "the port must be a number from 1 to 65535"),
        (
            "turn:host?transport=sctp",
            "the only query allowed is ?transport=udp or ?transport=tcp",
        ),
        ("turn:", "the host is empty"),
        ("turn::3478", "the host is empty"),
        ("turn:user@host", "expected \"stun:HOST[:PORT]\""),
        ("turn:host/path", "expected \"stun:HOST[:PORT]\""),
        (
            "turn:bad host",
            "the host is not an IP address or a host name",
        ),
        (
            "turn:-bad.example",
            "the host is not an IP address or a host name",
        ),
        ("turn:a..b", "the host is not an IP address or a host name"),
        ("stuns:host", "unknown scheme \"stuns\""),
        ("host:3478", "unknown scheme \"host\""),
        ("nothing", "expected \"stun:HOST[:PORT]\""),
    ];
    for (url, start) in cases {
        let e = one_err(
            &with_control(&format!("turn-urls = [\"stun:ok.example\", {url:?}]")),
            &[],
        );
        assert_eq!(e.path, "control.turn-urls[1]", "{url}");
        assert!(e.message.starts_with(start), "{url}: {e}");
    }

    let e = one_err(&with_control("turn-urls = []"), &[]);
    assert_eq!(e.path, "control.turn-urls");
    assert!(e.message.starts_with("at least one URL is required"), "{e}");

    let e = one_err(
        &with_control(r#"turn-urls = ["stun:a.example", "turn:a.example", "STUN:a.example"]"#),
        &[],
    );
    assert_eq!(
        (e.path.as_str(), e.message.as_str()),
        ("control.turn-urls[2]", "duplicate of control.turn-urls[0]")
    );
}

#[test]
fn derived_turn_urls_cover_udp_tcp_and_tls_listeners_in_order() {
    let dir = Scratch::new("derived");
    let tls = format!(
        "[relay.tls]\ncert-file = {:?}\nkey-file = {:?}\n",
        dir.file("cert.pem", "c"),
        dir.file("key.pem", "k")
    );
    let relay = relay_listening(
        r#"["tls://192.0.2.10:5349", "tcp://192.0.2.10:3478", "udp://192.0.2.10:3478", "udp://[2001:db8::10]:3479", "tcp://[2001:db8::10]:3479"]"#,
        &tls,
    );
    let c = ok(&format!("{relay}{}", control_section("")));
    assert_eq!(
        c.control.unwrap().turn_urls,
        vec![
            "stun:192.0.2.10:3478",
            "stun:[2001:db8::10]:3479",
            "turn:192.0.2.10:3478?transport=udp",
            "turn:[2001:db8::10]:3479?transport=udp",
            "turn:192.0.2.10:3478?transport=tcp",
            "turn:[2001:db8::10]:3479?transport=tcp",
            "turns:192.0.2.10:5349?transport=tcp",
        ]
    );
}

#[test]
fn derived_turn_urls_advertise_the_external_ip_of_each_family() {
    // Wildcard IPv4 and a specific IPv4 address behind the same NAT give one
    // URL; the IPv6 listener has no external address and keeps its own.
    let relay = relay_listening(
        r#"["udp://0.0.0.0:3478", "udp://10.0.0.5:3478", "tcp://[2001:db8::5]:3478"]"#,
        "relay-ip = [\"10.0.0.5\", \"2001:db8::5\"]\nexternal-ip = \"203.0.113.7\"",
    );
    let c = ok(&format!("{relay}{}", control_section("")));
    assert_eq!(
        c.control.unwrap().turn_urls,
        vec![
            "stun:203.0.113.7:3478",
            "turn:203.0.113.7:3478?transport=udp",
            "turn:[2001:db8::5]:3478?transport=tcp",
        ]
    );

    // Both families behind a NAT: wildcards of both are fine.
    let relay = relay_listening(
        r#"["udp://0.0.0.0:3478", "udp://[::]:3478"]"#,
        "relay-ip = [\"10.0.0.5\", \"fd00::5\"]\nexternal-ip = [\"203.0.113.7\", \"2001:db8::7\"]",
    );
    let c = ok(&format!("{relay}{}", control_section("")));
    assert_eq!(
        c.control.unwrap().turn_urls,
        vec![
            "stun:203.0.113.7:3478",
            "stun:[2001:db8::7]:3478",
            "turn:203.0.113.7:3478?transport=udp",
            "turn:[2001:db8::7]:3478?transport=udp",
        ]
    );
}

#[test]
fn a_wildcard_listener_without_external_ip_needs_turn_urls() {
    let relay = relay_listening(
        r#"["udp://192.0.2.10:3478", "tcp://[::]:3478"]"#,
        "relay-ip = [\"192.0.2.10\", \"2001:db8::5\"]",
    );
    let e = one_err(&format!("{relay}{}", control_section("")), &[]);
    assert_eq!(e.path, "control.turn-urls");
    assert!(
        e.message.starts_with(
            "must be given: relay.listen[1] (tcp://[::]:3478) binds a wildcard address and \
             relay.external-ip has no IPv6 address"
        ),
        "{e}"
    );

    // From the environment, the message names the variable.
    let e = one_err(
        &with_control(""),
        &[
            ("TURNPIKE_RELAY_LISTEN", "udp://0.0.0.0:3478"),
            ("TURNPIKE_RELAY_RELAY_IP", "192.0.2.10"),
        ],
    );
    assert_eq!(e.path, "control.turn-urls");
    assert!(
        e.message
            .starts_with("must be given: env TURNPIKE_RELAY_LISTEN[0] (udp://0.0.0.0:3478)"),
        "{e}"
    );

    // Given explicitly, nothing is derived.
    let c = ok(&format!(
        "{relay}{}",
        control_section(
            "turn-urls = [\"turn:turn.example.com:3478\"]\npublic-url = \"https://x.example\""
        )
    ));
    let k = c.control.unwrap();
    assert_eq!(k.turn_urls, vec!["turn:turn.example.com:3478"]);
    assert!(!k.turn_urls_derived && !k.public_url_derived);
}

#[test]
fn derive_turn_urls_can_be_run_again_on_bound_addresses() {
    // A relay configured on port 0 is advertised on port 0 until the binary
    // derives the URLs again from what it bound.
    let c = ok_env(
        &with_control(""),
        &[("TURNPIKE_RELAY_LISTEN", "udp://127.0.0.1:0,tcp://[::1]:0")],
    );
    let k = c.control.as_ref().unwrap();
    assert!(k.turn_urls_derived);
    assert_eq!(k.turn_urls[0], "stun:127.0.0.1:0");
    let bound = vec![
        Listen {
            transport: Transport::Udp,
            addr: addr("127.0.0.1:40001"),
        },
        Listen {
            transport: Transport::Tcp,
            addr: addr("[::1]:40002"),
        },
    ];
    assert_eq!(
        derive_turn_urls(&bound, &c.relay.external_ips).unwrap(),
        vec![
            "stun:127.0.0.1:40001",
            "turn:127.0.0.1:40001?transport=udp",
            "turn:[::1]:40002?transport=tcp",
        ]
    );

    let wildcard = Listen {
        transport: Transport::Tls,
        addr: addr("0.0.0.0:5349"),
    };
    let e = derive_turn_urls(&[bound[0], wildcard], &RelayIps::default()).unwrap_err();
    assert_eq!(
        e,
        DeriveTurnUrlsError::Wildcard {
            index: 1,
            listen: wildcard
        }
    );
    assert_eq!(
        e.to_string(),
        "tls://0.0.0.0:5349 binds a wildcard address and there is no external IP of its family"
    );
    // An external IP of that family stands in for the wildcard.
    let external = RelayIps {
        v4: Some("203.0.113.7".parse().unwrap()),
        v6: None,
    };
    assert_eq!(
        derive_turn_urls(&[wildcard], &external).unwrap(),
        vec!["turns:203.0.113.7:5349?transport=tcp"]
    );
}

#[test]
fn a_bad_relay_adds_no_turn_urls_error() {
    let text = with_control("").replace("udp://192.0.2.10:3478", "dtls://192.0.2.10:3478");
    let e = one_err(&text, &[]);
    assert_eq!(e.path, "relay.listen[0]");
}

// ------------------------------------------------------------- public-url

#[test]
fn public_url_rules() {
    let cases = [
        (
            "https://turnpike.example.com/",
            "https://turnpike.example.com",
        ),
        (
            "HTTPS://turnpike.example.com",
            "https://turnpike.example.com",
        ),
        ("http://192.0.2.10:8080//", "http://192.0.2.10:8080"),
        (
            "https://example.com/turnpike/",
            "https://example.com/turnpike",
        ),
        ("http://[2001:db8::1]:8080", "http://[2001:db8::1]:8080"),
    ];
    for (given, stored) in cases {
        let c = ok(&with_control(&format!("public-url = {given:?}")));
        assert_eq!(c.control.unwrap().public_url, stored, "{given}");
    }

    let bad = [
        (
            "ftp://example.com",
            "the scheme must be http or https, got \"ftp\"",
        ),
        ("example.com", "expected an absolute URL like"),
        (
            "https://example.com/#join",
            "must not have a query or fragment",
        ),
        (
            "https://example.com?a=b",
            "must not have a query or fragment",
        ),
        (
            "https://user:pw@example.com",
            "must not contain a user name or password",
        ),
        ("https://", "the host is empty"),
        (
            "https://example.com:0",
            "the port must be a number from 1 to 65535",
        ),
        (
            "https://exa mple.com",
            "must not contain spaces or control characters",
        ),
    ];
    for (given, start) in bad {
        let e = one_err(&with_control(&format!("public-url = {given:?}")), &[]);
        assert_eq!(e.path, "control.public-url", "{given}");
        assert!(e.message.starts_with(start), "{given}: {e}");
    }
    // Never echo a password.
    let e = one_err(
        &with_control("public-url = \"https://u:hunter2@x.example\""),
        &[],
    );
    assert!(!e.message.contains("hunter2"), "{e}");
}

#[test]
fn a_wildcard_control_listen_needs_public_url() {
    let e = one_err(&with_control("listen = \"0.0.0.0:8080\""), &[]);
    assert_eq!(e.path, "control.public-url");
    assert!(
        e.message
            .starts_with("required when control.listen binds a wildcard address (0.0.0.0:8080)"),
        "{e}"
    );
    let e = one_err(
        &with_control(""),
        &[("TURNPIKE_CONTROL_LISTEN", "[::]:8080")],
    );
    assert_eq!(e.path, "control.public-url");
    assert!(
        e.message.starts_with(
            "required when env TURNPIKE_CONTROL_LISTEN binds a wildcard address ([::]:8080)"
        ),
        "{e}"
    );
    let c = ok(&with_control(
        "listen = \"0.0.0.0:8080\"\npublic-url = \"https://turnpike.example.com\"",
    ));
    let k = c.control.unwrap();
    assert_eq!(k.listen, addr("0.0.0.0:8080"));
    assert_eq!(k.public_url, "https://turnpike.example.com");
}

// ------------------------------------------------------------------ store

#[test]
fn redis_urls_are_checked_and_shown_redacted() {
    let cases = [
        (
            "redis://127.0.0.1:6379/0",
            "redis://127.0.0.1:6379/0",
            false,
        ),
        ("redis://localhost", "redis://localhost", false),
        (
            "redis://:s3cret-pw@redis.internal:6379/0",
            "redis://:***@redis.internal:6379/0",
            false,
        ),
        (
            "rediss://app:s3cret-pw@redis.example.com:6380/2",
            "rediss://app:***@redis.example.com:6380/2",
            true,
        ),
        (
            "redis://s3cret-pw@[::1]:6379",
            "redis://***@[::1]:6379",
            false,
        ),
        (
            "REDISS://redis.example.com/#insecure",
            "REDISS://redis.example.com/#insecure",
            true,
        ),
        (
            "redis://redis_1:6379/?protocol=resp3",
            "redis://redis_1:6379/?protocol=resp3",
            false,
        ),
    ];
    for (given, shown, tls) in cases {
        let c = ok(&format!("{RELAY}[store]\nredis-url = {given:?}\n"));
        let url = c.store.redis_url.unwrap();
        assert_eq!(url.expose(), given);
        assert_eq!(url.to_string(), shown, "{given}");
        assert_eq!(format!("{url:?}"), format!("RedisUrl({shown:?})"));
        assert_eq!(url.is_tls(), tls, "{given}");
    }

    let bad = [
        ("http://:s3cret-pw@localhost", "unknown scheme \"http\""),
        ("s3cret-pw@localhost", "expected \"redis://"),
        ("redis://:s3cret-pw@", "the host is empty"),
        (
            "redis://:s3cret-pw@host:99999",
            "the port must be a number from 1 to 65535",
        ),
        (
            "redis://:s3cret-pw@host/zero",
            "the database after the host must be a number",
        ),
        ("redis://:s3cret/pw@host", "a '@' after the host"),
        ("redis://:s3cret-pw@host name", "must not contain spaces"),
        (
            "redis://:s3cret:pw@2001:db8::1",
            "an IPv6 address must be in brackets",
        ),
    ];
    for (given, start) in bad {
        let e = one_err(&format!("{RELAY}[store]\nredis-url = {given:?}\n"), &[]);
        assert_eq!(e.path, "store.redis-url", "{given}");
        assert!(e.message.starts_with(start), "{given}: {e}");
        assert!(!e.message.contains("s3cret"), "{given}: {e}");
    }
}

// -------------------------------------------------------------------- env

#[test]
fn env_overrides_jwt_keys_apps_turn_urls_and_redis_url() {
    let c = ok_env(
        &with_control("apps = [\"file:file-key-0123456789\"]"),
        &[
            (
                "TURNPIKE_CONTROL_JWT_KEYS",
                &format!("k2:{JWT_SECRET}-2, k1:{JWT_SECRET}-1"),
            ),
            (
                "TURNPIKE_CONTROL_APPS",
                "web:web-key-0123456789,ios:ios-key-0123456789",
            ),
            (
                "TURNPIKE_CONTROL_TURN_URLS",
                "stun:turn.example.com:3478,turns:turn.example.com:5349?transport=tcp",
            ),
            (
                "TURNPIKE_STORE_REDIS_URL",
                "redis://:env-password@redis:6379/1",
            ),
            ("TURNPIKE_CONTROL_MAX_BODY", "2048"),
            ("TURNPIKE_CONTROL_TOKEN_TTL", "90s"),
        ],
    );
    let k = c.control.as_ref().unwrap();
    assert_eq!(
        k.jwt_keys
            .iter()
            .map(|j| (j.kid.as_str(), j.secret.expose().to_string()))
            .collect::<Vec<_>>(),
        vec![
            ("k2", format!("{JWT_SECRET}-2")),
            ("k1", format!("{JWT_SECRET}-1"))
        ]
    );
    // The file's apps are replaced; each env app has one key, named by its id.
    assert_eq!(
        k.apps
            .iter()
            .map(|a| (a.id.as_str(), a.name.as_str(), a.keys[0].expose()))
            .collect::<Vec<_>>(),
        vec![
            ("web", "web", "web-key-0123456789"),
            ("ios", "ios", "ios-key-0123456789")
        ]
    );
    assert_eq!(
        k.turn_urls,
        vec![
            "stun:turn.example.com:3478",
            "turns:turn.example.com:5349?transport=tcp"
        ]
    );
    assert_eq!(k.max_body, 2048);
    assert_eq!(k.token_ttl, Duration::from_secs(90));
    let redis = c.store.redis_url.as_ref().unwrap();
    assert_eq!(redis.expose(), "redis://:env-password@redis:6379/1");
    assert_eq!(redis.to_string(), "redis://:***@redis:6379/1");

    // An empty apps variable clears the file's apps.
    let c = ok_env(
        &with_control("apps = [\"file:file-key-0123456789\"]"),
        &[("TURNPIKE_CONTROL_APPS", "")],
    );
    assert!(c.control.unwrap().apps.is_empty());
}

#[test]
fn env_can_create_the_control_and_store_sections() {
    let c = ok_env(
        RELAY,
        &[
            ("TURNPIKE_CONTROL_HASH_KEY", HASH_KEY),
            ("TURNPIKE_CONTROL_JWT_KEYS", &format!("k1:{JWT_SECRET}")),
            ("TURNPIKE_CONTROL_ADMIN_TOKEN", "admin-token-0123456"),
            ("TURNPIKE_STORE_REDIS_URL", "redis://localhost"),
        ],
    );
    let k = c.control.unwrap();
    assert_eq!(k.hash_key.expose(), HASH_KEY);
    assert_eq!(k.admin_token.unwrap().expose(), "admin-token-0123456");
    assert_eq!(k.public_url, "http://127.0.0.1:8080");
    assert!(c.store.redis_url.is_some());

    // One control variable makes the section, which then needs the rest.
    let e = errs(RELAY, &[("TURNPIKE_CONTROL_LISTEN", "127.0.0.1:8081")]);
    assert_eq!(
        e.paths(),
        vec!["control.hash-key", "control.jwt-keys"],
        "{e}"
    );
}

#[test]
fn bad_env_items_name_the_variable_and_never_the_secret() {
    let e = errs(
        &with_control(""),
        &[
            (
                "TURNPIKE_CONTROL_JWT_KEYS",
                &format!("k1:{JWT_SECRET},just-a-secret-value,k1:{JWT_SECRET}-x,k/2:short-jwt"),
            ),
            (
                "TURNPIKE_CONTROL_APPS",
                "web:short-key,:nameless-key-0123456789,ios:ios-key-0123456789,ios:other-key-0123456789",
            ),
            ("TURNPIKE_CONTROL_TURN_URLS", "stun:ok.example,turn://bad"),
            ("TURNPIKE_STORE_REDIS_URL", "redis://:env-password@"),
            ("TURNPIKE_CONTROL_HASH_KEY", "short-hash"),
        ],
    );
    assert_eq!(
        e.paths(),
        vec![
            "env TURNPIKE_CONTROL_HASH_KEY",
            "env TURNPIKE_CONTROL_JWT_KEYS[1]",
            "env TURNPIKE_CONTROL_JWT_KEYS[3]",
            "env TURNPIKE_CONTROL_JWT_KEYS[3]",
            "env TURNPIKE_CONTROL_TURN_URLS[1]",
            "env TURNPIKE_CONTROL_APPS[0]",
            "env TURNPIKE_CONTROL_APPS[1]",
            "env TURNPIKE_STORE_REDIS_URL",
        ],
        "{e}"
    );
    assert_eq!(
        e.0[1].message,
        r#"expected "KID:SECRET" (or a table { kid, secret }), found no ':'"#
    );
    assert_eq!(
        e.0[5].message,
        "key: too short: 9 bytes, at least 16 are required"
    );
    assert!(
        e.0[6].message.starts_with("id: must be 1 to 64 characters"),
        "{e}"
    );
    let shown = e.to_string();
    for secret in [
        "just-a-secret",
        "short-jwt",
        "short-key",
        "nameless",
        "env-password",
        "short-hash",
    ] {
        assert!(!shown.contains(secret), "{secret} in:\n{shown}");
    }

    // With every item well-formed, duplicates are found, named by variable.
    let e = errs(
        &with_control(""),
        &[
            (
                "TURNPIKE_CONTROL_JWT_KEYS",
                &format!("k1:{JWT_SECRET},k1:{JWT_SECRET}-x"),
            ),
            (
                "TURNPIKE_CONTROL_APPS",
                "ios:ios-key-0123456789,ios:other-key-0123456789,web:ios-key-0123456789",
            ),
        ],
    );
    assert_eq!(
        e.paths(),
        vec![
            "env TURNPIKE_CONTROL_JWT_KEYS[1]",
            "env TURNPIKE_CONTROL_APPS[1]",
            "env TURNPIKE_CONTROL_APPS[2]",
        ],
        "{e}"
    );
    assert_eq!(
        e.0[0].message,
        r#"kid "k1" is already used by env TURNPIKE_CONTROL_JWT_KEYS[0]"#
    );
    assert_eq!(
        e.0[1].message,
        r#"id "ios" is already used by env TURNPIKE_CONTROL_APPS[0]"#
    );
    assert_eq!(e.0[2].message, "duplicate of env TURNPIKE_CONTROL_APPS[0]");

    // An empty jwt-keys variable is no key.
    let e = one_err(&with_control(""), &[("TURNPIKE_CONTROL_JWT_KEYS", "")]);
    assert_eq!(e.path, "env TURNPIKE_CONTROL_JWT_KEYS");
    assert!(e.message.starts_with("at least one key is required"), "{e}");
}

// -------------------------------------------------------------- redaction

#[test]
fn debug_output_shows_no_secret_and_no_redis_password() {
    let text = format!(
        "{}[store]\nredis-url = \"rediss://app:redis-password-123@redis.example.com:6380/0\"\n",
        with_control(
            "admin-token = \"admin-token-secret-1\"\napps = [\"web:app-key-secret-12345\", { id = \"ios\", keys = [\"app-key-secret-67890\"] }]"
        )
    );
    let c = ok(&text);
    let dump = format!("{c:?} {c:#?}");
    for secret in [
        "0123456789abcdef",
        HASH_KEY,
        JWT_SECRET,
        "admin-token-secret",
        "app-key-secret",
        "redis-password",
    ] {
        assert!(!dump.contains(secret), "{secret} in {dump}");
    }
    // What is not secret is still there to debug with.
    for shown in [
        "k1",
        "web",
        "ios",
        "rediss://app:***@redis.example.com:6380/0",
        "Secret(<redacted>)",
    ] {
        assert!(dump.contains(shown), "{shown} not in {dump}");
    }

    // Generated values are no different.
    let c = load(None, &[]).unwrap();
    let dump = format!("{c:?}");
    let k = c.control.as_ref().unwrap();
    for secret in [
        c.relay.secrets[0].expose(),
        k.hash_key.expose(),
        k.jwt_keys[0].secret.expose(),
        k.apps[0].keys[0].expose(),
    ] {
        assert!(!dump.contains(secret), "a generated secret in {dump}");
    }
}

// --------------------------------------------------------------- embedded

#[test]
fn the_embedded_default_generates_the_control_secrets_and_a_dev_app() {
    let c = load(None, &[]).unwrap();
    assert!(c.is_embedded());
    assert_eq!(
        c.generated,
        Generated {
            relay_secret: true,
            admin_token: true,
            hash_key: true,
            jwt_key: true,
            app: true,
        }
    );
    let k = c.control.as_ref().unwrap();
    assert_eq!(k.listen, addr("127.0.0.1:8080"));
    assert_eq!(k.public_url, "http://127.0.0.1:8080");
    assert_eq!(k.admin_token.as_ref().map(|t| t.expose().len()), Some(43));
    assert_eq!(
        k.turn_urls,
        vec![
            "stun:127.0.0.1:3478",
            "turn:127.0.0.1:3478?transport=udp",
            "turn:127.0.0.1:3478?transport=tcp",
        ]
    );
    assert_eq!(k.hash_key.expose().len(), 43);
    assert_eq!(k.jwt_keys.len(), 1);
    assert_eq!(k.jwt_keys[0].kid, "dev");
    assert_eq!(k.jwt_keys[0].secret.expose().len(), 43);
    assert_eq!(k.apps.len(), 1);
    let app = c.generated_app().unwrap();
    assert_eq!((app.id.as_str(), app.name.as_str()), ("dev", "Development"));
    assert_eq!(app.keys.len(), 1);
    let key = app.keys[0].expose();
    assert!(
        key.starts_with("tpk_") && key.len() == 4 + 43,
        "{}",
        key.len()
    );
    assert_eq!(c.store.redis_url, None);

    // Every value is new at every load, and no two are the same.
    let again = load(None, &[]).unwrap();
    let k2 = again.control.as_ref().unwrap();
    assert_ne!(k.hash_key, k2.hash_key);
    assert_ne!(k.admin_token, k2.admin_token);
    assert_ne!(k.jwt_keys[0].secret, k2.jwt_keys[0].secret);
    assert_ne!(app.keys[0], again.generated_app().unwrap().keys[0]);
    assert_ne!(k.hash_key, k.jwt_keys[0].secret);
}

#[test]
fn the_embedded_default_takes_control_values_from_env_instead_of_generating() {
    let c = load(
        None,
        &env(&[
            ("TURNPIKE_CONTROL_HASH_KEY", HASH_KEY),
            ("TURNPIKE_CONTROL_JWT_KEYS", &format!("prod:{JWT_SECRET}")),
            ("TURNPIKE_CONTROL_APPS", "web:web-key-0123456789"),
            ("TURNPIKE_CONTROL_ADMIN_TOKEN", "admin-token-0123456789"),
        ]),
    )
    .unwrap();
    assert_eq!(
        c.generated,
        Generated {
            relay_secret: true,
            ..Generated::default()
        }
    );
    assert_eq!(
        c.control
            .as_ref()
            .unwrap()
            .admin_token
            .as_ref()
            .unwrap()
            .expose(),
        "admin-token-0123456789"
    );
    assert!(c.generated_app().is_none());
    let k = c.control.unwrap();
    assert_eq!(k.hash_key.expose(), HASH_KEY);
    assert_eq!(k.jwt_keys[0].kid, "prod");
    assert_eq!(k.apps[0].id, "web");

    // An empty apps variable means no apps, not the dev app.
    let c = load(None, &env(&[("TURNPIKE_CONTROL_APPS", "")])).unwrap();
    assert!(!c.generated.app);
    assert!(c.control.unwrap().apps.is_empty());

    // A bad override is an error even here, not replaced by a generated value.
    let e = load(None, &env(&[("TURNPIKE_CONTROL_HASH_KEY", "short")])).unwrap_err();
    assert_eq!(e.paths(), vec!["env TURNPIKE_CONTROL_HASH_KEY"]);
}

#[test]
fn a_file_never_gets_generated_values() {
    let text = format!("{RELAY}[control]\n");
    let e = errs(&text, &[]);
    assert_eq!(e.paths(), vec!["control.hash-key", "control.jwt-keys"]);
    // The same text as the embedded source gets them.
    let c = parse_with_source(&text, &[], Source::Embedded).unwrap();
    assert!(c.generated.hash_key && c.generated.jwt_key && c.generated.app);
    // The relay secret was given: not generated.
    assert!(!c.generated.relay_secret);
}

#[test]
fn trusted_proxies_are_networks_from_the_file_or_the_environment() {
    let k = ok(&with_control("")).control.unwrap();
    assert!(
        k.trusted_proxies.is_empty(),
        "no proxy is trusted by default"
    );

    let k = ok(&with_control(
        "trusted-proxies = [\"10.0.0.0/8\", \"192.0.2.1\", \"fd00::/8\"]",
    ))
    .control
    .unwrap();
    let shown: Vec<String> = k.trusted_proxies.iter().map(|n| n.to_string()).collect();
    assert_eq!(shown, ["10.0.0.0/8", "192.0.2.1/32", "fd00::/8"]);

    let k = ok_env(
        &with_control("trusted-proxies = [\"10.0.0.0/8\"]"),
        &[("TURNPIKE_CONTROL_TRUSTED_PROXIES", "127.0.0.1, ::1")],
    )
    .control
    .unwrap();
    let shown: Vec<String> = k.trusted_proxies.iter().map(|n| n.to_string()).collect();
    assert_eq!(
        shown,
        ["127.0.0.1/32", "::1/128"],
        "the environment replaces the file"
    );

    // Every bad item is named at once.
    let e = errs(
        &with_control("trusted-proxies = [\"10.0.0.0/33\", \"proxy.example\", \"10.0.0.1\"]"),
        &[],
    );
    let paths: Vec<&str> = e.0.iter().map(|e| e.path.as_str()).collect();
    assert_eq!(
        paths,
        ["control.trusted-proxies[0]", "control.trusted-proxies[1]"],
        "{e}"
    );
}
