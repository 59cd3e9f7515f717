//! Infectious-disease notifications (発生届): an institution submits one through
//! the service; it is delivered to the responsible public health centre's
//! organisation mailbox as a FHIR `Communication` labelled `mailbox|{centre}`.
//! The centre's staff list their mailbox (`GET /fhir/$notifications`, or a
//! Communication search) and acknowledge (`POST
//! /fhir/Communication/{id}/$acknowledge`: status completed, `received` set).
//! The notification is never shown to the patient or under consent.

use std::collections::HashMap;
use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::Response;
use axum::routing::{get, post};
use axum::{Extension, Router};
use serde_json::{Value, json};
use tsunagi_fhir::{FhirError, query};
use tsunagi_policy::audit::Outcome;
use tsunagi_policy::identity::Role;
use tsunagi_server::engine::blocking;
use tsunagi_server::http::extract::{Caller, FhirJson};
use tsunagi_server::http::{ApiResult, fhir_json};
use tsunagi_server::{AppState, OperationDecl};
use tsunagi_store::WriteContext;

use crate::Shared;
use crate::documents::searchset;
use crate::kinds::*;

/// Organisation codes of public health centres (保健所) in the registry.
pub const HEALTH_CENTRE_SYSTEM: &str = "https://tsunagi.dev/fhir/NamingSystem/organisation-code";

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/fhir/$notify-infection", post(submit))
        .route("/fhir/$notifications", get(list))
        .route("/fhir/Communication/{id}/$acknowledge", post(acknowledge))
}

pub fn operations() -> Vec<OperationDecl> {
    vec![
        OperationDecl {
            name: "notify-infection",
            resource_type: None,
            documentation: "Submits an infectious-disease notification (発生届): Parameters patient, disease (valueCoding), diagnosed (date), healthCentre (organisation code), note",
        },
        OperationDecl {
            name: "notifications",
            resource_type: None,
            documentation: "The caller's public health centre mailbox (Communication searchset; ?status=in-progress|completed)",
        },
        OperationDecl {
            name: "acknowledge",
            resource_type: Some("Communication"),
            documentation: "Acknowledges a notification in the caller's mailbox",
        },
    ]
}

async fn submit(
    State(state): State<AppState>,
    Extension(shared): Extension<Arc<Shared>>,
    Caller(ctx): Caller,
    FhirJson(input): FhirJson,
) -> ApiResult<Response> {
    let p = &ctx.principal;
    if !p.org_kind.is_care_facility() || !matches!(p.role, Role::Doctor | Role::Dentist) {
        let e = state
            .engine
            .deny(
                &ctx,
                tsunagi_policy::Operation::Create,
                None,
                vec!["Communication".into()],
                format!(
                    "notifications are submitted by a doctor of a medical institution, not role {}",
                    p.role
                ),
            )
            .await;
        return Err(e.into());
    }
    let params = tsunagi_eligibility::reception::Params::parse(&input)?;
    let need = |name: &str| {
        params.string(name).ok_or_else(|| {
            FhirError::bad_request(Some("Parameters.parameter"), format!("{name} is required"))
        })
    };
    let patient = need("patient")?;
    let centre = need("healthCentre")?;
    let diagnosed = need("diagnosed")?;
    let disease = input
        .get("parameter")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .find(|x| x.get("name").and_then(Value::as_str) == Some("disease"))
        .and_then(|x| {
            x.get("valueCoding")
                .or_else(|| x.get("valueCodeableConcept"))
        })
        .cloned()
        .ok_or_else(|| {
            FhirError::bad_request(
                Some("Parameters.parameter"),
                "disease (valueCoding) is required",
            )
        })?;
    let disease = if disease.get("coding").is_some() {
        disease
    } else {
        json!({"coding": [disease]})
    };
    let now = shared.now();
    let org = p.org.clone();
    let mut c = json!({
        "resourceType": "Communication",
        "extension": [{"url": INSTITUTION_EXT, "valueIdentifier": {"system": INSTITUTION_SYSTEM, "value": org}}],
        "status": "in-progress",
        "category": [{"coding": [{"system": KIND_SYSTEM, "code": Kind::Notification.as_str(), "display": "発生届"}]}],
        "subject": {"reference": format!("Patient/{patient}")},
        "sent": fmt_instant(now),
        "sender": {"identifier": {"system": INSTITUTION_SYSTEM, "value": org}},
        "recipient": [{"identifier": {"system": HEALTH_CENTRE_SYSTEM, "value": centre}}],
        "reasonCode": [disease],
        "payload": [{"contentString": format!("diagnosed {diagnosed}{}", params.string("note").map(|n| format!("; {n}")).unwrap_or_default())}],
    });
    mark(
        &mut c,
        Kind::Notification,
        &[(MAILBOX_SYSTEM, &centre)],
        now,
    );
    let store = state.engine.store.clone();
    let pid = patient.clone();
    let known =
        blocking(move || Ok(store.read("Patient", &pid)?.is_some_and(|p| !p.deleted))).await?;
    if !known {
        return Err(FhirError::unprocessable(
            Some("Parameters.parameter"),
            format!("patient '{patient}' is not known to the platform"),
        )
        .into());
    }
    let written = state.engine.create(&ctx, "Communication", c, None).await?;
    Ok(fhir_json(
        StatusCode::CREATED,
        written.stored.resource.as_ref().unwrap_or(&Value::Null),
    ))
}

