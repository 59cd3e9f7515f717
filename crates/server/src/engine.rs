//! The platform engine: FHIR interactions with authorisation and audit, independent
//! of HTTP. The REST handlers and every service module go through it, so no path
//! to a person's data skips the policy module or the audit trail.
//!
//! Flow of every interaction:
//! 1. the policy decides (deny by default); a denial is audited, then answered 403;
//! 2. the store runs the interaction (writes: in one transaction with their audit
//!    records, so a write and its audit record commit together or not at all);
//! 3. reads and searches are audited through the group-commit [`AuditSink`] and
//!    the data is returned only after the record is durable.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use serde_json::Value;
use tsunagi_fhir::index::{compartment_patient, is_personal_type};
use tsunagi_fhir::model::model;
use tsunagi_fhir::search::SearchQuery;
use tsunagi_fhir::{FhirError, FhirResult, query};
use tsunagi_policy::audit::{AuditRecord, AuditSink, Outcome};
use tsunagi_policy::identity::{Principal, Purpose};
use tsunagi_policy::policy::{AccessRequest, Decision, Operation, Policy};
use tsunagi_store::{
    HistoryQuery, LatestPer, Scope, SearchResult, Store, StoredResource, StoredText, TextPage,
    Transaction, WriteContext,
};

use crate::validate::{Validate, check_shape, gate};

/// Who is asking, why, and under which request id.
#[derive(Debug, Clone)]
pub struct Ctx {
    pub principal: Principal,
    pub purpose: Purpose,
    pub request_id: String,
}

impl Ctx {
    pub fn new(principal: Principal, purpose: Option<Purpose>) -> Self {
        let purpose = purpose.unwrap_or_else(|| principal.role.default_purpose());
        Ctx {
            principal,
            purpose,
            request_id: uuid::Uuid::new_v4().to_string(),
        }
    }

    fn write_context(&self) -> WriteContext {
        WriteContext {
            org: Some(self.principal.org.clone()),
            user: self.principal.user.clone(),
        }
    }
}

/// Result of a create or update.
#[derive(Debug, Clone)]
pub struct Written {
    pub stored: StoredResource,
    /// 201 Created (true) or 200 OK (false).
    pub created: bool,
}

/// Largest number of entries accepted in one Bundle.
pub const MAX_BUNDLE_ENTRIES: usize = 10_000;

/// The shared platform state.
pub struct Engine {
    pub store: Arc<dyn Store>,
    pub policy: Arc<Policy>,
    pub audit: AuditSink,
    pub validator: Arc<dyn Validate>,
    /// Public base URL of the FHIR endpoint (no trailing slash).
    pub base_url: String,
}

/// Runs blocking store work off the async runtime.
pub async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> FhirResult<T> + Send + 'static,
) -> FhirResult<T> {
    let started = std::time::Instant::now();
    let r = tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| FhirError::internal(format!("storage task failed: {e}")))?;
    record_store_time(started);
    r
}

fn record_store_time(started: std::time::Instant) {
    metrics::histogram!("tsunagi_store_seconds").record(started.elapsed().as_secs_f64());
}

pub fn check_type(resource_type: &str) -> FhirResult<()> {
    if model().is_resource_type(resource_type) {
        Ok(())
    } else {
        Err(FhirError::not_found(format!(
            "Unknown resource type '{resource_type}'"
        )))
    }
}

fn labels_of(s: &StoredResource) -> Vec<(String, String)> {
    s.resource
        .as_ref()
        .map(tsunagi_store::security_labels)
        .unwrap_or_default()
}

fn patient_of(s: &StoredResource) -> Option<String> {
    s.resource
        .as_ref()
        .and_then(|r| compartment_patient(&s.resource_type, r))
}

impl Engine {
    /// Audits a denial and returns the 403 to answer with.
    pub async fn deny(
        &self,
        ctx: &Ctx,
        action: Operation,
        patient: Option<String>,
        resources: Vec<String>,
        reason: String,
    ) -> FhirError {
        let rec = audit_record(
            ctx,
            action,
            patient,
            resources,
            Outcome::Denied,
            403,
            Some(reason.clone()),
        );
        if let Err(e) = self.audit.record(rec).await {
            return e;
        }
        FhirError::forbidden(reason)
    }

