//! Registration: five-information Bundles (`$register-clins`), documents
//! (`$register-document`), withdrawal (`$withdraw`).
//!
//! Every registration is validated (the server's `Validate`: installed JP-CLINS
//! and document IG packages, masters) and then checked against the service's
//! own rules; only then is anything written, in one transaction with its audit
//! records, so a rejected Bundle leaves nothing behind.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::Response;
use axum::routing::post;
use axum::{Extension, Router};
use base64::Engine as _;
use chrono::{DateTime, Utc};
use serde_json::{Value, json};
use tsunagi_fhir::{FhirError, FhirResult};
use tsunagi_policy::Operation;
use tsunagi_server::engine::{Denied, WriteWork, Written, blocking};
use tsunagi_server::http::extract::{Caller, FhirJson};
use tsunagi_server::http::{ApiResult, fhir_json};
use tsunagi_server::validate::gate;
use tsunagi_server::{AppState, BasicValidator, Ctx, OperationDecl};
use tsunagi_store::{Store, Transaction};

use crate::Shared;
use crate::kinds::*;

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/fhir/$register-clins", post(register_clins))
        .route("/fhir/$register-document", post(register_document))
        .route("/fhir/$withdraw", post(withdraw))
}

pub fn operations() -> Vec<OperationDecl> {
    vec![
        OperationDecl {
            name: "register-clins",
            resource_type: None,
            documentation: "Registers a JP_Bundle_CLINS (collection) of diagnoses, allergies, infections and lab results for a patient (?patient= or the insurance member id); an entry with the same (institution, local identifier) replaces the earlier one. MedicationRequest is refused.",
        },
        OperationDecl {
            name: "register-document",
            resource_type: None,
            documentation: "Registers a referral letter (57133-1, with addressee), discharge summary (18842-5) or checkup report (53576-5) document Bundle; prescriptions in a referral letter are extracted.",
        },
        OperationDecl {
            name: "withdraw",
            resource_type: None,
            documentation: "Withdraws (entered-in-error) an entry the caller's institution registered: Parameters type + identifier (local identifier).",
        },
    ]
}

/// Insurance member id in the JP-CLINS Patient (`保険者番号:記号:番号:枝番`).
pub const MEMBER_ID_SYSTEM: &str = "http://jpfhir.jp/fhir/clins/Idsystem/JP_Insurance_memberID";
/// 保険者番号 identifier system of an insurer Organization.
pub const INSURER_OID: &str = "urn:oid:1.2.392.100495.20.3.61";

/// Full-width digits and letters to ASCII (member ids are often typed in full width).
fn half_width(s: &str) -> String {
    s.chars()
        .map(|c| match c {
            '０'..='９' | 'Ａ'..='Ｚ' | 'ａ'..='ｚ' => {
                char::from_u32(c as u32 - 0xFEE0).unwrap_or(c)
            }
            _ => c,
        })
        .collect()
}

/// The platform Patient the Bundle is about: `?patient=` when given (it must
/// exist), else the insurance member id of the Bundle's Patient through the
/// eligibility service's registered Coverage. A service lookup for matching:
/// it reads without scope and yields an id only.
pub fn resolve_patient(
    store: &dyn Store,
    explicit: Option<&str>,
    patient_entry: Option<(usize, &Value)>,
) -> FhirResult<String> {
    if let Some(id) = explicit {
        return match store.read("Patient", id)? {
            Some(p) if !p.deleted => Ok(id.to_string()),
            _ => Err(FhirError::unprocessable(
                None,
                format!("patient '{id}' is not known to the platform"),
            )),
        };
    }
    let Some((i, p)) = patient_entry else {
        return Err(FhirError::unprocessable(
            Some("Bundle.entry"),
            "the Bundle has no Patient entry and no ?patient= was given",
        ));
    };
    let at = format!("Bundle.entry[{i}].resource.identifier");
    let member = p
        .get("identifier")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .find(|id| id.get("system").and_then(Value::as_str) == Some(MEMBER_ID_SYSTEM))
        .and_then(|id| id.get("value").and_then(Value::as_str))
        .ok_or_else(|| {
            FhirError::unprocessable(
                Some(&at),
                "the Patient carries no insurance member id (JP_Insurance_memberID) and no ?patient= was given",
            )
        })?;
    let candidates = [member.to_string(), half_width(member)];
    for key in candidates {
        let cid = tsunagi_eligibility::coverage::coverage_id(&key);
        if let Some(c) = store.read("Coverage", &cid)?
            && let Some(r) = c.resource
            && let Some(pid) = r
                .pointer("/beneficiary/reference")
                .and_then(Value::as_str)
                .and_then(|s| s.strip_prefix("Patient/"))
        {
            return Ok(pid.to_string());
        }
    }
    Err(FhirError::unprocessable(
        Some(&at),
        "no registered coverage matches the Patient's insurance member id",
    ))
}

