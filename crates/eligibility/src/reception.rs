//! Reception at the face-recognition card reader (顔認証付きカードリーダー):
//! `POST /fhir/$reception-nonce` hands the reader a one-time nonce; the card signs
//! it; `POST /fhir/$reception` checks certificate and signature, records the
//! patient's consent choices as a grant for the facility and returns current
//! eligibility.
//!
//! Nonces live in memory, bound to the facility that asked, used once, and
//! expire after [`crate::Config::nonce_ttl_secs`]. This holds on one node only: a
//! deployment with several server processes needs a shared nonce store (or
//! sticky routing of the reader to one node).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Response;
use axum::routing::post;
use axum::{Extension, Router};
use base64::Engine as _;
use chrono::{DateTime, Duration, Utc};
use serde_json::{Value, json};
use tsunagi_fhir::{FhirError, FhirResult};
use tsunagi_policy::audit::{AuditRecord, Outcome};
use tsunagi_policy::identity::Role;
use tsunagi_server::http::extract::{Caller, FhirJson};
use tsunagi_server::http::{ApiResult, fhir_json};
use tsunagi_server::{AppState, Ctx, OperationDecl};
use tsunagi_store::{Store, WriteContext};

use crate::Shared;
use crate::cards::{self, SERVICE_ORG};
use crate::consent::{Category, Grant, GrantKind};

pub use tsunagi_server::engine::blocking;

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/fhir/$reception-nonce", post(nonce))
        .route("/fhir/$reception", post(reception))
        .route("/fhir/$discharge", post(discharge))
}

pub fn operations() -> Vec<OperationDecl> {
    vec![
        OperationDecl {
            name: "reception-nonce",
            resource_type: None,
            documentation: "A one-time nonce for the card to sign at the reader (bound to the caller's facility)",
        },
        OperationDecl {
            name: "reception",
            resource_type: None,
            documentation: "Card reception: certificate + signature over the nonce, identity check, consent choices (A, B, C) -> eligibility and a consent grant",
        },
        OperationDecl {
            name: "discharge",
            resource_type: None,
            documentation: "Ends the caller facility's inpatient consent grants for a patient (discharge)",
        },
    ]
}

/// One-time reception nonces, at most `capacity` outstanding. Expired ones are
/// swept when the map has doubled since the last sweep, so issuing stays O(1)
/// amortised however many are outstanding.
pub struct Nonces {
    map: Mutex<NonceMap>,
    capacity: usize,
}

#[derive(Default)]
struct NonceMap {
    entries: HashMap<String, NonceEntry>,
    sweep_at: usize,
}

/// Outstanding nonces a pool holds before refusing new ones (429). Facilities and
/// the unauthenticated card login draw from separate pools, so a flood of login
/// attempts cannot starve reception.
pub const DEFAULT_NONCE_CAPACITY: usize = 100_000;
const FIRST_SWEEP: usize = 1_024;

impl Default for Nonces {
    fn default() -> Self {
        Nonces::with_capacity(DEFAULT_NONCE_CAPACITY)
    }
}

struct NonceEntry {
    org: String,
    expires: DateTime<Utc>,
    used: bool,
}

/// Why a nonce was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NonceError {
    Unknown,
    Replayed,
    Stale,
    OtherFacility,
}

impl NonceError {
    pub fn message(self) -> &'static str {
        match self {
            NonceError::Unknown => {
                "the nonce was not issued by this server (ask $reception-nonce for one)"
            }
            NonceError::Replayed => {
                "the nonce has already been used; each reception needs a fresh nonce"
            }
            NonceError::Stale => "the nonce has expired; ask $reception-nonce for a fresh one",
            NonceError::OtherFacility => "the nonce was issued to another facility",
        }
    }
}

impl Nonces {
    pub fn with_capacity(capacity: usize) -> Self {
        Nonces {
            map: Mutex::new(NonceMap::default()),
            capacity,
        }
    }

