//! Black-box HTTP tests of the platform core: the real server (`Builder` + `serve`)
//! on 127.0.0.1:0, driven with reqwest. Every scenario runs unchanged against both
//! storage backends: `sqlite::<scenario>` and `postgres::<scenario>` (the latter
//! needs `TSUNAGI_TEST_PG`, e.g. `host=127.0.0.1 user=postgres dbname=test`, and
//! passes with a visible `SKIPPED:` line without it).

mod common;

use common::*;
use reqwest::Method;
use serde_json::{Value, json};
use tsunagi_policy::identity::{OrgKind, Role};

both_backends!(
    crud,
    conditional_create,
    search,
    transaction,
    batch,
    everything,
    bad_input,
    authorisation,
    audit_trail,
    operations_endpoints,
    token_endpoint,
);

/// Identifier system of the test patients (JP Core patient id of hospital A).
const SYS: &str = "urn:oid:1.2.392.100495.20.3.51.11310123458";

fn path_of(rt: &str, id: &str) -> String {
    format!("/fhir/{rt}/{id}")
}

// ------------------------------------------------------------------ 1. CRUD

async fn crud(backend: Backend) {
    let Some(s) = TestServer::start(backend).await else {
        return;
    };
    let t = s.doctor_a();

    // create
    let r = s
        .post(
            &t,
            "/fhir/Patient",
            &patient(SYS, "crud-1", "山田", "花子", "1980-02-03"),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.text);
    assert!(
        r.header("content-type")
            .unwrap_or_default()
            .starts_with("application/fhir+json"),
        "{:?}",
        r.headers
    );
    let id = r.body["id"].as_str().expect("id assigned").to_string();
    assert_eq!(
        r.header("location"),
        Some(format!("{}/Patient/{id}/_history/1", s.fhir).as_str())
    );
    assert_eq!(r.header("etag"), Some("W/\"1\""));
    let last_modified = r
        .header("last-modified")
        .expect("Last-Modified")
        .to_string();
    assert!(last_modified.ends_with(" GMT"), "{last_modified}");
    assert_eq!(r.body["resourceType"], "Patient");
    assert_eq!(r.body["meta"]["versionId"], "1");
    assert!(r.body["meta"]["lastUpdated"].is_string(), "{}", r.text);
    assert_eq!(r.body["name"][0]["family"], "山田");

    // read
    let r = s.get(&t, &path_of("Patient", &id)).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.header("etag"), Some("W/\"1\""));
    assert_eq!(r.header("last-modified"), Some(last_modified.as_str()));
    assert_eq!(r.body["id"], id.as_str());
    assert_eq!(r.body["name"][0]["given"][0], "花子");
    let v1 = r.body.clone();

    // vread
    let r = s.get(&t, &format!("/fhir/Patient/{id}/_history/1")).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.body["meta"]["versionId"], "1");
    assert_eq!(r.header("etag"), Some("W/\"1\""));
    s.get(&t, &format!("/fhir/Patient/{id}/_history/7"))
        .await
        .assert_outcome(404);

    // update with a matching If-Match
    let mut v2 = v1.clone();
    v2["gender"] = json!("male");
    let r = send(fhir_body(
        s.req(Method::PUT, &path_of("Patient", &id))
            .bearer_auth(&t)
            .header("if-match", "W/\"1\""),
        &v2,
    ))
    .await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.header("etag"), Some("W/\"2\""));
    assert_eq!(r.body["meta"]["versionId"], "2");
    assert_eq!(r.body["gender"], "male");

    // a stale If-Match is refused and changes nothing
    let mut stale = v1.clone();
    stale["gender"] = json!("other");
    let r = send(fhir_body(
        s.req(Method::PUT, &path_of("Patient", &id))
            .bearer_auth(&t)
            .header("if-match", "W/\"1\""),
        &stale,
    ))
    .await;
    r.assert_outcome(412);
    let r = s.get(&t, &path_of("Patient", &id)).await;
    assert_eq!(r.body["gender"], "male");
    assert_eq!(r.header("etag"), Some("W/\"2\""));

    // the id in the body must match the URL
    let mut wrong = v2.clone();
    wrong["id"] = json!("someone-else");
    s.put(&t, &path_of("Patient", &id), &wrong)
        .await
        .assert_outcome(400);

    // update-as-create with a client-chosen id
    let mut chosen = patient(SYS, "crud-2", "佐藤", "一郎", "1975-05-05");
    chosen["id"] = json!("crud-chosen-id");
    let r = s.put(&t, "/fhir/Patient/crud-chosen-id", &chosen).await;
    assert_eq!(r.status, 201, "{}", r.text);
    assert_eq!(
        r.header("location"),
        Some(format!("{}/Patient/crud-chosen-id/_history/1", s.fhir).as_str())
    );
    assert_eq!(r.header("etag"), Some("W/\"1\""));
    assert_eq!(r.body["id"], "crud-chosen-id");

    // Prefer: return=minimal -> no body, headers still there
    let r = send(fhir_body(
        s.req(Method::POST, "/fhir/Patient")
            .bearer_auth(&t)
            .header("prefer", "return=minimal"),
        &patient(SYS, "crud-3", "鈴木", "三郎", "1990-01-01"),
    ))
    .await;
    assert_eq!(r.status, 201, "{}", r.text);
    assert!(r.text.is_empty(), "minimal returned a body: {}", r.text);
    assert!(r.header("location").is_some());
    assert_eq!(r.header("etag"), Some("W/\"1\""));

    // Prefer: return=OperationOutcome
    let mut v3 = v2.clone();
    v3["gender"] = json!("female");
    let r = send(fhir_body(
        s.req(Method::PUT, &path_of("Patient", &id))
            .bearer_auth(&t)
            .header("prefer", "return=OperationOutcome"),
        &v3,
    ))
    .await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.body["resourceType"], "OperationOutcome", "{}", r.text);
    assert_eq!(r.header("etag"), Some("W/\"3\""));

    // delete, then read is 410 Gone
    let r = s.delete(&t, &path_of("Patient", &id)).await;
    assert_eq!(r.status, 204, "{}", r.text);
    assert!(r.text.is_empty());
    let r = s.get(&t, &path_of("Patient", &id)).await;
    r.assert_outcome(410);
    // deleting again is not an error
    assert_eq!(s.delete(&t, &path_of("Patient", &id)).await.status, 204);
    // a never-existing resource is 404
    s.get(&t, "/fhir/Patient/never-was")
        .await
        .assert_outcome(404);

    // history lists every version, newest first, the delete included
    let r = s.get(&t, &format!("/fhir/Patient/{id}/_history")).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.body["type"], "history");
    let entries = r.body["entry"].as_array().expect("entries");
    let summary: Vec<(String, String, String)> = entries
        .iter()
        .map(|e| {
            (
                e["request"]["method"].as_str().unwrap_or_default().into(),
                e["response"]["status"].as_str().unwrap_or_default().into(),
                e["response"]["etag"].as_str().unwrap_or_default().into(),
            )
        })
        .collect();
    assert_eq!(
        summary,
        vec![
            ("DELETE".into(), "204 No Content".into(), "W/\"4\"".into()),
            ("PUT".into(), "200 OK".into(), "W/\"3\"".into()),
            ("PUT".into(), "200 OK".into(), "W/\"2\"".into()),
            ("POST".into(), "201 Created".into(), "W/\"1\"".into()),
        ]
    );
    assert!(entries[0].get("resource").is_none());
    assert_eq!(entries[3]["resource"]["gender"], "female");
    assert_eq!(entries[3]["resource"]["meta"]["versionId"], "1");
    // an old version stays readable after the delete
    let r = s.get(&t, &format!("/fhir/Patient/{id}/_history/2")).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.body["gender"], "male");
}

