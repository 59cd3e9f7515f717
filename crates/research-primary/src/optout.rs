//! The patient's research opt-out (オプトアウト), self-service.
//!
//! - `POST /fhir/$research-opt-out` (patient token): opts out of secondary use;
//!   every later extraction leaves the person out;
//! - `DELETE /fhir/$research-opt-out`: withdraws the opt-out (included again from
//!   the next extraction on);
//! - `GET /fhir/$research-opt-out`: the current state (the Consent, read through the
//!   engine, so the policy decides and the read is audited).
//!
//! The state is one `Consent` per person in their compartment (id
//! `research-optout-<patient>`, scope `research`, provision `deny`), written by the
//! service organisation [`SERVICE_ORG`] in one store transaction with its audit
//! record; each change is a new version, so the history shows when it was in force.
//! An extraction reads all active ones at its start: the [`OptOutSnapshot`].

use std::collections::BTreeSet;
use std::path::Path;

use axum::Router;
use axum::http::StatusCode;
use axum::response::Response;
use axum::routing::post;
use chrono::{DateTime, Utc};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use tsunagi_fhir::index::compartment_patient;
use tsunagi_fhir::search::{Criterion, SearchQuery, TokenMatch};
use tsunagi_fhir::{FhirError, FhirResult};
use tsunagi_policy::audit::{AuditRecord, Outcome};
use tsunagi_policy::identity::Role;
use tsunagi_server::engine::blocking;
use tsunagi_server::http::extract::Caller;
use tsunagi_server::http::{ApiResult, fhir_json};
use tsunagi_server::validate::is_valid_id;
use tsunagi_server::{AppState, Ctx, OperationDecl, ServiceModule};
use tsunagi_store::{Scope, Store, WriteContext};

/// Author organisation of the records the secondary-use service keeps.
pub const SERVICE_ORG: &str = "research-service";
/// Code system of the opt-out Consent's category.
pub const OPTOUT_SYSTEM: &str = "urn:tsunagi:research";
pub const OPTOUT_CODE: &str = "research-opt-out";

/// The primary-side module: the opt-out endpoints.
pub struct OptOutService;

impl ServiceModule for OptOutService {
    fn name(&self) -> &'static str {
        "research-opt-out"
    }

    fn routes(&self) -> Router<AppState> {
        Router::new().route(
            "/fhir/$research-opt-out",
            post(opt_out).delete(withdraw).get(status),
        )
    }

    fn operations(&self) -> Vec<OperationDecl> {
        vec![OperationDecl {
            name: "research-opt-out",
            resource_type: None,
            documentation: "The patient's opt-out from secondary use (POST opts out, DELETE withdraws it, GET shows it); patient token",
        }]
    }
}

pub fn consent_id(patient: &str) -> String {
    format!("research-optout-{patient}")
}

fn consent(patient: &str, active: bool, now: DateTime<Utc>) -> Value {
    json!({
        "resourceType": "Consent",
        "id": consent_id(patient),
        "status": if active { "active" } else { "inactive" },
        "scope": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/consentscope", "code": "research"}]},
        "category": [{"coding": [{"system": OPTOUT_SYSTEM, "code": OPTOUT_CODE, "display": "二次利用のオプトアウト"}]}],
        "patient": {"reference": format!("Patient/{patient}")},
        "dateTime": now.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        "provision": {
            "type": "deny",
            "purpose": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ActReason", "code": "HRESCH"}]
        }
    })
}

fn me(ctx: &Ctx) -> FhirResult<String> {
    match (&ctx.principal.role, &ctx.principal.patient) {
        (Role::Patient, Some(p)) => Ok(p.clone()),
        _ => Err(FhirError::forbidden(
            "the research opt-out is the patient's own: sign in with the card (POST /auth/card)",
        )),
    }
}

fn audit(ctx: &Ctx, action: &str, patient: Option<String>, res: Vec<String>) -> AuditRecord {
    let mut r = AuditRecord::new(&ctx.principal, ctx.purpose, action, ctx.request_id.clone());
    r.patient = patient;
    r.resources = res;
    r
}

