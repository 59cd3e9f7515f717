//! Vaccination (予防接種): vouchers, the pre-vaccination questionnaire, records.
//!
//! - The municipality issues a voucher (予防接種券) per vaccine and dose as an
//!   `ImmunizationRecommendation` it authors: earliest and latest date to give
//!   (LOINC 30981-5, 59777-3), the minimum interval since the previous dose, and
//!   the municipality's `Questionnaire` (予診票) to fill.
//! - The resident fills the questionnaire through self-service
//!   (`POST /pmh/questionnaire-responses`, patient token); required items are
//!   checked against the municipality's Questionnaire.
//! - At reception the clinic reads vouchers and answers
//!   (`GET /pmh/vaccination?patient=`) under its live reception grant.
//! - The clinic records the vaccination (`POST /pmh/vaccinations`); refused with a
//!   clear OperationOutcome when there is no voucher for the vaccine and dose, the
//!   voucher has expired, it is too early (earliest date or minimum interval after
//!   the previous dose), the questionnaire is missing, or the voucher is used. The
//!   `Immunization` id derives from the voucher, so a voucher is used once even
//!   under concurrent recordings (the second insert is a conflict).
//! - The patient sees the Immunization at once through the FHIR API (own
//!   compartment); the municipality through `GET /pmh/vaccinations?patient=`, for
//!   the vouchers it issued, and as a list of all its vouchers and vaccinations
//!   (`GET /pmh/vaccinations?vaccine=&given=&_count=&_offset=`).

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::Response;
use axum::routing::{get, post};
use axum::{Extension, Router};
use chrono::{Duration, NaiveDate, SecondsFormat};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use tsunagi_fhir::{FhirError, FhirResult, query};
use tsunagi_policy::identity::Role;
use tsunagi_server::AppState;
use tsunagi_server::engine::{WriteWork, blocking};
use tsunagi_server::http::extract::{Caller, FhirJson};
use tsunagi_server::http::{ApiResult, fhir_json};
use tsunagi_store::{Scope, Store, StoredResource};

use crate::Shared;
use crate::http::{
    audit_action, deny, is_facility_staff, patient_id, reference, require_municipality,
    required_str, searchset,
};
use crate::recipients::ext;

pub const VACCINE_SYSTEM: &str = "urn:oid:1.2.392.200119.4.1000.1";
const LOCAL_GOVERNMENT_SYSTEM: &str = "https://tsunagi.dev/fhir/NamingSystem/local-government-code";
const EARLIEST: &str = "30981-5";
const LATEST: &str = "59777-3";

/// Id of the Immunization recorded against a voucher (one use per voucher).
pub fn immunization_id(voucher: &str) -> String {
    let h = Sha256::digest(format!("pmh-vaccination|{voucher}").as_bytes());
    let hex: String = h[..16].iter().map(|b| format!("{b:02x}")).collect();
    format!("pmh-imm-{hex}")
}

/// A voucher, read from its ImmunizationRecommendation.
#[derive(Debug, Clone, PartialEq)]
pub struct Voucher {
    pub id: String,
    pub patient: String,
    pub municipality: String,
    pub vaccine: String,
    pub dose: u64,
    pub earliest: Option<NaiveDate>,
    pub latest: Option<NaiveDate>,
    pub min_interval_days: Option<i64>,
    pub questionnaire: Option<String>,
}

fn criterion(rec: &Value, loinc: &str) -> Option<NaiveDate> {
    rec.get("dateCriterion")?.as_array()?.iter().find_map(|c| {
        (c.pointer("/code/coding/0/code").and_then(Value::as_str) == Some(loinc))
            .then(|| c.get("value").and_then(Value::as_str))
            .flatten()
            .and_then(|s| NaiveDate::parse_from_str(s.get(..10)?, "%Y-%m-%d").ok())
    })
}

