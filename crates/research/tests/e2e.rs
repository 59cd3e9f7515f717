//! End to end, both backends: clinical records in the primary store (one
//! JP-CLINS Bundle registered through the sharing service's `$register-clins`) →
//! opt-out → extraction → catalogue → applications (marketing rejected, pseudonymised
//! where anonymised suffices rejected) → review → workspace → aggregate query →
//! disclosure control → output check → release; change request re-enters
//! review; every step in the research audit trail.

#[path = "../../research-primary/tests/support/mod.rs"]
mod support;

use std::sync::Arc;

use reqwest::Method;
use serde_json::{Value, json};
use support::{Backend, Primary};
use tsunagi_policy::identity::{OrgKind, Role as PrimaryRole};
use tsunagi_research::Research;
use tsunagi_research::accounts::Role;
use tsunagi_research_primary::LinkageKey;
use tsunagi_research_primary::OptOutService;
use tsunagi_research_primary::extract::{self, ExtractConfig};
use tsunagi_sharing::SharingService;
use tsunagi_testkit::both_backends;
use tsunagi_testkit::{Options, TestServer};

both_backends!(research_end_to_end);

struct Side {
    root: String,
    http: reqwest::Client,
    research: Arc<Research>,
    researcher: String,
    other_researcher: String,
    reviewer: String,
    reviewer_same_org: String,
    checker: String,
    operator: String,
}

impl Side {
    async fn call(&self, m: Method, path: &str, tok: &str, body: Option<Value>) -> (u16, Value) {
        let mut req = self
            .http
            .request(m, format!("{}{path}", self.root))
            .bearer_auth(tok);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let r = req.send().await.expect("request");
        let s = r.status().as_u16();
        (s, r.json().await.unwrap_or(Value::Null))
    }
}

async fn research_side(dir: &std::path::Path) -> Side {
    let research = Research::open(dir).expect("open research");
    let acc = |u: &str, o: &str, r: Role| research.accounts.add(u, o, r).unwrap();
    let researcher = acc("analyst-1", "R0000001", Role::Researcher);
    let other_researcher = acc("analyst-9", "R0000009", Role::Researcher);
    let reviewer = acc("reviewer-1", "review-board", Role::Reviewer);
    let reviewer_same_org = acc("reviewer-2", "R0000001", Role::Reviewer);
    let checker = acc("checker-1", "output-check", Role::Checker);
    let operator = acc("op-1", "operator", Role::Operator);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(axum::serve(listener, tsunagi_research::router(research.clone())).into_future());
    Side {
        root: format!("http://{addr}"),
        http: reqwest::Client::new(),
        research,
        researcher,
        other_researcher,
        reviewer,
        reviewer_same_org,
        checker,
        operator,
    }
}

fn application(title: &str, purpose: &str, form: &str) -> Value {
    json!({
        "title": title,
        "purpose": purpose,
        "category": "public-health",
        "form": form,
        "scope": {
            "dataset": "clinical-2026",
            "tables": {
                "patient": ["pid", "sex", "birth_date"],
                "observation": ["pid", "code", "effective_date", "value_num", "value_unit"]
            },
            "period": {"from": "2026-01-01", "to": "2026-12-31"}
        },
        "analysisPlan": "体重と血圧の性別・年代別分布",
        "software": ["R 4.4"],
        "months": 6
    })
}

/// The primary server with the opt-out module and the EHR sharing service.
async fn primary_with_sharing(b: Backend) -> Option<Primary> {
    let opts = Options::default()
        .service(|_| Arc::new(OptOutService))
        .service(|ctx| {
            let clock: Arc<dyn tsunagi_sharing::Clock> = ctx.clock.clone();
            Arc::new(SharingService::with_clock(Default::default(), clock))
        });
    TestServer::start_with(b, opts).await.map(Primary)
}

