//! Embedded SQLite backend (the default): a data file and, beside it, the audit
//! files described below.
//!
//! One writer connection behind a mutex serialises all writes (SQLite allows
//! one writer at a time anyway; queuing in-process avoids busy retries), and a
//! small pool of reader connections serves reads and searches concurrently
//! thanks to WAL mode.
//!
//! Two files: the data file, and beside it the audit file ([`audit_file`]),
//! attached to every connection as `audit`. Audit records written with data
//! (`Transaction::audit_append`) stay in the data file, in the data's
//! transaction; stand-alone records (`Store::audit_append`: reads, searches,
//! denials) go to the audit file. One hash chain runs through both: its head is
//! the larger of the two files' heads, read and moved under the writer's mutex
//! (and SQLite's write locks on both files, which `BEGIN IMMEDIATE` takes). Why:
//! any commit to a file makes every reader connection of that file drop its page
//! cache, and each read commits its audit record; in their own file, those
//! commits leave the readers' caches of the data warm (docs/DECISIONS.md).
//!
//! A third file, the audit index file ([`audit_index_file`]), holds the indexes
//! of both files' audit records (by patient, organisation, user and time). An
//! indexer thread fills it in batches of up to `INDEX_BATCH` records, so that a
//! read's audit commit writes only the table's last page and the head, and a
//! write's audit record is one b-tree insertion at the end of `audit_log`;
//! records it has not reached yet are found by scanning each table's tail
//! ([`AuditSource::Indexed`]). It is derived data: deleting it (or finding it ahead
//! of the audit records) rebuilds it.

mod audit_index;

use std::path::{Path, PathBuf};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::Duration;

use rusqlite::config::DbConfig;
use rusqlite::types::{ToSqlOutput, ValueRef};
use rusqlite::{Connection, OpenFlags, OptionalExtension, params};
use serde_json::Value;
use tsunagi_fhir::search::{IndexEntry, IndexValue, SearchQuery};
use tsunagi_fhir::{FhirError, FhirResult};

use crate::api::*;
use crate::engine::{self, AuditColumns, Current, CurrentRow, Ops, PreparedResource, Row, TxOps};
use crate::schema;
use crate::sql::{self, AuditSource, Built, Dialect, SqlValue, Statements};

/// Prepared statements cached per connection (rusqlite's default of 16 is
/// fewer than the write path alone uses).
const STATEMENT_CACHE: usize = 256;
/// Reader connections at most; further readers wait for one to be returned
/// (reads are CPU-bound, so more connections than this only add memory).
const MAX_READERS: usize = 16;
/// Page cache of each reader connection, in KiB. Since the readers' caches are
/// no longer emptied by every read's audit commit (see [`audit_file`]), they fill:
/// at 32 MiB each, 16 readers took the server to 640 MiB under the platform
/// benchmark. This holds the upper B-tree levels the point reads and searches walk;
/// the leaves come from the OS cache.
const READER_CACHE_KIB: u32 = 8_192;
/// How long a connection waits for a lock held by another process before failing.
const BUSY_TIMEOUT_MS: u32 = 10_000;

/// Settings every connection gets. The query planner stability guarantee
/// (QPSG) makes a statement's plan independent of the values bound to it.
/// Without it, SQLite (built with STAT4, as rusqlite bundles it) marks cached
/// statements as plan-dependent on their parameters, and rusqlite's statement
/// cache clears the bindings when a statement is returned, which expires it: every
/// reuse of a cached statement was re-prepared (measured: each primary-key read
/// of the write path re-parsed and re-planned its SQL, 11-16 % of an import's
/// CPU). The search SQL steers the planner itself and the store runs no
/// ANALYZE, so no plan depended on bound values anyway
/// (`tests/sqlite_plans.rs` guards the plans).
fn configure(c: &Connection) -> FhirResult<()> {
    c.set_db_config(DbConfig::SQLITE_DBCONFIG_ENABLE_QPSG, true)
        .map_err(db_err)?;
    c.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
    Ok(())
}

/// `PRAGMA wal_autocheckpoint` of the writer connections for a workload, in 4 KiB
/// pages. A server checkpoints past 16 MiB, so each copy is short (it runs in the
/// committing thread, and the writes queued behind it wait). A bulk load lets the
/// log grow to 1 GiB, and copies what is left when the store is dropped: a page
/// that many batches touch (the upper levels of every index, the tails of the
/// version and audit tables) is then written to the database once per gigabyte of
/// log instead of once per batch, and the loader waits on far fewer checkpoint
/// syncs (measured on a 1,000,000-row recipient import: 7,581 → 9,603 rows/s with
/// the same CPU time; docs/BENCHMARKS.md). Never for a server: that long copy
/// would stall its writes.
fn checkpoint_pages(workload: Workload) -> u32 {
    match workload {
        Workload::Online => 4_000,
        Workload::BulkLoad => 262_144,
    }
}

/// Schema name of the attached audit file on every connection.
const AUDIT_SCHEMA: &str = "audit";

/// The table of stand-alone audit records, as the store's connections name it
/// (test hook for tampering).
pub const STANDALONE_AUDIT_TABLE: &str = "audit.audit_log";

/// The audit file of the database at `path`: `tsunagi.db` → `tsunagi.audit.db`.
/// Both files belong to the store: a backup or a move takes both (and their
/// `-wal` files).
pub fn audit_file(path: &Path) -> PathBuf {
    path.with_extension("audit.db")
}

/// Schema name of the attached audit index file on reader connections.
const AUDIT_INDEX_SCHEMA: &str = "auditidx";

