//! Backend-independent write, search and audit logic. A backend supplies the
//! primitive operations ([`Ops`]); everything with semantics (versioning,
//! preconditions, meta stamping, index replacement, paging, includes, audit
//! chaining) is here once, so both backends behave identically.

use std::collections::HashSet;

use chrono::{DateTime, Utc};
use serde_json::{Map, Value};
use tsunagi_fhir::search::{IndexEntry, SearchQuery, Summary};
use tsunagi_fhir::{FhirError, FhirResult};

use crate::api::{
    AuditEntry, Scope, SearchResult, StoredResource, StoredText, TextPage, WriteContext, Written,
};
use crate::audit;
use crate::sql::{self, Built, Dialect};

/// A resource row as returned by the shared SELECTs.
pub(crate) struct Row {
    pub rid: i64,
    pub res: StoredResource,
}

/// Current-version bookkeeping of one resource.
pub(crate) struct Current {
    pub rid: i64,
    pub version: i64,
    pub last_updated: i64,
    pub deleted: bool,
}

/// What `resource_current` should say after a write.
pub(crate) struct CurrentRow<'a> {
    pub version: i64,
    pub last_updated: i64,
    pub deleted: bool,
    pub patient_id: Option<&'a str>,
    pub author_org: Option<&'a str>,
}

/// Columns of an audit row that auditors filter on, taken from the record.
pub(crate) struct AuditColumns<'a> {
    pub patient: Option<&'a str>,
    pub org: Option<&'a str>,
    pub user: Option<&'a str>,
    pub purpose: Option<&'a str>,
}

/// Primitive operations a backend provides on one connection.
pub(crate) trait Ops {
    fn dialect(&self) -> Dialect;
    /// Runs a SELECT returning [`sql::RESOURCE_COLUMNS`].
    fn rows(&mut self, q: &Built) -> FhirResult<Vec<Row>>;
    /// Runs a `SELECT COUNT(*)`.
    fn count(&mut self, q: &Built) -> FhirResult<u64>;
    /// Runs a SELECT of one text column.
    fn texts(&mut self, q: &Built) -> FhirResult<Vec<String>>;
    /// Runs a SELECT returning [`sql::TEXT_COLUMNS`].
    fn text_rows(&mut self, q: &Built) -> FhirResult<Vec<TextRow>>;
}

/// [`sql::TEXT_COLUMNS`] of one row.
pub(crate) type TextRow = (
    String,
    String,
    i64,
    i64,
    bool,
    Option<String>,
    Option<String>,
    Option<String>,
);

fn stored_text(row: TextRow) -> FhirResult<StoredText> {
    let (resource_type, id, version, lu, deleted, text, author_org, patient) = row;
    Ok(StoredText {
        resource_type,
        id,
        version,
        last_updated: ms_to_dt(lu)?,
        deleted,
        text,
        patient,
        author_org,
    })
}

/// [`crate::Store::read`] with the backend's read statement.
pub(crate) fn read<O: Ops + ?Sized>(
    o: &mut O,
    sql: &str,
    rt: &str,
    id: &str,
) -> FhirResult<Option<StoredResource>> {
    Ok(o.rows(&Built::by_id(sql, rt, id))?.pop().map(|r| r.res))
}

/// [`crate::Store::read_text`] with the backend's read statement.
pub(crate) fn read_text<O: Ops + ?Sized>(
    o: &mut O,
    sql: &str,
    rt: &str,
    id: &str,
) -> FhirResult<Option<StoredText>> {
    o.text_rows(&Built::by_id(sql, rt, id))?
        .pop()
        .map(stored_text)
        .transpose()
}

/// [`crate::Store::search_text`]: the page of matches as stored texts.
pub(crate) fn search_text<O: Ops + ?Sized>(
    o: &mut O,
    q: &SearchQuery,
    scope: &Scope,
) -> FhirResult<TextPage> {
    if !q.include.is_empty() || !q.revinclude.is_empty() || q.summary == Summary::Count {
        return Err(FhirError::bad_request(
            None,
            "a search for stored texts returns its matches only (no _include, _revinclude or _summary=count)",
        ));
    }
    let d = o.dialect();
    let matches = if q.count == 0 {
        Vec::new()
    } else {
        let b = sql::search_text_page(d, q, scope)?;
        o.text_rows(&b)?
            .into_iter()
            .map(stored_text)
            .collect::<FhirResult<Vec<_>>>()?
    };
    let total = match page_total(q.count, q.offset, matches.len()) {
        Some(t) => t,
        None => o.count(&sql::search_count(d, q, scope))?,
    };
    Ok(TextPage { total, matches })
}

