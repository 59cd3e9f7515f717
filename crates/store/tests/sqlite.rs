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
