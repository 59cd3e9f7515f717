//! Deterministic synthetic data: each patient's resources depend only on the seed
//! and the patient number, so any patient can be regenerated on its own (the
//! benchmark knows every id, code and date without keeping the data set around).
//!
//! Per patient ([`RESOURCES_PER_PATIENT`] = 20): Patient (kanji and kana names,
//! hospital MRN identifier, birth date, gender, address, phone), Coverage, 3
//! Encounters, 3 Conditions (ICD-10), 10 laboratory Observations (JLAC10 codes,
//! valueQuantity, effectiveDateTime spread over five years), 1 AllergyIntolerance
//! and 1 MedicationRequest.

use serde_json::{Value, json};
use tsunagi_policy::identity::OrgKind;
use tsunagi_policy::ids::mod10_w21_check_digit;

/// Resources generated per patient.
pub const RESOURCES_PER_PATIENT: usize = 20;
/// Laboratory Observations per patient.
pub const OBSERVATIONS_PER_PATIENT: usize = 10;
/// JLAC10 code system (JP Core).
pub const JLAC10_SYSTEM: &str = "urn:oid:1.2.392.200119.4.504";
/// Prefix of the hospital patient-number identifier system (JP Core: OID + 10-digit institution code).
pub const MRN_SYSTEM_PREFIX: &str = "urn:oid:1.2.392.100495.20.3.51.1";

/// SplitMix64: small, fast, and stable across releases (unlike library RNGs).
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in 0..n (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }
    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len() as u64) as usize]
    }
    /// Uniform float in [lo, hi).
    pub fn range(&mut self, lo: f64, hi: f64) -> f64 {
        lo + (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64 * (hi - lo)
    }
}