/// The audit index file of the database at `path`: `tsunagi.db` →
/// `tsunagi.audit-index.db`. Derived from the audit records of both files;
/// backing it up is optional (a store rebuilds it when it is missing).
pub fn audit_index_file(path: &Path) -> PathBuf {
    path.with_extension("audit-index.db")
}

/// Records the indexer adds to the indexes per transaction at most.
const INDEX_BATCH: i64 = 20_000;
/// How long the indexer lets records gather after the first one arrives: larger
/// batches share the index pages they touch.
const INDEX_DELAY: Duration = Duration::from_millis(250);

/// The chain's head: the later of the two files' heads.
const AUDIT_HEAD: &str = "SELECT seq, hash FROM main.audit_head WHERE id = 1 \
     UNION ALL SELECT seq, hash FROM audit.audit_head WHERE id = 1 ORDER BY seq DESC LIMIT 1";
const AUDIT_FILE_INSERT: &str = "INSERT INTO audit.audit_log (seq, recorded, record, prev_hash, hash, patient, org, usr, purpose) \
     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)";
const AUDIT_FILE_SET_HEAD: &str = "UPDATE audit.audit_head SET seq = ?1, hash = ?2 WHERE id = 1";
/// How far the audit index file covers the audit records (of both files).
const AUDIT_INDEXED: &str = "SELECT upto FROM auditidx.audit_indexed WHERE id = 1";
/// Records after a seq from both files, in chain order.
const AUDIT_SCAN: &str = "SELECT seq, recorded, record, prev_hash, hash FROM main.audit_log WHERE seq > ?1 \
     UNION ALL SELECT seq, recorded, record, prev_hash, hash FROM audit.audit_log WHERE seq > ?1 \
     ORDER BY seq LIMIT ?2";
/// The audit index file's `src` of the data file's records.
const SRC_DATA: i64 = 0;
/// The audit index file's `src` of the audit file's records.
const SRC_AUDIT_FILE: i64 = 1;
/// What an audit query reads; the audit index file covers both files' records up
/// to `upto`.
fn audit_sources(upto: i64) -> [AuditSource<'static>; 2] {
    [
        AuditSource::Indexed {
            table: "main.audit_log",
            schema: AUDIT_INDEX_SCHEMA,
            src: SRC_DATA,
            upto,
        },
        AuditSource::Indexed {
            table: "audit.audit_log",
            schema: AUDIT_INDEX_SCHEMA,
            src: SRC_AUDIT_FILE,
            upto,
        },
    ]
}

/// Which file a transaction's audit records go to.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum AuditTo {
    /// The data file, atomically with the transaction's data.
    Data,
    /// The audit file (stand-alone records).
    AuditFile,
}

/// Attaches the database file `file` to `c` as `schema`.
fn attach(c: &Connection, file: &Path, schema: &str) -> FhirResult<()> {
    let name = file.to_str().ok_or_else(|| {
        FhirError::internal(format!("the path of the {schema} database is not UTF-8"))
    })?;
    c.execute(&format!("ATTACH DATABASE ?1 AS {schema}"), [name])
        .map_err(db_err)?;
    Ok(())
}

/// Attaches the audit file as `audit` with the data file's durability.
fn attach_audit(c: &Connection, file: &Path) -> FhirResult<()> {
    attach(c, file, AUDIT_SCHEMA)?;
    c.execute_batch(&format!("PRAGMA {AUDIT_SCHEMA}.synchronous = FULL;"))
        .map_err(db_err)
}

/// Creates or upgrades the attached audit file's schema (its `user_version`).
fn migrate_audit_file(c: &Connection) -> FhirResult<()> {
    migrate_by_user_version(c, AUDIT_SCHEMA, schema::SQLITE_AUDIT_FILE, "audit file")
}

/// Applies the `migrations` (version = index + 1) that database `db` of `c` has
/// not had yet, by its `user_version`, in one transaction.
fn migrate_by_user_version(
    c: &Connection,
    db: &str,
    migrations: &[&str],
    what: &str,
) -> FhirResult<()> {
    c.execute_batch(&format!("PRAGMA {db}.journal_mode = WAL;"))
        .map_err(db_err)?;
    immediate(c, || {
        let current: i64 = c
            .query_row(&format!("PRAGMA {db}.user_version"), [], |r| r.get(0))
            .map_err(db_err)?;
        let known = migrations.len() as i64;
        if current > known {
            return Err(FhirError::internal(format!(
                "the {what} has schema version {current}; this build knows up to {known}"
            )));
        }
        for (i, ddl) in migrations.iter().enumerate() {
            let version = i as i64 + 1;
            if version <= current {
                continue;
            }
            c.execute_batch(ddl).map_err(db_err)?;
            c.execute_batch(&format!("PRAGMA {db}.user_version = {version}"))
                .map_err(db_err)?;
            tracing::info!(version, what, "sqlite migration applied");
        }
        Ok(())
    })
}

/// Runs `f` in a `BEGIN IMMEDIATE` transaction on `c`: committed when it
/// succeeds, rolled back when it or the commit fails.
fn immediate<T>(c: &Connection, f: impl FnOnce() -> FhirResult<T>) -> FhirResult<T> {
    c.execute_batch("BEGIN IMMEDIATE").map_err(db_err)?;
    let result = f().and_then(|v| c.execute_batch("COMMIT").map_err(db_err).map(|()| v));
    if result.is_err() {
        let _ = c.execute_batch("ROLLBACK");
    }
    result
}

