//! Guards the SQLite query plans of the hot searches: a fresh database has no
//! statistics, so the SQL builder steers the planner; these checks make sure it
//! keeps doing so (an index lookup drives, no type-wide scan).

use serde_json::json;
use tsunagi_fhir::search::{
    Criterion, DateMatch, Include, Prefix, RefMatch, SearchQuery, StringMode, TokenMatch,
};
use tsunagi_store::sql::{self, Built, Dialect, SqlValue};
use tsunagi_store::sqlite::SqliteStore;
use tsunagi_store::{Scope, ScopeRule, Store};

fn plan(c: &rusqlite::Connection, b: &Built) -> String {
    let params = b.params.iter().map(|p| match p {
        SqlValue::Text(s) => rusqlite::types::Value::Text(s.clone()),
        SqlValue::Int(i) => rusqlite::types::Value::Integer(*i),
        SqlValue::Real(f) => rusqlite::types::Value::Real(*f),
    });
    let mut st = c.prepare(&format!("EXPLAIN QUERY PLAN {}", b.sql)).unwrap();
    let rows = st
        .query_map(rusqlite::params_from_iter(params), |r| {
            r.get::<_, String>(3)
        })
        .unwrap();
    rows.map(|r| r.unwrap()).collect::<Vec<_>>().join("\n")
}

fn token(code: &str) -> Criterion {
    Criterion::Token {
        values: vec![TokenMatch {
            system: None,
            code: Some(code.into()),
        }],
        negate: false,
    }
}

