//! The conformance suite against PostgreSQL. Needs `TSUNAGI_TEST_PG` (e.g.
//! `host=127.0.0.1 user=postgres dbname=test` or a `postgres://` URL); each test
//! runs in its own fresh schema, dropped afterwards.

use tsunagi_store::Store;
use tsunagi_store::conformance::Harness;
use tsunagi_store::postgres::PgStore;

/// A store in its own schema, dropped with it.
struct TempSchema {
    store: PgStore,
    schema: String,
}

impl Harness for TempSchema {
    fn store(&self) -> &dyn Store {
        &self.store
    }
    fn raw_execute(&self, sql: &str) -> tsunagi_fhir::FhirResult<()> {
        self.store.raw_execute(sql)
    }
}

impl Drop for TempSchema {
    fn drop(&mut self) {
        let _ = self
            .store
            .raw_execute(&format!("DROP SCHEMA IF EXISTS {} CASCADE", self.schema));
    }
}

fn url() -> Option<String> {
    tsunagi_store::conformance::test_pg_url("conformance suite")
}

fn fresh_schema() -> String {
    tsunagi_store::conformance::fresh_schema("tsunagi_test")
}

fn make() -> Option<Box<dyn Harness>> {
    let url = url()?;
    let schema = fresh_schema();
    let store = PgStore::connect_in_schema(&url, &schema, 6).expect("connect to TSUNAGI_TEST_PG");
    Some(Box::new(TempSchema { store, schema }))
}

tsunagi_store::conformance_tests!(make);

#[test]
fn concurrent_startup_migrates_once() {
    let Some(url) = url() else { return };
    let schema = fresh_schema();
    let stores: Vec<PgStore> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..3)
            .map(|_| s.spawn(|| PgStore::connect_in_schema(&url, &schema, 2).expect("connect")))
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("join"))
            .collect()
    });
    for st in &stores {
        assert_eq!(
            st.schema_version().unwrap(),
            tsunagi_store::schema::latest()
        );
    }
    let _ = stores[0].raw_execute(&format!("DROP SCHEMA {schema} CASCADE"));
}

#[test]
fn invalid_schema_name_is_rejected() {
    let Some(url) = url() else { return };
    assert!(PgStore::connect_in_schema(&url, "bad; DROP", 1).is_err());
}

/// The server drops the store when it shuts down, on an async runtime thread; the
/// synchronous client must not panic there.
#[test]
fn dropping_the_store_on_an_async_runtime_thread_is_safe() {
    let Some(url) = url() else { return };
    let schema = fresh_schema();
    let store = PgStore::connect_in_schema(&url, &schema, 2).expect("connect");
    store.schema_version().expect("query");
    let _ = store.raw_execute(&format!("DROP SCHEMA IF EXISTS {schema} CASCADE"));
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    runtime.block_on(async move { drop(store) });
}

#[test]
fn a_version_1_database_is_migrated_and_reindexed() {
    let Some(url) = url() else { return };
    let schema = fresh_schema();
    let mut c = postgres::Client::connect(&url, postgres::NoTls).expect("connect");
    c.batch_execute(&format!(
        "CREATE SCHEMA {schema}; SET search_path TO {schema}; {}",
        tsunagi_store::conformance::version1_database(tsunagi_store::sql::Dialect::Postgres)
    ))
    .expect("version 1 database");
    let store = PgStore::connect_in_schema(&url, &schema, 2).expect("connect");
    let t = TempSchema { store, schema };
    tsunagi_store::conformance::check_migrated_from_version1(&t.store);
}

#[test]
fn a_bulk_load_leaves_fresh_planner_statistics() {
    let Some(url) = url() else { return };
    let schema = fresh_schema();
    let analyzed = |table: &str| -> bool {
        let mut c = postgres::Client::connect(&url, postgres::NoTls).unwrap();
        c.query_one(
            "SELECT last_analyze IS NOT NULL FROM pg_stat_user_tables WHERE schemaname = $1 AND relname = $2",
            &[&schema, &table],
        )
        .unwrap()
        .get(0)
    };
    // a server's writes, and a small load, leave the statistics to autovacuum: an
    // ANALYZE of near-empty tables misplans the next large load
    for (workload, resources, expect) in [
        (tsunagi_store::Workload::Online, 10_000_usize, false),
        (tsunagi_store::Workload::BulkLoad, 20, false),
        (tsunagi_store::Workload::BulkLoad, 10_000, true),
    ] {
        let store = PgStore::connect_in_schema(&url, &schema, 2)
            .expect("connect")
            .for_workload(workload);
        for batch in 0..resources.div_ceil(1000) {
            let mut tx = store.begin().unwrap();
            for i in 0..resources.min(1000) {
                let body = serde_json::json!({"resourceType": "Basic", "code": {"text": "x"}});
                let id = format!("b{workload:?}-{resources}-{batch}-{i}");
                tx.create("Basic", &id, body, &Default::default()).unwrap();
            }
            tx.commit().unwrap();
        }
        drop(store);
        // the statistics system publishes what ANALYZE did within moments
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while expect && !analyzed("ix_token") && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        assert_eq!(analyzed("ix_token"), expect, "{workload:?} {resources}");
        assert_eq!(
            analyzed("resource_current"),
            expect,
            "{workload:?} {resources}"
        );
    }
    let mut c = postgres::Client::connect(&url, postgres::NoTls).unwrap();
    c.batch_execute(&format!("DROP SCHEMA IF EXISTS {schema} CASCADE"))
        .unwrap();
}

#[test]
fn a_database_migrated_by_a_newer_build_is_refused() {
    let Some(url) = url() else { return };
    let schema = fresh_schema();
    let store = PgStore::connect_in_schema(&url, &schema, 1).expect("connect");
    let newer = tsunagi_store::schema::latest() + 1;
    store
        .raw_execute(&format!(
            "INSERT INTO {schema}.schema_migrations (version) VALUES ({newer})"
        ))
        .unwrap();
    let refused = PgStore::connect_in_schema(&url, &schema, 1);
    let _ = store.raw_execute(&format!("DROP SCHEMA {schema} CASCADE"));
    let e = refused.err().expect("a newer schema is refused");
    assert!(
        e.to_string().contains(&format!("schema version {newer}")),
        "{e}"
    );
}