/// The embedded store.
pub struct SqliteStore {
    path: PathBuf,
    audit_path: PathBuf,
    workload: Workload,
    writer: Mutex<Connection>,
    /// Commits stand-alone audit batches (reads and searches) to the audit file;
    /// used only while holding `writer`. See [`SqliteStore::open`].
    audit_writer: Mutex<Connection>,
    readers: Mutex<ReaderPool>,
    reader_free: Condvar,
    st: Statements,
    audit_index_path: PathBuf,
    /// Fills the audit index file; stopped when the store is dropped.
    indexer: audit_index::AuditIndexer,
}

pub(crate) fn db_err(e: rusqlite::Error) -> FhirError {
    if let rusqlite::Error::SqliteFailure(f, _) = &e
        && matches!(
            f.code,
            rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked
        )
    {
        tracing::warn!(error = %e, "sqlite busy");
        return FhirError::unavailable("the database is busy; retry");
    }
    tracing::error!(error = %e, "sqlite error");
    FhirError::internal("storage error")
}

impl rusqlite::ToSql for SqlValue {
    fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
        Ok(ToSqlOutput::Borrowed(match self {
            SqlValue::Text(s) => ValueRef::Text(s.as_bytes()),
            SqlValue::Int(i) => ValueRef::Integer(*i),
            SqlValue::Real(f) => ValueRef::Real(*f),
        }))
    }
}

impl SqliteStore {
    /// Opens (creating if needed) the database file and applies pending migrations.
    ///
    /// Durability: WAL mode with `synchronous=FULL`, so the WAL is fsynced before
    /// a commit returns. A write acknowledged to a client therefore survives
    /// `kill -9` of the server *and* an OS crash or power loss; `NORMAL` would
    /// only survive the former and could silently drop acknowledged writes.
    pub fn open(path: &Path) -> FhirResult<SqliteStore> {
        SqliteStore::open_for(path, Workload::Online)
    }

    /// [`SqliteStore::open`] tuned for `workload`.
    pub fn open_for(path: &Path, workload: Workload) -> FhirResult<SqliteStore> {
        let checkpoint = checkpoint_pages(workload);
        let writer = Connection::open(path).map_err(db_err)?;
        writer
            .execute_batch(&format!(
                "PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}; PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL; \
                 PRAGMA foreign_keys = OFF; PRAGMA temp_store = MEMORY; PRAGMA cache_size = -65536; \
                 PRAGMA wal_autocheckpoint = {checkpoint};"
            ))
            .map_err(db_err)?;
        // room for every static statement plus the recent search shapes
        configure(&writer)?;
        let audit_path = audit_file(path);
        attach_audit(&writer, &audit_path)?;
        migrate_audit_file(&writer)?;
        let st = Statements::new(Dialect::Sqlite);
        migrate(&writer, &st)?;
        // Every COMMIT walks the committing connection's page-cache hash table
        // (pcache1TruncateUnsafe, from pager_end_transaction), whose size follows
        // the cache: with the writer's 64 MiB it was 7 % of the server's CPU under
        // reads, each of which commits an audit batch. Those batches touch only
        // the audit file, so they commit on a second connection with a small
        // cache (always under the writer's mutex: no SQLite lock waits).
        let audit_writer = Connection::open(path).map_err(db_err)?;
        audit_writer
            .execute_batch(&format!(
                "PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}; PRAGMA synchronous = FULL; \
                 PRAGMA foreign_keys = OFF; PRAGMA temp_store = MEMORY; PRAGMA cache_size = -1024; \
                 PRAGMA wal_autocheckpoint = {checkpoint};"
            ))
            .map_err(db_err)?;
        configure(&audit_writer)?;
        attach_audit(&audit_writer, &audit_path)?;
        let audit_index_path = audit_index_file(path);
        let indexer = audit_index::AuditIndexer::start(&audit_index_path, &audit_path, path)?;

        let store = SqliteStore {
            path: path.to_path_buf(),
            audit_path,
            workload,
            writer: Mutex::new(writer),
            audit_writer: Mutex::new(audit_writer),
            readers: Mutex::new(ReaderPool {
                idle: Vec::new(),
                open: 0,
            }),
            reader_free: Condvar::new(),
            st,
            audit_index_path,
            indexer,
        };
        // Open one reader now so a bad path or permission fails at startup.
        let r = store.reader()?;
        drop(r);
        Ok(store)
    }

    fn open_reader(&self) -> FhirResult<Connection> {
        let flags = OpenFlags::SQLITE_OPEN_READ_WRITE
            | OpenFlags::SQLITE_OPEN_NO_MUTEX
            | OpenFlags::SQLITE_OPEN_URI;
        let c = Connection::open_with_flags(&self.path, flags).map_err(db_err)?;
        c.execute_batch(&format!(
            "PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}; PRAGMA query_only = ON; PRAGMA temp_store = MEMORY; \
             PRAGMA cache_size = -{READER_CACHE_KIB};"
        ))
        .map_err(db_err)?;
        configure(&c)?;
        attach_audit(&c, &self.audit_path)?;
        attach(&c, &self.audit_index_path, AUDIT_INDEX_SCHEMA)?;
        Ok(c)
    }

    /// Adds every audit record stored so far to the audit index file now, rather
    /// than when the indexer thread next runs. Queries do not need it (they read
    /// what the index does not cover yet from the tables' tails); tests and tools
    /// do, to reach the indexed state.
    pub fn index_audit_now(&self) -> FhirResult<()> {
        self.indexer.catch_up()
    }