/// Audits a refusal and returns it.
async fn refused(state: &AppState, ctx: &Ctx, action: &str, e: FhirError) -> FhirError {
    let mut rec = audit(ctx, action, ctx.principal.patient.clone(), vec![]);
    rec.outcome = if e.status == 403 {
        Outcome::Denied
    } else {
        Outcome::Error
    };
    rec.status = e.status;
    rec.reason = e.issues.first().map(|i| i.message.clone());
    match state.engine.audit.record(rec).await {
        Ok(()) => e,
        Err(a) => a,
    }
}

/// Writes the person's opt-out state (create or new version) with its audit record.
fn set_state(store: &dyn Store, ctx: &Ctx, patient: &str, active: bool) -> FhirResult<Value> {
    let id = consent_id(patient);
    if !is_valid_id(&id) {
        return Err(FhirError::bad_request(
            None,
            "the patient id is too long for an opt-out record",
        ));
    }
    let wctx = WriteContext {
        org: Some(SERVICE_ORG.into()),
        user: ctx.principal.user.clone(),
    };
    let body = consent(patient, active, Utc::now());
    let mut tx = store.begin()?;
    let stored = match tx.read("Consent", &id)? {
        // A new version, also after a delete marker.
        Some(_) => tx.update("Consent", &id, body, None, &wctx)?.0,
        None => {
            if !active {
                return Err(FhirError::not_found("there is no opt-out to withdraw"));
            }
            tx.create("Consent", &id, body, &wctx)?
        }
    };
    let action = if active {
        "research-opt-out"
    } else {
        "research-opt-out-withdraw"
    };
    let rec = audit(
        ctx,
        action,
        Some(patient.to_string()),
        vec![format!("Consent/{}/_history/{}", stored.id, stored.version)],
    );
    tx.audit_append(&[rec.to_json()])?;
    tx.commit()?;
    Ok(stored.resource.unwrap_or(Value::Null))
}

async fn change(state: AppState, ctx: Ctx, active: bool) -> ApiResult<Response> {
    let action = if active {
        "research-opt-out"
    } else {
        "research-opt-out-withdraw"
    };
    let patient = match me(&ctx) {
        Ok(p) => p,
        Err(e) => return Err(refused(&state, &ctx, action, e).await.into()),
    };
    let (store, c2) = (state.engine.store.clone(), ctx.clone());
    match blocking(move || set_state(&*store, &c2, &patient, active)).await {
        Ok(v) => Ok(fhir_json(StatusCode::OK, &v)),
        Err(e) => Err(refused(&state, &ctx, action, e).await.into()),
    }
}

async fn opt_out(
    axum::extract::State(state): axum::extract::State<AppState>,
    Caller(ctx): Caller,
) -> ApiResult<Response> {
    change(state, ctx, true).await
}

async fn withdraw(
    axum::extract::State(state): axum::extract::State<AppState>,
    Caller(ctx): Caller,
) -> ApiResult<Response> {
    change(state, ctx, false).await
}

async fn status(
    axum::extract::State(state): axum::extract::State<AppState>,
    Caller(ctx): Caller,
) -> ApiResult<Response> {
    let patient = match me(&ctx) {
        Ok(p) => p,
        Err(e) => {
            return Err(refused(&state, &ctx, "research-opt-out-status", e)
                .await
                .into());
        }
    };
    match state
        .engine
        .read(&ctx, "Consent", &consent_id(&patient))
        .await
    {
        Ok(s) => Ok(fhir_json(
            StatusCode::OK,
            s.resource.as_ref().unwrap_or(&Value::Null),
        )),
        // Never opted out: the default (included) state.
        Err(e) if e.status == 404 || e.status == 410 => Ok(fhir_json(
            StatusCode::OK,
            &json!({"resourceType": "Parameters", "parameter": [{"name": "optedOut", "valueBoolean": false}]}),
        )),
        Err(e) => Err(e.into()),
    }
}

