//! `POST /fhir/$eligibility`: eligibility check (資格確認) by 保険者番号 + 記号 + 番号 +
//! 枝番 + birth date, the 資格確認書 path at reception. Eligibility only, never
//! clinical data.
//!
//! # Access decision
//! Any care-facility staff (clerk included) may ask, for purpose treatment. The
//! lookup runs as the platform (primary-key reads, no scope) inside this handler
//! after that explicit check, and is audited (action `eligibility`, purpose
//! treatment, the person as patient). This was preferred over an [`AccessRule`]
//! permitting reads of Coverage/Patient: a rule sees only the operation, type and
//! patient of a request, so it would open every person's Coverage and Patient to
//! every clerk through the generic REST API. What justifies this access is that
//! the caller already holds the member's numbers *and* birth date (the card in
//! hand); only this handler can check that, and it answers nothing else.
//!
//! A wrong birth date answers exactly like an unknown number, so the operation
//! cannot be used to probe which numbers exist. Only Coverage written by the insurer
//! named in the request (author organisation = 保険者番号) is considered.
//!
//! [`AccessRule`]: tsunagi_policy::AccessRule

use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Response;
use axum::routing::post;
use axum::{Extension, Router};
use chrono::NaiveDate;
use serde::Deserialize;
use serde_json::{Value, json};
use tsunagi_fhir::{FhirError, FhirResult, ParametersText, query};
use tsunagi_policy::audit::AuditRecord;
use tsunagi_policy::identity::{Purpose, Role, role_allowed_for};
use tsunagi_policy::ids::validate_insurer_number;
use tsunagi_policy::policy::Operation;
use tsunagi_server::engine::blocking;
use tsunagi_server::http::extract::{Caller, FhirJson};
use tsunagi_server::http::{ApiResult, fhir_text};
use tsunagi_server::{AppState, Ctx, OperationDecl};
use tsunagi_store::{Scope, Store, StoredText};

use crate::coverage::{
    CoverageFacts, CoverageState, INSURANCE_MEMBER_SYSTEM, coverage_id, member_key, parameters_map,
    today_jst,
};

pub fn routes() -> Router<AppState> {
    Router::new().route("/fhir/$eligibility", post(eligibility))
}

pub fn operations() -> Vec<OperationDecl> {
    vec![
        OperationDecl {
            name: "eligibility",
            resource_type: None,
            documentation: "Eligibility check by 保険者番号, 記号, 番号, 枝番 and birth date (資格確認書); care-facility staff; eligibility only",
        },
        OperationDecl {
            name: "register-coverage",
            resource_type: None,
            documentation: "Insurer registers a person's coverage (資格情報); insurer staff, own 保険者番号 only",
        },
    ]
}

/// A parsed `$eligibility` request.
#[derive(Debug, Clone)]
pub struct EligibilityQuery {
    pub insurer_number: String,
    pub symbol: String,
    pub number: String,
    pub branch: String,
    pub birth_date: NaiveDate,
    pub on: NaiveDate,
}

fn param_error(name: &str, msg: impl Into<String>) -> FhirError {
    FhirError::invalid_element(
        &format!("Parameters.parameter.where(name='{name}').value"),
        msg,
    )
}

impl EligibilityQuery {
    pub fn from_parameters(body: &Value) -> FhirResult<Self> {
        if body.get("resourceType").and_then(Value::as_str) != Some("Parameters") {
            return Err(FhirError::bad_request(
                Some("Parameters"),
                "$eligibility takes a Parameters resource",
            ));
        }
        let m = parameters_map(body);
        // 全角 digits as printed on a card are the same numbers
        let get = |k: &str| {
            m.get(k)
                .map(|s| crate::coverage::fold_width(s))
                .unwrap_or_default()
        };
        let required = |k: &str| {
            let v = get(k);
            if v.is_empty() {
                Err(param_error(k, format!("{k} is required")))
            } else {
                Ok(v)
            }
        };
        let insurer_number = required("insurerNumber")?;
        validate_insurer_number(&insurer_number)
            .map_err(|e| param_error("insurerNumber", e.to_string()))?;
        let number = required("number")?;
        let branch = required("branch")?;
        if !(branch.len() == 2 && branch.bytes().all(|b| b.is_ascii_digit())) {
            return Err(param_error("branch", "枝番 must be exactly two digits"));
        }
        let date = |k: &str, v: &str| {
            NaiveDate::parse_from_str(v, "%Y-%m-%d")
                .map_err(|_| param_error(k, format!("'{v}' is not a date (YYYY-MM-DD)")))
        };
        let birth_date = date("birthDate", &required("birthDate")?)?;
        let on = match get("date") {
            d if d.is_empty() => today_jst(),
            d => date("date", &d)?,
        };
        Ok(EligibilityQuery {
            insurer_number,
            symbol: get("symbol"),
            number,
            branch,
            birth_date,
            on,
        })
    }

