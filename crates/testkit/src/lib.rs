//! tsunagi-testkit: the black-box harness of the service crates' tests.
//!
//! [`TestServer`] is the real server (`Builder` + `serve`) on 127.0.0.1:0 with the
//! eligibility service (reception, consent, emergency and disaster rules) and any
//! further service modules the test installs, over a fresh store: SQLite in a
//! temporary directory, or PostgreSQL in a fresh schema when `TSUNAGI_TEST_PG` is set
//! (otherwise the PostgreSQL half prints a SKIPPED line and returns). Time is a
//! [`ManualClock`] shared by every service, so rules are tested to the second.
//!
//! Used only as a dev-dependency; the product never links it.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use chrono::{DateTime, Duration, Utc};
use reqwest::Method;
use serde_json::{Value, json};
use tsunagi_eligibility::cards::{self, CardFile, CardKind};
use tsunagi_eligibility::{Config, EligibilityService};
use tsunagi_policy::identity::{OrgKind, PATIENT_ORG, Principal, Role};
use tsunagi_server::clock::{Clock, ManualClock};
use tsunagi_server::orgs::organization;
use tsunagi_server::{AppState, ServerConfig, ServiceModule, Validate};
use tsunagi_store::conformance;
use tsunagi_store::postgres::PgStore;
use tsunagi_store::sqlite::SqliteStore;
use tsunagi_store::{Store, WriteContext};

pub use reqwest;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// Hospital A, Tokyo (13).
pub const HOSP_A: &str = "1310123458";
/// Hospital B, Osaka (27).
pub const HOSP_B: &str = "2710987658";
/// A clinic in Tokyo.
pub const CLINIC: &str = "1310543216";
/// A pharmacy in Tokyo.
pub const PHARMACY: &str = "1340222228";
/// The insurer that writes coverage (保険者番号 with a valid check digit).
pub const INSURER: &str = "06130017";
/// A municipality (Chiyoda, Tokyo) and its public health centre.
pub const MUNICIPALITY: &str = "131016";
pub const MINISTRY: &str = "mhlw";
pub const OPERATOR: &str = "operator";

/// Runs each named `async fn name(backend: Backend)` once per backend, as
/// `sqlite::name` and `postgres::name`.
#[macro_export]
macro_rules! both_backends {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name($crate::Backend::Sqlite).await
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name($crate::Backend::Postgres).await
                }
            )*
        }
    };
}

/// What a service under test is opened with.
pub struct ServiceCtx {
    pub store: Arc<dyn Store>,
    pub data_dir: PathBuf,
    pub clock: Arc<ManualClock>,
    /// The eligibility service (its public functions: coverage lookup, grants, ...).
    pub eligibility: EligibilityService,
}

type ServiceFactory = Box<dyn Fn(&ServiceCtx) -> Arc<dyn ServiceModule> + Send + Sync>;
type Configure = Arc<dyn Fn(&mut ServerConfig) + Send + Sync>;

/// How to start a [`TestServer`].
pub struct Options {
    pub eligibility: Config,
    pub services: Vec<Arc<ServiceFactory>>,
    pub validator: Option<Arc<dyn Validate>>,
    pub now: DateTime<Utc>,
    pub configure: Option<Configure>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            eligibility: Config::default(),
            services: Vec::new(),
            validator: None,
            now: Utc::now(),
            configure: None,
        }
    }
}

impl Options {
    /// Installs a service module, opened (off the async runtime) with the harness's
    /// store, data directory and clock. Opened again on [`TestServer::restart`].
    pub fn service(
        mut self,
        open: impl Fn(&ServiceCtx) -> Arc<dyn ServiceModule> + Send + Sync + 'static,
    ) -> Self {
        self.services.push(Arc::new(Box::new(open)));
        self
    }

    /// Replaces the default `BasicValidator` (e.g. with a package-backed validator).
    pub fn validator(mut self, v: Arc<dyn Validate>) -> Self {
        self.validator = Some(v);
        self
    }

    pub fn eligibility(mut self, config: Config) -> Self {
        self.eligibility = config;
        self
    }

    /// Starts the clock here instead of at the real time.
    pub fn at(mut self, now: DateTime<Utc>) -> Self {
        self.now = now;
        self
    }

    /// Adjusts the server configuration (limits, base URL, ...).
    pub fn configure(mut self, f: impl Fn(&mut ServerConfig) + Send + Sync + 'static) -> Self {
        self.configure = Some(Arc::new(f));
        self
    }
}

