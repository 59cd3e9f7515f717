//! Disaster mode (災害時モード): after a disaster the ministry declares an area
//! (prefectures, JIS codes 01–47) and a period; inside both, care facilities may
//! look a patient up without the card and read their data, with the lookup
//! recorded as a consent (purpose disaster).
//!
//! - `POST /fhir/$disaster-declaration` (role ministry): prefectures + period.
//! - `GET /fhir/$disaster-declaration` (any authenticated caller): the declarations.
//! - `POST /fhir/$disaster-lookup` (care facility staff, purpose disaster): the 4
//!   items → a disaster grant for (facility, patient) until the declaration ends,
//!   and the patient id.
//!
//! A facility's prefecture is the first two digits of its 医療機関等コード. The
//! [`DisasterRule`] permits reads under purpose disaster while a declaration
//! covers (facility prefecture, now) and the facility holds a disaster grant.
//! Declarations are `Basic` resources (code `disaster-declaration`), all audited.

use std::sync::{Arc, RwLock};

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Response;
use axum::routing::post;
use axum::{Extension, Router};
use chrono::{DateTime, Utc};
use serde_json::{Value, json};
use tsunagi_fhir::{FhirError, FhirResult, query};
use tsunagi_policy::audit::Outcome;
use tsunagi_policy::identity::{Principal, Purpose, Role};
use tsunagi_policy::policy::{AccessRequest, Operation, ScopeGrant, Verdict};
use tsunagi_server::http::extract::{Caller, FhirJson};
use tsunagi_server::http::{ApiResult, fhir_json};
use tsunagi_server::{AppState, Ctx, OperationDecl};
use tsunagi_store::{Scope, ScopeRule, Store, WriteContext};

use crate::Shared;
use crate::cards::SERVICE_ORG;
use crate::consent::{
    Category, Grant, GrantKind, categories_admit, category_scope, category_scope_covers, qualified,
};
use crate::emergency::{Lookup, find_patient};
use crate::facility::SETTINGS_CODE_SYSTEM;
use crate::reception::{Params, audit_event, audit_json, blocking, refuse, write_grants};

/// Extension: a declared prefecture (valueCode, JIS X 0401), repeated.
pub const EXT_PREFECTURE: &str = "https://tsunagi.dev/fhir/StructureDefinition/disaster-prefecture";
/// Extension: the declared period (valuePeriod).
pub const EXT_PERIOD: &str = "https://tsunagi.dev/fhir/StructureDefinition/disaster-period";

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/fhir/$disaster-declaration", post(declare).get(list))
        .route("/fhir/$disaster-lookup", post(lookup))
}

pub fn operations() -> Vec<OperationDecl> {
    vec![
        OperationDecl {
            name: "disaster-declaration",
            resource_type: None,
            documentation: "災害時モード: the ministry declares prefectures and a period (POST); everyone lists declarations (GET)",
        },
        OperationDecl {
            name: "disaster-lookup",
            resource_type: None,
            documentation: "Inside a declared area and period, a care facility finds a patient by the 4 items without the card; records a consent (purpose disaster)",
        },
    ]
}

/// One declaration.
#[derive(Debug, Clone, PartialEq)]
pub struct Declaration {
    pub id: String,
    /// Two-digit JIS prefecture codes.
    pub prefectures: Vec<String>,
    pub start: DateTime<Utc>,
    /// Exclusive.
    pub end: DateTime<Utc>,
    pub declared_by: String,
}

impl Declaration {
    pub fn covers(&self, prefecture: &str, now: DateTime<Utc>) -> bool {
        self.start <= now && now < self.end && self.prefectures.iter().any(|p| p == prefecture)
    }

    fn fmt(t: &DateTime<Utc>) -> String {
        t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
    }

    pub fn to_resource(&self) -> Value {
        let mut ext: Vec<Value> = self
            .prefectures
            .iter()
            .map(|p| json!({"url": EXT_PREFECTURE, "valueCode": p}))
            .collect();
        ext.push(json!({"url": EXT_PERIOD, "valuePeriod": {"start": Self::fmt(&self.start), "end": Self::fmt(&self.end)}}));
        json!({
            "resourceType": "Basic",
            "id": self.id,
            "code": {"coding": [{"system": SETTINGS_CODE_SYSTEM, "code": "disaster-declaration"}]},
            "author": {"identifier": {"value": self.declared_by}},
            "extension": ext
        })
    }

