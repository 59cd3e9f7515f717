//! `GET /fhir/Patient/{id}/$summary`: one Bundle merging, across institutions,
//! what the caller may see of a patient: current diagnoses, allergies, the
//! latest infection result per item, the latest lab value per item, recent
//! prescriptions, each with its source institution and date. An item is the
//! result's JLAC10 code (its first coding when it has none); history is not
//! part of the summary (it stays searchable).
//!
//! Built from engine searches, so the caller's scope (consent categories, the
//! patient's own view, emergency access) applies inside SQL and every search is
//! audited (with the resources it returned); a kind the caller may not search
//! is left out. Results are read with `Engine::search_latest`: the store picks
//! the newest Observation per code inside the caller's scope, so a patient's
//! result history is not read at all. The newest candidate per item is then
//! chosen here; an Observation coded with two different JLAC10 codes is a
//! candidate only where it is the newest of one of its codes.

use std::collections::HashMap;
use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::Response;
use axum::routing::get;
use axum::{Extension, Router};
use chrono::{DateTime, Utc};
use serde_json::{Value, json};
use tsunagi_fhir::{FhirResult, query};
use tsunagi_server::http::extract::Caller;
use tsunagi_server::http::{ApiResult, fhir_json};
use tsunagi_server::{AppState, Ctx, OperationDecl};
use tsunagi_store::LatestPer;

use crate::Shared;
use crate::kinds::*;

pub fn routes() -> Router<AppState> {
    Router::new().route("/fhir/Patient/{id}/$summary", get(summary))
}

pub fn operations() -> Vec<OperationDecl> {
    vec![OperationDecl {
        name: "summary",
        resource_type: Some("Patient"),
        documentation: "Patient summary across institutions: current diagnoses, allergies, infections, latest lab value per item, recent prescriptions (within what the caller may see)",
    }]
}

/// Search page size.
const PAGE: usize = 1000;

/// Sections of the summary, in order.
const SECTIONS: [&str; 5] = [
    "diagnoses",
    "allergies",
    "infections",
    "lab-latest",
    "prescriptions",
];

async fn summary(
    State(state): State<AppState>,
    Extension(shared): Extension<Arc<Shared>>,
    Caller(ctx): Caller,
    Path(id): Path<String>,
) -> ApiResult<Response> {
    let b = build(&state, &ctx, &id, shared.now(), &shared.config.retention).await?;
    Ok(fhir_json(StatusCode::OK, &b))
}

fn current_condition(r: &Value) -> bool {
    let c = codings(r.get("clinicalStatus"));
    c.is_empty()
        || c.iter()
            .any(|(_, x)| matches!(*x, "active" | "recurrence" | "relapse"))
}

/// Every resource of `rt` in the patient's compartment the caller may see (all
/// pages). With `latest`, only the newest Observation per code that is not
/// withdrawn, chosen in SQL inside the caller's scope (`Engine::search_latest`),
/// so the history of results is neither read nor parsed. A type the caller may
/// not search at all yields nothing (the denial is audited).
async fn all_of(
    state: &AppState,
    ctx: &Ctx,
    rt: &str,
    patient: &str,
    latest: bool,
) -> FhirResult<Vec<(String, Value)>> {
    let mut out = Vec::new();
    let mut offset = 0;
    loop {
        let mut params = vec![
            ("patient".to_string(), format!("Patient/{patient}")),
            ("_count".to_string(), PAGE.to_string()),
        ];
        if latest {
            params.push(("status:not".into(), "entered-in-error".into()));
        }
        let mut q = query::parse(rt, &params)?;
        q.offset = offset;
        let found = if latest {
            let per = LatestPer {
                param: "code".into(),
                by: "date".into(),
                per: 1,
            };
            state.engine.search_latest(ctx, q, per).await
        } else {
            state.engine.search(ctx, q).await
        };
        match found {
            Ok(r) => {
                let n = r.matches.len();
                out.extend(
                    r.matches
                        .into_iter()
                        .filter_map(|m| m.resource.map(|x| (m.resource_type, x))),
                );
                if n < PAGE {
                    return Ok(out);
                }
                offset += n;
            }
            Err(e) if e.status == 403 => return Ok(out),
            Err(e) => return Err(e),
        }
    }
}

