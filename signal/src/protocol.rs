//! The signaling protocol, version 1: JSON text frames `{"v":1,"type":…}` (see
//! `docs/signaling.md` for every message with examples).
//!
//! Client messages are parsed in two steps — first the envelope (`v`, `type`), then the body for
//! that type — so that an unknown type and a known type with bad fields get different, precise
//! errors, and so that the metric label comes from a fixed set, never from attacker text.

use control::creds::IceServer;
use control::store::{Media, Role};
use serde::{Deserialize, Serialize};

/// The protocol version this server speaks.
pub const VERSION: u32 = 1;

/// Longest SDP accepted in an offer or answer. Browsers' SDPs for a few tracks are 2–10 KB; the
/// frame limit (`signal.max-message`) bounds it too, this only keeps a clear error for a huge
/// field inside an allowed frame.
pub const MAX_SDP: usize = 60 * 1024;

/// Longest peer id accepted in `to` (ours are `p_` + 22 characters).
const MAX_PEER_ID: usize = 64;

/// A message from a client.
#[derive(Debug, Clone, PartialEq)]
pub enum ClientMsg {
    /// The first message: the `signal_token` from `/v1/join`.
    Auth {
        /// The JWT.
        token: String,
    },
    /// An SDP offer for one peer.
    Offer {
        /// Addressee.
        to: String,
        /// The SDP.
        sdp: String,
    },
    /// An SDP answer for one peer.
    Answer {
        /// Addressee.
        to: String,
        /// The SDP.
        sdp: String,
    },
    /// An ICE candidate (an `RTCIceCandidateInit` object, or `null` for end-of-candidates).
    Candidate {
        /// Addressee.
        to: String,
        /// The candidate, passed through as given.
        candidate: serde_json::Value,
    },
    /// What this peer sends now.
    Media(Media),
    /// A quality report (validated by `crate::quality`).
    Stats(serde_json::Value),
    /// Leaving for good (no resume).
    Leave,
    /// Keep-alive; answered with `pong`.
    Ping,
}

/// Why a client message was refused. The `code` goes to the client in an `error` message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    /// Not JSON, or not a JSON object.
    #[error("message is not a JSON object")]
    NotJson,
    /// `v` missing or not 1.
    #[error("unsupported protocol version (expected \"v\":1)")]
    Version,
    /// `type` missing or not a string.
    #[error("message has no \"type\"")]
    NoType,
    /// A `type` this server does not know.
    #[error("unknown message type")]
    UnknownType,
    /// A known type with missing, extra or mistyped fields.
    #[error("invalid {0} message: {1}")]
    Invalid(&'static str, String),
}

