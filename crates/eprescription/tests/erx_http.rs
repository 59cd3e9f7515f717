//! Black-box HTTP tests of the e-prescription service on both backends: the
//! official examples, qualification and signatures, every state transition, the
//! race of two pharmacies, refill and split dispensing, each alert kind with and
//! without consent, paper prescriptions, statistics, audit and the patient's view.

use std::path::Path;
use std::sync::{Arc, OnceLock};

use serde_json::{Value, json};
use tsunagi_eprescription::{Clock, Config, EprescriptionService, keys};
use tsunagi_policy::identity::{OrgKind, Role};
use tsunagi_terminology::{HotCode, Interaction, Terminology};
use tsunagi_testkit::*;

const YJ: &str = "urn:oid:1.2.392.100495.20.1.73";
const FAMOTIDINE_TAB: &str = "2325003F1020";
const FAMOTIDINE_POWDER: &str = "2325003B2029"; // same ingredient
const NIZATIDINE: &str = "2325005F1020"; // same class 2325
const WARFARIN: &str = "3332001F1028";
const INTERACTING: &str = "2171022F1022"; // listed with warfarin below
const LOXOPROFEN: &str = "1149019F1560";
const HOT9: &str = "urn:oid:1.2.392.200119.4.403.1";
/// カルボシステイン錠２５０ｍｇ: the official MedicationRequest example codes the
/// one line with both, HOT9 `103831601` and YJ `2233002F1280`.
const CARBOCISTEINE_HOT9: &str = "103831601";
const CARBOCISTEINE_YJ: &str = "2233002F1280";
const PHARMACY_2: &str = "1340333331";
const INS: &str = tsunagi_testkit::INSURER;

fn shared(rel: &str) -> std::path::PathBuf {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../../../shared")).join(rel)
}

fn terms() -> Terminology {
    let mut t = Terminology::default();
    t.set_interactions(vec![Interaction {
        code_a: "3332001".into(),
        code_b: INTERACTING.into(),
        reason: "抗凝固作用が増強する".into(),
    }]);
    // one row of the HOT code master (the importer's own tests read the file layout)
    t.set_hot(vec![HotCode {
        hot9: CARBOCISTEINE_HOT9.into(),
        yj_code: CARBOCISTEINE_YJ.into(),
        receipt_code: String::new(),
        name: "カルボシステイン錠２５０ｍｇ".into(),
    }]);
    t
}

fn options(config: Config) -> Options {
    // 12:00 JST on the day the test data is written for
    let noon: chrono::DateTime<chrono::Utc> = "2026-11-21T03:00:00Z".parse().unwrap();
    Options::default().at(noon).service(move |c| {
        let clock: Arc<dyn Clock> = c.clock.clone();
        Arc::new(EprescriptionService::new(terms(), config.clone(), clock))
    })
}

async fn start(b: Backend) -> Option<TestServer> {
    TestServer::start_with(b, options(Config::default())).await
}

fn mr(code: &str, days: u32) -> Value {
    json!({"resourceType": "MedicationRequest", "status": "active", "intent": "order",
        "medicationCodeableConcept": {"coding": [{"system": YJ, "code": code, "display": format!("薬{code}")}]},
        "subject": {"reference": "urn:uuid:6b4e6a12-7bb3-5d46-a126-31b33410f700"},
        "authoredOn": "2026-11-21",
        "dispenseRequest": {"expectedSupplyDuration": {"value": days, "unit": "日", "system": "http://unitsofmeasure.org", "code": "d"}}})
}

fn bundle(mrs: Vec<Value>) -> Value {
    let entries: Vec<Value> = mrs
        .into_iter()
        .enumerate()
        .map(|(i, r)| json!({"fullUrl": format!("urn:uuid:6b4e6a12-7bb3-5d46-a126-31b33410f7{i:02}"), "resource": r}))
        .collect();
    json!({"resourceType": "Bundle", "type": "document", "entry": entries})
}

fn params(p: Vec<Value>) -> Value {
    json!({"resourceType": "Parameters", "parameter": p})
}

fn md(code: &str, days: u32) -> Value {
    json!({"resourceType": "MedicationDispense", "status": "completed",
        "medicationCodeableConcept": {"coding": [{"system": YJ, "code": code, "display": format!("薬{code}")}]},
        "daysSupply": {"value": days, "unit": "日", "system": "http://unitsofmeasure.org", "code": "d"},
        "whenHandedOver": "2026-11-21"})
}

fn value(r: &Resp, name: &str) -> Value {
    r.body["parameter"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|p| p["name"] == name)
        .map(|p| {
            p.as_object()
                .unwrap()
                .iter()
                .find(|(k, _)| k.starts_with("value"))
                .map(|(_, v)| v.clone())
                .unwrap_or(Value::Null)
        })
        .unwrap_or(Value::Null)
}

fn text(r: &Resp, name: &str) -> String {
    value(r, name).as_str().unwrap_or_default().to_string()
}

fn doctor(s: &TestServer, org: &str) -> String {
    s.token(org, OrgKind::Hospital, Role::Doctor)
}

fn pharmacist(s: &TestServer, org: &str) -> String {
    s.token(org, OrgKind::Pharmacy, Role::Pharmacist)
}

/// Prescribes `mrs` for `patient` as a doctor of `org`; returns (id, exchange number).
async fn prescribe(s: &TestServer, org: &str, patient: &str, mrs: Vec<Value>) -> (String, String) {
    let r = s
        .post(
            &doctor(s, org),
            "/fhir/$erx-prescribe",
            &params(vec![
                json!({"name": "patient", "valueString": patient}),
                json!({"name": "prescription", "resource": bundle(mrs)}),
            ]),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.text);
    (text(&r, "prescriptionId"), text(&r, "exchangeNumber"))
}