    /// Decides; on denial audits and returns the 403.
    pub async fn authorize(
        &self,
        ctx: &Ctx,
        op: Operation,
        resource_type: &str,
        patient: Option<String>,
        author_org: Option<String>,
        resources: Vec<String>,
    ) -> FhirResult<()> {
        self.authorize_labeled(
            ctx,
            op,
            resource_type,
            patient,
            author_org,
            Vec::new(),
            resources,
        )
        .await
    }

    /// [`Engine::authorize`] for a target carrying `meta.security` labels.
    #[allow(clippy::too_many_arguments)]
    pub async fn authorize_labeled(
        &self,
        ctx: &Ctx,
        op: Operation,
        resource_type: &str,
        patient: Option<String>,
        author_org: Option<String>,
        labels: Vec<(String, String)>,
        resources: Vec<String>,
    ) -> FhirResult<()> {
        let req =
            access_request(ctx, op, resource_type, patient.clone(), author_org).labels(labels);
        match self.policy.decide(&ctx.principal, &req) {
            Decision::Permit(_) => Ok(()),
            Decision::Deny(d) => Err(self.deny(ctx, op, patient, resources, d.reason).await),
        }
    }

    /// Audits a successful read of personal data: one record per patient touched.
    pub async fn audit_reads(
        &self,
        ctx: &Ctx,
        op: Operation,
        resources: &[&StoredResource],
    ) -> FhirResult<()> {
        let touched = resources.iter().map(|r| (patient_of(r), r.reference()));
        self.audit_touched(ctx, op, touched).await
    }

    /// [`Engine::audit_reads`] of `(patient, versioned reference)` pairs.
    async fn audit_touched(
        &self,
        ctx: &Ctx,
        op: Operation,
        touched: impl Iterator<Item = (Option<String>, String)>,
    ) -> FhirResult<()> {
        let mut by_patient: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for (patient, reference) in touched {
            if let Some(p) = patient {
                by_patient.entry(p).or_default().push(reference);
            }
        }
        if by_patient.is_empty() {
            return Ok(());
        }
        let recs = by_patient
            .into_iter()
            .map(|(p, refs)| audit_record(ctx, op, Some(p), refs, Outcome::Success, 200, None))
            .collect();
        self.audit.record_many(recs).await
    }

    /// The scope a caller searches under, or the audited 403.
    pub async fn scope(&self, ctx: &Ctx, resource_type: &str) -> FhirResult<Scope> {
        match self
            .policy
            .search_scope(&ctx.principal, resource_type, ctx.purpose)
        {
            Ok(s) => Ok(s),
            Err(d) => Err(self
                .deny(
                    ctx,
                    Operation::Search,
                    None,
                    vec![resource_type.to_string()],
                    d.reason,
                )
                .await),
        }
    }

    /// A read by id: the policy decides, the access is audited ([`Engine::read_text`]),
    /// and the body is parsed.
    pub async fn read(
        &self,
        ctx: &Ctx,
        resource_type: &str,
        id: &str,
    ) -> FhirResult<StoredResource> {
        self.read_text(ctx, resource_type, id)
            .await?
            .into_resource()
    }