    pub fn from_resource(r: &Value) -> Option<Declaration> {
        let exts = r.get("extension")?.as_array()?;
        let prefectures = exts
            .iter()
            .filter(|e| e.get("url").and_then(Value::as_str) == Some(EXT_PREFECTURE))
            .filter_map(|e| {
                e.get("valueCode")
                    .and_then(Value::as_str)
                    .map(str::to_string)
            })
            .collect();
        let period = exts
            .iter()
            .find(|e| e.get("url").and_then(Value::as_str) == Some(EXT_PERIOD))?
            .get("valuePeriod")?;
        let t = |k: &str| {
            period
                .get(k)
                .and_then(Value::as_str)
                .and_then(|s| DateTime::parse_from_rfc3339(s).ok())
                .map(|t| t.with_timezone(&Utc))
        };
        Some(Declaration {
            id: r.get("id")?.as_str()?.to_string(),
            prefectures,
            start: t("start")?,
            end: t("end")?,
            declared_by: r
                .pointer("/author/identifier/value")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string(),
        })
    }

    fn to_json(&self) -> Value {
        json!({"id": self.id, "prefectures": self.prefectures, "start": Self::fmt(&self.start), "end": Self::fmt(&self.end), "declaredBy": self.declared_by})
    }
}

/// Disaster declarations.
#[derive(Default)]
pub struct Declarations {
    list: RwLock<Vec<Declaration>>,
}

impl Declarations {
    pub fn load(&self, store: &dyn Store) -> FhirResult<()> {
        let q = query::parse(
            "Basic",
            &[
                (
                    "code".into(),
                    format!("{SETTINGS_CODE_SYSTEM}|disaster-declaration"),
                ),
                ("_count".into(), "1000".into()),
            ],
        )?;
        for s in store.search(&q, &Scope::Unrestricted)?.matches {
            if let Some(d) = s.resource.as_ref().and_then(Declaration::from_resource) {
                self.add(d);
            }
        }
        Ok(())
    }

    pub fn add(&self, d: Declaration) {
        let mut l = self.list.write().unwrap_or_else(|e| e.into_inner());
        l.retain(|x| x.id != d.id);
        l.push(d);
    }

    pub fn all(&self) -> Vec<Declaration> {
        self.list.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The declaration covering (prefecture, now) that lasts longest, if any.
    pub fn covering(&self, prefecture: &str, now: DateTime<Utc>) -> Option<Declaration> {
        self.list
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter(|d| d.covers(prefecture, now))
            .max_by_key(|d| d.end)
            .cloned()
    }
}

/// Prefecture of a facility: the first two digits of its 医療機関等コード.
pub fn prefecture_of(org: &str) -> Option<&str> {
    let p = org.get(..2)?;
    valid_prefecture(p).then_some(p)
}

fn valid_prefecture(p: &str) -> bool {
    p.len() == 2 && p.parse::<u8>().is_ok_and(|n| (1..=47).contains(&n))
}

/// Permits reads of a patient looked up in disaster mode, by staff of that
/// facility, under purpose disaster, while a declaration covers the facility's
/// prefecture. Qualified staff read every category (drug-related only where the
/// facility hides clinical history); other staff the eligibility data.
pub struct DisasterRule(pub Arc<Shared>);

impl DisasterRule {
    fn in_force(&self, p: &Principal, now: DateTime<Utc>) -> Result<(), String> {
        if !p.org_kind.is_care_facility() {
            return Err("disaster mode is for care facilities".into());
        }
        let pref = prefecture_of(&p.org)
            .ok_or_else(|| format!("organisation code {} names no prefecture", p.org))?;
        if self.0.disaster.covering(pref, now).is_none() {
            return Err(format!(
                "no disaster declaration covers prefecture {pref} at this time"
            ));
        }
        Ok(())
    }
}

impl tsunagi_policy::AccessRule for DisasterRule {
    fn name(&self) -> &'static str {
        "disaster"
    }

