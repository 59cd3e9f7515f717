//! The conformance suite every backend must pass, unchanged.
//!
//! Each case is a `pub fn(&dyn Harness)`; [`conformance_tests!`](crate::conformance_tests)
//! expands to one `#[test]` per case for a backend, e.g.
//! `tsunagi_store::conformance_tests!(make_store);` where
//! `fn make_store() -> Option<Box<dyn Harness>>` returns None to skip (after
//! printing why). Cases panic on failure, like any test.

use std::collections::HashSet;
use std::fmt::Write as _;
/// The PostgreSQL test database named by `TSUNAGI_TEST_PG`, or None after printing
/// a `SKIPPED` line naming `what` past the test harness's output capture, so the
/// skip shows in CI logs. Every suite that has a PostgreSQL half uses this.
pub fn test_pg_url(what: &str) -> Option<String> {
    match std::env::var("TSUNAGI_TEST_PG") {
        Ok(u) if !u.trim().is_empty() => Some(u),
        _ => {
            use std::io::Write;
            let _ = writeln!(
                std::io::stderr(),
                "SKIPPED: TSUNAGI_TEST_PG is unset; PostgreSQL {what} not run"
            );
            None
        }
    }
}

/// A schema name unique across test processes and tests: `{prefix}_{pid}_{nanos}_{n}`.
pub fn fresh_schema(prefix: &str) -> String {
    use std::sync::atomic::{AtomicUsize, Ordering};
    static N: AtomicUsize = AtomicUsize::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!(
        "{prefix}_{}_{nanos}_{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

use chrono::{DateTime, Utc};
use serde_json::{Value, json};
use tsunagi_fhir::FhirResult;
use tsunagi_fhir::datetime::parse_range;
use tsunagi_fhir::index::normalize_string;
use tsunagi_fhir::search::{
    Criterion, DateMatch, Include, NumberMatch, ParamType, Prefix, RefMatch, SearchQuery, SortKey,
    StringMode, Summary, TokenMatch,
};

use crate::api::*;
use crate::audit::{self, ChainProblem, ProblemKind};

/// A store under test plus the raw-SQL hook the tamper cases need.
pub trait Harness {
    fn store(&self) -> &dyn Store;
    /// Executes raw SQL (test hook; tampering with the audit log).
    fn raw_execute(&self, sql: &str) -> FhirResult<()>;
    /// The table `raw_execute` names to reach the records of `Store::audit_append`.
    fn standalone_audit_table(&self) -> &'static str {
        "audit_log"
    }
    /// Brings any index the backend fills in the background up to date (SQLite's
    /// audit index file), so that a case can query both before and after.
    fn settle_audit(&self) {}
}

/// Expands to one `#[test]` per conformance case. `$make` is a path to
/// `fn() -> Option<Box<dyn Harness>>`; None skips the case.
#[macro_export]
macro_rules! conformance_tests {
    ($make:path) => {
        $crate::conformance_tests!(@cases $make;
            create_read_vread,
            versions_increase,
            update_if_match,
            update_as_create,
            delete_and_history,
            create_existing_conflicts,
            rollback_on_drop,
            transaction_sees_own_writes,
            search_token,
            search_string,
            search_date,
            search_number_and_quantity,
            search_reference_and_uri,
            search_missing,
            search_id_and_last_updated,
            search_and_or,
            deleted_never_match,
            sort_and_paging,
            summary_count,
            include_and_revinclude,
            scope_filtering,
            patient_compartment,
            history_since_and_paging,
            audit_chain_verifies,
            audit_query_filters,
            audit_tamper_detection,
            client_keys_roundtrip,
            concurrent_writers,
            schema_and_size,
            security_label_scopes,
            purge_removes_everything,
            latest_per_group,
            scan_keyset_pages,
            search_meta_tag_and_profile,
            forget_history_keeps_only_the_current_version,
            repeated_entries_are_one_entry,
            put_stores_what_update_stores,
            read_text_is_the_read_unparsed,
            search_text_is_the_search_unparsed,
        );
    };
    (@cases $make:path; $($case:ident),* $(,)?) => {
        $(
            #[test]
            fn $case() {
                if let Some(h) = $make() {
                    $crate::conformance::$case(&*h);
                }
            }
        )*
    };
}

// ---------------------------------------------------------------- helpers

const MRN: &str = "urn:oid:1.2.392.100495.20.3.51.1";
const LOINC: &str = "http://loinc.org";
const UCUM: &str = "http://unitsofmeasure.org";

fn ctx(org: &str) -> WriteContext {
    WriteContext {
        org: Some(org.to_string()),
        user: Some(format!("{org}-user")),
    }
}

fn patient(id: &str, family: &str, birth: Option<&str>, gender: &str) -> Value {
    let mut p = json!({
        "resourceType": "Patient",
        "identifier": [{"system": MRN, "value": format!("MRN-{id}")}],
        "name": [{"family": family, "given": ["Taro"]}],
        "gender": gender,
    });
    if let Some(b) = birth {
        p["birthDate"] = json!(b);
    }
    p
}

fn observation(patient: &str, code: &str, date: &str, value: f64, unit: &str) -> Value {
    json!({
        "resourceType": "Observation",
        "status": "final",
        "code": {"coding": [{"system": LOINC, "code": code}]},
        "subject": {"reference": format!("Patient/{patient}")},
        "effectiveDateTime": date,
        "valueQuantity": {"value": value, "unit": unit, "system": UCUM, "code": unit},
    })
}

/// Creates all resources in one transaction as `org`.
fn seed(s: &dyn Store, org: &str, items: Vec<(&str, &str, Value)>) {
    let mut tx = s.begin().expect("begin");
    for (rt, id, v) in items {
        tx.create(rt, id, v, &ctx(org)).expect("create");
    }
    tx.commit().expect("commit");
}

fn ids(r: &SearchResult) -> Vec<String> {
    r.matches.iter().map(|m| m.id.clone()).collect()
}

fn sorted_ids(r: &SearchResult) -> Vec<String> {
    let mut v = ids(r);
    v.sort();
    v
}

fn inc_ids(r: &SearchResult) -> Vec<String> {
    let mut v: Vec<String> = r
        .included
        .iter()
        .map(|m| format!("{}/{}", m.resource_type, m.id))
        .collect();
    v.sort();
    v
}

fn search(s: &dyn Store, q: &SearchQuery) -> SearchResult {
    s.search(q, &Scope::Unrestricted).expect("search")
}

fn find(s: &dyn Store, rt: &str, param: &str, c: Criterion) -> Vec<String> {
    let r = search(s, &SearchQuery::new(rt).with(param, c));
    assert_eq!(
        r.total as usize,
        r.matches.len(),
        "total of an unpaged search"
    );
    sorted_ids(&r)
}

fn v(ids: &[&str]) -> Vec<String> {
    ids.iter().map(|s| s.to_string()).collect()
}

fn dm(prefix: Prefix, s: &str) -> DateMatch {
    let (lo, hi) = parse_range(s).expect("test date");
    DateMatch { prefix, lo, hi }
}

fn tok(system: Option<Option<&str>>, code: Option<&str>) -> TokenMatch {
    TokenMatch {
        system: system.map(|s| s.map(str::to_string)),
        code: code.map(str::to_string),
    }
}

fn token(values: Vec<TokenMatch>) -> Criterion {
    Criterion::Token {
        values,
        negate: false,
    }
}

fn string(mode: StringMode, value: &str) -> Criterion {
    let value = if mode == StringMode::Exact {
        value.to_string()
    } else {
        normalize_string(value)
    };
    Criterion::String {
        mode,
        values: vec![value],
    }
}

fn num(prefix: Prefix, value: f64, half: f64) -> NumberMatch {
    NumberMatch {
        prefix,
        value,
        lo: value - half,
        hi: value + half,
        system: None,
        code: None,
    }
}

fn sleep_ms(ms: u64) {
    std::thread::sleep(std::time::Duration::from_millis(ms));
}

fn is_instant_ms(s: &str) -> bool {
    // 2026-11-21T10:00:00.123Z
    s.len() == 24
        && s.ends_with('Z')
        && s.as_bytes()[10] == b'T'
        && s.as_bytes()[19] == b'.'
        && DateTime::parse_from_rfc3339(s).is_ok()
}

// ---------------------------------------------------------------- cases

pub fn create_read_vread(h: &dyn Harness) {
    let s = h.store();
    let mut tx = s.begin().unwrap();
    let c = tx
        .create(
            "Patient",
            "p1",
            patient("p1", "Yamada", Some("1980-05-01"), "male"),
            &ctx("A"),
        )
        .unwrap();
    tx.commit().unwrap();
    assert_eq!(
        (c.version, c.deleted, c.author_org.as_deref()),
        (1, false, Some("A"))
    );
    let body = c.resource.clone().unwrap();
    assert_eq!(body["id"], "p1");
    assert_eq!(body["resourceType"], "Patient");
    assert_eq!(body["meta"]["versionId"], "1");
    let lu = body["meta"]["lastUpdated"].as_str().unwrap();
    assert!(is_instant_ms(lu), "lastUpdated {lu}");
    assert_eq!(crate::format_instant(&c.last_updated), lu);

    let r = s.read("Patient", "p1").unwrap().unwrap();
    assert_eq!(r, c);
    assert_eq!(s.vread("Patient", "p1", 1).unwrap().unwrap(), c);
    assert!(s.vread("Patient", "p1", 2).unwrap().is_none());
    assert!(s.read("Patient", "nope").unwrap().is_none());
    assert!(s.read("Observation", "p1").unwrap().is_none());
    assert_eq!(s.backend(), s.backend());

    // a mismatched resourceType and an invalid id are rejected
    let mut tx = s.begin().unwrap();
    let e = tx
        .create(
            "Observation",
            "x",
            patient("x", "A", None, "male"),
            &ctx("A"),
        )
        .unwrap_err();
    assert_eq!(e.status, 400);
    let e = tx
        .create(
            "Patient",
            "bad id!",
            patient("x", "A", None, "male"),
            &ctx("A"),
        )
        .unwrap_err();
    assert_eq!(e.status, 400);
}

/// The text a read serves unparsed is, byte for byte, the read's body as
/// `serde_json` writes it, with the patient, author and labels the policy
/// decides on; after an update it follows the current version.
pub fn read_text_is_the_read_unparsed(h: &dyn Harness) {
    let s = h.store();
    let mut labelled_obs = labelled(
        observation("p1", "2345-7", "2026-01-02", 5.5, "mmol/L"),
        &[(VIS, "restricted")],
    );
    labelled_obs["note"] = json!([{"text": "ア \"quoted\" \u{1F600} 1e3"}]);
    seed(
        s,
        "A",
        vec![
            (
                "Patient",
                "p1",
                patient("p1", "山田", Some("1980-05-01"), "male"),
            ),
            ("Observation", "o1", labelled_obs),
            (
                "Observation",
                "o2",
                observation("p1", "2339-0", "2026-01-03", 0.1, "mg/dL"),
            ),
            ("Organization", "org1", json!({"name": "Clinic"})),
        ],
    );
    let same = |rt: &str, id: &str, patient: Option<&str>, labels: &[(&str, &str)]| {
        let r = s.read(rt, id).unwrap().unwrap();
        let t = s.read_text(rt, id).unwrap().unwrap();
        let body = r.resource.clone().unwrap();
        assert_eq!(
            t.text.as_deref(),
            Some(serde_json::to_string(&body).unwrap().as_str()),
            "{rt}/{id}"
        );
        assert_eq!(
            (
                &t.resource_type,
                &t.id,
                t.version,
                t.last_updated,
                t.deleted,
                &t.author_org
            ),
            (
                &r.resource_type,
                &r.id,
                r.version,
                r.last_updated,
                r.deleted,
                &r.author_org
            ),
        );
        assert_eq!(t.patient.as_deref(), patient, "{rt}/{id}");
        assert_eq!(t.clone().into_resource().unwrap(), r);
        let want: Vec<(String, String)> = labels
            .iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect();
        assert_eq!(t.security_labels().unwrap(), want, "{rt}/{id}");
        assert_eq!(security_labels(&body), want);
    };
    same("Patient", "p1", Some("p1"), &[]);
    same("Observation", "o1", Some("p1"), &[(VIS, "restricted")]);
    same("Observation", "o2", Some("p1"), &[]);
    same("Organization", "org1", None, &[]);

    // the patient and the author are the current version's
    let mut tx = s.begin().unwrap();
    tx.update(
        "Observation",
        "o2",
        observation("p2", "2339-0", "2026-01-03", 0.2, "mg/dL"),
        None,
        &ctx("B"),
    )
    .unwrap();
    tx.commit().unwrap();
    same("Observation", "o2", Some("p2"), &[]);
    assert_eq!(
        s.read_text("Observation", "o2")
            .unwrap()
            .unwrap()
            .author_org
            .as_deref(),
        Some("B")
    );

    let mut tx = s.begin().unwrap();
    tx.delete("Observation", "o1", None, &ctx("A")).unwrap();
    tx.commit().unwrap();
    let t = s.read_text("Observation", "o1").unwrap().unwrap();
    assert_eq!((t.deleted, t.text, t.version), (true, None, 2));
    assert!(s.read_text("Observation", "nope").unwrap().is_none());
    assert!(s.read_text("Patient", "o2").unwrap().is_none());
}

pub fn search_text_is_the_search_unparsed(h: &dyn Harness) {
    let s = h.store();
    seed_clinical(s);
    let mut tx = s.begin().unwrap();
    tx.delete("Observation", "o2", None, &ctx("A")).unwrap();
    tx.commit().unwrap();
    let by_date = |descending| SortKey {
        param: "date".into(),
        param_type: ParamType::Date,
        descending,
    };
    let mut sorted = SearchQuery::new("Observation");
    sorted.sort.push(by_date(true));
    let mut second_page = sorted.clone();
    (second_page.count, second_page.offset) = (1, 1);
    let mut none = sorted.clone();
    none.count = 0;
    let own = Scope::AnyOf(vec![ScopeRule::Patient {
        id: "p2".into(),
        types: None,
    }]);
    let cases = [
        (sorted.clone(), Scope::Unrestricted),
        (second_page, Scope::Unrestricted),
        (sorted, own.clone()),
        (SearchQuery::new("Patient"), own),
        (SearchQuery::new("Organization"), Scope::Unrestricted),
        (none, Scope::Unrestricted),
    ];
    for (q, scope) in cases {
        let page = s.search_text(&q, &scope).unwrap();
        let full = s.search(&q, &scope).unwrap();
        assert_eq!(page.total, full.total, "{q:?}");
        let (texts, found) = (page.matches, full.matches);
        assert_eq!(texts.len(), found.len(), "{q:?}");
        for (t, r) in texts.iter().zip(&found) {
            assert_eq!(
                t.text.as_deref(),
                Some(
                    serde_json::to_string(r.resource.as_ref().unwrap())
                        .unwrap()
                        .as_str()
                )
            );
            assert_eq!(t.clone().into_resource().unwrap(), *r);
            let subject = r.resource.as_ref().and_then(|b| {
                b.pointer("/subject/reference")
                    .and_then(Value::as_str)
                    .map(|x| x.trim_start_matches("Patient/").to_string())
                    .or_else(|| (r.resource_type == "Patient").then(|| r.id.clone()))
            });
            assert_eq!(t.patient, subject, "{}/{}", r.resource_type, r.id);
        }
    }
    let texts = |q: &SearchQuery, scope: &Scope| -> Vec<String> {
        s.search_text(q, scope)
            .unwrap()
            .matches
            .into_iter()
            .map(|t| t.id)
            .collect()
    };
    let mut q = SearchQuery::new("Observation");
    q.sort.push(by_date(false));
    // the deleted o2 never matches; the order is the sort's
    assert_eq!(texts(&q, &Scope::Unrestricted), v(&["o1", "o3", "o4"]));
    q.count = 2;
    assert_eq!(texts(&q, &Scope::Unrestricted), v(&["o1", "o3"]));
    // a full page counts the rest; a page past the end still knows the total
    assert_eq!(s.search_text(&q, &Scope::Unrestricted).unwrap().total, 3);
    q.offset = 5;
    let past = s.search_text(&q, &Scope::Unrestricted).unwrap();
    assert_eq!((past.total, past.matches.len()), (3, 0));
    q.offset = 0;
    assert!(texts(&q, &Scope::AnyOf(Vec::new())).is_empty());
    // matches only: includes and counts are the full search's
    q.include.push(Include {
        source_type: "Observation".into(),
        param: "subject".into(),
        target_type: None,
    });
    assert_eq!(
        s.search_text(&q, &Scope::Unrestricted).unwrap_err().status,
        400
    );
    let mut q = SearchQuery::new("Observation");
    q.summary = Summary::Count;
    assert_eq!(
        s.search_text(&q, &Scope::Unrestricted).unwrap_err().status,
        400
    );
}

pub fn versions_increase(h: &dyn Harness) {
    let s = h.store();
    seed(
        s,
        "A",
        vec![("Patient", "p1", patient("p1", "Yamada", None, "male"))],
    );
    let mut last = s.read("Patient", "p1").unwrap().unwrap();
    for n in 2..=4 {
        let mut tx = s.begin().unwrap();
        let (u, created) = tx
            .update(
                "Patient",
                "p1",
                patient("p1", &format!("Yamada{n}"), None, "male"),
                None,
                &ctx("B"),
            )
            .unwrap();
        tx.commit().unwrap();
        assert!(!created);
        assert_eq!(u.version, n);
        assert_eq!(
            u.resource.as_ref().unwrap()["meta"]["versionId"],
            json!(n.to_string())
        );
        assert!(
            u.last_updated > last.last_updated,
            "lastUpdated strictly increases"
        );
        assert_eq!(u.author_org.as_deref(), Some("B"));
        last = u;
    }
    assert_eq!(s.read("Patient", "p1").unwrap().unwrap(), last);
    assert_eq!(
        s.vread("Patient", "p1", 2)
            .unwrap()
            .unwrap()
            .resource
            .unwrap()["name"][0]["family"],
        "Yamada2"
    );
}

pub fn update_if_match(h: &dyn Harness) {
    let s = h.store();
    seed(
        s,
        "A",
        vec![("Patient", "p1", patient("p1", "Yamada", None, "male"))],
    );
    let mut tx = s.begin().unwrap();
    let (u, _) = tx
        .update(
            "Patient",
            "p1",
            patient("p1", "Sato", None, "male"),
            Some(1),
            &ctx("A"),
        )
        .unwrap();
    assert_eq!(u.version, 2);
    let e = tx
        .update(
            "Patient",
            "p1",
            patient("p1", "Kato", None, "male"),
            Some(1),
            &ctx("A"),
        )
        .unwrap_err();
    assert_eq!(e.status, 412);
    let e = tx.delete("Patient", "p1", Some(1), &ctx("A")).unwrap_err();
    assert_eq!(e.status, 412);
    let e = tx
        .update(
            "Patient",
            "missing",
            patient("missing", "Kato", None, "male"),
            Some(1),
            &ctx("A"),
        )
        .unwrap_err();
    assert_eq!(e.status, 412);
    tx.commit().unwrap();
    let r = s.read("Patient", "p1").unwrap().unwrap();
    assert_eq!(
        (r.version, r.resource.unwrap()["name"][0]["family"].clone()),
        (2, json!("Sato"))
    );
}

pub fn update_as_create(h: &dyn Harness) {
    let s = h.store();
    let mut tx = s.begin().unwrap();
    let (u, created) = tx
        .update(
            "Patient",
            "new",
            patient("new", "Ito", None, "male"),
            None,
            &ctx("A"),
        )
        .unwrap();
    assert!(created);
    assert_eq!(u.version, 1);
    let d = tx
        .delete("Patient", "new", None, &ctx("A"))
        .unwrap()
        .unwrap();
    assert_eq!(d.version, 2);
    let (u, created) = tx
        .update(
            "Patient",
            "new",
            patient("new", "Ito", None, "male"),
            None,
            &ctx("A"),
        )
        .unwrap();
    tx.commit().unwrap();
    assert!(created, "update after delete re-creates");
    assert_eq!(u.version, 3);
    assert!(!s.read("Patient", "new").unwrap().unwrap().deleted);
    assert_eq!(
        find(
            s,
            "Patient",
            "family",
            string(StringMode::StartsWith, "Ito")
        ),
        v(&["new"])
    );
}

pub fn delete_and_history(h: &dyn Harness) {
    let s = h.store();
    seed(
        s,
        "A",
        vec![("Patient", "p1", patient("p1", "Yamada", None, "male"))],
    );
    let mut tx = s.begin().unwrap();
    tx.update(
        "Patient",
        "p1",
        patient("p1", "Sato", None, "male"),
        None,
        &ctx("A"),
    )
    .unwrap();
    let d = tx
        .delete("Patient", "p1", Some(2), &ctx("B"))
        .unwrap()
        .unwrap();
    assert!(
        tx.delete("Patient", "p1", None, &ctx("B"))
            .unwrap()
            .is_none(),
        "deleting twice is not an error"
    );
    assert!(
        tx.delete("Patient", "never", None, &ctx("B"))
            .unwrap()
            .is_none()
    );
    tx.commit().unwrap();
    assert_eq!(
        (d.version, d.deleted, d.resource.is_none()),
        (3, true, true)
    );

    let r = s.read("Patient", "p1").unwrap().unwrap();
    assert!(r.deleted && r.resource.is_none());
    assert_eq!(r.version, 3);
    let hist = s
        .history(&HistoryQuery {
            resource_type: Some("Patient".into()),
            id: Some("p1".into()),
            count: 10,
            ..Default::default()
        })
        .unwrap();
    assert_eq!(
        hist.iter()
            .map(|x| (x.version, x.deleted))
            .collect::<Vec<_>>(),
        vec![(3, true), (2, false), (1, false)]
    );
    assert_eq!(
        hist[2].resource.as_ref().unwrap()["name"][0]["family"],
        "Yamada"
    );
    assert!(
        find(
            s,
            "Patient",
            "family",
            string(StringMode::StartsWith, "Sato")
        )
        .is_empty()
    );
    assert!(
        find(
            s,
            "Patient",
            "identifier",
            token(vec![tok(None, Some("MRN-p1"))])
        )
        .is_empty()
    );
}

pub fn create_existing_conflicts(h: &dyn Harness) {
    let s = h.store();
    seed(
        s,
        "A",
        vec![("Patient", "p1", patient("p1", "Yamada", None, "male"))],
    );
    let mut tx = s.begin().unwrap();
    let e = tx
        .create(
            "Patient",
            "p1",
            patient("p1", "Sato", None, "male"),
            &ctx("A"),
        )
        .unwrap_err();
    assert_eq!(e.status, 409);
    tx.delete("Patient", "p1", None, &ctx("A")).unwrap();
    let e = tx
        .create(
            "Patient",
            "p1",
            patient("p1", "Sato", None, "male"),
            &ctx("A"),
        )
        .unwrap_err();
    assert_eq!(e.status, 409, "a deleted id stays taken");
    // same id, other type is fine
    tx.create(
        "Observation",
        "p1",
        observation("p1", "29463-7", "2024-01-01", 60.0, "kg"),
        &ctx("A"),
    )
    .unwrap();
    tx.commit().unwrap();
}

pub fn rollback_on_drop(h: &dyn Harness) {
    let s = h.store();
    {
        let mut tx = s.begin().unwrap();
        tx.create(
            "Patient",
            "p1",
            patient("p1", "Yamada", Some("1980-05-01"), "male"),
            &ctx("A"),
        )
        .unwrap();
        tx.audit_append(&[json!({"action": "create", "patient": "p1"})])
            .unwrap();
        assert!(tx.read("Patient", "p1").unwrap().is_some());
        // dropped without commit
    }
    assert!(s.read("Patient", "p1").unwrap().is_none());
    assert!(s.history(&HistoryQuery::default()).unwrap().is_empty());
    assert!(
        find(
            s,
            "Patient",
            "family",
            string(StringMode::StartsWith, "yamada")
        )
        .is_empty()
    );
    assert!(find(s, "Patient", "birthdate", Criterion::Missing(false)).is_empty());
    assert!(s.audit_scan(0, 10).unwrap().is_empty());
    // the id is free and the chain starts at 1 afterwards
    seed(
        s,
        "A",
        vec![("Patient", "p1", patient("p1", "Yamada", None, "male"))],
    );
    let e = s.audit_append(&[json!({"action": "x"})]).unwrap();
    assert_eq!(e[0].seq, 1);
    assert_eq!(e[0].prev_hash, audit::GENESIS_HASH);
    // an error inside a transaction does not poison the store
    let mut tx = s.begin().unwrap();
    assert!(
        tx.create("Patient", "p1", patient("p1", "X", None, "male"), &ctx("A"))
            .is_err()
    );
    drop(tx);
    seed(
        s,
        "A",
        vec![("Patient", "p2", patient("p2", "Yamada", None, "male"))],
    );
}

pub fn transaction_sees_own_writes(h: &dyn Harness) {
    let s = h.store();
    let mut tx = s.begin().unwrap();
    tx.create(
        "Patient",
        "p1",
        patient("p1", "Yamada", None, "male"),
        &ctx("A"),
    )
    .unwrap();
    let q = SearchQuery::new("Patient").with(
        "identifier",
        token(vec![tok(Some(Some(MRN)), Some("MRN-p1"))]),
    );
    let r = tx.search(&q, &Scope::Unrestricted).unwrap();
    assert_eq!(ids(&r), v(&["p1"]));
    assert_eq!(tx.read("Patient", "p1").unwrap().unwrap().version, 1);
    tx.commit().unwrap();
}

fn seed_patients(s: &dyn Store) {
    let mut p3 = patient("p3", "ﾔﾏﾀﾞ", Some("2000-12-31"), "female");
    p3["identifier"]
        .as_array_mut()
        .unwrap()
        .push(json!({"value": "LOCAL-1"}));
    seed(
        s,
        "A",
        vec![
            (
                "Patient",
                "p1",
                patient("p1", "Yamada", Some("1980-05-01"), "male"),
            ),
            (
                "Patient",
                "p2",
                patient("p2", "Sato", Some("1990-01-15"), "male"),
            ),
            ("Patient", "p3", p3),
            ("Patient", "p4", patient("p4", "100%_pure", None, "other")),
            ("Patient", "p5", patient("p5", "10x", None, "female")),
        ],
    );
}

pub fn search_token(h: &dyn Harness) {
    let s = h.store();
    seed_patients(s);
    let f = |m: Vec<TokenMatch>| find(s, "Patient", "identifier", token(m));
    assert_eq!(f(vec![tok(Some(Some(MRN)), Some("MRN-p2"))]), v(&["p2"]));
    assert_eq!(f(vec![tok(None, Some("MRN-p2"))]), v(&["p2"]));
    assert_eq!(
        f(vec![tok(Some(Some("urn:other")), Some("MRN-p2"))]),
        Vec::<String>::new()
    );
    assert_eq!(f(vec![tok(Some(None), Some("LOCAL-1"))]), v(&["p3"]));
    assert_eq!(
        f(vec![tok(Some(None), Some("MRN-p2"))]),
        Vec::<String>::new(),
        "|code needs no system"
    );
    assert_eq!(f(vec![tok(None, Some("LOCAL-1"))]), v(&["p3"]));
    assert_eq!(
        f(vec![tok(Some(Some(MRN)), Some("LOCAL-1"))]),
        Vec::<String>::new()
    );
    assert_eq!(
        f(vec![tok(Some(Some(MRN)), None)]),
        v(&["p1", "p2", "p3", "p4", "p5"])
    );
    assert_eq!(
        f(vec![tok(None, Some("MRN-p1")), tok(None, Some("MRN-p4"))]),
        v(&["p1", "p4"])
    );
    assert_eq!(
        find(
            s,
            "Patient",
            "gender",
            token(vec![tok(None, Some("female"))])
        ),
        v(&["p3", "p5"])
    );
    let not_male = Criterion::Token {
        values: vec![tok(None, Some("male"))],
        negate: true,
    };
    assert_eq!(
        find(s, "Patient", "gender", not_male),
        v(&["p3", "p4", "p5"])
    );
    let not_either = Criterion::Token {
        values: vec![tok(None, Some("male")), tok(None, Some("female"))],
        negate: true,
    };
    assert_eq!(find(s, "Patient", "gender", not_either), v(&["p4"]));
}

pub fn search_string(h: &dyn Harness) {
    let s = h.store();
    seed_patients(s);
    let f = |mode, val: &str| find(s, "Patient", "family", string(mode, val));
    assert_eq!(f(StringMode::StartsWith, "yam"), v(&["p1"]));
    assert_eq!(f(StringMode::StartsWith, "YAMADA"), v(&["p1"]));
    assert_eq!(
        f(StringMode::StartsWith, "ヤマ"),
        v(&["p3"]),
        "half-width kana folds to full width"
    );
    assert_eq!(f(StringMode::StartsWith, "ada"), Vec::<String>::new());
    assert_eq!(f(StringMode::Contains, "ada"), v(&["p1"]));
    assert_eq!(f(StringMode::Contains, "マダ"), v(&["p3"]));
    assert_eq!(f(StringMode::Exact, "Yamada"), v(&["p1"]));
    assert_eq!(f(StringMode::Exact, "yamada"), Vec::<String>::new());
    assert_eq!(f(StringMode::Exact, "ﾔﾏﾀﾞ"), v(&["p3"]));
    // LIKE wildcards are literal
    assert_eq!(f(StringMode::StartsWith, "10%"), Vec::<String>::new());
    assert_eq!(f(StringMode::StartsWith, "10_"), Vec::<String>::new());
    assert_eq!(f(StringMode::StartsWith, "100%_"), v(&["p4"]));
    assert_eq!(f(StringMode::StartsWith, "10"), v(&["p4", "p5"]));
    assert_eq!(f(StringMode::Contains, "%_"), v(&["p4"]));
    assert_eq!(f(StringMode::Contains, "_"), v(&["p4"]));
    // `name` covers family and given
    assert_eq!(
        find(s, "Patient", "name", string(StringMode::StartsWith, "taro")).len(),
        5
    );
    let two = Criterion::String {
        mode: StringMode::StartsWith,
        values: vec!["sat".into(), "yam".into()],
    };
    assert_eq!(find(s, "Patient", "family", two), v(&["p1", "p2"]));
}

pub fn search_date(h: &dyn Harness) {
    let s = h.store();
    seed_patients(s);
    let f = |p, d: &str| find(s, "Patient", "birthdate", Criterion::Date(vec![dm(p, d)]));
    assert_eq!(f(Prefix::Eq, "1990"), v(&["p2"]));
    assert_eq!(f(Prefix::Eq, "1990-01-15"), v(&["p2"]));
    assert_eq!(f(Prefix::Eq, "1990-01-16"), Vec::<String>::new());
    assert_eq!(f(Prefix::Ne, "1990"), v(&["p1", "p3"]));
    assert_eq!(f(Prefix::Lt, "1990-01-15"), v(&["p1"]));
    assert_eq!(f(Prefix::Le, "1990-01-15"), v(&["p1", "p2"]));
    assert_eq!(f(Prefix::Gt, "1990-01-15"), v(&["p3"]));
    assert_eq!(f(Prefix::Ge, "1990-01-15"), v(&["p2", "p3"]));
    assert_eq!(f(Prefix::Sa, "1990"), v(&["p3"]));
    assert_eq!(f(Prefix::Eb, "1990"), v(&["p1"]));
    assert_eq!(f(Prefix::Ap, "1990-01"), v(&["p2"]));
    let or = Criterion::Date(vec![dm(Prefix::Eq, "1980"), dm(Prefix::Eq, "2000")]);
    assert_eq!(find(s, "Patient", "birthdate", or), v(&["p1", "p3"]));
    // a resource range partly inside the search range: eq fails, ap matches
    seed(
        s,
        "A",
        vec![(
            "Observation",
            "o1",
            observation("p1", "29463-7", "2024-03", 60.0, "kg"),
        )],
    );
    let f = |p, d: &str| find(s, "Observation", "date", Criterion::Date(vec![dm(p, d)]));
    assert_eq!(f(Prefix::Eq, "2024-03-10"), Vec::<String>::new());
    assert_eq!(f(Prefix::Ap, "2024-03-10"), v(&["o1"]));
    assert_eq!(f(Prefix::Eq, "2024"), v(&["o1"]));
}

pub fn search_number_and_quantity(h: &dyn Harness) {
    let s = h.store();
    seed(
        s,
        "A",
        vec![
            (
                "Observation",
                "o1",
                observation("p1", "29463-7", "2024-01-01", 60.0, "kg"),
            ),
            (
                "Observation",
                "o2",
                observation("p1", "29463-7", "2024-02-01", 72.5, "kg"),
            ),
            (
                "Observation",
                "o3",
                observation("p1", "29463-7", "2024-03-01", 72500.0, "g"),
            ),
            (
                "ChargeItem",
                "c1",
                json!({"resourceType": "ChargeItem", "status": "billed", "code": {"text": "x"}, "subject": {"reference": "Patient/p1"}, "factorOverride": 0.5}),
            ),
            (
                "ChargeItem",
                "c2",
                json!({"resourceType": "ChargeItem", "status": "billed", "code": {"text": "x"}, "subject": {"reference": "Patient/p1"}, "factorOverride": 1.5}),
            ),
        ],
    );
    let q = |m: NumberMatch| {
        find(
            s,
            "Observation",
            "value-quantity",
            Criterion::Quantity(vec![m]),
        )
    };
    assert_eq!(q(num(Prefix::Eq, 72.5, 0.05)), v(&["o2"]));
    assert_eq!(q(num(Prefix::Eq, 72.0, 0.5)), Vec::<String>::new());
    assert_eq!(q(num(Prefix::Eq, 60.0, 0.5)), v(&["o1"]));
    assert_eq!(q(num(Prefix::Ne, 60.0, 0.5)), v(&["o2", "o3"]));
    assert_eq!(q(num(Prefix::Gt, 60.0, 0.5)), v(&["o2", "o3"]));
    assert_eq!(q(num(Prefix::Ge, 60.0, 0.5)), v(&["o1", "o2", "o3"]));
    assert_eq!(q(num(Prefix::Lt, 72.5, 0.05)), v(&["o1"]));
    assert_eq!(q(num(Prefix::Le, 72.5, 0.05)), v(&["o1", "o2"]));
    assert_eq!(q(num(Prefix::Ap, 70.0, 0.5)), v(&["o2"]));
    let kg = NumberMatch {
        code: Some("kg".into()),
        ..num(Prefix::Gt, 70.0, 0.5)
    };
    assert_eq!(
        q(kg.clone()),
        v(&["o2"]),
        "code alone matches in any system"
    );
    assert_eq!(
        q(NumberMatch {
            system: Some(UCUM.into()),
            ..kg.clone()
        }),
        v(&["o2"])
    );
    assert_eq!(
        q(NumberMatch {
            system: Some("urn:other".into()),
            ..kg
        }),
        Vec::<String>::new()
    );
    let n = |m: NumberMatch| {
        find(
            s,
            "ChargeItem",
            "factor-override",
            Criterion::Number(vec![m]),
        )
    };
    assert_eq!(n(num(Prefix::Eq, 1.5, 0.05)), v(&["c2"]));
    assert_eq!(n(num(Prefix::Lt, 1.0, 0.5)), v(&["c1"]));
    assert_eq!(n(num(Prefix::Ge, 0.5, 0.05)), v(&["c1", "c2"]));
    let or = Criterion::Number(vec![num(Prefix::Eq, 0.5, 0.05), num(Prefix::Eq, 1.5, 0.05)]);
    assert_eq!(
        find(s, "ChargeItem", "factor-override", or),
        v(&["c1", "c2"])
    );
}

pub fn search_reference_and_uri(h: &dyn Harness) {
    let s = h.store();
    seed(
        s,
        "A",
        vec![
            (
                "Observation",
                "o1",
                observation("p1", "29463-7", "2024-01-01", 60.0, "kg"),
            ),
            (
                "Observation",
                "o2",
                observation("p2", "29463-7", "2024-01-01", 60.0, "kg"),
            ),
            (
                "CodeSystem",
                "cs1",
                json!({"resourceType": "CodeSystem", "url": "http://example.org/cs/a", "status": "active", "content": "complete"}),
            ),
            (
                "CodeSystem",
                "cs2",
                json!({"resourceType": "CodeSystem", "url": "http://example.org/cs/b", "status": "active", "content": "complete"}),
            ),
        ],
    );
    let r = |t: Option<&str>, id: &str, p: &str| {
        find(
            s,
            "Observation",
            p,
            Criterion::Reference(vec![RefMatch {
                target_type: t.map(str::to_string),
                target_id: id.into(),
            }]),
        )
    };
    assert_eq!(r(Some("Patient"), "p1", "subject"), v(&["o1"]));
    assert_eq!(r(None, "p2", "subject"), v(&["o2"]));
    assert_eq!(r(Some("Group"), "p1", "subject"), Vec::<String>::new());
    assert_eq!(r(Some("Patient"), "p2", "patient"), v(&["o2"]));
    let both = Criterion::Reference(vec![
        RefMatch {
            target_type: None,
            target_id: "p1".into(),
        },
        RefMatch {
            target_type: None,
            target_id: "p2".into(),
        },
    ]);
    assert_eq!(find(s, "Observation", "patient", both), v(&["o1", "o2"]));
    let u = |x: &str| find(s, "CodeSystem", "url", Criterion::Uri(vec![x.into()]));
    assert_eq!(u("http://example.org/cs/a"), v(&["cs1"]));
    assert_eq!(u("http://example.org/cs"), Vec::<String>::new());
}

pub fn search_missing(h: &dyn Harness) {
    let s = h.store();
    seed_patients(s);
    assert_eq!(
        find(s, "Patient", "birthdate", Criterion::Missing(true)),
        v(&["p4", "p5"])
    );
    assert_eq!(
        find(s, "Patient", "birthdate", Criterion::Missing(false)),
        v(&["p1", "p2", "p3"])
    );
    assert_eq!(
        find(s, "Patient", "family", Criterion::Missing(true)),
        Vec::<String>::new()
    );
    assert_eq!(
        find(s, "Patient", "organization", Criterion::Missing(true)).len(),
        5
    );
}

pub fn search_id_and_last_updated(h: &dyn Harness) {
    let s = h.store();
    seed(
        s,
        "A",
        vec![("Patient", "p1", patient("p1", "Yamada", None, "male"))],
    );
    sleep_ms(5);
    let t = Utc::now();
    sleep_ms(5);
    seed(
        s,
        "A",
        vec![("Patient", "p2", patient("p2", "Sato", None, "male"))],
    );
    assert_eq!(
        find(s, "Patient", "_id", Criterion::Id(v(&["p2", "zz"]))),
        v(&["p2"])
    );
    assert_eq!(
        find(s, "Patient", "_id", Criterion::Id(vec![])),
        Vec::<String>::new()
    );
    let ms = t.timestamp_millis();
    let lu = |p| {
        find(
            s,
            "Patient",
            "_lastUpdated",
            Criterion::LastUpdated(vec![DateMatch {
                prefix: p,
                lo: ms,
                hi: ms,
            }]),
        )
    };
    assert_eq!(lu(Prefix::Gt), v(&["p2"]));
    assert_eq!(lu(Prefix::Ge), v(&["p2"]));
    assert_eq!(lu(Prefix::Lt), v(&["p1"]));
    assert_eq!(lu(Prefix::Ne), v(&["p1", "p2"]));
}

pub fn search_and_or(h: &dyn Harness) {
    let s = h.store();
    seed_patients(s);
    let q = SearchQuery::new("Patient")
        .with(
            "gender",
            token(vec![tok(None, Some("male")), tok(None, Some("female"))]),
        )
        .with("birthdate", Criterion::Date(vec![dm(Prefix::Ge, "1990")]));
    assert_eq!(sorted_ids(&search(s, &q)), v(&["p2", "p3"]));
    let q = q.with("family", string(StringMode::StartsWith, "sa"));
    assert_eq!(sorted_ids(&search(s, &q)), v(&["p2"]));
    // the same parameter twice is AND-ed
    let q = SearchQuery::new("Patient")
        .with("birthdate", Criterion::Date(vec![dm(Prefix::Ge, "1985")]))
        .with("birthdate", Criterion::Date(vec![dm(Prefix::Lt, "1995")]));
    assert_eq!(sorted_ids(&search(s, &q)), v(&["p2"]));
}

pub fn deleted_never_match(h: &dyn Harness) {
    let s = h.store();
    seed_patients(s);
    seed(
        s,
        "A",
        vec![(
            "Observation",
            "o1",
            observation("p2", "29463-7", "2024-01-01", 60.0, "kg"),
        )],
    );
    let mut tx = s.begin().unwrap();
    tx.delete("Patient", "p2", None, &ctx("A")).unwrap();
    tx.commit().unwrap();
    assert_eq!(
        find(
            s,
            "Patient",
            "gender",
            Criterion::Token {
                values: vec![tok(None, Some("x"))],
                negate: true
            }
        ),
        v(&["p1", "p3", "p4", "p5"])
    );
    assert_eq!(
        find(s, "Patient", "birthdate", Criterion::Missing(true)),
        v(&["p4", "p5"])
    );
    assert_eq!(search(s, &SearchQuery::new("Patient")).total, 4);
    let mut q = SearchQuery::new("Observation");
    q.include.push(Include {
        source_type: "Observation".into(),
        param: "subject".into(),
        target_type: None,
    });
    let r = search(s, &q);
    assert_eq!(ids(&r), v(&["o1"]));
    assert!(r.included.is_empty(), "a deleted target is not included");
    let c = s
        .patient_compartment("p2", &Scope::Unrestricted, 10, 0)
        .unwrap();
    assert_eq!(ids(&c), v(&["o1"]));
}

pub fn sort_and_paging(h: &dyn Harness) {
    let s = h.store();
    seed_patients(s);
    seed(
        s,
        "A",
        vec![(
            "Patient",
            "p6",
            patient("p6", "Abe", Some("1990-01-15"), "male"),
        )],
    );
    sleep_ms(3);
    let mut tx = s.begin().unwrap();
    let mut nameless = patient("p7", "x", Some("1990-01-15"), "male");
    nameless.as_object_mut().unwrap().remove("name");
    tx.create("Patient", "p7", nameless, &ctx("A")).unwrap();
    tx.commit().unwrap();

    let sorted = |param: &str, pt, desc| {
        let mut q = SearchQuery::new("Patient");
        q.sort.push(SortKey {
            param: param.into(),
            param_type: pt,
            descending: desc,
        });
        ids(&search(s, &q))
    };
    assert_eq!(
        sorted("family", ParamType::String, false),
        v(&["p4", "p5", "p6", "p2", "p1", "p3", "p7"])
    );
    assert_eq!(
        sorted("family", ParamType::String, true),
        v(&["p3", "p1", "p2", "p6", "p5", "p4", "p7"])
    );
    assert_eq!(
        sorted("birthdate", ParamType::Date, false),
        v(&["p1", "p2", "p6", "p7", "p3", "p4", "p5"])
    );
    assert_eq!(
        sorted("birthdate", ParamType::Date, true),
        v(&["p3", "p2", "p6", "p7", "p1", "p4", "p5"])
    );
    assert_eq!(
        sorted("gender", ParamType::Token, false),
        v(&["p3", "p5", "p1", "p2", "p6", "p7", "p4"])
    );
    assert_eq!(
        sorted("_id", ParamType::Token, true),
        v(&["p7", "p6", "p5", "p4", "p3", "p2", "p1"])
    );
    // default: newest first
    assert_eq!(ids(&search(s, &SearchQuery::new("Patient")))[0], "p7");

    // deterministic paging: every page size yields the full order without gaps or duplicates
    let mut base = SearchQuery::new("Patient");
    base.sort.push(SortKey {
        param: "birthdate".into(),
        param_type: ParamType::Date,
        descending: false,
    });
    let full = ids(&search(s, &base));
    for size in 1..=4 {
        let mut got = Vec::new();
        let mut offset = 0;
        loop {
            let mut q = base.clone();
            q.count = size;
            q.offset = offset;
            let r = search(s, &q);
            assert_eq!(r.total, 7, "total ignores paging");
            if r.matches.is_empty() {
                break;
            }
            got.extend(ids(&r));
            offset += size;
        }
        assert_eq!(got, full, "page size {size}");
    }
    let mut q = base.clone();
    q.count = 3;
    q.offset = 100;
    let r = search(s, &q);
    assert!(r.matches.is_empty());
    assert_eq!(r.total, 7);
}

pub fn summary_count(h: &dyn Harness) {
    let s = h.store();
    seed_patients(s);
    let mut q = SearchQuery::new("Patient").with("gender", token(vec![tok(None, Some("male"))]));
    q.summary = Summary::Count;
    let r = search(s, &q);
    assert_eq!((r.total, r.matches.len()), (2, 0));
    let mut q = SearchQuery::new("Patient");
    q.count = 0;
    let r = search(s, &q);
    assert_eq!((r.total, r.matches.len()), (5, 0));
}

fn seed_clinical(s: &dyn Store) {
    seed(
        s,
        "A",
        vec![
            (
                "Patient",
                "p1",
                patient("p1", "Yamada", Some("1980-05-01"), "male"),
            ),
            (
                "Observation",
                "o1",
                observation("p1", "29463-7", "2024-01-01", 60.0, "kg"),
            ),
            (
                "Observation",
                "o2",
                observation("p1", "8302-2", "2024-01-02", 170.0, "cm"),
            ),
            (
                "Organization",
                "org1",
                json!({"resourceType": "Organization", "name": "Tsunagi Hospital"}),
            ),
        ],
    );
    seed(
        s,
        "B",
        vec![
            (
                "Patient",
                "p2",
                patient("p2", "Sato", Some("1990-01-15"), "female"),
            ),
            (
                "Observation",
                "o3",
                observation("p2", "29463-7", "2024-01-03", 50.0, "kg"),
            ),
        ],
    );
    // o4 is about p2 but written by A
    let mut o4 = observation("p2", "8302-2", "2024-01-04", 160.0, "cm");
    o4["hasMember"] = json!([{"reference": "Observation/o1"}, {"reference": "Observation/o3"}]);
    seed(s, "A", vec![("Observation", "o4", o4)]);
}

pub fn include_and_revinclude(h: &dyn Harness) {
    let s = h.store();
    seed_clinical(s);
    let subject = Include {
        source_type: "Observation".into(),
        param: "subject".into(),
        target_type: None,
    };
    let mut q = SearchQuery::new("Observation");
    q.include.push(subject.clone());
    let r = search(s, &q);
    assert_eq!(r.matches.len(), 4);
    assert_eq!(
        inc_ids(&r),
        v(&["Patient/p1", "Patient/p2"]),
        "deduplicated"
    );

    let mut q = SearchQuery::new("Observation").with("_id", Criterion::Id(v(&["o1"])));
    q.include.push(Include {
        target_type: Some("Group".into()),
        ..subject.clone()
    });
    assert!(search(s, &q).included.is_empty(), "target type restricts");

    // included resources already among the matches are not repeated
    let mut q = SearchQuery::new("Observation").with("_id", Criterion::Id(v(&["o4", "o1"])));
    q.include.push(Include {
        source_type: "Observation".into(),
        param: "has-member".into(),
        target_type: None,
    });
    let r = search(s, &q);
    assert_eq!(sorted_ids(&r), v(&["o1", "o4"]));
    assert_eq!(inc_ids(&r), v(&["Observation/o3"]));

    let mut q = SearchQuery::new("Patient").with("_id", Criterion::Id(v(&["p1"])));
    q.revinclude.push(subject.clone());
    let r = search(s, &q);
    assert_eq!(ids(&r), v(&["p1"]));
    assert_eq!(inc_ids(&r), v(&["Observation/o1", "Observation/o2"]));
    let mut q = SearchQuery::new("Patient");
    q.revinclude.push(subject);
    assert_eq!(search(s, &q).included.len(), 4);
}

pub fn scope_filtering(h: &dyn Harness) {
    let s = h.store();
    seed_clinical(s);
    let pat = |id: &str, types: Option<&[&str]>| ScopeRule::Patient {
        id: id.into(),
        types: types.map(|t| t.iter().map(|x| x.to_string()).collect()),
    };
    let run = |q: &SearchQuery, rules: Vec<ScopeRule>| s.search(q, &Scope::AnyOf(rules)).unwrap();
    let obs = SearchQuery::new("Observation");

    let r = run(&obs, vec![pat("p1", None)]);
    assert_eq!((sorted_ids(&r), r.total), (v(&["o1", "o2"]), 2));
    let r = run(&obs, vec![pat("p1", Some(&["Patient"]))]);
    assert_eq!((r.matches.len(), r.total), (0, 0));
    let r = run(
        &obs,
        vec![
            pat("p1", Some(&["Observation"])),
            pat("p2", Some(&["Patient"])),
        ],
    );
    assert_eq!(sorted_ids(&r), v(&["o1", "o2"]));
    let r = run(
        &obs,
        vec![ScopeRule::AuthoredBy {
            org: "A".into(),
            types: None,
        }],
    );
    assert_eq!(sorted_ids(&r), v(&["o1", "o2", "o4"]));
    let typed = |types: &[&str]| ScopeRule::AuthoredBy {
        org: "A".into(),
        types: Some(types.iter().map(|t| t.to_string()).collect()),
    };
    assert_eq!(
        run(&obs, vec![typed(&["Patient", "Coverage"])]).total,
        0,
        "an AuthoredBy limited to other types admits none of A's observations"
    );
    assert_eq!(
        sorted_ids(&run(&obs, vec![typed(&["Observation"])])),
        v(&["o1", "o2", "o4"])
    );
    let r = run(&obs, vec![ScopeRule::NonPersonal]);
    assert_eq!(r.total, 0);
    let r = run(
        &SearchQuery::new("Organization"),
        vec![ScopeRule::NonPersonal],
    );
    assert_eq!(ids(&r), v(&["org1"]));
    let r = run(&obs, vec![]);
    assert_eq!(
        (r.matches.len(), r.total),
        (0, 0),
        "an empty scope admits nothing"
    );
    // A facility's live consents: one rule per patient, thousands of them. Those
    // that differ only in the patient are one clause over one list; the answer is
    // the same as rule by rule.
    let mut many: Vec<ScopeRule> = (0..2000)
        .map(|i| pat(&format!("x{i}"), Some(&["Observation"])))
        .collect();
    many.insert(1000, pat("p2", Some(&["Observation"])));
    many.push(pat("p1", Some(&["Patient"])));
    let r = run(&obs, many.clone());
    assert_eq!((sorted_ids(&r), r.total), (v(&["o3", "o4"]), 2));
    let r = run(&SearchQuery::new("Patient"), many);
    assert_eq!(ids(&r), v(&["p1"]), "p1's rule admits its Patient only");
    let mut counted = SearchQuery::new("Observation");
    counted.summary = Summary::Count;
    assert_eq!(run(&counted, vec![pat("p2", None)]).total, 2);
    let mut paged = SearchQuery::new("Observation");
    paged.count = 1;
    assert_eq!(
        run(&paged, vec![pat("p2", None)]).total,
        2,
        "the total counts only in-scope rows"
    );
    // with other criteria combined
    let q = SearchQuery::new("Observation")
        .with("code", token(vec![tok(Some(Some(LOINC)), Some("29463-7"))]));
    assert_eq!(ids(&run(&q, vec![pat("p2", None)])), v(&["o3"]));

    // includes stay in scope
    let mut q = SearchQuery::new("Observation");
    q.include.push(Include {
        source_type: "Observation".into(),
        param: "subject".into(),
        target_type: None,
    });
    let r = run(
        &q,
        vec![
            pat("p1", Some(&["Observation"])),
            ScopeRule::AuthoredBy {
                org: "B".into(),
                types: None,
            },
        ],
    );
    assert_eq!(sorted_ids(&r), v(&["o1", "o2", "o3"]));
    assert_eq!(
        inc_ids(&r),
        v(&["Patient/p2"]),
        "p1 is outside the scope, p2 was written by B"
    );
    let mut q = SearchQuery::new("Observation").with("_id", Criterion::Id(v(&["o4"])));
    q.include.push(Include {
        source_type: "Observation".into(),
        param: "has-member".into(),
        target_type: None,
    });
    let r = run(&q, vec![pat("p2", None)]);
    assert_eq!(inc_ids(&r), v(&["Observation/o3"]), "o1 belongs to p1");
    let mut q = SearchQuery::new("Patient");
    q.revinclude.push(Include {
        source_type: "Observation".into(),
        param: "subject".into(),
        target_type: None,
    });
    let r = run(
        &q,
        vec![
            pat("p1", Some(&["Patient"])),
            pat("p2", Some(&["Observation"])),
        ],
    );
    assert_eq!(ids(&r), v(&["p1"]));
    assert!(
        r.included.is_empty(),
        "p1's observations are outside the scope"
    );
    // the compartment is scoped too
    let c = s
        .patient_compartment(
            "p2",
            &Scope::AnyOf(vec![ScopeRule::AuthoredBy {
                org: "B".into(),
                types: None,
            }]),
            10,
            0,
        )
        .unwrap();
    assert_eq!((ids(&c), c.total), (v(&["p2", "o3"]), 2));
    let c = s
        .patient_compartment("p1", &Scope::AnyOf(vec![]), 10, 0)
        .unwrap();
    assert_eq!((c.matches.len(), c.total), (0, 0));
}

pub fn patient_compartment(h: &dyn Harness) {
    let s = h.store();
    seed_clinical(s);
    let c = s
        .patient_compartment("p1", &Scope::Unrestricted, 10, 0)
        .unwrap();
    assert_eq!((ids(&c), c.total), (v(&["p1", "o1", "o2"]), 3));
    assert_eq!(c.matches[0].resource_type, "Patient");
    let all = s
        .patient_compartment("p2", &Scope::Unrestricted, 10, 0)
        .unwrap();
    assert_eq!(ids(&all), v(&["p2", "o3", "o4"]));
    let mut got = Vec::new();
    for offset in [0, 2, 4] {
        let page = s
            .patient_compartment("p2", &Scope::Unrestricted, 2, offset)
            .unwrap();
        assert_eq!(page.total, 3);
        got.extend(ids(&page));
    }
    assert_eq!(got, ids(&all));
    assert_eq!(
        s.patient_compartment("nobody", &Scope::Unrestricted, 10, 0)
            .unwrap()
            .total,
        0
    );
}

pub fn history_since_and_paging(h: &dyn Harness) {
    let s = h.store();
    seed(
        s,
        "A",
        vec![("Patient", "p1", patient("p1", "Yamada", None, "male"))],
    );
    seed(
        s,
        "A",
        vec![(
            "Observation",
            "o1",
            observation("p1", "29463-7", "2024-01-01", 60.0, "kg"),
        )],
    );
    sleep_ms(5);
    let t = Utc::now();
    sleep_ms(5);
    let mut tx = s.begin().unwrap();
    tx.update(
        "Patient",
        "p1",
        patient("p1", "Sato", None, "male"),
        None,
        &ctx("A"),
    )
    .unwrap();
    tx.delete("Observation", "o1", None, &ctx("A")).unwrap();
    tx.commit().unwrap();
    sleep_ms(3);
    let mut tx = s.begin().unwrap();
    tx.update(
        "Patient",
        "p1",
        patient("p1", "Kato", None, "male"),
        None,
        &ctx("A"),
    )
    .unwrap();
    tx.commit().unwrap();

    let all = s
        .history(&HistoryQuery {
            count: 100,
            ..Default::default()
        })
        .unwrap();
    assert_eq!(all.len(), 5);
    assert!(
        all.windows(2)
            .all(|w| w[0].last_updated >= w[1].last_updated),
        "newest first"
    );
    assert_eq!(
        (all[0].resource_type.as_str(), all[0].version),
        ("Patient", 3)
    );
    let since = s
        .history(&HistoryQuery {
            since: Some(t),
            count: 100,
            ..Default::default()
        })
        .unwrap();
    assert_eq!(since.len(), 3);
    assert!(since.iter().all(|x| x.last_updated >= t));
    let pt = s
        .history(&HistoryQuery {
            resource_type: Some("Patient".into()),
            count: 100,
            ..Default::default()
        })
        .unwrap();
    assert_eq!(
        pt.iter().map(|x| x.version).collect::<Vec<_>>(),
        vec![3, 2, 1]
    );
    let one = s
        .history(&HistoryQuery {
            resource_type: Some("Patient".into()),
            id: Some("p1".into()),
            since: Some(t),
            count: 100,
            offset: 0,
        })
        .unwrap();
    assert_eq!(
        one.iter().map(|x| x.version).collect::<Vec<_>>(),
        vec![3, 2]
    );
    let mut paged = Vec::new();
    for offset in (0..6).step_by(2) {
        paged.extend(
            s.history(&HistoryQuery {
                count: 2,
                offset,
                ..Default::default()
            })
            .unwrap(),
        );
    }
    assert_eq!(paged, all);
}

pub fn audit_chain_verifies(h: &dyn Harness) {
    let s = h.store();
    let a = s
        .audit_append(&[
            json!({"action": "read", "patient": "p1"}),
            json!({"b": 1, "a": {"z": [1, 2], "y": null}}),
        ])
        .unwrap();
    assert_eq!(a.iter().map(|e| e.seq).collect::<Vec<_>>(), vec![1, 2]);
    assert_eq!(a[0].prev_hash, audit::GENESIS_HASH);
    assert_eq!(a[1].prev_hash, a[0].hash);
    assert_eq!(
        a[1].hash,
        audit::entry_hash(&a[1].prev_hash, 2, &a[1].recorded, &a[1].record)
    );
    let mut tx = s.begin().unwrap();
    tx.create(
        "Patient",
        "p1",
        patient("p1", "Yamada", None, "male"),
        &ctx("A"),
    )
    .unwrap();
    let b = tx
        .audit_append(&[json!({"action": "create", "patient": "p1"})])
        .unwrap();
    tx.commit().unwrap();
    assert_eq!((b[0].seq, b[0].prev_hash.as_str()), (3, a[1].hash.as_str()));
    assert!(s.audit_append(&[]).unwrap().is_empty());
    // a rolled-back transaction's records leave no gap and no fork
    let mut tx = s.begin().unwrap();
    tx.audit_append(&[json!({"action": "create", "patient": "p2"})])
        .unwrap();
    drop(tx);
    // stand-alone records and records written with data share one chain
    let c = s
        .audit_append(&[json!({"action": "search", "patient": "p1"})])
        .unwrap();
    assert_eq!((c[0].seq, c[0].prev_hash.as_str()), (4, b[0].hash.as_str()));
    let mut tx = s.begin().unwrap();
    let d = tx
        .audit_append(&[json!({"action": "update", "patient": "p1"})])
        .unwrap();
    tx.commit().unwrap();
    assert_eq!((d[0].seq, d[0].prev_hash.as_str()), (5, c[0].hash.as_str()));
    let scanned = s.audit_scan(0, 100).unwrap();
    assert_eq!(scanned.len(), 5);
    assert_eq!(scanned[..2], a[..]);
    assert_eq!(scanned[2..], [b[0].clone(), c[0].clone(), d[0].clone()]);
    assert_eq!(s.audit_scan(1, 1).unwrap()[0].seq, 2);
    assert_eq!(
        s.audit_scan(2, 2)
            .unwrap()
            .iter()
            .map(|e| e.seq)
            .collect::<Vec<_>>(),
        vec![3, 4]
    );
    let p1 = s
        .audit_query(&AuditFilter {
            patient: Some("p1".into()),
            ..Default::default()
        })
        .unwrap();
    assert_eq!(
        p1.iter().map(|e| e.seq).collect::<Vec<_>>(),
        vec![5, 4, 3, 1]
    );
    let report = audit::verify_chain(audit::scan_all(s));
    assert!(report.ok(), "{report:?}");
    assert_eq!(report.checked, 5);
    assert_eq!(report.head, Some((5, d[0].hash.clone())));
}

pub fn audit_query_filters(h: &dyn Harness) {
    let s = h.store();
    let t0 = Utc::now();
    s.audit_append(&[
        json!({"patient": "p1", "org": "A", "user": "u1", "purpose": "TREAT"}),
        json!({"patient": "p2", "org": "A", "user": "u2", "purpose": "TREAT"}),
        json!({"patient": "p1", "org": "B", "user": "u3", "purpose": "HPAYMT"}),
    ])
    .unwrap();
    let q = |f: AuditFilter| {
        s.audit_query(&f)
            .unwrap()
            .iter()
            .map(|e| e.seq)
            .collect::<Vec<_>>()
    };
    let p1 = || {
        q(AuditFilter {
            patient: Some("p1".into()),
            ..Default::default()
        })
    };
    assert_eq!(p1(), vec![3, 1]);
    // the same answer once a background index (SQLite's audit index file) has them
    h.settle_audit();
    assert_eq!(p1(), vec![3, 1]);
    assert_eq!(
        q(AuditFilter {
            org: Some("A".into()),
            purpose: Some("TREAT".into()),
            ..Default::default()
        }),
        vec![2, 1]
    );
    assert_eq!(
        q(AuditFilter {
            user: Some("u3".into()),
            ..Default::default()
        }),
        vec![3]
    );
    assert_eq!(
        q(AuditFilter {
            after_seq: Some(1),
            limit: 1,
            ..Default::default()
        }),
        vec![3]
    );
    assert_eq!(
        q(AuditFilter {
            since: Some(t0),
            ..Default::default()
        })
        .len(),
        3
    );
    assert_eq!(
        q(AuditFilter {
            until: Some(t0 - chrono::Duration::seconds(1)),
            ..Default::default()
        }),
        Vec::<i64>::new()
    );
    // records after the indexed ones: newer stand-alone records and one written
    // with data, found together in order
    s.audit_append(&[json!({"patient": "p1"}), json!({"patient": "p3"})])
        .unwrap();
    let mut tx = s.begin().unwrap();
    tx.audit_append(&[json!({"patient": "p1", "org": "C"})])
        .unwrap();
    tx.commit().unwrap();
    assert_eq!(p1(), vec![6, 4, 3, 1]);
    assert_eq!(
        q(AuditFilter {
            patient: Some("p1".into()),
            limit: 2,
            ..Default::default()
        }),
        vec![6, 4]
    );
    assert_eq!(
        q(AuditFilter {
            patient: Some("p1".into()),
            org: Some("B".into()),
            ..Default::default()
        }),
        vec![3]
    );
    // every other index of a background indexer, before and after it has them
    let others = || {
        assert_eq!(
            q(AuditFilter {
                org: Some("C".into()),
                ..Default::default()
            }),
            vec![6]
        );
        assert_eq!(
            q(AuditFilter {
                org: Some("A".into()),
                user: Some("u2".into()),
                ..Default::default()
            }),
            vec![2]
        );
        assert_eq!(
            q(AuditFilter {
                since: Some(t0),
                until: Some(Utc::now()),
                limit: 4,
                ..Default::default()
            }),
            vec![6, 5, 4, 3]
        );
    };
    others();
    h.settle_audit();
    others();
    assert_eq!(p1(), vec![6, 4, 3, 1]);
    assert_eq!(
        q(AuditFilter {
            patient: Some("p1".into()),
            after_seq: Some(1),
            until: Some(Utc::now()),
            ..Default::default()
        }),
        vec![6, 4, 3]
    );
}

pub fn audit_tamper_detection(h: &dyn Harness) {
    let s = h.store();
    let records: Vec<Value> = (1..=10).map(|i| json!({"n": i, "patient": "p1"})).collect();
    let entries = s.audit_append(&records).unwrap();
    let head = (10, entries[9].hash.clone());
    assert!(audit::verify_chain(audit::scan_all(s)).ok());

    let t = h.standalone_audit_table();
    h.raw_execute(&format!(
        "UPDATE {t} SET record = '{{\"n\":3,\"patient\":\"p2\"}}' WHERE seq = 3"
    ))
    .unwrap();
    h.raw_execute(&format!("DELETE FROM {t} WHERE seq = 5"))
        .unwrap();
    h.raw_execute(&format!(
        "UPDATE {t} SET seq = -7 WHERE seq = 7; UPDATE {t} SET seq = 7 WHERE seq = 8; \
         UPDATE {t} SET seq = 8 WHERE seq = -7;"
    ))
    .unwrap();
    let r = audit::verify_chain(audit::scan_all(s));
    assert_eq!(
        r.problems,
        vec![
            ChainProblem {
                seq: 3,
                kind: ProblemKind::Altered
            },
            ChainProblem {
                seq: 5,
                kind: ProblemKind::Missing { count: 1 }
            },
            ChainProblem {
                seq: 7,
                kind: ProblemKind::Reordered { belongs_at: 8 }
            },
            ChainProblem {
                seq: 8,
                kind: ProblemKind::Reordered { belongs_at: 7 }
            },
        ]
    );
    // truncating the tail is only visible against an externally kept head
    h.raw_execute(&format!("DELETE FROM {t} WHERE seq >= 9"))
        .unwrap();
    let r = audit::verify_chain_against(audit::scan_all(s), Some((head.0, &head.1)));
    assert_eq!(
        r.problems.last(),
        Some(&ChainProblem {
            seq: 9,
            kind: ProblemKind::Truncated { expected_seq: 10 }
        })
    );
}

pub fn client_keys_roundtrip(h: &dyn Harness) {
    let s = h.store();
    let created = DateTime::from_timestamp_millis(1_700_000_000_123).unwrap();
    let k1 = ClientKey {
        client_id: "emr-1".into(),
        org: "1311234567".into(),
        kid: "k1".into(),
        role: "doctor".into(),
        user: Some("dr-1".into()),
        jwk: json!({"kty": "OKP", "crv": "Ed25519", "x": "abc"}),
        created,
        revoked: false,
    };
    let k2 = ClientKey {
        kid: "k2".into(),
        user: None,
        created: created + chrono::Duration::seconds(1),
        ..k1.clone()
    };
    s.put_client_key(&k1).unwrap();
    s.put_client_key(&k2).unwrap();
    assert_eq!(
        s.client_keys("emr-1").unwrap(),
        vec![k1.clone(), k2.clone()]
    );
    let revoked = ClientKey {
        revoked: true,
        ..k1.clone()
    };
    s.put_client_key(&revoked).unwrap();
    assert_eq!(s.client_keys("emr-1").unwrap(), vec![revoked, k2]);
    assert!(s.client_keys("other").unwrap().is_empty());
}

pub fn concurrent_writers(h: &dyn Harness) {
    let s = h.store();
    seed(
        s,
        "A",
        vec![(
            "Patient",
            "c",
            json!({"resourceType": "Patient", "multipleBirthInteger": 0}),
        )],
    );
    const THREADS: usize = 4;
    const INCREMENTS: i64 = 10;
    std::thread::scope(|sc| {
        for t in 0..THREADS {
            sc.spawn(move || {
                for i in 0..INCREMENTS {
                    loop {
                        // read-modify-write guarded by If-Match; 412 means someone else won: retry
                        let cur = s.read("Patient", "c").unwrap().unwrap();
                        let n = cur.resource.as_ref().unwrap()["multipleBirthInteger"]
                            .as_i64()
                            .unwrap();
                        let mut tx = s.begin().unwrap();
                        let body =
                            json!({"resourceType": "Patient", "multipleBirthInteger": n + 1});
                        match tx.update("Patient", "c", body, Some(cur.version), &ctx("A")) {
                            Ok(_) => {
                                tx.audit_append(&[json!({"thread": t, "i": i})]).unwrap();
                                tx.commit().unwrap();
                                break;
                            }
                            Err(e) if e.status == 412 => continue,
                            Err(e) => panic!("{e}"),
                        }
                    }
                    // blind updates and standalone audit appends interleave too
                    let mut tx = s.begin().unwrap();
                    tx.create(
                        "Observation",
                        &format!("t{t}-{i}"),
                        observation("c", "29463-7", "2024-01-01", 1.0, "kg"),
                        &ctx("A"),
                    )
                    .unwrap();
                    tx.commit().unwrap();
                    s.audit_append(&[json!({"thread": t, "blind": i})]).unwrap();
                }
            });
        }
    });
    // racing update-as-create of one new id: exactly one creates, none fails
    let created: Vec<bool> = std::thread::scope(|sc| {
        let handles: Vec<_> = (0..THREADS)
            .map(|t| {
                sc.spawn(move || {
                    let mut tx = s.begin().unwrap();
                    let body = json!({"resourceType": "Patient", "gender": "other", "multipleBirthInteger": t});
                    let (_, created) = tx.update("Patient", "race", body, None, &ctx("A")).unwrap();
                    tx.commit().unwrap();
                    created
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(created.iter().filter(|c| **c).count(), 1, "{created:?}");
    assert_eq!(
        s.read("Patient", "race").unwrap().unwrap().version,
        THREADS as i64
    );
    let total = THREADS as i64 * INCREMENTS;
    let cur = s.read("Patient", "c").unwrap().unwrap();
    assert_eq!(
        cur.resource.unwrap()["multipleBirthInteger"],
        json!(total),
        "no lost update"
    );
    assert_eq!(cur.version, total + 1);
    let hist = s
        .history(&HistoryQuery {
            resource_type: Some("Patient".into()),
            id: Some("c".into()),
            count: 1000,
            ..Default::default()
        })
        .unwrap();
    let versions: Vec<i64> = hist.iter().map(|x| x.version).collect();
    assert_eq!(versions, (1..=total + 1).rev().collect::<Vec<_>>());
    let obs = s
        .search(
            &SearchQuery::new("Observation").with(
                "subject",
                Criterion::Reference(vec![RefMatch {
                    target_type: Some("Patient".into()),
                    target_id: "c".into(),
                }]),
            ),
            &Scope::Unrestricted,
        )
        .unwrap();
    assert_eq!(obs.total as i64, total);
    let report = audit::verify_chain(audit::scan_all(s));
    assert!(report.ok(), "{report:?}");
    assert_eq!(report.checked as i64, 2 * total);
    let seqs: HashSet<i64> = audit::scan_all(s).map(|e| e.unwrap().seq).collect();
    assert_eq!(seqs.len() as i64, 2 * total);
}

pub fn schema_and_size(h: &dyn Harness) {
    let s = h.store();
    assert_eq!(s.schema_version().unwrap(), crate::schema::latest());
    seed_patients(s);
    assert!(s.size_bytes().unwrap() > 0);
    assert!(s.backend() == "sqlite" || s.backend() == "postgres");
}

const CAT: &str = "https://tsunagi.dev/fhir/CodeSystem/consent-category";
const VIS: &str = "https://tsunagi.dev/fhir/CodeSystem/patient-visibility";

fn labelled(mut r: Value, labels: &[(&str, &str)]) -> Value {
    r["meta"] = json!({"security": labels.iter().map(|(s, c)| json!({"system": s, "code": c})).collect::<Vec<_>>()});
    r
}

/// Security labels narrow rules by the information a resource carries, inside
/// the SQL: searches, totals and the compartment agree.
pub fn security_label_scopes(h: &dyn Harness) {
    let s = h.store();
    seed(
        s,
        "H1",
        vec![
            ("Patient", "p1", patient("p1", "Yamada", None, "male")),
            (
                "Observation",
                "inf",
                labelled(
                    observation("p1", "HBs", "2026-01-01", 1.0, "1"),
                    &[(CAT, "A")],
                ),
            ),
            (
                "Observation",
                "lab",
                labelled(
                    observation("p1", "ALB", "2026-01-01", 3.9, "g/dL"),
                    &[(CAT, "B")],
                ),
            ),
            (
                "Observation",
                "hid",
                labelled(
                    observation("p1", "ALB", "2026-01-02", 4.0, "g/dL"),
                    &[(CAT, "B"), (VIS, "withheld")],
                ),
            ),
            (
                "Observation",
                "plain",
                observation("p1", "X", "2026-01-01", 1.0, "1"),
            ),
            (
                "DocumentReference",
                "ref",
                labelled(
                    json!({"resourceType": "DocumentReference", "status": "current", "subject": {"reference": "Patient/p1"}, "content": [{"attachment": {"title": "t"}}]}),
                    &[(CAT, "none"), (VIS, "withheld"), ("urn:addressee", "H2")],
                ),
            ),
        ],
    );
    let obs = SearchQuery::new("Observation");
    let lab = |allow: Option<&[&str]>, deny: &[&str], system: &str| ScopeRule::Labeled {
        rule: Box::new(ScopeRule::Patient {
            id: "p1".into(),
            types: None,
        }),
        filter: LabelFilter {
            system: system.into(),
            allow: allow.map(|a| a.iter().map(|x| x.to_string()).collect()),
            deny: deny.iter().map(|x| x.to_string()).collect(),
            unlabelled: true,
        },
    };
    let run = |q: &SearchQuery, r: ScopeRule| s.search(q, &Scope::AnyOf(vec![r])).unwrap();
    let r = run(&obs, lab(Some(&["A"]), &[], CAT));
    assert_eq!(
        (sorted_ids(&r), r.total),
        (v(&["inf", "plain"]), 2),
        "category A: infection + unlabelled"
    );
    let r = run(&obs, lab(Some(&["B"]), &[], CAT));
    assert_eq!((sorted_ids(&r), r.total), (v(&["hid", "lab", "plain"]), 3));
    // The same filter for many patients (a facility's live consents) is one clause
    // over the list; a rule with another filter stays apart.
    let lab_for = |id: String, allow: &str| ScopeRule::Labeled {
        rule: Box::new(ScopeRule::Patient { id, types: None }),
        filter: LabelFilter {
            system: CAT.into(),
            allow: Some(vec![allow.to_string()]),
            deny: vec![],
            unlabelled: true,
        },
    };
    let mut rules: Vec<ScopeRule> = (0..500).map(|i| lab_for(format!("x{i}"), "B")).collect();
    rules.push(lab_for("p1".into(), "A"));
    rules.extend((500..1000).map(|i| lab_for(format!("x{i}"), "A")));
    let r = s.search(&obs, &Scope::AnyOf(rules)).unwrap();
    assert_eq!(
        (sorted_ids(&r), r.total),
        (v(&["inf", "plain"]), 2),
        "p1 under category A only, among a thousand other patients' rules"
    );
    let r = run(&obs, lab(Some(&[]), &[], CAT));
    assert_eq!(
        sorted_ids(&r),
        v(&["plain"]),
        "an empty allow list admits unlabelled rows only"
    );
    let r = run(&obs, lab(None, &["withheld"], VIS));
    assert_eq!((sorted_ids(&r), r.total), (v(&["inf", "lab", "plain"]), 3));
    // the compartment ($everything) obeys the same filter
    let c = s
        .patient_compartment(
            "p1",
            &Scope::AnyOf(vec![lab(None, &["withheld"], VIS)]),
            20,
            0,
        )
        .unwrap();
    assert_eq!(
        (sorted_ids(&c), c.total),
        (v(&["inf", "lab", "p1", "plain"]), 4)
    );
    // nested filters: category A and B but never withheld
    let both = ScopeRule::Labeled {
        rule: Box::new(lab(Some(&["A", "B"]), &[], CAT)),
        filter: LabelFilter {
            system: VIS.into(),
            allow: None,
            deny: vec!["withheld".into()],
            unlabelled: true,
        },
    };
    assert_eq!(sorted_ids(&run(&obs, both)), v(&["inf", "lab", "plain"]));
    // labelled rows only
    let only = ScopeRule::Labeled {
        rule: Box::new(ScopeRule::Patient {
            id: "p1".into(),
            types: None,
        }),
        filter: LabelFilter {
            system: CAT.into(),
            allow: Some(vec!["B".into()]),
            deny: vec![],
            unlabelled: false,
        },
    };
    let r = run(&obs, only);
    assert_eq!((sorted_ids(&r), r.total), (v(&["hid", "lab"]), 2));
    // a label alone admits across patients, limited to its types
    let addressee = |code: &str, types: Option<Vec<String>>| ScopeRule::Label {
        system: "urn:addressee".into(),
        code: code.into(),
        types,
    };
    let docs = SearchQuery::new("DocumentReference");
    assert_eq!(ids(&run(&docs, addressee("H2", None))), v(&["ref"]));
    assert_eq!(run(&docs, addressee("H3", None)).total, 0);
    assert_eq!(
        run(
            &obs,
            addressee("H2", Some(vec!["DocumentReference".into()]))
        )
        .total,
        0
    );
    // relabelling moves a resource between scopes
    let mut tx = s.begin().unwrap();
    tx.update(
        "Observation",
        "lab",
        labelled(
            observation("p1", "ALB", "2026-01-01", 3.9, "g/dL"),
            &[(CAT, "A")],
        ),
        None,
        &ctx("H1"),
    )
    .unwrap();
    tx.commit().unwrap();
    assert_eq!(
        sorted_ids(&run(&obs, lab(Some(&["A"]), &[], CAT))),
        v(&["inf", "lab", "plain"])
    );
    let f = LabelFilter {
        system: CAT.into(),
        allow: Some(vec!["A".into()]),
        deny: vec![],
        unlabelled: false,
    };
    assert!(f.admits(&[(CAT.into(), "A".into())]));
    assert!(!f.admits(&[(CAT.into(), "B".into())]));
    assert!(!f.admits(&[]));
}

/// A derived record's history can be dropped: the current version stays
/// (readable, searchable, same number), older ones are gone, and the next write
/// continues the numbering. Rolled back, nothing is dropped.
pub fn forget_history_keeps_only_the_current_version(h: &dyn Harness) {
    let s = h.store();
    let versions = |s: &dyn Store| {
        s.history(&HistoryQuery {
            resource_type: Some("Basic".into()),
            id: Some("idx".into()),
            count: 10,
            ..Default::default()
        })
        .unwrap()
        .iter()
        .map(|r| r.version)
        .collect::<Vec<_>>()
    };
    let body = |n: i64| json!({"resourceType": "Basic", "code": {"text": format!("v{n}")}});
    for n in 1..=3 {
        let mut tx = s.begin().unwrap();
        tx.update("Basic", "idx", body(n), None, &ctx("A")).unwrap();
        tx.commit().unwrap();
    }
    {
        let mut tx = s.begin().unwrap();
        assert_eq!(tx.forget_history("Basic", "idx").unwrap(), 2);
    }
    assert_eq!(versions(s), vec![3, 2, 1]);
    let mut tx = s.begin().unwrap();
    assert_eq!(tx.forget_history("Basic", "idx").unwrap(), 2);
    assert_eq!(tx.forget_history("Basic", "idx").unwrap(), 0);
    assert_eq!(tx.forget_history("Basic", "never").unwrap(), 0);
    tx.commit().unwrap();
    assert_eq!(versions(s), vec![3]);
    assert!(s.vread("Basic", "idx", 2).unwrap().is_none());
    let cur = s.read("Basic", "idx").unwrap().unwrap();
    assert_eq!(
        (cur.version, cur.resource.unwrap()["code"]["text"].clone()),
        (3, json!("v3"))
    );
    assert_eq!(
        find(s, "Basic", "_id", Criterion::Id(v(&["idx"]))),
        v(&["idx"])
    );
    let mut tx = s.begin().unwrap();
    let (next, _) = tx.update("Basic", "idx", body(4), None, &ctx("A")).unwrap();
    tx.commit().unwrap();
    assert_eq!(next.version, 4);
    assert_eq!(versions(s), vec![4, 3]);
}

/// Purge removes every version and index row, inside the transaction (rollback
/// keeps it), and frees the id.
pub fn purge_removes_everything(h: &dyn Harness) {
    let s = h.store();
    seed_clinical(s);
    let mut tx = s.begin().unwrap();
    tx.update(
        "Observation",
        "o1",
        observation("p1", "1234-5", "2026-02-01", 2.0, "mg"),
        None,
        &ctx("A"),
    )
    .unwrap();
    tx.commit().unwrap();
    // rolled back purge: still there
    {
        let mut tx = s.begin().unwrap();
        assert_eq!(tx.purge("Observation", "o1").unwrap(), Some(2));
    }
    assert!(s.read("Observation", "o1").unwrap().is_some());
    let mut tx = s.begin().unwrap();
    assert_eq!(tx.purge("Observation", "o1").unwrap(), Some(2));
    assert_eq!(tx.purge("Observation", "o1").unwrap(), None);
    assert_eq!(tx.purge("Observation", "never").unwrap(), None);
    tx.audit_append(&[json!({"action": "purge", "resources": ["Observation/o1"]})])
        .unwrap();
    tx.commit().unwrap();
    assert!(s.read("Observation", "o1").unwrap().is_none());
    assert!(s.vread("Observation", "o1", 1).unwrap().is_none());
    let hist = s
        .history(&HistoryQuery {
            resource_type: Some("Observation".into()),
            id: Some("o1".into()),
            count: 10,
            ..Default::default()
        })
        .unwrap();
    assert!(hist.is_empty());
    let r = s
        .search(&SearchQuery::new("Observation"), &Scope::Unrestricted)
        .unwrap();
    assert!(!ids(&r).contains(&"o1".to_string()));
    assert_eq!(
        s.patient_compartment("p1", &Scope::Unrestricted, 10, 0)
            .unwrap()
            .total,
        2
    );
    // no index row survives: a token search on its code finds nothing
    assert!(
        find(
            s,
            "Observation",
            "code",
            token(vec![tok(Some(Some(LOINC)), Some("1234-5"))])
        )
        .is_empty()
    );
    // the id can be used again from version 1
    let mut tx = s.begin().unwrap();
    let again = tx
        .create(
            "Observation",
            "o1",
            observation("p1", "X", "2026-03-01", 1.0, "1"),
            &ctx("A"),
        )
        .unwrap();
    tx.commit().unwrap();
    assert_eq!(again.version, 1);
    assert!(
        audit::verify_chain(audit::scan_all(s)).ok(),
        "purging keeps the audit chain intact"
    );
}

/// The newest match per code (`$lastn`-like), chosen inside SQL after the
/// scope and the clauses: a newer row the caller may not see, or one a clause
/// excludes, never hides the newest one it may see.
pub fn latest_per_group(h: &dyn Harness) {
    let s = h.store();
    let mut withdrawn = observation("p1", "ALB", "2026-03-01", 9.9, "g/dL");
    withdrawn["status"] = json!("entered-in-error");
    seed(
        s,
        "H1",
        vec![
            ("Patient", "p1", patient("p1", "Yamada", None, "male")),
            ("Patient", "p2", patient("p2", "Sato", None, "female")),
            (
                "Observation",
                "alb-1",
                observation("p1", "ALB", "2025-01-01", 3.9, "g/dL"),
            ),
            (
                "Observation",
                "alb-2",
                observation("p1", "ALB", "2026-01-01", 4.0, "g/dL"),
            ),
            (
                "Observation",
                "alb-old",
                observation("p1", "ALB", "2024-06-01", 4.1, "g/dL"),
            ),
            ("Observation", "alb-gone", withdrawn),
            (
                "Observation",
                "alb-hid",
                labelled(
                    observation("p1", "ALB", "2026-02-01", 4.2, "g/dL"),
                    &[(VIS, "withheld")],
                ),
            ),
            (
                "Observation",
                "k-1",
                observation("p1", "K", "2023-01-01", 4.0, "mmol/L"),
            ),
            (
                "Observation",
                "k-other",
                observation("p2", "K", "2026-05-01", 4.4, "mmol/L"),
            ),
        ],
    );
    let latest = |per: usize| LatestPer {
        param: "code".into(),
        by: "date".into(),
        per,
    };
    let mut q = SearchQuery::new("Observation").with(
        "status",
        Criterion::Token {
            values: vec![tok(None, Some("entered-in-error"))],
            negate: true,
        },
    );
    q.count = 100;
    let mine = Scope::AnyOf(vec![ScopeRule::Labeled {
        rule: Box::new(ScopeRule::Patient {
            id: "p1".into(),
            types: None,
        }),
        filter: LabelFilter {
            system: VIS.into(),
            allow: None,
            deny: vec!["withheld".into()],
            unlabelled: true,
        },
    }]);
    let r = s.search_latest(&q, &mine, &latest(1)).unwrap();
    assert_eq!(
        (sorted_ids(&r), r.total),
        (v(&["alb-2", "k-1"]), 2),
        "the newest visible, not withdrawn ALB and the patient's own K"
    );
    let r = s.search_latest(&q, &mine, &latest(2)).unwrap();
    assert_eq!(sorted_ids(&r), v(&["alb-1", "alb-2", "k-1"]));
    // unrestricted and without the clause: the withheld and the withdrawn rows count
    let r = s
        .search_latest(
            &SearchQuery::new("Observation"),
            &Scope::Unrestricted,
            &latest(1),
        )
        .unwrap();
    assert_eq!(sorted_ids(&r), v(&["alb-gone", "k-other"]));
    // paging and totals follow the search's
    let mut page = q.clone();
    page.count = 1;
    let r = s.search_latest(&page, &mine, &latest(1)).unwrap();
    assert_eq!((r.matches.len(), r.total), (1, 2));
    let r = s
        .search_latest(&q, &Scope::AnyOf(vec![]), &latest(1))
        .unwrap();
    assert_eq!((r.matches.len(), r.total), (0, 0));
}

/// `Store::scan` walks every current resource of one type exactly once, in id
/// order, page after page; deleted ones and other types are not in it.
pub fn scan_keyset_pages(h: &dyn Harness) {
    let s = h.store();
    let ids_in = ["p07", "p02", "p10", "p05", "p01", "p09", "p03", "gone"];
    seed(
        s,
        "A",
        ids_in
            .iter()
            .map(|id| ("Patient", *id, patient(id, "Yamada", None, "male")))
            .chain([(
                "Observation",
                "o1",
                observation("p01", "ALB", "2025-01-01", 3.9, "g/dL"),
            )])
            .collect(),
    );
    let mut tx = s.begin().unwrap();
    tx.delete("Patient", "gone", None, &ctx("A")).unwrap();
    tx.commit().unwrap();
    let mut seen = Vec::new();
    let mut after: Option<String> = None;
    let mut pages = 0;
    loop {
        let page = s.scan("Patient", after.as_deref(), 3).unwrap();
        pages += 1;
        assert!(page.len() <= 3);
        seen.extend(page.iter().map(|r| r.id.clone()));
        assert!(
            page.iter()
                .all(|r| r.resource_type == "Patient" && r.resource.is_some())
        );
        if page.len() < 3 {
            break;
        }
        after = page.last().map(|r| r.id.clone());
    }
    assert_eq!(seen, ["p01", "p02", "p03", "p05", "p07", "p09", "p10"]);
    assert_eq!(pages, 3);
    assert!(s.scan("Patient", Some("p10"), 3).unwrap().is_empty());
}

/// `_tag` and `_profile` (Resource-level parameters on `meta`) are indexed for
/// every type, and an update re-indexes them.
pub fn search_meta_tag_and_profile(h: &dyn Harness) {
    let s = h.store();
    const T: &str = "https://example.org/tags";
    const PROFILE: &str = "http://jpfhir.jp/fhir/core/StructureDefinition/JP_Patient";
    let tagged = |id: &str, code: &str| {
        let mut p = patient(id, "Yamada", None, "male");
        p["meta"] = json!({"tag": [{"system": T, "code": code}], "profile": [PROFILE]});
        p
    };
    seed(
        s,
        "A",
        vec![
            ("Patient", "p1", tagged("p1", "2026-11-21T10")),
            ("Patient", "p2", tagged("p2", "2026-11-21T11")),
            ("Patient", "p3", patient("p3", "Yamada", None, "male")),
        ],
    );
    let tag = |code: &str| {
        find(
            s,
            "Patient",
            "_tag",
            token(vec![tok(Some(Some(T)), Some(code))]),
        )
    };
    assert_eq!(tag("2026-11-21T10"), v(&["p1"]));
    assert_eq!(tag("2026-11-21T12"), Vec::<String>::new());
    assert_eq!(
        find(
            s,
            "Patient",
            "_tag",
            token(vec![tok(None, Some("2026-11-21T11"))])
        ),
        v(&["p2"])
    );
    assert_eq!(
        find(s, "Patient", "_profile", Criterion::Uri(v(&[PROFILE]))),
        v(&["p1", "p2"])
    );
    // the ids alone, in the search's order and paging
    let mut q = SearchQuery::new("Patient").with("family", string(StringMode::StartsWith, "yam"));
    q.sort = vec![SortKey {
        param: "_id".into(),
        param_type: ParamType::Token,
        descending: true,
    }];
    assert_eq!(
        s.search_ids(&q, &Scope::Unrestricted).unwrap(),
        v(&["p3", "p2", "p1"])
    );
    q.count = 1;
    q.offset = 1;
    assert_eq!(s.search_ids(&q, &Scope::Unrestricted).unwrap(), v(&["p2"]));
    // an update replaces the indexed tag
    let mut tx = s.begin().unwrap();
    tx.update(
        "Patient",
        "p1",
        tagged("p1", "2026-11-21T12"),
        None,
        &ctx("A"),
    )
    .unwrap();
    tx.commit().unwrap();
    assert_eq!(tag("2026-11-21T10"), Vec::<String>::new());
    assert_eq!(tag("2026-11-21T12"), v(&["p1"]));
}

/// A database at schema version 1, for each backend's migration test: the
/// bootstrap table, migration 1, and resources as version 1 stored them (a
/// patient, a patient with two versions, a deleted patient, a labelled
/// observation), without index rows: migration 2 must build them from the bodies.
pub fn version1_database(d: crate::sql::Dialect) -> String {
    let v1_sql = &crate::schema::migrations(d)[0].1;
    let now = 1_763_800_000_000i64;
    let mut sql = format!("{};\n{v1_sql};\n", crate::schema::bootstrap(d));
    sql.push_str(match d {
        crate::sql::Dialect::Sqlite => {
            "INSERT INTO schema_migrations (version, applied_at) VALUES (1, '2026-11-21T00:00:00.000Z');\n"
        }
        crate::sql::Dialect::Postgres => "INSERT INTO schema_migrations (version) VALUES (1);\n",
    });
    // (rid, type, id, patient compartment, versions: bodies, None for a deletion)
    let p1 = json!({"resourceType": "Patient", "id": "p1", "identifier": [{"system": "urn:test", "value": "123"}],
        "name": [{"family": "山田"}], "birthDate": "1980-01-02"});
    let p2a = json!({"resourceType": "Patient", "id": "p2", "name": [{"family": "Old"}]});
    let p2b = json!({"resourceType": "Patient", "id": "p2", "name": [{"family": "New"}]});
    let p3 = json!({"resourceType": "Patient", "id": "p3", "name": [{"family": "Gone"}]});
    let o1 = json!({"resourceType": "Observation", "id": "o1", "status": "final",
        "meta": {"security": [{"system": "urn:label", "code": "A"}]},
        "code": {"coding": [{"system": "http://loinc.org", "code": "1234-5"}]},
        "subject": {"reference": "Patient/p1"}});
    let rows = [
        (1, "Patient", "p1", "p1", vec![Some(&p1)]),
        (2, "Patient", "p2", "p2", vec![Some(&p2a), Some(&p2b)]),
        (3, "Patient", "p3", "p3", vec![Some(&p3), None]),
        (4, "Observation", "o1", "p1", vec![Some(&o1)]),
    ];
    let q = |s: &str| format!("'{}'", s.replace('\'', "''"));
    for (rid, rt, id, patient, versions) in rows {
        let last = versions.len() as i64;
        let deleted = versions.last().is_some_and(|b| b.is_none());
        let _ = writeln!(
            sql,
            "INSERT INTO resource_current (rid, rt, id, version, last_updated, deleted, patient_id, author_org) \
             VALUES ({rid}, {}, {}, {last}, {now}, {deleted}, {}, NULL);",
            q(rt),
            q(id),
            q(patient)
        );
        for (i, body) in versions.iter().enumerate() {
            let body = body.map_or("NULL".to_string(), |b| q(&b.to_string()));
            let _ = writeln!(
                sql,
                "INSERT INTO resource_version (rid, version, rt, last_updated, deleted, author_org, author_user, body) \
                 VALUES ({rid}, {}, {}, {now}, {}, NULL, NULL, {body});",
                i + 1,
                q(rt),
                body == "NULL"
            );
        }
    }
    sql
}

/// Asserts that a store opened on [`version1_database`] is at the latest schema
/// and finds exactly what the current versions say, by every kind of entry
/// the fixture has; and that writes after the migration keep the index true.
pub fn check_migrated_from_version1(s: &dyn Store) {
    assert_eq!(s.schema_version().unwrap(), crate::schema::latest());
    let name = |n: &str| find(s, "Patient", "name", string(StringMode::StartsWith, n));
    assert_eq!(name("山田"), v(&["p1"]));
    assert_eq!(name("New"), v(&["p2"]));
    assert!(name("Old").is_empty(), "an old version is not indexed");
    assert!(name("Gone").is_empty(), "a deleted resource is not indexed");
    let id = tok(Some(Some("urn:test")), Some("123"));
    assert_eq!(
        find(s, "Patient", "identifier", token(vec![id])),
        v(&["p1"])
    );
    let birth = Criterion::Date(vec![dm(Prefix::Eq, "1980-01-02")]);
    assert_eq!(find(s, "Patient", "birthdate", birth), v(&["p1"]));
    let subject = Criterion::Reference(vec![RefMatch {
        target_type: Some("Patient".into()),
        target_id: "p1".into(),
    }]);
    assert_eq!(find(s, "Observation", "subject", subject), v(&["o1"]));
    let code = tok(Some(Some("http://loinc.org")), Some("1234-5"));
    assert_eq!(
        find(s, "Observation", "code", token(vec![code])),
        v(&["o1"])
    );
    let labelled = |code: &str| {
        let scope = Scope::AnyOf(vec![ScopeRule::Label {
            system: "urn:label".into(),
            code: code.into(),
            types: None,
        }]);
        sorted_ids(
            &s.search(&SearchQuery::new("Observation"), &scope)
                .expect("search"),
        )
    };
    assert_eq!(labelled("A"), v(&["o1"]));
    assert!(labelled("B").is_empty());
    let mut tx = s.begin().unwrap();
    tx.update(
        "Patient",
        "p1",
        json!({"resourceType": "Patient", "name": [{"family": "佐藤"}]}),
        Some(1),
        &ctx("org"),
    )
    .unwrap();
    tx.commit().unwrap();
    assert_eq!(name("佐藤"), v(&["p1"]));
    assert!(name("山田").is_empty());
}

/// A resource that repeats a value (the same identifier or security label twice)
/// is written, found once, and rewritten without error.
pub fn repeated_entries_are_one_entry(h: &dyn Harness) {
    let s = h.store();
    let body = json!({"resourceType": "Observation", "status": "final",
        "meta": {"security": [{"system": "urn:label", "code": "A"}, {"system": "urn:label", "code": "A"}]},
        "identifier": [{"system": "urn:test", "value": "1"}, {"system": "urn:test", "value": "1"}],
        "code": {"coding": [{"system": LOINC, "code": "1234-5"}]},
        "subject": {"reference": "Patient/p1"}});
    for _ in 0..2 {
        let mut tx = s.begin().unwrap();
        tx.update("Observation", "o1", body.clone(), None, &ctx("org"))
            .unwrap();
        tx.commit().unwrap();
    }
    let id = tok(Some(Some("urn:test")), Some("1"));
    assert_eq!(
        find(s, "Observation", "identifier", token(vec![id])),
        v(&["o1"])
    );
    let scope = Scope::AnyOf(vec![ScopeRule::Label {
        system: "urn:label".into(),
        code: "A".into(),
        types: None,
    }]);
    let r = s
        .search(&SearchQuery::new("Observation"), &scope)
        .expect("search");
    assert_eq!((sorted_ids(&r), r.total), (v(&["o1"]), 1));
}

/// A prepared body (`Transaction::put`) is stored, versioned, indexed and placed
/// in its patient's compartment exactly as the same body through `update`.
pub fn put_stores_what_update_stores(h: &dyn Harness) {
    let s = h.store();
    let bodies = [
        patient("x", "Kimura", Some("1990-04-01"), "female"),
        json!({"resourceType": "Observation", "id": "ignored", "status": "final",
            "meta": {"versionId": "9", "lastUpdated": "2000-01-01T00:00:00Z",
                     "profile": ["http://example.org/p"], "tag": [{"system": "urn:t", "code": "t1"}]},
            "code": {"coding": [{"system": LOINC, "code": "2345-7"}]},
            "subject": {"reference": "Patient/pp"},
            "note": [{"text": "quote \" and 日本語"}]}),
        json!({"status": "final", "meta": "not an object",
            "code": {"coding": [{"system": LOINC, "code": "2345-7"}]}, "subject": {"reference": "Patient/pp"}}),
    ];
    let rt = |b: &Value| {
        b["resourceType"]
            .as_str()
            .unwrap_or("Observation")
            .to_string()
    };
    let mut tx = s.begin().unwrap();
    for (i, b) in bodies.iter().enumerate() {
        let t = rt(b);
        tx.update(&t, &format!("u{i}"), b.clone(), None, &ctx("A"))
            .unwrap();
        let p = crate::PreparedResource::new(&t, &format!("p{i}"), b).unwrap();
        let w = tx.put(&p, None, &ctx("A")).unwrap();
        assert_eq!((w.version, w.created), (1, true));
    }
    tx.commit().unwrap();
    let strip = |v: Value| {
        let mut v = v;
        v["id"] = json!("-");
        v["meta"]["lastUpdated"] = json!("-");
        v
    };
    for (i, b) in bodies.iter().enumerate() {
        let t = rt(b);
        let u = s.read(&t, &format!("u{i}")).unwrap().unwrap();
        let p = s.read(&t, &format!("p{i}")).unwrap().unwrap();
        assert_eq!(p.resource.as_ref().unwrap()["id"], json!(format!("p{i}")));
        assert_eq!(
            strip(p.resource.unwrap()),
            strip(u.resource.unwrap()),
            "body {i}"
        );
        assert_eq!(p.author_org.as_deref(), Some("A"));
    }
    let by = |rt: &str, param: &str, c: Criterion| find(s, rt, param, c);
    assert_eq!(
        by(
            "Patient",
            "family",
            string(StringMode::StartsWith, "Kimura")
        ),
        v(&["p0", "u0"])
    );
    let code = tok(Some(Some(LOINC)), Some("2345-7"));
    assert_eq!(
        by("Observation", "code", token(vec![code])),
        v(&["p1", "p2", "u1", "u2"])
    );
    let tag = tok(Some(Some("urn:t")), Some("t1"));
    assert_eq!(
        by("Observation", "_tag", token(vec![tag])),
        v(&["p1", "u1"])
    );
    let r = s
        .patient_compartment("pp", &Scope::Unrestricted, 10, 0)
        .unwrap();
    assert_eq!(sorted_ids(&r), v(&["p1", "p2", "u1", "u2"]));

    // a new version replaces the index entries; If-Match and re-creation as `update`
    let mut tx = s.begin().unwrap();
    let renamed = patient("x", "Kondo", None, "female");
    let p = crate::PreparedResource::new("Patient", "p0", &renamed).unwrap();
    let e = tx.put(&p, Some(7), &ctx("A")).unwrap_err();
    assert_eq!(e.status, 412);
    let w = tx.put(&p, Some(1), &ctx("A")).unwrap();
    assert_eq!((w.version, w.created), (2, false));
    let gone = crate::PreparedResource::new("Patient", "absent", &renamed).unwrap();
    assert_eq!(tx.put(&gone, Some(1), &ctx("A")).unwrap_err().status, 412);
    tx.delete("Patient", "p0", None, &ctx("A")).unwrap();
    let w = tx.put(&p, None, &ctx("A")).unwrap();
    assert_eq!((w.version, w.created), (4, true));
    tx.commit().unwrap();
    assert_eq!(
        by(
            "Patient",
            "family",
            string(StringMode::StartsWith, "Kimura")
        ),
        v(&["u0"])
    );
    assert_eq!(
        by("Patient", "family", string(StringMode::StartsWith, "Kondo")),
        v(&["p0"])
    );
    let h = s.read("Patient", "p0").unwrap().unwrap();
    assert_eq!((h.version, h.deleted), (4, false));
    assert_eq!(h.resource.unwrap()["meta"]["versionId"], json!("4"));
}
