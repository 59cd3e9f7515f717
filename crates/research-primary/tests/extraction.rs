//! Opt-out and extraction, black-box on both backends: the patient's opt-out
//! endpoint, the extraction honouring the opt-out snapshot, and the identifier
//! scan over every column of every extract file.

mod support;

use reqwest::Method;
use serde_json::Value;
use support::{Backend, Primary, all_cells};
use tsunagi_research_primary::LinkageKey;
use tsunagi_research_primary::extract::{self, ExtractConfig};
use tsunagi_store::AuditFilter;
use tsunagi_testkit::both_backends;

both_backends!(
    opt_out_is_self_service_and_audited,
    extraction_honours_opt_out_snapshots,
    no_identifier_in_any_extract,
);

fn extract_to(
    p: &Primary,
    dir: &std::path::Path,
    dataset: &str,
    key: &LinkageKey,
) -> extract::ExtractReport {
    let store = p.store.clone();
    let cfg = ExtractConfig {
        dataset: dataset.into(),
        research_dir: dir.to_path_buf(),
    };
    let snaps = p.dir.path().join("optout-snapshots");
    tokio::task::block_in_place(|| extract::run(&*store, &cfg, key, Some(&snaps))).expect("extract")
}

fn pids(dir: &std::path::Path) -> Vec<String> {
    all_cells(dir)
        .into_iter()
        .filter(|(f, c, _)| f == "patient.parquet" && c == "pid")
        .map(|(_, _, v)| v)
        .collect()
}

async fn opt_out_is_self_service_and_audited(b: Backend) {
    let Some(p) = Primary::start(b).await else {
        return;
    };
    p.seed_person(1);
    let tok = p.patient_token("pt-01");
    let (s, v) = p.call(Method::GET, "/fhir/$research-opt-out", &tok).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["parameter"][0]["valueBoolean"], false);

    let (s, v) = p.call(Method::POST, "/fhir/$research-opt-out", &tok).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["resourceType"], "Consent");
    assert_eq!(v["status"], "active");
    assert_eq!(v["patient"]["reference"], "Patient/pt-01");
    assert_eq!(v["provision"]["type"], "deny");

    let (s, v) = p.call(Method::GET, "/fhir/$research-opt-out", &tok).await;
    assert_eq!((s, v["status"].as_str()), (200, Some("active")), "{v}");

    // A doctor cannot opt someone out.
    let (s, v) = p
        .call(Method::POST, "/fhir/$research-opt-out", &p.doctor_token())
        .await;
    assert_eq!(s, 403, "{v}");
    // No token at all.
    let r = p
        .http
        .post(format!("{}/fhir/$research-opt-out", p.root))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 401);

    let (s, v) = p
        .call(Method::DELETE, "/fhir/$research-opt-out", &tok)
        .await;
    assert_eq!((s, v["status"].as_str()), (200, Some("inactive")), "{v}");

    let store = p.store.clone();
    let recs = tokio::task::block_in_place(|| {
        store.audit_query(&AuditFilter {
            patient: Some("pt-01".into()),
            limit: 100,
            ..Default::default()
        })
    })
    .unwrap();
    let actions: Vec<&str> = recs
        .iter()
        .filter_map(|e| e.record["action"].as_str())
        .collect();
    assert!(actions.contains(&"research-opt-out"), "{actions:?}");
    assert!(
        actions.contains(&"research-opt-out-withdraw"),
        "{actions:?}"
    );
    // The status reads went through the engine (a read of the Consent).
    assert!(actions.contains(&"read"), "{actions:?}");
}