/// Identity by insurance numbers + birth date (the test insurer's coverage).
fn by_insurance(patient: &str, birth: &str) -> Vec<Value> {
    vec![
        json!({"name": "insurerNumber", "valueString": INS}),
        json!({"name": "symbol", "valueString": "つなぎ"}),
        json!({"name": "number", "valueString": patient}),
        json!({"name": "branch", "valueString": "00"}),
        json!({"name": "birthDate", "valueDate": birth}),
    ]
}

async fn accept(s: &TestServer, pharmacy: &str, patient: &str, exchange: &str) -> Resp {
    let mut p = vec![json!({"name": "exchangeNumber", "valueString": exchange})];
    p.extend(by_insurance(patient, "1970-01-01"));
    s.post(&pharmacist(s, pharmacy), "/fhir/$erx-accept", &params(p))
        .await
}

async fn dispense(s: &TestServer, pharmacy: &str, id: &str, last: bool, mds: Vec<Value>) -> Resp {
    let mut p = vec![
        json!({"name": "prescriptionId", "valueString": id}),
        json!({"name": "final", "valueBoolean": last}),
    ];
    p.extend(
        mds.into_iter()
            .map(|m| json!({"name": "medicationDispense", "resource": m})),
    );
    s.post(&pharmacist(s, pharmacy), "/fhir/$erx-dispense", &params(p))
        .await
}

async fn rx_call(s: &TestServer, token: &str, op: &str, id: &str) -> Resp {
    s.post(
        token,
        &format!("/fhir/${op}"),
        &params(vec![json!({"name": "prescriptionId", "valueString": id})]),
    )
    .await
}

/// A patient with a card-less identity path: coverage of insurer [`INS`].
fn person(s: &TestServer, id: &str) {
    s.seed_person(id, "処方", id, "1970-01-01", "東京都千代田区1-1");
    s.put(
        "Coverage",
        &format!("{id}-cov2"),
        json!({"resourceType": "Coverage", "id": format!("{id}-cov2"), "status": "active",
            "identifier": [{"system": tsunagi_eligibility::emergency::INSURANCE_MEMBER_SYSTEM, "value": format!("{INS}:つなぎ:{id}:00")}],
            "beneficiary": {"reference": format!("Patient/{id}")},
            "payor": [{"reference": "Organization/org-insurer"}]}),
        INS,
    );
}

// ---------------------------------------------------------------- examples

/// The package the examples were published with (the draft data IG 0.1.0
/// conformance resources) over R4 core. Its profiles are differential-only, so the
/// validator checks the base definitions and the IG's terminology (see docs).
fn example_validator() -> Arc<tsunagi_validation::Validator> {
    static V: OnceLock<Arc<tsunagi_validation::Validator>> = OnceLock::new();
    V.get_or_init(|| {
        Arc::new(
            tsunagi_validation::Validator::from_paths(
                &[
                    shared("fhir-packages/current/hl7.fhir.r4.core-4.0.1.tgz"),
                    shared("fhir-packages/ePrescriptionData-0.1.0-conformance"),
                ],
                None,
            )
            .expect("packages"),
        )
    })
    .clone()
}

async fn official_examples_accepted(b: Backend) {
    let v = example_validator();
    let Some(s) = TestServer::start_with(b, options(Config::default()).validator(v)).await else {
        return;
    };
    person(&s, "ex1");
    let dir = shared("fixtures/jp-examples/ePrescriptionData/package");
    let read = |f: &str| -> Value {
        serde_json::from_slice(&std::fs::read(dir.join(f)).expect("example")).expect("json")
    };
    let d = doctor(&s, HOSP_A);
    // the published prescription document
    let doc = read("Bundle-Bundle-for-JP-MedReq-ePreData-Example01.json");
    let r = s
        .post(
            &d,
            "/fhir/$erx-prescribe",
            &params(vec![
                json!({"name": "patient", "valueString": "ex1"}),
                json!({"name": "prescription", "resource": doc.clone()}),
            ]),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.text);
    assert_eq!(text(&r, "exchangeNumber").len(), 16);
    assert_eq!(
        r.body["parameter"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|p| p["name"] == "medicationRequest")
            .count(),
        2
    );
    // every published MedicationRequest example, each in place of the document's first
    // line (its subject pointed at the document's Patient entry)
    let patient_url = doc["entry"][1]["fullUrl"].clone();
    let with_line = |name: &str| {
        let mut d = doc.clone();
        let mut line = read(name);
        line["subject"]["reference"] = patient_url.clone();
        d["entry"][10]["resource"] = line;
        d
    };
    let mut n = 0;
    for e in std::fs::read_dir(&dir).unwrap() {
        let name = e.unwrap().file_name().to_string_lossy().to_string();
        if !name.starts_with("MedicationRequest-") {
            continue;
        }
        let r = s
            .post(
                &d,
                "/fhir/$erx-prescribe",
                &params(vec![
                    json!({"name": "patient", "valueString": "ex1"}),
                    json!({"name": "prescription", "resource": with_line(&name)}),
                ]),
            )
            .await;
        assert_eq!(r.status, 201, "{name}: {}", r.text);
        n += 1;
    }
    assert_eq!(n, 13);
    // a broken document is refused naming the element, and nothing is written
    let mut bad = read("Bundle-Bundle-for-JP-MedReq-ePreData-Example01.json");
    bad["entry"][10]["resource"]["intent"] = json!("wish");
    let r = s
        .post(
            &d,
            "/fhir/$erx-prescribe",
            &params(vec![
                json!({"name": "patient", "valueString": "ex1"}),
                json!({"name": "prescription", "resource": bad}),
            ]),
        )
        .await;
    r.refused(422, "entry[10].resource.intent");
    let p = s.patient_token("ex1");
    let mine = s.get(&p, "/fhir/$my-prescriptions").await;
    assert_eq!(mine.status, 200, "{}", mine.text);
    let records = mine
        .entries()
        .iter()
        .filter(|e| e["resourceType"] == "Parameters")
        .count();
    assert_eq!(
        records, 14,
        "one record per accepted prescription, none for the refused one"
    );
}