impl Voucher {
    pub fn from_stored(s: &StoredResource) -> Option<Voucher> {
        let r = s.resource.as_ref()?;
        let rec = r.pointer("/recommendation/0")?;
        let exts = r.get("extension").and_then(Value::as_array);
        let find = |name: &str| {
            exts.and_then(|es| {
                es.iter()
                    .find(|e| e.get("url").and_then(Value::as_str) == Some(ext(name).as_str()))
            })
        };
        Some(Voucher {
            id: s.id.clone(),
            patient: r
                .pointer("/patient/reference")?
                .as_str()?
                .strip_prefix("Patient/")?
                .to_string(),
            municipality: s.author_org.clone().unwrap_or_default(),
            vaccine: rec
                .pointer("/vaccineCode/0/coding/0/code")?
                .as_str()?
                .to_string(),
            dose: rec.get("doseNumberPositiveInt")?.as_u64()?,
            earliest: criterion(rec, EARLIEST),
            latest: criterion(rec, LATEST),
            min_interval_days: find("min-interval-days")
                .and_then(|e| e.get("valueInteger"))
                .and_then(Value::as_i64),
            questionnaire: find("questionnaire")
                .and_then(|e| e.get("valueCanonical"))
                .and_then(Value::as_str)
                .map(str::to_string),
        })
    }
}

/// Every voucher of a patient (platform read; callers check and audit).
pub fn vouchers_of(store: &dyn Store, patient: &str) -> FhirResult<Vec<(StoredResource, Voucher)>> {
    let q = query::parse(
        "ImmunizationRecommendation",
        &[
            ("patient".into(), format!("Patient/{patient}")),
            ("_count".into(), "1000".into()),
        ],
    )?;
    Ok(store
        .search(&q, &Scope::Unrestricted)?
        .matches
        .into_iter()
        .filter_map(|s| Voucher::from_stored(&s).map(|v| (s, v)))
        .collect())
}

fn questionnaire_responses(store: &dyn Store, patient: &str) -> FhirResult<Vec<StoredResource>> {
    let q = query::parse(
        "QuestionnaireResponse",
        &[
            ("patient".into(), format!("Patient/{patient}")),
            ("_count".into(), "1000".into()),
        ],
    )?;
    Ok(store.search(&q, &Scope::Unrestricted)?.matches)
}

/// Why a vaccination is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    NotEntitled,
    /// A later dose before the previous one was recorded.
    PreviousDoseMissing,
    Expired(NaiveDate),
    TooEarly(NaiveDate),
    IntervalNotMet {
        previous: NaiveDate,
        next: NaiveDate,
    },
    QuestionnaireMissing,
    AlreadyUsed,
}

impl Refusal {
    pub fn to_error(&self, vaccine: &str, dose: u64) -> FhirError {
        let msg = match self {
            Refusal::NotEntitled => {
                format!("not entitled: no voucher for vaccine {vaccine} dose {dose}")
            }
            Refusal::PreviousDoseMissing => format!(
                "not entitled yet: dose {} of vaccine {vaccine} has not been recorded",
                dose.saturating_sub(1)
            ),
            Refusal::Expired(d) => {
                format!("the voucher for vaccine {vaccine} dose {dose} expired on {d}")
            }
            Refusal::TooEarly(d) => {
                format!("too early: the voucher for dose {dose} is valid from {d}")
            }
            Refusal::IntervalNotMet { previous, next } => format!(
                "minimum interval not met: the previous dose was given on {previous}; dose {dose} may be given from {next}"
            ),
            Refusal::QuestionnaireMissing => {
                "the pre-vaccination questionnaire (予診票) has not been answered".to_string()
            }
            Refusal::AlreadyUsed => {
                format!("the voucher for vaccine {vaccine} dose {dose} has been used")
            }
        };
        let el = match self {
            Refusal::QuestionnaireMissing => "questionnaireResponse",
            Refusal::NotEntitled | Refusal::PreviousDoseMissing => "doseNumber",
            _ => "occurrence",
        };
        let status = if *self == Refusal::AlreadyUsed {
            409
        } else {
            422
        };
        FhirError::new(status, "business-rule", Some(el.to_string()), msg)
    }
}

