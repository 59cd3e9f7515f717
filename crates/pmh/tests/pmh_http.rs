//! Black-box tests of PMH: the real server with the eligibility and PMH services,
//! on SQLite and PostgreSQL (`TSUNAGI_TEST_PG`), with a manual clock.

use std::sync::Arc;

use chrono::{DateTime, Duration, TimeZone, Utc};
use serde_json::{Value, json};
use tsunagi_pmh::PmhService;
use tsunagi_policy::identity::{OrgKind, Role};
use tsunagi_testkit::{
    Backend, CLINIC, HOSP_A, HOSP_B, MUNICIPALITY, Options, TestServer, both_backends,
};

const NAME_REP: &str = "http://hl7.org/fhir/StructureDefinition/iso21090-EN-representation";
/// Another municipality (中央区).
const OTHER_MUNICIPALITY: &str = "131024";

fn t0() -> DateTime<Utc> {
    // 2026-11-21 10:00 JST
    Utc.with_ymd_and_hms(2026, 11, 21, 1, 0, 0).unwrap()
}

async fn start(backend: Backend) -> Option<TestServer> {
    let opts = Options::default().at(t0()).service(|ctx| {
        Arc::new(
            PmhService::open_with_clock(
                ctx.store.clone(),
                Some(ctx.eligibility.shared.clone()),
                ctx.clock.clone(),
            )
            .expect("open pmh"),
        )
    });
    TestServer::start_with(backend, opts).await
}

/// A person with JP Core kanji and kana names and an insurer coverage.
fn person(
    s: &TestServer,
    id: &str,
    kanji: (&str, &str),
    kana: (&str, &str),
    birth: &str,
    address: &str,
) {
    s.seed_person(id, kanji.0, kanji.1, birth, address);
    s.put(
        "Patient",
        id,
        json!({"resourceType": "Patient", "id": id, "gender": "female", "birthDate": birth,
            "name": [
                {"extension": [{"url": NAME_REP, "valueCode": "IDE"}], "family": kanji.0, "given": [kanji.1]},
                {"extension": [{"url": NAME_REP, "valueCode": "SYL"}], "family": kana.0, "given": [kana.1]}],
            "address": [{"text": address}]}),
        HOSP_B,
    );
}

fn row(payer: &str, recipient: &str, programme: &str, kana: (&str, &str), birth: &str) -> Value {
    json!({"payerNumber": payer, "recipientNumber": recipient, "programme": programme,
        "familyKana": kana.0, "givenKana": kana.1, "birthDate": birth, "sex": "female",
        "start": "2026-04-01"})
}

fn muni(s: &TestServer) -> String {
    s.token(MUNICIPALITY, OrgKind::Municipality, Role::MunicipalityStaff)
}

