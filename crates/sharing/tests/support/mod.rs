//! Harness of the sharing service's black-box tests: the real server with the
//! eligibility and sharing services, the JP-CLINS validator (packages + masters
//! from ../shared), on 127.0.0.1:0, over SQLite or PostgreSQL
//! (`TSUNAGI_TEST_PG`; otherwise a visible SKIPPED line), with one manual clock.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use chrono::{DateTime, Duration, Utc};
use reqwest::Method;
use serde_json::{Value, json};
use tsunagi_eligibility::consent::{Category, Grant, GrantKind};
use tsunagi_eligibility::{EligibilityService, ManualClock};
use tsunagi_policy::identity::{OrgKind, PATIENT_ORG, Principal, Role};
use tsunagi_server::{AppState, ServerConfig};
use tsunagi_sharing::SharingService;
use tsunagi_store::conformance;
use tsunagi_store::postgres::PgStore;
use tsunagi_store::sqlite::SqliteStore;
use tsunagi_store::{Store, WriteContext};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// The registering hospital (the JP-CLINS examples' institution number).
pub const HOSP: &str = "1318814790";
/// The addressee clinic of the example referral letter.
pub const CLINIC: &str = "1311234567";
/// A third institution.
pub const OTHER: &str = "1310123458";
pub const INSURER: &str = "06130017";
pub const CENTRE: &str = "131016";
pub const OPERATOR: &str = "operator";

#[macro_export]
macro_rules! both_backends {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name($crate::support::Backend::Sqlite).await
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name($crate::support::Backend::Postgres).await
                }
            )*
        }
    };
}

pub fn shared(rel: &str) -> PathBuf {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../../../shared")).join(rel)
}