    /// An idle reader, a new one while fewer than [`MAX_READERS`] are open, or
    /// the next one returned.
    fn reader(&self) -> FhirResult<Reader<'_>> {
        let mut pool = self.readers.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if let Some(c) = pool.idle.pop() {
                return Ok(Reader {
                    store: self,
                    conn: Some(c),
                });
            }
            if pool.open < MAX_READERS {
                pool.open += 1;
                drop(pool);
                return match self.open_reader() {
                    Ok(c) => Ok(Reader {
                        store: self,
                        conn: Some(c),
                    }),
                    Err(e) => {
                        self.readers.lock().unwrap_or_else(|p| p.into_inner()).open -= 1;
                        self.reader_free.notify_one();
                        Err(e)
                    }
                };
            }
            pool = self
                .reader_free
                .wait(pool)
                .unwrap_or_else(|p| p.into_inner());
        }
    }

    /// The writer, with any transaction a panicking holder left open rolled back.
    fn writer(&self) -> MutexGuard<'_, Connection> {
        let guard = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        if !guard.is_autocommit() {
            let _ = guard.execute_batch("ROLLBACK");
        }
        guard
    }

    /// Test hook: runs raw SQL on the writer connection (used by the conformance
    /// suite to tamper with the audit log). Not for production use.
    #[doc(hidden)]
    pub fn raw_execute(&self, sql: &str) -> FhirResult<()> {
        self.writer().execute_batch(sql).map_err(db_err)
    }

    fn with_reader<T>(&self, f: impl FnOnce(&mut SqliteOps<'_>) -> FhirResult<T>) -> FhirResult<T> {
        let r = self.reader()?;
        let Some(conn) = r.conn.as_ref() else {
            return Err(FhirError::internal("reader unavailable"));
        };
        f(&mut SqliteOps {
            conn,
            st: &self.st,
            audit_to: AuditTo::Data,
        })
    }
}

impl Drop for SqliteStore {
    /// A bulk load leaves up to 1 GiB of log behind; copy it now, in the loading
    /// process, rather than in the next commit of a server sharing the file.
    /// PASSIVE: never waits for that server's readers; what it cannot copy, the
    /// server's own checkpoints copy later.
    fn drop(&mut self) {
        if self.workload != Workload::BulkLoad {
            return;
        }
        let w = self.writer.get_mut().unwrap_or_else(|e| e.into_inner());
        if let Err(e) = w.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(())) {
            tracing::warn!(error = %e, "final checkpoint of a bulk load");
        }
    }
}

/// Reader connections: idle ones and how many exist in all.
struct ReaderPool {
    idle: Vec<Connection>,
    open: usize,
}

/// A pooled reader connection; returned to the pool on drop.
struct Reader<'a> {
    store: &'a SqliteStore,
    conn: Option<Connection>,
}

impl Drop for Reader<'_> {
    fn drop(&mut self) {
        if let Some(c) = self.conn.take() {
            let mut pool = self.store.readers.lock().unwrap_or_else(|p| p.into_inner());
            pool.idle.push(c);
            drop(pool);
            self.store.reader_free.notify_one();
        }
    }
}

fn migrate(conn: &Connection, st: &Statements) -> FhirResult<()> {
    immediate(conn, || {
        conn.execute_batch(schema::bootstrap(Dialect::Sqlite))
            .map_err(db_err)?;
        let current: i64 = conn
            .query_row(
                "SELECT COALESCE(MAX(version), 0) FROM schema_migrations",
                [],
                |r| r.get(0),
            )
            .map_err(db_err)?;
        schema::refuse_newer(current)?;
        let mut reindex = false;
        for (version, ddl) in schema::migrations(Dialect::Sqlite) {
            if version <= current {
                continue;
            }
            conn.execute_batch(&ddl).map_err(db_err)?;
            conn.execute(
                "INSERT INTO schema_migrations (version, applied_at) VALUES (?1, ?2)",
                params![version, engine::format_instant(&chrono::Utc::now())],
            )
            .map_err(db_err)?;
            tracing::info!(version, "sqlite migration applied");
            reindex |= schema::REINDEX_AFTER.contains(&version);
        }
        if reindex {
            let n = engine::reindex_all(&mut SqliteOps {
                conn,
                st,
                audit_to: AuditTo::Data,
            })?;
            tracing::info!(resources = n, "search index rebuilt");
        }
        Ok(())
    })
}

/// Primitive operations on one SQLite connection.
struct SqliteOps<'c> {
    conn: &'c Connection,
    st: &'c Statements,
    audit_to: AuditTo,
}

/// rid, rt, id, version, last_updated, deleted, body, author_org.
type RawRow = (
    i64,
    String,
    String,
    i64,
    i64,
    bool,
    Option<String>,
    Option<String>,
);

fn row_of(r: &rusqlite::Row<'_>) -> rusqlite::Result<RawRow> {
    RawRow::try_from(r)
}

