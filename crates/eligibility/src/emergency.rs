//! Emergency access (救急時医療情報閲覧): a doctor at a hospital reads an
//! unconscious patient's data without the card, to protect life or body.
//!
//! `POST /fhir/$emergency-access` opens a read-only, time-boxed [`Session`] for
//! (hospital, user, patient) when: the organisation is a hospital (never a clinic,
//! dental clinic or pharmacy; the emergency-designated flag is not required, as
//! the national rule names hospitals); the role has emergency permission
//! ([`crate::Config::emergency_roles`], default doctor); the token carries a
//! second factor (`amr: mfa`, TOTP at login); the purpose is `emergency`; the
//! reason is `protect-life-or-body`; and the patient is found exactly by the 4
//! items (name, birth date, sex, and address or insurer name) or by insurance
//! numbers. The [`EmergencyRule`] then permits reads (never writes) under purpose
//! emergency until the session ends. Every read is audited with purpose
//! `emergency`, and the patient's access history flags it.
//!
//! Sessions are kept in memory only: a restart closes them (fails closed).

use std::sync::{Arc, RwLock};

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Response;
use axum::routing::post;
use axum::{Extension, Router};
use chrono::{DateTime, Duration, Utc};
use serde_json::{Value, json};
use tsunagi_fhir::{FhirError, FhirResult, query};
use tsunagi_policy::audit::Outcome;
use tsunagi_policy::identity::{OrgKind, Principal, Purpose};
use tsunagi_policy::policy::{AccessRequest, ScopeGrant, Verdict};
use tsunagi_server::http::extract::{Caller, FhirJson};
use tsunagi_server::http::{ApiResult, fhir_json};
use tsunagi_server::{AppState, Ctx, OperationDecl};
use tsunagi_store::{LabelFilter, Scope, ScopeRule, Store};

use crate::Shared;
use crate::consent::{ADDRESSEE_ONLY, CATEGORY_SYSTEM, Category, readable_types};
use crate::reception::{Params, audit_event, blocking, refuse};

pub use crate::coverage::INSURANCE_MEMBER_SYSTEM;
/// The only accepted reason.
pub const REASON_LIFE_OR_BODY: &str = "protect-life-or-body";

pub fn routes() -> Router<AppState> {
    Router::new().route("/fhir/$emergency-access", post(open_session))
}

pub fn operations() -> Vec<OperationDecl> {
    vec![OperationDecl {
        name: "emergency-access",
        resource_type: None,
        documentation: "救急時医療情報閲覧: a hospital doctor with a second factor opens a read-only, time-boxed session for a patient found by the 4 items or insurance numbers",
    }]
}

/// One open emergency session.
#[derive(Debug, Clone, PartialEq)]
pub struct Session {
    pub id: String,
    pub patient: String,
    pub org: String,
    pub user: String,
    pub until: DateTime<Utc>,
}

/// Open emergency access sessions.
#[derive(Default)]
pub struct Sessions {
    list: RwLock<Vec<Session>>,
}

impl Sessions {
    pub fn open(&self, s: Session, now: DateTime<Utc>) {
        let mut l = self.list.write().unwrap_or_else(|e| e.into_inner());
        l.retain(|x| x.until > now);
        l.push(s);
    }

    fn open_for(&self, p: &Principal, now: DateTime<Utc>) -> Vec<Session> {
        let Some(user) = p.user.as_deref() else {
            return Vec::new();
        };
        self.list
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter(|s| s.org == p.org && s.user == user && now < s.until)
            .cloned()
            .collect()
    }
}

/// Whether a principal may act in emergency mode at all (before any session).
fn eligible(shared: &Shared, p: &Principal) -> Result<(), String> {
    if p.org_kind != OrgKind::Hospital {
        return Err(format!(
            "emergency access is for hospitals only, not a {}",
            p.org_kind
        ));
    }
    if !shared.config.emergency_roles.contains(&p.role) {
        return Err(format!(
            "role {} has no emergency access permission",
            p.role
        ));
    }
    if !p.second_factor {
        return Err("emergency access needs a second authentication factor (TOTP)".into());
    }
    if p.user.is_none() {
        return Err("emergency access is personal: the token must name the user".into());
    }
    Ok(())
}

