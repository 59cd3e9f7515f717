//! Versioned schema migrations for both backends.
//!
//! Each migration is written once with type macros (`{TEXT}`, `{BOOL}`, ...)
//! expanded per dialect, so both schemas stay in step. PostgreSQL text columns
//! use `COLLATE "C"` so ordering is by code point, as in SQLite; sort results
//! are then identical on both backends.

use crate::sql::Dialect;

/// Migrations in order; the version is the index + 1. Never edit an applied one:
/// append a new migration instead. A line starting `{SQLITE}` is for SQLite only.
const MIGRATIONS: &[&str] = &[
    // 1: resources, versions, index tables, audit log, client keys
    r#"
CREATE TABLE resource_current (
    rid {RID},
    rt {TEXT} NOT NULL,
    id {TEXT} NOT NULL,
    version BIGINT NOT NULL,
    last_updated BIGINT NOT NULL,
    deleted {BOOL} NOT NULL,
    patient_id {TEXT},
    author_org {TEXT},
    UNIQUE (rt, id)
);
CREATE INDEX resource_current_type_lu ON resource_current (rt, last_updated);
CREATE INDEX resource_current_patient ON resource_current (patient_id, rt, last_updated);
CREATE INDEX resource_current_org ON resource_current (author_org, rt);

CREATE TABLE resource_version (
    rid BIGINT NOT NULL,
    version BIGINT NOT NULL,
    rt {TEXT} NOT NULL,
    last_updated BIGINT NOT NULL,
    deleted {BOOL} NOT NULL,
    author_org {TEXT},
    author_user {TEXT},
    body {TEXT},
    PRIMARY KEY (rid, version)
);
CREATE INDEX resource_version_lu ON resource_version (last_updated);
CREATE INDEX resource_version_type_lu ON resource_version (rt, last_updated);

CREATE TABLE idx_string (rid BIGINT NOT NULL, rt {TEXT} NOT NULL, param {TEXT} NOT NULL, norm {TEXT} NOT NULL, exact {TEXT} NOT NULL);
CREATE INDEX idx_string_value ON idx_string (rt, param, norm);
CREATE INDEX idx_string_rid ON idx_string (rid, param);

CREATE TABLE idx_token (rid BIGINT NOT NULL, rt {TEXT} NOT NULL, param {TEXT} NOT NULL, system {TEXT}, code {TEXT} NOT NULL);
CREATE INDEX idx_token_value ON idx_token (rt, param, code, system);
CREATE INDEX idx_token_rid ON idx_token (rid, param);

CREATE TABLE idx_date (rid BIGINT NOT NULL, rt {TEXT} NOT NULL, param {TEXT} NOT NULL, lo BIGINT NOT NULL, hi BIGINT NOT NULL);
CREATE INDEX idx_date_value ON idx_date (rt, param, lo, hi);
CREATE INDEX idx_date_rid ON idx_date (rid, param);

CREATE TABLE idx_number (rid BIGINT NOT NULL, rt {TEXT} NOT NULL, param {TEXT} NOT NULL, value {REAL} NOT NULL, system {TEXT}, code {TEXT});
CREATE INDEX idx_number_value ON idx_number (rt, param, value);
CREATE INDEX idx_number_rid ON idx_number (rid, param);

CREATE TABLE idx_reference (rid BIGINT NOT NULL, rt {TEXT} NOT NULL, param {TEXT} NOT NULL, target_type {TEXT}, target_id {TEXT} NOT NULL);
CREATE INDEX idx_reference_value ON idx_reference (rt, param, target_id, target_type);
CREATE INDEX idx_reference_target ON idx_reference (target_id, target_type);
CREATE INDEX idx_reference_rid ON idx_reference (rid, param);

CREATE TABLE idx_uri (rid BIGINT NOT NULL, rt {TEXT} NOT NULL, param {TEXT} NOT NULL, value {TEXT} NOT NULL);
CREATE INDEX idx_uri_value ON idx_uri (rt, param, value);
CREATE INDEX idx_uri_rid ON idx_uri (rid, param);

CREATE TABLE audit_log (
    seq BIGINT PRIMARY KEY,
    recorded BIGINT NOT NULL,
    record {TEXT} NOT NULL,
    prev_hash {TEXT} NOT NULL,
    hash {TEXT} NOT NULL,
    patient {TEXT},
    org {TEXT},
    usr {TEXT},
    purpose {TEXT}
);
CREATE INDEX audit_log_patient ON audit_log (patient, seq);
CREATE INDEX audit_log_org ON audit_log (org, seq);
CREATE INDEX audit_log_usr ON audit_log (usr, seq);
CREATE INDEX audit_log_recorded ON audit_log (recorded);

CREATE TABLE audit_head (id INTEGER PRIMARY KEY, seq BIGINT NOT NULL, hash {TEXT} NOT NULL);
INSERT INTO audit_head (id, seq, hash) VALUES (1, 0, '0000000000000000000000000000000000000000000000000000000000000000');

CREATE TABLE client_keys (
    client_id {TEXT} NOT NULL,
    kid {TEXT} NOT NULL,
    org {TEXT} NOT NULL,
    role {TEXT} NOT NULL,
    usr {TEXT},
    jwk {TEXT} NOT NULL,
    created BIGINT NOT NULL,
    revoked {BOOL} NOT NULL,
    PRIMARY KEY (client_id, kid)
);
"#,
    // 2: leaner index tables. The (type, parameter) strings of every entry become
    // one integer key (`sql::param_key`); rows are clustered by resource (WITHOUT
    // ROWID on SQLite), so an entry is two b-tree insertions (row, value index),
    // not three, and `idx_reference_target`, which no query used, is gone. An
    // absent optional part (token or quantity system, reference type) is stored
    // as '' (never a valid FHIR value) so that it can be part of the key. The
    // entries are rebuilt from the current bodies in the migration's transaction
    // (`REINDEX_AFTER`).
    r#"
DROP TABLE idx_string;
DROP TABLE idx_token;
DROP TABLE idx_date;
DROP TABLE idx_number;
DROP TABLE idx_reference;
DROP TABLE idx_uri;

CREATE TABLE ix_string (rid BIGINT NOT NULL, k BIGINT NOT NULL, norm {TEXT} NOT NULL, exact {TEXT} NOT NULL, PRIMARY KEY (rid, k, exact)){WITHOUT_ROWID};
CREATE INDEX ix_string_value ON ix_string (k, norm);

CREATE TABLE ix_token (rid BIGINT NOT NULL, k BIGINT NOT NULL, code {TEXT} NOT NULL, system {TEXT} NOT NULL, PRIMARY KEY (rid, k, code, system)){WITHOUT_ROWID};
CREATE INDEX ix_token_value ON ix_token (k, code, system);

CREATE TABLE ix_date (rid BIGINT NOT NULL, k BIGINT NOT NULL, lo BIGINT NOT NULL, hi BIGINT NOT NULL, PRIMARY KEY (rid, k, lo, hi)){WITHOUT_ROWID};
CREATE INDEX ix_date_value ON ix_date (k, lo, hi);

CREATE TABLE ix_number (rid BIGINT NOT NULL, k BIGINT NOT NULL, value {REAL} NOT NULL, system {TEXT} NOT NULL, code {TEXT} NOT NULL, PRIMARY KEY (rid, k, value, system, code)){WITHOUT_ROWID};
CREATE INDEX ix_number_value ON ix_number (k, value);

CREATE TABLE ix_reference (rid BIGINT NOT NULL, k BIGINT NOT NULL, target_id {TEXT} NOT NULL, target_type {TEXT} NOT NULL, PRIMARY KEY (rid, k, target_id, target_type)){WITHOUT_ROWID};
CREATE INDEX ix_reference_value ON ix_reference (k, target_id, target_type);

CREATE TABLE ix_uri (rid BIGINT NOT NULL, k BIGINT NOT NULL, value {TEXT} NOT NULL, PRIMARY KEY (rid, k, value)){WITHOUT_ROWID};
CREATE INDEX ix_uri_value ON ix_uri (k, value);
"#,
    // 3: on SQLite, the audit records that writes append with their data lose
    // their indexes as the audit file's did (version 3 there): the audit index
    // file indexes both files' records, off the write path. Each was five b-tree
    // insertions per record, one on a random leaf. PostgreSQL keeps its indexes
    // (`{SQLITE}` lines exist only on SQLite).
    r#"
{SQLITE}DROP INDEX IF EXISTS audit_log_patient;
{SQLITE}DROP INDEX IF EXISTS audit_log_org;
{SQLITE}DROP INDEX IF EXISTS audit_log_usr;
{SQLITE}DROP INDEX IF EXISTS audit_log_recorded;
"#,
];

