//! Reading documents: `GET /fhir/$referrals` (the referral letters and discharge
//! summaries addressed to the caller's institution) and
//! `GET /fhir/DocumentReference/{id}/$retrieve` (the document Bundle itself).
//!
//! Both go through the engine: the policy decides on the DocumentReference
//! (addressee label, insurer label, consent category C, the patient's own
//! view) and the read is audited. The stored body follows the decision on its
//! DocumentReference. Retrieval by the addressee marks a referral received
//! (extension `received`, written by the service with its audit record in the
//! same transaction); the retention rule then counts from the receipt.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::Response;
use axum::routing::get;
use axum::{Extension, Router};
use base64::Engine as _;
use serde_json::{Value, json};
use tsunagi_fhir::extension::extension;
use tsunagi_fhir::{FhirError, FhirResult, query};
use tsunagi_policy::audit::Outcome;
use tsunagi_server::engine::blocking;
use tsunagi_server::http::extract::Caller;
use tsunagi_server::http::{ApiResult, fhir_json};
use tsunagi_server::{AppState, Ctx, OperationDecl};
use tsunagi_store::{Store, StoredResource, WriteContext, security_labels};

use crate::Shared;
use crate::kinds::*;

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/fhir/$referrals", get(referrals))
        .route("/fhir/DocumentReference/{id}/$retrieve", get(retrieve))
}

pub fn operations() -> Vec<OperationDecl> {
    vec![
        OperationDecl {
            name: "referrals",
            resource_type: None,
            documentation: "Referral letters and discharge summaries addressed to the caller's institution (DocumentReference searchset, newest first)",
        },
        OperationDecl {
            name: "retrieve",
            resource_type: Some("DocumentReference"),
            documentation: "The document Bundle of a registered document; retrieval by the addressee marks a referral received",
        },
    ]
}

/// A searchset Bundle of stored resources.
pub fn searchset(matches: &[StoredResource], total: u64) -> Value {
    let entries = matches
        .iter()
        .filter_map(|m| m.resource.as_ref())
        .map(|r| {
            let url = format!(
                "{}/{}",
                r["resourceType"].as_str().unwrap_or(""),
                r["id"].as_str().unwrap_or("")
            );
            tsunagi_fhir::object([
                ("fullUrl", url.into()),
                ("resource", r.clone()),
                ("search", json!({"mode": "match"})),
            ])
        })
        .collect();
    tsunagi_fhir::object([
        ("resourceType", "Bundle".into()),
        ("type", "searchset".into()),
        ("total", total.into()),
        ("entry", Value::Array(entries)),
    ])
}

async fn referrals(State(state): State<AppState>, Caller(ctx): Caller) -> ApiResult<Response> {
    let q = query::parse(
        "DocumentReference",
        &[
            ("_count".into(), "200".into()),
            ("_sort".into(), "-date".into()),
        ],
    )?;
    let found = state.engine.search(&ctx, q).await?;
    let org = ctx.principal.org.clone();
    let mine: Vec<StoredResource> = found
        .matches
        .into_iter()
        .filter(|m| {
            m.resource.as_ref().is_some_and(|r| {
                security_labels(r).contains(&(ADDRESSEE_SYSTEM.to_string(), org.clone()))
            })
        })
        .collect();
    let n = mine.len() as u64;
    Ok(fhir_json(StatusCode::OK, &searchset(&mine, n)))
}

/// The stored body of a document (the Basic next to its DocumentReference).
pub fn body_of(store: &dyn Store, doc: &Value, author: &str) -> FhirResult<Value> {
    let local = doc
        .pointer("/masterIdentifier/value")
        .and_then(Value::as_str)
        .ok_or_else(|| FhirError::internal("stored document has no identifier"))?;
    let id = entry_id("body", author, "Basic", local);
    let basic = store
        .read("Basic", &id)?
        .and_then(|b| b.resource)
        .ok_or_else(|| FhirError::not_found("the document body is no longer stored"))?;
    let data = extension(&basic, BODY_EXT)
        .and_then(|e| e.pointer("/valueAttachment/data"))
        .and_then(Value::as_str)
        .ok_or_else(|| FhirError::internal("stored document body is empty"))?;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(data)
        .map_err(|_| FhirError::internal("stored document body is not base64"))?;
    serde_json::from_slice(&bytes).map_err(|_| FhirError::internal("stored document is not JSON"))
}

async fn retrieve(
    State(state): State<AppState>,
    Extension(shared): Extension<Arc<Shared>>,
    Caller(ctx): Caller,
    Path(id): Path<String>,
) -> ApiResult<Response> {
    let doc = state.engine.read(&ctx, "DocumentReference", &id).await?;
    let (store, ctx2, now) = (state.engine.store.clone(), ctx.clone(), shared.now());
    let bundle = blocking(move || {
        let r = doc.resource.clone().unwrap_or(Value::Null);
        let author = doc.author_org.clone().unwrap_or_default();
        let body = body_of(&*store, &r, &author)?;
        let addressed = security_labels(&r)
            .contains(&(ADDRESSEE_SYSTEM.to_string(), ctx2.principal.org.clone()));
        if addressed && instant_ext(&r, RECEIVED_EXT).is_none() {
            match mark_received(&*store, &ctx2, &doc, now) {
                // a concurrent retrieval marked it first
                Err(e) if e.status == 412 => {}
                r => r?,
            }
        }
        Ok(body)
    })
    .await?;
    Ok(fhir_json(StatusCode::OK, &bundle))
}

/// Records the receipt on the DocumentReference (a new version, still the
/// author's record) with the audit record in the same transaction.
fn mark_received(
    store: &dyn Store,
    ctx: &Ctx,
    doc: &StoredResource,
    now: chrono::DateTime<chrono::Utc>,
) -> FhirResult<()> {
    let Some(mut r) = doc.resource.clone() else {
        return Ok(());
    };
    crate::kinds::mark_received(&mut r, now);
    let mut tx = store.begin()?;
    let wc = WriteContext {
        org: doc.author_org.clone(),
        user: Some(format!("{SERVICE_ORG_USER}{}", ctx.principal.org)),
    };
    let stored = tx.update("DocumentReference", &doc.id, r, Some(doc.version), &wc)?;
    let patient = tsunagi_fhir::index::compartment_patient(
        "DocumentReference",
        stored.0.resource.as_ref().unwrap_or(&Value::Null),
    );
    tx.audit_append(&[tsunagi_eligibility::reception::audit_json(
        ctx,
        "referral-received",
        patient,
        vec![format!(
            "DocumentReference/{}/_history/{}",
            doc.id, stored.0.version
        )],
        Outcome::Success,
        200,
        None,
    )])?;
    tx.commit()
}

/// User recorded on service-written versions (`sharing-service:<org>`).
pub const SERVICE_ORG_USER: &str = "sharing-service:";
