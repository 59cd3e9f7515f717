//! Guardians (保護者) of children: who may see a child's maternal and child health
//! and checkup results on the child's behalf.
//!
//! - The municipality registers the link (`POST /pmh/guardians`, municipality
//!   staff), e.g. when it issues the 母子健康手帳: child, guardian (both platform
//!   persons), relationship (mother, father or other legal guardian). It is stored
//!   as a `RelatedPerson` of the child that the municipality authors, pointing at
//!   the guardian's `Patient`; registering the same pair again updates it, and
//!   `"active": false` ends it.
//! - The guardian, signed in as themselves (patient token), reads the child's
//!   checkup results (`GET /pmh/guardian/checkups?child=`): only while the link is
//!   active and the child is under [`CHILD_AGE_LIMIT`] on the day (below that age a
//!   legal representative handles the child's My Number card), never results
//!   withheld from the patient. Every such read
//!   is audited under the child, so the child sees it in their access history.

use std::collections::BTreeMap;

use std::sync::Arc;

use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::Response;
use axum::routing::{get, post};
use axum::{Extension, Router};
use chrono::{Datelike, NaiveDate};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use tsunagi_fhir::{FhirError, FhirResult};
use tsunagi_policy::identity::Role;
use tsunagi_policy::policy::{Operation, PATIENT_VISIBILITY_SYSTEM, WITHHELD};
use tsunagi_server::AppState;
use tsunagi_server::engine::{WriteWork, blocking};
use tsunagi_server::http::extract::{Caller, FhirJson};
use tsunagi_server::http::{ApiResult, fhir_json};
use tsunagi_store::Store;

use crate::Shared;
use crate::checkups::{KIND_SYSTEM, results_of};
use crate::http::{
    audit_action, deny, patient_id, reference, require_municipality, required_str, searchset,
};

/// A guardian acts for a child until the child's 15th birthday.
pub const CHILD_AGE_LIMIT: u32 = 15;
/// `RelatedPerson.extension` holding the guardian's platform `Patient`.
pub const GUARDIAN_EXT: &str = "https://tsunagi.dev/fhir/StructureDefinition/pmh-guardian-patient";
const ROLE_SYSTEM: &str = "http://terminology.hl7.org/CodeSystem/v3-RoleCode";
/// Relationships a municipality may register: mother, father, legal guardian.
const RELATIONSHIPS: &[&str] = &["MTH", "FTH", "GUARD"];

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/pmh/guardians", post(register))
        .route("/pmh/guardian/checkups", get(child_checkups))
}

/// Id of the link of one child and one guardian (registering again updates it).
pub fn link_id(child: &str, guardian: &str) -> String {
    let h = Sha256::digest(format!("pmh-guardian|{child}|{guardian}").as_bytes());
    let hex: String = h[..16].iter().map(|b| format!("{b:02x}")).collect();
    format!("pmh-guardian-{hex}")
}

/// Age in whole years on `on`.
fn age_on(birth: NaiveDate, on: NaiveDate) -> u32 {
    let mut years = on.year() - birth.year();
    if (on.month(), on.day()) < (birth.month(), birth.day()) {
        years -= 1;
    }
    years.max(0) as u32
}

fn birth_date(p: &Value) -> Option<NaiveDate> {
    NaiveDate::parse_from_str(p.get("birthDate")?.as_str()?.get(..10)?, "%Y-%m-%d").ok()
}

/// `POST /pmh/guardians` (municipality): `{"child", "guardian", "relationship"
/// (MTH | FTH | GUARD), "active"? (default true)}`.
async fn register(
    State(state): State<AppState>,
    Caller(ctx): Caller,
    FhirJson(body): FhirJson,
) -> ApiResult<Response> {
    let m = require_municipality(&state, &ctx, "guardian registration").await?;
    let child = patient_id(&required_str(&body, "child")?);
    let guardian = patient_id(&required_str(&body, "guardian")?);
    if child == guardian {
        return Err(FhirError::invalid_element(
            "guardian",
            "a person cannot be their own guardian",
        )
        .into());
    }
    let relationship = required_str(&body, "relationship")?;
    if !RELATIONSHIPS.contains(&relationship.as_str()) {
        return Err(FhirError::invalid_element(
            "relationship",
            format!("relationship must be one of {}", RELATIONSHIPS.join(", ")),
        )
        .into());
    }
    let active = match body.get("active") {
        None => true,
        Some(v) => v
            .as_bool()
            .ok_or_else(|| FhirError::invalid_element("active", "active is true or false"))?,
    };
    let store = state.engine.store.clone();
    let (c2, g2) = (child.clone(), guardian.clone());
    let (child_res, guardian_exists) = blocking(move || {
        let c = store.read("Patient", &c2)?.filter(|p| !p.deleted);
        let g = store.read("Patient", &g2)?.is_some_and(|p| !p.deleted);
        Ok((c, g))
    })
    .await?;
    let Some(child_res) = child_res else {
        return Err(
            FhirError::invalid_element("child", format!("Patient/{child} does not exist")).into(),
        );
    };
    if !guardian_exists {
        return Err(FhirError::invalid_element(
            "guardian",
            format!("Patient/{guardian} does not exist"),
        )
        .into());
    }
    if birth_date(child_res.resource.as_ref().unwrap_or(&Value::Null)).is_none() {
        return Err(FhirError::unprocessable(
            Some("child"),
            format!("Patient/{child} has no birth date: the age limit of guardian access cannot be applied"),
        )
        .into());
    }
    let id = link_id(&child, &guardian);
    let related = json!({
        "resourceType": "RelatedPerson",
        "id": id,
        "active": active,
        "patient": {"reference": format!("Patient/{child}")},
        "relationship": [{"coding": [{"system": ROLE_SYSTEM, "code": relationship}]}],
        "extension": [{"url": GUARDIAN_EXT, "valueReference": {"reference": format!("Patient/{guardian}")}}],
        "identifier": [{"system": "https://tsunagi.dev/fhir/NamingSystem/local-government-code", "value": m}],
    });
    let w = state
        .engine
        .write(&ctx, move |work: &WriteWork, tx| {
            work.update_in(tx, "RelatedPerson", &id, related, None)
        })
        .await?;
    Ok(fhir_json(
        StatusCode::OK,
        w.stored.resource.as_ref().unwrap_or(&Value::Null),
    ))
}

