//! The service's HTTP operations (all `POST` with a Parameters body unless noted).
//!
//! | operation | who | what |
//! |---|---|---|
//! | `$erx-prescribe` | doctor, dentist | validate the prescription Bundle, verify the signature, find the patient (parameter or the Bundle's insurance Coverage), register MedicationRequests + record; returns id and 引換番号 |
//! | `$erx-check` | doctor, dentist, pharmacist | pre-check of draft medications; registers nothing |
//! | `$erx-cancel` | prescribing institution | registered/returned → cancelled |
//! | `$erx-retrieve` | pharmacist | the prescription by 引換番号 + patient identity (no lock) |
//! | `$erx-accept` | pharmacist | as retrieve, locks it to the pharmacy, runs the reception check |
//! | `$erx-return` | accepting pharmacy | accepted → returned (unlock) |
//! | `$erx-provisional` | accepting pharmacy | check of the provisional dispensing result (確定前調剤結果) |
//! | `$erx-dispense` | accepting pharmacy | registers MedicationDispenses; split part or end of cycle |
//! | `$erx-paper-dispense` | pharmacist | dispensing results of a paper prescription |
//! | `$erx-practitioner-key` | operator | registers a practitioner's signature key |
//! | `GET $erx-statistics?month=YYYY-MM` | operator, ministry | counts of checks and alerts |
//! | `GET $my-prescriptions` | patient | own prescriptions, 引換番号, dispensing results |
//!
//! Writes run in one store transaction (MedicationRequests / MedicationDispenses
//! through the engine's policy + validation + audit, the service's record, the
//! medication index). State changes use If-Match on the record's version, so of
//! two pharmacies accepting at once exactly one wins on both backends; the
//! other is retried, sees the new state and gets the 409.
//!
//! Retrieval reads the prescriber's MedicationRequests as the platform: what
//! authorises it is the 引換番号 *and* the patient's identity (card reception at
//! this pharmacy, decided by the policy, or insurance numbers + birth date),
//! not a consent to share history. The disclosure is audited (`erx-retrieve`).

use std::collections::HashMap;
use std::sync::Arc;

use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::Response;
use axum::routing::{get, post};
use axum::{Extension, Router};
use chrono::{Duration, NaiveDate};
use serde_json::{Value, json};
use tsunagi_fhir::{FhirError, FhirResult};
use tsunagi_policy::audit::{AuditRecord, Outcome};
use tsunagi_policy::identity::{OrgKind, Purpose, Role};
use tsunagi_policy::policy::{AccessRequest, Operation};
use tsunagi_server::engine::{Denied, WriteWork, blocking};
use tsunagi_server::http::extract::{Caller, FhirJson};
use tsunagi_server::http::{ApiResult, fhir_json};
use tsunagi_server::validate::gate;
use tsunagi_server::{AppState, Ctx, OperationDecl};
use tsunagi_store::{StoredResource, Transaction, WriteContext};

use crate::Shared;
use crate::checks::{self, Finding, checked_code, date_of, request_days};
use crate::keys;
use crate::model::{
    MAX_USES, Med, MedIndex, PRESCRIPTION_ID_SYSTEM, Prescription, SERVICE_ORG, State as RxState,
    from_basic, index_id, new_exchange_number, prescription_id, to_basic,
};

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/fhir/$erx-prescribe", post(prescribe))
        .route("/fhir/$erx-check", post(precheck))
        .route("/fhir/$erx-cancel", post(cancel))
        .route("/fhir/$erx-retrieve", post(retrieve))
        .route("/fhir/$erx-accept", post(accept))
        .route("/fhir/$erx-return", post(give_back))
        .route("/fhir/$erx-provisional", post(provisional))
        .route("/fhir/$erx-dispense", post(dispense))
        .route("/fhir/$erx-paper-dispense", post(paper_dispense))
        .route("/fhir/$erx-practitioner-key", post(register_key))
        .route("/fhir/$erx-statistics", get(statistics))
        .route("/fhir/$my-prescriptions", get(my_prescriptions))
}

pub fn operations() -> Vec<OperationDecl> {
    let op = |name, documentation| OperationDecl {
        name,
        resource_type: None,
        documentation,
    };
    vec![
        op(
            "erx-prescribe",
            "Register a prescription (e-prescription data IG Bundle); doctor or dentist; returns the prescription id and 引換番号",
        ),
        op(
            "erx-check",
            "Duplicate / same-efficacy / contraindication pre-check of draft medications; registers nothing",
        ),
        op(
            "erx-cancel",
            "Cancel a prescription not accepted by a pharmacy (prescribing institution)",
        ),
        op(
            "erx-retrieve",
            "A prescription by 引換番号 + patient identity (card reception or insurance numbers + birth date); pharmacist",
        ),
        op(
            "erx-accept",
            "Accept (lock) a prescription at the pharmacy; runs the reception check",
        ),
        op(
            "erx-return",
            "Return (unlock) an accepted prescription before dispensing",
        ),
        op(
            "erx-provisional",
            "Check of the provisional dispensing result (確定前調剤結果)",
        ),
        op(
            "erx-dispense",
            "Register the dispensing result (MedicationDispense); split dispensing and refill cycles",
        ),
        op(
            "erx-paper-dispense",
            "Register dispensing results of a paper prescription",
        ),
        op(
            "erx-practitioner-key",
            "Register a practitioner's signature key (operator)",
        ),
        op(
            "erx-statistics",
            "Monthly counts of checks and alerts (operator, ministry)",
        ),
        op(
            "my-prescriptions",
            "The patient's prescriptions, 引換番号 and dispensing results (patient token)",
        ),
    ]
}

// ------------------------------------------------------------------ parameters

fn perr(name: &str, msg: impl Into<String>) -> FhirError {
    FhirError::invalid_element(&format!("Parameters.parameter.where(name='{name}')"), msg)
}

fn parameters(body: &Value) -> FhirResult<&[Value]> {
    if body.get("resourceType").and_then(Value::as_str) != Some("Parameters") {
        return Err(FhirError::bad_request(
            Some("Parameters"),
            "the operation takes a Parameters resource",
        ));
    }
    Ok(body
        .get("parameter")
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or(&[]))
}

fn named<'a>(params: &'a [Value], name: &str) -> impl Iterator<Item = &'a Value> {
    params
        .iter()
        .filter(move |p| p.get("name").and_then(Value::as_str) == Some(name))
}

fn string(params: &[Value], name: &str) -> Option<String> {
    let p = named(params, name).next()?;
    for k in [
        "valueString",
        "valueCode",
        "valueId",
        "valueBase64Binary",
        "valueDate",
    ] {
        if let Some(s) = p.get(k).and_then(Value::as_str) {
            return Some(s.trim().to_string());
        }
    }
    if let Some(s) = p
        .pointer("/valueReference/reference")
        .and_then(Value::as_str)
    {
        return Some(s.trim().to_string());
    }
    p.pointer("/valueIdentifier/value")
        .and_then(Value::as_str)
        .map(|s| s.trim().to_string())
}

fn required(params: &[Value], name: &str) -> FhirResult<String> {
    string(params, name)
        .filter(|s| !s.is_empty())
        .ok_or_else(|| perr(name, format!("{name} is required")))
}

fn resources<'a>(params: &'a [Value], name: &str, rt: &str) -> FhirResult<Vec<&'a Value>> {
    let mut out = Vec::new();
    for p in named(params, name) {
        let r = p
            .get("resource")
            .ok_or_else(|| perr(name, format!("{name} must carry a {rt} resource")))?;
        if r.get("resourceType").and_then(Value::as_str) != Some(rt) {
            return Err(perr(name, format!("{name} must be a {rt}")));
        }
        out.push(r);
    }
    Ok(out)
}

