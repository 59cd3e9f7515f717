//! Test harness for the black-box HTTP tests: a real server (`Builder` + `serve`)
//! on 127.0.0.1:0 over a fresh store, SQLite in a temporary directory or
//! PostgreSQL in a fresh schema (`TSUNAGI_TEST_PG`), and a small HTTP client.

#![allow(dead_code)]

use std::sync::Arc;

use reqwest::Method;
use reqwest::header::HeaderMap;
use serde_json::{Value, json};
use tsunagi_policy::identity::{OrgKind, PATIENT_ORG, Principal, Role};
use tsunagi_server::orgs::organization;
use tsunagi_server::{AppState, ServerConfig};
use tsunagi_store::conformance;
use tsunagi_store::postgres::PgStore;
use tsunagi_store::sqlite::SqliteStore;
use tsunagi_store::{Store, WriteContext};

/// Storage backend a scenario runs against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// Hospital A (医療機関等コード with a valid check digit).
pub const HOSP_A: &str = "1310123458";
/// Hospital B.
pub const HOSP_B: &str = "2710987658";
/// The operator organisation.
pub const OPERATOR: &str = "operator";

/// Expands every listed scenario `async fn name(Backend)` into one test per backend:
/// `sqlite::name` and `postgres::name`, identical code.
#[macro_export]
macro_rules! both_backends {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name($crate::common::Backend::Sqlite).await
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name($crate::common::Backend::Postgres).await
                }
            )*
        }
    };
}

/// Raw access to the backend behind the server (tamper tests).
enum Raw {
    Sqlite(Arc<SqliteStore>),
    Pg { store: Arc<PgStore>, schema: String },
}

/// A running server over a fresh store.
pub struct TestServer {
    /// `http://127.0.0.1:PORT`
    pub root: String,
    /// `http://127.0.0.1:PORT/fhir`
    pub fhir: String,
    pub state: AppState,
    pub store: Arc<dyn Store>,
    pub http: reqwest::Client,
    raw: Raw,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<std::io::Result<()>>>,
    _dir: tempfile::TempDir,
}

impl TestServer {
    /// Starts a server with the test defaults, or None (after printing why) when
    /// the backend is PostgreSQL and `TSUNAGI_TEST_PG` is unset.
    pub async fn start(backend: Backend) -> Option<TestServer> {
        Self::start_with(backend, |_| {}).await
    }

