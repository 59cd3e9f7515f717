//! Ceiling management (上限額管理): facilities report the copayment collected at
//! each visit of a recipient of a programme with monthly ceilings; PMH accumulates
//! per person, programme and month across facilities and answers what remains.
//!
//! Each report is its own `ChargeItem` (created, never updated), keyed by an
//! identifier `patient:programme:YYYY-MM`; the month's total is summed at query
//! time. Concurrent reports are separate inserts, so none can overwrite another
//! on either backend (no read-modify-write). A correction is another report that
//! names the report it corrects (`corrects`) and carries the corrected amount;
//! the newest correction of a report counts instead of it.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::Response;
use axum::routing::{get, post};
use axum::{Extension, Router};
use chrono::{NaiveDate, SecondsFormat};
use serde_json::{Value, json};
use tsunagi_fhir::{FhirError, FhirResult};
use tsunagi_policy::identity::Role;
use tsunagi_server::AppState;
use tsunagi_server::engine::{WriteWork, blocking};
use tsunagi_server::http::extract::{Caller, FhirJson};
use tsunagi_server::http::{ApiResult, fhir_json};
use tsunagi_store::{Scope, Store, StoredResource};

use crate::http::{
    audit_action, deny, is_facility_staff, municipality_of, patient_id, required_str,
};
use crate::recipients::{ceiling_of, ext, ext_str, is_public_expense};
use crate::{PMH_KIND_SYSTEM, Shared};

/// `patient:programme:YYYY-MM` identifier of a report.
pub const CEILING_KEY_SYSTEM: &str = "https://tsunagi.dev/fhir/NamingSystem/pmh-ceiling-key";
const INSTITUTION_SYSTEM: &str =
    "http://jpfhir.jp/fhir/core/IdSystem/insurance-medical-institution-no";

pub fn key(patient: &str, programme: &str, month: &str) -> String {
    format!("{patient}:{programme}:{month}")
}

/// The month's position of one person in one programme.
#[derive(Debug, Clone, PartialEq)]
pub struct Status {
    pub ceiling: Option<u64>,
    pub used: i64,
    pub remaining: Option<i64>,
    /// (report id, facility, date, amount counted)
    pub entries: Vec<(String, String, String, i64)>,
}

impl Status {
    pub fn to_json(&self, patient: &str, programme: &str, month: &str) -> Value {
        json!({
            "patient": format!("Patient/{patient}"), "programme": programme, "month": month,
            "ceiling": self.ceiling, "used": self.used, "remaining": self.remaining,
            "reached": self.remaining.is_some_and(|r| r <= 0),
            "entries": self.entries.iter().map(|(id, f, d, a)| json!({
                "report": format!("ChargeItem/{id}"), "facility": f, "date": d, "amount": a
            })).collect::<Vec<_>>()
        })
    }
}

fn amount(r: &Value) -> i64 {
    r.pointer("/priceOverride/value")
        .and_then(Value::as_f64)
        .map(|v| v as i64)
        .unwrap_or(0)
}

/// Sums the reports of a key (see the module docs for corrections).
pub fn sum(reports: &[StoredResource]) -> (i64, Vec<(String, String, String, i64)>) {
    // newest correction per corrected report
    let mut latest: BTreeMap<String, (&StoredResource, i64)> = BTreeMap::new();
    let mut originals = Vec::new();
    for s in reports {
        let Some(r) = s.resource.as_ref() else {
            continue;
        };
        let corrects = r
            .get("extension")
            .and_then(Value::as_array)
            .and_then(|es| {
                es.iter().find(|e| {
                    e.get("url").and_then(Value::as_str) == Some(ext("corrects").as_str())
                })
            })
            .and_then(|e| e.pointer("/valueReference/reference"))
            .and_then(Value::as_str)
            .and_then(|x| x.strip_prefix("ChargeItem/"));
        match corrects {
            Some(orig) => {
                let newer = latest
                    .get(orig)
                    .is_none_or(|(old, _)| (old.last_updated, &old.id) < (s.last_updated, &s.id));
                if newer {
                    latest.insert(orig.to_string(), (s, amount(r)));
                }
            }
            None => originals.push(s),
        }
    }
    let mut total = 0;
    let mut entries = Vec::new();
    for s in originals {
        let r = s.resource.as_ref().expect("filtered");
        let a = latest
            .get(&s.id)
            .map(|(_, a)| *a)
            .unwrap_or_else(|| amount(r));
        total += a;
        entries.push((
            s.id.clone(),
            r.pointer("/performingOrganization/identifier/value")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string(),
            r.get("occurrenceDateTime")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string(),
            a,
        ));
    }
    entries.sort_by(|a, b| (&a.2, &a.0).cmp(&(&b.2, &b.0)));
    (total, entries)
}

/// All reports of a key, read as the platform (callers check and audit).
pub fn reports(store: &dyn Store, k: &str) -> FhirResult<Vec<StoredResource>> {
    crate::http::search_all(
        store,
        "ChargeItem",
        &[("identifier", format!("{CEILING_KEY_SYSTEM}|{k}"))],
    )
}