async fn municipal_programmes(s: &TestServer) {
    let m = muni(s);
    let r = s
        .put_json(
            &m,
            "/pmh/programmes",
            &serde_json::to_value(tsunagi_pmh::catalogue::demo_municipal()).unwrap(),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
}

async fn register(s: &TestServer, query: &str, rows: Vec<Value>) -> tsunagi_testkit::Resp {
    s.post(
        &muni(s),
        &format!("/pmh/recipients{query}"),
        &json!({"recipients": rows}),
    )
    .await
}

async fn upload(s: &TestServer, query: &str, csv: &str) -> tsunagi_testkit::Resp {
    s.send(
        s.req(
            tsunagi_testkit::reqwest::Method::POST,
            &format!("/pmh/recipient-files{query}"),
        )
        .bearer_auth(muni(s))
        .header("content-type", "text/csv")
        .body(csv.to_string()),
    )
    .await
}

fn payer(law: &str) -> String {
    tsunagi_pmh::cli::payer_number(law, 16)
}
fn rno(i: u64) -> String {
    tsunagi_pmh::cli::recipient_number(i)
}

async fn subsidies_at_reception(s: &TestServer, person: &str, org: &str) -> Vec<Value> {
    let kind = if org == CLINIC {
        OrgKind::Clinic
    } else {
        OrgKind::Hospital
    };
    let clerk = s.token(org, kind, Role::Clerk);
    let card = s.card(person);
    let r = s
        .reception(&clerk, &card, [true, true, true], "outpatient")
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    r.resources("subsidy")
}

both_backends!(
    one_card_returns_insurance_and_subsidies,
    full_file_ends_dropped_recipient_and_incremental_changes_ceiling,
    unmatched_and_ambiguous_persons_go_to_review,
    bad_rows_are_reported_and_good_rows_applied,
    ceiling_accumulates_across_facilities_under_concurrency,
    vaccination_voucher_questionnaire_and_refusals,
    municipalities_see_only_their_own,
    certificates_mailbox,
    demo_seed_is_idempotent,
    file_import_resumes_after_checkpoint,
    checkup_results_reach_municipality_patient_and_consenting_institutions,
    guardian_sees_child_checkups_until_fifteen,
);

/// A guardian the municipality registered reads the child's checkup results with
/// their own patient token while the child is under 15; nobody else does, and
/// every read lands in the child's audit trail.
async fn guardian_sees_child_checkups_until_fifteen(backend: Backend) {
    let Some(s) = start(backend).await else {
        return;
    };
    person(
        &s,
        "kid",
        ("山田", "陽"),
        ("ヤマダ", "ヒナタ"),
        "2020-05-01",
        "千代田区1",
    );
    person(
        &s,
        "teen",
        ("山田", "海"),
        ("ヤマダ", "カイ"),
        "2010-01-01",
        "千代田区1",
    );
    person(
        &s,
        "mum",
        ("山田", "花子"),
        ("ヤマダ", "ハナコ"),
        "1990-04-01",
        "千代田区1",
    );
    person(
        &s,
        "stranger",
        ("佐藤", "一"),
        ("サトウ", "ハジメ"),
        "1980-04-01",
        "港区1",
    );
    let doctor = s.token(CLINIC, OrgKind::Clinic, Role::Doctor);
    for child in ["kid", "teen"] {
        let r = s
            .post(&doctor, "/pmh/checkups", &json!({"municipality": MUNICIPALITY, "kind": "municipal", "resource": {
                "resourceType": "Observation", "status": "final",
                "code": {"coding": [{"system": "http://loinc.org", "code": "29463-7", "display": "Body weight"}]},
                "subject": {"reference": format!("Patient/{child}")}, "effectiveDateTime": "2026-11-01",
                "valueQuantity": {"value": 21.0, "unit": "kg", "system": "http://unitsofmeasure.org", "code": "kg"}}}))
            .await;
        assert_eq!(r.status, 201, "{}", r.text);
    }
    // a result withheld from the patient is withheld from the guardian as well
    let r = s
        .post(&doctor, "/pmh/checkups", &json!({"municipality": MUNICIPALITY, "kind": "infant", "resource": {
            "resourceType": "Observation", "status": "final",
            "meta": {"security": [{"system": tsunagi_policy::policy::PATIENT_VISIBILITY_SYSTEM, "code": tsunagi_policy::policy::WITHHELD}]},
            "code": {"coding": [{"system": "http://loinc.org", "code": "8302-2", "display": "Body height"}]},
            "subject": {"reference": "Patient/kid"}, "effectiveDateTime": "2026-11-01",
            "valueQuantity": {"value": 110.0, "unit": "cm", "system": "http://unitsofmeasure.org", "code": "cm"}}}))
        .await;
    assert_eq!(r.status, 201, "{}", r.text);
    let mum = s.patient_token("mum");
    let view = |child: &str| format!("/pmh/guardian/checkups?child=Patient/{child}");
    // no link yet
    s.get(&mum, &view("kid"))
        .await
        .refused(403, "no active guardian link");
    // the municipality registers the links; bad requests are named
    let m = muni(&s);
    let link = |child: &str, rel: &str| json!({"child": format!("Patient/{child}"), "guardian": "Patient/mum", "relationship": rel});
    s.post(&m, "/pmh/guardians", &link("kid", "AUNT"))
        .await
        .refused(400, "relationship");
    s.post(&m, "/pmh/guardians", &link("nobody", "MTH"))
        .await
        .refused(400, "child");
    s.post(
        &m,
        "/pmh/guardians",
        &json!({"child": "Patient/mum", "guardian": "Patient/mum", "relationship": "MTH"}),
    )
    .await
    .refused(400, "own guardian");
    assert_eq!(
        s.post(&doctor, "/pmh/guardians", &link("kid", "MTH"))
            .await
            .status,
        403
    );
    for child in ["kid", "teen"] {
        let r = s.post(&m, "/pmh/guardians", &link(child, "MTH")).await;
        assert_eq!(r.status, 200, "{}", r.text);
    }
    // the guardian sees the child's result
    let r = s.get(&mum, &view("kid")).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.entries().len(), 1, "{}", r.text);
    assert_eq!(r.entries()[0]["subject"]["reference"], "Patient/kid");
    // not a child of 15 or more, not another person, not staff through this path
    s.get(&mum, &view("teen")).await.refused(403, "15 or older");
    s.get(&s.patient_token("stranger"), &view("kid"))
        .await
        .refused(403, "no active guardian link");
    // a RelatedPerson of the same id written by a care facility makes no guardian
    let forged = tsunagi_pmh::guardians::link_id("kid", "stranger");
    s.put(
        "RelatedPerson",
        &forged,
        json!({"resourceType": "RelatedPerson", "id": forged, "active": true,
            "patient": {"reference": "Patient/kid"},
            "extension": [{"url": tsunagi_pmh::guardians::GUARDIAN_EXT, "valueReference": {"reference": "Patient/stranger"}}]}),
        CLINIC,
    );
    s.get(&s.patient_token("stranger"), &view("kid"))
        .await
        .refused(403, "no active guardian link");
    s.get(&doctor, &view("kid"))
        .await
        .refused(403, "patient token");
    // the child's audit trail shows the guardian's read
    assert!(
        s.audit("kid")
            .await
            .iter()
            .any(|e| e.to_string().contains("pmh-guardian-checkup-view")),
        "guardian reads are audited under the child"
    );
    // ending the link ends the access
    let mut end = link("kid", "MTH");
    end["active"] = json!(false);
    assert_eq!(s.post(&m, "/pmh/guardians", &end).await.status, 200);
    s.get(&mum, &view("kid"))
        .await
        .refused(403, "no active guardian link");
}

async fn checkup_results_reach_municipality_patient_and_consenting_institutions(backend: Backend) {
    let Some(s) = start(backend).await else {
        return;
    };
    person(
        &s,
        "baby",
        ("山田", "陽"),
        ("ヤマダ", "ヒナタ"),
        "2026-05-01",
        "千代田区1",
    );
    let doctor = s.token(CLINIC, OrgKind::Clinic, Role::Doctor);
    let result = json!({"municipality": MUNICIPALITY, "kind": "infant", "resource": {
        "resourceType": "Observation", "status": "final",
        "code": {"coding": [{"system": "http://loinc.org", "code": "29463-7", "display": "Body weight"}]},
        "subject": {"reference": "Patient/baby"}, "effectiveDateTime": "2026-11-01",
        "valueQuantity": {"value": 7.2, "unit": "kg", "system": "http://unitsofmeasure.org", "code": "kg"}}});
    let mut bad = result.clone();
    bad["kind"] = json!("dental");
    s.post(&doctor, "/pmh/checkups", &bad)
        .await
        .refused(400, "kind");
    let clerk = s.token(CLINIC, OrgKind::Clinic, Role::Clerk);
    assert_eq!(s.post(&clerk, "/pmh/checkups", &result).await.status, 403);
    let r = s.post(&doctor, "/pmh/checkups", &result).await;
    assert_eq!(r.status, 201, "{}", r.text);
    // the municipality it was reported to
    let m = muni(&s);
    let seen = s.get(&m, "/pmh/checkups?patient=Patient/baby").await;
    assert_eq!(seen.status, 200, "{}", seen.text);
    assert_eq!(seen.entries().len(), 1, "{}", seen.text);
    let other = s.token(
        OTHER_MUNICIPALITY,
        OrgKind::Municipality,
        Role::MunicipalityStaff,
    );
    assert_eq!(
        s.get(&other, "/pmh/checkups?patient=Patient/baby")
            .await
            .entries()
            .len(),
        0
    );
    // the patient
    let me = s.patient_token("baby");
    assert_eq!(
        s.get(&me, "/fhir/Observation?patient=Patient/baby")
            .await
            .entries()
            .len(),
        1
    );
    // another institution: only with consent (category B at its card reception)
    let hosp = s.token(HOSP_A, OrgKind::Hospital, Role::Doctor);
    let card = s.card("baby");
    assert_eq!(
        s.reception(&hosp, &card, [false, false, false], "outpatient")
            .await
            .status,
        200
    );
    assert_eq!(
        s.get(&hosp, "/fhir/Observation?patient=Patient/baby")
            .await
            .entries()
            .len(),
        0
    );
    assert_eq!(
        s.reception(&hosp, &card, [false, true, false], "outpatient")
            .await
            .status,
        200
    );
    assert_eq!(
        s.get(&hosp, "/fhir/Observation?patient=Patient/baby")
            .await
            .entries()
            .len(),
        1
    );
}