    pub fn member_key(&self) -> String {
        member_key(
            &self.insurer_number,
            &self.symbol,
            &self.number,
            &self.branch,
        )
    }
}

/// The answer before rendering. Stored resources stay as their stored text:
/// they go into the answer as they are, unparsed.
#[derive(Debug, Clone)]
pub struct Answer {
    /// eligible, ended, not-started, cancelled, not-found
    pub status: &'static str,
    pub message: String,
    /// The insurer's Coverage that answered.
    pub coverage: Option<StoredText>,
    /// Its `period.end`, told in an answer that is not eligible.
    pub end_date: Option<String>,
    pub patient: Option<StoredText>,
    /// The identity-confirmation view of the person, when eligible.
    pub identity: Option<Value>,
    /// Public-expense Coverage (公費・地方単独助成) of the person in force on the day,
    /// when eligible: the insurance and every subsidy in one answer.
    pub subsidies: Vec<StoredText>,
}

/// What identity confirmation shows of a person (name in kanji and kana, sex,
/// birth date), read from the Patient's stored text.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Identity {
    name: Option<Value>,
    gender: Option<Value>,
    birth_date: Option<Value>,
}

impl Identity {
    fn view(self, id: &str) -> Value {
        let mut v = serde_json::Map::new();
        v.insert("resourceType".into(), "Patient".into());
        v.insert("id".into(), id.into());
        for (k, x) in [
            ("name", self.name),
            ("gender", self.gender),
            ("birthDate", self.birth_date),
        ] {
            if let Some(x) = x {
                v.insert(k.into(), x);
            }
        }
        Value::Object(v)
    }
}

/// Looks the member up (platform read; see the module docs) and judges eligibility.
pub fn lookup(store: &dyn Store, q: &EligibilityQuery) -> FhirResult<Answer> {
    let key = q.member_key();
    let not_found = || Answer {
        status: "not-found",
        message: "no coverage matches these insurance numbers and birth date".into(),
        coverage: None,
        end_date: None,
        patient: None,
        identity: None,
        subsidies: Vec::new(),
    };
    // Registered coverage: primary key derived from the member key.
    let mut candidates: Vec<StoredText> = store
        .read_text("Coverage", &coverage_id(&key))?
        .filter(|c| !c.deleted)
        .into_iter()
        .collect();
    if candidates.is_empty() {
        // Coverage written otherwise (e.g. plain FHIR create): identifier token search.
        let sq = query::parse(
            "Coverage",
            &[
                (
                    "identifier".into(),
                    format!("{INSURANCE_MEMBER_SYSTEM}|{key}"),
                ),
                ("_count".into(), "10".into()),
            ],
        )?;
        candidates = store.search_text(&sq, &Scope::Unrestricted)?.matches;
    }
    let birth = q.birth_date.to_string();
    for cov in candidates {
        // Only the insurer's own word counts: a Coverage written by anyone else (a
        // care facility may write Coverage too) never makes a person eligible.
        if cov.author_org.as_deref() != Some(q.insurer_number.as_str()) {
            continue;
        }
        let Some(c) = cov.text.as_deref().and_then(CoverageFacts::parse) else {
            continue;
        };
        let Some(pid) = c.beneficiary() else {
            continue;
        };
        let Some(patient) = store.read_text("Patient", pid)?.filter(|p| !p.deleted) else {
            continue;
        };
        let Some(identity) = patient
            .text
            .as_deref()
            .and_then(|t| serde_json::from_str::<Identity>(t).ok())
        else {
            continue;
        };
        if identity.birth_date.as_ref().and_then(Value::as_str) != Some(birth.as_str()) {
            continue;
        }
        let state = c.state(q.on);
        let end_date = c.end().map(str::to_string);
        let (status, message) = match state {
            CoverageState::Current => ("eligible", format!("coverage is valid on {}", q.on)),
            CoverageState::Ended(d) => ("ended", format!("coverage ended on {d} (資格喪失)")),
            CoverageState::NotStarted(d) => ("not-started", format!("coverage starts on {d}")),
            CoverageState::Cancelled => ("cancelled", "coverage was cancelled".to_string()),
        };
        let eligible = status == "eligible";
        let subsidies = if eligible {
            crate::coverage::current_subsidies(store, &patient.id, q.on)?
        } else {
            Vec::new()
        };
        return Ok(Answer {
            status,
            message,
            identity: eligible.then(|| identity.view(&patient.id)),
            coverage: Some(cov),
            end_date,
            patient: Some(patient),
            subsidies,
        });
    }
    Ok(not_found())
}