// ------------------------------------------------------------------ 2. conditional create

async fn conditional_create(backend: Backend) {
    let Some(s) = TestServer::start(backend).await else {
        return;
    };
    let t = s.doctor_a();
    let cond = format!("identifier={SYS}|cond-1");
    let create = |body: Value| {
        let rb = s
            .req(Method::POST, "/fhir/Patient")
            .bearer_auth(&t)
            .header("if-none-exist", cond.clone());
        async move { send(fhir_body(rb, &body)).await }
    };

    // no match: created
    let r = create(patient(SYS, "cond-1", "高橋", "一", "1970-01-01")).await;
    assert_eq!(r.status, 201, "{}", r.text);
    let first = r.body["id"].as_str().unwrap().to_string();
    assert!(r.header("location").is_some());

    // one match: 200 with the existing resource, nothing new written
    let r = create(patient(SYS, "cond-1", "高橋", "二", "1970-01-01")).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.body["id"], first.as_str());
    assert_eq!(r.body["name"][0]["given"][0], "一");
    assert_eq!(r.body["meta"]["versionId"], "1");
    assert_eq!(r.header("etag"), Some("W/\"1\""));
    assert_eq!(
        s.search_ids(&t, "Patient", &[("identifier", &format!("{SYS}|cond-1"))])
            .await,
        vec![first.clone()]
    );
    // returning the existing resource disclosed it: a read is in the audit trail
    let audit = s
        .get(&s.operator(), &format!("/audit/events?patient={first}"))
        .await;
    assert_eq!(audit.status, 200, "{}", audit.text);
    let actions: Vec<&str> = audit.body["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e["record"]["action"].as_str())
        .collect();
    assert!(actions.contains(&"create"), "{actions:?}");
    assert!(actions.contains(&"read"), "{actions:?}");

    // two matches: 412, and still exactly two
    let second = s
        .create(&t, &patient(SYS, "cond-1", "高橋", "三", "1971-01-01"))
        .await;
    let r = create(patient(SYS, "cond-1", "高橋", "四", "1972-01-01")).await;
    let msg = r.assert_outcome(412);
    assert!(msg.contains("2"), "{msg}");
    let mut ids = s
        .search_ids(&t, "Patient", &[("identifier", &format!("{SYS}|cond-1"))])
        .await;
    ids.sort();
    let mut expected = vec![first, second];
    expected.sort();
    assert_eq!(ids, expected);
}

// ------------------------------------------------------------------ 3. search

