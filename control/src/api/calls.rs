//! API-consumer routes (`Authorization: Bearer tpk_…`): calls, participant tokens and bare
//! TURN credentials. An app sees only its own calls: another app's call is 404 like a missing
//! one.

use axum::extract::State;
use axum::http::StatusCode;
use base64::Engine as _;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::auth::AppKey;
use super::error::{ErrorBody, Json, Path, Query};
use super::join::peer_group;
use super::metrics::Via;
use super::util::{display_name, rfc3339_ms, rfc3339_s, short_text, ttl};
use super::{ApiError, AppState};
use crate::codes::JoinCode;
use crate::creds::IceServer;
use crate::secrets::{self, Domain};
use crate::store::{
    App, Call, CallState, Cursor, Media, Millis, Participant, Quality, Role, TokenGrant,
};

/// Participants per call: at most 32 (a mesh or small SFU call; more is a broadcast, which
/// this is not built for), 8 by default.
pub const MAX_PARTICIPANTS: u32 = 32;
const DEFAULT_PARTICIPANTS: u32 = 8;

/// A call lives 4 hours unless told otherwise: a long meeting, not a forgotten link.
const DEFAULT_CALL_TTL_S: u64 = 4 * 3600;

/// Calls per page of `GET /v1/calls`: 20 by default, at most 100 (one store round trip).
const DEFAULT_PAGE: usize = 20;
const MAX_PAGE: usize = 100;

/// Longest cursor accepted: a real one is well under this; longer is garbage not worth decoding.
const MAX_CURSOR_LEN: usize = 512;

/// `POST /v1/calls`.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct CreateCall {
    /// Shown to participants (1..=128 characters).
    name: Option<String>,
    /// 1..=32, default 8.
    #[schema(minimum = 1, maximum = 32)]
    max_participants: Option<u32>,
    /// Seconds until the call expires (60..=86400, default 14400).
    #[schema(minimum = 60, maximum = 86400)]
    ttl: Option<u64>,
    /// Any JSON object, returned as given.
    #[schema(value_type = Option<Object>)]
    metadata: Option<serde_json::Map<String, serde_json::Value>>,
}

/// A new call with its join code.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct CreatedCall {
    id: String,
    name: Option<String>,
    /// `XXX-XXXX-XXX`; read case- and dash-insensitively.
    join_code: String,
    /// `{public_url}/join/{join_code}`.
    join_url: String,
    /// RFC 3339.
    expires_at: String,
    max_participants: u32,
}

/// A participant as the API shows it.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct ParticipantView {
    peer_id: String,
    role: Role,
    name: String,
    user_id: Option<String>,
    /// RFC 3339.
    joined_at: String,
    /// RFC 3339; absent while in the call. For a participant who never connected to
    /// signaling and no longer can with their join token, the time their seat was freed.
    left_at: Option<String>,
    /// Whether they ever connected to signaling. Until they do, they hold their seat only as
    /// long as their signaling token from `POST /v1/join` can still authenticate.
    connected: bool,
    media: Media,
    /// Removed with `DELETE /v1/calls/{id}/participants/{peer_id}` (then `left_at` is set too).
    kicked: bool,
    /// The latest call-quality summary from signaling; absent until the first report.
    quality: Option<QualityView>,
}

/// A participant's call quality, summarised by signaling from the client's reports.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct QualityView {
    /// Round-trip time, milliseconds.
    rtt_ms: f64,
    /// Jitter, milliseconds.
    jitter_ms: f64,
    /// Fraction of packets lost, 0..=1.
    packet_loss: f64,
    /// Send bitrate, kbit/s, when reported.
    bitrate_kbps: Option<f64>,
    /// Estimated mean opinion score, 1..=4.5.
    mos: f64,
    /// ICE candidate type of the selected pair (`host`, `srflx`, `prflx`, `relay`).
    candidate_type: String,
    /// Transport to the relay when relayed.
    relay_protocol: String,
    /// Reports this summary is built from.
    reports: u64,
    /// RFC 3339 (like every time in the API, hence not the store's Unix milliseconds).
    updated_at: String,
}

