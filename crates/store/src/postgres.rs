//! PostgreSQL backend for multi-node deployments.
//!
//! Uses the synchronous `postgres` client behind an r2d2 pool. Every method
//! blocks on network I/O: call it from a blocking thread (the server uses
//! `tokio::task::spawn_blocking`), never on an async runtime worker, where the
//! sync client would stall the runtime (and panics when nested in one).
//!
//! Concurrency: writers lock the resource's current row (`SELECT ... FOR
//! UPDATE`) before versioning it, and audit appends lock the single head row,
//! so concurrent transactions never lose an update and the audit chain never forks.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use postgres::error::SqlState;
use postgres::types::ToSql;
use postgres::{Client, NoTls, Statement};
use r2d2::{ManageConnection, Pool, PooledConnection};
use r2d2_postgres::PostgresConnectionManager;
use serde_json::Value;
use tsunagi_fhir::search::{IndexEntry, IndexValue, SearchQuery};
use tsunagi_fhir::{FhirError, FhirResult};

use crate::api::*;
use crate::engine::{self, AuditColumns, Current, CurrentRow, Ops, PreparedResource, Row, TxOps};
use crate::schema;
use crate::sql::{self, AuditSource, Built, Dialect, SqlValue, Statements};

/// Prepared statements kept per connection before the cache is reset.
const STATEMENT_CACHE: usize = 512;

pub(crate) fn pg_err(e: postgres::Error) -> FhirError {
    if let Some(code) = e.code()
        && (*code == SqlState::T_R_SERIALIZATION_FAILURE
            || *code == SqlState::T_R_DEADLOCK_DETECTED)
    {
        tracing::warn!(error = %e, "postgres transient conflict");
        return FhirError::unavailable("concurrent write conflict; retry");
    }
    if e.is_closed() {
        tracing::error!(error = %e, "postgres connection closed");
        return FhirError::unavailable("the database connection was lost; retry");
    }
    tracing::error!(error = %e, "postgres error");
    FhirError::internal("storage error")
}

fn pool_err(e: r2d2::Error) -> FhirError {
    tracing::error!(error = %e, "postgres pool");
    FhirError::unavailable("no database connection available; retry")
}

/// A pooled connection with its prepared-statement cache.
pub struct PgConn {
    client: Client,
    cache: HashMap<String, Statement>,
}

impl PgConn {
    fn prepare(&mut self, sql: &str) -> Result<Statement, postgres::Error> {
        if let Some(s) = self.cache.get(sql) {
            return Ok(s.clone());
        }
        let s = self.client.prepare(sql)?;
        if self.cache.len() >= STATEMENT_CACHE {
            self.cache.clear();
        }
        self.cache.insert(sql.to_string(), s.clone());
        Ok(s)
    }
}

/// r2d2 manager: `r2d2_postgres`'s, plus the schema's `search_path` set on
/// every new connection and a statement cache.
pub struct Manager {
    inner: PostgresConnectionManager<NoTls>,
    search_path: Option<String>,
}

impl ManageConnection for Manager {
    type Connection = PgConn;
    type Error = postgres::Error;

    fn connect(&self) -> Result<PgConn, postgres::Error> {
        let mut client = self.inner.connect()?;
        if let Some(schema) = &self.search_path {
            client.batch_execute(&format!("SET search_path TO \"{schema}\""))?;
        }
        Ok(PgConn {
            client,
            cache: HashMap::new(),
        })
    }

    fn is_valid(&self, conn: &mut PgConn) -> Result<(), postgres::Error> {
        self.inner.is_valid(&mut conn.client)
    }

    fn has_broken(&self, conn: &mut PgConn) -> bool {
        self.inner.has_broken(&mut conn.client)
    }
}

/// The PostgreSQL store.
pub struct PgStore {
    /// Always Some until drop (taken there, see `Drop`).
    pool: Option<Pool<Manager>>,
    st: Statements,
    schema: Option<String>,
    workload: Workload,
    /// Resource writes committed through this store (a bulk load's size).
    written: AtomicU64,
}

/// Resource writes below which a bulk load leaves the statistics to autovacuum.
/// Measured: `ANALYZE` after importing a handful of Organizations into empty tables
/// made the next, large import run at 296 resources/s instead of 1,675 (its
/// connections planned their statements for tables of a few rows, and kept those
/// plans as the tables grew).
const ANALYZE_AFTER_WRITES: u64 = 10_000;