/// The published prescription document names the insured person by its health
/// insurance Coverage (保険者番号 on the payer, 記号/番号/枝番 in JP Core
/// extensions, 番号 in full-width digits) and the Patient's birth date: without a
/// `patient` parameter the platform finds the person from them.
async fn patient_resolved_from_coverage(b: Backend) {
    let v = example_validator();
    let Some(s) = TestServer::start_with(b, options(Config::default()).validator(v)).await else {
        return;
    };
    let dir = shared("fixtures/jp-examples/ePrescriptionData/package");
    let mut doc: Value = serde_json::from_slice(
        &std::fs::read(dir.join("Bundle-Bundle-for-JP-MedReq-ePreData-Example01.json")).unwrap(),
    )
    .unwrap();
    // the sample 保険者番号 06123456 fails its check digit; 06123459 is the same
    // insurer number with a valid one
    let payer = doc["entry"]
        .as_array_mut()
        .unwrap()
        .iter_mut()
        .find(|e| e["resource"]["identifier"][0]["value"] == "06123456")
        .expect("payer Organization");
    payer["resource"]["identifier"][0]["value"] = json!("06123459");
    let key = "06123459:12345:67890:01";
    s.seed_person(
        "cv1",
        "東京",
        "太郎",
        "1920-02-11",
        "神奈川県横浜市港区１－２－３",
    );
    s.put(
        "Coverage",
        "cv1-ins",
        json!({"resourceType": "Coverage", "id": "cv1-ins", "status": "active",
            "identifier": [{"system": tsunagi_eligibility::emergency::INSURANCE_MEMBER_SYSTEM, "value": key}],
            "beneficiary": {"reference": "Patient/cv1"},
            "payor": [{"reference": "Organization/org-insurer"}]}),
        "06123459",
    );
    person(&s, "other1");
    let d = doctor(&s, HOSP_A);
    let prescribe = |p: Vec<Value>| {
        let d = d.clone();
        let s = &s;
        async move { s.post(&d, "/fhir/$erx-prescribe", &params(p)).await }
    };
    let r = prescribe(vec![
        json!({"name": "prescription", "resource": doc.clone()}),
    ])
    .await;
    assert_eq!(r.status, 201, "{}", r.text);
    let first = value(&r, "medicationRequest");
    let stored = s
        .get(
            &d,
            &format!("/fhir/{}", first["reference"].as_str().unwrap()),
        )
        .await;
    assert_eq!(
        stored.body["subject"]["reference"], "Patient/cv1",
        "{}",
        stored.text
    );

    // the Coverage and an explicit patient must agree
    let r = prescribe(vec![
        json!({"name": "patient", "valueString": "other1"}),
        json!({"name": "prescription", "resource": doc.clone()}),
    ])
    .await;
    r.refused(422, "resource.entry[3].resource");
    assert!(r.text.contains("another person"), "{}", r.text);

    // a birth date that does not match finds no one: refused, not guessed
    let mut wrong = doc.clone();
    wrong["entry"][1]["resource"]["birthDate"] = json!("1921-02-11");
    let r = prescribe(vec![json!({"name": "prescription", "resource": wrong})]).await;
    r.refused(422, "resource.entry[3].resource");
    assert!(r.text.contains("no insured person"), "{}", r.text);

    // nothing was written by the refused requests
    let mine = s
        .get(&s.patient_token("other1"), "/fhir/$my-prescriptions")
        .await;
    assert!(mine.entries().is_empty(), "{}", mine.text);
}

/// A line coded only with a HOT code is checked through the HOT code master; a
/// line no master maps is reported as not checked instead of passing silently.
async fn hot_only_lines(b: Backend) {
    let Some(s) = start(b).await else { return };
    person(&s, "h1");
    // (no Coverage in the Bundle and no patient parameter: the patient is asked for)
    s.post(
        &doctor(&s, HOSP_B),
        "/fhir/$erx-prescribe",
        &params(vec![
            json!({"name": "prescription", "resource": bundle(vec![mr(LOXOPROFEN, 7)])}),
        ]),
    )
    .await
    .refused(400, "patient is required");
    prescribe(&s, HOSP_B, "h1", vec![mr(CARBOCISTEINE_YJ, 14)]).await;
    let clinic = s.token(CLINIC, OrgKind::Clinic, Role::Doctor);
    let hot_line = |code: &str| {
        let mut m = mr(LOXOPROFEN, 7);
        m["medicationCodeableConcept"] =
            json!({"coding": [{"system": HOT9, "code": code, "display": "HOT coded"}]});
        m
    };
    let check = |lines: Vec<Value>| {
        let clinic = clinic.clone();
        let s = &s;
        async move {
            let mut p = vec![json!({"name": "patient", "valueString": "h1"})];
            p.extend(
                lines
                    .into_iter()
                    .map(|l| json!({"name": "medicationRequest", "resource": l})),
            );
            let r = s.post(&clinic, "/fhir/$erx-check", &params(p)).await;
            assert_eq!(r.status, 200, "{}", r.text);
            r
        }
    };
    // the HOT9 of carbocisteine duplicates the YJ-coded prescription of hospital B
    assert_eq!(
        kinds(&check(vec![hot_line(CARBOCISTEINE_HOT9)]).await),
        ["duplicate"]
    );
    // HOT13 (package level) carries the HOT9 in its first nine digits
    let mut hot13 = hot_line("1038316010101");
    hot13["medicationCodeableConcept"]["coding"][0]["system"] =
        json!("urn:oid:1.2.392.200119.4.402.1");
    assert_eq!(kinds(&check(vec![hot13]).await), ["duplicate"]);
    // a HOT code the master does not hold: not checked, and said so
    let r = check(vec![hot_line("106062101")]).await;
    assert_eq!(kinds(&r), ["unchecked"]);
    assert!(r.text.contains("チェック対象外"), "{}", r.text);
    // prescribing the HOT-only line registers it under its YJ code: a later
    // YJ-coded draft at another institution sees the duplicate
    prescribe(&s, HOSP_A, "h1", vec![hot_line(CARBOCISTEINE_HOT9)]).await;
    let r = check(vec![mr(CARBOCISTEINE_YJ, 7)]).await;
    assert_eq!(kinds(&r), ["duplicate", "duplicate"], "{}", r.text);
}