impl Ops for SqliteOps<'_> {
    fn dialect(&self) -> Dialect {
        Dialect::Sqlite
    }

    fn rows(&mut self, q: &Built) -> FhirResult<Vec<Row>> {
        let mut stmt = self.conn.prepare_cached(&q.sql).map_err(db_err)?;
        let raw = stmt
            .query_map(rusqlite::params_from_iter(q.params.iter()), row_of)
            .map_err(db_err)?
            .collect::<Result<Vec<_>, _>>()
            .map_err(db_err)?;
        raw.into_iter()
            .map(|(rid, rt, id, version, lu, deleted, body, author_org)| {
                Ok(Row {
                    rid,
                    res: StoredResource {
                        resource_type: rt,
                        id,
                        version,
                        last_updated: engine::ms_to_dt(lu)?,
                        deleted,
                        resource: engine::parse_body(body)?,
                        author_org,
                    },
                })
            })
            .collect()
    }

    fn count(&mut self, q: &Built) -> FhirResult<u64> {
        let mut stmt = self.conn.prepare_cached(&q.sql).map_err(db_err)?;
        let n: i64 = stmt
            .query_row(rusqlite::params_from_iter(q.params.iter()), |r| r.get(0))
            .map_err(db_err)?;
        Ok(n.max(0) as u64)
    }

    fn texts(&mut self, q: &Built) -> FhirResult<Vec<String>> {
        let mut stmt = self.conn.prepare_cached(&q.sql).map_err(db_err)?;
        let rows = stmt
            .query_map(rusqlite::params_from_iter(q.params.iter()), |r| r.get(0))
            .map_err(db_err)?;
        rows.map(|r| r.map_err(db_err)).collect()
    }

    fn text_rows(&mut self, q: &Built) -> FhirResult<Vec<engine::TextRow>> {
        let mut stmt = self.conn.prepare_cached(&q.sql).map_err(db_err)?;
        stmt.query_map(rusqlite::params_from_iter(q.params.iter()), |r| {
            engine::TextRow::try_from(r)
        })
        .map_err(db_err)?
        .collect::<Result<Vec<_>, _>>()
        .map_err(db_err)
    }
}

/// Index tables with their column lists and column counts, in the order of
/// [`index_table`].
const INDEX_INSERT: [(&str, usize); 6] = [
    ("ix_string (rid, k, norm, exact)", 4),
    ("ix_token (rid, k, system, code)", 4),
    ("ix_date (rid, k, lo, hi)", 4),
    ("ix_number (rid, k, value, system, code)", 5),
    ("ix_reference (rid, k, target_type, target_id)", 4),
    ("ix_uri (rid, k, value)", 3),
];
/// Rows per multi-row index `INSERT` (bounds the distinct cached statements).
const INDEX_ROWS_PER_INSERT: usize = 8;

fn index_table(v: &IndexValue) -> usize {
    match v {
        IndexValue::String { .. } => 0,
        IndexValue::Token { .. } => 1,
        IndexValue::Date { .. } => 2,
        IndexValue::Number { .. } | IndexValue::Quantity { .. } => 3,
        IndexValue::Reference { .. } => 4,
        IndexValue::Uri(_) => 5,
    }
}

/// `INSERT OR IGNORE INTO table (cols) VALUES (?, ..), (?, ..)` for `rows` rows;
/// an entry a resource already has (its key is the whole row) is one entry.
///
/// `OR IGNORE` rather than `ON CONFLICT DO NOTHING`: with no constraint able to
/// abort the statement (the engine never binds NULL), SQLite keeps no statement
/// journal for it. With one, every page the insert touched was copied into that
/// journal: 7.7 % of an import's samples. Nothing relies on statement-level
/// rollback: a failed write rolls back its whole transaction.
fn multi_row_insert(table: &str, columns: usize, rows: usize) -> String {
    let one = format!("({})", vec!["?"; columns].join(", "));
    format!(
        "INSERT OR IGNORE INTO {table} VALUES {}",
        vec![one; rows].join(", ")
    )
}

const CLEAR_INDEX: [&str; 6] = [
    "DELETE FROM ix_string WHERE rid = ?1",
    "DELETE FROM ix_token WHERE rid = ?1",
    "DELETE FROM ix_date WHERE rid = ?1",
    "DELETE FROM ix_number WHERE rid = ?1",
    "DELETE FROM ix_reference WHERE rid = ?1",
    "DELETE FROM ix_uri WHERE rid = ?1",
];