/// A WriteWork whose gate is structural only: the Bundle was validated whole
/// against its profiles before anything is written.
fn prevalidated(work: &WriteWork) -> WriteWork {
    WriteWork {
        validator: Arc::new(BasicValidator),
        ..work.clone()
    }
}

/// The caller must register as an institution (care facility, clinical staff).
fn check_registrar(ctx: &Ctx) -> FhirResult<()> {
    let p = &ctx.principal;
    if !p.org_kind.is_care_facility() || !p.role.is_clinical() {
        return Err(FhirError::forbidden(format!(
            "registration is for clinical staff of a medical institution, not role {} at a {}",
            p.role, p.org_kind
        )));
    }
    Ok(())
}

/// Rewrites references to the Patient entry (`urn:uuid:...`) to `Patient/{id}`.
fn rewrite_patient_refs(v: &mut Value, from: &HashSet<String>, to: &str) {
    match v {
        Value::Object(m) => {
            if let Some(Value::String(r)) = m.get_mut("reference")
                && from.contains(r.as_str())
            {
                *r = format!("Patient/{to}");
            }
            for (k, x) in m.iter_mut() {
                if k != "contained" {
                    rewrite_patient_refs(x, from, to);
                }
            }
        }
        Value::Array(a) => a.iter_mut().for_each(|x| rewrite_patient_refs(x, from, to)),
        _ => {}
    }
}

/// The entries of a Bundle as (fullUrl, resource), taken out of it.
fn into_entries(bundle: Value) -> Vec<(String, Value)> {
    let Value::Object(mut b) = bundle else {
        return Vec::new();
    };
    let Some(Value::Array(list)) = b.remove("entry") else {
        return Vec::new();
    };
    list.into_iter()
        .map(|e| match e {
            Value::Object(mut e) => (
                match e.remove("fullUrl") {
                    Some(Value::String(s)) => s,
                    _ => String::new(),
                },
                e.remove("resource").unwrap_or(Value::Null),
            ),
            _ => (String::new(), Value::Null),
        })
        .collect()
}

fn entries(bundle: &Value) -> Vec<(String, Value)> {
    bundle
        .get("entry")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .map(|e| {
            (
                e.get("fullUrl")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_string(),
                e.get("resource").cloned().unwrap_or(Value::Null),
            )
        })
        .collect()
}

fn rt_of(r: &Value) -> &str {
    r.get("resourceType").and_then(Value::as_str).unwrap_or("")
}

/// References by which the Bundle's Patient entries are known.
fn patient_refs(list: &[(String, Value)]) -> HashSet<String> {
    let mut refs = HashSet::new();
    for (full, r) in list {
        if rt_of(r) == "Patient" {
            if !full.is_empty() {
                refs.insert(full.clone());
            }
            if let Some(id) = r.get("id").and_then(Value::as_str) {
                refs.insert(format!("Patient/{id}"));
            }
        }
    }
    refs
}

/// Entry types a JP_Bundle_CLINS may carry as context (not stored).
pub const SUPPORTING: &[&str] = &[
    "Patient",
    "Encounter",
    "Practitioner",
    "PractitionerRole",
    "Organization",
    "Specimen",
];

/// One five-information entry ready to store.
pub struct Prepared {
    pub rt: String,
    pub id: String,
    pub resource: Value,
}

