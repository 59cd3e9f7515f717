//! The conformance suite against the embedded SQLite backend.

use tsunagi_store::Store;
use tsunagi_store::conformance::Harness;
use tsunagi_store::sqlite::SqliteStore;

/// A store in its own temporary directory, removed on drop.
struct TempSqlite {
    store: SqliteStore,
    _dir: tempfile::TempDir,
}

impl Harness for TempSqlite {
    fn store(&self) -> &dyn Store {
        &self.store
    }
    fn raw_execute(&self, sql: &str) -> tsunagi_fhir::FhirResult<()> {
        self.store.raw_execute(sql)
    }
    fn standalone_audit_table(&self) -> &'static str {
        tsunagi_store::sqlite::STANDALONE_AUDIT_TABLE
    }
    fn settle_audit(&self) {
        self.store
            .index_audit_now()
            .expect("index the audit records");
    }
}

fn make() -> Option<Box<dyn Harness>> {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = SqliteStore::open(&dir.path().join("tsunagi.db")).expect("open");
    Some(Box::new(TempSqlite { store, _dir: dir }))
}

tsunagi_store::conformance_tests!(make);

#[test]
fn reopen_keeps_data_and_schema() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.db");
    {
        let s = SqliteStore::open(&path).unwrap();
        let mut tx = s.begin().unwrap();
        tx.create(
            "Patient",
            "p1",
            serde_json::json!({"resourceType": "Patient"}),
            &Default::default(),
        )
        .unwrap();
        tx.commit().unwrap();
    }
    let s = SqliteStore::open(&path).unwrap();
    assert_eq!(s.read("Patient", "p1").unwrap().unwrap().version, 1);
    assert_eq!(s.schema_version().unwrap(), tsunagi_store::schema::latest());
}

#[test]
fn a_version_1_database_is_migrated_and_reindexed() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("v1.db");
    {
        let c = rusqlite::Connection::open(&path).unwrap();
        c.execute_batch(&tsunagi_store::conformance::version1_database(
            tsunagi_store::sql::Dialect::Sqlite,
        ))
        .unwrap();
    }
    let s = SqliteStore::open(&path).unwrap();
    tsunagi_store::conformance::check_migrated_from_version1(&s);
}

/// Bytes the database holds by its own account, and the main file's length: the
/// two differ while committed pages still sit only in the write-ahead log.
fn held_and_on_file(path: &std::path::Path) -> (u64, u64) {
    let c = rusqlite::Connection::open(path).unwrap();
    let pages: i64 = c.query_row("PRAGMA page_count", [], |r| r.get(0)).unwrap();
    let size: i64 = c.query_row("PRAGMA page_size", [], |r| r.get(0)).unwrap();
    (
        (pages * size) as u64,
        std::fs::metadata(path).unwrap().len(),
    )
}

#[test]
fn a_bulk_load_copies_its_log_into_the_file_of_a_running_server_when_it_ends() {
    use tsunagi_store::Workload;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.db");
    // The server keeps the file open throughout, so closing the loader's
    // connections is not the last close (which would checkpoint by itself).
    let server = SqliteStore::open(&path).unwrap();
    let (_, before) = held_and_on_file(&path);
    let bulk = SqliteStore::open_for(&path, Workload::BulkLoad).unwrap();
    let note = "x".repeat(4000);
    for batch in 0..4 {
        let mut tx = bulk.begin().unwrap();
        for i in 0..50 {
            let body = serde_json::json!({"resourceType": "Basic", "text": {"status": "generated", "div": note}});
            tx.create("Basic", &format!("b{batch}-{i}"), body, &Default::default())
                .unwrap();
        }
        tx.commit().unwrap();
    }
    let (held, on_file) = held_and_on_file(&path);
    assert!(held > before + 800_000, "the load grew the database");
    assert!(on_file < held, "during the load its pages stay in the log");
    drop(bulk);
    let (held, on_file) = held_and_on_file(&path);
    assert_eq!(on_file, held, "the loader copied its log when it ended");
    assert_eq!(server.read("Basic", "b3-49").unwrap().unwrap().version, 1);
}

/// The data file's change counter as another connection sees it: it moves with
/// every commit to that file, and every reader connection of the file empties
/// its page cache when it has moved.
fn data_version(c: &rusqlite::Connection) -> i64 {
    c.query_row("PRAGMA data_version", [], |r| r.get(0))
        .unwrap()
}

