//! The eligibility service's black-box tests: the shared harness
//! (`tsunagi-testkit`: the real server with the service installed, both backends,
//! a manual clock), the patients these tests seed, and the access matrix's oracle.

#![allow(dead_code)]

use serde_json::json;
use tsunagi_policy::identity::{OrgKind, Role};

pub use tsunagi_testkit::*;

/// The eligibility tests' patients: a person with coverage (the testkit's
/// `seed_person`) and one record of each consent category, written by hospital B.
pub trait SeedRecords {
    fn seed_patient(&self, id: &str, family: &str, given: &str, birth: &str, address: &str);
}

impl SeedRecords for TestServer {
    fn seed_patient(&self, id: &str, family: &str, given: &str, birth: &str, address: &str) {
        self.seed_person(id, family, given, birth, address);
        let subj = json!({"reference": format!("Patient/{id}")});
        self.put(
            "Condition",
            &format!("{id}-cond"),
            json!({"resourceType": "Condition", "id": format!("{id}-cond"), "subject": subj, "code": {"text": "高血圧症"}}),
            HOSP_B,
        );
        self.put(
            "Observation",
            &format!("{id}-obs"),
            json!({"resourceType": "Observation", "id": format!("{id}-obs"), "status": "final", "subject": subj, "code": {"text": "HbA1c"}}),
            HOSP_B,
        );
        self.put(
            "MedicationRequest",
            &format!("{id}-med"),
            json!({"resourceType": "MedicationRequest", "id": format!("{id}-med"), "status": "active", "intent": "order", "subject": subj, "medicationCodeableConcept": {"text": "アムロジピン"}}),
            HOSP_B,
        );
        self.put(
            "Composition",
            &format!("{id}-doc"),
            json!({"resourceType": "Composition", "id": format!("{id}-doc"), "status": "final", "type": {"text": "特定健診結果"}, "subject": subj, "date": "2026-04-01", "author": [{"display": "健診機関"}], "title": "特定健診"}),
            HOSP_B,
        );
    }
}

// ------------------------------------------------------------------ the access matrix's oracle

/// Consent state of the target patient (p1) towards the caller's facility.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConsentState {
    None,
    /// Live reception grant at the caller's facility with these categories (A, B, C).
    Live([bool; 3]),
    /// A grant for all categories that ended one second ago.
    Expired,
    /// A live grant for all categories, at another facility.
    OtherFacility,
}

impl ConsentState {
    pub const ALL: [ConsentState; 7] = [
        ConsentState::None,
        ConsentState::Live([true, false, false]),
        ConsentState::Live([false, true, false]),
        ConsentState::Live([false, false, true]),
        ConsentState::Live([true, true, true]),
        ConsentState::Expired,
        ConsentState::OtherFacility,
    ];
}

/// Access mode of the request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Purpose treatment.
    Normal,
    /// Purpose emergency, a session open for this user and patient, second factor.
    Emergency,
    /// Purpose emergency with a session, but the token has no second factor.
    EmergencyNoSecondFactor,
    /// Purpose disaster: the caller's prefecture declared, now inside the period,
    /// the patient looked up by this facility.
    Disaster,
    /// As Disaster, but the declaration names another prefecture.
    DisasterOutsideArea,
    /// As Disaster, but the period ended one second ago.
    DisasterOutsidePeriod,
}

impl Mode {
    pub const ALL: [Mode; 6] = [
        Mode::Normal,
        Mode::Emergency,
        Mode::EmergencyNoSecondFactor,
        Mode::Disaster,
        Mode::DisasterOutsideArea,
        Mode::DisasterOutsidePeriod,
    ];

    pub fn purpose(self) -> tsunagi_policy::Purpose {
        use tsunagi_policy::Purpose;
        match self {
            Mode::Normal => Purpose::Treatment,
            Mode::Emergency | Mode::EmergencyNoSecondFactor => Purpose::Emergency,
            _ => Purpose::Disaster,
        }
    }
}

/// Target types, one per category plus eligibility.
pub const TARGET_TYPES: &[(&str, &str)] = &[
    ("Patient", "eligibility"),
    ("Coverage", "eligibility"),
    ("Condition", "A"),
    ("Procedure", "A"),
    ("Observation", "B"),
    ("MedicationRequest", "B"),
    ("AllergyIntolerance", "B"),
    ("Composition", "C"),
];

/// The specification, stated independently of the rules: may a `role` at an
/// organisation of `kind` read a record of type `rt` of patient p1 written by
/// another organisation, in this consent state and mode?
pub fn expected_read(
    role: Role,
    kind: OrgKind,
    consent: ConsentState,
    mode: Mode,
    rt: &str,
) -> bool {
    let category = TARGET_TYPES
        .iter()
        .find(|(t, _)| *t == rt)
        .map(|(_, c)| *c)
        .unwrap_or("none");
    let eligibility = category == "eligibility";
    let care = matches!(
        kind,
        OrgKind::Hospital | OrgKind::Clinic | OrgKind::DentalClinic | OrgKind::Pharmacy
    );
    let qualified = matches!(role, Role::Doctor | Role::Dentist | Role::Pharmacist);
    let clinical = matches!(
        role,
        Role::Doctor | Role::Dentist | Role::Pharmacist | Role::Nurse
    );
    match mode {
        Mode::Normal => {
            let granted = match consent {
                ConsentState::Live(c) => Some(c),
                _ => None,
            };
            care && (role == Role::Clerk || clinical)
                && granted.is_some_and(|c| {
                    eligibility
                        || qualified
                            && ((category == "A" && c[0])
                                || (category == "B" && c[1])
                                || (category == "C" && c[2]))
                })
        }
        Mode::Emergency => kind == OrgKind::Hospital && role == Role::Doctor,
        Mode::EmergencyNoSecondFactor => false,
        // disaster purpose is open to clinical roles only (the core's purpose rule)
        Mode::Disaster => care && clinical && (eligibility || qualified),
        Mode::DisasterOutsideArea | Mode::DisasterOutsidePeriod => false,
    }
}

/// The organisation code used for a kind in the matrix (prefecture 13 for care facilities).
pub fn org_code(kind: OrgKind) -> &'static str {
    match kind {
        OrgKind::Hospital => HOSP_A,
        OrgKind::Clinic => CLINIC,
        OrgKind::DentalClinic => "1330111118",
        OrgKind::Pharmacy => PHARMACY,
        OrgKind::Insurer => INSURER,
        OrgKind::Municipality | OrgKind::PublicHealthCentre => "131016",
        OrgKind::ResearchOrganisation => "R0000001",
        OrgKind::Operator => OPERATOR,
        OrgKind::Ministry => MINISTRY,
        OrgKind::Patient => tsunagi_policy::identity::PATIENT_ORG,
    }
}