async fn research_end_to_end(b: Backend) {
    let Some(p) = primary_with_sharing(b).await else {
        return;
    };
    // 30 persons: pt-03, pt-06, ... are male (10), the others female (20).
    for n in 1..=30 {
        p.seed_person(n);
    }
    // A hospital registers the official JP-CLINS lab Bundle (four results of
    // 2021-07-05) for pt-01 through the sharing service.
    let example = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../../shared/fixtures/jp-examples/clinical-core/Bundle-Bundle-CLINS-Observations-Example-01.json"
    );
    let bundle: Value = serde_json::from_slice(&std::fs::read(example).unwrap()).unwrap();
    let clins_hospital = "1318814790"; // the examples' institution number
    let r = p
        .post(
            &p.token_2fa(clins_hospital, OrgKind::Hospital, PrimaryRole::Doctor, true),
            "/fhir/$register-clins?patient=pt-01",
            &bundle,
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    // pt-03 (a man) opts out through the primary side's self-service endpoint.
    let (s, _) = p
        .call(
            Method::POST,
            "/fhir/$research-opt-out",
            &p.patient_token("pt-03"),
        )
        .await;
    assert_eq!(s, 200);

    let rdir = tempfile::tempdir().unwrap();
    let key = LinkageKey::from_bytes([3; 32]);
    let store = p.store.clone();
    let cfg = ExtractConfig {
        dataset: "clinical-2026".into(),
        research_dir: rdir.path().to_path_buf(),
    };
    let rep = tokio::task::block_in_place(|| extract::run(&*store, &cfg, &key, None)).unwrap();
    assert_eq!(rep.manifest["persons"], 29);

    let r = research_side(rdir.path()).await;
    // The research side never got the key or the store: only the data directory.
    assert!(!rdir.path().join("linkage.key").exists());

    // Catalogue, to anyone authenticated; nobody else.
    let (s, cat) = r
        .call(Method::GET, "/research/catalog", &r.other_researcher, None)
        .await;
    assert_eq!(s, 200, "{cat}");
    let ds = &cat["datasets"][0];
    assert_eq!(ds["dataset"], "clinical-2026");
    let obs = ds["tables"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"] == "observation")
        .unwrap();
    // 2 seeded results × 29 persons, plus the 4 registered through the sharing service
    assert_eq!(obs["rows"], 62);
    assert_eq!(obs["coverage"]["from"], "2021-07-05");
    assert!(
        obs["columns"]
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c["name"] == "value_num" && c["meaning"].as_str().is_some())
    );
    let (s, _) = r
        .call(Method::GET, "/research/catalog", "rs_bogus", None)
        .await;
    assert_eq!(s, 401);

    // A marketing purpose is rejected on submission, with the reason recorded.
    let (s, m) = r
        .call(
            Method::POST,
            "/research/applications",
            &r.researcher,
            Some(application(
                "新薬の販売促進",
                "自社製品のマーケティングに利用する",
                "pseudonymised",
            )),
        )
        .await;
    assert_eq!(s, 201, "{m}");
    assert_eq!(m["status"], "rejected");
    assert_eq!(m["decisions"][0]["by"], "screening");
    assert!(
        m["decisions"][0]["reason"]
            .as_str()
            .unwrap()
            .contains("marketing")
    );

    // A category outside the configured list is a 400 naming the element.
    let mut bad = application("t", "p", "pseudonymised");
    bad["category"] = json!("profit");
    let (s, oo) = r
        .call(
            Method::POST,
            "/research/applications",
            &r.researcher,
            Some(bad),
        )
        .await;
    assert_eq!(s, 400);
    assert_eq!(oo["issue"][0]["expression"][0], "category", "{oo}");
    let mut bad = application("t", "p", "pseudonymised");
    bad["scope"]["tables"]["patient"] = json!(["pid", "name"]);
    let (s, oo) = r
        .call(
            Method::POST,
            "/research/applications",
            &r.researcher,
            Some(bad),
        )
        .await;
    assert_eq!(s, 400);
    assert_eq!(
        oo["issue"][0]["expression"][0], "scope.tables.patient",
        "{oo}"
    );

    // Pseudonymised data asked for where anonymised suffices: rejected.
    let (_, a1) = r
        .call(
            Method::POST,
            "/research/applications",
            &r.researcher,
            Some(application("年代別体重統計", "統計の作成", "pseudonymised")),
        )
        .await;
    let id1 = a1["id"].as_str().unwrap().to_string();
    let (s, d) = r
        .call(
            Method::POST,
            &format!("/research/applications/{id1}/decisions"),
            &r.reviewer,
            Some(
                json!({"decision": "approve", "reason": "公益性あり", "anonymisedSuffices": true}),
            ),
        )
        .await;
    assert_eq!(s, 200, "{d}");
    assert_eq!(d["status"], "rejected");
    assert!(
        d["decisions"][0]["reason"]
            .as_str()
            .unwrap()
            .contains("anonymised")
    );

    // The real application: fees itemised.
    let (s, a) = r
        .call(
            Method::POST,
            "/research/applications",
            &r.researcher,
            Some(application(
                "生活習慣病の体重と血圧",
                "公衆衛生の向上のための分析",
                "pseudonymised",
            )),
        )
        .await;
    assert_eq!(s, 201, "{a}");
    assert_eq!(a["status"], "under-review");
    let id = a["id"].as_str().unwrap().to_string();
    let f = &a["fees"];
    assert_eq!(f["basic"], 100_000);
    assert_eq!(f["cloud"], 6 * 80_000);
    assert_eq!(f["data"], 2 * 20_000 + 10_000);
    assert_eq!(
        f["total"].as_u64().unwrap(),
        ["basic", "coordination", "data", "cloud"]
            .iter()
            .map(|k| f[k].as_u64().unwrap())
            .sum::<u64>()
    );
    // Other organisations cannot see it; no query before approval.
    let (s, _) = r
        .call(
            Method::GET,
            &format!("/research/applications/{id}"),
            &r.other_researcher,
            None,
        )
        .await;
    assert_eq!(s, 404);
    let q = json!({"sql": "SELECT pid FROM patient", "groupBy": []});
    let (s, _) = r
        .call(
            Method::POST,
            &format!("/research/projects/{id}/queries"),
            &r.researcher,
            Some(q.clone()),
        )
        .await;
    assert_eq!(s, 409);

    // Review: decisions need reasons; no reviewing one's own organisation; researchers cannot decide.
    let path = format!("/research/applications/{id}/decisions");
    let (s, oo) = r
        .call(
            Method::POST,
            &path,
            &r.reviewer,
            Some(json!({"decision": "approve", "reason": " "})),
        )
        .await;
    assert_eq!(
        (s, oo["issue"][0]["expression"][0].as_str()),
        (400, Some("reason"))
    );
    let (s, _) = r
        .call(
            Method::POST,
            &path,
            &r.reviewer_same_org,
            Some(json!({"decision": "approve", "reason": "ok"})),
        )
        .await;
    assert_eq!(s, 403);
    let (s, _) = r
        .call(
            Method::POST,
            &path,
            &r.researcher,
            Some(json!({"decision": "approve", "reason": "ok"})),
        )
        .await;
    assert_eq!(s, 403);
    let (s, d) = r
        .call(
            Method::POST,
            &path,
            &r.reviewer,
            Some(json!({
        "decision": "approve-with-conditions", "reason": "公益性・安全管理とも適切",
        "conditions": ["成果公表前に事務局へ報告"]})),
        )
        .await;
    assert_eq!(s, 200, "{d}");
    assert_eq!(d["status"], "approved-with-conditions");
    assert_eq!(d["workspace"]["observation"], 58);

    // The public register lists it (not the rejected ones).
    let (_, reg) = r
        .call(Method::GET, "/research/register", &r.other_researcher, None)
        .await;
    let uses = reg["approvedUses"].as_array().unwrap();
    assert_eq!(uses.len(), 1, "{reg}");
    assert_eq!(uses[0]["id"], id.as_str());
    assert_eq!(uses[0]["conditions"][0], "成果公表前に事務局へ報告");

    // Query: mean body weight by sex. 9 men remain (< 10) → suppressed, and the
    // women with them (secondary), so the men cannot be recovered from the total.
    let qpath = format!("/research/projects/{id}/queries");
    let q = json!({
        "sql": "SELECT o.pid, p.sex, o.value_num FROM observation o JOIN patient p ON o.pid = p.pid WHERE o.code = '29463-7'",
        "groupBy": ["sex"],
        "measures": [{"fn": "avg", "column": "value_num"}]
    });
    let (s, out) = r.call(Method::POST, &qpath, &r.researcher, Some(q)).await;
    assert_eq!(s, 202, "{out}");
    assert_eq!(out["status"], "pending-check");
    assert_eq!(out["unit"], "persons");
    assert_eq!(out["suppressed"], json!({"primary": 1, "secondary": 1}));
    assert!(out.get("table").is_none());
    let oid = out["id"].as_str().unwrap().to_string();
    // Before the check, the analyst sees the status only.
    let (s, v) = r
        .call(
            Method::GET,
            &format!("/research/outputs/{oid}"),
            &r.researcher,
            None,
        )
        .await;
    assert_eq!(s, 200);
    assert!(v.get("table").is_none(), "{v}");
    // The checker sees the protected table.
    let (_, v) = r
        .call(
            Method::GET,
            &format!("/research/outputs/{oid}"),
            &r.checker,
            None,
        )
        .await;
    let rows = v["table"]["rows"].as_array().unwrap();
    let find = |k: &str| rows.iter().find(|x| x["key"][0] == k).unwrap();
    assert_eq!(find("male")["count"], Value::Null);
    assert_eq!(find("male")["suppressed"], "primary");
    assert_eq!(find("female")["suppressed"], "secondary");
    assert_eq!(find("female")["measures"][0], Value::Null);
    assert_eq!(find("(total)")["count"], 29);
    // The analyst cannot check their own output; the checker releases.
    let (s, _) = r
        .call(
            Method::POST,
            &format!("/research/outputs/{oid}/decision"),
            &r.researcher,
            Some(json!({"decision": "release", "reason": "x"})),
        )
        .await;
    assert_eq!(s, 403);
    let (s, _) = r
        .call(
            Method::POST,
            &format!("/research/outputs/{oid}/decision"),
            &r.checker,
            Some(json!({"decision": "release", "reason": "SDC 済み、公表可"})),
        )
        .await;
    assert_eq!(s, 200);
    let (_, v) = r
        .call(
            Method::GET,
            &format!("/research/outputs/{oid}"),
            &r.researcher,
            None,
        )
        .await;
    assert_eq!(v["status"], "released");
    assert_eq!(v["table"]["rows"].as_array().unwrap().len(), 3);

    // A large enough cell is published with its measure.
    let q = json!({"sql": "SELECT pid, code, value_num FROM observation", "groupBy": ["code"],
                   "measures": [{"fn": "avg", "column": "value_num"}]});
    let (s, out) = r.call(Method::POST, &qpath, &r.researcher, Some(q)).await;
    assert_eq!(
        (s, &out["suppressed"]),
        (202, &json!({"primary": 0, "secondary": 0})),
        "{out}"
    );
    let oid2 = out["id"].as_str().unwrap();
    let (_, v) = r
        .call(
            Method::GET,
            &format!("/research/outputs/{oid2}"),
            &r.checker,
            None,
        )
        .await;
    let w = v["table"]["rows"]
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["key"][0] == "29463-7")
        .unwrap()
        .clone();
    assert_eq!(w["count"], 29);
    assert!(w["measures"][0].as_f64().unwrap() > 45.0);

    // Row-level attempts: grouping by person hides every cell; no min/max; no DDL/DML;
    // nothing outside the approval (medication tables, unapproved columns).
    let (s, out) = r
        .call(
            Method::POST,
            &qpath,
            &r.researcher,
            Some(json!({"sql": "SELECT pid, value_num FROM observation", "groupBy": ["pid"]})),
        )
        .await;
    assert_eq!(s, 202);
    assert_eq!(out["suppressed"]["primary"].as_u64().unwrap(), 29); // one cell per person
    for (body, field) in [
        (
            json!({"sql": "SELECT pid, value_num FROM observation", "measures": [{"fn": "max", "column": "value_num"}]}),
            "measures[0].fn",
        ),
        (
            json!({"sql": "CREATE TABLE x AS SELECT * FROM patient"}),
            "sql",
        ),
        (json!({"sql": "COPY patient TO '/tmp/leak.parquet'"}), "sql"),
        (json!({"sql": "SELECT pid FROM medication_request"}), "sql"),
        (
            json!({"sql": "SELECT pid, display FROM observation"}),
            "sql",
        ),
        (
            json!({"sql": "SELECT pid FROM patient", "groupBy": ["sex"]}),
            "groupBy[0]",
        ),
    ] {
        let (s, oo) = r
            .call(Method::POST, &qpath, &r.researcher, Some(body.clone()))
            .await;
        assert_eq!(s, 400, "{body} → {oo}");
        assert_eq!(oo["issue"][0]["expression"][0], field, "{body} → {oo}");
    }
    assert!(!std::path::Path::new("/tmp/leak.parquet").exists());
    // Another organisation's analyst cannot use the project.
    let (s, _) = r
        .call(
            Method::POST,
            &qpath,
            &r.other_researcher,
            Some(json!({"sql": "SELECT pid FROM patient"})),
        )
        .await;
    assert_eq!(s, 404);

    // A change request re-enters review and closes the workspace until approved again.
    let (s, c) = r
        .call(
            Method::POST,
            &format!("/research/applications/{id}/changes"),
            &r.researcher,
            Some(json!({
        "reason": "期間の延長", "months": 12})),
        )
        .await;
    assert_eq!(s, 200, "{c}");
    assert_eq!(
        (c["status"].as_str(), c["revision"].as_u64()),
        (Some("under-review"), Some(2))
    );
    assert_eq!(c["fees"]["cloud"], 12 * 80_000);
    let (s, _) = r
        .call(
            Method::POST,
            &qpath,
            &r.researcher,
            Some(json!({"sql": "SELECT pid FROM patient"})),
        )
        .await;
    assert_eq!(s, 409);
    let (s, d) = r
        .call(
            Method::POST,
            &path,
            &r.reviewer,
            Some(json!({"decision": "approve", "reason": "変更妥当"})),
        )
        .await;
    assert_eq!((s, d["status"].as_str()), (200, Some("approved")));
    let (s, _) = r
        .call(
            Method::POST,
            &qpath,
            &r.researcher,
            Some(json!({"sql": "SELECT pid FROM patient"})),
        )
        .await;
    assert_eq!(s, 202);

    // Anonymised form: birth dates become year/month and k-anonymity is checked on
    // approval; every person here has a distinct birth month, so k = 1 < 5: refused.
    let (_, an) = r
        .call(
            Method::POST,
            "/research/applications",
            &r.researcher,
            Some(application("年代別分析", "統計の作成", "anonymised")),
        )
        .await;
    let aid = an["id"].as_str().unwrap().to_string();
    let (s, oo) = r
        .call(
            Method::POST,
            &format!("/research/applications/{aid}/decisions"),
            &r.reviewer,
            Some(json!({"decision": "approve", "reason": "ok"})),
        )
        .await;
    assert_eq!(s, 409, "{oo}");
    assert!(
        oo["issue"][0]["diagnostics"]
            .as_str()
            .unwrap()
            .contains("k-anonymity 1"),
        "{oo}"
    );
    let (_, an) = r
        .call(
            Method::GET,
            &format!("/research/applications/{aid}"),
            &r.researcher,
            None,
        )
        .await;
    assert_eq!(an["status"], "under-review");
    // Without the birth date the anonymised workspace opens; dates are shifted per person.
    let mut body = application("性別分析", "統計の作成", "anonymised");
    body["scope"]["tables"]["patient"] = json!(["pid", "sex"]);
    let (_, an) = r
        .call(
            Method::POST,
            "/research/applications",
            &r.researcher,
            Some(body),
        )
        .await;
    let aid = an["id"].as_str().unwrap().to_string();
    let (s, d) = r
        .call(
            Method::POST,
            &format!("/research/applications/{aid}/decisions"),
            &r.reviewer,
            Some(json!({"decision": "approve", "reason": "ok"})),
        )
        .await;
    assert_eq!((s, d["status"].as_str()), (200, Some("approved")), "{d}");
    let (s, out) = r.call(Method::POST, &format!("/research/projects/{aid}/queries"), &r.researcher, Some(json!({
        "sql": "SELECT o.pid, p.sex FROM observation o JOIN patient p ON o.pid = p.pid", "groupBy": ["sex"]}))).await;
    assert_eq!(
        (s, &out["suppressed"]["primary"]),
        (202, &json!(1)),
        "{out}"
    );

    // Every query, output and decision is in the research audit trail, and the chain holds.
    let (s, v) = r
        .call(Method::GET, "/research/audit", &r.operator, None)
        .await;
    assert_eq!(s, 200);
    let recs: Vec<&Value> = v["records"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| &x["record"])
        .collect();
    let count = |a: &str| recs.iter().filter(|x| x["action"] == a).count();
    assert!(count("query-submitted") >= 10);
    assert!(recs.iter().any(|x| x["action"] == "query-submitted"
        && x["detail"]["sql"].as_str().unwrap().starts_with("COPY")));
    assert!(count("output-check") >= 2);
    assert!(count("application-decision") >= 5);
    assert!(
        recs.iter()
            .any(|x| x["action"] == "catalog-read" && x["outcome"] == "denied")
    );
    let (s, _) = r
        .call(Method::GET, "/research/audit", &r.researcher, None)
        .await;
    assert_eq!(s, 403);
    tsunagi_research::audit::verify(r.research.audit.path()).expect("chain");
}