async fn extraction_honours_opt_out_snapshots(b: Backend) {
    let Some(p) = Primary::start(b).await else {
        return;
    };
    for n in 1..=5 {
        p.seed_person(n);
    }
    let key = LinkageKey::from_bytes([7; 32]);
    let out = tempfile::tempdir().unwrap();
    let (s, _) = p
        .call(
            Method::POST,
            "/fhir/$research-opt-out",
            &p.patient_token("pt-02"),
        )
        .await;
    assert_eq!(s, 200);

    let r1 = extract_to(&p, out.path(), "ds1", &key);
    let m1 = &r1.manifest;
    assert_eq!(m1["optOutSnapshot"]["persons"], 1);
    assert_eq!(m1["persons"], 4);
    let obs = r1.tables.iter().find(|t| t.name == "observation").unwrap();
    assert_eq!((obs.rows, obs.opted_out_skipped), (8, 2));
    let d1 = out.path().join("datasets/ds1");
    let p1 = pids(&d1);
    assert_eq!(p1.len(), 4);
    assert!(!p1.contains(&key.pseudonym("ds1", "pt-02")));
    assert!(p1.contains(&key.pseudonym("ds1", "pt-01")));
    // The snapshot with its persons stays on the primary side.
    let snap_id = m1["optOutSnapshot"]["id"].as_str().unwrap();
    let snap: Value = serde_json::from_slice(
        &std::fs::read(
            p.dir
                .path()
                .join(format!("optout-snapshots/{snap_id}.json")),
        )
        .unwrap(),
    )
    .unwrap();
    assert_eq!(snap["persons"], serde_json::json!(["pt-02"]));
    assert!(
        !std::fs::read_to_string(d1.join("manifest.json"))
            .unwrap()
            .contains("pt-02")
    );

    // pt-03 opts out midway, pt-02 withdraws the opt-out: both from the next extraction on.
    p.call(
        Method::POST,
        "/fhir/$research-opt-out",
        &p.patient_token("pt-03"),
    )
    .await;
    p.call(
        Method::DELETE,
        "/fhir/$research-opt-out",
        &p.patient_token("pt-02"),
    )
    .await;
    let r2 = extract_to(&p, out.path(), "ds2", &key);
    assert_ne!(
        r2.manifest["optOutSnapshot"]["id"],
        m1["optOutSnapshot"]["id"]
    );
    let p2 = pids(&out.path().join("datasets/ds2"));
    assert!(p2.contains(&key.pseudonym("ds2", "pt-02")));
    assert!(!p2.contains(&key.pseudonym("ds2", "pt-03")));
    // The first extract is unchanged; pseudonyms differ between datasets.
    assert_eq!(pids(&d1), p1);
    assert!(!p2.contains(&key.pseudonym("ds1", "pt-01")));
    // An extraction never overwrites a dataset.
    let store = p.store.clone();
    let cfg = ExtractConfig {
        dataset: "ds1".into(),
        research_dir: out.path().to_path_buf(),
    };
    assert!(tokio::task::block_in_place(|| extract::run(&*store, &cfg, &key, None)).is_err());

    // The linkage service joins the two datasets for an approved project: the
    // same person's pseudonyms share one link id; opted-out pt-03 is left out.
    let n = tokio::task::block_in_place(|| {
        tsunagi_research_primary::cli::link(
            &*store,
            &key,
            "proj-1",
            &["ds1".into(), "ds2".into()],
            out.path(),
        )
    })
    .unwrap();
    assert_eq!(n, 4);
    let cells = all_cells(&out.path().join("linkage"));
    let col = |c: &str| -> Vec<String> {
        cells
            .iter()
            .filter(|(_, k, _)| k == c)
            .map(|(_, _, v)| v.clone())
            .collect()
    };
    let (l, a, b2) = (col("link_id"), col("pid_ds1"), col("pid_ds2"));
    let i = a
        .iter()
        .position(|x| *x == key.pseudonym("ds1", "pt-01"))
        .unwrap();
    assert_eq!(b2[i], key.pseudonym("ds2", "pt-01"));
    assert_eq!(l[i], key.link_id("proj-1", "pt-01"));
    assert!(!a.contains(&key.pseudonym("ds1", "pt-03")));

    // Each extraction is in the primary audit trail with its snapshot.
    let recs = tokio::task::block_in_place(|| {
        store.audit_query(&tsunagi_store::AuditFilter {
            limit: 1000,
            ..Default::default()
        })
    })
    .unwrap();
    let ex: Vec<&Value> = recs
        .iter()
        .map(|e| &e.record)
        .filter(|r| r["action"] == "research-extraction")
        .collect();
    assert_eq!(ex.len(), 2);
    assert!(
        ex.iter()
            .any(|r| r["reason"].as_str().unwrap().contains(snap_id)),
        "{ex:?}"
    );
}

async fn no_identifier_in_any_extract(b: Backend) {
    let Some(p) = Primary::start(b).await else {
        return;
    };
    let people: Vec<_> = (1..=12).map(|n| p.seed_person(n)).collect();
    let key = LinkageKey::from_bytes([9; 32]);
    let out = tempfile::tempdir().unwrap();
    let rep = extract_to(&p, out.path(), "scan", &key);
    let dir = out.path().join("datasets/scan");
    let cells = all_cells(&dir);
    let files: std::collections::BTreeSet<&str> =
        cells.iter().map(|(f, _, _)| f.as_str()).collect();
    assert_eq!(files.len(), 6, "{files:?}");
    assert!(rep.tables.iter().all(|t| t.rows >= 12), "{:?}", rep.tables);
    let forbidden_columns = [
        "id",
        "name",
        "family",
        "given",
        "kana",
        "address",
        "telecom",
        "phone",
        "identifier",
        "insurance",
        "subscriber",
        "card",
        "note",
        "text",
        "performer",
        "requester",
        "author",
        "org",
    ];
    for (file, col, value) in &cells {
        if col == "(column name)" {
            assert!(
                !forbidden_columns.contains(&value.as_str()),
                "{file}: column {value}"
            );
            continue;
        }
        for person in &people {
            for ident in &person.identifiers {
                assert!(
                    !value.contains(ident.as_str()),
                    "{file}.{col} = {value:?} contains identifier {ident:?}"
                );
            }
        }
        if col == "pid" {
            assert_eq!(value.len(), 32, "{file}: pid {value}");
            assert!(value.bytes().all(|c| c.is_ascii_hexdigit()));
        }
    }
    // Coverage (insurance data) is never extracted.
    assert!(!files.iter().any(|f| f.contains("coverage")));
    let manifest = std::fs::read_to_string(dir.join("manifest.json")).unwrap();
    for person in &people {
        for ident in &person.identifiers {
            assert!(
                !manifest.contains(ident.as_str()),
                "manifest contains {ident}"
            );
        }
    }
}