/// The store's tables whose statistics steer search plans.
const ANALYZED_TABLES: &str = "resource_current, resource_version, ix_string, ix_token, ix_date, ix_number, ix_reference, ix_uri, audit_log";

/// The synchronous client shuts down an internal runtime when a connection closes,
/// which panics on an async runtime thread. Closing the pool on a plain thread
/// makes dropping the store safe from anywhere (tests, shutdown, benchmarks).
///
/// A bulk load of at least [`ANALYZE_AFTER_WRITES`] resources ends with `ANALYZE` of
/// the store's tables (see [`Workload::BulkLoad`]): autovacuum would refresh the
/// statistics too, but only some time later.
impl Drop for PgStore {
    fn drop(&mut self) {
        if let Some(pool) = self.pool.take() {
            let analyze = self.workload == Workload::BulkLoad
                && *self.written.get_mut() >= ANALYZE_AFTER_WRITES;
            let _ = std::thread::spawn(move || {
                if analyze {
                    let done = pool.get().map_err(|e| e.to_string()).and_then(|mut c| {
                        c.client
                            .batch_execute(&format!("ANALYZE {ANALYZED_TABLES}"))
                            .map_err(|e| e.to_string())
                    });
                    if let Err(e) = done {
                        tracing::warn!(error = %e, "statistics after a bulk load");
                    }
                }
                drop(pool)
            })
            .join();
        }
    }
}

impl PgStore {
    /// Connects (`host=... user=... dbname=...` or a `postgres://` URL) and applies
    /// pending migrations.
    pub fn connect(url: &str, pool_size: u32) -> FhirResult<PgStore> {
        Self::connect_for(url, pool_size, Workload::Online)
    }

    /// [`PgStore::connect`] for `workload`.
    pub fn connect_for(url: &str, pool_size: u32, workload: Workload) -> FhirResult<PgStore> {
        Ok(Self::build(url, None, pool_size)?.for_workload(workload))
    }

    /// The same store, opened for `workload` (what it does when dropped).
    pub fn for_workload(mut self, workload: Workload) -> PgStore {
        self.workload = workload;
        self
    }

