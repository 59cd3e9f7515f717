//! HTTP surface: the FHIR REST API at `/fhir`, the token endpoint, audit queries
//! and operations endpoints. Handlers are thin: they parse HTTP, call the
//! [`Engine`](crate::engine::Engine) and render FHIR responses.

pub mod extract;
mod fhir;
mod ops;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::Value;
use tsunagi_fhir::{FHIR_JSON, FhirError};

use crate::state::AppState;

/// An error answered as an OperationOutcome with its status.
#[derive(Debug)]
pub struct ApiError(pub FhirError);

impl From<FhirError> for ApiError {
    fn from(e: FhirError) -> Self {
        ApiError(e)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status =
            StatusCode::from_u16(self.0.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        if status.is_server_error() {
            tracing::error!(status = self.0.status, error = %self.0, "request failed");
        }
        let mut resp = fhir_json(status, &self.0.to_outcome());
        if status == StatusCode::UNAUTHORIZED {
            resp.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"tsunagi\""),
            );
        }
        resp
    }
}

pub type ApiResult<T> = Result<T, ApiError>;

/// A JSON response with the FHIR media type.
pub fn fhir_json(status: StatusCode, body: &Value) -> Response {
    fhir_text(status, serde_json::to_vec(body).unwrap_or_default())
}

/// A response with the FHIR media type whose body is JSON text already.
pub fn fhir_text(status: StatusCode, body: impl Into<axum::body::Body>) -> Response {
    (
        status,
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/fhir+json; charset=utf-8"),
        )],
        body.into(),
    )
        .into_response()
}

/// The whole router: platform routes plus every service module's routes.
pub fn router(state: AppState) -> Router {
    let limit = state.config.max_body_bytes;
    let mut app = Router::new().merge(ops::routes()).merge(fhir::routes());
    for service in state.services.iter() {
        app = app.merge(service.routes());
    }
    app.fallback(fallback)
        .layer(DefaultBodyLimit::max(limit))
        .layer(axum::middleware::from_fn(ops::track))
        .layer(tower_http::catch_panic::CatchPanicLayer::custom(|_| {
            ApiError(FhirError::internal(
                "The server hit an internal error; the request was not completed",
            ))
            .into_response()
        }))
        .with_state(state)
}

async fn fallback(method: axum::http::Method, uri: axum::http::Uri) -> ApiError {
    ApiError(FhirError::not_found(format!(
        "No endpoint for {method} {}",
        uri.path()
    )))
}

/// Media type check for `Accept`: JSON only.
pub fn accepts_json(headers: &axum::http::HeaderMap) -> bool {
    match headers.get(header::ACCEPT).and_then(|v| v.to_str().ok()) {
        None => true,
        Some(a) => a.split(',').any(|m| {
            let m = m.split(';').next().unwrap_or("").trim();
            m == FHIR_JSON
                || m == "application/json"
                || m == "*/*"
                || m == "application/*"
                || m.is_empty()
        }),
    }
}