impl From<Quality> for QualityView {
    fn from(q: Quality) -> Self {
        Self {
            rtt_ms: q.rtt_ms,
            jitter_ms: q.jitter_ms,
            packet_loss: q.packet_loss,
            bitrate_kbps: q.bitrate_kbps,
            mos: q.mos,
            candidate_type: q.candidate_type,
            relay_protocol: q.relay_protocol,
            reports: q.reports,
            updated_at: rfc3339_ms(q.updated_at),
        }
    }
}

/// A call as the API shows it.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct CallView {
    id: String,
    name: Option<String>,
    state: CallState,
    max_participants: u32,
    #[schema(value_type = Option<Object>)]
    metadata: Option<serde_json::Value>,
    /// RFC 3339.
    created_at: String,
    /// RFC 3339.
    expires_at: String,
    /// RFC 3339; set once ended through the API.
    ended_at: Option<String>,
    /// Why it ended (`api`).
    end_reason: Option<String>,
    participants: Vec<ParticipantView>,
}

impl CallView {
    pub(crate) fn new(call: Call, now: u64) -> Self {
        let state = call.state(now);
        Self {
            id: call.id,
            name: call.name,
            state,
            max_participants: call.max_participants,
            metadata: call.metadata,
            created_at: rfc3339_ms(call.created_at),
            expires_at: rfc3339_ms(call.expires_at),
            ended_at: call.ended_at.map(rfc3339_ms),
            end_reason: call.end_reason,
            participants: call
                .participants
                .into_iter()
                .map(|p: Participant| ParticipantView {
                    // No one records a lapsed seat as left (it lapses by time alone), so the
                    // view derives it: such a participant is as gone as one who left.
                    left_at: p
                        .left_at
                        .or_else(|| p.seat_lapsed(now).then_some(p.seat_until).flatten())
                        .map(rfc3339_ms),
                    peer_id: p.peer_id,
                    role: p.role,
                    name: p.name,
                    user_id: p.user_id,
                    joined_at: rfc3339_ms(p.joined_at),
                    connected: p.connected,
                    media: p.media,
                    kicked: p.kicked,
                    quality: p.quality.map(QualityView::from),
                })
                .collect(),
        }
    }
}

/// `GET /v1/calls` query.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub(crate) struct ListQuery {
    /// Only calls in this state.
    state: Option<CallState>,
    /// Calls per page, 1..=100 (default 20).
    #[param(minimum = 1, maximum = 100)]
    limit: Option<usize>,
    /// `next_cursor` of the previous page.
    cursor: Option<String>,
}

/// One page of calls, newest first.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct CallList {
    calls: Vec<CallView>,
    /// Pass as `cursor` for the next page; absent on the last page.
    next_cursor: Option<String>,
}

/// `POST /v1/calls/{id}/tokens`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct CreateToken {
    /// Your own id for the participant (1..=128 characters), returned in the call.
    user_id: Option<String>,
    /// Display name (1..=64 characters); default: the name given at join.
    name: Option<String>,
    /// `host` or `guest`.
    role: Role,
    /// Seconds the token stays redeemable (60..=86400); default: until the call expires.
    #[schema(minimum = 60, maximum = 86400)]
    ttl: Option<u64>,
}

/// A one-time participant token.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct CreatedToken {
    /// `tpt_…`: redeem once with `POST /v1/join`.
    token: String,
    /// `{public_url}/join#token={token}` (in the fragment, which browsers never send to a
    /// server, so it stays out of access logs).
    join_url: String,
    /// RFC 3339.
    expires_at: String,
}

/// `POST /v1/turn/credentials`.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct CredentialsRequest {
    /// Seconds the credentials allocate (60..=86400); default: the configured lifetime.
    #[schema(minimum = 60, maximum = 86400)]
    ttl: Option<u64>,
}

/// `iceServers` for an `RTCPeerConnection`.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct Credentials {
    ice_servers: Vec<IceServer>,
    /// RFC 3339: when the TURN credentials stop allocating.
    expires_at: String,
}

impl Credentials {
    pub(crate) fn from_minted(minted: crate::creds::Minted) -> Self {
        Self {
            ice_servers: minted.ice_servers,
            expires_at: rfc3339_s(minted.expires_at),
        }
    }
}

/// The opaque cursor: base64url of the store's cursor as JSON.
fn encode_cursor(c: &Cursor) -> String {
    let json = serde_json::json!({ "created_at": c.created_at, "id": c.id }).to_string();
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(json)
}