    /// As [`PgStore::connect`], but in a dedicated schema (created if absent),
    /// selected with `SET search_path` on every pooled connection. Lets tests
    /// and tenants share one database without seeing each other.
    pub fn connect_in_schema(url: &str, schema: &str, pool_size: u32) -> FhirResult<PgStore> {
        let valid = !schema.is_empty()
            && schema.len() <= 63
            && schema
                .bytes()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'_')
            && !schema.as_bytes()[0].is_ascii_digit();
        if !valid {
            return Err(FhirError::bad_request(
                None,
                "schema name must match [a-z_][a-z0-9_]{0,62}",
            ));
        }
        Self::build(url, Some(schema.to_string()), pool_size)
    }

    fn build(url: &str, schema: Option<String>, pool_size: u32) -> FhirResult<PgStore> {
        let config: postgres::Config = url
            .parse()
            .map_err(|_| FhirError::internal("invalid PostgreSQL connection string"))?;
        let manager = Manager {
            inner: PostgresConnectionManager::new(config, NoTls),
            search_path: schema.clone(),
        };
        let pool = Pool::builder()
            .max_size(pool_size.max(1))
            .min_idle(Some(0))
            .connection_timeout(Duration::from_secs(10))
            .build(manager)
            .map_err(pool_err)?;
        let store = PgStore {
            pool: Some(pool),
            st: Statements::new(Dialect::Postgres),
            schema,
            workload: Workload::Online,
            written: AtomicU64::new(0),
        };
        store.migrate()?;
        Ok(store)
    }

    fn conn(&self) -> FhirResult<PooledConnection<Manager>> {
        match &self.pool {
            Some(pool) => pool.get().map_err(pool_err),
            None => Err(FhirError::unavailable("the database pool is closed")),
        }
    }

    /// Applies pending migrations under a transaction-scoped advisory lock, so
    /// servers starting together apply each migration exactly once.
    fn migrate(&self) -> FhirResult<()> {
        let mut conn = self.conn()?;
        conn.client.batch_execute("BEGIN").map_err(pg_err)?;
        match self.migrate_in(&mut conn) {
            Ok(()) => conn.client.batch_execute("COMMIT").map_err(pg_err),
            Err(e) => {
                let _ = conn.client.batch_execute("ROLLBACK");
                Err(e)
            }
        }
    }

    fn migrate_in(&self, conn: &mut PgConn) -> FhirResult<()> {
        let c = &mut conn.client;
        c.execute(
            "SELECT pg_advisory_xact_lock($1)",
            &[&schema::PG_MIGRATION_LOCK],
        )
        .map_err(pg_err)?;
        if let Some(s) = &self.schema {
            c.batch_execute(&format!(
                "CREATE SCHEMA IF NOT EXISTS \"{s}\"; SET LOCAL search_path TO \"{s}\""
            ))
            .map_err(pg_err)?;
        }
        c.batch_execute(schema::bootstrap(Dialect::Postgres))
            .map_err(pg_err)?;
        let current: i64 = c
            .query_one(
                "SELECT COALESCE(MAX(version), 0)::bigint FROM schema_migrations",
                &[],
            )
            .map_err(pg_err)?
            .get(0);
        schema::refuse_newer(current)?;
        let mut reindex = false;
        for (version, ddl) in schema::migrations(Dialect::Postgres) {
            if version <= current {
                continue;
            }
            c.batch_execute(&ddl).map_err(pg_err)?;
            c.execute(
                "INSERT INTO schema_migrations (version) VALUES ($1)",
                &[&version],
            )
            .map_err(pg_err)?;
            tracing::info!(version, "postgres migration applied");
            reindex |= schema::REINDEX_AFTER.contains(&version);
        }
        if reindex {
            let n = engine::reindex_all(&mut PgOps { conn, st: &self.st })?;
            tracing::info!(resources = n, "search index rebuilt");
        }
        Ok(())
    }

    /// Test hook: runs raw SQL (used by the conformance suite to tamper with the
    /// audit log and to drop test schemas). Not for production use.
    #[doc(hidden)]
    pub fn raw_execute(&self, sql: &str) -> FhirResult<()> {
        self.conn()?.client.batch_execute(sql).map_err(pg_err)
    }

    fn with_conn<T>(&self, f: impl FnOnce(&mut PgOps<'_>) -> FhirResult<T>) -> FhirResult<T> {
        let mut conn = self.conn()?;
        f(&mut PgOps {
            conn: &mut conn,
            st: &self.st,
        })
    }
}

/// Primitive operations on one PostgreSQL connection.
pub(crate) struct PgOps<'c> {
    conn: &'c mut PgConn,
    st: &'c Statements,
}

fn bind(params: &[SqlValue]) -> Vec<&(dyn ToSql + Sync)> {
    params
        .iter()
        .map(|p| match p {
            SqlValue::Text(s) => s as &(dyn ToSql + Sync),
            SqlValue::Int(i) => i as &(dyn ToSql + Sync),
            SqlValue::Real(f) => f as &(dyn ToSql + Sync),
        })
        .collect()
}

