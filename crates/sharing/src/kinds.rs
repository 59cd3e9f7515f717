//! What the service stores: the information kind of a resource, its consent
//! category, the local identifier that makes a registration replaceable, and
//! the labels and marks the service adds.

use chrono::{DateTime, Utc};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use tsunagi_eligibility::consent::{ADDRESSEE_ONLY, CATEGORY_SYSTEM};
use tsunagi_policy::policy::{PATIENT_VISIBILITY_SYSTEM, WITHHELD};

/// JP-CLINS extension carrying the registering institution's number.
pub const INSTITUTION_EXT: &str =
    "http://jpfhir.jp/fhir/clins/Extension/StructureDefinition/JP_eCS_InstitutionNumber";
/// 医療機関番号 (10 digits) identifier system.
pub const INSTITUTION_SYSTEM: &str =
    "http://jpfhir.jp/fhir/core/IdSystem/insurance-medical-institution-no";
/// The institution's local identifier of a resource.
pub const RESOURCE_ID_SYSTEM: &str =
    "http://jpfhir.jp/fhir/core/IdSystem/resourceInstance-identifier";
/// JP-CLINS flags in `meta.tag` (長期保存 LTS, 未告知 UNINFORMED).
pub const INDICATION_SYSTEM: &str = "http://jpfhir.jp/fhir/clins/CodeSystem/JP_ehrshrs_indication";
pub const LTS: &str = "LTS";
pub const UNINFORMED: &str = "UNINFORMED";
/// JP-CLINS infection item set (syphilis STS/TP, HBs, HCV, HIV).
pub const INFECTION_CS: &str =
    "http://jpfhir.jp/fhir/clins/CodeSystem/JLAC10/JP_CLINS_ObsLabResult_InfectionLabo_CS";
/// 17-digit JLAC10 codes.
pub const JLAC10_SYSTEMS: &[&str] = &[
    "http://jpfhir.jp/fhir/clins/CodeSystem/JLAC10/JP_CLINS_ObsLabResult_CoreLabo_CS",
    "http://medis.or.jp/CodeSystem/master-JLAC10-17digits",
    INFECTION_CS,
];
/// JLAC10 analyte codes (first five characters) of the infection item set:
/// STS 5E071, TP 5E074/5E075, HBs 5F016, HCV 5F360, HIV 5F500/5F550/5F560.
pub const INFECTION_ANALYTES: &[&str] = &[
    "5E071", "5E074", "5E075", "5F016", "5F360", "5F500", "5F550", "5F560",
];
/// Document type codes (`Composition.type`).
pub const DOC_TYPE_SYSTEM: &str = "http://jpfhir.jp/fhir/Common/CodeSystem/doc-typecodes";
/// 診療情報提供書 (HS038).
pub const REFERRAL: &str = "57133-1";
/// 退院時サマリー (HS039).
pub const DISCHARGE_SUMMARY: &str = "18842-5";
/// 健康診断結果報告書 (HS037).
pub const CHECKUP: &[&str] = &["53576-5", "JPGCHKUP01"];

/// Tsunagi code systems of what the service adds.
pub const KIND_SYSTEM: &str = "https://tsunagi.dev/fhir/CodeSystem/clins-kind";
pub const ADDRESSEE_SYSTEM: &str = "https://tsunagi.dev/fhir/CodeSystem/addressee";
pub const INSURER_LABEL_SYSTEM: &str = "https://tsunagi.dev/fhir/CodeSystem/insurer";
pub const MAILBOX_SYSTEM: &str = "https://tsunagi.dev/fhir/CodeSystem/mailbox";
pub const REGISTERED_EXT: &str = "https://tsunagi.dev/fhir/StructureDefinition/registered";
/// `meta.tag` of the registration hour (UTC, `YYYY-MM-DDTHH`): the index by
/// which a retention run finds the entries whose period may have ended since
/// the run before it, without reading the rest.
pub const REGISTERED_HOUR_SYSTEM: &str = "https://tsunagi.dev/fhir/CodeSystem/registered-hour";
/// `meta.tag` of the hour a referral letter was received (as above).
pub const RECEIVED_HOUR_SYSTEM: &str = "https://tsunagi.dev/fhir/CodeSystem/received-hour";
pub const RECEIVED_EXT: &str = "https://tsunagi.dev/fhir/StructureDefinition/received";
pub const BODY_EXT: &str = "https://tsunagi.dev/fhir/StructureDefinition/document-body";
pub const SOURCE_EXT: &str = "https://tsunagi.dev/fhir/StructureDefinition/source";