    /// A fresh nonce for `org`, valid for `ttl` from `now`; a 429 when the pool
    /// already holds `capacity` unexpired nonces.
    pub fn issue(&self, org: &str, now: DateTime<Utc>, ttl: Duration) -> FhirResult<String> {
        let mut bytes = [0u8; 24];
        rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut bytes);
        let n = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes);
        let mut m = self.map.lock().unwrap_or_else(|e| e.into_inner());
        if m.entries.len() >= m.sweep_at.max(FIRST_SWEEP) || m.entries.len() >= self.capacity {
            // forget what has been stale for a whole TTL (until then a late
            // presentation is told "expired" rather than "unknown")
            m.entries.retain(|_, e| e.expires + ttl > now);
            m.sweep_at = (m.entries.len() * 2).max(FIRST_SWEEP);
        }
        if m.entries.len() >= self.capacity {
            return Err(FhirError::new(
                429,
                "throttled",
                None,
                format!(
                    "too many outstanding nonces ({}); retry in {} seconds",
                    self.capacity,
                    ttl.num_seconds()
                ),
            ));
        }
        m.entries.insert(
            n.clone(),
            NonceEntry {
                org: org.to_string(),
                expires: now + ttl,
                used: false,
            },
        );
        Ok(n)
    }

    /// Uses a nonce up: it must exist, belong to `org`, be unused and unexpired.
    pub fn take(&self, nonce: &str, org: &str, now: DateTime<Utc>) -> Result<(), NonceError> {
        let mut m = self.map.lock().unwrap_or_else(|e| e.into_inner());
        let e = m.entries.get_mut(nonce).ok_or(NonceError::Unknown)?;
        if e.used {
            return Err(NonceError::Replayed);
        }
        if e.org != org {
            return Err(NonceError::OtherFacility);
        }
        if now >= e.expires {
            e.used = true;
            return Err(NonceError::Stale);
        }
        e.used = true;
        Ok(())
    }
}

// ------------------------------------------------------------------ helpers shared by the service's handlers

/// A FHIR `Parameters` body.
pub struct Params(Vec<Value>);

impl Params {
    pub fn parse(body: &Value) -> FhirResult<Params> {
        if body.get("resourceType").and_then(Value::as_str) != Some("Parameters") {
            return Err(FhirError::bad_request(
                Some("resourceType"),
                "the body must be a Parameters resource",
            ));
        }
        Ok(Params(
            body.get("parameter")
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default(),
        ))
    }

    fn all_named(&self, name: &str) -> impl Iterator<Item = &Value> {
        self.0
            .iter()
            .filter(move |p| p.get("name").and_then(Value::as_str) == Some(name))
    }

    /// The string of the first `value[x]` holding one (String, Code, Base64Binary, Date, Id, Uri...).
    pub fn string(&self, name: &str) -> Option<String> {
        self.strings(name).into_iter().next()
    }

    pub fn strings(&self, name: &str) -> Vec<String> {
        self.all_named(name)
            .filter_map(|p| {
                p.as_object()?.iter().find_map(|(k, v)| {
                    (k.starts_with("value") && v.is_string())
                        .then(|| v.as_str().unwrap_or_default().trim().to_string())
                })
            })
            .filter(|s| !s.is_empty())
            .collect()
    }

    pub fn bool(&self, name: &str) -> Option<bool> {
        self.all_named(name)
            .find_map(|p| p.get("valueBoolean").and_then(Value::as_bool))
    }

    pub fn value(&self, name: &str) -> Option<&Value> {
        self.all_named(name).next()
    }

    pub fn part(&self, name: &str) -> Option<Params> {
        self.all_named(name).next().map(|p| {
            Params(
                p.get("part")
                    .and_then(Value::as_array)
                    .cloned()
                    .unwrap_or_default(),
            )
        })
    }

    /// A required string parameter, or a 400 naming it.
    pub fn required(&self, name: &str) -> FhirResult<String> {
        self.string(name).ok_or_else(|| {
            FhirError::bad_request(
                Some("Parameters.parameter"),
                format!("parameter '{name}' is required"),
            )
        })
    }
}

/// An audit record of a service action, as stored JSON.
pub fn audit_json(
    ctx: &Ctx,
    action: &str,
    patient: Option<String>,
    resources: Vec<String>,
    outcome: Outcome,
    status: u16,
    reason: Option<String>,
) -> Value {
    let mut r = AuditRecord::new(&ctx.principal, ctx.purpose, action, ctx.request_id.clone())
        .with_patient(patient)
        .with_resources(resources);
    r.outcome = outcome;
    r.status = status;
    r.reason = reason;
    r.to_json()
}

/// Records a service action in the audit trail (through the group-commit sink).
#[allow(clippy::too_many_arguments)]
pub async fn audit_event(
    state: &AppState,
    ctx: &Ctx,
    action: &str,
    patient: Option<String>,
    resources: Vec<String>,
    outcome: Outcome,
    status: u16,
    reason: Option<String>,
) -> FhirResult<()> {
    let mut r = AuditRecord::new(&ctx.principal, ctx.purpose, action, ctx.request_id.clone())
        .with_patient(patient)
        .with_resources(resources);
    r.outcome = outcome;
    r.status = status;
    r.reason = reason;
    state.engine.audit.record(r).await
}

