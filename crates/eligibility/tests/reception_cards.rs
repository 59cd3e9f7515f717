//! Card and smartphone certificates, on both backends: age 14/15 for a
//! smartphone, one device per person (a new phone revokes the old), refused on an
//! expired card, and the simulator's signature accepted at reception and
//! `/auth/card`.

mod access_support;

use access_support::*;
use chrono::{Datelike, Duration};
use serde_json::json;
use tsunagi_eligibility::cards::{CardKind, certificates_of, jst_date};
use tsunagi_policy::identity::{OrgKind, Role};

both_backends!(
    smartphone_age_boundary,
    device_replacement,
    expired_card_refuses_smartphone,
    card_login
);

/// A birth date making the person exactly `years` old tomorrow (JST), i.e. `years - 1` today.
fn birth_turning(s: &TestServer, years: i32, offset_days: i64) -> String {
    let today = jst_date(s.now()) + Duration::days(offset_days);
    let b = today.with_year(today.year() - years).unwrap();
    b.format("%Y-%m-%d").to_string()
}

async fn smartphone_age_boundary(b: Backend) {
    let Some(s) = TestServer::start(b).await else {
        return;
    };
    // 14 (15th birthday tomorrow)
    s.seed_patient(
        "kid",
        "加藤",
        "陽菜",
        &birth_turning(&s, 15, 1),
        "東京都千代田区一番町10",
    );
    // 15 today
    s.seed_patient(
        "teen",
        "森",
        "結衣",
        &birth_turning(&s, 15, 0),
        "東京都千代田区西神田2-7",
    );
    s.card("kid");
    s.card("teen");
    let now = s.now();
    let e = s
        .issue_card("kid", CardKind::Smartphone, now, now + Duration::days(365))
        .unwrap_err();
    assert_eq!(e.status, 422);
    assert!(e.to_string().contains("from age 15"), "{e}");
    assert!(e.to_string().contains("is 14"), "{e}");
    let phone = s
        .issue_card("teen", CardKind::Smartphone, now, now + Duration::days(365))
        .unwrap();
    assert_eq!(phone.certificate.kind, CardKind::Smartphone);
}

async fn device_replacement(b: Backend) {
    let Some(s) = TestServer::start(b).await else {
        return;
    };
    s.seed_patient("p1", "山田", "花子", "1980-02-03", "東京都千代田区1-1");
    s.card("p1");
    let now = s.now();
    let old = s
        .issue_card("p1", CardKind::Smartphone, now, now + Duration::days(365))
        .unwrap();
    let new = s
        .issue_card("p1", CardKind::Smartphone, now, now + Duration::days(365))
        .unwrap();
    let store = s.store.clone();
    let certs = tokio::task::block_in_place(|| certificates_of(&*store, "p1")).unwrap();
    let live_phones: Vec<_> = certs
        .iter()
        .filter(|(c, r)| c.kind == CardKind::Smartphone && !r)
        .collect();
    assert_eq!(live_phones.len(), 1);
    assert_eq!(live_phones[0].0.serial, new.certificate.serial);
    let clerk = s.token(HOSP_A, OrgKind::Hospital, Role::Clerk);
    s.reception(&clerk, &old, [true, true, true], "outpatient")
        .await
        .refused(403, "revoked");
    assert_eq!(
        s.reception(&clerk, &new, [true, true, true], "outpatient")
            .await
            .status,
        200
    );
    // the card itself stays valid
    let events = s.audit("p1").await;
    assert!(
        events
            .iter()
            .any(|e| e["record"]["action"] == "card-revoke"),
        "{events:?}"
    );
    assert_eq!(
        events
            .iter()
            .filter(|e| e["record"]["action"] == "card-issue")
            .count(),
        3
    );
}

async fn expired_card_refuses_smartphone(b: Backend) {
    let Some(s) = TestServer::start(b).await else {
        return;
    };
    s.seed_patient("p1", "山田", "花子", "1980-02-03", "東京都千代田区1-1");
    s.seed_patient("p2", "佐藤", "一郎", "1970-01-01", "東京都千代田区2-2");
    let now = s.now();
    // no card at all
    let e = s
        .issue_card("p2", CardKind::Smartphone, now, now + Duration::days(365))
        .unwrap_err();
    assert!(e.to_string().contains("holds no card"), "{e}");
    // a card that expired one second ago
    s.issue_card(
        "p1",
        CardKind::Card,
        now - Duration::days(1800),
        now - Duration::seconds(1),
    )
    .unwrap();
    let e = s
        .issue_card("p1", CardKind::Smartphone, now, now + Duration::days(365))
        .unwrap_err();
    assert_eq!(e.status, 422);
    assert!(e.to_string().contains("expired"), "{e}");
    // a card valid one more second is enough
    s.issue_card(
        "p1",
        CardKind::Card,
        now - Duration::days(1),
        now + Duration::seconds(1),
    )
    .unwrap();
    assert!(
        s.issue_card("p1", CardKind::Smartphone, now, now + Duration::days(365))
            .is_ok()
    );
    // unknown person
    assert_eq!(
        s.issue_card("nobody", CardKind::Card, now, now + Duration::days(1))
            .unwrap_err()
            .status,
        404
    );
}

async fn card_login(b: Backend) {
    let Some(s) = TestServer::start(b).await else {
        return;
    };
    s.seed_patient("p1", "山田", "花子", "1980-02-03", "東京都千代田区1-1");
    let card = s.card("p1");
    let r = s
        .send(s.req(reqwest::Method::POST, "/auth/card-nonce"))
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    let n = r.body["nonce"].as_str().unwrap().to_string();
    let login = |n: &str, sig: String| json!({"nonce": n, "certificate": card.certificate.encode(), "signature": sig});
    let r = s
        .send(
            s.req(reqwest::Method::POST, "/auth/card")
                .json(&login(&n, card.sign("x").unwrap())),
        )
        .await;
    r.refused(401, "does not verify");
    let r = s
        .send(s.req(reqwest::Method::POST, "/auth/card-nonce"))
        .await;
    let n = r.body["nonce"].as_str().unwrap().to_string();
    let r = s
        .send(
            s.req(reqwest::Method::POST, "/auth/card")
                .json(&login(&n, card.sign(&n).unwrap())),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.body["patient"], "p1");
    let token = r.body["access_token"].as_str().unwrap().to_string();
    let r = s
        .send(
            s.req(reqwest::Method::POST, "/auth/card")
                .json(&login(&n, card.sign(&n).unwrap())),
        )
        .await;
    r.refused(401, "already been used");
    let r = s.get(&token, "/fhir/$my-eligibility").await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.body["entry"][0]["resource"]["id"], "p1-cov");
}