/// The kinds of information the service keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    /// 傷病名
    Diagnosis,
    /// 薬剤アレルギー等
    DrugAllergy,
    /// その他アレルギー等
    OtherAllergy,
    /// 感染症
    Infection,
    /// 検査
    Lab,
    /// 処方 (from referral letters only)
    Prescription,
    Referral,
    DischargeSummary,
    Checkup,
    /// The stored body of a document (read through its DocumentReference).
    DocumentBody,
    /// 発生届
    Notification,
}

impl Kind {
    pub const ALL: [Kind; 11] = [
        Kind::Diagnosis,
        Kind::DrugAllergy,
        Kind::OtherAllergy,
        Kind::Infection,
        Kind::Lab,
        Kind::Prescription,
        Kind::Referral,
        Kind::DischargeSummary,
        Kind::Checkup,
        Kind::DocumentBody,
        Kind::Notification,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Diagnosis => "diagnosis",
            Kind::DrugAllergy => "drug-allergy",
            Kind::OtherAllergy => "other-allergy",
            Kind::Infection => "infection",
            Kind::Lab => "lab",
            Kind::Prescription => "prescription",
            Kind::Referral => "referral",
            Kind::DischargeSummary => "discharge-summary",
            Kind::Checkup => "checkup",
            Kind::DocumentBody => "document-body",
            Kind::Notification => "notification",
        }
    }

    pub fn parse(s: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.as_str() == s)
    }

    /// Consent category label: A (diagnoses, infections), B (allergies, lab,
    /// prescriptions), C (checkup reports); documents addressed to someone and
    /// service records get [`ADDRESSEE_ONLY`], which no category opens.
    pub fn category(self) -> &'static str {
        match self {
            Kind::Diagnosis | Kind::Infection => "A",
            Kind::DrugAllergy | Kind::OtherAllergy | Kind::Lab | Kind::Prescription => "B",
            Kind::Checkup => "C",
            Kind::Referral | Kind::DischargeSummary | Kind::DocumentBody | Kind::Notification => {
                ADDRESSEE_ONLY
            }
        }
    }

    /// Never shown to the patient (whatever the flags).
    pub fn withheld_from_patient(self) -> bool {
        matches!(
            self,
            Kind::Referral | Kind::DischargeSummary | Kind::DocumentBody | Kind::Notification
        )
    }
}

/// `(system, code)` of every coding of `code`.
pub fn codings(cc: Option<&Value>) -> Vec<(&str, &str)> {
    cc.and_then(|c| c.get("coding"))
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|c| {
            Some((
                c.get("system").and_then(Value::as_str).unwrap_or(""),
                c.get("code")?.as_str()?,
            ))
        })
        .collect()
}

/// Whether an Observation belongs to the infection item set.
pub fn is_infection(obs: &Value) -> bool {
    codings(obs.get("code")).iter().any(|(s, c)| {
        *s == INFECTION_CS
            || JLAC10_SYSTEMS.contains(s)
                && c.len() == 17
                && INFECTION_ANALYTES.iter().any(|a| c.starts_with(a))
    })
}

/// Whether an AllergyIntolerance is a drug allergy (category medication).
fn is_drug_allergy(a: &Value) -> bool {
    a.get("category")
        .and_then(Value::as_array)
        .is_some_and(|c| c.iter().any(|x| x.as_str() == Some("medication")))
}

/// The kind of a five-information entry by its type and content; None for
/// types that are not registrable in a JP_Bundle_CLINS.
pub fn classify(rt: &str, r: &Value) -> Option<Kind> {
    match rt {
        "Condition" => Some(Kind::Diagnosis),
        "AllergyIntolerance" if is_drug_allergy(r) => Some(Kind::DrugAllergy),
        "AllergyIntolerance" => Some(Kind::OtherAllergy),
        "Observation" if is_infection(r) => Some(Kind::Infection),
        "Observation" => Some(Kind::Lab),
        _ => None,
    }
}

/// Kind recorded on a stored resource.
pub fn kind_of(r: &Value) -> Option<Kind> {
    tags(r)
        .into_iter()
        .find(|(s, _)| s == KIND_SYSTEM)
        .and_then(|(_, c)| Kind::parse(&c))
}

/// `meta.tag` as `(system, code)`.
pub fn tags(r: &Value) -> Vec<(String, String)> {
    r.pointer("/meta/tag")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|c| {
            Some((
                c.get("system")?.as_str()?.to_string(),
                c.get("code")?.as_str()?.to_string(),
            ))
        })
        .collect()
}

pub fn has_tag(r: &Value, system: &str, code: &str) -> bool {
    tags(r).iter().any(|(s, c)| s == system && c == code)
}