/// The recipient Coverage of a person in a programme in force on a day.
pub fn recipient_on(
    store: &dyn Store,
    patient: &str,
    programme: &str,
    on: NaiveDate,
) -> FhirResult<Option<StoredResource>> {
    let q = tsunagi_eligibility::coverage::person_coverage_query(patient)?;
    let found = store.search(&q, &Scope::Unrestricted)?;
    Ok(found.matches.into_iter().find(|s| {
        s.resource.as_ref().is_some_and(|c| {
            is_public_expense(c)
                && ext_str(c, "programme") == Some(programme)
                && tsunagi_eligibility::coverage::coverage_state(c, on)
                    == tsunagi_eligibility::coverage::CoverageState::Current
        })
    }))
}

/// Status of a person's month in a programme.
pub fn status(
    store: &dyn Store,
    patient: &str,
    programme: &str,
    month: &str,
    on: NaiveDate,
) -> FhirResult<(Status, Option<StoredResource>)> {
    let cov = recipient_on(store, patient, programme, on)?;
    let ceiling = cov
        .as_ref()
        .and_then(|c| c.resource.as_ref())
        .and_then(ceiling_of);
    let (used, entries) = sum(&reports(store, &key(patient, programme, month))?);
    Ok((
        Status {
            ceiling,
            used,
            remaining: ceiling.map(|c| c as i64 - used),
            entries,
        },
        cov,
    ))
}

fn month_of(d: NaiveDate) -> String {
    d.format("%Y-%m").to_string()
}

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/pmh/ceiling-reports", post(report))
        .route("/pmh/ceiling", get(query_status))
}

/// `POST /pmh/ceiling-reports` `{"patient", "programme", "date", "amount", "corrects"?}`.
async fn report(
    State(state): State<AppState>,
    Extension(shared): Extension<Arc<Shared>>,
    Caller(ctx): Caller,
    FhirJson(body): FhirJson,
) -> ApiResult<Response> {
    if !is_facility_staff(&ctx) {
        return Err(deny(
            &state,
            &ctx,
            "ChargeItem",
            "copayments are reported by care-facility staff acting for treatment".into(),
        )
        .await
        .into());
    }
    let patient = patient_id(&required_str(&body, "patient")?);
    let programme = required_str(&body, "programme")?;
    let date = NaiveDate::parse_from_str(&required_str(&body, "date")?, "%Y-%m-%d")
        .map_err(|_| FhirError::invalid_element("date", "date is YYYY-MM-DD"))?;
    let amount = body
        .get("amount")
        .and_then(Value::as_i64)
        .filter(|a| *a >= 0)
        .ok_or_else(|| {
            FhirError::invalid_element("amount", "amount is a whole number of yen, 0 or more")
        })?;
    let corrects = body
        .get("corrects")
        .and_then(Value::as_str)
        .map(|s| s.strip_prefix("ChargeItem/").unwrap_or(s).to_string());
    if !crate::access::has_reception(&shared, &ctx.principal.org, &patient) {
        return Err(deny(
            &state,
            &ctx,
            "ChargeItem",
            format!("no live reception of Patient/{patient} at this facility; read the card first"),
        )
        .await
        .into());
    }
    let Some(p) = shared.catalogue.get(&programme) else {
        return Err(
            FhirError::invalid_element("programme", format!("no programme '{programme}'")).into(),
        );
    };
    if !p.ceiling_management {
        return Err(FhirError::unprocessable(
            Some("programme"),
            format!("programme {programme} has no ceiling management"),
        )
        .into());
    }
    let month = month_of(date);
    let k = key(&patient, &programme, &month);
    let store = state.engine.store.clone();
    let (pt, pg, kk, corr) = (
        patient.clone(),
        programme.clone(),
        k.clone(),
        corrects.clone(),
    );
    let cov = blocking(move || {
        let cov = recipient_on(&*store, &pt, &pg, date)?;
        if let Some(c) = &corr {
            let orig = store.read("ChargeItem", c)?.filter(|s| !s.deleted);
            let same_key = orig
                .as_ref()
                .and_then(|s| s.resource.as_ref())
                .and_then(|r| r.pointer("/identifier/0/value"))
                .and_then(Value::as_str)
                == Some(kk.as_str());
            if !same_key {
                return Err(FhirError::invalid_element(
                    "corrects",
                    format!("ChargeItem/{c} is not a report of this person, programme and month"),
                ));
            }
        }
        Ok(cov)
    })
    .await?;
    let Some(cov) = cov else {
        return Err(FhirError::unprocessable(
            Some("patient"),
            format!("Patient/{patient} is not a recipient of programme {programme} on {date}"),
        )
        .into());
    };
    let municipality = cov
        .resource
        .as_ref()
        .and_then(|c| ext_str(c, "municipality"))
        .unwrap_or("")
        .to_string();
    let mut exts = vec![json!({"url": ext("municipality"), "valueString": municipality})];
    if let Some(c) = &corrects {
        exts.push(json!({"url": ext("corrects"), "valueReference": {"reference": format!("ChargeItem/{c}")}}));
    }
    let item = json!({
        "resourceType": "ChargeItem",
        "extension": exts,
        "identifier": [{"system": CEILING_KEY_SYSTEM, "value": k}],
        "status": "billed",
        "code": {"coding": [{"system": PMH_KIND_SYSTEM, "code": "ceiling-copayment", "display": "自己負担額 (上限額管理)"}]},
        "subject": {"reference": format!("Patient/{patient}")},
        "occurrenceDateTime": date.to_string(),
        "performingOrganization": {"identifier": {"system": INSTITUTION_SYSTEM, "value": ctx.principal.org}},
        "enteredDate": shared.now().to_rfc3339_opts(SecondsFormat::Millis, true),
        "priceOverride": {"value": amount, "currency": "JPY"},
        "supportingInformation": [{"reference": format!("Coverage/{}", cov.id)}]
    });
    let id = uuid::Uuid::new_v4().to_string();
    let written = state
        .engine
        .write(&ctx, move |work: &WriteWork, tx| {
            work.create_in(tx, "ChargeItem", &id, item)
        })
        .await?;
    let store = state.engine.store.clone();
    let (pt, pg, m2) = (patient.clone(), programme.clone(), month.clone());
    let (st, _) = blocking(move || status(&*store, &pt, &pg, &m2, date)).await?;
    let mut out = st.to_json(&patient, &programme, &month);
    out["report"] = json!(format!("ChargeItem/{}", written.stored.id));
    Ok(fhir_json(StatusCode::CREATED, &out))
}