/// Audits a refused action (outcome denied for 401/403, error otherwise) and
/// returns the error to answer with.
pub async fn refuse(
    state: &AppState,
    ctx: &Ctx,
    action: &str,
    patient: Option<String>,
    e: FhirError,
) -> FhirError {
    let outcome = if matches!(e.status, 401 | 403) {
        Outcome::Denied
    } else {
        Outcome::Error
    };
    let reason = e
        .issues
        .first()
        .map(|i| i.message.clone())
        .unwrap_or_else(|| e.to_string());
    match audit_event(
        state,
        ctx,
        action,
        patient,
        vec![],
        outcome,
        e.status,
        Some(reason),
    )
    .await
    {
        Ok(()) => e,
        Err(audit_failed) => audit_failed,
    }
}

/// Writes grants (new ones created, superseded ones set `inactive`) with their
/// audit records in one transaction.
pub fn write_grants(
    store: &dyn Store,
    ctx: &Ctx,
    action: &str,
    create: &[Grant],
    deactivate: &[Grant],
) -> FhirResult<()> {
    let wctx = WriteContext {
        org: Some(SERVICE_ORG.into()),
        user: ctx.principal.user.clone(),
    };
    let mut tx = store.begin()?;
    let mut recs = Vec::new();
    for g in deactivate {
        let (s, _) = tx.update("Consent", &g.id, g.to_resource("inactive"), None, &wctx)?;
        recs.push(audit_json(
            ctx,
            &format!("{action}-supersede"),
            Some(g.patient.clone()),
            vec![format!("Consent/{}/_history/{}", s.id, s.version)],
            Outcome::Success,
            200,
            None,
        ));
    }
    for g in create {
        let s = tx.create("Consent", &g.id, g.to_resource("active"), &wctx)?;
        recs.push(audit_json(
            ctx,
            action,
            Some(g.patient.clone()),
            vec![format!("Consent/{}/_history/{}", s.id, s.version)],
            Outcome::Success,
            201,
            None,
        ));
    }
    tx.audit_append(&recs)?;
    tx.commit()
}

/// The current Coverage of a person on the service clock's Japan date, read
/// through the engine under the caller's context (so the policy decides and the
/// read is audited), then filtered with the coverage module's rule
/// ([`crate::coverage::coverage_state`]: active, period containing the date).
pub async fn current_coverage(
    state: &AppState,
    ctx: &Ctx,
    person: &str,
    now: DateTime<Utc>,
) -> FhirResult<Vec<Value>> {
    let q = crate::coverage::person_coverage_query(person)?;
    let today = cards::jst_date(now);
    let found = state.engine.search(ctx, q).await?;
    Ok(crate::coverage::keep_current(found.matches, today))
}

/// A `$reception` Parameters body (used by `tsunagi card sign --parameters`).
pub fn reception_parameters(
    certificate: &str,
    signature: &str,
    nonce: &str,
    identity_check: &str,
    consent: [bool; 3],
    setting: &str,
) -> Value {
    json!({"resourceType": "Parameters", "parameter": [
        {"name": "certificate", "valueBase64Binary": certificate},
        {"name": "signature", "valueBase64Binary": signature},
        {"name": "nonce", "valueString": nonce},
        {"name": "identityCheck", "valueCode": identity_check},
        {"name": "consent", "part": [
            {"name": "A", "valueBoolean": consent[0]},
            {"name": "B", "valueBoolean": consent[1]},
            {"name": "C", "valueBoolean": consent[2]}
        ]},
        {"name": "setting", "valueCode": setting}
    ]})
}

// ------------------------------------------------------------------ handlers

fn reception_staff(ctx: &Ctx) -> FhirResult<()> {
    let p = &ctx.principal;
    if !p.org_kind.is_care_facility() || !(p.role.is_clinical() || p.role == Role::Clerk) {
        return Err(FhirError::forbidden(format!(
            "card reception is done by staff of a care facility, not by role {} at a {}",
            p.role, p.org_kind
        )));
    }
    Ok(())
}

async fn nonce(
    State(state): State<AppState>,
    Extension(shared): Extension<Arc<Shared>>,
    Caller(ctx): Caller,
) -> ApiResult<Response> {
    if let Err(e) = reception_staff(&ctx) {
        return Err(refuse(&state, &ctx, "reception-nonce", None, e)
            .await
            .into());
    }
    let ttl = Duration::seconds(shared.config.nonce_ttl_secs);
    let now = shared.now();
    let n = shared.reception.issue(&ctx.principal.org, now, ttl)?;
    Ok(fhir_json(
        StatusCode::OK,
        &json!({"resourceType": "Parameters", "parameter": [
            {"name": "nonce", "valueString": n},
            {"name": "expires", "valueInstant": (now + ttl).to_rfc3339_opts(chrono::SecondsFormat::Secs, true)}
        ]}),
    ))
}