fn decode_cursor(s: &str) -> Result<Cursor, ApiError> {
    let bad = || ApiError::BadRequest("cursor: not a cursor from this API".to_owned());
    if s.len() > MAX_CURSOR_LEN {
        return Err(bad());
    }
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(s)
        .map_err(|_| bad())?;
    serde_json::from_slice(&bytes).map_err(|_| bad())
}

/// The app's call `id`; another app's call is "not found" like a missing one.
async fn own_call(state: &AppState, app: &App, id: &str) -> Result<Call, ApiError> {
    match state.store.get_call(id).await? {
        Some(call) if call.app_id == app.id => Ok(call),
        _ => Err(ApiError::NotFound),
    }
}

/// Until when the relay must refuse credentials minted for a call (or one participant of it)
/// up to `now`: they live at most the minter's TTL from their issue, which was before now, so
/// now + TTL outlives every one of them.
fn revoke_until(state: &AppState, now: Millis) -> u64 {
    now / 1000 + state.settings.minter.ttl_s()
}

/// Creates a call and its join code.
#[utoipa::path(
    post, path = "/v1/calls", tag = "calls",
    security(("app_key" = [])),
    request_body(content = Option<CreateCall>, description = "All fields optional; the body may be omitted"),
    responses(
        (status = 201, description = "Created", body = CreatedCall),
        (status = 401, description = "Missing or unknown app key", body = ErrorBody),
        (status = 403, description = "App disabled", body = ErrorBody),
        (status = 422, description = "Invalid request", body = ErrorBody),
    )
)]
pub(crate) async fn create_call(
    AppKey(app): AppKey,
    State(state): State<AppState>,
    body: Option<Json<CreateCall>>,
) -> Result<(StatusCode, axum::Json<CreatedCall>), ApiError> {
    let req = body.map(|Json(b)| b).unwrap_or_default();
    let name = req
        .name
        .as_deref()
        .map(|n| short_text("name", n))
        .transpose()?;
    let max_participants = req.max_participants.unwrap_or(DEFAULT_PARTICIPANTS);
    if !(1..=MAX_PARTICIPANTS).contains(&max_participants) {
        return Err(ApiError::InvalidRequest(format!(
            "max_participants: must be 1..={MAX_PARTICIPANTS}"
        )));
    }
    let ttl_s = ttl("ttl", req.ttl, DEFAULT_CALL_TTL_S)?;
    let now = state.clock.now_ms();
    let code = JoinCode::generate();
    let digest = state
        .settings
        .hash_key
        .digest(Domain::JoinCode, code.canonical().as_bytes());
    let call = Call {
        id: secrets::new_id("c_"),
        app_id: app.id,
        name,
        max_participants,
        metadata: req.metadata.map(serde_json::Value::Object),
        created_at: now,
        expires_at: now + ttl_s * 1000,
        ended_at: None,
        end_reason: None,
        cred_group: secrets::new_id("g"),
        participants: Vec::new(),
    };
    state.store.create_call(&call, digest).await?;
    state.metrics.call_created();
    let display = code.display();
    Ok((
        StatusCode::CREATED,
        axum::Json(CreatedCall {
            join_url: format!("{}/join/{display}", state.settings.public_url),
            join_code: display,
            id: call.id,
            name: call.name,
            expires_at: rfc3339_ms(call.expires_at),
            max_participants,
        }),
    ))
}