    /// A read by id answering with the stored text, not parsed (the REST read
    /// serves it as it is). The policy decides on the store's patient and author
    /// columns and the text's labels; a read of personal data is audited.
    pub async fn read_text(
        &self,
        ctx: &Ctx,
        resource_type: &str,
        id: &str,
    ) -> FhirResult<StoredText> {
        check_type(resource_type)?;
        let found = if self.store.inline_point_reads() {
            let started = std::time::Instant::now();
            let r = self.store.read_text(resource_type, id);
            record_store_time(started);
            r?
        } else {
            let (store, rt, rid) = (
                self.store.clone(),
                resource_type.to_string(),
                id.to_string(),
            );
            blocking(move || store.read_text(&rt, &rid)).await?
        };
        let Some(found) = found else {
            return Err(FhirError::not_found(format!(
                "{resource_type}/{id} does not exist"
            )));
        };
        if found.deleted {
            return Err(FhirError::gone(format!("{resource_type}/{id} was deleted")));
        }
        let touched = found.reference();
        self.authorize_labeled(
            ctx,
            Operation::Read,
            resource_type,
            found.patient.clone(),
            found.author_org.clone(),
            found.security_labels()?,
            vec![touched.clone()],
        )
        .await?;
        let read = std::iter::once((found.patient.clone(), touched));
        self.audit_touched(ctx, Operation::Read, read).await?;
        Ok(found)
    }

    pub async fn vread(
        &self,
        ctx: &Ctx,
        resource_type: &str,
        id: &str,
        version: i64,
    ) -> FhirResult<StoredResource> {
        check_type(resource_type)?;
        let (store, rt, rid) = (
            self.store.clone(),
            resource_type.to_string(),
            id.to_string(),
        );
        let found = blocking(move || {
            let v = store.vread(&rt, &rid, version)?;
            // The current version decides who may see any version: access follows
            // the record as it stands, not as it once was.
            let cur = store.read(&rt, &rid)?;
            Ok((v, cur))
        })
        .await?;
        let (Some(v), Some(cur)) = found else {
            return Err(FhirError::not_found(format!(
                "{resource_type}/{id}/_history/{version} does not exist"
            )));
        };
        let patient = patient_of(&v).or_else(|| patient_of(&cur));
        let author = cur.author_org.clone().or(v.author_org.clone());
        self.authorize_labeled(
            ctx,
            Operation::Vread,
            resource_type,
            patient,
            author,
            labels_of(&cur),
            vec![v.reference()],
        )
        .await?;
        if v.deleted {
            return Err(FhirError::gone(format!(
                "{resource_type}/{id}/_history/{version} is a deletion"
            )));
        }
        self.audit_reads(ctx, Operation::Vread, &[&v]).await?;
        Ok(v)
    }

    pub async fn search(&self, ctx: &Ctx, query: SearchQuery) -> FhirResult<SearchResult> {
        self.scoped_search(ctx, query, |store, q, scope| store.search(q, scope))
            .await
    }

    /// [`Engine::search`] keeping only the newest matches per group
    /// ([`LatestPer`], like `$lastn`): same scope from the policy, applied inside
    /// SQL before the grouping; the returned resources are audited like a search.
    pub async fn search_latest(
        &self,
        ctx: &Ctx,
        query: SearchQuery,
        latest: LatestPer,
    ) -> FhirResult<SearchResult> {
        self.scoped_search(ctx, query, move |store, q, scope| {
            store.search_latest(q, scope, &latest)
        })
        .await
    }

    /// [`Engine::search`] answered with the page's stored texts, unparsed
    /// ([`Store::search_text`]): the same scope and the same audit records,
    /// the patient of each match taken from its `patient` column. Matches and
    /// total only (no `_include`, `_revinclude` or `_summary=count`).
    pub async fn search_text(&self, ctx: &Ctx, query: SearchQuery) -> FhirResult<TextPage> {
        check_type(&query.resource_type)?;
        let scope = self.scope(ctx, &query.resource_type).await?;
        let store = self.store.clone();
        let started = std::time::Instant::now();
        let page = blocking(move || store.search_text(&query, &scope)).await?;
        metrics::histogram!("tsunagi_search_seconds").record(started.elapsed().as_secs_f64());
        let touched = page
            .matches
            .iter()
            .map(|t| (t.patient.clone(), t.reference()));
        self.audit_touched(ctx, Operation::Search, touched).await?;
        Ok(page)
    }