#[test]
fn hot_searches_are_driven_by_an_index() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("plans.db");
    let store = SqliteStore::open(&path).unwrap();
    let mut tx = store.begin().unwrap();
    tx.create(
        "Patient",
        "p1",
        json!({"resourceType": "Patient", "name": [{"family": "Yamada"}]}),
        &Default::default(),
    )
    .unwrap();
    tx.commit().unwrap();
    let c = rusqlite::Connection::open(&path).unwrap();
    let d = Dialect::Sqlite;
    let lookup = "USING INTEGER PRIMARY KEY (rowid=?)";
    let no_scan = |p: &str| !p.contains("SCAN ") && !p.contains("resource_current_type_lu");

    let by_identifier = SearchQuery::new("Patient").with("identifier", token("x"));
    for b in [
        sql::search_page(d, &by_identifier, &Scope::Unrestricted).unwrap(),
        sql::search_count(d, &by_identifier, &Scope::Unrestricted),
    ] {
        let p = plan(&c, &b);
        assert!(
            p.contains(lookup) && p.contains("ix_token_value") && no_scan(&p),
            "{p}"
        );
    }

    let patient_and_code = SearchQuery::new("Observation")
        .with(
            "patient",
            Criterion::Reference(vec![RefMatch {
                target_type: Some("Patient".into()),
                target_id: "p1".into(),
            }]),
        )
        .with("code", token("c"))
        .with("value-quantity", Criterion::Missing(false));
    let p = plan(
        &c,
        &sql::search_page(d, &patient_and_code, &Scope::Unrestricted).unwrap(),
    );
    assert!(
        p.contains(lookup)
            && p.contains("ix_reference_value")
            && p.contains("PRIMARY KEY (rid=? AND k=?")
            && no_scan(&p),
        "{p}"
    );

    let name = SearchQuery::new("Patient").with(
        "name",
        Criterion::String {
            mode: StringMode::StartsWith,
            values: vec!["yam".into()],
        },
    );
    let p = plan(
        &c,
        &sql::search_page(
            d,
            &name,
            &Scope::AnyOf(vec![
                ScopeRule::NonPersonal,
                ScopeRule::AuthoredBy {
                    org: "A".into(),
                    types: None,
                },
            ]),
        )
        .unwrap(),
    );
    assert!(
        p.contains(lookup) && p.contains("ix_string_value") && no_scan(&p),
        "{p}"
    );

    // birth date equality (person matching): the date index range is bounded on
    // both sides, not read from the day onwards
    let (lo, hi) = tsunagi_fhir::datetime::parse_range("1980-04-01").unwrap();
    let born = SearchQuery::new("Patient").with(
        "birthdate",
        Criterion::Date(vec![DateMatch {
            prefix: Prefix::Eq,
            lo,
            hi,
        }]),
    );
    let p = plan(
        &c,
        &sql::search_page(d, &born, &Scope::Unrestricted).unwrap(),
    );
    assert!(
        p.contains(lookup) && p.contains("ix_date_value (k=? AND lo>? AND lo<?)") && no_scan(&p),
        "{p}"
    );

    // a two-kana name prefix with a birth month: the month drives (a short
    // prefix matches a large share of all patients), the prefix is checked per row;
    // from three characters on, the prefix drives as before
    let (lo, hi) = tsunagi_fhir::datetime::parse_range("1980-04").unwrap();
    let name_and_month = |prefix: &str| {
        let q = SearchQuery::new("Patient")
            .with(
                "name",
                Criterion::String {
                    mode: StringMode::StartsWith,
                    values: vec![prefix.into()],
                },
            )
            .with(
                "birthdate",
                Criterion::Date(vec![DateMatch {
                    prefix: Prefix::Eq,
                    lo,
                    hi,
                }]),
            );
        plan(&c, &sql::search_page(d, &q, &Scope::Unrestricted).unwrap())
    };
    let p = name_and_month("ヤマ");
    assert!(
        p.contains("ix_date_value (k=? AND lo>? AND lo<?)")
            && !p.contains("ix_string_value (")
            && no_scan(&p),
        "{p}"
    );
    let p = name_and_month("ヤマダ");
    assert!(p.contains("ix_string_value (") && no_scan(&p), "{p}");

    let scoped = Scope::AnyOf(vec![ScopeRule::Patient {
        id: "p1".into(),
        types: None,
    }]);
    let p = plan(
        &c,
        &sql::search_page(
            d,
            &SearchQuery::new("Observation").with("code", token("c")),
            &scoped,
        )
        .unwrap(),
    );
    assert!(
        p.contains("resource_current_patient")
            && p.contains("PRIMARY KEY (rid=? AND k=?")
            && no_scan(&p),
        "{p}"
    );

    // A facility's consents: thousands of patients, one bound list. A search naming
    // the patient is driven by its reference; the list is only checked per row.
    let consented = Scope::AnyOf(
        (0..3000)
            .map(|i| ScopeRule::Patient {
                id: format!("p{i}"),
                types: Some(vec!["Coverage".into()]),
            })
            .collect(),
    );
    let beneficiary = SearchQuery::new("Coverage").with(
        "beneficiary",
        Criterion::Reference(vec![RefMatch {
            target_type: Some("Patient".into()),
            target_id: "p7".into(),
        }]),
    );
    let p = plan(&c, &sql::search_page(d, &beneficiary, &consented).unwrap());
    assert!(
        p.contains("ix_reference_value (k=? AND target_id=?") && !p.contains("SCAN r"),
        "{p}"
    );
    // with no such criterion the list drives through the patient index, no scan
    let p = plan(
        &c,
        &sql::search_page(d, &SearchQuery::new("Coverage"), &consented).unwrap(),
    );
    assert!(
        p.contains("resource_current_patient") && !p.contains("SCAN r"),
        "{p}"
    );

    let p = plan(
        &c,
        &sql::compartment_page(d, "p1", &Scope::Unrestricted, 50, 0),
    );
    assert!(
        p.contains("resource_current_patient") && !p.contains("SCAN "),
        "{p}"
    );

    let inc = Include {
        source_type: "Observation".into(),
        param: "subject".into(),
        target_type: None,
    };
    let p = plan(&c, &sql::include(d, &inc, &[1, 2, 3], &scoped));
    assert!(
        p.contains("PRIMARY KEY (rid=? AND k=?") && no_scan(&p),
        "{p}"
    );
    let p = plan(
        &c,
        &sql::revinclude(d, &inc, "Patient", &["p1".to_string()], &scoped),
    );
    assert!(
        p.contains(lookup) && p.contains("ix_reference_value") && no_scan(&p),
        "{p}"
    );
}

/// Retention reads registration hours by `_tag` (several codes of one
/// system), in id pages: the tag's index rows are looked up by code, and only
/// they are sorted, never the whole type or every tag of it.
#[test]
fn tag_pages_are_driven_by_the_tag() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("plans.db");
    let store = SqliteStore::open(&path).unwrap();
    drop(store);
    let c = rusqlite::Connection::open(&path).unwrap();
    let mut q = SearchQuery::new("Observation").with(
        "_tag",
        Criterion::Token {
            values: ["2026-11-22T06", "2026-11-22T07"]
                .iter()
                .map(|h| TokenMatch {
                    system: Some(Some(
                        "https://tsunagi.dev/fhir/CodeSystem/registered-hour".into(),
                    )),
                    code: Some(h.to_string()),
                })
                .collect(),
            negate: false,
        },
    );
    q.sort = vec![tsunagi_fhir::search::SortKey {
        param: "_id".into(),
        descending: false,
        param_type: tsunagi_fhir::search::ParamType::Token,
    }];
    q.count = 1000;
    q.offset = 5000;
    let b = sql::search_page(Dialect::Sqlite, &q, &Scope::Unrestricted).unwrap();
    let p = plan(&c, &b);
    assert!(
        p.contains("ix_token_value (k=? AND code=?")
            && !p.contains("SCAN")
            && !p.contains("resource_current_type_lu"),
        "{p}"
    );
}