/// A search's total when its page tells it (a page short of `count`, not past
/// the end), without counting.
fn page_total(count: usize, offset: usize, n: usize) -> Option<u64> {
    (count > 0 && n < count && (n > 0 || offset == 0)).then_some((offset + n) as u64)
}

/// The ids of a search's matches in its order, paged like it (no bodies read).
pub(crate) fn search_ids<O: Ops + ?Sized>(
    o: &mut O,
    q: &SearchQuery,
    scope: &Scope,
) -> FhirResult<Vec<String>> {
    let b = sql::search_ids(o.dialect(), q, scope)?;
    o.texts(&b)
}

/// Write primitives, called inside an open transaction.
pub(crate) trait TxOps: Ops {
    /// Current row, locked against concurrent writers where the backend needs it.
    fn current(&mut self, rt: &str, id: &str) -> FhirResult<Option<Current>>;
    /// Inserts the current row; None when (rt, id) already exists.
    fn insert_current(&mut self, rt: &str, id: &str, row: &CurrentRow) -> FhirResult<Option<i64>>;
    fn update_current(&mut self, rid: i64, row: &CurrentRow) -> FhirResult<()>;
    #[allow(clippy::too_many_arguments)]
    fn insert_version(
        &mut self,
        rid: i64,
        rt: &str,
        version: i64,
        last_updated: i64,
        deleted: bool,
        ctx: &WriteContext,
        body: Option<&str>,
    ) -> FhirResult<()>;
    /// Removes the version rows and the current row of a resource.
    fn remove_resource(&mut self, rid: i64) -> FhirResult<()>;
    /// Removes the version rows older than `version`; how many.
    fn remove_versions_before(&mut self, rid: i64, version: i64) -> FhirResult<u64>;
    /// Removes every index entry of the resource.
    fn clear_index(&mut self, rid: i64) -> FhirResult<()>;
    fn insert_index(&mut self, rid: i64, rt: &str, entries: &[IndexEntry]) -> FhirResult<()>;
    /// Current audit head (seq, hash), locked until the transaction ends.
    fn audit_head(&mut self) -> FhirResult<(i64, String)>;
    fn audit_insert(&mut self, e: &AuditEntry, record: &str, cols: &AuditColumns)
    -> FhirResult<()>;
    fn audit_set_head(&mut self, seq: i64, hash: &str) -> FhirResult<()>;
}

pub(crate) fn now_ms() -> i64 {
    Utc::now().timestamp_millis()
}

pub(crate) fn ms_to_dt(ms: i64) -> FhirResult<DateTime<Utc>> {
    DateTime::from_timestamp_millis(ms)
        .ok_or_else(|| FhirError::internal("stored timestamp out of range"))
}

/// FHIR instant with millisecond precision in UTC (`2026-11-21T10:00:00.123Z`).
pub use tsunagi_fhir::datetime::format_instant;

pub(crate) fn parse_body(body: Option<String>) -> FhirResult<Option<Value>> {
    body.as_deref().map(parse_text).transpose()
}

pub(crate) fn parse_text(body: &str) -> FhirResult<Value> {
    serde_json::from_str(body)
        .map_err(|_| FhirError::internal("stored resource body is not valid JSON"))
}

/// Sets `resourceType`, `id`, `meta.versionId` and `meta.lastUpdated`; they come
/// first in the object, then the caller's elements in their order (`shift_remove`:
/// the map's plain `remove` swaps the last element into the hole).
fn stamp(
    rt: &str,
    id: &str,
    resource: Value,
    version: i64,
    last_updated: &DateTime<Utc>,
) -> FhirResult<Value> {
    object_of(rt, &resource)?;
    let Value::Object(mut obj) = resource else {
        return Err(FhirError::internal("a checked body is an object"));
    };
    obj.shift_remove("resourceType");
    obj.shift_remove("id");
    let mut meta = match obj.shift_remove("meta") {
        Some(Value::Object(m)) => m,
        _ => Map::new(),
    };
    meta.shift_remove("versionId");
    meta.shift_remove("lastUpdated");
    let mut new_meta = Map::with_capacity(meta.len() + 2);
    new_meta.insert("versionId".into(), Value::String(version.to_string()));
    new_meta.insert(
        "lastUpdated".into(),
        Value::String(format_instant(last_updated)),
    );
    new_meta.extend(meta);
    let mut out = Map::with_capacity(obj.len() + 3);
    out.insert("resourceType".into(), Value::String(rt.to_string()));
    out.insert("id".into(), Value::String(id.to_string()));
    out.insert("meta".into(), Value::Object(new_meta));
    out.extend(obj);
    Ok(Value::Object(out))
}