async fn file_import_resumes_after_checkpoint(backend: Backend) {
    let Some(s) = start(backend).await else {
        return;
    };
    person(
        &s,
        "p1",
        ("山田", "花子"),
        ("ヤマダ", "ハナコ"),
        "1980-04-01",
        "千代田区1",
    );
    let header = "payerNumber,recipientNumber,programme,familyKana,givenKana,birthDate,sex,start\n";
    let mut csv = header.to_string();
    for (i, law) in ["54", "52", "21"].iter().enumerate() {
        csv.push_str(&format!(
            "{},{},{law},ヤマダ,ハナコ,1980-04-01,female,2026-04-01\n",
            payer(law),
            rno(i as u64 + 1)
        ));
    }
    csv.push_str("bad,row\n");
    let path = s.dir.path().join("recipients.csv");
    std::fs::write(&path, csv).unwrap();
    // a previous run committed the first two rows and crashed
    std::fs::write(tsunagi_pmh::recipients::sidecar(&path, ".checkpoint"), "2").unwrap();
    let work = tsunagi_server::engine::WriteWork::new(
        &s.state.engine,
        &tsunagi_server::Ctx::new(
            tsunagi_policy::identity::Principal::new(
                MUNICIPALITY,
                OrgKind::Municipality,
                vec![],
                Role::MunicipalityStaff,
                Some("batch".into()),
                None,
                false,
            )
            .unwrap(),
            None,
        ),
    );
    let cat = tsunagi_pmh::catalogue::Catalogue::default();
    cat.replace(tsunagi_pmh::catalogue::builtin_statutory());
    let opts = tsunagi_pmh::recipients::Options {
        full: false,
        programme: None,
        as_of: t0().date_naive(),
        batch: 2,
    };
    let report = tokio::task::block_in_place(|| {
        tsunagi_pmh::recipients::import_file(work, &cat, &path, opts, true)
    })
    .unwrap();
    assert_eq!(report.skipped, 2);
    assert_eq!(report.written, 1);
    assert_eq!(report.errors.len(), 1);
    assert_eq!(report.errors[0].0, 4);
    let errors =
        std::fs::read_to_string(tsunagi_pmh::recipients::sidecar(&path, ".errors.csv")).unwrap();
    assert!(errors.contains("4,row,row[4].row"), "{errors}");
    assert_eq!(
        std::fs::read_to_string(tsunagi_pmh::recipients::sidecar(&path, ".checkpoint")).unwrap(),
        "4"
    );
    let subs = subsidies_at_reception(&s, "p1", CLINIC).await;
    assert_eq!(
        subs.len(),
        1,
        "only the row after the checkpoint was applied"
    );
}

async fn demo_seed_is_idempotent(backend: Backend) {
    let Some(s) = start(backend).await else {
        return;
    };
    person(
        &s,
        "pt-01",
        ("山田", "太郎"),
        ("ヤマダ", "タロウ"),
        "1958-04-12",
        "千代田区1",
    );
    person(
        &s,
        "pt-02",
        ("佐藤", "花子"),
        ("サトウ", "ハナコ"),
        "1990-01-01",
        "千代田区2",
    );
    person(
        &s,
        "pt-03",
        ("鈴木", "一郎"),
        ("スズキ", "イチロウ"),
        "1970-01-01",
        "千代田区3",
    );
    let seed = || {
        let store = s.store.clone();
        tokio::task::block_in_place(move || tsunagi_pmh::demo::seed(store)).expect("seed")
    };
    let first = seed();
    assert!(first.contains("4 recipients written"), "{first}");
    let again = seed();
    assert!(
        again.contains("0 recipients written (4 unchanged"),
        "{again}"
    );
    let subs = subsidies_at_reception(&s, "pt-01", CLINIC).await;
    assert_eq!(subs.len(), 2);
}