async fn search(backend: Backend) {
    let Some(s) = TestServer::start(backend).await else {
        return;
    };
    let t = s.doctor_a();
    // full-width katakana in the record
    let p1 = s
        .create(&t, &patient(SYS, "s-1", "ヤマダ", "ハナコ", "1950-01-01"))
        .await;
    let p2 = s
        .create(&t, &patient(SYS, "s-2", "山田", "太郎", "1980-06-15"))
        .await;
    let p3 = s
        .create(&t, &patient(SYS, "s-3", "サトウ", "ジロウ", "2001-12-31"))
        .await;
    let o1 = s.create(&t, &observation(&p1, "2345-7", 98.0)).await;
    let o1b = s.create(&t, &observation(&p1, "2093-3", 180.0)).await;
    let o2 = s.create(&t, &observation(&p2, "2345-7", 110.0)).await;

    // token: system|value, value alone, wrong system
    assert_eq!(
        s.search_ids(&t, "Patient", &[("identifier", &format!("{SYS}|s-2"))])
            .await,
        vec![p2.clone()]
    );
    assert_eq!(
        s.search_ids(&t, "Patient", &[("identifier", "s-2")]).await,
        vec![p2.clone()]
    );
    assert!(
        s.search_ids(&t, "Patient", &[("identifier", "urn:other|s-2")])
            .await
            .is_empty()
    );

    // string: Japanese; half-width kana finds full-width
    assert_eq!(
        s.search_ids(&t, "Patient", &[("name", "ﾔﾏﾀﾞ")]).await,
        vec![p1.clone()]
    );
    assert_eq!(
        s.search_ids(&t, "Patient", &[("family", "ヤマ")]).await,
        vec![p1.clone()]
    );
    assert_eq!(
        s.search_ids(&t, "Patient", &[("name", "山田")]).await,
        vec![p2.clone()]
    );
    assert_eq!(
        s.search_ids(&t, "Patient", &[("given", "ﾀﾛｳ")]).await,
        Vec::<String>::new(),
        "katakana must not match kanji"
    );

    // dates with prefixes
    let sorted = |mut v: Vec<String>| {
        v.sort();
        v
    };
    assert_eq!(
        sorted(
            s.search_ids(&t, "Patient", &[("birthdate", "ge1980-01-01")])
                .await
        ),
        sorted(vec![p2.clone(), p3.clone()])
    );
    assert_eq!(
        s.search_ids(&t, "Patient", &[("birthdate", "lt1980-01-01")])
            .await,
        vec![p1.clone()]
    );
    assert_eq!(
        s.search_ids(&t, "Patient", &[("birthdate", "1980-06")])
            .await,
        vec![p2.clone()]
    );

    // reference, as Type/id and as a plain id
    assert_eq!(
        sorted(
            s.search_ids(&t, "Observation", &[("patient", &format!("Patient/{p1}"))])
                .await
        ),
        sorted(vec![o1.clone(), o1b.clone()])
    );
    assert_eq!(
        s.search_ids(&t, "Observation", &[("subject", &p2)]).await,
        vec![o2.clone()]
    );
    assert_eq!(
        s.search_ids(
            &t,
            "Observation",
            &[("patient", &p1), ("code", "http://loinc.org|2093-3")]
        )
        .await,
        vec![o1b.clone()]
    );

    // _lastUpdated: touch p1 well after everything else was written
    tokio::time::sleep(std::time::Duration::from_millis(30)).await;
    let mut again = s.get(&t, &path_of("Patient", &p1)).await.body;
    again["active"] = json!(true);
    let r = s.put(&t, &path_of("Patient", &p1), &again).await;
    assert_eq!(r.status, 200, "{}", r.text);
    let touched = r.body["meta"]["lastUpdated"].as_str().unwrap().to_string();
    assert_eq!(
        s.search_ids(&t, "Patient", &[("_lastUpdated", &format!("ge{touched}"))])
            .await,
        vec![p1.clone()]
    );
    assert_eq!(
        sorted(
            s.search_ids(&t, "Patient", &[("_lastUpdated", &format!("lt{touched}"))])
                .await
        ),
        sorted(vec![p2.clone(), p3.clone()])
    );

    // _sort
    let ids_param = format!("{p1},{p2},{p3}");
    assert_eq!(
        s.search_ids(
            &t,
            "Patient",
            &[("_id", &ids_param), ("_sort", "-birthdate")]
        )
        .await,
        vec![p3.clone(), p2.clone(), p1.clone()]
    );
    assert_eq!(
        s.search_ids(
            &t,
            "Patient",
            &[("_id", &ids_param), ("_sort", "birthdate")]
        )
        .await,
        vec![p1.clone(), p2.clone(), p3.clone()]
    );

    // _include / _revinclude
    let b = s
        .search(
            &t,
            "Observation",
            &[("_id", &o2), ("_include", "Observation:patient")],
        )
        .await;
    assert_eq!(match_ids(&b), vec![o2.clone()]);
    let inc: Vec<Value> = entries_with_mode(&b, "include");
    assert_eq!(inc.len(), 1, "{b}");
    assert_eq!(inc[0]["resourceType"], "Patient");
    assert_eq!(inc[0]["id"], p2.as_str());
    let b = s
        .search(
            &t,
            "Patient",
            &[("_id", &p1), ("_revinclude", "Observation:patient")],
        )
        .await;
    assert_eq!(match_ids(&b), vec![p1.clone()]);
    let mut rev: Vec<String> = entries_with_mode(&b, "include")
        .iter()
        .map(|r| r["id"].as_str().unwrap().to_string())
        .collect();
    rev.sort();
    assert_eq!(rev, sorted(vec![o1.clone(), o1b.clone()]));
    assert_eq!(b["total"], 1, "total counts matches only");

    // a page of matches alone is sent as the stored texts; a search with an
    // include that finds nothing is parsed: the same entries and total
    let texts = s
        .search(&t, "Observation", &[("patient", &p1), ("_sort", "-_id")])
        .await;
    let parsed = s
        .search(
            &t,
            "Observation",
            &[
                ("patient", &p1),
                ("_sort", "-_id"),
                ("_include", "Observation:performer"),
            ],
        )
        .await;
    assert_eq!(match_ids(&texts).len(), 2, "{texts}");
    assert_eq!(texts["entry"], parsed["entry"]);
    assert_eq!(
        (&texts["total"], &texts["type"]),
        (&parsed["total"], &parsed["type"])
    );

    // _count paging: the next links walk every match exactly once
    let mut paged = Vec::new();
    for i in 0..7 {
        paged.push(
            s.create(
                &t,
                &patient(
                    "urn:test:paging",
                    &format!("pg-{i}"),
                    "ページング",
                    "テスト",
                    "2000-01-01",
                ),
            )
            .await,
        );
    }
    let mut seen: Vec<String> = Vec::new();
    let mut url = format!(
        "{}/Patient?{}",
        s.fhir,
        qs(&[("family", "ﾍﾟｰｼﾞﾝｸﾞ"), ("_count", "3")])
    );
    let mut pages = 0;
    loop {
        pages += 1;
        assert!(pages <= 4, "paging does not end");
        let r = s.get(&t, &url).await;
        assert_eq!(r.status, 200, "{}", r.text);
        assert_eq!(r.body["total"], 7);
        let ids = match_ids(&r.body);
        assert!(ids.len() <= 3, "page larger than _count: {ids:?}");
        seen.extend(ids);
        let next = r.body["link"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|l| l["relation"] == "next")
            .and_then(|l| l["url"].as_str())
            .map(str::to_string);
        match next {
            Some(n) => {
                assert!(n.starts_with(&s.fhir), "next link {n}");
                url = n;
            }
            None => break,
        }
    }
    assert_eq!(pages, 3);
    let mut seen_sorted = seen.clone();
    seen_sorted.sort();
    seen_sorted.dedup();
    assert_eq!(seen_sorted.len(), seen.len(), "a match repeated: {seen:?}");
    assert_eq!(seen_sorted, sorted(paged.clone()));

    // _summary=count
    let b = s
        .search(
            &t,
            "Patient",
            &[("family", "ページング"), ("_summary", "count")],
        )
        .await;
    assert_eq!(b["total"], 7);
    assert!(b["entry"].as_array().is_none_or(|e| e.is_empty()), "{b}");

    // an unknown parameter is a 400 naming it ...
    let r = send(
        s.req(
            Method::GET,
            &format!(
                "/fhir/Patient?{}",
                qs(&[("foo-bar", "1"), ("family", "ページング")])
            ),
        )
        .bearer_auth(&t),
    )
    .await;
    let msg = r.assert_outcome(400);
    assert!(msg.contains("foo-bar"), "{msg}");
    // ... and so is a parameter the server does not index
    let msg = send(
        s.req(Method::GET, "/fhir/Patient?deceased=true")
            .bearer_auth(&t),
    )
    .await
    .assert_outcome(400);
    assert!(msg.contains("deceased"), "{msg}");
    // ... unless the client asks for lenient handling
    let r = send(
        s.req(
            Method::GET,
            &format!(
                "/fhir/Patient?{}",
                qs(&[("foo-bar", "1"), ("family", "ページング")])
            ),
        )
        .bearer_auth(&t)
        .header("prefer", "handling=lenient"),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.body["total"], 7);
    let outcomes = entries_with_mode(&r.body, "outcome");
    assert_eq!(outcomes.len(), 1, "{}", r.text);
    assert_eq!(outcomes[0]["resourceType"], "OperationOutcome");
    assert!(
        outcomes[0].to_string().contains("foo-bar"),
        "{}",
        outcomes[0]
    );

    // POST _search works like GET
    let r = send(
        s.req(Method::POST, "/fhir/Patient/_search")
            .bearer_auth(&t)
            .header("content-type", "application/x-www-form-urlencoded")
            .body(qs(&[("identifier", &format!("{SYS}|s-3"))])),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(match_ids(&r.body), vec![p3]);
}

// ------------------------------------------------------------------ 4. transaction and batch

async fn transaction(backend: Backend) {
    let Some(s) = TestServer::start(backend).await else {
        return;
    };
    let t = s.doctor_a();
    let pu = format!("urn:uuid:{}", uuid::Uuid::new_v4());
    let ou = format!("urn:uuid:{}", uuid::Uuid::new_v4());
    let mut obs = observation("placeholder", "2345-7", 101.0);
    obs["subject"]["reference"] = json!(pu);
    let bundle = json!({
        "resourceType": "Bundle", "type": "transaction",
        "entry": [
            {"fullUrl": ou, "resource": obs, "request": {"method": "POST", "url": "Observation"}},
            {"fullUrl": pu, "resource": patient(SYS, "tx-1", "伊藤", "美咲", "1988-08-08"),
             "request": {"method": "POST", "url": "Patient"}},
        ]
    });
    let r = s.post(&t, "/fhir", &bundle).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.body["type"], "transaction-response");
    let entries = r.body["entry"].as_array().expect("entries");
    assert_eq!(entries.len(), 2);
    // responses in the order of the request entries
    assert_eq!(entries[0]["response"]["status"], "201 Created");
    assert_eq!(entries[1]["response"]["status"], "201 Created");
    let pid = entries[1]["resource"]["id"].as_str().unwrap().to_string();
    let oid = entries[0]["resource"]["id"].as_str().unwrap().to_string();
    assert_eq!(
        entries[1]["response"]["location"],
        format!("Patient/{pid}/_history/1")
    );
    assert_eq!(entries[1]["response"]["etag"], "W/\"1\"");
    assert_eq!(
        entries[0]["resource"]["subject"]["reference"],
        format!("Patient/{pid}")
    );
    // both stored, the reference rewritten
    let r = s.get(&t, &path_of("Observation", &oid)).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.body["subject"]["reference"], format!("Patient/{pid}"));
    assert_eq!(
        s.search_ids(&t, "Observation", &[("patient", &pid)]).await,
        vec![oid.clone()]
    );

    // audit position before the failing transactions
    let before = s.audit_events(&[("_count", "1")]).await[0]["seq"]
        .as_i64()
        .unwrap();

    // an invalid entry fails the whole transaction, naming the entry
    let bad = json!({
        "resourceType": "Bundle", "type": "transaction",
        "entry": [
            {"fullUrl": "urn:uuid:7d1c7a4e-0000-4000-8000-000000000001",
             "resource": patient(SYS, "tx-bad", "失敗", "一", "1990-01-01"),
             "request": {"method": "POST", "url": "Patient"}},
            {"resource": {"resourceType": "Patient", "name": [{"family": "型違い"}]},
             "request": {"method": "POST", "url": "Observation"}},
        ]
    });
    let r = s.post(&t, "/fhir", &bad).await;
    assert!((400..500).contains(&r.status), "{} {}", r.status, r.text);
    let msg = r.assert_outcome(r.status);
    assert!(msg.contains("Bundle.entry[1]"), "{msg}");

    // a failure while executing (stale ifMatch on the second entry) rolls back the first
    let bad = json!({
        "resourceType": "Bundle", "type": "transaction",
        "entry": [
            {"fullUrl": "urn:uuid:7d1c7a4e-0000-4000-8000-000000000002",
             "resource": patient(SYS, "tx-bad", "失敗", "二", "1990-01-01"),
             "request": {"method": "POST", "url": "Patient"}},
            {"resource": {"resourceType": "Patient", "id": pid, "active": false},
             "request": {"method": "PUT", "url": format!("Patient/{pid}"), "ifMatch": "W/\"9\""}},
        ]
    });
    let r = s.post(&t, "/fhir", &bad).await;
    assert!((400..500).contains(&r.status), "{} {}", r.status, r.text);
    let msg = r.assert_outcome(r.status);
    assert!(msg.contains("Bundle.entry[1]"), "{msg}");

    // nothing of either was stored
    assert!(
        s.search_ids(&t, "Patient", &[("identifier", &format!("{SYS}|tx-bad"))])
            .await
            .is_empty()
    );
    assert!(
        s.search_ids(&t, "Patient", &[("family", "失敗")])
            .await
            .is_empty()
    );
    let r = s.get(&t, &path_of("Patient", &pid)).await;
    assert_eq!(r.header("etag"), Some("W/\"1\""));
    assert!(r.body.get("active").is_none());
    // and the audit trail holds no success record of hospital A's writes since
    let after = s
        .audit_events(&[("org", common::HOSP_A), ("after", &before.to_string())])
        .await;
    let writes: Vec<&Value> = after
        .iter()
        .filter(|e| {
            e["record"]["outcome"] == "success"
                && ["create", "update", "delete"]
                    .contains(&e["record"]["action"].as_str().unwrap_or_default())
        })
        .collect();
    assert!(
        writes.is_empty(),
        "rolled-back writes were audited: {writes:?}"
    );
}