fn boolean(params: &[Value], name: &str) -> Option<bool> {
    named(params, name)
        .next()
        .and_then(|p| p.get("valueBoolean"))
        .and_then(Value::as_bool)
}

fn month_of(day: NaiveDate) -> String {
    day.format("%Y-%m").to_string()
}

// ------------------------------------------------------------------ who may

fn treatment(ctx: &Ctx) -> Result<(), String> {
    if ctx.purpose != Purpose::Treatment {
        return Err(format!(
            "e-prescription operations are for purpose treatment, not {}",
            ctx.purpose
        ));
    }
    Ok(())
}

/// 処方権: doctors and dentists of a hospital or clinic.
fn may_prescribe(ctx: &Ctx) -> Result<(), String> {
    treatment(ctx)?;
    let p = &ctx.principal;
    let ok = matches!(p.role, Role::Doctor | Role::Dentist)
        && matches!(
            p.org_kind,
            OrgKind::Hospital | OrgKind::Clinic | OrgKind::DentalClinic
        );
    if ok {
        Ok(())
    } else {
        Err(format!(
            "only a doctor or dentist may prescribe (role {} at a {})",
            p.role, p.org_kind
        ))
    }
}

/// Dispensing: pharmacists of a pharmacy (or a hospital pharmacy).
fn may_dispense(ctx: &Ctx) -> Result<(), String> {
    treatment(ctx)?;
    let p = &ctx.principal;
    if p.role == Role::Pharmacist && matches!(p.org_kind, OrgKind::Pharmacy | OrgKind::Hospital) {
        Ok(())
    } else {
        Err(format!(
            "only a pharmacist may receive and dispense prescriptions (role {} at a {})",
            p.role, p.org_kind
        ))
    }
}

fn may_check(ctx: &Ctx) -> Result<(), String> {
    may_prescribe(ctx)
        .or_else(|_| may_dispense(ctx))
        .map_err(|_| {
            format!(
                "medication checks are for doctors, dentists and pharmacists (role {})",
                ctx.principal.role
            )
        })
}

async fn deny(state: &AppState, ctx: &Ctx, action: &str, reason: String) -> FhirError {
    let _ = action;
    state
        .engine
        .deny(ctx, Operation::Read, None, vec![], reason)
        .await
}

async fn audit(
    state: &AppState,
    ctx: &Ctx,
    action: &str,
    patient: Option<String>,
    resources: Vec<String>,
    reason: Option<String>,
) -> FhirResult<()> {
    let mut r = AuditRecord::new(&ctx.principal, ctx.purpose, action, ctx.request_id.clone())
        .with_patient(patient)
        .with_resources(resources);
    r.reason = reason;
    state.engine.audit.record(r).await
}

/// Audits a failed operation on a patient's prescription (409, 404, ...) and
/// returns the error.
async fn failed(state: &AppState, ctx: &Ctx, action: &str, e: FhirError) -> FhirError {
    let mut r = AuditRecord::new(&ctx.principal, ctx.purpose, action, ctx.request_id.clone());
    r.outcome = if matches!(e.status, 401 | 403) {
        Outcome::Denied
    } else {
        Outcome::Error
    };
    r.status = e.status;
    r.reason = e.issues.first().map(|i| i.message.clone());
    match state.engine.audit.record(r).await {
        Ok(()) => e,
        Err(a) => a,
    }
}

// ------------------------------------------------------------------ writing

fn service_ctx(ctx: &Ctx) -> WriteContext {
    WriteContext {
        org: Some(SERVICE_ORG.into()),
        user: ctx.principal.user.clone(),
    }
}

fn reference(s: &StoredResource) -> String {
    format!("{}/{}/_history/{}", s.resource_type, s.id, s.version)
}

/// Runs a write, retrying when a concurrent writer moved a record first (412 on
/// If-Match, or a concurrent first write of the index): the retry sees the new
/// state and answers from it.
async fn write<T: Send + 'static>(
    state: &AppState,
    ctx: &Ctx,
    op: impl Fn(&WriteWork, &mut dyn Transaction) -> FhirResult<Result<T, Denied>>
    + Clone
    + Send
    + Sync
    + 'static,
) -> FhirResult<T> {
    let mut attempt = 0;
    loop {
        match state.engine.write(ctx, op.clone()).await {
            Err(e) if (e.status == 412 || e.status == 503) && attempt < 5 => attempt += 1,
            Err(e) if e.status == 412 => {
                return Err(FhirError::conflict(format!(
                    "the prescription was changed concurrently; retry ({e})"
                )));
            }
            r => return r,
        }
    }
}

/// Reads, changes and writes back a patient's medication index inside `tx`.
fn update_index(
    tx: &mut dyn Transaction,
    wctx: &WriteContext,
    patient: &str,
    keep_from: NaiveDate,
    change: impl FnOnce(&mut MedIndex),
) -> FhirResult<String> {
    let id = index_id(patient);
    let cur = tx.read("Basic", &id)?.filter(|c| !c.deleted);
    let (mut idx, version) = match &cur {
        Some(c) => (
            from_basic::<MedIndex>(c.resource.as_ref().unwrap_or(&Value::Null))?,
            Some(c.version),
        ),
        None => (
            MedIndex {
                patient: patient.to_string(),
                meds: Vec::new(),
            },
            None,
        ),
    };
    change(&mut idx);
    idx.prune(keep_from);
    let body = to_basic(&id, "medication-index", Some(patient), &idx);
    let stored = match version {
        Some(v) => tx.update("Basic", &id, body, Some(v), wctx)?.0,
        None => tx.create("Basic", &id, body, wctx).map_err(|e| {
            if e.status == 409 {
                FhirError::precondition_failed("medication index created concurrently")
            } else {
                e
            }
        })?,
    };
    // derived from the prescriptions and dispensings, rewritten by every write:
    // its earlier versions would only grow the store (two per dispensing cycle)
    tx.forget_history("Basic", &id)?;
    Ok(reference(&stored))
}

fn read_rx(tx: &mut dyn Transaction, id: &str) -> FhirResult<Option<(Prescription, i64)>> {
    match tx.read("Basic", id)?.filter(|r| !r.deleted) {
        Some(r) if id.starts_with("erx-") => {
            let rx = from_basic::<Prescription>(r.resource.as_ref().unwrap_or(&Value::Null))?;
            Ok(Some((rx, r.version)))
        }
        _ => Ok(None),
    }
}

fn write_rx(
    tx: &mut dyn Transaction,
    wctx: &WriteContext,
    rx: &Prescription,
    version: Option<i64>,
) -> FhirResult<String> {
    let body = to_basic(&rx.id, "prescription", Some(&rx.patient), rx);
    let s = match version {
        Some(v) => tx.update("Basic", &rx.id, body, Some(v), wctx)?.0,
        None => tx.create("Basic", &rx.id, body, wctx)?,
    };
    Ok(reference(&s))
}

fn service_audit(
    tx: &mut dyn Transaction,
    ctx: &Ctx,
    action: &str,
    patient: &str,
    resources: Vec<String>,
    status: u16,
    reason: Option<String>,
) -> FhirResult<()> {
    let mut r = AuditRecord::new(&ctx.principal, ctx.purpose, action, ctx.request_id.clone())
        .with_patient(Some(patient.to_string()))
        .with_resources(resources);
    r.status = status;
    r.reason = reason;
    tx.audit_append(&[r.to_json()])?;
    Ok(())
}

fn not_found_rx() -> FhirError {
    FhirError::not_found("no prescription matches this exchange number and patient")
}

// ------------------------------------------------------------------ lines

