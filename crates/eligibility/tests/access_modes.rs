//! Emergency access, disaster mode and the patient's self-service over HTTP, on
//! both backends.

mod access_support;

use access_support::*;
use chrono::Duration;
use serde_json::{Value, json};
use tsunagi_policy::identity::{OrgKind, Role};

both_backends!(emergency_access, disaster_mode, self_service);

fn four_items(name: &str, birth: &str, fourth: (&str, &str)) -> Value {
    json!({"resourceType": "Parameters", "parameter": [
        {"name": "reason", "valueCode": "protect-life-or-body"},
        {"name": "name", "valueString": name},
        {"name": "birthDate", "valueDate": birth},
        {"name": "gender", "valueCode": "female"},
        {"name": fourth.0, "valueString": fourth.1}
    ]})
}

async fn emergency_access(b: Backend) {
    let Some(s) = TestServer::start(b).await else {
        return;
    };
    s.seed_patient("p1", "山田", "花子", "1980-02-03", "東京都千代田区1-1");
    s.seed_patient("p2", "山田", "花子", "1980-02-03", "大阪府大阪市北区2-2");
    let doctor = s.token_2fa(HOSP_A, OrgKind::Hospital, Role::Doctor, true);
    let body = four_items("山田 花子", "1980-02-03", ("address", "東京都千代田区 1-1"));
    let e = "emergency";
    // refusals: no second factor, clinic, nurse, wrong purpose, wrong reason, ambiguous 4 items
    let no2fa = s.token(HOSP_A, OrgKind::Hospital, Role::Doctor);
    s.post_as(&no2fa, Some(e), "/fhir/$emergency-access", &body)
        .await
        .refused(403, "second authentication factor");
    let clinic = s.token_2fa(CLINIC, OrgKind::Clinic, Role::Doctor, true);
    s.post_as(&clinic, Some(e), "/fhir/$emergency-access", &body)
        .await
        .refused(403, "hospitals only");
    let pharmacist = s.token_2fa(HOSP_A, OrgKind::Hospital, Role::Pharmacist, true);
    s.post_as(&pharmacist, Some(e), "/fhir/$emergency-access", &body)
        .await
        .refused(403, "no emergency access permission");
    s.post_as(&doctor, Some("treatment"), "/fhir/$emergency-access", &body)
        .await
        .refused(403, "X-Purpose-Of-Use: emergency");
    let mut bad = body.clone();
    bad["parameter"][0]["valueCode"] = json!("curiosity");
    s.post_as(&doctor, Some(e), "/fhir/$emergency-access", &bad)
        .await
        .refused(403, "protect life or body");
    let ambiguous = four_items(
        "山田花子",
        "1980-02-03",
        ("insurerName", "つなぎ健康保険組合"),
    );
    s.post_as(&doctor, Some(e), "/fhir/$emergency-access", &ambiguous)
        .await
        .refused(409, "2 patients match");
    let missing = json!({"resourceType": "Parameters", "parameter": [{"name": "reason", "valueCode": "protect-life-or-body"}, {"name": "name", "valueString": "山田花子"}]});
    s.post_as(&doctor, Some(e), "/fhir/$emergency-access", &missing)
        .await
        .refused(400, "4 items");
    // before a session: nothing
    s.get_as(&doctor, e, "/fhir/Condition/p1-cond")
        .await
        .refused(403, "");
    // the session
    let r = s
        .post_as(&doctor, Some(e), "/fhir/$emergency-access", &body)
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(
        r.body["parameter"][0]["valueReference"]["reference"],
        "Patient/p1"
    );
    assert_eq!(
        s.get_as(&doctor, e, "/fhir/Condition/p1-cond").await.status,
        200
    );
    assert_eq!(
        s.get_as(&doctor, e, "/fhir/Observation/p1-obs")
            .await
            .status,
        200
    );
    let r = s
        .get_as(&doctor, e, "/fhir/Observation?patient=Patient/p1")
        .await;
    assert_eq!(r.body["total"], 1, "{}", r.text);
    // only under purpose emergency, only for that patient, only reads, only that user
    s.get(&doctor, "/fhir/Condition/p1-cond")
        .await
        .refused(403, "");
    s.get_as(&doctor, e, "/fhir/Condition/p2-cond")
        .await
        .refused(403, "");
    let colleague = s.token_2fa(HOSP_A, OrgKind::Hospital, Role::Doctor, true);
    let _ = colleague; // same user name in tests: a different user needs a different principal
    let other = tsunagi_policy::identity::Principal::new(
        HOSP_A,
        OrgKind::Hospital,
        vec![],
        Role::Doctor,
        Some("dr-other".into()),
        None,
        true,
    )
    .unwrap();
    s.get_as(&s.token_for(&other), e, "/fhir/Condition/p1-cond")
        .await
        .refused(403, "");
    let r = s.send(s.req(reqwest::Method::PUT, "/fhir/Condition/p1-cond").bearer_auth(&doctor).header("x-purpose-of-use", e)
        .header("content-type", "application/fhir+json")
        .body(json!({"resourceType": "Condition", "id": "p1-cond", "subject": {"reference": "Patient/p1"}}).to_string())).await;
    assert_eq!(r.status, 403, "{}", r.text);
    // by insurance numbers
    let by_numbers = json!({"resourceType": "Parameters", "parameter": [
        {"name": "reason", "valueCode": "protect-life-or-body"},
        {"name": "insurerNumber", "valueString": INSURER}, {"name": "symbol", "valueString": "つなぎ"}, {"name": "number", "valueString": "p2"}]});
    let r = s
        .post_as(&doctor, Some(e), "/fhir/$emergency-access", &by_numbers)
        .await;
    assert_eq!(
        r.body["parameter"][0]["valueReference"]["reference"], "Patient/p2",
        "{}",
        r.text
    );
    // time-boxed: 2 hours
    let now = s.now();
    s.clock.set(now + Duration::hours(2) - Duration::seconds(1));
    assert_eq!(
        s.get_as(&doctor, e, "/fhir/Condition/p1-cond").await.status,
        200
    );
    s.clock.set(now + Duration::hours(2) + Duration::seconds(1));
    s.get_as(&doctor, e, "/fhir/Condition/p1-cond")
        .await
        .refused(403, "");
    // flagged in the patient's access history
    let pt = s.patient_token("p1");
    let r = s.get(&pt, "/fhir/$my-access-history").await;
    assert_eq!(r.status, 200, "{}", r.text);
    let entries = r.body["entries"].as_array().unwrap();
    assert!(
        entries.iter().any(|x| x["action"] == "emergency-access"
            && x["emergency"] == true
            && x["orgName"] == "つなぎ病院A"),
        "{}",
        r.text
    );
    assert!(
        entries.iter().any(|x| x["action"] == "read"
            && x["purpose"] == "emergency"
            && x["categories"][0] == "A"),
        "{}",
        r.text
    );
}