pub struct TestServer {
    /// `http://127.0.0.1:PORT`
    pub root: String,
    pub state: AppState,
    pub store: Arc<dyn Store>,
    pub eligibility: EligibilityService,
    pub clock: Arc<ManualClock>,
    pub http: reqwest::Client,
    pub dir: tempfile::TempDir,
    options: Options,
    pg: Option<(Arc<PgStore>, String)>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
}

/// Opens a store for the backend, or None (with a SKIPPED line) without PostgreSQL.
pub async fn open_store(
    backend: Backend,
    dir: &Path,
) -> Option<(Arc<dyn Store>, Option<(Arc<PgStore>, String)>)> {
    match backend {
        Backend::Sqlite => Some((
            Arc::new(SqliteStore::open(&dir.join("tsunagi.db")).expect("open sqlite")),
            None,
        )),
        Backend::Postgres => {
            let scenario = format!(
                "variant of {}",
                std::thread::current().name().unwrap_or("a scenario")
            );
            let url = conformance::test_pg_url(&scenario)?;
            let schema = conformance::fresh_schema("tsunagi_kit");
            let s2 = schema.clone();
            let pg = tokio::task::spawn_blocking(move || PgStore::connect_in_schema(&url, &s2, 4))
                .await
                .expect("join")
                .expect("connect to TSUNAGI_TEST_PG");
            let pg = Arc::new(pg);
            Some((pg.clone(), Some((pg, schema))))
        }
    }
}

impl TestServer {
    /// The eligibility service alone, clock at the real time.
    pub async fn start(backend: Backend) -> Option<TestServer> {
        Self::start_with(backend, Options::default()).await
    }

    pub async fn start_with(backend: Backend, options: Options) -> Option<TestServer> {
        let dir = tempfile::tempdir().expect("tempdir");
        let (store, pg) = open_store(backend, dir.path()).await?;
        let s = Self::serve(store, pg, dir, options).await;
        s.seed_orgs();
        Some(s)
    }

    async fn serve(
        store: Arc<dyn Store>,
        pg: Option<(Arc<PgStore>, String)>,
        dir: tempfile::TempDir,
        options: Options,
    ) -> TestServer {
        let clock = Arc::new(ManualClock::new(options.now));
        let ctx_parts = (
            store.clone(),
            dir.path().to_path_buf(),
            options.eligibility.clone(),
            clock.clone(),
            options.services.clone(),
        );
        let (eligibility, services) = tokio::task::spawn_blocking(move || {
            let (store, data_dir, config, clock, factories) = ctx_parts;
            let ck: Arc<dyn Clock> = clock.clone();
            let eligibility =
                EligibilityService::open_with_clock(store.clone(), &data_dir, config, ck)
                    .expect("open eligibility service");
            let ctx = ServiceCtx {
                store,
                data_dir,
                clock,
                eligibility: eligibility.clone(),
            };
            let services: Vec<Arc<dyn ServiceModule>> =
                factories.iter().map(|open| open(&ctx)).collect();
            (eligibility, services)
        })
        .await
        .expect("join");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let mut cfg = ServerConfig {
            data_dir: dir.path().to_path_buf(),
            listen: addr,
            base_url: Some(format!("http://{addr}/fhir")),
            shutdown_grace_secs: 0,
            ..ServerConfig::default()
        };
        if let Some(f) = &options.configure {
            f(&mut cfg);
        }
        let mut builder =
            tsunagi_server::Builder::new(cfg, store.clone()).service(Arc::new(eligibility.clone()));
        for s in services {
            builder = builder.service(s);
        }
        if let Some(v) = &options.validator {
            builder.validator = v.clone();
        }
        let state = builder.build().expect("build");
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(tsunagi_server::serve(state.clone(), listener, async {
            let _ = rx.await;
        }));
        TestServer {
            root: format!("http://{addr}"),
            state,
            store,
            eligibility,
            clock,
            http: reqwest::Client::builder()
                .timeout(std::time::Duration::from_secs(60))
                .build()
                .expect("client"),
            dir,
            options,
            pg,
            shutdown: Some(tx),
        }
    }