impl PgOps<'_> {
    fn query(
        &mut self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> FhirResult<Vec<postgres::Row>> {
        let st = self.conn.prepare(sql).map_err(pg_err)?;
        self.conn.client.query(&st, params).map_err(pg_err)
    }

    fn execute(&mut self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> FhirResult<u64> {
        let st = self.conn.prepare(sql).map_err(pg_err)?;
        self.conn.client.execute(&st, params).map_err(pg_err)
    }

    fn audit_rows(&mut self, q: &Built) -> FhirResult<Vec<AuditEntry>> {
        let rows = self.query(&q.sql, &bind(&q.params))?;
        rows.iter()
            .map(|r| {
                let record: String = r.try_get(2).map_err(pg_err)?;
                engine::audit_entry(
                    r.try_get(0).map_err(pg_err)?,
                    r.try_get(1).map_err(pg_err)?,
                    &record,
                    r.try_get(3).map_err(pg_err)?,
                    r.try_get(4).map_err(pg_err)?,
                )
            })
            .collect()
    }
}

fn decode(r: &postgres::Row) -> FhirResult<Row> {
    let lu: i64 = r.try_get(4).map_err(pg_err)?;
    Ok(Row {
        rid: r.try_get(0).map_err(pg_err)?,
        res: StoredResource {
            resource_type: r.try_get(1).map_err(pg_err)?,
            id: r.try_get(2).map_err(pg_err)?,
            version: r.try_get(3).map_err(pg_err)?,
            last_updated: engine::ms_to_dt(lu)?,
            deleted: r.try_get(5).map_err(pg_err)?,
            resource: engine::parse_body(r.try_get(6).map_err(pg_err)?)?,
            author_org: r.try_get(7).map_err(pg_err)?,
        },
    })
}

impl Ops for PgOps<'_> {
    fn dialect(&self) -> Dialect {
        Dialect::Postgres
    }

    fn rows(&mut self, q: &Built) -> FhirResult<Vec<Row>> {
        self.query(&q.sql, &bind(&q.params))?
            .iter()
            .map(decode)
            .collect()
    }

    fn count(&mut self, q: &Built) -> FhirResult<u64> {
        let rows = self.query(&q.sql, &bind(&q.params))?;
        let n: i64 = rows
            .first()
            .ok_or_else(|| FhirError::internal("count returned no row"))?
            .try_get(0)
            .map_err(pg_err)?;
        Ok(n.max(0) as u64)
    }

    fn texts(&mut self, q: &Built) -> FhirResult<Vec<String>> {
        self.query(&q.sql, &bind(&q.params))?
            .iter()
            .map(|r| r.try_get(0).map_err(pg_err))
            .collect()
    }

    fn text_rows(&mut self, q: &Built) -> FhirResult<Vec<engine::TextRow>> {
        self.query(&q.sql, &bind(&q.params))?
            .iter()
            .map(|r| {
                Ok((
                    r.try_get(0).map_err(pg_err)?,
                    r.try_get(1).map_err(pg_err)?,
                    r.try_get(2).map_err(pg_err)?,
                    r.try_get(3).map_err(pg_err)?,
                    r.try_get(4).map_err(pg_err)?,
                    r.try_get(5).map_err(pg_err)?,
                    r.try_get(6).map_err(pg_err)?,
                    r.try_get(7).map_err(pg_err)?,
                ))
            })
            .collect()
    }
}

// An entry a resource already has (the key is the whole row) is one entry.
const INSERT_STRING: &str = "INSERT INTO ix_string (rid, k, norm, exact) \
     SELECT $1::bigint, * FROM unnest($2::bigint[], $3::text[], $4::text[]) ON CONFLICT DO NOTHING";
const INSERT_TOKEN: &str = "INSERT INTO ix_token (rid, k, system, code) \
     SELECT $1::bigint, * FROM unnest($2::bigint[], $3::text[], $4::text[]) ON CONFLICT DO NOTHING";
const INSERT_DATE: &str = "INSERT INTO ix_date (rid, k, lo, hi) \
     SELECT $1::bigint, * FROM unnest($2::bigint[], $3::bigint[], $4::bigint[]) ON CONFLICT DO NOTHING";
const INSERT_NUMBER: &str = "INSERT INTO ix_number (rid, k, value, system, code) \
     SELECT $1::bigint, * FROM unnest($2::bigint[], $3::float8[], $4::text[], $5::text[]) ON CONFLICT DO NOTHING";
const INSERT_REFERENCE: &str = "INSERT INTO ix_reference (rid, k, target_type, target_id) \
     SELECT $1::bigint, * FROM unnest($2::bigint[], $3::text[], $4::text[]) ON CONFLICT DO NOTHING";
const INSERT_URI: &str = "INSERT INTO ix_uri (rid, k, value) \
     SELECT $1::bigint, * FROM unnest($2::bigint[], $3::text[]) ON CONFLICT DO NOTHING";
const CLEAR_INDEX: &str = "WITH a AS (DELETE FROM ix_string WHERE rid = $1), b AS (DELETE FROM ix_token WHERE rid = $1), \
     c AS (DELETE FROM ix_date WHERE rid = $1), d AS (DELETE FROM ix_number WHERE rid = $1), \
     e AS (DELETE FROM ix_reference WHERE rid = $1) DELETE FROM ix_uri WHERE rid = $1";