/// Applies the service's rules to a JP_Bundle_CLINS (already validated) and
/// prepares its entries for `patient`. Errors name the entry at fault.
pub fn prepare_clins(
    bundle: Value,
    org: &str,
    patient: &str,
    now: DateTime<Utc>,
) -> FhirResult<Vec<Prepared>> {
    if bundle.get("type").and_then(Value::as_str) != Some("collection") {
        return Err(FhirError::unprocessable(
            Some("Bundle.type"),
            "a JP_Bundle_CLINS registration is a collection Bundle",
        ));
    }
    let list = into_entries(bundle);
    let refs = patient_refs(&list);
    let mut out = Vec::new();
    let mut seen = HashSet::new();
    for (i, (_, owned)) in list.into_iter().enumerate() {
        let r = &owned;
        let at = format!("Bundle.entry[{i}].resource");
        let rt = rt_of(r).to_string();
        let rt = rt.as_str();
        // the Patient and context the entries refer to are not registered themselves
        if SUPPORTING.contains(&rt) {
            continue;
        }
        if rt == "MedicationRequest" {
            return Err(FhirError::unprocessable(
                Some(&at),
                "prescriptions (MedicationRequest) cannot be registered directly; they are extracted from referral letters",
            ));
        }
        let Some(kind) = classify(rt, r) else {
            return Err(FhirError::unprocessable(
                Some(&at),
                format!(
                    "{rt} is not one of the five kinds of information (Condition, AllergyIntolerance, Observation)"
                ),
            ));
        };
        match institution_of(r) {
            Some(n) if n == org => {}
            Some(n) => {
                return Err(FhirError::forbidden(format!(
                    "{at}.extension: the entry names institution {n}; the caller registers for {org} only"
                )));
            }
            None => {
                return Err(FhirError::unprocessable(
                    Some(&format!("{at}.extension")),
                    "the registering institution's number (JP_eCS_InstitutionNumber) is required",
                ));
            }
        }
        let Some(ident) = local_id_of(r) else {
            return Err(FhirError::unprocessable(
                Some(&format!("{at}.identifier")),
                "the institution's local identifier is required (it makes a later registration replace this one)",
            ));
        };
        // Lab results of one order share the order's identifier (as in the official
        // examples): an Observation is identified by identifier and item.
        let local = if rt == "Observation" {
            format!("{ident}|{}", lab_item(r))
        } else {
            ident.to_string()
        };
        if !seen.insert((rt.to_string(), local.clone())) {
            return Err(FhirError::unprocessable(
                Some(&format!("{at}.identifier")),
                format!("local identifier '{local}' occurs twice in the Bundle"),
            ));
        }
        let field = if rt == "AllergyIntolerance" {
            "patient"
        } else {
            "subject"
        };
        let subject = r
            .get(field)
            .and_then(|s| s.get("reference"))
            .and_then(Value::as_str);
        if subject.is_some_and(|s| !refs.contains(s)) {
            return Err(FhirError::unprocessable(
                Some(&format!("{at}.{field}")),
                format!("the {field} must be the Bundle's Patient entry"),
            ));
        }
        let mut res = owned;
        rewrite_patient_refs(&mut res, &refs, patient);
        // the patient is the platform's (an identifier-only subject is resolved to it)
        res[field] = json!({"reference": format!("Patient/{patient}")});
        mark(&mut res, kind, &[], now);
        let id = entry_id("clins", org, rt, &local);
        res["id"] = json!(id);
        out.push(Prepared {
            rt: rt.to_string(),
            id,
            resource: res,
        });
    }
    if out.is_empty() {
        return Err(FhirError::unprocessable(
            Some("Bundle.entry"),
            "the Bundle carries no information to register",
        ));
    }
    Ok(out)
}

/// Writes prepared entries in one transaction (update-as-create by the stable id).
pub fn write_prepared(
    work: &WriteWork,
    tx: &mut dyn Transaction,
    items: Vec<Prepared>,
) -> FhirResult<Result<Vec<Written>, Denied>> {
    let w = prevalidated(work);
    let mut out = Vec::with_capacity(items.len());
    for p in items {
        match w.update_in(tx, &p.rt, &p.id, p.resource, None)? {
            Ok(x) => out.push(x),
            Err(d) => return Ok(Err(d)),
        }
    }
    Ok(Ok(out))
}

fn response(written: &[Written]) -> Value {
    json!({
        "resourceType": "Bundle",
        "type": "batch-response",
        "entry": written.iter().map(|w| json!({
            "response": {
                "status": if w.created { "201 Created" } else { "200 OK" },
                "location": format!("{}/{}/_history/{}", w.stored.resource_type, w.stored.id, w.stored.version),
            }
        })).collect::<Vec<_>>()
    })
}