async fn batch(backend: Backend) {
    let Some(s) = TestServer::start(backend).await else {
        return;
    };
    let t = s.doctor_a();
    let bundle = json!({
        "resourceType": "Bundle", "type": "batch",
        "entry": [
            {"resource": patient(SYS, "b-1", "中村", "一", "1960-01-01"),
             "request": {"method": "POST", "url": "Patient"}},
            {"request": {"method": "GET", "url": "Patient/does-not-exist"}},
            {"resource": {"resourceType": "Patient", "name": [{"family": "型違い"}]},
             "request": {"method": "POST", "url": "Observation"}},
            {"resource": {"resourceType": "Patient", "id": "batch-chosen", "active": true},
             "request": {"method": "PUT", "url": "Patient/batch-chosen"}},
        ]
    });
    let r = s.post(&t, "/fhir", &bundle).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.body["type"], "batch-response");
    let entries = r.body["entry"].as_array().expect("entries");
    let statuses: Vec<&str> = entries
        .iter()
        .map(|e| e["response"]["status"].as_str().unwrap_or_default())
        .collect();
    assert_eq!(statuses.len(), 4, "{}", r.text);
    assert!(statuses[0].starts_with("201"), "{statuses:?}");
    assert!(statuses[1].starts_with("404"), "{statuses:?}");
    assert!(statuses[2].starts_with("400"), "{statuses:?}");
    assert!(statuses[3].starts_with("201"), "{statuses:?}");
    assert_eq!(
        entries[1]["response"]["outcome"]["resourceType"],
        "OperationOutcome"
    );
    assert_eq!(
        entries[2]["response"]["outcome"]["resourceType"],
        "OperationOutcome"
    );
    // the good entries were stored
    assert_eq!(
        s.search_ids(&t, "Patient", &[("identifier", &format!("{SYS}|b-1"))])
            .await
            .len(),
        1
    );
    assert_eq!(s.get(&t, "/fhir/Patient/batch-chosen").await.status, 200);
}