// ---------------------------------------------------------------- who may

async fn qualification_and_signatures(b: Backend) {
    let Some(s) = start(b).await else { return };
    person(&s, "q1");
    let body = params(vec![
        json!({"name": "patient", "valueString": "q1"}),
        json!({"name": "prescription", "resource": bundle(vec![mr(LOXOPROFEN, 7)])}),
    ]);
    for t in [
        s.token(HOSP_A, OrgKind::Hospital, Role::Nurse),
        s.token(PHARMACY, OrgKind::Pharmacy, Role::Pharmacist),
        s.token(HOSP_A, OrgKind::Hospital, Role::Clerk),
    ] {
        s.post(&t, "/fhir/$erx-prescribe", &body)
            .await
            .refused(403, "doctor or dentist");
    }
    // a dentist may prescribe
    let dent = s.token("1330111111", OrgKind::DentalClinic, Role::Dentist);
    assert_eq!(
        s.post(&dent, "/fhir/$erx-prescribe", &body).await.status,
        201
    );

    // signatures: key registered by the operator for the doctor (user doctor-HOSP_A)
    let key = ed25519_dalek::SigningKey::from_bytes(&[7u8; 32]);
    let op = s.operator_token();
    let user = format!("doctor-{HOSP_A}");
    let reg = params(vec![
        json!({"name": "user", "valueString": user}),
        json!({"name": "publicKey", "valueBase64Binary": keys::encode_public(&key.verifying_key())}),
    ]);
    s.post(&doctor(&s, HOSP_A), "/fhir/$erx-practitioner-key", &reg)
        .await
        .refused(403, "operators");
    assert_eq!(
        s.post(&op, "/fhir/$erx-practitioner-key", &reg)
            .await
            .status,
        200
    );
    let doc = bundle(vec![mr(LOXOPROFEN, 7)]);
    let sig = keys::sign(&key, &serde_json::to_vec(&doc).unwrap());
    let signed = |sig: &str| {
        params(vec![
            json!({"name": "patient", "valueString": "q1"}),
            json!({"name": "prescription", "resource": doc.clone()}),
            json!({"name": "signature", "valueBase64Binary": sig}),
        ])
    };
    let d = doctor(&s, HOSP_A);
    assert_eq!(
        s.post(&d, "/fhir/$erx-prescribe", &signed(&sig))
            .await
            .status,
        201
    );
    let other = keys::sign(
        &ed25519_dalek::SigningKey::from_bytes(&[8u8; 32]),
        &serde_json::to_vec(&doc).unwrap(),
    );
    s.post(&d, "/fhir/$erx-prescribe", &signed(&other))
        .await
        .refused(400, "does not verify");
    // a doctor without a registered key cannot sign
    s.post(&doctor(&s, HOSP_B), "/fhir/$erx-prescribe", &signed(&sig))
        .await
        .refused(400, "no signature key");

    // mandatory signatures are a configuration
    let Some(s2) = TestServer::start_with(
        b,
        options(Config {
            signature_required: true,
            ..Config::default()
        }),
    )
    .await
    else {
        return;
    };
    person(&s2, "q1");
    s2.post(&doctor(&s2, HOSP_A), "/fhir/$erx-prescribe", &body)
        .await
        .refused(400, "signature");
}

async fn bad_input(b: Backend) {
    let Some(s) = start(b).await else { return };
    person(&s, "v1");
    let d = doctor(&s, HOSP_A);
    s.post(
        &d,
        "/fhir/$erx-prescribe",
        &params(vec![json!({"name": "patient", "valueString": "v1"})]),
    )
    .await
    .refused(400, "parameter.where(name='prescription')");
    s.post(
        &d,
        "/fhir/$erx-prescribe",
        &params(vec![
            json!({"name": "patient", "valueString": "v1"}),
            json!({"name": "prescription", "resource": {"resourceType": "Bundle", "type": "document", "entry": []}}),
        ]),
    )
    .await
    .refused(400, "Bundle.entry");
    s.post(
        &d,
        "/fhir/$erx-prescribe",
        &params(vec![
            json!({"name": "patient", "valueString": "nobody"}),
            json!({"name": "prescription", "resource": bundle(vec![mr(LOXOPROFEN, 7)])}),
        ]),
    )
    .await
    .refused(400, "not known");
    let mut refill = mr(LOXOPROFEN, 7);
    refill["dispenseRequest"]["numberOfRepeatsAllowed"] = json!(3);
    s.post(
        &d,
        "/fhir/$erx-prescribe",
        &params(vec![
            json!({"name": "patient", "valueString": "v1"}),
            json!({"name": "prescription", "resource": bundle(vec![refill])}),
        ]),
    )
    .await
    .refused(400, "numberOfRepeatsAllowed");
}

