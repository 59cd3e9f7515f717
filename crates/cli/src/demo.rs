//! The fixed demo dataset (documented in docs/DEMO.md): organisations of every
//! kind, 20 patients with coverage and a few clinical records. Created once; a
//! second run finds it and only rewrites DIR/demo.json.

use std::path::Path;

use anyhow::Context;
use serde_json::{Value, json};
use tsunagi_policy::audit::AuditRecord;
use tsunagi_policy::identity::{
    FLAG_DISASTER_BASE, FLAG_EMERGENCY_DESIGNATED, OrgKind, Principal, Purpose, Role,
};
use tsunagi_policy::ids::mod10_w21_check_digit;
use tsunagi_server::orgs::{INSURER_SYSTEM, organization};
use tsunagi_store::{Store, WriteContext};

/// Appends the modulus-10 (weights 2-1) check digit to a string of digits.
fn with_check_digit(body: &str) -> String {
    let digits: Vec<u8> = body.bytes().map(|b| b - b'0').collect();
    format!("{body}{}", mod10_w21_check_digit(&digits))
}

pub struct DemoOrg {
    pub id: &'static str,
    pub code: String,
    pub kind: OrgKind,
    pub name: &'static str,
    pub flags: &'static [&'static str],
}

/// The demo organisations. Codes follow the real formats and carry valid check digits.
pub fn organisations() -> Vec<DemoOrg> {
    vec![
        DemoOrg {
            id: "org-hospital",
            code: with_check_digit("131012345"),
            kind: OrgKind::Hospital,
            name: "つなぎ総合病院",
            flags: &[FLAG_EMERGENCY_DESIGNATED, FLAG_DISASTER_BASE],
        },
        DemoOrg {
            id: "org-clinic",
            code: with_check_digit("131054321"),
            kind: OrgKind::Clinic,
            name: "神田内科クリニック",
            flags: &[],
        },
        DemoOrg {
            id: "org-dental",
            code: with_check_digit("133011111"),
            kind: OrgKind::DentalClinic,
            name: "九段歯科医院",
            flags: &[],
        },
        DemoOrg {
            id: "org-pharmacy",
            code: with_check_digit("134022222"),
            kind: OrgKind::Pharmacy,
            name: "さくら調剤薬局 神保町店",
            flags: &[],
        },
        DemoOrg {
            id: "org-insurer",
            code: with_check_digit("0613001"),
            kind: OrgKind::Insurer,
            name: "つなぎ健康保険組合",
            flags: &[],
        },
        DemoOrg {
            id: "org-municipality",
            code: "131016".into(),
            kind: OrgKind::Municipality,
            name: "千代田区",
            flags: &[],
        },
        DemoOrg {
            id: "org-research",
            code: "R0000001".into(),
            kind: OrgKind::ResearchOrganisation,
            name: "国立つなぎ医療研究センター",
            flags: &[],
        },
        DemoOrg {
            id: "org-operator",
            code: "operator".into(),
            kind: OrgKind::Operator,
            name: "つなぎ運用センター",
            flags: &[],
        },
        DemoOrg {
            id: "org-ministry",
            code: "mhlw".into(),
            kind: OrgKind::Ministry,
            name: "厚生労働省",
            flags: &[],
        },
    ]
}

struct DemoPatient {
    family: &'static str,
    given: &'static str,
    family_kana: &'static str,
    given_kana: &'static str,
    gender: &'static str,
    birth: &'static str,
    address: &'static str,
    postal: &'static str,
}