/// The vaccination rules on a voucher.
pub fn judge(
    v: &Voucher,
    on: NaiveDate,
    previous_dose: Option<NaiveDate>,
    answered: bool,
    used: bool,
) -> Result<(), Refusal> {
    if used {
        return Err(Refusal::AlreadyUsed);
    }
    if let Some(l) = v.latest
        && on > l
    {
        return Err(Refusal::Expired(l));
    }
    if let Some(e) = v.earliest
        && on < e
    {
        return Err(Refusal::TooEarly(e));
    }
    if v.dose > 1 {
        let Some(prev) = previous_dose else {
            return Err(Refusal::PreviousDoseMissing);
        };
        if let Some(days) = v.min_interval_days {
            let next = prev + Duration::days(days);
            if on < next {
                return Err(Refusal::IntervalNotMet {
                    previous: prev,
                    next,
                });
            }
        }
    }
    if v.questionnaire.is_some() && !answered {
        return Err(Refusal::QuestionnaireMissing);
    }
    Ok(())
}

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/pmh/vouchers", post(issue))
        .route("/pmh/questionnaires", post(put_questionnaire))
        .route("/pmh/questionnaire-responses", post(answer))
        .route("/pmh/vaccination", get(at_reception))
        .route("/pmh/vaccinations", post(record).get(municipality_view))
}

/// `POST /pmh/vouchers` (municipality): `{"patient", "vaccineCode", "doseNumber",
/// "earliest"?, "expires"?, "minIntervalDays"?, "questionnaire"?}`.
async fn issue(
    State(state): State<AppState>,
    Extension(shared): Extension<Arc<Shared>>,
    Caller(ctx): Caller,
    FhirJson(body): FhirJson,
) -> ApiResult<Response> {
    let m = require_municipality(&state, &ctx, "voucher issue").await?;
    let patient = patient_id(&required_str(&body, "patient")?);
    let vaccine = required_str(&body, "vaccineCode")?;
    let dose = body
        .get("doseNumber")
        .and_then(Value::as_u64)
        .filter(|d| *d >= 1)
        .ok_or_else(|| {
            FhirError::invalid_element("doseNumber", "doseNumber is a positive integer")
        })?;
    let day = |k: &str| -> FhirResult<Option<String>> {
        match body.get(k).and_then(Value::as_str) {
            None => Ok(None),
            Some(s) => NaiveDate::parse_from_str(s, "%Y-%m-%d")
                .map(|d| Some(d.to_string()))
                .map_err(|_| FhirError::invalid_element(k, format!("{k} is YYYY-MM-DD"))),
        }
    };
    let mut criteria = Vec::new();
    if let Some(d) = day("earliest")? {
        criteria.push(json!({"code": {"coding": [{"system": "http://loinc.org", "code": EARLIEST, "display": "Earliest date to give"}]}, "value": d}));
    }
    if let Some(d) = day("expires")? {
        criteria.push(json!({"code": {"coding": [{"system": "http://loinc.org", "code": LATEST, "display": "Latest date to give immunization"}]}, "value": d}));
    }
    let mut exts = vec![];
    if let Some(n) = body.get("minIntervalDays") {
        let n = n.as_i64().filter(|n| *n >= 0).ok_or_else(|| {
            FhirError::invalid_element(
                "minIntervalDays",
                "minIntervalDays is a whole number of days",
            )
        })?;
        exts.push(json!({"url": ext("min-interval-days"), "valueInteger": n}));
    }
    if let Some(qn) = body.get("questionnaire").and_then(Value::as_str) {
        exts.push(json!({"url": ext("questionnaire"), "valueCanonical": qn}));
    }
    let rec = json!({
        "resourceType": "ImmunizationRecommendation",
        "extension": exts,
        "patient": {"reference": format!("Patient/{patient}")},
        "date": shared.now().to_rfc3339_opts(SecondsFormat::Secs, true),
        "authority": {"identifier": {"system": LOCAL_GOVERNMENT_SYSTEM, "value": m}},
        "recommendation": [{
            "vaccineCode": [{"coding": [{"system": VACCINE_SYSTEM, "code": vaccine}]}],
            "doseNumberPositiveInt": dose,
            "forecastStatus": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/immunization-recommendation-status", "code": "due"}]},
            "dateCriterion": criteria
        }]
    });
    let store = state.engine.store.clone();
    let p2 = patient.clone();
    let exists =
        blocking(move || Ok(store.read("Patient", &p2)?.is_some_and(|p| !p.deleted))).await?;
    if !exists {
        return Err(FhirError::invalid_element(
            "patient",
            format!("Patient/{patient} does not exist"),
        )
        .into());
    }
    let id = uuid::Uuid::new_v4().to_string();
    let w = state
        .engine
        .write(&ctx, move |work: &WriteWork, tx| {
            work.create_in(tx, "ImmunizationRecommendation", &id, rec)
        })
        .await?;
    Ok(fhir_json(
        StatusCode::CREATED,
        w.stored.resource.as_ref().unwrap_or(&Value::Null),
    ))
}

