//! The storage interface. Both backends implement [`Store`]; the conformance suite
//! in [`crate::conformance`] runs unchanged against each.
//!
//! Invariants every backend keeps:
//! - every write is a new version row (`version` 1, 2, ...); nothing is overwritten;
//!   a delete is a version with `deleted = true` and no body;
//! - search indexes and the `patient`/`author_org` columns always describe the
//!   current version only, and change in the same transaction as the version row;
//! - a [`Transaction`] dropped without `commit` rolls back; nothing is visible before commit;
//! - the audit log is append-only and hash-chained; the head only moves forward.

use chrono::{DateTime, Utc};
use serde_json::Value;
use tsunagi_fhir::{FhirResult, search::SearchQuery};

/// One stored version of a resource.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredResource {
    pub resource_type: String,
    pub id: String,
    pub version: i64,
    pub last_updated: DateTime<Utc>,
    pub deleted: bool,
    /// The resource with `id`, `meta.versionId` and `meta.lastUpdated` set; None for a delete.
    pub resource: Option<Value>,
    /// Organisation code (医療機関等コード etc.) of whoever wrote this version.
    pub author_org: Option<String>,
}

impl StoredResource {
    /// `Type/id/_history/version`: how audit records name this version.
    pub fn reference(&self) -> String {
        versioned_reference(&self.resource_type, &self.id, self.version)
    }
}

fn versioned_reference(resource_type: &str, id: &str, version: i64) -> String {
    format!("{resource_type}/{id}/_history/{version}")
}

/// The current version of a resource as stored, its body not parsed: what a
/// read answers with, without a parse and a re-serialisation (the stored text is
/// the stamped body as `serde_json` writes it, byte for byte).
#[derive(Debug, Clone, PartialEq)]
pub struct StoredText {
    pub resource_type: String,
    pub id: String,
    pub version: i64,
    pub last_updated: DateTime<Utc>,
    pub deleted: bool,
    /// The stored JSON; None for a delete.
    pub text: Option<String>,
    /// The patient whose compartment holds the resource, as indexed when it was
    /// written (the `patient` column, which compartment searches use too).
    pub patient: Option<String>,
    /// Organisation code of whoever wrote this version.
    pub author_org: Option<String>,
}

impl StoredText {
    /// `Type/id/_history/version`, as [`StoredResource::reference`].
    pub fn reference(&self) -> String {
        versioned_reference(&self.resource_type, &self.id, self.version)
    }

    /// The `meta.security` labels. The text is parsed only when it names
    /// `"security"` somewhere: a body without that key has no labels (the text is
    /// `serde_json`'s, which writes every key unescaped, so the key cannot hide).
    pub fn security_labels(&self) -> tsunagi_fhir::FhirResult<Vec<(String, String)>> {
        match &self.text {
            Some(t) if t.contains("\"security\"") => {
                Ok(security_labels(&crate::engine::parse_text(t)?))
            }
            _ => Ok(Vec::new()),
        }
    }

    /// The body parsed: the [`StoredResource`] [`Store::read`] returns.
    pub fn into_resource(self) -> tsunagi_fhir::FhirResult<StoredResource> {
        Ok(StoredResource {
            resource: crate::engine::parse_body(self.text)?,
            resource_type: self.resource_type,
            id: self.id,
            version: self.version,
            last_updated: self.last_updated,
            deleted: self.deleted,
            author_org: self.author_org,
        })
    }
}

/// The outcome of [`Transaction::put`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Written {
    pub version: i64,
    pub last_updated: DateTime<Utc>,
    /// Whether the write created the resource (or re-created a deleted one).
    pub created: bool,
}

/// What a store is opened for.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Workload {
    /// A server.
    #[default]
    Online,
    /// An operator's bulk file load (`tsunagi import`, `pmh import`, `coverage
    /// import`). The embedded database defers its log checkpoints while loading;
    /// both backends finish the load when the store is dropped: SQLite copies its
    /// log into the database file, PostgreSQL refreshes the planner's statistics
    /// of the store's tables (`ANALYZE`) after a load of 10,000 resources or more,
    /// without which a search right after a large load was planned on stale row
    /// counts (measured: 86 ms instead of 0.3 ms for a patient's observations of
    /// one code).
    BulkLoad,
}

