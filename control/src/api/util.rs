//! Small helpers shared by the handlers: timestamps, input validation, client addresses.

use std::net::IpAddr;
use std::ops::RangeInclusive;
use std::time::{Duration, UNIX_EPOCH};

use super::ApiError;
use crate::store::Millis;

/// Seconds allowed for `ttl` fields: at least a minute (shorter is a client bug: clocks skew
/// and people take time to click), at most a day (long-lived secrets are what this avoids).
pub(crate) const TTL_RANGE: RangeInclusive<u64> = 60..=86_400;

/// Longest display name, in characters: fits a participant tile.
const NAME_MAX_CHARS: usize = 64;

/// Longest free-text field (app and call names, user ids), in characters: ids from the
/// consumer's own system (UUIDs, emails) fit with room to spare.
const TEXT_MAX_CHARS: usize = 128;

/// The last second humantime formats (9999-12-31T23:59:59Z); later times would panic it.
const MAX_RFC3339_S: u64 = 253_402_300_799;

/// RFC 3339 UTC, whole seconds (`2025-01-02T03:04:05Z`), of a Unix time in milliseconds.
pub(crate) fn rfc3339_ms(ms: Millis) -> String {
    rfc3339_s(ms / 1000)
}

/// RFC 3339 UTC of a Unix time in seconds.
pub(crate) fn rfc3339_s(s: u64) -> String {
    let t = UNIX_EPOCH + Duration::from_secs(s.min(MAX_RFC3339_S));
    humantime::format_rfc3339_seconds(t).to_string()
}

/// A `ttl` field: `default` when absent, else within [`TTL_RANGE`].
pub(crate) fn ttl(field: &str, value: Option<u64>, default: u64) -> Result<u64, ApiError> {
    match value {
        None => Ok(default),
        Some(v) if TTL_RANGE.contains(&v) => Ok(v),
        Some(_) => Err(ApiError::InvalidRequest(format!(
            "{field}: must be {}..={} seconds",
            TTL_RANGE.start(),
            TTL_RANGE.end()
        ))),
    }
}

/// A participant's display name: trimmed, 1..=64 characters, no control characters.
pub(crate) fn display_name(field: &str, value: &str) -> Result<String, ApiError> {
    text(field, value, NAME_MAX_CHARS)
}

/// A free-text field (app or call name, user id): trimmed, 1..=128 characters, no control
/// characters.
pub(crate) fn short_text(field: &str, value: &str) -> Result<String, ApiError> {
    text(field, value, TEXT_MAX_CHARS)
}

fn text(field: &str, value: &str, max: usize) -> Result<String, ApiError> {
    let value = value.trim();
    let chars = value.chars().count();
    if chars == 0 || chars > max {
        return Err(ApiError::InvalidRequest(format!(
            "{field}: must be 1..={max} characters"
        )));
    }
    // Control characters (newlines, terminal escapes) would let a name forge lines in the
    // logs or terminals of whoever displays it.
    if value.chars().any(char::is_control) {
        return Err(ApiError::InvalidRequest(format!(
            "{field}: must not contain control characters"
        )));
    }
    Ok(value.to_owned())
}

/// An app id given by the operator: 1..=64 of `A-Z a-z 0-9 _ -` (it appears in URLs).
pub(crate) fn app_id(value: &str) -> Result<String, ApiError> {
    let ok = (1..=64).contains(&value.len())
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if ok {
        Ok(value.to_owned())
    } else {
        Err(ApiError::InvalidRequest(
            "id: must be 1..=64 of A-Z, a-z, 0-9, `_` and `-`".to_owned(),
        ))
    }
}

/// The rate-limit identity of a client address: an IPv4 address, or an IPv6 /64 (one
/// subscriber usually gets a whole /64, so counting single IPv6 addresses limits nobody).
/// IPv4-mapped IPv6 addresses count as the IPv4 address.
pub(crate) fn client_key(ip: IpAddr) -> String {
    match crate::client::source_of(ip) {
        IpAddr::V4(v4) => v4.to_string(),
        IpAddr::V6(v6) => {
            let s = v6.segments();
            format!("{:x}:{:x}:{:x}:{:x}::/64", s[0], s[1], s[2], s[3])
        }
    }
}

/// `Retry-After` seconds for a window ending in `ms` milliseconds: rounded up, at least 1.
pub(crate) fn retry_after_s(ms: u64) -> u64 {
    ms.div_ceil(1000).max(1)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn client_keys() {
        let key = |s: &str| client_key(s.parse().unwrap());
        assert_eq!(key("192.0.2.7"), "192.0.2.7");
        assert_eq!(key("::ffff:192.0.2.7"), "192.0.2.7");
        assert_eq!(key("2001:db8:1:2:3:4:5:6"), "2001:db8:1:2::/64");
        assert_eq!(key("2001:db8:1:2:ffff::1"), "2001:db8:1:2::/64");
    }

    #[test]
    fn names() {
        assert_eq!(display_name("name", "  Ada  ").ok().as_deref(), Some("Ada"));
        assert!(display_name("name", "   ").is_err());
        assert!(display_name("name", "a\nb").is_err());
        assert!(display_name("name", &"é".repeat(64)).is_ok());
        assert!(display_name("name", &"é".repeat(65)).is_err());
    }

    #[test]
    fn retry_after_rounds_up() {
        assert_eq!(retry_after_s(0), 1);
        assert_eq!(retry_after_s(1), 1);
        assert_eq!(retry_after_s(1001), 2);
        assert_eq!(retry_after_s(60_000), 60);
    }

    #[test]
    fn timestamps() {
        assert_eq!(rfc3339_ms(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339_s(1_700_000_000), "2023-11-14T22:13:20Z");
        assert_eq!(rfc3339_s(u64::MAX), "9999-12-31T23:59:59Z");
    }
}