/// Renders the answer as a Parameters resource's JSON text, the stored
/// Coverage texts spliced in as they are.
pub fn render(a: Answer, on: NaiveDate) -> Vec<u8> {
    let eligible = a.status == "eligible";
    let mut out = ParametersText::default();
    out.push(&json!({"name": "eligible", "valueBoolean": eligible}));
    out.push(&json!({"name": "status", "valueCode": a.status}));
    out.push(&json!({"name": "message", "valueString": a.message}));
    out.push(&json!({"name": "date", "valueDate": on.to_string()}));
    if eligible {
        if let Some(t) = a.coverage.as_ref().and_then(|c| c.text.as_deref()) {
            out.resource_text("coverage", t);
        }
        if let Some(p) = a.identity {
            out.push(&tsunagi_fhir::resource_parameter("patient", p));
        }
        for s in &a.subsidies {
            if let Some(t) = s.text.as_deref() {
                out.resource_text("subsidy", t);
            }
        }
    } else if a.coverage.is_some()
        && let Some(end) = a.end_date
    {
        out.push(&json!({"name": "endDate", "valueDate": end}));
    }
    out.finish()
}

/// Whether the caller may ask: staff of a care facility acting for treatment.
pub fn may_check(ctx: &Ctx) -> Result<(), String> {
    let p = &ctx.principal;
    let staff = p.role.is_clinical() || p.role == Role::Clerk;
    if !(staff && p.org_kind.is_care_facility() && role_allowed_for(p.org_kind, p.role)) {
        return Err(format!(
            "$eligibility is for care-facility staff; role {} at a {} may not use it",
            p.role, p.org_kind
        ));
    }
    if ctx.purpose != Purpose::Treatment {
        return Err(format!(
            "$eligibility is answered for purpose treatment, not {}",
            ctx.purpose
        ));
    }
    Ok(())
}

async fn eligibility(
    State(state): State<AppState>,
    Extension(shared): Extension<Arc<crate::Shared>>,
    Caller(ctx): Caller,
    FhirJson(body): FhirJson,
) -> ApiResult<Response> {
    let engine = &state.engine;
    if let Err(reason) = may_check(&ctx) {
        return Err(engine
            .deny(&ctx, Operation::Read, None, vec!["Coverage".into()], reason)
            .await
            .into());
    }
    let q = EligibilityQuery::from_parameters(&body)?;
    let store = engine.store.clone();
    let q2 = q.clone();
    let answer = blocking(move || lookup(&*store, &q2)).await?;
    let resources = [&answer.coverage, &answer.patient]
        .into_iter()
        .flatten()
        .chain(answer.subsidies.iter())
        .map(StoredText::reference)
        .collect();
    let mut rec = AuditRecord::new(
        &ctx.principal,
        ctx.purpose,
        "eligibility",
        ctx.request_id.clone(),
    )
    .with_patient(answer.patient.as_ref().map(|p| p.id.clone()))
    .with_resources(resources);
    rec.reason = Some(format!("eligibility answer: {}", answer.status));
    engine.audit.record(rec).await?;
    let shown: Vec<&str> = answer
        .subsidies
        .iter()
        .filter_map(|s| s.text.as_deref())
        .collect();
    shared.subsidies_shown(&shown);
    Ok(fhir_text(StatusCode::OK, render(answer, q.on)))
}