// ------------------------------------------------------------------ 5. $everything

async fn everything(backend: Backend) {
    let Some(s) = TestServer::start(backend).await else {
        return;
    };
    let (a, b) = (s.doctor_a(), s.doctor_b());
    let pid = s
        .create(&a, &patient(SYS, "ev-1", "小林", "健", "1966-06-06"))
        .await;
    let other = s
        .create(&a, &patient(SYS, "ev-2", "加藤", "誠", "1967-07-07"))
        .await;
    let oa = s.create(&a, &observation(&pid, "2345-7", 90.0)).await;
    let ob = s.create(&b, &observation(&pid, "2345-7", 95.0)).await;
    let _ = s.create(&a, &observation(&other, "2345-7", 99.0)).await;

    let ids = |b: &Value| {
        let mut v: Vec<String> = b["entry"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|e| {
                format!(
                    "{}/{}",
                    e["resource"]["resourceType"].as_str().unwrap_or_default(),
                    e["resource"]["id"].as_str().unwrap_or_default()
                )
            })
            .collect();
        v.sort();
        v
    };
    // hospital A sees its own records of the patient, not hospital B's
    let r = s.get(&a, &format!("/fhir/Patient/{pid}/$everything")).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.body["type"], "searchset");
    let mut expected = vec![format!("Observation/{oa}"), format!("Patient/{pid}")];
    expected.sort();
    assert_eq!(ids(&r.body), expected);
    assert_eq!(r.body["total"], 2);
    // the patient sees the whole compartment, both hospitals' records, nobody else's
    let r = s
        .get(
            &s.patient(&pid),
            &format!("/fhir/Patient/{pid}/$everything"),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    let mut expected = vec![
        format!("Observation/{oa}"),
        format!("Observation/{ob}"),
        format!("Patient/{pid}"),
    ];
    expected.sort();
    assert_eq!(ids(&r.body), expected);
    // hospital B did not write the Patient: no $everything for it
    s.get(&b, &format!("/fhir/Patient/{pid}/$everything"))
        .await
        .assert_outcome(403);
    // paging
    let r = s
        .get(&a, &format!("/fhir/Patient/{pid}/$everything?_count=1"))
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.body["entry"].as_array().map(Vec::len), Some(1));
    assert!(
        r.body["link"]
            .as_array()
            .is_some_and(|l| l.iter().any(|l| l["relation"] == "next")),
        "{}",
        r.text
    );
    // clerks may not use it
    s.get(&s.clerk_a(), &format!("/fhir/Patient/{pid}/$everything"))
        .await
        .assert_outcome(403);
}

// ------------------------------------------------------------------ 6. bad input