/// What every write checks of a body: a JSON object whose `resourceType`, if
/// given, is the type written.
fn object_of<'a>(rt: &str, body: &'a Value) -> FhirResult<&'a Map<String, Value>> {
    let Value::Object(obj) = body else {
        return Err(FhirError::bad_request(
            None,
            "a resource must be a JSON object",
        ));
    };
    match obj.get("resourceType") {
        None => Ok(obj),
        Some(Value::String(t)) if t == rt => Ok(obj),
        Some(_) => Err(FhirError::bad_request(
            Some("resourceType"),
            format!("resourceType does not match the requested type {rt}"),
        )),
    }
}

fn check_id(id: &str) -> FhirResult<()> {
    // FHIR id: [A-Za-z0-9\-\.]{1,64}
    let ok = !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'.');
    if ok {
        Ok(())
    } else {
        Err(FhirError::bad_request(
            Some("id"),
            format!("'{id}' is not a valid FHIR id"),
        ))
    }
}

/// The index entries of a resource body: its search parameters' values and its
/// security labels, which drive scope rules (ScopeRule::Labeled / Label).
fn index_entries(rt: &str, body: &Value) -> Vec<IndexEntry> {
    let mut entries = tsunagi_fhir::index::extract(rt, body);
    // a label repeated in meta.security is one row: the insert ignores duplicates
    entries.extend(
        crate::api::security_labels(body)
            .into_iter()
            .map(|(system, code)| IndexEntry {
                param: sql::SECURITY_PARAM.to_string(),
                value: tsunagi_fhir::search::IndexValue::Token {
                    system: Some(system),
                    code,
                },
            }),
    );
    entries
}

/// Resources read per page while rebuilding the index.
const REINDEX_PAGE: usize = 1000;

/// Rebuilds the index entries of every current resource from its body (after a
/// migration that changed the index tables; they are empty then). Returns how
/// many resources were indexed.
pub(crate) fn reindex_all<T: TxOps + ?Sized>(t: &mut T) -> FhirResult<u64> {
    let d = t.dialect();
    let mut after = 0;
    let mut n = 0u64;
    loop {
        let rows = t.rows(&sql::reindex_page(d, after, REINDEX_PAGE))?;
        let Some(last) = rows.last() else { break };
        after = last.rid;
        for row in &rows {
            if let Some(body) = &row.res.resource {
                let entries = index_entries(&row.res.resource_type, body);
                if !entries.is_empty() {
                    t.insert_index(row.rid, &row.res.resource_type, &entries)?;
                }
            }
        }
        n += rows.len() as u64;
        if n.is_multiple_of(100 * REINDEX_PAGE as u64) {
            tracing::info!(resources = n, "rebuilding the search index");
        }
    }
    Ok(n)
}

/// A resource made ready to be written, outside any transaction: its id and type
/// checked, its body serialised but for the version and time the write stamps,
/// its index entries and patient compartment extracted. [`crate::Transaction::put`]
/// then does only the storage work, so a loader can prepare on one thread while
/// another holds the (single) writer. Every write stores through it: `create` and
/// `update` prepare the body they are given (under the writer) and return it
/// stamped, which is the stored text parsed (pinned by a test).
#[derive(Debug, Clone)]
pub struct PreparedResource {
    rt: String,
    id: String,
    /// The text up to the version: `{"resourceType":…,"id":…,"meta":{"versionId":"`.
    head: String,
    /// The text after the time's value: `"`, the rest of `meta`, `}`, the other
    /// elements in their order, `}`.
    tail: String,
    entries: Vec<IndexEntry>,
    patient: Option<String>,
}