    /// Runs `run` under the caller's scope from the policy and audits every
    /// resource it returns (matches and includes).
    async fn scoped_search(
        &self,
        ctx: &Ctx,
        query: SearchQuery,
        run: impl FnOnce(&dyn Store, &SearchQuery, &Scope) -> FhirResult<SearchResult> + Send + 'static,
    ) -> FhirResult<SearchResult> {
        check_type(&query.resource_type)?;
        let scope = self.scope(ctx, &query.resource_type).await?;
        let store = self.store.clone();
        let started = std::time::Instant::now();
        let result = blocking(move || run(&*store, &query, &scope)).await?;
        metrics::histogram!("tsunagi_search_seconds").record(started.elapsed().as_secs_f64());
        let touched: Vec<&StoredResource> = result
            .matches
            .iter()
            .chain(result.included.iter())
            .collect();
        self.audit_reads(ctx, Operation::Search, &touched).await?;
        Ok(result)
    }

    pub async fn everything(
        &self,
        ctx: &Ctx,
        patient_id: &str,
        count: usize,
        offset: usize,
    ) -> FhirResult<SearchResult> {
        let patient = self.read(ctx, "Patient", patient_id).await?;
        self.authorize(
            ctx,
            Operation::Everything,
            "Patient",
            Some(patient.id.clone()),
            patient.author_org.clone(),
            vec![patient.reference()],
        )
        .await?;
        let scope = self.scope(ctx, "Patient").await?;
        let (store, pid) = (self.store.clone(), patient_id.to_string());
        let result =
            blocking(move || store.patient_compartment(&pid, &scope, count, offset)).await?;
        let touched: Vec<&StoredResource> = result.matches.iter().collect();
        self.audit_reads(ctx, Operation::Everything, &touched)
            .await?;
        Ok(result)
    }

    /// Instance, type or system history. Type and system history of personal
    /// types are refused by the policy (the store's history is not scope-filtered);
    /// system history returns non-personal resources only.
    pub async fn history(&self, ctx: &Ctx, q: HistoryQuery) -> FhirResult<Vec<StoredResource>> {
        if let Some(rt) = &q.resource_type {
            check_type(rt)?;
        }
        let store = self.store.clone();
        let q2 = q.clone();
        let versions = blocking(move || store.history(&q2)).await?;
        match (&q.resource_type, &q.id) {
            (Some(rt), Some(id)) => {
                let Some(newest) = versions.first() else {
                    return Err(FhirError::not_found(format!("{rt}/{id} does not exist")));
                };
                let patient = versions.iter().find_map(patient_of);
                // every version's labels count: a relabelled record keeps its past
                let labels = versions.iter().flat_map(labels_of).collect();
                self.authorize_labeled(
                    ctx,
                    Operation::History,
                    rt,
                    patient,
                    newest.author_org.clone(),
                    labels,
                    vec![format!("{rt}/{id}")],
                )
                .await?;
                let touched: Vec<&StoredResource> =
                    versions.iter().filter(|v| v.resource.is_some()).collect();
                self.audit_reads(ctx, Operation::History, &touched).await?;
                Ok(versions)
            }
            (Some(rt), None) => {
                self.authorize(ctx, Operation::History, rt, None, None, vec![rt.clone()])
                    .await?;
                Ok(versions)
            }
            _ => Ok(versions
                .into_iter()
                .filter(|v| !is_personal_type(&v.resource_type))
                .collect()),
        }
    }

    /// Create. `if_none_exist` makes it conditional (FHIR conditional create):
    /// one match returns it unchanged, several are a 412.
    pub async fn create(
        &self,
        ctx: &Ctx,
        resource_type: &str,
        resource: Value,
        if_none_exist: Option<&str>,
    ) -> FhirResult<Written> {
        check_type(resource_type)?;
        check_shape(&resource, Some(resource_type))?;
        let (rt, condition) = (resource_type.to_string(), if_none_exist.map(str::to_string));
        self.write(ctx, move |work, tx| {
            if let Some(cond) = &condition {
                match work.find_in(tx, &rt, cond)? {
                    Err(d) => return Ok(Err(d)),
                    Ok(Some(stored)) => {
                        // Returning the existing resource discloses it: audited as a read.
                        let patient = patient_of(&stored);
                        work.audit_ok(tx, Operation::Read, &stored, patient)?;
                        return Ok(Ok(Written {
                            stored,
                            created: false,
                        }));
                    }
                    Ok(None) => {}
                }
            }
            let id = uuid::Uuid::new_v4().to_string();
            work.create_in(tx, &rt, &id, resource)
        })
        .await
    }