fn request_lines(
    shared: &Shared,
    mrs: &[Value],
    org: &str,
    uses: u32,
    rx: Option<&str>,
    ids: &[String],
) -> Vec<Med> {
    let today = shared.today();
    mrs.iter()
        .enumerate()
        .map(|(i, mr)| {
            let (code, display) = checked_code(
                mr.get("medicationCodeableConcept").unwrap_or(&Value::Null),
                &shared.terms,
            );
            Med {
                code,
                display,
                start: date_of(mr.get("authoredOn")).unwrap_or(today),
                days: request_days(mr, shared.config.checks.default_days) * uses.max(1),
                org: org.to_string(),
                source: ids
                    .get(i)
                    .map(|id| format!("MedicationRequest/{id}"))
                    .unwrap_or_else(|| format!("MedicationRequest/draft-{i}")),
                rx: rx.map(str::to_string),
            }
        })
        .collect()
}

fn dispense_lines(
    shared: &Shared,
    mds: &[Value],
    org: &str,
    rx: Option<&str>,
    ids: &[String],
) -> Vec<Med> {
    let today = shared.today();
    mds.iter()
        .enumerate()
        .map(|(i, md)| {
            let (code, display) = checked_code(
                md.get("medicationCodeableConcept").unwrap_or(&Value::Null),
                &shared.terms,
            );
            let days = md
                .pointer("/daysSupply/value")
                .and_then(Value::as_f64)
                .filter(|d| *d >= 1.0)
                .map(|d| d.round() as u32)
                .unwrap_or(shared.config.checks.default_days);
            Med {
                code,
                display,
                start: date_of(md.get("whenHandedOver"))
                    .or_else(|| date_of(md.get("whenPrepared")))
                    .unwrap_or(today),
                days,
                org: org.to_string(),
                source: ids
                    .get(i)
                    .map(|id| format!("MedicationDispense/{id}"))
                    .unwrap_or_else(|| format!("MedicationDispense/draft-{i}")),
                rx: rx.map(str::to_string),
            }
        })
        .collect()
}

// ------------------------------------------------------------------ checks

/// Runs a check for `patient`: finds, decides per finding what may be shown
/// (through the policy), counts and audits. Returns the DetectedIssues.
pub async fn run_check(
    state: &AppState,
    shared: &Arc<Shared>,
    ctx: &Ctx,
    patient: &str,
    draft: &[Med],
    exclude_rx: Option<&str>,
    stage: &str,
) -> FhirResult<Vec<Value>> {
    let store = state.engine.store.clone();
    let id = index_id(patient);
    let index = blocking(move || {
        Ok(match store.read("Basic", &id)?.filter(|r| !r.deleted) {
            Some(r) => from_basic::<MedIndex>(r.resource.as_ref().unwrap_or(&Value::Null))?,
            None => MedIndex::default(),
        })
    })
    .await?;
    let today = shared.today();
    let findings = checks::find(
        draft,
        &index.meds,
        today,
        &shared.config.checks,
        &shared.terms,
        exclude_rx,
    );
    let mut decided: HashMap<(String, String), bool> = HashMap::new();
    let mut issues = Vec::with_capacity(findings.len());
    for f in &findings {
        let disclose = *decided
            .entry((f.other.org.clone(), f.other.resource_type().to_string()))
            .or_insert_with(|| may_disclose(state, ctx, patient, f));
        issues.push(checks::render(f, draft, disclose, None, today));
    }
    for (i, d) in draft.iter().enumerate() {
        if tsunagi_terminology::yj::ingredient(&d.code).is_none() {
            issues.push(checks::render_unchecked(i, d, today));
        }
    }
    let t = checks::tally(&findings);
    shared.stats.check(&month_of(today), stage, t);
    flush_stats(state, shared);
    audit(
        state,
        ctx,
        "erx-check",
        Some(patient.to_string()),
        vec![format!("Basic/{}", index_id(patient))],
        Some(format!(
            "stage={stage} lines={} duplicate={} same-efficacy={} contraindication={}",
            draft.len(),
            t.duplicate,
            t.same_efficacy,
            t.contraindication
        )),
    )
    .await?;
    Ok(issues)
}

/// May the caller see the other institution's record behind a finding? Asked of
/// the one policy as a read of that record (own records: the core permits;
/// another institution's: the consent rule, from live reception grants).
fn may_disclose(state: &AppState, ctx: &Ctx, patient: &str, f: &Finding) -> bool {
    if f.other.org == ctx.principal.org {
        return true;
    }
    let req = AccessRequest::new(Operation::Read, f.other.resource_type(), Purpose::Treatment)
        .patient(patient)
        .author(f.other.org.clone());
    state.engine.policy.decide(&ctx.principal, &req).is_permit()
}

fn flush_stats(state: &AppState, shared: &Arc<Shared>) {
    if shared.stats.flush_due() {
        let (store, shared) = (state.engine.store.clone(), shared.clone());
        tokio::task::spawn_blocking(move || {
            if let Err(e) = shared.stats.flush(&*store) {
                tracing::warn!(error = %e, "e-prescription statistics not persisted");
            }
        });
    }
}

fn alerts_params(issues: Vec<Value>) -> Vec<Value> {
    issues
        .into_iter()
        .map(|i| tsunagi_fhir::resource_parameter("alert", i))
        .collect()
}

// ------------------------------------------------------------------ prescribe

/// The MedicationRequests of a prescription Bundle (document or collection).
fn bundle_requests(bundle: &Value) -> FhirResult<Vec<Value>> {
    if bundle.get("resourceType").and_then(Value::as_str) != Some("Bundle") {
        return Err(perr("prescription", "prescription must be a Bundle"));
    }
    let mrs: Vec<Value> = bundle
        .get("entry")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|e| e.get("resource"))
        .filter(|r| r.get("resourceType").and_then(Value::as_str) == Some("MedicationRequest"))
        .cloned()
        .collect();
    if mrs.is_empty() {
        return Err(FhirError::invalid_element(
            "Bundle.entry",
            "the prescription Bundle holds no MedicationRequest",
        ));
    }
    Ok(mrs)
}

/// Uses of the prescription: 1 + `dispenseRequest.numberOfRepeatsAllowed`
/// (リフィル, at most 3 uses in all).
fn uses_of(mrs: &[Value]) -> FhirResult<u32> {
    let mut uses = 1;
    for (i, mr) in mrs.iter().enumerate() {
        if let Some(n) = mr.pointer("/dispenseRequest/numberOfRepeatsAllowed") {
            let n = n.as_u64().ok_or_else(|| {
                FhirError::invalid_element(
                    &format!("MedicationRequest[{i}].dispenseRequest.numberOfRepeatsAllowed"),
                    "must be a non-negative integer",
                )
            })?;
            if n + 1 > u64::from(MAX_USES) {
                return Err(FhirError::invalid_element(
                    &format!("MedicationRequest[{i}].dispenseRequest.numberOfRepeatsAllowed"),
                    format!(
                        "a refill prescription (リフィル) allows at most {MAX_USES} uses, i.e. {} repeats",
                        MAX_USES - 1
                    ),
                ));
            }
            uses = uses.max(n as u32 + 1);
        }
    }
    Ok(uses)
}

/// Replaces references into the Bundle (`urn:uuid:`) with their display: the
/// stored MedicationRequest points to the platform's Patient only.
fn detach(mr: &mut Value, patient: &str) {
    fn walk(v: &mut Value) {
        match v {
            Value::Object(o) => {
                if o.get("reference")
                    .and_then(Value::as_str)
                    .is_some_and(|r| r.starts_with("urn:"))
                {
                    o.remove("reference");
                    if o.is_empty() {
                        o.insert("display".into(), json!("(prescription document)"));
                    }
                }
                o.values_mut().for_each(walk);
            }
            Value::Array(a) => a.iter_mut().for_each(walk),
            _ => {}
        }
    }
    walk(mr);
    mr["subject"] = json!({"reference": format!("Patient/{patient}")});
}