impl PreparedResource {
    /// Prepares `body` to be stored as `rt`/`id`. The same checks as a write:
    /// a JSON object, a `resourceType` (if any) equal to `rt`, a valid id.
    pub fn new(rt: &str, id: &str, body: &Value) -> FhirResult<PreparedResource> {
        check_id(id)?;
        let obj = object_of(rt, body)?;
        let mut head = Vec::with_capacity(64 + id.len());
        head.extend_from_slice(b"{\"resourceType\":");
        write_json(rt, &mut head)?;
        head.extend_from_slice(b",\"id\":");
        write_json(id, &mut head)?;
        head.extend_from_slice(b",\"meta\":{\"versionId\":\"");
        let mut tail = Vec::with_capacity(1024);
        tail.push(b'"');
        let members = |m: &Map<String, Value>, skip: &[&str], out: &mut Vec<u8>| {
            for (k, v) in m {
                if skip.contains(&k.as_str()) {
                    continue;
                }
                out.push(b',');
                write_json(k, out)?;
                out.push(b':');
                write_json(v, out)?;
            }
            FhirResult::Ok(())
        };
        // as `stamp`: a meta that is not an object is dropped
        if let Some(Value::Object(meta)) = obj.get("meta") {
            members(meta, &["versionId", "lastUpdated"], &mut tail)?;
        }
        tail.push(b'}');
        members(obj, &["resourceType", "id", "meta"], &mut tail)?;
        tail.push(b'}');
        let text = |b: Vec<u8>| {
            String::from_utf8(b).map_err(|_| FhirError::internal("serialised JSON is not UTF-8"))
        };
        // `_id` and `meta.versionId`/`lastUpdated` are not index entries, and a
        // Patient's compartment is its own (given) id
        let patient = if rt == "Patient" {
            Some(id.to_string())
        } else {
            tsunagi_fhir::index::compartment_patient(rt, body)
        };
        Ok(PreparedResource {
            rt: rt.to_string(),
            id: id.to_string(),
            head: text(head)?,
            tail: text(tail)?,
            entries: index_entries(rt, body),
            patient,
        })
    }

    /// The stored text of this body at `version`, written at `last_updated`.
    fn text(&self, version: i64, last_updated: &DateTime<Utc>) -> String {
        let lu = format_instant(last_updated);
        let mut s = String::with_capacity(self.head.len() + self.tail.len() + 48);
        s.push_str(&self.head);
        s.push_str(&version.to_string());
        s.push_str("\",\"lastUpdated\":\"");
        s.push_str(&lu);
        s.push_str(&self.tail);
        s
    }
}

/// Appends a key, string or value as `serde_json::to_string` writes it.
fn write_json<T: serde::Serialize + ?Sized>(v: &T, out: &mut Vec<u8>) -> FhirResult<()> {
    serde_json::to_writer(out, v)
        .map_err(|_| FhirError::internal("resource could not be serialised"))
}

/// Writes a new version (creating the resource when `cur` is None; a delete when
/// `resource` is None). None when a concurrent transaction created the resource
/// first. The returned resource carries no body: a caller that holds the body as
/// a value stamps it itself ([`stamped`]).
fn write_version<T: TxOps + ?Sized>(
    t: &mut T,
    rt: &str,
    id: &str,
    cur: Option<&Current>,
    resource: Option<&PreparedResource>,
    ctx: &WriteContext,
) -> FhirResult<Option<StoredResource>> {
    let (version, last_updated) = match cur {
        Some(c) => (c.version + 1, now_ms().max(c.last_updated + 1)),
        None => (1, now_ms()),
    };
    let lu = ms_to_dt(last_updated)?;
    let row = CurrentRow {
        version,
        last_updated,
        deleted: resource.is_none(),
        patient_id: resource.and_then(|p| p.patient.as_deref()),
        author_org: ctx.org.as_deref(),
    };
    let rid = match cur {
        Some(c) => {
            t.update_current(c.rid, &row)?;
            t.clear_index(c.rid)?;
            c.rid
        }
        None => match t.insert_current(rt, id, &row)? {
            Some(rid) => rid,
            None => return Ok(None),
        },
    };
    let text = resource.map(|p| p.text(version, &lu));
    t.insert_version(
        rid,
        rt,
        version,
        last_updated,
        row.deleted,
        ctx,
        text.as_deref(),
    )?;
    if let Some(p) = resource
        && !p.entries.is_empty()
    {
        t.insert_index(rid, rt, &p.entries)?;
    }
    Ok(Some(StoredResource {
        resource_type: rt.to_string(),
        id: id.to_string(),
        version,
        last_updated: lu,
        deleted: row.deleted,
        resource: None,
        author_org: ctx.org.clone(),
    }))
}