    /// As [`TestServer::start`], with a chance to adjust the configuration.
    pub async fn start_with(
        backend: Backend,
        configure: impl FnOnce(&mut ServerConfig),
    ) -> Option<TestServer> {
        let dir = tempfile::tempdir().expect("tempdir");
        let (store, raw): (Arc<dyn Store>, Raw) = match backend {
            Backend::Sqlite => {
                let s = Arc::new(
                    SqliteStore::open(&dir.path().join("tsunagi.db")).expect("open sqlite"),
                );
                (s.clone(), Raw::Sqlite(s))
            }
            Backend::Postgres => {
                let scenario = format!(
                    "variant of {}",
                    std::thread::current().name().unwrap_or("a scenario")
                );
                let url = conformance::test_pg_url(&scenario)?;
                let schema = conformance::fresh_schema("tsunagi_http");
                let s2 = schema.clone();
                let pg =
                    tokio::task::spawn_blocking(move || PgStore::connect_in_schema(&url, &s2, 4))
                        .await
                        .expect("join")
                        .expect("connect to TSUNAGI_TEST_PG");
                let pg = Arc::new(pg);
                (pg.clone(), Raw::Pg { store: pg, schema })
            }
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("local addr");
        let mut config = ServerConfig {
            data_dir: dir.path().to_path_buf(),
            listen: addr,
            base_url: Some(format!("http://{addr}/fhir")),
            shutdown_grace_secs: 0,
            ..ServerConfig::default()
        };
        configure(&mut config);
        let state = tsunagi_server::Builder::new(config, store.clone())
            .build()
            .expect("build server state");
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(tsunagi_server::serve(state.clone(), listener, async {
            let _ = rx.await;
        }));
        let server = TestServer {
            root: format!("http://{addr}"),
            fhir: format!("http://{addr}/fhir"),
            state,
            store,
            http: reqwest::Client::builder()
                .timeout(std::time::Duration::from_secs(30))
                .build()
                .expect("client"),
            raw,
            shutdown: Some(tx),
            task: Some(task),
            _dir: dir,
        };
        // the operator's organisation registry
        server.register_org("org-a", HOSP_A, OrgKind::Hospital, "つなぎ病院A");
        server.register_org("org-b", HOSP_B, OrgKind::Hospital, "つなぎ病院B");
        server.register_org("org-op", OPERATOR, OrgKind::Operator, "運用センター");
        Some(server)
    }

    /// Writes an Organization into the registry directly through the store (operator setup).
    pub fn register_org(&self, id: &str, code: &str, kind: OrgKind, name: &str) {
        let store = self.store.clone();
        let org = organization(id, code, kind, name, &[]);
        let id = id.to_string();
        tokio::task::block_in_place(move || {
            let mut tx = store.begin().expect("begin");
            tx.update(
                "Organization",
                &id,
                org,
                None,
                &WriteContext {
                    org: Some(OPERATOR.into()),
                    user: Some("setup".into()),
                },
            )
            .expect("write Organization");
            tx.commit().expect("commit");
        });
    }

    /// A bearer token for a principal, valid for ten minutes.
    pub fn token_for(&self, p: &Principal) -> String {
        self.state
            .keys
            .issue(p, chrono::Duration::minutes(10))
            .expect("issue token")
    }

    pub fn token(&self, org: &str, kind: OrgKind, role: Role) -> String {
        let p = Principal::new(
            org,
            kind,
            vec![],
            role,
            Some(format!("{role}-user")),
            None,
            false,
        )
        .expect("valid principal");
        self.token_for(&p)
    }

    /// Doctor at hospital A / B.
    pub fn doctor_a(&self) -> String {
        self.token(HOSP_A, OrgKind::Hospital, Role::Doctor)
    }
    pub fn doctor_b(&self) -> String {
        self.token(HOSP_B, OrgKind::Hospital, Role::Doctor)
    }
    pub fn clerk_a(&self) -> String {
        self.token(HOSP_A, OrgKind::Hospital, Role::Clerk)
    }
    pub fn operator(&self) -> String {
        self.token(OPERATOR, OrgKind::Operator, Role::Operator)
    }
    pub fn patient(&self, id: &str) -> String {
        let p = Principal::new(
            PATIENT_ORG,
            OrgKind::Patient,
            vec![],
            Role::Patient,
            None,
            Some(id.into()),
            false,
        )
        .expect("valid patient principal");
        self.token_for(&p)
    }

    /// A request to `path` (absolute URL, or relative to the server root: `/fhir/...`).
    pub fn req(&self, method: Method, path: &str) -> reqwest::RequestBuilder {
        let url = if path.starts_with("http") {
            path.to_string()
        } else {
            format!("{}{path}", self.root)
        };
        self.http.request(method, url)
    }

    pub async fn get(&self, token: &str, path: &str) -> Resp {
        send(self.req(Method::GET, path).bearer_auth(token)).await
    }

    pub async fn post(&self, token: &str, path: &str, body: &Value) -> Resp {
        send(fhir_body(
            self.req(Method::POST, path).bearer_auth(token),
            body,
        ))
        .await
    }

    pub async fn put(&self, token: &str, path: &str, body: &Value) -> Resp {
        send(fhir_body(
            self.req(Method::PUT, path).bearer_auth(token),
            body,
        ))
        .await
    }

    pub async fn delete(&self, token: &str, path: &str) -> Resp {
        send(self.req(Method::DELETE, path).bearer_auth(token)).await
    }

    /// Creates a resource and returns its id (asserting 201).
    pub async fn create(&self, token: &str, resource: &Value) -> String {
        let rt = resource["resourceType"].as_str().expect("resourceType");
        let r = self.post(token, &format!("/fhir/{rt}"), resource).await;
        assert_eq!(r.status, 201, "create {rt}: {}", r.text);
        r.body["id"].as_str().expect("id").to_string()
    }

    /// Search with query pairs; asserts 200 and a searchset.
    pub async fn search(&self, token: &str, rt: &str, params: &[(&str, &str)]) -> Value {
        let r = send(
            self.req(Method::GET, &format!("/fhir/{rt}?{}", qs(params)))
                .bearer_auth(token),
        )
        .await;
        assert_eq!(r.status, 200, "search {rt} {params:?}: {}", r.text);
        assert_eq!(r.body["type"], "searchset", "{}", r.text);
        r.body
    }

    /// Ids of the `match` entries of a search, in order.
    pub async fn search_ids(&self, token: &str, rt: &str, params: &[(&str, &str)]) -> Vec<String> {
        match_ids(&self.search(token, rt, params).await)
    }

    /// Audit events as the operator sees them (newest first).
    pub async fn audit_events(&self, params: &[(&str, &str)]) -> Vec<Value> {
        let r = send(
            self.req(Method::GET, &format!("/audit/events?{}", qs(params)))
                .bearer_auth(self.operator()),
        )
        .await;
        assert_eq!(r.status, 200, "audit query: {}", r.text);
        r.body["events"].as_array().cloned().unwrap_or_default()
    }

    /// The table `raw_execute` names to reach stand-alone audit records (reads,
    /// searches, denials).
    pub fn standalone_audit_table(&self) -> &'static str {
        match &self.raw {
            Raw::Sqlite(_) => tsunagi_store::sqlite::STANDALONE_AUDIT_TABLE,
            Raw::Pg { .. } => "audit_log",
        }
    }