    /// Update (or update-as-create when absent). `if_match` is the expected current version.
    pub async fn update(
        &self,
        ctx: &Ctx,
        resource_type: &str,
        id: &str,
        resource: Value,
        if_match: Option<i64>,
    ) -> FhirResult<Written> {
        check_type(resource_type)?;
        check_shape(&resource, Some(resource_type))?;
        match resource.get("id").and_then(Value::as_str) {
            Some(body_id) if body_id == id => {}
            Some(body_id) => {
                return Err(FhirError::bad_request(
                    Some(&format!("{resource_type}.id")),
                    format!("id '{body_id}' in the body does not match '{id}' in the URL"),
                ));
            }
            None => {
                return Err(FhirError::bad_request(
                    Some(&format!("{resource_type}.id")),
                    "An update must carry the resource id in the body",
                ));
            }
        }
        let (rt, rid) = (resource_type.to_string(), id.to_string());
        self.write(ctx, move |work, tx| {
            work.update_in(tx, &rt, &rid, resource, if_match)
        })
        .await
    }

    /// Logical delete. Deleting what does not exist (or no longer exists) succeeds with None.
    pub async fn delete(
        &self,
        ctx: &Ctx,
        resource_type: &str,
        id: &str,
        if_match: Option<i64>,
    ) -> FhirResult<Option<StoredResource>> {
        check_type(resource_type)?;
        let (rt, rid) = (resource_type.to_string(), id.to_string());
        self.write(ctx, move |work, tx| work.delete_in(tx, &rt, &rid, if_match))
            .await
    }

    /// Runs one write in its own transaction, committed only when the policy
    /// permitted it; a denial rolls back and is audited.
    pub async fn write<T: Send + 'static>(
        &self,
        ctx: &Ctx,
        op: impl FnOnce(&WriteWork, &mut dyn Transaction) -> FhirResult<Result<T, Denied>>
        + Send
        + 'static,
    ) -> FhirResult<T> {
        let work = WriteWork::new(self, ctx);
        let out = blocking(move || {
            let mut tx = work.store.begin()?;
            let r = op(&work, &mut *tx)?;
            if r.is_ok() {
                tx.commit()?;
            }
            Ok(r)
        })
        .await?;
        self.finish(ctx, out).await
    }

    /// Turns a blocking write's outcome into the answer, auditing a denial.
    async fn finish<T>(&self, ctx: &Ctx, out: Result<T, Denied>) -> FhirResult<T> {
        match out {
            Ok(v) => Ok(v),
            Err(d) => Err(self.deny(ctx, d.op, d.patient, d.resources, d.reason).await),
        }
    }

    /// Processes a `transaction` (all-or-nothing) or `batch` Bundle.
    pub async fn bundle(&self, ctx: &Ctx, bundle: Value) -> FhirResult<Value> {
        crate::bundle::process(self, ctx, bundle).await
    }
}

/// A denial found inside a blocking write; audited by [`Engine::finish`].
#[derive(Debug)]
pub struct Denied {
    pub op: Operation,
    pub patient: Option<String>,
    pub resources: Vec<String>,
    pub reason: String,
}

/// What a blocking write closure needs: everything shared, cloned once.
#[derive(Clone)]
pub struct WriteWork {
    pub store: Arc<dyn Store>,
    pub policy: Arc<Policy>,
    pub validator: Arc<dyn Validate>,
    pub ctx: Ctx,
}

impl WriteWork {
    pub fn new(engine: &Engine, ctx: &Ctx) -> Self {
        WriteWork {
            store: engine.store.clone(),
            policy: engine.policy.clone(),
            validator: engine.validator.clone(),
            ctx: ctx.clone(),
        }
    }

