//! Black-box tests of coverage registration, `$eligibility` and bulk coverage
//! import, over HTTP against a real server, on both backends: SQLite in a temporary
//! directory, and PostgreSQL in a fresh schema when `TSUNAGI_TEST_PG` is set (a
//! visible SKIPPED line otherwise).

use std::sync::Arc;

use serde_json::{Value, json};
use tsunagi_eligibility::bulk::{self, Format, ImportOptions, synth};
use tsunagi_eligibility::coverage::{current_coverage, person_id};
use tsunagi_eligibility::{Config, EligibilityService};
use tsunagi_policy::Policy;
use tsunagi_policy::identity::{OrgKind, Principal, Role};
use tsunagi_server::{AppState, ServerConfig};
use tsunagi_store::postgres::PgStore;
use tsunagi_store::sqlite::SqliteStore;
use tsunagi_store::{Scope, Store};

const HOSP: &str = "1310123458";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Backend {
    Sqlite,
    Postgres,
}

struct Server {
    root: String,
    state: AppState,
    store: Arc<dyn Store>,
    http: reqwest::Client,
    pg: Option<(Arc<PgStore>, String)>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    dir: tempfile::TempDir,
}

struct Resp {
    status: u16,
    body: Value,
    text: String,
}

fn ins_a() -> String {
    synth::insurer_number(101)
}
fn ins_b() -> String {
    synth::insurer_number(202)
}

impl Server {
    async fn start(backend: Backend, test: &str) -> Option<Server> {
        let dir = tempfile::tempdir().unwrap();
        let (store, pg): (Arc<dyn Store>, _) = match backend {
            Backend::Sqlite => (
                Arc::new(SqliteStore::open(&dir.path().join("tsunagi.db")).unwrap()),
                None,
            ),
            Backend::Postgres => {
                let url = tsunagi_store::conformance::test_pg_url(&format!("variant of {test}"))?;
                let schema = tsunagi_store::conformance::fresh_schema("tsunagi_elig");
                let s2 = schema.clone();
                let pg =
                    tokio::task::spawn_blocking(move || PgStore::connect_in_schema(&url, &s2, 4))
                        .await
                        .unwrap()
                        .expect("connect to TSUNAGI_TEST_PG");
                let pg = Arc::new(pg);
                (pg.clone() as Arc<dyn Store>, Some((pg, schema)))
            }
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let config = ServerConfig {
            data_dir: dir.path().to_path_buf(),
            listen: addr,
            base_url: Some(format!("http://{addr}/fhir")),
            shutdown_grace_secs: 0,
            ..ServerConfig::default()
        };
        let state = tsunagi_server::Builder::new(config, store.clone())
            .service(Arc::new(EligibilityService::new(Config::default())))
            .build()
            .unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(tsunagi_server::serve(state.clone(), listener, async {
            let _ = rx.await;
        }));
        Some(Server {
            root: format!("http://{addr}"),
            state,
            store,
            http: reqwest::Client::new(),
            pg,
            shutdown: Some(tx),
            dir,
        })
    }

    fn token(&self, org: &str, kind: OrgKind, role: Role) -> String {
        let p = Principal::new(
            org,
            kind,
            vec![],
            role,
            Some(format!("{role}-user")),
            None,
            false,
        )
        .unwrap();
        self.state
            .keys
            .issue(&p, chrono::Duration::minutes(10))
            .unwrap()
    }
    fn insurer(&self, code: &str) -> String {
        self.token(code, OrgKind::Insurer, Role::InsurerStaff)
    }
    fn clerk(&self) -> String {
        self.token(HOSP, OrgKind::Hospital, Role::Clerk)
    }
    fn doctor(&self) -> String {
        self.token(HOSP, OrgKind::Hospital, Role::Doctor)
    }

    async fn send(&self, rb: reqwest::RequestBuilder) -> Resp {
        let r = rb.send().await.expect("request");
        let status = r.status().as_u16();
        let text = r.text().await.unwrap_or_default();
        Resp {
            status,
            body: serde_json::from_str(&text).unwrap_or(Value::Null),
            text,
        }
    }
    async fn post(&self, token: &str, path: &str, body: &Value) -> Resp {
        self.send(
            self.http
                .post(format!("{}{path}", self.root))
                .bearer_auth(token)
                .header("content-type", "application/fhir+json")
                .body(serde_json::to_vec(body).unwrap()),
        )
        .await
    }
    async fn get(&self, token: &str, path: &str) -> Resp {
        self.send(
            self.http
                .get(format!("{}{path}", self.root))
                .bearer_auth(token),
        )
        .await
    }
    async fn register(&self, token: &str, fields: &Value) -> Resp {
        self.post(token, "/fhir/$register-coverage", &params(fields))
            .await
    }
    async fn eligibility(&self, fields: &Value) -> Resp {
        let r = self
            .post(&self.clerk(), "/fhir/$eligibility", &params(fields))
            .await;
        assert_eq!(r.status, 200, "{}", r.text);
        r
    }
    fn blocking<T>(&self, f: impl FnOnce(&dyn Store) -> T) -> T {
        tokio::task::block_in_place(|| f(&*self.store))
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some((pg, schema)) = self.pg.take() {
            let _ = std::thread::spawn(move || {
                let _ = pg.raw_execute(&format!("DROP SCHEMA IF EXISTS {schema} CASCADE"));
                std::mem::forget(pg);
            })
            .join();
        }
    }
}

/// A Parameters resource of string parts.
fn params(fields: &Value) -> Value {
    let parts: Vec<Value> = fields
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, v)| json!({"name": k, "valueString": v.as_str().map(str::to_string).unwrap_or(v.to_string())}))
        .collect();
    json!({"resourceType": "Parameters", "parameter": parts})
}