/// Migrations of the SQLite backend's audit file (`sqlite::audit_file`), attached
/// to every connection as `audit`; the version is the index + 1, kept in the
/// file's `user_version`. The file holds the stand-alone audit records
/// (`Store::audit_append`: reads, searches, denials), so that their commits never
/// touch the data file its readers cache. Its `seq` is the rowid: one b-tree
/// insertion per record fewer than the data file's `audit_log`.
pub const SQLITE_AUDIT_FILE: &[&str] = &[
    r#"
CREATE TABLE audit.audit_log (
    seq INTEGER PRIMARY KEY,
    recorded INTEGER NOT NULL,
    record TEXT NOT NULL,
    prev_hash TEXT NOT NULL,
    hash TEXT NOT NULL,
    patient TEXT,
    org TEXT,
    usr TEXT,
    purpose TEXT
);
CREATE INDEX audit.audit_log_patient ON audit_log (patient, seq);
CREATE INDEX audit.audit_log_org ON audit_log (org, seq);
CREATE INDEX audit.audit_log_usr ON audit_log (usr, seq);
CREATE INDEX audit.audit_log_recorded ON audit_log (recorded);
CREATE TABLE audit.audit_head (id INTEGER PRIMARY KEY, seq INTEGER NOT NULL, hash TEXT NOT NULL);
INSERT INTO audit.audit_head (id, seq, hash) VALUES (1, 0, '0000000000000000000000000000000000000000000000000000000000000000');
"#,
    // Version 2: the patient index moves to the audit index file
    // (`SQLITE_AUDIT_INDEX_FILE`), filled in batches off the read path. A
    // (patient, seq) entry lands on a random leaf, so every read's audit commit
    // wrote a page of it to the log: on 100,000 patients this one index cost more
    // than the rest of the record (docs/DECISIONS.md, "SQLite: the audit records'
    // indexes filled off the read and write paths").
    "DROP INDEX IF EXISTS audit.audit_log_patient;",
    // Version 3: the other three indexes follow. They take their entries on a few
    // hot leaves, but each group commit still wrote those leaves to the log.
    "DROP INDEX IF EXISTS audit.audit_log_org; DROP INDEX IF EXISTS audit.audit_log_usr; \
     DROP INDEX IF EXISTS audit.audit_log_recorded;",
];