async fn reception(
    State(state): State<AppState>,
    Extension(shared): Extension<Arc<Shared>>,
    Caller(ctx): Caller,
    FhirJson(body): FhirJson,
) -> ApiResult<Response> {
    match do_reception(&state, &shared, &ctx, body).await {
        Ok(r) => Ok(r),
        Err((patient, e)) => Err(refuse(&state, &ctx, "reception", patient, e).await.into()),
    }
}

type Refusal = (Option<String>, FhirError);

async fn do_reception(
    state: &AppState,
    shared: &Arc<Shared>,
    ctx: &Ctx,
    body: Value,
) -> Result<Response, Refusal> {
    let none = |e: FhirError| (None, e);
    reception_staff(ctx).map_err(none)?;
    let p = Params::parse(&body).map_err(none)?;
    let certificate = p.required("certificate").map_err(none)?;
    let signature = p.required("signature").map_err(none)?;
    let nonce = p.required("nonce").map_err(none)?;
    let check = p.required("identityCheck").map_err(none)?;
    match check.as_str() {
        "face" | "pin" | "visual" => {}
        "failed" => {
            return Err(none(FhirError::new(
                403,
                "security",
                None,
                "the reader's identity check failed; eligibility and consent are not given",
            )));
        }
        other => {
            return Err(none(FhirError::bad_request(
                Some("Parameters.parameter"),
                format!("identityCheck must be face, pin, visual or failed, not '{other}'"),
            )));
        }
    }
    let setting = p.string("setting").unwrap_or_else(|| "outpatient".into());
    if setting != "outpatient" && setting != "inpatient" {
        return Err(none(FhirError::bad_request(
            Some("Parameters.parameter"),
            format!("setting must be outpatient or inpatient, not '{setting}'"),
        )));
    }
    let consent = p.part("consent").unwrap_or(Params(Vec::new()));
    let categories: Vec<Category> = Category::ALL
        .into_iter()
        .filter(|c| consent.bool(c.as_str()) == Some(true))
        .collect();
    let now = shared.now();
    shared
        .reception
        .take(&nonce, &ctx.principal.org, now)
        .map_err(|e| none(FhirError::new(403, "security", None, e.message())))?;
    let store = state.engine.store.clone();
    let sh = shared.clone();
    let n2 = nonce.clone();
    let cert = blocking(move || {
        cards::verify_presented(&*store, &sh.cards, &certificate, &signature, &n2, now)
    })
    .await
    .map_err(none)?;
    let person = cert.person.clone();
    let some = |e: FhirError| (Some(person.clone()), e);
    let lifetime = if setting == "inpatient" {
        shared.config.inpatient_grant_max_secs
    } else {
        shared.config.outpatient_grant_secs
    };
    let grant = Grant {
        id: uuid::Uuid::new_v4().to_string(),
        patient: person.clone(),
        org: ctx.principal.org.clone(),
        categories,
        start: now,
        end: now + Duration::seconds(lifetime),
        kind: GrantKind::Reception,
        setting,
    };
    // the newest choice at this facility replaces earlier live ones
    let superseded = shared
        .consent
        .live(&grant.org, &person, GrantKind::Reception, now);
    let (store, c2, g2, s2) = (
        state.engine.store.clone(),
        ctx.clone(),
        grant.clone(),
        superseded.clone(),
    );
    blocking(move || write_grants(&*store, &c2, "reception", &[g2], &s2))
        .await
        .map_err(some)?;
    for old in &superseded {
        shared.consent.remove(&old.org, &old.patient, &old.id);
    }
    shared.consent.insert(grant.clone());
    let coverage = current_coverage(state, ctx, &person, now)
        .await
        .map_err(some)?;
    let mut out = vec![
        json!({"name": "patient", "valueReference": {"reference": format!("Patient/{person}")}}),
        json!({"name": "certificateKind", "valueCode": cert.kind.as_str()}),
    ];
    // insurance first, then every subsidy (公費, type 8) as its own parameter
    let (subsidies, insurance): (Vec<Value>, Vec<Value>) = coverage
        .into_iter()
        .partition(crate::coverage::is_public_expense);
    // moved in, not given to `json!`, which would deep-copy every Coverage
    let named = tsunagi_fhir::resource_parameter;
    for c in insurance {
        out.push(named("coverage", c));
    }
    let texts: Vec<String> = subsidies.iter().map(Value::to_string).collect();
    shared.subsidies_shown(&texts.iter().map(String::as_str).collect::<Vec<_>>());
    for c in subsidies {
        out.push(named("subsidy", c));
    }
    out.push(named("grant", grant.to_resource("active")));
    out.push(json!({"name": "validUntil", "valueInstant": grant.end.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)}));
    Ok(fhir_json(StatusCode::OK, &tsunagi_fhir::parameters(out)))
}