async fn refuse_denied(state: &AppState, ctx: &Ctx, e: FhirError) -> FhirError {
    if e.status == 403 {
        return state
            .engine
            .deny(ctx, Operation::Create, None, vec![], e.to_string())
            .await;
    }
    e
}

async fn register_clins(
    State(state): State<AppState>,
    Extension(shared): Extension<Arc<Shared>>,
    Caller(ctx): Caller,
    Query(q): Query<HashMap<String, String>>,
    FhirJson(bundle): FhirJson,
) -> ApiResult<Response> {
    if let Err(e) = check_registrar(&ctx) {
        return Err(refuse_denied(&state, &ctx, e).await.into());
    }
    let written = register_clins_bundle(
        &state,
        &shared,
        &ctx,
        shared.now(),
        bundle,
        q.get("patient").cloned(),
    )
    .await;
    match written {
        Ok(w) => Ok(fhir_json(StatusCode::OK, &response(&w))),
        Err(e) => Err(refuse_denied(&state, &ctx, e).await.into()),
    }
}

/// `$register-clins` without HTTP (also used by the benchmark). The entries
/// are written through the service's group-commit writer ([`crate::commit`]):
/// one transaction per Bundle or per group of concurrent Bundles, each Bundle
/// all-or-nothing, with the policy decision and audit record of every entry.
pub async fn register_clins_bundle(
    state: &AppState,
    shared: &Shared,
    ctx: &Ctx,
    now: DateTime<Utc>,
    bundle: Value,
    patient: Option<String>,
) -> FhirResult<Vec<Written>> {
    if rt_of(&bundle) != "Bundle" {
        return Err(FhirError::unprocessable(
            Some("resourceType"),
            "the body must be a JP_Bundle_CLINS Bundle",
        ));
    }
    let validator = state.engine.validator.clone();
    let store = state.engine.store.clone();
    let org = ctx.principal.org.clone();
    let items = blocking(move || {
        gate(&*validator, &bundle)?;
        let pe = bundle
            .get("entry")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .enumerate()
            .filter_map(|(i, e)| Some((i, e.get("resource")?)))
            .find(|(_, r)| rt_of(r) == "Patient");
        let pid = resolve_patient(&*store, patient.as_deref(), pe)?;
        prepare_clins(bundle, &org, &pid, now)
    })
    .await?;
    let work = tsunagi_server::engine::WriteWork::new(&state.engine, ctx);
    match shared.committer().write(work, items).await? {
        Ok(w) => Ok(w),
        Err(d) => Err(state
            .engine
            .deny(ctx, d.op, d.patient, d.resources, d.reason)
            .await),
    }
}

/// The document kind of a document Bundle (by its Composition's type).
pub fn document_kind(composition: &Value) -> Option<Kind> {
    codings(composition.get("type"))
        .iter()
        .find_map(|(_, c)| match *c {
            REFERRAL => Some(Kind::Referral),
            DISCHARGE_SUMMARY => Some(Kind::DischargeSummary),
            c if CHECKUP.contains(&c) => Some(Kind::Checkup),
            _ => None,
        })
}

/// Institution number of an Organization entry.
fn org_number<'a>(r: &'a Value, system: &str) -> Option<&'a str> {
    r.get("identifier")
        .and_then(Value::as_array)?
        .iter()
        .find(|i| i.get("system").and_then(Value::as_str) == Some(system))?
        .get("value")?
        .as_str()
}

/// The addressee institution of a referral: the Organization of the
/// 紹介先情報 section (code 910).
pub fn addressee(composition: &Value, list: &[(String, Value)]) -> Option<String> {
    let sections = composition.get("section").and_then(Value::as_array)?;
    let s = sections
        .iter()
        .find(|s| codings(s.get("code")).iter().any(|(_, c)| *c == "910"))?;
    for e in s
        .get("entry")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let Some(r) = e.get("reference").and_then(Value::as_str) else {
            continue;
        };
        if let Some((_, org)) = list.iter().find(|(full, res)| {
            rt_of(res) == "Organization"
                && (full == r
                    || res
                        .get("id")
                        .and_then(Value::as_str)
                        .is_some_and(|id| r == format!("Organization/{id}")))
        }) && let Some(n) = org_number(org, INSTITUTION_SYSTEM)
        {
            return Some(n.to_string());
        }
    }
    None
}

