//! Request extractors: the authenticated caller and the FHIR JSON body.

use axum::body::Bytes;
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::header::{AUTHORIZATION, CONTENT_TYPE};
use axum::http::request::Parts;
use serde_json::Value;
use tsunagi_fhir::FhirError;
use tsunagi_policy::identity::Purpose;

use crate::engine::Ctx;
use crate::http::ApiError;
use crate::state::AppState;

/// Header a caller states its purpose of use in (treatment, emergency, ...).
pub const PURPOSE_HEADER: &str = "x-purpose-of-use";

/// The authenticated caller: a verified bearer token, plus the declared purpose.
pub struct Caller(pub Ctx);

impl FromRequestParts<AppState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let header = parts
            .headers
            .get(AUTHORIZATION)
            .ok_or_else(|| FhirError::unauthorized("Authorization: Bearer <token> is required"))?;
        let token = header
            .to_str()
            .ok()
            .and_then(|h| {
                h.strip_prefix("Bearer ")
                    .or_else(|| h.strip_prefix("bearer "))
            })
            .ok_or_else(|| {
                FhirError::unauthorized("The Authorization header must carry a Bearer token")
            })?;
        let principal = state.keys.verify(token.trim(), chrono::Utc::now())?;
        let purpose = match parts.headers.get(PURPOSE_HEADER) {
            None => None,
            Some(v) => Some(
                v.to_str()
                    .ok()
                    .and_then(|s| s.parse::<Purpose>().ok())
                    .ok_or_else(|| FhirError::bad_request(None, format!("{PURPOSE_HEADER} must be one of: treatment, emergency, disaster, patient-self, insurer, research, operations")))?,
            ),
        };
        Ok(Caller(Ctx::new(principal, purpose)))
    }
}

/// A FHIR JSON request body: content type checked (415), size limited (413),
/// parsed (400 naming line and column).
pub struct FhirJson(pub Value);

impl FromRequest<AppState> for FhirJson {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &AppState) -> Result<Self, ApiError> {
        let ct = req
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        let media = ct
            .split(';')
            .next()
            .unwrap_or("")
            .trim()
            .to_ascii_lowercase();
        if media != "application/fhir+json" && media != "application/json" {
            return Err(FhirError::new(
                415,
                "not-supported",
                None,
                format!(
                    "Content-Type must be application/fhir+json, not '{}'",
                    if ct.is_empty() { "(none)" } else { ct }
                ),
            )
            .into());
        }
        let bytes = Bytes::from_request(req, state).await.map_err(|e| {
            if e.status().as_u16() == 413 {
                FhirError::new(
                    413,
                    "too-costly",
                    None,
                    "The request body is larger than the server accepts (see max_body_bytes)",
                )
            } else {
                FhirError::bad_request(None, format!("Could not read the request body: {e}"))
            }
        })?;
        let value: Value = serde_json::from_slice(&bytes).map_err(|e| {
            FhirError::new(
                400,
                "structure",
                None,
                format!(
                    "The body is not valid JSON: {e} (line {}, column {})",
                    e.line(),
                    e.column()
                ),
            )
        })?;
        Ok(FhirJson(value))
    }
}