/// `POST /pmh/questionnaires` (municipality): its Questionnaire (予診票), created
/// or updated by id through the engine.
async fn put_questionnaire(
    State(state): State<AppState>,
    Caller(ctx): Caller,
    FhirJson(body): FhirJson,
) -> ApiResult<Response> {
    require_municipality(&state, &ctx, "questionnaire").await?;
    if body.get("resourceType").and_then(Value::as_str) != Some("Questionnaire") {
        return Err(
            FhirError::invalid_element("Questionnaire", "the body is a Questionnaire").into(),
        );
    }
    let id = required_str(&body, "id")?;
    let w = state
        .engine
        .update(&ctx, "Questionnaire", &id, body, None)
        .await?;
    Ok(fhir_json(
        if w.created {
            StatusCode::CREATED
        } else {
            StatusCode::OK
        },
        w.stored.resource.as_ref().unwrap_or(&Value::Null),
    ))
}

/// Required items without an answer, as FHIRPath-ish link ids.
fn missing_required(q: &Value, qr: &Value) -> Vec<String> {
    let answered: Vec<&str> = qr
        .get("item")
        .and_then(Value::as_array)
        .map(|items| {
            items
                .iter()
                .filter(|i| {
                    i.get("answer")
                        .and_then(Value::as_array)
                        .is_some_and(|a| !a.is_empty())
                })
                .filter_map(|i| i.get("linkId").and_then(Value::as_str))
                .collect()
        })
        .unwrap_or_default();
    q.get("item")
        .and_then(Value::as_array)
        .map(|items| {
            items
                .iter()
                .filter(|i| i.get("required").and_then(Value::as_bool) == Some(true))
                .filter_map(|i| i.get("linkId").and_then(Value::as_str))
                .filter(|l| !answered.contains(l))
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default()
}

/// `POST /pmh/questionnaire-responses` (patient self-service): a
/// QuestionnaireResponse for the patient's own voucher questionnaire.
async fn answer(
    State(state): State<AppState>,
    Caller(ctx): Caller,
    FhirJson(body): FhirJson,
) -> ApiResult<Response> {
    if ctx.principal.role != Role::Patient {
        return Err(deny(
            &state,
            &ctx,
            "QuestionnaireResponse",
            "the questionnaire is answered by the patient".into(),
        )
        .await
        .into());
    }
    if body.get("resourceType").and_then(Value::as_str) != Some("QuestionnaireResponse") {
        return Err(FhirError::invalid_element(
            "QuestionnaireResponse",
            "the body is a QuestionnaireResponse",
        )
        .into());
    }
    let qref = required_str(&body, "questionnaire")?;
    let qid = qref.rsplit('/').next().unwrap_or(&qref).to_string();
    let store = state.engine.store.clone();
    let q = blocking(move || store.read("Questionnaire", &qid)).await?;
    let Some(q) = q.filter(|q| !q.deleted).and_then(|q| q.resource) else {
        return Err(FhirError::invalid_element(
            "QuestionnaireResponse.questionnaire",
            format!("no Questionnaire {qref}"),
        )
        .into());
    };
    let missing = missing_required(&q, &body);
    if let Some(first) = missing.first()
        && body.get("status").and_then(Value::as_str) == Some("completed")
    {
        return Err(FhirError::invalid_element(
            &format!("QuestionnaireResponse.item.where(linkId='{first}').answer"),
            format!("required item(s) {} not answered", missing.join(", ")),
        )
        .into());
    }
    let w = state
        .engine
        .create(&ctx, "QuestionnaireResponse", body, None)
        .await?;
    Ok(fhir_json(
        StatusCode::CREATED,
        w.stored.resource.as_ref().unwrap_or(&Value::Null),
    ))
}

/// `GET /pmh/vaccination?patient=` (facility at reception): vouchers and
/// questionnaire answers, read through the engine (the PMH rule admits them
/// under a live reception grant) and audited.
async fn at_reception(
    State(state): State<AppState>,
    Query(q): Query<BTreeMap<String, String>>,
    Caller(ctx): Caller,
) -> ApiResult<Response> {
    let patient = patient_id(q.get("patient").map(String::as_str).unwrap_or(""));
    if patient.is_empty() {
        return Err(FhirError::invalid_element("patient", "patient is required").into());
    }
    let mut entries = Vec::new();
    for rt in ["ImmunizationRecommendation", "QuestionnaireResponse"] {
        let sq = query::parse(
            rt,
            &[
                ("patient".into(), format!("Patient/{patient}")),
                ("_count".into(), "100".into()),
            ],
        )?;
        let found = state.engine.search(&ctx, sq).await?;
        entries.extend(found.matches.into_iter().filter_map(|s| s.resource));
    }
    Ok(fhir_json(
        StatusCode::OK,
        &tsunagi_fhir::bundle::searchset_of(entries, None),
    ))
}

/// `POST /pmh/vaccinations` (clinic): `{"patient", "vaccineCode", "doseNumber",
/// "occurrence", "lotNumber"?}`.
async fn record(
    State(state): State<AppState>,
    Extension(shared): Extension<Arc<Shared>>,
    Caller(ctx): Caller,
    FhirJson(body): FhirJson,
) -> ApiResult<Response> {
    if !(is_facility_staff(&ctx) && ctx.principal.role.is_clinical()) {
        return Err(deny(
            &state,
            &ctx,
            "Immunization",
            "vaccinations are recorded by clinical staff acting for treatment".into(),
        )
        .await
        .into());
    }
    let patient = patient_id(&required_str(&body, "patient")?);
    let vaccine = required_str(&body, "vaccineCode")?;
    let dose = body
        .get("doseNumber")
        .and_then(Value::as_u64)
        .ok_or_else(|| {
            FhirError::invalid_element("doseNumber", "doseNumber is a positive integer")
        })?;
    let on = NaiveDate::parse_from_str(&required_str(&body, "occurrence")?, "%Y-%m-%d")
        .map_err(|_| FhirError::invalid_element("occurrence", "occurrence is YYYY-MM-DD"))?;
    if !crate::access::has_reception(&shared, &ctx.principal.org, &patient) {
        return Err(deny(
            &state,
            &ctx,
            "Immunization",
            format!("no live reception of Patient/{patient} at this facility; read the card (the voucher) first"),
        )
        .await
        .into());
    }
    let store = state.engine.store.clone();
    let (pt, vc) = (patient.clone(), vaccine.clone());
    let judged = blocking(move || {
        let vouchers = vouchers_of(&*store, &pt)?;
        let Some((_, v)) = vouchers
            .iter()
            .find(|(_, v)| v.vaccine == vc && v.dose == dose)
            .cloned()
        else {
            return Ok(Err(Refusal::NotEntitled));
        };
        let used = store
            .read("Immunization", &immunization_id(&v.id))?
            .is_some_and(|s| !s.deleted);
        let previous = if dose > 1 {
            vouchers
                .iter()
                .find(|(_, p)| p.vaccine == vc && p.dose == dose - 1)
                .map(|(_, p)| store.read("Immunization", &immunization_id(&p.id)))
                .transpose()?
                .flatten()
                .filter(|s| !s.deleted)
                .and_then(|s| s.resource)
                .and_then(|r| {
                    r.get("occurrenceDateTime")
                        .and_then(Value::as_str)
                        .map(str::to_string)
                })
                .and_then(|s| NaiveDate::parse_from_str(s.get(..10)?, "%Y-%m-%d").ok())
        } else {
            None
        };
        let answered = match &v.questionnaire {
            None => true,
            Some(qn) => questionnaire_responses(&*store, &pt)?.iter().any(|s| {
                s.resource.as_ref().is_some_and(|r| {
                    r.get("status").and_then(Value::as_str) == Some("completed")
                        && r.get("questionnaire")
                            .and_then(Value::as_str)
                            .is_some_and(|x| {
                                x == qn || x.rsplit('/').next() == qn.rsplit('/').next()
                            })
                })
            }),
        };
        Ok(judge(&v, on, previous, answered, used).map(|()| v))
    })
    .await?;
    let v = match judged {
        Ok(v) => v,
        Err(r) => {
            audit_action(
                &state,
                &ctx,
                "pmh-vaccination-refused",
                Some(patient.clone()),
                vec![],
            )
            .await?;
            return Err(r.to_error(&vaccine, dose).into());
        }
    };
    let mut imm = json!({
        "resourceType": "Immunization",
        "identifier": [{"system": ext("voucher"), "value": v.id}],
        "status": "completed",
        "vaccineCode": {"coding": [{"system": VACCINE_SYSTEM, "code": vaccine}]},
        "patient": {"reference": format!("Patient/{patient}")},
        "occurrenceDateTime": on.to_string(),
        "recorded": shared.now().to_rfc3339_opts(SecondsFormat::Secs, true),
        "performer": [{"actor": {"identifier": {"system": "http://jpfhir.jp/fhir/core/IdSystem/insurance-medical-institution-no", "value": ctx.principal.org}}}],
        "protocolApplied": [{
            "authority": {"identifier": {"system": LOCAL_GOVERNMENT_SYSTEM, "value": v.municipality}},
            "doseNumberPositiveInt": dose
        }]
    });
    if let Some(l) = body.get("lotNumber").and_then(Value::as_str) {
        imm["lotNumber"] = json!(l);
    }
    let id = immunization_id(&v.id);
    let w = state
        .engine
        .write(&ctx, move |work: &WriteWork, tx| {
            work.create_in(tx, "Immunization", &id, imm)
        })
        .await
        .map_err(|e| {
            if e.status == 409 {
                Refusal::AlreadyUsed.to_error(&vaccine, dose)
            } else {
                e
            }
        })?;
    Ok(fhir_json(
        StatusCode::CREATED,
        w.stored.resource.as_ref().unwrap_or(&Value::Null),
    ))
}

/// Largest page of the municipality-wide list.
const LIST_MAX_COUNT: usize = 1000;

/// `GET /pmh/vaccinations?patient=` (municipality): the vaccinations given on the
/// vouchers it issued to the patient, with the vouchers. Without `patient`: every
/// voucher the municipality issued, newest first, each followed by its
/// vaccination when given ([`municipality_list`]).
async fn municipality_view(
    State(state): State<AppState>,
    Query(q): Query<BTreeMap<String, String>>,
    Caller(ctx): Caller,
) -> ApiResult<Response> {
    let m = require_municipality(&state, &ctx, "vaccination records").await?;
    let Some(patient) = q.get("patient").map(|p| patient_id(p)) else {
        return municipality_list(state, q, ctx, m).await;
    };
    if patient.is_empty() {
        return Err(FhirError::invalid_element("patient", "patient must not be empty").into());
    }
    let store = state.engine.store.clone();
    let (pt, m2) = (patient.clone(), m.clone());
    let out = blocking(move || {
        let mut out = Vec::new();
        for (s, v) in vouchers_of(&*store, &pt)? {
            if v.municipality != m2 {
                continue;
            }
            let imm = store
                .read("Immunization", &immunization_id(&v.id))?
                .filter(|s| !s.deleted);
            out.push((s, imm));
        }
        Ok(out)
    })
    .await?;
    let refs: Vec<String> = out
        .iter()
        .flat_map(|(v, i)| std::iter::once(reference(v)).chain(i.iter().map(reference)))
        .collect();
    audit_action(&state, &ctx, "pmh-vaccination-view", Some(patient), refs).await?;
    Ok(searchset(
        out.into_iter()
            .flat_map(|(v, i)| std::iter::once(v).chain(i)),
    ))
}

/// The municipality-wide list (予防接種台帳 view): `vaccine` (code), `given`
/// (`true`: only vouchers used, `false`: only unused), `_count` (default 100, at
/// most 1000) and `_offset` page through the vouchers the municipality issued.
/// Each entry is a voucher followed by its Immunization when given; one audit
/// record per resident on the page.
async fn municipality_list(
    state: AppState,
    q: BTreeMap<String, String>,
    ctx: tsunagi_server::Ctx,
    municipality: String,
) -> ApiResult<Response> {
    for k in q.keys() {
        if !["vaccine", "given", "_count", "_offset"].contains(&k.as_str()) {
            return Err(FhirError::invalid_element(
                k,
                format!("unknown parameter '{k}' (vaccine, given, _count, _offset, or patient)"),
            )
            .into());
        }
    }
    let number = |k: &str, default: usize| -> FhirResult<usize> {
        match q.get(k) {
            None => Ok(default),
            Some(v) => v.parse().map_err(|_| {
                FhirError::invalid_element(k, format!("{k} must be a non-negative integer"))
            }),
        }
    };
    let count = number("_count", 100)?;
    if count == 0 || count > LIST_MAX_COUNT {
        return Err(FhirError::invalid_element(
            "_count",
            format!("_count must be between 1 and {LIST_MAX_COUNT}"),
        )
        .into());
    }
    let offset = number("_offset", 0)?;
    let given = match q.get("given").map(String::as_str) {
        None => None,
        Some("true") => Some(true),
        Some("false") => Some(false),
        Some(_) => {
            return Err(FhirError::invalid_element("given", "given must be true or false").into());
        }
    };
    let mut params = vec![("_sort".to_string(), "-_lastUpdated".to_string())];
    if let Some(v) = q.get("vaccine") {
        params.push(("vaccine-type".into(), v.clone()));
    }
    // `given` filters after reading the Immunization, so it pages over the
    // vouchers that pass it: read ahead in pages of vouchers until the page fills
    let store = state.engine.store.clone();
    let m = municipality.clone();
    let (page, total) = blocking(move || {
        let scope = Scope::AnyOf(vec![tsunagi_store::ScopeRule::AuthoredBy {
            org: m,
            types: Some(vec!["ImmunizationRecommendation".into()]),
        }]);
        let mut out = Vec::new();
        // without a filter the store pages; with one, every voucher is judged
        let (mut at, mut passed) = if given.is_none() {
            (offset, offset)
        } else {
            (0, 0)
        };
        let mut total = None;
        loop {
            let mut p = params.clone();
            p.push(("_count".into(), LIST_MAX_COUNT.to_string()));
            p.push(("_offset".into(), at.to_string()));
            let sq = query::parse("ImmunizationRecommendation", &p)?;
            let found = store.search(&sq, &scope)?;
            let n = found.matches.len();
            if given.is_none() {
                total = Some(found.total);
            }
            for s in found.matches {
                let Some(v) = Voucher::from_stored(&s) else {
                    continue;
                };
                let imm = store
                    .read("Immunization", &immunization_id(&v.id))?
                    .filter(|i| !i.deleted);
                if given.is_some_and(|g| g != imm.is_some()) {
                    continue;
                }
                passed += 1;
                if passed > offset && out.len() < count {
                    out.push((v.patient.clone(), s, imm));
                }
            }
            at += n;
            if n < LIST_MAX_COUNT {
                // every voucher judged: the filtered total is known
                total = total.or(Some(passed as u64));
                break;
            }
            if out.len() >= count {
                break;
            }
        }
        Ok((out, total))
    })
    .await?;
    // one audit record per resident shown
    let mut by_patient: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (p, v, i) in &page {
        let refs = by_patient.entry(p.clone()).or_default();
        refs.push(reference(v));
        refs.extend(i.iter().map(reference));
    }
    for (p, refs) in by_patient {
        audit_action(&state, &ctx, "pmh-vaccination-list", Some(p), refs).await?;
    }
    let entries: Vec<Value> = page
        .into_iter()
        .flat_map(|(_, v, i)| std::iter::once(v).chain(i))
        .filter_map(|s| s.resource)
        .map(|r| tsunagi_fhir::object([("resource", r)]))
        .collect();
    let mut bundle = tsunagi_fhir::object([
        ("resourceType", Value::from("Bundle")),
        ("type", Value::from("searchset")),
        ("entry", Value::Array(entries)),
    ]);
    // with `given`, the total is known only once every voucher was judged
    if let Some(t) = total {
        bundle["total"] = json!(t);
    }
    Ok(fhir_json(StatusCode::OK, &bundle))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(dose: u64) -> Voucher {
        Voucher {
            id: "v".into(),
            patient: "p".into(),
            municipality: "131016".into(),
            vaccine: "hpv".into(),
            dose,
            earliest: NaiveDate::from_ymd_opt(2026, 4, 1),
            latest: NaiveDate::from_ymd_opt(2027, 3, 31),
            min_interval_days: Some(28),
            questionnaire: Some("Questionnaire/q".into()),
        }
    }
    fn d(s: &str) -> NaiveDate {
        NaiveDate::parse_from_str(s, "%Y-%m-%d").unwrap()
    }

    #[test]
    fn refusals() {
        assert_eq!(judge(&v(1), d("2026-05-01"), None, true, false), Ok(()));
        assert_eq!(
            judge(&v(1), d("2027-04-01"), None, true, false),
            Err(Refusal::Expired(d("2027-03-31")))
        );
        assert_eq!(
            judge(&v(1), d("2026-03-01"), None, true, false),
            Err(Refusal::TooEarly(d("2026-04-01")))
        );
        assert_eq!(
            judge(&v(2), d("2026-05-10"), Some(d("2026-05-01")), true, false),
            Err(Refusal::IntervalNotMet {
                previous: d("2026-05-01"),
                next: d("2026-05-29")
            })
        );
        assert_eq!(
            judge(&v(2), d("2026-05-29"), Some(d("2026-05-01")), true, false),
            Ok(())
        );
        assert_eq!(
            judge(&v(2), d("2026-05-29"), None, true, false),
            Err(Refusal::PreviousDoseMissing)
        );
        assert_eq!(
            judge(&v(1), d("2026-05-01"), None, false, false),
            Err(Refusal::QuestionnaireMissing)
        );
        assert_eq!(
            judge(&v(1), d("2026-05-01"), None, true, true),
            Err(Refusal::AlreadyUsed)
        );
    }
}
