//! Turnpike's control plane: the HTTP API (axum) that API consumers call to create calls, hand
//! out join codes and links, and exchange a code or token for a signaling token plus `iceServers`
//! with fresh TURN credentials.
//!
//! # Shape
//!
//! - [`router`] builds the whole API from an [`AppState`]: `fn router(state) -> Router`, tested
//!   with `tower::ServiceExt::oneshot`, served by [`serve`] with an injected listener and
//!   shutdown future.
//! - [`store`]: one [`store::Store`] trait, in memory or on Redis; every atomic operation the API
//!   needs is one trait call.
//! - [`secrets`]: key generation and keyed hashing (app keys, join codes and participant tokens
//!   are stored only as HMAC-SHA-256 digests under the configured `hash-key`).
//! - [`codes`]: join codes, 10 letters of `BCDFGHJKLMNPQRSTVWXZ` shown as `XXX-XXXX-XXX`.
//! - [`jwt`]: HS256 signaling tokens with a `kid`; the algorithm is pinned, never read from the
//!   token. Signaling (`signal`) verifies with the same module.
//! - [`creds`]: `iceServers` with TURN REST credentials minted by `relay_proto::rest_credentials`,
//!   the very function the relay verifies them with.
//! - [`client`]: the address a request is counted against, through trusted proxies'
//!   `X-Forwarded-For`.
//! - [`api`]: handlers, the error type (`{"error":{"code","message"}}`), limits, metrics, OpenAPI.
//! - [`web`]: the join page, the JS SDK and the diagnostics page, embedded (merged into
//!   [`router`]).
//!
//! # Revocation
//!
//! TURN credentials are stateless HMACs, so "the call's credentials stop working" needs the
//! relay's help: every username minted for a call is `EXPIRY:GROUP.RANDOM`, where `GROUP` is the
//! call's random `cred_group`. Ending a call hands `(GROUP, until)` to the [`Revoker`] given in
//! [`AppState`]; `turnpike serve` connects it to the relay, which tears down that group's
//! allocations and refuses the group until `until` (the credentials' expiry).
//!
//! # Why no JWT or OpenAPI framework beyond `utoipa`
//!
//! HS256 is one HMAC; doing it here (with `hmac`/`sha2`) keeps the algorithm pinned by
//! construction and the verification rules (required claims, leeway, `kid` lookup) in one
//! readable place that signaling shares.

pub mod api;
pub mod client;
pub mod codes;
pub mod creds;
pub mod jwt;
pub mod secrets;
pub mod store;
pub mod web;

pub use api::{router, serve, serve_app, AppState, CallEvents, Revoker, Settings};