/// Migrations of the SQLite backend's audit index file
/// (`sqlite::audit_index_file`), versioned by its `user_version` like the audit
/// file. It holds what the audit records of both files are looked up by, derived
/// from them by the store's indexer thread: each `audit_<key>` table (`patient`,
/// `org`, `usr`, `recorded`) has an entry `(src, key, seq)` for every record with
/// `seq <= audit_indexed.upto` whose key is set, `src` naming the file that holds
/// the record (0: the data file's `audit_log`, 1: the audit file's). Derived data:
/// deleting the file rebuilds it.
pub const SQLITE_AUDIT_INDEX_FILE: &[&str] = &[
    r#"
CREATE TABLE audit_patient (
    patient TEXT NOT NULL,
    seq INTEGER NOT NULL,
    PRIMARY KEY (patient, seq)
) WITHOUT ROWID;
CREATE TABLE audit_indexed (id INTEGER PRIMARY KEY, upto INTEGER NOT NULL);
INSERT INTO audit_indexed (id, upto) VALUES (1, 0);
"#,
    // Version 2: by organisation, user and time too (the audit file's version 3).
    // The new tables are filled from the start: the whole index is rebuilt.
    r#"
CREATE TABLE audit_org (org TEXT NOT NULL, seq INTEGER NOT NULL, PRIMARY KEY (org, seq)) WITHOUT ROWID;
CREATE TABLE audit_usr (usr TEXT NOT NULL, seq INTEGER NOT NULL, PRIMARY KEY (usr, seq)) WITHOUT ROWID;
CREATE TABLE audit_recorded (recorded INTEGER NOT NULL, seq INTEGER NOT NULL, PRIMARY KEY (recorded, seq)) WITHOUT ROWID;
DELETE FROM audit_patient;
UPDATE audit_indexed SET upto = 0 WHERE id = 1;
"#,
    // Version 3: the data file's records too (the data file's version 3), each
    // entry tagged with its file so that a query walks only the entries of the
    // table it reads. Rebuilt from the start.
    r#"
DROP TABLE audit_patient;
DROP TABLE audit_org;
DROP TABLE audit_usr;
DROP TABLE audit_recorded;
CREATE TABLE audit_patient (src INTEGER NOT NULL, patient TEXT NOT NULL, seq INTEGER NOT NULL, PRIMARY KEY (src, patient, seq)) WITHOUT ROWID;
CREATE TABLE audit_org (src INTEGER NOT NULL, org TEXT NOT NULL, seq INTEGER NOT NULL, PRIMARY KEY (src, org, seq)) WITHOUT ROWID;
CREATE TABLE audit_usr (src INTEGER NOT NULL, usr TEXT NOT NULL, seq INTEGER NOT NULL, PRIMARY KEY (src, usr, seq)) WITHOUT ROWID;
CREATE TABLE audit_recorded (src INTEGER NOT NULL, recorded INTEGER NOT NULL, seq INTEGER NOT NULL, PRIMARY KEY (src, recorded, seq)) WITHOUT ROWID;
UPDATE audit_indexed SET upto = 0 WHERE id = 1;
"#,
];