    fn decide(&self, p: &Principal, req: &AccessRequest) -> Verdict {
        if req.purpose != Purpose::Disaster
            || !req.operation.is_read()
            || req.operation == Operation::Search
        {
            return Verdict::NotApplicable(None);
        }
        let now = self.0.now();
        if let Err(why) = self.in_force(p, now) {
            return Verdict::NotApplicable(Some(why));
        }
        let Some(patient) = req.patient.as_deref() else {
            return Verdict::NotApplicable(None);
        };
        if self
            .0
            .consent
            .live(&p.org, patient, GrantKind::Disaster, now)
            .is_empty()
        {
            return Verdict::NotApplicable(Some(
                "the patient has not been looked up in disaster mode at this facility ($disaster-lookup)".into(),
            ));
        }
        if categories_admit(
            qualified(&self.0, p.role),
            &Category::ALL,
            self.0.facility.hides_clinical(&p.org),
            &req.resource_type,
            &req.labels,
        ) {
            Verdict::Permit("disaster mode: declared area and period, lookup recorded".into())
        } else {
            Verdict::NotApplicable(Some(format!(
                "in disaster mode role {} at this facility may not read {}",
                p.role, req.resource_type
            )))
        }
    }

    fn search_scope(&self, p: &Principal, rt: &str, purpose: Purpose) -> ScopeGrant {
        let now = self.0.now();
        if purpose != Purpose::Disaster || self.in_force(p, now).is_err() {
            return ScopeGrant::None(None);
        }
        let (q, hide) = (
            qualified(&self.0, p.role),
            self.0.facility.hides_clinical(&p.org),
        );
        if !category_scope_covers(q, &Category::ALL, hide, rt) {
            return ScopeGrant::None(None);
        }
        let rules: Vec<ScopeRule> = self
            .0
            .consent
            .live_for_org(&p.org, GrantKind::Disaster, now)
            .into_iter()
            .flat_map(|(id, _)| category_scope(&id, q, &Category::ALL, hide))
            .collect();
        if rules.is_empty() {
            ScopeGrant::None(None)
        } else {
            ScopeGrant::Rules(rules)
        }
    }
}

// ------------------------------------------------------------------ handlers

fn parse_instant(p: &Params, name: &str) -> FhirResult<DateTime<Utc>> {
    let s = p.required(name)?;
    tsunagi_fhir::datetime::parse_instant(&s).ok_or_else(|| {
        FhirError::bad_request(
            Some("Parameters.parameter"),
            format!("{name} must be an instant with a time zone, not '{s}'"),
        )
    })
}

async fn declare(
    State(state): State<AppState>,
    Extension(shared): Extension<Arc<Shared>>,
    Caller(ctx): Caller,
    FhirJson(body): FhirJson,
) -> ApiResult<Response> {
    match do_declare(&state, &shared, &ctx, body).await {
        Ok(r) => Ok(r),
        Err(e) => Err(refuse(&state, &ctx, "disaster-declaration", None, e)
            .await
            .into()),
    }
}

async fn do_declare(
    state: &AppState,
    shared: &Arc<Shared>,
    ctx: &Ctx,
    body: Value,
) -> FhirResult<Response> {
    if ctx.principal.role != Role::Ministry {
        return Err(FhirError::forbidden(format!(
            "disaster declarations are made by the ministry, not by role {}",
            ctx.principal.role
        )));
    }
    let p = Params::parse(&body)?;
    let mut prefectures = p.strings("prefecture");
    if prefectures.is_empty() {
        return Err(FhirError::bad_request(
            Some("Parameters.parameter"),
            "at least one prefecture (JIS code 01–47) is required",
        ));
    }
    if let Some(bad) = prefectures.iter().find(|x| !valid_prefecture(x)) {
        return Err(FhirError::bad_request(
            Some("Parameters.parameter"),
            format!("'{bad}' is not a prefecture code (01–47)"),
        ));
    }
    prefectures.sort();
    prefectures.dedup();
    let start = parse_instant(&p, "start")?;
    let end = parse_instant(&p, "end")?;
    if end <= start {
        return Err(FhirError::bad_request(
            Some("Parameters.parameter"),
            "end must be after start",
        ));
    }
    let d = Declaration {
        id: format!("disaster-{}", uuid::Uuid::new_v4()),
        prefectures,
        start,
        end,
        declared_by: ctx.principal.org.clone(),
    };
    let (store, d2) = (state.engine.store.clone(), d.clone());
    let rec = audit_json(
        ctx,
        "disaster-declaration",
        None,
        vec![format!("Basic/{}", d.id)],
        Outcome::Success,
        201,
        None,
    );
    let user = ctx.principal.user.clone();
    blocking(move || {
        let mut tx = store.begin()?;
        tx.create(
            "Basic",
            &d2.id,
            d2.to_resource(),
            &WriteContext {
                org: Some(SERVICE_ORG.into()),
                user,
            },
        )?;
        tx.audit_append(&[rec])?;
        tx.commit()
    })
    .await?;
    shared.disaster.add(d.clone());
    Ok(fhir_json(StatusCode::CREATED, &d.to_json()))
}

