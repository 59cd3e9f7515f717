//! Per-facility settings. One so far: hide clinical (non-drug) history at this
//! facility (診療情報の閲覧制限): when set, the facility's staff see only
//! eligibility and drug-related types ([`crate::consent::MEDICATION_TYPES`])
//! under consent, emergency and disaster access alike.
//!
//! `GET|PUT /fhir/$facility-settings` by the facility's own doctor, dentist or
//! pharmacist: the roles that by law manage a hospital, clinic or pharmacy
//! (管理者, 医療法 §10 / 薬機法 §7). Kept as a `Basic` (code
//! [`SETTINGS_CODE_SYSTEM`]`|facility-settings`, identifier = the facility code).

use std::collections::HashSet;
use std::sync::{Arc, RwLock};

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Response;
use axum::routing::get;
use axum::{Extension, Router};
use serde_json::{Value, json};
use tsunagi_fhir::{FhirError, FhirResult, query};
use tsunagi_policy::audit::Outcome;
use tsunagi_policy::identity::Role;
use tsunagi_server::http::extract::{Caller, FhirJson};
use tsunagi_server::http::{ApiResult, fhir_json};
use tsunagi_server::orgs::MEDICAL_INSTITUTION_SYSTEM;
use tsunagi_server::{AppState, Ctx, OperationDecl};
use tsunagi_store::{Scope, Store, WriteContext};

use crate::Shared;
use crate::cards::SERVICE_ORG;
use crate::reception::{Params, audit_event, blocking};

/// Code system of the settings record (`Basic.code`).
pub const SETTINGS_CODE_SYSTEM: &str = "https://tsunagi.dev/fhir/CodeSystem/eligibility-record";
/// Extension holding the flag.
pub const EXT_HIDE_CLINICAL: &str =
    "https://tsunagi.dev/fhir/StructureDefinition/hide-clinical-history";

pub fn routes() -> Router<AppState> {
    Router::new().route(
        "/fhir/$facility-settings",
        get(get_settings).put(put_settings),
    )
}

pub fn operations() -> Vec<OperationDecl> {
    vec![OperationDecl {
        name: "facility-settings",
        resource_type: None,
        documentation: "GET/PUT the caller facility's settings: hideClinicalHistory (only drug-related history is shown at the facility)",
    }]
}

/// Facilities hiding clinical history.
#[derive(Default)]
pub struct Settings {
    hide: RwLock<HashSet<String>>,
}

impl Settings {
    pub fn hides_clinical(&self, org: &str) -> bool {
        self.hide
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .contains(org)
    }

    pub fn set_hide_clinical(&self, org: &str, hide: bool) {
        let mut h = self.hide.write().unwrap_or_else(|e| e.into_inner());
        if hide {
            h.insert(org.to_string());
        } else {
            h.remove(org);
        }
    }

    pub fn load(&self, store: &dyn Store) -> FhirResult<()> {
        let q = query::parse(
            "Basic",
            &[
                (
                    "code".into(),
                    format!("{SETTINGS_CODE_SYSTEM}|facility-settings"),
                ),
                ("_count".into(), "1000".into()),
            ],
        )?;
        for s in store.search(&q, &Scope::Unrestricted)?.matches {
            let Some(r) = s.resource else { continue };
            let org = r.pointer("/identifier/0/value").and_then(Value::as_str);
            let hide = r
                .get("extension")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .any(|e| {
                    e.get("url").and_then(Value::as_str) == Some(EXT_HIDE_CLINICAL)
                        && e.get("valueBoolean").and_then(Value::as_bool) == Some(true)
                });
            if let Some(org) = org {
                self.set_hide_clinical(org, hide);
            }
        }
        Ok(())
    }
}

fn settings_id(org: &str) -> String {
    format!("facility-settings-{org}")
}

fn body(org: &str, hide: bool) -> Value {
    json!({"resourceType": "Parameters", "parameter": [
        {"name": "facility", "valueIdentifier": {"system": MEDICAL_INSTITUTION_SYSTEM, "value": org}},
        {"name": "hideClinicalHistory", "valueBoolean": hide}
    ]})
}

fn check_caller(ctx: &Ctx) -> FhirResult<()> {
    let p = &ctx.principal;
    if !p.org_kind.is_care_facility()
        || !matches!(p.role, Role::Doctor | Role::Dentist | Role::Pharmacist)
    {
        return Err(FhirError::forbidden(format!(
            "facility settings are managed by a care facility's doctor, dentist or pharmacist, not by role {} at a {}",
            p.role, p.org_kind
        )));
    }
    Ok(())
}

async fn get_settings(
    State(state): State<AppState>,
    Extension(shared): Extension<Arc<Shared>>,
    Caller(ctx): Caller,
) -> ApiResult<Response> {
    if let Err(e) = check_caller(&ctx) {
        audit_event(
            &state,
            &ctx,
            "facility-settings",
            None,
            vec![],
            Outcome::Denied,
            403,
            Some(e.to_string()),
        )
        .await?;
        return Err(e.into());
    }
    let org = ctx.principal.org.clone();
    Ok(fhir_json(
        StatusCode::OK,
        &body(&org, shared.facility.hides_clinical(&org)),
    ))
}

async fn put_settings(
    State(state): State<AppState>,
    Extension(shared): Extension<Arc<Shared>>,
    Caller(ctx): Caller,
    FhirJson(input): FhirJson,
) -> ApiResult<Response> {
    if let Err(e) = check_caller(&ctx) {
        audit_event(
            &state,
            &ctx,
            "facility-settings",
            None,
            vec![],
            Outcome::Denied,
            403,
            Some(e.to_string()),
        )
        .await?;
        return Err(e.into());
    }
    let params = Params::parse(&input)?;
    let hide = params.bool("hideClinicalHistory").ok_or_else(|| {
        FhirError::bad_request(
            Some("Parameters.parameter"),
            "hideClinicalHistory (valueBoolean) is required",
        )
    })?;
    let org = ctx.principal.org.clone();
    let resource = json!({
        "resourceType": "Basic",
        "id": settings_id(&org),
        "identifier": [{"system": MEDICAL_INSTITUTION_SYSTEM, "value": org}],
        "code": {"coding": [{"system": SETTINGS_CODE_SYSTEM, "code": "facility-settings"}]},
        "extension": [{"url": EXT_HIDE_CLINICAL, "valueBoolean": hide}]
    });
    let store = state.engine.store.clone();
    let rec = crate::reception::audit_json(
        &ctx,
        "facility-settings",
        None,
        vec![format!("Basic/{}", settings_id(&org))],
        Outcome::Success,
        200,
        None,
    );
    let (o, u) = (org.clone(), ctx.principal.user.clone());
    blocking(move || {
        let mut tx = store.begin()?;
        tx.update(
            "Basic",
            &settings_id(&o),
            resource,
            None,
            &WriteContext {
                org: Some(SERVICE_ORG.into()),
                user: u,
            },
        )?;
        tx.audit_append(&[rec])?;
        tx.commit()
    })
    .await?;
    shared.facility.set_hide_clinical(&org, hide);
    Ok(fhir_json(StatusCode::OK, &body(&org, hide)))
}
