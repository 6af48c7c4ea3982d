//! `POST /v1/join`: a join code or participant token in, a signaling token and `iceServers`
//! out. Public, so everything here assumes a guessing attacker:
//!
//! - every refusal of a secret (wrong, unknown, malformed, expired, ended, disabled app) is the
//!   same 404 body after the same store work (rate-limit hits, one digest, one lookup, one
//!   failure mark), so neither the answer nor its cost tells a near miss from a far one;
//! - attempts are counted per client address and per code/token digest, and an address with
//!   too many failures is refused before its code is even looked at;
//! - a failing store refuses (503): credentials are never issued unchecked.

use std::net::SocketAddr;

use axum::extract::{ConnectInfo, State};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::error::{ErrorBody, Json};
use super::metrics::{JoinResult, Via};
use super::util::{client_key, display_name, retry_after_s, rfc3339_ms, rfc3339_s};
use super::{ApiError, AppState};
use crate::codes::JoinCode;
use crate::creds::IceServer;
use crate::jwt::{refused_from_ms, Claims, AUDIENCE, LEEWAY_S};
use crate::secrets::{self, Domain};
use crate::store::{Admission, Digest, Participant, Role};

/// `POST /v1/join`: exactly one of `code` and `token`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct JoinRequest {
    /// A join code (`XXX-XXXX-XXX`; any case, dashes and spaces anywhere).
    code: Option<String>,
    /// A participant token (`tpt_…`).
    token: Option<String>,
    /// Display name, 1..=64 characters (a token's preset name wins).
    name: String,
}

/// Admitted: everything a client needs to start the call.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct Joined {
    call_id: String,
    /// Your id in the call (the signaling token's `sub`).
    peer_id: String,
    role: Role,
    /// WebSocket URL of signaling.
    signal_url: String,
    /// JWT for signaling (HS256).
    signal_token: String,
    /// For `new RTCPeerConnection({iceServers})`.
    ice_servers: Vec<IceServer>,
    /// RFC 3339: when the TURN credentials stop allocating.
    ice_servers_expire_at: String,
    /// RFC 3339: when the call expires.
    expires_at: String,
}

/// What the request presented.
enum Secret {
    Code,
    Token,
}

/// Admits a participant by join code or participant token.
#[utoipa::path(
    post, path = "/v1/join", tag = "public",
    request_body = JoinRequest,
    responses(
        (status = 200, description = "Admitted", body = Joined),
        (status = 404, description = "Invalid or expired code or token, or the call has ended (always the same body)", body = ErrorBody),
        (status = 409, description = "The call is full (`call_full`), or has admitted all the joins it can over its life (`call_join_limit`)", body = ErrorBody),
        (status = 422, description = "Invalid request (not exactly one of code and token, bad name)", body = ErrorBody),
        (status = 429, description = "Too many attempts; see Retry-After", body = ErrorBody),
        (status = 503, description = "Temporarily unavailable", body = ErrorBody),
    )
)]
pub(crate) async fn join(
    State(state): State<AppState>,
    ConnectInfo(client): ConnectInfo<SocketAddr>,
    Json(req): Json<JoinRequest>,
) -> Result<axum::Json<Joined>, ApiError> {
    let mut attempt = Attempt {
        metrics: &state.metrics,
        result: None,
    };
    let result = admit(&state, client, req).await;
    attempt.result = Some(match &result {
        Ok(_) => Some(JoinResult::Ok),
        Err(ApiError::InvalidOrExpired) => Some(JoinResult::Invalid),
        Err(ApiError::RateLimited { .. }) => Some(JoinResult::RateLimited),
        // A valid code for a call that cannot take anyone: capacity, as a full call.
        Err(ApiError::CallFull | ApiError::JoinLimit) => Some(JoinResult::Full),
        Err(ApiError::Unavailable(_)) => Some(JoinResult::Unavailable),
        // A malformed request (422) never reached a secret: not a join attempt.
        Err(_) => None,
    });
    drop(attempt);
    if result.is_ok() {
        state.metrics.credentials(Via::Join);
    }
    result.map(axum::Json)
}