/// The registering institution's number (`JP_eCS_InstitutionNumber`).
pub fn institution_of(r: &Value) -> Option<&str> {
    r.get("extension")
        .and_then(Value::as_array)?
        .iter()
        .find(|e| e.get("url").and_then(Value::as_str) == Some(INSTITUTION_EXT))?
        .pointer("/valueIdentifier/value")?
        .as_str()
}

/// The institution's local identifier of the resource.
pub fn local_id_of(r: &Value) -> Option<&str> {
    let ids = r.get("identifier")?;
    let list: Vec<&Value> = match ids {
        Value::Array(a) => a.iter().collect(),
        v => vec![v],
    };
    list.iter()
        .find(|i| i.get("system").and_then(Value::as_str) == Some(RESOURCE_ID_SYSTEM))
        .or_else(|| list.first())
        .and_then(|i| i.get("value"))
        .and_then(Value::as_str)
}

/// Stable id of an entry: (kind group, institution, local identifier) → a
/// FHIR id, so registering the same identifier again updates the same resource.
pub fn entry_id(prefix: &str, institution: &str, rt: &str, local: &str) -> String {
    let mut h = Sha256::new();
    for part in [institution, rt, local] {
        h.update(part.as_bytes());
        h.update([0u8]);
    }
    let d = h.finalize();
    let hex: String = d[..16].iter().map(|b| format!("{b:02x}")).collect();
    format!("{prefix}-{hex}")
}

/// Adds the service's marks to a resource about to be stored: kind tag,
/// consent-category and patient-visibility labels (UNINFORMED entries and
/// documents are withheld from the patient), extra labels, registration time.
pub fn mark(r: &mut Value, kind: Kind, extra: &[(&str, &str)], registered: DateTime<Utc>) {
    let uninformed = has_tag(r, INDICATION_SYSTEM, UNINFORMED);
    let meta = r
        .as_object_mut()
        .map(|o| o.entry("meta").or_insert_with(|| json!({})));
    let Some(meta) = meta else { return };
    if !meta.is_object() {
        *meta = json!({});
    }
    let tags = meta
        .as_object_mut()
        .map(|m| m.entry("tag").or_insert_with(|| json!([])));
    if let Some(Value::Array(t)) = tags {
        // the service's own tags are never taken from the submitter
        t.retain(|c| {
            !matches!(
                c.get("system").and_then(Value::as_str),
                Some(KIND_SYSTEM | REGISTERED_HOUR_SYSTEM | RECEIVED_HOUR_SYSTEM)
            )
        });
        t.push(json!({"system": KIND_SYSTEM, "code": kind.as_str()}));
        t.push(json!({"system": REGISTERED_HOUR_SYSTEM, "code": hour_code(registered)}));
    }
    let mut security = vec![json!({"system": CATEGORY_SYSTEM, "code": kind.category()})];
    if uninformed || kind.withheld_from_patient() {
        security.push(json!({"system": PATIENT_VISIBILITY_SYSTEM, "code": WITHHELD}));
    }
    for (s, c) in extra {
        security.push(json!({"system": s, "code": c}));
    }
    // the service owns the labels: whatever the submitter put there is replaced
    meta["security"] = Value::Array(security);
    set_extension(
        r,
        REGISTERED_EXT,
        json!({"valueInstant": fmt_instant(registered)}),
    );
}

/// The hour of an instant as a tag code (UTC, `YYYY-MM-DDTHH`).
pub fn hour_code(t: DateTime<Utc>) -> String {
    t.format("%Y-%m-%dT%H").to_string()
}

/// Records the receipt of a document on its DocumentReference: the instant
/// (extension) and the hour (tag, for retention).
pub fn mark_received(r: &mut Value, at: DateTime<Utc>) {
    set_extension(r, RECEIVED_EXT, json!({"valueInstant": fmt_instant(at)}));
    if let Some(meta) = r
        .as_object_mut()
        .map(|o| o.entry("meta").or_insert_with(|| json!({})))
        && let Some(m) = meta.as_object_mut()
        && let Value::Array(t) = m.entry("tag").or_insert_with(|| json!([]))
    {
        t.retain(|c| c.get("system").and_then(Value::as_str) != Some(RECEIVED_HOUR_SYSTEM));
        t.push(json!({"system": RECEIVED_HOUR_SYSTEM, "code": hour_code(at)}));
    }
}

/// Replaces (or adds) a root extension.
pub fn set_extension(r: &mut Value, url: &str, value: Value) {
    let Some(obj) = r.as_object_mut() else { return };
    let ext = obj.entry("extension").or_insert_with(|| json!([]));
    if !ext.is_array() {
        *ext = json!([]);
    }
    if let Value::Array(list) = ext {
        list.retain(|e| e.get("url").and_then(Value::as_str) != Some(url));
        let mut e = json!({"url": url});
        if let (Value::Object(m), Value::Object(v)) = (&mut e, value) {
            m.extend(v);
        }
        list.push(e);
    }
}

