//! The patient's own API (マイナポータル-like), authenticated by the card.
//!
//! - `POST /auth/card-nonce` → a one-time nonce (no token needed);
//! - `POST /auth/card` `{nonce, certificate, signature}` → a patient bearer token
//!   (role patient, org `patient`, patient = the certificate's person);
//! - `GET /fhir/$my-eligibility` → the patient's Coverage (searchset);
//! - `GET /fhir/$my-consents` → their consent grants (searchset of Consent);
//! - `POST /fhir/$my-consents/{id}/$revoke` → ends a grant now;
//! - `GET /fhir/$my-access-history` → who accessed their data: facility (code,
//!   name), time, action, resource types and categories, purpose (treatment
//!   under consent, emergency, disaster), outcome. The patient's own self-service
//!   requests (role patient) are left out: they are the patient's, not others'.
//!
//! Every endpoint is audited; data reads go through the engine (the core policy
//! lets a patient read their own compartment).

use std::collections::HashMap;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::Response;
use axum::routing::{get, post};
use axum::{Extension, Router};
use chrono::Duration;
use serde_json::{Value, json};
use tsunagi_fhir::search::{Criterion, SearchQuery, TokenMatch};
use tsunagi_fhir::{FhirError, FhirResult, query};
use tsunagi_policy::audit::{AuditRecord, Outcome};
use tsunagi_policy::identity::{OrgKind, PATIENT_ORG, Principal, Role};
use tsunagi_server::http::extract::Caller;
use tsunagi_server::http::{ApiResult, fhir_json};
use tsunagi_server::{AppState, Ctx, OperationDecl};
use tsunagi_store::{AuditFilter, Scope, Store};

use crate::Shared;
use crate::cards;
use crate::consent::{Category, Grant};
use crate::reception::{audit_event, blocking, current_coverage, refuse};

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/auth/card-nonce", post(card_nonce))
        .route("/auth/card", post(card_login))
        .route("/fhir/$my-eligibility", get(my_eligibility))
        .route("/fhir/$my-consents", get(my_consents))
        .route("/fhir/$my-consents/{id}/$revoke", post(revoke))
        .route("/fhir/$my-access-history", get(access_history))
}

pub fn operations() -> Vec<OperationDecl> {
    vec![
        OperationDecl {
            name: "my-eligibility",
            resource_type: None,
            documentation: "The patient's own current coverage (patient token)",
        },
        OperationDecl {
            name: "my-consents",
            resource_type: None,
            documentation: "The patient's consent grants; POST $my-consents/{id}/$revoke ends one",
        },
        OperationDecl {
            name: "my-access-history",
            resource_type: None,
            documentation: "Who accessed the patient's data: facility, time, categories, purpose (consent, emergency, disaster)",
        },
    ]
}

fn me(ctx: &Ctx) -> FhirResult<String> {
    match (&ctx.principal.role, &ctx.principal.patient) {
        (Role::Patient, Some(p)) => Ok(p.clone()),
        _ => Err(FhirError::forbidden(
            "this endpoint is the patient's own: sign in with the card (POST /auth/card)",
        )),
    }
}

async fn card_nonce(
    State(_state): State<AppState>,
    Extension(shared): Extension<Arc<Shared>>,
) -> ApiResult<Response> {
    let ttl = Duration::seconds(shared.config.nonce_ttl_secs);
    let now = shared.now();
    // unauthenticated: its own bounded pool, so a flood cannot starve reception
    let n = shared.card_login.issue(PATIENT_ORG, now, ttl)?;
    Ok(fhir_json(
        StatusCode::OK,
        &json!({"nonce": n, "expires": (now + ttl).to_rfc3339_opts(chrono::SecondsFormat::Secs, true)}),
    ))
}