// ---------------------------------------------------------------- states

async fn state_transitions(b: Backend) {
    let Some(s) = start(b).await else { return };
    person(&s, "t1");
    person(&s, "t2");
    let (id, ex) = prescribe(&s, HOSP_A, "t1", vec![mr(LOXOPROFEN, 7)]).await;
    // another institution may not cancel
    rx_call(&s, &doctor(&s, HOSP_B), "erx-cancel", &id)
        .await
        .refused(403, "prescribing institution");
    // retrieval needs the right patient: the wrong one answers like an unknown number
    let mut p = vec![json!({"name": "exchangeNumber", "valueString": ex})];
    p.extend(by_insurance("t2", "1970-01-01"));
    s.post(&pharmacist(&s, PHARMACY), "/fhir/$erx-retrieve", &params(p))
        .await
        .refused(404, "no prescription");
    let mut p = vec![json!({"name": "exchangeNumber", "valueString": "9999999999999999"})];
    p.extend(by_insurance("t1", "1970-01-01"));
    s.post(&pharmacist(&s, PHARMACY), "/fhir/$erx-retrieve", &params(p))
        .await
        .refused(404, "no prescription");
    // wrong birth date: not identified
    let mut p = vec![json!({"name": "exchangeNumber", "valueString": ex})];
    p.extend(by_insurance("t1", "1970-01-02"));
    s.post(&pharmacist(&s, PHARMACY), "/fhir/$erx-retrieve", &params(p))
        .await
        .refused(404, "no prescription");
    // retrieve: no lock, the prescriber's lines
    let mut p = vec![json!({"name": "exchangeNumber", "valueString": ex})];
    p.extend(by_insurance("t1", "1970-01-01"));
    let r = s
        .post(&pharmacist(&s, PHARMACY), "/fhir/$erx-retrieve", &params(p))
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(text(&r, "state"), "registered");
    assert_eq!(r.resources("medicationRequest").len(), 1);
    // only pharmacists retrieve
    let mut p = vec![json!({"name": "exchangeNumber", "valueString": ex})];
    p.extend(by_insurance("t1", "1970-01-01"));
    s.post(
        &s.token(PHARMACY, OrgKind::Pharmacy, Role::Clerk),
        "/fhir/$erx-retrieve",
        &params(p),
    )
    .await
    .refused(403, "pharmacist");

    // registered -> accepted
    let r = accept(&s, PHARMACY, "t1", &ex).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(text(&r, "state"), "accepted");
    // accepted: cannot be cancelled, accepted elsewhere, returned or dispensed by another pharmacy
    rx_call(&s, &doctor(&s, HOSP_A), "erx-cancel", &id)
        .await
        .refused(409, "cannot be cancelled");
    accept(&s, PHARMACY_2, "t1", &ex)
        .await
        .refused(409, "cannot be accepted");
    rx_call(&s, &pharmacist(&s, PHARMACY_2), "erx-return", &id)
        .await
        .refused(404, "not accepted by this pharmacy");
    dispense(&s, PHARMACY_2, &id, true, vec![md(LOXOPROFEN, 7)])
        .await
        .refused(409, "cannot be dispensed");
    // accepted -> returned -> accepted (other pharmacy) -> returned -> cancelled
    let r = rx_call(&s, &pharmacist(&s, PHARMACY), "erx-return", &id).await;
    assert_eq!(
        (r.status, text(&r, "state")),
        (200, "returned".to_string()),
        "{}",
        r.text
    );
    dispense(&s, PHARMACY, &id, true, vec![md(LOXOPROFEN, 7)])
        .await
        .refused(409, "returned");
    assert_eq!(accept(&s, PHARMACY_2, "t1", &ex).await.status, 200);
    assert_eq!(
        rx_call(&s, &pharmacist(&s, PHARMACY_2), "erx-return", &id)
            .await
            .status,
        200
    );
    let r = rx_call(&s, &doctor(&s, HOSP_A), "erx-cancel", &id).await;
    assert_eq!(
        (r.status, text(&r, "state")),
        (200, "cancelled".to_string()),
        "{}",
        r.text
    );
    accept(&s, PHARMACY, "t1", &ex)
        .await
        .refused(409, "cancelled");
    rx_call(&s, &doctor(&s, HOSP_A), "erx-cancel", &id)
        .await
        .refused(409, "cancelled");
    // the prescriber's MedicationRequest shows the cancellation
    let mrs = s
        .get(&doctor(&s, HOSP_A), "/fhir/MedicationRequest?patient=t1")
        .await;
    assert_eq!(mrs.entries()[0]["status"], "cancelled", "{}", mrs.text);

    // registered -> accepted -> dispensed, then nothing more
    let (id2, ex2) = prescribe(&s, HOSP_A, "t1", vec![mr(LOXOPROFEN, 7)]).await;
    rx_call(&s, &pharmacist(&s, PHARMACY), "erx-return", &id2)
        .await
        .refused(404, "not accepted");
    assert_eq!(accept(&s, PHARMACY, "t1", &ex2).await.status, 200);
    let r = dispense(&s, PHARMACY, &id2, true, vec![md(LOXOPROFEN, 7)]).await;
    assert_eq!(
        (r.status, text(&r, "state")),
        (201, "dispensed".to_string()),
        "{}",
        r.text
    );
    dispense(&s, PHARMACY, &id2, true, vec![md(LOXOPROFEN, 7)])
        .await
        .refused(409, "dispensed");
    rx_call(&s, &pharmacist(&s, PHARMACY), "erx-return", &id2)
        .await
        .refused(404, "not accepted");
    rx_call(&s, &doctor(&s, HOSP_A), "erx-cancel", &id2)
        .await
        .refused(409, "dispensed");
    accept(&s, PHARMACY, "t1", &ex2)
        .await
        .refused(409, "dispensed");
    // the dispensing result is the pharmacy's record, linked to the prescription
    let mds = s
        .get(
            &pharmacist(&s, PHARMACY),
            "/fhir/MedicationDispense?patient=t1",
        )
        .await;
    assert_eq!(mds.entries().len(), 1, "{}", mds.text);
    assert_eq!(
        mds.entries()[0]["authorizingPrescription"][0]["reference"],
        format!("MedicationRequest/{id2}-1")
    );
    // transitions are audited
    let actions: Vec<String> = s
        .audit("t1")
        .await
        .iter()
        .map(|e| e["record"]["action"].as_str().unwrap_or("").to_string())
        .collect();
    for a in [
        "erx-prescribe",
        "erx-retrieve",
        "erx-accept",
        "erx-return",
        "erx-cancel",
        "erx-dispense",
    ] {
        assert!(
            actions.iter().any(|x| x == a),
            "{a} not audited: {actions:?}"
        );
    }
}

