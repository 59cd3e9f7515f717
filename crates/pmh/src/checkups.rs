//! Maternal and child health (母子保健: pregnancy and infant checkups) and municipal
//! checkups (自治体検診) reported by institutions to the municipality.
//!
//! The institution registers each result as a FHIR resource of the patient
//! (`Observation`, `DiagnosticReport` or `Composition`) through
//! `POST /pmh/checkups`; PMH tags it with the municipality it is reported to
//! (`meta.tag`, local government code) and the checkup kind, and writes it through
//! the engine as the institution's own record (the core policy, validation and
//! audit apply as for any clinical write). Who sees it:
//! - the patient: their own compartment (core rule);
//! - other institutions: under the patient's consent (the eligibility service's
//!   consent rule: category B for Observation/DiagnosticReport, C for Composition);
//! - the municipality it was reported to: `GET /pmh/checkups?patient=`, which
//!   answers only results tagged with the caller's municipality, audited per patient.

use std::collections::BTreeMap;

use axum::Router;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::Response;
use axum::routing::post;
use serde_json::{Value, json};
use tsunagi_fhir::{FhirError, FhirResult, query};
use tsunagi_server::AppState;
use tsunagi_server::engine::blocking;
use tsunagi_server::http::extract::{Caller, FhirJson};
use tsunagi_server::http::{ApiResult, fhir_json};
use tsunagi_store::{Scope, Store, StoredResource};

use crate::http::{
    audit_action, deny, is_facility_staff, patient_id, reference, require_municipality,
    required_str, searchset,
};

/// `meta.tag` system of the municipality a result is reported to.
pub const REPORTED_TO_SYSTEM: &str = "https://tsunagi.dev/fhir/NamingSystem/local-government-code";
/// `meta.tag` system of the checkup kind.
pub const KIND_SYSTEM: &str = "https://tsunagi.dev/fhir/CodeSystem/pmh-checkup-kind";
/// Kinds of checkup results.
pub const KINDS: &[&str] = &["pregnancy", "infant", "municipal"];
/// Resource types a result may be.
pub const TYPES: &[&str] = &["Observation", "DiagnosticReport", "Composition"];

/// Whether a result carries the tag of this municipality.
pub fn reported_to(r: Option<&Value>, municipality: &str) -> bool {
    r.and_then(|r| r.pointer("/meta/tag"))
        .and_then(Value::as_array)
        .is_some_and(|tags| {
            tags.iter().any(|t| {
                t.get("system").and_then(Value::as_str) == Some(REPORTED_TO_SYSTEM)
                    && t.get("code").and_then(Value::as_str) == Some(municipality)
            })
        })
}

pub fn routes() -> Router<AppState> {
    Router::new().route("/pmh/checkups", post(register).get(list))
}

/// `POST /pmh/checkups` `{"municipality", "kind", "resource"}` (clinical staff).
async fn register(
    State(state): State<AppState>,
    Caller(ctx): Caller,
    FhirJson(body): FhirJson,
) -> ApiResult<Response> {
    if !(is_facility_staff(&ctx) && ctx.principal.role.is_clinical()) {
        return Err(deny(
            &state,
            &ctx,
            "checkup",
            "checkup results are registered by clinical staff of a care facility".into(),
        )
        .await
        .into());
    }
    let municipality = required_str(&body, "municipality")?;
    tsunagi_policy::ids::validate_local_government_code(&municipality)
        .map_err(|e| FhirError::invalid_element("municipality", e.to_string()))?;
    let kind = required_str(&body, "kind")?;
    if !KINDS.contains(&kind.as_str()) {
        return Err(FhirError::invalid_element(
            "kind",
            format!("kind is one of {}, not '{kind}'", KINDS.join(", ")),
        )
        .into());
    }
    let mut resource = body.get("resource").cloned().unwrap_or(Value::Null);
    let rt = resource
        .get("resourceType")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string();
    if !TYPES.contains(&rt.as_str()) {
        return Err(FhirError::invalid_element(
            "resource.resourceType",
            format!("a checkup result is one of {}", TYPES.join(", ")),
        )
        .into());
    }
    if resource
        .pointer("/subject/reference")
        .and_then(Value::as_str)
        .is_none_or(|r| !r.starts_with("Patient/"))
    {
        return Err(FhirError::invalid_element(
            &format!("{rt}.subject"),
            "a checkup result names its patient (subject: Patient/...)",
        )
        .into());
    }
    let tags = json!([
        {"system": REPORTED_TO_SYSTEM, "code": municipality},
        {"system": KIND_SYSTEM, "code": kind}
    ]);
    let meta = resource
        .as_object_mut()
        .map(|o| o.entry("meta").or_insert_with(|| json!({})));
    match meta {
        Some(m) if m.is_object() => {
            let mut all = m
                .get("tag")
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default();
            all.extend(tags.as_array().cloned().unwrap_or_default());
            m["tag"] = Value::Array(all);
        }
        _ => {
            return Err(
                FhirError::invalid_element(&format!("{rt}.meta"), "meta is an object").into(),
            );
        }
    }
    let w = state.engine.create(&ctx, &rt, resource, None).await?;
    Ok(fhir_json(
        StatusCode::CREATED,
        w.stored.resource.as_ref().unwrap_or(&Value::Null),
    ))
}

/// `GET /pmh/checkups?patient=` (municipality): the results reported to it.
async fn list(
    State(state): State<AppState>,
    Query(q): Query<BTreeMap<String, String>>,
    Caller(ctx): Caller,
) -> ApiResult<Response> {
    let m = require_municipality(&state, &ctx, "checkup results").await?;
    let patient = patient_id(q.get("patient").map(String::as_str).unwrap_or(""));
    if patient.is_empty() {
        return Err(FhirError::invalid_element("patient", "patient is required").into());
    }
    let store = state.engine.store.clone();
    let (p2, m2) = (patient.clone(), m.clone());
    let found = blocking(move || results_of(&*store, &p2, |r| reported_to(r, &m2))).await?;
    audit_action(
        &state,
        &ctx,
        "pmh-checkup-view",
        Some(patient),
        found.iter().map(reference).collect(),
    )
    .await?;
    Ok(searchset(found))
}

/// A patient's results of the checkup types that pass `keep` (platform read;
/// callers decide and audit). A patient has few results, so tags are checked
/// here rather than indexed.
pub fn results_of(
    store: &dyn Store,
    patient: &str,
    keep: impl Fn(Option<&Value>) -> bool,
) -> FhirResult<Vec<StoredResource>> {
    let mut out = Vec::new();
    for rt in TYPES {
        let sq = query::parse(
            rt,
            &[
                ("patient".into(), format!("Patient/{patient}")),
                ("_count".into(), "1000".into()),
            ],
        )?;
        out.extend(
            store
                .search(&sq, &Scope::Unrestricted)?
                .matches
                .into_iter()
                .filter(|s| keep(s.resource.as_ref())),
        );
    }
    Ok(out)
}
