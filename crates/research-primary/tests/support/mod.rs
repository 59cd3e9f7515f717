//! Harness of the secondary-use black-box tests, on the shared testkit: the real
//! primary server (with the eligibility service) plus the opt-out module on
//! 127.0.0.1:0, both backends; and synthetic clinical records written as the
//! sharing and e-prescription services store them, full of identifiers.

#![allow(dead_code)]

use std::ops::Deref;
use std::sync::Arc;

use serde_json::{Value, json};
use tsunagi_policy::identity::{OrgKind, Role};
use tsunagi_research_primary::OptOutService;
pub use tsunagi_testkit::Backend;
use tsunagi_testkit::{Options, TestServer};

pub const HOSPITAL: &str = "1310123458";
pub const PHARMACY: &str = "1340222221";

pub struct Primary(pub TestServer);

impl Deref for Primary {
    type Target = TestServer;
    fn deref(&self) -> &TestServer {
        &self.0
    }
}

/// Identifying strings of one seeded person, none of which may reach an extract.
pub struct Person {
    pub id: String,
    pub identifiers: Vec<String>,
}

impl Primary {
    pub async fn start(backend: Backend) -> Option<Primary> {
        let opts = Options::default().service(|_| Arc::new(OptOutService));
        TestServer::start_with(backend, opts).await.map(Primary)
    }

    pub fn doctor_token(&self) -> String {
        self.token(HOSPITAL, OrgKind::Hospital, Role::Doctor)
    }

    pub async fn call(&self, method: reqwest::Method, path: &str, token: &str) -> (u16, Value) {
        let r = self
            .http
            .request(method, format!("{}{path}", self.root))
            .bearer_auth(token)
            .send()
            .await
            .expect("request");
        let s = r.status().as_u16();
        (s, r.json().await.unwrap_or(Value::Null))
    }