async fn bad_input(backend: Backend) {
    let Some(s) = TestServer::start_with(backend, |c| c.max_body_bytes = 4096).await else {
        return;
    };
    let t = s.doctor_a();

    // malformed JSON
    let r = send(
        s.req(Method::POST, "/fhir/Patient")
            .bearer_auth(&t)
            .header("content-type", "application/fhir+json")
            .body("{\"resourceType\": \"Patient\", "),
    )
    .await;
    let msg = r.assert_outcome(400);
    assert!(msg.contains("JSON"), "{msg}");
    // not an object / no resourceType
    s.post(&t, "/fhir/Patient", &json!([1, 2]))
        .await
        .assert_outcome(400);
    s.post(&t, "/fhir/Patient", &json!({"name": []}))
        .await
        .assert_outcome(400);
    // body type differs from the URL
    s.post(&t, "/fhir/Patient", &json!({"resourceType": "Observation"}))
        .await
        .assert_outcome(400);

    // unknown resource type
    s.get(&t, "/fhir/Pateint/1").await.assert_outcome(404);
    s.get(&t, "/fhir/Pateint?name=x").await.assert_outcome(404);
    s.post(&t, "/fhir/Pateint", &json!({"resourceType": "Pateint"}))
        .await
        .assert_outcome(404);
    // unknown endpoint
    s.get(&t, "/nothing-here").await.assert_outcome(404);

    // wrong content type
    let r = send(
        s.req(Method::POST, "/fhir/Patient")
            .bearer_auth(&t)
            .header("content-type", "application/xml")
            .body("<Patient xmlns=\"http://hl7.org/fhir\"/>"),
    )
    .await;
    r.assert_outcome(415);
    let r = send(
        s.req(Method::POST, "/fhir/Patient")
            .bearer_auth(&t)
            .body("{\"resourceType\": \"Patient\"}"),
    )
    .await;
    r.assert_outcome(415);
    // an Accept the server cannot produce
    let r = send(
        s.req(Method::GET, "/fhir/Patient")
            .bearer_auth(&t)
            .header("accept", "application/fhir+xml"),
    )
    .await;
    r.assert_outcome(406);

    // body over the limit
    let mut big = patient(SYS, "big", "大", "きい", "1990-01-01");
    big["text"] = json!({"status": "generated", "div": format!("<div xmlns=\"http://www.w3.org/1999/xhtml\">{}</div>", "あ".repeat(3000))});
    let r = s.post(&t, "/fhir/Patient", &big).await;
    r.assert_outcome(413);
    assert!(
        s.search_ids(&t, "Patient", &[("identifier", &format!("{SYS}|big"))])
            .await
            .is_empty()
    );

    // authentication: missing, garbage, wrong scheme, expired, forged
    let unauthorised = |r: Resp| {
        r.assert_outcome(401);
        let wa = r.header("www-authenticate").unwrap_or_default().to_string();
        assert!(wa.starts_with("Bearer"), "WWW-Authenticate: {wa:?}");
    };
    unauthorised(send(s.req(Method::GET, "/fhir/Patient")).await);
    unauthorised(s.get("garbage.not.jwt", "/fhir/Patient").await);
    unauthorised(
        send(
            s.req(Method::GET, "/fhir/Patient")
                .header("authorization", format!("Basic {t}")),
        )
        .await,
    );
    let p = tsunagi_policy::Principal::new(
        common::HOSP_A,
        OrgKind::Hospital,
        vec![],
        Role::Doctor,
        None,
        None,
        false,
    )
    .unwrap();
    let expired = s
        .state
        .keys
        .issue_at(
            &p,
            chrono::Utc::now() - chrono::Duration::hours(2),
            chrono::Duration::minutes(5),
        )
        .unwrap();
    unauthorised(s.get(&expired, "/fhir/Patient").await);
    // a token of another server's key
    let dir = tempfile::tempdir().unwrap();
    let foreign = tsunagi_policy::ServerKeys::load_or_create(dir.path())
        .unwrap()
        .issue(&p, chrono::Duration::minutes(5))
        .unwrap();
    unauthorised(s.get(&foreign, "/fhir/Patient").await);
    // a tampered token (payload swapped for another's)
    let other = s.operator();
    let mut parts: Vec<&str> = t.split('.').collect();
    parts[1] = other.split('.').nth(1).unwrap();
    unauthorised(s.get(&parts.join("."), "/fhir/Patient").await);
    // writes need a token too, and nothing is stored
    unauthorised(
        send(fhir_body(
            s.req(Method::POST, "/fhir/Patient"),
            &patient(SYS, "anon", "匿名", "無", "1990-01-01"),
        ))
        .await,
    );

    // an undeclared purpose of use
    let r = send(
        s.req(Method::GET, "/fhir/Patient")
            .bearer_auth(&t)
            .header("x-purpose-of-use", "curiosity"),
    )
    .await;
    r.assert_outcome(400);
    // a purpose the role may not declare
    let r = send(
        s.req(Method::GET, "/fhir/Patient")
            .bearer_auth(&t)
            .header("x-purpose-of-use", "research"),
    )
    .await;
    r.assert_outcome(403);
    // a malformed If-Match
    let id = s
        .create(&t, &patient(SYS, "im", "井上", "誠", "1990-01-01"))
        .await;
    let mut body = s.get(&t, &path_of("Patient", &id)).await.body;
    body["active"] = json!(true);
    let r = send(fhir_body(
        s.req(Method::PUT, &path_of("Patient", &id))
            .bearer_auth(&t)
            .header("if-match", "version one"),
        &body,
    ))
    .await;
    r.assert_outcome(400);
}

// ------------------------------------------------------------------ 7. authorisation

async fn authorisation(backend: Backend) {
    let Some(s) = TestServer::start(backend).await else {
        return;
    };
    let (a, b) = (s.doctor_a(), s.doctor_b());
    let pa = s
        .create(&a, &patient(SYS, "az-1", "渡辺", "恵", "1955-05-05"))
        .await;
    let oa = s.create(&a, &observation(&pa, "2345-7", 120.0)).await;
    let pb = s
        .create(
            &b,
            &patient("urn:test:hospital-b", "az-2", "渡辺", "恵子", "1956-06-06"),
        )
        .await;
    let ob = s.create(&b, &observation(&pb, "2345-7", 130.0)).await;

    // a doctor at hospital A cannot read, search or change hospital B's records
    s.get(&a, &path_of("Patient", &pb))
        .await
        .assert_outcome(403);
    s.get(&a, &path_of("Observation", &ob))
        .await
        .assert_outcome(403);
    s.get(&a, &format!("/fhir/Patient/{pb}/_history/1"))
        .await
        .assert_outcome(403);
    s.get(&a, &format!("/fhir/Patient/{pb}/_history"))
        .await
        .assert_outcome(403);
    assert_eq!(
        s.search_ids(&a, "Patient", &[("family", "渡辺")]).await,
        vec![pa.clone()]
    );
    let bundle = s.search(&a, "Observation", &[("patient", &pb)]).await;
    assert_eq!(bundle["total"], 0, "{bundle}");
    assert!(match_ids(&bundle).is_empty());
    // includes do not leak either
    let bundle = s
        .search(
            &a,
            "Observation",
            &[
                ("_id", &format!("{oa},{ob}")),
                ("_include", "Observation:patient"),
            ],
        )
        .await;
    assert_eq!(match_ids(&bundle), vec![oa.clone()]);
    let inc = entries_with_mode(&bundle, "include");
    assert!(
        inc.iter().all(|r| r["id"] != pb.as_str()),
        "hospital B's patient leaked through _include: {bundle}"
    );
    let mut upd = s.get(&b, &path_of("Patient", &pb)).await.body;
    upd["active"] = json!(false);
    s.put(&a, &path_of("Patient", &pb), &upd)
        .await
        .assert_outcome(403);
    s.delete(&a, &path_of("Observation", &ob))
        .await
        .assert_outcome(403);
    let r = s.get(&b, &path_of("Patient", &pb)).await;
    assert_eq!(
        r.header("etag"),
        Some("W/\"1\""),
        "the denied update landed"
    );
    assert!(r.body.get("active").is_none());
    // hospital B still reads its own
    assert_eq!(s.get(&b, &path_of("Observation", &ob)).await.status, 200);

    // a patient reads their own data, nobody else's
    let me = s.patient(&pa);
    let r = s.get(&me, &path_of("Patient", &pa)).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(s.get(&me, &path_of("Observation", &oa)).await.status, 200);
    s.get(&me, &path_of("Patient", &pb))
        .await
        .assert_outcome(403);
    s.get(&me, &path_of("Observation", &ob))
        .await
        .assert_outcome(403);
    assert_eq!(
        s.search_ids(&me, "Observation", &[]).await,
        vec![oa.clone()]
    );
    assert_eq!(
        s.search_ids(&me, "Patient", &[("family", "渡辺")]).await,
        vec![pa.clone()]
    );
    // and cannot write
    let mut mine = r.body.clone();
    mine["active"] = json!(false);
    s.put(&me, &path_of("Patient", &pa), &mine)
        .await
        .assert_outcome(403);

    // a clerk handles Patient, not clinical data
    let clerk = s.clerk_a();
    assert_eq!(s.get(&clerk, &path_of("Patient", &pa)).await.status, 200);
    s.get(&clerk, &path_of("Observation", &oa))
        .await
        .assert_outcome(403);
    s.get(&clerk, "/fhir/Observation").await.assert_outcome(403);
    // not through _revinclude either
    let bundle = s
        .search(
            &clerk,
            "Patient",
            &[("_id", &pa), ("_revinclude", "Observation:patient")],
        )
        .await;
    assert_eq!(match_ids(&bundle), vec![pa.clone()]);
    assert!(
        entries_with_mode(&bundle, "include").is_empty(),
        "a clerk got clinical data through _revinclude: {bundle}"
    );

    // the operator runs the platform but reads no clinical data
    let op = s.operator();
    s.get(&op, &path_of("Patient", &pa))
        .await
        .assert_outcome(403);
    s.get(&op, &path_of("Observation", &oa))
        .await
        .assert_outcome(403);
    s.get(&op, "/fhir/Observation").await.assert_outcome(403);
    let r = s.get(&op, "/audit/events").await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert!(r.body["events"].is_array());
    // non-personal data is readable by anyone authenticated
    assert_eq!(s.get(&op, "/fhir/Organization/org-a").await.status, 200);
    assert_eq!(s.get(&me, "/fhir/Organization/org-a").await.status, 200);
    // but only the operator maintains the registry
    let mut org = s.get(&a, "/fhir/Organization/org-a").await.body;
    org["name"] = json!("乗っ取り病院");
    s.put(&a, "/fhir/Organization/org-a", &org)
        .await
        .assert_outcome(403);

    // /audit/events is for operators only
    for tok in [&a, &me, &clerk] {
        s.get(tok, "/audit/events").await.assert_outcome(403);
    }
}