/// Who performs a write; recorded on the version row.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct WriteContext {
    pub org: Option<String>,
    pub user: Option<String>,
}

/// Row-level restriction a caller's search runs under. The store applies it inside
/// the query, so counts, pages and includes never reveal rows outside it.
#[derive(Debug, Clone, PartialEq)]
pub enum Scope {
    /// Operator tools and internal services only.
    Unrestricted,
    /// A row is visible when any rule admits it. An empty list admits nothing.
    AnyOf(Vec<ScopeRule>),
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ScopeRule {
    /// Resources in no patient's compartment (Organization, Practitioner, CodeSystem, ...).
    NonPersonal,
    /// Resources in this patient's compartment, optionally only these types.
    Patient {
        id: String,
        types: Option<Vec<String>>,
    },
    /// Resources whose current version was written by this organisation,
    /// optionally only these types (a clerk's own records are not all clinical).
    AuthoredBy {
        org: String,
        types: Option<Vec<String>>,
    },
    /// Rows the inner rule admits that also pass the security-label filter
    /// (`meta.security`, indexed by the store as `_security` tokens). Lets a
    /// rule distinguish resources of one type by the information they carry
    /// (an infection Observation under consent category A, a lab one under B).
    Labeled {
        rule: Box<ScopeRule>,
        filter: LabelFilter,
    },
    /// Resources of any patient carrying the security label `system|code`,
    /// optionally only these types (e.g. a referral letter labelled with its
    /// addressee institution).
    Label {
        system: String,
        code: String,
        types: Option<Vec<String>>,
    },
}

/// A filter on the `meta.security` labels of one code system.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct LabelFilter {
    pub system: String,
    /// When set, a row carrying a label of `system` passes only with one of
    /// these codes.
    pub allow: Option<Vec<String>>,
    /// Rows carrying any of these codes of `system` are excluded.
    pub deny: Vec<String>,
    /// Whether rows carrying no label of `system` pass.
    pub unlabelled: bool,
}

impl LabelFilter {
    /// Whether a resource with these `meta.security` labels passes.
    pub fn admits(&self, labels: &[(String, String)]) -> bool {
        let mine: Vec<&str> = labels
            .iter()
            .filter(|(s, _)| *s == self.system)
            .map(|(_, c)| c.as_str())
            .collect();
        if mine.iter().any(|c| self.deny.iter().any(|d| d == c)) {
            return false;
        }
        if mine.is_empty() {
            return self.unlabelled;
        }
        match &self.allow {
            Some(allow) => mine.iter().any(|c| allow.iter().any(|a| a == c)),
            None => true,
        }
    }
}

/// `(system, code)` of every `meta.security` coding of a resource.
pub fn security_labels(resource: &Value) -> Vec<(String, String)> {
    resource
        .pointer("/meta/security")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|c| {
            Some((
                c.get("system")?.as_str()?.to_string(),
                c.get("code")?.as_str()?.to_string(),
            ))
        })
        .collect()
}

/// Keeps, of a search's matches, the newest `per` of each group (like FHIR
/// `Observation/$lastn`): a group is one `system|code` of the token parameter
/// `param` (a resource with several codes is in each of their groups), newest
/// by the start of date parameter `by` (a resource without one comes last),
/// then by last update. The scope and every clause of the search apply before
/// the grouping, inside SQL.
#[derive(Debug, Clone, PartialEq)]
pub struct LatestPer {
    pub param: String,
    pub by: String,
    pub per: usize,
}

/// `_history` request.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct HistoryQuery {
    pub resource_type: Option<String>,
    pub id: Option<String>,
    pub since: Option<DateTime<Utc>>,
    pub count: usize,
    pub offset: usize,
}

/// Result of a search.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SearchResult {
    /// Total matches (ignoring paging).
    pub total: u64,
    /// The page of matches, in order.
    pub matches: Vec<StoredResource>,
    /// `_include` / `_revinclude` results (within the same scope), deduplicated.
    pub included: Vec<StoredResource>,
}

/// A page of a search's matches as their stored texts ([`Store::search_text`]).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TextPage {
    /// Total matches (ignoring paging), as [`SearchResult::total`].
    pub total: u64,
    /// The page of matches, in order.
    pub matches: Vec<StoredText>,
}