async fn one_card_returns_insurance_and_subsidies(backend: Backend) {
    let Some(s) = start(backend).await else {
        return;
    };
    municipal_programmes(&s).await;
    person(
        &s,
        "p1",
        ("山田", "花子"),
        ("ヤマダ", "ハナコ"),
        "1980-04-01",
        "東京都千代田区1-1",
    );
    let mut r54 = row(&payer("54"), &rno(1), "54", ("ﾔﾏﾀﾞ", "ﾊﾅｺ"), "1980-04-01");
    r54["monthlyCeiling"] = json!(10000);
    let r88 = row(
        &payer("88"),
        &rno(2),
        "131016-88",
        ("ヤマダ", "ハナコ"),
        "1980-04-01",
    );
    let r = register(&s, "", vec![r54, r88]).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.body["written"], 2, "{}", r.text);

    // $reception: insurance as coverage, both subsidies as public-expense Coverage
    let clerk = s.token(CLINIC, OrgKind::Clinic, Role::Clerk);
    let card = s.card("p1");
    let rec = s
        .reception(&clerk, &card, [false, false, false], "outpatient")
        .await;
    assert_eq!(rec.status, 200, "{}", rec.text);
    assert_eq!(rec.resources("coverage").len(), 1, "{}", rec.text);
    let subs = rec.resources("subsidy");
    assert_eq!(subs.len(), 2, "{}", rec.text);
    for c in &subs {
        assert_eq!(
            c["type"]["coding"][0]["system"],
            "urn:oid:1.2.392.100495.20.2.61"
        );
        assert_eq!(c["type"]["coding"][0]["code"], "8");
        assert_eq!(c["beneficiary"]["reference"], "Patient/p1");
        assert_eq!(
            c["payor"][0]["identifier"]["system"],
            "urn:oid:1.2.392.100495.20.3.71"
        );
    }
    let mut payers: Vec<&str> = subs
        .iter()
        .map(|c| c["payor"][0]["identifier"]["value"].as_str().unwrap())
        .collect();
    payers.sort();
    let (p54, p88) = (payer("54"), payer("88"));
    let mut want = vec![p54.as_str(), p88.as_str()];
    want.sort();
    assert_eq!(payers, want);

    // $eligibility (資格確認書 path) carries them too
    let insurer = tsunagi_testkit::INSURER;
    s.put(
        "Coverage",
        "p1-cov2",
        json!({"resourceType": "Coverage", "id": "p1-cov2", "status": "active",
            "identifier": [{"system": tsunagi_eligibility::coverage::INSURANCE_MEMBER_SYSTEM, "value": format!("{insurer}:つなぎ:p1:00")}],
            "beneficiary": {"reference": "Patient/p1"}, "payor": [{"reference": "Organization/org-insurer"}]}),
        insurer,
    );
    let q = json!({"resourceType": "Parameters", "parameter": [
        {"name": "insurerNumber", "valueString": insurer}, {"name": "symbol", "valueString": "つなぎ"},
        {"name": "number", "valueString": "p1"}, {"name": "branch", "valueString": "00"},
        {"name": "birthDate", "valueDate": "1980-04-01"}]});
    let e = s.post(&clerk, "/fhir/$eligibility", &q).await;
    assert_eq!(e.status, 200, "{}", e.text);
    // the same stored Coverage, in id order
    let mut shown = subs.clone();
    shown.sort_by(|a, b| a["id"].as_str().cmp(&b["id"].as_str()));
    assert_eq!(e.resources("subsidy"), shown, "{}", e.text);
    assert_eq!(e.resources("coverage")[0]["id"], "p1-cov2", "{}", e.text);

    // the municipality's statistics count both answers, per programme, naming no one
    let m = muni(&s);
    let st = s.get(&m, "/pmh/stats?month=2026-11").await;
    assert_eq!(st.status, 200, "{}", st.text);
    let checks = &st.body["eligibilityChecks"];
    assert_eq!(checks["checks"], 2, "{}", st.text);
    assert_eq!(checks["byProgramme"]["54"], 2, "{}", st.text);
    assert_eq!(checks["byProgramme"]["131016-88"], 2, "{}", st.text);
    assert!(!st.text.contains("p1"), "{}", st.text);
    let oct = s.get(&m, "/pmh/stats?month=2026-10").await;
    assert_eq!(oct.body["eligibilityChecks"]["checks"], 0, "{}", oct.text);
    // a check that shows no subsidy counts nowhere
    person(
        &s,
        "p2",
        ("佐藤", "次郎"),
        ("サトウ", "ジロウ"),
        "1975-01-02",
        "東京都千代田区2",
    );
    let card2 = s.card("p2");
    let rec = s
        .reception(&clerk, &card2, [false, false, false], "outpatient")
        .await;
    assert_eq!(rec.status, 200, "{}", rec.text);
    let st = s.get(&m, "/pmh/stats?month=2026-11").await;
    assert_eq!(st.body["eligibilityChecks"]["checks"], 2, "{}", st.text);
}

async fn full_file_ends_dropped_recipient_and_incremental_changes_ceiling(backend: Backend) {
    let Some(s) = start(backend).await else {
        return;
    };
    person(
        &s,
        "p1",
        ("山田", "花子"),
        ("ヤマダ", "ハナコ"),
        "1980-04-01",
        "千代田区1",
    );
    person(
        &s,
        "p2",
        ("佐藤", "次郎"),
        ("サトウ", "ジロウ"),
        "1975-01-02",
        "千代田区2",
    );
    let header = "payerNumber,recipientNumber,programme,familyKana,givenKana,birthDate,sex,start,monthlyCeiling\n";
    let l1 = format!(
        "{},{},54,ヤマダ,ハナコ,1980-04-01,female,2026-04-01,10000\n",
        payer("54"),
        rno(1)
    );
    let l2 = format!(
        "{},{},54,サトウ,ジロウ,1975-01-02,female,2026-04-01,5000\n",
        payer("54"),
        rno(2)
    );
    let r = upload(
        &s,
        "?mode=full&programme=54&asOf=2026-11-01",
        &format!("{header}{l1}{l2}"),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.body["written"], 2);
    assert_eq!(subsidies_at_reception(&s, "p2", CLINIC).await.len(), 1);

    // the next full file lacks p2: p2's recipient ends the day before asOf
    let r = upload(
        &s,
        "?mode=full&programme=54&asOf=2026-11-21",
        &format!("{header}{l1}"),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.body["endedMissing"], 1, "{}", r.text);
    assert_eq!(r.body["unchanged"], 1, "{}", r.text);
    assert!(subsidies_at_reception(&s, "p2", HOSP_A).await.is_empty());
    let c = s
        .get(&muni(&s), "/fhir/Coverage?beneficiary=Patient/p2")
        .await;
    assert_eq!(c.status, 200, "{}", c.text);
    let ended = c.entries();
    assert_eq!(ended.len(), 1, "{}", c.text);
    assert_eq!(ended[0]["period"]["end"], "2026-11-20");

    // an incremental file changes p1's ceiling; the remaining amount follows it
    let inc = format!(
        "action,payerNumber,recipientNumber,programme,familyKana,givenKana,birthDate,sex,start,monthlyCeiling\nchange,{},{},54,ヤマダ,ハナコ,1980-04-01,female,2026-04-01,20000\n",
        payer("54"),
        rno(1)
    );
    let r = upload(&s, "?mode=incremental", &inc).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.body["written"], 1, "{}", r.text);
    let subs = subsidies_at_reception(&s, "p1", CLINIC).await;
    assert_eq!(subs.len(), 1);
    let ceiling = subs[0]["extension"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["url"].as_str().unwrap().ends_with("monthly-ceiling"))
        .unwrap()["valueMoney"]["value"]
        .clone();
    assert_eq!(ceiling, 20000);
    let clerk = s.token(CLINIC, OrgKind::Clinic, Role::Clerk);
    let st = s
        .get(
            &clerk,
            "/pmh/ceiling?patient=Patient/p1&programme=54&month=2026-11",
        )
        .await;
    assert_eq!(st.status, 200, "{}", st.text);
    assert_eq!(st.body["remaining"], 20000);

    // an incremental end row ends p1 too
    let end = format!(
        "action,payerNumber,recipientNumber,programme,end\nend,{},{},54,2026-11-20\n",
        payer("54"),
        rno(1)
    );
    let r = upload(&s, "", &end).await;
    assert_eq!(r.body["ended"], 1, "{}", r.text);
    assert!(subsidies_at_reception(&s, "p1", HOSP_A).await.is_empty());
}