/// The patient a prescription (or a pre-check) is for: the `patient` parameter,
/// or the insured person the prescription Bundle's health-insurance Coverage
/// names. When both are given they must agree.
async fn resolve_patient_for_prescribing(
    state: &AppState,
    params: &[Value],
    bundle: Option<&Value>,
) -> FhirResult<String> {
    let given = string(params, "patient").filter(|p| !p.is_empty());
    // With an explicit patient, the Coverage only has to agree when it can be
    // read: a Coverage the platform cannot resolve (an insurer not yet on the
    // platform, sample numbers) does not stop a prescription for a known patient.
    let query = match bundle.map(insured_person_query).transpose() {
        Ok(q) => q.flatten(),
        Err(_) if given.is_some() => None,
        Err(e) => return Err(e),
    };
    let by_coverage = match query {
        Some((q, at)) => {
            let store = state.engine.store.clone();
            let answer =
                blocking(move || tsunagi_eligibility::eligibility::lookup(&*store, &q)).await?;
            Some((answer.patient.map(|p| p.id), at))
        }
        None => None,
    };
    let Some(p) = given else {
        return match by_coverage {
            Some((Some(id), _)) => Ok(id),
            Some((None, at)) => Err(FhirError::unprocessable(
                Some(&at),
                "no insured person on the platform matches this Coverage (保険者番号, 記号, 番号, 枝番) and the Patient's birth date; give the patient parameter or correct the Coverage",
            )),
            None => Err(perr(
                "patient",
                "patient is required when the prescription carries no health-insurance Coverage",
            )),
        };
    };
    let id = p.strip_prefix("Patient/").unwrap_or(&p).to_string();
    if let Some((Some(other), at)) = &by_coverage
        && *other != id
    {
        return Err(FhirError::unprocessable(
            Some(at),
            format!("this Coverage belongs to another person than Patient/{id}"),
        ));
    }
    let store = state.engine.store.clone();
    let id2 = id.clone();
    let exists =
        blocking(move || Ok(store.read("Patient", &id2)?.is_some_and(|r| !r.deleted))).await?;
    if !exists {
        return Err(perr(
            "patient",
            format!("Patient/{id} is not known to the platform"),
        ));
    }
    Ok(id)
}

const EXT_SYMBOL: &str =
    "http://jpfhir.jp/fhir/core/Extension/StructureDefinition/JP_Coverage_InsuredPersonSymbol";
const EXT_NUMBER: &str =
    "http://jpfhir.jp/fhir/core/Extension/StructureDefinition/JP_Coverage_InsuredPersonNumber";
const EXT_SUB_NUMBER: &str =
    "http://jpfhir.jp/fhir/core/Extension/StructureDefinition/JP_Coverage_InsuredPersonSubNumber";

/// The `$eligibility` query for the insured person of a prescription Bundle:
/// 保険者番号 from the payer Organization's identifier, 記号 / 番号 / 枝番 from JP
/// Core's Coverage extensions (枝番 falls back to `Coverage.dependent`), the birth
/// date from the beneficiary Patient. `None` when the Bundle has no
/// health-insurance Coverage (公費 only, or self-pay); an error naming the element
/// when it has one that lacks a part.
fn insured_person_query(
    bundle: &Value,
) -> FhirResult<Option<(tsunagi_eligibility::eligibility::EligibilityQuery, String)>> {
    let entries = bundle
        .get("entry")
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or(&[]);
    let resolve = |reference: Option<&Value>| -> Option<&Value> {
        let r = reference?.get("reference")?.as_str()?;
        entries.iter().find_map(|e| {
            let res = e.get("resource")?;
            let full = e.get("fullUrl").and_then(Value::as_str);
            let local = format!(
                "{}/{}",
                res.get("resourceType")?.as_str()?,
                res.get("id").and_then(Value::as_str).unwrap_or("")
            );
            (full == Some(r) || local == r).then_some(res)
        })
    };
    let found = entries.iter().enumerate().find_map(|(i, e)| {
        let r = e.get("resource")?;
        if r.get("resourceType").and_then(Value::as_str) != Some("Coverage") {
            return None;
        }
        // a public-expense (公費) Coverage names a subsidy, not the insured person
        (!tsunagi_eligibility::coverage::is_public_expense(r)).then_some((i, r))
    });
    let Some((i, cov)) = found else {
        return Ok(None);
    };
    let at =
        format!("Parameters.parameter.where(name='prescription').resource.entry[{i}].resource");
    let missing = |what: &str| FhirError::invalid_element(&at, format!("Coverage: {what}"));
    let ext = |url: &str| {
        cov.get("extension")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .find(|e| e["url"] == url)
            .and_then(|e| e["valueString"].as_str())
            .map(str::to_string)
    };
    let insurer = resolve(cov.pointer("/payor/0"))
        .and_then(|o| o.get("identifier")?.as_array().cloned())
        .into_iter()
        .flatten()
        .chain(cov.pointer("/payor/0/identifier").cloned())
        .find(|id| id["system"] == tsunagi_server::orgs::INSURER_SYSTEM)
        .and_then(|id| id["value"].as_str().map(str::to_string))
        .ok_or_else(|| missing("the payer Organization carries no 保険者番号 (identifier system urn:oid:1.2.392.100495.20.3.61)"))?;
    let number = ext(EXT_NUMBER)
        .ok_or_else(|| missing("no 番号 (extension JP_Coverage_InsuredPersonNumber)"))?;
    let branch = ext(EXT_SUB_NUMBER)
        .or_else(|| cov["dependent"].as_str().map(str::to_string))
        .ok_or_else(|| {
            missing("no 枝番 (extension JP_Coverage_InsuredPersonSubNumber or dependent)")
        })?;
    let birth = resolve(cov.get("beneficiary"))
        .and_then(|p| p["birthDate"].as_str())
        .ok_or_else(|| missing("the beneficiary Patient in the Bundle has no birthDate"))?;
    let mut p = vec![
        json!({"name": "insurerNumber", "valueString": insurer}),
        json!({"name": "number", "valueString": number}),
        json!({"name": "branch", "valueString": branch}),
        json!({"name": "birthDate", "valueString": birth}),
    ];
    if let Some(symbol) = ext(EXT_SYMBOL) {
        p.push(json!({"name": "symbol", "valueString": symbol}));
    }
    let q = tsunagi_eligibility::eligibility::EligibilityQuery::from_parameters(
        &json!({"resourceType": "Parameters", "parameter": p}),
    )
    .map_err(|e| {
        let why = e.issues.first().map(|i| i.message.as_str()).unwrap_or("");
        FhirError::invalid_element(&at, format!("Coverage: {why}"))
    })?;
    Ok(Some((q, at)))
}

