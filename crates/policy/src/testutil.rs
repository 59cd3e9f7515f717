//! In-memory fake [`Store`] for unit tests: client keys and an audit log, nothing else.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use serde_json::Value;
use tsunagi_fhir::search::SearchQuery;
use tsunagi_fhir::{FhirError, FhirResult};
use tsunagi_store::*;

#[derive(Default)]
pub struct FakeStore {
    pub keys: Mutex<Vec<ClientKey>>,
    pub audit: Mutex<Vec<Value>>,
    /// Sizes of the batches `audit_append` received, in order.
    pub batches: Mutex<Vec<usize>>,
    pub fail_appends: AtomicBool,
    pub append_delay_ms: AtomicUsize,
}

fn unsupported<T>() -> FhirResult<T> {
    Err(FhirError::internal("not supported by the fake store"))
}

impl Store for FakeStore {
    fn backend(&self) -> &'static str {
        "fake"
    }
    fn begin(&self) -> FhirResult<Box<dyn Transaction + '_>> {
        unsupported()
    }
    fn read(&self, _: &str, _: &str) -> FhirResult<Option<StoredResource>> {
        unsupported()
    }
    fn read_text(&self, _: &str, _: &str) -> FhirResult<Option<StoredText>> {
        unsupported()
    }
    fn vread(&self, _: &str, _: &str, _: i64) -> FhirResult<Option<StoredResource>> {
        unsupported()
    }
    fn history(&self, _: &HistoryQuery) -> FhirResult<Vec<StoredResource>> {
        unsupported()
    }
    fn search(&self, _: &SearchQuery, _: &Scope) -> FhirResult<SearchResult> {
        unsupported()
    }
    fn search_ids(&self, _: &SearchQuery, _: &Scope) -> FhirResult<Vec<String>> {
        unsupported()
    }
    fn search_text(&self, _: &SearchQuery, _: &Scope) -> FhirResult<TextPage> {
        unsupported()
    }
    fn search_latest(&self, _: &SearchQuery, _: &Scope, _: &LatestPer) -> FhirResult<SearchResult> {
        unsupported()
    }
    fn scan(&self, _: &str, _: Option<&str>, _: usize) -> FhirResult<Vec<StoredResource>> {
        unsupported()
    }
    fn patient_compartment(
        &self,
        _: &str,
        _: &Scope,
        _: usize,
        _: usize,
    ) -> FhirResult<SearchResult> {
        unsupported()
    }
    fn audit_append(&self, records: &[Value]) -> FhirResult<Vec<AuditEntry>> {
        let delay = self.append_delay_ms.load(Ordering::SeqCst);
        if delay > 0 {
            std::thread::sleep(Duration::from_millis(delay as u64));
        }
        if self.fail_appends.load(Ordering::SeqCst) {
            return Err(FhirError::internal("disk full"));
        }
        self.batches.lock().unwrap().push(records.len());
        let mut log = self.audit.lock().unwrap();
        let mut out = Vec::new();
        for r in records {
            log.push(r.clone());
            out.push(AuditEntry {
                seq: log.len() as i64,
                recorded: chrono::Utc::now(),
                record: r.clone(),
                prev_hash: String::new(),
                hash: String::new(),
            });
        }
        Ok(out)
    }
    fn audit_scan(&self, _: i64, _: usize) -> FhirResult<Vec<AuditEntry>> {
        unsupported()
    }
    fn audit_query(&self, _: &AuditFilter) -> FhirResult<Vec<AuditEntry>> {
        unsupported()
    }
    fn put_client_key(&self, key: &ClientKey) -> FhirResult<()> {
        let mut keys = self.keys.lock().unwrap();
        keys.retain(|k| !(k.client_id == key.client_id && k.kid == key.kid));
        keys.push(key.clone());
        Ok(())
    }
    fn client_keys(&self, client_id: &str) -> FhirResult<Vec<ClientKey>> {
        Ok(self
            .keys
            .lock()
            .unwrap()
            .iter()
            .filter(|k| k.client_id == client_id)
            .cloned()
            .collect())
    }
    fn schema_version(&self) -> FhirResult<i64> {
        Ok(0)
    }
    fn size_bytes(&self) -> FhirResult<u64> {
        Ok(0)
    }
}
