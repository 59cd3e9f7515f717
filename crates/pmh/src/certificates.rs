//! Certificates (診断書等) to a municipality's mailbox.
//!
//! A care facility's doctor submits a certificate (e.g. the medical opinion for a
//! designated-intractable-disease application) for a patient to a municipality;
//! the municipality lists its mailbox, downloads and acknowledges. Each
//! certificate is one `Basic` record in the patient's compartment (subject),
//! written by the service (author `pmh-service`, so no one changes it through
//! REST), with the document as an attachment and the mailbox state
//! (submitted → acknowledged) in extensions; every change is a new version with
//! its audit record in the same transaction. An in-memory index answers the
//! mailbox listing; it is rebuilt from the store on start.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};

use axum::extract::{Path as UrlPath, State};
use axum::http::StatusCode;
use axum::response::Response;
use axum::routing::{get, post};
use axum::{Extension, Router};
use chrono::SecondsFormat;
use serde_json::{Value, json};
use tsunagi_fhir::{FhirError, FhirResult, query};
use tsunagi_policy::audit::AuditRecord;
use tsunagi_server::engine::blocking;
use tsunagi_server::http::extract::{Caller, FhirJson};
use tsunagi_server::http::{ApiResult, fhir_json};
use tsunagi_server::{AppState, Ctx};
use tsunagi_store::{Scope, Store, WriteContext};

use crate::http::{
    audit_action, deny, is_facility_staff, patient_id, require_municipality, required_str,
};
use crate::recipients::ext;
use crate::{PMH_KIND_SYSTEM, PMH_ORG, Shared};

/// One mailbox entry (metadata only; the document stays in the store).
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    pub id: String,
    pub municipality: String,
    pub patient: String,
    pub from: String,
    pub kind: String,
    pub title: String,
    pub submitted: String,
    pub status: String,
    pub acknowledged: Option<String>,
}

impl Entry {
    fn from_record(r: &Value) -> Option<Entry> {
        let get = |name: &str| {
            r.get("extension")?
                .as_array()?
                .iter()
                .find(|e| e.get("url").and_then(Value::as_str) == Some(ext(name).as_str()))
                .and_then(|e| {
                    e.get("valueString")
                        .or(e.get("valueCode"))
                        .or(e.get("valueDateTime"))
                })
                .and_then(Value::as_str)
                .map(str::to_string)
        };
        Some(Entry {
            id: r.get("id")?.as_str()?.to_string(),
            municipality: get("mailbox")?,
            patient: r
                .pointer("/subject/reference")?
                .as_str()?
                .strip_prefix("Patient/")?
                .to_string(),
            from: get("submitted-by")?,
            kind: get("certificate-kind").unwrap_or_default(),
            title: get("certificate-title").unwrap_or_default(),
            submitted: get("submitted-at")?,
            status: get("mailbox-status")?,
            acknowledged: get("acknowledged-at"),
        })
    }

    fn to_json(&self) -> Value {
        json!({"id": self.id, "patient": format!("Patient/{}", self.patient), "from": self.from,
            "kind": self.kind, "title": self.title, "submitted": self.submitted,
            "status": self.status, "acknowledged": self.acknowledged})
    }
}

/// The mailbox index.
#[derive(Default)]
pub struct Mailbox(RwLock<BTreeMap<String, Entry>>);

impl Mailbox {
    pub fn load(&self, store: &dyn Store) -> FhirResult<()> {
        let mut offset = 0;
        loop {
            let q = query::parse(
                "Basic",
                &[
                    ("code".into(), format!("{PMH_KIND_SYSTEM}|certificate")),
                    ("_count".into(), "1000".into()),
                    ("_offset".into(), offset.to_string()),
                ],
            )?;
            let found = store.search(&q, &Scope::Unrestricted)?;
            let n = found.matches.len();
            for s in found.matches {
                if let Some(e) = s.resource.as_ref().and_then(Entry::from_record) {
                    self.put(e);
                }
            }
            if n < 1000 {
                return Ok(());
            }
            offset += n;
        }
    }
    fn put(&self, e: Entry) {
        self.0
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(e.id.clone(), e);
    }
    pub fn of(&self, municipality: &str) -> Vec<Entry> {
        self.0
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .filter(|e| e.municipality == municipality)
            .cloned()
            .collect()
    }
    pub fn get(&self, id: &str) -> Option<Entry> {
        self.0
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(id)
            .cloned()
    }
}

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/pmh/certificates", post(submit).get(list))
        .route("/pmh/certificates/{id}", get(download))
        .route("/pmh/certificates/{id}/acknowledge", post(acknowledge))
}

