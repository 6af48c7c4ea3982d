//! Where the control plane keeps its state: one [`Store`] trait, two backends —
//! [`MemoryStore`] (the embedded default: one process, nothing survives a restart) and
//! [`RedisStore`] (several nodes share apps, calls, codes, tokens and rate limits).
//!
//! The trait is written in terms of the operations the API needs, not of keys and values, so
//! that every operation that must be atomic *is* one call: redeeming a one-time token, adding a
//! participant under `max_participants`, counting a rate-limit hit. Both backends pass the same
//! contract suite (`tests/store.rs`), the Redis one against a real `redis-server`.
//!
//! Secrets never reach the store in clear: app keys, join codes and participant tokens are
//! stored as [`Digest`]s (keyed HMAC-SHA-256, see `crate::secrets`), so a dump of Redis gives
//! an attacker nothing to join or call with.
//!
//! Times are Unix milliseconds ([`Millis`]) passed in by the caller: the store never reads a
//! clock, which keeps expiry testable and the same on every node.

mod memory;
mod metrics;
mod reconnecting;
mod redis;

use std::fmt;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

pub use self::memory::MemoryStore;
pub use self::metrics::StoreMetrics;
pub use self::reconnecting::Reconnecting;
pub use self::redis::RedisStore;

/// Unix time in milliseconds.
pub type Millis = u64;

/// A keyed hash of a secret (app key, join code, participant token): 32 bytes, hex in storage.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Digest(pub [u8; 32]);

impl Digest {
    /// Lower-case hex, as used in storage keys.
    pub fn to_hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Eight hex digits identify it in logs without being the whole hash.
        write!(f, "Digest({}…)", &self.to_hex()[..8])
    }
}

/// A tenant: an API consumer with its own calls and keys.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct App {
    /// `app_` + random, or the id given in config.
    pub id: String,
    /// Human name, shown in listings.
    pub name: String,
    /// A disabled app's keys are refused (401) and its calls cannot be joined.
    pub disabled: bool,
    /// Declared in the config file (re-applied at every start) or created through the API.
    pub from_config: bool,
    /// When it was created.
    pub created_at: Millis,
}

/// Who a participant is in a call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// May end the call (signaling, later: kick).
    Host,
    /// Everyone else; joining by code makes a guest.
    Guest,
}

/// A call's state, derived from its record and the time (see [`Call::state`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum CallState {
    /// Created, nobody joined yet.
    Waiting,
    /// Someone joined and it has neither ended nor expired.
    Active,
    /// Ended through the API (or, later, by signaling) or expired.
    Ended,
}

/// What a participant sends (set by signaling; all off until then).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Media {
    /// Microphone on.
    pub audio: bool,
    /// Camera on.
    pub video: bool,
    /// Screen shared.
    pub screen: bool,
}

/// A participant's call quality as signaling last summarised it from the client's reports
/// (`GET /v1/calls/{id}` shows it).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Quality {
    /// Round-trip time, milliseconds.
    pub rtt_ms: f64,
    /// Jitter, milliseconds.
    pub jitter_ms: f64,
    /// Fraction of packets lost, 0..=1.
    pub packet_loss: f64,
    /// Send bitrate, kbit/s, when the client reported one.
    pub bitrate_kbps: Option<f64>,
    /// Estimated mean opinion score, 1..=4.5.
    pub mos: f64,
    /// ICE candidate type of the selected pair (`host`, `srflx`, `prflx`, `relay`).
    pub candidate_type: String,
    /// Transport to the relay when relayed (`udp`, `tcp`, `tls`), else empty or `none`.
    pub relay_protocol: String,
    /// How many reports of the participant's connection have counted so far (the figures are
    /// the latest one's).
    pub reports: u64,
    /// When it was last updated.
    pub updated_at: Millis,
}

/// One participant of a call.
///
/// Fields added after the first release carry `#[serde(default)]`, so records stored by an
/// older version still read.
// Not `Eq`: `quality` holds floats.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Participant {
    /// `p_` + random: the JWT `sub`, the signaling address.
    pub peer_id: String,
    /// Host or guest.
    pub role: Role,
    /// Display name given at join (attacker-chosen text: stored and returned byte for byte).
    pub name: String,
    /// The consumer's own user id, from a participant token.
    pub user_id: Option<String>,
    /// When `/v1/join` admitted them.
    pub joined_at: Millis,
    /// When they left (signaling); `None` while in the call.
    pub left_at: Option<Millis>,
    /// Their media state (signaling).
    pub media: Media,
    /// The `jti` of the signaling token issued with this admission: signaling accepts only
    /// that token for this peer. Empty in records from before it was stored.
    #[serde(default)]
    pub jti: String,
    /// Removed through the API ([`Store::kick`]): for good, whatever signaling reports later.
    #[serde(default)]
    pub kicked: bool,
    /// The latest call-quality summary (signaling); `None` until the first report.
    #[serde(default)]
    pub quality: Option<Quality>,
    /// Whether signaling ever authenticated them ([`Store::mark_connected`]). `false` from
    /// admission until then. Records from before this field count as connected: they keep
    /// holding their seat as they did.
    #[serde(default = "yes")]
    pub connected: bool,
    /// While not [`connected`](Self::connected), the seat is held only before this time: the
    /// first millisecond at which the signaling token from their `/v1/join` can no longer
    /// authenticate (its `exp` plus the verification leeway, see
    /// [`crate::jwt::refused_from_ms`]). Without it (older records) the seat is held as before.
    #[serde(default)]
    pub seat_until: Option<Millis>,
}