const PATIENTS: &[DemoPatient] = &[
    DemoPatient {
        family: "山田",
        given: "太郎",
        family_kana: "ヤマダ",
        given_kana: "タロウ",
        gender: "male",
        birth: "1958-04-12",
        address: "東京都千代田区神田神保町1-1",
        postal: "101-0051",
    },
    DemoPatient {
        family: "佐藤",
        given: "花子",
        family_kana: "サトウ",
        given_kana: "ハナコ",
        gender: "female",
        birth: "1972-09-03",
        address: "東京都千代田区九段南2-3",
        postal: "102-0074",
    },
    DemoPatient {
        family: "鈴木",
        given: "一郎",
        family_kana: "スズキ",
        given_kana: "イチロウ",
        gender: "male",
        birth: "1985-01-20",
        address: "東京都新宿区西新宿2-8-1",
        postal: "163-8001",
    },
    DemoPatient {
        family: "高橋",
        given: "美咲",
        family_kana: "タカハシ",
        given_kana: "ミサキ",
        gender: "female",
        birth: "1990-06-15",
        address: "東京都文京区本郷7-3-1",
        postal: "113-0033",
    },
    DemoPatient {
        family: "田中",
        given: "健太",
        family_kana: "タナカ",
        given_kana: "ケンタ",
        gender: "male",
        birth: "1966-11-30",
        address: "東京都千代田区丸の内1-9-1",
        postal: "100-0005",
    },
    DemoPatient {
        family: "伊藤",
        given: "さくら",
        family_kana: "イトウ",
        given_kana: "サクラ",
        gender: "female",
        birth: "2012-03-25",
        address: "東京都千代田区麹町4-2",
        postal: "102-0083",
    },
    DemoPatient {
        family: "渡辺",
        given: "翔",
        family_kana: "ワタナベ",
        given_kana: "ショウ",
        gender: "male",
        birth: "2001-08-08",
        address: "東京都台東区上野公園7-20",
        postal: "110-0007",
    },
    DemoPatient {
        family: "中村",
        given: "由美子",
        family_kana: "ナカムラ",
        given_kana: "ユミコ",
        gender: "female",
        birth: "1949-02-14",
        address: "東京都千代田区神田駿河台2-1",
        postal: "101-0062",
    },
    DemoPatient {
        family: "小林",
        given: "誠",
        family_kana: "コバヤシ",
        given_kana: "マコト",
        gender: "male",
        birth: "1978-12-01",
        address: "東京都港区芝公園4-2-8",
        postal: "105-0011",
    },
    DemoPatient {
        family: "加藤",
        given: "陽菜",
        family_kana: "カトウ",
        given_kana: "ヒナ",
        gender: "female",
        birth: "2015-05-05",
        address: "東京都千代田区一番町10",
        postal: "102-0082",
    },
    DemoPatient {
        family: "吉田",
        given: "大輔",
        family_kana: "ヨシダ",
        given_kana: "ダイスケ",
        gender: "male",
        birth: "1982-07-19",
        address: "東京都中央区銀座4-6-16",
        postal: "104-0061",
    },
    DemoPatient {
        family: "山本",
        given: "恵子",
        family_kana: "ヤマモト",
        given_kana: "ケイコ",
        gender: "female",
        birth: "1955-10-10",
        address: "東京都千代田区外神田1-15",
        postal: "101-0021",
    },
    DemoPatient {
        family: "松本",
        given: "拓也",
        family_kana: "マツモト",
        given_kana: "タクヤ",
        gender: "male",
        birth: "1993-04-01",
        address: "東京都渋谷区神南2-2-1",
        postal: "150-0041",
    },
    DemoPatient {
        family: "井上",
        given: "明美",
        family_kana: "イノウエ",
        given_kana: "アケミ",
        gender: "female",
        birth: "1968-01-27",
        address: "東京都千代田区富士見2-10",
        postal: "102-0071",
    },
    DemoPatient {
        family: "木村",
        given: "蓮",
        family_kana: "キムラ",
        given_kana: "レン",
        gender: "male",
        birth: "2019-09-09",
        address: "東京都千代田区三番町6",
        postal: "102-0075",
    },
    DemoPatient {
        family: "林",
        given: "節子",
        family_kana: "ハヤシ",
        given_kana: "セツコ",
        gender: "female",
        birth: "1938-06-06",
        address: "東京都千代田区神田小川町3-6",
        postal: "101-0052",
    },
    DemoPatient {
        family: "斎藤",
        given: "直樹",
        family_kana: "サイトウ",
        given_kana: "ナオキ",
        gender: "male",
        birth: "1975-03-03",
        address: "東京都品川区大井1-14-1",
        postal: "140-0014",
    },
    DemoPatient {
        family: "清水",
        given: "愛",
        family_kana: "シミズ",
        given_kana: "アイ",
        gender: "female",
        birth: "1998-12-24",
        address: "東京都千代田区飯田橋3-10",
        postal: "102-0072",
    },
    DemoPatient {
        family: "山口",
        given: "隆",
        family_kana: "ヤマグチ",
        given_kana: "タカシ",
        gender: "male",
        birth: "1960-08-15",
        address: "東京都千代田区内神田2-4",
        postal: "101-0047",
    },
    DemoPatient {
        family: "森",
        given: "結衣",
        family_kana: "モリ",
        given_kana: "ユイ",
        gender: "female",
        birth: "2007-11-11",
        address: "東京都千代田区西神田2-7",
        postal: "101-0065",
    },
];