/// Index entries split per table, as column arrays (the key first) for one
/// `unnest` insert each; absent optional parts are [`sql::ABSENT`].
#[derive(Default)]
struct Columns<'a> {
    s: (Vec<i64>, Vec<&'a str>, Vec<&'a str>),
    t: (Vec<i64>, Vec<&'a str>, Vec<&'a str>),
    d: (Vec<i64>, Vec<i64>, Vec<i64>),
    n: (Vec<i64>, Vec<f64>, Vec<&'a str>, Vec<&'a str>),
    r: (Vec<i64>, Vec<&'a str>, Vec<&'a str>),
    u: (Vec<i64>, Vec<&'a str>),
}

impl TxOps for PgOps<'_> {
    fn current(&mut self, rt: &str, id: &str) -> FhirResult<Option<Current>> {
        let st = self.st;
        let rows = self.query(&st.current, &[&rt, &id])?;
        rows.first()
            .map(|r| {
                Ok(Current {
                    rid: r.try_get(0).map_err(pg_err)?,
                    version: r.try_get(1).map_err(pg_err)?,
                    last_updated: r.try_get(2).map_err(pg_err)?,
                    deleted: r.try_get(3).map_err(pg_err)?,
                })
            })
            .transpose()
    }

    fn insert_current(&mut self, rt: &str, id: &str, row: &CurrentRow) -> FhirResult<Option<i64>> {
        let st = self.st;
        let rows = self.query(
            &st.insert_current,
            &[
                &rt,
                &id,
                &row.version,
                &row.last_updated,
                &row.deleted,
                &row.patient_id,
                &row.author_org,
            ],
        )?;
        rows.first()
            .map(|r| r.try_get(0).map_err(pg_err))
            .transpose()
    }

    fn update_current(&mut self, rid: i64, row: &CurrentRow) -> FhirResult<()> {
        let st = self.st;
        self.execute(
            &st.update_current,
            &[
                &rid,
                &row.version,
                &row.last_updated,
                &row.deleted,
                &row.patient_id,
                &row.author_org,
            ],
        )?;
        Ok(())
    }

    fn insert_version(
        &mut self,
        rid: i64,
        rt: &str,
        version: i64,
        last_updated: i64,
        deleted: bool,
        ctx: &WriteContext,
        body: Option<&str>,
    ) -> FhirResult<()> {
        let st = self.st;
        self.execute(
            &st.insert_version,
            &[
                &rid,
                &version,
                &rt,
                &last_updated,
                &deleted,
                &ctx.org,
                &ctx.user,
                &body,
            ],
        )?;
        Ok(())
    }

    fn remove_resource(&mut self, rid: i64) -> FhirResult<()> {
        self.execute(
            "WITH v AS (DELETE FROM resource_version WHERE rid = $1) DELETE FROM resource_current WHERE rid = $1",
            &[&rid],
        )?;
        Ok(())
    }

    fn remove_versions_before(&mut self, rid: i64, version: i64) -> FhirResult<u64> {
        self.execute(
            "DELETE FROM resource_version WHERE rid = $1 AND version < $2",
            &[&rid, &version],
        )
    }

    fn clear_index(&mut self, rid: i64) -> FhirResult<()> {
        self.execute(CLEAR_INDEX, &[&rid])?;
        Ok(())
    }

    fn insert_index(&mut self, rid: i64, rt: &str, entries: &[IndexEntry]) -> FhirResult<()> {
        let mut c = Columns::default();
        fn opt(s: &Option<String>) -> &str {
            s.as_deref().unwrap_or(sql::ABSENT)
        }
        for e in entries {
            let p = sql::param_key(rt, &e.param);
            match &e.value {
                IndexValue::String { norm, exact } => {
                    c.s.0.push(p);
                    c.s.1.push(norm);
                    c.s.2.push(exact);
                }
                IndexValue::Token { system, code } => {
                    c.t.0.push(p);
                    c.t.1.push(opt(system));
                    c.t.2.push(code);
                }
                IndexValue::Date { lo, hi } => {
                    c.d.0.push(p);
                    c.d.1.push(*lo);
                    c.d.2.push(*hi);
                }
                IndexValue::Number { value } => {
                    c.n.0.push(p);
                    c.n.1.push(*value);
                    c.n.2.push(sql::ABSENT);
                    c.n.3.push(sql::ABSENT);
                }
                IndexValue::Quantity {
                    value,
                    system,
                    code,
                } => {
                    c.n.0.push(p);
                    c.n.1.push(*value);
                    c.n.2.push(opt(system));
                    c.n.3.push(opt(code));
                }
                IndexValue::Reference {
                    target_type,
                    target_id,
                } => {
                    c.r.0.push(p);
                    c.r.1.push(opt(target_type));
                    c.r.2.push(target_id);
                }
                IndexValue::Uri(u) => {
                    c.u.0.push(p);
                    c.u.1.push(u);
                }
            }
        }
        if !c.s.0.is_empty() {
            self.execute(INSERT_STRING, &[&rid, &c.s.0, &c.s.1, &c.s.2])?;
        }
        if !c.t.0.is_empty() {
            self.execute(INSERT_TOKEN, &[&rid, &c.t.0, &c.t.1, &c.t.2])?;
        }
        if !c.d.0.is_empty() {
            self.execute(INSERT_DATE, &[&rid, &c.d.0, &c.d.1, &c.d.2])?;
        }
        if !c.n.0.is_empty() {
            self.execute(INSERT_NUMBER, &[&rid, &c.n.0, &c.n.1, &c.n.2, &c.n.3])?;
        }
        if !c.r.0.is_empty() {
            self.execute(INSERT_REFERENCE, &[&rid, &c.r.0, &c.r.1, &c.r.2])?;
        }
        if !c.u.0.is_empty() {
            self.execute(INSERT_URI, &[&rid, &c.u.0, &c.u.1])?;
        }
        Ok(())
    }

    fn audit_head(&mut self) -> FhirResult<(i64, String)> {
        let st = self.st;
        let rows = self.query(&st.audit_head, &[])?;
        let r = rows
            .first()
            .ok_or_else(|| FhirError::internal("audit head row is missing"))?;
        Ok((r.try_get(0).map_err(pg_err)?, r.try_get(1).map_err(pg_err)?))
    }

    fn audit_insert(&mut self, e: &AuditEntry, record: &str, c: &AuditColumns) -> FhirResult<()> {
        let st = self.st;
        let recorded = e.recorded.timestamp_millis();
        self.execute(
            &st.audit_insert,
            &[
                &e.seq,
                &recorded,
                &record,
                &e.prev_hash,
                &e.hash,
                &c.patient,
                &c.org,
                &c.user,
                &c.purpose,
            ],
        )?;
        Ok(())
    }

    fn audit_set_head(&mut self, seq: i64, hash: &str) -> FhirResult<()> {
        let st = self.st;
        self.execute(&st.audit_set_head, &[&seq, &hash])?;
        Ok(())
    }
}