fn person(link: &str, insurer: &str, number: &str) -> Value {
    json!({
        "linkageId": link, "insurerNumber": insurer, "symbol": "記号1", "number": number, "branch": "00",
        "relationship": "self", "copayPercent": "30", "start": "2024-04-01", "limitCategory": "ウ",
        "familyName": "山田", "givenName": "花子", "familyNameKana": "ヤマダ", "givenNameKana": "ハナコ",
        "gender": "female", "birthDate": "1985-06-15", "postalCode": "100-0001", "address": "東京都千代田区千代田1-1"
    })
}

fn with(mut v: Value, k: &str, val: &str) -> Value {
    v[k] = json!(val);
    v
}

fn param<'a>(p: &'a Value, name: &str) -> Option<&'a Value> {
    p["parameter"]
        .as_array()?
        .iter()
        .find(|x| x["name"] == name)
}

fn eligibility_query(insurer: &str, number: &str, birth: &str) -> Value {
    json!({"insurerNumber": insurer, "symbol": "記号1", "number": number, "branch": "00", "birthDate": birth})
}

fn search_total(r: &Resp) -> usize {
    r.body["entry"]
        .as_array()
        .map(|e| e.iter().filter(|x| x["search"]["mode"] == "match").count())
        .unwrap_or(0)
}

