//! The sharing service's test setup on the shared testkit: the real server with
//! the eligibility and sharing services and the JP-CLINS validator (packages +
//! masters from ../shared), on both backends, one manual clock.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use chrono::Duration;
use serde_json::{Value, json};
use tsunagi_eligibility::consent::{Category, Grant, GrantKind};
use tsunagi_policy::identity::{OrgKind, Role};
use tsunagi_sharing::SharingService;

pub use tsunagi_testkit::{Backend, Resp, both_backends};

/// The registering hospital (the JP-CLINS examples' institution number).
pub const HOSP: &str = "1318814790";
/// The addressee clinic of the example referral letter.
pub const CLINIC: &str = "1311234567";
/// A third institution.
pub const OTHER: &str = tsunagi_testkit::HOSP_A;
pub const INSURER: &str = tsunagi_testkit::INSURER;
/// A public health centre (of the municipality).
pub const CENTRE: &str = tsunagi_testkit::MUNICIPALITY;

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

/// The testkit server with the sharing service and the JP-CLINS validator,
/// two patients with coverage, and the helpers the scenarios share.
pub struct TestServer(pub tsunagi_testkit::TestServer);

impl std::ops::Deref for TestServer {
    type Target = tsunagi_testkit::TestServer;
    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl TestServer {
    pub async fn start(backend: Backend) -> Option<TestServer> {
        let v = tokio::task::spawn_blocking(validator)
            .await
            .expect("validator");
        let options = tsunagi_testkit::Options::default()
            .validator(v)
            .at("2026-11-21T01:00:00Z".parse().unwrap())
            .service(|ctx| {
                let clock: Arc<dyn tsunagi_sharing::Clock> = ctx.clock.clone();
                Arc::new(SharingService::with_clock(Default::default(), clock))
            });
        let s = TestServer(tsunagi_testkit::TestServer::start_with(backend, options).await?);
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

    pub fn advance(&self, d: Duration) {
        self.clock.advance(d);
    }

    /// A live reception consent grant of `org` for `patient` (what `$reception`
    /// records), straight into the eligibility service's index.
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

    pub fn doctor(&self, org: &str) -> String {
        self.token_2fa(org, OrgKind::Hospital, Role::Doctor, true)
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

/// An official example from ../shared/fixtures/jp-examples.
pub fn example(rel: &str) -> Value {
    let p = shared(&format!("fixtures/jp-examples/{rel}"));
    serde_json::from_slice(&std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display())))
        .expect("json")
}
