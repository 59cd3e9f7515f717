//! Demo data for the fixed demo dataset (see `crates/cli/src/demo.rs`): one
//! registered prescription for pt-01 from the hospital, one paper-prescription
//! dispensing result for pt-01 at the pharmacy, so a pre-check at the clinic
//! shows a duplicate.
//!
//! Written as the service (no HTTP), idempotent by fixed exchange number.

use chrono::NaiveDate;
use serde_json::json;
use tsunagi_fhir::FhirResult;
use tsunagi_store::{Store, WriteContext};

use crate::model::{
    Med, MedIndex, PRESCRIPTION_ID_SYSTEM, Prescription, SERVICE_ORG, State, index_id,
    prescription_id, to_basic,
};

pub const DEMO_EXCHANGE_NUMBER: &str = "0000000000000001";
const HOSPITAL: &str = "1310123458";
const PHARMACY: &str = "1340222221";

/// Seeds the demo prescription; returns a one-line summary.
pub fn seed(store: &dyn Store, today: NaiveDate) -> FhirResult<String> {
    let id = prescription_id(DEMO_EXCHANGE_NUMBER);
    if store.read("Basic", &id)?.is_some() {
        return Ok(format!(
            "e-prescription demo present (引換番号 {DEMO_EXCHANGE_NUMBER})"
        ));
    }
    let patient = "pt-01";
    let mid = format!("{id}-1");
    let mr = json!({
        "resourceType": "MedicationRequest", "id": mid, "status": "active", "intent": "order",
        "groupIdentifier": {"system": PRESCRIPTION_ID_SYSTEM, "value": id},
        "medicationCodeableConcept": {"coding": [{"system": "urn:oid:1.2.392.100495.20.1.73", "code": "2325003F1020", "display": "ファモチジン錠"}]},
        "subject": {"reference": format!("Patient/{patient}")},
        "authoredOn": today.to_string(),
        "dispenseRequest": {"expectedSupplyDuration": {"value": 14, "unit": "日", "system": "http://unitsofmeasure.org", "code": "d"}},
    });
    let line = Med {
        code: "2325003F1020".into(),
        display: "ファモチジン錠".into(),
        start: today,
        days: 14,
        org: HOSPITAL.into(),
        source: format!("MedicationRequest/{mid}"),
        rx: Some(id.clone()),
    };
    let rx = Prescription {
        id: id.clone(),
        exchange_number: DEMO_EXCHANGE_NUMBER.into(),
        patient: patient.into(),
        prescriber_org: HOSPITAL.into(),
        prescriber_user: Some("dr-demo".into()),
        issued: today,
        state: State::Registered,
        pharmacy: None,
        uses: 1,
        cycle: 1,
        parts: 0,
        requests: vec![mid.clone()],
        dispenses: vec![],
        lines: vec![line.clone()],
        signed: false,
    };
    let paper = json!({
        "resourceType": "MedicationDispense", "id": "erx-demo-paper-1", "status": "completed",
        "medicationCodeableConcept": {"coding": [{"system": "urn:oid:1.2.392.100495.20.1.73", "code": "1149019F1560", "display": "ロキソプロフェンNa錠60mg"}]},
        "subject": {"reference": format!("Patient/{patient}")},
        "daysSupply": {"value": 7, "unit": "日", "system": "http://unitsofmeasure.org", "code": "d"},
        "whenHandedOver": today.to_string(),
    });
    let paper_line = Med {
        code: "1149019F1560".into(),
        display: "ロキソプロフェンNa錠60mg".into(),
        start: today,
        days: 7,
        org: PHARMACY.into(),
        source: "MedicationDispense/erx-demo-paper-1".into(),
        rx: None,
    };
    let idx = MedIndex {
        patient: patient.into(),
        meds: vec![line, paper_line],
    };
    let svc = WriteContext {
        org: Some(SERVICE_ORG.into()),
        user: None,
    };
    let mut tx = store.begin()?;
    tx.update(
        "MedicationRequest",
        &mid,
        mr,
        None,
        &WriteContext {
            org: Some(HOSPITAL.into()),
            user: Some("dr-demo".into()),
        },
    )?;
    tx.update(
        "MedicationDispense",
        "erx-demo-paper-1",
        paper,
        None,
        &WriteContext {
            org: Some(PHARMACY.into()),
            user: Some("ph-demo".into()),
        },
    )?;
    tx.update(
        "Basic",
        &id,
        to_basic(&id, "prescription", Some(patient), &rx),
        None,
        &svc,
    )?;
    let iid = index_id(patient);
    tx.update(
        "Basic",
        &iid,
        to_basic(&iid, "medication-index", Some(patient), &idx),
        None,
        &svc,
    )?;
    tx.commit()?;
    Ok(format!(
        "e-prescription demo: pt-01 prescription (引換番号 {DEMO_EXCHANGE_NUMBER}) and a paper dispensing"
    ))
}