async fn registration_validation(b: Backend) {
    let Some(s) = Server::start(b, "registration_validation").await else {
        return;
    };
    let a = s.insurer(&ins_a());
    // bad check digit of the 保険者番号
    let mut bad = ins_a();
    let last = bad.pop().unwrap();
    bad.push(if last == '9' {
        '0'
    } else {
        (last as u8 + 1) as char
    });
    let r = s.register(&a, &person("L1", &bad, "1001")).await;
    assert_eq!(r.status, 400, "{}", r.text);
    assert_eq!(r.body["resourceType"], "OperationOutcome");
    assert!(
        r.body["issue"]
            .as_array()
            .unwrap()
            .iter()
            .any(
                |i| i["expression"][0] == "Coverage.payor[0].identifier.value"
                    && i["diagnostics"]
                        .as_str()
                        .unwrap_or_default()
                        .contains("check digit")
            ),
        "{}",
        r.text
    );
    // bad 枝番
    let r = s
        .register(&a, &with(person("L1", &ins_a(), "1001"), "branch", "1"))
        .await;
    assert_eq!(r.status, 400, "{}", r.text);
    assert_eq!(
        r.body["issue"][0]["expression"][0], "Coverage.dependent",
        "{}",
        r.text
    );
    // several errors at once, each naming its element
    let r = s
        .register(
            &a,
            &with(
                with(person("L1", &ins_a(), "1001"), "copayPercent", "25"),
                "birthDate",
                "1985-13-01",
            ),
        )
        .await;
    assert_eq!(r.status, 400);
    let exprs: Vec<&str> = r.body["issue"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|i| i["expression"][0].as_str())
        .collect();
    assert!(
        exprs.contains(&"Coverage.costToBeneficiary[0].valueQuantity.value")
            && exprs.contains(&"Patient.birthDate"),
        "{exprs:?}"
    );
    // another insurer's number: 403
    let r = s.register(&a, &person("L1", &ins_b(), "1001")).await;
    assert_eq!(r.status, 403, "{}", r.text);
    // a clerk may not register
    let r = s
        .register(&s.clerk(), &person("L1", &ins_a(), "1001"))
        .await;
    assert_eq!(r.status, 403, "{}", r.text);
    // nothing was written by the refused requests
    assert!(
        s.blocking(|st| st.read("Patient", &person_id("L1")).unwrap())
            .is_none()
    );
    // success: 201, then idempotent 200
    let r = s.register(&a, &person("L1", &ins_a(), "1001")).await;
    assert_eq!(r.status, 201, "{}", r.text);
    let cov = &param(&r.body, "coverage").unwrap()["resource"];
    assert_eq!(cov["dependent"], "00");
    assert_eq!(cov["payor"][0]["identifier"]["value"], ins_a().as_str());
    assert_eq!(
        cov["identifier"][0]["value"],
        format!("{}:記号1:1001:00", ins_a())
    );
    assert_eq!(cov["costToBeneficiary"][0]["valueQuantity"]["value"], 30);
    assert_eq!(cov["period"]["start"], "2024-04-01");
    assert!(
        cov["extension"]
            .to_string()
            .contains("JP_Coverage_InsuredPersonSymbol")
    );
    assert!(cov["extension"].to_string().contains("\"code\":\"u\""));
    let pat = &param(&r.body, "patient").unwrap()["resource"];
    assert_eq!(pat["identifier"][0]["value"], "L1");
    assert_eq!(pat["name"][1]["family"], "ヤマダ");
    let pid = pat["id"].as_str().unwrap().to_string();
    let r2 = s.register(&a, &person("L1", &ins_a(), "1001")).await;
    assert_eq!(r2.status, 200, "{}", r2.text);
    // the registering insurer sees the person and its coverage
    assert_eq!(s.get(&a, &format!("/fhir/Patient/{pid}")).await.status, 200);
    let r = s
        .get(&a, &format!("/fhir/Coverage?beneficiary=Patient/{pid}"))
        .await;
    assert_eq!(search_total(&r), 1, "{}", r.text);
    // a changed address updates the person
    let r = s
        .register(
            &a,
            &with(
                person("L1", &ins_a(), "1001"),
                "address",
                "大阪府大阪市北区1-1",
            ),
        )
        .await;
    assert_eq!(r.status, 200);
    let p = s.get(&a, &format!("/fhir/Patient/{pid}")).await;
    assert_eq!(p.body["address"][0]["text"], "大阪府大阪市北区1-1");
    assert_eq!(p.body["meta"]["versionId"], "2");
    // audited, purpose insurer
    let ev = s.blocking(|st| {
        st.audit_query(&tsunagi_store::AuditFilter {
            patient: Some(pid.clone()),
            ..Default::default()
        })
        .unwrap()
    });
    assert!(
        ev.iter()
            .any(|e| e.record["action"] == "register-coverage" && e.record["purpose"] == "insurer")
    );
}