#[test]
fn stand_alone_audit_records_leave_the_data_file_alone() {
    use serde_json::json;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tsunagi.db");
    let s = SqliteStore::open(&path).unwrap();
    assert_eq!(
        tsunagi_store::sqlite::audit_file(&path),
        dir.path().join("tsunagi.audit.db")
    );
    assert!(dir.path().join("tsunagi.audit.db").exists());
    let watcher = rusqlite::Connection::open(&path).unwrap();
    let v0 = data_version(&watcher);
    let size0 = s.size_bytes().unwrap();
    for i in 0..300 {
        s.audit_append(&[json!({"action": "read", "patient": format!("p{i}")})])
            .unwrap();
    }
    assert!(
        s.size_bytes().unwrap() > size0,
        "the store's size counts the audit file"
    );
    assert_eq!(
        data_version(&watcher),
        v0,
        "a read's audit commit touched the data file"
    );
    let mut tx = s.begin().unwrap();
    tx.create(
        "Patient",
        "p1",
        json!({"resourceType": "Patient"}),
        &Default::default(),
    )
    .unwrap();
    tx.audit_append(&[json!({"action": "create", "patient": "p1"})])
        .unwrap();
    tx.commit().unwrap();
    assert_ne!(
        data_version(&watcher),
        v0,
        "a write commits to the data file"
    );
    // the write's record sits in the data file, with its data
    let in_data: i64 = watcher
        .query_row("SELECT count(*) FROM audit_log", [], |r| r.get(0))
        .unwrap();
    assert_eq!(in_data, 1);
}

#[test]
fn one_chain_through_both_files_survives_reopening_and_shows_tampering_in_either() {
    use serde_json::json;
    use tsunagi_store::audit::{self, ChainProblem, ProblemKind};
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.db");
    let write = |s: &SqliteStore, n: i64| {
        let mut tx = s.begin().unwrap();
        let e = tx.audit_append(&[json!({"n": n})]).unwrap();
        tx.commit().unwrap();
        e[0].seq
    };
    let read = |s: &SqliteStore, n: i64| s.audit_append(&[json!({"n": n})]).unwrap()[0].seq;
    {
        let s = SqliteStore::open(&path).unwrap();
        assert_eq!((write(&s, 1), read(&s, 2), read(&s, 3)), (1, 2, 3));
    }
    let s = SqliteStore::open(&path).unwrap();
    assert_eq!((write(&s, 4), read(&s, 5), write(&s, 6)), (4, 5, 6));
    let report = audit::verify_chain(audit::scan_all(&s));
    assert!(report.ok(), "{report:?}");
    assert_eq!(report.checked, 6);

    s.raw_execute(r#"UPDATE audit_log SET record = '{"n":40}' WHERE seq = 4"#)
        .unwrap();
    s.raw_execute(&format!(
        "DELETE FROM {} WHERE seq = 2",
        tsunagi_store::sqlite::STANDALONE_AUDIT_TABLE
    ))
    .unwrap();
    let r = audit::verify_chain(audit::scan_all(&s));
    assert_eq!(
        r.problems,
        vec![
            ChainProblem {
                seq: 2,
                kind: ProblemKind::Missing { count: 1 }
            },
            ChainProblem {
                seq: 4,
                kind: ProblemKind::Altered
            },
        ]
    );
}

#[test]
fn a_database_migrated_by_a_newer_build_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.db");
    drop(SqliteStore::open(&path).unwrap());
    let newer = tsunagi_store::schema::latest() + 1;
    rusqlite::Connection::open(&path)
        .unwrap()
        .execute(
            "INSERT INTO schema_migrations (version, applied_at) VALUES (?1, 'later')",
            [newer],
        )
        .unwrap();
    let e = SqliteStore::open(&path)
        .err()
        .expect("a newer schema is refused");
    assert!(
        e.to_string().contains(&format!("schema version {newer}")),
        "{e}"
    );
}

/// Seqs of the audit records naming `patient`, newest first.
fn audit_of(s: &SqliteStore, patient: &str) -> Vec<i64> {
    s.audit_query(&tsunagi_store::AuditFilter {
        patient: Some(patient.into()),
        ..Default::default()
    })
    .unwrap()
    .iter()
    .map(|e| e.seq)
    .collect()
}

fn append_for(s: &SqliteStore, patients: &[&str]) {
    let records: Vec<_> = patients
        .iter()
        .map(|p| serde_json::json!({"action": "read", "patient": p}))
        .collect();
    s.audit_append(&records).unwrap();
}

/// Appends a record for `patient` with data, as a write does (in the data file).
fn write_for(s: &SqliteStore, patient: &str) {
    let mut tx = s.begin().unwrap();
    tx.audit_append(&[serde_json::json!({"action": "update", "patient": patient})])
        .unwrap();
    tx.commit().unwrap();
}