/// A root extension's instant value.
pub fn instant_ext(r: &Value, url: &str) -> Option<DateTime<Utc>> {
    r.get("extension")
        .and_then(Value::as_array)?
        .iter()
        .find(|e| e.get("url").and_then(Value::as_str) == Some(url))?
        .get("valueInstant")?
        .as_str()
        .and_then(|s| DateTime::parse_from_rfc3339(s).ok())
        .map(|t| t.with_timezone(&Utc))
}

pub fn fmt_instant(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

/// The clinical date of an entry (for "latest" and the summary).
pub fn clinical_date(rt: &str, r: &Value) -> Option<String> {
    let paths: &[&str] = match rt {
        "Condition" => &["/recordedDate", "/onsetDateTime"],
        "AllergyIntolerance" => &["/recordedDate", "/onsetDateTime"],
        "Observation" => &["/effectiveDateTime", "/effectivePeriod/start", "/issued"],
        "MedicationRequest" => &["/authoredOn"],
        "DocumentReference" => &["/date"],
        _ => &[],
    };
    paths
        .iter()
        .find_map(|p| r.pointer(p).and_then(Value::as_str))
        .map(str::to_string)
}

/// A lab entry's item (its JLAC10 code, else its first code).
pub fn lab_item(r: &Value) -> String {
    let c = codings(r.get("code"));
    c.iter()
        .find(|(s, _)| JLAC10_SYSTEMS.contains(s))
        .or_else(|| c.first())
        .map(|(s, c)| format!("{s}|{c}"))
        .unwrap_or_default()
}

/// A prescription's drug (first coding of `medicationCodeableConcept`).
pub fn drug_item(r: &Value) -> String {
    codings(r.get("medicationCodeableConcept"))
        .first()
        .map(|(s, c)| format!("{s}|{c}"))
        .unwrap_or_default()
}

/// Whether an entry was withdrawn (entered-in-error).
pub fn withdrawn(r: &Value) -> bool {
    r.get("status").and_then(Value::as_str) == Some("entered-in-error")
        || codings(r.get("verificationStatus"))
            .iter()
            .any(|(_, c)| *c == "entered-in-error")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn infections_are_category_a_lab_b() {
        let hbs = json!({"code": {"coding": [{"system": "http://medis.or.jp/CodeSystem/master-JLAC10-17digits", "code": "5F016141002305151"}]}});
        let tp = json!({"code": {"coding": [{"system": INFECTION_CS, "code": "TP-RESULT"}]}});
        let alb = json!({"code": {"coding": [{"system": JLAC10_SYSTEMS[0], "code": "3A015000001827101"}]}});
        assert_eq!(classify("Observation", &hbs), Some(Kind::Infection));
        assert_eq!(classify("Observation", &tp), Some(Kind::Infection));
        assert_eq!(classify("Observation", &alb), Some(Kind::Lab));
        assert_eq!(Kind::Infection.category(), "A");
        assert_eq!(Kind::Lab.category(), "B");
        assert_eq!(classify("MedicationRequest", &alb), None);
    }

    #[test]
    fn marks_replace_submitted_labels_and_withhold_uninformed() {
        let mut r = json!({"resourceType": "Condition", "meta": {"tag": [{"system": INDICATION_SYSTEM, "code": UNINFORMED}], "security": [{"system": CATEGORY_SYSTEM, "code": "C"}]}});
        mark(&mut r, Kind::Diagnosis, &[], Utc::now());
        let labels = tsunagi_store::security_labels(&r);
        assert!(labels.contains(&(CATEGORY_SYSTEM.into(), "A".into())));
        assert!(!labels.contains(&(CATEGORY_SYSTEM.into(), "C".into())));
        assert!(labels.contains(&(PATIENT_VISIBILITY_SYSTEM.into(), WITHHELD.into())));
        assert_eq!(kind_of(&r), Some(Kind::Diagnosis));
        assert!(instant_ext(&r, REGISTERED_EXT).is_some());
    }

    #[test]
    fn entry_ids_are_stable_and_valid() {
        let a = entry_id("clins", "1318814790", "Condition", "x");
        assert_eq!(a, entry_id("clins", "1318814790", "Condition", "x"));
        assert_ne!(a, entry_id("clins", "1318814791", "Condition", "x"));
        assert!(tsunagi_server::validate::is_valid_id(&a));
    }
}