/// One join attempt's count in `turnpike_control_join_attempts_total`, taken when dropped: with
/// the handler's result, or as `unavailable` when the request's time limit dropped the handler
/// part-way (the client got 503 `timeout`: a store too slow to answer is an outage, and must
/// reach `TurnpikeJoinSuccessLow`).
struct Attempt<'a> {
    metrics: &'a super::ControlMetrics,
    /// `None` until the handler finished; then what to count (`None`: not an attempt).
    result: Option<Option<JoinResult>>,
}

impl Drop for Attempt<'_> {
    fn drop(&mut self) {
        match self.result {
            Some(Some(r)) => self.metrics.join(r),
            Some(None) => {}
            None => self.metrics.join(JoinResult::Unavailable),
        }
    }
}

async fn admit(state: &AppState, client: SocketAddr, req: JoinRequest) -> Result<Joined, ApiError> {
    let (kind, secret) = match (req.code, req.token) {
        (Some(code), None) => (Secret::Code, code),
        (None, Some(token)) => (Secret::Token, token),
        _ => {
            return Err(ApiError::InvalidRequest(
                "code, token: give exactly one".to_owned(),
            ))
        }
    };
    let name = display_name("name", &req.name)?;
    let settings = &state.settings;
    let store = &state.store;
    let limits = &settings.limits;
    let window_ms = limits.window.as_millis() as u64;
    let now = state.clock.now_ms();

    // Per address: every attempt counts against `join_per_ip`; failures are counted apart (a
    // hit only when one happens, below) and read here, so concurrent successful joins from one
    // address can never look like failures.
    let client = client_key(client.ip());
    let attempts_key = format!("join:ip:{client}");
    let failures_key = format!("join:fail:{client}");
    let (attempts, attempts_reset) = store.hit(&attempts_key, window_ms, now).await?;
    if attempts > limits.join_per_ip {
        return Err(ApiError::RateLimited {
            retry_after_s: retry_after_s(attempts_reset),
        });
    }
    let (failures, failures_reset) = store.peek(&failures_key, now).await?;
    if failures >= limits.join_failures_per_ip {
        return Err(ApiError::RateLimited {
            retry_after_s: retry_after_s(failures_reset),
        });
    }

    // Always one digest: of the canonical code when it parses, else of the raw text (which
    // no stored code can have, as every stored one is canonical).
    let digest = match kind {
        Secret::Code => {
            let canonical = JoinCode::parse(&secret).map(|c| c.canonical().to_owned());
            let bytes = canonical.as_deref().unwrap_or(&secret).as_bytes();
            settings.hash_key.digest(Domain::JoinCode, bytes)
        }
        Secret::Token => settings.hash_key.digest(Domain::Token, secret.as_bytes()),
    };
    let kind_key = match kind {
        Secret::Code => "join:code",
        Secret::Token => "join:token",
    };
    let (per_code, per_code_reset) = store
        .hit(&format!("{kind_key}:{}", digest.to_hex()), window_ms, now)
        .await?;
    if per_code > limits.join_per_code {
        return Err(ApiError::RateLimited {
            retry_after_s: retry_after_s(per_code_reset),
        });
    }

    let outcome = lookup_and_admit(state, &kind, digest, name, now).await;
    if let Err(ApiError::InvalidOrExpired) = outcome {
        store.hit(&failures_key, window_ms, now).await?;
    }
    outcome
}