/// One appended audit record.
#[derive(Debug, Clone, PartialEq)]
pub struct AuditEntry {
    pub seq: i64,
    pub recorded: DateTime<Utc>,
    pub record: Value,
    /// Hex SHA-256 of the previous entry (64 zeros for the first).
    pub prev_hash: String,
    /// Hex SHA-256 over prev_hash, seq, recorded and the canonical record; see [`crate::audit::entry_hash`].
    pub hash: String,
}

/// Filter for auditors' queries. All set fields must match. `patient`, `org`,
/// `user` and `purpose` match the record's top-level string fields of the same
/// names (stored as indexed columns on append); `since`/`until` bound the
/// recorded time, both inclusive. `limit` 0 means 100.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct AuditFilter {
    pub patient: Option<String>,
    pub org: Option<String>,
    pub user: Option<String>,
    pub purpose: Option<String>,
    pub since: Option<DateTime<Utc>>,
    pub until: Option<DateTime<Utc>>,
    pub after_seq: Option<i64>,
    pub limit: usize,
}

/// A client key registered for an organisation (SMART Backend Services `private_key_jwt`).
#[derive(Debug, Clone, PartialEq)]
pub struct ClientKey {
    pub client_id: String,
    pub org: String,
    pub kid: String,
    /// Role the client's tokens carry (e.g. `doctor`, `insurer-staff`).
    pub role: String,
    /// User the client acts as, when it is bound to one person.
    pub user: Option<String>,
    /// JWK (public) as JSON.
    pub jwk: Value,
    pub created: DateTime<Utc>,
    pub revoked: bool,
}

/// A storage backend. Implementations are synchronous and thread-safe; the server
/// calls them from blocking tasks.
pub trait Store: Send + Sync + 'static {
    /// "sqlite" or "postgres".
    fn backend(&self) -> &'static str;

    /// Starts a read-write transaction. Dropping it without commit rolls back.
    fn begin(&self) -> FhirResult<Box<dyn Transaction + '_>>;

    /// Current version of a resource (including a delete marker), if it ever existed.
    fn read(&self, resource_type: &str, id: &str) -> FhirResult<Option<StoredResource>>;

    /// [`Store::read`] without parsing the body, with the patient column.
    fn read_text(&self, resource_type: &str, id: &str) -> FhirResult<Option<StoredText>>;

    /// Whether [`Store::read`] and [`Store::read_text`] are cheap enough (a local
    /// page-cache lookup: no network, no runtime of its own) to call on an async
    /// worker thread rather than hand them to the blocking pool. Safe default: no.
    fn inline_point_reads(&self) -> bool {
        false
    }

    /// A specific version.
    fn vread(
        &self,
        resource_type: &str,
        id: &str,
        version: i64,
    ) -> FhirResult<Option<StoredResource>>;

    /// Versions newest first: of one resource, of one type, or of everything.
    fn history(&self, query: &HistoryQuery) -> FhirResult<Vec<StoredResource>>;

    /// Runs a search within the scope.
    fn search(&self, query: &SearchQuery, scope: &Scope) -> FhirResult<SearchResult>;

    /// [`Store::search`] with the page of matches as [`StoredText`]s, in its
    /// order and paged like it, without parsing a body: for answers that send
    /// stored resources on as they are. Matches and total only: a query with
    /// `_include`, `_revinclude` or `_summary=count` is refused.
    fn search_text(&self, query: &SearchQuery, scope: &Scope) -> FhirResult<TextPage>;

    /// The ids of a search's matches, in its order and paged like it, without
    /// reading a body: a bulk reader (retention) lists what to look at, then
    /// reads it by `_id` in pages of its own.
    fn search_ids(&self, query: &SearchQuery, scope: &Scope) -> FhirResult<Vec<String>>;

    /// A search keeping only the newest matches per group ([`LatestPer`]), in
    /// the search's sort order and paged like it.
    fn search_latest(
        &self,
        query: &SearchQuery,
        scope: &Scope,
        latest: &LatestPer,
    ) -> FhirResult<SearchResult>;

    /// Up to `limit` current (not deleted) resources of one type in id order,
    /// starting after `after_id`: a bulk reader's keyset pages (exports,
    /// research extraction), unscoped, so only operator tools call it.
    fn scan(
        &self,
        resource_type: &str,
        after_id: Option<&str>,
        limit: usize,
    ) -> FhirResult<Vec<StoredResource>>;

    /// Everything in a patient's compartment (current, not deleted), the Patient first,
    /// within the scope, paged by `count`/`offset`.
    fn patient_compartment(
        &self,
        patient_id: &str,
        scope: &Scope,
        count: usize,
        offset: usize,
    ) -> FhirResult<SearchResult>;

    /// Appends audit records in one transaction, chained after the current head.
    fn audit_append(&self, records: &[Value]) -> FhirResult<Vec<AuditEntry>>;

    /// Audit entries in `seq` order, starting after `after_seq`, at most `limit`.
    fn audit_scan(&self, after_seq: i64, limit: usize) -> FhirResult<Vec<AuditEntry>>;

    /// Audit entries matching the filter, newest first.
    fn audit_query(&self, filter: &AuditFilter) -> FhirResult<Vec<AuditEntry>>;

    /// Registers (or replaces, by client_id + kid) a client key.
    fn put_client_key(&self, key: &ClientKey) -> FhirResult<()>;

    /// Keys registered for a client id (revoked ones included, flagged).
    fn client_keys(&self, client_id: &str) -> FhirResult<Vec<ClientKey>>;

    /// Highest applied schema migration.
    fn schema_version(&self) -> FhirResult<i64>;

    /// Approximate size of the database in bytes (for benchmarks and metrics).
    fn size_bytes(&self) -> FhirResult<u64>;
}

