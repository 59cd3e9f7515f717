//! Audit records and the group-commit writer that stores them.
//!
//! Every read, search, write and denial touching a person's data produces an
//! [`AuditRecord`]; the server hands it to the [`AuditSink`] and returns data only
//! after `record` resolved, i.e. after the record is durably in the hash-chained
//! log (the store chains it). A record that cannot be stored fails the request.

use std::sync::Arc;

use chrono::{DateTime, SecondsFormat, Utc};
use serde_json::{Value, json};
use tokio::sync::{mpsc, oneshot};
use tsunagi_fhir::FhirError;
use tsunagi_store::Store;

use crate::identity::{Principal, Purpose};
use crate::policy::Denial;

/// How a request ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Success,
    /// Refused by the policy (403) or authentication (401).
    Denied,
    Error,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Success => "success",
            Outcome::Denied => "denied",
            Outcome::Error => "error",
        }
    }
}

/// One audit record. Serialised by [`AuditRecord::to_json`]; the store indexes its
/// top-level `patient`, `org`, `user` and `purpose` strings for auditors' queries.
#[derive(Debug, Clone, PartialEq)]
pub struct AuditRecord {
    pub time: DateTime<Utc>,
    /// Organisation code of the caller (None when unauthenticated).
    pub org: Option<String>,
    pub user: Option<String>,
    pub role: Option<String>,
    pub purpose: Option<Purpose>,
    /// What was attempted: an [`crate::policy::Operation`] name, or e.g. `token`.
    pub action: String,
    /// Patient whose data was touched. A request touching several patients is
    /// recorded once per patient ([`AuditRecord::per_patient`]).
    pub patient: Option<String>,
    /// References touched, `Type/id` or `Type/id/_history/n`.
    pub resources: Vec<String>,
    pub outcome: Outcome,
    /// HTTP status returned.
    pub status: u16,
    /// Denial or error reason.
    pub reason: Option<String>,
    pub request_id: String,
}

impl AuditRecord {
    /// A successful (200) action by `principal`; adjust with the `with_*` methods.
    pub fn new(
        principal: &Principal,
        purpose: Purpose,
        action: impl Into<String>,
        request_id: impl Into<String>,
    ) -> Self {
        AuditRecord {
            time: Utc::now(),
            org: Some(principal.org.clone()),
            user: principal.user.clone(),
            role: Some(principal.role.as_str().to_string()),
            purpose: Some(purpose),
            action: action.into(),
            patient: None,
            resources: Vec::new(),
            outcome: Outcome::Success,
            status: 200,
            reason: None,
            request_id: request_id.into(),
        }
    }

    /// An action by an unauthenticated caller (e.g. a rejected token).
    pub fn anonymous(action: impl Into<String>, request_id: impl Into<String>) -> Self {
        AuditRecord {
            time: Utc::now(),
            org: None,
            user: None,
            role: None,
            purpose: None,
            action: action.into(),
            patient: None,
            resources: Vec::new(),
            outcome: Outcome::Denied,
            status: 401,
            reason: None,
            request_id: request_id.into(),
        }
    }

    pub fn with_patient(mut self, patient: Option<String>) -> Self {
        self.patient = patient;
        self
    }

    pub fn with_resources(mut self, resources: Vec<String>) -> Self {
        self.resources = resources;
        self
    }

    /// Marks success with the given status (200, 201, ...).
    pub fn success(mut self, status: u16) -> Self {
        self.outcome = Outcome::Success;
        self.status = status;
        self.reason = None;
        self
    }

    /// Marks a policy denial (403) with its reason.
    pub fn denied(mut self, denial: &Denial) -> Self {
        self.outcome = Outcome::Denied;
        self.status = 403;
        self.purpose = Some(denial.purpose);
        self.reason = Some(denial.reason.clone());
        self
    }

    /// Marks a failure from an error: 401/403 count as denials, everything else as errors.
    pub fn failed(mut self, error: &FhirError) -> Self {
        self.outcome = if matches!(error.status, 401 | 403) {
            Outcome::Denied
        } else {
            Outcome::Error
        };
        self.status = error.status;
        self.reason = error.issues.first().map(|i| i.message.clone());
        self
    }

    /// Splits a record over the patients touched: `touched` pairs each resource
    /// reference with its compartment owner. One record per patient (first-seen
    /// order), resources grouped under it; resources of no patient go into a record
    /// without patient. Nothing touched gives the record unchanged.
    pub fn per_patient(self, touched: &[(Option<String>, String)]) -> Vec<AuditRecord> {
        if touched.is_empty() {
            return vec![self];
        }
        let mut groups: Vec<(Option<String>, Vec<String>)> = Vec::new();
        for (patient, reference) in touched {
            match groups.iter_mut().find(|(p, _)| p == patient) {
                Some((_, refs)) => refs.push(reference.clone()),
                None => groups.push((patient.clone(), vec![reference.clone()])),
            }
        }
        groups
            .into_iter()
            .map(|(patient, resources)| AuditRecord {
                patient,
                resources,
                ..self.clone()
            })
            .collect()
    }