/// (kanji, katakana) family names.
const FAMILY: &[(&str, &str)] = &[
    ("佐藤", "サトウ"),
    ("鈴木", "スズキ"),
    ("高橋", "タカハシ"),
    ("田中", "タナカ"),
    ("伊藤", "イトウ"),
    ("渡辺", "ワタナベ"),
    ("山本", "ヤマモト"),
    ("中村", "ナカムラ"),
    ("小林", "コバヤシ"),
    ("加藤", "カトウ"),
    ("吉田", "ヨシダ"),
    ("山田", "ヤマダ"),
    ("佐々木", "ササキ"),
    ("山口", "ヤマグチ"),
    ("松本", "マツモト"),
    ("井上", "イノウエ"),
    ("木村", "キムラ"),
    ("林", "ハヤシ"),
    ("斎藤", "サイトウ"),
    ("清水", "シミズ"),
    ("山崎", "ヤマザキ"),
    ("森", "モリ"),
    ("池田", "イケダ"),
    ("橋本", "ハシモト"),
    ("阿部", "アベ"),
    ("石川", "イシカワ"),
    ("前田", "マエダ"),
    ("藤田", "フジタ"),
    ("小川", "オガワ"),
    ("岡田", "オカダ"),
];
const GIVEN_MALE: &[(&str, &str)] = &[
    ("太郎", "タロウ"),
    ("翔", "ショウ"),
    ("大輔", "ダイスケ"),
    ("健太", "ケンタ"),
    ("誠", "マコト"),
    ("浩", "ヒロシ"),
    ("隆", "タカシ"),
    ("蓮", "レン"),
    ("悠真", "ユウマ"),
    ("一郎", "イチロウ"),
    ("修", "オサム"),
    ("拓也", "タクヤ"),
];
const GIVEN_FEMALE: &[(&str, &str)] = &[
    ("花子", "ハナコ"),
    ("陽菜", "ヒナ"),
    ("美咲", "ミサキ"),
    ("恵子", "ケイコ"),
    ("裕子", "ユウコ"),
    ("結衣", "ユイ"),
    ("洋子", "ヨウコ"),
    ("さくら", "サクラ"),
    ("由美", "ユミ"),
    ("直美", "ナオミ"),
    ("葵", "アオイ"),
    ("幸子", "サチコ"),
];
/// (prefecture, city, postal prefix)
const PLACES: &[(&str, &str, &str)] = &[
    ("東京都", "新宿区", "160"),
    ("東京都", "世田谷区", "154"),
    ("神奈川県", "横浜市港北区", "222"),
    ("大阪府", "大阪市北区", "530"),
    ("愛知県", "名古屋市中区", "460"),
    ("北海道", "札幌市中央区", "060"),
    ("福岡県", "福岡市博多区", "812"),
    ("宮城県", "仙台市青葉区", "980"),
    ("京都府", "京都市左京区", "606"),
    ("広島県", "広島市中区", "730"),
];
/// (JLAC10 code, display, UCUM unit, low, high) of common laboratory tests.
pub const LABS: &[(&str, &str, &str, f64, f64)] = &[
    ("3D046000001906202", "HbA1c(NGSP)", "%", 4.6, 9.5),
    ("3D010000001926101", "グルコース", "mg/dL", 70.0, 220.0),
    ("3B035000002327201", "AST", "U/L", 10.0, 80.0),
    ("3B045000002327201", "ALT", "U/L", 5.0, 90.0),
    ("3B090000002327101", "γ-GT", "U/L", 10.0, 150.0),
    ("3C015000002327101", "クレアチニン", "mg/dL", 0.4, 2.0),
    (
        "3F077000002327101",
        "LDLコレステロール",
        "mg/dL",
        60.0,
        200.0,
    ),
    (
        "3F070000002327101",
        "HDLコレステロール",
        "mg/dL",
        30.0,
        100.0,
    ),
    ("3F015000002327101", "中性脂肪", "mg/dL", 40.0, 400.0),
    ("2A030000001930101", "ヘモグロビン", "g/dL", 9.0, 17.5),
];
/// (ICD-10, display) of common conditions.
const CONDITIONS: &[(&str, &str)] = &[
    ("E11.9", "2型糖尿病"),
    ("I10", "本態性高血圧症"),
    ("E78.5", "脂質異常症"),
    ("J45.9", "気管支喘息"),
    ("K21.9", "逆流性食道炎"),
    ("M54.5", "腰痛症"),
    ("J30.4", "アレルギー性鼻炎"),
    ("F51.0", "不眠症"),
    ("K29.7", "胃炎"),
    ("N18.3", "慢性腎臓病ステージ3"),
];
/// (YJ code, display, dose text)
const MEDICATIONS: &[(&str, &str, &str)] = &[
    (
        "3961008F1030",
        "メトホルミン塩酸塩錠250mg",
        "1回1錠 1日2回 朝夕食後",
    ),
    ("2149039F1030", "アムロジピン錠5mg", "1回1錠 1日1回 朝食後"),
    (
        "2189017F1030",
        "ロスバスタチン錠2.5mg",
        "1回1錠 1日1回 夕食後",
    ),
    (
        "2329023F1030",
        "ランソプラゾール錠15mg",
        "1回1錠 1日1回 朝食後",
    ),
    (
        "1149019F1030",
        "ロキソプロフェンナトリウム錠60mg",
        "1回1錠 疼痛時",
    ),
];
const ALLERGENS: &[(&str, &str)] = &[
    ("medication", "ペニシリン系抗菌薬"),
    ("food", "そば"),
    ("food", "卵"),
    ("medication", "アスピリン"),
    ("environment", "スギ花粉"),
];

/// One hospital of the synthetic data set.
#[derive(Debug, Clone)]
pub struct Hospital {
    /// 医療機関等コード (10 digits, valid check digit).
    pub code: String,
    /// Organization resource id.
    pub id: String,
    pub name: String,
}

/// The `i`-th hospital: Tokyo (13), medical score table (1), serial `i`.
pub fn hospital(i: usize) -> Hospital {
    let body = format!("131{:02}{:04}", 10 + i / 10_000, i % 10_000);
    let digits: Vec<u8> = body.bytes().map(|b| b - b'0').collect();
    let code = format!("{body}{}", mod10_w21_check_digit(&digits));
    Hospital {
        id: format!("org-{code}"),
        name: format!("つなぎ総合病院 第{}分院", i + 1),
        code,
    }
}

/// The registry entry of a hospital (an Organization resource).
pub fn hospital_organization(h: &Hospital) -> Value {
    tsunagi_server::orgs::organization(&h.id, &h.code, OrgKind::Hospital, &h.name, &[])
}

/// The synthetic data set: seed and number of hospitals patients are spread over.
#[derive(Debug, Clone)]
pub struct Synth {
    pub seed: u64,
    pub hospitals: usize,
}

/// What the benchmark needs to know about a patient without regenerating everything.
#[derive(Debug, Clone)]
pub struct PatientKey {
    pub id: String,
    pub hospital: usize,
    pub mrn_system: String,
    pub mrn: String,
    pub family_kana: String,
    pub birth_date: String,
    /// JLAC10 codes of this patient's Observations (each appears twice).
    pub lab_codes: Vec<String>,
}