async fn list(
    State(state): State<AppState>,
    Caller(ctx): Caller,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult<Response> {
    let mut params = vec![
        ("_count".to_string(), "200".to_string()),
        ("_sort".to_string(), "-sent".to_string()),
        (
            "category".to_string(),
            format!("{KIND_SYSTEM}|{}", Kind::Notification.as_str()),
        ),
    ];
    if let Some(s) = q.get("status") {
        params.push(("status".into(), s.clone()));
    }
    let found = state
        .engine
        .search(&ctx, query::parse("Communication", &params)?)
        .await?;
    Ok(fhir_json(
        StatusCode::OK,
        &searchset(&found.matches, found.total),
    ))
}

async fn acknowledge(
    State(state): State<AppState>,
    Extension(shared): Extension<Arc<Shared>>,
    Caller(ctx): Caller,
    Path(id): Path<String>,
) -> ApiResult<Response> {
    let found = state.engine.read(&ctx, "Communication", &id).await?;
    let mine = found.resource.as_ref().is_some_and(|r| {
        tsunagi_store::security_labels(r)
            .contains(&(MAILBOX_SYSTEM.to_string(), ctx.principal.org.clone()))
    });
    if !mine {
        return Err(state
            .engine
            .deny(
                &ctx,
                tsunagi_policy::Operation::Update,
                None,
                vec![format!("Communication/{id}")],
                "only the receiving public health centre acknowledges a notification".into(),
            )
            .await
            .into());
    }
    let (store, now, ctx2) = (state.engine.store.clone(), shared.now(), ctx.clone());
    let updated = blocking(move || {
        let mut r = found.resource.clone().unwrap_or(Value::Null);
        if r.get("status").and_then(Value::as_str) == Some("completed") {
            return Ok(r);
        }
        r["status"] = json!("completed");
        r["received"] = json!(fmt_instant(now));
        let mut tx = store.begin()?;
        let wc = WriteContext {
            org: found.author_org.clone(),
            user: Some(format!(
                "{}{}",
                crate::documents::SERVICE_ORG_USER,
                ctx2.principal.org
            )),
        };
        let (stored, _) = tx.update("Communication", &found.id, r, Some(found.version), &wc)?;
        let patient = tsunagi_fhir::index::compartment_patient(
            "Communication",
            stored.resource.as_ref().unwrap_or(&Value::Null),
        );
        tx.audit_append(&[tsunagi_eligibility::reception::audit_json(
            &ctx2,
            "notification-acknowledged",
            patient,
            vec![format!(
                "Communication/{}/_history/{}",
                stored.id, stored.version
            )],
            Outcome::Success,
            200,
            None,
        )])?;
        tx.commit()?;
        Ok(stored.resource.unwrap_or(Value::Null))
    })
    .await?;
    Ok(fhir_json(StatusCode::OK, &updated))
}
