//! Bearer authentication: the operator's admin token and app keys.

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::{header, HeaderMap};
use sha2::{Digest as _, Sha256};
use subtle::ConstantTimeEq as _;

use super::{ApiError, AppState};
use crate::secrets::Domain;
use crate::store::App;

/// No app key is shorter: generated ones are `tpk_` + 32 characters, and config refuses keys
/// under 16 bytes. Anything shorter is refused without asking the store. (Not the `tpk_`
/// prefix: keys declared in `[[control.apps]]` may be any secret of 16 bytes or more.)
const MIN_APP_KEY_BYTES: usize = 16;

/// The bearer token of `Authorization: Bearer <token>` (scheme case-insensitive, RFC 9110).
fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

/// Proof that the request carries the admin token.
#[derive(Debug)]
pub(crate) struct Admin;

impl FromRequestParts<AppState> for Admin {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        // No admin token configured: the admin API does not exist (the router leaves its
        // routes out too; this is the second lock).
        let Some(expected) = state.settings.admin_token.as_deref() else {
            return Err(ApiError::NotFound);
        };
        let given = bearer(&parts.headers).ok_or(ApiError::Unauthorized)?;
        // Compare fixed-length hashes in constant time: neither the content nor the length of
        // the token leaks through timing.
        let given = Sha256::digest(given.as_bytes());
        let expected = Sha256::digest(expected.as_bytes());
        if bool::from(given.ct_eq(&expected)) {
            Ok(Self)
        } else {
            Err(ApiError::Unauthorized)
        }
    }
}

/// The enabled app whose key the request carries.
#[derive(Debug)]
pub(crate) struct AppKey(pub(crate) App);

impl FromRequestParts<AppState> for AppKey {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let key = bearer(&parts.headers)
            .filter(|k| k.len() >= MIN_APP_KEY_BYTES)
            .ok_or(ApiError::Unauthorized)?;
        let digest = state
            .settings
            .hash_key
            .digest(Domain::AppKey, key.as_bytes());
        // The store is looked up by the key's keyed hash, an exact-match index: no comparison
        // of secrets happens here whose timing could leak.
        let app = state
            .store
            .app_for_key(digest)
            .await?
            .ok_or(ApiError::Unauthorized)?;
        if app.disabled {
            return Err(ApiError::AppDisabled);
        }
        Ok(Self(app))
    }
}