    fn check(
        &self,
        op: Operation,
        rt: &str,
        patient: Option<String>,
        author: Option<String>,
        resources: Vec<String>,
    ) -> Result<(), Denied> {
        let req = access_request(&self.ctx, op, rt, patient.clone(), author);
        match self.policy.decide(&self.ctx.principal, &req) {
            Decision::Permit(_) => Ok(()),
            Decision::Deny(d) => Err(Denied {
                op,
                patient,
                resources,
                reason: d.reason,
            }),
        }
    }

    fn audit_ok(
        &self,
        tx: &mut dyn Transaction,
        op: Operation,
        stored: &StoredResource,
        patient: Option<String>,
    ) -> FhirResult<()> {
        let rec = audit_record(
            &self.ctx,
            op,
            patient,
            vec![stored.reference()],
            Outcome::Success,
            if op == Operation::Create { 201 } else { 200 },
            None,
        );
        tx.audit_append(&[rec.to_json()])?;
        Ok(())
    }

    /// Validates, authorises and creates inside `tx`, with its audit record.
    pub fn create_in(
        &self,
        tx: &mut dyn Transaction,
        rt: &str,
        id: &str,
        mut resource: Value,
    ) -> FhirResult<Result<Written, Denied>> {
        resource["id"] = Value::String(id.to_string());
        gate(&*self.validator, &resource)?;
        let patient = compartment_patient(rt, &resource);
        if let Err(d) = self.check(
            Operation::Create,
            rt,
            patient.clone(),
            None,
            vec![rt.to_string()],
        ) {
            return Ok(Err(d));
        }
        let stored = tx.create(rt, id, resource, &self.ctx.write_context())?;
        self.audit_ok(tx, Operation::Create, &stored, patient)?;
        Ok(Ok(Written {
            stored,
            created: true,
        }))
    }

    pub fn update_in(
        &self,
        tx: &mut dyn Transaction,
        rt: &str,
        id: &str,
        resource: Value,
        if_match: Option<i64>,
    ) -> FhirResult<Result<Written, Denied>> {
        gate(&*self.validator, &resource)?;
        let current = tx.read(rt, id)?;
        let new_patient = compartment_patient(rt, &resource);
        let live = current.as_ref().filter(|c| !c.deleted);
        let (op, author, old_patient) = match live {
            Some(c) => (Operation::Update, c.author_org.clone(), patient_of(c)),
            None => (Operation::Create, None, None),
        };
        let target = vec![format!("{rt}/{id}")];
        if let Err(d) = self.check(
            op,
            rt,
            old_patient.clone().or(new_patient.clone()),
            author.clone(),
            target.clone(),
        ) {
            return Ok(Err(d));
        }
        // Moving a record to another patient needs the right to write for that patient too.
        if old_patient.is_some()
            && new_patient != old_patient
            && let Err(d) = self.check(op, rt, new_patient.clone(), author, target)
        {
            return Ok(Err(d));
        }
        let (stored, created) = tx.update(rt, id, resource, if_match, &self.ctx.write_context())?;
        self.audit_ok(
            tx,
            if created {
                Operation::Create
            } else {
                Operation::Update
            },
            &stored,
            new_patient,
        )?;
        Ok(Ok(Written { stored, created }))
    }

    pub fn delete_in(
        &self,
        tx: &mut dyn Transaction,
        rt: &str,
        id: &str,
        if_match: Option<i64>,
    ) -> FhirResult<Result<Option<StoredResource>, Denied>> {
        let current = tx.read(rt, id)?;
        let Some(current) = current.filter(|c| !c.deleted) else {
            if if_match.is_some() {
                return Err(FhirError::precondition_failed(format!(
                    "{rt}/{id} does not exist; If-Match cannot hold"
                )));
            }
            return Ok(Ok(None));
        };
        let patient = patient_of(&current);
        if let Err(d) = self.check(
            Operation::Delete,
            rt,
            patient.clone(),
            current.author_org.clone(),
            vec![current.reference()],
        ) {
            return Ok(Err(d));
        }
        let deleted = tx.delete(rt, id, if_match, &self.ctx.write_context())?;
        if let Some(d) = &deleted {
            self.audit_ok(tx, Operation::Delete, d, patient)?;
        }
        Ok(Ok(deleted))
    }