/// `s` with the body it was written from, stamped as it was stored.
fn stamped(mut s: StoredResource, body: Value) -> FhirResult<StoredResource> {
    s.resource = Some(stamp(
        &s.resource_type,
        &s.id,
        body,
        s.version,
        &s.last_updated,
    )?);
    Ok(s)
}

pub(crate) fn create<T: TxOps + ?Sized>(
    t: &mut T,
    rt: &str,
    id: &str,
    resource: Value,
    ctx: &WriteContext,
) -> FhirResult<StoredResource> {
    check_id(id)?;
    if t.current(rt, id)?.is_some() {
        return Err(FhirError::conflict(format!("{rt}/{id} already exists")));
    }
    let p = PreparedResource::new(rt, id, &resource)?;
    let s = write_version(t, rt, id, None, Some(&p), ctx)?
        .ok_or_else(|| FhirError::conflict(format!("{rt}/{id} already exists")))?;
    stamped(s, resource)
}

pub(crate) fn update<T: TxOps + ?Sized>(
    t: &mut T,
    rt: &str,
    id: &str,
    resource: Value,
    if_match: Option<i64>,
    ctx: &WriteContext,
) -> FhirResult<(StoredResource, bool)> {
    let p = PreparedResource::new(rt, id, &resource)?;
    let (s, created) = put_prepared(t, &p, if_match, ctx)?;
    Ok((stamped(s, resource)?, created))
}

/// [`update`] of a prepared body.
pub(crate) fn put<T: TxOps + ?Sized>(
    t: &mut T,
    p: &PreparedResource,
    if_match: Option<i64>,
    ctx: &WriteContext,
) -> FhirResult<Written> {
    let (s, created) = put_prepared(t, p, if_match, ctx)?;
    Ok(Written {
        version: s.version,
        last_updated: s.last_updated,
        created,
    })
}

fn put_prepared<T: TxOps + ?Sized>(
    t: &mut T,
    p: &PreparedResource,
    if_match: Option<i64>,
    ctx: &WriteContext,
) -> FhirResult<(StoredResource, bool)> {
    let (rt, id) = (p.rt.as_str(), p.id.as_str());
    // Two rounds at most: a concurrent creator may win the insert race, after
    // which the row exists (and is locked by `current`).
    for _ in 0..2 {
        let cur = t.current(rt, id)?;
        match (&cur, if_match) {
            (Some(c), Some(m)) if c.version != m => {
                return Err(FhirError::precondition_failed(format!(
                    "{rt}/{id} is at version {}, not {m}",
                    c.version
                )));
            }
            (None, Some(m)) => {
                return Err(FhirError::precondition_failed(format!(
                    "{rt}/{id} does not exist (If-Match {m})"
                )));
            }
            _ => {}
        }
        let created = cur.as_ref().is_none_or(|c| c.deleted);
        if let Some(s) = write_version(t, rt, id, cur.as_ref(), Some(p), ctx)? {
            return Ok((s, created));
        }
    }
    Err(FhirError::unavailable(format!(
        "{rt}/{id} is being written concurrently; retry"
    )))
}

pub(crate) fn delete<T: TxOps + ?Sized>(
    t: &mut T,
    rt: &str,
    id: &str,
    if_match: Option<i64>,
    ctx: &WriteContext,
) -> FhirResult<Option<StoredResource>> {
    let Some(cur) = t.current(rt, id)? else {
        return Ok(None);
    };
    if cur.deleted {
        return Ok(None);
    }
    if let Some(m) = if_match
        && m != cur.version
    {
        return Err(FhirError::precondition_failed(format!(
            "{rt}/{id} is at version {}, not {m}",
            cur.version
        )));
    }
    // the row exists (and is locked), so the write cannot lose a creation race
    write_version(t, rt, id, Some(&cur), None, ctx)
}