    pub fn to_json(&self) -> Value {
        json!({
            "time": self.time.to_rfc3339_opts(SecondsFormat::Millis, true),
            "org": self.org,
            "user": self.user,
            "role": self.role,
            "purpose": self.purpose.map(Purpose::as_str),
            "action": self.action,
            "patient": self.patient,
            "resources": self.resources,
            "outcome": self.outcome.as_str(),
            "status": self.status,
            "reason": self.reason,
            "request_id": self.request_id,
        })
    }
}

/// Most records written in one `audit_append` call.
const MAX_BATCH: usize = 1000;
/// Requests that may wait for the writer before callers are held back.
const QUEUE: usize = 8192;

struct Job {
    records: Vec<Value>,
    done: oneshot::Sender<Result<(), FhirError>>,
}

/// Group-commit audit writer. Records from concurrent requests that arrive while an
/// append is in flight are written together by the next `store.audit_append` call
/// (run on the blocking pool), in arrival order; each caller is answered once its
/// batch is stored. Cheap to clone.
#[derive(Clone)]
pub struct AuditSink {
    tx: mpsc::Sender<Job>,
}

fn unavailable() -> FhirError {
    FhirError::unavailable(
        "the audit trail could not be written, so the request was not completed; retry later",
    )
}

impl AuditSink {
    /// Starts the writer task on the current tokio runtime. It ends when every
    /// clone of the sink has been dropped and the queue is drained.
    pub fn spawn(store: Arc<dyn Store>) -> AuditSink {
        let (tx, rx) = mpsc::channel(QUEUE);
        tokio::spawn(run(store, rx));
        AuditSink { tx }
    }

    /// Stores one record; resolves after it is durably appended. Errors with 503
    /// when it could not be.
    pub async fn record(&self, record: AuditRecord) -> Result<(), FhirError> {
        self.submit(vec![record.to_json()]).await
    }

    /// Stores several records, contiguous and in order, in one batch.
    pub async fn record_many(&self, records: Vec<AuditRecord>) -> Result<(), FhirError> {
        if records.is_empty() {
            return Ok(());
        }
        self.submit(records.iter().map(AuditRecord::to_json).collect())
            .await
    }

    async fn submit(&self, records: Vec<Value>) -> Result<(), FhirError> {
        let (done, wait) = oneshot::channel();
        self.tx.send(Job { records, done }).await.map_err(|_| {
            tracing::error!("audit writer is not running");
            unavailable()
        })?;
        wait.await.map_err(|_| {
            tracing::error!("audit writer stopped before answering");
            unavailable()
        })?
    }
}