async fn change_of_insurer(b: Backend) {
    let Some(s) = Server::start(b, "change_of_insurer").await else {
        return;
    };
    let (a, bt) = (s.insurer(&ins_a()), s.insurer(&ins_b()));
    let r = s.register(&a, &person("L2", &ins_a(), "2001")).await;
    assert_eq!(r.status, 201);
    let cov_a = param(&r.body, "coverage").unwrap()["resource"]["id"]
        .as_str()
        .unwrap()
        .to_string();
    let pid = person_id("L2");
    // A ends its coverage (資格喪失日), B registers the same person
    let ended = with(person("L2", &ins_a(), "2001"), "end", "2025-03-31");
    assert_eq!(s.register(&a, &ended).await.status, 200);
    let r = s
        .register(
            &bt,
            &with(
                with(person("L2", &ins_b(), "B-77"), "start", "2025-04-01"),
                "address",
                "神奈川県横浜市1",
            ),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.text);
    assert_eq!(
        param(&r.body, "patient").unwrap()["resource"]["id"],
        pid.as_str()
    );
    assert_eq!(
        param(&r.body, "patientCreated").unwrap()["valueBoolean"],
        false
    );
    let cov_b = param(&r.body, "coverage").unwrap()["resource"]["id"]
        .as_str()
        .unwrap()
        .to_string();
    // one person, two coverages: the history
    let all = s.blocking(|st| {
        let q = tsunagi_fhir::query::parse(
            "Coverage",
            &[("beneficiary".into(), format!("Patient/{pid}"))],
        )
        .unwrap();
        st.search(&q, &Scope::Unrestricted).unwrap().total
    });
    assert_eq!(all, 2);
    let persons = s.blocking(|st| {
        let q = tsunagi_fhir::query::parse(
            "Patient",
            &[(
                "identifier".into(),
                "https://tsunagi.dev/fhir/NamingSystem/person-link|L2".into(),
            )],
        )
        .unwrap();
        st.search(&q, &Scope::Unrestricted).unwrap().total
    });
    assert_eq!(persons, 1);
    // the current coverage (B's) for reception
    let today = chrono::NaiveDate::from_ymd_opt(2026, 1, 10).unwrap();
    let cur = s.blocking(|st| current_coverage(st, &pid, today).unwrap());
    assert_eq!(cur.len(), 1);
    assert_eq!(cur[0]["id"], cov_b.as_str());
    // each insurer sees only its own coverage; the person is now B's member
    let r = s
        .get(&a, &format!("/fhir/Coverage?beneficiary=Patient/{pid}"))
        .await;
    assert_eq!(search_total(&r), 1);
    assert_eq!(r.body["entry"][0]["resource"]["id"], cov_a.as_str());
    let r = s
        .get(&bt, &format!("/fhir/Coverage?beneficiary=Patient/{pid}"))
        .await;
    assert_eq!(search_total(&r), 1);
    assert_eq!(r.body["entry"][0]["resource"]["id"], cov_b.as_str());
    assert_eq!(
        s.get(&bt, &format!("/fhir/Coverage/{cov_a}")).await.status,
        403
    );
    assert_eq!(
        s.get(&a, &format!("/fhir/Coverage/{cov_b}")).await.status,
        403
    );
    assert_eq!(
        s.get(&bt, &format!("/fhir/Patient/{pid}")).await.status,
        200
    );
    // the former insurer no longer sees the person's (new) address
    let r = s.get(&a, &format!("/fhir/Patient/{pid}")).await;
    assert_eq!(r.status, 403, "{}", r.text);
    assert!(!r.text.contains("横浜"));
    // A re-sending its ended coverage does not take the person back
    assert_eq!(s.register(&a, &ended).await.status, 200);
    assert_eq!(
        s.get(&bt, &format!("/fhir/Patient/{pid}")).await.status,
        200
    );
    // B may not modify A's coverage through the REST API either
    let mut c = s.get(&a, &format!("/fhir/Coverage/{cov_a}")).await.body;
    c["status"] = json!("cancelled");
    let r = s
        .send(
            s.http
                .put(format!("{}/fhir/Coverage/{cov_a}", s.root))
                .bearer_auth(&bt)
                .header("content-type", "application/fhir+json")
                .body(serde_json::to_vec(&c).unwrap()),
        )
        .await;
    assert_eq!(r.status, 403, "{}", r.text);
}