/// Serde's default for [`Participant::connected`].
fn yes() -> bool {
    true
}

impl Participant {
    /// Whether they hold a seat at `now`: neither left nor kicked, and either connected to
    /// signaling once or still able to (a join whose client never opened the socket — a
    /// closed tab, a crashed client, an API preview — must not keep the seat for the whole
    /// call).
    pub fn is_present(&self, now: Millis) -> bool {
        self.left_at.is_none() && !self.kicked && !self.seat_lapsed(now)
    }

    /// Whether they never connected and, at `now`, no longer can with their join token: the
    /// seat is free even though no `left_at` was recorded.
    pub fn seat_lapsed(&self, now: Millis) -> bool {
        !self.connected && self.seat_until.is_some_and(|until| now >= until)
    }

    /// [`Store::mark_connected`]'s change: connected, unless the seat lapsed already (then it
    /// may have been given away, so connecting now would put one more in the call than
    /// `max_participants`).
    pub(crate) fn apply_connected(&mut self, now: Millis) {
        if !self.seat_lapsed(now) {
            self.connected = true;
        }
    }

    /// [`Store::mark_disconnected`]'s change.
    pub(crate) fn apply_disconnected(&mut self, seat_until: Millis) {
        if self.left_at.is_none() && !self.kicked {
            self.connected = false;
            self.seat_until = Some(seat_until);
        }
    }

    /// [`Store::set_left`]'s change. A kicked participant stays left at the kick's time:
    /// neither a resume nor a later leave report changes that.
    pub(crate) fn apply_left(&mut self, left_at: Option<Millis>) {
        if !self.kicked {
            self.left_at = left_at;
        }
    }

    /// [`Store::kick`]'s change: kicked, and left now unless already left.
    pub(crate) fn apply_kick(&mut self, now: Millis) {
        self.kicked = true;
        self.left_at = self.left_at.or(Some(now));
    }
}

/// A call.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Call {
    /// `c_` + random (URL-safe): the API id, the key of everything else about the call.
    pub id: String,
    /// The app that created it; other apps get 404 for it.
    pub app_id: String,
    /// Optional name given at creation.
    pub name: Option<String>,
    /// Most participants admitted (1..=32).
    pub max_participants: u32,
    /// Free JSON the consumer attached (bounded by the body limit).
    pub metadata: Option<serde_json::Value>,
    /// When it was created (history is ordered by this, newest first).
    pub created_at: Millis,
    /// After this the call is ended even if nobody ended it.
    pub expires_at: Millis,
    /// When it was ended through the API (or signaling).
    pub ended_at: Option<Millis>,
    /// Why it ended (`"api"`, later `"empty"`, …).
    pub end_reason: Option<String>,
    /// The opaque group in the TURN usernames minted for this call (`expiry:GROUP.x`): the relay
    /// revokes by group when the call ends. Random, no personal data.
    pub cred_group: String,
    /// Everyone admitted so far, in join order (left ones stay, with `left_at`).
    pub participants: Vec<Participant>,
}

impl Call {
    /// The state at `now`.
    pub fn state(&self, now: Millis) -> CallState {
        if self.ended_at.is_some() || now >= self.expires_at {
            CallState::Ended
        } else if self.participants.is_empty() {
            CallState::Waiting
        } else {
            CallState::Active
        }
    }

    /// Participants who hold a seat at `now` (what `max_participants` limits): see
    /// [`Participant::is_present`].
    pub fn present(&self, now: Millis) -> usize {
        self.participants
            .iter()
            .filter(|p| p.is_present(now))
            .count()
    }

    /// The participant `peer_id` (the first, should a retried create have stored it twice).
    pub fn participant(&self, peer_id: &str) -> Option<&Participant> {
        self.participants.iter().find(|p| p.peer_id == peer_id)
    }
}

