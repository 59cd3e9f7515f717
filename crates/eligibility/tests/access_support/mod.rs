//! Harness of the eligibility service's black-box tests: the real server
//! (`Builder` + `serve`) with the service installed, on 127.0.0.1:0, over a fresh
//! store (SQLite in a temporary directory, or PostgreSQL in a fresh schema when
//! `TSUNAGI_TEST_PG` is set; otherwise a visible SKIPPED line), and a manual clock.

#![allow(dead_code)]

use std::sync::Arc;

use chrono::{DateTime, Duration, Utc};
use reqwest::Method;
use serde_json::{Value, json};
use tsunagi_eligibility::cards::{self, CardFile, CardKind};
use tsunagi_eligibility::{Config, EligibilityService, ManualClock};
use tsunagi_policy::identity::{OrgKind, PATIENT_ORG, Principal, Role};
use tsunagi_server::orgs::organization;
use tsunagi_server::{AppState, ServerConfig};
use tsunagi_store::conformance;
use tsunagi_store::postgres::PgStore;
use tsunagi_store::sqlite::SqliteStore;
use tsunagi_store::{Store, WriteContext};

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
/// The insurer that writes coverage.
pub const INSURER: &str = "06130014";
pub const MINISTRY: &str = "mhlw";
pub const OPERATOR: &str = "operator";

#[macro_export]
macro_rules! both_backends {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name($crate::access_support::Backend::Sqlite).await
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name($crate::access_support::Backend::Postgres).await
                }
            )*
        }
    };
}

pub struct TestServer {
    pub root: String,
    pub state: AppState,
    pub store: Arc<dyn Store>,
    pub service: EligibilityService,
    pub clock: Arc<ManualClock>,
    pub http: reqwest::Client,
    pub dir: tempfile::TempDir,
    pg: Option<(Arc<PgStore>, String)>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
}

