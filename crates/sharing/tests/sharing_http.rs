//! End-to-end tests of the sharing service over HTTP, on both backends:
//! registration (official JP-CLINS examples accepted, error examples and rule
//! violations refused with nothing stored), each access rule, each flag, each
//! retention rule (with the manual clock), notifications.

mod support;

use chrono::Duration;
use serde_json::{Value, json};
use support::*;
use tsunagi_eligibility::consent::Category;
use tsunagi_policy::identity::{OrgKind, Role};
use tsunagi_sharing::demo::{checkup_bundle, referral_bundle};

const CLINS: &str = "clinical-core";

/// A collection Bundle of official single-resource examples, with the example
/// patient MAKINO as the Bundle's Patient.
fn bundle_of(files: &[&str]) -> Value {
    let mut entries = vec![json!({
        "fullUrl": "http://jpfhir.jp/fhir/eCS/Patient/Example-JP-Patient-eCS-MAKINO",
        "resource": example(&format!("{CLINS}/Patient-Example-JP-Patient-eCS-MAKINO.json")),
    })];
    if files
        .iter()
        .any(|f| f.contains("AllergyIntolerance-eCS-02"))
    {
        entries.push(json!({
            "fullUrl": "http://jpfhir.jp/fhir/eCS/Encounter/Example-JP-Encounter-eCS-AMB-01",
            "resource": example(&format!("{CLINS}/Encounter-Example-JP-Encounter-eCS-AMB-01.json")),
        }));
    }
    for (i, f) in files.iter().enumerate() {
        entries.push(json!({
            "fullUrl": format!("urn:uuid:00000000-0000-0000-0000-{i:012}"),
            "resource": example(&format!("{CLINS}/{f}")),
        }));
    }
    json!({"resourceType": "Bundle", "type": "collection", "entry": entries})
}

/// The official examples that carry the registering institution (CLINS entries).
const CLINS_EXAMPLES: &[&str] = &[
    "Condition-Example-JP-Condition-eCS-01.json",
    "Condition-Example-JP-Condition-eCS-02.json",
    "AllergyIntolerance-Example-JP-AllergyIntolerance-eCS-01.json",
    "AllergyIntolerance-Example-JP-AllergyIntolerance-eCS-02.json",
    "AllergyIntolerance-Example-JP-AllergyIntolerance-eCS-03.json",
    "Observation-Example-JP-Obs-LabResult-eCS-Alb.json",
    "Observation-Example-JP-Obs-LabResult-eCS-K.json",
    "Observation-Example-JP-Obs-LabResult-eCS-eGFR.json",
];

fn statuses(r: &Resp) -> Vec<String> {
    r.body["entry"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|e| e["response"]["status"].as_str().unwrap_or("").to_string())
        .collect()
}

async fn count(t: &TestServer, token: &str, path: &str) -> usize {
    t.search_ids(token, path).await.len()
}

/// An infection Observation (HBs antigen) of the hospital.
fn infection_bundle(local: &str) -> Value {
    infection_result(local, HBS_ANTIGEN, "2026-11-01")
}

/// JLAC10 codes of the infection item set (HBs antigen S/CO, HCV antibody result).
const HBS_ANTIGEN: (&str, &str) = ("5F016141002305151", "HBs抗原(S/CO)");
const HCV_ANTIBODY: (&str, &str) = ("5F360148202302311", "HCV抗体(判定)");

/// An infection result of the hospital: item `(code, display)` on `date`.
fn infection_result(local: &str, (code, display): (&str, &str), date: &str) -> Value {
    json!({"resourceType": "Bundle", "type": "collection", "entry": [
        {"fullUrl": "urn:uuid:00000000-0000-0000-0000-000000000001", "resource": {"resourceType": "Patient"}},
        {"resource": {"resourceType": "Observation",
            "extension": [{"url": tsunagi_sharing::kinds::INSTITUTION_EXT, "valueIdentifier": {"system": tsunagi_sharing::kinds::INSTITUTION_SYSTEM, "value": HOSP}}],
            "identifier": [{"system": tsunagi_sharing::kinds::RESOURCE_ID_SYSTEM, "value": local}],
            "status": "final",
            "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category", "code": "laboratory"}]}],
            "code": {"coding": [{"system": tsunagi_sharing::kinds::INFECTION_CS, "code": code, "display": display}]},
            "subject": {"reference": "urn:uuid:00000000-0000-0000-0000-000000000001"},
            "effectiveDateTime": date, "valueString": "陰性"}}
    ]})
}