async fn insurers_isolated(b: Backend) {
    let Some(s) = Server::start(b, "insurers_isolated").await else {
        return;
    };
    let (a, bt) = (s.insurer(&ins_a()), s.insurer(&ins_b()));
    assert_eq!(
        s.register(&a, &person("LA", &ins_a(), "3001")).await.status,
        201
    );
    assert_eq!(
        s.register(&bt, &person("LB", &ins_b(), "3002"))
            .await
            .status,
        201
    );
    let r = s.get(&a, "/fhir/Coverage").await;
    assert_eq!(search_total(&r), 1);
    assert!(!r.text.contains("3002"));
    let r = s.get(&a, "/fhir/Patient").await;
    assert_eq!(search_total(&r), 1);
    assert_eq!(
        r.body["entry"][0]["resource"]["id"],
        person_id("LA").as_str()
    );
    assert_eq!(
        s.get(&a, &format!("/fhir/Patient/{}", person_id("LB")))
            .await
            .status,
        403
    );
    let r = s
        .get(
            &a,
            &format!(
                "/fhir/Coverage?_include=Coverage:beneficiary&identifier={}:記号1:3002:00",
                ins_b()
            ),
        )
        .await;
    assert_eq!(
        r.body["entry"].as_array().map(|e| e.len()).unwrap_or(0),
        0,
        "{}",
        r.text
    );
}