    /// Person `n` (pt-NN): demographics full of identifiers, and one record of
    /// each extracted type (the first 20 female, then male; weights and blood
    /// pressures vary with n).
    pub fn seed_person(&self, n: usize) -> Person {
        let id = format!("pt-{n:02}");
        let family = format!("厚労{n}");
        let kana = format!("コウロウ{n}");
        let phone = format!("090-1234-{n:04}");
        let insurance = format!("1234{n:04}");
        let card = format!("9{n:011}");
        let address = format!("東京都千代田区霞が関1-2-{n}");
        let female = !n.is_multiple_of(3);
        self.put(
            "Patient",
            &id,
            json!({
                "resourceType": "Patient", "id": id,
                "identifier": [
                    {"system": "urn:oid:1.2.392.100495.20.3.51.1", "value": insurance},
                    {"system": "urn:tsunagi:card", "value": card}
                ],
                "name": [
                    {"use": "official", "family": family, "given": ["花子"], "text": format!("{family} 花子")},
                    {"use": "official", "family": kana, "given": ["ハナコ"], "extension": [{"url": "http://hl7.org/fhir/StructureDefinition/iso21090-EN-representation", "valueCode": "SYL"}]}
                ],
                "telecom": [{"system": "phone", "value": phone}],
                "gender": if female { "female" } else { "male" },
                "birthDate": format!("{}-07-{:02}", 1950 + n, 1 + n % 28),
                "address": [{"text": address, "postalCode": "100-8916"}]
            }),
            HOSPITAL,
        );
        let subject =
            json!({"reference": format!("Patient/{id}"), "display": format!("{family} 花子")});
        self.put("Condition", &format!("cond-{n}"), json!({
            "resourceType": "Condition",
            "clinicalStatus": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/condition-clinical", "code": "active"}]},
            "verificationStatus": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/condition-ver-status", "code": "confirmed"}]},
            "code": {"coding": [{"system": "http://jpfhir.jp/fhir/core/CodeSystem/JP_ICD10", "code": if n.is_multiple_of(2) { "E11" } else { "I10" }, "display": if n.is_multiple_of(2) { "2型糖尿病" } else { "本態性高血圧症" }}]},
            "subject": subject, "recordedDate": format!("2026-0{}-1{}", 1 + n % 9, n % 10),
            "note": [{"text": format!("{family}さん 電話 {phone}")}]
        }), HOSPITAL);
        self.put("Observation", &format!("bw-{n}"), json!({
            "resourceType": "Observation", "status": "final",
            "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category", "code": "vital-signs"}]}],
            "code": {"coding": [{"system": "http://loinc.org", "code": "29463-7", "display": "Body weight"}]},
            "subject": subject, "effectiveDateTime": "2026-04-01T10:00:00+09:00",
            "valueQuantity": {"value": 45.0 + n as f64 * 1.3, "unit": "kg"},
            "performer": [{"reference": "Practitioner/dr-1", "display": "医師 太郎"}]
        }), HOSPITAL);
        self.put("Observation", &format!("sbp-{n}"), json!({
            "resourceType": "Observation", "status": "final",
            "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category", "code": "vital-signs"}]}],
            "code": {"coding": [{"system": "http://loinc.org", "code": "8480-6", "display": "Systolic blood pressure"}]},
            "subject": subject, "effectiveDateTime": "2026-04-01T10:00:00+09:00",
            "valueQuantity": {"value": 110 + (n * 7) % 110, "unit": "mm[Hg]"}
        }), HOSPITAL);
        self.put("AllergyIntolerance", &format!("alg-{n}"), json!({
            "resourceType": "AllergyIntolerance", "patient": subject,
            "category": ["medication"], "criticality": "high",
            "code": {"coding": [{"system": "urn:oid:1.2.392.200119.4.403.1", "code": "1149019F1", "display": "ペニシリン系"}]},
            "recordedDate": "2025-12-01"
        }), HOSPITAL);
        self.put("MedicationRequest", &format!("rx-{n}"), json!({
            "resourceType": "MedicationRequest", "status": "active", "intent": "order",
            "medicationCodeableConcept": {"coding": [{"system": "urn:oid:1.2.392.100495.20.2.74", "code": "620004457", "display": "メトホルミン錠250mg"}]},
            "subject": subject, "authoredOn": "2026-04-01",
            "requester": {"reference": "Practitioner/dr-1", "display": "医師 太郎"},
            "dosageInstruction": [{"text": format!("{family}様 1日2回"), "doseAndRate": [{"doseQuantity": {"value": 2, "unit": "錠"}}]}],
            "dispenseRequest": {"expectedSupplyDuration": {"value": 14, "unit": "日"}},
            "identifier": [{"system": "urn:tsunagi:rx-number", "value": format!("RX-{card}")}]
        }), HOSPITAL);
        self.put("MedicationDispense", &format!("disp-{n}"), json!({
            "resourceType": "MedicationDispense", "status": "completed",
            "medicationCodeableConcept": {"coding": [{"system": "urn:oid:1.2.392.100495.20.2.74", "code": "620004457", "display": "メトホルミン錠250mg"}]},
            "subject": subject, "whenHandedOver": "2026-04-02T15:00:00+09:00",
            "quantity": {"value": 28, "unit": "錠"}, "daysSupply": {"value": 14, "unit": "日"}
        }), PHARMACY);
        self.put(
            "Coverage",
            &format!("cov-{n}"),
            json!({
                "resourceType": "Coverage", "status": "active",
                "beneficiary": {"reference": format!("Patient/{id}")},
                "payor": [{"display": "健保"}],
                "subscriberId": insurance
            }),
            "06130017",
        );
        Person {
            identifiers: vec![
                id.clone(),
                family,
                kana,
                phone,
                insurance,
                card,
                address,
                "花子".into(),
                "ハナコ".into(),
                "100-8916".into(),
                "医師 太郎".into(),
                format!("cond-{n}"),
                format!("bw-{n}"),
                format!("rx-{n}"),
                format!("RX-9{n:011}"),
                HOSPITAL.into(),
                PHARMACY.into(),
            ],
            id,
        }
    }
}

/// Every value of every column of every Parquet file under `dir`, as text, with
/// its file and column: the identifier scan reads all of them.
pub fn all_cells(dir: &std::path::Path) -> Vec<(String, String, String)> {
    use arrow::util::display::{ArrayFormatter, FormatOptions};
    use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
    let mut out = Vec::new();
    let mut files = 0;
    for e in std::fs::read_dir(dir).expect("read dir") {
        let p = e.expect("entry").path();
        if p.extension().and_then(|x| x.to_str()) != Some("parquet") {
            continue;
        }
        files += 1;
        let name = p.file_name().unwrap().to_string_lossy().to_string();
        let reader = ParquetRecordBatchReaderBuilder::try_new(std::fs::File::open(&p).unwrap())
            .unwrap()
            .build()
            .unwrap();
        for b in reader {
            let b = b.unwrap();
            let opts = FormatOptions::default();
            for (i, f) in b.schema().fields().iter().enumerate() {
                let fmt = ArrayFormatter::try_new(b.column(i).as_ref(), &opts).unwrap();
                for r in 0..b.num_rows() {
                    out.push((name.clone(), f.name().clone(), fmt.value(r).to_string()));
                }
                out.push((name.clone(), "(column name)".into(), f.name().clone()));
            }
        }
    }
    assert!(files > 0, "no Parquet file in {}", dir.display());
    out
}