impl TxOps for SqliteOps<'_> {
    fn current(&mut self, rt: &str, id: &str) -> FhirResult<Option<Current>> {
        let mut stmt = self.conn.prepare_cached(&self.st.current).map_err(db_err)?;
        stmt.query_row(params![rt, id], |r| {
            Ok(Current {
                rid: r.get(0)?,
                version: r.get(1)?,
                last_updated: r.get(2)?,
                deleted: r.get(3)?,
            })
        })
        .optional()
        .map_err(db_err)
    }

    fn insert_current(&mut self, rt: &str, id: &str, row: &CurrentRow) -> FhirResult<Option<i64>> {
        let mut stmt = self
            .conn
            .prepare_cached(&self.st.insert_current)
            .map_err(db_err)?;
        stmt.query_row(
            params![
                rt,
                id,
                row.version,
                row.last_updated,
                row.deleted,
                row.patient_id,
                row.author_org
            ],
            |r| r.get(0),
        )
        .optional()
        .map_err(db_err)
    }

    fn update_current(&mut self, rid: i64, row: &CurrentRow) -> FhirResult<()> {
        let mut stmt = self
            .conn
            .prepare_cached(&self.st.update_current)
            .map_err(db_err)?;
        stmt.execute(params![
            rid,
            row.version,
            row.last_updated,
            row.deleted,
            row.patient_id,
            row.author_org
        ])
        .map_err(db_err)?;
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
        let mut stmt = self
            .conn
            .prepare_cached(&self.st.insert_version)
            .map_err(db_err)?;
        stmt.execute(params![
            rid,
            version,
            rt,
            last_updated,
            deleted,
            ctx.org,
            ctx.user,
            body
        ])
        .map_err(db_err)?;
        Ok(())
    }

    fn remove_resource(&mut self, rid: i64) -> FhirResult<()> {
        for sql in [
            "DELETE FROM resource_version WHERE rid = ?1",
            "DELETE FROM resource_current WHERE rid = ?1",
        ] {
            self.conn
                .prepare_cached(sql)
                .map_err(db_err)?
                .execute([rid])
                .map_err(db_err)?;
        }
        Ok(())
    }

    fn remove_versions_before(&mut self, rid: i64, version: i64) -> FhirResult<u64> {
        let n = self
            .conn
            .prepare_cached("DELETE FROM resource_version WHERE rid = ?1 AND version < ?2")
            .map_err(db_err)?
            .execute(params![rid, version])
            .map_err(db_err)?;
        Ok(n as u64)
    }

    fn clear_index(&mut self, rid: i64) -> FhirResult<()> {
        for sql in CLEAR_INDEX {
            self.conn
                .prepare_cached(sql)
                .map_err(db_err)?
                .execute([rid])
                .map_err(db_err)?;
        }
        Ok(())
    }

    /// One multi-row `INSERT` per index table (up to [`INDEX_ROWS_PER_INSERT`]
    /// rows each) instead of one statement per entry: a resource's entries
    /// cost a few statement executions, not one each.
    fn insert_index(&mut self, rid: i64, rt: &str, entries: &[IndexEntry]) -> FhirResult<()> {
        for (t, (table, columns)) in INDEX_INSERT.iter().enumerate() {
            let of_table: Vec<&IndexEntry> = entries
                .iter()
                .filter(|e| index_table(&e.value) == t)
                .collect();
            for chunk in of_table.chunks(INDEX_ROWS_PER_INSERT) {
                let mut values: Vec<rusqlite::types::Value> =
                    Vec::with_capacity(chunk.len() * columns);
                for e in chunk {
                    use rusqlite::types::Value as V;
                    let text = |s: &str| V::Text(s.to_string());
                    let opt = |s: &Option<String>| text(s.as_deref().unwrap_or(sql::ABSENT));
                    values.push(V::Integer(rid));
                    values.push(V::Integer(sql::param_key(rt, &e.param)));
                    match &e.value {
                        IndexValue::String { norm, exact } => {
                            values.extend([text(norm), text(exact)]);
                        }
                        IndexValue::Token { system, code } => {
                            values.extend([opt(system), text(code)]);
                        }
                        IndexValue::Date { lo, hi } => {
                            values.extend([V::Integer(*lo), V::Integer(*hi)]);
                        }
                        IndexValue::Number { value } => {
                            values.extend([V::Real(*value), text(sql::ABSENT), text(sql::ABSENT)]);
                        }
                        IndexValue::Quantity {
                            value,
                            system,
                            code,
                        } => {
                            values.extend([V::Real(*value), opt(system), opt(code)]);
                        }
                        IndexValue::Reference {
                            target_type,
                            target_id,
                        } => {
                            values.extend([opt(target_type), text(target_id)]);
                        }
                        IndexValue::Uri(u) => values.push(text(u)),
                    }
                }
                let sql = multi_row_insert(table, *columns, chunk.len());
                self.conn
                    .prepare_cached(&sql)
                    .map_err(db_err)?
                    .execute(rusqlite::params_from_iter(values))
                    .map_err(db_err)?;
            }
        }
        Ok(())
    }

    fn audit_head(&mut self) -> FhirResult<(i64, String)> {
        let mut stmt = self.conn.prepare_cached(AUDIT_HEAD).map_err(db_err)?;
        stmt.query_row([], |r| Ok((r.get(0)?, r.get(1)?)))
            .map_err(db_err)
    }

    fn audit_insert(&mut self, e: &AuditEntry, record: &str, c: &AuditColumns) -> FhirResult<()> {
        let sql = match self.audit_to {
            AuditTo::Data => &self.st.audit_insert,
            AuditTo::AuditFile => AUDIT_FILE_INSERT,
        };
        let mut stmt = self.conn.prepare_cached(sql).map_err(db_err)?;
        stmt.execute(params![
            e.seq,
            e.recorded.timestamp_millis(),
            record,
            e.prev_hash,
            e.hash,
            c.patient,
            c.org,
            c.user,
            c.purpose
        ])
        .map_err(db_err)?;
        Ok(())
    }

    fn audit_set_head(&mut self, seq: i64, hash: &str) -> FhirResult<()> {
        let sql = match self.audit_to {
            AuditTo::Data => &self.st.audit_set_head,
            AuditTo::AuditFile => AUDIT_FILE_SET_HEAD,
        };
        let mut stmt = self.conn.prepare_cached(sql).map_err(db_err)?;
        stmt.execute(params![seq, hash]).map_err(db_err)?;
        Ok(())
    }
}

/// A write transaction holding the writer connection: `BEGIN IMMEDIATE` on
/// start, `ROLLBACK` when dropped uncommitted.
pub struct SqliteTransaction<'a> {
    conn: MutexGuard<'a, Connection>,
    st: &'a Statements,
    audit_to: AuditTo,
    done: bool,
    /// Told after a commit that appended audit records.
    indexer: &'a audit_index::AuditIndexer,
    audited: bool,
}

impl SqliteTransaction<'_> {
    fn ops(&self) -> SqliteOps<'_> {
        SqliteOps {
            conn: &self.conn,
            st: self.st,
            audit_to: self.audit_to,
        }
    }
}

impl Drop for SqliteTransaction<'_> {
    fn drop(&mut self) {
        if !self.done
            && let Err(e) = self.conn.execute_batch("ROLLBACK")
        {
            tracing::error!(error = %e, "sqlite rollback failed");
        }
    }
}

