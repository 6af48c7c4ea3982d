//! The API's one error type and the extractors that turn axum's rejections into it.

use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, JsonRejection, PathRejection, QueryRejection};
use axum::extract::{FromRequest, FromRequestParts, OptionalFromRequest, Request};
use axum::http::request::Parts;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::store::StoreError;

/// Why a request failed: each variant is one HTTP status and one stable `code` string; the
/// body is `{"error":{"code","message"}}`. Messages are safe to show: the cause of a 5xx is
/// logged, never sent.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// 400 `bad_request`: malformed or too deeply nested JSON, a bad query string or cursor.
    #[error("bad request: {0}")]
    BadRequest(String),
    /// 401 `unauthorized`: no bearer credentials, or not ones we know.
    #[error("missing or invalid bearer credentials")]
    Unauthorized,
    /// 403 `app_disabled`: the app key is valid but its app is disabled.
    #[error("this app is disabled")]
    AppDisabled,
    /// 404 `not_found`: no such route, or no such resource for this caller.
    #[error("not found")]
    NotFound,
    /// 404 `invalid_or_expired`: a join code or token that does not admit (whatever the reason).
    #[error("invalid or expired join code or token")]
    InvalidOrExpired,
    /// 405 `method_not_allowed`: the route exists, not with this method.
    #[error("method not allowed")]
    MethodNotAllowed,
    /// 409 `conflict`: the resource exists already.
    #[error("conflict: {0}")]
    Conflict(String),
    /// 409 `call_full`: `max_participants` are in the call.
    #[error("the call is full")]
    CallFull,
    /// 409 `call_ended`: the call has ended or expired.
    #[error("the call has ended")]
    CallEnded,
    /// 409 `call_join_limit`: the call has admitted all the joins it can over its life
    /// ([`crate::store::JOINS_PER_SEAT`] per seat).
    #[error("the call has admitted all the joins it can; create a new call")]
    JoinLimit,
    /// 413 `payload_too_large`: the body is over the configured `max_body`.
    #[error("request body too large")]
    PayloadTooLarge,
    /// 415 `unsupported_media_type`: a body that is not `application/json`.
    #[error("unsupported media type")]
    UnsupportedMediaType,
    /// 422 `invalid_request`: well-formed JSON that is not a valid request (the message names
    /// the field).
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    /// 429 `rate_limited`, with `Retry-After` in seconds.
    #[error("rate limited for {retry_after_s} s")]
    RateLimited {
        /// Seconds until the counting window ends (at least 1).
        retry_after_s: u64,
    },
    /// 503 `unavailable`: the store failed; the request may be retried.
    #[error("store failed")]
    Unavailable(#[from] StoreError),
    /// 503 `timeout`: the request took longer than the configured `request_timeout`.
    #[error("request timed out")]
    Timeout,
}

impl ApiError {
    /// The HTTP status.
    pub fn status(&self) -> StatusCode {
        match self {
            Self::BadRequest(_) => StatusCode::BAD_REQUEST,
            Self::Unauthorized => StatusCode::UNAUTHORIZED,
            Self::AppDisabled => StatusCode::FORBIDDEN,
            Self::NotFound | Self::InvalidOrExpired => StatusCode::NOT_FOUND,
            Self::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            Self::Conflict(_) | Self::CallFull | Self::CallEnded | Self::JoinLimit => {
                StatusCode::CONFLICT
            }
            Self::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Self::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Self::InvalidRequest(_) => StatusCode::UNPROCESSABLE_ENTITY,
            Self::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            Self::Unavailable(_) | Self::Timeout => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    /// The stable machine-readable code.
    pub fn code(&self) -> &'static str {
        match self {
            Self::BadRequest(_) => "bad_request",
            Self::Unauthorized => "unauthorized",
            Self::AppDisabled => "app_disabled",
            Self::NotFound => "not_found",
            Self::InvalidOrExpired => "invalid_or_expired",
            Self::MethodNotAllowed => "method_not_allowed",
            Self::Conflict(_) => "conflict",
            Self::CallFull => "call_full",
            Self::CallEnded => "call_ended",
            Self::JoinLimit => "call_join_limit",
            Self::PayloadTooLarge => "payload_too_large",
            Self::UnsupportedMediaType => "unsupported_media_type",
            Self::InvalidRequest(_) => "invalid_request",
            Self::RateLimited { .. } => "rate_limited",
            Self::Unavailable(_) => "unavailable",
            Self::Timeout => "timeout",
        }
    }

    /// What the client is told.
    fn message(&self) -> String {
        match self {
            Self::BadRequest(m) | Self::Conflict(m) | Self::InvalidRequest(m) => m.clone(),
            Self::Unauthorized => "send a valid key as `Authorization: Bearer <key>`".to_owned(),
            Self::InvalidOrExpired => {
                "the join code or token is invalid or expired, or the call has ended".to_owned()
            }
            Self::UnsupportedMediaType => {
                "send the body as JSON with `Content-Type: application/json`".to_owned()
            }
            Self::RateLimited { retry_after_s } => {
                format!("too many attempts; retry in {retry_after_s} s")
            }
            Self::Unavailable(_) => {
                "the service is temporarily unavailable; retry later".to_owned()
            }
            Self::Timeout => "the request took too long".to_owned(),
            Self::AppDisabled
            | Self::NotFound
            | Self::MethodNotAllowed
            | Self::CallFull
            | Self::CallEnded
            | Self::JoinLimit
            | Self::PayloadTooLarge => self.to_string(),
        }
    }
}

/// The error body.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(crate) struct ErrorBody {
    /// What went wrong.
    pub(crate) error: ErrorDetail,
}

