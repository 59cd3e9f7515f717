//! Aggregated statistics of use for a municipality: counts only, never a person
//! or a clinical fact. Recipients per programme (current), eligibility checks
//! that showed its subsidies (in total and per programme, [`crate::checks`]),
//! ceiling reports (visits, persons, copayment total) of the month for its
//! recipients.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::Response;
use axum::routing::get;
use axum::{Extension, Router};
use chrono::NaiveDate;
use serde_json::{Value, json};
use tsunagi_fhir::{FhirError, FhirResult, query};
use tsunagi_server::AppState;
use tsunagi_server::engine::blocking;
use tsunagi_server::http::extract::Caller;
use tsunagi_server::http::{ApiResult, fhir_json};
use tsunagi_store::{Scope, Store};

use crate::catalogue::Kind;
use crate::http::{audit_action, require_municipality};
use crate::recipients::{SET_SYSTEM, ext, ext_str};
use crate::{PMH_KIND_SYSTEM, Shared};

/// Current recipients of one programme of a municipality (by the set buckets).
pub fn recipients_count(
    store: &dyn Store,
    municipality: &str,
    programme: &str,
    on: NaiveDate,
) -> FhirResult<u64> {
    let mut n = 0;
    for bucket in 0..100 {
        let mut offset = 0;
        loop {
            let q = query::parse(
                "Coverage",
                &[
                    (
                        "identifier".into(),
                        format!("{SET_SYSTEM}|{municipality}:{programme}:{bucket:02}"),
                    ),
                    ("_count".into(), "1000".into()),
                    ("_offset".into(), offset.to_string()),
                ],
            )?;
            let found = store.search(&q, &Scope::Unrestricted)?;
            let k = found.matches.len();
            n += found
                .matches
                .iter()
                .filter_map(|s| s.resource.as_ref())
                .filter(|c| {
                    tsunagi_eligibility::coverage::coverage_state(c, on)
                        == tsunagi_eligibility::coverage::CoverageState::Current
                })
                .count() as u64;
            if k < 1000 {
                break;
            }
            offset += k;
        }
    }
    Ok(n)
}

/// Ceiling reports of a month for the municipality's recipients:
/// (visits, distinct persons, copayment total in yen).
pub fn usage(
    store: &dyn Store,
    municipality: &str,
    month: NaiveDate,
) -> FhirResult<(u64, u64, i64)> {
    let next = month
        .checked_add_months(chrono::Months::new(1))
        .unwrap_or(month);
    let mut visits = 0;
    let mut persons = BTreeSet::new();
    let mut total = 0;
    let mut offset = 0;
    loop {
        let q = query::parse(
            "ChargeItem",
            &[
                (
                    "code".into(),
                    format!("{PMH_KIND_SYSTEM}|ceiling-copayment"),
                ),
                ("occurrence".into(), format!("ge{month}")),
                ("occurrence".into(), format!("lt{next}")),
                ("_count".into(), "1000".into()),
                ("_offset".into(), offset.to_string()),
            ],
        )?;
        let found = store.search(&q, &Scope::Unrestricted)?;
        let k = found.matches.len();
        for r in found.matches.iter().filter_map(|s| s.resource.as_ref()) {
            if ext_str(r, "municipality") != Some(municipality) {
                continue;
            }
            let is_correction = r
                .get("extension")
                .and_then(Value::as_array)
                .is_some_and(|es| {
                    es.iter().any(|e| {
                        e.get("url").and_then(Value::as_str) == Some(ext("corrects").as_str())
                    })
                });
            if !is_correction {
                visits += 1;
            }
            if let Some(p) = r.pointer("/subject/reference").and_then(Value::as_str) {
                persons.insert(p.to_string());
            }
            total += r
                .pointer("/priceOverride/value")
                .and_then(Value::as_i64)
                .unwrap_or(0);
        }
        if k < 1000 {
            break;
        }
        offset += k;
    }
    Ok((visits, persons.len() as u64, total))
}

pub fn routes() -> Router<AppState> {
    Router::new().route("/pmh/stats", get(stats))
}

/// `GET /pmh/stats?month=YYYY-MM` (municipality).
async fn stats(
    State(state): State<AppState>,
    Extension(shared): Extension<Arc<Shared>>,
    Query(q): Query<BTreeMap<String, String>>,
    Caller(ctx): Caller,
) -> ApiResult<Response> {
    let m = require_municipality(&state, &ctx, "statistics").await?;
    let today = shared.today();
    let month = match q.get("month") {
        Some(s) => NaiveDate::parse_from_str(&format!("{s}-01"), "%Y-%m-%d")
            .map_err(|_| FhirError::invalid_element("month", "month is YYYY-MM"))?,
        None => today.with_day0(0).unwrap_or(today),
    };
    let programmes: Vec<String> = shared
        .catalogue
        .all()
        .into_iter()
        .filter(|p| p.kind == Kind::Statutory || p.municipality.as_deref() == Some(m.as_str()))
        .map(|p| p.code)
        .collect();
    let store = state.engine.store.clone();
    let m2 = m.clone();
    let (counts, (visits, persons, total)) = blocking(move || {
        let mut counts = BTreeMap::new();
        for p in programmes {
            let n = recipients_count(&*store, &m2, &p, today)?;
            if n > 0 {
                counts.insert(p, n);
            }
        }
        Ok((counts, usage(&*store, &m2, month)?))
    })
    .await?;
    audit_action(&state, &ctx, "pmh-stats", None, vec![]).await?;
    let month = month.format("%Y-%m").to_string();
    let checks = shared.checks.month(&m, &month);
    Ok(fhir_json(
        StatusCode::OK,
        &json!({"municipality": m, "month": month,
            "recipients": counts,
            "eligibilityChecks": {"checks": checks.checks, "byProgramme": checks.by_programme},
            "ceilingReports": {"visits": visits, "persons": persons, "copaymentYen": total}}),
    ))
}

use chrono::Datelike;
