//! Demo data for the fixed demo dataset (docs/DEMO.md): pt-01 has diagnoses,
//! an infection, lab results and a drug allergy from the hospital, and a
//! referral letter from the hospital to the clinic; pt-02 has a checkup report
//! for the insurer. Written directly (the demo seed is an operator tool), each
//! write with its audit record.

use chrono::{DateTime, Utc};
use serde_json::{Value, json};
use tsunagi_fhir::FhirResult;
use tsunagi_store::{Store, WriteContext};

use crate::kinds::*;
use crate::register::{Prepared, prepare_clins, prepare_document};

pub const HOSPITAL: &str = "1310123458";
pub const CLINIC: &str = "1310543218";
pub const INSURER: &str = "06130017";

fn ext(org: &str) -> Value {
    json!([{"url": INSTITUTION_EXT, "valueIdentifier": {"system": INSTITUTION_SYSTEM, "value": org}}])
}

fn ident(v: &str) -> Value {
    json!([{"system": RESOURCE_ID_SYSTEM, "value": v}])
}

/// A five-information Bundle of a few entries (as an institution would send).
pub fn clins_bundle(org: &str, tag: &str) -> Value {
    let p = "urn:uuid:00000000-0000-0000-0000-000000000001";
    json!({
        "resourceType": "Bundle",
        "type": "collection",
        "entry": [
            {"fullUrl": p, "resource": {"resourceType": "Patient"}},
            {"resource": {"resourceType": "Condition", "extension": ext(org), "identifier": ident(&format!("{tag}-dx1")),
                "clinicalStatus": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/condition-clinical", "code": "active"}]},
                "code": {"coding": [{"system": "http://medis.or.jp/CodeSystem/master-disease-keyNumber", "code": "20054178", "display": "胃癌"}]},
                "subject": {"reference": p}, "recordedDate": "2026-11-01"}},
            {"resource": {"resourceType": "Observation", "extension": ext(org), "identifier": ident(&format!("{tag}-hbs")), "status": "final",
                "code": {"coding": [{"system": "http://medis.or.jp/CodeSystem/master-JLAC10-17digits", "code": "5F016141002305151", "display": "HBs抗原"}]},
                "subject": {"reference": p}, "effectiveDateTime": "2026-11-01", "valueString": "陰性"}},
            {"resource": {"resourceType": "Observation", "extension": ext(org), "identifier": ident(&format!("{tag}-alb")), "status": "final",
                "code": {"coding": [{"system": "http://jpfhir.jp/fhir/clins/CodeSystem/JLAC10/JP_CLINS_ObsLabResult_CoreLabo_CS", "code": "3A015000002327101", "display": "ALB"}]},
                "subject": {"reference": p}, "effectiveDateTime": "2026-11-01",
                "valueQuantity": {"value": 3.9, "unit": "g/dL", "system": "http://unitsofmeasure.org", "code": "g/dL"}}},
            {"resource": {"resourceType": "AllergyIntolerance", "extension": ext(org), "identifier": ident(&format!("{tag}-alg")),
                "category": ["medication"],
                "code": {"text": "ペニシリン"}, "patient": {"reference": p}, "recordedDate": "2026-11-01"}}
        ]
    })
}