/// Opens a store for the backend, or None (with a SKIPPED line) without PostgreSQL.
pub async fn open_store(
    backend: Backend,
    dir: &std::path::Path,
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
            let schema = conformance::fresh_schema("tsunagi_elig");
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
    pub async fn start(backend: Backend) -> Option<TestServer> {
        Self::start_with(backend, Config::default()).await
    }

    pub async fn start_with(backend: Backend, config: Config) -> Option<TestServer> {
        let dir = tempfile::tempdir().expect("tempdir");
        let (store, pg) = open_store(backend, dir.path()).await?;
        let s = Self::serve(store, pg, dir, config, Utc::now()).await;
        s.seed_orgs();
        Some(s)
    }

    /// A server over an existing store and data dir (restart tests).
    pub async fn serve(
        store: Arc<dyn Store>,
        pg: Option<(Arc<PgStore>, String)>,
        dir: tempfile::TempDir,
        config: Config,
        now: DateTime<Utc>,
    ) -> TestServer {
        let clock = Arc::new(ManualClock::new(now));
        let (st, path, c2, ck) = (
            store.clone(),
            dir.path().to_path_buf(),
            config.clone(),
            clock.clone(),
        );
        let service = tokio::task::spawn_blocking(move || {
            EligibilityService::open_with_clock(st, &path, c2, ck)
        })
        .await
        .expect("join")
        .expect("open service");
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
            .service(Arc::new(service.clone()))
            .build()
            .expect("build");
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(tsunagi_server::serve(state.clone(), listener, async {
            let _ = rx.await;
        }));
        TestServer {
            root: format!("http://{addr}"),
            state,
            store,
            service,
            clock,
            http: reqwest::Client::builder()
                .timeout(std::time::Duration::from_secs(60))
                .build()
                .expect("client"),
            dir,
            pg,
            shutdown: Some(tx),
        }
    }

    /// Stops this server and starts another over the same store and data directory.
    pub async fn restart(mut self, now: DateTime<Utc>) -> TestServer {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        let store = self.store.clone();
        let pg = self.pg.take();
        let dir = std::mem::replace(&mut self.dir, tempfile::tempdir().expect("tempdir"));
        let config = self.service.shared.config.clone();
        drop(self);
        Self::serve(store, pg, dir, config, now).await
    }

    pub fn now(&self) -> DateTime<Utc> {
        use tsunagi_eligibility::Clock;
        self.clock.now()
    }

    fn seed_orgs(&self) {
        self.put(
            "Organization",
            "org-a",
            organization("org-a", HOSP_A, OrgKind::Hospital, "つなぎ病院A", &[]),
            OPERATOR,
        );
        self.put(
            "Organization",
            "org-b",
            organization("org-b", HOSP_B, OrgKind::Hospital, "なにわ病院B", &[]),
            OPERATOR,
        );
        self.put(
            "Organization",
            "org-clinic",
            organization("org-clinic", CLINIC, OrgKind::Clinic, "神田クリニック", &[]),
            OPERATOR,
        );
        self.put(
            "Organization",
            "org-insurer",
            organization(
                "org-insurer",
                INSURER,
                OrgKind::Insurer,
                "つなぎ健康保険組合",
                &[],
            ),
            OPERATOR,
        );
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

    /// A patient with coverage and one record of each category, written by hospital B.
    pub fn seed_patient(&self, id: &str, family: &str, given: &str, birth: &str, address: &str) {
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
        let subj = json!({"reference": format!("Patient/{id}")});
        self.put(
            "Condition",
            &format!("{id}-cond"),
            json!({"resourceType": "Condition", "id": format!("{id}-cond"), "subject": subj, "code": {"text": "高血圧症"}}),
            HOSP_B,
        );
        self.put(
            "Observation",
            &format!("{id}-obs"),
            json!({"resourceType": "Observation", "id": format!("{id}-obs"), "status": "final", "subject": subj, "code": {"text": "HbA1c"}}),
            HOSP_B,
        );
        self.put(
            "MedicationRequest",
            &format!("{id}-med"),
            json!({"resourceType": "MedicationRequest", "id": format!("{id}-med"), "status": "active", "intent": "order", "subject": subj, "medicationCodeableConcept": {"text": "アムロジピン"}}),
            HOSP_B,
        );
        self.put(
            "Composition",
            &format!("{id}-doc"),
            json!({"resourceType": "Composition", "id": format!("{id}-doc"), "status": "final", "type": {"text": "特定健診結果"}, "subject": subj, "date": "2026-04-01", "author": [{"display": "健診機関"}], "title": "特定健診"}),
            HOSP_B,
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
        let shared = self.service.shared.clone();
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

    pub async fn post_as(
        &self,
        token: &str,
        purpose: Option<&str>,
        path: &str,
        body: &Value,
    ) -> Resp {
        let mut rb = self
            .req(Method::POST, path)
            .bearer_auth(token)
            .header("content-type", "application/fhir+json")
            .body(serde_json::to_vec(body).expect("json"));
        if let Some(p) = purpose {
            rb = rb.header("x-purpose-of-use", p);
        }
        self.send(rb).await
    }

    pub async fn post(&self, token: &str, path: &str, body: &Value) -> Resp {
        self.post_as(token, None, path, body).await
    }

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

    /// A full reception: nonce, card signature, `$reception`.
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

    pub async fn audit(&self, patient: &str) -> Vec<Value> {
        let op = self.token(OPERATOR, OrgKind::Operator, Role::Operator);
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
    pub text: String,
    pub body: Value,
}

impl Resp {
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

    /// `resource` of the named output parameter(s).
    pub fn resources(&self, name: &str) -> Vec<Value> {
        self.body["parameter"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|p| p["name"] == name)
            .map(|p| p["resource"].clone())
            .collect()
    }
}

// ------------------------------------------------------------------ the access matrix's oracle

/// Consent state of the target patient (p1) towards the caller's facility.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConsentState {
    None,
    /// Live reception grant at the caller's facility with these categories (A, B, C).
    Live([bool; 3]),
    /// A grant for all categories that ended one second ago.
    Expired,
    /// A live grant for all categories, at another facility.
    OtherFacility,
}

impl ConsentState {
    pub const ALL: [ConsentState; 7] = [
        ConsentState::None,
        ConsentState::Live([true, false, false]),
        ConsentState::Live([false, true, false]),
        ConsentState::Live([false, false, true]),
        ConsentState::Live([true, true, true]),
        ConsentState::Expired,
        ConsentState::OtherFacility,
    ];
}

/// Access mode of the request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Purpose treatment.
    Normal,
    /// Purpose emergency, a session open for this user and patient, second factor.
    Emergency,
    /// Purpose emergency with a session, but the token has no second factor.
    EmergencyNoSecondFactor,
    /// Purpose disaster: the caller's prefecture declared, now inside the period,
    /// the patient looked up by this facility.
    Disaster,
    /// As Disaster, but the declaration names another prefecture.
    DisasterOutsideArea,
    /// As Disaster, but the period ended one second ago.
    DisasterOutsidePeriod,
}

impl Mode {
    pub const ALL: [Mode; 6] = [
        Mode::Normal,
        Mode::Emergency,
        Mode::EmergencyNoSecondFactor,
        Mode::Disaster,
        Mode::DisasterOutsideArea,
        Mode::DisasterOutsidePeriod,
    ];

    pub fn purpose(self) -> tsunagi_policy::Purpose {
        use tsunagi_policy::Purpose;
        match self {
            Mode::Normal => Purpose::Treatment,
            Mode::Emergency | Mode::EmergencyNoSecondFactor => Purpose::Emergency,
            _ => Purpose::Disaster,
        }
    }
}

/// Target types, one per category plus eligibility.
pub const TARGET_TYPES: &[(&str, &str)] = &[
    ("Patient", "eligibility"),
    ("Coverage", "eligibility"),
    ("Condition", "A"),
    ("Procedure", "A"),
    ("Observation", "B"),
    ("MedicationRequest", "B"),
    ("AllergyIntolerance", "B"),
    ("Composition", "C"),
];

/// The specification, stated independently of the rules: may a `role` at an
/// organisation of `kind` read a record of type `rt` of patient p1 written by
/// another organisation, in this consent state and mode?
pub fn expected_read(
    role: Role,
    kind: OrgKind,
    consent: ConsentState,
    mode: Mode,
    rt: &str,
) -> bool {
    let category = TARGET_TYPES
        .iter()
        .find(|(t, _)| *t == rt)
        .map(|(_, c)| *c)
        .unwrap_or("none");
    let eligibility = category == "eligibility";
    let care = matches!(
        kind,
        OrgKind::Hospital | OrgKind::Clinic | OrgKind::DentalClinic | OrgKind::Pharmacy
    );
    let qualified = matches!(role, Role::Doctor | Role::Dentist | Role::Pharmacist);
    let clinical = matches!(
        role,
        Role::Doctor | Role::Dentist | Role::Pharmacist | Role::Nurse
    );
    match mode {
        Mode::Normal => {
            let granted = match consent {
                ConsentState::Live(c) => Some(c),
                _ => None,
            };
            care && (role == Role::Clerk || clinical)
                && granted.is_some_and(|c| {
                    eligibility
                        || qualified
                            && ((category == "A" && c[0])
                                || (category == "B" && c[1])
                                || (category == "C" && c[2]))
                })
        }
        Mode::Emergency => kind == OrgKind::Hospital && role == Role::Doctor,
        Mode::EmergencyNoSecondFactor => false,
        // disaster purpose is open to clinical roles only (the core's purpose rule)
        Mode::Disaster => care && clinical && (eligibility || qualified),
        Mode::DisasterOutsideArea | Mode::DisasterOutsidePeriod => false,
    }
}

/// The organisation code used for a kind in the matrix (prefecture 13 for care facilities).
pub fn org_code(kind: OrgKind) -> &'static str {
    match kind {
        OrgKind::Hospital => HOSP_A,
        OrgKind::Clinic => CLINIC,
        OrgKind::DentalClinic => "1330111118",
        OrgKind::Pharmacy => PHARMACY,
        OrgKind::Insurer => INSURER,
        OrgKind::Municipality | OrgKind::PublicHealthCentre => "131016",
        OrgKind::ResearchOrganisation => "R0000001",
        OrgKind::Operator => OPERATOR,
        OrgKind::Ministry => MINISTRY,
        OrgKind::Patient => tsunagi_policy::identity::PATIENT_ORG,
    }
}