/// Physically removes a resource (all versions and index rows).
pub(crate) fn purge<T: TxOps + ?Sized>(t: &mut T, rt: &str, id: &str) -> FhirResult<Option<i64>> {
    let Some(cur) = t.current(rt, id)? else {
        return Ok(None);
    };
    t.clear_index(cur.rid)?;
    t.remove_resource(cur.rid)?;
    Ok(Some(cur.version))
}

pub(crate) fn forget_history<T: TxOps + ?Sized>(t: &mut T, rt: &str, id: &str) -> FhirResult<u64> {
    match t.current(rt, id)? {
        Some(cur) => t.remove_versions_before(cur.rid, cur.version),
        None => Ok(0),
    }
}

/// Runs a search: page, total (counted only when the page does not tell it), includes.
pub(crate) fn search<O: Ops + ?Sized>(
    o: &mut O,
    q: &SearchQuery,
    scope: &Scope,
) -> FhirResult<SearchResult> {
    let d = o.dialect();
    if q.summary == Summary::Count || q.count == 0 {
        let total = o.count(&sql::search_count(d, q, scope))?;
        return Ok(SearchResult {
            total,
            matches: Vec::new(),
            included: Vec::new(),
        });
    }
    let rows = o.rows(&sql::search_page(d, q, scope)?)?;
    let total = match page_total(q.count, q.offset, rows.len()) {
        Some(t) => t,
        None => o.count(&sql::search_count(d, q, scope))?,
    };
    let included = includes(o, q, &rows, scope)?;
    Ok(SearchResult {
        total,
        matches: rows.into_iter().map(|r| r.res).collect(),
        included,
    })
}

/// One keyset page of [`crate::api::Store::scan`].
pub(crate) fn scan<O: Ops + ?Sized>(
    o: &mut O,
    resource_type: &str,
    after: Option<&str>,
    limit: usize,
) -> FhirResult<Vec<StoredResource>> {
    let q = sql::scan(o.dialect(), resource_type, after, limit);
    Ok(o.rows(&q)?.into_iter().map(|r| r.res).collect())
}

/// A search keeping the newest matches per group ([`crate::api::LatestPer`]).
pub(crate) fn search_latest<O: Ops + ?Sized>(
    o: &mut O,
    q: &SearchQuery,
    scope: &Scope,
    latest: &crate::api::LatestPer,
) -> FhirResult<SearchResult> {
    let d = o.dialect();
    if q.summary == Summary::Count || q.count == 0 {
        let total = o.count(&sql::search_latest_count(d, q, scope, latest))?;
        return Ok(SearchResult {
            total,
            matches: Vec::new(),
            included: Vec::new(),
        });
    }
    let rows = o.rows(&sql::search_latest_page(d, q, scope, latest)?)?;
    let total = match page_total(q.count, q.offset, rows.len()) {
        Some(t) => t,
        None => o.count(&sql::search_latest_count(d, q, scope, latest))?,
    };
    let included = includes(o, q, &rows, scope)?;
    Ok(SearchResult {
        total,
        matches: rows.into_iter().map(|r| r.res).collect(),
        included,
    })
}

fn includes<O: Ops + ?Sized>(
    o: &mut O,
    q: &SearchQuery,
    rows: &[Row],
    scope: &Scope,
) -> FhirResult<Vec<StoredResource>> {
    if rows.is_empty() || (q.include.is_empty() && q.revinclude.is_empty()) {
        return Ok(Vec::new());
    }
    let d = o.dialect();
    let mut seen: HashSet<i64> = rows.iter().map(|r| r.rid).collect();
    let rids: Vec<i64> = rows.iter().map(|r| r.rid).collect();
    let ids: Vec<String> = rows.iter().map(|r| r.res.id.clone()).collect();
    let mut out = Vec::new();
    for inc in &q.include {
        if inc.source_type != q.resource_type {
            continue;
        }
        for r in o.rows(&sql::include(d, inc, &rids, scope))? {
            if seen.insert(r.rid) {
                out.push(r.res);
            }
        }
    }
    for inc in &q.revinclude {
        if inc
            .target_type
            .as_ref()
            .is_some_and(|t| t != &q.resource_type)
        {
            continue;
        }
        for r in o.rows(&sql::revinclude(d, inc, &q.resource_type, &ids, scope))? {
            if seen.insert(r.rid) {
                out.push(r.res);
            }
        }
    }
    Ok(out)
}

