//! Card reception end to end over HTTP, on both storage backends: nonce, card
//! signature, `$reception`, the grant it gives (categories, roles, exact expiry),
//! every refusal (replayed or stale nonce, wrong signature, revoked, expired or
//! foreign certificate, failed identity check), and grants surviving a restart.

mod access_support;

use access_support::*;
use chrono::Duration;
use serde_json::json;
use tsunagi_eligibility::cards::{CardAuthority, CardKind};
use tsunagi_policy::identity::{OrgKind, Role};

both_backends!(
    reception_grants_consented_categories,
    grant_expires_exactly,
    refusals,
    grants_survive_restart_and_supersede,
    inpatient_and_hidden_history,
);

async fn reception_grants_consented_categories(b: Backend) {
    let Some(s) = TestServer::start(b).await else {
        return;
    };
    s.seed_patient("p1", "山田", "花子", "1980-02-03", "東京都千代田区1-1");
    let card = s.card("p1");
    let clerk = s.token(HOSP_A, OrgKind::Hospital, Role::Clerk);
    let doctor = s.token(HOSP_A, OrgKind::Hospital, Role::Doctor);
    let nurse = s.token(HOSP_A, OrgKind::Hospital, Role::Nurse);
    // before reception: nothing of another facility's records
    s.get(&doctor, "/fhir/Condition/p1-cond")
        .await
        .refused(403, "consent");
    s.get(&clerk, "/fhir/Coverage/p1-cov")
        .await
        .refused(403, "");

    // consent to A only, at the reader operated by the clerk
    let r = s
        .reception(&clerk, &card, [true, false, false], "outpatient")
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    let cov = r.resources("coverage");
    assert_eq!(cov.len(), 1, "{}", r.text);
    assert_eq!(cov[0]["id"], "p1-cov");
    let grant = &r.resources("grant")[0];
    assert_eq!(grant["resourceType"], "Consent");
    assert_eq!(grant["status"], "active");
    assert_eq!(grant["organization"][0]["identifier"]["value"], HOSP_A);
    assert_eq!(grant["provision"]["code"].as_array().unwrap().len(), 1);
    assert_eq!(grant["provision"]["code"][0]["coding"][0]["code"], "A");
    let start = chrono::DateTime::parse_from_rfc3339(
        grant["provision"]["period"]["start"].as_str().unwrap(),
    )
    .unwrap();
    let end =
        chrono::DateTime::parse_from_rfc3339(grant["provision"]["period"]["end"].as_str().unwrap())
            .unwrap();
    assert_eq!(end - start, Duration::hours(24));

    // doctor: A yes, B and C no; eligibility yes
    assert_eq!(s.get(&doctor, "/fhir/Condition/p1-cond").await.status, 200);
    assert_eq!(s.get(&doctor, "/fhir/Patient/p1").await.status, 200);
    assert_eq!(s.get(&doctor, "/fhir/Coverage/p1-cov").await.status, 200);
    s.get(&doctor, "/fhir/Observation/p1-obs")
        .await
        .refused(403, "consent");
    s.get(&doctor, "/fhir/Composition/p1-doc")
        .await
        .refused(403, "");
    // writes never come from a grant
    let r = s.send(s.req(reqwest::Method::PUT, "/fhir/Condition/p1-cond").bearer_auth(&doctor)
        .header("content-type", "application/fhir+json")
        .body(json!({"resourceType": "Condition", "id": "p1-cond", "subject": {"reference": "Patient/p1"}}).to_string())).await;
    assert_eq!(r.status, 403, "{}", r.text);
    // clerk and nurse: eligibility only
    assert_eq!(s.get(&clerk, "/fhir/Coverage/p1-cov").await.status, 200);
    assert_eq!(s.get(&clerk, "/fhir/Patient/p1").await.status, 200);
    s.get(&clerk, "/fhir/Condition/p1-cond")
        .await
        .refused(403, "");
    s.get(&nurse, "/fhir/Condition/p1-cond")
        .await
        .refused(403, "");
    assert_eq!(s.get(&nurse, "/fhir/Coverage/p1-cov").await.status, 200);
    // another facility: nothing
    let doctor_c = s.token(CLINIC, OrgKind::Clinic, Role::Doctor);
    s.get(&doctor_c, "/fhir/Condition/p1-cond")
        .await
        .refused(403, "");
    // searches run within the granted types
    let r = s.get(&doctor, "/fhir/Condition?patient=Patient/p1").await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.body["total"], 1, "{}", r.text);
    let r = s.get(&doctor, "/fhir/Observation?patient=Patient/p1").await;
    assert!(r.status == 403 || r.body["total"] == 0, "{}", r.text);
    // $everything: Patient, Coverage, Condition only
    let r = s.get(&doctor, "/fhir/Patient/p1/$everything").await;
    assert_eq!(r.status, 200, "{}", r.text);
    let mut types: Vec<String> = r.body["entry"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["resource"]["resourceType"].as_str().unwrap().to_string())
        .collect();
    types.sort();
    assert_eq!(types, ["Condition", "Coverage", "Patient"], "{}", r.text);
    // the reception is audited with the patient
    let events = s.audit("p1").await;
    assert!(
        events
            .iter()
            .any(|e| e["record"]["action"] == "reception" && e["record"]["outcome"] == "success"),
        "{events:?}"
    );
}