/// A referral letter Bundle from `from` to `to` with one prescription.
pub fn referral_bundle(from: &str, to: &str, local: &str) -> Value {
    let p = "urn:uuid:00000000-0000-0000-0000-0000000000a1";
    json!({
        "resourceType": "Bundle",
        "type": "document",
        "identifier": {"system": "http://jpfhir.jp/fhir/clins/bundle-identifier", "value": format!("{from}^2026^{local}")},
        "timestamp": "2026-11-21T10:00:00+09:00",
        "entry": [
            {"fullUrl": "urn:uuid:00000000-0000-0000-0000-0000000000c1", "resource": {"resourceType": "Composition", "status": "final",
                "type": {"coding": [{"system": DOC_TYPE_SYSTEM, "code": REFERRAL, "display": "診療情報提供書"}]},
                "subject": {"reference": p}, "date": "2026-11-21T10:00:00+09:00", "author": [{"reference": "urn:uuid:00000000-0000-0000-0000-0000000000o1"}],
                "title": "診療情報提供書",
                "section": [
                    {"title": "紹介先情報", "code": {"coding": [{"system": "http://jpfhir.jp/fhir/clins/CodeSystem/document-section", "code": "910"}]},
                     "entry": [{"reference": "urn:uuid:00000000-0000-0000-0000-0000000000o2"}]},
                    {"title": "処方", "code": {"coding": [{"system": "http://jpfhir.jp/fhir/clins/CodeSystem/document-section", "code": "360"}]},
                     "entry": [{"reference": "urn:uuid:00000000-0000-0000-0000-0000000000m1"}]}
                ]}},
            {"fullUrl": p, "resource": {"resourceType": "Patient"}},
            {"fullUrl": "urn:uuid:00000000-0000-0000-0000-0000000000o1", "resource": {"resourceType": "Organization", "identifier": [{"system": INSTITUTION_SYSTEM, "value": from}]}},
            {"fullUrl": "urn:uuid:00000000-0000-0000-0000-0000000000o2", "resource": {"resourceType": "Organization", "identifier": [{"system": INSTITUTION_SYSTEM, "value": to}]}},
            {"fullUrl": "urn:uuid:00000000-0000-0000-0000-0000000000m1", "resource": {"resourceType": "MedicationRequest", "status": "active", "intent": "order",
                "identifier": [{"system": RESOURCE_ID_SYSTEM, "value": format!("{local}-rx1")}],
                "medicationCodeableConcept": {"coding": [{"system": "urn:oid:1.2.392.100495.20.2.74", "code": "610406079", "display": "ガスター散２％"}], "text": "ガスター散２％"},
                "subject": {"reference": p}, "authoredOn": "2026-11-21"}}
        ]
    })
}

/// A checkup report Bundle (no addressee, no attachments).
pub fn checkup_bundle(from: &str, local: &str) -> Value {
    let p = "urn:uuid:00000000-0000-0000-0000-0000000000b1";
    json!({
        "resourceType": "Bundle",
        "type": "document",
        "identifier": {"system": "http://jpfhir.jp/fhir/core/IdSystem/documentInstance-identifier", "value": format!("{from}^2026^{local}")},
        "timestamp": "2026-11-21T10:00:00+09:00",
        "entry": [
            {"fullUrl": "urn:uuid:00000000-0000-0000-0000-0000000000c2", "resource": {"resourceType": "Composition", "status": "final",
                "type": {"coding": [{"system": DOC_TYPE_SYSTEM, "code": "53576-5", "display": "検診・健診報告書"}]},
                "subject": {"reference": p}, "date": "2026-11-21T10:00:00+09:00", "author": [{"reference": "urn:uuid:00000000-0000-0000-0000-0000000000o3"}],
                "title": "健康診断結果のお知らせ"}},
            {"fullUrl": p, "resource": {"resourceType": "Patient"}},
            {"fullUrl": "urn:uuid:00000000-0000-0000-0000-0000000000o3", "resource": {"resourceType": "Organization", "identifier": [{"system": INSTITUTION_SYSTEM, "value": from}]}}
        ]
    })
}

fn write_all(store: &dyn Store, org: &str, items: Vec<Prepared>) -> FhirResult<()> {
    let mut tx = store.begin()?;
    let ctx = WriteContext {
        org: Some(org.to_string()),
        user: Some("demo".into()),
    };
    let mut records = Vec::new();
    for p in items {
        let (s, _) = tx.update(&p.rt, &p.id, p.resource, None, &ctx)?;
        records.push(json!({
            "org": org, "user": "demo", "role": "doctor", "purpose": "treatment", "action": "create",
            "patient": tsunagi_fhir::index::compartment_patient(&p.rt, s.resource.as_ref().unwrap_or(&Value::Null)),
            "resources": [format!("{}/{}/_history/{}", p.rt, p.id, s.version)], "outcome": "success", "status": 201,
        }));
    }
    tx.audit_append(&records)?;
    tx.commit()
}

/// Seeds the sharing demo data (idempotent: entries have stable ids).
pub fn seed(store: &dyn Store, now: DateTime<Utc>) -> FhirResult<()> {
    write_all(
        store,
        HOSPITAL,
        prepare_clins(clins_bundle(HOSPITAL, "demo"), HOSPITAL, "pt-01", now)?,
    )?;
    let d = prepare_document(
        &referral_bundle(HOSPITAL, CLINIC, "demo-ref-1"),
        HOSPITAL,
        "pt-01",
        None,
        now,
    )?;
    let mut items = vec![d.body, d.doc];
    items.extend(d.prescriptions);
    write_all(store, HOSPITAL, items)?;
    let c = prepare_document(
        &checkup_bundle(HOSPITAL, "demo-chk-1"),
        HOSPITAL,
        "pt-02",
        Some(INSURER.into()),
        now,
    )?;
    write_all(store, HOSPITAL, vec![c.body, c.doc])
}