/// A read of listed ids (`_id=a,b,...`, retention's pages) looks each id up in
/// the type's primary key, whatever the sort, never walking the type in the
/// sort's order.
#[test]
fn id_lists_are_looked_up() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("plans.db");
    drop(SqliteStore::open(&path).unwrap());
    let c = rusqlite::Connection::open(&path).unwrap();
    // a thousand ids: SQLite's estimate for a long IN list is what tempted it
    // to walk the type in last-updated order instead
    let ids = (0..1000).map(|i| format!("id-{i}")).collect();
    let mut q = SearchQuery::new("Observation").with("_id", Criterion::Id(ids));
    q.count = 1000;
    let b = sql::search_page(Dialect::Sqlite, &q, &Scope::Unrestricted).unwrap();
    let p = plan(&c, &b);
    assert!(
        !p.contains("SCAN") && !p.contains("resource_current_type_lu"),
        "{p}"
    );
}

#[test]
fn audit_queries_walk_an_index_and_the_unindexed_tail() {
    use tsunagi_store::AuditFilter;
    use tsunagi_store::sql::AuditSource;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("plans.db");
    drop(SqliteStore::open(&path).unwrap());
    let c = rusqlite::Connection::open(&path).unwrap();
    for (file, name) in [
        (tsunagi_store::sqlite::audit_file(&path), "audit"),
        (tsunagi_store::sqlite::audit_index_file(&path), "auditidx"),
    ] {
        c.execute(
            &format!("ATTACH DATABASE ?1 AS {name}"),
            [file.to_str().unwrap()],
        )
        .unwrap();
    }
    // the data file's records keep no index but the one of their `seq`
    let indexes: Vec<String> = c
        .prepare("SELECT name FROM pragma_index_list('audit_log')")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    assert_eq!(indexes, ["sqlite_autoindex_audit_log_1"]);
    let sources = [
        AuditSource::Indexed {
            table: "main.audit_log",
            schema: "auditidx",
            src: 0,
            upto: 1000,
        },
        AuditSource::Indexed {
            table: "audit.audit_log",
            schema: "auditidx",
            src: 1,
            upto: 1000,
        },
    ];
    let at = chrono::Utc::now();
    for (filter, key) in [
        (
            AuditFilter {
                patient: Some("p1".into()),
                org: Some("1311234567".into()),
                ..Default::default()
            },
            "src=? AND patient=?",
        ),
        (
            AuditFilter {
                user: Some("u1".into()),
                ..Default::default()
            },
            "src=? AND usr=?",
        ),
        (
            AuditFilter {
                org: Some("1311234567".into()),
                purpose: Some("treatment".into()),
                ..Default::default()
            },
            "src=? AND org=?",
        ),
        (
            AuditFilter {
                since: Some(at),
                until: Some(at),
                ..Default::default()
            },
            "src=? AND recorded>? AND recorded<?",
        ),
    ] {
        let p = plan(&c, &sql::audit_query(Dialect::Sqlite, &sources, &filter));
        // each branch is a co-routine the merge scans (`SCAN a1`); no table is scanned
        assert!(
            !p.lines()
                .any(|l| l.starts_with("SCAN ") && !l.starts_with("SCAN a")),
            "{filter:?}:\n{p}"
        );
        // both files' records up to `upto` through the index, each file's own
        assert_eq!(
            p.matches(&format!("SEARCH i USING PRIMARY KEY ({key}"))
                .count(),
            2,
            "{filter:?}:\n{p}"
        );
        // the tails after `upto`: the audit file's by its rowid, the data file's
        // by its `seq` index
        assert!(
            p.contains("SEARCH l USING INTEGER PRIMARY KEY (rowid>?)")
                && p.contains("SEARCH l USING INDEX sqlite_autoindex_audit_log_1 (seq>?)"),
            "{filter:?}:\n{p}"
        );
    }
}