/// A participant token (`POST /v1/calls/{id}/tokens`): what redeeming it grants.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenGrant {
    /// The call it admits to.
    pub call_id: String,
    /// Host or guest.
    pub role: Role,
    /// Pre-set display name (the join request's name is used when absent).
    pub name: Option<String>,
    /// The consumer's user id.
    pub user_id: Option<String>,
    /// After this it is refused like an unknown token.
    pub expires_at: Millis,
}

/// Where a listing continues: opaque to clients (base64 of this in the API).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cursor {
    /// `created_at` of the last call returned.
    pub created_at: Millis,
    /// Its id (ties on `created_at` are broken by id, descending).
    pub id: String,
}

/// One page of an app's call history, newest first.
#[derive(Debug, Clone, PartialEq)]
pub struct Page {
    /// At most the requested limit.
    pub calls: Vec<Call>,
    /// Present when more calls follow.
    pub next: Option<Cursor>,
}

/// The result of [`Store::admit`].
// One per join, moved straight into the response: boxing the call would buy nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq)]
pub enum Admission {
    /// Added; the call as it is now.
    Admitted(Call),
    /// `max_participants` present already.
    Full,
    /// The call has admitted [`JOINS_PER_SEAT`] × `max_participants` participants over its
    /// life, present or not.
    JoinLimit,
    /// Unknown, ended or expired (the API answers all alike).
    Gone,
}

/// Joins a call admits over its life, per seat (1024 for the largest call): every join keeps a
/// participant record with the call, which every later join reads (and Redis decodes inside
/// one script), so a guest looping join and leave with the code (64 a minute per code) must not
/// grow the record without end; 32 per seat is far more than people coming and going do.
pub const JOINS_PER_SEAT: u64 = 32;

/// A store failure. The API maps every variant to 503 (the request may be retried); none is
/// the client's fault.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The backend could not be reached or timed out.
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// The backend answered something this code cannot read (a bug or foreign data).
    #[error("store data corrupt: {0}")]
    Corrupt(String),
}