/// The JP-CLINS 1.5.2 package set (as its examples were published) with the masters.
pub fn validator() -> Arc<tsunagi_validation::Validator> {
    static V: OnceLock<Arc<tsunagi_validation::Validator>> = OnceLock::new();
    V.get_or_init(|| {
        use tsunagi_terminology::{MasterKind, import};
        let dir = std::env::temp_dir().join(format!("tsunagi-sharing-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        for (f, k) in [
            ("masters/drug-master-y.csv", MasterKind::Drug),
            ("masters/disease-master-b.csv", MasterKind::Disease),
            ("masters/modifier-master-z.csv", MasterKind::Modifier),
            ("codesets/jp-clins-1.5.2/CodeSystem-jp-clins-codesystem-JLAC10-corelabo-cs.json", MasterKind::Jlac10),
            ("codesets/jp-clins-1.5.2/CodeSystem-jp-clins-codesystem-JLAC10-infectionlabo-cs.json", MasterKind::Jlac10),
            ("codesets/jfagy/JFAGY_J9FN_20250401_R01.csv", MasterKind::Jfagy),
        ] {
            let r = import(&shared(f), k, &dir).unwrap();
            assert!(r.errors.is_empty(), "{f}: {:?}", r.errors);
        }
        let term = tsunagi_terminology::Terminology::open(&dir).unwrap();
        let paths: Vec<PathBuf> = [
            "current/hl7.fhir.r4.core-4.0.1.tgz",
            "variants/jp-core.r4-1.1.2-url.tgz",
            "jp-clins.r4-1.5.2.tgz",
        ]
        .iter()
        .map(|p| shared(&format!("fhir-packages/{p}")))
        .collect();
        Arc::new(tsunagi_validation::Validator::from_paths(&paths, Some(term)).unwrap())
    })
    .clone()
}

pub struct TestServer {
    pub root: String,
    pub state: AppState,
    pub store: Arc<dyn Store>,
    pub eligibility: EligibilityService,
    pub sharing: SharingService,
    pub clock: Arc<ManualClock>,
    pub http: reqwest::Client,
    pub dir: tempfile::TempDir,
    pg: Option<(Arc<PgStore>, String)>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
}

impl TestServer {
    pub async fn start(backend: Backend) -> Option<TestServer> {
        let dir = tempfile::tempdir().expect("tempdir");
        let (store, pg): (Arc<dyn Store>, _) = match backend {
            Backend::Sqlite => (
                Arc::new(SqliteStore::open(&dir.path().join("tsunagi.db")).expect("sqlite")),
                None,
            ),
            Backend::Postgres => {
                let scenario = format!(
                    "variant of {}",
                    std::thread::current().name().unwrap_or("a scenario")
                );
                let url = conformance::test_pg_url(&scenario)?;
                let schema = conformance::fresh_schema("tsunagi_sharing");
                let s2 = schema.clone();
                let pg =
                    tokio::task::spawn_blocking(move || PgStore::connect_in_schema(&url, &s2, 4))
                        .await
                        .expect("join")
                        .expect("connect to TSUNAGI_TEST_PG");
                let pg = Arc::new(pg);
                (pg.clone(), Some((pg, schema)))
            }
        };
        let now: DateTime<Utc> = "2026-11-21T01:00:00Z".parse().unwrap();
        let clock = Arc::new(ManualClock::new(now));
        let eligibility = EligibilityService::in_memory(Default::default(), clock.clone());
        let sharing = SharingService::with_clock(Default::default(), clock.clone());
        let v = tokio::task::spawn_blocking(validator)
            .await
            .expect("validator");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let cfg = ServerConfig {
            data_dir: dir.path().to_path_buf(),
            listen: addr,
            base_url: Some(format!("http://{addr}/fhir")),
            shutdown_grace_secs: 0,
            ..ServerConfig::default()
        };
        let state = tsunagi_server::Builder::new(cfg, store.clone())
            .validator(v)
            .service(Arc::new(eligibility.clone()))
            .service(Arc::new(sharing.clone()))
            .build()
            .expect("build");
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(tsunagi_server::serve(state.clone(), listener, async {
            let _ = rx.await;
        }));
        let s = TestServer {
            root: format!("http://{addr}"),
            state,
            store,
            eligibility,
            sharing,
            clock,
            http: reqwest::Client::builder()
                .timeout(std::time::Duration::from_secs(120))
                .build()
                .expect("client"),
            dir,
            pg,
            shutdown: Some(tx),
        };
        for p in ["pt-01", "pt-02"] {
            s.put(
                "Patient",
                p,
                json!({"resourceType": "Patient", "id": p, "name": [{"family": "試験"}]}),
                OTHER,
            );
            s.put(
                "Coverage",
                &format!("{p}-cov"),
                json!({"resourceType": "Coverage", "id": format!("{p}-cov"), "status": "active",
                    "beneficiary": {"reference": format!("Patient/{p}")},
                    "period": {"start": "2020-01-01"},
                    "payor": [{"identifier": {"system": "urn:oid:1.2.392.100495.20.3.61", "value": INSURER}}]}),
                INSURER,
            );
        }
        Some(s)
    }

    pub fn now(&self) -> DateTime<Utc> {
        use tsunagi_eligibility::Clock;
        self.clock.now()
    }

    pub fn advance(&self, d: Duration) {
        self.clock.advance(d);
    }

    /// Writes a resource directly (setup), as `author` wrote it.
    pub fn put(&self, rt: &str, id: &str, r: Value, author: &str) {
        let store = self.store.clone();
        let (rt, id, author) = (rt.to_string(), id.to_string(), author.to_string());
        tokio::task::block_in_place(move || {
            let mut tx = store.begin().expect("begin");
            tx.update(
                &rt,
                &id,
                r,
                None,
                &WriteContext {
                    org: Some(author),
                    user: Some("setup".into()),
                },
            )
            .expect("write");
            tx.commit().expect("commit");
        });
    }

    /// A live reception consent grant of `org` for `patient` (what `$reception` records).
    pub fn grant(&self, org: &str, patient: &str, cats: &[Category], hours: i64) {
        let now = self.now();
        self.eligibility.shared.consent.insert(Grant {
            id: format!("g-{org}-{patient}-{}", cats.len()),
            patient: patient.into(),
            org: org.into(),
            categories: cats.to_vec(),
            start: now,
            end: now + Duration::hours(hours),
            kind: GrantKind::Reception,
            setting: "outpatient".into(),
        });
    }

    pub fn token_for(&self, p: &Principal) -> String {
        self.state
            .keys
            .issue(p, chrono::Duration::minutes(30))
            .expect("token")
    }

    pub fn token(&self, org: &str, kind: OrgKind, role: Role) -> String {
        let p = Principal::new(
            org,
            kind,
            vec![],
            role,
            Some(format!("{role}-{org}")),
            None,
            true,
        )
        .expect("principal");
        self.token_for(&p)
    }

    pub fn doctor(&self, org: &str) -> String {
        self.token(org, OrgKind::Hospital, Role::Doctor)
    }

    pub fn patient_token(&self, id: &str) -> String {
        let p = Principal::new(
            PATIENT_ORG,
            OrgKind::Patient,
            vec![],
            Role::Patient,
            None,
            Some(id.into()),
            false,
        )
        .expect("patient");
        self.token_for(&p)
    }

    pub fn req(&self, method: Method, path: &str) -> reqwest::RequestBuilder {
        self.http.request(method, format!("{}{path}", self.root))
    }

    pub async fn send(&self, rb: reqwest::RequestBuilder) -> Resp {
        let r = rb.send().await.expect("request");
        let status = r.status().as_u16();
        let text = r.text().await.unwrap_or_default();
        let body = serde_json::from_str(&text).unwrap_or(Value::Null);
        Resp { status, text, body }
    }

    pub async fn get(&self, token: &str, path: &str) -> Resp {
        self.send(self.req(Method::GET, path).bearer_auth(token))
            .await
    }

    pub async fn get_as(&self, token: &str, purpose: &str, path: &str) -> Resp {
        self.send(
            self.req(Method::GET, path)
                .bearer_auth(token)
                .header("x-purpose-of-use", purpose),
        )
        .await
    }

    pub async fn post(&self, token: &str, path: &str, body: &Value) -> Resp {
        self.send(
            self.req(Method::POST, path)
                .bearer_auth(token)
                .header("content-type", "application/fhir+json")
                .body(serde_json::to_vec(body).expect("json")),
        )
        .await
    }

    pub async fn post_as(&self, token: &str, purpose: &str, path: &str, body: &Value) -> Resp {
        self.send(
            self.req(Method::POST, path)
                .bearer_auth(token)
                .header("x-purpose-of-use", purpose)
                .header("content-type", "application/fhir+json")
                .body(serde_json::to_vec(body).expect("json")),
        )
        .await
    }

    pub async fn audit(&self, patient: &str) -> Vec<Value> {
        let op = self.token(OPERATOR, OrgKind::Operator, Role::Operator);
        let r = self
            .get(&op, &format!("/audit/events?patient={patient}&_count=1000"))
            .await;
        assert_eq!(r.status, 200, "{}", r.text);
        r.body["events"].as_array().cloned().unwrap_or_default()
    }

    /// Runs the retention job at the clock's time.
    pub fn retention(&self) -> tsunagi_sharing::retention::Report {
        let (store, now) = (self.store.clone(), self.now());
        tokio::task::block_in_place(move || {
            tsunagi_sharing::retention::run(&*store, &Default::default(), now).expect("retention")
        })
    }

    /// Ids of a searchset's entries.
    pub async fn search_ids(&self, token: &str, path: &str) -> Vec<String> {
        let r = self.get(token, path).await;
        assert_eq!(r.status, 200, "{path}: {}", r.text);
        ids(&r.body)
    }
}

pub fn ids(bundle: &Value) -> Vec<String> {
    let mut v: Vec<String> = bundle["entry"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|e| e["resource"]["id"].as_str().map(str::to_string))
        .collect();
    v.sort();
    v
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some((store, schema)) = self.pg.take() {
            let _ = std::thread::spawn(move || {
                std::thread::sleep(std::time::Duration::from_millis(200));
                let _ = store.raw_execute(&format!("DROP SCHEMA IF EXISTS {schema} CASCADE"));
                std::mem::forget(store);
            })
            .join();
        }
    }
}

#[derive(Debug)]
pub struct Resp {
    pub status: u16,
    pub text: String,
    pub body: Value,
}

impl Resp {
    pub fn refused(&self, status: u16, needle: &str) {
        assert_eq!(self.status, status, "{}", self.text);
        assert_eq!(
            self.body["resourceType"], "OperationOutcome",
            "{}",
            self.text
        );
        assert!(
            self.text.contains(needle),
            "expected '{needle}' in {}",
            self.text
        );
    }
}

/// An official example from ../shared/fixtures/jp-examples.
pub fn example(rel: &str) -> Value {
    let p = shared(&format!("fixtures/jp-examples/{rel}"));
    serde_json::from_slice(&std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display())))
        .expect("json")
}