// ------------------------------------------------------------------ 8. audit

async fn audit_trail(backend: Backend) {
    let Some(s) = TestServer::start(backend).await else {
        return;
    };
    let (a, b) = (s.doctor_a(), s.doctor_b());
    let pid = s
        .create(&a, &patient(SYS, "au-1", "松本", "潤", "1983-08-30"))
        .await;
    let oid = s.create(&a, &observation(&pid, "2345-7", 88.0)).await;
    assert_eq!(s.get(&a, &path_of("Patient", &pid)).await.status, 200);
    assert_eq!(
        s.search_ids(&a, "Observation", &[("patient", &pid)]).await,
        vec![oid.clone()]
    );
    s.get(&b, &path_of("Patient", &pid))
        .await
        .assert_outcome(403);

    let events = s.audit_events(&[("patient", &pid)]).await;
    let records: Vec<&Value> = events.iter().map(|e| &e["record"]).collect();
    for e in &events {
        assert!(e["seq"].is_i64(), "{e}");
        assert!(e["hash"].as_str().is_some_and(|h| h.len() == 64), "{e}");
        assert_eq!(e["record"]["patient"], pid.as_str());
    }
    let find = |action: &str, outcome: &str, org: &str| {
        records
            .iter()
            .find(|r| r["action"] == action && r["outcome"] == outcome && r["org"] == org)
            .copied()
            .unwrap_or_else(|| panic!("no {action}/{outcome} record of {org}: {records:#?}"))
    };
    let read = find("read", "success", common::HOSP_A);
    assert_eq!(read["role"], "doctor");
    assert_eq!(read["purpose"], "treatment");
    assert_eq!(read["status"], 200);
    assert_eq!(
        read["resources"],
        json!([format!("Patient/{pid}/_history/1")])
    );
    let search = find("search", "success", common::HOSP_A);
    assert_eq!(search["purpose"], "treatment");
    assert_eq!(
        search["resources"],
        json!([format!("Observation/{oid}/_history/1")])
    );
    let denied = find("read", "denied", common::HOSP_B);
    assert_eq!(denied["role"], "doctor");
    assert_eq!(denied["status"], 403);
    assert!(denied["reason"].as_str().is_some_and(|r| !r.is_empty()));
    let created = find("create", "success", common::HOSP_A);
    assert_eq!(created["status"], 201);
    // a declared purpose is what gets recorded
    let r = send(
        s.req(Method::GET, &path_of("Patient", &pid))
            .bearer_auth(&a)
            .header("x-purpose-of-use", "emergency"),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text);
    let events = s
        .audit_events(&[("patient", &pid), ("purpose", "emergency")])
        .await;
    assert_eq!(events.len(), 1, "{events:#?}");
    assert_eq!(events[0]["record"]["action"], "read");
    // filters: by organisation
    let by_b = s.audit_events(&[("org", common::HOSP_B)]).await;
    assert!(!by_b.is_empty());
    assert!(by_b.iter().all(|e| e["record"]["org"] == common::HOSP_B));
    // the operator's own queries are audited
    let ops = s.audit_events(&[("org", common::OPERATOR)]).await;
    assert!(
        ops.iter().any(|e| e["record"]["action"] == "audit-query"),
        "{ops:#?}"
    );
    // a bad audit query parameter
    s.get(&s.operator(), "/audit/events?nonsense=1")
        .await
        .assert_outcome(400);

    // the chain verifies
    let store = s.store.clone();
    let report = tokio::task::block_in_place(|| {
        tsunagi_store::audit::verify_chain(tsunagi_store::audit::scan_all(&*store))
    });
    assert!(report.ok(), "{report:?}");
    assert!(report.checked >= 6, "{report:?}");

    // tampering with one record (a read's) is detected at its seq
    let seq = events[0]["seq"].as_i64().unwrap();
    s.raw_execute(&format!(
        "UPDATE {} SET record = '{{\"action\":\"nothing to see\"}}' WHERE seq = {seq}",
        s.standalone_audit_table()
    ));
    let report = tokio::task::block_in_place(|| {
        tsunagi_store::audit::verify_chain(tsunagi_store::audit::scan_all(&*store))
    });
    assert!(!report.ok());
    assert_eq!(
        report.problems,
        vec![tsunagi_store::audit::ChainProblem {
            seq,
            kind: tsunagi_store::audit::ProblemKind::Altered
        }]
    );
}