/// `(section, resource id)` of every summary entry.
fn summary_sections(s: &Resp) -> Vec<(String, String)> {
    s.body["entry"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|e| e["extension"].is_array())
        .map(|e| {
            (
                e["extension"][0]["extension"][0]["valueCode"]
                    .as_str()
                    .unwrap_or("")
                    .to_string(),
                e["resource"]["id"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect()
}

async fn official_examples_are_accepted_and_replaced(b: Backend) {
    let Some(t) = TestServer::start(b).await else {
        return;
    };
    let h = t.doctor(HOSP);
    let r = t
        .post(
            &h,
            "/fhir/$register-clins?patient=pt-01",
            &example(&format!(
                "{CLINS}/Bundle-Bundle-CLINS-Observations-Example-01.json"
            )),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(statuses(&r), vec!["201 Created"; 4]);
    let r = t
        .post(
            &h,
            "/fhir/$register-clins?patient=pt-01",
            &bundle_of(CLINS_EXAMPLES),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(statuses(&r).len(), CLINS_EXAMPLES.len());
    // registering the same local identifiers again replaces (new versions, no new entries)
    let before = count(&t, &h, "/fhir/Observation?patient=Patient/pt-01").await;
    let r = t
        .post(
            &h,
            "/fhir/$register-clins?patient=pt-01",
            &example(&format!(
                "{CLINS}/Bundle-Bundle-CLINS-Observations-Example-01.json"
            )),
        )
        .await;
    assert_eq!(statuses(&r), vec!["200 OK"; 4], "{}", r.text);
    assert!(r.text.contains("_history/2"));
    assert_eq!(
        count(&t, &h, "/fhir/Observation?patient=Patient/pt-01").await,
        before
    );
    // the stored entries carry the service's labels
    let obs = t
        .get(&h, "/fhir/Observation?patient=Patient/pt-01&_count=1")
        .await;
    let sec = obs.body["entry"][0]["resource"]["meta"]["security"].to_string();
    assert!(sec.contains("consent-category"), "{sec}");
}

async fn error_examples_and_rule_violations_store_nothing(b: Backend) {
    let Some(t) = TestServer::start(b).await else {
        return;
    };
    let h = t.doctor(HOSP);
    // direct registration of prescriptions is refused
    let r = t
        .post(
            &h,
            "/fhir/$register-clins?patient=pt-01",
            &bundle_of(&[
                "Condition-Example-JP-Condition-eCS-01.json",
                "MedicationRequest-Example-JP-MedReq-PO-SID-28days.json",
            ]),
        )
        .await;
    r.refused(422, "Bundle.entry[2].resource");
    assert!(r.text.contains("referral"), "{}", r.text);
    // the intentional error example (wrong 一般名処方コード) is refused by the validator
    let r = t
        .post(
            &h,
            "/fhir/$register-clins?patient=pt-01",
            &bundle_of(&["MedicationRequest-ErrorExample-JP-MedReq-PO-SID-28days.json"]),
        )
        .await;
    assert_eq!(r.status, 422, "{}", r.text);
    // an entry of another institution: 403, audited
    let other = t.doctor(OTHER);
    let r = t
        .post(
            &other,
            "/fhir/$register-clins?patient=pt-01",
            &bundle_of(&["Condition-Example-JP-Condition-eCS-01.json"]),
        )
        .await;
    r.refused(403, "1318814790");
    // a validation error in one entry rejects the whole Bundle
    let mut bad = bundle_of(&[
        "Condition-Example-JP-Condition-eCS-01.json",
        "Observation-Example-JP-Obs-LabResult-eCS-K.json",
    ]);
    bad["entry"][2]["resource"]["status"] = json!("not-a-status");
    let r = t
        .post(&h, "/fhir/$register-clins?patient=pt-01", &bad)
        .await;
    assert_eq!(r.status, 422, "{}", r.text);
    assert!(r.text.contains("Bundle.entry[2]"), "{}", r.text);
    // no local identifier
    let mut noid = bundle_of(&["Condition-Example-JP-Condition-eCS-01.json"]);
    noid["entry"][1]["resource"]
        .as_object_mut()
        .unwrap()
        .remove("identifier");
    let r = t
        .post(&h, "/fhir/$register-clins?patient=pt-01", &noid)
        .await;
    assert_eq!(r.status, 422, "{}", r.text);
    // unknown patient
    let r = t
        .post(
            &h,
            "/fhir/$register-clins?patient=nobody",
            &bundle_of(&["Condition-Example-JP-Condition-eCS-01.json"]),
        )
        .await;
    r.refused(422, "nobody");
    // a referral letter without addressee
    let mut no_to = referral_bundle(HOSP, CLINIC, "r-x");
    no_to["entry"][0]["resource"]["section"]
        .as_array_mut()
        .unwrap()
        .remove(0);
    let r = t
        .post(&h, "/fhir/$register-document?patient=pt-01", &no_to)
        .await;
    r.refused(422, "addressee");
    // a checkup report with an addressee
    let mut chk = checkup_bundle(HOSP, "c-x");
    chk["entry"][0]["resource"]["section"] =
        referral_bundle(HOSP, CLINIC, "r-y")["entry"][0]["resource"]["section"].clone();
    let r = t
        .post(&h, "/fhir/$register-document?patient=pt-01", &chk)
        .await;
    assert_eq!(r.status, 422, "{}", r.text);
    // nothing of any of these was stored
    for rt in [
        "Condition",
        "Observation",
        "MedicationRequest",
        "DocumentReference",
        "Basic",
    ] {
        assert_eq!(
            count(&t, &h, &format!("/fhir/{rt}?patient=Patient/pt-01")).await,
            0,
            "{rt}"
        );
    }
}

async fn consent_categories_split_one_type(b: Backend) {
    let Some(t) = TestServer::start(b).await else {
        return;
    };
    let h = t.doctor(HOSP);
    for body in [
        example(&format!(
            "{CLINS}/Bundle-Bundle-CLINS-Observations-Example-01.json"
        )),
        infection_bundle("inf-1"),
        bundle_of(&[
            "Condition-Example-JP-Condition-eCS-01.json",
            "AllergyIntolerance-Example-JP-AllergyIntolerance-eCS-01.json",
        ]),
    ] {
        let r = t
            .post(&h, "/fhir/$register-clins?patient=pt-01", &body)
            .await;
        assert_eq!(r.status, 200, "{}", r.text);
    }
    let c = t.doctor(CLINIC);
    // no consent: nothing
    let r = t.get(&c, "/fhir/Observation?patient=Patient/pt-01").await;
    assert!(r.status == 403 || ids(&r.body).is_empty(), "{}", r.text);
    // category A: diagnoses and the infection, no lab, no allergy
    t.grant(CLINIC, "pt-01", &[Category::A], 24);
    let r = t.get(&c, "/fhir/Observation?patient=Patient/pt-01").await;
    assert_eq!(r.body["total"], 1, "{}", r.text);
    assert!(r.text.contains("HBs"), "{}", r.text);
    assert_eq!(
        count(&t, &c, "/fhir/Condition?patient=Patient/pt-01").await,
        1
    );
    assert_eq!(
        count(&t, &c, "/fhir/AllergyIntolerance?patient=Patient/pt-01").await,
        0
    );
    let every = t.get(&c, "/fhir/Patient/pt-01/$everything").await;
    assert_eq!(every.status, 200, "{}", every.text);
    let every_ids = ids(&every.body);
    for l in t
        .search_ids(
            &h,
            "/fhir/Observation?patient=Patient/pt-01&code=3A015000001827101",
        )
        .await
    {
        assert!(
            !every_ids.contains(&l),
            "lab must not leak through $everything: {}",
            every.text
        );
    }
    // a direct read of a lab entry is refused under A
    let lab_id = t
        .search_ids(
            &h,
            "/fhir/Observation?patient=Patient/pt-01&code=3A015000001827101",
        )
        .await;
    let r = t.get(&c, &format!("/fhir/Observation/{}", lab_id[0])).await;
    assert_eq!(r.status, 403, "{}", r.text);
    // another facility with category B only: lab and allergy, no infection, no diagnosis
    let o = t.doctor(OTHER);
    t.grant(OTHER, "pt-01", &[Category::B], 24);
    let r = t.get(&o, "/fhir/Observation?patient=Patient/pt-01").await;
    assert_eq!(r.body["total"], 4, "{}", r.text);
    assert!(!r.text.contains("HBs"));
    assert_eq!(
        count(&t, &o, "/fhir/Condition?patient=Patient/pt-01").await,
        0
    );
    assert_eq!(
        count(&t, &o, "/fhir/AllergyIntolerance?patient=Patient/pt-01").await,
        1
    );
    assert_eq!(
        t.get(&o, &format!("/fhir/Observation/{}", lab_id[0]))
            .await
            .status,
        200
    );
    // the grant window: after it ends, nothing
    t.advance(Duration::hours(24));
    let r = t.get(&o, &format!("/fhir/Observation/{}", lab_id[0])).await;
    assert_eq!(r.status, 403, "{}", r.text);
}

async fn patients_never_see_documents_or_uninformed(b: Backend) {
    let Some(t) = TestServer::start(b).await else {
        return;
    };
    let h = t.doctor(HOSP);
    // Condition-02 is flagged UNINFORMED and LTS
    let r = t
        .post(
            &h,
            "/fhir/$register-clins?patient=pt-01",
            &bundle_of(&[
                "Condition-Example-JP-Condition-eCS-01.json",
                "Condition-Example-JP-Condition-eCS-02.json",
            ]),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    let r = t
        .post(
            &h,
            "/fhir/$register-document?patient=pt-01",
            &referral_bundle(HOSP, CLINIC, "r-1"),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.text);
    let r = t
        .post(
            &h,
            "/fhir/$register-document?patient=pt-01",
            &checkup_bundle(HOSP, "c-1"),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.text);
    let checkup_id = r.body["id"].as_str().unwrap().to_string();
    let p = t.patient_token("pt-01");
    let conds = t.get(&p, "/fhir/Condition?patient=Patient/pt-01").await;
    assert_eq!(conds.body["total"], 1, "{}", conds.text);
    assert!(!conds.text.contains("UNINFORMED"));
    // documents: only the checkup report; the referral and every stored body are withheld
    let docs = t
        .search_ids(&p, "/fhir/DocumentReference?patient=Patient/pt-01")
        .await;
    assert_eq!(docs, vec![checkup_id.clone()]);
    assert!(
        t.search_ids(&p, "/fhir/Basic?patient=Patient/pt-01")
            .await
            .is_empty()
    );
    let every = t.get(&p, "/fhir/Patient/pt-01/$everything").await;
    assert_eq!(every.status, 200, "{}", every.text);
    assert!(
        !every.text.contains("57133-1") && !every.text.contains("UNINFORMED"),
        "{}",
        every.text
    );
    // prescriptions extracted from the referral letter are the patient's to see
    assert_eq!(
        count(&t, &p, "/fhir/MedicationRequest?patient=Patient/pt-01").await,
        1
    );
    // a direct read of the withheld Condition and of the referral is refused
    let all = t
        .search_ids(&h, "/fhir/DocumentReference?patient=Patient/pt-01")
        .await;
    let referral = all.iter().find(|i| **i != checkup_id).unwrap();
    assert_eq!(
        t.get(&p, &format!("/fhir/DocumentReference/{referral}"))
            .await
            .status,
        403
    );
    assert_eq!(
        t.get(&p, &format!("/fhir/DocumentReference/{referral}/$retrieve"))
            .await
            .status,
        403
    );
    // the checkup report itself
    let doc = t
        .get(
            &p,
            &format!("/fhir/DocumentReference/{checkup_id}/$retrieve"),
        )
        .await;
    assert_eq!(doc.status, 200, "{}", doc.text);
    assert_eq!(doc.body["type"], "document");
}

async fn referral_only_for_the_addressee_and_marked_received(b: Backend) {
    let Some(t) = TestServer::start(b).await else {
        return;
    };
    let h = t.doctor(HOSP);
    let r = t
        .post(
            &h,
            "/fhir/$register-document?patient=pt-01",
            &referral_bundle(HOSP, CLINIC, "r-1"),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.text);
    let id = r.body["id"].as_str().unwrap().to_string();
    // another institution with every consent category sees neither the letter nor its body
    let o = t.doctor(OTHER);
    t.grant(OTHER, "pt-01", &Category::ALL, 24);
    assert!(
        t.search_ids(&o, "/fhir/DocumentReference?patient=Patient/pt-01")
            .await
            .is_empty()
    );
    assert!(
        t.search_ids(&o, "/fhir/Basic?patient=Patient/pt-01")
            .await
            .is_empty()
    );
    assert_eq!(
        t.get(&o, &format!("/fhir/DocumentReference/{id}/$retrieve"))
            .await
            .status,
        403
    );
    assert!(t.search_ids(&o, "/fhir/$referrals").await.is_empty());
    // the prescription extracted from it is B information for consenting readers
    assert_eq!(
        count(&t, &o, "/fhir/MedicationRequest?patient=Patient/pt-01").await,
        1
    );
    // the addressee lists and retrieves it, without any consent
    let c = t.doctor(CLINIC);
    assert_eq!(t.search_ids(&c, "/fhir/$referrals").await, vec![id.clone()]);
    assert_eq!(
        t.search_ids(&c, "/fhir/DocumentReference").await,
        vec![id.clone()]
    );
    let doc = t
        .get(&c, &format!("/fhir/DocumentReference/{id}/$retrieve"))
        .await;
    assert_eq!(doc.status, 200, "{}", doc.text);
    assert_eq!(doc.body["identifier"]["value"], format!("{HOSP}^2026^r-1"));
    let meta = t.get(&c, &format!("/fhir/DocumentReference/{id}")).await;
    assert!(meta.text.contains("received"), "{}", meta.text);
    let audit = t.audit("pt-01").await;
    assert!(
        audit
            .iter()
            .any(|e| e.to_string().contains("referral-received"))
    );
    // received + 7 days: deleted with its body
    t.advance(Duration::days(7) - Duration::seconds(1));
    assert_eq!(t.retention().purged, 0);
    t.advance(Duration::seconds(1));
    let rep = t.retention();
    assert_eq!(rep.purged, 1, "{rep:?}");
    assert_eq!(
        t.get(&h, &format!("/fhir/DocumentReference/{id}"))
            .await
            .status,
        404
    );
    assert!(
        t.search_ids(&h, "/fhir/Basic?patient=Patient/pt-01")
            .await
            .is_empty()
    );
}

/// The official JP-CLINS referral letter (JP_Bundle_eReferral, header entries
/// only, sections as text) is registered by the institution its identifier names
/// and reaches exactly the addressee of its 紹介先情報 section.
async fn official_referral_example_reaches_its_addressee(b: Backend) {
    let Some(t) = TestServer::start(b).await else {
        return;
    };
    let letter = example(&format!(
        "{CLINS}/Bundle-Bundle-CLINS-Referral-NoEntry-Example-01.json"
    ));
    // Bundle.identifier names HOSP: another institution cannot register it
    let o = t.doctor(OTHER);
    let r = t
        .post(&o, "/fhir/$register-document?patient=pt-01", &letter)
        .await;
    assert_eq!(r.status, 403, "{}", r.text);
    assert!(r.text.contains("Bundle.identifier"), "{}", r.text);
    let h = t.doctor(HOSP);
    let r = t
        .post(&h, "/fhir/$register-document?patient=pt-01", &letter)
        .await;
    assert_eq!(r.status, 201, "{}", r.text);
    let id = r.body["id"].as_str().unwrap().to_string();
    // neither a consenting third institution nor the patient sees the letter
    t.grant(OTHER, "pt-01", &Category::ALL, 24);
    assert!(t.search_ids(&o, "/fhir/$referrals").await.is_empty());
    assert_eq!(
        t.get(&o, &format!("/fhir/DocumentReference/{id}/$retrieve"))
            .await
            .status,
        403
    );
    let p = t.patient_token("pt-01");
    assert!(
        t.search_ids(&p, "/fhir/DocumentReference?patient=Patient/pt-01")
            .await
            .is_empty()
    );
    // the addressee (section 910's Organization, 1311234567) lists and retrieves
    // the letter as sent: the same identifier, Composition and section texts
    let c = t.doctor(CLINIC);
    assert_eq!(t.search_ids(&c, "/fhir/$referrals").await, vec![id.clone()]);
    let doc = t
        .get(&c, &format!("/fhir/DocumentReference/{id}/$retrieve"))
        .await;
    assert_eq!(doc.status, 200, "{}", doc.text);
    assert_eq!(doc.body["identifier"], letter["identifier"]);
    assert_eq!(
        doc.body["entry"][0]["resource"]["section"],
        letter["entry"][0]["resource"]["section"]
    );
    // the same letter again replaces the entry rather than adding a second one
    let again = t
        .post(&h, "/fhir/$register-document?patient=pt-01", &letter)
        .await;
    assert!(again.status == 200 || again.status == 201, "{}", again.text);
    assert_eq!(again.body["id"], id.as_str());
    assert_eq!(t.search_ids(&c, "/fhir/$referrals").await, vec![id]);
}

async fn checkup_reports_for_insurer_category_c_and_patient(b: Backend) {
    let Some(t) = TestServer::start(b).await else {
        return;
    };
    let h = t.doctor(HOSP);
    let r = t
        .post(
            &h,
            "/fhir/$register-document?patient=pt-02",
            &checkup_bundle(HOSP, "c-1"),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.text);
    let id = r.body["id"].as_str().unwrap().to_string();
    let i = t.token(INSURER, OrgKind::Insurer, Role::InsurerStaff);
    assert_eq!(
        t.search_ids(&i, "/fhir/DocumentReference?patient=Patient/pt-02")
            .await,
        vec![id.clone()]
    );
    assert_eq!(
        t.get(&i, &format!("/fhir/DocumentReference/{id}/$retrieve"))
            .await
            .status,
        200
    );
    let other_insurer = t.token("06139999", OrgKind::Insurer, Role::InsurerStaff);
    assert!(
        t.search_ids(
            &other_insurer,
            "/fhir/DocumentReference?patient=Patient/pt-02"
        )
        .await
        .is_empty()
    );
    assert_eq!(
        t.get(&other_insurer, &format!("/fhir/DocumentReference/{id}"))
            .await
            .status,
        403
    );
    // category C opens it to an institution; A and B do not
    let o = t.doctor(OTHER);
    t.grant(OTHER, "pt-02", &[Category::A, Category::B], 24);
    assert!(
        t.search_ids(&o, "/fhir/DocumentReference?patient=Patient/pt-02")
            .await
            .is_empty()
    );
    t.grant(OTHER, "pt-02", &[Category::C], 24);
    assert_eq!(
        t.search_ids(&o, "/fhir/DocumentReference?patient=Patient/pt-02")
            .await,
        vec![id.clone()]
    );
    let p = t.patient_token("pt-02");
    assert_eq!(
        t.search_ids(&p, "/fhir/DocumentReference?patient=Patient/pt-02")
            .await,
        vec![id.clone()]
    );
    // five years from registration
    t.advance(Duration::days(365 * 5 + 1) - Duration::seconds(1));
    assert_eq!(t.retention().purged, 0);
    t.advance(Duration::seconds(1));
    assert_eq!(t.retention().purged, 1);
    assert!(
        t.search_ids(&p, "/fhir/DocumentReference?patient=Patient/pt-02")
            .await
            .is_empty()
    );
}

async fn summary_merges_what_the_reader_may_see(b: Backend) {
    let Some(t) = TestServer::start(b).await else {
        return;
    };
    let h = t.doctor(HOSP);
    for body in [
        example(&format!(
            "{CLINS}/Bundle-Bundle-CLINS-Observations-Example-01.json"
        )),
        infection_bundle("inf-1"),
        bundle_of(&[
            "Condition-Example-JP-Condition-eCS-01.json",
            "AllergyIntolerance-Example-JP-AllergyIntolerance-eCS-01.json",
        ]),
    ] {
        assert_eq!(
            t.post(&h, "/fhir/$register-clins?patient=pt-01", &body)
                .await
                .status,
            200
        );
    }
    assert_eq!(
        t.post(
            &h,
            "/fhir/$register-document?patient=pt-01",
            &referral_bundle(HOSP, CLINIC, "r-1")
        )
        .await
        .status,
        201
    );
    let s = t.get(&h, "/fhir/Patient/pt-01/$summary").await;
    assert_eq!(s.status, 200, "{}", s.text);
    let sections: Vec<String> = s.body["entry"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["extension"].is_array())
        .map(|e| {
            e["extension"][0]["extension"][0]["valueCode"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    for want in [
        "diagnoses",
        "allergies",
        "infections",
        "lab-latest",
        "prescriptions",
    ] {
        assert!(sections.iter().any(|x| x == want), "{want} in {sections:?}");
    }
    assert!(s.text.contains(HOSP));
    // a reader with category A sees diagnoses and infections only
    let c = t.doctor(CLINIC);
    t.grant(CLINIC, "pt-01", &[Category::A], 24);
    let s = t.get(&c, "/fhir/Patient/pt-01/$summary").await;
    assert_eq!(s.status, 200, "{}", s.text);
    let sections: Vec<String> = s.body["entry"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["extension"].is_array())
        .map(|e| {
            e["extension"][0]["extension"][0]["valueCode"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    assert!(
        sections
            .iter()
            .all(|x| x == "diagnoses" || x == "infections"),
        "{sections:?}"
    );
    // no consent at all: none of the clinical information (pt-01's Patient was written by OTHER)
    let o = t.doctor(OTHER);
    let none = t.get(&o, "/fhir/Patient/pt-01/$summary").await;
    assert_eq!(none.status, 200, "{}", none.text);
    assert!(
        none.body["entry"]
            .as_array()
            .into_iter()
            .flatten()
            .all(|e| e["resource"]["resourceType"] == "Patient"),
        "{}",
        none.text
    );
    // withdrawal removes an entry from the summary
    let w = t.post(&h, "/fhir/$withdraw", &json!({"resourceType": "Parameters", "parameter": [
        {"name": "type", "valueCode": "Condition"}, {"name": "identifier", "valueString": "202934701"}]})).await;
    assert_eq!(w.status, 200, "{}", w.text);
    assert!(w.text.contains("entered-in-error"));
    let s = t.get(&h, "/fhir/Patient/pt-01/$summary").await;
    assert!(!s.text.contains("\"diagnoses\""), "{}", s.text);
    // $everything still routes next to $summary (the clinic has a consent)
    assert_eq!(
        t.get(&c, "/fhir/Patient/pt-01/$everything").await.status,
        200
    );
}

/// Infection results are summarised like lab values: the latest result per
/// item, whoever registered the older ones and in whatever order.
async fn summary_lists_latest_infection_per_item(b: Backend) {
    let Some(t) = TestServer::start(b).await else {
        return;
    };
    let h = t.doctor(HOSP);
    // the newest HBs result is registered first, the older ones after it
    for (local, item, date) in [
        ("hbs-2026", HBS_ANTIGEN, "2026-11-01"),
        ("hbs-2024", HBS_ANTIGEN, "2024-05-10"),
        ("hbs-2025", HBS_ANTIGEN, "2025-02-03"),
        ("hcv-2023", HCV_ANTIBODY, "2023-07-01"),
    ] {
        let r = t
            .post(
                &h,
                "/fhir/$register-clins?patient=pt-01",
                &infection_result(local, item, date),
            )
            .await;
        assert_eq!(r.status, 200, "{}", r.text);
    }
    let id = |local: &str| {
        let item = if local.starts_with("hcv") {
            HCV_ANTIBODY.0
        } else {
            HBS_ANTIGEN.0
        };
        tsunagi_sharing::kinds::entry_id(
            "clins",
            HOSP,
            "Observation",
            &format!("{local}|{}|{item}", tsunagi_sharing::kinds::INFECTION_CS),
        )
    };
    // all four results are stored and searchable (history is not lost)
    assert_eq!(
        count(&t, &h, "/fhir/Observation?patient=Patient/pt-01").await,
        4
    );
    let s = t.get(&h, "/fhir/Patient/pt-01/$summary").await;
    assert_eq!(s.status, 200, "{}", s.text);
    let mut infections: Vec<String> = summary_sections(&s)
        .into_iter()
        .filter(|(section, _)| section == "infections")
        .map(|(_, id)| id)
        .collect();
    infections.sort();
    let mut want = vec![id("hbs-2026"), id("hcv-2023")];
    want.sort();
    assert_eq!(infections, want, "{}", s.text);
    // withdrawing the latest HBs result brings back the one before it
    let w = t.post(&h, "/fhir/$withdraw", &json!({"resourceType": "Parameters", "parameter": [
        {"name": "type", "valueCode": "Observation"}, {"name": "identifier", "valueString": "hbs-2026"},
        {"name": "item", "valueString": format!("{}|{}", tsunagi_sharing::kinds::INFECTION_CS, HBS_ANTIGEN.0)}]})).await;
    assert_eq!(w.status, 200, "{}", w.text);
    let s = t.get(&h, "/fhir/Patient/pt-01/$summary").await;
    let infections: Vec<String> = summary_sections(&s)
        .into_iter()
        .filter(|(section, _)| section == "infections")
        .map(|(_, id)| id)
        .collect();
    assert!(infections.contains(&id("hbs-2025")), "{}", s.text);
    assert!(!infections.contains(&id("hbs-2026")), "{}", s.text);
    assert_eq!(infections.len(), 2, "{}", s.text);
}

async fn retention_rules_and_lts(b: Backend) {
    let Some(t) = TestServer::start(b).await else {
        return;
    };
    let h = t.doctor(HOSP);
    // diagnoses: Condition-01 plain, Condition-02 LTS
    let r = t
        .post(
            &h,
            "/fhir/$register-clins?patient=pt-01",
            &bundle_of(&[
                "Condition-Example-JP-Condition-eCS-01.json",
                "Condition-Example-JP-Condition-eCS-02.json",
            ]),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    // a referral never received: 6 months
    assert_eq!(
        t.post(
            &h,
            "/fhir/$register-document?patient=pt-01",
            &referral_bundle(HOSP, CLINIC, "r-1")
        )
        .await
        .status,
        201
    );
    // 2026-11-21T01:00Z + 6 months = 2027-05-21T01:00Z
    t.clock.set("2027-05-21T00:59:59Z".parse().unwrap());
    assert_eq!(t.retention().purged, 0);
    t.clock.set("2027-05-21T01:00:00Z".parse().unwrap());
    let rep = t.retention();
    assert_eq!(rep.purged, 1, "{rep:?}");
    // the prescription of that letter: 100 days, but it is among the latest 3, so kept
    assert_eq!(
        count(&t, &h, "/fhir/MedicationRequest?patient=Patient/pt-01").await,
        1
    );
    // diagnoses: 5 years; the LTS one stays
    t.clock.set("2031-11-21T00:59:59Z".parse().unwrap());
    assert_eq!(t.retention().purged, 0);
    t.clock.set("2031-11-21T01:00:00Z".parse().unwrap());
    assert_eq!(t.retention().purged, 1);
    let left = t.get(&h, "/fhir/Condition?patient=Patient/pt-01").await;
    assert_eq!(left.body["total"], 1);
    assert!(left.text.contains("LTS"));
    // the deletion is audited
    let audit = t.audit("pt-01").await;
    assert!(
        audit
            .iter()
            .filter(|e| e.to_string().contains("retention-purge"))
            .count()
            >= 2
    );
}

/// Incremental retention runs at irregular intervals over 14 months, with
/// entries registered and letters received between them, delete exactly what
/// the rules (judged over everything ever registered) say is due by each run:
/// nothing early, nothing missed. A full run at the end finds nothing left.
async fn incremental_retention_matches_the_rules_over_time(b: Backend) {
    let Some(t) = TestServer::start(b).await else {
        return;
    };
    // the simulation writes through the store's blocking interface
    tokio::task::block_in_place(|| simulate_retention(&t));
}

fn simulate_retention(t: &TestServer) {
    use std::collections::BTreeSet;
    use tsunagi_sharing::kinds::{INDICATION_SYSTEM, Kind, LTS, mark, mark_received};
    use tsunagi_sharing::retention::{Entry, Mode, Rules, doomed, run, run_with};
    use tsunagi_store::WriteContext;
    let rules = Rules::default();
    let mut x: u64 = 0x2545_F491_4F6C_DD1D;
    let mut next = move |n: u64| {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x % n.max(1)
    };
    let wc = WriteContext {
        org: Some(HOSP.into()),
        user: None,
    };
    let lab_items = ["3A015000002327101", "3F015000002327101"];
    let mut written: Vec<Entry> = Vec::new();
    let mut unreceived: Vec<String> = Vec::new();
    let store = t.store.clone();
    let mut runs = 0;
    let mut purged_total = 0;
    for step in 0..45 {
        let prev = t.now();
        let gap = Duration::hours(96 + next(240) as i64);
        t.advance(gap);
        let now = t.now();
        let within = |r: u64| prev + Duration::seconds(1 + (r % gap.num_seconds() as u64) as i64);
        for i in 0..(2 + next(4)) {
            let at = within(next(u64::MAX));
            let id = format!("sim-{step}-{i}");
            let patient = if next(2) == 0 { "pt-01" } else { "pt-02" };
            let day = (at - Duration::days(next(20) as i64))
                .format("%Y-%m-%d")
                .to_string();
            let (rt, kind, mut r) = match next(4) {
                0 => (
                    "Observation",
                    Kind::Lab,
                    json!({"resourceType": "Observation", "id": id, "status": "final",
                    "code": {"coding": [{"system": "http://jpfhir.jp/fhir/clins/CodeSystem/JLAC10/JP_CLINS_ObsLabResult_CoreLabo_CS", "code": lab_items[next(2) as usize]}]},
                    "subject": {"reference": format!("Patient/{patient}")}, "effectiveDateTime": day}),
                ),
                1 => (
                    "MedicationRequest",
                    Kind::Prescription,
                    json!({"resourceType": "MedicationRequest", "id": id, "status": "active", "intent": "order",
                    "medicationCodeableConcept": {"text": "ガスター散２％"},
                    "subject": {"reference": format!("Patient/{patient}")}, "authoredOn": day}),
                ),
                2 => (
                    "DocumentReference",
                    Kind::Referral,
                    json!({"resourceType": "DocumentReference", "id": id, "status": "current",
                    "subject": {"reference": format!("Patient/{patient}")}, "date": format!("{day}T10:00:00+09:00"),
                    "content": [{"attachment": {"contentType": "application/fhir+json"}}]}),
                ),
                _ => (
                    "Condition",
                    Kind::Diagnosis,
                    json!({"resourceType": "Condition", "id": id, "code": {"text": "胃癌"},
                    "subject": {"reference": format!("Patient/{patient}")}, "recordedDate": day}),
                ),
            };
            if next(8) == 0 {
                r["meta"] = json!({"tag": [{"system": INDICATION_SYSTEM, "code": LTS}]});
            }
            mark(&mut r, kind, &[], at);
            let mut tx = store.begin().unwrap();
            tx.update(rt, &id, r.clone(), None, &wc).unwrap();
            tx.commit().unwrap();
            if kind == Kind::Referral {
                unreceived.push(id.clone());
            }
            written.push(Entry::from_resource(rt, &r, Some(HOSP)).unwrap());
        }
        // some letters are received (at an instant of this interval, after registration)
        let mut still = Vec::new();
        for id in std::mem::take(&mut unreceived) {
            let Some(e) = written.iter_mut().find(|e| e.id == id) else {
                continue;
            };
            let Some(cur) = store
                .read("DocumentReference", &id)
                .unwrap()
                .filter(|s| !s.deleted)
            else {
                continue;
            };
            if next(3) != 0 {
                still.push(id);
                continue;
            }
            let at = within(next(u64::MAX)).max(e.registered);
            let mut r = cur.resource.unwrap();
            mark_received(&mut r, at);
            let mut tx = store.begin().unwrap();
            tx.update("DocumentReference", &id, r, None, &wc).unwrap();
            tx.commit().unwrap();
            e.received = Some(at);
        }
        unreceived = still;
        let report = run(&*store, &rules, now).unwrap();
        runs += 1;
        purged_total += report.purged;
        assert_eq!(report.mode, if runs == 1 { "full" } else { "incremental" });
        let due: BTreeSet<String> = doomed(&rules, &written, now)
            .into_iter()
            .map(|e| e.id)
            .collect();
        let mut stored = BTreeSet::new();
        for e in &written {
            if store
                .read(&e.rt, &e.id)
                .unwrap()
                .is_some_and(|s| !s.deleted)
            {
                stored.insert(e.id.clone());
            }
        }
        let expected: BTreeSet<String> = written
            .iter()
            .map(|e| e.id.clone())
            .filter(|i| !due.contains(i))
            .collect();
        assert_eq!(stored, expected, "after run {runs} at {now}");
    }
    // the simulation did delete entries of every rule, and kept some past their period
    assert!(purged_total > 20, "{purged_total}");
    let full = run_with(&*store, &rules, t.now(), Mode::Full, false).unwrap();
    assert_eq!(full.mode, "full");
    assert_eq!(full.purged, 0, "{full:?}");
}

async fn lab_and_prescription_keep_latest_three(b: Backend) {
    let Some(t) = TestServer::start(b).await else {
        return;
    };
    let h = t.doctor(HOSP);
    // four HBs results of one item registered a month apart
    for (i, d) in ["2026-01-01", "2026-02-01", "2026-03-01", "2026-04-01"]
        .iter()
        .enumerate()
    {
        let mut b = infection_bundle(&format!("lab-{i}"));
        // make it a lab item (ALB) instead of an infection
        b["entry"][1]["resource"]["code"] = json!({"coding": [{"system": "http://jpfhir.jp/fhir/clins/CodeSystem/JLAC10/JP_CLINS_ObsLabResult_CoreLabo_CS", "code": "3A015000002327101", "display": "ALB"}]});
        b["entry"][1]["resource"]["effectiveDateTime"] = json!(d);
        b["entry"][1]["resource"]["valueString"] = json!("3.9");
        let r = t.post(&h, "/fhir/$register-clins?patient=pt-01", &b).await;
        assert_eq!(r.status, 200, "{}", r.text);
    }
    // one year after registration the oldest (4th latest) goes, the latest three stay
    t.clock.set("2027-11-21T00:59:59Z".parse().unwrap());
    assert_eq!(t.retention().purged, 0);
    t.clock.set("2027-11-21T01:00:00Z".parse().unwrap());
    assert_eq!(t.retention().purged, 1);
    let left = t.get(&h, "/fhir/Observation?patient=Patient/pt-01").await;
    assert_eq!(left.body["total"], 3);
    assert!(!left.text.contains("2026-01-01"));
    // prescriptions: four letters, the oldest prescription goes after 100 days
    t.clock.set("2027-12-01T00:00:00Z".parse().unwrap());
    for n in 1..=4 {
        let mut r = referral_bundle(HOSP, CLINIC, &format!("r-{n}"));
        r["entry"][4]["resource"]["authoredOn"] = json!(
            format!("2027-1{n}-01")
                .replace("2027-13", "2028-01")
                .replace("2027-14", "2028-02")
        );
        assert_eq!(
            t.post(&h, "/fhir/$register-document?patient=pt-01", &r)
                .await
                .status,
            201
        );
    }
    // registered 2027-12-01T00:00Z: 100 days end 2028-03-10T00:00Z; the one with the
    // oldest authoredOn goes, the latest three stay however old
    t.clock.set("2028-03-09T23:59:59Z".parse().unwrap());
    let before = t.retention();
    assert_eq!(
        count(&t, &h, "/fhir/MedicationRequest?patient=Patient/pt-01").await,
        4,
        "{before:?}"
    );
    t.clock.set("2028-03-10T00:00:00Z".parse().unwrap());
    t.retention();
    let left = t
        .get(&h, "/fhir/MedicationRequest?patient=Patient/pt-01")
        .await;
    assert_eq!(left.body["total"], 3);
    assert!(!left.text.contains("2027-11-01"), "{}", left.text);
    t.clock.set("2040-01-01T00:00:00Z".parse().unwrap());
    t.retention();
    assert_eq!(
        count(&t, &h, "/fhir/MedicationRequest?patient=Patient/pt-01").await,
        3
    );
}

async fn infection_notification_to_the_health_centre(b: Backend) {
    let Some(t) = TestServer::start(b).await else {
        return;
    };
    let h = t.doctor(HOSP);
    let body = json!({"resourceType": "Parameters", "parameter": [
        {"name": "patient", "valueString": "pt-01"},
        {"name": "disease", "valueCoding": {"system": "http://medis.or.jp/CodeSystem/master-disease-keyNumber", "code": "20054191", "display": "胃結核"}},
        {"name": "diagnosed", "valueDate": "2026-11-20"},
        {"name": "healthCentre", "valueString": CENTRE}]});
    let r = t.post(&h, "/fhir/$notify-infection", &body).await;
    assert_eq!(r.status, 201, "{}", r.text);
    let id = r.body["id"].as_str().unwrap().to_string();
    let g = t.token(CENTRE, OrgKind::PublicHealthCentre, Role::MunicipalityStaff);
    let list = t.get(&g, "/fhir/$notifications?status=in-progress").await;
    assert_eq!(ids(&list.body), vec![id.clone()], "{}", list.text);
    let other = t.token(
        "131024",
        OrgKind::PublicHealthCentre,
        Role::MunicipalityStaff,
    );
    assert!(
        t.search_ids(&other, "/fhir/$notifications")
            .await
            .is_empty()
    );
    assert_eq!(
        t.post(
            &other,
            &format!("/fhir/Communication/{id}/$acknowledge"),
            &json!({})
        )
        .await
        .status,
        403
    );
    // the patient and consenting institutions do not see it
    assert!(
        t.search_ids(
            &t.patient_token("pt-01"),
            "/fhir/Communication?patient=Patient/pt-01"
        )
        .await
        .is_empty()
    );
    let ack = t
        .post(
            &g,
            &format!("/fhir/Communication/{id}/$acknowledge"),
            &json!({}),
        )
        .await;
    assert_eq!(ack.status, 200, "{}", ack.text);
    assert_eq!(ack.body["status"], "completed");
    assert!(
        t.search_ids(&g, "/fhir/$notifications?status=in-progress")
            .await
            .is_empty()
    );
    // a clerk cannot notify
    let clerk = t.token(HOSP, OrgKind::Hospital, Role::Clerk);
    assert_eq!(
        t.post(&clerk, "/fhir/$notify-infection", &body)
            .await
            .status,
        403
    );
}

async fn signed_referral_is_verified(b: Backend) {
    use base64::Engine as _;
    use ed25519_dalek::{Signer, SigningKey};
    let Some(t) = TestServer::start(b).await else {
        return;
    };
    let key = SigningKey::from_bytes(&[9u8; 32]);
    let x = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(key.verifying_key().to_bytes());
    let st = t.store.clone();
    tokio::task::block_in_place(|| {
        st.put_client_key(&tsunagi_store::ClientKey {
            client_id: "hosp-emr".into(),
            org: HOSP.into(),
            kid: "k1".into(),
            role: "doctor".into(),
            user: None,
            jwk: json!({"kty": "OKP", "crv": "Ed25519", "x": x}),
            created: chrono::Utc::now(),
            revoked: false,
        })
        .unwrap()
    });
    let mut doc = referral_bundle(HOSP, CLINIC, "r-s");
    let sig = key.sign(&tsunagi_sharing::signature::signing_input(&doc));
    doc["signature"] = json!({"type": [{"system": "urn:iso-astm:E1762-95:2013", "code": "1.2.840.10065.1.12.1.1"}],
        "when": "2026-11-21T10:00:00+09:00",
        "who": {"identifier": {"system": tsunagi_sharing::signature::CLIENT_ID_SYSTEM, "value": "hosp-emr"}},
        "sigFormat": "application/octet-stream",
        "data": base64::engine::general_purpose::STANDARD.encode(sig.to_bytes())});
    let h = t.doctor(HOSP);
    let mut tampered = doc.clone();
    tampered["timestamp"] = json!("2026-11-22T10:00:00+09:00");
    t.post(&h, "/fhir/$register-document?patient=pt-01", &tampered)
        .await
        .refused(422, "Bundle.signature");
    let r = t
        .post(&h, "/fhir/$register-document?patient=pt-01", &doc)
        .await;
    assert_eq!(r.status, 201, "{}", r.text);
}

async fn emergency_access_sees_six_information_not_letters(b: Backend) {
    let Some(t) = TestServer::start(b).await else {
        return;
    };
    let h = t.doctor(HOSP);
    for body in [
        example(&format!(
            "{CLINS}/Bundle-Bundle-CLINS-Observations-Example-01.json"
        )),
        infection_bundle("inf-1"),
        bundle_of(&["Condition-Example-JP-Condition-eCS-01.json"]),
    ] {
        assert_eq!(
            t.post(&h, "/fhir/$register-clins?patient=pt-01", &body)
                .await
                .status,
            200
        );
    }
    assert_eq!(
        t.post(
            &h,
            "/fhir/$register-document?patient=pt-01",
            &referral_bundle(HOSP, CLINIC, "r-1")
        )
        .await
        .status,
        201
    );
    let er = t.doctor(OTHER);
    // without a session: nothing under purpose emergency
    let none = t
        .get_as(&er, "emergency", "/fhir/Observation?patient=Patient/pt-01")
        .await;
    assert!(
        none.status == 403 || none.body["total"] == 0,
        "{}",
        none.text
    );
    let now = t.now();
    t.eligibility.shared.emergency.open(
        tsunagi_eligibility::emergency::Session {
            id: "s1".into(),
            patient: "pt-01".into(),
            org: OTHER.into(),
            user: format!("doctor-{OTHER}"),
            until: now + Duration::hours(2),
        },
        now,
    );
    let obs = t
        .get_as(&er, "emergency", "/fhir/Observation?patient=Patient/pt-01")
        .await;
    assert_eq!(obs.body["total"], 5, "{}", obs.text);
    assert_eq!(
        t.get_as(&er, "emergency", "/fhir/Condition?patient=Patient/pt-01")
            .await
            .body["total"],
        1
    );
    assert_eq!(
        t.get_as(
            &er,
            "emergency",
            "/fhir/MedicationRequest?patient=Patient/pt-01"
        )
        .await
        .body["total"],
        1
    );
    // but not the referral letter addressed to the clinic, nor its body
    let docs = t
        .get_as(
            &er,
            "emergency",
            "/fhir/DocumentReference?patient=Patient/pt-01",
        )
        .await;
    assert_eq!(docs.body["total"], 0, "{}", docs.text);
    assert_eq!(
        t.get_as(&er, "emergency", "/fhir/Basic?patient=Patient/pt-01")
            .await
            .body["total"],
        0
    );
    let every = t
        .get_as(&er, "emergency", "/fhir/Patient/pt-01/$everything")
        .await;
    assert_eq!(every.status, 200, "{}", every.text);
    assert!(!every.text.contains("57133-1"), "{}", every.text);
    let s = t
        .get_as(&er, "emergency", "/fhir/Patient/pt-01/$summary")
        .await;
    assert_eq!(s.status, 200, "{}", s.text);
    assert!(s.text.contains("infections") && s.text.contains("lab-latest"));
    // the session ends
    t.advance(Duration::hours(2));
    let after = t
        .get_as(&er, "emergency", "/fhir/Observation?patient=Patient/pt-01")
        .await;
    assert!(
        after.status == 403 || after.body["total"] == 0,
        "{}",
        after.text
    );
}

/// The grant comes from a real card reception (`$reception`, category A only).
async fn reception_consent_opens_category_a(b: Backend) {
    let Some(t) = TestServer::start(b).await else {
        return;
    };
    t.seed_person("pt-09", "受付", "花子", "1980-01-01", "東京都千代田区");
    let h = t.doctor(HOSP);
    for body in [
        example(&format!(
            "{CLINS}/Bundle-Bundle-CLINS-Observations-Example-01.json"
        )),
        infection_bundle("inf-1"),
    ] {
        assert_eq!(
            t.post(&h, "/fhir/$register-clins?patient=pt-09", &body)
                .await
                .status,
            200
        );
    }
    let card = t.card("pt-09");
    let clerk = t.token(OTHER, OrgKind::Hospital, Role::Clerk);
    let r = t
        .reception(&clerk, &card, [true, false, false], "outpatient")
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    let d = t.doctor(OTHER);
    let obs = t.get(&d, "/fhir/Observation?patient=Patient/pt-09").await;
    assert_eq!(obs.body["total"], 1, "{}", obs.text);
    assert!(obs.text.contains("5F016141002305151"));
    // the window: an outpatient grant lasts 24 hours
    t.advance(Duration::hours(24));
    let obs = t.get(&d, "/fhir/Observation?patient=Patient/pt-09").await;
    assert!(obs.status == 403 || obs.body["total"] == 0, "{}", obs.text);
}

both_backends!(
    reception_consent_opens_category_a,
    emergency_access_sees_six_information_not_letters,
    official_examples_are_accepted_and_replaced,
    error_examples_and_rule_violations_store_nothing,
    consent_categories_split_one_type,
    patients_never_see_documents_or_uninformed,
    referral_only_for_the_addressee_and_marked_received,
    official_referral_example_reaches_its_addressee,
    checkup_reports_for_insurer_category_c_and_patient,
    summary_merges_what_the_reader_may_see,
    summary_lists_latest_infection_per_item,
    retention_rules_and_lts,
    lab_and_prescription_keep_latest_three,
    incremental_retention_matches_the_rules_over_time,
    infection_notification_to_the_health_centre,
    signed_referral_is_verified,
);