async fn unmatched_and_ambiguous_persons_go_to_review(backend: Backend) {
    let Some(s) = start(backend).await else {
        return;
    };
    // twins in all but the kanji given name
    person(
        &s,
        "t1",
        ("鈴木", "一子"),
        ("スズキ", "カズコ"),
        "2010-05-05",
        "千代田区3",
    );
    person(
        &s,
        "t2",
        ("鈴木", "和子"),
        ("スズキ", "カズコ"),
        "2010-05-05",
        "千代田区3",
    );
    let ambiguous = row(
        &payer("52"),
        &rno(11),
        "52",
        ("スズキ", "カズコ"),
        "2010-05-05",
    );
    let unknown = row(
        &payer("52"),
        &rno(12),
        "52",
        ("タナカ", "ミホ"),
        "2010-05-05",
    );
    let mut kanji = row(
        &payer("52"),
        &rno(13),
        "52",
        ("スズキ", "カズコ"),
        "2010-05-05",
    );
    kanji["familyName"] = json!("鈴木");
    kanji["givenName"] = json!("和子");
    let r = register(&s, "", vec![ambiguous, unknown, kanji]).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.body["review"], 2, "{}", r.text);
    assert_eq!(r.body["written"], 1, "{}", r.text);
    // the kanji name decided t2; nothing was guessed for the others
    let m = muni(&s);
    let c = s.get(&m, "/fhir/Coverage?beneficiary=Patient/t2").await;
    assert_eq!(c.entries().len(), 1, "{}", c.text);
    let c = s.get(&m, "/fhir/Coverage?beneficiary=Patient/t1").await;
    assert_eq!(c.entries().len(), 0, "{}", c.text);

    let list = s.get(&m, "/pmh/review").await;
    assert_eq!(list.status, 200, "{}", list.text);
    let items = list.entries();
    assert_eq!(items.len(), 2, "{}", list.text);
    let amb = items
        .iter()
        .find(|i| i.to_string().contains("ambiguous"))
        .expect("ambiguous item");
    let id = amb["id"].as_str().unwrap();
    // another municipality cannot see or resolve it
    let other = s.token(
        OTHER_MUNICIPALITY,
        OrgKind::Municipality,
        Role::MunicipalityStaff,
    );
    assert_eq!(s.get(&other, "/pmh/review").await.entries().len(), 0);
    let r = s
        .post(
            &other,
            &format!("/pmh/review/{id}/resolve"),
            &json!({"patient": "Patient/t1"}),
        )
        .await;
    assert_eq!(r.status, 404, "{}", r.text);
    let r = s
        .post(
            &m,
            &format!("/pmh/review/{id}/resolve"),
            &json!({"patient": "Patient/t1"}),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.body["beneficiary"]["reference"], "Patient/t1");
    assert_eq!(s.get(&m, "/pmh/review").await.entries().len(), 1);
}

async fn bad_rows_are_reported_and_good_rows_applied(backend: Backend) {
    let Some(s) = start(backend).await else {
        return;
    };
    person(
        &s,
        "p1",
        ("山田", "花子"),
        ("ヤマダ", "ハナコ"),
        "1980-04-01",
        "千代田区1",
    );
    let good = row(
        &payer("54"),
        &rno(1),
        "54",
        ("ヤマダ", "ハナコ"),
        "1980-04-01",
    );
    let mut bad_check = row(
        &payer("54"),
        &rno(2),
        "54",
        ("ヤマダ", "ハナコ"),
        "1980-04-01",
    );
    let mut wrong = rno(2);
    let last = wrong.pop().unwrap();
    wrong.push(if last == '9' {
        '0'
    } else {
        char::from(last as u8 + 1)
    });
    bad_check["recipientNumber"] = json!(wrong);
    let bad_payer = row(
        "54136016",
        &rno(3),
        "54",
        ("ヤマダ", "ハナコ"),
        "1980-04-01",
    );
    let bad_law = row(
        &payer("52"),
        &rno(4),
        "54",
        ("ヤマダ", "ハナコ"),
        "1980-04-01",
    );
    let r = register(&s, "", vec![good, bad_check, bad_payer, bad_law]).await;
    assert_eq!(r.status, 422, "{}", r.text);
    assert_eq!(r.body["written"], 1);
    let errs = r.body["errors"].as_array().unwrap();
    let elements: Vec<&str> = errs
        .iter()
        .map(|e| e["element"].as_str().unwrap())
        .collect();
    assert_eq!(
        elements,
        vec![
            "row[2].recipientNumber",
            "row[3].payerNumber",
            "row[4].payerNumber"
        ],
        "{}",
        r.text
    );
    assert!(errs[0]["reason"].as_str().unwrap().contains("check digit"));
    // only the good row is there
    let c = s
        .get(&muni(&s), "/fhir/Coverage?beneficiary=Patient/p1")
        .await;
    assert_eq!(c.entries().len(), 1, "{}", c.text);
    // a row that fails inside the write (ending a recipient never registered)
    // rolls its batch back; the batch is replayed row by row, so the good row of
    // the same batch still lands and only the failing row is reported
    let good2 = row(
        &payer("54"),
        &rno(5),
        "54",
        ("ヤマダ", "ハナコ"),
        "1980-04-01",
    );
    let end_unknown = json!({"action": "end", "payerNumber": payer("54"),
        "recipientNumber": rno(6), "programme": "54", "end": "2026-12-31"});
    let r = register(&s, "", vec![good2, end_unknown]).await;
    assert_eq!(r.status, 422, "{}", r.text);
    assert_eq!(r.body["written"], 1, "{}", r.text);
    let errs = r.body["errors"].as_array().unwrap();
    assert_eq!(errs.len(), 1, "{}", r.text);
    assert_eq!(errs[0]["row"], 2, "{}", r.text);
    assert!(
        errs[0]["reason"]
            .as_str()
            .unwrap()
            .contains("not registered"),
        "{}",
        r.text
    );
    let c = s
        .get(&muni(&s), "/fhir/Coverage?beneficiary=Patient/p1")
        .await;
    assert_eq!(c.entries().len(), 2, "{}", c.text);
    // a clinic cannot register recipients
    let clerk = s.token(CLINIC, OrgKind::Clinic, Role::Clerk);
    let r = s
        .post(&clerk, "/pmh/recipients", &json!({"recipients": []}))
        .await;
    assert_eq!(r.status, 403, "{}", r.text);
}