async fn eligibility_answers(b: Backend) {
    let Some(s) = Server::start(b, "eligibility_answers").await else {
        return;
    };
    let a = s.insurer(&ins_a());
    assert_eq!(
        s.register(&a, &person("E1", &ins_a(), "4001")).await.status,
        201
    );
    assert_eq!(
        s.register(
            &a,
            &with(person("E2", &ins_a(), "4002"), "end", "2025-09-30")
        )
        .await
        .status,
        201
    );
    // a doctor writes a clinical record for E1
    let pid = person_id("E1");
    let cond = json!({"resourceType": "Condition", "subject": {"reference": format!("Patient/{pid}")},
        "code": {"text": "２型糖尿病"}, "clinicalStatus": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/condition-clinical", "code": "active"}]}});
    let r = s.post(&s.doctor(), "/fhir/Condition", &cond).await;
    assert_eq!(r.status, 201, "{}", r.text);
    // found
    let r = s
        .eligibility(&eligibility_query(&ins_a(), "4001", "1985-06-15"))
        .await;
    assert_eq!(
        param(&r.body, "eligible").unwrap()["valueBoolean"],
        true,
        "{}",
        r.text
    );
    assert_eq!(param(&r.body, "status").unwrap()["valueCode"], "eligible");
    let cov = &param(&r.body, "coverage").unwrap()["resource"];
    assert_eq!(cov["resourceType"], "Coverage");
    let p = &param(&r.body, "patient").unwrap()["resource"];
    assert_eq!(p["id"], pid.as_str());
    assert_eq!(p["name"][0]["family"], "山田");
    assert_eq!(p["name"][1]["family"], "ヤマダ");
    assert_eq!(p["gender"], "female");
    assert_eq!(p["birthDate"], "1985-06-15");
    // eligibility only: no clinical data, not even the address or linkage id
    assert!(
        !r.text.contains("Condition") && !r.text.contains("糖尿病"),
        "{}",
        r.text
    );
    assert!(p.get("address").is_none() && p.get("identifier").is_none());
    // ... and the clerk cannot read the clinical record otherwise
    let r2 = s
        .get(
            &s.clerk(),
            &format!("/fhir/Condition?subject=Patient/{pid}"),
        )
        .await;
    assert_eq!(r2.status, 403, "{}", r2.text);
    // on a given date
    let mut q = eligibility_query(&ins_a(), "4001", "1985-06-15");
    q["date"] = json!("2024-03-31");
    let r = s.eligibility(&q).await;
    assert_eq!(
        param(&r.body, "status").unwrap()["valueCode"],
        "not-started"
    );
    // ended
    let mut q = eligibility_query(&ins_a(), "4002", "1985-06-15");
    q["date"] = json!("2026-01-05");
    let r = s.eligibility(&q).await;
    assert_eq!(param(&r.body, "eligible").unwrap()["valueBoolean"], false);
    assert_eq!(param(&r.body, "status").unwrap()["valueCode"], "ended");
    assert_eq!(
        param(&r.body, "endDate").unwrap()["valueDate"],
        "2025-09-30"
    );
    assert!(
        param(&r.body, "message").unwrap()["valueString"]
            .as_str()
            .unwrap()
            .contains("2025-09-30")
    );
    assert!(param(&r.body, "coverage").is_none() && param(&r.body, "patient").is_none());
    // a Coverage written by a care facility (not the insurer) never makes anyone eligible
    let forged = json!({"resourceType": "Coverage", "status": "active",
        "identifier": [{"system": "http://jpfhir.jp/fhir/ccs/Idsysmem/JP_Insurance_member", "value": format!("{}:記号1:9999:00", ins_a())}],
        "beneficiary": {"reference": format!("Patient/{pid}")}, "payor": [{"display": "x"}]});
    let r = s.post(&s.clerk(), "/fhir/Coverage", &forged).await;
    assert_eq!(r.status, 201, "{}", r.text);
    // not found
    let r = s
        .eligibility(&eligibility_query(&ins_a(), "9999", "1985-06-15"))
        .await;
    assert_eq!(param(&r.body, "status").unwrap()["valueCode"], "not-found");
    // wrong birth date answers exactly like an unknown number
    let r = s
        .eligibility(&eligibility_query(&ins_a(), "4001", "1985-06-16"))
        .await;
    assert_eq!(param(&r.body, "status").unwrap()["valueCode"], "not-found");
    assert!(param(&r.body, "patient").is_none() && !r.text.contains("山田"));
    // bad input names the parameter
    let mut q = eligibility_query(&ins_a(), "4001", "1985-06-15");
    q["branch"] = json!("0");
    let r = s.post(&s.clerk(), "/fhir/$eligibility", &params(&q)).await;
    assert_eq!(r.status, 400);
    assert!(r.text.contains("branch"));
    // insurer staff and patients may not use it
    let r = s
        .post(
            &a,
            "/fhir/$eligibility",
            &params(&eligibility_query(&ins_a(), "4001", "1985-06-15")),
        )
        .await;
    assert_eq!(r.status, 403, "{}", r.text);
    // audited: action eligibility, purpose treatment, the person named
    let ev = s.blocking(|st| {
        st.audit_query(&tsunagi_store::AuditFilter {
            patient: Some(pid.clone()),
            ..Default::default()
        })
        .unwrap()
    });
    assert!(
        ev.iter().any(|e| e.record["action"] == "eligibility"
            && e.record["purpose"] == "treatment"
            && e.record["role"] == "clerk"),
        "{:?}",
        ev.iter().map(|e| &e.record).collect::<Vec<_>>()
    );
}

fn write_file(dir: &std::path::Path, name: &str, lines: &[String]) -> std::path::PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, lines.join("\n") + "\n").unwrap();
    p
}

fn insurer_principal(code: &str) -> Principal {
    Principal::new(
        code,
        OrgKind::Insurer,
        vec![],
        Role::InsurerStaff,
        Some("batch".into()),
        None,
        false,
    )
    .unwrap()
}

