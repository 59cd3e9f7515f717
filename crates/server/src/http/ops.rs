//! Operations endpoints (health, readiness, metrics), the OAuth token endpoint,
//! the auditors' query and request metrics.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::time::Instant;

use axum::Router;
use axum::extract::{MatchedPath, RawQuery, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::{Value, json};
use tsunagi_fhir::FhirError;
use tsunagi_fhir::datetime::{format_instant, parse_instant};
use tsunagi_policy::policy::Operation;
use tsunagi_store::AuditFilter;

use super::extract::Caller;
use super::{ApiResult, fhir_json};
use crate::engine::blocking;
use crate::state::AppState;

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_text))
        .route("/auth/token", post(token))
        .route("/.well-known/smart-configuration", get(smart_configuration))
        .route("/audit/events", get(audit_events))
}

async fn healthz() -> &'static str {
    "ok"
}

/// Ready when not draining and the database answers.
async fn readyz(State(state): State<AppState>) -> Response {
    if !state.ready.load(Ordering::Relaxed) {
        return (StatusCode::SERVICE_UNAVAILABLE, "draining").into_response();
    }
    let store = state.engine.store.clone();
    match blocking(move || store.schema_version()).await {
        Ok(_) => "ready".into_response(),
        Err(_) => (StatusCode::SERVICE_UNAVAILABLE, "database unavailable").into_response(),
    }
}

async fn metrics_text(State(state): State<AppState>) -> Response {
    match &state.metrics {
        Some(h) => (
            [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
            h.render(),
        )
            .into_response(),
        None => (StatusCode::NOT_FOUND, "metrics are not enabled").into_response(),
    }
}

/// Counts and times every request by route pattern (never by raw path, which
/// would put ids into metric labels).
pub async fn track(req: Request, next: Next) -> Response {
    let started = Instant::now();
    let method = req.method().to_string();
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|m| m.as_str().to_string())
        .unwrap_or_else(|| "unmatched".into());
    let resp = next.run(req).await;
    let status = resp.status().as_u16().to_string();
    metrics::counter!("tsunagi_http_requests_total", "method" => method.clone(), "route" => route.clone(), "status" => status).increment(1);
    metrics::histogram!("tsunagi_http_request_seconds", "method" => method, "route" => route)
        .record(started.elapsed().as_secs_f64());
    resp
}

fn token_endpoint(state: &AppState) -> String {
    let base = state.engine.base_url.trim_end_matches('/');
    let root = base.strip_suffix("/fhir").unwrap_or(base);
    format!("{root}/auth/token")
}

async fn smart_configuration(State(state): State<AppState>) -> Response {
    let body = json!({
        "token_endpoint": token_endpoint(&state),
        "token_endpoint_auth_methods_supported": ["private_key_jwt"],
        "token_endpoint_auth_signing_alg_values_supported": ["ES384", "RS384", "ES256", "RS256", "EdDSA"],
        "grant_types_supported": ["client_credentials"],
        "capabilities": ["client-confidential-asymmetric"],
    });
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}

/// `POST /auth/token`: OAuth2 client credentials with a `private_key_jwt` assertion.
async fn token(State(state): State<AppState>, body: axum::body::Bytes) -> Response {
    let form: HashMap<String, String> = form_urlencoded::parse(&body).into_owned().collect();
    let st = state.clone();
    let endpoint = token_endpoint(&state);
    let result = tokio::task::spawn_blocking(move || {
        let store = st.engine.store.clone();
        let lookup = |code: &str| crate::orgs::lookup(&*store, code);
        tsunagi_policy::exchange_client_assertion(
            &*st.engine.store,
            &st.keys,
            &form,
            &endpoint,
            chrono::Utc::now(),
            &st.replay,
            &lookup,
        )
    })
    .await;
    let (status, body) = match result {
        Ok(Ok(t)) => (StatusCode::OK, t.to_json()),
        Ok(Err(e)) => (
            StatusCode::from_u16(e.status).unwrap_or(StatusCode::BAD_REQUEST),
            e.to_json(),
        ),
        Err(_) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            json!({"error": "server_error"}),
        ),
    };
    let mut resp = (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response();
    resp.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

/// `GET /audit/events`: auditors (operator role) query the audit trail.
async fn audit_events(
    State(state): State<AppState>,
    Caller(ctx): Caller,
    RawQuery(raw): RawQuery,
) -> ApiResult<Response> {
    state
        .engine
        .authorize(
            &ctx,
            Operation::AuditQuery,
            "",
            None,
            None,
            vec!["audit".into()],
        )
        .await?;
    let mut f = AuditFilter {
        limit: 100,
        ..Default::default()
    };
    for (k, v) in form_urlencoded::parse(raw.unwrap_or_default().as_bytes()).into_owned() {
        let instant = |v: &str| {
            parse_instant(v).ok_or_else(|| {
                FhirError::bad_request(None, format!("{k}: '{v}' is not an instant"))
            })
        };
        match k.as_str() {
            "patient" => f.patient = Some(v),
            "org" => f.org = Some(v),
            "user" => f.user = Some(v),
            "purpose" => f.purpose = Some(v),
            "since" => f.since = Some(instant(&v)?),
            "until" => f.until = Some(instant(&v)?),
            "after" => {
                f.after_seq = Some(v.parse().map_err(|_| {
                    FhirError::bad_request(None, "after must be an audit sequence number")
                })?)
            }
            "_count" => {
                f.limit = v
                    .parse::<usize>()
                    .map_err(|_| FhirError::bad_request(None, "_count must be a number"))?
                    .min(1000)
            }
            other => {
                return Err(FhirError::new(
                    400,
                    "not-supported",
                    None,
                    format!("Audit query parameter '{other}' is not supported"),
                )
                .into());
            }
        }
    }
    let store = state.engine.store.clone();
    let entries = blocking(move || store.audit_query(&f)).await?;
    let items: Vec<Value> = entries
        .into_iter()
        .map(|e| json!({"seq": e.seq, "recorded": format_instant(&e.recorded), "record": e.record, "hash": e.hash}))
        .collect();
    // The auditor's own query is itself audited (operations purpose, no patient).
    state
        .engine
        .audit
        .record(crate::engine::audit_record(
            &ctx,
            Operation::AuditQuery,
            None,
            vec!["audit".into()],
            tsunagi_policy::audit::Outcome::Success,
            200,
            None,
        ))
        .await?;
    Ok(fhir_json(
        StatusCode::OK,
        &json!({ "total": items.len(), "events": items }),
    ))
}