async fn ceiling_accumulates_across_facilities_under_concurrency(backend: Backend) {
    let Some(s) = start(backend).await else {
        return;
    };
    person(
        &s,
        "p1",
        ("山田", "花子"),
        ("ヤマダ", "ハナコ"),
        "1980-04-01",
        "千代田区1",
    );
    let mut r54 = row(
        &payer("54"),
        &rno(1),
        "54",
        ("ヤマダ", "ハナコ"),
        "1980-04-01",
    );
    r54["monthlyCeiling"] = json!(10000);
    assert_eq!(register(&s, "", vec![r54]).await.status, 200);
    let clinic = s.token(CLINIC, OrgKind::Clinic, Role::Clerk);
    let hosp = s.token(HOSP_A, OrgKind::Hospital, Role::Clerk);
    // no reception yet: refused
    let report =
        json!({"patient": "Patient/p1", "programme": "54", "date": "2026-11-05", "amount": 100});
    s.post(&clinic, "/pmh/ceiling-reports", &report)
        .await
        .refused(403, "reception");
    let card = s.card("p1");
    for t in [&clinic, &hosp] {
        assert_eq!(
            s.reception(t, &card, [false, false, false], "outpatient")
                .await
                .status,
            200
        );
    }
    // 2 facilities x 15 concurrent reports of 100 yen
    let s = Arc::new(s);
    let mut tasks = Vec::new();
    for k in 0..30 {
        let (s, t, report) = (
            s.clone(),
            if k % 2 == 0 {
                clinic.clone()
            } else {
                hosp.clone()
            },
            report.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let r = s.post(&t, "/pmh/ceiling-reports", &report).await;
            assert_eq!(r.status, 201, "{}", r.text);
            r.body["report"].as_str().unwrap().to_string()
        }));
    }
    let mut ids = Vec::new();
    for t in tasks {
        ids.push(t.await.unwrap());
    }
    let st = s
        .get(
            &clinic,
            "/pmh/ceiling?patient=Patient/p1&programme=54&month=2026-11",
        )
        .await;
    assert_eq!(st.status, 200, "{}", st.text);
    assert_eq!(st.body["used"], 3000, "{}", st.text);
    assert_eq!(st.body["remaining"], 7000);
    assert_eq!(st.body["entries"].as_array().unwrap().len(), 30);
    let facilities: std::collections::BTreeSet<&str> = st.body["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["facility"].as_str().unwrap())
        .collect();
    assert_eq!(facilities.len(), 2);
    // a correction replaces one report's amount
    let mut corr = report.clone();
    corr["amount"] = json!(6100);
    corr["corrects"] = json!(ids[0]);
    let r = s.post(&hosp, "/pmh/ceiling-reports", &corr).await;
    assert_eq!(r.status, 201, "{}", r.text);
    assert_eq!(r.body["used"], 9000, "{}", r.text);
    assert_eq!(r.body["remaining"], 1000);
    // the patient and the municipality see the same; another municipality does not
    let me = s.patient_token("p1");
    let path = "/pmh/ceiling?patient=Patient/p1&programme=54&month=2026-11";
    assert_eq!(s.get(&me, path).await.body["used"], 9000);
    assert_eq!(s.get(&muni(&s), path).await.body["used"], 9000);
    let other = s.token(
        OTHER_MUNICIPALITY,
        OrgKind::Municipality,
        Role::MunicipalityStaff,
    );
    s.get(&other, path).await.refused(403, "ceiling");
    // a programme without ceiling management refuses reports
    let mut r10 = report.clone();
    r10["programme"] = json!("10");
    assert_eq!(
        s.post(&clinic, "/pmh/ceiling-reports", &r10).await.status,
        422
    );
}