impl Transaction for SqliteTransaction<'_> {
    fn create(
        &mut self,
        resource_type: &str,
        id: &str,
        resource: Value,
        ctx: &WriteContext,
    ) -> FhirResult<StoredResource> {
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
        engine::update(&mut self.ops(), resource_type, id, resource, if_match, ctx)
    }

    fn put(
        &mut self,
        resource: &PreparedResource,
        if_match: Option<i64>,
        ctx: &WriteContext,
    ) -> FhirResult<Written> {
        engine::put(&mut self.ops(), resource, if_match, ctx)
    }

    fn delete(
        &mut self,
        resource_type: &str,
        id: &str,
        if_match: Option<i64>,
        ctx: &WriteContext,
    ) -> FhirResult<Option<StoredResource>> {
        engine::delete(&mut self.ops(), resource_type, id, if_match, ctx)
    }

    fn purge(&mut self, resource_type: &str, id: &str) -> FhirResult<Option<i64>> {
        engine::purge(&mut self.ops(), resource_type, id)
    }

    fn forget_history(&mut self, resource_type: &str, id: &str) -> FhirResult<u64> {
        engine::forget_history(&mut self.ops(), resource_type, id)
    }

    fn read(&mut self, resource_type: &str, id: &str) -> FhirResult<Option<StoredResource>> {
        engine::read(&mut self.ops(), &self.st.read, resource_type, id)
    }

    fn search(&mut self, query: &SearchQuery, scope: &Scope) -> FhirResult<SearchResult> {
        engine::search(&mut self.ops(), query, scope)
    }

    fn audit_append(&mut self, records: &[Value]) -> FhirResult<Vec<AuditEntry>> {
        self.audited |= !records.is_empty();
        engine::audit_append(&mut self.ops(), records)
    }

    fn commit(mut self: Box<Self>) -> FhirResult<()> {
        self.done = true;
        if let Err(e) = self.conn.execute_batch("COMMIT") {
            let _ = self.conn.execute_batch("ROLLBACK");
            return Err(db_err(e));
        }
        if self.audited {
            self.indexer.notify();
        }
        Ok(())
    }
}

fn audit_rows(conn: &Connection, q: &Built) -> FhirResult<Vec<AuditEntry>> {
    let mut stmt = conn.prepare_cached(&q.sql).map_err(db_err)?;
    let raw = stmt
        .query_map(rusqlite::params_from_iter(q.params.iter()), |r| {
            Ok((
                r.get::<_, i64>(0)?,
                r.get::<_, i64>(1)?,
                r.get::<_, String>(2)?,
                r.get(3)?,
                r.get(4)?,
            ))
        })
        .map_err(db_err)?
        .collect::<Result<Vec<_>, _>>()
        .map_err(db_err)?;
    raw.into_iter()
        .map(|(s, t, rec, p, h)| engine::audit_entry(s, t, &rec, p, h))
        .collect()
}