/// Whether `guardian` holds an active link to `child`, written by a municipality
/// (a local government code as author: a care facility writing a RelatedPerson of
/// the same id through the FHIR API does not make anyone a guardian).
fn is_guardian(store: &dyn Store, child: &str, guardian: &str) -> FhirResult<bool> {
    Ok(store
        .read("RelatedPerson", &link_id(child, guardian))?
        .filter(|r| {
            !r.deleted
                && r.author_org
                    .as_deref()
                    .is_some_and(|a| tsunagi_policy::ids::validate_local_government_code(a).is_ok())
        })
        .and_then(|r| r.resource)
        .is_some_and(|r| {
            r["active"] != json!(false)
                && r.pointer("/extension/0/valueReference/reference")
                    .and_then(Value::as_str)
                    == Some(format!("Patient/{guardian}").as_str())
        }))
}

/// `GET /pmh/guardian/checkups?child=` (the guardian's patient token): the
/// child's checkup results (pregnancy, infant, municipal) as the child would see
/// them.
async fn child_checkups(
    State(state): State<AppState>,
    Extension(shared): Extension<Arc<Shared>>,
    Query(q): Query<BTreeMap<String, String>>,
    Caller(ctx): Caller,
) -> ApiResult<Response> {
    let me = match (&ctx.principal.role, &ctx.principal.patient) {
        (Role::Patient, Some(me)) => me.clone(),
        _ => {
            return Err(deny(
                &state,
                &ctx,
                "guardian checkup view",
                "a guardian reads a child's results signed in as themselves (patient token)"
                    .to_string(),
            )
            .await
            .into());
        }
    };
    let child = patient_id(q.get("child").map(String::as_str).unwrap_or(""));
    if child.is_empty() {
        return Err(FhirError::invalid_element("child", "child is required").into());
    }
    let today = shared.today();
    let store = state.engine.store.clone();
    let (c2, me2) = (child.clone(), me.clone());
    let verdict = blocking(move || {
        if !is_guardian(&*store, &c2, &me2)? {
            return Ok(Err(format!(
                "no active guardian link of Patient/{me2} to Patient/{c2} is registered by a municipality"
            )));
        }
        let born = store
            .read("Patient", &c2)?
            .and_then(|p| p.resource)
            .and_then(|p| birth_date(&p));
        match born {
            Some(b) if age_on(b, today) < CHILD_AGE_LIMIT => {}
            _ => {
                return Ok(Err(format!(
                    "Patient/{c2} is {CHILD_AGE_LIMIT} or older: guardian access has ended; the person signs in themselves"
                )));
            }
        }
        let out = results_of(&*store, &c2, is_checkup)?;
        Ok(Ok(out))
    })
    .await?;
    let found = match verdict {
        Ok(found) => found,
        Err(reason) => {
            // audited under the child: the attempt shows in the child's access history
            return Err(state
                .engine
                .deny(
                    &ctx,
                    Operation::Read,
                    Some(child),
                    vec!["guardian checkup view".into()],
                    reason,
                )
                .await
                .into());
        }
    };
    audit_action(
        &state,
        &ctx,
        "pmh-guardian-checkup-view",
        Some(child),
        found.iter().map(reference).collect(),
    )
    .await?;
    Ok(searchset(found))
}

/// A checkup result registered through PMH and not withheld from the patient.
fn is_checkup(r: Option<&Value>) -> bool {
    let has = |path: &str, hit: &dyn Fn(&Value) -> bool| {
        r.and_then(|r| r.pointer(path))
            .and_then(Value::as_array)
            .is_some_and(|a| a.iter().any(hit))
    };
    has("/meta/tag", &|t| t["system"] == KIND_SYSTEM)
        && !has("/meta/security", &|t| {
            t["system"] == PATIENT_VISIBILITY_SYSTEM && t["code"] == WITHHELD
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(s: &str) -> NaiveDate {
        NaiveDate::parse_from_str(s, "%Y-%m-%d").unwrap()
    }

    #[test]
    fn age_counts_whole_years_to_the_birthday() {
        assert_eq!(age_on(d("2011-11-22"), d("2026-11-21")), 14);
        assert_eq!(age_on(d("2011-11-22"), d("2026-11-22")), 15);
        // born on 29 February: a year is complete on 1 March in common years
        assert_eq!(age_on(d("2012-02-29"), d("2027-02-28")), 14);
        assert_eq!(age_on(d("2012-02-29"), d("2027-03-01")), 15);
    }

    #[test]
    fn link_ids_differ_per_pair() {
        assert_ne!(link_id("c", "g1"), link_id("c", "g2"));
        assert_ne!(link_id("a", "b"), link_id("b", "a"));
        assert_eq!(link_id("c", "g"), link_id("c", "g"));
    }
}