async fn vaccination_voucher_questionnaire_and_refusals(backend: Backend) {
    let Some(s) = start(backend).await else {
        return;
    };
    person(
        &s,
        "p1",
        ("山田", "花子"),
        ("ヤマダ", "ハナコ"),
        "2012-04-01",
        "千代田区1",
    );
    let m = muni(&s);
    let q = json!({"resourceType": "Questionnaire", "id": "q-hpv", "status": "active",
        "item": [{"linkId": "fever", "text": "今日、体に具合の悪いところがありますか", "type": "boolean", "required": true},
                 {"linkId": "note", "text": "その他", "type": "string"}]});
    let r = s.post(&m, "/pmh/questionnaires", &q).await;
    assert_eq!(r.status, 201, "{}", r.text);
    for (dose, earliest) in [(1, "2026-04-01"), (2, "2026-04-01")] {
        let r = s
            .post(&m, "/pmh/vouchers", &json!({"patient": "Patient/p1", "vaccineCode": "HPV", "doseNumber": dose,
                "earliest": earliest, "expires": "2026-12-31", "minIntervalDays": 28, "questionnaire": "Questionnaire/q-hpv"}))
            .await;
        assert_eq!(r.status, 201, "{}", r.text);
    }
    let doctor = s.token(CLINIC, OrgKind::Clinic, Role::Doctor);
    let vacc = |dose: u64, on: &str| json!({"patient": "Patient/p1", "vaccineCode": "HPV", "doseNumber": dose, "occurrence": on});
    // no reception yet
    s.post(&doctor, "/pmh/vaccinations", &vacc(1, "2026-11-21"))
        .await
        .refused(403, "reception");
    let card = s.card("p1");
    assert_eq!(
        s.reception(&doctor, &card, [false, false, false], "outpatient")
            .await
            .status,
        200
    );
    // questionnaire not answered yet
    s.post(&doctor, "/pmh/vaccinations", &vacc(1, "2026-11-21"))
        .await
        .refused(422, "questionnaire");
    // the patient answers: a missing required item is named
    let me = s.patient_token("p1");
    let mut qr = json!({"resourceType": "QuestionnaireResponse", "questionnaire": "Questionnaire/q-hpv",
        "status": "completed", "subject": {"reference": "Patient/p1"},
        "item": [{"linkId": "note", "answer": [{"valueString": "なし"}]}]});
    let r = s.post(&me, "/pmh/questionnaire-responses", &qr).await;
    r.refused(400, "fever");
    assert_eq!(
        r.body["issue"][0]["expression"][0],
        "QuestionnaireResponse.item.where(linkId='fever').answer"
    );
    qr["item"] = json!([{"linkId": "fever", "answer": [{"valueBoolean": false}]}]);
    // someone else's questionnaire cannot be answered by this patient
    let mut other = qr.clone();
    other["subject"] = json!({"reference": "Patient/p2"});
    assert_eq!(
        s.post(&me, "/pmh/questionnaire-responses", &other)
            .await
            .status,
        403
    );
    let r = s.post(&me, "/pmh/questionnaire-responses", &qr).await;
    assert_eq!(r.status, 201, "{}", r.text);
    // the clinic reads vouchers and answers at reception
    let at = s.get(&doctor, "/pmh/vaccination?patient=Patient/p1").await;
    assert_eq!(at.status, 200, "{}", at.text);
    let types: Vec<String> = at
        .entries()
        .iter()
        .map(|e| e["resourceType"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        types
            .iter()
            .filter(|t| *t == "ImmunizationRecommendation")
            .count(),
        2,
        "{}",
        at.text
    );
    assert_eq!(
        types
            .iter()
            .filter(|t| *t == "QuestionnaireResponse")
            .count(),
        1,
        "{}",
        at.text
    );
    // dose 2 before dose 1: not entitled yet (no previous dose)
    s.post(&doctor, "/pmh/vaccinations", &vacc(2, "2026-11-21"))
        .await
        .refused(422, "not entitled");
    // dose 1
    let r = s
        .post(&doctor, "/pmh/vaccinations", &vacc(1, "2026-11-21"))
        .await;
    assert_eq!(r.status, 201, "{}", r.text);
    assert_eq!(r.body["resourceType"], "Immunization");
    // used once
    s.post(&doctor, "/pmh/vaccinations", &vacc(1, "2026-11-21"))
        .await
        .refused(409, "used");
    // dose 2 before the minimum interval
    s.post(&doctor, "/pmh/vaccinations", &vacc(2, "2026-12-01"))
        .await
        .refused(422, "2026-12-19");
    // a vaccine without a voucher
    s.post(&doctor, "/pmh/vaccinations", &vacc(3, "2026-12-20"))
        .await
        .refused(422, "not entitled");
    // expired voucher
    s.post(&doctor, "/pmh/vaccinations", &vacc(2, "2027-01-05"))
        .await
        .refused(422, "expired");
    // the patient and the municipality see dose 1 at once
    let mine = s.get(&me, "/fhir/Immunization?patient=Patient/p1").await;
    assert_eq!(mine.entries().len(), 1, "{}", mine.text);
    let seen = s.get(&m, "/pmh/vaccinations?patient=Patient/p1").await;
    assert_eq!(seen.status, 200, "{}", seen.text);
    assert_eq!(
        seen.entries()
            .iter()
            .filter(|e| e["resourceType"] == "Immunization")
            .count(),
        1,
        "{}",
        seen.text
    );
    // another municipality sees none of it
    let other_m = s.token(
        OTHER_MUNICIPALITY,
        OrgKind::Municipality,
        Role::MunicipalityStaff,
    );
    assert_eq!(
        s.get(&other_m, "/pmh/vaccinations?patient=Patient/p1")
            .await
            .entries()
            .len(),
        0
    );
    // the municipality-wide list: every voucher it issued, each followed by its
    // vaccination when given; filters and pages
    let list = |q: &'static str, token: String| {
        let s = &s;
        async move {
            let r = s.get(&token, &format!("/pmh/vaccinations{q}")).await;
            assert_eq!(r.status, 200, "{q}: {}", r.text);
            let kinds: Vec<String> = r
                .entries()
                .iter()
                .map(|e| e["resourceType"].as_str().unwrap_or("").to_string())
                .collect();
            (r.body["total"].clone(), kinds)
        }
    };
    let (total, kinds) = list("", m.clone()).await;
    assert_eq!(total, 2);
    assert_eq!(
        kinds
            .iter()
            .filter(|k| *k == "ImmunizationRecommendation")
            .count(),
        2
    );
    assert_eq!(kinds.iter().filter(|k| *k == "Immunization").count(), 1);
    assert_eq!(
        list("?given=true", m.clone()).await,
        (
            json!(1),
            vec![
                "ImmunizationRecommendation".to_string(),
                "Immunization".to_string()
            ]
        )
    );
    assert_eq!(
        list("?given=false&vaccine=HPV", m.clone()).await,
        (json!(1), vec!["ImmunizationRecommendation".to_string()])
    );
    let (t1, p1) = list("?_count=1", m.clone()).await;
    let (t2, p2) = list("?_count=1&_offset=1", m.clone()).await;
    assert_eq!((t1, t2), (json!(2), json!(2)));
    assert_eq!(p1.len() + p2.len(), 3, "{p1:?} {p2:?}");
    assert_eq!(list("?vaccine=MR", m.clone()).await, (json!(0), vec![]));
    assert_eq!(list("", other_m.clone()).await, (json!(0), vec![]));
    s.get(&m, "/pmh/vaccinations?_count=0")
        .await
        .refused(400, "_count");
    s.get(&m, "/pmh/vaccinations?dose=1")
        .await
        .refused(400, "dose");
    s.get(&me, "/pmh/vaccinations")
        .await
        .refused(403, "municipality");
    assert!(
        s.audit("p1")
            .await
            .iter()
            .any(|e| e.to_string().contains("pmh-vaccination-list")),
        "the list is audited per resident"
    );
    // and the clock: after the minimum interval dose 2 is given
    s.clock.advance(Duration::days(30));
    let r = s
        .post(&doctor, "/pmh/vaccinations", &vacc(2, "2026-12-20"))
        .await;
    // the reception grant of 24 h has lapsed with the clock: read the card again
    r.refused(403, "reception");
    assert_eq!(
        s.reception(&doctor, &card, [false, false, false], "outpatient")
            .await
            .status,
        200
    );
    let r = s
        .post(&doctor, "/pmh/vaccinations", &vacc(2, "2026-12-20"))
        .await;
    assert_eq!(r.status, 201, "{}", r.text);
}