async fn bulk_with_bad_rows(b: Backend) {
    let Some(s) = Server::start(b, "bulk_with_bad_rows").await else {
        return;
    };
    let ins = ins_a();
    let mut lines = Vec::new();
    for i in 0..10u64 {
        let mut row = synth::row(i, &ins);
        match i {
            2 => {
                row["insurerNumber"] = json!(format!(
                    "{}{}",
                    &ins[..7],
                    (ins.as_bytes()[7] - b'0' + 1) % 10
                ))
            }
            5 => row["branch"] = json!("7"),
            _ => {}
        }
        lines.push(row.to_string());
    }
    lines[8] = "{not json".into();
    let file = write_file(s.dir.path(), "members.ndjson", &lines);
    let actor = insurer_principal(&ins);
    let opts = ImportOptions {
        file: file.clone(),
        format: Format::Ndjson,
        resume: false,
        batch: 4,
    };
    let stats = s
        .blocking(|st| bulk::import_file(st, &Policy::new(), &actor, &opts, |_, _, _| {}).unwrap());
    assert_eq!((stats.imported, stats.failed), (7, 3));
    let report = std::fs::read_to_string(bulk::errors_path(&file)).unwrap();
    let rows: Vec<&str> = report.lines().collect();
    assert_eq!(rows[0], "line,field,element,reason");
    assert!(
        rows.iter().any(
            |l| l.starts_with("3,insurerNumber,Coverage.payor[0].identifier.value,")
                && l.contains("check digit")
        ),
        "{report}"
    );
    assert!(
        rows.iter()
            .any(|l| l.starts_with("6,branch,Coverage.dependent,")),
        "{report}"
    );
    assert!(
        rows.iter().any(|l| l.starts_with("9,,,not valid JSON")),
        "{report}"
    );
    // good rows in, bad rows entirely absent (no half-written person)
    for i in 0..10u64 {
        let present = s.blocking(|st| {
            st.read("Patient", &person_id(&format!("LINK-{i:012}")))
                .unwrap()
                .is_some()
        });
        assert_eq!(present, ![2, 5, 8].contains(&i), "row {i}");
    }
    let r = s.get(&s.insurer(&ins), "/fhir/Coverage?_count=50").await;
    assert_eq!(search_total(&r), 7);
    // one audit record per person
    let n = s.blocking(|st| {
        st.audit_query(&tsunagi_store::AuditFilter {
            org: Some(ins.clone()),
            limit: 1000,
            ..Default::default()
        })
        .unwrap()
        .iter()
        .filter(|e| e.record["action"] == "register-coverage")
        .count()
    });
    assert_eq!(n, 7);
    // a row carrying another insurer's number is refused, not written
    let other = synth::row(50, &ins_b()).to_string();
    let file2 = write_file(s.dir.path(), "other.ndjson", &[other]);
    let opts2 = ImportOptions {
        file: file2.clone(),
        format: Format::Ndjson,
        resume: false,
        batch: 10,
    };
    let stats = s.blocking(|st| {
        bulk::import_file(st, &Policy::new(), &actor, &opts2, |_, _, _| {}).unwrap()
    });
    assert_eq!((stats.imported, stats.failed), (0, 1));
    assert!(
        std::fs::read_to_string(bulk::errors_path(&file2))
            .unwrap()
            .contains("denied")
    );
    // CSV with a header in another order, quoting
    let fields = [
        "birthDate",
        "linkageId",
        "insurerNumber",
        "symbol",
        "number",
        "branch",
        "relationship",
        "copayPercent",
        "start",
        "familyName",
        "givenName",
        "familyNameKana",
        "givenNameKana",
        "gender",
        "address",
    ];
    let mut csv = vec![fields.join(",")];
    csv.push(format!("1970-01-01,C1,{ins},,77,00,self,30,2024-04-01,鈴木,一郎,スズキ,イチロウ,male,\"東京都港区1-1, ビル\"\"A\"\"\""));
    csv.push(format!(
        "1970-01-01,C2,{ins},,78,00,self,30,2024-04-01,鈴木,二郎,スズキ,ジロウ,unknown-gender,"
    ));
    let file3 = write_file(s.dir.path(), "members.csv", &csv);
    let opts3 = ImportOptions {
        file: file3.clone(),
        format: Format::Csv,
        resume: false,
        batch: 10,
    };
    let stats = s.blocking(|st| {
        bulk::import_file(st, &Policy::new(), &actor, &opts3, |_, _, _| {}).unwrap()
    });
    assert_eq!((stats.imported, stats.failed), (1, 1));
    let p = s.blocking(|st| st.read("Patient", &person_id("C1")).unwrap().unwrap());
    assert_eq!(
        p.resource.unwrap()["address"][0]["text"],
        "東京都港区1-1, ビル\"A\""
    );
    assert!(
        std::fs::read_to_string(bulk::errors_path(&file3))
            .unwrap()
            .contains("3,gender,Patient.gender,")
    );
}