    /// Authorised read inside a transaction (Bundle GET entries).
    pub fn read_in(
        &self,
        tx: &mut dyn Transaction,
        rt: &str,
        id: &str,
    ) -> FhirResult<Result<StoredResource, Denied>> {
        let found = tx
            .read(rt, id)?
            .ok_or_else(|| FhirError::not_found(format!("{rt}/{id} does not exist")))?;
        if found.deleted {
            return Err(FhirError::gone(format!("{rt}/{id} was deleted")));
        }
        let patient = patient_of(&found);
        let req = access_request(
            &self.ctx,
            Operation::Read,
            rt,
            patient.clone(),
            found.author_org.clone(),
        )
        .labels(labels_of(&found));
        if let Decision::Deny(d) = self.policy.decide(&self.ctx.principal, &req) {
            return Ok(Err(Denied {
                op: Operation::Read,
                patient,
                resources: vec![found.reference()],
                reason: d.reason,
            }));
        }
        if patient.is_some() {
            let rec = audit_record(
                &self.ctx,
                Operation::Read,
                patient,
                vec![found.reference()],
                Outcome::Success,
                200,
                None,
            );
            tx.audit_append(&[rec.to_json()])?;
        }
        Ok(Ok(found))
    }

    /// Conditional-create lookup inside a transaction, within the caller's scope.
    pub fn find_in(
        &self,
        tx: &mut dyn Transaction,
        rt: &str,
        condition: &str,
    ) -> FhirResult<Result<Option<StoredResource>, Denied>> {
        let q = parse_condition(rt, condition)?;
        let scope = match self
            .policy
            .search_scope(&self.ctx.principal, rt, self.ctx.purpose)
        {
            Ok(s) => s,
            Err(d) => {
                return Ok(Err(Denied {
                    op: Operation::Search,
                    patient: None,
                    resources: vec![rt.to_string()],
                    reason: d.reason,
                }));
            }
        };
        let found = tx.search(&q, &scope)?;
        match found.total {
            0 => Ok(Ok(None)),
            1 => Ok(Ok(found.matches.into_iter().next())),
            n => Err(FhirError::precondition_failed(format!(
                "the If-None-Exist condition matched {n} resources; it must match at most one"
            ))),
        }
    }
}

/// Parses a conditional-operation query string (`identifier=sys|123&...`).
pub fn parse_condition(resource_type: &str, condition: &str) -> FhirResult<SearchQuery> {
    let pairs: Vec<(String, String)> =
        form_urlencoded::parse(condition.trim_start_matches('?').as_bytes())
            .into_owned()
            .collect();
    if pairs.is_empty() {
        return Err(FhirError::bad_request(
            None,
            "The condition of a conditional operation is empty",
        ));
    }
    let mut q = query::parse(resource_type, &pairs)?;
    q.count = 2;
    Ok(q)
}

fn access_request(
    ctx: &Ctx,
    op: Operation,
    rt: &str,
    patient: Option<String>,
    author: Option<String>,
) -> AccessRequest {
    let mut req = AccessRequest::new(op, rt, ctx.purpose);
    req.patient = patient;
    req.author_org = author;
    req
}

/// Builds the audit record of one interaction.
pub fn audit_record(
    ctx: &Ctx,
    action: Operation,
    patient: Option<String>,
    resources: Vec<String>,
    outcome: Outcome,
    status: u16,
    reason: Option<String>,
) -> AuditRecord {
    AuditRecord {
        patient,
        resources,
        outcome,
        status,
        reason,
        ..AuditRecord::new(
            &ctx.principal,
            ctx.purpose,
            action.as_str(),
            ctx.request_id.clone(),
        )
    }
}

/// Maps a fullUrl or reference to what it was rewritten to inside a transaction.
pub type ReferenceMap = HashMap<String, String>;