async fn card_reception_identifies_the_patient(b: Backend) {
    let Some(s) = start(b).await else { return };
    person(&s, "c1");
    let (_, ex) = prescribe(&s, HOSP_A, "c1", vec![mr(LOXOPROFEN, 7)]).await;
    let ph = pharmacist(&s, PHARMACY);
    let body = params(vec![
        json!({"name": "exchangeNumber", "valueString": ex}),
        json!({"name": "patient", "valueString": "c1"}),
    ]);
    // before the card reception at this pharmacy the patient id alone is not an identity
    s.post(&ph, "/fhir/$erx-accept", &body)
        .await
        .refused(400, "card reception");
    let card = s.card("c1");
    let clerk = s.token(PHARMACY, OrgKind::Pharmacy, Role::Clerk);
    assert_eq!(
        s.reception(&clerk, &card, [false, false, false], "outpatient")
            .await
            .status,
        200
    );
    let r = s.post(&ph, "/fhir/$erx-accept", &body).await;
    assert_eq!(
        (r.status, text(&r, "state")),
        (200, "accepted".to_string()),
        "{}",
        r.text
    );
}

async fn two_pharmacies_race(b: Backend) {
    let Some(s) = start(b).await else { return };
    person(&s, "r1");
    let s = Arc::new(s);
    for _ in 0..8 {
        let (_, ex) = prescribe(&s, HOSP_A, "r1", vec![mr(LOXOPROFEN, 7)]).await;
        let (a, b2) = (s.clone(), s.clone());
        let (e1, e2) = (ex.clone(), ex.clone());
        let t1 = tokio::spawn(async move { accept(&a, PHARMACY, "r1", &e1).await.status });
        let t2 = tokio::spawn(async move { accept(&b2, PHARMACY_2, "r1", &e2).await.status });
        let mut st = [t1.await.unwrap(), t2.await.unwrap()];
        st.sort();
        assert_eq!(st, [200, 409], "exactly one pharmacy wins");
    }
}

async fn refill_and_split_dispensing(b: Backend) {
    let Some(s) = start(b).await else { return };
    person(&s, "f1");
    let mut line = mr(WARFARIN, 28);
    line["dispenseRequest"]["numberOfRepeatsAllowed"] = json!(2);
    let (id, ex) = prescribe(&s, HOSP_A, "f1", vec![line]).await;
    for (cycle, pharmacy) in [(1, PHARMACY), (2, PHARMACY_2), (3, PHARMACY)] {
        let r = accept(&s, pharmacy, "f1", &ex).await;
        assert_eq!(
            (r.status, value(&r, "cycle")),
            (200, json!(cycle)),
            "{}",
            r.text
        );
        // split dispensing: two parts, the first not final
        let r = dispense(&s, pharmacy, &id, false, vec![md(WARFARIN, 14)]).await;
        assert_eq!(
            (r.status, text(&r, "state"), value(&r, "splitParts")),
            (201, "accepted".to_string(), json!(1)),
            "{}",
            r.text
        );
        rx_call(&s, &pharmacist(&s, pharmacy), "erx-return", &id)
            .await
            .refused(409, "split dispensing");
        let r = dispense(&s, pharmacy, &id, true, vec![md(WARFARIN, 14)]).await;
        let expect = if cycle < 3 { "registered" } else { "dispensed" };
        assert_eq!(
            (r.status, text(&r, "state")),
            (201, expect.to_string()),
            "{}",
            r.text
        );
    }
    accept(&s, PHARMACY, "f1", &ex)
        .await
        .refused(409, "dispensed");
    let p = s.patient_token("f1");
    let mine = s.get(&p, "/fhir/$my-prescriptions").await;
    let dispenses = mine
        .entries()
        .iter()
        .filter(|e| e["resourceType"] == "MedicationDispense")
        .count();
    assert_eq!(dispenses, 6, "{}", mine.text);
    // the medication index was rewritten by the prescription and each of the six
    // dispensings, and keeps only its current version
    let (store, index) = (
        s.store.clone(),
        tsunagi_eprescription::model::index_id("f1"),
    );
    let history = tokio::task::spawn_blocking(move || {
        store.history(&tsunagi_store::HistoryQuery {
            resource_type: Some("Basic".into()),
            id: Some(index),
            count: 20,
            ..Default::default()
        })
    })
    .await
    .unwrap()
    .unwrap();
    let versions: Vec<i64> = history.iter().map(|r| r.version).collect();
    assert_eq!(versions, vec![7]);
}

// ---------------------------------------------------------------- alerts

fn alerts(r: &Resp) -> Vec<Value> {
    r.resources("alert")
}