async fn grant_expires_exactly(b: Backend) {
    let Some(s) = TestServer::start(b).await else {
        return;
    };
    s.seed_patient("p1", "山田", "花子", "1980-02-03", "東京都千代田区1-1");
    let card = s.card("p1");
    let doctor = s.token(HOSP_A, OrgKind::Hospital, Role::Doctor);
    let t0 = s.now();
    let r = s
        .reception(&doctor, &card, [true, true, true], "outpatient")
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    let end = t0 + Duration::hours(24);
    s.clock.set(end - Duration::seconds(1));
    assert_eq!(s.get(&doctor, "/fhir/Observation/p1-obs").await.status, 200);
    assert_eq!(
        s.get(&doctor, "/fhir/Observation?patient=Patient/p1")
            .await
            .body["total"],
        1
    );
    s.clock.set(end);
    s.get(&doctor, "/fhir/Observation/p1-obs")
        .await
        .refused(403, "");
    s.clock.set(end + Duration::seconds(1));
    s.get(&doctor, "/fhir/Observation/p1-obs")
        .await
        .refused(403, "consent");
    s.get(&doctor, "/fhir/Coverage/p1-cov")
        .await
        .refused(403, "");
    let r = s.get(&doctor, "/fhir/Observation?patient=Patient/p1").await;
    assert!(r.status == 403 || r.body["total"] == 0, "{}", r.text);
}

