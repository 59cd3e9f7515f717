//! The research-side HTTP service: catalogue, applications and review (one-stop
//! window), the public register, project workspaces, queries, output checking.
//!
//! | method, path | who | what |
//! |---|---|---|
//! | GET /research/catalog | anyone authenticated | datasets, tables, columns, meaning, coverage, rows |
//! | POST /research/applications | researcher | submit; screened for marketing; fees itemised |
//! | GET /research/applications[/{id}] | reviewer, checker, operator: all; researcher: own org | applications |
//! | POST /research/applications/{id}/decisions | reviewer (not of the applicant org) | approve, approve-with-conditions, reject, with reason |
//! | POST /research/applications/{id}/changes | researcher of the applicant org | change request: re-enters review, workspace suspended |
//! | GET /research/register | anyone authenticated | the public register of approved uses |
//! | POST /research/projects/{id}/queries | researcher of the applicant org | aggregate query → disclosure-controlled output, pending check |
//! | GET /research/outputs/{id} | checker; researcher of the project (values only once released) | an output |
//! | POST /research/outputs/{id}/decision | checker (not the analyst) | release or reject, with reason |
//! | GET /research/audit | operator | the research audit trail |
//!
//! There is no endpoint returning row-level data: query results exist only as
//! disclosure-controlled aggregates. Every request, refusals included, is audited.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use axum::extract::{Path as UrlPath, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tsunagi_fhir::FhirError;