async fn prescribe(
    State(state): State<AppState>,
    Extension(shared): Extension<Arc<Shared>>,
    Caller(ctx): Caller,
    FhirJson(body): FhirJson,
) -> ApiResult<Response> {
    if let Err(reason) = may_prescribe(&ctx) {
        return Err(deny(&state, &ctx, "erx-prescribe", reason).await.into());
    }
    let params = parameters(&body)?;
    let bundle = resources(params, "prescription", "Bundle")?
        .into_iter()
        .next()
        .cloned()
        .ok_or_else(|| perr("prescription", "prescription (Bundle) is required"))?;
    let mrs = bundle_requests(&bundle)?;
    let uses = uses_of(&mrs)?;
    // the e-prescription data IG: the installed packages decide through the gate
    gate(&*state.engine.validator, &bundle)
        .map_err(|e| e.within("Parameters.parameter.where(name='prescription').resource"))?;
    let signature = string(params, "signature");
    match &signature {
        Some(sig) => {
            let (store, user, sig) = (
                state.engine.store.clone(),
                ctx.principal.user.clone(),
                sig.clone(),
            );
            let msg = serde_json::to_vec(&bundle).unwrap_or_default();
            let r = blocking(move || {
                keys::verify(
                    &*store,
                    user.as_deref(),
                    &msg,
                    &sig,
                    "Parameters.parameter.where(name='signature')",
                )
            })
            .await;
            if let Err(e) = r {
                return Err(failed(&state, &ctx, "erx-prescribe", e).await.into());
            }
        }
        None if shared.config.signature_required => {
            return Err(perr("signature", "a prescriber's signature (HPKI) is required").into());
        }
        None => {}
    }
    let patient = resolve_patient_for_prescribing(&state, params, Some(&bundle)).await?;
    let today = shared.today();
    let keep_from = today - Duration::days(shared.config.checks.lookback_days);
    let org = ctx.principal.org.clone();
    let (shared2, ctx2) = (shared.clone(), ctx.clone());
    let signed = signature.is_some();
    let out = write(&state, &ctx, move |work, tx| {
        // a fresh number per attempt; a collision (409 on the record) retries
        let mut exchange = new_exchange_number();
        let mut id = prescription_id(&exchange);
        for _ in 0..5 {
            if tx.read("Basic", &id)?.is_none() {
                break;
            }
            exchange = new_exchange_number();
            id = prescription_id(&exchange);
        }
        let mut ids = Vec::new();
        let mut refs = Vec::new();
        for (i, mr) in mrs.iter().enumerate() {
            let mut mr = mr.clone();
            detach(&mut mr, &patient);
            if let Some(o) = mr.as_object_mut() {
                o.remove("id");
                o.remove("meta");
            }
            mr["groupIdentifier"] = json!({"system": PRESCRIPTION_ID_SYSTEM, "value": id});
            let mid = format!("{id}-{}", i + 1);
            match work.create_in(tx, "MedicationRequest", &mid, mr) {
                Ok(Ok(w)) => refs.push(reference(&w.stored)),
                Ok(Err(d)) => return Ok(Err(d)),
                Err(e) => {
                    return Err(e.within(&format!(
                        "Bundle.entry.resource.ofType(MedicationRequest)[{i}]"
                    )));
                }
            }
            ids.push(mid);
        }
        let lines = request_lines(&shared2, &mrs, &org, uses, Some(&id), &ids);
        let rx = Prescription {
            id: id.clone(),
            exchange_number: exchange.clone(),
            patient: patient.clone(),
            prescriber_org: org.clone(),
            prescriber_user: ctx2.principal.user.clone(),
            issued: today,
            state: RxState::Registered,
            pharmacy: None,
            uses,
            cycle: 1,
            parts: 0,
            requests: ids.clone(),
            dispenses: vec![],
            lines: lines.clone(),
            signed,
        };
        let wctx = service_ctx(&ctx2);
        refs.push(write_rx(tx, &wctx, &rx, None)?);
        refs.push(update_index(tx, &wctx, &patient, keep_from, |idx| {
            idx.meds.extend(lines)
        })?);
        service_audit(tx, &ctx2, "erx-prescribe", &patient, refs, 201, None)?;
        Ok(Ok((rx, ids)))
    })
    .await?;
    let (rx, ids) = out;
    shared.stats.prescription(&month_of(today));
    flush_stats(&state, &shared);
    let mut p = vec![
        json!({"name": "prescriptionId", "valueId": rx.id}),
        json!({"name": "exchangeNumber", "valueString": rx.exchange_number}),
        json!({"name": "state", "valueCode": rx.state.as_str()}),
        json!({"name": "uses", "valueInteger": rx.uses}),
    ];
    for id in ids {
        p.push(json!({"name": "medicationRequest", "valueReference": {"reference": format!("MedicationRequest/{id}")}}));
    }
    Ok(fhir_json(
        StatusCode::CREATED,
        &json!({"resourceType": "Parameters", "parameter": p}),
    ))
}

// ------------------------------------------------------------------ pre-check

async fn precheck(
    State(state): State<AppState>,
    Extension(shared): Extension<Arc<Shared>>,
    Caller(ctx): Caller,
    FhirJson(body): FhirJson,
) -> ApiResult<Response> {
    if let Err(reason) = may_check(&ctx) {
        return Err(deny(&state, &ctx, "erx-check", reason).await.into());
    }
    let params = parameters(&body)?;
    let draft_bundle = resources(params, "prescription", "Bundle")?
        .first()
        .copied();
    let patient = resolve_patient_for_prescribing(&state, params, draft_bundle).await?;
    let mut mrs: Vec<Value> = resources(params, "medicationRequest", "MedicationRequest")?
        .into_iter()
        .cloned()
        .collect();
    if let Some(b) = draft_bundle {
        mrs.extend(bundle_requests(b)?);
    }
    let mds: Vec<Value> = resources(params, "medicationDispense", "MedicationDispense")?
        .into_iter()
        .cloned()
        .collect();
    if mrs.is_empty() && mds.is_empty() {
        return Err(perr(
            "medicationRequest",
            "give the draft medications (medicationRequest, prescription or medicationDispense)",
        )
        .into());
    }
    let org = ctx.principal.org.clone();
    let mut draft = request_lines(&shared, &mrs, &org, 1, None, &[]);
    draft.extend(dispense_lines(&shared, &mds, &org, None, &[]));
    let issues = run_check(&state, &shared, &ctx, &patient, &draft, None, "precheck").await?;
    Ok(fhir_json(
        StatusCode::OK,
        &json!({"resourceType": "Parameters", "parameter": alerts_params(issues)}),
    ))
}

// ------------------------------------------------------------------ cancel

async fn cancel(
    State(state): State<AppState>,
    Extension(shared): Extension<Arc<Shared>>,
    Caller(ctx): Caller,
    FhirJson(body): FhirJson,
) -> ApiResult<Response> {
    if let Err(reason) = may_prescribe(&ctx) {
        return Err(deny(&state, &ctx, "erx-cancel", reason).await.into());
    }
    let params = parameters(&body)?;
    let id = required(params, "prescriptionId")?;
    let keep_from = shared.today() - Duration::days(shared.config.checks.lookback_days);
    let ctx2 = ctx.clone();
    let r = write(&state, &ctx, move |work, tx| {
        let Some((mut rx, v)) = read_rx(tx, &id)? else {
            return Err(FhirError::not_found(format!(
                "prescription {id} does not exist"
            )));
        };
        if rx.prescriber_org != ctx2.principal.org {
            return Ok(Err(Denied {
                op: Operation::Update,
                patient: Some(rx.patient.clone()),
                resources: vec![format!("Basic/{id}")],
                reason: "only the prescribing institution may cancel a prescription".into(),
            }));
        }
        rx.cancel()?;
        let wctx = service_ctx(&ctx2);
        let mut refs = vec![write_rx(tx, &wctx, &rx, Some(v))?];
        for mid in &rx.requests {
            if let Some(cur) = tx.read("MedicationRequest", mid)?.and_then(|c| c.resource) {
                let mut mr = cur;
                mr["status"] = json!("cancelled");
                if let Some(o) = mr.as_object_mut() {
                    o.remove("meta");
                }
                match work.update_in(tx, "MedicationRequest", mid, mr, None)? {
                    Ok(w) => refs.push(reference(&w.stored)),
                    Err(d) => return Ok(Err(d)),
                }
            }
        }
        let rid = rx.id.clone();
        refs.push(update_index(tx, &wctx, &rx.patient, keep_from, |i| {
            i.remove_rx(&rid)
        })?);
        service_audit(tx, &ctx2, "erx-cancel", &rx.patient, refs, 200, None)?;
        Ok(Ok(rx))
    })
    .await;
    let rx = match r {
        Ok(rx) => rx,
        Err(e) => return Err(failed(&state, &ctx, "erx-cancel", e).await.into()),
    };
    Ok(fhir_json(StatusCode::OK, &record_params(&rx, false)))
}