async fn card_login(
    State(state): State<AppState>,
    Extension(shared): Extension<Arc<Shared>>,
    body: Bytes,
) -> ApiResult<Response> {
    let request_id = uuid::Uuid::new_v4().to_string();
    let result: FhirResult<(String, String)> = async {
        let v: Value = serde_json::from_slice(&body)
            .map_err(|e| FhirError::bad_request(None, format!("the body must be JSON: {e}")))?;
        let field = |k: &str| {
            v.get(k)
                .and_then(Value::as_str)
                .map(str::to_string)
                .ok_or_else(|| FhirError::bad_request(Some(k), format!("'{k}' is required")))
        };
        let (nonce, cert, sig) = (field("nonce")?, field("certificate")?, field("signature")?);
        let now = shared.now();
        shared
            .card_login
            .take(&nonce, PATIENT_ORG, now)
            .map_err(|e| FhirError::unauthorized(e.message()))?;
        let store = state.engine.store.clone();
        let sh = shared.clone();
        let cert =
            blocking(move || cards::verify_presented(&*store, &sh.cards, &cert, &sig, &nonce, now))
                .await
                .map_err(|e| {
                    FhirError::unauthorized(
                        e.issues
                            .first()
                            .map(|i| i.message.clone())
                            .unwrap_or_default(),
                    )
                })?;
        let p = Principal::new(
            PATIENT_ORG,
            OrgKind::Patient,
            vec![],
            Role::Patient,
            Some(format!("card:{}", cert.serial)),
            Some(cert.person.clone()),
            false,
        )
        .map_err(FhirError::internal)?;
        let token = state
            .keys
            .issue(&p, Duration::seconds(shared.config.self_service_token_secs))?;
        Ok((cert.person, token))
    }
    .await;
    match result {
        Ok((person, token)) => {
            let mut rec = AuditRecord::anonymous("card-login", request_id)
                .with_patient(Some(person.clone()))
                .success(200);
            rec.org = Some(PATIENT_ORG.into());
            rec.role = Some("patient".into());
            state.engine.audit.record(rec).await?;
            Ok(fhir_json(
                StatusCode::OK,
                &json!({"access_token": token, "token_type": "bearer", "expires_in": shared.config.self_service_token_secs, "patient": person}),
            ))
        }
        Err(e) => {
            let rec = AuditRecord::anonymous("card-login", request_id).failed(&e);
            state.engine.audit.record(rec).await?;
            Err(e.into())
        }
    }
}

async fn guarded<F, Fut>(state: &AppState, ctx: &Ctx, action: &str, f: F) -> ApiResult<Response>
where
    F: FnOnce(String) -> Fut,
    Fut: std::future::Future<Output = FhirResult<Response>>,
{
    let patient = match me(ctx) {
        Ok(p) => p,
        Err(e) => return Err(refuse(state, ctx, action, None, e).await.into()),
    };
    match f(patient.clone()).await {
        Ok(r) => Ok(r),
        Err(e) if e.status == 403 => Err(e.into()), // the engine audited it
        Err(e) => Err(refuse(state, ctx, action, Some(patient), e).await.into()),
    }
}

fn searchset(resources: Vec<Value>) -> Value {
    tsunagi_fhir::bundle::searchset_of(resources, Some("match"))
}

async fn my_eligibility(
    State(state): State<AppState>,
    Extension(shared): Extension<Arc<Shared>>,
    Caller(ctx): Caller,
) -> ApiResult<Response> {
    let (state, ctx) = (&state, &ctx);
    guarded(state, ctx, "my-eligibility", |me| async move {
        let cov = current_coverage(state, ctx, &me, shared.now()).await?;
        Ok(fhir_json(StatusCode::OK, &searchset(cov)))
    })
    .await
}

async fn my_consents(State(state): State<AppState>, Caller(ctx): Caller) -> ApiResult<Response> {
    let (state, ctx) = (&state, &ctx);
    guarded(state, ctx, "my-consents", |me| async move {
        let q = query::parse(
            "Consent",
            &[
                ("patient".into(), format!("Patient/{me}")),
                ("_sort".into(), "-date".into()),
                ("_count".into(), "1000".into()),
            ],
        )?;
        let found = state.engine.search(ctx, q).await?;
        let rs = found
            .matches
            .into_iter()
            .filter_map(|s| s.resource)
            .collect();
        Ok(fhir_json(StatusCode::OK, &searchset(rs)))
    })
    .await
}