// ------------------------------------------------------------------ 9. operations

async fn operations_endpoints(backend: Backend) {
    let Some(s) = TestServer::start(backend).await else {
        return;
    };
    // /metadata needs no token
    let r = send(s.req(Method::GET, "/fhir/metadata")).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert!(
        r.header("content-type")
            .unwrap_or_default()
            .starts_with("application/fhir+json")
    );
    let cs = &r.body;
    assert_eq!(cs["resourceType"], "CapabilityStatement");
    assert_eq!(cs["fhirVersion"], "4.0.1");
    let rest = &cs["rest"][0];
    let patient = rest["resource"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["type"] == "Patient")
        .expect("Patient listed");
    let params: Vec<&str> = patient["searchParam"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|p| p["name"].as_str())
        .collect();
    for p in [
        "birthdate",
        "identifier",
        "name",
        "family",
        "_id",
        "_lastUpdated",
    ] {
        assert!(params.contains(&p), "{p} missing from {params:?}");
    }
    // the R4 'deceased' parameter has no indexed expression here: not claimed
    assert!(!params.contains(&"deceased"), "{params:?}");
    let interactions: Vec<&str> = patient["interaction"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|i| i["code"].as_str())
        .collect();
    for i in ["read", "vread", "update", "delete", "create", "search-type"] {
        assert!(interactions.contains(&i), "{interactions:?}");
    }
    assert!(
        patient["operation"]
            .as_array()
            .is_some_and(|o| o.iter().any(|o| o["name"] == "everything"))
    );
    assert!(
        cs.to_string().contains(&format!("{}/auth/token", s.root)),
        "token endpoint not advertised"
    );

    // health and readiness
    let r = send(s.req(Method::GET, "/healthz")).await;
    assert_eq!((r.status, r.text.as_str()), (200, "ok"));
    let r = send(s.req(Method::GET, "/readyz")).await;
    assert_eq!((r.status, r.text.as_str()), (200, "ready"));
    // SMART configuration
    let r = send(s.req(Method::GET, "/.well-known/smart-configuration")).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.body["token_endpoint"], format!("{}/auth/token", s.root));

    // metrics count requests by route
    let _ = s.get(&s.doctor_a(), "/fhir/Patient").await;
    let r = send(s.req(Method::GET, "/metrics")).await;
    assert_eq!(r.status, 200);
    assert!(r.text.contains("tsunagi_http_requests_total"), "{}", r.text);
    assert!(r.text.contains("route=\"/fhir/{rtype}\""), "{}", r.text);
}

// ------------------------------------------------------------------ 10. token endpoint

async fn token_endpoint(backend: Backend) {
    use base64::Engine;
    use ed25519_dalek::pkcs8::EncodePrivateKey;

    let Some(s) = TestServer::start(backend).await else {
        return;
    };
    let sk = ed25519_dalek::SigningKey::generate(&mut rand::rngs::OsRng);
    let x = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(sk.verifying_key().as_bytes());
    let jwk =
        json!({"kty": "OKP", "crv": "Ed25519", "x": x, "kid": "k1", "alg": "EdDSA", "use": "sig"});
    let store = s.store.clone();
    tokio::task::block_in_place(|| {
        store.put_client_key(&tsunagi_store::ClientKey {
            client_id: "emr-a".into(),
            org: common::HOSP_A.into(),
            kid: "k1".into(),
            role: "doctor".into(),
            user: Some("dr-tanaka".into()),
            jwk,
            created: chrono::Utc::now(),
            revoked: false,
        })
    })
    .unwrap();
    let enc = jsonwebtoken::EncodingKey::from_ed_der(sk.to_pkcs8_der().unwrap().as_bytes());
    let token_url = format!("{}/auth/token", s.root);
    let assertion = |jti: &str, aud: &str| {
        let mut h = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::EdDSA);
        h.kid = Some("k1".into());
        let now = chrono::Utc::now().timestamp();
        jsonwebtoken::encode(
            &h,
            &json!({"iss": "emr-a", "sub": "emr-a", "aud": aud, "exp": now + 240, "jti": jti}),
            &enc,
        )
        .unwrap()
    };
    let exchange = |a: String| {
        let rb = s
            .req(Method::POST, "/auth/token")
            .header("content-type", "application/x-www-form-urlencoded")
            .body(qs(&[
                ("grant_type", "client_credentials"),
                (
                    "client_assertion_type",
                    "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
                ),
                ("client_assertion", &a),
                ("scope", "system/*.read"),
            ]));
        async move { send(rb).await }
    };

    let a1 = assertion("jti-1", &token_url);
    let r = exchange(a1.clone()).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.header("cache-control"), Some("no-store"));
    assert_eq!(r.body["token_type"], "bearer");
    assert!(r.body["expires_in"].as_i64().is_some_and(|e| e > 0));
    let access = r.body["access_token"].as_str().unwrap().to_string();
    // the token works on /fhir, as a doctor of hospital A
    let pid = s
        .create(&access, &patient(SYS, "tk-1", "木村", "拓", "1972-11-13"))
        .await;
    assert_eq!(
        s.get(&s.doctor_a(), &path_of("Patient", &pid)).await.status,
        200
    );
    s.get(&s.doctor_b(), &path_of("Patient", &pid))
        .await
        .assert_outcome(403);

    // replay of the same assertion
    let r = exchange(a1).await;
    assert!(matches!(r.status, 400 | 401), "{} {}", r.status, r.text);
    assert!(
        r.header("content-type")
            .unwrap_or_default()
            .starts_with("application/json")
    );
    assert_eq!(r.body["error"], "invalid_client", "{}", r.text);
    assert!(r.body["error_description"].is_string());
    // wrong audience
    let r = exchange(assertion("jti-2", "https://elsewhere.example/token")).await;
    assert_eq!(r.status, 401, "{}", r.text);
    assert_eq!(r.body["error"], "invalid_client");
    // unsupported grant
    let r = send(
        s.req(Method::POST, "/auth/token")
            .header("content-type", "application/x-www-form-urlencoded")
            .body("grant_type=password&username=x&password=y"),
    )
    .await;
    assert_eq!(r.status, 400, "{}", r.text);
    assert_eq!(r.body["error"], "unsupported_grant_type");
    // another fresh assertion still works
    assert_eq!(exchange(assertion("jti-3", &token_url)).await.status, 200);
}