/// Writes a certificate record as the service, with the caller's audit record.
fn write(
    store: &dyn Store,
    ctx: &Ctx,
    id: &str,
    rec: Value,
    action: &str,
    patient: &str,
) -> FhirResult<Value> {
    let mut tx = store.begin()?;
    let wc = WriteContext {
        org: Some(PMH_ORG.into()),
        user: ctx.principal.user.clone(),
    };
    let (s, _) = tx.update("Basic", id, rec, None, &wc)?;
    let a = AuditRecord::new(&ctx.principal, ctx.purpose, action, ctx.request_id.clone())
        .with_patient(Some(patient.to_string()))
        .with_resources(vec![format!("Basic/{}/_history/{}", s.id, s.version)]);
    tx.audit_append(&[a.to_json()])?;
    tx.commit()?;
    Ok(s.resource.unwrap_or_default())
}

/// `POST /pmh/certificates` (clinical staff of a facility): `{"municipality",
/// "patient", "kind", "title", "contentType", "data" (base64)}`.
async fn submit(
    State(state): State<AppState>,
    Extension(shared): Extension<Arc<Shared>>,
    Caller(ctx): Caller,
    FhirJson(body): FhirJson,
) -> ApiResult<Response> {
    if !(is_facility_staff(&ctx) && ctx.principal.role.is_clinical()) {
        return Err(deny(
            &state,
            &ctx,
            "certificate",
            "certificates are submitted by clinical staff of a care facility".into(),
        )
        .await
        .into());
    }
    let municipality = required_str(&body, "municipality")?;
    tsunagi_policy::ids::validate_local_government_code(&municipality)
        .map_err(|e| FhirError::invalid_element("municipality", e.to_string()))?;
    let patient = patient_id(&required_str(&body, "patient")?);
    let kind = required_str(&body, "kind")?;
    let title = body
        .get("title")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string();
    let content_type = required_str(&body, "contentType")?;
    let data = required_str(&body, "data")?;
    if !data
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'/' | b'='))
    {
        return Err(FhirError::invalid_element("data", "data is base64").into());
    }
    let now = shared.now().to_rfc3339_opts(SecondsFormat::Secs, true);
    let id = format!("pmh-cert-{}", uuid::Uuid::new_v4());
    let rec = json!({
        "resourceType": "Basic",
        "id": id,
        "code": {"coding": [{"system": PMH_KIND_SYSTEM, "code": "certificate"}]},
        "subject": {"reference": format!("Patient/{patient}")},
        "created": now.get(..10).unwrap_or(""),
        "extension": [
            {"url": ext("mailbox"), "valueString": municipality},
            {"url": ext("submitted-by"), "valueString": ctx.principal.org},
            {"url": ext("certificate-kind"), "valueString": kind},
            {"url": ext("certificate-title"), "valueString": title},
            {"url": ext("submitted-at"), "valueDateTime": now},
            {"url": ext("mailbox-status"), "valueCode": "submitted"},
            {"url": ext("document"), "valueAttachment": {"contentType": content_type, "data": data, "title": title}}
        ]
    });
    let store = state.engine.store.clone();
    let (c2, p2, id2) = (ctx.clone(), patient.clone(), id.clone());
    let exists = {
        let store = store.clone();
        let p = patient.clone();
        blocking(move || Ok(store.read("Patient", &p)?.is_some_and(|s| !s.deleted))).await?
    };
    if !exists {
        return Err(FhirError::invalid_element(
            "patient",
            format!("Patient/{patient} does not exist"),
        )
        .into());
    }
    let saved =
        blocking(move || write(&*store, &c2, &id2, rec, "pmh-certificate-submit", &p2)).await?;
    if let Some(e) = Entry::from_record(&saved) {
        let out = e.to_json();
        shared.certificates.put(e);
        return Ok(fhir_json(StatusCode::CREATED, &out));
    }
    Err(FhirError::internal("certificate record unreadable").into())
}