async fn municipalities_see_only_their_own(backend: Backend) {
    let Some(s) = start(backend).await else {
        return;
    };
    person(
        &s,
        "p1",
        ("山田", "花子"),
        ("ヤマダ", "ハナコ"),
        "1980-04-01",
        "千代田区1",
    );
    s.put(
        "Observation",
        "obs-1",
        json!({"resourceType": "Observation", "id": "obs-1", "status": "final",
            "code": {"text": "HbA1c"}, "subject": {"reference": "Patient/p1"}}),
        HOSP_A,
    );
    assert_eq!(
        register(
            &s,
            "",
            vec![row(
                &payer("54"),
                &rno(1),
                "54",
                ("ヤマダ", "ハナコ"),
                "1980-04-01"
            )]
        )
        .await
        .status,
        200
    );
    let m = muni(&s);
    let other = s.token(
        OTHER_MUNICIPALITY,
        OrgKind::Municipality,
        Role::MunicipalityStaff,
    );
    let mine = s.get(&m, "/fhir/Coverage?beneficiary=Patient/p1").await;
    assert_eq!(mine.entries().len(), 1, "{}", mine.text);
    assert!(
        mine.entries()[0]["type"]["coding"][0]["code"] == "8",
        "insurer coverage must not show"
    );
    let id = mine.entries()[0]["id"].as_str().unwrap().to_string();
    assert_eq!(
        s.get(&other, "/fhir/Coverage?beneficiary=Patient/p1")
            .await
            .entries()
            .len(),
        0
    );
    assert_eq!(
        s.get(&other, &format!("/fhir/Coverage/{id}")).await.status,
        403
    );
    // no clinical data for municipalities
    assert_eq!(
        s.get(&m, "/fhir/Observation?patient=Patient/p1")
            .await
            .status,
        403
    );
    assert_eq!(s.get(&m, "/fhir/Observation/obs-1").await.status, 403);
    assert_eq!(s.get(&m, "/fhir/Patient/p1").await.status, 403);
    // another municipality cannot change it
    let mut cov = mine.entries()[0].clone();
    cov["status"] = json!("cancelled");
    assert_eq!(
        s.put_json(&other, &format!("/fhir/Coverage/{id}"), &cov)
            .await
            .status,
        403
    );
    // statistics are counts only
    let st = s.get(&m, "/pmh/stats?month=2026-11").await;
    assert_eq!(st.status, 200, "{}", st.text);
    assert_eq!(st.body["recipients"]["54"], 1, "{}", st.text);
    assert!(!st.text.contains("p1"), "{}", st.text);
    // the audit trail records the municipality's reads
    let events = s.audit("p1").await;
    assert!(events.iter().any(|e| e.to_string().contains(MUNICIPALITY)));
}

async fn certificates_mailbox(backend: Backend) {
    let Some(s) = start(backend).await else {
        return;
    };
    person(
        &s,
        "p1",
        ("山田", "花子"),
        ("ヤマダ", "ハナコ"),
        "1980-04-01",
        "千代田区1",
    );
    let doctor = s.token(HOSP_A, OrgKind::Hospital, Role::Doctor);
    let cert = json!({"municipality": MUNICIPALITY, "patient": "Patient/p1", "kind": "intractable-disease-opinion",
        "title": "臨床調査個人票", "contentType": "application/pdf", "data": "JVBERi0xLjQK"});
    let clerk = s.token(HOSP_A, OrgKind::Hospital, Role::Clerk);
    assert_eq!(s.post(&clerk, "/pmh/certificates", &cert).await.status, 403);
    let mut bad = cert.clone();
    bad["municipality"] = json!("131017");
    s.post(&doctor, "/pmh/certificates", &bad)
        .await
        .refused(400, "check digit");
    let r = s.post(&doctor, "/pmh/certificates", &cert).await;
    assert_eq!(r.status, 201, "{}", r.text);
    let id = r.body["id"].as_str().unwrap().to_string();
    let m = muni(&s);
    let list = s.get(&m, "/pmh/certificates").await;
    assert_eq!(list.body["total"], 1, "{}", list.text);
    assert_eq!(list.body["certificates"][0]["status"], "submitted");
    assert!(
        !list.text.contains("JVBERi0"),
        "the listing carries no document"
    );
    let other = s.token(
        OTHER_MUNICIPALITY,
        OrgKind::Municipality,
        Role::MunicipalityStaff,
    );
    assert_eq!(s.get(&other, "/pmh/certificates").await.body["total"], 0);
    assert_eq!(
        s.get(&other, &format!("/pmh/certificates/{id}"))
            .await
            .status,
        404
    );
    let doc = s.get(&m, &format!("/pmh/certificates/{id}")).await;
    assert_eq!(doc.status, 200, "{}", doc.text);
    assert!(doc.text.contains("JVBERi0xLjQK"));
    let ack = s
        .post(
            &m,
            &format!("/pmh/certificates/{id}/acknowledge"),
            &json!({}),
        )
        .await;
    assert_eq!(ack.status, 200, "{}", ack.text);
    assert_eq!(ack.body["status"], "acknowledged");
    // the mailbox survives a restart
    let s = s.restart(t0()).await;
    let list = s.get(&muni(&s), "/pmh/certificates").await;
    assert_eq!(
        list.body["certificates"][0]["status"], "acknowledged",
        "{}",
        list.text
    );
}
