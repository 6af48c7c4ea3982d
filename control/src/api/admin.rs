//! Operator routes: apps and their keys (`Authorization: Bearer <admin-token>`).

use axum::extract::State;
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::auth::Admin;
use super::error::{ErrorBody, Json, Path};
use super::util::{app_id, rfc3339_ms, short_text};
use super::{ApiError, AppState};
use crate::secrets::{self, Domain};
use crate::store::App;

/// `POST /v1/apps`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct CreateApp {
    /// Human name (1..=128 characters).
    name: String,
    /// The id to use (1..=64 of `A-Z a-z 0-9 _ -`); default `app_` + random.
    id: Option<String>,
}

/// A new app, with its first key: the only time the key is shown.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct CreatedApp {
    id: String,
    name: String,
    disabled: bool,
    /// RFC 3339.
    created_at: String,
    /// The app key (`tpk_…`): store it now, it cannot be shown again.
    key: String,
}

/// An app as listed (never with keys).
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct AppView {
    id: String,
    name: String,
    /// A disabled app's keys get 403 and its calls cannot be joined.
    disabled: bool,
    /// Declared in the config file (re-applied at every start).
    from_config: bool,
    /// RFC 3339.
    created_at: String,
}

impl From<App> for AppView {
    fn from(a: App) -> Self {
        Self {
            id: a.id,
            name: a.name,
            disabled: a.disabled,
            from_config: a.from_config,
            created_at: rfc3339_ms(a.created_at),
        }
    }
}

/// `GET /v1/apps`.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct AppList {
    apps: Vec<AppView>,
}

/// A new key for an app.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct CreatedKey {
    app_id: String,
    /// The app key (`tpk_…`): store it now, it cannot be shown again.
    key: String,
}

/// `PATCH /v1/apps/{id}`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct UpdateApp {
    /// Disable (keys get 403, calls cannot be joined) or enable again.
    disabled: bool,
}

/// Creates an app and its first key.
#[utoipa::path(
    post, path = "/v1/apps", tag = "admin",
    security(("admin_token" = [])),
    request_body = CreateApp,
    responses(
        (status = 201, description = "Created; the key is shown only now", body = CreatedApp),
        (status = 401, description = "Missing or wrong admin token", body = ErrorBody),
        (status = 404, description = "No admin token configured", body = ErrorBody),
        (status = 409, description = "An app with this id exists", body = ErrorBody),
        (status = 422, description = "Invalid request", body = ErrorBody),
    )
)]
pub(crate) async fn create_app(
    _admin: Admin,
    State(state): State<AppState>,
    Json(req): Json<CreateApp>,
) -> Result<(StatusCode, axum::Json<CreatedApp>), ApiError> {
    let name = short_text("name", &req.name)?;
    let id = match req.id {
        Some(id) => app_id(&id)?,
        None => secrets::new_id("app_"),
    };
    let key = secrets::new_app_key();
    let digest = state
        .settings
        .hash_key
        .digest(Domain::AppKey, key.as_bytes());
    let app = App {
        id,
        name,
        disabled: false,
        from_config: false,
        created_at: state.clock.now_ms(),
    };
    if !state.store.put_app(&app, &[digest]).await? {
        return Err(ApiError::Conflict(format!(
            "an app with id {:?} exists",
            app.id
        )));
    }
    tracing::info!(app = %app.id, "app created");
    Ok((
        StatusCode::CREATED,
        axum::Json(CreatedApp {
            id: app.id,
            name: app.name,
            disabled: false,
            created_at: rfc3339_ms(app.created_at),
            key,
        }),
    ))
}

/// Lists every app (never their keys).
#[utoipa::path(
    get, path = "/v1/apps", tag = "admin",
    security(("admin_token" = [])),
    responses(
        (status = 200, description = "All apps, by id", body = AppList),
        (status = 401, description = "Missing or wrong admin token", body = ErrorBody),
        (status = 404, description = "No admin token configured", body = ErrorBody),
    )
)]
pub(crate) async fn list_apps(
    _admin: Admin,
    State(state): State<AppState>,
) -> Result<axum::Json<AppList>, ApiError> {
    let apps = state.store.list_apps().await?;
    Ok(axum::Json(AppList {
        apps: apps.into_iter().map(AppView::from).collect(),
    }))
}

/// Adds a key to an app (the app's other keys keep working).
#[utoipa::path(
    post, path = "/v1/apps/{id}/keys", tag = "admin",
    security(("admin_token" = [])),
    params(("id" = String, Path, description = "App id")),
    responses(
        (status = 201, description = "Created; the key is shown only now", body = CreatedKey),
        (status = 401, description = "Missing or wrong admin token", body = ErrorBody),
        (status = 404, description = "No such app (or no admin token configured)", body = ErrorBody),
    )
)]
pub(crate) async fn add_key(
    _admin: Admin,
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<(StatusCode, axum::Json<CreatedKey>), ApiError> {
    let key = secrets::new_app_key();
    let digest = state
        .settings
        .hash_key
        .digest(Domain::AppKey, key.as_bytes());
    if !state.store.add_app_key(&id, digest).await? {
        return Err(ApiError::NotFound);
    }
    tracing::info!(app = %id, "app key added");
    Ok((
        StatusCode::CREATED,
        axum::Json(CreatedKey { app_id: id, key }),
    ))
}

/// Enables or disables an app.
#[utoipa::path(
    patch, path = "/v1/apps/{id}", tag = "admin",
    security(("admin_token" = [])),
    params(("id" = String, Path, description = "App id")),
    request_body = UpdateApp,
    responses(
        (status = 200, description = "The app as it is now", body = AppView),
        (status = 401, description = "Missing or wrong admin token", body = ErrorBody),
        (status = 404, description = "No such app (or no admin token configured)", body = ErrorBody),
        (status = 422, description = "Invalid request", body = ErrorBody),
    )
)]
pub(crate) async fn update_app(
    _admin: Admin,
    State(state): State<AppState>,
    Path(id): Path<String>,
    Json(req): Json<UpdateApp>,
) -> Result<axum::Json<AppView>, ApiError> {
    if !state.store.set_app_disabled(&id, req.disabled).await? {
        return Err(ApiError::NotFound);
    }
    tracing::info!(app = %id, disabled = req.disabled, "app updated");
    let app = state.store.get_app(&id).await?.ok_or(ApiError::NotFound)?;
    Ok(axum::Json(AppView::from(app)))
}