/// A write transaction on one pooled connection; `ROLLBACK` when dropped uncommitted.
pub struct PgTransaction<'a> {
    conn: PooledConnection<Manager>,
    st: &'a Statements,
    done: bool,
    /// Resource writes in this transaction, added to the store's on commit.
    writes: u64,
    written: &'a AtomicU64,
}

impl PgTransaction<'_> {
    fn ops(&mut self) -> PgOps<'_> {
        PgOps {
            conn: &mut self.conn,
            st: self.st,
        }
    }
}

impl Drop for PgTransaction<'_> {
    fn drop(&mut self) {
        if !self.done
            && let Err(e) = self.conn.client.batch_execute("ROLLBACK")
        {
            tracing::error!(error = %e, "postgres rollback failed");
        }
    }
}

impl Transaction for PgTransaction<'_> {
    fn create(
        &mut self,
        resource_type: &str,
        id: &str,
        resource: Value,
        ctx: &WriteContext,
    ) -> FhirResult<StoredResource> {
        self.writes += 1;
        engine::create(&mut self.ops(), resource_type, id, resource, ctx)
    }

    fn update(
        &mut self,
        resource_type: &str,
        id: &str,
        resource: Value,
        if_match: Option<i64>,
        ctx: &WriteContext,
    ) -> FhirResult<(StoredResource, bool)> {
        self.writes += 1;
        engine::update(&mut self.ops(), resource_type, id, resource, if_match, ctx)
    }

    fn put(
        &mut self,
        resource: &PreparedResource,
        if_match: Option<i64>,
        ctx: &WriteContext,
    ) -> FhirResult<Written> {
        self.writes += 1;
        engine::put(&mut self.ops(), resource, if_match, ctx)
    }

    fn delete(
        &mut self,
        resource_type: &str,
        id: &str,
        if_match: Option<i64>,
        ctx: &WriteContext,
    ) -> FhirResult<Option<StoredResource>> {
        self.writes += 1;
        engine::delete(&mut self.ops(), resource_type, id, if_match, ctx)
    }

    fn purge(&mut self, resource_type: &str, id: &str) -> FhirResult<Option<i64>> {
        engine::purge(&mut self.ops(), resource_type, id)
    }

    fn forget_history(&mut self, resource_type: &str, id: &str) -> FhirResult<u64> {
        engine::forget_history(&mut self.ops(), resource_type, id)
    }

    fn read(&mut self, resource_type: &str, id: &str) -> FhirResult<Option<StoredResource>> {
        let sql = self.st.read.clone();
        engine::read(&mut self.ops(), &sql, resource_type, id)
    }

    fn search(&mut self, query: &SearchQuery, scope: &Scope) -> FhirResult<SearchResult> {
        engine::search(&mut self.ops(), query, scope)
    }

    fn audit_append(&mut self, records: &[Value]) -> FhirResult<Vec<AuditEntry>> {
        engine::audit_append(&mut self.ops(), records)
    }

    fn commit(mut self: Box<Self>) -> FhirResult<()> {
        self.done = true;
        if let Err(e) = self.conn.client.batch_execute("COMMIT") {
            let _ = self.conn.client.batch_execute("ROLLBACK");
            return Err(pg_err(e));
        }
        self.written.fetch_add(self.writes, Ordering::Relaxed);
        Ok(())
    }
}