/// Builds the summary Bundle for `patient` as seen by `ctx`.
pub async fn build(
    state: &AppState,
    ctx: &Ctx,
    patient: &str,
    now: DateTime<Utc>,
    rules: &crate::retention::Rules,
) -> FhirResult<Value> {
    // the Patient itself only when the caller may read it (a registering
    // institution sees its own entries without the Patient's consent); the read
    // and the four searches run concurrently, so their audit records share a
    // group commit
    let (pat, a, b, c, d) = tokio::join!(
        state.engine.read(ctx, "Patient", patient),
        all_of(state, ctx, "Condition", patient, false),
        all_of(state, ctx, "AllergyIntolerance", patient, false),
        all_of(state, ctx, "Observation", patient, true),
        all_of(state, ctx, "MedicationRequest", patient, false),
    );
    let pat = match pat {
        Ok(p) => p.resource,
        Err(e) if e.status == 403 => None,
        Err(e) => return Err(e),
    };
    let mut found: Vec<(String, Value)> = Vec::new();
    for part in [a, b, c, d] {
        found.extend(part?);
    }
    let mut sections: HashMap<&str, Vec<(String, Value)>> = HashMap::new();
    // (section, item) -> the latest result: lab values and infection results
    // are shown as the latest per item (JLAC10 code), not their history
    let mut latest: HashMap<(&str, String), (String, Value)> = HashMap::new();
    let mut rx: Vec<(String, Value)> = Vec::new();
    for (rt, r) in found {
        let Some(kind) = kind_of(&r) else { continue };
        if withdrawn(&r) {
            continue;
        }
        let date = clinical_date(&rt, &r).unwrap_or_default();
        match kind {
            Kind::Diagnosis if current_condition(&r) => {
                sections.entry("diagnoses").or_default().push((date, r))
            }
            Kind::DrugAllergy | Kind::OtherAllergy => {
                sections.entry("allergies").or_default().push((date, r))
            }
            Kind::Infection | Kind::Lab => {
                let section = if kind == Kind::Lab {
                    "lab-latest"
                } else {
                    "infections"
                };
                let key = (section, lab_item(&r));
                match latest.get(&key) {
                    Some((d, _)) if *d >= date => {}
                    _ => {
                        latest.insert(key, (date, r));
                    }
                }
            }
            Kind::Prescription => rx.push((date, r)),
            _ => {}
        }
    }
    for ((section, _), x) in latest {
        sections.entry(section).or_default().push(x);
    }
    // recent: within the prescription retention window, or the latest few
    rx.sort_by(|a, b| b.0.cmp(&a.0));
    let cutoff = now - chrono::Duration::days(rules.prescription_days);
    let recent: Vec<(String, Value)> = rx
        .into_iter()
        .enumerate()
        .filter(|(i, (_, r))| {
            *i < rules.keep_latest || instant_ext(r, REGISTERED_EXT).is_some_and(|t| t > cutoff)
        })
        .map(|(_, x)| x)
        .collect();
    sections.insert("prescriptions", recent);
    let mut entries: Vec<Value> = pat
        .into_iter()
        .map(|p| {
            tsunagi_fhir::object([
                ("fullUrl", Value::from(format!("Patient/{patient}"))),
                ("resource", p),
            ])
        })
        .collect();
    for s in SECTIONS {
        let mut list = sections.remove(s).unwrap_or_default();
        list.sort_by(|a, b| b.0.cmp(&a.0));
        for (date, r) in list {
            let rt = r["resourceType"].as_str().unwrap_or("").to_string();
            let id = r["id"].as_str().unwrap_or("").to_string();
            let inst = institution_of(&r).unwrap_or("").to_string();
            entries.push(tsunagi_fhir::object([
                (
                    "extension",
                    json!([{"url": SOURCE_EXT, "extension": [
                        {"url": "section", "valueCode": s},
                        {"url": "institution", "valueIdentifier": {"system": INSTITUTION_SYSTEM, "value": inst}},
                        {"url": "date", "valueString": date},
                    ]}]),
                ),
                ("fullUrl", Value::from(format!("{rt}/{id}"))),
                ("resource", r),
            ]));
        }
    }
    Ok(tsunagi_fhir::object([
        ("resourceType", Value::from("Bundle")),
        ("type", Value::from("collection")),
        ("timestamp", Value::from(fmt_instant(now))),
        ("entry", Value::Array(entries)),
    ]))
}