fn kinds(r: &Resp) -> Vec<String> {
    // the service's own alert code is the last coding
    let mut k: Vec<String> = alerts(r)
        .iter()
        .map(|a| {
            a["code"]["coding"]
                .as_array()
                .and_then(|c| c.last())
                .and_then(|c| c["code"].as_str())
                .unwrap_or("")
                .to_string()
        })
        .collect();
    k.sort();
    k
}

async fn precheck(s: &TestServer, token: &str, patient: &str, codes: &[&str]) -> Resp {
    let mut p = vec![json!({"name": "patient", "valueString": patient})];
    p.extend(
        codes
            .iter()
            .map(|c| json!({"name": "medicationRequest", "resource": mr(c, 7)})),
    );
    let r = s.post(token, "/fhir/$erx-check", &params(p)).await;
    assert_eq!(r.status, 200, "{}", r.text);
    r
}

async fn alerts_with_and_without_consent(b: Backend) {
    let Some(s) = start(b).await else { return };
    person(&s, "a1");
    // hospital B prescribes famotidine and warfarin
    prescribe(
        &s,
        HOSP_B,
        "a1",
        vec![mr(FAMOTIDINE_TAB, 14), mr(WARFARIN, 28)],
    )
    .await;
    let clinic = s.token(CLINIC, OrgKind::Clinic, Role::Doctor);

    // no consent at the clinic: the alerts exist but name nothing
    let r = precheck(&s, &clinic, "a1", &[FAMOTIDINE_POWDER]).await;
    assert_eq!(kinds(&r), ["duplicate"]);
    let r2 = precheck(&s, &clinic, "a1", &[NIZATIDINE]).await;
    assert_eq!(kinds(&r2), ["same-efficacy"]);
    let r3 = precheck(&s, &clinic, "a1", &[INTERACTING]).await;
    assert_eq!(kinds(&r3), ["contraindication"]);
    for x in [&r, &r2, &r3] {
        assert!(
            !x.text.contains(HOSP_B)
                && !x.text.contains(FAMOTIDINE_TAB)
                && !x.text.contains(WARFARIN),
            "{}",
            x.text
        );
        assert!(!x.text.contains("抗凝固作用"), "{}", x.text);
        assert!(x.text.contains("詳細は表示できません"), "{}", x.text);
    }
    // nothing was registered by a check
    let r = precheck(&s, &clinic, "a1", &[FAMOTIDINE_POWDER]).await;
    assert_eq!(kinds(&r), ["duplicate"]);
    // a drug of no concern
    assert!(alerts(&precheck(&s, &clinic, "a1", &[LOXOPROFEN]).await).is_empty());

    // the patient consents to share (B: medication) at the clinic's card reader
    let card = s.card("a1");
    let clerk = s.token(CLINIC, OrgKind::Clinic, Role::Clerk);
    assert_eq!(
        s.reception(&clerk, &card, [false, true, false], "outpatient")
            .await
            .status,
        200
    );
    let r = precheck(&s, &clinic, "a1", &[FAMOTIDINE_POWDER, INTERACTING]).await;
    assert_eq!(kinds(&r), ["contraindication", "duplicate"]);
    assert!(
        r.text.contains(HOSP_B) && r.text.contains(FAMOTIDINE_TAB) && r.text.contains(WARFARIN),
        "{}",
        r.text
    );
    assert!(
        r.text.contains("抗凝固作用が増強する") && r.text.contains("2026-11-21"),
        "{}",
        r.text
    );
    // consent to other categories only (A, C) does not open medication detail
    person(&s, "a2");
    prescribe(&s, HOSP_B, "a2", vec![mr(FAMOTIDINE_TAB, 14)]).await;
    let card2 = s.card("a2");
    assert_eq!(
        s.reception(&clerk, &card2, [true, false, true], "outpatient")
            .await
            .status,
        200
    );
    let r = precheck(&s, &clinic, "a2", &[FAMOTIDINE_POWDER]).await;
    assert_eq!(kinds(&r), ["duplicate"]);
    assert!(!r.text.contains(HOSP_B), "{}", r.text);
    // the prescriber's own earlier prescription is always shown to it
    let own = precheck(&s, &doctor(&s, HOSP_B), "a2", &[FAMOTIDINE_POWDER]).await;
    assert!(own.text.contains(FAMOTIDINE_TAB), "{}", own.text);
}