impl Store for SqliteStore {
    fn backend(&self) -> &'static str {
        "sqlite"
    }

    /// Waits for the writer connection. A thread holding a transaction must not
    /// start another (or call `audit_append`/`put_client_key`) before it ends:
    /// that would wait on itself.
    fn begin(&self) -> FhirResult<Box<dyn Transaction + '_>> {
        let conn = self.writer();
        conn.execute_batch("BEGIN IMMEDIATE").map_err(db_err)?;
        Ok(Box::new(SqliteTransaction {
            conn,
            st: &self.st,
            audit_to: AuditTo::Data,
            done: false,
            indexer: &self.indexer,
            audited: false,
        }))
    }

    fn read(&self, resource_type: &str, id: &str) -> FhirResult<Option<StoredResource>> {
        self.with_reader(|o| engine::read(o, &self.st.read, resource_type, id))
    }

    fn read_text(&self, resource_type: &str, id: &str) -> FhirResult<Option<StoredText>> {
        self.with_reader(|o| engine::read_text(o, &self.st.read_text, resource_type, id))
    }

    /// A primary-key read is a few B-tree pages, normally cached: tens of
    /// microseconds, less than the two thread hand-offs of the blocking pool.
    fn inline_point_reads(&self) -> bool {
        true
    }

    fn vread(
        &self,
        resource_type: &str,
        id: &str,
        version: i64,
    ) -> FhirResult<Option<StoredResource>> {
        self.with_reader(|o| {
            let q = Built {
                sql: self.st.vread.clone(),
                params: vec![
                    SqlValue::Text(resource_type.into()),
                    SqlValue::Text(id.into()),
                    SqlValue::Int(version),
                ],
            };
            Ok(o.rows(&q)?.pop().map(|r| r.res))
        })
    }

    fn history(&self, query: &HistoryQuery) -> FhirResult<Vec<StoredResource>> {
        let q = sql::history(Dialect::Sqlite, query);
        self.with_reader(|o| Ok(o.rows(&q)?.into_iter().map(|r| r.res).collect()))
    }

    fn search(&self, query: &SearchQuery, scope: &Scope) -> FhirResult<SearchResult> {
        self.with_reader(|o| engine::search(o, query, scope))
    }

    fn search_ids(&self, query: &SearchQuery, scope: &Scope) -> FhirResult<Vec<String>> {
        self.with_reader(|o| engine::search_ids(o, query, scope))
    }

    fn search_text(&self, query: &SearchQuery, scope: &Scope) -> FhirResult<TextPage> {
        self.with_reader(|o| engine::search_text(o, query, scope))
    }

    fn search_latest(
        &self,
        query: &SearchQuery,
        scope: &Scope,
        latest: &LatestPer,
    ) -> FhirResult<SearchResult> {
        self.with_reader(|o| engine::search_latest(o, query, scope, latest))
    }

    fn scan(
        &self,
        resource_type: &str,
        after_id: Option<&str>,
        limit: usize,
    ) -> FhirResult<Vec<StoredResource>> {
        self.with_reader(|o| engine::scan(o, resource_type, after_id, limit))
    }

    fn patient_compartment(
        &self,
        patient_id: &str,
        scope: &Scope,
        count: usize,
        offset: usize,
    ) -> FhirResult<SearchResult> {
        self.with_reader(|o| engine::patient_compartment(o, patient_id, scope, count, offset))
    }

    fn audit_append(&self, records: &[Value]) -> FhirResult<Vec<AuditEntry>> {
        // the writer's mutex orders this batch with every other write
        let _writer = self.writer();
        let conn = self.audit_writer.lock().unwrap_or_else(|p| p.into_inner());
        if !conn.is_autocommit() {
            let _ = conn.execute_batch("ROLLBACK");
        }
        conn.execute_batch("BEGIN IMMEDIATE").map_err(db_err)?;
        let mut tx = Box::new(SqliteTransaction {
            conn,
            st: &self.st,
            audit_to: AuditTo::AuditFile,
            done: false,
            indexer: &self.indexer,
            audited: false,
        });
        let out = tx.audit_append(records)?;
        tx.commit()?;
        Ok(out)
    }

    fn audit_scan(&self, after_seq: i64, limit: usize) -> FhirResult<Vec<AuditEntry>> {
        let q = Built {
            sql: AUDIT_SCAN.to_string(),
            params: vec![
                SqlValue::Int(after_seq),
                SqlValue::Int(i64::try_from(limit).unwrap_or(i64::MAX)),
            ],
        };
        self.with_reader(|o| audit_rows(o.conn, &q))
    }

    fn audit_query(&self, filter: &AuditFilter) -> FhirResult<Vec<AuditEntry>> {
        self.with_reader(|o| {
            // `upto` first: from then on the index holds every record up to it (it
            // only grows), and the query takes the later ones from the tables' tails
            let upto: i64 = o
                .conn
                .prepare_cached(AUDIT_INDEXED)
                .and_then(|mut s| s.query_row([], |r| r.get(0)))
                .map_err(db_err)?;
            let q = sql::audit_query(Dialect::Sqlite, &audit_sources(upto), filter);
            audit_rows(o.conn, &q)
        })
    }

    fn put_client_key(&self, key: &ClientKey) -> FhirResult<()> {
        let conn = self.writer();
        let jwk = serde_json::to_string(&key.jwk)
            .map_err(|_| FhirError::internal("jwk could not be serialised"))?;
        conn.prepare_cached(&self.st.put_client_key)
            .map_err(db_err)?
            .execute(params![
                key.client_id,
                key.kid,
                key.org,
                key.role,
                key.user,
                jwk,
                key.created.timestamp_millis(),
                key.revoked
            ])
            .map_err(db_err)?;
        Ok(())
    }

    fn client_keys(&self, client_id: &str) -> FhirResult<Vec<ClientKey>> {
        self.with_reader(|o| {
            let mut stmt = o
                .conn
                .prepare_cached(&self.st.client_keys)
                .map_err(db_err)?;
            let raw = stmt
                .query_map([client_id], |r| {
                    Ok((
                        r.get::<_, String>(0)?,
                        r.get::<_, String>(1)?,
                        r.get::<_, String>(2)?,
                        r.get::<_, String>(3)?,
                        r.get::<_, Option<String>>(4)?,
                        r.get::<_, String>(5)?,
                        r.get::<_, i64>(6)?,
                        r.get::<_, bool>(7)?,
                    ))
                })
                .map_err(db_err)?
                .collect::<Result<Vec<_>, _>>()
                .map_err(db_err)?;
            raw.into_iter()
                .map(|(client_id, kid, org, role, user, jwk, created, revoked)| {
                    Ok(ClientKey {
                        client_id,
                        org,
                        kid,
                        role,
                        user,
                        jwk: serde_json::from_str(&jwk)
                            .map_err(|_| FhirError::internal("stored jwk is not JSON"))?,
                        created: engine::ms_to_dt(created)?,
                        revoked,
                    })
                })
                .collect()
        })
    }

    fn schema_version(&self) -> FhirResult<i64> {
        self.with_reader(|o| {
            o.conn
                .query_row(&self.st.schema_version, [], |r| r.get(0))
                .map_err(db_err)
        })
    }

    fn size_bytes(&self) -> FhirResult<u64> {
        // both files' pages as SQLite counts them, plus their logs
        let pages: i64 = self.with_reader(|o| {
            o.conn
                .query_row(
                    "SELECT (SELECT page_count * page_size FROM pragma_page_count('main'), pragma_page_size('main')) \
                     + (SELECT page_count * page_size FROM pragma_page_count('audit'), pragma_page_size('audit'))",
                    [],
                    |r| r.get(0),
                )
                .map_err(db_err)
        })?;
        let wal = |p: &Path| {
            let mut w = p.to_path_buf().into_os_string();
            w.push("-wal");
            std::fs::metadata(&w).map(|m| m.len()).unwrap_or(0)
        };
        Ok(pages.max(0) as u64 + wal(&self.path) + wal(&self.audit_path))
    }
}

impl crate::conformance::Harness for SqliteStore {
    fn store(&self) -> &dyn Store {
        self
    }
    fn raw_execute(&self, sql: &str) -> FhirResult<()> {
        SqliteStore::raw_execute(self, sql)
    }
    fn standalone_audit_table(&self) -> &'static str {
        STANDALONE_AUDIT_TABLE
    }
}