/// A read-write transaction: all-or-nothing.
pub trait Transaction {
    /// Creates a resource with the id the caller chose. 409 if the id is taken
    /// (even by a deleted resource).
    fn create(
        &mut self,
        resource_type: &str,
        id: &str,
        resource: Value,
        ctx: &WriteContext,
    ) -> FhirResult<StoredResource>;

    /// Updates (or creates, when absent: update-as-create) a resource. With
    /// `if_match`, fails with 412 unless the current version equals it.
    /// Returns the new version and whether it was created.
    fn update(
        &mut self,
        resource_type: &str,
        id: &str,
        resource: Value,
        if_match: Option<i64>,
        ctx: &WriteContext,
    ) -> FhirResult<(StoredResource, bool)>;

    /// [`Transaction::update`] of a body prepared outside the transaction
    /// ([`crate::PreparedResource`]): the same version, history, index entries and
    /// stored text, with the serialising and extracting already done.
    fn put(
        &mut self,
        resource: &crate::PreparedResource,
        if_match: Option<i64>,
        ctx: &WriteContext,
    ) -> FhirResult<Written>;

    /// Logically deletes; returns the delete version, or None when there was nothing
    /// live to delete (deleting twice is not an error).
    fn delete(
        &mut self,
        resource_type: &str,
        id: &str,
        if_match: Option<i64>,
        ctx: &WriteContext,
    ) -> FhirResult<Option<StoredResource>>;

    /// Physically removes a resource: every version and its index rows (the
    /// retention rules' deletion; a logical delete keeps the versions). Returns
    /// the number of versions removed, None when the resource never existed.
    /// The caller appends the audit record in the same transaction.
    fn purge(&mut self, resource_type: &str, id: &str) -> FhirResult<Option<i64>> {
        let _ = (resource_type, id);
        Err(tsunagi_fhir::FhirError::internal(
            "this backend does not support physical deletion",
        ))
    }

    /// Drops the versions of a resource older than its current one; the
    /// current version keeps its number and the next write continues from it.
    /// For records a service derives from other resources (e.g. the
    /// e-prescription medication index): their history is nobody's record, and
    /// kept it would grow with every write. Audit records that named a dropped
    /// version keep naming it; it no longer reads. Returns how many
    /// versions were dropped (0 for an unknown resource).
    fn forget_history(&mut self, resource_type: &str, id: &str) -> FhirResult<u64>;

    /// Current version as seen inside this transaction.
    fn read(&mut self, resource_type: &str, id: &str) -> FhirResult<Option<StoredResource>>;

    /// Search inside this transaction (conditional create/update).
    fn search(&mut self, query: &SearchQuery, scope: &Scope) -> FhirResult<SearchResult>;

    /// Appends audit records as part of this transaction.
    fn audit_append(&mut self, records: &[Value]) -> FhirResult<Vec<AuditEntry>>;

    fn commit(self: Box<Self>) -> FhirResult<()>;
}