async fn list(
    State(state): State<AppState>,
    Extension(shared): Extension<Arc<Shared>>,
    Caller(ctx): Caller,
) -> ApiResult<Response> {
    let all = shared.disaster.all();
    audit_event(
        &state,
        &ctx,
        "disaster-declaration-list",
        None,
        all.iter().map(|d| format!("Basic/{}", d.id)).collect(),
        Outcome::Success,
        200,
        None,
    )
    .await?;
    let now = shared.now();
    let items: Vec<Value> = all
        .iter()
        .map(|d| {
            let mut j = d.to_json();
            j["inForce"] = json!(d.start <= now && now < d.end);
            j
        })
        .collect();
    Ok(fhir_json(
        StatusCode::OK,
        &json!({"total": items.len(), "declarations": items}),
    ))
}

async fn lookup(
    State(state): State<AppState>,
    Extension(shared): Extension<Arc<Shared>>,
    Caller(ctx): Caller,
    FhirJson(body): FhirJson,
) -> ApiResult<Response> {
    match do_lookup(&state, &shared, &ctx, body).await {
        Ok(r) => Ok(r),
        Err((patient, e)) => Err(refuse(&state, &ctx, "disaster-lookup", patient, e)
            .await
            .into()),
    }
}

async fn do_lookup(
    state: &AppState,
    shared: &Arc<Shared>,
    ctx: &Ctx,
    body: Value,
) -> Result<Response, (Option<String>, FhirError)> {
    let none = |e: FhirError| (None, e);
    let pr = &ctx.principal;
    if ctx.purpose != Purpose::Disaster {
        return Err(none(FhirError::forbidden(
            "disaster lookup needs X-Purpose-Of-Use: disaster",
        )));
    }
    if !pr.org_kind.is_care_facility() || !pr.role.allowed_purposes().contains(&Purpose::Disaster) {
        return Err(none(FhirError::forbidden(format!(
            "disaster lookup is for clinical staff of care facilities, not role {} at a {}",
            pr.role, pr.org_kind
        ))));
    }
    let now = shared.now();
    let pref = prefecture_of(&pr.org).ok_or_else(|| {
        none(FhirError::forbidden(format!(
            "organisation code {} names no prefecture",
            pr.org
        )))
    })?;
    let Some(decl) = shared.disaster.covering(pref, now) else {
        return Err(none(FhirError::forbidden(format!(
            "no disaster declaration covers prefecture {pref} now; use the card"
        ))));
    };
    let p = Params::parse(&body).map_err(none)?;
    let l = Lookup::from_params(&p);
    let store = state.engine.store.clone();
    let patient = blocking(move || find_patient(&*store, &l))
        .await
        .map_err(none)?;
    let g = Grant {
        id: uuid::Uuid::new_v4().to_string(),
        patient: patient.clone(),
        org: pr.org.clone(),
        categories: Category::ALL.to_vec(),
        start: now,
        end: decl.end,
        kind: GrantKind::Disaster,
        setting: "disaster".into(),
    };
    let (store, c2, g2) = (state.engine.store.clone(), ctx.clone(), g.clone());
    blocking(move || write_grants(&*store, &c2, "disaster-lookup", &[g2], &[]))
        .await
        .map_err(|e| (Some(patient.clone()), e))?;
    shared.consent.insert(g.clone());
    Ok(fhir_json(
        StatusCode::OK,
        &tsunagi_fhir::parameters(vec![
            json!({"name": "patient", "valueReference": {"reference": format!("Patient/{patient}")}}),
            json!({"name": "declaration", "valueString": decl.id}),
            tsunagi_fhir::resource_parameter("grant", g.to_resource("active")),
            json!({"name": "validUntil", "valueInstant": g.end.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)}),
        ]),
    ))
}