    /// Runs raw SQL against the backend (tampering with the audit log).
    pub fn raw_execute(&self, sql: &str) {
        let sql = sql.to_string();
        let r = match &self.raw {
            Raw::Sqlite(s) => {
                let s = s.clone();
                tokio::task::block_in_place(move || s.raw_execute(&sql))
            }
            Raw::Pg { store, .. } => {
                let s = store.clone();
                tokio::task::block_in_place(move || s.raw_execute(&sql))
            }
        };
        r.expect("raw sql");
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.task.take() {
            t.abort();
        }
        if let Raw::Pg { store, schema } = &self.raw {
            let (store, schema) = (store.clone(), schema.clone());
            // Off the runtime: the synchronous postgres client must not be used, nor
            // dropped, on a thread running async code.
            let cleanup = std::thread::spawn(move || {
                let _ = store.raw_execute(&format!("DROP SCHEMA IF EXISTS {schema} CASCADE"));
                store
            });
            if let Ok(store) = cleanup.join() {
                // Hold the pool until every other owner (the server's state, tasks
                // being torn down) let go, so the connections close here too.
                std::thread::spawn(move || {
                    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
                    while Arc::strong_count(&store) > 1 && std::time::Instant::now() < deadline {
                        std::thread::sleep(std::time::Duration::from_millis(20));
                    }
                    if Arc::strong_count(&store) > 1 {
                        std::mem::forget(store);
                    }
                });
            }
        }
    }
}

/// A form-urlencoded query string.
pub fn qs(params: &[(&str, &str)]) -> String {
    let mut ser = form_urlencoded::Serializer::new(String::new());
    for (k, v) in params {
        ser.append_pair(k, v);
    }
    ser.finish()
}

pub fn fhir_body(rb: reqwest::RequestBuilder, body: &Value) -> reqwest::RequestBuilder {
    rb.header("content-type", "application/fhir+json")
        .body(serde_json::to_vec(body).expect("serialise"))
}

/// A response, read whole.
#[derive(Debug)]
pub struct Resp {
    pub status: u16,
    pub headers: HeaderMap,
    pub text: String,
    /// The body as JSON (Null when empty or not JSON).
    pub body: Value,
}

impl Resp {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// Asserts the status, `application/fhir+json` and an OperationOutcome body;
    /// returns the outcome's diagnostics and expressions joined, for message checks.
    pub fn assert_outcome(&self, status: u16) -> String {
        assert_eq!(self.status, status, "{}", self.text);
        let ct = self.header("content-type").unwrap_or_default();
        assert!(
            ct.starts_with("application/fhir+json"),
            "content type of a {status}: {ct}"
        );
        assert_eq!(
            self.body["resourceType"], "OperationOutcome",
            "{status} body: {}",
            self.text
        );
        let issues = self.body["issue"].as_array().expect("issues");
        assert!(!issues.is_empty(), "{}", self.text);
        issues
            .iter()
            .map(|i| {
                format!(
                    "{} {} {}",
                    i["diagnostics"].as_str().unwrap_or_default(),
                    i["details"]["text"].as_str().unwrap_or_default(),
                    i["expression"]
                        .as_array()
                        .map(|e| e
                            .iter()
                            .filter_map(Value::as_str)
                            .collect::<Vec<_>>()
                            .join(","))
                        .unwrap_or_default()
                )
            })
            .collect::<Vec<_>>()
            .join(" | ")
    }
}

pub async fn send(rb: reqwest::RequestBuilder) -> Resp {
    let r = rb.send().await.expect("request");
    let status = r.status().as_u16();
    let headers = r.headers().clone();
    let text = r.text().await.expect("body");
    let body = serde_json::from_str(&text).unwrap_or(Value::Null);
    Resp {
        status,
        headers,
        text,
        body,
    }
}

/// Ids of the entries with search mode `match`.
pub fn match_ids(bundle: &Value) -> Vec<String> {
    entries_with_mode(bundle, "match")
        .iter()
        .map(|r| r["id"].as_str().unwrap_or_default().to_string())
        .collect()
}

/// Resources of the entries with the given search mode.
pub fn entries_with_mode(bundle: &Value, mode: &str) -> Vec<Value> {
    bundle["entry"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|e| e["search"]["mode"] == mode)
        .map(|e| e["resource"].clone())
        .collect()
}

/// A Japanese patient with an identifier in `system`.
pub fn patient(system: &str, value: &str, family: &str, given: &str, birth: &str) -> Value {
    json!({
        "resourceType": "Patient",
        "identifier": [{"system": system, "value": value}],
        "name": [{"use": "official", "family": family, "given": [given]}],
        "gender": "female",
        "birthDate": birth,
    })
}

/// A laboratory Observation about `Patient/{pid}`.
pub fn observation(pid: &str, code: &str, value: f64) -> Value {
    json!({
        "resourceType": "Observation",
        "status": "final",
        "code": {"coding": [{"system": "http://loinc.org", "code": code}]},
        "subject": {"reference": format!("Patient/{pid}")},
        "effectiveDateTime": "2026-11-01T09:00:00+09:00",
        "valueQuantity": {"value": value, "unit": "mg/dL", "system": "http://unitsofmeasure.org", "code": "mg/dL"},
    })
}
