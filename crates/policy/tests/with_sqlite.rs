//! The policy crate against the real SQLite store: group-committed audit records
//! land hash-chained and queryable; registered client keys authenticate.

use std::collections::HashMap;
use std::sync::Arc;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use chrono::Utc;
use ed25519_dalek::pkcs8::EncodePrivateKey;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::json;
use tsunagi_policy::client::JWT_BEARER_ASSERTION;
use tsunagi_policy::*;
use tsunagi_store::{AuditFilter, ClientKey, SqliteStore, Store};

fn doctor(user: &str) -> Principal {
    Principal::new(
        "1311234567",
        OrgKind::Hospital,
        vec![],
        Role::Doctor,
        Some(user.into()),
        None,
        false,
    )
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_sink_writes_a_valid_chain() {
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn Store> = Arc::new(SqliteStore::open(&dir.path().join("db.sqlite")).unwrap());
    let sink = AuditSink::spawn(store.clone());
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..100 {
        let sink = sink.clone();
        tasks.spawn(async move {
            let rec = AuditRecord::new(
                &doctor(&format!("u{i}")),
                Purpose::Treatment,
                "read",
                format!("r{i}"),
            )
            .with_patient(Some(format!("p{}", i % 3)))
            .with_resources(vec![format!("Observation/o{i}")]);
            sink.record(rec).await
        });
    }
    while let Some(r) = tasks.join_next().await {
        r.unwrap().unwrap();
    }
    let report = tsunagi_store::audit::verify_chain(tsunagi_store::audit::scan_all(&*store));
    assert!(report.ok(), "{:?}", report.problems);
    assert_eq!(report.checked, 100);
    let p0 = store
        .audit_query(&AuditFilter {
            patient: Some("p0".into()),
            purpose: Some("treatment".into()),
            limit: 1000,
            ..Default::default()
        })
        .unwrap();
    assert_eq!(p0.len(), 34);
    assert!(
        p0.iter()
            .all(|e| e.record["org"] == "1311234567" && e.record["outcome"] == "success")
    );
}

#[test]
fn client_key_registered_in_sqlite_authenticates() {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(&dir.path().join("db.sqlite")).unwrap();
    let keys = ServerKeys::load_or_create(dir.path()).unwrap();
    let sk = ed25519_dalek::SigningKey::generate(&mut rand::rngs::OsRng);
    store
        .put_client_key(&ClientKey {
            client_id: "emr-1".into(),
            org: "1311234567".into(),
            kid: "2026-01".into(),
            role: "nurse".into(),
            user: None,
            jwk: json!({"kty": "OKP", "crv": "Ed25519", "x": URL_SAFE_NO_PAD.encode(sk.verifying_key().as_bytes())}),
            created: Utc::now(),
            revoked: false,
        })
        .unwrap();
    let url = "http://127.0.0.1:8080/auth/token";
    let now = Utc::now();
    let mut h = Header::new(Algorithm::EdDSA);
    h.kid = Some("2026-01".into());
    let assertion = jsonwebtoken::encode(
        &h,
        &json!({"iss": "emr-1", "sub": "emr-1", "aud": url, "exp": now.timestamp() + 60, "jti": "a1"}),
        &EncodingKey::from_ed_der(sk.to_pkcs8_der().unwrap().as_bytes()),
    )
    .unwrap();
    let form = HashMap::from([
        ("grant_type".to_string(), "client_credentials".to_string()),
        (
            "client_assertion_type".to_string(),
            JWT_BEARER_ASSERTION.to_string(),
        ),
        ("client_assertion".to_string(), assertion),
    ]);
    let cache = ReplayCache::default();
    let lookup = |_: &str| Some((OrgKind::Clinic, vec![]));
    let res = exchange_client_assertion(&store, &keys, &form, url, now, &cache, &lookup).unwrap();
    let p = keys.verify(&res.access_token, now).unwrap();
    assert_eq!(
        (p.role, p.org_kind, p.user),
        (Role::Nurse, OrgKind::Clinic, None)
    );
    // the same assertion again is a replay
    let err =
        exchange_client_assertion(&store, &keys, &form, url, now, &cache, &lookup).unwrap_err();
    assert_eq!(err.error, "invalid_client");
}