/// Permits reads (not writes) of the session's patient, purpose emergency, by the
/// user who opened it, while it is open.
pub struct EmergencyRule(pub Arc<Shared>);

impl EmergencyRule {
    fn types(&self, p: &Principal) -> Option<Vec<String>> {
        self.0
            .facility
            .hides_clinical(&p.org)
            .then(|| readable_types(true, &Category::ALL, true))
    }
}

impl tsunagi_policy::AccessRule for EmergencyRule {
    fn name(&self) -> &'static str {
        "emergency"
    }

    fn decide(&self, p: &Principal, req: &AccessRequest) -> Verdict {
        if req.purpose != Purpose::Emergency {
            return Verdict::NotApplicable(None);
        }
        if let Err(why) = eligible(&self.0, p) {
            return Verdict::NotApplicable(Some(why));
        }
        if !req.operation.is_read() {
            return Verdict::NotApplicable(Some("emergency access is read-only".into()));
        }
        let Some(patient) = req.patient.as_deref() else {
            return Verdict::NotApplicable(None);
        };
        let now = self.0.now();
        let Some(s) = self
            .0
            .emergency
            .open_for(p, now)
            .into_iter()
            .find(|s| s.patient == patient)
        else {
            return Verdict::NotApplicable(Some(
                "no open emergency access session for this patient ($emergency-access)".into(),
            ));
        };
        if req.has_label(CATEGORY_SYSTEM, ADDRESSEE_ONLY) {
            return Verdict::NotApplicable(Some(format!(
                "this {} is addressed to another institution",
                req.resource_type
            )));
        }
        if let Some(types) = self.types(p)
            && !types.contains(&req.resource_type)
        {
            return Verdict::NotApplicable(Some(format!(
                "this facility hides clinical history; {} is not shown",
                req.resource_type
            )));
        }
        Verdict::Permit(format!(
            "emergency access session {} open until {}",
            s.id,
            s.until.to_rfc3339()
        ))
    }

    fn search_scope(&self, p: &Principal, rt: &str, purpose: Purpose) -> ScopeGrant {
        if purpose != Purpose::Emergency || eligible(&self.0, p).is_err() {
            return ScopeGrant::None(None);
        }
        let types = self.types(p);
        if types.as_ref().is_some_and(|t| !t.iter().any(|x| x == rt)) {
            return ScopeGrant::None(None);
        }
        let rules: Vec<ScopeRule> = self
            .0
            .emergency
            .open_for(p, self.0.now())
            .into_iter()
            // everything of the patient except documents addressed to someone
            .map(|s| ScopeRule::Labeled {
                rule: Box::new(ScopeRule::Patient {
                    id: s.patient,
                    types: types.clone(),
                }),
                filter: LabelFilter {
                    system: CATEGORY_SYSTEM.to_string(),
                    allow: None,
                    deny: vec![ADDRESSEE_ONLY.to_string()],
                    unlabelled: true,
                },
            })
            .collect();
        if rules.is_empty() {
            ScopeGrant::None(None)
        } else {
            ScopeGrant::Rules(rules)
        }
    }
}

// ------------------------------------------------------------------ patient lookup

/// How a patient is found without the card.
#[derive(Debug, Clone, Default)]
pub struct Lookup {
    pub name: Option<String>,
    pub birth_date: Option<String>,
    pub gender: Option<String>,
    pub address: Option<String>,
    pub insurer_name: Option<String>,
    pub insurer_number: Option<String>,
    pub symbol: Option<String>,
    pub number: Option<String>,
    pub branch: Option<String>,
}

impl Lookup {
    pub fn from_params(p: &Params) -> Lookup {
        Lookup {
            name: p.string("name"),
            birth_date: p.string("birthDate"),
            gender: p.string("gender"),
            address: p.string("address"),
            insurer_name: p.string("insurerName"),
            insurer_number: p.string("insurerNumber"),
            symbol: p.string("symbol"),
            number: p.string("number"),
            branch: p.string("branch"),
        }
    }
}