/// A prepared document: its DocumentReference, its stored body, extracted
/// prescriptions.
pub struct PreparedDocument {
    pub kind: Kind,
    pub doc: Prepared,
    pub body: Prepared,
    pub prescriptions: Vec<Prepared>,
}

/// Applies the document rules to a (validated) document Bundle.
pub fn prepare_document(
    bundle: &Value,
    org: &str,
    patient: &str,
    insurer_of_patient: Option<String>,
    now: DateTime<Utc>,
) -> FhirResult<PreparedDocument> {
    if bundle.get("type").and_then(Value::as_str) != Some("document") {
        return Err(FhirError::unprocessable(
            Some("Bundle.type"),
            "a document registration is a document Bundle",
        ));
    }
    let list = entries(bundle);
    let Some((_, comp)) = list.first().filter(|(_, r)| rt_of(r) == "Composition") else {
        return Err(FhirError::unprocessable(
            Some("Bundle.entry[0].resource"),
            "the first entry of a document Bundle must be its Composition",
        ));
    };
    let Some(kind) = document_kind(comp) else {
        return Err(FhirError::unprocessable(
            Some("Bundle.entry[0].resource.type"),
            "the document type must be a referral letter (57133-1), discharge summary (18842-5) or checkup report (53576-5)",
        ));
    };
    let local = bundle
        .pointer("/identifier/value")
        .and_then(Value::as_str)
        .ok_or_else(|| {
            FhirError::unprocessable(
                Some("Bundle.identifier"),
                "the document's identifier (institution^year^local id) is required",
            )
        })?;
    if let Some(inst) = local.split('^').next().filter(|_| local.contains('^'))
        && inst != org
    {
        return Err(FhirError::forbidden(format!(
            "Bundle.identifier: the document belongs to institution {inst}; the caller registers for {org} only"
        )));
    }
    let to = addressee(comp, &list);
    let attachments = list
        .iter()
        .filter(|(_, r)| matches!(rt_of(r), "DocumentReference" | "Binary" | "Media"))
        .count();
    let mut extra: Vec<(String, String)> = Vec::new();
    match kind {
        Kind::Referral | Kind::DischargeSummary => match &to {
            Some(a) => extra.push((ADDRESSEE_SYSTEM.into(), a.clone())),
            None => {
                return Err(FhirError::unprocessable(
                    Some("Bundle.entry[0].resource.section"),
                    "a referral letter or discharge summary must name its addressee institution (section 910, Organization with its institution number)",
                ));
            }
        },
        _ => {
            if to.is_some() {
                return Err(FhirError::unprocessable(
                    Some("Bundle.entry[0].resource.section"),
                    "a checkup report has no addressee",
                ));
            }
            if attachments > 0 {
                return Err(FhirError::unprocessable(
                    Some("Bundle.entry"),
                    "a checkup report carries no attachments",
                ));
            }
            // the insurer of record (the patient's current coverage) first; the
            // insurer named in the report only when the platform knows none
            let insurer = insurer_of_patient.or_else(|| {
                list.iter()
                    .filter(|(_, r)| rt_of(r) == "Organization")
                    .find_map(|(_, r)| org_number(r, INSURER_OID).map(str::to_string))
            });
            if let Some(i) = insurer {
                extra.push((INSURER_LABEL_SYSTEM.into(), i));
            }
        }
    }
    let refs = patient_refs(&list);
    let doc_id = entry_id("doc", org, "DocumentReference", local);
    let body_id = entry_id("body", org, "Basic", local);
    let extra_ref: Vec<(&str, &str)> = extra
        .iter()
        .map(|(s, c)| (s.as_str(), c.as_str()))
        .collect();
    let data = base64::engine::general_purpose::STANDARD.encode(
        serde_json::to_vec(bundle).map_err(|_| FhirError::internal("bundle not serialisable"))?,
    );
    let mut body = json!({
        "resourceType": "Basic",
        "id": body_id,
        "code": {"coding": [{"system": KIND_SYSTEM, "code": Kind::DocumentBody.as_str()}]},
        "subject": {"reference": format!("Patient/{patient}")},
        "created": now.date_naive().to_string(),
        "extension": [{"url": BODY_EXT, "valueAttachment": {"contentType": "application/fhir+json", "data": data}}],
    });
    mark(&mut body, Kind::DocumentBody, &[], now);
    let mut doc = json!({
        "resourceType": "DocumentReference",
        "id": doc_id,
        "extension": [{"url": INSTITUTION_EXT, "valueIdentifier": {"system": INSTITUTION_SYSTEM, "value": org}}],
        "masterIdentifier": {"system": "http://jpfhir.jp/fhir/clins/bundle-identifier", "value": local},
        "status": "current",
        "type": comp.get("type").cloned().unwrap_or(Value::Null),
        "subject": {"reference": format!("Patient/{patient}")},
        "date": fmt_instant(now),
        "author": [{"identifier": {"system": INSTITUTION_SYSTEM, "value": org}}],
        "description": comp.get("title").cloned().unwrap_or(json!("document")),
        "content": [{"attachment": {
            "contentType": "application/fhir+json",
            "url": format!("DocumentReference/{doc_id}/$retrieve"),
            "title": comp.get("title").cloned().unwrap_or(json!("document")),
        }}],
    });
    if let Some(d) = comp.get("date") {
        doc["context"] = json!({"period": {"start": d}});
    }
    if let Some(a) = &to {
        doc["context"]["related"] =
            json!([{"identifier": {"system": INSTITUTION_SYSTEM, "value": a}}]);
    }
    mark(&mut doc, kind, &extra_ref, now);
    let mut prescriptions = Vec::new();
    if kind != Kind::Checkup {
        for (i, (full, r)) in list.iter().enumerate() {
            if rt_of(r) != "MedicationRequest" {
                continue;
            }
            let mut rx = r.clone();
            rewrite_patient_refs(&mut rx, &refs, patient);
            rx["subject"] = json!({"reference": format!("Patient/{patient}")});
            if institution_of(&rx).is_none() {
                set_extension(
                    &mut rx,
                    INSTITUTION_EXT,
                    json!({"valueIdentifier": {"system": INSTITUTION_SYSTEM, "value": org}}),
                );
            }
            let rx_local = local_id_of(r)
                .map(|l| format!("{local}|{l}"))
                .unwrap_or_else(|| format!("{local}|{full}|{i}"));
            let id = entry_id("rx", org, "MedicationRequest", &rx_local);
            rx["id"] = json!(id);
            // a resource id inside the document is not ours: drop contained refs to it
            mark(&mut rx, Kind::Prescription, &[], now);
            prescriptions.push(Prepared {
                rt: "MedicationRequest".into(),
                id,
                resource: rx,
            });
        }
    }
    Ok(PreparedDocument {
        kind,
        doc: Prepared {
            rt: "DocumentReference".into(),
            id: doc_id,
            resource: doc,
        },
        body: Prepared {
            rt: "Basic".into(),
            id: body_id,
            resource: body,
        },
        prescriptions,
    })
}