/// Migrations after which the index tables are rebuilt from the current
/// resources, in the same transaction: their shape or their keys changed.
pub const REINDEX_AFTER: &[i64] = &[2];

/// Creates the bookkeeping table (idempotent).
pub fn bootstrap(d: Dialect) -> &'static str {
    match d {
        Dialect::Sqlite => {
            "CREATE TABLE IF NOT EXISTS schema_migrations (version BIGINT PRIMARY KEY, applied_at TEXT NOT NULL)"
        }
        Dialect::Postgres => {
            "CREATE TABLE IF NOT EXISTS schema_migrations (version BIGINT PRIMARY KEY, applied_at TIMESTAMPTZ NOT NULL DEFAULT now())"
        }
    }
}

/// (version, SQL) of every migration, expanded for the dialect.
pub fn migrations(d: Dialect) -> Vec<(i64, String)> {
    MIGRATIONS
        .iter()
        .enumerate()
        .map(|(i, m)| {
            let sql = match d {
                Dialect::Sqlite => m
                    .replace("{SQLITE}", "")
                    .replace("{RID}", "INTEGER PRIMARY KEY")
                    .replace("{TEXT}", "TEXT")
                    .replace("{BOOL}", "INTEGER")
                    .replace("{REAL}", "REAL")
                    .replace("{WITHOUT_ROWID}", " WITHOUT ROWID"),
                Dialect::Postgres => m
                    .lines()
                    .filter(|l| !l.starts_with("{SQLITE}"))
                    .collect::<Vec<_>>()
                    .join("\n")
                    .replace(
                        "{RID}",
                        "BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY",
                    )
                    .replace("{TEXT}", "TEXT COLLATE \"C\"")
                    .replace("{BOOL}", "BOOLEAN")
                    .replace("{REAL}", "DOUBLE PRECISION")
                    .replace("{WITHOUT_ROWID}", ""),
            };
            (i as i64 + 1, sql)
        })
        .collect()
}

/// Latest schema version this build knows.
pub fn latest() -> i64 {
    MIGRATIONS.len() as i64
}

/// Refuses a database that a newer build has migrated: this build would write
/// without knowing that schema's rules (since session 10, for instance, the SQLite
/// audit chain runs through a second file that older builds do not read).
pub fn refuse_newer(current: i64) -> tsunagi_fhir::FhirResult<()> {
    if current > latest() {
        return Err(tsunagi_fhir::FhirError::internal(format!(
            "the database has schema version {current}; this build knows up to {}: run a newer tsunagi",
            latest()
        )));
    }
    Ok(())
}

/// Key of the PostgreSQL advisory lock that serialises migrations.
pub const PG_MIGRATION_LOCK: i64 = 0x7473_756e_6167_6901;