fn record_params(rx: &Prescription, with_number: bool) -> Value {
    let mut p = vec![
        json!({"name": "prescriptionId", "valueId": rx.id}),
        json!({"name": "state", "valueCode": rx.state.as_str()}),
        json!({"name": "uses", "valueInteger": rx.uses}),
        json!({"name": "cycle", "valueInteger": rx.cycle}),
        json!({"name": "splitParts", "valueInteger": rx.parts}),
        json!({"name": "issued", "valueDate": rx.issued.to_string()}),
        json!({"name": "prescriber", "valueString": rx.prescriber_org}),
    ];
    if with_number {
        p.push(json!({"name": "exchangeNumber", "valueString": rx.exchange_number}));
    }
    if let Some(ph) = &rx.pharmacy {
        p.push(json!({"name": "pharmacy", "valueString": ph}));
    }
    for d in &rx.dispenses {
        p.push(json!({"name": "medicationDispense", "valueReference": {"reference": format!("MedicationDispense/{d}")}}));
    }
    json!({"resourceType": "Parameters", "parameter": p})
}

// ------------------------------------------------------------------ retrieve / accept

/// The patient named by the request's identity parameters: `patient` (a card
/// reception at this facility, i.e. the policy lets the caller read the
/// patient's record), or `insurerNumber` + `symbol` + `number` + `branch` +
/// `birthDate` (the eligibility service's lookup).
async fn identified_patient(state: &AppState, ctx: &Ctx, params: &[Value]) -> FhirResult<String> {
    if let Some(p) = string(params, "patient") {
        let id = p.strip_prefix("Patient/").unwrap_or(&p).to_string();
        let store = state.engine.store.clone();
        let id2 = id.clone();
        let author = blocking(move || Ok(store.read("Patient", &id2)?.filter(|r| !r.deleted)))
            .await?
            .ok_or_else(not_found_rx)?
            .author_org;
        let mut req =
            AccessRequest::new(Operation::Read, "Patient", Purpose::Treatment).patient(id.clone());
        req.author_org = author;
        if !state.engine.policy.decide(&ctx.principal, &req).is_permit() {
            return Err(perr(
                "patient",
                "the patient has not been received at this facility (card reception); give the insurance numbers and birth date instead",
            ));
        }
        return Ok(id);
    }
    let mut q = vec![];
    for k in ["insurerNumber", "symbol", "number", "branch", "birthDate"] {
        if let Some(v) = string(params, k) {
            q.push(json!({"name": k, "valueString": v}));
        }
    }
    let query = tsunagi_eligibility::eligibility::EligibilityQuery::from_parameters(
        &json!({"resourceType": "Parameters", "parameter": q}),
    )?;
    let store = state.engine.store.clone();
    let answer =
        blocking(move || tsunagi_eligibility::eligibility::lookup(&*store, &query)).await?;
    answer.patient.map(|p| p.id).ok_or_else(not_found_rx)
}

async fn retrieve(
    state: State<AppState>,
    shared: Extension<Arc<Shared>>,
    caller: Caller,
    body: FhirJson,
) -> ApiResult<Response> {
    receive(state, shared, caller, body, false).await
}

async fn accept(
    state: State<AppState>,
    shared: Extension<Arc<Shared>>,
    caller: Caller,
    body: FhirJson,
) -> ApiResult<Response> {
    receive(state, shared, caller, body, true).await
}

async fn receive(
    State(state): State<AppState>,
    Extension(shared): Extension<Arc<Shared>>,
    Caller(ctx): Caller,
    FhirJson(body): FhirJson,
    lock: bool,
) -> ApiResult<Response> {
    let action = if lock { "erx-accept" } else { "erx-retrieve" };
    if let Err(reason) = may_dispense(&ctx) {
        return Err(deny(&state, &ctx, action, reason).await.into());
    }
    let params = parameters(&body)?;
    let exchange = required(params, "exchangeNumber")?;
    let patient = match identified_patient(&state, &ctx, params).await {
        Ok(p) => p,
        Err(e) => return Err(failed(&state, &ctx, action, e).await.into()),
    };
    let id = prescription_id(&exchange);
    let (ctx2, pharmacy) = (ctx.clone(), ctx.principal.org.clone());
    let r = write(&state, &ctx, move |_work, tx| {
        let Some((mut rx, v)) = read_rx(tx, &id)? else {
            return Err(not_found_rx());
        };
        if rx.patient != patient || rx.exchange_number != exchange {
            return Err(not_found_rx());
        }
        let mut refs = Vec::new();
        if lock {
            rx.accept(&pharmacy)?;
            refs.push(write_rx(tx, &service_ctx(&ctx2), &rx, Some(v))?);
        }
        let mut mrs = Vec::new();
        for mid in &rx.requests {
            if let Some(s) = tx.read("MedicationRequest", mid)?.filter(|s| !s.deleted) {
                refs.push(reference(&s));
                mrs.extend(s.resource);
            }
        }
        service_audit(tx, &ctx2, action, &rx.patient, refs, 200, None)?;
        Ok(Ok((rx, mrs)))
    })
    .await;
    let (rx, mrs) = match r {
        Ok(x) => x,
        Err(e) => return Err(failed(&state, &ctx, action, e).await.into()),
    };
    let mut out = record_params(&rx, false);
    let p = out["parameter"].as_array_mut().expect("parameters");
    for mr in mrs {
        p.push(tsunagi_fhir::resource_parameter("medicationRequest", mr));
    }
    if lock {
        let lines = current_lines(&rx);
        let issues = run_check(
            &state,
            &shared,
            &ctx,
            &rx.patient,
            &lines,
            Some(&rx.id),
            "reception",
        )
        .await?;
        p.extend(alerts_params(issues));
    }
    Ok(fhir_json(StatusCode::OK, &out))
}

/// The prescription's lines as a draft dispensing (one use, starting today).
fn current_lines(rx: &Prescription) -> Vec<Med> {
    rx.lines
        .iter()
        .map(|m| Med {
            days: (m.days / rx.uses.max(1)).max(1),
            ..m.clone()
        })
        .collect()
}

// ------------------------------------------------------------------ return

async fn give_back(
    State(state): State<AppState>,
    Caller(ctx): Caller,
    FhirJson(body): FhirJson,
) -> ApiResult<Response> {
    if let Err(reason) = may_dispense(&ctx) {
        return Err(deny(&state, &ctx, "erx-return", reason).await.into());
    }
    let params = parameters(&body)?;
    let id = required(params, "prescriptionId")?;
    let ctx2 = ctx.clone();
    let r = write(&state, &ctx, move |_work, tx| {
        let Some((mut rx, v)) = read_rx(tx, &id)? else {
            return Err(FhirError::not_found(format!(
                "prescription {id} does not exist"
            )));
        };
        if rx.pharmacy.as_deref() != Some(ctx2.principal.org.as_str()) {
            return Err(FhirError::not_found(format!(
                "prescription {id} is not accepted by this pharmacy"
            )));
        }
        rx.give_back(&ctx2.principal.org)?;
        let refs = vec![write_rx(tx, &service_ctx(&ctx2), &rx, Some(v))?];
        service_audit(tx, &ctx2, "erx-return", &rx.patient, refs, 200, None)?;
        Ok(Ok(rx))
    })
    .await;
    match r {
        Ok(rx) => Ok(fhir_json(StatusCode::OK, &record_params(&rx, false))),
        Err(e) => Err(failed(&state, &ctx, "erx-return", e).await.into()),
    }
}