/// Strips every kind of white space (ASCII and the ideographic space).
fn norm(s: &str) -> String {
    s.chars().filter(|c| !c.is_whitespace()).collect()
}

fn names_of(p: &Value) -> Vec<String> {
    let mut out = Vec::new();
    for n in p
        .get("name")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        if let Some(t) = n.get("text").and_then(Value::as_str) {
            out.push(norm(t));
        }
        let family = n.get("family").and_then(Value::as_str).unwrap_or_default();
        let given: String = n
            .get("given")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .collect();
        out.push(norm(&format!("{family}{given}")));
    }
    out
}

fn addresses_of(p: &Value) -> Vec<String> {
    p.get("address")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .map(|a| {
            let text = a.get("text").and_then(Value::as_str).map(str::to_string);
            norm(&text.unwrap_or_else(|| {
                ["state", "city", "district"]
                    .iter()
                    .filter_map(|k| a.get(*k).and_then(Value::as_str))
                    .chain(
                        a.get("line")
                            .and_then(Value::as_array)
                            .into_iter()
                            .flatten()
                            .filter_map(Value::as_str),
                    )
                    .collect()
            }))
        })
        .collect()
}

fn insurer_names(store: &dyn Store, patient: &str) -> FhirResult<Vec<String>> {
    let q = query::parse(
        "Coverage",
        &[("beneficiary".into(), format!("Patient/{patient}"))],
    )?;
    let mut out = Vec::new();
    for c in store.search(&q, &Scope::Unrestricted)?.matches {
        let Some(r) = c.resource else { continue };
        for payor in r
            .get("payor")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            if let Some(d) = payor.get("display").and_then(Value::as_str) {
                out.push(norm(d));
            }
            if let Some(id) = payor
                .get("reference")
                .and_then(Value::as_str)
                .and_then(|r| r.strip_prefix("Organization/"))
                && let Some(org) = store.read("Organization", id)?.and_then(|s| s.resource)
                && let Some(n) = org.get("name").and_then(Value::as_str)
            {
                out.push(norm(n));
            }
        }
    }
    Ok(out)
}

/// Finds exactly one patient: by insurance numbers (insurer number + number,
/// optional symbol, branch default `00`) or by the 4 items (name, birth date and
/// sex must match; then the address or the insurer's name). A platform lookup,
/// not a data read: the caller learns only the id, and the handler audits it.
pub fn find_patient(store: &dyn Store, l: &Lookup) -> FhirResult<String> {
    if let (Some(ins), Some(num)) = (&l.insurer_number, &l.number) {
        let value = crate::coverage::member_key(
            ins,
            l.symbol.as_deref().unwrap_or_default(),
            num,
            l.branch.as_deref().unwrap_or("00"),
        );
        let q = query::parse(
            "Coverage",
            &[(
                "identifier".into(),
                format!("{INSURANCE_MEMBER_SYSTEM}|{value}"),
            )],
        )?;
        let mut ids: Vec<String> = store
            .search(&q, &Scope::Unrestricted)?
            .matches
            .iter()
            .filter_map(|s| {
                s.resource
                    .as_ref()?
                    .pointer("/beneficiary/reference")?
                    .as_str()?
                    .strip_prefix("Patient/")
                    .map(str::to_string)
            })
            .collect();
        ids.sort();
        ids.dedup();
        return match ids.len() {
            1 => Ok(ids.remove(0)),
            0 => Err(FhirError::not_found(
                "no patient holds coverage with these insurance numbers",
            )),
            n => Err(FhirError::conflict(format!(
                "{n} patients match these insurance numbers"
            ))),
        };
    }
    let (Some(name), Some(birth), Some(gender)) = (&l.name, &l.birth_date, &l.gender) else {
        return Err(FhirError::bad_request(
            Some("Parameters.parameter"),
            "give the 4 items (name, birthDate, gender, and address or insurerName) or insurerNumber and number",
        ));
    };
    if l.address.is_none() && l.insurer_name.is_none() {
        return Err(FhirError::bad_request(
            Some("Parameters.parameter"),
            "the 4th item is missing: give address or insurerName",
        ));
    }
    let q = query::parse(
        "Patient",
        &[
            ("birthdate".into(), birth.clone()),
            ("gender".into(), gender.clone()),
            ("_count".into(), "1000".into()),
        ],
    )?;
    let wanted = norm(name);
    let mut ids = Vec::new();
    for s in store.search(&q, &Scope::Unrestricted)?.matches {
        let Some(r) = s.resource else { continue };
        if !names_of(&r).contains(&wanted) {
            continue;
        }
        let fourth = match (&l.address, &l.insurer_name) {
            (Some(a), _) => {
                let a = norm(a);
                addresses_of(&r).contains(&a)
            }
            (None, Some(i)) => insurer_names(store, &s.id)?.contains(&norm(i)),
            _ => false,
        };
        if fourth {
            ids.push(s.id);
        }
    }
    match ids.len() {
        1 => Ok(ids.remove(0)),
        0 => Err(FhirError::not_found("no patient matches the 4 items")),
        n => Err(FhirError::conflict(format!(
            "{n} patients match the 4 items; add insurance numbers"
        ))),
    }
}