pub fn patient_id(n: u64) -> String {
    format!("pat-{n:07}")
}

/// (resource type, id) of the `k`-th resource (0..20) of patient `n`, in generation order.
pub fn resource_ref(n: u64, k: usize) -> (&'static str, String) {
    match k {
        0 => ("Patient", patient_id(n)),
        1 => ("Coverage", format!("cov-{n:07}")),
        2..=4 => ("Encounter", format!("enc-{n:07}-{}", k - 2)),
        5..=7 => ("Condition", format!("cond-{n:07}-{}", k - 5)),
        8..=17 => ("Observation", format!("obs-{n:07}-{}", k - 8)),
        18 => ("AllergyIntolerance", format!("alg-{n:07}")),
        _ => ("MedicationRequest", format!("medreq-{n:07}")),
    }
}

/// 2021-11-21, start of the five years the clinical data spreads over (days since epoch).
const SPAN_START_DAY: i64 = 18_952;
const SPAN_DAYS: u64 = 5 * 365;

fn date_of(day: i64) -> chrono::NaiveDate {
    chrono::DateTime::from_timestamp(day * 86_400, 0)
        .expect("valid day")
        .date_naive()
}

fn instant(day: i64, minute: u64) -> String {
    format!(
        "{}T{:02}:{:02}:00+09:00",
        date_of(day).format("%Y-%m-%d"),
        8 + minute / 60 % 10,
        minute % 60
    )
}

impl Synth {
    pub fn new(seed: u64, hospitals: usize) -> Synth {
        Synth {
            seed,
            hospitals: hospitals.max(1),
        }
    }

    fn rng(&self, n: u64) -> Rng {
        let mut r = Rng::new(self.seed ^ n.wrapping_mul(0xA076_1D64_78BD_642F));
        r.next_u64();
        r
    }

    pub fn hospital_of(&self, n: u64) -> usize {
        (n % self.hospitals as u64) as usize
    }

    /// The searchable facts of patient `n` (consistent with [`Synth::patient`]).
    pub fn key(&self, n: u64) -> PatientKey {
        let mut r = self.rng(n);
        let h = hospital(self.hospital_of(n));
        let male = r.below(2) == 0;
        let fam = r.pick(FAMILY);
        let _given = if male {
            r.pick(GIVEN_MALE)
        } else {
            r.pick(GIVEN_FEMALE)
        };
        // born 1935..2020
        let birth_day = -12_784 + r.below(85 * 365) as i64;
        let first_lab = r.below(LABS.len() as u64) as usize;
        let lab_codes = (0..OBSERVATIONS_PER_PATIENT / 2)
            .map(|i| LABS[(first_lab + i * 2) % LABS.len()].0.to_string())
            .collect();
        PatientKey {
            id: patient_id(n),
            hospital: self.hospital_of(n),
            mrn_system: format!("{MRN_SYSTEM_PREFIX}{}", h.code),
            mrn: format!("{:08}", n + 1),
            family_kana: fam.1.to_string(),
            birth_date: date_of(birth_day).format("%Y-%m-%d").to_string(),
            lab_codes,
        }
    }