async fn register_document(
    State(state): State<AppState>,
    Extension(shared): Extension<Arc<Shared>>,
    Caller(ctx): Caller,
    Query(q): Query<HashMap<String, String>>,
    FhirJson(bundle): FhirJson,
) -> ApiResult<Response> {
    if let Err(e) = check_registrar(&ctx) {
        return Err(refuse_denied(&state, &ctx, e).await.into());
    }
    match register_document_bundle(
        &state,
        &ctx,
        shared.now(),
        bundle,
        q.get("patient").cloned(),
    )
    .await
    {
        Ok(doc) => Ok(fhir_json(
            if doc.created {
                StatusCode::CREATED
            } else {
                StatusCode::OK
            },
            doc.stored.resource.as_ref().unwrap_or(&Value::Null),
        )),
        Err(e) => Err(refuse_denied(&state, &ctx, e).await.into()),
    }
}

/// `$register-document` without HTTP. Returns the DocumentReference written.
pub async fn register_document_bundle(
    state: &AppState,
    ctx: &Ctx,
    now: DateTime<Utc>,
    bundle: Value,
    patient: Option<String>,
) -> FhirResult<Written> {
    if rt_of(&bundle) != "Bundle" {
        return Err(FhirError::unprocessable(
            Some("resourceType"),
            "the body must be a document Bundle",
        ));
    }
    let validator = state.engine.validator.clone();
    let store = state.engine.store.clone();
    let org = ctx.principal.org.clone();
    let prepared = blocking(move || {
        gate(&*validator, &bundle)?;
        if bundle.get("signature").is_some() {
            crate::signature::verify_bundle(&*store, &bundle, &org)?;
        }
        let list = entries(&bundle);
        let pe = list
            .iter()
            .enumerate()
            .find(|(_, (_, r))| rt_of(r) == "Patient")
            .map(|(i, (_, r))| (i, r));
        let pid = resolve_patient(&*store, patient.as_deref(), pe)?;
        let insurer = tsunagi_eligibility::coverage::current_coverage(
            &*store,
            &pid,
            tsunagi_eligibility::coverage::today_jst(),
        )?
        .into_iter()
        .find_map(|c| {
            c.pointer("/payor/0/identifier/value")
                .and_then(Value::as_str)
                .map(str::to_string)
        });
        prepare_document(&bundle, &org, &pid, insurer, now)
    })
    .await?;
    state
        .engine
        .write(ctx, move |work, tx| {
            let w = prevalidated(work);
            let mut rest = vec![prepared.body];
            rest.extend(prepared.prescriptions);
            if let Err(d) = write_prepared(&w, tx, rest)? {
                return Ok(Err(d));
            }
            w.update_in(
                tx,
                &prepared.doc.rt,
                &prepared.doc.id,
                prepared.doc.resource,
                None,
            )
        })
        .await
}