/// The error itself.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(crate) struct ErrorDetail {
    /// Stable machine-readable code (`bad_request`, `unauthorized`, `invalid_or_expired`, …).
    pub(crate) code: String,
    /// Human-readable explanation (may change; do not parse).
    pub(crate) message: String,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        match &self {
            // The one place a 5xx cause is logged; the client only gets the generic message.
            Self::Unavailable(cause) => tracing::error!(error = %cause, "store failed"),
            Self::Timeout => tracing::warn!("request timed out"),
            _ => {}
        }
        let status = self.status();
        let body = ErrorBody {
            error: ErrorDetail {
                code: self.code().to_owned(),
                message: self.message(),
            },
        };
        let mut response = (status, axum::Json(body)).into_response();
        let headers = response.headers_mut();
        match self {
            Self::Unauthorized => {
                headers.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            }
            Self::RateLimited { retry_after_s } => {
                headers.insert(header::RETRY_AFTER, HeaderValue::from(retry_after_s.max(1)));
            }
            _ => {}
        }
        response
    }
}

/// Maps a body rejection by its status (axum's variants are many; the statuses are the
/// contract).
fn body_error(status: StatusCode, text: String) -> ApiError {
    match status {
        StatusCode::PAYLOAD_TOO_LARGE => ApiError::PayloadTooLarge,
        StatusCode::UNSUPPORTED_MEDIA_TYPE => ApiError::UnsupportedMediaType,
        StatusCode::UNPROCESSABLE_ENTITY => ApiError::InvalidRequest(text),
        _ => ApiError::BadRequest(text),
    }
}

impl From<JsonRejection> for ApiError {
    fn from(r: JsonRejection) -> Self {
        body_error(r.status(), r.body_text())
    }
}

impl From<BytesRejection> for ApiError {
    fn from(r: BytesRejection) -> Self {
        body_error(r.status(), r.body_text())
    }
}

impl From<QueryRejection> for ApiError {
    fn from(r: QueryRejection) -> Self {
        Self::BadRequest(r.body_text())
    }
}

impl From<PathRejection> for ApiError {
    fn from(r: PathRejection) -> Self {
        Self::BadRequest(r.body_text())
    }
}

/// `axum::Json` with our errors. As `Option<Json<T>>`, an empty body without a content type is
/// `None` (for requests whose fields are all optional: `curl -X POST` works).
#[derive(Debug)]
pub(crate) struct Json<T>(pub(crate) T);

impl<S, T> FromRequest<S> for Json<T>
where
    S: Send + Sync,
    T: DeserializeOwned,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        let axum::Json(value) = <axum::Json<T> as FromRequest<S>>::from_request(req, state).await?;
        Ok(Self(value))
    }
}

impl<S, T> OptionalFromRequest<S> for Json<T>
where
    S: Send + Sync,
    T: DeserializeOwned,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Option<Self>, ApiError> {
        if req.headers().contains_key(header::CONTENT_TYPE) {
            return <Self as FromRequest<S>>::from_request(req, state)
                .await
                .map(Some);
        }
        let body = Bytes::from_request(req, state).await?;
        if body.is_empty() {
            Ok(None)
        } else {
            Err(ApiError::UnsupportedMediaType)
        }
    }
}

/// `axum::extract::Path` with our errors.
#[derive(Debug)]
pub(crate) struct Path<T>(pub(crate) T);

impl<S, T> FromRequestParts<S> for Path<T>
where
    S: Send + Sync,
    T: DeserializeOwned + Send,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        let axum::extract::Path(value) =
            axum::extract::Path::<T>::from_request_parts(parts, state).await?;
        Ok(Self(value))
    }
}

/// `axum::extract::Query` with our errors.
#[derive(Debug)]
pub(crate) struct Query<T>(pub(crate) T);

impl<S, T> FromRequestParts<S> for Query<T>
where
    S: Send + Sync,
    T: DeserializeOwned,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        let axum::extract::Query(value) =
            axum::extract::Query::<T>::from_request_parts(parts, state).await?;
        Ok(Self(value))
    }
}