    /// Stops this server and starts another over the same store and data directory,
    /// with the clock at `now`; every service is opened again.
    pub async fn restart(mut self, now: DateTime<Utc>) -> TestServer {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        let store = self.store.clone();
        let pg = self.pg.take();
        let dir = std::mem::replace(&mut self.dir, tempfile::tempdir().expect("tempdir"));
        let mut options = std::mem::take(&mut self.options);
        options.now = now;
        drop(self);
        Self::serve(store, pg, dir, options).await
    }

    pub fn now(&self) -> DateTime<Utc> {
        self.clock.now()
    }

    /// Organisations every test can name: `org-a` (HOSP_A), `org-b` (HOSP_B),
    /// `org-clinic`, `org-pharmacy`, `org-insurer`, `org-municipality`.
    fn seed_orgs(&self) {
        let orgs = [
            ("org-a", HOSP_A, OrgKind::Hospital, "つなぎ病院A"),
            ("org-b", HOSP_B, OrgKind::Hospital, "なにわ病院B"),
            ("org-clinic", CLINIC, OrgKind::Clinic, "神田クリニック"),
            ("org-pharmacy", PHARMACY, OrgKind::Pharmacy, "つなぎ薬局"),
            (
                "org-insurer",
                INSURER,
                OrgKind::Insurer,
                "つなぎ健康保険組合",
            ),
            (
                "org-municipality",
                MUNICIPALITY,
                OrgKind::Municipality,
                "千代田区",
            ),
        ];
        for (id, code, kind, name) in orgs {
            self.put(
                "Organization",
                id,
                organization(id, code, kind, name, &[]),
                OPERATOR,
            );
        }
    }

    /// Writes a resource directly (setup), as organisation `author` wrote it.
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

    /// A patient (written by hospital B) with an active coverage of the test insurer.
    pub fn seed_person(&self, id: &str, family: &str, given: &str, birth: &str, address: &str) {
        self.put(
            "Patient",
            id,
            json!({"resourceType": "Patient", "id": id,
                "name": [{"text": format!("{family} {given}"), "family": family, "given": [given]}],
                "gender": "female", "birthDate": birth,
                "address": [{"text": address}]}),
            HOSP_B,
        );
        self.put(
            "Coverage",
            &format!("{id}-cov"),
            json!({"resourceType": "Coverage", "id": format!("{id}-cov"), "status": "active",
                "identifier": [{"system": tsunagi_eligibility::emergency::INSURANCE_MEMBER_SYSTEM, "value": format!("{INSURER}:つなぎ:{id}:00")}],
                "beneficiary": {"reference": format!("Patient/{id}")},
                "payor": [{"reference": "Organization/org-insurer"}]}),
            INSURER,
        );
    }

    /// Issues a card directly through the library (as `tsunagi card issue` does).
    pub fn issue_card(
        &self,
        person: &str,
        kind: CardKind,
        not_before: DateTime<Utc>,
        not_after: DateTime<Utc>,
    ) -> Result<CardFile, tsunagi_fhir::FhirError> {
        let store = self.store.clone();
        let shared = self.eligibility.shared.clone();
        let now = self.now();
        let person = person.to_string();
        tokio::task::block_in_place(move || {
            cards::issue(
                &*store,
                &shared.cards,
                &person,
                kind,
                not_before,
                not_after,
                now,
            )
        })
    }

    /// A card valid from yesterday for about five years.
    pub fn card(&self, person: &str) -> CardFile {
        let now = self.now();
        self.issue_card(
            person,
            CardKind::Card,
            now - Duration::days(1),
            now + Duration::days(1800),
        )
        .expect("issue card")
    }

    pub fn token_for(&self, p: &Principal) -> String {
        self.state
            .keys
            .issue(p, chrono::Duration::minutes(30))
            .expect("token")
    }

    /// A staff token of `org` (user `{role}-{org}`), no second factor.
    pub fn token(&self, org: &str, kind: OrgKind, role: Role) -> String {
        self.token_2fa(org, kind, role, false)
    }