// ------------------------------------------------------------------ dispensing

/// The prescription the calling pharmacy holds (accepted by it), read as the platform.
async fn held(state: &AppState, ctx: &Ctx, id: &str) -> FhirResult<Prescription> {
    let store = state.engine.store.clone();
    let id2 = id.to_string();
    let rx = blocking(move || {
        let Some(r) = store.read("Basic", &id2)?.filter(|r| !r.deleted) else {
            return Ok(None);
        };
        Ok(Some(from_basic::<Prescription>(
            r.resource.as_ref().unwrap_or(&Value::Null),
        )?))
    })
    .await?
    .filter(|_| id.starts_with("erx-"))
    .ok_or_else(|| FhirError::not_found(format!("prescription {id} does not exist")))?;
    if rx.pharmacy.as_deref() != Some(ctx.principal.org.as_str()) || rx.state != RxState::Accepted {
        return Err(crate::model::illegal(
            &rx,
            &format!("dispensed by pharmacy {}", ctx.principal.org),
        ));
    }
    Ok(rx)
}

async fn provisional(
    State(state): State<AppState>,
    Extension(shared): Extension<Arc<Shared>>,
    Caller(ctx): Caller,
    FhirJson(body): FhirJson,
) -> ApiResult<Response> {
    if let Err(reason) = may_dispense(&ctx) {
        return Err(deny(&state, &ctx, "erx-provisional", reason).await.into());
    }
    let params = parameters(&body)?;
    let id = required(params, "prescriptionId")?;
    let mds: Vec<Value> = resources(params, "medicationDispense", "MedicationDispense")?
        .into_iter()
        .cloned()
        .collect();
    if mds.is_empty() {
        return Err(perr(
            "medicationDispense",
            "the provisional dispensing result is required",
        )
        .into());
    }
    let rx = match held(&state, &ctx, &id).await {
        Ok(rx) => rx,
        Err(e) => return Err(failed(&state, &ctx, "erx-provisional", e).await.into()),
    };
    let draft = dispense_lines(&shared, &mds, &ctx.principal.org, None, &[]);
    let issues = run_check(
        &state,
        &shared,
        &ctx,
        &rx.patient,
        &draft,
        Some(&rx.id),
        "provisional",
    )
    .await?;
    Ok(fhir_json(
        StatusCode::OK,
        &json!({"resourceType": "Parameters", "parameter": alerts_params(issues)}),
    ))
}

/// Prepares the pharmacy's MedicationDispenses for storage.
fn prepare_dispense(md: &Value, patient: &str, rx: Option<&Prescription>, last: bool) -> Value {
    let mut md = md.clone();
    detach(&mut md, patient);
    if let Some(o) = md.as_object_mut() {
        o.remove("id");
        o.remove("meta");
    }
    if md.get("status").is_none() {
        md["status"] = json!(if last { "completed" } else { "in-progress" });
    }
    if let Some(rx) = rx {
        md["authorizingPrescription"] = Value::Array(
            rx.requests
                .iter()
                .map(|m| json!({"reference": format!("MedicationRequest/{m}")}))
                .collect(),
        );
    }
    md
}

/// The MedicationDispenses of a dispensing request (at least one), with the
/// pharmacist's signature over them verified; a signature failure is audited as
/// `action`.
async fn signed_dispenses(
    state: &AppState,
    shared: &Shared,
    ctx: &Ctx,
    params: &[Value],
    action: &str,
) -> FhirResult<Vec<Value>> {
    let mds: Vec<Value> = resources(params, "medicationDispense", "MedicationDispense")?
        .into_iter()
        .cloned()
        .collect();
    if mds.is_empty() {
        return Err(perr(
            "medicationDispense",
            "the dispensing result is required",
        ));
    }
    let verified = match string(params, "signature") {
        Some(sig) => {
            let (store, user) = (state.engine.store.clone(), ctx.principal.user.clone());
            let msg = serde_json::to_vec(&Value::Array(mds.clone())).unwrap_or_default();
            blocking(move || {
                keys::verify(
                    &*store,
                    user.as_deref(),
                    &msg,
                    &sig,
                    "Parameters.parameter.where(name='signature')",
                )
            })
            .await
        }
        None if shared.config.signature_required => Err(perr(
            "signature",
            "a pharmacist's signature (HPKI) is required",
        )),
        None => Ok(()),
    };
    match verified {
        Ok(()) => Ok(mds),
        Err(e) => Err(failed(state, ctx, action, e).await),
    }
}

async fn dispense(
    State(state): State<AppState>,
    Extension(shared): Extension<Arc<Shared>>,
    Caller(ctx): Caller,
    FhirJson(body): FhirJson,
) -> ApiResult<Response> {
    if let Err(reason) = may_dispense(&ctx) {
        return Err(deny(&state, &ctx, "erx-dispense", reason).await.into());
    }
    let params = parameters(&body)?;
    let id = required(params, "prescriptionId")?;
    let last = boolean(params, "final").unwrap_or(true);
    let mds = signed_dispenses(&state, &shared, &ctx, params, "erx-dispense").await?;
    let keep_from = shared.today() - Duration::days(shared.config.checks.lookback_days);
    let (ctx2, shared2) = (ctx.clone(), shared.clone());
    let n = mds.len() as u64;
    let r = write(&state, &ctx, move |work, tx| {
        let Some((mut rx, v)) = read_rx(tx, &id)? else {
            return Err(FhirError::not_found(format!(
                "prescription {id} does not exist"
            )));
        };
        let org = ctx2.principal.org.clone();
        let ids: Vec<String> = mds
            .iter()
            .map(|_| uuid::Uuid::new_v4().to_string())
            .collect();
        rx.dispense(&org, last, &ids)?;
        let mut refs = Vec::new();
        for (i, md) in mds.iter().enumerate() {
            let body = prepare_dispense(md, &rx.patient, Some(&rx), last);
            match work.create_in(tx, "MedicationDispense", &ids[i], body) {
                Ok(Ok(w)) => refs.push(reference(&w.stored)),
                Ok(Err(d)) => return Ok(Err(d)),
                Err(e) => {
                    return Err(e.within(&format!(
                        "Parameters.parameter.where(name='medicationDispense')[{i}].resource"
                    )));
                }
            }
        }
        let wctx = service_ctx(&ctx2);
        refs.push(write_rx(tx, &wctx, &rx, Some(v))?);
        let lines = dispense_lines(&shared2, &mds, &org, Some(&rx.id), &ids);
        refs.push(update_index(tx, &wctx, &rx.patient, keep_from, |idx| {
            idx.meds.extend(lines)
        })?);
        service_audit(
            tx,
            &ctx2,
            "erx-dispense",
            &rx.patient,
            refs,
            201,
            Some(format!(
                "cycle {} {}",
                rx.cycle,
                if last { "final" } else { "split part" }
            )),
        )?;
        Ok(Ok(rx))
    })
    .await;
    let rx = match r {
        Ok(rx) => rx,
        Err(e) => return Err(failed(&state, &ctx, "erx-dispense", e).await.into()),
    };
    shared.stats.dispensing(&month_of(shared.today()), n, false);
    Ok(fhir_json(StatusCode::CREATED, &record_params(&rx, false)))
}