/// `GET /pmh/ceiling?patient=&programme=&month=YYYY-MM`: the month's status for a
/// facility with a live reception, the patient, or the recipient's municipality.
async fn query_status(
    State(state): State<AppState>,
    Extension(shared): Extension<Arc<Shared>>,
    Query(q): Query<BTreeMap<String, String>>,
    Caller(ctx): Caller,
) -> ApiResult<Response> {
    let get = |k: &str| {
        q.get(k)
            .cloned()
            .ok_or_else(|| FhirError::invalid_element(k, format!("{k} is required")))
    };
    let patient = patient_id(&get("patient")?);
    let programme = get("programme")?;
    let today = shared.today();
    let month = q.get("month").cloned().unwrap_or_else(|| month_of(today));
    let first = NaiveDate::parse_from_str(&format!("{month}-01"), "%Y-%m-%d")
        .map_err(|_| FhirError::invalid_element("month", "month is YYYY-MM"))?;
    let on = if month_of(today) == month {
        today
    } else {
        first
    };
    let store = state.engine.store.clone();
    let (pt, pg, m2) = (patient.clone(), programme.clone(), month.clone());
    let (st, cov) = blocking(move || status(&*store, &pt, &pg, &m2, on)).await?;
    let allowed = match ctx.principal.role {
        Role::Patient => ctx.principal.patient.as_deref() == Some(patient.as_str()),
        _ if municipality_of(&ctx).is_some() => cov
            .as_ref()
            .is_some_and(|c| c.author_org.as_deref() == municipality_of(&ctx)),
        _ => {
            is_facility_staff(&ctx)
                && crate::access::has_reception(&shared, &ctx.principal.org, &patient)
        }
    };
    if !allowed {
        return Err(deny(
            &state,
            &ctx,
            "ChargeItem",
            "the ceiling status is answered to the patient, their municipality, or a facility holding a live reception".into(),
        )
        .await
        .into());
    }
    audit_action(
        &state,
        &ctx,
        "pmh-ceiling-status",
        Some(patient.clone()),
        st.entries
            .iter()
            .map(|e| format!("ChargeItem/{}", e.0))
            .collect(),
    )
    .await?;
    Ok(fhir_json(
        StatusCode::OK,
        &st.to_json(&patient, &programme, &month),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::{TimeZone, Utc};

    fn rep(id: &str, secs: i64, amount: i64, corrects: Option<&str>) -> StoredResource {
        let mut r = json!({"resourceType": "ChargeItem", "id": id,
            "priceOverride": {"value": amount, "currency": "JPY"},
            "occurrenceDateTime": "2026-11-02",
            "performingOrganization": {"identifier": {"value": "1310123458"}}});
        if let Some(c) = corrects {
            r["extension"] = json!([{"url": ext("corrects"), "valueReference": {"reference": format!("ChargeItem/{c}")}}]);
        }
        StoredResource {
            resource_type: "ChargeItem".into(),
            id: id.into(),
            version: 1,
            last_updated: Utc.timestamp_opt(1_800_000_000 + secs, 0).unwrap(),
            deleted: false,
            resource: Some(r),
            author_org: Some("1310123458".into()),
        }
    }

    #[test]
    fn corrections_replace_the_corrected_amount() {
        let rs = vec![
            rep("a", 0, 3000, None),
            rep("b", 1, 2000, None),
            rep("c", 2, 1000, Some("a")),
            rep("d", 3, 500, Some("a")),
        ];
        let (total, entries) = sum(&rs);
        assert_eq!(total, 2500);
        assert_eq!(entries.len(), 2);
    }
}