/// Marks a resource entered-in-error, the way its type says it.
pub fn mark_withdrawn(rt: &str, r: &mut Value) -> bool {
    match rt {
        "Condition" => {
            r["verificationStatus"] = json!({"coding": [{"system": "http://terminology.hl7.org/CodeSystem/condition-ver-status", "code": "entered-in-error"}]});
            r.as_object_mut().map(|o| o.remove("clinicalStatus"));
        }
        "AllergyIntolerance" => {
            r["verificationStatus"] = json!({"coding": [{"system": "http://terminology.hl7.org/CodeSystem/allergyintolerance-verification", "code": "entered-in-error"}]});
            r.as_object_mut().map(|o| o.remove("clinicalStatus"));
        }
        "Observation" | "MedicationRequest" | "DocumentReference" => {
            r["status"] = json!("entered-in-error");
        }
        _ => return false,
    }
    true
}

async fn withdraw(
    State(state): State<AppState>,
    Caller(ctx): Caller,
    FhirJson(input): FhirJson,
) -> ApiResult<Response> {
    if let Err(e) = check_registrar(&ctx) {
        return Err(refuse_denied(&state, &ctx, e).await.into());
    }
    let params = tsunagi_eligibility::reception::Params::parse(&input)?;
    let rt = params.string("type").ok_or_else(|| {
        FhirError::bad_request(
            Some("Parameters.parameter"),
            "type (the resource type) is required",
        )
    })?;
    let local = params.string("identifier").ok_or_else(|| {
        FhirError::bad_request(
            Some("Parameters.parameter"),
            "identifier (the local identifier, or for documents the Bundle identifier) is required",
        )
    })?;
    let prefix = match rt.as_str() {
        "Condition" | "AllergyIntolerance" | "Observation" => "clins",
        "DocumentReference" => "doc",
        _ => {
            return Err(FhirError::bad_request(
                Some("Parameters.parameter"),
                format!("{rt} entries cannot be withdrawn here (Condition, AllergyIntolerance, Observation, DocumentReference)"),
            )
            .into());
        }
    };
    // an Observation is identified by its identifier and item (`system|code`)
    let local = match (rt.as_str(), params.string("item")) {
        ("Observation", Some(item)) => format!("{local}|{item}"),
        ("Observation", None) => {
            return Err(FhirError::bad_request(
                Some("Parameters.parameter"),
                "item (system|code of the lab item) is required to withdraw an Observation",
            )
            .into());
        }
        _ => local,
    };
    let id = entry_id(prefix, &ctx.principal.org, &rt, &local);
    let written = state
        .engine
        .write(&ctx, move |work, tx| {
            let Some(cur) = tx.read(&rt, &id)?.filter(|c| !c.deleted) else {
                return Err(FhirError::not_found(format!(
                    "no {rt} with local identifier '{local}' was registered by this institution"
                )));
            };
            let mut r = cur.resource.unwrap_or(Value::Null);
            mark_withdrawn(&rt, &mut r);
            prevalidated(work).update_in(tx, &rt, &id, r, None)
        })
        .await?;
    Ok(fhir_json(
        StatusCode::OK,
        written.stored.resource.as_ref().unwrap_or(&Value::Null),
    ))
}
