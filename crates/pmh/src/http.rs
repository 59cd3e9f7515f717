//! Small helpers shared by the PMH handlers: caller checks, denials, audit.

use axum::http::StatusCode;
use axum::response::Response;
use serde_json::Value;
use tsunagi_fhir::{FhirError, FhirResult};
use tsunagi_policy::audit::AuditRecord;
use tsunagi_policy::identity::{OrgKind, Purpose, Role};
use tsunagi_policy::policy::Operation;
use tsunagi_server::http::fhir_json;
use tsunagi_server::{AppState, Ctx};
use tsunagi_store::{Scope, Store, StoredResource};

/// The municipality (地方公共団体コード) a caller acts for, when municipality staff.
pub fn municipality_of(ctx: &Ctx) -> Option<&str> {
    let p = &ctx.principal;
    (p.role == Role::MunicipalityStaff && p.org_kind == OrgKind::Municipality)
        .then_some(p.org.as_str())
}

/// Staff of a care facility (clinical or clerk) acting for treatment.
pub fn is_facility_staff(ctx: &Ctx) -> bool {
    let p = &ctx.principal;
    p.org_kind.is_care_facility()
        && (p.role.is_clinical() || p.role == Role::Clerk)
        && ctx.purpose == Purpose::Treatment
}

/// Audits a denial and returns the 403.
pub async fn deny(state: &AppState, ctx: &Ctx, what: &str, reason: String) -> FhirError {
    state
        .engine
        .deny(ctx, Operation::Read, None, vec![what.to_string()], reason)
        .await
}

/// The municipality of the caller, or the audited 403.
pub async fn require_municipality(state: &AppState, ctx: &Ctx, what: &str) -> FhirResult<String> {
    match municipality_of(ctx) {
        Some(m) => Ok(m.to_string()),
        None => Err(deny(
            state,
            ctx,
            what,
            format!(
                "{what} is for municipality staff; role {} at a {} may not use it",
                ctx.principal.role, ctx.principal.org_kind
            ),
        )
        .await),
    }
}

/// Audits a service action touching one patient (durable before the answer).
pub async fn audit_action(
    state: &AppState,
    ctx: &Ctx,
    action: &str,
    patient: Option<String>,
    resources: Vec<String>,
) -> FhirResult<()> {
    let rec = AuditRecord::new(&ctx.principal, ctx.purpose, action, ctx.request_id.clone())
        .with_patient(patient)
        .with_resources(resources);
    state.engine.audit.record(rec).await
}

/// A required string member of a JSON request body.
pub fn required_str(body: &Value, key: &str) -> FhirResult<String> {
    match body.get(key).and_then(Value::as_str).map(str::trim) {
        Some(s) if !s.is_empty() => Ok(s.to_string()),
        _ => Err(FhirError::invalid_element(
            key,
            format!("{key} is required"),
        )),
    }
}

/// A `Patient/{id}` reference or a bare id, as the id.
pub fn patient_id(s: &str) -> String {
    s.strip_prefix("Patient/").unwrap_or(s).to_string()
}

/// A `searchset` Bundle of stored resources, with its total, answered 200.
pub fn searchset(found: impl IntoIterator<Item = tsunagi_store::StoredResource>) -> Response {
    let resources = found.into_iter().filter_map(|s| s.resource).collect();
    fhir_json(
        StatusCode::OK,
        &tsunagi_fhir::bundle::searchset_of(resources, None),
    )
}

/// `Type/id/_history/v` of a stored resource (audit references).
pub fn reference(s: &tsunagi_store::StoredResource) -> String {
    format!("{}/{}/_history/{}", s.resource_type, s.id, s.version)
}

/// Every match of an unscoped search (service reads that callers check and
/// audit themselves), in pages of 1,000.
pub fn search_all(
    store: &dyn Store,
    rt: &str,
    params: &[(&str, String)],
) -> FhirResult<Vec<StoredResource>> {
    let mut all = Vec::new();
    loop {
        let mut p: Vec<(String, String)> = params
            .iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect();
        p.push(("_count".into(), "1000".into()));
        p.push(("_offset".into(), all.len().to_string()));
        let found = store.search(&tsunagi_fhir::query::parse(rt, &p)?, &Scope::Unrestricted)?;
        let n = found.matches.len();
        all.extend(found.matches);
        if n < 1000 {
            return Ok(all);
        }
    }
}
