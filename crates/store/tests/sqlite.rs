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