/// `POST /fhir/$discharge` {patient}: the facility records a discharge; its live
/// inpatient grants for the patient end now (audited as `discharge`).
async fn discharge(
    State(state): State<AppState>,
    Extension(shared): Extension<Arc<Shared>>,
    Caller(ctx): Caller,
    FhirJson(body): FhirJson,
) -> ApiResult<Response> {
    let run = async {
        reception_staff(&ctx).map_err(|e| (None, e))?;
        let p = Params::parse(&body).map_err(|e| (None, e))?;
        let patient = p.required("patient").map_err(|e| (None, e))?;
        let patient = patient
            .strip_prefix("Patient/")
            .unwrap_or(&patient)
            .to_string();
        let now = shared.now();
        let live: Vec<Grant> = shared
            .consent
            .live(&ctx.principal.org, &patient, GrantKind::Reception, now)
            .into_iter()
            .filter(|g| g.setting == "inpatient")
            .collect();
        if live.is_empty() {
            return Err((
                Some(patient.clone()),
                FhirError::not_found(format!(
                    "no live inpatient consent of Patient/{patient} at this facility"
                )),
            ));
        }
        let ended: Vec<Grant> = live
            .iter()
            .cloned()
            .map(|mut g| {
                g.end = now;
                g
            })
            .collect();
        let (store, c2, e2) = (state.engine.store.clone(), ctx.clone(), ended.clone());
        blocking(move || write_grants(&*store, &c2, "discharge", &[], &e2))
            .await
            .map_err(|e| (Some(patient.clone()), e))?;
        for g in &live {
            shared.consent.remove(&g.org, &g.patient, &g.id);
        }
        Ok(fhir_json(
            StatusCode::OK,
            &tsunagi_fhir::parameters(
                ended
                    .iter()
                    .map(|g| tsunagi_fhir::resource_parameter("ended", g.to_resource("inactive")))
                    .collect(),
            ),
        ))
    };
    match run.await {
        Ok(r) => Ok(r),
        Err((patient, e)) => Err(refuse(&state, &ctx, "discharge", patient, e).await.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nonces_are_one_time_facility_bound_and_expire() {
        let n = Nonces::default();
        let t0: DateTime<Utc> = "2026-11-21T00:00:00Z".parse().unwrap();
        let ttl = Duration::seconds(300);
        let a = n.issue("f1", t0, ttl).unwrap();
        assert_eq!(n.take(&a, "f2", t0), Err(NonceError::OtherFacility));
        assert_eq!(n.take(&a, "f1", t0 + Duration::seconds(299)), Ok(()));
        assert_eq!(n.take(&a, "f1", t0), Err(NonceError::Replayed));
        let b = n.issue("f1", t0, ttl).unwrap();
        assert_eq!(n.take(&b, "f1", t0 + ttl), Err(NonceError::Stale));
        assert_eq!(n.take("nope", "f1", t0), Err(NonceError::Unknown));
    }

    #[test]
    fn a_full_pool_refuses_until_nonces_age_out() {
        let n = Nonces::with_capacity(3_000);
        let t0: DateTime<Utc> = "2026-11-21T00:00:00Z".parse().unwrap();
        let ttl = Duration::seconds(300);
        let first = n.issue("patient", t0, ttl).unwrap();
        for _ in 1..3_000 {
            n.issue("patient", t0, ttl).unwrap();
        }
        let e = n.issue("patient", t0, ttl).unwrap_err();
        assert_eq!(e.status, 429);
        assert!(e.to_string().contains("too many outstanding nonces"), "{e}");
        // the earlier ones still work while the pool is full
        assert_eq!(n.take(&first, "patient", t0), Ok(()));
        // stale for a whole TTL: swept, room again
        let later = t0 + ttl + ttl;
        let c = n.issue("patient", later, ttl).unwrap();
        assert_eq!(n.take(&c, "patient", later), Ok(()));
    }
}