async fn declare(
    s: &TestServer,
    prefectures: &[&str],
    start: chrono::DateTime<chrono::Utc>,
    end: chrono::DateTime<chrono::Utc>,
) -> Value {
    let ministry = s.token(MINISTRY, OrgKind::Ministry, Role::Ministry);
    let mut params: Vec<Value> = prefectures
        .iter()
        .map(|p| json!({"name": "prefecture", "valueCode": p}))
        .collect();
    params.push(json!({"name": "start", "valueInstant": start.to_rfc3339()}));
    params.push(json!({"name": "end", "valueInstant": end.to_rfc3339()}));
    let r = s
        .post(
            &ministry,
            "/fhir/$disaster-declaration",
            &json!({"resourceType": "Parameters", "parameter": params}),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.text);
    r.body
}

async fn disaster_mode(b: Backend) {
    let Some(s) = TestServer::start(b).await else {
        return;
    };
    s.seed_patient("p1", "山田", "花子", "1980-02-03", "東京都千代田区1-1");
    let d = "disaster";
    let lookup = four_items("山田花子", "1980-02-03", ("address", "東京都千代田区1-1"));
    let doctor_a = s.token(HOSP_A, OrgKind::Hospital, Role::Doctor); // Tokyo (13)
    let doctor_b = s.token("2719999998", OrgKind::Hospital, Role::Doctor); // Osaka (27); hospital B wrote the records
    // only the ministry declares
    s.post(&doctor_a, "/fhir/$disaster-declaration", &json!({"resourceType": "Parameters", "parameter": [{"name": "prefecture", "valueCode": "13"}]})).await.refused(403, "ministry");
    let ministry = s.token(MINISTRY, OrgKind::Ministry, Role::Ministry);
    s.post(&ministry, "/fhir/$disaster-declaration", &json!({"resourceType": "Parameters", "parameter": [{"name": "prefecture", "valueCode": "48"}]})).await.refused(400, "'48' is not a prefecture");
    // no declaration yet
    s.post_as(&doctor_a, Some(d), "/fhir/$disaster-lookup", &lookup)
        .await
        .refused(403, "no disaster declaration covers prefecture 13");
    let t0 = s.now();
    let start = t0 + Duration::hours(1);
    let end = t0 + Duration::days(7);
    declare(&s, &["13", "14"], start, end).await;
    // before the period
    s.clock.set(start - Duration::seconds(1));
    s.post_as(&doctor_a, Some(d), "/fhir/$disaster-lookup", &lookup)
        .await
        .refused(403, "no disaster declaration");
    // inside: Tokyo yes, Osaka no
    s.clock.set(start);
    s.post_as(&doctor_b, Some(d), "/fhir/$disaster-lookup", &lookup)
        .await
        .refused(403, "prefecture 27");
    s.get_as(&doctor_a, d, "/fhir/Condition/p1-cond")
        .await
        .refused(403, "");
    let r = s
        .post_as(&doctor_a, Some(d), "/fhir/$disaster-lookup", &lookup)
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(
        r.body["parameter"][0]["valueReference"]["reference"],
        "Patient/p1"
    );
    assert_eq!(
        s.get_as(&doctor_a, d, "/fhir/Condition/p1-cond")
            .await
            .status,
        200
    );
    assert_eq!(
        s.get_as(&doctor_a, d, "/fhir/Composition/p1-doc")
            .await
            .status,
        200
    );
    s.get(&doctor_a, "/fhir/Condition/p1-cond")
        .await
        .refused(403, ""); // purpose treatment: no card consent
    s.get_as(&doctor_b, d, "/fhir/Condition/p1-cond")
        .await
        .refused(403, "");
    // clerks may not act in disaster mode (their role has purpose treatment only)
    let clerk = s.token(HOSP_A, OrgKind::Hospital, Role::Clerk);
    s.post_as(&clerk, Some(d), "/fhir/$disaster-lookup", &lookup)
        .await
        .refused(403, "");
    // last second of the period, then after
    s.clock.set(end - Duration::seconds(1));
    assert_eq!(
        s.get_as(&doctor_a, d, "/fhir/Condition/p1-cond")
            .await
            .status,
        200
    );
    s.clock.set(end);
    s.get_as(&doctor_a, d, "/fhir/Condition/p1-cond")
        .await
        .refused(403, "");
    s.post_as(&doctor_a, Some(d), "/fhir/$disaster-lookup", &lookup)
        .await
        .refused(403, "no disaster declaration");
    // declarations are listed (and the listing audited) and survive a restart
    let now = s.now();
    let s = s.restart(now).await;
    let doctor_a = s.token(HOSP_A, OrgKind::Hospital, Role::Doctor);
    let r = s.get(&doctor_a, "/fhir/$disaster-declaration").await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.body["total"], 1);
    assert_eq!(
        r.body["declarations"][0]["prefectures"],
        json!(["13", "14"])
    );
    assert_eq!(r.body["declarations"][0]["inForce"], false);
    let op = s.token(OPERATOR, OrgKind::Operator, Role::Operator);
    let r = s.get(&op, &format!("/audit/events?org={MINISTRY}")).await;
    assert!(r.text.contains("\"disaster-declaration\""), "{}", r.text);
    let r = s
        .get(&op, &format!("/audit/events?org={HOSP_A}&_count=1000"))
        .await;
    assert!(r.text.contains("disaster-declaration-list"), "{}", r.text);
    // the lookup is a consent with purpose disaster, shown to the patient
    let pt = s.patient_token("p1");
    let r = s.get(&pt, "/fhir/$my-access-history").await;
    assert!(
        r.body["entries"]
            .as_array()
            .unwrap()
            .iter()
            .any(|x| x["action"] == "disaster-lookup" && x["purpose"] == "disaster"),
        "{}",
        r.text
    );
}

