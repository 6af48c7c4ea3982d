//! The static table of every accepted key.
//!
//! Environment variable names are built from this table (never guessed
//! from a variable's name), and a test checks that the example file shows
//! every key in it (the `[relay.tls]` keys and `store.redis-url` in
//! commented-out lines, since the example cannot point at real certificate
//! files and its default, no Redis, is what most readers want).

/// How a key's value is written. Decides how an environment override (which
/// is always text) becomes a TOML value before the normal checks run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ValueKind {
    /// Taken verbatim as a TOML string (addresses, port ranges, names,
    /// file paths).
    String,
    /// Parsed as a TOML integer.
    Integer,
    /// Taken as a string and read like "30s", "10m", "1h".
    Duration,
    /// A list of strings; in the environment, comma-separated (an empty
    /// value is an empty list).
    List,
    /// One string, or a list of strings (`relay-ip = "203.0.113.7"` or
    /// `relay-ip = ["203.0.113.7", "2001:db8::7"]`); in the environment,
    /// comma-separated like [`ValueKind::List`].
    StringOrList,
    /// A list of named secrets: each item is a small inline table
    /// (`jwt-keys`: `{ kid = "…", secret = "…" }`; `apps`: `[[control.apps]]`
    /// with `id`, `name` and `keys`) or the string `"NAME:SECRET"` (a jwt
    /// key `"kid:secret"`, an app `"id:key"` with one key and its id as
    /// name). The name never contains `:`, so the first `:` ends it.
    ///
    /// In the environment: comma-separated `NAME:SECRET` items, each taken
    /// as that string form (`TURNPIKE_CONTROL_JWT_KEYS=k2:SECRET2,k1:SECRET1`,
    /// `TURNPIKE_CONTROL_APPS=web:KEY1,ios:KEY2`), so an override goes through
    /// exactly the checks a file's item does; an empty value is an empty
    /// list. A secret given this way cannot contain a comma.
    NamedSecrets,
}

/// One accepted key: `[section] name`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Key {
    /// The TOML table the key lives in (`relay`, `control`, `store`,
    /// `signal`, `admin`, `log`), dotted
    /// for a nested table (`relay.tls`).
    pub section: &'static str,
    /// The key inside that table, as written in TOML (`user-quota`).
    pub name: &'static str,
    /// How the value is written.
    pub kind: ValueKind,
}

impl Key {
    /// The dotted path used in error messages: `relay.user-quota`,
    /// `relay.tls.cert-file`.
    pub fn path(&self) -> String {
        format!("{}.{}", self.section, self.name)
    }

    /// The environment variable that overrides this key:
    /// `TURNPIKE_` + SECTION + `_` + KEY, uppercased, `-` and `.` → `_`
    /// (`TURNPIKE_RELAY_USER_QUOTA`, `TURNPIKE_RELAY_TLS_CERT_FILE`).
    pub fn env_var(&self) -> String {
        format!("{ENV_PREFIX}{}_{}", shout(self.section), shout(self.name))
    }
}

fn shout(s: &str) -> String {
    s.to_ascii_uppercase().replace(['-', '.'], "_")
}

/// Every environment variable that `conf` looks at starts with this.
pub const ENV_PREFIX: &str = "TURNPIKE_";

/// Reserved for the binary (the path of the configuration file); `conf`
/// ignores it instead of reporting it as an unknown variable.
pub const ENV_CONFIG_PATH: &str = "TURNPIKE_CONFIG";

const fn key(section: &'static str, name: &'static str, kind: ValueKind) -> Key {
    Key {
        section,
        name,
        kind,
    }
}

/// Every key the configuration accepts, in the order the example file
/// documents them.
pub const SCHEMA: &[Key] = &[
    key("relay", "realm", ValueKind::String),
    key("relay", "listen", ValueKind::List),
    key("relay", "external-ip", ValueKind::StringOrList),
    key("relay", "relay-ip", ValueKind::StringOrList),
    key("relay", "relay-ports", ValueKind::String),
    key("relay", "secrets", ValueKind::List),
    key("relay", "allow-peers", ValueKind::List),
    key("relay", "deny-peers", ValueKind::List),
    key("relay", "user-quota", ValueKind::Integer),
    key("relay", "total-quota", ValueKind::Integer),
    key("relay", "max-permissions", ValueKind::Integer),
    key("relay", "challenge-rate", ValueKind::Integer),
    key("relay", "max-lifetime", ValueKind::Duration),
    key("relay", "nonce-lifetime", ValueKind::Duration),
    key("relay", "threads", ValueKind::Integer),
    key("relay", "grace-period", ValueKind::Duration),
    key("relay", "max-connections-per-ip", ValueKind::Integer),
    key("relay", "handshake-timeout", ValueKind::Duration),
    key("relay", "idle-timeout", ValueKind::Duration),
    key("relay", "max-frame", ValueKind::Integer),
    key("relay", "stream-queue", ValueKind::Integer),
    key("relay", "write-timeout", ValueKind::Duration),
    key("relay.tls", "cert-file", ValueKind::String),
    key("relay.tls", "key-file", ValueKind::String),
    key("control", "listen", ValueKind::String),
    key("control", "public-url", ValueKind::String),
    key("control", "admin-token", ValueKind::String),
    key("control", "hash-key", ValueKind::String),
    key("control", "jwt-keys", ValueKind::NamedSecrets),
    key("control", "turn-urls", ValueKind::List),
    key("control", "credential-ttl", ValueKind::Duration),
    key("control", "token-ttl", ValueKind::Duration),
    key("control", "max-body", ValueKind::Integer),
    key("control", "request-timeout", ValueKind::Duration),
    key("control", "trusted-proxies", ValueKind::List),
    key("control", "apps", ValueKind::NamedSecrets),
    key("store", "redis-url", ValueKind::String),
    key("signal", "listen", ValueKind::String),
    key("signal", "allowed-origins", ValueKind::List),
    key("signal", "auth-timeout", ValueKind::Duration),
    key("signal", "ping-interval", ValueKind::Duration),
    key("signal", "idle-timeout", ValueKind::Duration),
    key("signal", "max-message", ValueKind::Integer),
    key("signal", "message-rate", ValueKind::Integer),
    key("signal", "message-burst", ValueKind::Integer),
    key("signal", "send-queue", ValueKind::Integer),
    key("signal", "write-timeout", ValueKind::Duration),
    key("signal", "resume-window", ValueKind::Duration),
    key("signal", "empty-timeout", ValueKind::Duration),
    key("signal", "node-timeout", ValueKind::Duration),
    key("signal", "max-connections", ValueKind::Integer),
    key("signal", "max-unauthenticated-per-ip", ValueKind::Integer),
    key("admin", "listen", ValueKind::String),
    key("log", "level", ValueKind::String),
];