/// One of the app's calls, with its participants.
#[utoipa::path(
    get, path = "/v1/calls/{id}", tag = "calls",
    security(("app_key" = [])),
    params(("id" = String, Path, description = "Call id")),
    responses(
        (status = 200, description = "The call", body = CallView),
        (status = 401, description = "Missing or unknown app key", body = ErrorBody),
        (status = 403, description = "App disabled", body = ErrorBody),
        (status = 404, description = "No such call for this app", body = ErrorBody),
    )
)]
pub(crate) async fn get_call(
    AppKey(app): AppKey,
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<axum::Json<CallView>, ApiError> {
    let call = own_call(&state, &app, &id).await?;
    Ok(axum::Json(CallView::new(call, state.clock.now_ms())))
}

/// The app's calls, newest first, a page at a time.
#[utoipa::path(
    get, path = "/v1/calls", tag = "calls",
    security(("app_key" = [])),
    params(ListQuery),
    responses(
        (status = 200, description = "One page", body = CallList),
        (status = 400, description = "Bad query or cursor", body = ErrorBody),
        (status = 401, description = "Missing or unknown app key", body = ErrorBody),
        (status = 403, description = "App disabled", body = ErrorBody),
    )
)]
pub(crate) async fn list_calls(
    AppKey(app): AppKey,
    State(state): State<AppState>,
    Query(q): Query<ListQuery>,
) -> Result<axum::Json<CallList>, ApiError> {
    let limit = q.limit.unwrap_or(DEFAULT_PAGE);
    if !(1..=MAX_PAGE).contains(&limit) {
        return Err(ApiError::BadRequest(format!(
            "limit: must be 1..={MAX_PAGE}"
        )));
    }
    let cursor = q.cursor.as_deref().map(decode_cursor).transpose()?;
    let now = state.clock.now_ms();
    let page = state
        .store
        .list_calls(&app.id, q.state, limit, cursor.as_ref(), now)
        .await?;
    Ok(axum::Json(CallList {
        calls: page
            .calls
            .into_iter()
            .map(|c| CallView::new(c, now))
            .collect(),
        next_cursor: page.next.as_ref().map(encode_cursor),
    }))
}

/// Ends a call: its code and tokens stop admitting, and its TURN credentials are revoked.
#[utoipa::path(
    post, path = "/v1/calls/{id}/end", tag = "calls",
    security(("app_key" = [])),
    params(("id" = String, Path, description = "Call id")),
    responses(
        (status = 200, description = "The call, ended", body = CallView),
        (status = 401, description = "Missing or unknown app key", body = ErrorBody),
        (status = 403, description = "App disabled", body = ErrorBody),
        (status = 404, description = "No such call for this app", body = ErrorBody),
    )
)]
pub(crate) async fn end_call(
    AppKey(app): AppKey,
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<axum::Json<CallView>, ApiError> {
    let before = own_call(&state, &app, &id).await?;
    let now = state.clock.now_ms();
    let call = state
        .store
        .end_call(&id, "api", now)
        .await?
        .ok_or(ApiError::NotFound)?;
    // Repeated on a repeated end: harmless, and it re-arms a relay that restarted meanwhile.
    state
        .revoker
        .revoke(&call.cred_group, revoke_until(&state, now));
    // Signaling only hears of an end that happened now: live before, ended by this request
    // (not one ended earlier, nor one that merely expired). Two racing ends may both tell it,
    // which it takes as one.
    if before.state(now) != CallState::Ended && call.ended_at == Some(now) {
        state.events.call_ended(&call.id, "api");
    }
    tracing::info!(call = %call.id, "call ended");
    Ok(axum::Json(CallView::new(call, now)))
}

/// Removes a participant from a live call: signaling closes their connection and refuses
/// their signaling token from then on, and the relay revokes their TURN credentials (only
/// theirs). They no longer hold a seat. Kicking again answers 204 again (and repeats the
/// revocation and the notice to signaling, which finishes what a crash may have interrupted).
#[utoipa::path(
    delete, path = "/v1/calls/{id}/participants/{peer_id}", tag = "calls",
    security(("app_key" = [])),
    params(
        ("id" = String, Path, description = "Call id"),
        ("peer_id" = String, Path, description = "The participant's `peer_id`"),
    ),
    responses(
        (status = 204, description = "Kicked (or kicked already)"),
        (status = 401, description = "Missing or unknown app key", body = ErrorBody),
        (status = 403, description = "App disabled", body = ErrorBody),
        (status = 404, description = "No such call for this app, or no such participant in it", body = ErrorBody),
        (status = 409, description = "The call has ended", body = ErrorBody),
    )
)]
pub(crate) async fn kick_participant(
    AppKey(app): AppKey,
    State(state): State<AppState>,
    Path((id, peer_id)): Path<(String, String)>,
) -> Result<StatusCode, ApiError> {
    let call = own_call(&state, &app, &id).await?;
    let now = state.clock.now_ms();
    if call.state(now) == CallState::Ended {
        // Nobody is connected any more and ending revoked everyone's credentials already.
        return Err(ApiError::CallEnded);
    }
    let kicked = state
        .store
        .kick(&call.id, &peer_id, now)
        .await?
        .ok_or(ApiError::NotFound)?;
    // Credentials first: they are what a kicked peer could keep using without signaling.
    state.revoker.revoke(
        &peer_group(&call.cred_group, &kicked.peer_id),
        revoke_until(&state, now),
    );
    state.events.peer_kicked(&call.id, &kicked.peer_id);
    tracing::info!(call = %call.id, peer = %kicked.peer_id, "participant kicked");
    Ok(StatusCode::NO_CONTENT)
}