use crate::accounts::{Account, Accounts, Role};
use crate::audit::AuditLog;
use crate::config::Config;
use crate::sdc;
use crate::workspace::{self, QuerySpec, Scope, WsError};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Form {
    /// 仮名加工医療情報: pseudonymised, clinical values kept.
    Pseudonymised,
    /// 匿名加工医療情報: anonymised (dates coarsened/shifted, k-anonymity checked).
    Anonymised,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AppStatus {
    UnderReview,
    Approved,
    ApprovedWithConditions,
    Rejected,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Fees {
    pub basic: u64,
    pub coordination: u64,
    pub data: u64,
    pub cloud: u64,
    pub total: u64,
    pub currency: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Decision {
    pub revision: u32,
    /// `user@org` of the reviewer, or `screening` for the automatic check.
    pub by: String,
    pub decision: String,
    pub reason: String,
    #[serde(default)]
    pub conditions: Vec<String>,
    #[serde(default)]
    pub anonymised_suffices: bool,
    pub at: DateTime<Utc>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Application {
    pub id: String,
    pub revision: u32,
    pub status: AppStatus,
    pub org: String,
    pub user: String,
    pub title: String,
    pub purpose: String,
    pub category: String,
    pub form: Form,
    pub scope: Scope,
    pub analysis_plan: String,
    pub software: Vec<String>,
    pub months: u32,
    pub fees: Fees,
    pub decisions: Vec<Decision>,
    /// Earlier revisions (before change requests), oldest first.
    pub previous: Vec<Value>,
    pub submitted_at: DateTime<Utc>,
    pub approved_at: Option<DateTime<Utc>>,
    /// Row counts of the workspace, when one is open.
    pub workspace: Option<BTreeMap<String, u64>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OutputStatus {
    PendingCheck,
    Released,
    Rejected,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Output {
    pub id: String,
    pub project: String,
    pub revision: u32,
    pub analyst: String,
    pub query: QuerySpec,
    pub unit: String,
    pub status: OutputStatus,
    pub table: Value,
    pub created: DateTime<Utc>,
    pub checked_by: Option<String>,
    pub check_reason: Option<String>,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct State2 {
    applications: BTreeMap<String, Application>,
    outputs: BTreeMap<String, Output>,
    next_app: u64,
    next_output: u64,
}

/// The research side: its own data directory, accounts and audit trail.
pub struct Research {
    pub dir: PathBuf,
    pub config: Config,
    pub accounts: Accounts,
    pub audit: AuditLog,
    state: Mutex<State2>,
    /// Serialises state-changing requests (each then saves the state).
    write: tokio::sync::Mutex<()>,
}

type Res<T> = Result<T, FhirError>;

impl Research {
    pub fn open(dir: &Path) -> anyhow::Result<Arc<Research>> {
        std::fs::create_dir_all(dir.join("datasets"))?;
        std::fs::create_dir_all(dir.join("workspaces"))?;
        let state_path = dir.join("state.json");
        let state = if state_path.exists() {
            serde_json::from_slice(&std::fs::read(&state_path)?)?
        } else {
            State2::default()
        };
        Ok(Arc::new(Research {
            config: Config::load(dir)?,
            accounts: Accounts::open(dir)?,
            audit: AuditLog::open(&dir.join("audit.jsonl"))?,
            dir: dir.to_path_buf(),
            state: Mutex::new(state),
            write: tokio::sync::Mutex::new(()),
        }))
    }

    fn save(&self) -> Res<()> {
        let st = self
            .state
            .lock()
            .map_err(|_| FhirError::internal("state lock"))?;
        let bytes =
            serde_json::to_vec_pretty(&*st).map_err(|e| FhirError::internal(e.to_string()))?;
        let tmp = self.dir.join("state.json.tmp");
        std::fs::write(&tmp, bytes)
            .and_then(|_| std::fs::rename(&tmp, self.dir.join("state.json")))
            .map_err(|e| FhirError::internal(format!("saving state: {e}")))
    }

    fn record(
        &self,
        who: Option<&Account>,
        action: &str,
        target: Option<&str>,
        status: u16,
        detail: Value,
    ) -> Res<()> {
        let rec = json!({
            "user": who.map(|a| a.user.clone()),
            "org": who.map(|a| a.org.clone()),
            "role": who.map(|a| a.role),
            "action": action,
            "target": target,
            "outcome": if status < 400 { "success" } else if status == 401 || status == 403 { "denied" } else { "error" },
            "status": status,
            "detail": detail,
        });
        self.audit
            .append(rec)
            .map(|_| ())
            .map_err(|e| FhirError::unavailable(format!("audit trail unavailable: {e}")))
    }

    pub fn dataset_dir(&self, dataset: &str) -> PathBuf {
        self.dir.join("datasets").join(dataset)
    }

    /// Manifests of every published dataset (directories without `.partial`).
    pub fn manifests(&self) -> Vec<Value> {
        let mut out = Vec::new();
        if let Ok(rd) = std::fs::read_dir(self.dir.join("datasets")) {
            for e in rd.flatten() {
                let p = e.path().join("manifest.json");
                if let Ok(b) = std::fs::read(&p)
                    && let Ok(v) = serde_json::from_slice::<Value>(&b)
                {
                    out.push(v);
                }
            }
        }
        out.sort_by(|a, b| a["dataset"].as_str().cmp(&b["dataset"].as_str()));
        out
    }

    fn manifest(&self, dataset: &str) -> Option<Value> {
        self.manifests()
            .into_iter()
            .find(|m| m["dataset"] == dataset)
    }

    fn fees(&self, scope: &Scope, months: u32, manifest: &Value) -> Fees {
        let f = &self.config.fees;
        let rows: u64 = scope
            .tables
            .keys()
            .map(|t| {
                manifest["tables"]
                    .as_array()
                    .and_then(|ts| ts.iter().find(|x| x["name"] == t.as_str()))
                    .and_then(|x| x["rows"].as_u64())
                    .unwrap_or(0)
            })
            .sum();
        let basic = f.basic;
        let coordination = f.coordination_per_dataset;
        let data = f.data_per_table * scope.tables.len() as u64
            + f.data_per_million_rows * rows.div_ceil(1_000_000);
        let cloud = f.cloud_per_month * months as u64;
        Fees {
            basic,
            coordination,
            data,
            cloud,
            total: basic + coordination + data + cloud,
            currency: "JPY".into(),
        }
    }

    fn screen(&self, title: &str, purpose: &str) -> Option<String> {
        let text = format!("{title}\n{purpose}").to_lowercase();
        self.config
            .marketing_terms
            .iter()
            .find(|t| text.contains(&t.to_lowercase()))
            .map(|t| format!("advertising and marketing are not permitted purposes of secondary use (the purpose mentions '{t}')"))
    }
}

pub fn router(r: Arc<Research>) -> Router {
    Router::new()
        .route("/research/catalog", get(catalog))
        .route("/research/applications", post(submit).get(list))
        .route("/research/applications/{id}", get(read_app))
        .route("/research/applications/{id}/decisions", post(decide))
        .route("/research/applications/{id}/changes", post(change))
        .route("/research/register", get(register))
        .route("/research/projects/{id}/queries", post(query))
        .route("/research/outputs/{id}", get(read_output))
        .route("/research/outputs/{id}/decision", post(check_output))
        .route("/research/audit", get(audit_list))
        .with_state(r)
}

/// A response: JSON body, or an OperationOutcome.
pub struct Reply(Response);

impl IntoResponse for Reply {
    fn into_response(self) -> Response {
        self.0
    }
}

fn ok(status: StatusCode, v: Value) -> Reply {
    Reply((status, Json(v)).into_response())
}

fn fail(e: &FhirError) -> Reply {
    let status = StatusCode::from_u16(e.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    Reply(
        (
            status,
            [(header::CONTENT_TYPE, "application/fhir+json")],
            Json(e.to_outcome()),
        )
            .into_response(),
    )
}

/// Runs a handler body with authentication and one audit record for the outcome
/// (the body's own detail on success, the error on failure).
async fn handle<F, Fut>(
    r: &Research,
    headers: &HeaderMap,
    action: &str,
    target: Option<&str>,
    f: F,
) -> Reply
where
    F: FnOnce(Account) -> Fut,
    Fut: std::future::Future<Output = Res<(StatusCode, Value, Value)>>,
{
    let who = headers
        .get(header::AUTHORIZATION)
        .and_then(|h| h.to_str().ok())
        .and_then(|h| h.strip_prefix("Bearer "))
        .and_then(|t| r.accounts.verify(t));
    let Some(who) = who else {
        let e = FhirError::unauthorized("Authorization: Bearer <research token> is required");
        if let Err(a) = r.record(None, action, target, 401, json!({"reason": msg(&e)})) {
            return fail(&a);
        }
        return fail(&e);
    };
    match f(who.clone()).await {
        Ok((status, body, detail)) => {
            match r.record(Some(&who), action, target, status.as_u16(), detail) {
                Ok(()) => ok(status, body),
                Err(a) => fail(&a),
            }
        }
        Err(e) => match r.record(
            Some(&who),
            action,
            target,
            e.status,
            json!({"reason": msg(&e)}),
        ) {
            Ok(()) => fail(&e),
            Err(a) => fail(&a),
        },
    }
}

/// The first issue's text of an error (for audit records).
fn msg(e: &FhirError) -> String {
    e.issues
        .first()
        .map(|i| i.message.clone())
        .unwrap_or_default()
}

fn need(who: &Account, roles: &[Role]) -> Res<()> {
    if roles.contains(&who.role) {
        Ok(())
    } else {
        Err(FhirError::forbidden(format!(
            "role {:?} may not do this",
            who.role
        )))
    }
}

fn parse<T: serde::de::DeserializeOwned>(body: &Bytes) -> Res<T> {
    serde_json::from_slice(body)
        .map_err(|e| FhirError::bad_request(None, format!("invalid body: {e}")))
}

fn ws_err(e: WsError) -> FhirError {
    match e {
        WsError::Invalid(field, msg) => FhirError::bad_request(Some(&field), msg),
        WsError::Internal(msg) => FhirError::internal(msg),
    }
}

async fn catalog(State(r): State<Arc<Research>>, headers: HeaderMap) -> Reply {
    handle(&r, &headers, "catalog-read", None, |_who| async {
        let datasets: Vec<Value> = r
            .manifests()
            .into_iter()
            .map(|m| {
                json!({
                    "dataset": m["dataset"], "form": m["form"], "extractedAt": m["extractedAt"],
                    "persons": m["persons"], "optOutSnapshot": m["optOutSnapshot"]["id"],
                    "tables": m["tables"].as_array().map(|ts| ts.iter().map(|t| json!({
                        "name": t["name"], "meaning": t["meaning"], "rows": t["rows"],
                        "coverage": t["coverage"], "columns": t["columns"],
                    })).collect::<Vec<_>>()),
                })
            })
            .collect();
        Ok((StatusCode::OK, json!({"datasets": datasets}), Value::Null))
    })
    .await
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Submission {
    title: String,
    purpose: String,
    category: String,
    form: Form,
    scope: Scope,
    analysis_plan: String,
    #[serde(default)]
    software: Vec<String>,
    #[serde(default = "twelve")]
    months: u32,
}

fn twelve() -> u32 {
    12
}

impl Research {
    fn check_submission(&self, s: &Submission) -> Res<Value> {
        for (field, v) in [
            ("title", &s.title),
            ("purpose", &s.purpose),
            ("analysisPlan", &s.analysis_plan),
        ] {
            if v.trim().is_empty() {
                return Err(FhirError::bad_request(
                    Some(field),
                    format!("'{field}' is required"),
                ));
            }
        }
        if !self.config.categories.iter().any(|c| c.code == s.category) {
            return Err(FhirError::bad_request(
                Some("category"),
                format!(
                    "the purpose must be one of the public-interest categories: {}",
                    self.config
                        .categories
                        .iter()
                        .map(|c| c.code.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            ));
        }
        if s.months == 0 || s.months > 60 {
            return Err(FhirError::bad_request(Some("months"), "1 to 60 months"));
        }
        let m = self.manifest(&s.scope.dataset).ok_or_else(|| {
            FhirError::bad_request(Some("scope.dataset"), "no such dataset in the catalogue")
        })?;
        workspace::check_scope(&s.scope, &m).map_err(ws_err)?;
        Ok(m)
    }
}

async fn submit(State(r): State<Arc<Research>>, headers: HeaderMap, body: Bytes) -> Reply {
    let rr = r.clone();
    handle(&r, &headers, "application-submit", None, |who| async move {
        need(&who, &[Role::Researcher])?;
        let s: Submission = parse(&body)?;
        let m = rr.check_submission(&s)?;
        let _w = rr.write.lock().await;
        let now = Utc::now();
        let app = {
            let mut st = rr
                .state
                .lock()
                .map_err(|_| FhirError::internal("state lock"))?;
            st.next_app += 1;
            let id = format!("APP-{:04}", st.next_app);
            let mut app = Application {
                id: id.clone(),
                revision: 1,
                status: AppStatus::UnderReview,
                org: who.org.clone(),
                user: who.user.clone(),
                fees: rr.fees(&s.scope, s.months, &m),
                title: s.title,
                purpose: s.purpose,
                category: s.category,
                form: s.form,
                scope: s.scope,
                analysis_plan: s.analysis_plan,
                software: s.software,
                months: s.months,
                decisions: vec![],
                previous: vec![],
                submitted_at: now,
                approved_at: None,
                workspace: None,
            };
            if let Some(reason) = rr.screen(&app.title, &app.purpose) {
                app.status = AppStatus::Rejected;
                app.decisions.push(Decision {
                    revision: 1,
                    by: "screening".into(),
                    decision: "reject".into(),
                    reason,
                    conditions: vec![],
                    anonymised_suffices: false,
                    at: now,
                });
            }
            st.applications.insert(id, app.clone());
            app
        };
        rr.save()?;
        let detail = json!({"application": app.id, "status": app.status, "fees": app.fees});
        Ok((
            StatusCode::CREATED,
            serde_json::to_value(&app).unwrap_or_default(),
            detail,
        ))
    })
    .await
}

fn visible(who: &Account, app: &Application) -> bool {
    who.role != Role::Researcher || who.org == app.org
}

async fn list(State(r): State<Arc<Research>>, headers: HeaderMap) -> Reply {
    let rr = r.clone();
    handle(&r, &headers, "application-list", None, |who| async move {
        let st = rr
            .state
            .lock()
            .map_err(|_| FhirError::internal("state lock"))?;
        let apps: Vec<&Application> = st
            .applications
            .values()
            .filter(|a| visible(&who, a))
            .collect();
        Ok((StatusCode::OK, json!({"applications": apps}), Value::Null))
    })
    .await
}

fn get_app(r: &Research, who: &Account, id: &str) -> Res<Application> {
    let st = r
        .state
        .lock()
        .map_err(|_| FhirError::internal("state lock"))?;
    match st.applications.get(id) {
        Some(a) if visible(who, a) => Ok(a.clone()),
        // Not revealing other organisations' applications.
        _ => Err(FhirError::not_found(format!("no application {id}"))),
    }
}

async fn read_app(
    State(r): State<Arc<Research>>,
    headers: HeaderMap,
    UrlPath(id): UrlPath<String>,
) -> Reply {
    let (rr, id2) = (r.clone(), id.clone());
    handle(
        &r,
        &headers,
        "application-read",
        Some(&id),
        |who| async move {
            let app = get_app(&rr, &who, &id2)?;
            Ok((
                StatusCode::OK,
                serde_json::to_value(&app).unwrap_or_default(),
                Value::Null,
            ))
        },
    )
    .await
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct DecisionIn {
    decision: String,
    reason: String,
    #[serde(default)]
    conditions: Vec<String>,
    /// The reviewer finds the purpose achievable with anonymised data.
    #[serde(default)]
    anonymised_suffices: bool,
}

async fn decide(
    State(r): State<Arc<Research>>,
    headers: HeaderMap,
    UrlPath(id): UrlPath<String>,
    body: Bytes,
) -> Reply {
    let rr = r.clone();
    let id2 = id.clone();
    handle(&r, &headers, "application-decision", Some(&id), |who| async move {
        let (r, id) = (rr, id2);
        need(&who, &[Role::Reviewer])?;
        let d: DecisionIn = parse(&body)?;
        if !["approve", "approve-with-conditions", "reject"].contains(&d.decision.as_str()) {
            return Err(FhirError::bad_request(Some("decision"), "approve, approve-with-conditions or reject"));
        }
        if d.reason.trim().is_empty() {
            return Err(FhirError::bad_request(Some("reason"), "every decision needs a reason"));
        }
        if d.decision == "approve-with-conditions" && d.conditions.is_empty() {
            return Err(FhirError::bad_request(Some("conditions"), "name the conditions"));
        }
        let _w = r.write.lock().await;
        let mut app = get_app(&r, &who, &id)?;
        if app.org == who.org {
            return Err(FhirError::forbidden("a reviewer may not decide an application of their own organisation"));
        }
        if app.status != AppStatus::UnderReview {
            return Err(FhirError::conflict(format!("{id} revision {} is already decided", app.revision)));
        }
        let mut decision = d.decision.clone();
        let mut reason = d.reason.clone();
        if d.anonymised_suffices && app.form == Form::Pseudonymised && decision != "reject" {
            decision = "reject".into();
            reason = format!("pseudonymised data was requested for a purpose achievable with anonymised data; {reason}");
        }
        let now = Utc::now();
        app.decisions.push(Decision {
            revision: app.revision,
            by: format!("{}@{}", who.user, who.org),
            decision: decision.clone(),
            reason,
            conditions: d.conditions.clone(),
            anonymised_suffices: d.anonymised_suffices,
            at: now,
        });
        app.status = match decision.as_str() {
            "approve" => AppStatus::Approved,
            "approve-with-conditions" => AppStatus::ApprovedWithConditions,
            _ => AppStatus::Rejected,
        };
        if app.status != AppStatus::Rejected {
            app.approved_at = Some(now);
            let m = r
                .manifest(&app.scope.dataset)
                .ok_or_else(|| FhirError::conflict("the dataset is no longer in the catalogue"))?;
            let rows = crate::anonymise::open_workspace(&r, &app, &m).await?;
            app.workspace = Some(rows);
        }
        r.state
            .lock()
            .map_err(|_| FhirError::internal("state lock"))?
            .applications
            .insert(id.clone(), app.clone());
        r.save()?;
        let detail = json!({"decision": decision, "revision": app.revision, "status": app.status, "workspace": app.workspace});
        Ok((StatusCode::OK, serde_json::to_value(&app).unwrap_or_default(), detail))
    })
    .await
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct ChangeIn {
    reason: String,
    #[serde(default)]
    purpose: Option<String>,
    #[serde(default)]
    scope: Option<Scope>,
    #[serde(default)]
    analysis_plan: Option<String>,
    #[serde(default)]
    software: Option<Vec<String>>,
    #[serde(default)]
    months: Option<u32>,
    #[serde(default)]
    form: Option<Form>,
}

async fn change(
    State(r): State<Arc<Research>>,
    headers: HeaderMap,
    UrlPath(id): UrlPath<String>,
    body: Bytes,
) -> Reply {
    let rr = r.clone();
    let id2 = id.clone();
    handle(
        &r,
        &headers,
        "application-change",
        Some(&id),
        |who| async move {
            let (r, id) = (rr, id2);
            need(&who, &[Role::Researcher])?;
            let c: ChangeIn = parse(&body)?;
            if c.reason.trim().is_empty() {
                return Err(FhirError::bad_request(
                    Some("reason"),
                    "a change request needs a reason",
                ));
            }
            let _w = r.write.lock().await;
            let mut app = get_app(&r, &who, &id)?;
            if !matches!(
                app.status,
                AppStatus::Approved | AppStatus::ApprovedWithConditions
            ) {
                return Err(FhirError::conflict(
                    "only an approved application can be changed",
                ));
            }
            let mut prev = serde_json::to_value(&app).unwrap_or_default();
            if let Some(o) = prev.as_object_mut() {
                o.remove("previous");
            }
            let next = Submission {
                title: app.title.clone(),
                purpose: c.purpose.unwrap_or(app.purpose.clone()),
                category: app.category.clone(),
                form: c.form.unwrap_or(app.form),
                scope: c.scope.unwrap_or(app.scope.clone()),
                analysis_plan: c.analysis_plan.unwrap_or(app.analysis_plan.clone()),
                software: c.software.unwrap_or(app.software.clone()),
                months: c.months.unwrap_or(app.months),
            };
            let m = r.check_submission(&next)?;
            app.previous.push(prev);
            app.revision += 1;
            app.fees = r.fees(&next.scope, next.months, &m);
            (
                app.purpose,
                app.form,
                app.scope,
                app.analysis_plan,
                app.software,
                app.months,
            ) = (
                next.purpose,
                next.form,
                next.scope,
                next.analysis_plan,
                next.software,
                next.months,
            );
            // Back to review; the workspace is closed until a new approval.
            app.status = AppStatus::UnderReview;
            app.workspace = None;
            let ws = workspace::dir(&r.dir, &app.id);
            if ws.exists() {
                std::fs::remove_dir_all(&ws).map_err(|e| FhirError::internal(e.to_string()))?;
            }
            if let Some(reason) = r.screen(&app.title, &app.purpose) {
                app.status = AppStatus::Rejected;
                app.decisions.push(Decision {
                    revision: app.revision,
                    by: "screening".into(),
                    decision: "reject".into(),
                    reason,
                    conditions: vec![],
                    anonymised_suffices: false,
                    at: Utc::now(),
                });
            }
            r.state
                .lock()
                .map_err(|_| FhirError::internal("state lock"))?
                .applications
                .insert(id.clone(), app.clone());
            r.save()?;
            let detail =
                json!({"revision": app.revision, "reason": c.reason, "status": app.status});
            Ok((
                StatusCode::OK,
                serde_json::to_value(&app).unwrap_or_default(),
                detail,
            ))
        },
    )
    .await
}

async fn register(State(r): State<Arc<Research>>, headers: HeaderMap) -> Reply {
    handle(&r, &headers, "register-read", None, |_who| async {
        let st = r
            .state
            .lock()
            .map_err(|_| FhirError::internal("state lock"))?;
        let uses: Vec<Value> = st
            .applications
            .values()
            .filter(|a| {
                matches!(
                    a.status,
                    AppStatus::Approved | AppStatus::ApprovedWithConditions
                )
            })
            .map(|a| {
                let last = a.decisions.last();
                json!({
                    "id": a.id, "revision": a.revision, "title": a.title, "organisation": a.org,
                    "category": a.category, "purpose": a.purpose, "form": a.form,
                    "dataset": a.scope.dataset, "tables": a.scope.tables.keys().collect::<Vec<_>>(),
                    "period": a.scope.period, "approvedAt": a.approved_at,
                    "conditions": last.map(|d| d.conditions.clone()).unwrap_or_default(),
                })
            })
            .collect();
        Ok((StatusCode::OK, json!({"approvedUses": uses}), Value::Null))
    })
    .await
}

async fn query(
    State(r): State<Arc<Research>>,
    headers: HeaderMap,
    UrlPath(id): UrlPath<String>,
    body: Bytes,
) -> Reply {
    let rr = r.clone();
    let id2 = id.clone();
    handle(&r, &headers, "query", Some(&id), |who| async move {
        let (r, id) = (rr, id2);
        need(&who, &[Role::Researcher])?;
        let q: QuerySpec = parse(&body)?;
        let app = get_app(&r, &who, &id)?;
        if app.workspace.is_none() {
            return Err(FhirError::conflict(format!("{id} has no open workspace (status {:?})", app.status)));
        }
        // The query text is audited before it runs, whatever its outcome.
        r.record(Some(&who), "query-submitted", Some(&id), 102, serde_json::to_value(&q).unwrap_or_default())?;
        let ctx = workspace::session(&workspace::dir(&r.dir, &id)).await.map_err(ws_err)?;
        let agg = workspace::aggregate(&ctx, &q).await.map_err(ws_err)?;
        let protected = sdc::protect(&agg.dims, &agg.measures, agg.cells, r.config.min_cell_count)
            .map_err(|e| FhirError::bad_request(Some("groupBy"), e))?;
        let _w = r.write.lock().await;
        let out = {
            let mut st = r.state.lock().map_err(|_| FhirError::internal("state lock"))?;
            st.next_output += 1;
            let out = Output {
                id: format!("OUT-{:05}", st.next_output),
                project: id.clone(),
                revision: app.revision,
                analyst: format!("{}@{}", who.user, who.org),
                query: q.clone(),
                unit: agg.unit.into(),
                status: OutputStatus::PendingCheck,
                table: serde_json::to_value(&protected).unwrap_or_default(),
                created: Utc::now(),
                checked_by: None,
                check_reason: None,
            };
            st.outputs.insert(out.id.clone(), out.clone());
            out
        };
        r.save()?;
        let summary = json!({
            "id": out.id, "project": id, "status": out.status, "unit": out.unit,
            "rows": protected.rows.len(), "suppressed": {"primary": protected.primary, "secondary": protected.secondary},
        });
        let mut detail = summary.clone();
        detail["query"] = serde_json::to_value(&q).unwrap_or_default();
        Ok((StatusCode::ACCEPTED, summary, detail))
    })
    .await
}

fn get_output(r: &Research, id: &str) -> Res<Output> {
    let st = r
        .state
        .lock()
        .map_err(|_| FhirError::internal("state lock"))?;
    st.outputs
        .get(id)
        .cloned()
        .ok_or_else(|| FhirError::not_found(format!("no output {id}")))
}

async fn read_output(
    State(r): State<Arc<Research>>,
    headers: HeaderMap,
    UrlPath(id): UrlPath<String>,
) -> Reply {
    let (rr, id2) = (r.clone(), id.clone());
    handle(&r, &headers, "output-read", Some(&id), |who| async move {
        let (r, id) = (rr, id2);
        let out = get_output(&r, &id)?;
        let mut v = serde_json::to_value(&out).unwrap_or_default();
        match who.role {
            Role::Checker => {}
            Role::Researcher => {
                // Only the project's own organisation (else 404).
                get_app(&r, &who, &out.project)?;
                if out.status != OutputStatus::Released {
                    // Not released: the analyst sees the status only.
                    if let Some(o) = v.as_object_mut() {
                        o.remove("table");
                    }
                }
            }
            _ => {
                return Err(FhirError::forbidden(
                    "outputs are for the project's analysts and the output checkers",
                ));
            }
        }
        Ok((StatusCode::OK, v, json!({"status": out.status})))
    })
    .await
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CheckIn {
    decision: String,
    reason: String,
}

async fn check_output(
    State(r): State<Arc<Research>>,
    headers: HeaderMap,
    UrlPath(id): UrlPath<String>,
    body: Bytes,
) -> Reply {
    let rr = r.clone();
    let id2 = id.clone();
    handle(&r, &headers, "output-check", Some(&id), |who| async move {
        let (r, id) = (rr, id2);
        need(&who, &[Role::Checker])?;
        let c: CheckIn = parse(&body)?;
        let status = match c.decision.as_str() {
            "release" => OutputStatus::Released,
            "reject" => OutputStatus::Rejected,
            _ => {
                return Err(FhirError::bad_request(
                    Some("decision"),
                    "release or reject",
                ));
            }
        };
        if c.reason.trim().is_empty() {
            return Err(FhirError::bad_request(Some("reason"), "give a reason"));
        }
        let _w = r.write.lock().await;
        let mut out = get_output(&r, &id)?;
        if out.analyst == format!("{}@{}", who.user, who.org) {
            return Err(FhirError::forbidden(
                "an analyst may not check their own output",
            ));
        }
        if out.status != OutputStatus::PendingCheck {
            return Err(FhirError::conflict(format!("{id} was already checked")));
        }
        out.status = status;
        out.checked_by = Some(format!("{}@{}", who.user, who.org));
        out.check_reason = Some(c.reason.clone());
        r.state
            .lock()
            .map_err(|_| FhirError::internal("state lock"))?
            .outputs
            .insert(id.clone(), out.clone());
        r.save()?;
        Ok((
            StatusCode::OK,
            json!({"id": id, "status": status}),
            json!({"decision": c.decision, "reason": c.reason}),
        ))
    })
    .await
}

async fn audit_list(State(r): State<Arc<Research>>, headers: HeaderMap) -> Reply {
    let rr = r.clone();
    handle(&r, &headers, "audit-read", None, |who| async move {
        need(&who, &[Role::Operator])?;
        let recs = rr
            .audit
            .records(|_| true)
            .map_err(|e| FhirError::internal(e.to_string()))?;
        Ok((StatusCode::OK, json!({"records": recs}), Value::Null))
    })
    .await
}