async fn self_service(b: Backend) {
    let Some(s) = TestServer::start(b).await else {
        return;
    };
    s.seed_patient("p1", "山田", "花子", "1980-02-03", "東京都千代田区1-1");
    let card = s.card("p1");
    let doctor = s.token(HOSP_A, OrgKind::Hospital, Role::Doctor);
    let r = s
        .reception(&doctor, &card, [true, true, false], "outpatient")
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    let grant_id = r.resources("grant")[0]["id"].as_str().unwrap().to_string();
    assert_eq!(s.get(&doctor, "/fhir/Observation/p1-obs").await.status, 200);
    let pt = s.patient_token("p1");
    // only patients use the self-service endpoints
    s.get(&doctor, "/fhir/$my-consents")
        .await
        .refused(403, "patient's own");
    let r = s.get(&pt, "/fhir/$my-eligibility").await;
    assert_eq!(r.body["entry"][0]["resource"]["id"], "p1-cov", "{}", r.text);
    let r = s.get(&pt, "/fhir/$my-consents").await;
    assert_eq!(r.body["total"], 1, "{}", r.text);
    assert_eq!(r.body["entry"][0]["resource"]["id"], grant_id.as_str());
    // another patient cannot revoke it
    let other = s.patient_token("p2");
    s.post(
        &other,
        &format!("/fhir/$my-consents/{grant_id}/$revoke"),
        &json!({}),
    )
    .await
    .refused(403, "");
    let r = s
        .post(
            &pt,
            &format!("/fhir/$my-consents/{grant_id}/$revoke"),
            &json!({}),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.body["status"], "inactive");
    s.get(&doctor, "/fhir/Observation/p1-obs")
        .await
        .refused(403, "consent");
    s.post(
        &pt,
        &format!("/fhir/$my-consents/{grant_id}/$revoke"),
        &json!({}),
    )
    .await
    .refused(409, "no longer in force");
    // the access history: who, when, which categories, under what purpose
    let r = s.get(&pt, "/fhir/$my-access-history").await;
    assert_eq!(r.status, 200, "{}", r.text);
    let entries = r.body["entries"].as_array().unwrap();
    let obs_read = entries
        .iter()
        .find(|x| {
            x["action"] == "read"
                && x["resourceTypes"] == json!(["Observation"])
                && x["outcome"] == "success"
        })
        .expect(&r.text);
    assert_eq!(obs_read["org"], HOSP_A);
    assert_eq!(obs_read["orgName"], "つなぎ病院A");
    assert_eq!(obs_read["categories"], json!(["B"]));
    assert_eq!(obs_read["purpose"], "treatment");
    assert!(
        entries.iter().any(|x| x["action"] == "reception"),
        "{}",
        r.text
    );
    assert!(
        entries
            .iter()
            .any(|x| x["outcome"] == "denied" && x["org"] == HOSP_A),
        "denied attempts are shown too: {}",
        r.text
    );
    // the patient's own requests are not listed
    assert!(
        !entries.iter().any(|x| x["role"] == "patient"),
        "{}",
        r.text
    );
}