// ------------------------------------------------------------------ handler

async fn open_session(
    State(state): State<AppState>,
    Extension(shared): Extension<Arc<Shared>>,
    Caller(ctx): Caller,
    FhirJson(body): FhirJson,
) -> ApiResult<Response> {
    match open(&state, &shared, &ctx, body).await {
        Ok(r) => Ok(r),
        Err((patient, e)) => Err(refuse(&state, &ctx, "emergency-access", patient, e)
            .await
            .into()),
    }
}

async fn open(
    state: &AppState,
    shared: &Arc<Shared>,
    ctx: &Ctx,
    body: Value,
) -> Result<Response, (Option<String>, FhirError)> {
    let none = |e: FhirError| (None, e);
    if ctx.purpose != Purpose::Emergency {
        return Err(none(FhirError::forbidden(
            "emergency access needs X-Purpose-Of-Use: emergency",
        )));
    }
    eligible(shared, &ctx.principal).map_err(|w| none(FhirError::forbidden(w)))?;
    let p = Params::parse(&body).map_err(none)?;
    let reason = p.required("reason").map_err(none)?;
    if reason != REASON_LIFE_OR_BODY {
        return Err(none(FhirError::forbidden(format!(
            "emergency access is allowed only to protect life or body (reason '{REASON_LIFE_OR_BODY}'), not '{reason}'"
        ))));
    }
    let lookup = Lookup::from_params(&p);
    let store = state.engine.store.clone();
    let patient = blocking(move || find_patient(&*store, &lookup))
        .await
        .map_err(none)?;
    let now = shared.now();
    let s = Session {
        id: uuid::Uuid::new_v4().to_string(),
        patient: patient.clone(),
        org: ctx.principal.org.clone(),
        user: ctx.principal.user.clone().unwrap_or_default(),
        until: now + Duration::seconds(shared.config.emergency_session_secs),
    };
    audit_event(
        state,
        ctx,
        "emergency-access",
        Some(patient.clone()),
        vec![format!("Patient/{patient}")],
        Outcome::Success,
        200,
        Some(format!("session {} opened: {REASON_LIFE_OR_BODY}", s.id)),
    )
    .await
    .map_err(|e| (Some(patient.clone()), e))?;
    shared.emergency.open(s.clone(), now);
    Ok(fhir_json(
        StatusCode::OK,
        &json!({"resourceType": "Parameters", "parameter": [
            {"name": "patient", "valueReference": {"reference": format!("Patient/{patient}")}},
            {"name": "session", "valueString": s.id},
            {"name": "until", "valueInstant": s.until.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)}
        ]}),
    ))
}