async fn pharmacy_checks_and_paper_prescriptions(b: Backend) {
    let Some(s) = start(b).await else { return };
    person(&s, "p1");
    // a paper prescription dispensed at pharmacy 2 (loxoprofen, 14 days)
    let ph2 = pharmacist(&s, PHARMACY_2);
    let mut p = by_insurance("p1", "1970-01-01");
    p.push(json!({"name": "medicationDispense", "resource": md(LOXOPROFEN, 14)}));
    let r = s.post(&ph2, "/fhir/$erx-paper-dispense", &params(p)).await;
    assert_eq!(r.status, 201, "{}", r.text);
    // a new e-prescription from hospital A with the same drug
    let (id, ex) = prescribe(&s, HOSP_A, "p1", vec![mr(LOXOPROFEN, 7), mr(WARFARIN, 7)]).await;
    // reception check at pharmacy 1 finds the paper-prescription dispensing (no consent: no detail)
    let r = accept(&s, PHARMACY, "p1", &ex).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(kinds(&r), ["duplicate"], "{}", r.text);
    assert!(!r.text.contains(PHARMACY_2), "{}", r.text);
    // its own prescription is not a duplicate of itself
    // provisional dispensing: substituting the interacting drug is caught
    let prov = params(vec![
        json!({"name": "prescriptionId", "valueString": id}),
        json!({"name": "medicationDispense", "resource": md(INTERACTING, 7)}),
        json!({"name": "medicationDispense", "resource": md(WARFARIN, 7)}),
    ]);
    let r = s
        .post(&pharmacist(&s, PHARMACY), "/fhir/$erx-provisional", &prov)
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(kinds(&r), ["contraindication"], "{}", r.text);
    // only the accepting pharmacy checks a provisional result
    s.post(&ph2, "/fhir/$erx-provisional", &prov)
        .await
        .refused(409, "accepted");
    // with consent at pharmacy 1 the paper dispensing is named
    let card = s.card("p1");
    let clerk = s.token(PHARMACY, OrgKind::Pharmacy, Role::Clerk);
    assert_eq!(
        s.reception(&clerk, &card, [false, true, false], "outpatient")
            .await
            .status,
        200
    );
    let prov = params(vec![
        json!({"name": "prescriptionId", "valueString": id}),
        json!({"name": "medicationDispense", "resource": md(LOXOPROFEN, 7)}),
    ]);
    let r = s
        .post(&pharmacist(&s, PHARMACY), "/fhir/$erx-provisional", &prov)
        .await;
    assert_eq!(kinds(&r), ["duplicate"], "{}", r.text);
    assert!(
        r.text.contains(PHARMACY_2) && r.text.contains("MedicationDispense/"),
        "{}",
        r.text
    );
    // the dispensing result enters the index: a later check at the clinic sees it
    assert_eq!(
        dispense(&s, PHARMACY, &id, true, vec![md(WARFARIN, 28)])
            .await
            .status,
        201
    );
    let clinic = s.token(CLINIC, OrgKind::Clinic, Role::Doctor);
    let r = precheck(&s, &clinic, "p1", &[INTERACTING]).await;
    assert_eq!(kinds(&r), ["contraindication"], "{}", r.text);
    // the patient's paper-prescription dispensing is theirs to see
    let mine = s
        .get(&s.patient_token("p1"), "/fhir/$my-prescriptions")
        .await;
    assert!(
        mine.entries()
            .iter()
            .filter(|e| e["resourceType"] == "MedicationDispense")
            .count()
            >= 2,
        "{}",
        mine.text
    );
}

async fn statistics_audit_and_patient_view(b: Backend) {
    let Some(s) = start(b).await else { return };
    person(&s, "s1");
    person(&s, "s2");
    let (_, ex) = prescribe(
        &s,
        HOSP_A,
        "s1",
        vec![mr(FAMOTIDINE_TAB, 14), mr(WARFARIN, 14)],
    )
    .await;
    let clinic = s.token(CLINIC, OrgKind::Clinic, Role::Doctor);
    precheck(&s, &clinic, "s1", &[FAMOTIDINE_POWDER]).await;
    precheck(&s, &clinic, "s1", &[INTERACTING, NIZATIDINE]).await;
    precheck(&s, &clinic, "s1", &[LOXOPROFEN]).await;
    // checks are not for clerks
    let clerk = s.token(CLINIC, OrgKind::Clinic, Role::Clerk);
    s.post(
        &clerk,
        "/fhir/$erx-check",
        &params(vec![json!({"name": "patient", "valueString": "s1"})]),
    )
    .await
    .refused(403, "doctors, dentists and pharmacists");
    let month = s.now().format("%Y-%m").to_string();
    let op = s.operator_token();
    let st = s
        .get(&op, &format!("/fhir/$erx-statistics?month={month}"))
        .await;
    assert_eq!(st.status, 200, "{}", st.text);
    assert_eq!(value(&st, "checks"), json!(3), "{}", st.text);
    assert_eq!(value(&st, "duplicateAlerts"), json!(1));
    assert_eq!(value(&st, "sameEfficacyAlerts"), json!(1));
    assert_eq!(value(&st, "contraindicationAlerts"), json!(1));
    assert_eq!(value(&st, "prescriptions"), json!(1));
    s.get(&clinic, "/fhir/$erx-statistics")
        .await
        .refused(403, "operators");
    // every check is an audit record with its counts
    let checks: Vec<Value> = s
        .audit("s1")
        .await
        .into_iter()
        .filter(|e| e["record"]["action"] == "erx-check")
        .collect();
    assert_eq!(checks.len(), 3);
    assert!(
        checks.iter().any(|e| e["record"]["reason"]
            .as_str()
            .unwrap_or("")
            .contains("contraindication=1")),
        "{checks:?}"
    );
    // the patient sees their prescription with the exchange number; others see nothing of it
    let mine = s
        .get(&s.patient_token("s1"), "/fhir/$my-prescriptions")
        .await;
    assert_eq!(mine.status, 200, "{}", mine.text);
    assert!(mine.text.contains(&ex), "{}", mine.text);
    assert_eq!(
        mine.entries()
            .iter()
            .filter(|e| e["resourceType"] == "MedicationRequest")
            .count(),
        2
    );
    let other = s
        .get(&s.patient_token("s2"), "/fhir/$my-prescriptions")
        .await;
    assert_eq!(other.status, 200);
    assert!(
        !other.text.contains(&ex) && other.entries().is_empty(),
        "{}",
        other.text
    );
    s.get(&clinic, "/fhir/$my-prescriptions")
        .await
        .refused(403, "patient");
}

both_backends!(
    official_examples_accepted,
    patient_resolved_from_coverage,
    hot_only_lines,
    qualification_and_signatures,
    bad_input,
    state_transitions,
    card_reception_identifies_the_patient,
    two_pharmacies_race,
    refill_and_split_dispensing,
    alerts_with_and_without_consent,
    pharmacy_checks_and_paper_prescriptions,
    statistics_audit_and_patient_view,
);