    /// The resources of patient `n`, in [`resource_ref`] order.
    pub fn patient(&self, n: u64) -> Vec<Value> {
        let mut r = self.rng(n);
        let h = hospital(self.hospital_of(n));
        let male = r.below(2) == 0;
        let fam = *r.pick(FAMILY);
        let given = *if male {
            r.pick(GIVEN_MALE)
        } else {
            r.pick(GIVEN_FEMALE)
        };
        let birth_day = -12_784 + r.below(85 * 365) as i64;
        let first_lab = r.below(LABS.len() as u64) as usize;
        let key = PatientKey {
            id: patient_id(n),
            hospital: self.hospital_of(n),
            mrn_system: format!("{MRN_SYSTEM_PREFIX}{}", h.code),
            mrn: format!("{:08}", n + 1),
            family_kana: fam.1.to_string(),
            birth_date: date_of(birth_day).format("%Y-%m-%d").to_string(),
            lab_codes: vec![],
        };
        let pid = key.id.clone();
        let subject = json!({"reference": format!("Patient/{pid}")});
        let place = *r.pick(PLACES);
        let mut out = Vec::with_capacity(RESOURCES_PER_PATIENT);

        out.push(json!({
            "resourceType": "Patient",
            "id": pid,
            "meta": {"profile": ["http://jpfhir.jp/fhir/core/StructureDefinition/JP_Patient"]},
            "identifier": [{"system": key.mrn_system, "value": key.mrn}],
            "active": true,
            "name": [
                {
                    "extension": [{"url": "http://hl7.org/fhir/StructureDefinition/iso21090-EN-representation", "valueCode": "IDE"}],
                    "use": "official", "text": format!("{} {}", fam.0, given.0),
                    "family": fam.0, "given": [given.0]
                },
                {
                    "extension": [{"url": "http://hl7.org/fhir/StructureDefinition/iso21090-EN-representation", "valueCode": "SYL"}],
                    "use": "official", "text": format!("{} {}", fam.1, given.1),
                    "family": fam.1, "given": [given.1]
                }
            ],
            "telecom": [{"system": "phone", "value": format!("0{}-{:04}-{:04}", 3 + r.below(7), r.below(10_000), r.below(10_000)), "use": "home"}],
            "gender": if male { "male" } else { "female" },
            "birthDate": key.birth_date,
            "address": [{
                "use": "home",
                "text": format!("{}{}{}丁目{}番{}号", place.0, place.1, 1 + r.below(5), 1 + r.below(30), 1 + r.below(20)),
                "line": [format!("{}丁目{}番", 1 + r.below(5), 1 + r.below(30))],
                "city": place.1, "state": place.0,
                "postalCode": format!("{}-{:04}", place.2, r.below(10_000)),
                "country": "JP"
            }]
        }));

        let insurer_body = format!("0613{:03}", r.below(1000));
        let digits: Vec<u8> = insurer_body.bytes().map(|b| b - b'0').collect();
        let insurer = format!("{insurer_body}{}", mod10_w21_check_digit(&digits));
        out.push(json!({
            "resourceType": "Coverage",
            "id": format!("cov-{n:07}"),
            "status": "active",
            "type": {"coding": [{"system": "http://jpfhir.jp/fhir/core/CodeSystem/JP_InsuranceTypeCode", "code": "1", "display": "協会けんぽ"}]},
            "subscriberId": format!("{:08}", r.below(100_000_000)),
            "beneficiary": subject,
            "relationship": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/subscriber-relationship", "code": "self"}]},
            "period": {"start": "2021-04-01"},
            "payor": [{"identifier": {"system": tsunagi_server::orgs::INSURER_SYSTEM, "value": insurer}, "display": "全国健康保険協会"}]
        }));

        let mut enc_days = [0i64; 3];
        for (i, d) in enc_days.iter_mut().enumerate() {
            *d = SPAN_START_DAY + r.below(SPAN_DAYS) as i64;
            let minute = r.below(540);
            out.push(json!({
                "resourceType": "Encounter",
                "id": format!("enc-{n:07}-{i}"),
                "status": "finished",
                "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "AMB", "display": "ambulatory"},
                "type": [{"text": "外来診察"}],
                "subject": subject,
                "period": {"start": instant(*d, minute), "end": instant(*d, minute + 20)},
                "serviceProvider": {"reference": format!("Organization/{}", h.id), "display": h.name}
            }));
        }
        for (i, &d) in enc_days.iter().enumerate() {
            let c = *r.pick(CONDITIONS);
            out.push(json!({
                "resourceType": "Condition",
                "id": format!("cond-{n:07}-{i}"),
                "clinicalStatus": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/condition-clinical", "code": "active"}]},
                "verificationStatus": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/condition-ver-status", "code": "confirmed"}]},
                "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/condition-category", "code": "encounter-diagnosis"}]}],
                "code": {"coding": [{"system": "http://hl7.org/fhir/sid/icd-10", "code": c.0, "display": c.1}], "text": c.1},
                "subject": subject,
                "encounter": {"reference": format!("Encounter/enc-{n:07}-{i}")},
                "onsetDateTime": date_of(d - r.below(400) as i64).format("%Y-%m-%d").to_string(),
                "recordedDate": instant(d, 30)
            }));
        }
        for i in 0..OBSERVATIONS_PER_PATIENT {
            let lab = LABS[(first_lab + (i % (OBSERVATIONS_PER_PATIENT / 2)) * 2) % LABS.len()];
            let d = SPAN_START_DAY + r.below(SPAN_DAYS) as i64;
            let value = (r.range(lab.3, lab.4) * 10.0).round() / 10.0;
            let enc = i % 3;
            out.push(json!({
                "resourceType": "Observation",
                "id": format!("obs-{n:07}-{i}"),
                "meta": {"profile": ["http://jpfhir.jp/fhir/core/StructureDefinition/JP_Observation_LabResult"]},
                "status": "final",
                "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category", "code": "laboratory", "display": "Laboratory"}]}],
                "code": {"coding": [{"system": JLAC10_SYSTEM, "code": lab.0, "display": lab.1}], "text": lab.1},
                "subject": subject,
                "encounter": {"reference": format!("Encounter/enc-{n:07}-{enc}")},
                "effectiveDateTime": instant(d, r.below(600)),
                "issued": instant(d + 1, 0).replace("+09:00", ".000+09:00"),
                "performer": [{"reference": format!("Organization/{}", h.id)}],
                "valueQuantity": {"value": value, "unit": lab.2, "system": "http://unitsofmeasure.org", "code": lab.2},
                "referenceRange": [{"low": {"value": lab.3, "unit": lab.2}, "high": {"value": lab.4, "unit": lab.2}}]
            }));
        }
        let a = *r.pick(ALLERGENS);
        out.push(json!({
            "resourceType": "AllergyIntolerance",
            "id": format!("alg-{n:07}"),
            "clinicalStatus": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/allergyintolerance-clinical", "code": "active"}]},
            "verificationStatus": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/allergyintolerance-verification", "code": "confirmed"}]},
            "type": "allergy",
            "category": [a.0],
            "criticality": "low",
            "code": {"text": a.1},
            "patient": subject,
            "recordedDate": instant(enc_days[0], 45)
        }));
        let m = *r.pick(MEDICATIONS);
        let days = 14 + 14 * r.below(6);
        out.push(json!({
            "resourceType": "MedicationRequest",
            "id": format!("medreq-{n:07}"),
            "status": "active",
            "intent": "order",
            "medicationCodeableConcept": {"coding": [{"system": "urn:oid:1.2.392.100495.20.1.73", "code": m.0, "display": m.1}], "text": m.1},
            "subject": subject,
            "encounter": {"reference": format!("Encounter/enc-{n:07}-2")},
            "authoredOn": instant(enc_days[2], 40),
            "dosageInstruction": [{
                "text": m.2,
                "timing": {"repeat": {"boundsDuration": {"value": days, "unit": "日", "system": "http://unitsofmeasure.org", "code": "d"}}},
                "route": {"coding": [{"system": "http://jpfhir.jp/fhir/core/CodeSystem/JP_MedicationRouteHL70162", "code": "PO", "display": "口"}]},
                "doseAndRate": [{"doseQuantity": {"value": 1, "unit": "錠", "system": "urn:oid:1.2.392.100495.20.2.101", "code": "TAB"}}]
            }],
            "dispenseRequest": {"expectedSupplyDuration": {"value": days, "unit": "日", "system": "http://unitsofmeasure.org", "code": "d"}}
        }));
        debug_assert_eq!(out.len(), RESOURCES_PER_PATIENT);
        out
    }

    /// Patient `n`'s resources as one transaction Bundle of PUTs (ids kept).
    pub fn transaction(&self, n: u64) -> Value {
        let entries: Vec<Value> = self
            .patient(n)
            .into_iter()
            .map(|res| {
                let url = format!(
                    "{}/{}",
                    res["resourceType"].as_str().unwrap_or_default(),
                    res["id"].as_str().unwrap_or_default()
                );
                json!({"resource": res, "request": {"method": "PUT", "url": url}})
            })
            .collect();
        json!({"resourceType": "Bundle", "type": "transaction", "entry": entries})
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_matches_patient() {
        let s = Synth::new(7, 3);
        for n in 0..50 {
            let k = s.key(n);
            let res = s.patient(n);
            assert_eq!(res[0]["birthDate"], k.birth_date.as_str());
            assert_eq!(res[0]["name"][1]["family"], k.family_kana.as_str());
            assert_eq!(res[0]["identifier"][0]["value"], k.mrn.as_str());
            for (i, r) in res.iter().enumerate() {
                let (rt, id) = resource_ref(n, i);
                assert_eq!(r["resourceType"], rt);
                assert_eq!(r["id"], id.as_str());
            }
            let codes: Vec<&str> = res[8..18]
                .iter()
                .map(|o| o["code"]["coding"][0]["code"].as_str().unwrap())
                .collect();
            for c in &k.lab_codes {
                assert_eq!(codes.iter().filter(|x| *x == c).count(), 2);
            }
        }
    }

    #[test]
    fn hospital_codes_are_valid() {
        for i in 0..20 {
            tsunagi_policy::ids::validate_medical_institution_code(&hospital(i).code).unwrap();
        }
    }
}