#[test]
fn the_indexer_thread_indexes_the_audit_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tsunagi.db");
    let s = SqliteStore::open(&path).unwrap();
    // every tenth record is a write's, in the data file
    for i in 0..50 {
        let patient = format!("p{}", i % 5);
        if i % 10 == 9 {
            write_for(&s, &patient);
        } else {
            append_for(&s, &[&patient]);
        }
    }
    let index = rusqlite::Connection::open(tsunagi_store::sqlite::audit_index_file(&path)).unwrap();
    let covered = |c: &rusqlite::Connection| -> (i64, i64, i64) {
        c.query_row(
            "SELECT (SELECT upto FROM audit_indexed), (SELECT count(*) FROM audit_patient), \
             (SELECT count(*) FROM audit_recorded)",
            [],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
        .unwrap()
    };
    // no call into the store: the thread does it
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while covered(&index) != (50, 50, 50) {
        assert!(
            std::time::Instant::now() < deadline,
            "the indexer did not cover the records: {:?}",
            covered(&index)
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert_eq!(
        audit_of(&s, "p3"),
        vec![49, 44, 39, 34, 29, 24, 19, 14, 9, 4]
    );
    let in_data: i64 = index
        .query_row(
            "SELECT count(*) FROM audit_patient WHERE src = 0",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(in_data, 5);
    // and the audit file itself keeps no index but its seq
    let audit = rusqlite::Connection::open(tsunagi_store::sqlite::audit_file(&path)).unwrap();
    let indexes: Vec<String> = audit
        .prepare("SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = 'audit_log'")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(indexes, Vec::<String>::new());
}

#[test]
fn the_audit_index_stops_before_a_missing_record() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tsunagi.db");
    let s = SqliteStore::open(&path).unwrap();
    append_for(&s, &["p1", "p2", "p1"]);
    write_for(&s, "p1");
    append_for(&s, &["p2", "p1"]);
    s.index_audit_now().unwrap();
    let upto = || -> i64 {
        rusqlite::Connection::open(tsunagi_store::sqlite::audit_index_file(&path))
            .unwrap()
            .query_row("SELECT upto FROM audit_indexed", [], |r| r.get(0))
            .unwrap()
    };
    assert_eq!(upto(), 6);
    // record 7 (a write's) is removed behind the store's back
    write_for(&s, "p1");
    append_for(&s, &["p1"]);
    s.raw_execute("DELETE FROM main.audit_log WHERE seq = 7")
        .unwrap();
    s.index_audit_now().unwrap();
    // the index does not pass the gap, and queries still find what follows it
    assert_eq!(upto(), 6);
    assert_eq!(audit_of(&s, "p1"), vec![8, 6, 4, 3, 1]);
    use tsunagi_store::audit;
    assert!(!audit::verify_chain(audit::scan_all(&s)).ok());
}

#[test]
fn a_missing_or_stale_audit_index_is_rebuilt() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tsunagi.db");
    let audit = tsunagi_store::sqlite::audit_file(&path);
    let older = dir.path().join("older.audit.db");
    {
        let s = SqliteStore::open(&path).unwrap();
        append_for(&s, &["p1", "p2", "p1", "p2", "p1", "p2"]);
        s.index_audit_now().unwrap();
    }
    std::fs::copy(&audit, &older).unwrap();
    {
        let s = SqliteStore::open(&path).unwrap();
        append_for(&s, &["p1", "p1", "p1", "p1"]);
        s.index_audit_now().unwrap();
        assert_eq!(audit_of(&s, "p1"), vec![10, 9, 8, 7, 5, 3, 1]);
    }
    // the audit file restored from the older backup, the index file not: the
    // index claims seqs 7-10, which the next records reuse for another patient
    for ext in ["db-wal", "db-shm"] {
        let _ = std::fs::remove_file(audit.with_extension(ext));
    }
    std::fs::copy(&older, &audit).unwrap();
    {
        let s = SqliteStore::open(&path).unwrap();
        append_for(&s, &["p2", "p2"]);
        assert_eq!(audit_of(&s, "p2"), vec![8, 7, 6, 4, 2]);
        assert_eq!(audit_of(&s, "p1"), vec![5, 3, 1]);
        s.index_audit_now().unwrap();
        assert_eq!(audit_of(&s, "p2"), vec![8, 7, 6, 4, 2]);
        assert_eq!(audit_of(&s, "p1"), vec![5, 3, 1]);
        let report = tsunagi_store::audit::verify_chain(tsunagi_store::audit::scan_all(&s));
        assert!(report.ok(), "{report:?}");
    }
    // the index file lost: rebuilt from the audit file
    std::fs::remove_file(tsunagi_store::sqlite::audit_index_file(&path)).unwrap();
    let s = SqliteStore::open(&path).unwrap();
    assert_eq!(audit_of(&s, "p2"), vec![8, 7, 6, 4, 2]);
    s.index_audit_now().unwrap();
    assert_eq!(audit_of(&s, "p2"), vec![8, 7, 6, 4, 2]);
    assert_eq!(audit_of(&s, "p1"), vec![5, 3, 1]);
}