/// `GET /pmh/certificates` (municipality): its mailbox, metadata only.
async fn list(
    State(state): State<AppState>,
    Extension(shared): Extension<Arc<Shared>>,
    Caller(ctx): Caller,
) -> ApiResult<Response> {
    let m = require_municipality(&state, &ctx, "certificate mailbox").await?;
    let entries = shared.certificates.of(&m);
    // one record per patient whose certificate metadata is disclosed
    let mut recs = Vec::new();
    for e in &entries {
        recs.push(
            AuditRecord::new(
                &ctx.principal,
                ctx.purpose,
                "pmh-certificate-list",
                ctx.request_id.clone(),
            )
            .with_patient(Some(e.patient.clone()))
            .with_resources(vec![format!("Basic/{}", e.id)]),
        );
    }
    state.engine.audit.record_many(recs).await?;
    Ok(fhir_json(
        StatusCode::OK,
        &json!({"total": entries.len(), "certificates": entries.iter().map(Entry::to_json).collect::<Vec<_>>()}),
    ))
}

async fn own_entry(state: &AppState, shared: &Shared, ctx: &Ctx, id: &str) -> FhirResult<Entry> {
    let m = require_municipality(state, ctx, "certificate mailbox").await?;
    match shared.certificates.get(id) {
        Some(e) if e.municipality == m => Ok(e),
        _ => Err(FhirError::not_found(format!(
            "no certificate {id} in the mailbox of {m}"
        ))),
    }
}

/// `GET /pmh/certificates/{id}` (municipality): the certificate with its document.
async fn download(
    State(state): State<AppState>,
    Extension(shared): Extension<Arc<Shared>>,
    UrlPath(id): UrlPath<String>,
    Caller(ctx): Caller,
) -> ApiResult<Response> {
    let e = own_entry(&state, &shared, &ctx, &id).await?;
    let store = state.engine.store.clone();
    let id2 = id.clone();
    let s = blocking(move || store.read("Basic", &id2))
        .await?
        .ok_or_else(|| FhirError::not_found(format!("certificate {id} is gone")))?;
    audit_action(
        &state,
        &ctx,
        "pmh-certificate-download",
        Some(e.patient.clone()),
        vec![crate::http::reference(&s)],
    )
    .await?;
    Ok(fhir_json(
        StatusCode::OK,
        s.resource.as_ref().unwrap_or(&Value::Null),
    ))
}

/// `POST /pmh/certificates/{id}/acknowledge` (municipality).
async fn acknowledge(
    State(state): State<AppState>,
    Extension(shared): Extension<Arc<Shared>>,
    UrlPath(id): UrlPath<String>,
    Caller(ctx): Caller,
) -> ApiResult<Response> {
    let e = own_entry(&state, &shared, &ctx, &id).await?;
    let now = shared.now().to_rfc3339_opts(SecondsFormat::Secs, true);
    let store = state.engine.store.clone();
    let (c2, id2, p2) = (ctx.clone(), id.clone(), e.patient.clone());
    let saved = blocking(move || {
        let cur = store
            .read("Basic", &id2)?
            .and_then(|s| s.resource)
            .ok_or_else(|| FhirError::not_found("certificate is gone"))?;
        let mut rec = cur;
        let exts = rec["extension"]
            .as_array_mut()
            .expect("certificate extensions");
        exts.retain(|x| {
            let u = x.get("url").and_then(Value::as_str).unwrap_or("");
            u != ext("mailbox-status") && u != ext("acknowledged-at")
        });
        exts.push(json!({"url": ext("mailbox-status"), "valueCode": "acknowledged"}));
        exts.push(json!({"url": ext("acknowledged-at"), "valueDateTime": now}));
        write(&*store, &c2, &id2, rec, "pmh-certificate-acknowledge", &p2)
    })
    .await?;
    let e = Entry::from_record(&saved)
        .ok_or_else(|| FhirError::internal("certificate record unreadable"))?;
    let out = e.to_json();
    shared.certificates.put(e);
    Ok(fhir_json(StatusCode::OK, &out))
}