impl ParseError {
    /// The stable code sent to the client.
    pub fn code(&self) -> &'static str {
        match self {
            Self::NotJson | Self::NoType | Self::Invalid(..) => "invalid_message",
            Self::Version => "unsupported_version",
            Self::UnknownType => "unknown_type",
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AuthBody {
    token: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SdpBody {
    to: String,
    sdp: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CandidateBody {
    to: String,
    candidate: serde_json::Value,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MediaBody {
    audio: bool,
    video: bool,
    screen: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Empty {}

/// The metric label of a message type: one of a fixed set (`unknown` for anything else).
pub fn type_label(t: &str) -> &'static str {
    match t {
        "auth" => "auth",
        "offer" => "offer",
        "answer" => "answer",
        "candidate" => "candidate",
        "media" => "media",
        "stats" => "stats",
        "leave" => "leave",
        "ping" => "ping",
        _ => "unknown",
    }
}

/// Parses one text frame. Returns the type label (for metrics) with the result, so a refused
/// message is still counted under the type it claimed.
pub fn parse(text: &str) -> (&'static str, Result<ClientMsg, ParseError>) {
    // serde_json refuses nesting deeper than 128 levels, so deep JSON is an error, not a stack
    // overflow.
    let Ok(serde_json::Value::Object(mut obj)) = serde_json::from_str::<serde_json::Value>(text)
    else {
        return ("invalid", Err(ParseError::NotJson));
    };
    let label = match obj.get("type") {
        Some(serde_json::Value::String(t)) => type_label(t),
        _ => return ("invalid", Err(ParseError::NoType)),
    };
    if obj.get("v").and_then(serde_json::Value::as_u64) != Some(u64::from(VERSION)) {
        return (label, Err(ParseError::Version));
    }
    obj.remove("v");
    obj.remove("type");
    let body = serde_json::Value::Object(obj);
    let invalid = |e: serde_json::Error| ParseError::Invalid(label, e.to_string());
    let msg = match label {
        "auth" => serde_json::from_value::<AuthBody>(body)
            .map(|b| ClientMsg::Auth { token: b.token })
            .map_err(invalid),
        "offer" | "answer" => serde_json::from_value::<SdpBody>(body)
            .map_err(invalid)
            .and_then(|b| {
                check_to(label, &b.to)?;
                if b.sdp.len() > MAX_SDP {
                    return Err(ParseError::Invalid(label, "sdp too long".into()));
                }
                Ok(if label == "offer" {
                    ClientMsg::Offer {
                        to: b.to,
                        sdp: b.sdp,
                    }
                } else {
                    ClientMsg::Answer {
                        to: b.to,
                        sdp: b.sdp,
                    }
                })
            }),
        "candidate" => serde_json::from_value::<CandidateBody>(body)
            .map_err(invalid)
            .and_then(|b| {
                check_to(label, &b.to)?;
                if !(b.candidate.is_object() || b.candidate.is_null()) {
                    return Err(ParseError::Invalid(
                        label,
                        "candidate must be an object or null".into(),
                    ));
                }
                Ok(ClientMsg::Candidate {
                    to: b.to,
                    candidate: b.candidate,
                })
            }),
        "media" => serde_json::from_value::<MediaBody>(body)
            .map(|b| {
                ClientMsg::Media(Media {
                    audio: b.audio,
                    video: b.video,
                    screen: b.screen,
                })
            })
            .map_err(invalid),
        "stats" => Ok(ClientMsg::Stats(body)),
        "leave" => serde_json::from_value::<Empty>(body)
            .map(|_| ClientMsg::Leave)
            .map_err(invalid),
        "ping" => serde_json::from_value::<Empty>(body)
            .map(|_| ClientMsg::Ping)
            .map_err(invalid),
        _ => Err(ParseError::UnknownType),
    };
    (label, msg)
}

fn check_to(label: &'static str, to: &str) -> Result<(), ParseError> {
    if to.is_empty() || to.len() > MAX_PEER_ID {
        return Err(ParseError::Invalid(label, "bad \"to\"".into()));
    }
    Ok(())
}

/// A peer as shown to the others (`welcome.peers[]`, `peer_joined.peer`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerView {
    /// Its id: the `to` of messages for it.
    pub peer_id: String,
    /// Display name.
    pub name: String,
    /// Host or guest.
    pub role: Role,
    /// What it sends.
    pub media: Media,
}

/// A message from the server.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerMsg {
    /// Authenticated: who you are, who is here, how to reach the relay.
    Welcome {
        /// Your peer id.
        peer_id: String,
        /// The call.
        call_id: String,
        /// The other peers present.
        peers: Vec<PeerView>,
        /// `iceServers` for `RTCPeerConnection`.
        ice_servers: Vec<IceServer>,
        /// When their credentials expire (Unix seconds); fresh ones come before that.
        ice_servers_expire_at: u64,
        /// Send `ping` at least this often (the server closes idle sockets).
        ping_interval_ms: u64,
        /// True when this connection resumed an earlier one (the others saw nothing).
        resumed: bool,
    },
    /// Someone joined.
    PeerJoined {
        /// Who.
        peer: PeerView,
    },
    /// Someone left.
    PeerLeft {
        /// Who.
        peer_id: String,
        /// `leave`, `timeout`, `kicked`, `node_lost`, …
        reason: String,
    },
    /// A relayed offer.
    Offer {
        /// The sender.
        from: String,
        /// Its SDP.
        sdp: String,
    },
    /// A relayed answer.
    Answer {
        /// The sender.
        from: String,
        /// Its SDP.
        sdp: String,
    },
    /// A relayed candidate.
    Candidate {
        /// The sender.
        from: String,
        /// As the sender gave it.
        candidate: serde_json::Value,
    },
    /// Another peer's media state.
    Media {
        /// Whose.
        from: String,
        /// Microphone on.
        audio: bool,
        /// Camera on.
        video: bool,
        /// Screen shared.
        screen: bool,
    },
    /// Fresh TURN credentials (sent at 80 % of the old ones' lifetime).
    IceServers {
        /// `iceServers` for `RTCPeerConnection.setConfiguration`.
        ice_servers: Vec<IceServer>,
        /// When these expire (Unix seconds).
        ice_servers_expire_at: u64,
    },
    /// A fresh signaling token (sent at 80 % of the current one's lifetime), for reconnecting:
    /// `auth` happens once per socket, so without it a socket that drops after the token
    /// expired could never resume.
    Token {
        /// The JWT, for the next `auth`.
        token: String,
        /// When it expires (Unix seconds; its `exp`).
        expires_at: u64,
    },
    /// The call is over; the socket closes next.
    CallEnded {
        /// `api`, `empty`, `expired`.
        reason: String,
    },
    /// A refused message or a refusal before closing.
    Error {
        /// Stable code.
        code: String,
        /// Human text.
        message: String,
    },
    /// Answer to `ping`.
    Pong,
}

impl ServerMsg {
    /// The metric label (fixed set).
    pub fn label(&self) -> &'static str {
        match self {
            Self::Welcome { .. } => "welcome",
            Self::PeerJoined { .. } => "peer_joined",
            Self::PeerLeft { .. } => "peer_left",
            Self::Offer { .. } => "offer",
            Self::Answer { .. } => "answer",
            Self::Candidate { .. } => "candidate",
            Self::Media { .. } => "media",
            Self::IceServers { .. } => "ice_servers",
            Self::Token { .. } => "token",
            Self::CallEnded { .. } => "call_ended",
            Self::Error { .. } => "error",
            Self::Pong => "pong",
        }
    }

    /// An `error` message.
    pub fn error(code: &str, message: impl Into<String>) -> Self {
        Self::Error {
            code: code.to_owned(),
            message: message.into(),
        }
    }

    /// The frame text: `{"v":1,"type":…,…}`.
    pub fn to_text(&self) -> String {
        #[derive(Serialize)]
        struct Out<'a> {
            v: u32,
            #[serde(flatten)]
            msg: &'a ServerMsg,
        }
        // Strings, numbers, bools and `serde_json::Value`s always serialize.
        serde_json::to_string(&Out {
            v: VERSION,
            msg: self,
        })
        .unwrap_or_default()
    }

    /// The message as JSON, for the bus (the same object [`ServerMsg::to_text`] writes).
    pub fn to_value(&self) -> serde_json::Value {
        serde_json::from_str(&self.to_text()).unwrap_or(serde_json::Value::Null)
    }

    /// The metric label of an already serialized message (`{"v":1,"type":"X",…}`): messages
    /// from other nodes arrive as JSON.
    pub fn label_of(value: &serde_json::Value) -> &'static str {
        match value.get("type").and_then(serde_json::Value::as_str) {
            Some("welcome") => "welcome",
            Some("peer_joined") => "peer_joined",
            Some("peer_left") => "peer_left",
            Some("offer") => "offer",
            Some("answer") => "answer",
            Some("candidate") => "candidate",
            Some("media") => "media",
            Some("ice_servers") => "ice_servers",
            Some("token") => "token",
            Some("call_ended") => "call_ended",
            Some("pong") => "pong",
            _ => "error",
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn parses_every_client_type() {
        let cases = [
            (r#"{"v":1,"type":"auth","token":"t"}"#, "auth"),
            (r#"{"v":1,"type":"offer","to":"p_a","sdp":"v=0"}"#, "offer"),
            (
                r#"{"v":1,"type":"answer","to":"p_a","sdp":"v=0"}"#,
                "answer",
            ),
            (
                r#"{"v":1,"type":"candidate","to":"p_a","candidate":{"candidate":"x"}}"#,
                "candidate",
            ),
            (
                r#"{"v":1,"type":"candidate","to":"p_a","candidate":null}"#,
                "candidate",
            ),
            (
                r#"{"v":1,"type":"media","audio":true,"video":false,"screen":false}"#,
                "media",
            ),
            (r#"{"v":1,"type":"stats","rtt_ms":1}"#, "stats"),
            (r#"{"v":1,"type":"leave"}"#, "leave"),
            (r#"{"v":1,"type":"ping"}"#, "ping"),
        ];
        for (text, label) in cases {
            let (l, r) = parse(text);
            assert_eq!(l, label);
            assert!(r.is_ok(), "{text}: {r:?}");
        }
    }

    #[test]
    fn refusals_have_precise_codes() {
        let cases = [
            ("not json", "invalid_message"),
            ("[1,2]", "invalid_message"),
            (r#"{"v":1}"#, "invalid_message"),
            (r#"{"v":1,"type":7}"#, "invalid_message"),
            (r#"{"type":"ping"}"#, "unsupported_version"),
            (r#"{"v":2,"type":"ping"}"#, "unsupported_version"),
            (r#"{"v":1,"type":"dance"}"#, "unknown_type"),
            (r#"{"v":1,"type":"offer","to":"p_a"}"#, "invalid_message"),
            (
                r#"{"v":1,"type":"offer","to":5,"sdp":"x"}"#,
                "invalid_message",
            ),
            (
                r#"{"v":1,"type":"offer","to":"","sdp":"x"}"#,
                "invalid_message",
            ),
            (r#"{"v":1,"type":"ping","extra":1}"#, "invalid_message"),
            (
                r#"{"v":1,"type":"candidate","to":"p","candidate":"str"}"#,
                "invalid_message",
            ),
            (
                r#"{"v":1,"type":"media","audio":"yes","video":false,"screen":false}"#,
                "invalid_message",
            ),
        ];
        for (text, code) in cases {
            let (_, r) = parse(text);
            assert_eq!(r.unwrap_err().code(), code, "{text}");
        }
    }

    #[test]
    fn deep_nesting_is_an_error_not_a_crash() {
        let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
        let text = format!(r#"{{"v":1,"type":"stats","x":{deep}}}"#);
        assert_eq!(parse(&text).1.unwrap_err(), ParseError::NotJson);
    }

    #[test]
    fn unknown_types_never_become_labels() {
        assert_eq!(parse(r#"{"v":1,"type":"x-evil"}"#).0, "unknown");
    }

    #[test]
    fn server_messages_carry_the_version() {
        let text = ServerMsg::Pong.to_text();
        assert_eq!(text, r#"{"v":1,"type":"pong"}"#);
        let v: serde_json::Value = serde_json::from_str(
            &ServerMsg::PeerLeft {
                peer_id: "p".into(),
                reason: "leave".into(),
            }
            .to_text(),
        )
        .unwrap();
        assert_eq!(v["type"], "peer_left");
        assert_eq!(ServerMsg::label_of(&v), "peer_left");
        let token = ServerMsg::Token {
            token: "a.b.c".into(),
            expires_at: 1_800_000_300,
        };
        assert_eq!(
            token.to_text(),
            r#"{"v":1,"type":"token","token":"a.b.c","expires_at":1800000300}"#
        );
        assert_eq!(token.label(), "token");
        assert_eq!(ServerMsg::label_of(&token.to_value()), "token");
    }
}