/// One store lookup of the code or token, then the call, its app, a seat and the credentials.
async fn lookup_and_admit(
    state: &AppState,
    kind: &Secret,
    digest: Digest,
    name: String,
    now: u64,
) -> Result<Joined, ApiError> {
    let settings = &state.settings;
    let store = &state.store;
    let (call_id, role, name, user_id) = match kind {
        Secret::Code => {
            let call_id = store
                .call_for_code(digest, now)
                .await?
                .ok_or(ApiError::InvalidOrExpired)?;
            (call_id, Role::Guest, name, None)
        }
        Secret::Token => {
            // Only looked at here: the admission below uses it up, so a full call (409) or a
            // store failure (503) leaves the participant's one link working.
            let grant = store
                .peek_token(digest, now)
                .await?
                .ok_or(ApiError::InvalidOrExpired)?;
            (
                grant.call_id,
                grant.role,
                grant.name.unwrap_or(name),
                grant.user_id,
            )
        }
    };
    let call = store
        .get_call(&call_id)
        .await?
        .ok_or(ApiError::InvalidOrExpired)?;
    // A disabled app's calls are closed like ended ones (a gone app too).
    match store.get_app(&call.app_id).await? {
        Some(app) if !app.disabled => {}
        _ => return Err(ApiError::InvalidOrExpired),
    }
    let now_s = now / 1000;
    let token_exp = now_s + settings.token_ttl.as_secs();
    let peer_id = secrets::new_id("p_");
    // Stored with the participant: signaling accepts only this token for this peer, and a kick
    // refuses it for good.
    let jti = secrets::new_id("j_");
    let participant = Participant {
        peer_id: peer_id.clone(),
        role,
        name: name.clone(),
        user_id,
        joined_at: now,
        left_at: None,
        media: Default::default(),
        jti: jti.clone(),
        kicked: false,
        quality: None,
        // Until signaling authenticates them, the seat is held only while the signaling token
        // below can still authenticate: a join whose client never connects (a closed tab, a
        // crash, a preview) must not keep a seat for the rest of the call.
        connected: false,
        seat_until: Some(refused_from_ms(token_exp, LEEWAY_S)),
    };
    let admission = match kind {
        Secret::Code => store.admit(&call.id, &participant, now).await?,
        Secret::Token => {
            store
                .admit_with_token(digest, &call.id, &participant, now)
                .await?
        }
    };
    let call = match admission {
        Admission::Admitted(call) => call,
        Admission::Full => return Err(ApiError::CallFull),
        Admission::JoinLimit => return Err(ApiError::JoinLimit),
        Admission::Gone => return Err(ApiError::InvalidOrExpired),
    };

    // Group `CALL.PEER`: the relay counts such usernames in both `CALL` (ending the call
    // revokes them) and `CALL.PEER` (kicking this peer revokes only theirs).
    let group = peer_group(&call.cred_group, &peer_id);
    // The credentials cannot outlive the call (but get a usable minimum near its end).
    let minted = settings
        .minter
        .mint_for_call(&group, now_s, call.expires_at);
    let claims = Claims {
        iss: settings.public_url.clone(),
        aud: AUDIENCE.to_owned(),
        sub: peer_id.clone(),
        call: call.id.clone(),
        role,
        name,
        iat: now_s,
        nbf: now_s,
        exp: token_exp,
        jti,
    };
    let signal_token = settings.jwt.sign(&claims);
    Ok(Joined {
        call_id: call.id,
        peer_id,
        role,
        signal_url: signal_url(&settings.public_url),
        signal_token,
        ice_servers: minted.ice_servers,
        ice_servers_expire_at: rfc3339_s(minted.expires_at),
        expires_at: rfc3339_ms(call.expires_at),
    })
}

/// The credential group of one participant's TURN credentials: `CALL_GROUP.PEER_ID` (both
/// from the URL-safe id alphabet, without `.`, so the relay splits them back unambiguously).
pub(crate) fn peer_group(call_group: &str, peer_id: &str) -> String {
    format!("{call_group}.{peer_id}")
}

/// The signaling WebSocket URL: the public URL with `http`→`ws`, `https`→`wss`.
fn signal_url(public_url: &str) -> String {
    let base = if let Some(rest) = public_url.strip_prefix("https://") {
        format!("wss://{rest}")
    } else if let Some(rest) = public_url.strip_prefix("http://") {
        format!("ws://{rest}")
    } else {
        public_url.to_owned()
    };
    format!("{base}/v1/signal")
}

#[cfg(test)]
mod tests {
    use super::signal_url;

    #[test]
    fn signal_urls() {
        assert_eq!(signal_url("https://a.example"), "wss://a.example/v1/signal");
        assert_eq!(
            signal_url("http://127.0.0.1:8080"),
            "ws://127.0.0.1:8080/v1/signal"
        );
    }
}