/// JP Core HumanName representation extension (IDE = kanji, SYL = kana).
const NAME_REPRESENTATION: &str =
    "http://hl7.org/fhir/StructureDefinition/iso21090-EN-representation";
/// Per-institution patient id system: this OID followed by "1" and the 10-digit institution code.
const PATIENT_ID_OID: &str = "urn:oid:1.2.392.100495.20.3.51.1";
/// JP Core: 保険者番号:記号:番号:枝番 as one Coverage identifier.
const INSURANCE_MEMBER_SYSTEM: &str = "http://jpfhir.jp/fhir/ccs/Idsysmem/JP_Insurance_member";

/// 負担割合 (copayment rate) by age on the demo's reference date, 2026-11-21.
fn copay_percent(birth: &str) -> u32 {
    let year: i32 = birth[..4].parse().unwrap_or(2000);
    let age = 2026 - year;
    match age {
        75.. => 10,
        70..=74 => 20,
        0..=5 => 20,
        _ => 30,
    }
}

/// Creates the dataset if absent and writes DIR/demo.json. Returns a one-line summary.
pub fn ensure(store: &dyn Store, dir: &Path) -> anyhow::Result<String> {
    let orgs = organisations();
    let hospital = orgs[0].code.clone();
    let insurer = orgs[4].code.clone();
    let present = store
        .read("Organization", "org-hospital")
        .map_err(|e| anyhow::anyhow!("{e}"))?
        .is_some_and(|r| !r.deleted);
    let mut listing_patients = Vec::new();
    let mut writes: Vec<(String, String, Value, String)> = Vec::new(); // (type, id, resource, author org)
    for o in &orgs {
        writes.push((
            "Organization".into(),
            o.id.into(),
            organization(o.id, &o.code, o.kind, o.name, o.flags),
            "operator".into(),
        ));
    }
    for (i, p) in PATIENTS.iter().enumerate() {
        let n = i + 1;
        let pid = format!("pt-{n:02}");
        let local_id = format!("{:08}", 1000 + n);
        let symbol = "つなぎ";
        let number = format!("{}", 10000 + n * 7);
        let branch = if n % 4 == 0 { "01" } else { "00" };
        let relationship = if branch == "00" { "self" } else { "spouse" }; // 本人 or 家族
        writes.push((
            "Patient".into(),
            pid.clone(),
            json!({
                "resourceType": "Patient", "id": pid,
                "identifier": [{"system": format!("{PATIENT_ID_OID}{hospital}"), "value": local_id}],
                "name": [
                    {"extension": [{"url": NAME_REPRESENTATION, "valueCode": "IDE"}], "use": "official", "text": format!("{} {}", p.family, p.given), "family": p.family, "given": [p.given]},
                    {"extension": [{"url": NAME_REPRESENTATION, "valueCode": "SYL"}], "use": "official", "text": format!("{} {}", p.family_kana, p.given_kana), "family": p.family_kana, "given": [p.given_kana]}
                ],
                "gender": p.gender, "birthDate": p.birth,
                "address": [{"text": p.address, "postalCode": p.postal, "country": "JP"}]
            }),
            hospital.clone(),
        ));
        let cov_id = format!("cov-{n:02}");
        writes.push((
            "Coverage".into(),
            cov_id.clone(),
            json!({
                "resourceType": "Coverage", "id": cov_id, "status": "active",
                "identifier": [{"system": INSURANCE_MEMBER_SYSTEM, "value": format!("{insurer}:{symbol}:{number}:{branch}")}],
                "type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "EHCPOL"}]},
                "subscriberId": number, "dependent": branch,
                "beneficiary": {"reference": format!("Patient/{pid}")},
                "relationship": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/subscriber-relationship", "code": relationship}]},
                "period": {"start": "2024-04-01"},
                "payor": [{"reference": "Organization/org-insurer", "identifier": {"system": INSURER_SYSTEM, "value": insurer}}],
                "class": [
                    {"type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/coverage-class", "code": "group"}]}, "value": symbol},
                    {"type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/coverage-class", "code": "plan"}]}, "value": format!("{}割", copay_percent(p.birth) / 10)}
                ]
            }),
            insurer.clone(),
        ));
        listing_patients.push(json!({
            "id": pid, "name": format!("{} {}", p.family, p.given), "kana": format!("{} {}", p.family_kana, p.given_kana),
            "gender": p.gender, "birthDate": p.birth,
            "insurance": {"insurerNumber": insurer, "symbol": symbol, "number": number, "branch": branch, "copayPercent": copay_percent(p.birth), "coverage": cov_id}
        }));
    }
    // A few clinical records written by the hospital, for the first five patients.
    let clinical: [(&str, Value); 5] = [
        (
            "Condition",
            json!({"resourceType": "Condition", "id": "cond-01", "clinicalStatus": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/condition-clinical", "code": "active"}]},
            "code": {"coding": [{"system": "http://jpfhir.jp/fhir/core/CodeSystem/JP_ConditionDiseaseCode_MEDIS", "code": "8833421", "display": "２型糖尿病"}], "text": "２型糖尿病"},
            "subject": {"reference": "Patient/pt-01"}, "onsetDateTime": "2019-05-10", "recordedDate": "2019-05-10"}),
        ),
        (
            "AllergyIntolerance",
            json!({"resourceType": "AllergyIntolerance", "id": "alg-02", "clinicalStatus": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/allergyintolerance-clinical", "code": "active"}]},
            "category": ["medication"], "code": {"text": "ペニシリン系抗菌薬"}, "patient": {"reference": "Patient/pt-02"}, "recordedDate": "2020-02-01"}),
        ),
        (
            "Observation",
            json!({"resourceType": "Observation", "id": "obs-01", "status": "final",
            "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category", "code": "laboratory"}]}],
            "code": {"coding": [{"system": "urn:oid:1.2.392.200119.4.504", "code": "3D046000001920402", "display": "HbA1c（NGSP）"}]},
            "subject": {"reference": "Patient/pt-01"}, "effectiveDateTime": "2026-10-01T09:30:00+09:00",
            "valueQuantity": {"value": 7.2, "unit": "%", "system": "http://unitsofmeasure.org", "code": "%"}}),
        ),
        (
            "Condition",
            json!({"resourceType": "Condition", "id": "cond-03", "clinicalStatus": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/condition-clinical", "code": "active"}]},
            "code": {"text": "本態性高血圧症"}, "subject": {"reference": "Patient/pt-03"}, "onsetDateTime": "2022-08-01", "recordedDate": "2022-08-01"}),
        ),
        (
            "Observation",
            json!({"resourceType": "Observation", "id": "obs-05", "status": "final",
            "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category", "code": "vital-signs"}]}],
            "code": {"coding": [{"system": "http://loinc.org", "code": "8480-6", "display": "Systolic blood pressure"}]},
            "subject": {"reference": "Patient/pt-05"}, "effectiveDateTime": "2026-11-01T10:00:00+09:00",
            "valueQuantity": {"value": 142, "unit": "mmHg", "system": "http://unitsofmeasure.org", "code": "mm[Hg]"}}),
        ),
    ];
    for (rt, r) in clinical {
        let id = r["id"].as_str().unwrap_or_default().to_string();
        writes.push((rt.into(), id, r, hospital.clone()));
    }

    if !present {
        let actor = Principal::new(
            "operator",
            OrgKind::Operator,
            vec![],
            Role::Operator,
            Some("demo".into()),
            None,
            false,
        )
        .map_err(|e| anyhow::anyhow!("{e}"))?;
        let mut tx = store.begin().map_err(|e| anyhow::anyhow!("{e}"))?;
        let mut records = Vec::new();
        for (rt, id, r, author) in &writes {
            let ctx = WriteContext {
                org: Some(author.clone()),
                user: Some("demo".into()),
            };
            let patient = tsunagi_fhir::index::compartment_patient(rt, r);
            let (stored, _) = tx
                .update(rt, id, r.clone(), None, &ctx)
                .map_err(|e| anyhow::anyhow!("{rt}/{id}: {e}"))?;
            if patient.is_some() {
                records.push(
                    AuditRecord::new(
                        &actor,
                        Purpose::Operations,
                        "demo-load",
                        uuid::Uuid::new_v4().to_string(),
                    )
                    .with_patient(patient)
                    .with_resources(vec![format!("{rt}/{id}/_history/{}", stored.version)])
                    .to_json(),
                );
            }
        }
        tx.audit_append(&records)
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        tx.commit().map_err(|e| anyhow::anyhow!("{e}"))?;
    }
    // Each demo patient holds a My Number card: DIR/cards/pt-NN.card.json (see docs/API.md).
    let ids: Vec<String> = (1..=PATIENTS.len()).map(|n| format!("pt-{n:02}")).collect();
    tsunagi_eligibility::cards::issue_demo_cards(store, dir, &ids)
        .map_err(|e| anyhow::anyhow!("demo cards: {e}"))?;
    tsunagi_sharing::demo::seed(store, chrono::Utc::now())
        .map_err(|e| anyhow::anyhow!("sharing demo: {e}"))?;
    tsunagi_eprescription::demo::seed(store, tsunagi_eligibility::coverage::today_jst())
        .map_err(|e| anyhow::anyhow!("e-prescription demo: {e}"))?;
    tsunagi_research_primary::optout::seed_demo(store)
        .map_err(|e| anyhow::anyhow!("demo opt-out: {e}"))?;
    let listing = json!({
        "organisations": orgs.iter().map(|o| json!({"id": o.id, "code": o.code, "kind": o.kind.as_str(), "name": o.name, "flags": o.flags})).collect::<Vec<_>>(),
        "patients": listing_patients,
    });
    std::fs::create_dir_all(dir)?;
    let path = dir.join("demo.json");
    std::fs::write(&path, serde_json::to_string_pretty(&listing)?)
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(format!(
        "{} organisations, {} patients ({})",
        orgs.len(),
        PATIENTS.len(),
        if present {
            "already present"
        } else {
            "created"
        }
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tsunagi_policy::ids::{
        validate_insurer_number, validate_local_government_code, validate_medical_institution_code,
    };

    #[test]
    fn demo_codes_have_valid_check_digits() {
        for o in organisations() {
            match o.kind {
                OrgKind::Hospital | OrgKind::Clinic | OrgKind::DentalClinic | OrgKind::Pharmacy => {
                    assert!(
                        validate_medical_institution_code(&o.code).is_ok(),
                        "{} {}",
                        o.name,
                        o.code
                    )
                }
                OrgKind::Insurer => assert!(validate_insurer_number(&o.code).is_ok(), "{}", o.code),
                OrgKind::Municipality => assert!(
                    validate_local_government_code(&o.code).is_ok(),
                    "{}",
                    o.code
                ),
                _ => {}
            }
        }
    }
}
