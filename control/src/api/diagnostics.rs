//! `POST /v1/diagnostics/ice-servers`: TURN credentials for the public diagnostics page
//! (`/diagnostics`), which checks from a user's browser whether Turnpike's STUN and TURN over
//! UDP, TCP and TLS are reachable.
//!
//! Public (the page is for anyone a support team sends it to), so the credentials are made
//! cheap to give away: they live [`DIAGNOSTICS_TTL_S`] seconds, long enough to gather
//! candidates, too short to be worth harvesting; they are all in the one credential group
//! [`DIAGNOSTICS_GROUP`], so the relay can revoke every one of them at once without touching a
//! call's; and each client address gets at most [`DIAGNOSTICS_PER_IP`] a minute, counted in
//! the store like the join limits (so shared by every node).

use std::net::SocketAddr;
use std::time::Duration;

use axum::extract::{ConnectInfo, State};

use super::calls::Credentials;
use super::error::ErrorBody;
use super::metrics::Via;
use super::util::{client_key, retry_after_s};
use super::{ApiError, AppState};

/// Lifetime of diagnostics credentials, in seconds: a page run takes at most about 10 s per
/// check, all checks run at once.
pub const DIAGNOSTICS_TTL_S: u64 = 60;

/// The credential group of every diagnostics credential (usernames
/// `EXPIRY:diagnostics.RANDOM`): never a call's group (those are `g…` ids), and a valid relay
/// group, so revoking it on the relay stops them all.
pub const DIAGNOSTICS_GROUP: &str = "diagnostics";

/// Credentials per client address (IPv4 address or IPv6 /64) and [`DIAGNOSTICS_WINDOW`]: one
/// page run asks once; ten allows reloads and a few people behind one NAT.
pub const DIAGNOSTICS_PER_IP: u64 = 10;

/// The counting window of [`DIAGNOSTICS_PER_IP`].
pub const DIAGNOSTICS_WINDOW: Duration = Duration::from_secs(60);

/// Short-lived TURN credentials for the diagnostics page.
#[utoipa::path(
    post, path = "/v1/diagnostics/ice-servers", tag = "public",
    responses(
        (status = 200, description = "Credentials valid for 60 s, in the diagnostics credential group", body = Credentials),
        (status = 429, description = "More than 10 requests a minute from this address; see Retry-After", body = ErrorBody),
        (status = 503, description = "Temporarily unavailable", body = ErrorBody),
    )
)]
pub(crate) async fn ice_servers(
    State(state): State<AppState>,
    ConnectInfo(client): ConnectInfo<SocketAddr>,
) -> Result<axum::Json<Credentials>, ApiError> {
    let now = state.clock.now_ms();
    let key = format!("diag:ip:{}", client_key(client.ip()));
    let window_ms = DIAGNOSTICS_WINDOW.as_millis() as u64;
    let (hits, reset_ms) = state.store.hit(&key, window_ms, now).await?;
    if hits > DIAGNOSTICS_PER_IP {
        return Err(ApiError::RateLimited {
            retry_after_s: retry_after_s(reset_ms),
        });
    }
    let minted = state
        .settings
        .minter
        .mint(DIAGNOSTICS_GROUP, now / 1000, DIAGNOSTICS_TTL_S);
    state.metrics.credentials(Via::Diagnostics);
    Ok(axum::Json(Credentials::from_minted(minted)))
}