/// The set of persons opted out at the start of an extraction.
#[derive(Debug, Clone)]
pub struct OptOutSnapshot {
    /// `oo-<time>-<digest prefix>`; the same id is in the dataset manifest and
    /// (with the person list) in the primary-side snapshot file.
    pub id: String,
    pub taken_at: DateTime<Utc>,
    pub persons: BTreeSet<String>,
}

impl OptOutSnapshot {
    pub fn empty() -> OptOutSnapshot {
        OptOutSnapshot {
            id: "oo-none".into(),
            taken_at: Utc::now(),
            persons: BTreeSet::new(),
        }
    }

    /// Reads every active opt-out Consent (read-only, current versions).
    pub fn take(store: &dyn Store) -> FhirResult<OptOutSnapshot> {
        let taken_at = Utc::now();
        let mut persons = BTreeSet::new();
        let mut offset = 0;
        loop {
            let mut q = SearchQuery::new("Consent").with(
                "category",
                Criterion::Token {
                    values: vec![TokenMatch {
                        system: Some(Some(OPTOUT_SYSTEM.into())),
                        code: Some(OPTOUT_CODE.into()),
                    }],
                    negate: false,
                },
            );
            q.count = 1000;
            q.offset = offset;
            q.sort = vec![tsunagi_fhir::search::SortKey {
                param: "_id".into(),
                param_type: tsunagi_fhir::search::ParamType::Token,
                descending: false,
            }];
            let page = store.search(&q, &Scope::Unrestricted)?;
            let n = page.matches.len();
            for s in page.matches {
                let Some(r) = s.resource else { continue };
                // Only the service's own records count (nobody else can write them
                // through REST, the core forbids modifying another org's record).
                if s.author_org.as_deref() != Some(SERVICE_ORG) {
                    continue;
                }
                if r.get("status").and_then(Value::as_str) == Some("active")
                    && let Some(p) = compartment_patient("Consent", &r)
                {
                    persons.insert(p);
                }
            }
            if n < 1000 {
                break;
            }
            offset += n;
        }
        let mut h = Sha256::new();
        for p in &persons {
            h.update(p.as_bytes());
            h.update([0]);
        }
        let digest = crate::linkage::hex(&h.finalize()[..6]);
        Ok(OptOutSnapshot {
            id: format!("oo-{}-{digest}", taken_at.format("%Y%m%dT%H%M%SZ")),
            taken_at,
            persons,
        })
    }

    /// Keeps the snapshot (with the person ids) on the primary side, for audits.
    pub fn save(&self, dir: &Path) -> anyhow::Result<()> {
        std::fs::create_dir_all(dir)?;
        let v = json!({
            "id": self.id,
            "takenAt": self.taken_at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            "persons": self.persons,
        });
        std::fs::write(
            dir.join(format!("{}.json", self.id)),
            serde_json::to_vec_pretty(&v)?,
        )?;
        Ok(())
    }
}

/// Demo data (docs/DEMO.md): demo patient pt-20 has opted out of secondary use.
/// Idempotent: an existing opt-out record is left as it is.
pub fn seed_demo(store: &dyn Store) -> FhirResult<()> {
    let patient = "pt-20";
    if store.read("Consent", &consent_id(patient))?.is_some() {
        return Ok(());
    }
    let wctx = WriteContext {
        org: Some(SERVICE_ORG.into()),
        user: Some("demo".into()),
    };
    let mut tx = store.begin()?;
    let s = tx.create(
        "Consent",
        &consent_id(patient),
        consent(patient, true, Utc::now()),
        &wctx,
    )?;
    let rec = json!({
        "time": Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        "org": SERVICE_ORG, "user": "demo", "role": "operator", "purpose": "operations",
        "action": "research-opt-out", "patient": patient,
        "resources": [format!("Consent/{}/_history/{}", s.id, s.version)],
        "outcome": "success", "status": 201, "reason": "demo dataset",
        "request_id": uuid::Uuid::new_v4().to_string(),
    });
    tx.audit_append(&[rec])?;
    tx.commit()
}