/// Creates a one-time participant token for a call (for consumers who know who joins: the
/// token carries the role and your user id).
#[utoipa::path(
    post, path = "/v1/calls/{id}/tokens", tag = "calls",
    security(("app_key" = [])),
    params(("id" = String, Path, description = "Call id")),
    request_body = CreateToken,
    responses(
        (status = 201, description = "Created; redeem once with POST /v1/join", body = CreatedToken),
        (status = 401, description = "Missing or unknown app key", body = ErrorBody),
        (status = 403, description = "App disabled", body = ErrorBody),
        (status = 404, description = "No such call for this app", body = ErrorBody),
        (status = 409, description = "The call has ended", body = ErrorBody),
        (status = 422, description = "Invalid request", body = ErrorBody),
    )
)]
pub(crate) async fn create_token(
    AppKey(app): AppKey,
    State(state): State<AppState>,
    Path(id): Path<String>,
    Json(req): Json<CreateToken>,
) -> Result<(StatusCode, axum::Json<CreatedToken>), ApiError> {
    let name = req
        .name
        .as_deref()
        .map(|n| display_name("name", n))
        .transpose()?;
    let user_id = req
        .user_id
        .as_deref()
        .map(|u| short_text("user_id", u))
        .transpose()?;
    let ttl_s = req.ttl.map(|t| ttl("ttl", Some(t), t)).transpose()?;
    let call = own_call(&state, &app, &id).await?;
    let now = state.clock.now_ms();
    if call.state(now) == CallState::Ended {
        return Err(ApiError::CallEnded);
    }
    // A token cannot outlive its call: it would only ever be refused.
    let expires_at = match ttl_s {
        Some(t) => (now + t * 1000).min(call.expires_at),
        None => call.expires_at,
    };
    let token = secrets::new_token();
    let digest = state
        .settings
        .hash_key
        .digest(Domain::Token, token.as_bytes());
    let grant = TokenGrant {
        call_id: call.id,
        role: req.role,
        name,
        user_id,
        expires_at,
    };
    state.store.put_token(digest, &grant).await?;
    Ok((
        StatusCode::CREATED,
        axum::Json(CreatedToken {
            join_url: format!("{}/join#token={token}", state.settings.public_url),
            token,
            expires_at: rfc3339_ms(expires_at),
        }),
    ))
}

/// TURN credentials outside any call (for consumers with their own signaling), in the shape
/// `RTCPeerConnection` takes.
#[utoipa::path(
    post, path = "/v1/turn/credentials", tag = "calls",
    security(("app_key" = [])),
    request_body(content = Option<CredentialsRequest>, description = "Optional"),
    responses(
        (status = 200, description = "Fresh credentials", body = Credentials),
        (status = 401, description = "Missing or unknown app key", body = ErrorBody),
        (status = 403, description = "App disabled", body = ErrorBody),
        (status = 422, description = "Invalid request", body = ErrorBody),
    )
)]
pub(crate) async fn turn_credentials(
    AppKey(_app): AppKey,
    State(state): State<AppState>,
    body: Option<Json<CredentialsRequest>>,
) -> Result<axum::Json<Credentials>, ApiError> {
    let req = body.map(|Json(b)| b).unwrap_or_default();
    let minter = &state.settings.minter;
    let ttl_s = ttl("ttl", req.ttl, minter.ttl_s())?;
    let now_s = state.clock.now_ms() / 1000;
    // A fresh group per issue: these credentials belong to no call, nothing revokes them.
    let minted = minter.mint(&secrets::new_id("g"), now_s, ttl_s);
    state.metrics.credentials(Via::Api);
    Ok(axum::Json(Credentials::from_minted(minted)))
}