async fn revoke(
    State(state): State<AppState>,
    Extension(shared): Extension<Arc<Shared>>,
    Caller(ctx): Caller,
    Path(id): Path<String>,
) -> ApiResult<Response> {
    let (state, ctx) = (&state, &ctx);
    guarded(state, ctx, "consent-revoke", |me| async move {
        let found = state.engine.read(ctx, "Consent", &id).await?;
        let mut g = found
            .resource
            .as_ref()
            .and_then(Grant::from_resource)
            .ok_or_else(|| FhirError::not_found(format!("Consent/{id} is not a consent grant")))?;
        if g.patient != me {
            return Err(FhirError::forbidden(
                "patients may revoke only their own consents",
            ));
        }
        let status = found
            .resource
            .as_ref()
            .and_then(|r| r.get("status"))
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string();
        let now = shared.now();
        if status != "active" || g.end <= now {
            return Err(FhirError::conflict(format!(
                "Consent/{id} is no longer in force"
            )));
        }
        shared.consent.remove(&g.org, &g.patient, &g.id);
        g.end = now;
        let (store, c2, g2) = (state.engine.store.clone(), ctx.clone(), g.clone());
        blocking(move || {
            let wctx = tsunagi_store::WriteContext {
                org: Some(cards::SERVICE_ORG.into()),
                user: c2.principal.user.clone(),
            };
            let mut tx = store.begin()?;
            let (s, _) = tx.update("Consent", &g2.id, g2.to_resource("inactive"), None, &wctx)?;
            tx.audit_append(&[crate::reception::audit_json(
                &c2,
                "consent-revoke",
                Some(g2.patient.clone()),
                vec![format!("Consent/{}/_history/{}", s.id, s.version)],
                Outcome::Success,
                200,
                None,
            )])?;
            tx.commit()
        })
        .await?;
        Ok(fhir_json(StatusCode::OK, &g.to_resource("inactive")))
    })
    .await
}

/// Name of the organisation registered under `code`.
fn org_name(store: &dyn Store, code: &str) -> Option<String> {
    let q = SearchQuery::new("Organization").with(
        "identifier",
        Criterion::Token {
            values: vec![TokenMatch {
                system: None,
                code: Some(code.to_string()),
            }],
            negate: false,
        },
    );
    let found = store.search(&q, &Scope::Unrestricted).ok()?;
    found
        .matches
        .first()?
        .resource
        .as_ref()?
        .get("name")?
        .as_str()
        .map(str::to_string)
}

/// Resource type of a reference `Type/id[/_history/n]`.
fn type_of(r: &str) -> &str {
    r.split('/').next().unwrap_or_default()
}

async fn access_history(State(state): State<AppState>, Caller(ctx): Caller) -> ApiResult<Response> {
    let (state, ctx) = (&state, &ctx);
    guarded(state, ctx, "access-history", |me| async move {
        let store = state.engine.store.clone();
        let m2 = me.clone();
        let items = blocking(move || {
            let entries = store.audit_query(&AuditFilter { patient: Some(m2), limit: 1000, ..Default::default() })?;
            let mut names: HashMap<String, Option<String>> = HashMap::new();
            let mut items = Vec::new();
            for e in entries {
                let r = &e.record;
                let s = |k: &str| r.get(k).and_then(Value::as_str).map(str::to_string);
                if s("role").as_deref() == Some("patient") {
                    continue;
                }
                let org = s("org").unwrap_or_default();
                let name = names.entry(org.clone()).or_insert_with(|| org_name(&*store, &org)).clone();
                let mut types: Vec<String> = r.get("resources").and_then(Value::as_array).into_iter().flatten()
                    .filter_map(Value::as_str).map(|x| type_of(x).to_string()).collect();
                types.sort();
                types.dedup();
                let mut cats: Vec<&str> = types.iter().filter_map(|t| Category::of_type(t)).map(|c| c.as_str()).collect();
                if types.iter().any(|t| t == "Patient" || t == "Coverage") {
                    cats.push("eligibility");
                }
                cats.sort();
                cats.dedup();
                let purpose = s("purpose");
                items.push(json!({
                    "time": s("time").unwrap_or_else(|| tsunagi_fhir::datetime::format_instant(&e.recorded)),
                    "org": org, "orgName": name, "user": s("user"), "role": s("role"),
                    "action": s("action"), "resourceTypes": types, "categories": cats,
                    "purpose": purpose, "emergency": purpose.as_deref() == Some("emergency"),
                    "outcome": s("outcome"), "reason": s("reason"),
                }));
            }
            Ok(items)
        })
        .await?;
        audit_event(state, ctx, "access-history", Some(me.clone()), vec![], Outcome::Success, 200, None).await?;
        Ok(fhir_json(StatusCode::OK, &json!({"patient": me, "total": items.len(), "entries": items})))
    })
    .await
}