async fn paper_dispense(
    State(state): State<AppState>,
    Extension(shared): Extension<Arc<Shared>>,
    Caller(ctx): Caller,
    FhirJson(body): FhirJson,
) -> ApiResult<Response> {
    if let Err(reason) = may_dispense(&ctx) {
        return Err(deny(&state, &ctx, "erx-paper-dispense", reason)
            .await
            .into());
    }
    let params = parameters(&body)?;
    let patient = match identified_patient(&state, &ctx, params).await {
        Ok(p) => p,
        Err(e) => return Err(failed(&state, &ctx, "erx-paper-dispense", e).await.into()),
    };
    let mds = signed_dispenses(&state, &shared, &ctx, params, "erx-paper-dispense").await?;
    let keep_from = shared.today() - Duration::days(shared.config.checks.lookback_days);
    let (ctx2, shared2) = (ctx.clone(), shared.clone());
    let n = mds.len() as u64;
    let ids = write(&state, &ctx, move |work, tx| {
        let org = ctx2.principal.org.clone();
        let ids: Vec<String> = mds
            .iter()
            .map(|_| uuid::Uuid::new_v4().to_string())
            .collect();
        let mut refs = Vec::new();
        for (i, md) in mds.iter().enumerate() {
            let body = prepare_dispense(md, &patient, None, true);
            match work.create_in(tx, "MedicationDispense", &ids[i], body) {
                Ok(Ok(w)) => refs.push(reference(&w.stored)),
                Ok(Err(d)) => return Ok(Err(d)),
                Err(e) => {
                    return Err(e.within(&format!(
                        "Parameters.parameter.where(name='medicationDispense')[{i}].resource"
                    )));
                }
            }
        }
        let lines = dispense_lines(&shared2, &mds, &org, None, &ids);
        refs.push(update_index(
            tx,
            &service_ctx(&ctx2),
            &patient,
            keep_from,
            |idx| idx.meds.extend(lines),
        )?);
        service_audit(tx, &ctx2, "erx-paper-dispense", &patient, refs, 201, None)?;
        Ok(Ok(ids))
    })
    .await;
    let ids = match ids {
        Ok(x) => x,
        Err(e) => return Err(failed(&state, &ctx, "erx-paper-dispense", e).await.into()),
    };
    shared.stats.dispensing(&month_of(shared.today()), n, true);
    let p: Vec<Value> = ids
        .iter()
        .map(|id| json!({"name": "medicationDispense", "valueReference": {"reference": format!("MedicationDispense/{id}")}}))
        .collect();
    Ok(fhir_json(
        StatusCode::CREATED,
        &json!({"resourceType": "Parameters", "parameter": p}),
    ))
}

// ------------------------------------------------------------------ keys, statistics

async fn register_key(
    State(state): State<AppState>,
    Extension(shared): Extension<Arc<Shared>>,
    Caller(ctx): Caller,
    FhirJson(body): FhirJson,
) -> ApiResult<Response> {
    if ctx.principal.role != Role::Operator {
        return Err(state
            .engine
            .deny(
                &ctx,
                Operation::Admin,
                None,
                vec![],
                "registering practitioner keys is reserved for operators".into(),
            )
            .await
            .into());
    }
    let params = parameters(&body)?;
    let user = required(params, "user")?;
    let key = required(params, "publicKey")?;
    keys::parse_public_key(&key).map_err(|m| perr("publicKey", m))?;
    let today = shared.today();
    let (store, u2) = (state.engine.store.clone(), user.clone());
    blocking(move || {
        let mut tx = store.begin()?;
        keys::register(&mut *tx, &u2, &key, today)?;
        tx.commit()
    })
    .await?;
    audit(
        &state,
        &ctx,
        "erx-practitioner-key",
        None,
        vec![format!("Basic/{}", keys::key_id(&user))],
        None,
    )
    .await?;
    Ok(fhir_json(
        StatusCode::OK,
        &json!({"resourceType": "Parameters", "parameter": [{"name": "user", "valueString": user}]}),
    ))
}

async fn statistics(
    State(state): State<AppState>,
    Extension(shared): Extension<Arc<Shared>>,
    Caller(ctx): Caller,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult<Response> {
    if !matches!(ctx.principal.role, Role::Operator | Role::Ministry) {
        return Err(state
            .engine
            .deny(
                &ctx,
                Operation::Admin,
                None,
                vec![],
                "statistics are for operators and the ministry".into(),
            )
            .await
            .into());
    }
    let month = q
        .get("month")
        .cloned()
        .unwrap_or_else(|| month_of(shared.today()));
    if NaiveDate::parse_from_str(&format!("{month}-01"), "%Y-%m-%d").is_err() {
        return Err(FhirError::bad_request(
            Some("month"),
            format!("'{month}' is not a month (YYYY-MM)"),
        )
        .into());
    }
    let m = shared.stats.month(&month);
    audit(
        &state,
        &ctx,
        "erx-statistics",
        None,
        vec![],
        Some(format!("month {month}")),
    )
    .await?;
    let mut p = vec![
        json!({"name": "month", "valueString": m.month}),
        json!({"name": "checks", "valueInteger": m.checks}),
        json!({"name": "duplicateAlerts", "valueInteger": m.duplicate_alerts}),
        json!({"name": "sameEfficacyAlerts", "valueInteger": m.same_efficacy_alerts}),
        json!({"name": "contraindicationAlerts", "valueInteger": m.contraindication_alerts}),
        json!({"name": "prescriptions", "valueInteger": m.prescriptions}),
        json!({"name": "dispensingResults", "valueInteger": m.dispensing_results}),
        json!({"name": "paperDispensingResults", "valueInteger": m.paper_dispensing_results}),
    ];
    for (stage, n) in &m.checks_by_stage {
        p.push(json!({"name": "checksByStage", "part": [
            {"name": "stage", "valueCode": stage},
            {"name": "checks", "valueInteger": n},
        ]}));
    }
    Ok(fhir_json(
        StatusCode::OK,
        &json!({"resourceType": "Parameters", "parameter": p}),
    ))
}

// ------------------------------------------------------------------ patient

async fn my_prescriptions(
    State(state): State<AppState>,
    Caller(ctx): Caller,
) -> ApiResult<Response> {
    let me = match (&ctx.principal.role, &ctx.principal.patient) {
        (Role::Patient, Some(p)) => p.clone(),
        _ => {
            return Err(FhirError::forbidden(
                "this endpoint is the patient's own: sign in with the card (POST /auth/card)",
            )
            .into());
        }
    };
    let mut entries = Vec::new();
    let q = |rt: &str, pairs: Vec<(String, String)>| tsunagi_fhir::query::parse(rt, &pairs);
    let code = format!("{}|prescription", crate::model::CODE_SYSTEM);
    let searches = [
        q(
            "Basic",
            vec![
                ("subject".into(), format!("Patient/{me}")),
                ("code".into(), code),
                ("_count".into(), "500".into()),
            ],
        )?,
        q(
            "MedicationRequest",
            vec![
                ("patient".into(), format!("Patient/{me}")),
                ("_count".into(), "1000".into()),
            ],
        )?,
        q(
            "MedicationDispense",
            vec![
                ("patient".into(), format!("Patient/{me}")),
                ("_count".into(), "1000".into()),
            ],
        )?,
    ];
    for s in searches {
        let res = state.engine.search(&ctx, s).await?;
        for r in res.matches {
            let Some(body) = r.resource else { continue };
            let resource = if r.resource_type == "Basic" {
                match from_basic::<Prescription>(&body) {
                    Ok(rx) => record_params(&rx, true),
                    Err(_) => continue,
                }
            } else {
                body
            };
            entries.push(resource);
        }
    }
    Ok(fhir_json(
        StatusCode::OK,
        &tsunagi_fhir::bundle::searchset_of(entries, Some("match")),
    ))
}