pub(crate) fn patient_compartment<O: Ops + ?Sized>(
    o: &mut O,
    patient_id: &str,
    scope: &Scope,
    count: usize,
    offset: usize,
) -> FhirResult<SearchResult> {
    let d = o.dialect();
    let rows = if count == 0 {
        Vec::new()
    } else {
        o.rows(&sql::compartment_page(d, patient_id, scope, count, offset))?
    };
    let total = match page_total(count, offset, rows.len()) {
        Some(t) => t,
        None => o.count(&sql::compartment_count(d, patient_id, scope))?,
    };
    Ok(SearchResult {
        total,
        matches: rows.into_iter().map(|r| r.res).collect(),
        included: Vec::new(),
    })
}

/// Appends records after the (locked) head and moves the head.
pub(crate) fn audit_append<T: TxOps + ?Sized>(
    t: &mut T,
    records: &[Value],
) -> FhirResult<Vec<AuditEntry>> {
    if records.is_empty() {
        return Ok(Vec::new());
    }
    let (mut seq, mut prev) = t.audit_head()?;
    let mut out = Vec::with_capacity(records.len());
    for record in records {
        seq += 1;
        let recorded = ms_to_dt(now_ms())?;
        let hash = audit::entry_hash(&prev, seq, &recorded, record);
        let entry = AuditEntry {
            seq,
            recorded,
            record: record.clone(),
            prev_hash: prev,
            hash: hash.clone(),
        };
        let text = serde_json::to_string(record)
            .map_err(|_| FhirError::internal("audit record could not be serialised"))?;
        let s = |k: &str| record.get(k).and_then(Value::as_str);
        let cols = AuditColumns {
            patient: s("patient"),
            org: s("org"),
            user: s("user"),
            purpose: s("purpose"),
        };
        t.audit_insert(&entry, &text, &cols)?;
        out.push(entry);
        prev = hash;
    }
    t.audit_set_head(seq, &prev)?;
    Ok(out)
}

/// Decodes a stored audit row.
pub(crate) fn audit_entry(
    seq: i64,
    recorded: i64,
    record: &str,
    prev_hash: String,
    hash: String,
) -> FhirResult<AuditEntry> {
    Ok(AuditEntry {
        seq,
        recorded: ms_to_dt(recorded)?,
        record: serde_json::from_str(record)
            .map_err(|_| FhirError::internal("stored audit record is not valid JSON"))?,
        prev_hash,
        hash,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// The prepared text is the text `update` stores: the same bytes, for bodies
    /// with and without meta, with stale ids and versions, escapes and non-ASCII.
    #[test]
    fn prepared_text_is_the_stamped_text() {
        let lu = ms_to_dt(1_795_000_000_123).unwrap();
        let bodies = [
            json!({"resourceType": "Patient"}),
            json!({"name": [{"family": "山田"}], "resourceType": "Patient", "id": "old",
                   "meta": {"lastUpdated": "x", "profile": ["p"], "versionId": "3", "tag": []}}),
            json!({"meta": 5, "gender": "other", "text": {"div": "<div>\"\\\n</div>"}}),
            json!({"meta": {}, "active": true, "multipleBirthInteger": 2}),
        ];
        for b in bodies {
            let p = PreparedResource::new("Patient", "id-1.x", &b).unwrap();
            let stamped = stamp("Patient", "id-1.x", b.clone(), 12, &lu).unwrap();
            assert_eq!(
                p.text(12, &lu),
                serde_json::to_string(&stamped).unwrap(),
                "{b}"
            );
            assert_eq!(p.entries, index_entries("Patient", &stamped), "{b}");
            assert_eq!(p.patient.as_deref(), Some("id-1.x"));
        }
    }

    #[test]
    fn prepared_checks_what_a_write_checks() {
        let e = PreparedResource::new("Patient", "a b", &json!({})).unwrap_err();
        assert_eq!(e.status, 400);
        let e = PreparedResource::new("Patient", "a", &json!([])).unwrap_err();
        assert_eq!(e.status, 400);
        let e = PreparedResource::new("Patient", "a", &json!({"resourceType": "Observation"}))
            .unwrap_err();
        assert_eq!(e.status, 400);
    }
}