async fn bulk_resume(b: Backend) {
    let Some(s) = Server::start(b, "bulk_resume").await else {
        return;
    };
    let ins = ins_a();
    let mut lines: Vec<String> = (0..25u64)
        .map(|i| synth::row(i, &ins).to_string())
        .collect();
    // line 4 fails in the first run; the resumed run must still end as failed
    lines[3] = "{not json".into();
    let file = write_file(s.dir.path(), "big.ndjson", &lines);
    let actor = insurer_principal(&ins);
    let opts = ImportOptions {
        file: file.clone(),
        format: Format::Ndjson,
        resume: false,
        batch: 10,
    };
    // the import is killed after its first committed batch
    let crashed = s.blocking(|st| {
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            bulk::import_file(st, &Policy::new(), &actor, &opts, |_, done, failed| {
                if done + failed >= 10 {
                    panic!("simulated crash");
                }
            })
        }))
    });
    assert!(crashed.is_err());
    assert_eq!(
        std::fs::read_to_string(bulk::checkpoint_path(&file))
            .unwrap()
            .trim(),
        "11",
        "ten good rows and the failed one are behind the checkpoint"
    );
    let count = |s: &Server| {
        s.blocking(|st| {
            let q = tsunagi_fhir::query::parse("Coverage", &[]).unwrap();
            st.search(&q, &Scope::Unrestricted).unwrap().total
        })
    };
    assert_eq!(count(&s), 10);
    let opts = ImportOptions {
        resume: true,
        ..opts
    };
    let stats = s
        .blocking(|st| bulk::import_file(st, &Policy::new(), &actor, &opts, |_, _, _| {}).unwrap());
    assert_eq!(stats.resumed_after, 11);
    assert_eq!((stats.imported, stats.failed), (14, 0));
    assert_eq!(stats.failed_before_resume, 1);
    assert_eq!(
        stats.failed_in_file(),
        1,
        "the file as a whole had a failed row"
    );
    assert_eq!(count(&s), 24);
    // every person once, each audited once
    let n = s.blocking(|st| {
        st.audit_query(&tsunagi_store::AuditFilter {
            org: Some(ins.clone()),
            limit: 1000,
            ..Default::default()
        })
        .unwrap()
        .len()
    });
    assert_eq!(n, 24);
    // the imported members answer $eligibility
    let (i, sym, num, br, birth) = synth::keys(17, &ins);
    let r = s.eligibility(&json!({"insurerNumber": i, "symbol": sym, "number": num, "branch": br, "birthDate": birth})).await;
    assert_eq!(
        param(&r.body, "status").unwrap()["valueCode"],
        "eligible",
        "{}",
        r.text
    );
}

macro_rules! both_backends {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() { super::$name(super::Backend::Sqlite).await }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() { super::$name(super::Backend::Postgres).await }
            )*
        }
    };
}

both_backends!(
    registration_validation,
    change_of_insurer,
    insurers_isolated,
    eligibility_answers,
    bulk_with_bad_rows,
    bulk_resume,
);