/// Operations the control plane needs, each atomic on its own. Implementations must be cheap to
/// clone behind an `Arc` and safe to call from many tasks at once.
#[async_trait]
pub trait Store: Send + Sync + fmt::Debug + 'static {
    /// Adds an app with one key. `Ok(false)` if an app with that id exists. An app from config
    /// (`from_config`) replaces any stored one with the same id and its keys are set to `keys`.
    async fn put_app(&self, app: &App, keys: &[Digest]) -> Result<bool, StoreError>;
    /// All apps, by id.
    async fn list_apps(&self) -> Result<Vec<App>, StoreError>;
    /// One app.
    async fn get_app(&self, id: &str) -> Result<Option<App>, StoreError>;
    /// Enables or disables; `Ok(false)` if there is no such app.
    async fn set_app_disabled(&self, id: &str, disabled: bool) -> Result<bool, StoreError>;
    /// Adds a key to an app; `Ok(false)` if there is no such app.
    async fn add_app_key(&self, id: &str, key: Digest) -> Result<bool, StoreError>;
    /// The app a key belongs to (disabled or not: the caller decides).
    async fn app_for_key(&self, key: Digest) -> Result<Option<App>, StoreError>;

    /// Stores a new call and its join code (valid until the call ends or expires).
    async fn create_call(&self, call: &Call, code: Digest) -> Result<(), StoreError>;
    /// A call by id (ended and expired ones too, while history keeps them).
    async fn get_call(&self, id: &str) -> Result<Option<Call>, StoreError>;
    /// An app's calls, newest first, optionally only those in `state` at `now`.
    async fn list_calls(
        &self,
        app_id: &str,
        state: Option<CallState>,
        limit: usize,
        after: Option<&Cursor>,
        now: Millis,
    ) -> Result<Page, StoreError>;
    /// The call a join code opens, if the code is known and the call neither ended nor expired.
    async fn call_for_code(&self, code: Digest, now: Millis) -> Result<Option<String>, StoreError>;
    /// Ends a call at `now` with `reason`; the code stops working. Returns the call as ended;
    /// `None` if unknown. Ending an ended call changes nothing and returns it.
    async fn end_call(
        &self,
        id: &str,
        reason: &str,
        now: Millis,
    ) -> Result<Option<Call>, StoreError>;

    /// Stores a participant token's grant until its expiry.
    async fn put_token(&self, token: Digest, grant: &TokenGrant) -> Result<(), StoreError>;
    /// Redeems a token once: of concurrent redemptions exactly one gets the grant; later ones,
    /// and unknown or expired tokens, get `None`.
    async fn redeem_token(
        &self,
        token: Digest,
        now: Millis,
    ) -> Result<Option<TokenGrant>, StoreError>;

    /// A token's grant without using it up: `None` if unknown, used or expired at `now`.
    async fn peek_token(
        &self,
        token: Digest,
        now: Millis,
    ) -> Result<Option<TokenGrant>, StoreError>;

    /// Adds a participant if the call is live and fewer than `max_participants` are present,
    /// atomically (two joins for the last seat: one gets it).
    async fn admit(
        &self,
        call_id: &str,
        participant: &Participant,
        now: Millis,
    ) -> Result<Admission, StoreError>;

    /// [`Store::admit`] with participant token `token`, which [`Store::peek_token`] found
    /// granting `call_id`: the token is used up in the same atomic step as the admission, and
    /// only by it. A full call or a failed operation leaves the token usable (a participant
    /// turned away for lack of a seat may try again when one frees up); a token that already
    /// admitted someone gives [`Admission::Gone`], and of concurrent uses exactly one is
    /// admitted. (Using it up *before* admitting, as [`Store::redeem_token`] would, burns the
    /// token on every 409 and 503.)
    async fn admit_with_token(
        &self,
        token: Digest,
        call_id: &str,
        participant: &Participant,
        now: Millis,
    ) -> Result<Admission, StoreError>;

    /// Sets when participant `peer_id` left (`Some`), or that they are present again (`None`,
    /// a resumed session). `Ok(false)` for an unknown call or peer. A kicked participant's
    /// `left_at` stays the kick's time (`Ok(true)` all the same: the participant exists).
    /// Works on ended calls too, so the last leaves are still recorded.
    async fn set_left(
        &self,
        call_id: &str,
        peer_id: &str,
        left_at: Option<Millis>,
    ) -> Result<bool, StoreError>;
    /// Records that signaling authenticated participant `peer_id` at `now`: from then on
    /// their seat is held until they leave ([`Participant::connected`]), not only until their
    /// join token stops working. Atomic with the seat check: a participant whose seat already
    /// lapsed at `now` (never connected, `now >= seat_until`) stays unconnected, and the caller
    /// must refuse them (the seat may be someone else's). Returns the participant as it is now;
    /// `None` for an unknown call or peer. Marking again changes nothing. Times are the
    /// callers': a mark at a `now` just before `seat_until` that lands after an admission at a
    /// later `now` that already took the seat still marks (the store cannot order two nodes'
    /// clocks); signaling's room, which refuses a peer beyond `max_participants` connected,
    /// covers that moment, and gives the refused peer's seat back with [`Store::set_left`].
    async fn mark_connected(
        &self,
        call_id: &str,
        peer_id: &str,
        now: Millis,
    ) -> Result<Option<Participant>, StoreError>;
    /// Records that signaling let participant `peer_id` go without a leave (its node is
    /// stopping): they hold their seat only until `seat_until` unless signaling authenticates
    /// them again before ([`Store::mark_connected`]), as for a join that never connected. A
    /// participant who left or was kicked is not changed. `Ok(false)` for an unknown call or
    /// peer.
    async fn mark_disconnected(
        &self,
        call_id: &str,
        peer_id: &str,
        seat_until: Millis,
    ) -> Result<bool, StoreError>;
    /// Sets a participant's media state; `Ok(false)` for an unknown call or peer.
    async fn set_media(
        &self,
        call_id: &str,
        peer_id: &str,
        media: Media,
    ) -> Result<bool, StoreError>;
    /// Sets a participant's call-quality summary; `Ok(false)` for an unknown call or peer.
    async fn set_quality(
        &self,
        call_id: &str,
        peer_id: &str,
        quality: &Quality,
    ) -> Result<bool, StoreError>;
    /// Kicks a participant: `kicked`, and `left_at = now` unless already left, so they no
    /// longer hold a seat. Returns the participant as it is now (its `jti` names the token to
    /// refuse); `None` for an unknown call or peer. Kicking again changes nothing.
    async fn kick(
        &self,
        call_id: &str,
        peer_id: &str,
        now: Millis,
    ) -> Result<Option<Participant>, StoreError>;

    /// Counts a hit on a fixed-window rate-limit counter `key` (window starting at the first
    /// hit) and returns the hits in the current window including this one, and the milliseconds
    /// until the window ends.
    async fn hit(&self, key: &str, window_ms: u64, now: Millis) -> Result<(u64, u64), StoreError>;
    /// Reads the counter `key` at `now` without counting a hit: the hits in its current window
    /// and the milliseconds until that window ends; `(0, 0)` when no window is open.
    async fn peek(&self, key: &str, now: Millis) -> Result<(u64, u64), StoreError>;

    /// Calls neither ended nor expired at `now`, over all apps (the `calls_active` gauge).
    async fn live_calls(&self, now: Millis) -> Result<u64, StoreError>;

    /// Whether the backend answers (for `/ready`).
    async fn ping(&self) -> Result<(), StoreError>;
}