    pub fn token_2fa(&self, org: &str, kind: OrgKind, role: Role, second_factor: bool) -> String {
        let p = Principal::new(
            org,
            kind,
            vec![],
            role,
            Some(format!("{role}-{org}")),
            None,
            second_factor,
        )
        .expect("principal");
        self.token_for(&p)
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

    pub fn operator_token(&self) -> String {
        self.token(OPERATOR, OrgKind::Operator, Role::Operator)
    }

    pub fn req(&self, method: Method, path: &str) -> reqwest::RequestBuilder {
        self.http.request(method, format!("{}{path}", self.root))
    }

    pub async fn send(&self, rb: reqwest::RequestBuilder) -> Resp {
        let r = rb.send().await.expect("request");
        let status = r.status().as_u16();
        let headers = r.headers().clone();
        let text = r.text().await.unwrap_or_default();
        let body = serde_json::from_str(&text).unwrap_or(Value::Null);
        Resp {
            status,
            headers,
            text,
            body,
        }
    }

    pub async fn get(&self, token: &str, path: &str) -> Resp {
        self.send(self.req(Method::GET, path).bearer_auth(token))
            .await
    }

    /// GET with `X-Purpose-Of-Use`.
    pub async fn get_as(&self, token: &str, purpose: &str, path: &str) -> Resp {
        self.send(
            self.req(Method::GET, path)
                .bearer_auth(token)
                .header("x-purpose-of-use", purpose),
        )
        .await
    }

    /// A request with a FHIR JSON body and, optionally, `X-Purpose-Of-Use`.
    pub async fn send_json(
        &self,
        method: Method,
        token: &str,
        purpose: Option<&str>,
        path: &str,
        body: &Value,
    ) -> Resp {
        let mut rb = self
            .req(method, path)
            .bearer_auth(token)
            .header("content-type", "application/fhir+json")
            .body(serde_json::to_vec(body).expect("json"));
        if let Some(p) = purpose {
            rb = rb.header("x-purpose-of-use", p);
        }
        self.send(rb).await
    }

    pub async fn post_as(
        &self,
        token: &str,
        purpose: Option<&str>,
        path: &str,
        body: &Value,
    ) -> Resp {
        self.send_json(Method::POST, token, purpose, path, body)
            .await
    }

    pub async fn post(&self, token: &str, path: &str, body: &Value) -> Resp {
        self.post_as(token, None, path, body).await
    }

    pub async fn put_json(&self, token: &str, path: &str, body: &Value) -> Resp {
        self.send_json(Method::PUT, token, None, path, body).await
    }

    pub async fn delete(&self, token: &str, path: &str) -> Resp {
        self.send(self.req(Method::DELETE, path).bearer_auth(token))
            .await
    }

    /// A reception nonce for the caller's facility.
    pub async fn nonce(&self, token: &str) -> String {
        let r = self
            .post(
                token,
                "/fhir/$reception-nonce",
                &json!({"resourceType": "Parameters"}),
            )
            .await;
        assert_eq!(r.status, 200, "{}", r.text);
        r.body["parameter"][0]["valueString"]
            .as_str()
            .expect("nonce")
            .to_string()
    }

    /// A full card reception: nonce, card signature, `$reception` with the consent
    /// choices `[A, B, C]` and the care `setting` ("outpatient" or "inpatient").
    pub async fn reception(
        &self,
        token: &str,
        card: &CardFile,
        consent: [bool; 3],
        setting: &str,
    ) -> Resp {
        let n = self.nonce(token).await;
        let sig = card.sign(&n).expect("sign");
        let body = tsunagi_eligibility::reception::reception_parameters(
            &card.certificate.encode(),
            &sig,
            &n,
            "face",
            consent,
            setting,
        );
        self.post(token, "/fhir/$reception", &body).await
    }

    /// The audit events about a patient, newest first (as the operator sees them).
    pub async fn audit(&self, patient: &str) -> Vec<Value> {
        let op = self.operator_token();
        let r = self
            .get(&op, &format!("/audit/events?patient={patient}&_count=1000"))
            .await;
        assert_eq!(r.status, 200, "{}", r.text);
        r.body["events"].as_array().cloned().unwrap_or_default()
    }
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
    pub headers: reqwest::header::HeaderMap,
    pub text: String,
    pub body: Value,
}

impl Resp {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// Asserts an OperationOutcome with this status whose text contains `needle`.
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

    /// `resource` of the named output parameter(s) of a Parameters body.
    pub fn resources(&self, name: &str) -> Vec<Value> {
        self.body["parameter"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|p| p["name"] == name)
            .map(|p| p["resource"].clone())
            .collect()
    }

    /// The resources of a Bundle body.
    pub fn entries(&self) -> Vec<Value> {
        self.body["entry"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|e| e["resource"].clone())
            .collect()
    }
}