async fn refusals(b: Backend) {
    let Some(s) = TestServer::start(b).await else {
        return;
    };
    s.seed_patient("p1", "山田", "花子", "1980-02-03", "東京都千代田区1-1");
    let card = s.card("p1");
    let clerk = s.token(HOSP_A, OrgKind::Hospital, Role::Clerk);
    let body = |n: &str, sig: &str, cert: &str, check: &str| {
        tsunagi_eligibility::reception::reception_parameters(
            cert,
            sig,
            n,
            check,
            [true, true, true],
            "outpatient",
        )
    };
    let cert = card.certificate.encode();

    // replayed nonce
    let n = s.nonce(&clerk).await;
    let sig = card.sign(&n).unwrap();
    assert_eq!(
        s.post(&clerk, "/fhir/$reception", &body(&n, &sig, &cert, "face"))
            .await
            .status,
        200
    );
    s.post(&clerk, "/fhir/$reception", &body(&n, &sig, &cert, "face"))
        .await
        .refused(403, "already been used");
    // stale nonce
    let n = s.nonce(&clerk).await;
    s.clock.advance(Duration::seconds(301));
    s.post(
        &clerk,
        "/fhir/$reception",
        &body(&n, &card.sign(&n).unwrap(), &cert, "face"),
    )
    .await
    .refused(403, "expired");
    // unknown nonce
    s.post(
        &clerk,
        "/fhir/$reception",
        &body("made-up", &card.sign("made-up").unwrap(), &cert, "face"),
    )
    .await
    .refused(403, "not issued");
    // nonce of another facility
    let other = s.token(HOSP_B, OrgKind::Hospital, Role::Clerk);
    let n = s.nonce(&other).await;
    s.post(
        &clerk,
        "/fhir/$reception",
        &body(&n, &card.sign(&n).unwrap(), &cert, "face"),
    )
    .await
    .refused(403, "another facility");
    // wrong signature: signed over another nonce
    let n = s.nonce(&clerk).await;
    s.post(
        &clerk,
        "/fhir/$reception",
        &body(&n, &card.sign("other").unwrap(), &cert, "face"),
    )
    .await
    .refused(403, "does not verify");
    // a failed identity check at the reader
    let n = s.nonce(&clerk).await;
    s.post(
        &clerk,
        "/fhir/$reception",
        &body(&n, &card.sign(&n).unwrap(), &cert, "failed"),
    )
    .await
    .refused(403, "identity check failed");
    // a certificate from another authority
    let foreign = {
        let mut c = card.certificate.clone();
        // same fields, signed by a different authority
        CardAuthority::ephemeral().sign(&mut c);
        c
    };
    let n = s.nonce(&clerk).await;
    s.post(
        &clerk,
        "/fhir/$reception",
        &body(&n, &card.sign(&n).unwrap(), &foreign.encode(), "face"),
    )
    .await
    .refused(403, "not issued by the card authority");
    // a tampered certificate (another person)
    let mut tampered = card.certificate.clone();
    tampered.person = "p2".into();
    let n = s.nonce(&clerk).await;
    s.post(
        &clerk,
        "/fhir/$reception",
        &body(&n, &card.sign(&n).unwrap(), &tampered.encode(), "face"),
    )
    .await
    .refused(403, "not issued by the card authority");
    // expired certificate
    let now = s.now();
    let old = s
        .issue_card(
            "p1",
            CardKind::Card,
            now - Duration::days(10),
            now - Duration::seconds(1),
        )
        .unwrap();
    let n = s.nonce(&clerk).await;
    s.post(
        &clerk,
        "/fhir/$reception",
        &body(
            &n,
            &old.sign(&n).unwrap(),
            &old.certificate.encode(),
            "face",
        ),
    )
    .await
    .refused(403, "expired");
    // revoked certificate
    let store = s.store.clone();
    let serial = card.certificate.serial.clone();
    tokio::task::block_in_place(|| tsunagi_eligibility::cards::revoke(&*store, &serial)).unwrap();
    let n = s.nonce(&clerk).await;
    s.post(
        &clerk,
        "/fhir/$reception",
        &body(&n, &card.sign(&n).unwrap(), &cert, "face"),
    )
    .await
    .refused(403, "revoked");
    // wrong callers
    let insurer = s.token(INSURER, OrgKind::Insurer, Role::InsurerStaff);
    s.post(
        &insurer,
        "/fhir/$reception-nonce",
        &json!({"resourceType": "Parameters"}),
    )
    .await
    .refused(403, "care facility");
    // malformed input names the parameter
    s.post(
        &clerk,
        "/fhir/$reception",
        &json!({"resourceType": "Parameters", "parameter": []}),
    )
    .await
    .refused(400, "certificate");
    // every refusal is audited as denied
    let op = s.token(OPERATOR, OrgKind::Operator, Role::Operator);
    let r = s
        .get(&op, &format!("/audit/events?org={HOSP_A}&_count=1000"))
        .await;
    let denied = r.body["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["record"]["action"] == "reception" && e["record"]["outcome"] == "denied")
        .count();
    assert!(
        denied >= 9,
        "{denied} denied receptions audited: {}",
        r.text
    );
}

async fn grants_survive_restart_and_supersede(b: Backend) {
    let Some(s) = TestServer::start(b).await else {
        return;
    };
    s.seed_patient("p1", "山田", "花子", "1980-02-03", "東京都千代田区1-1");
    let card = s.card("p1");
    let doctor = s.token(HOSP_A, OrgKind::Hospital, Role::Doctor);
    assert_eq!(
        s.reception(&doctor, &card, [true, true, false], "outpatient")
            .await
            .status,
        200
    );
    // a second reception with narrower choices replaces the first
    assert_eq!(
        s.reception(&doctor, &card, [true, false, false], "outpatient")
            .await
            .status,
        200
    );
    s.get(&doctor, "/fhir/Observation/p1-obs")
        .await
        .refused(403, "");
    assert_eq!(s.get(&doctor, "/fhir/Condition/p1-cond").await.status, 200);
    let now = s.now();
    let s = s.restart(now + Duration::hours(1)).await;
    let doctor = s.token(HOSP_A, OrgKind::Hospital, Role::Doctor);
    assert_eq!(
        s.get(&doctor, "/fhir/Condition/p1-cond").await.status,
        200,
        "grant reloaded from the store"
    );
    s.get(&doctor, "/fhir/Observation/p1-obs")
        .await
        .refused(403, "");
    // the patient sees one active, one superseded consent
    let pt = s.patient_token("p1");
    let r = s.get(&pt, "/fhir/$my-consents").await;
    assert_eq!(r.status, 200, "{}", r.text);
    let mut st: Vec<String> = r.body["entry"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["resource"]["status"].as_str().unwrap().to_string())
        .collect();
    st.sort();
    assert_eq!(st, ["active", "inactive"]);
}

async fn inpatient_and_hidden_history(b: Backend) {
    let Some(s) = TestServer::start(b).await else {
        return;
    };
    s.seed_patient("p1", "山田", "花子", "1980-02-03", "東京都千代田区1-1");
    let card = s.card("p1");
    let doctor = s.token(HOSP_A, OrgKind::Hospital, Role::Doctor);
    let t0 = s.now();
    assert_eq!(
        s.reception(&doctor, &card, [true, true, true], "inpatient")
            .await
            .status,
        200
    );
    s.clock.set(t0 + Duration::days(30));
    assert_eq!(
        s.get(&doctor, "/fhir/Condition/p1-cond").await.status,
        200,
        "admission outlasts 24 hours"
    );
    // the facility hides clinical history: only drug-related types remain
    let clerk = s.token(HOSP_A, OrgKind::Hospital, Role::Clerk);
    let hide = json!({"resourceType": "Parameters", "parameter": [{"name": "hideClinicalHistory", "valueBoolean": true}]});
    let r = s
        .send(
            s.req(reqwest::Method::PUT, "/fhir/$facility-settings")
                .bearer_auth(&clerk)
                .header("content-type", "application/fhir+json")
                .body(hide.to_string()),
        )
        .await;
    r.refused(403, "doctor, dentist or pharmacist");
    let r = s
        .send(
            s.req(reqwest::Method::PUT, "/fhir/$facility-settings")
                .bearer_auth(&doctor)
                .header("content-type", "application/fhir+json")
                .body(hide.to_string()),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    s.get(&doctor, "/fhir/Condition/p1-cond")
        .await
        .refused(403, "");
    s.get(&doctor, "/fhir/Observation/p1-obs")
        .await
        .refused(403, "");
    assert_eq!(
        s.get(&doctor, "/fhir/MedicationRequest/p1-med")
            .await
            .status,
        200
    );
    assert_eq!(s.get(&doctor, "/fhir/Coverage/p1-cov").await.status, 200);
    let r = s.get(&doctor, "/fhir/$facility-settings").await;
    assert_eq!(r.body["parameter"][1]["valueBoolean"], true, "{}", r.text);
    // discharge ends the admission's grant now
    let r = s.post(&doctor, "/fhir/$discharge", &json!({"resourceType": "Parameters", "parameter": [{"name": "patient", "valueReference": {"reference": "Patient/p1"}}]})).await;
    assert_eq!(r.status, 400, "{}", r.text); // valueReference is not a string parameter
    let r = s.post(&doctor, "/fhir/$discharge", &json!({"resourceType": "Parameters", "parameter": [{"name": "patient", "valueString": "Patient/p1"}]})).await;
    assert_eq!(r.status, 200, "{}", r.text);
    s.get(&doctor, "/fhir/MedicationRequest/p1-med")
        .await
        .refused(403, "");
    s.post(&doctor, "/fhir/$discharge", &json!({"resourceType": "Parameters", "parameter": [{"name": "patient", "valueString": "p1"}]})).await.refused(404, "no live inpatient consent");
    assert_eq!(
        s.reception(&doctor, &card, [true, true, true], "inpatient")
            .await
            .status,
        200
    );
    // the setting survives a restart
    let now = s.now();
    let s = s.restart(now).await;
    let doctor = s.token(HOSP_A, OrgKind::Hospital, Role::Doctor);
    s.get(&doctor, "/fhir/Condition/p1-cond")
        .await
        .refused(403, "");
    assert_eq!(
        s.get(&doctor, "/fhir/MedicationRequest/p1-med")
            .await
            .status,
        200
    );
}