async fn run(store: Arc<dyn Store>, mut rx: mpsc::Receiver<Job>) {
    while let Some(first) = rx.recv().await {
        let mut count = first.records.len();
        let mut jobs = vec![first];
        while count < MAX_BATCH {
            match rx.try_recv() {
                Ok(job) => {
                    count += job.records.len();
                    jobs.push(job);
                }
                Err(_) => break,
            }
        }
        let mut batch = Vec::with_capacity(count);
        let mut waiters = Vec::with_capacity(jobs.len());
        for job in jobs {
            batch.extend(job.records);
            waiters.push(job.done);
        }
        let s = store.clone();
        let result = match tokio::task::spawn_blocking(move || s.audit_append(&batch)).await {
            Ok(Ok(entries)) if entries.len() == count => Ok(()),
            Ok(Ok(entries)) => {
                tracing::error!(
                    expected = count,
                    got = entries.len(),
                    "audit append stored a different number of records"
                );
                Err(unavailable())
            }
            Ok(Err(e)) => {
                tracing::error!(error = %e, records = count, "audit append failed");
                Err(unavailable())
            }
            Err(e) => {
                tracing::error!(error = %e, "audit append task failed");
                Err(unavailable())
            }
        };
        for w in waiters {
            // a caller that went away no longer needs the answer
            let _ = w.send(result.clone());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::{OrgKind, Role};
    use crate::testutil::FakeStore;
    use std::sync::atomic::Ordering;

    fn doctor() -> Principal {
        Principal {
            org: "1311234567".into(),
            org_kind: OrgKind::Hospital,
            org_flags: vec![],
            role: Role::Doctor,
            user: Some("dr-sato".into()),
            patient: None,
            second_factor: false,
            token_id: "t1".into(),
        }
    }

    fn rec(n: usize) -> AuditRecord {
        AuditRecord::new(&doctor(), Purpose::Treatment, "read", format!("req-{n}"))
    }

    fn request_ids(store: &FakeStore) -> Vec<String> {
        store
            .audit
            .lock()
            .unwrap()
            .iter()
            .map(|r| r["request_id"].as_str().unwrap().to_string())
            .collect()
    }

    #[test]
    fn record_json_shape() {
        let r = rec(1)
            .with_patient(Some("p1".into()))
            .with_resources(vec!["Observation/o1/_history/2".into()]);
        let j = r.to_json();
        assert_eq!(j["org"], "1311234567");
        assert_eq!(j["user"], "dr-sato");
        assert_eq!(j["role"], "doctor");
        assert_eq!(j["purpose"], "treatment");
        assert_eq!(j["patient"], "p1");
        assert_eq!(j["resources"][0], "Observation/o1/_history/2");
        assert_eq!(j["outcome"], "success");
        assert_eq!(j["status"], 200);
        assert!(j["reason"].is_null());
        assert!(j["time"].as_str().unwrap().ends_with('Z'));

        let denial = Denial {
            purpose: Purpose::Emergency,
            rule: "core",
            reason: "nope".into(),
        };
        let j = rec(2).denied(&denial).to_json();
        assert_eq!(
            (j["outcome"].as_str(), j["status"].as_u64()),
            (Some("denied"), Some(403))
        );
        assert_eq!(j["purpose"], "emergency");
        assert_eq!(j["reason"], "nope");
        let j = rec(3)
            .failed(&FhirError::not_found("Observation/x is not known"))
            .to_json();
        assert_eq!(
            (j["outcome"].as_str(), j["status"].as_u64()),
            (Some("error"), Some(404))
        );
        let j = AuditRecord::anonymous("read", "r")
            .failed(&FhirError::unauthorized("expired"))
            .to_json();
        assert_eq!(j["outcome"], "denied");
        assert!(j["org"].is_null());
    }

    #[test]
    fn per_patient_splits_and_groups() {
        let touched = vec![
            (Some("p1".to_string()), "Observation/a".to_string()),
            (Some("p2".to_string()), "Observation/b".to_string()),
            (None, "Practitioner/x".to_string()),
            (Some("p1".to_string()), "Condition/c".to_string()),
        ];
        let out = rec(1).per_patient(&touched);
        assert_eq!(out.len(), 3);
        assert_eq!(out[0].patient.as_deref(), Some("p1"));
        assert_eq!(out[0].resources, vec!["Observation/a", "Condition/c"]);
        assert_eq!(out[1].patient.as_deref(), Some("p2"));
        assert_eq!(out[2].patient, None);
        assert!(out.iter().all(|r| r.request_id == "req-1"));
        assert_eq!(rec(1).per_patient(&[]).len(), 1);
    }

    #[tokio::test]
    async fn concurrent_records_are_batched_in_order() {
        let store = Arc::new(FakeStore::default());
        let sink = AuditSink::spawn(store.clone());
        // join! polls its futures in order, so they are queued 0..5 before the
        // writer (on this single-threaded runtime) gets to run
        let (a, b, c, d, e) = tokio::join!(
            sink.record(rec(0)),
            sink.record(rec(1)),
            sink.record_many(vec![rec(2), rec(3)]),
            sink.record(rec(4)),
            sink.record(rec(5)),
        );
        for r in [a, b, c, d, e] {
            r.unwrap();
        }
        assert_eq!(
            request_ids(&store),
            ["req-0", "req-1", "req-2", "req-3", "req-4", "req-5"]
        );
        assert_eq!(
            *store.batches.lock().unwrap(),
            vec![6],
            "expected one group commit"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn many_concurrent_requests_all_stored() {
        let store = Arc::new(FakeStore::default());
        store.append_delay_ms.store(5, Ordering::SeqCst);
        let sink = AuditSink::spawn(store.clone());
        let mut tasks = tokio::task::JoinSet::new();
        for i in 0..200 {
            let sink = sink.clone();
            tasks.spawn(async move {
                // each task's own records must stay in order
                sink.record(rec(i)).await.unwrap();
                sink.record(rec(1000 + i)).await.unwrap();
            });
        }
        while let Some(r) = tasks.join_next().await {
            r.unwrap();
        }
        let ids = request_ids(&store);
        assert_eq!(ids.len(), 400);
        for i in 0..200 {
            let first = ids.iter().position(|x| *x == format!("req-{i}")).unwrap();
            let second = ids
                .iter()
                .position(|x| *x == format!("req-{}", 1000 + i))
                .unwrap();
            assert!(first < second);
        }
        let batches = store.batches.lock().unwrap();
        assert_eq!(batches.iter().sum::<usize>(), 400);
        assert!(
            batches.len() < 400,
            "no batching happened: {} appends",
            batches.len()
        );
    }

    #[tokio::test]
    async fn append_failure_fails_every_waiter_and_sink_recovers() {
        let store = Arc::new(FakeStore::default());
        store.fail_appends.store(true, Ordering::SeqCst);
        let sink = AuditSink::spawn(store.clone());
        let (a, b) = tokio::join!(sink.record(rec(0)), sink.record_many(vec![rec(1), rec(2)]));
        for r in [a, b] {
            let e = r.unwrap_err();
            assert_eq!(e.status, 503);
            assert!(e.to_string().contains("audit trail"));
        }
        assert!(store.audit.lock().unwrap().is_empty());
        store.fail_appends.store(false, Ordering::SeqCst);
        sink.record(rec(3)).await.unwrap();
        assert_eq!(request_ids(&store), ["req-3"]);
        // empty record_many does not touch the store
        sink.record_many(vec![]).await.unwrap();
        assert_eq!(store.batches.lock().unwrap().len(), 1);
    }
}