impl Store for PgStore {
    fn backend(&self) -> &'static str {
        "postgres"
    }

    fn begin(&self) -> FhirResult<Box<dyn Transaction + '_>> {
        let mut conn = self.conn()?;
        conn.client.batch_execute("BEGIN").map_err(pg_err)?;
        Ok(Box::new(PgTransaction {
            conn,
            st: &self.st,
            done: false,
            writes: 0,
            written: &self.written,
        }))
    }

    fn read(&self, resource_type: &str, id: &str) -> FhirResult<Option<StoredResource>> {
        self.with_conn(|o| engine::read(o, &self.st.read, resource_type, id))
    }

    fn read_text(&self, resource_type: &str, id: &str) -> FhirResult<Option<StoredText>> {
        self.with_conn(|o| engine::read_text(o, &self.st.read_text, resource_type, id))
    }

    fn vread(
        &self,
        resource_type: &str,
        id: &str,
        version: i64,
    ) -> FhirResult<Option<StoredResource>> {
        let q = Built {
            sql: self.st.vread.clone(),
            params: vec![
                SqlValue::Text(resource_type.into()),
                SqlValue::Text(id.into()),
                SqlValue::Int(version),
            ],
        };
        self.with_conn(|o| Ok(o.rows(&q)?.pop().map(|r| r.res)))
    }

    fn history(&self, query: &HistoryQuery) -> FhirResult<Vec<StoredResource>> {
        let q = sql::history(Dialect::Postgres, query);
        self.with_conn(|o| Ok(o.rows(&q)?.into_iter().map(|r| r.res).collect()))
    }

    fn search(&self, query: &SearchQuery, scope: &Scope) -> FhirResult<SearchResult> {
        self.with_conn(|o| engine::search(o, query, scope))
    }

    fn search_ids(&self, query: &SearchQuery, scope: &Scope) -> FhirResult<Vec<String>> {
        self.with_conn(|o| engine::search_ids(o, query, scope))
    }

    fn search_text(&self, query: &SearchQuery, scope: &Scope) -> FhirResult<TextPage> {
        self.with_conn(|o| engine::search_text(o, query, scope))
    }

    fn search_latest(
        &self,
        query: &SearchQuery,
        scope: &Scope,
        latest: &LatestPer,
    ) -> FhirResult<SearchResult> {
        self.with_conn(|o| engine::search_latest(o, query, scope, latest))
    }

    fn scan(
        &self,
        resource_type: &str,
        after_id: Option<&str>,
        limit: usize,
    ) -> FhirResult<Vec<StoredResource>> {
        self.with_conn(|o| engine::scan(o, resource_type, after_id, limit))
    }

    fn patient_compartment(
        &self,
        patient_id: &str,
        scope: &Scope,
        count: usize,
        offset: usize,
    ) -> FhirResult<SearchResult> {
        self.with_conn(|o| engine::patient_compartment(o, patient_id, scope, count, offset))
    }

    fn audit_append(&self, records: &[Value]) -> FhirResult<Vec<AuditEntry>> {
        let mut tx = self.begin()?;
        let out = tx.audit_append(records)?;
        tx.commit()?;
        Ok(out)
    }

    fn audit_scan(&self, after_seq: i64, limit: usize) -> FhirResult<Vec<AuditEntry>> {
        let q = Built {
            sql: self.st.audit_scan.clone(),
            params: vec![
                SqlValue::Int(after_seq),
                SqlValue::Int(i64::try_from(limit).unwrap_or(i64::MAX)),
            ],
        };
        self.with_conn(|o| o.audit_rows(&q))
    }

    fn audit_query(&self, filter: &AuditFilter) -> FhirResult<Vec<AuditEntry>> {
        let q = sql::audit_query(
            Dialect::Postgres,
            &[AuditSource::Table("audit_log")],
            filter,
        );
        self.with_conn(|o| o.audit_rows(&q))
    }

    fn put_client_key(&self, key: &ClientKey) -> FhirResult<()> {
        let jwk = serde_json::to_string(&key.jwk)
            .map_err(|_| FhirError::internal("jwk could not be serialised"))?;
        let created = key.created.timestamp_millis();
        self.with_conn(|o| {
            let st = o.st;
            o.execute(
                &st.put_client_key,
                &[
                    &key.client_id,
                    &key.kid,
                    &key.org,
                    &key.role,
                    &key.user,
                    &jwk,
                    &created,
                    &key.revoked,
                ],
            )?;
            Ok(())
        })
    }

    fn client_keys(&self, client_id: &str) -> FhirResult<Vec<ClientKey>> {
        self.with_conn(|o| {
            let st = o.st;
            let rows = o.query(&st.client_keys, &[&client_id])?;
            rows.iter()
                .map(|r| {
                    let jwk: String = r.try_get(5).map_err(pg_err)?;
                    Ok(ClientKey {
                        client_id: r.try_get(0).map_err(pg_err)?,
                        kid: r.try_get(1).map_err(pg_err)?,
                        org: r.try_get(2).map_err(pg_err)?,
                        role: r.try_get(3).map_err(pg_err)?,
                        user: r.try_get(4).map_err(pg_err)?,
                        jwk: serde_json::from_str(&jwk)
                            .map_err(|_| FhirError::internal("stored jwk is not JSON"))?,
                        created: engine::ms_to_dt(r.try_get(6).map_err(pg_err)?)?,
                        revoked: r.try_get(7).map_err(pg_err)?,
                    })
                })
                .collect()
        })
    }

    fn schema_version(&self) -> FhirResult<i64> {
        self.with_conn(|o| {
            let rows = o.query(
                "SELECT COALESCE(MAX(version), 0)::bigint FROM schema_migrations",
                &[],
            )?;
            rows.first()
                .ok_or_else(|| FhirError::internal("no schema version"))?
                .try_get(0)
                .map_err(pg_err)
        })
    }

    fn size_bytes(&self) -> FhirResult<u64> {
        self.with_conn(|o| {
            let rows = o.query(
                "SELECT COALESCE(SUM(pg_total_relation_size(c.oid)), 0)::bigint FROM pg_class c \
                 JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = current_schema() AND c.relkind = 'r'",
                &[],
            )?;
            let n: i64 = rows.first().ok_or_else(|| FhirError::internal("no size"))?.try_get(0).map_err(pg_err)?;
            Ok(n.max(0) as u64)
        })
    }
}

impl crate::conformance::Harness for PgStore {
    fn store(&self) -> &dyn Store {
        self
    }
    fn raw_execute(&self, sql: &str) -> FhirResult<()> {
        PgStore::raw_execute(self, sql)
    }
}
